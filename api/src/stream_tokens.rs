//! Stream tokens: short-lived, signed credentials for the streams a browser opens without
//! headers (`EventSource`, `WebSocket`), passed as `?token=` (docs/security.md, "Stream tokens").
//!
//! A token is `cst1.<claims>.<mac>`: base64url JSON claims (key id, namespace, roles, an
//! optional single stream path, expiry) and an HMAC-SHA256 over them. It is stateless, so any
//! API process that knows the secret accepts it: the secret is `CAPIBARA_STREAM_TOKEN_SECRET`
//! or, unset, one generated once and kept in Postgres (`server_secrets`).
//!
//! A token is accepted only by [`StreamAuth`], which only the SSE endpoints and
//! `GET /v1/tts/stream` use, and only on a request that asks for a stream (`Accept:
//! text/event-stream` or a WebSocket upgrade): it is never a general API credential.

use std::sync::Arc;

use axum::{
    extract::{FromRequestParts, State},
    http::{header, request::Parts, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64, Engine};
use capibara_shared::{
    domain::auth::Role,
    store::keys::{self, ApiKey},
};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use uuid::Uuid;

use crate::{auth::Auth, error::ApiError, extract::ApiJson, AppState};

const PREFIX: &str = "cst1.";

/// What a token carries. Copied from the issuing key: a token never holds more than its key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// The issuing key (checked again, not revoked, when a stream opens).
    pub kid: Uuid,
    pub ns: String,
    pub roles: Vec<Role>,
    /// The key is a super-admin.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sa: bool,
    /// The one stream path the token opens (`/v1/jobs/{id}/events`); absent: every stream
    /// endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Unix seconds after which the token opens nothing.
    pub exp: i64,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the stream token is malformed")]
    Malformed,
    #[error("the stream token's signature does not match")]
    BadSignature,
    #[error("the stream token has expired")]
    Expired,
    #[error("the stream token does not open this path")]
    WrongPath,
}

fn mac(secret: &[u8]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length")
}

/// The signed token for `claims`.
pub fn sign(secret: &[u8], claims: &Claims) -> String {
    let body = B64.encode(serde_json::to_vec(claims).expect("claims serialize"));
    let mut m = mac(secret);
    m.update(body.as_bytes());
    let sig = B64.encode(m.finalize().into_bytes());
    format!("{PREFIX}{body}.{sig}")
}

/// The claims of a token signed with `secret` that is still valid at `now` (unix seconds) and
/// opens `path`.
pub fn verify(secret: &[u8], token: &str, now: i64, path: &str) -> Result<Claims, TokenError> {
    let rest = token.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
    let (body, sig) = rest.split_once('.').ok_or(TokenError::Malformed)?;
    let sig = B64.decode(sig).map_err(|_| TokenError::Malformed)?;
    let mut m = mac(secret);
    m.update(body.as_bytes());
    // Constant-time comparison.
    m.verify_slice(&sig).map_err(|_| TokenError::BadSignature)?;
    let claims: Claims = B64
        .decode(body)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(TokenError::Malformed)?;
    if now >= claims.exp {
        return Err(TokenError::Expired);
    }
    if !is_stream_path(path) || claims.path.as_deref().is_some_and(|p| p != path) {
        return Err(TokenError::WrongPath);
    }
    Ok(claims)
}

/// The endpoints a stream token may open: job and run SSE, the firehose, the TTS WebSocket.
pub fn is_stream_path(path: &str) -> bool {
    let segs: Vec<&str> = path.split('/').collect();
    matches!(
        segs.as_slice(),
        ["", "v1", "jobs", id, "events"] | ["", "v1", "runs", id, "events"] if !id.is_empty()
    ) || path == "/v1/events"
        || path == "/v1/tts/stream"
}

/// The signing secret: from config, else loaded (or created) once in Postgres.
#[derive(Clone, Default)]
pub struct TokenSecret {
    cell: Arc<tokio::sync::OnceCell<Vec<u8>>>,
}

