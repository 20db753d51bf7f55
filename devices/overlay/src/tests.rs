//! The overlay against an in-memory model of the disk, and its refusals.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;

use vmm_sys_util::tempdir::TempDir;

use super::*;

const C: u64 = CLUSTER;

/// A scratch directory with a base image and room for an overlay of it.
struct Scratch {
    _dir: TempDir,
    base: PathBuf,
    upper: PathBuf,
    map: PathBuf,
    dir: PathBuf,
}

impl Scratch {
    /// A base holding `content`, and a new empty overlay of it.
    fn new(content: &[u8]) -> Self {
        let dir = TempDir::new_with_prefix("/tmp/mm-overlay-test").unwrap();
        let path = dir.as_path().to_path_buf();
        let s =
            Scratch { base: path.join("base"), upper: path.join("upper"), map: path.join("map"), dir: path, _dir: dir };
        let base = File::create(&s.base).unwrap();
        base.set_len(content.len() as u64).unwrap();
        // Leave all-zero clusters as holes, as a real sparse image has.
        for (i, piece) in content.chunks(C as usize).enumerate() {
            if piece.iter().any(|&b| b != 0) {
                base.write_all_at(piece, i as u64 * C).unwrap();
            }
        }
        Overlay::create(&s.upper, &s.map, content.len() as u64).unwrap();
        s
    }

    fn open(&self) -> Overlay {
        Overlay::open_paths(&self.base, &self.upper, &self.map, true).unwrap()
    }

    fn base_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.base).unwrap()
    }
}

/// Random content with runs of zeroes (holes in the base) in it.
fn random_content(rng: &mut fastrand::Rng, len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
    for _ in 0..len / (C as usize * 4) {
        let start = rng.usize(..len);
        let end = (start + rng.usize(..3 * C as usize)).min(len);
        v[start..end].fill(0);
    }
    v
}

fn read_all(overlay: &Overlay) -> Vec<u8> {
    let mut buf = vec![0u8; overlay.len() as usize];
    overlay.read(0, &mut buf).unwrap();
    buf
}

/// A range that often crosses clusters and is rarely aligned.
fn random_range(rng: &mut fastrand::Rng, disk: u64) -> (u64, u64) {
    let offset = match rng.u8(..4) {
        0 => rng.u64(..disk / C) * C,
        _ => rng.u64(..disk),
    };
    let max = (disk - offset).min(3 * C + 700);
    let len = match rng.u8(..4) {
        0 => max.min(C),
        _ => rng.u64(..=max),
    };
    (offset, len)
}

fn check_runs(overlay: &Overlay, offset: u64, len: u64) {
    let runs = overlay.read_runs(offset, len).unwrap();
    let mut at = offset;
    for (i, run) in runs.iter().enumerate() {
        assert_eq!(run.offset, at, "runs are contiguous: {runs:?}");
        assert!(run.len > 0);
        if i > 0 {
            assert_ne!(run.layer, runs[i - 1].layer, "adjacent runs of one layer are merged: {runs:?}");
        }
        at += run.len;
    }
    assert_eq!(at, offset + len, "runs cover the range: {runs:?}");
}

#[test]
fn random_operations_match_a_model() {
    for seed in 0..8 {
        let mut rng = fastrand::Rng::with_seed(seed);
        // Not a whole number of clusters (nor of bytes of map).
        let disk = 37 * C + 1234 + rng.u64(..2 * C);
        let mut model = random_content(&mut rng, disk as usize);
        let s = Scratch::new(&model);
        let base_before = s.base_bytes();
        let mut overlay = s.open();
        for step in 0..1500 {
            let (offset, len) = random_range(&mut rng, disk);
            let range = offset as usize..(offset + len) as usize;
            match rng.u8(..10) {
                0..=2 => {
                    let mut buf = vec![0u8; len as usize];
                    overlay.read(offset, &mut buf).unwrap();
                    assert_eq!(buf, model[range], "seed {seed} step {step}: read {offset}+{len}");
                    check_runs(&overlay, offset, len);
                }
                3..=6 => {
                    let data: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
                    overlay.write(offset, &data).unwrap();
                    model[range].copy_from_slice(&data);
                }
                7 | 8 => {
                    overlay.zero(offset, len, rng.bool()).unwrap();
                    model[range].fill(0);
                }
                _ => {
                    if rng.bool() {
                        overlay.sync().unwrap();
                    }
                    // The map persists: a new open sees the same disk.
                    drop(overlay);
                    overlay = s.open();
                }
            }
            if step % 500 == 499 {
                let dest = s.dir.join(format!("flat-{step}"));
                flatten(&s.base, &s.upper, &s.map, &dest).unwrap();
                assert!(std::fs::read(&dest).unwrap() == model, "seed {seed} step {step}: flattened image");
            }
        }
        assert!(read_all(&overlay) == model, "seed {seed}: whole disk");
        drop(overlay);
        assert!(read_all(&s.open()) == model, "seed {seed}: whole disk after reopening");
        let dest = s.dir.join("flat");
        flatten(&s.base, &s.upper, &s.map, &dest).unwrap();
        assert!(std::fs::read(&dest).unwrap() == model, "seed {seed}: flattened image");
        assert!(s.base_bytes() == base_before, "seed {seed}: the base was modified");
    }
}

