//! Capibara's worker: the runtime that claims, runs and reports jobs, and the executors.
//!
//! # Layout
//! - [`runtime`]: fetch, claim (fenced), heartbeat, timeout, cancel, report, graceful shutdown.
//! - [`executors`]: the [`executors::Executor`] trait and one module per executor.
//! - [`http`]: safe outbound HTTP (SSRF guard, pinned DNS, no redirects, capped response).

pub mod executors;
pub mod http;
pub mod runtime;

pub use runtime::{run, WorkerOptions};
