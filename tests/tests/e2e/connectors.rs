//! Connectors (docs/connectors.md): configuration checked against the type's schema, each a
//! stream; `connector.fetch` against a local feed server returns only new items, the cursor
//! (ETag) and the returned items' hashes move with the job's success, two overlapping fetches
//! never return an item twice, and hostile servers end the job with a clear error.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::Body,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use capibara_tests::{eventually, Api, TestEnv};
use serde_json::{json, Value};

/// A feed whose items the test changes; answers 304 to its current ETag, and 401 without the
/// token when one is set.
#[derive(Default)]
struct Feed {
    items: Vec<(String, String)>,
    version: u64,
    token: Option<String>,
    delay_ms: u64,
    hits: u64,
    not_modified: u64,
}

type Shared = Arc<Mutex<Feed>>;

fn rss(items: &[(String, String)]) -> String {
    let mut s = String::from(
        r#"<?xml version="1.0" encoding="utf-8"?><rss version="2.0"><channel><title>Local</title><link>http://feed.test/</link><description>d</description>"#,
    );
    for (k, (guid, title)) in items.iter().enumerate() {
        s.push_str(&format!(
            "<item><title>{title}</title><link>/posts/{title}</link><guid>{guid}</guid>\
             <pubDate>Tue, 01 Dec 2026 {:02}:00:00 GMT</pubDate><description>About {title}</description></item>",
            k % 24
        ));
    }
    s.push_str("</channel></rss>");
    s
}

async fn feed(State(f): State<Shared>, headers: HeaderMap) -> Response {
    let (delay, body, etag) = {
        let mut f = f.lock().unwrap();
        f.hits += 1;
        if let Some(t) = &f.token {
            let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
            if auth != Some(&format!("Bearer {t}")) {
                return StatusCode::UNAUTHORIZED.into_response();
            }
        }
        let etag = format!("\"v{}\"", f.version);
        if headers.get("if-none-match").and_then(|v| v.to_str().ok()) == Some(etag.as_str()) {
            f.not_modified += 1;
            return (StatusCode::NOT_MODIFIED, [("etag", etag)]).into_response();
        }
        (f.delay_ms, rss(&f.items), etag)
    };
    tokio::time::sleep(Duration::from_millis(delay)).await;
    (
        [
            ("etag", etag),
            ("content-type", "application/rss+xml".into()),
        ],
        body,
    )
        .into_response()
}

/// Bytes forever.
async fn endless() -> Response {
    let chunk = vec![b'x'; 64 * 1024];
    let stream = futures::stream::repeat_with(move || Ok::<_, std::io::Error>(chunk.clone()));
    Body::from_stream(stream).into_response()
}

/// One byte every 300 ms, forever (slowloris).
async fn drip() -> Response {
    let stream = futures::stream::unfold((), |()| async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Some((Ok::<_, std::io::Error>(vec![b'<']), ()))
    });
    Body::from_stream(stream).into_response()
}

async fn redirect_loop() -> Response {
    (StatusCode::FOUND, [("location", "/loop")]).into_response()
}

async fn malformed() -> Response {
    "<rss version=\"2.0\"><channel><item><title>broken</tit".into_response()
}

async fn unavailable() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [("retry-after", "1")],
        "busy",
    )
        .into_response()
}

/// 50 MB of zeros gzip-compressed (about 50 KB), served as `Content-Encoding: gzip`.
async fn gzip_bomb(State(bomb): State<Arc<Vec<u8>>>) -> Response {
    (
        [
            ("content-encoding", "gzip"),
            ("content-type", "application/rss+xml"),
        ],
        bomb.as_ref().clone(),
    )
        .into_response()
}

async fn serve(feed_state: Shared) -> String {
    let bomb = std::process::Command::new("python3")
        .args([
            "-c",
            "import gzip,sys; sys.stdout.buffer.write(gzip.compress(bytes(50_000_000)))",
        ])
        .output()
        .expect("python3 makes the gzip bomb")
        .stdout;
    assert!(bomb.len() < 200_000, "{}", bomb.len());
    let app = Router::new()
        .route("/feed.xml", get(feed))
        .with_state(feed_state)
        .route("/endless", get(endless))
        .route("/drip", get(drip))
        .route("/loop", get(redirect_loop))
        .route("/malformed", get(malformed))
        .route("/unavailable", get(unavailable))
        .route("/bomb", get(gzip_bomb).with_state(Arc::new(bomb)));
    listen(app).await
}

/// Serve `app` on a free loopback port; its base URL.
async fn listen(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

pub(super) async fn env_allowing_loopback() -> TestEnv {
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("CAPIBARA_OUTBOUND_ALLOW_PRIVATE".into(), "true".into()));
    env
}

pub(super) async fn fetch(api: &Api, input: Value) -> Value {
    let id = api
        .submit_id(json!({"kind": "connector.fetch", "input": input, "max_attempts": 3}))
        .await;
    api.wait_terminal(&id, Duration::from_secs(60)).await
}

pub(super) async fn stream_types(env: &TestEnv, id: &str) -> Vec<String> {
    let rows: Vec<(String,)> =
        sqlx::query_as("SELECT type FROM events WHERE stream_id = $1::uuid ORDER BY version")
            .bind(id)
            .fetch_all(&env.pool().await)
            .await
            .unwrap();
    rows.into_iter().map(|(t,)| t).collect()
}

