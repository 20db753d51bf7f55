//! The allocation bitmap in memory: one bit per cluster, LSB first, exactly
//! the bytes of the map file, plus which bytes still have to reach it.

use std::ops::Range;

#[derive(Debug)]
pub(crate) struct Bitmap {
    bytes: Vec<u8>,
    clusters: u64,
    /// Bytes changed in memory whose write to the map file failed: written
    /// again with the next change, or by the next sync.
    dirty: Option<Range<usize>>,
}

impl Bitmap {
    /// Wraps the map file's bytes; `None` if a bit past the last cluster is
    /// set (the caller has checked the length).
    pub(crate) fn from_bytes(bytes: Vec<u8>, clusters: u64) -> Option<Self> {
        debug_assert_eq!(bytes.len() as u64, clusters.div_ceil(8));
        let used = (clusters % 8) as u32;
        if used != 0 && bytes.last().is_some_and(|&last| last >> used != 0) {
            return None;
        }
        Some(Bitmap { bytes, clusters, dirty: None })
    }

    pub(crate) fn get(&self, cluster: u64) -> bool {
        debug_assert!(cluster < self.clusters);
        self.bytes[(cluster / 8) as usize] & (1 << (cluster % 8)) != 0
    }

    /// Sets the bits of `clusters`; returns the byte range that changed (an
    /// empty range when every bit was already set). The range is also
    /// remembered as dirty until [`Bitmap::clean`].
    pub(crate) fn set(&mut self, clusters: Range<u64>) -> Range<usize> {
        debug_assert!(clusters.end <= self.clusters);
        let mut changed: Option<Range<usize>> = None;
        for cluster in clusters {
            let byte = (cluster / 8) as usize;
            let bit = 1u8 << (cluster % 8);
            if self.bytes[byte] & bit == 0 {
                self.bytes[byte] |= bit;
                changed = Some(match changed {
                    Some(r) => r.start..byte + 1,
                    None => byte..byte + 1,
                });
            }
        }
        let changed = changed.unwrap_or(0..0);
        if !changed.is_empty() {
            self.dirty = Some(match self.dirty.take() {
                Some(d) => d.start.min(changed.start)..d.end.max(changed.end),
                None => changed.clone(),
            });
        }
        changed
    }

    /// The bytes the map file still lacks (including the latest change), if
    /// any, and their values.
    pub(crate) fn dirty(&self) -> Option<(u64, &[u8])> {
        self.dirty.clone().map(|r| (r.start as u64, &self.bytes[r]))
    }

    /// The map file now holds every byte.
    pub(crate) fn clean(&mut self) {
        self.dirty = None;
    }

    /// Splits clusters `range` into maximal runs of one state: `(mapped,
    /// clusters)`.
    pub(crate) fn runs(&self, range: Range<u64>) -> Vec<(bool, Range<u64>)> {
        let mut runs: Vec<(bool, Range<u64>)> = Vec::new();
        for cluster in range {
            let mapped = self.get(cluster);
            match runs.last_mut() {
                Some((state, r)) if *state == mapped => r.end = cluster + 1,
                _ => runs.push((mapped, cluster..cluster + 1)),
            }
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_lsb_first_and_runs_merge() {
        let mut map = Bitmap::from_bytes(vec![0; 3], 20).unwrap();
        assert_eq!(map.set(1..3), 0..1);
        assert_eq!(map.set(8..9), 1..2);
        assert_eq!(map.set(1..3), 0..0, "already set: nothing changed");
        assert_eq!(map.bytes, [0b110, 1, 0]);
        assert_eq!(map.dirty(), Some((0, &[0b110u8, 1][..])));
        map.clean();
        assert_eq!(map.dirty(), None);
        assert_eq!(map.runs(0..10), vec![(false, 0..1), (true, 1..3), (false, 3..8), (true, 8..9), (false, 9..10)]);
    }

    #[test]
    fn bits_past_the_last_cluster_are_refused() {
        assert!(Bitmap::from_bytes(vec![0, 0b1111], 12).is_some());
        assert!(Bitmap::from_bytes(vec![0, 0b1_0000], 12).is_none());
        assert!(Bitmap::from_bytes(vec![0xff, 0xff], 16).is_some());
    }
}
