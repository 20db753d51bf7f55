//! `mmctl`: the MicroMachines admin CLI. Talks Cap'n Proto to the host's
//! mm-broker (`--socket`, `$MM_BROKER_SOCKET`, or the default path), or,
//! with `--server URL` (`$MM_SERVER`), the cluster controller's REST API
//! (`remote`), with the same verbs and output.
//!
//! Errors are one line on stderr and an exit code: 1 other, 2 invalid
//! input, 3 unknown microVM, 4 conflict (duplicate name, wrong state),
//! 5 not enough host memory, 6 broker or controller not reachable, 7 not
//! authorized (controller), 8 not offered by the controller, 125 the
//! microVM failed. `run` in the foreground and `exec` exit with the
//! workload's code.

mod client;
mod output;
mod remote;
mod snapshots;
mod streams;
mod terminal;
mod tunnel;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use mm_protocols::broker_capnp::{broker, vm};

use client::{CliError, exit};
use output::{Format, VmInfo};

#[derive(Debug, Parser)]
#[command(name = "mmctl", version, about = "Run and manage MicroMachines microVMs")]
struct Cli {
    /// The broker's socket (default: $MM_BROKER_SOCKET or /run/micromachines/broker.sock).
    #[arg(long, global = true, conflicts_with = "server")]
    socket: Option<PathBuf>,
    /// The cluster controller's URL (e.g. https://controller:8080): the
    /// verbs then go through its REST API instead of a local broker.
    #[arg(long, global = true, env = "MM_SERVER")]
    server: Option<String>,
    /// The API token for --server. Prefer $MM_TOKEN: other users can read
    /// the process list.
    #[arg(long, global = true, env = "MM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The controller namespace (--server only).
    #[arg(long, short = 'n', global = true, env = "MM_NAMESPACE", default_value = "default")]
    namespace: String,
    /// Output format for ps, inspect, run --detach, stop.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Verb,
}

