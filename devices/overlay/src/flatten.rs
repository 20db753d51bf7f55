//! Base + upper as one standalone sparse raw image: what a clone's disk
//! becomes when the clone is snapshotted, so a snapshot's disk is always a
//! single flat file and overlays never chain.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::fileio::{self, next_data};
use crate::{CLUSTER, Overlay, OverlayError};

/// Bytes read at a time.
const CHUNK: usize = 1 << 20;

/// Writes the disk the overlay (`base`, `upper`, `map`) shows as a new
/// sparse raw image at `dest` (which must not exist; made mode 0600): each
/// unmapped cluster from the base, each mapped one from upper, holes and
/// all-zero clusters left as holes in `dest` (as `cp --sparse=always`; no
/// punching is needed, since every cluster is written once into a new
/// sparse file). The result is synced. Returns the bytes of data written
/// (holes not counted). On failure `dest` is removed. The overlay's files
/// are opened read-only and not changed.
pub fn flatten(base: &Path, upper: &Path, map: &Path, dest: &Path) -> Result<u64, OverlayError> {
    let overlay = Overlay::open_paths(base, upper, map, false)?;
    let out = fileio::create_new(dest, overlay.len())
        .map_err(|source| OverlayError::Create { path: dest.to_path_buf(), source })?;
    let result = copy_into(&overlay, &out);
    if result.is_err() {
        drop(out);
        let _ = std::fs::remove_file(dest);
    }
    result
}

fn copy_into(overlay: &Overlay, out: &File) -> Result<u64, OverlayError> {
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0;
    // Each cluster is written once, from the layer it is read from; `out`
    // is new and sparse, so what is not written is a hole.
    for (layer, bytes) in overlay.layers() {
        let src = overlay.file(layer);
        let mut pos = bytes.start;
        while let Some((start, end)) = next_data(src, pos, bytes.end).map_err(OverlayError::io("finding data"))? {
            written += copy_data(src, out, start..end, &mut buf)?;
            pos = end;
        }
    }
    out.sync_all().map_err(OverlayError::io("syncing the flattened image"))?;
    Ok(written)
}

/// Copies `range` from `src` to the same offsets of `out`, leaving out
/// cluster-sized pieces that are all zeroes. Returns the bytes written.
fn copy_data(src: &File, out: &File, range: Range<u64>, buf: &mut [u8]) -> Result<u64, OverlayError> {
    let mut written = 0;
    let mut pos = range.start;
    while pos < range.end {
        let n = (buf.len() as u64).min(range.end - pos) as usize;
        let chunk = &mut buf[..n];
        src.read_exact_at(chunk, pos).map_err(OverlayError::io("reading for the flattened image"))?;
        // Runs of non-zero pieces, each written at once.
        let mut at = 0;
        while at < n {
            let zero = is_zero(piece(chunk, at));
            let mut end = at;
            while end < n && is_zero(piece(chunk, end)) == zero {
                end += piece(chunk, end).len();
            }
            if !zero {
                let offset = pos + at as u64;
                out.write_all_at(&chunk[at..end], offset).map_err(OverlayError::io("writing the flattened image"))?;
                written += (end - at) as u64;
            }
            at = end;
        }
        pos += n as u64;
    }
    Ok(written)
}

/// The piece of `chunk` at `at`: up to the next cluster-sized step.
fn piece(chunk: &[u8], at: usize) -> &[u8] {
    &chunk[at..(at + CLUSTER as usize).min(chunk.len())]
}

fn is_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}
