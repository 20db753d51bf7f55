//! `mm-bench net`, broker part: the microVM network as a user gets it from
//! a real `mm-broker` (`mm_integration::broker::TestBroker`, whose bridge
//! lives in a namespace of its own, deleted at the end). Two detached
//! microVMs, `tx` and `rx`, on the built-in image:
//!
//! * `tcp_guest_to_guest`: `tx` runs mm-init's `tcp-bench` against a busybox
//!   `nc` in `rx` for `--secs`. The clock is tcp-bench's, from its first
//!   byte sent to `rx` closing the connection after the end of the data;
//!   the bytes are what `rx` counted (`wc -c`), which must equal what was
//!   sent (busybox has no sub-second clock, so the receiver cannot time).
//! * `tcp_connect_guest`: mm-init's `tcp-connect` in `tx`, connects to
//!   `rx`'s SSH port one after another, each timed around `connect` alone
//!   (starting a process in a guest costs far more than a handshake).
//! * `tcp_connect_host`: `mmctl proxy rx 22` spawned → the first byte of the
//!   SSH server's banner on its stdout: the host's way in, through the
//!   broker's `Vm.connect` (the host has no route into the namespace).
//! * `ssh_command`: `mmctl ssh -i KEY tx -- true`, spawn → exit: the real
//!   OpenSSH client over `mmctl proxy`, key exchange, login, the command.
//!
//! The first of each series is left out of the figures (and kept in the
//! JSON): it pays for ARP, cold caches and, for ssh, pinning the host key.
//! Nothing here has a QEMU counterpart. Traffic stays inside the broker's
//! namespace, or on loopback to the broker.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use mm_integration::broker::TestBroker;
use mm_integration::devices::Scratch;
use mm_integration::{Run, run_with_timeout};
use serde::Serialize;

use crate::brokered;
use crate::devbench::{CommonArgs, Metric};
use crate::machine;
use crate::report::{quantile, stats};

/// The broker's microVM network: private to its namespace.
const CIDR: &str = "10.79.0.0/24";
const TX: &str = "tx";
const RX: &str = "rx";
const PORT: u16 = 5201;
/// mm-init's SSH server: always listening, answers with its banner at once
/// and without starting a process.
const SSH_PORT: u16 = 22;
/// One `mmctl` call that is not a boot.
const QUICK: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// Skip the part that runs through a real mm-broker (guest <-> guest,
    /// connect latencies, ssh).
    #[arg(long, conflicts_with = "broker_only")]
    pub skip_broker: bool,
    /// Run only the broker part (no bare mm-vmm / QEMU comparison).
    #[arg(long)]
    pub broker_only: bool,
    /// Measured TCP connects, guest -> guest and host -> guest (each series
    /// has one more, unmeasured, first).
    #[arg(long, default_value_t = 20)]
    pub connects: usize,
    /// Measured `mmctl ssh VM -- true` runs (after one unmeasured first).
    #[arg(long, default_value_t = 10)]
    pub ssh_runs: usize,
}

/// Everything the broker part measured, in ms unless named otherwise.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BrokerRaw {
    pub mmctl: String,
    pub mm_broker: String,
    pub network_cidr: &'static str,
    /// Other mm-vmm/QEMU processes (not ours) when the part started, and
    /// the load then and at its end: on a shared host they move every figure.
    pub other_vms_at_start: usize,
    pub loadavg_at_start: String,
    pub loadavg_at_end: String,
    /// `mmctl inspect` of the sender (cpus, memory, ip, …).
    pub guest: serde_json::Value,
    /// Both `mmctl run -d` issued → the first `exec … true` that succeeded.
    pub ready_ms: Vec<f64>,
    /// tcp-bench's line in the sender: bytes sent, ns from its first byte to
    /// the receiver's close.
    pub sender_bytes: u64,
    pub sender_ns: u64,
    /// What the receiver counted, less tcp-bench's direction byte.
    pub receiver_bytes: u64,
    pub connect_guest_first_ms: f64,
    pub connect_guest_ms: Vec<f64>,
    pub connect_host_first_ms: f64,
    pub connect_host_ms: Vec<f64>,
    pub ssh_first_ms: f64,
    pub ssh_ms: Vec<f64>,
}

