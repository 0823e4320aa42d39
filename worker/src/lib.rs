//! Capibara's worker: the runtime that claims, runs and reports jobs, and the executors.
//!
//! # Layout
//! - [`runtime`]: fetch, claim (fenced), heartbeat, timeout, cancel, report, graceful shutdown.
//! - [`executors`]: the [`executors::Executor`] trait and one module per executor.
//! - [`delivery_port`]: the Postgres side of webhook deliveries.
//! - [`code_cache_port`]: the Postgres side of `code.run`'s result cache.
//! - [`connector_port`]: the Postgres side of `connector.fetch` (connectors, seen items).
//! - [`content`]: the text operations of `content.process`; [`content_port`]: where it reads
//!   an earlier job's artifact.
//! - [`sources`]: where `connector.fetch` lists items, one module per connector type.
//! - [`http`]: outbound HTTP with the SSRF guard; [`fetch`]: GETs that follow redirects.

pub mod breakers;
pub mod code_cache_port;
pub mod connector_port;
pub mod content;
pub mod content_port;
pub mod delivery_port;
pub mod executors;
pub mod fetch;
pub mod http;
pub mod llm;
pub mod llm_port;
pub mod memory_port;
pub mod model_port;
pub mod models;
pub mod runtime;
pub mod sources;
mod supervisor;

pub use runtime::{run, WorkerOptions};

use std::sync::Arc;

use capibara_shared::{config::Config, ops, store::Store};

/// What a worker loads ahead of its first job, and where it reports readiness.
#[derive(Clone, Default)]
pub struct WarmUp {
    /// The queues this worker serves: the TTS voice is loaded only when `tts` is one of them.
    pub queues: Vec<String>,
    /// Reported by the worker's `/readyz` (`tts_voice`).
    pub components: ops::Components,
}

