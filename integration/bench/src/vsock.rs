//! `mm-bench vsock`: round-trip latency of small messages (median and p99)
//! and echo throughput through the hybrid vsock (`mm-device vsock`: a host
//! unix socket, `CONNECT <port>\n`) to mm-init's `vsock-echo` in the guest.
//!
//! QEMU is not compared: microvm's only vsock device is
//! `vhost-vsock-device`, the in-kernel vhost back end, which needs
//! `/dev/vhost-vsock` (and would compare our process with the host kernel,
//! not with QEMU's own code). The host reference is the same ping-pong and
//! echo over a unix socket pair to a thread: the floor of the host side.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use mm_integration::devices::{DeviceProcess, Scratch};
use serde::Serialize;

use crate::System;
use crate::devbench::{self, CommonArgs, DeviceReport, GuestDevice, GuestSetup, Metric, deadline};
use crate::machine::Machine;
use crate::report::quantile;
use crate::vm::Results;

const PORT: u32 = 5000;
/// Round trips before the measured ones: first-use costs (page faults,
/// credit updates) out of the figures.
const WARMUP: usize = 20;

#[derive(Debug, Args)]
pub struct VsockArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Size of each ping-pong message.
    #[arg(long, default_value_t = 64)]
    pub message_bytes: usize,
    /// At most this many measured round trips (also capped by --secs).
    #[arg(long, default_value_t = 5000)]
    pub round_trips: usize,
    /// Bytes sent through the echo for the throughput figure, MiB (capped by --secs).
    #[arg(long, default_value_t = 64)]
    pub bulk_mib: u64,
}

/// What one endpoint measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Figures {
    pub round_trips: usize,
    pub rtt_median_us: f64,
    pub rtt_p99_us: f64,
    pub rtt_max_us: f64,
    /// Bytes echoed (each crossed both ways) and the time they took.
    pub echo_bytes: u64,
    pub echo_ns: u64,
}

/// Ping-pong then bulk echo over `stream`, whose peer echoes everything.
/// Ends by half-closing, so an echo peer sees EOF.
fn measure(stream: UnixStream, args: &VsockArgs) -> Result<Figures> {
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let limit = Duration::from_secs(args.common.secs);
    let mut reader = stream.try_clone()?;
    let mut writer = stream;
    let message: Vec<u8> = (0..args.message_bytes).map(|i| i as u8).collect();
    let mut back = vec![0u8; args.message_bytes];
    let mut rtts = Vec::with_capacity(args.round_trips);
    let start = Instant::now();
    for i in 0..WARMUP + args.round_trips {
        let t = Instant::now();
        writer.write_all(&message).context("ping")?;
        reader.read_exact(&mut back).context("pong")?;
        if back != message {
            bail!("round trip {i}: the echo differs");
        }
        if i >= WARMUP {
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
            if start.elapsed() >= limit {
                break;
            }
        }
    }
    rtts.sort_by(f64::total_cmp);

    // Bulk: a writer thread streams, this thread reads the echo back; the
    // clock stops when the last byte is back (or at --secs).
    let total = args.bulk_mib << 20;
    let chunk = vec![0xa5u8; 64 * 1024];
    let start = Instant::now();
    let writer_thread = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut sent = 0u64;
        while sent < total && start.elapsed() < limit {
            let n = (total - sent).min(chunk.len() as u64) as usize;
            writer.write_all(&chunk[..n])?;
            sent += n as u64;
        }
        writer.shutdown(std::net::Shutdown::Write)?;
        Ok(sent)
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0u64;
    loop {
        let n = reader.read(&mut buf).context("reading the echo")?;
        if n == 0 {
            break;
        }
        received += n as u64;
    }
    let echo_ns = start.elapsed().as_nanos() as u64;
    let sent = writer_thread.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    if sent != received {
        bail!("sent {sent} bytes, {received} came back");
    }
    Ok(Figures {
        round_trips: rtts.len(),
        rtt_median_us: quantile(&rtts, 0.5),
        rtt_p99_us: quantile(&rtts, 0.99),
        rtt_max_us: rtts.last().copied().unwrap_or(f64::NAN),
        echo_bytes: received,
        echo_ns,
    })
}

