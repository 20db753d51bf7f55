//! mm-vmm's snapshot and restore, without the broker: a guest with a
//! running counter and 16 MiB of data in RAM (tmpfs) is paused,
//! saved and resumed through its control socket; the source keeps counting;
//! then a new mm-vmm with new device back ends resumes the saved guest
//! without a boot. The counter goes on from where the snapshot cut it, the
//! data's checksum matches, and the exec agent answers over a vsock device
//! that told the restored guest its transport was reset. That restore is
//! lazy (pages come in on first touch, the back ends' touches served too:
//! vhost-user postcopy); the next one's back ends do not take part, and
//! mm-vmm completes the restore before they get guest RAM. A snapshot of the
//! running guest (vCPUs paused only for the cut, under KVM dirty logging;
//! the device back ends serving the guest during the copy, logging their
//! writes) restores at its cut with an in-guest writer's invariant intact
//! and a reader's page cache true to the disk. A pause with a
//! dead device process fails, naming the device, and the source runs on.
//! Then the restore
//! is fed broken snapshots (truncated or corrupted memory, a damaged or
//! foreign state file, the wrong devices, more RAM than the host has):
//! each is one clear error, exit status 125, and no guest.

use std::fs::OpenOptions;
use std::path::Path;
use std::time::Duration;

use mm_exec_protocol::{ExecClient, ExecRequest, ExitStatus};
use mm_integration::devices::{DeviceProcess, Scratch, rootfs_copy};
use mm_integration::guest::{BOOT_TIMEOUT, Boot, Restore, RunningGuest};
use mm_integration::kvm_available;
use mm_protocols::vmm_control::VmmClient;

/// The counter's value in a console line `tick N`.
fn tick(line: &str) -> Option<u64> {
    line.trim().strip_prefix("tick ")?.parse().ok()
}

/// The last tick printed so far.
fn last_tick(guest: &mut RunningGuest) -> u64 {
    guest.has_printed("tick");
    guest.console.iter().filter_map(|l| tick(l)).next_back().unwrap_or(0)
}

fn exec(uds: &Path, script: &str) -> (ExitStatus, String) {
    let client = ExecClient::connect_hybrid_vsock(uds, mm_exec_protocol::EXEC_PORT).expect("connect to the agent");
    let mut out = Vec::new();
    let status =
        client.run(&ExecRequest::new(["sh", "-c", script]), std::io::empty(), &mut out, std::io::sink()).expect("exec");
    (status, String::from_utf8_lossy(&out).into_owned())
}

/// Retries `exec` while the agent is not reachable yet (the restored
/// guest's vsock driver handles the transport reset first), up to a bound.
fn exec_when_ready(uds: &Path, script: &str) -> (ExitStatus, String) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        match ExecClient::connect_hybrid_vsock(uds, mm_exec_protocol::EXEC_PORT) {
            Ok(_) => return exec(uds, script),
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("agent not reachable yet: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("the restored guest's agent never answered: {e}"),
        }
    }
}

/// The writer of the running-snapshot check: detached from the exec
/// session, printing to the console only if its invariant breaks; shell
/// builtins only, so it rewrites its two tmpfs pages hundreds of times a
/// second even under PVM.
const WRITER: &str = "echo 0 > /run/m/b; setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /run/m/a; \
                      read x < /run/m/b; [ \"$x\" = $((i-1)) ] || echo TORN i=$i b=$x; echo $i > /run/m/b; done' \
                      </dev/null >/dev/console 2>&1 &";

/// Readers that keep the block back end writing guest RAM: four stream
/// the disk with direct I/O without pause (so requests are in flight
/// whenever the snapshot's copy runs: a guest under PVM spends most of a
/// page-cache read in its emulated kernel, and the device would mostly
/// idle), the other drops the page
/// cache and reads a 230 KB file from the disk again into fresh pages each
/// round, checking it against its sum. A snapshot that kept a page from
/// before the back end filled it (its write not in the copy) leaves the
/// restored guest a cached page with the wrong bytes: BADREAD. Both stop
/// once /run/m/stop exists.
const READER: &str = "dd if=/dev/vda of=/dev/null bs=256k count=1 iflag=direct && \
                      seq 1 40000 > /root/f && sync && md5sum < /root/f > /root/f.sum && \
                      echo 'while [ ! -e /run/m/stop ]; do echo 3 > /proc/sys/vm/drop_caches; md5sum < /root/f | cmp -s - /root/f.sum || echo BADREAD; done' > /root/reader && \
                      echo 'echo streaming; while [ ! -e /run/m/stop ]; do dd if=/dev/vda of=/dev/null bs=256k count=128 skip=$1 iflag=direct 2>/dev/null; done' > /root/streamer && \
                      (setsid sh /root/reader </dev/null >/dev/console 2>&1 &) && \
                      for at in 0 32 64 96; do (setsid sh /root/streamer $at </dev/null >/dev/console 2>&1 &); done";

