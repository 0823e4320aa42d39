//! Job projection queries, and [`job_append`] which turns job events into an [`Append`].

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::{
    append::CommandRecord,
    dispatch::{DispatchEntry, Release},
    lease::Lease,
    Append, Effect, Expected, NewEvent, StoreError,
};
use crate::domain::{
    event::{EventMetadata, StreamType},
    job::{Follow, InvalidTransition, Job, JobEvent, JobStatus, Submission},
    DomainEvent, FieldError,
};
use crate::queue::Popped;

/// Upsert of whole rows from a JSON array of [`Job`]s (column names = field names).
pub const UPSERT_JOBS: &str = "
INSERT INTO jobs SELECT * FROM jsonb_populate_recordset(NULL::jobs, $1)
ON CONFLICT (id) DO UPDATE SET
    namespace = EXCLUDED.namespace, kind = EXCLUDED.kind, queue = EXCLUDED.queue,
    priority = EXCLUDED.priority, status = EXCLUDED.status, input = EXCLUDED.input,
    output = EXCLUDED.output, error = EXCLUDED.error, progress = EXCLUDED.progress,
    tags = EXCLUDED.tags, attempt = EXCLUDED.attempt, max_attempts = EXCLUDED.max_attempts,
    timeout_s = EXCLUDED.timeout_s, backoff = EXCLUDED.backoff, callback_url = EXCLUDED.callback_url,
    callback_events = EXCLUDED.callback_events,
    run_at = EXCLUDED.run_at, cancel_requested = EXCLUDED.cancel_requested,
    worker_id = EXCLUDED.worker_id, artifacts = EXCLUDED.artifacts, version = EXCLUDED.version,
    created_at = EXCLUDED.created_at, queued_at = EXCLUDED.queued_at,
    started_at = EXCLUDED.started_at, finished_at = EXCLUDED.finished_at,
    updated_at = EXCLUDED.updated_at, expires_at = EXCLUDED.expires_at,
    deadline_at = EXCLUDED.deadline_at, ordering_key = EXCLUDED.ordering_key,
    waiting = EXCLUDED.waiting, debounce_key = EXCLUDED.debounce_key";

/// Context for turning job events into an append.
#[derive(Debug, Clone)]
pub struct JobWrite {
    pub metadata: EventMetadata,
    pub at: DateTime<Utc>,
    pub command: Option<CommandRecord>,
    /// When the events start an attempt: the worker and how long its lease lasts.
    pub lease: Option<(String, Duration)>,
    /// When the attempt really started, if `JobStarted` is recorded later than that (a worker
    /// reports a fast attempt's start and end in one append).
    pub started_at: Option<DateTime<Utc>>,
}

impl JobWrite {
    pub fn new(metadata: EventMetadata, at: DateTime<Utc>) -> Self {
        Self {
            metadata,
            at,
            command: None,
            lease: None,
            started_at: None,
        }
    }
}

/// The append that creates job `id` from `sub` (its events: [`Submission::into_events`]): the
/// one way the workflow runner, the ticker, hooks and deliveries submit a job (the API adds
/// its idempotency record to the same write).
pub fn submit_append(
    id: Uuid,
    sub: Submission,
    metadata: EventMetadata,
    at: DateTime<Utc>,
) -> Result<Append, StoreError> {
    job_append(None, id, &sub.into_events(at), JobWrite::new(metadata, at))
        .map(|(_, a)| a)
        .map_err(|e| StoreError::Internal(e.to_string()))
}

