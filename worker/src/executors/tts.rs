//! `tts.render`: text to speech with [`capibara_tts`]. Thin on purpose: the engine renders
//! sentence by sentence on a blocking thread; this executor turns each sentence into a
//! `JobOutputChunk`, stores the whole file as an artifact and reports the output.
//!
//! Input {text, voice?, speed?, noise_scale?, noise_w?, format? (wav | pcm_s16le),
//! sample_rate?}; output {duration_s, sample_rate, voice, engine, format, sentences, chars,
//! chars_per_second, render_ms, real_time_factor, first_chunk_ms, model_loaded, artifact}
//! (`model_loaded`: this job loaded the voice's model, a cold start). Chunk data:
//! {index, total, text, format, sample_rate, duration_s, audio (base64)}.

use std::{ops::ControlFlow, sync::Arc};

use async_trait::async_trait;
use base64::Engine as _;
use capibara_shared::{
    artifacts::ArtifactStore,
    config::Config,
    domain::{
        job::JobError,
        kinds::{
            input::{self, TtsFormat, TtsRenderInput},
            output::TtsRenderOutput,
        },
    },
};
use capibara_tts::{Engine, EngineConfig, Format, RenderOptions, Segment, TtsError};
use serde_json::json;

use super::{builtin::to_output, ExecError, Executor, JobContext, Output, Registry};

/// The `tts.render` executor: one engine (and so one session per voice) per worker process.
pub struct TtsRender {
    pub engine: Arc<Engine>,
    /// `None` when `CAPIBARA_ARTIFACTS` could not be opened: jobs then fail with that reason.
    pub artifacts: Result<ArtifactStore, String>,
}

/// Register `tts.render` with an engine over the configured assets. When the worker serves the
/// `tts` queue, the default voice is loaded in the background from now on ([`warm_up`]).
pub fn register(registry: &mut Registry, config: &Config, warm: &crate::WarmUp) {
    let mut engine = EngineConfig::from_assets_dir(&config.assets_dir);
    engine.voices_dir = config.tts.voices_dir.clone();
    engine.ort_library = config.tts.ort_library.clone();
    engine.intra_threads = config.tts.threads;
    if capibara_tts::voices::scan(&engine.voices_dir).is_empty() {
        tracing::warn!(
            dir = %engine.voices_dir.display(),
            "no Piper voice found (run deploy/fetch-assets.sh); tts.render falls back to espeak-ng's voice"
        );
    }
    let artifacts = ArtifactStore::open(&config.artifacts).map_err(|e| e.to_string());
    if let Err(e) = &artifacts {
        tracing::error!(error = %e, "artifact store unavailable; tts.render jobs will fail");
    }
    let engine = Arc::new(Engine::new(engine));
    if warm.queues.iter().any(|q| q == QUEUE) && tokio::runtime::Handle::try_current().is_ok() {
        warm_up(engine.clone(), warm.components.clone());
    }
    registry.register("tts.render", Arc::new(TtsRender { engine, artifacts }));
}

/// The queue `tts.render` jobs go to.
const QUEUE: &str = "tts";
/// The `/readyz` entry of the default voice.
pub const READY_COMPONENT: &str = "tts_voice";

/// Load the default voice on a blocking thread and report it: `/readyz` says `tts_voice:
/// loading` (503) until it is done, then `ok`, or `failed` with the reason (jobs then load on
/// first use as before); the gauge `capibara_tts_voice_ready` turns 1 when it is ready.
fn warm_up(engine: Arc<Engine>, components: capibara_shared::ops::Components) {
    use capibara_shared::ops::ComponentState;
    components.set(READY_COMPONENT, ComponentState::Loading);
    tokio::spawn(async move {
        let voice = engine.default_voice();
        let started = std::time::Instant::now();
        let e2 = engine.clone();
        let v2 = voice.clone();
        let result = tokio::task::spawn_blocking(move || e2.warm_up(&v2))
            .await
            .map_err(|e| format!("warm-up panicked: {e}"))
            .and_then(|r| r.map_err(|e| e.to_string()));
        match result {
            Ok(loaded) => {
                if loaded {
                    metrics::counter!("capibara_tts_model_loads_total", "during" => "warm_up")
                        .increment(1);
                }
                metrics::gauge!("capibara_tts_voice_ready").set(1.0);
                tracing::info!(
                    %voice,
                    ms = started.elapsed().as_millis() as u64,
                    "default TTS voice ready"
                );
                components.set(READY_COMPONENT, ComponentState::Ready);
            }
            Err(e) => {
                tracing::error!(%voice, error = %e, "loading the default TTS voice failed");
                components.set(READY_COMPONENT, ComponentState::Failed(e));
            }
        }
    });
}

fn invalid(message: impl Into<String>) -> ExecError {
    ExecError::Abort(JobError::new("invalid_input", message))
}

