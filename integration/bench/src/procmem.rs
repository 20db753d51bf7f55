//! Host memory of a VMM process, from `/proc/PID/smaps_rollup` and
//! `/proc/PID/smaps`.
//!
//! What a VMM "costs" the host is its proportional set size (Pss: each page
//! divided by the number of processes mapping it, so shared libraries are
//! not counted in full against every process) minus the guest's own RAM,
//! which the guest would need under any VMM. Guest RAM is removed by its
//! Pss too, so that both sides of the subtraction use the same accounting.
//!
//! The rest is split by what backs it. The rollup's `Pss_Anon`,
//! `Pss_Shmem` and `Pss_File` add up to its `Pss`; the guest-RAM
//! mappings' Pss is taken out of the kind that backs them (anonymous for
//! QEMU's and Firecracker's default RAM, shmem for a memfd: mm-vmm's, and
//! QEMU's `memory-backend-memfd`), using each mapping's `Anonymous` field
//! for its anonymous part and its path for the rest. What remains is the
//! VMM's own memory: anonymous + shmem (heaps, stacks, buffers: what each
//! further microVM costs in full) and file-backed (the binaries and their
//! libraries, which further VMM processes of the same binaries share).

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
    /// `start-end` in hex, as `/proc/PID/map_files/` names the mapping.
    pub range: String,
    pub perms: String,
    /// The path column; empty for anonymous memory.
    pub name: String,
    pub size_kib: u64,
    pub rss_kib: u64,
    pub pss_kib: u64,
    /// Resident anonymous pages (a private mapping's own or copied-on-write
    /// pages); a shared memfd mapping has none.
    pub anonymous_kib: u64,
}

/// What backs a mapping's pages that are not anonymous.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backing {
    /// Anonymous memory (no path, or `[heap]`, `[stack]` …).
    Anon,
    /// Shared memory: a memfd, `/dev/shm`, SysV shm.
    Shmem,
    /// A regular file.
    File,
}

impl Mapping {
    pub fn backing(&self) -> Backing {
        let name = self.name.as_str();
        if name.starts_with("/memfd:") || name.starts_with("/dev/shm/") || name.starts_with("/SYSV") {
            Backing::Shmem
        } else if name.is_empty() || name.starts_with('[') {
            Backing::Anon
        } else {
            Backing::File
        }
    }

    /// This mapping's Pss as (anonymous, shmem, file): its anonymous pages
    /// (`Anonymous`, at most its Pss: such pages are rarely shared) are
    /// anonymous, the rest goes by [`Mapping::backing`].
    pub fn pss_split(&self) -> (u64, u64, u64) {
        let anon = match self.backing() {
            Backing::Anon => self.pss_kib,
            _ => self.anonymous_kib.min(self.pss_kib),
        };
        let rest = self.pss_kib - anon;
        match self.backing() {
            Backing::Anon => (anon, 0, 0),
            Backing::Shmem => (anon, rest, 0),
            Backing::File => (anon, 0, rest),
        }
    }
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
    /// `guest_ram_pss_kib` split by backing ([`Mapping::pss_split`]).
    pub guest_ram_pss_anon_kib: u64,
    pub guest_ram_pss_shmem_kib: u64,
    pub guest_ram_pss_file_kib: u64,
    /// How many mappings were counted as guest RAM.
    pub guest_ram_mappings: usize,
}

impl Sample {
    /// The VMM's own cost: total Pss minus guest RAM Pss.
    pub fn vmm_kib(&self) -> u64 {
        self.total_pss_kib.saturating_sub(self.guest_ram_pss_kib)
    }

    /// The VMM's own anonymous + shmem Pss: `Pss_Anon + Pss_Shmem` less the
    /// guest RAM's anonymous and shmem parts.
    pub fn own_anon_shmem_kib(&self) -> u64 {
        (self.total_pss_anon_kib + self.total_pss_shmem_kib)
            .saturating_sub(self.guest_ram_pss_anon_kib + self.guest_ram_pss_shmem_kib)
    }

    /// The VMM's own file-backed Pss: `Pss_File` less guest RAM backed by a
    /// file (a restored Firecracker's memory file; none in a cold boot).
    pub fn own_file_kib(&self) -> u64 {
        self.total_pss_file_kib.saturating_sub(self.guest_ram_pss_file_kib)
    }

