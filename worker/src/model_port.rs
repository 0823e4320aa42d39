//! The store side of `finetune.train` and `model.classify`: the `models` and `jobs` projections
//! (of the running job's namespace) and the artifact store.

use async_trait::async_trait;
use capibara_shared::{
    artifacts::ArtifactStore,
    domain::{
        job::Artifact,
        model::{ModelName, ModelRef, ModelVersion},
    },
    store::{self, Store},
};
use uuid::Uuid;

use crate::executors::finetune::ModelStore;

pub struct PgModelStore {
    pub store: Store,
    /// `Err` when `CAPIBARA_ARTIFACTS` could not be opened: reads and writes then fail.
    pub artifacts: Result<ArtifactStore, String>,
}

impl PgModelStore {
    fn artifacts(&self) -> Result<&ArtifactStore, String> {
        self.artifacts
            .as_ref()
            .map_err(|e| format!("artifact store unavailable: {e}"))
    }
}

#[async_trait]
impl ModelStore for PgModelStore {
    async fn name(&self, namespace: &str, name: &str) -> Result<Option<ModelName>, String> {
        store::models::get_name(&self.store.pool, namespace, name)
            .await
            .map_err(|e| e.to_string())
    }

    async fn resolve(
        &self,
        namespace: &str,
        reference: &ModelRef,
    ) -> Result<Option<ModelVersion>, String> {
        Ok(
            store::models::resolve(&self.store.pool, namespace, reference)
                .await
                .map_err(|e| e.to_string())?
                .map(|(_, v)| v),
        )
    }

    async fn job_artifacts(
        &self,
        namespace: &str,
        id: Uuid,
    ) -> Result<Option<(String, Vec<Artifact>)>, String> {
        Ok(store::jobs::get(&self.store.pool, namespace, id)
            .await
            .map_err(|e| e.to_string())?
            .map(|j| (j.kind, j.artifacts)))
    }

    async fn read(&self, artifact: &Artifact) -> Result<Vec<u8>, String> {
        self.artifacts()?
            .get(&artifact.location, None)
            .await
            .map(|r| r.bytes.to_vec())
            .map_err(|e| format!("reading {}: {e}", artifact.name))
    }

    async fn put(
        &self,
        job_id: Uuid,
        name: &str,
        content_type: &str,
        bytes: Vec<u8>,
    ) -> Result<Artifact, String> {
        self.artifacts()?
            .put(job_id, name, content_type, bytes)
            .await
            .map_err(|e| format!("storing {name}: {e}"))
    }
}
