-- Deadlines (docs/flow-control.md): when a job that has not started is canceled (`expires_at`,
-- from `expires_at` or `ttl_s`), and when it must have ended across all attempts
-- (`deadline_at`, from `deadline_s`). The expirer of the scheduler's housekeeping reads the
-- waiting jobs past either through the partial index.
ALTER TABLE jobs ADD COLUMN expires_at timestamptz, ADD COLUMN deadline_at timestamptz;
CREATE INDEX jobs_expiring ON jobs (LEAST(expires_at, deadline_at))
    WHERE status IN ('queued', 'scheduled')
      AND (expires_at IS NOT NULL OR deadline_at IS NOT NULL);
