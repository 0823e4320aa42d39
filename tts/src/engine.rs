//! The renderer: ONNX Runtime loaded once per process, one session per voice loaded on first
//! use (or ahead of it by [`Engine::warm_up`]) and shared by every render, sentences rendered one
//! at a time and handed to a callback.
//!
//! Concurrency: a voice's session sits behind a mutex (`Session::run` needs `&mut`), taken per
//! sentence, so concurrent renders of one voice interleave sentence by sentence instead of
//! waiting for each other's whole text. Loading holds the voice's slot lock, so two renders
//! asking for an unloaded voice at once load it once. espeak-ng has its own process-wide lock.

use std::{
    collections::HashMap,
    ops::ControlFlow,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::Instant,
};

use ort::{
    environment::Environment,
    session::{builder::GraphOptimizationLevel, Session},
    value::Tensor,
};

use crate::{
    audio, espeak, phonemes, text,
    voices::{self, PiperVoice},
};

/// Where the engine finds its assets and how it runs the model.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Piper voices (`NAME.onnx` + `NAME.onnx.json`).
    pub voices_dir: PathBuf,
    /// ONNX Runtime's shared library; `None` = the newest `libonnxruntime.so*` in `lib_dir`.
    pub ort_library: Option<PathBuf>,
    pub lib_dir: PathBuf,
    /// Threads one model call may use (ONNX Runtime intra-op threads).
    pub intra_threads: usize,
}

impl EngineConfig {
    /// The layout `deploy/fetch-assets.sh` creates under an assets directory.
    pub fn from_assets_dir(assets: &Path) -> EngineConfig {
        EngineConfig {
            voices_dir: assets.join("voices"),
            ort_library: None,
            lib_dir: assets.join("lib"),
            intra_threads: 1,
        }
    }
}

/// What a render may fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TtsError {
    /// The voice is not installed (a client error: do not retry).
    #[error("unknown voice `{0}`")]
    UnknownVoice(String),
    /// Text or options out of range (a client error: do not retry).
    #[error("{0}")]
    Invalid(String),
    /// A needed asset is missing or unusable (an operator error).
    #[error("{0}")]
    Assets(String),
    #[error(transparent)]
    Espeak(#[from] espeak::EspeakError),
    #[error("model: {0}")]
    Model(String),
}

/// Per-request settings.
#[derive(Debug, Clone)]
pub struct RenderOptions {
    /// A catalog name; `None` = the default voice.
    pub voice: Option<String>,
    /// Speaking rate: 2.0 is twice as fast (Piper's length scale is divided by it).
    pub speed: f32,
    /// Overrides the voice's noise scale (0 = deterministic output).
    pub noise_scale: Option<f32>,
    /// Overrides the voice's phoneme-duration noise (0 = deterministic durations).
    pub noise_w: Option<f32>,
    /// Output rate; `None` = the voice's own.
    pub sample_rate: Option<u32>,
}

impl Default for RenderOptions {
    fn default() -> Self {
        Self {
            voice: None,
            speed: 1.0,
            noise_scale: None,
            noise_w: None,
            sample_rate: None,
        }
    }
}

/// One rendered sentence.
#[derive(Debug, Clone)]
pub struct Segment {
    /// 0-based.
    pub index: usize,
    /// Sentences in the whole text.
    pub total: usize,
    pub text: String,
    pub samples: Vec<i16>,
    pub sample_rate: u32,
    /// Time spent on this sentence (phonemes + model + conversion), in milliseconds.
    pub render_ms: f64,
}

/// What a finished (or stopped) render did.
#[derive(Debug, Clone)]
pub struct RenderSummary {
    pub voice: String,
    /// `piper` or `espeak`.
    pub engine: &'static str,
    pub sample_rate: u32,
    pub sentences: usize,
    /// Sentences handed to the callback (fewer than `sentences` when it stopped the render).
    pub rendered: usize,
    pub stopped: bool,
    /// From the start of `render` to the first segment, in milliseconds.
    pub first_segment_ms: Option<f64>,
    /// Whether this render loaded the voice's model (a cold start: the worker had not loaded
    /// the voice yet).
    pub loaded_model: bool,
    pub render_ms: f64,
}

