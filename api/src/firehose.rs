//! Live fan-out of the global event log to the SSE clients of `GET /v1/events`.
//!
//! One tailer task per API process follows the whole log with the gap-safe read
//! ([`store::events::read_all_tail`]), woken by the Redis stream hints ([`StreamWatch::any`])
//! and by a 100 ms fallback poll, and publishes what it read as one [`Batch`] on a
//! `tokio::sync::broadcast` channel. Each event of a batch is serialized once, as a ready SSE
//! frame shared by every client (`Bytes` clones are reference counts).
//!
//! A client ([`follow`]) subscribes first, then catches up from its cursor in Postgres
//! (filtered in SQL), then takes the live batches, skipping every event whose cursor is not
//! after its own and filtering in memory. Why this has no gap and no duplicate:
//!
//! - the tailer publishes the log contiguously in `(tx_id, position)` order from the head it
//!   found before the first subscriber subscribed;
//! - a batch published before the client subscribed was read below an earlier horizon, so the
//!   catch-up (which reads until it reaches the horizon, later) has passed it;
//! - a batch published after it is received; the cursor comparison drops what the catch-up
//!   already gave;
//! - a receiver that lags (`RecvError::Lagged`) keeps its subscription and catches up from its
//!   cursor in Postgres again.
//!
//! See docs/api.md ("The event firehose") and docs/event-store.md.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use axum::body::Bytes;
use capibara_shared::{
    domain::event::EventEnvelope,
    hints::StreamWatch,
    store::{
        self,
        events::{LogCursor, LogFilter},
        StoreError,
    },
};
use sqlx::PgPool;
use tokio::sync::{broadcast, mpsc, Notify, OnceCell};

/// Events per tailer read (and at most per batch).
const TAIL_READ: i64 = 1000;
/// Batches a receiver may fall behind before it lags and catches up from Postgres (default of
/// `CAPIBARA_FIREHOSE_BUFFER`; tests set it tiny to exercise the lag path).
const CHANNEL_BATCHES: usize = 1024;
/// Frames queued for one client's socket (at most; never more than the live buffer, so a
/// reader that stops reading blocks its task and lags by the same measure).
const CLIENT_QUEUE: usize = 256;
/// Fallback poll when no hint arrives.
const POLL: Duration = Duration::from_millis(100);
/// Least time between two reads: under a stream of commits, events are published in batches
/// of at least this span instead of one batch per hint, which divides the writes to every client
/// (the cost of fan-out) without delaying a lone event.
const MIN_GAP: Duration = Duration::from_millis(5);
/// First re-read while committed events wait behind a running transaction (then doubling).
const RETRY_MIN: Duration = MIN_GAP;
/// Events a catch-up read returns, and rows it scans at most.
const CATCH_UP_LIMIT: i64 = 500;
const CATCH_UP_SCAN: i64 = 5000;
/// Keep-alive comment after this long without a frame.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// One event as the tailer read it, with its SSE frame rendered once.
#[derive(Debug)]
pub struct LiveEvent {
    pub cursor: LogCursor,
    pub envelope: EventEnvelope,
    /// `id: …\nevent: …\ndata: <envelope JSON>\n\n`.
    pub frame: Bytes,
}

/// What the tailer publishes: the events of one read, in log order.
pub type Batch = Arc<Vec<LiveEvent>>;

/// The SSE frame of one envelope (`id` = envelope id, `event` = type, `data` = envelope JSON;
/// compact JSON has no raw newline, so one `data:` line).
pub fn frame(e: &EventEnvelope) -> Bytes {
    let data = serde_json::to_string(e).unwrap_or_default();
    let mut s = String::with_capacity(data.len() + e.id.len() + e.event_type.len() + 24);
    s.push_str("id: ");
    s.push_str(&e.id);
    s.push_str("\nevent: ");
    s.push_str(&e.event_type);
    s.push_str("\ndata: ");
    s.push_str(&data);
    s.push_str("\n\n");
    Bytes::from(s)
}

