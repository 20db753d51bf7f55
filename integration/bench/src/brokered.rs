//! What the benchmarks that drive a real `mm-broker` (`exec`, `fork`,
//! `density`, and the broker part of `net`) share: starting it so that the
//! terminal's Ctrl-C does not take it down first, and cleaning up after a
//! signal. mm-vmm outlives its broker by design, so an interrupted
//! benchmark that simply died would leave microVMs running (and the
//! broker's namespace behind). Also the `mmctl` calls, host figures and
//! per-microVM memory sampling that `fork` and `density` both use.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mm_integration::broker::TestBroker;

use crate::procmem::{self, GuestRam, process_tree};

/// One `mmctl` call that is not a boot (ps, rm -f).
const QUICK: Duration = Duration::from_secs(120);

/// Serialises the cleanup a signal starts with the end of a benchmark's
/// broker part: the benchmark takes it after dropping its broker, so the
/// process cannot exit under a cleanup.
pub static CLEANUP: Mutex<()> = Mutex::new(());

/// Network namespaces a benchmark made besides the broker's (`mm-bench
/// memory`'s peers'), deleted by the cleanup after a signal too.
pub static EXTRA_NETNS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// SIGINT, SIGTERM and SIGHUP are taken by a thread (blocked everywhere
/// else; `Command` clears the mask for children), which removes the
/// microVMs, ends the broker and deletes its scratch directory and
/// namespace, then exits 130. Must run before any other thread is started,
/// so that all of them inherit the mask.
pub fn block_signals() -> Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use;
    // pthread_sigmask only changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            bail!("pthread_sigmask failed");
        }
        Ok(set)
    }
}

/// Unblocks `set` on the calling thread (and the threads it starts later),
/// once the broker is gone: the default actions apply again.
pub fn unblock_signals(set: &libc::sigset_t) {
    // SAFETY: pthread_sigmask only changes this thread's mask.
    unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, set, std::ptr::null_mut()) };
}

/// Starts the thread that waits for `set` (blocked by [`block_signals`])
/// and cleans `broker` up; `bench` names the benchmark in its message.
pub fn cleanup_on_signal(bench: &'static str, set: libc::sigset_t, broker: Weak<TestBroker>) {
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: `set` holds signals this thread has blocked (inherited).
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            return;
        }
        let _guard = CLEANUP.lock();
        // None: the benchmark already dropped the broker, whose Drop cleans up.
        let Some(broker) = broker.upgrade() else { return };
        eprintln!("mm-bench: {bench}: signal {sig}: removing the microVMs and ending the broker");
        if let Ok(run) = broker.mmctl(&["ps", "-o", "json"], QUICK)
            && let Ok(serde_json::Value::Array(vms)) = serde_json::from_str(&run.stdout)
        {
            for id in vms.iter().filter_map(|vm| vm["id"].as_str()) {
                let _ = broker.mmctl(&["rm", "-f", id], QUICK);
            }
        }
        if let Some(pid) = broker.pid() {
            // SAFETY: kill(2) on the broker TestBroker spawned, not yet reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        if let Some(netns) = &broker.netns {
            let _ = Command::new("ip").args(["netns", "del", netns]).status();
        }
        for netns in EXTRA_NETNS.lock().map(|l| l.clone()).unwrap_or_default() {
            let _ = Command::new("ip").args(["netns", "del", &netns]).status();
        }
        let _ = std::fs::remove_dir_all(&broker.dir.0);
        std::process::exit(130);
    });
}

/// Starts a broker (`TestBroker::start(name, args)`) so that it ignores the
/// terminal's SIGINT and SIGHUP (ignored dispositions survive exec):
/// Ctrl-C reaches the whole process group, and a broker that died with it
/// could not remove the microVMs.
pub fn start_broker(name: &str, args: &[&str]) -> Result<TestBroker> {
    let set_ignored = |disposition| {
        for sig in [libc::SIGINT, libc::SIGHUP] {
            // SAFETY: SIG_IGN / SIG_DFL, no handler function involved.
            unsafe { libc::signal(sig, disposition) };
        }
    };
    set_ignored(libc::SIG_IGN);
    let broker = TestBroker::start(name, args);
    set_ignored(libc::SIG_DFL);
    broker
}

