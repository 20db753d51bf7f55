//! The shared libraries a binary needs in its jail: its ELF interpreter and
//! the transitive closure of its `DT_NEEDED` entries, found where the
//! dynamic loader would look (`DT_RUNPATH`/`DT_RPATH`, then the system
//! directories).
//!
//! Reading the ELF headers (with `goblin`) instead of running `ldd` saves
//! a fork, a shell script and the loader's own start-up on every jailed
//! spawn, which is time before mm-vmm's first `KVM_RUN` (tens of ms on a
//! busy PVM host). `ldd` remains the fallback for anything this does not
//! resolve (a library outside the usual directories, found through
//! `ld.so.cache` alone).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use goblin::elf::Elf;

/// Where the loader looks when a binary names no run path (Debian's
/// multiarch directories first).
const SYSTEM_DIRS: [&str; 6] =
    ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"];

/// The interpreter and every library `exec` loads; empty for a static binary.
pub fn libraries(exec: &Path) -> Result<Vec<PathBuf>, String> {
    match from_elf(exec) {
        Ok(Some(libs)) => Ok(libs),
        Ok(None) => from_ldd(exec),
        Err(e) => Err(e),
    }
}

/// What the loader needs to know of one ELF file.
struct DynamicFacts {
    interpreter: Option<String>,
    needed: Vec<String>,
    /// `DT_RUNPATH` then `DT_RPATH`, each still `:`-separated.
    run_paths: Vec<String>,
}

/// Reads the program headers, `PT_INTERP` and the dynamic section only.
///
/// The file is mapped, not read: our own binaries carry debug info (mm-vmm
/// is ~20 MB), and copying one into a buffer to look at a few kilobytes of
/// headers cost ~20 ms per jailed spawn here. `Elf::parse` would also walk
/// every symbol and relocation; the loader needs none of that.
fn dynamic_facts(path: &Path) -> Result<DynamicFacts, String> {
    use goblin::elf::dynamic::{DT_RPATH, DT_RUNPATH, Dynamic};
    use goblin::elf::program_header::{PT_INTERP, ProgramHeader};

    let file = std::fs::File::open(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    // SAFETY: a private, read-only mapping of a binary we are about to
    // exec; the bytes are only parsed (bounds-checked by goblin/scroll), and
    // a binary rewritten underneath us would at worst parse as garbage,
    // which is an error below, as it would be for `exec` itself.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| format!("mapping {}: {e}", path.display()))?;
    let not_elf = |e: goblin::error::Error| format!("{}: not an ELF file: {e}", path.display());
    let header = Elf::parse_header(&bytes).map_err(not_elf)?;
    let ctx = goblin::container::Ctx::new(header.container().map_err(not_elf)?, header.endianness().map_err(not_elf)?);
    let phdrs =
        ProgramHeader::parse(&bytes, header.e_phoff as usize, usize::from(header.e_phnum), ctx).map_err(not_elf)?;
    let interpreter = phdrs.iter().find(|ph| ph.p_type == PT_INTERP && ph.p_filesz > 1).and_then(|ph| {
        let start = usize::try_from(ph.p_offset).ok()?;
        let bytes = bytes.get(start..start.checked_add(usize::try_from(ph.p_filesz).ok()? - 1)?)?;
        std::str::from_utf8(bytes).ok().map(str::to_owned)
    });
    let Some(dynamic) = Dynamic::parse(&bytes, &phdrs, ctx).map_err(not_elf)? else {
        return Ok(DynamicFacts { interpreter, needed: Vec::new(), run_paths: Vec::new() });
    };
    let strtab = goblin::strtab::Strtab::parse(&bytes, dynamic.info.strtab, dynamic.info.strsz, 0).map_err(not_elf)?;
    let needed = dynamic.get_libraries(&strtab).into_iter().map(str::to_owned).collect();
    let mut run_paths = Vec::new();
    for tag in [DT_RUNPATH, DT_RPATH] {
        for entry in dynamic.dyns.iter().filter(|d| d.d_tag == tag) {
            if let Some(path) = strtab.get_at(entry.d_val as usize) {
                run_paths.push(path.to_owned());
            }
        }
    }
    Ok(DynamicFacts { interpreter, needed, run_paths })
}

/// `Ok(None)`: something could not be resolved here; ask `ldd`.
fn from_elf(exec: &Path) -> Result<Option<Vec<PathBuf>>, String> {
    let mut found: BTreeSet<PathBuf> = BTreeSet::new();
    let mut pending = vec![exec.to_path_buf()];
    let mut first = true;
    while let Some(path) = pending.pop() {
        let facts = dynamic_facts(&path)?;
        if first {
            first = false;
            match facts.interpreter {
                Some(interpreter) => {
                    found.insert(PathBuf::from(interpreter));
                }
                None if facts.needed.is_empty() => return Ok(Some(Vec::new())), // static
                None => {}
            }
        }
        let origin = path.parent().unwrap_or(Path::new("/")).to_string_lossy().into_owned();
        let run_paths: Vec<String> =
            facts.run_paths.iter().flat_map(|p| p.split(':')).map(|p| p.replace("$ORIGIN", &origin)).collect();
        for name in &facts.needed {
            let dirs = run_paths.iter().map(String::as_str).chain(SYSTEM_DIRS);
            let Some(lib) = dirs.map(|d| Path::new(d).join(name)).find(|p| p.is_file()) else {
                return Ok(None);
            };
            if found.insert(lib.clone()) {
                pending.push(lib);
            }
        }
    }
    Ok(Some(found.into_iter().collect()))
}

/// What `ldd` lists (none for a static binary).
fn from_ldd(exec: &Path) -> Result<Vec<PathBuf>, String> {
    // stdin inherited, not /dev/null: a host without /dev (tests hide it)
    // can still be asked.
    let out = Command::new("ldd")
        .arg(exec)
        .stdin(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("running ldd: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if text.contains("not a dynamic executable") || stderr.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        return Err(format!("{}{}", text.trim(), stderr.trim()));
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vDSO has no path.
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ways agree on real binaries (up to symlinked spellings of the
    /// same file).
    #[test]
    fn elf_headers_find_what_ldd_finds() {
        let canonical = |libs: Vec<PathBuf>| -> BTreeSet<PathBuf> {
            libs.into_iter().map(|p| std::fs::canonicalize(&p).unwrap_or(p)).collect()
        };
        for exec in [std::env::current_exe().unwrap(), PathBuf::from("/bin/ls"), PathBuf::from("/usr/bin/ssh")] {
            if !exec.exists() {
                continue;
            }
            let elf = from_elf(&exec).unwrap().expect("resolvable from the headers");
            assert!(!elf.is_empty(), "{} is dynamic", exec.display());
            assert_eq!(canonical(elf), canonical(from_ldd(&exec).unwrap()), "{}", exec.display());
        }
    }

    #[test]
    fn a_static_binary_needs_nothing_and_garbage_is_an_error() {
        if Path::new("/bin/busybox").exists() && from_ldd(Path::new("/bin/busybox")).unwrap().is_empty() {
            assert_eq!(libraries(Path::new("/bin/busybox")).unwrap(), Vec::<PathBuf>::new());
        }
        assert!(libraries(Path::new("/etc/hostname")).is_err());
        assert!(libraries(Path::new("/nonexistent")).is_err());
    }
}
