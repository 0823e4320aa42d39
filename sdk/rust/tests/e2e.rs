//! The SDK against the real binaries: each test starts capibara-api, capibara-worker and
//! capibara-scheduler on its own database (`capibara_tests::TestEnv`, visibility timeout 3 s)
//! and drives them through `capibara_sdk` only (plus the harness's admin client where the SDK
//! has no call). Needs the test Postgres and Redis of `deploy/test.sh`.

use std::{
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use capibara_sdk::{
    Backoff, CancellationToken, Client, Error, Event, HandlerError, JobContext, JobStatus,
    KindSpec, LogLevel, Progress, RunStatus, ScheduleSpec, ScheduleTarget, StopReason, Worker,
    WorkerSpec,
};
use capibara_tests::{Proc, TestEnv, ADMIN_KEY};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// Retries 100 ms apart, so a retried job runs again at once.
const FAST: Backoff = Backoff {
    initial_ms: 100,
    factor: 2.0,
    max_ms: 1000,
};

/// A test's stack: its environment, processes and a client with the admin key.
struct Stack {
    env: TestEnv,
    /// api, worker, scheduler.
    procs: (Proc, Proc, Proc),
    client: Client,
}

async fn stack() -> Stack {
    let env = TestEnv::new().await;
    let procs = env.spawn_all().await;
    let client = Client::new(env.api_url(), ADMIN_KEY).expect("client");
    Stack { env, procs, client }
}

fn types(events: &[Event]) -> Vec<&str> {
    events.iter().map(|e| e.event_type.as_str()).collect()
}

fn of_type<'a>(events: &'a [Event], t: &str) -> Vec<&'a Event> {
    events.iter().filter(|e| e.event_type == t).collect()
}

/// Sends a message when dropped: tells the test that the worker dropped a handler's future.
struct DropSignal(Option<mpsc::UnboundedSender<&'static str>>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send("dropped");
        }
    }
}

async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> T {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap_or_else(|| panic!("channel closed waiting for {what}"))
}

