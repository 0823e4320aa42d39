-- Capibara core: event store, commands, dispatch outbox, leases and the jobs/workers projections.
-- See docs/event-store.md for the reasoning behind each table.

-- One row per stream: the current version is the optimistic-concurrency token.
CREATE TABLE streams (
    stream_id   uuid PRIMARY KEY,
    stream_type text NOT NULL,
    namespace   text NOT NULL,
    version     bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The append-only log. `tx_id` lets readers of the global log wait for late commits
-- (gap-safe reads, docs/event-store.md).
CREATE TABLE events (
    position    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tx_id       xid8 NOT NULL DEFAULT pg_current_xact_id(),
    stream_id   uuid NOT NULL,
    stream_type text NOT NULL,
    version     bigint NOT NULL,
    type        text NOT NULL,
    data        jsonb NOT NULL,
    metadata    jsonb NOT NULL,
    recorded_at timestamptz NOT NULL,
    UNIQUE (stream_id, version)
);
CREATE INDEX events_tx_position ON events (tx_id, position);

CREATE FUNCTION capibara_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('capibara.allow_event_rewrite', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'the events table is append-only';
END $$;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION capibara_events_append_only();

-- Commands received, with their idempotency key and the response given.
CREATE TABLE commands (
    id              uuid PRIMARY KEY,
    namespace       text NOT NULL,
    type            text NOT NULL,
    idempotency_key text,
    request_hash    text NOT NULL,
    status_code     int NOT NULL,
    response        jsonb,
    stream_id       uuid,
    actor           text,
    received_at     timestamptz NOT NULL
);
CREATE UNIQUE INDEX commands_idempotency ON commands (namespace, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Projection: one row per job, written in the same transaction as its events.
CREATE TABLE jobs (
    id               uuid PRIMARY KEY,
    namespace        text NOT NULL,
    kind             text NOT NULL,
    queue            text NOT NULL,
    priority         text NOT NULL,
    status           text NOT NULL,
    input            jsonb NOT NULL,
    output           jsonb,
    error            jsonb,
    progress         jsonb,
    tags             jsonb NOT NULL,
    attempt          int NOT NULL,
    max_attempts     int NOT NULL,
    timeout_s        int,
    backoff          jsonb,
    callback_url     text,
    run_at           timestamptz,
    cancel_requested boolean NOT NULL,
    worker_id        text,
    artifacts        jsonb NOT NULL,
    version          bigint NOT NULL,
    created_at       timestamptz NOT NULL,
    queued_at        timestamptz,
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL
);
CREATE INDEX jobs_by_namespace ON jobs (namespace, id DESC);
CREATE INDEX jobs_by_status ON jobs (namespace, status, id DESC);
CREATE INDEX jobs_by_kind ON jobs (namespace, kind, id DESC);
CREATE INDEX jobs_due ON jobs (run_at) WHERE status = 'scheduled';
CREATE INDEX jobs_tags ON jobs USING gin (tags jsonb_path_ops) WHERE tags <> '{}'::jsonb;

-- Dispatch outbox: one row per queued job, written with the event that queued it and removed
-- with the one that started or ended it. The writer pushes to Redis right after commit; the relay
-- checks Redis for rows past a grace period and re-pushes those it lost (read-only here).
CREATE TABLE dispatch (
    job_id      uuid PRIMARY KEY,
    namespace   text NOT NULL,
    queue       text NOT NULL,
    score       bigint NOT NULL,
    enqueued_at timestamptz NOT NULL
);
CREATE INDEX dispatch_by_queue ON dispatch (queue, enqueued_at);
CREATE INDEX dispatch_by_age ON dispatch (enqueued_at, job_id);

-- Leases of running attempts; heartbeats extend them, the reaper expires them.
CREATE TABLE leases (
    job_id      uuid PRIMARY KEY,
    attempt     int NOT NULL,
    worker_id   text NOT NULL,
    namespace   text NOT NULL,
    queue       text NOT NULL,
    started_at  timestamptz NOT NULL,
    lease_until timestamptz NOT NULL
);
CREATE INDEX leases_by_worker ON leases (worker_id);
CREATE INDEX leases_by_expiry ON leases (lease_until);

-- Registered workers (heartbeated).
CREATE TABLE workers (
    id                uuid PRIMARY KEY,
    name              text NOT NULL,
    host              text NOT NULL,
    pid               int NOT NULL,
    queues            text[] NOT NULL,
    kinds             text[] NOT NULL,
    concurrency       int NOT NULL,
    version           text NOT NULL,
    started_at        timestamptz NOT NULL,
    last_heartbeat_at timestamptz NOT NULL,
    stopped_at        timestamptz
);

-- API keys, stored as SHA-256 of the secret.
CREATE TABLE api_keys (
    id         uuid PRIMARY KEY,
    namespace  text NOT NULL,
    name       text NOT NULL,
    prefix     text NOT NULL,
    key_hash   text NOT NULL UNIQUE,
    roles      text[] NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
