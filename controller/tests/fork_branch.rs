//! Fork (N machines from one snapshot) and branch (a live copy of a running
//! machine) through the REST API and `mmctl --server`, with the brokers
//! played by the stand-in of `support::fake_broker` (the session, the
//! driver and the routes run for real against a real PostgreSQL).

mod support;

use std::time::Duration;

use mm_controller::auth::Role;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::fake_broker::FakeBroker;
use support::{Server, cluster_admin, mmctl, post_keyed, serve_with_brokers, spec, started, token, until};

fn machine_path(m: &Value) -> String {
    format!("/v1/namespaces/{}/machines/{}", m["namespace"].as_str().unwrap(), m["id"].as_str().unwrap())
}

/// The names of the namespace's machines that are not destroyed, oldest
/// first.
async fn names(s: &Server, who: &str) -> Vec<String> {
    let list = s.get("/v1/namespaces/prod/machines?page_size=500", who).await;
    list.body["machines"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().to_owned()).collect()
}

/// Two brokers; a started machine `web` (on whichever host the scheduler
/// picked) and a snapshot of it named `base`. Returns the machine and the
/// snapshot id.
async fn with_snapshot(s: &Server, root: &str) -> (Value, String) {
    s.namespace(root, "prod").await;
    let web = s.machine(root, "prod", spec("web")).await;
    started(s, root, &machine_path(&web)).await;
    let r = s.post(&format!("{}/snapshots", machine_path(&web)), root, json!({ "name": "base" })).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:#}", r.body);
    (web, r.body["id"].as_str().unwrap().to_owned())
}

fn broker_of<'a>(host: &str, h1: &'a FakeBroker, h2: &'a FakeBroker) -> (&'a FakeBroker, &'a FakeBroker) {
    if host == "h1" { (h1, h2) } else { (h2, h1) }
}

/// A fork of 3 makes 3 machines named PREFIX-1..3, all on the snapshot's
/// host (though spread would put some on the other), each restored from
/// the snapshot by its broker; the default prefix; Idempotency-Key replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_makes_machines_on_the_snapshots_host() {
    let (_certs, s, [h1, h2]) = serve_with_brokers(["h1", "h2"]).await;
    let root = cluster_admin();
    let (web, sid) = with_snapshot(&s, &root).await;
    let host = web["host"].as_str().unwrap();
    let (there, elsewhere) = broker_of(host, &h1, &h2);
    let operator = token("op", &[("prod", Role::Operator)], false);
    let fork = format!("/v1/namespaces/prod/snapshots/{sid}/fork");

    let r = post_keyed(&s, &operator, &fork, json!({ "count": 3, "name_prefix": "job" }), Some("f1")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:#}", r.body);
    let made = r.body["machines"].as_array().unwrap().clone();
    let made_names: Vec<&str> = made.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(made_names, ["job-1", "job-2", "job-3"]);
    for m in &made {
        assert_eq!((m["host"].as_str(), m["from_snapshot"].as_str()), (Some(host), Some(sid.as_str())), "{m:#}");
        assert_eq!(m["state"], "created");
        assert_eq!(m["config"]["guest"], json!({ "cpus": 1, "memory_mb": 128 }));
        started(&s, &operator, &machine_path(m)).await;
        let vm = there.vm(m["id"].as_str().unwrap()).expect("restored on the snapshot's host");
        assert_eq!((vm.state.as_str(), vm.restored_from.as_deref()), ("running", Some(sid.as_str())));
        assert!(elsewhere.vm(m["id"].as_str().unwrap()).is_none());
    }
    assert!(elsewhere.world.lock().unwrap().vms.is_empty(), "nothing on the other host");

    // The same key and body: the same machines, not three more; the key
    // with another body is refused.
    let again = post_keyed(&s, &operator, &fork, json!({ "count": 3, "name_prefix": "job" }), Some("f1")).await;
    assert_eq!((again.status, again.header("idempotent-replayed")), (StatusCode::OK, Some("true")), "{:#}", again.body);
    let ids = |list: &Value| -> Vec<Value> { list.as_array().unwrap().iter().map(|m| m["id"].clone()).collect() };
    assert_eq!(ids(&again.body["machines"]), ids(&r.body["machines"]));
    post_keyed(&s, &operator, &fork, json!({ "count": 2, "name_prefix": "job" }), Some("f1")).await.problem(422);
    assert_eq!(names(&s, &operator).await, ["web", "job-1", "job-2", "job-3"]);

    // Without a prefix: the snapshot's name, then -fork.
    let r = s.post(&fork, &operator, json!({ "count": 1 })).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:#}", r.body);
    assert_eq!(r.body["machines"][0]["name"], "base-fork-1");
    let events = s.get(&format!("{}/events", machine_path(&r.body["machines"][0])), &operator).await.body;
    let first = events["events"][0]["reason"].as_str().unwrap();
    assert_eq!(first, format!("created from snapshot {sid}; placed on host {host}, which holds it"));
}

