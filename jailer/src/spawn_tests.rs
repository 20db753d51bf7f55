//! [`crate::spawn`] from a process whose other threads keep starting
//! threads, as the broker's and the tests' processes do (as root; skipped
//! otherwise, failed under `CI`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use crate::testutil::{Scratch, root_available};
use crate::{ExitReason, JailSpec};

/// Jails spawned while another thread starts threads in a loop.
const SPAWNS: usize = 40;

/// The child is a copy of this process taken at any moment, maybe while
/// another thread is inside pthread_create. glibc's setgroups/setresgid/
/// setresuid wait for every thread the copy's glibc knows of to have
/// started, which that one never does in the copy: the child hung before
/// exec, and `spawn` with it, waiting on the error pipe (child.rs uses
/// the raw syscalls).
#[test]
fn spawning_while_other_threads_start_threads_never_hangs() {
    if !root_available("spawning_while_other_threads_start_threads_never_hangs") {
        return;
    }
    let dir = Scratch::new();
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = std::thread::spawn(|| {}).join();
            }
        })
    };
    let (done, results) = mpsc::channel();
    let base = dir.0.join("jails");
    std::thread::spawn(move || {
        for i in 0..SPAWNS {
            let mut spec = JailSpec::new(format!("churn-{}-{i}", std::process::id()), "/bin/true", 0, 0);
            spec.jail_base = base.clone();
            let result = crate::spawn(&spec).and_then(|mut child| child.wait());
            if done.send(result.map_err(|e| e.to_string())).is_err() {
                return;
            }
        }
    });
    for i in 0..SPAWNS {
        match results.recv_timeout(Duration::from_secs(20)) {
            Ok(result) => assert_eq!(result, Ok(ExitReason::Exited(0)), "jail {i}"),
            Err(_) => {
                stop.store(true, Ordering::Relaxed);
                let killed = kill_stuck_children();
                panic!("jail {i} never got to exec (killed the stuck child {killed:?})");
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
}

/// SIGKILLs this process's children that are PID 1 of a namespace of
/// their own (a jail's child before exec); returns their pids.
fn kill_stuck_children() -> Vec<i32> {
    let me = std::process::id().to_string();
    let mut killed = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else { continue };
        let field = |key: &str| status.lines().find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()));
        let in_own_namespace = field("NSpid:").is_some_and(|ns| ns.ends_with(" 1") || ns.ends_with("\t1"));
        if field("PPid:").as_deref() == Some(me.as_str()) && in_own_namespace {
            // SAFETY: kill(2) of our own child, by its pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed.push(pid);
        }
    }
    killed
}
