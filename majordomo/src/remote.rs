//! A remote majordomo: any OpenAI-compatible chat-completions server (vLLM, llama.cpp's
//! server, Ollama, llama-cpp-python) as the critic, so that a small dreaming muse can be paired
//! with a big sober model that already runs elsewhere.
//!
//! The server reads the messages our own model would read (`review::critique_messages`), is
//! asked for the same JSON schema through `response_format` at temperature 0, and its answer is
//! parsed, validated and merged with the deterministic checks exactly like our model's. What
//! it cannot give is the draft's NLL: chat completions do not score a given text.

use crate::checks::{self, LengthLimits};
use crate::constrained::DecodeStats;
use crate::critique::{self, Critique, Structure};
use crate::error::{RemoteError, Result};
use crate::review::{self, CritiqueOutcome, CritiqueRequest, RequestLimits};
use lm::ChatMessage;
use mm_kit::text::clip;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// An API key, kept out of `Debug` output: configurations end up in logs and error messages.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ApiKey(pub String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Where the remote critic is and how to talk to it.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteConfig {
    /// The API root, e.g. `http://127.0.0.1:8000/v1`: requests go to `{base_url}/chat/completions`.
    pub base_url: String,
    /// The model name the server knows; sent as `model`, reported by Info.
    pub model: String,
    pub api_key: Option<ApiKey>,
    /// The limit for one HTTP request.
    pub timeout: Duration,
    /// The answer's token budget (`max_tokens`).
    pub max_tokens: u32,
}

/// Tries per question: an invalid answer is asked again once, with the reason appended to the
/// request (at temperature 0 the same prompt would only give the same answer).
const TRIES: usize = 2;
/// How much of an invalid answer or an error body an error message shows.
const SHOWN_CHARS: usize = 300;
/// The limit for Info's reachability probe: health checks call Info often and briefly.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How a request asks for schema-bound JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SchemaFormat {
    /// OpenAI's form, `{"type":"json_schema","json_schema":{name, schema, strict}}`: vLLM,
    /// llama.cpp's server, Ollama and OpenAI take it.
    JsonSchema,
    /// `{"type":"json_object","schema":…}`: the only form llama-cpp-python's server (0.3.x)
    /// knows; it refuses the other with HTTP 500 ("Input should be 'text' or 'json_object'").
    /// vLLM would take it as "any JSON object" and ignore the schema, so it is the fallback,
    /// not the first choice.
    JsonObject,
}

impl SchemaFormat {
    fn response_format(self, name: &str, schema: &Value) -> Value {
        match self {
            Self::JsonSchema => json!({
                "type": "json_schema",
                "json_schema": { "name": name, "schema": schema, "strict": true },
            }),
            Self::JsonObject => json!({ "type": "json_object", "schema": schema }),
        }
    }
}

/// The body of one chat-completions request: greedy, bounded, schema-bound, not streamed.
fn request_body(
    model: &str,
    messages: &[ChatMessage],
    name: &str,
    schema: &Value,
    format: SchemaFormat,
    max_tokens: u32,
) -> Value {
    json!({
        "model": model,
        "messages": messages,
        "temperature": 0.0,
        "max_tokens": max_tokens,
        "stream": false,
        "response_format": format.response_format(name, schema),
    })
}

/// The schema as other servers' schema compilers take it: without our grammar engine's own
/// options (`x-guidance`), and with bounded integers spelled as enums. llama-cpp-python's
/// compiler ignores `minimum`/`maximum` (SmolLM2 answered `"novelty": 12`, twice); every
/// compiler knows `enum`, and the language is the same.
fn portable(schema: &Value) -> Value {
    let mut s = schema.clone();
    if let Some(o) = s.as_object_mut() {
        o.remove("x-guidance");
    }
    enumerate_integers(&mut s);
    s
}

/// Replaces `{"type":"integer","minimum":a,"maximum":b}` (a short range) by the enum a..=b.
fn enumerate_integers(v: &mut Value) {
    match v {
        Value::Object(o) => {
            let bounds = match (o.get("type"), o.get("minimum"), o.get("maximum")) {
                (Some(t), Some(lo), Some(hi)) if t == "integer" => lo.as_i64().zip(hi.as_i64()),
                _ => None,
            };
            let short =
                |(lo, hi): &(i64, i64)| hi.checked_sub(*lo).is_some_and(|n| (0..=100).contains(&n));
            if let Some((lo, hi)) = bounds.filter(short) {
                o.remove("minimum");
                o.remove("maximum");
                o.insert("enum".into(), (lo..=hi).collect());
            }
            o.values_mut().for_each(enumerate_integers);
        }
        Value::Array(items) => items.iter_mut().for_each(enumerate_integers),
        _ => {}
    }
}

