//! The muse gRPC service (`muse.v1.Muse`): one bidirectional stream per dreaming session.
//!
//! Each session runs on its own blocking thread (model work is CPU-bound) and owns its KV
//! cache; the model is shared, and so is the prefix cache of recent prompts' KV
//! ([`crate::prefix`]). Admission: at most `max_sessions` streams and `kv_memory_bytes`
//! of KV cache in total; model compute is granted per command through a fair (FIFO) semaphore
//! so one busy session cannot starve the others.

use crate::convert;
use crate::dream::DreamParams;
use crate::inbox;
use crate::metrics::MuseMetrics;
use crate::session::{DreamSession, PRIMED};
use lm::LoadedModel;
use lm::PrefixCache;
use mm_kit::status::status_of;
use mm_proto::muse::v1 as pb;
use pb::muse_server::Muse;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status, Streaming};

/// Limits of one muse process.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_sessions: usize,
    /// Bytes of KV cache all sessions together may hold.
    pub kv_memory_bytes: usize,
    /// Bytes of recent prompts' KV kept for later primes to start from, beside
    /// `kv_memory_bytes`; 0 keeps none.
    pub prefix_cache_bytes: usize,
    /// Commands that may run model work at once (1 on a small CPU box).
    pub compute_slots: usize,
    /// A session that sends no command for this long is closed (its slot and KV freed).
    pub idle_timeout: std::time::Duration,
    /// When every slot is taken, the session idle longest is closed to admit a new one if it
    /// has been idle this long.
    pub evict_idle: std::time::Duration,
}

/// What a session shows through `SessionStatus`, updated after every command.
#[derive(Debug, Default)]
struct Status_ {
    position: usize,
    kv_bytes: usize,
    checkpoints: Vec<String>,
    /// Since when the session has waited for a command; `None` while one runs.
    idle_since: Option<Instant>,
    /// Wakes the session's loop to close it: evicted to admit another.
    evict: Arc<Notify>,
}

struct Shared {
    lm: Arc<LoadedModel>,
    limits: Limits,
    sessions: Mutex<HashMap<String, Status_>>,
    prefixes: PrefixCache,
    compute: Arc<Semaphore>,
    metrics: Arc<MuseMetrics>,
}

impl Shared {
    /// Closes the session idle longest, if idle at least `evict_idle`: a full muse then admits
    /// new work instead of refusing it while forgotten streams hold every slot.
    fn evict_longest_idle(&self, sessions: &mut HashMap<String, Status_>) {
        let now = Instant::now();
        let longest = sessions
            .iter()
            .filter_map(|(id, s)| Some((now - s.idle_since?, id)))
            .filter(|(idle, _)| *idle >= self.limits.evict_idle)
            .max_by_key(|(idle, _)| *idle)
            .map(|(_, id)| id.clone());
        if let Some(s) = longest.and_then(|id| sessions.remove(&id)) {
            s.evict.notify_one();
            self.metrics.sessions_evicted.inc();
        }
    }

    fn kv_in_use_except(&self, id: &str) -> usize {
        self.sessions
            .lock()
            .expect("sessions lock")
            .iter()
            .filter(|(k, _)| k.as_str() != id)
            .map(|(_, s)| s.kv_bytes)
            .sum()
    }
}

#[derive(Clone)]
pub struct MuseService {
    shared: Arc<Shared>,
}

impl MuseService {
    pub fn new(lm: Arc<LoadedModel>, limits: Limits, metrics: Arc<MuseMetrics>) -> Self {
        let compute = Arc::new(Semaphore::new(limits.compute_slots.max(1)));
        let shared = Shared {
            lm,
            prefixes: PrefixCache::new(limits.prefix_cache_bytes),
            limits,
            sessions: Mutex::new(HashMap::new()),
            compute,
            metrics,
        };
        Self {
            shared: Arc::new(shared),
        }
    }

