//! `mm-bench net`: guest ↔ host TCP throughput through a virtio-net device
//! on a TAP, served by `mm-device net` for mm-vmm and by QEMU's in-process
//! `virtio-net-device` (`-netdev tap,fd=N,vhost=off`) for microvm.
//!
//! Every packet stays inside a network namespace the benchmark creates
//! (`mm_integration::netns::TestNetwork`): the TAPs are on its bridge, the
//! host end has an address on that bridge, and the host side of each
//! transfer runs on a thread that has entered the namespace (setns affects
//! only the calling thread). The namespace is deleted when the benchmark
//! ends, whatever happens.
//!
//! The guest runs mm-init's `tcp-bench` (guest/init/src/tools.rs): one
//! connection per direction, each for `--secs`. The figures are the host's
//! clock: guest → host from the direction byte to the EOF, host → guest
//! from the first byte sent to the guest's byte count coming back. The
//! host reference is the same tool on the host, over loopback inside the
//! namespace: what the host's TCP stack does without a VM in the way.
//!
//! A second part (netbroker.rs, before this one; `--skip-broker`,
//! `--broker-only`) measures what a user of mm-broker gets: guest ↔ guest
//! throughput, connect latencies and `mmctl ssh`. Its metrics have only an
//! `mm` column, in the same report.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use mm_integration::devices::{DeviceProcess, Scratch};
use mm_integration::netns::TestNetwork;
use serde::Serialize;

use crate::devbench::{self, CommonArgs, DeviceReport, GuestDevice, GuestSetup, Metric, deadline};
use crate::machine::Machine;
use crate::netbroker::BrokerArgs;
use crate::vm::Results;
use crate::{System, brokered, netbroker};

const HOST_IP: &str = "10.78.0.1";
const PORT: u16 = 5201;
const TAP_FD: i32 = 3;
const CHUNK: usize = 64 * 1024;

#[derive(Debug, Args)]
pub struct NetArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

/// One transfer as the host saw it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Transfer {
    pub bytes: u64,
    pub ns: u64,
}

/// What the host side measured for one guest (or the loopback reference).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct HostView {
    pub guest_to_host: Option<Transfer>,
    pub host_to_guest: Option<Transfer>,
}

/// Enters the namespace on this thread only.
fn enter(netns: &str) -> Result<()> {
    let ns = File::open(format!("/run/netns/{netns}")).context("opening the namespace")?;
    // SAFETY: setns on a valid namespace fd; it changes only this thread's
    // network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns into {netns}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Serves one `tcp-bench` run (two connections) on `addr` inside `netns`,
/// on its own thread. Returns once the listener is bound, so a bind error
/// shows before any guest boots.
fn serve(netns: String, addr: String, secs: u64, until: Instant) -> Result<JoinHandle<Result<HostView>>> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let handle = std::thread::spawn(move || -> Result<HostView> {
        let bound = enter(&netns).and_then(|()| TcpListener::bind(&addr).with_context(|| format!("binding {addr}")));
        let listener = match bound {
            Ok(l) => {
                let _ = ready_tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = ready_tx.send(Err(format!("{e:#}")));
                return Err(e);
            }
        };
        listener.set_nonblocking(true)?;
        let mut view = HostView::default();
        while view.guest_to_host.is_none() || view.host_to_guest.is_none() {
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > until {
                        bail!("the guest did not connect to {addr} in time");
                    }
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(e) => return Err(e).context("accept"),
            };
            stream.set_nonblocking(false)?;
            stream.set_read_timeout(Some(Duration::from_secs(120)))?;
            stream.set_write_timeout(Some(Duration::from_secs(120)))?;
            let (direction, transfer) = transfer(stream, secs)?;
            match direction {
                b'U' => view.guest_to_host = Some(transfer),
                _ => view.host_to_guest = Some(transfer),
            }
        }
        Ok(view)
    });
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => bail!("host side of the TCP benchmark: {e}"),
        Err(_) => bail!("host side of the TCP benchmark ended before listening"),
    }
}