/// The broker part's contribution to the report.
pub struct BrokerPart {
    pub raw: BrokerRaw,
    pub metrics: Vec<Metric>,
    pub notes: Vec<String>,
    pub warnings: Vec<String>,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// An mm-only figure (no host reference, no QEMU counterpart).
fn mm_only(name: &'static str, unit: &'static str, higher_is_better: bool, value: Option<f64>) -> Metric {
    Metric::new(name, unit, higher_is_better, None, value, None)
}

/// Median and p99 (nearest rank: the maximum below 100 samples) of `values`.
fn median_p99(values: &[f64]) -> (Option<f64>, Option<f64>) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    (stats(values).map(|s| s.median), (!sorted.is_empty()).then(|| quantile(&sorted, 0.99)))
}

fn metrics(raw: &BrokerRaw) -> Vec<Metric> {
    let (guest, guest_p99) = median_p99(&raw.connect_guest_ms);
    let (host, host_p99) = median_p99(&raw.connect_host_ms);
    let (ssh, ssh_p99) = median_p99(&raw.ssh_ms);
    vec![
        mm_only("tcp_guest_to_guest", "MiB/s", true, crate::devbench::mib_per_s(raw.receiver_bytes, raw.sender_ns)),
        mm_only("tcp_connect_guest", "ms", false, guest),
        mm_only("tcp_connect_guest_p99", "ms", false, guest_p99),
        mm_only("tcp_connect_host", "ms", false, host),
        mm_only("tcp_connect_host_p99", "ms", false, host_p99),
        mm_only("ssh_command", "ms", false, ssh),
        mm_only("ssh_command_p99", "ms", false, ssh_p99),
    ]
}

