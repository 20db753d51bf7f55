//! End to end with everything real: PostgreSQL, the `mm-controller`
//! binary, and two `mm-broker`s (each with its own state directory, socket
//! and microVM network namespace) that dial the controller over mutual TLS
//! with certificates from `scripts/dev-ca.sh`, booting real microVMs.
//!
//! One machine goes through the whole story, so only three microVMs boot
//! (and one is restored): created through REST → started on one broker →
//! exec and logs through the controller → snapshotted, a copy restored
//! from the snapshot beside it and exec'd in, suspended and resumed
//! (`e2e::snapshots`) → its broker is SIGKILLed → after the heartbeat timeout
//! the machine is re-placed on the other broker and started there → exec
//! again (the streaming forms too: a WebSocket exec with stdin, stderr
//! and an exit code, a killed exec when its client goes away, the console
//! followed while new output arrives, and `mmctl --server exec`/`logs -f`;
//! then the same through a second controller on the database, which no
//! broker dials and which forwards to the first)
//! → the killed broker comes back and the controller removes the
//! orphaned microVM it still had → its host is drained: the machine is
//! stopped there, moved back and started (exec answers), the drained
//! broker's microVM is removed, the host is `drained`, then uncordoned →
//! delete → destroyed (a log follow open meanwhile ends), and the microVM
//! is gone from the broker.
//!
//! The refusals (a certificate from another CA, a host name that is not
//! the certificate's) need no KVM and run on their own.

mod e2e;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mm_integration::broker::TestBroker;
use mm_integration::devices::Scratch;
use reqwest::StatusCode;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_mm-controller");
/// Boots take ~45 s on a slow machine; re-placement adds the timeout.
pub const BOOT: Duration = Duration::from_secs(300);
const HEARTBEAT_TIMEOUT_SECONDS: u64 = 5;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `scripts/dev-ca.sh DIR NAMES...`
fn dev_ca(dir: &Path, names: &[&str]) {
    let script = mm_integration::repo_root().join("scripts/dev-ca.sh");
    let out = Command::new("bash").arg(script).arg(dir).args(names).output().unwrap();
    assert!(out.status.success(), "dev-ca.sh: {}", String::from_utf8_lossy(&out.stderr));
}

