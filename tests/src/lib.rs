//! Test harness: each test gets its own database on the shared test Postgres and its own Redis key
//! prefix, and starts the real binaries (`capibara-api`, `capibara-worker`, `capibara-scheduler`)
//! as child processes it can SIGKILL or SIGTERM.
//!
//! `deploy/test.sh` starts the shared servers and exports `CAPIBARA_TEST_DATABASE_URL` and
//! `CAPIBARA_TEST_REDIS_URL`; it also builds the binaries first.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use uuid::Uuid;

pub mod receiver;

pub use capibara_dev_services::{
    find_free_port, Fault, FaultProxy, PostgresOptions, PostgresServer, RedisCluster, RedisOptions,
    RedisServer,
};

/// Admin key every test environment bootstraps with.
pub const ADMIN_KEY: &str = "test-admin-key-0123456789";

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Directory of the built binaries.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("CAPIBARA_BIN_DIR") {
        return PathBuf::from(d);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
        });
    target.join("debug")
}

/// Path of one binary; panics with the command to build it.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` (deploy/test.sh does)",
        p.display()
    );
    p
}

/// The asset directory (`CAPIBARA_ASSETS_DIR`, else the repository's `.capibara/assets`, which
/// `deploy/test.sh` fills with deploy/fetch-assets.sh), as an absolute path: the binaries run
/// with other working directories.
pub fn assets_dir() -> PathBuf {
    let dir = std::env::var_os("CAPIBARA_ASSETS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(".capibara")
                .join("assets")
        });
    std::fs::canonicalize(&dir).unwrap_or(dir)
}

/// One test's isolated environment.
pub struct TestEnv {
    pub database_url: String,
    pub redis_url: String,
    pub redis_prefix: String,
    pub api_port: u16,
    pub visibility_timeout_s: f64,
    /// This test's `CAPIBARA_SECRETS_KEY` (a fresh key per test; `extra_env` may override it, an
    /// empty value there leaves the processes without a key).
    pub secrets_key: String,
    /// Extra `CAPIBARA_*` settings for every process.
    pub extra_env: Vec<(String, String)>,
    admin_url: String,
    db_name: String,
}

impl TestEnv {
    /// A fresh database and key prefix on the shared servers.
    pub async fn new() -> TestEnv {
        let admin_url = env_or(
            "CAPIBARA_TEST_DATABASE_URL",
            "postgres://capibara@127.0.0.1:25432/postgres",
        );
        let redis_url = env_or("CAPIBARA_TEST_REDIS_URL", "redis://127.0.0.1:26379/");
        Self::on(admin_url, redis_url).await
    }

    /// A fresh database on the server at `admin_url` and a prefix on `redis_url`.
    pub async fn on(admin_url: String, redis_url: String) -> TestEnv {
        let id = Uuid::now_v7().simple().to_string();
        let db_name = format!("t_{}", &id[16..]);
        let admin = sqlx_connect(&admin_url).await;
        sqlx::query(&format!("CREATE DATABASE {db_name}"))
            .execute(&admin)
            .await
            .unwrap_or_else(|e| panic!("creating test database on {admin_url}: {e} (is deploy/test.sh running the test Postgres?)"));
        admin.close().await;
        let database_url = replace_db(&admin_url, &db_name);
        TestEnv {
            database_url,
            redis_url,
            redis_prefix: format!("t{}", &id[16..]),
            api_port: find_free_port(),
            visibility_timeout_s: 3.0,
            secrets_key: capibara_shared::crypto::generate_key(),
            extra_env: Vec::new(),
            admin_url,
            db_name,
        }
    }

    /// A pool on this test's database (for assertions on the event log).
    pub async fn pool(&self) -> sqlx::PgPool {
        sqlx_connect(&self.database_url).await
    }