impl TokenSecret {
    pub async fn get(&self, state: &AppState) -> Result<&[u8], ApiError> {
        self.cell
            .get_or_try_init(|| async {
                if let Some(s) = &state.config.stream_token_secret {
                    return Ok(s.as_bytes().to_vec());
                }
                let fresh: [u8; 32] = rand::random();
                // Encrypted at rest like every stored secret (docs/security.md).
                let secret = capibara_shared::store::sealed::server_secret(
                    &state.store.pool,
                    "stream_tokens",
                    &fresh,
                )
                .await?;
                Ok(secret)
            })
            .await
            .map(Vec::as_slice)
    }
}

/// `POST /v1/stream-tokens` body.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewStreamToken {
    /// Limit the token to one stream, e.g. `/v1/jobs/{id}/events`; default: every stream
    /// endpoint (job and run events, `/v1/events`, `/v1/tts/stream`).
    #[serde(default)]
    #[schema(pattern = "^/v1/((jobs|runs)/[^/]+/events|events|tts/stream)$")]
    pub path: Option<String>,
}

/// A stream token: pass it as `?token=` to an SSE endpoint or `/v1/tts/stream`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StreamToken {
    pub token: String,
    pub expires_at: chrono::DateTime<chrono::Utc>,
    pub expires_in_s: u64,
    pub namespace: String,
    pub roles: Vec<Role>,
    /// The one path it opens, when limited.
    pub path: Option<String>,
}

#[utoipa::path(post, operation_id = "createStreamToken", path = "/v1/stream-tokens", tag = "events",
    request_body = NewStreamToken,
    responses((status = 201, body = StreamToken, description = "a token for `?token=` on the SSE endpoints and `/v1/tts/stream`; \
               it opens a stream until it expires (an open stream continues) and authenticates nothing else"),
              (status = 403, body = crate::error::Problem),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    auth: Auth,
    body: ApiJson<NewStreamToken>,
) -> Result<Response, ApiError> {
    auth.require(Role::Read)?;
    let path = body.value.path;
    if let Some(p) = &path {
        if !is_stream_path(p) {
            return Err(ApiError::field(
                "path",
                "must be a stream endpoint: /v1/jobs/{id}/events, /v1/runs/{id}/events, /v1/events or /v1/tts/stream",
            ));
        }
    }
    let ttl = state.config.stream_token_ttl;
    let expires_at =
        chrono::Utc::now() + chrono::Duration::from_std(ttl).expect("ttl is at most an hour");
    let claims = Claims {
        kid: auth.key.id,
        ns: auth.key.namespace.clone(),
        roles: auth.key.roles.clone(),
        sa: auth.key.super_admin,
        path: path.clone(),
        exp: expires_at.timestamp(),
    };
    let secret = state.stream_secret.get(&state).await?;
    let token = sign(secret, &claims);
    Ok((
        StatusCode::CREATED,
        [(header::CACHE_CONTROL, "no-store")],
        Json(StreamToken {
            token,
            expires_at,
            expires_in_s: ttl.as_secs(),
            namespace: claims.ns,
            roles: claims.roles,
            path,
        }),
    )
        .into_response())
}

/// The caller of a stream endpoint: a bearer API key as everywhere, or a stream token in
/// `?token=` on a request that opens a stream.
pub struct StreamAuth(pub Auth);

fn query_token(parts: &Parts) -> Option<String> {
    let q = parts.uri.query()?;
    serde_urlencoded::from_str::<Vec<(String, String)>>(q)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v)
}

