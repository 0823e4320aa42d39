-- Secrets workflow steps refer to by name (`{{ secrets.NAME }}`). Values live only here, never in
-- the event log: templates render a `${secret:NAME}` reference into the step's job input, and the
-- worker replaces it with the value right before the executor runs.
CREATE TABLE secrets (
    namespace  text NOT NULL,
    name       text NOT NULL,
    value      text NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (namespace, name)
);
