//! Per-namespace quotas: at most so many machines, vCPUs, MB of guest
//! memory and bytes of snapshots (`namespace_quotas`; no row or a NULL
//! column is no limit).
//!
//! What counts:
//! * machines, vCPUs and memory: every machine of the namespace that is
//!   not `destroyed` — the same rule the scheduler uses for a host's room.
//!   A stopped, failed or suspended machine keeps its place and can be
//!   started again without another check, and a `destroying` one still
//!   holds its host until its broker says it is gone; so all of them
//!   count, and deleting a machine is what frees its share.
//! * snapshot bytes: the `disk_bytes` the brokers reported for the
//!   namespace's recorded snapshots (memory, state and disk on the host).
//!
//! Creates check inside their own transaction: [`check_machines`] takes
//! the namespace's row lock (`FOR NO KEY UPDATE`, which leaves the foreign
//! keys of other tables' inserts alone) before it counts, so two creates of
//! one namespace never both see the same room, whichever controllers they
//! reach — also if the placement lock they take today ever goes.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};

use super::StoreError;
use crate::db::schema::{namespace_quotas as quotas, namespaces};

/// One of the limits, as the API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Machines,
    Vcpus,
    MemoryMb,
    SnapshotBytes,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Machines => "machines",
            Limit::Vcpus => "vcpus",
            Limit::MemoryMb => "memory_mb",
            Limit::SnapshotBytes => "snapshot_bytes",
        }
    }

    /// What one unit of it is, for messages.
    fn unit(self) -> &'static str {
        match self {
            Limit::Machines => "machine(s)",
            Limit::Vcpus => "vCPU(s)",
            Limit::MemoryMb => "MB of guest memory",
            Limit::SnapshotBytes => "bytes of snapshots",
        }
    }
}

/// A create that would take the namespace over one of its limits (403
/// `quota-exceeded`); nothing was made.
#[derive(Debug, thiserror::Error)]
#[error(
    "quota exceeded: {limit}: namespace {namespace:?} may have at most {max} {unit}; it has {used} and this needs {adding} more; nothing was created",
    limit = limit.as_str(),
    unit = limit.unit()
)]
pub struct Exceeded {
    pub limit: Limit,
    pub namespace: String,
    pub max: i64,
    pub used: i64,
    pub adding: i64,
}

/// The limits of a namespace; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Queryable)]
pub struct Limits {
    pub machines: Option<i64>,
    pub vcpus: Option<i64>,
    pub memory_mb: Option<i64>,
    pub snapshot_bytes: Option<i64>,
}

/// What a namespace holds, counted as the limits count it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, QueryableByName)]
pub struct Usage {
    #[diesel(sql_type = BigInt)]
    pub machines: i64,
    #[diesel(sql_type = BigInt)]
    pub vcpus: i64,
    #[diesel(sql_type = BigInt)]
    pub memory_mb: i64,
    #[diesel(sql_type = BigInt)]
    pub snapshot_bytes: i64,
}

/// A namespace's limits and usage, and when the limits were last set.
#[derive(Debug, Clone)]
pub struct Quota {
    pub limits: Limits,
    pub usage: Usage,
    pub updated_at: Option<DateTime<Utc>>,
}

/// Locks the namespace's row until the transaction ends (the creates of a
/// namespace queue here), failing if it does not exist.
fn lock_namespace(conn: &mut PgConnection, namespace: &str) -> Result<(), StoreError> {
    let found: Option<String> =
        namespaces::table.find(namespace).select(namespaces::name).for_no_key_update().first(conn).optional()?;
    found.map(drop).ok_or_else(|| StoreError::not_found("namespace", namespace))
}

fn limits(conn: &mut PgConnection, namespace: &str) -> Result<Option<(Limits, DateTime<Utc>)>, StoreError> {
    Ok(quotas::table
        .find(namespace)
        .select(((quotas::machines, quotas::vcpus, quotas::memory_mb, quotas::snapshot_bytes), quotas::updated_at))
        .first(conn)
        .optional()?)
}

/// What `namespace` holds now.
pub fn usage(conn: &mut PgConnection, namespace: &str) -> Result<Usage, StoreError> {
    // Raw SQL: diesel types a sum of BIGINT as NUMERIC, which would need
    // another crate for what always fits in a BIGINT here.
    Ok(diesel::sql_query(
        "SELECT count(*)::int8 AS machines, coalesce(sum(cpus), 0)::int8 AS vcpus, \
                coalesce(sum(memory_mb), 0)::int8 AS memory_mb, \
                (SELECT coalesce(sum(disk_bytes), 0)::int8 FROM snapshots WHERE namespace = $1) AS snapshot_bytes \
         FROM machines WHERE namespace = $1 AND state <> 'destroyed'",
    )
    .bind::<Text, _>(namespace)
    .get_result(conn)?)
}

