//! `mmctl --server URL`: the same verbs as local mode, through the cluster
//! controller's REST API (`/v1/namespaces/{ns}/machines`) instead of a
//! broker's socket.
//!
//! A machine is named by its id or by its name (names are unique among a
//! namespace's machines that are not destroyed; the API addresses ids, so a
//! name is looked up in the list). `run` sends an `Idempotency-Key`, so the
//! one retry after a lost connection cannot create a second machine (as
//! do `restore`, `fork`, `branch` and `snapshot create`, in `snapshots`).

pub mod admin;
mod exec_ws;
mod http;
pub mod quota;
mod snapshots;
mod streams;
mod tunnel_ws;
mod view;

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Map, Value, json};

use crate::Verb;
use crate::client::{CliError, exit};
use crate::output::Format;
use crate::tunnel;
use http::{Api, ApiError, decode};
use view::{Machine, MachineList};

/// The largest page the API serves: `ps` wants every machine anyway.
const PAGE_SIZE: &str = "500";
/// One wait request's timeout. Short enough that a machine that fails
/// (the wait endpoint waits for one state only) is noticed soon.
const WAIT_ROUND_SECS: u64 = 10;

/// Where to reach the controller, and as whom.
pub struct Target {
    pub server: String,
    pub token: Option<String>,
    pub namespace: String,
}

fn unsupported(what: &str) -> CliError {
    CliError::new(exit::UNSUPPORTED, format!("the controller does not offer {what} yet"))
}

/// The verbs only the controller offers (no broker has namespaces,
/// tokens or quotas), by name, for local mode's refusal.
pub fn server_only(verb: &Verb) -> Option<&'static str> {
    match verb {
        Verb::Quota { .. } => Some("quota"),
        Verb::Namespace { .. } => Some("namespace"),
        Verb::Token { .. } => Some("token"),
        Verb::Host { .. } => Some("host"),
        _ => None,
    }
}

