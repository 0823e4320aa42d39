-- code.run's result cache (issue 7). One row per (namespace, key): the key is the SHA-256 of
-- the canonical JSON of (language, code, context, timeout_ms, memory_mb). Postgres is the
-- source of truth; rows past expires_at are ignored and pruned by DELETE /v1/code/cache.
CREATE TABLE code_cache (
    namespace    text NOT NULL,
    key          text NOT NULL,
    language     text NOT NULL,
    -- The executor's output as first computed (result, stdout, stderr, exit_code, duration_ms).
    output       jsonb NOT NULL,
    -- Executor time of the run that filled the entry.
    execution_ms double precision NOT NULL,
    -- Runs served from this entry, and runs that had to execute for it (first fill + refills
    -- after expiry): hit_rate = hits / (hits + misses).
    hits         bigint NOT NULL DEFAULT 0,
    misses       bigint NOT NULL DEFAULT 1,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    last_hit_at  timestamptz,
    PRIMARY KEY (namespace, key)
);
CREATE INDEX code_cache_by_age ON code_cache (namespace, created_at);
