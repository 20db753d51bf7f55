//! `GET .../machines/{id}/stats`: how each process of a started machine's
//! microVM is doing (mm-vmm and every device back end: CPU time, peak
//! memory, uptime, restarts), each answering for itself over its control
//! channel through the machine's broker. `mmctl --server stats` prints it.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::exec::{session_error, started_host};
use super::extract::Caller;
use super::problem::{ApiError, Problem};
use super::{AppState, forward};
use crate::auth::Role;
use crate::session::ProcessStats;

/// One process of the microVM.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProcessStat {
    /// `vmm`, or the device's role (`block-rw`, `net`, `vsock`).
    pub role: String,
    pub pid: i32,
    /// Times the broker restarted it.
    pub restarts: u32,
    /// Why it did not answer (the figures below are then 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub uptime_ms: u64,
    pub user_cpu_ms: u64,
    pub system_cpu_ms: u64,
    pub max_rss_kib: u64,
    /// For a device: back ends mm-vmm was handed for it after the first.
    pub reconnects: u32,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MachineStats {
    pub processes: Vec<ProcessStat>,
}

impl From<ProcessStats> for ProcessStat {
    fn from(p: ProcessStats) -> Self {
        ProcessStat {
            role: p.role,
            pid: p.pid,
            restarts: p.restarts,
            error: (!p.error.is_empty()).then_some(p.error),
            uptime_ms: p.uptime_ms,
            user_cpu_ms: p.user_cpu_ms,
            system_cpu_ms: p.system_cpu_ms,
            max_rss_kib: p.max_rss_kib,
            reconnects: p.reconnects,
        }
    }
}

/// How each process of a started machine's microVM is doing. 409 unless
/// started; 503 when no controller can reach its host's broker.
#[utoipa::path(get, operation_id = "machines_stats", path = "/v1/namespaces/{namespace}/machines/{id}/stats", tag = "machines",
    security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"), ("id" = Uuid, Path)),
    responses((status = 200, body = MachineStats), (status = 404, body = Problem),
        (status = 409, description = "Not started", body = Problem),
        (status = 502, description = "The broker failed", body = Problem)))]
pub async fn stats(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((namespace, id)): Path<(String, Uuid)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    caller.require(&namespace, Role::Viewer)?;
    let host = started_host(&state, namespace.clone(), id, "read the stats of").await?;
    if let Some(peer) = forward::peer_for(&state, &host, &headers).await? {
        let path = format!("/v1/namespaces/{namespace}/machines/{id}/stats");
        return forward::http(&state, &peer, &host, Method::GET, &path, &headers, None).await;
    }
    let processes = state.hub.stats(&host, &id.to_string()).await.map_err(session_error)?;
    Ok(Json(MachineStats { processes: processes.into_iter().map(ProcessStat::from).collect() }).into_response())
}
