//! Serving any of the three services the same way: its routes plus the standard gRPC health
//! service (reporting it SERVING) and reflection (v1 and v1alpha, listing this port's services
//! only), on a bound listener, until ctrl-c or SIGTERM (then running calls get [`GRACE`] to
//! finish), its requests counted in the service's metrics.
//! Prints `listening on <addr>` on stdout once ready: scripts and tests wait for it.

use crate::metrics::GrpcRequests;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic_reflection::server::Builder;

const HEALTH: &str = "grpc.health.v1.Health";

/// Each connection's HTTP/2 receive window. h2 allows a connection half its window in the
/// framing overhead of small DATA frames not yet read by the service, then closes the whole
/// connection (GOAWAY `too_many_data_frames`). With hyper's 1 MiB that is about 2,000
/// one-command frames: a client pipelining 3,000 commands one frame each (grpcio does) lost its
/// connection whenever the session's reader was scheduled late on a busy machine. 8 MiB allows
/// about 17,000, far past the session queue's bound (64 commands), whose excess is answered.
const CONNECTION_WINDOW: u32 = 8 << 20;

/// Binds `listen` (port 0 picks a free port) and serves `routes` as `service_name`.
pub async fn serve(
    listen: &str,
    service_name: &str,
    routes: Routes,
    requests: GrpcRequests,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    serve_on(Server::builder(), listen, service_name, routes, requests).await
}

/// [`serve`] on a server the caller configured: the orchestrator's client API adds TLS there,
/// so this crate, and the model services, need no TLS of their own.
pub async fn serve_on(
    server: Server,
    listen: &str,
    service_name: &str,
    routes: Routes,
    requests: GrpcRequests,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let server = server.initial_connection_window_size(CONNECTION_WINDOW);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let service_name_owned = service_name.to_string();
    let addr = listener.local_addr()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(service_name, tonic_health::ServingStatus::Serving)
        .await;
    let v1 = reflection(service_name, "grpc.reflection.v1.ServerReflection").build_v1()?;
    let v1alpha =
        reflection(service_name, "grpc.reflection.v1alpha.ServerReflection").build_v1alpha()?;
    let routes = routes
        .add_service(health)
        .add_service(v1)
        .add_service(v1alpha);
    println!("listening on {addr}");
    let stopping = std::sync::Arc::new(tokio::sync::Notify::new());
    let signalled = stopping.clone();
    let served = server
        .layer(requests)
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move {
                shutdown_signal().await;
                // Probes see it going while running calls finish.
                reporter
                    .set_service_status(service_name_owned, tonic_health::ServingStatus::NotServing)
                    .await;
                signalled.notify_one();
            },
        );
    tokio::select! {
        r = served => r?,
        () = async {
            stopping.notified().await;
            tokio::time::sleep(GRACE).await;
        } => {
            tracing::warn!(grace_s = GRACE.as_secs(), "calls still running after the grace period: exiting");
        }
    }
    Ok(())
}

/// After SIGTERM or ctrl-c, how long running calls (turns, session streams) may take to end
/// before the process exits anyway; within Kubernetes' default 30 s before it kills. Stores
/// write a turn whole or not at all, so nothing is left half-done.
pub const GRACE: std::time::Duration = std::time::Duration::from_secs(25);

/// Resolves on ctrl-c (SIGINT) or SIGTERM, the signal systemd, Docker and Kubernetes stop a
/// process with.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Reflection that lists what this port serves: its service, health and reflection itself
/// (the descriptor set holds all three contracts; the others are not served here).
fn reflection<'a>(service_name: &str, reflection_name: &str) -> Builder<'a> {
    Builder::configure()
        .register_encoded_file_descriptor_set(mm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(service_name)
        .with_service_name(HEALTH)
        .with_service_name(reflection_name)
}

/// What a service printed on stdout as it started: its gRPC address (`listening on <addr>`,
/// the last line) and, before it, its HTTP address if it has one (`http on <addr>`).
#[derive(Debug, Clone, PartialEq)]
pub struct Announced {
    pub grpc: String,
    pub http: Option<String>,
}

/// Waits for a child started with a piped stdout to announce its addresses (as `http://…`);
/// an error when it exits or says anything else first.
pub fn announced(child: &mut std::process::Child) -> std::io::Result<Announced> {
    use std::io::BufRead;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| std::io::Error::other("the child's stdout is not piped"))?;
    let mut reader = std::io::BufReader::new(stdout);
    let mut http = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim();
        if let Some(addr) = line.strip_prefix("http on ") {
            http = Some(format!("http://{addr}"));
        } else if let Some(addr) = line.strip_prefix("listening on ") {
            return Ok(Announced {
                grpc: format!("http://{addr}"),
                http,
            });
        } else {
            return Err(std::io::Error::other(format!(
                "expected `listening on <addr>`, got {line:?}"
            )));
        }
    }
}

/// The gRPC address a child announces (see [`announced`]).
pub fn listening_address(child: &mut std::process::Child) -> std::io::Result<String> {
    announced(child).map(|a| a.grpc)
}
