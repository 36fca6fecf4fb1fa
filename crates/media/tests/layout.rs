//! Layout, durability, torn tails, checksums and catalogue rebuild on real backends.

use spinfs_media::backend::BackendOptions;
use spinfs_media::sched;
use spinfs_media::*;
use std::path::Path;
use std::sync::Arc;

const OBJ: u64 = 64 << 10;
const USABLE: u64 = (1 << 20) - (64 << 10); // 15 objects

fn geom() -> Geometry {
    Geometry::with_default_reserve(1 << 20, OBJ, 256 << 10).unwrap()
}

fn opts(engine: EngineChoice) -> BackendOptions {
    BackendOptions {
        engine,
        direct: true,
        read_only: false,
    }
}

fn open(uri: &str, engine: EngineChoice) -> Arc<Medium> {
    Medium::open(uri, geom(), opts(engine)).unwrap()
}

fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn blob(id: u64) -> ImageRef {
    ImageRef {
        id,
        kind: ImageKind::Blob,
    }
}

fn write_image(w: &mut MediumWriter, image: ImageRef, bytes: &[u8], piece: usize) -> ImageExtents {
    w.begin_image(image).unwrap();
    for c in bytes.chunks(piece.max(1)) {
        w.append(c).unwrap();
    }
    w.finish_image().unwrap()
}

fn dir_uri(t: &tempfile::TempDir) -> String {
    format!("dir:{}", t.path().join("media").display())
}

fn container_file(t: &tempfile::TempDir, c: u64) -> std::path::PathBuf {
    t.path().join("media").join(format!("c{c:08}.spc"))
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
    f.sync_all().unwrap();
}

fn roundtrip(engine: EngineChoice) {
    let t = tempfile::tempdir().unwrap();
    let m = open(&dir_uri(&t), engine);
    let mut w = MediumWriter::open(m.clone(), None).unwrap();
    if engine == EngineChoice::Uring {
        assert_eq!(m.backend().engine_name(), "io_uring");
    }
    let a = data(1, 700_000);
    let b = data(2, 3000);
    let ea = write_image(&mut w, blob(1), &a, 100_000);
    let eb = write_image(
        &mut w,
        ImageRef {
            id: 1,
            kind: ImageKind::Meta,
        },
        &b,
        7,
    );
    let info = w.commit().unwrap();
    assert_eq!(info.images.len(), 2);
    assert_eq!(ea.length, a.len() as u64);
    assert_eq!(ea.crc, crc32c::crc32c(&a));
    let r = MediumReader::new(m.clone(), None);
    assert_eq!(
        r.read(&ea, 0, a.len() as u64, ReadOptions::default())
            .unwrap(),
        a
    );
    assert_eq!(r.read(&eb, 0, 3000, ReadOptions::default()).unwrap(), b);
    for (off, len) in [
        (0u64, 1u64),
        (65535, 2),
        (131072, 65536),
        (699_999, 1),
        (300_000, 250_000),
    ] {
        let got = r.read(&ea, off, len, ReadOptions::default()).unwrap();
        assert_eq!(
            got,
            &a[off as usize..(off + len) as usize],
            "range {off}+{len}"
        );
    }
    // A one-byte read fetches exactly one object.
    let before = r.stats().objects_fetched;
    r.read(&ea, 200_000, 1, ReadOptions::default()).unwrap();
    assert_eq!(r.stats().objects_fetched - before, 1);
    assert!(r.read(&ea, 699_999, 2, ReadOptions::default()).is_err());
}

#[test]
fn roundtrip_uring() {
    roundtrip(EngineChoice::Uring);
}

#[test]
fn roundtrip_pwrite() {
    roundtrip(EngineChoice::Pwrite);
}

