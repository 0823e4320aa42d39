//! `memory.write` and `memory.search` (docs/models.md): texts stored with their sentence
//! vectors from the process's encoder, found by meaning (the worker's exact copy of the
//! collection's vectors, [`crate::models::vector_index`]), by words (Postgres full-text search)
//! or both, fused by reciprocal rank.

use std::{collections::HashMap, sync::Arc, time::Instant};

use async_trait::async_trait;
use capibara_shared::{
    domain::{
        job::JobError,
        kinds::{
            input,
            memory::{
                MemoryHit, MemorySearchInput, MemorySearchOutput, MemoryWriteInput,
                MemoryWriteOutput, SearchMode,
            },
        },
    },
    store::memory::{ItemRow, NewItem, VectorRow},
};
use uuid::Uuid;

use super::{builtin::to_output, embed::model_error, ExecError, Executor, JobContext, Output};
use crate::models::{encoder::SharedEncoder, vector_index::VectorIndex};

/// Reciprocal-rank fusion's constant (Cormack et al. 2009): `Σ 1/(RRF_K + rank)`.
pub const RRF_K: f64 = 60.0;

/// What the memory kinds need of the store (`memory_items`, `memory_collections`).
#[async_trait]
pub trait MemoryStore: Send + Sync {
    async fn insert(&self, item: NewItem<'_>) -> Result<bool, String>;
    async fn count(&self, namespace: &str, collection: &str) -> Result<i64, String>;
    async fn vectors_after(
        &self,
        namespace: &str,
        collection: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<VectorRow>, String>;
    async fn items(&self, namespace: &str, ids: &[Uuid]) -> Result<Vec<ItemRow>, String>;
    async fn keyword(
        &self,
        namespace: &str,
        collection: &str,
        query: &str,
        tags: &[String],
        limit: i64,
    ) -> Result<Vec<(Uuid, f32)>, String>;
}

fn invalid(e: capibara_shared::domain::FieldError) -> ExecError {
    ExecError::Abort(JobError::new(
        "invalid_input",
        format!("{}: {}", e.field, e.message),
    ))
}

fn unavailable(e: String) -> ExecError {
    ExecError::Retryable(JobError::new("store_unavailable", e))
}

pub struct MemoryWrite {
    pub encoder: Arc<SharedEncoder>,
    pub store: Arc<dyn MemoryStore>,
}

#[async_trait]
impl Executor for MemoryWrite {
    async fn execute(&self, ctx: JobContext) -> Result<Output, ExecError> {
        let input: MemoryWriteInput = input::parse(&ctx.input).map_err(invalid)?;
        let embedded = self
            .encoder
            .embed(vec![input.text.clone()])
            .await
            .map_err(model_error)?
            .pop()
            .ok_or_else(|| ExecError::Retryable(JobError::new("model_failed", "no vector")))?;
        let metadata = serde_json::to_value(input.metadata.clone().unwrap_or_default())
            .expect("a JSON object");
        // The job's id is the item's: a retried attempt stores nothing twice.
        self.store
            .insert(NewItem {
                id: ctx.job_id,
                namespace: &ctx.job.namespace,
                collection: input.collection(),
                text: &input.text,
                tags: &input.tags,
                metadata: &metadata,
                embedding: &embedded.vector,
            })
            .await
            .map_err(unavailable)?;
        Ok(Output {
            output: to_output(MemoryWriteOutput {
                id: ctx.job_id,
                collection: input.collection().to_string(),
                tokens: embedded.tokens,
                truncated: embedded.truncated,
            }),
            ..Output::default()
        })
    }

    /// The write is keyed by the job's id: a second run of an attempt changes nothing.
    fn repeatable(&self) -> bool {
        true
    }
}

pub struct MemorySearch {
    pub encoder: Arc<SharedEncoder>,
    pub store: Arc<dyn MemoryStore>,
    pub index: Arc<VectorIndex>,
}

/// Fuse ranked lists by reciprocal rank: each id's score is `Σ 1/(RRF_K + rank)` over the lists
/// it is in (ranks from 1); best first, ties in the first list's order.
pub fn fuse(lists: &[&[Uuid]], k: usize) -> Vec<(Uuid, f64)> {
    let mut score: HashMap<Uuid, (f64, usize)> = HashMap::new();
    let mut order = 0;
    for list in lists {
        for (rank, id) in list.iter().enumerate() {
            let e = score.entry(*id).or_insert_with(|| {
                order += 1;
                (0.0, order)
            });
            e.0 += 1.0 / (RRF_K + rank as f64 + 1.0);
        }
    }
    let mut fused: Vec<(Uuid, f64, usize)> =
        score.into_iter().map(|(id, (s, o))| (id, s, o)).collect();
    fused.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.2.cmp(&b.2)));
    fused
        .into_iter()
        .take(k)
        .map(|(id, s, _)| (id, s))
        .collect()
}

