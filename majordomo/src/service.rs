//! The majordomo gRPC service (`majordomo.v1.Majordomo`).
//!
//! Requests run `workers` at a time (FIFO): on blocking threads with the local backend, as
//! HTTP calls with the remote one (`backend`). At most `queue_capacity` more wait. Beyond that
//! a request is answered RESOURCE_EXHAUSTED at once: the queue is bounded.

use crate::backend::Backend;
use crate::critique::{Critique, IssueKind, NoiseAdvice, StepsAdvice, Verdict};
use crate::error::MajordomoError;
use crate::metrics::MajordomoMetrics;
use crate::review::{CritiqueOutcome, CritiqueRequest, TelemetrySummary};
use mm_proto::majordomo::v1 as pb;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status};

#[derive(Clone)]
pub struct MajordomoService {
    backend: Arc<Backend>,
    metrics: Arc<MajordomoMetrics>,
    /// Permits for running and waiting requests together (workers + queue).
    admission: Arc<Semaphore>,
    workers: Arc<Semaphore>,
    n_workers: usize,
    queue_capacity: usize,
}

impl MajordomoService {
    pub fn new(
        backend: Arc<Backend>,
        workers: usize,
        queue_capacity: usize,
        metrics: Arc<MajordomoMetrics>,
    ) -> Self {
        let workers = workers.max(1);
        Self {
            backend,
            metrics,
            admission: Arc::new(Semaphore::new(workers + queue_capacity)),
            workers: Arc::new(Semaphore::new(workers)),
            n_workers: workers,
            queue_capacity,
        }
    }

    pub fn into_server(self) -> pb::majordomo_server::MajordomoServer<Self> {
        pb::majordomo_server::MajordomoServer::new(self).max_decoding_message_size(4 << 20)
    }

    fn admit(&self) -> Result<OwnedSemaphorePermit, Status> {
        self.admission.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "the majordomo is busy ({} running, {} queued): retry in a few seconds",
                self.n_workers, self.queue_capacity
            ))
        })
    }
}

/// The request's mistakes as INVALID_ARGUMENT / OUT_OF_RANGE, the server's faults as
/// INTERNAL / UNAVAILABLE (the orchestrator fails over on those).
pub fn status_of(e: &MajordomoError) -> Status {
    match e {
        MajordomoError::InvalidRequest(m) => Status::invalid_argument(m.clone()),
        MajordomoError::Lm(lm) => mm_kit::status::status_of(lm),
        MajordomoError::Remote(r) if r.is_unavailable() => Status::unavailable(e.to_string()),
        MajordomoError::Grammar(_) | MajordomoError::Remote(_) | MajordomoError::Worker(_) => {
            Status::internal(e.to_string())
        }
    }
}

fn issue_kind(k: IssueKind) -> pb::IssueKind {
    match k {
        IssueKind::Contradiction => pb::IssueKind::Contradiction,
        IssueKind::Drift => pb::IssueKind::Drift,
        IssueKind::Repetition => pb::IssueKind::Repetition,
        IssueKind::OffTopic => pb::IssueKind::OffTopic,
        IssueKind::LanguageSwitch => pb::IssueKind::LanguageSwitch,
        IssueKind::Format => pb::IssueKind::Format,
        IssueKind::Empty => pb::IssueKind::Empty,
        IssueKind::BrokenWords => pb::IssueKind::BrokenWords,
    }
}

fn utf8(field: &str, bytes: Vec<u8>) -> Result<String, Status> {
    String::from_utf8(bytes).map_err(|e| {
        Status::invalid_argument(format!(
            "{field} is not valid UTF-8 (invalid byte at offset {}): send UTF-8 text",
            e.utf8_error().valid_up_to()
        ))
    })
}

pub fn to_pb(c: &Critique) -> pb::Critique {
    pb::Critique {
        verdict: match c.verdict {
            Verdict::Accept => pb::Verdict::Accept,
            Verdict::Revise => pb::Verdict::Revise,
            Verdict::Reject => pb::Verdict::Reject,
        } as i32,
        coherence: c.coherence as u32,
        novelty: c.novelty as u32,
        issues: c
            .issues
            .iter()
            .map(|i| pb::Issue {
                kind: issue_kind(i.kind) as i32,
                detail: i.detail.clone(),
            })
            .collect(),
        advice: Some(pb::Advice {
            noise: match c.advice.noise {
                NoiseAdvice::Lower => pb::NoiseAdvice::Lower,
                NoiseAdvice::Keep => pb::NoiseAdvice::Keep,
                NoiseAdvice::Raise => pb::NoiseAdvice::Raise,
            } as i32,
            steps: match c.advice.steps {
                StepsAdvice::Fewer => pb::StepsAdvice::Fewer,
                StepsAdvice::Keep => pb::StepsAdvice::Keep,
                StepsAdvice::More => pb::StepsAdvice::More,
            } as i32,
        }),
    }
}

