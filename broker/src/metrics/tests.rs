//! The exposition of fake snapshots: pure logic, no microVM.

use super::latency::{StartKind, Tracker, parse_ms};
use super::server::{Route, route};
use super::*;
use crate::events::Event;

fn vm(id: &str, name: &str, state: &str) -> VmSample {
    VmSample {
        labels: VmLabels { machine_id: id.into(), name: name.into(), namespace: String::new(), host: "h1".into() },
        state: state.into(),
        vcpus: 2,
        memory_bytes: 128 << 20,
        processes: vec![
            ProcessSample {
                role: "vmm".into(),
                up: true,
                cpu_user_seconds: 1.5,
                cpu_system_seconds: 0.25,
                rss_bytes: Some(4096),
                pss_bytes: Some(2048),
                ..Default::default()
            },
            ProcessSample {
                role: "block-root".into(),
                up: true,
                restarts: 1,
                io: Some(ProcessIo { rchar: 1000, syscr: 3, ..Default::default() }),
                block: Some(BlockCounters { resubmitted: 7, in_flight: 2 }),
                max_rss_bytes: Some(1 << 20),
                ..Default::default()
            },
            ProcessSample { role: "vsock".into(), up: false, ..Default::default() },
        ],
        net: Some(NetCounters { rx_bytes: 10, tx_bytes: 20, rx_dropped: 1, ..Default::default() }),
    }
}

fn snapshot(vms: Vec<VmSample>) -> Snapshot {
    Snapshot {
        broker: BrokerSample { host: "h1".into(), memory_committed_bytes: 128 << 20, ..Default::default() },
        vms,
    }
}

/// The value of the sample `series` (name and labels, exactly).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

const LABELS: &str = r#"machine_id="abc",name="web",namespace="",host="h1""#;

