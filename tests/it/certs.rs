//! The generated certificate is what browsers accept for `serverCertificateHashes` (ECDSA
//! P-256, valid at most 14 days), persists across restarts, and is renewed when near expiry.

use crate::harness::{now_ms, Merger, TempDir};

/// The certificate's (notBefore, notAfter) in Unix seconds, read from its two UTCTime fields.
fn validity(der: &[u8]) -> (i64, i64) {
    let mut times = Vec::new();
    for i in 0..der.len().saturating_sub(15) {
        if der[i] == 0x17 && der[i + 1] == 0x0d && der[i + 14] == b'Z' {
            let s = std::str::from_utf8(&der[i + 2..i + 14]).expect("UTCTime digits");
            let n = |a: usize| s[a..a + 2].parse::<i64>().expect("digits");
            let (y, mo, d, h, mi, se) = (2000 + n(0), n(2), n(4), n(6), n(8), n(10));
            // Days from the civil date (Howard Hinnant's algorithm).
            let (yy, mm) = if mo <= 2 {
                (y - 1, mo + 9)
            } else {
                (y, mo - 3)
            };
            let era = yy.div_euclid(400);
            let yoe = yy - era * 400;
            let doy = (153 * mm + 2) / 5 + d - 1;
            let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
            let days = era * 146_097 + doe - 719_468;
            times.push(days * 86_400 + h * 3600 + mi * 60 + se);
        }
    }
    assert_eq!(times.len(), 2, "two validity times");
    (times[0], times[1])
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn certificate_is_p256_short_lived_persistent_and_renewed() {
    let dir = TempDir::new("certs");
    let m = Merger::start(&dir.0, &[]);
    let h1 = m.cert;
    assert!(m.terminate());
    let der = std::fs::read(dir.0.join("cert.der")).expect("cert.der");
    assert_eq!(
        edgetally_net::tls::cert_hash(&der),
        h1,
        "printed hash = SHA-256 of the DER"
    );
    assert!(
        contains(
            &der,
            &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]
        ),
        "P-256 key"
    );
    assert!(
        contains(
            &der,
            &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]
        ),
        "ecdsa-with-SHA256"
    );
    let (nb, na) = validity(&der);
    let now = now_ms() / 1000;
    assert!(
        na - nb <= 14 * 86_400 && nb <= now && na > now + 12 * 86_400,
        "validity {nb}..{na} at {now}"
    );

    // Restarting keeps it.
    let m = Merger::start(&dir.0, &[]);
    assert_eq!(m.cert, h1);
    assert!(m.terminate());

    // Near expiry (an hour left), a restart renews it.
    std::fs::write(dir.0.join("cert.not_after"), format!("{}\n", now + 3600)).expect("write");
    let m = Merger::start(&dir.0, &[]);
    assert_ne!(m.cert, h1, "renewed");
    let (_, v) = m.get("/v1/status");
    assert_eq!(
        v["cert_sha256"]
            .as_str()
            .and_then(edgetally_net::tls::parse_hash),
        Some(m.cert)
    );
    let not_after = v["cert_not_after_unix"].as_i64().expect("not after");
    assert!(not_after > now + 12 * 86_400, "{not_after}");
}
