//! Files in a microVM's directory, opened and owned without ever following
//! a symbolic link (issue 17).
//!
//! The broker is root, and a microVM's processes run as that microVM's own
//! uid: a name the broker opens, chowns or renames must never lead it
//! elsewhere (a link planted at `console.log` would have root append to,
//! or at `rw.ext4` chown, whatever it points at). So the layout keeps the
//! microVM's directory and every file the broker writes owned by the
//! broker (0700 and 0600), where that uid cannot write; only the vsock
//! device's subdirectory and the writable disk are handed over, through an
//! fd the broker opened itself. And, belt and braces (a directory of an
//! older layout that still belongs to the microVM's uid, a mistake later
//! on), every open here is `O_NOFOLLOW` (a link in the last component
//! fails: reported as a refusal naming the path), `O_NONBLOCK` while
//! opening (a FIFO cannot hang the broker), checked with `fstat` (a regular
//! file, one link, the expected owner), creations are `O_EXCL`, and
//! ownership changes only through the fd (`fchown`, `fchmod`).

use std::ffi::CString;
use std::fmt::Display;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Every file the broker writes in a microVM's directory.
pub const FILE_MODE: u32 = 0o600;
/// The microVM's directory, and the vsock device's.
pub const DIR_MODE: u32 = 0o700;

/// The broker's own uid and gid (root in production; a test's own).
pub fn own_ids() -> (u32, u32) {
    // SAFETY: geteuid and getegid cannot fail and touch no memory.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

fn refusal(path: &Path, why: impl Display) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, format!("refusing {}: {why}", path.display()))
}

/// `ELOOP` from an `O_NOFOLLOW` open: the last component is a link.
fn no_link(path: &Path) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |e| match e.raw_os_error() {
        Some(libc::ELOOP) => refusal(path, "it is a symbolic link, which the broker never follows here"),
        _ => e,
    }
}

/// Opens `path` without following a link, then checks what was opened:
/// a regular file with no other hard link, owned by `owner` (any of them)
/// when given. `O_NONBLOCK` is cleared again once it is known to be a file.
fn open_checked(path: &Path, options: &mut OpenOptions, owners: &[u32]) -> io::Result<File> {
    options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC);
    let file = options.open(path).map_err(no_link(path))?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(refusal(path, "it is not a regular file"));
    }
    if meta.nlink() != 1 {
        return Err(refusal(path, format_args!("it has {} hard links", meta.nlink())));
    }
    if !owners.is_empty() && !owners.contains(&meta.uid()) {
        return Err(refusal(path, format_args!("it belongs to uid {}, not the broker", meta.uid())));
    }
    // SAFETY: fcntl on an fd we own, with integer arguments only.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(file)
}

/// A log the broker appends to (the audit log, the console, a process's
/// stdout and stderr), created 0600 if absent.
pub fn open_append(path: &Path) -> io::Result<File> {
    open_checked(path, OpenOptions::new().append(true).create(true).mode(FILE_MODE), &[own_ids().0])
}

/// A file the broker wrote, for reading.
pub fn open_read(path: &Path) -> io::Result<File> {
    open_checked(path, OpenOptions::new().read(true), &[own_ids().0])
}

pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open_read(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

pub fn read_to_string(path: &Path) -> io::Result<String> {
    let mut text = String::new();
    open_read(path)?.read_to_string(&mut text)?;
    Ok(text)
}

/// A new, empty file at `path` (0600, `O_EXCL`). A regular file left
/// there (a crash between create and rename) is removed first; anything
/// else (a link, a directory) is refused and left alone.
pub fn create_new(path: &Path) -> io::Result<File> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_file() => std::fs::remove_file(path)?,
        Ok(meta) if meta.file_type().is_symlink() => {
            return Err(refusal(path, "it is a symbolic link, which the broker never follows here"));
        }
        Ok(_) => return Err(refusal(path, "something other than a regular file is there")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    open_checked(path, OpenOptions::new().read(true).write(true).create_new(true).mode(FILE_MODE), &[])
}

/// Replaces `dir/name` whole: written to `dir/name.tmp` ([`create_new`])
/// and renamed over it, within `dir` (a rename replaces a link at `name`
/// itself, never its target).
pub fn replace(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = create_new(&tmp)?;
    file.write_all(bytes)?;
    drop(file);
    std::fs::rename(&tmp, dir.join(name))
}

/// Makes sure `path` is a directory (made if absent; its parent must
/// exist), not a link, owned by `uid`:`gid` with mode [`DIR_MODE`]; the
/// ownership is changed through its fd. Returns the open directory.
pub fn own_dir(path: &Path, uid: u32, gid: u32) -> io::Result<File> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(DIR_MODE).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            // O_DIRECTORY answers a link with ENOTDIR (before O_NOFOLLOW's ELOOP).
            Some(libc::ENOTDIR | libc::ELOOP)
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) =>
            {
                refusal(path, "it is a symbolic link, which the broker never follows here")
            }
            Some(libc::ENOTDIR) => refusal(path, "it is not a directory"),
            _ => e,
        })?;
    give(&dir, uid, gid, DIR_MODE)?;
    Ok(dir)
}

