//! Prometheus metrics, the same way in every service: a registry the service fills with its
//! own families, its gRPC requests counted by method and status code (a tower layer on the
//! server), and `GET /metrics` in the OpenMetrics text format, which Prometheus scrapes.

use axum::{extract::State, http::header, response::IntoResponse, routing::get, Router};
use prometheus_client::encoding::{text::encode, EncodeLabelSet};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::{counter::Counter, family::Family};
use prometheus_client::registry::Registry;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// The content type of the OpenMetrics text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcLabels {
    method: String,
    code: String,
}

/// gRPC requests by method and status code, counted as each response starts. A unary error
/// or a refused stream shows its code; a stream that fails later (in its trailers) counts as
/// `Ok`, since its answer had begun (the services report in-stream failures as events).
#[derive(Clone)]
pub struct GrpcRequests(Family<GrpcLabels, Counter>);

impl GrpcRequests {
    pub fn register(registry: &mut Registry) -> Self {
        let family = Family::default();
        registry.register(
            "grpc_requests",
            "gRPC requests by method and status code (as the response starts)",
            family.clone(),
        );
        Self(family)
    }
}

impl<S> tower::Layer<S> for GrpcRequests {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            counter: self.clone(),
        }
    }
}

/// A service whose responses [`GrpcRequests`] counts.
#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    counter: GrpcRequests,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for Counted<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_string();
        let family = self.counter.0.clone();
        let future = self.inner.call(req);
        Box::pin(async move {
            let response = future.await?;
            let code = response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map_or(tonic::Code::Ok, tonic::Code::from);
            family
                .get_or_create(&GrpcLabels {
                    method,
                    code: format!("{code:?}"),
                })
                .inc();
            Ok(response)
        })
    }
}

/// A latency histogram in seconds, with buckets from 5 ms to about 80 s (a critique on a busy
/// CPU, a long turn).
pub fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// The registry in the text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, registry);
    out
}

/// `GET /metrics` over `registry`, to serve alone or merged into a larger router.
pub fn router(registry: Arc<Registry>) -> Router {
    async fn metrics(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
        ([(header::CONTENT_TYPE, OPENMETRICS)], render(&registry))
    }
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(registry)
}

/// Serves `GET /metrics` on `listen` in the background; returns the bound address.
pub async fn serve(listen: &str, registry: Arc<Registry>) -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(registry)).await {
            tracing::error!(error = %e, "the metrics listener stopped");
        }
    });
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, Service, ServiceExt};

    #[tokio::test]
    async fn requests_are_counted_by_method_and_the_code_their_response_starts_with() {
        let mut registry = Registry::default();
        let layer = GrpcRequests::register(&mut registry);
        let inner = tower::service_fn(|req: http::Request<()>| async move {
            let mut r = http::Response::new(());
            if req.uri().path().ends_with("Bad") {
                r.headers_mut().insert("grpc-status", "3".parse().unwrap());
            }
            Ok::<_, std::convert::Infallible>(r)
        });
        let mut svc = layer.layer(inner);
        for path in ["/x.v1.X/Good", "/x.v1.X/Good", "/x.v1.X/Bad"] {
            let req = http::Request::builder().uri(path).body(()).unwrap();
            svc.ready().await.unwrap().call(req).await.unwrap();
        }
        let text = render(&registry);
        assert!(
            text.contains(r#"grpc_requests_total{method="/x.v1.X/Good",code="Ok"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"grpc_requests_total{method="/x.v1.X/Bad",code="InvalidArgument"} 1"#),
            "{text}"
        );
    }
}
