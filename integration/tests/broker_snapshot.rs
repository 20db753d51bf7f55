//! Snapshots through a real broker and the real `mmctl`, on one booted
//! guest: `snapshot create` while the guest counts, writes its disk and
//! holds 4 MB in tmpfs (integration/tests/snapshot.rs has the 16 MiB: every
//! byte costs here, as the guest kernel is emulated on PVM); two `restore`s as new microVMs (the counter goes
//! on, the data's checksum and the disk's writes are there, the disk copy
//! is a clean filesystem; each has its own address, MAC, hostname, SSH host
//! key and random stream; exec and ssh answer); `fork --count 4` (four
//! clones, each its own identity, random stream, memory and disk, the disk
//! a copy-on-write layer over the snapshot's, which stays unchanged; a
//! snapshot of a clone is flat, clean and restores; a fork of a snapshot
//! being deleted); `branch` (a live copy of the running VM, which counts
//! on; both disks clean); `suspend` (every process
//! gone) and `start` (the workload goes on), across a broker restart too;
//! a snapshot with a corrupted memory file, which fails the new microVM
//! with a clear reason and leaves no process behind; and warm starts: the
//! first microVM of its shape (the broker has a private, empty warm cache)
//! boots and becomes the warm snapshot, the next `run` restores it and is
//! handed its workload, command and environment.

use std::path::Path;
use std::time::Duration;

use mm_integration::broker::TestBroker;
use mm_integration::devices::Scratch;
use mm_integration::guest::BOOT_TIMEOUT;
use mm_integration::{kvm_available, run_with_timeout};
use serde_json::Value;

const QUICK: Duration = Duration::from_secs(120);

fn mmctl_ok(broker: &TestBroker, args: &[&str]) -> String {
    let run = broker.mmctl(args, QUICK).unwrap();
    assert_eq!(run.status, Some(0), "mmctl {args:?}: {}\n{}", run.stderr, run.stdout);
    run.stdout
}

fn json(broker: &TestBroker, args: &[&str]) -> Value {
    serde_json::from_str(&mmctl_ok(broker, args)).unwrap()
}

/// Runs a script in `vm`, retrying while its agent is not up; asserts success.
fn sh(broker: &TestBroker, vm: &str, script: &str) -> String {
    let run = broker.exec_when_ready(vm, &["sh", "-c", script], BOOT_TIMEOUT).unwrap();
    assert_eq!(run.status, Some(0), "{vm}: {script}\nstdout: {}\nstderr: {}", run.stdout, run.stderr);
    run.stdout
}

/// The `tick N` values in a console log.
fn ticks(log: &str) -> Vec<u64> {
    log.lines().filter_map(|l| l.trim().strip_prefix("tick ")?.parse().ok()).collect()
}