#[test]
fn boundaries_object_and_container() {
    let t = tempfile::tempdir().unwrap();
    let m = open(&dir_uri(&t), EngineChoice::Auto);
    let mut w = MediumWriter::open(m.clone(), None).unwrap();
    // Exactly one object, then one byte past an object.
    let e1 = write_image(&mut w, blob(1), &data(1, OBJ as usize), 4096);
    assert_eq!(
        e1.extents,
        vec![Extent {
            container: 0,
            offset: 0,
            length: OBJ,
            image_offset: 0
        }]
    );
    let e2 = write_image(&mut w, blob(2), &data(2, OBJ as usize + 1), 4096);
    assert_eq!(
        e2.extents,
        vec![Extent {
            container: 0,
            offset: OBJ,
            length: OBJ + 1,
            image_offset: 0
        }]
    );
    // e2 used objects 1 and 2 (the second holds 1 byte); fill the rest of container 0 exactly.
    let rest = USABLE - 3 * OBJ;
    let e3 = write_image(&mut w, blob(3), &data(3, rest as usize), 50_000);
    assert_eq!(e3.extents.len(), 1);
    assert_eq!(e3.extents[0].offset + e3.extents[0].length, USABLE);
    assert_eq!(e3.extents[0].container, 0);
    // The next byte goes to container 1, object 0.
    let e4 = write_image(&mut w, blob(4), &data(4, 1), 1);
    assert_eq!(
        e4.extents,
        vec![Extent {
            container: 1,
            offset: 0,
            length: 1,
            image_offset: 0
        }]
    );
    // An image spanning a container end: exactly a container's worth, then one byte more.
    let e5 = write_image(&mut w, blob(5), &data(5, USABLE as usize + 1), 300_000);
    // Container 1 has 14 free objects after e4; the rest (one object and one byte) rolls over.
    assert_eq!(
        e5.extents,
        vec![
            Extent {
                container: 1,
                offset: OBJ,
                length: USABLE - OBJ,
                image_offset: 0
            },
            Extent {
                container: 2,
                offset: 0,
                length: OBJ + 1,
                image_offset: USABLE - OBJ
            },
        ]
    );
    w.commit().unwrap();
    assert_eq!(m.containers().unwrap(), 3);

    let m2 = open(&dir_uri(&t), EngineChoice::Pwrite);
    let cat = Catalogue::scan(&m2, &mut |_, _| {}).unwrap();
    assert!(cat.problems.is_empty(), "{:?}", cat.problems);
    assert!(cat.incomplete.is_empty());
    for (e, id) in [(&e1, 1), (&e2, 2), (&e3, 3), (&e4, 4), (&e5, 5)] {
        assert_eq!(cat.images.get(&blob(id)), Some(e), "image {id}");
        let r = MediumReader::new(m2.clone(), None);
        let got = r.read(e, 0, e.length, ReadOptions::default()).unwrap();
        assert_eq!(got, data(id, e.length as usize));
    }
    // Object 2 holds one byte of image 2; every other object of container 0 is full.
    assert_eq!(cat.containers[0].data_bytes, USABLE - OBJ + 1);
    assert_eq!(cat.containers[0].objects, 15);
}

#[test]
fn commit_mid_image_seals_partial_object_and_resume_continues() {
    let t = tempfile::tempdir().unwrap();
    let m = open(&dir_uri(&t), EngineChoice::Auto);
    let a = data(7, 200_000);
    {
        let mut w = MediumWriter::open(m.clone(), None).unwrap();
        w.begin_image(blob(7)).unwrap();
        w.append(&a[..1000]).unwrap();
        w.commit().unwrap();
        w.append(&a[1000..]).unwrap();
        let e = w.finish_image().unwrap();
        // The partial object is never rewritten: the rest starts at the next object.
        assert_eq!(e.extents.len(), 2);
        assert_eq!(e.extents[1].offset, OBJ);
        w.commit().unwrap();
    }
    let mut w = MediumWriter::open(m.clone(), None).unwrap();
    let e8 = write_image(&mut w, blob(8), &data(8, 10), 10);
    assert_eq!(e8.extents[0].container, 0);
    assert_eq!(e8.extents[0].offset, 5 * OBJ);
    w.commit().unwrap();
    let cat = Catalogue::scan(&m, &mut |_, _| {}).unwrap();
    let r = MediumReader::new(m.clone(), None);
    let e7 = &cat.images[&blob(7)];
    assert_eq!(
        r.read(e7, 0, a.len() as u64, ReadOptions::default())
            .unwrap(),
        a
    );
}

