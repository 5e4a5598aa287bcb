//! The muse: a language model that dreams in latent steps (ARCHITECTURE.md, "The dream").

pub mod convert;
pub mod dream;
mod inbox;
pub mod metrics;
pub mod render;
pub mod serve;
pub mod service;
pub mod session;
pub mod telemetry;
