//! Leader election and the reconcile loop.
//!
//! Several controllers may serve the API against one database; exactly one
//! runs the loop that changes things on its own: marking hosts whose broker
//! stopped heart-beating lost and re-placing their machines
//! (`store::recovery`), moving machines off draining hosts
//! (`store::drain`), housekeeping. (Driving each machine to its desired state through its
//! broker is done by the controller that holds that broker's session, see
//! `session`: only it has the broker's capability.) The leader is whoever holds a session-level Postgres
//! advisory lock, taken with `pg_try_advisory_lock` on a dedicated
//! connection: if that controller dies or loses its connection, Postgres
//! drops the lock with the session and another controller takes it on its
//! next tick. No lease timing to tune, no split brain while the database is
//! the single source of truth.
//!
//! Placement at create time does not need the leader: it is serialised by a
//! transaction-level advisory lock instead (see `store::machines::create`),
//! so every controller can answer a create synchronously and refuse clearly
//! when nothing fits.
//!
//! The loop runs on its own OS thread: it only does blocking diesel work and
//! must keep its one connection for as long as it leads.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool};
use tokio::sync::watch;

use crate::db::{Db, lock_keys};
use crate::store::drain::{self, DrainLimits, Drained};
use crate::store::{StoreError, hosts, machines, recovery};

/// How long an idempotency key is remembered.
const IDEMPOTENCY_KEY_AGE: chrono::Duration = chrono::Duration::hours(24);
/// Machines moved per pass, so one pass holds the placement lock briefly.
const MOVES_PER_PASS: i64 = 100;
/// Machines of one draining host stopped (to be moved) at a time.
const DRAIN_STOPPING_PER_HOST: usize = 4;

/// The running loop; stops (and gives up leadership) when dropped.
pub struct Leader {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    leading: Arc<AtomicBool>,
}

impl Leader {
    /// `heartbeat_timeout`: a host whose broker has not heart-beaten for
    /// that long is lost.
    pub fn spawn(db: Db, interval: Duration, heartbeat_timeout: Duration, changes: watch::Sender<u64>) -> Leader {
        let (stop, stopped) = mpsc::channel();
        let leading = Arc::new(AtomicBool::new(false));
        let flag = leading.clone();
        let timeout = chrono::Duration::from_std(heartbeat_timeout).unwrap_or(chrono::Duration::MAX);
        let thread = std::thread::Builder::new()
            .name("mm-controller-leader".into())
            .spawn(move || run(db, interval, timeout, changes, stopped, flag))
            .expect("spawning the leader thread");
        Leader { stop: Some(stop), thread: Some(thread), leading }
    }

    /// Whether this controller holds the lock (as of its last tick).
    pub fn is_leader(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }

    /// The flag behind [`Leader::is_leader`], for the metrics.
    pub fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.leading)
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[derive(QueryableByName)]
struct Locked {
    #[diesel(sql_type = Bool)]
    locked: bool,
}

fn try_lock(conn: &mut PgConnection) -> QueryResult<bool> {
    let row: Locked = diesel::sql_query("SELECT pg_try_advisory_lock($1) AS locked")
        .bind::<BigInt, _>(lock_keys::LEADER)
        .get_result(conn)?;
    Ok(row.locked)
}

fn run(
    db: Db,
    interval: Duration,
    heartbeat_timeout: chrono::Duration,
    changes: watch::Sender<u64>,
    stopped: mpsc::Receiver<()>,
    leading: Arc<AtomicBool>,
) {
    let mut conn: Option<PgConnection> = None;
    let mut is_leader = false;
    let mut leading_since: Option<std::time::Instant> = None;
    loop {
        // Hosts are judged lost only after leading for a whole timeout:
        // after an outage of every controller all heartbeats are stale, and
        // brokers need that long to dial in again before their machines
        // would be re-placed for nothing.
        let judge =
            leading_since.is_some_and(|since| since.elapsed() >= heartbeat_timeout.to_std().unwrap_or_default());
        tick(&db, &mut conn, &mut is_leader, judge.then_some(heartbeat_timeout), &changes);
        if is_leader != leading.swap(is_leader, Ordering::SeqCst) {
            tracing::info!(leader = is_leader, "reconcile loop leadership changed");
        }
        leading_since = match (is_leader, leading_since) {
            (true, None) => Some(std::time::Instant::now()),
            (true, since) => since,
            (false, _) => None,
        };
        match stopped.recv_timeout(interval) {
            Err(RecvTimeoutError::Timeout) => continue,
            Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    // Closing the session releases the lock at once for the next leader.
    leading.store(false, Ordering::SeqCst);
    drop(conn);
}

/// One pass. Any error drops the connection, and with it the lock, so a
/// controller that cannot reach the database does not keep others from
/// leading.
fn tick(
    db: &Db,
    conn: &mut Option<PgConnection>,
    is_leader: &mut bool,
    heartbeat_timeout: Option<chrono::Duration>,
    changes: &watch::Sender<u64>,
) {
    let result = (|| -> Result<(), String> {
        let c = match conn {
            Some(c) => c,
            None => conn.insert(db.dedicated_connection().map_err(|e| e.to_string())?),
        };
        // Only ask while not leading: a session lock taken twice must be
        // released twice, and a leader's lost session shows up as a query
        // error below anyway.
        if !*is_leader {
            *is_leader = try_lock(c).map_err(|e| e.to_string())?;
        }
        if *is_leader {
            reconcile(c, heartbeat_timeout, changes).map_err(|e| e.to_string())?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!("reconcile loop: {e}; reconnecting on the next tick");
        *conn = None;
        *is_leader = false;
    }
}

/// What the leader does each tick.
/// `heartbeat_timeout`: judge hosts lost after that long without a
/// heartbeat; `None` while this controller has not led for that long yet.
fn reconcile(
    conn: &mut PgConnection,
    heartbeat_timeout: Option<chrono::Duration>,
    changes: &watch::Sender<u64>,
) -> Result<(), StoreError> {
    if let Some(timeout) = heartbeat_timeout {
        for host in hosts::mark_lost(conn, timeout)? {
            tracing::warn!(%host, "host lost: no heartbeat from its broker for {} s", timeout.num_seconds());
            crate::metrics::LOST_HOSTS.inc();
        }
    }
    let recovered = recovery::recover_lost(conn, MOVES_PER_PASS)?;
    for r in &recovered {
        tracing::info!(machine = %r.machine, from = %r.from, to = ?r.to, state = %r.state, "machine of a lost host");
    }
    let limits = DrainLimits { machines_per_pass: MOVES_PER_PASS, stopping_per_host: DRAIN_STOPPING_PER_HOST };
    let drained = drain::drain_pass(conn, limits)?;
    let mut changed = !recovered.is_empty();
    for d in &drained {
        match d {
            Drained::Moved { machine, from, to, state } => {
                tracing::info!(%machine, ?from, %to, %state, "drain: moved machine");
            }
            Drained::Stopping { machine, host } => {
                tracing::info!(%machine, %host, "drain: stopping machine to move it")
            }
            Drained::Restarted { machine, host } => {
                tracing::info!(%machine, %host, "drain ended: starting machine again in place");
            }
            // Logged at debug: it is retried (and would be logged) every pass.
            Drained::Blocked { machine, host, why } => tracing::debug!(%machine, ?host, "drain: cannot move: {why}"),
        }
        changed |= !matches!(d, Drained::Blocked { .. });
    }
    if changed {
        changes.send_modify(|n| *n = n.wrapping_add(1));
    }
    machines::expire_idempotency_keys(conn, IDEMPOTENCY_KEY_AGE)?;
    Ok(())
}
