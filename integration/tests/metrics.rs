//! `mm-broker --metrics-listen`: one real microVM (a warm start when the
//! shared test cache has its shape, else one cold boot) scraped over HTTP.
//! Its series appear with plausible values (vCPU time, host RSS, the block
//! device's reads, the guest's network counters), a scrape while its
//! mm-vmm and root block device are SIGSTOPped returns within the scrape's
//! deadline with the device reported down, and after `rm -f` every series
//! of it is gone. The listener refuses what is not `GET /metrics`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use mm_integration::broker::TestBroker;
use mm_integration::guest::BOOT_TIMEOUT;
use mm_integration::kvm_available;

const QUICK: Duration = Duration::from_secs(120);

/// Sends `request` raw; returns the status line and the body.
fn http(addr: &str, request: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics listener");
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (head.lines().next().unwrap_or_default().to_owned(), body.to_owned())
}

fn scrape(addr: &str) -> String {
    let (status, body) = http(addr, "GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    body
}

/// The value of the first sample whose name and labels contain every part.
fn value(text: &str, name: &str, parts: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| parts.iter().all(|p| l.contains(p)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The metrics address the broker logged (it was given port 0).
fn metrics_addr(broker: &TestBroker) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = broker.log();
        let found = log
            .lines()
            .find(|l| l.contains("serving metrics"))
            .and_then(|l| l.split("bound=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned);
        if let Some(addr) = found {
            return addr;
        }
        assert!(Instant::now() < deadline, "no metrics address in the log:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Signals `pid` (the jailer's outer half the broker reports) and every
/// process under it (the jailed process that does the work).
fn signal(pid: i64, signal: i32) {
    let mut tree = vec![pid];
    let mut next = 0;
    while next < tree.len() {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", tree[next])).into_iter().flatten().flatten();
        next += 1;
        for task in tasks {
            let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            tree.extend(children.split_whitespace().filter_map(|c| c.parse::<i64>().ok()));
        }
    }
    for pid in tree {
        // SAFETY: kill(2) on this microVM's processes, found from the pid
        // the broker reported.
        assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0, "kill {pid}");
    }
}

#[test]
fn a_microvm_is_scraped_while_it_lives_and_not_after() {
    if !kvm_available("a_microvm_is_scraped_while_it_lives_and_not_after") {
        return;
    }
    let broker = TestBroker::start("metrics", &["--metrics-listen", "127.0.0.1:0"]).unwrap();
    let addr = metrics_addr(&broker);

    // Nothing but GET /metrics.
    assert_eq!(http(&addr, "POST /metrics HTTP/1.1\r\n\r\n").0, "HTTP/1.1 405 Method Not Allowed");
    assert_eq!(http(&addr, "GET / HTTP/1.1\r\n\r\n").0, "HTTP/1.1 404 Not Found");
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(8192));
    assert_eq!(http(&addr, &huge).0, "HTTP/1.1 431 Request Header Fields Too Large");
    let empty = scrape(&addr);
    assert!(!empty.contains("machine_id="), "{empty}");

    let ticker = "i=0; while true; do i=$((i+1)); echo tick $i > /tick; sync; echo \"tick $i\"; sleep 1; done";
    let run = broker.mmctl(&["run", "-d", "--name", "scraped", "--", "sh", "-c", ticker], QUICK).unwrap();
    assert_eq!(run.status, Some(0), "{}\n{}", run.stderr, broker.log());
    broker.wait_for_log("scraped", "tick 2", BOOT_TIMEOUT).unwrap();
    let info = broker.inspect("scraped").unwrap();
    let id = info["id"].as_str().unwrap().to_owned();
    let vm = format!(r#"machine_id="{id}",name="scraped",namespace="""#);

    let text = scrape(&addr);
    let running = [vm.as_str(), r#"state="running""#];
    assert_eq!(value(&text, "mm_vm_state", &running), Some(1.0), "{text}");
    assert_eq!(value(&text, "mm_broker_vms", &[r#"state="running""#]), Some(1.0), "{text}");
    assert!(value(&text, "mm_vm_memory_bytes", &[&vm]).is_some_and(|b| b >= (64 << 20) as f64), "{text}");
    let vmm = [vm.as_str(), r#"role="vmm""#];
    let cpu: f64 = ["user", "system"]
        .iter()
        .filter_map(|mode| {
            value(&text, "mm_vm_cpu_seconds_total", &[&vm, r#"role="vmm""#, &format!(r#"mode="{mode}""#)])
        })
        .sum();
    assert!(cpu > 0.0, "vCPU time {cpu}:\n{text}");
    assert!(value(&text, "mm_vm_process_resident_bytes", &vmm).is_some_and(|b| b > 0.0), "{text}");
    let root = [vm.as_str(), r#"role="block-root""#];
    assert_eq!(value(&text, "mm_vm_process_up", &root), Some(1.0), "{text}");
    assert!(value(&text, "mm_vm_process_io_read_bytes_total", &root).is_some_and(|b| b > 0.0), "block reads:\n{text}");
    assert!(value(&text, "mm_vm_process_io_reads_total", &root).is_some_and(|n| n > 0.0), "{text}");
    assert!(value(&text, "mm_vm_block_in_flight", &root).is_some(), "{text}");
    assert!(value(&text, "mm_vm_process_max_resident_bytes", &root).is_some_and(|b| b > 0.0), "{text}");
    if text.contains("mm_vm_net_transmit_packets_total{") {
        assert!(value(&text, "mm_vm_net_transmit_packets_total", &[&vm]).is_some(), "{text}");
    }

    // A stopped mm-vmm and root device cannot hold the scrape past its
    // 2 s deadline; the device is reported down, then up again.
    let pid = |role: &str| {
        info["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["role"] == role)
            .and_then(|p| p["pid"].as_i64())
            .unwrap()
    };
    let (vmm_pid, root_pid) = (pid("vmm"), pid("block-root"));
    signal(vmm_pid, libc::SIGSTOP);
    signal(root_pid, libc::SIGSTOP);
    let began = Instant::now();
    let stuck = scrape(&addr);
    let took = began.elapsed();
    signal(root_pid, libc::SIGCONT);
    signal(vmm_pid, libc::SIGCONT);
    assert!(took < Duration::from_secs(4), "a scrape with a stopped microVM took {took:?}");
    assert_eq!(value(&stuck, "mm_vm_process_up", &root), Some(0.0), "{stuck}");
    assert!(value(&stuck, "mm_broker_scrape_unanswered", &[]).is_some_and(|n| n >= 1.0), "{stuck}");
    assert_eq!(value(&stuck, "mm_vm_state", &running), Some(1.0), "{stuck}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while value(&scrape(&addr), "mm_vm_process_up", &root) != Some(1.0) {
        assert!(Instant::now() < deadline, "the device never answered again");
        std::thread::sleep(Duration::from_millis(200));
    }

    let rm = broker.mmctl(&["rm", "-f", "scraped"], QUICK).unwrap();
    assert_eq!(rm.status, Some(0), "{}", rm.stderr);
    let after = scrape(&addr);
    assert!(!after.contains(&id), "series of a removed microVM:\n{after}");
    assert!(!after.contains("name=\"scraped\""), "{after}");
    assert_eq!(value(&after, "mm_broker_vms", &[r#"state="running""#]), Some(0.0), "{after}");
    let booted = value(&after, "mm_broker_boot_duration_seconds_count", &[]).unwrap_or(0.0)
        + value(&after, "mm_broker_restore_duration_seconds_count", &[]).unwrap_or(0.0);
    assert!(booted >= 1.0, "no boot or restore latency observed:\n{after}");
}
