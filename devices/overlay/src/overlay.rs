//! An open overlay: where each read goes, the copy-up before a write, and
//! the map kept in memory and written through to the map file.

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::bitmap::Bitmap;
use crate::fileio;
use crate::{CLUSTER, Layer, OverlayError, Run, clusters_for, map_len_for};

/// A copy-on-write disk: reads come from the base or the upper file per
/// cluster, writes go to upper only. See the crate documentation for the
/// format.
///
/// All methods take `&self` (the block back end shares it between its
/// threads); the map is behind a mutex, held from a write's copy-up to its
/// commit so that two writes to one cluster cannot interleave a copy-up
/// with the other's data.
pub struct Overlay {
    base: File,
    upper: File,
    map: File,
    len: u64,
    bitmap: Mutex<Bitmap>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay").field("len", &self.len).finish_non_exhaustive()
    }
}

fn open_file(path: &Path, write: bool) -> Result<File, OverlayError> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| OverlayError::Open { path: path.to_path_buf(), source })
}

impl Overlay {
    /// Creates an empty overlay for a base of `size` bytes: a new sparse
    /// `upper` of that length and a new all-zero `map`. Neither path may
    /// exist (nor be a symlink); both are made mode 0600. On failure
    /// nothing is left behind.
    pub fn create(upper: &Path, map: &Path, size: u64) -> Result<(), OverlayError> {
        let created = |path: &Path| {
            let path = path.to_path_buf();
            move |source| OverlayError::Create { path, source }
        };
        fileio::create_new(upper, size).map_err(created(upper))?;
        if let Err(e) = fileio::create_new(map, map_len_for(size)).map_err(created(map)) {
            let _ = std::fs::remove_file(upper);
            return Err(e);
        }
        Ok(())
    }

    /// Opens the three files by path: the base read-only, upper and map
    /// read-write (or read-only, to only read the overlay).
    pub fn open_paths(base: &Path, upper: &Path, map: &Path, writable: bool) -> Result<Overlay, OverlayError> {
        Overlay::open(open_file(base, false)?, open_file(upper, writable)?, open_file(map, writable)?)
    }

