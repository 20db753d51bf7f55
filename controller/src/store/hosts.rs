//! Hosts (brokers) and their capacity.

use std::collections::BTreeMap;

use chrono::Utc;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Jsonb, Text};

use super::StoreError;
use crate::db::models::{HostRow, json_map, string_map};
use crate::db::schema::hosts;
use crate::scheduler::HostCapacity;

/// What a broker says about itself when it registers.
#[derive(Debug, Clone)]
pub struct HostSpec {
    pub name: String,
    pub address: String,
    pub cpus: i32,
    pub memory_mb: i64,
    pub labels: BTreeMap<String, String>,
}

/// Registers a host, or updates its address, capacity and labels if it is
/// known (a broker re-registers after every restart). Cordon and drain
/// flags survive re-registration: they are an operator's decision.
/// Returns the row and whether it is new.
pub fn register(conn: &mut PgConnection, spec: &HostSpec) -> Result<(HostRow, bool), StoreError> {
    conn.transaction(|conn| {
        let existed =
            hosts::table.find(&spec.name).select(hosts::name).for_update().first::<String>(conn).optional()?;
        let now = Utc::now();
        let row = diesel::insert_into(hosts::table)
            .values((
                hosts::name.eq(&spec.name),
                hosts::address.eq(&spec.address),
                hosts::cpus.eq(spec.cpus),
                hosts::memory_mb.eq(spec.memory_mb),
                hosts::labels.eq(json_map(&spec.labels)),
                hosts::last_heartbeat_at.eq(now),
            ))
            .on_conflict(hosts::name)
            .do_update()
            .set((
                hosts::address.eq(&spec.address),
                hosts::cpus.eq(spec.cpus),
                hosts::memory_mb.eq(spec.memory_mb),
                hosts::labels.eq(json_map(&spec.labels)),
                hosts::last_heartbeat_at.eq(now),
                hosts::lost_at.eq(None::<chrono::DateTime<Utc>>),
            ))
            .returning(HostRow::as_returning())
            .get_result(conn)?;
        Ok((row, existed.is_none()))
    })
}

/// A broker is alive: its host is not lost (any more).
pub fn heartbeat(conn: &mut PgConnection, name: &str) -> Result<(), StoreError> {
    let updated = diesel::update(hosts::table.find(name))
        .set((hosts::last_heartbeat_at.eq(Utc::now()), hosts::lost_at.eq(None::<chrono::DateTime<Utc>>)))
        .execute(conn)?;
    if updated == 0 {
        return Err(StoreError::not_found("host", name));
    }
    Ok(())
}

/// Records that the controller reachable at `controller` (None: one its
/// peers cannot reach) now holds `name`'s broker session, replacing
/// whichever held it before: the newest session is the live one.
pub fn claim_session(conn: &mut PgConnection, name: &str, controller: Option<&str>) -> Result<(), StoreError> {
    let updated =
        diesel::update(hosts::table.find(name)).set(hosts::session_controller.eq(controller)).execute(conn)?;
    if updated == 0 {
        return Err(StoreError::not_found("host", name));
    }
    Ok(())
}

/// A session of `name` held by the controller at `controller` ended:
/// forget it, unless the row names another controller by now (the broker
/// already dialled again elsewhere, and that newer session must stay
/// findable). Returns whether the row was cleared.
pub fn release_session(conn: &mut PgConnection, name: &str, controller: &str) -> Result<bool, StoreError> {
    let updated = diesel::update(hosts::table.find(name).filter(hosts::session_controller.eq(controller)))
        .set(hosts::session_controller.eq(None::<String>))
        .execute(conn)?;
    Ok(updated == 1)
}

/// The URL of the controller holding `name`'s broker session, if one
/// recorded it.
pub fn session_controller(conn: &mut PgConnection, name: &str) -> Result<Option<String>, StoreError> {
    Ok(hosts::table.find(name).select(hosts::session_controller).first::<Option<String>>(conn).optional()?.flatten())
}