/// Waits until the microVM's identity is applied (its audit log says so).
fn wait_identity(broker: &TestBroker, vm: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let audit = mmctl_ok(broker, &["audit", vm]);
        if audit.contains("\"identity\"") {
            return;
        }
        assert!(!audit.contains("identity-failed"), "{vm} refused its identity:\n{audit}");
        assert!(std::time::Instant::now() < deadline, "{vm} never took its identity:\n{audit}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn pids(info: &Value) -> Vec<i64> {
    info["processes"].as_array().unwrap().iter().map(|p| p["pid"].as_i64().unwrap()).filter(|p| *p > 0).collect()
}

fn alive(pid: i64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// A file's bytes, hashed (to see that nothing wrote it).
fn digest(path: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(path).unwrap().hash(&mut hasher);
    hasher.finish()
}

/// Bytes a file takes on disk.
fn allocated(path: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(path).unwrap()) * 512
}

/// `mmctl fork` of snapshot `id` (made from `web`, whose tmpfs data hash
/// to `sum`): four running microVMs, each with its own identity (distinct
/// from each other and from `others`), random stream, memory and disk;
/// each disk a copy-on-write layer over the snapshot's, which none writes;
/// a snapshot of a clone is one flat, clean disk that restores.
fn fork_four_clones(broker: &TestBroker, id: &str, sum: &str, others: &[&(String, String, String)]) {
    let snapshot_disk = broker.dir.path(&format!("state/snapshots/{id}/rw.ext4"));
    let disk_before = digest(&snapshot_disk);
    // Refused before anything starts: a count of 0, an unknown snapshot.
    let before = json(broker, &["ps", "-o", "json"]).as_array().unwrap().len();
    let zero = broker.mmctl(&["fork", "s1", "--count", "0"], QUICK).unwrap();
    assert_eq!(zero.status, Some(2), "count 0 is a usage error: {}", zero.stderr);
    let unknown = broker.mmctl(&["fork", "no-such-snapshot", "--count", "2"], QUICK).unwrap();
    assert_eq!(unknown.status, Some(3), "an unknown snapshot is not-found: {}", unknown.stderr);
    // 64 clones of 128 MiB (8 GiB) are more than the host has room for.
    let big = broker.mmctl(&["fork", "s1", "--count", "64", "--name-prefix", "big"], QUICK).unwrap();
    assert_eq!(big.status, Some(5), "over the host's capacity is no-memory: {}", big.stderr);
    assert!(big.stderr.contains("memory"), "{}", big.stderr);
    assert_eq!(json(broker, &["ps", "-o", "json"]).as_array().unwrap().len(), before, "nothing was started");
    let clones = json(broker, &["fork", "s1", "--count", "4", "--name-prefix", "clone", "-o", "json"]);
    let names: Vec<String> = clones.as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap().into()).collect();
    assert_eq!(names, ["clone-1", "clone-2", "clone-3", "clone-4"], "{clones}");
    let mut identities: Vec<(String, String, String)> = others.iter().map(|o| (*o).clone()).collect();
    let mut draws = Vec::new();
    for (name, clone) in names.iter().zip(clones.as_array().unwrap()) {
        wait_identity(broker, name);
        let me = whoami(broker, name);
        assert_eq!(me.0, *name, "hostname");
        for other in &identities {
            assert!(me.1 != other.1 && me.2 != other.2 && me.0 != other.0, "{name} {me:?} shares with {other:?}");
        }
        identities.push(me);
        draws.push(sh(broker, name, "head -c16 /dev/urandom | md5sum"));
        assert_eq!(sh(broker, name, "md5sum < /run/m/blob"), sum, "{name}: the snapshot's memory");
        assert!(sh(broker, name, "cat /root/lines").starts_with("line 1\n"), "{name}: the snapshot's disk");
        // Its end, read from the base through its layer (the whole file
        // would take a minute here: the guest kernel is emulated on PVM).
        assert_eq!(sh(broker, name, "tail -n 1 /root/big"), "2000000\n", "{name}: the snapshot's disk");
        // Its own writes, to memory and to disk.
        sh(broker, name, "hostname > /run/m/mine && hostname > /root/mine && sync");
        // The disk is a layer over the snapshot's: no copy was made.
        let dir = broker.dir.path(&format!("state/vms/{}", clone["id"].as_str().unwrap()));
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        assert_eq!(inode(&dir.join("base.ext4")), inode(&snapshot_disk), "{name}'s base is the snapshot's disk");
        let (own, shared) = (allocated(&dir.join("rw.ext4")), allocated(&snapshot_disk));
        eprintln!("{name}: its own disk layer takes {own} bytes over the snapshot's {shared}");
        assert!(own < shared, "{name}'s layer ({own} bytes) is no smaller than a copy ({shared})");
    }
    draws.sort();
    draws.dedup();
    assert_eq!(draws.len(), 4, "every clone's random stream is its own");
    // A fork whose last name is taken starts nothing (without the
    // broker's check up front, late-1 and late-2 would start first).
    mmctl_ok(broker, &["restore", "s1", "--name", "late-3"]);
    let taken = broker.mmctl(&["fork", "s1", "--count", "3", "--name-prefix", "late"], QUICK).unwrap();
    assert_eq!(taken.status, Some(4), "a taken name is a conflict: {}", taken.stderr);
    for name in ["late-1", "late-2"] {
        assert_ne!(broker.mmctl(&["inspect", name], QUICK).unwrap().status, Some(0), "{name} was started");
    }
    mmctl_ok(broker, &["rm", "-f", "late-3"]);
    // Nobody sees another's writes.
    for name in &names {
        let mine = sh(broker, name, "cat /run/m/mine /root/mine");
        assert_eq!(mine, format!("{name}\n{name}\n"), "{name} sees only its own writes");
    }
    for vm in ["web", "web2"] {
        sh(broker, vm, "test ! -e /run/m/mine && test ! -e /root/mine");
    }
    assert_eq!(digest(&snapshot_disk), disk_before, "a clone wrote the snapshot's disk");

    // A clone's layered disk survives its back end's death: the broker
    // starts a new one on the same base, layer and map, and the clone's
    // writes before and after are there.
    let rw_pid = |info: &Value| {
        info["processes"].as_array().unwrap().iter().find(|p| p["role"] == "block-rw").unwrap()["pid"].as_i64().unwrap()
    };
    let killed = rw_pid(&json(broker, &["inspect", "clone-1", "-o", "json"]));
    // SAFETY: kill(2) on a pid the broker reported as clone-1's disk
    // process, which this test's broker started.
    assert_eq!(unsafe { libc::kill(killed as i32, libc::SIGKILL) }, 0);
    let deadline = std::time::Instant::now() + QUICK;
    while rw_pid(&json(broker, &["inspect", "clone-1", "-o", "json"])) == killed {
        assert!(std::time::Instant::now() < deadline, "clone-1's disk process was not replaced");
        std::thread::sleep(Duration::from_millis(300));
    }
    sh(broker, "clone-1", "echo after-kill >> /root/mine && sync");
    assert_eq!(sh(broker, "clone-1", "cat /root/mine"), "clone-1\nafter-kill\n");
    assert_eq!(sh(broker, "clone-1", "tail -n 1 /root/big"), "2000000\n");

    // A snapshot of a clone: one flat, clean disk, whose restore sees the
    // clone's write.
    mmctl_ok(broker, &["snapshot", "create", "clone-1", "--name", "s-clone"]);
    let flat = json(broker, &["snapshot", "ls", "clone-1", "-o", "json"]);
    let flat_id = flat[0]["id"].as_str().unwrap();
    let flat_dir = broker.dir.path(&format!("state/snapshots/{flat_id}"));
    let files: Vec<String> =
        std::fs::read_dir(&flat_dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!files.iter().any(|f| f.contains("base") || f.contains("map")), "a flat snapshot: {files:?}");
    fsck_clean(&flat_dir.join("rw.ext4"), &broker.dir.path("fsck-clone.ext4"));
    for name in &names[1..] {
        mmctl_ok(broker, &["rm", "-f", name]);
    }
    mmctl_ok(broker, &["restore", "s-clone", "--name", "clone-again"]);
    wait_identity(broker, "clone-again");
    assert_eq!(sh(broker, "clone-again", "cat /root/mine"), "clone-1\nafter-kill\n");
    mmctl_ok(broker, &["rm", "-f", "clone-again"]);
    fork_of_a_snapshot_being_deleted(broker, &flat_dir);
}

