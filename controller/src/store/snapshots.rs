//! Snapshots: the controller's record of what the brokers took, so that
//! listing them needs no broker and a namespace sees only its own.
//!
//! Taking and deleting one is the broker's work and cannot share a
//! transaction with the row. So a create reserves its `Idempotency-Key`
//! first ([`begin`]), the broker takes the snapshot, and the row and the
//! key's answer are written together ([`record`]); an attempt that failed
//! frees its key ([`abandon`]). A delete asks the broker first and drops
//! the row after, so a row never names files that are already gone without
//! the broker having said so.

use chrono::{Duration, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use super::{StoreError, is_unique_violation};
use crate::db::models::{MachineRow, NewSnapshot, SnapshotRow};
use crate::db::schema::{machines, snapshot_idempotency_keys as keys, snapshots};
use crate::machine::MachineState;

/// A key whose first request has not finished after this long is taken
/// over by a retry: its controller died mid-call (the broker's snapshot
/// call gives up long before).
const IN_FLIGHT_FOR_AT_MOST: Duration = Duration::minutes(15);

/// A snapshot and the name of the machine it was taken of.
pub type Named = (SnapshotRow, String);

/// How a create may go on.
#[derive(Debug)]
pub enum Begun {
    /// Take the snapshot (the key, if any, is reserved for this request).
    Proceed,
    /// An earlier request with the same key and body took this one.
    Replayed(Box<Named>),
}

pub fn get(conn: &mut PgConnection, namespace: &str, id: &str) -> Result<Named, StoreError> {
    snapshots::table
        .inner_join(machines::table)
        .filter(snapshots::id.eq(id))
        .filter(snapshots::namespace.eq(namespace))
        .select((SnapshotRow::as_select(), machines::name))
        .first(conn)
        .optional()?
        .ok_or_else(|| StoreError::not_found("snapshot", id))
}

/// One page of `namespace`'s snapshots (of one machine, if given), oldest
/// first, after the cursor `after_seq`; and whether more follow.
pub fn list(
    conn: &mut PgConnection,
    namespace: &str,
    machine: Option<Uuid>,
    after_seq: Option<i64>,
    page_size: i64,
) -> Result<(Vec<Named>, bool), StoreError> {
    if let Some(id) = machine {
        super::machines::get(conn, namespace, id)?;
    }
    let mut query = snapshots::table
        .inner_join(machines::table)
        .filter(snapshots::namespace.eq(namespace))
        .select((SnapshotRow::as_select(), machines::name))
        .order(snapshots::seq.asc())
        .limit(page_size + 1)
        .into_boxed();
    if let Some(id) = machine {
        query = query.filter(snapshots::machine_id.eq(id));
    }
    if let Some(after) = after_seq {
        query = query.filter(snapshots::seq.gt(after));
    }
    let mut rows: Vec<Named> = query.load(conn)?;
    let more = rows.len() as i64 > page_size;
    rows.truncate(page_size as usize);
    Ok((rows, more))
}

fn name_taken(conn: &mut PgConnection, namespace: &str, name: &str) -> Result<(), StoreError> {
    let taken: i64 = snapshots::table
        .filter(snapshots::namespace.eq(namespace))
        .filter(snapshots::name.eq(name))
        .count()
        .get_result(conn)?;
    if taken > 0 {
        return Err(StoreError::Conflict(format!("a snapshot named {name:?} already exists in this namespace")));
    }
    Ok(())
}

/// Before the broker is asked: replays a finished request with the same
/// `Idempotency-Key` (`key`: the key and the request's digest), refuses
/// the key with another request (422) or while its first request is still
/// in flight (409), reserves it otherwise; and checks that `name` is free.
pub fn begin(
    conn: &mut PgConnection,
    namespace: &str,
    key: Option<(&str, &str)>,
    name: Option<&str>,
) -> Result<Begun, StoreError> {
    conn.transaction(|conn| {
        if let Some((key, digest)) = key {
            let earlier: Option<(String, Option<String>, chrono::DateTime<Utc>)> = keys::table
                .find((namespace, key))
                .select((keys::request_sha256, keys::snapshot_id, keys::created_at))
                .for_update()
                .first(conn)
                .optional()?;
            match earlier {
                Some((earlier, _, _)) if earlier != digest => {
                    return Err(StoreError::IdempotencyMismatch(key.to_owned()));
                }
                Some((_, Some(id), _)) => return Ok(Begun::Replayed(Box::new(get(conn, namespace, &id)?))),
                Some((_, None, since)) if since > Utc::now() - IN_FLIGHT_FOR_AT_MOST => {
                    return Err(StoreError::KeyInFlight(key.to_owned()));
                }
                Some(_) => {
                    diesel::update(keys::table.find((namespace, key)))
                        .set(keys::created_at.eq(Utc::now()))
                        .execute(conn)?;
                }
                None => {
                    let inserted = diesel::insert_into(keys::table)
                        .values((keys::namespace.eq(namespace), keys::key.eq(key), keys::request_sha256.eq(digest)))
                        .on_conflict_do_nothing()
                        .execute(conn)?;
                    if inserted == 0 {
                        // A concurrent request with this key just reserved it.
                        return Err(StoreError::KeyInFlight(key.to_owned()));
                    }
                }
            }
        }
        if let Some(name) = name {
            name_taken(conn, namespace, name)?;
        }
        // Its size is not known before the broker takes it: refuse only a
        // namespace already at its limit here; `record` checks the size.
        super::quota::check_snapshot(conn, namespace, 0)?;
        Ok(Begun::Proceed)
    })
}

/// Frees a key reserved by [`begin`] whose request failed, so a retry
/// tries again.
pub fn abandon(conn: &mut PgConnection, namespace: &str, key: &str) -> Result<(), StoreError> {
    diesel::delete(keys::table.find((namespace, key)).filter(keys::snapshot_id.is_null())).execute(conn)?;
    Ok(())
}

/// Records a snapshot the broker took, and answers its key with it; one
/// that would take its namespace over its snapshot quota is refused (the
/// caller has the broker delete it again).
pub fn record(conn: &mut PgConnection, snapshot: NewSnapshot, key: Option<&str>) -> Result<Named, StoreError> {
    conn.transaction(|conn| {
        let (namespace, id, name) = (snapshot.namespace.clone(), snapshot.id.clone(), snapshot.name.clone());
        // Under the namespace's lock, so two snapshots recorded at once
        // cannot both fit into the same room.
        super::quota::check_snapshot(conn, &namespace, snapshot.disk_bytes.max(1))?;
        diesel::insert_into(snapshots::table).values(snapshot).execute(conn).map_err(|e| {
            if is_unique_violation(&e) {
                match &name {
                    Some(name) => {
                        StoreError::Conflict(format!("a snapshot named {name:?} was made in this namespace meanwhile"))
                    }
                    None => StoreError::Conflict(format!("snapshot id {id:?} is recorded already")),
                }
            } else {
                e.into()
            }
        })?;
        if let Some(key) = key {
            diesel::update(keys::table.find((&namespace, key))).set(keys::snapshot_id.eq(&id)).execute(conn)?;
        }
        get(conn, &namespace, &id)
    })
}

/// Refuses to delete a snapshot a machine is still to be restored from.
pub fn check_unused(conn: &mut PgConnection, id: &str) -> Result<(), StoreError> {
    let waiting: Option<(Uuid, String)> = machines::table
        .filter(machines::from_snapshot.eq(id))
        .filter(machines::state.eq_any([MachineState::Created.as_str(), MachineState::Starting.as_str()]))
        .select((machines::id, machines::name))
        .first(conn)
        .optional()?;
    match waiting {
        Some((machine, name)) => Err(StoreError::Conflict(format!(
            "machine {name} ({machine}) is being restored from snapshot {id}; delete it once the machine has started"
        ))),
        None => Ok(()),
    }
}

/// Forgets a snapshot its broker removed.
pub fn delete(conn: &mut PgConnection, namespace: &str, id: &str) -> Result<(), StoreError> {
    diesel::delete(snapshots::table.filter(snapshots::id.eq(id)).filter(snapshots::namespace.eq(namespace)))
        .execute(conn)?;
    Ok(())
}

/// What a machine restored from snapshot `id` of `namespace` is made of:
/// the snapshot (its host and guest size) and the machine it was taken of
/// (its image and workload).
pub fn source(conn: &mut PgConnection, namespace: &str, id: &str) -> Result<(SnapshotRow, MachineRow), StoreError> {
    snapshots::table
        .inner_join(machines::table)
        .filter(snapshots::id.eq(id))
        .filter(snapshots::namespace.eq(namespace))
        .select((SnapshotRow::as_select(), MachineRow::as_select()))
        .first(conn)
        .optional()?
        .ok_or_else(|| StoreError::not_found("snapshot", id))
}

/// How many snapshots `namespace` holds (a namespace is deleted only
/// without any: their files are on hosts).
pub fn count(conn: &mut PgConnection, namespace: &str) -> Result<i64, StoreError> {
    Ok(snapshots::table.filter(snapshots::namespace.eq(namespace)).count().get_result(conn)?)
}

/// Forgets snapshot idempotency keys older than `age`.
pub fn expire_keys(conn: &mut PgConnection, age: Duration) -> Result<usize, StoreError> {
    Ok(diesel::delete(keys::table.filter(keys::created_at.lt(Utc::now() - age))).execute(conn)?)
}
