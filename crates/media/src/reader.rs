//! Ranged reads at object granularity.

use crate::error::{MediaError, Result};
use crate::layout::{ImageExtents, Record};
use crate::medium::{ContainerScan, Medium};
use crate::sched::{Class, MediaScheduler, PendingRead};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How a read is carried out.
#[derive(Debug, Clone, Copy)]
pub struct ReadOptions {
    pub class: Class,
    /// The whole read fails with `MediaError::Timeout` when not served within this time.
    pub timeout: Option<Duration>,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            class: Class::Foreground,
            timeout: None,
        }
    }
}

/// Counters of a reader.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReaderStats {
    pub reads: u64,
    pub bytes_returned: u64,
    pub objects_fetched: u64,
    pub bytes_fetched: u64,
    pub index_loads: u64,
}

/// Reads byte ranges of images. Container indexes (the record logs) are loaded once per
/// container and cached.
pub struct MediumReader {
    medium: Arc<Medium>,
    sched: Option<Arc<MediaScheduler>>,
    indexes: Mutex<HashMap<u64, Arc<ContainerScan>>>,
    stats: Mutex<ReaderStats>,
}

enum Fetch {
    Sched(PendingRead),
    Done(Vec<u8>),
}

struct Piece {
    container: u64,
    first_object: u64,
    objects: u64,
    /// Byte offset in the container data area of the requested bytes, and their count.
    data_offset: u64,
    len: u64,
    /// Where they go in the output.
    out_at: usize,
    /// Image offset of the first object's first byte.
    image_offset_of_first: u64,
}

impl MediumReader {
    /// A reader; with `sched`, reads go through the I/O scheduler.
    pub fn new(medium: Arc<Medium>, sched: Option<Arc<MediaScheduler>>) -> MediumReader {
        MediumReader {
            medium,
            sched,
            indexes: Mutex::new(HashMap::new()),
            stats: Mutex::new(ReaderStats::default()),
        }
    }

    pub fn stats(&self) -> ReaderStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets cached container indexes (after the writer appended to them).
    pub fn invalidate(&self) {
        self.indexes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    fn index(
        &self,
        container: u64,
        deadline: Option<Instant>,
        fresh: bool,
    ) -> Result<Arc<ContainerScan>> {
        if !fresh
            && let Some(s) = self
                .indexes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&container)
        {
            return Ok(s.clone());
        }
        let g = self.medium.geometry();
        let scan = match &self.sched {
            Some(s) => {
                let bytes = s
                    .submit_read(Class::Metadata, container, 0, g.reserved)?
                    .wait(deadline)?;
                self.medium.parse_container_meta(container, &bytes)?
            }
            None => self.medium.scan_container(container)?,
        };
        let scan = Arc::new(scan);
        self.stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .index_loads += 1;
        self.indexes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(container, scan.clone());
        Ok(scan)
    }

    /// Loads the indexes of `containers` not cached yet, queueing their reads together.
    fn preload_indexes(&self, containers: &[u64], deadline: Option<Instant>) -> Result<()> {
        let Some(s) = &self.sched else {
            return Ok(());
        };
        let mut missing: Vec<u64> = {
            let idx = self.indexes.lock().unwrap_or_else(|p| p.into_inner());
            containers
                .iter()
                .copied()
                .filter(|c| !idx.contains_key(c))
                .collect()
        };
        missing.sort_unstable();
        missing.dedup();
        if missing.len() < 2 {
            return Ok(());
        }
        let reserved = self.medium.geometry().reserved;
        let pending: Vec<(u64, PendingRead)> = missing
            .iter()
            .map(|&c| Ok((c, s.submit_read(Class::Metadata, c, 0, reserved)?)))
            .collect::<Result<_>>()?;
        for (c, p) in pending {
            let bytes = p.wait(deadline)?;
            let scan = Arc::new(self.medium.parse_container_meta(c, &bytes)?);
            self.stats
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .index_loads += 1;
            self.indexes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(c, scan);
        }
        Ok(())
    }

