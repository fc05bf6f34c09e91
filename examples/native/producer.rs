//! The native SDK: a producer that records the examples' workload (the same as the
//! JavaScript examples: 1,000 temperature readings by name, 5,000 request counts through a
//! handle, 10,000 latencies in one bulk call) and ships it over QUIC to a merger, then prints
//! its stats as JSON.
//!
//! Run against `edgetally serve` (which prints its `quic:` address and `cert-sha256:`):
//! `cargo run -p edgetally-examples --bin native-producer -- 127.0.0.1:7071 <cert-sha256>`

use edgetally_net::{now_ms, tls::parse_hash, Endpoint, NativeProducer};
use edgetally_proto::ProducerConfig;
use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: native-producer <quic-addr> <cert-sha256>";
    let addr = args.next().ok_or(usage)?.parse()?;
    let cert = parse_hash(&args.next().ok_or(usage)?).ok_or("cert-sha256: 64 hex digits")?;

    // No state directory: a fresh key and epoch, the outbox in memory.
    let config = ProducerConfig {
        flush_interval_ms: 100,
        quantile_categories: vec!["latency_ms".into()],
        ..ProducerConfig::default()
    };
    let producer = NativeProducer::start(config, vec![Endpoint { addr, cert }], None)?;
    let base = now_ms();

    // 1. Events by name.
    for i in 0..1000i64 {
        let sensor = format!("sensor-{}", i % 4);
        let value = 20.0 + (i % 50) as f64 / 10.0;
        producer.record("temperature", Some(&sensor), value, Some(base - i * 50))?;
    }
    // 2. A handle for a hot loop.
    let requests = producer.handle("requests", Some("edge-1"))?;
    for i in 0..5000 {
        producer.record_handle(requests, f64::from(1 + i % 3), Some(base))?;
    }
    // 3. Many values in one call.
    let latency = producer.handle("latency_ms", None)?;
    let values: Vec<f64> = (0..10_000).map(|i| f64::from(i % 200) / 4.0).collect();
    let times = vec![base; values.len()];
    producer.record_many(latency, &values, Some(&times));
    // Who did it: a subject per event, for distinct counts (only its hash leaves).
    for i in 0..2000 {
        let visitor = format!("visitor-{}", (i * 7) % 300);
        producer.record_subject("page_view", None, 1.0, Some(base), &visitor)?;
    }

    // Resolves once the merger has acknowledged everything recorded above.
    if !producer.flush(Duration::from_secs(30)).await {
        return Err("not acknowledged within 30 s".into());
    }
    let s = producer.stats();
    producer.close();
    println!(
        "{{\"runtime\":\"native\",\"base\":{base},\"stats\":{{\"recorded\":{},\"ackedRecords\":{},\"acked\":{},\"invalid\":{},\"rejected\":{},\"dropped\":{}}}}}",
        s.recorded,
        s.acked_records,
        s.acked,
        s.invalid.total(),
        s.rejected.total(),
        s.dropped
    );
    Ok(())
}
