//! Real local PostgreSQL and Redis server processes, for `capibara dev` and for tests.
//!
//! Nothing here is mocked: [`PostgresServer`] runs `initdb`/`pg_ctl` from the installed
//! PostgreSQL and [`RedisServer`] spawns `redis-server`. Both can be killed with SIGKILL and
//! brought back, which is what the failure tests (DESIGN.md §9) need.
//!
//! The API is synchronous (it only runs short-lived commands and polls sockets); call it at
//! startup, from a test, or through `tokio::task::spawn_blocking`.
//!
//! # Root
//! PostgreSQL refuses to run as root. When this process is root, every server-side tool
//! (`initdb`, `pg_ctl`) runs as the `postgres` OS user through `runuser`, and the data
//! directory, log file and socket directory are handed to that user. Client tools (`psql`,
//! `createdb`, `pg_isready`) run as the current user over TCP.
//!
//! # Zombies
//! Some containers run a PID 1 that never reaps orphans, so a killed server can stay a zombie
//! whose pid still "exists". Liveness checks here read `/proc/<pid>/stat` and treat zombies as
//! dead, and a `postmaster.pid` naming a zombie is removed before starting again (PostgreSQL
//! itself would refuse to start, seeing the pid as alive).

pub mod cluster;
pub mod proxy;
pub use cluster::RedisCluster;
pub use proxy::{Fault, FaultProxy};

use anyhow::{anyhow, bail, Context, Result};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a server may take to accept connections after being launched.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a graceful shutdown may take before the process is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long killed processes may take to disappear.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Delay between readiness polls.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Attempts with a fresh port when the port was picked by us and turned out to be taken.
const AUTO_PORT_ATTEMPTS: usize = 4;
/// Lines of a server log quoted in start errors.
const LOG_TAIL_LINES: usize = 40;
/// PostgreSQL superuser created by `initdb`.
const PG_SUPERUSER: &str = "capibara";
/// OS user that runs PostgreSQL when this process is root.
const PG_OS_USER: &str = "postgres";

// ---------------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------------

/// How to run a local PostgreSQL server.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Cluster directory; created with `initdb` when it has no `PG_VERSION`. The log goes to
    /// `<data_dir>/../postgres.log`. One running server per data directory.
    pub data_dir: PathBuf,
    /// TCP port on 127.0.0.1; 0 picks a free port.
    pub port: u16,
    /// `fsync=off`, `synchronous_commit=off`, `full_page_writes=off`, for tests. Not crash-safe:
    /// commits of the last few hundred milliseconds can be lost when the server is killed.
    pub fast_unsafe: bool,
}

/// A local PostgreSQL server (see [`PostgresServer::start`]). Stopped on drop unless it was
/// adopted (already running when `start` was called).
#[derive(Debug)]
pub struct PostgresServer {
    /// Directory of `initdb`, `pg_ctl`, `psql`, ... of the version matching the cluster.
    bin_dir: PathBuf,
    /// Absolute cluster directory.
    data_dir: PathBuf,
    /// TCP port the server listens on (127.0.0.1); fixed across kill/restart.
    port: u16,
    /// Directory of the unix socket; kept short because socket paths are limited to ~100 bytes.
    socket_dir: PathBuf,
    /// Server log, `<data_dir>/../postgres.log`, appended to across restarts.
    log_path: PathBuf,
    /// Whether the durability settings are relaxed (see [`PostgresOptions::fast_unsafe`]).
    fast_unsafe: bool,
    /// Set when this process is root: server-side tools then run as this OS user.
    run_as: Option<OsUser>,
    /// Found already running by `start`: someone else's, so drop leaves it running.
    adopted: bool,
    /// Whether we believe a postmaster is up (false after `kill`/`stop`); drop stops it if so.
    running: bool,
}

/// The OS user PostgreSQL runs as when we are root.
#[derive(Debug, Clone)]
struct OsUser {
    /// Login name, for `runuser -u` and `chown`.
    name: String,
    /// Numeric uid, to tell whether a path already belongs to the user.
    uid: u32,
    /// Path of `runuser`.
    runuser: PathBuf,
}

/// The fields of `postmaster.pid` we use.
#[derive(Debug)]
struct PostmasterPid {
    pid: u32,
    port: Option<u16>,
    socket_dir: Option<PathBuf>,
}

