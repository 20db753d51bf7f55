//! `/v1/namespaces/{namespace}/machines`: the machine lifecycle, shaped
//! after Fly's Machines API (same state names, `previous_state`, a wait
//! endpoint, leases, idempotent create). Branching a running machine is
//! `branch`'s, forking a snapshot `snapshots`', paging `paging`'s.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::extract::{Caller, IdempotencyKey, LeaseNonce};
use super::paging::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, decode_cursor, encode_cursor};
use super::problem::{ApiError, Problem};
use super::{AppState, Woken, validate};
use crate::auth::Role;
use crate::db::models::{MachineEventRow, MachineRow, string_list, string_map};
use crate::machine::{Action, MachineState};
use crate::store::machines::{self as store, Created, ListFilter};

/// The guest's size.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Guest {
    /// vCPUs, 1 to 64.
    #[schema(minimum = 1, maximum = 64)]
    #[serde(deserialize_with = "super::integer::exact")]
    pub cpus: i32,
    /// Guest memory in MB, 64 to 1048576.
    #[schema(minimum = 64, maximum = 1048576)]
    #[serde(deserialize_with = "super::integer::exact")]
    pub memory_mb: i64,
}

/// What a machine runs. Its `command`, `env` and `ssh_keys` travel on the
/// guest's kernel command line (2047 bytes in all), each a base64url JSON
/// list: together they may take at most 1400 bytes there (about 1000
/// bytes of text), whatever each field's own limits allow; more is 422.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// The root filesystem image.
    #[schema(min_length = 1, max_length = 512, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]+$")]
    pub image: String,
    pub guest: Guest,
    /// Names are letters, digits and '_', not starting with a digit.
    #[serde(default)]
    #[schema(schema_with = super::document::env_schema)]
    pub env: BTreeMap<String, String>,
    /// The workload's argv; absent or empty: the image's default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(schema_with = super::document::command_schema)]
    pub command: Vec<String>,
    /// authorized_keys lines (`ssh-ed25519 AAAA… comment`) the guest's SSH
    /// server accepts for root: `mmctl --server ssh` logs in with one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(schema_with = super::document::ssh_keys_schema)]
    pub ssh_keys: Vec<String>,
}

/// Where the machine may run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// Labels the host must carry, each with exactly this value.
    #[serde(default)]
    #[schema(schema_with = super::document::labels_schema)]
    pub host_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateMachine {
    /// Unique among the namespace's machines that are not destroyed;
    /// generated when absent.
    #[serde(default)]
    #[schema(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub name: Option<String>,
    /// What it runs. Required unless `from_snapshot` is given: then it is
    /// the snapshot's, and a config sent along must agree with it (image
    /// and guest size; env and command empty or the same), except for
    /// `ssh_keys`, which replace the snapshot's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub config: Option<MachineConfig>,
    /// Restore this snapshot of the namespace (an id from `.../snapshots`)
    /// instead of booting: the machine resumes the snapshot's guest,
    /// without a boot, under its own identity (address, MAC, hostname, SSH
    /// host key). It is placed on the host that holds the snapshot and on
    /// no other: when that host cannot take it (cordoned, lost, full, or
    /// lacking `placement.host_labels`) the answer is 409
    /// `insufficient-capacity` naming the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub from_snapshot: Option<String>,
    /// For filtering (`?label=key=value`).
    #[serde(default)]
    #[schema(schema_with = super::document::labels_schema)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub placement: Placement,
}

