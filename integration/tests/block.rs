//! The root filesystem and a data disk on virtio-blk, served by
//! `mm-device block` processes through mm-vmm's vhost-user front end.

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mm_integration::devices::{DeviceProcess, Scratch, rootfs_copy};
use mm_integration::guest::{BOOT_TIMEOUT, Boot};
use mm_integration::kvm_available;
use mm_protocols::device_control::{DeviceClient, DeviceCounters, SeqPacketListener};
use mm_protocols::vmm_control::VmmClient;

#[test]
fn root_on_virtio_blk_keeps_a_synced_file_across_reboots() {
    if !kvm_available("root_on_virtio_blk_keeps_a_synced_file_across_reboots") {
        return;
    }
    let dir = Scratch::new("blk-persist").unwrap();
    let root = dir.path("root.ext4");
    rootfs_copy(&root).unwrap();
    let token = format!("token-{}", std::process::id());

    let socket = dir.path("root.sock");
    let _device = DeviceProcess::block(&socket, &root).unwrap();
    let write = format!("echo {token} > /persisted.txt && sync && echo wrote");
    let run = Boot::new(&["sh", "-c", &write]).root_on_block(&socket).run().unwrap();
    assert_eq!(run.status, Some(0), "console:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("wrote"), "console:\n{}", run.stdout);
    drop(_device);

    // A fresh back-end process and a fresh guest see the file.
    let _device = DeviceProcess::block(&socket, &root).unwrap();
    let run = Boot::new(&["cat", "/persisted.txt"]).root_on_block(&socket).run().unwrap();
    assert_eq!(run.status, Some(0), "console:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(run.stdout.lines().any(|l| l.trim() == token), "console:\n{}", run.stdout);
}

/// Copies of the pattern the data disk has room for, 4 MiB each; the
/// control sector follows them.
const COPIES: u64 = 64;
const CONTROL_OFFSET: u64 = COPIES * (4 << 20);

/// The guest builds a 4 MiB pattern of 64 distinct 64 KiB blocks in
/// tmpfs, then writes copy after copy of it to the data disk with O_DIRECT
/// (requests back to back; each kill waits until the back end holds one)
/// until the host writes STOP into the control sector after the last kill;
/// then it reads every copy back with O_DIRECT and compares checksums.
/// No copy is written twice, so a lost or torn request shows.
const WRITE_THEN_VERIFY: &str = r#"i=0; while [ $i -lt 64 ]; do yes "block-$i-pattern" | head -c 65536; i=$((i+1)); done > /tmp/pattern
want=$(md5sum < /tmp/pattern)
echo WRITING
n=0; while [ $n -lt 64 ]; do
  dd if=/tmp/pattern of=/dev/vdb bs=65536 seek=$((n * 64)) oflag=direct conv=fsync 2>/dev/null || echo "WRITE-FAILED $n"
  n=$((n+1))
  [ "$(dd if=/dev/vdb bs=4096 skip=65536 count=1 iflag=direct 2>/dev/null | head -c 4)" = STOP ] && break
done
echo "WRITES-DONE copies=$n"
bad=0; c=0; while [ $c -lt $n ]; do
  got=$(dd if=/dev/vdb bs=65536 skip=$((c * 64)) count=64 iflag=direct 2>/dev/null | md5sum)
  [ "$got" = "$want" ] || { bad=$((bad+1)); echo "MISMATCH copy $c"; }
  c=$((c+1))
done
echo "VERIFY bad=$bad"
dmesg | grep -iq "i/o error" && echo "IO-ERROR-LOGGED"
[ $bad = 0 ]"#;

/// Hands mm-vmm a connection to the back end at `socket` for device
/// `index`, over its control channel (protocols/vmm.capnp).
fn reconnect(control: &std::path::Path, index: u32, socket: &std::path::Path) {
    let client = VmmClient::connect(control).unwrap();
    let backend = UnixStream::connect(socket).unwrap();
    client.reconnect_device(index, &backend).unwrap();
}

/// The fd number a device's control listener is inherited at.
const CONTROL_FD: i32 = 10;

/// A data-disk back end slowed down to 20 ms a request (so a kill finds one
/// in flight), with its control channel at `control`.
fn slow_block_device(image: &Path, socket: &Path, control: &Path) -> DeviceProcess {
    let listener = SeqPacketListener::bind(control).unwrap();
    let fd = listener.as_fd().try_clone_to_owned().unwrap();
    let fd_arg = CONTROL_FD.to_string();
    let args = ["--image", image.to_str().unwrap(), "--test-request-delay-ms", "20", "--control-fd", &fd_arg];
    DeviceProcess::spawn_with_fds("block", socket, &args, &[(&fd, CONTROL_FD)]).unwrap()
}

/// What the back end at `control` counts: requests it resubmitted for its
/// killed predecessor, requests it holds now.
fn counters(control: &Path) -> DeviceCounters {
    DeviceClient::connect(control, Duration::from_secs(5)).unwrap().status().unwrap().counters
}

/// Waits (up to 5 s) until the back end at `control` holds a request, so
/// that a kill right after finds it in flight: the guest may think for far
/// longer between requests than the back end's delay (on a loaded PVM host,
/// 5 of 5 kills at random moments found nothing in flight).
fn wait_for_a_request_in_flight(control: &Path) -> DeviceCounters {
    let client = DeviceClient::connect(control, Duration::from_secs(5)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let counters = client.status().unwrap().counters;
        if counters.in_flight > 0 || std::time::Instant::now() > deadline {
            return counters;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A pseudo-random delay in [100, 700) ms, different each kill.
fn kill_delay(round: u64) -> Duration {
    let seed = (std::process::id() as u64)
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(round * 1_442_695_040_888_963_407);
    Duration::from_millis(100 + (seed >> 33) % 600)
}

#[test]
fn block_backend_killed_mid_write_loses_nothing() {
    if !kvm_available("block_backend_killed_mid_write_loses_nothing") {
        return;
    }
    let dir = Scratch::new("blk-kill").unwrap();
    let root = dir.path("root.ext4");
    rootfs_copy(&root).unwrap();
    let data = dir.path("data.img");
    std::fs::File::create(&data).unwrap().set_len(CONTROL_OFFSET + 4096).unwrap();

    let root_socket = dir.path("root.sock");
    let _root_device = DeviceProcess::block(&root_socket, &root).unwrap();
    let paths = |n: u64| -> (PathBuf, PathBuf) {
        (dir.path(&format!("data-{n}.sock")), dir.path(&format!("data-{n}-control.sock")))
    };
    let (socket, mut control) = paths(0);
    let mut data_device_process = slow_block_device(&data, &socket, &control);
    let control_socket = dir.path("control.sock");
    let boot = Boot::new(&["sh", "-c", WRITE_THEN_VERIFY])
        .root_on_block(&root_socket)
        .device("block", &data_device_process.socket.clone())
        .control(&control_socket);
    let mut guest = boot.spawn().unwrap();
    guest.wait_for("WRITING", BOOT_TIMEOUT).unwrap();

    let mut kills = 0;
    // Requests found in the in-flight table and run again, over all the
    // back ends: each is asked just before it is killed, once it holds a
    // request.
    let mut resubmissions = 0;
    for round in 1..=5u64 {
        std::thread::sleep(kill_delay(round));
        if guest.has_printed("WRITES-DONE") {
            break;
        }
        resubmissions += wait_for_a_request_in_flight(&control).resubmitted;
        data_device_process.kill().unwrap();
        kills += 1;
        let (socket, next_control) = paths(round);
        control = next_control;
        data_device_process = slow_block_device(&data, &socket, &control);
        reconnect(&control_socket, 1, &socket);
    }
    std::thread::sleep(Duration::from_millis(500));
    resubmissions += counters(&control).resubmitted;
    eprintln!("{kills} kills, {resubmissions} requests resubmitted from the in-flight table");
    let status = VmmClient::connect(&control_socket).unwrap().status().unwrap();
    assert_eq!(
        status.devices.iter().map(|d| (d.kind.as_str(), d.reconnects)).collect::<Vec<_>>(),
        [("block", 0), ("block", kills)]
    );
    // Tell the guest to stop writing: the last back end serves the read.
    let image = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
    image.write_all_at(b"STOP", CONTROL_OFFSET).unwrap();
    image.sync_all().unwrap();
    let run = guest.finish(BOOT_TIMEOUT).unwrap();
    let context = format!("console:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert_eq!(kills, 5, "the guest finished writing before five kills; make the write phase longer\n{context}");
    assert!(run.stdout.contains("WRITES-DONE"), "{context}");
    assert!(run.stdout.contains("VERIFY bad=0"), "{context}");
    assert!(!run.stdout.contains("WRITE-FAILED"), "{context}");
    assert!(!run.stdout.contains("IO-ERROR-LOGGED"), "the guest kernel logged an I/O error\n{context}");
    assert_eq!(run.status, Some(0), "{context}");
    // The kills found requests in flight and the in-flight table brought
    // them back (restarting at the used index alone would have passed the
    // checks above too: the back end completes in order).
    assert!(resubmissions > 0, "{kills} kills and nothing resubmitted from the in-flight table\n{context}");
}
