//! `GET /v1/events`, the event firehose: JSON pages with filters, namespace isolation, SSE live
//! fan-out, and resume with no gap and no duplicate while many writers append concurrently.

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use capibara_tests::{eventually, Api, Proc, TestEnv};
use serde_json::{json, Value};

/// All pages of `GET /v1/events?<query>` from the start, following `next_cursor` until a page
/// comes back empty.
async fn all_pages(api: &Api, query: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..10_000 {
        let mut path = format!("/v1/events?{query}");
        if let Some(a) = &after {
            path.push_str(&format!("&after={a}"));
        }
        let r = api.get(&path).await;
        assert_eq!(r.status, 200, "{path}: {r:?}");
        let items = r.body["items"].as_array().cloned().unwrap_or_default();
        if items.is_empty() {
            return out;
        }
        out.extend(items);
        after = Some(
            r.body["next_cursor"]
                .as_str()
                .expect("next_cursor with items")
                .to_string(),
        );
    }
    panic!("{query}: pagination did not end");
}

fn ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_string())
        .collect()
}

fn stream_ids(events: &[Value]) -> HashSet<String> {
    events
        .iter()
        .map(|e| e["stream_id"].as_str().expect("stream_id").to_string())
        .collect()
}

/// Positions of the namespace's events in the database.
async fn db_positions(env: &TestEnv, namespace: &str) -> Vec<i64> {
    let pool = env.pool().await;
    let rows: Vec<i64> = sqlx::query_scalar(
        "SELECT position FROM events WHERE metadata->>'namespace' = $1 ORDER BY position",
    )
    .bind(namespace)
    .fetch_all(&pool)
    .await
    .expect("query events");
    pool.close().await;
    rows
}

/// Asserts a 422 problem naming `field`.
async fn assert_422(api: &Api, path: &str, field: &str) {
    let r = api.get(path).await;
    assert_eq!(r.status, 422, "{path}: {r:?}");
    let fields: Vec<&str> = r.body["errors"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["field"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(fields, vec![field], "{path}: {r:?}");
}

/// An SSE connection read frame by frame.
struct Sse {
    res: reqwest::Response,
    buf: String,
}

/// One SSE frame: (id, event, data).
type Frame = (String, String, Value);

impl Sse {
    async fn open(api: &Api, query: &str, last_event_id: Option<&str>) -> Sse {
        let mut req = api
            .http
            .get(api.url(&format!("/v1/events{query}")))
            .bearer_auth(&api.key)
            .header("Accept", "text/event-stream")
            // The firehose never ends; the client's overall timeout would cut it.
            .timeout(Duration::from_secs(3600));
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        let res = req.send().await.expect("SSE request");
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["content-type"], "text/event-stream");
        Sse {
            res,
            buf: String::new(),
        }
    }

    /// The next event frame (comments skipped), or None if none arrives within `wait`.
    async fn next(&mut self, wait: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let raw: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (String::new(), String::new(), String::new());
                for line in raw.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if !event.is_empty() {
                    let data: Value = serde_json::from_str(&data).expect("data is JSON");
                    assert_eq!(
                        data["id"].as_str(),
                        Some(id.as_str()),
                        "SSE id = envelope id"
                    );
                    assert_eq!(data["type"].as_str(), Some(event.as_str()));
                    return Some((id, event, data));
                }
            }
            match tokio::time::timeout_at(deadline, self.res.chunk()).await {
                Err(_) => return None,
                Ok(Ok(Some(chunk))) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(Ok(None)) => panic!("the firehose closed by itself"),
                Ok(Err(e)) => panic!("SSE read failed: {e}"),
            }
        }
    }

    /// Frames until `done` says the collection is complete (panics after `timeout`).
    async fn until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&[Frame]) -> bool,
    ) -> Vec<Frame> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while !done(&out) {
            assert!(
                Instant::now() < deadline,
                "timed out; got {} frames: {:?}",
                out.len(),
                out.iter().map(|f| &f.1).collect::<Vec<_>>()
            );
            if let Some(f) = self.next(Duration::from_millis(200)).await {
                out.push(f);
            }
        }
        out
    }
}

/// Versions of each stream, in arrival order, must grow by one (from the first one seen).
fn assert_in_order_per_stream(frames: &[Frame]) {
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for (_, _, d) in frames {
        let sid = d["stream_id"].as_str().unwrap().to_string();
        let v = d["version"].as_i64().unwrap();
        if let Some(prev) = last.insert(sid.clone(), v) {
            assert_eq!(v, prev + 1, "stream {sid}: version {v} after {prev}");
        }
    }
}

