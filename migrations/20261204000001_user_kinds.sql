-- Kinds defined by users (docs/workers.md): the projection of the `kind` streams.
CREATE TABLE user_kinds (
    id         uuid PRIMARY KEY,
    namespace  text NOT NULL,
    name       text NOT NULL,
    definition jsonb NOT NULL,
    deleted    boolean NOT NULL,
    version    bigint NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    UNIQUE (namespace, name)
);

-- Workers of the HTTP protocol: their namespace and labels (built-in workers have neither).
ALTER TABLE workers
    ADD COLUMN namespace text,
    ADD COLUMN labels jsonb NOT NULL DEFAULT '{}';
CREATE INDEX workers_namespace ON workers (namespace, last_heartbeat_at) WHERE namespace IS NOT NULL;
