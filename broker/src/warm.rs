//! Warm starts: `mmctl run` restores a post-boot snapshot of its image
//! instead of booting, once one exists.
//!
//! The first microVM of an image (with a given kernel, mm-vmm, vCPU count,
//! RAM and device set: the cache key) boots with `mm.wait`: mm-init comes
//! up (mounts, overlay, network, exec agent, SSH) and waits for its
//! workload instead of running one. The broker then snapshots it into the
//! cache and hands it its workload through the exec agent, so the first
//! run costs one boot as before. Every later microVM of that key restores
//! the snapshot (no boot), takes its own identity, and is handed its
//! workload the same way. The image's hash is in its file name and mm-init
//! is inside the image, so a new kernel, image, mm-init or mm-vmm gives a
//! new key, and the stale entry is simply never used again.
//! `mmctl run --cold` boots as before.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::BrokerConfig;
use crate::snapshot::MANIFEST;

/// Part of the key: bumped when what a warm snapshot holds changes.
const WARM_FORMAT: u32 = 1;

/// The cache of post-boot snapshots (`--warm-cache`, default `STATE/warm`).
pub struct WarmCache {
    dir: PathBuf,
}

/// FNV-1a, 64 bits: a stable hash for a cache key (std's hasher may
/// change between Rust releases; this is the whole of it).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
}

/// What identifies a file's content well enough here: the content-hashed
/// artefacts have their hash in their path, binaries their size and mtime.
fn file_identity(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(m) => format!("{}:{}:{}", path.display(), m.len(), m.mtime_nsec() + m.mtime() * 1_000_000_000),
        Err(_) => format!("{}:missing", path.display()),
    }
}

impl WarmCache {
    pub fn new(dir: PathBuf) -> WarmCache {
        WarmCache { dir }
    }

    /// The key of a microVM of `cpus` vCPUs and `memory_mib` on this broker.
    pub fn key(config: &BrokerConfig, cpus: u8, memory_mib: u32) -> String {
        let text = format!(
            "format={WARM_FORMAT};kernel={};image={};vmm={};cpus={cpus};memory={memory_mib};net={}",
            file_identity(&config.kernel),
            file_identity(&config.builtin_image),
            file_identity(&config.bin_dir.join("mm-vmm")),
            config.network.is_some(),
        );
        format!("{:016x}", fnv1a(&text))
    }

    /// The finished snapshot for `key`, if there is one.
    pub fn find(&self, key: &str) -> Option<PathBuf> {
        let dir = self.dir.join(key);
        dir.join(MANIFEST).is_file().then_some(dir)
    }

    /// A private directory to write `key`'s snapshot into (`owner`: the
    /// microVM making it, so two templates of one key never collide).
    pub fn temporary_dir(&self, key: &str, owner: &str) -> PathBuf {
        self.dir.join(format!(".tmp-{key}-{owner}"))
    }

    /// Publishes a finished snapshot; if another template of the same key
    /// got there first, ours is dropped (theirs is as good).
    pub fn commit(&self, key: &str, tmp: &Path) -> std::io::Result<()> {
        match std::fs::rename(tmp, self.dir.join(key)) {
            Ok(()) => Ok(()),
            Err(_) if self.find(key).is_some() => std::fs::remove_dir_all(tmp),
            Err(e) => Err(e),
        }
    }

    pub fn ensure(&self) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_its_reference_values() {
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a("foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn entries_are_found_only_once_whole_and_the_first_commit_wins() {
        let root = std::env::temp_dir().join(format!("mm-warm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let cache = WarmCache::new(root.clone());
        cache.ensure().unwrap();
        assert!(cache.find("k").is_none());
        let (a, b) = (cache.temporary_dir("k", "a"), cache.temporary_dir("k", "b"));
        for tmp in [&a, &b] {
            std::fs::create_dir_all(tmp).unwrap();
            std::fs::write(tmp.join(MANIFEST), "{}").unwrap();
        }
        assert!(cache.find("k").is_none(), "a temporary directory is not an entry");
        cache.commit("k", &a).unwrap();
        cache.commit("k", &b).unwrap();
        assert!(cache.find("k").is_some());
        assert!(!b.exists(), "the second template's copy is dropped");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