    /// This test's artifact directory (`CAPIBARA_ARTIFACTS` of its processes).
    pub fn artifacts_dir(&self) -> PathBuf {
        std::env::temp_dir()
            .join("capibara-test-artifacts")
            .join(&self.db_name)
    }

    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    fn command(&self, bin_name: &str) -> Command {
        let mut c = Command::new(bin(bin_name));
        c.env("CAPIBARA_DATABASE_URL", &self.database_url)
            .env("CAPIBARA_REDIS_URL", &self.redis_url)
            .env("CAPIBARA_REDIS_PREFIX", &self.redis_prefix)
            .env("CAPIBARA_ADMIN_KEY", ADMIN_KEY)
            .env("CAPIBARA_SECRETS_KEY", &self.secrets_key)
            .env("CAPIBARA_API_ADDR", format!("127.0.0.1:{}", self.api_port))
            .env("CAPIBARA_SCHEDULER_ADDR", "127.0.0.1:0")
            .env("CAPIBARA_WORKER_ADDR", "127.0.0.1:0")
            .env(
                "CAPIBARA_VISIBILITY_TIMEOUT_S",
                self.visibility_timeout_s.to_string(),
            )
            .env("CAPIBARA_DB_MAX_CONNECTIONS", "8")
            .env("CAPIBARA_ASSETS_DIR", assets_dir())
            // Each test's artifacts in their own directory (tests may point this at S3).
            .env("CAPIBARA_ARTIFACTS", self.artifacts_dir())
            .env("CAPIBARA_LOG", env_or("CAPIBARA_TEST_LOG", "warn"))
            .env("CAPIBARA_LOG_FORMAT", "json")
            .stdin(Stdio::null());
        for (k, v) in &self.extra_env {
            c.env(k, v);
        }
        c
    }

    /// Start `bin_name` with `args`, its stdout and stderr appended to `log` (tests that read what
    /// a process logged); does not wait for it to answer.
    pub fn spawn_logged(
        &self,
        name: &'static str,
        bin_name: &str,
        args: &[&str],
        log: &std::path::Path,
    ) -> Proc {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("opening {}: {e}", log.display()));
        let mut c = self.command(bin_name);
        c.args(args)
            .stdout(file.try_clone().expect("log file"))
            .stderr(file);
        let child = c.spawn().unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc { name, child }
    }

    /// What [`Self::spawn_logged`] runs: `bin_name` with this test's settings, not started.
    pub fn command_for(&self, bin_name: &str) -> Command {
        self.command(bin_name)
    }

    /// Start `capibara-api` and wait until `/healthz` answers.
    pub async fn spawn_api(&self) -> Proc {
        let p = Proc::spawn("api", self.command("capibara-api"));
        wait_http_ok(&format!("{}/healthz", self.api_url())).await;
        p
    }

    /// Start another `capibara-api` replica on `port` (same database and Redis prefix) and wait
    /// until it answers.
    pub async fn spawn_api_on(&self, port: u16) -> Proc {
        let mut c = self.command("capibara-api");
        c.env("CAPIBARA_API_ADDR", format!("127.0.0.1:{port}"));
        let p = Proc::spawn("api", c);
        wait_http_ok(&format!("http://127.0.0.1:{port}/healthz")).await;
        p
    }

    /// Start a worker with extra arguments (`--queues`, `--concurrency`).
    pub fn spawn_worker(&self, args: &[&str]) -> Proc {
        let mut c = self.command("capibara-worker");
        c.args(args);
        Proc::spawn("worker", c)
    }

    pub fn spawn_scheduler(&self) -> Proc {
        Proc::spawn("scheduler", self.command("capibara-scheduler"))
    }

    /// API + one worker + scheduler.
    pub async fn spawn_all(&self) -> (Proc, Proc, Proc) {
        let api = self.spawn_api().await;
        (api, self.spawn_worker(&[]), self.spawn_scheduler())
    }

    /// A client with the admin key.
    /// `capibara admin rebuild-projections` on this test's database (fails the test if it
    /// does); returns what it printed.
    pub fn rebuild_projections(&self) -> String {
        let out = Command::new(bin("capibara"))
            .args(["admin", "rebuild-projections"])
            .env("CAPIBARA_DATABASE_URL", &self.database_url)
            .env("CAPIBARA_ARTIFACTS", self.artifacts_dir())
            .env("CAPIBARA_REDIS_URL", &self.redis_url)
            .output()
            .expect("capibara runs");
        assert!(
            out.status.success(),
            "rebuild-projections: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn client(&self) -> Api {
        Api::new(&self.api_url(), ADMIN_KEY)
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(
            std::env::temp_dir()
                .join("capibara-test-artifacts")
                .join(&self.db_name),
        );
        // Best effort; the whole test cluster is thrown away after the run anyway.
        let admin_url = self.admin_url.clone();
        let db = self.db_name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(Duration::from_secs(2))
                    .connect(&admin_url)
                    .await
                    .ok()?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                    .execute(&pool)
                    .await
                    .ok()
            })
        })
        .join();
    }
}

fn replace_db(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("database URL has a path");
    format!("{base}/{db}")
}

