//! HeadCache: large layers, random access, damage detection, crash leftovers and merging.

use proptest::prelude::*;
use spinfs_store::cache::{
    CacheError, HeadCache, HeadCacheWriter, MergeInput, merge_heads, remove_partial_heads,
};
use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn head_for(key: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(key.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    (0..len).map(|_| r.next() as u8).collect()
}

fn write_heads(path: &Path, layer: u64, head_size: u64, heads: &[(u64, Vec<u8>)]) {
    let mut w = HeadCacheWriter::create(path, layer, head_size).unwrap();
    for (k, d) in heads {
        w.add(*k, d).unwrap();
    }
    let info = w.finish().unwrap();
    assert_eq!(info.count, heads.len() as u64);
    assert_eq!(info.file_bytes, fs::metadata(path).unwrap().len());
}

#[test]
fn hundred_thousand_keys_random_access() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("heads.7");
    let head_size = 256u64;
    let mut rng = Rng(12345);
    let mut model = BTreeMap::new();
    while model.len() < 100_000 {
        let key = rng.next() % 10_000_000;
        let len = (rng.next() % (head_size + 1)) as usize;
        model.insert(key, head_for(key, len));
    }
    // Added in an order unrelated to the keys.
    let mut heads: Vec<(u64, Vec<u8>)> = model.iter().map(|(k, d)| (*k, d.clone())).collect();
    for i in (1..heads.len()).rev() {
        heads.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    write_heads(&path, 7, head_size, &heads);

    let cache = HeadCache::open(&path).unwrap();
    assert_eq!(
        (cache.layer_id(), cache.head_size(), cache.len()),
        (7, head_size, 100_000)
    );
    for (k, d) in &heads {
        assert_eq!(cache.get(*k).unwrap().as_ref(), Some(d), "key {k}");
    }
    let mut buf = [0u8; 64];
    for _ in 0..20_000 {
        let key = rng.next() % 10_000_001;
        match model.get(&key) {
            None => {
                assert_eq!(cache.get(key).unwrap(), None);
                assert_eq!(cache.read(key, 0, &mut buf).unwrap(), None);
            }
            Some(d) => {
                let off = rng.next() % (head_size + 2);
                let n = cache.read(key, off, &mut buf).unwrap().unwrap();
                let start = (off as usize).min(d.len());
                let expect = &d[start..(start + 64).min(d.len())];
                assert_eq!(&buf[..n], expect, "key {key} offset {off}");
            }
        }
    }
    assert_eq!(cache.get(u64::MAX).unwrap(), None);
    assert_eq!(
        cache.keys().unwrap(),
        model.keys().copied().collect::<Vec<_>>()
    );
    assert!(cache.verify().is_empty());
}

fn flip_byte(path: &Path, at: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x10;
    f.write_all_at(&b, at).unwrap();
}

/// A small cache spanning two index blocks; returns its path and contents.
fn small_cache(dir: &Path) -> (PathBuf, Vec<(u64, Vec<u8>)>) {
    let path = dir.join("heads.1");
    let heads: Vec<(u64, Vec<u8>)> = (0..180u64)
        .map(|i| (i * 3 + 1, head_for(i, (i % 9) as usize)))
        .collect();
    write_heads(&path, 1, 16, &heads);
    (path, heads)
}

#[test]
fn every_bit_flip_is_found_by_verify_and_none_in_the_padding_harms_a_read() {
    let dir = tempfile::tempdir().unwrap();
    let (path, heads) = small_cache(dir.path());
    let pristine = fs::read(&path).unwrap();
    let data_len: usize = heads.iter().map(|(_, d)| d.len()).sum();
    // Padding between the heads and the 4 KiB aligned index: no checksum covers it, reads
    // never see it, but `verify` checks that it is zero.
    let padding = 64 + data_len..4096;
    let damaged = dir.path().join("damaged");
    // Every byte of header, heads and fence; a stride through padding and index blocks
    // (each block is one CRC, and a debug build checks ~200 of them per flip).
    let index = 4096..pristine.len() - 16;
    let positions = (0..pristine.len()).filter(|p| !index.contains(p) && !padding.contains(p));
    let positions = positions
        .chain(padding.clone().step_by(97))
        .chain(index.clone().step_by(11));
    for pos in positions {
        let mut bytes = pristine.clone();
        bytes[pos] ^= 1 << (pos % 8);
        fs::write(&damaged, &bytes).unwrap();
        let cache = match HeadCache::open(&damaged) {
            Err(CacheError::HeadCorrupt { path, .. })
            | Err(CacheError::HeadVersion { path, .. }) => {
                assert_eq!(path, damaged);
                continue;
            }
            Err(e) => panic!("flip at {pos}: unexpected error {e}"),
            Ok(cache) => cache,
        };
        let mut failed = false;
        for (k, d) in &heads {
            match cache.get(*k) {
                Ok(got) => assert_eq!(got.as_ref(), Some(d), "flip at {pos} changed key {k}"),
                Err(CacheError::HeadEntryCorrupt { path, key, .. }) => {
                    assert_eq!((path.as_path(), key), (damaged.as_path(), *k));
                    failed = true;
                }
                Err(e) => panic!("flip at {pos}: unexpected error {e}"),
            }
        }
        // Every flip is found by verify, whether it harmed a head or not.
        let problems = cache.verify();
        assert!(!problems.is_empty(), "flip at {pos} not found");
        if padding.contains(&pos) {
            assert!(!failed, "flip at {pos} in the padding failed a read");
            assert_eq!(problems.len(), 1, "flip at {pos}: {problems:?}");
            assert!(
                problems[0].reason.contains("padding before the index"),
                "flip at {pos}: {problems:?}"
            );
        }
    }
}

#[test]
fn damaged_head_names_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let (path, heads) = small_cache(dir.path());
    // Head of key 3*10+1 sits after the heads of keys 0..10.
    let before: usize = heads[..10].iter().map(|(_, d)| d.len()).sum();
    let key = heads[10].0;
    flip_byte(&path, (64 + before) as u64);
    let cache = HeadCache::open(&path).unwrap();
    let err = cache.get(key).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, CacheError::HeadEntryCorrupt { path: p, key: k, .. } if *p == path && *k == key),
        "{err:?}"
    );
    assert!(msg.contains(&path.display().to_string()) && msg.contains(&key.to_string()));
    assert!(cache.read(key, 0, &mut [0; 4]).is_err());
    assert_eq!(cache.get(heads[11].0).unwrap().as_ref(), Some(&heads[11].1));
    let problems = cache.verify();
    assert_eq!(problems.len(), 1);
    assert_eq!(
        (problems[0].path.clone(), problems[0].key),
        (path.clone(), Some(key))
    );
    assert!(problems[0].to_string().contains(&key.to_string()));
}