/// Handle on this process's tailer; cheap to clone. The tailer starts with the first
/// subscriber.
#[derive(Clone)]
pub struct Firehose {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    wake: Arc<Notify>,
    tx: broadcast::Sender<Batch>,
    /// The cursor of the last event published (sent and updated under this lock, so a
    /// subscriber learns exactly which batches it will receive).
    published: Mutex<LogCursor>,
    started: OnceCell<()>,
    client_queue: usize,
}

impl Firehose {
    pub fn new(pool: PgPool, watch: &StreamWatch) -> Firehose {
        let batches = std::env::var("CAPIBARA_FIREHOSE_BUFFER")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| *n > 0)
            .unwrap_or(CHANNEL_BATCHES);
        let (tx, _) = broadcast::channel(batches);
        Firehose {
            inner: Arc::new(Inner {
                pool,
                wake: watch.any(),
                tx,
                published: Mutex::new(LogCursor::default()),
                started: OnceCell::new(),
                client_queue: batches.min(CLIENT_QUEUE),
            }),
        }
    }

    /// Capacity of the frame queue between one client's [`follow`] task and its socket.
    pub fn client_queue(&self) -> usize {
        self.inner.client_queue
    }

    /// Subscribe to the live batches. Returns the receiver and the cursor of the last event
    /// published before it: every event after that cursor will arrive on the receiver (or, if
    /// it lags, can be read from Postgres after the caller's own cursor).
    pub async fn subscribe(&self) -> Result<(broadcast::Receiver<Batch>, LogCursor), StoreError> {
        self.inner
            .started
            .get_or_try_init(|| async {
                let head = store::events::head(&self.inner.pool).await?;
                *self.inner.published.lock().expect("firehose lock") = head;
                tokio::spawn(tail(Arc::downgrade(&self.inner), head));
                Ok::<(), StoreError>(())
            })
            .await?;
        let published = self.inner.published.lock().expect("firehose lock");
        Ok((self.inner.tx.subscribe(), *published))
    }

    /// SSE clients connected to this process.
    pub fn subscribers(&self) -> usize {
        self.inner.tx.receiver_count()
    }

    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }
}