#[tokio::test]
async fn connectors_are_configuration_checked_against_their_types_schema() {
    let env = env_allowing_loopback().await;
    let _api = env.spawn_api().await;
    let api = env.client();

    // The catalog: each type's config schema accepts its example (an independent validator).
    let types = api.get("/v1/connector-types").await;
    assert_eq!(types.status, 200, "{types:?}");
    let rss = types.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type"] == "rss")
        .expect("rss is in the catalog")
        .clone();
    let schema = jsonschema::validator_for(&rss["config_schema"]).unwrap();
    assert!(schema.is_valid(&rss["example"]), "{rss}");
    assert!(!schema.is_valid(&json!({"url": 5})));

    // Bad definitions are 422s naming the field.
    let field = |body: Value| {
        let api = api.clone();
        async move {
            let r = api.post("/v1/connectors", body).await;
            assert_eq!(r.status, 422, "{r:?}");
            r.body["errors"][0]["field"].as_str().unwrap().to_string()
        }
    };
    let url = "http://127.0.0.1:9/feed.xml";
    assert_eq!(
        field(json!({"name": "x", "type": "gopher", "config": {}})).await,
        "type"
    );
    assert_eq!(
        field(json!({"name": "x", "type": "rss", "config": {}})).await,
        "config.url"
    );
    assert_eq!(
        field(json!({"name": "x", "type": "rss", "config": {"url": "file:///etc/passwd"}})).await,
        "config.url"
    );
    assert_eq!(
        field(json!({"name": "x", "type": "rss", "config": {"url": url, "max_bytes": 1}})).await,
        "config.max_bytes"
    );
    assert_eq!(
        field(json!({"name": "x", "type": "rss", "config": {"url": url}, "secrets": {"url": "T"}}))
            .await,
        "secrets.url"
    );
    assert_eq!(
        field(json!({"name": "", "type": "rss", "config": {"url": url}})).await,
        "name"
    );

    // Create, read, list, update, delete; every change is an event of the connector's stream.
    let created = api
        .post(
            "/v1/connectors",
            json!({"name": "news", "type": "rss", "config": {"url": url},
                   "secrets": {"headers.Authorization": "FEED_TOKEN"}}),
        )
        .await;
    assert_eq!(created.status, 201, "{created:?}");
    let id = created.body["id"].as_str().unwrap().to_string();
    assert_eq!(created.body["cursor"], Value::Null);
    assert_eq!(
        created.body["secrets"],
        json!({"headers.Authorization": "FEED_TOKEN"})
    );
    let got = api.get(&format!("/v1/connectors/{id}")).await;
    assert_eq!((got.status, &got.body["name"]), (200, &json!("news")));
    let list = api.get("/v1/connectors").await;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 1);
    let put = api
        .send(
            api.http
                .put(api.url(&format!("/v1/connectors/{id}")))
                .json(&json!({"name": "news 2", "type": "rss", "config": {"url": url}})),
        )
        .await;
    assert_eq!(put.status, 200, "{put:?}");
    assert_eq!(
        (put.body["name"].as_str(), put.body["version"].as_i64()),
        (Some("news 2"), Some(2))
    );
    let bad_put = api
        .send(
            api.http
                .put(api.url(&format!("/v1/connectors/{id}")))
                .json(&json!({"name": "n", "type": "rss", "config": {"url": 1}})),
        )
        .await;
    assert_eq!(
        bad_put.body["errors"][0]["field"], "config.url",
        "{bad_put:?}"
    );
    let del = api
        .send(api.http.delete(api.url(&format!("/v1/connectors/{id}"))))
        .await;
    assert_eq!(del.status, 204, "{del:?}");
    assert_eq!(api.get(&format!("/v1/connectors/{id}")).await.status, 404);
    assert_eq!(api.get("/v1/connectors/nope").await.status, 404);
    assert_eq!(
        stream_types(&env, &id).await,
        vec!["ConnectorCreated", "ConnectorUpdated", "ConnectorDeleted"]
    );
    // Another namespace does not see it.
    let other = api.key_for("other", &["admin"]).await;
    let created = api
        .post(
            "/v1/connectors",
            json!({"name": "n", "type": "rss", "config": {"url": url}}),
        )
        .await;
    let id = created.body["id"].as_str().unwrap();
    assert_eq!(other.get(&format!("/v1/connectors/{id}")).await.status, 404);
}

#[tokio::test]
async fn fetches_return_only_new_items_and_the_cursor_moves_with_the_jobs_success() {
    let env = env_allowing_loopback().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let state: Shared = Arc::default();
    {
        let mut f = state.lock().unwrap();
        f.items = (1..=3)
            .map(|k| (format!("g{k}"), format!("post-{k}")))
            .collect();
        f.token = Some("s3cret-token".into());
    }
    let base = serve(state.clone()).await;
    let r = api
        .send(
            api.http
                .put(api.url("/v1/secrets/FEED_TOKEN"))
                .json(&json!({"value": "Bearer s3cret-token"})),
        )
        .await;
    assert!(r.status < 300, "{r:?}");
    let c = api
        .post(
            "/v1/connectors",
            json!({"name": "local", "type": "rss", "config": {"url": format!("{base}/feed.xml")},
                   "secrets": {"headers.Authorization": "FEED_TOKEN"}}),
        )
        .await;
    assert_eq!(c.status, 201, "{c:?}");
    let cid = c.body["id"].as_str().unwrap().to_string();

    // First fetch: everything is new; all of it in items.jsonl.
    let job = fetch(&api, json!({"connector_id": cid, "inline_items": 2})).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let out = &job["output"];
    assert_eq!(
        (out["fetched"].as_u64(), out["new_items"].as_u64()),
        (Some(3), Some(3)),
        "{out}"
    );
    assert_eq!(out["items"].as_array().unwrap().len(), 2);
    assert_eq!(out["items"][0]["url"], format!("{base}/posts/post-1"));
    assert_eq!(out["cursor"]["etag"], "\"v0\"");
    assert!(
        !job.to_string().contains("s3cret-token"),
        "the secret stays out of the job"
    );
    let jsonl = api
        .send(api.http.get(api.url(&format!(
            "/v1/jobs/{}/artifacts/items.jsonl",
            job["id"].as_str().unwrap()
        ))))
        .await;
    assert_eq!(jsonl.status, 200);
    let lines: Vec<Value> = jsonl
        .body
        .as_str()
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["title"], "post-3");

    // Unchanged: the feed answers 304 to the stored ETag; nothing new.
    let job = fetch(&api, json!({"connector_id": cid})).await;
    assert_eq!(job["output"]["not_modified"], true, "{job}");
    assert_eq!(job["output"]["new_items"], 0);
    assert_eq!(state.lock().unwrap().not_modified, 1);

    // One new post, and an old one republished under a new GUID (same content): one is new.
    {
        let mut f = state.lock().unwrap();
        f.items.push(("g4".into(), "post-4".into()));
        f.items.push(("g1-again".into(), "post-1".into()));
        f.version += 1;
    }
    let job = fetch(&api, json!({"connector_id": cid})).await;
    let out = &job["output"];
    assert_eq!(
        (out["fetched"].as_u64(), out["new_items"].as_u64()),
        (Some(5), Some(1)),
        "{out}"
    );
    assert_eq!(out["items"][0]["title"], "post-4");

    // More new items than max_items: the rest come with the next fetch (the ETag is not kept,
    // so the feed is read again).
    {
        let mut f = state.lock().unwrap();
        for k in 5..=7 {
            f.items.push((format!("g{k}"), format!("post-{k}")));
        }
        f.version += 1;
    }
    let job = fetch(&api, json!({"connector_id": cid, "max_items": 2})).await;
    assert_eq!(
        (
            job["output"]["new_items"].as_u64(),
            job["output"]["more"].as_bool()
        ),
        (Some(2), Some(true)),
        "{job}"
    );
    let job = fetch(&api, json!({"connector_id": cid, "max_items": 2})).await;
    assert_eq!(
        (
            job["output"]["new_items"].as_u64(),
            job["output"]["more"].as_bool()
        ),
        (Some(1), Some(false)),
        "{job}"
    );
    assert_eq!(job["output"]["items"][0]["title"], "post-7");

    // The connector's row and stream record it all.
    let c = api.get(&format!("/v1/connectors/{cid}")).await.body;
    assert_eq!(
        (c["fetches"].as_i64(), c["items_total"].as_i64()),
        (Some(5), Some(7)),
        "{c}"
    );
    assert_eq!(c["cursor"]["etag"], "\"v2\"");
    let types = stream_types(&env, &cid).await;
    assert_eq!(
        types.iter().filter(|t| *t == "ConnectorFetched").count(),
        5,
        "{types:?}"
    );
    assert_eq!(
        types.iter().filter(|t| *t == "CursorAdvanced").count(),
        4,
        "{types:?}"
    );
    let (hashes,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM connector_items WHERE connector_id = $1::uuid")
            .bind(&cid)
            .fetch_one(&env.pool().await)
            .await
            .unwrap();
    assert_eq!(hashes, 7);

    // A failed fetch is an event too, and the connector shows the last error.
    state.lock().unwrap().token = Some("rotated".into());
    let job = fetch(&api, json!({"connector_id": cid})).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["type"], "http_status");
    let c = api.get(&format!("/v1/connectors/{cid}")).await.body;
    assert_eq!(c["last_error"]["type"], "http_status", "{c}");
    assert!(stream_types(&env, &cid)
        .await
        .contains(&"FetchFailed".to_string()));

    // Rebuilt from the log, connectors and their item hashes are the same rows.
    let pool = env.pool().await;
    let snapshot = || async {
        let a: Vec<(Value,)> = sqlx::query_as("SELECT to_jsonb(c) FROM connectors c ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
        let b: Vec<(String, String)> =
            sqlx::query_as("SELECT connector_id::text, hash FROM connector_items ORDER BY 1, 2")
                .fetch_all(&pool)
                .await
                .unwrap();
        (a, b)
    };
    let before = snapshot().await;
    env.rebuild_projections();
    assert_eq!(before, snapshot().await);

    // A deleted connector is not fetched.
    api.send(api.http.delete(api.url(&format!("/v1/connectors/{cid}"))))
        .await;
    let job = fetch(&api, json!({"connector_id": cid})).await;
    assert_eq!(job["error"]["type"], "connector_not_found", "{job}");
}

