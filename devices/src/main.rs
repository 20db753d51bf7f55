//! `mm-device block|net|vsock`: serve one virtio device as a vhost-user
//! back end, on a listening socket handed in by the broker (`--listen-fd`,
//! its front-end connection already queued) or, for manual use and tests,
//! on a socket path it creates (`--socket`). It returns when the front end
//! hangs up.
//!
//! By default it confines itself (DESIGN.md, "Jails and policies"): unless
//! already inside a jail (the broker's, or its own), it re-executes itself
//! through `mm-jailer` with only what its device needs — the listening
//! socket as fd 4, the TAP as fd 5, the disk image (for a copy-on-write
//! disk, `--base` read-only and `--map` too) or the vsock socket directory
//! bound in — waits for that copy and exits as it did. The jailed
//! copy installs its device's seccomp policy before it serves.
//! `--no-jail` and `--no-seccomp` exist for debugging only.
//!
//! `--lazy-memory` serves a lazily restored guest (`mm_devices::lazy_memory`):
//! the back end offers PAGEFAULT and its jail holds `/dev/userfaultfd`,
//! owned by the jail's uid (the `vhost-user-backend` crate and block's own
//! handler open that path to create the userfaultfd mm-vmm serves faults
//! on). Without it the jail has no such node and PAGEFAULT is not offered.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use mm_devices::block::{BlockConfig, OverlayFiles, serve_block};
use mm_devices::net::{MacAddr, NetConfig, serve_net};
use mm_devices::rate_limiter::RateLimitFlags;
use mm_devices::vsock::{VsockConfig, serve_vsock};
use mm_jailer::{BindMount, SelfJail};
use mm_policies::Policy;
use mm_protocols::device_control::{self, DeviceCounters, RateLimit, SeqPacketListener};
use mm_protocols::socket_path;

/// Where the jailed copy finds the listening socket and the TAP.
const JAILED_LISTEN_FD: RawFd = 4;
const JAILED_TAP_FD: RawFd = 5;
const JAILED_CONTROL_FD: RawFd = 6;

#[derive(Debug, Parser)]
#[command(name = "mm-device", version, about = "A MicroMachines vhost-user device back end")]
struct Cli {
    #[command(subcommand)]
    device: Device,
    #[command(flatten)]
    confinement: Confinement,
    /// The broker's control channel (protocols/device.capnp): an inherited
    /// listening SOCK_SEQPACKET socket, answered on a thread of its own.
    #[arg(long, global = true)]
    control_fd: Option<RawFd>,
    /// Serve a lazily restored guest: the front end resolves this process's
    /// faults on guest RAM (vhost-user postcopy, protocol feature
    /// PAGEFAULT), and the jail holds /dev/userfaultfd.
    #[arg(long, global = true)]
    lazy_memory: bool,
}

