//! `POST /v1/chat/completions` and `GET /v1/models` over the turn pipeline.
//!
//! The last user message is the turn. Earlier messages start a fresh session (system
//! messages become its instructions, user/assistant pairs its history), unless the request
//! names a stored session (`X-Session-Id` or `session_id`): then the store holds the history.
//! The reply is chosen among the turn's attempts once the majordomo has judged them, so a
//! stream carries the dream live in `x_dream` and the reply's text at the end.

use super::as_caller;
use super::openai::{ApiError, ChatRequest, Message, Stop, Usage};
use crate::auth::Caller;
use crate::policy::TurnPolicy;
use crate::render;
use crate::service::OrchestratorService;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use mm_kit::text::clip;
use mm_proto::orchestrator::v1 as pb;
use pb::orchestrator_server::Orchestrator;
use pb::turn_event::Event as TE;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::convert::Infallible;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

/// The header naming (and returning) the session a request continues.
pub const SESSION_HEADER: &str = "x-session-id";
/// Longest model id or policy knob name quoted back in an error.
const QUOTE_CHARS: usize = 64;
/// Longest parser message passed on (it may quote the client's value).
const ERROR_CHARS: usize = 200;

/// At most `QUOTE_CHARS` of `s`, for messages that name what the client sent.
fn quote(s: &str) -> String {
    clip(s, QUOTE_CHARS)
}

/// A model pair's id, as `/v1/models` lists it.
pub fn model_id(roles: &pb::Roles) -> String {
    format!("muse={}+majordomo={}", roles.muse, roles.majordomo)
}

/// The roles a `model` asks for: a pair id, a bare muse model, or nothing (the defaults).
fn roles_of(model: &str) -> pb::Roles {
    match model
        .strip_prefix("muse=")
        .and_then(|r| r.split_once("+majordomo="))
    {
        Some((muse, majordomo)) => pb::Roles {
            muse: muse.into(),
            majordomo: majordomo.into(),
        },
        None => pb::Roles {
            muse: model.into(),
            majordomo: String::new(),
        },
    }
}

/// The pairs the healthy replicas serve, and each muse model alone.
fn served(svc: &OrchestratorService) -> Vec<String> {
    let s = svc.shared();
    let (muses, majordomos) = (s.muse.models(), s.majordomo.models());
    let mut ids: Vec<String> = muses
        .iter()
        .flat_map(|m| {
            majordomos.iter().map(move |d| {
                model_id(&pb::Roles {
                    muse: m.clone(),
                    majordomo: d.clone(),
                })
            })
        })
        .collect();
    ids.extend(muses);
    ids
}

pub async fn models(State(svc): State<OrchestratorService>) -> Json<Value> {
    let data: Vec<Value> = served(&svc)
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "muse-majordomo"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// A chat as the pipeline takes it.
#[derive(Debug, PartialEq)]
struct Conversation {
    system: String,
    history: Vec<pb::Exchange>,
    message: String,
}

fn conversation(messages: &[Message]) -> Result<Conversation, ApiError> {
    let (last, earlier) = messages.split_last().ok_or_else(|| {
        ApiError::bad_request(
            "messages",
            "messages is empty: send at least one user message",
        )
    })?;
    if last.role != "user" {
        return Err(ApiError::bad_request(
            "messages",
            "the last message must be the user's: it is the turn",
        ));
    }
    let mut system = Vec::new();
    let mut history = Vec::new();
    let mut pending: Vec<String> = Vec::new();
    for m in earlier {
        let text = m.content.text();
        match m.role.as_str() {
            "system" | "developer" => system.push(text),
            "user" => pending.push(text),
            "assistant" => history.push(pb::Exchange {
                user: std::mem::take(&mut pending).join("\n"),
                reply: text,
            }),
            // Tool results have no place in a creative session's prime.
            "tool" | "function" => {}
            other => {
                return Err(ApiError::bad_request(
                    "messages",
                    format!(
                        "role `{}` is not one of system, developer, user, assistant, tool",
                        quote(other)
                    ),
                ))
            }
        }
    }
    pending.push(last.content.text());
    let message = pending.join("\n").trim().to_string();
    if last.content.text().trim().is_empty() {
        return Err(ApiError::bad_request(
            "messages",
            "the last user message is empty: say something to the muse",
        ));
    }
    Ok(Conversation {
        system: system.join("\n"),
        history,
        message,
    })
}

/// The turn's policy: `base`, then the request's sampling parameters, then its `dream` knobs
/// (named as in the `[policy]` table of `deploy/mm.example.toml`).
fn turn_policy(base: &TurnPolicy, r: &ChatRequest) -> Result<TurnPolicy, ApiError> {
    let Ok(Value::Object(mut p)) = serde_json::to_value(base) else {
        return Err(ApiError::from(tonic::Status::internal(
            "the policy did not serialize as an object",
        )));
    };
    let mut set = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            p.insert(k.into(), v);
        }
    };
    set("commit_temperature", r.temperature.map(Value::from));
    set("commit_top_p", r.top_p.map(Value::from));
    set(
        "reply_tokens",
        r.max_completion_tokens.or(r.max_tokens).map(Value::from),
    );
    set("seed", r.seed.map(Value::from));
    for (k, v) in r.dream.iter().flatten() {
        if !p.contains_key(k) {
            return Err(ApiError::bad_request(
                "dream",
                format!(
                    "dream.{} is not a policy knob (see the [policy] table of deploy/mm.example.toml)",
                    quote(k)
                ),
            ));
        }
        p.insert(k.clone(), v.clone());
    }
    let policy: TurnPolicy = serde_json::from_value(Value::Object(p)).map_err(|e| {
        ApiError::bad_request(
            "dream",
            format!("dream: {}", clip(&e.to_string(), ERROR_CHARS)),
        )
    })?;
    policy
        .validate()
        .map_err(|e| ApiError::bad_request("dream", e.to_string()))?;
    Ok(policy)
}

