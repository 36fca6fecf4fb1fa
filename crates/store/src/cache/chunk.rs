//! `ChunkCache`: a bounded, persistent, checksummed LRU cache of archived byte ranges.
//!
//! On the SSD, in the cache directory:
//!
//! ```text
//! lock                      flock'ed while a ChunkCache has the directory open
//! format                    magic, version, unit, CRC32C: entries written with another unit or
//!                           format version are dropped
//! tmp/                      entries being written; emptied at open
//! i<image:016x>/<offset:016x>   one file per entry: the data, then a 64-byte trailer
//! ```
//!
//! Entry trailer (little endian): magic `SPNFSCHK`, version u32, reserved u32, image u64,
//! offset u64, unit u64, data length u64, CRC32C of the data u32, 8 reserved bytes, CRC32C of
//! the 60 bytes before it. The data comes first so that it starts on a block boundary: whole
//! entries are read with O_DIRECT ([`ChunkCache::load_run`]), several back to back into one
//! 4 KiB-aligned buffer ([`EntryData`]), with no page-cache copy. An entry is written under
//! `tmp/` and renamed into place without an fdatasync (the kernel writes it back): a crash
//! leaves at worst a file in `tmp/` (removed at open), loses a recent entry, or leaves a
//! recent entry incomplete. Every read checks the trailer, the length and the data CRC before
//! any byte is reported as a hit, so an incomplete entry is a miss (counted as damaged) and is
//! dropped.
//!
//! Keys are (image, offset) pairs the caller chooses: any offset, data 1..=unit bytes (the
//! store keys by the image offset of a media object, so entries follow the objects). Entries
//! never overlap in practice, but the cache does not rely on it.
//!
//! Recency is a hybrid logical clock (wall-clock nanoseconds, forced strictly increasing)
//! kept in memory and mirrored in each entry file's mtime, so a reopened cache evicts in the
//! same order (to the timestamp resolution of the SSD's filesystem). Hits only mark the
//! entry: [`ChunkCache::flush_recency`] (called off the read path, and when the cache is
//! dropped) writes the mtimes, so a hit costs no metadata write.

use super::bytes::{get_u32, get_u64, put_u32, put_u64};
use super::{CacheError, Result, invalid, io_err};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Bytes of header in front of every entry's data; counted against the capacity.
pub const CHUNK_HEADER_LEN: u64 = 64;
/// Smallest unit accepted by [`ChunkCache::open`].
pub const MIN_UNIT: u64 = 4096;
/// Largest unit accepted by [`ChunkCache::open`] (an entry is read into memory whole by `get`).
pub const MAX_UNIT: u64 = 256 << 20;

const ENTRY_MAGIC: &[u8; 8] = b"SPNFSCHK";
const FORMAT_MAGIC: &[u8; 8] = b"SPNFSCCD";
/// Version of the entry trailer (2: data first, then the 64 bytes that were a header in 1).
const VERSION: u32 = 2;
/// Version of the directory format: 2 = keys at any offset (media object boundaries), entry
/// data first and its 64-byte record last; the entries of a version-1 directory (keys at
/// multiples of the unit, record first) are dropped at open.
const FORMAT_VERSION: u32 = 2;
const FORMAT_LEN: usize = 32;
const FORMAT_FILE: &str = "format";
const LOCK_FILE: &str = "lock";
const TMP_DIR: &str = "tmp";
/// Parts of an entry outside the caller's buffer are checksummed through a buffer this big.
const SCRATCH: usize = 64 << 10;

/// Counters of a [`ChunkCache`]. `bytes` counts entry files (header + data).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub bytes: u64,
    pub entries: u64,
    pub evictions: u64,
    /// Damaged entries detected (and dropped) since open.
    pub corrupt: u64,
}

/// A damaged chunk cache entry, as found by [`ChunkCache::verify_all`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkProblem {
    pub path: PathBuf,
    pub image: u64,
    pub offset: u64,
    pub reason: String,
}

impl std::fmt::Display for ChunkProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "chunk cache entry {} (image {}, offset {}): {}",
            self.path.display(),
            self.image,
            self.offset,
            self.reason
        )
    }
}

type Key = (u64, u64);

struct Slot {
    tick: u64,
    len: u64,
    /// Distinguishes this file from a later one under the same name.
    generation: u64,
}

/// The in-memory index: entries by key and by recency.
#[derive(Default)]
struct Index {
    entries: BTreeMap<Key, Slot>,
    recency: BTreeMap<u64, Key>,
    bytes: u64,
    last_tick: u64,
    next_generation: u64,
    /// Entries whose recency tick is newer than their file's mtime.
    unsynced: std::collections::BTreeSet<Key>,
}

impl Index {
    /// The next recency tick: wall-clock nanoseconds, strictly increasing.
    fn tick(&mut self) -> u64 {
        self.last_tick = now_ns().max(self.last_tick + 1);
        self.last_tick
    }

    fn insert(&mut self, key: Key, len: u64, tick: u64) -> u64 {
        self.remove(key);
        let generation = self.next_generation;
        self.next_generation += 1;
        self.entries.insert(
            key,
            Slot {
                tick,
                len,
                generation,
            },
        );
        self.recency.insert(tick, key);
        self.bytes += CHUNK_HEADER_LEN + len;
        generation
    }

    fn remove(&mut self, key: Key) -> Option<Slot> {
        let slot = self.entries.remove(&key)?;
        self.unsynced.remove(&key);
        self.recency.remove(&slot.tick);
        self.bytes -= CHUNK_HEADER_LEN + slot.len;
        Some(slot)
    }