#[test]
fn truncation_extension_and_other_versions_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = small_cache(dir.path());
    let pristine = fs::read(&path).unwrap();
    let cut = dir.path().join("cut");
    for len in [
        0,
        1,
        63,
        64,
        100,
        4096,
        pristine.len() - 8,
        pristine.len() - 1,
    ] {
        fs::write(&cut, &pristine[..len]).unwrap();
        assert!(
            matches!(HeadCache::open(&cut), Err(CacheError::HeadCorrupt { ref path, .. }) if *path == cut),
            "length {len}"
        );
        assert_eq!(HeadCache::verify_file(&cut).len(), 1);
    }
    let mut longer = pristine.clone();
    longer.push(0);
    fs::write(&cut, &longer).unwrap();
    assert!(HeadCache::open(&cut).is_err());

    let mut v3 = pristine.clone();
    v3[8] = 3;
    let crc = crc32c::crc32c(&v3[..60]);
    v3[60..64].copy_from_slice(&crc.to_le_bytes());
    fs::write(&cut, &v3).unwrap();
    assert!(matches!(
        HeadCache::open(&cut),
        Err(CacheError::HeadVersion { found: 3, .. })
    ));
    assert!(matches!(
        HeadCache::open(&dir.path().join("missing")),
        Err(CacheError::Io { .. })
    ));
}

