//! A running guest for the device benchmarks: spawn the VMM (mm-vmm or
//! QEMU), read its console line by line as it arrives, wait for the lines
//! the guest's benchmark tool prints, and end the VMM when the guest is
//! done. Unlike `boot::run`, the caller drives the host side of the
//! benchmark in between (vsock and TCP peers).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::boot::{Ending, Guard, MARKER, console_reader, tail};

/// The prefix of every result line the guest tools print (guest/init/src/tools.rs).
pub const RESULT_PREFIX: &str = "mmbench:";

pub use mm_integration::devices::inherit_fds;

/// A guest whose console we are reading. Its console and stderr are saved
/// as `<log_base>.console` and `.stderr` when it ends, also on errors.
pub struct Vm {
    name: String,
    log_base: Option<PathBuf>,
    guard: Guard,
    pid: u32,
    lines: Receiver<(Instant, String)>,
    stderr: Option<JoinHandle<String>>,
    started: Instant,
    /// Every console line so far.
    pub console: Vec<String>,
    /// When each line of `console` read by `wait_for`/`poll_for` arrived.
    arrivals: Vec<Instant>,
    /// Spawn → `mm-init: user space started`, once seen.
    pub boot_to_init: Option<Duration>,
}

/// How a guest ended.
#[derive(Debug)]
pub struct VmEnd {
    pub ending: Ending,
    pub console: String,
    /// The VMM's whole stderr (mm-vmm's log).
    pub stderr: String,
    /// Spawn → exit or kill.
    pub total: Duration,
}

/// Makes the VMM `cmd` starts die with the thread that starts it (the
/// benchmark's main thread): a benchmark ended by Ctrl-C runs no
/// destructors, and a QEMU left running by one was seen.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: between fork and exec the closure calls only prctl(2), which
    // is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl Vm {
    pub fn spawn(name: &str, mut cmd: Command, log_base: Option<PathBuf>) -> Result<Vm> {
        cmd.stdin(Stdio::null());
        Self::spawn_with_stdin(name, cmd, log_base)
    }

    /// Like [`Vm::spawn`], with the stdin `cmd` already has (a pipe, whose
    /// writing end [`Vm::take_stdin`] hands out: QEMU's serial input).
    pub fn spawn_with_stdin(name: &str, mut cmd: Command, log_base: Option<PathBuf>) -> Result<Vm> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        let started = Instant::now();
        let mut guard =
            Guard(Some(cmd.spawn().with_context(|| format!("spawning {}", cmd.get_program().to_string_lossy()))?));
        let pid = guard.child().id();
        let lines = console_reader(guard.child().stdout.take().expect("stdout is piped"));
        let mut pipe = guard.child().stderr.take().expect("stderr is piped");
        let stderr = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        });
        Ok(Vm {
            name: name.to_string(),
            log_base,
            guard,
            pid,
            lines,
            stderr: Some(stderr),
            started,
            console: Vec::new(),
            arrivals: Vec::new(),
            boot_to_init: None,
        })
    }

    /// Waits for a console line containing `needle` until `deadline`; the
    /// line and when it arrived. Fails (with the console's tail) on time-out
    /// or if the VMM closes its console first.
    pub fn wait_for(&mut self, needle: &str, deadline: Instant) -> Result<(Instant, String)> {
        match self.poll_for(needle, deadline)? {
            Some(found) => Ok(found),
            None => bail!(
                "{} (pid {}): no console line with {needle:?} in time; console (last 30 lines):\n{}",
                self.name,
                self.pid,
                tail(&self.console.join("\n"), 30)
            ),
        }
    }

    /// Like [`Vm::wait_for`], but a time-out is `None` rather than an error:
    /// for callers that poke the guest between looks (the snapshot
    /// benchmark's serial pings).
    pub fn poll_for(&mut self, needle: &str, deadline: Instant) -> Result<Option<(Instant, String)>> {
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok((at, line)) => {
                    self.console.push(line.clone());
                    self.arrivals.push(at);
                    if self.boot_to_init.is_none() && line.contains(MARKER) {
                        self.boot_to_init = Some(at.duration_since(self.started));
                    }
                    if line.contains(needle) {
                        return Ok(Some((at, line)));
                    }
                    if line.contains(RESULT_PREFIX) {
                        eprintln!("mm-bench: {}: {}", self.name, line.trim());
                    }
                    if is_failure(&line) {
                        bail!(
                            "{} (pid {}): the guest failed before printing {needle:?}: {line}\n\
                             console (last 30 lines):\n{}",
                            self.name,
                            self.pid,
                            tail(&self.console.join("\n"), 30)
                        );
                    }
                }
                Err(RecvTimeoutError::Timeout) => return Ok(None),
                Err(RecvTimeoutError::Disconnected) => bail!(
                    "{} (pid {}) closed its console before printing {needle:?}; console (last 30 lines):\n{}",
                    self.name,
                    self.pid,
                    tail(&self.console.join("\n"), 30)
                ),
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// When the VMM was spawned.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The first line containing `needle` among those already read, with
    /// its arrival; else waits for one as [`Vm::wait_for`] does.
    pub fn first_line(&mut self, needle: &str, deadline: Instant) -> Result<(Instant, String)> {
        let seen = self.console.iter().zip(&self.arrivals).find(|(line, _)| line.contains(needle));
        match seen {
            Some((line, at)) => Ok((*at, line.clone())),
            None => self.wait_for(needle, deadline),
        }
    }

    /// The writing end of the VMM's stdin, if it was spawned with a pipe.
    pub fn take_stdin(&mut self) -> Option<std::process::ChildStdin> {
        self.guard.child().stdin.take()
    }

    /// Waits for `mmbench: done`, collecting every `mmbench:` result line
    /// on the way.
    pub fn results(&mut self, deadline: Instant) -> Result<Results> {
        let from = self.console.len();
        self.wait_for(&format!("{RESULT_PREFIX} done"), deadline)?;
        Ok(parse_results(&self.console[from..]))
    }

    /// Waits up to `timeout` for the VMM to exit, then kills it (by its
    /// pid); reads the rest of the console and stderr.
    pub fn finish(mut self, timeout: Duration) -> Result<VmEnd> {
        let ending = self.guard.wait_or_kill(timeout)?;
        let total = self.started.elapsed();
        for (_, line) in self.lines.iter() {
            self.console.push(line);
        }
        let stderr = self.stderr.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default();
        let console = self.console.join("\n") + "\n";
        if let Some(base) = self.log_base.take() {
            save_logs(&base, &console, &stderr)?;
        }
        Ok(VmEnd { ending, console, stderr, total })
    }
}

