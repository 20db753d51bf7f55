//! Snapshots of machines: `POST .../machines/{id}/snapshots` has the
//! machine's broker take one while the machine runs on; `GET
//! .../machines/{id}/snapshots`, `GET .../snapshots` and `GET
//! .../snapshots/{sid}` list them from Postgres (no broker round trip, and
//! a namespace sees only its own); `DELETE .../snapshots/{sid}` has the
//! broker delete the files, then forgets the row. A new machine is made
//! from one with `POST .../machines {"from_snapshot": sid}` (`machines`),
//! several at once with `POST .../snapshots/{sid}/fork`.
//!
//! Taking and deleting go through the session of the host holding the
//! snapshot, as exec and stats do: a controller without that session
//! forwards the request (its `Idempotency-Key` too) to the one that has
//! it, and without one anywhere the answer is 503 with `Retry-After`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::exec::session_error;
use super::extract::{Caller, IdempotencyKey};
use super::machines::Machine;
use super::paging::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, decode_cursor, encode_cursor};
use super::problem::{ApiError, Problem, empty};
use super::{AppState, forward, validate};
use crate::auth::Role;
use crate::db::models::NewSnapshot;
use crate::machine::MachineState;
use crate::session::{SessionError, SnapshotInfo};
use crate::store::fork::{self as fork_store, Fork, Forked, MAX_FORK};
use crate::store::machines as machines_store;
use crate::store::snapshots::{self as store, Begun, Named};

/// A snapshot of a machine.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    /// Its broker's id: what `from_snapshot` and the paths take.
    pub id: String,
    /// The name it was given, if any (unique in the namespace).
    pub name: Option<String>,
    pub namespace: String,
    /// The machine it was taken of (which may have been destroyed since).
    pub machine_id: Uuid,
    pub machine_name: String,
    /// The host holding its files; machines made from it are placed there.
    pub host: String,
    /// `snapshot`.
    pub kind: String,
    /// The guest's size when it was taken, which a machine made from it has.
    pub cpus: i32,
    pub memory_mb: i64,
    /// Guest memory saved (untouched and zero pages are left out).
    pub memory_bytes: u64,
    /// Space it takes on the host's disk (memory, state and the machine's
    /// disk).
    pub disk_bytes: u64,
    /// How long the guest stood still for it, in microseconds.
    pub pause_us: u64,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SnapshotList {
    pub snapshots: Vec<Snapshot>,
    /// Pass as `page_token` for the next page; absent on the last page.
    pub next_page_token: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// A name to tell it by, unique among the namespace's snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkSnapshot {
    /// How many machines to make, 1 to 64.
    #[schema(minimum = 1, maximum = 64)]
    #[serde(deserialize_with = "super::integer::exact")]
    pub count: i64,
    /// They are named PREFIX-1 … PREFIX-count; by default the snapshot's
    /// name (else the first 6 characters of its id) with `-fork`. At most
    /// 60 characters, so that every name is a machine name (63 at most).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 60, pattern = "^[a-z0-9]([a-z0-9-]{0,58}[a-z0-9])?$")]
    pub name_prefix: Option<String>,
    /// authorized_keys lines that replace the snapshot's in every machine
    /// (absent or empty: the snapshot's stay), as a create's
    /// `config.ssh_keys` does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(schema_with = super::document::ssh_keys_schema)]
    pub ssh_keys: Vec<String>,
}

/// The machines a fork made, in name order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ForkedMachines {
    pub machines: Vec<Machine>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// 1 to 500, default 50.
    #[param(minimum = 1, maximum = 500)]
    pub page_size: Option<i64>,
    /// `next_page_token` of the previous page (opaque; one this API did
    /// not issue is 400).
    #[param(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub page_token: Option<String>,
}

/// A row as the API shows it.
pub fn view((row, machine_name): Named) -> Snapshot {
    let unsigned = |n: i64| u64::try_from(n).unwrap_or(0);
    Snapshot {
        id: row.id,
        name: row.name,
        namespace: row.namespace,
        machine_id: row.machine_id,
        machine_name,
        host: row.host_name,
        kind: row.kind,
        cpus: row.cpus,
        memory_mb: row.memory_mb,
        memory_bytes: unsigned(row.memory_bytes),
        disk_bytes: unsigned(row.disk_bytes),
        pause_us: unsigned(row.pause_us),
        created_at: row.created_at,
    }
}

