//! Machines: create with placement and idempotency, transitions, leases,
//! listing. (Moving them off lost and draining hosts is `recovery`'s and
//! `drain`'s; making them from a snapshot in bulk or from a running
//! machine is `fork`'s, on top of the create path here.)

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use uuid::Uuid;

use super::{StoreError, hosts, quota};
use crate::db::lock_keys;
use crate::db::models::{
    IdempotencyRow, MachineEventRow, MachineRow, NewMachine, NewMachineEvent, SnapshotRow, json_map, string_list,
    string_map,
};
use crate::db::schema::{fork_idempotency_keys, idempotency_keys, machine_events, machines, namespaces};
use crate::machine::{Action, MachineState, next_state};
use crate::scheduler::{self, Request};

/// What a machine runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub image: String,
    pub cpus: i32,
    pub memory_mb: i64,
    pub env: BTreeMap<String, String>,
    /// The workload's argv; empty for the image's default.
    pub command: Vec<String>,
}

impl Workload {
    /// What machine `row` runs, as recorded.
    pub fn of(row: &MachineRow) -> Workload {
        Workload {
            image: row.image.clone(),
            cpus: row.cpus,
            memory_mb: row.memory_mb,
            env: string_map(&row.env),
            command: string_list(&row.command),
        }
    }
}

/// A validated create request.
#[derive(Debug, Clone)]
pub struct CreateMachine {
    pub namespace: String,
    pub name: Option<String>,
    /// `None` only with `from_snapshot`: then the snapshot's.
    pub workload: Option<Workload>,
    /// authorized_keys lines for the guest's SSH server (with
    /// `from_snapshot`, none: the snapshot's machine's).
    pub ssh_keys: Vec<String>,
    /// Restore this snapshot (of this namespace) instead of booting.
    pub from_snapshot: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub host_labels: BTreeMap<String, String>,
    /// The `Idempotency-Key` and a digest of the request it came with.
    pub idempotency: Option<(String, String)>,
}

/// The outcome of a create.
pub enum Created {
    New(MachineRow),
    /// An earlier request with the same idempotency key and body made it.
    Replayed(MachineRow),
}

/// Serialises placement with every other controller for the rest of the
/// transaction.
pub(super) fn lock_placement(conn: &mut PgConnection) -> Result<(), StoreError> {
    diesel::sql_query("SELECT pg_advisory_xact_lock($1)").bind::<BigInt, _>(lock_keys::PLACEMENT).execute(conn)?;
    Ok(())
}

pub(super) fn record(
    conn: &mut PgConnection,
    id: Uuid,
    state: &str,
    previous: Option<&str>,
    reason: &str,
) -> QueryResult<()> {
    diesel::insert_into(machine_events::table)
        .values(NewMachineEvent { machine_id: id, state, previous_state: previous, reason })
        .execute(conn)
        .map(drop)
}

/// Creates and places a machine in one transaction under the placement
/// lock. The idempotency key is checked and written inside the same
/// transaction, so a client that retries after a timeout, a dropped
/// connection or a controller crash gets the one machine that committed,
/// whichever controller it reaches.
pub fn create(conn: &mut PgConnection, req: CreateMachine) -> Result<Created, StoreError> {
    conn.transaction(|conn| {
        lock_placement(conn)?;
        namespace_exists(conn, &req.namespace)?;
        if let Some((key, digest)) = &req.idempotency
            && let Some(earlier) = replay(conn, &req.namespace, key, digest)?
        {
            return Ok(Created::Replayed(earlier));
        }
        let row = insert_new(conn, &req)?;
        if let Some((key, digest)) = &req.idempotency {
            remember_key(conn, &req.namespace, key, digest, row.id)?;
        }
        Ok(Created::New(row))
    })
}

pub(super) fn namespace_exists(conn: &mut PgConnection, namespace: &str) -> Result<(), StoreError> {
    let exists: Option<String> = namespaces::table.find(namespace).select(namespaces::name).first(conn).optional()?;
    exists.map(drop).ok_or_else(|| StoreError::not_found("namespace", namespace))
}

