//! `GET /v1/namespaces/{ns}/events`: every machine's state changes in a
//! namespace, as they are recorded, by long polling with a cursor (event
//! ids grow). Without `after` only what happens from now on counts, which
//! is what `mmctl --server events` follows; `after=0` reads the history
//! from the start, a page at a time. A plain JSON answer rather than an
//! endless stream, so any HTTP client, proxy and fuzzer copes with it, and
//! a client that reconnects with its last `next_after` misses nothing.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::extract::Caller;
use super::machines::MachineEvent;
use super::problem::{ApiError, Problem};
use super::{AppState, Woken};
use crate::auth::Role;
use crate::store::machines as store;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Events after this id (from `next_after`); absent: only events
    /// recorded from now on; 0: from the first.
    #[param(minimum = 0)]
    pub after: Option<i64>,
    /// Seconds to wait for an event when there is none yet, 0 to 60
    /// (default 0: answer at once).
    #[param(minimum = 0, maximum = 60)]
    pub wait: Option<u64>,
    /// Events per answer, 1 to 500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
}

/// One state change of one machine: a machine's event (as its own
/// `.../events` shows it) with the id of the event and of the machine.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NamespaceEvent {
    /// Grows with every event recorded.
    pub id: i64,
    pub machine_id: Uuid,
    pub machine_name: String,
    #[serde(flatten)]
    pub event: MachineEvent,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NamespaceEvents {
    /// Oldest first.
    pub events: Vec<NamespaceEvent>,
    /// Pass as `after` to get what comes next.
    pub next_after: i64,
}

/// The namespace's machine events after a cursor, waiting up to `wait`
/// seconds for one when there is none yet.
#[utoipa::path(get, operation_id = "namespaces_events", path = "/v1/namespaces/{namespace}/events", tag = "namespaces",
    security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"), EventsQuery),
    responses((status = 200, body = NamespaceEvents), (status = 400, body = Problem), (status = 404, body = Problem)))]
pub async fn events(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(namespace): Path<String>,
    Query(query): Query<EventsQuery>,
) -> Result<Json<NamespaceEvents>, ApiError> {
    caller.require(&namespace, Role::Viewer)?;
    let wait = query.wait.unwrap_or(0);
    let limit = query.limit.unwrap_or(100);
    if wait > 60 || !(1..=500).contains(&limit) || query.after.is_some_and(|a| a < 0) {
        return Err(ApiError::bad_request("after is at least 0, wait 0 to 60 seconds and limit 1 to 500"));
    }
    let ns = namespace.clone();
    state.db.run(move |c| crate::store::namespaces::get(c, &ns)).await?;
    let after = match query.after {
        Some(after) => after,
        None => state.db.run(store::newest_event_id).await?,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    let mut watch = state.watch_changes();
    loop {
        watch.mark_seen();
        let ns = namespace.clone();
        let rows = state.db.run(move |c| store::namespace_events(c, &ns, after, limit)).await?;
        if !rows.is_empty() || tokio::time::Instant::now() >= deadline {
            let next_after = rows.last().map_or(after, |(row, _)| row.id);
            let events = rows
                .into_iter()
                .map(|(row, machine_name)| {
                    let (id, machine_id) = (row.id, row.machine_id);
                    Ok(NamespaceEvent { id, machine_id, machine_name, event: MachineEvent::from_row(row)? })
                })
                .collect::<Result<_, ApiError>>()?;
            return Ok(Json(NamespaceEvents { events, next_after }));
        }
        // Nothing new before the shutdown: an empty answer, at once; after
        // the deadline, the last look above answers.
        if watch.sleep(deadline).await == Woken::ShuttingDown {
            return Ok(Json(NamespaceEvents { events: Vec::new(), next_after: after }));
        }
    }
}
