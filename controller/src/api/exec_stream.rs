//! `GET .../machines/{id}/exec/ws`: an interactive exec over a WebSocket,
//! streamed controller → broker (`Vm.exec`) → guest, in the spirit of
//! Kubernetes' channel protocol.
//!
//! Everything that can be refused before the command exists is refused
//! before the upgrade, as a problem document: the token, the role
//! (operator), the namespace and machine (404), a machine not `started`
//! (409). After the upgrade:
//!
//! 1. The client's first message (text or binary) is the request, JSON
//!    ([`ExecStreamRequest`]), within 10 s.
//! 2. Then binary messages whose first byte is the channel:
//!    client → controller `0` stdin data, `4` resize (JSON
//!    `{"rows":R,"cols":C}`), `5` close stdin (no data);
//!    controller → client `1` stdout data, `2` stderr data, `3` status
//!    (JSON [`ExecStatus`], the last message before the close).
//! 3. The command ends: status `{"exit_code": N}` or `{"exit_signal": N}`,
//!    then a normal close (1000). A refusal or failure: status
//!    `{"error", "kind"}`, then close code 4000 + the HTTP status the POST
//!    exec would have answered (4400 bad message, 4408 no request in time,
//!    4409 guest not ready, 4502 broker error, 4503 host not connected
//!    here), 1009 for a message over 64 KiB, 1011 when the link to the
//!    broker broke.
//!
//! A controller without the host's session forwards the whole exchange to
//! the one that has it (`forward`), close codes included.
//!
//! A client that goes away (or closes) before the command ends has it
//! killed: dropping the stream's input channel makes the session thread
//! send SIGKILL and drop the broker's session.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use mm_protocols::exec_end::ExecEnd;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::exec::session_error;
use super::extract::Caller;
use super::problem::{ApiError, Problem};
use super::{AppState, forward, validate};
use crate::auth::Role;
use crate::session::{ExecEvent, ExecInput, ExecStart, ExecStream, Hub};

/// The channel bytes (first byte of each binary message after the request).
pub mod channel {
    pub const STDIN: u8 = 0;
    pub const STDOUT: u8 = 1;
    pub const STDERR: u8 = 2;
    pub const STATUS: u8 = 3;
    pub const RESIZE: u8 = 4;
    pub const CLOSE_STDIN: u8 = 5;
}

/// The longest message a client may send (the channel byte included).
pub const MAX_MESSAGE: usize = 64 * 1024 + 1;
/// What tungstenite itself accepts before it drops the connection without
/// a word; below it, [`MAX_MESSAGE`] is enforced here with a clear reason.
pub(super) const HARD_MAX_MESSAGE: usize = 1024 * 1024;
/// How long the client has for its first message.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Close codes besides 4000 + HTTP status.
pub(super) const CLOSE_NORMAL: u16 = 1000;
pub(super) const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_INTERNAL: u16 = 1011;

/// The first message: what to run.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecStreamRequest {
    /// argv: the program and its arguments.
    #[schema(min_items = 1, max_items = 256)]
    pub command: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    #[schema(schema_with = super::document::env_schema)]
    pub env: BTreeMap<String, String>,
    /// Run it on a terminal (stderr then arrives on stdout's channel).
    #[serde(default)]
    pub tty: bool,
    /// The terminal's size (default 24 × 80).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub rows: Option<u16>,
    #[serde(default)]
    #[schema(minimum = 1)]
    pub cols: Option<u16>,
    /// The working directory (default `/`).
    #[serde(default)]
    #[schema(max_length = 4096)]
    pub workdir: Option<String>,
    /// The user to run as (default root).
    #[serde(default)]
    #[schema(max_length = 255)]
    pub user: Option<String>,
}

/// Channel 3, the last message: how the command ended, or why it could not
/// run or went on no longer.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct ExecStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_signal: Option<i32>,
    /// Why there is no exit status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The problem kind of `error` (as in problem documents' `type`,
    /// without the `urn:micromachines:problem:` prefix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// Channel 4.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Resize {
    rows: u16,
    cols: u16,
}