    fn touch(&mut self, key: Key) -> Option<u64> {
        let tick = self.tick();
        let slot = self.entries.get_mut(&key)?;
        self.recency.remove(&slot.tick);
        slot.tick = tick;
        self.recency.insert(tick, key);
        Some(tick)
    }

    fn oldest(&self) -> Option<Key> {
        self.recency.values().next().copied()
    }
}

/// An entry file opened under the index lock, so it is the file `generation` names.
struct OpenEntry {
    file: File,
    path: PathBuf,
    key: Key,
    len: u64,
    generation: u64,
}

/// The SSD cache of archived data ranges. Thread-safe; one instance per directory at a time
/// (enforced with `flock`).
pub struct ChunkCache {
    dir: PathBuf,
    capacity: u64,
    unit: u64,
    index: Mutex<Index>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    corrupt: AtomicU64,
    tmp_seq: AtomicU64,
    _lock: File,
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache")
            .field("dir", &self.dir)
            .field("capacity", &self.capacity)
            .field("unit", &self.unit)
            .field("stats", &self.stats())
            .finish()
    }
}

impl ChunkCache {
    /// Opens (creating if needed) the cache in `dir`: removes leftovers of interrupted puts,
    /// drops entries written with another `unit`, indexes the entries present and evicts the
    /// least recently used down to `capacity_bytes`. `unit` is the alignment and maximum
    /// length of entries (any value in [`MIN_UNIT`]..=[`MAX_UNIT`], not necessarily a power of
    /// two). A capacity of 0 disables the cache and empties it.
    pub fn open(dir: &Path, capacity_bytes: u64, unit: u64) -> Result<ChunkCache> {
        if !(MIN_UNIT..=MAX_UNIT).contains(&unit) {
            return Err(invalid(
                format!("chunk cache unit {unit}"),
                format!("must be between {MIN_UNIT} and {MAX_UNIT} bytes"),
            ));
        }
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let lock = lock_dir(dir)?;
        let tmp = dir.join(TMP_DIR);
        fs::create_dir_all(&tmp).map_err(io_err("create directory", &tmp))?;
        let removed = clear_dir(&tmp)?;
        if removed > 0 {
            tracing::info!(dir = %dir.display(), removed, "chunk cache: removed interrupted writes");
        }
        if !format_matches(dir, unit) {
            let dropped = remove_image_dirs(dir)?;
            if dropped > 0 {
                tracing::info!(dir = %dir.display(), unit, "chunk cache: unit changed or format unknown, dropped all entries");
            }
            write_format(dir, unit)?;
        }

        let mut found = scan_entries(dir, unit)?;
        found.sort_by_key(|&(mtime, key, _)| (mtime, key));
        let mut index = Index::default();
        for (mtime, key, len) in found {
            let tick = mtime.max(index.last_tick + 1);
            index.last_tick = tick;
            index.insert(key, len, tick);
        }
        let cache = ChunkCache {
            dir: dir.to_path_buf(),
            capacity: capacity_bytes,
            unit,
            index: Mutex::new(index),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            tmp_seq: AtomicU64::new(0),
            _lock: lock,
        };
        {
            let mut index = cache.lock();
            cache.evict(&mut index);
        }
        // Evictions at open are capacity changes, not cache pressure.
        cache.evictions.store(0, Ordering::Relaxed);
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn unit(&self) -> u64 {
        self.unit
    }

    /// The whole entry at (image, offset), verified; `None` on a miss or a damaged entry.
    /// One open, one vectored read of header and data straight into the returned buffer (no
    /// zero fill), one CRC pass.
    pub fn get(&self, image: u64, offset: u64) -> Result<Option<Vec<u8>>> {
        let Some(entry) = self.open_entry((image, offset))? else {
            return Ok(None);
        };
        match read_whole(&entry, self.unit) {
            Ok(data) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Ok(Some(data))
            }
            Err(reason) => {
                self.drop_damaged(&entry, &reason);
                Ok(None)
            }
        }
    }

    /// The whole entry at (image, offset), verified, read with O_DIRECT where possible (see
    /// [`load_run`](Self::load_run)); `None` on a miss or a damaged entry.
    pub fn load(&self, image: u64, offset: u64) -> Result<Option<EntryData>> {
        let len = self.lock().entries.get(&(image, offset)).map(|s| s.len);
        match len {
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
            Some(len) => Ok(self.load_run(image, &[(offset, len)])?.pop()),
        }
    }