/// A snapshot deleted while its fork's clones are still starting (their
/// memory comes in lazily from its file, their disks sit on its disk):
/// the clones come up whole from what they hold open; and a fork racing
/// the deletion either forks whole or is refused as not found, never half.
fn fork_of_a_snapshot_being_deleted(broker: &TestBroker, snapshot_dir: &Path) {
    mmctl_ok(broker, &["snapshot", "create", "clone-1", "--name", "doomed"]);
    mmctl_ok(broker, &["fork", "doomed", "--count", "2", "--name-prefix", "orphan"]);
    mmctl_ok(broker, &["snapshot", "rm", "doomed"]);
    for name in ["orphan-1", "orphan-2"] {
        wait_identity(broker, name);
        assert_eq!(sh(broker, name, "cat /root/mine && tail -n 1 /root/big"), "clone-1\nafter-kill\n2000000\n");
        assert_eq!(sh(broker, name, "md5sum < /run/m/blob | cut -c1-8").len(), 9, "{name}'s tmpfs");
        mmctl_ok(broker, &["rm", "-f", name]);
    }

    let fork = broker.mmctl_command(&["fork", "s-clone", "--count", "1", "--name-prefix", "race"]).unwrap();
    let fork = std::thread::spawn(move || run_with_timeout(fork, QUICK).unwrap());
    let removed = broker.mmctl(&["snapshot", "rm", "s-clone"], QUICK).unwrap();
    let fork = fork.join().unwrap();
    assert_eq!(removed.status, Some(0), "{}", removed.stderr);
    assert!(!snapshot_dir.exists(), "the snapshot's directory is gone");
    match fork.status {
        Some(0) => {
            wait_identity(broker, "race-1");
            assert_eq!(sh(broker, "race-1", "cat /root/mine"), "clone-1\nafter-kill\n");
            mmctl_ok(broker, &["rm", "-f", "race-1"]);
        }
        Some(3) => {
            assert!(fork.stderr.contains("no snapshot"), "{}", fork.stderr);
            assert_ne!(broker.mmctl(&["inspect", "race-1"], QUICK).unwrap().status, Some(0), "half a fork");
        }
        other => panic!("a fork racing the snapshot's removal: {other:?}: {}", fork.stderr),
    }
}

