//! Checks of URLs Capibara will call (callbacks, subscriptions): well-formed, and resolving only
//! to public addresses unless `CAPIBARA_OUTBOUND_ALLOW_PRIVATE=true`. The worker checks again
//! when it sends, with the address pinned (docs/deliveries.md).

use capibara_shared::{config::Config, outbound};

use crate::error::ApiError;

/// The URL, normalised, or a 422 naming `field`.
pub async fn check_url(field: &str, url: &str, config: &Config) -> Result<String, ApiError> {
    let parsed = outbound::parse_url(url).map_err(|e| ApiError::field(field, e.to_string()))?;
    outbound::resolve(&parsed, config.outbound_allow_private)
        .await
        .map_err(|e| ApiError::field(field, e.to_string()))?;
    Ok(parsed.to_string())
}

/// A `callback_url` of a request, checked: it needs the signing secret, and must pass
/// [`check_url`]. Errors name `callback_url`.
pub async fn callback_url(url: Option<&str>, config: &Config) -> Result<Option<String>, ApiError> {
    match url {
        None => Ok(None),
        Some(_) if config.webhook_secret.is_none() => Err(ApiError::field(
            "callback_url",
            "callbacks are signed with CAPIBARA_WEBHOOK_SECRET, which this server does not have",
        )),
        Some(url) => Ok(Some(check_url("callback_url", url, config).await?)),
    }
}
