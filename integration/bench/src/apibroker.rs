//! `mm-bench api`'s create_to_running: `POST .../machines` → the wait
//! endpoint answering `started`, through a real `mm-broker` that dials the
//! controller over mutual TLS (certificates from `scripts/dev-ca.sh`) and
//! boots the microVM. Measured only when everything for it is here: a
//! broker with `--controller`, a controller with `--broker-listen`, the
//! script, and a usable /dev/kvm; otherwise the reason is reported.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mm_integration::devices::Scratch;
use serde_json::{Value, json};

use crate::api::{ControllerProcess, CreateToRunning, Metric, NAMESPACE, call, client, free_port};
use crate::brokered;

/// The broker's host name (its certificate's common name) and label.
const HOST: &str = "bench-broker";
const LABEL: (&str, &str) = ("bench", "real");
/// The workload: idle, so the guest spends no CPU once started.
const IDLE: &str = "while true; do sleep 5; done";
/// A boot on a PVM host takes about a minute; leave room for a slow one.
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
/// Between exec attempts while the guest boots: the figure is this coarse.
const EXEC_POLL: Duration = Duration::from_millis(250);

pub struct BrokerSetup {
    certs: Scratch,
    broker_addr: String,
}

pub enum BrokerPlan {
    Run(BrokerSetup),
    Skip(String),
}

impl BrokerPlan {
    pub fn skip(reason: &str) -> BrokerPlan {
        BrokerPlan::Skip(reason.to_string())
    }

    pub fn describe(&self) -> String {
        match self {
            BrokerPlan::Run(s) => format!("through a real mm-broker dialling {}", s.broker_addr),
            BrokerPlan::Skip(reason) => format!("not measured: {reason}"),
        }
    }

    /// The controller's flags for accepting the broker's session.
    pub fn controller_args(&self) -> Vec<String> {
        let BrokerPlan::Run(s) = self else { return Vec::new() };
        let file = |name: &str| s.certs.path(name).display().to_string();
        vec![
            "--broker-listen".into(),
            s.broker_addr.clone(),
            "--tls-cert".into(),
            file("controller.pem"),
            "--tls-key".into(),
            file("controller.key"),
            "--tls-ca".into(),
            file("ca.pem"),
        ]
    }
}

fn help_mentions(binary: &Path, flag: &str) -> bool {
    Command::new(binary).arg("--help").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
}

