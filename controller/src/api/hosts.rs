//! `/v1/hosts`: the brokers the scheduler places machines on. Cluster-admin
//! only: hosts are infrastructure, not tenant data.
//!
//! STAND-INS: `POST /v1/hosts` and `POST /v1/hosts/{name}/machines/{id}/state`
//! exist until brokers register and report over their mTLS Cap'n Proto
//! session (later work). They call the same store functions the session
//! will, so the scheduler and the state machine are exercised now.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::extract::Caller;
use super::machines::{Machine, view as machine_view};
use super::problem::{ApiError, Problem};
use super::{AppState, validate};
use crate::db::models::{HostRow, string_map};
use crate::machine::MachineState;
use crate::scheduler::HostCapacity;
use crate::store::{hosts as store, machines as machines_store};

/// A host's registration (for now through the admin stand-in).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterHost {
    #[schema(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub name: String,
    /// Where the broker can be reached (informational until the session).
    #[schema(min_length = 1, max_length = 255, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]+$")]
    pub address: String,
    /// vCPUs offered to microVMs.
    #[schema(minimum = 1)]
    #[serde(deserialize_with = "super::integer::exact")]
    pub cpus: i32,
    /// Memory in MB offered to microVMs.
    #[schema(minimum = 1)]
    #[serde(deserialize_with = "super::integer::exact")]
    pub memory_mb: i64,
    #[serde(default)]
    #[schema(schema_with = super::document::labels_schema)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Host {
    pub name: String,
    pub address: String,
    pub cpus: i32,
    pub memory_mb: i64,
    #[schema(schema_with = super::document::labels_schema)]
    pub labels: BTreeMap<String, String>,
    /// ready, cordoned, draining, drained (draining with no machines), or
    /// lost (its broker stopped heart-beating; placement skips it).
    pub status: String,
    pub cordoned: bool,
    pub draining: bool,
    pub used_cpus: i64,
    pub used_memory_mb: i64,
    /// Machines placed here that are not destroyed.
    pub machines: i64,
    pub registered_at: DateTime<Utc>,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    /// When the leader marked it lost, while it is.
    pub lost_at: Option<DateTime<Utc>>,
    /// While draining: why some machines cannot move (no other host has
    /// room for them), as of the leader's last pass; they are tried again
    /// on every pass.
    pub drain_blocked: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HostList {
    pub hosts: Vec<Host>,
}

fn view(row: HostRow, usage: Option<(HostCapacity, i64)>) -> Host {
    let (used_cpus, used_memory_mb, machines) =
        usage.map(|(c, n)| (c.used_cpus, c.used_memory_mb, n)).unwrap_or_default();
    let status = match (row.cordoned, row.draining) {
        _ if row.lost_at.is_some() => "lost",
        (_, true) if machines == 0 => "drained",
        (_, true) => "draining",
        (true, false) => "cordoned",
        (false, false) => "ready",
    };
    Host {
        labels: string_map(&row.labels),
        name: row.name,
        address: row.address,
        cpus: row.cpus,
        memory_mb: row.memory_mb,
        status: status.to_owned(),
        cordoned: row.cordoned,
        draining: row.draining,
        used_cpus,
        used_memory_mb,
        machines,
        registered_at: row.registered_at,
        last_heartbeat_at: row.last_heartbeat_at,
        lost_at: row.lost_at,
        drain_blocked: row.drain_blocked,
    }
}

fn host_not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("host {name:?} not found"))
}

async fn load(state: &AppState, name: String) -> Result<Host, ApiError> {
    if !validate::is_name(&name) {
        return Err(host_not_found(&name));
    }
    let (row, usage) = state
        .db
        .run(move |c| {
            let row = store::get(c, &name)?;
            let usage = store::capacity(c, "")?.into_iter().find(|(h, _)| h.name == name);
            Ok::<_, crate::store::StoreError>((row, usage))
        })
        .await?;
    Ok(view(row, usage))
}

#[utoipa::path(get, operation_id = "hosts_list", path = "/v1/hosts", tag = "hosts", security(("bearer" = [])),
    responses((status = 200, body = HostList), (status = 403, body = Problem)))]
pub async fn list(State(state): State<Arc<AppState>>, caller: Caller) -> Result<Json<HostList>, ApiError> {
    caller.require_cluster_admin()?;
    let rows = state.db.run(store::list).await?;
    Ok(Json(HostList { hosts: rows.into_iter().map(|(row, c, n)| view(row, Some((c, n)))).collect() }))
}

