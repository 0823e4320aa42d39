//! The Postgres side of `callback.deliver`: loads deliveries with their signing secret and custom
//! headers, and records attempts on the delivery stream (fenced by its version).

use std::convert::Infallible;

use async_trait::async_trait;
use capibara_shared::{
    command,
    domain::{
        self,
        delivery::{Delivery, DeliveryEvent},
        event::EventMetadata,
        webhook::WebhookSecret,
    },
    store::{self, Store},
};
use uuid::Uuid;

use crate::executors::callback::{AttemptRecord, DeliveryPort, DeliveryToSend};

pub struct PgDeliveryPort {
    pub store: Store,
    /// `CAPIBARA_WEBHOOK_SECRET`: signs callbacks (subscriptions have their own).
    pub default_secret: Option<String>,
}

#[async_trait]
impl DeliveryPort for PgDeliveryPort {
    async fn load(&self, id: Uuid) -> Result<Option<DeliveryToSend>, String> {
        let Some(d) = store::deliveries::get_any(&self.store.pool, id)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        let (secret, headers) = match d.subscription_id {
            Some(sid) => store::subscriptions::send_settings(&self.store.pool, sid)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("subscription {sid} was deleted"))?,
            None => (
                self.default_secret
                    .clone()
                    .ok_or("CAPIBARA_WEBHOOK_SECRET is not set on the worker")?,
                Default::default(),
            ),
        };
        let secret = WebhookSecret::parse(&secret).map_err(|e| e.to_string())?;
        Ok(Some(DeliveryToSend {
            namespace: d.namespace,
            url: d.url,
            payload: d.payload,
            secret,
            headers: headers.into_iter().collect(),
            attempts: d.attempts,
            finished: d.status == domain::delivery::DeliveryStatus::Succeeded,
        }))
    }

    async fn record(&self, id: Uuid, namespace: &str, r: AttemptRecord) -> Result<(), String> {
        let mut events = vec![DeliveryEvent::DeliveryAttempted {
            attempt: r.attempt,
            status_code: r.status_code,
            duration_ms: r.duration_ms,
            response_snippet: r.response_snippet.clone(),
            error: r.error.clone(),
        }];
        match r.final_outcome {
            Some(true) => events.push(DeliveryEvent::DeliverySucceeded { attempt: r.attempt }),
            Some(false) => events.push(DeliveryEvent::DeliveryFailed {
                attempt: r.attempt,
                reason: r.error.clone().unwrap_or_else(|| "failed".into()),
            }),
            None => {}
        }
        let meta = EventMetadata {
            namespace: namespace.to_string(),
            actor: Some("worker".into()),
            ..Default::default()
        };
        command::execute::<Delivery, _, Infallible, _>(&self.store, namespace, id, &meta, |_| {
            Ok((events.clone(), ()))
        })
        .await
        .map(drop)
        .map_err(|e| e.to_string())
    }
}
