//! Where Redis is: one server, or a Redis Cluster (docs/redis-cluster.md).
//!
//! `CAPIBARA_REDIS_URL` names one server (`redis://host:6379/`), or a cluster by its seed nodes:
//! several comma-separated URLs (`redis://a:7000,redis://b:7001,redis://c:7002`), or one URL with
//! the `redis+cluster://` scheme (`redis+cluster://a:7000`). Every process (API, worker,
//! scheduler, `capibara dev`) reads the same setting, so all of them talk to the same cluster.
//!
//! [`RedisConn`] is either kind of connection behind one type: commands, pipelines and scripts
//! go through [`redis::aio::ConnectionLike`]. On a cluster each pipeline and each script must
//! stay on one hash slot (the cluster client sends a pipeline whole to the node of its first
//! key), which the queue's key layout guarantees ([`crate::queue`]).

use std::time::Duration;

use redis::{
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
    Cmd, IntoConnectionInfo, Pipeline, RedisFuture, RedisResult, Value,
};

/// How long a cluster connection waits for an answer; a blocking fetcher's command may block
/// for up to [`BLOCKING_RESPONSE_TIMEOUT`].
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
const BLOCKING_RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);

/// The nodes a setting names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    Single(String),
    /// Seed nodes of a cluster (the client learns the others from them).
    Cluster(Vec<String>),
}

impl RedisTarget {
    /// Read `CAPIBARA_REDIS_URL`'s value: several comma-separated URLs, or a `redis+cluster://`
    /// (`rediss+cluster://` for TLS) URL, name a cluster; one plain URL names a server.
    pub fn parse(url: &str) -> RedisTarget {
        let nodes: Vec<String> = url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.replacen("redis+cluster://", "redis://", 1).replacen(
                    "rediss+cluster://",
                    "rediss://",
                    1,
                )
            })
            .collect();
        let cluster_scheme = url.trim_start().starts_with("redis+cluster://")
            || url.trim_start().starts_with("rediss+cluster://");
        match nodes.as_slice() {
            [one] if !cluster_scheme => RedisTarget::Single(one.clone()),
            [] => RedisTarget::Single(url.to_string()),
            _ => RedisTarget::Cluster(nodes),
        }
    }
}

/// A connection to Redis, either kind; cheap to clone (clones share the connection).
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisConn {
    /// Send `cmd` to the master serving `key`'s slot (on one server: to it). For commands
    /// about a connection (`CLIENT ID`, `CLIENT UNBLOCK`) that must reach the node a blocked
    /// command waits on.
    pub async fn query_at_key<T: redis::FromRedisValue>(
        &mut self,
        cmd: &Cmd,
        key: &str,
    ) -> RedisResult<T> {
        match self {
            RedisConn::Single(c) => cmd.query_async(c).await,
            RedisConn::Cluster(c) => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                let route = Route::new(key_slot(key), SlotAddr::Master);
                let v = c
                    .route_command(
                        cmd,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                    )
                    .await?;
                redis::from_redis_value(&v)
            }
        }
    }
}

/// The cluster slot of `key` (Redis Cluster's `CRC16(tag) mod 16384`, the tag being what
/// stands between the first `{` and the next `}` when that is not empty, else the whole key).
pub fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|b| *b == b'{').and_then(|open| {
        let close = bytes[open + 1..].iter().position(|b| *b == b'}')?;
        (close > 0).then(|| &bytes[open + 1..open + 1 + close])
    });
    crc16_xmodem(tagged.unwrap_or(bytes)) % 16384
}

fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for b in data {
        crc ^= (*b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Opens connections to the configured Redis; cheap to clone.
#[derive(Clone)]
pub struct Redis {
    target: RedisTarget,
    /// Clients of the nodes named (one for a server): subscriptions go to the first that
    /// answers.
    nodes: Vec<redis::Client>,
    cluster: Option<ClusterClient>,
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(CONNECTION_TIMEOUT)
        .set_response_timeout(RESPONSE_TIMEOUT)
        .set_number_of_retries(2)
        .set_max_delay(500)
}

impl Redis {
    /// Read the setting (no connection yet).
    pub fn open(url: &str) -> RedisResult<Redis> {
        let target = RedisTarget::parse(url);
        match &target {
            RedisTarget::Single(u) => Ok(Redis {
                nodes: vec![redis::Client::open(u.as_str())?],
                cluster: None,
                target,
            }),
            RedisTarget::Cluster(seeds) => {
                let infos = seeds
                    .iter()
                    .map(|s| s.as_str().into_connection_info())
                    .collect::<RedisResult<Vec<_>>>()?;
                let cluster = cluster_builder(infos.clone())
                    .response_timeout(RESPONSE_TIMEOUT)
                    .build()?;
                Ok(Redis {
                    nodes: infos
                        .into_iter()
                        .map(redis::Client::open)
                        .collect::<RedisResult<_>>()?,
                    cluster: Some(cluster),
                    target,
                })
            }
        }
    }

    pub fn target(&self) -> &RedisTarget {
        &self.target
    }

    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// A shared, reconnecting connection (on a cluster: following `MOVED`/`ASK` redirections
    /// and slot moves after a failover).
    pub async fn connect(&self) -> RedisResult<RedisConn> {
        match &self.cluster {
            None => Ok(RedisConn::Single(
                self.nodes[0]
                    .get_connection_manager_with_config(manager_config())
                    .await?,
            )),
            Some(c) => Ok(RedisConn::Cluster(c.get_async_connection().await?)),
        }
    }

    /// A connection of its own for blocking commands (a blocked command stalls its connection,
    /// and on a cluster the connection to each node is shared by every caller).
    pub async fn connect_blocking(&self) -> RedisResult<RedisConn> {
        match &self.target {
            RedisTarget::Single(_) => self.connect().await,
            RedisTarget::Cluster(seeds) => {
                let infos = seeds
                    .iter()
                    .map(|s| s.as_str().into_connection_info())
                    .collect::<RedisResult<Vec<_>>>()?;
                let client = cluster_builder(infos)
                    .response_timeout(BLOCKING_RESPONSE_TIMEOUT)
                    .build()?;
                Ok(RedisConn::Cluster(client.get_async_connection().await?))
            }
        }
    }

    /// A pub/sub connection. On a cluster any node will do (a `PUBLISH` reaches every node):
    /// the first of the seed nodes that answers, so a subscriber whose node died subscribes
    /// again elsewhere.
    pub async fn pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        let mut last = None;
        for node in &self.nodes {
            match tokio::time::timeout(CONNECTION_TIMEOUT, node.get_async_pubsub()).await {
                Ok(Ok(p)) => return Ok(p),
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(redis::RedisError::from((
                        redis::ErrorKind::IoError,
                        "no answer from a Redis node",
                    )))
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::ClientError, "no Redis node configured"))
        }))
    }
}

/// Retries while a failed master's replica is promoted (the cluster's `cluster-node-timeout`
/// plus an election: seconds): short waits, then the caller's own retry (the relay, a worker's
/// next pop) takes over.
fn cluster_builder(nodes: Vec<redis::ConnectionInfo>) -> redis::cluster::ClusterClientBuilder {
    ClusterClient::builder(nodes)
        .connection_timeout(CONNECTION_TIMEOUT)
        .retries(6)
        .min_retry_wait(50)
        .max_retry_wait(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_hash_tag_as_redis_cluster_computes_them() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.0.15.
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("{capibara}:ring:default"), 12503);
        assert_eq!(key_slot("{capibara}:ring:default"), key_slot("capibara"));
        assert_eq!(key_slot("{user1000}.following"), key_slot("user1000"));
        // An empty tag is no tag: the whole key is hashed.
        assert_eq!(key_slot("foo{}{bar}"), 8363);
        assert_eq!(key_slot("foo{{bar}}zap"), 4015);
        assert_eq!(key_slot("foo{{bar}}zap"), key_slot("{bar"));
    }

    #[test]
    fn one_url_is_a_server_and_a_list_or_the_cluster_scheme_a_cluster() {
        assert_eq!(
            RedisTarget::parse("redis://127.0.0.1:6379/"),
            RedisTarget::Single("redis://127.0.0.1:6379/".into())
        );
        assert_eq!(
            RedisTarget::parse("redis://a:7000, redis://b:7001,"),
            RedisTarget::Cluster(vec!["redis://a:7000".into(), "redis://b:7001".into()])
        );
        assert_eq!(
            RedisTarget::parse("redis+cluster://a:7000"),
            RedisTarget::Cluster(vec!["redis://a:7000".into()])
        );
        assert_eq!(
            RedisTarget::parse("rediss+cluster://u:p@a:7000"),
            RedisTarget::Cluster(vec!["rediss://u:p@a:7000".into()])
        );
    }
}
