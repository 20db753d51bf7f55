//! What the benchmarks that drive a real `mm-broker` (`exec`, and the
//! broker part of `net`) share: starting it so that the terminal's Ctrl-C
//! does not take it down first, and cleaning up after a signal. mm-vmm
//! outlives its broker by design, so an interrupted benchmark that simply
//! died would leave microVMs running (and the broker's namespace behind).

use std::process::Command;
use std::sync::{Mutex, Weak};
use std::time::Duration;

use anyhow::{Result, bail};
use mm_integration::broker::TestBroker;

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
