//! Seen-set expiry on the real binary: ephemeral producers' epochs expire once past the
//! lateness horizon (memory comes back), a resend of an expired batch is refused with
//! `bucket_too_old` instead of counting twice, and a restart (the snapshot without those
//! seen-sets, the store without their batches) counts every event exactly once.

use crate::harness::{free_udp, now_ms, Merger, TempDir};
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
    // The snapshot is a file of its own, of the size `/metrics` reports.
    let reported = m.metric("edgetally_snapshot_bytes") as u64;
    let sizes: Vec<u64> = std::fs::read_dir(&dir.0)
        .expect("data dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "etsn"))
        .map(|p| std::fs::metadata(&p).expect("stat").len())
        .collect();
    assert!(
        reported > 37 && sizes.contains(&reported),
        "edgetally_snapshot_bytes {reported}, files {sizes:?}"
    );
    m.kill9();
    let m = Merger::start_with_env(&dir.0, &[], ENV);
    assert_eq!(m.recovered, 0, "the expired epochs' batches left the store");
    assert!(
        totals_match(&m, &model, start, end),
        "restart counts every event once"
    );
    assert_eq!(m.metric("edgetally_producer_epochs"), 0.0);
}

fn state_hash(m: &Merger) -> Option<String> {
    m.get("/v1/status").1["state_sha256"]
        .as_str()
        .map(str::to_string)
}

/// Two peers expire at different moments (different margins stand in for different clocks
/// and sweep times): while one has forgotten epochs the other still holds, neither takes the
/// difference for a gap (no snapshot adopted, no divergence), new batches keep replicating,
/// and both end with the same state hash and exact totals, retaining nothing.
#[test]
fn peers_that_expire_at_different_moments_neither_adopt_nor_diverge() {
    let q = [free_udp(), free_udp()];
    let dirs = [TempDir::new("expiry-a"), TempDir::new("expiry-b")];
    let start = |i: usize, margin: &'static str| {
        let peer = q[1 - i].to_string();
        let env = [
            ("EDGETALLY_MAX_LATENESS_MS", "3000"),
            ("EDGETALLY_SEEN_EXPIRY_MARGIN_MS", margin),
            ("EDGETALLY_SNAPSHOT_INTERVAL_SECS", "1"),
            ("EDGETALLY_SYNC_INTERVAL_MS", "200"),
            ("EDGETALLY_CLUSTER_SECRET", "expiry-test-secret"),
            ("EDGETALLY_PRODUCER_BATCHES_PER_SEC", "0"),
            ("EDGETALLY_SOURCE_BATCHES_PER_SEC", "0"),
        ];
        Merger::start_at(&dirs[i].0, &q[i].to_string(), &["--peer", &peer], &env)
    };
    let a = start(0, "500");
    let b = start(1, "6000");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut rng = Rng::new(11);
    let mut model = Model::default();
    let mut send = |m: &Merger, first: u64, producers: u64| {
        let base = now_ms();
        let mut batches = Vec::new();
        for p in first..first + producers {
            let s = signer(20_000 + p);
            let ev = events_at(&mut rng, 4, 300, base);
            ev.iter().for_each(|e| model.add(e));
            let id = BatchId {
                producer: s.producer(),
                epoch: 3,
                seq: 0,
            };
            batches.push(s.seal(&build_at(id, &ev, base)).expect("seal"));
        }
        rt.block_on(async {
            let c = Client::connect(m.quic, vec![m.cert])
                .await
                .expect("connect");
            for b in &batches {
                assert_eq!(c.send(b).await.expect("reply"), Reply::Ack);
            }
            c.close().await;
        });
    };
    let t0 = now_ms();
    send(&a, 0, 30);
    let converged = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (ha, hb) = (state_hash(&a), state_hash(&b));
            if ha.is_some() && ha == hb {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {ha:?} vs {hb:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    converged("after the first batches");
    // A forgets the epochs first (3 s + 0.5 s past the horizon), B three seconds later.
    wait_for(&a, "A to expire", |m| {
        m.metric("edgetally_producer_epochs") == 0.0
    });
    let b_epochs = b.metric("edgetally_producer_epochs");
    assert!(
        b_epochs == 30.0 || now_ms() - t0 > 9_000,
        "B expired too early: {b_epochs} epochs left"
    );
    // New producers write to B meanwhile; A must get them, and the rounds in between must
    // not mistake A's forgotten epochs for batches it lacks.
    send(&b, 100, 10);
    std::thread::sleep(Duration::from_millis(1500));
    converged("with A expired and B not");
    wait_for(&b, "B to expire", |m| {
        m.metric("edgetally_producer_epochs") == 0.0
    });
    wait_for(&a, "A to expire the later epochs", |m| {
        m.metric("edgetally_producer_epochs") == 0.0
    });
    converged("after both expired");
    let (start, end) = (t0 - 60_000, now_ms() + 60_000);
    for m in [&a, &b] {
        assert!(totals_match(m, &model, start, end), "exact on every node");
        assert_eq!(m.metric("edgetally_snapshots_adopted_total"), 0.0);
        assert_eq!(m.metric("edgetally_divergences_total"), 0.0);
        assert_eq!(m.get("/v1/status").1["retained_batches"], 0);
        assert_eq!(m.metric("edgetally_memory_bytes{kind=\"log\"}"), 0.0);
    }
    assert_eq!(a.metric("edgetally_epochs_expired_total"), 40.0);
    assert_eq!(b.metric("edgetally_epochs_expired_total"), 40.0);
}