    /// Loads the entries `(offset, length)` of `image` in order into one buffer, back to back
    /// (each a view of it, see [`EntryData::join`]), each verified; stops at the first one that
    /// is missing, of another length or damaged, and after one whose length is not a multiple
    /// of 4 KiB (the next could not follow it in an O_DIRECT read). The files are read with
    /// O_DIRECT where the filesystem takes it: the SSD writes data and trailer straight into
    /// the buffer, no page-cache copy.
    pub fn load_run(&self, image: u64, entries: &[(u64, u64)]) -> Result<Vec<EntryData>> {
        let total: u64 = entries.iter().map(|&(_, l)| l).sum();
        if entries.is_empty() || total == 0 {
            return Ok(Vec::new());
        }
        let tail = (CHUNK_HEADER_LEN as usize + 1).next_multiple_of(DIRECT_ALIGN);
        let mut buf = Buf::aligned((total as usize).next_multiple_of(DIRECT_ALIGN) + tail);
        let mut placed: Vec<(usize, usize)> = Vec::new();
        let mut pos = 0usize;
        for &(offset, want_len) in entries {
            let Some(entry) = self.open_entry_with((image, offset), true)? else {
                break;
            };
            if entry.len != want_len {
                break;
            }
            let len = entry.len as usize;
            let want = len + CHUNK_HEADER_LEN as usize;
            // Data, trailer, and a spare block that shows a longer file.
            let ask = (want + 1).next_multiple_of(DIRECT_ALIGN);
            let read = match buf.pread(&entry.file, pos, ask, 0) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // O_DIRECT refused (alignment): the same read, buffered.
                    File::open(&entry.path)
                        .and_then(|f| buf.pread(&f, pos, ask, 0))
                        .map_err(|e| format!("read error: {e}"))
                }
                Err(e) => Err(format!("read error: {e}")),
                Ok(n) => Ok(n),
            };
            let checked = read.and_then(|n| {
                if n != want {
                    return Err(if n < want {
                        "truncated".to_string()
                    } else {
                        format!("file is longer than {want} bytes")
                    });
                }
                let bytes = &buf.bytes()[pos..pos + want];
                let trailer: &[u8; CHUNK_HEADER_LEN as usize] =
                    bytes[len..].try_into().expect("64 bytes");
                let expected = check_header(trailer, entry.key, self.unit, entry.len)?;
                let crc = crc32c::crc32c(&bytes[..len]);
                if crc != expected {
                    return Err(format!(
                        "data checksum mismatch (recorded {expected:08x}, computed {crc:08x})"
                    ));
                }
                Ok(())
            });
            if let Err(reason) = checked {
                self.drop_damaged(&entry, &reason);
                break;
            }
            self.hits.fetch_add(1, Ordering::Relaxed);
            placed.push((pos, len));
            pos += len;
            if !len.is_multiple_of(DIRECT_ALIGN) {
                break;
            }
        }
        let buf = std::sync::Arc::new(buf);
        Ok(placed
            .into_iter()
            .map(|(start, len)| EntryData {
                buf: buf.clone(),
                start,
                len,
            })
            .collect())
    }

    /// Copies the entry's bytes from `within` (an offset inside the unit) into `buf`, after
    /// verifying the whole entry. Returns the number of bytes copied (0 when `within` is at
    /// or past the entry's end), or `None` on a miss or a damaged entry, in which case the
    /// contents of `buf` are unspecified.
    pub fn read(
        &self,
        image: u64,
        offset: u64,
        within: u64,
        buf: &mut [u8],
    ) -> Result<Option<usize>> {
        let Some(entry) = self.open_entry((image, offset))? else {
            return Ok(None);
        };
        Ok(self.finish_read(entry, within, buf))
    }

    /// Stores `data` as the entry at (image, offset), replacing any previous one, and evicts
    /// the least recently used entries beyond the capacity. `data` must be 1..=unit bytes
    /// long. A no-op when the cache is disabled or the entry
    /// alone is larger than the capacity. An error (a full or failing SSD) leaves the cache
    /// as it was; a reader should log it and carry on with the bytes it fetched.
    pub fn put(&self, image: u64, offset: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        if data.is_empty() || len > self.unit {
            return Err(invalid(
                format!("chunk cache entry (image {image}, offset {offset})"),
                format!("length {len} is not in 1..={}", self.unit),
            ));
        }
        if CHUNK_HEADER_LEN + len > self.capacity {
            return Ok(());
        }
        let tmp = self.dir.join(TMP_DIR).join(format!(
            "{}.{}",
            std::process::id(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ));
        let file = match write_entry(&tmp, image, offset, self.unit, data) {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        spinfs_failpoints::fail_point!("chunk_cache.entry_synced");
        let image_dir = self.image_dir(image);
        let path = self.entry_path(image, offset);
        let mut index = self.lock();
        let placed = match fs::create_dir(&image_dir) {
            Err(e) if e.kind() != ErrorKind::AlreadyExists => {
                Err(io_err("create directory", &image_dir)(e))
            }
            _ => fs::rename(&tmp, &path).map_err(io_err("rename into", &path)),
        };
        if let Err(e) = placed {
            drop(index);
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        spinfs_failpoints::fail_point!("chunk_cache.entry_placed");
        let tick = index.tick();
        index.insert((image, offset), len, tick);
        set_mtime(&file, &path, tick);
        self.evict(&mut index);
        Ok(())
    }

    /// Drops every entry of `image` (after a merge, or when the image is dropped).
    pub fn remove_image(&self, image: u64) -> Result<()> {
        let mut index = self.lock();
        let keys: Vec<Key> = index
            .entries
            .range((image, 0)..=(image, u64::MAX))
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            index.remove(key);
        }
        let dir = self.image_dir(image);
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(io_err("remove", &dir)(e)),
            _ => Ok(()),
        }
    }

    pub fn stats(&self) -> CacheStats {
        let (bytes, entries) = {
            let index = self.lock();
            (index.bytes, index.entries.len() as u64)
        };
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            bytes,
            entries,
            evictions: self.evictions.load(Ordering::Relaxed),
            corrupt: self.corrupt.load(Ordering::Relaxed),
        }
    }

    /// Reads and checks every entry (for fsck) without changing recency or counters.
    pub fn verify_all(&self) -> Vec<ChunkProblem> {
        self.find_problems()
            .into_iter()
            .map(|(problem, _)| problem)
            .collect()
    }

    /// Drops every damaged entry (counted as `corrupt`); returns what was dropped.
    pub fn repair(&self) -> Vec<ChunkProblem> {
        let problems = self.find_problems();
        let mut index = self.lock();
        let dropped: Vec<ChunkProblem> = problems
            .into_iter()
            .filter(|(p, generation)| {
                self.drop_if_current(&mut index, (p.image, p.offset), *generation)
            })
            .map(|(problem, _)| problem)
            .collect();
        self.corrupt
            .fetch_add(dropped.len() as u64, Ordering::Relaxed);
        dropped
    }

    fn find_problems(&self) -> Vec<(ChunkProblem, u64)> {
        let keys: Vec<(Key, u64)> = self
            .lock()
            .entries
            .iter()
            .map(|(k, s)| (*k, s.generation))
            .collect();
        let mut problems = Vec::new();
        for (key, generation) in keys {
            let problem = |reason: String| ChunkProblem {
                path: self.entry_path(key.0, key.1),
                image: key.0,
                offset: key.1,
                reason,
            };
            let entry = {
                let index = self.lock();
                match index.entries.get(&key) {
                    Some(slot) if slot.generation == generation => {
                        match self.open_file(key, slot) {
                            Ok(entry) => entry,
                            Err(reason) => {
                                problems.push((problem(reason), generation));
                                continue;
                            }
                        }
                    }
                    // Replaced or removed since the listing: nothing to check.
                    _ => continue,
                }
            };
            if let Err(reason) = self.check_entry(&entry, 0, &mut []) {
                problems.push((problem(reason), generation));
            }
        }
        problems
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        // The index is consistent between statements that can fail, so a panic elsewhere
        // while holding the lock leaves nothing half-updated worth refusing to serve.
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the recency of entries hit since the last call into their files' mtimes (see
    /// the module documentation); returns how many were written. Failures only make recency
    /// after a restart less exact.
    pub fn flush_recency(&self) -> usize {
        let pending: Vec<(Key, u64)> = {
            let mut index = self.lock();
            let keys = std::mem::take(&mut index.unsynced);
            keys.into_iter()
                .filter_map(|k| index.entries.get(&k).map(|s| (k, s.tick)))
                .collect()
        };
        for &((image, offset), tick) in &pending {
            set_mtime_path(&self.entry_path(image, offset), tick);
        }
        pending.len()
    }

    /// Entries hit whose recency is not yet written (see [`flush_recency`](Self::flush_recency)).
    pub fn unsynced_recency(&self) -> usize {
        self.lock().unsynced.len()
    }

    fn drop_damaged(&self, entry: &OpenEntry, reason: &str) {
        tracing::warn!(path = %entry.path.display(), %reason, "chunk cache: damaged entry dropped");
        self.corrupt.fetch_add(1, Ordering::Relaxed);
        self.misses.fetch_add(1, Ordering::Relaxed);
        let mut index = self.lock();
        self.drop_if_current(&mut index, entry.key, entry.generation);
    }

    fn image_dir(&self, image: u64) -> PathBuf {
        self.dir.join(format!("i{image:016x}"))
    }

    fn entry_path(&self, image: u64, offset: u64) -> PathBuf {
        self.image_dir(image).join(format!("{offset:016x}"))
    }

    fn evict(&self, index: &mut Index) {
        while index.bytes > self.capacity {
            let Some(key) = index.oldest() else { break };
            index.remove(key);
            let path = self.entry_path(key.0, key.1);
            if let Err(e) = fs::remove_file(&path)
                && e.kind() != ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %e, "chunk cache: cannot remove evicted entry");
            }
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Looks the key up and opens its file under the lock, counting a miss if absent.
    fn open_entry(&self, key: Key) -> Result<Option<OpenEntry>> {
        self.open_entry_with(key, false)
    }

    fn open_entry_with(&self, key: Key, direct: bool) -> Result<Option<OpenEntry>> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut index = self.lock();
        let opened = match index.entries.get(&key) {
            None => None,
            Some(slot) => {
                let path = self.entry_path(key.0, key.1);
                let mut options = OpenOptions::new();
                options.read(true);
                if direct {
                    options.custom_flags(libc::O_DIRECT);
                }
                let file = match options.open(&path) {
                    Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => File::open(&path),
                    other => other,
                };
                match file {
                    Ok(file) => Some(OpenEntry {
                        file,
                        path,
                        key,
                        len: slot.len,
                        generation: slot.generation,
                    }),
                    Err(e) if e.kind() == ErrorKind::NotFound => {
                        tracing::warn!(path = %path.display(), "chunk cache: entry file vanished");
                        index.remove(key);
                        None
                    }
                    Err(e) => return Err(io_err("open", &path)(e)),
                }
            }
        };
        match opened {
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
            Some(entry) => {
                if index.touch(key).is_some() {
                    index.unsynced.insert(key);
                }
                Ok(Some(entry))
            }
        }
    }

    fn open_file(&self, key: Key, slot: &Slot) -> std::result::Result<OpenEntry, String> {
        let path = self.entry_path(key.0, key.1);
        match File::open(&path) {
            Ok(file) => Ok(OpenEntry {
                file,
                path,
                key,
                len: slot.len,
                generation: slot.generation,
            }),
            Err(e) => Err(format!("cannot open: {e}")),
        }
    }

    /// Verifies an opened entry while copying into `buf`; drops it and counts a miss if it
    /// is damaged.
    fn finish_read(&self, entry: OpenEntry, within: u64, buf: &mut [u8]) -> Option<usize> {
        match self.check_entry(&entry, within, buf) {
            Ok(n) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(n)
            }
            Err(reason) => {
                self.drop_damaged(&entry, &reason);
                None
            }
        }
    }

    /// Removes `key` if its index entry is still the file `generation` named.
    fn drop_if_current(&self, index: &mut Index, key: Key, generation: u64) -> bool {
        match index.entries.get(&key) {
            Some(slot) if slot.generation == generation => {
                index.remove(key);
                let path = self.entry_path(key.0, key.1);
                if let Err(e) = fs::remove_file(&path)
                    && e.kind() != ErrorKind::NotFound
                {
                    tracing::warn!(path = %path.display(), error = %e, "chunk cache: cannot remove damaged entry");
                }
                true
            }
            _ => false,
        }
    }

    /// Checks header, length and data CRC of an entry, copying data from `within` into `buf`
    /// on the way. Returns the number of bytes copied, or why the entry is damaged.
    fn check_entry(
        &self,
        entry: &OpenEntry,
        within: u64,
        buf: &mut [u8],
    ) -> std::result::Result<usize, String> {
        let file_len = entry
            .file
            .metadata()
            .map_err(|e| format!("cannot stat: {e}"))?
            .len();
        if file_len != CHUNK_HEADER_LEN + entry.len {
            return Err(format!(
                "file is {file_len} bytes, expected {}",
                CHUNK_HEADER_LEN + entry.len
            ));
        }
        let mut trailer = [0u8; CHUNK_HEADER_LEN as usize];
        read_at(&entry.file, &mut trailer, entry.len)?;
        let expected_crc = check_header(&trailer, entry.key, self.unit, entry.len)?;

        let len = entry.len;
        let start = within.min(len);
        let n = (len - start).min(buf.len() as u64);
        let mut crc = 0u32;
        let mut scratch = Vec::new();
        let mut through_scratch = |from: u64, to: u64, crc: &mut u32| {
            let mut pos = from;
            while pos < to {
                let piece = (to - pos).min(SCRATCH as u64) as usize;
                scratch.resize(piece, 0);
                read_at(&entry.file, &mut scratch, pos)?;
                *crc = crc32c::crc32c_append(*crc, &scratch);
                pos += piece as u64;
            }
            Ok::<(), String>(())
        };
        through_scratch(0, start, &mut crc)?;
        let direct = &mut buf[..n as usize];
        read_at(&entry.file, direct, start)?;
        crc = crc32c::crc32c_append(crc, direct);
        through_scratch(start + n, len, &mut crc)?;
        if crc != expected_crc {
            return Err(format!(
                "data checksum mismatch (recorded {expected_crc:08x}, computed {crc:08x})"
            ));
        }
        Ok(n as usize)
    }
}