pub async fn run(target: Target, format: Format, verb: Verb) -> Result<i32, CliError> {
    let api = Api::new(&target.server, target.token, target.namespace)?;
    match verb {
        Verb::Run {
            image,
            name,
            cpus,
            memory,
            env,
            detach,
            rm,
            ssh_keys,
            command,
            no_wait,
            wait_timeout,
            io_limits,
            ..
        } => {
            if rm {
                return Err(unsupported("--rm (removing a machine once it stops)"));
            }
            if !io_limits.is_empty() {
                return Err(unsupported("rate limits (--disk-bps, ...)"));
            }
            let mut config = json!({ "image": image, "guest": { "cpus": cpus, "memory_mb": memory } });
            if !env.is_empty() {
                config["env"] = Value::Object(env.into_iter().map(|(k, v)| (k, Value::String(v))).collect());
            }
            if !command.is_empty() {
                config["command"] = json!(command);
            }
            // As locally: the given keys, or the user's ~/.ssh/id_*.pub.
            let key_files = if ssh_keys.is_empty() { tunnel::default_ssh_keys() } else { ssh_keys };
            let keys = tunnel::read_ssh_keys(&key_files)?;
            if !keys.is_empty() {
                config["ssh_keys"] = json!(keys);
            }
            let mut body = Map::new();
            if let Some(name) = name {
                body.insert("name".into(), Value::String(name));
            }
            body.insert("config".into(), config);
            let machine = create(&api, &Value::Object(body)).await?;
            if no_wait {
                return print_handle(&machine, format);
            }
            let machine = wait_started(&api, machine, Duration::from_secs(wait_timeout)).await?;
            if detach {
                return print_handle(&machine, format);
            }
            // In the foreground: its console until it stops, then how it ended
            // (the API has no exit status: stopped is 0, failed 125).
            match streams::logs(&api, &machine.id, true).await {
                Err(e) if e.code == exit::UNSUPPORTED => {
                    eprintln!("mmctl: {} is started; the controller does not offer logs yet", machine.name);
                    print_handle(&machine, format)
                }
                Err(e) => Err(e),
                Ok(Some(state)) if state == "failed" => {
                    Err(CliError::new(exit::VM_FAILED, format!("machine {} failed", machine.name)))
                }
                Ok(_) => Ok(0),
            }
        }
        Verb::Ps => {
            view::print_list(&list_all(&api).await?, format);
            Ok(0)
        }
        Verb::Inspect { vm } => {
            view::print_one(&find(&api, &vm).await?, format);
            Ok(0)
        }
        Verb::Stop { vm, time } => {
            if time.is_some() {
                eprintln!("mmctl: note: the controller does not take a stop timeout; -t is ignored");
            }
            let machine = act(&api, &vm, "stop").await?;
            print_acted(&vm, &machine, format)
        }
        Verb::Start { vm } => {
            let machine = act(&api, &vm, "start").await?;
            print_acted(&vm, &machine, format)
        }
        Verb::Rm { vms, force } => {
            let mut failed = None;
            for vm in vms {
                match remove(&api, &vm, force).await {
                    Ok(machine) => {
                        print_acted(&vm, &machine, format)?;
                    }
                    Err(e) => {
                        eprintln!("mmctl: {}", e.message);
                        failed = Some(e.code);
                    }
                }
            }
            Ok(failed.unwrap_or(0))
        }
        Verb::Logs { vm, follow } => {
            let machine = find(&api, &vm).await?;
            streams::logs(&api, &machine.id, follow).await.map(|_| 0)
        }
        Verb::Exec { vm, interactive, tty, env, workdir, user, command } => {
            let machine = find(&api, &vm).await?;
            let request = exec_ws::ExecRequest { command, env, stdin: interactive, tty, workdir, user };
            exec_ws::exec(&api, &machine.id, request).await
        }
        Verb::Audit { vm } => {
            // The controller's record of the machine: its state changes and
            // why, one JSON object per line as the broker's audit log is
            // printed (the broker's own log stays on its host).
            let id = find(&api, &vm).await?.id;
            let events: Value = api.get_json(Method::GET, api.machines_url(&[&id, "events"])).await?;
            for event in events["events"].as_array().into_iter().flatten() {
                println!("{event}");
            }
            Ok(0)
        }
        Verb::Update { .. } => Err(unsupported("update (rate limits)")),
        Verb::Stats { vm } => {
            #[derive(serde::Deserialize)]
            struct Stats {
                processes: Vec<crate::output::ProcessStats>,
            }
            let id = find(&api, &vm).await?.id;
            let stats: Stats = api.get_json(Method::GET, api.machines_url(&[&id, "stats"])).await?;
            crate::output::print_stats(&stats.processes, format);
            Ok(0)
        }
        Verb::Events => follow_events(&api, format).await,
        Verb::Ssh { vm, print_config, user, identity, command } => {
            let flags = vec!["--server".into(), target.server.clone(), "-n".into(), api.namespace.clone()];
            let route = tunnel::ProxyRoute { flags, token: Some(api.token().to_owned()) };
            let machines = match &vm {
                None => list_all(&api).await?,
                Some(vm) => vec![find(&api, vm).await?],
            };
            let targets: Vec<_> =
                machines.iter().map(|m| tunnel::SshTarget { id: &m.id, name: &m.name, address: "" }).collect();
            let login = vm.is_some() && !print_config;
            let from = tunnel::Describer::Controller;
            tunnel::ssh_verb(&targets, from, login, &route, &user, identity.as_deref(), &command)
        }
        Verb::PortForward { vm, ports } => {
            let id = find(&api, &vm).await?.id;
            let api = std::rc::Rc::new(api);
            tunnel::port_forward(&vm, &ports, |port, reader, writer| {
                let (api, id) = (std::rc::Rc::clone(&api), id.clone());
                async move { tunnel_ws::pump(&api, &id, port, reader, writer).await }
            })
            .await
        }
        Verb::Proxy { vm, port } => {
            let id = find(&api, &vm).await?.id;
            tunnel_ws::pump(&api, &id, port, tokio::io::stdin(), tokio::io::stdout()).await.map(|()| 0)
        }
        Verb::Snapshot { verb } => snapshots::run(&api, verb, format).await,
        Verb::Restore { snapshot, name, ssh_keys } => {
            // As locally: without --ssh-key the snapshot's keys stay.
            let keys = tunnel::read_ssh_keys(&ssh_keys)?;
            snapshots::restore(&api, &snapshot, name, keys, format).await
        }
        Verb::Suspend { vm } => snapshots::suspend(&api, &vm, format).await,
        Verb::Fork { snapshot, count, name_prefix, ssh_keys } => {
            // As locally: without --ssh-key the snapshot's keys stay.
            let keys = tunnel::read_ssh_keys(&ssh_keys)?;
            snapshots::fork(&api, &snapshot, count, name_prefix, keys, format).await
        }
        Verb::Branch { vm, name } => snapshots::branch(&api, &vm, name, format).await,
        Verb::Quota { verb, all } => quota::run(&api, verb, all, format).await,
        Verb::Namespace { verb } => admin::namespace(&api, verb, format).await,
        Verb::Token { verb } => admin::token(&api, verb, format).await,
        Verb::Host { verb } => admin::host(&api, verb, format).await,
    }
}

