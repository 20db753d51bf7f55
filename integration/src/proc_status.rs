//! What the kernel says about a jailed process, read from the host's
//! `/proc`: every thread's seccomp mode, `no_new_privs` and capability sets
//! (`/proc/<pid>/task/*/status`), its namespaces (`/proc/<pid>/ns/*`) next to
//! those of a process outside every jail, and what its root shows
//! (`/proc/<pid>/mountinfo`, `/proc/<pid>/root`) next to what its jail was
//! meant to hold. The tests use it on the processes a broker launched, so
//! the confinement is checked where it matters rather than assumed from
//! the jailer's code.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The namespaces every jailed process has of its own (net included: the
/// net device's TAP fd works from any namespace, so it gets one too).
pub const OWN_NAMESPACES: [&str; 5] = ["pid", "mnt", "net", "ipc", "uts"];

/// The fields of `/proc/<pid>/task/<tid>/status` that confinement shows in,
/// and what each must read for a jailed thread (capability sets in hex).
const CONFINED: [(&str, &str); 7] = [
    ("Seccomp", "2"),
    ("NoNewPrivs", "1"),
    ("CapInh", "0000000000000000"),
    ("CapPrm", "0000000000000000"),
    ("CapEff", "0000000000000000"),
    ("CapBnd", "0000000000000000"),
    ("CapAmb", "0000000000000000"),
];

fn field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(str::trim)
}

/// Every thread id of `pid`.
pub fn threads(pid: i32) -> std::io::Result<Vec<i32>> {
    let mut tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    Ok(tids)
}

/// The processes whose parent is `pid` (from every `/proc/<n>/stat`).
pub fn children(pid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut found: Vec<i32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|n| {
            // `pid (comm) state ppid ...`: comm may hold spaces, so split after ')'.
            std::fs::read_to_string(format!("/proc/{n}/stat")).ok().is_some_and(|stat| {
                stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok())
                    == Some(pid)
            })
        })
        .collect();
    found.sort_unstable();
    found
}

/// `pid`'s descendants, children first.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut all = Vec::new();
    let mut next = vec![pid];
    while let Some(p) = next.pop() {
        for child in children(p) {
            all.push(child);
            next.push(child);
        }
    }
    all
}

/// The namespace `kind` of `pid`, as `/proc/<pid>/ns/<kind>` reads (`net:[4026531840]`).
pub fn namespace(pid: i32, kind: &str) -> std::io::Result<String> {
    Ok(std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))?.display().to_string())
}

/// `pid`'s command line.
pub fn cmdline(pid: i32) -> std::io::Result<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    Ok(raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect())
}

/// The mount points in `pid`'s mount namespace, as it sees them.
pub fn mount_points(pid: i32) -> std::io::Result<BTreeSet<PathBuf>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    Ok(text.lines().filter_map(|l| l.split(' ').nth(4)).map(|p| PathBuf::from(unescape(p))).collect())
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Some(value) =
                std::str::from_utf8(&bytes[i + 1..i + 4]).ok().and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The paths a jailed `mm-device` or `mm-vmm` binds in for its arguments
/// (as their `run_jailed` does): its disk image, kernel, initramfs or
/// snapshot files by their real paths, and the directory of its vsock
/// socket. The binary and its libraries come on top.
pub fn mounts_for_args(args: &[String]) -> Vec<PathBuf> {
    let mut mounts = Vec::new();
    for pair in args.windows(2) {
        let real = || std::fs::canonicalize(&pair[1]).unwrap_or_else(|_| PathBuf::from(&pair[1]));
        match pair[0].as_str() {
            "--image" | "--base" | "--map" | "--kernel" | "--initrd" | "--restore-state" | "--restore-memory"
                if !pair[1].starts_with("fd:") =>
            {
                mounts.push(real())
            }
            "--uds" => mounts.extend(std::path::absolute(&pair[1]).ok().and_then(|p| Some(p.parent()?.into()))),
            _ => {}
        }
    }
    // A lazily restored microVM's back ends get a /dev of their own
    // holding only userfaultfd (`JailSpec::userfaultfd`; what it holds is
    // checked by jail_userfaultfd.rs).
    if args.iter().any(|a| a == "--lazy-memory") {
        mounts.push(PathBuf::from("/dev"));
    }
    mounts
}