    /// Checks the files against each other and loads the map. The base
    /// must be open read-only; upper must be exactly as long as the base,
    /// and the map exactly `ceil(ceil(len / CLUSTER) / 8)` bytes with no
    /// bit set past the last cluster; no two may be the same file.
    pub fn open(base: File, upper: File, map: File) -> Result<Overlay, OverlayError> {
        // SAFETY: F_GETFL only reads the descriptor's flags.
        let flags = unsafe { libc::fcntl(base.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 {
            return Err(OverlayError::Io { what: "reading the base's flags", source: std::io::Error::last_os_error() });
        }
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            return Err(OverlayError::BaseWritable);
        }
        for (a, b, first, second) in
            [(&base, &upper, "base", "upper"), (&base, &map, "base", "map"), (&upper, &map, "upper", "map")]
        {
            if fileio::same_file(a, b).map_err(OverlayError::io("comparing the overlay's files"))? {
                return Err(OverlayError::SameFile { first, second });
            }
        }
        let len = fileio::len(&base).map_err(OverlayError::io("sizing the base"))?;
        let upper_len = fileio::len(&upper).map_err(OverlayError::io("sizing upper"))?;
        if upper_len != len {
            return Err(OverlayError::UpperLength { base: len, upper: upper_len });
        }
        let expected = map_len_for(len);
        let actual = fileio::len(&map).map_err(OverlayError::io("sizing the map"))?;
        if actual != expected {
            return Err(OverlayError::MapLength { disk: len, expected, actual });
        }
        let mut bytes = vec![0u8; expected as usize];
        map.read_exact_at(&mut bytes, 0).map_err(OverlayError::io("reading the map"))?;
        let clusters = clusters_for(len);
        let bitmap = Bitmap::from_bytes(bytes, clusters).ok_or(OverlayError::MapTrailingBits { clusters })?;
        Ok(Overlay { base, upper, map, len, bitmap: Mutex::new(bitmap) })
    }

    /// The disk's length in bytes (the base's).
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The read-only base image.
    pub fn base_file(&self) -> &File {
        &self.base
    }

    /// The upper file: where writes go, at the guest's offsets.
    pub fn upper_file(&self) -> &File {
        &self.upper
    }

    /// The file a [`Run`] of `layer` is read from.
    pub fn file(&self, layer: Layer) -> &File {
        match layer {
            Layer::Base => &self.base,
            Layer::Upper => &self.upper,
        }
    }

    /// Whether `cluster` lives in upper.
    pub fn is_mapped(&self, cluster: u64) -> bool {
        cluster < clusters_for(self.len) && self.lock().get(cluster)
    }

    fn lock(&self) -> MutexGuard<'_, Bitmap> {
        // The map is only changed by whole `Bitmap::set` calls, which do not
        // panic halfway, so a poisoned lock still guards a consistent map.
        self.bitmap.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), OverlayError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(OverlayError::OutOfRange { offset, len, disk: self.len }),
        }
    }

    /// The clusters `len` bytes at `offset` touch.
    fn touched(offset: u64, len: u64) -> Range<u64> {
        if len == 0 { 0..0 } else { offset / CLUSTER..(offset + len).div_ceil(CLUSTER) }
    }

    /// The bytes of `cluster` (the last one may be short).
    fn cluster_bytes(&self, cluster: u64) -> Range<u64> {
        cluster * CLUSTER..((cluster + 1) * CLUSTER).min(self.len)
    }

    /// Where to read `len` bytes at `offset` from: runs in order, covering
    /// the range exactly, adjacent clusters of one layer merged, so the
    /// caller can `pread` straight into its buffers from the right file.
    pub fn read_runs(&self, offset: u64, len: u64) -> Result<Vec<Run>, OverlayError> {
        self.check(offset, len)?;
        let end = offset + len;
        let runs = self.lock().runs(Self::touched(offset, len));
        Ok(runs
            .into_iter()
            .map(|(mapped, clusters)| {
                let start = (clusters.start * CLUSTER).max(offset);
                let stop = (clusters.end * CLUSTER).min(end);
                Run { layer: if mapped { Layer::Upper } else { Layer::Base }, offset: start, len: stop - start }
            })
            .collect())
    }

    /// Reads `buf.len()` bytes at `offset` (through a buffer; the block
    /// back end uses [`Overlay::read_runs`] instead).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), OverlayError> {
        for run in self.read_runs(offset, buf.len() as u64)? {
            let at = (run.offset - offset) as usize;
            self.file(run.layer)
                .read_exact_at(&mut buf[at..at + run.len as usize], run.offset)
                .map_err(OverlayError::io("reading the overlay"))?;
        }
        Ok(())
    }

    /// Readies upper for a write of `len` bytes at `offset`: copies up from
    /// the base each unmapped cluster the range covers only partly (its
    /// first and last), so that once the caller has written all of its data
    /// into [`Overlay::upper_file`] at `offset`, every touched cluster is
    /// whole in upper. Then [`WriteGuard::commit`] maps them. Other writes,
    /// zeroes and reads' planning wait until the guard is committed or
    /// dropped (dropped, nothing is mapped: the base still shows).
    pub fn prepare_write(&self, offset: u64, len: u64) -> Result<WriteGuard<'_>, OverlayError> {
        self.check(offset, len)?;
        let bitmap = self.lock();
        self.copy_up_edges(&bitmap, offset, len)?;
        Ok(WriteGuard { overlay: self, bitmap, clusters: Self::touched(offset, len) })
    }

    /// Writes `data` at `offset` through a buffer: prepare, write, commit.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), OverlayError> {
        let guard = self.prepare_write(offset, data.len() as u64)?;
        self.upper.write_all_at(data, offset).map_err(OverlayError::io("writing upper"))?;
        guard.commit()
    }

    /// Makes `len` bytes at `offset` read back as zeroes, for good: partly
    /// covered clusters are copied up, the range is zeroed in upper (a
    /// punched hole when `punch`, else zeroed in place, else written
    /// zeroes) and every touched cluster is mapped, so the base's data
    /// there never shows again. Discards come here too: a discard must not
    /// make the base's old contents reappear.
    pub fn zero(&self, offset: u64, len: u64, punch: bool) -> Result<(), OverlayError> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let mut bitmap = self.lock();
        self.copy_up_edges(&bitmap, offset, len)?;
        fileio::zero_range(&self.upper, offset, len, punch).map_err(OverlayError::io("zeroing upper"))?;
        bitmap.set(Self::touched(offset, len));
        self.persist(&mut bitmap)
    }

    /// Makes every completed write durable: syncs upper, then the map, so
    /// the map on disk names no cluster whose data is not.
    pub fn sync(&self) -> Result<(), OverlayError> {
        self.persist(&mut self.lock())?;
        self.upper.sync_data().map_err(OverlayError::io("syncing upper"))?;
        self.map.sync_data().map_err(OverlayError::io("syncing the map"))
    }

    fn copy_up_edges(&self, bitmap: &Bitmap, offset: u64, len: u64) -> Result<(), OverlayError> {
        let clusters = Self::touched(offset, len);
        let end = offset + len;
        let mut edges = [clusters.start, clusters.end.wrapping_sub(1)];
        if clusters.end - clusters.start == 1 {
            edges[1] = u64::MAX;
        }
        for &cluster in edges.iter().filter(|&&c| c < clusters.end) {
            let bytes = self.cluster_bytes(cluster);
            let partial = offset > bytes.start || end < bytes.end;
            if partial && !bitmap.get(cluster) {
                self.copy_up(bytes)?;
            }
        }
        Ok(())
    }

    fn copy_up(&self, bytes: Range<u64>) -> Result<(), OverlayError> {
        let mut buf = [0u8; CLUSTER as usize];
        let buf = &mut buf[..(bytes.end - bytes.start) as usize];
        self.base.read_exact_at(buf, bytes.start).map_err(OverlayError::io("copying up from the base"))?;
        self.upper.write_all_at(buf, bytes.start).map_err(OverlayError::io("copying up into upper"))
    }

    /// The whole disk in runs of clusters, in order: where each is read
    /// from, and its bytes.
    pub(crate) fn layers(&self) -> Vec<(Layer, Range<u64>)> {
        let runs = self.lock().runs(0..clusters_for(self.len));
        runs.into_iter()
            .map(|(mapped, c)| {
                let bytes = c.start * CLUSTER..(c.end * CLUSTER).min(self.len);
                (if mapped { Layer::Upper } else { Layer::Base }, bytes)
            })
            .collect()
    }

    /// Writes the map bytes the file lacks.
    fn persist(&self, bitmap: &mut Bitmap) -> Result<(), OverlayError> {
        if let Some((at, bytes)) = bitmap.dirty() {
            self.map.write_all_at(bytes, at).map_err(OverlayError::io("writing the map"))?;
            bitmap.clean();
        }
        Ok(())
    }
}

/// A write in progress, from [`Overlay::prepare_write`]: holds the map
/// until [`WriteGuard::commit`].
#[must_use = "a write is mapped only when committed"]
pub struct WriteGuard<'a> {
    overlay: &'a Overlay,
    bitmap: MutexGuard<'a, Bitmap>,
    clusters: Range<u64>,
}

impl WriteGuard<'_> {
    /// The caller has written all its data into upper: maps every touched
    /// cluster and writes the changed map bytes to the map file. If that
    /// write fails the error is returned, and the bytes are written again
    /// with the next change or sync.
    pub fn commit(mut self) -> Result<(), OverlayError> {
        self.bitmap.set(self.clusters.clone());
        self.overlay.persist(&mut self.bitmap)
    }
}