/// Wait until job `id` reads `running`: the attempt a lease call handed out is claimed with its
/// first report, or 250 ms after the lease (docs/workers.md, "Fast attempts").
async fn claimed(c: &Client, id: uuid::Uuid) -> capibara_sdk::Job {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let job = c.get(id).await.unwrap();
        if job.status == JobStatus::Running {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} was never claimed: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_and_wait_returns_the_builtin_workers_output() {
    let s = stack().await;
    let c = &s.client;

    // Prefer: wait answers with the finished job.
    let job = c
        .submit("echo", json!({"hello": "world"}))
        .tag("team", "sdk")
        .wait(Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    assert_eq!(job.output, Some(json!({"hello": "world"})));
    assert_eq!(job.tags.get("team").map(String::as_str), Some("sdk"));

    // dedup: another body with the same key returns the first job; ttl and deadline are set.
    let first = c
        .submit("echo", json!({"order": 1}))
        .dedup("order-1", 60)
        .ttl_s(300)
        .deadline_s(600)
        .ordering_key("customer-1")
        .await
        .unwrap();
    assert_eq!(
        first.extra.get("ordering_key"),
        Some(&json!("customer-1")),
        "{first:?}"
    );
    let merged = c
        .submit("echo", json!({"order": 1, "again": true}))
        .dedup("order-1", 60)
        .await
        .unwrap();
    assert_eq!(merged.id, first.id);

    // Without a wait: queued now, `wait` follows it to the end.
    let queued = c.submit("echo", json!({"n": 2})).await.unwrap();
    assert!(!queued.status.is_terminal() || queued.status == JobStatus::Succeeded);
    let done = c
        .wait(queued.id, Some(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(done.status, JobStatus::Succeeded);
    assert_eq!(done.output, Some(json!({"n": 2})));
    assert_eq!(
        c.get(queued.id).await.unwrap().output,
        Some(json!({"n": 2}))
    );

    // The same idempotency key and body give the same job.
    let a = c
        .submit("echo", json!({"k": 1}))
        .idempotency_key("sdk-rust-key-1")
        .await
        .unwrap();
    let b = c
        .submit("echo", json!({"k": 1}))
        .idempotency_key("sdk-rust-key-1")
        .await
        .unwrap();
    assert_eq!(a.id, b.id);

    // Refusals are typed and name their field.
    let bad = c.submit("sleep", json!({"ms": -1})).await.unwrap_err();
    assert!(matches!(bad, Error::Validation(_)), "{bad:?}");
    assert_eq!(bad.field(), Some("input.ms"));
    let missing = c.get(uuid::Uuid::now_v7()).await.unwrap_err();
    assert!(matches!(missing, Error::NotFound(_)), "{missing:?}");
    let finished = c.cancel(done.id).await.unwrap_err();
    assert!(matches!(finished, Error::Conflict(_)), "{finished:?}");
    let anonymous = Client::new(s.env.api_url(), "not-a-key-0123456789")
        .unwrap()
        .get(done.id)
        .await
        .unwrap_err();
    assert!(matches!(anonymous, Error::Unauthorized(_)), "{anonymous:?}");

    // A wait that runs out says so; the job keeps going.
    let slow = c.submit("sleep", json!({"ms": 20000})).await.unwrap();
    let t0 = Instant::now();
    let timeout = c
        .wait(slow.id, Some(Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert!(matches!(timeout, Error::Timeout(_)), "{timeout:?}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    // Cancel a job that has not ended; retry brings it back.
    let canceled = c.cancel(slow.id).await.unwrap();
    assert!(canceled.cancel_requested || canceled.status == JobStatus::Canceled);
    let canceled = c
        .wait(slow.id, Some(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(canceled.status, JobStatus::Canceled);
    let retried = c.retry(slow.id).await.unwrap();
    assert!(!retried.status.is_terminal(), "{retried:?}");
    c.cancel(slow.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_event_stream_resumes_from_last_event_id_without_gap_or_duplicate() {
    let s = stack().await;
    let c = &s.client;
    let kind = "sdk-rust.stream";
    let worker = Worker::builder(c.clone())
        .handle(kind, |job: JobContext| async move {
            for i in 1..=6 {
                job.progress(f64::from(i) * 10.0, format!("step {i}"))
                    .await?;
                job.chunk(json!({"part": i})).await?;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            Ok(json!({"parts": 6}))
        })
        .start()
        .await
        .unwrap();

    let job = c.submit(kind, json!({})).await.unwrap();
    // Read the live stream until three events came, then drop the connection.
    let mut first = c.stream(job.id, None);
    let mut head = Vec::new();
    while head.len() < 3 {
        let ev = tokio::time::timeout(Duration::from_secs(20), first.next())
            .await
            .expect("an event")
            .expect("the stream goes on")
            .expect("an event, not an error");
        head.push(ev);
    }
    drop(first);
    // Resume after the last one received: the rest, live, to the terminal event.
    let last = head.last().unwrap().id.clone();
    let tail: Vec<Event> = tokio::time::timeout(
        Duration::from_secs(30),
        c.stream(job.id, Some(last)).map(|r| r.unwrap()).collect(),
    )
    .await
    .expect("the stream ends after the terminal event");
    assert_eq!(tail.last().unwrap().event_type, "JobSucceeded");

    let streamed: Vec<Event> = head.into_iter().chain(tail).collect();
    let logged = c.all_events(job.id).await.unwrap();
    assert_eq!(
        streamed.iter().map(|e| &e.id).collect::<Vec<_>>(),
        logged.iter().map(|e| &e.id).collect::<Vec<_>>(),
        "streamed {:?}\nlogged {:?}",
        types(&streamed),
        types(&logged)
    );
    let versions: Vec<i64> = streamed.iter().map(|e| e.version).collect();
    assert_eq!(versions, (1..=versions.len() as i64).collect::<Vec<_>>());
    assert_eq!(of_type(&streamed, "JobOutputChunk").len(), 6);

    // Resumed after the terminal event: it ends at once, empty.
    let end = c.stream(job.id, Some(logged.last().unwrap().id.clone()));
    let rest: Vec<_> = tokio::time::timeout(Duration::from_secs(10), end.collect::<Vec<_>>())
        .await
        .expect("ends");
    assert!(rest.is_empty(), "{rest:?}");

    // A page of the JSON list resumes the same way.
    let page = c
        .events(job.id, Some(&logged[1].id), Some(2))
        .await
        .unwrap();
    assert_eq!(
        page.items.iter().map(|e| &e.id).collect::<Vec<_>>(),
        vec![&logged[2].id, &logged[3].id]
    );
    worker.stop().await;
}

/// The stream's next event (fails the test on an error, an end or 40 s of nothing).
async fn next_event(stream: &mut capibara_sdk::EventStream) -> Event {
    tokio::time::timeout(Duration::from_secs(40), stream.next())
        .await
        .expect("an event in time")
        .expect("the stream goes on")
        .expect("an event, not an error")
}

#[tokio::test(flavor = "multi_thread")]
async fn one_event_stream_survives_an_api_restart_without_gap_or_duplicate() {
    let mut s = stack().await;
    let c = s.client.clone();
    let kind = "sdk-rust.restart";
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let go = Arc::new(tokio::sync::Notify::new());
    let worker = Worker::builder(c.clone())
        .handle(kind, {
            let go = go.clone();
            move |job: JobContext| {
                let (tx, go) = (tx.clone(), go.clone());
                async move {
                    job.progress(10.0, "before").await?;
                    let _ = tx.send(());
                    go.notified().await;
                    job.progress(90.0, "after").await?;
                    Ok("done")
                }
            }
        })
        .start()
        .await
        .unwrap();
    let job = c.submit(kind, json!({})).await.unwrap();
    let mut stream = c.stream(job.id, None);
    let mut seen = Vec::new();
    recv(&mut rx, "the first progress").await;
    while !types(&seen).contains(&"JobProgress") {
        seen.push(next_event(&mut stream).await);
    }
    // The API goes away under the open stream and comes back on the same port.
    s.procs.0.kill();
    s.procs.0 = s.env.spawn_api().await;
    go.notify_one();
    loop {
        let ev = next_event(&mut stream).await;
        let end = ev.event_type == "JobSucceeded";
        seen.push(ev);
        if end {
            break;
        }
    }
    let logged = c.all_events(job.id).await.unwrap();
    assert_eq!(
        seen.iter().map(|e| &e.id).collect::<Vec<_>>(),
        logged.iter().map(|e| &e.id).collect::<Vec<_>>(),
        "streamed {:?}\nlogged {:?}",
        types(&seen),
        types(&logged)
    );
    assert_eq!(of_type(&seen, "JobProgress").len(), 2);
    assert!(
        stream.next().await.is_none(),
        "the stream ends after the terminal event"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rust_worker_runs_a_user_kind_with_progress_logs_and_chunks() {
    let s = stack().await;
    let c = &s.client;
    let kind = "sdk-rust.add";
    let worker = Worker::builder(c.clone())
        .name("sdk-rust-test")
        .concurrency(4)
        .version("9.9.9")
        .handle(kind, |job: JobContext| async move {
            #[derive(serde::Deserialize)]
            struct In {
                a: i64,
                b: i64,
            }
            let input: In = job.input_as()?;
            job.progress(10.0, "start").await?;
            job.log(LogLevel::Info, "working").await?;
            job.chunk(json!({"part": 1})).await?;
            job.chunk(json!({"part": 2})).await?;
            job.report_progress(Progress {
                percent: Some(100.0),
                message: Some("done".into()),
                data: Some(json!({"k": "v"})),
            })
            .await?;
            Ok(json!({"sum": input.a + input.b, "attempt": job.attempt}))
        })
        .kind_definition(
            kind,
            KindSpec {
                description: Some("adds".into()),
                input_schema: Some(json!({
                    "type": "object", "required": ["a", "b"],
                    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}
                })),
                ..Default::default()
            },
        )
        .start()
        .await
        .unwrap();
    let reg = worker.registration();
    assert_eq!(reg.lease_s, 3.0);
    assert_eq!(reg.heartbeat_s, 1.0);
    assert!(reg.name.starts_with("sdk-rust-test-"), "{}", reg.name);

    // The kind was declared with its definition when the worker registered.
    let k = c.get_kind(kind).await.unwrap();
    assert_eq!(k.description, "adds");
    assert!(!k.builtin);
    let bad = c.submit(kind, json!({"a": 1})).await.unwrap_err();
    assert_eq!(bad.field(), Some("input.b"), "{bad:?}");

    let job = c.submit(kind, json!({"a": 2, "b": 3})).await.unwrap();
    let job = c.wait(job.id, Some(Duration::from_secs(30))).await.unwrap();
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    assert_eq!(job.output, Some(json!({"sum": 5, "attempt": 1})));
    assert_eq!(job.worker_id.as_deref(), Some(reg.name.as_str()));
    assert_eq!(
        job.progress,
        Some(json!({"percent": 100.0, "message": "done", "data": {"k": "v"}}))
    );
    let evs = c.all_events(job.id).await.unwrap();
    let percents: Vec<Value> = of_type(&evs, "JobProgress")
        .iter()
        .map(|e| e.data["percent"].clone())
        .collect();
    assert_eq!(percents, vec![json!(10.0), json!(100.0)]);
    let logs: Vec<&Value> = of_type(&evs, "JobLog").iter().map(|e| &e.data).collect();
    assert_eq!(logs, vec![&json!({"level": "info", "message": "working"})]);
    let chunks: Vec<&Value> = of_type(&evs, "JobOutputChunk")
        .iter()
        .map(|e| &e.data)
        .collect();
    assert_eq!(
        chunks,
        vec![
            &json!({"seq": 0, "data": {"part": 1}}),
            &json!({"seq": 1, "data": {"part": 2}})
        ]
    );

    // Many at once: up to the free slots in one lease, all done.
    let batch = c
        .submit_batch(
            (0..8)
                .map(|i| capibara_sdk::JobSpec::new(kind, json!({"a": i, "b": 1})))
                .collect(),
        )
        .await
        .unwrap();
    for (i, j) in batch.iter().enumerate() {
        let j = c.wait(j.id, Some(Duration::from_secs(30))).await.unwrap();
        assert_eq!(j.output.unwrap()["sum"], json!(i + 1));
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_reaches_the_running_handler_and_the_job_ends_canceled() {
    let s = stack().await;
    let c = &s.client;
    let kind = "sdk-rust.cancel";
    let (tx, mut rx) = mpsc::unbounded_channel::<&'static str>();
    let reason = Arc::new(Mutex::new(None));
    let worker = Worker::builder(c.clone())
        .handle(kind, {
            let reason = reason.clone();
            move |job: JobContext| {
                let tx = tx.clone();
                let reason = reason.clone();
                async move {
                    let _dropped = DropSignal(Some(tx.clone()));
                    let _ = tx.send("started");
                    job.cancelled().await;
                    *reason.lock().unwrap() = job.stop_reason();
                    let _ = tx.send("saw cancel");
                    Err::<(), _>(HandlerError::retryable("stopped"))
                }
            }
        })
        .start()
        .await
        .unwrap();
    let job = c.submit(kind, json!({})).await.unwrap();
    assert_eq!(recv(&mut rx, "the handler to start").await, "started");
    // A running attempt to cancel (one canceled before its claim is canceled at once).
    claimed(c, job.id).await;
    let t0 = Instant::now();
    let asked = c.cancel(job.id).await.unwrap();
    assert!(asked.cancel_requested);
    assert_eq!(
        recv(&mut rx, "the handler to see the cancel").await,
        "saw cancel"
    );
    // Seen at the next heartbeat (every second here).
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert_eq!(*reason.lock().unwrap(), Some(StopReason::Canceled));
    let done = c.wait(job.id, Some(Duration::from_secs(20))).await.unwrap();
    assert_eq!(done.status, JobStatus::Canceled, "{done:?}");
    assert_eq!(done.attempt, 1);
    let evs = c.all_events(job.id).await.unwrap();
    let t = types(&evs);
    assert!(t.contains(&"JobCancelRequested"), "{t:?}");
    assert_eq!(t.last(), Some(&"JobCanceled"));
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn handler_errors_steer_retries_fatal_failures_retry_after_and_timeouts() {
    let s = stack().await;
    let c = &s.client;
    let worker = Worker::builder(c.clone())
        .handle("sdk-rust.flaky", |job: JobContext| async move {
            if job.attempt == 1 {
                return Err(HandlerError::retryable("first attempt fails"));
            }
            Ok(json!({"attempt": job.attempt}))
        })
        .handle("sdk-rust.parse", |job: JobContext| async move {
            // Any error converts with `?`: retryable, typed after the error.
            let n: u32 = job.input["n"].as_str().unwrap_or("").parse()?;
            Ok(n)
        })
        .handle("sdk-rust.fatal", |_job: JobContext| async move {
            Err::<(), _>(HandlerError::fatal("bad_request", "cannot be done"))
        })
        .handle("sdk-rust.later", |job: JobContext| async move {
            if job.attempt == 1 {
                return Err(HandlerError::retry_after(
                    Duration::from_millis(1500),
                    "rate limited upstream",
                ));
            }
            Ok("later")
        })
        .handle("sdk-rust.slow", |job: JobContext| async move {
            if job.attempt == 1 {
                futures::future::pending::<()>().await;
            }
            Ok("quick")
        })
        .handle("sdk-rust.panics", |job: JobContext| async move {
            if job.attempt == 1 {
                panic!("boom");
            }
            Ok(job.attempt)
        })
        .start()
        .await
        .unwrap();
    let wait = |id| c.wait(id, Some(Duration::from_secs(30)));

    let flaky = c
        .submit("sdk-rust.flaky", json!({}))
        .backoff(FAST)
        .await
        .unwrap();
    let parse = c
        .submit("sdk-rust.parse", json!({"n": "x"}))
        .backoff(FAST)
        .max_attempts(2)
        .await
        .unwrap();
    let fatal = c
        .submit("sdk-rust.fatal", json!({}))
        .max_attempts(3)
        .backoff(FAST)
        .await
        .unwrap();
    let later = c
        .submit("sdk-rust.later", json!({}))
        .backoff(FAST)
        .await
        .unwrap();
    let slow = c
        .submit("sdk-rust.slow", json!({}))
        .timeout_s(1)
        .backoff(FAST)
        .await
        .unwrap();
    let panics = c
        .submit("sdk-rust.panics", json!({}))
        .backoff(FAST)
        .await
        .unwrap();

    // Retryable on attempt 1, success on attempt 2.
    let j = wait(flaky.id).await.unwrap();
    assert_eq!((j.status, j.attempt), (JobStatus::Succeeded, 2), "{j:?}");
    assert_eq!(j.output, Some(json!({"attempt": 2})));
    let evs = c.all_events(flaky.id).await.unwrap();
    let failed = of_type(&evs, "JobAttemptFailed");
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].data["error"]["type"], "error");
    assert_eq!(failed[0].data["error"]["message"], "first attempt fails");

    // `?` on a ParseIntError: retried until the attempts are used up.
    let j = wait(parse.id).await.unwrap();
    assert_eq!((j.status, j.attempt), (JobStatus::Failed, 2), "{j:?}");
    assert_eq!(j.error.as_ref().unwrap().error_type, "ParseIntError");

    // Fatal: failed at once.
    let j = wait(fatal.id).await.unwrap();
    assert_eq!((j.status, j.attempt), (JobStatus::Failed, 1), "{j:?}");
    let e = j.error.unwrap();
    assert_eq!(
        (e.error_type.as_str(), e.message.as_str()),
        ("bad_request", "cannot be done")
    );

    // Retry-after: attempt 2 starts no sooner than the delay.
    let j = wait(later.id).await.unwrap();
    assert_eq!((j.status, j.attempt), (JobStatus::Succeeded, 2), "{j:?}");
    let evs = c.all_events(later.id).await.unwrap();
    let failed = of_type(&evs, "JobAttemptFailed")[0];
    assert_eq!(failed.data["error"]["type"], "retry_after");
    let second = of_type(&evs, "JobStarted")[1];
    let gap = second.recorded_at - failed.recorded_at;
    assert!(
        gap.num_milliseconds() >= 1400,
        "attempt 2 started {gap} after the failure"
    );

    // timeout_s: the attempt is stopped and fails as `timeout`; attempt 2 succeeds.
    let j = wait(slow.id).await.unwrap();
    assert_eq!((j.status, j.attempt), (JobStatus::Succeeded, 2), "{j:?}");
    let evs = c.all_events(slow.id).await.unwrap();
    assert_eq!(
        of_type(&evs, "JobAttemptFailed")[0].data["error"]["type"],
        "timeout"
    );

    // A panicking handler fails its attempt; the worker goes on.
    let j = wait(panics.id).await.unwrap();
    assert_eq!((j.status, j.attempt), (JobStatus::Succeeded, 2), "{j:?}");
    let evs = c.all_events(panics.id).await.unwrap();
    let failed = of_type(&evs, "JobAttemptFailed");
    assert_eq!(failed[0].data["error"]["type"], "panic");
    assert_eq!(failed[0].data["error"]["message"], "boom");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_lease_is_refused_with_lease_lost_and_records_nothing() {
    let s = stack().await;
    let c = &s.client;
    let kind = "sdk-rust.stale";
    c.put_kind(kind, &KindSpec::default()).await.unwrap();
    let w1 = c
        .register_worker(&WorkerSpec::new([kind]).name("sdk-rust-stale-1"))
        .await
        .unwrap();
    let job = c.submit(kind, json!({"n": 1})).backoff(FAST).await.unwrap();
    let old = c
        .lease_jobs(w1.id, 1, Duration::from_secs(10))
        .await
        .unwrap()
        .pop()
        .expect("the job is leased");
    assert_eq!((old.job.id, old.job.attempt), (job.id, 1));
    old.progress(&Progress {
        message: Some("while fresh".into()),
        ..Default::default()
    })
    .await
    .unwrap();

    // No heartbeat: the lease expires (3 s), the scheduler reaps it, another worker leases it.
    let w2 = c
        .register_worker(&WorkerSpec::new([kind]).name("sdk-rust-stale-2"))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(25);
    let fresh = loop {
        if let Some(l) = c
            .lease_jobs(w2.id, 1, Duration::from_secs(5))
            .await
            .unwrap()
            .pop()
        {
            break l;
        }
        assert!(Instant::now() < deadline, "the job was not leased again");
    };
    assert_eq!((fresh.job.id, fresh.job.attempt), (job.id, 2));
    let before = c.all_events(job.id).await.unwrap();

    // Every call with the old token is refused and records nothing.
    let e = old.complete(json!({"from": "stale"})).await.unwrap_err();
    match &e {
        Error::LeaseLost(p) => {
            assert_eq!(p.status, 409);
            assert!(p.problem_type.ends_with("lease-lost"), "{p:?}");
        }
        other => panic!("expected LeaseLost, got {other:?}"),
    }
    let stale_progress = Progress {
        message: Some("stale progress".into()),
        ..Default::default()
    };
    assert!(matches!(
        old.progress(&stale_progress).await,
        Err(Error::LeaseLost(_))
    ));
    assert!(matches!(old.heartbeat().await, Err(Error::LeaseLost(_))));
    let stale_fail = capibara_sdk::Failure {
        error_type: "x".into(),
        message: "stale fail".into(),
        retryable: true,
        retry_after_s: None,
    };
    assert!(matches!(
        old.fail(&stale_fail).await,
        Err(Error::LeaseLost(_))
    ));
    assert!(matches!(old.release().await, Err(Error::LeaseLost(_))));
    assert_eq!(
        c.all_events(job.id).await.unwrap(),
        before,
        "the stale token recorded something"
    );

    // A malformed token is a 422 naming the header.
    let garbage = capibara_sdk::Lease::new(
        c.clone(),
        fresh.job.clone(),
        "not-a-token".into(),
        fresh.expires_at,
    );
    let bad = garbage.heartbeat().await.unwrap_err();
    assert!(matches!(bad, Error::Validation(_)), "{bad:?}");
    assert_eq!(bad.field(), Some("Capibara-Lease"));

    // The fresh lease completes; the old attempt left only what it did while it held it.
    let done = fresh.complete(json!({"from": "fresh"})).await.unwrap();
    assert_eq!(done.status, JobStatus::Succeeded);
    let evs = c.all_events(job.id).await.unwrap();
    assert_eq!(&evs[..before.len()], &before[..]);
    let text = serde_json::to_string(&evs).unwrap();
    for stale in ["stale progress", "stale fail", "\"stale\""] {
        assert!(!text.contains(stale), "the stale token recorded {stale}");
    }
    assert!(text.contains("while fresh"));
    let ok = of_type(&evs, "JobSucceeded");
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0].data["output"], json!({"from": "fresh"}));
    assert_eq!(
        of_type(&evs, "JobAttemptFailed")[0].data["error"]["type"],
        "worker_lost"
    );
    c.deregister_worker(w1.id).await.unwrap();
    c.deregister_worker(w2.id).await.unwrap();
    // A deregistered worker may not lease.
    let refused = c.lease_jobs(w1.id, 1, Duration::ZERO).await.unwrap_err();
    assert!(matches!(refused, Error::Conflict(_)), "{refused:?}");
}

/// The worker with `id` as `GET /v1/workers` lists it.
async fn listed_worker(env: &TestEnv, id: uuid::Uuid) -> Value {
    let r = env.client().get("/v1/workers").await;
    assert_eq!(r.status, 200, "{r:?}");
    r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == json!(id))
        .cloned()
        .unwrap_or_else(|| panic!("worker {id} not listed: {}", r.body))
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_releases_a_handler_still_running_after_the_grace_period() {
    let s = stack().await;
    let c = &s.client;
    let kind = "sdk-rust.shutdown";
    let (tx, mut rx) = mpsc::unbounded_channel::<&'static str>();
    let token = CancellationToken::new();
    let builder = Worker::builder(c.clone())
        .grace(Duration::from_millis(300))
        .handle_signals(false)
        .shutdown_token(token.clone())
        .handle(kind, move |job: JobContext| {
            let tx = tx.clone();
            async move {
                let _dropped = DropSignal(Some(tx.clone()));
                let _ = tx.send("started");
                if job.attempt == 1 {
                    futures::future::pending::<()>().await;
                }
                Ok(job.attempt)
            }
        });
    c.put_kind(kind, &KindSpec::default()).await.unwrap();
    let job = c.submit(kind, json!({})).await.unwrap();
    let run = tokio::spawn(builder.run());
    assert_eq!(recv(&mut rx, "the handler to start").await, "started");
    let running = claimed(c, job.id).await;
    let worker_name = running.worker_id.unwrap();

    let t0 = Instant::now();
    token.cancel();
    tokio::time::timeout(Duration::from_secs(15), run)
        .await
        .expect("run() returns after the shutdown")
        .unwrap()
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    // The handler's future was dropped, its job given back without using up an attempt.
    assert_eq!(recv(&mut rx, "the handler to be dropped").await, "dropped");
    let released = c.get(job.id).await.unwrap();
    assert_eq!(released.status, JobStatus::Queued, "{released:?}");
    assert_eq!(released.max_attempts - released.attempt, job.max_attempts);
    let evs = c.all_events(job.id).await.unwrap();
    assert!(evs
        .iter()
        .any(|e| e.event_type == "JobQueued" && e.data["reason"] == "released"));
    let ended: Vec<&Value> = of_type(&evs, "JobAttemptFailed")
        .iter()
        .map(|e| &e.data["error"]["type"])
        .collect();
    assert_eq!(ended, vec![&json!("worker_shutdown")]);
    // Deregistered.
    let listed = s.env.client().get("/v1/workers").await.body;
    let me = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == json!(worker_name))
        .cloned()
        .expect("the worker is listed");
    assert_eq!(me["status"], "stopped", "{me}");

    // Nothing is lost: another worker runs it.
    let (tx2, _rx2) = mpsc::unbounded_channel::<&'static str>();
    let again = Worker::builder(c.clone())
        .handle(kind, move |job: JobContext| {
            let _ = tx2.send("again");
            async move { Ok(job.attempt) }
        })
        .start()
        .await
        .unwrap();
    let done = c.wait(job.id, Some(Duration::from_secs(20))).await.unwrap();
    assert_eq!(done.status, JobStatus::Succeeded);
    assert_eq!(done.output, Some(json!(2)));
    again.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_lets_a_running_handler_finish_within_the_grace_period_and_leases_no_more() {
    let s = stack().await;
    let c = &s.client;
    let kind = "sdk-rust.drain";
    let started = Arc::new(AtomicU32::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel::<&'static str>();
    let worker = Worker::builder(c.clone())
        .concurrency(2)
        .grace(Duration::from_secs(15))
        .handle(kind, {
            let started = started.clone();
            move |job: JobContext| {
                let tx = tx.clone();
                started.fetch_add(1, Ordering::SeqCst);
                async move {
                    let _ = tx.send("started");
                    let ms = job.input["sleep_ms"].as_u64().unwrap_or(0);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok(json!({"slept": ms}))
                }
            }
        })
        .start()
        .await
        .unwrap();
    let id = worker.id();
    let a = c.submit(kind, json!({"sleep_ms": 2000})).await.unwrap();
    assert_eq!(recv(&mut rx, "a to start").await, "started");
    let t0 = Instant::now();
    let stopping = tokio::spawn(worker.stop());
    // A free slot, but the worker is stopping: it must not take this one.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let b = c.submit(kind, json!({"sleep_ms": 0})).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), stopping)
        .await
        .expect("stop() returns")
        .unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );
    let a = c.get(a.id).await.unwrap();
    assert_eq!((a.status, a.attempt), (JobStatus::Succeeded, 1), "{a:?}");
    assert_eq!(a.output, Some(json!({"slept": 2000})));
    assert_eq!(
        started.load(Ordering::SeqCst),
        1,
        "the stopping worker took another job"
    );
    assert_eq!(c.get(b.id).await.unwrap().status, JobStatus::Queued);
    assert_eq!(listed_worker(&s.env, id).await["status"], "stopped");
}

#[tokio::test(flavor = "multi_thread")]
async fn workflows_and_schedules_run_through_the_client() {
    let s = stack().await;
    let c = &s.client;
    let kind = "sdk-rust.double";
    let worker = Worker::builder(c.clone())
        .handle(kind, |job: JobContext| async move {
            Ok(json!({"doubled": job.input["n"].as_i64().unwrap_or(0) * 2}))
        })
        .start()
        .await
        .unwrap();

    // A workflow whose step is a Rust-handled kind, then a built-in one.
    let wf = c
        .create_workflow(json!({
            "name": "sdk-rust-flow",
            "steps": [
                {"id": "a", "kind": kind, "input": {"n": "{{ input.n }}"}},
                {"id": "b", "kind": "echo", "depends_on": ["a"],
                 "input": {"got": "{{ steps.a.output.doubled }}"}}
            ],
            "output": "{{ steps.b.output }}"
        }))
        .await
        .unwrap();
    assert_eq!(wf.name, "sdk-rust-flow");
    let run = c
        .start_run(wf.id, json!({"n": 21}))
        .wait(Duration::from_secs(30))
        .await
        .unwrap();
    let run = c
        .wait_run(run.id, Some(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    assert_eq!(run.output, Some(json!({"got": 42})));
    assert_eq!(run.step("a").unwrap().output, Some(json!({"doubled": 42})));
    let evs: Vec<Event> = tokio::time::timeout(
        Duration::from_secs(10),
        c.stream_run(run.id, None).map(|r| r.unwrap()).collect(),
    )
    .await
    .expect("a finished run's stream ends");
    assert_eq!(evs.first().unwrap().event_type, "RunStarted");
    assert_eq!(evs.last().unwrap().event_type, "RunSucceeded");

    // A schedule of a job, fired on request.
    let sched = c
        .create_schedule(&ScheduleSpec::new(
            "sdk-rust-nightly",
            "0 3 * * *",
            ScheduleTarget::Job {
                job: capibara_sdk::JobSpec::new(kind, json!({"n": 5})),
            },
        ))
        .await
        .unwrap();
    assert_eq!(sched.status, "active");
    assert!(!sched.next_fire_times.is_empty());
    let fired = c.trigger_schedule(sched.id).await.unwrap();
    let job = fired.last_job_id.expect("the tick's job");
    let job = c.wait(job, Some(Duration::from_secs(30))).await.unwrap();
    assert_eq!(job.output, Some(json!({"doubled": 10})));
    let paused = c.pause_schedule(sched.id).await.unwrap();
    assert_eq!(paused.status, "paused");
    let listed = c.list_schedules(None).await.unwrap();
    assert!(listed.items.iter().any(|x| x.id == sched.id));
    c.delete_schedule(sched.id).await.unwrap();
    worker.stop().await;
}

/// The README's quick start, as it is written there.
mod quickstart {
    include!("../examples/quickstart.rs");

    pub fn run() -> capibara_sdk::Result<()> {
        main()
    }
}

#[test]
fn the_readme_opens_with_the_quickstart_example() {
    let readme = include_str!("../README.md");
    let example = include_str!("../examples/quickstart.rs");
    let block = readme
        .split("```rust\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a rust block in the README");
    assert_eq!(
        block, example,
        "README.md's quick start and examples/quickstart.rs differ"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_quickstart_runs_against_a_real_server() {
    let s = stack().await;
    // The quick start reads its settings from the environment, as a user's program does.
    std::env::set_var("CAPIBARA_URL", s.env.api_url());
    std::env::set_var("CAPIBARA_API_KEY", ADMIN_KEY);
    // Its own runtime, on a thread of its own (`#[tokio::main]` cannot nest in this one).
    tokio::task::spawn_blocking(|| std::thread::spawn(quickstart::run).join())
        .await
        .unwrap()
        .expect("the quick start did not panic")
        .expect("the quick start succeeded");
    let jobs = s
        .client
        .list_jobs(&capibara_sdk::JobQuery {
            kind: Some("demo.greet".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(jobs.items.len(), 1);
    let job = &jobs.items[0];
    assert_eq!(job.status, JobStatus::Succeeded);
    assert_eq!(job.output, Some(json!({"greeting": "Hello, Ada!"})));
    let evs = s.client.all_events(job.id).await.unwrap();
    assert_eq!(of_type(&evs, "JobProgress")[0].data["message"], "thinking");
}

/// The two signs of a stopped in-process handler, in either order.
async fn stopped(rx: &mut mpsc::UnboundedReceiver<&'static str>) -> Vec<&'static str> {
    let mut got = vec![
        recv(rx, "the handler to be dropped").await,
        recv(rx, "its task to see the stop").await,
    ];
    got.sort();
    got
}

// --- In-process mode ---------------------------------------------------------------------

/// In-process settings on the test's database and Redis prefix.
fn in_process(env: &TestEnv) -> capibara_sdk::InProcess {
    let mut config = capibara_sdk::in_process::Config::from_env().expect("config");
    config.database_url = env.database_url.clone();
    config.redis_url = env.redis_url.clone();
    config.redis_prefix = env.redis_prefix.clone();
    config.visibility_timeout = Duration::from_secs_f64(env.visibility_timeout_s);
    config.db_max_connections = 8;
    capibara_sdk::InProcess::from_config(config)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_in_process_worker_runs_the_same_handlers_straight_on_postgres_and_redis() {
    let s = stack().await;
    let c = &s.client;
    let kind = "sdk-inproc.add";
    let worker = Worker::in_process(in_process(&s.env))
        .concurrency(4)
        .handle(kind, |job: JobContext| async move {
            #[derive(serde::Deserialize)]
            struct In {
                a: i64,
                b: i64,
            }
            let input: In = job.input_as()?;
            assert!(job.lease().is_none(), "no lease token in-process");
            job.progress(10.0, "start").await?;
            job.log(LogLevel::Warn, "working").await?;
            job.chunk(json!({"part": 1})).await?;
            job.report_progress(Progress {
                percent: Some(100.0),
                message: Some("done".into()),
                data: Some(json!({"k": "v"})),
            })
            .await?;
            Ok(json!({"sum": input.a + input.b, "queue": job.job().queue}))
        })
        .kind_definition(
            kind,
            KindSpec {
                description: Some("adds in-process".into()),
                input_schema: Some(json!({
                    "type": "object", "required": ["a", "b"],
                    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}
                })),
                ..Default::default()
            },
        )
        .handle("sdk-inproc.flaky", |job: JobContext| async move {
            if job.attempt == 1 {
                return Err(HandlerError::retryable("first attempt fails"));
            }
            Ok(json!({"attempt": job.attempt}))
        })
        .handle("sdk-inproc.fatal", |_job: JobContext| async move {
            Err::<(), _>(HandlerError::fatal("bad_request", "cannot be done"))
        })
        .handle("sdk-inproc.panics", |job: JobContext| async move {
            if job.attempt == 1 {
                panic!("boom");
            }
            Ok(job.attempt)
        })
        .start()
        .await
        .unwrap();
    let reg = worker.registration();
    assert_eq!((reg.lease_s, reg.heartbeat_s), (3.0, 1.0));
    assert_eq!(reg.queues, ["default"]);

    // Declared with its definition: checked at submission by the API.
    let k = c.get_kind(kind).await.unwrap();
    assert_eq!(k.description, "adds in-process");
    let bad = c.submit(kind, json!({"a": 1})).await.unwrap_err();
    assert_eq!(bad.field(), Some("input.b"), "{bad:?}");
    // Listed in its namespace, and a live worker of its kinds.
    assert_eq!(listed_worker(&s.env, reg.id).await["status"], "active");
    let listed = s.env.client().get(&format!("/v1/kinds/{kind}")).await.body;
    assert_eq!(listed["live_workers"], 1, "{listed}");

    let job = c.submit(kind, json!({"a": 2, "b": 3})).await.unwrap();
    let job = c.wait(job.id, Some(Duration::from_secs(30))).await.unwrap();
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    assert_eq!(job.output, Some(json!({"sum": 5, "queue": "default"})));
    assert_eq!(job.worker_id.as_deref(), Some(reg.name.as_str()));
    let evs = c.all_events(job.id).await.unwrap();
    assert_eq!(
        types(&evs),
        [
            "JobSubmitted",
            "JobStarted",
            "JobProgress",
            "JobLog",
            "JobOutputChunk",
            "JobProgress",
            "JobSucceeded"
        ]
    );
    assert_eq!(
        of_type(&evs, "JobLog")[0].data,
        json!({"level": "warn", "message": "working"})
    );
    assert_eq!(
        of_type(&evs, "JobProgress")[1].data["data"],
        json!({"k": "v"})
    );
    assert_eq!(
        of_type(&evs, "JobOutputChunk")[0].data,
        json!({"seq": 0, "data": {"part": 1}})
    );

    // Built-in jobs on the same queue stay with capibara-worker.
    let echo = c.submit("echo", json!({"x": 1})).await.unwrap();
    let echo = c
        .wait(echo.id, Some(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(echo.status, JobStatus::Succeeded);
    assert_ne!(echo.worker_id.as_deref(), Some(reg.name.as_str()));

    // Handler errors steer retries as over HTTP.
    let wait = |id| c.wait(id, Some(Duration::from_secs(30)));
    let flaky = c
        .submit("sdk-inproc.flaky", json!({}))
        .backoff(FAST)
        .await
        .unwrap();
    let fatal = c
        .submit("sdk-inproc.fatal", json!({}))
        .backoff(FAST)
        .await
        .unwrap();
    let panics = c
        .submit("sdk-inproc.panics", json!({}))
        .backoff(FAST)
        .await
        .unwrap();
    let j = wait(flaky.id).await.unwrap();
    assert_eq!((j.status, j.attempt), (JobStatus::Succeeded, 2), "{j:?}");
    let j = wait(fatal.id).await.unwrap();
    assert_eq!((j.status, j.attempt), (JobStatus::Failed, 1), "{j:?}");
    assert_eq!(j.error.unwrap().error_type, "bad_request");
    let j = wait(panics.id).await.unwrap();
    assert_eq!((j.status, j.attempt), (JobStatus::Succeeded, 2), "{j:?}");
    let evs = c.all_events(panics.id).await.unwrap();
    assert_eq!(
        of_type(&evs, "JobAttemptFailed")[0].data["error"]["message"],
        "boom"
    );

    worker.stop().await;
    assert_eq!(listed_worker(&s.env, reg.id).await["status"], "stopped");
}

#[tokio::test(flavor = "multi_thread")]
async fn in_process_cancel_timeout_and_shutdown_reach_the_handler() {
    let s = stack().await;
    let c = &s.client;
    let (tx, mut rx) = mpsc::unbounded_channel::<&'static str>();
    let reasons = Arc::new(Mutex::new(Vec::new()));
    let waits = {
        let reasons = reasons.clone();
        move |job: JobContext| {
            let tx = tx.clone();
            let reasons = reasons.clone();
            async move {
                let _dropped = DropSignal(Some(tx.clone()));
                let _ = tx.send("started");
                // A task of the handler's own sees the stop through the token.
                let watched = job.clone();
                let seen = tx.clone();
                tokio::spawn(async move {
                    watched.cancelled().await;
                    reasons.lock().unwrap().push(watched.stop_reason());
                    let _ = seen.send("saw the stop");
                });
                match job.input["sleep_ms"].as_u64() {
                    Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                    None => futures::future::pending::<()>().await,
                }
                Ok(json!({"slept": job.input["sleep_ms"]}))
            }
        }
    };
    let worker = Worker::in_process(in_process(&s.env))
        .concurrency(2)
        .grace(Duration::from_secs(15))
        .handle("sdk-inproc.wait", waits)
        .start()
        .await
        .unwrap();

    // Cancel: the handler's future is dropped, its token fires, the job ends canceled.
    let job = c.submit("sdk-inproc.wait", json!({})).await.unwrap();
    assert_eq!(recv(&mut rx, "the handler to start").await, "started");
    c.cancel(job.id).await.unwrap();
    assert_eq!(stopped(&mut rx).await, ["dropped", "saw the stop"]);
    let done = c.wait(job.id, Some(Duration::from_secs(20))).await.unwrap();
    assert_eq!(done.status, JobStatus::Canceled, "{done:?}");
    assert_eq!(
        reasons.lock().unwrap().pop(),
        Some(Some(StopReason::Canceled))
    );

    // timeout_s: stopped as a timeout, the attempt fails as `timeout`.
    let job = c
        .submit("sdk-inproc.wait", json!({}))
        .timeout_s(1)
        .max_attempts(1)
        .await
        .unwrap();
    assert_eq!(recv(&mut rx, "the handler to start").await, "started");
    assert_eq!(stopped(&mut rx).await, ["dropped", "saw the stop"]);
    let done = c.wait(job.id, Some(Duration::from_secs(20))).await.unwrap();
    assert_eq!(done.status, JobStatus::Failed, "{done:?}");
    assert_eq!(done.error.unwrap().error_type, "timeout");
    assert_eq!(
        reasons.lock().unwrap().pop(),
        Some(Some(StopReason::Timeout))
    );

    // Shutdown: a running handler finishes within the grace period.
    let a = c
        .submit("sdk-inproc.wait", json!({"sleep_ms": 1500}))
        .await
        .unwrap();
    assert_eq!(recv(&mut rx, "a to start").await, "started");
    assert_eq!(worker.running(), 1);
    let t0 = Instant::now();
    tokio::time::timeout(Duration::from_secs(20), worker.stop())
        .await
        .expect("stop() returns");
    assert!(
        t0.elapsed() >= Duration::from_millis(1000),
        "{:?}",
        t0.elapsed()
    );
    let a = c.get(a.id).await.unwrap();
    assert_eq!((a.status, a.attempt), (JobStatus::Succeeded, 1), "{a:?}");
    assert_eq!(a.output, Some(json!({"slept": 1500})));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_in_process_worker_refuses_bad_kinds_and_checks_outputs_against_the_schema() {
    let s = stack().await;
    let c = &s.client;
    let e = Worker::in_process(in_process(&s.env))
        .handle("echo", |_job: JobContext| async move { Ok(()) })
        .start()
        .await
        .err()
        .expect("refused");
    assert!(e.to_string().contains("built-in"), "{e}");
    let e = Worker::in_process(in_process(&s.env))
        .handle("a.b", |_job: JobContext| async move { Ok(()) })
        .kind_definition(
            "a.b",
            KindSpec {
                timeout_s: Some(0),
                ..Default::default()
            },
        )
        .start()
        .await
        .err()
        .expect("refused");
    assert!(e.to_string().contains("`timeout_s`"), "{e}");

    let worker = Worker::in_process(in_process(&s.env))
        .handle("sdk-inproc.typed", |job: JobContext| async move {
            Ok(json!({"n": job.input["n"]}))
        })
        .kind_definition(
            "sdk-inproc.typed",
            KindSpec {
                output_schema: Some(json!({
                    "type": "object", "properties": {"n": {"type": "integer"}}
                })),
                ..Default::default()
            },
        )
        .start()
        .await
        .unwrap();
    let good = c.submit("sdk-inproc.typed", json!({"n": 1})).await.unwrap();
    let bad = c
        .submit("sdk-inproc.typed", json!({"n": "x"}))
        .await
        .unwrap();
    let good = c
        .wait(good.id, Some(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(good.status, JobStatus::Succeeded, "{good:?}");
    let bad = c.wait(bad.id, Some(Duration::from_secs(30))).await.unwrap();
    assert_eq!((bad.status, bad.attempt), (JobStatus::Failed, 1), "{bad:?}");
    let e = bad.error.unwrap();
    assert_eq!(e.error_type, "invalid_output");
    assert!(e.message.contains("output.n"), "{}", e.message);
    worker.stop().await;
}
