//! The root filesystem and a data disk on virtio-blk, served by
//! `mm-device block` processes through mm-vmm's vhost-user front end.

use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use mm_integration::devices::{DeviceProcess, Scratch, rootfs_copy};
use mm_integration::guest::{BOOT_TIMEOUT, Boot};
use mm_integration::kvm_available;
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
/// (requests back to back, so a kill almost always lands on one in flight)
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
    let data_device = |socket: &std::path::Path| {
        let image = data.to_str().unwrap();
        DeviceProcess::spawn("block", socket, &["--image", image, "--test-request-delay-ms", "20"]).unwrap()
    };
    let mut data_device_process = data_device(&dir.path("data-0.sock"));
    let control_socket = dir.path("control.sock");
    let boot = Boot::new(&["sh", "-c", WRITE_THEN_VERIFY])
        .root_on_block(&root_socket)
        .device("block", &data_device_process.socket.clone())
        .control(&control_socket);
    let mut guest = boot.spawn().unwrap();
    guest.wait_for("WRITING", BOOT_TIMEOUT).unwrap();

    let mut kills = 0;
    for round in 1..=5u64 {
        std::thread::sleep(kill_delay(round));
        if guest.has_printed("WRITES-DONE") {
            break;
        }
        data_device_process.kill().unwrap();
        kills += 1;
        let socket = dir.path(&format!("data-{round}.sock"));
        data_device_process = data_device(&socket);
        reconnect(&control_socket, 1, &socket);
    }
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
}
