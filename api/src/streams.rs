//! How many SSE streams (job, run, firehose) each API key holds open on this process, capped at
//! `CAPIBARA_SSE_MAX_STREAMS_PER_KEY`: one tenant cannot hold every connection and task of a
//! replica.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use uuid::Uuid;

use crate::error::ApiError;

/// Open streams per key; cheap to clone.
#[derive(Clone)]
pub struct StreamSlots {
    max: usize,
    open: Arc<Mutex<HashMap<Uuid, usize>>>,
}

/// One open stream; dropping it (the stream ended or its client left) frees the slot.
pub struct Slot {
    key: Uuid,
    open: Arc<Mutex<HashMap<Uuid, usize>>>,
}

impl StreamSlots {
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            open: Arc::default(),
        }
    }

    /// A slot for one more stream of `key`, or a 429 when it already holds the maximum.
    pub fn acquire(&self, key: Uuid) -> Result<Slot, ApiError> {
        let mut open = self.open.lock().expect("slots lock");
        let n = open.entry(key).or_insert(0);
        if *n >= self.max {
            return Err(ApiError::RateLimited {
                retry_after: Duration::from_secs(5),
                detail: format!(
                    "this API key already holds {} open event streams on this server (the limit); close one first",
                    self.max
                ),
            });
        }
        *n += 1;
        Ok(Slot {
            key,
            open: self.open.clone(),
        })
    }

    /// Streams `key` holds open.
    pub fn open(&self, key: Uuid) -> usize {
        self.open
            .lock()
            .expect("slots lock")
            .get(&key)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("slots lock");
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_per_key_and_freed_on_drop() {
        let slots = StreamSlots::new(2);
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let first = slots.acquire(a).unwrap();
        let _second = slots.acquire(a).unwrap();
        assert!(matches!(
            slots.acquire(a),
            Err(ApiError::RateLimited { .. })
        ));
        let _other = slots.acquire(b).unwrap();
        drop(first);
        assert_eq!(slots.open(a), 1);
        assert!(slots.acquire(a).is_ok());
    }
}