impl Drop for ChunkCache {
    /// Writes the recency of entries hit since the last flush.
    fn drop(&mut self) {
        self.flush_recency();
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn mtime_ns(meta: &fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Mirrors the recency tick into the mtime of the file at `path`.
fn set_mtime_path(path: &Path, tick: u64) {
    let Ok(cpath) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    let ts = libc::timespec {
        tv_sec: (tick / 1_000_000_000) as libc::time_t,
        tv_nsec: (tick % 1_000_000_000) as libc::c_long,
    };
    let times = [ts, ts];
    // SAFETY: a NUL-terminated path and two timespecs that outlive the call.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, cpath.as_ptr(), times.as_ptr(), 0) };
    if rc != 0 {
        tracing::debug!(path = %path.display(), error = %std::io::Error::last_os_error(), "chunk cache: cannot set mtime");
    }
}

/// Bytes read from the cache (or handed in): a view of a shared, immutable buffer, cheap to
/// clone. Several entries loaded together ([`ChunkCache::load_run`]) are views of one buffer,
/// back to back, so a caller can serve a range spanning them without copying
/// ([`EntryData::join`]). Derefs to the bytes.
#[derive(Clone)]
pub struct EntryData {
    buf: std::sync::Arc<Buf>,
    start: usize,
    len: usize,
}

/// A 4 KiB-aligned allocation (O_DIRECT reads land in it) or a vector.
struct Buf {
    ptr: std::ptr::NonNull<u8>,
    cap: usize,
    vec: Vec<u8>,
}

// SAFETY: Buf owns its allocation exclusively, like a Vec<u8>, and is never written once
// shared (only through the unique owner while loading).
unsafe impl Send for Buf {}
// SAFETY: shared access only reads.
unsafe impl Sync for Buf {}

const DIRECT_ALIGN: usize = 4096;

impl Buf {
    /// An uninitialised aligned buffer of `cap` bytes (a multiple of `DIRECT_ALIGN`).
    fn aligned(cap: usize) -> Buf {
        let layout = std::alloc::Layout::from_size_align(cap, DIRECT_ALIGN).expect("layout");
        // SAFETY: non-zero size; bytes are only exposed after the kernel wrote them.
        let raw = unsafe { std::alloc::alloc(layout) };
        let ptr =
            std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Buf {
            ptr,
            cap,
            vec: Vec::new(),
        }
    }

    fn bytes(&self) -> &[u8] {
        if self.cap == 0 {
            return &self.vec;
        }
        // SAFETY: callers only view ranges the kernel wrote (checked by `load_run`).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.cap) }
    }

    /// Reads the file at `at` into `self[pos..pos + len]`; returns bytes read (short at the
    /// end of the file).
    fn pread(&mut self, file: &File, pos: usize, len: usize, at: u64) -> std::io::Result<usize> {
        assert!(
            self.cap > 0 && pos + len <= self.cap,
            "Buf::pread out of bounds"
        );
        let mut got = 0usize;
        while got < len {
            // SAFETY: pos + got + (len - got) <= cap; the kernel writes at most that.
            let n = unsafe {
                libc::pread(
                    file.as_raw_fd(),
                    self.ptr.as_ptr().add(pos + got).cast(),
                    len - got,
                    (at + got as u64) as libc::off_t,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                break;
            }
            got += n as usize;
            if !got.is_multiple_of(DIRECT_ALIGN) {
                break; // end of file (O_DIRECT reads stop short only there)
            }
        }
        Ok(got)
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if self.cap > 0 {
            let layout =
                std::alloc::Layout::from_size_align(self.cap, DIRECT_ALIGN).expect("layout");
            // SAFETY: allocated in `aligned` with this layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) }
        }
    }
}

impl EntryData {
    pub fn from_vec(vec: Vec<u8>) -> EntryData {
        let len = vec.len();
        EntryData {
            buf: std::sync::Arc::new(Buf {
                ptr: std::ptr::NonNull::dangling(),
                cap: 0,
                vec,
            }),
            start: 0,
            len,
        }
    }

    /// A view of `len` bytes of this one from `at`.
    pub fn slice(&self, at: usize, len: usize) -> EntryData {
        assert!(at + len <= self.len, "EntryData::slice out of bounds");
        EntryData {
            buf: self.buf.clone(),
            start: self.start + at,
            len,
        }
    }

    /// One view of `parts` when they are views of one buffer, back to back; else `None`.
    pub fn join(parts: &[&EntryData]) -> Option<EntryData> {
        let first = parts.first()?;
        let mut end = first.start + first.len;
        for p in &parts[1..] {
            if !std::sync::Arc::ptr_eq(&p.buf, &first.buf) || p.start != end {
                return None;
            }
            end += p.len;
        }
        Some(EntryData {
            buf: first.buf.clone(),
            start: first.start,
            len: end - first.start,
        })
    }

    /// Bytes of memory behind this view and every view of the same buffer, and an identity
    /// of that buffer (for accounting).
    pub fn buffer(&self) -> (usize, usize) {
        let b = &*self.buf;
        (
            b as *const Buf as usize,
            if b.cap > 0 { b.cap } else { b.vec.capacity() },
        )
    }
}

impl std::ops::Deref for EntryData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf.bytes()[self.start..self.start + self.len]
    }
}

impl std::fmt::Debug for EntryData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EntryData({} bytes)", self.len)
    }
}

