//! Namespace quotas (issue 16) against a real PostgreSQL: every path that
//! makes a machine (create, from_snapshot, fork, branch) and snapshots
//! refused with 403 `quota-exceeded` and nothing left behind, changes
//! taking effect at once, concurrent creates at the edge, and bad input.
//! No broker is needed: hosts are registered by hand and the test reports
//! states through the stand-in endpoint, as `api.rs` does.

mod support;

use mm_controller::auth::Role;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Reply, Server, cluster_admin, serve, spec, token};

async fn put_quota(s: &Server, who: &str, ns: &str, body: Value) -> Reply {
    s.call(Method::PUT, &format!("/v1/namespaces/{ns}/quota"), Some(who), Some(body)).await
}

/// Asserts a 403 `quota-exceeded` naming `limit`; returns the detail.
#[track_caller]
fn exceeded(r: &Reply, limit: &str) -> String {
    let detail = r.problem(403).to_owned();
    assert_eq!(r.body["type"], "urn:micromachines:problem:quota-exceeded", "{:#}", r.body);
    assert_eq!(r.body["limit"], limit, "{:#}", r.body);
    assert!(detail.starts_with(&format!("quota exceeded: {limit}:")), "{detail}");
    detail
}

/// The namespace's machines that are not destroyed.
async fn living(s: &Server, who: &str, ns: &str) -> usize {
    let r = s.get(&format!("/v1/namespaces/{ns}/machines"), who).await;
    assert_eq!(r.status, StatusCode::OK, "{:#}", r.body);
    r.body["machines"].as_array().unwrap().len()
}

