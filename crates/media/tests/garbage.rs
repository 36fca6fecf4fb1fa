//! Bad input never panics: garbled containers and nonsense extents give errors.

use proptest::prelude::*;
use spinfs_media::backend::BackendOptions;
use spinfs_media::*;
use std::os::unix::fs::FileExt;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn garbled_media_gives_errors_not_panics(
        hits in prop::collection::vec((0u64..2, 0u64..(1 << 20), any::<u8>()), 1..40),
        extents in prop::collection::vec((0u64..4, any::<u64>(), any::<u64>(), any::<u64>()), 0..4),
    ) {
        let t = tempfile::tempdir().unwrap();
        let uri = format!("dir:{}", t.path().join("m").display());
        let g = Geometry::with_default_reserve(1 << 20, 64 << 10, 256 << 10).unwrap();
        let m = Medium::open(&uri, g, BackendOptions::default()).unwrap();
        let mut w = MediumWriter::open(m.clone(), None).unwrap();
        let img = ImageRef { id: 1, kind: ImageKind::Meta };
        w.begin_image(img).unwrap();
        w.append(&vec![0x5A; 1_200_000]).unwrap();
        let good = w.finish_image().unwrap();
        w.commit().unwrap();
        drop(w);
        // Garble bytes anywhere, metadata included (the first 64 KiB of each container).
        for (c, at, v) in hits {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(t.path().join("m").join(format!("c{c:08}.spc")))
                .unwrap();
            let at = if at % 2 == 0 { at % (16 << 10) } else { at };
            f.write_all_at(&[v], at).unwrap();
        }
        if let Ok(m) = Medium::open(&uri, g, BackendOptions::default()) {
            let _ = Catalogue::scan(&m, &mut |_, _| {});
            let _ = verify(&m, &mut |_, _| {});
            let r = MediumReader::new(m.clone(), None);
            let _ = r.read(&good, 0, good.length, ReadOptions::default());
            let bogus = ImageExtents {
                image: img,
                length: u64::MAX,
                crc: 0,
                extents: extents
                    .iter()
                    .map(|&(container, offset, length, image_offset)| Extent { container, offset, length, image_offset })
                    .collect(),
            };
            let _ = r.read(&bogus, 0, 1 << 20, ReadOptions::default());
            let _ = r.read(&bogus, u64::MAX - 5, 5, ReadOptions::default());
            let _ = MediumWriter::open(m, None).and_then(|mut w| {
                w.begin_image(ImageRef { id: 2, kind: ImageKind::Blob })?;
                w.append(b"more")?;
                w.finish_image()?;
                w.commit()
            });
        }
    }
}
