//! `POST /v1/namespaces/{namespace}/machines/{id}/branch`: a new machine
//! whose microVM is a live copy of a running machine's. It answers like a
//! create (201, or 200 when replayed by `Idempotency-Key`) and the branch
//! then lives like any machine; it is kept apart from `machines` because
//! its rules (the source must be started, same host only, a key digest
//! that names the source) are its own. The store side is
//! `store::fork::branch`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use uuid::Uuid;

use super::extract::{Caller, IdempotencyKey};
use super::machines::{Machine, created_response};
use super::problem::{ApiError, Problem};
use super::{AppState, validate};
use crate::auth::Role;
use crate::store::fork as store;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BranchMachine {
    /// The branch's name, unique among the namespace's machines that are
    /// not destroyed; by default the machine's name with `-branch`, then
    /// `-branch-2`, `-branch-3`, … whichever is free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub name: Option<String>,
}

/// Makes a branch of a started machine: a NEW machine whose microVM its
/// host's broker makes as a live copy of this one's (`Vm.branch`: memory,
/// processes and disk at one instant, the source paused only for the cut
/// and running on), with an identity of its own (address, MAC, hostname,
/// SSH host key). It is placed on the same host and nowhere else (409
/// `insufficient-capacity` when that host cannot take it), and has the
/// source's config, labels and placement; it answers 201 in `created` and
/// is then started like any machine (`.../wait`), and stopped, snapshotted
/// or deleted like any. 409 `invalid-state` unless the machine is
/// `started`. With an `Idempotency-Key` (shared with creates), the same
/// request again answers 200 with the same branch.
#[utoipa::path(post, operation_id = "machines_branch", path = "/v1/namespaces/{namespace}/machines/{id}/branch", tag = "machines",
    security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"), ("id" = Uuid, Path),
        ("Idempotency-Key" = Option<String>, Header, pattern = "^[!-~]{1,255}$",
            description = "Makes retries of this branch safe")),
    request_body = BranchMachine,
    responses((status = 201, body = Machine), (status = 200, description = "Replayed by Idempotency-Key", body = Machine),
        (status = 403, description = "A role too small, or the namespace's quota would be exceeded (quota-exceeded, naming the limit)", body = Problem),
        (status = 404, body = Problem),
        (status = 409, description = "Not started (invalid-state), name taken, or its host cannot take the branch (insufficient-capacity)", body = Problem)))]
pub async fn branch(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((namespace, id)): Path<(String, Uuid)>,
    IdempotencyKey(key): IdempotencyKey,
    Json(body): Json<BranchMachine>,
) -> Result<Response, ApiError> {
    caller.require(&namespace, Role::Operator)?;
    if let Some(name) = &body.name {
        validate::name("machine name", name)?;
    }
    // The key is shared with creates; the digest says what it was for.
    let idempotency = key.map(|key| {
        let canonical = serde_json::to_vec(&body).expect("a parsed request serialises");
        (key, format!("{:x}", Sha256::digest([format!("branch {id} ").as_bytes(), &canonical].concat())))
    });
    let request = store::Branch { namespace, source: id, name: body.name, idempotency };
    let created = state.db.run(move |c| store::branch(c, request)).await?;
    created_response(&state, created)
}
