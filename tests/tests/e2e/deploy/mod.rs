//! The deployment files in deploy/ checked with the tools that read them (docs/deploy.md,
//! docs/observability.md):
//! - [`metric_names`]: every metric and label the dashboard, the alert rules, their unit tests
//!   and the KEDA scalers use is one Capibara exports (the catalog), so a renamed metric fails
//!   here;
//! - [`prometheus`]: `promtool` checks the scrape config and rules and runs the rules' unit
//!   tests; a real Prometheus scrapes a running api, worker and scheduler and evaluates every
//!   alert and dashboard expression;
//! - [`compose`]: `docker-compose config` accepts deploy/docker-compose.yml;
//! - [`kubernetes`]: `kubectl kustomize` renders each overlay with every object it needs;
//! - [`systemd`]: `systemd-analyze verify` accepts the units;
//! - [`dockerfile`]: what the Dockerfile copies exists and the binaries it builds are targets.
//!
//! The tools come from Debian packages (deploy/install-deps.sh installs them). A missing tool
//! skips its test with a message, except under `CI=true`, where it fails it.
//! `CAPIBARA_TEST_<TOOL>` (e.g. `CAPIBARA_TEST_KUBECTL`) points at another binary.

mod compose;
mod dockerfile;
mod kubernetes;
mod metric_names;
mod prometheus;
mod promql;
mod systemd;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// The repository root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repository root")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// `name` from `CAPIBARA_TEST_<NAME>` or PATH. When it is missing: `None` (the caller skips,
/// saying so), or a failed test when `CI` is set.
fn tool(name: &str, debian_package: &str) -> Option<PathBuf> {
    let var = format!("CAPIBARA_TEST_{}", name.to_uppercase().replace('-', "_"));
    if let Some(path) = std::env::var_os(&var) {
        return Some(PathBuf::from(path));
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
        assert!(
            !ci,
            "{name} is missing and CI is set: install the Debian package {debian_package} \
             (deploy/install-deps.sh does) or set {var}"
        );
        eprintln!(
            "SKIPPED: {name} not found (apt-get install {debian_package}, or run \
             deploy/install-deps.sh; {var} names another binary)"
        );
    }
    found
}

/// Run `cmd` in the repository root; panic with its output unless it succeeds. Returns stdout.
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

/// A directory of its own under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("capibara-{what}-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The workspace's binaries: each `[[bin]]` name in the members' Cargo.toml files.
fn bin_targets() -> Vec<String> {
    let mut bins = Vec::new();
    for entry in std::fs::read_dir(repo()).unwrap().flatten() {
        let Ok(manifest) = std::fs::read_to_string(entry.path().join("Cargo.toml")) else {
            continue;
        };
        let mut in_bin = false;
        for line in manifest.lines().map(str::trim) {
            if line.starts_with('[') {
                in_bin = line == "[[bin]]";
            } else if let Some(name) = line.strip_prefix("name = ").filter(|_| in_bin) {
                bins.push(name.trim_matches('"').to_string());
            }
        }
    }
    bins
}

/// Whether docs/configuration.md documents the setting `name` (`CAPIBARA_…`).
fn documented_setting(name: &str) -> bool {
    read("docs/configuration.md").contains(&format!("`{name}`"))
}

/// Every `CAPIBARA_…` name in `text`.
fn settings_in(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("CAPIBARA_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// Settings the deployment files set that docs/configuration.md does not list.
#[test]
fn every_setting_the_deployment_files_use_is_documented() {
    let files = [
        "deploy/docker-compose.yml",
        "deploy/Dockerfile",
        "deploy/k8s/base/kustomization.yaml",
        "deploy/k8s/overlays/dev/kustomization.yaml",
        "deploy/k8s/overlays/dev/secrets.env",
        "deploy/k8s/overlays/production/kustomization.yaml",
        "deploy/systemd/capibara.env",
        "deploy/systemd/worker-default.env",
    ];
    let mut unknown = Vec::new();
    for file in files {
        for name in settings_in(&read(file)) {
            // The image name variable of the compose file is the compose file's own.
            if name != "CAPIBARA_IMAGE" && !documented_setting(&name) {
                unknown.push(format!("{name} ({file})"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "not in docs/configuration.md: {unknown:?}"
    );
}
