//! Writing one batch of appends (docs/write-path.md).
//!
//! The appends' streams, commands, events and the job core's rows (jobs, dispatch, leases) are
//! one statement, [`CORE`]: data-modifying CTEs, each a multi-row insert (or delete) of arrays.
//! Optimistic concurrency rides on the events' `UNIQUE (stream_id, version)`: an append whose
//! version another writer took first inserts no event (`ON CONFLICT DO NOTHING`), which the
//! statement's result shows; and the event at the version an append expects must exist (its
//! "tip": an index probe), so a stream is never appended past a gap. Nothing locks or rewrites
//! a `streams` row.
//!
//! - **One round trip**: a batch that writes nothing but the core runs [`CORE`] alone, in
//!   autocommit, with its guard on: if any part did not apply, `capibara_append_applied` raises
//!   (SQLSTATE `CBC01`) and the statement rolls back as a whole. A submit is one round trip and
//!   one commit. A batch that also writes workflow runs and log checkpoints (the orchestrator's
//!   plans, a run's creation) runs [`CORE_RUNS`] the same way: the core with two more CTEs.
//! - **In a transaction**: a batch that also writes other projections (deliveries, schedules,
//!   runs, …), or whose one-statement try did not apply, runs the other rows and [`CORE`]
//!   (guard off) in a transaction, reads who lost from the result, and rolls back so the caller
//!   can retry without them.

use std::{
    collections::{HashMap, HashSet},
    sync::LazyLock,
};

use serde_json::Value;
use sqlx::{types::Json, Connection, PgConnection, PgExecutor, Postgres, Transaction};
use uuid::Uuid;

use super::{
    append::{Append, AppendError, Appended, CommandRecord, Effect, Expected},
    dispatch::DispatchEntry,
    lease::Lease,
};
use crate::domain::{event::EventMetadata, job::Job};

/// The core of every batch in one statement. `$17` turns the guard on (autocommit); its branch
/// has no `FROM`, so it runs once even when nothing was inserted.
static CORE: LazyLock<String> = LazyLock::new(|| core_statement(false));

/// [`CORE`] that also upserts `runs` rows (`$24`) and saves log checkpoints (`$25`–`$27`), for
/// the batches that write those and nothing else outside the core: one round trip instead of a
/// transaction of five. The runs go first (the first branch of the result), as in a batch's
/// transaction, so two writers of a run take its row and its events in the same order.
static CORE_RUNS: LazyLock<String> = LazyLock::new(|| core_statement(true));

fn core_statement(runs: bool) -> String {
    let (extra_ctes, extra_rows) = if runs {
        (
            format!(
                "ru AS ({} RETURNING id),
        ck AS (
            INSERT INTO log_checkpoints (name, tx_id, position, updated_at)
            SELECT c.name, c.tx_id::xid8, c.position, now()
            FROM unnest($25::text[], $26::text[], $27::bigint[]) AS c(name, tx_id, position)
            ON CONFLICT (name) DO UPDATE SET tx_id = EXCLUDED.tx_id, position = EXCLUDED.position, updated_at = now()),
        ",
                super::runs::UPSERT_RUNS.replace("$1", "$24")
            ),
            "SELECT NULL::bigint, NULL::uuid, NULL::bigint, NULL::uuid FROM ru
        UNION ALL ",
        )
    } else {
        (String::new(), "")
    };
    format!(
        "WITH {extra_ctes}st AS (
            INSERT INTO streams (stream_id, stream_type, namespace)
            SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[])
            ON CONFLICT (stream_id) DO NOTHING RETURNING stream_id),
        cmd AS (
            INSERT INTO commands (id, namespace, type, idempotency_key, request_hash, status_code, response, stream_id, actor, received_at)
            SELECT id, namespace, type, idempotency_key, request_hash, status_code, response, stream_id, actor, received_at
            FROM jsonb_to_recordset($4) AS c(id uuid, namespace text, type text, idempotency_key text, request_hash text,
                 status_code int, response jsonb, stream_id uuid, actor text, received_at timestamptz)
            ON CONFLICT (namespace, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
            RETURNING id),
        ev AS (
            INSERT INTO events (stream_id, stream_type, version, type, data, metadata, recorded_at)
            SELECT * FROM unnest($5::uuid[], $6::text[], $7::bigint[], $8::text[], $9::jsonb[], $10::jsonb[], $11::timestamptz[])
            ON CONFLICT (stream_id, version) DO NOTHING
            RETURNING position, stream_id, version),
        tip AS (
            SELECT e.stream_id, e.version FROM events e
            JOIN unnest($21::uuid[], $22::bigint[]) AS t(stream_id, version)
              ON e.stream_id = t.stream_id AND e.version = t.version),
        jb AS ({jobs}),
        dd AS (DELETE FROM dispatch WHERE job_id = ANY($13)),
        di AS ({dispatch}),
        ld AS (DELETE FROM leases WHERE job_id = ANY($15)),
        li AS ({leases})
        {extra_rows}SELECT position, stream_id, version, NULL::uuid FROM ev
        UNION ALL SELECT NULL, stream_id, NULL, NULL FROM st
        UNION ALL SELECT NULL, NULL, NULL, id FROM cmd
        UNION ALL SELECT NULL, stream_id, version, NULL FROM tip
        UNION ALL SELECT NULL, NULL, NULL, NULL
        WHERE NOT capibara_append_applied($17, $18, (SELECT count(*) FROM ev), $19, (SELECT count(*) FROM st),
                                          $20, (SELECT count(*) FROM cmd), $23, (SELECT count(*) FROM tip))",
        jobs = super::jobs::UPSERT_JOBS.replace("$1", "$12"),
        dispatch = super::dispatch::PUT.replace("$1", "$14"),
        leases = super::lease::GRANT.replace("$1", "$16"),
    )
}

