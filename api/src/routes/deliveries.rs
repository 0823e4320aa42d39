//! `/v1/deliveries`: every webhook delivery with its attempts, and redelivery.

use axum::{
    extract::{Path, RawQuery, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};

use capibara_shared::{
    command::{self, Decision},
    domain::{
        self,
        auth::Role,
        delivery::{self, Delivery, DeliveryEvent, DeliveryStatus},
        event::EventEnvelope,
    },
    store::{self, deliveries::DeliveryFilter},
};
use serde::Serialize;
use uuid::Uuid;

use crate::{
    auth::Auth,
    error::ApiError,
    extract::{parse_limit, query_pairs},
    routes::jobs::{decode_cursor, Page},
    AppState,
};

/// A delivery with its attempts (`DeliveryAttempted` events).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeliveryDetail {
    #[serde(flatten)]
    pub delivery: Delivery,
    pub attempts_log: Vec<EventEnvelope>,
}

fn parse_uuid(field: &str, v: &str) -> Result<Uuid, ApiError> {
    v.parse()
        .map_err(|_| ApiError::field(field, "must be a UUID"))
}

#[utoipa::path(get, operation_id = "listDeliveries", path = "/v1/deliveries", tag = "deliveries",
    params(("job_id" = Option<uuid::Uuid>, Query), ("subscription_id" = Option<uuid::Uuid>, Query),
           ("status" = Option<capibara_shared::domain::delivery::DeliveryStatus>, Query),
           ("limit" = Option<i64>, Query, minimum = 1, maximum = 500), ("cursor" = Option<String>, Query, pattern = "^[A-Za-z0-9_-]{21}[AQgw]$", description = "`next_cursor` of the previous page")),
    responses((status = 200, body = Page<Delivery>), (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    auth: Auth,
    RawQuery(q): RawQuery,
) -> Result<Json<Page<Delivery>>, ApiError> {
    auth.require(Role::Read)?;
    let mut f = DeliveryFilter::default();
    let mut limit = None;
    for (k, v) in query_pairs(q.as_deref())? {
        match k.as_str() {
            "job_id" => f.job_id = Some(parse_uuid("job_id", &v)?),
            "subscription_id" => f.subscription_id = Some(parse_uuid("subscription_id", &v)?),
            "status" => {
                f.status = Some(
                    v.parse::<DeliveryStatus>()
                        .map_err(|e| ApiError::field("status", e))?,
                )
            }
            "limit" => limit = Some(v),
            "cursor" => f.before = Some(decode_cursor(&v)?),
            other => {
                return Err(ApiError::field(
                    other,
                    "unknown query parameter (job_id, subscription_id, status, limit, cursor)",
                ))
            }
        }
    }
    let limit = parse_limit(limit.as_deref())?;
    let items = store::deliveries::list(&state.store.pool, auth.namespace(), &f, limit + 1).await?;
    Ok(Json(Page::from_extra_row(items, limit, |d| d.id)))
}

async fn load(state: &AppState, auth: &Auth, id: &str) -> Result<Delivery, ApiError> {
    let id: Uuid = id
        .parse()
        .map_err(|_| ApiError::NotFound(format!("no delivery `{id}`")))?;
    store::deliveries::get(&state.store.pool, auth.namespace(), id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no delivery `{id}`")))
}

#[utoipa::path(get, operation_id = "getDelivery", path = "/v1/deliveries/{id}", tag = "deliveries", params(("id" = String, Path)),
    responses((status = 200, body = DeliveryDetail), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<DeliveryDetail>, ApiError> {
    auth.require(Role::Read)?;
    let delivery = load(&state, &auth, &id).await?;
    let attempts_log = store::deliveries::attempts(&state.store.pool, delivery.id).await?;
    Ok(Json(DeliveryDetail {
        delivery,
        attempts_log,
    }))
}

#[utoipa::path(post, operation_id = "redeliverDelivery", path = "/v1/deliveries/{id}/redeliver", tag = "deliveries", params(("id" = String, Path)),
    responses((status = 202, description = "queued again", body = Delivery),
              (status = 409, description = "still being delivered", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn redeliver(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    auth.require(Role::Submit)?;
    let id: Uuid = id
        .parse()
        .map_err(|_| ApiError::NotFound(format!("no delivery `{id}`")))?;
    let meta = auth.metadata();
    let attempts = state.config.delivery_retry_schedule.len() as u32 + 1;
    // The delivery is queued again and its job submitted in one transaction.
    let (d, ()) = command::execute_with::<Delivery, _, ApiError, _>(
        &state.store,
        auth.namespace(),
        id,
        &meta,
        |d| {
            if !d.status.is_final() {
                return Err(ApiError::Conflict(format!(
                    "the delivery is {}; redeliver it once it has finished",
                    d.status
                )));
            }
            let job_id = Uuid::now_v7();
            let job = store::jobs::submit_append(
                job_id,
                delivery::delivery_job(d.id, attempts),
                meta.clone(),
                domain::now(),
            )?;
            Ok(Decision {
                events: vec![DeliveryEvent::DeliveryQueued {
                    delivery_job_id: job_id,
                    reason: "redeliver".into(),
                }],
                with: vec![job],
                out: (),
            })
        },
    )
    .await
    .map_err(|e| ApiError::from_command(e, "delivery", id))?;
    Ok((StatusCode::ACCEPTED, Json(d)).into_response())
}
