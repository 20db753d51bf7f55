//! What the leader does about draining hosts: move every machine off them,
//! as Nomad's and Fly's drains do.
//!
//! `POST /v1/hosts/{name}/drain` cordons the host and marks it draining;
//! each leader pass then looks at its machines (and at any machine placed
//! nowhere):
//!
//! * `created`, `stopped` and `failed` machines move at once to the host
//!   the scheduler picks (cordons, labels, spread, room) and keep their
//!   state; the old host's broker removes the microVM a stopped or failed
//!   one left there (`session::driver` removes microVMs named like a
//!   machine that is not placed on their host). A `suspended` one moves
//!   too and arrives `stopped`: its saved state cannot follow it.
//! * `starting` and `started` machines are first stopped where they are,
//!   gracefully (`stopping`; the old host's session stops the microVM with
//!   the broker's stop), and marked `drain_restart`. Once their host
//!   reports them `stopped`, they move like the others and become
//!   `starting` on the new host, whose broker boots them from their image
//!   with a fresh root disk (the same as re-placement off a lost host:
//!   machines have no persistent volumes yet). At most [`DrainLimits::
//!   stopping_per_host`] machines per host are between stop and move at a
//!   time, so a drain does not take a whole host's workload down at once.
//!   A running machine is stopped only if another host has room for it
//!   now; should that room be taken while it stops, it waits, stopped,
//!   until room appears, and then moves and starts.
//! * `stopping`, `suspending` and `destroying` machines are left to finish.
//!
//! A machine that fits nowhere stays (a running one keeps running), its
//! events say why (once per reason, not once per pass), the host's
//! `drain_blocked` says so too, and the next pass tries again. A host whose
//! machines are all gone reports `drained`.
//!
//! A user's start, stop or delete of a machine clears its `drain_restart`
//! mark (`store::machines::transition`): a machine stopped by its owner
//! during a drain moves stopped.

use std::collections::{BTreeMap, HashSet};

use diesel::prelude::*;
use uuid::Uuid;

use super::StoreError;
use super::machines::{apply, lock_placement, record};
use super::relocation::{move_to, place_elsewhere};
use crate::db::models::MachineRow;
use crate::db::schema::{hosts, machine_events, machines};
use crate::machine::{Action, MachineState};

/// How much one pass may do.
#[derive(Debug, Clone, Copy)]
pub struct DrainLimits {
    /// Machines looked at per pass, so one pass holds the placement lock
    /// briefly.
    pub machines_per_pass: i64,
    /// Machines of one draining host stopped to move and not moved yet.
    pub stopping_per_host: usize,
}

/// What a pass did to one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drained {
    /// Placed on `to`, now in `state`.
    Moved { machine: Uuid, from: Option<String>, to: String, state: MachineState },
    /// Asked to stop on its draining host, to be started where it moves.
    Stopping { machine: Uuid, host: String },
    /// No host has room (`why`, the scheduler's words); it stays.
    Blocked { machine: Uuid, host: Option<String>, why: String },
    /// Its host stopped draining after the drain had stopped it: started
    /// again where it is.
    Restarted { machine: Uuid, host: String },
}

/// One pass over the machines of draining hosts (lost hosts excepted:
/// their machines are `store::recovery`'s) and of none, under the
/// placement lock.
pub fn drain_pass(conn: &mut PgConnection, limits: DrainLimits) -> Result<Vec<Drained>, StoreError> {
    conn.transaction(|conn| {
        lock_placement(conn)?;
        let draining: Vec<String> = hosts::table
            .filter(hosts::draining.eq(true))
            .filter(hosts::lost_at.is_null())
            .select(hosts::name)
            .load(conn)?;
        let rows: Vec<MachineRow> = machines::table
            .filter(machines::state.ne(MachineState::Destroyed.as_str()))
            .filter(machines::host_name.is_null().or(machines::host_name.eq_any(&draining)))
            .order(machines::seq.asc())
            .limit(limits.machines_per_pass)
            .select(MachineRow::as_select())
            .for_update()
            .load(conn)?;
        let complete = (rows.len() as i64) < limits.machines_per_pass;
        let mut stopping: BTreeMap<String, usize> = BTreeMap::new();
        for row in rows.iter().filter(|r| r.drain_restart) {
            *stopping.entry(row.host_name.clone().unwrap_or_default()).or_default() += 1;
        }
        let examined: HashSet<String> = rows.iter().filter_map(|r| r.host_name.clone()).collect();
        let mut done = Vec::new();
        for row in rows {
            let in_flight = stopping.entry(row.host_name.clone().unwrap_or_default()).or_default();
            done.extend(drain_one(conn, row, in_flight, limits.stopping_per_host)?);
        }
        note_blocked_hosts(conn, &draining, &done, |host| complete || examined.contains(host))?;
        done.extend(restart_undrained(conn, limits.machines_per_pass)?);
        Ok(done)
    })
}

