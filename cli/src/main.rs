//! `capibara`: the command line. `dev` runs everything on a laptop; `migrate` and `admin` act on
//! the database; `submit`, `get`, `wait`, `events`, `jobs`, `runs`, `schedules` and `triggers`
//! are API clients; `completions` prints shell completions; `bench…` runs the benchmarks of the
//! `capibara-bench` binary.

mod benchmarks;
mod client;
mod dev;
mod jobs;
mod manage;
mod output;
mod runs;

use anyhow::Context;
use capibara_shared::{config::Config, store, telemetry};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "capibara",
    version,
    about = "Capibara: event-sourced jobs and workflows"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start Postgres and Redis under ./.capibara, migrate, and run api + worker + scheduler.
    Dev(dev::DevArgs),
    /// Apply database migrations (CAPIBARA_DATABASE_URL).
    Migrate,
    /// Print the API's OpenAPI document (as served at /openapi.json; the `tts.render` voices are
    /// those installed in CAPIBARA_TTS_VOICES_DIR), e.g. to generate a client offline.
    Openapi,
    /// Secrets encrypted at rest (CAPIBARA_SECRETS_KEY, CAPIBARA_SECRETS_OLD_KEYS).
    Secrets {
        #[command(subcommand)]
        command: SecretsCommand,
    },
    /// Administrative commands.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Submit a job: `capibara submit echo '{"hello":"world"}'`.
    Submit(client::SubmitArgs),
    /// Show a job.
    Get(client::GetArgs),
    /// Wait for a job to finish and print it.
    Wait(client::WaitArgs),
    /// Print a job's events (`--follow` streams them live over SSE).
    Events(client::EventsArgs),
    /// Jobs: list them as a table, or tail their events live.
    Jobs {
        #[command(subcommand)]
        command: jobs::JobsCommand,
    },
    /// Workflow runs: list them, or watch one's steps live until it ends.
    Runs {
        #[command(subcommand)]
        command: runs::RunsCommand,
    },
    /// Print a shell completion script: `capibara completions bash > /etc/bash_completion.d/capibara`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Fire accuracy of cron schedules with several scheduler replicas.
    BenchSchedules(benchmarks::Forwarded),
    /// Cron schedules: list, create, pause, resume, trigger.
    Schedules {
        #[command(subcommand)]
        command: manage::SchedulesCommand,
    },
    /// Inbound webhook triggers: create, list.
    Triggers {
        #[command(subcommand)]
        command: manage::TriggersCommand,
    },
    /// Run the throughput/latency benchmark (starts its own Postgres, Redis and processes).
    Bench(benchmarks::Forwarded),
    /// Measure the event firehose's live fan-out to many SSE clients (own Postgres, Redis, processes).
    BenchFanout(benchmarks::Forwarded),
    /// Measure webhook deliveries (`callback_url`): throughput and event→receipt latency.
    #[command(name = "bench-deliveries")]
    BenchDeliveries(benchmarks::Forwarded),
    /// Measure tts.render: real-time factor, time to the first sentence, model load, and the
    /// piper-tts Python package on the same voice and text in the same run.
    #[command(name = "bench-tts")]
    BenchTts(benchmarks::Forwarded),
    /// Measure code.run: executor time per run (Python, JavaScript), first run after a
    /// restart, and the HTTP round trip with `Prefer: wait`.
    #[command(name = "bench-code")]
    BenchCode(benchmarks::Forwarded),
    /// Measure workflow orchestration: per-step overhead on a chain of echo steps, and the wall
    /// time of a wide fan-out/fan-in.
    #[command(name = "bench-workflows")]
    BenchWorkflows(benchmarks::Forwarded),
    /// connector.fetch: items/s of a local 10,000-item feed and the cost of a fetch with
    /// nothing new (runs `capibara-bench connectors`).
    #[command(name = "bench-connectors")]
    BenchConnectors(benchmarks::Forwarded),
    /// text.embed: the first job (model load), 1 and 32 texts per job, texts/s, worker memory
    /// (runs `capibara-bench models`).
    #[command(name = "bench-models")]
    BenchModels(benchmarks::Forwarded),
    /// The Python and TypeScript SDK workers against the built-in worker: end-to-end jobs/s and
    /// idle pickup (runs `capibara-bench sdk`).
    #[command(name = "bench-sdk")]
    BenchSdk(benchmarks::Forwarded),
    /// Mixed work under combined faults, then an exact account from the event log: lost,
    /// completed twice, recovery time per fault (runs `capibara-bench chaos`; `--profile short`
    /// is the CI run, `--profile soak` the 30-minute one).
    Chaos(benchmarks::Forwarded),
    /// The bounded event log: submissions/s with 50 M events in the table vs none, and the
    /// archive rate (runs `capibara-bench eventlog`).
    #[command(name = "bench-eventlog")]
    BenchEventlog(benchmarks::Forwarded),
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Rebuild the projections (jobs, deliveries, schedules, triggers) from the event log.
    RebuildProjections,
    /// Create the `events` partitions ahead and archive old ones whose streams are all finished
    /// (what the scheduler does every `CAPIBARA_EVENTS_ARCHIVE_EVERY`,
    /// docs/event-log-retention.md).
    ArchiveEvents,
    /// Create an API key: `capibara admin create-key --name ci --roles submit`.
    CreateKey {
        #[arg(long)]
        name: String,
        #[arg(long, value_delimiter = ',', default_value = "submit")]
        roles: Vec<String>,
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Make it a super-admin: it may create, list and revoke keys of every namespace
        /// (needs `--roles admin`).
        #[arg(long)]
        super_admin: bool,
    },
    /// Revoke an API key by id: `capibara admin revoke-key <id>` (recorded as revoked by `cli`;
    /// API processes refuse it at once, or within 10 s when Redis cannot be reached).
    RevokeKey { id: uuid::Uuid },
}

