//! The console log's cap: a guest printing forever must not fill the
//! host's disk. mm-vmm appends the console to `console.log` through an fd
//! it holds (O_APPEND, opened by the broker), so the file cannot be
//! renamed away; instead, while the microVM runs, the broker checks its
//! size every [`CHECK_EVERY`] and, once it reaches the cap, copies its last
//! `cap` bytes to `console.log.1` (replacing the older one) and truncates
//! it: mm-vmm's next write lands at offset 0. At rest each file holds at
//! most `cap` bytes, so the console takes at most twice the cap. What the
//! guest prints between the copy and the truncation (microseconds) is
//! lost, as with logrotate's `copytruncate`. Nothing here follows a link
//! (`safe_fs`).

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use super::Vm;
use crate::launch::CONSOLE_LOG;

/// The previous console log, kept once.
pub const CONSOLE_LOG_OLD: &str = "console.log.1";
/// How often a running microVM's console log is measured.
const CHECK_EVERY: Duration = Duration::from_millis(100);
/// The smallest and largest cap `--console-log-max` takes.
const MIN_CAP: u64 = 4 << 10;
const MAX_CAP: u64 = 1 << 30;

/// A byte count with an optional K, M or G suffix (powers of 1024), within
/// [`MIN_CAP`] and [`MAX_CAP`].
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let (digits, shift) = match trimmed.char_indices().last() {
        Some((i, 'K' | 'k')) => (&trimmed[..i], 10),
        Some((i, 'M' | 'm')) => (&trimmed[..i], 20),
        Some((i, 'G' | 'g')) => (&trimmed[..i], 30),
        _ => (trimmed, 0),
    };
    let value = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{text:?} is not a size (e.g. 4M, 65536)"))?;
    if !(MIN_CAP..=MAX_CAP).contains(&value) {
        return Err(format!("{text:?}: must be between 4K and 1G"));
    }
    Ok(value)
}

/// Rotates `dir/console.log` if it holds more than `cap` bytes: its last
/// `cap` bytes become `console.log.1`, and it is emptied. Returns whether
/// it rotated.
pub fn rotate_if_over(dir: &Path, cap: u64) -> std::io::Result<bool> {
    let path = dir.join(CONSOLE_LOG);
    let mut log = match crate::safe_fs::open_read(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let len = log.metadata()?.len();
    if len <= cap {
        return Ok(false);
    }
    let tmp = dir.join(format!("{CONSOLE_LOG_OLD}.tmp"));
    let mut old = crate::safe_fs::create_new(&tmp)?;
    log.seek(SeekFrom::Start(len - cap))?;
    std::io::copy(&mut (&mut log).take(cap), &mut old)?;
    // Emptied through an fd of our own (O_NOFOLLOW): mm-vmm's O_APPEND
    // writes go on at the new end.
    crate::safe_fs::open_append(&path)?.set_len(0)?;
    drop(old);
    std::fs::rename(&tmp, dir.join(CONSOLE_LOG_OLD))?;
    Ok(true)
}

impl Vm {
    /// Keeps the console log under the broker's cap while the microVM is
    /// live (spawned at each start and re-adoption).
    pub(super) async fn cap_console(self: Rc<Vm>) {
        let cap = self.config.console_log_max;
        while self.state().is_live() {
            if let Err(e) = rotate_if_over(&self.dir, cap) {
                tracing::warn!(vm = %self.name(), "cannot rotate the console log: {e}");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            tokio::time::sleep(CHECK_EVERY).await;
        }
        // The last words of a guest that ended between two checks.
        let _ = rotate_if_over(&self.dir, cap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safe_fs::testing::{Scratch, Target, assert_refused, planted};
    use std::io::Write;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        for bad in ["", "M", "4T", "-1", "0", "100", "2G", "1.5M"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rotation_keeps_the_last_cap_bytes_and_empties_the_log() {
        let scratch = Scratch::new("console-rotate");
        let dir = &scratch.0;
        std::fs::create_dir_all(dir).unwrap();
        assert!(!rotate_if_over(dir, 10).unwrap(), "no log yet");
        // A writer holding an O_APPEND fd, as mm-vmm does.
        let mut writer = crate::safe_fs::open_append(&dir.join(CONSOLE_LOG)).unwrap();
        writer.write_all(b"0123456789").unwrap();
        assert!(!rotate_if_over(dir, 10).unwrap(), "at the cap, not over it");
        writer.write_all(b"abcdef").unwrap();
        assert!(rotate_if_over(dir, 10).unwrap());
        assert_eq!(std::fs::read(dir.join(CONSOLE_LOG_OLD)).unwrap(), b"6789abcdef");
        assert_eq!(std::fs::read(dir.join(CONSOLE_LOG)).unwrap(), b"");
        writer.write_all(b"next").unwrap();
        assert_eq!(std::fs::read(dir.join(CONSOLE_LOG)).unwrap(), b"next", "appends from the start again");
        writer.write_all(b"-and-more!").unwrap();
        assert!(rotate_if_over(dir, 10).unwrap());
        assert_eq!(std::fs::read(dir.join(CONSOLE_LOG_OLD)).unwrap(), b"-and-more!", "the older file replaced");
        assert!(std::fs::symlink_metadata(dir.join(format!("{CONSOLE_LOG_OLD}.tmp"))).is_err());
    }

    #[test]
    fn a_link_at_the_rotated_name_is_replaced_not_written_through() {
        let scratch = Scratch::new("console-links");
        let target = Target::new(&scratch);
        let tmp = planted(&scratch, &format!("{CONSOLE_LOG_OLD}.tmp"), &target.path);
        let dir = &scratch.0.join("vm");
        std::fs::write(dir.join(CONSOLE_LOG), vec![b'x'; 100]).unwrap();
        assert_refused(rotate_if_over(dir, 10), &tmp);
        std::fs::remove_file(&tmp).unwrap();
        let old = planted(&scratch, CONSOLE_LOG_OLD, &target.path);
        assert!(rotate_if_over(dir, 10).unwrap());
        assert!(std::fs::symlink_metadata(&old).unwrap().file_type().is_file());
        target.untouched();
        std::fs::remove_file(dir.join(CONSOLE_LOG)).unwrap();
        let console = planted(&scratch, CONSOLE_LOG, &target.path);
        assert_refused(rotate_if_over(dir, 10), &console);
        target.untouched();
    }
}
