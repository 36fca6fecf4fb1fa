//! ChunkCache: bounds, persistence, damage detection, crash leftovers and concurrency.

use proptest::prelude::*;
use spinfs_store::cache::{CHUNK_HEADER_LEN, CacheError, ChunkCache};
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const UNIT: u64 = 4096;

/// Deterministic bytes for (image, offset, version): different versions differ everywhere.
fn data_for(image: u64, offset: u64, version: u64, len: usize) -> Vec<u8> {
    let mut x = image
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(offset)
        .wrapping_add(version.wrapping_mul(0xbf58_476d_1ce4_e5b9))
        | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn entry_path(dir: &Path, image: u64, offset: u64) -> PathBuf {
    dir.join(format!("i{image:016x}"))
        .join(format!("{offset:016x}"))
}

fn count_entry_files(dir: &Path) -> usize {
    fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('i'))
        .map(|e| fs::read_dir(e.path()).unwrap().count())
        .sum()
}

#[test]
fn round_trip_sub_range_reads_and_argument_checks() {
    let dir = tempfile::tempdir().unwrap();
    // 252 KiB: the media object size, not a power of two.
    let unit = 252 * 1024;
    let cache = ChunkCache::open(dir.path(), 10 << 20, unit).unwrap();
    let full = data_for(1, 0, 0, unit as usize);
    let tail = data_for(1, unit, 0, 1000);
    cache.put(1, 0, &full).unwrap();
    cache.put(1, unit, &tail).unwrap();
    assert_eq!(cache.get(1, 0).unwrap().as_deref(), Some(&full[..]));
    assert_eq!(cache.get(1, unit).unwrap().as_deref(), Some(&tail[..]));
    assert_eq!(cache.get(2, 0).unwrap(), None);

    let mut buf = vec![0u8; 70_000];
    assert_eq!(cache.read(1, 0, 100_000, &mut buf).unwrap(), Some(70_000));
    assert_eq!(buf, full[100_000..170_000]);
    assert_eq!(
        cache.read(1, 0, unit - 10, &mut buf).unwrap(),
        Some(10),
        "a read near the end copies what is there"
    );
    assert_eq!(buf[..10], full[full.len() - 10..]);
    assert_eq!(cache.read(1, unit, 1000, &mut buf).unwrap(), Some(0));
    assert_eq!(cache.read(1, unit, 5000, &mut buf).unwrap(), Some(0));
    assert_eq!(cache.read(1, unit, 0, &mut buf).unwrap(), Some(1000));
    assert_eq!(buf[..1000], tail[..]);

    let s = cache.stats();
    assert_eq!((s.hits, s.misses, s.entries), (7, 1, 2));
    assert_eq!(s.bytes, 2 * CHUNK_HEADER_LEN + unit + 1000);
    assert_eq!(cache.load(2, 0).unwrap().map(|d| d.len()), None);

    // Keys are the caller's: any offset (the store uses media object boundaries).
    cache.put(1, 5, b"x").unwrap();
    assert_eq!(cache.get(1, 5).unwrap().as_deref(), Some(&b"x"[..]));
    assert_eq!(cache.load(1, 5).unwrap().as_deref(), Some(&b"x"[..]));
    assert_eq!(cache.load(1, 0).unwrap().as_deref(), Some(&full[..]));
    assert_eq!(cache.get(1, 4096).unwrap(), None);
    for bad in [
        cache.put(1, 0, b""),
        cache.put(1, 0, &vec![0; unit as usize + 1]),
    ] {
        assert!(
            matches!(bad, Err(CacheError::InvalidArgument { .. })),
            "{bad:?}"
        );
    }
    drop(cache);
    for unit in [0, 4095, 1 << 40] {
        let other = tempfile::tempdir().unwrap();
        assert!(matches!(
            ChunkCache::open(other.path(), 1 << 20, unit),
            Err(CacheError::InvalidArgument { .. })
        ));
    }
}

