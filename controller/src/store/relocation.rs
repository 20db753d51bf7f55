//! Moving one machine to another host: the step lost-host recovery
//! (`store::recovery`) and draining (`store::drain`) share.
//!
//! A machine that moves gets a fresh root disk from its image on its new
//! host (machines have no persistent volumes yet): nothing is copied, the
//! new host's broker creates the microVM when the machine should run, and
//! the old host's broker, when its controller sees a microVM named like a
//! machine no longer placed there, removes it (`session::driver`). For the
//! same reason a machine made from a snapshot, or a branch of another, is
//! booted from its image where it lands (the snapshot's files stay on
//! their host, the source runs on its own), and a
//! suspended one arrives `stopped`: its saved state stays behind.
//!
//! Both callers hold the placement lock, so the room found here is still
//! free when the move is written.

use chrono::Utc;
use diesel::prelude::*;

use super::machines::{apply, record};
use super::{StoreError, hosts};
use crate::db::models::{MachineRow, string_map};
use crate::db::schema::machines;
use crate::machine::{Action, MachineState};
use crate::scheduler::{self, NoFit, Request};

/// The host the scheduler picks for `row` now, honouring cordons (a
/// draining host is cordoned, a lost one skipped), its label constraints
/// and spread; or why none fits.
pub(super) fn place_elsewhere(conn: &mut PgConnection, row: &MachineRow) -> Result<Result<String, NoFit>, StoreError> {
    let capacity: Vec<_> = hosts::capacity(conn, &row.namespace)?.into_iter().map(|(c, _)| c).collect();
    let host_labels = string_map(&row.host_labels);
    let request = Request { cpus: i64::from(row.cpus), memory_mb: row.memory_mb, host_labels: &host_labels };
    Ok(scheduler::place(&capacity, request).map(|host| host.name.clone()))
}

/// Places `row` on host `to` and records why (`moved from host A to host
/// B: <why>`). With `start` the machine becomes `starting` there (its
/// broker boots it afresh); otherwise it keeps its state. Either way the
/// drain's restart mark is spent.
pub(super) fn move_to(
    conn: &mut PgConnection,
    row: MachineRow,
    to: &str,
    start: bool,
    why: &str,
) -> Result<MachineRow, StoreError> {
    let from = row.host_name.clone().unwrap_or_else(|| "(none)".into());
    let mut row: MachineRow = diesel::update(machines::table.find(row.id))
        .set((
            machines::host_name.eq(to),
            machines::drain_restart.eq(false),
            machines::from_snapshot.eq(None::<String>),
            machines::branch_of.eq(None::<uuid::Uuid>),
            machines::updated_at.eq(Utc::now()),
        ))
        .returning(MachineRow::as_returning())
        .get_result(conn)?;
    let mut reason = format!("moved from host {from} to host {to}: {why}");
    if row.state == MachineState::Suspended.as_str() {
        reason = format!("{reason}; its suspended state stays on host {from}, it boots afresh when started");
        row = apply(conn, row, Action::Observed(MachineState::Stopped), &reason)?;
        if !start {
            return Ok(row);
        }
    }
    if start {
        apply(conn, row, Action::Start, &reason)
    } else {
        record(conn, row.id, &row.state, row.previous_state.as_deref(), &reason)?;
        Ok(row)
    }
}
