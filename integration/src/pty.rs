//! A command run on a fresh pseudo-terminal that is its controlling
//! terminal, as an admin's shell runs `mmctl exec -it`: what it prints is
//! read from the terminal's other side, keystrokes are written there, and
//! a resize there sends it SIGWINCH as a terminal emulator's would.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::pty::{Winsize, openpty};

pub struct OnTerminal {
    child: Child,
    /// The terminal emulator's side.
    master: File,
    chunks: mpsc::Receiver<Vec<u8>>,
    /// Everything printed so far.
    pub output: Vec<u8>,
}

fn winsize(rows: u16, cols: u16) -> Winsize {
    Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 }
}

impl OnTerminal {
    /// Starts `cmd` in a new session whose controlling terminal is a new
    /// pty of `rows` x `cols`, with stdin, stdout and stderr on it.
    pub fn spawn(mut cmd: Command, rows: u16, cols: u16) -> Result<Self> {
        let pty = openpty(Some(&winsize(rows, cols)), None).context("openpty")?;
        let slave = pty.slave.as_raw_fd();
        // SAFETY: between fork and exec only async-signal-safe calls:
        // setsid, ioctl and dup2 on fds this process owns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 || libc::ioctl(slave, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for target in 0..=2 {
                    if libc::dup2(slave, target) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("spawning on the pty")?;
        drop(pty.slave);
        let master = File::from(pty.master);
        let mut reader = master.try_clone()?;
        let (tx, chunks) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once every holder of the terminal's other side is gone.
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                if tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Ok(OnTerminal { child, master, chunks, output: Vec::new() })
    }

    /// Types `bytes` at the terminal.
    pub fn type_in(&mut self, bytes: &[u8]) -> Result<()> {
        self.master.write_all(bytes).context("writing to the pty")
    }

    /// Resizes the terminal; the kernel sends its foreground process
    /// group SIGWINCH.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        set_size(&self.master, rows, cols)
    }

    /// The output so far as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.output).into_owned()
    }

    /// Waits until the output contains `needle`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        self.wait_for_count(needle, 1, timeout)
    }

    /// Waits until the output contains `needle` at least `count` times.
    pub fn wait_for_count(&mut self, needle: &str, count: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.text().matches(needle).count() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.chunks.recv_timeout(left) {
                Ok(chunk) => self.output.extend(chunk),
                Err(_) => {
                    bail!("no {needle:?} (x{count}) on the terminal within {timeout:?}; it shows:\n{}", self.text())
                }
            }
        }
        Ok(())
    }

    /// Waits for the command to end; returns its status and everything it
    /// printed.
    pub fn finish(mut self, timeout: Duration) -> Result<(ExitStatus, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Ok(chunk) = self.chunks.try_recv() {
                self.output.extend(chunk);
            }
            if let Some(status) = self.child.try_wait()? {
                while let Ok(chunk) = self.chunks.recv_timeout(Duration::from_millis(200)) {
                    self.output.extend(chunk);
                }
                return Ok((status, self.text()));
            }
            if Instant::now() > deadline {
                bail!("still running after {timeout:?}; the terminal shows:\n{}", self.text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// What [`exec_it_behaves_like_a_terminal`] runs in the guest: it reports
/// its terminal's size for each line typed, says when it gets SIGINT, and
/// ends on the line `end`.
const EXEC_IT_SCRIPT: &str = r#"trap 'echo interrupted' INT
echo "start:$(stty size) ready"
while read line; [ "$line" != end ]; do echo "size:$(stty size) answer"; done
echo bye"#;

/// Runs `mmctl ... exec -it VM --` (the caller's command, to which the
/// guest command is appended) on a 30x90 terminal and checks what a person
/// at that terminal relies on: the command starts at the terminal's size;
/// after the terminal is resized to 50x132 the command sees that size;
/// Ctrl-C is a keystroke for the guest (raw mode here: the command gets
/// SIGINT, mmctl lives on); and mmctl ends with the command's status.
pub fn exec_it_behaves_like_a_terminal(mut mmctl_exec: Command, timeout: Duration) -> Result<()> {
    mmctl_exec.args(["sh", "-c", EXEC_IT_SCRIPT]);
    let mut term = OnTerminal::spawn(mmctl_exec, 30, 90)?;
    term.wait_for(" ready", timeout)?;
    if !term.text().contains("start:30 90") {
        bail!("the command did not start at the terminal's size:\n{}", term.text());
    }
    term.resize(50, 132)?;
    // The resize travels apart from the keystrokes: ask until it arrived.
    let deadline = Instant::now() + timeout;
    while !term.text().contains("size:50 132") {
        if Instant::now() > deadline {
            bail!("the resize never reached the command:\n{}", term.text());
        }
        let answers = term.text().matches(" answer").count();
        term.type_in(b"x\r")?;
        term.wait_for_count(" answer", answers + 1, timeout)?;
    }
    // Ctrl-C, then a line: a shell blocked in `read` when SIGINT lands may
    // run its trap only once `read` returns (seen with dash on a loaded
    // host), and the line lets it. Without SIGINT no trap runs at all.
    term.type_in(b"\x03")?;
    term.type_in(b"x\r")?;
    term.wait_for("interrupted", timeout)?;
    term.type_in(b"end\r")?;
    let (status, text) = term.finish(timeout)?;
    if !status.success() || !text.contains("bye") {
        bail!("mmctl exec -it ended with {status}; the terminal shows:\n{text}");
    }
    Ok(())
}

fn set_size(tty: &impl AsRawFd, rows: u16, cols: u16) -> Result<()> {
    let size = winsize(rows, cols);
    // SAFETY: TIOCSWINSZ reads one winsize from `size`, which outlives the
    // call; the fd is an open terminal.
    if unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &size) } < 0 {
        return Err(std::io::Error::last_os_error()).context("TIOCSWINSZ");
    }
    Ok(())
}

impl Drop for OnTerminal {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own, not yet reaped child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check itself, on a local shell in place of mmctl and the
    /// guest: the terminal's size at the start and after a resize, Ctrl-C
    /// as the shell's SIGINT, the status at the end.
    #[test]
    fn a_local_shell_passes_the_exec_it_check() {
        exec_it_behaves_like_a_terminal(Command::new("env"), Duration::from_secs(10)).unwrap();
    }

    /// A command that never sees the new size fails the check: here a
    /// shell whose `stty size` always answers the first size.
    #[test]
    fn a_command_that_misses_the_resize_fails_the_check() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", r#"stty() { echo 30 90; }; eval "$3""#, "wrapper"]);
        let e = exec_it_behaves_like_a_terminal(cmd, Duration::from_secs(3)).unwrap_err();
        assert!(e.to_string().contains("the resize never reached the command"), "{e:#}");
    }

    /// A Ctrl-C that never becomes SIGINT fails the check: here the
    /// terminal's ISIG is off, so it reaches `read` as a character.
    #[test]
    fn a_ctrl_c_that_is_no_signal_fails_the_check() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", r#"stty -isig; eval "$3""#, "wrapper"]);
        let e = exec_it_behaves_like_a_terminal(cmd, Duration::from_secs(3)).unwrap_err();
        assert!(e.to_string().contains("no \"interrupted\""), "{e:#}");
    }
}
