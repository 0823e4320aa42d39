//! deploy/k8s: `kubectl kustomize` renders each overlay (kustomize v2.0.3 of Debian 12's
//! kubectl 1.20 and newer ones alike), and the render holds what a Capibara install needs:
//! Deployments for the API, the scheduler and one worker per queue group with resources and
//! probes on /healthz and /readyz, the API's Service and Ingress, the migrations Job,
//! PodDisruptionBudgets, a KEDA ScaledObject per worker on its queue depth, and the settings
//! from a ConfigMap and a Secret.

use std::process::Command;

use serde_json::Value;

use super::{bin_targets, repo, run_ok, tool};

fn render(kubectl: &std::path::Path, overlay: &str) -> Vec<Value> {
    let yaml = run_ok(Command::new(kubectl).args(["kustomize", overlay]));
    serde_norway::Deserializer::from_str(&yaml)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .filter(|doc: &Value| !doc.is_null())
        .collect()
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn containers(workload: &Value) -> Vec<&Value> {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .map(|c| c.iter().collect())
        .unwrap_or_default()
}

/// The Capibara container of a Deployment: probes, resources, a known binary, its settings.
fn check_capibara_deployment(objects: &[Value], deployment: &Value, overlay: &str) {
    let name = deployment["metadata"]["name"].as_str().unwrap();
    let c = containers(deployment)[0];
    let bins = bin_targets();
    let command = c["command"][0].as_str().unwrap_or_default();
    assert!(
        bins.iter().any(|b| b == command),
        "{overlay} {name}: runs {command:?}"
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"], "/healthz",
        "{overlay} {name}"
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"], "/readyz",
        "{overlay} {name}"
    );
    assert!(
        c["resources"]["requests"]["cpu"].is_string()
            && c["resources"]["requests"]["memory"].is_string()
            && c["resources"]["limits"]["memory"].is_string(),
        "{overlay} {name}: resources {}",
        c["resources"]
    );
    let sources: Vec<(&str, &str)> = c["envFrom"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| {
            [
                ("ConfigMap", &s["configMapRef"]),
                ("Secret", &s["secretRef"]),
            ]
            .into_iter()
            .filter_map(|(kind, r)| Some((kind, r["name"].as_str()?)))
        })
        .collect();
    let config = sources.iter().find(|(k, _)| *k == "ConfigMap").unwrap().1;
    named(objects, "ConfigMap", config);
    let secret = sources.iter().find(|(k, _)| *k == "Secret").unwrap().1;
    // dev generates its Secret; production expects `capibara-secrets` made beforehand.
    let generated = of_kind(objects, "Secret")
        .iter()
        .any(|s| s["metadata"]["name"] == secret);
    assert!(
        generated || secret == "capibara-secrets",
        "{overlay} {name}: Secret {secret} is neither rendered nor capibara-secrets"
    );
    let pdb = of_kind(objects, "PodDisruptionBudget")
        .into_iter()
        .any(|p| {
            let selector = p["spec"]["selector"]["matchLabels"].as_object().unwrap();
            let labels = &deployment["spec"]["template"]["metadata"]["labels"];
            selector.iter().all(|(k, v)| &labels[k] == v)
        });
    assert!(
        pdb,
        "{overlay} {name}: no PodDisruptionBudget selects its pods"
    );
}

#[test]
fn each_kustomize_overlay_renders_a_complete_install() {
    let Some(kubectl) = tool("kubectl", "kubernetes-client") else {
        return;
    };
    let overlays: Vec<String> = std::fs::read_dir(repo().join("deploy/k8s/overlays"))
        .unwrap()
        .map(|e| {
            format!(
                "deploy/k8s/overlays/{}",
                e.unwrap().file_name().to_string_lossy()
            )
        })
        .collect();
    assert!(overlays.len() >= 2, "{overlays:?}");
    for overlay in &overlays {
        let objects = render(&kubectl, overlay);

        for name in ["capibara-api", "capibara-scheduler"] {
            check_capibara_deployment(&objects, named(&objects, "Deployment", name), overlay);
        }
        let workers: Vec<&Value> = of_kind(&objects, "Deployment")
            .into_iter()
            .filter(|d| d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker")
            .collect();
        assert!(
            workers.len() >= 3,
            "{overlay}: one worker Deployment per queue group"
        );
        for worker in &workers {
            check_capibara_deployment(&objects, worker, overlay);
            let name = worker["metadata"]["name"].as_str().unwrap();
            let args = containers(worker)[0]["command"].to_string();
            assert!(args.contains("--queues"), "{overlay} {name}: {args}");
            let scaler = named(&objects, "ScaledObject", name);
            assert_eq!(scaler["spec"]["scaleTargetRef"]["name"], name);
            let trigger = &scaler["spec"]["triggers"][0];
            assert_eq!(trigger["type"], "prometheus", "{overlay} {name}");
            assert!(
                trigger["metadata"]["query"]
                    .as_str()
                    .is_some_and(|q| q.contains("capibara_queue_depth")),
                "{overlay} {name}: scales on {trigger}"
            );
        }

        let service = named(&objects, "Service", "capibara-api");
        assert_eq!(
            service["spec"]["selector"]["app.kubernetes.io/component"],
            "api"
        );
        let ingress = named(&objects, "Ingress", "capibara");
        let backends = ingress["spec"]["rules"][0]["http"]["paths"].to_string();
        assert!(backends.contains("capibara-api"), "{overlay}: {backends}");
        assert!(
            backends.contains("capibara-scheduler"),
            "{overlay}: hooks, {backends}"
        );

        let job = named(&objects, "Job", "capibara-migrate");
        let migrate = &job["spec"]["template"]["spec"]["containers"][0]["command"];
        assert_eq!(
            migrate,
            &serde_json::json!(["capibara", "migrate"]),
            "{overlay}"
        );

        // Every object in the overlay's namespace, every Capibara container on one image.
        let namespace = objects[0]["metadata"]["namespace"].clone();
        assert!(namespace.is_string(), "{overlay}: no namespace");
        let mut images: Vec<String> = Vec::new();
        for o in &objects {
            assert_eq!(
                o["metadata"]["namespace"], namespace,
                "{overlay}: {}",
                o["metadata"]
            );
            let template = if o["kind"] == "Job" || o["kind"] == "Deployment" {
                containers(o)
            } else {
                Vec::new()
            };
            for c in template {
                let image = c["image"].as_str().unwrap().to_string();
                if image.contains("capibara") && !images.contains(&image) {
                    images.push(image);
                }
            }
        }
        assert_eq!(images.len(), 1, "{overlay}: images {images:?}");
    }
}
