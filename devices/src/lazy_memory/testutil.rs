//! The front end's side of a lazy restore, for tests: the postcopy
//! set-up over a [`TestFrontend`], and reading and resolving the back end's
//! faults on its userfaultfd (as mm-vmm does, minus the snapshot file).

use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use userfaultfd::{Event, Uffd, UffdBuilder};
use vhost::VhostBackend;
use vhost::vhost_user::VhostUserFrontend;
use vhost::vhost_user::message::{FrontendReq, VhostUserProtocolFeatures};

use crate::test_frontend::{TEST_PROTOCOL_FEATURES, TestFrontend};

/// What a lazily restoring test front end asks for.
pub const LAZY_PROTOCOL_FEATURES: VhostUserProtocolFeatures =
    TEST_PROTOCOL_FEATURES.union(VhostUserProtocolFeatures::PAGEFAULT);

pub const PAGE: usize = 4096;

/// Whether this process may create a userfaultfd that catches kernel-mode
/// faults (what a back end's POSTCOPY_ADVISE does): root, or access to
/// `/dev/userfaultfd`. If not, says the test is skipped, or panics under
/// `CI` (a CI run that skipped these would prove nothing).
pub fn userfaultfd_available(test: &str) -> bool {
    match UffdBuilder::new().close_on_exec(true).non_blocking(true).user_mode_only(false).create() {
        Ok(_) => true,
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("{test}: CI must be able to create a userfaultfd (root, or /dev/userfaultfd): {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED {test}: cannot create a userfaultfd for kernel faults here ({e}); run as root");
            false
        }
    }
}

/// POSTCOPY_ADVISE, POSTCOPY_LISTEN and SET_MEM_TABLE with the test guest
/// RAM, as mm-vmm's lazy restore sends them: the back end's userfaultfd and
/// its mapping base per region. The back end must not use the memory until
/// [`postcopy_ack`].
pub fn postcopy_set_up(fe: &mut TestFrontend) -> (Uffd, Vec<u64>) {
    let file = fe.frontend.postcopy_advise().expect("POSTCOPY_ADVISE");
    assert!(is_userfaultfd(file.as_raw_fd()), "POSTCOPY_ADVISE returned fd {file:?}, not a userfaultfd");
    // SAFETY: the fd is a userfaultfd (checked) that we now own.
    let uffd = unsafe { <Uffd as std::os::fd::FromRawFd>::from_raw_fd(file.into_raw_fd()) };
    fe.frontend.postcopy_listen().expect("POSTCOPY_LISTEN");
    let regions = fe.memory.regions();
    let bases = fe.frontend.set_mem_table(&regions).expect("SET_MEM_TABLE while listening");
    let bases = bases.expect("no mapping bases in the SET_MEM_TABLE reply");
    assert_eq!(bases.len(), regions.len(), "one base per region");
    (uffd, bases)
}

/// The front end's ack of the last memory table: the back end may use it.
pub fn postcopy_ack(fe: &mut TestFrontend) {
    fe.frontend.postcopy_ack_mem_regions(FrontendReq::SET_MEM_TABLE).expect("postcopy ack");
}

/// Whether `fd` (of this process) is a userfaultfd.
pub fn is_userfaultfd(fd: i32) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{fd}")).is_ok_and(|l| l.to_string_lossy() == "anon_inode:[userfaultfd]")
}

/// Whether the mapping starting at `base` in process `pid` is registered
/// with a userfaultfd for missing pages (VmFlags `um`) and has huge pages
/// turned off (`nh`).
pub fn registered_missing(pid: u32, base: u64) -> (bool, bool) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let header = format!("{base:x}-");
    let flags: Vec<&str> = smaps
        .lines()
        .skip_while(|line| !line.starts_with(&header))
        .find_map(|line| line.strip_prefix("VmFlags:"))
        .unwrap_or_else(|| panic!("no mapping at {base:#x} in process {pid}"))
        .split_whitespace()
        .collect();
    (flags.contains(&"um"), flags.contains(&"nh"))
}

/// The address of the next page fault on `uffd`, waiting up to `timeout`;
/// None if none came.
pub fn wait_fault(uffd: &Uffd, timeout: Duration) -> Option<u64> {
    let mut pfd = libc::pollfd { fd: uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
    if n <= 0 {
        return None;
    }
    match uffd.read_event().expect("reading the userfaultfd") {
        Some(Event::Pagefault { addr, .. }) => Some(addr as u64),
        other => panic!("unexpected userfaultfd event {other:?}"),
    }
}

/// Resolves the fault at `addr` (in the back end's mapping) the way a page
/// server may: UFFDIO_COPY of `data` into the missing page, waking the
/// faulting thread.
pub fn resolve(uffd: &Uffd, addr: u64, data: &[u8; PAGE]) {
    let page = addr & !(PAGE as u64 - 1);
    // SAFETY: UFFDIO_COPY reads PAGE bytes from `data` and fills the missing
    // page at `page` in the registered range of the back end's mapping.
    let copied = unsafe { uffd.copy(data.as_ptr().cast(), page as *mut libc::c_void, PAGE, true) };
    assert_eq!(copied.expect("UFFDIO_COPY"), PAGE);
}

/// Unregisters the back end's mappings when dropped during a panic, which
/// wakes a fault still waiting (read or not), so a failed test's back end
/// is not left blocked on a page forever (its hang-up would wait for it:
/// see `block::postcopy`).
pub struct ServeOnPanic<'a> {
    pub uffd: &'a Uffd,
    /// `(base, len)` of each mapping in the back end.
    pub ranges: Vec<(u64, u64)>,
}

