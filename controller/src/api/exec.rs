//! `.../machines/{id}/exec` and `.../logs`: through the controller to the
//! machine's broker (its session, see `session`) and into the guest. The
//! WebSocket exec is `exec_stream`.
//!
//! Both go through the session of the machine's host's broker. With
//! several controllers, one without that session forwards the request to
//! the one that has it (`forward`); when none can be found or reached,
//! they answer 503 with `Retry-After`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::extract::Caller;
use super::problem::{ApiError, Problem};
use super::{AppState, forward, validate};
use crate::auth::Role;
use crate::machine::MachineState;
use crate::session::{Chunk, ExecRequest, SessionError};
use crate::store::machines as store;

/// Bytes of stdout and of stderr an exec returns at most (each).
const MAX_EXEC_OUTPUT: usize = 1024 * 1024;
/// Bytes of the console log returned at most (its end).
const MAX_LOG_BYTES: usize = 4 * 1024 * 1024;

/// A command to run in the machine, without a terminal. (Serialize: to
/// forward it to another controller.)
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Exec {
    /// argv: the program and its arguments.
    #[schema(schema_with = super::document::exec_command_schema)]
    pub command: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    #[schema(schema_with = super::document::env_schema)]
    pub env: BTreeMap<String, String>,
    /// Written to the command's standard input, which is then closed. At
    /// most 65536 bytes, and the whole request must fit the controller's
    /// body limit (`--max-body-bytes`, 64 KiB by default): more input is
    /// for the WebSocket exec, which streams it.
    #[serde(default)]
    #[schema(max_length = 65536)]
    pub stdin: String,
    /// Seconds, 1 to 300 (default 30); then the command is killed and the
    /// answer is 408.
    #[serde(default, deserialize_with = "super::integer::optional", skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 300)]
    pub timeout: Option<u64>,
}

/// How the command ended and what it printed (UTF-8, invalid bytes
/// replaced; at most 1 MiB of each stream).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ExecResult {
    /// The exit status, if it exited.
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    pub exit_signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// Output beyond 1 MiB per stream was dropped.
    pub truncated: bool,
}

/// The problem for a failure on the way to the guest.
pub(super) fn session_error(e: SessionError) -> ApiError {
    let detail = e.to_string();
    match e {
        SessionError::NotConnected(_) | SessionError::Disabled => {
            let mut error = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "host-unavailable", detail);
            error.retry_after = Some(5);
            error
        }
        SessionError::Broker { kind, .. } => match kind.as_str() {
            // No microVM (yet), or the guest's agent not answering (yet).
            "not-found" | "conflict" | "no-memory" => ApiError::new(StatusCode::CONFLICT, "invalid-state", detail),
            "invalid" => ApiError::invalid(detail),
            _ => ApiError::new(StatusCode::BAD_GATEWAY, "broker-error", detail),
        },
        SessionError::Link(_) => ApiError::new(StatusCode::BAD_GATEWAY, "broker-error", detail),
        SessionError::Timeout(_) => ApiError::new(StatusCode::REQUEST_TIMEOUT, "exec-timeout", detail),
    }
}

/// The host of a machine that can take an exec or a connection: 409
/// unless it is started. Both exec forms (this whole-answer one and the
/// WebSocket) and the port tunnel ask here; `what` is the verb phrase
/// for the refusal ("exec in").
pub(super) async fn started_host(
    state: &AppState,
    namespace: String,
    id: Uuid,
    what: &str,
) -> Result<String, ApiError> {
    let row = state.db.run(move |c| store::get(c, &namespace, id)).await?;
    if row.state != MachineState::Started.as_str() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid-state",
            format!("cannot {what} a machine that is {}: it must be started", row.state),
        ));
    }
    Ok(row.host_name.unwrap_or_default())
}

/// Runs a command in a started machine and answers with its exit status
/// and output once it ends. 409 while the machine is not started (or its
/// guest is still booting), 408 when the timeout passes (the command is
/// killed), 503 when no controller can reach its host's broker (one
/// without the broker's session forwards to the one holding it).
#[utoipa::path(post, operation_id = "machines_exec", path = "/v1/namespaces/{namespace}/machines/{id}/exec", tag = "machines",
    security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"), ("id" = Uuid, Path)),
    request_body = Exec,
    responses((status = 200, body = ExecResult), (status = 404, body = Problem),
        (status = 408, description = "The command ran out of time and was killed", body = Problem),
        (status = 409, description = "Not started, or the guest is not ready", body = Problem),
        (status = 502, description = "The broker failed", body = Problem)))]
