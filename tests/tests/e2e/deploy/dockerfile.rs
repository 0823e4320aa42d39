//! deploy/Dockerfile cannot be built here (no Docker daemon in CI; docs/deploy.md). What can be
//! checked without building: every COPY from the build context exists, the `--bin`s it builds
//! are the workspace's binaries and all of them, the stages are the Debian bookworm ones, and the
//! runtime runs as an unprivileged user.

use super::{bin_targets, read, repo};

/// The Dockerfile's instructions, continuation lines joined.
fn instructions() -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in read("deploy/Dockerfile").lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                if !current.trim().is_empty() {
                    out.push(current.trim().to_string());
                }
                current.clear();
            }
        }
    }
    out
}

#[test]
fn the_dockerfile_copies_what_exists_and_builds_every_binary() {
    let instructions = instructions();
    for copy in instructions.iter().filter(|i| i.starts_with("COPY ")) {
        let words: Vec<&str> = copy.split_whitespace().skip(1).collect();
        if words.iter().any(|w| w.starts_with("--from=")) {
            continue;
        }
        let paths: Vec<&str> = words.into_iter().filter(|w| !w.starts_with("--")).collect();
        let (sources, _destination) = paths.split_at(paths.len() - 1);
        for source in sources {
            assert!(
                repo().join(source).exists(),
                "{copy}: {source} does not exist"
            );
        }
    }

    let build = instructions
        .iter()
        .find(|i| i.contains("cargo build"))
        .expect("a cargo build");
    let built: Vec<&str> = build
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "--bin")
        .map(|w| w[1])
        .collect();
    let mut wanted = bin_targets();
    wanted.retain(|b| b != "capibara-bench");
    wanted.sort();
    let mut built_sorted: Vec<String> = built.iter().map(|b| b.to_string()).collect();
    built_sorted.sort();
    assert_eq!(built_sorted, wanted, "{build}");
    for bin in &built {
        assert!(
            build.contains(&format!("target/release/{bin}")),
            "{bin} is built but not copied out"
        );
    }

    let stages: Vec<&String> = instructions
        .iter()
        .filter(|i| i.starts_with("FROM "))
        .collect();
    assert!(
        stages[0].contains("rust:") && stages[0].contains("-bookworm"),
        "{stages:?}"
    );
    let runtime = stages.last().unwrap();
    assert_eq!(runtime.as_str(), "FROM debian:bookworm-slim", "{stages:?}");
    let user = instructions
        .iter()
        .rev()
        .find_map(|i| i.strip_prefix("USER "))
        .expect("a USER");
    assert_ne!(user.trim(), "root");
}
