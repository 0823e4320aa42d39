//! The served `/openapi.json`, checked from outside with the reference tools from PyPI that
//! deploy/test.sh installs into target/capibara-test/openapi-tools (`CAPIBARA_TEST_OPENAPI_TOOLS`
//! names its `bin` directory):
//! - openapi-spec-validator: the document is valid OpenAPI 3.1;
//! - (tests/tests/e2e/openapi_fuzz.rs: schemathesis fuzzes every operation.)

use std::{collections::HashSet, path::PathBuf, process::Command};

use capibara_tests::TestEnv;
use serde_json::Value;

/// One tool from the OpenAPI venv; panics with how to install it.
fn openapi_tool(name: &str) -> PathBuf {
    let dir = std::env::var_os("CAPIBARA_TEST_OPENAPI_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/capibara-test/openapi-tools/bin")
        });
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: deploy/test.sh installs openapi-spec-validator and schemathesis from PyPI \
         into target/capibara-test/openapi-tools (or point CAPIBARA_TEST_OPENAPI_TOOLS at a bin \
         directory holding them)",
        path.display()
    );
    path
}

async fn served_document(env: &TestEnv) -> (String, Value) {
    let text = reqwest::get(format!("{}/openapi.json", env.api_url()))
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .text()
        .await
        .unwrap();
    let doc = serde_json::from_str(&text).unwrap();
    (text, doc)
}

#[tokio::test]
async fn served_document_is_valid_openapi_3_1_with_unique_operation_ids() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let (text, doc) = served_document(&env).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));

    let file = std::env::temp_dir().join(format!("capibara-openapi-{}.json", env.api_port));
    std::fs::write(&file, &text).unwrap();
    let out = Command::new(openapi_tool("openapi-spec-validator"))
        .arg(&file)
        .output()
        .expect("running openapi-spec-validator");
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "openapi-spec-validator rejects /openapi.json:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let mut ids = HashSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path}: no operationId"));
            assert!(
                ids.insert(id.to_string()),
                "operationId {id} repeats ({method} {path})"
            );
        }
    }
    // Stable names clients are generated with (docs/api.md promises they do not change).
    for id in [
        "submitJob",
        "listJobs",
        "getJob",
        "getRun",
        "listRuns",
        "createSchedule",
        "clearCodeCache",
    ] {
        assert!(ids.contains(id), "operationId {id} is gone");
    }
}

/// Found by fuzzing: an `older_than_hours` past the time range was a 500 (the cutoff overflowed);
/// it is a 422 naming the parameter, as the document's `maximum` says.
#[tokio::test]
async fn an_out_of_range_older_than_hours_is_a_422_naming_it() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let api = env.client();
    for v in [
        "4.8e156",
        "1.9610841895019024e16",
        "876001",
        "-1",
        "inf",
        "NaN",
    ] {
        let r = api
            .send(
                api.http
                    .delete(api.url(&format!("/v1/code/cache?older_than_hours={v}"))),
            )
            .await;
        assert_eq!(r.status, 422, "older_than_hours={v}: {r:?}");
        assert_eq!(r.body["errors"][0]["field"], "older_than_hours", "{r:?}");
    }
    let r = api
        .send(
            api.http
                .delete(api.url("/v1/code/cache?older_than_hours=876000")),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
}
