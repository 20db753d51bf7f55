//! The real `mm-controller` binary SIGKILLed while creates are in flight.
//!
//! Each round fires many concurrent creates, each with its own
//! `Idempotency-Key`, kills the controller (by its pid) after a delay,
//! starts a new controller on the same database and retries every key.
//! Whatever the kill interrupted, each key must mean exactly one machine:
//! the retry answers the machine any earlier answer named, the namespace
//! holds one machine per key and none without one. A create that committed
//! the machine and its key in separate transactions fails this as soon as a
//! kill lands between the two (a retry then makes a second machine).
//! Kills land at once or at varying delays after the first answer, so
//! before, during and after the burst; the test insists that at least one
//! round was cut mid-burst.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_mm-controller");
/// Creates in flight per round.
const KEYS: usize = 48;
/// When each round's controller is killed: `None` at once, before any
/// create is answered; `Some(ms)` that long after the first answer, so the
/// kills land mid-burst however fast this machine is.
const KILL_AFTER_FIRST_ANSWER_MS: [Option<u64>; 13] = [
    None,
    Some(0),
    Some(0),
    Some(1),
    Some(1),
    Some(2),
    Some(3),
    Some(5),
    Some(8),
    Some(12),
    Some(20),
    Some(35),
    Some(60),
];

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One `mm-controller` process; SIGKILLed when dropped.
struct ControllerProcess {
    child: Child,
    base: String,
    log: PathBuf,
}

