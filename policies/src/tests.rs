use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;

use super::*;

struct Dir;

impl syntax::Loader for Dir {
    fn load(&self, name: &str) -> Result<String, String> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policy").join(name);
        std::fs::read_to_string(path).map_err(|e| e.to_string())
    }
}

struct Text(BTreeMap<&'static str, &'static str>);

impl syntax::Loader for Text {
    fn load(&self, name: &str) -> Result<String, String> {
        self.0.get(name).map(|s| s.to_string()).ok_or_else(|| format!("no {name}"))
    }
}

#[test]
fn every_policy_compiles_and_lets_the_handler_report() {
    for policy in Policy::ALL {
        assert!(!policy.program().is_empty(), "{policy}");
        for needed in ["write", "exit_group", "rt_sigreturn"] {
            assert!(policy.syscalls().contains(&needed), "{policy} lacks {needed}");
        }
        let parsed = syntax::parse(&format!("{}.policy", policy.name()), &Dir).unwrap();
        assert_eq!(parsed.syscall_count(), policy.syscalls().len());
    }
}

#[test]
fn vcpu_policy_is_small_and_has_no_file_or_socket_creation() {
    let vcpu = Policy::VmmVcpu.syscalls();
    for forbidden in ["openat", "socket", "connect", "execve", "clone3", "ptrace", "unshare"] {
        assert!(!vcpu.contains(&forbidden), "vCPU policy allows {forbidden}");
    }
    for forbidden in ["socket", "connect", "execve", "ptrace", "unshare", "mount"] {
        assert!(!Policy::Block.syscalls().contains(&forbidden), "block policy allows {forbidden}");
    }
}

/// One extra file, `probe`, on top of `policy/`.
struct WithProbe(String);

impl syntax::Loader for WithProbe {
    fn load(&self, name: &str) -> Result<String, String> {
        if name == "probe" { Ok(self.0.clone()) } else { syntax::Loader::load(&Dir, name) }
    }
}

/// `_IOC(dir, type, nr, size)` (asm-generic/ioctl.h): dir 0 none, 3 read-write.
const fn ioc(dir: u64, kind: u64, nr: u64, size: u64) -> u64 {
    dir << 30 | size << 16 | kind << 8 | nr
}

/// The lazy-restore numbers of constants.policy, recomputed from
/// linux/userfaultfd.h's definitions (and libc's).
#[test]
fn lazy_restore_constants_match_the_kernel_headers() {
    let expected = [
        // _IO(USERFAULTFD_IOC, 0x00)
        ("USERFAULTFD_IOC_NEW", ioc(0, 0xaa, 0x00, 0)),
        // _IOWR(UFFDIO, _UFFDIO_API, struct uffdio_api { __u64 api, features, ioctls; })
        ("UFFDIO_API", ioc(3, 0xaa, 0x3f, 3 * 8)),
        // _IOWR(UFFDIO, _UFFDIO_REGISTER, struct uffdio_register {
        //     struct uffdio_range { __u64 start, len; } range; __u64 mode, ioctls; })
        ("UFFDIO_REGISTER", ioc(3, 0xaa, 0x00, 4 * 8)),
        ("MADV_HUGEPAGE", libc::MADV_HUGEPAGE as u64),
        ("MADV_NOHUGEPAGE", libc::MADV_NOHUGEPAGE as u64),
        ("O_RDWR", libc::O_RDWR as u64),
        ("O_CLOEXEC", libc::O_CLOEXEC as u64),
    ];
    for (name, value) in expected {
        let probe = WithProbe(format!("@include constants.policy\nread: arg0 == {name}"));
        let parsed = syntax::parse("probe", &probe).unwrap();
        assert_eq!(parsed.rules["read"].as_ref().unwrap()[0][0].value, value, "{name}");
    }
    assert_eq!(ioc(3, 0xaa, 0x3f, 24), 0xc018_aa3f, "the formula, against the header's value");
}

