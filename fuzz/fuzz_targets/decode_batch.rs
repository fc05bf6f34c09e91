//! Arbitrary bytes into the whole batch acceptance path, and into `peek` (routing). Must never
//! panic.
#![no_main]

use edgetally_core::Limits;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_summaries: 64, ..Limits::default() };
    // What routing reads (shard groups) agrees with the full decode whenever that succeeds.
    let peeked = edgetally_proto::peek(data, &limits);
    if let Ok(u) = edgetally_proto::decode(data, &limits) {
        assert_eq!(peeked, Some((u.batch.id, u.batch.created_ms)));
        let _ = u.batch.check_time(1_700_000_000_000, &limits);
        let _ = u.verify();
    }
});