impl PostgresServer {
    /// Runs `initdb` when `data_dir` has no `PG_VERSION` (superuser `capibara`, trust auth,
    /// UTF8), then starts the server on 127.0.0.1:`port` and waits until it accepts
    /// connections. A server already running on `data_dir` is adopted (and left running on
    /// drop) when it listens on `port` (or `port` is 0).
    pub fn start(opts: PostgresOptions) -> Result<PostgresServer> {
        let data_dir = std::path::absolute(&opts.data_dir)
            .with_context(|| format!("invalid data dir {}", opts.data_dir.display()))?;
        check_shell_safe(&data_dir)?;
        let parent = data_dir
            .parent()
            .ok_or_else(|| anyhow!("data dir {} has no parent directory", data_dir.display()))?
            .to_path_buf();
        fs::create_dir_all(&parent)
            .with_context(|| format!("cannot create directory {}", parent.display()))?;
        let bin_dir = bin_dir_for_cluster(&data_dir)?;
        let run_as = if is_root() {
            Some(postgres_os_user()?)
        } else {
            None
        };
        let mut server = PostgresServer {
            bin_dir,
            log_path: parent.join("postgres.log"),
            socket_dir: choose_socket_dir(&parent),
            data_dir,
            port: opts.port,
            fast_unsafe: opts.fast_unsafe,
            run_as,
            adopted: false,
            running: false,
        };

        if let Some(pm) = read_postmaster_pid(&server.data_dir) {
            if is_live_postgres(pm.pid) {
                return server.adopt(pm, opts.port);
            }
        }

        server.prepare_dirs()?;
        server.init_if_needed()?;
        if opts.port != 0 {
            server.launch()?;
            return Ok(server);
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            server.port = find_free_port();
            match server.launch() {
                Ok(()) => return Ok(server),
                Err(e) if attempt < AUTO_PORT_ATTEMPTS && is_port_conflict(&e) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://capibara@127.0.0.1:{port}/{db}`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{PG_SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    /// The cluster directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log (`<data_dir>/../postgres.log`).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Whether `start` found the server already running (drop then leaves it running).
    pub fn is_adopted(&self) -> bool {
        self.adopted
    }

    /// Creates database `db` unless it exists (safe when several callers race).
    pub fn ensure_database(&self, db: &str) -> Result<()> {
        let exists_sql = format!(
            "SELECT 1 FROM pg_database WHERE datname = '{}'",
            db.replace('\'', "''")
        );
        if self.psql("postgres", &exists_sql)? == "1" {
            return Ok(());
        }
        let createdb = pg_tool(&self.bin_dir, "createdb")?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let out = client_command(&createdb)
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", PG_SUPERUSER, "--maintenance-db=postgres", "--", db])
                .output()
                .with_context(|| format!("cannot run {}", createdb.display()))?;
            if out.status.success() {
                return Ok(());
            }
            let stderr = String::from_utf8_lossy(&out.stderr);
            if stderr.contains("already exists") {
                return Ok(());
            }
            // Concurrent CREATE DATABASE calls collide on the template database.
            if stderr.contains("being accessed by other users") && attempt < 10 {
                sleep(Duration::from_millis(100 * attempt));
                continue;
            }
            bail!(
                "createdb {db} on port {} failed ({}): {}",
                self.port,
                out.status,
                stderr.trim()
            );
        }
    }

    /// Runs `sql` in database `db` with `psql` and returns its unaligned, tuples-only output,
    /// trimmed (e.g. `"1"` for `SELECT 1`).
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        let psql = pg_tool(&self.bin_dir, "psql")?;
        let out = client_command(&psql)
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", PG_SUPERUSER, "-d", db, "-c", sql])
            .output()
            .with_context(|| format!("cannot run {}", psql.display()))?;
        if !out.status.success() {
            bail!(
                "psql on 127.0.0.1:{} db {db} failed ({}): {}",
                self.port,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// SIGKILLs the postmaster and all its children at once, like a crash, and waits until
    /// they are gone. Does nothing when no server is running.
    pub fn kill(&mut self) -> Result<()> {
        self.running = false;
        let Some(pm) = read_postmaster_pid(&self.data_dir) else {
            return Ok(());
        };
        if !is_live_postgres(pm.pid) {
            return Ok(());
        }
        // Freeze the postmaster so it forks no new child between listing and killing; its
        // children must be listed now, as they are reparented once it dies.
        signal("STOP", &[pm.pid])?;
        let mut pids = vec![pm.pid];
        pids.extend(child_pids(pm.pid));
        signal("KILL", &pids)?;
        if !wait_gone(&pids, KILL_TIMEOUT) {
            bail!(
                "PostgreSQL processes {pids:?} (data dir {}) still alive {KILL_TIMEOUT:?} after SIGKILL",
                self.data_dir.display()
            );
        }
        Ok(())
    }

    /// Starts the server again on the same port and data dir and waits until it is ready
    /// (after `kill` or `stop`; a running server is stopped first). The server is then ours:
    /// drop stops it even if it had been adopted.
    pub fn restart(&mut self) -> Result<()> {
        if self.is_live() {
            self.stop()?;
        }
        self.prepare_dirs()?;
        self.launch()?;
        self.adopted = false;
        Ok(())
    }

    /// Fast shutdown (`pg_ctl stop -m fast`): disconnects clients, checkpoints, exits.
    /// Kills the server if that does not finish in time.
    pub fn stop(&mut self) -> Result<()> {
        self.pg_ctl_stop("fast")
    }

    /// Immediate shutdown (`pg_ctl stop -m immediate`): every process quits at once without a
    /// checkpoint, so the next start runs crash recovery. Kills the server if that fails.
    pub fn stop_immediate(&mut self) -> Result<()> {
        self.pg_ctl_stop("immediate")
    }

    /// `pg_ctl stop -m <mode>`; kills the server when that fails and it still runs.
    fn pg_ctl_stop(&mut self, mode: &str) -> Result<()> {
        if !self.is_live() {
            self.running = false;
            return Ok(());
        }
        let out = self
            .server_command("pg_ctl")?
            .args(["stop", "-m", mode, "-w", "-s"])
            .args(["-t", &STOP_TIMEOUT.as_secs().to_string()])
            .arg("-D")
            .arg(&self.data_dir)
            .output()
            .context("cannot run pg_ctl stop")?;
        if !out.status.success() && self.is_live() {
            let kill_result = self.kill();
            bail!(
                "pg_ctl stop -m {mode} on {} failed ({}): {}; killed it instead ({})",
                self.data_dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                match kill_result {
                    Ok(()) => "ok".to_string(),
                    Err(e) => format!("{e:#}"),
                }
            );
        }
        self.running = false;
        Ok(())
    }

    /// Adopts the live server found on the data dir.
    fn adopt(mut self, pm: PostmasterPid, requested_port: u16) -> Result<PostgresServer> {
        let Some(port) = pm.port else {
            bail!(
                "a PostgreSQL server (pid {}) is running on {} but its postmaster.pid names no port",
                pm.pid,
                self.data_dir.display()
            );
        };
        if requested_port != 0 && requested_port != port {
            bail!(
                "a PostgreSQL server (pid {}) is already running on data dir {} with port {port}, \
                 not {requested_port}; stop it (`pg_ctl stop -D {}`) or use port {port}",
                pm.pid,
                self.data_dir.display(),
                self.data_dir.display()
            );
        }
        self.port = port;
        self.adopted = true;
        self.running = true;
        self.wait_ready(Instant::now() + READY_TIMEOUT, file_len(&self.log_path))
            .context("adopting the PostgreSQL server already running on this data dir")?;
        Ok(self)
    }

    /// Whether a postmaster is alive on our data dir.
    fn is_live(&self) -> bool {
        read_postmaster_pid(&self.data_dir).is_some_and(|pm| is_live_postgres(pm.pid))
    }

    /// Creates the data dir (0700), log file and socket dir, owned by the server's OS user.
    fn prepare_dirs(&self) -> Result<()> {
        if !self.data_dir.exists() {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&self.data_dir)
                .with_context(|| format!("cannot create {}", self.data_dir.display()))?;
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("cannot create log file {}", self.log_path.display()))?;
        fs::create_dir_all(&self.socket_dir)
            .with_context(|| format!("cannot create {}", self.socket_dir.display()))?;
        let Some(user) = &self.run_as else {
            return Ok(());
        };
        give_to(user, &self.data_dir, true)?;
        give_to(user, &self.log_path, false)?;
        if self.socket_dir != Path::new("/tmp") {
            give_to(user, &self.socket_dir, false)?;
        }
        // Every ancestor must be searchable by the OS user, which root can easily miss.
        let out = Command::new(&user.runuser)
            .args(["-u", &user.name, "--", "test", "-w"])
            .arg(&self.data_dir)
            .args(["-a", "-w"])
            .arg(&self.log_path)
            .args(["-a", "-w"])
            .arg(&self.socket_dir)
            .current_dir("/")
            .output()
            .context("cannot run runuser")?;
        if !out.status.success() {
            bail!(
                "running as root, so PostgreSQL runs as the `{}` OS user, which cannot write {} \
                 (or {} / {}); every parent directory must be searchable by it (chmod o+x), \
                 e.g. use a directory under /tmp",
                user.name,
                self.data_dir.display(),
                self.log_path.display(),
                self.socket_dir.display()
            );
        }
        Ok(())
    }

    /// Runs `initdb` unless the data dir already holds a cluster.
    fn init_if_needed(&self) -> Result<()> {
        if self.data_dir.join("PG_VERSION").exists() {
            return Ok(());
        }
        let mut cmd = self.server_command("initdb")?;
        cmd.arg("-D").arg(&self.data_dir).args([
            "-U",
            PG_SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
        ]);
        if self.fast_unsafe {
            cmd.arg("--no-sync");
        }
        let out = cmd.output().context("cannot run initdb")?;
        if !out.status.success() {
            bail!(
                "initdb -D {} failed ({}):\n{}{}",
                self.data_dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Starts the postmaster with `pg_ctl start` and waits until it accepts connections.
    fn launch(&mut self) -> Result<()> {
        self.clear_stale_locks();
        let log_offset = file_len(&self.log_path);
        let mut server_opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{}' \
             -c max_connections=400",
            self.port,
            self.socket_dir.display()
        );
        if self.fast_unsafe {
            server_opts.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        let out = self
            .server_command("pg_ctl")?
            .args(["start", "-w", "-s"])
            .args(["-t", &READY_TIMEOUT.as_secs().to_string()])
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_path)
            .arg("-o")
            .arg(&server_opts)
            .output()
            .context("cannot run pg_ctl start")?;
        if !out.status.success() {
            // On a timeout pg_ctl leaves the server starting: do not leak it.
            let _ = self.kill();
            bail!(
                "starting PostgreSQL on 127.0.0.1:{} (data dir {}) failed: {}\n--- tail of {} ---\n{}",
                self.port,
                self.data_dir.display(),
                String::from_utf8_lossy(&out.stderr).trim(),
                self.log_path.display(),
                log_tail(&self.log_path, log_offset)
            );
        }
        self.running = true;
        if let Err(e) = self.wait_ready(Instant::now() + READY_TIMEOUT, log_offset) {
            let _ = self.kill();
            return Err(e);
        }
        Ok(())
    }

    /// Polls `pg_isready` until the server accepts connections or `deadline` passes.
    fn wait_ready(&self, deadline: Instant, log_offset: u64) -> Result<()> {
        let pg_isready = pg_tool(&self.bin_dir, "pg_isready")?;
        loop {
            if tcp_connects(self.port) {
                let status = client_command(&pg_isready)
                    .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                    .args(["-U", PG_SUPERUSER, "-d", "postgres", "-t", "2"])
                    .status()
                    .with_context(|| format!("cannot run {}", pg_isready.display()))?;
                if status.success() {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "PostgreSQL on 127.0.0.1:{} (data dir {}) did not accept connections within \
                     {READY_TIMEOUT:?}\n--- tail of {} ---\n{}",
                    self.port,
                    self.data_dir.display(),
                    self.log_path.display(),
                    log_tail(&self.log_path, log_offset)
                );
            }
            sleep(POLL_INTERVAL);
        }
    }

    /// Removes `postmaster.pid` (and its socket lock) when it names a process that is not a
    /// live postgres — a zombie or a recycled pid — which PostgreSQL would take for a running
    /// server. A vanished pid is left to PostgreSQL, which handles it and also checks that no
    /// old backend still uses the shared memory.
    fn clear_stale_locks(&self) {
        let Some(pm) = read_postmaster_pid(&self.data_dir) else {
            return;
        };
        if is_live_postgres(pm.pid) || proc_stat(pm.pid).is_none() {
            return;
        }
        let _ = fs::remove_file(self.data_dir.join("postmaster.pid"));
        if let (Some(dir), Some(port)) = (pm.socket_dir, pm.port) {
            let lock = dir.join(format!(".s.PGSQL.{port}.lock"));
            let owner = fs::read_to_string(&lock)
                .ok()
                .and_then(|s| first_line_u32(&s));
            if owner == Some(pm.pid) {
                let _ = fs::remove_file(lock);
            }
        }
    }

    /// A command running a server-side tool, as the `postgres` OS user when we are root.
    fn server_command(&self, tool: &str) -> Result<Command> {
        let path = pg_tool(&self.bin_dir, tool)?;
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut cmd = Command::new(&user.runuser);
                cmd.args(["-u", &user.name, "--"]).arg(path);
                cmd
            }
            None => Command::new(path),
        };
        // The OS user may not be able to read our working directory.
        cmd.current_dir("/")
            .env("LC_ALL", "C")
            .env_remove("PGDATA")
            .stdin(Stdio::null());
        Ok(cmd)
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if self.running && !self.adopted {
            if let Err(e) = self.stop() {
                eprintln!("capibara dev-services: stopping PostgreSQL: {e:#}");
            }
        }
    }
}

/// The PostgreSQL server binaries: the highest `/usr/lib/postgresql/*/bin` holding `postgres`,
/// else the directory of `postgres` on PATH (symlinks resolved).
pub fn postgres_bin_dir() -> Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    if let Some(postgres) = which("postgres") {
        let real = fs::canonicalize(&postgres).unwrap_or(postgres);
        if let Some(dir) = real.parent() {
            return Ok(dir.to_path_buf());
        }
    }
    bail!(
        "PostgreSQL server binaries not found (no /usr/lib/postgresql/*/bin/postgres and no \
         `postgres` on PATH); install them with `apt-get install postgresql` \
         (or run deploy/install-deps.sh)"
    )
}

/// The bin dir matching an existing cluster's `PG_VERSION` when installed, else the newest.
fn bin_dir_for_cluster(data_dir: &Path) -> Result<PathBuf> {
    if let Ok(version) = fs::read_to_string(data_dir.join("PG_VERSION")) {
        let bin = Path::new("/usr/lib/postgresql")
            .join(version.trim())
            .join("bin");
        if bin.join("postgres").is_file() {
            return Ok(bin);
        }
    }
    postgres_bin_dir()
}

/// `bin_dir/name`, else `name` on PATH, else an error naming the package.
fn pg_tool(bin_dir: &Path, name: &str) -> Result<PathBuf> {
    let path = bin_dir.join(name);
    if path.is_file() {
        return Ok(path);
    }
    which(name).ok_or_else(|| {
        let package = match name {
            "psql" | "createdb" | "pg_isready" => "postgresql-client",
            _ => "postgresql",
        };
        anyhow!(
            "`{name}` not found in {} nor on PATH; install it with `apt-get install {package}`",
            bin_dir.display()
        )
    })
}

/// A command running a PostgreSQL client tool as the current user.
fn client_command(path: &Path) -> Command {
    let mut cmd = Command::new(path);
    cmd.env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGSERVICE")
        .env_remove("PGOPTIONS")
        .env_remove("PGSSLMODE")
        .stdin(Stdio::null());
    cmd
}

/// The `postgres` OS user, required when we are root.
fn postgres_os_user() -> Result<OsUser> {
    let runuser = ["/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| which("runuser"))
        .ok_or_else(|| {
            anyhow!(
                "running as root: PostgreSQL must run as the `{PG_OS_USER}` OS user, but \
                 `runuser` was not found; install it with `apt-get install util-linux`"
            )
        })?;
    let out = Command::new("id")
        .args(["-u", PG_OS_USER])
        .output()
        .context("cannot run `id`")?;
    let uid = String::from_utf8_lossy(&out.stdout).trim().parse::<u32>();
    match (out.status.success(), uid) {
        (true, Ok(uid)) => Ok(OsUser {
            name: PG_OS_USER.to_string(),
            uid,
            runuser,
        }),
        _ => bail!(
            "running as root: PostgreSQL refuses to run as root and there is no `{PG_OS_USER}` \
             OS user to run it as; `apt-get install postgresql` creates it (or run as a non-root user)"
        ),
    }
}

/// Hands `path` (recursively when asked) to `user` unless it already belongs to them.
fn give_to(user: &OsUser, path: &Path, recursive: bool) -> Result<()> {
    let meta = fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    if meta.uid() == user.uid {
        return Ok(());
    }
    let owner = format!("{0}:{0}", user.name);
    let mut cmd = Command::new("chown");
    if recursive {
        cmd.arg("-R");
    }
    let out = cmd
        .arg(&owner)
        .arg(path)
        .output()
        .context("cannot run chown")?;
    if !out.status.success() {
        bail!(
            "chown {owner} {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `<parent>/pgsock` when that keeps the socket path well under the ~107-byte limit, else /tmp.
fn choose_socket_dir(parent: &Path) -> PathBuf {
    let dir = parent.join("pgsock");
    // "/.s.PGSQL.65535.lock" is 20 bytes.
    if dir.as_os_str().len() + 20 < 100 {
        dir
    } else {
        PathBuf::from("/tmp")
    }
}

/// pg_ctl pastes the data dir and options into a shell command line.
fn check_shell_safe(path: &Path) -> Result<()> {
    let s = path
        .to_str()
        .ok_or_else(|| anyhow!("data dir {} is not valid UTF-8", path.display()))?;
    if let Some(c) = s.chars().find(|c| "'\"$`\\\n".contains(*c)) {
        bail!("data dir {s} contains {c:?}, which pg_ctl cannot quote; choose another path");
    }
    Ok(())
}

fn read_postmaster_pid(data_dir: &Path) -> Option<PostmasterPid> {
    let text = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    let pid = lines.first()?.trim().parse().ok()?;
    let port = lines.get(3).and_then(|l| l.trim().parse().ok());
    let socket_dir = lines
        .get(4)
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .map(PathBuf::from);
    Some(PostmasterPid {
        pid,
        port,
        socket_dir,
    })
}

fn is_live_postgres(pid: u32) -> bool {
    proc_stat(pid)
        .is_some_and(|s| s.is_running() && (s.comm == "postgres" || s.comm == "postmaster"))
}

fn is_port_conflict(e: &anyhow::Error) -> bool {
    format!("{e:#}").contains("Address already in use")
}

// ---------------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------------

/// How to run a local Redis server.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Working directory (`--dir`): data files and `redis.log`.
    pub dir: PathBuf,
    /// TCP port on 127.0.0.1; 0 picks a free port.
    pub port: u16,
    /// `appendonly yes` plus the default RDB snapshots when true; no persistence when false.
    pub persist: bool,
}

/// A local `redis-server` (see [`RedisServer::start`]). Stopped on drop unless adopted.
#[derive(Debug)]
pub struct RedisServer {
    /// Path of `redis-server`.
    binary: PathBuf,
    /// Absolute `--dir`.
    dir: PathBuf,
    /// TCP port on 127.0.0.1; fixed across kill/restart.
    port: u16,
    /// Whether AOF + RDB persistence is on.
    persist: bool,
    /// `<dir>/redis.log`, appended to across restarts.
    log_path: PathBuf,
    /// The server when we spawned it; kept to signal and reap it.
    child: Option<Child>,
    /// Pid of an adopted server (from `INFO server`), which is not our child.
    adopted_pid: Option<u32>,
    /// Found already answering by `start`: someone else's, so drop leaves it running.
    adopted: bool,
    /// More `redis-server` arguments (a cluster node's).
    extra_args: Vec<String>,
}

impl RedisServer {
    /// Spawns `redis-server` on 127.0.0.1:`port` with `--dir dir` and waits until it answers
    /// PING. A server already answering PING on `port` is adopted (left running on drop).
    pub fn start(opts: RedisOptions) -> Result<RedisServer> {
        Self::start_with(opts, Vec::new())
    }

    /// [`RedisServer::start`] with more `redis-server` arguments.
    pub(crate) fn start_with(opts: RedisOptions, extra_args: Vec<String>) -> Result<RedisServer> {
        let binary = redis_binary("redis-server")?;
        let dir = std::path::absolute(&opts.dir)
            .with_context(|| format!("invalid redis dir {}", opts.dir.display()))?;
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut server = RedisServer {
            binary,
            log_path: dir.join("redis.log"),
            dir,
            port: opts.port,
            persist: opts.persist,
            child: None,
            adopted_pid: None,
            adopted: false,
            extra_args,
        };
        if opts.port != 0 {
            if redis_ping(opts.port) {
                server.adopted = true;
                server.adopted_pid = redis_pid(opts.port);
                return Ok(server);
            }
            server.launch()?;
            return Ok(server);
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            server.port = find_free_port();
            match server.launch() {
                Ok(()) => return Ok(server),
                Err(e) if attempt < AUTO_PORT_ATTEMPTS && is_port_conflict(&e) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:{port}/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The `--dir` of the server.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether `start` found the server already running (drop then leaves it running).
    pub fn is_adopted(&self) -> bool {
        self.adopted
    }

    /// SIGKILLs the server and waits until it is gone.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // Fails only when it already exited; wait() reaps it either way.
            let _ = child.kill();
            child.wait().context("waiting for killed redis-server")?;
        }
        if let Some(pid) = self.adopted_pid.take() {
            signal("KILL", &[pid])?;
            if !wait_gone(&[pid], KILL_TIMEOUT) {
                bail!("redis-server pid {pid} still alive {KILL_TIMEOUT:?} after SIGKILL");
            }
        }
        Ok(())
    }

    /// Kills the server, deletes its data files (`dump.rdb`, `appendonly*`) and starts it again,
    /// empty, on the same port. The server is then ours: drop stops it.
    pub fn restart_empty(&mut self) -> Result<()> {
        self.kill()?;
        for entry in fs::read_dir(&self.dir)
            .with_context(|| format!("cannot list {}", self.dir.display()))?
        {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let is_data = name == "dump.rdb"
                || name.starts_with("appendonly")
                || (name.starts_with("temp-") && name.ends_with(".rdb"));
            if !is_data {
                continue;
            }
            let path = entry.path();
            let removed = if entry.file_type()?.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            removed.with_context(|| format!("cannot delete {}", path.display()))?;
        }
        self.adopted = false;
        self.launch()
    }

    /// Graceful shutdown (SIGTERM: saves first when persistence is on); kills the server if
    /// that takes longer than 30 s.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(child) = &mut self.child {
            if child.try_wait()?.is_none() {
                signal("TERM", &[child.id()])?;
                let deadline = Instant::now() + STOP_TIMEOUT;
                while child.try_wait()?.is_none() {
                    if Instant::now() >= deadline {
                        self.kill()?;
                        bail!("redis-server did not stop within {STOP_TIMEOUT:?}; killed it");
                    }
                    sleep(POLL_INTERVAL);
                }
            }
            self.child = None;
        }
        if let Some(pid) = self.adopted_pid {
            signal("TERM", &[pid])?;
            if !wait_gone(&[pid], STOP_TIMEOUT) {
                self.kill()?;
                bail!("redis-server pid {pid} did not stop within {STOP_TIMEOUT:?}; killed it");
            }
            self.adopted_pid = None;
        }
        Ok(())
    }

    /// Spawns redis-server on `self.port` and waits until it answers PING.
    fn launch(&mut self) -> Result<()> {
        let log_offset = file_len(&self.log_path);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("cannot open {}", self.log_path.display()))?;
        let log_err = log.try_clone()?;
        let mut cmd = Command::new(&self.binary);
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--daemonize", "no", "--logfile", ""]);
        if self.persist {
            cmd.args(["--appendonly", "yes"]);
        } else {
            cmd.args(["--save", "", "--appendonly", "no"]);
        }
        cmd.args(&self.extra_args);
        let child = cmd
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("cannot run {}", self.binary.display()))?;
        self.child = Some(child);

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if redis_ping(self.port) {
                return Ok(());
            }
            let exited = match &mut self.child {
                Some(child) => child.try_wait()?,
                None => None,
            };
            if let Some(status) = exited {
                self.child = None;
                bail!(
                    "redis-server on 127.0.0.1:{} exited ({status})\n--- tail of {} ---\n{}",
                    self.port,
                    self.log_path.display(),
                    log_tail(&self.log_path, log_offset)
                );
            }
            if Instant::now() >= deadline {
                let _ = self.kill();
                bail!(
                    "redis-server on 127.0.0.1:{} did not answer PING within {READY_TIMEOUT:?}\n\
                     --- tail of {} ---\n{}",
                    self.port,
                    self.log_path.display(),
                    log_tail(&self.log_path, log_offset)
                );
            }
            sleep(POLL_INTERVAL);
        }
    }
}

/// Path of a Redis tool (`redis-server`, `redis-cli`).
fn redis_binary(name: &str) -> Result<PathBuf> {
    which(name)
        .or_else(|| {
            ["/usr/bin", "/usr/local/bin"]
                .iter()
                .map(|d| Path::new(d).join(name))
                .find(|p| p.is_file())
        })
        .ok_or_else(|| {
            anyhow!(
                "`{name}` not found on PATH; install it with `apt-get install redis-server` \
                 (or run deploy/install-deps.sh)"
            )
        })
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if !self.adopted {
            if let Err(e) = self.stop() {
                eprintln!("capibara dev-services: stopping redis-server: {e:#}");
            }
        }
    }
}