fn create(path: &Path) -> std::fs::File {
    OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).unwrap()
}

#[test]
fn snapshot_and_restore_resume_the_guest_where_it_stood() {
    if !kvm_available("snapshot_and_restore_resume_the_guest_where_it_stood") {
        return;
    }
    let dir = Scratch::new("snapshot").unwrap();
    let root = dir.path("root.ext4");
    rootfs_copy(&root).unwrap();
    let root_socket = dir.path("root.sock");
    // Each request is held 20 ms in the back end (a test hook), so the
    // streamers below keep requests in flight through the running
    // snapshot's copy: under PVM a guest spends most of each request in its
    // emulated kernel, and without the hold the device mostly idles.
    let root_arg = root.to_str().unwrap();
    let root_device =
        DeviceProcess::spawn("block", &root_socket, &["--image", root_arg, "--test-request-delay-ms", "20"]).unwrap();
    let uds = dir.path("vsock.uds");
    let vsock_socket = dir.path("vsock.sock");
    let uds_arg = uds.to_str().unwrap();
    let vsock_device = DeviceProcess::spawn("vsock", &vsock_socket, &["--guest-cid", "3", "--uds", uds_arg]).unwrap();
    let control = dir.path("vmm.ctl");

    // 16.6 MB of distinct, non-zero pages (seq runs in user space: reading
    // /dev/urandom takes minutes under PVM, where the kernel is emulated).
    let script = "mkdir -p /run/m && mount -t tmpfs m /run/m && \
                  seq 1 2300000 > /run/m/blob && echo sum $(md5sum < /run/m/blob) && \
                  i=0; while true; do i=$((i+1)); echo tick $i; sleep 1; done";
    let mut source = Boot::new(&["sh", "-c", script])
        .root_on_block(&root_socket)
        .device("vsock", &vsock_socket)
        .control(&control)
        .spawn()
        .unwrap();
    let sum_line = source.wait_for("sum ", BOOT_TIMEOUT).unwrap();
    let sum = sum_line.trim().trim_start_matches("sum ").split_whitespace().next().unwrap().to_string();
    source.wait_for("tick 3", Duration::from_secs(120)).unwrap();

    // Pause, save, copy the disk while paused, resume.
    let client = VmmClient::connect(&control).unwrap();
    client.pause().unwrap();
    let paused_at = last_tick(&mut source);
    let state_path = dir.path("vm.state");
    let memory_path = dir.path("vm.mem");
    let report = client.snapshot(&create(&state_path), &create(&memory_path)).unwrap();
    std::fs::copy(&root, dir.path("root-snap.ext4")).unwrap();
    client.resume().unwrap();
    eprintln!("snapshot at tick {paused_at}: {report:?}");
    assert!(report.memory_bytes >= 16 << 20, "the 16 MiB blob is in guest RAM: {report:?}");
    assert!(report.memory_bytes < 128 << 20, "zero and untouched pages are left out: {report:?}");
    let allocated = std::fs::metadata(&memory_path).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).unwrap();
    assert!(allocated <= report.memory_bytes + (1 << 20), "the memory file is sparse: {allocated} on disk");

    // The source runs on after the snapshot, and its exec agent answers.
    let next = format!("tick {}", paused_at + 2);
    source.wait_for(&next, Duration::from_secs(120)).unwrap();
    let (status, out) = exec(&uds, "echo source-alive");
    assert_eq!((status, out.trim()), (ExitStatus::Exited(0), "source-alive"));

    // A snapshot of the running guest: the vCPUs stop only for the cut.
    // A writer in the guest checks its own invariant on every round (file
    // b holds the round before the one in its shell variable); a snapshot
    // whose pages came from different moments breaks it in the restored
    // guest, which then prints TORN. (Switching the cut's second copy off
    // makes the restored writer print TORN.)
    // The device back ends log their own writes to guest RAM meanwhile
    // (vhost-user's dirty log), so they serve the guest during the copy;
    // the reader keeps the block back end writing it.
    let (status, _) = exec(&uds, WRITER);
    assert_eq!(status, ExitStatus::Exited(0));
    let (status, out) = exec(&uds, READER);
    assert_eq!(status, ExitStatus::Exited(0), "{out}");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while source.console.iter().filter(|l| l.trim() == "streaming").count() < 4 {
        assert!(std::time::Instant::now() < deadline, "the streamers never started: {:?}", source.console);
        source.has_printed("streaming"); // reads what the console printed since
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    let before = last_tick(&mut source);
    let (run_state, run_memory) = (dir.path("run.state"), dir.path("run.mem"));
    let running = client.snapshot_running(&create(&run_state), &create(&run_memory)).unwrap();
    // The disks are copied while the devices are still held at the cut.
    std::fs::copy(&root, dir.path("root-run.ext4")).unwrap();
    client.resume().unwrap();
    let after = last_tick(&mut source);
    eprintln!("running snapshot between ticks {before} and {after}: {running:?}");
    assert!(running.dirty_pages > 0, "the guest wrote while the first copy ran: {running:?}");
    assert!(running.device_pages > 0, "the block back end served the reader during the copy: {running:?}");
    assert!(running.io_run_us > 0, "the devices ran during the copy: {running:?}");
    assert!(running.paused_us < running.save_us, "the vCPUs paused for the cut only: {running:?}");
    assert!(running.memory_bytes >= 16 << 20, "{running:?}");
    source.wait_for(&format!("tick {}", after + 2), Duration::from_secs(120)).unwrap();
    assert!(!source.has_printed("TORN"), "the source's writer: {:?}", source.console);
    assert!(!source.has_printed("BADREAD"), "the source's reader: {:?}", source.console);

    // A device process that dies before the cut fails the snapshot with a
    // clear error, and the guest runs on (its console needs no disk).
    // The readers stop first: they drop the page cache, and the counter's
    // `sleep` must find busybox cached once the disk is gone.
    let (status, _) = exec(&uds, "touch /run/m/stop");
    assert_eq!(status, ExitStatus::Exited(0));
    let now = last_tick(&mut source);
    source.wait_for(&format!("tick {}", now + 3), Duration::from_secs(120)).unwrap();
    let mut root_device = root_device;
    root_device.kill().unwrap();
    let refused = client.pause().expect_err("a pause with a dead block back end");
    assert!(refused.to_string().contains("block"), "{refused}");
    let now = last_tick(&mut source);
    source.wait_for(&format!("tick {}", now + 2), Duration::from_secs(120)).unwrap();
    drop(source);
    drop(vsock_device);

    // A new mm-vmm with new back ends resumes the saved guest.
    // Its RAM comes in lazily, the back ends' touches included (postcopy:
    // `--lazy-memory`); the vsock back end's first write is its transport
    // reset event, into a page only the snapshot holds.
    let root2_socket = dir.path("root2.sock");
    let root2_image = dir.path("root-snap.ext4");
    let root2_args = ["--image", root2_image.to_str().unwrap(), "--lazy-memory"];
    let _root2 = DeviceProcess::spawn("block", &root2_socket, &root2_args).unwrap();
    let uds2 = dir.path("vsock2.uds");
    let vsock2_socket = dir.path("vsock2.sock");
    let uds2_arg = uds2.to_str().unwrap();
    let vsock2_args = ["--guest-cid", "4", "--uds", uds2_arg, "--transport-reset", "--lazy-memory"];
    let _vsock2 = DeviceProcess::spawn("vsock", &vsock2_socket, &vsock2_args).unwrap();
    let restore =
        Restore::new(&state_path, &memory_path).device("block", &root2_socket).device("vsock", &vsock2_socket);
    let mut restored = restore.spawn().unwrap();
    let first = restored.wait_for("tick", Duration::from_secs(120)).unwrap();
    assert_eq!(tick(&first), Some(paused_at + 1), "the counter goes on from the snapshot, not from a boot");
    assert!(!restored.has_printed("Linux version"), "no boot: {:?}", restored.console);
    let (status, out) = exec_when_ready(&uds2, "md5sum < /run/m/blob; cat /sys/class/vsock/*/ 2>/dev/null; echo ok");
    assert_eq!(status, ExitStatus::Exited(0));
    assert!(out.contains(&sum), "the 16 MiB in tmpfs survived: {out:?} vs {sum}");
    restored.wait_for(&format!("tick {}", paused_at + 3), Duration::from_secs(60)).unwrap();
    let log = restored.kill_for_log();
    assert!(log.contains("lazy restore: guest RAM comes in on first touch"), "{log}");
    assert!(log.contains("serving the vsock back end's faults"), "the device's fault was served: {log}");

    // The running snapshot restores too, at its cut, with its writer's
    // invariant intact.
    let root3_socket = dir.path("root3.sock");
    let _root3 = DeviceProcess::block(&root3_socket, &dir.path("root-run.ext4")).unwrap();
    let uds3 = dir.path("vsock3.uds");
    let vsock3_socket = dir.path("vsock3.sock");
    let uds3_arg = uds3.to_str().unwrap();
    let _vsock3 =
        DeviceProcess::spawn("vsock", &vsock3_socket, &["--guest-cid", "5", "--uds", uds3_arg, "--transport-reset"])
            .unwrap();
    let restore = Restore::new(&run_state, &run_memory).device("block", &root3_socket).device("vsock", &vsock3_socket);
    let mut restored = restore.spawn().unwrap();
    let line = restored.wait_for("tick", Duration::from_secs(120)).unwrap();
    let first = tick(&line).unwrap_or_else(|| panic!("not a tick: {line:?}; console: {:?}", restored.console));
    assert!((before + 1..=after + 1).contains(&first), "first tick {first}, cut between {before} and {after}");
    let (status, out) = exec_when_ready(&uds3, "md5sum < /run/m/blob; read a < /run/m/a; echo rounds=$a");
    assert_eq!(status, ExitStatus::Exited(0), "{out}");
    assert!(out.contains(&sum), "the 16 MiB in tmpfs survived: {out:?} vs {sum}");
    restored.wait_for(&format!("tick {}", first + 3), Duration::from_secs(60)).unwrap();
    assert!(!restored.has_printed("TORN"), "the restored writer found a torn snapshot: {:?}", restored.console);
    assert!(!restored.has_printed("BADREAD"), "the restored reader found a stale page: {:?}", restored.console);
    // Its disk still works: the rings as the back ends left them at the
    // cut (used entries, used index) are in the snapshot, so requests
    // completed during the copy are not lost or completed twice. (With the
    // devices' dirty pages left out of the cut, the used ring is stale.)
    let reread = "echo 3 > /proc/sys/vm/drop_caches; timeout 60 md5sum < /root/f | cmp - /root/f.sum && echo disk-ok";
    let (status, out) = exec(&uds3, reread);
    assert_eq!((status, out.trim()), (ExitStatus::Exited(0), "disk-ok"), "{:?}", restored.console);
    for error in ["not a head", "I/O error", "blk_update_request"] {
        assert!(!restored.has_printed(error), "the restored guest's disk: {:?}", restored.console);
    }
    // These back ends were not told to take part in a lazy restore: mm-vmm
    // completed it before handing them guest RAM.
    let log = restored.kill_for_log();
    assert!(log.contains("does not offer PAGEFAULT: completing the lazy restore"), "{log}");

    bad_snapshots_are_refused(&dir, &state_path, &memory_path, &root2_socket, &vsock2_socket);
}