#[derive(Subcommand)]
enum SecretsCommand {
    /// Re-encrypt every stored secret under CAPIBARA_SECRETS_KEY (rows under a key in
    /// CAPIBARA_SECRETS_OLD_KEYS, and plain-text rows from before encryption), in batches; safe
    /// to run beside running processes and again after an interruption. Prints what it rewrote
    /// and what remains; at `0 remaining` the old keys can be removed (docs/security.md).
    Rotate,
}

fn main() -> anyhow::Result<()> {
    // Sized for a machine shared with Postgres and Redis (CAPIBARA_RUNTIME_THREADS).
    capibara_shared::runtime::run(run())
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Dev(args) => dev::run(args).await,
        Command::Openapi => {
            let config = Config::from_env()?;
            println!("{}", capibara_api::openapi::document(&config));
            Ok(())
        }
        Command::Migrate => {
            let config = Config::from_env()?;
            telemetry::init_logs(config.log_format, "capibara");
            let pool = store::connect(&config.database_url, 2).await?;
            store::migrate(&pool).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Secrets {
            command: SecretsCommand::Rotate,
        } => {
            let config = Config::from_env()?;
            let ring = capibara_shared::crypto::Keyring::require_from_env()?;
            let pool = store::connect(&config.database_url, 2).await?;
            store::migrate(&pool).await?;
            let done = store::sealed::reencrypt(&pool, &ring).await?;
            println!(
                "re-encrypted {} rows under key {}, {} remaining",
                done.rewritten,
                ring.current_id(),
                done.remaining
            );
            Ok(())
        }
        Command::Admin { command } => {
            let config = Config::from_env()?;
            let pool = store::connect(&config.database_url, 4).await?;
            store::migrate(&pool).await?;
            match command {
                AdminCommand::RebuildProjections => {
                    // Archived partitions are replayed from the artifact store.
                    let archives = if store::archive::any_archived(&pool).await? {
                        Some(capibara_shared::artifacts::ArtifactStore::open(
                            &config.artifacts,
                        )?)
                    } else {
                        None
                    };
                    let r = store::rebuild::rebuild_all(&pool, archives.as_ref()).await?;
                    println!(
                        "rebuilt {} jobs, {} deliveries, {} schedules, {} triggers, {} workflows, {} runs, {} user kinds, {} connectors from {} events",
                        r.jobs, r.deliveries, r.schedules, r.triggers, r.workflows, r.runs, r.user_kinds, r.connectors, r.events
                    );
                }
                AdminCommand::ArchiveEvents => {
                    let created =
                        store::archive::ensure_partitions(&pool, &config.event_log).await?;
                    let Some(retention) = config.event_log.retention else {
                        println!("created {created} partitions; CAPIBARA_EVENTS_RETENTION=0: nothing archived");
                        return Ok(());
                    };
                    let artifacts =
                        capibara_shared::artifacts::ArtifactStore::open(&config.artifacts)?;
                    let started = std::time::Instant::now();
                    let r = store::archive::archive_old(
                        &pool,
                        &artifacts,
                        retention,
                        store::archive::Halt::Never,
                    )
                    .await?;
                    if r.busy {
                        println!("another archive run holds the lock; nothing done");
                    } else {
                        println!(
                            "created {created} partitions; archived {} partitions ({} events, {} objects) in {:.1}s; {} old partitions kept (streams not finished)",
                            r.partitions,
                            r.events,
                            r.objects,
                            started.elapsed().as_secs_f64(),
                            r.blocked
                        );
                    }
                }
                AdminCommand::CreateKey {
                    name,
                    roles,
                    namespace,
                    super_admin,
                } => {
                    let roles = roles
                        .iter()
                        .map(|r| r.parse())
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(anyhow::Error::msg)?;
                    capibara_shared::domain::auth::validate_namespace(&namespace)
                        .map_err(|m| anyhow::anyhow!("namespace: {m}"))?;
                    if super_admin && !roles.contains(&capibara_shared::domain::auth::Role::Admin) {
                        anyhow::bail!("--super-admin needs --roles admin");
                    }
                    let new = store::keys::NewKey {
                        namespace: &namespace,
                        name: &name,
                        roles: &roles,
                        super_admin,
                    };
                    let (key, secret) = store::keys::create(&pool, new)
                        .await
                        .context("creating the key")?;
                    println!(
                        "{}",
                        serde_json::json!({"id": key.id, "namespace": key.namespace,
                            "super_admin": key.super_admin, "key": secret})
                    );
                }
                AdminCommand::RevokeKey { id } => {
                    let key = store::keys::revoke(&pool, id, "cli")
                        .await
                        .context("revoking the key")?
                        .ok_or_else(|| anyhow::anyhow!("no API key {id}"))?;
                    let announced = match capibara_shared::queue::Queue::connect(
                        &config.redis_url,
                        &config.redis_prefix,
                    )
                    .await
                    {
                        Ok(q) => q.publish_key_revoked(id).await.is_ok(),
                        Err(_) => false,
                    };
                    if !announced {
                        eprintln!("Redis unreachable: API processes refuse the key within 10 s");
                    }
                    println!("{}", serde_json::to_string(&key)?);
                }
            }
            Ok(())
        }
        Command::Submit(a) => client::submit(a).await,
        Command::Get(a) => client::get(a).await,
        Command::Wait(a) => client::wait(a).await,
        Command::Events(a) => client::events(a).await,
        Command::Jobs { command } => jobs::run(command).await,
        Command::Runs { command } => runs::run(command).await,
        Command::Completions { shell } => {
            let mut cli = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cli, "capibara", &mut std::io::stdout());
            Ok(())
        }
        Command::Bench(a) => benchmarks::exec("jobs", a),
        Command::BenchSchedules(a) => benchmarks::exec("schedules", a),
        Command::Schedules { command } => manage::schedules(command).await,
        Command::Triggers { command } => manage::triggers(command).await,
        Command::BenchFanout(a) => benchmarks::exec("fanout", a),
        Command::BenchDeliveries(a) => benchmarks::exec("deliveries", a),
        Command::BenchTts(a) => benchmarks::exec("tts", a),
        Command::BenchCode(a) => benchmarks::exec("code", a),
        Command::BenchWorkflows(a) => benchmarks::exec("workflows", a),
        Command::BenchConnectors(a) => benchmarks::exec("connectors", a),
        Command::BenchModels(a) => benchmarks::exec("models", a),
        Command::BenchSdk(a) => benchmarks::exec("sdk", a),
        Command::Chaos(a) => benchmarks::exec("chaos", a),
        Command::BenchEventlog(a) => benchmarks::exec("eventlog", a),
    }
}