/// A feed of `items` posts that answers after `delay_ms`, and an `rss` connector of it.
async fn slow_feed_connector(api: &Api, items: usize, delay_ms: u64) -> (Shared, String) {
    let state: Shared = Arc::default();
    {
        let mut f = state.lock().unwrap();
        f.items = (1..=items)
            .map(|k| (format!("g{k}"), format!("post-{k}")))
            .collect();
        f.delay_ms = delay_ms;
    }
    let base = serve(state.clone()).await;
    let c = api
        .post(
            "/v1/connectors",
            json!({"name": "slow", "type": "rss", "config": {"url": format!("{base}/feed.xml")}}),
        )
        .await;
    assert_eq!(c.status, 201, "{c:?}");
    (state, c.body["id"].as_str().unwrap().to_string())
}

#[tokio::test]
async fn overlapping_fetches_of_one_connector_never_return_an_item_twice() {
    let env = env_allowing_loopback().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let (state, cid) = slow_feed_connector(&api, 20, 500).await;
    // Four fetches at once: all read the same feed from the same cursor; one records it.
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(
            api.submit_id(json!({"kind": "connector.fetch", "input": {"connector_id": cid}, "max_attempts": 5}))
                .await,
        );
    }
    let mut returned = Vec::new();
    let mut moved = 0;
    for id in &ids {
        let job = api.wait_terminal(id, Duration::from_secs(60)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        moved += api
            .events(id)
            .await
            .iter()
            .filter(|e| {
                e["type"] == "JobAttemptFailed" && e["data"]["error"]["type"] == "stream_moved"
            })
            .count();
        let lines = if job["output"]["new_items"] == 0 {
            String::new()
        } else {
            api.send(
                api.http
                    .get(api.url(&format!("/v1/jobs/{id}/artifacts/items.jsonl"))),
            )
            .await
            .body
            .as_str()
            .unwrap()
            .to_string()
        };
        for l in lines.lines() {
            let item: Value = serde_json::from_str(l).unwrap();
            returned.push(item["id"].as_str().unwrap().to_string());
        }
    }
    returned.sort();
    let mut unique = returned.clone();
    unique.dedup();
    assert_eq!(returned, unique, "an item was returned twice");
    assert_eq!(returned.len(), 20, "every item was returned once");
    // The fetches overlapped: the ones that lost the race to record ran again.
    assert!(moved >= 1, "no fetch lost the race");
    let c = api.get(&format!("/v1/connectors/{cid}")).await.body;
    assert_eq!(c["items_total"], 20, "{c}");
    assert!(state.lock().unwrap().hits >= 4);
}

/// Canceling a fetch that waits on a slow source ends it at once, and moves nothing: the next
/// fetch returns every item.
#[tokio::test]
async fn canceling_a_fetch_stops_it_and_skips_nothing() {
    let env = env_allowing_loopback().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let (state, cid) = slow_feed_connector(&api, 3, 25_000).await;
    let id = api
        .submit_id(json!({"kind": "connector.fetch", "input": {"connector_id": cid}}))
        .await;
    eventually(
        "the fetch waits on the feed",
        Duration::from_secs(20),
        || async {
            (api.job(&id).await["status"] == "running" && state.lock().unwrap().hits == 1)
                .then_some(())
        },
    )
    .await;
    let r = api.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
    assert!(r.status < 300, "{r:?}");
    // Well before the feed would answer.
    let job = api.wait_terminal(&id, Duration::from_secs(10)).await;
    assert_eq!(job["status"], "canceled", "{job}");
    let c = api.get(&format!("/v1/connectors/{cid}")).await.body;
    assert_eq!(
        (c["fetches"].clone(), c["cursor"].clone()),
        (json!(0), Value::Null),
        "{c}"
    );
    state.lock().unwrap().delay_ms = 0;
    let job = fetch(&api, json!({"connector_id": cid})).await;
    assert_eq!(job["output"]["new_items"], 3, "{job}");
}