/// How the process is confined (debugging escape hatches included).
#[derive(Debug, Clone, Args)]
struct Confinement {
    /// DEBUGGING ONLY: serve unjailed (no namespaces, no pivot_root, full
    /// privileges). The seccomp filter still applies unless --no-seccomp.
    #[arg(long, global = true)]
    no_jail: bool,
    /// DEBUGGING ONLY: serve without the seccomp filter.
    #[arg(long, global = true)]
    no_seccomp: bool,
    /// The microVM's unprivileged uid inside the jail (default: the caller's,
    /// with every capability dropped).
    #[arg(long, global = true)]
    jail_uid: Option<u32>,
    #[arg(long, global = true)]
    jail_gid: Option<u32>,
    /// Tests only: make escape attempts instead of serving
    /// (`jail=other=PATH,dir=PATH,pid=N`, `socket`, `ptrace` or `userns`),
    /// or try what a lazy restore needs (`userfaultfd`) and look at the
    /// jail's /dev (`dev`, without the filter).
    #[cfg(feature = "test-hooks")]
    #[arg(long, global = true, hide = true)]
    test_escape: Option<String>,
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
    /// A raw disk image, or a copy-on-write disk over a read-only base.
    Block {
        #[command(flatten)]
        endpoint: Endpoint,
        /// The raw image; with --base, the copy-on-write upper file (the
        /// one written, as long as the base).
        #[arg(long)]
        image: PathBuf,
        #[arg(long)]
        read_only: bool,
        /// Serve --image as a copy-on-write overlay of this raw image
        /// (opened read-only, never written). Needs --map.
        #[arg(long, requires = "map", conflicts_with = "read_only")]
        base: Option<PathBuf>,
        /// The overlay's allocation bitmap (one bit per 4 KiB cluster of
        /// --image). Needs --base.
        #[arg(long, requires = "base")]
        map: Option<PathBuf>,
        /// Device serial (VIRTIO_BLK_T_GET_ID), at most 20 bytes.
        #[arg(long)]
        serial: Option<String>,
        #[command(flatten)]
        rate: RateLimitFlags,
        #[command(flatten)]
        test: mm_devices::block::TestHookFlags,
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
        /// The guest was restored from a snapshot: once the driver's event
        /// queue is running, post one VIRTIO_VSOCK_EVENT_TRANSPORT_RESET so
        /// the guest drops its stale connections (listeners stay) and
        /// re-reads its CID from the config space.
        #[arg(long)]
        transport_reset: bool,
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
            (None, Some(path)) => socket_path::bind_listening(path, |p| UnixListener::bind(p))
                .with_context(|| format!("listening on {}", path.display())),
            _ => bail!("give exactly one of --listen-fd or --socket"),
        }
    }
}

/// RLIMIT_FSIZE of a jailed device: the most its log file may grow to
/// (appends past it fail), and the least a writable disk image's limit is.
const LOG_FILE_LIMIT: u64 = 64 << 20;

/// Errors are printed with their causes but without a backtrace: resolving
/// one reads `/proc/self/exe` and the binary's debug info, which the
/// device's seccomp filter does not allow, so an error after the filter is
/// installed would end in SIGSYS instead of its message.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mm-device: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MM_LOG")
                .unwrap_or_else(|_| "mm_devices=warn,mm_jailer=warn,mm_device=warn".into()),
        )
        .init();
    let cli = Cli::parse();
    if !cli.confinement.no_jail && !mm_jailer::is_jailed() {
        let code = run_jailed(&cli)?;
        std::process::exit(i32::from(code));
    }
    if cli.confinement.no_jail {
        tracing::warn!("mm-device: --no-jail: serving UNJAILED, with this process's full privileges (debugging only)");
    }
    let confinement = cli.confinement;
    let lazy_memory = cli.lazy_memory;
    let control = cli
        .control_fd
        .map(|fd| inherited(fd, "--control-fd").and_then(|fd| Ok(SeqPacketListener::from_inherited(fd)?)))
        .transpose()?;
    let started = std::time::Instant::now();
    // Started after the device's filter is installed, so it runs under it.
    let answer_control = |kind: &'static str, counters: fn() -> DeviceCounters, set: SetRateLimit| {
        if let Some(listener) = control {
            std::thread::Builder::new()
                .name("control".into())
                .spawn(move || device_control::serve_with(listener, kind, started, counters, set))
                .context("starting the control thread")?;
        }
        Ok::<(), anyhow::Error>(())
    };
    match cli.device {
        Device::Block { endpoint, image, read_only, base, map, serial, rate, test } => {
            let rate_limit = rate.limit()?;
            let listener = endpoint.listener()?;
            confine(&confinement, Policy::Block)?;
            answer_control("block", mm_devices::block::counters, mm_devices::block::set_rate_limit)?;
            let overlay = base.zip(map).map(|(base, map)| OverlayFiles { base, map });
            serve_block(BlockConfig { image, overlay, read_only, serial, lazy_memory, rate_limit, test }, listener)?;
        }
        Device::Net { endpoint, tap_fd, mac } => {
            let listener = endpoint.listener()?;
            let tap = inherited(tap_fd, "--tap-fd")?;
            confine(&confinement, Policy::Net)?;
            answer_control("net", DeviceCounters::default, no_rate_limiter)?;
            serve_net(NetConfig { tap, mac, lazy_memory }, listener)?;
        }
        Device::Vsock { endpoint, guest_cid, uds, transport_reset } => {
            let listener = endpoint.listener()?;
            confine(&confinement, Policy::Vsock)?;
            answer_control("vsock", DeviceCounters::default, no_rate_limiter)?;
            serve_vsock(VsockConfig { guest_cid, uds_path: uds, transport_reset, lazy_memory }, listener)?;
        }
    }
    Ok(())
}