    fn add(&mut self, other: &Sample) {
        self.total_pss_kib += other.total_pss_kib;
        self.total_rss_kib += other.total_rss_kib;
        self.total_pss_anon_kib += other.total_pss_anon_kib;
        self.total_pss_file_kib += other.total_pss_file_kib;
        self.total_pss_shmem_kib += other.total_pss_shmem_kib;
        self.guest_ram_pss_kib += other.guest_ram_pss_kib;
        self.guest_ram_rss_kib += other.guest_ram_rss_kib;
        self.guest_ram_pss_anon_kib += other.guest_ram_pss_anon_kib;
        self.guest_ram_pss_shmem_kib += other.guest_ram_pss_shmem_kib;
        self.guest_ram_pss_file_kib += other.guest_ram_pss_file_kib;
        self.guest_ram_mappings += other.guest_ram_mappings;
    }

    /// The sum of `samples`.
    pub fn sum<'a>(samples: impl IntoIterator<Item = &'a Sample>) -> Sample {
        let mut total = Sample::default();
        for s in samples {
            total.add(s);
        }
        total
    }
}

/// `Key:   123 kB` → ("Key", 123). Lines without a number (VmFlags) → None.
fn field(line: &str) -> Option<(&str, u64)> {
    let (key, value) = line.split_once(':')?;
    let number = value.split_whitespace().next()?.parse().ok()?;
    Some((key.trim(), number))
}

/// A smaps header: `start-end perms offset dev inode [path]`. Returns
/// (range, perms, path). The path may contain spaces, e.g. `(deleted)`.
fn header(line: &str) -> Option<(&str, &str, &str)> {
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
    Some((columns[0], columns[1], rest.trim()))
}

/// Parses `/proc/PID/smaps` text into its mappings.
pub fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut mappings: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        if let Some((range, perms, name)) = header(line) {
            mappings.push(Mapping {
                range: range.to_string(),
                perms: perms.to_string(),
                name: name.to_string(),
                ..Mapping::default()
            });
            continue;
        }
        let (Some(current), Some((key, value))) = (mappings.last_mut(), field(line)) else {
            continue;
        };
        match key {
            "Size" => current.size_kib = value,
            "Rss" => current.rss_kib = value,
            "Pss" => current.pss_kib = value,
            "Anonymous" => current.anonymous_kib = value,
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
    let split = ram.iter().map(|m| m.pss_split()).fold((0, 0, 0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2));
    Ok(Sample {
        guest_ram_pss_kib: ram.iter().map(|m| m.pss_kib).sum(),
        guest_ram_rss_kib: ram.iter().map(|m| m.rss_kib).sum(),
        guest_ram_pss_anon_kib: split.0,
        guest_ram_pss_shmem_kib: split.1,
        guest_ram_pss_file_kib: split.2,
        guest_ram_mappings: ram.len(),
        ..whole
    })
}

/// Samples one live process: its figures and its guest-RAM mappings (none
/// for a process without them, such as a jail's outer half). A zombie's
/// smaps are empty, which is an error here.
/// With `require_ram`, a process without guest RAM is an error that lists
/// its large mappings.
pub fn sample_process(pid: u32, which: &GuestRam, require_ram: bool) -> Result<(Sample, Vec<Mapping>)> {
    let proc_dir = Path::new("/proc").join(pid.to_string());
    let read = |name: &str| {
        std::fs::read_to_string(proc_dir.join(name)).with_context(|| format!("reading /proc/{pid}/{name}"))
    };
    // Rollup first, smaps straight after: the guest touches few new
    // pages in between, so the two agree to within a few pages.
    let rollup = read("smaps_rollup")?;
    let smaps = read("smaps")?;
    let sample = sample_texts(&rollup, &smaps, which, require_ram).with_context(|| format!("pid {pid}"))?;
    let mappings = parse_smaps(&smaps);
    let ram = guest_ram(&mappings, which).into_iter().cloned().collect();
    Ok((sample, ram))
}

