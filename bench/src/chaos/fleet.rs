//! The Capibara processes of a chaos run: spawned from the binaries next to this one, killed on
//! purpose (SIGKILL), and restarted by a supervisor whenever one is gone, whether we killed it
//! or it exited on its own (which is counted and reported: a process that dies of a fault it
//! should survive is a finding).

use std::{
    fs::{File, OpenOptions},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// How to start one process.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub(crate) name: String,
    pub(crate) bin: &'static str,
    pub(crate) args: Vec<String>,
    /// Its HTTP listener (the API's port, or the health/metrics port of the others).
    pub(crate) port: u16,
    /// Settings of this process only, over the fleet's.
    pub(crate) env: Vec<(String, String)>,
}

struct Member {
    spec: Spec,
    child: Option<Child>,
    log: PathBuf,
    starts: u32,
    /// Kills we did.
    kills: u32,
    /// Exits we did not cause: `(seconds into the run, exit status)`.
    exits: Vec<(f64, String)>,
}

/// What happened to one process over the run.
pub(crate) struct Tally {
    pub(crate) name: String,
    pub(crate) starts: u32,
    pub(crate) kills: u32,
    pub(crate) exits: Vec<(f64, String)>,
    pub(crate) log: PathBuf,
}

pub(crate) struct Fleet {
    bin_dir: PathBuf,
    dir: PathBuf,
    base_env: Vec<(String, String)>,
    members: Mutex<Vec<Member>>,
    started: Instant,
}

impl Fleet {
    pub(crate) fn new(
        bin_dir: PathBuf,
        dir: PathBuf,
        base_env: Vec<(String, String)>,
        started: Instant,
    ) -> Fleet {
        Fleet {
            bin_dir,
            dir,
            base_env,
            members: Mutex::new(Vec::new()),
            started,
        }
    }

    fn members(&self) -> std::sync::MutexGuard<'_, Vec<Member>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a process and starts it.
    pub(crate) fn add(&self, spec: Spec) -> Result<()> {
        let mut m = Member {
            log: self.dir.join(format!("{}.log", spec.name)),
            spec,
            child: None,
            starts: 0,
            kills: 0,
            exits: Vec::new(),
        };
        self.spawn(&mut m)?;
        self.members().push(m);
        Ok(())
    }

    fn spawn(&self, m: &mut Member) -> Result<()> {
        let out: File = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .with_context(|| format!("opening {}", m.log.display()))?;
        let err = out.try_clone()?;
        let mut c = Command::new(self.bin_dir.join(m.spec.bin));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CAPIBARA_") {
                c.env_remove(k);
            }
        }
        c.args(&m.spec.args)
            .envs(self.base_env.iter().map(|(k, v)| (k, v)))
            .envs(m.spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        m.child = Some(
            c.spawn()
                .with_context(|| format!("starting {}", m.spec.bin))?,
        );
        m.starts += 1;
        Ok(())
    }

    /// SIGKILLs the named process (it is restarted by the next [`Fleet::supervise`]). Returns
    /// its pid, or None when it was not running.
    pub(crate) fn kill(&self, name: &str) -> Option<u32> {
        let mut members = self.members();
        let m = members.iter_mut().find(|m| m.spec.name == name)?;
        let mut child = m.child.take()?;
        let pid = child.id();
        let _ = child.kill();
        let _ = child.wait();
        m.kills += 1;
        Some(pid)
    }

    /// Restarts every process that is gone; an exit we did not cause is recorded.
    pub(crate) fn supervise(&self) {
        let at = self.started.elapsed().as_secs_f64();
        let mut members = self.members();
        for m in members.iter_mut() {
            if let Some(child) = m.child.as_mut() {
                match child.try_wait() {
                    Ok(None) => continue,
                    Ok(Some(status)) => m.exits.push((at, status.to_string())),
                    Err(e) => m.exits.push((at, format!("wait failed: {e}"))),
                }
                m.child = None;
            }
            if let Err(e) = self.spawn(m) {
                m.exits.push((at, format!("restart failed: {e:#}")));
            }
        }
    }

    pub(crate) fn pid(&self, name: &str) -> Option<u32> {
        self.members()
            .iter()
            .find(|m| m.spec.name == name)
            .and_then(|m| m.child.as_ref().map(Child::id))
    }

    /// `(name, port)` of the processes whose name starts with `prefix`.
    pub(crate) fn named(&self, prefix: &str) -> Vec<(String, u16)> {
        self.members()
            .iter()
            .filter(|m| m.spec.name.starts_with(prefix))
            .map(|m| (m.spec.name.clone(), m.spec.port))
            .collect()
    }

    /// Waits until every process answers `/healthz` (restarting the ones that exit).
    pub(crate) async fn wait_healthy(
        &self,
        http: &reqwest::Client,
        within: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + within;
        for (name, port) in self.named("") {
            let url = format!("http://127.0.0.1:{port}/healthz");
            loop {
                if let Ok(r) = http.get(&url).send().await {
                    if r.status().is_success() {
                        break;
                    }
                }
                if Instant::now() > deadline {
                    bail!("{name} did not answer {url} within {within:?}");
                }
                self.supervise();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// Kills every process (the run is over).
    pub(crate) fn stop_all(&self) {
        for m in self.members().iter_mut() {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    pub(crate) fn tallies(&self) -> Vec<Tally> {
        self.members()
            .iter()
            .map(|m| Tally {
                name: m.spec.name.clone(),
                starts: m.starts,
                kills: m.kills,
                exits: m.exits.clone(),
                log: m.log.clone(),
            })
            .collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop_all();
    }
}