/// `mmctl branch web`: a live copy of the running `web` (identity
/// `source`): web counts on, the copy resumes the count from the cut with
/// web's memory and disk and its own identity, and the branch's snapshot
/// is gone once the copy has taken that identity.
fn branch_web(broker: &TestBroker, source: &(String, String, String)) {
    let before = *ticks(&mmctl_ok(broker, &["logs", "web"])).last().unwrap();
    sh(broker, "web", "echo before-branch > /run/m/branch && echo before-branch > /root/branch && sync");
    let copy = json(broker, &["branch", "web", "-o", "json"]);
    assert_eq!(copy["name"], "web-branch", "{copy}");
    let after = *ticks(&mmctl_ok(broker, &["logs", "web"])).last().unwrap();
    broker.wait_for_log("web", &format!("tick {}", after + 2), QUICK).unwrap();
    wait_identity(broker, "web-branch");
    let me = whoami(broker, "web-branch");
    assert_eq!(me.0, "web-branch");
    assert!(me.1 != source.1 && me.2 != source.2, "the copy has its own MAC and address: {me:?} {source:?}");
    assert_eq!(sh(broker, "web-branch", "cat /run/m/branch /root/branch"), "before-branch\nbefore-branch\n");
    let log = mmctl_ok(broker, &["logs", "web-branch"]);
    let first = *ticks(&log).first().unwrap_or_else(|| panic!("the copy prints no ticks:\n{log}"));
    assert!(before < first && first <= after + 1, "the copy resumed at {first}, cut between {before}-{after}");
    // Each side's writes after the cut are its own.
    sh(broker, "web-branch", "echo copy > /root/branch && sync");
    sh(broker, "web", "echo source-after > /root/after-branch && sync");
    assert_eq!(sh(broker, "web", "cat /root/branch"), "before-branch\n");
    sh(broker, "web-branch", "test ! -e /root/after-branch");
    let audit = mmctl_ok(broker, &["audit", "web"]);
    let line =
        audit.lines().find(|l| l.contains("\"branch\"")).unwrap_or_else(|| panic!("no branch snapshot:\n{audit}"));
    let pause_us = serde_json::from_str::<Value>(line).unwrap()["pause_us"].as_u64().unwrap();
    eprintln!("branch: web's vCPUs paused {pause_us} us");
    let snapshots = json(broker, &["snapshot", "ls", "-o", "json"]);
    assert!(snapshots.as_array().unwrap().iter().all(|s| s["kind"] != "branch"), "left behind: {snapshots}");
    // Both filesystems are clean: each side's disk, cut while it runs on
    // (the source still writing every second), checks clean.
    for vm in ["web", "web-branch"] {
        let snap = json(broker, &["snapshot", "create", vm, "--name", &format!("fsck-{vm}"), "-o", "json"]);
        let dir = broker.dir.path(&format!("state/snapshots/{}", snap["id"].as_str().unwrap()));
        fsck_clean(&dir.join("rw.ext4"), &broker.dir.path("fsck-branch.ext4"));
        eprintln!("{vm}'s snapshot after the branch: {snap}");
        mmctl_ok(broker, &["snapshot", "rm", &format!("fsck-{vm}")]);
    }
    // Only a running microVM can be branched.
    mmctl_ok(broker, &["stop", "web-branch"]);
    let refused = broker.mmctl(&["branch", "web-branch"], QUICK).unwrap();
    assert_ne!(refused.status, Some(0), "a stopped microVM was branched");
    assert!(refused.stderr.contains("running"), "{}", refused.stderr);
    mmctl_ok(broker, &["rm", "-f", "web-branch"]);
}