/// Samples the live processes `pids` of one VMM and sums them. At least
/// one must map guest RAM.
pub fn sample(pids: &[u32], which: &GuestRam) -> Result<Sample> {
    let mut total = Sample::default();
    for pid in pids {
        total.add(&sample_process(*pid, which, pids.len() == 1)?.0);
    }
    if total.guest_ram_mappings == 0 {
        bail!("no guest-RAM mapping ({which:?}) in any of the processes {pids:?}");
    }
    Ok(total)
}

/// (device, inode, allocated KiB) of the file behind one mapping of `pid`,
/// through `/proc/PID/map_files/RANGE` (root only; works for a memfd that
/// no longer has an fd open).
pub fn mapped_file(pid: u32, mapping: &Mapping) -> Result<(u64, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let path = format!("/proc/{pid}/map_files/{}", mapping.range);
    let meta = std::fs::metadata(&path).with_context(|| format!("stat {path}"))?;
    Ok((meta.dev(), meta.ino(), meta.blocks() * 512 / 1024))
}

/// Guest RAM resident on the host, however many processes map it: for RAM
/// in shared memory (a memfd) the file's allocated size, each file once
/// (pages written with `pwrite` and not touched through a mapping since,
/// such as the kernel image mm-vmm loads, are in no process's Pss); for
/// anonymous or file-backed RAM the mappings' Rss. `ram` is each process's
/// guest-RAM mappings; `stat` is [`mapped_file`] outside tests.
pub fn guest_ram_resident_kib(
    ram: &[(u32, Vec<Mapping>)],
    stat: impl Fn(u32, &Mapping) -> Result<(u64, u64, u64)>,
) -> Result<u64> {
    let mut files = std::collections::BTreeMap::new();
    let mut anonymous = 0;
    for (pid, mappings) in ram {
        for mapping in mappings {
            if mapping.backing() == Backing::Shmem {
                let (dev, ino, kib) = stat(*pid, mapping)?;
                files.insert((dev, ino), kib);
            } else {
                anonymous += mapping.rss_kib;
            }
        }
    }
    Ok(anonymous + files.values().sum::<u64>())
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
        assert_eq!(header("0-1000 r--p 00000000 00:00 0"), Some(("0-1000", "r--p", "")));
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

    /// mm-vmm as smaps shows it, with the fields of the split: the binary's
    /// text (file), its data segment (a private file mapping with pages
    /// copied on write: anonymous), the heap, and the guest-RAM memfd.
    const SPLIT_SMAPS: &str = "\
55d0c0a00000-55d0c0b00000 r-xp 00000000 fe:01 1234                       /usr/bin/mm-vmm
Size:               1024 kB
Rss:                 800 kB
Pss:                 400 kB
Anonymous:             0 kB
55d0c0c00000-55d0c0c40000 rw-p 00200000 fe:01 1234                       /usr/bin/mm-vmm
Size:                256 kB
Rss:                 200 kB
Pss:                 150 kB
Anonymous:           120 kB
55d0c1000000-55d0c1400000 rw-p 00000000 00:00 0                          [heap]
Size:               4096 kB
Rss:                1500 kB
Pss:                1500 kB
Anonymous:          1500 kB
7f0000000000-7f0008000000 rw-s 00000000 00:01 5678                       /memfd:mm-guest-ram (deleted)
Size:             131072 kB
Rss:               30000 kB
Pss:               20000 kB
Anonymous:             0 kB
";

    /// Its rollup: Pss_Anon 1620 = heap 1500 + copied-on-write data 120;
    /// Pss_File 430 = text 400 + the data segment's file pages 30; Pss_Shmem
    /// 20000 = the memfd, shared with a device process.
    const SPLIT_ROLLUP: &str = "\
Rss:               32500 kB
Pss:               22050 kB
Pss_Anon:           1620 kB
Pss_File:            430 kB
Pss_Shmem:         20000 kB
";

    #[test]
    fn mappings_split_by_backing() {
        let maps = parse_smaps(SPLIT_SMAPS);
        assert_eq!(maps[0].range, "55d0c0a00000-55d0c0b00000");
        assert_eq!(
            maps.iter().map(Mapping::backing).collect::<Vec<_>>(),
            [Backing::File, Backing::File, Backing::Anon, Backing::Shmem]
        );
        assert_eq!(maps[0].pss_split(), (0, 0, 400));
        // Copied-on-write pages of a file mapping are anonymous.
        assert_eq!(maps[1].anonymous_kib, 120);
        assert_eq!(maps[1].pss_split(), (120, 0, 30));
        assert_eq!(maps[2].pss_split(), (1500, 0, 0));
        assert_eq!(maps[3].pss_split(), (0, 20000, 0));
        // Anonymous is Rss, so it may exceed a shared mapping's Pss.
        let shared = Mapping { pss_kib: 50, anonymous_kib: 80, name: "/x".into(), ..Mapping::default() };
        assert_eq!(shared.pss_split(), (50, 0, 0));
        for name in ["/dev/shm/q", "/SYSV00000000 (deleted)", "/memfd:memory-backend-memfd (deleted)"] {
            assert_eq!(Mapping { name: name.into(), ..Mapping::default() }.backing(), Backing::Shmem, "{name}");
        }
        for name in ["", "[stack]", "[anon:x]"] {
            assert_eq!(Mapping { name: name.into(), ..Mapping::default() }.backing(), Backing::Anon, "{name}");
        }
    }

    #[test]
    fn memfd_guest_ram_leaves_the_vmms_own_anon_shmem_and_file() {
        let s = sample_texts(SPLIT_ROLLUP, SPLIT_SMAPS, &GuestRam::Named("mm-guest-ram"), true).unwrap();
        assert_eq!((s.guest_ram_pss_anon_kib, s.guest_ram_pss_shmem_kib, s.guest_ram_pss_file_kib), (0, 20000, 0));
        assert_eq!(s.own_anon_shmem_kib(), 1620);
        assert_eq!(s.own_file_kib(), 430);
        assert_eq!(s.own_anon_shmem_kib() + s.own_file_kib(), s.vmm_kib());
    }

    #[test]
    fn anonymous_guest_ram_comes_out_of_the_anonymous_part() {
        let smaps = "\
7f1000000000-7f1008021000 rw-p 00000000 00:00 0 
Size:             131204 kB
Rss:               20000 kB
Pss:               20000 kB
Anonymous:         20000 kB
7f2000000000-7f2000400000 r-xp 00000000 fe:01 7                          /usr/bin/firecracker
Size:               4096 kB
Rss:                2000 kB
Pss:                1000 kB
Anonymous:             0 kB
";
        let rollup = "Rss: 25000 kB\nPss: 24000 kB\nPss_Anon: 23000 kB\nPss_File: 1000 kB\nPss_Shmem: 0 kB\n";
        let s = sample_texts(rollup, smaps, &GuestRam::AnonymousAtLeast(128 * 1024), true).unwrap();
        assert_eq!((s.guest_ram_pss_anon_kib, s.guest_ram_pss_shmem_kib), (20000, 0));
        assert_eq!((s.own_anon_shmem_kib(), s.own_file_kib(), s.vmm_kib()), (3000, 1000, 4000));
    }

    #[test]
    fn file_backed_guest_ram_splits_into_copied_and_file_pages() {
        // A restored Firecracker maps its memory file privately: pages the
        // guest wrote are anonymous copies, pages it only read the file's.
        let smaps = "\
7f1000000000-7f1008000000 rw-p 00000000 fe:01 9                          /run/fc-snapshot.mem
Size:             131072 kB
Rss:               12000 kB
Pss:               12000 kB
Anonymous:          5000 kB
";
        let rollup = "Rss: 15000 kB\nPss: 15000 kB\nPss_Anon: 6000 kB\nPss_File: 9000 kB\nPss_Shmem: 0 kB\n";
        let s = sample_texts(rollup, smaps, &GuestRam::Named("fc-snapshot.mem"), true).unwrap();
        assert_eq!((s.guest_ram_pss_anon_kib, s.guest_ram_pss_file_kib), (5000, 7000));
        assert_eq!((s.own_anon_shmem_kib(), s.own_file_kib(), s.vmm_kib()), (1000, 2000, 3000));
    }

    #[test]
    fn a_process_without_guest_ram_is_all_its_own() {
        // The jail's outer half: the binary and a little heap, no RAM.
        let rollup = "Rss: 3000 kB\nPss: 900 kB\nPss_Anon: 300 kB\nPss_File: 600 kB\nPss_Shmem: 0 kB\n";
        let s = sample_texts(rollup, "", &GuestRam::Named("mm-guest-ram"), false).unwrap();
        assert_eq!((s.guest_ram_mappings, s.own_anon_shmem_kib(), s.own_file_kib()), (0, 300, 600));
        assert!(sample_texts(rollup, "", &GuestRam::Named("mm-guest-ram"), true).is_err());
    }

    #[test]
    fn sums_add_every_field() {
        let vmm = sample_texts(SPLIT_ROLLUP, SPLIT_SMAPS, &GuestRam::Named("mm-guest-ram"), true).unwrap();
        let outer = sample_texts(
            "Pss: 900 kB\nRss: 3000 kB\nPss_Anon: 300 kB\nPss_File: 600 kB\n",
            "",
            &GuestRam::Named("x"),
            false,
        )
        .unwrap();
        let both = Sample::sum([&vmm, &outer]);
        assert_eq!(both.total_pss_kib, 22950);
        assert_eq!(both.guest_ram_pss_kib, 20000);
        assert_eq!((both.own_anon_shmem_kib(), both.own_file_kib(), both.vmm_kib()), (1920, 1030, 2950));
    }

    #[test]
    fn resident_guest_ram_counts_each_memfd_once_and_anonymous_ram_by_rss() {
        let memfd = |range: &str, rss| Mapping {
            range: range.into(),
            name: "/memfd:mm-guest-ram (deleted)".into(),
            rss_kib: rss,
            ..Mapping::default()
        };
        let anonymous = Mapping { name: String::new(), rss_kib: 700, ..Mapping::default() };
        // mm-vmm and a device process map the same memfd; its allocated
        // size (40000) is more than either maps (pages mm-vmm pwrote).
        let ram = vec![(10, vec![memfd("a-b", 30000)]), (11, vec![memfd("c-d", 500)]), (12, vec![anonymous])];
        let stat = |pid: u32, m: &Mapping| -> Result<(u64, u64, u64)> {
            assert!(pid == 10 || pid == 11, "{pid} {m:?}");
            Ok((1, 99, 40000))
        };
        assert_eq!(guest_ram_resident_kib(&ram, stat).unwrap(), 40700);
        let failing = |_: u32, _: &Mapping| -> Result<(u64, u64, u64)> { bail!("gone") };
        assert!(guest_ram_resident_kib(&ram, failing).is_err());
    }

    #[test]
    fn this_process_can_stat_its_own_memfd_mapping() {
        // SAFETY: memfd_create with a valid C string; the fd is ours.
        let fd = unsafe { libc::memfd_create(c"mm-bench-test-ram".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: our own fd.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(1 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[1u8; 8192], 0).unwrap();
        // SAFETY: a fresh shared mapping of our memfd, unmapped below.
        let addr = unsafe { libc::mmap(std::ptr::null_mut(), 1 << 20, libc::PROT_READ, libc::MAP_SHARED, fd, 0) };
        assert_ne!(addr, libc::MAP_FAILED);
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let maps = parse_smaps(&smaps);
        let ram = guest_ram(&maps, &GuestRam::Named("mm-bench-test-ram"));
        assert_eq!(ram.len(), 1);
        assert_eq!(ram[0].backing(), Backing::Shmem);
        // Written with pwrite, never touched through the mapping: no Rss,
        // but 8 KiB resident in the memfd. (/proc/PID/map_files needs
        // CAP_SYS_ADMIN; without it the test only checks the parse.)
        assert_eq!(ram[0].rss_kib, 0);
        let owned: Vec<(u32, Vec<Mapping>)> = vec![(std::process::id(), ram.into_iter().cloned().collect())];
        match guest_ram_resident_kib(&owned, mapped_file) {
            Ok(kib) => assert_eq!(kib, 8),
            // SAFETY: geteuid has no preconditions.
            Err(e) => assert_ne!(unsafe { libc::geteuid() }, 0, "as root: {e:#}"),
        }
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(addr, 1 << 20) };
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
