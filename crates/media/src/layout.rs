//! Geometry and on-media format of containers.
//!
//! A medium is a sequence of containers of `container_size` bytes. Each container starts with
//! its device-metadata area (`reserved` bytes) followed by the data area (`usable` bytes),
//! which is cut into objects of `object_size` bytes (the last object may be shorter).
//!
//! Metadata area, in 4 KiB blocks:
//! - block 0: the container header (magic, format version, medium id, index, sizes, CRC32C);
//! - blocks 1..: the record log. Each block is written once (never rewritten, so a torn write
//!   can only hit a block that held nothing committed), carries its own CRC32C, the CRC of the
//!   previous block (a chain, so a stale block left behind a torn one is not taken as valid)
//!   and up to `RECORDS_PER_BLOCK` records: one per object (which image, meta or blob, image
//!   offset, length, CRC32C of the data) and one per completed image (the commit marker).
//!
//! All integers are little-endian. Every offset and length written is a multiple of 4 KiB so
//! that O_DIRECT works; an object shorter than its slot is zero-padded to 4 KiB on the media.

use crate::error::{MediaError, Result};

/// Size of a metadata block, and alignment of all media I/O.
pub const BLOCK: u64 = 4096;
/// Format version written in every new container header. Version 2 added the `State` image
/// kind (code 3); version-1 containers are read as before and never appended to by this
/// build (a writer starts a new container instead), so an older build never meets a record
/// it cannot decode in a container it accepts.
pub const FORMAT_VERSION: u32 = 2;
/// Oldest container format version this build reads.
pub const MIN_FORMAT_VERSION: u32 = 1;
/// Magic at the start of every container.
pub const CONTAINER_MAGIC: [u8; 8] = *b"SPNFSCTR";
/// Magic at the start of every record block.
pub const RECORD_MAGIC: [u8; 8] = *b"SPNFSREC";
/// Bytes of a record-block header.
pub const RECORD_HEADER: usize = 48;
/// Bytes of one record.
pub const RECORD_SIZE: usize = 48;
/// Records that fit in one metadata block.
pub const RECORDS_PER_BLOCK: usize = (BLOCK as usize - RECORD_HEADER) / RECORD_SIZE;
const HEADER_LEN: usize = 128;

/// Sizes of a medium. Built by the store from its config; recorded in every container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes of one container, device metadata included.
    pub container_size: u64,
    /// Bytes of device metadata at the start of each container.
    pub reserved: u64,
    /// Bytes of one object.
    pub object_size: u64,
    /// Staging chunk: the writer submits this many bytes of objects per batch.
    pub chunk_size: u64,
}

impl Geometry {
    /// Checks and builds a geometry.
    pub fn new(
        container_size: u64,
        reserved: u64,
        object_size: u64,
        chunk_size: u64,
    ) -> Result<Geometry> {
        let g = Geometry {
            container_size,
            reserved,
            object_size,
            chunk_size,
        };
        g.validate()?;
        Ok(g)
    }

    /// The geometry the store config uses by default for `container_size`: reserve 1/96 of
    /// the container rounded up to 4 KiB, at least 64 KiB (475 of 480 MiB).
    pub fn with_default_reserve(
        container_size: u64,
        object_size: u64,
        chunk_size: u64,
    ) -> Result<Geometry> {
        let reserved = (container_size / 96).next_multiple_of(BLOCK).max(64 * 1024);
        Geometry::new(container_size, reserved, object_size, chunk_size)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(MediaError::BadGeometry(m));
        for (name, v) in [
            ("container size", self.container_size),
            ("reserved size", self.reserved),
            ("object size", self.object_size),
            ("chunk size", self.chunk_size),
        ] {
            if v == 0 || v % BLOCK != 0 {
                return bad(format!("{name} {v} must be a non-zero multiple of 4 KiB"));
            }
        }
        if self.reserved < 2 * BLOCK {
            return bad(format!(
                "reserved size {} leaves no room for a record log (need at least 8 KiB)",
                self.reserved
            ));
        }
        if self.reserved >= self.container_size {
            return bad(format!(
                "reserved size {} leaves no data space in a container of {}",
                self.reserved, self.container_size
            ));
        }
        if self.object_size > self.usable() {
            return bad(format!(
                "object size {} is larger than the usable space {} of a container",
                self.object_size,
                self.usable()
            ));
        }
        if self.object_size > u32::MAX as u64 {
            return bad(format!("object size {} exceeds 4 GiB", self.object_size));
        }
        if self.objects_per_container() > u32::MAX as u64 {
            return bad("too many objects per container".into());
        }
        Ok(())
    }

