//! Seen-set expiry on the real binary: ephemeral producers' epochs expire once past the
//! lateness horizon (memory comes back), a resend of an expired batch is refused with
//! `bucket_too_old` instead of counting twice, and a restart (the snapshot without those
//! seen-sets, the store without their batches) counts every event exactly once.

use crate::harness::{now_ms, Merger, TempDir};
use edgetally_core::{BatchId, RejectCode};
use edgetally_net::Client;
use edgetally_proto::Reply;
use edgetally_tests::{build_at, events_at, same_json, signer, Model, Rng};
use std::time::{Duration, Instant};

const PRODUCERS: u64 = 40;
const LATENESS_MS: i64 = 3_000;
const ENV: &[(&str, &str)] = &[
    ("EDGETALLY_MAX_LATENESS_MS", "3000"),
    ("EDGETALLY_SEEN_EXPIRY_MARGIN_MS", "1000"),
    // The first upkeep (expiry sweep, then compaction) comes after the horizon: the batches
    // are still in the log when their epochs expire, so that compaction must drop them.
    ("EDGETALLY_SNAPSHOT_INTERVAL_SECS", "8"),
    ("EDGETALLY_PRODUCER_BATCHES_PER_SEC", "0"),
    ("EDGETALLY_SOURCE_BATCHES_PER_SEC", "0"),
];

fn wait_for(m: &Merger, what: &str, ok: impl Fn(&Merger) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok(m) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn totals_match(m: &Merger, model: &Model, start: i64, end: i64) -> bool {
    let (status, v) = m.get(&format!("/v1/totals?start={start}&end={end}"));
    status == 200 && same_json(&v["groups"][0], model.total(|_, _, _| true))
}

#[test]
fn ephemeral_epochs_expire_and_a_late_resend_is_refused_not_counted_twice() {
    let dir = TempDir::new("expiry");
    let m = Merger::start_with_env(&dir.0, &[], ENV);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut rng = Rng::new(7);
    let mut model = Model::default();
    let base = now_ms();
    // Every producer a fresh key (a page view), two batches each, events in the last 500 ms.
    let mut sent: Vec<Vec<u8>> = Vec::new();
    for p in 0..PRODUCERS {
        let s = signer(9_000 + p);
        for seq in 0..2 {
            let ev = events_at(&mut rng, 5, 500, base);
            ev.iter().for_each(|e| model.add(e));
            let id = BatchId {
                producer: s.producer(),
                epoch: 1,
                seq,
            };
            sent.push(s.seal(&build_at(id, &ev, base)).expect("seal"));
        }
    }
    let replies = |batches: &[Vec<u8>]| -> Vec<Reply> {
        rt.block_on(async {
            let c = Client::connect(m.quic, vec![m.cert])
                .await
                .expect("connect");
            let mut out = Vec::new();
            for b in batches {
                out.push(c.send(b).await.expect("reply"));
            }
            c.close().await;
            out
        })
    };
    assert!(replies(&sent).iter().all(|r| *r == Reply::Ack));
    let (start, end) = (base - 60_000, base + 60_000);
    assert!(totals_match(&m, &model, start, end));
    assert_eq!(
        m.metric("edgetally_producer_epochs") as u64,
        PRODUCERS,
        "one seen-set per producer"
    );
    let seen_bytes = m.metric("edgetally_memory_bytes{kind=\"seen\"}");
    assert!(seen_bytes > 0.0, "seen-set memory is reported");

    // Past max_lateness + margin every epoch expires (at the first upkeep).
    wait_for(&m, "every epoch to expire", |m| {
        m.metric("edgetally_producer_epochs") == 0.0
    });
    assert!(
        now_ms() >= base + LATENESS_MS,
        "not expired before the horizon"
    );
    assert_eq!(m.metric("edgetally_epochs_expired_total") as u64, PRODUCERS);
    assert_eq!(m.metric("edgetally_memory_bytes{kind=\"seen\"}"), 0.0);
    assert!(
        totals_match(&m, &model, start, end),
        "expiry keeps the totals"
    );

    // A producer that never heard its acks resends: refused as too old, never counted again.
    let again = replies(&sent);
    assert!(
        again
            .iter()
            .all(|r| *r == Reply::Nack(RejectCode::BucketTooOld.as_u16())),
        "{again:?}"
    );
    assert!(totals_match(&m, &model, start, end));
    assert_eq!(m.metric("edgetally_producer_epochs"), 0.0);

    // The next compaction stores a snapshot without those seen-sets and drops their batches
    // from the log; a restart then replays nothing of them, so nothing counts twice.
    wait_for(&m, "the compaction after the expiry", |m| {
        m.metric("edgetally_snapshots_total") >= 1.0
    });
    m.kill9();
    let m = Merger::start_with_env(&dir.0, &[], ENV);
    assert_eq!(m.recovered, 0, "the expired epochs' batches left the store");
    assert!(
        totals_match(&m, &model, start, end),
        "restart counts every event once"
    );
    assert_eq!(m.metric("edgetally_producer_epochs"), 0.0);
}