/// Apply `events` to `prev` (or start a new job from `JobSubmitted`) and build the append:
/// the events, the new `jobs` row, and the dispatch/lease rows of what the domain says follows
/// the status change ([`Job::follows`]).
pub fn job_append(
    prev: Option<&Job>,
    id: Uuid,
    events: &[JobEvent],
    w: JobWrite,
) -> Result<(Job, Append), InvalidTransition> {
    let at = |e: &JobEvent| match (e, w.started_at) {
        (JobEvent::JobStarted { .. }, Some(t)) => t,
        _ => w.at,
    };
    // A new job continues the trace of what submits it (the request, or the attempt that makes
    // it), unless its submission names one.
    let filled;
    let events = match (prev, events.first()) {
        (None, Some(JobEvent::JobSubmitted(s))) if s.traceparent.is_none() => {
            match crate::trace_context::current() {
                Some(tp) => {
                    let mut s = s.clone();
                    s.traceparent = Some(tp);
                    filled = [&[JobEvent::JobSubmitted(s)], &events[1..]].concat();
                    filled.as_slice()
                }
                None => events,
            }
        }
        _ => events,
    };
    let new = match prev {
        Some(p) => {
            let mut j = p.clone();
            for e in events {
                j.apply(e, at(e))?;
            }
            j
        }
        None => Job::replay(id, &w.metadata.namespace, events.iter().map(|e| (e, at(e))))?.ok_or(
            InvalidTransition {
                event: "none",
                status: JobStatus::Queued,
            },
        )?,
    };
    let mut metadata = w.metadata.clone();
    metadata.kind = Some(new.kind.clone());
    metadata.tags = (!new.tags.is_empty()).then(|| new.tags.clone());
    if new.run_id.is_some() {
        // Step jobs name their run, so the orchestrator finds them in the log without a lookup.
        metadata.correlation_id = new.run_id;
    }
    let mut effects = vec![match new.deleted {
        true => Effect::DeleteJob(new.id),
        false => Effect::UpsertJob(Box::new(new.clone())),
    }];
    // What follows the status change is the domain's decision; here it becomes rows.
    for follow in new.follows(prev.map(|p| p.status), w.at) {
        effects.push(match follow {
            Follow::Dispatch { since } => Effect::Dispatch(DispatchEntry::of(&new, since)),
            Follow::Undispatch => Effect::Undispatch(new.id),
            Follow::GrantLease => {
                let (worker, term) = w
                    .lease
                    .clone()
                    .unwrap_or_else(|| ("unknown".into(), Duration::from_secs(30)));
                Effect::Lease(Lease::grant(
                    &new,
                    worker,
                    term,
                    w.started_at.unwrap_or(w.at),
                    w.at,
                ))
            }
            Follow::ReleaseLease => Effect::ReleaseLease(new.id),
        });
    }
    if let Some(release) = release(prev, &new, events) {
        effects.push(Effect::Release(release));
    }
    let append = Append {
        stream_id: id,
        stream_type: StreamType::Job,
        namespace: w.metadata.namespace.clone(),
        expected: match prev {
            Some(p) => Expected::Version(p.version),
            None => Expected::NoStream,
        },
        events: events
            .iter()
            .map(|e| {
                let (t, data) = e.to_parts();
                NewEvent {
                    event_type: t.to_string(),
                    data,
                    recorded_at: Some(at(e)).filter(|t| *t != w.at),
                }
            })
            .collect(),
        metadata,
        recorded_at: w.at,
        command: w.command,
        effects,
    };
    Ok((new, append))
}

/// What the queue gives back after this change (docs/flow-control.md): the limits' slots of an
/// attempt that ended, the ordering key of a job that ended, and with a `rate_limited` failure
/// the rate limits' keys wait until its `retry_at`.
fn release(prev: Option<&Job>, new: &Job, events: &[JobEvent]) -> Option<Release> {
    let was = prev?.status;
    // A fast attempt records its start and its end in one append: it ran too.
    let ran = was == JobStatus::Running
        || events
            .iter()
            .any(|e| matches!(e, JobEvent::JobStarted { .. }));
    let left_running = ran && new.status != JobStatus::Running;
    let ended = new.status.is_terminal() && !was.is_terminal();
    if !(left_running || ended) {
        return None;
    }
    let group = crate::flow::group_of(new);
    if !group.holds() {
        return None;
    }
    let backoff_until_ms = events.iter().find_map(|e| match e {
        JobEvent::JobAttemptFailed {
            error,
            retry_at: Some(t),
            ..
        } if error.error_type == "rate_limited"
            || error.details.as_ref().is_some_and(|d| d["status"] == 429) =>
        {
            Some(t.timestamp_millis())
        }
        _ => None,
    });
    Some(Release {
        job_id: new.id,
        lane: crate::domain::kinds::lane(&new.queue, &new.namespace, &new.kind),
        group: group.id(),
        terminal: new.status.is_terminal(),
        backoff_until_ms,
    })
}