    /// Bytes of a container that hold data.
    pub fn usable(&self) -> u64 {
        self.container_size - self.reserved
    }

    /// Objects per container (the last may be shorter).
    pub fn objects_per_container(&self) -> u64 {
        self.usable().div_ceil(self.object_size)
    }

    /// Capacity in bytes of object `object` of a container.
    pub fn object_capacity(&self, object: u64) -> u64 {
        let start = object * self.object_size;
        self.object_size.min(self.usable().saturating_sub(start))
    }

    /// Record blocks available in a container's metadata area.
    pub fn record_slots(&self) -> u64 {
        self.reserved / BLOCK - 1
    }

    /// Byte offset inside the container of data-area offset `data_offset`.
    pub fn data_to_container(&self, data_offset: u64) -> u64 {
        self.reserved + data_offset
    }

    /// Container byte offset of metadata block `slot` of the record log.
    pub fn record_slot_offset(&self, slot: u64) -> u64 {
        (1 + slot) * BLOCK
    }

    /// Objects a batch of `chunk_size` spans (at least one).
    pub fn objects_per_chunk(&self) -> usize {
        self.chunk_size.div_ceil(self.object_size).max(1) as usize
    }
}

/// Unique identity of a medium, chosen when its first container is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MediumId(pub [u8; 16]);

impl MediumId {
    /// A fresh random id (from the kernel's random source).
    pub fn random() -> std::io::Result<MediumId> {
        use std::io::Read;
        let mut id = [0u8; 16];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut id)?;
        Ok(MediumId(id))
    }
}

impl std::fmt::Display for MediumId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// What an image is: one half of an image pair, or a store-state snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ImageKind {
    Meta,
    Blob,
    /// A snapshot of the store's state written by the store in the same commit as a layer
    /// (format version 2): what makes the medium self-describing for disaster recovery.
    State,
}

impl ImageKind {
    fn code(self) -> u8 {
        match self {
            ImageKind::Meta => 1,
            ImageKind::Blob => 2,
            ImageKind::State => 3,
        }
    }
    fn from_code(c: u8) -> Option<ImageKind> {
        match c {
            1 => Some(ImageKind::Meta),
            2 => Some(ImageKind::Blob),
            3 => Some(ImageKind::State),
            _ => None,
        }
    }
}

impl std::fmt::Display for ImageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImageKind::Meta => "meta",
            ImageKind::Blob => "blob",
            ImageKind::State => "state",
        })
    }
}

/// An image as the store names it: layer/image id plus meta or blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageRef {
    pub id: u64,
    pub kind: ImageKind,
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.kind, self.id)
    }
}

/// Contiguous bytes on the medium: `length` bytes at `offset` of container `container`'s
/// data area, holding the image's bytes from `image_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub container: u64,
    pub offset: u64,
    pub length: u64,
    pub image_offset: u64,
}

/// Where a complete image lives: its extents in image order, covering `[0, length)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageExtents {
    pub image: ImageRef,
    pub length: u64,
    /// CRC32C of the whole image.
    pub crc: u32,
    pub extents: Vec<Extent>,
}

/// Appends `e` to `list`, merging it into the last extent when contiguous.
pub(crate) fn push_extent(list: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = list.last_mut()
        && last.container == e.container
        && last.offset + last.length == e.offset
        && last.image_offset + last.length == e.image_offset
    {
        last.length += e.length;
        return;
    }
    list.push(e);
}

/// The decoded container header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerHeader {
    /// Format version the container was created with.
    pub version: u32,
    pub medium: MediumId,
    pub container: u64,
    pub geometry: Geometry,
    pub created_unix: u64,
}

