//! The OpenAPI 3.1 document (generated from the handlers) and Swagger UI served from the binary.

use utoipa::{
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    Modify, OpenApi,
};

use crate::routes::{
    admin, code, deliveries, events, jobs, orchestrate, runs, schedules, secrets, subscriptions,
    triggers, workflows,
};

#[derive(OpenApi)]
#[openapi(
    info(title = "Capibara API", description = "Event-sourced jobs: submit, wait, stream and inspect every event."),
    paths(jobs::submit, jobs::submit_batch, jobs::list, jobs::get, jobs::events, jobs::cancel, jobs::retry, events::list,
          admin::workers, admin::queues, admin::kinds_list, admin::create_key, admin::list_keys,
          subscriptions::create, subscriptions::list, subscriptions::get, subscriptions::update,
          subscriptions::pause, subscriptions::resume, subscriptions::delete,
          deliveries::list, deliveries::get, deliveries::redeliver, orchestrate::orchestrate,
          schedules::create, schedules::list, schedules::get, schedules::update, schedules::pause,
          schedules::resume, schedules::delete, schedules::trigger, schedules::backfill,
          triggers::create, triggers::list, triggers::get, triggers::delete,
          code::execute, code::validate, code::cache_stats, code::cache_clear,
          workflows::create, workflows::list, workflows::get, workflows::update, workflows::delete,
          workflows::start_run, runs::list, runs::get, runs::events, runs::cancel, runs::retry, runs::signal,
          secrets::put, secrets::list, secrets::delete),
    components(schemas(crate::error::Problem, capibara_shared::domain::FieldError)),
    modifiers(&BearerAuth),
    tags((name = "jobs"), (name = "events"), (name = "deliveries"), (name = "schedules"), (name = "workflows"), (name = "code"), (name = "operations"))
)]
pub struct ApiDoc;

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