#[test]
fn torn_tail_uncommitted_data_is_ignored() {
    let t = tempfile::tempdir().unwrap();
    let m = open(&dir_uri(&t), EngineChoice::Auto);
    let a = data(1, 100_000);
    let ea = {
        let mut w = MediumWriter::open(m.clone(), None).unwrap();
        let ea = write_image(&mut w, blob(1), &a, 100_000);
        w.commit().unwrap();
        // A crash: objects reach the medium (one chunk is submitted), no commit.
        w.begin_image(blob(2)).unwrap();
        w.append(&data(2, 400_000)).unwrap();
        ea
    };
    let m = open(&dir_uri(&t), EngineChoice::Auto);
    let cat = Catalogue::scan(&m, &mut |_, _| {}).unwrap();
    assert!(cat.images.contains_key(&blob(1)));
    assert!(!cat.images.contains_key(&blob(2)));
    assert!(cat.containers[0].unrecorded_tail);
    assert!(cat.problems.is_empty());
    let rep = verify(&m, &mut |_, _| {}).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    assert_eq!(rep.torn.len(), 1);
    // Writing again overwrites the torn tail; the retry of image 2 is complete.
    let mut w = MediumWriter::open(m.clone(), None).unwrap();
    let b = data(3, 150_000);
    let eb = write_image(&mut w, blob(2), &b, 150_000);
    w.commit().unwrap();
    let cat = Catalogue::scan(&m, &mut |_, _| {}).unwrap();
    assert_eq!(cat.images[&blob(2)], eb);
    assert_eq!(cat.images[&blob(1)], ea);
    let r = MediumReader::new(m.clone(), None);
    assert_eq!(
        r.read(&eb, 0, b.len() as u64, ReadOptions::default())
            .unwrap(),
        b
    );
}

#[test]
fn torn_record_block_ends_the_log() {
    let t = tempfile::tempdir().unwrap();
    let m = open(&dir_uri(&t), EngineChoice::Auto);
    let mut w = MediumWriter::open(m.clone(), None).unwrap();
    let ea = write_image(&mut w, blob(1), &data(1, 70_000), 70_000);
    w.commit().unwrap();
    write_image(&mut w, blob(2), &data(2, 70_000), 70_000);
    w.commit().unwrap();
    drop(w);
    // Garble the second record block (slot 1, at 8 KiB): as if its write was torn.
    patch(&container_file(&t, 0), 8192 + 100, b"garbage");
    let m = open(&dir_uri(&t), EngineChoice::Auto);
    let cat = Catalogue::scan(&m, &mut |_, _| {}).unwrap();
    assert_eq!(cat.images.len(), 1);
    assert_eq!(cat.images[&blob(1)], ea);
    assert!(cat.containers[0].torn_log.is_some());
    // The writer continues at the torn slot, overwriting it.
    let mut w = MediumWriter::open(m.clone(), None).unwrap();
    let e3 = write_image(&mut w, blob(3), &data(3, 5), 5);
    w.commit().unwrap();
    let cat = Catalogue::scan(&m, &mut |_, _| {}).unwrap();
    assert_eq!(cat.images.get(&blob(3)), Some(&e3));
    assert!(cat.containers[0].torn_log.is_none());
}

#[test]
fn checksum_failure_names_container_and_object() {
    let t = tempfile::tempdir().unwrap();
    let m = open(&dir_uri(&t), EngineChoice::Auto);
    let mut w = MediumWriter::open(m.clone(), None).unwrap();
    let a = data(1, (USABLE + 3 * OBJ) as usize);
    let ea = write_image(&mut w, blob(1), &a, 1 << 20);
    w.commit().unwrap();
    drop(w);
    // Flip a byte in object 1 of container 1 (data area starts at 64 KiB).
    patch(&container_file(&t, 1), (64 << 10) + OBJ + 5, &[0xAA]);
    let m = open(&dir_uri(&t), EngineChoice::Auto);
    let r = MediumReader::new(m.clone(), None);
    let err = r
        .read(&ea, USABLE + OBJ, 10, ReadOptions::default())
        .unwrap_err();
    match &err {
        MediaError::Damaged {
            container,
            object,
            medium,
            ..
        } => {
            assert_eq!((*container, *object), (1, 1));
            assert!(medium.starts_with("dir:"));
        }
        e => panic!("unexpected {e}"),
    }
    assert!(err.to_string().contains("container 1 object 1"), "{err}");
    // Other ranges still read.
    assert_eq!(
        r.read(&ea, 0, 100, ReadOptions::default()).unwrap(),
        &a[..100]
    );
    assert_eq!(
        r.read(&ea, USABLE + 2 * OBJ, 100, ReadOptions::default())
            .unwrap(),
        &a[(USABLE + 2 * OBJ) as usize..][..100]
    );
    let rep = verify(&m, &mut |_, _| {}).unwrap();
    assert_eq!(rep.damaged.len(), 1, "{rep:?}");
    assert_eq!((rep.damaged[0].container, rep.damaged[0].object), (1, 1));
    assert_eq!(rep.objects, 18);
}