/// Who holds a machine's lease (the nonce is only ever shown to its holder).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LeaseInfo {
    pub owner: String,
    pub description: String,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Machine {
    pub id: Uuid,
    pub name: String,
    pub namespace: String,
    pub state: MachineState,
    pub previous_state: Option<MachineState>,
    /// The host it is placed on.
    pub host: Option<String>,
    pub config: MachineConfig,
    #[schema(schema_with = super::document::labels_schema)]
    pub labels: BTreeMap<String, String>,
    pub placement: Placement,
    pub lease: Option<LeaseInfo>,
    /// The snapshot its broker restores it from (until it moves to
    /// another host, where it boots from its image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_snapshot: Option<String>,
    /// The machine it is a branch of: its broker made its microVM as a
    /// live copy of that machine's (until it moves to another host, where
    /// it boots from its image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch_of: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MachineList {
    pub machines: Vec<Machine>,
    /// Pass as `page_token` (with the same filters) for the next page;
    /// absent on the last page.
    pub next_page_token: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MachineEvent {
    pub state: MachineState,
    pub previous_state: Option<MachineState>,
    pub reason: String,
    pub at: DateTime<Utc>,
}

impl MachineEvent {
    /// An event row as the API shows it.
    pub fn from_row(row: MachineEventRow) -> Result<MachineEvent, ApiError> {
        Ok(MachineEvent {
            state: parse_state(&row.state)?,
            previous_state: row.previous_state.as_deref().map(parse_state).transpose()?,
            reason: row.reason,
            at: row.at,
        })
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MachineEvents {
    pub events: Vec<MachineEvent>,
}

/// A row as the API shows it.
pub fn view(row: MachineRow) -> Result<Machine, ApiError> {
    let now = Utc::now();
    let lease = row.active_lease(now).map(|(_, expires_at)| LeaseInfo {
        owner: row.lease_owner.clone().unwrap_or_default(),
        description: row.lease_description.clone().unwrap_or_default(),
        expires_at,
    });
    let state = parse_state(&row.state)?;
    let previous_state = row.previous_state.as_deref().map(parse_state).transpose()?;
    Ok(Machine {
        id: row.id,
        name: row.name,
        namespace: row.namespace,
        state,
        previous_state,
        host: row.host_name,
        config: MachineConfig {
            image: row.image,
            guest: Guest { cpus: row.cpus, memory_mb: row.memory_mb },
            env: string_map(&row.env),
            command: string_list(&row.command),
            ssh_keys: string_list(&row.ssh_keys),
        },
        labels: string_map(&row.labels),
        placement: Placement { host_labels: string_map(&row.host_labels) },
        lease,
        from_snapshot: row.from_snapshot,
        branch_of: row.branch_of,
        created_at: row.created_at,
        updated_at: row.updated_at,
    })
}

fn parse_state(s: &str) -> Result<MachineState, ApiError> {
    s.parse().map_err(|e| ApiError::from(crate::store::StoreError::Corrupt(e)))
}

fn check(body: &CreateMachine) -> Result<(), ApiError> {
    if let Some(name) = &body.name {
        validate::name("machine name", name)?;
    }
    match (&body.config, &body.from_snapshot) {
        (Some(config), _) => check_config(config)?,
        (None, None) => return Err(ApiError::invalid("config is required unless the machine is made from_snapshot")),
        (None, Some(_)) => {}
    }
    if let Some(snapshot) = &body.from_snapshot
        && !validate::is_snapshot_id(snapshot)
    {
        return Err(ApiError::invalid(format!("from_snapshot {snapshot:?} is not a snapshot id")));
    }
    validate::labels("labels", &body.labels)?;
    validate::labels("placement.host_labels", &body.placement.host_labels)
}

fn check_config(config: &MachineConfig) -> Result<(), ApiError> {
    let image = &config.image;
    if image.is_empty() || image.len() > 512 || image.chars().any(char::is_control) {
        return Err(ApiError::invalid("config.image must be 1 to 512 characters without control characters"));
    }
    if !(1..=64).contains(&config.guest.cpus) {
        return Err(ApiError::invalid("config.guest.cpus must be 1 to 64"));
    }
    if !(64..=1_048_576).contains(&config.guest.memory_mb) {
        return Err(ApiError::invalid("config.guest.memory_mb must be 64 to 1048576"));
    }
    validate::env(&config.env)?;
    validate::command("config.command", &config.command)?;
    validate::ssh_keys(&config.ssh_keys)?;
    validate::workload(&config.command, &config.env, &config.ssh_keys)
}

/// Creates a machine and places it on a host. With an `Idempotency-Key`,
/// repeating the request (same key, same body) returns the machine the
/// first one made, with status 200 and `Idempotent-Replayed: true`; the
/// same key with a different body is refused with 422. With
/// `from_snapshot` the machine is restored from that snapshot on the host
/// holding it, and only there (404 for a snapshot the namespace does not
/// have).
#[utoipa::path(post, operation_id = "machines_create", path = "/v1/namespaces/{namespace}/machines", tag = "machines", security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"),
        ("Idempotency-Key" = Option<String>, Header, pattern = "^[!-~]{1,255}$",
            description = "Makes retries of this create safe")),
    request_body = CreateMachine,
    responses((status = 201, body = Machine), (status = 200, description = "Replayed by Idempotency-Key", body = Machine),
        (status = 403, description = "A role too small, or the namespace's quota would be exceeded (quota-exceeded, naming the limit)", body = Problem),
        (status = 404, description = "No such namespace, or no such snapshot in it", body = Problem), (status = 422, body = Problem),
        (status = 409, description = "Name taken, or no host has room (insufficient-capacity; with from_snapshot: the snapshot's host has none)", body = Problem)))]
