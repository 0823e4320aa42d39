//! Precompiled modules: each runtime's `.wasm` is compiled once per engine configuration and
//! kept as a `.cwasm` file, then loaded with `deserialize` (1–3 ms instead of ~7 s of cranelift).
//!
//! The cache file name holds everything the compiled code depends on: the wasm file's SHA-256,
//! the wasmtime version and a hash of the engine settings (epoch interruption, fuel, target).
//! A file written for other settings therefore never matches; files are written to a temporary
//! name and renamed, so processes compiling at the same time never read a half-written file.

use std::{
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
};

use anyhow::Context;
use sha2::{Digest, Sha256};
use wasmtime::{component::Component, Engine, Module};

/// The wasmtime version compiled code depends on (kept in step with Cargo.toml's `=` pin).
pub const WASMTIME_VERSION: &str = "48.0.8";

/// What kind of wasm a runtime file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WasmKind {
    Module,
    Component,
}

/// A compiled runtime, ready to instantiate.
pub(crate) enum Compiled {
    Module(Module),
    Component(Component),
}

/// Where a runtime's compiled form lives, and whether it was compiled now or loaded.
pub(crate) struct Loaded {
    pub compiled: Compiled,
    /// True when this call had to run cranelift (no usable cache entry).
    pub compiled_now: bool,
}

/// Hash of the engine settings that compiled code depends on (as hex).
pub(crate) fn settings_hash(engine: &Engine) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    format!("{:016x}", h.finish())
}

/// The cache file for `wasm` (its bytes) under `cache_dir`.
pub(crate) fn cache_path(engine: &Engine, cache_dir: &Path, name: &str, wasm: &[u8]) -> PathBuf {
    let sha = hex::encode(Sha256::digest(wasm));
    cache_dir.join(format!(
        "{name}-{}-wasmtime{WASMTIME_VERSION}-{}.cwasm",
        &sha[..16],
        settings_hash(engine)
    ))
}

/// Loads `wasm_path` compiled: from the cache when present, else compiles and stores it.
pub(crate) fn load(
    engine: &Engine,
    cache_dir: &Path,
    name: &str,
    wasm_path: &Path,
    kind: WasmKind,
) -> anyhow::Result<Loaded> {
    let wasm =
        std::fs::read(wasm_path).with_context(|| format!("reading {}", wasm_path.display()))?;
    let path = cache_path(engine, cache_dir, name, &wasm);
    if path.exists() {
        match deserialize(engine, &path, kind) {
            Ok(compiled) => {
                return Ok(Loaded {
                    compiled,
                    compiled_now: false,
                })
            }
            Err(e) => {
                // A truncated or foreign file: compile again and overwrite it.
                tracing::warn!(path = %path.display(), error = %e, "ignoring unusable compiled module");
            }
        }
    }
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("creating {}", cache_dir.display()))?;
    // Processes starting together (tests, replicas) compile once: the first takes the lock,
    // the others wait for its file.
    let lock = CompileLock::acquire(&path.with_extension("lock"));
    if path.exists() {
        if let Ok(compiled) = deserialize(engine, &path, kind) {
            return Ok(Loaded {
                compiled,
                compiled_now: false,
            });
        }
    }
    let started = std::time::Instant::now();
    let bytes = match kind {
        WasmKind::Module => engine.precompile_module(&wasm),
        WasmKind::Component => engine.precompile_component(&wasm),
    }
    .map_err(anyhow::Error::from)
    .with_context(|| format!("compiling {}", wasm_path.display()))?;
    tracing::info!(
        runtime = name,
        ms = started.elapsed().as_millis() as u64,
        "compiled wasm runtime"
    );
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    drop(lock);
    prune_stale(cache_dir, name, &path);
    Ok(Loaded {
        compiled: deserialize(engine, &path, kind)?,
        compiled_now: true,
    })
}

/// Removes entries for older builds of the same runtime under the same engine settings (the
/// wasm changed, e.g. a rebuilt Python component), so the cache does not grow with every build.
fn prune_stale(cache_dir: &Path, name: &str, current: &Path) {
    let (Some(current_name), Ok(entries)) = (
        current.file_name().and_then(|n| n.to_str()),
        std::fs::read_dir(cache_dir),
    ) else {
        return;
    };
    // `<name>-<sha16>-wasmtime<version>-<settings>.cwasm`: same name, version and settings.
    let suffix = &current_name[name.len() + 1 + 16..];
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(file) = file.to_str() else { continue };
        let stale = file != current_name
            && file
                .strip_prefix(name)
                .and_then(|r| r.strip_prefix('-'))
                .is_some_and(|rest| {
                    rest.get(16..) == Some(suffix)
                        && rest
                            .get(..16)
                            .is_some_and(|sha| sha.bytes().all(|b| b.is_ascii_hexdigit()))
                });
        if stale {
            tracing::info!(file, "removing a compiled module of an older runtime build");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn deserialize(engine: &Engine, path: &Path, kind: WasmKind) -> anyhow::Result<Compiled> {
    // SAFETY: `deserialize_file` trusts the file to be wasmtime output for this engine. The file
    // is one this crate wrote into the operator's cache directory (never user input), its name
    // pins the wasm hash, wasmtime version and engine settings, and wasmtime still checks the
    // header's version and settings before using it.
    #[allow(unsafe_code)]
    let compiled = unsafe {
        match kind {
            WasmKind::Module => Compiled::Module(Module::deserialize_file(engine, path)?),
            WasmKind::Component => Compiled::Component(Component::deserialize_file(engine, path)?),
        }
    };
    Ok(compiled)
}

/// An exclusive-create lock file next to a cache entry; removed on drop.
struct CompileLock(PathBuf);

impl CompileLock {
    /// Takes the lock, waiting while another process holds it (the caller then finds the
    /// other process's file). A lock older than 10 minutes is taken over (its process died);
    /// `None` when no lock file can be made at all.
    fn acquire(lock: &Path) -> Option<CompileLock> {
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(lock)
            {
                Ok(_) => return Some(CompileLock(lock.to_path_buf())),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let age = std::fs::metadata(lock)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok());
                    if age.is_some_and(|a| a > std::time::Duration::from_secs(600)) {
                        let _ = std::fs::remove_file(lock);
                        continue;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                // An unwritable cache dir: compile without a lock (the write will say why).
                Err(_) => return None,
            }
        }
    }
}

impl Drop for CompileLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_removes_only_older_builds_of_the_same_runtime_and_settings() {
        let dir = tempfile::tempdir().unwrap();
        let names = [
            "python-aaaaaaaaaaaaaaaa-wasmtime48.0.8-1111111111111111.cwasm", // current
            "python-bbbbbbbbbbbbbbbb-wasmtime48.0.8-1111111111111111.cwasm", // older build
            "python-bbbbbbbbbbbbbbbb-wasmtime48.0.8-2222222222222222.cwasm", // other settings
            "python-component-cccccccccccccccc-wasmtime48.0.8-1111111111111111.cwasm",
            "quickjs-dddddddddddddddd-wasmtime48.0.8-1111111111111111.cwasm",
        ];
        for n in names {
            std::fs::write(dir.path().join(n), b"x").unwrap();
        }
        prune_stale(dir.path(), "python", &dir.path().join(names[0]));
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut want: Vec<String> = [names[0], names[2], names[3], names[4]]
            .map(String::from)
            .to_vec();
        want.sort();
        assert_eq!(left, want);
    }
}
