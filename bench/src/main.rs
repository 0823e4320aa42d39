//! `capibara-bench`: measuring commands that print figures (docs/benchmarks.md). Each starts
//! its own Postgres and Redis and spawns the real `capibara-api`, `capibara-worker` and
//! `capibara-scheduler` found next to it. `capibara bench …` runs this binary, so the
//! production binaries do not link any of it.

mod agents;
mod chaos;
mod code;
mod connectors;
mod deliveries;
mod eventlog;
mod fanout;
mod flood;
mod flow;
mod harness;
mod jobs;
mod models;
mod push;
mod schedules;
mod sdk;
mod sdk_driver;
mod tts;
mod workflows;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "capibara-bench",
    version,
    about = "Capibara benchmarks: figures of the real binaries (also run as `capibara bench…`)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Throughput and latency of the job core (`capibara bench`).
    Jobs(jobs::BenchArgs),
    /// The event firehose's live fan-out to many SSE clients (`capibara bench-fanout`).
    Fanout(fanout::FanoutArgs),
    /// Webhook deliveries (`callback_url`): throughput and event→receipt latency
    /// (`capibara bench-deliveries`).
    Deliveries(deliveries::Args),
    /// Fire accuracy of cron schedules with several scheduler replicas
    /// (`capibara bench-schedules`).
    Schedules(schedules::ScheduleBenchArgs),
    /// tts.render: real-time factor, time to the first sentence, model load, and the piper-tts
    /// Python package on the same voice and text in the same run (`capibara bench-tts`).
    Tts(tts::TtsBenchArgs),
    /// code.run: executor time per run (Python, JavaScript), first run after a restart, and the
    /// HTTP round trip with `Prefer: wait` (`capibara bench-code`).
    Code(code::CodeBenchArgs),
    /// Workflow orchestration: per-step overhead on a chain of echo steps, and the wall time of
    /// a wide fan-out/fan-in (`capibara bench-workflows`).
    Workflows(workflows::WorkflowBenchArgs),
    /// connector.fetch: items/s of a 10,000-item local feed, and the cost of a fetch with
    /// nothing new (`capibara bench-connectors`).
    Connectors(connectors::ConnectorBenchArgs),
    /// text.embed: the first job (model load), 1 and 32 texts per job, texts/s, worker memory
    /// (`capibara bench-models`).
    Models(models::ModelBenchArgs),
    /// The Rust (in-process), Python and TypeScript SDK workers against the built-in Rust worker: end-to-end no-op
    /// jobs/s and idle enqueue→start latency, on one stack in one run.
    Sdk(sdk::SdkBenchArgs),
    /// http.request's overhead over a loopback server, and llm.generate's time to the first
    /// token through Capibara over a stand-in provider's own, as an SSE client sees it.
    Agents(agents::AgentsBenchArgs),
    /// Flow control: end-to-end throughput with 1,000 per-key limits and a global rate vs none,
    /// enqueue→start under the limits, and one tenant's job behind another's backlog.
    Flow(flow::FlowBenchArgs),
    /// One API key floods the API from loopback while other keys are served: the flood's
    /// request rate, its 429 share, and the other keys' successes and latency.
    Flood(flood::FloodArgs),
    /// Mixed work under combined faults (killed workers, APIs, schedulers; Redis and Postgres
    /// restarted; the network to them cut and stalled), then an exact account from the event
    /// log (`capibara chaos`).
    Chaos(chaos::ChaosArgs),
    /// The bounded event log: submissions/s with an empty `events` table and with `--events`
    /// generated in an old partition, then that partition's archive rate in events/s.
    Eventlog(eventlog::EventLogBenchArgs),
    /// The Rust SDK's in-process no-op worker that `sdk` runs (not a benchmark of its own).
    #[command(hide = true)]
    SdkDriver(sdk_driver::DriverArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Jobs(a) => jobs::run(a).await,
        Command::Fanout(a) => fanout::run(a).await,
        Command::Deliveries(a) => deliveries::run(a).await,
        Command::Schedules(a) => schedules::run(a).await,
        Command::Tts(a) => tts::run(a).await,
        Command::Code(a) => code::run(a).await,
        Command::Workflows(a) => workflows::run(a).await,
        Command::Connectors(a) => connectors::run(a).await,
        Command::Models(a) => models::run(a).await,
        Command::Sdk(a) => sdk::run(a).await,
        Command::Agents(a) => agents::run(a).await,
        Command::Flow(a) => flow::run(a).await,
        Command::Flood(a) => flood::run(a).await,
        Command::Chaos(a) => chaos::run(a).await,
        Command::Eventlog(a) => eventlog::run(a).await,
        Command::SdkDriver(a) => sdk_driver::run(a).await,
    }
}
