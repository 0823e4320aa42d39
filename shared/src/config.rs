//! Configuration from `CAPIBARA_*` environment variables (contract names: DESIGN §8).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Settings shared by every binary.
#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    /// One Redis server's URL, or a Redis Cluster's seed nodes ([`crate::redis_conn::RedisTarget::parse`]).
    pub redis_url: String,
    /// Prefix of every Redis key (one per deployment, or per test).
    pub redis_prefix: String,
    /// Dispatch shards, each a hash tag of its own holding the namespaces that hash to it
    /// (`CAPIBARA_REDIS_SHARDS`, 1–256, default 1; docs/redis-cluster.md). The same in every
    /// process of a deployment.
    pub redis_shards: u16,
    pub api_addr: SocketAddr,
    pub scheduler_addr: SocketAddr,
    pub worker_addr: SocketAddr,
    /// Bootstrap admin key for namespace `default`.
    pub admin_key: Option<String>,
    pub assets_dir: PathBuf,
    pub artifacts: String,
    /// The directory the `files` connector type reads, each namespace its `<root>/<namespace>/`
    /// (`CAPIBARA_FILES_ROOT`; unset: the type is off).
    pub files_root: Option<PathBuf>,
    pub webhook_secret: Option<String>,
    pub outbound_allow_private: bool,
    /// Consecutive failures of calls to one host that open its circuit breaker
    /// (`CAPIBARA_HTTP_BREAKER_FAILURES`, default 5; docs/http.md).
    pub http_breaker_failures: u32,
    /// How long an open breaker refuses calls (`CAPIBARA_HTTP_BREAKER_COOLDOWN_S`, default 30).
    pub http_breaker_cooldown: Duration,
    /// Consecutive failures of one LLM provider that open its circuit breaker
    /// (`CAPIBARA_LLM_BREAKER_FAILURES`, default 5; docs/llm.md).
    pub llm_breaker_failures: u32,
    /// How long an open provider breaker refuses calls (`CAPIBARA_LLM_BREAKER_COOLDOWN_S`,
    /// default 30).
    pub llm_breaker_cooldown: Duration,
    /// How long an MCP `tools/call` waits for its job or run before answering with a handle
    /// (`CAPIBARA_MCP_WAIT_S`, default 30; a call's `_meta["capibara/wait_s"]` may ask less).
    pub mcp_wait: Duration,
    /// How long a running attempt's lease lasts without a heartbeat.
    pub visibility_timeout: Duration,
    /// How long an attempt a protocol worker leased may run before its claim is written on its
    /// own (`CAPIBARA_WORKER_CLAIM_AFTER_MS`, default 250; 0 claims it before the lease call
    /// answers). A report sooner records `JobStarted` with it (docs/workers.md).
    pub worker_claim_after: Duration,
    /// How long a starting process waits for Postgres and Redis to answer before it gives up
    /// (`CAPIBARA_STARTUP_WAIT_S`, default 60; 0 fails at the first refusal).
    pub startup_wait: Duration,
    pub body_limit_bytes: usize,
    pub input_limit_bytes: usize,
    /// What one template may spend (`CAPIBARA_TEMPLATE_FUEL`,
    /// `CAPIBARA_TEMPLATE_OUTPUT_LIMIT_BYTES`); binaries that render install it with
    /// [`crate::domain::template::set_budget`] at startup.
    pub template_budget: crate::domain::template::Budget,
    /// Bounds on every HTTP listener's connections: header read timeout, connections at once,
    /// request head size (`CAPIBARA_HTTP_*`; docs/security.md, "Hostile input").
    pub http: crate::http_server::ServeLimits,
    /// Requests per second per API key (token bucket; burst = 2×).
    pub rate_limit_rps: u32,
    /// Failed authentications (unknown bearer tokens) allowed per client address per minute,
    /// in bursts of as many (`CAPIBARA_AUTH_FAILURES_PER_MIN`); beyond it 429.
    pub auth_failures_per_min: u32,
    /// Peers whose `X-Forwarded-For` names the client (`CAPIBARA_TRUSTED_PROXIES`, comma-separated
    /// IP addresses; default none: the TCP peer is the client).
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// SSE streams (job, run and firehose) one key may hold open at once on one API process
    /// (`CAPIBARA_SSE_MAX_STREAMS_PER_KEY`).
    pub sse_max_streams_per_key: usize,
    /// Secret that signs stream tokens (`CAPIBARA_STREAM_TOKEN_SECRET`); unset: a secret
    /// generated once and kept in Postgres, so every API process accepts every other's tokens.
    pub stream_token_secret: Option<String>,
    /// How long a stream token may be used to open a stream (`CAPIBARA_STREAM_TOKEN_TTL_S`,
    /// default 60, 1-3600); an open stream outlives it.
    pub stream_token_ttl: Duration,
    /// Origins allowed to call the API from a browser (`CAPIBARA_CORS_ORIGINS`, comma-separated
    /// like `https://ops.example.com`); empty (the default): same-origin only, no CORS headers.
    pub cors_origins: Vec<String>,
    /// How often an idle job/run SSE stream re-reads Postgres when no hint woke it
    /// (`CAPIBARA_SSE_FALLBACK_POLL`, default `15s`).
    pub sse_fallback_poll: Duration,
    pub db_max_connections: u32,
    /// Group-commit flushes that may run at once per process.
    pub append_flushers: usize,
    /// Appends that may wait for a flusher per process (`CAPIBARA_APPEND_QUEUE`, default
    /// 10000); beyond, callers wait for room up to `append_timeout`.
    pub append_queue: usize,
    /// Jobs that may wait for a worker before requests that create work are refused with 503
    /// (`CAPIBARA_MAX_BACKLOG`, default 1000000; 0: no bound).
    pub max_backlog: Option<u64>,
    /// How long a write to the event log may take before it is answered 503
    /// (`CAPIBARA_APPEND_TIMEOUT`, default `10s`).
    pub append_timeout: Duration,
    /// Delays between webhook delivery attempts (`CAPIBARA_DELIVERY_RETRY_SCHEDULE`,
    /// e.g. `5s,30s,2m`); a delivery is tried once more than the schedule is long.
    pub delivery_retry_schedule: Vec<Duration>,
    /// Terminal jobs' projection rows (and finished deliveries) older than this are pruned; the
    /// event log keeps everything. `CAPIBARA_RETENTION` (`30d` default, `0` = keep forever).
    pub retention: Option<Duration>,
    /// Jobs a bulk operation acts on per transaction (`CAPIBARA_BULK_PAGE_SIZE`, 1-1000).
    pub bulk_page_size: i64,
    /// Base URL under which the scheduler serves `/hooks/{id}` (returned when a trigger is created).
    pub hooks_public_url: String,
    /// How long `POST /v1/orchestrate` waits for the result before answering 202.
    pub orchestrate_wait_s: f64,
    /// Intents `POST /v1/orchestrate` only dry-runs without `confirm_dangerous`
    /// (`CAPIBARA_ORCHESTRATE_DANGEROUS`; set but empty = none).
    pub orchestrate_dangerous: crate::domain::orchestrate::DangerList,
    /// `code.run` settings (`CAPIBARA_CODE_*`, docs/code.md).
    pub code: CodeConfig,
    /// `tts.render` settings (`CAPIBARA_TTS_*`, docs/tts.md).
    pub tts: TtsConfig,
    /// The bounded event log (`CAPIBARA_EVENTS_*`, docs/event-log-retention.md).
    pub event_log: EventLogConfig,
    pub log_format: LogFormat,
}