    /// Returns exactly bytes `[offset, offset + len)` of `image`, fetching only the objects
    /// that cover them and verifying each against its checksum and index entry.
    pub fn read(
        &self,
        image: &ImageExtents,
        offset: u64,
        len: u64,
        opts: ReadOptions,
    ) -> Result<Vec<u8>> {
        let uri = self.medium.uri().to_string();
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= image.length)
            .ok_or_else(|| MediaError::OutOfRange {
                medium: uri.clone(),
                reason: format!(
                    "{}: bytes {offset}+{len} are past its end ({})",
                    image.image, image.length
                ),
            })?;
        let deadline = opts.timeout.map(|t| Instant::now() + t);
        let g = self.medium.geometry();
        let os = g.object_size;
        // Extents come from a manifest: check them before any arithmetic trusts them.
        for e in &image.extents {
            let fits = e
                .offset
                .checked_add(e.length)
                .is_some_and(|end| end <= g.usable())
                && e.image_offset.checked_add(e.length).is_some();
            if !fits || e.length == 0 {
                return Err(MediaError::OutOfRange {
                    medium: uri,
                    reason: format!("{}: extent {e:?} does not fit a container", image.image),
                });
            }
        }
        let mut pieces = Vec::new();
        let mut covered = 0;
        for e in &image.extents {
            let s = offset.max(e.image_offset);
            let t = end.min(e.image_offset + e.length);
            if s >= t {
                continue;
            }
            let d0 = e.offset + (s - e.image_offset);
            let d1 = d0 + (t - s);
            let first = d0 / os;
            let last = (d1 - 1) / os;
            pieces.push(Piece {
                container: e.container,
                first_object: first,
                objects: last - first + 1,
                data_offset: d0,
                len: t - s,
                out_at: (s - offset) as usize,
                image_offset_of_first: 0,
            });
            let image_offset_of_first = (e.image_offset + first * os)
                .checked_sub(e.offset)
                .ok_or_else(|| MediaError::OutOfRange {
                    medium: uri.clone(),
                    reason: format!("{}: extent {e:?} is inconsistent", image.image),
                })?;
            pieces
                .last_mut()
                .expect("just pushed")
                .image_offset_of_first = image_offset_of_first;
            covered += t - s;
        }
        if covered != len {
            return Err(MediaError::OutOfRange {
                medium: uri,
                reason: format!(
                    "{}: its extents cover {covered} of the {len} bytes asked at {offset}",
                    image.image
                ),
            });
        }
        // Load every index first (queued together), then queue every fetch so the scheduler
        // can batch them.
        let containers: Vec<u64> = pieces.iter().map(|p| p.container).collect();
        self.preload_indexes(&containers, deadline)?;
        let mut fetches = Vec::with_capacity(pieces.len());
        for p in &pieces {
            let last = p.first_object + p.objects - 1;
            let mut idx = self.index(p.container, deadline, false)?;
            if idx.object(last).is_none() {
                // The container may have grown since its index was cached.
                idx = self.index(p.container, deadline, true)?;
            }
            let last_len = match idx.object(last) {
                Some(Record::Object { len, .. }) => *len as u64,
                _ => {
                    return Err(MediaError::Damaged {
                        medium: uri,
                        container: p.container,
                        object: last,
                        reason: "not in the container index (never committed or torn)".into(),
                    });
                }
            };
            let start = g.data_to_container(p.first_object * os);
            let bytes = (p.objects - 1) * os + last_len.next_multiple_of(crate::layout::BLOCK);
            let f = match &self.sched {
                Some(s) => Fetch::Sched(s.submit_read(opts.class, p.container, start, bytes)?),
                None => {
                    let mut b = crate::buf::AlignedBuf::zeroed(bytes as usize);
                    let n = self.medium.backend().read_at(p.container, start, &mut b)?;
                    b.set_len(n);
                    Fetch::Done(b.to_vec())
                }
            };
            fetches.push((f, idx));
        }
        let mut out = vec![0u8; len as usize];
        let mut fetched = 0;
        for (p, (f, idx)) in pieces.iter().zip(fetches) {
            let buf = match f {
                Fetch::Sched(r) => r.wait(deadline)?,
                Fetch::Done(b) => b,
            };
            fetched += buf.len() as u64;
            for k in 0..p.objects {
                let object = p.first_object + k;
                let rec = idx.object(object).ok_or_else(|| MediaError::Damaged {
                    medium: uri.clone(),
                    container: p.container,
                    object,
                    reason: "not in the container index (never committed or torn)".into(),
                })?;
                let Record::Object {
                    len: olen,
                    image: oimage,
                    image_offset,
                    ..
                } = *rec
                else {
                    unreachable!("object table only points at object records")
                };
                let at = (k * os) as usize;
                let data = buf
                    .get(at..at + olen as usize)
                    .ok_or_else(|| MediaError::Damaged {
                        medium: uri.clone(),
                        container: p.container,
                        object,
                        reason: format!("short read: object of {olen} bytes not all present"),
                    })?;
                self.medium.check_object(p.container, object, rec, data)?;
                let expect_off = p.image_offset_of_first + k * os;
                if oimage != image.image || image_offset != expect_off {
                    return Err(MediaError::Damaged {
                        medium: uri.clone(),
                        container: p.container,
                        object,
                        reason: format!(
                            "holds {oimage} at {image_offset}, expected {} at {expect_off}",
                            image.image
                        ),
                    });
                }
                // Copy the part of this object that the request covers.
                let obj_start = (p.first_object + k) * os;
                let want_s = p.data_offset.max(obj_start);
                let want_e = (p.data_offset + p.len).min(obj_start + olen as u64);
                if want_e < (p.data_offset + p.len).min(obj_start + os) {
                    return Err(MediaError::Damaged {
                        medium: uri.clone(),
                        container: p.container,
                        object,
                        reason: format!("holds {olen} bytes, fewer than its extent needs"),
                    });
                }
                if want_s < want_e {
                    let src = &data[(want_s - obj_start) as usize..(want_e - obj_start) as usize];
                    let dst = p.out_at + (want_s - p.data_offset) as usize;
                    out[dst..dst + src.len()].copy_from_slice(src);
                }
            }
        }
        let mut st = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        st.reads += 1;
        st.bytes_returned += len;
        st.objects_fetched += pieces.iter().map(|p| p.objects).sum::<u64>();
        st.bytes_fetched += fetched;
        Ok(out)
    }
}
