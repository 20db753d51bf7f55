//! Placement through the API, draining by the leader (the test plays the
//! brokers through the admin report stand-in), lost hosts, and several
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

/// A broker's report, through the admin stand-in.
async fn report(s: &support::Server, root: &str, host: &str, id: &str, state: &str) {
    let r = s.post(&format!("/v1/hosts/{host}/machines/{id}/state"), root, json!({ "state": state })).await;
    assert_eq!(r.status, StatusCode::OK, "{host} reports {id} {state}: {:#}", r.body);
}

/// A machine made to have run: created, started, reported started.
async fn started(s: &support::Server, root: &str, ns: &str, body: serde_json::Value) -> (String, String) {
    let m = s.machine(root, ns, body).await;
    let (id, host) = (m["id"].as_str().unwrap().to_owned(), m["host"].as_str().unwrap().to_owned());
    s.post(&format!("/v1/namespaces/{ns}/machines/{id}/start"), root, json!(null)).await;
    report(s, root, &host, &id, "started").await;
    (id, host)
}

/// Polls `GET path` until `done` holds (10 s).
async fn poll(s: &support::Server, root: &str, path: &str, what: &str, done: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body = s.get(path, root).await.body;
        if done(&body) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: still {body:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `(state, reason)` of each of a machine's events.
async fn events(s: &support::Server, root: &str, path: &str) -> Vec<(String, String)> {
    let events = s.get(&format!("{path}/events"), root).await.body;
    events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["state"].as_str().unwrap().to_owned(), e["reason"].as_str().unwrap().to_owned()))
        .collect()
}

