//! OpenAI's chat-completions wire format, as much of it as the pipeline maps onto: requests
//! (unknown fields ignored, as OpenAI's API does), responses, stream chunks and errors.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tonic::Code;

/// A message's content: a string, or an array of parts of which the text parts count.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
    /// `null`, as an assistant message with tool calls has.
    None(()),
}

#[derive(Debug, Clone, Deserialize)]
pub struct Part {
    #[serde(default)]
    pub text: Option<String>,
}

impl Content {
    pub fn text(&self) -> String {
        match self {
            Content::Text(t) => t.clone(),
            Content::Parts(parts) => parts
                .iter()
                .filter_map(|p| p.text.as_deref())
                .collect::<Vec<_>>()
                .join("\n"),
            Content::None(()) => String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default = "no_content")]
    pub content: Content,
}

fn no_content() -> Content {
    Content::None(())
}

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: String,
    pub messages: Vec<Message>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Continue this stored session (also the `X-Session-Id` header).
    pub session_id: Option<String>,
    /// The dream policy's knobs, named as in `deploy/mm.example.toml`'s `[policy]` table.
    pub dream: Option<serde_json::Map<String, Value>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// As OpenAI reports prompt caching: the prompt tokens that were not evaluated again.
#[derive(Debug, Clone, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: u32,
}

impl Usage {
    pub fn new(prompt_tokens: u32, cached_tokens: u32, completion_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
        }
    }
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, with the
/// HTTP status it maps to and, for 429, a `Retry-After`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad_request(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param),
            code: None,
        }
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            param: None,
            code: Some(code),
        }
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON body (also sent as the last event of a stream that fails).
    pub fn body(&self) -> Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

/// The pipeline's statuses as HTTP: the caller's mistakes 4xx, a full house 429, missing
/// replicas 503.
impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        let (status, code) = match s.code() {
            Code::InvalidArgument | Code::OutOfRange => (StatusCode::BAD_REQUEST, None),
            Code::NotFound => (StatusCode::NOT_FOUND, Some("not_found")),
            Code::FailedPrecondition | Code::AlreadyExists => {
                (StatusCode::CONFLICT, Some("conflict"))
            }
            Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, Some("busy")),
            Code::Unauthenticated => (StatusCode::UNAUTHORIZED, None),
            Code::PermissionDenied => (StatusCode::FORBIDDEN, None),
            Code::Unavailable | Code::DeadlineExceeded => {
                (StatusCode::SERVICE_UNAVAILABLE, Some("unavailable"))
            }
            _ => (StatusCode::INTERNAL_SERVER_ERROR, None),
        };
        Self {
            status,
            message: s.message().to_string(),
            param: None,
            code,
        }
    }
}

/// Seconds a client told 429 should wait before retrying.
const RETRY_AFTER_S: &str = "2";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_S));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_with_string_or_part_content_and_unknown_fields() {
        let r: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image_url"}]},
                {"role": "assistant", "content": null, "tool_calls": []}
            ],
            "stop": "\n\n",
            "logit_bias": {"1": 2},
            "dream": {"steps": 4}
        }))
        .unwrap();
        assert_eq!(r.messages[1].content.text(), "Hi");
        assert_eq!(r.messages[2].content.text(), "");
        assert!(matches!(r.stop, Some(Stop::One(ref s)) if s == "\n\n"));
        assert_eq!(r.dream.unwrap()["steps"], 4);
    }

    #[test]
    fn statuses_map_to_openai_errors_and_busy_says_when_to_retry() {
        let e = ApiError::from(tonic::Status::resource_exhausted("32 turns are running"));
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(e.body()["error"]["type"], "rate_limit_error");
        let r = e.into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        let e = ApiError::from(tonic::Status::not_found("unknown session"));
        assert_eq!(
            (e.status, e.body()["error"]["message"].as_str()),
            (StatusCode::NOT_FOUND, Some("unknown session"))
        );
        assert_eq!(
            ApiError::from(tonic::Status::unavailable("no replica")).status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
