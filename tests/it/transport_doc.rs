//! docs/PROTOCOL.md §5 (transports) and §3's precedence of reasons, checked statement by
//! statement. The QUIC client here is written from the document alone: plain quinn and
//! rustls with its own SHA-256 pinning, not edgetally-net's client.

use crate::harness::{now_ms, Merger, TempDir};
use edgetally_core::{BatchId, Limits, RejectCode, Summary};
use edgetally_proto::{encode_frame, BatchBuilder, Signer};
use edgetally_tests::signer;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Accepts exactly the certificate whose DER hashes to the pin (§5.2), and remembers the
/// hash it was shown.
#[derive(Debug)]
struct Pin {
    want: [u8; 32],
    seen: Mutex<Option<[u8; 32]>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Pin {
    fn verify_server_cert(
        &self,
        cert: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let hash: [u8; 32] = Sha256::digest(cert.as_ref()).into();
        *self.seen.lock().expect("lock") = Some(hash);
        if hash == self.want {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("not the pinned certificate".into()))
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A QUIC connection as §5.2 describes it: ALPN `alpn`, any server name, the pin.
async fn connect(
    addr: std::net::SocketAddr,
    pin: [u8; 32],
    alpn: &[u8],
) -> (Result<quinn::Connection, quinn::ConnectionError>, Arc<Pin>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(Pin {
        want: pin,
        seen: Mutex::new(None),
        provider: provider.clone(),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    // The merger does not look at the server name: any will do.
    let conn = ep
        .connect(addr, "no-such-name.invalid")
        .expect("connect")
        .await;
    (conn, verifier)
}

/// One stream: the bytes, FIN; then everything the merger sends until its FIN.
async fn exchange(conn: &quinn::Connection, bytes: &[u8]) -> Vec<u8> {
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    // A stream refused unread is stopped: the write may fail, the reply still comes.
    if send.write_all(bytes).await.is_ok() {
        let _ = send.finish();
    }
    recv.read_to_end(64).await.expect("reply until FIN")
}

fn batch(s: &Signer, seq: u64, now: i64) -> edgetally_core::Batch {
    let mut b = BatchBuilder::new(1000).expect("width");
    b.record("doc", Some("e1"), now - 2000, 1.5)
        .expect("record");
    b.record("doc", None, now - 1000, 2.0).expect("record");
    b.finish(
        BatchId {
            producer: s.producer(),
            epoch: 7,
            seq,
        },
        now,
    )
}

#[test]
fn a_quic_client_written_from_the_document_works() {
    let dir = TempDir::new("transport-doc");
    let m = Merger::start(&dir.0, &[]);
    let (_, status) = m.get("/v1/status");
    let (_, wt) = m.get("/v1/webtransport");
    let pin_hex = status["cert_sha256"]
        .as_str()
        .expect("cert_sha256")
        .to_string();
    let pin = edgetally_net::tls::parse_hash(&pin_hex).expect("hex");
    let s = signer(5150);
    let now = now_ms();
    let good = s.seal(&batch(&s, 0, now)).expect("seal");
    let rt = crate::harness::runtime();
    rt.block_on(async {
        let (conn, seen) = connect(m.quic, pin, b"edgetally/1").await;
        let conn = conn.expect("handshake with the pinned certificate");
        // The certificate presented is the one /v1/status and /v1/webtransport name.
        assert_eq!(*seen.seen.lock().expect("lock"), Some(pin));
        assert_eq!(
            wt["cert_sha256"][0].as_str(),
            Some(pin_hex.as_str()),
            "{wt}"
        );
        let not_after = wt["cert_not_after_unix"].as_i64().expect("not after");
        assert!(
            not_after - now / 1000 <= 14 * 86_400,
            "valid at most 14 days: {wt}"
        );

        // The envelope, FIN → the bare reply, FIN: Ack is the single byte 00; a resend too.
        assert_eq!(exchange(&conn, &good).await, [0x00]);
        assert_eq!(
            exchange(&conn, &good).await,
            [0x00],
            "a resend is acknowledged"
        );
        // A length-prefixed (framed) envelope is read as version = the prefix.
        let framed = encode_frame(&s.seal(&batch(&s, 1, now)).expect("seal"));
        assert!(framed[0] > 2, "a length prefix that is no version");
        assert_eq!(
            exchange(&conn, &framed).await,
            [0x01, RejectCode::UnsupportedVersion.as_u16() as u8]
        );
        // A bad signature: Nack 7, bare.
        let mut bad = s.seal(&batch(&s, 2, now)).expect("seal");
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(exchange(&conn, &bad).await, [0x01, 0x07]);
        // A stream over max_payload_bytes + 80 bytes: payload_too_large, unread.
        let limit = Limits::default().max_payload_bytes + 80;
        let mut big = good.clone();
        big.resize(limit + 1, 0);
        assert_eq!(exchange(&conn, &big).await, [0x01, 0x03]);
        // Exactly at the cap the stream is read (and refused for its content, not its size).
        big.truncate(limit);
        assert_eq!(
            exchange(&conn, &big).await,
            [0x01, RejectCode::TrailingBytes.as_u16() as u8]
        );
        // Many batches on concurrent streams, answered independently.
        let sends: Vec<_> = (10..40)
            .map(|seq| {
                let (conn, bytes) = (conn.clone(), s.seal(&batch(&s, seq, now)).expect("seal"));
                tokio::spawn(async move { exchange(&conn, &bytes).await })
            })
            .collect();
        for h in sends {
            assert_eq!(h.await.expect("task"), [0x00]);
        }
        // A credential is one stream too, told apart by its first byte 0xEC (an open policy
        // still checks it: these 138 bytes are signed by no issuer the merger knows).
        let mut cred = vec![0xEC, 0x01];
        cred.resize(138, 0);
        assert_eq!(
            exchange(&conn, &cred).await,
            [0x01, RejectCode::NotAdmitted.as_u16() as u8]
        );
        // A stream never finished is stopped after 10 s with no reply.
        let (mut send, mut recv) = conn.open_bi().await.expect("stream");
        send.write_all(&good[..10]).await.expect("write");
        let t = Instant::now();
        let reply = tokio::time::timeout(Duration::from_secs(20), recv.read_to_end(64))
            .await
            .expect("the merger gives up on the stream");
        assert!(
            reply.map_or(true, |r| r.is_empty()),
            "no reply to an unfinished stream"
        );
        assert!(t.elapsed() >= Duration::from_secs(9), "{:?}", t.elapsed());
        conn.close(0u32.into(), b"done");

        // Another ALPN: the handshake fails (no_application_protocol, TLS alert 120).
        let (refused, _) = connect(m.quic, pin, b"edgetally/2").await;
        let err = refused.expect_err("unknown ALPN").to_string();
        assert!(
            err.contains("120") || err.contains("no_application_protocol"),
            "{err}"
        );
    });
    let (_, v) = m.get("/v1/aggregate?category=doc&start=0&end=9999999999999");
    assert_eq!(
        v["count"].as_u64(),
        Some(2 * 31),
        "batch 0 and 10..40, once each: {v}"
    );
}

#[test]
fn post_batches_takes_the_bare_envelope_and_answers_as_documented() {
    let dir = TempDir::new("http-doc");
    let m = Merger::start_with_env(&dir.0, &[], &[("EDGETALLY_SOURCE_BATCHES_PER_SEC", "2")]);
    let s = signer(6160);
    let now = now_ms();
    let good = s.seal(&batch(&s, 0, now)).expect("seal");
    let (st, v, _) = m.post("/v1/batches", "application/octet-stream", &good);
    assert_eq!(
        (st, v),
        (200, serde_json::json!({"result": "ack", "frame": "00"}))
    );
    let mut bad = s.seal(&batch(&s, 1, now)).expect("seal");
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let (st, v, _) = m.post("/v1/batches", "text/plain", &bad);
    assert_eq!(
        (st, &v["result"], &v["error"], &v["frame"]),
        (422, &"nack".into(), &"bad_signature".into(), &"0107".into()),
        "{v}"
    );
    let mut big = good.clone();
    big.resize(Limits::default().max_payload_bytes + 81, 0);
    let (st, v, _) = m.post("/v1/batches", "application/octet-stream", &big);
    assert_eq!(
        (st, &v["error"], &v["frame"]),
        (422, &"payload_too_large".into(), &"0103".into())
    );
    // A refused credential header is the reply; the batch is not looked at.
    let agent = crate::harness::agent();
    let mut res = agent
        .post(&format!("{}/v1/batches", m.http))
        .header("edgetally-credential", "zz")
        .send(&good[..])
        .expect("post");
    let v: serde_json::Value =
        serde_json::from_str(&res.body_mut().read_to_string().expect("body")).expect("json");
    assert_eq!(
        (res.status().as_u16(), &v["error"]),
        (422, &"malformed".into()),
        "{v}"
    );
    // Past the source's rate: Retry, 503 with Retry-After in whole seconds (at least 1), and
    // the bare Retry reply in `frame`.
    let retry = (2..40u64).find_map(|seq| {
        let raw = s.seal(&batch(&s, seq, now)).expect("seal");
        let (st, v, h) = m.post("/v1/batches", "application/octet-stream", &raw);
        (st == 503).then_some((v, h))
    });
    let (v, headers) = retry.expect("the source rate limit answers Retry");
    let after = v["after_ms"].as_u64().expect("after_ms") as u32;
    let mut want = vec![0x02u8];
    let mut n = after;
    while n >= 0x80 {
        want.push((n as u8) | 0x80);
        n >>= 7;
    }
    want.push(n as u8);
    assert_eq!(
        v["frame"].as_str(),
        Some(edgetally_net::tls::hex(&want).as_str()),
        "{v}"
    );
    let header = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
        .map(|(_, v)| v.clone());
    assert_eq!(header, Some(after.div_ceil(1000).max(1).to_string()));
}

/// §3's order of the checks: with several faults, the first in the documented order is
/// the reason.
#[test]
fn the_first_failing_rule_in_the_documented_order_is_the_reason() {
    use RejectCode::*;
    let s = signer(7170);
    let now = 1_800_000_000_000i64;
    let limits = Limits {
        max_categories: 1,
        ..Limits::default()
    };
    let base = || {
        let mut b = BatchBuilder::new(1000).expect("width");
        b.record("a", None, now - 5000, 1.0).expect("record");
        b.record("a", None, now - 4000, 2.0).expect("record");
        b.finish(
            BatchId {
                producer: s.producer(),
                epoch: 1,
                seq: 5,
            },
            now,
        )
    };
    let seal = |b: &edgetally_core::Batch, bad_sig: bool| {
        let mut raw = s.seal(b).expect("seal");
        if bad_sig {
            let last = raw.len() - 1;
            raw[last] ^= 1;
        }
        raw
    };
    let verdict = |raw: &[u8]| {
        edgetally_proto::open(raw, &limits, now)
            .err()
            .map(|e| e.code)
    };
    let nan = Summary {
        count: 1,
        sum: 0,
        min: f64::NAN,
        max: f64::NAN,
    };
    let day = 86_400_000 / 1000;
    type Mutation = Box<dyn Fn(&mut edgetally_core::Batch)>;
    let cases: Vec<(&str, Mutation, bool, RejectCode)> = vec![
        (
            "seq reserved, created far ahead, bad signature",
            Box::new(move |b| {
                b.id.seq = u64::MAX;
                b.created_ms = now + 10 * 86_400_000
            }),
            true,
            InvalidSeq,
        ),
        (
            "bad width, bad index",
            Box::new(|b| {
                b.bucket_ms = 1500;
                b.summaries[0].category = 9
            }),
            false,
            InvalidBucketWidth,
        ),
        (
            "bad index before a NaN in a later summary",
            Box::new(move |b| {
                b.summaries[0].category = 9;
                b.summaries[1].summary = nan
            }),
            false,
            BadStringIndex,
        ),
        (
            "a NaN before a bad index in a later summary",
            Box::new(move |b| {
                b.summaries[0].summary = nan;
                b.summaries[1].category = 9
            }),
            false,
            InvalidValue,
        ),
        (
            "bucket out of range and a NaN in one summary",
            Box::new(move |b| {
                b.summaries[0].bucket = i64::MAX / 1000;
                b.summaries[0].summary = nan
            }),
            false,
            InvalidTimestamp,
        ),
        (
            "count 0 before too many categories",
            Box::new(|b| {
                b.summaries[1].summary.count = 0;
                b.strings.push("zzz");
                b.summaries[0].category = 1
            }),
            false,
            InvalidSummary,
        ),
        (
            "duplicate key in a bucket too old",
            Box::new(move |b| {
                b.summaries[0].bucket -= 30 * day;
                b.summaries[1].bucket = b.summaries[0].bucket
            }),
            false,
            DuplicateKey,
        ),
        (
            "a NUL in a category and created far ahead: the name rule before the clock",
            Box::new(move |b| {
                b.strings = ["a\u{0}"].into_iter().collect();
                b.created_ms = now + 10 * 86_400_000
            }),
            true,
            InvalidCategory,
        ),
        (
            "a NUL in a category and a NaN: the batch's own rules before the name rule",
            Box::new(move |b| {
                b.strings = ["a\u{0}"].into_iter().collect();
                b.summaries[0].summary = nan
            }),
            false,
            InvalidValue,
        ),
        (
            "created ahead and a bucket too old",
            Box::new(move |b| {
                b.created_ms = now + 3_600_000;
                b.summaries[0].bucket -= 30 * day
            }),
            false,
            FutureTimestamp,
        ),
        (
            "a bucket too old, badly signed",
            Box::new(move |b| {
                b.summaries[0].bucket -= 30 * day;
                b.summaries[1].bucket -= 30 * day
            }),
            true,
            BucketTooOld,
        ),
        ("only the signature", Box::new(|_| {}), true, BadSignature),
    ];
    for (what, mutate, bad_sig, want) in cases {
        let mut b = base();
        mutate(&mut b);
        assert_eq!(verdict(&seal(&b, bad_sig)), Some(want), "{what}");
    }
    assert_eq!(
        verdict(&seal(&base(), false)),
        None,
        "the unmutated batch is valid"
    );

    // The envelope: lengths only. payload_len one short → trailing_bytes; a version other
    // than 1 and 2 wins over everything after it; an over-limit length over a short body.
    let raw = seal(&base(), false);
    let mut short = raw.clone();
    short[1] -= 1;
    assert_eq!(verdict(&short), Some(TrailingBytes));
    let mut v3 = short.clone();
    v3[0] = 3;
    assert_eq!(verdict(&v3), Some(UnsupportedVersion));
    assert_eq!(verdict(&[1, 0xff, 0xff, 0xff, 0x7f]), Some(PayloadTooLarge));
    assert_eq!(verdict(&[]), Some(Malformed));
    assert_eq!(verdict(&raw[..raw.len() - 1]), Some(Malformed));
}

/// §3's bucket bound: a bucket is accepted iff it ends at or after −2⁵³ and starts at or
/// before 2⁵³, the range of record times (ms).
#[test]
fn bucket_bounds_are_exactly_the_record_range() {
    let s = signer(8180);
    let limit = 1i64 << 53;
    for width in [1000u32, 60_000, 86_400_000] {
        let w = i64::from(width);
        let lowest = (-limit).div_euclid(w); // the bucket holding −2⁵³
        let highest = limit.div_euclid(w); // the bucket holding 2⁵³
        for (bucket, ok) in [
            (lowest, true),
            (lowest - 1, false),
            (highest, true),
            (highest + 1, false),
        ] {
            let mut b = BatchBuilder::new(width).expect("width");
            b.record("t", None, 0, 1.0).expect("record");
            let mut batch = b.finish(
                BatchId {
                    producer: s.producer(),
                    epoch: 1,
                    seq: 0,
                },
                0,
            );
            batch.summaries[0].bucket = bucket;
            let got = edgetally_proto::decode(&s.seal(&batch).expect("seal"), &Limits::default())
                .err()
                .map(|e| e.code);
            let want = (!ok).then_some(RejectCode::InvalidTimestamp);
            assert_eq!(got, want, "width {width}, bucket {bucket}");
            // The doc's statement in terms of the bucket's ends.
            let (start, end) = (bucket * w, bucket * w + w);
            assert_eq!(
                ok,
                end >= -limit && start <= limit,
                "width {width}, bucket {bucket}"
            );
        }
        // Records at the range's ends land in the accepted buckets.
        let mut b = BatchBuilder::new(width).expect("width");
        b.record("t", None, -limit, 1.0).expect("record at -2^53");
        b.record("t", None, limit, 1.0).expect("record at 2^53");
        let batch = b.finish(
            BatchId {
                producer: s.producer(),
                epoch: 1,
                seq: 0,
            },
            0,
        );
        let buckets: Vec<i64> = batch.summaries.iter().map(|x| x.bucket).collect();
        assert_eq!(buckets, [lowest, highest]);
    }
}