/// A disk image is a clean filesystem once its journal is replayed:
/// preen mode fixes only what a mounted ext4 always leaves (summary
/// counters) and fails on real damage; a second look finds nothing. Works
/// on a copy at `scratch`.
fn fsck_clean(disk: &Path, scratch: &Path) {
    std::fs::copy(disk, scratch).unwrap();
    for (flags, allowed) in [("-fp", &[0, 1][..]), ("-fn", &[0][..])] {
        let mut fsck = std::process::Command::new("e2fsck");
        fsck.arg(flags).arg(scratch);
        let fsck = run_with_timeout(fsck, QUICK).unwrap();
        assert!(fsck.status.is_some_and(|c| allowed.contains(&c)), "e2fsck {flags} {}: {fsck:?}", disk.display());
    }
    std::fs::remove_file(scratch).unwrap();
}

/// The host's MemAvailable in MiB.
fn mem_available_mib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
}

/// What a guest says about itself.
fn whoami(broker: &TestBroker, vm: &str) -> (String, String, String) {
    let out = sh(broker, vm, "hostname; cat /sys/class/net/eth0/address; ip -4 -o addr show eth0");
    let lines: Vec<&str> = out.lines().collect();
    let ip = lines[2].split_whitespace().nth(3).unwrap_or_default().to_string();
    (lines[0].to_string(), lines[1].to_string(), ip)
}

