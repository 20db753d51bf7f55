//! Exec, logs, stats and snapshots through any controller: forwarding to
//! the one that holds the host's broker session.
//!
//! Only the controller a broker dialled holds its capability, so with
//! several controllers behind a load balancer exec and logs would work
//! only for the requests that happen to land there. Instead, each
//! controller records its `--advertise-url` in the hosts row of every
//! session it holds (`store::hosts::claim_session`), and a controller
//! without the session forwards the request there: with the caller's own
//! `Authorization` (the peer checks the token, role and machine itself,
//! so forwarding grants nothing), the request's id, and [`FORWARDED`],
//! which makes the peer serve or refuse but never forward again (no loops,
//! however stale the rows). Its answer comes back as it is: a streamed
//! body is streamed through, a WebSocket is pumped both ways with its
//! close code.
//!
//! The peer's URL only ever comes from the database, written by
//! controllers themselves; the path is rebuilt from the route's checked
//! parameters. Nothing in a request decides where it is forwarded.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, protocol::WebSocketConfig};

use super::AppState;
use super::problem::{ApiError, REQUEST_ID, current_request_id};
use crate::store::hosts;

/// Marks a forwarded request (its value: the forwarding controller's
/// URL, for the peer's log). A request carrying it is never forwarded.
pub const FORWARDED: &str = "x-mm-forwarded-by";
/// How long reaching a peer may take before it counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Seconds a client is told to wait when the peer cannot be reached (a
/// broker whose controller died dials another within 30 s).
const RETRY_AFTER: u64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("--advertise-url {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot build the HTTP client for forwarding: {0}")]
    Client(#[from] reqwest::Error),
}

/// Checks an advertised URL (`http(s)://host[:port]`, nothing after it)
/// and returns it without a trailing slash, as peers will join paths to it.
pub fn advertise_url(url: &str) -> Result<String, ForwardError> {
    let bad = |reason: &str| ForwardError::BadUrl { url: url.to_owned(), reason: reason.to_owned() };
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad("the scheme must be http or https"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("it must name a host"));
    }
    if parsed.path() != "/" || parsed.query().is_some() || parsed.fragment().is_some() || !parsed.username().is_empty()
    {
        return Err(bad("only a scheme, a host and a port: the API's paths are appended to it"));
    }
    Ok(parsed.as_str().trim_end_matches('/').to_owned())
}

/// This controller's URL and the client it forwards with.
pub struct Peers {
    own: Option<String>,
    http: reqwest::Client,
}

impl Peers {
    pub fn new(own: Option<String>) -> Result<Peers, ForwardError> {
        // No redirects: the caller's token goes to the recorded peer and
        // nowhere else. No overall timeout: follows last as long as the
        // microVM, and the peer bounds an exec itself.
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Peers { own, http })
    }

    fn marker(&self) -> HeaderValue {
        self.own.as_deref().and_then(|url| HeaderValue::from_str(url).ok()).unwrap_or(HeaderValue::from_static("1"))
    }
}

/// The controller to forward a request about `host` to, if any: not when
/// this controller holds the host's session, not when the request was
/// forwarded already, and not when no other controller recorded one.
/// Then the request is served here (and answers 503 without a session).
pub(super) async fn peer_for(state: &AppState, host: &str, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    if host.is_empty() || headers.contains_key(FORWARDED) || state.hub.is_connected(host).await {
        return Ok(None);
    }
    let name = host.to_owned();
    let url = state.db.run(move |c| hosts::session_controller(c, &name)).await?;
    Ok(url.filter(|url| Some(url) != state.peers.own.as_ref()))
}

/// 503 naming the peer that could not be reached.
fn unreachable(peer: &str, host: &str, error: &dyn std::error::Error) -> ApiError {
    let mut cause = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        cause = format!("{cause}: {e}");
        source = e.source();
    }
    let detail = format!("host {host:?}'s broker is connected to controller {peer}, which cannot be reached: {cause}");
    tracing::warn!("{detail}");
    let mut error = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "host-unavailable", detail);
    error.retry_after = Some(RETRY_AFTER);
    error
}