/// Runs `measure` against a fresh broker (`bench-NAME`, `args` on its
/// command line) that a signal cleans up, then keeps the broker's log
/// beside `out` (`out` with the extension `broker.log`) and ends the
/// broker: its Drop removes every microVM still there (`mmctl rm -f`),
/// then kills it by its pid. Must be called before any other thread is
/// started (see [`block_signals`]).
pub fn with_broker<R>(
    bench: &'static str,
    args: &[&str],
    out: &Path,
    measure: impl FnOnce(&TestBroker) -> Result<R>,
) -> Result<R> {
    let signals = block_signals()?;
    let broker = Arc::new(start_broker(&format!("bench-{bench}"), args)?);
    cleanup_on_signal(bench, signals, Arc::downgrade(&broker));
    eprintln!("mm-bench: {bench}: broker in {}", broker.dir.0.display());
    let measured = measure(&broker);
    let log = out.with_extension("broker.log");
    let _ = std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")));
    let _ = std::fs::write(&log, broker.log());
    drop(broker);
    // A cleanup a signal started before the drop finishes (and exits) first.
    drop(CLEANUP.lock());
    measured.with_context(|| format!("broker log: {}", log.display()))
}

/// `mmctl ARGS`, which must exit 0: its stdout.
pub fn mmctl_ok(broker: &TestBroker, args: &[&str]) -> Result<String> {
    let run = broker.mmctl(args, QUICK).with_context(|| format!("mmctl {}", args.join(" ")))?;
    if run.status != Some(0) {
        bail!("mmctl {} exited with {:?}: {}", args.join(" "), run.status, run.stderr.trim());
    }
    Ok(run.stdout)
}

/// `mmctl ARGS` (with `-o json` among them), parsed.
pub fn mmctl_json(broker: &TestBroker, args: &[&str]) -> Result<serde_json::Value> {
    let text = mmctl_ok(broker, args)?;
    serde_json::from_str(&text).with_context(|| format!("mmctl {}: not JSON: {text}", args.join(" ")))
}

/// A /proc/meminfo field (`MemAvailable`, `MemTotal`), KiB.
pub fn meminfo_kib(field: &str) -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/meminfo"))
}

/// Waits until `name` answers `exec … true`.
pub fn exec_ready(broker: &TestBroker, name: &str, timeout: Duration) -> Result<()> {
    let answered = broker.exec_when_ready(name, &["true"], timeout)?;
    if answered.status != Some(0) {
        bail!("{name} never answered an exec: {}", answered.stderr);
    }
    Ok(())
}

/// The pids `mmctl ps`/`inspect -o json` lists for one microVM.
pub fn listed_pids(info: &serde_json::Value) -> Result<Vec<u32>> {
    Ok(info["processes"]
        .as_array()
        .context("no processes in mmctl's JSON")?
        .iter()
        .filter_map(|p| p["pid"].as_u64())
        .map(|pid| pid as u32)
        .collect())
}

/// (guest RAM resident KiB, Pss KiB) of one microVM whose processes the
/// broker lists as `pids`: every one and its descendants (both halves of
/// every jail). Guest RAM is mm-vmm's memfd, counted once by its size.
pub fn vm_memory(pids: &[u32]) -> Result<(u64, u64)> {
    const RAM: GuestRam = GuestRam::Named("mm-guest-ram");
    let mut pss = 0;
    let mut ram = Vec::new();
    for pid in pids.iter().flat_map(|pid| process_tree(*pid)) {
        let (sample, mappings) = procmem::sample_process(pid, &RAM, false)?;
        pss += sample.total_pss_kib;
        ram.push((pid, mappings));
    }
    Ok((procmem::guest_ram_resident_kib(&ram, procmem::mapped_file)?, pss))
}

/// [`vm_memory`] of microVM `name`, its pids from `mmctl inspect`.
pub fn memory_of(broker: &TestBroker, name: &str) -> Result<(u64, u64)> {
    vm_memory(&listed_pids(&broker.inspect(name)?)?)
}