#[tokio::test]
async fn json_pages_filter_paginate_and_stay_in_the_namespace() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();

    let a_prod = api
        .submit_id(json!({"kind": "echo", "input": {"n": 1}, "tags": {"team": "a", "env": "prod"}}))
        .await;
    let a_dev = api
        .submit_id(json!({"kind": "echo", "input": {"n": 2}, "tags": {"team": "a", "env": "dev"}}))
        .await;
    let b = api
        .submit_id(json!({"kind": "echo", "input": {"n": 3}, "tags": {"team": "b"}}))
        .await;
    let sleeper = api
        .submit_id(json!({"kind": "sleep", "input": {"ms": 10}}))
        .await;
    let all_jobs = [&a_prod, &a_dev, &b, &sleeper];
    for id in all_jobs {
        api.wait_terminal(id, Duration::from_secs(30)).await;
    }

    // Everything, in one page and in pages of 3: the same events, each once.
    // The gap-safe read returns a committed event once every older transaction ended (on the
    // shared test server, other tests' too): wait until the whole log is readable.
    let in_db = db_positions(&env, "default").await;
    let full = eventually(
        "the log to be readable",
        Duration::from_secs(10),
        || async {
            let r = api.get("/v1/events?limit=500").await;
            assert_eq!(r.status, 200, "{r:?}");
            let items = r.body["items"].as_array().cloned().unwrap();
            (items.len() == in_db.len()).then_some(items)
        },
    )
    .await;
    let mut got: Vec<i64> = ids(&full).iter().map(|i| i.parse().unwrap()).collect();
    got.sort();
    assert_eq!(got, in_db);
    for e in &full {
        for k in [
            "id",
            "stream_type",
            "stream_id",
            "version",
            "type",
            "data",
            "metadata",
            "recorded_at",
        ] {
            assert!(e.get(k).is_some(), "envelope without {k}: {e}");
        }
    }
    let paged = all_pages(&api, "limit=3").await;
    assert_eq!(ids(&paged), ids(&full));
    // An empty page still says where to continue (the firehose never ends).
    let last = full.last().unwrap()["id"].as_str().unwrap();
    let r = api.get(&format!("/v1/events?after={last}")).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["items"], json!([]));
    assert_eq!(r.body["next_cursor"].as_str(), Some(last));

    // Filters.
    let submitted = all_pages(&api, "types=JobSubmitted&limit=2").await;
    assert_eq!(submitted.len(), 4);
    assert!(submitted.iter().all(|e| e["type"] == "JobSubmitted"));
    let two = all_pages(&api, "types=JobSubmitted,JobSucceeded").await;
    assert_eq!(two.len(), 8, "{two:?}");
    let jobs_only = all_pages(&api, "stream_type=job").await;
    assert_eq!(
        ids(&jobs_only),
        ids(&full
            .iter()
            .filter(|e| e["stream_type"] == "job")
            .cloned()
            .collect::<Vec<_>>())
    );
    let sleeps = all_pages(&api, "kind=sleep&limit=1").await;
    assert_eq!(stream_ids(&sleeps), HashSet::from([sleeper.clone()]));
    assert_eq!(sleeps.len(), api.events(&sleeper).await.len());
    let team_a = all_pages(&api, "tag=team:a").await;
    assert_eq!(
        stream_ids(&team_a),
        HashSet::from([a_prod.clone(), a_dev.clone()])
    );
    let a_and_prod = all_pages(&api, "tag=team:a&tag=env:prod").await;
    assert_eq!(stream_ids(&a_and_prod), HashSet::from([a_prod.clone()]));
    assert_eq!(a_and_prod.len(), api.events(&a_prod).await.len());
    let contradiction = all_pages(&api, "tag=team:a&tag=team:b").await;
    assert!(contradiction.is_empty());
    let combined = all_pages(
        &api,
        "types=JobSucceeded&stream_type=job&kind=echo&tag=team:b",
    )
    .await;
    assert_eq!(combined.len(), 1);
    assert_eq!(combined[0]["stream_id"], b.as_str());
    // A rare filter still advances the cursor past what it skipped.
    let r = api.get("/v1/events?types=JobSubmitted&tag=team:b").await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 1);
    let next = r.body["next_cursor"].as_str().unwrap().to_string();
    let r = api
        .get(&format!(
            "/v1/events?types=JobSubmitted&tag=team:b&after={next}"
        ))
        .await;
    assert_eq!(r.body["items"], json!([]));

    // Another namespace sees none of this, and `default` none of its events.
    let r = api
        .post(
            "/v1/api-keys",
            json!({"name": "b", "roles": ["submit"], "namespace": "team-b"}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let other = api.with_key(r.body["key"].as_str().unwrap());
    let r = other.get("/v1/events?limit=500").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["items"], json!([]));
    let theirs = other.submit_id(json!({"kind": "echo", "input": {}})).await;
    other.wait_terminal(&theirs, Duration::from_secs(30)).await;
    let theirs_in_db = db_positions(&env, "team-b").await.len();
    let seen_by_b = eventually("team-b's log", Duration::from_secs(10), || async {
        let seen = all_pages(&other, "limit=500").await;
        (seen.len() == theirs_in_db).then_some(seen)
    })
    .await;
    assert_eq!(stream_ids(&seen_by_b), HashSet::from([theirs.clone()]));
    let seen_by_default = all_pages(&api, "limit=500").await;
    assert_eq!(ids(&seen_by_default), ids(&full));

    // Bad parameters are 422 problems naming them.
    assert_422(&api, "/v1/events?foo=1", "foo").await;
    assert_422(&api, "/v1/events?stream_type=nope", "stream_type").await;
    assert_422(&api, "/v1/events?kind=code.nope", "kind").await;
    assert_422(&api, "/v1/events?tag=nocolon", "tag").await;
    assert_422(&api, "/v1/events?types=Job-Submitted", "types").await;
    assert_422(&api, "/v1/events?types=", "types").await;
    assert_422(&api, "/v1/events?limit=0", "limit").await;
    assert_422(&api, "/v1/events?limit=501", "limit").await;
    assert_422(&api, "/v1/events?after=abc", "after").await;
    assert_422(&api, "/v1/events?after=999999999", "after").await;
    assert_422(&api, "/v1/events?kind=echo&kind=sleep", "kind").await;
    let r = api
        .send(
            api.http
                .get(api.url("/v1/events"))
                .header("Last-Event-ID", "x"),
        )
        .await;
    assert_eq!(r.status, 422, "{r:?}");
    assert_eq!(r.body["errors"][0]["field"], "Last-Event-ID");
    // Same checks before streaming.
    let r = api
        .send(
            api.http
                .get(api.url("/v1/events?bogus=1"))
                .header("Accept", "text/event-stream"),
        )
        .await;
    assert_eq!(r.status, 422, "{r:?}");
    let anonymous = api.with_key("not-a-key");
    assert_eq!(anonymous.get("/v1/events").await.status, 401);
}

