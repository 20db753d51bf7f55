//! The microVM network end to end, through a real broker: addresses, SSH
//! with a real OpenSSH client, guest-to-guest traffic, port-forwarding,
//! address reuse across `rm` and a broker restart, anti-spoofing (a guest
//! that forges its address, MAC or ARP gets nothing through), egress NAT,
//! and the host kept out of reach unless it opts in.
//!
//! Traffic goes only to loopback and to addresses inside namespaces these
//! tests (or their brokers) create: the "host" and "internet" of the
//! egress test are namespaces too, so nothing touches the machine's own
//! networks. Boots are slow on PVM, so the two tests boot six guests in all
//! (two of them are only created, checked and removed).

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use mm_integration::broker::TestBroker;
use mm_integration::devices::Scratch;
use mm_integration::guest::BOOT_TIMEOUT;
use mm_integration::netns::{TestNetwork, ip};
use mm_integration::{kvm_available, run_with_timeout};

const QUICK: Duration = Duration::from_secs(60);

fn ps(broker: &TestBroker) -> Vec<serde_json::Value> {
    let run = broker.mmctl(&["ps", "-o", "json"], QUICK).unwrap();
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    serde_json::from_str::<serde_json::Value>(&run.stdout).unwrap().as_array().unwrap().clone()
}

fn ip_of(broker: &TestBroker, vm: &str) -> Ipv4Addr {
    let info = broker.inspect(vm).unwrap();
    info["ip"].as_str().unwrap().parse().unwrap_or_else(|_| panic!("{vm} has no address: {info}"))
}

fn run_detached(broker: &TestBroker, name: &str, extra: &[&str]) {
    let mut args = vec!["run", "-d", "--name", name];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "sleep", "1000000"]);
    let run = broker.mmctl(&args, QUICK).unwrap();
    assert_eq!(run.status, Some(0), "mmctl run {name}: {}", run.stderr);
}

/// Runs a shell script in `vm` (retrying while it boots); asserts success.
fn sh(broker: &TestBroker, vm: &str, script: &str) -> String {
    let run = broker.exec_when_ready(vm, &["sh", "-c", script], BOOT_TIMEOUT).unwrap();
    assert_eq!(run.status, Some(0), "{vm}: {script}\nstdout: {}\nstderr: {}", run.stdout, run.stderr);
    run.stdout
}

/// A plain OpenSSH client with the config `mmctl ssh --print-config` wrote.
fn plain_ssh(config: &Path, home: &Path, key: &Path, host: &str, command: &str) -> mm_integration::Run {
    let mut cmd = Command::new("ssh");
    cmd.env("HOME", home).arg("-F").arg(config).arg("-i").arg(key);
    cmd.args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=30", host, command]);
    run_with_timeout(cmd, QUICK).unwrap()
}