/// The machine an earlier request with this `Idempotency-Key` made, if
/// any; the key with another request's digest is refused.
pub(super) fn replay(
    conn: &mut PgConnection,
    namespace: &str,
    key: &str,
    digest: &str,
) -> Result<Option<MachineRow>, StoreError> {
    let earlier: Option<IdempotencyRow> =
        idempotency_keys::table.find((namespace, key)).select(IdempotencyRow::as_select()).first(conn).optional()?;
    match earlier {
        Some(earlier) if earlier.request_sha256 != digest => Err(StoreError::IdempotencyMismatch(key.to_owned())),
        Some(earlier) => Ok(Some(get(conn, namespace, earlier.machine_id)?)),
        None => Ok(None),
    }
}

pub(super) fn remember_key(
    conn: &mut PgConnection,
    namespace: &str,
    key: &str,
    digest: &str,
    id: Uuid,
) -> QueryResult<()> {
    diesel::insert_into(idempotency_keys::table)
        .values((
            idempotency_keys::namespace.eq(namespace),
            idempotency_keys::key.eq(key),
            idempotency_keys::request_sha256.eq(digest),
            idempotency_keys::machine_id.eq(id),
        ))
        .execute(conn)
        .map(drop)
}

/// Refuses `name` if a machine of `namespace` that is not destroyed has it.
pub(super) fn check_name_free(conn: &mut PgConnection, namespace: &str, name: &str) -> Result<(), StoreError> {
    let taken: i64 = machines::table
        .filter(machines::namespace.eq(namespace))
        .filter(machines::name.eq(name))
        .filter(machines::state.ne(MachineState::Destroyed.as_str()))
        .count()
        .get_result(conn)?;
    if taken > 0 {
        return Err(StoreError::Conflict(format!("a machine named {name:?} already exists in this namespace")));
    }
    Ok(())
}

/// The body of a create, inside the caller's transaction (which holds
/// the placement lock): name, workload, placement, the row and its first
/// event.
pub(super) fn insert_new(conn: &mut PgConnection, req: &CreateMachine) -> Result<MachineRow, StoreError> {
    let id = Uuid::new_v4();
    let name = req.name.clone().unwrap_or_else(|| format!("m-{}", &id.simple().to_string()[..12]));
    check_name_free(conn, &req.namespace, &name)?;
    let (workload, ssh_keys, snapshot_host) = match &req.from_snapshot {
        None => {
            let workload = req.workload.clone().ok_or_else(|| {
                StoreError::Invalid("config is required unless the machine is made from_snapshot".into())
            })?;
            (workload, req.ssh_keys.clone(), None)
        }
        Some(id) => {
            let (snapshot, source) = super::snapshots::source(conn, &req.namespace, id)?;
            let workload = restored_workload(&snapshot, &source, req.workload.as_ref())?;
            let keys = if req.ssh_keys.is_empty() { string_list(&source.ssh_keys) } else { req.ssh_keys.clone() };
            (workload, keys, Some((id.clone(), snapshot.host_name)))
        }
    };
    // The handler checked what was sent; from a snapshot, its workload
    // with the keys sent must fit the guest's kernel command line too.
    let env = workload.env.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    mm_protocols::spec_rules::check_workload(&workload.command, env, &ssh_keys)
        .map_err(|e| StoreError::Invalid(format!("config: {e}")))?;
    let capacity: Vec<_> = hosts::capacity(conn, &req.namespace)?.into_iter().map(|(c, _)| c).collect();
    let request =
        Request { cpus: i64::from(workload.cpus), memory_mb: workload.memory_mb, host_labels: &req.host_labels };
    let host = match snapshot_host {
        // The snapshot's files are on its host: nowhere else will do.
        Some((snapshot, only)) => {
            let there: Vec<_> = capacity.into_iter().filter(|c| c.name == only).collect();
            match scheduler::place(&there, request) {
                Ok(placed) => placed.name.clone(),
                Err(why) => return Err(StoreError::SnapshotHost { snapshot, host: only, why: Box::new(why) }),
            }
        }
        None => scheduler::place(&capacity, request)?.name.clone(),
    };
    let reason = match &req.from_snapshot {
        Some(snapshot) => format!("created from snapshot {snapshot}; placed on host {host}, which holds it"),
        None => format!("created; placed on host {host}"),
    };
    let made = Made {
        id,
        namespace: &req.namespace,
        name,
        host: &host,
        workload,
        ssh_keys,
        labels: &req.labels,
        host_labels: &req.host_labels,
        from_snapshot: req.from_snapshot.clone(),
        branch_of: None,
    };
    insert_created(conn, made, &reason)
}