#[test]
fn crash_leftovers_never_published() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("heads.4");
    // A writer abandoned (error path or unwinding) removes its work in progress.
    {
        let mut w = HeadCacheWriter::create(&path, 4, 64).unwrap();
        w.add(1, b"abc").unwrap();
    }
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    // A process killed mid-write leaves a partial file, which never opens and is cleaned.
    let w = HeadCacheWriter::create(&path, 4, 64).unwrap();
    std::mem::forget(w);
    let partial = dir.path().join("heads.4.head-partial");
    assert!(partial.exists() && !path.exists());
    assert!(HeadCache::open(&partial).is_err());
    write_heads(&dir.path().join("heads.5"), 5, 64, &[(1, b"x".to_vec())]);
    assert_eq!(remove_partial_heads(dir.path()).unwrap(), 1);
    assert!(!partial.exists());
    assert!(HeadCache::open(&dir.path().join("heads.5")).is_ok());
    // A new writer replaces a leftover of the same name.
    fs::write(&partial, b"junk").unwrap();
    write_heads(&path, 4, 64, &[(9, b"nine".to_vec())]);
    assert_eq!(
        HeadCache::open(&path).unwrap().get(9).unwrap(),
        Some(b"nine".to_vec())
    );
    assert!(!partial.exists());
}