/// Streams a command in a started machine over a WebSocket: stdin in,
/// stdout and stderr out as they are produced, then its exit status (see
/// the module documentation of `exec_stream.rs`, or the controller's
/// README, for the framing). Operator, like `POST .../exec`.
#[utoipa::path(get, operation_id = "machines_exec_stream", path = "/v1/namespaces/{namespace}/machines/{id}/exec/ws",
    tag = "machines", security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"), ("id" = Uuid, Path)),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol. First client message: the request \
            (JSON, ExecStreamRequest). Then binary messages whose first byte is the channel: 0 stdin, 4 resize \
            (JSON {\"rows\",\"cols\"}), 5 close stdin (client to controller); 1 stdout, 2 stderr, 3 status (JSON \
            ExecStatus, last) (controller to client). Close 1000 after the status of an ended command; 4000 + HTTP \
            status for a refusal after the upgrade; 1009 for a message over 65537 bytes; 1011 when the broker's \
            link broke. Disconnecting kills the command."),
        (status = 403, description = "Not an operator of this namespace", body = Problem),
        (status = 404, body = Problem),
        (status = 409, description = "Not started", body = Problem),
        (status = 426, description = "Not a WebSocket upgrade request", body = Problem)))]
pub async fn exec_ws(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((namespace, id)): Path<(String, Uuid)>,
    headers: HeaderMap,
    // Checked after the caller, role and machine, so that a plain GET (or
    // a bad token) learns the same as with any other route.
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    caller.require(&namespace, Role::Operator)?;
    let host = super::exec::started_host(&state, namespace.clone(), id, "exec in").await?;
    let upgrade = match upgrade_or_426(upgrade) {
        Ok(upgrade) => upgrade,
        Err(response) => return Ok(*response),
    };
    if let Some(peer) = forward::peer_for(&state, &host, &headers).await? {
        let path = format!("/v1/namespaces/{namespace}/machines/{id}/exec/ws");
        return forward::websocket(&state, &peer, &host, &path, &headers, upgrade, HARD_MAX_MESSAGE).await;
    }
    let hub = state.hub.clone();
    Ok(limited(upgrade).on_upgrade(move |socket| serve(socket, hub, host, id.to_string())))
}

