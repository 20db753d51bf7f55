//! `GET .../machines/{id}/ports/{port}/ws`: a TCP connection to a port of
//! a started machine's guest over a WebSocket, made by its broker from
//! inside the microVM network (which neither the client nor the controller
//! has a route into). `mmctl --server ssh | proxy | port-forward` use it,
//! as `fly proxy` and `kubectl port-forward` do theirs.
//!
//! Refusals before the upgrade are problem documents (token, role
//! operator — a connection reaches what exec reaches —, 404, 409 when not
//! started). After it, binary messages whose first byte is the channel:
//! client → controller `0` bytes for the guest, `5` end of them (TCP's
//! half-close); controller → client `1` bytes from the guest, `5` the guest
//! ended its side. Once both sides have ended the controller closes
//! normally (1000). A connection the broker cannot make closes with 4000 +
//! the HTTP status the refusal would have had (4409 no microVM there yet,
//! 4502 nothing listening or the broker failed, 4503 host not connected
//! here), a bad message with 4400, one over 64 KiB with 1009. A client
//! that goes away closes the guest connection. A controller without the
//! host's session forwards the exchange to the one that has it.

use std::sync::Arc;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use uuid::Uuid;

use super::exec::session_error;
use super::exec_stream::{self, CLOSE_NORMAL, CLOSE_TOO_BIG, MAX_MESSAGE, close, framed};
use super::extract::Caller;
use super::problem::{ApiError, Problem};
use super::{AppState, forward};
use crate::auth::Role;
use crate::session::{Hub, Tunnel, TunnelData};

/// The channel bytes.
pub mod channel {
    pub const TO_GUEST: u8 = 0;
    pub const FROM_GUEST: u8 = 1;
    pub const END: u8 = 5;
}

/// Opens a TCP connection to `port` in a started machine's guest and
/// carries it over a WebSocket (see the module documentation of
/// `tunnel.rs`, or the controller's README, for the framing). Operator.
#[utoipa::path(get, operation_id = "machines_connect", path = "/v1/namespaces/{namespace}/machines/{id}/ports/{port}/ws",
    tag = "machines", security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"), ("id" = Uuid, Path),
        ("port" = u16, Path, minimum = 1, maximum = 65535, description = "The guest's TCP port")),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol. Binary messages whose first byte is the \
            channel: 0 bytes for the guest, 5 end of them (client to controller); 1 bytes from the guest, 5 the \
            guest ended its side (controller to client). Close 1000 once both sides ended; 4000 + HTTP status when \
            the connection cannot be made or a message is bad; 1009 for a message over 65537 bytes. Disconnecting \
            closes the guest connection."),
        (status = 400, description = "Not a port number", body = Problem),
        (status = 422, description = "Port 0", body = Problem),
        (status = 403, description = "Not an operator of this namespace", body = Problem),
        (status = 404, body = Problem),
        (status = 409, description = "Not started", body = Problem),
        (status = 426, description = "Not a WebSocket upgrade request", body = Problem)))]
pub async fn connect_ws(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((namespace, id, port)): Path<(String, Uuid, u16)>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    caller.require(&namespace, Role::Operator)?;
    if port == 0 {
        return Err(ApiError::invalid("port 0 is no TCP port to connect to"));
    }
    let host = super::exec::started_host(&state, namespace.clone(), id, "connect to").await?;
    let upgrade = match exec_stream::upgrade_or_426(upgrade) {
        Ok(upgrade) => upgrade,
        Err(response) => return Ok(*response),
    };
    if let Some(peer) = forward::peer_for(&state, &host, &headers).await? {
        let path = format!("/v1/namespaces/{namespace}/machines/{id}/ports/{port}/ws");
        return forward::websocket(&state, &peer, &host, &path, &headers, upgrade, exec_stream::HARD_MAX_MESSAGE).await;
    }
    let hub = state.hub.clone();
    Ok(exec_stream::limited(upgrade).on_upgrade(move |socket| serve(socket, hub, host, id.to_string(), port)))
}

async fn serve(mut socket: WebSocket, hub: Hub, host: String, machine: String, port: u16) {
    match hub.connect(&host, &machine, port).await {
        Ok(tunnel) => pump(socket, tunnel).await,
        Err(e) => {
            let e = session_error(e);
            close(&mut socket, 4000 + e.status.as_u16(), &e.detail).await;
        }
    }
}

/// What a client message means for the guest, or why it is refused.
fn client_data(data: &[u8]) -> Result<TunnelData, (u16, String)> {
    if data.len() > MAX_MESSAGE {
        return Err((CLOSE_TOO_BIG, format!("a message of {} bytes; at most {MAX_MESSAGE}", data.len())));
    }
    match data.split_first() {
        Some((&channel::TO_GUEST, rest)) => Ok(TunnelData::Bytes(rest.to_vec())),
        Some((&channel::END, [])) => Ok(TunnelData::End),
        Some((&channel::END, _)) => Err((4400, "end (channel 5) carries no data".into())),
        Some((other, _)) => Err((4400, format!("channel {other} is not one a client sends (0 or 5)"))),
        None => Err((4400, "an empty message has no channel byte".into())),
    }
}

/// Carries bytes both ways until both sides have ended or either goes.
async fn pump(socket: WebSocket, tunnel: Tunnel) {
    let Tunnel { mut from_guest, to_guest } = tunnel;
    let (mut out, mut incoming) = socket.split();
    let mut to_guest = Some(to_guest);
    let mut guest_ended = false;
    loop {
        if guest_ended && to_guest.is_none() {
            return close(&mut out, CLOSE_NORMAL, "both sides ended").await;
        }
        tokio::select! {
            data = from_guest.recv(), if !guest_ended => {
                let frame = match data {
                    Some(TunnelData::Bytes(bytes)) => framed(channel::FROM_GUEST, &bytes),
                    Some(TunnelData::End) => {
                        guest_ended = true;
                        framed(channel::END, &[])
                    }
                    // The broker let go without an end: the link broke.
                    None => return close(&mut out, 4502, "the connection through the broker broke").await,
                };
                if out.send(frame).await.is_err() {
                    return;
                }
            }
            message = incoming.next() => {
                let data = match message {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Text(_))) => Err((4400, "messages are binary with a channel byte".into())),
                    Some(Ok(Message::Binary(data))) => client_data(&data),
                };
                match data {
                    Ok(data) => {
                        let end = data == TunnelData::End;
                        match &to_guest {
                            Some(sender) => {
                                // A refused send: the broker's side is gone;
                                // its end arrives by `from_guest`.
                                let _ = sender.send(data).await;
                            }
                            None => return close(&mut out, 4400, "bytes after the end (channel 5)").await,
                        }
                        if end {
                            to_guest = None;
                        }
                    }
                    Err((code, reason)) => return close(&mut out, code, &reason).await,
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
        assert_eq!(client_data(&[0, b'h', b'i']), Ok(TunnelData::Bytes(b"hi".to_vec())));
        assert_eq!(client_data(&[0]), Ok(TunnelData::Bytes(Vec::new())));
        assert_eq!(client_data(&[5]), Ok(TunnelData::End));
        for bad in [&b""[..], &[1, 0], &[5, 1], &[4]] {
            assert_eq!(client_data(bad).err().map(|(code, _)| code), Some(4400), "{bad:?}");
        }
        assert_eq!(client_data(&vec![0; MAX_MESSAGE + 1]).err().map(|(code, _)| code), Some(CLOSE_TOO_BIG));
    }
}
