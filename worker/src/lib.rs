//! Capibara's worker: the runtime that claims, runs and reports jobs, and the executors.
//!
//! # Layout
//! - [`runtime`]: fetch, claim (fenced), heartbeat, timeout, cancel, report, graceful shutdown.
//! - [`executors`]: the [`executors::Executor`] trait and one module per executor.
//! - [`delivery_port`]: the Postgres side of webhook deliveries.
//! - [`http`]: outbound HTTP with the SSRF guard.

pub mod delivery_port;
pub mod executors;
pub mod http;
pub mod runtime;

pub use runtime::{run, WorkerOptions};

use std::sync::Arc;

use capibara_shared::{config::Config, store::Store};

/// Every executor of this worker, configured from `config`.
pub fn registry(store: &Store, config: &Config) -> executors::Registry {
    executors::Registry::with_callbacks(executors::callback::CallbackDeliver {
        port: Arc::new(delivery_port::PgDeliveryPort {
            store: store.clone(),
            default_secret: config.webhook_secret.clone(),
        }),
        policy: http::OutboundPolicy {
            allow_private: config.outbound_allow_private,
            ..Default::default()
        },
        schedule: config.delivery_retry_schedule.clone(),
    })
}
