//! Serving any of the three services the same way: the service's routes plus the standard
//! gRPC health (reporting it SERVING) and reflection services, on a bound listener, until
//! ctrl-c. Prints `listening on <addr>` on stdout once ready — scripts and tests wait for it.

use tonic::service::Routes;

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
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let routes = routes.add_service(health).add_service(reflection);
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
