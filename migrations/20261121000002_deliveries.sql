-- Results delivery: subscriptions, the deliveries projection, and checkpoints of log followers.
-- See docs/deliveries.md.

ALTER TABLE jobs ADD COLUMN callback_events jsonb;

-- Event subscriptions (configuration, not history). The secret signs deliveries
-- (Standard Webhooks) and is shown to the client once, at creation.
CREATE TABLE subscriptions (
    id          uuid PRIMARY KEY,
    namespace   text NOT NULL,
    url         text NOT NULL,
    events      text[] NOT NULL,
    filter      jsonb NOT NULL,
    secret      text NOT NULL,
    status      text NOT NULL,
    description text,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);
CREATE INDEX subscriptions_by_namespace ON subscriptions (namespace, id);

-- Projection of the `delivery` streams: one row per message to deliver.
CREATE TABLE deliveries (
    id               uuid PRIMARY KEY,
    namespace        text NOT NULL,
    subscription_id  uuid,
    job_id           uuid,
    event_type       text NOT NULL,
    source_position  bigint NOT NULL,
    -- Ordering key with job_id: `callback` or the subscription id.
    target           text NOT NULL,
    url              text NOT NULL,
    status           text NOT NULL,
    attempts         int NOT NULL,
    last_status_code int,
    last_error       text,
    payload          jsonb NOT NULL,
    delivery_job_id  uuid,
    version          bigint NOT NULL,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    delivered_at     timestamptz,
    UNIQUE (source_position, target)
);
CREATE INDEX deliveries_by_namespace ON deliveries (namespace, id DESC);
CREATE INDEX deliveries_by_job ON deliveries (job_id, source_position);
CREATE INDEX deliveries_open ON deliveries (target, job_id, source_position) WHERE status IN ('waiting', 'pending');

-- Where followers of the global log stand (gap-safe cursor).
CREATE TABLE log_checkpoints (
    name       text PRIMARY KEY,
    tx_id      text NOT NULL,
    position   bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