/// Reads a whole entry (data and trailer) with one vectored read into a buffer allocated for
/// it and never zero-filled, then checks it; returns the data or why the entry is damaged.
fn read_whole(entry: &OpenEntry, unit: u64) -> std::result::Result<Vec<u8>, String> {
    let len = entry.len as usize;
    let mut trailer = [0u8; CHUNK_HEADER_LEN as usize];
    // One spare byte shows a file longer than its entry.
    let mut spare = [0u8; 1];
    let mut data: Vec<u8> = Vec::with_capacity(len);
    let want = CHUNK_HEADER_LEN as usize + len;
    let mut got = 0usize;
    while got < want + 1 {
        let mut iov = Vec::with_capacity(3);
        if got < len {
            iov.push(libc::iovec {
                // SAFETY: got < len <= capacity.
                iov_base: unsafe { data.as_mut_ptr().add(got) }.cast(),
                iov_len: len - got,
            });
        }
        if got < want {
            let t = got.saturating_sub(len);
            iov.push(libc::iovec {
                iov_base: trailer[t..].as_mut_ptr().cast(),
                iov_len: CHUNK_HEADER_LEN as usize - t,
            });
        }
        iov.push(libc::iovec {
            iov_base: spare.as_mut_ptr().cast(),
            iov_len: 1,
        });
        // SAFETY: every iovec points into `data`'s capacity, `trailer` or `spare`, all alive
        // and not otherwise borrowed during the call; the kernel writes at most iov_len each.
        let n = unsafe {
            libc::preadv(
                entry.file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                got as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("read error: {e}"));
        }
        if n == 0 {
            break;
        }
        got += n as usize;
    }
    if got != want {
        return Err(if got < want {
            "truncated".to_string()
        } else {
            format!("file is longer than {want} bytes")
        });
    }
    // SAFETY: the kernel wrote bytes 0..len of the capacity (got >= len).
    unsafe { data.set_len(len) };
    let expected_crc = check_header(&trailer, entry.key, unit, entry.len)?;
    let crc = crc32c::crc32c(&data);
    if crc != expected_crc {
        return Err(format!(
            "data checksum mismatch (recorded {expected_crc:08x}, computed {crc:08x})"
        ));
    }
    Ok(data)
}

