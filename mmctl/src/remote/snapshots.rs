//! `snapshot create|ls|rm|gc`, `restore`, `fork`, `branch` and `suspend`
//! through the controller (`.../machines/{id}/snapshots`,
//! `.../snapshots[/{sid}]`, `POST .../machines {"from_snapshot"}`,
//! `.../snapshots/{sid}/fork`, `.../machines/{id}/branch`,
//! `.../machines/{id}/suspend`), printed as the local verbs print them
//! (`crate::snapshots`).
//!
//! A snapshot is named as locally: by its id, a unique prefix of it, or
//! its name (the API addresses ids, so the rest is looked up in the
//! namespace's list). `restore`, `fork` and `branch` create machines, so
//! they carry an `Idempotency-Key` like `run`; so does `snapshot create`.

use std::time::{Duration, Instant};

use reqwest::{Method, Url};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::http::{Api, ApiError, decode};
use super::view::{self, Machine};
use super::{find, get, print_acted, wait_started};
use crate::client::{CliError, exit};
use crate::output::Format;
use crate::snapshots::{SnapshotInfo, SnapshotVerb};

/// Seconds a restored machine may take to start, as `run`'s default.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(300);
/// Saving a big guest takes a while.
const SUSPEND_TIMEOUT: Duration = Duration::from_secs(300);
/// One wait request's timeout (the wait endpoint waits for one state: a
/// suspend that failed, the machine started again, is seen between rounds).
const WAIT_ROUND_SECS: u64 = 10;

/// A snapshot as the controller describes it; everything else it says is
/// kept for `-o json`.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
pub struct Snapshot {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    pub machine_id: String,
    #[serde(default)]
    pub machine_name: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub created_at: String,
    #[serde(default)]
    pub cpus: i64,
    #[serde(default)]
    pub memory_mb: i64,
    #[serde(default)]
    pub memory_bytes: u64,
    #[serde(default)]
    pub disk_bytes: u64,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
struct SnapshotList {
    snapshots: Vec<Snapshot>,
    #[serde(default)]
    next_page_token: Option<String>,
}

fn snapshots_url(api: &Api, rest: &[&str]) -> Url {
    let mut segments = vec!["v1", "namespaces", &api.namespace, "snapshots"];
    segments.extend_from_slice(rest);
    api.url(&segments)
}

/// `snapshot ls`: the local table, with the machine's name in VM; JSON is
/// the controller's own description.
fn print(snapshots: &[Snapshot], format: Format) {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(snapshots).expect("serialisable")),
        Format::Table => {
            let rows: Vec<SnapshotInfo> = snapshots
                .iter()
                .map(|s| SnapshotInfo {
                    id: s.id.clone(),
                    name: s.name.clone().unwrap_or_default(),
                    kind: s.kind.clone(),
                    vm_id: s.machine_id.clone(),
                    vm_name: s.machine_name.clone(),
                    created_at: s.created_at.clone(),
                    cpus: u8::try_from(s.cpus).unwrap_or(u8::MAX),
                    memory_mib: u32::try_from(s.memory_mb).unwrap_or(0),
                    memory_bytes: s.memory_bytes,
                    disk_bytes: s.disk_bytes,
                    pause_us: 0,
                })
                .collect();
            crate::snapshots::print(&rows, Format::Table);
        }
    }
}

/// Every page of `url`'s listing.
async fn list_all(api: &Api, url: Url) -> Result<Vec<Snapshot>, CliError> {
    let mut all = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut page_url = url.clone();
        page_url.query_pairs_mut().append_pair("page_size", super::PAGE_SIZE);
        if let Some(token) = &token {
            page_url.query_pairs_mut().append_pair("page_token", token);
        }
        let page: SnapshotList = api.get_json(Method::GET, page_url).await?;
        all.extend(page.snapshots);
        match page.next_page_token {
            Some(next) if Some(&next) != token.as_ref() => token = Some(next),
            _ => return Ok(all),
        }
    }
}

/// The namespace's snapshots, or those of machine `vm`.
async fn list(api: &Api, vm: Option<&str>) -> Result<Vec<Snapshot>, CliError> {
    match vm {
        Some(vm) => {
            let id = find(api, vm).await?.id;
            list_all(api, api.machines_url(&[&id, "snapshots"])).await
        }
        None => list_all(api, snapshots_url(api, &[])).await,
    }
}

/// Which of `all` `key` names: its id or name exactly, else the one id it
/// is a prefix of.
fn pick<'a>(all: &'a [Snapshot], key: &str) -> Result<&'a Snapshot, CliError> {
    if let Some(exact) = all.iter().find(|s| s.id == key || s.name.as_deref() == Some(key)) {
        return Ok(exact);
    }
    let mut matching = all.iter().filter(|s| !key.is_empty() && s.id.starts_with(key));
    match (matching.next(), matching.next()) {
        (Some(one), None) => Ok(one),
        (Some(_), Some(_)) => {
            Err(CliError::new(exit::INVALID, format!("snapshot id {key:?} matches more than one snapshot")))
        }
        _ => Err(CliError::new(exit::NOT_FOUND, format!("no snapshot {key:?}"))),
    }
}