/// Without brokers (the test reports what they would): the leader drains a
/// host of machines that never ran, stopped ones and running ones, and
/// leaves what fits nowhere, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_drains_machines_that_ran_and_says_what_cannot_move() {
    let s = serve().await;
    let root = cluster_admin();
    s.namespace(&root, "d").await;
    s.host(&root, "old", 8, 8192, json!({"disk": "local"})).await;
    let waiting = s.machine(&root, "d", spec("waiting")).await["id"].as_str().unwrap().to_owned();
    let (running, _) = started(&s, &root, "d", spec("running")).await;
    let (parked, _) = started(&s, &root, "d", spec("parked")).await;
    s.post(&format!("/v1/namespaces/d/machines/{parked}/stop"), &root, json!(null)).await;
    report(&s, &root, "old", &parked, "stopped").await;
    let mut body = spec("pinned");
    body["placement"] = json!({ "host_labels": { "disk": "local" } });
    let (pinned, _) = started(&s, &root, "d", body).await;
    let path = |id: &str| format!("/v1/namespaces/d/machines/{id}");

    // Nowhere to go: nothing moves, nothing is stopped, and it says why.
    assert_eq!(s.post("/v1/hosts/old/drain", &root, json!(null)).await.body["status"], "draining");
    poll(&s, &root, "/v1/hosts/old", "the drain says it is blocked", |h| {
        h["drain_blocked"].as_str().is_some_and(|b| b.starts_with("4 machine(s) cannot move") && b.contains("cordoned"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await; // a few more passes
    let m = s.get(&path(&running), &root).await.body;
    assert_eq!((m["host"].as_str(), m["state"].as_str()), (Some("old"), Some("started")), "{m:#}");
    let blocked: Vec<_> = events(&s, &root, &path(&running))
        .await
        .into_iter()
        .filter(|(_, r)| r.starts_with("cannot move off draining host old: no host can take 1 CPU(s)"))
        .collect();
    assert_eq!(blocked.len(), 1, "said once, not on every pass: {blocked:#?}");
    assert_eq!(blocked[0].0, "started");

    // Room appears: what never ran or is stopped moves as it is; the
    // running one is stopped where it is first.
    s.host(&root, "new", 8, 8192, json!({})).await;
    poll(&s, &root, &path(&waiting), "created moves", |m| m["host"] == "new" && m["state"] == "created").await;
    poll(&s, &root, &path(&parked), "stopped moves", |m| m["host"] == "new" && m["state"] == "stopped").await;
    poll(&s, &root, &path(&running), "running is stopped", |m| m["host"] == "old" && m["state"] == "stopping").await;
    let last = events(&s, &root, &path(&parked)).await.pop().unwrap();
    assert_eq!(last, ("stopped".into(), "moved from host old to host new: drain".into()));
    // Once its broker says it stopped, it moves and starts on the new host.
    report(&s, &root, "old", &running, "stopped").await;
    poll(&s, &root, &path(&running), "moved and starting", |m| {
        m["host"] == "new" && m["state"] == "starting" && m["previous_state"] == "stopped"
    })
    .await;
    let history = events(&s, &root, &path(&running)).await;
    let tail: Vec<_> = history.iter().rev().take(3).rev().map(|(state, _)| state.as_str()).collect();
    assert_eq!(tail, ["stopping", "stopped", "starting"], "{history:#?}");
    assert!(history.iter().any(|(_, r)| r == "host old is draining: stopping the machine to start it on another host"));
    assert_eq!(history.last().unwrap().1, "moved from host old to host new: drain");
    report(&s, &root, "new", &running, "started").await;

    // The pinned machine fits nowhere else: it runs on, the host stays
    // draining and says why.
    poll(&s, &root, "/v1/hosts/old", "only the pinned machine blocks", |h| {
        h["status"] == "draining"
            && h["drain_blocked"].as_str().is_some_and(|b| {
                b.starts_with(&format!("1 machine(s) cannot move; machine {pinned}"))
                    && b.contains("lacking the labels")
            })
    })
    .await;
    assert_eq!(s.get(&path(&pinned), &root).await.body["state"], "started");
    // Its owner removes it: the host is drained and nothing blocks.
    s.post(&format!("{}/stop", path(&pinned)), &root, json!(null)).await;
    report(&s, &root, "old", &pinned, "stopped").await;
    s.delete(&path(&pinned), &root).await;
    report(&s, &root, "old", &pinned, "destroyed").await;
    poll(&s, &root, "/v1/hosts/old", "drained", |h| h["status"] == "drained" && h["drain_blocked"].is_null()).await;
    // Uncordon ends the drain.
    assert_eq!(s.post("/v1/hosts/old/uncordon", &root, json!(null)).await.body["status"], "ready");
}

/// A user's stop during a drain wins (the machine moves stopped), and an
/// operator ending a drain gets the machines it had stopped running again
/// in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_yields_to_users_and_to_undrain() {
    let s = serve().await;
    let root = cluster_admin();
    s.namespace(&root, "y").await;
    s.host(&root, "a", 8, 8192, json!({})).await;
    let (kept, _) = started(&s, &root, "y", spec("kept")).await;
    let (halted, _) = started(&s, &root, "y", spec("halted")).await;
    s.host(&root, "b", 8, 8192, json!({})).await;
    let path = |id: &str| format!("/v1/namespaces/y/machines/{id}");

    s.post("/v1/hosts/a/drain", &root, json!(null)).await;
    for id in [&kept, &halted] {
        poll(&s, &root, &path(id), "stopped by the drain", |m| m["state"] == "stopping").await;
    }
    // The user stops one too (a no-op on a stopping machine, but now it is
    // the user's wish): it moves stopped.
    let r = s.post(&format!("{}/stop", path(&halted)), &root, json!(null)).await;
    assert_eq!(r.status, StatusCode::OK, "{:#}", r.body);
    report(&s, &root, "a", &halted, "stopped").await;
    poll(&s, &root, &path(&halted), "moved stopped", |m| m["host"] == "b" && m["state"] == "stopped").await;

    // The operator ends the drain before the other one stopped: once it
    // has, it starts again where it is.
    s.post("/v1/hosts/a/uncordon", &root, json!(null)).await;
    report(&s, &root, "a", &kept, "stopped").await;
    poll(&s, &root, &path(&kept), "started again in place", |m| m["host"] == "a" && m["state"] == "starting").await;
    let last = events(&s, &root, &path(&kept)).await.pop().unwrap();
    assert_eq!(last, ("starting".into(), "host a no longer draining: starting the machine again".into()));
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

/// A machine the drain stopped to move, on a host that is then lost, is
/// started on the host it is re-placed on: it was meant to run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_a_drain_stopped_starts_elsewhere_when_its_host_is_lost() {
    let url = tokio::task::spawn_blocking(support::pg::fresh_database).await.unwrap();
    let s = serve_with(&url, |c| c.heartbeat_timeout = Duration::from_secs(2)).await;
    let root = cluster_admin();
    s.namespace(&root, "ns").await;
    // Both hosts heart-beat (are registered again) twice a second, "old"
    // only until the drain has stopped the machine.
    let keep = |name: &'static str| {
        let (base, root) = (s.base.clone(), root.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let body = json!({"name": name, "address": format!("{name}:1"), "cpus": 4, "memory_mb": 4096});
            loop {
                let _ = client.post(format!("{base}/v1/hosts")).bearer_auth(&root).json(&body).send().await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let old = keep("old");
    poll(&s, &root, "/v1/hosts/old", "old registered", |h| h["status"] == "ready").await;
    let (id, host) = started(&s, &root, "ns", spec("m")).await;
    assert_eq!(host, "old");
    let alive = keep("alive");
    poll(&s, &root, "/v1/hosts/alive", "alive registered", |h| h["status"] == "ready").await;
    let path = format!("/v1/namespaces/ns/machines/{id}");

    s.post("/v1/hosts/old/drain", &root, json!(null)).await;
    poll(&s, &root, &path, "stopped by the drain", |m| m["state"] == "stopping").await;
    old.abort();
    // Its broker never says it stopped: the host is lost instead.
    let deadline = Instant::now() + Duration::from_secs(30);
    let moved = loop {
        let m = s.get(&path, &root).await.body;
        if m["host"] == "alive" {
            break m;
        }
        assert!(Instant::now() < deadline, "not re-placed: {m:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    alive.abort();
    assert_eq!((moved["state"].as_str(), moved["previous_state"].as_str()), (Some("starting"), Some("stopped")));
    let last = events(&s, &root, &path).await.pop().unwrap();
    assert_eq!(last, ("starting".into(), "moved from host old to host alive: host old lost".into()));
}

/// A direct connection to the test database (to play what a controller
/// holding a broker session writes into the hosts row).
fn db(url: &str) -> diesel::PgConnection {
    use diesel::Connection;
    diesel::PgConnection::establish(url).unwrap()
}

type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, reqwest::header::HeaderMap, String)>>>;

/// A stand-in for the controller holding a session: records each request
/// (path, headers, body) and answers with a JSON body and a header of its
/// own.
async fn stand_in_peer() -> (String, Seen) {
    let seen = Seen::default();
    let log = seen.clone();
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let log = log.clone();
        async move {
            let (parts, body) = request.into_parts();
            let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
            let path = parts.uri.to_string();
            log.lock().unwrap().push((path.clone(), parts.headers, String::from_utf8_lossy(&body).into_owned()));
            ([("content-type", "application/json"), ("x-answered-by", "peer")], json!({ "path": path }).to_string())
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

/// Exec and logs for a host whose broker holds its session with another
/// controller go there, with the caller's token, the request id and the
/// forwarded mark, and its answer comes back as it is; a request already
/// forwarded is not forwarded again; an unreachable peer is a 503 that
/// names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_logs_are_forwarded_to_the_controller_holding_the_session() {
    use mm_controller::store::hosts::claim_session;
    let s = serve().await;
    let root = cluster_admin();
    s.namespace(&root, "ns").await;
    s.host(&root, "h1", 8, 8192, json!({})).await;
    let (id, _) = started(&s, &root, "ns", spec("m")).await;
    let operator = support::token("op", &[("ns", mm_controller::auth::Role::Operator)], false);
    let exec = format!("/v1/namespaces/ns/machines/{id}/exec");
    let logs = format!("/v1/namespaces/ns/machines/{id}/logs?follow=true");

    // No controller recorded: served here, 503 as ever.
    assert!(s.post(&exec, &operator, json!({ "command": ["true"] })).await.problem(503).contains("broker session"));

    let (peer, seen) = stand_in_peer().await;
    claim_session(&mut db(&s.database_url), "h1", Some(&peer)).unwrap();
    let r = s.post(&exec, &operator, json!({ "command": ["echo", "hi"], "timeout": 9 })).await;
    assert_eq!((r.status, r.header("x-answered-by")), (StatusCode::OK, Some("peer")), "{:#}", r.body);
    assert_eq!(r.body["path"], exec);
    let r2 = s.get(&logs, &operator).await;
    assert_eq!((r2.status, r2.body["path"].as_str()), (StatusCode::OK, Some(logs.as_str())), "{:#}", r2.body);
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        let (_, headers, body) = &seen[0];
        assert_eq!(headers["authorization"], format!("Bearer {operator}").as_str());
        assert_eq!(headers["x-request-id"], r.header("x-request-id").unwrap());
        assert!(headers.contains_key(mm_controller::api::forward::FORWARDED));
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body, json!({ "command": ["echo", "hi"], "env": {}, "stdin": "", "timeout": 9 }));
    }

    // Marked as forwarded already: served here (503), never passed on.
    let marked = s
        .request(reqwest::Method::POST, &exec)
        .bearer_auth(&operator)
        .header(mm_controller::api::forward::FORWARDED, "http://elsewhere")
        .json(&json!({ "command": ["true"] }));
    s.send(marked).await.problem(503);
    assert_eq!(seen.lock().unwrap().len(), 2, "a forwarded request went on");

    // The recorded controller is gone.
    let gone = format!(
        "http://127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    );
    claim_session(&mut db(&s.database_url), "h1", Some(&gone)).unwrap();
    for r in [s.post(&exec, &operator, json!({ "command": ["true"] })).await, s.get(&logs, &operator).await] {
        assert!(r.problem(503).contains(&format!("controller {gone}, which cannot be reached")), "{:#}", r.body);
        assert_eq!(
            (r.body["type"].as_str(), r.header("retry-after")),
            (Some("urn:micromachines:problem:host-unavailable"), Some("5"))
        );
    }
}

/// A row naming a controller that has no session (here one that does not
/// know its own URL, so it would forward to itself) gets a 503 from that
/// controller, not a loop; the WebSocket exec is pumped through, the
/// peer's status frame and close code included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_requests_do_not_loop_and_websockets_pass_close_codes() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
    let first = serve().await;
    let second = serve_with(&first.database_url, |_| {}).await;
    let root = cluster_admin();
    first.namespace(&root, "ns").await;
    first.host(&root, "h1", 8, 8192, json!({})).await;
    let (id, _) = started(&first, &root, "ns", spec("m")).await;
    mm_controller::store::hosts::claim_session(&mut db(&first.database_url), "h1", Some(&second.base)).unwrap();
    let exec = format!("/v1/namespaces/ns/machines/{id}/exec");
    for s in [&first, &second] {
        let r = tokio::time::timeout(Duration::from_secs(20), s.post(&exec, &root, json!({ "command": ["true"] })))
            .await
            .expect("an answer, not a loop");
        assert!(r.problem(503).contains("does not accept broker sessions"), "{:#}", r.body);
    }

    let url = format!("ws://{}/v1/namespaces/ns/machines/{id}/exec/ws", first.addr);
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {root}").parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    socket.send(Message::text(json!({ "command": ["true"] }).to_string())).await.unwrap();
    let mut status = serde_json::Value::Null;
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(20), socket.next()).await.expect("an answer") {
            Some(Ok(Message::Binary(data))) if data[0] == 3 => status = serde_json::from_slice(&data[1..]).unwrap(),
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!((close, status["kind"].as_str()), (Some(4503), Some("host-unavailable")), "{status}");
}

/// The hosts row names the controller holding the session: a newer
/// session elsewhere replaces it, and an ended session clears it only
/// while the row still names that session's controller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_controller_is_cleared_only_by_its_own_controller() {
    use mm_controller::store::hosts::{claim_session, release_session, session_controller};
    let s = serve().await;
    s.host(&cluster_admin(), "h1", 8, 8192, json!({})).await;
    let mut c = db(&s.database_url);
    assert_eq!(session_controller(&mut c, "h1").unwrap(), None);
    claim_session(&mut c, "h1", Some("http://a:1")).unwrap();
    assert!(!release_session(&mut c, "h1", "http://b:1").unwrap());
    claim_session(&mut c, "h1", Some("http://b:1")).unwrap();
    // a's old session ends after the broker dialled b: b's stays.
    assert!(!release_session(&mut c, "h1", "http://a:1").unwrap());
    assert_eq!(session_controller(&mut c, "h1").unwrap().as_deref(), Some("http://b:1"));
    assert!(release_session(&mut c, "h1", "http://b:1").unwrap());
    assert_eq!(session_controller(&mut c, "h1").unwrap(), None);
    assert!(claim_session(&mut c, "nope", Some("http://a:1")).is_err());
}
