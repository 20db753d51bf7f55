//! One session channel: gather its `pty-req` and `env` requests, start the
//! command of its `exec` (`/bin/sh -c CMD`) or `shell` (`/bin/sh -l`)
//! request through the exec agent's spawner, then stream until it ends and
//! send its exit status.
//!
//! The spawner (agent/spawn.rs) gives us non-blocking pipes or a terminal
//! master, and the exit status comes through an `ExitNotice` whose eventfd
//! we wait on: PID 1 reaps every child itself (agent/children.rs).
//!
//! Output runs in tasks of its own, because sending waits for the client's
//! window; this task keeps draining the client's messages meanwhile. russh
//! reopens the receive window as data arrives, not as we consume it, so its
//! only backpressure is to stall the whole connection (window adjusts for
//! our output included) once a channel's queue is full: we therefore buffer
//! up to [`STDIN_HIGH`] of stdin the command has not read yet before we stop
//! reading the channel.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mm_exec_protocol::{ExecRequest, ExitStatus};
use russh::server::{Handle, Msg};
use russh::{Channel, ChannelMsg, ChannelWriteHalf, Sig};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::handler::valid_env_name;
use crate::agent::Reaper;
use crate::agent::spawn::{self, Child, ChildIo};

/// Stdin the command has not read yet that we hold before we stop reading
/// the channel (see the module docs).
const STDIN_HIGH: usize = 16 << 20;
/// After the command exits, output still open (a background job holding
/// the pipe or terminal) is read until it is quiet this long, as the exec
/// agent does.
const OUTPUT_GRACE: Duration = Duration::from_millis(500);
/// Bytes read from the command at a time.
const CHUNK: usize = 32 * 1024;
/// The terminal's end-of-file character (^D): how EOF from the client
/// reaches a command on a terminal, whose master cannot be half-closed.
const VEOF: u8 = 4;
/// Signal names in SSH's spelling (RFC 4254 §6.10), and their numbers.
const SIGNALS: [(&str, i32); 18] = [
    ("ABRT", libc::SIGABRT),
    ("ALRM", libc::SIGALRM),
    ("FPE", libc::SIGFPE),
    ("HUP", libc::SIGHUP),
    ("ILL", libc::SIGILL),
    ("INT", libc::SIGINT),
    ("KILL", libc::SIGKILL),
    ("PIPE", libc::SIGPIPE),
    ("QUIT", libc::SIGQUIT),
    ("SEGV", libc::SIGSEGV),
    ("TERM", libc::SIGTERM),
    ("USR1", libc::SIGUSR1),
    ("USR2", libc::SIGUSR2),
    ("BUS", libc::SIGBUS),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("WINCH", libc::SIGWINCH),
];

/// What the client asked for before its command.
#[derive(Default)]
struct Setup {
    env: Vec<(String, String)>,
    /// `(TERM, rows, cols)` from `pty-req`.
    pty: Option<(String, u16, u16)>,
    /// Stdin that came before the command started.
    stdin: Vec<u8>,
    eof: bool,
}

