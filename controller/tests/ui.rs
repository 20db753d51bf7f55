//! The dashboard (`/ui/`) against a real controller and PostgreSQL: the
//! cookie login, RBAC on what pages show, paging and filters, actions
//! going through the API's handlers (refused for a viewer or without the
//! CSRF token), and escaping of hostile values.

mod support;

use std::collections::BTreeSet;

use mm_controller::auth::Role;
use reqwest::{StatusCode, header};
use serde_json::json;
use support::{Server, cluster_admin, serve, spec, token};

/// A browser stand-in: no redirects followed, so the tests see them.
fn client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

struct Page {
    status: StatusCode,
    headers: header::HeaderMap,
    body: String,
}

impl Page {
    fn location(&self) -> &str {
        self.headers.get(header::LOCATION).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    fn set_cookie(&self) -> &str {
        self.headers.get(header::SET_COOKIE).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    /// The CSRF field's value on this page.
    fn csrf(&self) -> String {
        let at = self.body.find(r#"name="csrf" value=""#).expect("a CSRF field") + r#"name="csrf" value=""#.len();
        self.body[at..].split('"').next().unwrap().to_owned()
    }

    /// The `rel="next"` link's target, unescaped.
    fn next_link(&self) -> Option<String> {
        let end = self.body.find(r#"rel="next""#)?;
        let start = self.body[..end].rfind(r#"href=""#)? + r#"href=""#.len();
        Some(self.body[start..end].trim_end().trim_end_matches('"').replace("&amp;", "&"))
    }
}

async fn fetch(request: reqwest::RequestBuilder) -> Page {
    let response = request.send().await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    Page { status, headers, body: response.text().await.unwrap() }
}

fn form(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish()
}

/// A logged-in browser.
struct Browser<'a> {
    server: &'a Server,
    client: reqwest::Client,
    cookie: String,
}

impl Browser<'_> {
    async fn login<'a>(server: &'a Server, token: &str) -> Browser<'a> {
        let page = post_login(server, token, false).await;
        assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
        let cookie = page.set_cookie().split(';').next().unwrap().to_owned();
        Browser { server, client: client(), cookie }
    }

    async fn get(&self, path: &str) -> Page {
        fetch(self.client.get(format!("{}{path}", self.server.base)).header(header::COOKIE, &self.cookie)).await
    }

    async fn post(&self, path: &str, pairs: &[(&str, &str)]) -> Page {
        let request = self.client.post(format!("{}{path}", self.server.base)).header(header::COOKIE, &self.cookie);
        let request = request.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        fetch(request.body(form(pairs))).await
    }

    /// POSTs with the CSRF token the page at `from` carries.
    async fn submit(&self, from: &str, path: &str, pairs: &[(&str, &str)]) -> Page {
        let csrf = self.get(from).await.csrf();
        let mut all = vec![("csrf", csrf.as_str())];
        all.extend_from_slice(pairs);
        self.post(path, &all).await
    }
}

async fn post_login(server: &Server, token: &str, tls: bool) -> Page {
    let mut request = client()
        .post(format!("{}/ui/login", server.base))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(form(&[("token", token)]));
    if tls {
        request = request.header("x-forwarded-proto", "https");
    }
    fetch(request).await
}

#[tokio::test]
async fn login_cookie_and_logout() {
    let s = serve().await;
    let admin = cluster_admin();
    for path in ["/ui/machines", "/ui/hosts", "/ui/tokens", "/ui/namespaces", "/ui/"] {
        let page = fetch(client().get(format!("{}{path}", s.base))).await;
        assert_eq!(page.status, StatusCode::SEE_OTHER, "{path}");
        assert!(page.location().starts_with("/ui/login") || path == "/ui/", "{path}: {}", page.location());
    }
    let page = fetch(client().get(format!("{}/ui/machines", s.base)).header(header::COOKIE, "mm_session=nope")).await;
    assert_eq!((page.status, page.location()), (StatusCode::SEE_OTHER, "/ui/login"));

    // Refused: garbage, and a well-formed token signed with another key.
    let foreign = mm_controller::auth::Keys::new(b"another-secret-another-secret-0123456789", None)
        .unwrap()
        .mint(&support::claims("root", &[], true, 3600));
    for bad in ["garbage", "<script>", foreign.as_str()] {
        let page = post_login(&s, bad, false).await;
        assert_eq!(page.status, StatusCode::UNAUTHORIZED, "{bad}");
        assert!(page.set_cookie().is_empty());
        assert!(page.body.contains("role=\"alert\""), "{}", page.body);
    }

    let page = post_login(&s, &admin, false).await;
    assert_eq!((page.status, page.location()), (StatusCode::SEE_OTHER, "/ui/machines"));
    let cookie = page.set_cookie();
    assert!(cookie.starts_with(&format!("mm_session={admin};")), "{cookie}");
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/ui", "Max-Age="] {
        assert!(cookie.contains(attribute), "{cookie} lacks {attribute}");
    }
    assert!(!cookie.contains("Secure"), "plain HTTP: {cookie}");
    let tls = post_login(&s, &admin, true).await;
    assert!(tls.set_cookie().contains("; Secure"), "{}", tls.set_cookie());

