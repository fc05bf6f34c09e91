//! Arbitrary bytes into the reply decoder and the frame splitter. Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edgetally_proto::Reply::decode(data);
    let mut d = edgetally_proto::FrameDecoder::new(1024);
    for chunk in data.chunks(7) {
        d.push(chunk);
        while let Ok(Some(f)) = d.next_frame() {
            let _ = edgetally_proto::Reply::decode(&f);
        }
    }
});