/// A machine made and placed, about to be recorded (see `insert_created`).
pub(super) struct Made<'a> {
    pub id: Uuid,
    pub namespace: &'a str,
    pub name: String,
    pub host: &'a str,
    pub workload: Workload,
    pub ssh_keys: Vec<String>,
    pub labels: &'a BTreeMap<String, String>,
    pub host_labels: &'a BTreeMap<String, String>,
    pub from_snapshot: Option<String>,
    pub branch_of: Option<Uuid>,
}

/// The end of every create (a boot, a restore, a fork's clone, a branch),
/// inside the caller's transaction: the quota check, the machine's row, in
/// state `created` on its host, and its first event, `reason`. The check is
/// here, where every path that makes a machine passes, so none can skip it.
pub(super) fn insert_created(conn: &mut PgConnection, made: Made<'_>, reason: &str) -> Result<MachineRow, StoreError> {
    let adding =
        quota::Adding { machines: 1, vcpus: i64::from(made.workload.cpus), memory_mb: made.workload.memory_mb };
    quota::check_machines(conn, made.namespace, adding)?;
    let row = diesel::insert_into(machines::table)
        .values(NewMachine {
            id: made.id,
            namespace: made.namespace.to_owned(),
            name: made.name,
            state: MachineState::Created.as_str().to_owned(),
            image: made.workload.image,
            cpus: made.workload.cpus,
            memory_mb: made.workload.memory_mb,
            env: json_map(&made.workload.env),
            labels: json_map(made.labels),
            host_labels: json_map(made.host_labels),
            host_name: Some(made.host.to_owned()),
            command: serde_json::json!(made.workload.command),
            ssh_keys: serde_json::json!(made.ssh_keys),
            from_snapshot: made.from_snapshot,
            branch_of: made.branch_of,
        })
        .returning(MachineRow::as_returning())
        .get_result(conn)?;
    record(conn, made.id, "created", None, reason)?;
    Ok(row)
}

/// The workload of a machine restored from `snapshot` (taken of machine
/// `source`): the guest resumes as it was, so its size, image, command and
/// environment are the snapshot's. A `config` sent along must agree (env
/// and command may be left empty); what it cannot change is refused
/// rather than silently ignored.
pub fn restored_workload(
    snapshot: &SnapshotRow,
    source: &MachineRow,
    config: Option<&Workload>,
) -> Result<Workload, StoreError> {
    if snapshot.kind != "snapshot" {
        return Err(StoreError::Invalid(format!(
            "snapshot {} is a {} image, which only its own machine resumes",
            snapshot.id, snapshot.kind
        )));
    }
    let restored = Workload { cpus: snapshot.cpus, memory_mb: snapshot.memory_mb, ..Workload::of(source) };
    let Some(given) = config else { return Ok(restored) };
    let differs = |what: &str, theirs: String| {
        StoreError::Invalid(format!(
            "a machine from snapshot {} resumes the snapshot's guest, so {what} must be {theirs} (or leave config out)",
            snapshot.id
        ))
    };
    if given.image != restored.image {
        return Err(differs("config.image", format!("{:?}", restored.image)));
    }
    if (given.cpus, given.memory_mb) != (restored.cpus, restored.memory_mb) {
        return Err(differs("config.guest", format!("{} CPU(s) and {} MB", restored.cpus, restored.memory_mb)));
    }
    if !given.env.is_empty() && given.env != restored.env {
        return Err(differs("config.env", "empty or the snapshot's machine's".into()));
    }
    if !given.command.is_empty() && given.command != restored.command {
        return Err(differs("config.command", "empty or the snapshot's machine's".into()));
    }
    Ok(restored)
}

