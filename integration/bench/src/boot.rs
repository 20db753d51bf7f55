//! One timed boot of one VMM: spawn it, read its serial console line by
//! line as it arrives, timestamp the `mm-init: user space started` marker,
//! sample the VMM's memory at that moment (the guest is still running),
//! then let the guest finish, or kill the VMM by its pid if it does not.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::procmem::{self, GuestRam, Sample};

/// What mm-init prints on the console as soon as user space runs.
pub const MARKER: &str = "mm-init: user space started";

/// How to run and judge one boot.
pub struct BootSpec {
    /// The VMM, ready to spawn (its stdio is set here).
    pub command: Command,
    /// How to find guest RAM in its smaps.
    pub guest_ram: GuestRam,
    /// Spawn → marker must take less than this.
    pub marker_timeout: Duration,
    /// Marker → VMM exit may take this long before the VMM is killed.
    pub exit_timeout: Duration,
}

/// How the VMM process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Exited(ExitStatus),
    /// Still running `exit_timeout` after the marker: killed by its pid.
    /// (Always so for a zero timeout.)
    Killed,
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ending::Exited(status) => write!(f, "{status}"),
            Ending::Killed => write!(f, "killed by mm-bench"),
        }
    }
}

/// The measurements of one boot.
#[derive(Debug)]
pub struct BootRun {
    /// CLOCK_MONOTONIC read right before spawn, in ns.
    pub spawn_monotonic_ns: u64,
    /// Spawn → the marker line read from the console pipe.
    pub boot_to_init: Duration,
    /// The VMM's memory when the marker arrived.
    pub memory: Sample,
    /// Spawn → the VMM's exit (or kill).
    pub total: Duration,
    pub ending: Ending,
    /// The whole console and the whole stderr.
    pub console: String,
    pub stderr: String,
}

/// CLOCK_MONOTONIC in ns: the clock mm-vmm stamps its first KVM_RUN with.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime only writes the timespec we pass it.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Our child, killed (by its pid, through `Child::kill`) and reaped when
/// dropped unreaped: no error path leaves a VMM behind.
pub(crate) struct Guard(pub(crate) Option<Child>);

impl Guard {
    pub(crate) fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child not yet reaped")
    }

    /// Waits up to `timeout` for the child to exit; kills it if it does not.
    pub(crate) fn wait_or_kill(&mut self, timeout: Duration) -> Result<Ending> {
        let deadline = Instant::now() + timeout;
        let mut child = self.0.take().expect("child not yet reaped");
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(Ending::Exited(status));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                child.wait()?;
                return Ok(Ending::Killed);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Reads `pipe` line by line, sending each with the time it arrived.
pub(crate) fn console_reader(pipe: impl Read + Send + 'static) -> mpsc::Receiver<(Instant, String)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let at = Instant::now();
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\n', '\r']).to_string();
                    if tx.send((at, line)).is_err() {
                        break;
                    }
                }
            }
        }
    });
    rx
}

/// The last `n` lines of `text`, for error messages.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Boots once. Fails if the marker does not arrive within the timeout or
/// the VMM exits before it; the VMM is dead and reaped when this returns.
pub fn run(mut spec: BootSpec) -> Result<BootRun> {
    spec.command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    crate::vm::die_with_parent(&mut spec.command);
    let program = spec.command.get_program().to_string_lossy().into_owned();

    let spawn_monotonic_ns = monotonic_ns();
    let start = Instant::now();
    let mut guard = Guard(Some(spec.command.spawn().with_context(|| format!("spawning {program}"))?));
    let pid = guard.child().id();
    let lines = console_reader(guard.child().stdout.take().expect("stdout is piped"));
    let mut stderr_pipe = guard.child().stderr.take().expect("stderr is piped");
    let stderr_thread = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr_pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    });

    let mut console = String::new();
    let deadline = start + spec.marker_timeout;
    let marker_at = loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((at, line)) => {
                console.push_str(&line);
                console.push('\n');
                if line.contains(MARKER) {
                    break at;
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                drop(guard);
                let stderr = stderr_thread.join().unwrap_or_default();
                bail!(
                    "{program} (pid {pid}): no `{MARKER}` within {:?}; killed it.\n\
                     console (last 30 lines):\n{}\nstderr (last 30 lines):\n{}",
                    spec.marker_timeout,
                    tail(&console, 30),
                    tail(&stderr, 30)
                );
            }
            Err(RecvTimeoutError::Disconnected) => {
                let ending = guard.wait_or_kill(Duration::from_secs(10))?;
                let stderr = stderr_thread.join().unwrap_or_default();
                bail!(
                    "{program} (pid {pid}) closed its console before `{MARKER}` ({ending}).\n\
                     console (last 30 lines):\n{}\nstderr (last 30 lines):\n{}",
                    tail(&console, 30),
                    tail(&stderr, 30)
                );
            }
        }
    };
    // Sample at once: the guest is running its workload and will soon end.
    let memory = procmem::sample(&procmem::process_tree(pid), &spec.guest_ram)
        .with_context(|| format!("sampling the memory of {program} (pid {pid}) at the marker"))?;

    let ending = guard.wait_or_kill(spec.exit_timeout)?;
    let total = start.elapsed();
    // The VMM is gone, so both pipes reach EOF and the threads end.
    for (_, line) in lines.iter() {
        console.push_str(&line);
        console.push('\n');
    }
    let stderr = stderr_thread.join().unwrap_or_default();
    Ok(BootRun {
        spawn_monotonic_ns,
        boot_to_init: marker_at.duration_since(start),
        memory,
        total,
        ending,
        console,
        stderr,
    })
}