/// All or nothing: a taken name, a host without room for every clone, or
/// an invalid request leave nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_that_cannot_be_made_whole_makes_nothing() {
    let (_certs, s, [h1, h2]) = serve_with_brokers(["h1", "h2"]).await;
    let root = cluster_admin();
    let (web, sid) = with_snapshot(&s, &root).await;
    let host = web["host"].as_str().unwrap().to_owned();
    let fork = format!("/v1/namespaces/prod/snapshots/{sid}/fork");
    let restores =
        || [&h1, &h2].iter().flat_map(|b| b.world.lock().unwrap().vms.values().cloned().collect::<Vec<_>>()).count();

    // The second name is taken: not even the first is made.
    let job2 = s.machine(&root, "prod", spec("job-2")).await;
    let before = names(&s, &root).await;
    let taken = s.post(&fork, &root, json!({ "count": 3, "name_prefix": "job" })).await;
    let detail = taken.problem(409);
    assert!(detail.contains("job-2") && detail.contains("nothing was created"), "{detail}");
    assert_eq!(names(&s, &root).await, before);

    // The snapshot's host has 8 vCPUs, web takes one (and job-2 one if it
    // went there): one clone more than fits is refused whole, and the
    // other host (which has room) is not used.
    let room = 8 - 1 - i64::from(job2["host"] == web["host"]);
    let full = s.post(&fork, &root, json!({ "count": room + 1, "name_prefix": "many" })).await;
    let detail = full.problem(409);
    assert_eq!(full.body["type"], "urn:micromachines:problem:insufficient-capacity");
    assert!(detail.contains(&format!("clone {}", room + 1)), "{detail}");
    assert!(detail.contains(&format!("only be placed on host {host}")), "{detail}");
    assert_eq!(names(&s, &root).await, before);

    // Invalid: 422, nothing made.
    for body in [
        json!({ "count": 0 }),
        json!({ "count": 65 }),
        json!({ "count": -1 }),
        json!({ "count": 1.5 }),
        json!({}),
        json!({ "count": 2, "name_prefix": "Job" }),
        json!({ "count": 2, "name_prefix": "x".repeat(62) }),
        json!({ "count": 2, "name": "job" }),
        json!({ "count": 2, "ssh_keys": [""] }),
    ] {
        s.post(&fork, &root, body.clone()).await.problem(422);
    }
    // No such snapshot (or another namespace's): 404.
    s.post("/v1/namespaces/prod/snapshots/nope/fork", &root, json!({ "count": 1 })).await.problem(404);
    s.namespace(&root, "dev").await;
    s.post(&format!("/v1/namespaces/dev/snapshots/{sid}/fork"), &root, json!({ "count": 1 })).await.problem(404);
    assert_eq!(names(&s, &root).await, before);
    // Only the fixtures ever reached a broker: web and job-2.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(restores(), 2);
    // And as many as fit are made.
    let fit = s.post(&fork, &root, json!({ "count": room, "name_prefix": "many" })).await;
    assert_eq!(fit.status, StatusCode::CREATED, "{:#}", fit.body);
    assert_eq!(fit.body["machines"].as_array().unwrap().len() as i64, room);
}

