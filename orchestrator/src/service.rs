//! The client API (`orchestrator.v1.Orchestrator`).

use crate::auth::{Caller, Tokens};
use crate::ceiling::Ceiling;
use crate::config::Config;
use crate::history;
use crate::metrics::Metrics;
use crate::policy::TurnPolicy;
use crate::replicas::{Pool, Role};
use crate::store::{Deleted, Lease, Store, StoreError, Updated};
use crate::tls::ServerTls;
use crate::turn::{self, TurnContext};
use mm_proto::orchestrator::v1 as pb;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

pub struct Shared {
    pub cfg: Config,
    /// The bearer tokens; None: the API is open.
    pub tokens: Option<Tokens>,
    pub store: Store,
    pub muse: Pool,
    pub majordomo: Pool,
    pub metrics: Metrics,
    turns: Arc<Semaphore>,
}

#[derive(Clone)]
pub struct OrchestratorService {
    shared: Arc<Shared>,
}

fn store_err(e: StoreError) -> Status {
    match e {
        StoreError::Unavailable(_) => Status::unavailable(format!("{e}: retry shortly")),
        _ => Status::internal(e.to_string()),
    }
}

fn session_busy(id: &str) -> Status {
    Status::failed_precondition(format!(
        "session `{id}` already has a turn in progress: wait for it to end"
    ))
}

impl OrchestratorService {
    pub async fn new(cfg: Config) -> anyhow::Result<Self> {
        let store = Store::open(&cfg.store, Duration::from_secs(cfg.turn_lease_s)).await?;
        let tokens = Tokens::load(cfg.api_token.as_deref(), cfg.api_tokens_file.as_deref())?;
        let metrics = Metrics::default();
        let muse = Pool::new(
            Role::Muse,
            &cfg.muse,
            cfg.per_replica,
            metrics.queue(Role::Muse),
            metrics.replicas(Role::Muse),
        )?;
        let majordomo = Pool::new(
            Role::Majordomo,
            &cfg.majordomo,
            cfg.per_replica,
            metrics.queue(Role::Majordomo),
            metrics.replicas(Role::Majordomo),
        )?;
        let turns = Arc::new(Semaphore::new(cfg.max_turns));
        let shared = Shared {
            cfg,
            tokens,
            store,
            muse,
            majordomo,
            metrics,
            turns,
        };
        Ok(Self {
            shared: Arc::new(shared),
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Resolves the `dns://` replica entries and health-checks every replica now, then every
    /// `health_interval_s` in the background (replicas come and go with the DNS answers).
    pub async fn start_health_checks(&self) {
        let s = self.shared.clone();
        let timeout = Duration::from_secs(1);
        let dns = crate::discovery::SystemResolver {
            timeout: Duration::from_secs(2),
        };
        s.muse.refresh(&dns, timeout).await;
        s.majordomo.refresh(&dns, timeout).await;
        let interval = Duration::from_secs(s.cfg.health_interval_s.max(1));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                s.muse.refresh(&dns, timeout).await;
                s.majordomo.refresh(&dns, timeout).await;
            }
        });
    }

    /// The gRPC server, each call authenticated when tokens are configured.
    pub fn into_server(
        self,
    ) -> InterceptedService<pb::orchestrator_server::OrchestratorServer<Self>, Authenticate> {
        let check = Authenticate(self.shared.clone());
        pb::orchestrator_server::OrchestratorServer::with_interceptor(self, check)
    }

    /// The session `id`, if `caller` may see it (another tenant's is as unknown as none).
    pub(crate) async fn load(&self, id: &str, caller: &Caller) -> Result<pb::Session, Status> {
        checked_id(id)?;
        self.shared
            .store
            .get(id)
            .await
            .map_err(store_err)?
            .filter(|s| caller.may_see(&s.owner))
            .ok_or_else(|| unknown_session(id))
    }