/// A `to_jsonb(j)` of `jobs`, decoded straight from the row's bytes into a [`Job`] (not through
/// a `serde_json::Value` tree: that was most of a lease call's read of its jobs).
pub(crate) type JobRow = (sqlx::types::Json<Job>,);

/// One job of a namespace.
pub async fn get(pool: &PgPool, namespace: &str, id: Uuid) -> Result<Option<Job>, StoreError> {
    let row: Option<JobRow> =
        sqlx::query_as("SELECT to_jsonb(j) FROM jobs j WHERE id = $1 AND namespace = $2")
            .bind(id)
            .bind(namespace)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|(j,)| j.0))
}

/// The job waiting out its delay under `debounce_key` in `namespace`, if any (at most one: a
/// unique index).
pub async fn pending_debounce(
    pool: &PgPool,
    namespace: &str,
    debounce_key: &str,
) -> Result<Option<Job>, StoreError> {
    let row: Option<JobRow> =
        sqlx::query_as("SELECT to_jsonb(j) FROM jobs j WHERE namespace = $1 AND debounce_key = $2")
            .bind(namespace)
            .bind(debounce_key)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|(j,)| j.0))
}

/// Jobs by id, any namespace (workers, housekeeping).
pub async fn get_many<'c>(
    db: impl sqlx::PgExecutor<'c>,
    ids: &[Uuid],
) -> Result<Vec<Job>, StoreError> {
    let rows: Vec<JobRow> = sqlx::query_as("SELECT to_jsonb(j) FROM jobs j WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(db)
        .await?;
    Ok(rows.into_iter().map(|(j,)| j.0).collect())
}

/// The jobs `popped` names as they stand, in the pop's order (an id with no row is left out).
/// A copy that rode with its pop is the job when it is at the job's current version: one read
/// of the versions instead of the rows, and a row is read only for a job without a copy or
/// whose copy an append has passed since its dispatch.
pub async fn as_they_stand(db: &PgPool, popped: Popped) -> Result<Vec<Job>, StoreError> {
    let Popped {
        ids, mut carried, ..
    } = popped;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let versions: HashMap<Uuid, i64> =
        sqlx::query_as::<_, (Uuid, i64)>("SELECT id, version FROM jobs WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(db)
            .await?
            .into_iter()
            .collect();
    let mut jobs: HashMap<Uuid, Job> = HashMap::with_capacity(ids.len());
    let mut read = Vec::new();
    for id in ids.iter().filter(|id| versions.contains_key(id)) {
        match carried.remove(id) {
            Some(copy) if Some(&copy.version) == versions.get(id) => {
                jobs.insert(*id, copy);
            }
            _ => read.push(*id),
        }
    }
    if !read.is_empty() {
        jobs.extend(get_many(db, &read).await?.into_iter().map(|j| (j.id, j)));
    }
    Ok(ids.iter().filter_map(|id| jobs.remove(id)).collect())
}

/// One job by id, any namespace.
pub async fn get_any(pool: &PgPool, id: Uuid) -> Result<Option<Job>, StoreError> {
    Ok(get_many(pool, &[id]).await?.into_iter().next())
}

/// Filters of `GET /v1/jobs` and of bulk actions (set field by field with [`JobFilter::set`]).
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub status: Option<JobStatus>,
    pub kind: Option<String>,
    pub queue: Option<String>,
    pub tags: Vec<(String, String)>,
    /// Only jobs with an id below this (cursor; ids are time-ordered UUIDv7).
    pub before: Option<Uuid>,
    /// JSON the job's input (output) contains (`@>`).
    pub input: Option<Value>,
    pub output: Option<Value>,
    /// `created_at` in [after, before).
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
    /// `finished_at` in [after, before).
    pub finished_after: Option<DateTime<Utc>>,
    pub finished_before: Option<DateTime<Utc>>,
    /// The error's `type`.
    pub error_type: Option<String>,
    /// The worker that ran (or runs) its last attempt.
    pub worker: Option<String>,
}

impl JobFilter {
    /// The filter fields, as `GET /v1/jobs` names them (for error messages).
    pub const FIELDS: &'static str = "status, kind, queue, tag, input.<path>, output.<path>, \
                                      created_after, created_before, finished_after, \
                                      finished_before, error_type, worker";

    /// Set the filter field `name` (a query parameter of `GET /v1/jobs`, or a key of a bulk
    /// action's `filter`) to `value`. `input.<path>` and `output.<path>` take any JSON value (the
    /// leaf of a containment); the others a string. `Ok(false)`: `name` is not a filter field.
    pub fn set(&mut self, name: &str, value: &Value) -> Result<bool, FieldError> {
        if let Some((root @ ("input" | "output"), path)) = name.split_once('.') {
            let target = if root == "input" {
                &mut self.input
            } else {
                &mut self.output
            };
            contains(target, name, path, value.clone())?;
            return Ok(true);
        }
        let known = [
            "status",
            "kind",
            "queue",
            "tag",
            "created_after",
            "created_before",
            "finished_after",
            "finished_before",
            "error_type",
            "worker",
        ];
        if !known.contains(&name) {
            return Ok(false);
        }
        let Value::String(v) = value else {
            return Err(FieldError::new(name, "must be a string"));
        };
        let v = v.clone();
        match name {
            "status" => {
                self.status = Some(v.parse().map_err(|e: String| FieldError::new(name, e))?)
            }
            "kind" => self.kind = Some(v),
            "queue" => self.queue = Some(v),
            "tag" => {
                let (tk, tv) = v
                    .split_once(':')
                    .ok_or_else(|| FieldError::new(name, "must look like key:value"))?;
                self.tags.push((tk.to_string(), tv.to_string()));
            }
            "created_after" => self.created_after = Some(filter_time(name, &v)?),
            "created_before" => self.created_before = Some(filter_time(name, &v)?),
            "finished_after" => self.finished_after = Some(filter_time(name, &v)?),
            "finished_before" => self.finished_before = Some(filter_time(name, &v)?),
            "error_type" => self.error_type = Some(v),
            _ => self.worker = Some(v),
        }
        Ok(true)
    }

    /// A filter given as a JSON object (a bulk action's `filter`): the keys are the query
    /// parameters of `GET /v1/jobs`, except that `tag` is a list and `input` and `output` are
    /// the JSON the job's input (output) contains. Errors name `filter.<key>`.
    pub fn from_json(filter: &Value) -> Result<JobFilter, FieldError> {
        let Value::Object(map) = filter else {
            return Err(FieldError::new("filter", "must be an object"));
        };
        let mut f = JobFilter::default();
        for (k, v) in map {
            let under = |e: FieldError| FieldError::new(format!("filter.{}", e.field), e.message);
            if k == "input" || k == "output" {
                let target = if k == "input" {
                    &mut f.input
                } else {
                    &mut f.output
                };
                *target = Some(v.clone());
                continue;
            }
            let values = match (k.as_str(), v) {
                ("tag", Value::Array(tags)) => tags.iter().collect(),
                _ => vec![v],
            };
            for v in values {
                if !f.set(k, v).map_err(under)? {
                    return Err(FieldError::new(
                        format!("filter.{k}"),
                        format!("unknown filter field (one of {})", JobFilter::FIELDS),
                    ));
                }
            }
        }
        Ok(f)
    }

    /// Whether no field is set (every job matches).
    pub fn is_empty(&self) -> bool {
        self.status.is_none()
            && self.kind.is_none()
            && self.queue.is_none()
            && self.tags.is_empty()
            && self.input.is_none()
            && self.output.is_none()
            && self.created_after.is_none()
            && self.created_before.is_none()
            && self.finished_after.is_none()
            && self.finished_before.is_none()
            && self.error_type.is_none()
            && self.worker.is_none()
    }

    /// The tags as one JSON object for `@>` (`None` when there are none).
    fn tags_json(&self) -> Option<Value> {
        (!self.tags.is_empty()).then(|| {
            Value::Object(
                self.tags
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect(),
            )
        })
    }
}

/// An RFC 3339 time of a filter.
fn filter_time(name: &str, v: &str) -> Result<DateTime<Utc>, FieldError> {
    let t = DateTime::parse_from_rfc3339(v)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| FieldError::new(name, "must be an RFC 3339 time (2026-12-05T08:00:00Z)"))?;
    crate::domain::storable::check_time(name, t)?;
    Ok(t)
}

