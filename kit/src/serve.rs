//! Serving any of the three services the same way: its routes plus the standard gRPC health
//! service (reporting it SERVING) and reflection (v1 and v1alpha, listing this port's services
//! only), on a bound listener, until ctrl-c. Prints `listening on <addr>` on stdout once ready:
//! scripts and tests wait for it.

use tonic::service::Routes;
use tonic_reflection::server::Builder;

const HEALTH: &str = "grpc.health.v1.Health";

/// Binds `listen` (port 0 picks a free port) and serves `routes` as `service_name`.
pub async fn serve(
    listen: &str,
    service_name: &str,
    routes: Routes,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
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
    tonic::transport::Server::builder()
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async {
                let _ = tokio::signal::ctrl_c().await;
            },
        )
        .await?;
    Ok(())
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

/// Waits for a child started with a piped stdout to print its `listening on <addr>` line and
/// returns `http://<addr>`; an error when it exits or says anything else first.
pub fn listening_address(child: &mut std::process::Child) -> std::io::Result<String> {
    use std::io::BufRead;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| std::io::Error::other("the child's stdout is not piped"))?;
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    match line.trim().strip_prefix("listening on ") {
        Some(addr) => Ok(format!("http://{addr}")),
        None => Err(std::io::Error::other(format!(
            "expected `listening on <addr>`, got {:?}",
            line.trim()
        ))),
    }
}
