//! The worker's copies of memory collections' vectors, for `memory.search` by meaning: exact
//! search (every vector's dot product with the query; the vectors are unit length, so that is
//! the cosine), so its recall is that of exact search by construction. A copy follows its
//! collection in Postgres by the collection's item count, which the writing transaction keeps
//! (docs/models.md): when the count moved, the new rows are read (by `seq`); when the copy
//! still does not hold as many items as the count says (a write that took a lower `seq`
//! committed after a higher one), the whole collection is read again.

use std::{collections::HashMap, sync::Arc};

use capibara_shared::store::memory::VectorRow;
use uuid::Uuid;

use crate::executors::memory::MemoryStore;

/// Rows read per query when a copy catches up.
const PAGE: i64 = 5_000;

/// One collection's vectors.
#[derive(Default)]
pub struct Collection {
    ids: Vec<Uuid>,
    tags: Vec<Vec<String>>,
    /// Every vector, one after the other.
    vectors: Vec<f32>,
    dims: usize,
    last_seq: i64,
}

/// The dot product, in eight lanes (so the compiler can use vector instructions).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

impl Collection {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    fn push(&mut self, row: VectorRow) {
        if self.dims == 0 {
            self.dims = row.embedding.len();
        }
        if row.embedding.len() != self.dims {
            return;
        }
        self.last_seq = self.last_seq.max(row.seq);
        self.ids.push(row.id);
        self.tags.push(row.tags);
        self.vectors.extend_from_slice(&row.embedding);
    }

    /// The `k` items nearest to `query` that carry every tag of `tags`, nearest first, with
    /// their cosine.
    pub fn search(&self, query: &[f32], k: usize, tags: &[String]) -> Vec<(Uuid, f32)> {
        if self.dims == 0 || query.len() != self.dims || k == 0 {
            return Vec::new();
        }
        let mut scored: Vec<(f32, usize)> = self
            .vectors
            .chunks_exact(self.dims)
            .enumerate()
            .filter(|(i, _)| tags.iter().all(|t| self.tags[*i].contains(t)))
            .map(|(i, v)| (dot(query, v), i))
            .collect();
        let by_score = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if scored.len() > k {
            scored.select_nth_unstable_by(k - 1, by_score);
            scored.truncate(k);
        }
        scored.sort_by(by_score);
        scored.into_iter().map(|(s, i)| (self.ids[i], s)).collect()
    }
}

/// A collection's copy, shared by the searches of one worker.
pub type SharedCollection = Arc<tokio::sync::RwLock<Collection>>;

/// Every collection a worker searched, by namespace and name.
#[derive(Default)]
pub struct VectorIndex {
    collections: std::sync::Mutex<HashMap<(String, String), SharedCollection>>,
}

impl VectorIndex {
    /// The copy of collection `collection` of `namespace`, brought up to date with the store.
    pub async fn current(
        &self,
        store: &dyn MemoryStore,
        namespace: &str,
        collection: &str,
    ) -> Result<SharedCollection, String> {
        let copy = self
            .collections
            .lock()
            .expect("index lock")
            .entry((namespace.to_string(), collection.to_string()))
            .or_default()
            .clone();
        let count = store.count(namespace, collection).await?;
        if copy.read().await.len() as i64 == count {
            return Ok(copy);
        }
        let mut c = copy.write().await;
        if c.len() as i64 == count {
            return Ok(copy.clone());
        }
        catch_up(&mut c, store, namespace, collection).await?;
        // The copy holds only rows that were committed when the count below is read, so the
        // same number means the same rows.
        if c.len() as i64 != store.count(namespace, collection).await? {
            *c = Collection::default();
            catch_up(&mut c, store, namespace, collection).await?;
        }
        drop(c);
        Ok(copy)
    }
}

async fn catch_up(
    c: &mut Collection,
    store: &dyn MemoryStore,
    namespace: &str,
    collection: &str,
) -> Result<(), String> {
    loop {
        let rows = store
            .vectors_after(namespace, collection, c.last_seq, PAGE)
            .await?;
        let full = rows.len() as i64 == PAGE;
        for r in rows {
            c.push(r);
        }
        if !full {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_is_exact_and_filters_by_tags() {
        let mut c = Collection::default();
        let unit = |a: f32| vec![a.cos(), a.sin(), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        for i in 0..100 {
            c.push(VectorRow {
                seq: i + 1,
                id: Uuid::from_u128(i as u128),
                tags: if i % 2 == 0 {
                    vec!["even".into()]
                } else {
                    vec![]
                },
                embedding: unit(i as f32 * 0.01),
            });
        }
        let hits = c.search(&unit(0.302), 3, &[]);
        let ids: Vec<u128> = hits.iter().map(|h| h.0.as_u128()).collect();
        assert_eq!(ids, [30, 31, 29]);
        assert!(hits[0].1 > hits[1].1 && hits[1].1 > hits[2].1);
        let even: Vec<u128> = c
            .search(&unit(0.302), 2, &["even".into()])
            .iter()
            .map(|h| h.0.as_u128())
            .collect();
        assert_eq!(even, [30, 32]);
        assert!(c.search(&unit(0.3), 5, &["none".into()]).is_empty());
        let a: Vec<f32> = (0..19).map(|i| i as f32).collect();
        assert_eq!(dot(&a, &a), (0..19).map(|i| (i * i) as f32).sum::<f32>());
    }
}