fn save_logs(base: &Path, console: &str, stderr: &str) -> Result<()> {
    if let Some(dir) = base.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(base.with_extension("console"), console)?;
    std::fs::write(base.with_extension("stderr"), stderr)?;
    Ok(())
}

impl Drop for Vm {
    /// A guest dropped without `finish` (an error on the way): kill it,
    /// then keep what it printed, for finding out why.
    fn drop(&mut self) {
        let Some(base) = self.log_base.take() else { return };
        let _ = self.guard.wait_or_kill(Duration::ZERO);
        while let Ok((_, line)) = self.lines.recv_timeout(Duration::from_millis(500)) {
            self.console.push(line);
        }
        let stderr = self.stderr.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default();
        let _ = save_logs(&base, &(self.console.join("\n") + "\n"), &stderr);
        eprintln!("mm-bench: {}: console and stderr kept in {}.{{console,stderr}}", self.name, base.display());
    }
}

/// A console line that means the guest will not print what we wait for:
/// a tool's error (`mm-init TOOL: …`, unlike mm-init's own `mm-init: …`),
/// the kernel resetting after the workload ended, or a panic. Without this
/// a failed QEMU guest would be waited for until the time-out, since its
/// reset never completes on PVM.
fn is_failure(line: &str) -> bool {
    let line = line.trim_start();
    (line.starts_with("mm-init ") && line.contains(": "))
        || line.contains("reboot: Restarting system")
        || line.contains("Kernel panic")
}

/// `mmbench: PHASE key=value ...` lines: phase → key → value.
pub type Results = BTreeMap<String, BTreeMap<String, u64>>;

/// Parses the result lines among `lines`; others (kernel messages) are
/// ignored, as are values that are not integers.
pub fn parse_results(lines: &[String]) -> Results {
    let mut results = Results::new();
    for line in lines {
        let Some((_, rest)) = line.split_once(RESULT_PREFIX) else { continue };
        let mut words = rest.split_whitespace();
        let Some(phase) = words.next() else { continue };
        let fields = words
            .filter_map(|w| w.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect();
        results.insert(phase.to_string(), fields);
    }
    results
}

/// A result field, or an error naming what is missing.
pub fn field(results: &Results, phase: &str, key: &str) -> Result<u64> {
    results
        .get(phase)
        .and_then(|f| f.get(key))
        .copied()
        .with_context(|| format!("no `{RESULT_PREFIX} {phase} {key}=` in the output"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_result_lines() {
        let lines: Vec<String> = [
            "[    1.0] virtio_blk virtio0: [vda] 2097152 512-byte logical blocks",
            "mmbench: start size=1073741824",
            "mmbench: seq_read bytes=1048576 ops=1 ns=2000000",
            "noise mmbench: rand_read bytes=4096 ops=1 ns=x",
            "mmbench: done",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let r = parse_results(&lines);
        assert_eq!(field(&r, "start", "size").unwrap(), 1 << 30);
        assert_eq!(field(&r, "seq_read", "ns").unwrap(), 2_000_000);
        assert_eq!(field(&r, "rand_read", "bytes").unwrap(), 4096);
        assert!(field(&r, "rand_read", "ns").is_err());
        assert!(r.contains_key("done"));
    }

    #[test]
    fn waits_for_lines_and_finishes() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &format!("echo '{MARKER}'; echo 'mmbench: x n=3'; echo 'mmbench: done'; sleep 30")]);
        let mut vm = Vm::spawn("sh", cmd, None).unwrap();
        let r = vm.results(Instant::now() + Duration::from_secs(10)).unwrap();
        assert_eq!(field(&r, "x", "n").unwrap(), 3);
        assert!(vm.boot_to_init.is_some());
        let end = vm.finish(Duration::from_millis(100)).unwrap();
        assert_eq!(end.ending, Ending::Killed);
        assert!(end.console.contains("mmbench: done"));
    }

    #[test]
    fn failures_end_the_wait() {
        assert!(is_failure("mm-init blk-bench: open /dev/vda with O_DIRECT: No such file"));
        assert!(is_failure("[   40.1] reboot: Restarting system"));
        assert!(!is_failure("mm-init: user space started"));
        assert!(!is_failure("mmbench: done"));
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo 'mm-init tcp-bench: connect: refused'; sleep 30"]);
        let mut vm = Vm::spawn("sh", cmd, None).unwrap();
        let err = vm.results(Instant::now() + Duration::from_secs(10)).unwrap_err();
        assert!(format!("{err:#}").contains("refused"), "{err:#}");
    }

    #[test]
    fn a_missing_line_times_out() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo hello; sleep 30"]);
        let mut vm = Vm::spawn("sh", cmd, None).unwrap();
        let err = vm.wait_for("never", Instant::now() + Duration::from_millis(300)).unwrap_err();
        assert!(format!("{err:#}").contains("hello"));
    }
}
