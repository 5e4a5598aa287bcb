//! Which critic answers: our own model, loaded in this process, or a remote OpenAI-compatible
//! server. The service speaks to either through this one type.

use crate::critique::Structure;
use crate::error::{MajordomoError, Result};
use crate::remote::RemoteMajordomo;
use crate::review::{CritiqueOutcome, CritiqueRequest, Majordomo};
use std::sync::Arc;

pub enum Backend {
    Local(Arc<Majordomo>),
    Remote(RemoteMajordomo),
}

/// What Info reports about the critic.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub model: String,
    pub architecture: String,
    /// 0 when unknown (a remote server does not say).
    pub context_length: u32,
    pub quantization: String,
}

fn worker(e: tokio::task::JoinError) -> MajordomoError {
    MajordomoError::Worker(e.to_string())
}

impl Backend {
    /// Rejects oversized or empty-where-required fields, naming the field.
    pub fn validate(&self, r: &CritiqueRequest) -> Result<()> {
        match self {
            Self::Local(md) => md.validate(r),
            Self::Remote(remote) => remote.limits.check(r),
        }
    }

    /// A critique of `req`. Our model decodes on a blocking thread (it is CPU-bound) and hands
    /// `on_text` its JSON as it is written; a remote critique is one HTTP exchange on the
    /// runtime and streams nothing: its answer arrives whole, in the outcome.
    pub async fn critique(
        &self,
        req: CritiqueRequest,
        on_text: impl FnMut(&str) + Send + 'static,
    ) -> Result<CritiqueOutcome> {
        match self {
            Self::Local(md) => {
                let md = md.clone();
                tokio::task::spawn_blocking(move || {
                    let outcome = md.critique(&req, on_text);
                    mm_kit::alloc::give_back();
                    outcome
                })
                .await
                .map_err(worker)?
            }
            Self::Remote(remote) => remote.critique(&req).await,
        }
    }

    /// A draft's structure: title, points, summary.
    pub async fn structure(&self, draft: String) -> Result<Structure> {
        match self {
            Self::Local(md) => {
                let md = md.clone();
                let (s, _) = tokio::task::spawn_blocking(move || md.structure(&draft, |_| {}))
                    .await
                    .map_err(worker)??;
                Ok(s)
            }
            Self::Remote(remote) => remote.structure(&draft).await,
        }
    }

    /// The critic's model. A remote critic is asked whether its server answers first: Info is
    /// the orchestrator's health check.
    pub async fn info(&self) -> Result<ModelInfo> {
        match self {
            Self::Local(md) => {
                let lm = md.model();
                Ok(ModelInfo {
                    model: lm.name.clone(),
                    architecture: lm.model.config().arch.name().into(),
                    context_length: lm.model.max_context() as u32,
                    quantization: lm.model.quantization().into(),
                })
            }
            Self::Remote(remote) => {
                remote.probe().await?;
                Ok(ModelInfo {
                    model: remote.model().into(),
                    architecture: "remote".into(),
                    context_length: 0,
                    quantization: String::new(),
                })
            }
        }
    }
}