/// Everything wrong with the confinement of `pid` (a process inside a jail)
/// and each of its threads; empty when it is confined as a jailed process
/// of ours must be:
///
/// * every thread under a seccomp filter (`Seccomp: 2`), with
///   `no_new_privs`, and with no capability in any set;
/// * its own [`OWN_NAMESPACES`], none shared with `outside` (a process in
///   no jail, such as the broker);
/// * exactly `expected_mounts` (plus its root) mounted in its namespace,
///   and nothing else under its root: each entry there is a mount point or
///   a directory leading to one.
pub fn confinement_problems(pid: i32, outside: i32, expected_mounts: &BTreeSet<PathBuf>) -> Vec<String> {
    let mut problems = Vec::new();
    match threads(pid) {
        Ok(tids) => {
            for tid in tids {
                let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")) else { continue };
                let name = field(&status, "Name").unwrap_or("?").to_string();
                for (key, want) in CONFINED {
                    let got = field(&status, key).unwrap_or("(absent)");
                    if got != want {
                        problems.push(format!("thread {tid} ({name}) of {pid}: {key} is {got}, not {want}"));
                    }
                }
            }
        }
        Err(e) => problems.push(format!("/proc/{pid}/task: {e}")),
    }
    for kind in OWN_NAMESPACES {
        match (namespace(pid, kind), namespace(outside, kind)) {
            (Ok(mine), Ok(theirs)) if mine == theirs => {
                problems.push(format!("{pid} shares its {kind} namespace ({mine}) with {outside}"))
            }
            (Ok(_), Ok(_)) => {}
            (mine, theirs) => problems.push(format!("{kind} namespaces of {pid} / {outside}: {mine:?} / {theirs:?}")),
        }
    }
    let mut expected = expected_mounts.clone();
    expected.insert(PathBuf::from("/"));
    match mount_points(pid) {
        Ok(mounted) if mounted == expected => {}
        Ok(mounted) => {
            let extra: Vec<_> = mounted.difference(&expected).collect();
            let missing: Vec<_> = expected.difference(&mounted).collect();
            problems.push(format!("{pid}'s mounts: unexpected {extra:?}, missing {missing:?}"));
        }
        Err(e) => problems.push(format!("/proc/{pid}/mountinfo: {e}")),
    }
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    for path in stray_entries(&root, Path::new("/"), &expected) {
        problems.push(format!("{pid} sees {} under its root, which its jail does not hold", path.display()));
    }
    problems
}

/// Entries under `dir` (the jail's `inside`, seen through `root`) that are
/// neither a mount point in `mounts` nor a directory leading to one. Mount
/// points are not entered: what a bound directory holds is the jail's.
fn stray_entries(root: &Path, inside: &Path, mounts: &BTreeSet<PathBuf>) -> Vec<PathBuf> {
    let host = root.join(inside.strip_prefix("/").unwrap_or(inside));
    let Ok(entries) = std::fs::read_dir(&host) else { return vec![inside.to_path_buf()] };
    let mut strays = Vec::new();
    for entry in entries.flatten() {
        let path = inside.join(entry.file_name());
        if mounts.contains(&path) {
            continue;
        }
        let leads_to_mount = mounts.iter().any(|m| m.starts_with(&path));
        if leads_to_mount && entry.file_type().is_ok_and(|t| t.is_dir()) {
            strays.extend(stray_entries(root, &path, mounts));
        } else {
            strays.push(path);
        }
    }
    strays
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checker finds what is wrong with a process in no jail (this
    /// test): no filter, no_new_privs off, capabilities (as root), the same
    /// namespaces as itself, and a whole host under its root.
    #[test]
    fn an_unjailed_process_fails_every_check() {
        let me = std::process::id() as i32;
        let problems = confinement_problems(me, me, &BTreeSet::new());
        let text = problems.join("\n");
        for needle in
            ["Seccomp is 0, not 2", "NoNewPrivs is 0, not 1", "shares its pid namespace", "'s mounts: unexpected"]
        {
            assert!(text.contains(needle), "no {needle:?} in:\n{text}");
        }
        assert!(text.contains("sees /proc under its root"), "{text}");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(text.contains("CapEff is 000001"), "{text}");
        }
    }

    #[test]
    fn descendants_and_arguments_are_found() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let me = std::process::id() as i32;
        assert!(descendants(me).contains(&(child.id() as i32)));
        assert_eq!(cmdline(child.id() as i32).unwrap(), ["sleep", "30"]);
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        child.wait().unwrap();
        let args: Vec<String> =
            ["mm-device", "vsock", "--uds", "/run/x/vsock/v.sock", "--image", "fd:3", "--kernel", "/nonexistent/k"]
                .map(String::from)
                .into();
        assert_eq!(mounts_for_args(&args), [PathBuf::from("/run/x/vsock"), PathBuf::from("/nonexistent/k")]);
        assert_eq!(unescape(r"/a\040b\134c"), r"/a b\c");
    }
}
