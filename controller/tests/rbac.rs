//! The RBAC matrix: every route × every role × own and other namespace.
//!
//! Rules under test (see controller/README.md):
//! * viewer < operator < admin within a namespace; a cluster admin is admin
//!   everywhere and alone may touch hosts and create or delete namespaces;
//! * a token with no role in a namespace gets 404 there, exactly as if the
//!   namespace (or machine) did not exist; a role too small gets 403;
//! * a refused request changes nothing.

mod support;

use mm_controller::auth::Role;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Server, cluster_admin, spec, token};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Who {
    Ns(Role),
    ClusterAdmin,
}

/// What a route needs.
#[derive(Debug, Clone, Copy)]
enum Need {
    Public,
    AnyToken,
    InNamespace(Role),
    /// Cluster admin, on a namespace path (so strangers get 404 first).
    ClusterAdminInNamespace,
    ClusterAdmin,
    /// Admin in the namespace the token names; `hidden` = refusals are 404.
    TokenAdmin {
        hidden: bool,
    },
}

/// The machine a case acts on, made fresh by the cluster admin.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Prep {
    None,
    Machine,
    Starting,
    Started,
    Leased,
    MintedToken,
    /// A machine with a snapshot (`{sid}`), recorded as its broker would.
    Snapshot,
}

struct Route {
    method: Method,
    path: &'static str,
    body: Option<fn(&str) -> Value>,
    need: Need,
    prep: Prep,
    ok: u16,
}