/// Whether an error says the server does not know the `json_schema` form: a 400 or 422, or
/// llama-cpp-python's 500 (it answers request validation errors so), naming `response_format`.
fn refuses_json_schema(status: u16, body: &str) -> bool {
    matches!(status, 400 | 422 | 500) && body.contains("response_format")
}

/// One answer: the message's text and what it cost.
#[derive(Debug)]
struct Answer {
    text: String,
    /// Completion tokens, as the server's `usage` reports them (0 when it does not).
    tokens: usize,
    /// The server stopped at `max_tokens`.
    truncated: bool,
}

#[derive(Deserialize)]
struct Completion {
    choices: Vec<Choice>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    message: Message,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    content: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    completion_tokens: usize,
}

/// The first choice of a chat completion's body. A missing `content` (a refusal, a tool
/// call) is an empty answer, which then fails to parse like any other invalid one.
fn parse_completion(body: &[u8]) -> std::result::Result<Answer, RemoteError> {
    let c: Completion = serde_json::from_slice(body).map_err(|e| {
        RemoteError::Protocol(format!(
            "{e}: {}",
            clip(&String::from_utf8_lossy(body), SHOWN_CHARS)
        ))
    })?;
    let choice = c
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| RemoteError::Protocol("no choices".into()))?;
    Ok(Answer {
        text: choice.message.content.unwrap_or_default(),
        tokens: c.usage.map_or(0, |u| u.completion_tokens),
        truncated: choice.finish_reason.as_deref() == Some("length"),
    })
}

/// A transport error with its causes: reqwest's own message is only "error sending request".
fn transport_error(url: &str, e: &reqwest::Error) -> RemoteError {
    let mut why = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        why.push_str(": ");
        why.push_str(&s.to_string());
        source = s.source();
    }
    RemoteError::Unreachable {
        url: url.to_string(),
        why,
    }
}

/// The response if its status is a success, else the status and the start of its body.
async fn check_status(
    resp: reqwest::Response,
) -> std::result::Result<reqwest::Response, RemoteError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let mut body = clip(resp.text().await.unwrap_or_default().trim(), SHOWN_CHARS);
    if matches!(status.as_u16(), 401 | 403) {
        body.push_str(" (the API key comes from MAJORDOMO_API_KEY, else OPENAI_API_KEY)");
    }
    Err(RemoteError::Http {
        status: status.as_u16(),
        body,
    })
}

/// The critic on an OpenAI-compatible server.
pub struct RemoteMajordomo {
    http: reqwest::Client,
    base_url: String,
    model: String,
    api_key: Option<ApiKey>,
    max_tokens: u32,
    /// Set once the server refused the `json_schema` form: from then on every request uses
    /// `json_object`, so one server costs one refused request, not one per critique.
    json_object: AtomicBool,
    pub lengths: LengthLimits,
    pub limits: RequestLimits,
}

impl RemoteMajordomo {
    pub fn new(cfg: RemoteConfig) -> std::result::Result<Self, reqwest::Error> {
        Ok(Self {
            http: reqwest::Client::builder().timeout(cfg.timeout).build()?,
            base_url: cfg.base_url.trim_end_matches('/').to_string(),
            model: cfg.model,
            api_key: cfg.api_key,
            max_tokens: cfg.max_tokens,
            json_object: AtomicBool::new(false),
            lengths: LengthLimits::default(),
            limits: RequestLimits::default(),
        })
    }

    /// The model name the server serves the critique with.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// A critique: the server's schema-bound verdict merged with the deterministic checks.
    /// `decode.tokens` are the server's completion tokens over all tries; `nll` is none.
    pub async fn critique(&self, r: &CritiqueRequest) -> Result<CritiqueOutcome> {
        self.limits.check(r)?;
        let started = Instant::now();
        let (stats, findings) = checks::check(&r.request, &r.draft, self.lengths);
        let (model, answer) = self
            .ask(
                "critique",
                review::critique_messages(r),
                &critique::model_schema(),
                Critique::parse,
            )
            .await?;
        let decode = DecodeStats {
            tokens: answer.tokens,
            total_time: started.elapsed(),
            ..Default::default()
        };
        CritiqueOutcome::merged(model, answer.text, stats, &findings, decode, None)
    }

