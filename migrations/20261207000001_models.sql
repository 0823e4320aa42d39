-- The model registry (docs/models.md): the projection of the `model` streams, one row per
-- model name; `versions` holds its live versions.
CREATE TABLE models (
    id           uuid PRIMARY KEY,
    namespace    text NOT NULL,
    name         text NOT NULL,
    versions     jsonb NOT NULL,
    next_version integer NOT NULL,
    version      bigint NOT NULL,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    UNIQUE (namespace, name)
);
