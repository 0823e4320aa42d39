//! `capibara-scheduler`: housekeeping loops plus `/healthz`, `/readyz`, `/metrics`.

use std::sync::Arc;

use anyhow::Context;
use capibara_scheduler::housekeeping;
use capibara_shared::{config::Config, metric_catalog, ops, shutdown, store, telemetry};

fn main() -> anyhow::Result<()> {
    // Sized for a machine shared with Postgres and Redis (CAPIBARA_RUNTIME_THREADS).
    capibara_shared::runtime::run(run())
}

async fn run() -> anyhow::Result<()> {
    let config = Arc::new(Config::from_env()?);
    // Secrets are encrypted at rest: no key, no start (docs/security.md).
    capibara_shared::crypto::install_from_env()?;
    capibara_shared::installed::install(&config);
    telemetry::init_logs(config.log_format, "capibara-scheduler");
    telemetry::init_metrics(
        &[metric_catalog::Component::Scheduler],
        &metric_catalog::Labels::default(),
    );
    // Waits for Postgres and Redis (CAPIBARA_STARTUP_WAIT_S), migrates, checks the keys.
    let capibara_shared::startup::Backends { pool, queue } =
        capibara_shared::startup::connect(&config).await?;
    // Jobs are grouped by the limits they fall under when queued (docs/flow-control.md).
    capibara_shared::flow::spawn_refresher(queue.clone());
    let store = store::Store::new(
        pool.clone(),
        store::Appender::start(
            pool,
            Some(std::sync::Arc::new(queue.clone())),
            config.as_ref().into(),
        ),
    );
    // Rows under an old key, or plain text from before encryption, move to the current key
    // (batch-wise, replicas skip each other's rows; `capibara secrets rotate` runs the same pass).
    let reencrypt_pool = store.pool.clone();
    tokio::spawn(async move {
        let ring = capibara_shared::crypto::keyring().expect("installed at startup");
        match store::sealed::reencrypt(&reencrypt_pool, ring).await {
            Ok(done) => tracing::info!(
                rewritten = done.rewritten,
                remaining = done.remaining,
                key_id = ring.current_id(),
                "secrets re-encrypted under the current key"
            ),
            Err(e) => tracing::error!(error = %e, "re-encrypting secrets failed"),
        }
    });
    let listener = tokio::net::TcpListener::bind(config.scheduler_addr)
        .await
        .with_context(|| format!("binding {}", config.scheduler_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "capibara-scheduler listening");
    let stop = shutdown::token();
    let http_stop = stop.clone();
    let http_limits = config.http;
    let router = ops::router(ops::Readiness {
        store: store.clone(),
        queue: queue.clone(),
        components: Default::default(),
    })
    .merge(capibara_scheduler::hooks::router(
        capibara_scheduler::hooks::HookState::new(store.clone(), config.clone()),
    ));
    let http = tokio::spawn(async move {
        capibara_shared::http_server::serve(listener, router, http_limits, async move {
            http_stop.cancelled().await
        })
        .await
    });
    let ticker = tokio::spawn(capibara_scheduler::ticker::run(
        store.clone(),
        capibara_scheduler::ticker::Clock::from_env(),
        stop.clone(),
    ));
    let orchestrator = tokio::spawn(capibara_scheduler::orchestrator::run(
        store.clone(),
        queue.clone(),
        stop.clone(),
    ));
    let bulk = tokio::spawn(capibara_scheduler::bulk::run(
        store.clone(),
        queue.clone(),
        capibara_scheduler::bulk::BulkOptions {
            page_size: config.bulk_page_size,
            poll: std::time::Duration::from_millis(500),
        },
        stop.clone(),
    ));
    let deliverer = tokio::spawn(capibara_scheduler::deliverer::run(
        store.clone(),
        queue.clone(),
        capibara_scheduler::deliverer::DelivererOptions::new(&config),
        stop.clone(),
    ));
    let event_log = tokio::spawn(capibara_scheduler::event_log::run(
        store.pool.clone(),
        capibara_shared::artifacts::ArtifactStore::open(&config.artifacts)
            .map_err(|e| tracing::error!(error = %e, "event archive off: no artifact store"))
            .ok()
            .map(Arc::new),
        config.event_log.clone(),
        stop.clone(),
    ));
    housekeeping::run(
        store,
        queue,
        housekeeping::HousekeepingOptions {
            retention: config.retention,
            ..capibara_scheduler::housekeeping::HousekeepingOptions::new(config.visibility_timeout)
        },
        stop,
    )
    .await;
    let _ = bulk.await;
    let _ = event_log.await;
    let _ = deliverer.await;
    let _ = orchestrator.await;
    let _ = ticker.await;
    let _ = http.await;
    capibara_shared::trace_context::shutdown();
    Ok(())
}