/// The tailer: follows the log from `cursor` until the firehose is dropped.
///
/// A hint arrives right after its transaction committed, but the gap-safe read only returns it
/// once every older transaction has ended too; such a transaction (a worker's claim, a lease
/// update) may publish no hint of its own. When committed events wait behind one
/// (`TailRead::pending`), the tailer re-reads after 5, 10, 20, … ms (up to the 100 ms poll)
/// instead of waiting for the next hint or the poll.
async fn tail(inner: Weak<Inner>, mut cursor: LogCursor) {
    let mut retry = RETRY_MIN;
    let mut last_read = tokio::time::Instant::now();
    loop {
        tokio::time::sleep_until(last_read + MIN_GAP).await;
        last_read = tokio::time::Instant::now();
        let Some(me) = inner.upgrade() else { return };
        let wake = me.wake.clone();
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let read = match store::events::read_all_tail(&me.pool, cursor, TAIL_READ).await {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(error = %e, "firehose tailer read failed; retrying");
                drop(me);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let full = read.events.len() as i64 == TAIL_READ;
        let progressed = !read.events.is_empty();
        if let Some((last, _)) = read.events.last() {
            cursor = *last;
            let batch: Vec<LiveEvent> = read
                .events
                .into_iter()
                .map(|(cursor, envelope)| LiveEvent {
                    cursor,
                    frame: frame(&envelope),
                    envelope,
                })
                .collect();
            metrics::counter!("capibara_firehose_events_total").increment(batch.len() as u64);
            metrics::counter!("capibara_firehose_batches_total").increment(1);
            let mut published = me.published.lock().expect("firehose lock");
            // No receiver is not an error: the batch is simply not kept.
            let _ = me.tx.send(Arc::new(batch));
            *published = cursor;
        }
        metrics::gauge!("capibara_firehose_subscribers").set(me.tx.receiver_count() as f64);
        drop(me);
        if full {
            continue;
        }
        let wait = if !read.pending {
            retry = RETRY_MIN;
            POLL
        } else if progressed {
            retry = RETRY_MIN;
            retry
        } else {
            let w = retry;
            retry = (retry * 2).min(POLL);
            w
        };
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Where a client starts.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    /// After this cursor (resume: `Last-Event-ID` / `?after=`).
    After(LogCursor),
    /// Live events only, from the moment of subscribing.
    Now,
}

/// A frame for the client, or a keep-alive comment.
pub type Frame = Result<Bytes, Infallible>;

/// Follow the log for one client: catch up from `start`, then live; sends SSE frames on `out`
/// until the client goes away. `rx`/`published` come from [`Firehose::subscribe`], called before
/// the response was sent.
pub async fn follow(
    pool: PgPool,
    filter: LogFilter,
    start: Start,
    mut rx: broadcast::Receiver<Batch>,
    published: LogCursor,
    out: mpsc::Sender<Frame>,
) {
    let (mut cursor, mut catch_up) = match start {
        Start::After(c) => (c, true),
        Start::Now => (published, false),
    };
    let keep_alive = tokio::time::sleep(KEEP_ALIVE);
    tokio::pin!(keep_alive);
    loop {
        if catch_up {
            match catch_up_from(&pool, &filter, &mut cursor, &out).await {
                CatchUp::Done => catch_up = false,
                CatchUp::Gone => return,
            }
            keep_alive
                .as_mut()
                .reset(tokio::time::Instant::now() + KEEP_ALIVE);
        }
        tokio::select! {
            r = rx.recv() => match r {
                Ok(batch) => {
                    // One write for the batch: the shared frame itself when one event
                    // matches, else the matching frames copied together.
                    let mut one: Option<&Bytes> = None;
                    let mut many: Option<Vec<u8>> = None;
                    for ev in batch.iter() {
                        if ev.cursor <= cursor {
                            continue;
                        }
                        cursor = ev.cursor;
                        if !filter.matches(&ev.envelope) {
                            continue;
                        }
                        match (&mut many, one.take()) {
                            (Some(m), _) => m.extend_from_slice(&ev.frame),
                            (None, None) => one = Some(&ev.frame),
                            (None, Some(first)) => {
                                let mut m = Vec::with_capacity(first.len() * 4);
                                m.extend_from_slice(first);
                                m.extend_from_slice(&ev.frame);
                                many = Some(m);
                            }
                        }
                    }
                    let chunk = match (many, one) {
                        (Some(m), _) => Some(Bytes::from(m)),
                        (None, Some(f)) => Some(f.clone()),
                        (None, None) => None,
                    };
                    let sent = chunk.is_some();
                    if let Some(chunk) = chunk {
                        if out.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                    }
                    if sent {
                        keep_alive.as_mut().reset(tokio::time::Instant::now() + KEEP_ALIVE);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(missed_batches = n, "firehose client lagged; catching up from Postgres");
                    metrics::counter!("capibara_firehose_lagged_total").increment(1);
                    catch_up = true;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = &mut keep_alive => {
                if out.send(Ok(Bytes::from_static(b":\n\n"))).await.is_err() {
                    return;
                }
                keep_alive.as_mut().reset(tokio::time::Instant::now() + KEEP_ALIVE);
            }
            _ = out.closed() => return,
        }
    }
}

enum CatchUp {
    Done,
    Gone,
}

/// Read (filtered) from Postgres after `cursor` until the horizon, sending each match.
async fn catch_up_from(
    pool: &PgPool,
    filter: &LogFilter,
    cursor: &mut LogCursor,
    out: &mpsc::Sender<Frame>,
) -> CatchUp {
    loop {
        let page = match store::events::read_all_filtered(
            pool,
            *cursor,
            filter,
            CATCH_UP_LIMIT,
            CATCH_UP_SCAN,
        )
        .await
        {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "firehose catch-up read failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = out.closed() => return CatchUp::Gone,
                }
            }
        };
        for (_, e) in &page.events {
            if out.send(Ok(frame(e))).await.is_err() {
                return CatchUp::Gone;
            }
        }
        *cursor = page.next;
        if page.at_end {
            return CatchUp::Done;
        }
    }
}
