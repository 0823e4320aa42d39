//! `capibara dev`: everything on one machine, in one process.
//!
//! Starts Postgres and Redis under the data directory (reusing them when already running),
//! applies migrations, creates a demo admin key (kept across runs), then runs the API, a worker
//! for every queue and the scheduler's housekeeping until Ctrl-C.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use capibara_dev_services::{PostgresOptions, PostgresServer, RedisOptions, RedisServer};
use capibara_shared::{
    config::{Config, LogFormat},
    domain::{auth::Role, kinds},
    metric_catalog, ops, shutdown, store, telemetry,
};
use clap::Args;

#[derive(Args)]
pub struct DevArgs {
    /// Where Postgres and Redis keep their data.
    #[arg(long, env = "CAPIBARA_DATA_DIR", default_value = ".capibara")]
    data_dir: PathBuf,
    /// Port of the local Postgres.
    #[arg(long, default_value_t = 54329)]
    pg_port: u16,
    /// Port of the local Redis.
    #[arg(long, default_value_t = 63799)]
    redis_port: u16,
    /// Worker concurrency.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let mut config = Config::from_env()?;
    if std::env::var("CAPIBARA_LOG_FORMAT").is_err() {
        config.log_format = LogFormat::Pretty;
    }
    telemetry::init_logs(config.log_format, "capibara");
    telemetry::metrics_handle();
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;

    // Local servers, unless the environment points elsewhere.
    let mut _pg = None;
    if std::env::var("CAPIBARA_DATABASE_URL").is_err() {
        let dir = args.data_dir.join("postgres").join("data");
        let port = args.pg_port;
        let pg = tokio::task::spawn_blocking(move || {
            let pg = PostgresServer::start(PostgresOptions {
                data_dir: dir,
                port,
                fast_unsafe: false,
            })?;
            pg.ensure_database("capibara")?;
            anyhow::Ok(pg)
        })
        .await??;
        config.database_url = pg.url("capibara");
        _pg = Some(pg);
    }
    let mut _redis = None;
    if std::env::var("CAPIBARA_REDIS_URL").is_err() {
        let dir = args.data_dir.join("redis");
        let port = args.redis_port;
        let redis = tokio::task::spawn_blocking(move || {
            RedisServer::start(RedisOptions {
                dir,
                port,
                persist: true,
            })
        })
        .await??;
        config.redis_url = redis.url();
        _redis = Some(redis);
    }
    config.outbound_allow_private = true;
    if config.webhook_secret.is_none() {
        let file = args.data_dir.join("webhook-secret");
        let secret = match std::fs::read_to_string(&file) {
            Ok(s) if s.trim().starts_with("whsec_") => s.trim().to_string(),
            _ => {
                let (_, s) = capibara_shared::domain::webhook::WebhookSecret::generate();
                std::fs::write(&file, &s).with_context(|| format!("writing {}", file.display()))?;
                s
            }
        };
        config.webhook_secret = Some(secret);
    }
    // Secrets are encrypted at rest; with no key configured, one generated once into the data
    // directory (mode 0600) and reused, so `capibara dev` needs no setup.
    let keyring = match capibara_shared::crypto::Keyring::from_env()? {
        Some(k) => k,
        None => {
            let file = args.data_dir.join("secrets.key");
            let text = match std::fs::read_to_string(&file) {
                Ok(t) if !t.trim().is_empty() => t,
                _ => {
                    let t = capibara_shared::crypto::generate_key();
                    write_private(&file, &t)?;
                    t
                }
            };
            let key = capibara_shared::crypto::Key::parse(&text)
                .map_err(|m| anyhow::anyhow!("{}: {m}", file.display()))?;
            capibara_shared::crypto::Keyring::new(key, Vec::new())
        }
    };
    capibara_shared::crypto::install(keyring);
    let config = Arc::new(config);
    capibara_shared::installed::install(&config);

    let capibara_shared::startup::Backends { pool, queue } =
        capibara_shared::startup::connect(&config).await?;
    let ring = capibara_shared::crypto::keyring()?;
    store::sealed::reencrypt(&pool, ring).await?;
    // Jobs are grouped by the limits they fall under when queued (docs/flow-control.md).
    capibara_shared::flow::spawn_refresher(queue.clone());
    let store = store::Store::new(
        pool.clone(),
        store::Appender::start(
            pool.clone(),
            Some(std::sync::Arc::new(queue.clone())),
            config.as_ref().into(),
        ),
    );

    let key_file = args.data_dir.join("demo-key");
    let demo_key = match std::fs::read_to_string(&key_file) {
        Ok(k) if !k.trim().is_empty() => k.trim().to_string(),
        _ => {
            let k = store::keys::new_secret();
            std::fs::write(&key_file, &k)
                .with_context(|| format!("writing {}", key_file.display()))?;
            k
        }
    };
    // A super-admin, so the demo can create keys for other namespaces.
    store::keys::insert(
        &pool,
        store::keys::NewKey {
            namespace: "default",
            name: "demo (capibara dev)",
            roles: &[Role::Admin],
            super_admin: true,
        },
        &demo_key,
    )
    .await?;

