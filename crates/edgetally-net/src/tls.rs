//! Certificates and TLS configuration for QUIC.
//!
//! Mergers run with a self-signed ECDSA P-256 certificate valid for less than 14 days, the only
//! kind browsers accept through WebTransport's `serverCertificateHashes`; peers and native
//! producers pin it by the SHA-256 of its DER encoding.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

/// The ALPN of edgetally's batch protocol.
pub const ALPN_BATCHES: &[u8] = b"edgetally/1";
/// HTTP/3, which browsers negotiate for WebTransport (same port, dispatched on ALPN).
pub const ALPN_H3: &[u8] = b"h3";
/// The ALPN of the merger-to-merger replication protocol (same port, dispatched on ALPN).
pub const ALPN_PEER: &[u8] = b"edgetally-peer/3";
/// The peer ALPNs of earlier releases: accepted only to tell such a node, and this node's
/// operator, that the two cannot replicate (the release that speaks `edgetally-peer/1` is
/// the first one; `/2` was never released).
pub const ALPN_PEER_EARLIER: &[&[u8]] = &[b"edgetally-peer/1", b"edgetally-peer/2"];
/// Total validity of generated certificates (browsers refuse more than 14 days).
pub const CERT_VALIDITY: Duration = Duration::from_secs(13 * 86_400);

/// A certificate chain and its private key.
#[derive(Debug)]
pub struct Identity {
    /// End-entity first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key (PKCS#8).
    pub key: PrivateKeyDer<'static>,
    /// Expiry, seconds since the Unix epoch (`i64::MAX` when unknown, e.g. user-supplied).
    pub not_after_unix: i64,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            not_after_unix: self.not_after_unix,
        }
    }
}

/// Why a certificate could not be made or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// Certificate generation failed.
    #[error("generating the certificate: {0}")]
    Generate(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

impl Identity {
    /// A fresh self-signed ECDSA P-256 certificate for loopback names, valid from one hour
    /// before `now_unix` for [`CERT_VALIDITY`] in all.
    pub fn self_signed(now_unix: i64, extra_names: &[String]) -> Result<Identity, TlsError> {
        Identity::self_signed_from(now_unix - 3600, extra_names)
    }

    /// The same, valid from `start_unix` (which may lie ahead: the merger publishes its next
    /// certificate's hash before that certificate is served) for [`CERT_VALIDITY`].
    pub fn self_signed_from(start_unix: i64, extra_names: &[String]) -> Result<Identity, TlsError> {
        let mut names = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ];
        names.extend(extra_names.iter().cloned());
        let mut params =
            rcgen::CertificateParams::new(names).map_err(|e| TlsError::Generate(e.to_string()))?;
        let start = start_unix;
        let end = start + CERT_VALIDITY.as_secs() as i64;
        params.not_before = time::OffsetDateTime::from_unix_timestamp(start)
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        params.not_after = time::OffsetDateTime::from_unix_timestamp(end)
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "edgetally merger");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        Ok(Identity {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_after_unix: end,
        })
    }

    /// SHA-256 of the end-entity certificate's DER: what browsers pass as
    /// `serverCertificateHashes` and what native clients pin.
    pub fn cert_hash(&self) -> [u8; 32] {
        cert_hash(self.chain.first().map_or(&[][..], |c| c.as_ref()))
    }
}

/// SHA-256 of a DER certificate.
pub fn cert_hash(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

pub use edgetally_core::batch::hex;

/// Parses 64 hex digits (colons allowed, as some tools print them).
pub fn parse_hash(s: &str) -> Option<[u8; 32]> {
    unhex(s)?.try_into().ok()
}

/// Parses hex digits of either case (colons allowed, as some tools print them; surrounding
/// white space ignored); `None` for anything else.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = s.trim().bytes().filter(|b| *b != b':').collect();
    if !digits.len().is_multiple_of(2) || !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok())
        .collect()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A QUIC endpoint serving `config` on `addr`, whose stateless-reset key and connection-ID
/// key are derived from `secret` (the node's persistent key) instead of drawn at random per
/// process. A node that crashed and restarted on the same address then recognises the
/// connection IDs of its previous life's connections and answers their packets with a valid
/// stateless reset, so producers and peers learn at once that those connections are gone
/// (RFC 9000 §10.3) and reconnect, instead of waiting for a send timeout or the idle timeout.
pub fn server_endpoint(
    config: quinn::ServerConfig,
    addr: std::net::SocketAddr,
    secret: &[u8; 32],
) -> std::io::Result<quinn::Endpoint> {
    let derive = |label: &[u8]| {
        Sha256::new()
            .chain_update(label)
            .chain_update(secret)
            .finalize()
    };
    let key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &derive(b"edgetally/quic-stateless-reset/v1"),
    );
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&derive(b"edgetally/quic-connection-id/v1")[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(key));
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let socket = std::net::UdpSocket::bind(addr)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime to drive QUIC"))?;
    quinn::Endpoint::new(endpoint_config, Some(config), socket, runtime)
}

/// A TLS 1.3 server configuration offering `alpns`: as is for the HTTP API over TCP, and the
/// base of the QUIC one ([`server_config`]).
pub fn tcp_server_config(id: &Identity, alpns: &[&[u8]]) -> Result<rustls::ServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    tls.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    Ok(tls)
}

