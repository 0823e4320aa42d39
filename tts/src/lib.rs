//! Capibara's text-to-speech engine: Piper (VITS) voices on ONNX Runtime, phonemes from
//! espeak-ng, 16-bit WAV/PCM out, one sentence at a time so callers can stream.
//!
//! # Layout
//! - [`text`]: sentence splitting (the unit of rendering and streaming).
//! - [`voices`]: the voice catalog (Piper voices in a directory + the espeak-ng fallback).
//! - [`phonemes`]: clause punctuation recovery and phoneme → id mapping.
//! - [`audio`]: f32 → i16, resampling, WAV/PCM encoding, RMS.
//! - `espeak` (feature `engine`): the only FFI module, a tiny binding to libespeak-ng.
//! - `engine` (feature `engine`): ONNX Runtime, one lazily loaded session per voice, rendering.
//!
//! Without the default `engine` feature the crate links neither ONNX Runtime nor espeak-ng, so
//! the API can list and check voices without them.

pub mod audio;
pub mod phonemes;
pub mod text;
pub mod voices;

#[cfg(feature = "engine")]
pub mod engine;
#[cfg(feature = "engine")]
pub mod espeak;

pub use audio::Format;
#[cfg(feature = "engine")]
pub use engine::{Engine, EngineConfig, RenderOptions, RenderSummary, Segment, TtsError};
