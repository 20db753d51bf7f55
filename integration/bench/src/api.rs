//! `mm-bench api`: the controller's REST API under load, as a platform
//! team's tooling would meet it. A throw-away PostgreSQL 15 cluster (the
//! controller tests' `pg` module) and the real `mm-controller` binary on
//! 127.0.0.1 (its per-token rate limit raised out of the way), an admin
//! token from `mm-controller mint-token`, a namespace with N machines
//! placed on a stand-in host; then:
//!
//! * `create`: the N creates themselves, one after another over one
//!   keep-alive connection, each `POST .../machines` (with an
//!   `Idempotency-Key`, as `mmctl run` sends) → 201: median, p99;
//! * `list`: `GET .../machines?page_size=50` with wrk for a fixed time
//!   (requests/s, median, p99), and with a built-in loop as a cross-check
//!   (or alone when wrk is not installed);
//! * `create_to_running` (`apibroker`): POST → `started` through a real
//!   broker that dials the controller, when the broker can (`mm-broker
//!   --controller`) and KVM is usable; otherwise reported as not measured,
//!   with the reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use serde_json::{Value, json};

use crate::apibroker::{self, BrokerPlan};
use crate::apiload::{self, LoadResult};
use crate::devbench::{unix_time, write_and_print};
use crate::machine::{self, Machine};
use crate::report::{quantile, stats};

pub const NAMESPACE: &str = "bench";
/// The stand-in host's label: the benchmark's machines ask for it, so a real
/// broker (which lacks it) is never given one of them.
const STAND_IN: (&str, &str) = ("bench", "stand-in");
const STAND_IN_HOST: &str = "stand-in";
/// The stand-in host is registered again this often: registration counts as
/// a heartbeat, and a host that misses them is declared lost.
const STAND_IN_HEARTBEAT: Duration = Duration::from_secs(5);

/// Load before the measured runs, not reported.
const WARM_UP: Duration = Duration::from_secs(2);

