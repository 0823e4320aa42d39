//! Wake-ups for readers waiting on a stream (SSE followers, `Prefer: wait`).
//!
//! The appender publishes the ids of changed streams on a Redis channel after each commit (never
//! `NOTIFY` inside the write transaction: research/event-store.md). One subscriber task per
//! process wakes the local waiters of those streams. Hints are only hints: a waiter re-reads
//! Postgres when woken and also on a short timer, so a lost message costs latency, not events.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use futures::StreamExt;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::queue::Queue;

/// Registry of local waiters per stream; cheap to clone.
#[derive(Clone, Default)]
pub struct StreamWatch {
    waiters: Arc<Mutex<HashMap<Uuid, Weak<Notify>>>>,
    /// Notified on every hint, whatever the streams (followers of the whole log).
    any: Arc<Notify>,
}

impl StreamWatch {
    /// Start following the hints channel of `queue` (reconnects on its own).
    pub fn start(queue: &Queue) -> StreamWatch {
        let watch = StreamWatch::default();
        let redis = queue.redis().clone();
        let channel = queue.hints_channel();
        let w = watch.clone();
        tokio::spawn(async move {
            loop {
                match redis.pubsub().await {
                    Ok(mut pubsub) => {
                        if pubsub.subscribe(&channel).await.is_ok() {
                            let mut messages = pubsub.on_message();
                            while let Some(msg) = messages.next().await {
                                let payload: String = msg.get_payload().unwrap_or_default();
                                w.wake(payload.split(',').filter_map(|s| s.parse().ok()));
                                w.any.notify_waiters();
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "hints subscription failed; retrying"),
                }
                // Wake everyone: hints may have been missed while disconnected.
                w.wake_all();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        watch
    }

    /// The notifier for one stream; keep it while waiting.
    pub fn watch(&self, stream_id: Uuid) -> Arc<Notify> {
        let mut map = self.waiters.lock().expect("watch lock");
        if let Some(n) = map.get(&stream_id).and_then(Weak::upgrade) {
            return n;
        }
        if map.len() > 1024 {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let n = Arc::new(Notify::new());
        map.insert(stream_id, Arc::downgrade(&n));
        n
    }

    /// Wake the waiters of these streams.
    pub fn wake(&self, ids: impl IntoIterator<Item = Uuid>) {
        let map = self.waiters.lock().expect("watch lock");
        for id in ids {
            if let Some(n) = map.get(&id).and_then(Weak::upgrade) {
                n.notify_waiters();
            }
        }
    }

    /// Notified (`notify_waiters`) on every hint message and whenever hints may have been
    /// missed; for readers that follow the whole log. Enable the `notified()` future before
    /// reading, as with [`StreamWatch::watch`].
    pub fn any(&self) -> Arc<Notify> {
        self.any.clone()
    }

    fn wake_all(&self) {
        self.any.notify_waiters();
        let map = self.waiters.lock().expect("watch lock");
        for n in map.values().filter_map(Weak::upgrade) {
            n.notify_waiters();
        }
    }
}
