-- Debounce (docs/flow-control.md): a job submitted with a `debounce` key carries it while it
-- waits out its delay (the fold clears it once the job leaves `scheduled`). At most one such
-- job per key and namespace: a second submission that races the first to insert one fails
-- here and merges into the first instead (docs/flow-control-design.md).
ALTER TABLE jobs ADD COLUMN debounce_key text;
CREATE UNIQUE INDEX jobs_debounce_pending ON jobs (namespace, debounce_key)
    WHERE debounce_key IS NOT NULL;
