//! The read path of archived blob data in front of the SSD chunk cache, shared by every
//! archived layer of a mount:
//!
//! - units follow the media: a unit is the part of one media object that belongs to the blob
//!   (the object size, shorter at an extent's end, e.g. the last object of a container), keyed
//!   by the image offset where it starts, so loading a unit never needs two objects, whatever
//!   container the blob continued in;
//! - a memory cache of recently used units (`MEMORY_BYTES`), so that a unit the kernel asks
//!   for in several FUSE requests is read from the SSD (and CRC-checked) or fetched from the
//!   media once;
//! - single-flight loads: concurrent requests for a unit being loaded wait for that load; the
//!   missing units of one request are loaded together (from the SSD cache while it has them,
//!   the rest from the media in one read);
//! - sequential read-ahead: a request that misses units and starts where a recent request of
//!   the same blob ended (within a unit: readers through direct I/O ask for exactly what the
//!   application reads, in its order) queues `AHEAD_RUNS` runs of units (`RUN_BYTES` each) for a fixed pool of
//!   `AHEAD_WORKERS` threads (each run from the SSD cache while it has them, the rest from the
//!   media in one read), and reaching a read-ahead run queues one more, so the SSD and the
//!   media stay busy while the reader consumes what arrived. Any other miss loads only the
//!   units it needs (from the media: only the objects covering them);
//! - SSD cache writes (each an fdatasync'ed file) on one background thread, off the read path,
//!   which also writes the chunk cache's recency when idle. Units wait in memory until
//!   written; at most `PUT_BYTES` may wait: beyond that read-ahead pauses and media fetches
//!   wait for the writer, so memory stays bounded (memory cache + `PUT_BYTES` + one run per
//!   worker).

use crate::cache::{ChunkCache, EntryData};
use spinfs_media::{ImageExtents, MediumReader, ReadOptions};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::{Error, ErrorKind};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// Bytes fetched per read-ahead run.
const RUN_BYTES: u64 = 4 << 20;
/// Read-ahead runs kept queued or in flight ahead of a sequential reader (the window is
/// `AHEAD_RUNS` + 1 runs, well inside `MEMORY_BYTES`, so read-ahead is not evicted unread).
const AHEAD_RUNS: u64 = 8;
/// Threads loading read-ahead runs (shared by all readers of the mount): several runs load
/// from the SSD cache at once (its reads are synchronous, so this is the SSD's queue depth;
/// each thread also checks CRCs between its reads, so there are more threads than the queue
/// depth the SSD needs: 8 reads a warm file about 10% faster than 4 did on the bench VM).
const AHEAD_WORKERS: usize = 8;
/// Units read from the SSD cache per call, back to back in one buffer: made available to
/// readers as each group arrives.
const SSD_GROUP: usize = 8;
/// Recent request ends remembered to recognise sequential readers (streams).
const STREAMS: usize = 16;
/// Memory given to recently used units (shared by all layers).
const MEMORY_BYTES: u64 = 64 << 20;
/// Bytes of units waiting for the SSD cache writer.
const PUT_BYTES: u64 = 32 << 20;

type Key = (u64, u64);
/// First recency tick of units in use (see `State::tick`).
const HOT: u64 = 1 << 62;
/// The bytes of one unit (as read from the SSD cache, or fetched): a view of the buffer of
/// the load or fetch that brought it, shared with the units loaded with it.
pub type Unit = EntryData;

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
            .map_err(Error::other)
    }

    fn blob(&self) -> u64 {
        self.extents.image.id
    }

    /// The unit holding image offset `pos`: (start, length), the part of the media object
    /// of `object_size` bytes covering `pos` that belongs to this blob.
    fn span(&self, pos: u64, object_size: u64) -> std::io::Result<(u64, u64)> {
        let ex = &self.extents.extents;
        let i = ex.partition_point(|e| e.image_offset.saturating_add(e.length) <= pos);
        let Some(e) = ex
            .get(i)
            .filter(|e| e.image_offset <= pos && pos < self.extents.length)
        else {
            return Err(Error::new(
                ErrorKind::UnexpectedEof,
                format!("blob {}: no extent holds offset {pos}", self.blob()),
            ));
        };
        let d = e.offset + (pos - e.image_offset);
        let object = d - d % object_size;
        let first = object.max(e.offset);
        let end = (object + object_size)
            .min(e.offset + e.length)
            .min(e.offset + (self.extents.length - e.image_offset));
        Ok((e.image_offset + (first - e.offset), end - first))
    }
}

