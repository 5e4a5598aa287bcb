//! The majordomo: a sober token-space model that critiques and structures the muse's drafts as
//! schema-valid JSON (ARCHITECTURE.md).

pub mod bench;
pub mod checks;
pub mod constrained;
pub mod critique;
pub mod error;
pub mod review;
pub mod serve;
pub mod service;