/// The upgrade, or 426 with the headers that say which protocol to use.
pub(super) fn upgrade_or_426(
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<WebSocketUpgrade, Box<Response>> {
    upgrade.map_err(|rejection| {
        let detail = format!("this route speaks WebSocket only: {}", rejection.body_text());
        let mut response = ApiError::new(StatusCode::UPGRADE_REQUIRED, "upgrade-required", detail).into_response();
        response.headers_mut().insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        Box::new(response)
    })
}

/// The upgrade with tungstenite's own limits above [`MAX_MESSAGE`], so a
/// longer message gets a clear close rather than a dropped connection.
pub(super) fn limited(upgrade: WebSocketUpgrade) -> WebSocketUpgrade {
    upgrade.max_message_size(HARD_MAX_MESSAGE).max_frame_size(HARD_MAX_MESSAGE)
}

/// A refusal or failure to tell the client: its status frame and close code.
struct Refusal {
    code: u16,
    kind: String,
    detail: String,
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Refusal {
        Refusal { code: 4000 + e.status.as_u16(), kind: e.kind.to_owned(), detail: e.detail }
    }
}

impl Refusal {
    fn bad(detail: impl Into<String>) -> Refusal {
        ApiError::bad_request(detail).into()
    }

    fn too_big(len: usize) -> Refusal {
        Refusal {
            code: CLOSE_TOO_BIG,
            kind: "payload-too-large".into(),
            detail: format!("a message of {len} bytes; at most {MAX_MESSAGE} (the channel byte included)"),
        }
    }
}

fn status_message(status: &ExecStatus) -> Message {
    framed(channel::STATUS, &serde_json::to_vec(status).expect("a plain struct serializes"))
}

/// A binary message: the channel byte, then `data` (also the port
/// tunnel's framing).
pub(super) fn framed(channel: u8, data: &[u8]) -> Message {
    let mut frame = Vec::with_capacity(data.len() + 1);
    frame.push(channel);
    frame.extend_from_slice(data);
    Message::Binary(frame.into())
}

/// The close reason: at most 123 bytes (the frame's limit), cut at a char.
pub(super) fn close_reason(text: &str) -> String {
    let mut end = text.len().min(123);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

pub(super) async fn close<S>(sink: &mut S, code: u16, reason: &str)
where
    S: futures::Sink<Message> + Unpin,
{
    let frame = CloseFrame { code, reason: close_reason(reason).into() };
    let _ = sink.send(Message::Close(Some(frame))).await;
    let _ = sink.close().await;
}

async fn refuse<S>(sink: &mut S, refusal: Refusal)
where
    S: futures::Sink<Message> + Unpin,
{
    let status = ExecStatus { error: Some(refusal.detail.clone()), kind: Some(refusal.kind), ..Default::default() };
    let _ = sink.send(status_message(&status)).await;
    close(sink, refusal.code, &refusal.detail).await;
}

/// Reads and checks the first message.
async fn read_request(socket: &mut WebSocket) -> Result<Option<ExecStart>, Refusal> {
    let data = loop {
        let message = match tokio::time::timeout(REQUEST_TIMEOUT, socket.recv()).await {
            Err(_) => {
                let detail = format!("no request within {} s", REQUEST_TIMEOUT.as_secs());
                return Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "request-timeout", detail).into());
            }
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return Ok(None),
            Ok(Some(Ok(message))) => message,
        };
        match message {
            Message::Text(text) => break text.as_bytes().to_vec(),
            Message::Binary(data) => break data.to_vec(),
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Close(_) => return Ok(None),
        }
    };
    if data.len() > MAX_MESSAGE {
        return Err(Refusal::too_big(data.len()));
    }
    let request: ExecStreamRequest = serde_json::from_slice(&data)
        .map_err(|e| Refusal::bad(format!("the first message must be the exec request as JSON: {e}")))?;
    if request.command.is_empty() {
        return Err(ApiError::invalid("command must name a program").into());
    }
    validate::command("command", &request.command)?;
    validate::env(&request.env)?;
    if request.rows == Some(0) || request.cols == Some(0) {
        return Err(ApiError::invalid("rows and cols are at least 1").into());
    }
    for (what, value, max) in [("workdir", &request.workdir, 4096), ("user", &request.user, 255)] {
        if let Some(value) = value {
            validate::text(what, value, 1, max)?;
        }
    }
    Ok(Some(ExecStart {
        argv: request.command,
        env: request.env.into_iter().collect(),
        tty: request.tty,
        rows: request.rows.unwrap_or(24),
        cols: request.cols.unwrap_or(80),
        cwd: request.workdir.unwrap_or_default(),
        user: request.user.unwrap_or_default(),
    }))
}

async fn serve(mut socket: WebSocket, hub: Hub, host: String, machine: String) {
    let start = match read_request(&mut socket).await {
        Ok(Some(start)) => start,
        Ok(None) => return,
        Err(refusal) => return refuse(&mut socket, refusal).await,
    };
    let stream = match hub.exec_stream(&host, &machine, start).await {
        Ok(stream) => stream,
        Err(e) => return refuse(&mut socket, session_error(e).into()).await,
    };
    pump(socket, stream).await;
    // Dropping `stream` here (its `inputs`) kills a command still running.
}