#[derive(Debug, Subcommand)]
enum Verb {
    /// Create and boot a microVM; in the foreground, stream its console and
    /// exit with the workload's status.
    Run {
        /// Image (only the built-in image exists today).
        #[arg(default_value = "builtin")]
        image: String,
        #[arg(long)]
        name: Option<String>,
        /// vCPUs, at least 1.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
        cpus: u8,
        /// Guest memory, in MiB (suffixes M and G accepted).
        #[arg(long, default_value = "256M", value_parser = parse_memory)]
        memory: u32,
        /// Most CPU time the microVM may take, in cores (e.g. 0.5; default:
        /// --cpus): a cgroup quota on mm-vmm, so a guest spinning all its
        /// vCPUs gets no more.
        #[arg(long, value_parser = parse_cpu_quota)]
        cpu_quota: Option<u32>,
        /// Its share of CPU time when the host is busy, 1 to 10000 (default 100).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=10000))]
        cpu_weight: Option<u16>,
        #[command(flatten)]
        io_limits: client::IoLimitFlags,
        /// KEY=VALUE for the workload; repeatable.
        #[arg(long = "env", short = 'e', value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// Return once it is started, printing its id.
        #[arg(long, short = 'd')]
        detach: bool,
        /// --server only: return as soon as the controller has created it
        /// (placed on a host), without waiting for it to start.
        #[arg(long)]
        no_wait: bool,
        /// --server only: seconds to wait for it to start.
        #[arg(long, default_value_t = 300)]
        wait_timeout: u64,
        /// Remove it once it stops.
        #[arg(long)]
        rm: bool,
        /// Boot it, even when a warm (post-boot) snapshot of the image exists.
        #[arg(long)]
        cold: bool,
        /// A public key file allowed to log in over SSH; repeatable
        /// (default: ~/.ssh/id_*.pub).
        #[arg(long = "ssh-key")]
        ssh_keys: Vec<PathBuf>,
        /// The workload, after `--` (default: the image's, `sh`).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// List microVMs.
    Ps,
    /// Show one microVM.
    Inspect { vm: String },
    /// Print a microVM's console.
    Logs {
        vm: String,
        /// Keep printing until the microVM stops.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Run a command in a running microVM.
    Exec {
        vm: String,
        /// Keep stdin open and forward it.
        #[arg(long, short = 'i')]
        interactive: bool,
        /// Allocate a terminal of our size, following our resizes; with
        /// -i and stdin a terminal, ours is raw while the command runs.
        #[arg(long, short = 't')]
        tty: bool,
        #[arg(long, short = 'e', value_parser = parse_env)]
        env: Vec<(String, String)>,
        #[arg(long, short = 'w')]
        workdir: Option<String>,
        #[arg(long, short = 'u')]
        user: Option<String>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Stop a microVM: SIGTERM to its init, SIGKILL after the timeout.
    Stop {
        vm: String,
        /// Seconds to wait for a graceful stop [default: 10].
        #[arg(long, short = 't')]
        time: Option<u32>,
    },
    /// Boot a stopped microVM again (same disk); resume a suspended one.
    Start { vm: String },
    /// Remove microVMs (and their disks).
    Rm {
        #[arg(required = true)]
        vms: Vec<String>,
        /// Stop them first if running.
        #[arg(long, short = 'f')]
        force: bool,
    },
    /// Print a microVM's audit log (JSON lines).
    Audit { vm: String },
    /// Ask each process of a running microVM how it is doing (CPU time,
    /// peak memory, uptime; back ends replaced per device).
    Stats { vm: String },
    /// Change a microVM's rate limits (--disk-bps, --disk-iops; the others
    /// are kept), live if it runs: applied between two requests, none lost.
    Update {
        vm: String,
        #[command(flatten)]
        io_limits: client::IoLimitFlags,
    },
    /// Stream every microVM's events (audit lines, state changes) as they
    /// happen, until interrupted.
    Events,
    /// Log in to a microVM with OpenSSH, through the broker (no route to
    /// the guest needed); with a command, run it there.
    Ssh {
        /// The microVM (with --print-config: default all).
        #[arg(required_unless_present = "print_config")]
        vm: Option<String>,
        /// Print an ssh_config for `ssh -F FILE NAME.mm` instead.
        #[arg(long)]
        print_config: bool,
        #[arg(long, short = 'l', default_value = "root")]
        user: String,
        /// The private key to use (default: ssh's own choice).
        #[arg(long, short = 'i')]
        identity: Option<PathBuf>,
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Serve 127.0.0.1:HOSTPORT, forwarding each connection to GUESTPORT.
    PortForward {
        vm: String,
        /// HOSTPORT:GUESTPORT, or GUESTPORT (any free host port; printed).
        ports: String,
    },
    /// Connect stdin and stdout to a TCP port of a microVM (what ssh's
    /// ProxyCommand runs).
    Proxy { vm: String, port: u16 },
    /// Snapshots of running microVMs: create, ls, rm, gc.
    Snapshot {
        #[command(subcommand)]
        verb: snapshots::SnapshotVerb,
    },
    /// Start a NEW microVM from a snapshot, without a boot: its own name,
    /// address, MAC, vsock CID and SSH host key; prints its name.
    Restore {
        snapshot: String,
        #[arg(long)]
        name: Option<String>,
        /// Public key files allowed to log in over SSH instead of the
        /// snapshot's; repeatable.
        #[arg(long = "ssh-key")]
        ssh_keys: Vec<PathBuf>,
    },
    /// Start COUNT new microVMs from one snapshot: each is a restore of
    /// its own (own name, address, MAC, CID, entropy; its disk a
    /// copy-on-write child of the snapshot's), named PREFIX-1..PREFIX-COUNT.
    /// Every name and the memory for all are checked before any starts.
    Fork {
        snapshot: String,
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
        count: u32,
        /// Names are PREFIX-1 ... PREFIX-COUNT (default: the snapshot's
        /// name or id, then "-fork").
        #[arg(long)]
        name_prefix: Option<String>,
        #[arg(long = "ssh-key")]
        ssh_keys: Vec<PathBuf>,
    },
    /// Save a running microVM to disk and end its processes (it holds no
    /// host memory); `start` resumes it where it was.
    Suspend { vm: String },
    /// --server only: the namespace's usage against its quota (-n NS, or
    /// --all namespaces the token sees); `quota set` for cluster admins.
    Quota {
        #[command(subcommand)]
        verb: Option<remote::quota::QuotaVerb>,
        /// Every namespace the token has a role in.
        #[arg(long)]
        all: bool,
    },
    /// --server only: namespaces (create, ls, rm).
    #[command(alias = "ns")]
    Namespace {
        #[command(subcommand)]
        verb: remote::admin::NamespaceVerb,
    },
    /// --server only: API tokens (create, ls, revoke).
    Token {
        #[command(subcommand)]
        verb: remote::admin::TokenVerb,
    },
    /// --server only: the cluster's hosts (ls, cordon, drain, uncordon).
    Host {
        #[command(subcommand)]
        verb: remote::admin::HostVerb,
    },
    /// A NEW microVM that is a live copy of a running one (its memory,
    /// processes and disk at one instant, its own identity); the source
    /// pauses only for the cut and runs on. Prints the copy's name.
    Branch {
        vm: String,
        /// The copy's name (default: VM-branch, then VM-branch-2, ...).
        #[arg(long)]
        name: Option<String>,
    },
}

fn parse_memory(s: &str) -> Result<u32, String> {
    let (digits, factor) = match s.strip_suffix(['G', 'g']) {
        Some(d) => (d, 1024),
        None => (s.strip_suffix(['M', 'm']).unwrap_or(s), 1),
    };
    digits
        .parse::<u32>()
        .ok()
        .and_then(|v| v.checked_mul(factor))
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("{s:?} is not a memory size (e.g. 256M, 1G)"))
}

/// `--cpu-quota`: cores, fractional, sent in thousandths of a core (the
/// broker checks the range against its host).
fn parse_cpu_quota(s: &str) -> Result<u32, String> {
    match s.trim().parse::<f64>() {
        Ok(cores) if cores.is_finite() && cores > 0.0 && cores <= 4096.0 => {
            Ok(((cores * 1000.0).round() as u32).max(1))
        }
        _ => Err(format!("{s:?} is not a number of cores above 0 (e.g. 0.5, 2)")),
    }
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?}: expected KEY=VALUE")),
    }
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let local = tokio::task::LocalSet::new();
    let code = match local.block_on(&runtime, run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mmctl: {}", e.message);
            e.code
        }
    };
    std::process::exit(code);
}

