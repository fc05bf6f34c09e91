//! Arbitrary bytes into the whole batch acceptance path. Must never panic.
#![no_main]

use edgetally_core::Limits;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_summaries: 64, ..Limits::default() };
    if let Ok(u) = edgetally_proto::decode(data, &limits) {
        let _ = u.batch.check_time(1_700_000_000_000, &limits);
        let _ = u.verify();
    }
});