#[tokio::test]
async fn hostile_servers_end_the_fetch_with_a_clear_error() {
    let env = env_allowing_loopback().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let base = serve(Arc::default()).await;
    let inline = |path: &str, extra: Value| {
        let mut config =
            json!({"url": format!("{base}{path}"), "timeout_s": 2, "max_bytes": 1_048_576});
        config
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        json!({"kind": "connector.fetch", "input": {"type": "rss", "config": config}, "max_attempts": 1})
    };
    let cases = [
        ("/endless", "response_too_large"),
        ("/drip", "timeout"),
        ("/loop", "redirects"),
        ("/malformed", "malformed_response"),
        ("/bomb", "malformed_response"),
        ("/unavailable", "http_status"),
    ];
    let mut ids = Vec::new();
    for (path, _) in &cases {
        ids.push(api.submit_id(inline(path, json!({}))).await);
    }
    for ((path, want), id) in cases.iter().zip(&ids) {
        let job = api.wait_terminal(id, Duration::from_secs(60)).await;
        assert_eq!(job["status"], "failed", "{path}: {job}");
        assert_eq!(job["error"]["type"], *want, "{path}: {job}");
    }
    // The worker is still fine: an echo job runs.
    let id = api
        .submit_id(json!({"kind": "echo", "input": {"ok": 1}}))
        .await;
    assert_eq!(
        api.wait_terminal(&id, Duration::from_secs(30)).await["status"],
        "succeeded"
    );
    // 503 with Retry-After is retried no earlier than it says.
    let id = api
        .submit_id(json!({"kind": "connector.fetch", "input": {"type": "rss", "config": {"url": format!("{base}/unavailable")}}, "max_attempts": 2}))
        .await;
    let job = api.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(
        (job["status"].as_str(), job["attempt"].as_u64()),
        (Some("failed"), Some(2)),
        "{job}"
    );
    let events = api.events(&id).await;
    let failed = events
        .iter()
        .find(|e| e["type"] == "JobAttemptFailed")
        .unwrap();
    let at = |v: &Value| {
        v.as_str()
            .unwrap()
            .parse::<chrono::DateTime<chrono::Utc>>()
            .unwrap()
    };
    let retry_at = at(&failed["data"]["retry_at"]);
    assert!(
        retry_at - at(&failed["recorded_at"]) >= chrono::Duration::milliseconds(990),
        "{failed}"
    );
}

#[tokio::test]
async fn private_addresses_are_refused_unless_allowed() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let base = serve(Arc::default()).await;
    let r = api
        .post(
            "/v1/connectors",
            json!({"name": "n", "type": "rss", "config": {"url": format!("{base}/feed.xml")}}),
        )
        .await;
    assert_eq!(
        (r.status, &r.body["errors"][0]["field"]),
        (422, &json!("config.url")),
        "{r:?}"
    );
    let job = fetch(
        &api,
        json!({"type": "rss", "config": {"url": format!("{base}/feed.xml")}}),
    )
    .await;
    assert_eq!(job["error"]["type"], "forbidden_address", "{job}");
}

/// A small site: robots.txt (no /private, Crawl-delay 1), a blog page of articles, and the
/// times its pages were asked for.
#[derive(Default)]
struct Site {
    posts: Vec<String>,
    page_hits: Vec<std::time::Instant>,
    robots_hits: u64,
}

async fn site(state: Arc<Mutex<Site>>) -> String {
    async fn robots(State(s): State<Arc<Mutex<Site>>>) -> Response {
        s.lock().unwrap().robots_hits += 1;
        "User-agent: *\nDisallow: /private\nCrawl-delay: 1\n".into_response()
    }
    async fn blog(State(s): State<Arc<Mutex<Site>>>) -> Response {
        let mut s = s.lock().unwrap();
        s.page_hits.push(std::time::Instant::now());
        let mut html = String::from(
            "<html><head><title>Blog</title><script>tracking()</script></head><body><main>",
        );
        for (k, p) in s.posts.iter().enumerate() {
            html.push_str(&format!(
                "<article><h2>{p}</h2><a href=\"posts/{k}\">more</a><p>Text of {p}.</p>\
                 <span class=\"tag\">t{k}</span></article>"
            ));
        }
        html.push_str("</main></body></html>");
        ([("content-type", "text/html; charset=utf-8")], html).into_response()
    }
    async fn private() -> Response {
        "<html><body>secret</body></html>".into_response()
    }
    let app = Router::new()
        .route("/robots.txt", get(robots))
        .route("/blog/", get(blog))
        .route("/private/page", get(private))
        .with_state(state);
    listen(app).await
}

#[tokio::test]
async fn web_pages_are_read_with_css_selectors_politely_and_as_robots_txt_allows() {
    let env = env_allowing_loopback().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let state: Arc<Mutex<Site>> = Arc::default();
    state.lock().unwrap().posts = vec!["Alpha".into(), "Beta".into()];
    let base = site(state.clone()).await;
    let c = api
        .post(
            "/v1/connectors",
            json!({"name": "blog", "type": "web", "config": {
                "url": format!("{base}/blog/"), "item": "article", "content": "p",
                "lists": {"tags": ".tag"}, "delay_ms": 0}}),
        )
        .await;
    assert_eq!(c.status, 201, "{c:?}");
    let cid = c.body["id"].as_str().unwrap().to_string();
    // A selector that does not parse is refused when saved.
    let bad = api
        .post(
            "/v1/connectors",
            json!({"name": "x", "type": "web", "config": {"url": format!("{base}/blog/"), "item": "article[["}}),
        )
        .await;
    assert_eq!(bad.body["errors"][0]["field"], "config.item", "{bad:?}");

    let job = fetch(&api, json!({"connector_id": cid})).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let items = job["output"]["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 2, "{job}");
    assert_eq!(items[0]["title"], "Alpha");
    assert_eq!(items[0]["url"], format!("{base}/blog/posts/0"));
    assert_eq!(items[0]["content"], "Text of Alpha.");
    assert_eq!(items[1]["fields"]["tags"], json!(["t1"]));

    // A new post: only it is new. The site's Crawl-delay (1 s) spaces the two page requests,
    // though the connector asked for no delay.
    state.lock().unwrap().posts.push("Gamma".into());
    let job = fetch(&api, json!({"connector_id": cid})).await;
    assert_eq!(job["output"]["new_items"], 1, "{job}");
    assert_eq!(job["output"]["items"][0]["title"], "Gamma");
    {
        let s = state.lock().unwrap();
        assert_eq!(s.page_hits.len(), 2);
        assert!(
            s.page_hits[1] - s.page_hits[0] >= Duration::from_millis(950),
            "requests to one host are spaced by the Crawl-delay"
        );
        assert_eq!(s.robots_hits, 1, "robots.txt is kept between fetches");
    }

    // robots.txt disallows /private: the page is never requested.
    let job = fetch(
        &api,
        json!({"type": "web", "config": {"url": format!("{base}/private/page")}}),
    )
    .await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["type"], "robots_disallowed", "{job}");
}