async fn get_vm(broker: &broker::Client, name: &str) -> Result<vm::Client, CliError> {
    let mut request = broker.get_vm_request();
    request.get().set_name(name);
    Ok(request.send().promise.await?.get()?.get_vm()?)
}

async fn info(vm: &vm::Client) -> Result<VmInfo, CliError> {
    let reply = vm.info_request().send().promise.await?;
    Ok(VmInfo::read(reply.get()?.get_info()?)?)
}

async fn list(broker: &broker::Client) -> Result<Vec<VmInfo>, CliError> {
    let reply = broker.list_vms_request().send().promise.await?;
    let mut vms = Vec::new();
    for vm in reply.get()?.get_vms()?.iter() {
        vms.push(VmInfo::read(vm)?);
    }
    Ok(vms)
}

async fn run(cli: Cli) -> Result<i32, CliError> {
    if let Some(server) = cli.server {
        let target = remote::Target { server, token: cli.token, namespace: cli.namespace };
        return remote::run(target, cli.output, cli.command).await;
    }
    if let Some(verb) = remote::server_only(&cli.command) {
        return Err(CliError::new(exit::INVALID, format!("{verb} needs --server (it is the controller's)")));
    }
    if let Verb::Run { no_wait: true, .. } = cli.command {
        return Err(CliError::new(exit::INVALID, "--no-wait needs --server (a local run -d returns once started)"));
    }
    let socket = client::socket_path(cli.socket);
    let broker = client::connect(&socket).await?;
    let format = cli.output;
    match cli.command {
        Verb::Run {
            image,
            name,
            cpus,
            memory,
            cpu_quota,
            cpu_weight,
            io_limits,
            env,
            detach,
            rm,
            cold,
            ssh_keys,
            command,
            ..
        } => {
            let key_files = if ssh_keys.is_empty() { tunnel::default_ssh_keys() } else { ssh_keys };
            let keys = tunnel::read_ssh_keys(&key_files)?;
            let mut request = broker.create_vm_request();
            {
                let mut spec = request.get().init_spec();
                spec.set_name(name.as_deref().unwrap_or(""));
                spec.set_image(&image);
                spec.set_cpus(cpus);
                spec.set_memory_mib(memory);
                spec.set_auto_remove(rm);
                spec.set_cold(cold);
                spec.set_cpu_quota_millis(cpu_quota.unwrap_or(0));
                spec.set_cpu_weight(cpu_weight.unwrap_or(0));
                client::IoLimitFlags::write(io_limits.over([0; 4]), spec.reborrow().init_limits());
                snapshots::fill_texts(spec.reborrow().init_command(command.len() as u32), &command);
                snapshots::fill_texts(spec.reborrow().init_ssh_keys(keys.len() as u32), &keys);
                let mut vars = spec.init_env(env.len() as u32);
                for (i, (k, v)) in env.iter().enumerate() {
                    let mut var = vars.reborrow().get(i as u32);
                    var.set_name(k);
                    var.set_value(v);
                }
            }
            let vm = request.send().promise.await?.get()?.get_vm()?;
            if detach {
                let info = info(&vm).await?;
                match format {
                    Format::Json => output::print_one(&info, format),
                    Format::Table => println!("{}", info.name),
                }
                return Ok(0);
            }
            streams::print_logs(&vm, true).await?;
            let reply = vm.wait_request().send().promise.await?;
            let info = VmInfo::read(reply.get()?.get_info()?)?;
            match (info.state.as_str(), info.exit_code) {
                (_, Some(code)) => Ok(code),
                ("failed", None) => {
                    Err(CliError::new(exit::VM_FAILED, format!("microVM {} failed: {}", info.name, info.reason)))
                }
                _ => Err(CliError::new(exit::ERROR, format!("microVM {} {}: {}", info.name, info.state, info.reason))),
            }
        }
        Verb::Ps => {
            output::print_list(&list(&broker).await?, format);
            Ok(0)
        }
        Verb::Inspect { vm } => {
            output::print_one(&info(&get_vm(&broker, &vm).await?).await?, format);
            Ok(0)
        }
        Verb::Logs { vm, follow } => {
            streams::print_logs(&get_vm(&broker, &vm).await?, follow).await?;
            Ok(0)
        }
        Verb::Exec { vm, interactive, tty, env, workdir, user, command } => {
            let vm = get_vm(&broker, &vm).await?;
            let options = streams::ExecOptions { interactive, tty, env, workdir, user, command };
            streams::exec(&vm, options).await
        }
        Verb::Update { vm, io_limits } => {
            if io_limits.is_empty() {
                return Err(CliError::new(exit::INVALID, "nothing to update: give --disk-bps, --disk-iops, ..."));
            }
            let vm = get_vm(&broker, &vm).await?;
            let current = info(&vm).await?.limits.io;
            let mut request = vm.update_request();
            let now = [current.disk_bps, current.disk_iops, current.net_bps, current.net_pps];
            client::IoLimitFlags::write(io_limits.over(now), request.get().init_limits());
            let reply = request.send().promise.await?;
            output::print_one(&VmInfo::read(reply.get()?.get_info()?)?, format);
            Ok(0)
        }
        Verb::Stop { vm, time } => {
            let vm = get_vm(&broker, &vm).await?;
            let mut request = vm.stop_request();
            request.get().set_timeout_ms(time.unwrap_or(10).saturating_mul(1000));
            let reply = request.send().promise.await?;
            let info = VmInfo::read(reply.get()?.get_info()?)?;
            match format {
                Format::Json => output::print_one(&info, format),
                Format::Table => println!("{}", info.name),
            }
            Ok(0)
        }
        Verb::Start { vm } => {
            let handle = get_vm(&broker, &vm).await?;
            handle.start_request().send().promise.await?;
            println!("{vm}");
            Ok(0)
        }
        Verb::Rm { vms, force } => {
            let mut failed = None;
            for name in vms {
                let result = async {
                    let vm = get_vm(&broker, &name).await?;
                    let mut request = vm.remove_request();
                    request.get().set_force(force);
                    request.send().promise.await?;
                    Ok::<(), CliError>(())
                }
                .await;
                match result {
                    Ok(()) => println!("{name}"),
                    Err(e) => {
                        eprintln!("mmctl: {}", e.message);
                        failed = Some(e.code);
                    }
                }
            }
            Ok(failed.unwrap_or(0))
        }
        Verb::Ssh { vm, print_config, user, identity, command } => {
            let route =
                tunnel::ProxyRoute { flags: vec!["--socket".into(), socket.display().to_string()], token: None };
            let vms = match &vm {
                None => list(&broker).await?,
                Some(vm) => vec![info(&get_vm(&broker, vm).await?).await?],
            };
            let targets: Vec<_> =
                vms.iter().map(|vm| tunnel::SshTarget { id: &vm.id, name: &vm.name, address: &vm.ip }).collect();
            let login = vm.is_some() && !print_config;
            let from = tunnel::Describer::Broker;
            tunnel::ssh_verb(&targets, from, login, &route, &user, identity.as_deref(), &command)
        }
        Verb::PortForward { vm: name, ports } => {
            let vm = get_vm(&broker, &name).await?;
            tunnel::port_forward(&name, &ports, |port, reader, writer| {
                let vm = vm.clone();
                async move { tunnel::pump(&vm, port, reader, writer).await }
            })
            .await
        }
        Verb::Proxy { vm, port } => tunnel::proxy(&get_vm(&broker, &vm).await?, port).await,
        Verb::Events => streams::follow_events(&broker, format).await,
        Verb::Snapshot { verb } => snapshots::run(&broker, verb, format).await,
        Verb::Restore { snapshot, name, ssh_keys } => {
            let keys = tunnel::read_ssh_keys(&ssh_keys)?;
            snapshots::restore(&broker, &snapshot, name.as_deref(), &keys, format).await
        }
        Verb::Fork { snapshot, count, name_prefix, ssh_keys } => {
            let keys = tunnel::read_ssh_keys(&ssh_keys)?;
            snapshots::fork(&broker, &snapshot, count, name_prefix.as_deref(), &keys, format).await
        }
        Verb::Suspend { vm } => snapshots::suspend(&broker, &vm, format).await,
        Verb::Quota { .. } | Verb::Namespace { .. } | Verb::Token { .. } | Verb::Host { .. } => {
            unreachable!("refused above without --server")
        }
        Verb::Branch { vm, name } => snapshots::branch(&broker, &vm, name.as_deref(), format).await,
        Verb::Stats { vm } => {
            let vm = get_vm(&broker, &vm).await?;
            let reply = vm.stats_request().send().promise.await?;
            let mut stats = Vec::new();
            for process in reply.get()?.get_processes()?.iter() {
                stats.push(output::ProcessStats::read(process)?);
            }
            output::print_stats(&stats, format);
            Ok(0)
        }
        Verb::Audit { vm } => {
            let vm = get_vm(&broker, &vm).await?;
            let reply = vm.audit_request().send().promise.await?;
            for line in reply.get()?.get_lines()?.iter() {
                println!("{}", line?.to_string().unwrap_or_default());
            }
            Ok(0)
        }
    }
}
