//! `HeadCache`: the first `head_size` bytes of every archived regular file of one layer, and
//! its last `tail_size` bytes (the "edges" of the file), in one immutable file on the SSD.
//! Tails serve formats whose index is at the end (MP4 with the moov atom last, ZIP, PDF,
//! ID3v1) and `file`'s end-anchored magic.
//!
//! Layout (little endian), version 2:
//!
//! ```text
//! 0       header, 64 bytes: magic "SPNFSHED", version u32, head_size u32, layer id u64,
//!         count u64, index offset u64, data length u64, CRC32C of the fence u32,
//!         tail_size u32, 4 reserved bytes, CRC32C of the 60 bytes before it
//! 64      data: each file's head then its tail, back to back
//! index   (4 KiB aligned) index blocks of 4096 bytes: up to 102 entries {key u64, file offset
//!         u64, file size u64, head length u32, tail length u32, CRC32C of head and tail u32,
//!         4 reserved bytes} sorted by key, zero padding, and the block's CRC32C in its last 4
//!         bytes
//! fence   one u64 per index block: the block's first key
//! ```
//!
//! The tail is the last `tail length` bytes of the file and never overlaps the head (a file
//! no longer than its head has no tail); the recorded file size places it, and lets a reader
//! check that the entry describes the file it reads. Version 1 (no tails, no size; entries
//! of 24 bytes {key, offset, length u32, CRC32C u32}, 170 per block) is still read.
//!
//! Opening reads the header and the fence (8 bytes per 102 files: 780 KiB for ten million
//! files) and verifies both; a lookup is a binary search of the fence in memory, one 4 KiB
//! block read and checked, and one read of the head, checked. So memory stays small, opening
//! is fast for any layer size, and nothing unchecked is ever returned. The file is written
//! data first (heads stream straight to disk; only the 24-byte index entries are held in
//! memory to be sorted), then the index, fence and header, fsync'ed and renamed into place.

use super::bytes::{get_u32, get_u64, put_u32, put_u64};
use super::{CacheError, Result, invalid, io_err};
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Size of one index block.
pub const HEAD_INDEX_BLOCK: u64 = 4096;
/// Largest head size accepted.
pub const MAX_HEAD_SIZE: u64 = 64 << 20;

const MAGIC: &[u8; 8] = b"SPNFSHED";
const VERSION: u32 = 2;
const HEADER_LEN: u64 = 64;
const ENTRY_LEN_V1: usize = 24;
const ENTRY_LEN: usize = 40;
const PER_BLOCK: usize = (HEAD_INDEX_BLOCK as usize - 4) / ENTRY_LEN;
/// The file size of an entry that does not record it (version 1, or added without one).
const UNKNOWN_SIZE: u64 = u64::MAX;

const fn per_block(version: u32) -> usize {
    (HEAD_INDEX_BLOCK as usize - 4)
        / if version == 1 {
            ENTRY_LEN_V1
        } else {
            ENTRY_LEN
        }
}
/// The writer builds the file under this suffix next to its final name.
const PARTIAL_SUFFIX: &str = ".head-partial";

/// What [`HeadCacheWriter::finish`] (or [`merge_heads`]) wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadCacheInfo {
    pub path: PathBuf,
    pub layer_id: u64,
    pub head_size: u64,
    pub tail_size: u64,
    pub count: u64,
    /// Bytes of head data.
    pub data_bytes: u64,
    /// Size of the whole file.
    pub file_bytes: u64,
}

/// A damaged part of a head cache file, as found by [`HeadCache::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadProblem {
    pub path: PathBuf,
    /// The entry concerned, when the damage is confined to one.
    pub key: Option<u64>,
    pub reason: String,
}

impl std::fmt::Display for HeadProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.key {
            Some(key) => write!(
                f,
                "head cache {} key {key}: {}",
                self.path.display(),
                self.reason
            ),
            None => write!(f, "head cache {}: {}", self.path.display(), self.reason),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IndexEntry {
    key: u64,
    offset: u64,
    /// The file's size, or `UNKNOWN_SIZE`.
    size: u64,
    head_len: u32,
    tail_len: u32,
    /// CRC32C of head and tail.
    crc: u32,
}

impl IndexEntry {
    fn len(&self) -> u64 {
        u64::from(self.head_len) + u64::from(self.tail_len)
    }

