//! Hybrid vsock through `mm-device vsock`: a host client reaches a guest
//! listener with `CONNECT <port>`, and a guest connection to host port P
//! reaches the unix listener at `<uds>_<P>`; 1 MiB each way, byte-exact.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use mm_integration::devices::{DeviceProcess, Scratch, rootfs_copy};
use mm_integration::guest::{BOOT_TIMEOUT, Boot};
use mm_integration::kvm_available;

const MIB: usize = 1 << 20;

/// Same pattern as mm-init's vsock tools (guest/init/src/tools.rs).
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 11) as u8 ^ (i / 4093) as u8
}

/// Echoes one connection on `listener` until EOF, on its own thread.
fn echo_server(listener: UnixListener) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 65536];
        let mut total = 0;
        loop {
            let n = conn.read(&mut buf).unwrap();
            if n == 0 {
                return total;
            }
            conn.write_all(&buf[..n]).unwrap();
            total += n;
        }
    })
}

#[test]
fn vsock_echoes_a_mebibyte_each_way() {
    if !kvm_available("vsock_echoes_a_mebibyte_each_way") {
        return;
    }
    let dir = Scratch::new("vsock").unwrap();
    let root = dir.path("root.ext4");
    rootfs_copy(&root).unwrap();
    let root_socket = dir.path("root.sock");
    let _root_device = DeviceProcess::block(&root_socket, &root).unwrap();
    let uds = dir.path("vsock.uds");
    let vsock_socket = dir.path("vsock.sock");
    let uds_arg = uds.to_str().unwrap();
    let _vsock_device = DeviceProcess::spawn("vsock", &vsock_socket, &["--guest-cid", "3", "--uds", uds_arg]).unwrap();
    // The guest will connect to host port 6000.
    let guest_to_host = echo_server(UnixListener::bind(format!("{uds_arg}_6000")).unwrap());

    let script = "/init vsock-echo 5000 & /init vsock-send 6000 1048576; wait";
    let mut guest =
        Boot::new(&["sh", "-c", script]).root_on_block(&root_socket).device("vsock", &vsock_socket).spawn().unwrap();
    guest.wait_for("vsock-echo listening on 5000", BOOT_TIMEOUT).unwrap();

    // Host to guest: CONNECT, then 1 MiB out and the same 1 MiB back.
    let mut stream = UnixStream::connect(&uds).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    stream.write_all(b"CONNECT 5000\n").unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK "), "CONNECT answered {ok:?}");
    let sent: Vec<u8> = (0..MIB as u64).map(pattern).collect();
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        let sent = sent.clone();
        std::thread::spawn(move || {
            stream.write_all(&sent).unwrap();
            stream.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let mut echoed = Vec::with_capacity(MIB);
    reader.read_to_end(&mut echoed).unwrap();
    writer.join().unwrap();
    assert_eq!(echoed.len(), MIB);
    assert!(echoed == sent, "host -> guest -> host bytes differ");

    let run = guest.finish(BOOT_TIMEOUT).unwrap();
    let context = format!("console:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("vsock-send ok 1048576"), "{context}");
    assert!(run.stdout.contains("vsock-echo done 1048576"), "{context}");
    assert_eq!(guest_to_host.join().unwrap(), MIB);
    assert_eq!(run.status, Some(0), "{context}");
}
