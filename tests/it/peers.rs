//! Forged peers: a process on a configured peer's address offering a fabricated snapshot, and
//! a stranger connecting as a peer to read state, are refused — loopback included — and a node
//! with peers but no credential refuses to start.

use crate::harness::{binary, free_udp, now_ms, runtime, Merger, TempDir};
use edgetally_core::{BatchId, LogEntry, Replica};
use edgetally_proto::BatchBuilder;
use edgetally_tests::signer;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

const ALPN_PEER: &[u8] = b"edgetally-peer/3";

/// A Hello as the peer protocol encodes it (postcard): a node key, an HMAC, no signature —
/// from someone who does not know the secret.
fn forged_hello() -> Vec<u8> {
    let mut h = vec![0x42u8; 32];
    h.push(1); // Some(hmac)
    h.push(32);
    h.extend_from_slice(&[0x13; 32]);
    h.push(0); // None (signature)
    h
}

/// What an attacker would offer: a valid-looking snapshot of a state with a count of a
/// million behind no batch anyone signed.
fn fabricated_snapshot() -> Vec<u8> {
    let s = signer(4242);
    let mut b = BatchBuilder::new(1000).expect("width");
    b.record("forged", None, now_ms(), 1.0).expect("record");
    let mut batch = b.finish(
        BatchId {
            producer: s.producer(),
            epoch: 1,
            seq: 0,
        },
        now_ms(),
    );
    batch.summaries[0].summary.count = 1_000_000;
    batch.summaries[0].summary.sum = 1_000_000 * 1_000_000_000;
    let mut r = Replica::new();
    r.apply(LogEntry {
        batch: Arc::new(batch),
        raw: Arc::from(&[][..]),
    })
    .expect("apply");
    r.snapshot().encode()
}

#[test]
fn forged_peers_are_refused_and_nothing_they_offer_is_adopted() {
    let rt = runtime();
    // The impostor, on the address the node will be told is its peer.
    let fake = free_udp();
    let id = edgetally_net::tls::Identity::self_signed(now_ms() / 1000, &[]).expect("cert");
    let sc = edgetally_net::tls::server_config(&id, &[ALPN_PEER]).expect("tls");
    let streams_answered = Arc::new(AtomicU64::new(0));
    let snapshot = fabricated_snapshot();
    let ep = rt.block_on(async { quinn::Endpoint::server(sc, fake).expect("bind") });
    {
        let (ep, answered) = (ep.clone(), streams_answered.clone());
        rt.spawn(async move {
            while let Some(inc) = ep.accept().await {
                let (answered, snapshot) = (answered.clone(), snapshot.clone());
                tokio::spawn(async move {
                    let Ok(conn) = inc.await else { return };
                    let mut first = true;
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let _ = recv.read_to_end(1 << 20).await;
                        let reply = if first {
                            forged_hello()
                        } else {
                            snapshot.clone()
                        };
                        first = false;
                        answered.fetch_add(1, Relaxed);
                        let _ = send.write_all(&reply).await;
                        let _ = send.finish();
                    }
                });
            }
        });
    }
    let dir = TempDir::new("forged");
    let env = [
        ("EDGETALLY_CLUSTER_SECRET", "the-real-secret"),
        ("EDGETALLY_SYNC_INTERVAL_MS", "200"),
    ];
    let m = Merger::start_with_env(&dir.0, &["--peer", &fake.to_string()], &env);
    std::thread::sleep(Duration::from_secs(2));
    // Nothing adopted: the forged count is not served.
    let (st, v) = m.get("/v1/aggregate?category=forged&start=0&end=9999999999999");
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["count"], 0, "a fabricated snapshot was adopted: {v}");
    // The node spoke to the impostor but refused it at its Hello.
    assert!(
        streams_answered.load(Relaxed) >= 1,
        "the node never tried the peer"
    );
    let (_, status) = m.get("/v1/status");
    let err = status["peers"][0]["last_error"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(err.contains("refused"), "{status}");
    assert_eq!(status["peers"][0]["reachable"], false, "{status}");

    // A stranger connecting to the node as a peer (from loopback) reads nothing.
    let got = rt.block_on(async {
        let mut client =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
        client.set_default_client_config(edgetally_net::tls::peer_client_config().expect("tls"));
        let conn = client
            .connect(m.quic, "localhost")
            .expect("connect")
            .await
            .expect("handshake");
        let mut replies = Vec::new();
        // The Hello, then a snapshot request (postcard: variant 2 of Request) and a sync.
        for body in [forged_hello(), vec![2u8], vec![0u8, 0, 100]] {
            let r = async {
                let (mut send, mut recv) = conn.open_bi().await.ok()?;
                send.write_all(&body).await.ok()?;
                let _ = send.finish();
                recv.read_to_end(1 << 24).await.ok()
            };
            replies.push(
                tokio::time::timeout(Duration::from_secs(5), r)
                    .await
                    .ok()
                    .flatten(),
            );
        }
        conn.close(0u32.into(), b"");
        replies
    });
    assert!(
        got.iter().all(|r| r.as_ref().is_none_or(Vec::is_empty)),
        "a stranger read peer data: {:?}",
        got.iter()
            .map(|r| r.as_ref().map(Vec::len))
            .collect::<Vec<_>>()
    );
    assert!(m.metric("edgetally_peer_refused_total") >= 1.0);
    drop(m);

    // Peers without any credential: the node refuses to start, and says why.
    let dir = TempDir::new("no-secret");
    let out = std::process::Command::new(binary())
        .args(["serve", "--data-dir"])
        .arg(&dir.0)
        .args([
            "--http-addr",
            "127.0.0.1:0",
            "--quic-addr",
            "127.0.0.1:0",
            "--peer",
        ])
        .arg(fake.to_string())
        .env("EDGETALLY_LOG", "warn")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cluster_secret"), "{stderr}");
    ep.close(0u32.into(), b"");
}

