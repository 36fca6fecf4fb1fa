//! `spinfs fsck`, corruption through the mount, and disaster recovery (`spinfs recover`), on
//! real stores and real FUSE mounts.
//!
//! Corruption is injected into the files that hold each structure (media container files,
//! `layers/*.meta`, `layers/*.heads`, chunk cache entries, the manifest) while the store is
//! unmounted. Each test checks four things: the mount detects the damage by checksum and
//! fails only the damaged files with EIO, fsck names the damage (layer, image, container,
//! object, paths) and exits non-zero, `--repair` restores what can be restored (then fsck is
//! clean and the data byte-identical), and what cannot be restored is stated.

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Output;

/// Small geometry: 1 MiB containers (64 KiB metadata, 15 objects of 64 KiB), 64 KiB chunks,
/// 4 KiB heads; no automatic seals.
const SMALL: &[&str] = &[
    "--container-size",
    "1M",
    "--object-size",
    "64K",
    "--chunk-size",
    "64K",
    "--head-size",
    "4K",
    "--archive-threshold",
    "1G",
];
/// Where the data area of a container starts (the reserved metadata area).
const RESERVED: u64 = 64 << 10;
const OBJECT: u64 = 64 << 10;

fn fsck(store: &Path, repair: bool) -> (i32, String, Output) {
    let mut args = vec!["fsck", store.to_str().unwrap()];
    if repair {
        args.push("--repair");
    }
    let out = spinfs(&args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code().unwrap_or(-1), text, out)
}

fn assert_clean(store: &Path) {
    let (code, text, out) = fsck(store, false);
    assert_eq!(code, 0, "fsck not clean:\n{text}{}", stderr(&out));
    assert!(
        stderr(&out).is_empty(),
        "fsck wrote to stderr: {}",
        stderr(&out)
    );
}

fn manifest(store: &Path) -> serde_json::Value {
    let text = fs::read_to_string(store.join("manifest")).unwrap();
    let body = text.split_once('\n').unwrap().1;
    serde_json::from_str(body).unwrap()
}

/// (container, data-area offset, length, image offset) extents of blob `id`.
fn blob_extents(store: &Path, id: u64) -> Vec<(u64, u64, u64, u64)> {
    let m = manifest(store);
    let b = m["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == id)
        .unwrap()
        .clone();
    extents(&b)
}

fn extents(rec: &serde_json::Value) -> Vec<(u64, u64, u64, u64)> {
    rec["extents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let v: Vec<u64> = e
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect();
            (v[0], v[1], v[2], v[3])
        })
        .collect()
}

fn container_file(media: &Path, c: u64) -> PathBuf {
    media.join(format!("c{c:08}.spc"))
}

/// XORs 0xff into `len` bytes of `path` at `at`.
fn flip(path: &Path, at: u64, len: usize) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, at).unwrap();
    for x in &mut b {
        *x ^= 0xff;
    }
    f.write_all_at(&b, at).unwrap();
}

/// Reads every regular file under `root`: name -> contents, or the errno of the failure.
fn read_all(root: &Path) -> BTreeMap<String, Result<Vec<u8>, i32>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let md = fs::symlink_metadata(&p).unwrap();
            let rel = format!("/{}", p.strip_prefix(root).unwrap().display());
            if md.is_dir() {
                stack.push(p);
            } else if md.is_file() {
                out.insert(
                    rel,
                    fs::read(&p).map_err(|e| e.raw_os_error().unwrap_or(-1)),
                );
            }
        }
    }
    out
}

/// The files a fsck report names as affected by damage ("files affected: a, b").
fn affected(report: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in report.lines() {
        if let Some((_, list)) = line.split_once("files affected: ") {
            for p in list.split(", ") {
                out.insert(p.trim().to_string());
            }
        }
    }
    out
}

/// A store on small geometry with layer 1 holding a set of files whose data spans several
/// media objects and two containers; returns the mount (unmounted) and the expected files.
fn store_with_layer(extra: &[&str]) -> (Mounted, BTreeMap<String, Vec<u8>>) {
    let mut args = SMALL.to_vec();
    args.extend_from_slice(extra);
    let mut m = Mounted::new(&args);
    let mut want = BTreeMap::new();
    fs::create_dir(m.path("d")).unwrap();
    for i in 0..12u64 {
        // 20 KiB .. 240 KiB: files spread over many 64 KiB objects.
        let name = if i % 2 == 0 {
            format!("/f{i:02}")
        } else {
            format!("/d/f{i:02}")
        };
        let body = data(i + 1, (20 << 10) * (i as usize + 1));
        fs::write(m.path(&name[1..]), &body).unwrap();
        want.insert(name, body);
    }
    archive_now(&m);
    m.umount();
    (m, want)
}

