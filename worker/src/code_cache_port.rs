//! The Postgres side of `code.run`'s result cache (table `code_cache`).

use async_trait::async_trait;
use capibara_shared::store::{code_cache, Store};
use serde_json::Value;
use std::time::Duration;
use uuid::Uuid;

use crate::executors::code::{CacheEntry, ResultCache};

pub struct PgResultCache {
    pub store: Store,
    /// `CAPIBARA_CODE_CACHE_TTL`: how long an entry is served.
    pub ttl: Duration,
}

#[async_trait]
impl ResultCache for PgResultCache {
    async fn get(&self, job_id: Uuid, key: &str) -> Result<Option<Value>, String> {
        code_cache::hit(&self.store.pool, job_id, key)
            .await
            .map_err(|e| e.to_string())
    }

    async fn put(&self, e: CacheEntry<'_>) -> Result<(), String> {
        code_cache::fill(
            &self.store.pool,
            code_cache::Fill {
                job_id: e.job_id,
                key: e.key,
                language: e.language,
                output: e.output,
                execution_ms: e.execution_ms,
                ttl: self.ttl,
            },
        )
        .await
        .map_err(|e| e.to_string())
    }
}