/// Hands an existing file at `path` (a regular file of one link, the
/// broker's or already `uid`'s) to `uid`:`gid`, mode [`FILE_MODE`],
/// through the fd it returns: how a jailed process gets a file it must
/// write by path.
pub fn hand_over(path: &Path, uid: u32, gid: u32) -> io::Result<File> {
    let file = open_checked(path, OpenOptions::new().read(true).write(true), &[own_ids().0, uid])?;
    give(&file, uid, gid, FILE_MODE)?;
    Ok(file)
}

fn give(file: &File, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
    let meta = file.metadata()?;
    if (meta.uid(), meta.gid()) != (uid, gid) {
        std::os::unix::fs::fchown(file, Some(uid), Some(gid))?;
    }
    if meta.mode() & 0o7777 != mode {
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// A unix socket at `path` to connect to without following a link: its
/// `O_PATH` fd, and the name that reaches exactly that inode
/// (`/proc/self/fd/N`) while the fd is open. The vsock device's directory
/// is the one the microVM's uid may write, so its socket could be replaced
/// by a link to any socket of the host.
#[derive(Debug)]
pub struct SocketRef {
    _fd: OwnedFd,
    pub path: PathBuf,
}

pub fn socket_ref(path: &Path) -> io::Result<SocketRef> {
    let name = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: open(2) with a NUL-terminated path; the result is checked.
    let raw = unsafe { libc::open(name.as_ptr(), libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` was just opened here and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat fills `stat` for an fd we own (O_PATH allows fstat).
    if unsafe { libc::fstat(fd.as_raw_fd(), stat.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded, so it initialised `stat`.
    let mode = unsafe { stat.assume_init() }.st_mode;
    if mode & libc::S_IFMT != libc::S_IFSOCK {
        let why = if mode & libc::S_IFMT == libc::S_IFLNK {
            "it is a symbolic link, which the broker never follows here"
        } else {
            "it is not a socket"
        };
        return Err(refusal(path, why));
    }
    let path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    Ok(SocketRef { _fd: fd, path })
}

/// What the tests of every module writing in a microVM's directory use:
/// a scratch directory, a file outside it whose content, owner and mode
/// are checked afterwards, and links planted to it.
#[cfg(test)]
pub mod testing {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A scratch directory, removed on drop.
    pub struct Scratch(pub PathBuf);

    impl Scratch {
        pub fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("mm-safe-fs-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A file outside the directory the links point at, and what it was.
    pub struct Target {
        pub path: PathBuf,
        before: (String, u32, u32, u32),
    }

    impl Target {
        pub fn new(scratch: &Scratch) -> Target {
            let path = scratch.0.join("outside");
            std::fs::write(&path, b"precious\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
            let before = Target::state(&path);
            Target { path, before }
        }

        /// Content, owner, group and mode.
        fn state(path: &Path) -> (String, u32, u32, u32) {
            let meta = std::fs::metadata(path).unwrap();
            let content = String::from_utf8_lossy(&std::fs::read(path).unwrap()).into_owned();
            (content, meta.uid(), meta.gid(), meta.mode() & 0o7777)
        }

        pub fn untouched(&self) {
            assert_eq!(Target::state(&self.path), self.before, "the link's target was touched");
        }
    }

    pub fn planted(scratch: &Scratch, name: &str, target: &Path) -> PathBuf {
        let dir = scratch.0.join("vm");
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join(name);
        symlink(target, &link).unwrap();
        link
    }

    pub fn assert_refused(result: io::Result<impl Sized>, path: &Path) {
        let Err(e) = result else { panic!("{} was followed", path.display()) };
        let text = e.to_string();
        assert!(text.contains("refusing") && text.contains("symbolic link"), "unclear: {text}");
        assert!(text.contains(&path.display().to_string()), "the error does not name the path: {text}");
        assert!(std::fs::symlink_metadata(path).unwrap().file_type().is_symlink(), "the link was removed");
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn links_are_refused_for_appending_reading_creating_and_handing_over() {
        let scratch = Scratch::new("links");
        let target = Target::new(&scratch);
        let link = planted(&scratch, "console.log", &target.path);
        assert_refused(open_append(&link), &link);
        assert_refused(open_read(&link), &link);
        assert_refused(read_to_string(&link), &link);
        let tmp = planted(&scratch, "record.json.tmp", &target.path);
        assert_refused(create_new(&tmp), &tmp);
        assert_refused(replace(&scratch.0.join("vm"), "record.json", b"{}"), &tmp);
        let disk = planted(&scratch, "rw.ext4", &target.path);
        assert_refused(hand_over(&disk, 4242, 4242), &disk);
        target.untouched();
    }

    #[test]
    fn a_linked_directory_is_refused_and_its_target_keeps_its_owner_and_mode() {
        let scratch = Scratch::new("dirs");
        let outside = scratch.0.join("outside-dir");
        std::fs::create_dir(&outside).unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = planted(&scratch, "vsock", &outside);
        assert_refused(own_dir(&link, 4242, 4242), &link);
        let meta = std::fs::metadata(&outside).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o7777), (own_ids().0, 0o755));
    }

    #[test]
    fn hard_links_fifos_and_foreign_files_are_refused() {
        let scratch = Scratch::new("others");
        let target = Target::new(&scratch);
        let vm = scratch.0.join("vm");
        std::fs::create_dir(&vm).unwrap();
        let hard = vm.join("audit.jsonl");
        std::fs::hard_link(&target.path, &hard).unwrap();
        let e = open_append(&hard).unwrap_err().to_string();
        assert!(e.contains("2 hard links"), "{e}");
        assert!(hand_over(&hard, 4242, 4242).is_err());
        let fifo = vm.join("vmm.log");
        let name = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        // Without O_NONBLOCK this open would wait for a reader forever.
        assert!(open_append(&fifo).is_err());
        let e = open_read(&fifo).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        assert!(create_new(&fifo).is_err(), "a FIFO is not a leftover to remove");
        assert!(fifo.exists());
        target.untouched();
        if own_ids().0 == 0 {
            let foreign = vm.join("console.log");
            std::fs::write(&foreign, b"x").unwrap();
            std::os::unix::fs::chown(&foreign, Some(4242), Some(4242)).unwrap();
            let e = open_append(&foreign).unwrap_err().to_string();
            assert!(e.contains("uid 4242"), "{e}");
        }
    }

    #[test]
    fn files_are_created_private_and_replaced_whole() {
        let scratch = Scratch::new("files");
        let log = scratch.0.join("vmm.log");
        open_append(&log).unwrap().write_all(b"one\n").unwrap();
        open_append(&log).unwrap().write_all(b"two\n").unwrap();
        assert_eq!(read_to_string(&log).unwrap(), "one\ntwo\n");
        assert_eq!(std::fs::metadata(&log).unwrap().mode() & 0o7777, FILE_MODE);
        // A leftover temporary file (a crash before the rename) is no obstacle.
        std::fs::write(scratch.0.join("record.json.tmp"), b"half").unwrap();
        replace(&scratch.0, "record.json", b"whole").unwrap();
        assert_eq!(read(&scratch.0.join("record.json")).unwrap(), b"whole");
        assert!(!scratch.0.join("record.json.tmp").exists());
        assert_eq!(open_read(&scratch.0.join("absent")).unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn directories_and_disks_are_given_through_their_fds() {
        if own_ids().0 != 0 {
            eprintln!("skipped: changing owners needs root");
            return;
        }
        let scratch = Scratch::new("give");
        let dir = scratch.0.join("vsock");
        own_dir(&dir, 4242, 4243).unwrap();
        let meta = std::fs::symlink_metadata(&dir).unwrap();
        assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (4242, 4243, DIR_MODE));
        // Again (a restart), and back to the broker (an older layout's directory).
        own_dir(&dir, 4242, 4243).unwrap();
        own_dir(&dir, 0, 0).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().uid(), 0);
        let disk = scratch.0.join("rw.ext4");
        std::fs::write(&disk, b"").unwrap();
        hand_over(&disk, 4242, 4242).unwrap();
        hand_over(&disk, 4242, 4242).unwrap();
        let meta = std::fs::metadata(&disk).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o7777), (4242, FILE_MODE));
        assert!(hand_over(&disk, 4343, 4343).is_err(), "another microVM's disk");
    }

    #[test]
    fn sockets_are_reached_by_their_inode_and_links_to_them_refused() {
        let scratch = Scratch::new("sockets");
        let real = scratch.0.join("other.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&real).unwrap();
        let direct = socket_ref(&real).unwrap();
        std::os::unix::net::UnixStream::connect(&direct.path).unwrap();
        let link = planted(&scratch, "vsock.sock", &real);
        assert_refused(socket_ref(&link), &link);
        let file = scratch.0.join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(socket_ref(&file).unwrap_err().to_string().contains("not a socket"));
    }
}
