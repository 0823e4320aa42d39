-- W3C trace context (docs/observability.md "Traces"): what submitted a job or started a run,
-- continued by its attempts, step jobs, callbacks and push calls. Written once, at creation.
ALTER TABLE jobs ADD COLUMN traceparent text;
ALTER TABLE runs ADD COLUMN traceparent text;