    /// Fills empty roles with the first healthy replica's model; refuses models no replica serves.
    fn resolve_roles(
        &self,
        wanted: Option<pb::Roles>,
        current: Option<&pb::Roles>,
    ) -> Result<pb::Roles, Status> {
        let wanted = wanted.unwrap_or_default();
        let pick = |field: &str,
                    want: &str,
                    current: Option<&str>,
                    pool: &Pool|
         -> Result<String, Status> {
            let models = pool.models();
            let want = if want.is_empty() {
                current.unwrap_or_default().to_string()
            } else {
                want.to_string()
            };
            if want.is_empty() {
                return models.first().cloned().ok_or_else(|| {
                    Status::unavailable(format!("no healthy {field} replica to take the role"))
                });
            }
            if !models.contains(&want) {
                return Err(Status::failed_precondition(format!(
                    "roles.{field} `{}` is not served by any healthy replica (served: {})",
                    mm_kit::text::clip(&want, 64),
                    if models.is_empty() {
                        "none".to_string()
                    } else {
                        models.join(", ")
                    }
                )));
            }
            Ok(want)
        };
        Ok(pb::Roles {
            muse: pick(
                "muse",
                &wanted.muse,
                current.map(|r| r.muse.as_str()),
                &self.shared.muse,
            )?,
            majordomo: pick(
                "majordomo",
                &wanted.majordomo,
                current.map(|r| r.majordomo.as_str()),
                &self.shared.majordomo,
            )?,
        })
    }

    /// The ceiling `caller` is under.
    fn ceiling(&self, caller: &Caller) -> &Ceiling {
        let cfg = &self.shared.cfg;
        Ceiling::of(caller, &cfg.ceiling, &cfg.tenant_ceilings)
    }

    /// The policy a request asks for, completed with the configured defaults.
    pub(crate) fn policy(&self, p: Option<pb::DreamPolicy>) -> Result<TurnPolicy, Status> {
        TurnPolicy::resolve(&p.unwrap_or_default(), &self.shared.cfg.policy)
            .map_err(|e| Status::invalid_argument(e.to_string()))
    }
}

/// Characters of a session id: ours have 32; longer ones are not looked up.
const MAX_ID_CHARS: usize = 128;

/// A session id fit to look up (not empty, not too long), else INVALID_ARGUMENT.
fn checked_id(id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("session_id is empty"));
    }
    if id.chars().count() > MAX_ID_CHARS {
        return Err(Status::invalid_argument(format!(
            "session_id is longer than {MAX_ID_CHARS} characters: no session has such an id"
        )));
    }
    Ok(())
}

fn unknown_session(id: &str) -> Status {
    Status::not_found(format!(
        "unknown session `{id}`: list sessions with ListSessions"
    ))
}

/// Exchanges a new session may bring along.
const MAX_HISTORY: usize = 256;
/// Stop strings a turn may have (as OpenAI's API allows), and characters of each.
const MAX_STOPS: usize = 4;
const MAX_STOP_CHARS: usize = 64;

/// `field` holds at most `max` characters.
fn within(field: &str, text: &str, max: usize) -> Result<(), Status> {
    if text.chars().count() > max {
        return Err(Status::invalid_argument(format!(
            "{field} is longer than {max} characters"
        )));
    }
    Ok(())
}

fn stop_strings(stop: Vec<String>) -> Result<Vec<String>, Status> {
    if stop.len() > MAX_STOPS {
        return Err(Status::invalid_argument(format!(
            "stop has {} strings; at most {MAX_STOPS}",
            stop.len()
        )));
    }
    if stop
        .iter()
        .any(|s| s.is_empty() || s.chars().count() > MAX_STOP_CHARS)
    {
        return Err(Status::invalid_argument(format!(
            "each stop string needs 1 to {MAX_STOP_CHARS} characters"
        )));
    }
    Ok(stop)
}

/// Puts the caller of each gRPC call into its request, or refuses it UNAUTHENTICATED.
#[derive(Clone)]
pub struct Authenticate(Arc<Shared>);

