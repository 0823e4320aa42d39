//! The OpenAPI 3.1 document (generated from the handlers) and Swagger UI served from the binary.

use utoipa::{
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    Modify, OpenApi,
};

use capibara_shared::domain::kinds::KindContext;

use crate::routes::{
    admin, bulk, code, connectors, content, deliveries, events, fine_tuning, http, jobs, kinds,
    limits, llm, models, orchestrate, runs, schedules, secrets, semantic, subscriptions, triggers,
    workers, workflows,
};

#[derive(OpenApi)]
#[openapi(
    info(title = "Capibara API", description = "Event-sourced jobs: submit, wait, stream and inspect every event."),
    paths(jobs::submit, jobs::submit_batch, jobs::list, jobs::get, jobs::events, jobs::cancel, jobs::retry, jobs::delete, bulk::start, bulk::get, events::list,
          admin::workers, admin::queues, kinds::list, kinds::get, kinds::put, kinds::delete,
          workers::register, workers::lease, workers::deregister, workers::heartbeat, workers::progress,
          workers::logs, workers::chunk, workers::complete, workers::complete_many, workers::fail, workers::release, workers::upload_artifact,
          admin::create_key, admin::list_keys, admin::revoke_key,
          subscriptions::create, subscriptions::list, subscriptions::get, subscriptions::update,
          subscriptions::pause, subscriptions::resume, subscriptions::delete,
          deliveries::list, deliveries::get, deliveries::redeliver, orchestrate::orchestrate,
          schedules::create, schedules::list, schedules::get, schedules::update, schedules::pause,
          schedules::resume, schedules::delete, schedules::trigger, schedules::backfill,
          triggers::create, triggers::list, triggers::get, triggers::delete,
          code::execute, code::validate, code::cache_stats, code::cache_clear,
          workflows::create, workflows::list, workflows::get, workflows::update, workflows::delete,
          workflows::start_run, runs::list, runs::get, runs::events, runs::cancel, runs::retry, runs::signal,
          secrets::put, secrets::list, secrets::delete,
          connectors::create, connectors::list, connectors::get, connectors::update, connectors::delete,
          connectors::list_types, content::seed_web, content::seed_api, content::discover,
          models::list, models::get, models::delete, http::hosts, http::request, http::stream_download, http::get_request, http::metrics, http::health, llm::list, llm::get, llm::put, llm::delete,
          limits::list, limits::get, limits::put, limits::delete, limits::pauses, limits::pause_queue, limits::resume_queue,
          limits::pause_kind, limits::resume_kind, limits::pause_key, limits::resume_key, fine_tuning::start, fine_tuning::status,
          semantic::embed, semantic::search, semantic::chunk, crate::routes::me::get, crate::stream_tokens::create),
    components(schemas(crate::error::Problem, capibara_shared::domain::FieldError)),
    modifiers(&BearerAuth),
    tags((name = "jobs"), (name = "events"), (name = "deliveries"), (name = "schedules"), (name = "workflows"), (name = "code"), (name = "kinds"), (name = "connectors"), (name = "models"), (name = "http"), (name = "llm"), (name = "flow"), (name = "workers"), (name = "operations"))
)]
pub struct ApiDoc;

mod strict;

/// The served document: [`ApiDoc`] plus the TTS routes' own document, with each job's `input`
/// described by its kind's schema (`kinds` says which voices are installed here).
pub fn spec(kinds: &dyn KindContext) -> serde_json::Value {
    let mut doc = ApiDoc::openapi().merge_from(crate::routes::tts::TtsDoc::openapi());
    ProblemResponses.modify(&mut doc);
    strict::apply(doc, kinds)
}

/// [`spec`] as pretty JSON (`capibara openapi`).
pub fn document(kinds: &dyn KindContext) -> String {
    serde_json::to_string_pretty(&spec(kinds)).expect("JSON")
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Every error is an RFC 9457 problem (`application/problem+json`, see [`crate::error`]): this
/// documents the problem responses every operation can give, so the handlers only list the ones
/// particular to them. Authenticated operations: 401, 403, 429, 503; with parameters: 422; with
/// path parameters: 404; with a JSON body: 400 (malformed), 413, 415, 422.
struct ProblemResponses;

const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

impl Modify for ProblemResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{path::ParameterIn, ContentBuilder, Ref, RefOr, ResponseBuilder};
        let problem = || {
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build()
        };
        for item in openapi.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                // Problems the handlers declared as `body = Problem` go out as problem+json.
                for response in op.responses.responses.values_mut() {
                    if let RefOr::T(r) = response {
                        let is_problem = r.content.get("application/json").is_some_and(|c| {
                            matches!(&c.schema, Some(RefOr::Ref(x)) if x.ref_location.ends_with("/Problem"))
                        });
                        if is_problem {
                            let c = r.content.shift_remove("application/json");
                            r.content
                                .insert(PROBLEM_CONTENT_TYPE.into(), c.unwrap_or_else(problem));
                        }
                    }
                }
                let params = op.parameters.as_deref().unwrap_or_default();
                let mut common =
                    vec![("503", "the database or queue is unavailable; retry shortly")];
                if op.security.is_some() {
                    common.push(("401", "missing or invalid API key"));
                    common.push(("403", "the key's role does not allow this"));
                    common.push(("429", "rate limit exceeded; see Retry-After"));
                }
                if params.iter().any(|p| p.parameter_in == ParameterIn::Path) {
                    common.push(("404", "no such resource"));
                }
                if !params.is_empty() || op.request_body.is_some() {
                    common.push((
                        "422",
                        "a field or parameter is invalid (the problem names it)",
                    ));
                }
                if op.request_body.is_some() {
                    common.push(("400", "malformed JSON"));
                    common.push(("413", "the body exceeds the configured limit"));
                    common.push(("415", "the body is not JSON"));
                }
                for (status, description) in common {
                    op.responses
                        .responses
                        .entry(status.into())
                        .or_insert_with(|| {
                            RefOr::T(
                                ResponseBuilder::new()
                                    .description(description)
                                    .content(PROBLEM_CONTENT_TYPE, problem())
                                    .build(),
                            )
                        });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    /// A deployment with one Piper voice.
    pub(super) struct Kinds;

    impl capibara_shared::domain::kinds::KindContext for Kinds {
        fn voice_installed(&self, voice: &str) -> bool {
            voice == "en_US-joe-medium"
        }

        fn installed_voices(&self) -> Vec<String> {
            vec!["en_US-joe-medium".into()]
        }
    }

    /// Code generators name one function per operationId: each must be present, unique and
    /// camelCase (`listJobs`, `getRun`), so generated clients are stable.
    #[test]
    fn every_operation_has_a_unique_camel_case_operation_id() {
        let doc = super::spec(&Kinds);
        let mut seen = HashSet::new();
        let mut count = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let id = op["operationId"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{method} {path} has no operationId"));
                assert!(
                    id.chars().next().is_some_and(|c| c.is_ascii_lowercase())
                        && id.chars().all(|c| c.is_ascii_alphanumeric()),
                    "{method} {path}: operationId {id:?} is not camelCase"
                );
                assert!(
                    seen.insert(id.to_string()),
                    "operationId {id:?} repeats ({method} {path})"
                );
                count += 1;
            }
        }
        assert!(count >= 50, "only {count} operations documented");
    }
}