/// Partitioning and archiving of the `events` table.
#[derive(Debug, Clone)]
pub struct EventLogConfig {
    /// How long after a partition's period ends its finished streams are archived and the
    /// partition dropped (`CAPIBARA_EVENTS_RETENTION`, default `30d`; `0` = never).
    pub retention: Option<Duration>,
    /// The period of creation times one partition covers (`CAPIBARA_EVENTS_PARTITION`,
    /// default `7d`).
    pub partition: Duration,
    /// How often the scheduler creates partitions ahead and archives old ones
    /// (`CAPIBARA_EVENTS_ARCHIVE_EVERY`, default `5m`).
    pub archive_every: Duration,
}

impl Default for EventLogConfig {
    fn default() -> Self {
        EventLogConfig {
            retention: Some(Duration::from_secs(30 * 86400)),
            partition: Duration::from_secs(7 * 86400),
            archive_every: Duration::from_secs(300),
        }
    }
}

/// `tts.render` settings.
#[derive(Debug, Clone)]
pub struct TtsConfig {
    /// ONNX Runtime intra-op threads per model call (`CAPIBARA_TTS_THREADS`, default 1: on a
    /// busy worker several jobs render at once, each on its own core).
    pub threads: usize,
    /// ONNX Runtime's shared library (`CAPIBARA_ORT_LIBRARY`); default: the newest
    /// `libonnxruntime.so*` in `<assets>/lib`.
    pub ort_library: Option<PathBuf>,
    /// Piper voices (`CAPIBARA_TTS_VOICES_DIR`, default `<assets>/voices`).
    pub voices_dir: PathBuf,
}