/// The stream's last event: the critique, the checks' figures and, from our own model, the
/// draft's NLL (a remote critic leaves `nll` unset).
fn result_event(out: &CritiqueOutcome) -> pb::CritiqueEvent {
    pb::CritiqueEvent {
        event: Some(pb::critique_event::Event::Result(pb::CritiqueResult {
            critique: Some(to_pb(&out.critique)),
            json: serde_json::to_string(&out.critique).unwrap_or_default(),
            stats: Some(pb::DraftStats {
                chars: out.stats.chars as u32,
                words: out.stats.words as u32,
                distinct_1: out.stats.distinct_1,
                distinct_2: out.stats.distinct_2,
                distinct_3: out.stats.distinct_3,
                longest_repeat: out.stats.longest_repeat as u32,
                broken_word_rate: out.stats.broken_word_rate,
                max_line_repeats: out.stats.max_line_repeats as u32,
            }),
            decode: Some(pb::DecodeStats {
                tokens: out.decode.tokens as u32,
                forced: out.decode.forced as u32,
                millis: out.decode.total_time.as_secs_f64() * 1e3,
                mask_micros_per_token: out.decode.mask_micros_per_token(),
                prompt_tokens: out.decode.prompt_tokens as u32,
                cached_prompt_tokens: out.decode.cached_prompt_tokens as u32,
            }),
            findings: out.findings.iter().map(|k| issue_kind(*k) as i32).collect(),
            nll: out.nll.map(|n| n.mean),
            nll_tokens: out.nll.map_or(0, |n| n.tokens as u32),
        })),
    }
}

type CritiqueStream = Pin<Box<dyn Stream<Item = Result<pb::CritiqueEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::majordomo_server::Majordomo for MajordomoService {
    type CritiqueStream = CritiqueStream;

    async fn critique(
        &self,
        request: Request<pb::CritiqueRequest>,
    ) -> Result<Response<Self::CritiqueStream>, Status> {
        let r = request.into_inner();
        let req = CritiqueRequest {
            request: r.request,
            conversation: r
                .conversation
                .into_iter()
                .map(|m| lm::ChatMessage::new(m.role, m.content))
                .collect(),
            draft: utf8("draft", r.draft)?,
            telemetry: r.telemetry.map(|t| TelemetrySummary {
                bursts: t.bursts,
                latent_steps: t.latent_steps,
                mean_entropy: t.mean_entropy,
                stop_reasons: t.stop_reasons,
            }),
        };
        self.backend.validate(&req).map_err(|e| status_of(&e))?;
        let admitted = self.admit()?;
        let (tx, rx) = mpsc::channel(64);
        let backend = self.backend.clone();
        let workers = self.workers.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let _admitted = admitted;
            metrics.queued.inc();
            let worker = workers.acquire_owned().await;
            metrics.queued.dec();
            let Ok(_worker) = worker else {
                return;
            };
            let started = std::time::Instant::now();
            let tokens = tx.clone();
            // Called on the local backend's blocking thread, where waiting for room in the
            // channel is the back-pressure of a slow reader.
            let on_text = move |t: &str| {
                let _ = tokens.blocking_send(Ok(pb::CritiqueEvent {
                    event: Some(pb::critique_event::Event::Token(t.to_string())),
                }));
            };
            let last = match backend.critique(req, on_text).await {
                Ok(out) => {
                    metrics.critique(out.critique.verdict, started.elapsed().as_secs_f64());
                    Ok(result_event(&out))
                }
                Err(e) => Err(status_of(&e)),
            };
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn structure(
        &self,
        request: Request<pb::StructureRequest>,
    ) -> Result<Response<pb::StructureResponse>, Status> {
        let draft = utf8("draft", request.into_inner().draft)?;
        let _admitted = self.admit()?;
        self.metrics.queued.inc();
        let worker = self.workers.clone().acquire_owned().await;
        self.metrics.queued.dec();
        let _worker = worker.map_err(|_| Status::unavailable("shutting down"))?;
        let s = self
            .backend
            .structure(draft)
            .await
            .map_err(|e| status_of(&e))?;
        self.metrics.structure();
        Ok(Response::new(pb::StructureResponse {
            title: s.title,
            points: s.points,
            summary: s.summary,
        }))
    }

    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let m = self.backend.info().await.map_err(|e| status_of(&e))?;
        Ok(Response::new(pb::InfoResponse {
            model: m.model,
            architecture: m.architecture,
            context_length: m.context_length,
            quantization: m.quantization,
            workers: self.n_workers as u32,
            queue_capacity: self.queue_capacity as u32,
        }))
    }
}
