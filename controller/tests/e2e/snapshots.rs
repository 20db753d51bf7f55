//! Snapshots with real brokers and real guests (issue 13): a started
//! machine is snapshotted through the controller, a new machine is made
//! from the snapshot on the same host (`restoreVm`) and exec answers in it
//! with the source's disk and an identity of its own; then the source is
//! suspended (no process left on its host) and started again, which
//! resumes it where it was, and exec answers there too.

use std::time::{Duration, Instant};

use mm_integration::broker::TestBroker;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{BOOT, ControllerProcess, exec_when_ready};

/// The microVMs `broker` has, with their states (`mmctl ps`).
fn vm_states(broker: &TestBroker) -> Vec<(String, String)> {
    let run = broker.mmctl(&["ps", "-o", "json"], Duration::from_secs(30)).unwrap();
    assert_eq!(run.status, Some(0), "mmctl ps: {}", run.stderr);
    let vms: Value = serde_json::from_str(&run.stdout).unwrap();
    let field = |vm: &Value, key: &str| vm[key].as_str().unwrap_or_default().to_owned();
    vms.as_array().unwrap().iter().map(|vm| (field(vm, "name"), field(vm, "state"))).collect()
}

/// The snapshot ids `broker` holds (`mmctl snapshot ls`).
fn snapshot_ids(broker: &TestBroker) -> Vec<String> {
    let run = broker.mmctl(&["snapshot", "ls", "-o", "json"], Duration::from_secs(30)).unwrap();
    assert_eq!(run.status, Some(0), "mmctl snapshot ls: {}", run.stderr);
    let all: Value = serde_json::from_str(&run.stdout).unwrap();
    all.as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_owned()).collect()
}

/// Waits (up to `BOOT`) for the machine at `path` to be `state`.
async fn wait_for(c: &ControllerProcess, path: &str, state: &str) -> Value {
    let (status, machine) = c.get(&format!("{path}/wait?state={state}&timeout={}", BOOT.as_secs())).await;
    assert_eq!(status, StatusCode::OK, "waiting for {state}: {machine:#}; log:\n{}", c.log());
    machine
}

/// The step; `path` is the started machine's, on `host` (`broker`'s).
pub async fn snapshot_restore_and_suspend(c: &ControllerProcess, broker: &TestBroker, path: &str, host: &str) {
    let id = path.rsplit('/').next().unwrap().to_owned();
    let out = exec_when_ready(c, path, &["sh", "-c", "echo from-the-source > /snapshot-marker; sync"]).await;
    assert_eq!(out["exit_code"], 0, "{out:#}");

    // Snapshot: the broker has it, the controller lists it.
    let (status, snapshot) = c.post(&format!("{path}/snapshots"), json!({ "name": "e2e-snap" })).await;
    assert_eq!(status, StatusCode::CREATED, "{snapshot:#}; log:\n{}", c.log());
    let sid = snapshot["id"].as_str().unwrap().to_owned();
    assert_eq!((snapshot["host"].as_str(), snapshot["machine_id"].as_str()), (Some(host), Some(id.as_str())));
    assert!(snapshot["memory_bytes"].as_u64() > Some(0), "{snapshot:#}");
    assert!(snapshot_ids(broker).contains(&sid));
    let (_, listed) = c.get(&format!("{path}/snapshots")).await;
    assert_eq!(listed["snapshots"][0]["id"], sid.as_str(), "{listed:#}");
    // The source runs on.
    let out = exec_when_ready(c, path, &["true"]).await;
    assert_eq!(out["exit_code"], 0, "{out:#}");

    // A new machine from it, on the same host, restored rather than booted.
    let (status, copy) =
        c.post("/v1/namespaces/e2e/machines", json!({ "name": "web-copy", "from_snapshot": sid })).await;
    assert_eq!(status, StatusCode::CREATED, "{copy:#}");
    assert_eq!(copy["host"].as_str(), Some(host), "{copy:#}");
    let copy_path = format!("/v1/namespaces/e2e/machines/{}", copy["id"].as_str().unwrap());
    wait_for(c, &copy_path, "started").await;
    let out = exec_when_ready(c, &copy_path, &["sh", "-c", "cat /snapshot-marker; hostname"]).await;
    assert_eq!(out["exit_code"], 0, "{out:#}");
    let stdout = out["stdout"].as_str().unwrap();
    assert!(stdout.starts_with("from-the-source\n"), "the copy has the source's disk: {out:#}");
    assert_ne!(stdout.lines().nth(1), Some(id.as_str()), "the copy has a hostname of its own: {out:#}");
    let (_, events) = c.get(&format!("{copy_path}/events")).await;
    assert!(events.to_string().contains(&format!("restored its microVM from snapshot {sid}")), "{events:#}");
    let (status, body) = c.call(reqwest::Method::DELETE, &format!("{copy_path}?force=true"), None).await;
    assert_eq!(status, StatusCode::OK, "{body:#}");
    wait_for(c, &copy_path, "destroyed").await;

    // Suspend: saved, every process gone from the host; start resumes it.
    let (status, asked) = c.post(&format!("{path}/suspend"), json!(null)).await;
    assert_eq!((status, asked["state"].as_str()), (StatusCode::OK, Some("suspending")), "{asked:#}");
    wait_for(c, path, "suspended").await;
    assert!(vm_states(broker).contains(&(id.clone(), "suspended".to_owned())), "{:?}", vm_states(broker));
    // Still suspended a few heartbeats later: neither failed nor lost.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(c.get(path).await.1["state"], "suspended");
    let began = Instant::now();
    let (status, body) = c.post(&format!("{path}/start"), json!(null)).await;
    assert_eq!(status, StatusCode::OK, "{body:#}");
    wait_for(c, path, "started").await;
    let out = exec_when_ready(c, path, &["sh", "-c", "cat /snapshot-marker; echo resumed"]).await;
    assert_eq!(out["stdout"], "from-the-source\nresumed\n", "{out:#}");
    eprintln!("resume → exec answered in {:.1?}", began.elapsed());

    // Deleting the snapshot deletes it on the broker.
    let (status, body) = c.call(reqwest::Method::DELETE, &format!("/v1/namespaces/e2e/snapshots/{sid}"), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body:#}");
    assert!(!snapshot_ids(broker).contains(&sid));
}
