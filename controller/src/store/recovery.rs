//! What the leader does about lost hosts: a host whose broker stopped
//! heart-beating is marked lost (`hosts::mark_lost`), and its machines are
//! re-placed elsewhere.
//!
//! A machine that should have been running (`starting`, `started`) is
//! first marked `failed` (the record says the host was lost, and
//! `previous_state` what it was), then, if another host has room, moved
//! there and set `starting`, so the new host's broker starts it. Machines
//! that were not running move and keep their state (a `suspended` one
//! arrives `stopped`: its saved state stays on the lost host); a
//! `destroying` one is done (nothing is left to clean up where nobody
//! answers); a `stopping` or `suspending` one is stopped (and started on
//! its new host if the drain had stopped it to move it, see
//! `store::drain`). A machine that fits nowhere stays on
//! the lost host and is tried again on every pass (a running one stays
//! `failed`). The move itself is `store::relocation`'s.
//!
//! The microVM the lost broker may still be running is not forgotten: if
//! that broker comes back, its controller removes every microVM named like
//! a machine that is no longer placed there (see `session::driver`).

use diesel::prelude::*;
use uuid::Uuid;

use super::StoreError;
use super::machines::{apply, lock_placement};
use super::relocation::{move_to, place_elsewhere};
use crate::db::models::MachineRow;
use crate::db::schema::{hosts as hosts_t, machines};
use crate::machine::{Action, MachineState};

/// One machine taken care of by [`recover_lost`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub machine: Uuid,
    pub from: String,
    /// The host it moved to, if one had room.
    pub to: Option<String>,
    /// Its state afterwards.
    pub state: MachineState,
}

/// Re-places up to `limit` machines of lost hosts; returns those whose
/// state or host changed, under the placement
/// lock (so creates on other controllers do not race for the same room).
pub fn recover_lost(conn: &mut PgConnection, limit: i64) -> Result<Vec<Recovered>, StoreError> {
    conn.transaction(|conn| {
        lock_placement(conn)?;
        let lost: Vec<String> =
            hosts_t::table.filter(hosts_t::lost_at.is_not_null()).select(hosts_t::name).load(conn)?;
        if lost.is_empty() {
            return Ok(Vec::new());
        }
        let stranded: Vec<MachineRow> = machines::table
            .filter(machines::host_name.eq_any(&lost))
            .filter(machines::state.ne(MachineState::Destroyed.as_str()))
            .order(machines::seq.asc())
            .limit(limit)
            .select(MachineRow::as_select())
            .for_update()
            .load(conn)?;
        let mut done = Vec::new();
        for row in stranded {
            done.extend(recover_one(conn, row)?);
        }
        Ok(done)
    })
}

fn recover_one(conn: &mut PgConnection, mut row: MachineRow) -> Result<Option<Recovered>, StoreError> {
    let from = row.host_name.clone().unwrap_or_default();
    let id = row.id;
    let state: MachineState = row.state.parse()?;
    // A machine the drain stopped to move was meant to run too.
    let mut start_there = row.drain_restart;
    let mut changed = true;
    match state {
        MachineState::Destroying => {
            let reason = format!("host {from} lost: nothing left to clean up");
            apply(conn, row, Action::Observed(MachineState::Destroyed), &reason)?;
            return Ok(Some(Recovered { machine: id, from, to: None, state: MachineState::Destroyed }));
        }
        // Not meant to run on (a suspend would have ended its processes).
        MachineState::Stopping | MachineState::Suspending => {
            row = apply(conn, row, Action::Observed(MachineState::Stopped), &format!("host {from} lost"))?;
        }
        MachineState::Starting | MachineState::Started => {
            let reason = format!("host {from} lost while the machine was {state}");
            row = apply(conn, row, Action::Observed(MachineState::Failed), &reason)?;
            start_there = true;
        }
        _ => changed = false,
    }
    let to = match place_elsewhere(conn, &row)? {
        Ok(to) => to,
        Err(no_fit) => {
            tracing::debug!(machine = %id, host = %from, "cannot re-place a machine of a lost host: {no_fit}");
            let state = row.state.parse()?;
            return Ok(changed.then_some(Recovered { machine: id, from, to: None, state }));
        }
    };
    let row = move_to(conn, row, &to, start_there, &format!("host {from} lost"))?;
    Ok(Some(Recovered { machine: id, from, to: Some(to), state: row.state.parse()? }))
}