/// The row for what the broker took.
fn new_row(info: SnapshotInfo, namespace: String, machine: Uuid, host: String, name: Option<String>) -> NewSnapshot {
    let signed = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let created_at =
        DateTime::parse_from_rfc3339(&info.created_at).map(|t| t.with_timezone(&Utc)).unwrap_or_else(|_| Utc::now());
    NewSnapshot {
        id: info.id,
        namespace,
        machine_id: machine,
        host_name: host,
        name,
        kind: if info.kind.is_empty() { "snapshot".into() } else { info.kind },
        cpus: i32::from(info.cpus.max(1)),
        memory_mb: i64::from(info.memory_mib.max(1)),
        memory_bytes: signed(info.memory_bytes),
        disk_bytes: signed(info.disk_bytes),
        pause_us: signed(info.pause_us),
        created_at,
    }
}

/// The problem for a failed broker call: as exec's, but a snapshot that
/// takes too long is the gateway's timeout, not the request's.
fn broker_error(e: SessionError) -> ApiError {
    match e {
        SessionError::Timeout(_) => ApiError::new(StatusCode::GATEWAY_TIMEOUT, "broker-timeout", e.to_string()),
        other => session_error(other),
    }
}

fn created(named: Named, status: StatusCode) -> Response {
    let snapshot = view(named);
    let mut headers = HeaderMap::new();
    if status == StatusCode::CREATED {
        let location = format!("/v1/namespaces/{}/snapshots/{}", snapshot.namespace, snapshot.id);
        headers.insert(header::LOCATION, HeaderValue::from_str(&location).expect("names and ids are plain ASCII"));
    } else {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    (status, headers, Json(snapshot)).into_response()
}

/// Has the machine's broker snapshot it while it runs on: guest memory,
/// vCPU and device state, and its disk at the same instant. Answers 201
/// with the snapshot once it is on the host's disk. With an
/// `Idempotency-Key`, the same request again answers 200 with the same
/// snapshot (`Idempotent-Replayed: true`), while the first is still being
/// taken 409 (`idempotency-key-in-flight`, `Retry-After`), and the key
/// with another request 422. 409 unless the machine is started.
#[utoipa::path(post, operation_id = "snapshots_create", path = "/v1/namespaces/{namespace}/machines/{id}/snapshots", tag = "snapshots",
    security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"), ("id" = Uuid, Path),
        ("Idempotency-Key" = Option<String>, Header, pattern = "^[!-~]{1,255}$",
            description = "Makes retries of this create safe")),
    request_body = CreateSnapshot,
    responses((status = 201, body = Snapshot), (status = 200, description = "Replayed by Idempotency-Key", body = Snapshot),
        (status = 403, description = "A role too small, or the namespace is at its snapshot quota or this snapshot does not fit in it (quota-exceeded)", body = Problem),
        (status = 404, body = Problem),
        (status = 409, description = "Not started, name taken, or the key's first request is still running", body = Problem),
        (status = 502, description = "The broker failed", body = Problem),
        (status = 504, description = "The broker took too long", body = Problem)))]
pub async fn create(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((namespace, id)): Path<(String, Uuid)>,
    IdempotencyKey(key): IdempotencyKey,
    headers: HeaderMap,
    Json(body): Json<CreateSnapshot>,
) -> Result<Response, ApiError> {
    caller.require(&namespace, Role::Operator)?;
    if let Some(name) = &body.name {
        validate::name("snapshot name", name)?;
    }
    let ns = namespace.clone();
    let machine = state.db.run(move |c| machines_store::get(c, &ns, id)).await?;
    let host = machine.host_name.clone().unwrap_or_default();
    if let Some(peer) = forward::peer_for(&state, &host, &headers).await? {
        let path = format!("/v1/namespaces/{namespace}/machines/{id}/snapshots");
        let body = serde_json::to_vec(&body).expect("a plain struct serializes");
        return forward::http(&state, &peer, &host, Method::POST, &path, &headers, Some(body)).await;
    }
    // The key is checked and reserved before anything else: a retry gets
    // the first answer even if the machine has stopped since.
    let digest = key.as_ref().map(|_| {
        let canonical = serde_json::to_vec(&body).expect("a plain struct serializes");
        format!("{:x}", Sha256::digest([format!("snapshot {id} ").as_bytes(), &canonical].concat()))
    });
    let (ns, k, d, name) = (namespace.clone(), key.clone(), digest.clone(), body.name.clone());
    let begun = state.db.run(move |c| store::begin(c, &ns, k.as_deref().zip(d.as_deref()), name.as_deref())).await?;
    if let Begun::Replayed(named) = begun {
        return Ok(created(*named, StatusCode::OK));
    }
    let taken = take(&state, &namespace, &machine.state, id, &host, body.name, key.as_deref()).await;
    if taken.is_err()
        && let Some(key) = key
    {
        let ns = namespace.clone();
        if let Err(e) = state.db.run(move |c| store::abandon(c, &ns, &key)).await {
            tracing::warn!("cannot free the Idempotency-Key of a failed snapshot: {e}");
        }
    }
    Ok(created(taken?, StatusCode::CREATED))
}