pub async fn create(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(namespace): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    Json(body): Json<CreateMachine>,
) -> Result<Response, ApiError> {
    caller.require(&namespace, Role::Operator)?;
    check(&body)?;
    let idempotency = key.map(|key| {
        let canonical = serde_json::to_vec(&body).expect("a parsed request serialises");
        (key, format!("{:x}", Sha256::digest(canonical)))
    });
    let ssh_keys = body.config.as_ref().map(|c| c.ssh_keys.clone()).unwrap_or_default();
    let workload = body.config.map(|config| store::Workload {
        image: config.image,
        cpus: config.guest.cpus,
        memory_mb: config.guest.memory_mb,
        env: config.env,
        command: config.command,
    });
    let request = store::CreateMachine {
        namespace,
        name: body.name,
        workload,
        ssh_keys,
        from_snapshot: body.from_snapshot,
        labels: body.labels,
        host_labels: body.placement.host_labels,
        idempotency,
    };
    let created = state.db.run(move |c| store::create(c, request)).await?;
    created_response(&state, created)
}

/// 201 with the new machine and its Location, or 200 with the one an
/// earlier request with the same `Idempotency-Key` made.
pub(super) fn created_response(state: &AppState, created: Created) -> Result<Response, ApiError> {
    Ok(match created {
        Created::New(row) => {
            state.notify_change();
            let location = format!("/v1/namespaces/{}/machines/{}", row.namespace, row.id);
            let mut headers = HeaderMap::new();
            headers.insert(header::LOCATION, HeaderValue::from_str(&location).expect("names are plain ASCII"));
            (StatusCode::CREATED, headers, Json(view(row)?)).into_response()
        }
        Created::Replayed(row) => {
            let mut headers = HeaderMap::new();
            headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
            (StatusCode::OK, headers, Json(view(row)?)).into_response()
        }
    })
}

/// Parsed by hand rather than with `Query<T>` because `state` and `label`
/// may repeat, and unknown parameters must be refused, not ignored.
fn parse_list_query(raw: Option<&str>) -> Result<ListFilter, ApiError> {
    let mut filter = ListFilter { page_size: DEFAULT_PAGE_SIZE, ..ListFilter::default() };
    for (key, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "state" => {
                // Every item must be a state: `state=` or `state=a,` is a
                // mistake (400), not "no filter".
                for state in value.split(',') {
                    filter.states.push(state.parse().map_err(|e| ApiError::bad_request(format!("state: {e}")))?);
                }
            }
            "label" => {
                let (k, v) = validate::label_filter(&value)?;
                filter.labels.insert(k, v);
            }
            "include_destroyed" => {
                filter.include_destroyed =
                    value.parse().map_err(|_| ApiError::bad_request("include_destroyed must be true or false"))?;
            }
            "page_size" => {
                filter.page_size = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE_SIZE).contains(n))
                    .ok_or_else(|| ApiError::bad_request(format!("page_size must be 1 to {MAX_PAGE_SIZE}")))?;
            }
            "page_token" => filter.after_seq = Some(decode_cursor(&value)?),
            other => return Err(ApiError::bad_request(format!("unknown query parameter {other:?}"))),
        }
    }
    Ok(filter)
}

