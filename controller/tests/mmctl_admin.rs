//! `mmctl --server` admin verbs against a real controller on a real
//! PostgreSQL: `quota` (usage against limits, `quota set`), `namespace
//! create|ls|rm`, `token create|ls|revoke` and `host ls|cordon|drain|uncordon`,
//! each in table and `-o json` form, with their refusals. `mmctl` is the
//! workspace binary beside this test's (`cargo build --workspace --bins`).

mod support;

use mm_controller::auth::Role;
use serde_json::{Value, json};
use support::{Server, cluster_admin, serve, spec, token};

/// `mmctl --server BASE ARGS` as `token` (no `-n`: the args say).
async fn mmctl(s: &Server, token: &str, args: &[&str]) -> (i32, String, String) {
    let mut command = std::process::Command::new(support::mmctl_binary());
    command.arg("--server").arg(&s.base).args(args);
    command.env("MM_TOKEN", token).env_remove("MM_SERVER").env_remove("MM_NAMESPACE");
    command.stdin(std::process::Stdio::null());
    let out = tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (out.status.code().expect("mmctl exited"), text(out.stdout), text(out.stderr))
}

/// Runs mmctl, asserting exit 0; its stdout.
async fn ok(s: &Server, token: &str, args: &[&str]) -> String {
    let (code, out, err) = mmctl(s, token, args).await;
    assert_eq!(code, 0, "mmctl {args:?}: {err}{out}");
    out
}

async fn json_out(s: &Server, token: &str, args: &[&str]) -> Value {
    let mut with = vec!["-o", "json"];
    with.extend_from_slice(args);
    let out = ok(s, token, &with).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("mmctl {args:?}: {e}: {out}"))
}

