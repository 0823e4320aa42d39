//! deploy/prometheus: `promtool` accepts the scrape config and the rules and the rules' unit
//! tests pass; a real Prometheus scrapes a running api, worker and scheduler, sees a submitted
//! job, and evaluates every alert and dashboard expression against that data.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use capibara_tests::{eventually, find_free_port, wait_http_ok, TestEnv};
use serde_json::{json, Value};

use super::{
    metric_names::{alert_rules, dashboard_expressions},
    read, repo, run_ok, tool, TempDir,
};

#[test]
fn promtool_accepts_the_config_and_rules_and_the_rule_unit_tests_pass() {
    let Some(promtool) = tool("promtool", "prometheus") else {
        return;
    };
    run_ok(Command::new(&promtool).args(["check", "config", "deploy/prometheus/prometheus.yml"]));
    run_ok(Command::new(&promtool).args(["check", "rules", "deploy/prometheus/alerts.yml"]));
    let out = run_ok(Command::new(&promtool).args([
        "test",
        "rules",
        "deploy/prometheus/alerts.test.yml",
    ]));
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Each alert's `runbook` annotation names its section in docs/observability.md.
#[test]
fn every_alert_has_a_runbook_section() {
    let docs = read("docs/observability.md");
    for rule in alert_rules() {
        assert_eq!(
            rule.runbook,
            format!("docs/observability.md#{}", rule.alert.to_lowercase()),
            "{}'s runbook annotation",
            rule.alert
        );
        assert!(
            docs.contains(&format!("\n### {}\n", rule.alert)),
            "docs/observability.md has no section ### {}",
            rule.alert
        );
    }
}

/// A Prometheus server, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Prometheus {
    url: String,
    http: reqwest::Client,
}

impl Prometheus {
    /// `/api/v1/{path}`'s `data`, or the error Prometheus answered.
    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, String> {
        let body: Value = self
            .http
            .get(format!("{}/api/v1/{path}", self.url))
            .query(query)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        match body["status"].as_str() {
            Some("success") => Ok(body["data"].clone()),
            _ => Err(body.to_string()),
        }
    }

