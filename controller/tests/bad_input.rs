//! Bad input and bad credentials: each gets a clear 4xx problem document,
//! and none changes anything.

mod support;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mm_controller::auth::{Keys, Role};
use reqwest::{Method, StatusCode};
use serde_json::json;
use support::{claims, cluster_admin, serve, spec};

async fn machine_count(s: &support::Server, root: &str) -> usize {
    let list = s.get("/v1/namespaces/ns/machines?include_destroyed=true", root).await;
    list.body["machines"].as_array().unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_are_refused_and_change_nothing() {
    let s = serve().await;
    let root = cluster_admin();
    s.namespace(&root, "ns").await;
    s.host(&root, "h1", 8, 8192, json!({})).await;
    let create = || s.request(Method::POST, "/v1/namespaces/ns/machines").bearer_auth(&root);

    let r = s.send(create().header("content-type", "application/json").body("{\"name\": ")).await;
    assert!(r.problem(400).contains("EOF"), "{:#}", r.body);
    let mut unknown = spec("a");
    unknown["colour"] = json!("red");
    assert!(s.send(create().json(&unknown)).await.problem(422).contains("unknown field `colour`"));
    let mut nested = spec("a");
    nested["config"]["guest"]["gpus"] = json!(1);
    assert!(s.send(create().json(&nested)).await.problem(422).contains("unknown field `gpus`"));
    let mut wrong_type = spec("a");
    wrong_type["config"]["guest"]["cpus"] = json!("two");
    s.send(create().json(&wrong_type)).await.problem(422);
    s.send(create().body(serde_json::to_vec(&spec("a")).unwrap())).await.problem(415);
    let mut huge = spec("a");
    huge["config"]["env"] = json!({ "BIG": "x".repeat(100 * 1024) });
    s.send(create().json(&huge)).await.problem(413);
    let mut fraction = spec("a");
    fraction["config"]["guest"]["memory_mb"] = json!(64.5);
    assert!(s.send(create().json(&fraction)).await.problem(422).contains("expected an integer"));
    let mut argv = spec("a");
    argv["config"]["command"] = json!(["x".repeat(4097)]);
    s.send(create().json(&argv)).await.problem(422);
    let mut zero = spec("a");
    zero["config"]["guest"]["cpus"] = json!(0);
    assert!(s.send(create().json(&zero)).await.problem(422).contains("cpus"));
    let mut bad_env = spec("a");
    bad_env["config"]["env"] = json!({ "1X": "y" });
    s.send(create().json(&bad_env)).await.problem(422);
    let mut bad_label = spec("a");
    bad_label["labels"] = json!({ "a key": "y" });
    s.send(create().json(&bad_label)).await.problem(422);
    for keys in [json!(["ssh-ed25519 AAAA a\nssh-ed25519 BBBB b"]), json!([""]), json!(vec!["ssh-ed25519 A"; 65])] {
        let mut bad_keys = spec("a");
        bad_keys["config"]["ssh_keys"] = keys;
        assert!(s.send(create().json(&bad_keys)).await.problem(422).contains("ssh_keys"));
    }
    s.send(create().header("Idempotency-Key", "").json(&spec("a"))).await.problem(400);

    // Paths, methods and queries.
    s.get("/v1/namespaces/ns/machines/not-a-uuid", &root).await.problem(400);
    let missing = s.get(&format!("/v1/namespaces/ns/machines/{}", uuid::Uuid::nil()), &root).await;
    missing.problem(404);
    assert_eq!(s.get("/v1/nothing/here", &root).await.body["type"], "urn:micromachines:problem:no-route");
    s.get("/v1/nothing/here", &root).await.problem(404);
    s.call(Method::PUT, "/v1/namespaces", Some(&root), None).await.problem(405);
    s.delete(&format!("/v1/namespaces/ns/machines/{}?force=maybe", uuid::Uuid::nil()), &root).await.problem(400);
    for query in ["state=", "state=created,", "state=,created", "page_token=c2VxOjA!"] {
        s.get(&format!("/v1/namespaces/ns/machines?{query}"), &root).await.problem(400);
    }

    // Tokens: role keys are namespace names, and a token must grant something.
    let bad_role = json!({"subject": "x", "roles": {"Not A Name": "viewer"}});
    s.post("/v1/tokens", &root, bad_role).await.problem(422);
    s.post("/v1/tokens", &root, json!({"subject": "x", "roles": {}})).await.problem(422);

    // NUL bytes (Postgres cannot store them) anywhere: a 4xx, never a 500.
    let nul = json!({"name": "h2", "address": "a\u{0}b", "cpus": 1, "memory_mb": 64});
    s.post("/v1/hosts", &root, nul).await.problem(422);
    s.get("/v1/namespaces/a%00b", &root).await.problem(404);
    s.get("/v1/namespaces/a%00b/machines", &root).await.problem(404);
    s.post("/v1/hosts/a%00b/cordon", &root, json!(null)).await.problem(404);
    s.delete("/v1/tokens/a%00b", &root).await.problem(400);
    let mut env_nul = spec("a");
    env_nul["config"]["env"] = json!({ "X": "a\u{0}" });
    s.send(create().json(&env_nul)).await.problem(422);
    s.post("/v1/tokens", &root, json!({"subject": "a\u{0}", "cluster_admin": true})).await.problem(422);
    let mut odd = claims("x", &[], true, 600);
    odd.sub = "a\u{0}b".into();
    let odd = Keys::new(support::SECRET, None).unwrap().mint(&odd);
    assert!(s.get("/v1/namespaces", &odd).await.problem(401).contains("claim sub"));

    assert_eq!(machine_count(&s, &root).await, 0);
    // And the request id a client sends is the one it gets back.
    let tagged = s.send(s.request(Method::GET, "/v1/nothing").header("X-Request-Id", "client-123")).await;
    assert_eq!(tagged.header("x-request-id"), Some("client-123"));
    assert_eq!(tagged.body["request_id"], "client-123");
    let hostile = s.send(s.request(Method::GET, "/v1/nothing").header("X-Request-Id", "a b\"c")).await;
    assert_ne!(hostile.header("x-request-id"), Some("a b\"c"));
}

/// Issue 17: a config the guest cannot boot with is refused at create
/// (422) instead of created and then `failed`: a command, env and SSH keys
/// that together do not fit the guest's kernel command line (each alone
/// within its own limits), and 0 vCPUs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configs_that_cannot_boot_are_refused_at_create() {
    use mm_protocols::spec_rules::{WORKLOAD_CMDLINE_MAX, WorkloadSize};
    let s = serve().await;
    let root = cluster_admin();
    s.namespace(&root, "ns").await;
    s.host(&root, "h1", 8, 8192, json!({})).await;
    let create = || s.request(Method::POST, "/v1/namespaces/ns/machines").bearer_auth(&root);

    // 8 KiB of env: under the body limit (64 KiB) and each field's own.
    let value = "x".repeat(8 * 1024);
    let mut big = spec("big");
    big["config"]["env"] = json!({ "A": value });
    let reply = s.send(create().json(&big)).await;
    let detail = reply.problem(422);
    let size = WorkloadSize::of(&[], [("A", value.as_str())], &[]).total();
    assert!(detail.contains("kernel command line"), "{detail}");
    assert!(detail.contains(&size.to_string()) && detail.contains(&WORKLOAD_CMDLINE_MAX.to_string()), "{detail}");
    // Checked before any database work, as the other rules are: also where
    // the namespace does not exist.
    let nowhere = s.request(Method::POST, "/v1/namespaces/nowhere/machines").bearer_auth(&root);
    assert!(s.send(nowhere.json(&big)).await.problem(422).contains("kernel command line"));
    // The sum counts: command, env and keys that each fit alone.
    let mut sum = spec("sum");
    sum["config"]["command"] = json!(["sh", "-c", "y".repeat(400)]);
    sum["config"]["env"] = json!({ "B": "z".repeat(400) });
    sum["config"]["ssh_keys"] = json!(vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGs= me@host"; 5]);
    assert!(s.send(create().json(&sum)).await.problem(422).contains("kernel command line"));
    // 0 vCPUs is not taken for 1.
    let mut zero = spec("zero");
    zero["config"]["guest"]["cpus"] = json!(0);
    assert!(s.send(create().json(&zero)).await.problem(422).contains("cpus"));
    assert_eq!(machine_count(&s, &root).await, 0);

    // What fits is taken.
    let mut fits = spec("fits");
    fits["config"]["env"] = json!({ "A": "x".repeat(900) });
    let made = s.send(create().json(&fits)).await;
    assert_eq!(made.status, StatusCode::CREATED, "{:#}", made.body);
    // And the OpenAPI document says so.
    let doc = s.call(Method::GET, "/v1/openapi.json", None, None).await.body;
    let said = doc["components"]["schemas"]["MachineConfig"]["description"].as_str().unwrap_or_default();
    assert!(said.contains(&WORKLOAD_CMDLINE_MAX.to_string()), "{said:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_get_401_and_change_nothing() {
    let s = serve().await;
    let root = cluster_admin();
    s.namespace(&root, "ns").await;
    s.host(&root, "h1", 8, 8192, json!({})).await;
    let attempt = |auth: Option<String>| {
        let mut r = s.request(Method::POST, "/v1/namespaces/ns/machines").json(&spec("x"));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        s.send(r)
    };
    let missing = attempt(None).await;
    assert!(missing.problem(401).contains("missing bearer token"));
    assert_eq!(missing.header("www-authenticate"), Some("Bearer realm=\"mm-controller\""));
    assert!(attempt(Some("Basic cm9vdDpyb290".into())).await.problem(401).contains("Bearer"));
    attempt(Some("Bearer not-a-jwt".into())).await.problem(401);

    let operator = [("ns", Role::Operator)];
    let foreign = Keys::new(b"some-other-secret-that-is-long-enough", None).unwrap();
    let forged = foreign.mint(&claims("mallory", &operator, true, 3600));
    assert!(attempt(Some(format!("Bearer {forged}"))).await.problem(401).contains("signature"));
    let ours = Keys::new(support::SECRET, None).unwrap();
    let expired = ours.mint(&claims("alice", &operator, false, -3600));
    assert!(attempt(Some(format!("Bearer {expired}"))).await.problem(401).contains("expired"));
    // "none" and other algorithms are refused outright.
    let mut header = Header::new(Algorithm::HS512);
    header.typ = Some("JWT".into());
    let hs512 = jsonwebtoken::encode(
        &header,
        &claims("alice", &operator, false, 3600),
        &EncodingKey::from_secret(support::SECRET),
    )
    .unwrap();
    assert!(attempt(Some(format!("Bearer {hs512}"))).await.problem(401).contains("HS512"));

    // A token minted through the API works until it is revoked.
    let minted = s.post("/v1/tokens", &root, json!({"subject": "ci", "roles": {"ns": "operator"}})).await;
    assert_eq!(minted.status, StatusCode::CREATED, "{:#}", minted.body);
    let token = minted.body["token"].as_str().unwrap().to_owned();
    let jti = minted.body["jti"].as_str().unwrap().to_owned();
    assert_eq!(s.get("/v1/namespaces/ns/machines", &token).await.status, StatusCode::OK);
    assert_eq!(s.delete(&format!("/v1/tokens/{jti}"), &root).await.status, StatusCode::NO_CONTENT);
    assert!(attempt(Some(format!("Bearer {token}"))).await.problem(401).contains("revoked"));
    let listed = s.get("/v1/tokens", &root).await;
    let entry = listed.body["tokens"].as_array().unwrap().iter().find(|t| t["jti"] == jti.as_str()).unwrap().clone();
    assert_eq!(entry["revoked"], true);
    assert!(entry.get("token").is_none(), "the secret is never listed");

    let list = s.get("/v1/namespaces/ns/machines?include_destroyed=true", &root).await;
    assert_eq!(list.body["machines"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_tokens_from_an_external_issuer() {
    let dir = std::env::temp_dir().join(format!("mm-controller-rsa-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let private = dir.join("key.pem");
    let public = dir.join("pub.pem");
    let ok = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"])
        .arg(&private)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl genpkey");
    let ok = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public)
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl pkey -pubout");
    let private_pem = std::fs::read(&private).unwrap();
    let public_pem = std::fs::read(&public).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    let url = tokio::task::spawn_blocking(support::pg::fresh_database).await.unwrap();
    let pem = public_pem.clone();
    let s = support::serve_with(&url, move |c| c.jwt_rs256_public_key_pem = Some(pem)).await;
    let root = cluster_admin();
    s.namespace(&root, "ns").await;
    let key = EncodingKey::from_rsa_pem(&private_pem).unwrap();
    let external = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims("idp-user", &[("ns", Role::Viewer)], false, 600),
        &key,
    )
    .unwrap();
    assert_eq!(s.get("/v1/namespaces/ns", &external).await.status, StatusCode::OK);
    // The public key used as an HMAC secret (algorithm confusion) fails.
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims("x", &[("ns", Role::Admin)], true, 600),
        &EncodingKey::from_secret(&public_pem),
    )
    .unwrap();
    s.get("/v1/namespaces/ns", &confused).await.problem(401);
    // External token ids can be revoked by a cluster admin.
    let jti = jsonwebtoken::decode::<mm_controller::auth::Claims>(
        &external,
        &jsonwebtoken::DecodingKey::from_rsa_pem(&public_pem).unwrap(),
        &jsonwebtoken::Validation::new(Algorithm::RS256),
    )
    .unwrap()
    .claims
    .jti;
    assert_eq!(s.delete(&format!("/v1/tokens/{jti}"), &root).await.status, StatusCode::NO_CONTENT);
    s.get("/v1/namespaces/ns", &external).await.problem(401);
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `GET path` as a WebSocket with `token`; a refused upgrade is its
/// status and problem document.
async fn websocket(s: &support::Server, path: &str, token: &str) -> Result<Socket, (u16, serde_json::Value)> {
    use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};
    let mut request = format!("ws://{}{path}", s.addr).into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(tungstenite::Error::Http(response)) => {
            let body = response.body().as_deref().unwrap_or_default();
            Err((response.status().as_u16(), serde_json::from_slice(body).unwrap_or(serde_json::Value::Null)))
        }
        Err(e) => panic!("{path}: {e}"),
    }
}

/// Sends `first` and returns what the controller answers: its status frame
/// (channel 3) and its close code and reason.
async fn first_message_answer(
    socket: &mut Socket,
    first: tokio_tungstenite::tungstenite::Message,
) -> (serde_json::Value, u16, String) {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    socket.send(first).await.unwrap();
    let mut status = serde_json::Value::Null;
    let deadline = std::time::Duration::from_secs(20);
    loop {
        let message = tokio::time::timeout(deadline, socket.next()).await.expect("an answer in time");
        match message {
            Some(Ok(Message::Binary(data))) => {
                assert_eq!(data[0], 3, "only a status frame before the close: {data:?}");
                status = serde_json::from_slice(&data[1..]).unwrap();
            }
            Some(Ok(Message::Close(Some(frame)))) => return (status, u16::from(frame.code), frame.reason.to_string()),
            other => panic!("unexpected {other:?} (status so far {status})"),
        }
    }
}

/// The WebSocket exec and the log follow refuse what exec and logs refuse,
/// before the upgrade as problem documents; a bad first message, an
/// oversized one or an unreachable host after it, as a status frame and a
/// close code that says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_exec_and_follow_refusals() {
    use tokio_tungstenite::tungstenite::Message;
    let s = serve().await;
    let root = cluster_admin();
    s.namespace(&root, "ns").await;
    s.namespace(&root, "other").await;
    s.host(&root, "h1", 8, 8192, json!({})).await;
    let operator = support::token("op", &[("ns", Role::Operator)], false);
    let viewer = support::token("eve", &[("ns", Role::Viewer)], false);
    let stranger = support::token("mallory", &[("other", Role::Admin)], false);
    let created = s.machine(&operator, "ns", spec("idle")).await;
    let started = s.machine(&operator, "ns", spec("busy")).await;
    let (created, started) = (created["id"].as_str().unwrap(), started["id"].as_str().unwrap());
    let r = s.post(&format!("/v1/hosts/h1/machines/{started}/state"), &root, json!({ "state": "started" })).await;
    assert!(r.status.is_success(), "{:#}", r.body);
    let ws_path = |id: &str| format!("/v1/namespaces/ns/machines/{id}/exec/ws");

    // Before the upgrade: problem documents.
    let refused = |r: Result<Socket, (u16, serde_json::Value)>| r.expect_err("refused");
    let (status, body) = refused(websocket(&s, &ws_path(started), &viewer).await);
    assert_eq!((status, body["type"].as_str()), (403, Some("urn:micromachines:problem:forbidden")), "{body:#}");
    let (status, body) = refused(websocket(&s, &ws_path(started), &stranger).await);
    assert_eq!(status, 404, "another tenant's namespace is not there: {body:#}");
    let (status, _) = refused(websocket(&s, &ws_path(&uuid::Uuid::new_v4().to_string()), &operator).await);
    assert_eq!(status, 404);
    let (status, body) = refused(websocket(&s, &ws_path(created), &operator).await);
    assert_eq!(status, 409, "{body:#}");
    assert!(body["detail"].as_str().unwrap().contains("must be started"), "{body:#}");
    let (status, _) = refused(websocket(&s, &ws_path(started), "not-a-token").await);
    assert_eq!(status, 401);
    // A plain GET is told to upgrade.
    let plain = s.get(&ws_path(started), &operator).await;
    assert!(plain.problem(426).contains("WebSocket"));
    assert_eq!(plain.header("upgrade"), Some("websocket"));

    // After it: a status frame with the error, then a close code.
    let mut socket = websocket(&s, &ws_path(started), &operator).await.unwrap();
    let (status, code, reason) = first_message_answer(&mut socket, Message::text("echo hi")).await;
    assert_eq!((code, status["kind"].as_str()), (4400, Some("bad-request")), "{status} {reason}");
    assert!(reason.contains("exec request as JSON"), "{reason}");
    let mut socket = websocket(&s, &ws_path(started), &operator).await.unwrap();
    let unknown = json!({ "command": ["true"], "colour": "red" }).to_string();
    let (status, code, _) = first_message_answer(&mut socket, Message::text(unknown)).await;
    assert_eq!(code, 4400, "{status}");
    assert!(status["error"].as_str().unwrap().contains("unknown field `colour`"), "{status}");
    let mut socket = websocket(&s, &ws_path(started), &operator).await.unwrap();
    let (status, code, _) = first_message_answer(&mut socket, Message::text(r#"{"command": []}"#)).await;
    assert_eq!((code, status["kind"].as_str()), (4422, Some("invalid-request")), "{status}");
    let mut socket = websocket(&s, &ws_path(started), &operator).await.unwrap();
    let huge = json!({ "command": ["echo", "x".repeat(100 * 1024)] }).to_string();
    let (status, code, reason) = first_message_answer(&mut socket, Message::text(huge)).await;
    assert_eq!((code, status["kind"].as_str()), (1009, Some("payload-too-large")), "{status} {reason}");
    // Well-formed, but this controller has no session with the host.
    let mut socket = websocket(&s, &ws_path(started), &operator).await.unwrap();
    let good = json!({ "command": ["true"], "tty": true, "rows": 40, "cols": 100 }).to_string();
    let (status, code, _) = first_message_answer(&mut socket, Message::text(good)).await;
    assert_eq!((code, status["kind"].as_str()), (4503, Some("host-unavailable")), "{status}");

    // Stats: a viewer's, of a started machine only, 503 without a session.
    let stats = |id: &str| format!("/v1/namespaces/ns/machines/{id}/stats");
    assert!(s.get(&stats(created), &viewer).await.problem(409).contains("must be started"));
    s.get(&stats(started), &stranger).await.problem(404);
    s.get(&stats(started), &viewer).await.problem(503);

    // The port tunnel: the same checks before the upgrade, a port that is
    // none refused, and a clear close code when no connection can be made.
    let port_path = |id: &str, port: &str| format!("/v1/namespaces/ns/machines/{id}/ports/{port}/ws");
    let (status, _) = refused(websocket(&s, &port_path(started, "22"), &viewer).await);
    assert_eq!(status, 403);
    let (status, _) = refused(websocket(&s, &port_path(started, "22"), &stranger).await);
    assert_eq!(status, 404);
    let (status, body) = refused(websocket(&s, &port_path(created, "22"), &operator).await);
    assert_eq!(status, 409, "{body:#}");
    for (port, want) in [("0", 422), ("65536", 400), ("ssh", 400)] {
        let (status, body) = refused(websocket(&s, &port_path(started, port), &operator).await);
        assert_eq!(status, want, "port {port}: {body:#}");
    }
    assert!(s.get(&port_path(started, "22"), &operator).await.problem(426).contains("WebSocket"));
    let mut socket = websocket(&s, &port_path(started, "22"), &operator).await.unwrap();
    let answer = tokio::time::timeout(std::time::Duration::from_secs(20), futures::StreamExt::next(&mut socket)).await;
    match answer.expect("an answer in time") {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 4503, "{frame:?}");
            assert!(frame.reason.contains("broker session"), "{frame:?}");
        }
        other => panic!("expected a close with 4503, got {other:?}"),
    }

    // The log follow: same rules as logs, and a clear word on a bad flag.
    let logs = |id: &str, query: &str| format!("/v1/namespaces/ns/machines/{id}/logs?{query}");
    s.get(&logs(created, "follow=true"), &operator).await.problem(409);
    s.get(&logs(started, "follow=true"), &stranger).await.problem(404);
    s.get(&logs(started, "follow=maybe"), &viewer).await.problem(400);
    s.get(&logs(started, "follow=true"), &viewer).await.problem(503);
}

/// Snapshots, restores and suspends asked wrongly: unknown snapshots,
/// another namespace's, a restore that could only land on another host
/// than the snapshot's, bad names, ids and queries, machines that are not
/// running. Each is a problem document and changes nothing. No broker is
/// needed: the snapshots are recorded as a broker's would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_refusals() {
    let s = serve().await;
    let root = cluster_admin();
    s.namespace(&root, "ns").await;
    s.namespace(&root, "other").await;
    s.host(&root, "h1", 8, 8192, json!({ "zone": "a" })).await;
    s.host(&root, "h2", 64, 65536, json!({ "zone": "b" })).await;
    let operator = support::token("op", &[("ns", Role::Operator)], false);
    let viewer = support::token("v", &[("ns", Role::Viewer)], false);
    let mut on_h1 = spec("web");
    on_h1["placement"] = json!({ "host_labels": { "zone": "a" } });
    let web = s.machine(&root, "ns", on_h1.clone()).await;
    let path = format!("/v1/namespaces/ns/machines/{}", web["id"].as_str().unwrap());
    support::seed_snapshot(&s.database_url, "ns", web["id"].as_str().unwrap(), "h1", "0123456789ab", Some("before"))
        .await;
    let theirs = s.machine(&root, "other", on_h1).await;
    support::seed_snapshot(&s.database_url, "other", theirs["id"].as_str().unwrap(), "h1", "ba9876543210", None).await;
    let create = |body: serde_json::Value| s.post("/v1/namespaces/ns/machines", &operator, body);

    // Unknown, and another namespace's: the same 404.
    assert!(create(json!({ "from_snapshot": "ffffffffffff" })).await.problem(404).contains("snapshot"));
    create(json!({ "from_snapshot": "ba9876543210" })).await.problem(404);
    for sid in ["ffffffffffff", "ba9876543210", "a%20b", "a%00b"] {
        s.get(&format!("/v1/namespaces/ns/snapshots/{sid}"), &operator).await.problem(404);
        s.delete(&format!("/v1/namespaces/ns/snapshots/{sid}"), &operator).await.problem(404);
    }
    s.get("/v1/namespaces/other/snapshots", &operator).await.problem(404);
    s.get("/v1/namespaces/other/snapshots/ba9876543210", &operator).await.problem(404);
    let listed = s.get("/v1/namespaces/ns/snapshots", &viewer).await;
    assert_eq!(listed.body["snapshots"].as_array().unwrap().len(), 1, "{:#}", listed.body);
    s.get(&format!("/v1/namespaces/ns/machines/{}/snapshots", theirs["id"].as_str().unwrap()), &viewer)
        .await
        .problem(404);

    // A restore goes to the snapshot's host or nowhere, and says so.
    let elsewhere = json!({ "from_snapshot": "0123456789ab", "placement": { "host_labels": { "zone": "b" } } });
    let refused = create(elsewhere).await;
    let detail = refused.problem(409);
    assert!(detail.contains("can only be placed on host h1, which holds the snapshot"), "{detail}");
    assert!(detail.contains("lacking the labels"), "{detail}");
    assert_eq!(refused.body["type"], "urn:micromachines:problem:insufficient-capacity");
    s.post("/v1/hosts/h1/cordon", &root, json!(null)).await;
    assert!(create(json!({ "from_snapshot": "0123456789ab" })).await.problem(409).contains("1 cordoned"));
    s.post("/v1/hosts/h1/uncordon", &root, json!(null)).await;
    // A config may not contradict the snapshot it resumes.
    let mut bigger = spec("x");
    bigger["from_snapshot"] = json!("0123456789ab");
    bigger["config"]["guest"]["memory_mb"] = json!(256);
    assert!(create(bigger.clone()).await.problem(422).contains("config.guest must be 1 CPU(s) and 128 MB"));
    bigger["config"]["guest"]["memory_mb"] = json!(128);
    bigger["config"]["image"] = json!("debian");
    assert!(create(bigger.clone()).await.problem(422).contains("config.image"));
    bigger["config"]["image"] = json!("alpine");
    bigger["config"]["command"] = json!(["sh"]);
    assert!(create(bigger).await.problem(422).contains("config.command"));

    // Neither a config nor a snapshot; malformed ids, names and queries.
    assert!(create(json!({ "name": "x" })).await.problem(422).contains("config is required"));
    for sid in [json!("a/b"), json!(""), json!("x".repeat(65)), json!(7)] {
        create(json!({ "from_snapshot": sid })).await.problem(422);
    }
    let snapshots = format!("{path}/snapshots");
    let snapshot = |body: serde_json::Value| s.post(&snapshots, &operator, body);
    for name in [json!("Bad_Name"), json!("x".repeat(64)), json!("-a"), json!(""), json!(5)] {
        snapshot(json!({ "name": name })).await.problem(422);
    }
    assert!(snapshot(json!({ "colour": "red" })).await.problem(422).contains("unknown field"));
    let no_body = s.request(Method::POST, &format!("{path}/snapshots")).bearer_auth(&operator);
    s.send(no_body).await.problem(415);
    for query in ["page_size=0", "page_size=501", "bogus=1", "page_token=!!", "page_token=c2VxOng"] {
        s.get(&format!("/v1/namespaces/ns/snapshots?{query}"), &viewer).await.problem(400);
    }
    s.get(&format!("/v1/namespaces/ns/machines/{}/snapshots", uuid::Uuid::nil()), &viewer).await.problem(404);
    let with_key = s.request(Method::POST, &format!("{path}/snapshots")).bearer_auth(&operator);
    s.send(with_key.header("Idempotency-Key", "a b").json(&json!({}))).await.problem(400);

    // Not running: nothing to snapshot or suspend (no broker is asked).
    assert!(snapshot(json!({})).await.problem(409).contains("must be started"));
    assert!(s.post(&format!("{path}/suspend"), &operator, json!(null)).await.problem(409).contains("cannot suspend"));
    // Roles: a viewer reads, an operator changes.
    s.post(&format!("{path}/snapshots"), &viewer, json!({})).await.problem(403);
    s.delete("/v1/namespaces/ns/snapshots/0123456789ab", &viewer).await.problem(403);
    s.post(&format!("{path}/suspend"), &viewer, json!(null)).await.problem(403);

    // A snapshot a machine still waits to be restored from stays.
    let waiting = s.machine(&operator, "ns", json!({ "name": "restored", "from_snapshot": "0123456789ab" })).await;
    assert_eq!((waiting["host"].as_str(), waiting["state"].as_str()), (Some("h1"), Some("created")));
    let busy = s.delete("/v1/namespaces/ns/snapshots/0123456789ab", &operator).await;
    assert!(busy.problem(409).contains("being restored from snapshot 0123456789ab"), "{:#}", busy.body);
    s.delete(&format!("/v1/namespaces/ns/machines/{}", waiting["id"].as_str().unwrap()), &operator).await;
    // Deleting needs the host's broker: without a session, 503 and it stays.
    let unreachable = s.delete("/v1/namespaces/ns/snapshots/0123456789ab", &operator).await;
    assert_eq!(unreachable.body["type"], "urn:micromachines:problem:host-unavailable", "{:#}", unreachable.body);
    unreachable.problem(503);
    assert_eq!(s.get("/v1/namespaces/ns/snapshots/0123456789ab", &viewer).await.body["name"], "before");
    // The machine was never touched.
    let now = s.get(&path, &root).await.body;
    assert_eq!((now["state"].as_str(), &now["updated_at"]), (Some("created"), &web["updated_at"]));
}