fn check_files(
    got: &BTreeMap<String, Result<Vec<u8>, i32>>,
    want: &BTreeMap<String, Vec<u8>>,
    failing: &BTreeSet<String>,
) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "the names must all stay visible"
    );
    for (name, body) in want {
        match &got[name] {
            Ok(b) => {
                assert!(
                    !failing.contains(name),
                    "{name} read fine but fsck names it"
                );
                assert!(b == body, "{name} differs");
            }
            Err(e) => {
                assert_eq!(*e, libc::EIO, "{name}: errno {e}");
                assert!(
                    failing.contains(name),
                    "{name} fails with EIO but fsck does not name it"
                );
            }
        }
    }
}

fn log_of(m: &Mounted) -> String {
    fs::read_to_string(m.store.join("spinfs.log")).unwrap_or_default()
}

#[test]
fn fsck_is_clean_on_fresh_sealed_and_merged_stores_and_refuses_a_mounted_store() {
    let mut m = Mounted::new(&[SMALL, &["--merge-fanin", "2"]].concat());
    m.umount();
    assert_clean(&m.store);
    m.mount();
    // Refused while mounted: exit 8, one line, nothing changed.
    let before = fs::read(m.store.join("manifest")).unwrap();
    let (code, text, out) = fsck(&m.store, true);
    assert_eq!(code, 8, "{text}");
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("in use") && err.contains("unmount"), "{err}");
    assert_eq!(fs::read(m.store.join("manifest")).unwrap(), before);
    for round in 0..3u64 {
        fs::write(m.path(&format!("a{round}")), data(round, 100_000)).unwrap();
        fs::hard_link(m.path(&format!("a{round}")), m.path(&format!("h{round}"))).unwrap();
        std::os::unix::fs::symlink("a0", m.path(&format!("s{round}"))).unwrap();
        xattr_set(&m.path(&format!("a{round}")), "user.k", b"v");
        archive_now(&m);
        m.umount();
        assert_clean(&m.store);
        m.mount();
    }
    // With a fan-in of 2, three seals made merges.
    let levels: Vec<u64> = status(&m)["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["kind"] == "archived")
        .map(|l| l["level"].as_u64().unwrap())
        .collect();
    assert!(
        levels.iter().any(|&l| l > 0),
        "no merge happened: {levels:?}"
    );
    fs::write(m.path("upper"), b"not archived").unwrap();
    m.umount();
    assert_clean(&m.store);
    // Progress goes to stderr only when asked for (tests are not terminals).
    let out = spinfs(&["fsck", m.store.to_str().unwrap(), "--progress"]);
    assert!(out.status.success());
    assert!(stderr(&out).contains("media objects"), "{}", stderr(&out));
}

fn xattr_set(p: &Path, name: &str, value: &[u8]) {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C strings and value buffer.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(r, 0, "setxattr {}", p.display());
}

#[test]
fn damaged_blob_object_fails_only_its_files_and_fsck_names_them() {
    let (mut m, want) = store_with_layer(&["--cache-size", "0"]);
    assert_clean(&m.store);
    let media = m.store.join("media");
    let ext = blob_extents(&m.store, 1);
    // Flip a byte in the third object of the blob.
    let (c, off, _, _) = ext[0];
    flip(
        &container_file(&media, c),
        RESERVED + off + 2 * OBJECT + 1000,
        1,
    );
    let (code, text, _) = fsck(&m.store, false);
    assert_eq!(code, 4, "{text}");
    assert!(
        text.contains("layer 1 (level 0): blob 1")
            && text.contains(&format!("container {c} object {}", off / OBJECT + 2))
            && text.contains("checksum mismatch"),
        "{text}"
    );
    let named = affected(&text);
    assert!(!named.is_empty(), "{text}");
    m.mount();
    let got = read_all(&m.mnt);
    check_files(&got, &want, &named);
    assert!(
        got.values().any(|r| r.is_err()),
        "no read failed through the mount"
    );
    assert!(got.values().filter(|r| r.is_ok()).count() >= want.len() - 3);
    // Metadata of the damaged files still works; the log names the damage (container,
    // object) and each damaged file by its inode number.
    let log = log_of(&m);
    assert!(log.contains("checksum mismatch"), "{log}");
    for n in &named {
        let ino = fs::metadata(m.path(&n[1..])).unwrap().ino();
        assert!(
            log.contains(&format!("ino={ino}")),
            "{n} (ino {ino}) not in the log:\n{log}"
        );
    }
    m.umount();
    // Not repairable: said, and named.
    let (code, text, _) = fsck(&m.store, true);
    assert_eq!(code, 4, "{text}");
    assert!(
        text.contains("cannot repair") && text.contains("no other copy"),
        "{text}"
    );
    for n in &named {
        assert!(text.contains(n.as_str()), "{n} not named in {text}");
    }

    // A truncated container: the objects cut off are reported as short, their files fail.
    let last = *ext.last().unwrap();
    let file = container_file(&media, last.0);
    let len = RESERVED + last.1 + last.2;
    fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len - OBJECT / 2)
        .unwrap();
    let (code, text, _) = fsck(&m.store, false);
    assert_eq!(code, 4, "{text}");
    assert!(text.contains("short read"), "{text}");
    let named = affected(&text);
    m.mount();
    check_files(&read_all(&m.mnt), &want, &named);
}