/// Runs the broker part. Signals must be blocked (`brokered::block_signals`)
/// before any thread starts; `signals` is that set.
pub fn run(args: &BrokerArgs, common: &CommonArgs, log_dir: &Path, signals: libc::sigset_t) -> Result<BrokerPart> {
    if args.connects == 0 || args.ssh_runs == 0 {
        bail!("--connects and --ssh-runs must be at least 1");
    }
    std::fs::create_dir_all(log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let mut raw = BrokerRaw {
        mmctl: crate::version_of(&mm_integration::workspace_binary("mmctl")?),
        mm_broker: crate::version_of(&mm_integration::workspace_binary("mm-broker")?),
        network_cidr: CIDR,
        other_vms_at_start: machine::other_vmms().len(),
        loadavg_at_start: machine::loadavg(),
        ..BrokerRaw::default()
    };
    let mut warnings = Vec::new();
    if raw.other_vms_at_start > 0 {
        warnings.push(format!("broker part: {} other VM(s) were running on this host", raw.other_vms_at_start));
    }
    let broker = Arc::new(brokered::start_broker("bench-net", &["--network-cidr", CIDR])?);
    brokered::cleanup_on_signal("net", signals, Arc::downgrade(&broker));
    eprintln!("mm-bench: net: broker in {}, microVMs in {CIDR}", broker.dir.0.display());
    let measured = measure(&broker, args, common, &mut raw, &mut warnings);
    // The broker's log is in its scratch directory, which goes with it.
    let log = log_dir.join("broker.log");
    let _ = std::fs::write(&log, broker.log());
    // Last reference (unless a signal's cleanup holds one): its Drop removes
    // the microVMs, ends the broker and deletes its namespace.
    drop(broker);
    drop(brokered::CLEANUP.lock());
    measured.with_context(|| format!("broker log: {}", log.display()))?;
    raw.loadavg_at_end = machine::loadavg();
    let metrics = metrics(&raw);
    let notes = vec![
        format!(
            "broker part (mm only, no QEMU counterpart): two microVMs of the built-in image on mm-broker's bridge \
             ({CIDR}, in its own namespace); the first of each series is left out (JSON: *_first_ms)"
        ),
        "tcp_guest_to_guest: mm-init tcp-bench in tx -> busybox nc in rx, one connection, 64 KiB writes, for \
         secs_per_direction; bytes counted by rx, time by tcp-bench from its first byte to rx's close"
            .into(),
        "tcp_connect_guest: mm-init tcp-connect in tx -> rx:22, connect() alone, sequential".into(),
        "tcp_connect_host: mmctl proxy rx 22 spawned -> first byte of the SSH banner (mmctl start, broker RPC, \
         Vm.connect, the guest's answer)"
            .into(),
        "ssh_command: mmctl ssh -i KEY tx -- true, spawn -> exit (OpenSSH over mmctl proxy)".into(),
        "p99 is nearest rank: with fewer than 100 samples it is the maximum".into(),
    ];
    Ok(BrokerPart { raw, metrics, notes, warnings })
}

/// `mmctl ARGS` that must succeed.
fn mmctl_ok(broker: &TestBroker, args: &[&str], timeout: Duration) -> Result<Run> {
    let run = broker.mmctl(args, timeout).with_context(|| format!("mmctl {}", args.join(" ")))?;
    if run.status != Some(0) {
        bail!("mmctl {} exited with {:?}: {}", args.join(" "), run.status, run.stderr.trim());
    }
    Ok(run)
}

fn measure(
    broker: &TestBroker,
    args: &BrokerArgs,
    common: &CommonArgs,
    raw: &mut BrokerRaw,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let keys = Scratch::new("bench-net-ssh")?;
    let (key, home) = keygen(&keys)?;
    let public = format!("{}.pub", key.display());
    let memory = format!("{}M", common.memory_mib);
    let cpus = common.cpus.to_string();
    let start = Instant::now();
    for vm in [TX, RX] {
        eprintln!("mm-bench: net: mmctl run -d --name {vm}");
        let run_args = [
            "run",
            "-d",
            "--name",
            vm,
            "--cpus",
            &cpus,
            "--memory",
            &memory,
            "--ssh-key",
            &public,
            "--",
            "sleep",
            "1000000",
        ];
        mmctl_ok(broker, &run_args, QUICK)?;
    }
    let deadline = start + Duration::from_secs(common.timeout_secs);
    for vm in [TX, RX] {
        let run = broker.exec_when_ready(vm, &["true"], deadline.saturating_duration_since(Instant::now()))?;
        if run.status != Some(0) {
            bail!("{vm} does not take commands: {:?} {}", run.status, run.stderr.trim());
        }
        raw.ready_ms.push(ms(start.elapsed()));
    }
    eprintln!("mm-bench: net: both microVMs ready after {:.1} s", start.elapsed().as_secs_f64());
    raw.guest = broker.inspect(TX)?;
    let rx_ip = broker.inspect(RX)?["ip"].as_str().context("rx has no address")?.to_string();

    throughput(broker, &rx_ip, common.secs, raw, warnings)?;

    eprintln!("mm-bench: net: {} connects {TX} -> {RX}:{SSH_PORT}", args.connects + 1);
    let target = format!("{rx_ip}:{SSH_PORT}");
    let count = (args.connects + 1).to_string();
    let run = mmctl_ok(broker, &["exec", TX, "--", "/init", "tcp-connect", &target, &count], QUICK)?;
    let times: Vec<f64> = run
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("mmbench: connect ns="))
        .filter_map(|ns| ns.trim().parse::<f64>().ok())
        .map(|ns| ns / 1e6)
        .collect();
    if times.len() != args.connects + 1 {
        bail!("tcp-connect printed {} times of {count}:\n{}", times.len(), run.stdout);
    }
    raw.connect_guest_first_ms = times[0];
    raw.connect_guest_ms = times[1..].to_vec();

    eprintln!("mm-bench: net: {} x mmctl proxy {RX} {SSH_PORT}", args.connects + 1);
    let mut host = Vec::new();
    for _ in 0..=args.connects {
        host.push(ms(proxy_first_byte(broker)?));
    }
    raw.connect_host_first_ms = host[0];
    raw.connect_host_ms = host[1..].to_vec();

    eprintln!("mm-bench: net: {} x mmctl ssh {TX} -- true", args.ssh_runs + 1);
    for i in 0..=args.ssh_runs {
        let key = key.to_str().context("key path is not UTF-8")?;
        let mut cmd = broker.mmctl_command(&["ssh", "-i", key, TX, "--", "true"])?;
        cmd.env("HOME", &home);
        let run = run_with_timeout(cmd, QUICK)?;
        if run.status != Some(0) {
            bail!("mmctl ssh {TX} -- true exited with {:?}: {}", run.status, run.stderr.trim());
        }
        match i {
            0 => raw.ssh_first_ms = ms(run.elapsed),
            _ => raw.ssh_ms.push(ms(run.elapsed)),
        }
    }
    Ok(())
}

