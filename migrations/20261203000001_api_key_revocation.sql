-- Super-admin keys (may manage keys of every namespace) and who revoked a key.
ALTER TABLE api_keys
    ADD COLUMN super_admin boolean NOT NULL DEFAULT false,
    ADD COLUMN revoked_by  text;
