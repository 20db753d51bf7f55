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

/// `--disk-bps`, `--disk-iops`, `--net-bps`, `--net-pps` (`mmctl run`,
/// `mmctl update`): the device back ends' token-bucket rate limits.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct IoLimitFlags {
    /// Disk bandwidth per disk, bytes/s (suffixes K, M, G: binary), or
    /// `unlimited`.
    #[arg(long, value_parser = parse_rate)]
    pub disk_bps: Option<u64>,
    /// Disk requests per second per disk, or `unlimited`.
    #[arg(long, value_parser = parse_rate)]
    pub disk_iops: Option<u64>,
    /// Network bandwidth each direction, bytes/s (not enforced yet: the
    /// broker refuses it).
    #[arg(long, value_parser = parse_rate)]
    pub net_bps: Option<u64>,
    /// Network packets per second each direction (as --net-bps).
    #[arg(long, value_parser = parse_rate)]
    pub net_pps: Option<u64>,
}

impl IoLimitFlags {
    /// The limits with these flags over `current` (0 = unlimited).
    pub fn over(&self, current: [u64; 4]) -> [u64; 4] {
        let given = [self.disk_bps, self.disk_iops, self.net_bps, self.net_pps];
        std::array::from_fn(|i| given[i].unwrap_or(current[i]))
    }

    pub fn is_empty(&self) -> bool {
        self.over([1; 4]) == [1; 4] && self.over([2; 4]) == [2; 4]
    }

    pub fn write(limits: [u64; 4], mut out: mm_protocols::broker_capnp::io_limits::Builder<'_>) {
        out.set_disk_bps(limits[0]);
        out.set_disk_iops(limits[1]);
        out.set_net_bps(limits[2]);
        out.set_net_pps(limits[3]);
    }
}

/// A rate: a positive number with an optional binary suffix (K, M, G), or
/// `unlimited` (sent as 0). A bare 0 is refused: it reads like "stop all
/// I/O", which no limit means.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("unlimited") || t.eq_ignore_ascii_case("none") {
        return Ok(0);
    }
    let (digits, factor) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&t[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    match digits.parse::<u64>().ok().map(|v| v.checked_mul(factor)) {
        Some(Some(0)) => Err(format!("{s:?}: a limit of 0 would stop all I/O; to lift a limit say `unlimited`")),
        Some(Some(v)) => Ok(v),
        Some(None) => Err(format!("{s:?} is absurdly large (more than 2^64)")),
        None => Err(format!("{s:?} is not a rate (e.g. 1M, 50, 10G, unlimited)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_suffixes_and_refuse_zero_and_nonsense() {
        assert_eq!(parse_rate("1M"), Ok(1 << 20));
        assert_eq!(parse_rate("50"), Ok(50));
        assert_eq!(parse_rate("2k"), Ok(2048));
        assert_eq!(parse_rate("10G"), Ok(10 << 30));
        assert_eq!(parse_rate("unlimited"), Ok(0));
        assert!(parse_rate("0").unwrap_err().contains("unlimited"));
        assert!(parse_rate("0M").is_err());
        assert!(parse_rate("99999999999G").unwrap_err().contains("absurdly"));
        assert!(parse_rate("-1").is_err() && parse_rate("1.5M").is_err() && parse_rate("").is_err());
        let flags = IoLimitFlags { disk_bps: Some(7), ..Default::default() };
        assert_eq!(flags.over([1, 2, 3, 4]), [7, 2, 3, 4]);
        assert!(!flags.is_empty() && IoLimitFlags::default().is_empty());
    }
}