#[test]
fn persists_across_reopen_with_recency() {
    let dir = tempfile::tempdir().unwrap();
    let footprint = CHUNK_HEADER_LEN + UNIT;
    {
        let cache = ChunkCache::open(dir.path(), 3 * footprint, UNIT).unwrap();
        for i in 0..3 {
            cache
                .put(9, i * UNIT, &data_for(9, i * UNIT, 0, UNIT as usize))
                .unwrap();
        }
        // Entry 0 becomes the most recent; entry 1 the least.
        assert!(cache.get(9, 0).unwrap().is_some());
    }
    let cache = ChunkCache::open(dir.path(), 3 * footprint, UNIT).unwrap();
    let s = cache.stats();
    assert_eq!((s.entries, s.bytes), (3, 3 * footprint));
    cache
        .put(9, 3 * UNIT, &data_for(9, 3 * UNIT, 0, UNIT as usize))
        .unwrap();
    assert_eq!(cache.stats().evictions, 1);
    assert_eq!(cache.get(9, UNIT).unwrap(), None, "least recent evicted");
    for i in [0, 2, 3] {
        assert_eq!(
            cache.get(9, i * UNIT).unwrap(),
            Some(data_for(9, i * UNIT, 0, UNIT as usize)),
            "entry {i}"
        );
    }
    drop(cache);

    // A smaller capacity at open evicts down to it, oldest first (3 is now least recent).
    let cache = ChunkCache::open(dir.path(), 2 * footprint, UNIT).unwrap();
    let s = cache.stats();
    assert_eq!((s.entries, s.bytes), (2, 2 * footprint));
    assert_eq!(cache.get(9, 0).unwrap(), None);
    assert!(cache.get(9, 2 * UNIT).unwrap().is_some());
    assert!(cache.get(9, 3 * UNIT).unwrap().is_some());
    assert_eq!(count_entry_files(dir.path()), 2);
    drop(cache);

    // Another unit makes every entry meaningless: all dropped.
    let cache = ChunkCache::open(dir.path(), 1 << 20, 2 * UNIT).unwrap();
    assert_eq!(cache.stats().entries, 0);
    assert_eq!(count_entry_files(dir.path()), 0);
}

#[test]
fn one_instance_per_directory() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(dir.path(), 1 << 20, UNIT).unwrap();
    assert!(matches!(
        ChunkCache::open(dir.path(), 1 << 20, UNIT),
        Err(CacheError::Busy(p)) if p == dir.path()
    ));
    drop(cache);
    ChunkCache::open(dir.path(), 1 << 20, UNIT).unwrap();
}

/// Puts one entry, damages its file with `damage`, and checks it is never returned.
fn damaged_entry_is_a_miss(damage: impl Fn(&Path), len: usize) {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(dir.path(), 1 << 20, UNIT).unwrap();
    let data = data_for(5, UNIT, 0, len);
    cache.put(5, UNIT, &data).unwrap();
    cache.put(5, 0, &data_for(5, 0, 0, 100)).unwrap();
    let path = entry_path(dir.path(), 5, UNIT);
    damage(&path);
    let mut buf = vec![0u8; len];
    let got = if len.is_multiple_of(2) {
        cache.get(5, UNIT).unwrap()
    } else {
        cache
            .read(5, UNIT, 0, &mut buf)
            .unwrap()
            .map(|n| buf[..n].to_vec())
    };
    assert_eq!(got, None, "damaged entry returned");
    let s = cache.stats();
    assert_eq!((s.corrupt, s.misses, s.entries), (1, 1, 1));
    assert!(!path.exists(), "damaged entry file removed");
    assert_eq!(cache.get(5, UNIT).unwrap(), None);
    assert!(
        cache.get(5, 0).unwrap().is_some(),
        "other entries unaffected"
    );
    // The caller refetches and puts again.
    cache.put(5, UNIT, &data).unwrap();
    assert_eq!(cache.get(5, UNIT).unwrap(), Some(data));
}

#[test]
fn bit_flips_anywhere_in_an_entry_are_detected() {
    let len = 300;
    for pos in 0..(CHUNK_HEADER_LEN as usize + len) {
        let flip = move |path: &Path| {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .unwrap();
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, pos as u64).unwrap();
            b[0] ^= 1 << (pos % 8);
            f.write_all_at(&b, pos as u64).unwrap();
        };
        damaged_entry_is_a_miss(flip, len + pos % 2);
    }
}