pub fn get(conn: &mut PgConnection, namespace: &str, id: Uuid) -> Result<MachineRow, StoreError> {
    machines::table
        .filter(machines::id.eq(id))
        .filter(machines::namespace.eq(namespace))
        .select(MachineRow::as_select())
        .first(conn)
        .optional()?
        .ok_or_else(|| StoreError::not_found("machine", id.to_string()))
}

pub(super) fn get_for_update(conn: &mut PgConnection, namespace: &str, id: Uuid) -> Result<MachineRow, StoreError> {
    machines::table
        .filter(machines::id.eq(id))
        .filter(machines::namespace.eq(namespace))
        .select(MachineRow::as_select())
        .for_update()
        .first(conn)
        .optional()?
        .ok_or_else(|| StoreError::not_found("machine", id.to_string()))
}

/// Filters and the cursor of a listing.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Any of these states; empty means every state but destroyed (unless
    /// `include_destroyed`).
    pub states: Vec<MachineState>,
    /// Every one of these labels, with exactly these values.
    pub labels: BTreeMap<String, String>,
    pub include_destroyed: bool,
    /// Only machines after this `seq` (the cursor).
    pub after_seq: Option<i64>,
    pub page_size: i64,
}

/// One page, and whether more follow. `seq` order is commit order because
/// creates are serialised by the placement lock, so a cursor never skips a
/// machine that committed after the page before it was read.
pub fn list(
    conn: &mut PgConnection,
    namespace: &str,
    filter: &ListFilter,
) -> Result<(Vec<MachineRow>, bool), StoreError> {
    let mut query = machines::table
        .filter(machines::namespace.eq(namespace))
        .select(MachineRow::as_select())
        .order(machines::seq.asc())
        .limit(filter.page_size + 1)
        .into_boxed();
    if !filter.states.is_empty() {
        query = query.filter(machines::state.eq_any(filter.states.iter().map(|s| s.as_str()).collect::<Vec<_>>()));
    } else if !filter.include_destroyed {
        query = query.filter(machines::state.ne(MachineState::Destroyed.as_str()));
    }
    if !filter.labels.is_empty() {
        query = query.filter(machines::labels.contains(json_map(&filter.labels)));
    }
    if let Some(after) = filter.after_seq {
        query = query.filter(machines::seq.gt(after));
    }
    let mut rows = query.load(conn)?;
    let more = rows.len() as i64 > filter.page_size;
    rows.truncate(filter.page_size as usize);
    Ok((rows, more))
}

/// Refuses a mutation of a leased machine unless `nonce` is the lease's.
fn check_lease(row: &MachineRow, nonce: Option<&str>, now: DateTime<Utc>) -> Result<(), StoreError> {
    match row.active_lease(now) {
        Some((held, _)) if nonce == Some(held) => Ok(()),
        Some((_, expires_at)) => {
            Err(StoreError::LeaseHeld { owner: row.lease_owner.clone().unwrap_or_default(), expires_at })
        }
        None => Ok(()),
    }
}

