//! The majordomo: a sober token-space model that critiques and structures the muse's drafts as
//! schema-valid JSON (ARCHITECTURE.md); or, as the `openai` backend, any OpenAI-compatible
//! server held to the same schema and checks (`remote`).

pub mod backend;
pub mod bench;
pub mod checks;
pub mod constrained;
pub mod critique;
pub mod error;
pub mod metrics;
pub mod remote;
pub mod review;
pub mod serve;
pub mod service;