#[tokio::test]
async fn sse_streams_live_events_in_order_per_stream() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();

    // Before connecting: not part of a live-only stream.
    let before = api.submit_id(json!({"kind": "echo", "input": {}})).await;
    api.wait_terminal(&before, Duration::from_secs(30)).await;

    let mut sse = Sse::open(&api, "", None).await;
    let mut jobs = HashSet::new();
    for i in 0..5 {
        jobs.insert(
            api.submit_id(json!({"kind": "echo", "input": {"i": i}}))
                .await,
        );
    }
    let frames = sse
        .until(Duration::from_secs(30), |f| {
            f.iter()
                .filter(|(_, e, d)| {
                    e == "JobSucceeded" && jobs.contains(d["stream_id"].as_str().unwrap())
                })
                .count()
                == 5
        })
        .await;
    assert_in_order_per_stream(&frames);
    // "Live" starts where the log stood when the client connected. An event committed just
    // before can still come: the gap-safe read orders it after that point when an older
    // transaction (on this shared test server, maybe another test's) was still open.
    let frames: Vec<Frame> = frames
        .into_iter()
        .filter(|(_, _, d)| d["stream_id"] != before.as_str())
        .collect();
    assert_eq!(
        frames
            .iter()
            .map(|(_, _, d)| d["stream_id"].as_str().unwrap().to_string())
            .collect::<HashSet<_>>(),
        jobs,
        "only the new jobs' events"
    );
    // Exactly the jobs' events, as the per-job endpoint lists them.
    let mut expected = HashSet::new();
    for id in &jobs {
        expected.extend(ids(&api.events(id).await));
    }
    let got: Vec<String> = frames.iter().map(|f| f.0.clone()).collect();
    assert_eq!(got.len(), expected.len());
    assert_eq!(got.into_iter().collect::<HashSet<_>>(), expected);
    assert!(sse.next(Duration::from_millis(500)).await.is_none());

    // `?after=0` replays the whole log of the namespace, then goes on live.
    let mut replay = Sse::open(&api, "?after=0", None).await;
    let total = db_positions(&env, "default").await.len();
    let frames = replay
        .until(Duration::from_secs(30), |f| f.len() == total)
        .await;
    assert_in_order_per_stream(&frames);
    let late = api.submit_id(json!({"kind": "echo", "input": {}})).await;
    let more = replay
        .until(Duration::from_secs(30), |f| {
            f.iter().any(|(_, e, _)| e == "JobSucceeded")
        })
        .await;
    assert!(more.iter().all(|(_, _, d)| d["stream_id"] == late.as_str()));
}