/// Every executor of this worker, configured from `config`; starts loading what `warm` asks for.
pub fn registry(store: &Store, config: &Config, warm: &WarmUp) -> executors::Registry {
    // One encoder per process, for `text.embed` and `content.process`'s `embed`.
    let encoder = Arc::new(models::encoder::SharedEncoder::new(&config.assets_dir));
    // The same model as differentiable layers, for training and serving fine-tuned models.
    let base = Arc::new(models::bert::SharedBase::new(&config.assets_dir));
    let mut registry = executors::Registry::with_callbacks(executors::callback::CallbackDeliver {
        port: Arc::new(delivery_port::PgDeliveryPort {
            store: store.clone(),
            default_secret: config.webhook_secret.clone(),
        }),
        policy: http::OutboundPolicy {
            allow_private: config.outbound_allow_private,
            ..Default::default()
        },
        schedule: config.delivery_retry_schedule.clone(),
    });
    register_code(&mut registry, store, config);
    registry.register(
        "chat.post",
        Arc::new(executors::chat::ChatPost {
            policy: http::OutboundPolicy {
                allow_private: config.outbound_allow_private,
                ..Default::default()
            },
        }),
    );
    registry.register(
        "http.request",
        Arc::new(executors::http_request::HttpRequest::new(
            Arc::new(executors::mail::PgSecrets {
                store: store.clone(),
            }),
            config,
        )),
    );
    let llm = Arc::new(executors::llm::Llm::new(
        Arc::new(llm_port::PgProviders {
            store: store.clone(),
        }),
        Arc::new(executors::mail::PgSecrets {
            store: store.clone(),
        }),
        config,
    ));
    registry.register("llm.generate", llm.clone());
    registry.register("llm.chat", llm);
    registry.register(
        "mcp.call",
        Arc::new(executors::mcp_call::McpCall {
            secrets: Arc::new(executors::mail::PgSecrets {
                store: store.clone(),
            }),
            allow_private: config.outbound_allow_private,
        }),
    );
    registry.register(
        "mail.send",
        Arc::new(executors::mail::MailSend {
            secrets: Arc::new(executors::mail::PgSecrets {
                store: store.clone(),
            }),
            policy: http::OutboundPolicy {
                allow_private: config.outbound_allow_private,
                ..Default::default()
            },
        }),
    );
    registry.register(
        "connector.fetch",
        Arc::new(executors::connector::ConnectorFetch {
            store: Arc::new(connector_port::PgConnectorStore {
                store: store.clone(),
                actor: "worker".into(),
            }),
            artifacts: capibara_shared::artifacts::ArtifactStore::open(&config.artifacts)
                .map_err(|e| e.to_string()),
            policy: http::OutboundPolicy {
                allow_private: config.outbound_allow_private,
                ..Default::default()
            },
            files_root: config.files_root.clone(),
        }),
    );
    registry.register(
        "content.process",
        Arc::new(executors::content::ContentProcess {
            artifacts: Arc::new(content_port::PgArtifactReader {
                store: store.clone(),
                artifacts: capibara_shared::artifacts::ArtifactStore::open(&config.artifacts)
                    .map_err(|e| e.to_string()),
            }),
            encoder: encoder.clone(),
        }),
    );
    registry.register(
        "text.embed",
        Arc::new(executors::embed::TextEmbed {
            encoder: encoder.clone(),
        }),
    );
    let models: Arc<dyn executors::finetune::ModelStore> = Arc::new(model_port::PgModelStore {
        store: store.clone(),
        artifacts: capibara_shared::artifacts::ArtifactStore::open(&config.artifacts)
            .map_err(|e| e.to_string()),
    });
    registry.register(
        "finetune.train",
        Arc::new(executors::finetune::FinetuneTrain {
            encoder: encoder.clone(),
            base: base.clone(),
            models: models.clone(),
            reader: Arc::new(content_port::PgArtifactReader {
                store: store.clone(),
                artifacts: capibara_shared::artifacts::ArtifactStore::open(&config.artifacts)
                    .map_err(|e| e.to_string()),
            }),
            policy: http::OutboundPolicy {
                allow_private: config.outbound_allow_private,
                ..Default::default()
            },
        }),
    );
    registry.register(
        "text.chunk",
        Arc::new(executors::chunk::TextChunk::new(
            models::encoder::Encoder::dir(&config.assets_dir),
        )),
    );
    let memory: Arc<dyn executors::memory::MemoryStore> = Arc::new(memory_port::PgMemoryStore {
        store: store.clone(),
    });
    registry.register(
        "memory.write",
        Arc::new(executors::memory::MemoryWrite {
            encoder: encoder.clone(),
            store: memory.clone(),
        }),
    );
    registry.register(
        "memory.search",
        Arc::new(executors::memory::MemorySearch {
            encoder: encoder.clone(),
            store: memory,
            index: Arc::default(),
        }),
    );
    registry.register(
        "model.classify",
        Arc::new(executors::classify::ModelClassify::new(
            encoder.clone(),
            base,
            models,
        )),
    );
    executors::tts::register(&mut registry, config, warm);
    registry.with_push(executors::PushSupport {
        secret: config
            .webhook_secret
            .as_deref()
            .and_then(|s| capibara_shared::domain::webhook::WebhookSecret::parse(s).ok()),
        policy: http::OutboundPolicy {
            allow_private: config.outbound_allow_private,
            ..Default::default()
        },
    })
}

/// `code.run` and `code.validate` share one sandbox, loaded in the background from now on.
fn register_code(registry: &mut executors::Registry, store: &Store, config: &Config) {
    let mut sandbox = capibara_sandbox::SandboxConfig::new(&config.assets_dir);
    if let Some(dir) = &config.code.compiled_dir {
        sandbox.cache_dir = dir.clone();
    }
    sandbox.fuel = config.code.fuel;
    sandbox.scratch_limit = config.code.scratch_limit_bytes;
    let pool = executors::code::SandboxPool::new(sandbox, config.code.threads);
    if tokio::runtime::Handle::try_current().is_ok() {
        pool.warm_up();
    }
    registry.register(
        "code.run",
        Arc::new(executors::code::CodeRun {
            pool: pool.clone(),
            cache: Arc::new(code_cache_port::PgResultCache {
                store: store.clone(),
                ttl: config.code.cache_ttl,
            }),
        }),
    );
    registry.register(
        "code.validate",
        Arc::new(executors::code::CodeValidate { pool }),
    );
}
