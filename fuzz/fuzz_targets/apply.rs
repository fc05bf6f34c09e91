//! Arbitrary bytes decoded (signature not checked) and, if they pass every check, applied to a
//! replica holding a few batches already; then novelty, queries and a snapshot round trip.
//! Must never panic, and the O(1) figures must match a recount.
#![no_main]

use edgetally_core::{Limits, LogEntry, Replica, Snapshot};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_summaries: 64, ..Limits::default() };
    let Ok(u) = edgetally_proto::decode(data, &limits) else { return };
    let mut batch = u.batch;
    if batch.check(&limits).is_err() {
        return;
    }
    let mut r = Replica::new();
    let _ = r.novelty(&batch);
    let entry = LogEntry { batch: Arc::new(batch.clone()), raw: Arc::from(&[][..]) };
    if r.apply(entry.clone()).is_ok() {
        assert_eq!(r.entry_count(), r.entry_count_exact());
        let _ = r.apply(entry);
        for c in r.categories() {
            let _ = r.topk(&c, i64::MIN, i64::MAX, 5, edgetally_core::TopBy::Entity);
        }
        let _ = r.totals(i64::MIN, i64::MAX, edgetally_core::GroupBy::Category);
        let snap = Snapshot::decode(&r.snapshot().encode()).expect("own snapshot decodes");
        let back = Replica::restore(snap).expect("own snapshot restores");
        assert_eq!(back.state_hash(), r.state_hash());
    }
    batch.id.seq = batch.id.seq.wrapping_add(1);
    let _ = r.novelty(&batch);
});