    /// A draft's structure: title, points, summary.
    pub async fn structure(&self, draft: &str) -> Result<Structure> {
        self.limits.check_structure(draft)?;
        let (s, _) = self
            .ask(
                "structure",
                review::structure_messages(draft),
                &critique::structure_schema(),
                Structure::parse,
            )
            .await?;
        Ok(s)
    }

    /// Whether the server answers at all (`GET {base_url}/models`): Info is the orchestrator's
    /// health check, and a critic whose server is down should not look healthy.
    pub async fn probe(&self) -> std::result::Result<(), RemoteError> {
        let url = format!("{}/models", self.base_url);
        let resp = self
            .authorized(self.http.get(&url))
            .timeout(PROBE_TIMEOUT)
            .send()
            .await
            .map_err(|e| transport_error(&url, &e))?;
        check_status(resp).await.map(drop)
    }

    /// Asks for JSON of `schema` named `what` and parses the answer; an answer that does not
    /// parse is asked for once more with the reason appended to the last message. Transport
    /// and HTTP errors are not retried here: the orchestrator fails over to another replica.
    async fn ask<T>(
        &self,
        what: &'static str,
        mut messages: Vec<ChatMessage>,
        schema: &Value,
        parse: impl Fn(&str) -> std::result::Result<T, String>,
    ) -> std::result::Result<(T, Answer), RemoteError> {
        let schema = portable(schema);
        let mut tokens = 0;
        let mut rejected = (String::new(), String::new());
        for _ in 0..TRIES {
            let answer = self.complete(what, &messages, &schema).await?;
            tokens += answer.tokens;
            match parse(&answer.text) {
                Ok(t) => return Ok((t, Answer { tokens, ..answer })),
                Err(e) => {
                    let why = if answer.truncated {
                        format!(
                            "{e}; the answer was cut at max_tokens = {}",
                            self.max_tokens
                        )
                    } else {
                        e
                    };
                    tracing::warn!(what, why, "the remote majordomo's answer is invalid");
                    if let Some(last) = messages.last_mut() {
                        last.content.push_str(&format!(
                            "\n\nYour previous reply was rejected ({why}). Reply with only the JSON object."
                        ));
                    }
                    rejected = (why, answer.text);
                }
            }
        }
        Err(RemoteError::InvalidAnswer {
            what,
            tries: TRIES,
            why: rejected.0,
            answer: clip(&rejected.1, SHOWN_CHARS),
        })
    }

    /// One chat completion asking for `schema`, in OpenAI's form until the server refuses it,
    /// then in llama-cpp-python's.
    async fn complete(
        &self,
        name: &str,
        messages: &[ChatMessage],
        schema: &Value,
    ) -> std::result::Result<Answer, RemoteError> {
        let body =
            |format| request_body(&self.model, messages, name, schema, format, self.max_tokens);
        if !self.json_object.load(Ordering::Relaxed) {
            match self.post(&body(SchemaFormat::JsonSchema)).await {
                Err(RemoteError::Http {
                    status,
                    body: refusal,
                }) if refuses_json_schema(status, &refusal) => {
                    tracing::info!(
                        refusal,
                        "the server refused response_format json_schema: asking with json_object and the schema from now on"
                    );
                    self.json_object.store(true, Ordering::Relaxed);
                }
                other => return other,
            }
        }
        self.post(&body(SchemaFormat::JsonObject)).await
    }

    async fn post(&self, body: &Value) -> std::result::Result<Answer, RemoteError> {
        let url = format!("{}/chat/completions", self.base_url);
        let resp = self
            .authorized(self.http.post(&url))
            .json(body)
            .send()
            .await
            .map_err(|e| transport_error(&url, &e))?;
        let bytes = check_status(resp)
            .await?
            .bytes()
            .await
            .map_err(|e| transport_error(&url, &e))?;
        parse_completion(&bytes)
    }

