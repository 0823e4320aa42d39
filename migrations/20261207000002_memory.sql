-- Memory (docs/models.md): texts `memory.write` stored with their sentence vector, searched by
-- `memory.search` (vectors in the workers' memory, words by full-text search here).
CREATE TABLE memory_items (
    seq        bigserial PRIMARY KEY,
    -- The writing job's id: a retried write stores nothing twice.
    id         uuid NOT NULL UNIQUE,
    namespace  text NOT NULL,
    collection text NOT NULL,
    text       text NOT NULL,
    tags       text[] NOT NULL,
    metadata   jsonb NOT NULL,
    embedding  real[] NOT NULL,
    tsv        tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX memory_items_collection ON memory_items (namespace, collection, seq);
CREATE INDEX memory_items_tsv ON memory_items USING gin (tsv);

-- Items per collection, counted in the writing transaction: a worker's copy of a collection's
-- vectors is current when its count matches.
CREATE TABLE memory_collections (
    namespace  text NOT NULL,
    collection text NOT NULL,
    items      bigint NOT NULL,
    PRIMARY KEY (namespace, collection)
);