pub(super) fn apply(
    conn: &mut PgConnection,
    row: MachineRow,
    action: Action,
    reason: &str,
) -> Result<MachineRow, StoreError> {
    let current: MachineState = row.state.parse()?;
    let Some(next) = next_state(current, action)? else {
        return Ok(row);
    };
    let mut update = diesel::update(machines::table.find(row.id))
        .set((
            machines::state.eq(next.as_str()),
            machines::previous_state.eq(current.as_str()),
            machines::updated_at.eq(Utc::now()),
        ))
        .returning(MachineRow::as_returning())
        .get_result(conn)?;
    if next == MachineState::Destroyed {
        // Nothing can be done to a destroyed machine; its lease goes too.
        update = diesel::update(machines::table.find(row.id))
            .set((
                machines::lease_nonce.eq(None::<String>),
                machines::lease_owner.eq(None::<String>),
                machines::lease_description.eq(None::<String>),
                machines::lease_expires_at.eq(None::<DateTime<Utc>>),
            ))
            .returning(MachineRow::as_returning())
            .get_result(conn)?;
    }
    record(conn, row.id, next.as_str(), Some(current.as_str()), reason)?;
    Ok(update)
}

/// A user's start, stop or delete, with the lease check, under a row lock.
/// It overrides a drain's plan to start the machine again where it moves
/// (`drain_restart`): the user's word is the newer one.
pub fn transition(
    conn: &mut PgConnection,
    namespace: &str,
    id: Uuid,
    action: Action,
    lease_nonce: Option<&str>,
    reason: &str,
) -> Result<MachineRow, StoreError> {
    conn.transaction(|conn| {
        let mut row = get_for_update(conn, namespace, id)?;
        check_lease(&row, lease_nonce, Utc::now())?;
        if row.drain_restart {
            row = diesel::update(machines::table.find(id))
                .set(machines::drain_restart.eq(false))
                .returning(MachineRow::as_returning())
                .get_result(conn)?;
        }
        apply(conn, row, action, reason)
    })
}

/// A broker's report of a machine's observed state; the machine must be
/// placed on `host`. Leases do not apply: they order clients, not brokers.
pub fn observe(conn: &mut PgConnection, host: &str, id: Uuid, state: MachineState) -> Result<MachineRow, StoreError> {
    observe_because(conn, host, id, state, &format!("host {host} reports {state}"))
}

/// [`observe`] with the reason recorded in the machine's events.
pub fn observe_because(
    conn: &mut PgConnection,
    host: &str,
    id: Uuid,
    state: MachineState,
    reason: &str,
) -> Result<MachineRow, StoreError> {
    conn.transaction(|conn| {
        let row = on_host_for_update(conn, host, id)?;
        apply(conn, row, Action::Observed(state), reason)
    })
}

fn on_host_for_update(conn: &mut PgConnection, host: &str, id: Uuid) -> Result<MachineRow, StoreError> {
    machines::table
        .filter(machines::id.eq(id))
        .filter(machines::host_name.eq(host))
        .select(MachineRow::as_select())
        .for_update()
        .first(conn)
        .optional()?
        .ok_or_else(|| StoreError::not_found("machine on this host", id.to_string()))
}

/// The controller launches a machine once its host's broker is connected
/// (created → starting). Done under the row lock before any microVM
/// exists, so a delete of the `created` machine either wins (and nothing
/// is launched) or sees it `starting`.
pub fn launch(conn: &mut PgConnection, host: &str, id: Uuid) -> Result<MachineRow, StoreError> {
    conn.transaction(|conn| {
        let row = on_host_for_update(conn, host, id)?;
        apply(conn, row, Action::Start, &format!("launched on host {host}"))
    })
}

/// The machines placed on `host` that are not destroyed.
pub fn on_host(conn: &mut PgConnection, host: &str) -> Result<Vec<MachineRow>, StoreError> {
    Ok(machines::table
        .filter(machines::host_name.eq(host))
        .filter(machines::state.ne(MachineState::Destroyed.as_str()))
        .order(machines::seq.asc())
        .select(MachineRow::as_select())
        .load(conn)?)
}

pub fn events(conn: &mut PgConnection, namespace: &str, id: Uuid) -> Result<Vec<MachineEventRow>, StoreError> {
    get(conn, namespace, id)?;
    Ok(machine_events::table
        .filter(machine_events::machine_id.eq(id))
        .order(machine_events::id.asc())
        .select(MachineEventRow::as_select())
        .load(conn)?)
}

