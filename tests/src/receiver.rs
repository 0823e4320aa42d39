//! An independent Standard Webhooks receiver (`tests/webhook_receiver.py`, Python stdlib only)
//! run as a child process: it checks signatures with its own code and logs every request.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

/// Path of the receiver script.
pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/webhook_receiver.py");

/// How the receiver answers verified requests (a bad signature always gets 401).
#[derive(Debug, Clone, Default)]
pub struct ReceiverOptions {
    /// Answer 500 to the first N verified requests.
    pub fail_first: Option<u32>,
    /// After the first `fail_first` requests, answer this status.
    pub status_after: Option<u16>,
    /// Answer this status (after `fail_first`, unless `status_after` is set); default 200.
    pub always: Option<u16>,
    /// Accepted clock skew of `webhook-timestamp`, seconds (default 300).
    pub tolerance_s: Option<u64>,
    /// Listen on this port (default: any free one).
    pub port: Option<u16>,
    /// Answer 200s with `{input, attempt}` of the pushed job (a push kind's endpoint).
    pub reply_input: bool,
    /// `Retry-After` (seconds) on 429 answers.
    pub retry_after_s: Option<u64>,
}

/// A running receiver; killed and reaped on drop.
pub struct Receiver {
    /// `http://127.0.0.1:<port>` (no trailing slash; any path is accepted and logged).
    pub url: String,
    pub port: u16,
    /// The JSON-lines log it appends to.
    pub log: PathBuf,
    child: Child,
}

impl Receiver {
    /// Start the receiver accepting signatures by any of `secrets` (`whsec_…`), and wait until
    /// it listens.
    pub fn start(secrets: &[&str], opts: ReceiverOptions) -> Receiver {
        assert!(
            !secrets.is_empty(),
            "the receiver needs at least one secret"
        );
        let log = std::env::temp_dir().join(format!(
            "capibara-receiver-{}.jsonl",
            uuid::Uuid::now_v7().simple()
        ));
        let mut c = Command::new("python3");
        c.arg(SCRIPT)
            .arg("--port")
            .arg(opts.port.unwrap_or(0).to_string())
            .arg("--log")
            .arg(&log);
        for s in secrets {
            c.arg("--secret").arg(s);
        }
        if let Some(n) = opts.fail_first {
            c.arg("--fail-first").arg(n.to_string());
        }
        if let Some(s) = opts.status_after {
            c.arg("--status-after").arg(s.to_string());
        }
        if let Some(s) = opts.always {
            c.arg("--always").arg(s.to_string());
        }
        if let Some(t) = opts.tolerance_s {
            c.arg("--tolerance").arg(t.to_string());
        }
        if opts.reply_input {
            c.arg("--reply-input");
        }
        if let Some(s) = opts.retry_after_s {
            c.arg("--retry-after").arg(s.to_string());
        }
        c.stdin(Stdio::null()).stdout(Stdio::piped());
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("starting python3 {SCRIPT}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        let port = line
            .trim()
            .strip_prefix("ready ")
            .and_then(|p| p.parse::<u16>().ok());
        let Some(port) = port else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("webhook receiver did not start (read {read:?}, line {line:?})");
        };
        Receiver {
            url: format!("http://127.0.0.1:{port}"),
            port,
            log,
            child,
        }
    }

    /// Every request so far, in arrival order (one JSON object each).
    pub fn requests(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        // Only complete lines: a long line may be caught half-written.
        let complete = match text.rfind('\n') {
            Some(i) => &text[..=i],
            None => "",
        };
        complete
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad log line {l:?}: {e}")))
            .collect()
    }

    /// Wait until at least `n` requests arrived (panics after `timeout`).
    pub async fn wait_requests(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.requests();
            if r.len() >= n {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "webhook receiver got {} of {n} requests: {r:?}",
                r.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}
