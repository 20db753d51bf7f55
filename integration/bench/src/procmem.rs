//! Host memory of a VMM process, from `/proc/PID/smaps_rollup` and
//! `/proc/PID/smaps`.
//!
//! What a VMM "costs" the host is its proportional set size (Pss: each page
//! divided by the number of processes mapping it, so shared libraries are
//! not counted in full against every process) minus the guest's own RAM,
//! which the guest would need under any VMM. Guest RAM is removed by its
//! Pss too, so that both sides of the subtraction use the same accounting.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Serialize;

/// How to find the guest-RAM mapping(s) in a VMM's smaps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestRam {
    /// Every mapping whose path contains this text: mm-vmm's RAM is a memfd
    /// named `mm-guest-ram`, which smaps shows as
    /// `/memfd:mm-guest-ram (deleted)`.
    Named(&'static str),
    /// A read-write anonymous mapping (no path) of exactly this many KiB:
    /// QEMU allocates `-m` RAM with one `mmap` of that size (2 MiB aligned,
    /// followed by a PROT_NONE guard page, which is a separate mapping).
    /// If several match, the one with the most Pss is taken.
    AnonymousOfSize(u64),
    /// The read-write anonymous mapping of at least this many KiB with the
    /// most Pss: Firecracker's RAM, which the kernel merges with a small
    /// neighbouring anonymous mapping (128 MiB showed as 131204 kB), so
    /// its figures include up to that neighbour's few pages.
    AnonymousAtLeast(u64),
}

/// One mapping from smaps: the fields the benchmark needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mapping {
    pub perms: String,
    /// The path column; empty for anonymous memory.
    pub name: String,
    pub size_kib: u64,
    pub rss_kib: u64,
    pub pss_kib: u64,
}

/// A memory sample of one or more processes of one VMM, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Sample {
    /// Pss of the whole process(es), from smaps_rollup.
    pub total_pss_kib: u64,
    /// Rss of the whole process(es), from smaps_rollup, for reference.
    pub total_rss_kib: u64,
    /// The total Pss split by kind (smaps_rollup's Pss_Anon, Pss_File,
    /// Pss_Shmem; 0 on kernels without them): file-backed Pss is the
    /// binary and its shared libraries, which other instances would share.
    pub total_pss_anon_kib: u64,
    pub total_pss_file_kib: u64,
    pub total_pss_shmem_kib: u64,
    /// Pss of the guest-RAM mapping(s).
    pub guest_ram_pss_kib: u64,
    /// Rss of the guest-RAM mapping(s), for reference.
    pub guest_ram_rss_kib: u64,
    /// How many mappings were counted as guest RAM.
    pub guest_ram_mappings: usize,
}

impl Sample {
    /// The VMM's own cost: total Pss minus guest RAM Pss.
    pub fn vmm_kib(&self) -> u64 {
        self.total_pss_kib.saturating_sub(self.guest_ram_pss_kib)
    }

    fn add(&mut self, other: &Sample) {
        self.total_pss_kib += other.total_pss_kib;
        self.total_rss_kib += other.total_rss_kib;
        self.total_pss_anon_kib += other.total_pss_anon_kib;
        self.total_pss_file_kib += other.total_pss_file_kib;
        self.total_pss_shmem_kib += other.total_pss_shmem_kib;
        self.guest_ram_pss_kib += other.guest_ram_pss_kib;
        self.guest_ram_rss_kib += other.guest_ram_rss_kib;
        self.guest_ram_mappings += other.guest_ram_mappings;
    }
}

/// `Key:   123 kB` → ("Key", 123). Lines without a number (VmFlags) → None.
fn field(line: &str) -> Option<(&str, u64)> {
    let (key, value) = line.split_once(':')?;
    let number = value.split_whitespace().next()?.parse().ok()?;
    Some((key.trim(), number))
}

/// A smaps header: `start-end perms offset dev inode [path]`. Returns
/// (perms, path). The path may contain spaces, e.g. `(deleted)`.
fn header(line: &str) -> Option<(&str, &str)> {
    let mut rest = line;
    let mut columns = [""; 5];
    for column in &mut columns {
        rest = rest.trim_start();
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        *column = &rest[..end];
        rest = &rest[end..];
    }
    let (start, end) = columns[0].split_once('-')?;
    let hex = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_hexdigit());
    if !hex(start) || !hex(end) || columns[1].len() != 4 {
        return None;
    }
    Some((columns[1], rest.trim()))
}

/// Parses `/proc/PID/smaps` text into its mappings.
pub fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut mappings: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        if let Some((perms, name)) = header(line) {
            mappings.push(Mapping { perms: perms.to_string(), name: name.to_string(), ..Mapping::default() });
            continue;
        }
        let (Some(current), Some((key, value))) = (mappings.last_mut(), field(line)) else {
            continue;
        };
        match key {
            "Size" => current.size_kib = value,
            "Rss" => current.rss_kib = value,
            "Pss" => current.pss_kib = value,
            _ => {}
        }
    }
    mappings
}

