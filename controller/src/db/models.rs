//! Rows as diesel reads and writes them. JSONB columns are
//! `serde_json::Value` here and become typed maps at the API edge, so a
//! malformed row shows up as an error there rather than a panic here.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use super::schema::{
    api_tokens, hosts, idempotency_keys, machine_events, machines, namespaces, revoked_tokens, snapshots,
};

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = namespaces)]
pub struct NamespaceRow {
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = hosts)]
pub struct HostRow {
    pub name: String,
    pub address: String,
    pub cpus: i32,
    pub memory_mb: i64,
    pub labels: serde_json::Value,
    pub cordoned: bool,
    pub draining: bool,
    pub registered_at: DateTime<Utc>,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    /// Set by the leader when the broker stopped heart-beating.
    pub lost_at: Option<DateTime<Utc>>,
    /// Why the drain cannot empty it, as of the leader's last pass.
    pub drain_blocked: Option<String>,
    /// The URL of the controller holding the broker's session (see
    /// `store::hosts::claim_session`), where exec and logs are forwarded.
    pub session_controller: Option<String>,
}

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = machines)]
pub struct MachineRow {
    pub id: Uuid,
    pub seq: i64,
    pub namespace: String,
    pub name: String,
    pub state: String,
    pub previous_state: Option<String>,
    pub image: String,
    pub cpus: i32,
    pub memory_mb: i64,
    pub env: serde_json::Value,
    pub labels: serde_json::Value,
    pub host_labels: serde_json::Value,
    pub host_name: Option<String>,
    pub lease_nonce: Option<String>,
    pub lease_owner: Option<String>,
    pub lease_description: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// A JSON array of strings (empty: the image's default).
    pub command: serde_json::Value,
    /// The drain stopped it on its draining host; start it again where it
    /// moves.
    pub drain_restart: bool,
    /// A JSON array of authorized_keys lines for the guest's SSH server.
    pub ssh_keys: serde_json::Value,
    /// The snapshot its broker restores it from instead of booting it.
    pub from_snapshot: Option<String>,
    /// The running machine whose microVM its broker copies (`Vm.branch`)
    /// instead of booting it.
    pub branch_of: Option<Uuid>,
}

impl MachineRow {
    /// The lease, if one is held and has not expired at `now`.
    pub fn active_lease(&self, now: DateTime<Utc>) -> Option<(&str, DateTime<Utc>)> {
        match (&self.lease_nonce, self.lease_expires_at) {
            (Some(nonce), Some(expires)) if expires > now => Some((nonce.as_str(), expires)),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = machines)]
pub struct NewMachine {
    pub id: Uuid,
    pub namespace: String,
    pub name: String,
    pub state: String,
    pub image: String,
    pub cpus: i32,
    pub memory_mb: i64,
    pub env: serde_json::Value,
    pub labels: serde_json::Value,
    pub host_labels: serde_json::Value,
    pub host_name: Option<String>,
    pub command: serde_json::Value,
    pub ssh_keys: serde_json::Value,
    pub from_snapshot: Option<String>,
    pub branch_of: Option<Uuid>,
}

/// A snapshot a broker took of a machine (the files are on `host_name`).
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = snapshots)]
pub struct SnapshotRow {
    /// The broker's id.
    pub id: String,
    pub seq: i64,
    pub namespace: String,
    pub machine_id: Uuid,
    pub host_name: String,
    pub name: Option<String>,
    /// `snapshot` (restorable as new machines) or `suspend`.
    pub kind: String,
    pub cpus: i32,
    pub memory_mb: i64,
    pub memory_bytes: i64,
    pub disk_bytes: i64,
    pub pause_us: i64,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = snapshots)]
pub struct NewSnapshot {
    pub id: String,
    pub namespace: String,
    pub machine_id: Uuid,
    pub host_name: String,
    pub name: Option<String>,
    pub kind: String,
    pub cpus: i32,
    pub memory_mb: i64,
    pub memory_bytes: i64,
    pub disk_bytes: i64,
    pub pause_us: i64,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = machine_events)]
pub struct MachineEventRow {
    pub id: i64,
    pub machine_id: Uuid,
    pub state: String,
    pub previous_state: Option<String>,
    pub reason: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = machine_events)]
pub struct NewMachineEvent<'a> {
    pub machine_id: Uuid,
    pub state: &'a str,
    pub previous_state: Option<&'a str>,
    pub reason: &'a str,
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = idempotency_keys)]
pub struct IdempotencyRow {
    pub namespace: String,
    pub key: String,
    pub request_sha256: String,
    pub machine_id: Uuid,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = api_tokens)]
pub struct TokenRow {
    pub jti: String,
    pub subject: String,
    pub roles: serde_json::Value,
    pub cluster_admin: bool,
    pub description: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = revoked_tokens)]
pub struct RevokedRow {
    pub jti: String,
    pub revoked_by: String,
    pub revoked_at: DateTime<Utc>,
}

/// A JSONB object of strings as a map; anything else reads as empty (the
/// API only ever writes string maps).
pub fn string_map(value: &serde_json::Value) -> BTreeMap<String, String> {
    value
        .as_object()
        .map(|object| object.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect())
        .unwrap_or_default()
}

/// A JSONB array of strings as a list; anything else reads as empty.
pub fn string_list(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| items.iter().filter_map(|v| Some(v.as_str()?.to_owned())).collect())
        .unwrap_or_default()
}

/// A map as a JSONB object.
pub fn json_map(map: &BTreeMap<String, String>) -> serde_json::Value {
    serde_json::Value::Object(map.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect())
}
