-- Secrets every API process must share, generated once by the first process that needs one
-- (today: `stream_tokens`, the HMAC key of stream tokens unless CAPIBARA_STREAM_TOKEN_SECRET
-- is set; docs/security.md, "Stream tokens").
CREATE TABLE IF NOT EXISTS server_secrets (
    name text PRIMARY KEY,
    secret bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
