//! `GET /metrics` against a real PostgreSQL: requests counted and timed
//! by route template (not raw path), method and status; only cluster
//! admins may read it; and `X-Request-Id` on every response, echoed when
//! the client's is sane, made up when it is not.

mod support;

use mm_controller::auth::Role;
use reqwest::{Method, StatusCode};
use serde_json::json;
use support::{Server, cluster_admin, serve, token};

/// The value of the sample `series` (name and labels, exactly).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn scrape(s: &Server, who: &str) -> String {
    let r = s.get("/metrics", who).await;
    assert_eq!(r.status, StatusCode::OK, "{:#}", r.body);
    assert!(r.header("content-type").unwrap().starts_with("application/openmetrics-text"));
    r.body.as_str().expect("text").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_counted_by_route_template_and_status() {
    let s = serve().await;
    let root = cluster_admin();
    s.namespace(&root, "prod").await;
    s.namespace(&root, "dev").await;
    for ns in ["prod", "dev", "prod"] {
        let r = s.get(&format!("/v1/namespaces/{ns}"), &root).await;
        assert_eq!(r.status, StatusCode::OK, "{:#}", r.body);
    }
    let missing = s.get("/v1/namespaces/nope", &root).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let nowhere = s.get("/v1/no/such/route/123", &root).await;
    assert_eq!(nowhere.status, StatusCode::NOT_FOUND);

    let text = scrape(&s, &root).await;
    let template = r#"route="/v1/namespaces/{namespace}",method="GET""#;
    assert_eq!(
        value(&text, &format!(r#"mm_controller_http_requests_total{{{template},status="200"}}"#)),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        value(&text, &format!(r#"mm_controller_http_requests_total{{{template},status="404"}}"#)),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, r#"mm_controller_http_requests_total{route="/v1/namespaces",method="POST",status="201"}"#),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value(&text, &format!("mm_controller_http_request_duration_seconds_count{{{template}}}")),
        Some(4.0),
        "{text}"
    );
    assert!(
        value(&text, &format!(r#"mm_controller_http_request_duration_seconds_bucket{{le="30.0",{template}}}"#))
            .is_some()
            || text.contains("mm_controller_http_request_duration_seconds_bucket{"),
        "{text}"
    );
    // Raw paths never become labels; unmatched ones share one series.
    assert!(!text.contains("/v1/namespaces/prod"), "{text}");
    assert!(!text.contains("/v1/no/such"), "{text}");
    assert_eq!(
        value(&text, r#"mm_controller_http_requests_total{route="unmatched",method="GET",status="404"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "mm_controller_leader"),
        Some(1.0).filter(|_| s.controller.is_leader()).or(Some(0.0)),
        "{text}"
    );
    assert!(value(&text, "mm_controller_db_connections").is_some_and(|n| n >= 1.0), "{text}");
    assert!(text.contains("mm_controller_broker_sessions "), "{text}");
    assert!(text.ends_with("# EOF\n"));

    // Scheduling decisions: a machine placed, then one that fits nowhere.
    s.host(&root, "h1", 2, 1024, json!({})).await;
    let spec = |name: &str, cpus: i64| json!({"name": name, "config": {"image": "alpine", "guest": {"cpus": cpus, "memory_mb": 128}}});
    let placed = s.post("/v1/namespaces/prod/machines", &root, spec("a", 1)).await;
    assert_eq!(placed.status, StatusCode::CREATED, "{:#}", placed.body);
    let refused = s.post("/v1/namespaces/prod/machines", &root, spec("b", 8)).await;
    assert!(refused.status.is_client_error() || refused.status.is_server_error(), "{:#}", refused.body);
    let text = scrape(&s, &root).await;
    assert!(
        value(&text, r#"mm_controller_scheduling_decisions_total{outcome="placed"}"#).is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(
        value(&text, r#"mm_controller_scheduling_decisions_total{outcome="no_fit"}"#).is_some_and(|n| n >= 1.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_a_cluster_admin() {
    let s = serve().await;
    let anonymous = s.call(Method::GET, "/metrics", None, None).await;
    anonymous.problem(401);
    let viewer = token("viewer", &[("prod", Role::Admin)], false);
    s.get("/metrics", &viewer).await.problem(403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_carries_a_request_id() {
    let s = serve().await;
    let root = cluster_admin();
    let sane = s
        .send(s.request(Method::GET, "/v1/namespaces").bearer_auth(&root).header("X-Request-Id", "trace-42-ABC"))
        .await;
    assert_eq!(sane.status, StatusCode::OK);
    assert_eq!(sane.header("x-request-id"), Some("trace-42-ABC"));
    // Made up when absent, on successes, problems and /metrics alike.
    let mut seen = std::collections::BTreeSet::new();
    for path in ["/v1/namespaces", "/v1/namespaces/nope", "/metrics"] {
        let r = s.get(path, &root).await;
        let id = r.header("x-request-id").expect("X-Request-Id").to_owned();
        assert!(!id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'), "{id}");
        assert!(seen.insert(id), "request ids repeat");
    }
    for hostile in ["a b", "a_b", "x.y", &"a".repeat(65), "<script>"] {
        let r =
            s.send(s.request(Method::GET, "/v1/namespaces").bearer_auth(&root).header("X-Request-Id", hostile)).await;
        let id = r.header("x-request-id").expect("X-Request-Id");
        assert_ne!(id, hostile);
        assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'), "{id}");
    }
}