/// How the control channel changes a device's rate limits.
type SetRateLimit = fn(RateLimit) -> Result<(), String>;

fn no_rate_limiter(_: RateLimit) -> Result<(), String> {
    Err("this device has no rate limiter".into())
}

/// Installs the device's policy (unless --no-seccomp), then runs the escape
/// probes if a test asked for them instead of serving.
fn confine(confinement: &Confinement, policy: Policy) -> Result<()> {
    if confinement.no_seccomp {
        tracing::warn!("mm-device: --no-seccomp: serving WITHOUT a seccomp filter (debugging only)");
    } else {
        mm_policies::install(policy)?;
    }
    #[cfg(feature = "test-hooks")]
    if let Some(probe) = &confinement.test_escape {
        match probe.strip_prefix("jail=") {
            Some(targets) => {
                mm_jailer::probes::jail(&mm_jailer::probes::Targets::parse(targets).map_err(anyhow::Error::msg)?)
            }
            None if probe == "userfaultfd" => mm_jailer::probes::userfaultfd(),
            None if probe == "dev" => mm_jailer::probes::dev(),
            None => mm_jailer::probes::seccomp(probe).map_err(anyhow::Error::msg)?,
        }
        std::process::exit(0);
    }
    Ok(())
}

/// Our own command line with the values of some `--flag value` (or
/// `--flag=value`) options replaced, for the jailed copy.
fn rewrite_args(replace: impl Fn(&str, &str) -> Option<String>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut args = std::env::args().skip(1).peekable();
    while let Some(arg) = args.next() {
        if let Some((flag, value)) = arg.split_once('=').filter(|(f, _)| f.starts_with("--")) {
            let value = replace(flag, value).unwrap_or_else(|| value.to_string());
            out.push(format!("{flag}={value}").into());
        } else if let Some(new) = args.peek().and_then(|value| replace(&arg, value)) {
            args.next();
            out.extend([arg.into(), new.into()]);
        } else {
            out.push(arg.into());
        }
    }
    out
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("{}", path.display()))
}

