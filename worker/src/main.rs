//! `capibara-worker [--queues a,b] [--concurrency N] [--device cpu|cuda[:N]]`: runs jobs until
//! SIGTERM, then drains.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use capibara_shared::{config::Config, metric_catalog, ops, shutdown, store, telemetry};
use clap::Parser;

#[derive(Parser)]
#[command(name = "capibara-worker", version, about = "Runs Capibara jobs")]
struct Args {
    /// Queues to take jobs from, comma-separated.
    #[arg(
        long,
        env = "CAPIBARA_WORKER_QUEUES",
        value_delimiter = ',',
        default_value = "default,callbacks,code,tts,connector,models,finetune"
    )]
    queues: Vec<String>,
    /// Jobs run at once.
    #[arg(long, env = "CAPIBARA_WORKER_CONCURRENCY", default_value_t = 32)]
    concurrency: usize,
    /// Seconds in-flight jobs may finish after SIGTERM before they are given back.
    #[arg(long, env = "CAPIBARA_SHUTDOWN_GRACE_S", default_value_t = 25.0)]
    shutdown_grace_s: f64,
    /// Where the models compute: `cpu`, or `cuda` / `cuda:N` (a worker built with the `cuda`
    /// feature; docs/models.md, "GPU workers").
    #[arg(long, env = "CAPIBARA_DEVICE", default_value = "cpu")]
    device: capibara_worker::models::device::DeviceChoice,
}

fn main() -> anyhow::Result<()> {
    // Sized for a machine shared with Postgres and Redis (CAPIBARA_RUNTIME_THREADS).
    capibara_shared::runtime::run(run())
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = Arc::new(Config::from_env()?);
    // Secrets are encrypted at rest: no key, no start (docs/security.md).
    capibara_shared::crypto::install_from_env()?;
    // A step job's report plans its run with the orchestrator's planner, on the same limits.
    capibara_shared::installed::install(&config);
    telemetry::init_logs(config.log_format, "capibara-worker");
    // Before any model loads: every tensor of the models lives on this device.
    let device = capibara_worker::models::device::init(args.device).map_err(anyhow::Error::msg)?;
    tracing::info!(device = %args.device, cuda = device.is_cuda(), "models compute here");
    telemetry::init_metrics(
        &[metric_catalog::Component::Worker],
        &metric_catalog::Labels::worker(&args.queues),
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

    let listener = tokio::net::TcpListener::bind(config.worker_addr)
        .await
        .with_context(|| format!("binding {}", config.worker_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "worker health/metrics listening");
    let components = ops::Components::default();
    let ops = ops::router(ops::Readiness {
        store: store.clone(),
        queue: queue.clone(),
        components: components.clone(),
    });
    let stop = shutdown::token();
    let http_stop = stop.clone();
    let http_limits = config.http;
    tokio::spawn(async move {
        let _ = capibara_shared::http_server::serve(listener, ops, http_limits, async move {
            http_stop.cancelled().await
        })
        .await;
    });

    let opts = capibara_worker::WorkerOptions {
        queues: args.queues.clone(),
        concurrency: args.concurrency.max(1),
        lease: config.visibility_timeout,
        shutdown_grace: Duration::from_secs_f64(args.shutdown_grace_s.max(0.0)),
        id: None,
    };
    let registry = capibara_worker::registry(
        &store,
        &config,
        &capibara_worker::WarmUp {
            queues: args.queues.clone(),
            components,
        },
    );
    let result = capibara_worker::run(store, queue, registry, opts, stop).await;
    // Every attempt is recorded or given back by now. Dropping the runtime would wait for the
    // blocking threads still warming up (a voice model, a sandbox compile), which can take
    // longer than the shutdown grace: exit without them.
    if let Err(e) = &result {
        eprintln!("Error: {e:?}");
    }
    capibara_shared::trace_context::shutdown();
    std::process::exit(i32::from(result.is_err()));
}