/// A branch of a started machine: a new machine on the same host, made by
/// the broker's `Vm.branch` on the source, which then lives like any
/// machine; default names; Idempotency-Key; refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branch_of_a_running_machine() {
    let (_certs, s, [h1, h2]) = serve_with_brokers(["h1", "h2"]).await;
    let root = cluster_admin();
    s.namespace(&root, "prod").await;
    let operator = token("op", &[("prod", Role::Operator)], false);
    let mut body = spec("web");
    body["config"]["env"] = json!({ "GREETING": "hi" });
    body["labels"] = json!({ "app": "web" });
    let web = s.machine(&operator, "prod", body).await;
    let source = web["id"].as_str().unwrap().to_owned();
    let path = machine_path(&web);
    started(&s, &operator, &path).await;
    let host = web["host"].as_str().unwrap().to_owned();
    let (there, elsewhere) = broker_of(&host, &h1, &h2);

    let r = post_keyed(&s, &operator, &format!("{path}/branch"), json!({}), Some("b1")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:#}", r.body);
    let copy = r.body.clone();
    let copy_id = copy["id"].as_str().unwrap().to_owned();
    assert_eq!(r.header("location"), Some(machine_path(&copy).as_str()));
    assert_eq!(
        (copy["name"].as_str(), copy["host"].as_str(), copy["branch_of"].as_str(), copy["state"].as_str()),
        (Some("web-branch"), Some(host.as_str()), Some(source.as_str()), Some("created"))
    );
    assert_eq!(copy["config"], web["config"]);
    assert_eq!(copy["labels"], json!({ "app": "web" }));
    let copy_path = machine_path(&copy);
    started(&s, &operator, &copy_path).await;
    // The broker was asked to branch the source's microVM into one named
    // after the new machine; it is not a create or a restore.
    assert_eq!(there.world.lock().unwrap().branches, [(source.clone(), copy_id.clone())]);
    let vm = there.vm(&copy_id).unwrap();
    assert_eq!(
        (vm.state.as_str(), vm.branched_from.as_deref(), vm.restored_from.as_deref()),
        ("running", Some(source.as_str()), None)
    );
    assert!(elsewhere.world.lock().unwrap().branches.is_empty());
    assert!(elsewhere.vm(&copy_id).is_none());
    let events = s.get(&format!("{copy_path}/events"), &operator).await.body;
    let why: Vec<&str> = events["events"].as_array().unwrap().iter().map(|e| e["reason"].as_str().unwrap()).collect();
    assert_eq!(why[0], format!("branched from machine web ({source}); placed on host {host}, where it runs"));
    assert!(
        why.contains(&format!("host {host} branched machine {source}'s microVM into its own").as_str()),
        "{why:#?}"
    );
    // The source runs on.
    assert_eq!(s.get(&path, &operator).await.body["state"], "started");
    assert_eq!(there.vm(&source).unwrap().state, "running");

    // Replayed by its key; the key is a create's too, so another use is 422.
    let again = post_keyed(&s, &operator, &format!("{path}/branch"), json!({}), Some("b1")).await;
    assert_eq!((again.status, again.body["id"].as_str()), (StatusCode::OK, Some(copy_id.as_str())), "{:#}", again.body);
    post_keyed(&s, &operator, "/v1/namespaces/prod/machines", spec("other"), Some("b1")).await.problem(422);
    // Default names go on -2, -3; a name given must be free.
    let second = s.post(&format!("{path}/branch"), &operator, json!({})).await;
    assert_eq!(second.body["name"], "web-branch-2", "{:#}", second.body);
    let named = s.post(&format!("{path}/branch"), &operator, json!({ "name": "copy" })).await;
    assert_eq!((named.status, named.body["name"].as_str()), (StatusCode::CREATED, Some("copy")), "{:#}", named.body);
    let taken = s.post(&format!("{path}/branch"), &operator, json!({ "name": "copy" })).await;
    assert!(taken.problem(409).contains("\"copy\" already exists"), "{:#}", taken.body);
    s.post(&format!("{path}/branch"), &operator, json!({ "name": "Copy" })).await.problem(422);
    s.post(&format!("{path}/branch"), &operator, json!({ "labels": {} })).await.problem(422);
    // A branch of a branch.
    let grand = s.post(&format!("{copy_path}/branch"), &operator, json!({})).await;
    assert_eq!((grand.status, grand.body["name"].as_str()), (StatusCode::CREATED, Some("web-branch-branch")));
    started(&s, &operator, &machine_path(&grand.body)).await;

    // Then it is a machine like any: stop, start, delete.
    let stopped = s.post(&format!("{copy_path}/stop"), &operator, json!(null)).await;
    assert_eq!(stopped.status, StatusCode::OK, "{:#}", stopped.body);
    until(&s, &copy_path, &operator, "stopped", |m| m["state"] == "stopped").await;
    assert_eq!(there.vm(&copy_id).unwrap().state, "stopped");
    s.post(&format!("{copy_path}/start"), &operator, json!(null)).await;
    started(&s, &operator, &copy_path).await;
    assert_eq!(there.vm(&copy_id).unwrap().state, "running");
    let deleted = s.delete(&format!("{copy_path}?force=true"), &operator).await;
    assert_eq!(deleted.status, StatusCode::OK, "{:#}", deleted.body);
    until(&s, &copy_path, &operator, "destroyed", |m| m["state"] == "destroyed").await;
    assert!(there.vm(&copy_id).is_none());
    // Three branches were asked of the source, one of the copy.
    assert_eq!(there.world.lock().unwrap().branches.len(), 4);
}