fn sized(name: &str, cpus: i64, memory_mb: i64) -> Value {
    json!({ "name": name, "config": { "image": "alpine", "guest": { "cpus": cpus, "memory_mb": memory_mb } } })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_over_quota_are_refused_and_changes_take_effect_at_once() {
    let s = serve().await;
    let root = cluster_admin();
    s.namespace(&root, "prod").await;
    s.host(&root, "h1", 64, 1 << 16, json!({})).await;
    let machines = "/v1/namespaces/prod/machines";

    // No quota yet: no limits, usage counted.
    let q = s.get("/v1/namespaces/prod/quota", &root).await;
    assert_eq!(q.status, StatusCode::OK, "{:#}", q.body);
    assert_eq!(q.body["limits"], json!({"machines": null, "vcpus": null, "memory_mb": null, "snapshot_bytes": null}));
    assert_eq!(q.body["updated_at"], Value::Null);

    let set = put_quota(&s, &root, "prod", json!({"machines": 2})).await;
    assert_eq!(set.status, StatusCode::OK, "{:#}", set.body);
    assert_eq!(set.body["limits"]["machines"], 2);
    assert_eq!(set.body["limits"]["vcpus"], Value::Null);
    // Idempotent: the same body again, the same quota.
    let again = put_quota(&s, &root, "prod", json!({"machines": 2})).await;
    assert_eq!(again.body["limits"], set.body["limits"]);

    s.machine(&root, "prod", spec("a")).await;
    s.machine(&root, "prod", spec("b")).await;
    let r = s.post(machines, &root, spec("c")).await;
    let detail = exceeded(&r, "machines");
    assert!(detail.contains("at most 2 machine(s); it has 2 and this needs 1 more"), "{detail}");
    assert_eq!(living(&s, &root, "prod").await, 2, "nothing created");
    // An Idempotency-Key refused over quota is not used up.
    let keyed = support::post_keyed(&s, &root, machines, spec("c"), Some("k1")).await;
    exceeded(&keyed, "machines");

    // Raised: the very next create passes (with the same key).
    put_quota(&s, &root, "prod", json!({"machines": 3})).await;
    let r = support::post_keyed(&s, &root, machines, spec("c"), Some("k1")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:#}", r.body);
    let q = s.get("/v1/namespaces/prod/quota", &root).await.body;
    assert_eq!(q["usage"], json!({"machines": 3, "vcpus": 3, "memory_mb": 384, "snapshot_bytes": 0}));

    // Lowered below usage: taken, nothing stops, nothing more is created.
    let low = put_quota(&s, &root, "prod", json!({"machines": 1})).await;
    assert_eq!((low.status, &low.body["usage"]["machines"]), (StatusCode::OK, &json!(3)));
    exceeded(&s.post(machines, &root, spec("d")).await, "machines");
    // A destroyed machine frees its share; a stopped one keeps it.
    let a = s.get(&format!("{machines}?page_size=1"), &root).await.body["machines"][0]["id"].clone();
    let gone = s.delete(&format!("{machines}/{}", a.as_str().unwrap()), &root).await;
    assert_eq!(gone.body["state"], "destroyed");
    put_quota(&s, &root, "prod", json!({"machines": 3})).await;
    s.machine(&root, "prod", spec("d")).await;

    // vCPUs and memory, each named when it is the one exceeded.
    put_quota(&s, &root, "prod", json!({"vcpus": 4})).await;
    exceeded(&s.post(machines, &root, sized("big", 2, 128)).await, "vcpus");
    s.machine(&root, "prod", sized("one", 1, 128)).await;
    put_quota(&s, &root, "prod", json!({"memory_mb": 1024})).await;
    exceeded(&s.post(machines, &root, sized("fat", 1, 600)).await, "memory_mb");
    s.machine(&root, "prod", sized("fits", 1, 512)).await;
    assert_eq!(living(&s, &root, "prod").await, 5);

    // Lifted.
    let lifted = put_quota(&s, &root, "prod", json!({})).await;
    assert_eq!(lifted.body["limits"]["memory_mb"], Value::Null);
    s.machine(&root, "prod", sized("fat", 1, 600)).await;

    // Another namespace's quota is its own.
    s.namespace(&root, "dev").await;
    put_quota(&s, &root, "dev", json!({"machines": 1})).await;
    s.machine(&root, "dev", spec("x")).await;
    exceeded(&s.post("/v1/namespaces/dev/machines", &root, spec("y")).await, "machines");
    s.machine(&root, "prod", spec("more")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_at_the_edge_never_overshoot() {
    let s = serve().await;
    let root = cluster_admin();
    s.namespace(&root, "prod").await;
    s.host(&root, "h1", 64, 1 << 16, json!({})).await;
    s.host(&root, "h2", 64, 1 << 16, json!({})).await;
    put_quota(&s, &root, "prod", json!({"machines": 3})).await;
    for round in 0..3 {
        let creates = (0..6).map(|i| s.post("/v1/namespaces/prod/machines", &root, spec(&format!("r{round}-m{i}"))));
        let replies = futures::future::join_all(creates).await;
        let created = replies.iter().filter(|r| r.status == StatusCode::CREATED).count();
        for r in replies.iter().filter(|r| r.status != StatusCode::CREATED) {
            exceeded(r, "machines");
        }
        assert_eq!(created, 3, "round {round}");
        assert_eq!(living(&s, &root, "prod").await, 3);
        // Empty it for the next round (created machines go at once).
        let list = s.get("/v1/namespaces/prod/machines", &root).await.body;
        for m in list["machines"].as_array().unwrap() {
            s.delete(&format!("/v1/namespaces/prod/machines/{}", m["id"].as_str().unwrap()), &root).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_forks_branches_and_snapshots_count() {
    let s = serve().await;
    let root = cluster_admin();
    s.namespace(&root, "prod").await;
    s.host(&root, "h1", 64, 1 << 16, json!({})).await;
    let web = s.machine(&root, "prod", spec("web")).await;
    let id = web["id"].as_str().unwrap().to_owned();
    // The seeded snapshot: 1 vCPU, 128 MB, 2 MiB on disk.
    support::seed_snapshot(&s.database_url, "prod", &id, "h1", "0123456789ab", Some("base")).await;

    put_quota(&s, &root, "prod", json!({"machines": 3})).await;
    // A fork of 3 would make 4: refused whole, nothing made.
    let fork = "/v1/namespaces/prod/snapshots/0123456789ab/fork";
    let r = s.post(fork, &root, json!({"count": 3, "name_prefix": "job"})).await;
    let detail = exceeded(&r, "machines");
    assert!(detail.contains("it has 1 and this needs 3 more"), "{detail}");
    assert_eq!(living(&s, &root, "prod").await, 1);
    // Two fit.
    let r = s.post(fork, &root, json!({"count": 2, "name_prefix": "job"})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:#}", r.body);
    // At the limit: a restore and a branch are refused too.
    let restore = s.post("/v1/namespaces/prod/machines", &root, json!({"from_snapshot": "0123456789ab"})).await;
    exceeded(&restore, "machines");
    s.post(&format!("/v1/namespaces/prod/machines/{id}/start"), &root, json!(null)).await;
    s.post(&format!("/v1/hosts/h1/machines/{id}/state"), &root, json!({"state": "started"})).await;
    exceeded(&s.post(&format!("/v1/namespaces/prod/machines/{id}/branch"), &root, json!({})).await, "machines");
    assert_eq!(living(&s, &root, "prod").await, 3);
    // Memory counted per clone: 3 machines of 128 MB, 448 allowed, a fork
    // of 1 more (128) does not fit.
    put_quota(&s, &root, "prod", json!({"memory_mb": 448})).await;
    exceeded(&s.post(fork, &root, json!({"count": 1, "name_prefix": "more"})).await, "memory_mb");
    put_quota(&s, &root, "prod", json!({"memory_mb": 512})).await;
    let r = s.post(&format!("/v1/namespaces/prod/machines/{id}/branch"), &root, json!({})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:#}", r.body);

    // Snapshot bytes: the seeded snapshot's 2 MiB are counted; at the
    // limit a snapshot is refused before any broker is asked, below it the
    // request goes on (here to the machine's state check).
    let q = s.get("/v1/namespaces/prod/quota", &root).await.body;
    assert_eq!(q["usage"]["snapshot_bytes"], 2 << 20);
    put_quota(&s, &root, "prod", json!({"snapshot_bytes": 2 << 20})).await;
    let snap = format!("/v1/namespaces/prod/machines/{}/snapshots", r.body["id"].as_str().unwrap());
    let refused = s.post(&snap, &root, json!({})).await;
    assert!(exceeded(&refused, "snapshot_bytes").contains("at most 2097152 bytes of snapshots"));
    put_quota(&s, &root, "prod", json!({"snapshot_bytes": 3 << 20})).await;
    s.post(&snap, &root, json!({})).await.problem(409);
    // Recording one that does not fit in what is left is refused (the API
    // then has its broker delete it again).
    let url = s.database_url.clone();
    let machine: uuid::Uuid = id.parse().unwrap();
    let refused = tokio::task::spawn_blocking(move || {
        use diesel::Connection;
        let mut conn = diesel::PgConnection::establish(&url).unwrap();
        let row = mm_controller::db::models::NewSnapshot {
            id: "abcdefabcdef".into(),
            namespace: "prod".into(),
            machine_id: machine,
            host_name: "h1".into(),
            name: None,
            kind: "snapshot".into(),
            cpus: 1,
            memory_mb: 128,
            memory_bytes: 1 << 20,
            disk_bytes: 2 << 20,
            pause_us: 1,
            created_at: chrono::Utc::now(),
        };
        mm_controller::store::snapshots::record(&mut conn, row, None).unwrap_err().to_string()
    })
    .await
    .unwrap();
    assert!(refused.starts_with("quota exceeded: snapshot_bytes:"), "{refused}");
    let listed = s.get("/v1/namespaces/prod/snapshots", &root).await.body;
    assert_eq!(listed["snapshots"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_quotas_and_callers_are_refused_and_change_nothing() {
    let s = serve().await;
    let root = cluster_admin();
    s.namespace(&root, "prod").await;
    s.namespace(&root, "other").await;
    put_quota(&s, &root, "prod", json!({"machines": 5, "snapshot_bytes": 1 << 30})).await;
    let before = s.get("/v1/namespaces/prod/quota", &root).await.body;

    let cases = [
        (json!({"machines": 0}), "machines must be 1 to 1000000"),
        (json!({"vcpus": -1}), "vcpus must be 1 to"),
        (json!({"memory_mb": 0}), "memory_mb must be 1 to"),
        (json!({"memory_mb": (1_i64 << 40) + 1}), "too large"),
        (json!({"snapshot_bytes": (1_i64 << 60) + 1}), "snapshot_bytes must be 1 to 1152921504606846976 (1 EiB)"),
        (json!({"snapshot_bytes": 1e30}), "expected an integer"),
        (json!({"machines": 1.5}), "expected an integer"),
        (json!({"machines": "5"}), "invalid type"),
        (json!({"machine": 5}), "unknown field"),
        (json!("machines=5"), "must be a JSON object"),
        (json!([5, 1]), "must be a JSON object"),
        (json!([]), "must be a JSON object"),
    ];
    for (body, says) in cases {
        let r = put_quota(&s, &root, "prod", body.clone()).await;
        let detail = r.problem(422);
        assert!(detail.contains(says), "{body}: {detail}");
    }
    // No body, or not JSON.
    s.call(Method::PUT, "/v1/namespaces/prod/quota", Some(&root), None).await.problem(415);
    // Unknown namespace, bad names.
    put_quota(&s, &root, "nope", json!({"machines": 1})).await.problem(404);
    s.get("/v1/namespaces/nope/quota", &root).await.problem(404);
    put_quota(&s, &root, "Bad_Name", json!({"machines": 1})).await.problem(404);

    // RBAC: a namespace's own admin reads but may not set it; a stranger
    // gets 404 for both; a viewer reads its own.
    let admin = token("alice", &[("prod", Role::Admin)], false);
    let viewer = token("vic", &[("prod", Role::Viewer)], false);
    let stranger = token("eve", &[("other", Role::Admin)], false);
    assert!(put_quota(&s, &admin, "prod", json!({})).await.problem(403).contains("cluster-admin"));
    put_quota(&s, &stranger, "prod", json!({})).await.problem(404);
    s.get("/v1/namespaces/prod/quota", &stranger).await.problem(404);
    assert_eq!(s.get("/v1/namespaces/prod/quota", &viewer).await.body["limits"]["machines"], 5);
    put_quota(&s, &viewer, "prod", json!({})).await.problem(403);

    let after = s.get("/v1/namespaces/prod/quota", &root).await.body;
    assert_eq!(before, after, "refusals changed nothing");

    // The quota goes with its namespace.
    s.delete("/v1/namespaces/prod", &root).await;
    s.namespace(&root, "prod").await;
    assert_eq!(s.get("/v1/namespaces/prod/quota", &root).await.body["limits"]["machines"], Value::Null);
}
