//! Opening a userfaultfd for guest RAM.
//!
//! A lazy restore needs faults from kernel mode too (KVM reads and writes
//! guest RAM through our mapping on the vCPUs' behalf), which an
//! unprivileged process may only ask for through `/dev/userfaultfd`
//! (`vm.unprivileged_userfaultfd` is 0 on hardened hosts). The jailed
//! mm-vmm has no device nodes, so its jail opens `/dev/userfaultfd` as root
//! and passes the open file (`--uffd-fd`), as it does /dev/kvm; access is
//! checked at open, and `USERFAULTFD_IOC_NEW` on that file then makes a
//! userfaultfd for the calling process. Unjailed (tests, `--no-jail`) the
//! device node or the syscall is tried instead.

use std::os::fd::{FromRawFd, RawFd};

use userfaultfd::Uffd;

/// `_IO(0xAA, 0x00)`: a new userfaultfd from an open /dev/userfaultfd.
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xaa00;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFD_API: u64 = 0xaa;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("cannot create a userfaultfd from /dev/userfaultfd: {0}")]
    FromDevice(std::io::Error),
    #[error("cannot open /dev/userfaultfd: {0}")]
    OpenDevice(std::io::Error),
    #[error("cannot create a userfaultfd (no /dev/userfaultfd, and the syscall needs CAP_SYS_PTRACE): {0}")]
    Syscall(std::io::Error),
    #[error("the kernel refused the userfaultfd API handshake: {0}")]
    Api(std::io::Error),
}

/// A non-blocking, close-on-exec userfaultfd for this process: from
/// `device` (an open /dev/userfaultfd) when given, else from the device
/// node, else from the syscall.
pub fn open(device: Option<RawFd>) -> Result<Uffd, UffdError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    let fd = match device {
        Some(dev) => new_from_device(dev, flags)?,
        None => match std::fs::OpenOptions::new().read(true).write(true).open("/dev/userfaultfd") {
            Ok(dev) => new_from_device(std::os::fd::AsRawFd::as_raw_fd(&dev), flags)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // SAFETY: the userfaultfd syscall takes only flags.
                let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
                if fd < 0 {
                    return Err(UffdError::Syscall(std::io::Error::last_os_error()));
                }
                fd as RawFd
            }
            Err(e) => return Err(UffdError::OpenDevice(e)),
        },
    };
    // SAFETY: `fd` is a fresh userfaultfd that nothing else owns; Uffd
    // closes it on drop.
    let uffd = unsafe { Uffd::from_raw_fd(fd) };
    let mut api = UffdioApi { api: UFFD_API, features: 0, ioctls: 0 };
    // SAFETY: UFFDIO_API reads and writes the struct we pass, which lives
    // across the call.
    if unsafe { libc::ioctl(fd, UFFDIO_API, &mut api as *mut UffdioApi) } < 0 {
        return Err(UffdError::Api(std::io::Error::last_os_error()));
    }
    Ok(uffd)
}

fn new_from_device(device: RawFd, flags: libc::c_int) -> Result<RawFd, UffdError> {
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its integer argument
    // and returns a new fd or -1.
    let fd = unsafe { libc::ioctl(device, USERFAULTFD_IOC_NEW, flags) };
    if fd < 0 {
        return Err(UffdError::FromDevice(std::io::Error::last_os_error()));
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ioctl_numbers_match_the_kernel_encoding() {
        // _IOC(dir, type, nr, size) = dir << 30 | size << 16 | type << 8 | nr
        let ioc = |dir: u64, nr: u64, size: usize| (dir << 30 | (size as u64) << 16 | 0xaa << 8 | nr) as libc::c_ulong;
        assert_eq!(super::USERFAULTFD_IOC_NEW, ioc(0, 0x00, 0));
        assert_eq!(super::UFFDIO_API, ioc(3, 0x3f, std::mem::size_of::<super::UffdioApi>()));
    }
}