fn routes() -> Vec<Route> {
    use Need::*;
    use Role::*;
    let r = |method, path, body, need, prep, ok| Route { method, path, body, need, prep, ok };
    vec![
        r(Method::GET, "/v1/openapi.json", None, Public, Prep::None, 200),
        r(Method::GET, "/v1/namespaces", None, AnyToken, Prep::None, 200),
        r(Method::POST, "/v1/namespaces", Some(|u| json!({"name": format!("n{u}")})), ClusterAdmin, Prep::None, 201),
        r(Method::GET, "/v1/namespaces/{ns}", None, InNamespace(Viewer), Prep::None, 200),
        // Past the checks a namespace with machines is refused: still proof
        // the caller got through.
        r(Method::DELETE, "/v1/namespaces/{ns}", None, ClusterAdminInNamespace, Prep::None, 409),
        r(Method::GET, "/v1/namespaces/{ns}/quota", None, InNamespace(Viewer), Prep::None, 200),
        // Setting a quota is the cluster admin's, also in one's own namespace.
        r(Method::PUT, "/v1/namespaces/{ns}/quota", Some(|_| json!({})), ClusterAdminInNamespace, Prep::None, 200),
        r(Method::GET, "/v1/namespaces/{ns}/machines", None, InNamespace(Viewer), Prep::None, 200),
        r(Method::GET, "/v1/namespaces/{ns}/events?after=0", None, InNamespace(Viewer), Prep::None, 200),
        r(
            Method::POST,
            "/v1/namespaces/{ns}/machines",
            Some(|u| spec(&format!("c{u}"))),
            InNamespace(Operator),
            Prep::None,
            201,
        ),
        r(Method::GET, "/v1/namespaces/{ns}/machines/{id}", None, InNamespace(Viewer), Prep::Machine, 200),
        r(Method::DELETE, "/v1/namespaces/{ns}/machines/{id}", None, InNamespace(Operator), Prep::Machine, 200),
        r(Method::POST, "/v1/namespaces/{ns}/machines/{id}/start", None, InNamespace(Operator), Prep::Machine, 200),
        r(Method::POST, "/v1/namespaces/{ns}/machines/{id}/stop", None, InNamespace(Operator), Prep::Starting, 200),
        r(Method::POST, "/v1/namespaces/{ns}/machines/{id}/suspend", None, InNamespace(Operator), Prep::Started, 200),
        // A branch is a create: operator, and the record needs no broker.
        r(
            Method::POST,
            "/v1/namespaces/{ns}/machines/{id}/branch",
            Some(|_| json!({})),
            InNamespace(Operator),
            Prep::Started,
            201,
        ),
        // Allowed, but a created machine has nothing to snapshot: 409.
        r(
            Method::POST,
            "/v1/namespaces/{ns}/machines/{id}/snapshots",
            Some(|_| json!({})),
            InNamespace(Operator),
            Prep::Machine,
            409,
        ),
        r(Method::GET, "/v1/namespaces/{ns}/machines/{id}/snapshots", None, InNamespace(Viewer), Prep::Snapshot, 200),
        r(Method::GET, "/v1/namespaces/{ns}/snapshots", None, InNamespace(Viewer), Prep::None, 200),
        r(Method::GET, "/v1/namespaces/{ns}/snapshots/{sid}", None, InNamespace(Viewer), Prep::Snapshot, 200),
        // Allowed, but no broker session holds the snapshot's host here: 503.
        r(Method::DELETE, "/v1/namespaces/{ns}/snapshots/{sid}", None, InNamespace(Operator), Prep::Snapshot, 503),
        r(
            Method::POST,
            "/v1/namespaces/{ns}/machines",
            Some(|u| json!({"name": format!("r{u}"), "from_snapshot": "{sid}"})),
            InNamespace(Operator),
            Prep::Snapshot,
            201,
        ),
        r(
            Method::POST,
            "/v1/namespaces/{ns}/snapshots/{sid}/fork",
            Some(|u| json!({"count": 2, "name_prefix": format!("f{u}")})),
            InNamespace(Operator),
            Prep::Snapshot,
            201,
        ),
        r(
            Method::GET,
            "/v1/namespaces/{ns}/machines/{id}/wait?state=created&timeout=1",
            None,
            InNamespace(Viewer),
            Prep::Machine,
            200,
        ),
        r(Method::GET, "/v1/namespaces/{ns}/machines/{id}/events", None, InNamespace(Viewer), Prep::Machine, 200),
        // Allowed, but a created machine has no microVM yet: 409.
        r(
            Method::POST,
            "/v1/namespaces/{ns}/machines/{id}/exec",
            Some(|_| json!({"command": ["true"]})),
            InNamespace(Operator),
            Prep::Machine,
            409,
        ),
        // The WebSocket exec: checked like exec before the upgrade.
        r(Method::GET, "/v1/namespaces/{ns}/machines/{id}/exec/ws", None, InNamespace(Operator), Prep::Machine, 409),
        r(Method::GET, "/v1/namespaces/{ns}/machines/{id}/logs", None, InNamespace(Viewer), Prep::Machine, 409),
        r(Method::GET, "/v1/namespaces/{ns}/machines/{id}/stats", None, InNamespace(Viewer), Prep::Machine, 409),
        // The port tunnel: like the WebSocket exec.
        r(
            Method::GET,
            "/v1/namespaces/{ns}/machines/{id}/ports/22/ws",
            None,
            InNamespace(Operator),
            Prep::Machine,
            409,
        ),
        r(
            Method::GET,
            "/v1/namespaces/{ns}/machines/{id}/logs?follow=true",
            None,
            InNamespace(Viewer),
            Prep::Machine,
            409,
        ),
        r(Method::GET, "/v1/namespaces/{ns}/machines/{id}/lease", None, InNamespace(Viewer), Prep::Leased, 200),
        r(
            Method::POST,
            "/v1/namespaces/{ns}/machines/{id}/lease",
            Some(|_| json!({})),
            InNamespace(Operator),
            Prep::Machine,
            201,
        ),
        r(Method::DELETE, "/v1/namespaces/{ns}/machines/{id}/lease", None, InNamespace(Operator), Prep::Leased, 204),
        r(Method::GET, "/v1/hosts", None, ClusterAdmin, Prep::None, 200),
        r(
            Method::POST,
            "/v1/hosts",
            Some(|_| json!({"name": "h1", "address": "h1:1", "cpus": 512, "memory_mb": 1 << 22})),
            ClusterAdmin,
            Prep::None,
            200,
        ),
        r(Method::GET, "/v1/hosts/h1", None, ClusterAdmin, Prep::None, 200),
        r(Method::POST, "/v1/hosts/spare/cordon", None, ClusterAdmin, Prep::None, 200),
        r(Method::POST, "/v1/hosts/spare/uncordon", None, ClusterAdmin, Prep::None, 200),
        r(Method::POST, "/v1/hosts/spare/drain", None, ClusterAdmin, Prep::None, 200),
        r(
            Method::POST,
            "/v1/hosts/{host}/machines/{id}/state",
            Some(|_| json!({"state": "failed"})),
            ClusterAdmin,
            Prep::Machine,
            200,
        ),
        r(Method::GET, "/v1/tokens", None, AnyToken, Prep::None, 200),
        r(
            Method::POST,
            "/v1/tokens",
            Some(|_| json!({"subject": "s", "roles": {"{ns}": "viewer"}})),
            TokenAdmin { hidden: false },
            Prep::None,
            201,
        ),
        r(Method::DELETE, "/v1/tokens/{jti}", None, TokenAdmin { hidden: true }, Prep::MintedToken, 204),
    ]
}