/// Whether create_to_running can be measured here, and its certificates.
pub fn plan() -> Result<BrokerPlan> {
    let broker = match mm_integration::workspace_binary("mm-broker") {
        Ok(path) => path,
        Err(e) => return Ok(BrokerPlan::Skip(format!("no mm-broker binary: {e:#}"))),
    };
    if !help_mentions(&broker, "--controller") {
        return Ok(BrokerPlan::skip(
            "mm-broker cannot join a controller yet (no --controller: the broker session has not landed)",
        ));
    }
    let controller = mm_integration::workspace_binary("mm-controller")?;
    if !help_mentions(&controller, "--broker-listen") {
        return Ok(BrokerPlan::skip("mm-controller accepts no broker sessions yet (no --broker-listen)"));
    }
    let script = mm_integration::repo_root().join("scripts/dev-ca.sh");
    if !script.is_file() {
        return Ok(BrokerPlan::Skip(format!("{} is missing", script.display())));
    }
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        return Ok(BrokerPlan::skip("/dev/kvm is not usable here, so no microVM can boot"));
    }
    let certs = Scratch::new("bench-api-ca")?;
    let out = Command::new("bash").arg(&script).arg(&certs.0).arg(HOST).output().context("running dev-ca.sh")?;
    if !out.status.success() {
        bail!("dev-ca.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(BrokerPlan::Run(BrokerSetup { certs, broker_addr: format!("127.0.0.1:{}", free_port()?) }))
}

/// Measures it; a failure becomes "not measured" with the error, so the
/// list and create figures still come out.
pub fn create_to_running(
    setup: &BrokerSetup,
    controller: &ControllerProcess,
    token: &str,
    boots: usize,
    signals: libc::sigset_t,
    log_dir: &Path,
) -> Result<CreateToRunning> {
    let file = |name: &str| setup.certs.path(name).display().to_string();
    let (pem, key, ca) = (file(&format!("{HOST}.pem")), file(&format!("{HOST}.key")), file("ca.pem"));
    let label = format!("{}={}", LABEL.0, LABEL.1);
    let args = [
        "--controller",
        &setup.broker_addr,
        "--tls-cert",
        &pem,
        "--tls-key",
        &key,
        "--tls-ca",
        &ca,
        "--label",
        &label,
        "--offer-cpus",
        "2",
        "--offer-memory-mib",
        "2048",
    ];
    eprintln!("mm-bench: api: starting mm-broker {HOST} (dials the controller at {})", setup.broker_addr);
    let broker = Arc::new(brokered::start_broker("bench-api", &args)?);
    brokered::cleanup_on_signal("api", signals, Arc::downgrade(&broker));
    let mut result = CreateToRunning::default();
    let measured = boot(controller, token, boots, &mut result);
    let _ = std::fs::write(log_dir.join("broker.log"), broker.log());
    // Last reference: its Drop removes any microVM left and ends the broker.
    drop(broker);
    let _guard = brokered::CLEANUP.lock();
    brokered::unblock_signals(&signals);
    match measured {
        Ok(()) => {
            result.measured = true;
            result.metric = Metric::new(
                "create_to_running",
                &result.started_ms,
                false,
                "POST .../machines -> wait answers started",
            );
            result.exec_ready = Metric::new(
                "create_to_exec_ready",
                &result.exec_ready_ms,
                false,
                "POST .../machines -> the first exec true through the controller that succeeds",
            );
        }
        Err(e) => {
            let log = log_dir.join("broker.log");
            result.reason = Some(format!("failed: {e:#} (broker log: {})", log.display()));
        }
    }
    Ok(result)
}

fn boot(controller: &ControllerProcess, token: &str, boots: usize, result: &mut CreateToRunning) -> Result<()> {
    let http = client();
    let base = &controller.base;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, host) = call(http.get(format!("{base}/v1/hosts/{HOST}")).bearer_auth(token), 200)
            .unwrap_or((Duration::ZERO, Value::Null));
        if host["status"] == "ready" {
            break;
        }
        if Instant::now() > deadline {
            bail!("the broker did not register as ready within 120 s: {host}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    for run in 1..=boots {
        let spec = json!({ "name": format!("boot-{run}"),
            "config": { "image": "builtin", "guest": { "cpus": 1, "memory_mb": 256 }, "command": ["sh", "-c", IDLE] },
            "placement": { "host_labels": { LABEL.0: LABEL.1 } } });
        eprintln!("mm-bench: api: create_to_running {run}/{boots}: POST, then wait for started");
        let posted = Instant::now();
        let request = http.post(format!("{base}/v1/namespaces/{NAMESPACE}/machines")).bearer_auth(token).json(&spec);
        let (created, machine) = call(request, 201)?;
        let id = machine["id"].as_str().context("no id")?.to_string();
        let path = format!("{base}/v1/namespaces/{NAMESPACE}/machines/{id}");
        wait_for(&http, token, &path, "started", posted + BOOT_TIMEOUT)?;
        let started = posted.elapsed();
        exec_ready(&http, token, &path, posted + BOOT_TIMEOUT)?;
        let ready = posted.elapsed();
        result.create_ms.push(ms(created));
        result.started_ms.push(ms(started));
        result.exec_ready_ms.push(ms(ready));
        eprintln!(
            "mm-bench: api: create_to_running {run}/{boots}: started after {:.2} s, exec ready after {:.1} s",
            started.as_secs_f64(),
            ready.as_secs_f64()
        );
        call(http.delete(format!("{path}?force=true")).bearer_auth(token), 200)?;
        wait_for(&http, token, &path, "destroyed", Instant::now() + Duration::from_secs(120))?;
    }
    Ok(())
}

/// Polls `exec true` through the controller until it succeeds: 409 while
/// the guest boots (its exec agent not answering yet).
fn exec_ready(http: &reqwest::blocking::Client, token: &str, path: &str, deadline: Instant) -> Result<()> {
    loop {
        let body = json!({ "command": ["true"], "timeout": 30 });
        let response = http.post(format!("{path}/exec")).bearer_auth(token).json(&body).send()?;
        match response.status().as_u16() {
            200 => {
                let result: Value = response.json()?;
                if result["exit_code"] != 0 {
                    bail!("exec true ended with {result}");
                }
                return Ok(());
            }
            409 => {}
            status => bail!("exec true: {status} {}", response.text().unwrap_or_default()),
        }
        if Instant::now() > deadline {
            bail!("exec never succeeded");
        }
        std::thread::sleep(EXEC_POLL);
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// The wait endpoint in rounds of up to 60 s until `state` (or `deadline`);
/// a failed machine ends it at once.
fn wait_for(http: &reqwest::blocking::Client, token: &str, path: &str, state: &str, deadline: Instant) -> Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now()).as_secs().clamp(1, 60);
        let response = http.get(format!("{path}/wait?state={state}&timeout={left}")).bearer_auth(token).send()?;
        match response.status().as_u16() {
            200 => return Ok(()),
            408 => {}
            status => bail!("waiting for {state}: {status} {}", response.text().unwrap_or_default()),
        }
        let (_, machine) = call(http.get(path).bearer_auth(token), 200)?;
        if machine["state"] == "failed" {
            bail!("the machine failed instead of becoming {state}: {machine}");
        }
        if Instant::now() > deadline {
            bail!("still {} after waiting for {state}", machine["state"]);
        }
    }
}
