//! The orchestrator: sessions, store, replica pools, the turn pipeline and the client API
//! (ARCHITECTURE.md). It talks to the muse and the majordomo over gRPC only.
//!
//! A turn: [`turn`] runs [`attempt`]s (one muse session each) under the session's
//! [`policy`], each judged by the [`critic`], on replicas leased with [`failover`]; the muse
//! is primed with the [`history`] window. [`auth`] and [`tls`] guard the client API.

pub mod attempt;
pub mod auth;
pub mod bench;
pub mod ceiling;
pub mod config;
pub mod critic;
pub mod discovery;
pub mod failover;
pub mod history;
pub mod http;
pub mod local;
pub mod metrics;
pub mod policy;
pub mod render;
pub mod replicas;
pub mod service;
pub mod store;
pub mod tls;
pub mod turn;
