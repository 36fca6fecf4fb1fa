//! The append-only writer.
//!
//! Data is staged into object-sized aligned buffers and submitted in batches of one chunk
//! (`chunk_size` bytes of objects). Durability protocol of `commit`:
//!
//! 1. every staged object is written (a partly filled object is sealed at its length; later
//!    appends start a new object, nothing is ever rewritten);
//! 2. the data of every container written to is synced (fdatasync);
//! 3. the records describing those objects, then the completion markers of finished images,
//!    are written as new record blocks of the container's metadata log;
//! 4. those blocks are synced. Only then does `commit` return.
//!
//! A crash before 4 leaves objects without records and/or a torn record block: the scan stops
//! at the first block that is not a valid continuation of the chain, so such data is never
//! returned, and an image without a valid completion marker is reported incomplete.

use crate::backend::{WriteOp, WriteTicket};
use crate::buf::AlignedBuf;
use crate::error::{MediaError, Result};
use crate::layout::{
    BLOCK, ContainerHeader, Extent, ImageExtents, ImageRef, MediumId, RECORDS_PER_BLOCK, Record,
    encode_record_block, push_extent,
};
use crate::medium::Medium;
use crate::sched::{Class, MediaScheduler, WriteGrant};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Largest write made under one scheduler grant. The disk serves a sync of the writable
/// layer after the piece in flight: fio on the VM disk, a 4 KiB writer with an fdatasync
/// every 16 writes beside direct writes of 1 MiB at 300 MB/s had a sync p84 of 954 us, beside
/// 256 KiB ones 700 us (alone 690 us).
const SCHEDULED_WRITE: u64 = 256 << 10;

struct OpenContainer {
    index: u64,
    next_object: u64,
    next_slot: u64,
    prev_crc: u32,
    /// Records waiting for the next record-log write.
    pending: Vec<Record>,
    /// Objects allocated in this container whose record is not in `pending` yet.
    unrecorded: usize,
    /// Data written since the last sync.
    dirty: bool,
}

impl OpenContainer {
    fn room_for(&self, extra: usize, slots: u64) -> bool {
        let need = (self.pending.len() + self.unrecorded + extra).div_ceil(RECORDS_PER_BLOCK);
        self.next_slot + need as u64 <= slots
    }
}

struct Staged {
    buf: usize,
    container: u64,
    object: u64,
    fill: u64,
    capacity: u64,
    image: ImageRef,
    stream: u64,
    image_offset: u64,
}

/// A batch handed to the backend and not yet known to be written.
struct InFlight {
    ticket: WriteTicket,
    bufs: Vec<usize>,
    _grant: Option<WriteGrant>,
}

struct Stream {
    image: ImageRef,
    id: u64,
    length: u64,
    crc: u32,
    objects: u32,
    extents: Vec<Extent>,
}

/// What `commit` made durable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitInfo {
    /// Objects written since the previous commit.
    pub objects: u64,
    /// Record blocks written.
    pub record_blocks: u64,
    /// Images whose completion marker is now durable.
    pub images: Vec<ImageRef>,
}

/// Counters of a writer.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriterStats {
    pub bytes_appended: u64,
    pub objects_written: u64,
    pub bytes_written: u64,
    pub record_blocks_written: u64,
    pub containers_opened: u64,
    pub batches: u64,
}

/// Appends images to a medium. One image is open at a time.
pub struct MediumWriter {
    medium: Arc<Medium>,
    sched: Option<Arc<MediaScheduler>>,
    open: Option<OpenContainer>,
    next_container: u64,
    /// Staging memory: regions of one chunk each, cut into object slots. Slots are handed
    /// out in order so that a batch is contiguous in memory as on the media, and the backend
    /// can write it with few large operations.
    regions: Vec<AlignedBuf>,
    slots_per_region: usize,
    free: VecDeque<usize>,
    registered: bool,
    cur: Option<Staged>,
    queued: Vec<Staged>,
    inflight: VecDeque<InFlight>,
    stream: Option<Stream>,
    completed: Vec<ImageRef>,
    poisoned: Option<String>,
    objects_since_commit: u64,
    stats: WriterStats,
}

