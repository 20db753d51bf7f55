//! Unix sockets that appear at their path only once they accept.
//!
//! `bind(2)` creates the socket's file and `listen(2)` makes it accept; in
//! between, a `connect(2)` is refused (`ECONNREFUSED`). Whoever waits for
//! the path to exist (a test harness, a script, a supervisor) can land in
//! that window when the listening process is preempted between the two
//! calls, which a loaded 2-core host does. So the socket is bound and made
//! listening under a temporary name in the same directory, then renamed
//! into place: `rename(2)` is atomic, and a socket keeps accepting under
//! its new name.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Calls `bind` (which must bind *and* listen) on a temporary path next to
/// `path`, then renames the result to `path`, replacing any stale socket.
pub fn bind_listening<T, E>(path: &Path, bind: impl FnOnce(&Path) -> Result<T, E>) -> Result<T, E>
where
    E: From<io::Error>,
{
    let staging = staging_path(path);
    let _ = std::fs::remove_file(&staging);
    let listener = bind(&staging)?;
    if let Err(e) = std::fs::rename(&staging, path) {
        let _ = std::fs::remove_file(&staging);
        return Err(io::Error::new(e.kind(), format!("publishing {}: {e}", path.display())).into());
    }
    Ok(listener)
}

/// `.mm-<pid>-<n>.sock` in `path`'s directory: short, because a unix
/// socket path must fit in 108 bytes, and unique within this process.
fn staging_path(path: &Path) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!(".mm-{}-{}.sock", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(name),
        _ => PathBuf::from(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};

    #[test]
    fn the_socket_accepts_at_its_path_and_nothing_is_left_behind() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("a.sock");
        // A stale socket from an earlier run is replaced.
        drop(UnixListener::bind(&path).unwrap());
        let listener = bind_listening(&path, |staging| {
            let listener = UnixListener::bind(staging)?;
            // Bound and listening, but not yet where anyone looks.
            assert!(!path.exists() || UnixStream::connect(&path).is_err());
            Ok::<_, io::Error>(listener)
        })
        .unwrap();
        UnixStream::connect(&path).unwrap();
        listener.accept().unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.as_path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["a.sock"]);
    }

    #[test]
    fn a_failed_bind_leaves_no_file_and_a_missing_directory_is_an_error() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let refused: io::Result<UnixListener> =
            bind_listening(&dir.as_path().join("b.sock"), |_| Err(io::Error::other("no")));
        assert!(refused.is_err());
        assert_eq!(std::fs::read_dir(dir.as_path()).unwrap().count(), 0);
        assert!(bind_listening(&dir.as_path().join("missing/c.sock"), |p| UnixListener::bind(p)).is_err());
    }
}