/// Mirrors the recency tick into the file's mtime; failure only makes recency after a
/// restart less exact.
fn set_mtime(file: &File, path: &Path, tick: u64) {
    if let Err(e) = file.set_modified(UNIX_EPOCH + Duration::from_nanos(tick)) {
        tracing::debug!(path = %path.display(), error = %e, "chunk cache: cannot set mtime");
    }
}

fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::result::Result<(), String> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == ErrorKind::UnexpectedEof {
            "truncated".to_string()
        } else {
            format!("read error: {e}")
        }
    })
}

fn encode_header(key: Key, unit: u64, data: &[u8]) -> [u8; CHUNK_HEADER_LEN as usize] {
    let mut h = [0u8; CHUNK_HEADER_LEN as usize];
    h[..8].copy_from_slice(ENTRY_MAGIC);
    put_u32(&mut h, 8, VERSION);
    put_u64(&mut h, 16, key.0);
    put_u64(&mut h, 24, key.1);
    put_u64(&mut h, 32, unit);
    put_u64(&mut h, 40, data.len() as u64);
    put_u32(&mut h, 48, crc32c::crc32c(data));
    let crc = crc32c::crc32c(&h[..60]);
    put_u32(&mut h, 60, crc);
    h
}

/// Checks an entry header against what the index expects; returns the recorded data CRC.
fn check_header(
    h: &[u8; CHUNK_HEADER_LEN as usize],
    key: Key,
    unit: u64,
    len: u64,
) -> std::result::Result<u32, String> {
    if &h[..8] != ENTRY_MAGIC {
        return Err("bad magic".into());
    }
    if crc32c::crc32c(&h[..60]) != get_u32(h, 60) {
        return Err("header checksum mismatch".into());
    }
    let version = get_u32(h, 8);
    if version != VERSION {
        return Err(format!("format version {version}, expected {VERSION}"));
    }
    let found = (get_u64(h, 16), get_u64(h, 24));
    if found != key {
        return Err(format!(
            "header names image {} offset {}, expected image {} offset {}",
            found.0, found.1, key.0, key.1
        ));
    }
    if get_u64(h, 32) != unit {
        return Err(format!(
            "written with unit {}, cache unit is {unit}",
            get_u64(h, 32)
        ));
    }
    if get_u64(h, 40) != len {
        return Err(format!(
            "header records {} data bytes, file holds {len}",
            get_u64(h, 40)
        ));
    }
    Ok(get_u32(h, 48))
}