#[test]
fn damaged_ssd_meta_images_are_restored_from_the_media() {
    let (mut m, mut want) = store_with_layer(&[]);
    m.mount();
    fs::write(m.path("second"), b"layer two").unwrap();
    want.insert("/second".into(), b"layer two".to_vec());
    archive_now(&m);
    m.umount();
    let l1 = m.store.join("layers/0000000000000001.meta");
    let l2 = m.store.join("layers/0000000000000002.meta");
    flip(&l1, 1100, 8);
    let len = fs::metadata(&l2).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&l2)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let (code, text, _) = fsck(&m.store, false);
    assert_eq!(code, 4, "{text}");
    assert!(
        text.contains("layer 1 (level 0): meta image") && text.contains("checksum mismatch"),
        "{text}"
    );
    assert!(
        text.contains("layer 2 (level 0): meta image")
            && text.contains("bytes, the manifest records"),
        "{text}"
    );
    // --repair restores layer 1's from the media ...
    let (code, text, _) = fsck(&m.store, true);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("restored from its media copy"), "{text}");
    assert_clean(&m.store);
    // ... and a mount restores a damaged one by itself, with everything readable.
    flip(&l1, 1100, 8);
    m.mount();
    let got = read_all(&m.mnt);
    let failing = BTreeSet::new();
    check_files(&got, &want, &failing);
    assert!(
        log_of(&m).contains("restored from its media copy"),
        "{}",
        log_of(&m)
    );
    m.umount();
    assert_clean(&m.store);
}

#[test]
fn damaged_meta_on_the_media_is_named_with_the_intact_ssd_copy_serving() {
    let (mut m, want) = store_with_layer(&[]);
    let meta = manifest(&m.store)["layers"][0]["meta"].clone();
    let (c, off, _, _) = extents(&meta)[0];
    flip(
        &container_file(&m.store.join("media"), c),
        RESERVED + off + 200,
        4,
    );
    let (code, text, _) = fsck(&m.store, true);
    assert_eq!(code, 4, "{text}");
    assert!(
        text.contains("meta image 1 on the media")
            && text.contains("the SSD copy is intact")
            && text.contains(&format!("container {c} object {}", off / OBJECT)),
        "{text}"
    );
    assert!(text.contains("cannot repair"), "{text}");
    m.mount();
    check_files(&read_all(&m.mnt), &want, &BTreeSet::new());
}

#[test]
fn damaged_container_header_and_record_log() {
    // Layer 1 fills container 0 and part of 1; layer 2 follows in container 1.
    let (mut m, mut want) = store_with_layer(&["--cache-size", "0"]);
    m.mount();
    fs::write(m.path("late"), data(99, 150_000)).unwrap();
    want.insert("/late".into(), data(99, 150_000));
    archive_now(&m);
    m.umount();
    let media = m.store.join("media");
    let containers: BTreeSet<u64> = blob_extents(&m.store, 1).iter().map(|e| e.0).collect();
    assert!(
        containers.len() >= 2,
        "layer 1 must span containers: {containers:?}"
    );
    let backup = fs::read(container_file(&media, 1)).unwrap();
    // The header of container 1.
    flip(&container_file(&media, 1), 40, 1);
    let (code, text, _) = fsck(&m.store, false);
    assert_eq!(code, 4, "{text}");
    assert!(text.contains("container 1: header"), "{text}");
    let named = affected(&text);
    assert!(named.contains("/late"), "{text}");
    m.mount();
    let got = read_all(&m.mnt);
    assert!(matches!(got["/late"], Err(libc::EIO)));
    check_files(&got, &want, &named);
    m.umount();
    fs::write(container_file(&media, 1), &backup).unwrap();
    assert_clean(&m.store);
    // The first record block of container 1: its log ends before it, so every object
    // recorded there is unreachable.
    flip(&container_file(&media, 1), 4096 + 200, 1);
    let (code, text, _) = fsck(&m.store, false);
    assert_eq!(code, 4, "{text}");
    assert!(text.contains("not recorded on the media"), "{text}");
    assert!(text.contains("not complete on the media"), "{text}");
    let named = affected(&text);
    assert!(named.contains("/late"), "{text}");
    m.mount();
    let got = read_all(&m.mnt);
    assert!(matches!(got["/late"], Err(libc::EIO)));
    check_files(&got, &want, &named);
}

