//! Every input in `tests/crashers/` once crashed a decoder, or was written to probe one; each
//! must now decode to an error, never a panic and never a batch (and, as a snapshot, restore
//! or fail without a panic).

use edgetally_core::Limits;
use edgetally_proto::{open, FrameDecoder, Reply};

#[test]
fn every_crasher_is_an_error() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crashers");
    let mut n = 0;
    for f in std::fs::read_dir(&dir).expect("crashers dir") {
        let path = f.expect("entry").path();
        let bytes = std::fs::read(&path).expect("read");
        assert!(
            open(&bytes, &Limits::default(), 1_700_000_000_000).is_err(),
            "{path:?} decoded"
        );
        let _ = Reply::decode(&bytes);
        // A stored or peer-sent snapshot: an error or a state, never a panic.
        if let Ok(snap) = edgetally_core::Snapshot::decode(&bytes) {
            if let Ok(r) = edgetally_core::Replica::restore(snap) {
                let _ = (r.state_hash(), r.snapshot());
            }
        }
        // Sketch bytes (issue 30): an error or a canonical sketch, never a panic.
        if let Ok(h) = edgetally_sketch::Hll::decode(&bytes) {
            assert_eq!(h.encode(), bytes, "{path:?}");
            let _ = h.estimate();
        }
        if let Ok(q) = edgetally_sketch::Quantiles::decode(&bytes) {
            assert_eq!(q.encode(), bytes, "{path:?}");
            let _ = (q.count(), q.quantile(0.99));
        }
        let mut d = FrameDecoder::new(1 << 20);
        d.push(&bytes);
        while let Ok(Some(_)) = d.next_frame() {}
        n += 1;
    }
    assert!(n >= 8, "only {n} crashers");
}
