//! The storage connector types (docs/connectors.md): `files` reads the namespace's directory of
//! `CAPIBARA_FILES_ROOT` and nothing outside it; `s3` reads a bucket of a real S3-compatible
//! server (moto's, as for the artifact store). Both return new and changed files only, with
//! their types and text (PDFs written by lopdf, a library other than the reader's).

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use capibara_tests::Api;
use serde_json::{json, Value};

use super::{
    artifacts_s3::start_s3,
    connectors::{env_allowing_loopback, fetch},
};

/// A one-page PDF saying `line`, written (and its content stream compressed) by lopdf.
fn pdf(line: &str) -> Vec<u8> {
    use lopdf::{
        content::{Content, Operation},
        dictionary, Document, Object, Stream,
    };
    let mut doc = Document::with_version("1.5");
    let pages_id = doc.new_object_id();
    let font_id = doc.add_object(dictionary! {
        "Type" => "Font", "Subtype" => "Type1", "BaseFont" => "Helvetica",
    });
    let resources_id = doc.add_object(dictionary! {"Font" => dictionary! {"F1" => font_id}});
    let content = Content {
        operations: vec![
            Operation::new("BT", vec![]),
            Operation::new("Tf", vec!["F1".into(), 14.into()]),
            Operation::new("Td", vec![72.into(), 700.into()]),
            Operation::new("Tj", vec![Object::string_literal(line)]),
            Operation::new("ET", vec![]),
        ],
    };
    let content_id = doc.add_object(Stream::new(dictionary! {}, content.encode().unwrap()));
    let page_id = doc.add_object(dictionary! {
        "Type" => "Page", "Parent" => pages_id, "Contents" => content_id,
    });
    doc.objects.insert(
        pages_id,
        Object::Dictionary(dictionary! {
            "Type" => "Pages", "Kids" => vec![page_id.into()], "Count" => 1,
            "Resources" => resources_id, "MediaBox" => vec![0.into(), 0.into(), 595.into(), 842.into()],
        }),
    );
    let catalog_id = doc.add_object(dictionary! {"Type" => "Catalog", "Pages" => pages_id});
    doc.trailer.set("Root", catalog_id);
    doc.compress();
    let mut out = Vec::new();
    doc.save_to(&mut out).unwrap();
    out
}

/// Write `bytes` at `dir/rel`, modified `age_s` seconds ago (so the order is the test's).
fn put(dir: &Path, rel: &str, bytes: &[u8], age_s: u64) {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, bytes).unwrap();
    let f = std::fs::File::options().write(true).open(&path).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(age_s))
        .unwrap();
}

fn titles(job: &Value) -> Vec<String> {
    let mut t: Vec<String> = job["output"]["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items: {job}"))
        .iter()
        .map(|i| i["title"].as_str().unwrap().to_string())
        .collect();
    t.sort();
    t
}

async fn jsonl(api: &Api, job: &Value) -> Vec<Value> {
    let r = api
        .send(api.http.get(api.url(&format!(
            "/v1/jobs/{}/artifacts/items.jsonl",
            job["id"].as_str().unwrap()
        ))))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    match r.body {
        Value::String(s) => s
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
        one => vec![one],
    }
}

