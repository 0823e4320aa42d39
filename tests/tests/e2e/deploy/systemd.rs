//! deploy/systemd: `systemd-analyze verify` (it needs no running systemd) accepts every unit,
//! with ExecStart pointed at the built binaries; and what the units name exists: each
//! ExecStart is a workspace binary under /usr/local/bin, each EnvironmentFile has its example
//! in deploy/systemd.

use std::process::Command;

use super::{bin_targets, repo, tool, TempDir};

fn units() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(repo().join("deploy/systemd"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "service"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p.file_name().unwrap().to_string_lossy().into_owned(), text)
        })
        .collect();
    out.sort();
    out
}

fn values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn the_systemd_units_name_real_binaries_and_env_files() {
    let units = units();
    let names: Vec<&str> = units.iter().map(|(n, _)| n.as_str()).collect();
    for unit in [
        "capibara-api.service",
        "capibara-migrate.service",
        "capibara-scheduler.service",
        "capibara-worker@.service",
    ] {
        assert!(names.contains(&unit), "no {unit} in {names:?}");
    }
    let bins = bin_targets();
    for (name, text) in &units {
        let exec = values(text, "ExecStart");
        assert_eq!(exec.len(), 1, "{name}");
        let binary = exec[0].split_whitespace().next().unwrap();
        let bin = binary
            .strip_prefix("/usr/local/bin/")
            .unwrap_or_else(|| panic!("{name}: {binary} is not under /usr/local/bin"));
        assert!(
            bins.iter().any(|b| b == bin),
            "{name}: {bin} is not a [[bin]]"
        );
        for file in values(text, "EnvironmentFile") {
            let example = file
                .strip_prefix("/etc/capibara/")
                .unwrap_or_else(|| panic!("{name}: {file} is not under /etc/capibara"))
                .replace("%i", "default");
            assert!(
                repo().join("deploy/systemd").join(&example).is_file(),
                "{name}: no example deploy/systemd/{example} for {file}"
            );
        }
    }
}

#[test]
fn systemd_analyze_verifies_the_units() {
    let Some(analyze) = tool("systemd-analyze", "systemd") else {
        return;
    };
    // verify checks that ExecStart exists: point it at the binaries this run built.
    let dir = TempDir::new("systemd");
    let bin_dir = capibara_tests::bin_dir()
        .canonicalize()
        .expect("built binaries");
    let mut paths = Vec::new();
    for (name, text) in units() {
        let text = text.replace("/usr/local/bin/", &format!("{}/", bin_dir.display()));
        let name = name.replace("@.service", "@default.service");
        std::fs::write(dir.0.join(&name), text).unwrap();
        paths.push(dir.0.join(name));
    }
    let out = Command::new(analyze)
        .arg("verify")
        .args(&paths)
        .output()
        .expect("running systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Unknown keys and bad values are only warnings: any output is a failure.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify ({}):\n{stderr}",
        out.status
    );
}