#[test]
fn truncated_last_object_is_damage_not_data() {
    let t = tempfile::tempdir().unwrap();
    let m = open(&dir_uri(&t), EngineChoice::Auto);
    let mut w = MediumWriter::open(m.clone(), None).unwrap();
    let ea = write_image(
        &mut w,
        blob(1),
        &data(1, 2 * OBJ as usize + 10_000),
        1 << 20,
    );
    w.commit().unwrap();
    drop(w);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(container_file(&t, 0))
        .unwrap();
    f.set_len((64 << 10) + 2 * OBJ + 100).unwrap();
    let m = open(&dir_uri(&t), EngineChoice::Auto);
    let r = MediumReader::new(m.clone(), None);
    let err = r
        .read(&ea, 2 * OBJ, 10, ReadOptions::default())
        .unwrap_err();
    assert!(
        matches!(
            err,
            MediaError::Damaged {
                container: 0,
                object: 2,
                ..
            }
        ),
        "{err}"
    );
    let rep = verify(&m, &mut |_, _| {}).unwrap();
    assert_eq!(rep.damaged.len(), 1);
    assert_eq!(rep.damaged[0].object, 2);
}

#[test]
fn many_commits_roll_the_record_log_over() {
    // 15 record slots per container: 40 committed images cannot all fit one container's log.
    let t = tempfile::tempdir().unwrap();
    let m = open(&dir_uri(&t), EngineChoice::Auto);
    let mut w = MediumWriter::open(m.clone(), None).unwrap();
    let mut all = Vec::new();
    for i in 0..40u64 {
        let e = write_image(&mut w, blob(i), &data(i, (i * 37) as usize), 1000);
        w.commit().unwrap();
        all.push(e);
    }
    drop(w);
    let m = open(&dir_uri(&t), EngineChoice::Auto);
    let cat = Catalogue::scan(&m, &mut |_, _| {}).unwrap();
    assert!(cat.containers.len() >= 3);
    assert!(cat.problems.is_empty(), "{:?}", cat.problems);
    let r = MediumReader::new(m.clone(), None);
    for (i, e) in all.iter().enumerate() {
        assert_eq!(cat.images.get(&blob(i as u64)), Some(e));
        assert_eq!(
            r.read(e, 0, e.length, ReadOptions::default()).unwrap(),
            data(i as u64, e.length as usize)
        );
    }
}

#[test]
fn misuse_and_geometry_errors_are_typed() {
    let t = tempfile::tempdir().unwrap();
    let m = open(&dir_uri(&t), EngineChoice::Auto);
    let mut w = MediumWriter::open(m.clone(), None).unwrap();
    assert!(matches!(w.append(b"x"), Err(MediaError::Misuse { .. })));
    w.begin_image(blob(1)).unwrap();
    assert!(matches!(
        w.begin_image(blob(2)),
        Err(MediaError::Misuse { .. })
    ));
    w.append(b"abc").unwrap();
    w.finish_image().unwrap();
    w.commit().unwrap();
    let other = Geometry::with_default_reserve(2 << 20, OBJ, 256 << 10).unwrap();
    let e = Medium::open(&dir_uri(&t), other, BackendOptions::default())
        .err()
        .unwrap();
    assert!(matches!(e, MediaError::GeometryMismatch { .. }), "{e}");
    assert!(matches!(
        Medium::open("s3:bucket", geom(), BackendOptions::default())
            .err()
            .unwrap(),
        MediaError::BadUri { .. }
    ));
    assert!(Geometry::new(1 << 20, 4096, OBJ, 256 << 10).is_err());
    assert!(Geometry::new(1 << 20, 64 << 10, 1000, 256 << 10).is_err());
}

#[test]
fn file_backend_on_regular_file() {
    let t = tempfile::tempdir().unwrap();
    let uri = format!("file:{}", t.path().join("medium.img").display());
    let m = open(&uri, EngineChoice::Auto);
    let mut w = MediumWriter::open(m.clone(), None).unwrap();
    let a = data(9, (2 * USABLE) as usize);
    let ea = write_image(&mut w, blob(9), &a, 123_457);
    w.commit().unwrap();
    drop(w);
    let m = open(&uri, EngineChoice::Pwrite);
    let cat = Catalogue::scan(&m, &mut |_, _| {}).unwrap();
    assert_eq!(cat.images[&blob(9)], ea);
    // Exactly two containers' worth fills two containers, no third.
    assert_eq!(cat.containers.len(), 2);
    assert_eq!(cat.containers[1].data_bytes, USABLE);
    let r = MediumReader::new(m, None);
    assert_eq!(
        r.read(&ea, USABLE - 5, 10, ReadOptions::default()).unwrap(),
        &a[(USABLE - 5) as usize..][..10]
    );
}