#[tokio::test]
async fn sse_resumes_without_gap_or_duplicate_under_concurrent_writers() {
    let env = TestEnv::new().await;
    resume_under_concurrent_writers(&env).await;
}

/// With a one-batch live buffer a client falls behind whenever two batches pass while it
/// reads Postgres or writes its socket, so the lag path (catch up from Postgres, rejoin)
/// carries much of the stream. A reader that stops reading lags for certain.
#[tokio::test]
async fn sse_clients_that_lag_catch_up_without_gap_or_duplicate() {
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("CAPIBARA_FIREHOSE_BUFFER".into(), "1".into()));
    let _procs = resume_under_concurrent_writers(&env).await;

    // Stop reading while ~15 MB of events pass: more than the socket buffers hold, so the
    // client's task blocks on its queue (one frame) while the tailer publishes batch after
    // batch. Read afterwards, the stream is still the whole log, each event once.
    let api = env.client();
    let mut stalled = Sse::open(&api, "?after=0", None).await;
    let pad = "x".repeat(256 * 1024);
    let mut big = Vec::new();
    for i in 0..30 {
        big.push(
            api.submit_id(json!({"kind": "echo", "input": {"i": i, "pad": pad}}))
                .await,
        );
    }
    for id in &big {
        api.wait_terminal(id, Duration::from_secs(60)).await;
    }
    let in_db = db_positions(&env, "default").await;
    let mut got: Vec<i64> = Vec::with_capacity(in_db.len());
    while got.len() < in_db.len() {
        let (id, _, _) = stalled
            .next(Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("stalled reader stuck at {} of {}", got.len(), in_db.len()));
        got.push(id.parse().unwrap());
    }
    assert!(stalled.next(Duration::from_secs(1)).await.is_none());
    assert_eq!(
        got.iter().collect::<HashSet<_>>().len(),
        got.len(),
        "duplicates received"
    );
    got.sort();
    assert_eq!(got, in_db, "received set differs from the log");

    let metrics = reqwest::get(format!("{}/metrics", env.api_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lagged: f64 = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("capibara_firehose_lagged_total "))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum();
    assert!(lagged > 0.0, "no client lagged:\n{metrics}");
}