async fn create(api: &Api, body: Value) -> String {
    let r = api.post("/v1/connectors", body).await;
    assert_eq!(r.status, 201, "{r:?}");
    r.body["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn files_are_read_below_the_namespace_directory_with_their_types_and_text() {
    let root: PathBuf = std::env::temp_dir()
        .join("capibara-test-files")
        .join(uuid::Uuid::now_v7().to_string());
    let docs = root.join("default").join("docs");
    put(&docs, "a.md", b"# Alpha\n\nThe first note.", 100);
    put(&docs, "b.txt", b"plain words", 90);
    put(
        &docs,
        "c.html",
        b"<html><head><title>C</title><script>x()</script></head><body><p>Hello <b>web</b></p></body></html>",
        80,
    );
    put(&docs, "d.json", br#"{"k": "v"}"#, 70);
    put(&docs, "e.csv", b"a,b\n1,2\n", 60);
    put(&docs, "report.pdf", &pdf("Quarterly revenue grew"), 50);
    put(&docs, "img.png", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", 40);
    put(&docs, "sub/deep.md", b"deep down", 30);
    // Another namespace's files, and links out of the directory: never listed.
    put(&root.join("other"), "secret.txt", b"not yours", 20);
    std::os::unix::fs::symlink(root.join("other"), docs.join("escape")).unwrap();
    std::os::unix::fs::symlink(root.join("other/secret.txt"), docs.join("link.txt")).unwrap();
    std::os::unix::fs::symlink(root.join("other"), root.join("default/hop")).unwrap();

    let mut env = env_allowing_loopback().await;
    env.extra_env.push((
        "CAPIBARA_FILES_ROOT".into(),
        root.to_string_lossy().into_owned(),
    ));
    let _procs = env.spawn_all().await;
    let api = env.client();

    // Paths that leave the namespace's directory are refused when the connector is created.
    for bad in ["../other", "/etc", "docs/../../other"] {
        let r = api
            .post(
                "/v1/connectors",
                json!({"name": "x", "type": "files", "config": {"path": bad}}),
            )
            .await;
        assert_eq!(r.status, 422, "{bad}: {r:?}");
        assert!(r.body.to_string().contains("config.path"), "{bad}: {r:?}");
    }
    let r = api
        .post(
            "/v1/connectors",
            json!({"name": "x", "type": "files", "config": {"glob": "a/[b"}}),
        )
        .await;
    assert_eq!(r.status, 422, "{r:?}");

    let id = create(
        &api,
        json!({"name": "docs", "type": "files", "config": {"path": "docs"}}),
    )
    .await;
    let job = fetch(&api, json!({"connector_id": id, "inline_items": 20})).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        titles(&job),
        [
            "a.md",
            "b.txt",
            "c.html",
            "d.json",
            "e.csv",
            "img.png",
            "report.pdf",
            "sub/deep.md"
        ],
        "links are not followed: {job}"
    );
    let items = jsonl(&api, &job).await;
    assert_eq!(items.len(), 8);
    let by = |t: &str| items.iter().find(|i| i["title"] == t).unwrap().clone();
    assert_eq!(
        by("report.pdf")["fields"]["media_type"][0],
        "application/pdf"
    );
    assert!(
        by("report.pdf")["content"]
            .as_str()
            .unwrap()
            .contains("Quarterly revenue grew"),
        "{}",
        by("report.pdf")
    );
    assert_eq!(
        by("c.html")["content"].as_str().unwrap().trim(),
        "Hello web"
    );
    assert_eq!(by("a.md")["fields"]["media_type"][0], "text/markdown");
    assert_eq!(by("e.csv")["fields"]["media_type"][0], "text/csv");
    assert_eq!(by("img.png")["fields"]["media_type"][0], "image/png");
    assert!(by("img.png").get("content").is_none());
    assert_eq!(by("sub/deep.md")["data"]["size"], 9);
    assert!(!job.to_string().contains("not yours"));

    // Nothing changed: nothing new.
    let job = fetch(&api, json!({"connector_id": id})).await;
    assert_eq!(job["output"]["new_items"], 0, "{job}");
    // Touched but unchanged: not new. Changed, and added: new.
    put(&docs, "a.md", b"# Alpha\n\nThe first note.", 0);
    put(&docs, "b.txt", b"plain words, edited", 0);
    put(&docs, "sub/new.txt", b"a new file", 0);
    let job = fetch(&api, json!({"connector_id": id})).await;
    assert_eq!(titles(&job), ["b.txt", "sub/new.txt"], "{job}");

    // A glob, not recursive.
    let job = fetch(
        &api,
        json!({"type": "files", "config": {"path": "docs", "glob": "*.{md,txt}", "recursive": false}}),
    )
    .await;
    assert_eq!(titles(&job), ["a.md", "b.txt"], "{job}");
    // Without text.
    let job = fetch(
        &api,
        json!({"type": "files", "config": {"path": "docs/sub", "extract": false}}),
    )
    .await;
    assert_eq!(titles(&job), ["deep.md", "new.txt"], "{job}");
    assert!(job["output"]["items"][0].get("content").is_none(), "{job}");

    // A directory that is a link out, or that does not exist: the job says so.
    for path in ["hop", "missing"] {
        let job = fetch(&api, json!({"type": "files", "config": {"path": path}})).await;
        assert_eq!(job["status"], "failed", "{job}");
        assert_eq!(job["error"]["type"], "not_found", "{job}");
    }
    // Too many files for the config's limit: refused, not cut.
    let job = fetch(
        &api,
        json!({"type": "files", "config": {"path": "docs", "max_files": 3}}),
    )
    .await;
    assert_eq!(job["error"]["type"], "too_many_files", "{job}");

    // max_items: the rest come with the next fetches, in modification order, none twice.
    let paged = create(
        &api,
        json!({"name": "paged", "type": "files", "config": {"path": "docs"}}),
    )
    .await;
    let mut seen = Vec::new();
    for expect in [3, 3, 3, 0] {
        let job = fetch(&api, json!({"connector_id": paged, "max_items": 3})).await;
        assert_eq!(job["output"]["new_items"], expect, "{job}");
        seen.extend(titles(&job));
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "a.md",
            "b.txt",
            "c.html",
            "d.json",
            "e.csv",
            "img.png",
            "report.pdf",
            "sub/deep.md",
            "sub/new.txt"
        ]
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn s3_objects_are_read_under_a_prefix_and_only_new_ones_return() {
    let s3 = start_s3().await;
    // Another S3 client (boto3, from moto's venv) fills the bucket, as another application
    // would.
    let upload = |key: &str, body: Vec<u8>| {
        let python = super::artifacts_s3::moto_server().with_file_name("python");
        let script = "import boto3, sys\n\
            s3 = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1',\n\
                aws_access_key_id='test', aws_secret_access_key='test')\n\
            try:\n    s3.create_bucket(Bucket='reports')\nexcept s3.exceptions.BucketAlreadyOwnedByYou:\n    pass\n\
            s3.put_object(Bucket='reports', Key=sys.argv[2], Body=sys.stdin.buffer.read())\n";
        let (url, key) = (s3.url.clone(), key.to_string());
        async move {
            let mut child = tokio::process::Command::new(python)
                .args(["-c", script, &url, &key])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            use tokio::io::AsyncWriteExt;
            child.stdin.take().unwrap().write_all(&body).await.unwrap();
            assert!(child.wait().await.unwrap().success(), "uploading {key}");
        }
    };
    upload("2026/q1.txt", b"first quarter".to_vec()).await;
    upload("2026/q2.pdf", pdf("Second quarter figures")).await;
    upload("2026/notes/n.md", b"# notes".to_vec()).await;
    upload("2025/old.txt", b"last year".to_vec()).await;

    let env = env_allowing_loopback().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    for (name, value) in [("S3_KEY_ID", "test"), ("S3_SECRET", "test-secret")] {
        let r = api
            .send(
                api.http
                    .put(api.url(&format!("/v1/secrets/{name}")))
                    .json(&json!({"value": value})),
            )
            .await;
        assert!(r.status < 300, "{r:?}");
    }
    let r = api
        .post(
            "/v1/connectors",
            json!({"name": "x", "type": "s3", "config": {"bucket": "reports", "endpoint": "ftp://x"}}),
        )
        .await;
    assert_eq!(r.status, 422, "{r:?}");
    assert!(r.body.to_string().contains("config.endpoint"), "{r:?}");

    let id = create(
        &api,
        json!({"name": "reports", "type": "s3",
               "config": {"bucket": "reports", "prefix": "2026", "endpoint": s3.url},
               "secrets": {"auth.access_key_id": "S3_KEY_ID",
                           "auth.secret_access_key": "S3_SECRET"}}),
    )
    .await;
    let job = fetch(&api, json!({"connector_id": id})).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(titles(&job), ["notes/n.md", "q1.txt", "q2.pdf"], "{job}");
    let items = jsonl(&api, &job).await;
    let pdf_item = items.iter().find(|i| i["title"] == "q2.pdf").unwrap();
    assert_eq!(pdf_item["url"], "s3://reports/2026/q2.pdf");
    assert!(
        pdf_item["content"]
            .as_str()
            .unwrap()
            .contains("Second quarter figures"),
        "{pdf_item}"
    );
    assert!(!job.to_string().contains("test-secret"));

    let job = fetch(&api, json!({"connector_id": id})).await;
    assert_eq!(job["output"]["new_items"], 0, "{job}");
    upload("2026/q3.txt", b"third quarter".to_vec()).await;
    upload("2026/q1.txt", b"first quarter, restated".to_vec()).await;
    let job = fetch(&api, json!({"connector_id": id})).await;
    assert_eq!(titles(&job), ["q1.txt", "q3.txt"], "{job}");

    // A glob over the keys after the prefix.
    let txt = create(
        &api,
        json!({"name": "text", "type": "s3",
               "config": {"bucket": "reports", "endpoint": s3.url, "glob": "**/*.txt"},
               "secrets": {"auth.access_key_id": "S3_KEY_ID",
                           "auth.secret_access_key": "S3_SECRET"}}),
    )
    .await;
    let job = fetch(&api, json!({"connector_id": txt})).await;
    assert_eq!(
        titles(&job),
        ["2025/old.txt", "2026/q1.txt", "2026/q3.txt"],
        "{job}"
    );
    // Unsigned requests to a private bucket: refused, and the job says so.
    let job = fetch(
        &api,
        json!({"type": "s3", "config": {"bucket": "reports", "endpoint": s3.url}}),
    )
    .await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["type"], "access_denied", "{job}");
    // A bucket that does not exist.
    let job = fetch(
        &api,
        json!({"type": "s3", "config": {"bucket": "no-such-bucket", "endpoint": s3.url}}),
    )
    .await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["type"], "not_found", "{job}");
}
