//! Arbitrary bytes as an enrolment credential. Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let issuer = edgetally_proto::credential::issuer_public(&[7; 32]);
    let _ = edgetally_proto::credential::verify(data, &[issuer], 0);
});