/// 8 writers submit 50 jobs each while a worker runs them; one SSE client drops its connection
/// after a varying number of events and resumes from the last id (header or `?after=`). The
/// union of what it received is exactly the namespace's log, each event once.
async fn resume_under_concurrent_writers(env: &TestEnv) -> (Proc, Proc, Proc) {
    let procs = env.spawn_all().await;
    let api = env.client();
    const WRITERS: usize = 8;
    const JOBS_EACH: usize = 50;

    let mut sse = Sse::open(&api, "?after=0", None).await;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let api = api.clone();
            tokio::spawn(async move {
                for i in 0..JOBS_EACH {
                    api.submit_id(json!({"kind": "echo", "input": {"w": w, "i": i}}))
                        .await;
                }
            })
        })
        .collect();
    let writers_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let done = writers_done.clone();
        tokio::spawn(async move {
            for w in writers {
                w.await.unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
    }

    let pool = env.pool().await;
    let mut received: Vec<String> = Vec::new();
    let mut reconnects = 0;
    // Drop the connection after a varying number of events, and resume.
    let cut_after = [37usize, 120, 5, 211, 64, 150, 1, 97];
    let mut since_connect = 0;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        assert!(
            Instant::now() < deadline,
            "gave up; {} received",
            received.len()
        );
        if let Some((id, _, _)) = sse.next(Duration::from_millis(300)).await {
            received.push(id);
            since_connect += 1;
            if since_connect >= cut_after[reconnects % cut_after.len()] {
                drop(sse);
                reconnects += 1;
                since_connect = 0;
                let last = received.last().unwrap().clone();
                // Alternate the header and the query parameter.
                sse = if reconnects % 2 == 0 {
                    Sse::open(&api, "", Some(&last)).await
                } else {
                    Sse::open(&api, &format!("?after={last}"), None).await
                };
            }
            continue;
        }
        // Quiet for 300 ms: done when every job finished and everything arrived.
        if !writers_done.load(std::sync::atomic::Ordering::SeqCst) {
            continue;
        }
        let open: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status <> 'succeeded'")
            .fetch_one(&pool)
            .await
            .unwrap();
        if open == 0 && received.len() >= db_positions(env, "default").await.len() {
            break;
        }
    }
    // Nothing more trickles in.
    assert!(sse.next(Duration::from_secs(1)).await.is_none());

    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(jobs as usize, WRITERS * JOBS_EACH);
    assert!(reconnects >= 5, "only {reconnects} reconnects");
    let unique: HashSet<&String> = received.iter().collect();
    assert_eq!(unique.len(), received.len(), "duplicates received");
    let mut got: Vec<i64> = received.iter().map(|i| i.parse().unwrap()).collect();
    got.sort();
    let in_db = db_positions(env, "default").await;
    assert_eq!(got.len(), in_db.len(), "{reconnects} reconnects");
    assert_eq!(got, in_db, "received set differs from the log");
    procs
}

#[tokio::test]
async fn sse_filters_by_kind_tag_and_type() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();

    let mut sleeps = Sse::open(&api, "?kind=sleep", None).await;
    let mut tagged = Sse::open(&api, "?types=JobSucceeded&tag=grp:x", None).await;
    let mut sleep_ids = HashSet::new();
    let mut x_ids = HashSet::new();
    for i in 0..3 {
        api.submit_id(json!({"kind": "echo", "input": {"i": i}}))
            .await;
        x_ids.insert(
            api.submit_id(json!({"kind": "echo", "input": {"i": i}, "tags": {"grp": "x"}}))
                .await,
        );
        sleep_ids.insert(
            api.submit_id(json!({"kind": "sleep", "input": {"ms": 5}, "tags": {"grp": "y"}}))
                .await,
        );
    }
    let frames = sleeps
        .until(Duration::from_secs(30), |f| {
            f.iter().filter(|(_, e, _)| e == "JobSucceeded").count() == 3
        })
        .await;
    assert!(frames
        .iter()
        .all(|(_, _, d)| d["metadata"]["kind"] == "sleep"));
    assert_in_order_per_stream(&frames);
    let mut expected = HashSet::new();
    for id in &sleep_ids {
        expected.extend(ids(&api.events(id).await));
    }
    let got: HashSet<String> = frames.iter().map(|f| f.0.clone()).collect();
    assert_eq!(got, expected);
    assert_eq!(frames.len(), expected.len());

    let frames = tagged
        .until(Duration::from_secs(30), |f| f.len() == 3)
        .await;
    assert!(frames.iter().all(|(_, e, _)| e == "JobSucceeded"));
    assert_eq!(
        frames
            .iter()
            .map(|(_, _, d)| d["stream_id"].as_str().unwrap().to_string())
            .collect::<HashSet<_>>(),
        x_ids
    );
    assert!(tagged.next(Duration::from_millis(500)).await.is_none());

    // Resuming a filtered stream from its last id skips what the filter left out.
    for id in &sleep_ids {
        api.wait_terminal(id, Duration::from_secs(30)).await;
    }
    let last = frames.last().unwrap().0.clone();
    let mut resumed = Sse::open(&api, "?types=JobSucceeded&tag=grp:x", Some(&last)).await;
    let x = api
        .submit_id(json!({"kind": "echo", "input": {}, "tags": {"grp": "x"}}))
        .await;
    let more = resumed
        .until(Duration::from_secs(30), |f| !f.is_empty())
        .await;
    assert_eq!(more.len(), 1);
    assert_eq!(more[0].2["stream_id"], x.as_str());
    assert!(resumed.next(Duration::from_millis(500)).await.is_none());
}