/// The headers a forwarded request carries: the caller's credentials, the
/// request id (so both controllers log it under one id), the marker, and
/// an `Idempotency-Key` (a snapshot create's: the peer keeps it).
fn forwarded_headers(state: &AppState, headers: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = vec![(HeaderName::from_static(FORWARDED), state.peers.marker())];
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        out.push((header::AUTHORIZATION, auth.clone()));
    }
    if let Some(key) = headers.get(super::extract::IDEMPOTENCY_KEY) {
        out.push((HeaderName::from_static(super::extract::IDEMPOTENCY_KEY), key.clone()));
    }
    if let Some(id) = current_request_id().and_then(|id| HeaderValue::from_str(&id).ok()) {
        out.push((HeaderName::from_static(REQUEST_ID), id));
    }
    out
}

/// Headers of one hop that must not be copied onto the next.
fn hop_by_hop(name: &HeaderName) -> bool {
    [
        header::CONNECTION,
        header::CONTENT_LENGTH,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ]
    .contains(name)
        || name.as_str() == "keep-alive"
}

/// A forwarded exec or logs request: `path` (with its query) on `peer`,
/// `body` as JSON. Its answer is returned as it is, the body streamed
/// through as it arrives (a follow goes on until the peer ends it, the
/// client goes away or this controller shuts down; a broken transfer from
/// the peer breaks this one too, so the client can tell).
pub(super) async fn http(
    state: &AppState,
    peer: &str,
    host: &str,
    method: Method,
    path: &str,
    headers: &HeaderMap,
    body: Option<Vec<u8>>,
) -> Result<Response, ApiError> {
    let mut request = state.peers.http.request(method, format!("{peer}{path}"));
    for (name, value) in forwarded_headers(state, headers) {
        request = request.header(name, value);
    }
    if let Some(body) = body {
        request = request.header(header::CONTENT_TYPE, "application/json").body(body);
    }
    let answer = request.send().await.map_err(|e| unreachable(peer, host, &e.without_url()))?;
    let mut response = Response::builder().status(answer.status());
    for (name, value) in answer.headers() {
        if !hop_by_hop(name) {
            response = response.header(name, value);
        }
    }
    let shutdown = state.shutting_down.subscribe();
    let chunks = futures::stream::unfold(Some((answer, shutdown)), |next| async move {
        let (mut answer, mut shutdown) = next?;
        let chunk = tokio::select! {
            chunk = answer.chunk() => chunk,
            _ = shutdown.wait_for(|down| *down) => return None,
        };
        match chunk {
            Ok(Some(chunk)) => Some((Ok::<Bytes, reqwest::Error>(chunk), Some((answer, shutdown)))),
            Ok(None) => None,
            Err(e) => Some((Err(e), None)),
        }
    });
    Ok(response.body(Body::from_stream(chunks)).unwrap_or_else(|e| {
        ApiError::new(StatusCode::BAD_GATEWAY, "broker-error", format!("controller {peer} answered oddly: {e}"))
            .into_response()
    }))
}

