//! Where mm-vmm reaches a device back end or its supervisor: a unix socket
//! path (manual use, tests) or an inherited, already connected socket
//! (`fd:N`, from the broker's socketpairs, so no jail needs a shared path;
//! DESIGN.md, "Wire protocols").

use std::fmt;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// `PATH` or `fd:N`.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Path(PathBuf),
    /// An inherited connected stream socket; it can be taken once.
    Fd {
        fd: RawFd,
        taken: Arc<AtomicBool>,
    },
}

impl PartialEq for Endpoint {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Endpoint::Path(a), Endpoint::Path(b)) => a == b,
            (Endpoint::Fd { fd: a, .. }, Endpoint::Fd { fd: b, .. }) => a == b,
            _ => false,
        }
    }
}
impl Eq for Endpoint {}

impl std::str::FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(n) = s.strip_prefix("fd:") {
            let fd: RawFd = n.parse().map_err(|_| format!("{s:?}: fd:N needs a number"))?;
            if fd < 3 {
                return Err(format!("{s:?}: fds 0-2 are stdio, not sockets"));
            }
            return Ok(Endpoint::Fd { fd, taken: Arc::new(AtomicBool::new(false)) });
        }
        if s.is_empty() {
            return Err("empty socket path".into());
        }
        Ok(Endpoint::Path(PathBuf::from(s)))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Path(path) => write!(f, "{}", path.display()),
            Endpoint::Fd { fd, .. } => write!(f, "inherited fd {fd}"),
        }
    }
}

impl Endpoint {
    /// Connects to the path, or takes ownership of the inherited socket
    /// (once; a second call fails rather than aliasing the fd).
    pub fn connect(&self) -> std::io::Result<UnixStream> {
        match self {
            Endpoint::Path(path) => UnixStream::connect(path),
            Endpoint::Fd { .. } => Ok(UnixStream::from(self.take()?)),
        }
    }

    /// Takes ownership of the inherited socket, whatever kind it is (once).
    pub fn take(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        match self {
            Endpoint::Path(path) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is a path, not an inherited socket", path.display()),
            )),
            Endpoint::Fd { fd, taken } => take_inherited(*fd, taken),
        }
    }
}

/// Takes ownership of inherited fd `fd` if it is an open socket and was not
/// taken before.
fn take_inherited(fd: RawFd, taken: &AtomicBool) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::io::{Error, ErrorKind};
    if taken.swap(true, Ordering::SeqCst) {
        return Err(Error::new(ErrorKind::AlreadyExists, format!("fd {fd} was already used")));
    }
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes into `stat` and only reads the fd table.
    if unsafe { libc::fstat(fd, stat.as_mut_ptr()) } != 0 {
        return Err(Error::new(ErrorKind::NotFound, format!("fd {fd} is not open")));
    }
    // SAFETY: fstat succeeded, so `stat` is initialised.
    let mode = unsafe { stat.assume_init() }.st_mode;
    if mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(Error::new(ErrorKind::InvalidInput, format!("fd {fd} is not a socket")));
    }
    // SAFETY: the fd is open, was handed to us for this purpose, and the
    // `taken` flag makes this the only owner.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_and_fds() {
        assert_eq!("/run/x.sock".parse::<Endpoint>().unwrap(), Endpoint::Path("/run/x.sock".into()));
        assert!(matches!("fd:7".parse::<Endpoint>().unwrap(), Endpoint::Fd { fd: 7, .. }));
        assert!("fd:1".parse::<Endpoint>().is_err());
        assert!("fd:x".parse::<Endpoint>().is_err());
        assert!("".parse::<Endpoint>().is_err());
    }

    #[test]
    fn an_inherited_socket_is_taken_once_and_a_non_socket_refused() {
        let (a, _b) = UnixStream::pair().unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(a);
        let endpoint: Endpoint = format!("fd:{fd}").parse().unwrap();
        endpoint.connect().unwrap();
        assert!(endpoint.connect().is_err());
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        let endpoint: Endpoint = format!("fd:{fd}").parse().unwrap();
        assert_eq!(endpoint.connect().unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
    }
}
