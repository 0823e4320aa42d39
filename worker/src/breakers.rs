//! The circuit breakers an executor consults ([`HostBreakers`]), on the executor's own Redis
//! connection, made by its first call (executors hold no queue handle).

use std::time::Duration;

use capibara_shared::{domain::job::JobError, http_hosts::HostBreakers};

use crate::executors::ExecError;

pub struct LazyBreakers {
    redis_url: String,
    prefix: String,
    scope: &'static str,
    failures: u32,
    cooldown: Duration,
    cell: tokio::sync::OnceCell<HostBreakers>,
}

impl LazyBreakers {
    pub fn new(
        redis_url: &str,
        prefix: &str,
        scope: &'static str,
        failures: u32,
        cooldown: Duration,
    ) -> Self {
        LazyBreakers {
            redis_url: redis_url.to_string(),
            prefix: prefix.to_string(),
            scope,
            failures,
            cooldown,
            cell: tokio::sync::OnceCell::new(),
        }
    }

    /// The breakers; a job whose breakers cannot be reached is retried.
    pub async fn get(&self) -> Result<&HostBreakers, ExecError> {
        let unavailable = |e: redis::RedisError| {
            ExecError::Retryable(JobError::new("breaker_unavailable", e.to_string()))
        };
        self.cell
            .get_or_try_init(|| async {
                let conn = capibara_shared::redis_conn::Redis::open(&self.redis_url)
                    .map_err(unavailable)?
                    .connect()
                    .await
                    .map_err(unavailable)?;
                Ok(
                    HostBreakers::new(conn, &self.prefix, self.failures, self.cooldown)
                        .scoped(self.scope),
                )
            })
            .await
    }
}