#[test]
fn a_snapshot_is_exposed_as_openmetrics_text() {
    let metrics = BrokerMetrics::default();
    let text = metrics.render(snapshot(vec![vm("abc", "web", "running")]));
    for (series, want) in [
        (r#"mm_broker_vms{host="h1",state="running"}"#.to_owned(), 1.0),
        (r#"mm_broker_vms{host="h1",state="stopped"}"#.to_owned(), 0.0),
        (r#"mm_broker_memory_committed_bytes{host="h1"}"#.to_owned(), 134217728.0),
        (format!(r#"mm_vm_state{{{LABELS},state="running"}}"#), 1.0),
        (format!("mm_vm_vcpus{{{LABELS}}}"), 2.0),
        (format!("mm_vm_memory_bytes{{{LABELS}}}"), 134217728.0),
        (format!(r#"mm_vm_cpu_seconds_total{{{LABELS},role="vmm",mode="user"}}"#), 1.5),
        (format!(r#"mm_vm_process_resident_bytes{{{LABELS},role="vmm"}}"#), 4096.0),
        (format!(r#"mm_vm_process_pss_bytes{{{LABELS},role="vmm"}}"#), 2048.0),
        (format!(r#"mm_vm_process_up{{{LABELS},role="vsock"}}"#), 0.0),
        (format!(r#"mm_vm_process_restarts_total{{{LABELS},role="block-root"}}"#), 1.0),
        (format!(r#"mm_vm_process_io_read_bytes_total{{{LABELS},role="block-root"}}"#), 1000.0),
        (format!(r#"mm_vm_block_resubmitted_total{{{LABELS},role="block-root"}}"#), 7.0),
        (format!(r#"mm_vm_block_in_flight{{{LABELS},role="block-root"}}"#), 2.0),
        (format!("mm_vm_net_receive_bytes_total{{{LABELS}}}"), 10.0),
        (format!("mm_vm_net_transmit_bytes_total{{{LABELS}}}"), 20.0),
    ] {
        assert_eq!(value(&text, &series), Some(want), "{series} in\n{text}");
    }
    for line in ["# TYPE mm_vm_cpu_seconds counter", "# TYPE mm_vm_process_up gauge"] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
    // A process that did not answer has no CPU figures, only up 0.
    assert!(!text.contains(r#"role="vsock",mode="#), "{text}");
    assert!(text.ends_with("# EOF\n"));
}

#[test]
fn a_vm_that_is_gone_leaves_no_series() {
    let metrics = BrokerMetrics::default();
    let both = metrics.render(snapshot(vec![vm("abc", "web", "running"), vm("def", "db", "running")]));
    assert!(both.contains(r#"machine_id="def""#));
    let one = metrics.render(snapshot(vec![vm("abc", "web", "running")]));
    assert!(!one.contains(r#"machine_id="def""#), "{one}");
    assert!(!one.contains(r#"name="db""#), "{one}");
    assert_eq!(value(&one, r#"mm_broker_vms{host="h1",state="running"}"#), Some(1.0), "{one}");
    let none = metrics.render(snapshot(Vec::new()));
    assert!(!none.contains("machine_id="), "{none}");
}

#[test]
fn hostile_label_values_are_escaped() {
    let metrics = BrokerMetrics::default();
    let text = metrics.render(snapshot(vec![vm("abc", "a\"b\\c\nd} x{", "running")]));
    assert!(text.contains(r#"name="a\"b\\c\nd} x{""#), "{text}");
    // Every sample is one line: nothing a name holds breaks a line.
    for line in text.lines() {
        assert!(line.starts_with('#') || line.starts_with("mm_"), "stray line {line:?}");
    }
}

fn event(vm_id: &str, kind: &str, time: &str, detail: &str) -> Event {
    Event { time: time.into(), vm_id: vm_id.into(), vm_name: "web".into(), kind: kind.into(), detail: detail.into() }
}

#[test]
fn latencies_come_from_the_audit_times() {
    let metrics = BrokerMetrics::default();
    let mut tracker = Tracker::default();
    let feed = [
        event("abc", "state", "2025-01-01T23:59:59.900Z", r#"{"to":"starting"}"#),
        event("abc", "spawn", "2025-01-02T00:00:00.150Z", r#"{"role":"block-root"}"#),
        event("abc", "spawn", "2025-01-02T00:00:00.200Z", r#"{"role":"vmm"}"#),
        event("abc", "state", "2025-01-02T00:00:02.900Z", r#"{"to":"running"}"#),
        event("def", "state", "2025-01-02T00:00:03.000Z", r#"{"to":"starting"}"#),
        event("def", "state", "2025-01-02T00:00:03.040Z", r#"{"to":"running"}"#),
    ];
    for e in &feed {
        tracker.observe(&metrics.latency, "h1", e, |id| if id == "def" { StartKind::Warm } else { StartKind::Boot });
    }
    let text = metrics.render(Snapshot::default());
    assert!(text.contains(r#"mm_broker_spawn_duration_seconds_sum{host="h1"} 0.3"#), "{text}");
    assert!(text.contains(r#"mm_broker_boot_duration_seconds_sum{host="h1"} 3.0"#), "{text}");
    assert!(text.contains(r#"mm_broker_restore_duration_seconds_count{host="h1",source="warm"} 1"#), "{text}");
    assert_eq!(parse_ms("1970-01-01T00:00:01.005Z"), Some(1005));
}

#[test]
fn the_listener_answers_get_metrics_only() {
    assert_eq!(route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Route::Metrics);
    assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
    assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Route::MethodNotAllowed);
    assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
    assert_eq!(route(b"GET /metrics/../x HTTP/1.1\r\n\r\n"), Route::NotFound);
    assert_eq!(route(b"garbage\r\n\r\n"), Route::BadRequest);
    assert_eq!(route(b"\xff\xfe"), Route::BadRequest);
}

#[test]
fn proc_files_parse() {
    use super::gather::{parse_io, parse_net_dev, parse_rollup, parse_stat};
    let stat = "42 (mm vmm) (x)) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 123456 1000 100";
    assert_eq!(parse_stat(stat).map(|s| (s.utime, s.stime, s.start_time)), Some((250, 75, 123456)));
    let rollup = "00400000-7fff [rollup]\nRss:                1024 kB\nPss:                 512 kB\n";
    assert_eq!(parse_rollup(rollup), (Some(1 << 20), Some(512 << 10)));
    let io = parse_io("rchar: 10\nwchar: 20\nsyscr: 3\nsyscw: 4\nread_bytes: 4096\nwrite_bytes: 0\n");
    assert_eq!((io.rchar, io.wchar, io.syscr, io.syscw, io.read_bytes), (10, 20, 3, 4, 4096));
    let dev = "Inter-|   Receive  |  Transmit\n face |bytes packets errs drop fifo frame compressed multicast|bytes packets errs drop fifo colls carrier compressed\n mmabc:  100 2 0 1 0 0 0 0  300 4 0 5 0 0 0 0\n";
    let taps = parse_net_dev(dev);
    let tap = taps["mmabc"];
    assert_eq!((tap.tx_bytes, tap.tx_packets, tap.tx_dropped), (100, 2, 1));
    assert_eq!((tap.rx_bytes, tap.rx_packets, tap.rx_dropped), (300, 4, 5));
}
