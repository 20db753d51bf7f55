//! Printing microVMs as a table or as JSON (`--output`).

use mm_protocols::broker_capnp::vm_info;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, Serialize)]
pub struct ProcessInfo {
    pub role: String,
    pub pid: i32,
    pub restarts: u32,
}

/// A microVM as mmctl shows it (`ip` and `mac` are empty when it has no network).
#[derive(Debug, Serialize)]
pub struct VmInfo {
    pub id: String,
    pub name: String,
    pub image: String,
    pub state: String,
    pub reason: String,
    pub cpus: u8,
    pub memory_mib: u32,
    pub exit_code: Option<i32>,
    pub created_at: String,
    pub ip: String,
    pub mac: String,
    pub command: Vec<String>,
    pub processes: Vec<ProcessInfo>,
    pub limits: Limits,
}

/// What the host enforces on the microVM (broker.capnp's `VmInfo`).
#[derive(Debug, Serialize)]
pub struct Limits {
    /// mm-vmm's CPU time cap, in cores (cgroup `cpu.max`).
    pub cpu_quota: f64,
    pub cpu_weight: u16,
    /// Host memory limits: mm-vmm's (guest RAM + overhead), each device's.
    pub vmm_memory_max_bytes: u64,
    pub device_memory_max_bytes: u64,
    /// console.log is rotated at this size (one older file kept).
    pub console_log_max_bytes: u64,
    /// The device back ends' rate limits (0: unlimited).
    pub io: IoLimits,
}

/// broker.capnp's `IoLimits`: per disk, and the network interface.
#[derive(Debug, Default, Serialize)]
pub struct IoLimits {
    pub disk_bps: u64,
    pub disk_iops: u64,
    pub net_bps: u64,
    pub net_pps: u64,
}

impl IoLimits {
    fn describe(bps: u64, ops: u64, unit: &str) -> String {
        match (bps, ops) {
            (0, 0) => "unlimited".into(),
            (b, 0) => format!("{} KiB/s", b >> 10),
            (0, o) => format!("{o} {unit}"),
            (b, o) => format!("{} KiB/s, {o} {unit}", b >> 10),
        }
    }
}

fn text(t: capnp::Result<capnp::text::Reader<'_>>) -> capnp::Result<String> {
    Ok(t?.to_string().unwrap_or_default())
}

impl VmInfo {
    pub fn read(info: vm_info::Reader<'_>) -> capnp::Result<VmInfo> {
        let mut processes = Vec::new();
        for p in info.get_pids()?.iter() {
            processes.push(ProcessInfo { role: text(p.get_role())?, pid: p.get_pid(), restarts: p.get_restarts() });
        }
        let mut command = Vec::new();
        for arg in info.get_command()?.iter() {
            command.push(arg?.to_string().unwrap_or_default());
        }
        Ok(VmInfo {
            id: text(info.get_id())?,
            name: text(info.get_name())?,
            image: text(info.get_image())?,
            state: text(info.get_state())?,
            reason: text(info.get_reason())?,
            cpus: info.get_cpus(),
            memory_mib: info.get_memory_mib(),
            exit_code: Some(info.get_exit_code()).filter(|c| *c >= 0),
            created_at: text(info.get_created_at())?,
            ip: text(info.get_ip())?,
            mac: text(info.get_mac())?,
            command,
            processes,
            limits: Limits {
                cpu_quota: f64::from(info.get_cpu_quota_millis()) / 1000.0,
                cpu_weight: info.get_cpu_weight(),
                vmm_memory_max_bytes: info.get_vmm_memory_max_bytes(),
                device_memory_max_bytes: info.get_device_memory_max_bytes(),
                console_log_max_bytes: info.get_console_log_max_bytes(),
                io: match info.has_limits() {
                    false => IoLimits::default(),
                    true => {
                        let l = info.get_limits()?;
                        IoLimits {
                            disk_bps: l.get_disk_bps(),
                            disk_iops: l.get_disk_iops(),
                            net_bps: l.get_net_bps(),
                            net_pps: l.get_net_pps(),
                        }
                    }
                },
            },
        })
    }
}

