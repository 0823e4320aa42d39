//! Domain types: pure data and rules, free of SQL, HTTP and Redis.
//!
//! # Layout
//! - [`bulk`]: bulk actions on jobs (an operation stream pinned to a log position).
//! - [`job`]: the job model, its event catalog and the fold that turns events into the `jobs` row.
//! - [`connector`]: connectors, their types and the `connector` stream.
//! - [`content`]: `content.process`'s input (items or an artifact, operations) and output.
//! - [`kinds`]: the job kinds Capibara knows, their default queues and input validation.
//! - [`model`]: the model registry: a `model` stream per model name, its versions.
//! - [`event`]: stream types and the event envelope clients see.
//! - [`orchestrate`]: `/v1/orchestrate`'s modes, routes and dangerous intents.
//! - [`retry`]: backoff policy.
//! - [`problem`]: field-level validation errors.
//! - [`auth`]: roles of an API key.
//! - [`delivery`], [`subscription`]: webhook deliveries and event subscriptions.
//! - [`webhook`]: Standard Webhooks secrets, signing and verification.
//! - [`workflow`], [`run`]: workflow definitions, runs and the planner that advances them.
//! - [`schedule`], [`cron_expr`]: cron schedules and the crontab dialect of their expressions.
//! - [`template`]: minijinja templates over JSON (trigger inputs, workflow steps).
//! - [`storable`]: values Postgres refuses (NUL characters, times outside 0001–9999).

pub mod auth;
pub mod bulk;
pub mod connector;
pub mod content;
pub mod cron_expr;
pub mod delivery;
pub mod event;
pub mod job;
pub mod kinds;
pub mod limit;
pub mod llm;
pub mod model;
pub mod orchestrate;
pub mod problem;
pub mod retry;
pub mod run;
pub mod schedule;
pub mod storable;
pub mod subscription;
pub mod template;
pub mod trigger;
pub mod webhook;
pub mod workflow;

#[cfg(test)]
mod fuzz;

pub use event::DomainEvent;
pub use problem::FieldError;

/// Whether `name` can name a namespace secret (`PUT /v1/secrets/{name}`): 1-128 letters,
/// digits, '_' or '-'.
pub fn secret_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Current time truncated to microseconds, the precision Postgres stores.
///
/// Every timestamp that ends up in an event and in a projection goes through here, so a projection
/// rebuilt from the log compares equal to the one written inline.
pub fn now() -> chrono::DateTime<chrono::Utc> {
    truncate_micros(chrono::Utc::now())
}

/// Drop sub-microsecond precision (Postgres keeps microseconds).
pub fn truncate_micros(t: chrono::DateTime<chrono::Utc>) -> chrono::DateTime<chrono::Utc> {
    use chrono::SubsecRound;
    t.trunc_subsecs(6)
}
