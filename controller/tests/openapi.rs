//! The OpenAPI document: served without a token, parses as OpenAPI 3.1, its
//! references resolve, it lists exactly the API's routes, and every route
//! it lists is really routed.

mod support;

use std::collections::BTreeSet;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use support::{cluster_admin, serve};

/// Every route of the API, written out by hand: the document must match it
/// exactly, so neither can grow a route the other does not know.
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/namespaces"),
    ("POST", "/v1/namespaces"),
    ("GET", "/v1/namespaces/{namespace}"),
    ("DELETE", "/v1/namespaces/{namespace}"),
    ("GET", "/v1/namespaces/{namespace}/quota"),
    ("PUT", "/v1/namespaces/{namespace}/quota"),
    ("GET", "/v1/namespaces/{namespace}/events"),
    ("GET", "/v1/namespaces/{namespace}/machines"),
    ("POST", "/v1/namespaces/{namespace}/machines"),
    ("GET", "/v1/namespaces/{namespace}/machines/{id}"),
    ("DELETE", "/v1/namespaces/{namespace}/machines/{id}"),
    ("POST", "/v1/namespaces/{namespace}/machines/{id}/start"),
    ("POST", "/v1/namespaces/{namespace}/machines/{id}/stop"),
    ("POST", "/v1/namespaces/{namespace}/machines/{id}/suspend"),
    ("POST", "/v1/namespaces/{namespace}/machines/{id}/branch"),
    ("GET", "/v1/namespaces/{namespace}/machines/{id}/snapshots"),
    ("POST", "/v1/namespaces/{namespace}/machines/{id}/snapshots"),
    ("GET", "/v1/namespaces/{namespace}/snapshots"),
    ("GET", "/v1/namespaces/{namespace}/snapshots/{sid}"),
    ("DELETE", "/v1/namespaces/{namespace}/snapshots/{sid}"),
    ("POST", "/v1/namespaces/{namespace}/snapshots/{sid}/fork"),
    ("GET", "/v1/namespaces/{namespace}/machines/{id}/wait"),
    ("GET", "/v1/namespaces/{namespace}/machines/{id}/events"),
    ("POST", "/v1/namespaces/{namespace}/machines/{id}/exec"),
    ("GET", "/v1/namespaces/{namespace}/machines/{id}/exec/ws"),
    ("GET", "/v1/namespaces/{namespace}/machines/{id}/logs"),
    ("GET", "/v1/namespaces/{namespace}/machines/{id}/ports/{port}/ws"),
    ("GET", "/v1/namespaces/{namespace}/machines/{id}/stats"),
    ("GET", "/v1/namespaces/{namespace}/machines/{id}/lease"),
    ("POST", "/v1/namespaces/{namespace}/machines/{id}/lease"),
    ("DELETE", "/v1/namespaces/{namespace}/machines/{id}/lease"),
    ("GET", "/v1/hosts"),
    ("POST", "/v1/hosts"),
    ("GET", "/v1/hosts/{name}"),
    ("POST", "/v1/hosts/{name}/cordon"),
    ("POST", "/v1/hosts/{name}/uncordon"),
    ("POST", "/v1/hosts/{name}/drain"),
    ("POST", "/v1/hosts/{name}/machines/{id}/state"),
    ("GET", "/v1/tokens"),
    ("POST", "/v1/tokens"),
    ("DELETE", "/v1/tokens/{jti}"),
    ("GET", "/v1/openapi.json"),
    ("GET", "/metrics"),
];

