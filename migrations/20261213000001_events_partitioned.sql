-- A bounded event log (docs/event-log-retention.md).
--
-- `events` becomes a table partitioned by RANGE (stream_id). Stream ids are UUID v7 where a
-- stream is created by time (jobs, runs, schedules, …): their leading 48 bits are the Unix
-- milliseconds of creation, so a range of ids is a range of creation times and a partition holds
-- the whole history of the streams created in its period. `UNIQUE (stream_id, version)`, the
-- optimistic-concurrency guard, includes the partition key and stays global. Ids derived by name
-- (UUID v5: kinds, limits, models, LLM providers, pauses) fall anywhere in the id space; those
-- outside every time range land in the DEFAULT partition, which is never archived.
--
-- `position` stays the identity-backed global order, with a non-unique index per partition (a
-- primary key on a partitioned table must include the partition key).
--
-- The existing table is kept, not copied: it becomes the partition `events_legacy` for ids
-- below the migration's time (rows whose id lies above it, name-derived ids, move to the
-- default partition). New time partitions are created ahead of time by the scheduler
-- (`capibara_events_ensure_partitions`).

-- The time bound of a period: the smallest UUID v7 of millisecond `ms`.
CREATE FUNCTION capibara_events_bound(ms bigint) RETURNS uuid LANGUAGE sql IMMUTABLE AS $$
    SELECT (substr(lpad(to_hex(ms), 12, '0'), 1, 8) || '-' || substr(lpad(to_hex(ms), 12, '0'), 9, 4)
            || '-0000-0000-000000000000')::uuid
$$;

-- The registry of partitions: their id range, creation-time range, and archive state
-- (`active` → `archiving` → `archived`, the last once the partition is dropped).
CREATE TABLE event_partitions (
    name        text PRIMARY KEY,
    lo          uuid NOT NULL,
    hi          uuid NOT NULL,
    lo_at       timestamptz NOT NULL,
    hi_at       timestamptz NOT NULL,
    status      text NOT NULL DEFAULT 'active',
    events      bigint,
    archived_at timestamptz
);
CREATE INDEX event_partitions_by_range ON event_partitions (lo, hi);

-- The archive objects of a partition: gzip JSONL in the artifact store, per namespace, cut
-- into chunks of whole streams (`seq`), each covering the stream ids `min_stream..max_stream`.
CREATE TABLE event_archives (
    partition    text NOT NULL REFERENCES event_partitions (name),
    namespace    text NOT NULL,
    seq          int NOT NULL,
    object_key   text NOT NULL,
    events       bigint NOT NULL,
    min_stream   uuid NOT NULL,
    max_stream   uuid NOT NULL,
    min_position bigint NOT NULL,
    max_position bigint NOT NULL,
    bytes        bigint NOT NULL,
    written_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (partition, namespace, seq)
);
CREATE INDEX event_archives_by_stream ON event_archives (namespace, min_stream);

DO $$
DECLARE
    cut_ms bigint := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
    cut uuid := capibara_events_bound(cut_ms);
    next_pos bigint;