/// Counters of the unit cache (for status and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnitStats {
    /// Bytes of units held in memory.
    pub memory_bytes: u64,
    /// Bytes of units waiting for the SSD cache writer, now and at most since start.
    pub pending_put_bytes: u64,
    pub peak_pending_put_bytes: u64,
    /// Read-ahead runs queued since start.
    pub ahead_runs: u64,
}

/// A read-ahead run: units claimed in flight, contiguous.
struct Job {
    src: BlobSource,
    units: Vec<(u64, u64)>,
}

struct State {
    units: HashMap<Key, (Unit, u64)>,
    lru: BTreeMap<u64, Key>,
    /// Memory of the buffers behind the units held (a buffer counts until its last unit
    /// goes): buffer identity -> (units held, bytes).
    buffers: HashMap<usize, (usize, usize)>,
    bytes: u64,
    /// Recency: units used are ticked from `HOT`; units a sequential reader has gone past
    /// are ticked below it (evicted first, oldest first), so read-ahead that has not been
    /// read yet outlives what has been.
    tick: u64,
    cold_tick: u64,
    inflight: HashSet<Key>,
    /// First units of read-ahead runs: reaching one extends the read-ahead.
    triggers: HashSet<Key>,
    /// Ends of recent requests (blob, image offset), most recent last.
    streams: VecDeque<Key>,
    jobs: VecDeque<Job>,
    puts: VecDeque<(Key, Unit)>,
    put_bytes: u64,
    peak_put_bytes: u64,
    ahead_runs: u64,
    closing: bool,
}

struct Shared {
    chunks: Arc<ChunkCache>,
    /// Threads running: read-ahead is queued only to workers, writes only to a writer.
    workers: std::sync::atomic::AtomicUsize,
    writer_running: std::sync::atomic::AtomicBool,
    /// The media object size: the largest unit.
    unit: u64,
    run_bytes: u64,
    st: Mutex<State>,
    /// Units arrived (or loads failed).
    arrived: Condvar,
    /// Read-ahead jobs queued, or closing.
    work: Condvar,
    /// Puts queued, put space freed, or closing.
    put_cv: Condvar,
}

