-- LLM providers (docs/llm.md): the projection of the `llm_provider` streams.
CREATE TABLE llm_providers (
    id         uuid PRIMARY KEY,
    namespace  text NOT NULL,
    name       text NOT NULL,
    definition jsonb NOT NULL,
    deleted    boolean NOT NULL,
    version    bigint NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE INDEX llm_providers_namespace ON llm_providers (namespace, name) WHERE NOT deleted;
