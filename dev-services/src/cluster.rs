//! A local Redis Cluster: `redis-server` processes in cluster mode, joined by
//! `redis-cli --cluster create`, for tests of dispatch on a cluster (docs/redis-cluster.md).
//!
//! Every node listens on a free port of 127.0.0.1 with its cluster bus on another free port
//! (`--cluster-port`), and a short `cluster-node-timeout` so a killed master's replica is
//! promoted within a few seconds.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{
    find_free_port, is_port_conflict, redis_binary, redis_command, RedisOptions, RedisServer, Resp,
    AUTO_PORT_ATTEMPTS,
};

/// How long the cluster may take to agree on its slots (after creation or a failover).
const CLUSTER_OK_TIMEOUT: Duration = Duration::from_secs(30);

/// A node as `CLUSTER NODES` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    pub port: u16,
    pub master: bool,
    /// Whether the other nodes see it failing (`fail` or `fail?`).
    pub failing: bool,
}

/// A local Redis Cluster; every node is stopped on drop.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    node_timeout_ms: u64,
}

impl RedisCluster {
    /// Start `masters` masters with `replicas` replicas each under `dir` (a directory per
    /// node), create the cluster and wait until every node reports `cluster_state:ok` and
    /// every replica is in sync with its master.
    pub fn start(dir: &Path, masters: usize, replicas: usize) -> Result<RedisCluster> {
        let node_timeout_ms = 1000;
        let mut nodes = Vec::new();
        for i in 0..masters * (1 + replicas) {
            // Free ports may be taken before the node binds them (tests start clusters in
            // parallel): try fresh ones.
            let mut attempt = 0;
            let server = loop {
                attempt += 1;
                let port = find_free_port();
                let server = RedisServer::start_with(
                    RedisOptions {
                        dir: dir.join(format!("node-{i}")),
                        port,
                        persist: false,
                    },
                    vec![
                        "--cluster-enabled".into(),
                        "yes".into(),
                        "--cluster-config-file".into(),
                        format!("nodes-{port}.conf"),
                        // The bus port would be `port + 10000`, beyond 65535 for a high free port.
                        "--cluster-port".into(),
                        find_free_port().to_string(),
                        "--cluster-node-timeout".into(),
                        node_timeout_ms.to_string(),
                        // A replica takes over however long it was cut off (tests kill masters).
                        "--cluster-replica-validity-factor".into(),
                        "0".into(),
                    ],
                );
                match server {
                    Ok(s) => break s,
                    Err(e) if attempt < AUTO_PORT_ATTEMPTS && is_port_conflict(&e) => continue,
                    Err(e) => return Err(e),
                }
            };
            nodes.push(server);
        }
        let cluster = RedisCluster {
            nodes,
            node_timeout_ms,
        };
        let mut create = Command::new(redis_binary("redis-cli")?);
        create.arg("--cluster").arg("create");
        for n in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(std::process::Stdio::null());
        let out = create
            .output()
            .context("running redis-cli --cluster create")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        cluster.wait_ok(CLUSTER_OK_TIMEOUT)?;
        Ok(cluster)
    }

    /// Seed nodes for `CAPIBARA_REDIS_URL`: every node's URL, comma-separated.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Ports of every node started (live or killed).
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// The nodes as a live node sees them (`CLUSTER NODES`).
    pub fn topology(&self) -> Result<Vec<ClusterNode>> {
        let mut last = None;
        for port in self.ports() {
            match redis_command(port, &["CLUSTER", "NODES"]) {
                Ok(Resp::Bulk(Some(text))) => {
                    return Ok(parse_nodes(&String::from_utf8_lossy(&text)))
                }
                other => last = Some(format!("{other:?}")),
            }
        }
        bail!("no cluster node answers CLUSTER NODES: {last:?}")
    }

    /// Ports of the masters serving slots, in port order (failing ones excluded).
    pub fn masters(&self) -> Result<Vec<u16>> {
        Ok(self
            .topology()?
            .into_iter()
            .filter(|n| n.master && !n.failing)
            .map(|n| n.port)
            .collect())
    }