/// Lists machines, oldest first, a page at a time.
#[utoipa::path(get, operation_id = "machines_list", path = "/v1/namespaces/{namespace}/machines", tag = "machines", security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"),
        ("state" = Option<String>, Query,
            pattern = "^(created|starting|started|stopping|stopped|failed|suspending|suspended|destroying|destroyed)(,(created|starting|started|stopping|stopped|failed|suspending|suspended|destroying|destroyed))*$",
            description = "Only these states (comma-separated or repeated); by default every state but destroyed"),
        ("label" = Option<String>, Query, pattern = "^[^=]+=.*$", description = "key=value; repeat to require several"),
        ("include_destroyed" = Option<bool>, Query),
        ("page_size" = Option<i64>, Query, minimum = 1, maximum = 500, description = "1 to 500, default 50"),
        ("page_token" = Option<String>, Query, pattern = "^[A-Za-z0-9_-]{1,64}$",
            description = "next_page_token of the previous page (opaque; one this API did not issue is 400)")),
    responses((status = 200, body = MachineList), (status = 400, body = Problem), (status = 404, body = Problem)))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(namespace): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<MachineList>, ApiError> {
    caller.require(&namespace, Role::Viewer)?;
    let filter = parse_list_query(query.as_deref())?;
    let (rows, more) = state.db.run(move |c| store::list(c, &namespace, &filter)).await?;
    let next_page_token = if more { rows.last().map(|r| encode_cursor(r.seq)) } else { None };
    let machines = rows.into_iter().map(view).collect::<Result<_, _>>()?;
    Ok(Json(MachineList { machines, next_page_token }))
}

#[utoipa::path(get, operation_id = "machines_get", path = "/v1/namespaces/{namespace}/machines/{id}", tag = "machines", security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"), ("id" = Uuid, Path)),
    responses((status = 200, body = Machine), (status = 404, body = Problem)))]
pub async fn get(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((namespace, id)): Path<(String, Uuid)>,
) -> Result<Json<Machine>, ApiError> {
    caller.require(&namespace, Role::Viewer)?;
    let row = state.db.run(move |c| store::get(c, &namespace, id)).await?;
    Ok(Json(view(row)?))
}

async fn act(
    state: Arc<AppState>,
    caller: Caller,
    namespace: String,
    id: Uuid,
    action: Action,
    nonce: Option<String>,
) -> Result<Json<Machine>, ApiError> {
    caller.require(&namespace, Role::Operator)?;
    let reason = format!("{action:?} by {}", caller.0.sub);
    let row = state.db.run(move |c| store::transition(c, &namespace, id, action, nonce.as_deref(), &reason)).await?;
    state.notify_change();
    Ok(Json(view(row)?))
}

/// Asks for the machine to run (created, stopped, failed or suspended →
/// starting); a suspended one is resumed where it was, without a boot.
#[utoipa::path(post, operation_id = "machines_start", path = "/v1/namespaces/{namespace}/machines/{id}/start", tag = "machines",
    security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"), ("id" = Uuid, Path), ("Machine-Lease-Nonce" = Option<String>, Header)),
    responses((status = 200, body = Machine), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn start(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((namespace, id)): Path<(String, Uuid)>,
    LeaseNonce(nonce): LeaseNonce,
) -> Result<Json<Machine>, ApiError> {
    act(state, caller, namespace, id, Action::Start, nonce).await
}

/// Asks for the machine to stop (starting or started → stopping).
#[utoipa::path(post, operation_id = "machines_stop", path = "/v1/namespaces/{namespace}/machines/{id}/stop", tag = "machines",
    security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"), ("id" = Uuid, Path), ("Machine-Lease-Nonce" = Option<String>, Header)),
    responses((status = 200, body = Machine), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn stop(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((namespace, id)): Path<(String, Uuid)>,
    LeaseNonce(nonce): LeaseNonce,
) -> Result<Json<Machine>, ApiError> {
    act(state, caller, namespace, id, Action::Stop, nonce).await
}

/// Asks for the machine to be suspended (started → suspending): its
/// host's broker saves the running guest, memory and disk, and ends its
/// processes, and the machine becomes `suspended`, holding no host memory
/// (`.../wait?state=suspended`). `start` resumes it where it was, without
/// a boot, on the same host. Should the broker fail to save it, the
/// machine is `started` again and its events say why. A suspended machine
/// that has to move to another host (drain, lost host) arrives `stopped`.
#[utoipa::path(post, operation_id = "machines_suspend", path = "/v1/namespaces/{namespace}/machines/{id}/suspend", tag = "machines",
    security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"), ("id" = Uuid, Path), ("Machine-Lease-Nonce" = Option<String>, Header)),
    responses((status = 200, body = Machine), (status = 404, body = Problem),
        (status = 409, description = "Not started, or leased", body = Problem)))]