/// Add `path = leaf` to a containment filter: `input.customer.id=42` → `{"customer": {"id":
/// 42}}`.
fn contains(
    filter: &mut Option<Value>,
    name: &str,
    path: &str,
    leaf: Value,
) -> Result<(), FieldError> {
    let keys: Vec<&str> = path.split('.').collect();
    if keys.len() > 16 || keys.iter().any(|k| k.is_empty() || k.chars().count() > 128) {
        return Err(FieldError::new(
            name,
            "must be a path of 1-16 dot-separated keys (input.customer.id=42)",
        ));
    }
    let mut node = filter.get_or_insert_with(|| Value::Object(Default::default()));
    for (i, key) in keys.iter().enumerate() {
        let Value::Object(map) = node else {
            return Err(FieldError::new(
                name,
                "conflicts with another filter on the same path",
            ));
        };
        if i + 1 == keys.len() {
            if map.insert(key.to_string(), leaf).is_some() {
                return Err(FieldError::new(name, "is given twice"));
            }
            return Ok(());
        }
        node = map
            .entry(key.to_string())
            .or_insert_with(|| Value::Object(Default::default()));
    }
    Ok(())
}

/// The conditions of a [`JobFilter`] on `jobs j`, with parameters `$1` (namespace) to `$13`;
/// [`bind_filter`] binds them in this order.
pub(crate) const FILTER_WHERE: &str = "
    j.namespace = $1
    AND ($2::text IS NULL OR j.status = $2)
    AND ($3::text IS NULL OR j.kind = $3)
    AND ($4::text IS NULL OR j.queue = $4)
    AND ($5::jsonb IS NULL OR (j.tags <> '{}'::jsonb AND j.tags @> $5))
    AND ($6::jsonb IS NULL OR j.input @> $6)
    AND ($7::jsonb IS NULL OR j.output @> $7)
    AND ($8::timestamptz IS NULL OR j.created_at >= $8)
    AND ($9::timestamptz IS NULL OR j.created_at < $9)
    AND ($10::timestamptz IS NULL OR j.finished_at >= $10)
    AND ($11::timestamptz IS NULL OR j.finished_at < $11)
    AND ($12::text IS NULL OR j.error->>'type' = $12)
    AND ($13::text IS NULL OR j.worker_id = $13)";

