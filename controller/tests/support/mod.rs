//! Shared by the integration tests: a real PostgreSQL (`pg`), a real
//! controller serving HTTP on 127.0.0.1, a client, and token minting.

#![allow(dead_code)]

pub mod fake_broker;
pub mod pg;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use mm_controller::auth::{Claims, Keys, Role};
use mm_controller::{Config, Controller};
use reqwest::{Method, StatusCode, header::HeaderMap};
use serde_json::{Value, json};

pub const SECRET: &[u8] = b"integration-test-secret-0123456789abcdef";

/// A controller serving HTTP on 127.0.0.1; stops when dropped.
pub struct Server {
    pub base: String,
    pub addr: SocketAddr,
    pub controller: Controller,
    pub database_url: String,
    task: tokio::task::JoinHandle<()>,
    client: reqwest::Client,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A response, body parsed as JSON when there is one.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts an RFC 9457 problem with this status whose request id matches
    /// the header; returns its detail.
    #[track_caller]
    pub fn problem(&self, status: u16) -> &str {
        assert_eq!(self.status.as_u16(), status, "{:#}", self.body);
        assert_eq!(self.header("content-type"), Some("application/problem+json"), "{:#}", self.body);
        assert_eq!(self.body["status"], status);
        let id = self.header("x-request-id").expect("X-Request-Id");
        assert_eq!(self.body["request_id"], id);
        assert!(self.body["type"].as_str().unwrap().starts_with("urn:micromachines:problem:"));
        self.body["detail"].as_str().unwrap()
    }
}