    fn encode(&self, out: &mut [u8]) {
        put_u64(out, 0, self.key);
        put_u64(out, 8, self.offset);
        put_u64(out, 16, self.size);
        put_u32(out, 24, self.head_len);
        put_u32(out, 28, self.tail_len);
        put_u32(out, 32, self.crc);
    }

    fn decode(b: &[u8], version: u32) -> IndexEntry {
        if version == 1 {
            return IndexEntry {
                key: get_u64(b, 0),
                offset: get_u64(b, 8),
                size: UNKNOWN_SIZE,
                head_len: get_u32(b, 16),
                tail_len: 0,
                crc: get_u32(b, 20),
            };
        }
        IndexEntry {
            key: get_u64(b, 0),
            offset: get_u64(b, 8),
            size: get_u64(b, 16),
            head_len: get_u32(b, 24),
            tail_len: get_u32(b, 28),
            crc: get_u32(b, 32),
        }
    }
}

/// The cached edges of one file: its head and its tail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edges {
    /// The file's size when the entry was written, if recorded.
    pub size: Option<u64>,
    data: Vec<u8>,
    head_len: usize,
}

impl Edges {
    /// The first bytes of the file.
    pub fn head(&self) -> &[u8] {
        &self.data[..self.head_len]
    }

    /// The last bytes of the file (after the head; empty when the head is the whole file).
    pub fn tail(&self) -> &[u8] {
        &self.data[self.head_len..]
    }

    /// Where the tail starts in the file (`None` without a recorded size).
    pub fn tail_offset(&self) -> Option<u64> {
        self.size.map(|s| s - self.tail().len() as u64)
    }

    /// The bytes `[offset, end)` of a file of `size` bytes, if these edges hold all of them
    /// (in the head, in the tail, or across both when together they are the whole file) and
    /// were recorded for a file of that size. Edges without a recorded size (version 1) serve
    /// their head only.
    pub fn range(&self, size: u64, offset: u64, end: u64) -> Option<&[u8]> {
        if offset > end || end > size {
            return None;
        }
        let (head, tail) = (self.head(), self.tail());
        let in_head = end <= head.len() as u64;
        match self.size {
            None => in_head.then(|| &head[offset as usize..end as usize]),
            Some(recorded) if recorded != size => None,
            Some(_) => {
                let tail_at = size - tail.len() as u64;
                if in_head || (head.len() + tail.len()) as u64 == size {
                    // `data` is head then tail: the whole file when they meet.
                    Some(&self.data[offset as usize..end as usize])
                } else if offset >= tail_at {
                    Some(&tail[(offset - tail_at) as usize..(end - tail_at) as usize])
                } else {
                    None
                }
            }
        }
    }
}

fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(PARTIAL_SUFFIX);
    path.with_file_name(name)
}

fn check_head_size(head_size: u64) -> Result<u32> {
    if head_size == 0 || head_size > MAX_HEAD_SIZE {
        return Err(invalid(
            format!("head size {head_size}"),
            format!("must be between 1 and {MAX_HEAD_SIZE} bytes"),
        ));
    }
    Ok(head_size as u32)
}

/// Writes the head cache file of one layer, once, at seal time.
pub struct HeadCacheWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    layer_id: u64,
    head_size: u32,
    tail_size: u32,
    entries: Vec<IndexEntry>,
    data_len: u64,
    sorted: bool,
    done: bool,
}

impl HeadCacheWriter {
    /// Starts a head cache that will appear at `path` when finished, holding heads of up to
    /// `head_size` bytes and tails of up to as many. Work in progress is kept at `path` +
    /// `.head-partial` (replaced if a crash left one; see [`remove_partial_heads`]).
    pub fn create(path: &Path, layer_id: u64, head_size: u64) -> Result<HeadCacheWriter> {
        Self::create_with_tails(path, layer_id, head_size, head_size)
    }

    /// Like [`create`](Self::create) with tails of up to `tail_size` bytes (0: no tails).
    pub fn create_with_tails(
        path: &Path,
        layer_id: u64,
        head_size: u64,
        tail_size: u64,
    ) -> Result<HeadCacheWriter> {
        let head_size = check_head_size(head_size)?;
        if tail_size > MAX_HEAD_SIZE {
            return Err(invalid(
                format!("tail size {tail_size}"),
                format!("must be at most {MAX_HEAD_SIZE} bytes"),
            ));
        }
        let tmp = partial_path(path);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        // The header is written last; until then the file starts with zeros, never valid.
        out.write_all(&[0u8; HEADER_LEN as usize])
            .map_err(io_err("write", &tmp))?;
        Ok(HeadCacheWriter {
            path: path.to_path_buf(),
            tmp,
            out,
            layer_id,
            head_size,
            tail_size: tail_size as u32,
            entries: Vec::new(),
            data_len: 0,
            sorted: true,
            done: false,
        })
    }