/// A Slack-compatible incoming webhook: `ok` on /hook (recording the bodies), Slack's 404
/// `no_service` elsewhere, 429 with Retry-After once on /busy.
async fn slack(seen: Arc<Mutex<Vec<Value>>>) -> String {
    async fn hook(State(s): State<Arc<Mutex<Vec<Value>>>>, body: String) -> Response {
        let v: Value = match serde_json::from_str(&body) {
            Ok(v) => v,
            Err(_) => return (StatusCode::BAD_REQUEST, "invalid_payload").into_response(),
        };
        s.lock().unwrap().push(v);
        "ok".into_response()
    }
    async fn busy(State(s): State<Arc<Mutex<Vec<Value>>>>) -> Response {
        let mut s = s.lock().unwrap();
        s.push(json!({"busy": true}));
        if s.iter().filter(|v| v["busy"] == true).count() == 1 {
            (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "1")],
                "rate_limited",
            )
                .into_response()
        } else {
            "ok".into_response()
        }
    }
    async fn gone() -> Response {
        (StatusCode::NOT_FOUND, "no_service").into_response()
    }
    let app = Router::new()
        .route("/hook", axum::routing::post(hook))
        .route("/busy", axum::routing::post(busy))
        .route("/gone", axum::routing::post(gone))
        .with_state(seen);
    listen(app).await
}

#[tokio::test]
async fn chat_posts_reach_a_slack_compatible_webhook_and_its_answers_decide_the_job() {
    let env = env_allowing_loopback().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    let base = slack(seen.clone()).await;
    let post = |path: &str, extra: Value| {
        let mut input = json!({"url": format!("{base}{path}"), "text": "*Digest*: 3 new posts"});
        input
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        json!({"kind": "chat.post", "input": input, "max_attempts": 2})
    };
    let r = api
        .submit(json!({"kind": "chat.post", "input": {"url": "ftp://x/", "text": "t"}}))
        .await;
    assert_eq!(r.body["errors"][0]["field"], "input.url", "{r:?}");

    let id = api
        .submit_id(post(
            "/hook",
            json!({"channel": "#news", "blocks": [{"type": "divider"}]}),
        ))
        .await;
    let job = api.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["output"]["response"], "ok");
    assert_eq!(
        seen.lock().unwrap()[0],
        json!({"text": "*Digest*: 3 new posts", "channel": "#news", "blocks": [{"type": "divider"}]})
    );

    let id = api.submit_id(post("/gone", json!({}))).await;
    let job = api.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(
        (job["status"].as_str(), job["attempt"].as_u64()),
        (Some("failed"), Some(1)),
        "{job}"
    );
    assert!(
        job["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no_service"),
        "{job}"
    );

    let id = api.submit_id(post("/busy", json!({}))).await;
    let job = api.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(
        (job["status"].as_str(), job["attempt"].as_u64()),
        (Some("succeeded"), Some(2)),
        "{job}"
    );
}

/// The worked example of docs/connectors.md (docs/examples/feed-digest.json): a workflow,
/// scheduled every 15 minutes, fetches two feeds, keeps only new items, summarizes them and
/// posts one digest to a chat webhook — here fired by hand (`POST /v1/schedules/{id}/trigger`)
/// against local feed and webhook servers.
#[tokio::test]
async fn the_feed_digest_example_posts_each_new_item_once() {
    let env = env_allowing_loopback().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let (a, b): (Shared, Shared) = (Arc::default(), Arc::default());
    a.lock().unwrap().items = vec![
        ("a1".into(), "rust-2026".into()),
        ("a2".into(), "tokio-news".into()),
    ];
    b.lock().unwrap().items = vec![("b1".into(), "postgres-18".into())];
    let (feed_a, feed_b) = (serve(a.clone()).await, serve(b.clone()).await);
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    let hook = format!("{}/hook", slack(seen.clone()).await);
    let connector = |url: String| {
        let api = api.clone();
        async move {
            let r = api
                .post(
                    "/v1/connectors",
                    json!({"name": url, "type": "rss", "config": {"url": url}}),
                )
                .await;
            assert_eq!(r.status, 201, "{r:?}");
            r.body["id"].as_str().unwrap().to_string()
        }
    };
    let ca = connector(format!("{feed_a}/feed.xml")).await;
    let cb = connector(format!("{feed_b}/feed.xml")).await;
    let def: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/examples/feed-digest.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let wf = capibara_tests::runs::create(&api, def).await;
    let schedule = api
        .post(
            "/v1/schedules",
            json!({"name": "digest", "cron": "*/15 * * * *", "overlap": "skip",
                   "target": {"type": "workflow", "workflow_id": wf,
                              "input": {"feed_a": ca, "feed_b": cb, "webhook": hook}}}),
        )
        .await;
    assert_eq!(schedule.status, 201, "{schedule:?}");
    let sid = schedule.body["id"].as_str().unwrap().to_string();
    let fire = || {
        let api = api.clone();
        let sid = sid.clone();
        async move {
            let r = api
                .post(&format!("/v1/schedules/{sid}/trigger"), json!({}))
                .await;
            assert!(r.status < 300, "{r:?}");
            // A workflow target's tick starts a run: `last_job_id` names it.
            let run = r.body["last_job_id"].as_str().unwrap().to_string();
            capibara_tests::runs::ended(&api, &run, Duration::from_secs(90)).await
        }
    };

    let run = fire().await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"]["new_items"], 3, "{run}");
    let digest = seen.lock().unwrap()[0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(digest.starts_with("*3 new posts*"), "{digest}");
    for title in ["rust-2026", "tokio-news", "postgres-18"] {
        assert!(digest.contains(title), "{digest}");
    }
    assert!(
        digest.contains("About rust-2026"),
        "summaries are in the digest: {digest}"
    );

    // One new post in feed b: the next digest has it alone.
    b.lock()
        .unwrap()
        .items
        .push(("b2".into(), "redis-8".into()));
    b.lock().unwrap().version += 1;
    let run = fire().await;
    assert_eq!(run["output"]["new_items"], 1, "{run}");
    let digest = seen.lock().unwrap()[1]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        digest.starts_with("*1 new posts*") && digest.contains("redis-8"),
        "{digest}"
    );
    assert!(!digest.contains("rust-2026"), "{digest}");

    // Nothing new: nothing is posted (the steps are skipped).
    let run = fire().await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"]["new_items"], 0, "{run}");
    assert_eq!(
        capibara_tests::runs::step(&run, "post")["status"],
        "skipped",
        "{run}"
    );
    assert_eq!(seen.lock().unwrap().len(), 2);
}