impl ControllerProcess {
    async fn start(url: &str, log: PathBuf) -> ControllerProcess {
        let port = free_port();
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(BIN)
            .args(["--database-url", url, "--listen", &format!("127.0.0.1:{port}")])
            // Every create of a round comes with the same token.
            .args(["--rate-limit-per-second", "100000", "--rate-limit-burst", "100000"])
            .env("MM_JWT_HS256_SECRET", std::str::from_utf8(support::SECRET).unwrap())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut controller = ControllerProcess { child, base: format!("http://127.0.0.1:{port}"), log };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while client.get(format!("{}/v1/openapi.json", controller.base)).send().await.is_err() {
            assert!(controller.child.try_wait().unwrap().is_none(), "mm-controller exited; log:\n{}", controller.log());
            assert!(Instant::now() < deadline, "mm-controller did not serve; log:\n{}", controller.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        controller
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        // SAFETY: kill(2) on our own child's pid, which is not reaped yet
        // (only `wait` below reaps it), so the pid cannot have been reused.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill();
        }
    }
}

/// A create with `key`; `Ok((status, machine id, replayed))`, or `Err` when
/// no answer came (the controller died under it).
async fn create(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    ns: &str,
    key: &str,
) -> Result<(u16, String, bool), String> {
    let body =
        json!({ "config": { "image": "alpine", "guest": { "cpus": 1, "memory_mb": 64 } }, "labels": { "key": key } });
    let response = client
        .post(format!("{base}/v1/namespaces/{ns}/machines"))
        .bearer_auth(token)
        .header("idempotency-key", key)
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let replayed = response.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
    let body: Value = response.json().await.map_err(|e| e.to_string())?;
    let id = body["id"].as_str().ok_or_else(|| format!("{status} {body}"))?.to_owned();
    Ok((status, id, replayed))
}

/// Every machine of `ns` (all pages): id → its `key` label.
async fn machines(client: &reqwest::Client, base: &str, token: &str, ns: &str) -> BTreeMap<String, String> {
    let mut all = BTreeMap::new();
    let mut page_token: Option<String> = None;
    loop {
        let mut url = format!("{base}/v1/namespaces/{ns}/machines?page_size=100");
        if let Some(t) = &page_token {
            url.push_str(&format!("&page_token={t}"));
        }
        let page: Value = client.get(url).bearer_auth(token).send().await.unwrap().json().await.unwrap();
        for m in page["machines"].as_array().unwrap() {
            let key = m["labels"]["key"].as_str().unwrap_or("(none)").to_owned();
            assert!(all.insert(m["id"].as_str().unwrap().to_owned(), key).is_none(), "listed twice: {m:#}");
        }
        match page["next_page_token"].as_str() {
            Some(t) => page_token = Some(t.to_owned()),
            None => return all,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_controller_leaves_one_machine_per_idempotency_key() {
    let url = tokio::task::spawn_blocking(support::pg::fresh_database).await.unwrap();
    let logs = std::env::temp_dir().join(format!("mm-kill-mid-create-{}", std::process::id()));
    std::fs::create_dir_all(&logs).unwrap();
    let token = support::cluster_admin();
    let mut controller = ControllerProcess::start(&url, logs.join("controller-0.log")).await;
    let setup = reqwest::Client::new();
    let host = json!({ "name": "h1", "address": "h1:1", "cpus": 100000, "memory_mb": 100_000_000 });
    let r = setup.post(format!("{}/v1/hosts", controller.base)).bearer_auth(&token).json(&host).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    let mut cut_mid_burst = 0;
    let mut committed_unanswered = 0;
    for (round, delay) in KILL_AFTER_FIRST_ANSWER_MS.into_iter().enumerate() {
        let ns = format!("round-{round}");
        let r = setup
            .post(format!("{}/v1/namespaces", controller.base))
            .bearer_auth(&token)
            .json(&json!({ "name": ns }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);

        // The burst, and the kill while it is in flight.
        let client = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
        let keys: Vec<String> = (0..KEYS).map(|i| format!("r{round}-k{i}")).collect();
        let first_answer = std::sync::Arc::new(tokio::sync::Notify::new());
        let burst: Vec<_> = keys
            .iter()
            .map(|key| {
                let (client, base, token, ns, key) =
                    (client.clone(), controller.base.clone(), token.clone(), ns.clone(), key.clone());
                let first_answer = first_answer.clone();
                tokio::spawn(async move {
                    let answer = create(&client, &base, &token, &ns, &key).await;
                    if answer.is_ok() {
                        first_answer.notify_one();
                    }
                    answer
                })
            })
            .collect();
        if let Some(ms) = delay {
            let answered = tokio::time::timeout(Duration::from_secs(20), first_answer.notified()).await;
            assert!(answered.is_ok(), "no create answered; log:\n{}", controller.log());
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        controller.kill();
        let when = match delay {
            None => format!("round {round}, killed at once"),
            Some(ms) => format!("round {round}, killed {ms} ms after the first answer"),
        };
        let mut answered = BTreeMap::new();
        for (key, task) in keys.iter().zip(burst) {
            if let Ok((status, id, replayed)) = task.await.unwrap() {
                assert_eq!((status, replayed), (201, false), "{key}: a first create");
                answered.insert(key.clone(), id);
            }
        }

        // A new controller on the same database; every key again.
        controller = ControllerProcess::start(&url, logs.join(format!("controller-{}.log", round + 1))).await;
        let client = reqwest::Client::new();
        let mut by_key = BTreeMap::new();
        for key in &keys {
            let (status, id, replayed) = create(&client, &controller.base, &token, &ns, key)
                .await
                .unwrap_or_else(|e| panic!("{key}: retry failed: {e}; log:\n{}", controller.log()));
            match answered.get(key) {
                Some(earlier) => {
                    assert_eq!(&id, earlier, "{key}: the retry names another machine");
                    assert_eq!((status, replayed), (200, true), "{key}: answered before, so replayed");
                }
                None if replayed => {
                    assert_eq!(status, 200, "{key}");
                    committed_unanswered += 1;
                }
                None => assert_eq!(status, 201, "{key}"),
            }
            by_key.insert(key.clone(), id);
        }

        // One machine per key, each the one its key answers, and no other.
        let listed = machines(&client, &controller.base, &token, &ns).await;
        let expected: BTreeMap<String, String> = by_key.iter().map(|(key, id)| (id.clone(), key.clone())).collect();
        assert_eq!(expected.len(), KEYS, "two keys answered one machine");
        let unexpected: Vec<_> = listed.iter().filter(|(id, _)| !expected.contains_key(*id)).collect();
        let missing: Vec<_> = expected.iter().filter(|(id, _)| !listed.contains_key(*id)).collect();
        assert!(
            unexpected.is_empty() && missing.is_empty(),
            "{when}: machines no key answers (id, its key label): {unexpected:?}; answered but not listed: {missing:?}"
        );
        if !answered.is_empty() && answered.len() < KEYS {
            cut_mid_burst += 1;
        }
        eprintln!("{when}: {} of {KEYS} answered before", answered.len());
    }
    eprintln!("{cut_mid_burst} round(s) cut mid-burst; {committed_unanswered} create(s) committed but unanswered");
    assert!(cut_mid_burst > 0, "no kill landed while creates were in flight: tune KILL_AFTER_FIRST_ANSWER_MS");
    drop(controller);
    let _ = std::fs::remove_dir_all(&logs);
}