/// The snapshot `key` names (see [`pick`]).
async fn resolve(api: &Api, key: &str) -> Result<Snapshot, CliError> {
    let all = list_all(api, snapshots_url(api, &[])).await?;
    pick(&all, key).cloned()
}

pub async fn run(api: &Api, verb: SnapshotVerb, format: Format) -> Result<i32, CliError> {
    match verb {
        SnapshotVerb::Create { vm, name } => {
            let id = find(api, &vm).await?.id;
            let body = match name {
                Some(name) => json!({ "name": name }),
                None => json!({}),
            };
            let key = uuid::Uuid::new_v4().to_string();
            let url = api.machines_url(&[&id, "snapshots"]);
            let build = || api.request(Method::POST, url.clone()).header("Idempotency-Key", &key).json(&body);
            let snapshot: Snapshot = decode(api.send(true, build).await?).await?;
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&snapshot).expect("serialisable")),
                Format::Table => println!("{}", snapshot.id),
            }
            Ok(0)
        }
        SnapshotVerb::Ls { vm } => {
            print(&list(api, vm.as_deref()).await?, format);
            Ok(0)
        }
        SnapshotVerb::Rm { snapshots } => {
            let all = list_all(api, snapshots_url(api, &[])).await?;
            let mut failed = None;
            for key in snapshots {
                let removed = async {
                    let snapshot = pick(&all, &key)?;
                    remove(api, &snapshot.id).await
                };
                match removed.await {
                    Ok(()) => println!("{key}"),
                    Err(e) => {
                        eprintln!("mmctl: {}", e.message);
                        failed = Some(e.code);
                    }
                }
            }
            Ok(failed.unwrap_or(0))
        }
        SnapshotVerb::Gc { vm, keep } => {
            let mine: Vec<Snapshot> =
                list(api, Some(&vm)).await?.into_iter().filter(|s| s.kind == "snapshot").collect();
            let excess = mine.len().saturating_sub(keep);
            for old in &mine[..excess] {
                remove(api, &old.id).await?;
                println!("{}", old.id);
            }
            Ok(0)
        }
    }
}

async fn remove(api: &Api, id: &str) -> Result<(), CliError> {
    let url = snapshots_url(api, &[id]);
    api.send(false, || api.request(Method::DELETE, url.clone())).await?;
    Ok(())
}

/// `restore SNAPSHOT`: a new machine from it, on the snapshot's host;
/// returns once it runs, printing its name (its JSON with `-o json`), as
/// the local verb does. `--ssh-key` files replace the snapshot's keys (the
/// API takes them in a `config` that must repeat the snapshot's image and
/// size, read from its machine).
pub async fn restore(
    api: &Api,
    key: &str,
    name: Option<String>,
    ssh_keys: Vec<String>,
    format: Format,
) -> Result<i32, CliError> {
    let snapshot = resolve(api, key).await?;
    let mut body = Map::new();
    body.insert("from_snapshot".into(), Value::String(snapshot.id.clone()));
    if let Some(name) = name {
        body.insert("name".into(), Value::String(name));
    }
    if !ssh_keys.is_empty() {
        let source = get(api, &snapshot.machine_id).await?;
        let guest = json!({ "cpus": snapshot.cpus, "memory_mb": snapshot.memory_mb });
        body.insert("config".into(), json!({ "image": source.config.image, "guest": guest, "ssh_keys": ssh_keys }));
    }
    let machine = super::create(api, &Value::Object(body)).await?;
    let machine = wait_started(api, machine, RESTORE_TIMEOUT).await?;
    match format {
        Format::Json => view::print_one(&machine, format),
        Format::Table => println!("{}", machine.name),
    }
    Ok(0)
}

/// `fork SNAPSHOT --count N [--name-prefix P]`: N machines from the
/// snapshot in one request (the controller makes all or none, on the
/// snapshot's host), named P-1..P-N (by default the snapshot's name or id,
/// then `-fork`); returns once every one runs, printing their names (their
/// JSON with `-o json`), as the local verb does.
pub async fn fork(
    api: &Api,
    key: &str,
    count: u32,
    prefix: Option<String>,
    ssh_keys: Vec<String>,
    format: Format,
) -> Result<i32, CliError> {
    #[derive(Deserialize)]
    struct Forked {
        machines: Vec<Machine>,
    }
    let snapshot = resolve(api, key).await?;
    let mut body = json!({ "count": count });
    if let Some(prefix) = prefix {
        body["name_prefix"] = Value::String(prefix);
    }
    if !ssh_keys.is_empty() {
        body["ssh_keys"] = json!(ssh_keys);
    }
    let idempotency = uuid::Uuid::new_v4().to_string();
    let url = snapshots_url(api, &[&snapshot.id, "fork"]);
    let build = || api.request(Method::POST, url.clone()).header("Idempotency-Key", &idempotency).json(&body);
    let forked: Forked = decode(api.send(true, build).await?).await?;
    let deadline = Instant::now() + RESTORE_TIMEOUT;
    let mut clones = Vec::with_capacity(forked.machines.len());
    for machine in forked.machines {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
        match wait_started(api, machine, left).await {
            Ok(machine) => clones.push(machine),
            Err(e) => {
                let running: Vec<&str> = clones.iter().map(|c: &Machine| c.name.as_str()).collect();
                let message = format!(
                    "{} (started: {})",
                    e.message,
                    if running.is_empty() { "none".to_owned() } else { running.join(", ") }
                );
                return Err(CliError::new(e.code, message));
            }
        }
    }
    match format {
        Format::Json => view::print_list(&clones, format),
        Format::Table => clones.iter().for_each(|c| println!("{}", c.name)),
    }
    Ok(0)
}

