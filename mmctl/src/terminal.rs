//! The local terminal during `exec -t`, as `docker exec -it` and `kubectl
//! exec -it` treat it: raw mode while the command runs, so every keystroke
//! (Ctrl-C, Ctrl-D, arrows, tab) goes to the guest's terminal instead of
//! being acted on here, and window-size changes passed on as they happen.

use std::io::IsTerminal;
use std::os::fd::{AsFd, OwnedFd};

use nix::sys::termios::{self, SetArg, Termios};
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::client::{CliError, exit};

/// A terminal switched to raw mode; its settings come back when dropped
/// (also when unwinding from a panic).
pub struct RawTerminal {
    tty: OwnedFd,
    saved: Termios,
}

impl RawTerminal {
    /// Raw mode on stdin's terminal; `None` when stdin is no terminal
    /// (piped input needs no change).
    pub fn for_stdin() -> Result<Option<Self>, CliError> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        Self::enter(stdin.as_fd()).map(Some)
    }

    /// Raw mode on the terminal `tty`, keeping its settings to restore.
    pub fn enter(tty: impl AsFd) -> Result<Self, CliError> {
        fn failed(e: impl std::fmt::Display) -> CliError {
            CliError::new(exit::ERROR, format!("setting the terminal to raw mode: {e}"))
        }
        let tty = tty.as_fd().try_clone_to_owned().map_err(failed)?;
        let saved = termios::tcgetattr(&tty).map_err(failed)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(&tty, SetArg::TCSANOW, &raw).map_err(failed)?;
        Ok(RawTerminal { tty, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // TCSADRAIN: what the command printed last is written out under
        // the raw settings it was meant for.
        let _ = termios::tcsetattr(&self.tty, SetArg::TCSADRAIN, &self.saved);
    }
}

/// Rows and columns of our terminal, if stdout is one.
pub fn window_size() -> Option<(u16, u16)> {
    let mut size = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one winsize into `size`, which we own.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) };
    (rc == 0 && size.ws_row > 0).then_some((size.ws_row, size.ws_col))
}

/// Our terminal's new size each time it changes (SIGWINCH).
pub struct WindowChanges(Signal);

impl WindowChanges {
    pub fn new() -> Result<Self, CliError> {
        signal(SignalKind::window_change())
            .map(WindowChanges)
            .map_err(|e| CliError::new(exit::ERROR, format!("watching the terminal's size: {e}")))
    }

    /// Waits for the next change and returns the size then; changes that
    /// leave no readable size (stdout no longer a terminal) are skipped.
    pub async fn next(&mut self) -> Option<(u16, u16)> {
        loop {
            self.0.recv().await?;
            if let Some(size) = window_size() {
                return Some(size);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::pty::openpty;
    use nix::sys::termios::{LocalFlags, tcgetattr};

    #[test]
    fn raw_mode_lasts_as_long_as_the_guard() {
        let pty = openpty(None, None).unwrap();
        let cooked = tcgetattr(&pty.slave).unwrap();
        assert!(cooked.local_flags.contains(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG));
        let raw = RawTerminal::enter(&pty.slave).unwrap();
        let flags = tcgetattr(&pty.slave).unwrap().local_flags;
        assert!(!flags.intersects(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG), "{flags:?}");
        drop(raw);
        assert_eq!(tcgetattr(&pty.slave).unwrap().local_flags, cooked.local_flags);
    }

    #[test]
    fn what_is_no_terminal_is_refused() {
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(RawTerminal::enter(&file).is_err());
    }
}