fn stop_strings(stop: &Option<Stop>) -> Vec<String> {
    match stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    }
}

/// The session the request continues, or None for a fresh one.
fn named_session(headers: &HeaderMap, r: &ChatRequest) -> Result<Option<String>, ApiError> {
    let header = headers
        .get(SESSION_HEADER)
        .map(|v| {
            v.to_str().map(str::to_string).map_err(|_| {
                ApiError::bad_request("X-Session-Id", "X-Session-Id is not visible ASCII")
            })
        })
        .transpose()?;
    Ok(header.or_else(|| r.session_id.clone()))
}

/// The session this turn runs in: the named one (its roles changed if `model` asks for other
/// ones), or a new one made from the earlier messages.
async fn session(
    svc: &OrchestratorService,
    caller: &Caller,
    id: Option<String>,
    model: &str,
    chat: &Conversation,
) -> Result<pb::Session, ApiError> {
    let wanted = (!model.is_empty()).then(|| roles_of(model));
    let unserved = |e: tonic::Status| match e.code() {
        // resolve_roles: a model no healthy replica serves
        tonic::Code::FailedPrecondition => ApiError::not_found(
            "model_not_found",
            format!(
                "model `{}` is not served: GET /v1/models lists what is",
                quote(model)
            ),
        ),
        _ => ApiError::from(e),
    };
    match id {
        Some(id) => {
            let s = svc.load(&id, caller).await.map_err(|e| {
                if e.code() == tonic::Code::NotFound {
                    ApiError::not_found(
                        "session_not_found",
                        format!("unknown session `{id}`: leave session_id out to start one"),
                    )
                } else {
                    ApiError::from(e)
                }
            })?;
            match wanted {
                Some(roles) if asks_other(&roles, &s.roles.clone().unwrap_or_default()) => {
                    svc.set_roles(as_caller(
                        caller,
                        pb::SetRolesRequest {
                            session_id: id,
                            roles: Some(roles),
                        },
                    ))
                    .await
                    .map_err(unserved)?;
                    svc.load(&s.id, caller).await.map_err(ApiError::from)
                }
                _ => Ok(s),
            }
        }
        None => svc
            .create_session(as_caller(
                caller,
                pb::CreateSessionRequest {
                    roles: wanted,
                    policy: None,
                    system: chat.system.clone(),
                    history: chat.history.clone(),
                },
            ))
            .await
            .map(|r| r.into_inner())
            .map_err(unserved),
    }
}

/// Whether `wanted` names a model other than `current` for a role (empty: keep it).
fn asks_other(wanted: &pb::Roles, current: &pb::Roles) -> bool {
    (!wanted.muse.is_empty() && wanted.muse != current.muse)
        || (!wanted.majordomo.is_empty() && wanted.majordomo != current.majordomo)
}

/// What a finished turn's events told, for the response and its `x_dream` summary.
#[derive(Default)]
struct Told {
    reply: Option<pb::Reply>,
    seed: u64,
    latent_steps: u32,
    bursts: BTreeSet<(u32, u32)>,
    critiques: Vec<Value>,
    revisions: u32,
    failovers: u32,
}