fn collect_refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if k == "$ref" {
                    out.push(v.as_str().unwrap().to_owned());
                } else {
                    collect_refs(v, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_matches_the_router() {
    let s = serve().await;
    let r = s.call(Method::GET, "/v1/openapi.json", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    let doc = r.body;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{}", doc["openapi"]);
    // It deserialises as an OpenAPI document.
    let parsed: utoipa::openapi::OpenApi = serde_json::from_value(doc.clone()).expect("a valid OpenAPI document");
    assert_eq!(parsed.info.title, "MicroMachines controller");
    assert_eq!(serde_json::to_value(s.controller.openapi()).unwrap(), doc, "served document is the router's");

    // References resolve.
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    assert!(!refs.is_empty());
    for reference in refs {
        let name = reference.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("odd $ref {reference}"));
        assert!(doc["components"]["schemas"].get(name).is_some(), "dangling $ref {reference}");
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());

    // Exactly the API's routes, each with a unique operationId (client
    // generators name methods after them).
    let mut documented = BTreeSet::new();
    let mut operation_ids = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                documented.insert((method.to_uppercase(), path.clone()));
                let op = &item[method];
                let operation_id =
                    op["operationId"].as_str().unwrap_or_else(|| panic!("{method} {path}: no operationId"));
                assert!(operation_ids.insert(operation_id.to_owned()), "duplicate operationId {operation_id}");
                assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()), "{method} {path} has no responses");
                if path != "/v1/openapi.json" {
                    assert_eq!(
                        op["security"],
                        serde_json::json!([{"bearer": []}]),
                        "{method} {path} is not marked bearer"
                    );
                }
            }
        }
    }
    let expected: BTreeSet<_> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(documented, expected);

    // The creates link to what takes their result, spelled as OpenAPI
    // spells it (utoipa's own Link would write "operation_id"), and every
    // link names an operation that exists.
    let machine_links = &doc["paths"]["/v1/namespaces/{namespace}/machines"]["post"]["responses"]["201"]["links"];
    assert_eq!(
        machine_links["machines_get"],
        serde_json::json!({"operationId": "machines_get",
            "parameters": {"namespace": "$response.body#/namespace", "id": "$response.body#/id"}})
    );
    let namespace_links = &doc["paths"]["/v1/namespaces"]["post"]["responses"]["201"]["links"];
    assert_eq!(namespace_links["machines_list"]["parameters"]["namespace"], "$response.body#/name");
    assert!(doc["paths"]["/v1/hosts"]["post"]["responses"]["201"]["links"]["hosts_cordon"].is_object());
    let mut linked = 0;
    for item in doc["paths"].as_object().unwrap().values() {
        for op in item.as_object().unwrap().values() {
            for response in op["responses"].as_object().into_iter().flat_map(|r| r.values()) {
                for link in response["links"].as_object().into_iter().flat_map(|l| l.values()) {
                    assert!(operation_ids.contains(link["operationId"].as_str().unwrap()), "{link}");
                    linked += 1;
                }
            }
        }
    }
    assert!(linked > 20, "{linked} links");
    // Token rules the derive cannot state: role keys are namespace names,
    // and a token grants a role or cluster_admin.
    let token = &doc["components"]["schemas"]["CreateToken"];
    assert_eq!(
        token["allOf"][0]["properties"]["roles"]["propertyNames"]["pattern"],
        "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
    );
    assert_eq!(token["allOf"][1]["anyOf"].as_array().map(Vec::len), Some(2));
    // A machine runs a config or resumes a snapshot: one is required.
    let create = &doc["components"]["schemas"]["CreateMachine"];
    let required: Vec<&Value> =
        create["allOf"][1]["oneOf"].as_array().unwrap().iter().map(|s| &s["required"]).collect();
    assert_eq!(required, [&serde_json::json!(["config"]), &serde_json::json!(["from_snapshot"])]);
    assert_eq!(create["allOf"][1]["oneOf"][0]["not"]["required"], serde_json::json!(["from_snapshot"]));
    assert!(create["allOf"][0]["required"].as_array().is_none_or(|r| !r.contains(&"config".into())), "{create:#}");
    // Snapshot creates link to what takes the snapshot (and its machine).
    let snapshot_links =
        &doc["paths"]["/v1/namespaces/{namespace}/machines/{id}/snapshots"]["post"]["responses"]["201"]["links"];
    assert_eq!(
        snapshot_links["snapshots_delete"],
        serde_json::json!({"operationId": "snapshots_delete",
            "parameters": {"namespace": "$response.body#/namespace", "sid": "$response.body#/id"}})
    );
    assert_eq!(snapshot_links["machines_suspend"]["parameters"]["id"], "$response.body#/machine_id");
    // A branch and a fork link to their machines (a fork's first).
    let branch_links =
        &doc["paths"]["/v1/namespaces/{namespace}/machines/{id}/branch"]["post"]["responses"]["201"]["links"];
    assert_eq!(branch_links["machines_get"]["parameters"]["id"], "$response.body#/id");
    let fork_links =
        &doc["paths"]["/v1/namespaces/{namespace}/snapshots/{sid}/fork"]["post"]["responses"]["201"]["links"];
    assert_eq!(fork_links["machines_get"]["parameters"]["id"], "$response.body#/machines/0/id");
    let fork_body = &doc["components"]["schemas"]["ForkSnapshot"];
    assert_eq!(
        (fork_body["properties"]["count"]["minimum"].as_i64(), fork_body["properties"]["count"]["maximum"].as_i64()),
        (Some(1), Some(64)),
        "{fork_body:#}"
    );
    // The new states are in the machine state's enum and the list filter.
    let states = &doc["components"]["schemas"]["MachineState"];
    assert!(states.to_string().contains("suspended") && states.to_string().contains("suspending"), "{states:#}");

    // Every documented route is routed: nothing answers with the router's
    // fallback or 405.
    let root = cluster_admin();
    for (method, path) in &documented {
        let concrete = path
            .replace("{namespace}", "nope")
            .replace("{id}", &uuid::Uuid::nil().to_string())
            .replace("{name}", "nope")
            .replace("{jti}", "nope")
            .replace("{sid}", "nope");
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let r = s.send(s.request(method.clone(), &concrete).bearer_auth(&root).json(&serde_json::json!({}))).await;
        assert_ne!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {concrete}");
        assert_ne!(r.body["type"], "urn:micromachines:problem:no-route", "{method} {concrete}");
    }
}