/// Re-executes this binary in a jail holding only what the device needs
/// (the listener as fd 4, the TAP as fd 5, the image or the vsock socket
/// directory), and returns the status to exit with.
fn run_jailed(cli: &Cli) -> Result<u8> {
    let c = &cli.confinement;
    let (kind, endpoint) = match &cli.device {
        Device::Block { endpoint, .. } => ("block", endpoint),
        Device::Net { endpoint, .. } => ("net", endpoint),
        Device::Vsock { endpoint, .. } => ("vsock", endpoint),
    };
    // The listener is made here, so the jail needs no directory to bind in.
    let listener = endpoint.listener()?;
    let mut jail = SelfJail::new(kind, Vec::new(), c.jail_uid, c.jail_gid)?;
    let spec = &mut jail.spec;
    spec.fds.push((listener.as_raw_fd(), JAILED_LISTEN_FD));
    spec.limits.memory_bytes = Some(512 << 20);
    spec.limits.pids = Some(64);
    // Regular files this process writes: its log (stderr, a file the broker
    // opened, appended to) and, for block, its disk image (below). A limit
    // of 0, as this once was, made every log line fail with EFBIG: the
    // net and vsock logs stayed empty, and a warning printed with
    // `eprintln!` (as `--no-seccomp` does) ended the process (status 101).
    spec.limits.file_size = Some(LOG_FILE_LIMIT);
    // The node the postcopy handlers open to create their userfaultfd.
    spec.userfaultfd = cli.lazy_memory;
    let mut tap = None;
    let control = cli.control_fd.map(|fd| inherited(fd, "--control-fd")).transpose()?;
    if let Some(fd) = &control {
        spec.fds.push((fd.as_raw_fd(), JAILED_CONTROL_FD));
    }
    match &cli.device {
        Device::Block { image, read_only, base, map, .. } => {
            let image = std::fs::canonicalize(image).with_context(|| format!("disk image {}", image.display()))?;
            spec.mounts.push(if *read_only { BindMount::read_only(&image) } else { BindMount::writable(&image) });
            let size = std::fs::metadata(&image)?.len();
            // A block device reports 0: no file-size limit then. (The log
            // shares the limit; an image smaller than it keeps its size.)
            spec.limits.file_size = (size > 0).then_some(size.max(LOG_FILE_LIMIT));
            // A copy-on-write disk: the base read-only, the map writable
            // (it is far smaller than the upper, which is as long as the
            // base, so the limit above covers it).
            if let (Some(base), Some(map)) = (base, map) {
                let base = std::fs::canonicalize(base).with_context(|| format!("base image {}", base.display()))?;
                let map = std::fs::canonicalize(map).with_context(|| format!("overlay map {}", map.display()))?;
                spec.mounts.push(BindMount::read_only(&base));
                spec.mounts.push(BindMount::writable(&map));
                let map_size = std::fs::metadata(&map)?.len();
                spec.limits.file_size = spec.limits.file_size.map(|limit| limit.max(map_size));
            }
        }
        Device::Net { tap_fd, .. } => {
            let fd = inherited(*tap_fd, "--tap-fd")?;
            spec.fds.push((fd.as_raw_fd(), JAILED_TAP_FD));
            tap = Some(fd);
        }
        Device::Vsock { uds, .. } => {
            let dir = absolute(uds)?.parent().context("--uds has no directory")?.to_path_buf();
            spec.mounts.push(BindMount::writable(dir));
        }
    }
    spec.args = rewrite_args(|flag, value| match flag {
        "--socket" | "--listen-fd" => Some(format!("{JAILED_LISTEN_FD}")),
        "--tap-fd" => Some(format!("{JAILED_TAP_FD}")),
        "--control-fd" => Some(format!("{JAILED_CONTROL_FD}")),
        "--image" | "--base" | "--map" | "--uds" => absolute(Path::new(value)).ok().map(|p| p.display().to_string()),
        _ => None,
    })
    .into_iter()
    .map(|a| match a.to_str() {
        Some("--socket") => "--listen-fd".into(),
        Some(s) if s.starts_with("--socket=") => format!("--listen-fd={JAILED_LISTEN_FD}").into(),
        _ => a,
    })
    .collect();
    let reason = jail.run()?;
    drop((listener, tap, control));
    Ok(mm_jailer::exit_code(&reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("mm-device").chain(args.split_whitespace()))
    }

    #[test]
    fn block_overlay_flags_come_together_and_not_read_only() {
        let cli = parse("block --socket s --image u --base b --map m").unwrap();
        let Device::Block { image, base, map, read_only, .. } = cli.device else { panic!("not block") };
        assert_eq!((image, base, map, read_only), ("u".into(), Some("b".into()), Some("m".into()), false));
        assert!(parse("block --socket s --image u --base b").is_err(), "--base without --map");
        assert!(parse("block --socket s --image u --map m").is_err(), "--map without --base");
        assert!(parse("block --socket s --image u --base b --map m --read-only").is_err(), "read-only overlay");
        assert!(parse("block --socket s --image u --read-only").is_ok());
    }
}
