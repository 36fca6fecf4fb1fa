//! The read path of archived blob data in front of the SSD chunk cache, shared by every
//! archived layer of a mount:
//!
//! - a small memory cache of recently used cache units, so that a unit that the kernel asks
//!   for in several FUSE requests is read from the SSD (and CRC-checked) or fetched from the
//!   media once;
//! - single-flight fetches: concurrent requests for a unit being fetched wait for that fetch;
//! - sequential read-ahead: a request starting right after units held or in flight
//!   queues `AHEAD_RUNS` runs of units in the background (each from the SSD cache while it has
//!   them, the rest from the media in one read), and reaching a read-ahead run queues one
//!   more, so the SSD and the media stay busy while the reader consumes what arrived. Any
//!   other miss loads its unit only (from the media: only the objects covering it);
//! - SSD cache writes (each an fdatasync'ed file) on a background thread, off the read path.
//!   Units wait in memory until written; when the writer falls behind, read-ahead pauses and
//!   fetches wait for it, so memory stays bounded.

use crate::cache::ChunkCache;
use spinfs_media::{ImageExtents, MediumReader, ReadOptions};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// Bytes fetched from the media per read-ahead run.
const RUN_BYTES: u64 = 8 << 20;
/// Read-ahead runs kept in flight ahead of a sequential reader.
const AHEAD_RUNS: u64 = 2;
/// A request whose first unit follows one of this many units held or in flight is sequential.
const SEQUENTIAL_WINDOW: u64 = 4;
/// Memory given to recently used units (shared by all layers).
const MEMORY_BYTES: u64 = 64 << 20;
/// Unit writes waiting for the SSD cache.
const PUT_QUEUE: usize = 64;

type Key = (u64, u64);
/// A unit on its way to the SSD cache.
type Put = (Key, Arc<Vec<u8>>);

struct State {
    units: HashMap<Key, (Arc<Vec<u8>>, u64)>,
    lru: BTreeMap<u64, Key>,
    tick: u64,
    inflight: HashSet<Key>,
    /// First units of read-ahead runs: reaching one extends the read-ahead.
    triggers: HashSet<Key>,
}

/// See the module documentation.
pub struct UnitCache {
    chunks: Arc<ChunkCache>,
    unit: u64,
    capacity: usize,
    run_units: u64,
    st: Mutex<State>,
    cv: Condvar,
    puts: Mutex<Option<SyncSender<Put>>>,
    /// Units handed to the writer and not written yet: read-ahead pauses while it is high.
    pending_puts: Arc<AtomicUsize>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// Where the units of one blob come from.
#[derive(Clone)]
pub struct BlobSource {
    pub extents: ImageExtents,
    pub reader: Arc<MediumReader>,
    pub timeout: Option<Duration>,
}

impl BlobSource {
    fn fetch(&self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        let opts = ReadOptions {
            timeout: self.timeout,
            ..ReadOptions::default()
        };
        self.reader
            .read(&self.extents, offset, len, opts)
            .map_err(std::io::Error::other)
    }
}

impl UnitCache {
    pub fn new(chunks: Arc<ChunkCache>) -> Arc<UnitCache> {
        let unit = chunks.unit().max(1);
        let (tx, rx) = sync_channel::<Put>(PUT_QUEUE);
        let writer_chunks = chunks.clone();
        let pending_puts = Arc::new(AtomicUsize::new(0));
        let pending = pending_puts.clone();
        let writer = std::thread::Builder::new()
            .name("spinfs-cache-put".into())
            .spawn(move || {
                for ((blob, offset), data) in rx {
                    if let Err(e) = writer_chunks.put(blob, offset, &data) {
                        tracing::warn!("chunk cache: {e}");
                    }
                    pending.fetch_sub(1, Ordering::Relaxed);
                }
            })
            .ok();
        Arc::new(UnitCache {
            chunks,
            unit,
            capacity: (MEMORY_BYTES / unit).max(4) as usize,
            run_units: (RUN_BYTES / unit).max(1),
            st: Mutex::new(State {
                units: HashMap::new(),
                lru: BTreeMap::new(),
                tick: 0,
                inflight: HashSet::new(),
                triggers: HashSet::new(),
            }),
            cv: Condvar::new(),
            puts: Mutex::new(writer.as_ref().map(|_| tx)),
            pending_puts,
            writer: Mutex::new(writer),
        })
    }