/// `events`: the namespace's machine events from now on, by long polling
/// `GET /v1/namespaces/{ns}/events` with the cursor it hands back, until
/// interrupted; printed as the local `events` prints the broker's.
async fn follow_events(api: &Api, format: Format) -> Result<i32, CliError> {
    let mut after: Option<i64> = None;
    loop {
        let mut url = api.url(&["v1", "namespaces", &api.namespace, "events"]);
        url.query_pairs_mut().append_pair("wait", "25");
        if let Some(after) = after {
            url.query_pairs_mut().append_pair("after", &after.to_string());
        }
        let page: Value = tokio::select! {
            page = api.get_json(Method::GET, url) => page?,
            _ = tokio::signal::ctrl_c() => return Ok(0),
        };
        for event in page["events"].as_array().into_iter().flatten() {
            let text = |key: &str| event[key].as_str().unwrap_or_default().to_owned();
            match format {
                Format::Json => println!("{event}"),
                Format::Table => {
                    println!("{}  {:<16} {:<12} {}", text("at"), text("machine_name"), text("state"), text("reason"))
                }
            }
        }
        after = page["next_after"].as_i64().or(after);
    }
}

/// What `run -d`, `stop` and `start` print: the id, or the whole machine.
fn print_handle(machine: &Machine, format: Format) -> Result<i32, CliError> {
    match format {
        Format::Json => view::print_one(machine, format),
        Format::Table => println!("{}", machine.id),
    }
    Ok(0)
}

/// What `stop`, `start` and `rm` print: the machine as the user named it
/// (as local mode and docker do), or the whole machine.
fn print_acted(vm: &str, machine: &Machine, format: Format) -> Result<i32, CliError> {
    match format {
        Format::Json => view::print_one(machine, format),
        Format::Table => println!("{vm}"),
    }
    Ok(0)
}

/// `POST .../machines` with a fresh `Idempotency-Key`, kept across the
/// retry so a create whose answer was lost is replayed, not repeated.
async fn create(api: &Api, body: &Value) -> Result<Machine, CliError> {
    let key = uuid::Uuid::new_v4().to_string();
    let url = api.machines_url(&[]);
    let sent =
        api.send(true, || api.request(Method::POST, url.clone()).header("Idempotency-Key", &key).json(body)).await;
    match sent {
        Ok(response) => decode(response).await,
        // A controller that predates `config.command` refuses the field.
        Err(ApiError::Problem(p)) if p.status == 422 && p.detail.contains("unknown field `command`") => {
            Err(unsupported("a command for a machine (leave out the command after --)"))
        }
        Err(e) => Err(e.into()),
    }
}

/// Ids are UUIDs; anything else is a name.
fn is_id(vm: &str) -> bool {
    uuid::Uuid::try_parse(vm).is_ok()
}

async fn get(api: &Api, id: &str) -> Result<Machine, CliError> {
    api.get_json(Method::GET, api.machines_url(&[id])).await
}

/// Every machine of the namespace that is not destroyed, page by page.
async fn list_all(api: &Api) -> Result<Vec<Machine>, CliError> {
    let mut machines = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut url = api.machines_url(&[]);
        url.query_pairs_mut().append_pair("page_size", PAGE_SIZE);
        if let Some(token) = &token {
            url.query_pairs_mut().append_pair("page_token", token);
        }
        let page: MachineList = api.get_json(Method::GET, url).await?;
        machines.extend(page.machines);
        match page.next_page_token {
            Some(next) if Some(&next) != token.as_ref() => token = Some(next),
            _ => return Ok(machines),
        }
    }
}

/// The machine `vm` names: by id, or else by name.
async fn find(api: &Api, vm: &str) -> Result<Machine, CliError> {
    if is_id(vm) {
        return get(api, vm).await;
    }
    list_all(api).await?.into_iter().find(|m| m.name == vm).ok_or_else(|| {
        CliError::new(exit::NOT_FOUND, format!("no machine named {vm:?} in namespace {:?}", api.namespace))
    })
}

/// `POST .../machines/{id}/{action}` (start, stop).
async fn act(api: &Api, vm: &str, action: &str) -> Result<Machine, CliError> {
    let id = find(api, vm).await?.id;
    api.get_json(Method::POST, api.machines_url(&[&id, action])).await
}

