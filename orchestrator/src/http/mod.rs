//! The orchestrator's HTTP API (default `127.0.0.1:50080`, `--http`, `MM_HTTP`): OpenAI's chat
//! completions over the dreaming pipeline ([`chat`], in [`openai`]'s wire format), the live
//! web view at `/` ([`web`]) and Prometheus `GET /metrics`. It calls the gRPC service's methods in-process, so both APIs
//! share one validation, one store and one turn pipeline.
//!
//! With `tls_cert` and `tls_key` configured it speaks HTTPS only ([`crate::tls`]).
//!
//! With tokens configured (`auth`), the API needs `Authorization: Bearer <token>` — the same
//! tokens as the gRPC API — and each tenant sees its own sessions only.

pub mod chat;
pub mod openai;
pub mod web;

use crate::auth::Caller;
use crate::service::OrchestratorService;
use crate::tls::TlsListener;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use axum::response::Response;
use axum::routing::{get, post, put};
use axum::Router;
use openai::ApiError;
use std::sync::Arc;
use tokio_rustls::rustls::ServerConfig;

/// Largest request body (a chat with its history).
const MAX_BODY_BYTES: usize = 4 << 20;

/// Counts each request by route and status.
async fn count(
    State(svc): State<OrchestratorService>,
    path: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response {
    let route = path.map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(req).await;
    svc.shared()
        .metrics
        .http(&route, response.status().as_u16());
    response
}

/// Puts the caller into the request, or answers 401 when tokens are configured and the
/// request has none that fits.
async fn authenticate(
    State(svc): State<OrchestratorService>,
    mut req: Request,
    next: Next,
) -> Response {
    let caller = match &svc.shared().tokens {
        None => Caller::Anyone,
        Some(tokens) => {
            let header = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            match tokens.check(header) {
                Ok(c) => c,
                Err(s) => return ApiError::from(s).into_response(),
            }
        }
    };
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// A request to the gRPC service's methods, made by `caller`.
pub(crate) fn as_caller<T>(caller: &Caller, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.extensions_mut().insert(caller.clone());
    r
}

pub fn router(svc: OrchestratorService) -> Router {
    let registry = svc.shared().metrics.registry.clone();
    // The page's files, and /metrics, are open like health checks; the API is not.
    let open = Router::new()
        .route("/", get(web::index))
        .route("/app.js", get(web::script))
        .route("/style.css", get(web::style))
        .merge(mm_kit::metrics::router(registry));
    let api = Router::new()
        .route("/api/models", get(web::models))
        .route("/api/sessions", get(web::sessions).post(web::create))
        .route("/api/sessions/{id}", get(web::session))
        .route("/api/sessions/{id}/roles", put(web::set_roles))
        .route("/v1/models", get(chat::models))
        .route("/v1/chat/completions", post(chat::completions))
        .route_layer(middleware::from_fn_with_state(svc.clone(), authenticate))
        .with_state(svc.clone());
    open.merge(api)
        .route_layer(middleware::from_fn_with_state(svc, count))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

/// Binds `listen` and serves the HTTP API in the background, over TLS with `tls`; returns the
/// bound address.
pub async fn serve(
    listen: &str,
    svc: OrchestratorService,
    tls: Option<Arc<ServerConfig>>,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = router(svc);
    let stopped = |e: std::io::Error| tracing::error!(error = %e, "the HTTP API stopped");
    match tls {
        Some(config) => {
            let listener = TlsListener::new(listener, config)?;
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap_or_else(stopped) });
        }
        None => {
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap_or_else(stopped) });
        }
    }
    Ok(addr)
}
