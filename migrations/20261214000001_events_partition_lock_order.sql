-- capibara_events_ensure_partitions takes `events` before any partition (docs/event-log-retention.md):
-- creating a partition next to running appends deadlocked (the chaos and full test runs saw
-- `deadlock detected` between an append and a scheduler starting).
CREATE OR REPLACE FUNCTION capibara_events_ensure_partitions(period interval, ahead interval)
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
