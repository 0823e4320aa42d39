//! The artifact store on S3: a real S3-compatible server (moto's, from PyPI; deploy/test.sh
//! installs it into target/capibara-test/moto) on loopback stands in for AWS. A `tts.render`
//! job's WAV goes into the bucket and comes back through `GET /v1/jobs/{id}/artifacts/{name}`.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use capibara_shared::artifacts::ArtifactStore;
use capibara_tests::{find_free_port, wait_http_ok, TestEnv};
use capibara_tts::audio::{parse_wav, rms};
use serde_json::json;

/// A moto S3 server, killed on drop.
pub(super) struct S3Server {
    child: Child,
    pub(super) url: String,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(super) fn moto_server() -> PathBuf {
    let path = std::env::var_os("CAPIBARA_TEST_MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/capibara-test/moto/bin/moto_server")
        });
    assert!(
        path.exists(),
        "{} is missing: deploy/test.sh installs moto[server] from PyPI there",
        path.display()
    );
    path
}

pub(super) async fn start_s3() -> S3Server {
    let port = find_free_port();
    let child = Command::new(moto_server())
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting moto_server");
    let url = format!("http://127.0.0.1:{port}");
    let server = S3Server { child, url };
    wait_http_ok(&format!("{}/moto-api/", server.url)).await;
    server
}

#[tokio::test]
async fn tts_audio_is_stored_in_an_s3_bucket_and_served_from_it() {
    let s3 = start_s3().await;
    let http = reqwest::Client::new();
    // moto takes unsigned requests: create the bucket the way an operator would beforehand.
    let made = http
        .put(format!("{}/capibara-artifacts", s3.url))
        .send()
        .await
        .unwrap();
    assert!(made.status().is_success(), "{made:?}");
    let mut env = TestEnv::new().await;
    for (k, v) in [
        (
            "CAPIBARA_ARTIFACTS",
            "s3://capibara-artifacts/test-run".to_string(),
        ),
        ("AWS_ENDPOINT_URL", s3.url.clone()),
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("AWS_REGION", "us-east-1".into()),
    ] {
        env.extra_env.push((k.into(), v));
    }
    let _procs = env.spawn_all().await;
    let api = env.client();

    let r = api
        .send(
            api.http
                .post(api.url("/v1/tts"))
                .header("Prefer", "wait=60")
                .json(&json!({"text": "Stored in a bucket."})),
        )
        .await;

    assert_eq!(r.status, 200, "{r:?}");
    let id = r.body["job_id"].as_str().unwrap().to_string();
    let artifact = &r.body["job"]["artifacts"][0];
    assert_eq!(
        artifact["location"],
        format!("s3://capibara-artifacts/test-run/jobs/{id}/audio.wav")
    );
    // Through the API: whole and ranged.
    let served = api
        .http
        .get(api.url(r.body["audio_url"].as_str().unwrap()))
        .bearer_auth(&api.key)
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
    assert_eq!(served.headers()["content-type"], "audio/wav");
    let bytes = served.bytes().await.unwrap();
    let wav = parse_wav(&bytes).unwrap();
    assert!(rms(&wav.samples) > 0.02);
    let part = api
        .http
        .get(api.url(r.body["audio_url"].as_str().unwrap()))
        .bearer_auth(&api.key)
        .header("Range", "bytes=4-7")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.bytes().await.unwrap(), bytes[4..8]);
    // In the bucket itself (read with this process's own signed client).
    for (k, v) in &env.extra_env {
        if k.starts_with("AWS_") {
            std::env::set_var(k, v);
        }
    }
    let bucket = ArtifactStore::open("s3://capibara-artifacts/test-run").unwrap();
    let direct = tokio::time::timeout(
        Duration::from_secs(10),
        bucket.get(artifact["location"].as_str().unwrap(), None),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(direct.bytes, bytes);
}