    let stop = shutdown::token();
    let api_listener = tokio::net::TcpListener::bind(config.api_addr)
        .await
        .with_context(|| format!("binding {} (set CAPIBARA_API_ADDR)", config.api_addr))?;
    let api_addr = api_listener.local_addr()?;
    let state = capibara_api::AppState::new(store.clone(), queue.clone(), config.clone());
    let api_stop = stop.clone();
    let api = tokio::spawn(capibara_api::serve(api_listener, state, async move {
        api_stop.cancelled().await
    }));

    // The worker's background-loaded parts (its TTS voice) are reported on its address.
    let worker_components = ops::Components::default();
    for addr in [config.scheduler_addr, config.worker_addr] {
        let mut router = ops::router(ops::Readiness {
            store: store.clone(),
            queue: queue.clone(),
            components: if addr == config.worker_addr {
                worker_components.clone()
            } else {
                Default::default()
            },
        });
        if addr == config.scheduler_addr {
            // Inbound webhook triggers are served next to the scheduler's health endpoints.
            router = router.merge(capibara_scheduler::hooks::router(
                capibara_scheduler::hooks::HookState::new(store.clone(), config.clone()),
            ));
        }
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                let s = stop.clone();
                let limits = config.http;
                tokio::spawn(async move {
                    capibara_shared::http_server::serve(l, router, limits, async move {
                        s.cancelled().await
                    })
                    .await
                });
            }
            Err(e) => tracing::warn!(%addr, error = %e, "health/metrics port busy; skipping"),
        }
    }

    let mut queues: Vec<String> = kinds::KINDS
        .iter()
        .map(|k| k.default_queue.to_string())
        .collect();
    queues.sort();
    queues.dedup();
    // One process is all three binaries: describe all their metrics.
    let mut labels = metric_catalog::Labels::worker(&queues);
    labels.kinds.push("batch".into());
    telemetry::init_metrics(
        &[
            metric_catalog::Component::Api,
            metric_catalog::Component::Worker,
            metric_catalog::Component::Scheduler,
        ],
        &labels,
    );
    // `CAPIBARA_DEVICE=cuda` puts the models on a GPU (a build with `--features cuda`).
    if let Ok(choice) = std::env::var("CAPIBARA_DEVICE") {
        let choice = choice.parse().map_err(anyhow::Error::msg)?;
        capibara_worker::models::device::init(choice).map_err(anyhow::Error::msg)?;
    }
    let worker = tokio::spawn(capibara_worker::run(
        store.clone(),
        queue.clone(),
        capibara_worker::registry(
            &store,
            &config,
            &capibara_worker::WarmUp {
                queues: queues.clone(),
                components: worker_components,
            },
        ),
        capibara_worker::WorkerOptions {
            queues,
            concurrency: args.concurrency,
            lease: config.visibility_timeout,
            shutdown_grace: Duration::from_secs(10),
            id: None,
        },
        stop.clone(),
    ));
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
    let deliverer = tokio::spawn(capibara_scheduler::deliverer::run(
        store.clone(),
        queue.clone(),
        capibara_scheduler::deliverer::DelivererOptions::new(&config),
        stop.clone(),
    ));
    let housekeeping = tokio::spawn(capibara_scheduler::housekeeping::run(
        store.clone(),
        queue.clone(),
        capibara_scheduler::housekeeping::HousekeepingOptions {
            retention: config.retention,
            ..capibara_scheduler::housekeeping::HousekeepingOptions::new(config.visibility_timeout)
        },
        stop.clone(),
    ));
    let event_log = tokio::spawn(capibara_scheduler::event_log::run(
        store.pool.clone(),
        capibara_shared::artifacts::ArtifactStore::open(&config.artifacts)
            .ok()
            .map(std::sync::Arc::new),
        config.event_log.clone(),
        stop.clone(),
    ));

    let secret_file = args.data_dir.join("webhook-secret").display().to_string();
    println!(
        "\n  Capibara is running.\n\n  API          http://{api_addr}\n  Swagger UI   http://{api_addr}/docs\n  Demo key     {demo_key}\n  Callbacks    signed with the secret in {secret_file}\n\n  Try it:\n\n    curl -s -X POST http://{api_addr}/v1/jobs \\\n      -H 'Authorization: Bearer {demo_key}' -H 'Content-Type: application/json' \\\n      -H 'Prefer: wait=10' -d '{{\"kind\": \"echo\", \"input\": {{\"hello\": \"capibara\"}}}}'\n\n  Press Ctrl-C to stop.\n"
    );

    stop.cancelled().await;
    let _ = tokio::join!(
        api,
        worker,
        housekeeping,
        deliverer,
        orchestrator,
        ticker,
        event_log
    );
    Ok(())
}

/// Write `text` to `path` readable by its owner only (a key).
fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
