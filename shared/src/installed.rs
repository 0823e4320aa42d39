//! What this deployment has installed, as the kinds' input validation asks it
//! ([`KindContext`]): the voices in the TTS voices directory.
//!
//! The API, the scheduler (trigger calls) and the workers (rendered workflow step inputs) all
//! answer from the same configuration, so an input refused at one entry point is refused at
//! every other.

use crate::{config::Config, domain::kinds::KindContext};

impl KindContext for Config {
    /// A Piper voice in `CAPIBARA_TTS_VOICES_DIR` (`NAME.onnx` + `NAME.onnx.json`), or an
    /// `espeak:<language>` voice (`GET /v1/tts/voices` lists the same).
    fn voice_installed(&self, voice: &str) -> bool {
        capibara_tts::voices::is_known(&self.tts.voices_dir, voice)
    }
}