/// A reply of the minimal RESP client below.
#[derive(Debug, PartialEq)]
enum Resp {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Resp>>),
}

/// Sends one command to the Redis on 127.0.0.1:`port` and reads its reply.
fn redis_command(port: u16, args: &[&str]) -> io::Result<Resp> {
    let mut stream = TcpStream::connect_timeout(&loopback(port), Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut request = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        request.extend_from_slice(arg.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    stream.write_all(&request)?;
    read_resp(&mut BufReader::new(stream))
}

fn read_resp(reader: &mut impl BufRead) -> io::Result<Resp> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("RESP: {what}"));
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(bad("connection closed"));
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line.split_at_checked(1).ok_or_else(|| bad("empty line"))?;
    let number = || rest.parse::<i64>().map_err(|_| bad("bad length"));
    Ok(match kind {
        "+" => Resp::Simple(rest.to_string()),
        "-" => Resp::Error(rest.to_string()),
        ":" => Resp::Integer(number()?),
        "$" => match usize::try_from(number()?) {
            Err(_) => Resp::Bulk(None),
            Ok(len) => {
                let mut data = vec![0; len + 2];
                reader.read_exact(&mut data)?;
                data.truncate(len);
                Resp::Bulk(Some(data))
            }
        },
        "*" => match usize::try_from(number()?) {
            Err(_) => Resp::Array(None),
            Ok(len) => Resp::Array(Some(
                (0..len)
                    .map(|_| read_resp(reader))
                    .collect::<io::Result<_>>()?,
            )),
        },
        _ => return Err(bad("unknown reply type")),
    })
}

