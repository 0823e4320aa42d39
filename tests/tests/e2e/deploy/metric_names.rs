//! Every metric and label the dashboard (deploy/grafana/capibara.json), the alert rules and
//! their unit tests (deploy/prometheus/) and the KEDA scalers (deploy/k8s/base/worker-*.yaml)
//! use is one Capibara exports: in the catalog (`capibara_shared::metric_catalog::METRICS`) and
//! in its documented table (docs/configuration.md). A renamed metric or label fails here.

use capibara_shared::metric_catalog::{MetricType, METRICS};
use serde_json::Value;

use super::{promql, read};

/// Labels Prometheus adds to every series it scrapes, and the one deploy/prometheus adds.
const TARGET_LABELS: &[&str] = &["job", "instance", "worker_group"];

/// The label names `name` may carry, or why it is not ours.
fn labels_of(name: &str) -> Result<Vec<String>, String> {
    let mut labels: Vec<String> = TARGET_LABELS.iter().map(|l| l.to_string()).collect();
    if name == "up" {
        return Ok(labels);
    }
    let documented = |base: &str| read("docs/configuration.md").contains(&format!("`{base}`"));
    if name.starts_with("process_") {
        return documented(name)
            .then_some(labels)
            .ok_or_else(|| format!("{name} is not a documented process metric"));
    }
    let found = METRICS.iter().find_map(|spec| {
        if spec.name == name {
            return Some((spec, false));
        }
        let suffix = name.strip_prefix(spec.name)?;
        let histogram_series =
            spec.kind == MetricType::Histogram && ["_bucket", "_sum", "_count"].contains(&suffix);
        histogram_series.then_some((spec, suffix == "_bucket"))
    });
    let Some((spec, bucket)) = found else {
        return Err(format!("{name} is not in the metric catalog"));
    };
    if !documented(spec.name) {
        return Err(format!("{} is not in docs/configuration.md", spec.name));
    }
    labels.extend(spec.labels.iter().map(|(l, _)| l.to_string()));
    if bucket {
        labels.push("le".into());
    }
    Ok(labels)
}

/// What is wrong with `expr`: unknown metrics, and labels none of its metrics carry.
fn problems(expr: &str) -> Vec<String> {
    let uses = promql::uses(expr);
    let mut out = Vec::new();
    let mut all_labels = Vec::new();
    for metric in &uses.metrics {
        match labels_of(&metric.name) {
            Ok(labels) => {
                for label in &metric.labels {
                    if !labels.contains(label) {
                        out.push(format!("{} has no label {label}", metric.name));
                    }
                }
                all_labels.extend(labels);
            }
            Err(e) => out.push(e),
        }
    }
    if uses.metrics.is_empty() {
        out.push("uses no Capibara metric".into());
    }
    for label in &uses.grouping {
        if !all_labels.contains(label) {
            out.push(format!(
                "groups by {label}, which none of its metrics carry"
            ));
        }
    }
    out
}

/// The dashboard's queries: panel targets, and the `label_values(metric, label)` variables
/// (checked as `metric{label=""}`).
pub fn dashboard_expressions() -> Vec<String> {
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/capibara.json")).unwrap();
    let mut out = Vec::new();
    collect_exprs(&dashboard, &mut out);
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(def) = variable["definition"].as_str() {
            let args = def
                .strip_prefix("label_values(")
                .and_then(|d| d.strip_suffix(')'))
                .unwrap_or_else(|| panic!("unexpected variable query {def}"));
            let (metric, label) = args.split_once(',').unwrap();
            out.push(format!("{}{{{}=\"\"}}", metric.trim(), label.trim()));
        }
    }
    out
}

fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

fn yaml(path: &str) -> serde_json::Value {
    serde_norway::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// One alerting rule of deploy/prometheus/alerts.yml.
pub struct Rule {
    pub alert: String,
    pub expr: String,
    /// Its `runbook` annotation.
    pub runbook: String,
}

pub fn alert_rules() -> Vec<Rule> {
    let rules = yaml("deploy/prometheus/alerts.yml");
    rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .map(|r| Rule {
            alert: r["alert"].as_str().unwrap().to_string(),
            expr: r["expr"].as_str().unwrap().to_string(),
            runbook: r["annotations"]["runbook"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        })
        .collect()
}

/// The series the rules' unit tests feed in.
fn rule_test_series() -> Vec<String> {
    let tests = yaml("deploy/prometheus/alerts.test.yml");
    tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["input_series"].as_array().unwrap().iter())
        .map(|s| s["series"].as_str().unwrap().to_string())
        .collect()
}

/// The KEDA scalers' Prometheus queries.
fn scaler_queries() -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(super::repo().join("deploy/k8s/base")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let doc: Value = serde::Deserialize::deserialize(doc).unwrap();
            if doc["kind"] == "ScaledObject" {
                for trigger in doc["spec"]["triggers"].as_array().unwrap() {
                    out.push(trigger["metadata"]["query"].as_str().unwrap().to_string());
                }
            }
        }
    }
    out
}

#[test]
fn the_dashboard_rules_and_scalers_use_only_exported_metrics_and_labels() {
    let sources: [(&str, Vec<String>, usize); 4] = [
        ("deploy/grafana/capibara.json", dashboard_expressions(), 30),
        (
            "deploy/prometheus/alerts.yml",
            alert_rules().into_iter().map(|r| r.expr).collect(),
            10,
        ),
        ("deploy/prometheus/alerts.test.yml", rule_test_series(), 10),
        ("deploy/k8s/base (ScaledObjects)", scaler_queries(), 4),
    ];
    let mut wrong = Vec::new();
    for (source, exprs, at_least) in &sources {
        assert!(
            exprs.len() >= *at_least,
            "{source}: read only {} expressions",
            exprs.len()
        );
        for expr in exprs {
            for problem in problems(expr) {
                wrong.push(format!("{source}: {problem} in {expr}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The check itself catches a renamed metric, a label a metric lacks, and a wrong grouping.
#[test]
fn a_renamed_metric_or_label_is_caught() {
    assert!(problems("sum(rate(capibara_jobs_total{kind=\"echo\"}[5m]))").is_empty());
    assert!(problems(
        "histogram_quantile(0.9, sum by (le) (rate(capibara_job_run_seconds_bucket[5m])))"
    )
    .is_empty());
    assert_eq!(
        problems("rate(capibara_jobs_submited_total[5m])"),
        ["capibara_jobs_submited_total is not in the metric catalog"]
    );
    assert_eq!(
        problems("capibara_queue_depth{kind=\"echo\"}"),
        ["capibara_queue_depth has no label kind"]
    );
    assert_eq!(
        problems("sum by (le) (capibara_job_run_seconds_sum)"),
        ["groups by le, which none of its metrics carry"]
    );
}