/// What a device process does for a lazy restore (vhost-user postcopy) is
/// allowed by its policy, and the userfaultfd(2) syscall is not.
#[test]
fn device_policies_allow_a_lazy_restore_and_not_the_userfaultfd_syscall() {
    let allows = |rules: &syntax::Policy, syscall: &str, arg: u8, value: u64| match rules.rules.get(syscall) {
        Some(None) => true,
        Some(Some(alternatives)) => alternatives
            .iter()
            .any(|all| all.len() == 1 && all[0] == syntax::Condition { arg, op: syntax::Op::Eq, value }),
        None => false,
    };
    let (o_rdwr_cloexec, ioctls) = ((libc::O_RDWR | libc::O_CLOEXEC) as u64, [0xaa00, 0xc018_aa3f, 0xc020_aa00]);
    for policy in [Policy::Block, Policy::Net, Policy::Vsock] {
        let parsed = syntax::parse(&format!("{}.policy", policy.name()), &Dir).unwrap();
        assert!(allows(&parsed, "openat", 2, o_rdwr_cloexec), "{policy}: opening /dev/userfaultfd");
        for ioctl in ioctls {
            assert!(allows(&parsed, "ioctl", 1, ioctl), "{policy}: ioctl {ioctl:#x}");
        }
        assert!(allows(&parsed, "madvise", 2, libc::MADV_NOHUGEPAGE as u64), "{policy}: MADV_NOHUGEPAGE");
        assert!(!policy.syscalls().contains(&"userfaultfd"), "{policy} allows userfaultfd(2)");
    }
    // The vhost-user-backend crate's handler (net, vsock) besides.
    for policy in [Policy::Net, Policy::Vsock] {
        let parsed = syntax::parse(&format!("{}.policy", policy.name()), &Dir).unwrap();
        assert!(policy.syscalls().contains(&"dup"), "{policy}: dup");
        assert!(allows(&parsed, "madvise", 2, libc::MADV_HUGEPAGE as u64), "{policy}: MADV_HUGEPAGE");
    }
}

#[test]
fn syntax_reads_conditions_defines_and_includes() {
    let files = Text(BTreeMap::from([
        ("a", "@define X 0x10\n# c\nread\nioctl: arg1 == X\nioctl: arg1 == 2 && arg0 & 0xf == 1 # c\n@include b"),
        ("b", "read\nmmap: arg2 & 4 == 0"),
    ]));
    let p = syntax::parse("a", &files).unwrap();
    assert_eq!(p.syscall_count(), 3);
    assert_eq!(p.rules["read"], None);
    let ioctl = p.rules["ioctl"].as_ref().unwrap();
    assert_eq!(ioctl.len(), 2);
    assert_eq!(ioctl[0], vec![syntax::Condition { arg: 1, op: syntax::Op::Eq, value: 0x10 }]);
    assert_eq!(ioctl[1][1], syntax::Condition { arg: 0, op: syntax::Op::MaskedEq(0xf), value: 1 });
}

#[test]
fn syntax_rejects_mistakes() {
    for bad in
        ["ioctl: arg7 == 1", "ioctl: arg1 ~ 1", "ioctl: arg1 == NOPE", "read\nread: arg0 == 1", "re ad", "@include a"]
    {
        let files = Text(BTreeMap::from([("a", bad)]));
        assert!(syntax::parse("a", &files).is_err(), "{bad:?} was accepted");
    }
}

#[test]
fn report_round_trips_and_names_syscalls() {
    let report = Report { syscall: 41, policy: Some(Policy::Block) };
    assert_eq!(Report::decode(&report.encode()), Some(report));
    assert_eq!(report.name(), "socket");
    assert_eq!(syscall_name(101), "ptrace");
    assert_eq!(Report::decode(b"garbage....."), None);
}

const CHILD_ENV: &str = "MM_POLICIES_TEST_CHILD";

/// Runs in a child copy of this test binary: install the tiny policy and
/// make a forbidden call.
#[test]
fn child_makes_a_forbidden_call() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    install(Policy::TestTiny).unwrap();
    // SAFETY: socket(2) with integer arguments; the filter traps it.
    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    unreachable!("the forbidden syscall returned");
}

#[test]
fn a_forbidden_syscall_kills_with_sigsys_and_reports_it() {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two fds into our array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: we own both fds now.
    let (read, write) = unsafe {
        use std::os::fd::FromRawFd;
        (std::fs::File::from_raw_fd(fds[0]), std::os::fd::OwnedFd::from_raw_fd(fds[1]))
    };
    let write_fd = write.as_raw_fd();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "tests::child_makes_a_forbidden_call", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .env(REPORT_FD_ENV, write_fd.to_string());
    // SAFETY: only fcntl between fork and exec, to keep the pipe open.
    unsafe {
        cmd.pre_exec(move || {
            libc::fcntl(write_fd, libc::F_SETFD, 0);
            Ok(())
        });
    }
    let output = cmd.output().unwrap();
    drop(write);
    assert_eq!(output.status.signal(), Some(libc::SIGSYS), "{output:?}");
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut &read, &mut bytes).unwrap();
    let report = Report::decode(&bytes).unwrap();
    assert_eq!((report.name(), report.syscall, report.policy), ("socket", 41, Some(Policy::TestTiny)));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("forbidden syscall socket (41)"), "{stderr}");
}
