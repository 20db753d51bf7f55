//! Snapshots, restore and suspend through the REST API, with the broker
//! played by a stand-in that dials the controller over mutual TLS
//! (`support::fake_broker`): the session, the driver and the routes run
//! for real against a real PostgreSQL, only the microVMs are pretend. (The
//! real brokers and guests are `e2e_brokers.rs`'s; the refusals that need
//! no broker are `bad_input.rs`'s.)

mod support;

use std::time::Duration;

use mm_controller::auth::Role;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Reply, Server, cluster_admin, mmctl, post_keyed, serve_with_brokers, spec, started, token, until};

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOriginal test@example";

/// Every reason in the machine's events.
async fn reasons(s: &Server, who: &str, path: &str) -> Vec<String> {
    let events = s.get(&format!("{path}/events"), who).await.body;
    events["events"].as_array().unwrap().iter().map(|e| e["reason"].as_str().unwrap().to_owned()).collect()
}

/// Takes a snapshot of the machine at `path`.
async fn snapshot_request(s: &Server, who: &str, path: &str, body: Value, key: Option<&str>) -> Reply {
    post_keyed(s, who, &format!("{path}/snapshots"), body, key).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restore_and_suspend_through_a_broker() {
    let (_certs, s, [h1]) = serve_with_brokers(["h1"]).await;
    let root = cluster_admin();
    s.namespace(&root, "prod").await;
    let operator = token("op", &[("prod", Role::Operator)], false);
    let viewer = token("v", &[("prod", Role::Viewer)], false);

    let mut web = spec("web");
    web["config"]["ssh_keys"] = json!([KEY]);
    web["config"]["env"] = json!({ "GREETING": "hi" });
    let m = s.machine(&operator, "prod", web).await;
    let id = m["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/namespaces/prod/machines/{id}");
    started(&s, &viewer, &path).await;
    assert_eq!(h1.vm(&id).unwrap().state, "running");

    // A named snapshot, with an Idempotency-Key.
    let first = snapshot_request(&s, &operator, &path, json!({ "name": "before" }), Some("k1")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{:#}", first.body);
    let sid = first.body["id"].as_str().unwrap().to_owned();
    assert_eq!(first.header("location"), Some(format!("/v1/namespaces/prod/snapshots/{sid}").as_str()));
    let expected = json!({ "id": sid, "name": "before", "namespace": "prod", "machine_id": id, "machine_name": "web",
        "host": "h1", "kind": "snapshot", "cpus": 1, "memory_mb": 128, "memory_bytes": 20 << 20,
        "disk_bytes": 50 << 20, "pause_us": 1234, "created_at": "2027-01-05T10:00:00Z" });
    assert_eq!(first.body, expected);
    // The broker was not told the tenant's name (its names are host-wide).
    assert_eq!(h1.world.lock().unwrap().snapshots[&sid].name, "");
    // Replayed, not repeated; the key with another body is refused.
    let again = snapshot_request(&s, &operator, &path, json!({ "name": "before" }), Some("k1")).await;
    assert_eq!((again.status, again.header("idempotent-replayed")), (StatusCode::OK, Some("true")));
    assert_eq!(again.body, expected);
    snapshot_request(&s, &operator, &path, json!({ "name": "other" }), Some("k1")).await.problem(422);
    // Names are unique in the namespace: refused before the broker is asked.
    let taken = snapshot_request(&s, &operator, &path, json!({ "name": "before" }), None).await;
    assert!(taken.problem(409).contains("already exists"), "{:#}", taken.body);
    assert_eq!(h1.snapshot_ids(), [sid.as_str()]);

    // The broker failing: 502, nothing recorded, and the key is free for
    // the retry.
    h1.world.lock().unwrap().fail_snapshot = Some("internal: the vsock device died mid-snapshot".into());
    let failed = snapshot_request(&s, &operator, &path, json!({}), Some("k2")).await;
    assert!(failed.problem(502).contains("vsock device died"), "{:#}", failed.body);
    let retried = snapshot_request(&s, &operator, &path, json!({}), Some("k2")).await;
    assert_eq!(retried.status, StatusCode::CREATED, "{:#}", retried.body);
    assert_eq!(retried.body["name"], Value::Null);
    let unnamed = retried.body["id"].as_str().unwrap().to_owned();
    assert_eq!(h1.snapshot_ids().len(), 2);

    // Listing needs no broker and pages.
    let mine = s.get(&format!("{path}/snapshots"), &viewer).await;
    let ids: Vec<&str> = mine.body["snapshots"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [sid.as_str(), unnamed.as_str()]);
    let page = s.get("/v1/namespaces/prod/snapshots?page_size=1", &viewer).await;
    assert_eq!(page.body["snapshots"][0]["id"], sid.as_str());
    let token = page.body["next_page_token"].as_str().unwrap();
    let rest = s.get(&format!("/v1/namespaces/prod/snapshots?page_size=1&page_token={token}"), &viewer).await;
    assert_eq!(
        (rest.body["snapshots"][0]["id"].as_str(), &rest.body["next_page_token"]),
        (Some(unnamed.as_str()), &Value::Null)
    );
    assert_eq!(s.get(&format!("/v1/namespaces/prod/snapshots/{sid}"), &viewer).await.body, expected);

    // Restore: a new machine on the snapshot's host, made with restoreVm;
    // its workload and size are the snapshot's, its keys its machine's.
    let restored = s.machine(&operator, "prod", json!({ "name": "web2", "from_snapshot": sid })).await;
    assert_eq!((restored["host"].as_str(), restored["from_snapshot"].as_str()), (Some("h1"), Some(sid.as_str())));
    assert_eq!(
        restored["config"],
        json!({ "image": "alpine", "guest": { "cpus": 1, "memory_mb": 128 },
        "env": { "GREETING": "hi" }, "ssh_keys": [KEY] })
    );
    let path2 = format!("/v1/namespaces/prod/machines/{}", restored["id"].as_str().unwrap());
    started(&s, &viewer, &path2).await;
    let vm2 = h1.vm(restored["id"].as_str().unwrap()).unwrap();
    assert_eq!(
        (vm2.restored_from.as_deref(), vm2.ssh_keys.as_slice()),
        (Some(sid.as_str()), [KEY.to_owned()].as_slice())
    );
    let why = reasons(&s, &viewer, &path2).await;
    assert!(why.iter().any(|r| r == &format!("host h1 restored its microVM from snapshot {sid}")), "{why:#?}");
    // Keys of its own; a config that agrees with the snapshot is taken.
    let other_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOther other@example";
    let with_keys = json!({ "name": "web3", "from_snapshot": sid,
        "config": { "image": "alpine", "guest": { "cpus": 1, "memory_mb": 128 }, "ssh_keys": [other_key] } });
    let web3 = s.machine(&operator, "prod", with_keys).await;
    started(&s, &viewer, &format!("/v1/namespaces/prod/machines/{}", web3["id"].as_str().unwrap())).await;
    assert_eq!(h1.vm(web3["id"].as_str().unwrap()).unwrap().ssh_keys, [other_key]);

    // Delete goes through the broker; one the broker no longer has is
    // deleted too.
    let gone = s.delete(&format!("/v1/namespaces/prod/snapshots/{unnamed}"), &operator).await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT, "{:#}", gone.body);
    assert_eq!(h1.snapshot_ids(), [sid.as_str()]);
    s.delete(&format!("/v1/namespaces/prod/snapshots/{unnamed}"), &operator).await.problem(404);
    let lost = snapshot_request(&s, &operator, &path, json!({}), None).await.body["id"].as_str().unwrap().to_owned();
    h1.world.lock().unwrap().snapshots.remove(&lost);
    assert_eq!(
        s.delete(&format!("/v1/namespaces/prod/snapshots/{lost}"), &operator).await.status,
        StatusCode::NO_CONTENT
    );
    s.get(&format!("/v1/namespaces/prod/snapshots/{lost}"), &viewer).await.problem(404);

    // Suspend → suspended (processes gone); start resumes it.
    let asked = s.post(&format!("{path}/suspend"), &operator, json!(null)).await;
    assert_eq!((asked.status, asked.body["state"].as_str()), (StatusCode::OK, Some("suspending")), "{:#}", asked.body);
    let r = s.get(&format!("{path}/wait?state=suspended&timeout=10"), &viewer).await;
    assert_eq!((r.status, r.body["previous_state"].as_str()), (StatusCode::OK, Some("suspending")), "{:#}", r.body);
    assert_eq!(h1.vm(&id).unwrap().state, "suspended");
    assert!(reasons(&s, &viewer, &path).await.contains(&"host h1 suspended its microVM".to_owned()));
    // Not failed, not lost: it stays suspended while heartbeats go by.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.get(&path, &viewer).await.body["state"], "suspended");
    // Suspend and stop again are no-ops; what needs a guest is refused.
    assert_eq!(s.post(&format!("{path}/suspend"), &operator, json!(null)).await.body["state"], "suspended");
    assert_eq!(s.post(&format!("{path}/stop"), &operator, json!(null)).await.body["state"], "suspended");
    s.post(&format!("{path}/exec"), &operator, json!({ "command": ["true"] })).await.problem(409);
    snapshot_request(&s, &operator, &path, json!({}), None).await.problem(409);
    let resumed = s.post(&format!("{path}/start"), &operator, json!(null)).await;
    assert_eq!(resumed.body["state"], "starting", "{:#}", resumed.body);
    started(&s, &viewer, &path).await;
    assert_eq!((h1.vm(&id).unwrap().state.as_str(), h1.vm(&id).unwrap().resumed), ("running", 1));

    // A suspend the broker cannot do: the machine runs on, and says why.
    h1.world.lock().unwrap().fail_suspend = Some("internal: cannot suspend: the disk is full".into());
    s.post(&format!("{path}/suspend"), &operator, json!(null)).await;
    until(&s, &path, &viewer, "back to started", |m| m["state"] == "started" && m["previous_state"] == "suspending")
        .await;
    let why = reasons(&s, &viewer, &path).await;
    assert!(why.last().unwrap().contains("could not suspend its microVM, which runs on"), "{why:#?}");
    assert!(why.last().unwrap().contains("the disk is full"), "{why:#?}");
    // Suspended on the host behind the controller's back: seen as such.
    h1.world.lock().unwrap().vms.get_mut(&id).unwrap().state = "suspended".into();
    until(&s, &path, &viewer, "suspended by the host", |m| m["state"] == "suspended").await;

    // A namespace holding snapshots is not deleted, even without machines.
    for machine in s.get("/v1/namespaces/prod/machines", &root).await.body["machines"].as_array().unwrap() {
        let path = format!("/v1/namespaces/prod/machines/{}", machine["id"].as_str().unwrap());
        assert_eq!(s.delete(&format!("{path}?force=true"), &root).await.status, StatusCode::OK);
        until(&s, &path, &root, "destroyed", |m| m["state"] == "destroyed").await;
    }
    assert!(s.delete("/v1/namespaces/prod", &root).await.problem(409).contains("1 snapshot(s)"));
    // Snapshots outlive their machine, and it can be restored from still.
    assert_eq!(s.get(&format!("{path}/snapshots"), &viewer).await.body["snapshots"][0]["id"], sid.as_str());
    let phoenix = s.machine(&operator, "prod", json!({ "from_snapshot": sid })).await;
    started(&s, &viewer, &format!("/v1/namespaces/prod/machines/{}", phoenix["id"].as_str().unwrap())).await;
}

/// Taking and deleting a snapshot through a controller the broker did not
/// dial: forwarded to the one it did, the `Idempotency-Key` with it (so
/// the replay is that controller's too).
/// A restore takes the snapshot's command and env with the keys it is
/// sent: each may fit the guest's kernel command line alone and not
/// together, which is refused at create (422), not at boot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_whose_keys_overflow_the_kernel_command_line_is_refused() {
    let (_certs, s, [_h1]) = serve_with_brokers(["h1"]).await;
    let root = cluster_admin();
    s.namespace(&root, "prod").await;
    let mut web = spec("web");
    web["config"]["env"] = json!({ "BIG": "x".repeat(900) });
    let id = s.machine(&root, "prod", web).await["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/namespaces/prod/machines/{id}");
    started(&s, &root, &path).await;
    let sid = snapshot_request(&s, &root, &path, json!({}), None).await.body["id"].as_str().unwrap().to_owned();

    let keys = vec![KEY; 8];
    let alone = json!({ "name": "alone", "config": { "image": "alpine", "guest": { "cpus": 1, "memory_mb": 128 },
        "ssh_keys": keys } });
    assert_eq!(s.post("/v1/namespaces/prod/machines", &root, alone).await.status, StatusCode::CREATED);
    let restore = json!({ "name": "web2", "from_snapshot": sid,
        "config": { "image": "alpine", "guest": { "cpus": 1, "memory_mb": 128 }, "ssh_keys": keys } });
    let refused = s.post("/v1/namespaces/prod/machines", &root, restore).await;
    assert!(refused.problem(422).contains("kernel command line"), "{:#}", refused.body);
    let names: Vec<Value> = s.get("/v1/namespaces/prod/machines", &root).await.body["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].clone())
        .collect();
    assert_eq!(names, [json!("web"), json!("alone")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_through_another_controller() {
    let (_certs, home, [_h1]) = serve_with_brokers(["h1"]).await;
    let peer = support::serve_with(&home.database_url, |_| {}).await;
    let root = cluster_admin();
    // What `--advertise-url` would have written at registration.
    let url = home.database_url.clone();
    let base = home.base.clone();
    tokio::task::spawn_blocking(move || {
        use diesel::Connection;
        let mut conn = diesel::PgConnection::establish(&url).unwrap();
        mm_controller::store::hosts::claim_session(&mut conn, "h1", Some(&base)).unwrap();
    })
    .await
    .unwrap();
    peer.namespace(&root, "prod").await;
    let m = peer.machine(&root, "prod", spec("web")).await;
    let path = format!("/v1/namespaces/prod/machines/{}", m["id"].as_str().unwrap());
    started(&peer, &root, &path).await;

    let made = snapshot_request(&peer, &root, &path, json!({ "name": "fwd" }), Some("fk")).await;
    assert_eq!(made.status, StatusCode::CREATED, "{:#}", made.body);
    let again = snapshot_request(&peer, &root, &path, json!({ "name": "fwd" }), Some("fk")).await;
    assert_eq!((again.status, again.header("idempotent-replayed")), (StatusCode::OK, Some("true")), "{:#}", again.body);
    assert_eq!(again.body["id"], made.body["id"]);
    let sid = made.body["id"].as_str().unwrap();
    let gone = peer.delete(&format!("/v1/namespaces/prod/snapshots/{sid}"), &root).await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT, "{:#}", gone.body);
    assert_eq!(home.get("/v1/namespaces/prod/snapshots", &root).await.body["snapshots"], json!([]));
}

/// mmctl's snapshot verbs through the controller: `snapshot create|ls|rm|gc`,
/// `restore` and `suspend`, printed as locally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mmctl_snapshot_verbs_through_the_controller() {
    let (certs, s, [h1]) = serve_with_brokers(["h1"]).await;
    let root = cluster_admin();
    s.namespace(&root, "prod").await;
    let mut web = spec("web");
    web["config"]["ssh_keys"] = json!([KEY]);
    let id = s.machine(&root, "prod", web).await["id"].as_str().unwrap().to_owned();
    started(&s, &root, &format!("/v1/namespaces/prod/machines/{id}")).await;

    let (code, first, err) = mmctl(&s, &root, &["snapshot", "create", "web", "--name", "before"]).await;
    assert_eq!(code, 0, "{err}");
    let first = first.trim().to_owned();
    assert_eq!(h1.snapshot_ids(), [first.as_str()]);
    let (code, json_out, err) = mmctl(&s, &root, &["snapshot", "create", "web", "-o", "json"]).await;
    assert_eq!(code, 0, "{err}");
    let second: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!((second["machine_name"].as_str(), second["host"].as_str()), (Some("web"), Some("h1")));
    let second = second["id"].as_str().unwrap().to_owned();

    let (code, table, _) = mmctl(&s, &root, &["snapshot", "ls"]).await;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(code, 0);
    assert!(lines[0].starts_with("ID") && lines[0].contains("ON DISK"), "{table}");
    assert!(lines[1].starts_with(&first) && lines[1].contains("before") && lines[1].contains("web"), "{table}");
    assert!(lines[1].contains("128M") && lines[1].contains("20.0M"), "{table}");
    assert_eq!(lines.len(), 3, "{table}");
    let (_, listed, _) = mmctl(&s, &root, &["snapshot", "ls", "web", "-o", "json"]).await;
    assert_eq!(serde_json::from_str::<Value>(&listed).unwrap().as_array().unwrap().len(), 2);

    // restore by name, and by id prefix with keys of its own.
    let (code, name, err) = mmctl(&s, &root, &["restore", "before", "--name", "web2"]).await;
    assert_eq!((code, name.trim()), (0, "web2"), "{err}");
    let web2 = s.get("/v1/namespaces/prod/machines", &root).await.body["machines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "web2")
        .unwrap()
        .clone();
    assert_eq!(web2["state"], "started");
    assert_eq!(h1.vm(web2["id"].as_str().unwrap()).unwrap().restored_from.as_deref(), Some(first.as_str()));
    let key_file = certs.dir.join("other.pub");
    std::fs::write(&key_file, "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOther other@example\n").unwrap();
    let prefix = &second[..6];
    let (code, _, err) =
        mmctl(&s, &root, &["restore", prefix, "--name", "web3", "--ssh-key", key_file.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    let keys: Vec<Vec<String>> = h1.world.lock().unwrap().vms.values().map(|vm| vm.ssh_keys.clone()).collect();
    assert!(keys.contains(&vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOther other@example".to_owned()]), "{keys:?}");

    // gc keeps the newest; rm by id; an unknown one is exit 3.
    let (code, removed, _) = mmctl(&s, &root, &["snapshot", "gc", "web", "--keep", "1"]).await;
    assert_eq!((code, removed.trim()), (0, first.as_str()));
    let (code, removed, _) = mmctl(&s, &root, &["snapshot", "rm", &second]).await;
    assert_eq!((code, removed.trim()), (0, second.as_str()));
    assert!(h1.snapshot_ids().is_empty());
    let (code, _, err) = mmctl(&s, &root, &["snapshot", "rm", "nope"]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("no snapshot \"nope\""), "{err}");

    // suspend waits until suspended; start resumes.
    let (code, out, err) = mmctl(&s, &root, &["suspend", "web"]).await;
    assert_eq!((code, out.trim()), (0, "web"), "{err}");
    assert_eq!(h1.vm(&id).unwrap().state, "suspended");
    let (code, _, err) = mmctl(&s, &root, &["start", "web"]).await;
    assert_eq!(code, 0, "{err}");
    started(&s, &root, &format!("/v1/namespaces/prod/machines/{id}")).await;
    assert_eq!(h1.vm(&id).unwrap().resumed, 1);
    // A suspend that does not take says why.
    h1.world.lock().unwrap().fail_suspend = Some("internal: the disk is full".into());
    let (code, _, err) = mmctl(&s, &root, &["suspend", "web"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is started, not suspended") && err.contains("the disk is full"), "{err}");
    let (code, _, err) = mmctl(&s, &root, &["suspend", "ghost"]).await;
    assert_eq!(code, 3, "{err}");
}