    let browser = Browser::login(&s, &admin).await;
    let page = browser.get("/ui/machines").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/html"));
    assert!(page.headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap().contains("script-src 'self'"));
    assert!(page.body.contains("Signed in as <strong>root</strong>"));
    assert!(page.body.contains(r##"href="#main""##), "skip link");

    // Logout needs the CSRF field; then the cookie is cleared.
    assert_eq!(browser.post("/ui/logout", &[]).await.status, StatusCode::FORBIDDEN);
    let out = browser.submit("/ui/machines", "/ui/logout", &[]).await;
    assert_eq!((out.status, out.location()), (StatusCode::SEE_OTHER, "/ui/login"));
    assert!(out.set_cookie().starts_with("mm_session=;") && out.set_cookie().contains("Max-Age=0"));

    // A token revoked through the API logs its session out at once.
    let short_token = s.post("/v1/tokens", &admin, json!({"subject": "short", "cluster_admin": true})).await.body;
    let short = Browser::login(&s, short_token["token"].as_str().unwrap()).await;
    assert_eq!(short.get("/ui/machines").await.status, StatusCode::OK);
    let jti = short_token["jti"].as_str().unwrap();
    assert_eq!(s.delete(&format!("/v1/tokens/{jti}"), &admin).await.status, StatusCode::NO_CONTENT);
    assert_eq!(short.get("/ui/machines").await.location(), "/ui/login");
}

/// Names of the machines (`m-…`) a machines page lists.
fn listed(page: &Page) -> Vec<String> {
    page.body
        .split("\">")
        .skip(1)
        .filter_map(|chunk| chunk.split_once("</a></th>").map(|(name, _)| name.to_owned()))
        .filter(|name| name.starts_with("m-") || name.starts_with("secret-"))
        .collect()
}

#[tokio::test]
async fn machines_page_rbac_filters_and_paging() {
    let s = serve().await;
    let admin = cluster_admin();
    s.namespace(&admin, "a").await;
    s.namespace(&admin, "b").await;
    s.host(&admin, "h1", 64, 65536, json!({})).await;
    s.host(&admin, "h2", 64, 65536, json!({})).await;
    let mut on_h1 = BTreeSet::new();
    for i in 0..60 {
        let m = s.machine(&admin, "a", spec(&format!("m-{i:02}"))).await;
        if m["host"] == "h1" {
            on_h1.insert(m["name"].as_str().unwrap().to_owned());
        }
    }
    assert!(!on_h1.is_empty() && on_h1.len() < 60, "spread over both hosts");
    s.machine(&admin, "b", spec("secret-b")).await;

    let viewer = Browser::login(&s, &token("v", &[("a", Role::Viewer)], false)).await;
    let page = viewer.get("/ui/machines").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(!page.body.contains("secret-b") && !page.body.contains(r#"value="b""#), "b is not the viewer's");
    assert_eq!(viewer.get("/ui/machines?namespace=b").await.status, StatusCode::NOT_FOUND);
    assert_eq!(viewer.get("/ui/hosts").await.status, StatusCode::FORBIDDEN);

    // Paging: 25 a page, each machine exactly once.
    let mut seen = Vec::new();
    let mut next = Some("/ui/machines?namespace=a&page_size=25".to_owned());
    let mut pages = 0;
    while let Some(url) = next {
        let page = viewer.get(&url).await;
        assert_eq!(page.status, StatusCode::OK, "{url}");
        seen.extend(listed(&page));
        next = page.next_link();
        pages += 1;
    }
    assert_eq!(pages, 3);
    let unique: BTreeSet<_> = seen.iter().cloned().collect();
    assert_eq!((seen.len(), unique.len()), (60, 60), "{seen:?}");

    // Filters: host (across pages), state.
    let mut host_seen = BTreeSet::new();
    let mut next = Some("/ui/machines?namespace=a&host=h1&page_size=10".to_owned());
    while let Some(url) = next {
        let page = viewer.get(&url).await;
        for name in listed(&page) {
            assert!(host_seen.insert(name), "seen twice");
        }
        next = page.next_link();
    }
    assert_eq!(host_seen, on_h1);
    let stopped = viewer.get("/ui/machines?namespace=a&state=stopped").await;
    assert!(listed(&stopped).is_empty() && stopped.body.contains("No machines match."));
    assert_eq!(listed(&viewer.get("/ui/machines?namespace=a&state=created&page_size=100").await).len(), 60);
}

async fn machine_state(s: &Server, api: &str) -> String {
    s.get(api, &cluster_admin()).await.body["state"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn actions_go_through_the_api_with_its_rbac_and_need_the_csrf_token() {
    let s = serve().await;
    let admin = cluster_admin();
    s.namespace(&admin, "a").await;
    s.host(&admin, "h1", 8, 8192, json!({})).await;
    let m = s.machine(&admin, "a", spec("web")).await;
    let id = m["id"].as_str().unwrap();
    let (page, api) = (format!("/ui/machines/a/{id}"), format!("/v1/namespaces/a/machines/{id}"));

    let viewer = Browser::login(&s, &token("v", &[("a", Role::Viewer)], false)).await;
    let shown = viewer.get(&page).await;
    assert!(shown.body.contains("created") && !shown.body.contains("Start…"), "a viewer gets no buttons");
    let refused = viewer.submit(&page, &format!("{page}/start"), &[]).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
    assert_eq!(machine_state(&s, &api).await, "created");

    let operator = Browser::login(&s, &token("op", &[("a", Role::Operator)], false)).await;
    assert!(operator.get(&page).await.body.contains(&format!(r#"href="{page}/start""#)));
    // The confirmation step is a page with a form, and changes nothing.
    let confirm = operator.get(&format!("{page}/start")).await;
    assert!(confirm.body.contains("Start machine web?") && confirm.body.contains(r#"method="post""#));
    assert_eq!(machine_state(&s, &api).await, "created");
    // Without the CSRF field, or with another session's, refused.
    assert_eq!(operator.post(&format!("{page}/start"), &[]).await.status, StatusCode::FORBIDDEN);
    let other = viewer.get(&page).await.csrf();
    assert_eq!(operator.post(&format!("{page}/start"), &[("csrf", &other)]).await.status, StatusCode::FORBIDDEN);
    assert_eq!(machine_state(&s, &api).await, "created");

    let done = operator.submit(&page, &format!("{page}/start"), &[]).await;
    assert_eq!((done.status, done.location()), (StatusCode::SEE_OTHER, page.as_str()), "{}", done.body);
    assert_eq!(machine_state(&s, &api).await, "starting");
    let stop = operator.submit(&page, &format!("{page}/stop"), &[]).await;
    assert_eq!(stop.status, StatusCode::SEE_OTHER);
    assert_eq!(machine_state(&s, &api).await, "stopping");
    // The API's own reasons, naming the token's subject.
    let events = s.get(&format!("{api}/events"), &admin).await.body;
    let reasons: Vec<&str> =
        events["events"].as_array().unwrap().iter().map(|e| e["reason"].as_str().unwrap()).collect();
    assert!(reasons.contains(&"Start by op") && reasons.contains(&"Stop by op"), "{reasons:?}");
    // The API's refusals come back as pages with its status.
    let again = operator.submit(&page, &format!("{page}/start"), &[]).await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{}", again.body);

    // Hosts: a cluster admin drains through the API's handler.
    let root = Browser::login(&s, &admin).await;
    assert_eq!(root.submit("/ui/hosts", "/ui/hosts/h1/drain", &[]).await.status, StatusCode::SEE_OTHER);
    assert_eq!(s.get("/v1/hosts/h1", &admin).await.body["draining"], true);
    assert_eq!(operator.submit(&page, "/ui/hosts/h1/uncordon", &[]).await.status, StatusCode::FORBIDDEN);
    assert_eq!(s.get("/v1/hosts/h1", &admin).await.body["draining"], true);

    // Namespaces and tokens.
    assert_eq!(
        root.submit("/ui/namespaces", "/ui/namespaces", &[("name", "fresh")]).await.status,
        StatusCode::SEE_OTHER
    );
    assert_eq!(s.get("/v1/namespaces/fresh", &admin).await.status, StatusCode::OK);
    let fields = [("subject", "ci"), ("namespace", "fresh"), ("role", "operator"), ("ttl_hours", "1")];
    let minted = root.submit("/ui/tokens", "/ui/tokens", &fields).await;
    assert_eq!(minted.status, StatusCode::OK, "{}", minted.body);
    let at = minted.body.find("readonly rows=\"6\" cols=\"80\">").unwrap() + "readonly rows=\"6\" cols=\"80\">".len();
    let new_token = minted.body[at..].split('<').next().unwrap();
    assert_eq!(s.get("/v1/namespaces/fresh/machines", new_token).await.status, StatusCode::OK);
}

#[tokio::test]
async fn hostile_values_are_escaped() {
    let s = serve().await;
    let admin = cluster_admin();
    s.namespace(&admin, "a").await;
    let evil = r#"<script>alert(1)</script>"'&"#;
    s.host(&admin, "h1", 8, 8192, json!({ "zone": evil })).await;
    let body = json!({ "name": "web", "labels": { "app": evil },
        "config": { "image": evil, "guest": { "cpus": 1, "memory_mb": 128 }, "env": { "X": evil }, "command": [evil] } });
    let m = s.machine(&admin, "a", body).await;
    let r =
        s.post("/v1/tokens", &admin, json!({ "subject": evil, "description": evil, "roles": { "a": "viewer" } })).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:#}", r.body);

    let root = Browser::login(&s, &admin).await;
    let pages = ["/ui/machines", &format!("/ui/machines/a/{}", m["id"].as_str().unwrap()), "/ui/hosts", "/ui/tokens"];
    for path in pages {
        let page = root.get(path).await;
        assert_eq!(page.status, StatusCode::OK, "{path}");
        assert!(!page.body.contains("<script>alert"), "{path} has the raw script");
        assert!(!page.body.contains(r#"</script>"'"#), "{path}");
        assert!(page.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "{path} lacks the escaped value");
    }
    // The hostile subject logs in and is shown escaped in the header too.
    let own = Browser::login(&s, r.body["token"].as_str().unwrap()).await;
    let page = own.get("/ui/machines").await;
    assert!(!page.body.contains("<script>alert") && page.body.contains("Signed in as <strong>&lt;script&gt;"));
}