async fn remove(api: &Api, vm: &str, force: bool) -> Result<Machine, CliError> {
    let id = find(api, vm).await?.id;
    let mut url = api.machines_url(&[&id]);
    if force {
        url.query_pairs_mut().append_pair("force", "true");
    }
    api.get_json(Method::DELETE, url).await
}

/// Blocks until the machine is `started`, through the wait endpoint in
/// rounds of `WAIT_ROUND_SECS`, checking between rounds whether it failed
/// or went away (which the endpoint would not report before its timeout).
async fn wait_started(api: &Api, mut machine: Machine, timeout: Duration) -> Result<Machine, CliError> {
    let deadline = Instant::now() + timeout;
    loop {
        match machine.state.as_str() {
            "started" => return Ok(machine),
            "failed" => {
                return Err(CliError::new(exit::VM_FAILED, format!("machine {} failed to start", machine.name)));
            }
            state @ ("destroying" | "destroyed" | "stopping" | "stopped") => {
                return Err(CliError::new(
                    exit::CONFLICT,
                    format!("machine {} is {state}, not starting", machine.name),
                ));
            }
            _ => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let hint = if machine.state == "created" {
                format!(
                    " (no broker has launched it: is host {}'s broker connected?)",
                    machine.host.as_deref().unwrap_or("?")
                )
            } else {
                String::new()
            };
            return Err(CliError::new(
                exit::ERROR,
                format!("machine {} is still {} after {} s{hint}", machine.name, machine.state, timeout.as_secs()),
            ));
        }
        let mut url = api.machines_url(&[&machine.id, "wait"]);
        let secs = left.as_secs().clamp(1, WAIT_ROUND_SECS);
        url.query_pairs_mut().append_pair("state", "started").append_pair("timeout", &secs.to_string());
        match api.send(false, || api.request(Method::GET, url.clone())).await {
            Ok(response) => return decode(response).await,
            Err(ApiError::Problem(p)) if p.status == 408 => machine = get(api, &machine.id).await?,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads one HTTP request (headers and a Content-Length body).
    fn read_request(stream: &mut std::net::TcpStream) -> String {
        use std::io::Read;
        let mut data = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).unwrap();
            data.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&data).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0);
                if data.len() >= end + 4 + length {
                    return text;
                }
            }
            if n == 0 {
                return text;
            }
        }
    }

    fn header<'a>(request: &'a str, name: &str) -> Option<&'a str> {
        request.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// A create whose connection breaks before the answer is sent again,
    /// once, with the same Idempotency-Key (so the controller replays it
    /// rather than creating a second machine).
    #[test]
    fn a_lost_create_is_retried_with_the_same_key() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut first, _) = listener.accept().unwrap();
            let lost = read_request(&mut first);
            drop(first);
            let (mut second, _) = listener.accept().unwrap();
            let retried = read_request(&mut second);
            let body = serde_json::json!({ "id": "0e5c2a4e-3b7a-4a43-9a7e-0c1f6a1d2b3c", "name": "web",
                "namespace": "prod", "state": "created", "host": "h1",
                "config": { "image": "alpine", "guest": { "cpus": 1, "memory_mb": 256 } },
                "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z" })
            .to_string();
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nidempotent-replayed: true\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            second.write_all(answer.as_bytes()).unwrap();
            (lost, retried)
        });
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let api = Api::new(&format!("http://{addr}"), Some("t0ken".into()), "prod".into()).unwrap();
        let machine = runtime.block_on(create(&api, &json!({ "config": { "image": "alpine" } }))).unwrap();
        assert_eq!(machine.name, "web");
        let (lost, retried) = server.join().unwrap();
        let key = header(&lost, "idempotency-key").expect("a key on create");
        assert_eq!(uuid::Uuid::parse_str(key).unwrap().get_version_num(), 4);
        assert_eq!(header(&retried, "idempotency-key"), Some(key));
        assert_eq!(header(&retried, "authorization"), Some("Bearer t0ken"));
        assert!(lost.starts_with("POST /v1/namespaces/prod/machines HTTP/1.1"), "{lost}");
    }

    #[test]
    fn ids_are_uuids() {
        assert!(is_id("0e5c2a4e-3b7a-4a43-9a7e-0c1f6a1d2b3c"));
        assert!(!is_id("web-1"));
        assert!(!is_id(""));
    }
}