impl MediumWriter {
    /// Opens a writer that continues after the last committed data of `medium`. Background
    /// writes are admitted through `sched` when given (bandwidth cap, priorities).
    pub fn open(medium: Arc<Medium>, sched: Option<Arc<MediaScheduler>>) -> Result<Self> {
        let g = medium.geometry();
        let n = medium.containers()?;
        let mut open = None;
        if n > 0 {
            let last = medium.scan_container(n - 1)?;
            let oc = OpenContainer {
                index: n - 1,
                next_object: last.next_object(),
                next_slot: last.record_blocks,
                prev_crc: last.last_crc,
                pending: Vec::new(),
                unrecorded: 0,
                dirty: false,
            };
            // A container of an older format is never appended to: it must not hold records
            // of kinds its format lacks (an older build would stop reading its log there).
            if last.header.version == crate::layout::FORMAT_VERSION
                && oc.next_object < g.objects_per_container()
                && oc.room_for(1, g.record_slots())
            {
                open = Some(oc);
            }
        }
        // Two chunks of staging: one is filled while the other is being written.
        let per = g.objects_per_chunk();
        let mut regions: Vec<AlignedBuf> = (0..2)
            .map(|_| AlignedBuf::zeroed(per * g.object_size as usize))
            .collect();
        let ptrs: Vec<(*mut u8, usize)> = regions
            .iter_mut()
            .map(|b| (b.as_mut_ptr(), b.capacity()))
            .collect();
        // SAFETY: the regions live in `self.regions`, are never reallocated or moved (each
        // AlignedBuf owns a fixed heap allocation) and are unregistered in Drop before freed.
        let registered = unsafe { medium.backend().register_buffers(&ptrs) };
        Ok(MediumWriter {
            medium,
            sched,
            open,
            next_container: n,
            free: (0..2 * per).collect(),
            regions,
            slots_per_region: per,
            registered,
            cur: None,
            queued: Vec::new(),
            inflight: VecDeque::new(),
            stream: None,
            completed: Vec::new(),
            poisoned: None,
            objects_since_commit: 0,
            stats: WriterStats::default(),
        })
    }

    /// Counters since open.
    pub fn stats(&self) -> WriterStats {
        self.stats
    }

    /// True when staging buffers are registered with io_uring.
    pub fn uses_registered_buffers(&self) -> bool {
        self.registered
    }

    fn misuse(&self, reason: impl Into<String>) -> MediaError {
        MediaError::Misuse {
            medium: self.medium.uri().to_string(),
            reason: reason.into(),
        }
    }

    fn check_poison(&self) -> Result<()> {
        match &self.poisoned {
            Some(r) => Err(MediaError::Poisoned {
                medium: self.medium.uri().to_string(),
                reason: r.clone(),
            }),
            None => Ok(()),
        }
    }

