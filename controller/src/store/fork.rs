//! Machines made from another machine's guest instead of a boot: a fork
//! (`count` machines restored from one snapshot, all or none) and a branch
//! (one machine whose microVM is a live copy of a running machine's).
//!
//! Both are creates at heart, so they reuse `machines`' create path (its
//! placement lock, name checks, idempotency keys and first event); they
//! live apart because each adds its own all-or-none and same-host rules,
//! which would otherwise crowd the plain create out of `machines`.

use std::collections::BTreeMap;

use diesel::prelude::*;
use uuid::Uuid;

use super::machines::{
    CreateMachine, Created, Made, Workload, check_name_free, get, get_for_update, insert_created, insert_new,
    lock_placement, namespace_exists, remember_key, replay,
};
use super::{StoreError, hosts, quota};
use crate::db::models::{MachineRow, SnapshotRow, string_list, string_map};
use crate::db::schema::{fork_idempotency_keys, machines};
use crate::machine::MachineState;
use crate::scheduler::{self, Request};

/// Most machines one fork makes.
pub const MAX_FORK: u32 = 64;

/// A validated fork request: `count` machines restored from `snapshot`,
/// named `PREFIX-1` … `PREFIX-count`.
#[derive(Debug, Clone)]
pub struct Fork {
    pub namespace: String,
    pub snapshot: String,
    pub count: u32,
    /// `None`: the snapshot's name (else the first 6 characters of its
    /// id), then `-fork`.
    pub name_prefix: Option<String>,
    /// Replace the snapshot's authorized keys in every clone (empty: keep
    /// them), as a create's `config.ssh_keys` does.
    pub ssh_keys: Vec<String>,
    pub idempotency: Option<(String, String)>,
}

/// The outcome of a fork: its machines, in order.
pub enum Forked {
    New(Vec<MachineRow>),
    Replayed(Vec<MachineRow>),
}

/// The prefix of a fork's names when none is given: the snapshot's name,
/// else the first 6 characters of its id, then `-fork` (as `mmctl fork`
/// on a broker host names clones).
pub fn default_fork_prefix(snapshot: &SnapshotRow) -> String {
    let stem = match &snapshot.name {
        Some(name) => name.clone(),
        None => snapshot.id.chars().take(6).collect(),
    };
    format!("{stem}-fork")
}

/// Makes `count` machines from one snapshot, each as a create with
/// `from_snapshot` would (same checks, placed on the snapshot's host only),
/// all or none: one transaction under the placement lock, so a taken name,
/// a workload that does not fit or a host without room for the last clone
/// leaves nothing behind. With an `Idempotency-Key` a repeat answers the
/// same machines.
pub fn fork(conn: &mut PgConnection, req: Fork) -> Result<Forked, StoreError> {
    conn.transaction(|conn| {
        lock_placement(conn)?;
        namespace_exists(conn, &req.namespace)?;
        if let Some((key, digest)) = &req.idempotency {
            let earlier: Option<(String, Vec<Uuid>)> = fork_idempotency_keys::table
                .find((&req.namespace, key))
                .select((fork_idempotency_keys::request_sha256, fork_idempotency_keys::machine_ids))
                .first(conn)
                .optional()?;
            if let Some((earlier, ids)) = earlier {
                if &earlier != digest {
                    return Err(StoreError::IdempotencyMismatch(key.clone()));
                }
                let rows = ids.into_iter().map(|id| get(conn, &req.namespace, id)).collect::<Result<_, _>>()?;
                return Ok(Forked::Replayed(rows));
            }
        }
        if !(1..=MAX_FORK).contains(&req.count) {
            return Err(StoreError::Invalid(format!("count must be 1 to {MAX_FORK}")));
        }
        let (snapshot, _) = super::snapshots::source(conn, &req.namespace, &req.snapshot)?;
        let prefix = req.name_prefix.clone().unwrap_or_else(|| default_fork_prefix(&snapshot));
        let names: Vec<String> = (1..=req.count).map(|i| format!("{prefix}-{i}")).collect();
        if let Some(bad) = names.iter().find(|n| !mm_protocols::spec_rules::is_dns_label(n)) {
            return Err(StoreError::Invalid(format!(
                "machine name {bad:?} (name_prefix {prefix:?}) must be 1 to 63 lowercase letters, digits or '-', \
                 not starting or ending with '-'{}",
                if req.name_prefix.is_none() { "; give a name_prefix" } else { "" }
            )));
        }
        let taken: Vec<String> = machines::table
            .filter(machines::namespace.eq(&req.namespace))
            .filter(machines::name.eq_any(&names))
            .filter(machines::state.ne(MachineState::Destroyed.as_str()))
            .order(machines::seq.asc())
            .select(machines::name)
            .load(conn)?;
        if !taken.is_empty() {
            return Err(StoreError::Conflict(format!(
                "cannot fork {} machine(s) named {prefix}-1 to {prefix}-{}: {} already exist(s) in this namespace; \
                 nothing was created",
                req.count,
                req.count,
                taken.join(", ")
            )));
        }
        // All clones at once, for a message about the fork rather than
        // about whichever clone would have been one too many (each clone's
        // own check in `insert_created` stays the guarantee).
        let count = i64::from(req.count);
        let adding = quota::Adding {
            machines: count,
            vcpus: count * i64::from(snapshot.cpus),
            memory_mb: count.saturating_mul(snapshot.memory_mb),
        };
        quota::check_machines(conn, &req.namespace, adding)?;
        let mut rows = Vec::with_capacity(names.len());
        for (i, name) in names.into_iter().enumerate() {
            let one = CreateMachine {
                namespace: req.namespace.clone(),
                name: Some(name),
                workload: None,
                ssh_keys: req.ssh_keys.clone(),
                from_snapshot: Some(req.snapshot.clone()),
                labels: BTreeMap::new(),
                host_labels: BTreeMap::new(),
                idempotency: None,
            };
            let row = insert_new(conn, &one).map_err(|error| StoreError::Forking {
                clone: i as u32 + 1,
                count: req.count,
                error: Box::new(error),
            })?;
            rows.push(row);
        }
        if let Some((key, digest)) = &req.idempotency {
            diesel::insert_into(fork_idempotency_keys::table)
                .values((
                    fork_idempotency_keys::namespace.eq(&req.namespace),
                    fork_idempotency_keys::key.eq(key),
                    fork_idempotency_keys::request_sha256.eq(digest),
                    fork_idempotency_keys::machine_ids.eq(rows.iter().map(|r| r.id).collect::<Vec<_>>()),
                ))
                .execute(conn)?;
        }
        Ok(Forked::New(rows))
    })
}

