//! `mmctl` against stand-ins that lie: a broker (Cap'n Proto on a unix
//! socket) and a controller (HTTP) that describe microVMs whose names or
//! ids are shell or ssh_config injections. `mmctl ssh` must refuse them,
//! print no config line and run nothing (a fake `ssh` first in `PATH`
//! records whether it was run). And what mmctl itself refuses before
//! asking anyone: `--cpus 0`, and an `--ssh-key` file that is not a key
//! (named, never shown, never sent).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use capnp_rpc::RpcSystem;
use capnp_rpc::rpc_twoparty_capnp::Side;
use mm_protocols::broker_capnp::{broker, vm, vm_info};
use mm_protocols::rpc::vat_network;

const MMCTL: &str = env!("CARGO_BIN_EXE_mmctl");

/// Names and ids a hostile side might send: each would add a config line
/// of its own, or run a command, if written as is.
fn hostile(marker: &Path) -> Vec<String> {
    let m = marker.display();
    vec![
        format!("x\nProxyCommand touch {m}"),
        format!("a;touch {m}"),
        format!("$(touch {m})"),
        format!("'; touch {m}; '"),
        format!("x %p\n    ProxyCommand touch {m}"),
    ]
}

/// A scratch directory: HOME for mmctl, a `bin/ssh` that records being run,
/// and room for markers, sockets and key files.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("mmctl-standins-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        let ssh = dir.join("bin/ssh");
        std::fs::write(&ssh, format!("#!/bin/sh\necho \"$@\" > {}\n", dir.join("ssh-ran").display())).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o755)).unwrap();
        Scratch(dir)
    }

    fn marker(&self) -> PathBuf {
        self.0.join("pwned")
    }

    fn mmctl(&self, args: &[&str]) -> Output {
        let path = format!("{}:{}", self.0.join("bin").display(), std::env::var("PATH").unwrap_or_default());
        Command::new(MMCTL)
            .args(args)
            .env("HOME", &self.0)
            .env("PATH", path)
            .env_remove("MM_SERVER")
            .env_remove("MM_TOKEN")
            .env_remove("MM_BROKER_SOCKET")
            .output()
            .unwrap()
    }

    /// Nothing ran: neither the injected command nor ssh.
    fn assert_nothing_ran(&self) {
        assert!(!self.marker().exists(), "an injected command ran");
        assert!(!self.0.join("ssh-ran").exists(), "ssh was run");
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn text(out: &Output) -> (i32, String, String) {
    let code = out.status.code().unwrap_or(-1);
    (code, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// mmctl refused `value` by name, escaped, and printed no config at all.
fn assert_refused(out: &Output, value: &str) {
    let (code, stdout, stderr) = text(out);
    assert_ne!(code, 0, "accepted {value:?}: {stdout}");
    assert_eq!(stdout, "", "printed a config for {value:?}");
    assert!(stderr.contains(&format!("{value:?}")), "{value:?} not named (escaped): {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(!stderr.contains("\nProxyCommand"), "{stderr}");
}

// ---- a stand-in broker ----------------------------------------------------

/// What the stand-in broker describes; `created` counts createVm calls.
#[derive(Clone, Default)]
struct BrokerWorld {
    vms: Vec<(String, String, String)>,
    created: Arc<AtomicUsize>,
}

struct FakeBroker(BrokerWorld);

struct FakeVm(String, String, String);

fn fill(mut info: vm_info::Builder<'_>, (id, name, ip): (&str, &str, &str)) {
    info.set_id(id);
    info.set_name(name);
    info.set_image("builtin");
    info.set_state("running");
    info.set_cpus(1);
    info.set_memory_mib(256);
    info.set_exit_code(-1);
    info.set_ip(ip);
}

impl broker::Server for FakeBroker {
    async fn create_vm(
        self: Rc<Self>,
        _: broker::CreateVmParams,
        _: broker::CreateVmResults,
    ) -> Result<(), capnp::Error> {
        self.0.created.fetch_add(1, Ordering::SeqCst);
        Err(capnp::Error::failed("internal: the stand-in creates nothing".into()))
    }

    async fn get_vm(
        self: Rc<Self>,
        params: broker::GetVmParams,
        mut results: broker::GetVmResults,
    ) -> Result<(), capnp::Error> {
        let wanted = params.get()?.get_name()?.to_string().unwrap_or_default();
        let Some((id, name, ip)) = self.0.vms.iter().find(|(id, name, _)| *name == wanted || *id == wanted) else {
            return Err(capnp::Error::failed(format!("not-found: no microVM named {wanted:?}")));
        };
        results.get().set_vm(capnp_rpc::new_client(FakeVm(id.clone(), name.clone(), ip.clone())));
        Ok(())
    }

    async fn list_vms(
        self: Rc<Self>,
        _: broker::ListVmsParams,
        mut results: broker::ListVmsResults,
    ) -> Result<(), capnp::Error> {
        let mut list = results.get().init_vms(self.0.vms.len() as u32);
        for (i, (id, name, ip)) in self.0.vms.iter().enumerate() {
            fill(list.reborrow().get(i as u32), (id, name, ip));
        }
        Ok(())
    }
}

impl vm::Server for FakeVm {
    async fn info(self: Rc<Self>, _: vm::InfoParams, mut results: vm::InfoResults) -> Result<(), capnp::Error> {
        fill(results.get().init_info(), (&self.0, &self.1, &self.2));
        Ok(())
    }
}

/// Serves `world` on `socket` from a thread of its own until the test ends.
fn serve_broker(socket: &Path, world: BrokerWorld) {
    let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async move {
            let listener = tokio::net::UnixListener::from_std(listener).unwrap();
            let client: broker::Client = capnp_rpc::new_client(FakeBroker(world));
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let (reader, writer) = stream.into_split();
                let network = vat_network(reader, writer, Side::Server, None);
                let rpc = RpcSystem::new(Box::new(network), Some(client.clone().client));
                tokio::task::spawn_local(rpc);
            }
        });
    });
}

