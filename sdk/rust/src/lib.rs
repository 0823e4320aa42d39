//! The Rust SDK of Capibara: a typed client of the API (submit, get, wait, stream events,
//! cancel, retry, workflows and runs, schedules, kinds) and a [`Worker`] that runs your own job
//! kinds over the HTTP worker protocol (docs/workers.md), so a Rust team adds kinds without
//! forking Capibara.
//!
//! ```no_run
//! use capibara_sdk::{Client, JobContext, Worker};
//! use serde_json::json;
//!
//! # async fn demo() -> capibara_sdk::Result<()> {
//! let client = Client::from_env()?; // CAPIBARA_URL, CAPIBARA_API_KEY
//! Worker::builder(client)
//!     .concurrency(8)
//!     .handle("image.resize", |job: JobContext| async move {
//!         job.progress(50.0, "resizing").await?;
//!         Ok(json!({ "width": job.input["width"] }))
//!     })
//!     .run() // until SIGTERM or Ctrl-C
//!     .await
//! # }
//! ```
//!
//! # Layout
//!
//! - [`client`]: [`Client`], its calls, and the [`Submit`] / [`StartRun`] builders.
//! - [`types`]: what the API takes and returns ([`Job`], [`Event`], [`Run`], [`Schedule`], …).
//! - [`error`]: [`Error`] (problem JSON mapped to one variant per refusal) and
//!   [`HandlerError`] (how a handler steers retries).
//! - [`sse`]: the `text/event-stream` parser and the resumable event streams.
//! - [`lease`]: a leased job's raw protocol calls, each fenced by its token.
//! - [`worker`]: [`Worker`], [`JobContext`], and the lease / heartbeat / shutdown loop.
//! - `in_process` (feature `in-process`): the same handlers inside `capibara-worker`'s own
//!   runtime, straight on Postgres and Redis.
//! - `http` (private): the transport, with its timeouts and retries.

pub mod client;
pub mod error;
mod http;
#[cfg(feature = "in-process")]
pub mod in_process;
pub mod lease;
pub mod sse;
pub mod types;
pub mod worker;

pub use client::{Client, ClientBuilder, EventFilter, EventStream, JobQuery, StartRun, Submit};
pub use error::{Error, FieldError, HandlerError, Problem, Result};
#[cfg(feature = "in-process")]
pub use in_process::InProcess;
pub use lease::{Failure, Lease};
pub use types::{
    Backoff, CatchUp, Debounce, Dedup, Event, Heartbeat, Job, JobError, JobSpec, JobStatus, Kind,
    KindDecl, KindSpec, LogLevel, LogLine, Overlap, Page, Priority, Progress, Registration, Run,
    RunStatus, Schedule, ScheduleSpec, ScheduleTarget, Step, WorkerSpec, Workflow,
};
pub use worker::{JobContext, RunningWorker, StopReason, Worker, WorkerBuilder};

/// Re-exported: [`WorkerBuilder::shutdown_token`] takes one.
pub use tokio_util::sync::CancellationToken;
