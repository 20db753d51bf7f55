//! Copy-on-write disks for forked microVMs: a block-level overlay.
//!
//! Every clone restored from one snapshot needs a writable disk of its own
//! that starts as the snapshot's disk. Copying the whole image per clone
//! costs its full size in time and space, and the host's file system (ext4)
//! has no reflinks, so a clone's disk is instead a copy-on-write child of
//! the snapshot's: it holds only the clusters the clone has written.
//!
//! # Format
//!
//! An overlaid disk is three files:
//!
//! * **base**: the snapshot's raw disk image. Opened read-only and never
//!   written, so any number of clones share it.
//! * **upper**: a sparse raw file of exactly the base's length. It holds the
//!   clone's clusters at the same offsets as in the base, so reading a
//!   cluster is one `pread` at the guest's offset from one file or the
//!   other.
//! * **map**: the allocation bitmap, one bit per [`CLUSTER`]-byte cluster:
//!   bit `i % 8` (least significant first) of byte `i / 8` set means
//!   cluster `i` lives in upper, clear means it is read from the base. With
//!   `clusters = ceil(len / CLUSTER)` the map is exactly
//!   `ceil(clusters / 8)` bytes; bits past the last cluster are zero. A new
//!   map is all zeroes: the overlay reads as the base.
//!
//! There is no header: the three lengths are checked against each other on
//! [`Overlay::open`], and whoever creates the files (the broker) keeps
//! track of which base an upper and a map belong to.
//!
//! # Writes
//!
//! A cluster is mapped only once upper holds all of it. A write that covers
//! an unmapped cluster only partly first copies that cluster up from the
//! base ([`Overlay::prepare_write`]); the caller then writes its data into
//! upper at the guest's offset, and [`WriteGuard::commit`] sets the bits of
//! every touched cluster and writes the changed map bytes to the map file.
//! Zeroing and discarding ([`Overlay::zero`]) map the range too, so the
//! base's data never shows through a range the guest zeroed.
//!
//! # Durability
//!
//! Map bytes are written (not synced) as each write completes, so a killed
//! and restarted back end sees every completed write. [`Overlay::sync`]
//! (the guest's flush) syncs upper, then the map: after a flush, the map on
//! disk only names clusters whose data is on disk. A *host* crash between
//! flushes can lose unflushed writes, as with a raw image; a cluster first
//! written in that window may then read as zeroes.
//!
//! # Flattening
//!
//! [`flatten`] writes base + upper as one standalone sparse raw image, for
//! snapshotting a clone: a snapshot's disk is always a single flat file, so
//! overlays never chain.

mod bitmap;
mod fileio;
mod flatten;
mod overlay;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use fileio::zero_range;
pub use flatten::flatten;
pub use overlay::{Overlay, WriteGuard};

/// The unit of copy-on-write and of the map: one bit per cluster.
pub const CLUSTER: u64 = 4096;

/// Which file a range of the disk is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// The read-only base image.
    Base,
    /// The clone's own upper file.
    Upper,
}

/// One contiguous piece of a read: `len` bytes at `offset` (the same offset
/// in either file) come from `layer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub layer: Layer,
    pub offset: u64,
    pub len: u64,
}

/// Clusters of a disk of `len` bytes (a partial last cluster counts).
pub fn clusters_for(len: u64) -> u64 {
    len.div_ceil(CLUSTER)
}

/// The exact length of the map of a disk of `len` bytes.
pub fn map_len_for(len: u64) -> u64 {
    clusters_for(len).div_ceil(8)
}

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("cannot create {}: {source}", path.display())]
    Create { path: PathBuf, source: std::io::Error },
    #[error("cannot open {}: {source}", path.display())]
    Open { path: PathBuf, source: std::io::Error },
    #[error("upper is {upper} bytes, but the base is {base}: they must be the same length")]
    UpperLength { base: u64, upper: u64 },
    #[error("map is {actual} bytes, but a {disk}-byte disk needs exactly {expected}")]
    MapLength { disk: u64, expected: u64, actual: u64 },
    #[error("map has bits set past the last of the disk's {clusters} clusters")]
    MapTrailingBits { clusters: u64 },
    #[error("the base is open for writing: it must be opened read-only")]
    BaseWritable,
    #[error("the {first} and the {second} are the same file")]
    SameFile { first: &'static str, second: &'static str },
    #[error("range of {len} bytes at {offset} is past the end of the {disk}-byte disk")]
    OutOfRange { offset: u64, len: u64, disk: u64 },
    #[error("{what}: {source}")]
    Io { what: &'static str, source: std::io::Error },
}

impl OverlayError {
    fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> OverlayError {
        move |source| OverlayError::Io { what, source }
    }
}
