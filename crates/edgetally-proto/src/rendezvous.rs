//! Rendezvous hashing, shared by the producer's endpoint order and the topology's owner rule
//! (its own module, so that neither of those depends on the other for it).

/// The rendezvous weight of `name` for `key`: FNV-1a (64-bit) over `key ‖ name`, then
/// SplitMix64's finaliser so every input bit reaches every output bit. Not a cryptographic
/// hash — a producer picks its own key, so it can pick its endpoint anyway — but uniform
/// enough to spread keys evenly, and a few dozen bytes of wasm where SHA-2 costs ~3 KB
/// gzipped once the browser SDK no longer links it for signing.
pub fn rendezvous_weight(key: &[u8; 32], name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.iter().chain(name) {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}