type PeerSocket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A forwarded WebSocket exec: opens `path` on `peer` first, so that a
/// refusal there (a problem document) is the client's answer as it is;
/// once the peer has upgraded, upgrades the client and pumps messages
/// between the two until either ends.
pub(super) async fn websocket(
    state: &AppState,
    peer: &str,
    host: &str,
    path: &str,
    headers: &HeaderMap,
    upgrade: WebSocketUpgrade,
    max_message: usize,
) -> Result<Response, ApiError> {
    let url = match peer.split_once("://") {
        Some(("https", rest)) => format!("wss://{rest}{path}"),
        Some((_, rest)) => format!("ws://{rest}{path}"),
        None => format!("ws://{peer}{path}"),
    };
    let mut request = url.into_client_request().map_err(|e| unreachable(peer, host, &e))?;
    request.headers_mut().extend(forwarded_headers(state, headers));
    let config = WebSocketConfig::default().max_message_size(Some(max_message)).max_frame_size(Some(max_message));
    let connect = tokio_tungstenite::connect_async_with_config(request, Some(config), true);
    let socket = match tokio::time::timeout(CONNECT_TIMEOUT * 2, connect).await {
        Ok(Ok((socket, _))) => socket,
        Ok(Err(tungstenite::Error::Http(refused))) => {
            let (parts, body) = refused.into_parts();
            let mut response = Response::builder().status(parts.status);
            for (name, value) in &parts.headers {
                if !hop_by_hop(name) {
                    response = response.header(name, value);
                }
            }
            return Ok(response.body(Body::from(body.unwrap_or_default())).unwrap_or_else(|_| {
                ApiError::new(parts.status, "broker-error", format!("controller {peer} refused")).into_response()
            }));
        }
        Ok(Err(e)) => return Err(unreachable(peer, host, &e)),
        Err(_) => {
            let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "no WebSocket upgrade in time");
            return Err(unreachable(peer, host, &e));
        }
    };
    let peer = peer.to_owned();
    Ok(upgrade
        .max_message_size(max_message)
        .max_frame_size(max_message)
        .on_upgrade(move |client| pump(client, socket, peer)))
}

/// Passes messages both ways. The peer's close (code and reason) goes to
/// the client as it is; a client that goes away or closes has the peer's
/// socket closed too, which kills a command still running there.
async fn pump(client: WebSocket, peer: PeerSocket, peer_url: String) {
    let (mut to_client, mut from_client) = client.split();
    let (mut to_peer, mut from_peer) = peer.split();
    loop {
        tokio::select! {
            message = from_client.next() => {
                let message = match message {
                    Some(Ok(Message::Text(text))) => tungstenite::Message::text(text.as_str()),
                    Some(Ok(Message::Binary(data))) => tungstenite::Message::Binary(data),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(frame))) => tungstenite::Message::Close(frame.map(|f| {
                        tungstenite::protocol::CloseFrame { code: f.code.into(), reason: f.reason.as_str().into() }
                    })),
                    None | Some(Err(_)) => break,
                };
                let closing = matches!(message, tungstenite::Message::Close(_));
                if to_peer.send(message).await.is_err() || closing {
                    break;
                }
            }
            message = from_peer.next() => {
                let message = match message {
                    Some(Ok(tungstenite::Message::Text(text))) => Message::Text(text.as_str().into()),
                    Some(Ok(tungstenite::Message::Binary(data))) => Message::Binary(data),
                    Some(Ok(tungstenite::Message::Close(frame))) => {
                        let frame = frame.map(|f| CloseFrame { code: f.code.into(), reason: f.reason.as_str().into() });
                        let _ = to_client.send(Message::Close(frame)).await;
                        let _ = to_client.close().await;
                        return;
                    }
                    Some(Ok(_)) => continue,
                    None | Some(Err(_)) => {
                        let reason = format!("the connection to controller {peer_url} broke");
                        let frame = CloseFrame { code: 1011, reason: super::exec_stream::close_reason(&reason).into() };
                        let _ = to_client.send(Message::Close(Some(frame))).await;
                        let _ = to_client.close().await;
                        return;
                    }
                };
                if to_client.send(message).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to_peer.close().await;
}

/// Forwarding itself is tested against real peers in `tests/cluster.rs`
/// and `tests/e2e_brokers.rs`.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_urls() {
        assert_eq!(advertise_url("http://10.0.0.2:8080").unwrap(), "http://10.0.0.2:8080");
        assert_eq!(advertise_url("https://ctl.example/").unwrap(), "https://ctl.example");
        assert_eq!(advertise_url("http://[::1]:80").unwrap(), "http://[::1]");
        for bad in ["10.0.0.2:8080", "ftp://x", "http://x/v1", "http://x?a=b", "http://u@x", "nonsense"] {
            assert!(advertise_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hop_by_hop_headers_stay_behind() {
        assert!(hop_by_hop(&header::TRANSFER_ENCODING) && hop_by_hop(&HeaderName::from_static("keep-alive")));
        assert!(!hop_by_hop(&header::CONTENT_TYPE) && !hop_by_hop(&header::RETRY_AFTER));
    }
}
