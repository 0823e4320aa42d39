-- Secrets a workflow step's template referred to (set by the workflow engine only). The worker
-- resolves `${secret:NAME}` in a job's input for these names and no others: a reference a client
-- wrote into a job (POST /v1/jobs, batch, orchestrate, schedules, triggers) stays a literal
-- string. Jobs submitted before this column existed have none, so they resolve nothing.
ALTER TABLE jobs ADD COLUMN secret_refs jsonb;
