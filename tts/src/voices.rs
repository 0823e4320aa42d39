//! The voice catalog: every Piper voice (`NAME.onnx` + `NAME.onnx.json`) in the voices
//! directory, plus espeak-ng's own voice as the fallback.
//!
//! Reading the catalog needs no ONNX Runtime, so the API lists and checks voices with it too.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// The voice used when a request names none and this voice is installed.
pub const DEFAULT_VOICE: &str = "en_US-joe-medium";

/// Prefix of espeak-ng voices (`espeak:en-us`): formant synthesis, no model file needed.
pub const ESPEAK_PREFIX: &str = "espeak:";

/// The fallback when no neural voice is installed.
pub const ESPEAK_FALLBACK: &str = "espeak:en-us";

/// One voice as listed by `GET /v1/tts/voices`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VoiceInfo {
    /// What a request's `voice` names: the model's file stem, or `espeak:<language>`.
    pub name: String,
    /// `piper` (neural, ONNX) or `espeak` (formant fallback).
    pub engine: String,
    /// BCP 47-ish language code, e.g. `en_US`.
    pub language: String,
    /// Native sample rate in Hz.
    pub sample_rate: u32,
    /// Piper's quality label (`x_low` … `high`), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quality: Option<String>,
    pub num_speakers: u32,
    /// Used when a request names no voice.
    pub default: bool,
}