/// Each broken snapshot is refused before any guest runs, naming why.
fn bad_snapshots_are_refused(dir: &Scratch, state: &Path, memory: &Path, block: &Path, vsock: &Path) {
    let refuse = |state: &Path, memory: &Path, devices: &[(&str, &Path)], expect: &str| {
        let mut restore = Restore::new(state, memory);
        for (kind, socket) in devices {
            restore = restore.device(kind, socket);
        }
        let run = restore.run().unwrap();
        assert_eq!(run.status, Some(125), "{expect}: {run:?}");
        assert!(run.stderr.contains(expect), "expected {expect:?} in: {}", run.stderr);
        assert!(!run.stdout.contains("tick"), "no guest ran: {}", run.stdout);
    };
    let both: [(&str, &Path); 2] = [("block", block), ("vsock", vsock)];
    let text = std::fs::read_to_string(state).unwrap();

    let truncated = dir.path("truncated.mem");
    std::fs::copy(memory, &truncated).unwrap();
    OpenOptions::new().write(true).open(&truncated).unwrap().set_len(8 << 20).unwrap();
    refuse(state, &truncated, &both, "truncated");

    let corrupt = dir.path("corrupt.mem");
    std::fs::copy(memory, &corrupt).unwrap();
    let extent: serde_json::Value =
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["memory"]["extents"][0].clone();
    let offset = extent["offset"].as_u64().unwrap();
    let file = OpenOptions::new().read(true).write(true).open(&corrupt).unwrap();
    let mut byte = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut byte, offset).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[byte[0] ^ 0xff], offset).unwrap();
    refuse(state, &corrupt, &both, "checksum");

    let damaged = dir.path("damaged.state");
    std::fs::write(&damaged, &text[..text.len() / 2]).unwrap();
    refuse(&damaged, memory, &both, "not a MicroMachines snapshot");

    let future = dir.path("future.state");
    std::fs::write(&future, text.replacen("\"format_version\":1", "\"format_version\":99", 1)).unwrap();
    refuse(&future, memory, &both, "format version 99");

    let other_cpu = dir.path("other-cpu.state");
    std::fs::write(&other_cpu, text.replacen("\"stepping\":", "\"stepping\":1000", 1)).unwrap();
    refuse(&other_cpu, memory, &both, "CPU");

    refuse(state, memory, &[("block", block)], "devices");

    let huge = dir.path("huge.state");
    std::fs::write(&huge, text.replacen("\"memory_mib\":128,", "\"memory_mib\":100000000,", 1)).unwrap();
    refuse(&huge, memory, &both, "of RAM");
}