/// Marks lost every host not lost yet whose last heartbeat is older than
/// `timeout`; returns their names.
pub fn mark_lost(conn: &mut PgConnection, timeout: chrono::Duration) -> Result<Vec<String>, StoreError> {
    let now = Utc::now();
    Ok(diesel::update(
        hosts::table
            .filter(hosts::lost_at.is_null())
            .filter(hosts::last_heartbeat_at.is_null().or(hosts::last_heartbeat_at.lt(now - timeout))),
    )
    .set(hosts::lost_at.eq(now))
    .returning(hosts::name)
    .get_results(conn)?)
}

pub fn get(conn: &mut PgConnection, name: &str) -> Result<HostRow, StoreError> {
    hosts::table
        .find(name)
        .select(HostRow::as_select())
        .first(conn)
        .optional()?
        .ok_or_else(|| StoreError::not_found("host", name))
}

/// Sets the scheduling flags. Draining implies cordoned; uncordoning (or
/// cordoning) ends a drain.
pub fn set_flags(conn: &mut PgConnection, name: &str, cordoned: bool, draining: bool) -> Result<HostRow, StoreError> {
    diesel::update(hosts::table.find(name))
        .set((
            hosts::cordoned.eq(cordoned || draining),
            hosts::draining.eq(draining),
            // The leader's next pass says again what blocks a drain.
            hosts::drain_blocked.eq(None::<String>),
        ))
        .returning(HostRow::as_returning())
        .get_result(conn)
        .optional()?
        .ok_or_else(|| StoreError::not_found("host", name))
}

#[derive(QueryableByName)]
struct CapacityRow {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = BigInt)]
    cpus: i64,
    #[diesel(sql_type = BigInt)]
    memory_mb: i64,
    #[diesel(sql_type = Jsonb)]
    labels: serde_json::Value,
    #[diesel(sql_type = Bool)]
    cordoned: bool,
    #[diesel(sql_type = Bool)]
    lost: bool,
    #[diesel(sql_type = BigInt)]
    used_cpus: i64,
    #[diesel(sql_type = BigInt)]
    used_memory_mb: i64,
    #[diesel(sql_type = BigInt)]
    namespace_machines: i64,
    #[diesel(sql_type = BigInt)]
    machines: i64,
}

/// Every host with what is placed on it, as the scheduler wants it;
/// `namespace_machines` counts `namespace`'s machines. Also returns each
/// host's total machine count (for the hosts listing).
pub fn capacity(conn: &mut PgConnection, namespace: &str) -> Result<Vec<(HostCapacity, i64)>, StoreError> {
    let rows: Vec<CapacityRow> = diesel::sql_query(
        "SELECT h.name, h.cpus::BIGINT AS cpus, h.memory_mb, h.labels, h.cordoned, \
                h.lost_at IS NOT NULL AS lost, \
                COALESCE(SUM(m.cpus), 0)::BIGINT AS used_cpus, \
                COALESCE(SUM(m.memory_mb), 0)::BIGINT AS used_memory_mb, \
                COUNT(m.id) FILTER (WHERE m.namespace = $1) AS namespace_machines, \
                COUNT(m.id) AS machines \
         FROM hosts h LEFT JOIN machines m ON m.host_name = h.name AND m.state <> 'destroyed' \
         GROUP BY h.name ORDER BY h.name",
    )
    .bind::<Text, _>(namespace)
    .load(conn)?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let host = HostCapacity {
                name: r.name,
                cpus: r.cpus,
                memory_mb: r.memory_mb,
                labels: string_map(&r.labels),
                cordoned: r.cordoned,
                lost: r.lost,
                used_cpus: r.used_cpus,
                used_memory_mb: r.used_memory_mb,
                namespace_machines: r.namespace_machines,
            };
            (host, r.machines)
        })
        .collect())
}

/// Every host with its capacity use.
pub fn list(conn: &mut PgConnection) -> Result<Vec<(HostRow, HostCapacity, i64)>, StoreError> {
    let rows: Vec<HostRow> = hosts::table.select(HostRow::as_select()).order(hosts::name.asc()).load(conn)?;
    let mut usage: BTreeMap<String, (HostCapacity, i64)> =
        capacity(conn, "")?.into_iter().map(|(c, n)| (c.name.clone(), (c, n))).collect();
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            let (capacity, machines) = usage.remove(&row.name)?;
            Some((row, capacity, machines))
        })
        .collect())
}