#[test]
fn concurrent_lookups() {
    let dir = tempfile::tempdir().unwrap();
    let (path, heads) = small_cache(dir.path());
    let cache = Arc::new(HeadCache::open(&path).unwrap());
    let heads = Arc::new(heads);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (cache, heads) = (Arc::clone(&cache), Arc::clone(&heads));
            std::thread::spawn(move || {
                for i in 0..2000 {
                    let (k, d) = &heads[(i * 7 + t) % heads.len()];
                    assert_eq!(cache.get(*k).unwrap().as_ref(), Some(d));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn merge_with_key_maps() {
    let dir = tempfile::tempdir().unwrap();
    let newer: Vec<(u64, Vec<u8>)> = (0..300).map(|k| (k, head_for(k + 1000, 32))).collect();
    let older: Vec<(u64, Vec<u8>)> = (0..300).map(|k| (k, head_for(k + 2000, 20))).collect();
    write_heads(&dir.path().join("heads.2"), 2, 32, &newer);
    write_heads(&dir.path().join("heads.1"), 1, 32, &older);
    let newer_cache = HeadCache::open(&dir.path().join("heads.2")).unwrap();
    let older_cache = HeadCache::open(&dir.path().join("heads.1")).unwrap();
    // Newer: even keys survive as 10*k. Older: keys < 100 survive as 10*k (colliding with the
    // newer layer's even keys) and keys >= 250 as 5000+k; the rest were deleted or replaced.
    let newer_map = |k: u64| k.is_multiple_of(2).then_some(10 * k);
    let older_map = |k: u64| {
        if k < 100 {
            Some(10 * k)
        } else if k >= 250 {
            Some(5000 + k)
        } else {
            None
        }
    };
    let out = dir.path().join("heads.1-2");
    let info = merge_heads(
        &out,
        12,
        24,
        &[
            MergeInput {
                cache: &newer_cache,
                key_map: &newer_map,
            },
            MergeInput {
                cache: &older_cache,
                key_map: &older_map,
            },
        ],
    )
    .unwrap();
    let mut expected = BTreeMap::new();
    for (k, d) in &older {
        if let Some(n) = older_map(*k) {
            expected.insert(n, d[..d.len().min(24)].to_vec());
        }
    }
    for (k, d) in &newer {
        if let Some(n) = newer_map(*k) {
            expected.insert(n, d[..24].to_vec());
        }
    }
    assert_eq!(info.count, expected.len() as u64);
    assert_eq!((info.layer_id, info.head_size), (12, 24));
    let merged = HeadCache::open(&out).unwrap();
    assert_eq!(
        merged.keys().unwrap(),
        expected.keys().copied().collect::<Vec<_>>()
    );
    for (k, d) in &expected {
        assert_eq!(merged.get(*k).unwrap().as_ref(), Some(d), "key {k}");
    }
    // Key 10*1 exists only in the older layer (odd keys of the newer one are dropped).
    assert_eq!(merged.get(10).unwrap(), Some(older[1].1.clone()));
    assert!(merged.verify().is_empty());
}

#[test]
fn merge_of_a_damaged_input_fails_and_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (path, heads) = small_cache(dir.path());
    flip_byte(&path, 64 + heads[0].1.len() as u64);
    let cache = HeadCache::open(&path).unwrap();
    let out = dir.path().join("merged");
    let identity = |k: u64| Some(k);
    let err = merge_heads(
        &out,
        9,
        16,
        &[MergeInput {
            cache: &cache,
            key_map: &identity,
        }],
    )
    .unwrap_err();
    assert!(
        matches!(&err, CacheError::HeadEntryCorrupt { path: p, key, .. } if *p == path && *key == heads[1].0),
        "{err:?}"
    );
    assert!(!out.exists());
    assert_eq!(remove_partial_heads(dir.path()).unwrap(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn lookups_and_merges_match_a_model(
        layers in proptest::collection::vec(
            proptest::collection::btree_map(0u64..2000, 0usize..=40, 0..400),
            1..4,
        ),
        shift in 0u64..3000,
        keep_mod in 1u64..5,
        head_size in 1u64..48,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut caches = Vec::new();
        for (i, layer) in layers.iter().enumerate() {
            let path = dir.path().join(format!("heads.{i}"));
            let heads: Vec<(u64, Vec<u8>)> = layer
                .iter()
                .rev()
                .map(|(k, len)| (*k, head_for(*k * 31 + i as u64, *len)))
                .collect();
            write_heads(&path, i as u64, 40, &heads);
            let cache = HeadCache::open(&path).unwrap();
            for (k, d) in &heads {
                prop_assert_eq!(cache.get(*k).unwrap(), Some(d.clone()));
                let mut buf = [0u8; 7];
                let n = cache.read(*k, 3, &mut buf).unwrap().unwrap();
                let start = 3.min(d.len());
                prop_assert_eq!(&buf[..n], &d[start..(start + 7).min(d.len())]);
                if !layer.contains_key(&(k + 1)) {
                    prop_assert_eq!(cache.get(k + 1).unwrap(), None);
                }
            }
            caches.push((cache, heads));
        }
        let map = |k: u64| (!k.is_multiple_of(keep_mod)).then_some((k + shift) / 2);
        let inputs: Vec<MergeInput<'_>> = caches
            .iter()
            .map(|(cache, _)| MergeInput { cache, key_map: &map })
            .collect();
        let out = dir.path().join("merged");
        merge_heads(&out, 99, head_size, &inputs).unwrap();
        let mut expected: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for (_, heads) in caches.iter().rev() {
            let mut sorted = heads.clone();
            sorted.sort();
            // Within one input two old keys may map to one new key: the smaller old key wins.
            for (k, d) in sorted.iter().rev() {
                if let Some(n) = map(*k) {
                    expected.insert(n, d[..d.len().min(head_size as usize)].to_vec());
                }
            }
        }
        let merged = HeadCache::open(&out).unwrap();
        prop_assert_eq!(merged.keys().unwrap(), expected.keys().copied().collect::<Vec<_>>());
        for (k, d) in &expected {
            prop_assert_eq!(merged.get(*k).unwrap(), Some(d.clone()));
        }
        prop_assert!(merged.verify().is_empty());
    }
}

/// Heads and tails: the edges of files of every size relative to the head and tail sizes,
/// served for exactly the ranges they hold, for the size they were recorded for, and carried
/// through a merge (cut to a smaller head size).
#[test]
fn tails_round_trip_and_merge() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("heads.1");
    let edge = 100usize;
    let sizes = [0usize, 1, 99, 100, 101, 150, 199, 200, 201, 1000, 100_000];
    let mut w = HeadCacheWriter::create(&path, 1, edge as u64).unwrap();
    let files: Vec<(u64, Vec<u8>)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (i as u64 + 10, head_for(i as u64, n)))
        .collect();
    for (k, f) in &files {
        let head = f.len().min(edge);
        let tail = (f.len() - head).min(edge);
        w.add_file(*k, f.len() as u64, &f[..head], &f[f.len() - tail..])
            .unwrap();
    }
    // A tail that would overlap the head is refused.
    assert!(
        w.add_file(99, 150, &files[5].1[..100], &files[5].1[..100])
            .is_err()
    );
    let info = w.finish().unwrap();
    assert_eq!((info.head_size, info.tail_size), (edge as u64, edge as u64));
    let cache = HeadCache::open(&path).unwrap();
    assert_eq!(cache.tail_size(), edge as u64);
    for (k, f) in &files {
        let size = f.len() as u64;
        let e = cache.edges(*k).unwrap().unwrap();
        assert_eq!(e.size, Some(size));
        assert_eq!(e.head(), &f[..f.len().min(edge)]);
        assert_eq!(cache.get(*k).unwrap().unwrap(), e.head());
        for (a, b) in [
            (0, 1),
            (0, 50),
            (0, 100),
            (99, 101),
            (0, size),
            (size.saturating_sub(1), size),
            (size.saturating_sub(100), size),
            (size.saturating_sub(101), size),
            (size / 2, size / 2 + 1),
        ] {
            let (a, b) = (a.min(size), b.min(size));
            let held = b <= edge as u64
                || a >= size.saturating_sub(edge as u64).max(edge as u64)
                || size <= 2 * edge as u64;
            match e.range(size, a, b) {
                Some(bytes) => {
                    assert!(held, "key {k}: {a}..{b} of {size} served");
                    assert_eq!(bytes, &f[a as usize..b as usize], "key {k}: {a}..{b}");
                }
                None => assert!(!held, "key {k}: {a}..{b} of {size} not served"),
            }
        }
        // Recorded for another size: nothing is served from these edges.
        assert_eq!(e.range(size + 1, 0, 1.min(size)), None);
    }
    assert!(cache.verify().is_empty());

    // Merged with a smaller head size: heads and tails cut, still right.
    let out = dir.path().join("heads.2");
    let same = |k: u64| Some(k);
    let info = merge_heads(
        &out,
        2,
        40,
        &[MergeInput {
            cache: &cache,
            key_map: &same,
        }],
    )
    .unwrap();
    assert_eq!(info.count, files.len() as u64);
    let merged = HeadCache::open(&out).unwrap();
    for (k, f) in &files {
        let e = merged.edges(*k).unwrap().unwrap();
        let head = f.len().min(40);
        let tail = (f.len() - f.len().min(edge)).min(edge).min(40);
        assert_eq!(e.head(), &f[..head], "key {k}");
        assert_eq!(e.tail(), &f[f.len() - tail..], "key {k}");
        let size = f.len() as u64;
        if size > 0 {
            assert_eq!(
                e.range(size, size - 1, size).map(|b| b.to_vec()),
                (tail > 0 || size <= 40).then(|| f[f.len() - 1..].to_vec()),
                "key {k}"
            );
        }
    }
    assert!(merged.verify().is_empty());
}
