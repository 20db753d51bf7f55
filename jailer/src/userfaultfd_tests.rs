//! [`JailSpec::userfaultfd`] in real jails (as root; skipped otherwise,
//! failed under `CI`): the jailed copy of this test binary runs the
//! [`crate::probes::userfaultfd`] and [`crate::probes::dev`] probes, as the
//! microVM's unprivileged uid and as uid 0 without capabilities.

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::testutil::{Scratch, root_available};
use crate::{ExitReason, JailError, JailSpec, USERFAULTFD};

/// An unprivileged uid/gid, as the broker gives each microVM.
const VM_UID: u32 = 61_235;
/// Set in the jailed copy: run the probes instead of the tests.
const CHILD_ENV: &str = "MM_JAILER_TEST_PROBES";

/// The jailed copy's side: does nothing in a normal run.
#[test]
fn child_runs_the_probes() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    crate::probes::userfaultfd();
    crate::probes::dev();
    std::process::exit(0);
}

/// Runs the probes in a jail of `uid`, with or without the node; returns
/// how the copy ended and the probes' lines.
fn probe(uid: u32, userfaultfd: bool) -> (ExitReason, Vec<String>) {
    let dir = Scratch::new();
    let name = format!("uffd-{uid}-{userfaultfd}-{}", std::process::id());
    let mut spec = JailSpec::new(name, std::env::current_exe().unwrap(), uid, uid);
    spec.jail_base = dir.0.join("jails");
    spec.args = ["--exact", "userfaultfd_tests::child_runs_the_probes", "--nocapture", "--test-threads=1"]
        .map(Into::into)
        .into();
    spec.env.push((CHILD_ENV.into(), "1".into()));
    spec.userfaultfd = userfaultfd;
    spec.die_with_parent = true;
    let out_path = dir.0.join("out");
    let out = std::fs::File::create(&out_path).unwrap();
    let null = std::fs::File::open("/dev/null").unwrap();
    // The jail has no /dev/null for Rust's runtime to open on a closed stdio.
    spec.keep_stdio = false;
    spec.fds.extend([(null.as_raw_fd(), 0), (out.as_raw_fd(), 1), (2, 2)]);
    let mut child = crate::spawn(&spec).unwrap();
    let reason = child.wait().unwrap();
    let out = std::fs::read_to_string(&out_path).unwrap();
    // The first probe's line follows libtest's "test NAME ... ".
    (reason, out.lines().filter_map(|l| l.find("PROBE ").map(|at| l[at..].to_string())).collect())
}

fn line<'a>(lines: &'a [String], name: &str) -> &'a str {
    let prefix = format!("PROBE {name} ");
    let prefix_colon = format!("PROBE {name}:");
    lines
        .iter()
        .find(|l| l.starts_with(&prefix) || l.starts_with(&prefix_colon))
        .unwrap_or_else(|| panic!("no {name} probe in {lines:#?}"))
}

#[test]
fn a_jail_with_the_option_creates_a_userfaultfd_as_its_uid() {
    if !root_available("a_jail_with_the_option_creates_a_userfaultfd_as_its_uid") {
        return;
    }
    let host = std::fs::metadata(USERFAULTFD).expect("the host's /dev/userfaultfd");
    let rdev = format!("{}:{}", libc::major(host.rdev()), libc::minor(host.rdev()));
    for uid in [VM_UID, 0] {
        let (reason, lines) = probe(uid, true);
        assert_eq!(reason, ExitReason::Exited(0), "{lines:#?}");
        let created = line(&lines, "userfaultfd");
        let expected = format!("PROBE userfaultfd created: /dev/userfaultfd is {rdev} owned by {uid}:{uid} mode 600;");
        assert!(created.starts_with(&expected), "{created}\nwanted {expected}");
        assert_eq!(line(&lines, "uid"), format!("PROBE uid: {uid}"), "created as another uid");
        assert!(line(&lines, "dev-write").contains("blocked: Read-only file system"), "{lines:#?}");
        assert_eq!(line(&lines, "dev-lists"), "PROBE dev-lists: userfaultfd");
    }
    assert_eq!(std::fs::metadata(USERFAULTFD).unwrap().mode(), host.mode(), "the host's node changed");
    assert_eq!(std::fs::metadata(USERFAULTFD).unwrap().uid(), host.uid(), "the host's node changed hands");
}

#[test]
fn a_jail_without_the_option_has_no_userfaultfd() {
    if !root_available("a_jail_without_the_option_has_no_userfaultfd") {
        return;
    }
    let unprivileged = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").is_ok_and(|v| v.trim() == "0");
    for uid in [VM_UID, 0] {
        let (reason, lines) = probe(uid, false);
        assert_eq!(reason, ExitReason::Exited(0), "{lines:#?}");
        assert_eq!(line(&lines, "uid"), format!("PROBE uid: {uid}"));
        let failed = line(&lines, "userfaultfd");
        assert!(failed.contains("failed: stat /dev/userfaultfd: No such file or directory"), "{failed}");
        assert!(line(&lines, "dev-lists").contains("No such file or directory"), "{lines:#?}");
        if unprivileged {
            let syscall = line(&lines, "userfaultfd-syscall");
            assert!(syscall.contains("blocked: ") && syscall.contains("Operation not permitted"), "{syscall}");
        }
    }
}

#[test]
fn a_host_without_the_node_is_named_in_the_error() {
    let missing = Path::new("/nonexistent/userfaultfd");
    let error = crate::prepare::char_device(missing).unwrap_err();
    assert!(matches!(&error, JailError::HostDevice { path, .. } if path == missing), "{error:?}");
    let text = error.to_string();
    assert!(text.contains("/nonexistent/userfaultfd") && text.contains("No such file"), "{text}");
    let error = crate::prepare::char_device(Path::new("/")).unwrap_err();
    assert!(error.to_string().contains("not a character device"), "{error}");
    assert!(crate::prepare::char_device(Path::new("/dev/null")).is_ok());
}

#[test]
fn nothing_may_be_mounted_over_the_node() {
    for target in ["/dev", USERFAULTFD] {
        let mut spec = JailSpec::new("t", "/bin/true", 0, 0);
        spec.userfaultfd = true;
        spec.mounts.push(crate::BindMount { target: target.into(), ..crate::BindMount::read_only("/tmp") });
        let error = spec.validate().unwrap_err();
        assert!(error.contains("would hide the jail's /dev/userfaultfd"), "{error}");
        spec.userfaultfd = false;
        assert!(spec.validate().is_ok());
    }
}