/// The kernel command line the guest kernel printed on its console.
pub fn printed_cmdline(console: &str) -> Option<&str> {
    console.lines().find_map(|l| l.split_once("Kernel command line: ").map(|(_, rest)| rest.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(tail("", 5), "");
    }

    #[test]
    fn finds_the_printed_cmdline() {
        let console = "[    0.000000] Linux version 6.1\n[    0.000000] Kernel command line: console=ttyS0 mm.cmd=x \n";
        assert_eq!(printed_cmdline(console), Some("console=ttyS0 mm.cmd=x"));
        assert_eq!(printed_cmdline("nothing"), None);
    }

    #[test]
    fn times_a_fake_vmm_and_reaps_it() {
        let mut command = Command::new("sh");
        command.args(["-c", &format!("echo booting; sleep 0.2; echo '{MARKER}'; sleep 0.3; echo bye >&2")]);
        let spec = BootSpec {
            command,
            // sh has no guest RAM: sampling must fail loudly, and the
            // process must still be killed and reaped.
            guest_ram: GuestRam::Named("mm-guest-ram"),
            marker_timeout: Duration::from_secs(10),
            exit_timeout: Duration::from_secs(10),
        };
        let err = run(spec).unwrap_err();
        assert!(format!("{err:#}").contains("no guest-RAM mapping"), "{err:#}");
    }

    #[test]
    fn times_the_marker_samples_and_waits_for_the_exit() {
        let mut command = Command::new("sh");
        command.args(["-c", &format!("echo booting; sleep 0.2; echo '{MARKER}'; sleep 0.3; echo bye >&2")]);
        let spec = BootSpec {
            command,
            // Stands in for guest RAM: sh maps libc, a named mapping.
            guest_ram: GuestRam::Named("libc"),
            marker_timeout: Duration::from_secs(10),
            exit_timeout: Duration::from_secs(10),
        };
        let run = run(spec).unwrap();
        assert!(run.boot_to_init >= Duration::from_millis(200), "{:?}", run.boot_to_init);
        assert!(run.total >= run.boot_to_init + Duration::from_millis(300));
        assert!(matches!(run.ending, Ending::Exited(s) if s.success()));
        assert!(run.memory.guest_ram_mappings > 0 && run.memory.total_pss_kib > 0);
        assert_eq!(run.console, format!("booting\n{MARKER}\n"));
        assert_eq!(run.stderr, "bye\n");
    }

    #[test]
    fn a_slow_exit_is_killed() {
        let mut command = Command::new("sh");
        // It stays the same program after the marker (an `exec` then would
        // race the sample, which may read the smaps of a process between
        // two images) and needs no child that would outlive the kill.
        command.args(["-c", &format!("echo '{MARKER}'; while :; do :; done")]);
        let spec = BootSpec {
            command,
            guest_ram: GuestRam::Named("/"),
            marker_timeout: Duration::from_secs(10),
            exit_timeout: Duration::from_millis(300),
        };
        let run = run(spec).unwrap();
        assert_eq!(run.ending, Ending::Killed);
        assert!(run.total < Duration::from_secs(10));
    }

    #[test]
    fn a_missing_marker_times_out() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo booting; exec sleep 30"]);
        let spec = BootSpec {
            command,
            guest_ram: GuestRam::Named("mm-guest-ram"),
            marker_timeout: Duration::from_millis(300),
            exit_timeout: Duration::from_secs(1),
        };
        let started = Instant::now();
        let err = format!("{:#}", run(spec).unwrap_err());
        assert!(err.contains("within") && err.contains("booting"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn an_early_exit_is_an_error() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo oops; exit 3"]);
        let spec = BootSpec {
            command,
            guest_ram: GuestRam::Named("mm-guest-ram"),
            marker_timeout: Duration::from_secs(10),
            exit_timeout: Duration::from_secs(1),
        };
        let err = format!("{:#}", run(spec).unwrap_err());
        assert!(err.contains("before") && err.contains("oops"), "{err}");
    }
}
