//! `mm-device block|net|vsock`: serve one virtio device as a vhost-user
//! back end, on a listening socket handed in by the broker (`--listen-fd`,
//! its front-end connection already queued) or, for manual use and tests,
//! on a socket path it creates (`--socket`). It returns when the front end
//! hangs up.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use mm_devices::block::{BlockConfig, serve_block};
use mm_devices::net::{MacAddr, NetConfig, serve_net};
use mm_devices::vsock::{VsockConfig, serve_vsock};

#[derive(Debug, Parser)]
#[command(name = "mm-device", version, about = "A MicroMachines vhost-user device back end")]
struct Cli {
    #[command(subcommand)]
    device: Device,
}

/// Where the vhost-user front end (mm-vmm) reaches us.
#[derive(Debug, Args)]
struct Endpoint {
    /// An inherited listening unix socket (from the broker).
    #[arg(long, conflicts_with = "socket")]
    listen_fd: Option<RawFd>,
    /// Listen on this path instead (removed first if it exists).
    #[arg(long)]
    socket: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Device {
    /// A raw disk image.
    Block {
        #[command(flatten)]
        endpoint: Endpoint,
        #[arg(long)]
        image: PathBuf,
        #[arg(long)]
        read_only: bool,
        /// Device serial (VIRTIO_BLK_T_GET_ID), at most 20 bytes.
        #[arg(long)]
        serial: Option<String>,
    },
    /// A network interface on a TAP fd the broker opened.
    Net {
        #[command(flatten)]
        endpoint: Endpoint,
        #[arg(long)]
        tap_fd: RawFd,
        #[arg(long)]
        mac: MacAddr,
    },
    /// Hybrid vsock: host side is a unix socket.
    Vsock {
        #[command(flatten)]
        endpoint: Endpoint,
        #[arg(long)]
        guest_cid: u64,
        /// The unix socket host clients connect to (`CONNECT <port>`);
        /// guest connections to host port P go to `<uds>_<P>`.
        #[arg(long)]
        uds: PathBuf,
    },
}

/// Takes ownership of an inherited fd after checking it is open.
fn inherited(fd: RawFd, what: &str) -> Result<OwnedFd> {
    // SAFETY: fcntl(F_GETFD) only queries the descriptor table.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        bail!("{what} fd {fd} is not an open inherited descriptor");
    }
    // SAFETY: the fd is open, was passed to us for this purpose, and
    // nothing else in this process owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Endpoint {
    fn listener(&self) -> Result<UnixListener> {
        match (&self.listen_fd, &self.socket) {
            (Some(fd), None) => Ok(UnixListener::from(inherited(*fd, "--listen-fd")?)),
            (None, Some(path)) => {
                let _ = std::fs::remove_file(path);
                UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))
            }
            _ => bail!("give exactly one of --listen-fd or --socket"),
        }
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MM_LOG").unwrap_or_else(|_| "mm_devices=warn".into()),
        )
        .init();
    match Cli::parse().device {
        Device::Block { endpoint, image, read_only, serial } => {
            let listener = endpoint.listener()?;
            serve_block(BlockConfig { image, read_only, serial }, listener)?;
        }
        Device::Net { endpoint, tap_fd, mac } => {
            let listener = endpoint.listener()?;
            let tap = inherited(tap_fd, "--tap-fd")?;
            serve_net(NetConfig { tap, mac }, listener)?;
        }
        Device::Vsock { endpoint, guest_cid, uds } => {
            let listener = endpoint.listener()?;
            serve_vsock(VsockConfig { guest_cid, uds_path: uds }, listener)?;
        }
    }
    Ok(())
}
