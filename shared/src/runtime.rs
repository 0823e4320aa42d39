//! The Tokio runtime every Capibara binary runs on, sized for a machine it shares.
//!
//! A Capibara process rarely has its machine to itself: Postgres, Redis and the other
//! Capibara processes run beside it (`capibara dev`, small deployments, the peer benchmark).
//! Tokio's default is one worker thread per core, and on a small machine those threads mostly
//! wake, search for work and sleep again, taking cores from the processes a job is waiting
//! for. Half the cores (at least one) measured better on 2 cores in every figure
//! (docs/write-path.md, "Runtime threads"); heavy work (models, sandboxes, parsing) runs on the
//! blocking pool, which this does not limit.

use std::num::NonZeroUsize;

/// The variable that sets the number of runtime worker threads.
const THREADS_VAR: &str = "CAPIBARA_RUNTIME_THREADS";
/// Tokio's own variable for it, read when ours is unset.
const TOKIO_VAR: &str = "TOKIO_WORKER_THREADS";

/// The name of the runtime's threads (in `top -H`, `perf` and panics).
const THREAD_NAME: &str = "capibara-rt";

/// Worker threads for this process: `CAPIBARA_RUNTIME_THREADS`, else Tokio's own
/// `TOKIO_WORKER_THREADS`, else half the available cores (at least one).
fn threads() -> Result<usize, String> {
    let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    threads_from(
        std::env::var(THREADS_VAR).ok().as_deref(),
        std::env::var(TOKIO_VAR).ok().as_deref(),
        cores,
    )
}

fn threads_from(ours: Option<&str>, tokio: Option<&str>, cores: usize) -> Result<usize, String> {
    for (name, value) in [(THREADS_VAR, ours), (TOKIO_VAR, tokio)] {
        if let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) {
            return match v.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err(format!("{name}: expected a whole number ≥ 1, got `{v}`")),
            };
        }
    }
    Ok((cores / 2).max(1))
}

/// A multi-threaded runtime with [`threads`] worker threads, I/O and timers enabled.
pub fn build() -> anyhow::Result<tokio::runtime::Runtime> {
    let threads = threads().map_err(anyhow::Error::msg)?;
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(THREAD_NAME)
        .enable_all()
        .build()?)
}

/// Build the runtime ([`build`]) and run `main` on it as a task, on a worker thread.
///
/// `block_on` would poll `main` on the calling thread, which does not drive the runtime's I/O:
/// every socket `main` waits on (the worker's Redis pop, the job loads that follow it, the
/// API's accept loop) would be woken by a worker thread across threads, an `eventfd` write and
/// a context switch per hop, on a machine whose cores Postgres and Redis also want. As a
/// spawned task it is woken where its I/O arrives. A panic in `main` is resumed here.
pub fn run<F, T>(main: F) -> anyhow::Result<T>
where
    F: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
    T: Send + 'static,
{
    build()?.block_on(async move {
        match tokio::spawn(main).await {
            Ok(done) => done,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(anyhow::anyhow!("the main task was canceled: {e}")),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::threads_from;

    #[test]
    fn half_the_cores_by_default_and_at_least_one() {
        assert_eq!(threads_from(None, None, 1), Ok(1));
        assert_eq!(threads_from(None, None, 2), Ok(1));
        assert_eq!(threads_from(None, None, 3), Ok(1));
        assert_eq!(threads_from(None, None, 16), Ok(8));
    }

    #[test]
    fn the_variables_win_ours_first() {
        assert_eq!(threads_from(Some("3"), None, 2), Ok(3));
        assert_eq!(threads_from(None, Some("4"), 2), Ok(4));
        assert_eq!(threads_from(Some("2"), Some("4"), 2), Ok(2));
        assert_eq!(threads_from(Some(" "), Some("4"), 2), Ok(4));
    }

    #[test]
    fn main_runs_as_a_task_on_a_worker_thread() {
        let caller = std::thread::current().id();
        let (on, name) = super::run(async {
            Ok((
                std::thread::current().id(),
                std::thread::current().name().map(String::from),
            ))
        })
        .unwrap();
        assert_ne!(on, caller, "main ran on the calling thread");
        assert_eq!(name.as_deref(), Some(super::THREAD_NAME));
    }

    #[test]
    fn main_s_error_and_panic_reach_the_caller() {
        let e = super::run(async { Err::<(), _>(anyhow::anyhow!("no config")) }).unwrap_err();
        assert_eq!(e.to_string(), "no config");
        let boom = async {
            if true {
                panic!("boom");
            }
            Ok(())
        };
        let panic = std::panic::catch_unwind(|| super::run(boom)).unwrap_err();
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"boom"));
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        let e = threads_from(Some("0"), None, 2).unwrap_err();
        assert!(e.starts_with("CAPIBARA_RUNTIME_THREADS:"), "{e}");
        let e = threads_from(None, Some("many"), 2).unwrap_err();
        assert!(e.starts_with("TOKIO_WORKER_THREADS:"), "{e}");
    }
}