#[test]
fn truncation_extension_and_foreign_headers_are_detected() {
    for cut in [
        0,
        1,
        CHUNK_HEADER_LEN - 1,
        CHUNK_HEADER_LEN,
        CHUNK_HEADER_LEN + 99,
    ] {
        damaged_entry_is_a_miss(
            move |path: &Path| {
                OpenOptions::new()
                    .write(true)
                    .open(path)
                    .unwrap()
                    .set_len(cut)
                    .unwrap()
            },
            200,
        );
    }
    damaged_entry_is_a_miss(
        |path: &Path| {
            let f = OpenOptions::new().append(true).open(path).unwrap();
            f.set_len(f.metadata().unwrap().len() + 1).unwrap();
        },
        200,
    );
    // A whole, valid entry of another key copied over this one.
    damaged_entry_is_a_miss(
        |path: &Path| {
            let other = path.with_file_name(format!("{:016x}", 0));
            fs::copy(other, path).unwrap();
        },
        100,
    );
}

#[test]
fn verify_all_and_repair() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(dir.path(), 1 << 20, UNIT).unwrap();
    for i in 0..6 {
        cache
            .put(i % 2, i * UNIT, &data_for(i % 2, i * UNIT, 0, 500))
            .unwrap();
    }
    assert!(cache.verify_all().is_empty());
    let flip = |image, offset, at| {
        let f = OpenOptions::new()
            .write(true)
            .open(entry_path(dir.path(), image, offset))
            .unwrap();
        f.write_all_at(b"\xff", at).unwrap();
    };
    flip(0, 2 * UNIT, CHUNK_HEADER_LEN + 10);
    flip(1, 5 * UNIT, 3);
    let mut problems = cache.verify_all();
    problems.sort_by_key(|p| p.offset);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert_eq!((problems[0].image, problems[0].offset), (0, 2 * UNIT));
    assert_eq!(problems[0].path, entry_path(dir.path(), 0, 2 * UNIT));
    assert_eq!((problems[1].image, problems[1].offset), (1, 5 * UNIT));
    assert!(
        problems[1]
            .to_string()
            .contains(&format!("{:016x}", 5 * UNIT))
    );
    let s = cache.stats();
    assert_eq!((s.entries, s.hits, s.misses, s.corrupt), (6, 0, 0, 0));

    assert_eq!(cache.repair().len(), 2);
    assert!(cache.verify_all().is_empty());
    let s = cache.stats();
    assert_eq!((s.entries, s.corrupt), (4, 2));
    assert_eq!(count_entry_files(dir.path()), 4);
    for i in [0, 1, 3, 4] {
        assert!(cache.get(i % 2, i * UNIT).unwrap().is_some());
    }
}

#[test]
fn crash_leftovers_are_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let cache = ChunkCache::open(dir.path(), 1 << 20, UNIT).unwrap();
        cache.put(3, 0, &data_for(3, 0, 0, 1000)).unwrap();
        cache.put(3, UNIT, &data_for(3, UNIT, 0, 1000)).unwrap();
    }
    // A put interrupted before its rename: a half-written file under tmp/.
    let whole = fs::read(entry_path(dir.path(), 3, 0)).unwrap();
    fs::write(dir.path().join("tmp").join("4242.0"), &whole[..500]).unwrap();
    fs::write(dir.path().join("tmp").join("4242.1"), &whole).unwrap();
    // Entry files that cannot be entries: header only, bad name; and one whose header names
    // another key (found damaged when read).
    let image_dir = dir.path().join(format!("i{:016x}", 3));
    fs::write(image_dir.join(format!("{:016x}", 2 * UNIT)), &whole[..64]).unwrap();
    fs::write(image_dir.join(format!("{:016x}", 5)), &whole).unwrap();
    fs::write(image_dir.join("garbage"), b"x").unwrap();
    fs::create_dir(dir.path().join(format!("i{:016x}", 4))).unwrap();
    // Not named like anything of the cache's: left alone.
    fs::write(dir.path().join("README"), b"mine").unwrap();

    let cache = ChunkCache::open(dir.path(), 1 << 20, UNIT).unwrap();
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    assert_eq!(cache.stats().entries, 3);
    assert_eq!(
        cache.get(3, 5).unwrap(),
        None,
        "a header naming offset 0 at key 5"
    );
    assert_eq!((cache.stats().entries, cache.stats().corrupt), (2, 1));
    assert_eq!(fs::read_dir(&image_dir).unwrap().count(), 2);
    assert!(!dir.path().join(format!("i{:016x}", 4)).exists());
    assert!(dir.path().join("README").exists());
    assert_eq!(cache.get(3, 0).unwrap(), Some(data_for(3, 0, 0, 1000)));
    assert!(cache.verify_all().is_empty());
}