#[test]
fn snapshot_restore_and_suspend_through_the_broker() {
    if !kvm_available("snapshot_restore_and_suspend_through_the_broker") {
        return;
    }
    let keys = Scratch::new("snapbroker-keys").unwrap();
    let warm_cache = keys.path("warm");
    // The host's capacity, as the broker sees it, made small enough for a
    // fork to exceed it: about 4 GiB more than this test's microVMs will
    // take (MemAvailable now, less a reserve of all but 4 GiB of it).
    let reserved = (mem_available_mib() - 4096).to_string();
    let args = ["--warm-cache", warm_cache.to_str().unwrap(), "--reserved-memory-mib", &reserved];
    let mut broker = TestBroker::start("snapbroker", &args).unwrap();
    let key = mm_integration::ssh_keygen(&keys, "id").unwrap();
    let public = format!("{}.pub", key.display());
    // 15 MB on its disk, so a clone's layer (a few hundred KiB written)
    // and a copy of the disk cannot be mistaken for each other.
    let workload = "seq 1 2000000 > /root/big && sync && \
        mkdir -p /run/m && mount -t tmpfs m /run/m && \
        seq 1 600000 > /run/m/blob && md5sum < /run/m/blob > /run/m/sum && \
        i=0; while true; do i=$((i+1)); echo line $i >> /root/lines; sync; echo tick $i; sleep 1; done";
    mmctl_ok(
        &broker,
        &["run", "-d", "--name", "web", "--memory", "128M", "--ssh-key", &public, "--", "sh", "-c", workload],
    );
    broker.wait_for_log("web", "tick 3", BOOT_TIMEOUT).unwrap();
    let audit = mmctl_ok(&broker, &["audit", "web"]);
    assert!(
        audit.contains("\"warm-snapshot\"") && audit.contains("\"workload\""),
        "web made the warm snapshot:\n{audit}"
    );
    let sum = sh(&broker, "web", "cat /run/m/sum");
    let source = whoami(&broker, "web");

    // Snapshot: the VM runs on.
    let before = *ticks(&mmctl_ok(&broker, &["logs", "web"])).last().unwrap();
    let snap = json(&broker, &["snapshot", "create", "web", "--name", "s1", "-o", "json"]);
    let after = *ticks(&mmctl_ok(&broker, &["logs", "web"])).last().unwrap();
    eprintln!("snapshot between ticks {before} and {after}: {snap}");
    let id = snap["id"].as_str().unwrap().to_string();
    assert!(snap["memory_bytes"].as_u64().unwrap() >= 4 << 20, "{snap}");
    assert!(snap["pause_us"].as_u64().unwrap() > 0, "{snap}");
    let listed = json(&broker, &["snapshot", "ls", "web", "-o", "json"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["id"], snap["id"]);
    broker.wait_for_log("web", &format!("tick {}", after + 2), QUICK).unwrap();

    // The snapshot's disk is a clean filesystem.
    fsck_clean(&broker.dir.path(&format!("state/snapshots/{id}/rw.ext4")), &keys.path("fsck.ext4"));

    // Two new microVMs from it, each with its own identity.
    mmctl_ok(&broker, &["restore", "s1", "--name", "web2"]);
    mmctl_ok(&broker, &["restore", &id[..6], "--name", "web3"]);
    wait_identity(&broker, "web2");
    wait_identity(&broker, "web3");
    let draw = "head -c16 /dev/urandom | md5sum";
    let (r2, r3) = (sh(&broker, "web2", draw), sh(&broker, "web3", draw));
    assert_ne!(r2, r3, "the clones' random streams differ (reseeded)");
    for vm in ["web2", "web3"] {
        let log = mmctl_ok(&broker, &["logs", vm]);
        let first = *ticks(&log).first().unwrap_or_else(|| panic!("{vm} prints no ticks:\n{log}"));
        assert!(
            before < first && first <= after + 1,
            "{vm} resumed the count at {first}, cut between {before}-{after}"
        );
        assert!(!log.contains("Linux version"), "{vm} did not boot");
        assert_eq!(sh(&broker, vm, "cat /run/m/sum"), sum, "{vm}: the tmpfs data");
        assert_eq!(sh(&broker, vm, "md5sum < /run/m/blob"), sum, "{vm}: the data themselves");
        // Every line written before the cut is there, in order.
        let lines = sh(&broker, vm, "cat /root/lines");
        let numbers: Vec<u64> = lines.lines().filter_map(|l| l.strip_prefix("line ")?.parse().ok()).collect();
        assert!(
            numbers.len() as u64 >= before && numbers.iter().enumerate().all(|(i, n)| *n == i as u64 + 1),
            "{vm}: {lines}"
        );
        let me = whoami(&broker, vm);
        assert_eq!(me.0, vm, "hostname");
        assert_ne!(me.1, source.1, "{vm}'s MAC");
        assert_ne!(me.2, source.2, "{vm}'s address");
        assert_eq!(
            json(&broker, &["inspect", vm, "-o", "json"])["ip"].as_str().unwrap(),
            me.2.split('/').next().unwrap()
        );
    }
    // Exec over the network too: web2 reaches web3 at its new address.
    let web3_ip = whoami(&broker, "web3").2;
    sh(&broker, "web2", &format!("ping -c 1 -W 10 {}", web3_ip.split('/').next().unwrap()));
    let mut ssh = broker.mmctl_command(&["ssh", "-i", key.to_str().unwrap(), "web2", "--", "hostname"]).unwrap();
    ssh.env("HOME", keys.path(""));
    let ssh = run_with_timeout(ssh, QUICK).unwrap();
    assert_eq!((ssh.status, ssh.stdout.trim()), (Some(0), "web2"), "ssh: {}", ssh.stderr);

    fork_four_clones(&broker, &id, &sum, &[&source, &whoami(&broker, "web2"), &whoami(&broker, "web3")]);
    branch_web(&broker, &source);

    // Suspend: every process gone; start: the workload goes on.
    let running = json(&broker, &["inspect", "web", "-o", "json"]);
    let info = json(&broker, &["suspend", "web", "-o", "json"]);
    assert_eq!(info["state"], "suspended", "{info}");
    for pid in pids(&running) {
        assert!(!alive(pid), "process {pid} of the suspended microVM still runs");
    }
    let suspended_at = *ticks(&mmctl_ok(&broker, &["logs", "web"])).last().unwrap();
    mmctl_ok(&broker, &["start", "web"]);
    broker.wait_for_log("web", &format!("tick {}", suspended_at + 2), QUICK).unwrap();
    assert_eq!(sh(&broker, "web", "cat /run/m/sum"), sum);
    wait_identity(&broker, "web");
    assert_eq!(whoami(&broker, "web"), source, "a resumed microVM keeps its identity");

    // ... across a broker restart too.
    mmctl_ok(&broker, &["suspend", "web2"]);
    broker.restart().unwrap();
    assert_eq!(json(&broker, &["inspect", "web2", "-o", "json"])["state"], "suspended");
    mmctl_ok(&broker, &["start", "web2"]);
    assert_eq!(sh(&broker, "web2", "cat /run/m/sum"), sum);
    assert_eq!(sh(&broker, "web2", "hostname").trim(), "web2");

    // A snapshot whose memory file is damaged: the new microVM fails with
    // the reason, and nothing of it runs.
    let store = broker.dir.path("state/snapshots");
    let bad = store.join("badbadbadbad");
    std::process::Command::new("cp").arg("-a").arg(store.join(&id)).arg(&bad).status().unwrap();
    let manifest = std::fs::read_to_string(bad.join("manifest.json")).unwrap();
    let manifest = manifest.replace(&id, "badbadbadbad").replace("\"s1\"", "\"broken\"");
    std::fs::write(bad.join("manifest.json"), manifest).unwrap();
    let state: Value = serde_json::from_str(&std::fs::read_to_string(bad.join("vm.state")).unwrap()).unwrap();
    let offset = state["memory"]["extents"][0]["offset"].as_u64().unwrap();
    let memory = std::fs::OpenOptions::new().write(true).open(bad.join("vm.mem")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&memory, b"garbage!", offset).unwrap();
    mmctl_ok(&broker, &["restore", "broken", "--name", "web4"]);
    let deadline = std::time::Instant::now() + QUICK;
    let failed = loop {
        let info = json(&broker, &["inspect", "web4", "-o", "json"]);
        if info["state"] == "failed" || std::time::Instant::now() > deadline {
            break info;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(failed["reason"].as_str().unwrap().contains("checksum"), "{failed}");
    let run = broker.mmctl(&["restore", "no-such-snapshot"], QUICK).unwrap();
    assert_eq!(run.status, Some(3), "an unknown snapshot is not-found: {}", run.stderr);

    // Warm start: the next microVM of web's shape restores the warm
    // snapshot instead of booting, and is handed its own workload.
    mmctl_ok(
        &broker,
        &[
            "run",
            "-d",
            "--name",
            "warm1",
            "--memory",
            "128M",
            "-e",
            "GREETING=warm-hello",
            "--",
            "sh",
            "-c",
            "echo $GREETING from $(hostname); sleep 100000",
        ],
    );
    broker.wait_for_log("warm1", "warm-hello from warm1", QUICK).unwrap();
    let audit = mmctl_ok(&broker, &["audit", "warm1"]);
    assert!(
        audit.contains("\"warm\":true") && audit.contains("\"identity\"") && audit.contains("\"workload\""),
        "{audit}"
    );
    let console = mmctl_ok(&broker, &["logs", "warm1"]);
    assert!(!console.contains("user space started"), "warm1 did not boot: {console}");
    assert_ne!(whoami(&broker, "warm1").2, source.2);

    // Removal: the snapshot goes, its restored microVMs stay.
    mmctl_ok(&broker, &["snapshot", "rm", "s1"]);
    assert!(!broker.dir.path(&format!("state/snapshots/{id}")).exists());
    assert_eq!(sh(&broker, "web3", "hostname").trim(), "web3");
}