/// `code.run` settings.
#[derive(Debug, Clone)]
pub struct CodeConfig {
    /// How long a cached result is served (`CAPIBARA_CODE_CACHE_TTL`, default `24h`).
    pub cache_ttl: Duration,
    /// CPU budget (wasm fuel units) for every run; `None` = not metered, which keeps the
    /// code ~40 % faster (`CAPIBARA_CODE_FUEL`, default `0` = off).
    pub fuel: Option<u64>,
    /// Where compiled wasm modules are kept (`CAPIBARA_CODE_COMPILED_DIR`, default
    /// `<assets>/compiled`).
    pub compiled_dir: Option<PathBuf>,
    /// Runs at once per worker: the sandbox's blocking pool (`CAPIBARA_CODE_THREADS`, default
    /// the number of cores).
    pub threads: Option<usize>,
    /// Bytes one run may keep in its scratch directory `/tmp`
    /// (`CAPIBARA_CODE_SCRATCH_LIMIT_BYTES`, default 64 MiB); beyond: `scratch_limit`.
    pub scratch_limit_bytes: u64,
}

/// A setting that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    pub var: &'static str,
    pub message: String,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn parse<T: std::str::FromStr>(name: &'static str, default: T) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match var(name) {
        None => Ok(default),
        Some(v) => v.trim().parse().map_err(|e: T::Err| ConfigError {
            var: name,
            message: format!("cannot parse `{v}`: {e}"),
        }),
    }
}

fn flag(name: &'static str, default: bool) -> Result<bool, ConfigError> {
    match var(name).as_deref().map(str::to_ascii_lowercase).as_deref() {
        None => Ok(default),
        Some("1" | "true" | "yes" | "on") => Ok(true),
        Some("0" | "false" | "no" | "off") => Ok(false),
        Some(v) => Err(ConfigError {
            var: name,
            message: format!("expected true or false, got `{v}`"),
        }),
    }
}

/// About 24 hours of retries: 5 s, 30 s, 2 min, 10 min, 30 min, 1 h, 2 h, 4 h, 8 h, 8 h.
pub const DEFAULT_DELIVERY_SCHEDULE: &str = "5s,30s,2m,10m,30m,1h,2h,4h,8h,8h";

/// Parse a duration like `250ms`, `5s`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit() && c != '.')?);
    let n: f64 = num.parse().ok()?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

fn parse_schedule(var: &'static str, v: &str) -> Result<Vec<Duration>, ConfigError> {
    v.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            parse_duration(p).ok_or_else(|| ConfigError {
                var,
                message: format!("`{p}` is not a duration like 500ms, 5s, 2m or 1h"),
            })
        })
        .collect()
}