/// ONNX Runtime allows one environment per process, and a dropped one cannot be replaced: it is
/// created on the first neural render (from that engine's library path) and kept for good.
static ORT: OnceLock<Result<Environment, String>> = OnceLock::new();

/// A loaded Piper voice.
struct LoadedVoice {
    voice: PiperVoice,
    session: Mutex<Session>,
    /// Multi-speaker models take a `sid` input.
    has_sid: bool,
}

/// The slot a voice loads into; its lock is held while loading.
#[derive(Default)]
struct VoiceSlot {
    loaded: Mutex<Option<Arc<LoadedVoice>>>,
}

/// The TTS engine; share one per process (`Arc<Engine>`).
pub struct Engine {
    config: EngineConfig,
    voices: Mutex<HashMap<String, Arc<VoiceSlot>>>,
    /// Models loaded so far (each voice at most once).
    loads: AtomicUsize,
}

impl Engine {
    /// An engine over `config`; nothing is loaded until the first render.
    pub fn new(config: EngineConfig) -> Engine {
        Engine {
            config,
            voices: Mutex::new(HashMap::new()),
            loads: AtomicUsize::new(0),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// How many models this engine has loaded (each voice at most once).
    pub fn models_loaded(&self) -> usize {
        self.loads.load(Ordering::Relaxed)
    }

    /// The voice a request without `voice` gets.
    pub fn default_voice(&self) -> String {
        voices::default_voice(&voices::scan(&self.config.voices_dir))
    }

    /// Load a voice now (e.g. at start-up or before a benchmark) instead of on first use.
    /// Returns whether this call loaded the model (false: already loaded, or an espeak voice).
    pub fn preload(&self, voice: &str) -> Result<bool, TtsError> {
        if voice.starts_with(voices::ESPEAK_PREFIX) {
            return Ok(false);
        }
        self.piper(voice).map(|(_, loaded)| loaded)
    }

    /// Make `voice` ready for a fast first request: load its model, then render one short
    /// sentence (discarded) so espeak-ng's data and ONNX Runtime's first-run allocations are
    /// done too. Returns whether this call loaded the model.
    pub fn warm_up(&self, voice: &str) -> Result<bool, TtsError> {
        let loaded = self.preload(voice)?;
        let opts = RenderOptions {
            voice: Some(voice.to_string()),
            ..Default::default()
        };
        self.render("Ready.", &opts, |_| ControlFlow::Continue(()))?;
        Ok(loaded)
    }

    fn ort_library(&self) -> Result<PathBuf, TtsError> {
        if let Some(p) = &self.config.ort_library {
            return Ok(p.clone());
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(&self.config.lib_dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("libonnxruntime.so"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        found.pop().ok_or_else(|| {
            TtsError::Assets(format!(
                "ONNX Runtime library not found in {} (run deploy/fetch-assets.sh, or set \
                 CAPIBARA_ORT_LIBRARY)",
                self.config.lib_dir.display()
            ))
        })
    }

    fn environment(&self) -> Result<Environment, TtsError> {
        let lib = self.ort_library()?;
        ORT.get_or_init(|| {
            // ort resolves relative paths against the executable's directory: pass it absolute.
            let lib = std::fs::canonicalize(&lib).unwrap_or(lib);
            let env = ort::init_from(&lib)
                .map_err(|e| format!("loading ONNX Runtime: {e}"))?
                .with_name("capibara-tts")
                .build()
                .map_err(|e| format!("starting ONNX Runtime: {e}"))?;
            tracing::info!(library = %lib.display(), "ONNX Runtime loaded");
            Ok(env)
        })
        .clone()
        .map_err(TtsError::Assets)
    }

    /// The loaded voice, loading it on first use (once, however many callers race), and whether
    /// this call loaded it.
    fn piper(&self, name: &str) -> Result<(Arc<LoadedVoice>, bool), TtsError> {
        if !voices::valid_name(name) {
            return Err(TtsError::UnknownVoice(name.to_string()));
        }
        let slot = self
            .voices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone();
        let mut loaded = slot.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = loaded.as_ref() {
            return Ok((v.clone(), false));
        }
        let voice = match voices::load_piper(&self.config.voices_dir, name) {
            Ok(v) => v,
            Err(voices::CatalogError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Err(TtsError::UnknownVoice(name.to_string()))
            }
            Err(e) => return Err(TtsError::Assets(e.to_string())),
        };
        if voice.config.phoneme_type != "espeak" {
            return Err(TtsError::Assets(format!(
                "voice `{name}` uses phoneme type `{}`; only espeak voices are supported",
                voice.config.phoneme_type
            )));
        }
        let env = self.environment()?;
        let started = Instant::now();
        let model_err =
            |e: String| TtsError::Model(format!("loading {}: {e}", voice.model.display()));
        let session = Session::builder(&env)
            .map_err(|e| model_err(e.to_string()))?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| model_err(e.to_string()))?
            .with_intra_threads(self.config.intra_threads.max(1))
            .map_err(|e| model_err(e.to_string()))?
            .with_inter_threads(1)
            .map_err(|e| model_err(e.to_string()))?
            .commit_from_file(&voice.model)
            .map_err(|e| model_err(e.to_string()))?;
        let has_sid = session.inputs().iter().any(|i| i.name() == "sid");
        self.loads.fetch_add(1, Ordering::Relaxed);
        tracing::info!(voice = %name, ms = started.elapsed().as_millis() as u64, "voice loaded");
        let v = Arc::new(LoadedVoice {
            voice,
            session: Mutex::new(session),
            has_sid,
        });
        *loaded = Some(v.clone());
        Ok((v, true))
    }

    /// Render `text` sentence by sentence. Each sentence goes to `on_segment` as soon as it is
    /// ready; returning `ControlFlow::Break` stops the render (cancellation) before the next one.
    pub fn render(
        &self,
        text: &str,
        opts: &RenderOptions,
        mut on_segment: impl FnMut(Segment) -> ControlFlow<()>,
    ) -> Result<RenderSummary, TtsError> {
        let started = Instant::now();
        if !(0.1..=10.0).contains(&opts.speed) {
            return Err(TtsError::Invalid("speed must be between 0.1 and 10".into()));
        }
        let sentences = text::split_for_streaming(text);
        if sentences.is_empty() {
            return Err(TtsError::Invalid("text has nothing to say".into()));
        }
        let voice_name = match &opts.voice {
            Some(v) => v.clone(),
            None => self.default_voice(),
        };
        let total = sentences.len();
        let mut summary = RenderSummary {
            voice: voice_name.clone(),
            engine: "piper",
            sample_rate: 0,
            sentences: total,
            rendered: 0,
            stopped: false,
            first_segment_ms: None,
            loaded_model: false,
            render_ms: 0.0,
        };

        let renderer = match voice_name.strip_prefix(voices::ESPEAK_PREFIX) {
            Some(lang) => {
                summary.engine = "espeak";
                Renderer::Espeak {
                    lang: lang.to_string(),
                    wpm: (175.0 * opts.speed).round() as u32,
                }
            }
            None => {
                let (voice, loaded) = self.piper(&voice_name)?;
                summary.loaded_model = loaded;
                Renderer::Piper(voice)
            }
        };

        for (index, sentence) in sentences.into_iter().enumerate() {
            let t = Instant::now();
            let (samples, native_rate) = renderer.sentence(&sentence, opts)?;
            let rate = opts.sample_rate.unwrap_or(native_rate);
            let samples = audio::resample(&samples, native_rate, rate);
            summary.sample_rate = rate;
            let segment = Segment {
                index,
                total,
                text: sentence,
                samples,
                sample_rate: rate,
                render_ms: t.elapsed().as_secs_f64() * 1000.0,
            };
            if summary.first_segment_ms.is_none() {
                summary.first_segment_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
            }
            summary.rendered += 1;
            if on_segment(segment).is_break() {
                summary.stopped = index + 1 < total;
                break;
            }
        }
        summary.render_ms = started.elapsed().as_secs_f64() * 1000.0;
        Ok(summary)
    }
}

/// How the sentences of one render are synthesized.
enum Renderer {
    Piper(Arc<LoadedVoice>),
    /// espeak-ng's formant voice for a language, at a rate in words per minute.
    Espeak {
        lang: String,
        wpm: u32,
    },
}

impl Renderer {
    /// One sentence's samples and their native sample rate.
    fn sentence(&self, sentence: &str, opts: &RenderOptions) -> Result<(Vec<i16>, u32), TtsError> {
        match self {
            Renderer::Piper(voice) => synthesize_piper(voice, sentence, opts),
            Renderer::Espeak { lang, wpm } => espeak::with(|e| {
                e.set_voice(lang)
                    .map_err(|_| TtsError::UnknownVoice(format!("espeak:{lang}")))?;
                Ok((e.synthesize(sentence, *wpm)?, e.sample_rate()))
            })?,
        }
    }
}

/// Phonemes of one sentence, as Piper would compute them.
pub fn phonemize(espeak_voice: &str, sentence: &str) -> Result<String, TtsError> {
    let clauses = espeak::with(|e| {
        e.set_voice(espeak_voice)?;
        e.text_to_phonemes(sentence)
    })??;
    Ok(phonemes::sentence_phonemes(clauses.iter().map(|c| {
        (c.phonemes.as_str(), &sentence[c.consumed.clone()], c.last)
    })))
}

fn synthesize_piper(
    voice: &LoadedVoice,
    sentence: &str,
    opts: &RenderOptions,
) -> Result<(Vec<i16>, u32), TtsError> {
    let cfg = &voice.voice.config;
    let phonemes = phonemize(&cfg.espeak.voice, sentence)?;
    let (ids, missing) = phonemes::to_ids(&phonemes, &cfg.phoneme_id_map);
    if missing > 0 {
        tracing::debug!(missing, "phonemes not in the voice's map were skipped");
    }
    let n = ids.len();
    let scales = vec![
        opts.noise_scale.unwrap_or(cfg.inference.noise_scale),
        cfg.inference.length_scale / opts.speed,
        opts.noise_w.unwrap_or(cfg.inference.noise_w),
    ];
    let model = |e: ort::Error| TtsError::Model(e.to_string());
    let input = Tensor::from_array(([1usize, n], ids)).map_err(model)?;
    let lengths = Tensor::from_array(([1usize], vec![n as i64])).map_err(model)?;
    let scales = Tensor::from_array(([3usize], scales)).map_err(model)?;
    let mut session = voice.session.lock().unwrap_or_else(|p| p.into_inner());
    let outputs = if voice.has_sid {
        let sid = Tensor::from_array(([1usize], vec![0i64])).map_err(model)?;
        session.run(ort::inputs![
            "input" => input, "input_lengths" => lengths, "scales" => scales, "sid" => sid
        ])
    } else {
        session.run(ort::inputs![
            "input" => input, "input_lengths" => lengths, "scales" => scales
        ])
    }
    .map_err(model)?;
    let (_, audio_f32) = outputs[0].try_extract_tensor::<f32>().map_err(model)?;
    Ok((audio::float_to_i16(audio_f32), cfg.audio.sample_rate))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The assets `deploy/fetch-assets.sh` puts in `.capibara/assets` (or `CAPIBARA_ASSETS_DIR`).
    fn engine() -> Engine {
        let assets = std::env::var_os("CAPIBARA_ASSETS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.capibara/assets"));
        let config = EngineConfig::from_assets_dir(&assets);
        assert!(
            config.voices_dir.join("en_US-joe-medium.onnx").is_file(),
            "the default voice is missing from {}: run deploy/fetch-assets.sh",
            config.voices_dir.display()
        );
        Engine::new(config)
    }

    fn deterministic() -> RenderOptions {
        RenderOptions {
            noise_scale: Some(0.0),
            noise_w: Some(0.0),
            ..Default::default()
        }
    }

    #[test]
    fn the_default_voice_renders_each_sentence_with_speech() {
        let engine = engine();
        let mut segments = Vec::new();
        let summary = engine
            .render(
                "Hello world. This is a test of the Capibara speech worker.",
                &deterministic(),
                |s| {
                    segments.push(s);
                    ControlFlow::Continue(())
                },
            )
            .unwrap();
        assert_eq!(summary.voice, voices::DEFAULT_VOICE);
        assert_eq!(summary.sample_rate, 22050);
        assert_eq!((summary.sentences, summary.rendered), (2, 2));
        assert_eq!(segments[0].text, "Hello world.");
        let samples: usize = segments.iter().map(|s| s.samples.len()).sum();
        let secs = samples as f64 / 22050.0;
        // piper-tts renders 3.41 s for this text with noise 0.
        assert!((3.0..3.9).contains(&secs), "{secs} s");
        for s in &segments {
            assert!(
                audio::rms(&s.samples) > 0.02,
                "sentence {} is silent",
                s.index
            );
        }
    }

    #[test]
    fn speed_and_sample_rate_change_the_audio() {
        let engine = engine();
        let mut lens = Vec::new();
        for (speed, rate) in [(1.0, None), (2.0, None), (1.0, Some(16000))] {
            let mut n = 0;
            let opts = RenderOptions {
                speed,
                sample_rate: rate,
                ..deterministic()
            };
            let s = engine
                .render("Testing the speed.", &opts, |s| {
                    n += s.samples.len();
                    ControlFlow::Continue(())
                })
                .unwrap();
            lens.push((n, s.sample_rate));
        }
        assert_eq!(lens[0].1, 22050);
        assert!((lens[1].0 as f64) < lens[0].0 as f64 * 0.7, "{lens:?}");
        assert_eq!(lens[2].1, 16000);
        let expected = lens[0].0 as f64 * 16000.0 / 22050.0;
        assert!((lens[2].0 as f64 - expected).abs() < 2.0, "{lens:?}");
    }

    #[test]
    fn concurrent_renders_load_the_voice_once() {
        let engine = Arc::new(engine());
        let threads: Vec<_> = (0..3)
            .map(|i| {
                let engine = engine.clone();
                std::thread::spawn(move || {
                    engine
                        .render(&format!("Thread number {i}."), &deterministic(), |_| {
                            ControlFlow::Continue(())
                        })
                        .unwrap()
                        .rendered
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), 1);
        }
        assert_eq!(engine.models_loaded(), 1);
    }

    #[test]
    fn breaking_from_the_callback_stops_before_the_next_sentence() {
        let engine = engine();
        let mut seen = 0;
        let summary = engine
            .render("One. Two. Three. Four.", &deterministic(), |_| {
                seen += 1;
                ControlFlow::Break(())
            })
            .unwrap();
        assert_eq!((seen, summary.rendered, summary.sentences), (1, 1, 4));
        assert!(summary.stopped);
    }

    #[test]
    fn unknown_voices_empty_text_and_the_espeak_fallback() {
        let engine = engine();
        let opts = RenderOptions {
            voice: Some("nope".into()),
            ..Default::default()
        };
        let never = |_| ControlFlow::Continue(());
        assert!(matches!(
            engine.render("Hi.", &opts, never),
            Err(TtsError::UnknownVoice(v)) if v == "nope"
        ));
        assert!(matches!(
            engine.render("  ", &RenderOptions::default(), never),
            Err(TtsError::Invalid(_))
        ));
        let fallback = RenderOptions {
            voice: Some(voices::ESPEAK_FALLBACK.into()),
            ..Default::default()
        };
        let mut samples = Vec::new();
        let s = engine
            .render("Hello world.", &fallback, |s| {
                samples.extend(s.samples);
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!((s.engine, s.sample_rate), ("espeak", 22050));
        assert!(audio::rms(&samples) > 0.01);
        assert_eq!(engine.models_loaded(), 0, "espeak needs no model");
    }

    #[test]
    fn phonemes_keep_clause_punctuation() {
        let p = phonemize("en-us", "Hello world, how are you?").unwrap();
        assert!(p.starts_with("həlˈoʊ wˈɜːld, "), "{p}");
        assert!(p.ends_with('?'), "{p}");
    }
}
