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