/// Writes a whole entry to `tmp` and makes its data durable; returns the still-open file.
fn write_entry(tmp: &Path, image: u64, offset: u64, unit: u64, data: &[u8]) -> Result<File> {
    let io = |op| io_err(op, tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(io("create"))?;
    file.write_all(data).map_err(io("write"))?;
    file.write_all(&encode_header((image, offset), unit, data))
        .map_err(io("write"))?;
    // Not fdatasync'ed: a cache entry is worth less than the write stall (one sync per
    // object would bound archived reads by the SSD's sync rate); the kernel's writeback and
    // dirty-page limits take it from here. An entry a crash leaves incomplete fails its
    // length or CRC check and is dropped as a miss.
    Ok(file)
}

fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err("open", &path))?;
    // SAFETY: flock on a descriptor owned by `file`, which outlives the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(CacheError::Busy(dir.to_path_buf()));
        }
        return Err(io_err("lock", &path)(e));
    }
    Ok(file)
}

/// Removes every file in `dir` (the temp directory); returns how many.
fn clear_dir(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(dir).map_err(io_err("read directory", dir))? {
        let entry = entry.map_err(io_err("read directory", dir))?;
        let path = entry.path();
        let result = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        result.map_err(io_err("remove", &path))?;
        removed += 1;
    }
    Ok(removed)
}

fn parse_hex16(name: &str) -> Option<u64> {
    if name.len() == 16 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        u64::from_str_radix(name, 16).ok()
    } else {
        None
    }
}

fn image_of_dir_name(name: &str) -> Option<u64> {
    name.strip_prefix('i').and_then(parse_hex16)
}

/// What [`inspect_dir`] found in a chunk cache directory, without changing anything.
#[derive(Debug, Clone, Default)]
pub struct ChunkInspection {
    /// Entries checked.
    pub entries: u64,
    /// Images that have entries.
    pub images: std::collections::BTreeSet<u64>,
    /// Damaged entries (header, length or data checksum).
    pub problems: Vec<ChunkProblem>,
    /// Files that cannot be entries: leftovers of interrupted writes in `tmp/`, malformed
    /// names or sizes (opening the cache removes them).
    pub leftovers: Vec<PathBuf>,
    /// The format file is missing or names another unit (opening the cache drops every
    /// entry).
    pub format_mismatch: bool,
}

/// Checks every entry of the chunk cache in `dir` (header, length, data CRC32C) without
/// taking its lock or changing anything: for `spinfs fsck` without `--repair`.
/// `progress(done, total)` is called per entry.
pub fn inspect_dir(
    dir: &Path,
    unit: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ChunkInspection> {
    let mut out = ChunkInspection {
        format_mismatch: dir.exists() && !format_matches(dir, unit),
        ..ChunkInspection::default()
    };
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err("read directory", dir)(e)),
    };
    let tmp = dir.join(TMP_DIR);
    if let Ok(list) = fs::read_dir(&tmp) {
        for e in list.flatten() {
            out.leftovers.push(e.path());
        }
    }
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("read directory", dir))?;
        let Some(image) = entry.file_name().to_str().and_then(image_of_dir_name) else {
            continue;
        };
        let image_dir = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            out.leftovers.push(image_dir);
            continue;
        }
        for e in fs::read_dir(&image_dir).map_err(io_err("read directory", &image_dir))? {
            let e = e.map_err(io_err("read directory", &image_dir))?;
            let path = e.path();
            let meta = fs::symlink_metadata(&path).map_err(io_err("stat", &path))?;
            let offset = e.file_name().to_str().and_then(parse_hex16);
            let len = meta.len().saturating_sub(CHUNK_HEADER_LEN);
            match offset {
                Some(offset) if meta.is_file() && meta.len() > CHUNK_HEADER_LEN && len <= unit => {
                    files.push((path, (image, offset), len))
                }
                _ => out.leftovers.push(path),
            }
        }
    }
    let total = files.len() as u64;
    for (i, (path, key, len)) in files.into_iter().enumerate() {
        progress(i as u64, total);
        out.entries += 1;
        out.images.insert(key.0);
        if let Err(reason) = check_entry_file(&path, key, unit, len) {
            out.problems.push(ChunkProblem {
                path,
                image: key.0,
                offset: key.1,
                reason,
            });
        }
    }
    progress(total, total);
    Ok(out)
}

