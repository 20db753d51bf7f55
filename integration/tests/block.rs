//! The root filesystem and a data disk on virtio-blk, served by
//! `mm-device block` processes through mm-vmm's vhost-user front end.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use mm_integration::devices::{DeviceProcess, Scratch, rootfs_copy};
use mm_integration::guest::{BOOT_TIMEOUT, Boot};
use mm_integration::kvm_available;

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

/// The guest writes 40 distinct 64 KiB blocks to /dev/vdb with fsync,
/// then reads each back with O_DIRECT and compares checksums.
const WRITE_THEN_VERIFY: &str = r#"echo WRITING
i=0; while [ $i -lt 40 ]; do
  yes "block-$i-pattern" | head -c 65536 | dd of=/dev/vdb bs=65536 seek=$i conv=notrunc,fsync 2>/dev/null || echo "WRITE-FAILED $i"
  i=$((i+1))
done
echo WRITES-DONE
i=0; bad=0; while [ $i -lt 40 ]; do
  a=$(dd if=/dev/vdb bs=65536 skip=$i count=1 iflag=direct 2>/dev/null | md5sum)
  b=$(yes "block-$i-pattern" | head -c 65536 | md5sum)
  [ "$a" = "$b" ] || { bad=$((bad+1)); echo "MISMATCH $i"; }
  i=$((i+1))
done
echo "VERIFY bad=$bad"
dmesg | grep -iq "i/o error" && echo "IO-ERROR-LOGGED"
[ $bad = 0 ]"#;

fn control(socket: &std::path::Path, request: &str) -> String {
    let mut stream = UnixStream::connect(socket).unwrap();
    writeln!(stream, "{request}").unwrap();
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).unwrap();
    reply.trim().to_string()
}

/// A pseudo-random delay in [300, 1500) ms, different each kill.
fn kill_delay(round: u64) -> Duration {
    let seed = (std::process::id() as u64)
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(round * 1_442_695_040_888_963_407);
    Duration::from_millis(300 + (seed >> 33) % 1200)
}

#[test]
#[ignore = "one run in three lost a 64 KiB write after the kills; cause not found yet (README, Known problems). \
            Run with: cargo test -p mm-integration --test block -- --ignored"]
fn block_backend_killed_mid_write_loses_nothing() {
    if !kvm_available("block_backend_killed_mid_write_loses_nothing") {
        return;
    }
    let dir = Scratch::new("blk-kill").unwrap();
    let root = dir.path("root.ext4");
    rootfs_copy(&root).unwrap();
    let data = dir.path("data.img");
    std::fs::File::create(&data).unwrap().set_len(16 << 20).unwrap();

    let root_socket = dir.path("root.sock");
    let _root_device = DeviceProcess::block(&root_socket, &root).unwrap();
    let mut data_device = DeviceProcess::block(&dir.path("data-0.sock"), &data).unwrap();
    let control_socket = dir.path("control.sock");
    let boot = Boot::new(&["sh", "-c", WRITE_THEN_VERIFY])
        .root_on_block(&root_socket)
        .device("block", &data_device.socket.clone())
        .control(&control_socket);
    let mut guest = boot.spawn().unwrap();
    guest.wait_for("WRITING", BOOT_TIMEOUT).unwrap();

    let mut kills = 0;
    for round in 1..=5u64 {
        std::thread::sleep(kill_delay(round));
        if guest.console.iter().any(|l| l.contains("WRITES-DONE")) {
            break;
        }
        data_device.kill().unwrap();
        kills += 1;
        let socket = dir.path(&format!("data-{round}.sock"));
        data_device = DeviceProcess::block(&socket, &data).unwrap();
        let reply = control(&control_socket, &format!("reconnect 1 {}", socket.display()));
        assert_eq!(reply, "ok", "reconnect after kill {round}");
    }
    let run = guest.finish(BOOT_TIMEOUT).unwrap();
    let context = format!("console:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert_eq!(kills, 5, "the guest finished writing before five kills; make the write phase longer\n{context}");
    assert!(run.stdout.contains("WRITES-DONE"), "{context}");
    assert!(run.stdout.contains("VERIFY bad=0"), "{context}");
    assert!(!run.stdout.contains("WRITE-FAILED"), "{context}");
    assert!(!run.stdout.contains("IO-ERROR-LOGGED"), "the guest kernel logged an I/O error\n{context}");
    assert_eq!(run.status, Some(0), "{context}");
}
