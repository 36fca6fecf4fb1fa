//! File stacking: the chunk map of a file whose data lives partly below the tree it is in.
//!
//! Changing a file that lives in a lower layer (an archived image or a frozen generation)
//! does not copy it up whole. The writable tree gets a *stacked* file instead: a sparse file
//! of the full logical size holding only the chunks copied up so far, with this map in the
//! xattr [`STACK_XATTR`]. The map says which chunks are still *below* (read from the lower
//! file, found by its path in the namespace below the tree) and where the lower bytes stop
//! counting (`limit`, lowered by shrinking truncates so cut-off data never comes back).
//! Every chunk that is not below is *upper*: its bytes are the upper file's, holes included,
//! so a user's punched hole or zeroed range never falls through to old data. A chunk is
//! never below in part: a write that touches a below chunk copies the chunk up first.
//!
//! Encoding (little-endian): magic `SPSTACK1`, chunk bits (u8), lower size (u64), limit
//! (u64), path length (u16) and path (components joined by `/`, no leading slash), number of
//! below runs (u32) and the runs as (first chunk u32, count u32), CRC32C of all that (u32).

use crate::sys::Errno;

/// The xattr holding a stacked file's map.
pub const STACK_XATTR: &[u8] = b"trusted.overlay.spinfs.stack";

const MAGIC: &[u8; 8] = b"SPSTACK1";

/// Which chunks of a stacked file are still below, and how to find the lower file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackMap {
    pub chunk_bits: u8,
    /// Path of the lower file in the namespace below the tree holding the stacked file.
    pub lower_path: Vec<u8>,
    /// Size of the lower file.
    pub lower_size: u64,
    /// Lower bytes at or beyond `limit` read as zeros (a shrink cut them off).
    pub limit: u64,
    /// Sorted, disjoint, non-adjacent runs of below chunks: [start, end).
    below: Vec<(u64, u64)>,
}

impl StackMap {
    /// A metadata-only copy-up: every chunk of the lower file is below.
    pub fn new(chunk_bits: u8, lower_path: Vec<u8>, lower_size: u64) -> StackMap {
        let n = lower_size.div_ceil(1 << chunk_bits);
        StackMap {
            chunk_bits,
            lower_path,
            lower_size,
            limit: lower_size,
            below: if n > 0 { vec![(0, n)] } else { Vec::new() },
        }
    }

    pub fn chunk_size(&self) -> u64 {
        1 << self.chunk_bits
    }

    /// Whether chunk `c` is below.
    pub fn is_below(&self, c: u64) -> bool {
        let i = self.below.partition_point(|&(_, e)| e <= c);
        self.below.get(i).is_some_and(|&(s, _)| s <= c)
    }

    /// Whether nothing is below any more (the file can become an ordinary one).
    pub fn all_upper(&self) -> bool {
        self.below.is_empty()
    }

    /// Number of chunks still below.
    pub fn below_chunks(&self) -> u64 {
        self.below.iter().map(|&(s, e)| e - s).sum()
    }

    /// The runs of below chunks.
    pub fn below_runs(&self) -> &[(u64, u64)] {
        &self.below
    }

    /// Chunks `[start, end)` become upper.
    pub fn set_upper(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let mut out = Vec::with_capacity(self.below.len() + 1);
        for &(s, e) in &self.below {
            if e <= start || s >= end {
                out.push((s, e));
                continue;
            }
            if s < start {
                out.push((s, start));
            }
            if e > end {
                out.push((end, e));
            }
        }
        self.below = out;
    }

    /// The file is truncated to `size`: lower bytes from there on are gone for good, and
    /// chunks wholly beyond it are no longer below.
    pub fn truncate(&mut self, size: u64) {
        self.limit = self.limit.min(size);
        let keep = size.div_ceil(self.chunk_size());
        self.set_upper(keep, u64::MAX);
    }

    /// Lower bytes that count within chunk `c`: `[start, end)`, empty when none.
    pub fn lower_range(&self, c: u64) -> (u64, u64) {
        let start = c << self.chunk_bits;
        let end = ((c + 1) << self.chunk_bits)
            .min(self.lower_size)
            .min(self.limit);
        (start, end.max(start))
    }