impl Config {
    /// Read the environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        let webhook_secret = var("CAPIBARA_WEBHOOK_SECRET");
        if let Some(s) = &webhook_secret {
            if !s.starts_with("whsec_") {
                return Err(ConfigError {
                    var: "CAPIBARA_WEBHOOK_SECRET",
                    message: "must look like whsec_<base64>".into(),
                });
            }
        }
        Ok(Config {
            database_url: var("CAPIBARA_DATABASE_URL")
                .unwrap_or_else(|| "postgres://capibara@127.0.0.1:5432/capibara".into()),
            redis_url: var("CAPIBARA_REDIS_URL")
                .unwrap_or_else(|| "redis://127.0.0.1:6379/".into()),
            redis_prefix: var("CAPIBARA_REDIS_PREFIX").unwrap_or_else(|| "capibara".into()),
            redis_shards: match parse("CAPIBARA_REDIS_SHARDS", 1u16)? {
                n @ 1..=256 => n,
                n => {
                    return Err(ConfigError {
                        var: "CAPIBARA_REDIS_SHARDS",
                        message: format!("{n} is not a shard count from 1 to 256"),
                    })
                }
            },
            api_addr: parse(
                "CAPIBARA_API_ADDR",
                "127.0.0.1:8080".parse().expect("literal"),
            )?,
            scheduler_addr: parse(
                "CAPIBARA_SCHEDULER_ADDR",
                "127.0.0.1:8081".parse().expect("literal"),
            )?,
            worker_addr: parse(
                "CAPIBARA_WORKER_ADDR",
                "127.0.0.1:8082".parse().expect("literal"),
            )?,
            admin_key: var("CAPIBARA_ADMIN_KEY"),
            assets_dir: var("CAPIBARA_ASSETS_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(".capibara/assets")),
            artifacts: var("CAPIBARA_ARTIFACTS").unwrap_or_else(|| ".capibara/artifacts".into()),
            files_root: var("CAPIBARA_FILES_ROOT").map(PathBuf::from),
            webhook_secret,
            outbound_allow_private: flag("CAPIBARA_OUTBOUND_ALLOW_PRIVATE", false)?,
            http_breaker_failures: parse("CAPIBARA_HTTP_BREAKER_FAILURES", 5u32)?.max(1),
            http_breaker_cooldown: Duration::from_secs_f64(
                parse("CAPIBARA_HTTP_BREAKER_COOLDOWN_S", 30.0f64)?.clamp(0.1, 86_400.0),
            ),
            llm_breaker_failures: parse("CAPIBARA_LLM_BREAKER_FAILURES", 5u32)?.max(1),
            llm_breaker_cooldown: Duration::from_secs_f64(
                parse("CAPIBARA_LLM_BREAKER_COOLDOWN_S", 30.0f64)?.clamp(0.1, 86_400.0),
            ),
            mcp_wait: Duration::from_secs_f64(
                parse("CAPIBARA_MCP_WAIT_S", 30.0f64)?.clamp(0.0, 60.0),
            ),
            visibility_timeout: Duration::from_secs_f64(
                parse("CAPIBARA_VISIBILITY_TIMEOUT_S", 30.0f64)?.max(0.5),
            ),
            worker_claim_after: Duration::from_millis(
                parse("CAPIBARA_WORKER_CLAIM_AFTER_MS", 250u64)?.min(60_000),
            ),
            startup_wait: Duration::from_secs_f64(
                parse("CAPIBARA_STARTUP_WAIT_S", 60.0f64)?.clamp(0.0, 86_400.0),
            ),
            body_limit_bytes: parse("CAPIBARA_BODY_LIMIT_BYTES", 10 * 1024 * 1024)?,
            input_limit_bytes: parse("CAPIBARA_INPUT_LIMIT_BYTES", 1024 * 1024)?,
            template_budget: crate::domain::template::Budget {
                fuel: parse(
                    "CAPIBARA_TEMPLATE_FUEL",
                    crate::domain::template::Budget::DEFAULT.fuel,
                )?
                .max(1),
                output_bytes: parse(
                    "CAPIBARA_TEMPLATE_OUTPUT_LIMIT_BYTES",
                    crate::domain::template::Budget::DEFAULT.output_bytes,
                )?
                .max(1),
            },
            http: crate::http_server::ServeLimits {
                header_read_timeout: Duration::from_secs_f64(
                    parse(
                        "CAPIBARA_HTTP_HEADER_TIMEOUT_S",
                        crate::http_server::ServeLimits::DEFAULT
                            .header_read_timeout
                            .as_secs_f64(),
                    )?
                    .clamp(0.1, 3600.0),
                ),
                max_connections: parse(
                    "CAPIBARA_HTTP_MAX_CONNECTIONS",
                    crate::http_server::ServeLimits::DEFAULT.max_connections,
                )?
                .clamp(1, 1 << 20),
                max_header_bytes: parse(
                    "CAPIBARA_HTTP_MAX_HEADER_BYTES",
                    crate::http_server::ServeLimits::DEFAULT.max_header_bytes,
                )?
                .clamp(8192, 1 << 20),
            },
            rate_limit_rps: parse("CAPIBARA_RATE_LIMIT_RPS", 2000)?,
            auth_failures_per_min: parse("CAPIBARA_AUTH_FAILURES_PER_MIN", 60u32)?.max(1),
            trusted_proxies: var("CAPIBARA_TRUSTED_PROXIES")
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| {
                    p.parse().map_err(|_| ConfigError {
                        var: "CAPIBARA_TRUSTED_PROXIES",
                        message: format!("`{p}` is not an IP address"),
                    })
                })
                .collect::<Result<_, _>>()?,
            sse_max_streams_per_key: parse("CAPIBARA_SSE_MAX_STREAMS_PER_KEY", 100usize)?.max(1),
            stream_token_secret: var("CAPIBARA_STREAM_TOKEN_SECRET"),
            stream_token_ttl: Duration::from_secs(
                parse("CAPIBARA_STREAM_TOKEN_TTL_S", 60u64)?.clamp(1, 3600),
            ),
            cors_origins: var("CAPIBARA_CORS_ORIGINS")
                .unwrap_or_default()
                .split(',')
                .map(|o| o.trim().trim_end_matches('/').to_string())
                .filter(|o| !o.is_empty())
                .map(|o| {
                    if o.starts_with("http://") || o.starts_with("https://") {
                        Ok(o)
                    } else {
                        Err(ConfigError {
                            var: "CAPIBARA_CORS_ORIGINS",
                            message: format!("`{o}` is not an origin like https://ops.example.com"),
                        })
                    }
                })
                .collect::<Result<_, _>>()?,
            sse_fallback_poll: match var("CAPIBARA_SSE_FALLBACK_POLL") {
                None => Duration::from_secs(15),
                Some(v) => {
                    parse_duration(&v)
                        .filter(|d| !d.is_zero())
                        .ok_or_else(|| ConfigError {
                            var: "CAPIBARA_SSE_FALLBACK_POLL",
                            message: format!("`{v}` is not a duration like 500ms, 15s or 1m"),
                        })?
                }
            },
            db_max_connections: parse("CAPIBARA_DB_MAX_CONNECTIONS", 16)?,
            append_flushers: parse("CAPIBARA_APPEND_FLUSHERS", 2usize)?.max(1),
            append_queue: parse("CAPIBARA_APPEND_QUEUE", 10_000usize)?.max(1),
            max_backlog: Some(parse("CAPIBARA_MAX_BACKLOG", 1_000_000u64)?).filter(|n| *n > 0),
            append_timeout: match var("CAPIBARA_APPEND_TIMEOUT") {
                None => Duration::from_secs(10),
                Some(v) => {
                    parse_duration(&v)
                        .filter(|d| !d.is_zero())
                        .ok_or_else(|| ConfigError {
                            var: "CAPIBARA_APPEND_TIMEOUT",
                            message: format!("`{v}` is not a duration like 500ms, 10s or 1m"),
                        })?
                }
            },
            bulk_page_size: parse("CAPIBARA_BULK_PAGE_SIZE", 200i64)?.clamp(1, 1000),
            retention: match var("CAPIBARA_RETENTION").as_deref() {
                None => Some(Duration::from_secs(30 * 86400)),
                Some("0") => None,
                Some(v) => Some(parse_duration(v).ok_or_else(|| ConfigError {
                    var: "CAPIBARA_RETENTION",
                    message: format!("`{v}` is not a duration like 30d, 12h or 0"),
                })?),
            },
            hooks_public_url: var("CAPIBARA_HOOKS_PUBLIC_URL").unwrap_or_else(|| {
                format!(
                    "http://{}",
                    var("CAPIBARA_SCHEDULER_ADDR").unwrap_or_else(|| "127.0.0.1:8081".into())
                )
            }),
            orchestrate_wait_s: parse("CAPIBARA_ORCHESTRATE_WAIT_S", 8.0f64)?.clamp(0.0, 60.0),
            orchestrate_dangerous: std::env::var("CAPIBARA_ORCHESTRATE_DANGEROUS")
                .unwrap_or_else(|_| crate::domain::orchestrate::DangerList::DEFAULT.into())
                .parse()
                .map_err(|message| ConfigError {
                    var: "CAPIBARA_ORCHESTRATE_DANGEROUS",
                    message,
                })?,
            code: CodeConfig {
                cache_ttl: match var("CAPIBARA_CODE_CACHE_TTL") {
                    None => Duration::from_secs(86400),
                    Some(v) => parse_duration(&v).ok_or_else(|| ConfigError {
                        var: "CAPIBARA_CODE_CACHE_TTL",
                        message: format!("`{v}` is not a duration like 30m, 24h or 7d"),
                    })?,
                },
                fuel: Some(parse("CAPIBARA_CODE_FUEL", 0u64)?).filter(|f| *f > 0),
                compiled_dir: var("CAPIBARA_CODE_COMPILED_DIR").map(PathBuf::from),
                threads: Some(parse("CAPIBARA_CODE_THREADS", 0usize)?).filter(|t| *t > 0),
                scratch_limit_bytes: parse("CAPIBARA_CODE_SCRATCH_LIMIT_BYTES", 64 * 1024 * 1024)?,
            },
            delivery_retry_schedule: parse_schedule(
                "CAPIBARA_DELIVERY_RETRY_SCHEDULE",
                var("CAPIBARA_DELIVERY_RETRY_SCHEDULE")
                    .as_deref()
                    .unwrap_or(DEFAULT_DELIVERY_SCHEDULE),
            )?,
            event_log: EventLogConfig {
                retention: match var("CAPIBARA_EVENTS_RETENTION").as_deref() {
                    None => EventLogConfig::default().retention,
                    Some("0") => None,
                    Some(v) => Some(parse_duration(v).ok_or_else(|| ConfigError {
                        var: "CAPIBARA_EVENTS_RETENTION",
                        message: format!("`{v}` is not a duration like 30d, 12h or 0"),
                    })?),
                },
                partition: match var("CAPIBARA_EVENTS_PARTITION") {
                    None => EventLogConfig::default().partition,
                    Some(v) => {
                        parse_duration(&v)
                            .filter(|d| d.as_secs() >= 1)
                            .ok_or_else(|| ConfigError {
                                var: "CAPIBARA_EVENTS_PARTITION",
                                message: format!("`{v}` is not a duration of 1s or more like 7d"),
                            })?
                    }
                },
                archive_every: match var("CAPIBARA_EVENTS_ARCHIVE_EVERY") {
                    None => EventLogConfig::default().archive_every,
                    Some(v) => {
                        parse_duration(&v)
                            .filter(|d| !d.is_zero())
                            .ok_or_else(|| ConfigError {
                                var: "CAPIBARA_EVENTS_ARCHIVE_EVERY",
                                message: format!("`{v}` is not a duration like 30s or 5m"),
                            })?
                    }
                },
            },
            tts: TtsConfig {
                threads: parse("CAPIBARA_TTS_THREADS", 1usize)?.clamp(1, 64),
                ort_library: var("CAPIBARA_ORT_LIBRARY").map(PathBuf::from),
                voices_dir: var("CAPIBARA_TTS_VOICES_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| {
                        var("CAPIBARA_ASSETS_DIR")
                            .map(PathBuf::from)
                            .unwrap_or_else(|| PathBuf::from(".capibara/assets"))
                            .join("voices")
                    }),
            },
            log_format: match var("CAPIBARA_LOG_FORMAT").as_deref() {
                Some("pretty") => LogFormat::Pretty,
                Some("json") | None => LogFormat::Json,
                Some(other) => {
                    return Err(ConfigError {
                        var: "CAPIBARA_LOG_FORMAT",
                        message: format!("expected json or pretty, got `{other}`"),
                    })
                }
            },
        })
    }
}