/// See the module documentation.
pub struct UnitCache {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl UnitCache {
    pub fn new(chunks: Arc<ChunkCache>) -> Arc<UnitCache> {
        let unit = chunks.unit().max(1);
        let shared = Arc::new(Shared {
            chunks,
            workers: std::sync::atomic::AtomicUsize::new(0),
            writer_running: std::sync::atomic::AtomicBool::new(false),
            unit,
            run_bytes: RUN_BYTES.max(unit),
            st: Mutex::new(State {
                units: HashMap::new(),
                lru: BTreeMap::new(),
                buffers: HashMap::new(),
                bytes: 0,
                tick: HOT,
                cold_tick: 0,
                inflight: HashSet::new(),
                triggers: HashSet::new(),
                streams: VecDeque::new(),
                jobs: VecDeque::new(),
                puts: VecDeque::new(),
                put_bytes: 0,
                peak_put_bytes: 0,
                ahead_runs: 0,
                closing: false,
            }),
            arrived: Condvar::new(),
            work: Condvar::new(),
            put_cv: Condvar::new(),
        });
        let mut threads = Vec::new();
        let s = shared.clone();
        match std::thread::Builder::new()
            .name("spinfs-cache-put".into())
            .spawn(move || s.writer())
        {
            Ok(t) => {
                threads.push(t);
                shared.writer_running.store(true, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!("chunk cache writer thread: {e}"),
        }
        for i in 0..AHEAD_WORKERS {
            let s = shared.clone();
            match std::thread::Builder::new()
                .name(format!("spinfs-ahead-{i}"))
                .spawn(move || s.worker())
            {
                Ok(t) => {
                    threads.push(t);
                    shared.workers.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::warn!("read-ahead thread: {e}"),
            }
        }
        Arc::new(UnitCache {
            shared,
            threads: Mutex::new(threads),
        })
    }

    /// The largest unit (the media object size).
    pub fn unit(&self) -> u64 {
        self.shared.unit
    }

    /// How far ahead of a reader read-ahead may go (callers bound it by their file's end).
    pub fn ahead_window(&self) -> u64 {
        (AHEAD_RUNS + 1) * self.shared.run_bytes
    }

    pub fn stats(&self) -> UnitStats {
        let st = self.shared.lock();
        UnitStats {
            memory_bytes: st.bytes,
            pending_put_bytes: st.put_bytes,
            peak_pending_put_bytes: st.peak_put_bytes,
            ahead_runs: st.ahead_runs,
        }
    }

    /// Copies the blob's bytes from `offset` into `buf` (all of it: reading past the blob's
    /// end is an error).
    /// Read-ahead never goes past `ahead_limit` (the end of the reader's file in the blob).
    pub fn read(
        &self,
        src: &BlobSource,
        offset: u64,
        buf: &mut [u8],
        ahead_limit: u64,
    ) -> std::io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let units = self
            .shared
            .units_for(src, offset, buf.len() as u64, ahead_limit)?;
        let mut done = 0usize;
        for (start, data) in units {
            let pos = offset + done as u64;
            let within = (pos - start) as usize;
            let n = (buf.len() - done).min(data.len().saturating_sub(within));
            if n == 0 {
                return Err(past_end(src, pos));
            }
            buf[done..done + n].copy_from_slice(&data[within..within + n]);
            done += n;
        }
        if done < buf.len() {
            return Err(past_end(src, offset + done as u64));
        }
        Ok(())
    }

    /// The bytes `[offset, offset + len)` of the blob as one view of a loaded buffer, when
    /// the units holding them were loaded together (one unit, or units of one read-ahead run
    /// or fetch, back to back): the caller replies from it without a copy. `None` otherwise.
    pub fn read_joined(
        &self,
        src: &BlobSource,
        offset: u64,
        len: u64,
        ahead_limit: u64,
    ) -> std::io::Result<Option<Unit>> {
        if len == 0 {
            return Ok(None);
        }
        let units = self.shared.units_for(src, offset, len, ahead_limit)?;
        let parts: Vec<&Unit> = units.iter().map(|(_, u)| u).collect();
        let Some(joined) = EntryData::join(&parts) else {
            return Ok(None);
        };
        let within = (offset - units[0].0) as usize;
        if within + len as usize > joined.len() {
            return Err(past_end(src, offset + len));
        }
        Ok(Some(joined.slice(within, len as usize)))
    }

    /// Forgets every unit of `blob` held in memory (the blob is no longer used).
    pub fn forget(&self, blob: u64) {
        let mut st = self.shared.lock();
        let keys: Vec<Key> = st.units.keys().filter(|k| k.0 == blob).copied().collect();
        for k in keys {
            if let Some((data, t)) = st.units.remove(&k) {
                st.lru.remove(&t);
                release(&mut st, &data);
            }
            st.triggers.remove(&k);
        }
    }
}

fn past_end(src: &BlobSource, pos: u64) -> Error {
    Error::new(
        ErrorKind::UnexpectedEof,
        format!("read past the end of blob {} at {pos}", src.blob()),
    )
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The units covering `[offset, offset + len)`, in order, loaded (see the module
    /// documentation).
    fn units_for(
        &self,
        src: &BlobSource,
        offset: u64,
        len: u64,
        ahead_limit: u64,
    ) -> std::io::Result<Vec<(u64, Unit)>> {
        let blob = src.blob();
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= src.extents.length)
            .ok_or_else(|| past_end(src, offset.saturating_add(len)))?;
        let mut spans = Vec::new();
        let mut pos = offset;
        while pos < end {
            let (start, ulen) = src.span(pos, self.unit)?;
            spans.push((start, ulen));
            pos = start + ulen;
        }
        let mut got: Vec<Option<Unit>> = vec![None; spans.len()];
        let mut mine = Vec::new();
        let mut extend = Vec::new();
        let mut missing = false;
        let sequential;
        {
            let mut st = self.lock();
            // A stream: this request starts where a recent one of the blob ended.
            let near = |e: u64| offset.abs_diff(e) <= self.unit;
            match st.streams.iter().position(|&(b, e)| b == blob && near(e)) {
                Some(i) => {
                    st.streams.remove(i);
                    sequential = true;
                }
                None => {
                    if st.streams.len() >= STREAMS {
                        st.streams.pop_front();
                    }
                    sequential = false;
                }
            }
            st.streams.push_back((blob, end));
            for (i, &(start, _)) in spans.iter().enumerate() {
                let k = (blob, start);
                if let Some(data) = touch(&mut st, k) {
                    if st.triggers.remove(&k) {
                        extend.push(start);
                    }
                    got[i] = Some(data);
                } else {
                    missing = true;
                    if !st.inflight.contains(&k) {
                        st.inflight.insert(k);
                        mine.push(i);
                    }
                }
            }
        }
        for &start in &extend {
            self.read_ahead(src, start, ahead_limit);
        }
        // Read-ahead first, so that it runs while this request's own units load.
        if sequential && missing {
            let last = spans[spans.len() - 1];
            for _ in 0..AHEAD_RUNS {
                self.read_ahead(src, last.0 + last.1, ahead_limit);
            }
        }
        // Load what this request claimed, in contiguous groups.
        let mut i = 0;
        while i < mine.len() {
            let mut j = i + 1;
            while j < mine.len() && mine[j] == mine[j - 1] + 1 {
                j += 1;
            }
            let group: Vec<(u64, u64)> = mine[i..j].iter().map(|&m| spans[m]).collect();
            match self.load(src, &group) {
                Ok(loaded) => {
                    for (m, data) in mine[i..j].iter().zip(loaded) {
                        got[*m] = Some(data);
                    }
                }
                Err(e) => {
                    // Release the claims of the groups not tried yet.
                    let mut st = self.lock();
                    for &m in &mine[j..] {
                        st.inflight.remove(&(blob, spans[m].0));
                    }
                    self.arrived.notify_all();
                    return Err(e);
                }
            }
            i = j;
        }
        // Wait for the units someone else was loading (or load them if that failed).
        let mut out = Vec::with_capacity(spans.len());
        for (i, &(start, ulen)) in spans.iter().enumerate() {
            let data = match got[i].take() {
                Some(d) => d,
                None => self.wait_or_load(src, start, ulen)?,
            };
            out.push((start, data));
        }
        if sequential {
            // A stream does not come back: what it has read past goes first.
            let mut st = self.lock();
            for &(start, ulen) in &spans {
                if start + ulen <= end {
                    demote(&mut st, (blob, start));
                }
            }
        }
        Ok(out)
    }

    /// A unit someone else is loading: waits for it, or loads it if that load failed.
    fn wait_or_load(&self, src: &BlobSource, start: u64, ulen: u64) -> std::io::Result<Unit> {
        let k = (src.blob(), start);
        {
            let mut st = self.lock();
            loop {
                if let Some(d) = touch(&mut st, k) {
                    return Ok(d);
                }
                if !st.inflight.contains(&k) {
                    st.inflight.insert(k);
                    break;
                }
                st = self.arrived.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        }
        let mut v = self.load(src, &[(start, ulen)])?;
        v.pop().ok_or_else(|| past_end(src, start))
    }

    /// Loads contiguous units claimed in flight: from the SSD cache while it has them (each
    /// made available as soon as it is read), then the rest from the media in one read.
    /// Releases the claims in every case.
    fn load(&self, src: &BlobSource, units: &[(u64, u64)]) -> std::io::Result<Vec<Unit>> {
        let blob = src.blob();
        let mut out: Vec<Unit> = Vec::with_capacity(units.len());
        while out.len() < units.len() {
            let group = &units[out.len()..units.len().min(out.len() + SSD_GROUP)];
            let got = self.chunks.load_run(blob, group).unwrap_or_else(|e| {
                tracing::warn!("chunk cache: {e}");
                Vec::new()
            });
            if got.is_empty() {
                break;
            }
            let mut st = self.lock();
            for data in got {
                let start = units[out.len()].0;
                st.inflight.remove(&(blob, start));
                self.insert(&mut st, (blob, start), data.clone());
                out.push(data);
            }
            self.arrived.notify_all();
        }
        if out.len() < units.len() {
            let rest = &units[out.len()..];
            match self.fetch(src, rest) {
                Ok(mut v) => out.append(&mut v),
                Err(e) => {
                    let mut st = self.lock();
                    for &(start, _) in rest {
                        st.inflight.remove(&(blob, start));
                    }
                    self.arrived.notify_all();
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// Fetches contiguous units from the media in one read, keeps them and queues their SSD
    /// cache writes. Waits first while the writer is behind: fetching faster than the SSD
    /// cache takes the data would only pile it up in memory.
    fn fetch(&self, src: &BlobSource, units: &[(u64, u64)]) -> std::io::Result<Vec<Unit>> {
        let blob = src.blob();
        {
            let mut st = self.lock();
            while st.put_bytes >= PUT_BYTES && !st.closing {
                st = self
                    .put_cv
                    .wait_timeout(st, Duration::from_millis(100))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        let first = units[0].0;
        let (last, last_len) = units[units.len() - 1];
        let bytes = EntryData::from_vec(src.fetch(first, last + last_len - first)?);
        let mut out = Vec::with_capacity(units.len());
        let mut st = self.lock();
        for &(start, ulen) in units {
            let at = (start - first) as usize;
            let data = bytes.slice(at, ulen as usize);
            let k = (blob, start);
            st.inflight.remove(&k);
            self.insert(&mut st, k, data.clone());
            if self.writer_running.load(Ordering::Relaxed) {
                st.put_bytes += ulen;
                st.puts.push_back((k, data.clone()));
            }
            out.push(data);
        }
        st.peak_put_bytes = st.peak_put_bytes.max(st.put_bytes);
        self.arrived.notify_all();
        self.put_cv.notify_all();
        Ok(out)
    }

    /// Queues one more read-ahead run at the frontier from `from`: the first unit at or after
    /// it that nobody has or loads, unless that is more than `AHEAD_RUNS` + 1 runs ahead or
    /// at `ahead_limit` (the end of the reader's file: a unit that starts before it is read
    /// whole).
    fn read_ahead(&self, src: &BlobSource, from: u64, ahead_limit: u64) {
        let blob = src.blob();
        let limit = (from + (AHEAD_RUNS + 1) * self.run_bytes).min(ahead_limit);
        if self.workers.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut st = self.lock();
        if st.put_bytes >= PUT_BYTES || st.closing {
            return;
        }
        let mut pos = from;
        let mut units = Vec::new();
        let mut bytes = 0;
        while pos < src.extents.length && pos < limit && bytes < self.run_bytes {
            let Ok((start, ulen)) = src.span(pos, self.unit) else {
                break;
            };
            let k = (blob, start);
            let taken = st.inflight.contains(&k) || st.units.contains_key(&k);
            if taken {
                if !units.is_empty() {
                    break;
                }
            } else {
                units.push((start, ulen));
                bytes += ulen;
            }
            pos = start + ulen;
        }
        if units.is_empty() {
            return;
        }
        for &(start, _) in &units {
            st.inflight.insert((blob, start));
        }
        st.triggers.insert((blob, units[0].0));
        st.ahead_runs += 1;
        st.jobs.push_back(Job {
            src: src.clone(),
            units,
        });
        self.work.notify_one();
    }

    /// A read-ahead worker: loads queued runs until the cache closes.
    fn worker(&self) {
        loop {
            let job = {
                let mut st = self.lock();
                loop {
                    if st.closing {
                        // Release what is still queued.
                        let jobs: Vec<Job> = st.jobs.drain(..).collect();
                        for job in jobs {
                            for (start, _) in job.units {
                                st.inflight.remove(&(job.src.blob(), start));
                            }
                        }
                        self.arrived.notify_all();
                        return;
                    }
                    if let Some(j) = st.jobs.pop_front() {
                        break j;
                    }
                    st = self.work.wait(st).unwrap_or_else(|p| p.into_inner());
                }
            };
            if let Err(e) = self.load(&job.src, &job.units) {
                let blob = job.src.blob();
                tracing::debug!(blob, start = job.units[0].0, "read-ahead failed: {e}");
                self.lock().triggers.remove(&(blob, job.units[0].0));
            }
        }
    }

    /// The SSD cache writer: writes queued units, and the chunk cache's recency when idle.
    fn writer(&self) {
        loop {
            let put = {
                let mut st = self.lock();
                loop {
                    if let Some(p) = st.puts.pop_front() {
                        break Some(p);
                    }
                    if st.closing {
                        break None;
                    }
                    if self.chunks.unsynced_recency() > 0 {
                        drop(st);
                        self.chunks.flush_recency();
                        st = self.lock();
                        continue;
                    }
                    st = self
                        .put_cv
                        .wait_timeout(st, Duration::from_secs(1))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            };
            let Some(((blob, offset), data)) = put else {
                return;
            };
            if let Err(e) = self.chunks.put(blob, offset, &data) {
                tracing::warn!("chunk cache: {e}");
            }
            let mut st = self.lock();
            st.put_bytes -= data.len() as u64;
            self.put_cv.notify_all();
        }
    }

    fn insert(&self, st: &mut State, key: Key, data: Unit) {
        st.tick += 1;
        let tick = st.tick;
        hold(st, &data);
        if let Some((old, t)) = st.units.insert(key, (data, tick)) {
            st.lru.remove(&t);
            release(st, &old);
        }
        st.lru.insert(tick, key);
        // Never evict the unit just inserted: its buffer may alone exceed the budget.
        while st.bytes > MEMORY_BYTES.max(self.run_bytes * 2) && st.lru.len() > 1 {
            let Some((_, k)) = st.lru.pop_first() else {
                break;
            };
            if let Some((old, _)) = st.units.remove(&k) {
                release(st, &old);
            }
            st.triggers.remove(&k);
        }
    }
}

/// Counts a unit's buffer in the memory held.
fn hold(st: &mut State, data: &Unit) {
    let (id, bytes) = data.buffer();
    let e = st.buffers.entry(id).or_insert((0, bytes));
    if e.0 == 0 {
        st.bytes += bytes as u64;
    }
    e.0 += 1;
}

/// Uncounts a unit's buffer when its last unit goes.
fn release(st: &mut State, data: &Unit) {
    let (id, bytes) = data.buffer();
    if let Some(e) = st.buffers.get_mut(&id) {
        e.0 -= 1;
        if e.0 == 0 {
            st.buffers.remove(&id);
            st.bytes -= bytes as u64;
        }
    }
}

/// Moves a unit to the cold end of the recency order (see `State::tick`).
fn demote(st: &mut State, key: Key) {
    let cold = st.cold_tick;
    if let Some((_, t)) = st.units.get_mut(&key) {
        let old = std::mem::replace(t, cold);
        st.lru.remove(&old);
        st.lru.insert(cold, key);
        st.cold_tick += 1;
    }
}

fn touch(st: &mut State, key: Key) -> Option<Unit> {
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
    /// Writes what is queued for the SSD cache and stops the writer and the read-ahead
    /// workers (queued read-ahead is dropped; later units are not written to the SSD cache).
    /// For a daemon about to exit while other threads still hold the cache (the process would
    /// otherwise end in the middle of a cache write), and for `Drop`.
    pub fn flush_and_stop(&self) {
        self.shared.lock().closing = true;
        self.shared.work.notify_all();
        self.shared.put_cv.notify_all();
        for t in self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = t.join();
        }
    }
}

impl Drop for UnitCache {
    /// Writes what is queued for the SSD cache before going.
    fn drop(&mut self) {
        self.flush_and_stop();
    }
}