/// Starts a controller on `database_url` with test-friendly settings, then
/// `tweak`.
pub async fn serve_with(database_url: &str, tweak: impl FnOnce(&mut Config)) -> Server {
    let mut config = Config::new(database_url, SECRET);
    config.reconcile_interval = std::time::Duration::from_millis(100);
    config.wait_poll_interval = std::time::Duration::from_millis(100);
    config.rate_limit.burst = 10_000;
    config.rate_limit.per_second = 10_000.0;
    // Hosts registered through the admin stand-in never heart-beat.
    config.heartbeat_timeout = std::time::Duration::from_secs(3600);
    tweak(&mut config);
    let controller = Controller::start(config).await.expect("controller starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = controller.router();
    let task = tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    Server {
        base: format!("http://{addr}"),
        addr,
        controller,
        database_url: database_url.to_owned(),
        task,
        client: reqwest::Client::new(),
    }
}

/// A controller on a fresh database that brokers dial with `certs`' (see
/// `fake_broker`).
pub async fn serve_for_brokers(certs: &fake_broker::Certs) -> Server {
    let url = tokio::task::spawn_blocking(pg::fresh_database).await.unwrap();
    serve_with(&url, |c| c.broker_listen = Some(certs.listen())).await
}

/// A controller on a fresh database and a stand-in broker (8 vCPUs,
/// 8 GiB) registered for each of `hosts`; the certificates they share must
/// outlive them, so they are returned too.
pub async fn serve_with_brokers<const N: usize>(
    hosts: [&str; N],
) -> (fake_broker::Certs, Server, [fake_broker::FakeBroker; N]) {
    let certs = fake_broker::Certs::make(&hosts);
    let s = serve_for_brokers(&certs).await;
    let addr = s.controller.broker_addr().unwrap();
    let brokers = hosts.map(|host| fake_broker::FakeBroker::start(addr, &certs, host, 8, 8192));
    (certs, s, brokers)
}

/// A controller on a fresh database.
pub async fn serve() -> Server {
    let url = tokio::task::spawn_blocking(pg::fresh_database).await.unwrap();
    serve_with(&url, |_| {}).await
}

impl Server {
    /// Sends a request; `body` is sent as JSON.
    pub async fn call(&self, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> Reply {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.send(request).await
    }

    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, format!("{}{path}", self.base))
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let response = request.send().await.expect("HTTP request");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Reply { status, headers, body }
    }

    pub async fn get(&self, path: &str, token: &str) -> Reply {
        self.call(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Reply {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    pub async fn delete(&self, path: &str, token: &str) -> Reply {
        self.call(Method::DELETE, path, Some(token), None).await
    }

    /// Creates a namespace (as `admin`), asserting success.
    pub async fn namespace(&self, admin: &str, name: &str) {
        let r = self.post("/v1/namespaces", admin, json!({ "name": name })).await;
        assert_eq!(r.status, StatusCode::CREATED, "{:#}", r.body);
    }

    /// Registers a host (as `admin`), asserting success.
    pub async fn host(&self, admin: &str, name: &str, cpus: i32, memory_mb: i64, labels: Value) -> Value {
        let body = json!({ "name": name, "address": format!("{name}.test:7000"), "cpus": cpus,
            "memory_mb": memory_mb, "labels": labels });
        let r = self.post("/v1/hosts", admin, body).await;
        assert!(r.status.is_success(), "{:#}", r.body);
        r.body
    }

    /// Creates a machine (as `token`), asserting success; returns it.
    pub async fn machine(&self, token: &str, namespace: &str, body: Value) -> Value {
        let r = self.post(&format!("/v1/namespaces/{namespace}/machines"), token, body).await;
        assert_eq!(r.status, StatusCode::CREATED, "{:#}", r.body);
        r.body
    }
}

/// Records a snapshot in the database at `database_url` as if `host`'s
/// broker had taken it of machine `machine` (for tests without a broker:
/// listing, RBAC, restore placement and refusals need only the row).
pub async fn seed_snapshot(
    database_url: &str,
    namespace: &str,
    machine: &str,
    host: &str,
    id: &str,
    name: Option<&str>,
) {
    use mm_controller::db::models::NewSnapshot;
    let row = NewSnapshot {
        id: id.to_owned(),
        namespace: namespace.to_owned(),
        machine_id: machine.parse().unwrap(),
        host_name: host.to_owned(),
        name: name.map(str::to_owned),
        kind: "snapshot".into(),
        cpus: 1,
        memory_mb: 128,
        memory_bytes: 1 << 20,
        disk_bytes: 2 << 20,
        pause_us: 1000,
        created_at: chrono::Utc::now(),
    };
    let url = database_url.to_owned();
    tokio::task::spawn_blocking(move || {
        use diesel::Connection;
        let mut conn = diesel::PgConnection::establish(&url).unwrap();
        mm_controller::store::snapshots::record(&mut conn, row, None).unwrap();
    })
    .await
    .unwrap();
}

/// POSTs `body` to `path` as `who`, with `key` as its `Idempotency-Key`
/// if any.
pub async fn post_keyed(s: &Server, who: &str, path: &str, body: Value, key: Option<&str>) -> Reply {
    let mut request = s.request(Method::POST, path).bearer_auth(who).json(&body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    s.send(request).await
}

/// Polls `path` until `done` holds (10 s).
pub async fn until(s: &Server, path: &str, who: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = s.get(path, who).await;
        if r.status == StatusCode::OK && done(&r.body) {
            return r.body;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: still {:#}", r.body);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Waits (10 s) for the machine at `path` to be started, asserting it is;
/// returns it.
pub async fn started(s: &Server, who: &str, path: &str) -> Value {
    let r = s.get(&format!("{path}/wait?state=started&timeout=10"), who).await;
    assert_eq!(r.status, StatusCode::OK, "{:#}", r.body);
    r.body
}

/// `mmctl --server ARGS` in namespace `prod` as `token`; (exit code,
/// stdout, stderr).
pub async fn mmctl(s: &Server, token: &str, args: &[&str]) -> (i32, String, String) {
    let mut command = std::process::Command::new(mmctl_binary());
    command.arg("--server").arg(&s.base).args(["-n", "prod"]).args(args);
    command.env("MM_TOKEN", token).env_remove("MM_SERVER").env_remove("MM_NAMESPACE");
    command.stdin(std::process::Stdio::null());
    let out = tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (out.status.code().expect("mmctl exited"), text(out.stdout), text(out.stderr))
}

/// A small machine spec.
pub fn spec(name: &str) -> Value {
    json!({ "name": name, "config": { "image": "alpine", "guest": { "cpus": 1, "memory_mb": 128 } } })
}

pub fn claims(subject: &str, roles: &[(&str, Role)], cluster_admin: bool, exp_in: i64) -> Claims {
    Claims {
        sub: subject.to_owned(),
        jti: uuid::Uuid::new_v4().to_string(),
        exp: chrono::Utc::now().timestamp() + exp_in,
        iat: None,
        roles: roles.iter().map(|(ns, r)| (ns.to_string(), *r)).collect::<BTreeMap<_, _>>(),
        cluster_admin,
    }
}

/// A token signed with the test secret.
pub fn token(subject: &str, roles: &[(&str, Role)], cluster_admin: bool) -> String {
    Keys::new(SECRET, None).unwrap().mint(&claims(subject, roles, cluster_admin, 3600))
}

pub fn cluster_admin() -> String {
    token("root", &[], true)
}

/// The `mmctl` binary built beside this test (same profile).
pub fn mmctl_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let dir = if dir.ends_with("deps") { dir.parent().unwrap() } else { dir };
    let path = dir.join("mmctl");
    assert!(path.is_file(), "{} not found: build it first (cargo build -p mmctl)", path.display());
    path
}