/// `mmctl ssh`, retried while the guest's SSH server is not up yet.
fn mmctl_ssh_when_ready(
    broker: &TestBroker,
    home: &Path,
    key: &Path,
    vm: &str,
    command: &[&str],
) -> mm_integration::Run {
    let deadline = std::time::Instant::now() + BOOT_TIMEOUT;
    let key = key.to_str().unwrap();
    let mut args = vec!["ssh", "-i", key, vm, "--"];
    args.extend_from_slice(command);
    loop {
        let mut cmd = broker.mmctl_command(&args).unwrap();
        cmd.env("HOME", home);
        let run = run_with_timeout(cmd, QUICK).unwrap();
        let not_up = run.status == Some(255) && run.stderr.contains("cannot connect");
        if !not_up || std::time::Instant::now() > deadline {
            return run;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// A command's stdout and stderr, run in the broker's network namespace.
fn in_broker_netns(broker: &TestBroker, args: &[&str]) -> String {
    let ns = broker.netns.as_deref().expect("a broker with its own namespace");
    let out = Command::new("ip").args(["netns", "exec", ns]).args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// The broker's anti-spoofing table (broker/src/network/guard.rs), with counters.
fn guard_table(broker: &TestBroker) -> String {
    in_broker_netns(broker, &["nft", "list", "table", "bridge", "micromachines_guard"])
}

fn mac_of(broker: &TestBroker, vm: &str) -> String {
    broker.inspect(vm).unwrap()["mac"].as_str().unwrap().to_string()
}

fn tap_of(broker: &TestBroker, vm: &str) -> String {
    format!("mm{}", &broker.inspect(vm).unwrap()["id"].as_str().unwrap()[..12])
}

/// The SSH host keys that answer at `ip`, as the gateway reaches it.
fn host_keys(broker: &TestBroker, ip: Ipv4Addr) -> Vec<String> {
    let out = in_broker_netns(broker, &["ssh-keyscan", "-T", "30", &ip.to_string()]);
    let mut keys: Vec<String> = out.lines().filter(|l| l.starts_with(&ip.to_string())).map(str::to_string).collect();
    keys.sort();
    keys
}

#[test]
fn microvms_get_addresses_reach_each_other_and_take_ssh_and_port_forwards() {
    if !kvm_available("microvms_get_addresses_reach_each_other_and_take_ssh_and_port_forwards") {
        return;
    }
    let scratch = Scratch::new("network-keys").unwrap();
    let good = mm_integration::ssh_keygen(&scratch, "good").unwrap();
    let bad = mm_integration::ssh_keygen(&scratch, "bad").unwrap();
    let home = scratch.path("home");
    std::fs::create_dir_all(&home).unwrap();
    let mut broker = TestBroker::start("net", &["--network-cidr", "10.123.0.0/24"]).unwrap();
    let good_pub = format!("{}.pub", good.display());
    run_detached(&broker, "a", &["--ssh-key", &good_pub]);
    run_detached(&broker, "b", &["--ssh-key", &good_pub]);

    // Addresses: distinct, in the configured network, shown by ps and inspect.
    let (ip_a, ip_b) = (ip_of(&broker, "a"), ip_of(&broker, "b"));
    assert_eq!(ip_a, Ipv4Addr::new(10, 123, 0, 2));
    assert_eq!(ip_b, Ipv4Addr::new(10, 123, 0, 3));
    let listed: Vec<String> = ps(&broker).iter().map(|vm| vm["ip"].as_str().unwrap().to_string()).collect();
    assert!(listed.contains(&ip_a.to_string()) && listed.contains(&ip_b.to_string()), "{listed:?}");

    // The guest configured itself from the command line.
    let shown = sh(&broker, "a", "ip -4 addr show eth0; ip route; cat /etc/hosts");
    assert!(shown.contains(&format!("inet {ip_a}/24")), "{shown}");
    assert!(shown.contains("default via 10.123.0.1"), "{shown}");

    // Guest to guest: ping, then 256 KiB over TCP checked by md5. (Guest
    // networking on PVM hosts runs at ~0.15 MiB/s, so the payload is small.)
    // busybox nc hangs up once its stdin ends, so the receiver's stdin is a
    // pipe that stays open.
    sh(&broker, "b", "(sleep 100000 | nc -l -p 5000 > /tmp/received) </dev/null >/dev/null 2>&1 &");
    let sent = sh(
        &broker,
        "a",
        &format!(
            "ping -c 2 -W 5 {ip_b} > /dev/null && head -c 262144 /dev/urandom > /tmp/data && \
             i=0; until nc {ip_b} 5000 < /tmp/data; do i=$((i+1)); [ $i -gt 30 ] && exit 1; sleep 1; done; \
             md5sum < /tmp/data"
        ),
    );
    let received = sh(
        &broker,
        "b",
        "i=0; while [ $(wc -c < /tmp/received) -lt 262144 ]; do i=$((i+1)); [ $i -gt 240 ] && break; sleep 0.5; done; \
         md5sum < /tmp/received",
    );
    assert_eq!(sent.split_whitespace().next(), received.split_whitespace().next(), "sent {sent} received {received}");

    // SSH with the real OpenSSH client, through the broker (the host has no
    // route into the namespace): `mmctl ssh`, then a plain `ssh -F`.
    let run = mmctl_ssh_when_ready(&broker, &home, &good, "a", &["echo ssh-ok; hostname; exit 3"]);
    assert_eq!(run.status, Some(3), "mmctl ssh: {}\n{}", run.stdout, run.stderr);
    assert_eq!(run.stdout.lines().collect::<Vec<_>>(), ["ssh-ok", "a"], "{}", run.stderr);
    let config_run = broker.mmctl(&["ssh", "--print-config"], QUICK).unwrap();
    assert_eq!(config_run.status, Some(0), "{}", config_run.stderr);
    let config = scratch.path("ssh_config");
    std::fs::write(&config, &config_run.stdout).unwrap();
    let run = plain_ssh(&config, &home, &good, "b.mm", "hostname");
    assert_eq!((run.status, run.stdout.trim()), (Some(0), "b"), "{}", run.stderr);
    let refused = plain_ssh(&config, &home, &bad, "a.mm", "echo should-not-run");
    assert_eq!(refused.status, Some(255), "a wrong key must be refused: {}", refused.stdout);
    assert!(refused.stderr.contains("Permission denied"), "{}", refused.stderr);
    assert!(!refused.stdout.contains("should-not-run"));

    // Port-forward: a server in b answers a client on 127.0.0.1.
    sh(&broker, "b", "(while true; do echo pong-from-b | nc -l -p 8080; done) </dev/null >/dev/null 2>&1 &");
    let mut forward = broker.mmctl_command(&["port-forward", "b", "0:8080"]).unwrap();
    let mut forward = forward.stdout(Stdio::piped()).stderr(Stdio::null()).stdin(Stdio::null()).spawn().unwrap();
    let mut first_line = String::new();
    BufReader::new(forward.stdout.take().unwrap()).read_line(&mut first_line).unwrap();
    let local = first_line.split_whitespace().nth(1).unwrap_or_else(|| panic!("{first_line:?}")).to_string();
    assert!(local.starts_with("127.0.0.1:"), "listens on loopback only: {first_line}");
    let answer = (0..30)
        .find_map(|_| {
            let mut reply = String::new();
            let read = std::net::TcpStream::connect(&local).and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(20)))?;
                s.read_to_string(&mut reply)
            });
            if read.is_ok() && reply.contains("pong-from-b") {
                return Some(reply);
            }
            std::thread::sleep(Duration::from_secs(1));
            None
        })
        .expect("no answer through the port-forward");
    assert_eq!(answer.trim(), "pong-from-b");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(forward.id() as i32, libc::SIGTERM) };
    let _ = forward.wait();

    // Anti-spoofing (issue 16): each TAP sends only from its microVM's own
    // MAC and address. a takes b's address (ARP claims, pings from it),
    // then a MAC of its own choosing; nothing of it gets through, and b
    // stays b for the gateway and for `mmctl ssh`.
    let guard = guard_table(&broker);
    eprintln!("the anti-spoofing table with a and b running:\n{guard}");
    let (mac_a, mac_b) = (mac_of(&broker, "a"), mac_of(&broker, "b"));
    for (vm, ip, mac) in [("a", ip_a, &mac_a), ("b", ip_b, &mac_b)] {
        let element = format!("\"{}\" . {mac} . {ip}", tap_of(&broker, vm));
        assert!(guard.contains(&element), "{vm}'s element {element} is missing:\n{guard}");
    }
    let key_b = host_keys(&broker, ip_b);
    assert!(!key_b.is_empty(), "ssh-keyscan of b found no key");
    let neigh_b = || in_broker_netns(&broker, &["ip", "neigh", "show", &ip_b.to_string()]);
    assert!(neigh_b().contains(&mac_b), "the gateway should know b after the keyscan: {}", neigh_b());
    let forged = sh(
        &broker,
        "a",
        &format!(
            "ip addr add {ip_b}/32 dev eth0 && arping -U -c 2 -I eth0 -s {ip_b} {ip_b}; \
             arping -A -c 2 -I eth0 -s {ip_b} {ip_b}; \
             if ping -c 2 -W 3 -I {ip_b} 10.123.0.1 >/dev/null 2>&1; then echo FORGED-IP-ANSWERED; fi; true"
        ),
    );
    assert!(!forged.contains("FORGED-IP-ANSWERED"), "a ping from b's address got an answer: {forged}");
    // While a still holds b's address: the gateway's entry for b, b's host
    // key, and who answers `mmctl ssh b` are all unchanged.
    let neigh = neigh_b();
    assert!(neigh.contains(&mac_b) && !neigh.contains(&mac_a), "a's forged ARP reached the gateway: {neigh}");
    assert_eq!(host_keys(&broker, ip_b), key_b, "b's address answers with another host key");
    let run = mmctl_ssh_when_ready(&broker, &home, &good, "b", &["hostname"]);
    assert_eq!((run.status, run.stdout.trim()), (Some(0), "b"), "mmctl ssh b: {}", run.stderr);
    // A MAC of a's own choosing: its ARP for b is dropped, so no answer;
    // then a gets its own back and reaches b again.
    let forged = sh(
        &broker,
        "a",
        &format!(
            "ip addr del {ip_b}/32 dev eth0; ip link set eth0 down; ip link set eth0 address 02:00:00:00:00:99; \
             ip link set eth0 up; if ping -c 2 -W 3 {ip_b} >/dev/null 2>&1; then echo FORGED-MAC-ANSWERED; fi; \
             ip link set eth0 down; ip link set eth0 address {mac_a}; ip link set eth0 up; \
             ip route replace default via 10.123.0.1; \
             i=0; until ping -c 1 -W 5 {ip_b} >/dev/null 2>&1; do i=$((i+1)); \
             [ $i -gt 20 ] && echo RESTORED-NO-ANSWER && break; done; true"
        ),
    );
    assert!(!forged.contains("FORGED-MAC-ANSWERED"), "a ping from a forged MAC got an answer: {forged}");
    assert!(!forged.contains("RESTORED-NO-ANSWER"), "a does not reach b with its own MAC again: {forged}");
    let guard = guard_table(&broker);
    for dropped in ["spoofed MAC or IPv4 source", "spoofed ARP"] {
        let line = guard.lines().find(|l| l.contains(dropped)).unwrap_or_default();
        assert!(!line.contains("counter packets 0 "), "nothing counted as {dropped}:\n{guard}");
    }

    // Addresses are held while stopped, survive a broker restart, and are
    // given out again only after `rm`.
    assert_eq!(broker.mmctl(&["stop", "-t", "20", "b"], QUICK).unwrap().status, Some(0));
    broker.restart().unwrap();
    assert_eq!((ip_of(&broker, "a"), ip_of(&broker, "b")), (ip_a, ip_b));
    let run = mmctl_ssh_when_ready(&broker, &home, &good, "a", &["echo after-restart"]);
    assert_eq!((run.status, run.stdout.trim()), (Some(0), "after-restart"), "{}", run.stderr);
    // The guard survived the restart: a's element is there (a is reachable
    // above), b's went with its TAP when b stopped.
    let guard = guard_table(&broker);
    assert!(guard.contains(&format!(". {mac_a} . {ip_a}")), "{guard}");
    assert!(!guard.contains(&mac_b), "stopped b keeps its element:\n{guard}");
    run_detached(&broker, "c", &[]);
    assert_eq!(ip_of(&broker, "c"), Ipv4Addr::new(10, 123, 0, 4), "b is stopped, not removed: its address is kept");
    for vm in ["a", "c"] {
        assert_eq!(broker.mmctl(&["rm", "-f", vm], QUICK).unwrap().status, Some(0));
    }
    run_detached(&broker, "d", &[]);
    assert_eq!(ip_of(&broker, "d"), ip_a, "a's address is free once a is removed");
    assert_eq!(broker.mmctl(&["rm", "-f", "d", "b"], QUICK).unwrap().status, Some(0));
    let guard = guard_table(&broker);
    assert!(!guard.contains("\"mm"), "elements left after every microVM is gone:\n{guard}");
}

