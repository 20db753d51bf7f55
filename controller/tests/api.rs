//! The REST API end to end: a real controller on 127.0.0.1 against a real
//! PostgreSQL, driven over HTTP.

mod support;

use mm_controller::auth::Role;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{cluster_admin, serve, spec, token};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_and_machine_crud() {
    let s = serve().await;
    let root = cluster_admin();
    s.namespace(&root, "prod").await;
    assert_eq!(
        s.post("/v1/namespaces", &root, json!({"name": "prod"})).await.problem(409),
        "namespace \"prod\" already exists"
    );
    s.post("/v1/namespaces", &root, json!({"name": "Bad_Name"})).await.problem(422);
    let list = s.get("/v1/namespaces", &root).await;
    assert_eq!(list.body["namespaces"][0]["name"], "prod");
    assert_eq!(s.get("/v1/namespaces/prod", &root).await.body["role"], "admin");

    // No hosts yet: a clear refusal, nothing stored.
    let r = s.post("/v1/namespaces/prod/machines", &root, spec("web")).await;
    assert!(r.problem(409).contains("no hosts are registered"), "{:#}", r.body);
    s.host(&root, "h1", 4, 4096, json!({"region": "fra"})).await;

    let m = s.machine(&root, "prod", spec("web")).await;
    assert_eq!(m["state"], "created");
    assert_eq!(m["previous_state"], Value::Null);
    assert_eq!(m["host"], "h1");
    assert_eq!(m["config"]["guest"]["memory_mb"], 128);
    let id = m["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/namespaces/prod/machines/{id}");
    assert_eq!(m["config"].get("ssh_keys"), None, "no keys, no field");
    let mut with_key = spec("web2");
    with_key["config"]["ssh_keys"] = json!(["ssh-ed25519 AAAAC3Nza test@example"]);
    let again = s.post("/v1/namespaces/prod/machines", &root, with_key).await;
    let location = again.header("location").unwrap();
    let web2 = s.get(location, &root).await.body;
    assert_eq!(
        (web2["name"].as_str(), &web2["config"]["ssh_keys"]),
        (Some("web2"), &json!(["ssh-ed25519 AAAAC3Nza test@example"]))
    );
    assert_eq!(s.delete(location, &root).await.body["state"], "destroyed");
    assert_eq!(s.get(&path, &root).await.body["name"], "web");
    // Names are unique among living machines.
    s.post("/v1/namespaces/prod/machines", &root, spec("web")).await.problem(409);

    // start → starting (created is the previous state); stop → stopping.
    let started = s.post(&format!("{path}/start"), &root, json!(null)).await;
    assert_eq!(started.status, StatusCode::OK, "{:#}", started.body);
    assert_eq!(
        (started.body["state"].as_str(), started.body["previous_state"].as_str()),
        (Some("starting"), Some("created"))
    );
    // A second start is a no-op, not an error.
    assert_eq!(s.post(&format!("{path}/start"), &root, json!(null)).await.body["state"], "starting");
    // The broker stand-in reports it running.
    let reported = s.post(&format!("/v1/hosts/h1/machines/{id}/state"), &root, json!({"state": "started"})).await;
    assert_eq!(reported.body["state"], "started", "{:#}", reported.body);
    assert_eq!(reported.body["previous_state"], "starting");
    // Running machines are not deleted without force.
    assert!(s.delete(&path, &root).await.problem(409).contains("force=true"));
    let stopping = s.post(&format!("{path}/stop"), &root, json!(null)).await;
    assert_eq!(
        (stopping.body["state"].as_str(), stopping.body["previous_state"].as_str()),
        (Some("stopping"), Some("started"))
    );
    s.post(&format!("/v1/hosts/h1/machines/{id}/state"), &root, json!({"state": "stopped"})).await;
    let destroying = s.delete(&path, &root).await;
    assert_eq!(destroying.body["state"], "destroying", "{:#}", destroying.body);
    s.post(&format!("/v1/hosts/h1/machines/{id}/state"), &root, json!({"state": "destroyed"})).await;
    let gone = s.get(&path, &root).await;
    assert_eq!(
        (gone.body["state"].as_str(), gone.body["previous_state"].as_str()),
        (Some("destroyed"), Some("destroying"))
    );
    // Not listed by default; listed on request.
    assert_eq!(s.get("/v1/namespaces/prod/machines", &root).await.body["machines"], json!([]));
    let all = s.get("/v1/namespaces/prod/machines?include_destroyed=true", &root).await;
    assert_eq!(all.body["machines"].as_array().unwrap().len(), 2, "web and web2");

    // Every transition is recorded with its previous state.
    let events = s.get(&format!("{path}/events"), &root).await;
    let pairs: Vec<(String, String)> = events.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["previous_state"].as_str().unwrap_or("-").to_owned(), e["state"].as_str().unwrap().to_owned()))
        .collect();
    let expected = [
        ("-", "created"),
        ("created", "starting"),
        ("starting", "started"),
        ("started", "stopping"),
        ("stopping", "stopped"),
        ("stopped", "destroying"),
        ("destroying", "destroyed"),
    ];
    assert_eq!(pairs, expected.map(|(a, b)| (a.to_owned(), b.to_owned())));

    // The name is free again; a created machine is destroyed at once.
    let again = s.machine(&root, "prod", spec("web")).await;
    let again_path = format!("/v1/namespaces/prod/machines/{}", again["id"].as_str().unwrap());
    assert_eq!(s.delete(&again_path, &root).await.body["state"], "destroyed");

    // Integers sent as integral floats (64.0: JSON Schema's integer, what
    // Python writes) are taken. An argv item within its own limit (4096
    // characters) is still refused when the workload cannot fit the guest's
    // kernel command line (as 4096 two-byte characters cannot).
    let float_host = json!({"name": "h2", "address": "h2.test:7000", "cpus": 2.0, "memory_mb": 1024.0});
    assert_eq!(s.post("/v1/hosts", &root, float_host).await.body["cpus"], 2);
    let mut float = spec("db");
    float["config"]["guest"] = json!({"cpus": 1.0, "memory_mb": 64.0});
    float["config"]["command"] = json!(["é".repeat(4096)]);
    let too_long = s.post("/v1/namespaces/prod/machines", &root, float.clone()).await;
    assert!(too_long.problem(422).contains("kernel command line"), "{:#}", too_long.body);
    float["config"]["command"] = json!(["é".repeat(300)]);
    let db = s.machine(&root, "prod", float).await;
    assert_eq!(
        (db["config"]["guest"]["cpus"].as_i64(), db["config"]["guest"]["memory_mb"].as_i64()),
        (Some(1), Some(64))
    );
    let lease = s
        .post(&format!("/v1/namespaces/prod/machines/{}/lease", db["id"].as_str().unwrap()), &root, json!({"ttl": 5.0}))
        .await;
    assert_eq!(lease.status, StatusCode::CREATED, "{:#}", lease.body);

    // A namespace with living machines is not deleted; an empty one is.
    s.delete("/v1/namespaces/prod", &root).await.problem(409);
    s.namespace(&root, "empty").await;
    assert_eq!(s.delete("/v1/namespaces/empty", &root).await.status, StatusCode::NO_CONTENT);
    s.get("/v1/namespaces/empty", &root).await.problem(404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_walks_every_page_exactly_once() {
    let s = serve().await;
    let root = cluster_admin();
    s.namespace(&root, "p").await;
    s.host(&root, "big", 64, 1 << 20, json!({})).await;
    let mut made = Vec::new();
    for i in 0..23 {
        let mut body = spec(&format!("m{i}"));
        body["labels"] = json!({ "tier": if i % 3 == 0 { "db" } else { "web" } });
        made.push(s.machine(&root, "p", body).await["id"].as_str().unwrap().to_owned());
    }
    let walk = |query: &'static str| {
        let s = &s;
        let root = &root;
        async move {
            let mut seen = Vec::new();
            let mut token: Option<String> = None;
            let mut pages = 0;
            loop {
                let mut path = format!("/v1/namespaces/p/machines?page_size=5{query}");
                if let Some(t) = &token {
                    path += &format!("&page_token={t}");
                }
                let page = s.get(&path, root).await;
                assert_eq!(page.status, StatusCode::OK, "{:#}", page.body);
                let machines = page.body["machines"].as_array().unwrap();
                assert!(machines.len() <= 5);
                seen.extend(machines.iter().map(|m| m["id"].as_str().unwrap().to_owned()));
                pages += 1;
                match page.body["next_page_token"].as_str() {
                    Some(t) => token = Some(t.to_owned()),
                    None => break,
                }
            }
            (seen, pages)
        }
    };
    let (seen, pages) = walk("").await;
    assert_eq!(seen, made, "every machine once, in creation order");
    assert_eq!(pages, 5);
    let (db, _) = walk("&label=tier=db").await;
    let expected: Vec<_> = made.iter().step_by(3).cloned().collect();
    assert_eq!(db, expected);
    let (none, pages) = walk("&state=started").await;
    assert!(none.is_empty());
    assert_eq!(pages, 1);
    // Exactly a page's worth leaves no dangling empty page.
    let exact = s.get("/v1/namespaces/p/machines?page_size=23", &root).await;
    assert_eq!(exact.body["machines"].as_array().unwrap().len(), 23);
    assert_eq!(exact.body["next_page_token"], Value::Null);
    s.get("/v1/namespaces/p/machines?page_token=garbage", &root).await.problem(400);
    s.get("/v1/namespaces/p/machines?page_size=0", &root).await.problem(400);
    s.get("/v1/namespaces/p/machines?colour=red", &root).await.problem(400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_survives_a_controller_restart() {
    let first = serve().await;
    let root = cluster_admin();
    first.namespace(&root, "idem").await;
    first.host(&root, "h1", 8, 8192, json!({})).await;
    let create = |s: &support::Server, key: &str, body: Value| {
        s.request(Method::POST, "/v1/namespaces/idem/machines")
            .bearer_auth(&root)
            .header("Idempotency-Key", key)
            .json(&body)
    };
    let a = first.send(create(&first, "k1", spec("one"))).await;
    assert_eq!(a.status, StatusCode::CREATED, "{:#}", a.body);
    let b = first.send(create(&first, "k1", spec("one"))).await;
    assert_eq!(b.status, StatusCode::OK);
    assert_eq!(b.header("idempotent-replayed"), Some("true"));
    assert_eq!(a.body["id"], b.body["id"]);
    // Same key, different body: refused, nothing made.
    first.send(create(&first, "k1", spec("two"))).await.problem(422);
    // 64.0 is the same JSON number as 64 (an integer to JSON Schema): the
    // same request, so a replay.
    let mut float = spec("one");
    let memory = float["config"]["guest"]["memory_mb"].as_i64().unwrap();
    float["config"]["guest"]["memory_mb"] = json!(memory as f64);
    float["config"]["guest"]["cpus"] = json!(1.0);
    let replayed = first.send(create(&first, "k1", float)).await;
    assert_eq!(replayed.status, StatusCode::OK, "{:#}", replayed.body);
    assert_eq!(replayed.body["id"], a.body["id"]);

    // The client's first attempt reached a controller that then died; it
    // retries against a new controller on the same database.
    let url = first.database_url.clone();
    drop(first);
    let second = support::serve_with(&url, |_| {}).await;
    let c = second.send(create(&second, "k1", spec("one"))).await;
    assert_eq!(c.status, StatusCode::OK, "{:#}", c.body);
    assert_eq!(c.body["id"], a.body["id"]);
    let list = second.get("/v1/namespaces/idem/machines", &root).await;
    assert_eq!(list.body["machines"].as_array().unwrap().len(), 1);

    // Concurrent creates with one key make one machine.
    let tasks: Vec<_> = (0..6).map(|_| tokio::spawn(create(&second, "k2", spec("three")).send())).collect();
    let mut replies = Vec::new();
    for task in tasks {
        let response = task.await.unwrap().unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        replies.push((status, body));
    }
    let ids: std::collections::HashSet<_> = replies.iter().map(|(_, b)| b["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids.len(), 1, "{replies:#?}");
    assert_eq!(replies.iter().filter(|(s, _)| *s == StatusCode::CREATED).count(), 1);
    let list = second.get("/v1/namespaces/idem/machines", &root).await;
    assert_eq!(list.body["machines"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_returns_on_the_state_and_408_on_timeout() {
    let s = serve().await;
    let root = cluster_admin();
    s.namespace(&root, "w").await;
    s.host(&root, "h1", 8, 8192, json!({})).await;
    let id = s.machine(&root, "w", spec("m")).await["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/namespaces/w/machines/{id}");
    let t0 = std::time::Instant::now();
    let r = s.get(&format!("{path}/wait?state=started&timeout=1"), &root).await;
    assert!(r.problem(408).contains("still created"), "{:#}", r.body);
    assert!(t0.elapsed() >= std::time::Duration::from_millis(900));
    // Already there: at once.
    assert_eq!(s.get(&format!("{path}/wait?state=created&timeout=1"), &root).await.status, StatusCode::OK);
    // Reached while waiting.
    s.post(&format!("{path}/start"), &root, json!(null)).await;
    let wait_path = format!("{path}/wait?state=started&timeout=10");
    let waiter = s.get(&wait_path, &root);
    let reporter = async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        s.post(&format!("/v1/hosts/h1/machines/{id}/state"), &root, json!({"state": "started"})).await
    };
    let (waited, reported) = tokio::join!(waiter, reporter);
    assert_eq!(reported.status, StatusCode::OK);
    assert_eq!(waited.status, StatusCode::OK, "{:#}", waited.body);
    assert_eq!(waited.body["state"], "started");
    s.get(&format!("{path}/wait?state=bogus"), &root).await.problem(400);
    s.get(&format!("{path}/wait?timeout=0"), &root).await.problem(400);
}

/// The namespace's event feed: history from `after=0`, only what is new
/// without `after`, a long poll answered by the next change, and nothing
/// of another namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_feed_follows_a_namespace() {
    let s = serve().await;
    let root = cluster_admin();
    s.namespace(&root, "feed").await;
    s.namespace(&root, "elsewhere").await;
    s.host(&root, "h1", 8, 8192, json!({})).await;
    let id = s.machine(&root, "feed", spec("m")).await["id"].as_str().unwrap().to_owned();
    s.machine(&root, "elsewhere", spec("other")).await;

    let history = s.get("/v1/namespaces/feed/events?after=0", &root).await;
    assert_eq!(history.status, StatusCode::OK, "{:#}", history.body);
    let events = history.body["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "only this namespace's machine: {:#}", history.body);
    assert_eq!((events[0]["machine_name"].as_str(), events[0]["state"].as_str()), (Some("m"), Some("created")));
    assert_eq!(history.body["next_after"], events[0]["id"]);

    // From now on: nothing yet, and the cursor to follow from.
    let now = s.get("/v1/namespaces/feed/events", &root).await;
    assert_eq!(now.body["events"], json!([]), "{:#}", now.body);
    let cursor = now.body["next_after"].as_i64().unwrap();
    assert!(cursor >= events[0]["id"].as_i64().unwrap());

    // A long poll is answered by the next change, well before its wait.
    let t0 = std::time::Instant::now();
    let poll_path = format!("/v1/namespaces/feed/events?after={cursor}&wait=20");
    let poll = s.get(&poll_path, &root);
    let change = async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        s.post(&format!("/v1/namespaces/feed/machines/{id}/start"), &root, json!(null)).await
    };
    let (polled, changed) = tokio::join!(poll, change);
    assert_eq!(changed.status, StatusCode::OK);
    assert!(t0.elapsed() < std::time::Duration::from_secs(10), "answered at the change, not the wait's end");
    let events = polled.body["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{:#}", polled.body);
    assert_eq!(
        (events[0]["state"].as_str(), events[0]["previous_state"].as_str()),
        (Some("starting"), Some("created"))
    );
    assert_eq!(polled.body["next_after"], events[0]["id"]);
    // Nothing after that: an empty answer once the wait is over.
    let after = polled.body["next_after"].as_i64().unwrap();
    let quiet = s.get(&format!("/v1/namespaces/feed/events?after={after}&wait=1"), &root).await;
    assert_eq!((quiet.body["events"].clone(), quiet.body["next_after"].as_i64()), (json!([]), Some(after)));

    for bad in ["wait=61", "limit=0", "after=-1", "colour=red"] {
        s.get(&format!("/v1/namespaces/feed/events?{bad}"), &root).await.problem(400);
    }
    s.get("/v1/namespaces/nowhere/events", &root).await.problem(404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_holds_off_other_clients() {
    let s = serve().await;
    let root = cluster_admin();
    s.namespace(&root, "l").await;
    s.host(&root, "h1", 8, 8192, json!({})).await;
    let alice = token("alice", &[("l", Role::Operator)], false);
    let bob = token("bob", &[("l", Role::Operator)], false);
    let id = s.machine(&alice, "l", spec("m")).await["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/namespaces/l/machines/{id}");
    let lease = s.post(&format!("{path}/lease"), &alice, json!({"ttl": 60, "description": "deploy"})).await;
    assert_eq!(lease.status, StatusCode::CREATED, "{:#}", lease.body);
    let nonce = lease.body["nonce"].as_str().unwrap().to_owned();
    assert_eq!(lease.body["owner"], "alice");
    // Visible, without the nonce.
    let shown = s.get(&format!("{path}/lease"), &bob).await;
    assert_eq!(shown.body["owner"], "alice");
    assert!(shown.body.get("nonce").is_none());
    assert_eq!(s.get(&path, &bob).await.body["lease"]["description"], "deploy");

    // Without the nonce, or with a wrong one: 409, and nothing changes.
    assert!(s.post(&format!("{path}/start"), &bob, json!(null)).await.problem(409).contains("leased by \"alice\""));
    let wrong =
        s.request(Method::POST, &format!("{path}/start")).bearer_auth(&bob).header("Machine-Lease-Nonce", "nope");
    s.send(wrong).await.problem(409);
    s.delete(&path, &bob).await.problem(409);
    s.post(&format!("{path}/lease"), &bob, json!({})).await.problem(409);
    assert_eq!(s.get(&path, &root).await.body["state"], "created");

    // With it: allowed, and the holder can extend it.
    let with =
        s.request(Method::POST, &format!("{path}/start")).bearer_auth(&alice).header("Machine-Lease-Nonce", &nonce);
    assert_eq!(s.send(with).await.body["state"], "starting");
    let extend = s
        .request(Method::POST, &format!("{path}/lease"))
        .bearer_auth(&alice)
        .header("Machine-Lease-Nonce", &nonce)
        .json(&json!({"ttl": 120}));
    let extended = s.send(extend).await;
    assert_eq!(extended.status, StatusCode::OK);
    assert_eq!(extended.body["nonce"], nonce.as_str());

    // Release needs the nonce too (400 without the required header, 409
    // with a wrong one); afterwards anyone may act again.
    s.delete(&format!("{path}/lease"), &bob).await.problem(400);
    let wrong =
        s.request(Method::DELETE, &format!("{path}/lease")).bearer_auth(&bob).header("Machine-Lease-Nonce", "guess");
    s.send(wrong).await.problem(409);
    let release =
        s.request(Method::DELETE, &format!("{path}/lease")).bearer_auth(&alice).header("Machine-Lease-Nonce", &nonce);
    assert_eq!(s.send(release).await.status, StatusCode::NO_CONTENT);
    s.get(&format!("{path}/lease"), &bob).await.problem(404);
    assert_eq!(s.post(&format!("{path}/stop"), &bob, json!(null)).await.body["state"], "stopping");

    // An expired lease binds no one.
    let short = s.post(&format!("{path}/lease"), &alice, json!({"ttl": 1})).await;
    assert_eq!(short.status, StatusCode::CREATED);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(s.post(&format!("{path}/lease"), &bob, json!({})).await.status, StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_answers_429_with_retry_after() {
    let url = tokio::task::spawn_blocking(support::pg::fresh_database).await.unwrap();
    let s = support::serve_with(&url, |c| {
        // So slow a refill that a loaded machine cannot sneak a fourth
        // request through.
        c.rate_limit.burst = 3;
        c.rate_limit.per_second = 0.05;
    })
    .await;
    let root = cluster_admin();
    for _ in 0..3 {
        assert_eq!(s.get("/v1/namespaces", &root).await.status, StatusCode::OK);
    }
    let limited = s.get("/v1/namespaces", &root).await;
    limited.problem(429);
    let retry: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "Retry-After {retry}");
    // Per token: another token is not affected.
    assert_eq!(s.get("/v1/namespaces", &cluster_admin()).await.status, StatusCode::OK);
}
