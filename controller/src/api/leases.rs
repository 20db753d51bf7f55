//! `/v1/namespaces/{namespace}/machines/{id}/lease`: an advisory lock with a
//! TTL, so two clients (say, two deploy jobs) cannot change one machine at
//! once. While a lease is active, start, stop, delete and the lease calls
//! themselves need its nonce in `Machine-Lease-Nonce`; without it they get
//! 409. An expired lease is simply gone: a crashed holder blocks no one for
//! longer than its TTL.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::AppState;
use super::extract::{Caller, LeaseNonce};
use super::machines::LeaseInfo;
use super::problem::{ApiError, Problem, empty};
use crate::auth::Role;
use crate::store::machines as store;

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AcquireLease {
    /// Seconds, 1 to 3600 (default 30).
    #[serde(default, deserialize_with = "super::integer::optional")]
    #[schema(minimum = 1, maximum = 3600)]
    pub ttl: Option<u64>,
    #[serde(default)]
    #[schema(max_length = 256, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$")]
    pub description: String,
}

/// A granted or extended lease. The nonce is only ever returned here.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Lease {
    pub nonce: String,
    pub owner: String,
    pub description: String,
    pub expires_at: DateTime<Utc>,
}

/// The active lease, without its nonce.
#[utoipa::path(get, operation_id = "machines_get_lease", path = "/v1/namespaces/{namespace}/machines/{id}/lease", tag = "machines",
    security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"), ("id" = Uuid, Path)),
    responses((status = 200, body = LeaseInfo), (status = 404, description = "No active lease", body = Problem)))]
pub async fn get_lease(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((namespace, id)): Path<(String, Uuid)>,
) -> Result<Json<LeaseInfo>, ApiError> {
    caller.require(&namespace, Role::Viewer)?;
    let row = state.db.run(move |c| store::get(c, &namespace, id)).await?;
    super::machines::view(row)?.lease.map(Json).ok_or_else(|| ApiError::not_found("the machine has no active lease"))
}

/// Takes a lease (201), or extends the caller's own when its nonce is sent
/// (200, same nonce).
#[utoipa::path(post, operation_id = "machines_acquire_lease", path = "/v1/namespaces/{namespace}/machines/{id}/lease", tag = "machines",
    security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"), ("id" = Uuid, Path), ("Machine-Lease-Nonce" = Option<String>, Header)),
    request_body = AcquireLease,
    responses((status = 201, body = Lease), (status = 200, description = "Extended", body = Lease),
        (status = 404, body = Problem), (status = 409, description = "Leased by someone else", body = Problem)))]
pub async fn acquire_lease(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((namespace, id)): Path<(String, Uuid)>,
    LeaseNonce(nonce): LeaseNonce,
    Json(body): Json<AcquireLease>,
) -> Result<(StatusCode, Json<Lease>), ApiError> {
    caller.require(&namespace, Role::Operator)?;
    let ttl = body.ttl.unwrap_or(30);
    if !(1..=3600).contains(&ttl) {
        return Err(ApiError::invalid("ttl must be 1 to 3600 seconds"));
    }
    super::validate::text("description", &body.description, 0, 256)?;
    let owner = caller.0.sub.clone();
    let (row, nonce, new) = state
        .db
        .run(move |c| {
            let ttl = chrono::Duration::seconds(ttl as i64);
            store::acquire_lease(c, &namespace, id, ttl, &owner, &body.description, nonce.as_deref())
        })
        .await?;
    state.notify_change();
    let lease = Lease {
        nonce,
        owner: row.lease_owner.unwrap_or_default(),
        description: row.lease_description.unwrap_or_default(),
        expires_at: row.lease_expires_at.unwrap_or_default(),
    };
    Ok((if new { StatusCode::CREATED } else { StatusCode::OK }, Json(lease)))
}

/// Releases the lease; needs its nonce (400 without one: the header is
/// required, whether or not a lease is held).
#[utoipa::path(delete, operation_id = "machines_release_lease", path = "/v1/namespaces/{namespace}/machines/{id}/lease", tag = "machines",
    security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"), ("id" = Uuid, Path), ("Machine-Lease-Nonce" = String, Header)),
    responses((status = 204), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn release_lease(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((namespace, id)): Path<(String, Uuid)>,
    LeaseNonce(nonce): LeaseNonce,
) -> Result<Response, ApiError> {
    caller.require(&namespace, Role::Operator)?;
    let Some(nonce) = nonce else {
        return Err(ApiError::bad_request("Machine-Lease-Nonce is required to release a lease"));
    };
    state.db.run(move |c| store::release_lease(c, &namespace, id, Some(&nonce))).await?;
    state.notify_change();
    Ok(empty(StatusCode::NO_CONTENT))
}
