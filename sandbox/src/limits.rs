//! Per-run limits: the memory cap (a [`wasmtime::ResourceLimiter`] that remembers a refusal, so
//! a guest's "out of memory" is reported as `memory_limit` and not as a plain runtime error),
//! why a run was interrupted at an epoch tick (deadline passed, job canceled, scratch quota
//! exceeded), and the measure of the scratch directory.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

/// Caps every linear memory of one run at `max_bytes`; records whether it refused a growth.
pub(crate) struct MemoryCap {
    pub max_bytes: usize,
    /// Set when the guest asked for more than the cap (the guest then sees a failed
    /// `memory.grow`, e.g. Python's MemoryError).
    pub hit: bool,
}

impl wasmtime::ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Tables hold function references; a million entries is far beyond any runtime here.
        Ok(desired <= 1_000_000)
    }
}

/// Why an epoch-deadline check stopped the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Interrupted {
    #[error("the run exceeded its wall-clock timeout")]
    Timeout,
    #[error("the run was canceled")]
    Canceled,
    #[error("the run kept more than its quota in its scratch directory")]
    ScratchLimit,
}

/// Bytes the files under `dir` take (their length; links are not followed).
pub(crate) fn dir_size(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Lets the caller stop a run from another thread (e.g. when its job is canceled). The run
/// notices at the next epoch tick (every few milliseconds).
#[derive(Debug, Clone, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_canceled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}
