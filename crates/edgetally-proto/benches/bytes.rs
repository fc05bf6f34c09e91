//! Wire bytes per event: signed edgetally batches against the raw JSON events they summarise,
//! in the seeds' IoT shape (`{"device_id","timestamp","metric_name","metric_value"}`), as a curve
//! over events per key per bucket; then the same events with sketches (batch format v2): each
//! event of one of 1,000 subjects, and/or every value in a quantile sketch. Prints two tables;
//! `cargo xtask bench sdk`.

use edgetally_proto::producer::{Producer, ProducerConfig};

const EVENTS: usize = 200_000;
const T0: i64 = 1_700_000_000;

fn main() {
    plain();
    println!();
    with_sketches();
}

fn plain() {
    println!("events per key per 1 s bucket | JSON bytes/event | edgetally bytes/event | ratio");
    for per_key in [1usize, 10, 100, 1000] {
        // 50 devices × 4 metrics = 200 keys; each key gets `per_key` events per second.
        let metrics = ["temperature", "humidity", "pressure", "battery"];
        let keys: Vec<(String, &str)> = (0..50)
            .flat_map(|d| metrics.iter().map(move |m| (format!("dev-{d:04}"), *m)))
            .collect();
        let per_second = keys.len() * per_key;
        let seconds = EVENTS.div_ceil(per_second) as i64;
        let now_ms = (T0 + seconds) * 1000;
        let config = ProducerConfig {
            flush_interval_ms: i64::MAX / 4,
            ..ProducerConfig::default()
        };
        let mut p = Producer::new(config, [3; 32], 1, &["merger".to_string()], 1).expect("config");
        let (mut json, mut events) = (0usize, 0usize);
        'outer: for s in 0..seconds {
            for i in 0..per_key {
                for (n, (device, metric)) in keys.iter().enumerate() {
                    if events == EVENTS {
                        break 'outer;
                    }
                    let value = ((n * 31 + i * 7 + s as usize) % 4000) as f64 / 100.0;
                    let ts = T0 + s;
                    json += format!(
                        "{{\"device_id\":\"{device}\",\"timestamp\":{ts},\"metric_name\":\"{metric}\",\"metric_value\":{value}}}\n"
                    )
                    .len();
                    p.record(
                        now_ms,
                        metric,
                        Some(device),
                        value,
                        Some(ts * 1000 + (i as i64 % 1000)),
                    )
                    .expect("valid event");
                    events += 1;
                }
            }
        }
        p.flush(now_ms);
        let mut wire = 0usize;
        while let Some(t) = p.poll_transmit(now_ms) {
            wire += t.bytes.len();
            p.handle_reply(now_ms, t.seq, edgetally_proto::Reply::Ack);
        }
        let (j, w) = (json as f64 / events as f64, wire as f64 / events as f64);
        println!("{per_key:>29} | {j:>16.1} | {w:>21.2} | {:>5.1}×", j / w);
    }
}

/// Subjects and quantiles: bytes per event and per batch for the same stream with no sketch,
/// with a subject per event (1,000 subjects, drawn round-robin), with every value in a
/// quantile sketch, and with both.
fn with_sketches() {
    println!(
        "events per key per 1 s bucket | sketches           | batches | bytes/batch | bytes/event"
    );
    for per_key in [1usize, 10, 100, 1000] {
        for (label, subjects, quantiles) in [
            ("none", false, false),
            ("subjects", true, false),
            ("quantiles", false, true),
            ("subjects+quantiles", true, true),
        ] {
            let (batches, wire, events) = sketched_stream(per_key, subjects, quantiles);
            println!(
                "{per_key:>29} | {label:<18} | {batches:>7} | {:>11.0} | {:>11.2}",
                wire as f64 / batches as f64,
                wire as f64 / events as f64
            );
        }
    }
}

/// (batches, wire bytes, events) for 200,000 events over 200 keys, `per_key` a second each.
fn sketched_stream(per_key: usize, subjects: bool, quantiles: bool) -> (usize, usize, usize) {
    let metrics = ["temperature", "humidity", "pressure", "battery"];
    let keys: Vec<(String, &str)> = (0..50)
        .flat_map(|d| metrics.iter().map(move |m| (format!("dev-{d:04}"), *m)))
        .collect();
    let seconds = EVENTS.div_ceil(keys.len() * per_key) as i64;
    let now_ms = (T0 + seconds) * 1000;
    let config = ProducerConfig {
        flush_interval_ms: i64::MAX / 4,
        quantile_categories: if quantiles {
            vec!["*".into()]
        } else {
            Vec::new()
        },
        ..ProducerConfig::default()
    };
    let mut p = Producer::new(config, [3; 32], 1, &["merger".to_string()], 1).expect("config");
    let handles: Vec<_> = keys
        .iter()
        .map(|(d, m)| p.handle(m, Some(d)).expect("handle"))
        .collect();
    let names: Vec<String> = (0..1000).map(|u| format!("user-{u}")).collect();
    let mut events = 0usize;
    'outer: for s in 0..seconds {
        for i in 0..per_key {
            for (n, h) in handles.iter().enumerate() {
                if events == EVENTS {
                    break 'outer;
                }
                let value = ((n * 31 + i * 7 + s as usize) % 4000) as f64 / 100.0;
                let ts = Some((T0 + s) * 1000 + (i as i64 % 1000));
                if subjects {
                    let who = &names[events % names.len()];
                    p.record_subject(now_ms, *h, value, ts, who)
                } else {
                    p.record_handle(now_ms, *h, value, ts)
                }
                .expect("valid event");
                events += 1;
            }
        }
    }
    p.flush(now_ms);
    let (mut batches, mut wire) = (0usize, 0usize);
    while let Some(t) = p.poll_transmit(now_ms) {
        batches += 1;
        wire += t.bytes.len();
        p.handle_reply(now_ms, t.seq, edgetally_proto::Reply::Ack);
    }
    (batches, wire, events)
}