/// A validated branch request: a new machine, on the same host, whose
/// microVM is a live copy of running machine `source`.
#[derive(Debug, Clone)]
pub struct Branch {
    pub namespace: String,
    pub source: Uuid,
    /// `None`: `<source name>-branch`, then `-2`, `-3`, … whichever is free.
    pub name: Option<String>,
    pub idempotency: Option<(String, String)>,
}

/// The first of `stem`, `stem-2`, `stem-3`, … no living machine of the
/// namespace has.
fn free_name(conn: &mut PgConnection, namespace: &str, stem: &str) -> Result<String, StoreError> {
    let taken: std::collections::HashSet<String> = machines::table
        .filter(machines::namespace.eq(namespace))
        .filter(machines::name.like(format!("{stem}%")))
        .filter(machines::state.ne(MachineState::Destroyed.as_str()))
        .select(machines::name)
        .load::<String>(conn)?
        .into_iter()
        .collect();
    let name = (1..)
        .map(|n| if n == 1 { stem.to_owned() } else { format!("{stem}-{n}") })
        .find(|candidate| !taken.contains(candidate))
        .expect("finitely many names are taken");
    if !mm_protocols::spec_rules::is_dns_label(&name) {
        return Err(StoreError::Invalid(format!("the branch's default name {name:?} is too long: give it a name")));
    }
    Ok(name)
}

/// Makes a branch of machine `source` (it must be started): a new machine
/// on the source's host, and only there, with the source's workload, size,
/// keys, labels and placement; its host's driver makes its microVM with
/// `Vm.branch` on the source's. One transaction under the placement lock,
/// with the `Idempotency-Key` (shared with creates) written in it.
pub fn branch(conn: &mut PgConnection, req: Branch) -> Result<Created, StoreError> {
    conn.transaction(|conn| {
        lock_placement(conn)?;
        if let Some((key, digest)) = &req.idempotency
            && let Some(earlier) = replay(conn, &req.namespace, key, digest)?
        {
            return Ok(Created::Replayed(earlier));
        }
        let source = get_for_update(conn, &req.namespace, req.source)?;
        crate::machine::can_branch(source.state.parse()?)?;
        let host = source.host_name.clone().ok_or_else(|| StoreError::Conflict("the machine has no host".into()))?;
        let name = match &req.name {
            Some(name) => {
                check_name_free(conn, &req.namespace, name)?;
                name.clone()
            }
            None => free_name(conn, &req.namespace, &format!("{}-branch", source.name))?,
        };
        let host_labels = string_map(&source.host_labels);
        let there: Vec<_> =
            hosts::capacity(conn, &req.namespace)?.into_iter().map(|(c, _)| c).filter(|c| c.name == host).collect();
        let request = Request { cpus: i64::from(source.cpus), memory_mb: source.memory_mb, host_labels: &host_labels };
        if let Err(why) = scheduler::place(&there, request) {
            return Err(StoreError::BranchHost { machine: source.name, host, why: Box::new(why) });
        }
        let reason =
            format!("branched from machine {} ({}); placed on host {host}, where it runs", source.name, source.id);
        let made = Made {
            id: Uuid::new_v4(),
            namespace: &req.namespace,
            name,
            host: &host,
            workload: Workload::of(&source),
            ssh_keys: string_list(&source.ssh_keys),
            labels: &string_map(&source.labels),
            host_labels: &host_labels,
            from_snapshot: None,
            branch_of: Some(source.id),
        };
        let row = insert_created(conn, made, &reason)?;
        if let Some((key, digest)) = &req.idempotency {
            remember_key(conn, &req.namespace, key, digest, row.id)?;
        }
        Ok(Created::New(row))
    })
}
