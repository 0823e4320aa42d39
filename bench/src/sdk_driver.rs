//! `capibara-bench sdk-driver`: the no-op worker of `capibara-bench sdk`'s `rust-sdk` row, the
//! Rust SDK's in-process mode (`Worker::in_process`) with one handler that returns its input.
//! It reads capibara-worker's settings from the environment (the bench passes them), prints
//! `bench-driver ready <worker id>` once started and runs until SIGTERM or SIGINT.

use clap::Args;

#[derive(Args, Debug)]
pub struct DriverArgs {
    #[arg(long)]
    kind: String,
    #[arg(long, default_value_t = 32)]
    concurrency: u32,
}

pub async fn run(a: DriverArgs) -> anyhow::Result<()> {
    use capibara_sdk::{InProcess, JobContext, Worker};
    let worker = Worker::in_process(InProcess::from_env()?)
        .concurrency(a.concurrency)
        .handle(&a.kind, |job: JobContext| async move {
            Ok::<_, capibara_sdk::HandlerError>(job.input)
        })
        .start()
        .await?;
    println!("bench-driver ready {}", worker.id());
    worker.wait().await;
    println!("bench-driver stopped");
    Ok(())
}
