-- Flow control (docs/flow-control.md): limits and pauses are projections of their streams
-- (`limit`, one per limit; `pauses`, one per namespace); jobs carry their ordering key; an
-- outbox row carries the dispatch group its job waits in (docs/flow-control-design.md).
CREATE TABLE limits (
    id         uuid PRIMARY KEY,
    namespace  text NOT NULL,
    name       text NOT NULL,
    definition jsonb NOT NULL,
    deleted    boolean NOT NULL,
    version    bigint NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE INDEX limits_namespace ON limits (namespace, name) WHERE NOT deleted;

CREATE TABLE pauses (
    id         uuid PRIMARY KEY,
    namespace  text NOT NULL UNIQUE,
    paused     jsonb NOT NULL,
    version    bigint NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);

ALTER TABLE jobs ADD COLUMN ordering_key text, ADD COLUMN waiting jsonb;
ALTER TABLE dispatch ADD COLUMN grp text NOT NULL DEFAULT '';