/// A pool on `url` (for assertions that must not go through a test's fault proxy).
pub async fn sqlx_connect(url: &str) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

/// Poll `url` until it answers 200 (30 s at most).
pub async fn wait_http_ok(url: &str) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(url).send().await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{url} did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The text of `{base}/metrics` (a process's Prometheus scrape); panics when it cannot be read.
pub async fn scrape(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .and_then(|r| r.error_for_status())
        .expect("GET /metrics")
        .text()
        .await
        .expect("the /metrics body")
}

/// The value of the series `series` (name and labels as `/metrics` prints them, e.g.
/// `jobs_total{kind="echo"}`) on the process at `base`; 0 when it is not printed yet.
pub async fn metric(base: &str, series: &str) -> u64 {
    let line = format!("{series} ");
    scrape(base)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(&line))
        .map(|v| v.trim().parse::<f64>().expect("a metric's value") as u64)
        .unwrap_or(0)
}

/// Poll `check` every 50 ms until it returns `Some`, or panic after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process that is killed when dropped.
pub struct Proc {
    pub name: &'static str,
    child: Child,
}

impl Proc {
    fn spawn(name: &'static str, mut c: Command) -> Proc {
        if std::env::var("CAPIBARA_TEST_LOG").is_err() {
            c.stdout(Stdio::null()).stderr(Stdio::null());
        }
        let child = c.spawn().unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc { name, child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: the process gets no chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `timeout` for the exit; returns whether it exited.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small API client.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub key: String,
    pub http: reqwest::Client,
}

/// A response: status, headers and JSON body (Null when empty).
#[derive(Debug)]
pub struct Res {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Res {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
}

impl Api {
    pub fn new(base: &str, key: &str) -> Api {
        Api {
            base: base.to_string(),
            key: key.to_string(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(90))
                .build()
                .expect("client"),
        }
    }

    pub fn with_key(&self, key: &str) -> Api {
        Api {
            key: key.to_string(),
            ..self.clone()
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A client with a new key for namespace `ns` and `roles` (this client's key must be an admin
    /// key of `default` to make keys for another namespace).
    pub async fn key_for(&self, ns: &str, roles: &[&str]) -> Api {
        let r = self
            .post(
                "/v1/api-keys",
                serde_json::json!({"name": format!("{ns}-key"), "roles": roles, "namespace": ns}),
            )
            .await;
        assert_eq!(r.status, 201, "{r:?}");
        self.with_key(r.body["key"].as_str().expect("a key"))
    }

    /// Send any request with the key; returns the parsed response.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> Res {
        let r = req.bearer_auth(&self.key).send().await.expect("request");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let bytes = r.bytes().await.expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Res {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str) -> Res {
        self.send(self.http.get(self.url(path))).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Res {
        self.send(self.http.post(self.url(path)).json(&body)).await
    }

    /// Submit a job and return the response.
    /// `POST path` with one extra header (a `traceparent`, say).
    pub async fn post_with(&self, path: &str, header: (&str, &str), body: Value) -> Res {
        self.send(
            self.http
                .post(self.url(path))
                .header(header.0, header.1)
                .json(&body),
        )
        .await
    }

    pub async fn submit(&self, body: Value) -> Res {
        self.post("/v1/jobs", body).await
    }

    /// Submit and return the job id (asserts acceptance).
    pub async fn submit_id(&self, body: Value) -> String {
        let r = self.submit(body).await;
        assert!(r.status == 202 || r.status == 200, "submit failed: {r:?}");
        r.body["id"].as_str().expect("id").to_string()
    }

    pub async fn job(&self, id: &str) -> Value {
        let r = self.get(&format!("/v1/jobs/{id}")).await;
        assert_eq!(r.status, 200, "{r:?}");
        r.body
    }

    /// Wait until the job reaches a terminal status (uses `Prefer: wait`).
    pub async fn wait_terminal(&self, id: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self
                .send(
                    self.http
                        .get(self.url(&format!("/v1/jobs/{id}")))
                        .header("Prefer", "wait=5"),
                )
                .await;
            if r.status == 200 {
                return r.body;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} did not finish: {:?}",
                r.body
            );
        }
    }

    /// Wait until the job's status is `status` (polling every 5 ms): for example an attempt a
    /// protocol worker leased, claimed 25 ms after its lease call unless its report came first.
    pub async fn wait_status(&self, id: &str, status: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let job = self.job(id).await;
            if job["status"] == status {
                return job;
            }
            assert!(Instant::now() < deadline, "job {id} is not {status}: {job}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The job's events (JSON list).
    pub async fn events(&self, id: &str) -> Vec<Value> {
        let r = self.get(&format!("/v1/jobs/{id}/events?limit=500")).await;
        assert_eq!(r.status, 200, "{r:?}");
        r.body["items"].as_array().cloned().unwrap_or_default()
    }
}

/// Types of a list of event envelopes.
pub fn types(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["type"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Parse an SSE body into (id, event, data) frames.
pub fn parse_sse(text: &str) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for frame in text.split("\n\n") {
        let (mut id, mut event, mut data) = (String::new(), String::new(), String::new());
        for line in frame.lines() {
            if let Some(v) = line.strip_prefix("id:") {
                id = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            }
        }
        if !event.is_empty() {
            out.push((
                id,
                event,
                serde_json::from_str(&data).unwrap_or(Value::Null),
            ));
        }
    }
    out
}

/// Workflow helpers shared by the tests that run workflows.
pub mod runs {
    use std::time::Duration;

    use serde_json::{json, Value};

    use super::{eventually, Api};

    /// Create a workflow; returns its id.
    pub async fn create(api: &Api, def: Value) -> String {
        let r = api.post("/v1/workflows", def).await;
        assert_eq!(r.status, 201, "{r:?}");
        r.body["id"].as_str().unwrap().to_string()
    }

    /// Start a run of `workflow` with `input`; returns the run's id.
    pub async fn start(api: &Api, workflow: &str, input: Value) -> String {
        let r = api
            .post(
                &format!("/v1/workflows/{workflow}/runs"),
                json!({"input": input}),
            )
            .await;
        assert_eq!(r.status, 202, "{r:?}");
        r.body["id"].as_str().unwrap().to_string()
    }

    /// The run once it ended (fails the test after `timeout`).
    pub async fn ended(api: &Api, run: &str, timeout: Duration) -> Value {
        eventually("the run to end", timeout, || async {
            let r = api.get(&format!("/v1/runs/{run}")).await;
            let s = r.body["status"].as_str().unwrap_or_default().to_string();
            ["succeeded", "failed", "canceled"]
                .contains(&s.as_str())
                .then_some(r.body)
        })
        .await
    }

    /// Step `id` of a run.
    pub fn step<'a>(run: &'a Value, id: &str) -> &'a Value {
        run["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .unwrap_or_else(|| panic!("no step {id} in {run}"))
    }
}

/// The dispatch entry of a `kind` job `id` of namespace `default`, with no limits, on `queue`.
pub fn dispatch_entry(
    queue_name: &str,
    kind: &str,
    id: uuid::Uuid,
) -> capibara_shared::store::dispatch::DispatchEntry {
    let mut entry = capibara_shared::store::dispatch::DispatchEntry::new(
        id,
        "default",
        queue_name,
        capibara_shared::domain::job::Priority::Normal,
        chrono::Utc::now(),
    );
    entry.group = capibara_shared::domain::limit::Group {
        ns: "default".into(),
        kind: kind.into(),
        queue: queue_name.into(),
        ord: None,
        lim: Vec::new(),
    }
    .id();
    entry
}

/// The Redis keys holding `kind` jobs of namespace `default` on `queue` (no limits): the
/// group's sorted set, and the lane's ring of groups.
pub fn redis_group_keys(prefix: &str, queue_name: &str, kind: &str) -> (String, String, String) {
    let group = dispatch_entry(queue_name, kind, uuid::Uuid::nil()).group;
    (
        format!("{{{prefix}}}:g:{queue_name}:{group}"),
        format!("{{{prefix}}}:ring:{queue_name}"),
        group,
    )
}

/// Whether Redis holds the dispatch entry of `kind` job `id` on `queue` (a worker that popped
/// it took it off).
pub async fn on_redis(
    queue: &capibara_shared::queue::Queue,
    queue_name: &str,
    kind: &str,
    id: uuid::Uuid,
) -> bool {
    let entry = dispatch_entry(queue_name, kind, id);
    queue
        .missing(std::slice::from_ref(&entry))
        .await
        .expect("Redis answers")
        .is_empty()
}

/// Run `c` to its exit (at most 60 s), as an operator would (no backtraces asked for); returns
/// its status and stderr.
pub fn run_to_exit(mut c: Command) -> (std::process::ExitStatus, String) {
    let mut child = c
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            return (status, err);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("it kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