/// Only a started machine is branched (409 invalid-state otherwise, no
/// record made, the broker not asked); a branch goes to its source's host
/// or nowhere; a read-only token may neither fork nor branch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branch_and_fork_refusals() {
    let (_certs, s, [h1]) = serve_with_brokers(["h1"]).await;
    let root = cluster_admin();
    let (web, sid) = with_snapshot(&s, &root).await;
    let path = machine_path(&web);
    let viewer = token("v", &[("prod", Role::Viewer)], false);
    let before = names(&s, &root).await;

    // A viewer: 403 for both, nothing made.
    s.post(&format!("{path}/branch"), &viewer, json!({})).await.problem(403);
    s.post(&format!("/v1/namespaces/prod/snapshots/{sid}/fork"), &viewer, json!({ "count": 1 })).await.problem(403);
    // Another namespace's operator: 404.
    let stranger = token("x", &[("dev", Role::Operator)], false);
    s.post(&format!("{path}/branch"), &stranger, json!({})).await.problem(404);
    assert_eq!(names(&s, &root).await, before);

    // Stopped: 409 with the reason.
    s.post(&format!("{path}/stop"), &root, json!(null)).await;
    until(&s, &path, &root, "stopped", |m| m["state"] == "stopped").await;
    let refused = s.post(&format!("{path}/branch"), &root, json!({})).await;
    let detail = refused.problem(409);
    assert_eq!(refused.body["type"], "urn:micromachines:problem:invalid-state");
    assert!(detail.contains("cannot branch a machine that is stopped"), "{detail}");
    s.post(&format!("{path}/start"), &root, json!(null)).await;
    started(&s, &root, &path).await;
    // Suspended: 409.
    s.post(&format!("{path}/suspend"), &root, json!(null)).await;
    until(&s, &path, &root, "suspended", |m| m["state"] == "suspended").await;
    assert!(s.post(&format!("{path}/branch"), &root, json!({})).await.problem(409).contains("suspended"));
    assert_eq!(names(&s, &root).await, before);
    assert!(h1.world.lock().unwrap().branches.is_empty(), "the broker was not asked");

    // Its host cordoned: no other host will do.
    s.post(&format!("{path}/start"), &root, json!(null)).await;
    started(&s, &root, &path).await;
    s.post("/v1/hosts/h1/cordon", &root, json!(null)).await;
    let cordoned = s.post(&format!("{path}/branch"), &root, json!({})).await;
    assert!(
        cordoned.problem(409).contains("can only be placed on host h1, where the machine runs"),
        "{:#}",
        cordoned.body
    );
    let fork = s.post(&format!("/v1/namespaces/prod/snapshots/{sid}/fork"), &root, json!({ "count": 1 })).await;
    assert!(fork.problem(409).contains("only be placed on host h1, which holds the snapshot"), "{:#}", fork.body);
    s.post("/v1/hosts/h1/uncordon", &root, json!(null)).await;
    let ok = s.post(&format!("{path}/branch"), &root, json!({})).await;
    assert_eq!(ok.status, StatusCode::CREATED, "{:#}", ok.body);
}

