//! Arbitrary bytes as a stored or peer-sent snapshot (any format), restored. Must never
//! panic: a damaged or hostile snapshot is an error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(snap) = edgetally_core::Snapshot::decode(data) {
        if let Ok(r) = edgetally_core::Replica::restore(snap) {
            let _ = r.state_hash();
            let _ = r.snapshot();
        }
    }
});