/// Accepts on `listener` for the test's lifetime and reports each peer.
fn record_peers(listener: TcpListener) -> mpsc::Receiver<std::net::SocketAddr> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            if let Ok(peer) = stream.peer_addr() {
                let _ = tx.send(peer);
            }
        }
    });
    rx
}

/// How one TCP connection attempt from a guest ended.
#[derive(Clone, Debug, PartialEq)]
enum Probe {
    Connected,
    /// A RST came back: something answered, nothing listened.
    Refused,
    /// Nothing came back within the budget: dropped on the way.
    Silence,
    Other(String),
}

/// Seconds each probe may take, the same for the ones expected to connect
/// and the ones expected to meet silence (SYNs are resent at 1, 3, 7 and
/// 15 s, so a slow first SYN on a loaded PVM host still connects).
const PROBE_SECONDS: u32 = 20;

/// A guest shell script that tries each `(address, port)` at once, in
/// parallel, and prints one `PROBE <address> <how it ended>` line each,
/// with busybox nc's own words for refusal ("Connection refused") and
/// silence ("timed out").
fn probe_script(targets: &[(&str, u16)]) -> String {
    let mut script = String::new();
    for (address, port) in targets {
        script.push_str(&format!(
            "(if r=$(nc -w {PROBE_SECONDS} {address} {port} </dev/null 2>&1); then echo PROBE {address} connected; \
             else echo PROBE {address} \"$r\"; fi) & "
        ));
    }
    script + "wait"
}