/// `mmctl --server fork` and `branch`, printed as the local verbs print
/// them, returning once the machines are started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mmctl_fork_and_branch_through_the_controller() {
    let (_certs, s, [h1]) = serve_with_brokers(["h1"]).await;
    let root = cluster_admin();
    let (web, sid) = with_snapshot(&s, &root).await;

    // By name, with a prefix; by id prefix without one.
    let (code, out, err) = mmctl(&s, &root, &["fork", "base", "--count", "2", "--name-prefix", "job"]).await;
    assert_eq!((code, out.as_str()), (0, "job-1\njob-2\n"), "{err}");
    let (code, out, err) = mmctl(&s, &root, &["fork", &sid[..6], "-o", "json"]).await;
    assert_eq!(code, 0, "{err}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed[0]["name"], "base-fork-1");
    assert_eq!(listed[0]["state"], "started");
    for m in names(&s, &root).await.iter().filter(|n| n.starts_with("job") || n.starts_with("base")) {
        let row = s.get("/v1/namespaces/prod/machines?page_size=500", &root).await.body["machines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == m.as_str())
            .unwrap()
            .clone();
        assert_eq!(row["state"], "started", "{row:#}");
        assert_eq!(h1.vm(row["id"].as_str().unwrap()).unwrap().restored_from.as_deref(), Some(sid.as_str()));
    }
    // A taken name: the controller's refusal, nothing made.
    let (code, _, err) = mmctl(&s, &root, &["fork", "base", "--count", "3", "--name-prefix", "job"]).await;
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("job-1, job-2") && err.contains("nothing was created"), "{err}");

    // branch, by name; with --name and -o json.
    let (code, out, err) = mmctl(&s, &root, &["branch", "web"]).await;
    assert_eq!((code, out.as_str()), (0, "web-branch\n"), "{err}");
    let (code, out, err) = mmctl(&s, &root, &["branch", "web", "--name", "copy", "-o", "json"]).await;
    assert_eq!(code, 0, "{err}");
    let copy: Value = serde_json::from_str(&out).unwrap();
    assert_eq!((copy["name"].as_str(), copy["state"].as_str()), (Some("copy"), Some("started")));
    assert_eq!(copy["branch_of"], web["id"]);
    let copy_id = copy["id"].as_str().unwrap();
    assert_eq!(h1.vm(copy_id).unwrap().branched_from.as_deref(), web["id"].as_str());
    // A stopped machine is refused with the controller's reason.
    let (code, _, err) = mmctl(&s, &root, &["stop", "copy"]).await;
    assert_eq!(code, 0, "{err}");
    until(&s, &machine_path(&copy), &root, "stopped", |m| m["state"] == "stopped").await;
    let (code, _, err) = mmctl(&s, &root, &["branch", "copy"]).await;
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("cannot branch a machine that is stopped"), "{err}");
    let (code, _, err) = mmctl(&s, &root, &["branch", "ghost"]).await;
    assert_eq!(code, 3, "{err}");
}
