//! The muse: a language model that dreams in latent steps (DESIGN.md §4).

pub mod convert;
pub mod dream;
pub mod serve;
pub mod service;
pub mod session;
pub mod telemetry;
