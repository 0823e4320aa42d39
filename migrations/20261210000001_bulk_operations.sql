-- Bulk actions on jobs (docs/flow-control.md "Bulk actions"): the projection of the `bulk`
-- streams. The pin (the position of `BulkStarted`) is read from the log, not kept here.
CREATE TABLE bulk_operations (
    id          uuid PRIMARY KEY,
    namespace   text NOT NULL,
    action      text NOT NULL,
    filter      jsonb NOT NULL,
    all_jobs    boolean NOT NULL,
    status      text NOT NULL,
    matched     bigint,
    done        bigint NOT NULL,
    skipped     bigint NOT NULL,
    cursor      uuid,
    error       text,
    version     bigint NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    finished_at timestamptz
);
-- The runner's work: operations still running.
CREATE INDEX bulk_operations_running ON bulk_operations (created_at) WHERE status = 'running';
