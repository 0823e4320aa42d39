//! The store side of `content.process`: an earlier job's artifact, found in the `jobs`
//! projection (of the running job's namespace) and read from the artifact store.

use async_trait::async_trait;
use capibara_shared::{
    artifacts::{ArtifactError, ArtifactStore},
    store::{self, Store},
};
use uuid::Uuid;

use crate::executors::content::{ArtifactReader, ReadError};

pub struct PgArtifactReader {
    pub store: Store,
    /// `Err` when `CAPIBARA_ARTIFACTS` could not be opened: reads then fail.
    pub artifacts: Result<ArtifactStore, String>,
}

#[async_trait]
impl ArtifactReader for PgArtifactReader {
    async fn read(
        &self,
        namespace: &str,
        job_id: Uuid,
        name: &str,
        max_bytes: u64,
    ) -> Result<Vec<u8>, ReadError> {
        let job = store::jobs::get(&self.store.pool, namespace, job_id)
            .await
            .map_err(|e| ReadError::Unavailable(e.to_string()))?
            .ok_or_else(|| ReadError::NotFound(format!("no job {job_id} in this namespace")))?;
        let Some(artifact) = job.artifacts.iter().find(|a| a.name == name) else {
            let names: Vec<&str> = job.artifacts.iter().map(|a| a.name.as_str()).collect();
            return Err(ReadError::NotFound(format!(
                "job {job_id} has no artifact `{name}` (it has: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )));
        };
        if artifact.size > max_bytes {
            return Err(ReadError::TooLarge(artifact.size));
        }
        let artifacts = self
            .artifacts
            .as_ref()
            .map_err(|e| ReadError::Unreadable(e.clone()))?;
        // One byte past the limit: a record that understates the size still cannot make us
        // read more.
        match artifacts
            .get(&artifact.location, Some(0..max_bytes + 1))
            .await
        {
            Ok(read) if read.bytes.len() as u64 > max_bytes => Err(ReadError::TooLarge(read.size)),
            Ok(read) => Ok(read.bytes.to_vec()),
            // An empty object has no byte 0.
            Err(ArtifactError::BadRange { size: 0 }) => Ok(Vec::new()),
            Err(ArtifactError::NotFound) => Err(ReadError::NotFound(format!(
                "artifact `{name}` of job {job_id} is no longer in the artifact store"
            ))),
            Err(e @ ArtifactError::Store(_)) => Err(ReadError::Unavailable(e.to_string())),
            Err(e) => Err(ReadError::Unreadable(e.to_string())),
        }
    }
}
