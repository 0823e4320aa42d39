//! Requests of concurrent jobs merged into shared model passes. A model reads 32 texts in one
//! pass for little more than it reads one (the matrix products fill the cores), so one-text jobs
//! that arrive together (an application classifying each message as it comes) are run
//! together: while a pass runs, the requests that arrive wait, and the next pass takes them all
//! (up to [`MAX_TEXTS`]). A request that arrives when nothing runs starts at once, so a lone
//! job waits for nothing.
//!
//! Requests are merged per key (the encoder's token limit, a model version): one pass at a time
//! per key; different keys run side by side.

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
    sync::{Arc, Mutex},
};

use tokio::sync::oneshot;

/// Most texts one merged pass takes (a larger request runs alone).
pub const MAX_TEXTS: usize = 32;

/// What a pass computes: one result per text, in order.
pub type Work<T> = Arc<dyn Fn(&[String]) -> Result<Vec<T>, String> + Send + Sync>;

type Reply<T> = oneshot::Sender<Result<Vec<T>, String>>;

struct Lane<T> {
    waiting: VecDeque<(Vec<String>, Reply<T>)>,
    running: bool,
}

/// The requests waiting per key, and whether a pass of that key is running.
pub struct Coalescer<K, T> {
    lanes: Mutex<HashMap<K, Lane<T>>>,
}

impl<K, T> Default for Coalescer<K, T> {
    fn default() -> Self {
        Coalescer {
            lanes: Mutex::new(HashMap::new()),
        }
    }
}

impl<K, T> Coalescer<K, T>
where
    K: Hash + Eq + Clone + Send + 'static,
    T: Send + 'static,
{
    /// `work` over `texts`, in a pass shared with the other requests of `key` waiting with it.
    /// `work` must compute the same thing for every request of a key (it is the key's): the
    /// pass that runs may be another request's.
    pub async fn run(
        self: &Arc<Self>,
        key: K,
        texts: Vec<String>,
        work: Work<T>,
    ) -> Result<Vec<T>, String> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut lanes = self.lanes.lock().expect("coalescer lock");
            let lane = lanes.entry(key.clone()).or_insert_with(|| Lane {
                waiting: VecDeque::new(),
                running: false,
            });
            lane.waiting.push_back((texts, reply));
            !std::mem::replace(&mut lane.running, true)
        };
        if start {
            // Passes run on their own task, so that a request whose job stops waiting (a
            // cancel) does not stop the others' pass.
            tokio::spawn(self.clone().drain(key, work));
        }
        answer
            .await
            .map_err(|_| "the model pass stopped".to_string())?
    }

    /// Run passes of `key` until nothing waits.
    async fn drain(self: Arc<Self>, key: K, work: Work<T>) {
        loop {
            let batch = {
                let mut lanes = self.lanes.lock().expect("coalescer lock");
                let Some(lane) = lanes.get_mut(&key) else {
                    return;
                };
                let mut batch = Vec::new();
                let mut texts = 0;
                while let Some((t, _)) = lane.waiting.front() {
                    if !batch.is_empty() && texts + t.len() > MAX_TEXTS {
                        break;
                    }
                    texts += t.len();
                    batch.push(lane.waiting.pop_front().expect("a front"));
                }
                if batch.is_empty() {
                    lanes.remove(&key);
                    return;
                }
                batch
            };
            let work = work.clone();
            tracing::debug!(
                requests = batch.len(),
                texts = batch.iter().map(|(t, _)| t.len()).sum::<usize>(),
                "model pass"
            );
            let done = tokio::task::spawn_blocking(move || pass(&work, batch)).await;
            if let Err(e) = done {
                // The pass panicked: its requests' senders are dropped, and they fail; the
                // lane goes on with the next ones.
                tracing::error!(error = %e, "a merged model pass panicked");
            }
        }
    }
}

/// One pass over the texts of `batch`, each request answered with its own results. When a
/// merged pass fails, each request runs alone, so one bad request fails only itself.
fn pass<T>(work: &Work<T>, batch: Vec<(Vec<String>, Reply<T>)>) {
    let answer_alone = |batch: Vec<(Vec<String>, Reply<T>)>| {
        for (texts, reply) in batch {
            let _ = reply.send(work(&texts));
        }
    };
    if batch.len() == 1 {
        return answer_alone(batch);
    }
    let all: Vec<String> = batch.iter().flat_map(|(t, _)| t.iter().cloned()).collect();
    match work(&all) {
        Ok(results) if results.len() == all.len() => {
            let mut results = results.into_iter();
            for (texts, reply) in batch {
                let _ = reply.send(Ok(results.by_ref().take(texts.len()).collect()));
            }
        }
        _ => answer_alone(batch),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn requests_that_wait_together_share_a_pass_and_get_their_own_results() {
        let passes = Arc::new(Mutex::new(Vec::<usize>::new()));
        let seen = passes.clone();
        let work: Work<String> = Arc::new(move |texts: &[String]| {
            seen.lock().unwrap().push(texts.len());
            std::thread::sleep(std::time::Duration::from_millis(50));
            if texts.iter().any(|t| t == "bad") {
                return Err("bad text".into());
            }
            Ok(texts.iter().map(|t| t.to_uppercase()).collect())
        });
        let c = Arc::new(Coalescer::<u32, String>::default());
        let jobs = (0..40).map(|i| {
            let (c, work) = (c.clone(), work.clone());
            let texts = if i == 7 {
                vec!["bad".to_string()]
            } else {
                vec![format!("t{i}"), format!("u{i}")]
            };
            tokio::spawn(async move { (i, c.run(1, texts, work).await) })
        });
        for done in futures::future::join_all(jobs).await {
            let (i, r) = done.unwrap();
            if i == 7 {
                assert_eq!(r, Err("bad text".into()));
            } else {
                assert_eq!(r, Ok(vec![format!("T{i}"), format!("U{i}")]));
            }
        }
        let passes = passes.lock().unwrap().clone();
        // The requests that waited went in passes of at most 32 texts; the pass holding the
        // bad one failed and its requests ran alone.
        assert!(passes.iter().all(|n| *n <= MAX_TEXTS), "{passes:?}");
        assert!(passes.iter().any(|n| *n >= 16), "{passes:?}");
        assert!(passes.len() < 40, "{passes:?}");
        // The last pass answers before its task drops the lane: wait for it (at most 1 s).
        for _ in 0..100 {
            if c.lanes.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(
            c.lanes.lock().unwrap().is_empty(),
            "lanes are dropped when idle"
        );
    }

    #[tokio::test]
    async fn a_lone_request_runs_at_once_and_keys_do_not_mix() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let work = |suffix: &'static str| -> Work<String> {
            let counted = counted.clone();
            Arc::new(move |texts: &[String]| {
                counted.fetch_add(1, Ordering::SeqCst);
                Ok(texts.iter().map(|t| format!("{t}{suffix}")).collect())
            })
        };
        let c = Arc::new(Coalescer::<&str, String>::default());
        let a = c.run("a", vec!["x".into()], work("-a")).await;
        let b = c.run("b", vec!["x".into()], work("-b")).await;
        assert_eq!(a, Ok(vec!["x-a".to_string()]));
        assert_eq!(b, Ok(vec!["x-b".to_string()]));
        assert_eq!(c.run("a", vec![], work("-a")).await, Ok(vec![]));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