pub async fn suspend(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((namespace, id)): Path<(String, Uuid)>,
    LeaseNonce(nonce): LeaseNonce,
) -> Result<Json<Machine>, ApiError> {
    act(state, caller, namespace, id, Action::Suspend, nonce).await
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Also destroy a machine that may be running.
    #[serde(default)]
    pub force: bool,
}

/// Destroys the machine: a created one at once, others through destroying.
#[utoipa::path(delete, operation_id = "machines_delete", path = "/v1/namespaces/{namespace}/machines/{id}", tag = "machines",
    security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"), ("id" = Uuid, Path), ("Machine-Lease-Nonce" = Option<String>, Header),
        DeleteQuery),
    responses((status = 200, body = Machine), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn delete(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((namespace, id)): Path<(String, Uuid)>,
    Query(query): Query<DeleteQuery>,
    LeaseNonce(nonce): LeaseNonce,
) -> Result<Json<Machine>, ApiError> {
    act(state, caller, namespace, id, Action::Destroy { force: query.force }, nonce).await
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// The state to wait for (default started).
    pub state: Option<MachineState>,
    /// Seconds, 1 to 300 (default 60).
    #[param(minimum = 1, maximum = 300)]
    pub timeout: Option<u64>,
}

/// Blocks until the machine is in `state`; 408 when `timeout` passes first.
#[utoipa::path(get, operation_id = "machines_wait", path = "/v1/namespaces/{namespace}/machines/{id}/wait", tag = "machines",
    security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"), ("id" = Uuid, Path), WaitQuery),
    responses((status = 200, body = Machine), (status = 404, body = Problem),
        (status = 408, description = "Timed out", body = Problem),
        (status = 409, description = "Destroyed, so it never will", body = Problem)))]
pub async fn wait(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((namespace, id)): Path<(String, Uuid)>,
    Query(query): Query<WaitQuery>,
) -> Result<Json<Machine>, ApiError> {
    caller.require(&namespace, Role::Viewer)?;
    let target = query.state.unwrap_or(MachineState::Started);
    let timeout = query.timeout.unwrap_or(60);
    if !(1..=300).contains(&timeout) {
        return Err(ApiError::bad_request("timeout must be 1 to 300 seconds"));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    let mut watch = state.watch_changes();
    loop {
        watch.mark_seen();
        let ns = namespace.clone();
        let row = state.db.run(move |c| store::get(c, &ns, id)).await?;
        let machine = view(row)?;
        if machine.state == target {
            return Ok(Json(machine));
        }
        if machine.state == MachineState::Destroyed {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "invalid-state",
                format!("machine is destroyed and will never be {target}"),
            ));
        }
        match watch.sleep(deadline).await {
            Woken::Change => {}
            Woken::ShuttingDown => {
                let mut error = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting-down",
                    "this controller is shutting down; retry the wait (another controller can answer)",
                );
                error.retry_after = Some(1);
                return Err(error);
            }
            Woken::Deadline => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "wait-timeout",
                    format!("machine is still {} after {timeout} s of waiting for {target}", machine.state),
                ));
            }
        }
    }
}

/// The machine's state transitions and moves, oldest first.
#[utoipa::path(get, operation_id = "machines_events", path = "/v1/namespaces/{namespace}/machines/{id}/events", tag = "machines",
    security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"), ("id" = Uuid, Path)),
    responses((status = 200, body = MachineEvents), (status = 404, body = Problem)))]
pub async fn events(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((namespace, id)): Path<(String, Uuid)>,
) -> Result<Json<MachineEvents>, ApiError> {
    caller.require(&namespace, Role::Viewer)?;
    let rows = state.db.run(move |c| store::events(c, &namespace, id)).await?;
    let events = rows.into_iter().map(MachineEvent::from_row).collect::<Result<_, ApiError>>()?;
    Ok(Json(MachineEvents { events }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_query() {
        let f = parse_list_query(Some("state=started,stopped&label=a=b&label=c=d&page_size=10")).unwrap();
        assert_eq!(f.states, [MachineState::Started, MachineState::Stopped]);
        assert_eq!(f.labels.len(), 2);
        assert_eq!(f.page_size, 10);
        assert!(parse_list_query(Some("bogus=1")).is_err());
        assert!(parse_list_query(Some("page_size=0")).is_err());
        assert!(parse_list_query(Some("state=running")).is_err());
    }
}
