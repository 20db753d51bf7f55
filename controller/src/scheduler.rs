//! Placement as a pure function of the hosts' capacity and a machine's needs.
//!
//! Nothing here touches the database: the caller loads a consistent snapshot
//! (under the placement advisory lock, see `store::machines`) and stores the
//! answer. That keeps the policy testable in microseconds and lets the broker
//! session (later) feed the same function with live capacity.
//!
//! Policy, in order:
//! 1. hard filters: the host is not lost (its broker stopped heart-beating)
//!    nor cordoned, carries every label the machine
//!    asks for, and has the CPUs and memory free (no overcommit: a host's
//!    `cpus`/`memory_mb` are what its broker offers to microVMs);
//! 2. spread: fewest machines of the same namespace, so one tenant's
//!    machines do not share a failure domain when they need not;
//! 3. least allocated: most free capacity (CPU and memory shares averaged),
//!    so load evens out;
//! 4. the host name, so equal hosts give a stable answer.

use std::collections::BTreeMap;
use std::fmt;

/// One host as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCapacity {
    pub name: String,
    pub cpus: i64,
    pub memory_mb: i64,
    pub labels: BTreeMap<String, String>,
    pub cordoned: bool,
    /// Its broker stopped heart-beating.
    pub lost: bool,
    /// CPUs and memory of the machines already placed there (every state but
    /// destroyed: a stopped machine keeps its disk there and must be able to
    /// start again in place).
    pub used_cpus: i64,
    pub used_memory_mb: i64,
    /// Machines of the requesting namespace already there.
    pub namespace_machines: i64,
}

impl HostCapacity {
    fn free_cpus(&self) -> i64 {
        self.cpus - self.used_cpus
    }

    fn free_memory_mb(&self) -> i64 {
        self.memory_mb - self.used_memory_mb
    }
}

/// What one machine needs.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub cpus: i64,
    pub memory_mb: i64,
    /// Labels the host must carry, each with exactly this value.
    pub host_labels: &'a BTreeMap<String, String>,
}

/// Why no host fits, counted per reason so the message says what to fix.
/// A host is counted under the first filter it fails.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
pub struct NoFit {
    pub hosts: usize,
    pub lost: usize,
    pub cordoned: usize,
    pub label_mismatch: usize,
    pub too_few_cpus: usize,
    pub too_little_memory: usize,
    /// The request, repeated for the message.
    pub cpus: i64,
    pub memory_mb: i64,
    pub host_labels: BTreeMap<String, String>,
}

impl fmt::Display for NoFit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no host can take {} CPU(s) and {} MB", self.cpus, self.memory_mb)?;
        if !self.host_labels.is_empty() {
            let labels: Vec<String> = self.host_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            write!(f, " with labels {}", labels.join(","))?;
        }
        if self.hosts == 0 {
            return write!(f, ": no hosts are registered");
        }
        write!(f, ": of {} host(s)", self.hosts)?;
        let reasons = [
            (self.lost, "lost"),
            (self.cordoned, "cordoned"),
            (self.label_mismatch, "lacking the labels"),
            (self.too_few_cpus, "short of CPUs"),
            (self.too_little_memory, "short of memory"),
        ];
        let parts: Vec<String> = reasons.iter().filter(|(n, _)| *n > 0).map(|(n, why)| format!("{n} {why}")).collect();
        write!(f, " {}", parts.join(", "))
    }
}

/// Picks the host for `request`, or says why none fits.
pub fn place<'h>(hosts: &'h [HostCapacity], request: Request<'_>) -> Result<&'h HostCapacity, NoFit> {
    let mut no_fit = NoFit {
        hosts: hosts.len(),
        cpus: request.cpus,
        memory_mb: request.memory_mb,
        host_labels: request.host_labels.clone(),
        ..NoFit::default()
    };
    let mut candidates = Vec::new();
    for host in hosts {
        if host.lost {
            no_fit.lost += 1;
        } else if host.cordoned {
            no_fit.cordoned += 1;
        } else if !request.host_labels.iter().all(|(k, v)| host.labels.get(k) == Some(v)) {
            no_fit.label_mismatch += 1;
        } else if host.free_cpus() < request.cpus {
            no_fit.too_few_cpus += 1;
        } else if host.free_memory_mb() < request.memory_mb {
            no_fit.too_little_memory += 1;
        } else {
            candidates.push(host);
        }
    }
    let placed = candidates
        .into_iter()
        .min_by(|a, b| {
            a.namespace_machines
                .cmp(&b.namespace_machines)
                .then_with(|| free_share(b).total_cmp(&free_share(a)))
                .then_with(|| a.name.cmp(&b.name))
        })
        .ok_or(no_fit);
    crate::metrics::scheduled(placed.is_ok());
    placed
}

