//! TLS on the client API. With `tls_cert` and `tls_key` (PEM files) configured, tonic serves
//! the gRPC API over TLS and the HTTP API's [`TlsListener`] hands axum the streams tokio-rustls
//! decrypted, both with the one certificate. Clients (`mm run`, `chat`, `sessions`, `bench`,
//! `mm eval`) reach an `https://` address trusting the CA in `MM_TLS_CA`, or else the web PKI
//! roots (webpki-roots, built in, so a bare container needs no CA bundle). The services `mm`
//! starts itself on loopback stay plain, and so do the calls between services.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls::{
    self,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Longest a client may take to finish its handshake: a silent one is dropped, not kept.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {key} {path}")]
    Read {
        key: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{key} {path} holds no usable PEM {what}: {why}")]
    Pem {
        key: &'static str,
        path: String,
        what: &'static str,
        why: String,
    },
    #[error("tls_cert {cert} and tls_key {key} do not make a TLS identity")]
    Identity {
        cert: String,
        key: String,
        source: rustls::Error,
    },
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.display().to_string(),
        source,
    })
}

/// The certificates of a PEM file, at least one.
fn certificates(
    key: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |why: String| TlsError::Pem {
        key,
        path: path.display().to_string(),
        what: "certificate",
        why,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("none found".into()));
    }
    Ok(certs)
}

/// The server's identity, read and checked once at startup, for both APIs.
pub struct ServerTls {
    /// For tonic (the gRPC API, HTTP/2).
    pub grpc: tonic::transport::ServerTlsConfig,
    /// For the HTTP API (HTTP/1.1).
    pub http: Arc<rustls::ServerConfig>,
}

impl ServerTls {
    /// Reads the certificate chain and key; an error names the file or says they do not match.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let cert_pem = read("tls_cert", cert)?;
        let key_pem = read("tls_key", key)?;
        let chain = certificates("tls_cert", cert, &cert_pem)?;
        let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
            key: "tls_key",
            path: key.display().to_string(),
            what: "private key",
            why: match e {
                rustls::pki_types::pem::Error::NoItemsFound => "none found".into(),
                e => e.to_string(),
            },
        })?;
        let identity = |source| TlsError::Identity {
            cert: cert.display().to_string(),
            key: key.display().to_string(),
            source,
        };
        let mut http = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(identity)?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(identity)?;
        http.alpn_protocols = vec![b"http/1.1".to_vec()];
        let grpc = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert_pem, key_pem))
            .timeout(HANDSHAKE_TIMEOUT);
        Ok(Self {
            grpc,
            http: Arc::new(http),
        })
    }
}

/// What a client trusts for an `https://` address: the CA in `MM_TLS_CA` (a PEM file) alone,
/// or, when it is unset, the web PKI roots.
pub fn client_config() -> anyhow::Result<tonic::transport::ClientTlsConfig> {
    let Some(path) = std::env::var_os("MM_TLS_CA").filter(|p| !p.is_empty()) else {
        return Ok(tonic::transport::ClientTlsConfig::new().with_webpki_roots());
    };
    let path = Path::new(&path);
    let pem = read("MM_TLS_CA", path)?;
    // Checked here, so a bad file is named rather than failing every handshake.
    certificates("MM_TLS_CA", path, &pem)?;
    Ok(tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(pem)))
}

/// The HTTP API's listener over TLS. Each handshake runs in its own task within
/// [`HANDSHAKE_TIMEOUT`], so a slow or silent client holds up no one else's connection.
pub struct TlsListener {
    addr: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(config);
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = tx.closed() => return,
                    accepted = listener.accept() => accepted,
                };
                use std::io::ErrorKind::{ConnectionAborted, ConnectionReset};
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) if matches!(e.kind(), ConnectionAborted | ConnectionReset) => continue,
                    Err(e) => {
                        // Out of descriptors, say: wait rather than spin.
                        tracing::warn!(error = %e, "the HTTP API cannot accept");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { addr, ready })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accepting task died (it ends by itself only once this listener is dropped).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}