/// The host end of one `tcp-bench` connection (its protocol is in
/// guest/init/src/tools.rs: a direction byte, then the data).
fn transfer(mut stream: TcpStream, secs: u64) -> Result<(u8, Transfer)> {
    let mut direction = [0u8];
    stream.read_exact(&mut direction).context("reading the direction byte")?;
    let start = Instant::now();
    let mut bytes = 0u64;
    match direction[0] {
        b'U' => {
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = stream.read(&mut buf).context("receiving")?;
                if n == 0 {
                    break;
                }
                bytes += n as u64;
            }
        }
        b'D' => {
            let chunk = vec![0x5au8; CHUNK];
            let limit = Duration::from_secs(secs);
            while start.elapsed() < limit {
                stream.write_all(&chunk).context("sending")?;
                bytes += CHUNK as u64;
            }
            stream.shutdown(Shutdown::Write)?;
            let mut count = [0u8; 8];
            stream.read_exact(&mut count).context("reading the guest's byte count")?;
            if u64::from_le_bytes(count) != bytes {
                bail!("the guest received {} bytes of {bytes}", u64::from_le_bytes(count));
            }
        }
        other => bail!("unknown direction byte {other:#x}"),
    }
    let ns = start.elapsed().as_nanos() as u64;
    Ok((direction[0], Transfer { bytes, ns }))
}

fn rate(t: Option<Transfer>) -> Option<f64> {
    t.and_then(|t| devbench::mib_per_s(t.bytes, t.ns))
}

/// What the device part (bare mm-vmm and QEMU on a TAP) measured.
struct DevicePart {
    netns: String,
    host: HostView,
    views: Vec<(System, usize, HostView)>,
    runs: Vec<devbench::SystemRun>,
}

pub fn run(args: NetArgs) -> Result<()> {
    let out = args.common.out("net");
    let log_dir = out.parent().unwrap_or(std::path::Path::new(".")).join("net-logs");
    let machine = Machine::detect();
    let mut warnings = Vec::new();
    // The broker part first: its signal handling needs the signals blocked
    // before any thread starts; they are unblocked once the broker is gone.
    let broker = if args.broker.skip_broker {
        None
    } else {
        let signals = brokered::block_signals()?;
        let part = netbroker::run(&args.broker, &args.common, &log_dir, signals);
        brokered::unblock_signals(&signals);
        Some(part?)
    };
    let devices = if args.broker.broker_only { None } else { Some(devices(&args, &log_dir, &mut warnings)?) };

    let of = |system: System, f: fn(&HostView) -> Option<Transfer>| {
        let views = devices.iter().flat_map(|d| &d.views);
        devbench::median(views.filter(|(s, _, _)| *s == system).map(|(_, _, v)| rate(f(v))))
    };
    let host = devices.as_ref().map(|d| d.host).unwrap_or_default();
    let mut metrics = Vec::new();
    if devices.is_some() {
        metrics.extend([
            Metric::new(
                "tcp_guest_to_host",
                "MiB/s",
                true,
                rate(host.guest_to_host),
                of(System::Mm, |v| v.guest_to_host),
                of(System::Qemu, |v| v.guest_to_host),
            ),
            Metric::new(
                "tcp_host_to_guest",
                "MiB/s",
                true,
                rate(host.host_to_guest),
                of(System::Mm, |v| v.host_to_guest),
                of(System::Qemu, |v| v.host_to_guest),
            ),
        ]);
    }
    let mut notes: Vec<String> = Vec::new();
    if devices.is_some() {
        notes.extend([
            "one TCP connection per direction, 64 KiB writes, for secs_per_direction; figures from the host's clock"
                .into(),
            "host = mm-init tcp-bench on the host over loopback inside the namespace (no VM, no TAP): a \
         ceiling, not a like-for-like figure"
                .into(),
            "QEMU: -netdev tap,fd=N,vhost=off -device virtio-net-device (in-process, no vhost-net)".into(),
        ]);
    }
    if let Some(part) = &broker {
        metrics.extend(part.metrics.iter().cloned());
        notes.extend(part.notes.iter().cloned());
        warnings.extend(part.warnings.iter().cloned());
    }
    let raw_runs: Vec<serde_json::Value> = devices
        .iter()
        .flat_map(|d| &d.views)
        .map(|(s, run, v)| serde_json::json!({ "system": s.name(), "run": run, "host_view": v }))
        .collect();
    let report = DeviceReport {
        benchmark: "net",
        unix_time: 0,
        source: String::new(),
        machine,
        // What the device part boots (for the first system, as before).
        guest: GuestSetup::new(&args.common.boot_config(vec![
            "sh".into(),
            "-c".into(),
            workload(&args.common.secs.to_string(), guest_n(args.common.systems().first().copied())),
        ]))?,
        parameters: serde_json::json!({
            "secs_per_direction": args.common.secs,
            "runs": args.common.runs,
            "netns": devices.as_ref().map(|d| d.netns.clone()),
            "connects": (!args.broker.skip_broker).then_some(args.broker.connects),
            "ssh_runs": (!args.broker.skip_broker).then_some(args.broker.ssh_runs),
        }),
        raw: serde_json::json!({
            "host_loopback": devices.as_ref().map(|d| d.host),
            "runs": raw_runs,
            "broker": broker.as_ref().map(|b| &b.raw),
        }),
        metrics,
        targets: Vec::new(),
        systems: devices.map(|d| d.runs).unwrap_or_default(),
        notes,
        warnings,
    };
    report.emit(&out, args.common.json)
}