#[test]
fn capacity_zero_disables_and_empties() {
    let dir = tempfile::tempdir().unwrap();
    {
        let cache = ChunkCache::open(dir.path(), 1 << 20, UNIT).unwrap();
        cache.put(1, 0, b"abc").unwrap();
    }
    let cache = ChunkCache::open(dir.path(), 0, UNIT).unwrap();
    assert_eq!(count_entry_files(dir.path()), 0);
    cache.put(1, 0, b"abc").unwrap();
    assert_eq!(cache.get(1, 0).unwrap(), None);
    assert_eq!(cache.read(1, 0, 0, &mut [0; 3]).unwrap(), None);
    let s = cache.stats();
    assert_eq!((s.entries, s.bytes, s.hits, s.misses), (0, 0, 0, 2));
    assert_eq!(count_entry_files(dir.path()), 0);

    // An entry larger than the whole capacity is not stored either.
    let small = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(small.path(), CHUNK_HEADER_LEN + 10, UNIT).unwrap();
    cache.put(1, 0, &[7; 11]).unwrap();
    assert_eq!(cache.stats().entries, 0);
    cache.put(1, 0, &[7; 10]).unwrap();
    assert_eq!(cache.get(1, 0).unwrap(), Some(vec![7; 10]));
}

#[test]
fn remove_image_drops_only_that_image() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(dir.path(), 1 << 20, UNIT).unwrap();
    for image in 1..=3 {
        for i in 0..4 {
            cache
                .put(image, i * UNIT, &data_for(image, i, 0, 100))
                .unwrap();
        }
    }
    cache.remove_image(2).unwrap();
    cache.remove_image(77).unwrap();
    let s = cache.stats();
    assert_eq!((s.entries, s.bytes), (8, 8 * (CHUNK_HEADER_LEN + 100)));
    assert!(!dir.path().join(format!("i{:016x}", 2)).exists());
    for i in 0..4 {
        assert_eq!(cache.get(2, i * UNIT).unwrap(), None);
        assert!(cache.get(1, i * UNIT).unwrap().is_some());
        assert!(cache.get(3, i * UNIT).unwrap().is_some());
    }
    cache.put(2, 0, b"again").unwrap();
    assert_eq!(cache.get(2, 0).unwrap(), Some(b"again".to_vec()));
    drop(cache);
    assert_eq!(
        ChunkCache::open(dir.path(), 1 << 20, UNIT)
            .unwrap()
            .stats()
            .entries,
        9
    );
}

