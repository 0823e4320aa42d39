//! deploy/docker-compose.yml: `docker-compose config` (1.29, Debian's; no Docker daemon
//! needed) accepts it once its secrets are given, refuses it without them, and resolves the
//! services Capibara needs, each running one of the workspace's binaries.

use std::process::Command;

use serde_json::Value;

use super::{bin_targets, run_ok, tool};

const FILE: &str = "deploy/docker-compose.yml";
const SECRETS: [(&str, &str); 4] = [
    ("CAPIBARA_ADMIN_KEY", "test-admin-key"),
    (
        "CAPIBARA_SECRETS_KEY",
        "dGVzdC1zZWNyZXRzLWtleS0zMi1ieXRlcy0wMDAwMDA=",
    ),
    ("CAPIBARA_WEBHOOK_SECRET", "whsec_dGVzdA=="),
    ("POSTGRES_PASSWORD", "test-password"),
];

fn compose(docker_compose: &std::path::Path) -> Command {
    let mut cmd = Command::new(docker_compose);
    cmd.args(["-f", FILE, "config"]);
    for (name, _) in SECRETS {
        cmd.env_remove(name);
    }
    cmd
}

#[test]
fn docker_compose_config_resolves_every_service() {
    let Some(docker_compose) = tool("docker-compose", "docker-compose") else {
        return;
    };
    // Without its secrets the file refuses to resolve: nothing starts with a default key.
    let refused = compose(&docker_compose)
        .current_dir(super::repo())
        .output()
        .unwrap();
    assert!(!refused.status.success(), "resolved without secrets");

    let resolved = run_ok(compose(&docker_compose).envs(SECRETS));
    let config: Value = serde_norway::from_str(&resolved).unwrap();
    let services = config["services"].as_object().unwrap();
    for name in [
        "postgres",
        "redis",
        "migrate",
        "api-1",
        "api-2",
        "scheduler",
        "worker-default",
        "prometheus",
    ] {
        assert!(services.contains_key(name), "no service {name}");
    }
    let workers = services.keys().filter(|k| k.starts_with("worker-")).count();
    assert!(
        workers >= 3,
        "one worker service per queue group; got {workers}"
    );

    let bins = bin_targets();
    for (name, service) in services {
        let Some(image) = service["image"].as_str() else {
            continue;
        };
        if !image.starts_with("capibara") {
            continue;
        }
        let command = service["command"][0].as_str().unwrap_or_default();
        assert!(
            bins.iter().any(|b| b == command),
            "{name} runs {command:?}, not one of {bins:?}"
        );
        let env = &service["environment"];
        assert_eq!(env["CAPIBARA_ADMIN_KEY"], "test-admin-key", "{name}");
        assert_eq!(
            env["CAPIBARA_SECRETS_KEY"], "dGVzdC1zZWNyZXRzLWtleS0zMi1ieXRlcy0wMDAwMDA=",
            "{name}: every process gets the key of secrets at rest"
        );
        assert!(
            env["CAPIBARA_DATABASE_URL"]
                .as_str()
                .is_some_and(|u| u.contains("@postgres:5432/")),
            "{name}: {env}"
        );
        if name != "migrate" {
            assert_eq!(
                service["depends_on"]["migrate"]["condition"], "service_completed_successfully",
                "{name} starts after the migrations"
            );
            assert!(
                service["healthcheck"]["test"]
                    .to_string()
                    .contains("/readyz"),
                "{name} has no /readyz health check"
            );
        }
    }
    assert_eq!(
        services["migrate"]["command"],
        serde_json::json!(["capibara", "migrate"])
    );
}
