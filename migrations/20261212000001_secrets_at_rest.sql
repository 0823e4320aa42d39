-- Secrets encrypted at rest (docs/security.md, "Secrets encrypted at rest"). A row's `key_id`
-- names the key its value is encrypted under (`v1:<key-id>:<base64>` in the value column); NULL
-- is a row written before encryption, still plain text until the re-encryption pass (the
-- scheduler at startup, `capibara secrets rotate`) rewrites it. A migration cannot encrypt: the
-- key never reaches Postgres.
ALTER TABLE secrets ADD COLUMN IF NOT EXISTS key_id text;
ALTER TABLE trigger_credentials ADD COLUMN IF NOT EXISTS key_id text;
ALTER TABLE server_secrets ADD COLUMN IF NOT EXISTS key_id text;
