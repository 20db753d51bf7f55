//! Placement through the API, draining by the leader, and several
//! controllers on one database.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use support::{cluster_admin, serve, serve_with, spec};

fn sized(name: &str, cpus: i32, memory_mb: i64) -> serde_json::Value {
    json!({ "name": name, "config": { "image": "alpine", "guest": { "cpus": cpus, "memory_mb": memory_mb } } })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_spreads_honours_labels_and_refuses_clearly() {
    let s = serve().await;
    let root = cluster_admin();
    s.namespace(&root, "a").await;
    s.namespace(&root, "b").await;
    s.host(&root, "h1", 4, 4096, json!({"region": "fra"})).await;
    s.host(&root, "h2", 4, 4096, json!({"region": "fra"})).await;
    s.host(&root, "h3", 4, 4096, json!({"region": "ams"})).await;

    // One namespace spreads over every host before doubling up.
    let mut per_host = BTreeMap::new();
    for i in 0..3 {
        let m = s.machine(&root, "a", sized(&format!("m{i}"), 1, 512)).await;
        *per_host.entry(m["host"].as_str().unwrap().to_owned()).or_insert(0) += 1;
    }
    assert_eq!(per_host.values().copied().collect::<Vec<_>>(), [1, 1, 1], "{per_host:?}");

    // Label constraints.
    let mut body = sized("pinned", 1, 512);
    body["placement"] = json!({ "host_labels": { "region": "ams" } });
    assert_eq!(s.machine(&root, "b", body).await["host"], "h3");
    let mut body = sized("nowhere", 1, 512);
    body["placement"] = json!({ "host_labels": { "region": "lhr" } });
    let r = s.post("/v1/namespaces/b/machines", &root, body).await;
    assert!(r.problem(409).contains("3 lacking the labels"), "{:#}", r.body);

    // Capacity: h3 now has 2 CPUs left, h1 and h2 3 each.
    let r = s.post("/v1/namespaces/b/machines", &root, sized("huge", 4, 512)).await;
    assert!(r.problem(409).contains("3 short of CPUs"), "{:#}", r.body);
    // Cordoned hosts take nothing new.
    for h in ["h1", "h2"] {
        assert_eq!(s.post(&format!("/v1/hosts/{h}/cordon"), &root, json!(null)).await.body["status"], "cordoned");
    }
    assert_eq!(s.machine(&root, "b", sized("c", 1, 256)).await["host"], "h3");
    let r = s.post("/v1/namespaces/b/machines", &root, sized("d", 3, 256)).await;
    assert!(r.problem(409).contains("2 cordoned, 1 short of CPUs"), "{:#}", r.body);
    s.post("/v1/hosts/h1/uncordon", &root, json!(null)).await;
    assert_eq!(s.machine(&root, "b", sized("d", 3, 256)).await["host"], "h1");

    // Hosts show what is placed on them; destroyed machines free capacity.
    let hosts = s.get("/v1/hosts", &root).await;
    let h1 = hosts.body["hosts"].as_array().unwrap().iter().find(|h| h["name"] == "h1").unwrap().clone();
    assert_eq!((h1["used_cpus"].as_i64(), h1["machines"].as_i64()), (Some(4), Some(2)), "{h1:#}");
    let list = s.get("/v1/namespaces/b/machines?state=created", &root).await;
    for m in list.body["machines"].as_array().unwrap() {
        let path = format!("/v1/namespaces/b/machines/{}", m["id"].as_str().unwrap());
        assert_eq!(s.delete(&path, &root).await.body["state"], "destroyed");
    }
    let h1 = s.get("/v1/hosts/h1", &root).await;
    assert_eq!(h1.body["used_cpus"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_moves_unstarted_machines_off_a_draining_host() {
    let s = serve().await;
    let root = cluster_admin();
    s.namespace(&root, "d").await;
    s.host(&root, "old", 8, 8192, json!({})).await;
    let waiting = s.machine(&root, "d", spec("waiting")).await;
    let running = s.machine(&root, "d", spec("running")).await;
    let running_id = running["id"].as_str().unwrap();
    s.post(&format!("/v1/namespaces/d/machines/{running_id}/start"), &root, json!(null)).await;
    s.post(&format!("/v1/hosts/old/machines/{running_id}/state"), &root, json!({"state": "started"})).await;
    // Nowhere to go yet: the drain waits.
    assert_eq!(s.post("/v1/hosts/old/drain", &root, json!(null)).await.body["status"], "draining");
    s.host(&root, "new", 8, 8192, json!({})).await;

    let path = format!("/v1/namespaces/d/machines/{}", waiting["id"].as_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if s.get(&path, &root).await.body["host"] == "new" {
            break;
        }
        assert!(Instant::now() < deadline, "machine was not moved off the draining host");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = s.get(&format!("{path}/events"), &root).await;
    let last = events.body["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["reason"], "moved from host old to host new: drain");
    // A machine that ran stays (its disk is there) until the broker session
    // can move it.
    let running = s.get(&format!("/v1/namespaces/d/machines/{running_id}"), &root).await;
    assert_eq!(running.body["host"], "old");
    // Stopping and destroying it empties the host: drained.
    s.post(&format!("/v1/namespaces/d/machines/{running_id}/stop"), &root, json!(null)).await;
    s.post(&format!("/v1/hosts/old/machines/{running_id}/state"), &root, json!({"state": "stopped"})).await;
    s.delete(&format!("/v1/namespaces/d/machines/{running_id}"), &root).await;
    s.post(&format!("/v1/hosts/old/machines/{running_id}/state"), &root, json!({"state": "destroyed"})).await;
    assert_eq!(s.get("/v1/hosts/old", &root).await.body["status"], "drained");
    // Uncordon ends the drain.
    assert_eq!(s.post("/v1/hosts/old/uncordon", &root, json!(null)).await.body["status"], "ready");
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_controllers_one_leader_and_failover() {
    let first = serve().await;
    let url = first.database_url.clone();
    let second = serve_with(&url, |_| {}).await;
    let third = serve_with(&url, |_| {}).await;
    wait_for("a leader", || {
        first.controller.is_leader() || second.controller.is_leader() || third.controller.is_leader()
    })
    .await;
    // Give the others a few ticks to (fail to) take the lock too.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let leaders = [&first, &second, &third].iter().filter(|s| s.controller.is_leader()).count();
    assert_eq!(leaders, 1);

    // Every controller serves the same state.
    let root = cluster_admin();
    first.namespace(&root, "shared").await;
    second.host(&root, "h1", 8, 8192, json!({})).await;
    let m = third.machine(&root, "shared", spec("m")).await;
    let got = first.get(&format!("/v1/namespaces/shared/machines/{}", m["id"].as_str().unwrap()), &root).await;
    assert_eq!(got.status, StatusCode::OK);

    // A waiter on one controller sees a change made through another.
    let path = format!("/v1/namespaces/shared/machines/{}", m["id"].as_str().unwrap());
    second.post(&format!("{path}/start"), &root, json!(null)).await;
    let wait_path = format!("{path}/wait?state=started&timeout=10");
    let (waited, _) = tokio::join!(first.get(&wait_path, &root), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        third
            .post(
                &format!("/v1/hosts/h1/machines/{}/state", m["id"].as_str().unwrap()),
                &root,
                json!({"state": "started"}),
            )
            .await
    });
    assert_eq!(waited.status, StatusCode::OK, "{:#}", waited.body);

    // The leader goes away; another takes over.
    let mut servers = vec![first, second, third];
    let leader = servers.iter().position(|s| s.controller.is_leader()).unwrap();
    drop(servers.remove(leader));
    wait_for("a new leader", || servers.iter().any(|s| s.controller.is_leader())).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(servers.iter().filter(|s| s.controller.is_leader()).count(), 1);
}

/// Without brokers: hosts registered by hand heart-beat only when
/// registered again, so one that is kept registered stays and one left
/// alone is lost, and the leader re-places the lost host's machines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_re_places_the_machines_of_a_lost_host() {
    let url = tokio::task::spawn_blocking(support::pg::fresh_database).await.unwrap();
    let s = serve_with(&url, |c| c.heartbeat_timeout = Duration::from_secs(2)).await;
    let root = cluster_admin();
    s.namespace(&root, "ns").await;
    s.host(&root, "quiet", 4, 4096, json!({})).await;
    let running = s.machine(&root, "ns", spec("running")).await;
    let running_id = running["id"].as_str().unwrap().to_owned();
    s.post(&format!("/v1/namespaces/ns/machines/{running_id}/start"), &root, json!(null)).await;
    s.post(&format!("/v1/hosts/quiet/machines/{running_id}/state"), &root, json!({"state": "started"})).await;
    let parked = s.machine(&root, "ns", spec("parked")).await;
    let parked_id = parked["id"].as_str().unwrap().to_owned();
    assert_eq!(parked["host"], "quiet");

    // "alive" heart-beats (is registered again) twice a second.
    let keeper = {
        let (base, root) = (s.base.clone(), root.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let body = json!({"name": "alive", "address": "alive:1", "cpus": 4, "memory_mb": 4096});
            loop {
                let _ = client.post(format!("{base}/v1/hosts")).bearer_auth(&root).json(&body).send().await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let moved = loop {
        let m = s.get(&format!("/v1/namespaces/ns/machines/{running_id}"), &root).await.body;
        if m["host"] == "alive" {
            break m;
        }
        assert!(Instant::now() < deadline, "not re-placed: {m:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    keeper.abort();
    // It should run, so it failed with its host and starts on the new one.
    assert_eq!(moved["state"], "starting", "{moved:#}");
    assert_eq!(moved["previous_state"], "failed", "{moved:#}");
    let events = s.get(&format!("/v1/namespaces/ns/machines/{running_id}/events"), &root).await.body;
    let events: Vec<(String, String)> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["state"].as_str().unwrap().to_owned(), e["reason"].as_str().unwrap().to_owned()))
        .collect();
    assert!(events.iter().any(|(s, r)| s == "failed" && r.contains("host quiet lost while the machine was started")));
    assert!(events.iter().any(|(s, r)| s == "starting" && r.contains("moved from host quiet to host alive")));
    // Not started, so it moves as it is.
    let parked = s.get(&format!("/v1/namespaces/ns/machines/{parked_id}"), &root).await.body;
    assert_eq!((parked["host"].as_str(), parked["state"].as_str()), (Some("alive"), Some("created")), "{parked:#}");
    let quiet = s.get("/v1/hosts/quiet", &root).await.body;
    assert_eq!(quiet["status"], "lost", "{quiet:#}");
    assert!(quiet["lost_at"].is_string());
    // Registering again (a broker coming back) ends the loss.
    s.host(&root, "quiet", 4, 4096, json!({})).await;
    assert_eq!(s.get("/v1/hosts/quiet", &root).await.body["status"], "ready");
}