/// Bind `$1`-`$13` of [`FILTER_WHERE`].
pub(crate) fn bind_filter<'q, O>(
    q: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    namespace: &'q str,
    f: &'q JobFilter,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    q.bind(namespace)
        .bind(f.status.map(|s| s.as_str()))
        .bind(&f.kind)
        .bind(&f.queue)
        .bind(f.tags_json())
        .bind(&f.input)
        .bind(&f.output)
        .bind(f.created_after)
        .bind(f.created_before)
        .bind(f.finished_after)
        .bind(f.finished_before)
        .bind(&f.error_type)
        .bind(&f.worker)
}

/// Newest first.
pub async fn list(
    pool: &PgPool,
    namespace: &str,
    f: &JobFilter,
    limit: i64,
) -> Result<Vec<Job>, StoreError> {
    let sql = format!(
        "SELECT to_jsonb(j) FROM jobs j WHERE {FILTER_WHERE}
           AND ($14::uuid IS NULL OR j.id < $14)
         ORDER BY j.id DESC LIMIT $15"
    );
    let rows: Vec<JobRow> = bind_filter(sqlx::query_as(&sql), namespace, f)
        .bind(f.before)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(|(j,)| j.0).collect())
}

/// The `max_attempts` each job was submitted with (its `JobSubmitted`): a manual retry's fresh
/// budget. Jobs whose first event says none are left out.
pub async fn submitted_max_attempts(
    pool: &PgPool,
    ids: &[Uuid],
) -> Result<std::collections::HashMap<Uuid, u32>, StoreError> {
    let rows: Vec<(Uuid, Option<i64>)> = sqlx::query_as(
        "SELECT stream_id, (data->>'max_attempts')::bigint FROM events
          WHERE stream_id = ANY($1) AND version = 1 AND type = 'JobSubmitted'",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, n)| Some((id, u32::try_from(n?).ok()?)))
        .collect())
}