fn expected(route: &Route, who: Who, own: bool) -> u16 {
    let ok = route.ok;
    if who == Who::ClusterAdmin {
        return ok;
    }
    let Who::Ns(role) = who else { unreachable!() };
    match route.need {
        Need::Public | Need::AnyToken => ok,
        Need::ClusterAdmin => 403,
        Need::ClusterAdminInNamespace => {
            if own {
                403
            } else {
                404
            }
        }
        Need::InNamespace(min) => {
            if !own {
                404
            } else if role >= min {
                ok
            } else {
                403
            }
        }
        Need::TokenAdmin { hidden } => {
            if !own {
                404
            } else if role == Role::Admin {
                ok
            } else if hidden {
                404
            } else {
                403
            }
        }
    }
}

/// What the cluster admin sees of a machine, to prove refusals changed
/// nothing.
async fn snapshot(s: &Server, root: &str, ns: &str, id: &str) -> Value {
    let mut m = s.get(&format!("/v1/namespaces/{ns}/machines/{id}"), root).await.body;
    m.as_object_mut().unwrap().remove("updated_at");
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_on_every_route_in_own_and_other_namespace() {
    let s = support::serve().await;
    let root = cluster_admin();
    s.namespace(&root, "own").await;
    s.namespace(&root, "other").await;
    s.host(&root, "h1", 512, 1 << 22, json!({})).await;
    s.host(&root, "spare", 1, 64, json!({})).await;
    // Keep both namespaces non-empty, so deleting them is refused (409).
    s.machine(&root, "own", spec("keep")).await;
    s.machine(&root, "other", spec("keep")).await;

    let whos = [Who::Ns(Role::Viewer), Who::Ns(Role::Operator), Who::Ns(Role::Admin), Who::ClusterAdmin];
    let mut cases = 0;
    let mut unique = 0;
    for route in routes() {
        for who in whos {
            let caller = match who {
                Who::Ns(role) => token("tenant", &[("own", role)], false),
                Who::ClusterAdmin => token("ops", &[], true),
            };
            for own in [true, false] {
                let ns = if own { "own" } else { "other" };
                unique += 1;
                let mut path = route.path.replace("{ns}", ns);
                let mut nonce = None;
                let mut machine = None;
                let mut snapshot_path = None;
                if route.prep != Prep::None && route.prep != Prep::MintedToken {
                    let m = s.machine(&root, ns, spec(&format!("p{unique}"))).await;
                    let id = m["id"].as_str().unwrap().to_owned();
                    path = path.replace("{id}", &id).replace("{host}", m["host"].as_str().unwrap());
                    let base = format!("/v1/namespaces/{ns}/machines/{id}");
                    if matches!(route.prep, Prep::Starting | Prep::Started) {
                        s.post(&format!("{base}/start"), &root, json!(null)).await;
                    }
                    if route.prep == Prep::Started {
                        let host = m["host"].as_str().unwrap();
                        let report = format!("/v1/hosts/{host}/machines/{id}/state");
                        s.post(&report, &root, json!({"state": "started"})).await;
                    }
                    if route.prep == Prep::Snapshot {
                        let sid = format!("s{unique:011}");
                        support::seed_snapshot(&s.database_url, ns, &id, m["host"].as_str().unwrap(), &sid, None).await;
                        path = path.replace("{sid}", &sid);
                        let at = format!("/v1/namespaces/{ns}/snapshots/{sid}");
                        snapshot_path = Some((sid, at.clone(), s.get(&at, &root).await.body));
                    }
                    if route.prep == Prep::Leased {
                        let lease = s.post(&format!("{base}/lease"), &root, json!({"ttl": 600})).await;
                        nonce = Some(lease.body["nonce"].as_str().unwrap().to_owned());
                    }
                    machine = Some((id.clone(), snapshot(&s, &root, ns, &id).await));
                }
                if route.prep == Prep::MintedToken {
                    let minted = s.post("/v1/tokens", &root, json!({"subject": "t", "roles": {ns: "viewer"}})).await;
                    path = path.replace("{jti}", minted.body["jti"].as_str().unwrap());
                }
                let mut request = s.request(route.method.clone(), &path);
                if !matches!(route.need, Need::Public) {
                    request = request.bearer_auth(&caller);
                }
                if let Some(nonce) = &nonce {
                    request = request.header("Machine-Lease-Nonce", nonce);
                }
                if let Some(body) = route.body {
                    let mut text = body(&unique.to_string()).to_string().replace("{ns}", ns);
                    if let Some((sid, _, _)) = &snapshot_path {
                        text = text.replace("{sid}", sid);
                    }
                    request = request.header("content-type", "application/json").body(text);
                }
                let reply = s.send(request).await;
                let want = expected(&route, who, own);
                assert_eq!(
                    reply.status.as_u16(),
                    want,
                    "{who:?} {} {path} ({}): {:#}",
                    route.method,
                    if own { "own" } else { "other" },
                    reply.body
                );
                if want >= 400 {
                    reply.problem(want);
                    if let Some((id, before)) = &machine {
                        assert_eq!(&snapshot(&s, &root, ns, id).await, before, "a refused call changed the machine");
                    }
                    if let Some((_, at, before)) = &snapshot_path {
                        assert_eq!(&s.get(at, &root).await.body, before, "a refused call changed the snapshot");
                    }
                }
                cases += 1;
            }
        }
    }
    assert_eq!(cases, routes().len() * 4 * 2);

    // Tenants list only their own namespace.
    let viewer = token("tenant", &[("own", Role::Viewer)], false);
    let names: Vec<_> = s.get("/v1/namespaces", &viewer).await.body["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["own"]);

    // A machine of another namespace is not reachable through one's own.
    let theirs = s.machine(&root, "other", spec("secret")).await;
    let admin = token("tenant", &[("own", Role::Admin)], false);
    let sneaky = format!("/v1/namespaces/own/machines/{}", theirs["id"].as_str().unwrap());
    s.get(&sneaky, &admin).await.problem(404);
    s.delete(&sneaky, &admin).await.problem(404);
    assert_eq!(
        s.get(&format!("/v1/namespaces/other/machines/{}", theirs["id"].as_str().unwrap()), &root).await.body["state"],
        "created"
    );

    // Nothing was created in "other" except by the cluster admin: the
    // fixtures plus the cluster admin's successful create.
    let list = s.get("/v1/namespaces/other/machines?include_destroyed=true&page_size=500", &root).await;
    let made_by_others = list.body["machines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["name"].as_str().unwrap().starts_with('c'))
        .count();
    assert_eq!(made_by_others, 1, "only the cluster admin's create reached 'other'");

    // Delegation cannot escalate: a namespace admin cannot mint a cluster
    // admin or a role elsewhere.
    s.post("/v1/tokens", &admin, json!({"subject": "x", "cluster_admin": true})).await.problem(403);
    s.post("/v1/tokens", &admin, json!({"subject": "x", "roles": {"other": "viewer"}})).await.problem(404);
    let ok = s.post("/v1/tokens", &admin, json!({"subject": "x", "roles": {"own": "operator"}})).await;
    assert_eq!(ok.status, StatusCode::CREATED);
    // Anyone may revoke the token they hold.
    let own_token = ok.body["token"].as_str().unwrap().to_owned();
    let jti = ok.body["jti"].as_str().unwrap();
    assert_eq!(s.delete(&format!("/v1/tokens/{jti}"), &own_token).await.status, StatusCode::NO_CONTENT);
    s.get("/v1/namespaces", &own_token).await.problem(401);
}
