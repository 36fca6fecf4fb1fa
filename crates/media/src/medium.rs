//! A medium: a backend plus its geometry and identity; reading container metadata.

use crate::backend::{Backend, BackendOptions, open_backend};
use crate::buf::AlignedBuf;
use crate::error::{MediaError, Result};
use crate::layout::{BLOCK, ContainerHeader, Geometry, MediumId, Record, decode_record_block};
use std::sync::{Arc, Mutex};

/// What a container's metadata says about it.
#[derive(Debug, Clone)]
pub struct ContainerScan {
    pub header: ContainerHeader,
    /// CRC of the header: the chain value before record slot 0.
    pub header_crc: u32,
    /// Records in log order with the slot they were read from.
    pub records: Vec<(u32, Record)>,
    /// Valid record blocks (the next slot to write).
    pub record_blocks: u64,
    /// CRC of the last valid record block (or the header): the next block's chain value.
    pub last_crc: u32,
    /// Why the record log stopped early, when the first invalid block was not empty:
    /// a torn tail left by a crash (ignored, never returned as data).
    pub torn_log: Option<String>,
    /// Object index -> its record (position in `records`), for recorded objects.
    pub objects: Vec<Option<usize>>,
    /// Records that are well-formed but impossible (object out of range, duplicate...).
    pub bad_records: Vec<String>,
}

impl ContainerScan {
    /// Next object index after the last recorded one.
    pub fn next_object(&self) -> u64 {
        self.objects
            .iter()
            .rposition(|o| o.is_some())
            .map_or(0, |i| i as u64 + 1)
    }

    /// Data bytes held by recorded objects.
    pub fn data_bytes(&self) -> u64 {
        self.records
            .iter()
            .map(|(_, r)| match r {
                Record::Object { len, .. } => *len as u64,
                Record::Complete { .. } => 0,
            })
            .sum()
    }

    /// The record of object `object`, if any.
    pub fn object(&self, object: u64) -> Option<&Record> {
        let i = (*self.objects.get(object as usize)?)?;
        Some(&self.records[i].1)
    }
}

/// An archive medium.
pub struct Medium {
    backend: Arc<dyn Backend>,
    geometry: Geometry,
    id: Mutex<Option<MediumId>>,
}

impl Medium {
    /// Opens the medium at `uri` expecting `geometry`. An empty medium (or one whose first
    /// container holds no valid header) is accepted; its id is chosen at the first write.
    pub fn open(uri: &str, geometry: Geometry, opts: BackendOptions) -> Result<Arc<Medium>> {
        let backend = open_backend(uri, geometry.container_size, opts)?;
        Medium::with_backend(backend, geometry)
    }

    /// Builds a medium over an already opened backend. The medium id and geometry come from
    /// the first container with a valid header (a damaged container 0 must not make a
    /// written medium look empty).
    pub fn with_backend(backend: Arc<dyn Backend>, geometry: Geometry) -> Result<Arc<Medium>> {
        let m = Medium {
            backend,
            geometry,
            id: Mutex::new(None),
        };
        let slots = m.backend.container_slots()?;
        for i in 0..slots {
            let Some((h, _)) = m.read_header(i)? else {
                continue;
            };
            if h.geometry != geometry {
                return Err(MediaError::GeometryMismatch {
                    medium: m.uri().to_string(),
                    reason: format!("written with {:?}, opened with {:?}", h.geometry, geometry),
                });
            }
            m.set_id(h.medium);
            break;
        }
        Ok(Arc::new(m))
    }

    /// Opens the medium at `uri` and makes it empty: every container that holds a header is
    /// erased (a `dir:` container file is removed; a `file:` container's header zeroed), so
    /// that nothing of an earlier medium can be taken for this one. Refuses a medium that
    /// holds containers unless `wipe` is true.
    pub fn format(
        uri: &str,
        geometry: Geometry,
        opts: BackendOptions,
        wipe: bool,
    ) -> Result<Arc<Medium>> {
        let backend = open_backend(uri, geometry.container_size, opts)?;
        let slots = backend.container_slots()?;
        let probe = Medium {
            backend: backend.clone(),
            geometry,
            id: Mutex::new(None),
        };
        for i in 0..slots {
            if let Some((h, _)) = probe.read_header(i)? {
                if !wipe {
                    return Err(MediaError::Misuse {
                        medium: uri.to_string(),
                        reason: format!(
                            "container {i} already belongs to medium {}; refusing to format",
                            h.medium
                        ),
                    });
                }
                backend.erase_container(i)?;
            }
        }
        if slots > 0 {
            backend.sync(&(0..slots).collect::<Vec<_>>())?;
        }
        Ok(Arc::new(Medium {
            backend,
            geometry,
            id: Mutex::new(None),
        }))
    }

