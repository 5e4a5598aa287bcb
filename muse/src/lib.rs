//! The muse: a language model that dreams in latent steps (DESIGN.md §4).

pub mod dream;
pub mod session;
pub mod telemetry;
