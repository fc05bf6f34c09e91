//! WebTransport on the merger's QUIC port, as a browser uses it: the page reads
//! `GET /v1/webtransport` (URL and the certificate hashes to pin: current and next), opens a
//! session at that URL pinning the current hash, and sends one batch per bidirectional stream
//! (the envelope, finished) and reads the bare reply — the same bytes as raw QUIC. Counted under
//! `transport="webtransport"`. (The Chromium test in web/test drives the npm SDK over it.)

use crate::harness::{now_ms, Merger, TempDir};
use edgetally_core::{BatchId, RejectCode};
use edgetally_proto::Reply;
use edgetally_tests::{build_at, events_at, signer, Rng};

async fn send(session: &web_transport_quinn::Session, raw: &[u8]) -> Reply {
    let (mut send, mut recv) = session.open_bi().await.expect("open stream");
    send.write_all(raw).await.expect("write");
    send.finish().expect("finish");
    let reply = recv.read_to_end(64).await.expect("reply");
    Reply::decode(&reply).expect("a bare reply")
}

#[test]
fn batches_over_webtransport_are_acked_and_counted_by_transport() {
    let dir = TempDir::new("wt");
    let m = Merger::start(&dir.0, &[]);
    let (code, wt) = m.get("/v1/webtransport");
    assert_eq!(code, 200, "{wt}");
    let (_, st) = m.get("/v1/status");
    let hashes: Vec<String> = wt["cert_sha256"]
        .as_array()
        .expect("hashes")
        .iter()
        .map(|h| h.as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(hashes.len(), 2, "{wt}");
    assert_eq!(hashes[0], st["cert_sha256"].as_str().unwrap_or(""));
    assert_eq!(hashes[1], st["cert_sha256_next"].as_str().unwrap_or(""));
    assert_ne!(hashes[0], hashes[1]);
    let url = wt["url"].as_str().expect("url").to_string();
    assert_eq!(url, format!("https://{}/v1/webtransport", m.quic));

    let s = signer(4242);
    let now = now_ms();
    let mut rng = Rng::new(3);
    let ev = events_at(&mut rng, 30, 60_000, now);
    let id = BatchId {
        producer: s.producer(),
        epoch: 1,
        seq: 0,
    };
    let good = s.seal(&build_at(id, &ev, now)).expect("seal");
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let pin = edgetally_net::tls::parse_hash(&hashes[0])
        .expect("hex")
        .to_vec();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = web_transport_quinn::ClientBuilder::new()
            .with_server_certificate_hashes(vec![pin.clone()])
            .expect("client");
        let session = client
            .connect(url::Url::parse(&url).expect("url"))
            .await
            .expect("session");
        assert_eq!(send(&session, &good).await, Reply::Ack);
        assert_eq!(send(&session, &good).await, Reply::Ack, "a resend is acked");
        assert_eq!(
            send(&session, &bad).await,
            Reply::nack(RejectCode::BadSignature)
        );
        session.close(0, b"done");
        // Another path is refused; a hash that is not the certificate's fails the handshake.
        let wrong = url.replace("/v1/webtransport", "/elsewhere");
        assert!(client
            .connect(url::Url::parse(&wrong).expect("url"))
            .await
            .is_err());
        let stranger = web_transport_quinn::ClientBuilder::new()
            .with_server_certificate_hashes(vec![vec![7u8; 32]])
            .expect("client");
        assert!(stranger
            .connect(url::Url::parse(&url).expect("url"))
            .await
            .is_err());
    });
    assert_eq!(
        m.metric("edgetally_batches_received_total{transport=\"webtransport\"}"),
        3.0
    );
    assert_eq!(m.metric("edgetally_batches_applied_total"), 1.0);
    let (_, agg) = m.get(&format!(
        "/v1/aggregate?category={}&start=0&end=9999999999999",
        ev[0].category
    ));
    assert!(agg["count"].as_u64().unwrap_or(0) >= 1, "{agg}");
}