#[test]
fn commit_on_empty_medium_and_reader_sees_later_appends() {
    let t = tempfile::tempdir().unwrap();
    let m = open(&dir_uri(&t), EngineChoice::Auto);
    let mut w = MediumWriter::open(m.clone(), None).unwrap();
    assert_eq!(w.commit().unwrap(), CommitInfo::default());
    assert_eq!(m.containers().unwrap(), 0);
    let e1 = write_image(&mut w, blob(1), &data(1, 1000), 1000);
    w.commit().unwrap();
    let r = MediumReader::new(m.clone(), None);
    r.read(&e1, 0, 10, ReadOptions::default()).unwrap();
    // Container 0's index is cached; a later image in it is still found.
    let e2 = write_image(&mut w, blob(2), &data(2, 1000), 1000);
    w.commit().unwrap();
    assert_eq!(e2.extents[0].container, 0);
    assert_eq!(
        r.read(&e2, 0, 1000, ReadOptions::default()).unwrap(),
        data(2, 1000)
    );
}

#[test]
fn reads_through_scheduler_and_model_are_batched() {
    use spinfs_media::model::ModelDevice;
    use std::time::Duration;
    let t = tempfile::tempdir().unwrap();
    let m = open(&dir_uri(&t), EngineChoice::Auto);
    let mut w = MediumWriter::open(m.clone(), None).unwrap();
    let a = data(5, (3 * USABLE) as usize);
    let ea = write_image(&mut w, blob(5), &a, 1 << 20);
    w.commit().unwrap();
    drop(w);
    let params = ModelParams {
        switch: Duration::from_millis(20),
        seek: Duration::from_millis(1),
        bandwidth: 1 << 30,
    };
    let dev = Arc::new(ModelDevice::new(
        params,
        Some(m.clone() as Arc<dyn sched::Device>),
        0.0,
    ));
    let s = MediaScheduler::new(dev.clone(), SchedConfig::default());
    let r = MediumReader::new(m.clone(), Some(s.clone()));
    // One read covering all three containers: each container loaded once for its index and
    // its data, in the order the scheduler chose.
    let got = r
        .read(
            &ea,
            1000,
            3 * USABLE - 2000,
            ReadOptions {
                class: Class::Foreground,
                timeout: Some(Duration::from_secs(10)),
            },
        )
        .unwrap();
    assert_eq!(got, &a[1000..(3 * USABLE - 1000) as usize]);
    let st = s.stats();
    assert_eq!(st.reads, 6, "{st:?}");
    assert!(dev.counters().switches <= 6);
}

#[test]
fn writer_through_scheduler_respects_the_bandwidth_cap() {
    use std::time::{Duration, Instant};
    let t = tempfile::tempdir().unwrap();
    let m = open(&dir_uri(&t), EngineChoice::Uring);
    let cfg = SchedConfig {
        bg_write_rate: 8 << 20,
        bg_write_burst: 256 << 10,
        ..SchedConfig::default()
    };
    let s = MediaScheduler::new(m.clone() as Arc<dyn sched::Device>, cfg);
    let mut w = MediumWriter::open(m.clone(), Some(s.clone())).unwrap();
    let a = data(11, 2 << 20);
    let start = Instant::now();
    let e = write_image(&mut w, blob(11), &a, 100_000);
    w.commit().unwrap();
    let el = start.elapsed();
    // 2 MiB of objects (plus 4 KiB-padding of the last) at 8 MiB/s after a 256 KiB burst.
    assert!(el >= Duration::from_millis(210), "took {el:?}");
    assert!(s.stats().bytes_written >= 2 << 20);
    let r = MediumReader::new(m.clone(), Some(s.clone()));
    assert_eq!(r.read(&e, 0, e.length, ReadOptions::default()).unwrap(), a);
}