    fn authorized(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(key) => r.bearer_auth(&key.0),
            None => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::critique::{IssueKind, Verdict};
    use crate::error::MajordomoError;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const VALID: &str = r#"{"verdict":"accept","coherence":8,"novelty":5,"issues":[],"advice":{"noise":"keep","steps":"keep"}}"#;

    fn completion(content: &str) -> String {
        json!({
            "choices": [{ "index": 0, "message": { "role": "assistant", "content": content }, "finish_reason": "stop" }],
            "usage": { "prompt_tokens": 100, "completion_tokens": 40, "total_tokens": 140 },
        })
        .to_string()
    }

    #[test]
    fn the_request_asks_for_the_schema_greedily_in_either_form() {
        let messages = review::critique_messages(&CritiqueRequest {
            request: "Write about the sea.".into(),
            draft: "The sea.".into(),
            ..Default::default()
        });
        let schema = portable(&critique::model_schema());
        assert!(schema.get("x-guidance").is_none());
        assert_eq!(
            schema["properties"]["coherence"],
            json!({ "type": "integer", "enum": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10] })
        );
        assert_eq!(
            schema["properties"]["verdict"],
            critique::model_schema()["properties"]["verdict"]
        );
        let b = request_body(
            "big",
            &messages,
            "critique",
            &schema,
            SchemaFormat::JsonSchema,
            512,
        );
        assert_eq!(
            (
                &b["model"],
                &b["temperature"],
                &b["max_tokens"],
                &b["stream"]
            ),
            (&json!("big"), &json!(0.0), &json!(512), &json!(false))
        );
        assert_eq!(b["messages"][0]["role"], "system");
        assert_eq!(b["messages"][1]["role"], "user");
        assert_eq!(b["messages"][1]["content"], json!(messages[1].content));
        let f = &b["response_format"];
        assert_eq!(
            (
                &f["type"],
                &f["json_schema"]["name"],
                &f["json_schema"]["strict"]
            ),
            (&json!("json_schema"), &json!("critique"), &json!(true))
        );
        assert_eq!(f["json_schema"]["schema"], schema);
        let b = request_body(
            "big",
            &messages,
            "critique",
            &schema,
            SchemaFormat::JsonObject,
            512,
        );
        assert_eq!(
            b["response_format"],
            json!({ "type": "json_object", "schema": schema })
        );
    }