#[test]
fn hostile_names_and_ids_from_a_broker_are_refused() {
    let scratch = Scratch::new("broker");
    for (n, bad) in hostile(&scratch.marker()).into_iter().enumerate() {
        for (id, name) in [("0123456789ab", bad.as_str()), (bad.as_str(), "web")] {
            let socket = scratch.0.join(format!("broker-{n}-{}.sock", id.len()));
            let world = BrokerWorld {
                vms: vec![
                    ("aaaaaaaaaaaa".into(), "fine".into(), "10.100.0.2".into()),
                    (id.into(), name.into(), "10.100.0.3".into()),
                ],
                ..BrokerWorld::default()
            };
            serve_broker(&socket, world);
            let socket = socket.to_str().unwrap();
            assert_refused(&scratch.mmctl(&["--socket", socket, "ssh", "--print-config"]), &bad);
            // Logging in to it, by the name it was given or by the id.
            let by = if name == "web" { "web" } else { id };
            assert_refused(&scratch.mmctl(&["--socket", socket, "ssh", by, "--", "true"]), &bad);
            scratch.assert_nothing_ran();
        }
    }
    // A hostile address is refused too.
    let socket = scratch.0.join("broker-ip.sock");
    let bad_ip = format!("10.0.0.1\nProxyCommand touch {}", scratch.marker().display());
    let world = BrokerWorld { vms: vec![("0123456789ab".into(), "web".into(), bad_ip.clone())], ..Default::default() };
    serve_broker(&socket, world);
    assert_refused(&scratch.mmctl(&["--socket", socket.to_str().unwrap(), "ssh", "--print-config"]), &bad_ip);

    // An honest broker: one block per microVM, and ssh is run.
    let socket = scratch.0.join("broker-ok.sock");
    let world =
        BrokerWorld { vms: vec![("0123456789ab".into(), "web".into(), "10.100.0.2".into())], ..Default::default() };
    serve_broker(&socket, world);
    let socket = socket.to_str().unwrap();
    let (code, config, stderr) = text(&scratch.mmctl(&["--socket", socket, "ssh", "--print-config"]));
    assert_eq!(code, 0, "{stderr}");
    assert!(config.starts_with("Host \"web.mm\"\n    HostName \"10.100.0.2\"\n"), "{config}");
    assert!(config.contains(" proxy '0123456789ab' %p\n"), "{config}");
    let (code, _, stderr) = text(&scratch.mmctl(&["--socket", socket, "ssh", "web", "--", "true"]));
    assert_eq!(code, 0, "{stderr}");
    let ran = std::fs::read_to_string(scratch.0.join("ssh-ran")).unwrap();
    assert!(ran.contains("HostKeyAlias=\"mm-0123456789ab\"") && ran.contains("root@web -- true"), "{ran}");
}

// ---- a stand-in controller ------------------------------------------------

/// What the stand-in controller was asked (request line and body).
type Asked = Arc<Mutex<Vec<String>>>;

fn machine(id: &str, name: &str) -> serde_json::Value {
    serde_json::json!({ "id": id, "name": name, "namespace": "default", "state": "started", "host": "h1",
        "config": { "image": "alpine", "guest": { "cpus": 1, "memory_mb": 256 } },
        "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z" })
}