/// The share of a host left free after placement so far, CPU and memory
/// averaged: 1.0 is an empty host, 0.0 a full one.
fn free_share(host: &HostCapacity) -> f64 {
    let cpu = host.free_cpus() as f64 / host.cpus.max(1) as f64;
    let memory = host.free_memory_mb() as f64 / host.memory_mb.max(1) as f64;
    (cpu + memory) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, cpus: i64, memory_mb: i64) -> HostCapacity {
        HostCapacity {
            name: name.to_owned(),
            cpus,
            memory_mb,
            labels: BTreeMap::new(),
            cordoned: false,
            lost: false,
            used_cpus: 0,
            used_memory_mb: 0,
            namespace_machines: 0,
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn request(cpus: i64, memory_mb: i64, host_labels: &BTreeMap<String, String>) -> Request<'_> {
        Request { cpus, memory_mb, host_labels }
    }

    #[test]
    fn no_hosts_is_a_clear_error() {
        let none = BTreeMap::new();
        let err = place(&[], request(1, 256, &none)).unwrap_err();
        assert_eq!(err.to_string(), "no host can take 1 CPU(s) and 256 MB: no hosts are registered");
    }

    #[test]
    fn skips_cordoned_hosts() {
        let mut a = host("a", 8, 8192);
        a.cordoned = true;
        let hosts = [a, host("b", 1, 512)];
        let none = BTreeMap::new();
        assert_eq!(place(&hosts, request(1, 256, &none)).unwrap().name, "b");
    }

    #[test]
    fn skips_lost_hosts() {
        let mut a = host("a", 8, 8192);
        a.lost = true;
        let none = BTreeMap::new();
        assert_eq!(place(&[a.clone(), host("b", 1, 512)], request(1, 256, &none)).unwrap().name, "b");
        let err = place(&[a], request(1, 256, &none)).unwrap_err();
        assert_eq!(err.to_string(), "no host can take 1 CPU(s) and 256 MB: of 1 host(s) 1 lost");
    }

    #[test]
    fn honours_labels() {
        let mut a = host("a", 8, 8192);
        a.labels = labels(&[("region", "ams")]);
        let mut b = host("b", 8, 8192);
        b.labels = labels(&[("region", "fra"), ("gpu", "no")]);
        let hosts = [a, b];
        let want = labels(&[("region", "fra")]);
        assert_eq!(place(&hosts, request(1, 256, &want)).unwrap().name, "b");
        let impossible = labels(&[("region", "lhr")]);
        let err = place(&hosts, request(1, 256, &impossible)).unwrap_err();
        assert_eq!(err.label_mismatch, 2);
        assert!(err.to_string().contains("with labels region=lhr"), "{err}");
    }

    #[test]
    fn respects_cpu_and_memory() {
        let mut a = host("a", 4, 4096);
        a.used_cpus = 3;
        let mut b = host("b", 4, 4096);
        b.used_memory_mb = 3900;
        let none = BTreeMap::new();
        let hosts = [a, b, host("c", 1, 1024)];
        assert_eq!(
            place(&hosts, request(2, 512, &none)).unwrap_err().to_string(),
            "no host can take 2 CPU(s) and 512 MB: of 3 host(s) 2 short of CPUs, 1 short of memory"
        );
        // Only "a" has 2 GB and a CPU free.
        assert_eq!(place(&hosts, request(1, 2048, &none)).unwrap().name, "a");
        // "c" is small but empty, so the least allocated.
        assert_eq!(place(&hosts, request(1, 512, &none)).unwrap().name, "c");
    }

    #[test]
    fn exact_fit_is_a_fit() {
        let none = BTreeMap::new();
        let hosts = [host("a", 2, 512)];
        assert_eq!(place(&hosts, request(2, 512, &none)).unwrap().name, "a");
    }

    #[test]
    fn spreads_a_namespace_before_packing_by_free_space() {
        // "a" is emptier, but already has one of this namespace's machines.
        let mut a = host("a", 64, 65536);
        a.namespace_machines = 1;
        let mut b = host("b", 8, 8192);
        b.used_cpus = 4;
        b.used_memory_mb = 4096;
        let none = BTreeMap::new();
        let hosts = [a, b];
        assert_eq!(place(&hosts, request(1, 256, &none)).unwrap().name, "b");
    }

    #[test]
    fn prefers_the_least_allocated_host_then_the_name() {
        let mut a = host("a", 8, 8192);
        a.used_cpus = 6;
        let none = BTreeMap::new();
        let hosts = [a, host("b", 8, 8192), host("c", 8, 8192)];
        assert_eq!(place(&hosts, request(1, 256, &none)).unwrap().name, "b");
    }

    #[test]
    fn placing_repeatedly_spreads_over_all_hosts() {
        let none = BTreeMap::new();
        let mut hosts = vec![host("a", 4, 4096), host("b", 4, 4096), host("c", 4, 4096)];
        let mut placed = Vec::new();
        for _ in 0..6 {
            let name = place(&hosts, request(1, 512, &none)).unwrap().name.clone();
            let chosen = hosts.iter_mut().find(|h| h.name == name).unwrap();
            chosen.used_cpus += 1;
            chosen.used_memory_mb += 512;
            chosen.namespace_machines += 1;
            placed.push(name);
        }
        assert_eq!(placed, ["a", "b", "c", "a", "b", "c"]);
    }
}
