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

    fn installed_voices(&self) -> Vec<String> {
        capibara_tts::voices::list(&self.tts.voices_dir)
            .into_iter()
            .map(|v| v.name)
            .collect()
    }
}

/// Install what the planner and the templates read in this process from `config`: the template
/// budget and the checks of rendered step inputs. Every binary that renders or plans calls it
/// once at startup.
pub fn install(config: &std::sync::Arc<Config>) {
    crate::domain::template::set_budget(config.template_budget);
    crate::domain::run::set_step_checks(crate::domain::run::StepChecks {
        input_limit_bytes: config.input_limit_bytes,
        kinds: config.clone(),
    });
}
