//! schemathesis (from PyPI) against the real `mm-controller` binary: every
//! operation of the served OpenAPI document, generated valid and invalid
//! requests, every check (server errors, undocumented statuses, content
//! types and headers, response schemas, valid input refused, invalid input
//! accepted, stateful link following), with the per-operation exclusions
//! of `controller/schemathesis.toml`, each explained there. Any failure,
//! and any warning (operations that only ever saw 404 or 429), fails the
//! test with schemathesis' report.
//!
//! schemathesis lives in a venv that `scripts/setup.sh` makes in the state
//! directory (`$MM_STATE_DIR/schemathesis`, default
//! `/var/lib/micromachines`), or wherever `MM_SCHEMATHESIS` points. Without
//! it the test fails when `CI` is set and is skipped otherwise, like the
//! boot tests without KVM.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_mm-controller");
/// Examples per operation and phase; about a minute in all on 2 cores
/// (debug build).
const MAX_EXAMPLES: &str = "100";
const SEED: &str = "1";
/// The seeded snapshot's id.
const SNAPSHOT: &str = "5eed5eed5eed";

/// The schemathesis executable, or why there is none (after failing in CI).
fn schemathesis() -> Option<PathBuf> {
    let path = std::env::var_os("MM_SCHEMATHESIS").map(PathBuf::from).unwrap_or_else(|| {
        let state = std::env::var_os("MM_STATE_DIR").unwrap_or_else(|| "/var/lib/micromachines".into());
        PathBuf::from(state).join("schemathesis/bin/schemathesis")
    });
    if path.is_file() {
        return Some(path);
    }
    let why = format!("{} not found (scripts/setup.sh installs it; MM_SCHEMATHESIS overrides)", path.display());
    if std::env::var_os("CI").is_some() {
        panic!("schemathesis: {why}, and CI is set: this test must run in CI");
    }
    eprintln!("SKIPPED schemathesis: {why}");
    None
}

/// The controller process; killed (by its pid) when dropped.
struct Controller(Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Seeder {
    client: reqwest::Client,
    base: String,
    token: String,
}

impl Seeder {
    async fn post(&self, path: &str, body: Value) -> Value {
        let r = self.client.post(format!("{}{path}", self.base)).bearer_auth(&self.token).json(&body).send().await;
        let r = r.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED, "seeding {path}");
        r.json().await.unwrap()
    }

    async fn machine(&self) -> String {
        let spec = json!({"config": {"image": "alpine", "guest": {"cpus": 1, "memory_mb": 64}}});
        self.post("/v1/namespaces/st/machines", spec).await["id"].as_str().unwrap().to_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing() {
    let Some(schemathesis) = schemathesis() else { return };
    let secret = std::str::from_utf8(support::SECRET).unwrap();
    let url = tokio::task::spawn_blocking(support::pg::fresh_database).await.unwrap();
    let port = free_port();
    // The default rate limit (20/s, burst 40) would answer most of the
    // fuzzer's requests with 429 and hide everything else.
    let child = Command::new(BIN)
        .args(["--database-url", &url, "--listen", &format!("127.0.0.1:{port}")])
        .args(["--rate-limit-per-second", "100000", "--rate-limit-burst", "100000"])
        .env("MM_JWT_HS256_SECRET", secret)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut controller = Controller(child);
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.get(format!("{base}/v1/openapi.json")).send().await.is_err() {
        assert!(controller.0.try_wait().unwrap().is_none(), "mm-controller exited early");
        assert!(Instant::now() < deadline, "mm-controller did not start serving");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let minted = Command::new(BIN)
        .args(["mint-token", "--subject", "schemathesis", "--cluster-admin", "--ttl", "3600"])
        .env("MM_JWT_HS256_SECRET", secret)
        .output()
        .unwrap();
    assert!(minted.status.success(), "{}", String::from_utf8_lossy(&minted.stderr));
    let token = String::from_utf8(minted.stdout).unwrap().trim().to_owned();

    // What the path parameters of schemathesis.toml name.
    let seed = Seeder { client, base: base.clone(), token: token.clone() };
    seed.post("/v1/namespaces", json!({"name": "st"})).await;
    // Room for every machine the fuzzer's creates, forks and branches make
    // (a fork makes up to 64 at once): a full host would answer them all
    // 409, which says nothing about the data sent.
    let host = json!({"name": "st-host", "address": "127.0.0.1:1", "cpus": 1_000_000, "memory_mb": 1_i64 << 40});
    seed.post("/v1/hosts", host).await;
    let machine = seed.machine().await;
    let doomed_machine = seed.machine().await;
    let leased_machine = seed.machine().await;
    seed.post(&format!("/v1/namespaces/st/machines/{leased_machine}/lease"), json!({"ttl": 3600})).await;
    // A started machine to branch (as its broker would report it): only a
    // running machine can be branched, any other is 409.
    let running_machine = seed.machine().await;
    let report = format!("{base}/v1/hosts/st-host/machines/{running_machine}/state");
    let reported = seed.client.post(report).bearer_auth(&token).json(&json!({"state": "started"})).send().await;
    assert_eq!(reported.unwrap().status(), StatusCode::OK, "reporting the machine started");
    let doomed_token = seed.post("/v1/tokens", json!({"subject": "victim", "roles": {"st": "viewer"}})).await;
    // A snapshot of the machine, recorded as its broker would have (no
    // broker dials this controller, so none can be taken here).
    support::seed_snapshot(&url, "st", &machine, "st-host", SNAPSHOT, Some("seeded")).await;

    // Its own working directory: schemathesis may leave files behind.
    let work = std::env::temp_dir().join(format!("mm-schemathesis-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/schemathesis.toml");
    let started = Instant::now();
    let run = Command::new(&schemathesis)
        .args(["--no-color", "--config-file", config, "run", &format!("{base}/v1/openapi.json")])
        .args(["--seed", SEED, "--max-examples", MAX_EXAMPLES, "--generation-database", "none"])
        .env("MM_ST_TOKEN", &token)
        .env("MM_ST_NAMESPACE", "st")
        .env("MM_ST_HOST", "st-host")
        .env("MM_ST_MACHINE", &machine)
        .env("MM_ST_DOOMED_MACHINE", &doomed_machine)
        .env("MM_ST_LEASED_MACHINE", &leased_machine)
        .env("MM_ST_RUNNING_MACHINE", &running_machine)
        .env("MM_ST_DOOMED_TOKEN", doomed_token["jti"].as_str().unwrap())
        .env("MM_ST_SNAPSHOT", SNAPSHOT)
        .current_dir(&work)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&work);
    let report = format!("{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    eprintln!("{report}\nschemathesis took {:.0?}", started.elapsed());
    assert!(run.status.success(), "schemathesis failed ({}); its report is above", run.status);
    assert!(controller.0.try_wait().unwrap().is_none(), "mm-controller died under the fuzzer");
    // A run that tested nothing passes too; make sure it did test.
    assert!(report.contains("No issues found"), "unexpected summary; the report is above");
}