/// A row [`CORE`] returns: an event `(position, stream, version)`, a created stream, or a
/// recorded command.
type CoreRow = (Option<i64>, Option<Uuid>, Option<i64>, Option<Uuid>);

/// The SQLSTATE of a guarded [`CORE`] that did not apply.
const DID_NOT_APPLY: &str = "CBC01";

/// What one try wrote, for the appender's answers and its commit listener.
#[derive(Default)]
pub(super) struct Written {
    pub dispatched: Vec<DispatchEntry>,
    pub released: Vec<super::dispatch::Release>,
    pub streams: Vec<Uuid>,
    /// Whether an event written names a run (`correlation_id`): a workflow step's job or a
    /// child run, the events the orchestrator follows.
    pub runs: bool,
}

/// One try at writing the appends `ok` (checked by [`check_batch`]): `Ok(Err(losers))` means it
/// rolled back because those lost (their `results` say why); retry without them.
pub(super) async fn write(
    conn: &mut PgConnection,
    appends: &[Append],
    ok: &[usize],
    results: &mut [Option<Result<Appended, AppendError>>],
) -> Result<Result<Written, Vec<usize>>, sqlx::Error> {
    let rows = Rows::collect(appends, ok);
    let core = Core::new(appends, ok, &rows);
    if let Some(runs) = rows.one_statement() {
        match core.run(&mut *conn, true, runs.as_ref()).await {
            Ok(out) => return Ok(Ok(core.written(appends, ok, results, &out, &rows))),
            Err(e) if did_not_apply(&e) => {
                metrics::counter!("capibara_append_retried_in_transaction_total").increment(1);
            }
            Err(e) => return Err(e),
        }
    }
    let mut tx = conn.begin().await?;
    rows.write_others(&mut tx).await?;
    let out = core.run(&mut *tx, false, None).await?;
    let losers = core.losers(appends, ok, &out);
    if losers.is_empty() {
        tx.commit().await?;
        return Ok(Ok(core.written(appends, ok, results, &out, &rows)));
    }
    tx.rollback().await?;
    let conflicted: Vec<Uuid> = losers
        .iter()
        .filter(|(_, e)| matches!(e, AppendError::Conflict { .. }))
        .map(|(i, _)| appends[*i].stream_id)
        .collect();
    let actual = versions(conn, &conflicted).await?;
    let mut out = Vec::with_capacity(losers.len());
    for (i, e) in losers {
        results[i] = Some(Err(match e {
            AppendError::Conflict { .. } => AppendError::Conflict {
                actual: actual.get(&appends[i].stream_id).copied(),
            },
            e => e,
        }));
        out.push(i);
    }
    Ok(Err(out))
}