/// Serves one session channel to its end.
pub async fn run(mut channel: Channel<Msg>, handle: Handle, reaper: Reaper) {
    let mut setup = Setup::default();
    let command = loop {
        match channel.wait().await {
            None | Some(ChannelMsg::Close) => return,
            Some(ChannelMsg::RequestPty { term, col_width, row_height, .. }) => {
                setup.pty = Some((term, clamp(row_height), clamp(col_width)));
            }
            Some(ChannelMsg::SetEnv { variable_name, variable_value, .. }) => {
                if valid_env_name(&variable_name) {
                    setup.env.push((variable_name, variable_value));
                }
            }
            // The spawner takes UTF-8 arguments: other bytes become U+FFFD.
            Some(ChannelMsg::Exec { command, .. }) => break Some(String::from_utf8_lossy(&command).into_owned()),
            Some(ChannelMsg::RequestShell { .. }) => break None,
            Some(ChannelMsg::Data { data }) => setup.stdin.extend_from_slice(&data),
            Some(ChannelMsg::Eof) => setup.eof = true,
            Some(_) => {}
        }
    };
    let id = channel.id();
    // Forking here briefly blocks this thread (until the child has exec'd),
    // which is fine for a few milliseconds.
    let child = match spawn::spawn(&request(command, &mut setup), reaper) {
        Ok(child) => child,
        Err(message) => {
            eprintln!("mm-init: ssh: cannot start the command: {message}");
            let _ = channel.extended_data_bytes(1, format!("mm-init: {message}\r\n").into_bytes()).await;
            let _ = handle.exit_status_request(id, 127).await;
            let _ = channel.eof().await;
            let _ = channel.close().await;
            return;
        }
    };
    let pid = child.pid;
    if let Err(e) = pump(child, channel, &handle, setup).await {
        // Only setting up the streams can fail: the command is orphaned.
        eprintln!("mm-init: ssh: cannot stream the command's input and output: {e}");
        hang_up(pid);
        let _ = handle.close(id).await;
    }
}

/// The spawner's request: root's login shell set-up (`HOME=/root`, the
/// default `PATH`, cwd `/root` or `/`) come from the spawner's defaults.
fn request(command: Option<String>, setup: &mut Setup) -> ExecRequest {
    let argv = match command {
        Some(command) => vec!["/bin/sh".to_string(), "-c".to_string(), command],
        None => vec!["/bin/sh".to_string(), "-l".to_string()],
    };
    let mut req = ExecRequest::new(argv);
    if let Some((term, rows, cols)) = &setup.pty {
        req = req.tty(*rows, *cols);
        if !term.is_empty() {
            req = req.env("TERM", term.as_str());
        }
    }
    req.env.append(&mut setup.env);
    req
}

fn clamp(n: u32) -> u16 {
    n.min(u16::MAX as u32) as u16
}

/// When the command's output was last read or sent, and how many reads
/// wait for the client's window: output counts as quiet only when none do.
struct Activity {
    last: Mutex<Instant>,
    sending: AtomicUsize,
}

impl Activity {
    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// When output becomes quiet, if nothing more happens.
    fn quiet_at(&self) -> Option<Instant> {
        let last = *self.last.lock().unwrap_or_else(|e| e.into_inner());
        (self.sending.load(Ordering::SeqCst) == 0).then_some(last + OUTPUT_GRACE)
    }
}