/// The controller binary on a fresh database, serving HTTP and brokers.
pub struct ControllerProcess {
    child: Child,
    database_url: String,
    log: PathBuf,
    base: String,
    broker_addr: String,
    client: reqwest::Client,
    token: String,
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl ControllerProcess {
    async fn start(scratch: &Scratch, certs: &Path) -> ControllerProcess {
        let url = tokio::task::spawn_blocking(support::pg::fresh_database).await.unwrap();
        let brokers = free_port();
        let mut args = vec!["--broker-listen".to_owned(), format!("127.0.0.1:{brokers}")];
        for (flag, file) in [("--tls-cert", "controller.pem"), ("--tls-key", "controller.key"), ("--tls-ca", "ca.pem")]
        {
            args.extend([flag.to_owned(), certs.join(file).to_str().unwrap().to_owned()]);
        }
        let mut controller = Self::spawn(scratch, "controller.log", url, &args).await;
        controller.broker_addr = format!("127.0.0.1:{brokers}");
        controller
    }

    /// Another controller on the same database that no broker dials: it
    /// forwards exec and logs to this one (which advertises the URL its
    /// `--listen` implies).
    async fn peer(&self, scratch: &Scratch) -> ControllerProcess {
        Self::spawn(scratch, "peer.log", self.database_url.clone(), &[]).await
    }

    async fn spawn(scratch: &Scratch, log_name: &str, url: String, args: &[String]) -> ControllerProcess {
        let http = free_port();
        let log = scratch.path(log_name);
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(BIN)
            .args(["--database-url", &url, "--listen", &format!("127.0.0.1:{http}")])
            .args(args)
            .args(["--heartbeat-timeout", &HEARTBEAT_TIMEOUT_SECONDS.to_string()])
            .env("MM_JWT_HS256_SECRET", std::str::from_utf8(support::SECRET).unwrap())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let controller = ControllerProcess {
            child,
            database_url: url,
            log,
            base: format!("http://127.0.0.1:{http}"),
            broker_addr: String::new(),
            client: reqwest::Client::new(),
            token: support::cluster_admin(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while controller.client.get(format!("{}/v1/openapi.json", controller.base)).send().await.is_err() {
            assert!(Instant::now() < deadline, "the controller did not serve; log:\n{}", controller.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        controller
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = self.client.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// Polls `GET path` until `done` holds, failing after `timeout`.
    async fn poll(&self, path: &str, timeout: Duration, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, body) = self.get(path).await;
            if status == StatusCode::OK && done(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: still {status} {body:#} after {timeout:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// A broker dialling this controller with `cert`/`key` from `certs`.
    fn broker(&self, name: &str, certs: &Path, cert: &str, extra: &[&str]) -> TestBroker {
        let file = |ext: &str| certs.join(format!("{cert}.{ext}")).to_str().unwrap().to_owned();
        let ca = certs.join("ca.pem").to_str().unwrap().to_owned();
        let (pem, key) = (file("pem"), file("key"));
        let mut args = vec!["--controller", &self.broker_addr, "--tls-cert", &pem, "--tls-key", &key, "--tls-ca", &ca];
        args.extend(["--offer-cpus", "2", "--offer-memory-mib", "4096"]);
        args.extend_from_slice(extra);
        TestBroker::start(name, &args).unwrap()
    }
}

/// The VM names a broker has (`mmctl ps`).
fn vm_names(broker: &TestBroker) -> Vec<String> {
    let run = broker.mmctl(&["ps", "-o", "json"], Duration::from_secs(30)).unwrap();
    assert_eq!(run.status, Some(0), "mmctl ps: {}", run.stderr);
    let vms: Value = serde_json::from_str(&run.stdout).unwrap();
    vms.as_array().unwrap().iter().map(|vm| vm["name"].as_str().unwrap().to_owned()).collect()
}

/// Exec through the controller, retried only while the guest is still
/// booting: a 409 `invalid-state` (the broker cannot reach the guest's agent
/// yet, or the machine is not started yet). Anything else -- a 502 from a
/// broker or link error above all -- fails at once rather than being
/// retried into a pass.
pub async fn exec_when_ready(c: &ControllerProcess, machine: &str, command: &[&str]) -> Value {
    let deadline = Instant::now() + BOOT;
    loop {
        let (status, body) = c.post(&format!("{machine}/exec"), json!({ "command": command, "timeout": 60 })).await;
        if status == StatusCode::OK {
            return body;
        }
        let booting =
            status == StatusCode::CONFLICT && body["type"].as_str().is_some_and(|t| t.ends_with("invalid-state"));
        assert!(booting, "exec failed with something other than a booting guest: {status} {body:#}; log:\n{}", c.log());
        assert!(Instant::now() < deadline, "exec never worked: {body:#}; log:\n{}", c.log());
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Drains the host the machine runs on (`brokers[from]`'s): the machine is
/// stopped there, moved to `brokers[to]`'s host and started there (a fresh
/// boot), exec answers, its microVM is gone from the drained host's broker,
/// which is listed `drained`; uncordon puts the host back. Returns `to`.
async fn drain_moves_a_running_machine(
    c: &ControllerProcess,
    brokers: &[TestBroker; 2],
    path: &str,
    id: &str,
    from: usize,
    to: usize,
) -> usize {
    let (_, machine) = c.get(path).await;
    let host = machine["host"].as_str().unwrap().to_owned();
    assert!(vm_names(&brokers[from]).contains(&id.to_owned()), "{machine:#}");
    let (status, drained) = c.post(&format!("/v1/hosts/{host}/drain"), json!(null)).await;
    assert_eq!((status, drained["status"].as_str()), (StatusCode::OK, Some("draining")), "{drained:#}");
    let moved = c
        .poll(path, BOOT, "drained onto the other host and started", |m| {
            m["state"] == "started" && m["host"].as_str() != Some(host.as_str())
        })
        .await;
    let new_host = moved["host"].as_str().unwrap().to_owned();
    let (_, events) = c.get(&format!("{path}/events")).await;
    let events: Vec<(&str, &str)> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["state"].as_str().unwrap(), e["reason"].as_str().unwrap()))
        .collect();
    let drain = events
        .iter()
        .position(|(_, reason)| reason.starts_with(&format!("host {host} is draining: stopping")))
        .unwrap_or_else(|| panic!("no drain stop: {events:#?}"));
    let states: Vec<&str> = events[drain..].iter().map(|(state, _)| *state).collect();
    assert_eq!(states, ["stopping", "stopped", "starting", "started"], "{events:#?}");
    assert_eq!(events[drain + 2].1, format!("moved from host {host} to host {new_host}: drain"), "{events:#?}");
    assert!(vm_names(&brokers[to]).contains(&id.to_owned()));
    let out = exec_when_ready(c, path, &["sh", "-c", "echo moved"]).await;
    assert_eq!((out["exit_code"].as_i64(), out["stdout"].as_str()), (Some(0), Some("moved\n")), "{out:#}");

    // The drained host's broker no longer has the microVM.
    let deadline = Instant::now() + Duration::from_secs(120);
    while vm_names(&brokers[from]).contains(&id.to_owned()) {
        assert!(Instant::now() < deadline, "the drained host kept the microVM; log:\n{}", c.log());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    c.poll(&format!("/v1/hosts/{host}"), Duration::from_secs(30), "the host is drained", |h| h["status"] == "drained")
        .await;
    let (status, back) = c.post(&format!("/v1/hosts/{host}/uncordon"), json!(null)).await;
    assert_eq!((status, back["status"].as_str()), (StatusCode::OK, Some("ready")), "{back:#}");
    to
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// `GET {machine}/exec/ws` upgraded, with the request sent.
async fn exec_socket(c: &ControllerProcess, machine: &str, command: &[&str]) -> Socket {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!("{}{machine}/exec/ws", c.base.replacen("http://", "ws://", 1));
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {}", c.token).parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.expect("the exec WebSocket");
    let first = json!({ "command": command }).to_string();
    socket.send(tokio_tungstenite::tungstenite::Message::text(first)).await.unwrap();
    socket
}

fn frame(channel: u8, data: &[u8]) -> tokio_tungstenite::tungstenite::Message {
    tokio_tungstenite::tungstenite::Message::binary([&[channel][..], data].concat())
}

/// What an exec's WebSocket carried, as far as it was read.
#[derive(Debug, Default)]
struct Streamed {
    stdout: String,
    stderr: String,
    status: Option<Value>,
    close: Option<u16>,
}

impl Streamed {
    /// Reads until `done` holds or the socket closes (30 s at most).
    async fn read_until(&mut self, socket: &mut Socket, done: impl Fn(&Streamed) -> bool) {
        use futures::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !done(self) && self.close.is_none() {
            let message = tokio::time::timeout_at(deadline, socket.next()).await;
            match message.unwrap_or_else(|_| panic!("timed out; so far {self:?}")) {
                Some(Ok(Message::Binary(data))) => match data[0] {
                    1 => self.stdout.push_str(&String::from_utf8_lossy(&data[1..])),
                    2 => self.stderr.push_str(&String::from_utf8_lossy(&data[1..])),
                    3 => self.status = Some(serde_json::from_slice(&data[1..]).unwrap()),
                    other => panic!("channel {other} from the controller"),
                },
                Some(Ok(Message::Close(frame))) => self.close = Some(frame.map_or(1005, |f| u16::from(f.code))),
                Some(Ok(_)) => {}
                other => panic!("{other:?}; so far {self:?}"),
            }
        }
    }
}

/// A WebSocket exec streams: the first line arrives while the command
/// waits for stdin, stdin reaches it, stderr comes separately, the exit
/// code last. Closing stdin ends a `cat`; a client that goes away has its
/// command killed.
async fn streaming_exec(c: &ControllerProcess, machine: &str) {
    use futures::SinkExt;
    let script = "echo first; read x; echo got:$x; echo to-stderr >&2; exit 4";
    let mut socket = exec_socket(c, machine, &["sh", "-c", script]).await;
    let mut seen = Streamed::default();
    seen.read_until(&mut socket, |s| s.stdout.contains("first\n")).await;
    assert_eq!((seen.stdout.as_str(), &seen.status), ("first\n", &None), "streamed before any stdin");
    socket.send(frame(0, b"over-the-socket\n")).await.unwrap();
    seen.read_until(&mut socket, |_| false).await;
    assert_eq!(seen.stdout, "first\ngot:over-the-socket\n", "{seen:?}");
    assert_eq!(seen.stderr, "to-stderr\n", "{seen:?}");
    assert_eq!(seen.status, Some(json!({ "exit_code": 4 })), "{seen:?}");
    assert_eq!(seen.close, Some(1000), "{seen:?}");

    let mut socket = exec_socket(c, machine, &["cat"]).await;
    socket.send(frame(0, b"abc")).await.unwrap();
    socket.send(frame(5, b"")).await.unwrap();
    let mut seen = Streamed::default();
    seen.read_until(&mut socket, |_| false).await;
    assert_eq!((seen.stdout.as_str(), seen.status.clone()), ("abc", Some(json!({ "exit_code": 0 }))), "{seen:?}");

    // Gone mid-command: the command goes too.
    let script = "echo $$ > /tmp/ws-exec.pid; echo ready; exec sleep 600";
    let mut socket = exec_socket(c, machine, &["sh", "-c", script]).await;
    let mut seen = Streamed::default();
    seen.read_until(&mut socket, |s| s.stdout.contains("ready")).await;
    drop(socket);
    let check = ["sh", "-c", "kill -0 $(cat /tmp/ws-exec.pid) 2>/dev/null && echo alive || echo gone"];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = exec_when_ready(c, machine, &check).await;
        if out["stdout"] == "gone\n" {
            break;
        }
        assert!(Instant::now() < deadline, "the abandoned exec still runs: {out:#}; log:\n{}", c.log());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Reads a streamed body into `seen` until it contains `needle` (30 s).
async fn read_until(response: &mut reqwest::Response, seen: &mut String, needle: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !seen.contains(needle) {
        let chunk = tokio::time::timeout_at(deadline, response.chunk()).await;
        let chunk = chunk.unwrap_or_else(|_| panic!("{needle:?} never came; so far:\n{seen}"));
        match chunk.unwrap() {
            Some(chunk) => seen.push_str(&String::from_utf8_lossy(&chunk)),
            None => panic!("the follow ended before {needle:?}; so far:\n{seen}"),
        }
    }
}

/// `logs?follow=true` sends the console so far, then what the guest writes
/// to it while the request is open.
async fn following_logs(c: &ControllerProcess, machine: &str) {
    let url = format!("{}{machine}/logs?follow=true", c.base);
    let mut response = c.client.get(url).bearer_auth(&c.token).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/plain; charset=utf-8");
    let mut seen = String::new();
    read_until(&mut response, &mut seen, "hello-from-the-machine").await;
    let marker = format!("marker-{}", std::process::id());
    let out = exec_when_ready(c, machine, &["sh", "-c", &format!("echo {marker} > /dev/console")]).await;
    assert_eq!(out["exit_code"], 0, "{out:#}");
    read_until(&mut response, &mut seen, &marker).await;
    // Dropping the response here ends the follow (the controller drops
    // its broker call); the machine goes on.
}

/// `logs?follow=true`, open (read by `follow_ends`).
async fn open_follow(c: &ControllerProcess, machine: &str) -> reqwest::Response {
    let response = c.client.get(format!("{}{machine}/logs?follow=true", c.base)).bearer_auth(&c.token).send().await;
    let response = response.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response
}

/// A follow ends by itself, cleanly (not cut off), once its microVM is gone.
async fn follow_ends(mut response: reqwest::Response) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout_at(deadline, response.chunk()).await {
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => return,
            Ok(Err(e)) => panic!("the follow broke off instead of ending: {e}"),
            Err(_) => panic!("still following 60 s after the microVM is gone"),
        }
    }
}

/// Through a controller the machine's broker did not dial (it forwards to
/// the one it did): exec, a log follow seeing new output, and the
/// WebSocket exec with stdin, stderr, exit code and a dropped client.
async fn through_another_controller(peer: &ControllerProcess, machine: &str) {
    let out = exec_when_ready(peer, machine, &["sh", "-c", "echo via-peer; exit 6"]).await;
    assert_eq!((out["exit_code"].as_i64(), out["stdout"].as_str()), (Some(6), Some("via-peer\n")), "{out:#}");
    following_logs(peer, machine).await;
    streaming_exec(peer, machine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machines_run_on_real_brokers_and_survive_losing_one() {
    if !mm_integration::kvm_available("machines_run_on_real_brokers_and_survive_losing_one") {
        return;
    }
    let scratch = Scratch::new("e2e-brokers").unwrap();
    let certs = scratch.path("ca");
    dev_ca(&certs, &["h1", "h2"]);
    let c = ControllerProcess::start(&scratch, &certs).await;
    let mut brokers = [c.broker("e2e-h1", &certs, "h1", &[]), c.broker("e2e-h2", &certs, "h2", &[])];

    c.poll("/v1/hosts", Duration::from_secs(60), "both brokers registered", |b| {
        b["hosts"].as_array().unwrap().iter().filter(|h| h["status"] == "ready").count() == 2
    })
    .await;
    let (status, body) = c.post("/v1/namespaces", json!({ "name": "e2e" })).await;
    assert_eq!(status, StatusCode::CREATED, "{body:#}");

    // Create: placed, launched, started.
    let key = mm_integration::ssh_keygen(&scratch, "e2e-key").unwrap();
    let public_key = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let spec = json!({ "name": "web", "config": { "image": "builtin", "guest": { "cpus": 1, "memory_mb": 256 },
        // An echo server on port 7000 for the port tunnel.
        "command": ["sh", "-c", "nc -ll -p 7000 -e cat & echo hello-from-the-machine; while true; do sleep 5; done"],
        "env": { "GREETING": "bonjour" }, "ssh_keys": [public_key.trim()] } });
    let (status, machine) = c.post("/v1/namespaces/e2e/machines", spec).await;
    assert_eq!(status, StatusCode::CREATED, "{machine:#}");
    let id = machine["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/namespaces/e2e/machines/{id}");
    let (status, started) = c.get(&format!("{path}/wait?state=started&timeout=120")).await;
    assert_eq!(status, StatusCode::OK, "{started:#}; log:\n{}", c.log());
    let first = started["host"].as_str().unwrap().to_owned();
    let (mine, other) = if first == "h1" { (0, 1) } else { (1, 0) };
    assert!(vm_names(&brokers[mine]).contains(&id), "the microVM is named after the machine");

    // Exec and logs through controller → broker → guest.
    let out = exec_when_ready(&c, &path, &["sh", "-c", "echo $((6 * 7)) $GREETING; echo oops >&2; exit 3"]).await;
    assert_eq!(out["exit_code"], 3, "{out:#}");
    assert_eq!(out["stderr"], "oops\n", "{out:#}");
    assert!(out["stdout"].as_str().unwrap().starts_with("42"), "{out:#}");
    c.poll(&format!("{path}/logs"), Duration::from_secs(60), "the console log", |log| {
        log.as_str().is_some_and(|l| l.contains("hello-from-the-machine"))
    })
    .await;
    // The same, streamed: a WebSocket exec, the log follow, and mmctl
    // --server riding on both (no extra microVM).
    streaming_exec(&c, &path).await;
    following_logs(&c, &path).await;
    e2e::mmctl::through_the_controller(&c.base, &c.token, "web", &key, &scratch.path("home")).await;
    let peer = c.peer(&scratch).await;
    through_another_controller(&peer, &path).await;
    // Snapshot it, restore a copy beside it (exec there), suspend and
    // resume it (exec again).
    e2e::snapshots::snapshot_restore_and_suspend(&c, &brokers[mine], &path, &first).await;

    // Lose the broker: the machine is re-placed and started on the other.
    let pid = brokers[mine].pid().unwrap();
    // SAFETY: kill(2) on the broker process this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let moved = c
        .poll(&path, BOOT, "re-placed and started on the other host", |m| {
            m["state"] == "started" && m["host"].as_str() != Some(first.as_str())
        })
        .await;
    let (_, events) = c.get(&format!("{path}/events")).await;
    let reasons: Vec<&str> =
        events["events"].as_array().unwrap().iter().map(|e| e["reason"].as_str().unwrap()).collect();
    assert!(reasons.iter().any(|r| r.contains(&format!("host {first} lost"))), "{reasons:#?}");
    let (_, hosts) = c.get(&format!("/v1/hosts/{first}")).await;
    assert_eq!(hosts["status"], "lost", "{hosts:#}");
    assert!(vm_names(&brokers[other]).contains(&id));
    let out = exec_when_ready(&c, &path, &["hostname"]).await;
    assert_eq!(out["exit_code"], 0, "{out:#}; moved: {moved:#}");

    // The lost broker comes back (its microVM still ran): the controller
    // removes the orphan, since the machine now lives elsewhere.
    brokers[mine].restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while vm_names(&brokers[mine]).contains(&id) {
        assert!(Instant::now() < deadline, "the orphaned microVM stayed; log:\n{}", c.log());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    c.poll(&format!("/v1/hosts/{first}"), Duration::from_secs(30), "the host is back", |h| h["status"] == "ready")
        .await;
    let now = drain_moves_a_running_machine(&c, &brokers, &path, &id, other, mine).await;

    // Delete: destroying → destroyed, and the microVM is gone (a log
    // follow open meanwhile ends with it).
    let follow = open_follow(&c, &path).await;
    let (status, body) = c.call(reqwest::Method::DELETE, &format!("{path}?force=true"), None).await;
    assert_eq!(status, StatusCode::OK, "{body:#}");
    let (status, body) = c.get(&format!("{path}/wait?state=destroyed&timeout=120")).await;
    assert_eq!(status, StatusCode::OK, "{body:#}; log:\n{}", c.log());
    assert!(!vm_names(&brokers[now]).contains(&id));
    follow_ends(follow).await;
    let (status, _) = c.post(&format!("{path}/exec"), json!({ "command": ["true"] })).await;
    assert_eq!(status, StatusCode::CONFLICT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_without_the_right_certificate_are_refused() {
    let scratch = Scratch::new("e2e-refused").unwrap();
    let (certs, rogue) = (scratch.path("ca"), scratch.path("rogue"));
    dev_ca(&certs, &["h1"]);
    dev_ca(&rogue, &["h1"]);
    let c = ControllerProcess::start(&scratch, &certs).await;

    // A client certificate signed by another CA (the broker itself trusts
    // the controller, so it is the controller that refuses).
    std::fs::copy(certs.join("ca.pem"), rogue.join("ca.pem")).unwrap();
    let stranger = c.broker("e2e-rogue", &rogue, "h1", &[]);
    // A good certificate, but claiming to be another host.
    let impostor = c.broker("e2e-impostor", &certs, "h1", &["--host-name", "h9"]);

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = c.log();
        let refused_tls = log.contains("refused a broker connection");
        let refused_name = impostor.log().contains("the certificate is for host");
        if refused_tls && refused_name {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not refused; controller log:\n{log}\nstranger:\n{}\nimpostor:\n{}",
            stranger.log(),
            impostor.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, hosts) = c.get("/v1/hosts").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(hosts["hosts"], json!([]), "nothing registered");
}
