//! PID 1's workload: the one program the guest exists to run.
//!
//! It comes from the kernel command line (`mm.cmd`, `mm.env`), or, with
//! `mm.wait`, from the host through the exec agent (handover.rs). The second
//! is for warm starts: the host boots a guest once per image, snapshots it
//! while it waits, and restores the snapshot for every run, handing each
//! its workload; a command line is written once, at boot, so it cannot
//! carry a run's workload. Either way the workload runs the same way, so a
//! warm start cannot be told from a cold one by the workload or by mm-vmm:
//! the console as its stdio, `PATH`, `HOME` and `TERM` set, in `/` unless
//! told otherwise, its own process group (which PID 1's forwarded signals
//! reach), and its shell-style exit status (code, or 128 + signal; 127 when
//! it could not be found, 126 when it could not start) is the guest's.

pub mod handover;

use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::process::Command;

use mm_exec_protocol::Workload;
use nix::sys::signal::SigSet;

use crate::agent::spawn::{DEFAULT_PATH, check_env_name, cstring};
use crate::settings::{DEFAULT_SHELL, Settings};
use crate::supervise;
use handover::HANDOVER;

/// The console line a host waits for before it snapshots a guest booted
/// with `mm.wait` (or hands it its workload).
pub const WAITING_MARKER: &str = "mm-init: waiting for a workload";

/// The command line's workload (`mm.cmd`, `mm.env`).
pub fn from_settings(settings: &Settings) -> Workload {
    let env = settings.env.iter().filter_map(|pair| pair.split_once('='));
    Workload {
        argv: settings.command.clone(),
        env: env.map(|(key, value)| (key.to_string(), value.to_string())).collect(),
        cwd: None,
    }
}

/// Runs `workload` (the command line's) to completion: its shell-style
/// exit status.
pub fn run(workload: &Workload) -> u32 {
    with_signals(|signals| start_and_wait(workload, signals, |_| {}))
}

/// `mm.wait`: waits on this thread, reaping, until the exec agent hands
/// over a workload, then runs it to completion as [`run`] does: its
/// shell-style exit status. A signal PID 1 would forward to a workload ends
/// the wait instead, as it would end a workload that does not handle it:
/// 128 + its number (how `mmctl stop` ends a waiting guest).
pub fn wait_and_run() -> u32 {
    with_signals(|signals| {
        HANDOVER.open();
        // Only now: a host that sees the line may hand over at once.
        println!("{WAITING_MARKER}");
        let _ = io::stdout().flush();
        match supervise::wait_for_handover(&HANDOVER, signals) {
            Ok(offer) => start_and_wait(&offer.workload, signals, |started| offer.answer.send(started)),
            Err(signal) => {
                println!("mm-init: {signal} while waiting for a workload: shutting down");
                128 + signal as u32
            }
        }
    })
}

/// Why `workload` can never start: a NUL byte (which would cut an argument
/// short), an environment name that is empty or holds `=`, a working
/// directory that is not one. Checked before PID 1 takes a workload from
/// the host, so that the host can still send a good one; the same
/// messages as for an exec.
pub fn check(workload: &Workload) -> Result<(), String> {
    for arg in &workload.argv {
        cstring("an argument", arg.as_str())?;
    }
    for (key, value) in &workload.env {
        check_env_name(key)?;
        cstring("the environment", [key.as_bytes(), value.as_bytes()].concat())?;
    }
    if let Some(cwd) = &workload.cwd {
        cstring("the working directory", cwd.as_str())?;
        let is_dir = std::fs::metadata(cwd).and_then(|meta| match meta.is_dir() {
            true => Ok(()),
            false => Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
        });
        is_dir.map_err(|e| format!("cannot change directory to {cwd}: {e}"))?;
    }
    Ok(())
}

/// Blocks the signals PID 1 waits for and runs `then` with them; 125 (as
/// for every failure of mm-init's own) when they cannot be blocked.
fn with_signals(then: impl FnOnce(&SigSet) -> u32) -> u32 {
    match supervise::block_signals() {
        Ok(signals) => then(&signals),
        Err(e) => {
            eprintln!("mm-init: cannot set up signal handling: {e}");
            125
        }
    }
}

/// Starts `workload`, tells `answer` whether it started, and waits for it:
/// its status, or 127/126 when it could not start.
fn start_and_wait(workload: &Workload, signals: &SigSet, answer: impl FnOnce(Result<(), String>)) -> u32 {
    match spawn(workload) {
        Ok(pid) => {
            answer(Ok(()));
            supervise::wait_for(pid, signals)
        }
        Err((message, status)) => {
            eprintln!("mm-init: {message}");
            answer(Err(message));
            status
        }
    }
}

/// Starts `workload` as PID 1's child: its pid, or the message and the
/// status it ends the guest with.
fn spawn(workload: &Workload) -> Result<i32, (String, u32)> {
    let program = workload.argv.first().map_or(DEFAULT_SHELL, String::as_str);
    let mut command = Command::new(program);
    command
        .args(workload.argv.iter().skip(1))
        .env("PATH", DEFAULT_PATH)
        .env("HOME", "/root")
        .env("TERM", "linux")
        .current_dir(workload.cwd.as_deref().unwrap_or("/"))
        .envs(workload.env.iter().map(|(key, value)| (key, value)));
    // The workload must not inherit the signals blocked here for sigwait.
    // std's spawn was seen NOT to clear them here (the workload's shell had
    // SIGTERM and SIGCHLD blocked: `mmctl stop` could not end it, and
    // ash's `wait` slept forever), so clear the mask explicitly. Its own
    // process group lets us forward signals to the whole job.
    // SAFETY: the closure runs between fork and exec and calls only
    // sigemptyset and sigprocmask, which are async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            let mut empty = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(empty.as_mut_ptr());
            if libc::sigprocmask(libc::SIG_SETMASK, empty.as_ptr(), std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.process_group(0);
    match command.spawn() {
        Ok(child) => Ok(child.id() as i32),
        Err(e) => {
            let status = if e.kind() == io::ErrorKind::NotFound { 127 } else { 126 };
            Err((format!("cannot run {program:?}: {e}"), status))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_workload() {
        let mut settings = Settings::parse("").unwrap();
        settings.command = vec!["sh".into(), "-c".into(), "echo \"$A\"".into()];
        settings.env = vec!["A=b=c".into(), "B=".into(), "no-equals-sign".into()];
        let workload = from_settings(&settings);
        assert_eq!(workload.argv, settings.command);
        assert_eq!(workload.env, [("A".into(), "b=c".into()), ("B".into(), String::new())]);
        assert_eq!(workload.cwd, None);
    }

    #[test]
    fn well_formed_workloads_pass_the_check() {
        check(&Workload::default()).unwrap();
        check(&Workload::new(["sh", "-c", "é ünïcode"]).env("A", "b=c").env("EMPTY", "").cwd("/")).unwrap();
        // Whether the program exists is for the start to find out.
        check(&Workload::new(["no-such-program-xyz"])).unwrap();
    }
}