/// Parses `/proc/PID/smaps_rollup` text into the whole-process fields of a
/// [`Sample`] (the guest-RAM fields stay 0).
pub fn parse_rollup(text: &str) -> Result<Sample> {
    let mut sample = Sample::default();
    let (mut pss, mut rss) = (None, None);
    for (key, value) in text.lines().filter_map(field) {
        match key {
            "Pss" => pss = Some(value),
            "Rss" => rss = Some(value),
            "Pss_Anon" => sample.total_pss_anon_kib = value,
            "Pss_File" => sample.total_pss_file_kib = value,
            "Pss_Shmem" => sample.total_pss_shmem_kib = value,
            _ => {}
        }
    }
    match (pss, rss) {
        (Some(pss), Some(rss)) => {
            sample.total_pss_kib = pss;
            sample.total_rss_kib = rss;
            Ok(sample)
        }
        _ => bail!("smaps_rollup has no Pss/Rss lines (has the process exited?)"),
    }
}

/// The guest-RAM mappings among `mappings`.
pub fn guest_ram<'a>(mappings: &'a [Mapping], which: &GuestRam) -> Vec<&'a Mapping> {
    match which {
        GuestRam::Named(text) => mappings.iter().filter(|m| m.name.contains(text)).collect(),
        GuestRam::AnonymousOfSize(kib) => mappings
            .iter()
            .filter(|m| m.name.is_empty() && m.size_kib == *kib && m.perms.starts_with("rw"))
            .max_by_key(|m| m.pss_kib)
            .into_iter()
            .collect(),
        GuestRam::AnonymousAtLeast(kib) => mappings
            .iter()
            .filter(|m| m.name.is_empty() && m.size_kib >= *kib && m.perms.starts_with("rw"))
            .max_by_key(|m| m.pss_kib)
            .into_iter()
            .collect(),
    }
}

/// Samples one process from its rollup and smaps texts. With `require_ram`
/// false, a process without the guest-RAM mapping (a jailed mm-vmm's outer
/// half) counts with none.
pub fn sample_texts(rollup: &str, smaps: &str, which: &GuestRam, require_ram: bool) -> Result<Sample> {
    let whole = parse_rollup(rollup)?;
    let mappings = parse_smaps(smaps);
    let ram = guest_ram(&mappings, which);
    if ram.is_empty() && !require_ram {
        return Ok(whole);
    }
    if ram.is_empty() {
        let large: Vec<String> = mappings
            .iter()
            .filter(|m| m.size_kib >= 16 * 1024)
            .map(|m| format!("{} {} kB {:?}", m.perms, m.size_kib, m.name))
            .collect();
        bail!("no guest-RAM mapping ({which:?}) in smaps; mappings of 16 MiB or more: {large:?}");
    }
    Ok(Sample {
        guest_ram_pss_kib: ram.iter().map(|m| m.pss_kib).sum(),
        guest_ram_rss_kib: ram.iter().map(|m| m.rss_kib).sum(),
        guest_ram_mappings: ram.len(),
        ..whole
    })
}

/// Samples the live processes `pids` of one VMM and sums them. Each must
/// still be running (a zombie's smaps are empty, which is an error here).
pub fn sample(pids: &[u32], which: &GuestRam) -> Result<Sample> {
    let mut total = Sample::default();
    for pid in pids {
        let proc_dir = Path::new("/proc").join(pid.to_string());
        let read = |name: &str| {
            std::fs::read_to_string(proc_dir.join(name)).with_context(|| format!("reading /proc/{pid}/{name}"))
        };
        // Rollup first, smaps straight after: the guest touches few new
        // pages in between, so the two agree to within a few pages.
        let rollup = read("smaps_rollup")?;
        let smaps = read("smaps")?;
        let one = sample_texts(&rollup, &smaps, which, pids.len() == 1).with_context(|| format!("pid {pid}"))?;
        total.add(&one);
    }
    if total.guest_ram_mappings == 0 {
        bail!("no guest-RAM mapping ({which:?}) in any of the processes {pids:?}");
    }
    Ok(total)
}