/// What the client sent, turned into the command's input.
fn client_input(data: &[u8]) -> Result<ExecInput, Refusal> {
    if data.len() > MAX_MESSAGE {
        return Err(Refusal::too_big(data.len()));
    }
    match data.split_first() {
        Some((&channel::STDIN, rest)) => Ok(ExecInput::Stdin(rest.to_vec())),
        Some((&channel::CLOSE_STDIN, [])) => Ok(ExecInput::CloseStdin),
        Some((&channel::RESIZE, rest)) => {
            let size: Resize = serde_json::from_slice(rest)
                .map_err(|e| Refusal::bad(format!("a resize is JSON {{\"rows\":R,\"cols\":C}}: {e}")))?;
            if size.rows == 0 || size.cols == 0 {
                return Err(Refusal::bad("rows and cols are at least 1"));
            }
            Ok(ExecInput::Resize { rows: size.rows, cols: size.cols })
        }
        Some((&channel::CLOSE_STDIN, _)) => Err(Refusal::bad("close stdin (channel 5) carries no data")),
        Some((other, _)) => Err(Refusal::bad(format!("channel {other} is not one a client sends (0, 4 or 5)"))),
        None => Err(Refusal::bad("an empty message has no channel byte")),
    }
}

/// Passes output out and input in until the command ends or either side
/// goes away.
async fn pump(socket: WebSocket, mut stream: ExecStream) {
    let (mut out, mut incoming) = socket.split();
    loop {
        tokio::select! {
            event = stream.events.recv() => {
                let (channel, data) = match event {
                    Some(ExecEvent::Stdout(data)) => (channel::STDOUT, data),
                    Some(ExecEvent::Stderr(data)) => (channel::STDERR, data),
                    Some(ExecEvent::End(end)) => {
                        let status = match end {
                            ExecEnd::Code(code) => ExecStatus { exit_code: Some(code), ..Default::default() },
                            ExecEnd::Signal(signal) => ExecStatus { exit_signal: Some(signal), ..Default::default() },
                            ExecEnd::Error(error) => {
                                let refusal = Refusal { code: 4422, kind: "exec-failed".into(), detail: error };
                                return refuse(&mut out, refusal).await;
                            }
                        };
                        let _ = out.send(status_message(&status)).await;
                        return close(&mut out, CLOSE_NORMAL, "the command ended").await;
                    }
                    None => {
                        let detail = "the connection to the broker broke before the command ended".to_owned();
                        let refusal = Refusal { code: CLOSE_INTERNAL, kind: "broker-error".into(), detail };
                        return refuse(&mut out, refusal).await;
                    }
                };
                if out.send(framed(channel, &data)).await.is_err() {
                    return;
                }
            }
            message = incoming.next() => {
                let input = match message {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Text(_))) => Err(Refusal::bad("after the request, messages are binary with a channel byte")),
                    Some(Ok(Message::Binary(data))) => client_input(&data),
                };
                match input {
                    Ok(input) => {
                        if stream.inputs.send(input).await.is_err() {
                            // The session task ended: the command's end or
                            // the link's failure is on its way by `events`.
                            continue;
                        }
                    }
                    Err(refusal) => return refuse(&mut out, refusal).await,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames() {
        assert!(matches!(client_input(&[0, b'h', b'i']), Ok(ExecInput::Stdin(d)) if d == b"hi"));
        assert!(matches!(client_input(&[5]), Ok(ExecInput::CloseStdin)));
        assert!(matches!(client_input(b"\x04{\"rows\":5,\"cols\":7}"), Ok(ExecInput::Resize { rows: 5, cols: 7 })));
        for bad in [&b""[..], &[1, 0], &[3], &[5, 1], b"\x04{\"rows\":0,\"cols\":7}", b"\x04{}"] {
            assert_eq!(client_input(bad).err().map(|r| r.code), Some(4400), "{bad:?}");
        }
        assert_eq!(client_input(&vec![0; MAX_MESSAGE + 1]).err().map(|r| r.code), Some(CLOSE_TOO_BIG));
    }

    #[test]
    fn close_reasons_fit_a_frame() {
        assert_eq!(close_reason("short"), "short");
        let long = "é".repeat(100);
        let cut = close_reason(&long);
        assert!(cut.len() <= 123 && long.starts_with(&cut));
    }
}