    #[test]
    fn completions_parse_and_non_completions_are_protocol_errors() {
        let a = parse_completion(completion(VALID).as_bytes()).unwrap();
        assert_eq!((a.text.as_str(), a.tokens, a.truncated), (VALID, 40, false));
        let cut = json!({ "choices": [{ "message": { "content": "{\"verdict\":" }, "finish_reason": "length" }] });
        let a = parse_completion(cut.to_string().as_bytes()).unwrap();
        assert_eq!((a.tokens, a.truncated), (0, true));
        let refusal = json!({ "choices": [{ "message": { "content": null, "refusal": "no" } }] });
        assert_eq!(
            parse_completion(refusal.to_string().as_bytes())
                .unwrap()
                .text,
            ""
        );
        for bad in [
            &b"<html>Bad gateway</html>"[..],
            br#"{"choices":[]}"#,
            br#"{"error":"x"}"#,
        ] {
            assert!(
                matches!(parse_completion(bad), Err(RemoteError::Protocol(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// A tiny HTTP server answering each request with the next canned (status, body), and
    /// recording what was asked (the request's head and its JSON body).
    struct Fake {
        url: String,
        asked: Arc<Mutex<Vec<(String, Value)>>>,
    }

    async fn fake(answers: Vec<(u16, String)>) -> Fake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = asked.clone();
        tokio::spawn(async move {
            for (status, body) in answers {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = Vec::new();
                let head_end = loop {
                    let mut chunk = [0u8; 4096];
                    let n = s.read(&mut chunk).await.unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                while buf.len() < head_end + length {
                    let mut chunk = [0u8; 4096];
                    let n = s.read(&mut chunk).await.unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                }
                let json = serde_json::from_slice(&buf[head_end..]).unwrap_or(Value::Null);
                log.lock().unwrap().push((head, json));
                let reply = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                s.write_all(reply.as_bytes()).await.unwrap();
            }
        });
        Fake { url, asked }
    }

    fn remote(url: &str) -> RemoteMajordomo {
        RemoteMajordomo::new(RemoteConfig {
            base_url: format!("{url}/"),
            model: "big-critic".into(),
            api_key: Some(ApiKey("sk-test".into())),
            timeout: Duration::from_secs(10),
            max_tokens: 256,
        })
        .unwrap()
    }

    fn looping() -> CritiqueRequest {
        CritiqueRequest {
            request: "Write about the sea.".into(),
            draft: "The waves are calling me home. ".repeat(40),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn an_invalid_answer_is_asked_again_once_and_the_checks_are_merged() {
        let f = fake(vec![
            (200, completion("{\"verdict\":\"maybe\"")),
            (200, completion(VALID)),
        ])
        .await;
        let out = remote(&f.url).critique(&looping()).await.unwrap();
        // The server accepted a looping draft; the checks make the verdict stricter.
        assert_ne!(out.critique.verdict, Verdict::Accept);
        assert!(out.findings.contains(&IssueKind::Repetition));
        assert_eq!(out.critique.issues[0].kind, IssueKind::Repetition);
        assert_eq!((out.model_json.as_str(), out.decode.tokens), (VALID, 80));
        assert!(out.nll.is_none());
        let asked = f.asked.lock().unwrap();
        assert_eq!(asked.len(), 2);
        let head = asked[0].0.to_lowercase();
        assert!(
            head.starts_with("post /v1/chat/completions http/1.1"),
            "{head}"
        );
        assert!(head.contains("authorization: bearer sk-test"), "{head}");
        let first = asked[0].1["messages"][1]["content"].as_str().unwrap();
        let second = asked[1].1["messages"][1]["content"].as_str().unwrap();
        assert!(!first.contains("rejected"));
        assert!(
            second.starts_with(first) && second.contains("Your previous reply was rejected"),
            "{second}"
        );
    }

    #[tokio::test]
    async fn two_invalid_answers_are_an_internal_error_naming_the_reason() {
        let f = fake(vec![
            (200, completion("not json")),
            (200, completion(&VALID.replace("8", "11"))),
        ])
        .await;
        let e = remote(&f.url).critique(&looping()).await.unwrap_err();
        assert!(
            matches!(
                e,
                MajordomoError::Remote(RemoteError::InvalidAnswer { tries: 2, .. })
            ),
            "{e}"
        );
        let status = crate::service::status_of(&e);
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(
            status.message().contains("scores must be 0-10"),
            "{}",
            status.message()
        );
    }

    #[tokio::test]
    async fn a_server_that_refuses_json_schema_is_asked_with_json_object_from_then_on() {
        // What llama-cpp-python 0.3.36 answers.
        let refusal = r#"{"error":{"message":"1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), 'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema'}","type":"internal_server_error","param":null,"code":null}}"#;
        let structure = r#"{"title":"Copper","points":["wiring"],"summary":"Uses of copper."}"#;
        let f = fake(vec![
            (500, refusal.into()),
            (200, completion(structure)),
            (200, completion(structure)),
        ])
        .await;
        let r = remote(&f.url);
        assert_eq!(r.structure("Copper wires.").await.unwrap().title, "Copper");
        assert_eq!(r.structure("Copper pipes.").await.unwrap().title, "Copper");
        let types: Vec<Value> = f
            .asked
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b)| b["response_format"]["type"].clone())
            .collect();
        assert_eq!(
            types,
            [
                json!("json_schema"),
                json!("json_object"),
                json!("json_object")
            ]
        );
    }

    #[tokio::test]
    async fn an_overloaded_or_absent_server_is_unavailable_and_bad_requests_are_not_retried() {
        let f = fake(vec![(503, r#"{"error":"loading model"}"#.into())]).await;
        let e = remote(&f.url).critique(&looping()).await.unwrap_err();
        let status = crate::service::status_of(&e);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            status.message().contains("HTTP 503") && status.message().contains("loading model")
        );
        let f = fake(vec![(401, r#"{"error":"bad key"}"#.into())]).await;
        let e = remote(&f.url).critique(&looping()).await.unwrap_err();
        let status = crate::service::status_of(&e);
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(
            status.message().contains("MAJORDOMO_API_KEY"),
            "{}",
            status.message()
        );
        // Nothing listens on a port just freed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let r = remote(&format!("http://127.0.0.1:{port}/v1"));
        let e = r.critique(&looping()).await.unwrap_err();
        assert_eq!(
            crate::service::status_of(&e).code(),
            tonic::Code::Unavailable
        );
        assert!(matches!(
            r.probe().await,
            Err(RemoteError::Unreachable { .. })
        ));
        let e = r
            .critique(&CritiqueRequest {
                request: " ".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            crate::service::status_of(&e).code(),
            tonic::Code::InvalidArgument
        );
    }
}