/// Whether a Redis on 127.0.0.1:`port` answers PING with PONG (raw inline command).
fn redis_ping(port: u16) -> bool {
    let attempt = || -> io::Result<bool> {
        let mut stream = TcpStream::connect_timeout(&loopback(port), Duration::from_millis(300))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"PING\r\n")?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        Ok(line.starts_with("+PONG"))
    };
    attempt().unwrap_or(false)
}

/// The `process_id` reported by `INFO server`.
fn redis_pid(port: u16) -> Option<u32> {
    match redis_command(port, &["INFO", "server"]).ok()? {
        Resp::Bulk(Some(info)) => String::from_utf8_lossy(&info)
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|pid| pid.trim().parse().ok()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Processes, ports, files
// ---------------------------------------------------------------------------------------------

/// A port on 127.0.0.1 that was free a moment ago (another process may take it before it is
/// used, which `start` with port 0 retries on).
pub fn find_free_port() -> u16 {
    // Below the kernel's ephemeral range (32768–60999 on Linux): a port taken from that range
    // and released can be handed at once to another process's port-0 listener or outgoing
    // connection (a parallel test's worker health server, a connection to Postgres), and the
    // server meant for it then fails to bind while a readiness probe reaches the other one.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut seed = (nanos ^ std::process::id().wrapping_mul(2_654_435_761)) | 1;
    for _ in 0..64 {
        // xorshift: a different candidate each try.
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let port = 10_000 + (seed % 22_000) as u16;
        if TcpListener::bind(loopback(port)).is_ok() {
            return port;
        }
    }
    match TcpListener::bind(loopback(0)).and_then(|l| l.local_addr()) {
        Ok(addr) => addr.port(),
        Err(_) => 10_000 + (seed % 22_000) as u16,
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
}

fn tcp_connects(port: u16) -> bool {
    TcpStream::connect_timeout(&loopback(port), Duration::from_millis(300)).is_ok()
}

/// `name` in a PATH directory.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Whether the effective uid is 0.
fn is_root() -> bool {
    let from_proc = fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
    });
    from_proc.unwrap_or_else(|| {
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
    })
}

/// What we read from `/proc/<pid>/stat`.
#[derive(Debug)]
struct ProcStat {
    comm: String,
    state: char,
    ppid: u32,
}

impl ProcStat {
    /// Not a zombie (exited, not yet reaped) nor dead.
    fn is_running(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ..."; comm may itself contain spaces and parentheses.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let mut rest = text.get(close + 1..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some(ProcStat { comm, state, ppid })
}

/// Running processes whose parent is `ppid`.
fn child_pids(ppid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| proc_stat(pid).is_some_and(|s| s.ppid == ppid && s.is_running()))
        .collect()
}

/// Sends `sig` (a name such as "KILL") to `pids`; pids already gone are ignored.
fn signal(sig: &str, pids: &[u32]) -> Result<()> {
    if pids.is_empty() {
        return Ok(());
    }
    // The shell's builtin kill: procps may be absent from minimal images.
    Command::new("sh")
        .arg("-c")
        .arg(r#"kill -s "$0" "$@" 2>/dev/null; exit 0"#)
        .arg(sig)
        .args(pids.iter().map(u32::to_string))
        .status()
        .with_context(|| format!("cannot run `kill -s {sig}`"))?;
    Ok(())
}

/// Waits until none of `pids` is running (gone or zombie); false on timeout.
fn wait_gone(pids: &[u32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !pids
            .iter()
            .any(|&pid| proc_stat(pid).is_some_and(|s| s.is_running()))
        {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(Duration::from_millis(20));
    }
}

fn first_line_u32(text: &str) -> Option<u32> {
    text.lines().next()?.trim().parse().ok()
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The last lines written to `path` after byte `offset` (the whole file if it shrank).
fn log_tail(path: &Path, offset: u64) -> String {
    let read = || -> io::Result<String> {
        let mut file = File::open(path)?;
        let offset = if file.metadata()?.len() < offset {
            0
        } else {
            offset
        };
        file.seek(SeekFrom::Start(offset))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
            if tail.trim().is_empty() {
                "(log is empty)".to_string()
            } else {
                tail
            }
        }
        Err(e) => format!("(cannot read log: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed on drop (declare it before the
    /// servers using it, so they are dropped first).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let dir =
                std::env::temp_dir().join(format!("capibara-{tag}-{}-{nanos}", std::process::id()));
            fs::create_dir_all(&dir).expect("create temp dir");
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn redis_get(port: u16, key: &str) -> Resp {
        redis_command(port, &["GET", key]).expect("GET")
    }

    #[test]
    fn postgres_survives_kill_and_restart_without_losing_committed_rows() {
        let tmp = TempDir::new("pg");
        let mut pg = PostgresServer::start(PostgresOptions {
            data_dir: tmp.0.join("pg"),
            port: 0,
            // Durable settings: this test checks that a crash loses no committed row.
            fast_unsafe: false,
        })
        .expect("start postgres");
        let port = pg.port();
        assert_ne!(port, 0);
        assert_eq!(
            pg.url("jobs"),
            format!("postgres://capibara@127.0.0.1:{port}/jobs")
        );
        assert_eq!(pg.psql("postgres", "SELECT 1").expect("SELECT 1"), "1");

        pg.ensure_database("ls_test").expect("create database");
        pg.ensure_database("ls_test")
            .expect("ensure_database is idempotent");
        pg.psql(
            "ls_test",
            "CREATE TABLE t (v int); INSERT INTO t VALUES (1), (2);",
        )
        .expect("write rows");

        pg.kill().expect("kill");
        assert!(!tcp_connects(port), "killed server still listening");
        assert!(pg.psql("postgres", "SELECT 1").is_err());

        pg.restart().expect("restart after kill");
        assert_eq!(pg.port(), port);
        assert_eq!(pg.psql("ls_test", "SELECT sum(v) FROM t").unwrap(), "3");

        pg.stop().expect("stop");
        assert!(!tcp_connects(port), "stopped server still listening");
        pg.restart().expect("restart after stop");
        assert_eq!(pg.psql("ls_test", "SELECT count(*) FROM t").unwrap(), "2");
    }

    #[test]
    fn postgres_start_adopts_a_server_already_running_on_the_data_dir() {
        let tmp = TempDir::new("pg-adopt");
        let opts = PostgresOptions {
            data_dir: tmp.0.join("data"),
            port: 0,
            fast_unsafe: true,
        };
        let owner = PostgresServer::start(opts.clone()).expect("start postgres");
        assert!(!owner.is_adopted());
        assert!(owner.log_path().ends_with("postgres.log"));

        let adopted = PostgresServer::start(opts.clone()).expect("adopt");
        assert!(adopted.is_adopted());
        assert_eq!(adopted.port(), owner.port());
        drop(adopted);
        assert_eq!(
            owner.psql("postgres", "SELECT 1").unwrap(),
            "1",
            "dropping an adopted server must leave it running"
        );

        let wrong_port = PostgresServer::start(PostgresOptions {
            port: find_free_port(),
            ..opts
        });
        let err = format!("{:#}", wrong_port.expect_err("port mismatch must fail"));
        assert!(err.contains("already running"), "{err}");

        let port = owner.port();
        drop(owner);
        assert!(!tcp_connects(port), "drop must stop the server it started");
    }

    #[test]
    fn redis_restart_empty_forgets_keys_and_persistent_redis_survives_kill() {
        let tmp = TempDir::new("redis");
        let mut redis = RedisServer::start(RedisOptions {
            dir: tmp.0.join("redis"),
            port: 0,
            persist: true,
        })
        .expect("start redis");
        let port = redis.port();
        assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}/"));
        assert_eq!(
            redis_command(port, &["SET", "k", "v"]).unwrap(),
            Resp::Simple("OK".into())
        );

        // Kill, then start a new server on the same dir: the AOF brings the key back.
        redis.kill().expect("kill");
        assert!(!redis_ping(port));
        let mut redis = RedisServer::start(RedisOptions {
            dir: tmp.0.join("redis"),
            port,
            persist: true,
        })
        .expect("start again");
        assert!(!redis.is_adopted());
        assert_eq!(redis_get(port, "k"), Resp::Bulk(Some(b"v".to_vec())));

        redis.restart_empty().expect("restart_empty");
        assert_eq!(redis.port(), port);
        assert_eq!(redis_get(port, "k"), Resp::Bulk(None));
        drop(redis);
        assert!(!redis_ping(port), "drop must stop the server it started");
    }

    #[test]
    fn redis_start_adopts_a_server_answering_on_the_port() {
        let tmp = TempDir::new("redis-adopt");
        let opts = RedisOptions {
            dir: tmp.0.clone(),
            port: 0,
            persist: false,
        };
        let owner = RedisServer::start(opts.clone()).expect("start redis");
        let mut adopted = RedisServer::start(RedisOptions {
            port: owner.port(),
            ..opts
        })
        .expect("adopt");
        assert!(adopted.is_adopted());
        redis_command(owner.port(), &["SET", "k", "v"]).unwrap();

        // restart_empty works on an adopted server too: it kills it by pid.
        adopted
            .restart_empty()
            .expect("restart_empty of adopted server");
        assert_eq!(redis_get(owner.port(), "k"), Resp::Bulk(None));
        drop(adopted);
        assert!(!redis_ping(owner.port()));
    }

    #[test]
    fn postgres_bin_dir_holds_the_server_tools() {
        let bin = postgres_bin_dir().expect("postgres installed");
        assert!(bin.join("postgres").is_file(), "{}", bin.display());
        assert_ne!(find_free_port(), 0);
    }
}