/// Whether `e` is a guarded [`CORE`] that did not apply.
fn did_not_apply(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some(DID_NOT_APPLY))
}

/// The current versions of `streams` (absent: no such stream).
async fn versions(
    conn: &mut PgConnection,
    streams: &[Uuid],
) -> Result<HashMap<Uuid, i64>, sqlx::Error> {
    if streams.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT stream_id, max(version) FROM events WHERE stream_id = ANY($1) GROUP BY stream_id",
    )
    .bind(streams)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Check the batch in itself, in arrival order, and return the appends to write. A stream may
/// appear more than once: a later append must expect the version the earlier one leaves; one
/// that expects the version of an append that failed fails too; two appends may not carry the
/// same idempotency key. Whether the stream is at the expected version in Postgres is for the
/// write to find out ([`write`]).
pub(super) fn check_batch(
    appends: &[Append],
    results: &mut [Option<Result<Appended, AppendError>>],
    excluded: &HashSet<usize>,
) -> Vec<usize> {
    let mut tip: HashMap<Uuid, i64> = HashMap::new();
    let mut failed_tip: HashMap<Uuid, i64> = HashMap::new();
    let mut keys_seen: HashSet<(&str, &str)> = HashSet::new();
    let mut ok = Vec::with_capacity(appends.len());
    for (i, a) in appends.iter().enumerate() {
        if excluded.contains(&i) {
            if let Some(Err(_)) = results[i] {
                failed_tip.insert(a.stream_id, a.new_version());
            }
            continue;
        }
        let in_batch = tip.get(&a.stream_id).copied();
        let applies = match (a.expected, in_batch) {
            (Expected::NoStream, None) => true,
            (Expected::NoStream, Some(_)) => false,
            (Expected::Version(v), Some(t)) => v == t,
            (Expected::Version(v), None) => failed_tip.get(&a.stream_id) != Some(&v),
        };
        if !applies {
            results[i] = Some(Err(AppendError::Conflict { actual: in_batch }));
            failed_tip.insert(a.stream_id, a.new_version());
            continue;
        }
        if let Some(key) = a
            .command
            .as_ref()
            .and_then(|c| c.idempotency_key.as_deref())
        {
            if !keys_seen.insert((a.namespace.as_str(), key)) {
                results[i] = Some(Err(AppendError::DuplicateCommand));
                failed_tip.insert(a.stream_id, a.new_version());
                continue;
            }
        }
        tip.insert(a.stream_id, a.new_version());
        results[i] = None;
        ok.push(i);
    }
    ok
}

/// The arrays [`CORE`] binds (borrowing the appends' text).
struct Core<'a> {
    new_ids: Vec<Uuid>,
    new_types: Vec<&'static str>,
    new_ns: Vec<&'a str>,
    commands: Json<Vec<&'a CommandRecord>>,
    command_ids: Vec<(usize, Uuid)>,
    ev_stream: Vec<Uuid>,
    ev_type_stream: Vec<&'static str>,
    ev_version: Vec<i64>,
    ev_type: Vec<&'a str>,
    ev_data: Vec<&'a Value>,
    ev_meta: Vec<Json<&'a EventMetadata>>,
    ev_at: Vec<chrono::DateTime<chrono::Utc>>,
    tip_stream: Vec<Uuid>,
    tip_version: Vec<i64>,
    jobs: Json<Vec<&'a Job>>,
    undispatch: Vec<Uuid>,
    dispatch: Json<Vec<&'a DispatchEntry>>,
    release: Vec<Uuid>,
    leases: Json<Vec<&'a Lease>>,
}

/// What [`CORE`] returned: inserted events `(stream, version) → position`, created streams,
/// recorded commands, the expected tips found.
struct CoreOut {
    positions: HashMap<(Uuid, i64), i64>,
    created: HashSet<Uuid>,
    commands: HashSet<Uuid>,
    tips: HashSet<(Uuid, i64)>,
}

