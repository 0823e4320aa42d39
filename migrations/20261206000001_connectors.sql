-- Connectors (docs/connectors.md): the projection of the `connector` streams.
CREATE TABLE connectors (
    id            uuid PRIMARY KEY,
    namespace     text NOT NULL,
    name          text NOT NULL,
    type          text NOT NULL,
    config        jsonb NOT NULL,
    secrets       jsonb NOT NULL,
    cursor        jsonb,
    fetches       bigint NOT NULL,
    items_total   bigint NOT NULL,
    last_fetch_at timestamptz,
    last_job_id   uuid,
    last_error    jsonb,
    deleted       boolean NOT NULL,
    version       bigint NOT NULL,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL
);
CREATE INDEX connectors_namespace ON connectors (namespace, created_at) WHERE NOT deleted;

-- The content hashes each connector returned (`CursorAdvanced.hashes`): never returned again.
CREATE TABLE connector_items (
    connector_id uuid NOT NULL,
    hash         text NOT NULL,
    PRIMARY KEY (connector_id, hash)
);
