-- Scheduler: cron schedules (projection of `schedule` streams), their ticks, and inbound
-- webhook triggers. See docs/scheduler.md.

CREATE TABLE schedules (
    id                 uuid PRIMARY KEY,
    namespace          text NOT NULL,
    name               text NOT NULL,
    cron               text NOT NULL,
    timezone           text NOT NULL,
    target             jsonb NOT NULL,
    overlap            text NOT NULL,
    catch_up           text NOT NULL,
    catch_up_window_s  bigint NOT NULL,
    jitter_s           bigint NOT NULL,
    start_at           timestamptz,
    end_at             timestamptz,
    status             text NOT NULL,
    next_fire_time     timestamptz,
    last_fire_time     timestamptz,
    last_job_id        uuid,
    buffered_fire_time timestamptz,
    fired_count        bigint NOT NULL,
    skipped_count      bigint NOT NULL,
    version            bigint NOT NULL,
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL
);
CREATE INDEX schedules_by_namespace ON schedules (namespace, id);
CREATE INDEX schedules_due ON schedules (next_fire_time) WHERE status = 'active';

-- One row per fired tick: (schedule, fire_time) is unique, whatever the number of replicas.
CREATE TABLE schedule_ticks (
    schedule_id uuid NOT NULL,
    fire_time   timestamptz NOT NULL,
    job_id      uuid,
    PRIMARY KEY (schedule_id, fire_time)
);

-- Inbound webhook triggers (projection of `trigger` streams, without the per-call events).
CREATE TABLE triggers (
    id          uuid PRIMARY KEY,
    namespace   text NOT NULL,
    name        text NOT NULL,
    target      jsonb NOT NULL,
    auth        jsonb NOT NULL,
    input       jsonb,
    rate_limit_per_minute int NOT NULL,
    status      text NOT NULL,
    invocations bigint NOT NULL,
    rejections  bigint NOT NULL,
    version     bigint NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);
CREATE INDEX triggers_by_namespace ON triggers (namespace, id);

-- Message ids already accepted by a trigger (Standard Webhooks replay protection).
CREATE TABLE trigger_receipts (
    trigger_id  uuid NOT NULL,
    message_id  text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (trigger_id, message_id)
);
