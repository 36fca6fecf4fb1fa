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
//! Where the map is kept: in the xattr [`STACK_XATTR`] of the upper file while its encoding
//! is at most the volume's inline limit (1 KiB by default) and the filesystem takes it;
//! otherwise in a *sidecar file* `gens/G/stackmaps/ID.map` of the generation the upper file
//! is in, and the xattr holds a [`StackRef`] naming it with its length and CRC32C. A new
//! sidecar is written under a fresh id, fsync'ed (and its directory) before the xattr
//! points to it, and the superseded one is removed only after the xattr change is durable,
//! so the xattr stays the single atomic switch: a crash leaves the old map or the new one,
//! never a torn one (at worst an unreferenced sidecar, which goes with its generation when
//! it is sealed; `spinfs fsck --repair` removes it sooner). Readers find the directory as
//! `../stackmaps` from any directory of the generation (its tree root or work directory).
//!
//! Map encoding (little-endian), version 2: magic `SPSTACK2`, chunk bits (u8), lower size
//! (u64), limit (u64), path length (u16) and path (components joined by `/`, no leading
//! slash), number of below runs (LEB128) and the runs as LEB128 pairs (gap from the end of
//! the previous run or from chunk 0, length), CRC32C of all that (u32). Every other chunk
//! below costs 2 bytes per run up to 128 chunks apart. Version 1 (`SPSTACK1`: u32 run count,
//! runs as (first chunk u32, count u32)) is still read.
//!
//! Reference encoding: magic `SPSTKREF`, id (u64), sidecar length (u64), sidecar CRC32C
//! (u32), CRC32C of all that (u32).

use crate::sys::Errno;

/// The xattr holding a stacked file's map.
pub const STACK_XATTR: &[u8] = b"trusted.overlay.spinfs.stack";

/// The directory of a generation holding its sidecar maps (beside `tree` and `work`).
pub const MAPS_DIR: &str = "stackmaps";

/// Maps whose encoding is at most this long stay in the xattr by default.
pub const DEFAULT_INLINE_MAX: usize = 1024;

const MAGIC_V1: &[u8; 8] = b"SPSTACK1";
const MAGIC: &[u8; 8] = b"SPSTACK2";
const REF_MAGIC: &[u8; 8] = b"SPSTKREF";
const REF_LEN: usize = 8 + 8 + 8 + 4 + 4;

/// A sidecar map file named by a stacked file's xattr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StackRef {
    pub id: u64,
    /// Length and CRC32C of the whole sidecar file.
    pub len: u64,
    pub crc: u32,
}

impl StackRef {
    /// The file name of the sidecar inside the generation's [`MAPS_DIR`].
    pub fn file_name(&self) -> String {
        format!("{:016x}.map", self.id)
    }

    /// The sidecar's path from a directory directly in its generation's directory (the tree
    /// root or the work directory).
    pub fn path_from_gen_child(&self) -> String {
        format!("../{MAPS_DIR}/{}", self.file_name())
    }

    /// The sidecar id a file name of [`MAPS_DIR`] stands for.
    pub fn id_of(name: &str) -> Option<u64> {
        let hex = name.strip_suffix(".map")?;
        if hex.len() != 16 {
            return None;
        }
        u64::from_str_radix(hex, 16).ok()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(REF_LEN);
        v.extend_from_slice(REF_MAGIC);
        v.extend_from_slice(&self.id.to_le_bytes());
        v.extend_from_slice(&self.len.to_le_bytes());
        v.extend_from_slice(&self.crc.to_le_bytes());
        let crc = crc32c::crc32c(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    fn decode(b: &[u8]) -> Result<StackRef, Errno> {
        if b.len() != REF_LEN || &b[..8] != REF_MAGIC {
            return Err(Errno::EIO);
        }
        let (body, crc) = b.split_at(REF_LEN - 4);
        if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().unwrap()) {
            return Err(Errno::EIO);
        }
        Ok(StackRef {
            id: u64::from_le_bytes(b[8..16].try_into().unwrap()),
            len: u64::from_le_bytes(b[16..24].try_into().unwrap()),
            crc: u32::from_le_bytes(b[24..28].try_into().unwrap()),
        })
    }

    /// The map in the sidecar file's bytes `b`, checked against this reference.
    pub fn load(&self, b: &[u8]) -> Result<StackMap, Errno> {
        if b.len() as u64 != self.len || crc32c::crc32c(b) != self.crc {
            return Err(Errno::EIO);
        }
        StackMap::decode(b)
    }

    /// A reference to a sidecar holding `bytes` under `id`.
    pub fn for_bytes(id: u64, bytes: &[u8]) -> StackRef {
        StackRef {
            id,
            len: bytes.len() as u64,
            crc: crc32c::crc32c(bytes),
        }
    }
}

/// What a stacked file's xattr holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    Inline(StackMap),
    Sidecar(StackRef),
}

