//! Capibara's scheduler: owns time and housekeeping (promotion of delayed jobs, the dispatch
//! relay, the lease reaper). Cron schedules and inbound triggers build on this.
//!
//! # Layout
//! - [`housekeeping`]: promoter, relay, reaper and queue gauges.
//! - [`bulk`]: runs bulk actions on jobs, a page per transaction.
//! - [`hooks`]: `POST /hooks/{id}`, inbound webhook triggers.
//! - [`ticker`]: fires cron schedules, exactly once across replicas.
//! - [`deliverer`]: turns job events into webhook deliveries (callbacks, subscriptions).
//! - [`orchestrator`]: advances workflow runs as their step jobs start and end.
//! - [`leader`]: one leader per role among replicas (advisory lock).

pub mod bulk;
pub mod deliverer;
mod driver;
pub mod event_log;
mod flow;
pub mod hooks;
pub mod housekeeping;
pub mod leader;
pub mod orchestrator;
pub mod ticker;
