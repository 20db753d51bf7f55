//! Queries and transactions, one function per thing the API or the
//! reconcile loop needs. Each function takes a `&mut PgConnection` and is
//! called inside `Db::run`, so it may block.
//!
//! Rules that must hold across controllers (one placement per free slot, one
//! machine per idempotency key, one lease holder) are enforced here, inside a
//! transaction, with row locks or the placement advisory lock: never by
//! checking first in one statement and writing in another.

pub mod drain;
pub mod fork;
pub mod hosts;
pub mod machines;
pub mod namespaces;
pub mod quota;
pub mod recovery;
mod relocation;
pub mod snapshots;
pub mod tokens;

use chrono::{DateTime, Utc};

use crate::db::DbError;
use crate::machine::{TransitionError, UnknownState};
use crate::scheduler::NoFit;

/// What can go wrong in the store, in terms the API maps onto statuses.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error("machine is leased by {owner:?} until {expires_at}; send its nonce in the Machine-Lease-Nonce header")]
    LeaseHeld { owner: String, expires_at: DateTime<Utc> },
    #[error(transparent)]
    NoCapacity(#[from] NoFit),
    #[error("Idempotency-Key {0:?} was already used with a different request body")]
    IdempotencyMismatch(String),
    #[error("a request with Idempotency-Key {0:?} is still in progress; retry once it has finished")]
    KeyInFlight(String),
    /// A machine restored from a snapshot can only go where the snapshot's
    /// files are.
    #[error("a machine from snapshot {snapshot} can only be placed on host {host}, which holds the snapshot: {why}")]
    SnapshotHost { snapshot: String, host: String, why: Box<NoFit> },
    /// A branch runs where its source runs, or not at all.
    #[error("a branch of machine {machine} can only be placed on host {host}, where the machine runs: {why}")]
    BranchHost { machine: String, host: String, why: Box<NoFit> },
    /// Clone `clone` of a fork of `count` could not be made, so none was.
    #[error("fork of {count}: clone {clone}: {error}; nothing was created")]
    Forking { clone: u32, count: u32, error: Box<StoreError> },
    /// A create would take its namespace over a quota (403).
    #[error(transparent)]
    Quota(#[from] quota::Exceeded),
    /// The request breaks a rule only the stored data can tell (422).
    #[error("{0}")]
    Invalid(String),
    #[error("corrupt row: {0}")]
    Corrupt(#[from] UnknownState),
}

impl From<diesel::result::Error> for StoreError {
    fn from(e: diesel::result::Error) -> Self {
        StoreError::Db(DbError::Query(e))
    }
}

impl StoreError {
    pub fn not_found(kind: &'static str, name: impl Into<String>) -> StoreError {
        StoreError::NotFound { kind, name: name.into() }
    }
}

/// Whether a diesel error is a unique-constraint violation (a concurrent
/// insert of the same key won the race).
pub fn is_unique_violation(e: &diesel::result::Error) -> bool {
    matches!(e, diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, _))
}