impl Told {
    /// Takes one event; a turn's error becomes the request's.
    fn take(&mut self, e: TE) -> Result<(), ApiError> {
        match e {
            TE::Started(s) => self.seed = s.seed,
            TE::LatentStep(l) => {
                self.latent_steps += 1;
                self.bursts.insert((l.attempt, l.burst));
            }
            TE::Critique(c) if !c.segment => {
                self.critiques.push(render::event_json(&TE::Critique(c)))
            }
            TE::Revision(_) => self.revisions += 1,
            TE::Failover(_) => self.failovers += 1,
            TE::Reply(r) => self.reply = Some(r),
            TE::Error(err) => {
                return Err(ApiError::from(tonic::Status::new(
                    tonic::Code::from(err.code),
                    err.message,
                )))
            }
            TE::Commit(_) | TE::Critique(_) | TE::BurstEnded(_) => {}
        }
        Ok(())
    }

    fn summary(&self) -> Value {
        json!({
            "seed": self.seed,
            "latent_steps": self.latent_steps,
            "bursts": self.bursts.len(),
            "attempts": self.critiques.len(),
            "chosen_attempt": self.reply.as_ref().map(|r| r.attempt),
            "critiques": self.critiques,
            "revisions": self.revisions,
            "failovers": self.failovers,
        })
    }
}

/// Everything a response names besides the reply.
struct Answer {
    id: String,
    created: i64,
    model: String,
    session: String,
    reply_tokens: u32,
}

impl Answer {
    fn finish_reason(&self, reply: &pb::Reply) -> &'static str {
        if reply.reply_tokens >= self.reply_tokens {
            "length"
        } else {
            "stop"
        }
    }

    fn usage(reply: &pb::Reply) -> Usage {
        Usage::new(
            reply.prompt_tokens,
            reply.prompt_cached_tokens,
            reply.reply_tokens,
        )
    }

    /// A stream chunk: `delta`, the finish reason when done, `x_dream` when the dream moved.
    fn chunk(&self, delta: Value, finish: Option<&str>, dream: Option<Value>) -> Value {
        let mut c = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "session_id": self.session,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
        });
        if let Some(d) = dream {
            c["x_dream"] = d;
        }
        c
    }
}

pub async fn completions(
    State(svc): State<OrchestratorService>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(r) = body.map_err(|e| ApiError::bad_request("body", e.body_text()))?;
    let chat = conversation(&r.messages)?;
    let stop = stop_strings(&r.stop);
    let s = session(&svc, &caller, named_session(&headers, &r)?, &r.model, &chat).await?;
    let base = svc.policy(s.policy).map_err(ApiError::from)?;
    let policy = turn_policy(&base, &r)?;
    let events = svc
        .turn(as_caller(
            &caller,
            pb::TurnRequest {
                session_id: s.id.clone(),
                message: chat.message.clone(),
                verbosity: pb::Verbosity::Full as i32,
                policy: Some(policy.to_pb()),
                stop,
            },
        ))
        .await
        .map_err(ApiError::from)?
        .into_inner();
    let answer = Answer {
        id: format!("chatcmpl-{}-{}", s.id, s.turns.len()),
        created: crate::turn::now_ms() / 1000,
        model: model_id(&s.roles.clone().unwrap_or_default()),
        session: s.id.clone(),
        reply_tokens: policy.reply_tokens,
    };
    let include_usage = r.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let mut response = if r.stream {
        stream(events, answer, include_usage).into_response()
    } else {
        whole(events, answer).await?.into_response()
    };
    if let Ok(v) = HeaderValue::from_str(&s.id) {
        response.headers_mut().insert(SESSION_HEADER, v);
    }
    Ok(response)
}

type Events = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::TurnEvent, tonic::Status>> + Send>,
>;

/// The turn's reply as one `chat.completion`.
async fn whole(mut events: Events, a: Answer) -> Result<Json<Value>, ApiError> {
    let mut told = Told::default();
    while let Some(ev) = events.next().await {
        if let Some(e) = ev.map_err(ApiError::from)?.event {
            told.take(e)?;
        }
    }
    let reply = told
        .reply
        .clone()
        .ok_or_else(|| ApiError::from(tonic::Status::internal("the turn ended without a reply")))?;
    Ok(Json(json!({
        "id": a.id, "object": "chat.completion", "created": a.created, "model": a.model,
        "session_id": a.session,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": reply.text},
            "finish_reason": a.finish_reason(&reply),
            "logprobs": null,
        }],
        "usage": Answer::usage(&reply),
        "x_dream": told.summary(),
    })))
}