async fn pump(child: Child, channel: Channel<Msg>, handle: &Handle, setup: Setup) -> io::Result<()> {
    let Child { pid, io, exit } = child;
    let id = channel.id();
    let (mut input, output) = channel.split();
    let output = Arc::new(output);
    let activity = Arc::new(Activity { last: Mutex::new(Instant::now()), sending: AtomicUsize::new(0) });
    let mut outputs = JoinSet::new();
    let readable = |fd: OwnedFd| register(fd, Interest::READABLE);
    let (stdin, tty) = match io {
        ChildIo::Pipes { stdin, stdout, stderr } => {
            outputs.spawn(copy_out(readable(stdout)?, output.clone(), None, activity.clone()));
            outputs.spawn(copy_out(readable(stderr)?, output.clone(), Some(1), activity.clone()));
            (stdin, None)
        }
        ChildIo::Pty { master } => {
            outputs.spawn(copy_out(readable(master.try_clone()?)?, output.clone(), None, activity.clone()));
            let tty = master.try_clone()?;
            (master, Some(tty))
        }
    };
    let mut stdin = Some(register(stdin, Interest::WRITABLE)?);
    let exit_event = readable(exit.fd().try_clone_to_owned()?)?;
    let mut stdin_buf = setup.stdin;
    let mut stdin_eof = false;
    if setup.eof {
        eof_received(&tty, &mut stdin_buf, &mut stdin_eof);
    }

    // Until the command exits: the client's messages, its stdin, the exit.
    let status = loop {
        if stdin_eof && stdin_buf.is_empty() {
            stdin = None; // closes the pipe: the command sees EOF
        }
        tokio::select! {
            msg = input.wait(), if stdin_buf.len() < STDIN_HIGH => match msg {
                None | Some(ChannelMsg::Close) => {
                    hang_up(pid);
                    return Ok(());
                }
                Some(ChannelMsg::Data { data }) => {
                    if stdin.is_some() && !stdin_eof {
                        stdin_buf.extend_from_slice(&data);
                    }
                }
                Some(ChannelMsg::Eof) => eof_received(&tty, &mut stdin_buf, &mut stdin_eof),
                Some(ChannelMsg::WindowChange { col_width, row_height, .. }) => {
                    if let Some(tty) = &tty {
                        let _ = spawn::set_window_size(tty, clamp(row_height), clamp(col_width));
                    }
                }
                Some(ChannelMsg::Signal { signal }) => deliver_signal(pid, tty.as_ref(), &signal),
                Some(_) => {}
            },
            written = write_some(stdin.as_ref(), &stdin_buf), if !stdin_buf.is_empty() => match written {
                Ok(n) => {
                    stdin_buf.drain(..n);
                }
                // EPIPE: the command closed its stdin; what it did not read
                // is dropped, as with a pipe.
                Err(_) => {
                    stdin_buf.clear();
                    if tty.is_none() {
                        stdin = None;
                    }
                }
            },
            ready = exit_event.readable() => {
                let mut ready = ready?;
                match exit.get() {
                    Some(status) => break status,
                    None => ready.clear_ready(),
                }
            }
        }
    };
    // Background jobs still holding a pipe now see EOF on it.
    if tty.is_none() {
        drop(stdin);
    }

    // Output still buffered in the pipes or terminal, until it ends or is
    // quiet; a client that leaves meanwhile ends this early.
    activity.touch();
    loop {
        let quiet_at = activity.quiet_at();
        tokio::select! {
            done = outputs.join_next() => if done.is_none() { break },
            msg = input.wait() => if matches!(msg, None | Some(ChannelMsg::Close)) { return Ok(()) },
            _ = tokio::time::sleep_until(quiet_at.unwrap_or_else(far_future)), if quiet_at.is_some() => {
                if activity.quiet_at().is_some_and(|at| at <= Instant::now()) {
                    outputs.abort_all();
                    break;
                }
            }
        }
    }
    // Everything sent so far went through the same queue, so the status
    // follows the last output.
    match status {
        ExitStatus::Exited(code) => {
            let _ = handle.exit_status_request(id, code as u32).await;
        }
        ExitStatus::Signaled(sig) => {
            let _ = handle.exit_signal_request(id, sig_from_number(sig), false, String::new(), String::new()).await;
        }
    }
    let _ = output.eof().await;
    let _ = output.close().await;
    Ok(())
}

/// Registers a descriptor of ours with the runtime.
fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the OwnedFd, which stays open and names the
    // same open file until the AsyncFd drops it.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}

/// EOF from the client: close the stdin pipe once its buffer is written,
/// or type ^D on a terminal.
fn eof_received(tty: &Option<OwnedFd>, stdin_buf: &mut Vec<u8>, stdin_eof: &mut bool) {
    match tty {
        Some(_) => stdin_buf.push(VEOF),
        None => *stdin_eof = true,
    }
}

/// Reads one output stream until it ends and sends it on the channel,
/// as data or as extended data `ext` (1: stderr).
async fn copy_out(fd: AsyncFd<OwnedFd>, out: Arc<ChannelWriteHalf<Msg>>, ext: Option<u32>, activity: Arc<Activity>) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        // EIO on a terminal master: its last slave closed.
        let n = match read_some(&fd, &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        activity.sending.fetch_add(1, Ordering::SeqCst);
        let data = buf[..n].to_vec();
        let sent = match ext {
            None => out.data_bytes(data).await,
            Some(ext) => out.extended_data_bytes(ext, data).await,
        };
        activity.touch();
        activity.sending.fetch_sub(1, Ordering::SeqCst);
        if sent.is_err() {
            return;
        }
    }
}