    /// The medium URI.
    pub fn uri(&self) -> &str {
        self.backend.uri()
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The medium id, once a container has been written.
    pub fn id(&self) -> Option<MediumId> {
        *self.id.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_id(&self, id: MediumId) {
        *self.id.lock().unwrap_or_else(|p| p.into_inner()) = Some(id);
    }

    /// Reads container `index`'s header; None when it holds no valid header.
    pub fn read_header(&self, index: u64) -> Result<Option<(ContainerHeader, u32)>> {
        let mut blk = AlignedBuf::zeroed(BLOCK as usize);
        let n = self.backend.read_at(index, 0, &mut blk)?;
        if n < BLOCK as usize {
            return Ok(None);
        }
        Ok(ContainerHeader::decode(&blk).ok().map(|h| {
            let crc = u32::from_le_bytes(blk[124..128].try_into().expect("4 bytes"));
            (h, crc)
        }))
    }

    /// Number of containers written: one past the last container whose header is valid, of
    /// this medium and at the right index. Containers before it with a bad header are
    /// damaged (`scan_container` says why); one after it is a torn, never-used container.
    pub fn containers(&self) -> Result<u64> {
        let Some(id) = self.id() else { return Ok(0) };
        let slots = self.backend.container_slots()?;
        let mut n = 0;
        for i in 0..slots {
            if let Some((h, _)) = self.read_header(i)?
                && h.medium == id
                && h.container == i
            {
                n = i + 1;
            }
        }
        Ok(n)
    }

    /// Reads and checks container `index`'s metadata area.
    pub fn scan_container(&self, index: u64) -> Result<ContainerScan> {
        let mut meta = AlignedBuf::zeroed(self.geometry.reserved as usize);
        let n = self.backend.read_at(index, 0, &mut meta)?;
        meta[n..].fill(0);
        self.parse_container_meta(index, &meta)
    }

    /// Checks container `index`'s metadata area given its bytes (missing bytes = zeros).
    pub fn parse_container_meta(&self, index: u64, bytes: &[u8]) -> Result<ContainerScan> {
        let g = self.geometry;
        let bad = |reason: String| MediaError::BadContainer {
            medium: self.uri().to_string(),
            container: index,
            reason,
        };
        let mut meta = vec![0u8; g.reserved as usize];
        let n = bytes.len().min(meta.len());
        meta[..n].copy_from_slice(&bytes[..n]);
        let header = ContainerHeader::decode(&meta[..BLOCK as usize])
            .map_err(|r| bad(format!("header: {r}")))?;
        if Some(header.medium) != self.id() {
            return Err(bad(format!(
                "belongs to another medium ({})",
                header.medium
            )));
        }
        if header.container != index {
            return Err(bad(format!("header names container {}", header.container)));
        }
        if header.geometry != g {
            return Err(bad(format!("geometry {:?} differs", header.geometry)));
        }
        let header_crc = u32::from_le_bytes(meta[124..128].try_into().expect("4 bytes"));
        let mut scan = ContainerScan {
            header,
            header_crc,
            records: Vec::new(),
            record_blocks: 0,
            last_crc: header_crc,
            torn_log: None,
            objects: vec![None; g.objects_per_container() as usize],
            bad_records: Vec::new(),
        };
        for slot in 0..g.record_slots() {
            let at = g.record_slot_offset(slot) as usize;
            let blk = &meta[at..at + BLOCK as usize];
            let id = scan.header.medium;
            match decode_record_block(blk, id, index, slot as u32, scan.last_crc) {
                Ok(rb) => {
                    scan.last_crc = rb.crc;
                    scan.record_blocks = slot + 1;
                    for r in rb.records {
                        if let Record::Object {
                            object, len, image, ..
                        } = r
                        {
                            let o = object as u64;
                            if o >= g.objects_per_container()
                                || len as u64 > g.object_capacity(o)
                                || len == 0
                            {
                                scan.bad_records.push(format!(
                                    "record for object {o} of {image} with length {len} does \
                                     not fit the container"
                                ));
                                continue;
                            }
                            if scan.objects[o as usize].is_some() {
                                scan.bad_records
                                    .push(format!("object {o} is recorded twice"));
                                continue;
                            }
                            scan.objects[o as usize] = Some(scan.records.len());
                        }
                        scan.records.push((slot as u32, r));
                    }
                }
                Err(reason) => {
                    if blk.iter().any(|&b| b != 0) {
                        scan.torn_log = Some(format!("record slot {slot}: {reason}"));
                    }
                    break;
                }
            }
        }
        Ok(scan)
    }

    /// Reads object `object` of container `container` (`len` bytes, padded read) into an
    /// aligned buffer of exactly `len` visible bytes, without verifying it.
    pub fn read_object_raw(&self, container: u64, object: u64, len: u64) -> Result<AlignedBuf> {
        let g = self.geometry;
        let padded = len.next_multiple_of(BLOCK) as usize;
        let mut buf = AlignedBuf::zeroed(padded);
        let off = g.data_to_container(object * g.object_size);
        let n = self.backend.read_at(container, off, &mut buf)?;
        if (n as u64) < len {
            return Err(MediaError::Damaged {
                medium: self.uri().to_string(),
                container,
                object,
                reason: format!("short read: {n} of {len} bytes present"),
            });
        }
        buf.set_len(len as usize);
        Ok(buf)
    }

    /// Checks `data` read from object `object` of `container` against its record.
    pub fn check_object(
        &self,
        container: u64,
        object: u64,
        record: &Record,
        data: &[u8],
    ) -> Result<()> {
        let Record::Object { len, crc, .. } = record else {
            return Err(MediaError::Damaged {
                medium: self.uri().to_string(),
                container,
                object,
                reason: "no object record".into(),
            });
        };
        if data.len() != *len as usize {
            return Err(MediaError::Damaged {
                medium: self.uri().to_string(),
                container,
                object,
                reason: format!("holds {} bytes, index says {len}", data.len()),
            });
        }
        let got = crc32c::crc32c(data);
        if got != *crc {
            tracing::warn!(
                medium = self.uri(),
                container,
                object,
                "object checksum mismatch"
            );
            return Err(MediaError::Damaged {
                medium: self.uri().to_string(),
                container,
                object,
                reason: format!("checksum mismatch (crc32c {got:08x}, expected {crc:08x})"),
            });
        }
        Ok(())
    }
}