/// `pid` and all its descendants (a jailed mm-vmm is two processes: the
/// jail's outer half and the VMM in its own PID namespace), from
/// `/proc/PID/task/TID/children`.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut next = 0;
    while next < all.len() {
        let current = all[next];
        next += 1;
        let tasks = std::fs::read_dir(format!("/proc/{current}/task")).into_iter().flatten().flatten();
        for task in tasks {
            let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            all.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    const MM_SMAPS: &str = "\
55d0c0a00000-55d0c0b00000 r-xp 00000000 fe:01 1234                       /work/main/target/release/mm-vmm
Size:               1024 kB
KernelPageSize:        4 kB
Rss:                 900 kB
Pss:                 900 kB
VmFlags: rd ex mr mw me dw
7f0000000000-7f0008000000 rw-s 00000000 00:01 5678                       /memfd:mm-guest-ram (deleted)
Size:             131072 kB
KernelPageSize:        4 kB
Rss:               40000 kB
Pss:               39000 kB
Shared_Clean:          0 kB
VmFlags: rd wr sh mr mw me ms sd
7f0010000000-7f0010100000 rw-p 00000000 00:00 0 
Size:               1024 kB
Rss:                 100 kB
Pss:                 100 kB
VmFlags: rd wr mr mw me ac sd
";

    const ROLLUP: &str = "\
55d0c0a00000-7ffd12345000 ---p 00000000 00:00 0                          [rollup]
Rss:               41500 kB
Pss:               40300 kB
Pss_Anon:            100 kB
Pss_File:           1200 kB
Pss_Shmem:         39000 kB
";

    #[test]
    fn parses_headers_fields_and_names_with_spaces() {
        let maps = parse_smaps(MM_SMAPS);
        assert_eq!(maps.len(), 3);
        assert_eq!(maps[1].name, "/memfd:mm-guest-ram (deleted)");
        assert_eq!(maps[1].perms, "rw-s");
        assert_eq!((maps[1].size_kib, maps[1].rss_kib, maps[1].pss_kib), (131072, 40000, 39000));
        assert_eq!(maps[2].name, "");
        assert_eq!(maps[0].name, "/work/main/target/release/mm-vmm");
    }

    #[test]
    fn field_lines_are_not_headers() {
        assert!(header("Size:               1024 kB").is_none());
        assert!(header("VmFlags: rd wr mr mw me ac sd").is_none());
        assert_eq!(header("0-1000 r--p 00000000 00:00 0"), Some(("r--p", "")));
    }

    #[test]
    fn rollup_totals() {
        let s = parse_rollup(ROLLUP).unwrap();
        assert_eq!((s.total_pss_kib, s.total_rss_kib), (40300, 41500));
        assert_eq!((s.total_pss_anon_kib, s.total_pss_file_kib, s.total_pss_shmem_kib), (100, 1200, 39000));
        assert!(parse_rollup("").is_err());
    }

    #[test]
    fn mm_guest_ram_is_the_memfd() {
        let s = sample_texts(ROLLUP, MM_SMAPS, &GuestRam::Named("mm-guest-ram"), true).unwrap();
        assert_eq!(s.guest_ram_pss_kib, 39000);
        assert_eq!(s.guest_ram_rss_kib, 40000);
        assert_eq!(s.guest_ram_mappings, 1);
        assert_eq!(s.vmm_kib(), 1300);
    }

    #[test]
    fn qemu_guest_ram_is_the_anonymous_mapping_of_ram_size() {
        let smaps = "\
7f1000000000-7f1008000000 rw-p 00000000 00:00 0 
Size:             131072 kB
Rss:               30000 kB
Pss:               30000 kB
7f1008000000-7f1008001000 ---p 00000000 00:00 0 
Size:                  4 kB
Rss:                   0 kB
Pss:                   0 kB
7f2000000000-7f2008000000 r--p 00000000 fe:01 99                         /usr/share/big-file
Size:             131072 kB
Rss:                  10 kB
Pss:                  10 kB
7f3000000000-7f3008000000 rw-p 00000000 00:00 0 
Size:             131072 kB
Rss:                   8 kB
Pss:                   8 kB
";
        let rollup = "Rss: 50000 kB\nPss: 45000 kB\n";
        let s = sample_texts(rollup, smaps, &GuestRam::AnonymousOfSize(128 * 1024), true).unwrap();
        // The named file of the same size is not RAM; of two anonymous
        // candidates the one the guest has touched wins.
        assert_eq!(s.guest_ram_pss_kib, 30000);
        assert_eq!(s.guest_ram_mappings, 1);
        assert_eq!(s.vmm_kib(), 15000);
    }

    #[test]
    fn firecracker_guest_ram_is_the_largest_anonymous_mapping_of_at_least_ram_size() {
        let smaps = "\
7f1000000000-7f1008021000 rw-p 00000000 00:00 0 
Size:             131204 kB
Rss:               20000 kB
Pss:               20000 kB
7f2000000000-7f2000100000 rw-p 00000000 00:00 0 
Size:               1024 kB
Rss:                 100 kB
Pss:                 100 kB
";
        let rollup = "Rss: 25000 kB\nPss: 24000 kB\n";
        let s = sample_texts(rollup, smaps, &GuestRam::AnonymousAtLeast(128 * 1024), true).unwrap();
        assert_eq!((s.guest_ram_rss_kib, s.guest_ram_mappings, s.vmm_kib()), (20000, 1, 4000));
        assert!(sample_texts(rollup, smaps, &GuestRam::AnonymousOfSize(128 * 1024), true).is_err());
    }

    #[test]
    fn missing_guest_ram_is_an_error() {
        let err = sample_texts(ROLLUP, MM_SMAPS, &GuestRam::AnonymousOfSize(64 * 1024), true);
        assert!(err.is_err());
    }

    #[test]
    fn the_process_tree_holds_a_child() {
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let tree = process_tree(std::process::id());
        assert_eq!(tree[0], std::process::id());
        assert!(tree.contains(&child.id()), "{tree:?}");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