/// A node of an earlier release cannot replicate with this one (their peer protocols
/// differ), and neither side may split silently: a node that has one as a peer says why in
/// `/v1/status` (`peers[].last_error`, logged too) and answers incomplete; a node such a peer
/// connects to lists it (`earlier_release_peers`) and tells it, closing the connection. Both
/// are tried against a stand-in for the earlier release: a QUIC endpoint that speaks only
/// the first release's peer protocol, `edgetally-peer/1`.
#[test]
fn a_node_of_an_earlier_release_is_reported_never_silently_split() {
    const EARLIER: &[u8] = b"edgetally-peer/1";
    let rt = runtime();
    let now_unix = now_ms() / 1000;
    let id = edgetally_net::tls::Identity::self_signed(now_unix, &[]).expect("identity");
    let sc = edgetally_net::tls::server_config(&id, &[EARLIER]).expect("server config");
    let old = rt
        .block_on(async {
            edgetally_net::tls::server_endpoint(sc, "127.0.0.1:0".parse().expect("addr"), &[7; 32])
        })
        .expect("endpoint");
    let old_addr = old.local_addr().expect("addr");
    // The earlier release's node accepts connections (and would serve its protocol).
    rt.spawn(async move {
        while let Some(inc) = old.accept().await {
            if let Ok(c) = inc.await {
                tokio::spawn(async move { c.closed().await });
            }
        }
    });
    let dir = TempDir::new("earlier-release");
    let peer = old_addr.to_string();
    let m = Merger::start_with_env(
        &dir.0,
        &["--peer", &peer],
        &[
            ("EDGETALLY_CLUSTER_SECRET", "s"),
            ("EDGETALLY_SYNC_INTERVAL_MS", "200"),
        ],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, st) = m.get("/v1/status");
        let why = st["peers"][0]["last_error"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if why.contains("runs an earlier release (peer protocol edgetally-peer/1") {
            assert_eq!(st["complete"], false, "{st}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not reported: {}",
            st["peers"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The other way: the earlier release's node connects to this one.
    let quic = m.quic;
    let reason = rt.block_on(async {
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
        ep.set_default_client_config(
            edgetally_net::tls::peer_client_config_for(EARLIER).expect("config"),
        );
        let conn = ep
            .connect(quic, "localhost")
            .expect("connect")
            .await
            .expect("the handshake succeeds: the node speaks to it only to refuse it");
        let why = conn.closed().await;
        ep.wait_idle().await;
        why.to_string()
    });
    assert!(reason.contains("upgrade this node"), "{reason}");
    let (_, st) = m.get("/v1/status");
    let listed = st["earlier_release_peers"].as_array().expect("listed");
    assert!(
        listed.iter().any(|p| p["protocol"] == "edgetally-peer/1"),
        "{st}"
    );
}
