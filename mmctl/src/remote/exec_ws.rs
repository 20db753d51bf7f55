//! `exec` through the controller's WebSocket (`GET .../exec/ws`, framing
//! in the controller's `api/exec_stream.rs` and README): the request as
//! the first message, our stdin out on channel 0 (then close-stdin, 5),
//! the command's stdout (1) and stderr (2) printed as they arrive, and its
//! status (3) last; with `-t`, our terminal's new size on channel 4 each
//! time it changes. Our exit code is the command's, as with a local exec.

use std::io::Write;

use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};

use super::http::{Api, ApiError, Problem};
use crate::client::{CliError, exit};
use crate::terminal::{self, RawTerminal, WindowChanges};

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const STATUS: u8 = 3;
const RESIZE: u8 = 4;
const CLOSE_STDIN: u8 = 5;
/// Input bytes per message (the controller takes up to 64 KiB), here and
/// in the port tunnel.
pub const CHUNK: usize = 32 * 1024;

pub struct ExecRequest {
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Forward our stdin; without it the command's stdin is closed at once.
    pub stdin: bool,
    /// Run on a terminal of our size.
    pub tty: bool,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

/// Channel 3.
#[derive(Debug, Default, Deserialize)]
struct Status {
    exit_code: Option<i32>,
    exit_signal: Option<i32>,
    error: Option<String>,
    kind: Option<String>,
}

pub fn transport(api: &Api, what: &str, e: tungstenite::Error) -> CliError {
    let unreachable = matches!(e, tungstenite::Error::Io(_) | tungstenite::Error::Tls(_) | tungstenite::Error::Url(_));
    ApiError::Transport { message: format!("{what} through mm-controller at {}: {e}", api.base()), unreachable }.into()
}

/// A refusal of the upgrade: the controller's problem document, like any
/// other call's.
fn refused(response: &tungstenite::http::Response<Option<Vec<u8>>>, what: &str) -> CliError {
    let body = response.body().as_deref().unwrap_or_default();
    let problem = serde_json::from_slice::<Problem>(body).unwrap_or_else(|_| Problem {
        status: response.status().as_u16(),
        detail: format!("the controller refused {what}: HTTP {}", response.status()),
        ..Problem::default()
    });
    let e = ApiError::Problem(problem);
    if e.is_no_route() {
        return CliError::new(exit::UNSUPPORTED, format!("the controller does not offer {what} yet"));
    }
    e.into()
}

/// How the status (or its absence) becomes our exit code.
fn finish(status: Option<Status>, close: Option<(u16, String)>) -> Result<i32, CliError> {
    let Some(status) = status else {
        let why = close.map(|(code, reason)| format!(" (close {code}: {reason})")).unwrap_or_default();
        return Err(CliError::new(exit::ERROR, format!("the exec ended without an exit status{why}")));
    };
    match (status.exit_code, status.exit_signal, status.error) {
        (Some(code), _, _) => Ok(code),
        (None, Some(signal), _) => Ok(128 + signal),
        (None, None, Some(error)) => {
            let kind = status.kind.unwrap_or_default();
            if kind == "exec-failed" {
                // As a local exec of a command that cannot run.
                return Err(CliError::new(126, error));
            }
            // A refusal closes with 4000 + the HTTP status it stands for.
            let http_status = close.map(|(code, _)| code).filter(|c| (4100..4600).contains(c)).map_or(0, |c| c - 4000);
            let problem = Problem {
                kind: format!("urn:micromachines:problem:{kind}"),
                status: http_status,
                detail: error,
                ..Problem::default()
            };
            Err(ApiError::Problem(problem).into())
        }
        (None, None, None) => Err(CliError::new(exit::ERROR, "the controller did not say how the command ended")),
    }
}

/// Reads our stdin into `out` until its end (then the channel closes).
async fn read_stdin(out: mpsc::Sender<Vec<u8>>) {
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; CHUNK];
    loop {
        match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if out.send(buf[..n].to_vec()).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A binary message: the channel byte, then `data` (also the port
/// tunnel's framing).
pub fn framed(channel: u8, data: &[u8]) -> Message {
    let mut frame = Vec::with_capacity(data.len() + 1);
    frame.push(channel);
    frame.extend_from_slice(data);
    Message::Binary(frame.into())
}

pub type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the machine route `rest` (under `.../machines/`) as a WebSocket
/// with our token; a refused upgrade is the controller's problem, and a
/// route it does not have says it does not offer `what` yet.
pub async fn open(api: &Api, rest: &[&str], what: &str) -> Result<Socket, CliError> {
    let mut url = api.machines_url(rest);
    let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
    url.set_scheme(scheme).map_err(|()| CliError::new(exit::INVALID, format!("cannot make {url} a WebSocket URL")))?;
    let mut upgrade = url.as_str().into_client_request().map_err(|e| transport(api, what, e))?;
    let bearer = HeaderValue::from_str(&format!("Bearer {}", api.token()))
        .map_err(|_| CliError::new(exit::NOT_AUTHORIZED, "the token is not a valid header value"))?;
    upgrade.headers_mut().insert(header::AUTHORIZATION, bearer);
    upgrade
        .headers_mut()
        .insert(header::USER_AGENT, HeaderValue::from_static(concat!("mmctl/", env!("CARGO_PKG_VERSION"))));
    match tokio_tungstenite::connect_async(upgrade).await {
        Ok((socket, _)) => Ok(socket),
        Err(tungstenite::Error::Http(response)) => Err(refused(&response, what)),
        Err(e) => Err(transport(api, what, e)),
    }
}

/// Runs the command and returns its exit code (128 + N after signal N).
pub async fn exec(api: &Api, id: &str, request: ExecRequest) -> Result<i32, CliError> {
    let what = "a streaming exec";
    let socket = open(api, &[id, "exec", "ws"], what).await?;
    let (mut out, mut incoming) = socket.split();

    let mut first = json!({ "command": request.command, "tty": request.tty });
    if !request.env.is_empty() {
        first["env"] = Value::Object(request.env.into_iter().map(|(k, v)| (k, Value::String(v))).collect());
    }
    if request.tty {
        let (rows, cols) = terminal::window_size().unwrap_or((24, 80));
        first["rows"] = json!(rows);
        first["cols"] = json!(cols);
    }
    if let Some(workdir) = request.workdir {
        first["workdir"] = json!(workdir);
    }
    if let Some(user) = request.user {
        first["user"] = json!(user);
    }
    out.send(Message::Text(first.to_string().into())).await.map_err(|e| transport(api, what, e))?;

    let (stdin_tx, mut stdin_rx) = mpsc::channel(4);
    let mut stdin_open = request.stdin;
    if request.stdin {
        tokio::spawn(read_stdin(stdin_tx));
    } else {
        drop(stdin_tx);
        out.send(framed(CLOSE_STDIN, &[])).await.map_err(|e| transport(api, what, e))?;
    }

    // Raw only while the command runs: dropped (restored) on every return.
    let _raw = if request.tty && request.stdin { RawTerminal::for_stdin()? } else { None };
    let mut window_changes = if request.tty { Some(WindowChanges::new()?) } else { None };
    let mut status = None;
    let mut close = None;
    loop {
        tokio::select! {
            Some((rows, cols)) = next_size(&mut window_changes) => {
                let _ = out.send(framed(RESIZE, json!({ "rows": rows, "cols": cols }).to_string().as_bytes())).await;
            }
            message = incoming.next() => match message {
                Some(Ok(Message::Binary(data))) => match data.split_first() {
                    Some((&STDOUT, rest)) => {
                        let mut stdout = std::io::stdout().lock();
                        let _ = stdout.write_all(rest).and_then(|()| stdout.flush());
                    }
                    Some((&STDERR, rest)) => {
                        let mut stderr = std::io::stderr().lock();
                        let _ = stderr.write_all(rest).and_then(|()| stderr.flush());
                    }
                    Some((&STATUS, rest)) => status = serde_json::from_slice::<Status>(rest).ok(),
                    _ => {}
                },
                Some(Ok(Message::Close(frame))) => {
                    close = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) if status.is_none() => return Err(transport(api, what, e)),
                Some(Err(_)) | None => break,
            },
            chunk = stdin_rx.recv(), if stdin_open => {
                let frame = match chunk {
                    Some(data) => framed(STDIN, &data),
                    None => {
                        stdin_open = false;
                        framed(CLOSE_STDIN, &[])
                    }
                };
                // A send that fails means the exec is over; its end (or
                // the error) is still read above.
                let _ = out.send(frame).await;
            }
        }
    }
    if close.as_ref().is_some_and(|(code, _)| *code == u16::from(CloseCode::Normal)) || status.is_some() {
        let _ = out.close().await;
    }
    finish(status, close)
}

/// The terminal's next size, or never without a terminal.
async fn next_size(changes: &mut Option<WindowChanges>) -> Option<(u16, u16)> {
    match changes {
        Some(changes) => changes.next().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_becomes_the_exit_code() {
        let status = |json: &str| Some(serde_json::from_str::<Status>(json).unwrap());
        assert_eq!(finish(status(r#"{"exit_code":4}"#), None).unwrap(), 4);
        assert_eq!(finish(status(r#"{"exit_signal":9}"#), None).unwrap(), 137);
        let failed = finish(status(r#"{"error":"no such file","kind":"exec-failed"}"#), None).unwrap_err();
        assert_eq!(failed.code, 126);
        let refused = r#"{"error":"guest not ready","kind":"invalid-state"}"#;
        let e = finish(status(refused), Some((4409, "guest not ready".into()))).unwrap_err();
        assert_eq!(e.code, exit::CONFLICT);
        let e = finish(status(r#"{"error":"bad","kind":"bad-request"}"#), Some((4400, "bad".into()))).unwrap_err();
        assert_eq!(e.code, exit::INVALID);
        assert_eq!(finish(None, Some((1011, "broke".into()))).unwrap_err().code, exit::ERROR);
    }
}