/// A JSON API: OAuth2 client credentials at /oauth/token, items behind the token with Link
/// pagination at /items, a cursor-paginated event log at /events (`after`), an offset-paginated
/// list behind an API key at /list.
#[derive(Default)]
struct JsonApi {
    items: Vec<Value>,
    events: Vec<Value>,
    token_hits: u64,
    /// The `after` of every /events request.
    afters: Vec<Option<String>>,
    /// How long each /items page takes.
    delay_ms: u64,
}

async fn json_api(state: Arc<Mutex<JsonApi>>) -> String {
    use axum::extract::Query;
    use std::collections::HashMap;
    type S = State<Arc<Mutex<JsonApi>>>;
    async fn token(State(s): S, headers: HeaderMap, body: String) -> Response {
        // client_id "app", client_secret "s3cret" with HTTP Basic (RFC 6749 §2.3.1).
        let ok = headers.get("authorization").and_then(|v| v.to_str().ok())
            == Some("Basic YXBwOnMzY3JldA==");
        if !ok || !body.contains("grant_type=client_credentials") {
            return (
                StatusCode::UNAUTHORIZED,
                axum::Json(json!({"error": "invalid_client"})),
            )
                .into_response();
        }
        s.lock().unwrap().token_hits += 1;
        axum::Json(json!({"access_token": "tok-1", "token_type": "Bearer", "expires_in": 3600}))
            .into_response()
    }
    async fn items(
        State(s): S,
        headers: HeaderMap,
        Query(q): Query<HashMap<String, String>>,
    ) -> Response {
        if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer tok-1") {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        let page: usize = q.get("page").and_then(|p| p.parse().ok()).unwrap_or(1);
        let delay = s.lock().unwrap().delay_ms;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let all = s.lock().unwrap().items.clone();
        let chunk: Vec<Value> = all.iter().skip((page - 1) * 5).take(5).cloned().collect();
        let mut r = axum::Json(json!({"data": chunk})).into_response();
        if page * 5 < all.len() {
            let link = format!(
                "</items?page={}>; rel=\"next\", </items?page=1>; rel=\"first\"",
                page + 1
            );
            r.headers_mut().insert("link", link.parse().unwrap());
        }
        r
    }
    async fn events(State(s): S, Query(q): Query<HashMap<String, String>>) -> Response {
        let mut s = s.lock().unwrap();
        let after = q.get("after").cloned();
        s.afters.push(after.clone());
        let from = after.and_then(|a| a.parse::<usize>().ok()).unwrap_or(0);
        let chunk: Vec<Value> = s.events.iter().skip(from).take(3).cloned().collect();
        let next = from + chunk.len();
        axum::Json(json!({"events": chunk, "meta": {"next": if chunk.is_empty() { Value::Null } else { json!(next.to_string()) }}}))
            .into_response()
    }
    async fn list(headers: HeaderMap, Query(q): Query<HashMap<String, String>>) -> Response {
        if headers.get("x-api-key").and_then(|v| v.to_str().ok()) != Some("k-123") {
            return StatusCode::FORBIDDEN.into_response();
        }
        let offset: usize = q.get("offset").and_then(|p| p.parse().ok()).unwrap_or(0);
        let limit: usize = q.get("limit").and_then(|p| p.parse().ok()).unwrap_or(2);
        let rows: Vec<Value> = (0..7)
            .skip(offset)
            .take(limit)
            .map(|k| json!({"id": k, "name": format!("row {k}")}))
            .collect();
        axum::Json(Value::Array(rows)).into_response()
    }
    let app = Router::new()
        .route("/oauth/token", axum::routing::post(token))
        .route("/items", get(items))
        .route("/events", get(events))
        .route("/list", get(list))
        .with_state(state);
    listen(app).await
}

#[tokio::test]
async fn json_apis_are_read_page_after_page_with_their_authentication() {
    let env = env_allowing_loopback().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let state: Arc<Mutex<JsonApi>> = Arc::default();
    {
        let mut s = state.lock().unwrap();
        s.items = (0..12)
            .map(|k| json!({"id": k, "name": format!("item {k}"), "url": format!("/i/{k}")}))
            .collect();
        s.events = (0..5)
            .map(|k| json!({"seq": k, "what": format!("event {k}")}))
            .collect();
    }
    let base = json_api(state.clone()).await;
    for (name, value) in [("API_SECRET", "s3cret"), ("API_KEY", "k-123")] {
        let r = api
            .send(
                api.http
                    .put(api.url(&format!("/v1/secrets/{name}")))
                    .json(&json!({"value": value})),
            )
            .await;
        assert!(r.status < 300, "{r:?}");
    }
    let create = |body: Value| {
        let api = api.clone();
        async move {
            let r = api.post("/v1/connectors", body).await;
            assert_eq!(r.status, 201, "{r:?}");
            r.body["id"].as_str().unwrap().to_string()
        }
    };
    // OAuth2 client credentials and the Link header.
    let items = create(json!({"name": "items", "type": "api", "config": {
        "url": format!("{base}/items"), "items": "/data", "title": "/name", "link": "/url",
        "pagination": {"type": "link"},
        "auth": {"type": "oauth2", "token_url": format!("{base}/oauth/token"), "client_id": "app"}},
        "secrets": {"auth.client_secret": "API_SECRET"}}))
    .await;
    let job = fetch(&api, json!({"connector_id": items, "inline_items": 20})).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["output"]["new_items"], 12, "three pages: {job}");
    assert_eq!(job["output"]["items"][11]["title"], "item 11");
    assert_eq!(job["output"]["items"][0]["data"]["url"], "/i/0");
    let job = fetch(&api, json!({"connector_id": items})).await;
    assert_eq!(job["output"]["new_items"], 0, "{job}");
    state.lock().unwrap().items[3]["name"] = json!("item 3, edited");
    let job = fetch(&api, json!({"connector_id": items})).await;
    assert_eq!(job["output"]["new_items"], 1, "{job}");
    assert_eq!(job["output"]["items"][0]["title"], "item 3, edited");
    assert_eq!(
        state.lock().unwrap().token_hits,
        1,
        "the token is kept until it expires"
    );
    // A slow walk reports its pages as it goes (at most once a second).
    state.lock().unwrap().delay_ms = 700;
    let job = fetch(&api, json!({"connector_id": items})).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let progress: Vec<(Value,)> = sqlx::query_as(
        "SELECT data FROM events WHERE stream_id = $1::uuid AND type = 'JobProgress' ORDER BY version",
    )
    .bind(job["id"].as_str().unwrap())
    .fetch_all(&env.pool().await)
    .await
    .unwrap();
    assert!(
        progress
            .iter()
            .any(|(d,)| d.to_string().contains("page 2 of at most 10: 10 items")),
        "{progress:?}"
    );
    state.lock().unwrap().delay_ms = 0;
    assert!(!job.to_string().contains("s3cret"));

    // A cursor in the page, resumed from where the last fetch stopped.
    let events = create(json!({"name": "events", "type": "api", "config": {
        "url": format!("{base}/events"), "items": "/events", "id": "/seq",
        "pagination": {"type": "cursor", "cursor": "/meta/next", "param": "after", "resume": true}}}))
    .await;
    let job = fetch(&api, json!({"connector_id": events})).await;
    assert_eq!(job["output"]["new_items"], 5, "{job}");
    assert_eq!(job["output"]["cursor"]["cursor"], "5", "{job}");
    state
        .lock()
        .unwrap()
        .events
        .push(json!({"seq": 5, "what": "event 5"}));
    let job = fetch(&api, json!({"connector_id": events})).await;
    assert_eq!(job["output"]["new_items"], 1, "{job}");
    assert_eq!(
        state.lock().unwrap().afters[3..].to_vec(),
        vec![Some("5".to_string()), Some("6".to_string())],
        "the second fetch started from the stored cursor"
    );

    // An API key header and offsets.
    let rows = create(json!({"name": "rows", "type": "api", "config": {
        "url": format!("{base}/list"), "title": "/name",
        "pagination": {"type": "offset", "param": "offset", "limit_param": "limit", "limit": 3},
        "auth": {"type": "header", "name": "X-Api-Key"}},
        "secrets": {"auth.value": "API_KEY"}}))
    .await;
    let job = fetch(&api, json!({"connector_id": rows, "inline_items": 10})).await;
    assert_eq!(job["output"]["new_items"], 7, "{job}");
    // Without the credential's secret the connector is refused, naming the secret's place.
    let r = api
        .post(
            "/v1/connectors",
            json!({"name": "b", "type": "api", "config": {
                "url": format!("{base}/list"), "auth": {"type": "bearer"}}}),
        )
        .await;
    assert_eq!(
        (r.status, &r.body["errors"][0]["field"]),
        (422, &json!("secrets.auth.token")),
        "{r:?}"
    );
    // An inline config has no secrets: its fetch fails and says which one it lacks.
    let job = fetch(
        &api,
        json!({"type": "api", "config": {"url": format!("{base}/list"), "auth": {"type": "bearer"}}}),
    )
    .await;
    assert_eq!(job["error"]["type"], "invalid_config", "{job}");
    assert!(
        job["error"]["message"]
            .as_str()
            .unwrap()
            .contains("auth.token"),
        "{job}"
    );
}