/// The last byte of a device-part guest's address (and MAC).
fn guest_n(system: Option<System>) -> u8 {
    if system == Some(System::Qemu) { 3 } else { 2 }
}

/// The device part's guest script: address eth0, then tcp-bench.
fn workload(secs: &str, n: u8) -> String {
    format!(
        "ip addr add 10.78.0.{n}/24 dev eth0 && ip link set eth0 up && exec /init tcp-bench {HOST_IP}:{PORT} {secs}"
    )
}

/// The device part: the host reference over loopback, then each system's
/// guest against the host side, on a TAP in a namespace of our own.
fn devices(args: &NetArgs, log_dir: &std::path::Path, warnings: &mut Vec<String>) -> Result<DevicePart> {
    let secs = args.common.secs;
    let network = TestNetwork::new("bench")?;
    let ns = network.name.clone();
    let ip = |args: &[&str]| -> Result<()> {
        let out = std::process::Command::new("ip").args(["-n", &ns]).args(args).output()?;
        if !out.status.success() {
            bail!("ip -n {ns} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    };
    ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", "br0"])?;
    let sockets = Scratch::new("bench-net")?;

    // The reference: the same tool on the host, over loopback, in the namespace.
    eprintln!("mm-bench: net: host: tcp-bench over loopback in {ns} ({secs} s each way)");
    let server = serve(ns.clone(), format!("127.0.0.1:{PORT}"), secs, deadline(60))?;
    let mm_init = devbench::mm_init_binary()?;
    let mm_init_arg = mm_init.to_str().context("mm-init path is not UTF-8")?;
    let loopback = format!("127.0.0.1:{PORT}");
    devbench::run_host_tool(
        std::path::Path::new("ip"),
        &["netns", "exec", &ns, mm_init_arg, "tcp-bench", &loopback, &secs.to_string()],
    )?;
    let host = server.join().map_err(|_| anyhow::anyhow!("host server panicked"))??;

    let mut views = Vec::new();
    let mut runs = Vec::new();
    for run in 1..=args.common.runs {
        for system in args.common.systems() {
            // One address and MAC per system, so the namespace's ARP cache
            // never holds the other guest's MAC for an address.
            let n = guest_n(Some(system));
            let mac = format!("02:00:0a:4e:00:{n:02x}");
            let script = workload(&secs.to_string(), n);
            let config = args.common.boot_config(vec!["sh".into(), "-c".into(), script]);
            // The TAP goes away with its last fd, after this run.
            let tap = network.tap(&format!("mmb-{}-{run}", system.name()))?;
            let socket = sockets.path("net.sock");
            let _device = match system {
                System::Mm => Some(DeviceProcess::spawn_with_fds(
                    "net",
                    &socket,
                    &["--tap-fd", &TAP_FD.to_string(), "--mac", &mac],
                    &[(&tap, TAP_FD)],
                )?),
                System::Qemu => None,
            };
            let device = GuestDevice {
                mm: Some(("net", socket.as_path())),
                // vhost=off: QEMU's own in-process virtio-net, the counterpart
                // of our back end process (and /dev/vhost-net is absent here).
                qemu_args: vec![
                    "-netdev".into(),
                    format!("tap,id=net0,fd={TAP_FD},vhost=off"),
                    "-device".into(),
                    format!("virtio-net-device,netdev=net0,mac={mac}"),
                ],
                qemu_fds: vec![(&tap, TAP_FD)],
            };
            let until = deadline(args.common.timeout_secs);
            let server = serve(ns.clone(), format!("{HOST_IP}:{PORT}"), secs, until)?;
            let mut started = devbench::start(system, run, &config, &device, log_dir)?;
            let results: Results = started.vm.results(until)?;
            let view = server.join().map_err(|_| anyhow::anyhow!("host server panicked"))??;
            eprintln!(
                "mm-bench: net: run {run} {}: guest->host {:?} MiB/s, host->guest {:?} MiB/s",
                system.name(),
                rate(view.guest_to_host),
                rate(view.host_to_guest)
            );
            views.push((system, run, view));
            runs.push(devbench::finish(started, results, &config, warnings)?);
        }
    }
    Ok(DevicePart { netns: ns, host, views, runs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_need_time() {
        assert_eq!(rate(Some(Transfer { bytes: 1 << 20, ns: 1_000_000_000 })), Some(1.0));
        assert_eq!(rate(Some(Transfer { bytes: 1, ns: 0 })), None);
        assert_eq!(rate(None), None);
    }
}