/// STAND-IN for broker registration over mTLS: registers a host or updates
/// its address, capacity and labels (cordon and drain are kept).
#[utoipa::path(post, operation_id = "hosts_register", path = "/v1/hosts", tag = "hosts", security(("bearer" = [])),
    request_body = RegisterHost,
    responses((status = 201, body = Host), (status = 200, description = "Updated", body = Host),
        (status = 403, body = Problem), (status = 422, body = Problem)))]
pub async fn register(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Json(body): Json<RegisterHost>,
) -> Result<(StatusCode, Json<Host>), ApiError> {
    caller.require_cluster_admin()?;
    validate::name("host name", &body.name)?;
    validate::labels("labels", &body.labels)?;
    if body.cpus < 1 || body.memory_mb < 1 {
        return Err(ApiError::invalid("cpus and memory_mb must be positive"));
    }
    validate::text("address", &body.address, 1, 255)?;
    let spec = store::HostSpec {
        name: body.name.clone(),
        address: body.address,
        cpus: body.cpus,
        memory_mb: body.memory_mb,
        labels: body.labels,
    };
    let (_, new) = state.db.run(move |c| store::register(c, &spec)).await?;
    let host = load(&state, body.name).await?;
    Ok((if new { StatusCode::CREATED } else { StatusCode::OK }, Json(host)))
}

#[utoipa::path(get, operation_id = "hosts_get", path = "/v1/hosts/{name}", tag = "hosts", security(("bearer" = [])),
    params(("name" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")),
    responses((status = 200, body = Host), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn get(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Host>, ApiError> {
    caller.require_cluster_admin()?;
    Ok(Json(load(&state, name).await?))
}

async fn set_flags(
    state: Arc<AppState>,
    caller: Caller,
    name: String,
    cordoned: bool,
    draining: bool,
) -> Result<Json<Host>, ApiError> {
    caller.require_cluster_admin()?;
    if !validate::is_name(&name) {
        return Err(host_not_found(&name));
    }
    let n = name.clone();
    state.db.run(move |c| store::set_flags(c, &n, cordoned, draining)).await?;
    Ok(Json(load(&state, name).await?))
}

/// No new machines are placed here; the ones there stay.
#[utoipa::path(post, operation_id = "hosts_cordon", path = "/v1/hosts/{name}/cordon", tag = "hosts", security(("bearer" = [])),
    params(("name" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")),
    responses((status = 200, body = Host), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn cordon(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Host>, ApiError> {
    set_flags(state, caller, name, true, false).await
}

/// Back in the pool (also ends a drain).
#[utoipa::path(post, operation_id = "hosts_uncordon", path = "/v1/hosts/{name}/uncordon", tag = "hosts", security(("bearer" = [])),
    params(("name" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")),
    responses((status = 200, body = Host), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn uncordon(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Host>, ApiError> {
    set_flags(state, caller, name, false, false).await
}

/// Cordons the host and has the leading controller move its machines to
/// other hosts: stopped ones move stopped, running ones are stopped here
/// and started there (with a fresh root disk from their image). The host is
/// `drained` once none are left; `drain_blocked` says what cannot move.
#[utoipa::path(post, operation_id = "hosts_drain", path = "/v1/hosts/{name}/drain", tag = "hosts", security(("bearer" = [])),
    params(("name" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")),
    responses((status = 200, body = Host), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn drain(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Host>, ApiError> {
    set_flags(state, caller, name, true, true).await
}

/// A state a broker observed.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportState {
    pub state: MachineState,
}

/// STAND-IN for the broker session's observed-state report: the machine
/// placed on this host is now in `state`.
#[utoipa::path(post, operation_id = "hosts_report_state", path = "/v1/hosts/{name}/machines/{id}/state", tag = "hosts", security(("bearer" = [])),
    params(("name" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"), ("id" = Uuid, Path)),
    request_body = ReportState,
    responses((status = 200, body = Machine), (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 409, body = Problem)))]
pub async fn report_state(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((name, id)): Path<(String, Uuid)>,
    Json(body): Json<ReportState>,
) -> Result<Json<Machine>, ApiError> {
    caller.require_cluster_admin()?;
    if !validate::is_name(&name) {
        return Err(host_not_found(&name));
    }
    let row = state.db.run(move |c| machines_store::observe(c, &name, id, body.state)).await?;
    state.notify_change();
    Ok(Json(machine_view(row)?))
}
