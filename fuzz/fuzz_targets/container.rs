//! Container metadata parsing: arbitrary bytes as a container's header and record log
//! (`Medium::parse_container_meta`, what `spinfs media ls/verify`, the catalogue and every
//! writer and reader start with), plus the header and record-block decoders on their own.
//!
//! Checksums, chain values and identity fields are patched to be valid before parsing when
//! the first byte is odd, so mutations reach the record parser; raw bytes otherwise.
#![no_main]

use spinfs_media::layout::{ContainerHeader, decode_record_block};
use spinfs_media::{BackendOptions, Geometry, ImageKind, ImageRef, Medium, MediumWriter};
use std::sync::{Arc, OnceLock};

const BLOCK: usize = 4096;

fn crc_with_zeroed(b: &[u8], at: usize) -> u32 {
    let c = crc32c::crc32c(&b[..at]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &b[at + 4..])
}

/// A small medium with one committed image (so it has an id), made once per process; its
/// files are removed once it is open.
fn medium() -> &'static Arc<Medium> {
    static M: OnceLock<Arc<Medium>> = OnceLock::new();
    M.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("spinfs-fuzz-medium-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let g = Geometry::with_default_reserve(1 << 20, 64 << 10, 64 << 10).unwrap();
        let uri = format!("dir:{}", dir.display());
        let m = Medium::open(&uri, g, BackendOptions::default()).unwrap();
        let mut w = MediumWriter::open(m.clone(), None).unwrap();
        w.begin_image(ImageRef {
            id: 1,
            kind: ImageKind::Meta,
        })
        .unwrap();
        w.append(b"fuzz").unwrap();
        w.finish_image().unwrap();
        w.commit().unwrap();
        drop(w);
        let m = Medium::open(&uri, g, BackendOptions::default()).unwrap();
        // parsing needs only the id and geometry read now: leave nothing behind
        let _ = std::fs::remove_dir_all(&dir);
        m
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let m = medium();
    let g = m.geometry();
    let id = m.id().expect("the medium has an id");
    let mut meta = vec![0u8; g.reserved as usize];
    let n = rest.len().min(meta.len());
    meta[..n].copy_from_slice(&rest[..n]);
    // the decoders alone, on raw bytes
    let _ = ContainerHeader::decode(&meta[..BLOCK]);
    let _ = decode_record_block(&meta[BLOCK..2 * BLOCK], id, 0, 0, 0);
    if mode & 1 == 1 {
        // a valid header for container 0 of this medium, then a valid chain of record
        // blocks for as long as the input has blocks with any byte set
        ContainerHeader {
            // both format versions the reader accepts
            version: if mode & 2 == 2 {
                spinfs_media::layout::MIN_FORMAT_VERSION
            } else {
                spinfs_media::layout::FORMAT_VERSION
            },
            medium: id,
            container: 0,
            geometry: g,
            created_unix: u64::from_le_bytes(meta[72..80].try_into().unwrap()),
        }
        .encode(&mut meta[..BLOCK]);
        let mut prev = u32::from_le_bytes(meta[124..128].try_into().unwrap());
        for slot in 0..g.record_slots() {
            let at = g.record_slot_offset(slot) as usize;
            let b = &mut meta[at..at + BLOCK];
            if b.iter().all(|&x| x == 0) {
                break;
            }
            b[0..8].copy_from_slice(&spinfs_media::layout::RECORD_MAGIC);
            b[8..24].copy_from_slice(&id.0);
            b[24..32].copy_from_slice(&0u64.to_le_bytes());
            b[32..36].copy_from_slice(&(slot as u32).to_le_bytes());
            b[40..44].copy_from_slice(&prev.to_le_bytes());
            prev = crc_with_zeroed(b, 44);
            b[44..48].copy_from_slice(&prev.to_le_bytes());
        }
    }
    if let Ok(scan) = m.parse_container_meta(0, &meta) {
        assert!(scan.record_blocks <= g.record_slots());
        assert_eq!(scan.objects.len() as u64, g.objects_per_container());
    }
});