/// Answers every request with `machines` (a list, or one machine for a
/// GET by id; 500 for anything else) until the test ends.
fn serve_controller(machines: Vec<serde_json::Value>) -> (String, Asked) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let asked: Asked = Arc::default();
    let log = Arc::clone(&asked);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let request = read_request(&mut stream);
            let line = request.lines().next().unwrap_or_default().to_owned();
            log.lock().unwrap().push(request);
            let by_id = machines.iter().find(|m| {
                let id = m["id"].as_str().unwrap_or_default();
                line.starts_with(&format!("GET /v1/namespaces/default/machines/{id} "))
            });
            let (status, body) = if line.starts_with("GET /v1/namespaces/default/machines?") {
                ("200 OK", serde_json::json!({ "machines": machines }).to_string())
            } else if let Some(m) = by_id {
                ("200 OK", m.to_string())
            } else {
                ("500 Internal Server Error", "{}".to_owned())
            };
            let answer = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes());
        }
    });
    (url, asked)
}

fn read_request(stream: &mut std::net::TcpStream) -> String {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        data.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&data).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if data.len() >= end + 4 + length {
                break;
            }
        }
        if n == 0 {
            break;
        }
    }
    String::from_utf8_lossy(&data).into_owned()
}

#[test]
fn hostile_names_and_ids_from_a_controller_are_refused() {
    let scratch = Scratch::new("controller");
    let good_id = "0e5c2a4e-3b7a-4a43-9a7e-0c1f6a1d2b3c";
    let mut cases = Vec::new();
    for bad in hostile(&scratch.marker()) {
        cases.push((good_id.to_owned(), bad.clone(), bad.clone()));
        cases.push((bad.clone(), "web".to_owned(), bad));
    }
    // What the broker takes but a controller never hands out.
    cases.push((good_id.to_owned(), "Web_1".to_owned(), "Web_1".to_owned()));
    cases.push(("0123456789ab".to_owned(), "web".to_owned(), "0123456789ab".to_owned()));
    for (id, name, bad) in cases {
        let (url, _) = serve_controller(vec![machine(good_id, "fine"), machine(&id, &name)]);
        let out = scratch.mmctl(&["--server", &url, "--token", "t", "ssh", "--print-config"]);
        assert_refused(&out, &bad);
        if name == "web" {
            assert_refused(&scratch.mmctl(&["--server", &url, "--token", "t", "ssh", "web"]), &bad);
        }
        scratch.assert_nothing_ran();
    }
}

// ---- refused before anyone is asked ---------------------------------------

#[test]
fn zero_cpus_are_refused() {
    let scratch = Scratch::new("cpus");
    let socket = scratch.0.join("broker.sock");
    let world = BrokerWorld::default();
    serve_broker(&socket, world.clone());
    let (code, _, stderr) = text(&scratch.mmctl(&["--socket", socket.to_str().unwrap(), "run", "--cpus", "0", "-d"]));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--cpus") && stderr.contains('0'), "{stderr}");
    let (url, asked) = serve_controller(Vec::new());
    let (code, _, stderr) = text(&scratch.mmctl(&["--server", &url, "--token", "t", "run", "--cpus", "0", "-d"]));
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(world.created.load(Ordering::SeqCst), 0);
    assert!(asked.lock().unwrap().is_empty());
}

/// `--ssh-key /etc/shadow`: the file is named, its first line is neither
/// printed nor sent to the broker or the controller.
#[test]
fn a_key_file_that_is_not_a_key_is_named_never_shown() {
    let scratch = Scratch::new("keys");
    let shadow = scratch.0.join("shadow");
    let secret = "root:$6$s3cr3tSalt$hashhashhash:19000:0:99999:7:::";
    std::fs::write(&shadow, format!("{secret}\ndaemon:*:19000:0:99999:7:::\n")).unwrap();
    let key = shadow.to_str().unwrap();

    let socket = scratch.0.join("broker.sock");
    let world = BrokerWorld::default();
    serve_broker(&socket, world.clone());
    let socket = socket.to_str().unwrap();
    let (url, asked) = serve_controller(Vec::new());
    for args in [
        vec!["--socket", socket, "run", "-d", "--ssh-key", key],
        vec!["--socket", socket, "restore", "snap", "--ssh-key", key],
        vec!["--server", &url, "--token", "t", "run", "-d", "--ssh-key", key],
        vec!["--server", &url, "--token", "t", "restore", "snap", "--ssh-key", key],
    ] {
        let (code, stdout, stderr) = text(&scratch.mmctl(&args));
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(key) && stderr.contains("line 1"), "{args:?}: {stderr}");
        for leak in ["s3cr3t", "root", "hash", "daemon"] {
            assert!(!stderr.contains(leak) && !stdout.contains(leak), "{args:?}: {stderr}");
        }
    }
    assert_eq!(world.created.load(Ordering::SeqCst), 0);
    assert!(asked.lock().unwrap().iter().all(|r| !r.contains("s3cr3t")), "sent to the controller");
    assert!(asked.lock().unwrap().is_empty());
}
