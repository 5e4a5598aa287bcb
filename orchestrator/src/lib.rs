//! The orchestrator: sessions, store, replica pools, the turn pipeline and the client API
//! (DESIGN.md §6). It talks to the muse and the majordomo over gRPC only.

pub mod bench;
pub mod config;
pub mod pipeline;
pub mod replicas;
pub mod service;
pub mod store;