#[derive(Debug, Args)]
pub struct ApiArgs {
    /// Machines to create (each create is timed) before the list load.
    #[arg(long, default_value_t = 200)]
    pub machines: usize,
    /// Seconds of list load per tool.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    pub threads: u32,
    /// Connections (wrk's, and the built-in loop's threads).
    #[arg(long, default_value_t = 16)]
    pub connections: u32,
    /// The list's page size.
    #[arg(long, default_value_t = 50)]
    pub page_size: u32,
    /// Machines booted through a real broker for create_to_running.
    #[arg(long, default_value_t = 2)]
    pub boots: usize,
    /// Skip create_to_running even if a broker could run it.
    #[arg(long)]
    pub no_boots: bool,
    /// Skip the built-in load loop when wrk is installed.
    #[arg(long)]
    pub no_builtin: bool,
    /// Also print the JSON result on stdout (the table then goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Where to write the JSON result [default: <workspace>/target/bench/api.json].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One latency figure over its samples, in ms.
#[derive(Debug, Clone, Serialize)]
pub struct Metric {
    pub name: &'static str,
    pub samples: usize,
    pub median: f64,
    /// Nearest rank: with fewer than 100 samples this is the maximum.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99: Option<f64>,
    pub max: f64,
    pub what: &'static str,
}

impl Metric {
    pub fn new(name: &'static str, values: &[f64], p99: bool, what: &'static str) -> Option<Metric> {
        let s = stats(values)?;
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(Metric {
            name,
            samples: values.len(),
            median: s.median,
            p99: p99.then(|| quantile(&sorted, 0.99)),
            max: s.max,
            what,
        })
    }
}

/// POST → started through a real broker, or why it was not measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CreateToRunning {
    pub measured: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metric: Option<Metric>,
    /// POST → 201 of the same machines.
    pub create_ms: Vec<f64>,
    /// POST → the wait endpoint answering `started`.
    pub started_ms: Vec<f64>,
    /// POST → the first `exec true` through the controller that succeeds
    /// (the broker reports `started` once the microVM's processes run; the
    /// guest still boots after that).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exec_ready: Option<Metric>,
    pub exec_ready_ms: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiReport {
    pub benchmark: &'static str,
    pub unix_time: u64,
    pub source: String,
    pub machine: Machine,
    pub mm_controller: String,
    pub postgres: String,
    pub wrk: Option<String>,
    pub parameters: Value,
    /// Bytes of one page's JSON.
    pub page_bytes: usize,
    pub list: Vec<LoadResult>,
    pub create: Option<Metric>,
    pub create_ms: Vec<f64>,
    pub create_to_running: CreateToRunning,
    pub loadavg_at_end: String,
    pub notes: Vec<String>,
    pub warnings: Vec<String>,
}

impl ApiReport {
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(out, "api benchmark: {}, {}; {}", self.mm_controller, self.postgres, self.parameters);
        let m = &self.machine;
        let _ = writeln!(out, "{m}, load {} -> {}", m.loadavg_at_start, self.loadavg_at_end);
        let _ = writeln!(
            out,
            "{:<34} {:>9} {:>10} {:>10} {:>10} {:>10} {:>6}",
            "metric", "requests", "req/s", "median ms", "p99 ms", "max ms", "errors"
        );
        let page = format!("list page of {} ({} B)", self.parameters["page_size"], self.page_bytes);
        for l in &self.list {
            let name = format!("{} {}t/{}c {:.0}s", l.tool, l.threads, l.connections, l.duration_s);
            let _ = writeln!(
                out,
                "{:<34} {:>9} {:>10.1} {:>10.2} {:>10.2} {:>10.1} {:>6}",
                format!("list ({name})"),
                l.requests,
                l.requests_per_s,
                l.latency_median_ms,
                l.latency_p99_ms,
                l.latency_max_ms,
                l.errors
            );
        }
        let _ = writeln!(out, "  ({page})");
        let mut metric = |label: &str, m: &Metric| {
            let p99 = m.p99.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "{:<34} {:>9} {:>10} {:>10.2} {p99:>10} {:>10.1} {:>6}",
                label, m.samples, "-", m.median, m.max, "-"
            );
        };
        if let Some(c) = &self.create {
            metric("create (POST -> 201, sequential)", c);
        }
        let c2r = &self.create_to_running;
        if let Some(m) = &c2r.exec_ready {
            metric("create_to_exec_ready (POST -> exec)", m);
        }
        match (&c2r.metric, &c2r.reason) {
            (Some(m), _) => metric("create_to_running (POST -> started)", m),
            (None, reason) => {
                let _ = writeln!(out, "create_to_running: not measured: {}", reason.as_deref().unwrap_or("no sample"));
            }
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        for w in &self.warnings {
            let _ = writeln!(out, "warning: {w}");
        }
        out
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// The `mm-controller` process; killed by its pid when dropped.
pub struct ControllerProcess {
    child: Child,
    pub base: String,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A 256-bit HS256 secret, hex.
fn random_secret() -> Result<String> {
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl ControllerProcess {
    fn start(binary: &Path, database_url: &str, secret: &str, extra: &[String], log: PathBuf) -> Result<Self> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let file = std::fs::File::create(&log)?;
        let child = Command::new(binary)
            .args(["--database-url", database_url, "--listen", &addr.to_string()])
            // Out of the way: the benchmark measures the API, not the limiter.
            .args(["--rate-limit-per-second", "1000000", "--rate-limit-burst", "1000000"])
            .args(extra)
            .env("MM_JWT_HS256_SECRET", secret)
            // The access log (one info line per request) is off, as an
            // operator under load might have it; errors still show.
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("spawning mm-controller")?;
        let mut process = ControllerProcess { child, base: format!("http://{addr}"), addr, log };
        let http = client();
        let deadline = Instant::now() + Duration::from_secs(60);
        while http.get(format!("{}/v1/openapi.json", process.base)).send().is_err() {
            if let Some(status) = process.child.try_wait()? {
                bail!("mm-controller exited with {status}: {}", std::fs::read_to_string(&process.log)?);
            }
            if Instant::now() > deadline {
                bail!("mm-controller did not serve within 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(process)
    }
}

/// A blocking client whose timeout outlasts the wait endpoint's longest
/// wait the benchmark asks for (60 s).
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(120)).build().expect("an HTTP client")
}

/// A JSON call that must succeed with `expect`: its time and answer.
pub fn call(request: reqwest::blocking::RequestBuilder, expect: u16) -> Result<(Duration, Value)> {
    let sent = Instant::now();
    let response = request.send()?;
    let status = response.status().as_u16();
    let body: Value = response.json().unwrap_or(Value::Null);
    let elapsed = sent.elapsed();
    if status != expect {
        bail!("expected {expect}, got {status}: {body}");
    }
    Ok((elapsed, body))
}

fn mint_token(binary: &Path, secret: &str) -> Result<String> {
    let out = Command::new(binary)
        .args(["mint-token", "--subject", "mm-bench", "--cluster-admin", "--ttl", "7200"])
        .env("MM_JWT_HS256_SECRET", secret)
        .output()?;
    if !out.status.success() {
        bail!("mm-controller mint-token: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

fn postgres_version() -> String {
    let bin = std::env::var_os("MM_PG_BIN").map(PathBuf::from).unwrap_or_else(|| "/usr/lib/postgresql/15/bin".into());
    crate::version_of(&bin.join("postgres"))
}

/// Registers the stand-in host now and then every `STAND_IN_HEARTBEAT`
/// until `stop` is set.
fn keep_stand_in(base: String, token: String, stop: Arc<AtomicBool>) -> Result<std::thread::JoinHandle<()>> {
    let http = client();
    let body = json!({ "name": STAND_IN_HOST, "address": "stand-in.invalid:7000", "cpus": 1_000_000,
        "memory_mb": 1_000_000_000_i64, "labels": { STAND_IN.0: STAND_IN.1 } });
    let register = move || -> Result<()> {
        let response = http.post(format!("{base}/v1/hosts")).bearer_auth(&token).json(&body).send()?;
        if !response.status().is_success() {
            bail!("{}: {}", response.status(), response.text().unwrap_or_default());
        }
        Ok(())
    };
    register().context("registering the stand-in host")?;
    Ok(std::thread::spawn(move || {
        let mut last = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            if last.elapsed() >= STAND_IN_HEARTBEAT {
                last = Instant::now();
                if let Err(e) = register() {
                    eprintln!("mm-bench: api: re-registering the stand-in host: {e:#}");
                }
            }
        }
    }))
}

pub fn run(args: ApiArgs) -> Result<()> {
    if args.machines == 0 || args.duration_secs == 0 || args.connections == 0 || args.threads == 0 {
        bail!("--machines, --duration-secs, --connections and --threads must be at least 1");
    }
    let out = args.out.clone().unwrap_or_else(|| mm_integration::repo_root().join("target/bench/api.json"));
    let log_dir = out.parent().unwrap_or(Path::new(".")).join("api-logs");
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    // Before any thread starts: the broker part's signal cleanup needs the mask.
    let signals = crate::brokered::block_signals()?;
    let machine = Machine::detect();
    let binary = mm_integration::workspace_binary("mm-controller")?;
    let plan = if args.no_boots { BrokerPlan::skip("--no-boots") } else { apibroker::plan()? };
    eprintln!("mm-bench: api: create_to_running: {}", plan.describe());

    let database_url = crate::pg::fresh_database();
    let secret = random_secret()?;
    let controller = ControllerProcess::start(
        &binary,
        &database_url,
        &secret,
        &plan.controller_args(),
        log_dir.join("controller.log"),
    )?;
    let token = mint_token(&binary, &secret)?;
    let http = client();
    let base = controller.base.clone();
    call(http.post(format!("{base}/v1/namespaces")).bearer_auth(&token).json(&json!({ "name": NAMESPACE })), 201)?;
    let stop = Arc::new(AtomicBool::new(false));
    let heartbeat = keep_stand_in(base.clone(), token.clone(), stop.clone())?;
    let wrk = apiload::wrk_binary();
    let mut report = ApiReport {
        benchmark: "api",
        unix_time: 0,
        source: String::new(),
        machine,
        mm_controller: crate::version_of(&binary),
        postgres: postgres_version(),
        wrk: wrk.as_deref().map(apiload::wrk_version),
        parameters: json!({
            "machines": args.machines, "page_size": args.page_size, "duration_s": args.duration_secs,
            "wrk_threads": args.threads, "connections": args.connections, "boots": args.boots,
        }),
        page_bytes: 0,
        list: Vec::new(),
        create: None,
        create_ms: Vec::new(),
        create_to_running: CreateToRunning::default(),
        loadavg_at_end: String::new(),
        notes: Vec::new(),
        warnings: Vec::new(),
    };
    let measured = measure(&args, &controller, &token, wrk.as_deref(), &mut report);
    let c2r = match (&measured, &plan) {
        (Ok(()), BrokerPlan::Run(setup)) => {
            apibroker::create_to_running(setup, &controller, &token, args.boots, signals, &log_dir)
        }
        (_, BrokerPlan::Skip(reason)) => {
            Ok(CreateToRunning { reason: Some(reason.clone()), ..CreateToRunning::default() })
        }
        (Err(_), _) => Ok(CreateToRunning::default()),
    };
    stop.store(true, Ordering::Relaxed);
    let _ = heartbeat.join();
    drop(controller);
    measured.with_context(|| format!("controller log: {}", log_dir.join("controller.log").display()))?;
    report.create_to_running = c2r?;

    report.loadavg_at_end = machine::loadavg();
    report.source = crate::source_revision();
    report.unix_time = unix_time();
    report.notes = vec![
        "controller, PostgreSQL and the load generator share this machine's CPUs".into(),
        "the controller's access log is off (RUST_LOG=warn) and its rate limit raised out of the way".into(),
        format!("{} s of unmeasured list load warm the controller's database pool first", WARM_UP.as_secs()),
        format!(
            "machines are placed on a stand-in host (POST /v1/hosts, labelled {}={}); nothing boots for them",
            STAND_IN.0, STAND_IN.1
        ),
    ];
    write_and_print(&report, &report.table(), &out, args.json)
}

fn measure(
    args: &ApiArgs,
    controller: &ControllerProcess,
    token: &str,
    wrk: Option<&Path>,
    report: &mut ApiReport,
) -> Result<()> {
    let http = client();
    let machines = format!("{}/v1/namespaces/{NAMESPACE}/machines", controller.base);
    eprintln!("mm-bench: api: creating {} machines", args.machines);
    for i in 0..args.machines {
        let spec = json!({ "name": format!("m{i}"), "labels": { "bench": "api" },
            "config": { "image": "builtin", "guest": { "cpus": 1, "memory_mb": 128 },
                "env": { "INDEX": i.to_string() } },
            "placement": { "host_labels": { STAND_IN.0: STAND_IN.1 } } });
        let request =
            http.post(&machines).bearer_auth(token).header("Idempotency-Key", format!("bench-{i}")).json(&spec);
        let (elapsed, _) = call(request, 201).with_context(|| format!("creating machine {i}"))?;
        report.create_ms.push(ms(elapsed));
    }
    report.create = Metric::new("create", &report.create_ms, true, "POST .../machines -> 201, one at a time");

    let path = format!("/v1/namespaces/{NAMESPACE}/machines?page_size={}", args.page_size);
    let url = format!("{}{path}", controller.base);
    let response = http.get(&url).bearer_auth(token).send()?;
    let bytes = response.bytes()?;
    let page: Value = serde_json::from_slice(&bytes)?;
    let listed = page["machines"].as_array().map_or(0, Vec::len);
    if listed != (args.page_size as usize).min(args.machines) {
        bail!("the first page lists {listed} machines, not {}: {page}", args.page_size);
    }
    report.page_bytes = bytes.len();
    let duration = Duration::from_secs(args.duration_secs);
    // Unmeasured: the controller's database pool grows on demand, and the
    // first tool measured would otherwise pay for opening its connections.
    apiload::builtin(controller.addr, &path, token, args.connections, WARM_UP)?;
    match wrk {
        Some(wrk) => {
            eprintln!(
                "mm-bench: api: wrk -t{} -c{} -d{}s GET {path}",
                args.threads,
                args.connections,
                duration.as_secs()
            );
            report.list.push(apiload::wrk(wrk, &url, token, args.threads, args.connections, duration)?);
        }
        None => report.warnings.push("wrk is not installed (scripts/setup.sh installs it): built-in loop only".into()),
    }
    if wrk.is_none() || !args.no_builtin {
        eprintln!("mm-bench: api: built-in loop, {} connections, {}s", args.connections, duration.as_secs());
        report.list.push(apiload::builtin(controller.addr, &path, token, args.connections, duration)?);
    }
    for l in &report.list {
        if l.errors > 0 {
            report.warnings.push(format!("{}: {} of the list requests failed", l.tool, l.errors));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(create_to_running: CreateToRunning) -> ApiReport {
        let list = LoadResult {
            tool: "wrk".into(),
            duration_s: 10.0,
            threads: 2,
            connections: 16,
            requests: 31234,
            requests_per_s: 3123.4,
            latency_median_ms: 4.8,
            latency_p99_ms: 12.0,
            latency_max_ms: 30.0,
            errors: 0,
        };
        ApiReport {
            benchmark: "api",
            unix_time: 0,
            source: String::new(),
            machine: Machine::detect(),
            mm_controller: "mm-controller 0.1.0".into(),
            postgres: "postgres 15".into(),
            wrk: None,
            parameters: json!({ "page_size": 50 }),
            page_bytes: 19773,
            list: vec![list],
            create: Metric::new("create", &[2.0, 3.0, 9.0], true, ""),
            create_ms: vec![2.0, 3.0, 9.0],
            create_to_running,
            loadavg_at_end: String::new(),
            notes: Vec::new(),
            warnings: vec!["busy".into()],
        }
    }

    #[test]
    fn table_shows_every_figure_or_why_not() {
        let table = report(CreateToRunning { reason: Some("no KVM".into()), ..Default::default() }).table();
        assert!(table.contains("list (wrk 2t/16c 10s)") && table.contains("3123.4"), "{table}");
        assert!(table.contains("list page of 50 (19773 B)") && table.contains("create (POST -> 201"), "{table}");
        assert!(table.contains("create_to_running: not measured: no KVM") && table.contains("warning: busy"));
        let measured = CreateToRunning {
            measured: true,
            metric: Metric::new("create_to_running", &[41_000.0, 43_000.0], false, ""),
            exec_ready: Metric::new("create_to_exec_ready", &[61_000.0], false, ""),
            ..Default::default()
        };
        let table = report(measured).table();
        assert!(table.contains("create_to_running (POST -> started)") && table.contains("42000.00"), "{table}");
        assert!(table.contains("create_to_exec_ready (POST -> exec)") && table.contains("61000.00"), "{table}");
    }

    #[test]
    fn metrics_have_median_p99_and_max() {
        let m = Metric::new("x", &[3.0, 1.0, 2.0], true, "").unwrap();
        assert_eq!((m.samples, m.median, m.p99, m.max), (3, 2.0, Some(3.0), 3.0));
        assert!(Metric::new("x", &[], true, "").is_none());
    }
}