    pub fn unit(&self) -> u64 {
        self.unit
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The unit of `src` starting at `start` (a multiple of the unit), whole. `first` says
    /// whether it is the first unit of a request: only a request that starts where an earlier
    /// one left off makes the reader sequential (a large random request does not).
    pub fn get(
        self: &Arc<Self>,
        src: &BlobSource,
        start: u64,
        first: bool,
    ) -> std::io::Result<Arc<Vec<u8>>> {
        let blob = src.extents.image.id;
        let key = (blob, start);
        let len = self.unit.min(src.extents.length.saturating_sub(start));
        if len == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("read past the end of blob {blob}"),
            ));
        }
        {
            let mut st = self.lock();
            loop {
                if let Some(data) = touch(&mut st, key) {
                    let extend = st.triggers.remove(&key);
                    drop(st);
                    if extend {
                        self.read_ahead(src, start);
                    }
                    return Ok(data);
                }
                if !st.inflight.contains(&key) {
                    break;
                }
                st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            st.inflight.insert(key);
        }
        // A reader that goes on from the unit before gets read-ahead.
        // The kernel's read-ahead requests arrive out of order on several threads: one of the
        // few units before this one is enough.
        let sequential = first && {
            let st = self.lock();
            (1..=SEQUENTIAL_WINDOW)
                .filter_map(|i| start.checked_sub(i * self.unit))
                .any(|at| st.units.contains_key(&(blob, at)) || st.inflight.contains(&(blob, at)))
        };
        let data = self.load_run(src, start, 1)?;
        if sequential {
            for _ in 0..AHEAD_RUNS {
                self.read_ahead(src, start);
            }
        }
        Ok(data)
    }

