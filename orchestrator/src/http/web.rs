//! The live web view: one page embedded in the binary (plain HTML, CSS and JavaScript: no
//! front-end build), and the small JSON API it reads besides the chat completions it streams
//! turns through: the sessions, one session's stored transcript, the models each role can
//! take, and setting a session's roles.

use super::as_caller;
use super::openai::ApiError;
use crate::auth::Caller;
use crate::render;
use crate::service::OrchestratorService;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use mm_proto::orchestrator::v1 as pb;
use pb::orchestrator_server::Orchestrator;
use serde::Deserialize;
use serde_json::{json, Value};

const INDEX: &str = include_str!("web/index.html");
const SCRIPT: &str = include_str!("web/app.js");
const STYLE: &str = include_str!("web/style.css");

pub async fn index() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX)
}

pub async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
}

pub async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE)
}

/// The models the healthy replicas serve, per role.
pub async fn models(State(svc): State<OrchestratorService>) -> Json<Value> {
    let s = svc.shared();
    Json(json!({"muse": s.muse.models(), "majordomo": s.majordomo.models()}))
}

/// The caller's sessions, newest first.
pub async fn sessions(
    State(svc): State<OrchestratorService>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    let list = svc
        .list_sessions(as_caller(&caller, pb::ListSessionsRequest {}))
        .await?
        .into_inner();
    let sessions: Vec<Value> = list.sessions.iter().map(render::session_json).collect();
    Ok(Json(json!({ "sessions": sessions })))
}

#[derive(Debug, Default, Deserialize)]
pub struct Roles {
    #[serde(default)]
    muse: String,
    #[serde(default)]
    majordomo: String,
}

impl From<Roles> for pb::Roles {
    fn from(r: Roles) -> Self {
        pb::Roles {
            muse: r.muse,
            majordomo: r.majordomo,
        }
    }
}

pub async fn create(
    State(svc): State<OrchestratorService>,
    Extension(caller): Extension<Caller>,
    body: Option<Json<Roles>>,
) -> Result<Json<Value>, ApiError> {
    let roles = body.map(|Json(r)| r).unwrap_or_default();
    let s = svc
        .create_session(as_caller(
            &caller,
            pb::CreateSessionRequest {
                roles: Some(roles.into()),
                ..Default::default()
            },
        ))
        .await?
        .into_inner();
    Ok(Json(render::session_json(&s)))
}

pub async fn session(
    State(svc): State<OrchestratorService>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let s = svc
        .get_session(as_caller(&caller, pb::GetSessionRequest { session_id: id }))
        .await?
        .into_inner();
    Ok(Json(render::session_json(&s)))
}

pub async fn set_roles(
    State(svc): State<OrchestratorService>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Json(roles): Json<Roles>,
) -> Result<Json<Value>, ApiError> {
    let s = svc
        .set_roles(as_caller(
            &caller,
            pb::SetRolesRequest {
                session_id: id,
                roles: Some(roles.into()),
            },
        ))
        .await?
        .into_inner();
    Ok(Json(render::session_json(&s)))
}
