-- The write path in one statement (docs/write-path.md).
--
-- `streams.version` is no longer the optimistic-concurrency token: the events' own
-- `UNIQUE (stream_id, version)` carries it (an append at a version another writer took first
-- inserts nothing and loses), so an append no longer locks and rewrites its stream's row. The
-- row stays as the catalog of streams (type, namespace, creation), written once.
ALTER TABLE streams DROP COLUMN version;

-- Raised by an append written as one autocommit statement when part of it did not apply (a
-- version or an idempotency key another writer took first, or a stream not at the version the
-- append expects): the whole statement rolls back and the appender finds the losers in a
-- transaction. SQLSTATE CBC01 is Capibara's own.
CREATE FUNCTION capibara_append_applied(
    guard boolean, events_wanted int, events_written bigint,
    streams_wanted int, streams_written bigint, commands_wanted int, commands_written bigint,
    tips_wanted int, tips_found bigint
) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF guard AND (events_written <> events_wanted OR streams_written <> streams_wanted
                  OR commands_written <> commands_wanted OR tips_found <> tips_wanted) THEN
        RAISE EXCEPTION 'append did not apply' USING ERRCODE = 'CBC01';
    END IF;
    RETURN true;
END $$;