/// `branch VM [--name COPY]`: a new machine that is a live copy of running
/// machine `vm`, on its host; returns once it runs, printing its name (its
/// JSON with `-o json`), as the local verb does.
pub async fn branch(api: &Api, vm: &str, name: Option<String>, format: Format) -> Result<i32, CliError> {
    let id = find(api, vm).await?.id;
    let body = match name {
        Some(name) => json!({ "name": name }),
        None => json!({}),
    };
    let idempotency = uuid::Uuid::new_v4().to_string();
    let url = api.machines_url(&[&id, "branch"]);
    let build = || api.request(Method::POST, url.clone()).header("Idempotency-Key", &idempotency).json(&body);
    let machine: Machine = decode(api.send(true, build).await?).await?;
    let machine = wait_started(api, machine, RESTORE_TIMEOUT).await?;
    match format {
        Format::Json => view::print_one(&machine, format),
        Format::Table => println!("{}", machine.name),
    }
    Ok(0)
}

/// The reason of the machine's latest event (why a suspend did not take).
async fn latest_reason(api: &Api, id: &str) -> String {
    let events: Result<Value, CliError> = api.get_json(Method::GET, api.machines_url(&[id, "events"])).await;
    let events = events.unwrap_or_default();
    let last = events["events"].as_array().and_then(|e| e.last()).cloned().unwrap_or_default();
    last["reason"].as_str().unwrap_or("no reason recorded").to_owned()
}

/// `suspend VM`: asks, then waits until the machine is `suspended` (its
/// broker has saved it and ended its processes).
pub async fn suspend(api: &Api, vm: &str, format: Format) -> Result<i32, CliError> {
    let id = find(api, vm).await?.id;
    let mut machine: Machine = api.get_json(Method::POST, api.machines_url(&[&id, "suspend"])).await?;
    let deadline = Instant::now() + SUSPEND_TIMEOUT;
    loop {
        match machine.state.as_str() {
            "suspended" => return print_acted(vm, &machine, format),
            "suspending" => {}
            state => {
                let why = latest_reason(api, &id).await;
                return Err(CliError::new(
                    exit::ERROR,
                    format!("machine {} is {state}, not suspended: {why}", machine.name),
                ));
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(CliError::new(
                exit::ERROR,
                format!("machine {} is still suspending after {} s", machine.name, SUSPEND_TIMEOUT.as_secs()),
            ));
        }
        let mut url = api.machines_url(&[&id, "wait"]);
        let secs = left.as_secs().clamp(1, WAIT_ROUND_SECS);
        url.query_pairs_mut().append_pair("state", "suspended").append_pair("timeout", &secs.to_string());
        machine = match api.send(false, || api.request(Method::GET, url.clone())).await {
            Ok(response) => decode(response).await?,
            Err(ApiError::Problem(p)) if p.status == 408 => get(api, &id).await?,
            Err(e) => return Err(e.into()),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(id: &str, name: Option<&str>) -> Snapshot {
        serde_json::from_value(json!({ "id": id, "name": name, "machine_id": "m", "kind": "snapshot" })).unwrap()
    }

    #[test]
    fn snapshots_are_named_by_id_prefix_or_name() {
        let all = [snapshot("0123456789ab", Some("before")), snapshot("0199aaaaaaaa", None)];
        assert_eq!(pick(&all, "0123456789ab").unwrap().id, "0123456789ab");
        assert_eq!(pick(&all, "before").unwrap().id, "0123456789ab");
        assert_eq!(pick(&all, "019").unwrap().id, "0199aaaaaaaa");
        assert_eq!(pick(&all, "01").unwrap_err().code, exit::INVALID);
        assert_eq!(pick(&all, "ff").unwrap_err().code, exit::NOT_FOUND);
        assert_eq!(pick(&all, "").unwrap_err().code, exit::NOT_FOUND);
    }

    #[test]
    fn keeps_what_it_does_not_know() {
        let doc = json!({ "id": "0123456789ab", "name": null, "namespace": "prod", "machine_id": "m",
            "machine_name": "web", "host": "h1", "kind": "snapshot", "created_at": "2027-01-05T10:00:00Z",
            "cpus": 1, "memory_mb": 256, "memory_bytes": 1, "disk_bytes": 2, "pause_us": 3 });
        let s: Snapshot = serde_json::from_value(doc.clone()).unwrap();
        assert_eq!(serde_json::to_value(&s).unwrap(), doc);
    }
}