impl tonic::service::Interceptor for Authenticate {
    fn call(&mut self, mut r: Request<()>) -> Result<Request<()>, Status> {
        if let Some(tokens) = &self.0.tokens {
            let header = r
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok());
            let caller = tokens.check(header)?;
            r.extensions_mut().insert(caller);
        }
        Ok(r)
    }
}

fn without_turns(mut s: pb::Session) -> pb::Session {
    s.turn_count = s.turns.len() as u32;
    s.turns.clear();
    s
}

type TurnStream = Pin<Box<dyn Stream<Item = Result<pb::TurnEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::orchestrator_server::Orchestrator for OrchestratorService {
    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        let roles = self.resolve_roles(r.roles, None)?;
        let policy = self.policy(r.policy)?;
        let ceiling = self.ceiling(&caller);
        ceiling.check(&policy)?;
        if ceiling.sessions.is_some() {
            let held = self
                .shared
                .store
                .list()
                .await
                .map_err(store_err)?
                .iter()
                .filter(|s| s.owner == caller.owner())
                .count();
            ceiling.check_sessions(held)?;
        }
        let max = self.shared.cfg.max_message_chars;
        within("system", &r.system, max)?;
        if r.history.len() > MAX_HISTORY {
            return Err(Status::invalid_argument(format!(
                "history has {} exchanges; at most {MAX_HISTORY}: send the latest",
                r.history.len()
            )));
        }
        for (i, x) in r.history.iter().enumerate() {
            within(&format!("history[{i}].user"), &x.user, max)?;
            within(&format!("history[{i}].reply"), &x.reply, max)?;
        }
        let created = turn::now_ms();
        // Earlier exchanges become turns without attempts: the window primes the muse with them.
        let turns = r
            .history
            .into_iter()
            .enumerate()
            .map(|(i, x)| pb::Turn {
                index: i as u32,
                user: x.user,
                reply: x.reply,
                roles: Some(roles.clone()),
                created_unix_ms: created,
                ..Default::default()
            })
            .collect();
        let s = pb::Session {
            id: mm_kit::ids::random_id(),
            roles: Some(roles),
            policy: Some(policy.to_pb()),
            created_unix_ms: created,
            system: r.system,
            turns,
            owner: caller.owner().to_string(),
            ..Default::default()
        };
        self.shared.store.put(&s).await.map_err(store_err)?;
        Ok(Response::new(s))
    }

    async fn get_session(
        &self,
        request: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let caller = Caller::of(&request);
        let mut s = self.load(&request.into_inner().session_id, &caller).await?;
        s.turn_count = s.turns.len() as u32;
        Ok(Response::new(s))
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let caller = Caller::of(&request);
        let sessions = self
            .shared
            .store
            .list()
            .await
            .map_err(store_err)?
            .into_iter()
            .filter(|s| caller.may_see(&s.owner))
            .map(without_turns)
            .collect();
        Ok(Response::new(pb::ListSessionsResponse { sessions }))
    }

    async fn delete_session(
        &self,
        request: Request<pb::DeleteSessionRequest>,
    ) -> Result<Response<pb::DeleteSessionResponse>, Status> {
        let caller = Caller::of(&request);
        let id = request.into_inner().session_id;
        self.load(&id, &caller).await?;
        match self.shared.store.delete(&id).await.map_err(store_err)? {
            Deleted::Done => Ok(Response::new(pb::DeleteSessionResponse {})),
            Deleted::Missing => Err(unknown_session(&id)),
            Deleted::Leased => Err(Status::failed_precondition(format!(
                "session `{id}` has a turn in progress: delete it when the turn ends"
            ))),
        }
    }

    async fn set_roles(
        &self,
        request: Request<pb::SetRolesRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        let s = self.load(&r.session_id, &caller).await?;
        let roles = self.resolve_roles(r.roles, s.roles.as_ref())?;
        // An update, not a put: a turn appended meanwhile (on any orchestrator) stays.
        match self
            .shared
            .store
            .update(&s.id, None, |s| s.roles = Some(roles.clone()))
            .await
            .map_err(store_err)?
        {
            Updated::Done(s) => Ok(Response::new(without_turns(*s))),
            Updated::Missing | Updated::LeaseLost => Err(unknown_session(&s.id)),
        }
    }

    type TurnStream = TurnStream;

    async fn turn(
        &self,
        request: Request<pb::TurnRequest>,
    ) -> Result<Response<Self::TurnStream>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        let message = r.message.trim().to_string();
        if message.is_empty() {
            return Err(Status::invalid_argument(
                "message is empty: say something to the muse",
            ));
        }
        within("message", &message, self.shared.cfg.max_message_chars)?;
        let stop = stop_strings(r.stop)?;
        let session = self.load(&r.session_id, &caller).await?;
        // Sessions store their policy resolved; older ones lack the newer fields (defaults).
        let session_policy = self.policy(session.policy)?;
        let policy = TurnPolicy::resolve(&r.policy.unwrap_or_default(), &session_policy)
            .map_err(|e| Status::invalid_argument(format!("policy: {e}")))?;
        self.ceiling(&caller).check(&policy)?;
        let permit = self.shared.turns.clone().try_acquire_owned().map_err(|_| {
            let mut s = Status::resource_exhausted(format!(
                "{} turns are running (max_turns): retry in a few seconds",
                self.shared.cfg.max_turns
            ));
            s.metadata_mut()
                .insert("retry-after-ms", "2000".parse().expect("ascii"));
            s
        })?;
        let lease = match self
            .shared
            .store
            .lease(&session.id)
            .await
            .map_err(store_err)?
        {
            Lease::Acquired(lease) => lease,
            Lease::Held => return Err(session_busy(&session.id)),
            Lease::Missing => return Err(unknown_session(&session.id)),
        };
        // Read again under the lease: with a shared store, another orchestrator may have
        // appended a turn since the read above.
        let session = self
            .shared
            .store
            .get(&session.id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| unknown_session(&session.id))?;
        self.shared.metrics.active_sessions.inc();
        let verbosity = pb::Verbosity::try_from(r.verbosity).unwrap_or(pb::Verbosity::Sampled);
        let (tx, rx) = mpsc::channel(256);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let id = session.id.clone();
            let ctx = TurnContext {
                metrics: &shared.metrics,
                muse: &shared.muse,
                majordomo: &shared.majordomo,
                call_timeout: Duration::from_secs(shared.cfg.call_timeout_s),
                history_chars: shared.cfg.history_chars,
                events: tx.clone(),
                verbosity,
            };
            let t_turn = std::time::Instant::now();
            let mut session = session;
            let majordomo_model = session.roles.clone().unwrap_or_default().majordomo;
            let folded = history::fold(&ctx, &session, &majordomo_model).await;
            if let Some((summary, through)) = &folded {
                session.summary = summary.clone();
                session.summarized_turns = *through;
            }
            let result = turn::run(&ctx, &session, &policy, &message, &stop).await;
            let outcome = match result {
                Ok(turn) => {
                    let (prompt_tokens, prompt_cached_tokens, reply_tokens) = turn
                        .attempts
                        .get(turn.chosen_attempt.saturating_sub(1) as usize)
                        .map(|a| (a.prompt_tokens, a.prompt_cached_tokens, a.reply_tokens))
                        .unwrap_or_default();
                    let mut reply = pb::Reply {
                        turn: turn.index,
                        text: turn.reply.clone(),
                        attempt: turn.chosen_attempt,
                        prompt_tokens,
                        prompt_cached_tokens,
                        reply_tokens,
                        ..Default::default()
                    };
                    // Appended to what is stored now (SetRoles may have changed the session),
                    // and only while this turn still holds the session's lease.
                    let t_persist = std::time::Instant::now();
                    let appended = shared
                        .store
                        .update(&id, Some(&lease), |s| {
                            s.turns.push(turn.clone());
                            if let Some((summary, through)) = &folded {
                                s.summary = summary.clone();
                                s.summarized_turns = *through;
                            }
                        })
                        .await
                        .map_err(store_err);
                    match appended {
                        Ok(Updated::Done(_)) => {
                            reply.persist_millis = t_persist.elapsed().as_secs_f64() * 1e3;
                            reply.total_millis = t_turn.elapsed().as_secs_f64() * 1e3;
                            shared.metrics.turn(&turn, reply.total_millis / 1e3);
                            Ok(pb::TurnEvent {
                                event: Some(pb::turn_event::Event::Reply(reply)),
                            })
                        }
                        Ok(Updated::Missing) => Err(Status::not_found(format!(
                            "session `{id}` was deleted during the turn"
                        ))),
                        Ok(Updated::LeaseLost) => Err(Status::aborted(format!(
                            "session `{id}`: this turn outlived its lease and another orchestrator took the session over; the turn was not stored"
                        ))),
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            };
            shared.store.release(lease).await;
            shared.metrics.active_sessions.dec();
            let last = match outcome {
                Ok(ev) => Ok(ev),
                Err(e) => {
                    shared.metrics.turn_failed();
                    tracing::warn!(session = id, error = %e, "turn failed");
                    Ok(pb::TurnEvent {
                        event: Some(pb::turn_event::Event::Error(pb::TurnError {
                            code: e.code() as i32,
                            message: e.message().to_string(),
                        })),
                    })
                }
            };
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Serves the orchestrator's gRPC and HTTP APIs until ctrl-c, over TLS when `tls_cert` and
/// `tls_key` are set. Prints `http on <addr>`, then `listening on <addr>` (gRPC) on stdout once
/// ready.
pub async fn serve(cfg: Config) -> anyhow::Result<()> {
    let (listen, http) = (cfg.listen.clone(), cfg.http.clone());
    // Before anything starts: a bad certificate stops the service rather than a handshake.
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => Some(ServerTls::load(cert, key)?),
        _ => None,
    };
    let service = OrchestratorService::new(cfg).await?;
    service.start_health_checks().await;
    let http = crate::http::serve(&http, service.clone(), tls.as_ref().map(|t| t.http.clone()))
        .await
        .map_err(|e| anyhow::anyhow!("the HTTP API cannot listen on {http}: {e}"))?;
    println!("http on {http}");
    tracing::info!(listen, %http, tls = tls.is_some(), "orchestrator serving");
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls.grpc)?;
    }
    let requests = service.shared().metrics.grpc.clone();
    mm_kit::serve::serve_on(
        server,
        &listen,
        "orchestrator.v1.Orchestrator",
        tonic::service::Routes::new(service.into_server()),
        requests,
    )
    .await
    .map_err(|e| anyhow::anyhow!(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_stop_strings_and_long_fields_are_refused_naming_what_to_fix() {
        assert!(checked_id(&"a".repeat(32)).is_ok());
        let e = checked_id("").unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = checked_id(&"x".repeat(1 << 20)).unwrap_err();
        assert!(e.message().contains("longer than 128") && e.message().len() < 200);
        assert!(stop_strings(vec!["\n\n".into()]).is_ok());
        let e = stop_strings(vec!["a".into(); 5]).unwrap_err();
        assert!(e.message().contains("at most 4"), "{}", e.message());
        let e = stop_strings(vec![String::new()]).unwrap_err();
        assert!(
            e.message().contains("1 to 64 characters"),
            "{}",
            e.message()
        );
        let e = within("history[3].user", &"y".repeat(11), 10).unwrap_err();
        assert_eq!(e.message(), "history[3].user is longer than 10 characters");
    }
}