/// The part of a create after its key is reserved: the broker takes the
/// snapshot, the row records it. Should the row be refused (its name was
/// taken meanwhile), the broker's snapshot is deleted again.
async fn take(
    state: &AppState,
    namespace: &str,
    machine_state: &str,
    id: Uuid,
    host: &str,
    name: Option<String>,
    key: Option<&str>,
) -> Result<Named, ApiError> {
    if machine_state != MachineState::Started.as_str() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid-state",
            format!("cannot snapshot a machine that is {machine_state}: it must be started"),
        ));
    }
    let info = state.hub.snapshot(host, &id.to_string()).await.map_err(broker_error)?;
    let snapshot_id = info.id.clone();
    let row = new_row(info, namespace.to_owned(), id, host.to_owned(), name);
    let key = key.map(str::to_owned);
    match state.db.run(move |c| store::record(c, row, key.as_deref())).await {
        Ok(named) => Ok(named),
        Err(e) => {
            if let Err(removal) = state.hub.remove_snapshot(host, &snapshot_id).await {
                tracing::warn!(%host, snapshot = %snapshot_id, "a snapshot not recorded stays on its host: {removal}");
            }
            Err(e.into())
        }
    }
}

/// Makes `count` machines from the snapshot at once, each exactly as
/// `POST .../machines {"from_snapshot": sid, "name": "PREFIX-i"}` would:
/// the same checks, the snapshot's workload and size, placed on the host
/// holding the snapshot and nowhere else. All or none: if any name is
/// taken (409), the request is invalid (422) or the snapshot's host
/// cannot take them all (409 `insufficient-capacity`, naming the host),
/// nothing is created. Answers 201 with the machines (`created`; their
/// host's broker restores each, `.../wait` for `started`). With an
/// `Idempotency-Key`, the same request again answers 200 with the same
/// machines (`Idempotent-Replayed: true`), the key with another request 422.
#[utoipa::path(post, operation_id = "snapshots_fork", path = "/v1/namespaces/{namespace}/snapshots/{sid}/fork", tag = "snapshots",
    security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"),
        ("sid" = String, Path, pattern = "^[A-Za-z0-9_-]{1,64}$"),
        ("Idempotency-Key" = Option<String>, Header, pattern = "^[!-~]{1,255}$",
            description = "Makes retries of this fork safe")),
    request_body = ForkSnapshot,
    responses((status = 201, body = ForkedMachines), (status = 200, description = "Replayed by Idempotency-Key", body = ForkedMachines),
        (status = 403, description = "A role too small, or the namespace's quota would be exceeded (quota-exceeded, naming the limit)", body = Problem),
        (status = 404, description = "No such namespace, or no such snapshot in it", body = Problem),
        (status = 409, description = "A name taken, or the snapshot's host has no room for them all (insufficient-capacity)", body = Problem)))]
pub async fn fork(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((namespace, sid)): Path<(String, String)>,
    IdempotencyKey(key): IdempotencyKey,
    Json(body): Json<ForkSnapshot>,
) -> Result<Response, ApiError> {
    caller.require(&namespace, Role::Operator)?;
    if !validate::is_snapshot_id(&sid) {
        return Err(not_found(&sid));
    }
    let count = u32::try_from(body.count)
        .ok()
        .filter(|n| (1..=MAX_FORK).contains(n))
        .ok_or_else(|| ApiError::invalid(format!("count must be 1 to {MAX_FORK}")))?;
    if let Some(prefix) = &body.name_prefix {
        validate::name("name_prefix", prefix)?;
        if prefix.len() > 60 {
            return Err(ApiError::invalid(
                "name_prefix must be at most 60 characters (names are PREFIX-1 … PREFIX-64)",
            ));
        }
    }
    validate::ssh_keys(&body.ssh_keys)
        .map_err(|e| ApiError { detail: e.detail.replace("config.ssh_keys", "ssh_keys"), ..e })?;
    let idempotency = key.map(|key| {
        let canonical = serde_json::to_vec(&body).expect("a plain struct serializes");
        (key, format!("{:x}", Sha256::digest([format!("fork {sid} ").as_bytes(), &canonical].concat())))
    });
    let request =
        Fork { namespace, snapshot: sid, count, name_prefix: body.name_prefix, ssh_keys: body.ssh_keys, idempotency };
    let forked = state.db.run(move |c| fork_store::fork(c, request)).await?;
    let (status, rows) = match forked {
        Forked::New(rows) => {
            state.notify_change();
            (StatusCode::CREATED, rows)
        }
        Forked::Replayed(rows) => (StatusCode::OK, rows),
    };
    let machines = rows.into_iter().map(super::machines::view).collect::<Result<_, _>>()?;
    let mut headers = HeaderMap::new();
    if status == StatusCode::OK {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok((status, headers, Json(ForkedMachines { machines })).into_response())
}

fn page(query: &ListQuery) -> Result<(i64, Option<i64>), ApiError> {
    let size = query.page_size.unwrap_or(DEFAULT_PAGE_SIZE);
    if !(1..=MAX_PAGE_SIZE).contains(&size) {
        return Err(ApiError::bad_request(format!("page_size must be 1 to {MAX_PAGE_SIZE}")));
    }
    Ok((size, query.page_token.as_deref().map(decode_cursor).transpose()?))
}

async fn list_page(
    state: &AppState,
    namespace: String,
    machine: Option<Uuid>,
    query: &ListQuery,
) -> Result<Json<SnapshotList>, ApiError> {
    let (size, after) = page(query)?;
    let (rows, more) = state.db.run(move |c| store::list(c, &namespace, machine, after, size)).await?;
    let next_page_token = if more { rows.last().map(|(r, _)| encode_cursor(r.seq)) } else { None };
    Ok(Json(SnapshotList { snapshots: rows.into_iter().map(view).collect(), next_page_token }))
}

/// The machine's snapshots, oldest first, a page at a time (also those of
/// a destroyed machine).
#[utoipa::path(get, operation_id = "snapshots_list_machine", path = "/v1/namespaces/{namespace}/machines/{id}/snapshots", tag = "snapshots",
    security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"), ("id" = Uuid, Path), ListQuery),
    responses((status = 200, body = SnapshotList), (status = 404, body = Problem)))]