fn render_error(e: TtsError) -> ExecError {
    match e {
        TtsError::UnknownVoice(v) => ExecError::Abort(JobError::new(
            "unknown_voice",
            format!("unknown voice `{v}` (GET /v1/tts/voices lists them)"),
        )),
        TtsError::Invalid(m) => invalid(m),
        // A missing asset or a model failure may be this worker's alone: another may succeed.
        other => ExecError::Retryable(JobError::new("tts_error", other.to_string())),
    }
}

/// A chunk event's data for one sentence.
fn chunk_data(segment: &Segment, format: Format) -> serde_json::Value {
    json!({
        "index": segment.index,
        "total": segment.total,
        "text": segment.text,
        "format": format.as_str(),
        "sample_rate": segment.sample_rate,
        "duration_s": segment.samples.len() as f64 / segment.sample_rate as f64,
        "audio": base64::engine::general_purpose::STANDARD
            .encode(format.encode(&segment.samples, segment.sample_rate)),
    })
}

#[async_trait]
impl Executor for TtsRender {
    async fn execute(&self, ctx: JobContext) -> Result<Output, ExecError> {
        let input: TtsRenderInput = input::parse(&ctx.input).map_err(super::builtin::invalid)?;
        let format = match input.format {
            None | Some(TtsFormat::Wav) => Format::Wav,
            Some(TtsFormat::PcmS16le) => Format::PcmS16le,
        };
        let artifacts = self
            .artifacts
            .clone()
            .map_err(|e| ExecError::Retryable(JobError::new("artifacts_unavailable", e)))?;
        let opts = RenderOptions {
            voice: input.voice.clone(),
            speed: input.speed.unwrap_or(1.0) as f32,
            noise_scale: input.noise_scale.map(|x| x as f32),
            noise_w: input.noise_w.map(|x| x as f32),
            sample_rate: input.sample_rate,
        };
        let chars = input.text.chars().count();

        // The engine renders on a blocking thread and hands each sentence over a channel, so
        // the next sentence renders while this one's event is written.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Segment>(16);
        let engine = self.engine.clone();
        let cancel = ctx.cancel.clone();
        let text = input.text;
        let render = tokio::task::spawn_blocking(move || {
            engine.render(&text, &opts, |segment| {
                if cancel.is_cancelled() || tx.blocking_send(segment).is_err() {
                    return ControlFlow::Break(());
                }
                // Stop before rendering the next sentence when the job was canceled meanwhile.
                if cancel.is_cancelled() {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
        });

        let mut samples: Vec<i16> = Vec::new();
        let mut sample_rate = 0;
        while let Some(segment) = rx.recv().await {
            if ctx.cancel.is_cancelled() {
                break;
            }
            ctx.progress
                .output_chunk(segment.index as u64, chunk_data(&segment, format))
                .await;
            sample_rate = segment.sample_rate;
            samples.extend_from_slice(&segment.samples);
        }
        drop(rx);
        let summary = render
            .await
            .map_err(|e| ExecError::Retryable(JobError::new("tts_error", e.to_string())))?
            .map_err(render_error)?;
        if summary.loaded_model {
            metrics::counter!("capibara_tts_model_loads_total", "during" => "job").increment(1);
        }
        if ctx.cancel.is_cancelled() {
            return Err(ExecError::Abort(JobError::new(
                "canceled",
                format!(
                    "rendering stopped after {} of {} sentences",
                    summary.rendered, summary.sentences
                ),
            )));
        }

        let bytes = format.encode(&samples, sample_rate);
        let artifact = artifacts
            .put(
                ctx.job_id,
                format.artifact_name(),
                &format.content_type(sample_rate),
                bytes,
            )
            .await
            .map_err(|e| ExecError::Retryable(JobError::new("artifact_store", e.to_string())))?;
        let duration_s = samples.len() as f64 / sample_rate.max(1) as f64;
        let render_s = summary.render_ms / 1000.0;
        let round = |x: f64, digits: i32| {
            let p = 10f64.powi(digits);
            (x * p).round() / p
        };
        Ok(Output {
            output: to_output(TtsRenderOutput {
                duration_s: round(duration_s, 3),
                sample_rate,
                voice: summary.voice,
                engine: summary.engine.into(),
                format: format.as_str().into(),
                sentences: summary.sentences as u64,
                chars: chars as u64,
                chars_per_second: round(chars as f64 / render_s.max(1e-6), 1),
                render_ms: round(summary.render_ms, 1),
                real_time_factor: round(render_s / duration_s.max(1e-6), 3),
                first_chunk_ms: summary.first_segment_ms.map(|t| round(t, 1)),
                model_loaded: summary.loaded_model,
                artifact: format.artifact_name().into(),
            }),
            artifacts: vec![artifact],
            ..Default::default()
        })
    }
}