/// Scheduled jobs whose `run_at` has passed, oldest first.
pub async fn due(pool: &PgPool, limit: i64) -> Result<Vec<Job>, StoreError> {
    let rows: Vec<JobRow> = sqlx::query_as(
        "SELECT to_jsonb(j) FROM jobs j WHERE status = 'scheduled' AND run_at <= now() ORDER BY run_at LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(j,)| j.0).collect())
}

/// Waiting (queued or scheduled) jobs whose `expires_at` or `deadline_at` passed: the
/// expirer's work.
pub async fn expiring(pool: &PgPool, limit: i64) -> Result<Vec<Job>, StoreError> {
    let rows: Vec<JobRow> = sqlx::query_as(
        "SELECT to_jsonb(j) FROM jobs j
          WHERE status IN ('queued', 'scheduled')
            AND (expires_at IS NOT NULL OR deadline_at IS NOT NULL)
            AND LEAST(expires_at, deadline_at) <= now()
          ORDER BY LEAST(expires_at, deadline_at) LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(j,)| j.0).collect())
}

/// Queue statistics for `GET /v1/queues`.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct QueueStats {
    pub name: String,
    /// Jobs due and waiting for a worker.
    pub depth: i64,
    /// Jobs being run now.
    pub running: i64,
    /// Jobs waiting for their `run_at` or a retry.
    pub scheduled: i64,
    /// Age in seconds of the oldest waiting job.
    pub oldest_age_s: Option<f64>,
    /// Paused in this namespace (`POST /v1/queues/{name}/pause`): nothing new starts.
    #[serde(default)]
    pub paused: bool,
}

/// Per-queue depth, running and oldest age for a namespace (`None` = all namespaces).
pub async fn queue_stats(
    pool: &PgPool,
    namespace: Option<&str>,
) -> Result<Vec<QueueStats>, StoreError> {
    let rows: Vec<(String, i64, i64, i64, Option<f64>)> = sqlx::query_as(
        "WITH d AS (SELECT queue, count(*) AS depth, extract(epoch FROM now() - min(enqueued_at))::float8 AS oldest
                    FROM dispatch WHERE $1::text IS NULL OR namespace = $1 GROUP BY queue),
              r AS (SELECT queue, count(*) AS running FROM leases WHERE $1::text IS NULL OR namespace = $1 GROUP BY queue),
              s AS (SELECT queue, count(*) AS scheduled FROM jobs
                    WHERE status = 'scheduled' AND ($1::text IS NULL OR namespace = $1) GROUP BY queue)
         SELECT q.queue, coalesce(d.depth, 0), coalesce(r.running, 0), coalesce(s.scheduled, 0), d.oldest
         FROM (SELECT queue FROM d UNION SELECT queue FROM r UNION SELECT queue FROM s) q
         LEFT JOIN d ON d.queue = q.queue LEFT JOIN r ON r.queue = q.queue LEFT JOIN s ON s.queue = q.queue
         ORDER BY q.queue",
    )
    .bind(namespace)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(name, depth, running, scheduled, oldest)| QueueStats {
            name,
            depth,
            running,
            scheduled,
            oldest_age_s: oldest,
            paused: false,
        })
        .collect())
}

