//! The store side of `llm.generate` / `llm.chat`: the namespace's providers
//! (`llm_providers` projection).

use async_trait::async_trait;
use capibara_shared::{
    domain::llm::LlmProvider,
    store::{self, Store},
};

use crate::executors::llm::ProviderSource;

pub struct PgProviders {
    pub store: Store,
}

#[async_trait]
impl ProviderSource for PgProviders {
    async fn providers(&self, namespace: &str) -> Result<Vec<LlmProvider>, String> {
        store::llm_providers::list(&self.store.pool, namespace)
            .await
            .map_err(|e| e.to_string())
    }
}