pub async fn list_machine(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((namespace, id)): Path<(String, Uuid)>,
    Query(query): Query<ListQuery>,
) -> Result<Json<SnapshotList>, ApiError> {
    caller.require(&namespace, Role::Viewer)?;
    list_page(&state, namespace, Some(id), &query).await
}

/// Every snapshot of the namespace, oldest first, a page at a time.
#[utoipa::path(get, operation_id = "snapshots_list", path = "/v1/namespaces/{namespace}/snapshots", tag = "snapshots",
    security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"), ListQuery),
    responses((status = 200, body = SnapshotList), (status = 400, body = Problem), (status = 404, body = Problem)))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(namespace): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<SnapshotList>, ApiError> {
    caller.require(&namespace, Role::Viewer)?;
    list_page(&state, namespace, None, &query).await
}

fn not_found(sid: &str) -> ApiError {
    ApiError::not_found(format!("snapshot {sid:?} not found"))
}

#[utoipa::path(get, operation_id = "snapshots_get", path = "/v1/namespaces/{namespace}/snapshots/{sid}", tag = "snapshots",
    security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"),
        ("sid" = String, Path, pattern = "^[A-Za-z0-9_-]{1,64}$")),
    responses((status = 200, body = Snapshot), (status = 404, body = Problem)))]
pub async fn get(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((namespace, sid)): Path<(String, String)>,
) -> Result<Json<Snapshot>, ApiError> {
    caller.require(&namespace, Role::Viewer)?;
    if !validate::is_snapshot_id(&sid) {
        return Err(not_found(&sid));
    }
    Ok(Json(view(state.db.run(move |c| store::get(c, &namespace, &sid)).await?)))
}

/// Has the host's broker delete the snapshot's files, then forgets it
/// (204). 409 while a machine made from it waits to be restored; 503 when
/// no controller reaches the host's broker (the snapshot stays listed).
#[utoipa::path(delete, operation_id = "snapshots_delete", path = "/v1/namespaces/{namespace}/snapshots/{sid}", tag = "snapshots",
    security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"),
        ("sid" = String, Path, pattern = "^[A-Za-z0-9_-]{1,64}$")),
    responses((status = 204, description = "Deleted"), (status = 404, body = Problem),
        (status = 409, description = "A machine is still to be restored from it", body = Problem),
        (status = 502, description = "The broker failed", body = Problem),
        (status = 504, description = "The broker took too long", body = Problem)))]
pub async fn delete(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((namespace, sid)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    caller.require(&namespace, Role::Operator)?;
    if !validate::is_snapshot_id(&sid) {
        return Err(not_found(&sid));
    }
    let (ns, id) = (namespace.clone(), sid.clone());
    let (row, _) = state
        .db
        .run(move |c| {
            let named = store::get(c, &ns, &id)?;
            store::check_unused(c, &id)?;
            Ok::<_, crate::store::StoreError>(named)
        })
        .await?;
    let host = row.host_name;
    if let Some(peer) = forward::peer_for(&state, &host, &headers).await? {
        let path = format!("/v1/namespaces/{namespace}/snapshots/{sid}");
        return forward::http(&state, &peer, &host, Method::DELETE, &path, &headers, None).await;
    }
    state.hub.remove_snapshot(&host, &sid).await.map_err(broker_error)?;
    state.db.run(move |c| store::delete(c, &namespace, &sid)).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}