/// The outcome `probe_script` printed for each of `targets`, in their order
/// (the probes ran in parallel, so their lines come in any order).
fn probe_outcomes(out: &str, targets: &[(&str, u16)]) -> Vec<(String, Probe)> {
    let printed: Vec<(&str, &str)> =
        out.lines().filter_map(|l| l.strip_prefix("PROBE ")).map(|l| l.split_once(' ').unwrap_or((l, ""))).collect();
    targets
        .iter()
        .map(|(address, _)| {
            let how = printed.iter().find(|(a, _)| a == address).map(|(_, how)| *how);
            let probe = match how {
                Some("connected") => Probe::Connected,
                Some(how) if how.contains("Connection refused") => Probe::Refused,
                Some(how) if how.contains("timed out") => Probe::Silence,
                Some(how) => Probe::Other(how.to_string()),
                None => Probe::Other("no line printed".to_string()),
            };
            (address.to_string(), probe)
        })
        .collect()
}

/// Runs `probe_script` for `targets` in `vm` once it answers exec.
fn probe(broker: &TestBroker, vm: &str, targets: &[(&str, u16)]) -> (Vec<(String, Probe)>, String) {
    let run = broker.exec_when_ready(vm, &["sh", "-c", &probe_script(targets)], BOOT_TIMEOUT).unwrap();
    (probe_outcomes(&run.stdout, targets), format!("stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr))
}

/// `(address, outcome)` pairs as `probe` returns them.
fn expect(pairs: &[(&str, Probe)]) -> Vec<(String, Probe)> {
    pairs.iter().map(|(a, p)| (a.to_string(), p.clone())).collect()
}

#[test]
fn guests_get_egress_but_reach_the_host_only_when_it_opts_in() {
    if !kvm_available("guests_get_egress_but_reach_the_host_only_when_it_opts_in") {
        return;
    }
    // "host" plays the machine's root namespace, "inet" the outside world,
    // joined by a veth pair: host's up0 (198.51.100.1) is the uplink.
    let host = TestNetwork::new("host").unwrap();
    let inet = TestNetwork::new("inet").unwrap();
    ip(&["-n", &host.name, "link", "add", "up0", "type", "veth", "peer", "name", "wan0", "netns", &inet.name]).unwrap();
    ip(&["-n", &host.name, "addr", "add", "198.51.100.1/24", "dev", "up0"]).unwrap();
    ip(&["-n", &host.name, "link", "set", "up0", "up"]).unwrap();
    ip(&["-n", &inet.name, "addr", "add", "198.51.100.2/24", "dev", "wan0"]).unwrap();
    ip(&["-n", &inet.name, "link", "set", "wan0", "up"]).unwrap();
    let outside = record_peers(inet.listen("198.51.100.2:7000").unwrap());
    let host_service = record_peers(host.listen("0.0.0.0:7001").unwrap());

    // Default: the bridge in the broker's own namespace, egress via up0.
    let isolated =
        TestBroker::start_in(Some(&host.name), "egress", &["--uplink", "up0", "--network-cidr", "10.124.0.0/24"])
            .unwrap();
    // Opt-in: the bridge in the "host" namespace itself.
    let opted_in = TestBroker::start_in(
        Some(&host.name),
        "hostbridge",
        &["--bridge-in-host-netns", "--bridge", "mmbr9", "--network-cidr", "10.125.0.0/24"],
    )
    .unwrap();
    run_detached(&isolated, "e", &[]);
    run_detached(&opted_in, "f", &[]);

    // Egress works, masqueraded onto the uplink's address.
    let (outcomes, guest) = probe(&isolated, "e", &[("198.51.100.2", 7000)]);
    let diagnose = || {
        let ns = isolated.netns.clone().unwrap();
        let show = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
        };
        format!(
            "guest:\n{guest}\nbroker netns addr:\n{}\nbroker netns route:\n{}\nhost netns addr:\n{}\nbroker log:\n{}",
            show(&["-n", &ns, "addr"]),
            show(&["-n", &ns, "route"]),
            show(&["-n", &host.name, "addr"]),
            isolated.log()
        )
    };
    assert_eq!(outcomes, expect(&[("198.51.100.2", Probe::Connected)]), "{}", diagnose());
    let peer = outside.recv_timeout(QUICK).expect("the outside saw no connection");
    assert_eq!(peer.ip(), Ipv4Addr::new(198, 51, 100, 1), "egress must be NATed onto the uplink");

    // But the host itself is out of reach: its uplink address and the
    // transit address get silence (the host's input chain drops them, with
    // the same budget as the probe that connected above), and the guests'
    // gateway, which lives in the broker's namespace and not the host's,
    // refuses (nothing listens there) -- a refusal from the *host* would
    // mean the drop rule let the SYN in.
    let (outcomes, out) =
        probe(&isolated, "e", &[("198.51.100.1", 7001), ("169.254.100.1", 7001), ("10.124.0.1", 7001)]);
    let want = [("198.51.100.1", Probe::Silence), ("169.254.100.1", Probe::Silence), ("10.124.0.1", Probe::Refused)];
    assert_eq!(outcomes, expect(&want), "{out}");
    assert!(host_service.try_recv().is_err(), "the host's service saw a guest connection");

    // A host that opted in is reachable from its guests.
    let (outcomes, out) = probe(&opted_in, "f", &[("10.125.0.1", 7001)]);
    assert_eq!(outcomes, expect(&[("10.125.0.1", Probe::Connected)]), "{out}");
    let peer = host_service.recv_timeout(QUICK).expect("the host's service saw no connection");
    assert_eq!(peer.ip(), Ipv4Addr::new(10, 125, 0, 2));
}
