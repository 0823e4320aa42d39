//! `capibara-api`: telemetry → config → connect → serve until SIGTERM.

use std::sync::Arc;

use anyhow::Context;
use capibara_shared::{config::Config, metric_catalog, shutdown, store, telemetry};

fn main() -> anyhow::Result<()> {
    // Sized for a machine shared with Postgres and Redis (CAPIBARA_RUNTIME_THREADS).
    capibara_shared::runtime::run(run())
}

async fn run() -> anyhow::Result<()> {
    let config = Arc::new(Config::from_env()?);
    // Secrets are encrypted at rest: no key, no start (docs/security.md).
    capibara_shared::crypto::install_from_env()?;
    capibara_shared::installed::install(&config);
    telemetry::init_logs(config.log_format, "capibara-api");
    telemetry::init_metrics(
        &[metric_catalog::Component::Api],
        &metric_catalog::Labels::api(),
    );
    // Waits for Postgres and Redis (CAPIBARA_STARTUP_WAIT_S), migrates, checks the keys.
    let capibara_shared::startup::Backends { pool, queue } =
        capibara_shared::startup::connect(&config).await?;
    let appender = store::Appender::start(
        pool.clone(),
        Some(std::sync::Arc::new(queue.clone())),
        config.as_ref().into(),
    );
    // Jobs are grouped by the limits they fall under when queued (docs/flow-control.md).
    capibara_shared::flow::spawn_refresher(queue.clone());
    let state =
        capibara_api::AppState::new(store::Store::new(pool, appender), queue, config.clone());
    let listener = tokio::net::TcpListener::bind(config.api_addr)
        .await
        .with_context(|| format!("binding {}", config.api_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "capibara-api listening");
    capibara_api::serve(listener, state, shutdown::signal()).await?;
    capibara_shared::trace_context::shutdown();
    Ok(())
}