/// A write covering part of an unmapped cluster keeps the rest of it: the
/// cluster is copied up before the write. (Run with `copy_up_edges`
/// returning `Ok(())` at once, this test failed: the bytes around the write
/// read as zeroes, the upper's hole, instead of the base's.)
#[test]
fn partial_writes_keep_the_rest_of_the_cluster() {
    let content: Vec<u8> = (0..4 * C).map(|i| (i % 251) as u8 + 1).collect();
    let s = Scratch::new(&content);
    let overlay = s.open();
    let mut model = content.clone();
    // Head and tail partial, a whole cluster between.
    let (offset, len) = (C + 512, 2 * C);
    overlay.write(offset, &vec![0xaa; len as usize]).unwrap();
    model[offset as usize..(offset + len) as usize].fill(0xaa);
    // Inside one cluster, touching neither edge.
    overlay.write(100, &[0xbb; 10]).unwrap();
    model[100..110].fill(0xbb);
    // And a partial zeroing of an unmapped cluster.
    overlay.zero(3 * C + C / 2, 8, true).unwrap();
    model[(3 * C + C / 2) as usize..(3 * C + C / 2 + 8) as usize].fill(0);
    assert!(read_all(&overlay) == model);
    assert!((0..4).all(|c| overlay.is_mapped(c)));
    assert!(s.base_bytes() == content, "the base was modified");
}

#[test]
fn zeroed_and_discarded_ranges_never_show_the_base_again() {
    let content = vec![0x5a; 8 * C as usize];
    let s = Scratch::new(&content);
    let overlay = s.open();
    overlay.zero(C, 2 * C, true).unwrap();
    overlay.zero(4 * C + 1, C, false).unwrap();
    overlay.sync().unwrap();
    drop(overlay);
    let overlay = s.open();
    let all = read_all(&overlay);
    assert!(all[C as usize..3 * C as usize].iter().all(|&b| b == 0));
    assert!(all[(4 * C + 1) as usize..(5 * C + 1) as usize].iter().all(|&b| b == 0));
    assert!(all[..C as usize].iter().all(|&b| b == 0x5a));
    assert!(all[3 * C as usize..(4 * C + 1) as usize].iter().all(|&b| b == 0x5a));
    assert!(all[(5 * C + 1) as usize..].iter().all(|&b| b == 0x5a));
    assert_eq!(
        overlay.read_runs(0, 8 * C).unwrap(),
        [
            Run { layer: Layer::Base, offset: 0, len: C },
            Run { layer: Layer::Upper, offset: C, len: 2 * C },
            Run { layer: Layer::Base, offset: 3 * C, len: C },
            Run { layer: Layer::Upper, offset: 4 * C, len: 2 * C },
            Run { layer: Layer::Base, offset: 6 * C, len: 2 * C },
        ]
    );
}