/// `mmctl ps`.
pub fn print_list(vms: &[VmInfo], format: Format) {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(vms).expect("serialisable")),
        Format::Table => {
            println!(
                "{:<14} {:<20} {:<9} {:>4} {:>7} {:<16} {:<24} COMMAND",
                "ID", "NAME", "STATE", "CPUS", "MEM", "IP", "CREATED"
            );
            for vm in vms {
                println!(
                    "{:<14} {:<20} {:<9} {:>4} {:>7} {:<16} {:<24} {}",
                    vm.id,
                    vm.name,
                    vm.state,
                    vm.cpus,
                    format!("{}M", vm.memory_mib),
                    if vm.ip.is_empty() { "-" } else { &vm.ip },
                    vm.created_at,
                    vm.command.join(" ")
                );
            }
        }
    }
}

/// `mmctl inspect`.
pub fn print_one(vm: &VmInfo, format: Format) {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(vm).expect("serialisable")),
        Format::Table => {
            println!("id:        {}", vm.id);
            println!("name:      {}", vm.name);
            println!("image:     {}", vm.image);
            println!(
                "state:     {}{}",
                vm.state,
                if vm.reason.is_empty() { String::new() } else { format!(" ({})", vm.reason) }
            );
            println!("cpus:      {}", vm.cpus);
            println!("memory:    {} MiB", vm.memory_mib);
            println!("ip:        {}", if vm.ip.is_empty() { "-" } else { &vm.ip });
            println!("mac:       {}", if vm.mac.is_empty() { "-" } else { &vm.mac });
            println!("created:   {}", vm.created_at);
            println!("command:   {}", vm.command.join(" "));
            let l = &vm.limits;
            println!("cpu quota: {} cores (weight {})", l.cpu_quota, l.cpu_weight);
            println!(
                "mem limit: {} MiB mm-vmm, {} MiB each device",
                l.vmm_memory_max_bytes >> 20,
                l.device_memory_max_bytes >> 20
            );
            println!("console:   rotated at {} KiB (one older file kept)", l.console_log_max_bytes >> 10);
            println!("disk io:   {} (each disk)", IoLimits::describe(l.io.disk_bps, l.io.disk_iops, "IOPS"));
            println!("net io:    {}", IoLimits::describe(l.io.net_bps, l.io.net_pps, "packets/s"));
            if let Some(code) = vm.exit_code {
                println!("exit code: {code}");
            }
            for p in &vm.processes {
                println!("process:   {:<11} pid {:<8} restarts {}", p.role, p.pid, p.restarts);
            }
        }
    }
}

pub use mm_protocols::process_stats::ProcessStats;

/// `mmctl stats`.
pub fn print_stats(processes: &[ProcessStats], format: Format) {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(processes).expect("serialisable")),
        Format::Table => {
            println!(
                "{:<11} {:>8} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>11}",
                "ROLE", "PID", "RESTARTS", "UPTIME_S", "USER_MS", "SYS_MS", "MAXRSS_KB", "RECONNECTS", "RESUBMITTED"
            );
            for p in processes {
                if !p.error.is_empty() {
                    println!("{:<11} {:>8} {:>8}  (no answer: {})", p.role, p.pid, p.restarts, p.error);
                    continue;
                }
                println!(
                    "{:<11} {:>8} {:>8} {:>10.1} {:>10} {:>10} {:>10} {:>10} {:>11}",
                    p.role,
                    p.pid,
                    p.restarts,
                    p.uptime_ms as f64 / 1000.0,
                    p.user_cpu_ms,
                    p.system_cpu_ms,
                    p.max_rss_kib,
                    if p.role == "vmm" { "-".to_string() } else { p.reconnects.to_string() },
                    if p.role.starts_with("block") { p.resubmitted.to_string() } else { "-".to_string() }
                );
            }
        }
    }
}