    /// Adds the head of the file with `key` (its nid in the layer's image): at most
    /// `head_size` bytes, fewer (or none) for a smaller file. Keys may come in any order but
    /// must be distinct ([`finish`](Self::finish) rejects duplicates).
    pub fn add(&mut self, key: u64, data: &[u8]) -> Result<()> {
        self.add_entry(key, UNKNOWN_SIZE, data, &[])
    }

    /// Adds the edges of the file with `key`, `size` bytes long: its first bytes `head` (at
    /// most `head_size`, the whole file when it is that short) and its last bytes `tail` (at
    /// most `tail_size`, not overlapping the head).
    pub fn add_file(&mut self, key: u64, size: u64, head: &[u8], tail: &[u8]) -> Result<()> {
        let what = || format!("edges of key {key} for {}", self.path.display());
        let (h, t) = (head.len() as u64, tail.len() as u64);
        if size == UNKNOWN_SIZE || h + t > size {
            return Err(invalid(
                what(),
                format!("head {h} and tail {t} bytes do not fit a file of {size} bytes"),
            ));
        }
        self.add_entry(key, size, head, tail)
    }

    fn add_entry(&mut self, key: u64, size: u64, head: &[u8], tail: &[u8]) -> Result<()> {
        if head.len() as u64 > u64::from(self.head_size)
            || tail.len() as u64 > u64::from(self.tail_size)
        {
            return Err(invalid(
                format!("head of key {key} for {}", self.path.display()),
                format!(
                    "{} + {} bytes exceed the head size {} or the tail size {}",
                    head.len(),
                    tail.len(),
                    self.head_size,
                    self.tail_size
                ),
            ));
        }
        if self.entries.last().is_some_and(|last| last.key >= key) {
            self.sorted = false;
        }
        self.out
            .write_all(head)
            .and_then(|()| self.out.write_all(tail))
            .map_err(io_err("write", &self.tmp))?;
        self.entries.push(IndexEntry {
            key,
            offset: HEADER_LEN + self.data_len,
            size,
            head_len: head.len() as u32,
            tail_len: tail.len() as u32,
            crc: crc32c::crc32c_append(crc32c::crc32c(head), tail),
        });
        self.data_len += (head.len() + tail.len()) as u64;
        Ok(())
    }

    /// Writes index, fence and header, makes the file durable and publishes it at its path.
    pub fn finish(mut self) -> Result<HeadCacheInfo> {
        let tmp = self.tmp.clone();
        let io = |op| io_err(op, &tmp);
        if !self.sorted {
            self.entries.sort_by_key(|e| e.key);
        }
        if let Some(w) = self.entries.windows(2).find(|w| w[0].key == w[1].key) {
            return Err(invalid(
                format!("head cache {}", self.path.display()),
                format!("key {} added twice", w[0].key),
            ));
        }
        let index_off = (HEADER_LEN + self.data_len).next_multiple_of(HEAD_INDEX_BLOCK);
        let pad = index_off - HEADER_LEN - self.data_len;
        self.out
            .write_all(&vec![0u8; pad as usize])
            .map_err(io("write"))?;
        let mut fence = Vec::with_capacity(self.entries.len().div_ceil(PER_BLOCK) * 8);
        let mut block = vec![0u8; HEAD_INDEX_BLOCK as usize];
        for chunk in self.entries.chunks(PER_BLOCK) {
            block.fill(0);
            for (i, e) in chunk.iter().enumerate() {
                e.encode(&mut block[i * ENTRY_LEN..]);
            }
            let crc = crc32c::crc32c(&block[..HEAD_INDEX_BLOCK as usize - 4]);
            put_u32(&mut block, HEAD_INDEX_BLOCK as usize - 4, crc);
            self.out.write_all(&block).map_err(io("write"))?;
            fence.extend_from_slice(&chunk[0].key.to_le_bytes());
        }
        self.out.write_all(&fence).map_err(io("write"))?;
        self.out.flush().map_err(io("write"))?;

        let count = self.entries.len() as u64;
        let blocks = count.div_ceil(PER_BLOCK as u64);
        let mut h = [0u8; HEADER_LEN as usize];
        h[..8].copy_from_slice(MAGIC);
        put_u32(&mut h, 8, VERSION);
        put_u32(&mut h, 12, self.head_size);
        put_u64(&mut h, 16, self.layer_id);
        put_u64(&mut h, 24, count);
        put_u64(&mut h, 32, index_off);
        put_u64(&mut h, 40, self.data_len);
        put_u32(&mut h, 48, crc32c::crc32c(&fence));
        put_u32(&mut h, 52, self.tail_size);
        let crc = crc32c::crc32c(&h[..60]);
        put_u32(&mut h, 60, crc);
        let file = self.out.get_ref();
        file.write_all_at(&h, 0).map_err(io("write"))?;
        file.sync_all().map_err(io("sync"))?;
        spinfs_failpoints::fail_point!("head_cache.before_rename");
        fs::rename(&self.tmp, &self.path).map_err(io_err("rename into", &self.path))?;
        spinfs_failpoints::fail_point!("head_cache.after_rename");
        self.done = true;
        let dir = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("sync", dir))?;
        Ok(HeadCacheInfo {
            path: self.path.clone(),
            layer_id: self.layer_id,
            head_size: u64::from(self.head_size),
            tail_size: u64::from(self.tail_size),
            count,
            data_bytes: self.data_len,
            file_bytes: index_off + blocks * (HEAD_INDEX_BLOCK + 8),
        })
    }
}

