-- Custom headers a subscription sends with every delivery (`{"authorization": "Bearer …"}`).
-- Like the signing secret they live only in this configuration row: never in the event log,
-- never in API responses (which show the names only). See docs/deliveries.md.
ALTER TABLE subscriptions ADD COLUMN headers jsonb NOT NULL DEFAULT '{}'::jsonb;
