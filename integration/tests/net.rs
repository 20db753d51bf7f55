//! Two microVMs on a bridge inside a network namespace this test creates:
//! ping, and a TCP transfer checked by checksum. No packet leaves the
//! namespace.

use std::time::Duration;

use mm_integration::devices::{DeviceProcess, Scratch, rootfs_copy};
use mm_integration::guest::{BOOT_TIMEOUT, Boot};
use mm_integration::kvm_available;
use mm_integration::netns::TestNetwork;

const TAP_FD: i32 = 3;

const SERVER: &str = "ip addr add 10.77.0.1/24 dev eth0 && ip link set eth0 up && echo NET-UP && \
    nc -l -p 5000 > /tmp/received && echo \"RECEIVED $(md5sum < /tmp/received)\"";
/// The client pings the server (waiting for it to come up), then sends
/// 1 MiB of random bytes over TCP.
const CLIENT: &str = "ip addr add 10.77.0.2/24 dev eth0 && ip link set eth0 up && \
    i=0; until ping -c 1 -W 2 10.77.0.1 > /dev/null; do i=$((i+1)); [ $i -gt 120 ] && exit 1; done; \
    ping -c 3 10.77.0.1 > /tmp/ping && echo PING-OK && \
    head -c 1048576 /dev/urandom > /tmp/data && echo \"SENT $(md5sum < /tmp/data)\" && \
    i=0; until nc 10.77.0.1 5000 < /tmp/data; do i=$((i+1)); [ $i -gt 60 ] && exit 1; sleep 1; done; echo SEND-DONE";

fn checksum(console: &str, tag: &str) -> Option<String> {
    console.lines().find_map(|l| l.trim().strip_prefix(tag).map(|s| s.trim().to_string()))
}

#[test]
fn two_microvms_on_a_bridge_ping_and_transfer() {
    if !kvm_available("two_microvms_on_a_bridge_ping_and_transfer") {
        return;
    }
    let dir = Scratch::new("net").unwrap();
    let network = TestNetwork::new("net").unwrap();
    let mut devices = Vec::new();
    let mut boots = Vec::new();
    for (i, script) in [SERVER, CLIENT].iter().enumerate() {
        let root = dir.path(&format!("root{i}.ext4"));
        rootfs_copy(&root).unwrap();
        let root_socket = dir.path(&format!("root{i}.sock"));
        devices.push(DeviceProcess::block(&root_socket, &root).unwrap());
        let tap = network.tap(&format!("mmtap{i}")).unwrap();
        let net_socket = dir.path(&format!("net{i}.sock"));
        let mac = format!("02:00:0a:4d:00:{:02x}", i + 1);
        let args = ["--tap-fd", "3", "--mac", mac.as_str()];
        devices.push(DeviceProcess::spawn_with_fds("net", &net_socket, &args, &[(&tap, TAP_FD)]).unwrap());
        boots.push(Boot::new(&["sh", "-c", script]).root_on_block(&root_socket).device("net", &net_socket));
    }
    let server = boots[0].spawn().unwrap();
    let client = boots[1].spawn().unwrap();
    let client_run = client.finish(BOOT_TIMEOUT).unwrap();
    let server_run = server.finish(Duration::from_secs(300)).unwrap();
    let context = format!(
        "server console:\n{}\nserver stderr:\n{}\nclient console:\n{}\nclient stderr:\n{}",
        server_run.stdout, server_run.stderr, client_run.stdout, client_run.stderr
    );
    let sent = checksum(&client_run.stdout, "SENT").unwrap_or_else(|| panic!("{context}"));
    let received = checksum(&server_run.stdout, "RECEIVED").unwrap_or_else(|| panic!("{context}"));
    assert_eq!(sent, received, "{context}");
    assert!(client_run.stdout.contains("PING-OK"), "{context}");
    assert_eq!(client_run.status, Some(0), "{context}");
    assert_eq!(server_run.status, Some(0), "{context}");
}