/// Checks one entry file: trailer, length and data CRC32C.
fn check_entry_file(path: &Path, key: Key, unit: u64, len: u64) -> std::result::Result<(), String> {
    let file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut trailer = [0u8; CHUNK_HEADER_LEN as usize];
    read_at(&file, &mut trailer, len)?;
    let expected = check_header(&trailer, key, unit, len)?;
    let mut crc = 0u32;
    let mut buf = vec![0u8; SCRATCH];
    let mut pos = 0u64;
    while pos < len {
        let n = (len - pos).min(SCRATCH as u64) as usize;
        read_at(&file, &mut buf[..n], pos)?;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        pos += n as u64;
    }
    if crc != expected {
        return Err(format!(
            "data checksum mismatch (recorded {expected:08x}, computed {crc:08x})"
        ));
    }
    Ok(())
}

/// Removes every image directory (and nothing else: a mistaken cache path loses no data
/// that is not the cache's own); returns how many.
fn remove_image_dirs(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(dir).map_err(io_err("read directory", dir))? {
        let entry = entry.map_err(io_err("read directory", dir))?;
        let name = entry.file_name();
        if name.to_str().and_then(image_of_dir_name).is_some() {
            let path = entry.path();
            fs::remove_dir_all(&path).map_err(io_err("remove", &path))?;
            removed += 1;
        }
    }
    Ok(removed)
}

fn encode_format(unit: u64) -> [u8; FORMAT_LEN] {
    let mut b = [0u8; FORMAT_LEN];
    b[..8].copy_from_slice(FORMAT_MAGIC);
    put_u32(&mut b, 8, FORMAT_VERSION);
    put_u64(&mut b, 16, unit);
    let crc = crc32c::crc32c(&b[..28]);
    put_u32(&mut b, 28, crc);
    b
}

fn format_matches(dir: &Path, unit: u64) -> bool {
    fs::read(dir.join(FORMAT_FILE)).is_ok_and(|b| b[..] == encode_format(unit))
}

fn write_format(dir: &Path, unit: u64) -> Result<()> {
    let path = dir.join(FORMAT_FILE);
    let tmp = dir.join(TMP_DIR).join(FORMAT_FILE);
    let io = |op| io_err(op, &path);
    let mut f = File::create(&tmp).map_err(io("create"))?;
    f.write_all(&encode_format(unit)).map_err(io("write"))?;
    f.sync_all().map_err(io("sync"))?;
    fs::rename(&tmp, &path).map_err(io("rename into"))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync", dir))?;
    Ok(())
}

/// Lists plausible entries as (mtime ns, key, data length); removes what cannot be one.
/// Contents are checked when an entry is read.
fn scan_entries(dir: &Path, unit: u64) -> Result<Vec<(u64, Key, u64)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("read directory", dir))? {
        let entry = entry.map_err(io_err("read directory", dir))?;
        let Some(image) = entry.file_name().to_str().and_then(image_of_dir_name) else {
            continue;
        };
        let image_dir = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            fs::remove_file(&image_dir).map_err(io_err("remove", &image_dir))?;
            continue;
        }
        let mut kept = 0usize;
        for e in fs::read_dir(&image_dir).map_err(io_err("read directory", &image_dir))? {
            let e = e.map_err(io_err("read directory", &image_dir))?;
            let path = e.path();
            let offset = e.file_name().to_str().and_then(parse_hex16);
            let meta = fs::symlink_metadata(&path).map_err(io_err("stat", &path))?;
            let len = meta.len().saturating_sub(CHUNK_HEADER_LEN);
            let plausible =
                meta.is_file() && meta.len() > CHUNK_HEADER_LEN && len <= unit && offset.is_some();
            match offset {
                Some(offset) if plausible => {
                    found.push((mtime_ns(&meta), (image, offset), len));
                    kept += 1;
                }
                _ => {
                    tracing::warn!(path = %path.display(), "chunk cache: removing malformed entry");
                    if meta.is_dir() {
                        fs::remove_dir_all(&path)
                    } else {
                        fs::remove_file(&path)
                    }
                    .map_err(io_err("remove", &path))?;
                }
            }
        }
        if kept == 0 {
            let _ = fs::remove_dir(&image_dir);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_every_bit_flip_is_caught() {
        let data = b"some archived bytes";
        let key = (7, 3 * 8192);
        let h = encode_header(key, 8192, data);
        assert_eq!(
            check_header(&h, key, 8192, data.len() as u64),
            Ok(crc32c::crc32c(data))
        );
        for i in 0..h.len() {
            for bit in 0..8 {
                let mut b = h;
                b[i] ^= 1 << bit;
                assert!(
                    check_header(&b, key, 8192, data.len() as u64).is_err(),
                    "flip at byte {i} bit {bit} accepted"
                );
            }
        }
        assert!(check_header(&h, (7, 0), 8192, data.len() as u64).is_err());
        assert!(check_header(&h, key, 4096, data.len() as u64).is_err());
        assert!(check_header(&h, key, 8192, 3).is_err());
    }

    #[test]
    fn recency_ticks_strictly_increase() {
        let mut index = Index::default();
        let mut last = 0;
        for _ in 0..1000 {
            let t = index.tick();
            assert!(t > last);
            last = t;
        }
    }

    #[test]
    fn format_file_names_the_unit() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join(TMP_DIR)).unwrap();
        assert!(!format_matches(dir.path(), 4096));
        write_format(dir.path(), 4096).unwrap();
        assert!(format_matches(dir.path(), 4096));
        assert!(!format_matches(dir.path(), 8192));
    }
}
