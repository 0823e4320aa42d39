//! The bounded event log's loop (docs/event-log-retention.md): every
//! `CAPIBARA_EVENTS_ARCHIVE_EVERY`, create the `events` partitions ahead and archive the old
//! ones whose streams are all finished. Safe in any number of replicas: partitions are created
//! under a transaction advisory lock, and an archive run holds a session advisory lock (a
//! replica that finds it taken skips the run).

use std::sync::Arc;

use capibara_shared::{
    artifacts::ArtifactStore,
    config::EventLogConfig,
    store::{
        archive::{self, Halt},
        StoreError,
    },
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::driver::every;

/// One step: partitions ahead, then (when a retention and an artifact store are set) archive.
/// Returns the partitions archived.
pub async fn step(
    pool: &PgPool,
    store: Option<&ArtifactStore>,
    cfg: &EventLogConfig,
) -> Result<usize, StoreError> {
    let created = archive::ensure_partitions(pool, cfg).await?;
    if created > 0 {
        tracing::info!(created, "event partitions created");
    }
    let (Some(retention), Some(store)) = (cfg.retention, store) else {
        return Ok(0);
    };
    match archive::archive_old(pool, store, retention, Halt::Never).await {
        Ok(r) => {
            if r.partitions > 0 {
                tracing::info!(
                    partitions = r.partitions,
                    events = r.events,
                    objects = r.objects,
                    "event partitions archived and dropped"
                );
            }
            Ok(0)
        }
        Err(e) => {
            tracing::error!(error = %e, "event archive failed; the next run resumes it");
            Ok(0)
        }
    }
}

/// Run [`step`] every `cfg.archive_every` until `stop`.
pub async fn run(
    pool: PgPool,
    store: Option<Arc<ArtifactStore>>,
    cfg: EventLogConfig,
    stop: CancellationToken,
) {
    every(cfg.archive_every, &stop, || {
        step(&pool, store.as_deref(), &cfg)
    })
    .await;
}