#[test]
fn open_refuses_mismatched_files() {
    let s = Scratch::new(&vec![1u8; (20 * C + 5) as usize]);
    let open = |base: &PathBuf, upper: &PathBuf, map: &PathBuf| Overlay::open_paths(base, upper, map, true);
    let rw = |p: &PathBuf| OpenOptions::new().write(true).open(p).unwrap();

    rw(&s.upper).set_len(20 * C).unwrap();
    assert!(matches!(open(&s.base, &s.upper, &s.map), Err(OverlayError::UpperLength { upper, .. }) if upper == 20 * C));
    rw(&s.upper).set_len(20 * C + 5).unwrap();

    // 21 clusters: 3 bytes of map.
    assert_eq!(std::fs::metadata(&s.map).unwrap().len(), 3);
    for bad in [2, 4] {
        rw(&s.map).set_len(bad).unwrap();
        let e = open(&s.base, &s.upper, &s.map).unwrap_err();
        assert!(matches!(e, OverlayError::MapLength { expected: 3, actual, .. } if actual == bad), "{e}");
    }
    rw(&s.map).set_len(3).unwrap();
    rw(&s.map).write_all_at(&[0b0010_0000], 2).unwrap();
    assert!(matches!(open(&s.base, &s.upper, &s.map), Err(OverlayError::MapTrailingBits { clusters: 21 })));
    rw(&s.map).write_all_at(&[0b0001_0000], 2).unwrap();
    assert!(open(&s.base, &s.upper, &s.map).unwrap().is_mapped(20));

    assert!(matches!(open(&s.base, &s.base, &s.map), Err(OverlayError::SameFile { .. })));
    let base_rw = OpenOptions::new().read(true).write(true).open(&s.base).unwrap();
    let upper = File::open(&s.upper).unwrap();
    let map = File::open(&s.map).unwrap();
    assert!(matches!(Overlay::open(base_rw, upper, map), Err(OverlayError::BaseWritable)));
}

#[test]
fn create_makes_new_private_sparse_files_only() {
    let s = Scratch::new(&vec![1u8; 3 * C as usize]);
    let upper = std::fs::metadata(&s.upper).unwrap();
    assert_eq!((upper.len(), upper.blocks(), upper.mode() & 0o777), (3 * C, 0, 0o600));
    assert_eq!(std::fs::read(&s.map).unwrap(), [0]);
    // Existing files, and symlinks, are refused; nothing is left behind.
    assert!(matches!(Overlay::create(&s.upper, &s.dir.join("m2"), C), Err(OverlayError::Create { .. })));
    assert!(!s.dir.join("m2").exists());
    let upper2 = s.dir.join("u2");
    assert!(matches!(Overlay::create(&upper2, &s.map, C), Err(OverlayError::Create { .. })));
    assert!(!upper2.exists(), "the upper made before the failure is removed");
    std::os::unix::fs::symlink(&s.base, s.dir.join("link")).unwrap();
    assert!(Overlay::create(&s.dir.join("link"), &s.dir.join("m3"), C).is_err());
    assert!(std::fs::read(&s.base).unwrap().iter().all(|&b| b == 1));
}

#[test]
fn out_of_range_is_refused() {
    let s = Scratch::new(&vec![1u8; 2 * C as usize]);
    let overlay = s.open();
    assert!(matches!(overlay.read_runs(2 * C - 1, 2), Err(OverlayError::OutOfRange { .. })));
    assert!(matches!(overlay.prepare_write(u64::MAX, 2), Err(OverlayError::OutOfRange { .. })));
    assert!(matches!(overlay.zero(C, C + 1, true), Err(OverlayError::OutOfRange { .. })));
    assert!(overlay.read_runs(2 * C, 0).unwrap().is_empty());
}

#[test]
fn flatten_keeps_holes_and_leaves_zero_clusters_out() {
    // Data, a hole, data.
    let mut content = vec![7u8; 64 * C as usize];
    content[16 * C as usize..48 * C as usize].fill(0);
    let s = Scratch::new(&content);
    let overlay = s.open();
    overlay.zero(0, 8 * C, false).unwrap(); // zeroed in place in upper: allocated, but zero
    overlay.write(20 * C, &vec![9u8; C as usize]).unwrap();
    let dest = s.dir.join("flat");
    let written = flatten(&s.base, &s.upper, &s.map, &dest).unwrap();
    let mut model = content.clone();
    model[..8 * C as usize].fill(0);
    model[20 * C as usize..21 * C as usize].fill(9);
    assert!(std::fs::read(&dest).unwrap() == model);
    assert_eq!(written, 24 * C + C, "the base's data where unmapped, and upper's one cluster");
    // Data: clusters 8..16, 20, 48..64 (25 clusters); 512-byte blocks.
    let blocks = std::fs::metadata(&dest).unwrap().blocks();
    assert!(blocks * 512 <= 25 * C + 4 * C, "flattened image not sparse: {blocks} blocks");
    // dest must be new.
    assert!(matches!(flatten(&s.base, &s.upper, &s.map, &dest), Err(OverlayError::Create { .. })));
}
