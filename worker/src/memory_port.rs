//! The Postgres side of `memory.write` and `memory.search` (`memory_items`,
//! `memory_collections`).

use async_trait::async_trait;
use capibara_shared::store::{
    self,
    memory::{ItemRow, NewItem, VectorRow},
    Store,
};
use uuid::Uuid;

use crate::executors::memory::MemoryStore;

pub struct PgMemoryStore {
    pub store: Store,
}

#[async_trait]
impl MemoryStore for PgMemoryStore {
    async fn insert(&self, item: NewItem<'_>) -> Result<bool, String> {
        store::memory::insert(&self.store.pool, item)
            .await
            .map_err(|e| e.to_string())
    }

    async fn count(&self, namespace: &str, collection: &str) -> Result<i64, String> {
        store::memory::count(&self.store.pool, namespace, collection)
            .await
            .map_err(|e| e.to_string())
    }

    async fn vectors_after(
        &self,
        namespace: &str,
        collection: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<VectorRow>, String> {
        store::memory::vectors_after(&self.store.pool, namespace, collection, after, limit)
            .await
            .map_err(|e| e.to_string())
    }

    async fn items(&self, namespace: &str, ids: &[Uuid]) -> Result<Vec<ItemRow>, String> {
        store::memory::items(&self.store.pool, namespace, ids)
            .await
            .map_err(|e| e.to_string())
    }

    async fn keyword(
        &self,
        namespace: &str,
        collection: &str,
        query: &str,
        tags: &[String],
        limit: i64,
    ) -> Result<Vec<(Uuid, f32)>, String> {
        store::memory::keyword(&self.store.pool, namespace, collection, query, tags, limit)
            .await
            .map_err(|e| e.to_string())
    }
}