#[test]
fn damaged_manifest_is_named_at_mount_and_rebuilt_from_the_media() {
    let (mut m, mut want) = store_with_layer(&["--merge-fanin", "2"]);
    m.mount();
    fs::write(m.path("second"), b"layer two").unwrap();
    want.insert("/second".into(), b"layer two".to_vec());
    archive_now(&m);
    fs::write(m.path("third"), b"layer three").unwrap();
    want.insert("/third".into(), b"layer three".to_vec());
    archive_now(&m);
    // Not archived: lives in the writable generation on the SSD.
    fs::write(m.path("upper"), b"writable").unwrap();
    want.insert("/upper".into(), b"writable".to_vec());
    let mut layers_before = status(&m)["layers"].clone();
    m.umount();
    let path = m.store.join("manifest");
    let good = fs::read(&path).unwrap();
    for damage in ["flip", "truncate"] {
        match damage {
            "flip" => flip(&path, 200, 1),
            _ => fs::write(&path, &good[..good.len() / 3]).unwrap(),
        }
        let out = spinfs(&["mount", m.store.to_str().unwrap(), m.mnt.to_str().unwrap()]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("manifest") && err.contains("damaged") && err.contains("fsck --repair"),
            "{err}"
        );
        let (code, text, _) = fsck(&m.store, false);
        assert_eq!(code, 4, "{text}");
        assert!(
            text.contains("manifest") && text.contains("is damaged"),
            "{text}"
        );
        let (code, text, _) = fsck(&m.store, true);
        assert!(code == 1, "{code} {text}");
        assert!(
            text.contains("manifest rebuilt from state snapshot"),
            "{text}"
        );
        assert_clean(&m.store);
        m.mount();
        check_files(&read_all(&m.mnt), &want, &BTreeSet::new());
        let layers: Vec<_> = status(&m)["layers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["kind"] == "archived")
            .map(|l| (l["id"].clone(), l["level"].clone(), l["blobs"].clone()))
            .collect();
        let before: Vec<_> = layers_before
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["kind"] == "archived")
            .map(|l| (l["id"].clone(), l["level"].clone(), l["blobs"].clone()))
            .collect();
        assert_eq!(layers, before);
        // The store keeps working: a seal after the rebuild.
        fs::write(m.path("after"), b"after").unwrap();
        archive_now(&m);
        assert_eq!(fs::read(m.path("after")).unwrap(), b"after");
        fs::remove_file(m.path("after")).unwrap();
        archive_now(&m);
        layers_before = status(&m)["layers"].clone();
        m.umount();
        assert_clean(&m.store);
    }
}

