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

/// `Ok(None)`: something could not be resolved here; ask `ldd`.
fn from_elf(exec: &Path) -> Result<Option<Vec<PathBuf>>, String> {
    let mut found: BTreeSet<PathBuf> = BTreeSet::new();
    let mut pending = vec![exec.to_path_buf()];
    let mut first = true;
    while let Some(path) = pending.pop() {
        let bytes = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let elf = Elf::parse(&bytes).map_err(|e| format!("{}: not an ELF file: {e}", path.display()))?;
        if first {
            first = false;
            match elf.interpreter {
                Some(interpreter) => {
                    found.insert(PathBuf::from(interpreter));
                }
                None if elf.libraries.is_empty() => return Ok(Some(Vec::new())), // static
                None => {}
            }
        }
        let origin = path.parent().unwrap_or(Path::new("/")).to_string_lossy().into_owned();
        let run_paths: Vec<String> = elf
            .runpaths
            .iter()
            .chain(elf.rpaths.iter())
            .flat_map(|p| p.split(':'))
            .map(|p| p.replace("$ORIGIN", &origin))
            .collect();
        for name in &elf.libraries {
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