    /// Below chunks that a write of `[off, off + len)` to a file of `size` bytes touches, and
    /// for each whether its old bytes must be copied up first (`false`: the write replaces
    /// every byte of the chunk that exists).
    pub fn touched(&self, off: u64, len: u64, size: u64) -> Vec<(u64, bool)> {
        if len == 0 {
            return Vec::new();
        }
        let end = off.saturating_add(len);
        let cs = self.chunk_size();
        let first = off >> self.chunk_bits;
        let last = (end - 1) >> self.chunk_bits;
        let mut out = Vec::new();
        for c in first..=last {
            if !self.is_below(c) {
                continue;
            }
            let cstart = c * cs;
            let cend = (cstart + cs).min(size.max(end));
            let (ls, le) = self.lower_range(c);
            let covers = off <= cstart && end >= cend;
            let nothing_below = le <= ls;
            out.push((c, !(covers || nothing_below)));
        }
        out
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(48 + self.lower_path.len() + self.below.len() * 8);
        v.extend_from_slice(MAGIC);
        v.push(self.chunk_bits);
        v.extend_from_slice(&self.lower_size.to_le_bytes());
        v.extend_from_slice(&self.limit.to_le_bytes());
        v.extend_from_slice(&(self.lower_path.len() as u16).to_le_bytes());
        v.extend_from_slice(&self.lower_path);
        v.extend_from_slice(&(self.below.len() as u32).to_le_bytes());
        for &(s, e) in &self.below {
            v.extend_from_slice(&(s as u32).to_le_bytes());
            v.extend_from_slice(&((e - s) as u32).to_le_bytes());
        }
        let crc = crc32c::crc32c(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    /// Decodes and checks a map; any damage or inconsistency is `EIO`.
    pub fn decode(b: &[u8]) -> Result<StackMap, Errno> {
        let bad = || Errno::EIO;
        if b.len() < 8 + 1 + 16 + 2 + 4 + 4 || &b[..8] != MAGIC {
            return Err(bad());
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().unwrap()) {
            return Err(bad());
        }
        let mut p = 8;
        let take = |p: &mut usize, n: usize| -> Result<&[u8], Errno> {
            let s = body.get(*p..*p + n).ok_or(Errno::EIO)?;
            *p += n;
            Ok(s)
        };
        let chunk_bits = take(&mut p, 1)?[0];
        if !(12..=30).contains(&chunk_bits) {
            return Err(bad());
        }
        let lower_size = u64::from_le_bytes(take(&mut p, 8)?.try_into().unwrap());
        let limit = u64::from_le_bytes(take(&mut p, 8)?.try_into().unwrap());
        let plen = u16::from_le_bytes(take(&mut p, 2)?.try_into().unwrap()) as usize;
        let lower_path = take(&mut p, plen)?.to_vec();
        let n = u32::from_le_bytes(take(&mut p, 4)?.try_into().unwrap()) as usize;
        let chunks = lower_size.div_ceil(1 << chunk_bits);
        let mut below: Vec<(u64, u64)> = Vec::new();
        for _ in 0..n {
            let s = u32::from_le_bytes(take(&mut p, 4)?.try_into().unwrap()) as u64;
            let len = u32::from_le_bytes(take(&mut p, 4)?.try_into().unwrap()) as u64;
            let e = s + len;
            if len == 0 || e > chunks || below.last().is_some_and(|&(_, pe)| pe >= s) {
                return Err(bad());
            }
            below.push((s, e));
        }
        if p != body.len() || limit > lower_size {
            return Err(bad());
        }
        Ok(StackMap {
            chunk_bits,
            lower_path,
            lower_size,
            limit,
            below,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A plain model: one state per chunk.
    #[derive(Debug, Clone)]
    struct Model {
        below: Vec<bool>,
        limit: u64,
    }

    #[derive(Debug, Clone)]
    enum Op {
        Upper(u64, u64),
        Truncate(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..40, 0u64..10).prop_map(|(s, n)| Op::Upper(s, s + n)),
            (0u64..40 * 4096 + 100).prop_map(Op::Truncate),
        ]
    }

    proptest! {
        #[test]
        fn map_matches_a_per_chunk_model(
            lower in 0u64..40 * 4096,
            ops in proptest::collection::vec(op(), 0..40),
        ) {
            let mut m = StackMap::new(12, b"a/b".to_vec(), lower);
            let n = lower.div_ceil(4096) as usize;
            let mut model = Model { below: vec![true; n], limit: lower };
            for op in ops {
                match op {
                    Op::Upper(s, e) => {
                        m.set_upper(s, e);
                        for c in s..e {
                            if (c as usize) < n {
                                model.below[c as usize] = false;
                            }
                        }
                    }
                    Op::Truncate(size) => {
                        m.truncate(size);
                        model.limit = model.limit.min(size);
                        for c in size.div_ceil(4096) as usize..n {
                            model.below[c] = false;
                        }
                    }
                }
                for c in 0..n as u64 + 2 {
                    prop_assert_eq!(m.is_below(c), model.below.get(c as usize) == Some(&true));
                }
                prop_assert_eq!(m.limit, model.limit);
                prop_assert_eq!(m.below_chunks() as usize, model.below.iter().filter(|b| **b).count());
                prop_assert_eq!(m.all_upper(), !model.below.contains(&true));
                // Runs stay sorted, disjoint and non-empty, and the encoding round-trips.
                for w in m.below_runs().windows(2) {
                    prop_assert!(w[0].1 < w[1].0);
                }
                let back = StackMap::decode(&m.encode()).unwrap();
                prop_assert_eq!(back.clone(), m.clone());
            }
        }

        #[test]
        fn touched_chunks_need_a_copy_unless_wholly_rewritten(
            lower in 1u64..20 * 4096,
            off in 0u64..24 * 4096,
            len in 1u64..3 * 4096,
            upper in proptest::collection::vec(0u64..20, 0..5),
        ) {
            let mut m = StackMap::new(12, Vec::new(), lower);
            for c in &upper {
                m.set_upper(*c, c + 1);
            }
            let size = lower;
            let t = m.touched(off, len, size);
            let end = off + len;
            for c in (off / 4096)..=((end - 1) / 4096) {
                let entry = t.iter().find(|(x, _)| *x == c);
                prop_assert_eq!(entry.is_some(), m.is_below(c));
                if let Some((_, copy)) = entry {
                    let cstart = c * 4096;
                    let cend = (cstart + 4096).min(size.max(end));
                    let whole = off <= cstart && end >= cend;
                    prop_assert_eq!(*copy, !whole && cstart < lower);
                }
            }
        }

        #[test]
        fn damaged_maps_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..80), flip in 0usize..200) {
            let _ = StackMap::decode(&bytes);
            let m = StackMap::new(22, b"dir/file".to_vec(), 123_456_789);
            let mut enc = m.encode();
            let i = flip % enc.len();
            enc[i] ^= 0x40;
            prop_assert!(StackMap::decode(&enc).is_err());
        }
    }
}
