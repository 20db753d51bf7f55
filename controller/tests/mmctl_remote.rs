//! `mmctl --server`: the admin CLI against the real `mm-controller` binary on
//! a real PostgreSQL (`support::pg`), each a process of its own, as an admin
//! would run them. No broker exists here, so the test plays one through the
//! stand-in endpoints: it registers a host (placement needs one) and
//! reports `started`/`stopped` while `mmctl` waits.
//!
//! It lives with the controller's tests to reuse their throw-away cluster;
//! `mmctl` is the workspace binary beside this test's (`cargo build
//! --workspace --bins` first, as scripts/test.sh does).

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

const CONTROLLER: &str = env!("CARGO_BIN_EXE_mm-controller");

fn secret() -> &'static str {
    std::str::from_utf8(support::SECRET).unwrap()
}

/// A token from `mm-controller mint-token`, the documented way in.
fn mint(args: &[&str]) -> String {
    let out =
        Command::new(CONTROLLER).arg("mint-token").args(args).env("MM_JWT_HS256_SECRET", secret()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// An `mm-controller` process on 127.0.0.1; killed (by its pid) when dropped.
struct Controller {
    child: Child,
    base: String,
    http: reqwest::Client,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Controller {
    async fn start(extra: &[&str]) -> Controller {
        let url = tokio::task::spawn_blocking(support::pg::fresh_database).await.unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(CONTROLLER)
            .args(["--database-url", &url, "--listen", &format!("127.0.0.1:{port}")])
            .args(extra)
            .env("MM_JWT_HS256_SECRET", secret())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut controller =
            Controller { child, base: format!("http://127.0.0.1:{port}"), http: reqwest::Client::new() };
        let deadline = Instant::now() + Duration::from_secs(30);
        while controller.http.get(format!("{}/v1/openapi.json", controller.base)).send().await.is_err() {
            assert!(controller.child.try_wait().unwrap().is_none(), "mm-controller exited early");
            assert!(Instant::now() < deadline, "mm-controller did not start serving");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        controller
    }

    async fn call(&self, method: reqwest::Method, path: &str, token: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, token: &str, body: Value) -> Value {
        let (status, body) = self.call(reqwest::Method::POST, path, token, Some(body)).await;
        assert!(status.is_success(), "POST {path}: {status} {body:#}");
        body
    }

    async fn machines(&self, token: &str, ns: &str) -> Vec<Value> {
        let (status, body) =
            self.call(reqwest::Method::GET, &format!("/v1/namespaces/{ns}/machines"), token, None).await;
        assert_eq!(status, StatusCode::OK, "{body:#}");
        body["machines"].as_array().unwrap().clone()
    }

    /// What a broker on `host` would report.
    async fn report(&self, admin: &str, host: &str, id: &str, state: &str) {
        self.post(&format!("/v1/hosts/{host}/machines/{id}/state"), admin, json!({ "state": state })).await;
    }

    /// `mmctl --server BASE ARGS` with `token` in `$MM_TOKEN`, as the
    /// README recommends (the flag would show in the process list).
    fn mmctl(&self, token: &str, args: &[&str]) -> Command {
        let mut command = Command::new(support::mmctl_binary());
        command.arg("--server").arg(&self.base).args(args);
        command.env("MM_TOKEN", token).env_remove("MM_SERVER").env_remove("MM_NAMESPACE");
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        command
    }
}

#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn finish(child: Child) -> Out {
    let out = child.wait_with_output().unwrap();
    Out {
        code: out.status.code().expect("mmctl exited, not killed"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn run(mut command: Command) -> Out {
    finish(command.spawn().unwrap())
}

/// Asserts mmctl failed with `code` and said why in one line.
#[track_caller]
fn refused(out: &Out, code: i32, needle: &str) {
    assert_eq!(out.code, code, "{out:?}");
    assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
    assert!(out.stderr.starts_with("mmctl: ") && out.stderr.contains(needle), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mmctl_through_the_controller() {
    let c = Controller::start(&["--rate-limit-per-second", "10000", "--rate-limit-burst", "10000"]).await;
    let admin = mint(&["--subject", "root", "--cluster-admin"]);
    let operator = mint(&["--subject", "ops", "--role", "web=operator"]);
    let viewer = mint(&["--subject", "eve", "--role", "web=viewer"]);
    c.post("/v1/namespaces", &admin, json!({ "name": "web" })).await;
    let host = json!({ "name": "h1", "address": "h1.test:7000", "cpus": 8, "memory_mb": 8192 });
    c.post("/v1/hosts", &admin, host).await;

    // Created and placed, not waited for.
    let out = run(c.mmctl(&operator, &["-n", "web", "run", "--no-wait", "--name", "first", "-e", "A=1", "alpine"]));
    assert_eq!(out.code, 0, "{out:?}");
    let first = out.stdout.trim().to_owned();
    assert!(uuid::Uuid::parse_str(&first).is_ok(), "{out:?}");

    // -d returns once a broker (here: the test) reports it started.
    let mut command =
        c.mmctl(&operator, &["-n", "web", "run", "-d", "--name", "second", "--cpus", "2", "--memory", "1G"]);
    let child = command.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let second = loop {
        let found = c.machines(&admin, "web").await.into_iter().find(|m| m["name"] == "second");
        if let Some(m) = found {
            break m["id"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "mmctl run -d created nothing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Let mmctl reach the wait endpoint before the report (either order works).
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.report(&admin, "h1", &second, "started").await;
    let out = tokio::task::spawn_blocking(move || finish(child)).await.unwrap();
    assert_eq!((out.code, out.stdout.trim()), (0, second.as_str()), "{out:?}");

    // ps: every machine, as JSON and as a table.
    let out = run(c.mmctl(&viewer, &["--namespace", "web", "ps", "-o", "json"]));
    assert_eq!(out.code, 0, "{out:?}");
    let listed: Vec<Value> = serde_json::from_str(&out.stdout).unwrap();
    let states: Vec<_> = listed.iter().map(|m| (m["name"].as_str().unwrap(), m["state"].as_str().unwrap())).collect();
    assert_eq!(states, [("first", "created"), ("second", "started")]);
    assert_eq!(listed[1]["config"]["guest"], json!({ "cpus": 2, "memory_mb": 1024 }));
    assert_eq!(listed[0]["config"]["env"], json!({ "A": "1" }));
    let out = run(c.mmctl(&viewer, &["--namespace", "web", "ps"]));
    assert_eq!(out.stdout.lines().count(), 3, "{out:?}");
    assert!(out.stdout.lines().next().unwrap().starts_with("ID "), "{out:?}");

    // inspect by name and by id; MM_NAMESPACE works like --namespace.
    let mut command = c.mmctl(&viewer, &["inspect", "second", "-o", "json"]);
    let out = run({
        command.env("MM_NAMESPACE", "web");
        command
    });
    assert_eq!(out.code, 0, "{out:?}");
    let machine: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!((machine["id"].as_str(), machine["host"].as_str()), (Some(second.as_str()), Some("h1")));
    let out = run(c.mmctl(&viewer, &["-n", "web", "inspect", &first]));
    assert!(out.stdout.contains("state:     created") && out.stdout.contains("name:      first"), "{out:?}");

    // A viewer may look, not touch; a wrong token gets nowhere.
    let out = run(c.mmctl(&viewer, &["-n", "web", "rm", "-f", "second"]));
    refused(&out, 7, "not allowed");
    let out = run(c.mmctl("not-a-token", &["-n", "web", "ps"]));
    refused(&out, 7, "not authorized");
    let forged = format!("{}x", &operator[..operator.len() - 1]);
    refused(&run(c.mmctl(&forged, &["-n", "web", "ps"])), 7, "not authorized");

    // Unknown machines (by name, by id) and someone else's namespace are 3.
    refused(&run(c.mmctl(&operator, &["-n", "web", "inspect", "nosuch"])), 3, "no machine named \"nosuch\"");
    let random = uuid::Uuid::new_v4().to_string();
    refused(&run(c.mmctl(&operator, &["-n", "web", "stop", &random])), 3, "not found");
    refused(&run(c.mmctl(&operator, &["-n", "other", "ps"])), 3, "not found");

    // stop asks; the broker reports; rm needs it stopped (or -f).
    let out = run(c.mmctl(&operator, &["-n", "web", "stop", "second"]));
    assert_eq!((out.code, out.stdout.trim()), (0, "second"), "{out:?}");
    refused(&run(c.mmctl(&operator, &["-n", "web", "rm", "second"])), 4, "stop it first");
    c.report(&admin, "h1", &second, "stopped").await;
    let out = run(c.mmctl(&operator, &["-n", "web", "rm", "second", "-o", "json"]));
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(serde_json::from_str::<Value>(&out.stdout).unwrap()["state"], "destroying");
    let out = run(c.mmctl(&operator, &["-n", "web", "rm", &first]));
    assert_eq!((out.code, out.stdout.trim()), (0, first.as_str()), "{out:?}");
    let left: Vec<_> = c.machines(&admin, "web").await.into_iter().map(|m| m["state"].clone()).collect();
    assert_eq!(left, [json!("destroying")]);

    // Bad input is 2, before or at the controller.
    refused(&run(c.mmctl(&operator, &["-n", "web", "run", "--no-wait", "--name", "Bad_Name"])), 2, "name");
    let out = run(c.mmctl(&operator, &["-n", "web", "run", "--no-wait", "--memory", "8M"]));
    refused(&out, 2, "memory_mb");
    // More than any host has: no room, like a broker short of memory.
    refused(&run(c.mmctl(&operator, &["-n", "web", "run", "--no-wait", "--cpus", "64"])), 5, "CPU");

    // exec and logs: through the controller once it offers them; until
    // then a clear refusal with its own exit code.
    let (_, doc) = c.call(reqwest::Method::GET, "/v1/openapi.json", &admin, None).await;
    let started = c.post("/v1/namespaces/web/machines", &operator, support::spec("third")).await;
    let third = started["id"].as_str().unwrap().to_owned();
    c.report(&admin, "h1", &third, "started").await;
    // Offered, they need the machine's broker, which this controller
    // (without --broker-listen) never has: 6, as for an absent broker.
    let offered =
        |verb: &str| doc["paths"].get(format!("/v1/namespaces/{{namespace}}/machines/{{id}}/{verb}")).is_some();
    let out = run(c.mmctl(&operator, &["-n", "web", "exec", "third", "--", "true"]));
    if offered("exec") {
        refused(&out, 6, "broker");
    } else {
        refused(&out, 8, "does not offer exec");
    }
    let out = run(c.mmctl(&operator, &["-n", "web", "logs", "third"]));
    if offered("logs") {
        refused(&out, 6, "broker");
    } else {
        refused(&out, 8, "does not offer logs");
    }
    // The streaming forms say the same (the WebSocket exec after its
    // upgrade, as a status frame and close code 4503).
    refused(&run(c.mmctl(&operator, &["-n", "web", "logs", "-f", "third"])), 6, "broker");
    refused(&run(c.mmctl(&operator, &["-n", "web", "exec", "-t", "third", "--", "sh"])), 6, "broker");
    refused(&run(c.mmctl(&operator, &["-n", "web", "exec", "-i", "third", "--", "cat"])), 6, "broker");
    refused(&run(c.mmctl(&viewer, &["-n", "web", "exec", "third", "--", "true"])), 7, "not allowed");
    refused(&run(c.mmctl(&operator, &["-n", "web", "exec", "nosuch", "--", "true"])), 3, "nosuch");
    // The port tunnel, stats and audit need no broker to be refused.
    refused(&run(c.mmctl(&operator, &["-n", "web", "proxy", "third", "22"])), 6, "broker session");
    refused(&run(c.mmctl(&viewer, &["-n", "web", "proxy", "third", "22"])), 7, "not allowed");
    refused(&run(c.mmctl(&operator, &["-n", "web", "stats", "third"])), 6, "broker session");
    let audit = run(c.mmctl(&viewer, &["-n", "web", "audit", "third"]));
    assert_eq!(audit.code, 0, "{audit:?}");
    let states: Vec<Value> = audit.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(states.iter().map(|e| e["state"].as_str().unwrap()).collect::<Vec<_>>(), ["created", "started"]);

    // `events` follows the namespace from now on, one JSON line each.
    let mut follower = c.mmctl(&viewer, &["-n", "web", "-o", "json", "events"]).spawn().unwrap();
    let stdout = follower.stdout.take().unwrap();
    let lines = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout).lines().map_while(Result::ok).find(|l| l.contains("\"watched-"))
    });
    // A machine made before mmctl's first poll fixed its cursor is history,
    // not news: make one each second until one is reported.
    let deadline = Instant::now() + Duration::from_secs(30);
    for round in 0.. {
        if lines.is_finished() {
            break;
        }
        assert!(Instant::now() < deadline, "mmctl events printed nothing about the new machines");
        c.post("/v1/namespaces/web/machines", &operator, support::spec(&format!("watched-{round}"))).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let line: Value = serde_json::from_str(&lines.join().unwrap().expect("a line")).unwrap();
    assert!(line["machine_name"].as_str().unwrap().starts_with("watched-"), "{line:#}");
    assert_eq!(line["state"], "created", "{line:#}");
    // SAFETY: kill(2) on the mmctl child this test started, not yet reaped.
    unsafe { libc::kill(follower.id() as i32, libc::SIGKILL) };
    let _ = follower.wait();

    // No token, or no controller, says so.
    let mut command = c.mmctl("", &["-n", "web", "ps"]);
    command.env_remove("MM_TOKEN");
    refused(&run(command), 7, "needs a token");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut command = Command::new(support::mmctl_binary());
    command.args(["--server", &format!("http://127.0.0.1:{port}"), "ps"]).env("MM_TOKEN", &operator);
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    refused(&run(command), 6, "cannot reach mm-controller");
}

/// Over the per-token rate limit, mmctl waits as `Retry-After` says and
/// tries again instead of failing a script's burst of calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_calls_are_retried() {
    let c = Controller::start(&["--rate-limit-per-second", "1", "--rate-limit-burst", "1"]).await;
    let admin = mint(&["--subject", "root", "--cluster-admin"]);
    let (status, _) = c.call(reqwest::Method::POST, "/v1/namespaces", &admin, Some(json!({ "name": "web" }))).await;
    assert_eq!(status, StatusCode::CREATED);
    let viewer = mint(&["--subject", "eve", "--role", "web=viewer"]);
    let started = Instant::now();
    for _ in 0..3 {
        let out = run(c.mmctl(&viewer, &["-n", "web", "ps", "-o", "json"]));
        assert_eq!((out.code, out.stdout.trim()), (0, "[]"), "{out:?}");
    }
    assert!(started.elapsed() >= Duration::from_secs(1), "three calls at 1/s with a burst of 1 took no wait");
}

/// A controller's list is paged (at most 500 a page): `ps` shows every page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ps_reads_every_page() {
    let c = Controller::start(&["--rate-limit-per-second", "10000", "--rate-limit-burst", "10000"]).await;
    let admin = mint(&["--subject", "root", "--cluster-admin"]);
    c.post("/v1/namespaces", &admin, json!({ "name": "big" })).await;
    let host = json!({ "name": "h1", "address": "h1.test:7000", "cpus": 1024, "memory_mb": 1 << 20 });
    c.post("/v1/hosts", &admin, host).await;
    let spec = json!({ "config": { "image": "alpine", "guest": { "cpus": 1, "memory_mb": 64 } } });
    let total = 503;
    let mut creates = tokio::task::JoinSet::new();
    for _ in 0..total {
        let request = c.http.post(format!("{}/v1/namespaces/big/machines", c.base)).bearer_auth(&admin).json(&spec);
        creates.spawn(async move { request.send().await.unwrap().status() });
    }
    while let Some(status) = creates.join_next().await {
        assert_eq!(status.unwrap(), StatusCode::CREATED);
    }
    let out = run(c.mmctl(&admin, &["-n", "big", "ps", "-o", "json"]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let listed: Vec<Value> = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(listed.len(), total);
    let mut ids: Vec<_> = listed.iter().map(|m| m["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), total);
}
