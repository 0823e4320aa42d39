//! `capibara bench…` runs `capibara-bench` (the `capibara-bench` crate) from the same directory:
//! the benchmarks are not linked into this binary, and the commands in docs/benchmarks.md keep
//! working.

use std::{ffi::OsString, os::unix::process::CommandExt, process::Command};

use anyhow::{anyhow, Context, Result};
use clap::Args;

/// Everything after the subcommand's name goes to `capibara-bench <name>` unchanged, `--help`
/// included.
#[derive(Args, Debug)]
#[command(disable_help_flag = true)]
pub struct Forwarded {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<OsString>,
}

/// Replaces this process with `capibara-bench <name> <args>`; returns only on failure.
pub fn exec(name: &str, forwarded: Forwarded) -> Result<()> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", exe.display()))?;
    let bench = dir.join("capibara-bench");
    if !bench.is_file() {
        return Err(anyhow!(
            "{} is missing: build it with the other binaries, in the same profile \
             (`cargo build --release --workspace --bins`)",
            bench.display()
        ));
    }
    let err = Command::new(&bench).arg(name).args(forwarded.args).exec();
    Err(err).with_context(|| format!("running {}", bench.display()))
}