#[test]
fn damaged_cache_entries_and_head_caches_are_refetched_and_repaired() {
    let (mut m, want) = store_with_layer(&[]);
    m.mount();
    // Fill the chunk cache.
    check_files(&read_all(&m.mnt), &want, &BTreeSet::new());
    m.umount();
    assert_clean(&m.store);
    let cache = m.store.join("cache");
    let mut entries: Vec<PathBuf> = fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('i'))
        .flat_map(|d| fs::read_dir(d.path()).unwrap().flatten().map(|e| e.path()))
        .collect();
    entries.sort();
    assert!(entries.len() >= 4, "{entries:?}");
    flip(&entries[0], 100, 1); // data
    // Entries are the data, then a 64-byte trailer (the header of the format).
    let len1 = fs::metadata(&entries[1]).unwrap().len();
    flip(&entries[1], len1 - 64 + 20, 1); // header
    let len = fs::metadata(&entries[3]).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&entries[3])
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let heads = m.store.join("layers/0000000000000001.heads");
    flip(&heads, 64 + 10, 1); // a head
    let (code, text, _) = fsck(&m.store, false);
    assert_eq!(code, 4, "{text}");
    assert!(
        text.contains(&format!("chunk cache entry {}", entries[0].display())),
        "{text}"
    );
    assert!(
        text.contains("data checksum mismatch") && text.contains("header checksum mismatch"),
        "{text}"
    );
    assert!(
        text.contains(&format!("chunk cache entry {}", entries[3].display())),
        "{text}"
    );
    assert!(
        text.contains("head cache") && text.contains("head checksum mismatch"),
        "{text}"
    );
    // Through the mount: right data regardless (fetched again from the media).
    m.mount();
    check_files(&read_all(&m.mnt), &want, &BTreeSet::new());
    m.umount();
    // Damage again, then --repair: entries dropped, head cache rebuilt.
    flip(&entries[2], 100, 1);
    flip(&heads, 64 + 5000, 1);
    let (code, text, _) = fsck(&m.store, true);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("dropped damaged chunk cache entry"), "{text}");
    assert!(
        text.contains("head cache") && text.contains("rebuilt"),
        "{text}"
    );
    assert_clean(&m.store);
    m.mount();
    check_files(&read_all(&m.mnt), &want, &BTreeSet::new());
    m.umount();
    // A truncated head cache too.
    let len = fs::metadata(&heads).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&heads)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let (code, text, _) = fsck(&m.store, true);
    assert_eq!(code, 1, "{text}");
    assert_clean(&m.store);
}

#[test]
fn orphans_are_reported_and_removed_by_repair() {
    let (mut m, want) = store_with_layer(&[]);
    // Fill the chunk cache.
    m.mount();
    read_all(&m.mnt);
    m.umount();
    let store = m.store.clone();
    let s = &store;
    let upper = manifest(s)["upper_gen"].as_u64().unwrap();
    let orphans = [
        s.join("gens/00000000000000ff"),
        s.join("layers/0000000000000063.meta"),
        s.join("layers/0000000000000001.meta.tmp"),
        s.join(format!("gens/{upper:016x}/work/leftover")),
        s.join("manifest.new"),
        s.join("cache/tmp/partial"),
        s.join("cache/i0000000000000063"),
    ];
    fs::create_dir_all(orphans[0].join("tree/x")).unwrap();
    fs::write(&orphans[1], b"x").unwrap();
    fs::write(&orphans[2], b"x").unwrap();
    fs::create_dir_all(orphans[3].parent().unwrap()).unwrap();
    fs::write(&orphans[3], b"x").unwrap();
    fs::write(&orphans[4], b"x").unwrap();
    fs::create_dir_all(orphans[5].parent().unwrap()).unwrap();
    fs::write(&orphans[5], b"x").unwrap();
    // Entries of an image the manifest does not reference: a copy of a real image's entries.
    let real: PathBuf = fs::read_dir(s.join("cache"))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with('i'))
        .unwrap()
        .path();
    fs::create_dir(&orphans[6]).unwrap();
    for e in fs::read_dir(&real).unwrap().flatten() {
        fs::copy(e.path(), orphans[6].join(e.file_name())).unwrap();
    }
    let (code, text, _) = fsck(s, false);
    assert_eq!(code, 4, "{text}");
    for o in &orphans[..6] {
        assert!(
            text.contains(&o.display().to_string()),
            "{} not reported:\n{text}",
            o.display()
        );
    }
    assert!(
        text.contains(&format!(
            "note: chunk cache leftover {}",
            orphans[5].display()
        )),
        "{text}"
    );
    assert!(text.contains("chunk cache entries of image 99"), "{text}");
    let (code, text, _) = fsck(s, true);
    assert_eq!(code, 1, "{text}");
    for o in &orphans {
        assert!(!o.exists(), "{} not removed", o.display());
    }
    assert_clean(s);
    m.mount();
    check_files(&read_all(&m.mnt), &want, &BTreeSet::new());
}

/// Everything stat, readlink, getxattr and read say about a tree.
fn describe(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = fs::symlink_metadata(&p).unwrap();
        let rel = format!("/{}", p.strip_prefix(root).unwrap().display());
        let ft = md.file_type();
        let mut d = format!(
            "mode={:o} uid={} gid={} nlink={} ino={} mtime={}.{} ctime={}.{} rdev={}",
            md.mode(),
            md.uid(),
            md.gid(),
            md.nlink(),
            md.ino(),
            md.mtime(),
            md.mtime_nsec(),
            md.ctime(),
            md.ctime_nsec(),
            md.rdev()
        );
        if ft.is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        } else if ft.is_file() {
            d += &format!(
                " size={} hash={:?}",
                md.len(),
                blake3::hash(&fs::read(&p).unwrap())
            );
        } else if ft.is_symlink() {
            d += &format!(" -> {:?}", fs::read_link(&p).unwrap());
        } else if ft.is_fifo() || ft.is_char_device() {
            d += " special";
        }
        d += &format!(" xattrs={:?}", user_xattrs(&p));
        out.insert(rel, d);
    }
    out
}