impl Drop for ServeOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (base, len) in &self.ranges {
                let _ = self.uffd.unregister(*base as *mut libc::c_void, *len as usize);
            }
        }
    }
}

/// Writes zeroes over the test guest RAM except `[hole, hole + len)`, so
/// every other page is present in the memfd and only the hole faults in
/// the back end (rings included: a ring page the back end faulted on from
/// its request handler would stall the set-up messages this single test
/// thread sends).
pub fn populate_except(fe: &TestFrontend, hole: u64, len: u64) {
    use vm_memory::{Bytes, GuestAddress};
    let start = fe.memory.regions().first().map_or(0, |r| r.guest_phys_addr);
    let end = fe.memory.end();
    let zeroes = vec![0u8; 1 << 20];
    let fill = |from: u64, to: u64| {
        let mut at = from;
        while at < to {
            let n = (to - at).min(zeroes.len() as u64) as usize;
            fe.mem().write_slice(&zeroes[..n], GuestAddress(at)).unwrap();
            at += n as u64;
        }
    };
    fill(start, hole);
    fill(hole + len, end);
}

/// Set in a copy of this test binary that serves one device under its
/// seccomp policy: `block FD IMAGE`, `vsock FD UDS` or `net FD TAP_FD`
/// (FD: the listening socket, its front-end connection queued).
const CHILD_ENV: &str = "MM_LAZY_MEMORY_TEST_CHILD";

/// Serves one device in a copy of this test binary, under the device's
/// seccomp policy as `mm-device` installs it (before `serve_*`), with
/// `--lazy-memory`: what the postcopy sequence makes the device process do
/// must be allowed, or the child dies by SIGSYS. `args` as in [`CHILD_ENV`];
/// `inherit` are the fds it names.
pub fn serve_in_child(args: &str, inherit: &[RawFd]) -> ChildDevice {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "lazy_memory::testutil::child_serves_under_its_policy", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let inherit = inherit.to_vec();
    // SAFETY: only fcntl between fork and exec, to keep the fds open.
    unsafe {
        cmd.pre_exec(move || {
            for fd in &inherit {
                libc::fcntl(*fd, libc::F_SETFD, 0);
            }
            Ok(())
        });
    }
    ChildDevice(Some(cmd.spawn().expect("starting a copy of the test binary")))
}

/// A device process started by [`serve_in_child`]. Dropped before
/// [`ChildDevice::finish`] (a failing test), it is killed by its pid and
/// its stderr printed, which says what its seccomp filter refused.
pub struct ChildDevice(Option<Child>);

impl ChildDevice {
    pub fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    /// How the child ended and what it said on stderr; kills it (by its
    /// pid) if it has not ended within `timeout`.
    pub fn finish(mut self, timeout: Duration) -> (ExitStatus, String) {
        let mut child = self.0.take().expect("finished once");
        let deadline = Instant::now() + timeout;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let output = child.wait_with_output().unwrap();
        (output.status, String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

impl Drop for ChildDevice {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            if let Ok(output) = child.wait_with_output() {
                eprintln!("device process: {}\n{}", output.status, String::from_utf8_lossy(&output.stderr));
            }
        }
    }
}

/// The child's side of [`serve_in_child`]; does nothing in a normal run.
#[test]
fn child_serves_under_its_policy() {
    let Ok(args) = std::env::var(CHILD_ENV) else { return };
    let code = match serve_child(&args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("child {args}: {e}");
            1
        }
    };
    std::process::exit(code);
}

fn serve_child(args: &str) -> Result<(), String> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let words: Vec<&str> = args.split(' ').collect();
    let [kind, fd, extra] = words[..] else { return Err(format!("bad {CHILD_ENV} {args:?}")) };
    let fd: RawFd = fd.parse().map_err(|_| format!("bad fd {fd}"))?;
    // SAFETY: the parent passed this listening socket for us to own.
    let listener = std::os::unix::net::UnixListener::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let policy = match kind {
        "block" => mm_policies::Policy::Block,
        "vsock" => mm_policies::Policy::Vsock,
        "net" => mm_policies::Policy::Net,
        other => return Err(format!("unknown device {other}")),
    };
    mm_policies::install(policy).map_err(|e| e.to_string())?;
    match kind {
        "block" => {
            let config = crate::block::BlockConfig {
                image: extra.into(),
                overlay: None,
                read_only: false,
                serial: None,
                lazy_memory: true,
                rate_limit: Default::default(),
                test: Default::default(),
            };
            crate::block::serve_block(config, listener).map_err(|e| e.to_string())
        }
        "vsock" => {
            let config = crate::vsock::VsockConfig {
                guest_cid: 3,
                uds_path: extra.into(),
                transport_reset: false,
                lazy_memory: true,
            };
            crate::vsock::serve_vsock(config, listener).map_err(|e| e.to_string())
        }
        _ => {
            let tap: RawFd = extra.parse().map_err(|_| format!("bad TAP fd {extra}"))?;
            // SAFETY: the parent passed this TAP fd for us to own.
            let tap = unsafe { OwnedFd::from_raw_fd(tap) };
            let mac = crate::net::MacAddr([0x02, 0, 0, 0, 0, 0x43]);
            crate::net::serve_net(crate::net::NetConfig { tap, mac, lazy_memory: true }, listener)
                .map_err(|e| e.to_string())
        }
    }
}