/// `content.process` (docs/content.md) on the `items.jsonl` of a fetch, read from the artifact
/// store by job id — of this namespace only — and inline; `classify` is refused at submission.
#[tokio::test]
async fn content_process_reads_a_fetchs_items_and_reports_per_item() {
    let env = env_allowing_loopback().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let state: Shared = Arc::default();
    state.lock().unwrap().items = (1..=4)
        .map(|k| (format!("g{k}"), format!("post-{k}")))
        .collect();
    let base = serve(state).await;
    let fetched = fetch(
        &api,
        json!({"type": "rss", "config": {"url": format!("{base}/feed.xml")}}),
    )
    .await;
    assert_eq!(fetched["output"]["new_items"], 4, "{fetched}");
    let fetch_id = fetched["id"].as_str().unwrap();

    let r = api
        .send(
            api.http
                .post(api.url("/v1/jobs"))
                .header("Prefer", "wait=30")
                .json(&json!({"kind": "content.process", "input": {
                    "artifact": {"job_id": fetch_id, "name": "items.jsonl"},
                    "operations": ["language", "stats", "summary"]}})),
        )
        .await;
    assert_eq!(r.body["status"], "succeeded", "{r:?}");
    let out = &r.body["output"];
    assert_eq!(out["processed"], 4, "{out}");
    assert_eq!(out["items"][0]["id"], "g1");
    assert_eq!(out["items"][0]["summary"], "About post-1", "{out}");
    assert_eq!(
        out["items"][0]["stats"]["words"], 3,
        "About, post, 1: {out}"
    );

    // Another namespace cannot read this job's artifact.
    let other = api.key_for("elsewhere", &["admin"]).await;
    let id = other
        .submit_id(json!({"kind": "content.process", "input": {
            "artifact": {"job_id": fetch_id, "name": "items.jsonl"}, "operations": ["stats"]}}))
        .await;
    let job = other.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["type"], "artifact_not_found", "{job}");

    let r = api
        .submit(json!({"kind": "content.process", "input": {
            "items": [{"text": "hi"}], "operations": ["stats", "classify"]}}))
        .await;
    assert_eq!(r.status, 422, "{r:?}");
    assert_eq!(r.body["errors"][0]["field"], "input.operations[1]", "{r:?}");
}