fn crc_with_zeroed(buf: &[u8], crc_at: usize) -> u32 {
    let mut c = crc32c::crc32c(&buf[..crc_at]);
    c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &buf[crc_at + 4..])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl ContainerHeader {
    /// Encodes into the first bytes of `block` (a zeroed 4 KiB block).
    pub fn encode(&self, block: &mut [u8]) {
        let b = &mut block[..HEADER_LEN];
        b.fill(0);
        b[0..8].copy_from_slice(&CONTAINER_MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b[16..32].copy_from_slice(&self.medium.0);
        b[32..40].copy_from_slice(&self.container.to_le_bytes());
        b[40..48].copy_from_slice(&self.geometry.container_size.to_le_bytes());
        b[48..56].copy_from_slice(&self.geometry.reserved.to_le_bytes());
        b[56..64].copy_from_slice(&self.geometry.object_size.to_le_bytes());
        b[64..72].copy_from_slice(&self.geometry.chunk_size.to_le_bytes());
        b[72..80].copy_from_slice(&self.created_unix.to_le_bytes());
        let crc = crc_with_zeroed(b, 124);
        b[124..128].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes a header; `Err` says why the bytes are not a valid header.
    pub fn decode(block: &[u8]) -> std::result::Result<ContainerHeader, String> {
        if block.len() < HEADER_LEN {
            return Err("header block is short".into());
        }
        let b = &block[..HEADER_LEN];
        if b[0..8] != CONTAINER_MAGIC {
            return Err("no container magic".into());
        }
        if u32_at(b, 124) != crc_with_zeroed(b, 124) {
            return Err("header checksum mismatch".into());
        }
        let version = u32_at(b, 8);
        if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(format!(
                "format version {version}, this build reads versions {MIN_FORMAT_VERSION} to \
                 {FORMAT_VERSION}"
            ));
        }
        let geometry = Geometry {
            container_size: u64_at(b, 40),
            reserved: u64_at(b, 48),
            object_size: u64_at(b, 56),
            chunk_size: u64_at(b, 64),
        };
        geometry.validate().map_err(|e| e.to_string())?;
        Ok(ContainerHeader {
            version,
            medium: MediumId(b[16..32].try_into().expect("16 bytes")),
            container: u64_at(b, 32),
            geometry,
            created_unix: u64_at(b, 72),
        })
    }
}

/// One entry of a container's record log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// Object `object` of this container holds `len` bytes of `image` from `image_offset`.
    Object {
        object: u32,
        image: ImageRef,
        stream: u64,
        image_offset: u64,
        len: u32,
        crc: u32,
    },
    /// The image written by `stream` is complete: `length` bytes in `objects` objects.
    Complete {
        image: ImageRef,
        stream: u64,
        length: u64,
        objects: u32,
        crc: u32,
    },
}

impl Record {
    fn encode(&self, b: &mut [u8]) {
        b[..RECORD_SIZE].fill(0);
        match *self {
            Record::Object {
                object,
                image,
                stream,
                image_offset,
                len,
                crc,
            } => {
                b[0] = 1;
                b[1] = image.kind.code();
                b[4..8].copy_from_slice(&object.to_le_bytes());
                b[8..16].copy_from_slice(&image.id.to_le_bytes());
                b[16..24].copy_from_slice(&stream.to_le_bytes());
                b[24..32].copy_from_slice(&image_offset.to_le_bytes());
                b[32..36].copy_from_slice(&len.to_le_bytes());
                b[36..40].copy_from_slice(&crc.to_le_bytes());
            }
            Record::Complete {
                image,
                stream,
                length,
                objects,
                crc,
            } => {
                b[0] = 2;
                b[1] = image.kind.code();
                b[4..8].copy_from_slice(&objects.to_le_bytes());
                b[8..16].copy_from_slice(&image.id.to_le_bytes());
                b[16..24].copy_from_slice(&stream.to_le_bytes());
                b[24..32].copy_from_slice(&length.to_le_bytes());
                b[32..36].copy_from_slice(&crc.to_le_bytes());
            }
        }
    }

    fn decode(b: &[u8]) -> std::result::Result<Record, String> {
        let kind = ImageKind::from_code(b[1]).ok_or_else(|| format!("bad image kind {}", b[1]))?;
        let image = ImageRef {
            id: u64_at(b, 8),
            kind,
        };
        match b[0] {
            1 => Ok(Record::Object {
                object: u32_at(b, 4),
                image,
                stream: u64_at(b, 16),
                image_offset: u64_at(b, 24),
                len: u32_at(b, 32),
                crc: u32_at(b, 36),
            }),
            2 => Ok(Record::Complete {
                image,
                objects: u32_at(b, 4),
                stream: u64_at(b, 16),
                length: u64_at(b, 24),
                crc: u32_at(b, 32),
            }),
            t => Err(format!("bad record type {t}")),
        }
    }
}

/// A decoded record block.
#[derive(Debug, Clone)]
pub struct RecordBlock {
    pub slot: u32,
    pub prev_crc: u32,
    pub crc: u32,
    pub records: Vec<Record>,
}