    /// An instant query's result vector.
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let data = self.api("query", &[("query", expr)]).await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// The value of each series of `expr`, by the value of `label`.
    async fn values_by(&self, expr: &str, label: &str) -> Vec<(String, f64)> {
        let result = self.query(expr).await.unwrap_or_default();
        result
            .iter()
            .map(|s| {
                (
                    s["metric"][label].as_str().unwrap_or_default().to_string(),
                    s["value"][1].as_str().unwrap().parse().unwrap(),
                )
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_scrapes_every_process_and_evaluates_every_rule() {
    let Some(binary) = tool("prometheus", "prometheus") else {
        return;
    };
    // Arrange: api, worker and scheduler on known ports, and Prometheus scraping them every
    // second with the real rules.
    let mut env = TestEnv::new().await;
    let (worker_port, scheduler_port) = (find_free_port(), find_free_port());
    env.extra_env.extend([
        (
            "CAPIBARA_WORKER_ADDR".into(),
            format!("127.0.0.1:{worker_port}"),
        ),
        (
            "CAPIBARA_SCHEDULER_ADDR".into(),
            format!("127.0.0.1:{scheduler_port}"),
        ),
    ]);
    let _procs = env.spawn_all().await;
    wait_http_ok(&format!("http://127.0.0.1:{worker_port}/healthz")).await;
    wait_http_ok(&format!("http://127.0.0.1:{scheduler_port}/healthz")).await;

    let dir = TempDir::new("prometheus");
    std::fs::copy(
        repo().join("deploy/prometheus/alerts.yml"),
        dir.0.join("alerts.yml"),
    )
    .unwrap();
    let target =
        |job: &str, addr: String| json!({"job_name": job, "static_configs": [{"targets": [addr]}]});
    let config = json!({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [
            target("capibara-api", env.api_url().trim_start_matches("http://").to_string()),
            target("capibara-worker", format!("127.0.0.1:{worker_port}")),
            target("capibara-scheduler", format!("127.0.0.1:{scheduler_port}")),
        ],
    });
    // JSON is YAML.
    std::fs::write(dir.0.join("prometheus.yml"), config.to_string()).unwrap();
    let port = find_free_port();
    let log = std::fs::File::create(dir.0.join("prometheus.log")).unwrap();
    let _server = Server(
        Command::new(binary)
            .arg(format!(
                "--config.file={}",
                dir.0.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting prometheus"),
    );
    let prometheus = Prometheus {
        url: format!("http://127.0.0.1:{port}"),
        http: reqwest::Client::new(),
    };
    wait_http_ok(&format!("{}/-/ready", prometheus.url)).await;

    // Act: one job through the whole system.
    let api = env.client();
    let id = api
        .submit_id(json!({"kind": "echo", "input": {"hello": "prometheus"}}))
        .await;
    let job = api.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(job["status"], "succeeded", "{job}");

    // Assert: all three targets up, the job counted by the API and the worker, both scheduler
    // roles led.
    let timeout = Duration::from_secs(60);
    eventually("all three targets up", timeout, || async {
        let up = prometheus.values_by("up", "job").await;
        let mut jobs: Vec<&str> = up
            .iter()
            .filter(|(_, v)| *v == 1.0)
            .map(|(j, _)| j.as_str())
            .collect();
        jobs.sort();
        (jobs == ["capibara-api", "capibara-scheduler", "capibara-worker"]).then_some(())
    })
    .await;
    for (expr, what) in [
        (
            r#"capibara_jobs_submitted_total{kind="echo"}"#,
            "the API's count",
        ),
        (
            r#"capibara_jobs_total{kind="echo", outcome="succeeded"}"#,
            "the worker's count",
        ),
    ] {
        eventually(what, timeout, || async {
            let values = prometheus.values_by(expr, "job").await;
            values.iter().any(|(_, v)| *v >= 1.0).then_some(())
        })
        .await;
    }
    eventually("a leader for each scheduler role", timeout, || async {
        let mut led = prometheus
            .values_by("sum by (role) (capibara_scheduler_leader)", "role")
            .await;
        led.sort_by(|a, b| a.0.cmp(&b.0));
        (led == [("deliverer".into(), 1.0), ("orchestrator".into(), 1.0)]).then_some(())
    })
    .await;

    // Every alert and dashboard expression parses and evaluates on this data (Grafana's
    // variables replaced by what "All" sends).
    for rule in alert_rules() {
        if let Err(e) = prometheus.query(&rule.expr).await {
            panic!("{}: {e}", rule.alert);
        }
    }
    for expr in dashboard_expressions() {
        let expr = expr
            .replace("$__rate_interval", "1m")
            .replace("$queue", ".*")
            .replace("$kind", ".*");
        if let Err(e) = prometheus.query(&expr).await {
            panic!("dashboard: {expr}: {e}");
        }
    }
    // The rule manager evaluated every rule without error, and none of the alerts that say
    // "a process or leader is missing" is pending or firing.
    let rules = alert_rules();
    eventually("every rule evaluated healthy", timeout, || async {
        let groups = prometheus.api("rules", &[]).await.ok()?;
        let evaluated: Vec<Value> = groups["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let healthy =
            evaluated.len() == rules.len() && evaluated.iter().all(|r| r["health"] == "ok");
        healthy.then_some(())
    })
    .await;
    eventually("no missing-process alert active", timeout, || async {
        let alerts = prometheus.api("alerts", &[]).await.ok()?;
        let active: Vec<&str> = alerts["alerts"]
            .as_array()?
            .iter()
            .filter_map(|a| a["labels"]["alertname"].as_str())
            .collect();
        let missing = [
            "CapibaraTargetDown",
            "CapibaraNoWorker",
            "CapibaraSchedulerDown",
            "CapibaraSchedulerNotLeading",
        ];
        (!active.iter().any(|a| missing.contains(a))).then_some(())
    })
    .await;
}