/// Machines the drain stopped on a host that is no longer draining (an
/// operator uncordoned it meanwhile) start again where they are.
fn restart_undrained(conn: &mut PgConnection, limit: i64) -> Result<Vec<Drained>, StoreError> {
    let settled_hosts =
        hosts::table.filter(hosts::draining.eq(false)).filter(hosts::lost_at.is_null()).select(hosts::name.nullable());
    let rows: Vec<MachineRow> = machines::table
        .filter(machines::drain_restart.eq(true))
        .filter(machines::state.eq(MachineState::Stopped.as_str()))
        .filter(machines::host_name.eq_any(settled_hosts))
        .order(machines::seq.asc())
        .limit(limit)
        .select(MachineRow::as_select())
        .for_update()
        .load(conn)?;
    let mut done = Vec::new();
    for row in rows {
        let (machine, host) = (row.id, row.host_name.clone().unwrap_or_default());
        diesel::update(machines::table.find(machine)).set(machines::drain_restart.eq(false)).execute(conn)?;
        apply(conn, row, Action::Start, &format!("host {host} no longer draining: starting the machine again"))?;
        done.push(Drained::Restarted { machine, host });
    }
    Ok(done)
}

fn drain_one(
    conn: &mut PgConnection,
    row: MachineRow,
    in_flight: &mut usize,
    stopping_per_host: usize,
) -> Result<Option<Drained>, StoreError> {
    let state: MachineState = row.state.parse()?;
    let (id, from) = (row.id, row.host_name.clone());
    let moves_now = match state {
        // A suspended machine arrives stopped (see `relocation`).
        MachineState::Created | MachineState::Stopped | MachineState::Failed | MachineState::Suspended => true,
        MachineState::Starting | MachineState::Started => false,
        MachineState::Stopping | MachineState::Suspending | MachineState::Destroying | MachineState::Destroyed => {
            return Ok(None);
        }
    };
    // A running machine is stopped only if it has somewhere to go.
    let to = match place_elsewhere(conn, &row)? {
        Ok(to) => to,
        Err(no_fit) => {
            let host = from.as_deref().unwrap_or("(none)");
            note_once(conn, &row, &format!("cannot move off draining host {host}: {no_fit}"))?;
            return Ok(Some(Drained::Blocked { machine: id, host: from, why: no_fit.to_string() }));
        }
    };
    if moves_now {
        let start = row.drain_restart;
        let row = move_to(conn, row, &to, start, "drain")?;
        if start {
            *in_flight = in_flight.saturating_sub(1);
        }
        return Ok(Some(Drained::Moved { machine: id, from, to, state: row.state.parse()? }));
    }
    // Running: stop it here first, unless this host's batch is full.
    if !row.drain_restart && *in_flight >= stopping_per_host {
        return Ok(None);
    }
    let host = from.clone().unwrap_or_default();
    let reason = format!("host {host} is draining: stopping the machine to start it on another host");
    let row = apply(conn, row, Action::Stop, &reason)?;
    if !row.drain_restart {
        diesel::update(machines::table.find(id)).set(machines::drain_restart.eq(true)).execute(conn)?;
        *in_flight += 1;
    }
    Ok(Some(Drained::Stopping { machine: id, host }))
}

/// Records `reason` in the machine's events unless it is already the
/// latest: a blocked machine is looked at on every pass.
fn note_once(conn: &mut PgConnection, row: &MachineRow, reason: &str) -> Result<(), StoreError> {
    let latest: Option<String> = machine_events::table
        .filter(machine_events::machine_id.eq(row.id))
        .order(machine_events::id.desc())
        .select(machine_events::reason)
        .first(conn)
        .optional()?;
    if latest.as_deref() != Some(reason) {
        record(conn, row.id, &row.state, row.previous_state.as_deref(), reason)?;
    }
    Ok(())
}

/// Sets each draining host's `drain_blocked` from this pass: what blocks
/// it, or nothing. `judged(host)` says whether the pass reached the host's
/// machines (a pass may stop at its limit); a host it did not reach keeps
/// its note until a pass does.
fn note_blocked_hosts(
    conn: &mut PgConnection,
    draining: &[String],
    done: &[Drained],
    judged: impl Fn(&str) -> bool,
) -> Result<(), StoreError> {
    let mut blocked: BTreeMap<&str, Vec<(Uuid, &str)>> = BTreeMap::new();
    for d in done {
        if let Drained::Blocked { machine, host: Some(host), why } = d {
            blocked.entry(host.as_str()).or_default().push((*machine, why.as_str()));
        }
    }
    for host in draining {
        let note = match blocked.get(host.as_str()) {
            Some(stuck) => {
                let (machine, why) = stuck[0];
                Some(format!("{} machine(s) cannot move; machine {machine}: {why}", stuck.len()))
            }
            None if judged(host) => None,
            None => continue,
        };
        diesel::update(hosts::table.find(host))
            .filter(hosts::drain_blocked.is_distinct_from(&note))
            .set(hosts::drain_blocked.eq(&note))
            .execute(conn)?;
    }
    Ok(())
}