#[test]
fn damaged_header_is_reported_and_never_overwritten() {
    let t = tempfile::tempdir().unwrap();
    let m = open(&dir_uri(&t), EngineChoice::Auto);
    let mut w = MediumWriter::open(m.clone(), None).unwrap();
    let a = data(1, (2 * USABLE + 10) as usize);
    let ea = write_image(&mut w, blob(1), &a, 1 << 20);
    let eb = write_image(&mut w, blob(2), &data(2, 100), 100);
    w.commit().unwrap();
    drop(w);
    assert_eq!(m.containers().unwrap(), 3);

    // Container 0's header is damaged: the medium is still recognised from container 1.
    patch(&container_file(&t, 0), 40, &[0xEE]);
    let m = open(&dir_uri(&t), EngineChoice::Auto);
    assert_eq!(m.containers().unwrap(), 3);
    let cat = Catalogue::scan(&m, &mut |_, _| {}).unwrap();
    assert_eq!(cat.problems.len(), 2, "{:?}", cat.problems);
    assert!(
        cat.problems[0].contains("container 0"),
        "{:?}",
        cat.problems
    );
    assert!(!cat.images.contains_key(&blob(1)));
    assert_eq!(cat.images.get(&blob(2)), Some(&eb));
    assert!(!verify(&m, &mut |_, _| {}).unwrap().is_clean());
    drop(ea);

    // The last container's header is damaged: the writer refuses to overwrite it.
    patch(&container_file(&t, 2), 40, &[0xEE]);
    let m = open(&dir_uri(&t), EngineChoice::Auto);
    assert_eq!(m.containers().unwrap(), 2);
    let mut w = MediumWriter::open(m.clone(), None).unwrap();
    w.begin_image(blob(3)).unwrap();
    let e = w.append(b"x").unwrap_err();
    assert!(
        matches!(e, MediaError::BadContainer { container: 2, .. }),
        "{e}"
    );
}

#[test]
fn format_wipes_or_refuses() {
    let t = tempfile::tempdir().unwrap();
    let uri = format!("file:{}", t.path().join("dev.img").display());
    let m = open(&uri, EngineChoice::Auto);
    let mut w = MediumWriter::open(m.clone(), None).unwrap();
    write_image(&mut w, blob(1), &data(1, (USABLE + 5) as usize), 1 << 20);
    w.commit().unwrap();
    drop(w);
    let old_id = m.id().unwrap();
    let e = Medium::format(&uri, geom(), BackendOptions::default(), false)
        .err()
        .unwrap();
    assert!(matches!(e, MediaError::Misuse { .. }), "{e}");
    let m = Medium::format(&uri, geom(), BackendOptions::default(), true).unwrap();
    assert_eq!(m.containers().unwrap(), 0);
    let mut w = MediumWriter::open(m.clone(), None).unwrap();
    let e2 = write_image(&mut w, blob(2), &data(2, 10), 10);
    w.commit().unwrap();
    drop(w);
    let m = open(&uri, EngineChoice::Auto);
    assert_ne!(m.id().unwrap(), old_id);
    // Nothing of the old medium (its container 1 included) is taken for the new one.
    assert_eq!(m.containers().unwrap(), 1);
    let cat = Catalogue::scan(&m, &mut |_, _| {}).unwrap();
    assert_eq!(cat.images.len(), 1);
    assert_eq!(cat.images[&blob(2)], e2);
}

#[test]
fn idle_writer_does_not_hold_the_device() {
    use std::time::Duration;
    let t = tempfile::tempdir().unwrap();
    let m = open(&dir_uri(&t), EngineChoice::Uring);
    let s = MediaScheduler::new(m.clone() as Arc<dyn sched::Device>, SchedConfig::default());
    let mut w = MediumWriter::open(m.clone(), Some(s.clone())).unwrap();
    let e1 = write_image(&mut w, blob(1), &data(1, 1000), 1000);
    w.commit().unwrap();
    // One whole chunk is submitted through a grant; the writer then sits idle.
    w.begin_image(blob(2)).unwrap();
    w.append(&data(2, 300 << 10)).unwrap();
    let r = MediumReader::new(m.clone(), Some(s.clone()));
    let opts = ReadOptions {
        class: Class::Foreground,
        timeout: Some(Duration::from_secs(5)),
    };
    assert_eq!(r.read(&e1, 0, 1000, opts).unwrap(), data(1, 1000));
    w.finish_image().unwrap();
    w.commit().unwrap();
}