#[async_trait]
impl Executor for MemorySearch {
    async fn execute(&self, ctx: JobContext) -> Result<Output, ExecError> {
        let input: MemorySearchInput = input::parse(&ctx.input).map_err(invalid)?;
        let started = Instant::now();
        let (ns, collection, k) = (&ctx.job.namespace, input.collection(), input.k());
        // Hybrid ranks more of each list than it returns, so the fusion has something to fuse.
        let depth = if input.mode == SearchMode::Hybrid {
            (4 * k).max(50)
        } else {
            k
        };
        // By meaning (the query's vector against the worker's copy) and by words (Postgres),
        // at once when both are wanted.
        let by_meaning = async {
            if input.mode == SearchMode::Keyword {
                return Ok((Vec::new(), 0));
            }
            let query = self
                .encoder
                .embed(vec![input.query.clone()])
                .await
                .map_err(model_error)?
                .pop()
                .map(|e| e.vector)
                .unwrap_or_default();
            let copy = self
                .index
                .current(self.store.as_ref(), ns, collection)
                .await
                .map_err(unavailable)?;
            let copy = copy.read().await;
            Ok::<_, ExecError>((copy.search(&query, depth, &input.tags), copy.len()))
        };
        let by_words = async {
            if input.mode == SearchMode::Semantic {
                return Ok(Vec::new());
            }
            self.store
                .keyword(ns, collection, &input.query, &input.tags, depth as i64)
                .await
                .map_err(unavailable)
        };
        let ((semantic, searched), keyword): ((Vec<(Uuid, f32)>, usize), Vec<(Uuid, f32)>) =
            tokio::try_join!(by_meaning, by_words)?;
        let semantic_ids: Vec<Uuid> = semantic.iter().map(|h| h.0).collect();
        let keyword_ids: Vec<Uuid> = keyword.iter().map(|h| h.0).collect();
        let ranked: Vec<(Uuid, f64)> = match input.mode {
            SearchMode::Semantic => semantic.iter().map(|(i, s)| (*i, f64::from(*s))).collect(),
            SearchMode::Keyword => keyword.iter().map(|(i, s)| (*i, f64::from(*s))).collect(),
            SearchMode::Hybrid => fuse(&[&semantic_ids, &keyword_ids], k),
        };
        let ids: Vec<Uuid> = ranked.iter().map(|r| r.0).collect();
        let mut rows: HashMap<Uuid, ItemRow> = self
            .store
            .items(ns, &ids)
            .await
            .map_err(unavailable)?
            .into_iter()
            .map(|r| (r.id, r))
            .collect();
        let rank_in = |list: &[Uuid], id: &Uuid| list.iter().position(|x| x == id).map(|p| p + 1);
        let items = ranked
            .into_iter()
            .filter_map(|(id, score)| {
                let row = rows.remove(&id)?;
                Some(MemoryHit {
                    id,
                    text: row.text,
                    tags: row.tags,
                    metadata: row.metadata,
                    score,
                    semantic_rank: rank_in(&semantic_ids, &id),
                    keyword_rank: rank_in(&keyword_ids, &id),
                    created_at: row.created_at,
                })
            })
            .collect();
        Ok(Output {
            output: to_output(MemorySearchOutput {
                mode: input.mode,
                collection: collection.to_string(),
                items,
                searched,
                duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            }),
            ..Output::default()
        })
    }

    /// Searching writes nothing.
    fn repeatable(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fusion_rewards_items_both_lists_rank() {
        let id = |n: u128| Uuid::from_u128(n);
        let semantic = [id(1), id(2), id(3)];
        let keyword = [id(3), id(4)];
        let fused = fuse(&[&semantic, &keyword], 10);
        let order: Vec<u128> = fused.iter().map(|f| f.0.as_u128()).collect();
        // 3 is in both (1/63 + 1/61); 1 first of one list (1/61); 4 second (1/62); 2 (1/62).
        assert_eq!(order, [3, 1, 2, 4]);
        assert!((fused[0].1 - (1.0 / 63.0 + 1.0 / 61.0)).abs() < 1e-12);
        assert_eq!(fuse(&[&semantic, &keyword], 2).len(), 2);
    }
}
