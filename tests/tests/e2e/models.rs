//! Model kinds (docs/models.md) through the API: `text.embed` returns unit vectors that put a
//! paraphrase near its sentence, refuses bad inputs at submission, and serves several jobs from
//! one loaded model.

use std::time::Duration;

use capibara_tests::TestEnv;
use serde_json::{json, Value};

fn dot(a: &Value, b: &Value) -> f64 {
    a.as_array()
        .unwrap()
        .iter()
        .zip(b.as_array().unwrap())
        .map(|(x, y)| x.as_f64().unwrap() * y.as_f64().unwrap())
        .sum()
}

#[tokio::test]
async fn text_embed_returns_sentence_vectors() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();

    for (body, field) in [
        (json!({"texts": []}), "texts"),
        (json!({"texts": ["a"], "model": "gpt-4"}), "model"),
        (json!({"text": "a"}), "text"),
    ] {
        let r = api
            .submit(json!({"kind": "text.embed", "input": body}))
            .await;
        assert_eq!(r.status, 422, "{r:?}");
        assert!(
            r.body["errors"][0]["field"]
                .as_str()
                .unwrap()
                .contains(field),
            "{r:?}"
        );
    }

    let texts = json!([
        "The invoice was paid on time.",
        "Payment for the bill arrived before the deadline.",
        "Penguins live in the southern hemisphere.",
    ]);
    let mut outputs = Vec::new();
    for _ in 0..2 {
        let id = api
            .submit_id(json!({"kind": "text.embed", "input": {"texts": texts}}))
            .await;
        let job = api.wait_terminal(&id, Duration::from_secs(120)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["queue"], "models");
        outputs.push(job["output"].clone());
    }
    let out = &outputs[0];
    assert_eq!(out["model"], "all-minilm-l6-v2");
    assert_eq!(out["dimensions"], 384);
    let v = out["vectors"].as_array().unwrap();
    assert_eq!(v.len(), 3);
    assert_eq!(v[0].as_array().unwrap().len(), 384);
    assert!((dot(&v[0], &v[0]) - 1.0).abs() < 1e-3);
    assert!(
        dot(&v[0], &v[1]) > dot(&v[0], &v[2]) + 0.3,
        "{} vs {}",
        dot(&v[0], &v[1]),
        dot(&v[0], &v[2])
    );
    assert_eq!(out["truncated"], json!([false, false, false]));
    // The second job got the same vectors from the model the first one loaded.
    assert_eq!(outputs[1]["vectors"], out["vectors"]);
}