async fn read_some(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut ready = fd.readable().await?;
        if let Ok(result) = ready.try_io(|fd| nix::unistd::read(fd.get_ref(), buf).map_err(io::Error::from)) {
            return result;
        }
    }
}

/// Writes what the command's stdin takes now; pends forever without one.
async fn write_some(fd: Option<&AsyncFd<OwnedFd>>, data: &[u8]) -> io::Result<usize> {
    let Some(fd) = fd else {
        return std::future::pending().await;
    };
    loop {
        let mut ready = fd.writable().await?;
        if let Ok(result) = ready.try_io(|fd| nix::unistd::write(fd.get_ref().as_fd(), data).map_err(io::Error::from)) {
            return result;
        }
    }
}

/// A client's `signal` request: to the terminal's foreground process group
/// with a terminal (where ^C would go), else to the command.
fn deliver_signal(pid: i32, tty: Option<&OwnedFd>, signal: &Sig) {
    let Some(sig) = number_from_sig(signal) else { return };
    let target = match tty {
        Some(tty) => {
            let mut pgrp: libc::pid_t = 0;
            // SAFETY: TIOCGPGRP writes one pid_t to the pointer we pass.
            let ok = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCGPGRP, &mut pgrp) } == 0;
            if ok && pgrp > 0 { -pgrp } else { -pid }
        }
        None => pid,
    };
    // SAFETY: kill(2) on our own child or its group, whose exit we have not
    // yet seen (so the pid has not been reused).
    unsafe { libc::kill(target, sig) };
}

/// The client left before the command ended: hang up on its process group,
/// as a terminal does. Its status still reaches the reaper.
fn hang_up(pid: i32) {
    // SAFETY: kill(2) on the process group of our own child, which has not
    // been reported as ended (so its pid is not reused).
    unsafe {
        libc::kill(-pid, libc::SIGHUP);
        libc::kill(-pid, libc::SIGCONT);
    }
}

fn sig_from_number(number: i32) -> Sig {
    match SIGNALS.iter().find(|(_, n)| *n == number).map(|(name, _)| *name) {
        Some("ABRT") => Sig::ABRT,
        Some("ALRM") => Sig::ALRM,
        Some("FPE") => Sig::FPE,
        Some("HUP") => Sig::HUP,
        Some("ILL") => Sig::ILL,
        Some("INT") => Sig::INT,
        Some("KILL") => Sig::KILL,
        Some("PIPE") => Sig::PIPE,
        Some("QUIT") => Sig::QUIT,
        Some("SEGV") => Sig::SEGV,
        Some("TERM") => Sig::TERM,
        Some("USR1") => Sig::USR1,
        Some(name) => Sig::Custom(name.to_string()),
        None => Sig::Custom(format!("SIG{number}")),
    }
}

fn number_from_sig(sig: &Sig) -> Option<i32> {
    let name = match sig {
        Sig::ABRT => "ABRT",
        Sig::ALRM => "ALRM",
        Sig::FPE => "FPE",
        Sig::HUP => "HUP",
        Sig::ILL => "ILL",
        Sig::INT => "INT",
        Sig::KILL => "KILL",
        Sig::PIPE => "PIPE",
        Sig::QUIT => "QUIT",
        Sig::SEGV => "SEGV",
        Sig::TERM => "TERM",
        Sig::USR1 => "USR1",
        Sig::Custom(name) => name.as_str(),
    };
    SIGNALS.iter().find(|(n, _)| *n == name).map(|(_, number)| *number)
}