impl Stored {
    /// Decodes the xattr value; any damage is `EIO`.
    pub fn decode(b: &[u8]) -> Result<Stored, Errno> {
        if b.starts_with(REF_MAGIC) {
            StackRef::decode(b).map(Stored::Sidecar)
        } else {
            StackMap::decode(b).map(Stored::Inline)
        }
    }
}

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

fn put_varint(v: &mut Vec<u8>, mut x: u64) {
    while x >= 0x80 {
        v.push((x as u8) | 0x80);
        x >>= 7;
    }
    v.push(x as u8);
}

fn get_varint(b: &[u8], p: &mut usize) -> Result<u64, Errno> {
    let mut x = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*p).ok_or(Errno::EIO)?;
        *p += 1;
        let bits = u64::from(byte & 0x7f);
        if shift == 63 && bits > 1 {
            return Err(Errno::EIO);
        }
        x |= bits << shift;
        if byte & 0x80 == 0 {
            // Only the shortest form is accepted (one encoding per map).
            if byte == 0 && shift > 0 {
                return Err(Errno::EIO);
            }
            return Ok(x);
        }
    }
    Err(Errno::EIO)
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

    /// Chunks `[start, end)` become upper. Only the runs it meets are touched (a single
    /// chunk costs a binary search and at most one insertion).
    pub fn set_upper(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        // Runs [i, j) overlap [start, end).
        let i = self.below.partition_point(|&(_, e)| e <= start);
        let j = self.below.partition_point(|&(s, _)| s < end);
        if i >= j {
            return;
        }
        let (first_s, _) = self.below[i];
        let (_, last_e) = self.below[j - 1];
        let mut keep = Vec::with_capacity(2);
        if first_s < start {
            keep.push((first_s, start));
        }
        if last_e > end {
            keep.push((end, last_e));
        }
        self.below.splice(i..j, keep);
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
        let mut v = Vec::with_capacity(40 + self.lower_path.len() + self.below.len() * 4);
        v.extend_from_slice(MAGIC);
        v.push(self.chunk_bits);
        v.extend_from_slice(&self.lower_size.to_le_bytes());
        v.extend_from_slice(&self.limit.to_le_bytes());
        v.extend_from_slice(&(self.lower_path.len() as u16).to_le_bytes());
        v.extend_from_slice(&self.lower_path);
        put_varint(&mut v, self.below.len() as u64);
        let mut prev = 0;
        for &(s, e) in &self.below {
            put_varint(&mut v, s - prev);
            put_varint(&mut v, e - s);
            prev = e;
        }
        let crc = crc32c::crc32c(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    /// Decodes and checks a map (version 2 or 1); any damage or inconsistency is `EIO`.
    /// Memory is bounded by the input: a run takes at least two bytes of it.
    pub fn decode(b: &[u8]) -> Result<StackMap, Errno> {
        let bad = || Errno::EIO;
        if b.len() < 8 + 1 + 16 + 2 + 1 + 4 {
            return Err(bad());
        }
        let v1 = match &b[..8] {
            m if m == MAGIC => false,
            m if m == MAGIC_V1 => true,
            _ => return Err(bad()),
        };
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
        let chunks = lower_size.div_ceil(1 << chunk_bits);
        let n = if v1 {
            u64::from(u32::from_le_bytes(take(&mut p, 4)?.try_into().unwrap()))
        } else {
            get_varint(body, &mut p)?
        };
        if n > (body.len() - p) as u64 / 2 {
            return Err(bad());
        }
        let mut below: Vec<(u64, u64)> = Vec::with_capacity(n as usize);
        let mut prev = 0u64;
        for _ in 0..n {
            let (s, len) = if v1 {
                let s = u32::from_le_bytes(take(&mut p, 4)?.try_into().unwrap()) as u64;
                let len = u32::from_le_bytes(take(&mut p, 4)?.try_into().unwrap()) as u64;
                (s, len)
            } else {
                let gap = get_varint(body, &mut p)?;
                let len = get_varint(body, &mut p)?;
                (prev.checked_add(gap).ok_or_else(bad)?, len)
            };
            let e = s.checked_add(len).ok_or_else(bad)?;
            if len == 0 || e > chunks || below.last().is_some_and(|&(_, pe)| pe >= s) {
                return Err(bad());
            }
            below.push((s, e));
            prev = e;
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

    /// The version-1 encoding, as older builds wrote it.
    fn encode_v1(m: &StackMap) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(MAGIC_V1);
        v.push(m.chunk_bits);
        v.extend_from_slice(&m.lower_size.to_le_bytes());
        v.extend_from_slice(&m.limit.to_le_bytes());
        v.extend_from_slice(&(m.lower_path.len() as u16).to_le_bytes());
        v.extend_from_slice(&m.lower_path);
        v.extend_from_slice(&(m.below.len() as u32).to_le_bytes());
        for &(s, e) in &m.below {
            v.extend_from_slice(&(s as u32).to_le_bytes());
            v.extend_from_slice(&((e - s) as u32).to_le_bytes());
        }
        let crc = crc32c::crc32c(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    #[test]
    fn version_1_maps_still_decode() {
        let mut m = StackMap::new(16, b"d/f".to_vec(), 100 << 16);
        m.set_upper(3, 5);
        m.set_upper(40, 41);
        m.truncate(90 << 16);
        assert_eq!(StackMap::decode(&encode_v1(&m)).unwrap(), m);
        assert_eq!(Stored::decode(&encode_v1(&m)).unwrap(), Stored::Inline(m));
    }

    #[test]
    fn a_hostile_run_count_allocates_nothing() {
        let m = StackMap::new(12, Vec::new(), 1 << 40);
        let mut v = m.encode();
        v.truncate(v.len() - 4);
        // Replace the run count and the one run by a count of 2^62.
        let at = 8 + 1 + 16 + 2;
        v.truncate(at);
        put_varint(&mut v, 1 << 62);
        let crc = crc32c::crc32c(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        assert!(StackMap::decode(&v).is_err());
    }

    /// A small deterministic generator for the large-map property.
    fn xorshift(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Maps far past what an xattr holds (ext4: about one 4 KiB block for all of an
        /// inode's xattrs) encode compactly, round-trip exactly, go through a sidecar
        /// reference, and refuse damage.
        #[test]
        fn maps_past_the_xattr_limit_round_trip(
            bits in 12u8..=26,
            chunks in 20_000u64..250_000,
            tail in 0u64..4096,
            seed in 1u64..u64::MAX,
            shape in 0u8..3,
            flip in any::<prop::sample::Index>(),
        ) {
            let lower = (chunks << bits) - tail;
            let mut m = StackMap::new(bits, b"some/dir/big.file".to_vec(), lower);
            let mut model = vec![true; chunks as usize];
            let mut x = seed;
            let mut c = 0u64;
            while c < chunks {
                let (len, gap) = match shape {
                    0 => (1, 1),                                              // every other chunk
                    1 => (1, 1 + xorshift(&mut x) % 3),                       // scattered 4 KiB writes
                    _ => (1 + xorshift(&mut x) % 8, 1 + xorshift(&mut x) % 8), // ranges
                };
                let end = (c + len).min(chunks);
                m.set_upper(c, end);
                model[c as usize..end as usize].fill(false);
                c = end + gap;
            }
            let runs = m.below_runs().len();
            let enc = m.encode();
            prop_assert!(enc.len() > 4096, "{} bytes for {runs} runs", enc.len());
            // Compact: small gaps and lengths take a byte each.
            prop_assert!(enc.len() <= 64 + m.lower_path.len() + runs * 2 * 2, "{} bytes for {runs} runs", enc.len());
            let back = StackMap::decode(&enc).unwrap();
            prop_assert_eq!(&back, &m);
            for (i, &b) in model.iter().enumerate() {
                prop_assert_eq!(back.is_below(i as u64), b);
            }
            prop_assert_eq!(back.below_chunks(), model.iter().filter(|b| **b).count() as u64);
            // Through a sidecar: the xattr holds a short reference.
            let r = StackRef::for_bytes(seed, &enc);
            let xattr = r.encode();
            prop_assert!(xattr.len() < 64);
            prop_assert_eq!(Stored::decode(&xattr).unwrap(), Stored::Sidecar(r));
            prop_assert_eq!(StackRef::id_of(&r.file_name()), Some(seed));
            prop_assert_eq!(&r.load(&enc).unwrap(), &m);
            // Damage anywhere, a short file or another map is refused.
            let mut bad = enc.clone();
            bad[flip.index(enc.len())] ^= 0x08;
            prop_assert!(r.load(&bad).is_err());
            prop_assert!(StackMap::decode(&bad).is_err());
            prop_assert!(r.load(&enc[..enc.len() - 1]).is_err());
            let mut other = m.clone();
            other.truncate(lower / 2);
            prop_assert!(r.load(&other.encode()).is_err());
            let mut bad_ref = xattr.clone();
            bad_ref[flip.index(xattr.len())] ^= 0x08;
            prop_assert!(Stored::decode(&bad_ref).is_err());
        }
    }
}
