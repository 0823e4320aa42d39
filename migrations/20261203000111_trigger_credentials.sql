-- Trigger credentials live beside the log, never in it (docs/security.md, "Trigger credentials").
-- Safe to run again (a test replays it over a trigger made to look pre-fix).
-- `TriggerCreated` used to carry the raw bearer token or signing secret, readable by any `read`
-- key through GET /v1/events. From now on the event keeps the scheme only and the hook checks calls
-- against this table: a bearer token as its SHA-256 (hex), a signing secret as given (verifying a
-- signature needs the key; like subscription secrets and /v1/secrets values it is protected by the
-- database's access control and encryption at rest, not by the log's readers).
CREATE TABLE IF NOT EXISTS trigger_credentials (
    trigger_id uuid PRIMARY KEY,
    namespace  text NOT NULL,
    credential jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Triggers created before this migration: move their credential here ...
INSERT INTO trigger_credentials (trigger_id, namespace, credential)
SELECT e.stream_id, s.namespace,
       CASE e.data->'auth'->>'type'
           WHEN 'bearer' THEN jsonb_build_object(
               'type', 'bearer',
               'token_sha256', encode(sha256(convert_to(e.data->'auth'->>'token', 'UTF8')), 'hex'))
           ELSE e.data->'auth'
       END
FROM events e JOIN streams s ON s.stream_id = e.stream_id
WHERE e.type = 'TriggerCreated'
  AND coalesce(e.data->'auth'->>'token', e.data->'auth'->>'secret', '***') <> '***'
ON CONFLICT (trigger_id) DO NOTHING;

-- ... and remove it from the log and the projection. The append-only guard lets a migration
-- rewrite events when `capibara.allow_event_rewrite` is on; it returned OLD for updates too,
-- which silently kept the old row, so it now returns the new row of an allowed UPDATE.
CREATE OR REPLACE FUNCTION capibara_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('capibara.allow_event_rewrite', true) = 'on' THEN
        IF TG_OP = 'UPDATE' THEN
            RETURN NEW;
        END IF;
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'the events table is append-only';
END $$;

SET LOCAL capibara.allow_event_rewrite = 'on';
UPDATE events
SET data = jsonb_set(data, '{auth}',
        CASE WHEN data->'auth' ? 'token' THEN data->'auth' || '{"token": "***"}'::jsonb
             ELSE data->'auth' || '{"secret": "***"}'::jsonb END)
WHERE type = 'TriggerCreated'
  AND coalesce(data->'auth'->>'token', data->'auth'->>'secret', '***') <> '***';
SET LOCAL capibara.allow_event_rewrite = 'off';

UPDATE triggers
SET auth = CASE WHEN auth ? 'token' THEN auth || '{"token": "***"}'::jsonb
                ELSE auth || '{"secret": "***"}'::jsonb END
WHERE coalesce(auth->>'token', auth->>'secret', '***') <> '***';