fn user_xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C string and buffer.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "listxattr {}", p.display());
    let mut out = BTreeMap::new();
    for name in buf[..n as usize]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
    {
        let cn = std::ffi::CString::new(name).unwrap();
        let mut v = vec![0u8; 4096];
        // SAFETY: valid C strings and buffer.
        let l = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(l >= 0);
        v.truncate(l as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), v);
    }
    out
}

fn archived(m: &Mounted) -> Vec<(u64, u64, Vec<u64>, Vec<u64>)> {
    status(m)["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["kind"] == "archived")
        .map(|l| {
            let list = |k: &str| {
                l[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap())
                    .collect::<Vec<_>>()
            };
            (
                l["id"].as_u64().unwrap(),
                l["level"].as_u64().unwrap(),
                list("blobs"),
                list("generations"),
            )
        })
        .collect()
}

#[test]
fn disaster_recovery_rebuilds_the_store_from_the_media_alone() {
    let dir = tempfile::Builder::new()
        .prefix("dr")
        .tempdir_in(test_root())
        .unwrap();
    let media = dir.path().join("media");
    fs::create_dir(&media).unwrap();
    let uri = format!("dir:{}", media.display());
    let mut args = SMALL.to_vec();
    args.extend_from_slice(&["--merge-fanin", "2", "--media", &uri]);
    let mut m = Mounted::new(&args);
    let p = |m: &Mounted, s: &str| m.path(s);
    // Layer 1: files, hard links, xattrs, symlinks, special files, owners, modes, times.
    fs::create_dir_all(p(&m, "dir/sub")).unwrap();
    fs::write(p(&m, "dir/big"), data(1, 700_000)).unwrap();
    fs::write(p(&m, "dir/sub/small"), b"small").unwrap();
    fs::hard_link(p(&m, "dir/big"), p(&m, "big-link")).unwrap();
    std::os::unix::fs::symlink("dir/big", p(&m, "sym")).unwrap();
    xattr_set(&p(&m, "dir/big"), "user.color", b"blue");
    xattr_set(&p(&m, "dir"), "user.dir", b"yes");
    let run = |args: &[&str]| {
        let st = std::process::Command::new(args[0])
            .args(&args[1..])
            .status()
            .unwrap();
        assert!(st.success(), "{args:?}");
    };
    run(&["mkfifo", p(&m, "fifo").to_str().unwrap()]);
    run(&["mknod", p(&m, "null").to_str().unwrap(), "c", "1", "3"]);
    // A real 0/0 character device (not a whiteout) and a user's trusted.overlay.* xattr: both
    // must survive merges that reach the bottom layer.
    run(&["mknod", p(&m, "zero-dev").to_str().unwrap(), "c", "0", "0"]);
    xattr_set(&p(&m, "dir/sub/small"), "trusted.overlay.mine", b"kept");
    run(&[
        "chown",
        "1234:5678",
        p(&m, "dir/sub/small").to_str().unwrap(),
    ]);
    run(&["chmod", "0640", p(&m, "dir/sub/small").to_str().unwrap()]);
    run(&[
        "touch",
        "-h",
        "-d",
        "2001-02-03 04:05:06.789",
        p(&m, "sym").to_str().unwrap(),
    ]);
    run(&[
        "touch",
        "-d",
        "2002-02-03 04:05:06.123456789",
        p(&m, "dir/big").to_str().unwrap(),
    ]);
    archive_now(&m);
    // Never changed again: must look exactly like this after merges and the recovery (ctime
    // included: archived inodes keep theirs).
    let early = describe(&m.mnt);
    let unchanged = ["/dir/big", "/big-link", "/fifo", "/null", "/zero-dev"];
    // Layer 2: changes over layer 1 (copy-up, removal = whiteout, new hard link).
    fs::write(p(&m, "dir/sub/small"), b"changed").unwrap();
    fs::remove_file(p(&m, "sym")).unwrap();
    fs::hard_link(p(&m, "dir/sub/small"), p(&m, "small-link")).unwrap();
    fs::write(p(&m, "second"), data(2, 200_000)).unwrap();
    archive_now(&m); // merges 1 and 2 (fan-in 2)
    // Layer 3 and 4: more, and a second-level merge.
    fs::write(p(&m, "third"), data(3, 90_000)).unwrap();
    fs::remove_dir_all(p(&m, "dir/sub")).unwrap();
    archive_now(&m);
    fs::write(p(&m, "fourth"), data(4, 10)).unwrap();
    xattr_set(&p(&m, "second"), "user.late", b"1");
    archive_now(&m);
    fs::write(p(&m, "fifth"), b"5").unwrap();
    archive_now(&m);
    let layers = archived(&m);
    assert!(
        layers.iter().any(|l| l.1 >= 2),
        "expected a second-level merge: {layers:?}"
    );
    assert!(layers.len() >= 2, "{layers:?}");
    // As the archived state shows it to a fresh daemon.
    m.remount();
    let before = describe(&m.mnt);
    m.umount();
    assert_clean(&m.store);

    // The SSD store is lost.
    fs::remove_dir_all(&m.store).unwrap();
    let out = spinfs_ok(&["recover", "--media", &uri, m.store.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("recovered store"), "{text}");
    assert_clean(&m.store);
    m.mount();
    assert_eq!(archived(&m), layers, "layer structure");
    let after = describe(&m.mnt);
    for (k, v) in &before {
        if k == "/" {
            // The root is the new writable generation's: it takes mode, owner, mtime and
            // xattrs from the newest layer's root; its ctime is the time they were set.
            let strip = |d: &str| {
                d.split(' ')
                    .filter(|w| !w.starts_with("ctime="))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            assert_eq!(strip(&after["/"]), strip(v), "/");
            continue;
        }
        assert_eq!(after.get(k), Some(v), "{k}");
    }
    assert_eq!(
        before.len(),
        after.len(),
        "{:?}",
        after.keys().collect::<Vec<_>>()
    );
    for k in unchanged {
        assert_eq!(
            after.get(k),
            early.get(k),
            "{k} changed since its first seal"
        );
    }
    assert!(
        after["/small-link"].contains("trusted.overlay.mine"),
        "{}",
        after["/small-link"]
    );
    // The recovered store keeps working: new files, seals and merges, new inode numbers.
    let used: BTreeSet<u64> = before
        .values()
        .map(|d| {
            d.split(" ino=")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    fs::write(p(&m, "new"), b"new").unwrap();
    let ino = fs::metadata(p(&m, "new")).unwrap().ino();
    assert!(!used.contains(&ino), "inode number {ino} reused");
    archive_now(&m);
    m.remount();
    assert_eq!(fs::read(p(&m, "new")).unwrap(), b"new");
    assert_eq!(fs::metadata(p(&m, "new")).unwrap().ino(), ino);
    m.umount();
    assert_clean(&m.store);
}

#[test]
fn bad_input_gets_one_line_errors_and_changes_nothing() {
    let dir = tempfile::Builder::new()
        .prefix("bad")
        .tempdir_in(test_root())
        .unwrap();
    let d = dir.path();
    // fsck of something that is not a store.
    fs::create_dir(d.join("plain")).unwrap();
    fs::write(d.join("plain/file"), b"x").unwrap();
    for target in [d.join("plain"), d.join("missing")] {
        let out = spinfs(&["fsck", target.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(8));
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("not a spinfs store") || err.contains("does not exist"),
            "{err}"
        );
    }
    assert_eq!(names(&d.join("plain")), ["file".to_string()].into());
    // recover from a place without spinfs media.
    fs::create_dir(d.join("nomedia")).unwrap();
    fs::write(d.join("nomedia/junk"), b"junk").unwrap();
    let out = spinfs(&[
        "recover",
        "--media",
        &format!("dir:{}", d.join("nomedia").display()),
        d.join("new").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no spinfs media"), "{err}");
    assert!(!d.join("new").exists());
    // A medium of a store that never archived: no state snapshot.
    let mut m = Mounted::new(SMALL);
    m.umount();
    let media = format!("dir:{}", m.store.join("media").display());
    let out = spinfs(&[
        "recover",
        "--media",
        &media,
        d.join("new").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    // (An empty medium holds no container at all.)
    assert!(
        err.contains("no spinfs media") || err.contains("no state snapshot"),
        "{err}"
    );
    assert!(!d.join("new").exists());
    // A manifest of a newer format is not damage: fsck refuses to touch the store.
    let path = m.store.join("manifest");
    let good = fs::read_to_string(&path).unwrap();
    fs::write(&path, good.replacen(" v1 ", " v9 ", 1)).unwrap();
    for repair in [false, true] {
        let (code, _, out) = fsck(&m.store, repair);
        assert_eq!(code, 8);
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("format version 9"), "{err}");
    }
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        good.replacen(" v1 ", " v9 ", 1)
    );
    fs::write(&path, &good).unwrap();
    // recover into a non-empty directory: refused, nothing touched.
    m.mount();
    fs::write(m.path("f"), b"f").unwrap();
    archive_now(&m);
    m.umount();
    let out = spinfs(&[
        "recover",
        "--media",
        &media,
        d.join("plain").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(names(&d.join("plain")), ["file".to_string()].into());
    assert_eq!(fs::read(d.join("plain/file")).unwrap(), b"x");
}

#[test]
fn recovery_falls_back_to_an_older_snapshot_when_the_newest_is_damaged() {
    let dir = tempfile::Builder::new()
        .prefix("fb")
        .tempdir_in(test_root())
        .unwrap();
    let media = dir.path().join("media");
    fs::create_dir(&media).unwrap();
    let uri = format!("dir:{}", media.display());
    let mut args = SMALL.to_vec();
    args.extend_from_slice(&["--media", &uri]);
    let mut m = Mounted::new(&args);
    fs::write(m.path("one"), data(1, 5000)).unwrap();
    archive_now(&m);
    fs::write(m.path("two"), data(2, 5000)).unwrap();
    archive_now(&m);
    m.umount();
    // state.2 follows meta.2 in the same commit: the object after meta.2's last one.
    let meta2 = manifest(&m.store)["layers"][1]["meta"].clone();
    let (c, off, len, _) = *extents(&meta2).last().unwrap();
    let state_obj = off + len.div_ceil(OBJECT) * OBJECT;
    flip(&container_file(&media, c), RESERVED + state_obj + 20, 1);
    let (code, text, _) = fsck(&m.store, false);
    assert_eq!(code, 4, "{text}");
    assert!(
        text.contains("state.2") && text.contains("not referenced by the manifest"),
        "{text}"
    );
    fs::remove_dir_all(&m.store).unwrap();
    let out = spinfs_ok(&["recover", "--media", &uri, m.store.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("skipped damaged state snapshot state.2") && text.contains("snapshot 1"),
        "{text}"
    );
    m.mount();
    assert_eq!(names(&m.mnt), ["one".to_string()].into());
    assert_eq!(fs::read(m.path("one")).unwrap(), data(1, 5000));
    // New layers never reuse the ids of what is on the media (layer 2's images are there).
    fs::write(m.path("three"), b"3").unwrap();
    archive_now(&m);
    let ids: Vec<u64> = status(&m)["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["kind"] == "archived")
        .map(|l| l["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(
        ids.contains(&1) && ids.iter().all(|&i| i == 1 || i > 2),
        "{ids:?}"
    );
    m.umount();
    // The damaged state.2 stays on the append-only media: reported, nothing else.
    let (code, text, _) = fsck(&m.store, false);
    assert_eq!(code, 4, "{text}");
    assert_eq!(
        text.lines().filter(|l| l.starts_with("damage:")).count(),
        1,
        "{text}"
    );
}

#[test]
fn meta_damaged_in_both_copies_names_the_files_and_is_not_repairable() {
    // Enough names for a meta image of several blocks (block 0, with the superblock
    // checksum over it, is not where the damage goes).
    let mut m = Mounted::new(SMALL);
    for i in 0..300 {
        fs::write(
            m.path(&format!("a-file-with-a-rather-long-name-{i:04}")),
            b"x",
        )
        .unwrap();
    }
    archive_now(&m);
    m.umount();
    let meta = manifest(&m.store)["layers"][0]["meta"].clone();
    let (c, off, _, _) = extents(&meta)[0];
    // The same bytes near the end of the image (inodes, directory entries) in the SSD copy
    // and the media copy.
    let len = meta["length"].as_u64().unwrap();
    assert!(len >= 3 * 4096, "{len}");
    let at = len - 300;
    flip(&m.store.join("layers/0000000000000001.meta"), at, 2);
    flip(
        &container_file(&m.store.join("media"), c),
        RESERVED + off + at,
        2,
    );
    let (code, text, _) = fsck(&m.store, true);
    assert_eq!(code, 4, "{text}");
    assert!(text.contains("checksum mismatch (crc32c"), "{text}");
    assert!(
        text.contains("neither the SSD nor the media holds an intact copy of meta image 1"),
        "{text}"
    );
    assert!(
        text.contains("meta image 1 on the media, bytes 0..") && text.contains("metadata of: /"),
        "{text}"
    );
    // Nothing was replaced by a damaged copy.
    assert!(m.store.join("layers/0000000000000001.meta").exists());
}