fn opens_stream(parts: &Parts) -> bool {
    crate::extract::wants_sse(&parts.headers)
        || parts
            .headers
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

impl FromRequestParts<AppState> for StreamAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = match query_token(parts) {
            Some(t) if !parts.headers.contains_key(header::AUTHORIZATION) => t,
            _ => return Auth::from_request_parts(parts, state).await.map(StreamAuth),
        };
        let refuse = |e: TokenError| {
            metrics::counter!("capibara_auth_failures_total").increment(1);
            ApiError::TokenRefused(e.to_string())
        };
        if !opens_stream(parts) {
            return Err(ApiError::TokenRefused(
                "a stream token opens only streams (Accept: text/event-stream or a WebSocket upgrade)"
                    .into(),
            ));
        }
        let secret = state.stream_secret.get(state).await?;
        let claims = verify(
            secret,
            &token,
            chrono::Utc::now().timestamp(),
            parts.uri.path(),
        )
        .map_err(refuse)?;
        // The key may have been revoked since (the bootstrap admin, never stored, cannot be).
        let key = if claims.kid.is_nil() {
            ApiKey {
                id: Uuid::nil(),
                namespace: claims.ns.clone(),
                name: "bootstrap admin (CAPIBARA_ADMIN_KEY)".into(),
                prefix: String::new(),
                roles: claims.roles.clone(),
                super_admin: claims.sa,
                created_at: chrono::DateTime::UNIX_EPOCH,
                revoked_at: None,
                revoked_by: None,
            }
        } else {
            match keys::get(&state.store.pool, claims.kid).await? {
                Some(k) if k.revoked_at.is_none() && k.namespace == claims.ns => k,
                _ => return Err(ApiError::Unauthorized),
            }
        };
        // Never more than the token says, nor more than the key holds now.
        let roles = key
            .roles
            .iter()
            .copied()
            .filter(|r| claims.roles.contains(r))
            .collect();
        let key = ApiKey {
            roles,
            super_admin: key.super_admin && claims.sa,
            ..key
        };
        state
            .limiter
            .check(key.id)
            .map_err(ApiError::rate_limited)?;
        Ok(StreamAuth(Auth { key }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64, path: Option<&str>) -> Claims {
        Claims {
            kid: Uuid::now_v7(),
            ns: "team-a".into(),
            roles: vec![Role::Read],
            sa: false,
            path: path.map(String::from),
            exp,
        }
    }

    const JOB: &str = "/v1/jobs/0190c7a4-0000-7000-8000-000000000000/events";

    #[test]
    fn a_signed_token_verifies_and_returns_its_claims() {
        let c = claims(1_000, None);
        let t = sign(b"secret", &c);
        assert!(t.starts_with("cst1."));
        assert_eq!(verify(b"secret", &t, 999, JOB), Ok(c.clone()));
        assert_eq!(verify(b"secret", &t, 999, "/v1/events"), Ok(c.clone()));
        assert_eq!(verify(b"secret", &t, 999, "/v1/tts/stream"), Ok(c));
    }

    #[test]
    fn a_token_expires_at_its_exp() {
        let t = sign(b"secret", &claims(1_000, None));
        assert_eq!(verify(b"secret", &t, 1_000, JOB), Err(TokenError::Expired));
        assert_eq!(verify(b"secret", &t, 5_000, JOB), Err(TokenError::Expired));
    }

    #[test]
    fn another_secret_or_an_edited_token_is_refused() {
        let t = sign(b"secret", &claims(1_000, None));
        assert_eq!(verify(b"other", &t, 0, JOB), Err(TokenError::BadSignature));
        // Widening the claims (a later exp, the admin role) breaks the signature.
        let (body, sig) = t.strip_prefix(PREFIX).unwrap().split_once('.').unwrap();
        let mut c: Claims = serde_json::from_slice(&B64.decode(body).unwrap()).unwrap();
        c.roles.push(Role::Admin);
        c.exp = i64::MAX;
        let forged = format!(
            "{PREFIX}{}.{sig}",
            B64.encode(serde_json::to_vec(&c).unwrap())
        );
        assert_eq!(
            verify(b"secret", &forged, 0, JOB),
            Err(TokenError::BadSignature)
        );
        for junk in ["", "cst1.", "cst1.abc", "cst1.a.b", "Bearer x", "cst2.a.b"] {
            assert!(verify(b"secret", junk, 0, JOB).is_err(), "{junk}");
        }
    }

    #[test]
    fn a_token_opens_only_stream_paths_and_its_own_path() {
        let any = sign(b"s", &claims(10, None));
        for p in [
            "/v1/jobs",
            "/v1/jobs/x",
            "/v1/api-keys",
            "/v1/jobs//events",
            "/v1/runs",
        ] {
            assert_eq!(verify(b"s", &any, 0, p), Err(TokenError::WrongPath), "{p}");
        }
        let one = sign(b"s", &claims(10, Some(JOB)));
        assert!(verify(b"s", &one, 0, JOB).is_ok());
        assert_eq!(
            verify(b"s", &one, 0, "/v1/events"),
            Err(TokenError::WrongPath)
        );
        assert!(is_stream_path("/v1/runs/abc/events"));
        assert!(!is_stream_path("/v1/runs/abc/cancel"));
    }
}
