//! `mm-jailer`: run one program in a jail, by hand (the broker uses the
//! library). Exits with the program's status (128 + signal if killed) and
//! says on stderr how it ended if that was not a clean exit.
//!
//! ```sh
//! mm-jailer --name try1 --uid 61000 --gid 61000 --bind /srv/disk.img:rw --dev /dev/kvm \
//!     --memory-mib 512 --pids 64 -- /usr/local/bin/mm-device block --listen-fd 4 --image /srv/disk.img
//! ```

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Parser;
use mm_jailer::{BindMount, JailSpec, exit_code};

#[derive(Debug, Parser)]
#[command(
    name = "mm-jailer",
    version,
    about = "Run one program confined: namespaces, pivot_root, cgroups, no privileges"
)]
struct Args {
    /// Jail name: root directory, cgroups and hostname.
    #[arg(long)]
    name: String,
    #[arg(long)]
    uid: u32,
    #[arg(long)]
    gid: u32,
    /// Make a host path visible at the same path: `PATH` (read-only) or `PATH:rw`.
    #[arg(long = "bind", value_name = "PATH[:rw]")]
    binds: Vec<String>,
    /// A device node to make visible (read-write), e.g. /dev/kvm.
    #[arg(long = "dev", value_name = "PATH")]
    devices: Vec<PathBuf>,
    /// Pass an inherited fd: `PARENT:CHILD`.
    #[arg(long = "fd", value_name = "PARENT:CHILD")]
    fds: Vec<String>,
    /// Stay in the host network namespace.
    #[arg(long)]
    keep_net: bool,
    /// Give the jail a /dev/userfaultfd of its own, owned by --uid (a lazily
    /// restored guest's device back ends create their userfaultfd there).
    #[arg(long)]
    userfaultfd: bool,
    #[arg(long)]
    memory_mib: Option<u64>,
    #[arg(long)]
    pids: Option<u64>,
    #[arg(long, default_value = mm_jailer::DEFAULT_JAIL_BASE)]
    jail_base: PathBuf,
    /// The program and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<OsString>,
}

fn main() -> Result<ExitCode> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let args = Args::parse();
    let program = PathBuf::from(&args.command[0]);
    let mut spec = JailSpec::new(&args.name, program, args.uid, args.gid);
    spec.args = args.command[1..].to_vec();
    spec.jail_base = args.jail_base;
    spec.keep_net = args.keep_net;
    spec.userfaultfd = args.userfaultfd;
    spec.limits.memory_bytes = args.memory_mib.map(|m| m << 20);
    spec.limits.pids = args.pids;
    for (key, value) in std::env::vars_os().filter(|(k, _)| k == "MM_LOG" || k == "PATH") {
        spec.env.push((key, value));
    }
    for bind in &args.binds {
        spec.mounts.push(match bind.strip_suffix(":rw") {
            Some(path) => BindMount::writable(path),
            None => BindMount::read_only(bind),
        });
    }
    spec.mounts.extend(args.devices.iter().map(BindMount::device));
    for fd in &args.fds {
        let (parent, child) = fd.split_once(':').context("--fd wants PARENT:CHILD")?;
        spec.fds.push((parent.parse()?, child.parse()?));
    }
    // SAFETY: F_GETFD only queries the descriptor table.
    if spec.fds.iter().any(|(fd, _)| unsafe { libc::fcntl(*fd, libc::F_GETFD) } < 0) {
        bail!("an --fd is not open in mm-jailer");
    }
    let mut child = mm_jailer::spawn(&spec)?;
    let reason = child.wait()?;
    eprintln!("{}", child.describe(&reason));
    Ok(ExitCode::from(exit_code(&reason)))
}
