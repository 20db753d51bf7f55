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