/// A TLS 1.3 client configuration (for HTTPS over TCP) that accepts only a server whose
/// certificate hash is in `pins`.
pub fn tcp_client_config(pins: Vec<[u8; 32]>) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(PinnedCert::new(Some(pins), provider.clone()));
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// A QUIC server configuration offering `alpns`.
pub fn server_config(id: &Identity, alpns: &[&[u8]]) -> Result<quinn::ServerConfig, TlsError> {
    let mut tls = tcp_server_config(id, alpns)?;
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // Streams in flight per connection, each at most one batch (1 MiB by default): with the
    // listener's byte budgets this bounds what one connection can make the node buffer.
    transport.max_concurrent_bidi_streams(256u32.into());
    transport.max_concurrent_uni_streams(16u32.into());
    // An idle connection is closed after 30 s. The server sends no keep-alives of its own:
    // a client that wants its connection kept sends them (ours do), one that goes quiet is
    // dropped instead of held forever.
    transport.max_idle_timeout(Some(
        Duration::from_secs(30)
            .try_into()
            .map_err(|_| TlsError::Config("idle timeout".into()))?,
    ));
    transport.stream_receive_window((2u32 << 20).into());
    transport.mtu_discovery_config(Some(mtu_discovery()));
    transport.receive_window((64u32 << 20).into());
    cfg.transport_config(Arc::new(transport));
    // Handshakes waiting to be accepted, at most (quinn refuses the rest).
    cfg.max_incoming(4096);
    Ok(cfg)
}

/// Verifies a server by the SHA-256 of its end-entity certificate (no CA, no names: the hash
/// is the identity), and checks the handshake signatures with ring. Without pins (peer links,
/// which authenticate inside the connection) any certificate is accepted, the handshake
/// signature made with it still checked.
#[derive(Debug)]
pub struct PinnedCert {
    pins: Option<Vec<[u8; 32]>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// The hash of the last certificate refused for not being pinned.
    refused: std::sync::Mutex<Option<[u8; 32]>>,
}

impl PinnedCert {
    fn new(pins: Option<Vec<[u8; 32]>>, provider: Arc<rustls::crypto::CryptoProvider>) -> Self {
        PinnedCert {
            pins,
            provider,
            refused: std::sync::Mutex::new(None),
        }
    }

    /// The SHA-256 of the last certificate a server presented that was not pinned: what a
    /// client reports when its `--cert-sha256` is wrong.
    pub fn refused(&self) -> Option<[u8; 32]> {
        *self.refused.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let hash = cert_hash(end_entity);
        if self.pins.as_ref().is_none_or(|p| p.contains(&hash)) {
            Ok(ServerCertVerified::assertion())
        } else {
            *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = Some(hash);
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A QUIC client configuration that accepts only servers whose certificate hash is pinned.
pub fn client_config(pins: Vec<[u8; 32]>, alpn: &[u8]) -> Result<quinn::ClientConfig, TlsError> {
    Ok(pinned_client_config(pins, alpn)?.0)
}

/// The same, with the verifier, which tells what certificate a refused server presented.
pub fn pinned_client_config(
    pins: Vec<[u8; 32]>,
    alpn: &[u8],
) -> Result<(quinn::ClientConfig, Arc<PinnedCert>), TlsError> {
    let provider = provider();
    let verifier = Arc::new(PinnedCert::new(Some(pins), provider.clone()));
    Ok((client_with(verifier.clone(), provider, alpn)?, verifier))
}

/// The client configuration for links between mergers: any certificate is accepted at the
/// TLS layer (peers rotate self-signed certificates on their own) and the peers authenticate
/// each other inside the connection, bound to this TLS session's exported keying material
/// (see the merger's `replication` module). Handshake signatures are still checked.
pub fn peer_client_config() -> Result<quinn::ClientConfig, TlsError> {
    peer_client_config_for(ALPN_PEER)
}

/// [`peer_client_config`] offering another peer ALPN (to find which one a peer speaks).
pub fn peer_client_config_for(alpn: &[u8]) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(PinnedCert::new(None, provider.clone()));
    client_with(verifier, provider, alpn)
}

/// A TLS client configuration for TCP services by roots (TLS 1.2 and 1.3, no ALPN): certificates
/// verified against `roots` — chain and server name — or, with no roots, any certificate
/// accepted: encryption without authentication, what libpq's `sslmode=require` does without
/// a root certificate. Handshake signatures are checked either way.
pub fn tcp_client_config_roots(
    roots: Option<Vec<CertificateDer<'static>>>,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(match roots {
        Some(roots) => {
            let mut store = rustls::RootCertStore::empty();
            for cert in roots {
                store
                    .add(cert)
                    .map_err(|e| TlsError::Config(format!("a root certificate: {e}")))?;
            }
            builder.with_root_certificates(store).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCert::new(None, provider)))
            .with_no_client_auth(),
    })
}

fn client_with(
    verifier: Arc<dyn ServerCertVerifier>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(
        Duration::from_secs(30)
            .try_into()
            .map_err(|_| TlsError::Config("idle timeout".into()))?,
    ));
    transport.keep_alive_interval(Some(Duration::from_secs(10)));
    transport.mtu_discovery_config(Some(mtu_discovery()));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// Path MTU discovery up to jumbo sizes: on loopback and jumbo-frame networks a batch then
/// takes a few datagrams instead of dozens; elsewhere discovery settles at the path's MTU.
fn mtu_discovery() -> quinn::MtuDiscoveryConfig {
    let mut m = quinn::MtuDiscoveryConfig::default();
    m.upper_bound(8952);
    m
}