    pub fn into_server(self) -> pb::muse_server::MuseServer<Self> {
        pb::muse_server::MuseServer::new(self)
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::ServerEvent, Status>> + Send>>;

fn event(request_id: u64, e: pb::server_event::Event) -> pb::ServerEvent {
    pb::ServerEvent {
        request_id,
        event: Some(e),
    }
}

pub(crate) fn error_event(request_id: u64, s: &Status) -> pb::ServerEvent {
    event(
        request_id,
        pb::server_event::Event::Error(pb::Error {
            code: s.code() as i32,
            message: s.message().to_string(),
        }),
    )
}

#[tonic::async_trait]
impl Muse for MuseService {
    type SessionStream = EventStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::ClientCommand>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let shared = self.shared.clone();
        let (id, evict) = {
            let mut sessions = shared.sessions.lock().expect("sessions lock");
            if sessions.len() >= shared.limits.max_sessions {
                shared.evict_longest_idle(&mut sessions);
            }
            if sessions.len() >= shared.limits.max_sessions {
                return Err(Status::resource_exhausted(format!(
                    "the muse is serving {} sessions (max_sessions = {}): retry later, or raise max_sessions",
                    sessions.len(),
                    shared.limits.max_sessions
                )));
            }
            let id = mm_kit::ids::random_id();
            let evict = Arc::new(Notify::new());
            sessions.insert(
                id.clone(),
                Status_ {
                    evict: evict.clone(),
                    ..Default::default()
                },
            );
            shared.metrics.sessions.set(sessions.len() as i64);
            (id, evict)
        };
        let (out_tx, out_rx) = mpsc::channel::<Result<pb::ServerEvent, Status>>(64);
        let cmd_rx = inbox::spawn_reader(request.into_inner(), out_tx.clone());
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let _ = out_tx.blocking_send(Ok(event(
                0,
                pb::server_event::Event::Started(pb::SessionStarted {
                    session_id: id.clone(),
                }),
            )));
            run_session(&shared, &id, &evict, cmd_rx, &out_tx, &runtime);
            // Frees the KV cache (dropped with the session) and the slot.
            let mut sessions = shared.sessions.lock().expect("sessions lock");
            sessions.remove(&id);
            shared.metrics.sessions.set(sessions.len() as i64);
            drop(sessions);
            mm_kit::alloc::give_back();
            tracing::debug!(session = id, "session ended");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }

    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let lm = &self.shared.lm;
        let c = lm.model.config();
        Ok(Response::new(pb::InfoResponse {
            model: lm.name.clone(),
            architecture: c.arch.name().into(),
            context_length: lm.model.max_context() as u32,
            hidden_size: c.hidden as u32,
            vocab_size: c.vocab as u32,
            quantization: lm.model.quantization().into(),
            max_steps: crate::dream::MAX_STEPS as u32,
            max_sessions: self.shared.limits.max_sessions as u32,
            active_sessions: self.shared.sessions.lock().expect("sessions lock").len() as u32,
            layers: c.layers as u32,
        }))
    }

    async fn session_status(
        &self,
        request: Request<pb::SessionStatusRequest>,
    ) -> Result<Response<pb::SessionStatusResponse>, Status> {
        let id = request.into_inner().session_id;
        let sessions = self.shared.sessions.lock().expect("sessions lock");
        let s = sessions.get(&id).ok_or_else(|| {
            Status::not_found(format!(
                "unknown session `{}`: it was closed or never existed",
                mm_kit::text::clip(&id, 40)
            ))
        })?;
        Ok(Response::new(pb::SessionStatusResponse {
            position: s.position as u32,
            kv_bytes: s.kv_bytes as u64,
            checkpoints: s.checkpoints.clone(),
        }))
    }
}

/// Marks the session busy (`None`) or idle since a moment, for eviction.
fn set_idle(shared: &Shared, id: &str, since: Option<Instant>) {
    if let Some(st) = shared.sessions.lock().expect("sessions lock").get_mut(id) {
        st.idle_since = since;
    }
}

/// Runs commands until Close, the client's stream ends, or the client stops listening.
fn run_session(
    shared: &Shared,
    id: &str,
    evict: &Notify,
    mut commands: mpsc::Receiver<inbox::Queued>,
    out: &mpsc::Sender<Result<pb::ServerEvent, Status>>,
    runtime: &tokio::runtime::Handle,
) {
    let lm: &LoadedModel = &shared.lm;
    let mut session = DreamSession::new(lm);
    let idle = shared.limits.idle_timeout;
    loop {
        set_idle(shared, id, Some(Instant::now()));
        let waited = runtime.block_on(async {
            tokio::select! {
                q = tokio::time::timeout(idle, commands.recv()) => Some(q),
                () = evict.notified() => None,
            }
        });
        let Some(queued) = waited else {
            let s = Status::resource_exhausted(format!(
                "the muse was full and this session had been idle longest (over {} s, \
                 evict_idle_s): it was closed to admit another; open a new session",
                shared.limits.evict_idle.as_secs()
            ));
            let _ = out.blocking_send(Ok(error_event(0, &s)));
            return;
        };
        set_idle(shared, id, None);
        // Why the session ends, when it ends on the server's side: told in a last event.
        let ended = match queued.map(|q| q.map(|q| q.command)) {
            Ok(Some(Ok(c))) => Ok(c),
            Ok(None) => return, // the client closed its stream
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no command for {} s: the session is closed (idle_timeout_s)",
                idle.as_secs()
            ))),
            // A frame that does not decode, or a broken stream.
            Ok(Some(Err(e))) => Err(Status::invalid_argument(format!(
                "a command could not be read ({:?}): the session is closed",
                e.code()
            ))),
        };
        let cmd = match ended {
            Ok(c) => c,
            Err(s) => {
                let _ = out.blocking_send(Ok(error_event(0, &s)));
                return;
            }
        };
        let rid = cmd.request_id;
        let Some(command) = cmd.command else {
            let s = Status::invalid_argument(
                "command is empty: set one of prime, burst, commit, checkpoint, rewind, close",
            );
            if out.blocking_send(Ok(error_event(rid, &s))).is_err() {
                return;
            }
            continue;
        };
        if let pb::client_command::Command::Close(_) = command {
            let _ = out.blocking_send(Ok(event(
                rid,
                pb::server_event::Event::Closed(pb::Closed {}),
            )));
            return;
        }
        let result = {
            // Fair FIFO access to the model; released when the command is done.
            let _permit = runtime
                .block_on(shared.compute.acquire())
                .expect("semaphore open");
            execute(shared, id, &mut session, rid, command, out)
        };
        // Status first, so a client that saw the final event sees the new state.
        {
            let mut sessions = shared.sessions.lock().expect("sessions lock");
            if let Some(st) = sessions.get_mut(id) {
                st.position = session.len();
                st.kv_bytes = session.cache().memory_bytes();
                st.checkpoints = session.checkpoint_names();
            }
        }
        let last = match result {
            Ok(e) => event(rid, e),
            Err(s) => error_event(rid, &s),
        };
        if out.blocking_send(Ok(last)).is_err() {
            return; // the client went away
        }
    }
}