/// Encodes a record block into `block` (4 KiB); returns its CRC (the next block's prev_crc).
pub fn encode_record_block(
    block: &mut [u8],
    medium: MediumId,
    container: u64,
    slot: u32,
    prev_crc: u32,
    records: &[Record],
) -> u32 {
    assert!(
        records.len() <= RECORDS_PER_BLOCK,
        "too many records for a block"
    );
    let b = &mut block[..BLOCK as usize];
    b.fill(0);
    b[0..8].copy_from_slice(&RECORD_MAGIC);
    b[8..24].copy_from_slice(&medium.0);
    b[24..32].copy_from_slice(&container.to_le_bytes());
    b[32..36].copy_from_slice(&slot.to_le_bytes());
    b[36..40].copy_from_slice(&(records.len() as u32).to_le_bytes());
    b[40..44].copy_from_slice(&prev_crc.to_le_bytes());
    for (i, r) in records.iter().enumerate() {
        let at = RECORD_HEADER + i * RECORD_SIZE;
        r.encode(&mut b[at..at + RECORD_SIZE]);
    }
    let crc = crc_with_zeroed(b, 44);
    b[44..48].copy_from_slice(&crc.to_le_bytes());
    crc
}

/// Decodes a record block expected at `slot` of `container` after a block whose CRC was
/// `prev_crc`. `Err` means the block is not a valid continuation of the log (never written,
/// torn, stale, or of another medium): the log ends before it.
pub fn decode_record_block(
    block: &[u8],
    medium: MediumId,
    container: u64,
    slot: u32,
    prev_crc: u32,
) -> std::result::Result<RecordBlock, String> {
    let b = &block[..BLOCK as usize];
    if b[0..8] != RECORD_MAGIC {
        return Err("no record magic".into());
    }
    let crc = u32_at(b, 44);
    if crc != crc_with_zeroed(b, 44) {
        return Err("record block checksum mismatch".into());
    }
    if b[8..24] != medium.0 {
        return Err("record block of another medium".into());
    }
    if u64_at(b, 24) != container || u32_at(b, 32) != slot {
        return Err("record block at the wrong place".into());
    }
    if u32_at(b, 40) != prev_crc {
        return Err("record block does not follow the previous one".into());
    }
    let count = u32_at(b, 36) as usize;
    if count > RECORDS_PER_BLOCK {
        return Err(format!("record count {count} too large"));
    }
    let mut records = Vec::with_capacity(count);
    for i in 0..count {
        let at = RECORD_HEADER + i * RECORD_SIZE;
        records.push(Record::decode(&b[at..at + RECORD_SIZE])?);
    }
    Ok(RecordBlock {
        slot,
        prev_crc,
        crc,
        records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_geometry() {
        let g = Geometry::with_default_reserve(480 << 20, 252 << 10, 4 << 20).unwrap();
        assert_eq!(g.usable(), 475 << 20);
        assert_eq!(g.objects_per_container(), 1931);
        assert_eq!(g.object_capacity(1930), 40 << 10);
        assert_eq!(g.object_capacity(1929), 252 << 10);
        assert!(g.record_slots() as usize * RECORDS_PER_BLOCK > 1931 * 2);
    }

    #[test]
    fn header_and_records_round_trip_and_detect_damage() {
        let g = Geometry::new(1 << 20, 64 << 10, 64 << 10, 256 << 10).unwrap();
        let h = ContainerHeader {
            version: FORMAT_VERSION,
            medium: MediumId([7; 16]),
            container: 3,
            geometry: g,
            created_unix: 42,
        };
        let mut blk = vec![0u8; 4096];
        h.encode(&mut blk);
        assert_eq!(ContainerHeader::decode(&blk).unwrap(), h);
        blk[40] ^= 1;
        assert!(ContainerHeader::decode(&blk).is_err());

        let recs = [
            Record::Object {
                object: 5,
                image: ImageRef {
                    id: 9,
                    kind: ImageKind::Blob,
                },
                stream: 77,
                image_offset: 1 << 40,
                len: 1000,
                crc: 0xdead_beef,
            },
            Record::Complete {
                image: ImageRef {
                    id: 9,
                    kind: ImageKind::Meta,
                },
                stream: 78,
                length: 12345,
                objects: 1,
                crc: 1,
            },
        ];
        let crc = encode_record_block(&mut blk, h.medium, 3, 2, 99, &recs);
        let d = decode_record_block(&blk, h.medium, 3, 2, 99).unwrap();
        assert_eq!(d.records, recs);
        assert_eq!(d.crc, crc);
        assert!(decode_record_block(&blk, h.medium, 3, 2, 98).is_err());
        assert!(decode_record_block(&blk, h.medium, 4, 2, 99).is_err());
        assert!(decode_record_block(&blk, MediumId([8; 16]), 3, 2, 99).is_err());
        blk[100] ^= 0x10;
        assert!(decode_record_block(&blk, h.medium, 3, 2, 99).is_err());
    }
}