/// The parts of a Piper voice's `.onnx.json` that rendering needs.
#[derive(Debug, Clone, Deserialize)]
pub struct PiperConfig {
    pub audio: AudioConfig,
    #[serde(default)]
    pub espeak: EspeakConfig,
    #[serde(default)]
    pub inference: InferenceConfig,
    #[serde(default = "default_phoneme_type")]
    pub phoneme_type: String,
    pub phoneme_id_map: HashMap<String, Vec<i64>>,
    #[serde(default = "one")]
    pub num_speakers: u32,
    #[serde(default)]
    pub language: Option<LanguageConfig>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AudioConfig {
    pub sample_rate: u32,
    #[serde(default)]
    pub quality: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EspeakConfig {
    pub voice: String,
}

impl Default for EspeakConfig {
    fn default() -> Self {
        Self {
            voice: "en-us".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct InferenceConfig {
    #[serde(default = "noise_scale")]
    pub noise_scale: f32,
    #[serde(default = "one_f")]
    pub length_scale: f32,
    #[serde(default = "noise_w")]
    pub noise_w: f32,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        Self {
            noise_scale: noise_scale(),
            length_scale: 1.0,
            noise_w: noise_w(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct LanguageConfig {
    pub code: String,
}

fn default_phoneme_type() -> String {
    "espeak".into()
}
fn one() -> u32 {
    1
}
fn one_f() -> f32 {
    1.0
}
fn noise_scale() -> f32 {
    0.667
}
fn noise_w() -> f32 {
    0.8
}

/// A voice found on disk.
#[derive(Debug, Clone)]
pub struct PiperVoice {
    pub name: String,
    pub model: PathBuf,
    pub config_path: PathBuf,
    pub config: PiperConfig,
}

/// Errors reading a voice.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a Piper voice config: {source}")]
    Config {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Load one voice's config.
pub fn load_piper(dir: &Path, name: &str) -> Result<PiperVoice, CatalogError> {
    let model = dir.join(format!("{name}.onnx"));
    let config_path = dir.join(format!("{name}.onnx.json"));
    let raw = std::fs::read(&config_path).map_err(|source| CatalogError::Io {
        path: config_path.clone(),
        source,
    })?;
    let config: PiperConfig =
        serde_json::from_slice(&raw).map_err(|source| CatalogError::Config {
            path: config_path.clone(),
            source,
        })?;
    if !model.is_file() {
        return Err(CatalogError::Io {
            path: model,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "model file missing"),
        });
    }
    Ok(PiperVoice {
        name: name.to_string(),
        model,
        config_path,
        config,
    })
}

/// Every Piper voice in `dir` (a pair of `.onnx` and `.onnx.json`), sorted by name. Voices whose
/// config does not parse are skipped with a warning; a missing directory is an empty list.
pub fn scan(dir: &Path) -> Vec<PiperVoice> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let file = e.file_name().to_string_lossy().into_owned();
            file.strip_suffix(".onnx.json").map(str::to_string)
        })
        .filter(|name| valid_name(name))
        .collect();
    names.sort();
    names
        .into_iter()
        .filter_map(|name| match load_piper(dir, &name) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(voice = %name, error = %e, "skipping voice");
                None
            }
        })
        .collect()
}

/// Names are file stems: no path separators, no dot files.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b))
}

/// The voice a request without `voice` gets: [`DEFAULT_VOICE`] if installed, else the first
/// Piper voice, else [`ESPEAK_FALLBACK`].
pub fn default_voice(piper: &[PiperVoice]) -> String {
    if piper.iter().any(|v| v.name == DEFAULT_VOICE) {
        DEFAULT_VOICE.to_string()
    } else {
        piper
            .first()
            .map(|v| v.name.clone())
            .unwrap_or_else(|| ESPEAK_FALLBACK.to_string())
    }
}

/// The catalog as listed by the API: the Piper voices of `dir`, then the espeak fallback.
pub fn list(dir: &Path) -> Vec<VoiceInfo> {
    let piper = scan(dir);
    let default = default_voice(&piper);
    let mut out: Vec<VoiceInfo> = piper
        .iter()
        .map(|v| VoiceInfo {
            name: v.name.clone(),
            engine: "piper".into(),
            language: v
                .config
                .language
                .as_ref()
                .map(|l| l.code.clone())
                .unwrap_or_else(|| v.config.espeak.voice.clone()),
            sample_rate: v.config.audio.sample_rate,
            quality: v.config.audio.quality.clone(),
            num_speakers: v.config.num_speakers,
            default: v.name == default,
        })
        .collect();
    out.push(VoiceInfo {
        name: ESPEAK_FALLBACK.into(),
        engine: "espeak".into(),
        language: "en_US".into(),
        sample_rate: 22050,
        quality: None,
        num_speakers: 1,
        default: default == ESPEAK_FALLBACK,
    });
    out
}

/// Whether a request may name `voice`: an installed Piper voice or an `espeak:<language>` voice.
pub fn is_known(dir: &Path, voice: &str) -> bool {
    if let Some(lang) = voice.strip_prefix(ESPEAK_PREFIX) {
        return !lang.is_empty()
            && lang.len() <= 32
            && lang
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    }
    valid_name(voice)
        && dir.join(format!("{voice}.onnx")).is_file()
        && dir.join(format!("{voice}.onnx.json")).is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_voice(dir: &Path, name: &str, rate: u32) {
        std::fs::write(dir.join(format!("{name}.onnx")), b"not a real model").unwrap();
        std::fs::write(
            dir.join(format!("{name}.onnx.json")),
            format!(
                r#"{{"audio": {{"sample_rate": {rate}, "quality": "low"}},
                    "espeak": {{"voice": "de"}}, "phoneme_id_map": {{"_": [0]}},
                    "language": {{"code": "de_DE"}}}}"#
            ),
        )
        .unwrap();
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "capibara-tts-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn voices_placed_in_the_directory_are_listed_with_the_fallback_last() {
        let dir = temp_dir("list");
        write_voice(&dir, "de_DE-test-low", 16000);
        // A model without its config is not a voice.
        std::fs::write(dir.join("orphan.onnx"), b"x").unwrap();
        let list = list(&dir);
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].name, "de_DE-test-low");
        assert_eq!(list[0].sample_rate, 16000);
        assert_eq!(list[0].language, "de_DE");
        assert!(list[0].default, "the only Piper voice is the default");
        assert_eq!(list[1].name, ESPEAK_FALLBACK);
        assert!(!list[1].default);
        assert!(is_known(&dir, "de_DE-test-low"));
        assert!(!is_known(&dir, "orphan"));
        assert!(!is_known(&dir, "../etc/passwd"));
        assert!(is_known(&dir, "espeak:de"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn without_neural_voices_espeak_is_the_default() {
        let dir = temp_dir("empty");
        let list = list(&dir);
        assert_eq!(list.len(), 1);
        assert!(list[0].default);
        assert_eq!(default_voice(&scan(&dir)), ESPEAK_FALLBACK);
        assert_eq!(default_voice(&scan(&dir.join("missing"))), ESPEAK_FALLBACK);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