BEGIN
    ALTER TABLE events RENAME TO events_legacy;
    ALTER TABLE events_legacy RENAME CONSTRAINT events_stream_id_version_key
        TO events_legacy_stream_id_version_key;
    ALTER INDEX events_tx_position RENAME TO events_legacy_tx_position;
    DROP TRIGGER events_append_only ON events_legacy;
    SELECT coalesce(max(position), 0) + 1 INTO next_pos FROM events_legacy;
    -- A partition may not have an identity column of its own; the partitioned table's takes over.
    ALTER TABLE events_legacy ALTER COLUMN position DROP IDENTITY;

    CREATE TABLE events (
        position    bigint GENERATED ALWAYS AS IDENTITY,
        tx_id       xid8 NOT NULL DEFAULT pg_current_xact_id(),
        stream_id   uuid NOT NULL,
        stream_type text NOT NULL,
        version     bigint NOT NULL,
        type        text NOT NULL,
        data        jsonb NOT NULL,
        metadata    jsonb NOT NULL,
        recorded_at timestamptz NOT NULL,
        UNIQUE (stream_id, version)
    ) PARTITION BY RANGE (stream_id);
    EXECUTE format('ALTER TABLE events ALTER COLUMN position RESTART WITH %s', next_pos);
    CREATE INDEX events_position ON events (position);
    CREATE INDEX events_tx_position ON events (tx_id, position);

    CREATE TABLE events_default PARTITION OF events DEFAULT;
    -- Rows whose id lies above the cut (name-derived ids) move to the default partition.
    INSERT INTO events_default
        SELECT * FROM events_legacy WHERE stream_id >= cut;
    DELETE FROM events_legacy WHERE stream_id >= cut;
    -- A valid CHECK matching the bound spares ATTACH its own scan.
    EXECUTE format('ALTER TABLE events_legacy ADD CONSTRAINT events_legacy_range
                    CHECK (stream_id IS NOT NULL AND stream_id < %L)', cut);
    EXECUTE format('ALTER TABLE events ATTACH PARTITION events_legacy
                    FOR VALUES FROM (MINVALUE) TO (%L)', cut);
    ALTER TABLE events_legacy DROP CONSTRAINT events_legacy_range;

    INSERT INTO event_partitions (name, lo, hi, lo_at, hi_at)
    VALUES ('events_legacy', '00000000-0000-0000-0000-000000000000', cut,
            'epoch'::timestamptz, to_timestamp(cut_ms / 1000.0));
END $$;

-- The legacy table's own primary key on position is no longer needed (the partitioned index
-- on position covers it); its other indexes became the partition's parts of the new ones.
ALTER TABLE events_legacy DROP CONSTRAINT events_pkey;

CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION capibara_events_append_only();

-- Create the time partitions that cover up to `now() + ahead`, each `period` long, starting at
-- the highest existing upper bound (so a changed period never overlaps an existing partition).
-- Streams that landed in the default partition inside a new range move into it. Returns how
-- many partitions it created.
CREATE FUNCTION capibara_events_ensure_partitions(period interval, ahead interval)
RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    created int := 0;
    top_ms bigint;
    lo_ms bigint;
    hi_ms bigint;
    period_ms bigint := greatest((extract(epoch FROM period) * 1000)::bigint, 1000);
    until_ms bigint := (extract(epoch FROM now() + ahead) * 1000)::bigint;
    now_ms bigint := (extract(epoch FROM now()) * 1000)::bigint;
    part text;
    prev_lock_timeout text := current_setting('lock_timeout');
BEGIN
    -- One creator at a time (replicas, the admin command).
    PERFORM pg_advisory_xact_lock(7300000000000000001);
    SELECT (extract(epoch FROM max(hi_at)) * 1000)::bigint INTO top_ms FROM event_partitions;
    top_ms := coalesce(top_ms, now_ms);
    IF top_ms < until_ms THEN
        -- Writers take `events` itself, then the partitions (reading, then appending). Taking
        -- the default partition first and then waiting for a writer's read of it, while that
        -- writer waited for the default partition, deadlocked (40P01, a 503 to the client)
        -- when a scheduler started beside writers. `events` first, in ACCESS EXCLUSIVE mode:
        -- current readers and writers finish (one already holding a lock may take more), new
        -- ones wait for this short transaction. Give up after 5 s rather than hold writers
        -- behind a long reader: the partitions are made ahead, the next run retries.
        PERFORM set_config('lock_timeout', '5s', true);
        LOCK TABLE events IN ACCESS EXCLUSIVE MODE;
        PERFORM set_config('lock_timeout', prev_lock_timeout, true);
    END IF;
    WHILE top_ms < until_ms LOOP
        lo_ms := top_ms;
        -- A gap (nothing created for a while) closes with one partition up to the next
        -- period boundary after now; otherwise one period at a time, aligned to the epoch.
        hi_ms := (greatest(lo_ms, now_ms) / period_ms + 1) * period_ms;
        part := 'events_p' || lo_ms::text;
        EXECUTE format('CREATE TABLE %I (LIKE events INCLUDING DEFAULTS)', part);
        -- Rows already in the default partition for this range move here first, in one
        -- statement, while appends to the default partition wait (they would land there).
        LOCK TABLE events_default IN EXCLUSIVE MODE;
        PERFORM set_config('capibara.allow_event_rewrite', 'on', true);
        EXECUTE format('WITH moved AS (DELETE FROM events_default
                                        WHERE stream_id >= $1 AND stream_id < $2 RETURNING *)
                        INSERT INTO %I SELECT * FROM moved', part)
            USING capibara_events_bound(lo_ms), capibara_events_bound(hi_ms);
        PERFORM set_config('capibara.allow_event_rewrite', 'off', true);
        EXECUTE format('ALTER TABLE events ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                       part, capibara_events_bound(lo_ms), capibara_events_bound(hi_ms));
        INSERT INTO event_partitions (name, lo, hi, lo_at, hi_at)
        VALUES (part, capibara_events_bound(lo_ms), capibara_events_bound(hi_ms),
                to_timestamp(lo_ms / 1000.0), to_timestamp(hi_ms / 1000.0));
        created := created + 1;
        top_ms := hi_ms;
    END LOOP;
    RETURN created;
END $$;