#[test]
fn concurrent_puts_and_gets() {
    let dir = tempfile::tempdir().unwrap();
    let footprint = CHUNK_HEADER_LEN + UNIT;
    let capacity = 12 * footprint;
    let cache = Arc::new(ChunkCache::open(dir.path(), capacity, UNIT).unwrap());
    let len_of = |image: u64, i: u64| (UNIT - (image * 7 + i) % 5 * 100) as usize;
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            let cache = Arc::clone(&cache);
            std::thread::spawn(move || {
                let mut x = t * 7919 + 1;
                let mut buf = vec![0u8; UNIT as usize];
                for _ in 0..300 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let image = (x >> 33) % 2;
                    let i = (x >> 40) % 20;
                    let expected = data_for(image, i * UNIT, 0, len_of(image, i));
                    match (x >> 50) % 3 {
                        0 => cache.put(image, i * UNIT, &expected).unwrap(),
                        1 => {
                            if let Some(got) = cache.get(image, i * UNIT).unwrap() {
                                assert_eq!(got, expected);
                            }
                        }
                        _ => {
                            if let Some(n) = cache.read(image, i * UNIT, 50, &mut buf).unwrap() {
                                assert_eq!(buf[..n], expected[50..]);
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let s = cache.stats();
    assert!(s.bytes <= capacity, "{s:?}");
    assert_eq!(s.corrupt, 0);
    assert!(s.evictions > 0 && s.hits > 0, "{s:?}");
    assert!(cache.verify_all().is_empty());
    assert_eq!(count_entry_files(dir.path()) as u64, s.entries);
    drop(cache);
    let reopened = ChunkCache::open(dir.path(), capacity, UNIT).unwrap();
    assert_eq!(reopened.stats().entries, s.entries);
    assert_eq!(reopened.stats().bytes, s.bytes);
}

#[derive(Debug, Clone)]
enum Op {
    Put { image: u64, slot: u64, len: usize },
    Get { image: u64, slot: u64 },
    RemoveImage(u64),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..2u64, 0..6u64, 1..=UNIT as usize).prop_map(|(image, slot, len)| Op::Put { image, slot, len }),
        5 => (0..2u64, 0..6u64).prop_map(|(image, slot)| Op::Get { image, slot }),
        1 => (0..3u64).prop_map(Op::RemoveImage),
        1 => Just(Op::Reopen),
    ]
}

/// The model: entries in recency order, least recent first.
struct Model {
    entries: Vec<((u64, u64), Vec<u8>)>,
    capacity: u64,
}

impl Model {
    fn bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|(_, d)| CHUNK_HEADER_LEN + d.len() as u64)
            .sum()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn lru_matches_model(
        capacity_units in 0u64..5,
        ops in proptest::collection::vec(op(), 1..50),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let capacity = capacity_units * (UNIT + CHUNK_HEADER_LEN) / 2;
        let mut cache = Some(ChunkCache::open(dir.path(), capacity, UNIT).unwrap());
        let mut model = Model { entries: Vec::new(), capacity };
        for (version, op) in ops.into_iter().enumerate() {
            let c = cache.as_ref().unwrap();
            match op {
                Op::Put { image, slot, len } => {
                    let key = (image, slot * UNIT);
                    let data = data_for(image, key.1, version as u64, len);
                    c.put(image, key.1, &data).unwrap();
                    if CHUNK_HEADER_LEN + len as u64 <= model.capacity {
                        model.entries.retain(|(k, _)| *k != key);
                        model.entries.push((key, data));
                        while model.bytes() > model.capacity {
                            model.entries.remove(0);
                        }
                    }
                }
                Op::Get { image, slot } => {
                    let key = (image, slot * UNIT);
                    let expected = model.entries.iter().position(|(k, _)| *k == key).map(|i| {
                        let e = model.entries.remove(i);
                        model.entries.push(e.clone());
                        e.1
                    });
                    prop_assert_eq!(c.get(image, key.1).unwrap(), expected);
                }
                Op::RemoveImage(image) => {
                    c.remove_image(image).unwrap();
                    model.entries.retain(|((i, _), _)| *i != image);
                }
                Op::Reopen => {
                    // The old instance must release the directory before the new one opens it.
                    drop(cache.take());
                    cache = Some(ChunkCache::open(dir.path(), capacity, UNIT).unwrap());
                }
            }
            let s = cache.as_ref().unwrap().stats();
            prop_assert!(s.bytes <= capacity);
            prop_assert_eq!(s.bytes, model.bytes());
            prop_assert_eq!(s.entries, model.entries.len() as u64);
            prop_assert_eq!(count_entry_files(dir.path()), model.entries.len());
        }
        let c = cache.as_ref().unwrap();
        for ((image, offset), data) in &model.entries {
            prop_assert_eq!(c.get(*image, *offset).unwrap(), Some(data.clone()));
        }
    }
}
