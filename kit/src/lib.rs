//! `mm-kit`: what the three services share, written once.
//!
//! - [`config`]: layered configuration (serde defaults, TOML file, `PREFIX_*` environment, flags);
//! - [`serve`]: a service's routes with gRPC health and reflection on a bound listener;
//! - [`metrics`]: Prometheus metrics: gRPC requests by code, `GET /metrics`;
//! - [`peers`]: the Python the end-to-end tests run their peers with;
//! - [`ids`]: unguessable identifiers for sessions;
//! - [`trace`]: logging to stderr, filtered by `RUST_LOG`;
//! - with the `model` feature (muse, majordomo): [`model`], the model flags and loading (fetching
//!   a missing default model), and [`status`], the runtime's errors as gRPC statuses.

pub mod alloc;
pub mod config;
pub mod ids;
pub mod metrics;
#[cfg(feature = "model")]
pub mod model;
pub mod peers;
pub mod serve;
#[cfg(feature = "model")]
pub mod status;
pub mod text;
pub mod trace;