/// The table row of `resource` for namespace `ns`: [used, limit].
fn row(table: &str, ns: &str, resource: &str) -> Vec<String> {
    let line = table
        .lines()
        .find(|l| l.split_whitespace().take(2).eq([ns, resource]))
        .unwrap_or_else(|| panic!("no {ns} {resource} in\n{table}"));
    line.split_whitespace().skip(2).map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_shows_usage_against_limits_and_sets_them() {
    let s = serve().await;
    let root = cluster_admin();
    s.namespace(&root, "prod").await;
    s.namespace(&root, "dev").await;
    s.host(&root, "h1", 64, 1 << 16, json!({})).await;
    s.machine(&root, "prod", spec("web")).await;

    let table = ok(&s, &root, &["-n", "prod", "quota"]).await;
    assert_eq!(row(&table, "prod", "machines"), ["1", "none"]);
    assert_eq!(row(&table, "prod", "memory"), ["128M", "none"]);

    let table = ok(
        &s,
        &root,
        &["-n", "prod", "quota", "set", "--machines", "1", "--memory", "64G", "--snapshot-bytes", "100G"],
    )
    .await;
    assert_eq!(row(&table, "prod", "machines"), ["1", "1"]);
    assert_eq!(row(&table, "prod", "memory"), ["128M", "64G"]);
    assert_eq!(row(&table, "prod", "snapshot-bytes"), ["0", "100G"]);
    // Only the limits named change; none lifts one.
    let q = json_out(&s, &root, &["-n", "prod", "quota", "set", "--vcpus", "8", "--memory", "none"]).await;
    assert_eq!(q[0]["limits"], json!({"machines": 1, "vcpus": 8, "memory_mb": null, "snapshot_bytes": 100_i64 << 30}));
    assert_eq!(q[0]["usage"]["machines"], 1);

    // Over quota: the controller's reason, exit 7 (a 403), nothing made.
    let (code, _, err) = mmctl(&s, &root, &["-n", "prod", "run", "-d", "--no-wait", "--", "true"]).await;
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("quota exceeded: machines: namespace \"prod\" may have at most 1 machine(s)"), "{err}");
    assert_eq!(s.get("/v1/namespaces/prod/machines", &root).await.body["machines"].as_array().unwrap().len(), 1);

    // Bad input: the controller's rule for 0, mmctl's for a bad size.
    let (code, _, err) = mmctl(&s, &root, &["-n", "prod", "quota", "set", "--machines", "0"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("machines must be 1 to 1000000, or null for no limit"), "{err}");
    let (code, _, err) = mmctl(&s, &root, &["-n", "prod", "quota", "set", "--memory", "lots"]).await;
    assert_eq!(code, 2, "{err}");
    // A namespace's admin reads its quota but may not set it; a stranger
    // sees no such namespace.
    let admin = token("alice", &[("prod", Role::Admin)], false);
    assert_eq!(row(&ok(&s, &admin, &["-n", "prod", "quota"]).await, "prod", "vcpus"), ["1", "8"]);
    let (code, _, err) = mmctl(&s, &admin, &["-n", "prod", "quota", "set", "--clear"]).await;
    assert_eq!(code, 7, "{err}");
    let (code, _, _) = mmctl(&s, &admin, &["-n", "dev", "quota"]).await;
    assert_eq!(code, 3);
    // --all: every namespace the token sees.
    let all = json_out(&s, &root, &["quota", "--all"]).await;
    let names: Vec<_> = all.as_array().unwrap().iter().map(|q| q["namespace"].as_str().unwrap()).collect();
    assert_eq!(names, ["dev", "prod"]);
    assert_eq!(json_out(&s, &admin, &["quota", "--all"]).await.as_array().unwrap().len(), 1);
    // --clear lifts them all.
    let q = json_out(&s, &root, &["-n", "prod", "quota", "set", "--clear"]).await;
    assert_eq!(q[0]["limits"], json!({"machines": null, "vcpus": null, "memory_mb": null, "snapshot_bytes": null}));
}

/// A cluster set up as the README's cluster section does, every step an
/// mmctl verb: namespaces, tokens with roles (and their revocation), hosts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_tokens_and_hosts_without_curl() {
    let s = serve().await;
    let root = cluster_admin();

    // namespace create | ls | rm.
    assert_eq!(ok(&s, &root, &["namespace", "create", "prod", "dev"]).await, "prod\ndev\n");
    let listed = ok(&s, &root, &["namespace", "ls"]).await;
    let rows: Vec<Vec<&str>> = listed.lines().map(|l| l.split_whitespace().take(2).collect()).collect();
    assert_eq!(rows, [vec!["NAME", "ROLE"], vec!["dev", "admin"], vec!["prod", "admin"]], "{listed}");
    let json = json_out(&s, &root, &["namespace", "ls"]).await;
    assert_eq!(json[1]["name"], "prod");
    let (code, _, err) = mmctl(&s, &root, &["namespace", "create", "prod"]).await;
    assert_eq!((code, err.trim()), (4, "mmctl: namespace \"prod\" already exists"));
    let (code, _, err) = mmctl(&s, &root, &["namespace", "create", "Bad_Name"]).await;
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = mmctl(&s, &root, &["namespace", "rm", "nope"]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("namespace \"nope\" not found"), "{err}");
    let removed = json_out(&s, &root, &["namespace", "rm", "dev"]).await;
    assert_eq!(removed, json!([{"name": "dev"}]));

    // token create (the JWT alone, for $(...)), with roles; ls; revoke.
    let op = ok(&s, &root, &["token", "create", "--subject", "ci", "--role", "prod=operator", "--ttl", "1h"]).await;
    let op = op.trim().to_owned();
    assert_eq!(op.split('.').count(), 3, "a JWT: {op}");
    s.host(&root, "h1", 8, 8192, json!({"region": "fra"})).await;
    ok(&s, &op, &["-n", "prod", "run", "-d", "--no-wait", "--name", "web", "--", "true"]).await;
    let viewer = json_out(
        &s,
        &root,
        &["token", "create", "--subject", "dash", "--role", "prod=viewer", "--description", "read only"],
    )
    .await;
    let viewer_jwt = viewer["token"].as_str().unwrap().to_owned();
    assert_eq!(viewer["roles"], json!({"prod": "viewer"}));
    let (code, _, err) = mmctl(&s, &viewer_jwt, &["-n", "prod", "rm", "web"]).await;
    assert_eq!(code, 7, "{err}");
    let (code, _, err) = mmctl(&s, &root, &["token", "create", "--subject", "x", "--role", "nope=admin"]).await;
    assert_eq!(code, 3, "unknown namespace: {err}");
    let (code, _, err) = mmctl(&s, &root, &["token", "create", "--subject", "x"]).await;
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = mmctl(&s, &root, &["token", "create", "--subject", "x", "--role", "prod=root"]).await;
    assert_eq!(code, 2, "{err}");
    // A namespace admin mints for its own namespace, not cluster admins.
    let admin = token("alice", &[("prod", Role::Admin)], false);
    let (code, _, err) = mmctl(&s, &admin, &["token", "create", "--subject", "y", "--cluster-admin"]).await;
    assert_eq!(code, 7, "{err}");

    let table = ok(&s, &root, &["token", "ls"]).await;
    let ci = table.lines().find(|l| l.contains(" ci ")).unwrap_or_else(|| panic!("{table}"));
    assert!(ci.contains("prod=operator") && ci.contains(" no "), "{ci}");
    let tokens = json_out(&s, &root, &["token", "ls"]).await;
    let jti =
        tokens.as_array().unwrap().iter().find(|t| t["subject"] == "ci").unwrap()["jti"].as_str().unwrap().to_owned();
    assert_eq!(ok(&s, &root, &["token", "revoke", &jti]).await.trim(), jti);
    // Refused from then on.
    let (code, _, err) = mmctl(&s, &op, &["-n", "prod", "ps"]).await;
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("revoked"), "{err}");
    let tokens = json_out(&s, &root, &["token", "ls"]).await;
    assert!(tokens.as_array().unwrap().iter().any(|t| t["jti"] == jti.as_str() && t["revoked"] == true));
    let (code, _, err) = mmctl(&s, &admin, &["token", "revoke", "no-such-token"]).await;
    assert_eq!(code, 3, "{err}");

    // host ls | cordon | drain | uncordon.
    let table = ok(&s, &root, &["host", "ls"]).await;
    let h1 = table.lines().find(|l| l.starts_with("h1 ")).unwrap_or_else(|| panic!("{table}"));
    assert_eq!(h1.split_whitespace().take(5).collect::<Vec<_>>(), ["h1", "ready", "1/8", "256/8192M", "1"], "{h1}");
    assert!(h1.ends_with("region=fra"), "{h1}");
    assert_eq!(ok(&s, &root, &["host", "cordon", "h1"]).await, "h1\n");
    assert_eq!(json_out(&s, &root, &["host", "ls"]).await[0]["cordoned"], true);
    let drained = json_out(&s, &root, &["host", "drain", "h1"]).await;
    assert_eq!(drained[0]["draining"], true);
    assert_eq!(ok(&s, &root, &["host", "uncordon", "h1"]).await, "h1\n");
    let host = &json_out(&s, &root, &["host", "ls"]).await[0];
    assert_eq!((&host["cordoned"], &host["draining"]), (&json!(false), &json!(false)));
    let (code, _, err) = mmctl(&s, &root, &["host", "drain", "h9"]).await;
    assert_eq!(code, 3, "{err}");
    let (code, _, err) = mmctl(&s, &admin, &["host", "ls"]).await;
    assert_eq!(code, 7, "hosts are the cluster admin's: {err}");

    // Without --server these are the controller's, and say so.
    let out = std::process::Command::new(support::mmctl_binary())
        .args(["--socket", "/nonexistent.sock", "namespace", "ls"])
        .env_remove("MM_SERVER")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("namespace needs --server"));
}
