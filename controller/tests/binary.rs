//! The `mm-controller` binary itself: `mint-token` prints a usable token,
//! `openapi` prints the document, the server starts on a real database, serves, and stops on SIGTERM.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;

const BIN: &str = env!("CARGO_BIN_EXE_mm-controller");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mint_a_token_serve_and_stop() {
    let secret = std::str::from_utf8(support::SECRET).unwrap();
    let minted = Command::new(BIN)
        .args(["mint-token", "--subject", "root", "--cluster-admin", "--ttl", "600"])
        .env("MM_JWT_HS256_SECRET", secret)
        .output()
        .unwrap();
    assert!(minted.status.success(), "{}", String::from_utf8_lossy(&minted.stderr));
    let token = String::from_utf8(minted.stdout).unwrap().trim().to_owned();

    let refused =
        Command::new(BIN).args(["mint-token", "--subject", "x"]).env("MM_JWT_HS256_SECRET", secret).output().unwrap();
    assert!(!refused.status.success());
    let short = Command::new(BIN)
        .args(["mint-token", "--subject", "x", "--cluster-admin"])
        .env("MM_JWT_HS256_SECRET", "short")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&short.stderr).contains("at least 32 bytes"));

    // The document needs no database.
    let doc = Command::new(BIN).arg("openapi").output().unwrap();
    assert!(doc.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&doc.stdout).unwrap();
    assert!(doc["paths"]["/v1/namespaces/{namespace}/machines"].is_object());

    let url = tokio::task::spawn_blocking(support::pg::fresh_database).await.unwrap();
    let port = free_port();
    let mut child = Command::new(BIN)
        .args(["--database-url", &url, "--listen", &format!("127.0.0.1:{port}")])
        .env("MM_JWT_HS256_SECRET", secret)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client.get(format!("{base}/v1/openapi.json")).send().await {
            assert_eq!(r.status(), StatusCode::OK);
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "mm-controller exited early");
        assert!(Instant::now() < deadline, "mm-controller did not start serving");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = client
        .post(format!("{base}/v1/namespaces"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert!(r.headers().contains_key("x-request-id"));

    // A long wait in flight ends at once with a 503 when the controller
    // shuts down, rather than holding up its exit.
    let host = serde_json::json!({"name": "h1", "address": "h1:1", "cpus": 2, "memory_mb": 1024});
    client.post(format!("{base}/v1/hosts")).bearer_auth(&token).json(&host).send().await.unwrap();
    let spec = serde_json::json!({"config": {"image": "alpine", "guest": {"cpus": 1, "memory_mb": 64}}});
    let machine: serde_json::Value = client
        .post(format!("{base}/v1/namespaces/x/machines"))
        .bearer_auth(&token)
        .json(&spec)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let wait_url = format!("{base}/v1/namespaces/x/machines/{}/wait?timeout=60", machine["id"].as_str().unwrap());
    let waiter = tokio::spawn(client.get(wait_url).bearer_auth(&token).send());
    // Time for the request to reach the server before the signal.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let signalled = Instant::now();
    // SAFETY: kill(2) on the controller child this test started, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let waited = waiter.await.unwrap().unwrap();
    assert_eq!(waited.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(waited.headers()["retry-after"], "1");
    assert!(signalled.elapsed() < Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "mm-controller did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
}
