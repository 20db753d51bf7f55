//! "Is the guest answering?": the probes the snapshot benchmark times from
//! a cold boot and from a restore.
//!
//! * `exec_until`: mm-init's exec agent runs `true` and sends its exit
//!   status, through a hybrid vsock unix socket (`CONNECT 1024\n`, `OK …`).
//!   mm-device vsock and Firecracker's vsock speak the same protocol (it is
//!   Firecracker's), so both are probed by the same code.
//! * `ping_until`: for QEMU, which has no vsock device here (that would
//!   need /dev/vhost-vsock): a line `ping N` written to its serial input,
//!   answered by the workload's shell loop with `mmpong ping N`.
//!
//! Both retry until an answer comes: while the guest boots or handles its
//! transport reset, an attempt is refused or dropped.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ChildStdin;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use mm_exec_protocol::{EXEC_PORT, ExecClient, ExecRequest, ExitStatus};

use crate::vm::Vm;

/// What the workload prints every tick, and in answer to a serial ping.
pub const TICK: &str = "mmtick ";
pub const PONG: &str = "mmpong ";

/// The guest workload, two loops of shell builtins (a fork and exec costs
/// about a second of emulated kernel work on PVM hosts), both started at
/// boot: one prints `mmtick N` every `tick_ms` (its sleep is `read -t` on
/// a FIFO nobody writes), the other answers each line read from the
/// serial port with `mmpong LINE`. Two loops, so that pings do not delay
/// ticks and ticks do not delay pings.
pub fn workload(tick_ms: u64) -> Vec<String> {
    let secs = format!("{}.{:03}", tick_ms / 1000, tick_ms % 1000);
    let script = format!(
        "mkfifo /dev/mmtick; exec 4<>/dev/mmtick; \
         (i=0; while :; do read -t {secs} x <&4; i=$((i+1)); echo \"{TICK}$i\"; done) & \
         exec 3</dev/ttyS0; while read l <&3; do echo \"{PONG}$l\"; done"
    );
    vec!["sh".into(), "-c".into(), script]
}

/// One exec of `true`, each step bounded by `timeout`.
fn exec_once(uds: &Path, timeout: Duration) -> Result<()> {
    exec_output(uds, &["true"], timeout).map(drop)
}

/// Runs `argv` in the guest through the exec agent behind the hybrid vsock
/// socket `uds`, each step bounded by `timeout`; its stdout. A non-zero
/// exit is an error.
pub fn exec_output(uds: &Path, argv: &[&str], timeout: Duration) -> Result<String> {
    let mut stream = UnixStream::connect(uds)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(format!("CONNECT {EXEC_PORT}\n").as_bytes())?;
    // Byte by byte: what follows the newline is the agent's stream.
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while answer.len() < 64 && stream.read(&mut byte)? == 1 && byte[0] != b'\n' {
        answer.push(byte[0]);
    }
    if !answer.starts_with(b"OK ") {
        bail!("refused: {:?}", String::from_utf8_lossy(&answer));
    }
    let mut stdout = Vec::new();
    let status = ExecClient::from_stream(stream).run(
        &ExecRequest::new(argv.iter().copied()),
        std::io::empty(),
        &mut stdout,
        std::io::sink(),
    )?;
    if status != ExitStatus::Exited(0) {
        bail!("`{}` ended with {status}", argv.join(" "));
    }
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}

/// Execs `true` through `uds` until it succeeds or `deadline` passes,
/// `retry` between attempts; when the answer came and how many attempts
/// it took.
pub fn exec_until(uds: &Path, retry: Duration, deadline: Instant) -> Result<(Instant, usize)> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        // A guest busy booting answers late, not never: up to 30 s per try.
        match exec_once(uds, left.min(Duration::from_secs(30))) {
            Ok(()) => return Ok((Instant::now(), attempts)),
            Err(e) if Instant::now() >= deadline => {
                bail!("no exec answer through {} after {attempts} attempt(s): {e:#}", uds.display())
            }
            Err(_) => std::thread::sleep(retry),
        }
    }
}

/// Writes `ping TAG N` lines to the guest's serial input every
/// `interval` until a `mmpong ping TAG …` line arrives on its console;
/// when it arrived, and how many pings were sent. The tag tells this
/// call's answers from late answers to an earlier call's pings.
pub fn ping_until(
    vm: &mut Vm,
    stdin: &mut ChildStdin,
    tag: &str,
    interval: Duration,
    deadline: Instant,
) -> Result<(Instant, usize)> {
    let answer = format!("{PONG}ping {tag} ");
    for n in 1.. {
        stdin.write_all(format!("ping {tag} {n}\n").as_bytes())?;
        stdin.flush()?;
        let next = (Instant::now() + interval).min(deadline);
        if let Some((at, _)) = vm.poll_for(&answer, next)? {
            return Ok((at, n));
        }
        if Instant::now() >= deadline {
            bail!("no answer to {n} serial ping(s)");
        }
    }
    unreachable!("1.. does not end")
}

/// Reads console lines until none containing `needle` has come for
/// `quiet`: late answers to earlier pings (a guest that is still starting
/// its shell lets them queue up) must not be taken for the next one's.
pub fn drain(vm: &mut Vm, needle: &str, quiet: Duration, deadline: Instant) -> Result<()> {
    while vm.poll_for(needle, (Instant::now() + quiet).min(deadline))?.is_some() {
        if Instant::now() >= deadline {
            bail!("still answering old pings at the deadline");
        }
    }
    Ok(())
}

/// The arrival of the first tick line that came after `after` (older ones
/// may still be queued).
pub fn tick_after(vm: &mut Vm, after: Instant, deadline: Instant) -> Result<Instant> {
    loop {
        let (at, _) = vm.wait_for(TICK, deadline)?;
        if at > after {
            return Ok(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workload_ticks_and_answers() {
        let w = workload(100);
        assert_eq!(w[..2], ["sh", "-c"]);
        assert!(w[2].contains("read -t 0.100 x <&4"), "{}", w[2]);
        assert!(w[2].contains("echo \"mmpong $l\"") && w[2].contains("echo \"mmtick $i\""), "{}", w[2]);
        assert!(workload(1500)[2].contains("read -t 1.500 "));
    }

    #[test]
    fn the_workload_runs_in_busybox_sh() {
        // The guest's shell is the host's busybox (guest/rootfs/populate.sh).
        if !Path::new("/bin/busybox").exists() {
            return;
        }
        // Stand-ins: a FIFO in a scratch directory for /dev/mmtick, stdin
        // (a pipe) for /dev/ttyS0, and three ticks instead of forever.
        let dir = std::env::temp_dir().join(format!("mm-bench-workload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = workload(50)[2]
            .replace("/dev/mmtick", &dir.join("tick").display().to_string())
            .replace("exec 3</dev/ttyS0", "exec 3<&0")
            .replace("while :", "while [ $i -lt 3 ]");
        let mut child = std::process::Command::new("/bin/busybox")
            .args(["sh", "-c", &script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"ping 1\n").unwrap();
        std::thread::sleep(Duration::from_millis(400));
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(text.starts_with("mmpong ping 1\n"), "{text:?}");
        assert!(text.contains("mmtick 1\nmmtick 2\nmmtick 3\n"), "{text:?}");
    }
}
