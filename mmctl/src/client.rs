//! Reaching the broker, and turning its errors into one clear line and an
//! exit code.

use std::path::PathBuf;

use capnp_rpc::{RpcSystem, rpc_twoparty_capnp};
use mm_protocols::broker_capnp::broker;
use mm_protocols::rpc::vat_network;

/// mmctl's exit codes besides a workload's own.
pub mod exit {
    pub const ERROR: i32 = 1;
    pub const INVALID: i32 = 2;
    pub const NOT_FOUND: i32 = 3;
    pub const CONFLICT: i32 = 4;
    pub const NO_MEMORY: i32 = 5;
    /// The broker (local mode) or the controller (`--server`) is not reachable.
    pub const NO_BROKER: i32 = 6;
    /// `--server`: the controller refused the token (401: missing, bad,
    /// expired or revoked) or its role is too small for the verb (403).
    pub const NOT_AUTHORIZED: i32 = 7;
    /// `--server`: the controller does not offer this verb (yet), so a
    /// script can tell "not possible here" from "failed".
    pub const UNSUPPORTED: i32 = 8;
    /// The microVM failed (mm-vmm could not run it), as `docker run` uses 125.
    pub const VM_FAILED: i32 = 125;
}

/// An error for the user: the message and the exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    pub message: String,
    pub code: i32,
}

impl CliError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        CliError { message: message.into(), code }
    }
}

impl From<capnp::Error> for CliError {
    /// The broker sends `"<kind>: <message>"`; capnp-rpc may prefix it
    /// with "remote exception: ".
    fn from(e: capnp::Error) -> Self {
        let text = e.extra.trim_start_matches("remote exception: ").to_string();
        let (code, message) = match text.split_once(": ") {
            Some(("not-found", rest)) => (exit::NOT_FOUND, rest),
            Some(("conflict", rest)) => (exit::CONFLICT, rest),
            Some(("invalid", rest)) => (exit::INVALID, rest),
            Some(("no-memory", rest)) => (exit::NO_MEMORY, rest),
            Some(("internal", rest)) => (exit::ERROR, rest),
            _ if e.kind == capnp::ErrorKind::Disconnected => {
                return CliError::new(exit::NO_BROKER, format!("lost the connection to the broker: {text}"));
            }
            _ => (exit::ERROR, text.as_str()),
        };
        CliError::new(code, message)
    }
}

/// The socket to use: `--socket`, then `$MM_BROKER_SOCKET`, then the default.
pub fn socket_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os(mm_protocols::BROKER_SOCKET_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(mm_protocols::DEFAULT_BROKER_SOCKET))
}

/// Connects and returns the broker's bootstrap capability; the RPC system
/// runs as a local task.
pub async fn connect(path: &std::path::Path) -> Result<broker::Client, CliError> {
    let stream = tokio::net::UnixStream::connect(path).await.map_err(|e| {
        CliError::new(
            exit::NO_BROKER,
            format!(
                "cannot reach mm-broker at {}: {e} (is it running? set --socket or {})",
                path.display(),
                mm_protocols::BROKER_SOCKET_ENV
            ),
        )
    })?;
    let (reader, writer) = stream.into_split();
    let network = vat_network(reader, writer, rpc_twoparty_capnp::Side::Client, None);
    let mut rpc = RpcSystem::new(Box::new(network), None);
    let client: broker::Client = rpc.bootstrap(rpc_twoparty_capnp::Side::Server);
    tokio::task::spawn_local(rpc);
    Ok(client)
}
