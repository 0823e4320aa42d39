//! What this deployment has installed, as the kinds' input validation asks it
//! ([`KindContext`]): the voices in the TTS voices directory.
//!
//! The API, the scheduler (trigger calls) and the workers (rendered workflow step inputs) all
//! answer from the same configuration, so an input refused at one entry point is refused at
//! every other.

use crate::{
    config::Config,
    domain::kinds::{user::UserKind, KindContext, UserKindLookup},
    store::{self, StoreError},
};

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
        kinds: std::sync::Arc::new(StepKinds(config.clone())),
    });
}

/// The checks of a rendered workflow step input: the installed voices; user kinds are not
/// loaded there (the definition's static inputs were checked against them when it was saved).
struct StepKinds(std::sync::Arc<Config>);

impl KindContext for StepKinds {
    fn voice_installed(&self, voice: &str) -> bool {
        self.0.voice_installed(voice)
    }

    fn installed_voices(&self) -> Vec<String> {
        self.0.installed_voices()
    }

    fn user_kind(&self, _name: &str) -> UserKindLookup<'_> {
        UserKindLookup::NotLoaded
    }
}

/// What a request is checked against: this deployment, and the user kinds of its namespace that
/// it names (loaded first, in one query, by [`with_user_kinds`]).
pub struct RequestKinds<'a> {
    config: &'a Config,
    kinds: Vec<UserKind>,
}

impl KindContext for RequestKinds<'_> {
    fn voice_installed(&self, voice: &str) -> bool {
        self.config.voice_installed(voice)
    }

    fn installed_voices(&self) -> Vec<String> {
        self.config.installed_voices()
    }

    fn user_kind(&self, name: &str) -> UserKindLookup<'_> {
        match self.kinds.iter().find(|k| k.name == name) {
            Some(k) => UserKindLookup::Registered(k),
            None => UserKindLookup::Missing,
        }
    }
}

/// A [`RequestKinds`] for `names` (the kinds a request names) in `namespace`. Built-in names
/// need no query; a request of built-in kinds only does no IO.
pub async fn with_user_kinds<'a>(
    pool: &sqlx::PgPool,
    config: &'a Config,
    namespace: &str,
    names: &[&str],
) -> Result<RequestKinds<'a>, StoreError> {
    let mut wanted: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !crate::domain::kinds::user::is_builtin(n))
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    let kinds = store::user_kinds::find(pool, namespace, &wanted).await?;
    Ok(RequestKinds { config, kinds })
}