    /// The port of the master serving `slot`.
    pub fn master_of_slot(&self, slot: u16) -> Result<u16> {
        for port in self.ports() {
            if let Ok(Resp::Array(Some(ranges))) = redis_command(port, &["CLUSTER", "SLOTS"]) {
                for r in ranges {
                    let Resp::Array(Some(parts)) = r else {
                        continue;
                    };
                    let (Some(Resp::Integer(lo)), Some(Resp::Integer(hi))) =
                        (parts.first(), parts.get(1))
                    else {
                        continue;
                    };
                    if (*lo..=*hi).contains(&(slot as i64)) {
                        if let Some(Resp::Array(Some(master))) = parts.get(2) {
                            if let Some(Resp::Integer(p)) = master.get(1) {
                                return Ok(*p as u16);
                            }
                        }
                    }
                }
                bail!("slot {slot} is not served");
            }
        }
        bail!("no cluster node answers CLUSTER SLOTS")
    }

    /// How many keys each live master holds (`DBSIZE`), by port.
    pub fn keys_per_master(&self) -> Result<BTreeMap<u16, i64>> {
        let mut out = BTreeMap::new();
        for port in self.masters()? {
            if let Ok(Resp::Integer(n)) = redis_command(port, &["DBSIZE"]) {
                out.insert(port, n);
            }
        }
        Ok(out)
    }

    /// SIGKILL the node on `port` (a master's replica then takes over after the node
    /// timeout); it stays down.
    pub fn kill(&mut self, port: u16) -> Result<()> {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .with_context(|| format!("no cluster node on port {port}"))?;
        node.kill()
    }

    /// The configured `cluster-node-timeout`.
    pub fn node_timeout(&self) -> Duration {
        Duration::from_millis(self.node_timeout_ms)
    }

    /// Wait until every live node reports `cluster_state:ok`, every slot is served by a live
    /// master and every live replica's link to its master is up.
    pub fn wait_ok(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut why = String::new();
        while Instant::now() < deadline {
            match self.state() {
                Ok(()) => return Ok(()),
                Err(e) => why = format!("{e:#}"),
            }
            sleep(Duration::from_millis(100));
        }
        bail!("the Redis Cluster is not ok after {timeout:?}: {why}")
    }

    fn state(&self) -> Result<()> {
        let mut live = 0;
        for port in self.ports() {
            let Ok(info) = redis_command(port, &["CLUSTER", "INFO"]) else {
                continue;
            };
            live += 1;
            let Resp::Bulk(Some(info)) = info else {
                bail!("node {port}: CLUSTER INFO answered {info:?}");
            };
            let info = String::from_utf8_lossy(&info);
            if !info.contains("cluster_state:ok") {
                bail!("node {port} is not ok yet");
            }
            if let Ok(Resp::Bulk(Some(repl))) = redis_command(port, &["INFO", "replication"]) {
                let repl = String::from_utf8_lossy(&repl);
                if repl.contains("role:slave") && !repl.contains("master_link_status:up") {
                    bail!("replica {port} is not in sync yet");
                }
            }
        }
        if live == 0 {
            bail!("no node answers");
        }
        let topology = self.topology()?;
        let masters = topology.iter().filter(|n| n.master && !n.failing).count();
        if masters == 0 {
            bail!("no live master");
        }
        Ok(())
    }
}

/// `CLUSTER NODES` lines: `<id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <slots>…`.
/// Only masters that serve slots count as masters.
fn parse_nodes(text: &str) -> Vec<ClusterNode> {
    let mut out: Vec<ClusterNode> = text
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let addr = f.get(1)?;
            let port = addr.split('@').next()?.rsplit(':').next()?.parse().ok()?;
            let flags = f.get(2)?;
            Some(ClusterNode {
                port,
                master: flags.split(',').any(|x| x == "master") && f.len() > 8,
                failing: flags.split(',').any(|x| x == "fail" || x == "fail?"),
            })
        })
        .collect();
    out.sort_by_key(|n| n.port);
    out
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        // Kill every node at once (a graceful stop of each would wait for the others).
        for n in &mut self.nodes {
            let _ = n.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_lines_give_roles_and_failures() {
        let text = "\
a 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b 127.0.0.1:7001@17001 master,fail - 0 0 2 connected 5461-10922
c 127.0.0.1:7003@17003 slave a 0 0 1 connected
d 127.0.0.1:7004@17004 master - 0 0 3 connected
";
        assert_eq!(
            parse_nodes(text),
            vec![
                ClusterNode {
                    port: 7000,
                    master: true,
                    failing: false
                },
                ClusterNode {
                    port: 7001,
                    master: true,
                    failing: true
                },
                ClusterNode {
                    port: 7003,
                    master: false,
                    failing: false
                },
                ClusterNode {
                    port: 7004,
                    master: false,
                    failing: false
                },
            ]
        );
    }
}