impl<'a> Core<'a> {
    fn new(appends: &'a [Append], ok: &[usize], rows: &Rows<'a>) -> Core<'a> {
        let mut core = Core {
            new_ids: Vec::new(),
            new_types: Vec::new(),
            new_ns: Vec::new(),
            commands: Json(Vec::new()),
            command_ids: Vec::new(),
            ev_stream: Vec::new(),
            ev_type_stream: Vec::new(),
            ev_version: Vec::new(),
            ev_type: Vec::new(),
            ev_data: Vec::new(),
            ev_meta: Vec::new(),
            ev_at: Vec::new(),
            tip_stream: Vec::new(),
            tip_version: Vec::new(),
            jobs: json_rows(rows.jobs().copied()),
            undispatch: rows.undispatch.clone(),
            dispatch: json_rows(rows.dispatch.iter().copied()),
            release: rows.release.clone(),
            leases: json_rows(rows.leases.iter().copied()),
        };
        let mut commands = Vec::new();
        let mut in_batch = HashSet::new();
        // Rows go in key order (streams by id, each stream's appends in arrival order), so two
        // batches that touch the same streams wait for each other in the same order and never
        // deadlock (the old `FOR UPDATE` in id order did this).
        let mut by_stream = ok.to_vec();
        by_stream.sort_by_key(|&i| appends[i].stream_id);
        for &i in &by_stream {
            let a = &appends[i];
            match a.expected {
                Expected::NoStream => {
                    core.new_ids.push(a.stream_id);
                    core.new_types.push(a.stream_type.as_str());
                    core.new_ns.push(&a.namespace);
                }
                // The first append to a stream in the batch expects a committed event; the
                // next ones, the one before them in the batch.
                Expected::Version(v) if v > 0 && !in_batch.contains(&a.stream_id) => {
                    core.tip_stream.push(a.stream_id);
                    core.tip_version.push(v);
                }
                Expected::Version(_) => {}
            }
            in_batch.insert(a.stream_id);
            if let Some(c) = &a.command {
                commands.push(c);
                core.command_ids.push((i, c.id));
            }
            let base = a.new_version() - a.events.len() as i64;
            for (k, e) in a.events.iter().enumerate() {
                core.ev_stream.push(a.stream_id);
                core.ev_type_stream.push(a.stream_type.as_str());
                core.ev_version.push(base + 1 + k as i64);
                core.ev_type.push(&e.event_type);
                core.ev_data.push(&e.data);
                core.ev_meta.push(Json(&a.metadata));
                core.ev_at.push(e.recorded_at.unwrap_or(a.recorded_at));
            }
        }
        commands.sort_by(|a, b| {
            (&a.namespace, &a.idempotency_key).cmp(&(&b.namespace, &b.idempotency_key))
        });
        core.commands = Json(commands);
        core
    }

    /// Run [`CORE`], or [`CORE_RUNS`] with `runs`.
    async fn run<'e, E: PgExecutor<'e>>(
        &self,
        db: E,
        guard: bool,
        runs: Option<&RunRows<'_>>,
    ) -> Result<CoreOut, sqlx::Error> {
        let sql: &str = if runs.is_some() { &CORE_RUNS } else { &CORE };
        let query = sqlx::query_as(sql)
            .bind(&self.new_ids)
            .bind(&self.new_types)
            .bind(&self.new_ns)
            .bind(&self.commands)
            .bind(&self.ev_stream)
            .bind(&self.ev_type_stream)
            .bind(&self.ev_version)
            .bind(&self.ev_type)
            .bind(&self.ev_data)
            .bind(&self.ev_meta)
            .bind(&self.ev_at)
            .bind(&self.jobs)
            .bind(&self.undispatch)
            .bind(&self.dispatch)
            .bind(&self.release)
            .bind(&self.leases)
            .bind(guard)
            .bind(self.ev_stream.len() as i32)
            .bind(self.new_ids.len() as i32)
            .bind(self.command_ids.len() as i32)
            .bind(&self.tip_stream)
            .bind(&self.tip_version)
            .bind(self.tip_stream.len() as i32);
        let query = match runs {
            Some(r) => query
                .bind(&r.runs)
                .bind(&r.checkpoint_names)
                .bind(&r.checkpoint_tx_ids)
                .bind(&r.checkpoint_positions),
            None => query,
        };
        let rows: Vec<CoreRow> = query.fetch_all(db).await?;
        let mut out = CoreOut {
            positions: HashMap::with_capacity(rows.len()),
            created: HashSet::new(),
            commands: HashSet::new(),
            tips: HashSet::new(),
        };
        for row in rows {
            match row {
                (Some(p), Some(s), Some(v), None) => {
                    out.positions.insert((s, v), p);
                }
                (None, Some(s), Some(v), None) => {
                    out.tips.insert((s, v));
                }
                (None, Some(s), None, None) => {
                    out.created.insert(s);
                }
                (None, None, None, Some(c)) => {
                    out.commands.insert(c);
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// The appends of `ok` that did not apply, with why: their command's key was taken, their
    /// stream existed, was not at the version they expect, or a version of theirs was taken;
    /// and those that build on a loser (a later append to its stream, expecting the version it
    /// would have left).
    fn losers(&self, appends: &[Append], ok: &[usize], out: &CoreOut) -> Vec<(usize, AppendError)> {
        let key_taken: HashSet<usize> = self
            .command_ids
            .iter()
            .filter(|(_, id)| !out.commands.contains(id))
            .map(|(i, _)| *i)
            .collect();
        let tips_wanted: HashSet<(Uuid, i64)> = self
            .tip_stream
            .iter()
            .copied()
            .zip(self.tip_version.iter().copied())
            .collect();
        let mut lost_tip: HashMap<Uuid, i64> = HashMap::new();
        let mut losers = Vec::new();
        for &i in ok {
            let a = &appends[i];
            let base = a.new_version() - a.events.len() as i64;
            let tip_missing = tips_wanted.contains(&(a.stream_id, base))
                && !out.tips.contains(&(a.stream_id, base));
            let why = if key_taken.contains(&i) {
                Some(AppendError::DuplicateCommand)
            } else if tip_missing
                || (a.expected == Expected::NoStream && !out.created.contains(&a.stream_id))
                || (1..=a.events.len() as i64)
                    .any(|k| !out.positions.contains_key(&(a.stream_id, base + k)))
                || lost_tip.get(&a.stream_id) == Some(&base)
            {
                Some(AppendError::Conflict { actual: None })
            } else {
                None
            };
            if let Some(why) = why {
                lost_tip.insert(a.stream_id, a.new_version());
                losers.push((i, why));
            }
        }
        losers
    }

    /// Answer the appends of a committed write.
    fn written(
        &self,
        appends: &[Append],
        ok: &[usize],
        results: &mut [Option<Result<Appended, AppendError>>],
        out: &CoreOut,
        rows: &Rows<'_>,
    ) -> Written {
        let mut streams = Vec::with_capacity(ok.len());
        let mut runs = false;
        for &i in ok {
            let a = &appends[i];
            runs |= a.metadata.correlation_id.is_some();
            let base = a.new_version() - a.events.len() as i64;
            let positions = (1..=a.events.len() as i64)
                .map(|k| {
                    out.positions
                        .get(&(a.stream_id, base + k))
                        .copied()
                        .unwrap_or_default()
                })
                .collect();
            results[i] = Some(Ok(Appended {
                version: a.new_version(),
                positions,
            }));
            streams.push(a.stream_id);
        }
        streams.sort_unstable();
        streams.dedup();
        Written {
            dispatched: rows.dispatch.iter().map(|d| (*d).clone()).collect(),
            released: rows.released.iter().map(|r| (*r).clone()).collect(),
            streams,
            runs,
        }
    }
}

/// Rows bound as one `jsonb` array, serialized straight from the domain types into the
/// statement's buffer (no `serde_json::Value` tree built and dropped per row).
fn json_rows<T: serde::Serialize>(rows: impl Iterator<Item = T>) -> Json<Vec<T>> {
    Json(rows.collect())
}

/// Run `sql`, an upsert of whole rows from the `jsonb` array `$1`, for `rows` (if any).
pub(super) async fn upsert<T: serde::Serialize>(
    tx: &mut Transaction<'_, Postgres>,
    sql: &str,
    rows: impl ExactSizeIterator<Item = T>,
) -> Result<(), sqlx::Error> {
    if rows.len() > 0 {
        sqlx::query(sql)
            .bind(json_rows(rows))
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// What [`CORE_RUNS`] binds besides the core: the runs rows (in id order) and the checkpoints.
#[derive(Default)]
struct RunRows<'a> {
    runs: Json<Vec<&'a crate::domain::run::Run>>,
    checkpoint_names: Vec<&'a str>,
    checkpoint_tx_ids: Vec<String>,
    checkpoint_positions: Vec<i64>,
}

/// The rows a batch's effects write, the last effect per row winning.
#[derive(Default)]
struct Rows<'a> {
    jobs: HashMap<Uuid, &'a Job>,
    deleted_jobs: HashSet<Uuid>,
    dispatch: Vec<&'a DispatchEntry>,
    undispatch: Vec<Uuid>,
    leases: Vec<&'a Lease>,
    release: Vec<Uuid>,
    deliveries: HashMap<Uuid, &'a crate::domain::delivery::Delivery>,
    schedules: HashMap<Uuid, &'a crate::domain::schedule::Schedule>,
    triggers: HashMap<Uuid, &'a crate::domain::trigger::Trigger>,
    workflows: HashMap<Uuid, &'a crate::domain::workflow::Workflow>,
    runs: HashMap<Uuid, &'a crate::domain::run::Run>,
    user_kinds: HashMap<Uuid, &'a crate::domain::kinds::user::UserKind>,
    connectors: HashMap<Uuid, &'a crate::domain::connector::Connector>,
    models: HashMap<Uuid, &'a crate::domain::model::ModelName>,
    llm_providers: HashMap<Uuid, &'a crate::domain::llm::LlmProvider>,
    limits: HashMap<Uuid, &'a crate::domain::limit::Limit>,
    pauses: HashMap<Uuid, &'a crate::domain::limit::Pauses>,
    released: Vec<&'a super::dispatch::Release>,
    bulk: HashMap<Uuid, &'a crate::domain::bulk::BulkOperation>,
    connector_items: (Vec<Uuid>, Vec<&'a str>),
    ticks: (
        Vec<Uuid>,
        Vec<chrono::DateTime<chrono::Utc>>,
        Vec<Option<Uuid>>,
    ),
    credentials: Vec<(
        &'a Uuid,
        &'a String,
        &'a Option<crate::domain::trigger::TriggerCredential>,
    )>,
    receipts: Vec<(&'a Uuid, &'a String)>,
    checkpoints: Vec<(&'a str, super::events::LogCursor)>,
}

impl<'a> Rows<'a> {
    fn collect(appends: &'a [Append], ok: &[usize]) -> Rows<'a> {
        let mut rows = Rows::default();
        let mut dispatch: HashMap<Uuid, Option<&DispatchEntry>> = HashMap::new();
        let mut leases: HashMap<Uuid, Option<&Lease>> = HashMap::new();
        for &i in ok {
            for e in &appends[i].effects {
                match e {
                    Effect::UpsertJob(j) => {
                        rows.deleted_jobs.remove(&j.id);
                        rows.jobs.insert(j.id, j);
                    }
                    Effect::DeleteJob(id) => {
                        rows.jobs.remove(id);
                        rows.deleted_jobs.insert(*id);
                    }
                    Effect::Dispatch(d) => {
                        dispatch.insert(d.job_id, Some(d));
                    }
                    Effect::Undispatch(id) => {
                        dispatch.insert(*id, None);
                    }
                    Effect::Lease(l) => {
                        leases.insert(l.job_id, Some(l));
                    }
                    Effect::ReleaseLease(id) => {
                        leases.insert(*id, None);
                    }
                    Effect::UpsertDelivery(d) => {
                        rows.deliveries.insert(d.id, d);
                    }
                    Effect::Checkpoint { name, cursor } => rows.checkpoints.push((name, *cursor)),
                    Effect::UpsertSchedule(s) => {
                        rows.schedules.insert(s.id, s);
                    }
                    Effect::UpsertUserKind(k) => {
                        rows.user_kinds.insert(k.id, k);
                    }
                    Effect::UpsertConnector(c) => {
                        rows.connectors.insert(c.id, c);
                    }
                    Effect::UpsertModel(m) => {
                        rows.models.insert(m.id, m);
                    }
                    Effect::UpsertLlmProvider(p) => {
                        rows.llm_providers.insert(p.id, p);
                    }
                    Effect::UpsertLimit(l) => {
                        rows.limits.insert(l.id, l);
                    }
                    Effect::UpsertPauses(p) => {
                        rows.pauses.insert(p.id, p);
                    }
                    Effect::Release(r) => rows.released.push(r),
                    Effect::UpsertBulk(b) => {
                        rows.bulk.insert(b.id, b);
                    }
                    Effect::ConnectorItems {
                        connector_id,
                        hashes,
                    } => {
                        for h in hashes {
                            rows.connector_items.0.push(*connector_id);
                            rows.connector_items.1.push(h);
                        }
                    }
                    Effect::UpsertTrigger(t) => {
                        rows.triggers.insert(t.id, t);
                    }
                    Effect::UpsertWorkflow(w) => {
                        rows.workflows.insert(w.id, w);
                    }
                    Effect::UpsertRun(r) => {
                        rows.runs.insert(r.id, r);
                    }
                    Effect::TriggerCredential {
                        trigger_id,
                        namespace,
                        credential,
                    } => rows.credentials.push((trigger_id, namespace, credential)),
                    Effect::Receipt {
                        trigger_id,
                        message_id,
                    } => rows.receipts.push((trigger_id, message_id)),
                    Effect::InsertTicks { schedule_id, ticks } => {
                        for (t, j) in ticks {
                            rows.ticks.0.push(*schedule_id);
                            rows.ticks.1.push(*t);
                            rows.ticks.2.push(*j);
                        }
                    }
                }
            }
        }
        (rows.dispatch, rows.undispatch) = split(dispatch);
        (rows.leases, rows.release) = split(leases);
        rows
    }

    /// The jobs rows in id order (see [`Core::new`] on order).
    fn jobs(&self) -> impl Iterator<Item = &&'a Job> {
        let mut jobs: Vec<&&Job> = self.jobs.values().collect();
        jobs.sort_by_key(|j| j.id);
        jobs.into_iter()
    }

    /// Whether one statement writes everything: `Some(None)` for [`CORE`] alone (no other
    /// projection is touched), `Some(Some(rows))` for [`CORE_RUNS`] (runs and checkpoints
    /// besides), `None` for a transaction.
    fn one_statement(&self) -> Option<Option<RunRows<'a>>> {
        if !self.core_and_runs_only() {
            return None;
        }
        if self.runs.is_empty() && self.checkpoints.is_empty() {
            return Some(None);
        }
        let mut runs: Vec<&crate::domain::run::Run> = self.runs.values().copied().collect();
        runs.sort_by_key(|r| r.id); // key order, as everywhere (see [`Core::new`])
        let mut rows = RunRows {
            runs: Json(runs),
            ..RunRows::default()
        };
        // One row per name, the last one winning (as the transaction's one upsert each): an
        // upsert may not touch a row twice in one statement.
        let mut last: Vec<(&'a str, super::events::LogCursor)> = Vec::new();
        for &(name, cursor) in &self.checkpoints {
            last.retain(|(n, _)| *n != name);
            last.push((name, cursor));
        }
        for (name, cursor) in last {
            rows.checkpoint_names.push(name);
            rows.checkpoint_tx_ids.push(cursor.tx_id.to_string());
            rows.checkpoint_positions.push(cursor.position);
        }
        Some(Some(rows))
    }

    /// Whether nothing but the core, runs and checkpoints is written.
    fn core_and_runs_only(&self) -> bool {
        self.deleted_jobs.is_empty()
            && self.deliveries.is_empty()
            && self.schedules.is_empty()
            && self.triggers.is_empty()
            && self.workflows.is_empty()
            && self.user_kinds.is_empty()
            && self.connectors.is_empty()
            && self.models.is_empty()
            && self.llm_providers.is_empty()
            && self.limits.is_empty()
            && self.pauses.is_empty()
            && self.bulk.is_empty()
            && self.connector_items.0.is_empty()
            && self.ticks.0.is_empty()
            && self.credentials.is_empty()
            && self.receipts.is_empty()
    }

    /// The rows outside [`CORE`], inside the batch's transaction.
    async fn write_others(&self, tx: &mut Transaction<'_, Postgres>) -> Result<(), sqlx::Error> {
        upsert(
            tx,
            super::deliveries::UPSERT_DELIVERIES,
            self.deliveries.values(),
        )
        .await?;
        upsert(
            tx,
            super::schedules::UPSERT_SCHEDULES,
            self.schedules.values(),
        )
        .await?;
        upsert(tx, super::triggers::UPSERT_TRIGGERS, self.triggers.values()).await?;
        upsert(
            tx,
            super::user_kinds::UPSERT_USER_KINDS,
            self.user_kinds.values(),
        )
        .await?;
        upsert(
            tx,
            super::workflows::UPSERT_WORKFLOWS,
            self.workflows.values(),
        )
        .await?;
        upsert(tx, super::runs::UPSERT_RUNS, self.runs.values()).await?;
        upsert(
            tx,
            super::connectors::UPSERT_CONNECTORS,
            self.connectors.values(),
        )
        .await?;
        upsert(tx, super::models::UPSERT_MODELS, self.models.values()).await?;
        upsert(
            tx,
            super::llm_providers::UPSERT_LLM_PROVIDERS,
            self.llm_providers.values(),
        )
        .await?;
        upsert(tx, super::limits::UPSERT_LIMITS, self.limits.values()).await?;
        upsert(tx, super::limits::UPSERT_PAUSES, self.pauses.values()).await?;
        upsert(tx, super::bulk::UPSERT_BULK, self.bulk.values()).await?;
        if !self.deleted_jobs.is_empty() {
            let ids: Vec<Uuid> = self.deleted_jobs.iter().copied().collect();
            sqlx::query("DELETE FROM jobs WHERE id = ANY($1)")
                .bind(&ids)
                .execute(&mut **tx)
                .await?;
        }
        if !self.connector_items.0.is_empty() {
            sqlx::query(super::connectors::INSERT_ITEMS)
                .bind(&self.connector_items.0)
                .bind(&self.connector_items.1)
                .execute(&mut **tx)
                .await?;
        }
        if !self.ticks.0.is_empty() {
            sqlx::query(
                "INSERT INTO schedule_ticks (schedule_id, fire_time, job_id)
                 SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::uuid[])",
            )
            .bind(&self.ticks.0)
            .bind(&self.ticks.1)
            .bind(&self.ticks.2)
            .execute(&mut **tx)
            .await?;
        }
        for (trigger_id, namespace, credential) in &self.credentials {
            match credential {
                Some(c) => {
                    // Encrypted at rest under the current key, bound to the trigger id.
                    let ring =
                        crate::crypto::keyring().map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
                    let (sealed, key_id) = super::sealed::seal_credential(ring, **trigger_id, c);
                    sqlx::query(
                        "INSERT INTO trigger_credentials (trigger_id, namespace, credential, key_id) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (trigger_id) DO UPDATE SET credential = EXCLUDED.credential, key_id = EXCLUDED.key_id",
                    )
                    .bind(trigger_id)
                    .bind(namespace)
                    .bind(sealed)
                    .bind(key_id)
                    .execute(&mut **tx)
                    .await?;
                }
                None => {
                    sqlx::query("DELETE FROM trigger_credentials WHERE trigger_id = $1")
                        .bind(trigger_id)
                        .execute(&mut **tx)
                        .await?;
                }
            }
        }
        for (trigger_id, message_id) in &self.receipts {
            sqlx::query("INSERT INTO trigger_receipts (trigger_id, message_id) VALUES ($1, $2)")
                .bind(trigger_id)
                .bind(message_id)
                .execute(&mut **tx)
                .await?;
        }
        for (name, cursor) in &self.checkpoints {
            sqlx::query(super::checkpoints::SAVE)
                .bind(name)
                .bind(cursor.tx_id.to_string())
                .bind(cursor.position)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }
}

/// The rows to put and the ids to delete, in id order (see [`Core::new`] on order).
fn split<T>(m: HashMap<Uuid, Option<&T>>) -> (Vec<&T>, Vec<Uuid>) {
    let mut put = Vec::new();
    let mut delete = Vec::new();
    let mut m: Vec<_> = m.into_iter().collect();
    m.sort_by_key(|(id, _)| *id);
    for (id, v) in m {
        match v {
            Some(v) => put.push(v),
            None => delete.push(id),
        }
    }
    (put, delete)
}