    /// Loads `run` units from `start` (claimed in flight): from the SSD cache while it has
    /// them, each made available as soon as it is read, then the rest from the media in one
    /// read. Returns the first.
    fn load_run(&self, src: &BlobSource, start: u64, run: u64) -> std::io::Result<Arc<Vec<u8>>> {
        let blob = src.extents.image.id;
        let mut first = None;
        let mut i = 0;
        while i < run {
            let at = start + i * self.unit;
            let len = self.unit.min(src.extents.length.saturating_sub(at));
            let mut buf = vec![0u8; len as usize];
            match self.chunks.read(blob, at, 0, &mut buf) {
                Ok(Some(n)) if n as u64 == len && len > 0 => {}
                _ => break,
            }
            let data = Arc::new(buf);
            let mut st = self.lock();
            st.inflight.remove(&(blob, at));
            self.insert(&mut st, (blob, at), data.clone());
            self.cv.notify_all();
            drop(st);
            first.get_or_insert(data);
            i += 1;
        }
        if i < run {
            // Fetching faster than the SSD cache takes the data would only pile it up in
            // memory: wait for the writer first.
            while self.pending_puts.load(Ordering::Relaxed) as u64
                >= PUT_QUEUE as u64 + self.run_units
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            let data = self.fetch_run(src, start + i * self.unit, run - i)?;
            first.get_or_insert(data);
        }
        first.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("blob {blob}: nothing at {start}"),
            )
        })
    }

    /// Marks as in flight the run of units from `start` (claimed by the caller) up to the
    /// run length, the blob's end, or the first unit someone else has; returns its length.
    fn claim_run(&self, st: &mut State, src: &BlobSource, start: u64) -> u64 {
        let blob = src.extents.image.id;
        let mut n = 0;
        while n < self.run_units {
            let at = start + n * self.unit;
            if at >= src.extents.length {
                break;
            }
            let k = (blob, at);
            if n > 0 && (st.inflight.contains(&k) || st.units.contains_key(&k)) {
                break;
            }
            st.inflight.insert(k);
            n += 1;
        }
        n
    }

    /// Fetches `run` units from `start` (claimed in flight), keeps them, queues their cache
    /// writes, and returns the first.
    fn fetch_run(&self, src: &BlobSource, start: u64, run: u64) -> std::io::Result<Arc<Vec<u8>>> {
        let blob = src.extents.image.id;
        let end = (start + run * self.unit).min(src.extents.length);
        let fetched = src.fetch(start, end - start);
        let mut st = self.lock();
        let keys: Vec<Key> = (0..run).map(|i| (blob, start + i * self.unit)).collect();
        for k in &keys {
            st.inflight.remove(k);
        }
        let bytes = match fetched {
            Ok(b) => b,
            Err(e) => {
                self.cv.notify_all();
                return Err(e);
            }
        };
        let mut first = None;
        let mut puts = Vec::with_capacity(keys.len());
        for (i, chunk) in bytes.chunks(self.unit as usize).enumerate() {
            let data = Arc::new(chunk.to_vec());
            let k = keys[i];
            self.insert(&mut st, k, data.clone());
            if i == 0 {
                first = Some(data.clone());
            }
            puts.push((k, data));
        }
        self.cv.notify_all();
        drop(st);
        if let Some(tx) = self.puts.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            // Waits when the writer is behind: fetching faster than the SSD cache takes the
            // data would only fetch it again later.
            let mut left = puts.len();
            self.pending_puts.fetch_add(left, Ordering::Relaxed);
            for p in puts {
                if tx.send(p).is_err() {
                    break;
                }
                left -= 1;
            }
            self.pending_puts.fetch_sub(left, Ordering::Relaxed);
        }
        first.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("blob {blob}: nothing at {start}"),
            )
        })
    }

    /// Queues one more read-ahead run at the frontier after `from`: the first unit at or after
    /// it that nobody has or fetches, unless that is more than `AHEAD_RUNS` + 1 runs ahead.
    fn read_ahead(self: &Arc<Self>, src: &BlobSource, from: u64) {
        let blob = src.extents.image.id;
        // Fetching faster than the SSD cache takes the data would only pile it up in memory.
        if self.pending_puts.load(Ordering::Relaxed) as u64 >= PUT_QUEUE as u64 + self.run_units {
            return;
        }
        let limit = from + (AHEAD_RUNS + 1) * self.run_units * self.unit;
        let (start, run) = {
            let mut st = self.lock();
            let mut start = from;
            while start < src.extents.length
                && (st.inflight.contains(&(blob, start)) || st.units.contains_key(&(blob, start)))
            {
                start += self.unit;
            }
            if start >= src.extents.length || start >= limit {
                return;
            }
            let run = self.claim_run(&mut st, src, start);
            st.triggers.insert((blob, start));
            (start, run)
        };
        let this = self.clone();
        let src = src.clone();
        let spawned = std::thread::Builder::new()
            .name("spinfs-readahead".into())
            .spawn(move || {
                if let Err(e) = this.load_run(&src, start, run) {
                    tracing::debug!(blob, start, "read-ahead failed: {e}");
                    this.lock().triggers.remove(&(blob, start));
                }
            });
        if spawned.is_err() {
            let mut st = self.lock();
            for i in 0..run {
                st.inflight.remove(&(blob, start + i * self.unit));
            }
            st.triggers.remove(&(blob, start));
            self.cv.notify_all();
        }
    }

    fn insert(&self, st: &mut State, key: Key, data: Arc<Vec<u8>>) {
        st.tick += 1;
        let tick = st.tick;
        if let Some((_, old)) = st.units.insert(key, (data, tick)) {
            st.lru.remove(&old);
        }
        st.lru.insert(tick, key);
        while st.units.len() > self.capacity {
            let Some((_, k)) = st.lru.pop_first() else {
                break;
            };
            st.units.remove(&k);
            st.triggers.remove(&k);
        }
    }

    /// Forgets every unit of `blob` held in memory (the blob is no longer used).
    pub fn forget(&self, blob: u64) {
        let mut st = self.lock();
        let keys: Vec<Key> = st.units.keys().filter(|k| k.0 == blob).copied().collect();
        for k in keys {
            if let Some((_, t)) = st.units.remove(&k) {
                st.lru.remove(&t);
            }
            st.triggers.remove(&k);
        }
    }
}

fn touch(st: &mut State, key: Key) -> Option<Arc<Vec<u8>>> {
    st.tick += 1;
    let tick = st.tick;
    let (data, t) = st.units.get_mut(&key)?;
    let old = std::mem::replace(t, tick);
    let data = data.clone();
    st.lru.remove(&old);
    st.lru.insert(tick, key);
    Some(data)
}

impl UnitCache {
    /// Writes what is queued for the SSD cache and stops the writer: later units are not
    /// written to the SSD cache. For a daemon about to exit while other threads still hold
    /// the cache (the process would otherwise end in the middle of a cache write).
    pub fn flush_and_stop(&self) {
        self.puts.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = w.join();
        }
    }
}

impl Drop for UnitCache {
    /// Writes what is queued for the SSD cache before going.
    fn drop(&mut self) {
        self.flush_and_stop();
    }
}