impl Drop for HeadCacheWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Removes the work in progress of head cache writers interrupted by a crash in `dir`;
/// returns how many files were removed.
pub fn remove_partial_heads(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(dir).map_err(io_err("read directory", dir))? {
        let entry = entry.map_err(io_err("read directory", dir))?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.ends_with(PARTIAL_SUFFIX))
        {
            let path = entry.path();
            fs::remove_file(&path).map_err(io_err("remove", &path))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// An open, read-only head cache of one layer. Thread-safe (positional reads only).
#[derive(Debug)]
pub struct HeadCache {
    path: PathBuf,
    file: File,
    layer_id: u64,
    version: u32,
    head_size: u32,
    tail_size: u32,
    count: u64,
    data_len: u64,
    index_off: u64,
    /// First key of every index block.
    fence: Vec<u64>,
}

impl HeadCache {
    /// Opens `path`, checking the header, the file size and the fence.
    pub fn open(path: &Path) -> Result<HeadCache> {
        let corrupt = |reason: String| CacheError::HeadCorrupt {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(io_err("open", path))?;
        let size = file.metadata().map_err(io_err("stat", path))?.len();
        let mut h = [0u8; HEADER_LEN as usize];
        read_exact_at(&file, &mut h, 0, path).map_err(|e| match e {
            ReadFail::Short => corrupt(format!("file is {size} bytes, shorter than its header")),
            ReadFail::Io(e) => e,
        })?;
        if &h[..8] != MAGIC {
            return Err(corrupt("bad magic".into()));
        }
        if crc32c::crc32c(&h[..60]) != get_u32(&h, 60) {
            return Err(corrupt("header checksum mismatch".into()));
        }
        let version = get_u32(&h, 8);
        if version != VERSION && version != 1 {
            return Err(CacheError::HeadVersion {
                path: path.to_path_buf(),
                found: version,
                expected: VERSION,
            });
        }
        let head_size = get_u32(&h, 12);
        let tail_size = if version == 1 { 0 } else { get_u32(&h, 52) };
        let count = get_u64(&h, 24);
        let index_off = get_u64(&h, 32);
        let data_len = get_u64(&h, 40);
        let blocks = count.div_ceil(per_block(version) as u64);
        let expected_size = HEADER_LEN
            .checked_add(data_len)
            .map(|end| end.next_multiple_of(HEAD_INDEX_BLOCK))
            .filter(|&off| off == index_off)
            .and_then(|off| blocks.checked_mul(HEAD_INDEX_BLOCK + 8)?.checked_add(off));
        if head_size == 0 || expected_size != Some(size) {
            return Err(corrupt(format!(
                "header (count {count}, data {data_len} bytes, index at {index_off}) does not \
                 match the file size {size}"
            )));
        }
        let mut fence_bytes = vec![0u8; (blocks * 8) as usize];
        read_exact_at(
            &file,
            &mut fence_bytes,
            index_off + blocks * HEAD_INDEX_BLOCK,
            path,
        )
        .map_err(|e| match e {
            ReadFail::Short => corrupt("truncated fence".into()),
            ReadFail::Io(e) => e,
        })?;
        if crc32c::crc32c(&fence_bytes) != get_u32(&h, 48) {
            return Err(corrupt("fence checksum mismatch".into()));
        }
        let fence: Vec<u64> = fence_bytes.chunks(8).map(|b| get_u64(b, 0)).collect();
        if fence.windows(2).any(|w| w[0] >= w[1]) {
            return Err(corrupt("fence keys out of order".into()));
        }
        Ok(HeadCache {
            path: path.to_path_buf(),
            file,
            layer_id: get_u64(&h, 16),
            version,
            head_size,
            tail_size,
            count,
            data_len,
            index_off,
            fence,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn layer_id(&self) -> u64 {
        self.layer_id
    }

    pub fn head_size(&self) -> u64 {
        u64::from(self.head_size)
    }

    /// Largest tail held (0 for a version-1 file).
    pub fn tail_size(&self) -> u64 {
        u64::from(self.tail_size)
    }

    /// Number of heads held.
    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The head of `key`, verified; `None` if the layer holds no head for it.
    pub fn get(&self, key: u64) -> Result<Option<Vec<u8>>> {
        Ok(self.edges(key)?.map(|e| {
            let mut data = e.data;
            data.truncate(e.head_len);
            data
        }))
    }

    /// The head and tail of `key`, verified; `None` if the layer holds nothing for it.
    pub fn edges(&self, key: u64) -> Result<Option<Edges>> {
        let Some(entry) = self.lookup(key)? else {
            return Ok(None);
        };
        Ok(Some(Edges {
            size: (entry.size != UNKNOWN_SIZE).then_some(entry.size),
            data: self.read_head(&entry)?,
            head_len: entry.head_len as usize,
        }))
    }

    /// Copies the head of `key` from `offset` into `buf`; returns the number of bytes copied
    /// (0 at or past the head's end), or `None` if the layer holds no head for it.
    pub fn read(&self, key: u64, offset: u64, buf: &mut [u8]) -> Result<Option<usize>> {
        let Some(head) = self.get(key)? else {
            return Ok(None);
        };
        let start = offset.min(head.len() as u64) as usize;
        let n = (head.len() - start).min(buf.len());
        buf[..n].copy_from_slice(&head[start..start + n]);
        Ok(Some(n))
    }

    /// All keys, in ascending order (reads and checks the whole index).
    pub fn keys(&self) -> Result<Vec<u64>> {
        Ok(self.read_index()?.into_iter().map(|e| e.key).collect())
    }

    /// Reads and checks the whole file: every index block, the order of keys, the fence,
    /// every head's checksum, and the zero padding between the data and the index (which no
    /// checksum covers: a flipped bit there harms no head, but is damage all the same).
    pub fn verify(&self) -> Vec<HeadProblem> {
        let mut problems = Vec::new();
        let problem = |key: Option<u64>, reason: String| HeadProblem {
            path: self.path.clone(),
            key,
            reason,
        };
        let pad_start = HEADER_LEN + self.data_len;
        let mut pad = vec![0u8; (self.index_off - pad_start) as usize];
        match read_exact_at(&self.file, &mut pad, pad_start, &self.path) {
            Ok(()) => {
                if let Some(at) = pad.iter().position(|&b| b != 0) {
                    problems.push(problem(
                        None,
                        format!(
                            "padding before the index is not zero at byte {}",
                            pad_start + at as u64
                        ),
                    ));
                }
            }
            Err(ReadFail::Short) => problems.push(problem(None, "padding truncated".into())),
            Err(ReadFail::Io(e)) => problems.push(problem(None, format!("padding: {e}"))),
        }
        let mut previous: Option<u64> = None;
        for b in 0..self.fence.len() {
            let entries = match self.read_block(b) {
                Ok(entries) => entries,
                Err(reason) => {
                    problems.push(problem(None, reason));
                    continue;
                }
            };
            for e in entries {
                if previous.is_some_and(|p| p >= e.key) {
                    problems.push(problem(
                        Some(e.key),
                        format!("index block {b}: key out of order"),
                    ));
                }
                previous = Some(e.key);
                if let Err(reason) = self.check_bounds(&e) {
                    problems.push(problem(Some(e.key), reason));
                    continue;
                }
                if let Err(err) = self.read_head(&e) {
                    let reason = match err {
                        CacheError::HeadEntryCorrupt { reason, .. } => reason,
                        other => other.to_string(),
                    };
                    problems.push(problem(Some(e.key), reason));
                }
            }
        }
        problems
    }

    /// Opens and verifies `path`, reporting a file that cannot be opened as one problem.
    pub fn verify_file(path: &Path) -> Vec<HeadProblem> {
        match HeadCache::open(path) {
            Ok(cache) => cache.verify(),
            Err(e) => vec![HeadProblem {
                path: path.to_path_buf(),
                key: None,
                reason: e.to_string(),
            }],
        }
    }

    fn entry_error(&self, key: u64, reason: String) -> CacheError {
        CacheError::HeadEntryCorrupt {
            path: self.path.clone(),
            key,
            reason,
        }
    }

    fn lookup(&self, key: u64) -> Result<Option<IndexEntry>> {
        let b = self.fence.partition_point(|&first| first <= key);
        if b == 0 {
            return Ok(None);
        }
        let entries = self
            .read_block(b - 1)
            .map_err(|reason| self.entry_error(key, reason))?;
        match entries.binary_search_by_key(&key, |e| e.key) {
            Ok(i) => {
                let e = entries[i];
                self.check_bounds(&e)
                    .map_err(|reason| self.entry_error(key, reason))?;
                Ok(Some(e))
            }
            Err(_) => Ok(None),
        }
    }

    /// Reads index block `b`, checking its CRC and that it starts with its fence key.
    fn read_block(&self, b: usize) -> std::result::Result<Vec<IndexEntry>, String> {
        let mut block = vec![0u8; HEAD_INDEX_BLOCK as usize];
        let at = self.index_off + b as u64 * HEAD_INDEX_BLOCK;
        read_exact_at(&self.file, &mut block, at, &self.path).map_err(|e| match e {
            ReadFail::Short => format!("index block {b} truncated"),
            ReadFail::Io(e) => format!("index block {b}: {e}"),
        })?;
        let recorded = get_u32(&block, HEAD_INDEX_BLOCK as usize - 4);
        if crc32c::crc32c(&block[..HEAD_INDEX_BLOCK as usize - 4]) != recorded {
            return Err(format!("index block {b} checksum mismatch"));
        }
        let per = per_block(self.version);
        let entry_len = if self.version == 1 {
            ENTRY_LEN_V1
        } else {
            ENTRY_LEN
        };
        let n = if b + 1 == self.fence.len() {
            (self.count - b as u64 * per as u64) as usize
        } else {
            per
        };
        let entries: Vec<IndexEntry> = (0..n)
            .map(|i| IndexEntry::decode(&block[i * entry_len..], self.version))
            .collect();
        if entries.first().map(|e| e.key) != Some(self.fence[b]) {
            return Err(format!("index block {b} does not start with its fence key"));
        }
        if entries.windows(2).any(|w| w[0].key >= w[1].key) {
            return Err(format!("index block {b} keys out of order"));
        }
        Ok(entries)
    }

    fn check_bounds(&self, e: &IndexEntry) -> std::result::Result<(), String> {
        let end = e.offset.checked_add(e.len());
        if e.head_len > self.head_size
            || e.tail_len > self.tail_size
            || (e.size != UNKNOWN_SIZE && e.len() > e.size)
            || e.offset < HEADER_LEN
            || end.is_none_or(|end| end > HEADER_LEN + self.data_len)
        {
            return Err(format!(
                "index entry (offset {}, head {}, tail {}, file size {}) outside the data",
                e.offset, e.head_len, e.tail_len, e.size
            ));
        }
        Ok(())
    }

    fn read_head(&self, e: &IndexEntry) -> Result<Vec<u8>> {
        let mut data = vec![0u8; e.len() as usize];
        read_exact_at(&self.file, &mut data, e.offset, &self.path).map_err(|err| match err {
            ReadFail::Short => self.entry_error(e.key, "head data truncated".into()),
            ReadFail::Io(err) => err,
        })?;
        let crc = crc32c::crc32c(&data);
        if crc != e.crc {
            return Err(self.entry_error(
                e.key,
                format!(
                    "head checksum mismatch (recorded {:08x}, computed {crc:08x})",
                    e.crc
                ),
            ));
        }
        Ok(data)
    }

    fn read_index(&self) -> Result<Vec<IndexEntry>> {
        let mut all = Vec::with_capacity(self.count as usize);
        for b in 0..self.fence.len() {
            let entries = self
                .read_block(b)
                .map_err(|reason| CacheError::HeadCorrupt {
                    path: self.path.clone(),
                    reason,
                })?;
            for e in entries {
                self.check_bounds(&e)
                    .map_err(|reason| self.entry_error(e.key, reason))?;
                all.push(e);
            }
        }
        Ok(all)
    }
}

enum ReadFail {
    Short,
    Io(CacheError),
}

fn read_exact_at(
    file: &File,
    buf: &mut [u8],
    at: u64,
    path: &Path,
) -> std::result::Result<(), ReadFail> {
    file.read_exact_at(buf, at).map_err(|e| {
        if e.kind() == ErrorKind::UnexpectedEof {
            ReadFail::Short
        } else {
            ReadFail::Io(io_err("read", path)(e))
        }
    })
}

/// One input of [`merge_heads`]: a layer's head cache and the mapping of its keys (nids in
/// the input image) to keys of the merged image; `None` drops the entry.
pub struct MergeInput<'a> {
    pub cache: &'a HeadCache,
    pub key_map: &'a dyn Fn(u64) -> Option<u64>,
}

/// Writes the head cache of a merged layer to `output`. Inputs are in precedence order
/// (newest layer first): when several entries map to the same new key, the first input's
/// is kept, and within one input the one with the smallest old key. Heads longer than
/// `head_size` are cut to it (a shorter prefix is still the head), tails likewise to their
/// last `head_size` bytes. A damaged input gives an error naming that input's file and key;
/// nothing is published.
pub fn merge_heads(
    output: &Path,
    layer_id: u64,
    head_size: u64,
    inputs: &[MergeInput<'_>],
) -> Result<HeadCacheInfo> {
    let mut chosen: Vec<(u64, usize, IndexEntry)> = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        for e in input.cache.read_index()? {
            if let Some(new_key) = (input.key_map)(e.key) {
                chosen.push((new_key, i, e));
            }
        }
    }
    chosen.sort_by_key(|&(new_key, i, _)| (new_key, i));
    chosen.dedup_by_key(|&mut (new_key, _, _)| new_key);
    let mut writer = HeadCacheWriter::create(output, layer_id, head_size)?;
    for (new_key, i, e) in chosen {
        let data = inputs[i].cache.read_head(&e)?;
        let (head, tail) = data.split_at(e.head_len as usize);
        let head = &head[..head.len().min(head_size as usize)];
        let tail = &tail[tail.len() - tail.len().min(head_size as usize)..];
        if e.size == UNKNOWN_SIZE {
            writer.add(new_key, head)?;
        } else {
            writer.add_file(new_key, e.size, head, tail)?;
        }
    }
    writer.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(dir: &Path, heads: &[(u64, Vec<u8>)]) -> PathBuf {
        let path = dir.join("heads");
        let mut w = HeadCacheWriter::create(&path, 3, 64).unwrap();
        for (k, d) in heads {
            w.add(*k, d).unwrap();
        }
        w.finish().unwrap();
        path
    }

    #[test]
    fn round_trip_across_block_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let heads: Vec<(u64, Vec<u8>)> = (0..(PER_BLOCK as u64 * 3 + 5))
            .rev()
            .map(|k| (k * 7, vec![k as u8; (k % 65) as usize]))
            .collect();
        let path = build(dir.path(), &heads);
        let cache = HeadCache::open(&path).unwrap();
        assert_eq!(cache.len(), heads.len() as u64);
        assert_eq!(cache.fence.len(), 4);
        for (k, d) in &heads {
            assert_eq!(cache.get(*k).unwrap().as_ref(), Some(d), "key {k}");
            assert_eq!(cache.get(k + 1).unwrap(), None);
        }
        assert!(cache.verify().is_empty());
        assert!(!partial_path(&path).exists());
    }

    /// The zero padding between the data and the index is covered by no checksum: a bit
    /// flipped there harms no head, but `verify` (and so fsck) must still see it (the
    /// reliability soak flipped one and fsck found nothing).
    #[test]
    fn damage_in_the_padding_before_the_index_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let heads: Vec<(u64, Vec<u8>)> = (1..4u64).map(|k| (k, vec![k as u8; 40])).collect();
        let path = build(dir.path(), &heads);
        let cache = HeadCache::open(&path).unwrap();
        assert!(cache.verify().is_empty());
        let pad_start = HEADER_LEN + cache.data_len;
        assert!(cache.index_off > pad_start, "a file with padding");
        let mut bytes = std::fs::read(&path).unwrap();
        let at = (pad_start + cache.index_off) / 2;
        bytes[at as usize] ^= 0x04;
        std::fs::write(&path, &bytes).unwrap();
        let cache = HeadCache::open(&path).unwrap();
        let problems = cache.verify();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].reason.contains(&format!(
                "padding before the index is not zero at byte {at}"
            )),
            "{problems:?}"
        );
        // The heads themselves are intact.
        for (k, d) in &heads {
            assert_eq!(cache.get(*k).unwrap().as_ref(), Some(d));
        }
    }

    #[test]
    fn empty_cache_and_rejected_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let path = build(dir.path(), &[]);
        let cache = HeadCache::open(&path).unwrap();
        assert!(cache.is_empty());
        assert_eq!(cache.get(0).unwrap(), None);
        assert!(HeadCacheWriter::create(&path, 1, 0).is_err());
        let mut w = HeadCacheWriter::create(&dir.path().join("x"), 1, 4).unwrap();
        assert!(w.add(1, &[0; 5]).is_err());
        w.add(1, b"ab").unwrap();
        w.add(1, b"cd").unwrap();
        assert!(matches!(
            w.finish(),
            Err(CacheError::InvalidArgument { .. })
        ));
        assert!(!dir.path().join("x").exists());
        assert!(!partial_path(&dir.path().join("x")).exists());
    }

    /// Version-1 files (heads only, 24-byte entries, written before tails existed) are still
    /// read: their heads serve reads inside the head, nothing else.
    #[test]
    fn version_1_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("heads.v1");
        let heads: Vec<(u64, Vec<u8>)> = (0..200u64)
            .map(|k| (k * 2, vec![k as u8; (k % 50) as usize]))
            .collect();
        let per = per_block(1);
        let mut data = Vec::new();
        let mut entries = Vec::new();
        for (k, d) in &heads {
            entries.push((
                *k,
                HEADER_LEN + data.len() as u64,
                d.len() as u32,
                crc32c::crc32c(d),
            ));
            data.extend_from_slice(d);
        }
        let index_off = (HEADER_LEN + data.len() as u64).next_multiple_of(HEAD_INDEX_BLOCK);
        let mut file = vec![0u8; index_off as usize];
        file[HEADER_LEN as usize..HEADER_LEN as usize + data.len()].copy_from_slice(&data);
        let mut fence = Vec::new();
        for chunk in entries.chunks(per) {
            let mut block = vec![0u8; HEAD_INDEX_BLOCK as usize];
            for (i, &(k, off, len, crc)) in chunk.iter().enumerate() {
                let b = &mut block[i * ENTRY_LEN_V1..];
                put_u64(b, 0, k);
                put_u64(b, 8, off);
                put_u32(b, 16, len);
                put_u32(b, 20, crc);
            }
            let crc = crc32c::crc32c(&block[..HEAD_INDEX_BLOCK as usize - 4]);
            put_u32(&mut block, HEAD_INDEX_BLOCK as usize - 4, crc);
            file.extend_from_slice(&block);
            fence.extend_from_slice(&chunk[0].0.to_le_bytes());
        }
        file.extend_from_slice(&fence);
        let h = &mut file[..HEADER_LEN as usize];
        h[..8].copy_from_slice(MAGIC);
        put_u32(h, 8, 1);
        put_u32(h, 12, 64);
        put_u64(h, 16, 5);
        put_u64(h, 24, heads.len() as u64);
        put_u64(h, 32, index_off);
        put_u64(h, 40, data.len() as u64);
        put_u32(h, 48, crc32c::crc32c(&fence));
        let crc = crc32c::crc32c(&h[..60]);
        put_u32(h, 60, crc);
        fs::write(&path, &file).unwrap();

        let cache = HeadCache::open(&path).unwrap();
        assert_eq!(
            (cache.head_size(), cache.tail_size(), cache.len()),
            (64, 0, 200)
        );
        for (k, d) in &heads {
            let e = cache.edges(*k).unwrap().unwrap();
            assert_eq!((e.size, e.head(), e.tail()), (None, &d[..], &[][..]));
            let n = d.len() as u64;
            assert_eq!(e.range(1000, 0, n), Some(&d[..]));
            assert_eq!(e.range(1000, 0, n + 1), None);
        }
        assert_eq!(cache.get(1).unwrap(), None);
        assert!(cache.verify().is_empty());
    }
}