/// A fresh ed25519 key without a passphrase, and a scratch HOME for ssh
/// (its known_hosts goes there, not into the user's).
fn keygen(dir: &Scratch) -> Result<(PathBuf, PathBuf)> {
    let key = mm_integration::ssh_keygen(dir, "id_ed25519")?;
    let home = dir.path("home");
    std::fs::create_dir_all(&home)?;
    Ok((key, home))
}

/// The receiver in `rx`: busybox nc takes tcp-bench's upload (`wc -c`
/// counts it), then its second connection (which asks for a download and
/// gets an empty one: only the upload is measured), then prints the count.
fn receiver_script() -> String {
    format!(
        "nc -l -p {PORT} -e sh -c 'wc -c > /tmp/rx' && nc -l -p {PORT} -e sh -c 'head -c 1 > /dev/null'; cat /tmp/rx"
    )
}

/// Parses tcp-bench's `mmbench: guest_to_host bytes=B ops=O ns=N`.
fn upload_line(stdout: &str) -> Option<(u64, u64)> {
    let line = stdout.lines().find_map(|l| l.strip_prefix("mmbench: guest_to_host "))?;
    let field = |key: &str| line.split_whitespace().find_map(|kv| kv.strip_prefix(key)?.parse().ok());
    Some((field("bytes=")?, field("ns=")?))
}

fn throughput(
    broker: &TestBroker,
    rx_ip: &str,
    secs: u64,
    raw: &mut BrokerRaw,
    warnings: &mut Vec<String>,
) -> Result<()> {
    eprintln!("mm-bench: net: tcp-bench {TX} -> {RX} ({rx_ip}:{PORT}) for {secs} s");
    let receiver = broker.mmctl_command(&["exec", RX, "--", "sh", "-c", &receiver_script()])?;
    let timeout = Duration::from_secs(secs + 300);
    let receiver = std::thread::spawn(move || run_with_timeout(receiver, timeout));
    // tcp-bench retries its connect until the receiver listens.
    let target = format!("{rx_ip}:{PORT}");
    let sender = broker.mmctl(&["exec", TX, "--", "/init", "tcp-bench", &target, &secs.to_string()], timeout)?;
    // Checked before waiting for the receiver, which would wait for a
    // sender that gave up (removing the microVMs ends it).
    let (bytes, ns) = upload_line(&sender.stdout).with_context(|| {
        format!("tcp-bench in {TX} printed no result ({:?}): {}{}", sender.status, sender.stdout, sender.stderr)
    })?;
    if sender.status != Some(0) {
        warnings.push(format!("tcp-bench in {TX} exited with {:?} after its upload", sender.status));
    }
    let received = receiver.join().map_err(|_| anyhow::anyhow!("receiver thread panicked"))??;
    let counted: u64 = received.stdout.trim().parse().with_context(|| {
        format!("the receiver in {RX} counted nothing ({:?}): {}{}", received.status, received.stdout, received.stderr)
    })?;
    // The receiver counted tcp-bench's direction byte too.
    if counted != bytes + 1 {
        bail!("{RX} received {} bytes, {TX} sent {bytes}", counted.saturating_sub(1));
    }
    raw.sender_bytes = bytes;
    raw.sender_ns = ns;
    raw.receiver_bytes = counted - 1;
    eprintln!(
        "mm-bench: net: guest->guest {bytes} bytes in {:.1} s: {:.3} MiB/s",
        ns as f64 / 1e9,
        crate::devbench::mib_per_s(bytes, ns).unwrap_or_default()
    );
    Ok(())
}

