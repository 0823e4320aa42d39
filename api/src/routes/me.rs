//! `GET /v1/me`: who the caller is and what its key may do (the dashboard hides what would fail).

use axum::Json;
use capibara_shared::domain::auth::Role;
use serde::Serialize;
use uuid::Uuid;

use crate::{auth::Auth, error::ApiError};

/// The calling key, without its secret.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Me {
    pub key_id: Uuid,
    pub name: String,
    pub namespace: String,
    pub roles: Vec<Role>,
    pub super_admin: bool,
    /// Each role and whether this key may act where it is required (`admin` implies `submit`,
    /// which implies `read`).
    pub can: Can,
}

/// What the key's roles grant.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Can {
    pub read: bool,
    pub submit: bool,
    pub admin: bool,
    pub worker: bool,
}

#[utoipa::path(get, operation_id = "getMe", path = "/v1/me", tag = "operations",
    responses((status = 200, body = Me)),
    security(("bearer" = [])))]
pub async fn get(auth: Auth) -> Result<Json<Me>, ApiError> {
    let k = &auth.key;
    Ok(Json(Me {
        key_id: k.id,
        name: k.name.clone(),
        namespace: k.namespace.clone(),
        roles: k.roles.clone(),
        super_admin: auth.is_super_admin(),
        can: Can {
            read: k.allows(Role::Read),
            submit: k.allows(Role::Submit),
            admin: k.allows(Role::Admin),
            worker: k.allows(Role::Worker),
        },
    }))
}