/// The turn as Server-Sent Events in OpenAI's chunk format: the dream's events in `x_dream`
/// as they happen, then the reply's text in word-sized deltas, the finish reason, usage if
/// asked for, and `[DONE]`. A client that goes away abandons the turn.
fn stream(mut events: Events, a: Answer, include_usage: bool) -> impl IntoResponse {
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        let send = |v: Value| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(Event::default().data(v.to_string())))
                    .await
                    .is_ok()
            }
        };
        if !send(a.chunk(json!({"role": "assistant", "content": ""}), None, None)).await {
            return;
        }
        let mut told = Told::default();
        while let Some(ev) = events.next().await {
            let e = match ev {
                Ok(pb::TurnEvent { event: Some(e) }) => e,
                Ok(_) => continue,
                Err(s) => {
                    let _ = send(ApiError::from(s).body()).await;
                    return;
                }
            };
            if !matches!(e, TE::Reply(_) | TE::Error(_))
                && !send(a.chunk(json!({}), None, Some(render::event_json(&e)))).await
            {
                return;
            }
            if let Err(err) = told.take(e) {
                let _ = send(err.body()).await;
                return;
            }
        }
        let Some(reply) = told.reply.clone() else {
            let err = ApiError::from(tonic::Status::internal("the turn ended without a reply"));
            let _ = send(err.body()).await;
            return;
        };
        for piece in words(&reply.text) {
            if !send(a.chunk(json!({"content": piece}), None, None)).await {
                return;
            }
        }
        let finish = a.finish_reason(&reply);
        if !send(a.chunk(json!({}), Some(finish), Some(told.summary()))).await {
            return;
        }
        if include_usage {
            let mut u = a.chunk(json!({}), None, None);
            u["choices"] = json!([]);
            u["usage"] = json!(Answer::usage(&reply));
            if !send(u).await {
                return;
            }
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default())
}

/// `text` in pieces that each end after a run of whitespace (a word and the space after it).
fn words(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut in_space = false;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            in_space = true;
        } else if in_space {
            out.push(&text[start..i]);
            start = i;
            in_space = false;
        }
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::openai::Content;

    fn msg(role: &str, text: &str) -> Message {
        Message {
            role: role.into(),
            content: Content::Text(text.into()),
        }
    }

    #[test]
    fn earlier_messages_become_instructions_and_history_and_the_last_is_the_turn() {
        let c = conversation(&[
            msg("system", "Be brief."),
            msg("user", "Hi"),
            msg("assistant", "Hello."),
            msg("user", "And"),
            msg("user", "a poem?"),
        ])
        .unwrap();
        assert_eq!(c.system, "Be brief.");
        assert_eq!(
            c.history,
            [pb::Exchange {
                user: "Hi".into(),
                reply: "Hello.".into()
            }]
        );
        assert_eq!(c.message, "And\na poem?");
        for bad in [
            vec![],
            vec![msg("user", "hi"), msg("assistant", "yes")],
            vec![msg("user", "  ")],
            vec![msg("wizard", "x"), msg("user", "hi")],
        ] {
            let e = conversation(&bad).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{bad:?}");
            assert_eq!(e.param, Some("messages"));
        }
    }

    #[test]
    fn sampling_parameters_and_dream_knobs_override_the_base_policy() {
        let r: ChatRequest = serde_json::from_value(json!({
            "messages": [], "temperature": 0.0, "top_p": 0.5, "max_tokens": 7, "seed": 3,
            "dream": {"steps": 2, "render": "translate"}
        }))
        .unwrap();
        let p = turn_policy(&TurnPolicy::default(), &r).unwrap();
        assert_eq!(
            (
                p.commit_temperature,
                p.commit_top_p,
                p.reply_tokens,
                p.seed,
                p.steps
            ),
            (0.0, 0.5, 7, Some(3), 2)
        );
        assert_eq!(p.render, mm_proto::muse::v1::Render::Translate);
        for (dream, needle) in [
            (json!({"wings": 2}), "dream.wings is not a policy knob"),
            (json!({"steps": 0}), "policy.steps"),
            (json!({"render": "loud"}), "dream:"),
        ] {
            let r: ChatRequest =
                serde_json::from_value(json!({"messages": [], "dream": dream})).unwrap();
            let e = turn_policy(&TurnPolicy::default(), &r).unwrap_err();
            assert!(e.message.contains(needle), "{}", e.message);
        }
    }

    #[test]
    fn model_ids_name_both_roles_or_the_muse_alone() {
        let pair = pb::Roles {
            muse: "a".into(),
            majordomo: "b".into(),
        };
        assert_eq!(roles_of(&model_id(&pair)), pair);
        assert_eq!(roles_of("a").muse, "a");
        assert!(roles_of("a").majordomo.is_empty());
        assert!(!asks_other(&roles_of("a"), &pair));
        assert!(asks_other(&roles_of("c"), &pair));
    }

    #[test]
    fn replies_stream_in_word_pieces_that_join_to_the_text() {
        let text = "The sea,  at night\nis loud.";
        let w = words(text);
        assert_eq!(w, ["The ", "sea,  ", "at ", "night\n", "is ", "loud."]);
        assert_eq!(w.concat(), text);
        assert!(words("").is_empty());
    }
}
