//! TLS on the client API, over real sockets and with no model loaded: `mm serve` with a
//! self-signed certificate made here (rcgen) and replicas that do not exist. A client trusting
//! the certificate reaches the gRPC API (health, ListSessions, `mm sessions`) and the HTTP API;
//! a plaintext client, or one trusting only the public roots, does not; a missing, unreadable
//! or invalid certificate or key stops the service, naming it.

use mm_proto::orchestrator::v1 as pb;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::rustls::{
    self,
    pki_types::{pem::PemObject, CertificateDer, ServerName},
};

/// A self-signed certificate for 127.0.0.1 and localhost, written as `<name>.pem` and
/// `<name>.key` in `dir`.
fn certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let made =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

/// `mm serve` on free loopback ports, its replicas nowhere (no model is loaded), with `env`.
fn mm_serve(dir: &Path, extra: &[&str], env: &[(&str, &Path)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mm"));
    c.args(["serve", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .arg("--store")
        .arg(dir.join("s.redb"))
        .args([
            "--muse",
            "http://127.0.0.1:9",
            "--majordomo",
            "http://127.0.0.1:9",
        ])
        .args(extra)
        .env_remove("MM_TLS_CERT")
        .env_remove("MM_TLS_KEY")
        .envs(env.iter().copied())
        .stdin(Stdio::null());
    c
}

struct Served {
    child: Child,
    /// `127.0.0.1:port` of the gRPC and the HTTP API.
    grpc: String,
    http: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(mut command: Command) -> Served {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let a = mm_kit::serve::announced(&mut child).unwrap();
    let bare = |url: &str| url.strip_prefix("http://").unwrap().to_string();
    Served {
        grpc: bare(&a.grpc),
        http: bare(&a.http.unwrap()),
        child,
    }
}

/// `mm sessions --orchestrator <addr>`, trusting `ca` if given.
fn mm_sessions(addr: &str, ca: Option<&Path>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mm"));
    c.args(["sessions", "--orchestrator", addr])
        .env_remove("MM_TLS_CA")
        .env_remove("MM_API_TOKEN");
    if let Some(ca) = ca {
        c.env("MM_TLS_CA", ca);
    }
    c.output().unwrap()
}

/// A startup that fails: its error message. One still running after a minute started.
fn refused(mut command: Command) -> String {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("it started");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    stderr
}

/// `GET <path>` over HTTP/1.1 on `io`: what came back, empty if the connection just closed.
async fn get(mut io: impl AsyncRead + AsyncWrite + Unpin, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    io.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    // A refused connection may end with a reset rather than a clean close.
    let _ = io.read_to_end(&mut response).await;
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trusting_the_certificate_gets_through_and_a_plaintext_one_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path(), "server");
    let served = start(mm_serve(
        dir.path(),
        &[],
        &[("MM_TLS_CERT", &cert), ("MM_TLS_KEY", &key)],
    ));
    let https = format!("https://{}", served.grpc);
    let pem = std::fs::read(&cert).unwrap();

    // gRPC over TLS, trusting the certificate: health and the client API answer.
    let channel = tonic::transport::Endpoint::from_shared(https.clone())
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&pem)),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "orchestrator.v1.Orchestrator".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    let listed = pb::orchestrator_client::OrchestratorClient::new(channel)
        .list_sessions(pb::ListSessionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.sessions.is_empty());

    // `mm sessions`: through with MM_TLS_CA; refused trusting the public roots only, and in
    // plain text.
    let out = mm_sessions(&https, Some(&cert));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = mm_sessions(&https, None);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("UnknownIssuer"), "{e}");
    assert!(!mm_sessions(&format!("http://{}", served.grpc), None)
        .status
        .success());

    // The HTTP API over TLS on the same certificate; plain HTTP gets no HTTP answer.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(&pem).unwrap())
        .unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(&served.http).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    let r = get(tls, "/metrics").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("mm_"), "{r}");
    let plain = tokio::net::TcpStream::connect(&served.http).await.unwrap();
    let r = get(plain, "/metrics").await;
    assert!(!r.starts_with("HTTP/"), "plain HTTP was answered: {r}");
}

#[test]
fn a_missing_unreadable_invalid_or_mismatched_key_or_certificate_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path(), "server");
    let (_, other_key) = certificate(dir.path(), "other");
    let (c, k) = (cert.to_str().unwrap(), key.to_str().unwrap());

    let e = refused(mm_serve(dir.path(), &["--tls-cert", c], &[]));
    assert!(e.contains("tls_key"), "{e}");
    let e = refused(mm_serve(dir.path(), &[], &[("MM_TLS_KEY", &key)]));
    assert!(e.contains("tls_cert"), "{e}");

    let missing = dir.path().join("missing.pem");
    let e = refused(mm_serve(
        dir.path(),
        &["--tls-cert", missing.to_str().unwrap(), "--tls-key", k],
        &[],
    ));
    assert!(
        e.contains(&format!("reading tls_cert {}", missing.display())),
        "{e}"
    );

    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let e = refused(mm_serve(
        dir.path(),
        &["--tls-cert", c, "--tls-key", garbage.to_str().unwrap()],
        &[],
    ));
    assert!(
        e.contains(&format!(
            "tls_key {} holds no usable PEM private key",
            garbage.display()
        )),
        "{e}"
    );

    let e = refused(mm_serve(
        dir.path(),
        &["--tls-cert", c, "--tls-key", other_key.to_str().unwrap()],
        &[],
    ));
    assert!(e.contains("do not make a TLS identity"), "{e}");
}