/// The host floor: the same measurement against an echo thread.
fn host_reference(args: &VsockArgs) -> Result<Figures> {
    let (ours, mut theirs) = UnixStream::pair()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = theirs.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            theirs.write_all(&buf[..n])?;
        }
    });
    let figures = measure(ours, args)?;
    echo.join().map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
    Ok(figures)
}

pub fn run(args: VsockArgs) -> Result<()> {
    let out = args.common.out("vsock");
    let log_dir = out.parent().unwrap_or(std::path::Path::new(".")).join("vsock-logs");
    let machine = Machine::detect();
    let mut warnings = Vec::new();
    let config = args.common.boot_config(vec!["/init".into(), "vsock-echo".into(), PORT.to_string()]);

    eprintln!("mm-bench: vsock: host: ping-pong and echo over a unix socket pair");
    let host = host_reference(&args)?;

    let dir = Scratch::new("bench-vsock")?;
    let uds = dir.path("vsock.uds");
    let socket = dir.path("vsock.sock");
    let uds_arg = uds.to_str().context("path is not UTF-8")?;
    let _device = DeviceProcess::spawn("vsock", &socket, &["--guest-cid", "3", "--uds", uds_arg])?;
    let device = GuestDevice { mm: Some(("vsock", socket.as_path())), qemu_args: Vec::new(), qemu_fds: Vec::new() };
    let until = deadline(args.common.timeout_secs);
    let mut started = devbench::start(System::Mm, 1, &config, &device, &log_dir)?;
    started.vm.wait_for(&format!("vsock-echo listening on {PORT}"), until)?;
    let stream = UnixStream::connect(&uds).with_context(|| format!("connecting to {uds_arg}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    (&stream).write_all(format!("CONNECT {PORT}\n").as_bytes())?;
    // Read the reply byte by byte: a BufReader could swallow echoed bytes.
    let mut ok = Vec::new();
    let mut byte = [0u8];
    while ok.last() != Some(&b'\n') {
        if (&stream).read(&mut byte)? == 0 {
            bail!("the vsock device closed the connection after CONNECT");
        }
        ok.push(byte[0]);
    }
    if !ok.starts_with(b"OK ") {
        bail!("CONNECT {PORT} answered {:?}", String::from_utf8_lossy(&ok));
    }
    eprintln!("mm-bench: vsock: mm: connected; measuring");
    let mm = measure(stream, &args)?;
    started.vm.wait_for("vsock-echo done", until)?;
    let runs = vec![devbench::finish(started, Results::new(), &config, &mut warnings)?];

    let echo = |f: &Figures| devbench::mib_per_s(f.echo_bytes, f.echo_ns);
    let metrics = vec![
        Metric::new("rtt_median", "us", false, Some(host.rtt_median_us), Some(mm.rtt_median_us), None),
        Metric::new("rtt_p99", "us", false, Some(host.rtt_p99_us), Some(mm.rtt_p99_us), None),
        Metric::new("echo_throughput", "MiB/s", true, echo(&host), echo(&mm), None),
    ];
    let report = DeviceReport {
        benchmark: "vsock",
        unix_time: 0,
        source: String::new(),
        machine,
        guest: GuestSetup::new(&config)?,
        parameters: serde_json::json!({
            "message_bytes": args.message_bytes,
            "max_round_trips": args.round_trips,
            "bulk_mib": args.bulk_mib,
            "secs_cap": args.common.secs,
        }),
        raw: serde_json::json!({ "host_unix_socketpair": host, "mm": mm }),
        metrics,
        targets: Vec::new(),
        systems: runs,
        notes: vec![
            format!(
                "rtt: host writes {} bytes to the hybrid vsock's unix socket, the guest's vsock-echo sends them \
                 back; {WARMUP} warm-up round trips not counted",
                args.message_bytes
            ),
            "echo_throughput: bytes streamed host -> guest -> host through the echo, per second (each byte \
             crosses the device twice)"
                .into(),
            "QEMU not compared: microvm's vsock is vhost-vsock-device (in-kernel, needs /dev/vhost-vsock, \
             absent on this host)"
                .into(),
            "host = the same measurement over a unix socket pair to an echo thread".into(),
        ],
        warnings,
    };
    report.emit(&out, args.common.json)
}