/// Runs one command, streaming its intermediate events; returns the final one.
fn execute<'m>(
    shared: &'m Shared,
    id: &str,
    session: &mut DreamSession<'m>,
    rid: u64,
    command: pb::client_command::Command,
    out: &mpsc::Sender<Result<pb::ServerEvent, Status>>,
) -> Result<pb::server_event::Event, Status> {
    use pb::client_command::Command as C;
    use pb::server_event::Event as E;
    let send = |e: E| out.blocking_send(Ok(event(rid, e))).is_ok();
    let check_memory = |session: &DreamSession, more: usize| -> Result<(), Status> {
        let needed = session.cache().bytes_for(session.len() + more);
        let others = shared.kv_in_use_except(id);
        if others + needed > shared.limits.kv_memory_bytes {
            return Err(Status::resource_exhausted(format!(
                "KV memory bound reached ({} of {} bytes in use): close idle sessions or raise kv_memory_mb",
                others + session.cache().memory_bytes(),
                shared.limits.kv_memory_bytes
            )));
        }
        Ok(())
    };
    match command {
        C::Prime(p) => {
            let prime = convert::prime(&p)?;
            let estimate = convert::prime_len_hint(&prime);
            check_memory(&DreamSession::new(session.model()), estimate)?;
            let primed = session
                .prime_with(&prime, Some(&shared.prefixes))
                .map_err(|e| status_of(&e))?;
            shared.metrics.primed(&primed, &shared.prefixes);
            Ok(E::Primed(pb::Primed {
                prompt_tokens: primed.prompt_tokens as u32,
                position: session.len() as u32,
                cached_tokens: primed.cached_tokens as u32,
            }))
        }
        C::Burst(b) => {
            let params = DreamParams::try_from(&b)?;
            check_memory(session, params.steps)?;
            let summary = session
                .burst(&params, |step| {
                    send(E::LatentStep(convert::latent_step(step)))
                })
                .map_err(|e| status_of(&e))?;
            shared.metrics.burst(&summary);
            Ok(E::BurstDone(pb::BurstDone {
                steps: summary.steps as u32,
                stop: pb::BurstStop::from(summary.stop) as i32,
                millis: summary.millis,
                mean_entropy: summary.mean_entropy,
                position: session.len() as u32,
            }))
        }
        C::Commit(c) => {
            let params = convert::commit(&c, session.model().model.max_context())?;
            check_memory(session, params.decode.max_tokens + lm::WORD_TAIL)?;
            let gone = || out.is_closed();
            let summary = session
                .commit_until(
                    &params,
                    |text| {
                        send(E::Token(pb::Token {
                            text: text.to_string(),
                        }));
                    },
                    &gone,
                )
                .map_err(|e| {
                    if matches!(e, lm::LmError::Cancelled) {
                        shared.metrics.commits_cancelled.inc();
                    }
                    status_of(&e)
                })?;
            shared.metrics.commit(&summary);
            Ok(E::CommitDone(pb::CommitDone {
                tokens: summary.tokens,
                text: summary.text,
                stop: convert::commit_stop(summary.stop) as i32,
                millis: summary.millis,
                tokens_per_s: summary.tokens_per_s,
                position: session.len() as u32,
                proposed: summary.proposed as u32,
                accepted: summary.accepted as u32,
                rendered: summary.rendered,
                fork_entropy: summary.fork_entropy.unwrap_or(0.0),
            }))
        }
        C::Checkpoint(c) => {
            session.checkpoint(&c.name).map_err(|e| status_of(&e))?;
            Ok(E::CheckpointSet(pb::CheckpointSet {
                name: c.name,
                position: session.len() as u32,
            }))
        }
        C::Rewind(r) => {
            let name = if r.checkpoint.is_empty() {
                PRIMED.to_string()
            } else {
                r.checkpoint
            };
            let pos = session.rewind(&name).map_err(|e| status_of(&e))?;
            Ok(E::Rewound(pb::Rewound {
                checkpoint: name,
                position: pos as u32,
            }))
        }
        C::Close(_) => unreachable!("handled by the session loop"),
    }
}
