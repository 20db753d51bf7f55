//! File primitives the overlay and [`crate::flatten`] share: creating its
//! files, zeroing ranges, finding a sparse file's data.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use vmm_sys_util::fallocate::{FallocateMode, fallocate};

/// Zeroes written at a time by the fallback.
const ZERO_CHUNK: u64 = 1 << 20;

/// Creates `path`, which must not exist (not even as a symlink), mode 0600,
/// `size` bytes long and sparse.
pub(crate) fn create_new(path: &Path, size: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    file.set_len(size)?;
    Ok(file)
}

/// The length of an open file or block device (seeking to the end works
/// for both; `metadata` says 0 for a block device).
pub(crate) fn len(file: &File) -> io::Result<u64> {
    use std::io::Seek;
    let mut file = file;
    file.seek(io::SeekFrom::End(0))
}

/// Whether two open files are the same inode.
pub(crate) fn same_file(a: &File, b: &File) -> io::Result<bool> {
    let (a, b) = (a.metadata()?, b.metadata()?);
    Ok(a.dev() == b.dev() && a.ino() == b.ino())
}

fn unsupported(errno: i32) -> bool {
    errno == libc::EOPNOTSUPP || errno == libc::ENOSYS || errno == libc::EINVAL
}

/// Makes `len` bytes at `offset` read back as zeroes: a punched hole when
/// `punch` is asked for, else (or where punching is not supported) a zeroed
/// range, and written zeroes where the file system supports neither.
pub fn zero_range(file: &File, offset: u64, len: u64, punch: bool) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // true: punch a hole; false: zero in place.
    let attempts: &[bool] = if punch { &[true, false] } else { &[false] };
    for &hole in attempts {
        let mode = if hole { FallocateMode::PunchHole } else { FallocateMode::ZeroRange };
        match fallocate(file, mode, true, offset, len) {
            Ok(()) => return Ok(()),
            Err(e) if unsupported(e.errno()) => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        }
    }
    write_zeroes(file, offset, len)
}

fn write_zeroes(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let zeroes = vec![0u8; ZERO_CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = ZERO_CHUNK.min(len - done);
        file.write_all_at(&zeroes[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

/// The next range holding data at or after `from` (before `end`), by
/// SEEK_DATA/SEEK_HOLE; `None` past the last data. Where the file system
/// cannot say, all of `from..end` is data.
pub(crate) fn next_data(file: &File, from: u64, end: u64) -> io::Result<Option<(u64, u64)>> {
    if from >= end {
        return Ok(None);
    }
    let seek = |whence| {
        // SAFETY: lseek on a descriptor we own changes only its offset,
        // which nothing else in this crate uses (all I/O is positioned).
        let r = unsafe { libc::lseek64(file.as_raw_fd(), from as libc::off64_t, whence) };
        if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r as u64) }
    };
    let start = match seek(libc::SEEK_DATA) {
        Ok(start) => start,
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(None),
        Err(e) if e.raw_os_error().is_some_and(unsupported) => return Ok(Some((from, end))),
        Err(e) => return Err(e),
    };
    if start >= end {
        return Ok(None);
    }
    let hole = seek_hole(file, start)?;
    Ok(Some((start, hole.min(end))))
}

fn seek_hole(file: &File, from: u64) -> io::Result<u64> {
    // SAFETY: as in next_data.
    let r = unsafe { libc::lseek64(file.as_raw_fd(), from as libc::off64_t, libc::SEEK_HOLE) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r as u64) }
}
