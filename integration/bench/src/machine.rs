//! The host the numbers come from, recorded with them: a boot figure means
//! little without the CPU, the core count, and whether KVM is PVM.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub nproc: usize,
    pub mem_total_kib: u64,
    pub kernel: String,
    /// KVM through PVM (`/sys/module/kvm_pvm`): guest kernel code runs
    /// ~1000× slower than on hardware KVM, see shared/PVM.md.
    pub pvm: bool,
    /// /proc/loadavg when the benchmark started.
    pub loadavg_at_start: String,
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The value of the first `key` line in a `key : value` text (cpuinfo,
/// meminfo).
fn value_of<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().filter_map(|l| l.split_once(':')).find(|(k, _)| k.trim() == key).map(|(_, v)| v.trim())
}

/// `machine: MODEL, N CPUs, M MiB RAM, Linux K, PVM: yes|no`, the line
/// every benchmark's table starts with.
impl std::fmt::Display for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "machine: {}, {} CPUs, {} MiB RAM, Linux {}, PVM: {}",
            self.cpu_model,
            self.nproc,
            self.mem_total_kib / 1024,
            self.kernel,
            if self.pvm { "yes" } else { "no" }
        )
    }
}

impl Machine {
    pub fn detect() -> Machine {
        let cpuinfo = read("/proc/cpuinfo");
        let meminfo = read("/proc/meminfo");
        Machine {
            cpu_model: value_of(&cpuinfo, "model name").unwrap_or("unknown").to_string(),
            nproc: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            mem_total_kib: value_of(&meminfo, "MemTotal")
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            pvm: mm_vmm::pvm::host_is_pvm(),
            loadavg_at_start: loadavg(),
        }
    }
}

/// The first three fields of /proc/loadavg.
pub fn loadavg() -> String {
    read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// Other VMs on this host right now (mm-vmm or QEMU processes), which
/// compete with the benchmark for the CPUs: their pids. Called before each
/// spawn, so the benchmark's own VMM is never among them.
pub fn other_vmms() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let comm = read(&format!("/proc/{pid}/comm"));
            let comm = comm.trim();
            comm == "mm-vmm" || comm.starts_with("qemu-system")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_key_value_texts() {
        let cpuinfo = "processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu\n";
        assert_eq!(value_of(cpuinfo, "model name"), Some("Some CPU @ 2.0GHz"));
        assert_eq!(value_of("MemTotal:       24684000 kB\n", "MemTotal"), Some("24684000 kB"));
        assert_eq!(value_of("", "x"), None);
    }

    #[test]
    fn detects_this_machine() {
        let m = Machine::detect();
        assert!(m.nproc >= 1);
        assert!(m.mem_total_kib > 0);
        assert!(!m.kernel.is_empty());
    }
}
