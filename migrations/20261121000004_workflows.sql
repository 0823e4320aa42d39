-- Workflows and runs (issue 5). Both are projections of their streams (`workflow`, `run`),
-- written by the same fold inline and by `capibara admin rebuild-projections`.

CREATE TABLE workflows (
    id             uuid PRIMARY KEY,
    namespace      text NOT NULL,
    name           text NOT NULL,
    description    text,
    version        int NOT NULL,
    -- every definition version: [{version, definition, created_at}]
    versions       jsonb NOT NULL,
    deleted        boolean NOT NULL,
    stream_version bigint NOT NULL,
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL,
    deleted_at     timestamptz
);
CREATE INDEX workflows_by_namespace ON workflows (namespace, id DESC) WHERE NOT deleted;
CREATE INDEX workflows_by_name ON workflows (namespace, name) WHERE NOT deleted;

CREATE TABLE runs (
    id             uuid PRIMARY KEY,
    namespace      text NOT NULL,
    workflow_id    uuid NOT NULL,
    workflow_name  text NOT NULL,
    version        int NOT NULL,
    status         text NOT NULL,
    input          jsonb NOT NULL,
    output         jsonb,
    error          jsonb,
    steps          jsonb NOT NULL,
    signals        jsonb NOT NULL,
    parent_run_id  uuid,
    parent_step_id text,
    callback_url   text,
    stream_version bigint NOT NULL,
    created_at     timestamptz NOT NULL,
    started_at     timestamptz,
    finished_at    timestamptz,
    updated_at     timestamptz NOT NULL
);
CREATE INDEX runs_by_namespace ON runs (namespace, id DESC);
CREATE INDEX runs_by_workflow ON runs (namespace, workflow_id, id DESC);
CREATE INDEX runs_by_status ON runs (namespace, status, id DESC);

-- A step's job knows its run (visible in /v1/jobs, and on its events' metadata.correlation_id).
ALTER TABLE jobs ADD COLUMN run_id uuid;
ALTER TABLE jobs ADD COLUMN step_id text;