/// The events of `namespace`'s machines after event `after`, oldest first,
/// at most `limit`, each with its machine's name.
pub fn namespace_events(
    conn: &mut PgConnection,
    namespace: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<(MachineEventRow, String)>, StoreError> {
    Ok(machine_events::table
        .inner_join(machines::table)
        .filter(machines::namespace.eq(namespace))
        .filter(machine_events::id.gt(after))
        .order(machine_events::id.asc())
        .limit(limit)
        .select((MachineEventRow::as_select(), machines::name))
        .load(conn)?)
}

/// The id of the newest event of any machine (0 when there is none): a
/// cursor from which only what happens next is new.
pub fn newest_event_id(conn: &mut PgConnection) -> Result<i64, StoreError> {
    let newest: Option<i64> = machine_events::table.select(diesel::dsl::max(machine_events::id)).first(conn)?;
    Ok(newest.unwrap_or(0))
}

/// Takes or extends a lease. With the current nonce the lease is extended
/// (same nonce); without one, a new lease is granted only if none is active.
/// Returns the row, the nonce and whether the lease is new.
pub fn acquire_lease(
    conn: &mut PgConnection,
    namespace: &str,
    id: Uuid,
    ttl: Duration,
    owner: &str,
    description: &str,
    presented: Option<&str>,
) -> Result<(MachineRow, String, bool), StoreError> {
    conn.transaction(|conn| {
        let row = get_for_update(conn, namespace, id)?;
        if row.state == MachineState::Destroyed.as_str() {
            return Err(StoreError::Conflict("cannot lease a destroyed machine".into()));
        }
        let now = Utc::now();
        check_lease(&row, presented, now)?;
        let (nonce, new) = match row.active_lease(now) {
            Some((held, _)) => (held.to_owned(), false),
            None => (Uuid::new_v4().simple().to_string(), true),
        };
        let (lease_owner, lease_description) = if new {
            (Some(owner.to_owned()), Some(description.to_owned()))
        } else {
            (row.lease_owner.clone(), row.lease_description.clone())
        };
        let changes = (
            machines::lease_nonce.eq(Some(nonce.clone())),
            machines::lease_owner.eq(lease_owner),
            machines::lease_description.eq(lease_description),
            machines::lease_expires_at.eq(Some(now + ttl)),
        );
        let row = diesel::update(machines::table.find(id))
            .set(changes)
            .returning(MachineRow::as_returning())
            .get_result(conn)?;
        Ok((row, nonce, new))
    })
}

/// Ends the active lease; only its holder (the nonce) may.
pub fn release_lease(
    conn: &mut PgConnection,
    namespace: &str,
    id: Uuid,
    presented: Option<&str>,
) -> Result<(), StoreError> {
    conn.transaction(|conn| {
        let row = get_for_update(conn, namespace, id)?;
        let now = Utc::now();
        if row.active_lease(now).is_none() {
            return Err(StoreError::not_found("lease on machine", id.to_string()));
        }
        check_lease(&row, presented, now)?;
        diesel::update(machines::table.find(id))
            .set((
                machines::lease_nonce.eq(None::<String>),
                machines::lease_owner.eq(None::<String>),
                machines::lease_description.eq(None::<String>),
                machines::lease_expires_at.eq(None::<DateTime<Utc>>),
            ))
            .execute(conn)?;
        Ok(())
    })
}

/// Forgets idempotency keys older than `age` (the forks' and the snapshot
/// creates' too).
pub fn expire_idempotency_keys(conn: &mut PgConnection, age: Duration) -> Result<usize, StoreError> {
    let machines = diesel::delete(idempotency_keys::table.filter(idempotency_keys::created_at.lt(Utc::now() - age)))
        .execute(conn)?;
    let forks =
        diesel::delete(fork_idempotency_keys::table.filter(fork_idempotency_keys::created_at.lt(Utc::now() - age)))
            .execute(conn)?;
    Ok(machines + forks + super::snapshots::expire_keys(conn, age)?)
}