pub async fn exec(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((namespace, id)): Path<(String, Uuid)>,
    headers: HeaderMap,
    Json(body): Json<Exec>,
) -> Result<Response, ApiError> {
    caller.require(&namespace, Role::Operator)?;
    if body.command.is_empty() {
        return Err(ApiError::invalid("command must name a program"));
    }
    validate::command("command", &body.command)?;
    validate::env(&body.env)?;
    if body.stdin.len() > 65536 {
        return Err(ApiError::invalid("stdin is at most 65536 bytes"));
    }
    let timeout = body.timeout.unwrap_or(30);
    if !(1..=300).contains(&timeout) {
        return Err(ApiError::invalid("timeout must be 1 to 300 seconds"));
    }
    let host = started_host(&state, namespace.clone(), id, "exec in").await?;
    if let Some(peer) = forward::peer_for(&state, &host, &headers).await? {
        let path = format!("/v1/namespaces/{namespace}/machines/{id}/exec");
        let body = serde_json::to_vec(&body).expect("a plain struct serializes");
        return forward::http(&state, &peer, &host, Method::POST, &path, &headers, Some(body)).await;
    }
    let request = ExecRequest {
        argv: body.command,
        env: body.env.into_iter().collect(),
        stdin: body.stdin.into_bytes(),
        timeout: Duration::from_secs(timeout),
        max_output: MAX_EXEC_OUTPUT,
    };
    let output = state.hub.exec(&host, &id.to_string(), request).await.map_err(session_error)?;
    Ok(Json(ExecResult {
        exit_code: output.exit_code,
        exit_signal: output.signal,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        truncated: output.truncated,
    })
    .into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Stream: the whole console, then new output as it is written, until
    /// the microVM stops (or the client goes away).
    #[serde(default)]
    pub follow: bool,
}

/// The machine's console log as text (its last 4 MiB), from its host; with
/// `follow=true` a chunked stream of all of it that goes on until the
/// microVM stops (the connection is cut, not ended, if the link to the
/// broker breaks, so a client can tell). 409 if the machine has no microVM
/// there.
#[utoipa::path(get, operation_id = "machines_logs", path = "/v1/namespaces/{namespace}/machines/{id}/logs", tag = "machines",
    security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"), ("id" = Uuid, Path), LogsQuery),
    responses((status = 200, description = "The console log (streamed with follow=true)", content_type = "text/plain; charset=utf-8", body = String),
        (status = 404, body = Problem),
        (status = 409, description = "No microVM on its host", body = Problem),
        (status = 502, description = "The broker failed", body = Problem)))]
pub async fn logs(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((namespace, id)): Path<(String, Uuid)>,
    Query(query): Query<LogsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    caller.require(&namespace, Role::Viewer)?;
    let ns = namespace.clone();
    let row = state.db.run(move |c| store::get(c, &ns, id)).await?;
    let state_now: MachineState =
        row.state.parse().map_err(|e| ApiError::from(crate::store::StoreError::Corrupt(e)))?;
    if matches!(state_now, MachineState::Created | MachineState::Destroyed) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid-state",
            format!("a machine that is {state_now} has no console log"),
        ));
    }
    let host = row.host_name.unwrap_or_default();
    if let Some(peer) = forward::peer_for(&state, &host, &headers).await? {
        let path = format!("/v1/namespaces/{namespace}/machines/{id}/logs?follow={}", query.follow);
        return forward::http(&state, &peer, &host, Method::GET, &path, &headers, None).await;
    }
    if query.follow {
        let chunks = state.hub.follow_logs(&host, &id.to_string()).await.map_err(session_error)?;
        return Ok(follow_response(chunks, state.shutting_down.subscribe()));
    }
    let log = state.hub.logs(&host, &id.to_string(), MAX_LOG_BYTES).await.map_err(session_error)?;
    let text = String::from_utf8_lossy(&log).into_owned();
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

/// A chunked text body of `chunks`, ending with them (or, cleanly, at the
/// controller's shutdown, which must not wait for a microVM to stop). A
/// link failure aborts the body: the client sees a broken transfer, not a
/// log that merely ended. Dropped with the client's connection, which
/// drops `chunks` and so stops the follow on the broker.
fn follow_response(chunks: mpsc::Receiver<Chunk>, shutdown: watch::Receiver<bool>) -> Response {
    let body = futures::stream::unfold((chunks, shutdown), |(mut chunks, mut shutdown)| async move {
        let next = tokio::select! {
            next = chunks.recv() => next?,
            _ = shutdown.wait_for(|down| *down) => return None,
        };
        Some((next.map(Bytes::from), (chunks, shutdown)))
    });
    (
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}