/// A namespace's quota (404 for an unknown namespace).
pub fn get(conn: &mut PgConnection, namespace: &str) -> Result<Quota, StoreError> {
    conn.transaction(|conn| {
        super::namespaces::get(conn, namespace)?;
        let set = limits(conn, namespace)?;
        Ok(Quota {
            limits: set.map(|(l, _)| l).unwrap_or_default(),
            usage: usage(conn, namespace)?,
            updated_at: set.map(|(_, at)| at),
        })
    })
}

/// Replaces a namespace's limits (a limit left out is no limit), so the
/// same request twice leaves the same quota. Limits below what the
/// namespace holds are taken: nothing is stopped or deleted, but nothing
/// more is created until it fits again. The next create sees them.
pub fn set(conn: &mut PgConnection, namespace: &str, new: Limits) -> Result<Quota, StoreError> {
    conn.transaction(|conn| {
        lock_namespace(conn, namespace)?;
        let values = (
            quotas::namespace.eq(namespace),
            quotas::machines.eq(new.machines),
            quotas::vcpus.eq(new.vcpus),
            quotas::memory_mb.eq(new.memory_mb),
            quotas::snapshot_bytes.eq(new.snapshot_bytes),
            quotas::updated_at.eq(Utc::now()),
        );
        diesel::insert_into(quotas::table)
            .values(values)
            .on_conflict(quotas::namespace)
            .do_update()
            .set((
                quotas::machines.eq(new.machines),
                quotas::vcpus.eq(new.vcpus),
                quotas::memory_mb.eq(new.memory_mb),
                quotas::snapshot_bytes.eq(new.snapshot_bytes),
                quotas::updated_at.eq(Utc::now()),
            ))
            .execute(conn)?;
        get(conn, namespace)
    })
}

/// What a create adds.
#[derive(Debug, Clone, Copy)]
pub struct Adding {
    pub machines: i64,
    pub vcpus: i64,
    pub memory_mb: i64,
}

fn over(limit: Limit, max: Option<i64>, used: i64, adding: i64, namespace: &str) -> Result<(), StoreError> {
    match max {
        Some(max) if used.saturating_add(adding) > max => {
            Err(Exceeded { limit, namespace: namespace.to_owned(), max, used, adding }.into())
        }
        _ => Ok(()),
    }
}

/// Refuses a create of `adding` that would take `namespace` over its
/// machine, vCPU or memory limit. Call inside the create's transaction,
/// before its rows are written: it holds the namespace's lock from here to
/// the commit, so what it counted stays true until the new rows are in.
pub fn check_machines(conn: &mut PgConnection, namespace: &str, adding: Adding) -> Result<(), StoreError> {
    lock_namespace(conn, namespace)?;
    let Some((max, _)) = limits(conn, namespace)? else { return Ok(()) };
    if max.machines.is_none() && max.vcpus.is_none() && max.memory_mb.is_none() {
        return Ok(());
    }
    let used = usage(conn, namespace)?;
    over(Limit::Machines, max.machines, used.machines, adding.machines, namespace)?;
    over(Limit::Vcpus, max.vcpus, used.vcpus, adding.vcpus, namespace)?;
    over(Limit::MemoryMb, max.memory_mb, used.memory_mb, adding.memory_mb, namespace)
}

/// Refuses a snapshot of `bytes` (0: not known yet, before the broker has
/// taken it) that would take `namespace` over its snapshot limit; with 0,
/// refuses once the namespace is at its limit already. Sizes are known
/// only after the broker took the snapshot, so a create checks twice:
/// before asking the broker (with 0) and when recording what it took (the
/// snapshot is deleted again if it does not fit).
pub fn check_snapshot(conn: &mut PgConnection, namespace: &str, bytes: i64) -> Result<(), StoreError> {
    lock_namespace(conn, namespace)?;
    let Some((Limits { snapshot_bytes: Some(max), .. }, _)) = limits(conn, namespace)? else { return Ok(()) };
    let used = usage(conn, namespace)?.snapshot_bytes;
    if bytes == 0 && used >= max {
        return Err(
            Exceeded { limit: Limit::SnapshotBytes, namespace: namespace.to_owned(), max, used, adding: 1 }.into()
        );
    }
    over(Limit::SnapshotBytes, Some(max), used, bytes, namespace)
}
