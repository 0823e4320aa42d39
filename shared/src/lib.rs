//! Capibara's shared crate: domain types, the Postgres event store, the Redis dispatch queue,
//! configuration and telemetry used by every binary.
//!
//! # Layout
//! - [`domain`]: pure types and rules (jobs, events, kinds, retries, roles). No SQL, HTTP or Redis.
//! - [`store`]: the event store, projections and operational tables in Postgres.
//! - [`queue`]: the Redis dispatch structure.
//! - [`hints`]: cross-process wake-ups for stream readers.
//! - [`installed`]: what this deployment has installed (voices), for kinds' input checks.
//! - [`outbound`]: SSRF guard for URLs Capibara calls out to.
//! - [`artifacts`]: files jobs produce, in a local directory or an S3-compatible bucket.
//! - [`http_server`]: the bounded accept loop every HTTP listener serves through.
//! - [`config`], [`telemetry`], [`metric_catalog`], [`ops`], [`shutdown`]: process plumbing.

pub mod artifacts;
pub mod backlog;
pub mod command;
pub mod config;
pub mod crypto;
pub mod domain;
pub mod flow;
pub mod hints;
pub mod http_hosts;
pub mod http_server;
pub mod installed;
pub mod metric_catalog;
pub mod ops;
pub mod outbound;
pub mod problem;
pub mod queue;
pub mod redis_conn;
pub mod runtime;
pub mod shutdown;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod trace_context;

/// Version of this build, reported by workers and `/healthz`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
