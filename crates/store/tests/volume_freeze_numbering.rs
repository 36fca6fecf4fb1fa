//! Inode numbers seen through directory handles opened before a freeze.
//!
//! A generation is frozen while the mount keeps serving; a directory opened just before the
//! freeze is listed from the tree it was opened in (now the frozen generation). Its entries
//! keep the numbers of that generation: readdir's d_ino must equal the st_ino a lookup gives.
//! (The randomized differential test saw, under heavy load, a d_ino numbered in the new
//! generation for a file of the frozen one: a background threshold seal froze the tree
//! between opendir and readdir.) These tests force that interleaving deterministically by
//! calling `Volume::freeze` between `opendir` and `readdir`.

use spinfs_store::Volume;
use spinfs_store::volume::{Caller, DirEntry, ROOT_INO};
use std::ffi::OsStr;
use std::path::Path;

fn caller() -> Caller {
    Caller {
        uid: 0,
        gid: 0,
        pid: 1,
    }
}

/// A volume over `root/gens/1/tree` with `names` created in directory `d`.
fn volume(root: &Path, names: &[&str]) -> (Volume, u64) {
    let tree = root.join("gens/1/tree");
    std::fs::create_dir_all(&tree).unwrap();
    let vol = Volume::new(&tree, &root.join("gens/1/work"), 1, Vec::new()).unwrap();
    let d = vol
        .mkdir(ROOT_INO, OsStr::new("d"), 0o755, 0o022, &caller())
        .unwrap();
    for n in names {
        let (_, fh, _) = vol
            .create(
                d.ino,
                OsStr::new(n),
                0o644,
                0o022,
                libc::O_RDWR,
                &caller(),
                false,
            )
            .unwrap();
        vol.release(fh);
    }
    (vol, d.ino)
}

fn freeze(vol: &Volume, root: &Path) {
    let tree = root.join("gens/2/tree");
    std::fs::create_dir_all(&tree).unwrap();
    vol.freeze(2, &tree, &root.join("gens/2/work")).unwrap();
}

fn listing(vol: &Volume, fh: u64) -> Vec<DirEntry> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let batch = vol.readdir(fh, pos).unwrap();
        let Some(last) = batch.last() else { break };
        pos = last.next;
        out.extend(batch);
    }
    out
}

/// Every listed name's d_ino equals the st_ino a lookup of it gives now.
fn assert_d_ino_is_st_ino(vol: &Volume, dir: u64, list: &[DirEntry], want: usize) {
    let mut n = 0;
    for e in list {
        if e.name == b"." || e.name == b".." {
            continue;
        }
        let name = OsStr::new(std::str::from_utf8(&e.name).unwrap());
        let attr = vol.lookup(dir, name).unwrap();
        assert_eq!(
            e.ino,
            attr.ino,
            "{}: d_ino {:#x} but st_ino {:#x}",
            String::from_utf8_lossy(&e.name),
            e.ino,
            attr.ino
        );
        assert_eq!(attr.ino >> 32, 1, "a file of generation 1 keeps its number");
        n += 1;
    }
    assert_eq!(n, want, "names listed");
}

/// A directory that lives only in the writable tree (its handle reads the tree directly).
#[test]
fn upper_directory_opened_before_a_freeze() {
    let tmp = tempfile::tempdir().unwrap();
    let (vol, d) = volume(tmp.path(), &["a", "b", "c"]);
    let fh = vol.opendir(d).unwrap();
    freeze(&vol, tmp.path());
    let list = listing(&vol, fh);
    assert_d_ino_is_st_ino(&vol, d, &list, 3);
    vol.release(fh);
    // Opened after the freeze (merged with the frozen tree): the same numbers.
    let fh = vol.opendir(d).unwrap();
    let list = listing(&vol, fh);
    assert_d_ino_is_st_ino(&vol, d, &list, 3);
    vol.release(fh);
}

/// The root directory opened before the freeze.
#[test]
fn root_opened_before_a_freeze() {
    let tmp = tempfile::tempdir().unwrap();
    let (vol, _) = volume(tmp.path(), &["a"]);
    let fh = vol.opendir(ROOT_INO).unwrap();
    freeze(&vol, tmp.path());
    let list = listing(&vol, fh);
    assert_d_ino_is_st_ino(&vol, ROOT_INO, &list, 1);
    vol.release(fh);
}

/// The tree a directory handle reads is deleted once its generation is sealed: a listing begun
/// before the freeze goes on after the seal (from the first entry, or after an entry, by the
/// tree's cookie), with the same entries and numbers. (Reading the deleted directory failed:
/// ENOENT from the start, EINVAL at a cookie.)
#[test]
fn directory_opened_before_a_freeze_is_read_after_the_seal() {
    let tmp = tempfile::tempdir().unwrap();
    let (vol, d) = volume(tmp.path(), &["a", "b", "c", "e", "f"]);
    let fh = vol.opendir(d).unwrap();
    let whole = listing(&vol, fh);
    let fh2 = vol.opendir(d).unwrap();
    freeze(&vol, tmp.path());
    // The kernel read part of it: up to some entry's cookie.
    let first = vol.readdir(fh2, 0).unwrap();
    let cut = first.iter().position(|e| e.name == b"b").unwrap();
    let cookie = first[cut].next;
    vol.sealed(1, None).unwrap();
    std::fs::remove_dir_all(tmp.path().join("gens/1")).unwrap();
    let key = |l: &[DirEntry]| -> Vec<(Vec<u8>, u64)> {
        l.iter().map(|e| (e.name.clone(), e.ino)).collect()
    };
    let again = listing(&vol, fh);
    assert_eq!(key(&again), key(&whole), "the whole listing after the seal");
    let rest = listing_from(&vol, fh2, cookie);
    assert_eq!(
        key(&rest),
        key(&first[cut + 1..]),
        "the rest after the cookie"
    );
    assert!(rest.iter().all(|e| e.name != b"b") && !rest.is_empty());
    vol.release(fh);
    vol.release(fh2);
}

fn listing_from(vol: &Volume, fh: u64, mut pos: i64) -> Vec<DirEntry> {
    let mut out = Vec::new();
    loop {
        let batch = vol.readdir(fh, pos).unwrap();
        let Some(last) = batch.last() else { break };
        pos = last.next;
        out.extend(batch);
    }
    out
}