/// Waits up to `timeout` for `fd` to be readable.
fn readable(fd: i32, timeout: Duration) -> Result<bool> {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    if n < 0 {
        bail!("poll: {}", std::io::Error::last_os_error());
    }
    Ok(n > 0)
}

/// Ends our own child: waits briefly for it to exit by itself, then
/// SIGKILLs it by its pid.
fn reap(mut child: Child) {
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on the pid of our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
}

/// `mmctl proxy rx 22` spawned → the first byte of the guest's SSH banner.
fn proxy_first_byte(broker: &TestBroker) -> Result<Duration> {
    let mut cmd = broker.mmctl_command(&["proxy", RX, &SSH_PORT.to_string()])?;
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null());
    let start = Instant::now();
    let mut child = cmd.spawn().context("spawning mmctl proxy")?;
    let mut stdout = child.stdout.take().context("no stdout")?;
    let result = (|| {
        if !readable(stdout.as_raw_fd(), Duration::from_secs(60))? {
            bail!("no answer through mmctl proxy {RX} {SSH_PORT} within 60 s");
        }
        let elapsed = start.elapsed();
        let mut first = [0u8; 4];
        let n = stdout.read(&mut first)?;
        if !b"SSH-".starts_with(&first[..n]) || n == 0 {
            bail!("mmctl proxy {RX} {SSH_PORT} answered {:?}, not an SSH banner", String::from_utf8_lossy(&first[..n]));
        }
        Ok(elapsed)
    })();
    // Our end of input: the proxy half-closes toward the guest and ends.
    drop(child.stdin.take());
    drop(stdout);
    reap(child);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_upload_line() {
        let out = "mmbench: start\nmmbench: guest_to_host bytes=1048576 ops=16 ns=2000000000\nmmbench: done\n";
        assert_eq!(upload_line(out), Some((1 << 20, 2_000_000_000)));
        assert_eq!(upload_line("mmbench: start\n"), None);
    }

    #[test]
    fn metrics_are_mm_only() {
        let raw = BrokerRaw {
            receiver_bytes: 1 << 20,
            sender_ns: 2_000_000_000,
            connect_guest_ms: vec![3.0, 1.0, 2.0],
            connect_host_ms: vec![10.0, 30.0],
            ssh_ms: vec![500.0],
            ..BrokerRaw::default()
        };
        let m = metrics(&raw);
        let value = |name: &str| m.iter().find(|m| m.name == name).unwrap();
        assert_eq!(value("tcp_guest_to_guest").mm, Some(0.5));
        assert_eq!((value("tcp_connect_guest").mm, value("tcp_connect_guest_p99").mm), (Some(2.0), Some(3.0)));
        assert_eq!((value("tcp_connect_host").mm, value("tcp_connect_host_p99").mm), (Some(20.0), Some(30.0)));
        assert_eq!(value("ssh_command").mm, Some(500.0));
        assert!(m.iter().all(|m| m.qemu.is_none() && m.host.is_none() && m.mm_over_qemu.is_none()));
        assert_eq!(metrics(&BrokerRaw::default())[1].mm, None);
    }

    #[test]
    fn the_receiver_listens_twice_then_reports() {
        let script = receiver_script();
        assert_eq!(script.matches(&format!("nc -l -p {PORT}")).count(), 2);
        assert!(script.ends_with("cat /tmp/rx"));
    }
}