/// The seed endpoints map onto `connector.fetch` jobs: by family, and several sources at once;
/// synchronous under `Prefer: wait`, `202` otherwise.
#[tokio::test]
async fn seed_endpoints_submit_fetches_by_family_and_discover_several_sources() {
    let env = env_allowing_loopback().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let state: Shared = Arc::default();
    state.lock().unwrap().items = vec![("g1".into(), "only".into())];
    let feed = format!("{}/feed.xml", serve(state).await);
    let site_state: Arc<Mutex<Site>> = Arc::default();
    site_state.lock().unwrap().posts = vec!["Page post".into()];
    let page = format!("{}/blog/", site(site_state).await);

    let post = |path: &str, body: Value, wait: bool| {
        let api = api.clone();
        let path = path.to_string();
        async move {
            let mut req = api.http.post(api.url(&path)).json(&body);
            if wait {
                req = req.header("Prefer", "wait=30");
            }
            api.send(req).await
        }
    };
    let r = post(
        "/v1/content/connectors/web",
        json!({"type": "rss", "config": {"url": feed}}),
        true,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["kind"], "connector.fetch");
    assert_eq!(r.body["output"]["items"][0]["title"], "only", "{r:?}");
    let r = post(
        "/v1/content/connectors/web",
        json!({"type": "web", "config": {"url": page, "item": "article"}}),
        false,
    )
    .await;
    assert_eq!(r.status, 202, "{r:?}");
    assert!(r.header("location").unwrap().starts_with("/v1/jobs/"));
    let r = post(
        "/v1/content/connectors/api",
        json!({"type": "rss", "config": {"url": feed}}),
        false,
    )
    .await;
    assert_eq!(
        (r.status, &r.body["errors"][0]["field"]),
        (422, &json!("type")),
        "{r:?}"
    );
    let r = post(
        "/v1/content/connectors/filesystem",
        json!({"type": "rss", "config": {"url": feed}}),
        false,
    )
    .await;
    assert_eq!(
        (r.status, &r.body["errors"][0]["field"]),
        (422, &json!("type")),
        "{r:?}"
    );
    let r = post(
        "/v1/content/connectors/filesystem",
        json!({"type": "files", "config": {"path": "inbox"}}),
        false,
    )
    .await;
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(
        post("/v1/content/connectors/nope", json!({}), false)
            .await
            .status,
        404
    );

    let r = post(
        "/v1/content/discover",
        json!({"sources": [{"type": "rss", "config": {"url": feed}},
                           {"type": "web", "config": {"url": page, "item": "article"}}],
               "inline_items": 5}),
        true,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let jobs = r.body["items"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    assert!(jobs.iter().all(|j| j["status"] == "succeeded"), "{r:?}");
    assert_eq!(jobs[1]["output"]["items"][0]["title"], "Page post");
    let r = post(
        "/v1/content/discover",
        json!({"sources": [{"type": "rss", "config": {"url": feed}},
                           {"type": "rss", "config": {"url": "gopher://x"}}]}),
        false,
    )
    .await;
    assert_eq!(
        r.body["errors"][0]["field"], "sources[1].config.url",
        "{r:?}"
    );
}

mod graphql_server {
    //! A GraphQL API served by async-graphql (an independent implementation): issues of a
    //! repository as a Relay-style connection, `issues(first: Int!, after: String)`, behind a
    //! bearer token.
    use std::sync::{Arc, Mutex};

    use async_graphql::{Context, EmptyMutation, EmptySubscription, Object, Schema, SimpleObject};

    #[derive(SimpleObject, Clone)]
    pub struct Issue {
        pub id: String,
        pub title: String,
        pub url: String,
    }

    #[derive(SimpleObject)]
    #[graphql(name = "PageInfo")]
    pub struct PageInfo {
        pub end_cursor: Option<String>,
        pub has_next_page: bool,
    }

    #[derive(SimpleObject)]
    pub struct IssueConnection {
        pub nodes: Vec<Issue>,
        pub page_info: PageInfo,
    }

    pub struct Query;

    #[Object]
    impl Query {
        async fn issues(
            &self,
            ctx: &Context<'_>,
            first: i32,
            after: Option<String>,
        ) -> IssueConnection {
            let all = ctx
                .data_unchecked::<Arc<Mutex<Vec<Issue>>>>()
                .lock()
                .unwrap()
                .clone();
            let from = after.and_then(|a| a.parse::<usize>().ok()).unwrap_or(0);
            let nodes: Vec<Issue> = all
                .iter()
                .skip(from)
                .take(first as usize)
                .cloned()
                .collect();
            let end = from + nodes.len();
            IssueConnection {
                page_info: PageInfo {
                    end_cursor: (!nodes.is_empty()).then(|| end.to_string()),
                    has_next_page: end < all.len(),
                },
                nodes,
            }
        }
    }

    pub type Api = Schema<Query, EmptyMutation, EmptySubscription>;

    pub fn schema(issues: Arc<Mutex<Vec<Issue>>>) -> Api {
        Schema::build(Query, EmptyMutation, EmptySubscription)
            .data(issues)
            .finish()
    }
}

#[tokio::test]
async fn graphql_queries_are_paged_by_their_end_cursor() {
    use graphql_server::Issue;
    let env = env_allowing_loopback().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let issues: Arc<Mutex<Vec<Issue>>> = Arc::new(Mutex::new(
        (0..7)
            .map(|k| Issue {
                id: format!("I{k}"),
                title: format!("issue {k}"),
                url: format!("https://tracker.test/{k}"),
            })
            .collect(),
    ));
    let schema = graphql_server::schema(issues.clone());
    async fn serve_graphql(
        State(schema): State<graphql_server::Api>,
        headers: HeaderMap,
        body: String,
    ) -> Response {
        if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer gql-token") {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        let Ok(req) = serde_json::from_str::<async_graphql::Request>(&body) else {
            return (StatusCode::BAD_REQUEST, "not a GraphQL request").into_response();
        };
        axum::Json(schema.execute(req).await).into_response()
    }
    let app = Router::new()
        .route("/graphql", axum::routing::post(serve_graphql))
        .with_state(schema);
    let base = listen(app).await;
    let r = api
        .send(
            api.http
                .put(api.url("/v1/secrets/GQL"))
                .json(&json!({"value": "gql-token"})),
        )
        .await;
    assert!(r.status < 300, "{r:?}");
    let c = api
        .post(
            "/v1/connectors",
            json!({"name": "issues", "type": "graphql", "config": {
                "url": format!("{base}/graphql"),
                "query": "query($after: String) { issues(first: 3, after: $after) { nodes { id title url } pageInfo { endCursor hasNextPage } } }",
                "items": "/data/issues/nodes",
                "end_cursor": "/data/issues/pageInfo/endCursor",
                "has_next_page": "/data/issues/pageInfo/hasNextPage",
                "title": "/title", "link": "/url", "resume": true,
                "auth": {"type": "bearer"}},
                "secrets": {"auth.token": "GQL"}}),
        )
        .await;
    assert_eq!(c.status, 201, "{c:?}");
    let cid = c.body["id"].as_str().unwrap().to_string();
    let job = fetch(&api, json!({"connector_id": cid, "inline_items": 10})).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        job["output"]["new_items"], 7,
        "three pages of 3, 3 and 1: {job}"
    );
    assert_eq!(job["output"]["items"][6]["title"], "issue 6");
    assert_eq!(job["output"]["items"][6]["url"], "https://tracker.test/6");
    assert_eq!(job["output"]["cursor"]["cursor"], "7", "{job}");
    issues.lock().unwrap().push(Issue {
        id: "I7".into(),
        title: "issue 7".into(),
        url: "https://tracker.test/7".into(),
    });
    let job = fetch(&api, json!({"connector_id": cid})).await;
    assert_eq!(
        job["output"]["new_items"], 1,
        "resumed after the last cursor: {job}"
    );
    assert_eq!(job["output"]["items"][0]["title"], "issue 7");

    // Without the token: the server's 401. A query it refuses: its errors.
    let job = fetch(
        &api,
        json!({"type": "graphql", "config": {"url": format!("{base}/graphql"),
            "query": "{ issues(first: 1) { nodes { id } } }", "items": "/data/issues/nodes"}}),
    )
    .await;
    assert_eq!(job["error"]["type"], "http_status", "{job}");
    let job = fetch(
        &api,
        json!({"type": "graphql", "config": {"url": format!("{base}/graphql"),
            "headers": {"Authorization": "Bearer gql-token"},
            "query": "{ nope }", "items": "/data/nope"}}),
    )
    .await;
    assert_eq!(job["error"]["type"], "malformed_response", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("the query failed") && message.contains("nope"),
        "{job}"
    );
}