/// How many jobs of `kind` in `namespace` are in each status (statuses with none left out).
pub async fn count_by_status(
    pool: &PgPool,
    namespace: &str,
    kind: &str,
) -> Result<Vec<(String, i64)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT status, count(*) FROM jobs WHERE namespace = $1 AND kind = $2
         GROUP BY status ORDER BY status",
    )
    .bind(namespace)
    .bind(kind)
    .fetch_all(pool)
    .await?)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::domain::{
        job::{AttemptEnd, JobError},
        limit::{Limit, LimitDef, LimitMatch},
    };

    /// A job of a namespace with a `max_running` limit keyed by `tags.tenant`.
    fn limited_job(namespace: &str) -> Job {
        let limit = Limit {
            id: Uuid::nil(),
            namespace: namespace.into(),
            name: "per-tenant".into(),
            definition: LimitDef {
                matches: LimitMatch::default(),
                key: Some("tags.tenant".into()),
                max_running: Some(2),
                rate: None,
            },
            deleted: false,
            version: 1,
            created_at: crate::domain::now(),
            updated_at: crate::domain::now(),
        };
        crate::flow::install(vec![limit]);
        let sub: Submission = serde_json::from_value(serde_json::json!({
            "kind": "echo", "input": {}, "queue": "default", "priority": "normal",
            "max_attempts": 3, "tags": {"tenant": "acme"}
        }))
        .unwrap();
        Job::submitted(Uuid::now_v7(), namespace, &sub, crate::domain::now())
    }

    #[test]
    fn an_attempt_that_ends_gives_its_slots_back_even_when_its_start_is_in_the_same_append() {
        let job = limited_job("release-fast");
        let now = crate::domain::now();
        // A fast attempt: started and failed (retry later) in one append.
        let mut events = vec![JobEvent::JobStarted {
            attempt: 1,
            worker: "w".into(),
        }];
        events.extend(job.attempt_failure_events(
            1,
            JobError::new("rate_limited", "429"),
            true,
            Some(Duration::from_secs(3)),
            now,
        ));
        let (new, _) = job_append(
            Some(&job),
            job.id,
            &events,
            JobWrite::new(EventMetadata::default(), now),
        )
        .unwrap();
        let r = release(Some(&job), &new, &events).expect("a release");
        assert!(!r.terminal);
        assert!(r.group.contains("acme"), "{}", r.group);
        let backoff = r.backoff_until_ms.expect("a back-off");
        assert!((backoff - now.timestamp_millis() - 3000).abs() < 5);
        // Nothing to give back for a job that only waited, or for one with no limits.
        assert_eq!(release(None, &job, &[]), None);
        let mut free = job.clone();
        free.namespace = "release-none".into();
        let ended = free.end_attempt(1, AttemptEnd::Canceled, now);
        assert_eq!(release(Some(&free), &free, &ended), None);
    }

    #[test]
    fn a_bulk_filter_object_parses_as_the_query_parameters_do_and_errors_name_its_field() {
        let f = JobFilter::from_json(&json!({
            "status": "queued", "tag": ["team:a", "env:prod"],
            "input": {"customer": {"id": 42}}, "created_after": "2026-12-05T08:00:00Z"
        }))
        .unwrap();
        assert_eq!(f.status, Some(JobStatus::Queued));
        assert_eq!(f.tags.len(), 2);
        assert_eq!(f.input, Some(json!({"customer": {"id": 42}})));
        assert!(f.created_after.is_some());
        assert!(!f.is_empty());
        assert!(JobFilter::from_json(&json!({})).unwrap().is_empty());
        let bad = JobFilter::from_json(&json!({"tag": ["nocolon"]})).unwrap_err();
        assert_eq!(bad.field, "filter.tag");
        let bad = JobFilter::from_json(&json!({"status": "sleeping"})).unwrap_err();
        assert_eq!(bad.field, "filter.status");
        let bad = JobFilter::from_json(&json!({"colour": "red"})).unwrap_err();
        assert_eq!(bad.field, "filter.colour");
    }
}