    fn poison<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            tracing::error!(medium = self.medium.uri(), "writer failed: {e}");
            self.poisoned = Some(e.to_string());
        }
        r
    }

    /// Starts writing `image`. Fails when another image is open.
    pub fn begin_image(&mut self, image: ImageRef) -> Result<()> {
        self.check_poison()?;
        if let Some(s) = &self.stream {
            return Err(self.misuse(format!("cannot begin {image}: {} is open", s.image)));
        }
        // The stream id is the position of its first object: unique on the medium, so that
        // the objects of an attempt interrupted by a crash are never mixed with a retry's.
        let id = match (&self.open, &self.cur) {
            (_, Some(c)) => (c.container << 32) | (c.object + 1),
            (Some(o), None) => (o.index << 32) | o.next_object,
            (None, None) => self.next_container << 32,
        };
        self.stream = Some(Stream {
            image,
            id,
            length: 0,
            crc: 0,
            objects: 0,
            extents: Vec::new(),
        });
        Ok(())
    }

    /// Appends `data` to the open image; returns where those bytes will be on the medium.
    /// They are durable only once `commit` returns.
    pub fn append(&mut self, mut data: &[u8]) -> Result<Vec<Extent>> {
        self.check_poison()?;
        if self.stream.is_none() {
            return Err(self.misuse("append without an open image"));
        }
        let mut out = Vec::new();
        while !data.is_empty() {
            if self.cur.is_none() {
                let r = self.start_object();
                self.poison(r)?;
            }
            let g = self.medium.geometry();
            let st = self.stream.as_mut().expect("checked above");
            let cur = self.cur.as_mut().expect("just started");
            let n = (cur.capacity - cur.fill).min(data.len() as u64) as usize;
            let at = cur.fill as usize;
            let (r, base) = slot_place(self.slots_per_region, g.object_size, cur.buf);
            self.regions[r][base + at..base + at + n].copy_from_slice(&data[..n]);
            let e = Extent {
                container: cur.container,
                offset: cur.object * g.object_size + cur.fill,
                length: n as u64,
                image_offset: st.length,
            };
            push_extent(&mut out, e);
            push_extent(&mut st.extents, e);
            st.crc = crc32c::crc32c_append(st.crc, &data[..n]);
            st.length += n as u64;
            cur.fill += n as u64;
            self.stats.bytes_appended += n as u64;
            data = &data[n..];
            if cur.fill == cur.capacity {
                let full = self.cur.take().expect("current object");
                self.queued.push(full);
                if self.queued.len() >= g.objects_per_chunk() {
                    let r = self.submit_queued();
                    self.poison(r)?;
                }
            }
        }
        Ok(out)
    }

    /// Closes the open image: its completion marker is durable when the next `commit`
    /// returns (it may reach the medium earlier, when its container fills up; only `commit`
    /// promises anything). Returns all its extents.
    pub fn finish_image(&mut self) -> Result<ImageExtents> {
        self.check_poison()?;
        if self.stream.is_none() {
            return Err(self.misuse("finish without an open image"));
        }
        let r = self.finish_inner();
        self.poison(r)
    }

    fn finish_inner(&mut self) -> Result<ImageExtents> {
        self.seal_current();
        self.submit_queued()?;
        let st = self.stream.take().expect("checked by caller");
        self.ensure_room(1)?;
        let oc = self.open.as_mut().expect("ensure_room opens a container");
        oc.pending.push(Record::Complete {
            image: st.image,
            stream: st.id,
            length: st.length,
            objects: st.objects,
            crc: st.crc,
        });
        self.completed.push(st.image);
        Ok(ImageExtents {
            image: st.image,
            length: st.length,
            crc: st.crc,
            extents: st.extents,
        })
    }

    /// Abandons the open image: its data stays on the medium as an incomplete stream that
    /// readers never see and recovery reports as such.
    pub fn abort_image(&mut self) -> Result<()> {
        self.check_poison()?;
        self.seal_current();
        self.stream = None;
        Ok(())
    }

    /// Makes everything appended so far durable; returns only when it is.
    pub fn commit(&mut self) -> Result<CommitInfo> {
        self.check_poison()?;
        let r = self.commit_inner();
        self.poison(r)
    }

    fn commit_inner(&mut self) -> Result<CommitInfo> {
        self.seal_current();
        self.submit_queued()?;
        let blocks = self.write_records()?;
        let info = CommitInfo {
            objects: self.objects_since_commit,
            record_blocks: blocks,
            images: std::mem::take(&mut self.completed),
        };
        tracing::debug!(
            medium = self.medium.uri(),
            objects = info.objects,
            record_blocks = info.record_blocks,
            images = info.images.len(),
            "commit durable"
        );
        self.objects_since_commit = 0;
        Ok(info)
    }

    fn seal_current(&mut self) {
        if let Some(cur) = self.cur.take() {
            if cur.fill > 0 {
                self.queued.push(cur);
            } else {
                self.free.push_front(cur.buf);
                if let Some(oc) = self.open.as_mut() {
                    oc.unrecorded -= 1;
                }
            }
        }
    }

    /// Makes sure the open container can take `records` more records, rolling over if not.
    fn ensure_room(&mut self, records: usize) -> Result<()> {
        let g = self.medium.geometry();
        if let Some(oc) = &self.open
            && oc.room_for(records, g.record_slots())
        {
            return Ok(());
        }
        self.close_container()?;
        self.open_container()
    }

    fn start_object(&mut self) -> Result<()> {
        let g = self.medium.geometry();
        let fits = |oc: &OpenContainer| {
            oc.next_object < g.objects_per_container() && oc.room_for(1, g.record_slots())
        };
        if !self.open.as_ref().is_some_and(fits) {
            self.close_container()?;
            self.open_container()?;
        }
        if self.free.is_empty() {
            self.submit_queued()?;
        }
        while self.free.is_empty() && !self.inflight.is_empty() {
            self.wait_oldest()?;
        }
        let buf = self.free.pop_front().expect("waiting frees buffers");
        let st = self.stream.as_mut().expect("open stream");
        let oc = self.open.as_mut().expect("opened above");
        let object = oc.next_object;
        oc.next_object += 1;
        oc.unrecorded += 1;
        st.objects += 1;
        self.cur = Some(Staged {
            buf,
            container: oc.index,
            object,
            fill: 0,
            capacity: g.object_capacity(object),
            image: st.image,
            stream: st.id,
            image_offset: st.length,
        });
        Ok(())
    }

    /// Hands every full or sealed object to the backend as one batch. Their records go to
    /// the pending list now; they are written only after `wait_all` and a sync.
    fn submit_queued(&mut self) -> Result<()> {
        if self.queued.is_empty() {
            return Ok(());
        }
        let g = self.medium.geometry();
        let queued = std::mem::take(&mut self.queued);
        let mut total = 0;
        let oc = self
            .open
            .as_mut()
            .expect("staged objects live in the open container");
        for s in &queued {
            let padded = s.fill.next_multiple_of(BLOCK) as usize;
            let (r, base) = slot_place(self.slots_per_region, g.object_size, s.buf);
            let b = &mut self.regions[r][base..base + padded];
            b[s.fill as usize..].fill(0);
            total += padded as u64;
            oc.pending.push(Record::Object {
                object: s.object as u32,
                image: s.image,
                stream: s.stream,
                image_offset: s.image_offset,
                len: s.fill as u32,
                crc: crc32c::crc32c(&b[..s.fill as usize]),
            });
            oc.unrecorded -= 1;
            oc.dirty = true;
        }
        if self.sched.is_some() {
            // Scheduled writes go in pieces of at most SCHEDULED_WRITE bytes, one grant
            // each: the device is never tied up long by background data, and the rate
            // limit paces it smoothly.
            let mut start = 0;
            while start < queued.len() {
                let mut end = start + 1;
                let mut bytes = queued[start].fill.next_multiple_of(BLOCK);
                while end < queued.len() {
                    let b = queued[end].fill.next_multiple_of(BLOCK);
                    if bytes + b > SCHEDULED_WRITE {
                        break;
                    }
                    bytes += b;
                    end += 1;
                }
                self.write_scheduled(&queued[start..end], bytes)?;
                start = end;
            }
        } else {
            self.start_batch(&queued, None)?;
        }
        self.stats.batches += 1;
        self.stats.bytes_written += total;
        self.stats.objects_written += queued.len() as u64;
        self.objects_since_commit += queued.len() as u64;
        Ok(())
    }

    /// Writes `part` (`bytes` padded bytes) under a scheduler grant, waiting for it.
    fn write_scheduled(&mut self, part: &[Staged], bytes: u64) -> Result<()> {
        let g = self.medium.geometry();
        let s = self.sched.clone().expect("scheduled writer");
        // A grant is held until its batch is written: finish the batch in flight before
        // asking for the next one.
        self.wait_all()?;
        let first = &part[0];
        let grant = s.acquire_write(
            Class::Background,
            first.container,
            g.data_to_container(first.object * g.object_size),
            bytes,
        )?;
        self.start_batch(part, Some(grant))?;
        // Release the grant as soon as the batch is written, not when the writer next
        // needs a buffer (it may sit idle for long).
        self.wait_all()
    }

    /// Hands `queued` to the backend as one batch.
    fn start_batch(&mut self, queued: &[Staged], grant: Option<WriteGrant>) -> Result<()> {
        let g = self.medium.geometry();
        let ops: Vec<WriteOp<'_>> = queued
            .iter()
            .map(|s| WriteOp {
                container: s.container,
                offset: g.data_to_container(s.object * g.object_size),
                data: {
                    let (r, base) = slot_place(self.slots_per_region, g.object_size, s.buf);
                    &self.regions[r][base..base + s.fill.next_multiple_of(BLOCK) as usize]
                },
                fixed_buf: self
                    .registered
                    .then_some((s.buf / self.slots_per_region) as u16),
            })
            .collect();
        // SAFETY: the buffers of `queued` go back to `free` only in `wait_oldest`, after the
        // backend reported this ticket done, and Drop waits for every batch in flight.
        let ticket = unsafe { self.medium.backend().start_writes(&ops) }?;
        drop(ops);
        spinfs_failpoints::fail_point!("media.append.objects_submitted");
        self.inflight.push_back(InFlight {
            ticket,
            bufs: queued.iter().map(|s| s.buf).collect(),
            _grant: grant,
        });
        Ok(())
    }

    fn wait_oldest(&mut self) -> Result<()> {
        if let Some(b) = self.inflight.pop_front() {
            let res = self.medium.backend().wait_writes(b.ticket);
            self.free.extend(b.bufs);
            res?;
        }
        Ok(())
    }

    fn wait_all(&mut self) -> Result<()> {
        while !self.inflight.is_empty() {
            self.wait_oldest()?;
        }
        Ok(())
    }

    /// Steps 2-4 of the protocol for the open container.
    fn write_records(&mut self) -> Result<u64> {
        let g = self.medium.geometry();
        let Some(index) = self.open.as_ref().map(|oc| oc.index) else {
            return Ok(0);
        };
        let id = self.medium.id().expect("an open container implies an id");
        // Every write in flight is done and the data is durable before any record is written.
        self.wait_all()?;
        let oc = self.open.as_mut().expect("still open");
        if oc.dirty {
            spinfs_failpoints::fail_point!("media.commit.before_data_sync");
            self.medium.backend().sync(&[index])?;
            oc.dirty = false;
            spinfs_failpoints::fail_point!("media.commit.after_data_sync");
        }
        if oc.pending.is_empty() {
            return Ok(0);
        }
        let chunks: Vec<&[Record]> = oc.pending.chunks(RECORDS_PER_BLOCK).collect();
        if oc.next_slot + chunks.len() as u64 > g.record_slots() {
            return Err(MediaError::BadContainer {
                medium: self.medium.uri().to_string(),
                container: oc.index,
                reason: "record log overflow (writer accounting error)".into(),
            });
        }
        let mut blocks = AlignedBuf::zeroed(chunks.len() * BLOCK as usize);
        let mut crc = oc.prev_crc;
        for (i, recs) in chunks.iter().enumerate() {
            let at = i * BLOCK as usize;
            crc = encode_record_block(
                &mut blocks[at..at + BLOCK as usize],
                id,
                oc.index,
                (oc.next_slot + i as u64) as u32,
                crc,
                recs,
            );
        }
        let n = chunks.len() as u64;
        let op = WriteOp {
            container: oc.index,
            offset: g.record_slot_offset(oc.next_slot),
            data: &blocks,
            fixed_buf: None,
        };
        self.medium.backend().write_batch(&[op])?;
        spinfs_failpoints::fail_point!("media.commit.records_written");
        self.medium.backend().sync(&[oc.index])?;
        spinfs_failpoints::fail_point!("media.commit.records_synced");
        oc.next_slot += n;
        oc.prev_crc = crc;
        oc.pending.clear();
        self.stats.record_blocks_written += n;
        Ok(n)
    }

    fn close_container(&mut self) -> Result<()> {
        if self.open.is_none() {
            return Ok(());
        }
        self.submit_queued()?;
        self.write_records()?;
        self.open = None;
        Ok(())
    }

    fn open_container(&mut self) -> Result<()> {
        let g = self.medium.geometry();
        let index = self.next_container;
        let id = match self.medium.id() {
            Some(id) => id,
            None => {
                let id = MediumId::random()
                    .map_err(|e| MediaError::io(self.medium.uri(), "cannot draw a medium id", e))?;
                self.medium.set_id(id);
                id
            }
        };
        // A slot past the last valid container may hold a container whose header creation
        // was torn by a crash (its first record slot is then zero: header and that slot are
        // written together). Records there mean a damaged header over committed data: never
        // overwrite that.
        let mut probe = AlignedBuf::zeroed(BLOCK as usize);
        let n = self
            .medium
            .backend()
            .read_at(index, g.record_slot_offset(0), &mut probe)?;
        if probe[..n].iter().any(|&b| b != 0) {
            return Err(MediaError::BadContainer {
                medium: self.medium.uri().to_string(),
                container: index,
                reason: "holds records but no valid header; refusing to overwrite it (run \
                         `spinfs media verify`)"
                    .into(),
            });
        }
        self.medium.backend().prepare_container(index)?;
        let header = ContainerHeader {
            version: crate::layout::FORMAT_VERSION,
            medium: id,
            container: index,
            geometry: g,
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let mut blk = AlignedBuf::zeroed(BLOCK as usize);
        header.encode(&mut blk);
        let crc = u32::from_le_bytes(blk[124..128].try_into().expect("4 bytes"));
        // A reused file or device may hold an older log: clear the first record slot so a
        // stale block cannot continue the new chain (the chain starts from this header's
        // CRC, which differs anyway unless the header is byte-identical).
        let mut meta = AlignedBuf::zeroed(2 * BLOCK as usize);
        meta[..BLOCK as usize].copy_from_slice(&blk);
        spinfs_failpoints::fail_point!("media.header.before_sync");
        self.medium.backend().write_batch(&[WriteOp {
            container: index,
            offset: 0,
            data: &meta,
            fixed_buf: None,
        }])?;
        self.medium.backend().sync(&[index])?;
        spinfs_failpoints::fail_point!("media.header.after_sync");
        self.stats.containers_opened += 1;
        tracing::info!(
            medium = self.medium.uri(),
            container = index,
            "container opened"
        );
        self.open = Some(OpenContainer {
            index,
            next_object: 0,
            next_slot: 0,
            prev_crc: crc,
            pending: Vec::new(),
            unrecorded: 0,
            dirty: false,
        });
        self.next_container = index + 1;
        Ok(())
    }
}

/// Region and byte offset of staging slot `slot`.
fn slot_place(per_region: usize, object_size: u64, slot: usize) -> (usize, usize) {
    (
        slot / per_region,
        (slot % per_region) * object_size as usize,
    )
}

impl Drop for MediumWriter {
    fn drop(&mut self) {
        // The kernel may still be reading the buffers: wait before they are freed.
        while let Some(b) = self.inflight.pop_front() {
            let _ = self.medium.backend().wait_writes(b.ticket);
        }
        if self.registered {
            self.medium.backend().unregister_buffers();
        }
    }
}
