//! `/v1/namespaces`: creating and removing tenants is a cluster-admin job;
//! everyone sees the namespaces they hold a role in.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::extract::{Caller, role_name};
use super::problem::{ApiError, Problem, empty};
use super::{AppState, validate};
use crate::auth::Role;
use crate::db::models::NamespaceRow;
use crate::store::namespaces as store;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateNamespace {
    /// 1 to 63 lowercase letters, digits or '-'.
    #[schema(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub name: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Namespace {
    pub name: String,
    pub created_at: DateTime<Utc>,
    /// The caller's role here.
    pub role: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NamespaceList {
    pub namespaces: Vec<Namespace>,
}

fn view(row: NamespaceRow, caller: &Caller) -> Namespace {
    let role = caller.0.role_in(&row.name).map(role_name).unwrap_or("none").to_owned();
    Namespace { name: row.name, created_at: row.created_at, role }
}

/// Namespaces the caller holds a role in (all of them for a cluster admin).
#[utoipa::path(get, operation_id = "namespaces_list", path = "/v1/namespaces", tag = "namespaces", security(("bearer" = [])),
    responses((status = 200, body = NamespaceList), (status = 401, body = Problem)))]
pub async fn list(State(state): State<Arc<AppState>>, caller: Caller) -> Result<Json<NamespaceList>, ApiError> {
    let only = (!caller.0.cluster_admin).then(|| caller.0.roles.keys().cloned().collect::<Vec<_>>());
    let rows = state.db.run(move |c| store::list(c, only.as_deref())).await?;
    Ok(Json(NamespaceList { namespaces: rows.into_iter().map(|r| view(r, &caller)).collect() }))
}

/// Creates a namespace (cluster admin).
#[utoipa::path(post, operation_id = "namespaces_create", path = "/v1/namespaces", tag = "namespaces", security(("bearer" = [])),
    request_body = CreateNamespace,
    responses((status = 201, body = Namespace), (status = 403, body = Problem), (status = 409, body = Problem),
        (status = 422, body = Problem)))]
pub async fn create(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Json(body): Json<CreateNamespace>,
) -> Result<(StatusCode, Json<Namespace>), ApiError> {
    caller.require_cluster_admin()?;
    validate::name("namespace name", &body.name)?;
    let row = state.db.run(move |c| store::create(c, &body.name)).await?;
    Ok((StatusCode::CREATED, Json(view(row, &caller))))
}

/// One namespace (any role in it).
#[utoipa::path(get, operation_id = "namespaces_get", path = "/v1/namespaces/{namespace}", tag = "namespaces", security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")),
    responses((status = 200, body = Namespace), (status = 404, body = Problem)))]
pub async fn get(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(namespace): Path<String>,
) -> Result<Json<Namespace>, ApiError> {
    caller.require(&namespace, Role::Viewer)?;
    let row = state.db.run(move |c| store::get(c, &namespace)).await?;
    Ok(Json(view(row, &caller)))
}

/// Deletes a namespace whose machines are all destroyed (cluster admin).
#[utoipa::path(delete, operation_id = "namespaces_delete", path = "/v1/namespaces/{namespace}", tag = "namespaces", security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")),
    responses((status = 204), (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 409, body = Problem)))]
pub async fn delete(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(namespace): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(&namespace, Role::Viewer)?;
    caller.require_cluster_admin()?;
    state.db.run(move |c| store::delete(c, &namespace)).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}
