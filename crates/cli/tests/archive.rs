//! Archived layers through a real mount: sealing (threshold-driven and forced), reads of
//! archived data, overlay semantics over archived entries, and what must never touch media.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const SMALL: &[&str] = &[
    "--container-size",
    "32M",
    "--object-size",
    "64K",
    "--chunk-size",
    "1M",
];

/// Waits until the writable layer is below the threshold and no seal runs: the seals the
/// threshold calls for have happened, as they did synchronously in the original system.
fn settle(m: &Mounted) {
    let settled = || {
        let s = status(m);
        let layers = s["layers"].as_array().unwrap();
        layers[0]["bytes"].as_u64().unwrap() < s["archive_threshold"].as_u64().unwrap()
            && layers.iter().all(|l| l["kind"] != "sealing")
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !settled() {
        if Instant::now() >= deadline {
            let log = fs::read_to_string(m.store.join("spinfs.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            panic!(
                "timed out waiting for threshold seals: {}\nlog (last lines first):\n{}",
                status(m),
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SPEC problem 1, scaled down (threshold 10 MiB, files 6 MiB), every step as written, the
/// answer checked after every step and again after a remount.
#[test]
fn deleted_files_never_come_back_problem_1() {
    let mut args = SMALL.to_vec();
    // No background merge reshapes the layers checked below (the cp -a is sealed in as
    // many layers as the threshold is crossed while it writes); merges have their own
    // seed-scenario test.
    args.extend(["--archive-threshold", "10M", "--merge-fanin", "16"]);
    let mut m = Mounted::new(&args);
    let src = tempfile::tempdir_in(test_root()).unwrap();
    let srcdir = src.path().join("src");
    fs::create_dir(&srcdir).unwrap();
    for i in 1..=9 {
        fs::write(srcdir.join(format!("random_file0{i}")), data(i, 6 << 20)).unwrap();
    }
    let out = Command::new("cp")
        .arg("-a")
        .arg(&srcdir)
        .arg(&m.mnt)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(names(&m.path("src")).len(), 9);
    settle(&m);
    assert_eq!(names(&m.path("src")).len(), 9);
    fs::remove_dir_all(m.path("src")).unwrap();
    assert!(!m.path("src").exists());
    fs::create_dir(m.path("src")).unwrap();
    assert!(names(&m.path("src")).is_empty(), "a new src must be empty");
    let mut expect = BTreeSet::new();
    for i in [1, 9, 2, 3, 4, 5, 6] {
        let name = format!("random_file0{i}");
        let out = Command::new("cp")
            .arg(srcdir.join(&name))
            .arg(m.path("src"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        expect.insert(name);
        assert_eq!(
            names(&m.path("src")),
            expect,
            "after copying random_file0{i}"
        );
        settle(&m);
        assert_eq!(
            names(&m.path("src")),
            expect,
            "after the seals following random_file0{i}"
        );
    }
    // The cp -a is sealed in one or more layers (as fast as it writes), then every second
    // copied file crosses the threshold: (01, 09), (02, 03), (04, 05) sealed, 06 writable.
    // A freeze comes at the write that crosses the threshold, so the file being written
    // then is split: its part written so far is sealed, the rest stays in the writable
    // layer as a stacked file.
    let s = status(&m);
    let layers = s["layers"].as_array().unwrap();
    assert!(archived_layers(&m) >= 4, "threshold seals happened: {s}");
    for l in &layers[1..4] {
        assert_eq!(l["kind"], "archived", "{s}");
        assert!(l["files"].as_u64().unwrap() >= 2, "{s}");
    }
    assert_eq!(names(&m.path("src")), expect);
    m.remount();
    assert_eq!(names(&m.path("src")), expect, "after remount");
    for i in [1, 9, 2, 3, 4, 5, 6] {
        let got = fs::read(m.path(&format!("src/random_file0{i}"))).unwrap();
        assert!(got == data(i, 6 << 20), "content of random_file0{i}");
    }
}

#[test]
fn archived_files_read_back_and_change_like_any_other() {
    let mut m = Mounted::new(SMALL);
    fs::create_dir_all(m.path("a/b")).unwrap();
    fs::write(m.path("a/f"), data(1, 3_000_000)).unwrap();
    fs::write(m.path("a/b/g"), b"small").unwrap();
    std::os::unix::fs::symlink("f", m.path("a/link")).unwrap();
    fs::write(m.path("gone"), b"x").unwrap();
    let ino_f = fs::metadata(m.path("a/f")).unwrap().ino();
    let ino_b = fs::metadata(m.path("a/b")).unwrap().ino();
    archive_now(&m);
    assert_eq!(archived_layers(&m), 1);
    assert_eq!(fs::read(m.path("a/f")).unwrap(), data(1, 3_000_000));
    assert_eq!(
        fs::metadata(m.path("a/f")).unwrap().ino(),
        ino_f,
        "ino survives the seal"
    );
    assert_eq!(fs::read_link(m.path("a/link")).unwrap(), Path::new("f"));
    // changes over archived entries
    fs::OpenOptions::new()
        .append(true)
        .open(m.path("a/f"))
        .unwrap()
        .write_all(b"tail")
        .unwrap();
    fs::set_permissions(m.path("a/b/g"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::remove_file(m.path("gone")).unwrap();
    fs::rename(m.path("a/b"), m.path("moved")).unwrap();
    let out = Command::new("setfattr")
        .args(["-n", "user.k", "-v", "v"])
        .arg(m.path("a/link"))
        .output();
    drop(out); // user.* is not allowed on symlinks, as everywhere
    let out = Command::new("setfattr")
        .args(["-n", "user.k", "-v", "v"])
        .arg(m.path("a/f"))
        .status()
        .unwrap();
    assert!(out.success());
    let mut expect_f = data(1, 3_000_000);
    expect_f.extend_from_slice(b"tail");
    let check = |m: &Mounted| {
        assert_eq!(fs::read(m.path("a/f")).unwrap(), expect_f);
        assert_eq!(
            fs::metadata(m.path("a/f")).unwrap().ino(),
            ino_f,
            "ino survives copy-up"
        );
        assert_eq!(fs::read(m.path("moved/g")).unwrap(), b"small");
        assert_eq!(
            fs::metadata(m.path("moved/g")).unwrap().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(m.path("moved")).unwrap().ino(),
            ino_b,
            "a renamed directory keeps its number"
        );
        assert!(!m.path("gone").exists());
        assert!(!m.path("a/b").exists());
        assert_eq!(names(&m.mnt), ["a", "moved"].map(String::from).into());
        assert_eq!(names(&m.path("a")), ["f", "link"].map(String::from).into());
        let x = Command::new("getfattr")
            .args(["-n", "user.k", "--only-values"])
            .arg(m.path("a/f"))
            .output()
            .unwrap();
        assert_eq!(x.stdout, b"v");
    };
    check(&m);
    archive_now(&m);
    assert_eq!(archived_layers(&m), 2);
    check(&m);
    m.remount();
    check(&m);
    // recreate what was removed, as another type
    fs::create_dir(m.path("gone")).unwrap();
    assert!(names(&m.path("gone")).is_empty());
    fs::remove_dir(m.path("gone")).unwrap();
    fs::write(m.path("gone"), b"again").unwrap();
    archive_now(&m);
    m.remount();
    assert_eq!(fs::read(m.path("gone")).unwrap(), b"again");
}

#[test]
fn listing_and_sniffing_archived_files_never_touch_the_media() {
    let mut m = Mounted::new(&[SMALL, &["--head-size", "64K"]].concat());
    for d in 0..5 {
        fs::create_dir_all(m.path(&format!("videos/d{d}"))).unwrap();
        for f in 0..10 {
            fs::write(
                m.path(&format!("videos/d{d}/clip{f}.bin")),
                data(d * 100 + f, 200_000),
            )
            .unwrap();
        }
    }
    archive_now(&m);
    m.remount(); // cold: nothing cached in the kernel
    let before = media_reads(&m);
    for cmd in [
        vec!["ls", "-lR"],
        vec!["find", ".", "-type", "f"],
        vec!["du", "-sh", "."],
        vec!["stat", "videos/d3/clip7.bin"],
    ] {
        let out = Command::new(cmd[0])
            .args(&cmd[1..])
            .current_dir(&m.mnt)
            .output()
            .unwrap();
        assert!(out.status.success(), "{cmd:?}: {}", stderr(&out));
    }
    // header sniffing: the first 64 KiB of every file come from the head cache
    for d in 0..5 {
        for f in 0..10 {
            let mut head = vec![0u8; 4096];
            let mut file = fs::File::open(m.path(&format!("videos/d{d}/clip{f}.bin"))).unwrap();
            file.read_exact(&mut head).unwrap();
            assert_eq!(head, data(d * 100 + f, 200_000)[..4096]);
            file.seek(SeekFrom::Start(60_000)).unwrap();
            let mut more = vec![0u8; 5536];
            file.read_exact(&mut more).unwrap();
            assert_eq!(more, data(d * 100 + f, 200_000)[60_000..65_536]);
        }
    }
    assert_eq!(
        media_reads(&m),
        before,
        "listing and sniffing read the media"
    );
    // reading past the head does go to the media
    let all = fs::read(m.path("videos/d0/clip0.bin")).unwrap();
    assert_eq!(all, data(0, 200_000));
    assert!(media_reads(&m) > before);
}

#[test]
fn descriptors_stay_valid_across_a_seal() {
    let m = Mounted::new(SMALL);
    let mut w = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(m.path("log"))
        .unwrap();
    w.write_all(b"before-seal;").unwrap();
    fs::write(m.path("r"), data(7, 500_000)).unwrap();
    let mut r = fs::File::open(m.path("r")).unwrap();
    let mut first = vec![0u8; 1000];
    r.read_exact(&mut first).unwrap();
    archive_now(&m);
    // the writer keeps writing through its descriptor and sees its own writes
    w.write_all(b"after-seal;").unwrap();
    w.sync_all().unwrap();
    let mut all = String::new();
    w.seek(SeekFrom::Start(0)).unwrap();
    w.read_to_string(&mut all).unwrap();
    assert_eq!(all, "before-seal;after-seal;");
    drop(w);
    assert_eq!(fs::read(m.path("log")).unwrap(), b"before-seal;after-seal;");
    // the reader keeps reading
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    first.extend(rest);
    assert_eq!(first, data(7, 500_000));
    archive_now(&m);
    assert_eq!(fs::read(m.path("log")).unwrap(), b"before-seal;after-seal;");
}

/// After a seal, the frozen generation's large files are punched out step by step before
/// its tree goes (`tree_delete_step`), but never one that is still open: a reader holding a
/// descriptor across the seal (a passthrough backing file, or a daemon handle) reads all of
/// it.
#[test]
fn a_file_open_across_a_seal_keeps_its_data_while_the_tree_is_drained() {
    for opts in ["allow_other", "allow_other,nopassthrough"] {
        let mut m = Mounted::with_options(SMALL, opts);
        let len = 3 << 20;
        fs::write(m.path("held"), data(11, len)).unwrap();
        fs::write(m.path("free"), data(12, len)).unwrap();
        // Remounted (nothing left open) with steps small enough for files this size.
        m.umount();
        let cfg = m.store.join("spinfs.toml");
        let text = fs::read_to_string(&cfg).unwrap();
        let text: String = text
            .lines()
            .map(|l| match l.starts_with("tree_delete_step = ") {
                true => "tree_delete_step = 65536\n".to_string(),
                false => format!("{l}\n"),
            })
            .collect();
        assert!(text.contains("tree_delete_step = 65536"), "{text}");
        fs::write(&cfg, text).unwrap();
        m.mount();
        let mut r = fs::File::open(m.path("held")).unwrap();
        let mut got = vec![0u8; 1000];
        r.read_exact(&mut got).unwrap();
        archive_now(&m);
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        got.extend(rest);
        assert!(got == data(11, len), "{opts}: the open file lost data");
        drop(r);
        assert!(fs::read(m.path("free")).unwrap() == data(12, len));
        assert!(fs::read(m.path("held")).unwrap() == data(11, len));
        let log = fs::read_to_string(m.store.join("spinfs.log")).unwrap();
        let line = log
            .lines()
            .find(|l| l.contains("generation tree deleted"))
            .unwrap_or_else(|| panic!("{opts}: no deletion logged:\n{log}"));
        let count = |key: &str| -> u64 {
            let at = line.find(key).unwrap_or_else(|| panic!("{key} in {line}")) + key.len();
            line[at..].split(' ').next().unwrap().parse().unwrap()
        };
        if opts.contains("nopassthrough") {
            // The daemon serves the open file from the sealed layer: nothing holds the
            // frozen copy any more, and both are drained.
            assert_eq!(count("drained_files="), 2, "{opts}: {line}");
        } else {
            // The kernel's passthrough backing file holds the frozen copy: left whole.
            assert_eq!(count("drained_files="), 1, "{opts}: {line}");
            assert_eq!(count("skipped_files="), 1, "{opts}: {line}");
        }
    }
}

/// Seals and merges at every step of a sequence of changes; the visible tree must stay the
/// same across every seal, merge (keep-markers and bottom/strip merges), and remount.
#[test]
fn merges_keep_the_visible_tree() {
    let mut m = Mounted::new(&[SMALL, &["--merge-fanin", "2"]].concat());
    // Names, types, modes, inode numbers, sizes of non-directories (a directory's st_size is
    // its layer's own business) and content hashes.
    let snapshot = |m: &Mounted| {
        let out = Command::new("find")
            .arg(".")
            .args(["-printf", "%p %y %m %i %s\n"])
            .current_dir(&m.mnt)
            .output()
            .unwrap();
        let mut l: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|line| {
                let f: Vec<&str> = line.split(' ').collect();
                if f[1] == "f" {
                    use std::hash::{Hash, Hasher};
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    fs::read(m.mnt.join(f[0])).unwrap().hash(&mut h);
                    format!("{line} {:016x}", h.finish())
                } else {
                    f[..4].join(" ")
                }
            })
            .collect();
        l.sort();
        l
    };
    type Step = Box<dyn Fn(&Mounted)>;
    let steps: Vec<Step> = vec![
        Box::new(|m| {
            fs::create_dir_all(m.path("d/e")).unwrap();
            for i in 0..5 {
                fs::write(
                    m.path(&format!("d/f{i}")),
                    data(i, 10_000 * (i as usize + 1)),
                )
                .unwrap();
            }
        }),
        Box::new(|m| {
            fs::remove_file(m.path("d/f1")).unwrap();
            fs::write(m.path("d/e/new"), b"new").unwrap();
        }),
        Box::new(|m| {
            fs::remove_dir_all(m.path("d")).unwrap();
            fs::create_dir(m.path("d")).unwrap();
            fs::write(m.path("d/f2"), b"recreated").unwrap();
        }),
        Box::new(|m| {
            fs::rename(m.path("d"), m.path("d2")).unwrap();
            fs::hard_link(m.path("d2/f2"), m.path("hl")).unwrap();
        }),
        Box::new(|m| {
            fs::write(m.path("d2/f2"), b"rewritten").unwrap();
            fs::create_dir(m.path("d")).unwrap();
        }),
    ];
    for (i, step) in steps.iter().enumerate() {
        step(&m);
        let before = snapshot(&m);
        archive_now(&m);
        assert_eq!(snapshot(&m), before, "after the seal of step {i}");
        spinfs_ok(&["merge", m.store.to_str().unwrap(), "--wait"]);
        assert_eq!(snapshot(&m), before, "after a merge at step {i}");
        m.remount();
        assert_eq!(snapshot(&m), before, "after remount at step {i}");
    }
    // Everything merged down to one bottom layer: no markers left, same tree.
    let before = snapshot(&m);
    for _ in 0..8 {
        spinfs_ok(&["merge", m.store.to_str().unwrap(), "--wait"]);
    }
    assert_eq!(archived_layers(&m), 1, "{}", status(&m));
    assert_eq!(snapshot(&m), before);
    m.umount();
    // offline merge and archive work too
    spinfs_ok(&["merge", m.store.to_str().unwrap()]);
    m.mount();
    assert_eq!(snapshot(&m), before);
}

/// Paths longer than PATH_MAX inside the mount (pjdfstest makes them) seal and read back.
#[test]
fn deep_trees_longer_than_path_max_seal() {
    let mut m = Mounted::new(SMALL);
    let comp = "d".repeat(200);
    let mut rel = std::path::PathBuf::new();
    let dir = fs::File::open(&m.mnt).unwrap();
    // Build 30 levels of 200-byte names (6000+ bytes) with *at calls.
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut cur = dir;
    for _ in 0..30 {
        let c = std::ffi::CString::new(comp.clone()).unwrap();
        assert_eq!(
            unsafe { libc::mkdirat(cur.as_raw_fd(), c.as_ptr(), 0o755) },
            0
        );
        let fd = unsafe {
            libc::openat(
                cur.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY,
            )
        };
        assert!(fd >= 0);
        cur = unsafe { fs::File::from_raw_fd(fd) };
        rel.push(&comp);
    }
    let c = std::ffi::CString::new("leaf").unwrap();
    let fd = unsafe {
        libc::openat(
            cur.as_raw_fd(),
            c.as_ptr(),
            libc::O_CREAT | libc::O_WRONLY,
            0o644,
        )
    };
    assert!(fd >= 0);
    let mut leaf = unsafe { fs::File::from_raw_fd(fd) };
    leaf.write_all(b"deep data").unwrap();
    drop(leaf);
    drop(cur);
    archive_now(&m);
    assert_eq!(archived_layers(&m), 1, "{}", status(&m));
    m.remount();
    let mut cur = fs::File::open(&m.mnt).unwrap();
    for _ in 0..30 {
        let c = std::ffi::CString::new(comp.clone()).unwrap();
        let fd = unsafe {
            libc::openat(
                cur.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY,
            )
        };
        assert!(fd >= 0, "level missing after the seal");
        cur = unsafe { fs::File::from_raw_fd(fd) };
    }
    let fd = unsafe { libc::openat(cur.as_raw_fd(), c.as_ptr(), libc::O_RDONLY) };
    assert!(fd >= 0);
    let mut s = String::new();
    unsafe { fs::File::from_raw_fd(fd) }
        .read_to_string(&mut s)
        .unwrap();
    assert_eq!(s, "deep data");
}

/// A tree deeper than PATH_MAX (as pjdfstest's ENAMETOOLONG cases leave behind) is sealed:
/// the seal must not use whole paths (it failed with ENAMETOOLONG, left the generation frozen
/// and `archive --wait` hanging), and the deep file reads back after a remount.
#[test]
fn a_tree_deeper_than_path_max_is_sealed() {
    let mut m = Mounted::new(SMALL);
    let name = "d".repeat(250);
    // 20 levels of 251 bytes: ~5000 bytes below the mount, more than PATH_MAX (4096).
    let script = format!(
        "set -e; cd \"$1\"; for i in $(seq 20); do mkdir {name}; cd {name}; done; \
         printf deep-data > f; ln -s f link"
    );
    let mnt = m.mnt.clone();
    let walk = |cmd: &str| {
        let out = Command::new("bash")
            .args([
                "-c",
                &format!("{script_cd}{cmd}", script_cd = cd_chain(&name)),
                "x",
            ])
            .arg(&mnt)
            .output()
            .unwrap();
        assert!(out.status.success(), "{cmd}: {}", stderr(&out));
        out.stdout
    };
    let out = Command::new("bash")
        .args(["-c", &script, "x"])
        .arg(&m.mnt)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = spinfs(&["archive", m.store.to_str().unwrap(), "--wait"]);
    assert!(out.status.success(), "seal failed: {}", stderr(&out));
    let s = status(&m);
    assert!(
        s["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["kind"] != "sealing"),
        "{s}"
    );
    assert_eq!(archived_layers(&m), 1, "{s}");
    m.remount();
    assert_eq!(walk("cat f"), b"deep-data");
    assert_eq!(walk("readlink link"), b"f\n");
    fs::write(m.path("top"), b"x").unwrap();
    archive_now(&m);
    assert_eq!(archived_layers(&m), 2);
}

fn cd_chain(name: &str) -> String {
    format!("set -e; cd \"$1\"; for i in $(seq 20); do cd {name}; done; ")
}

/// Hard links of an archived inode: removing or adding a name changes the inode's link count
/// and ctime, seen through every other name (pjdfstest unlink::update_ctime_success and
/// rename::to_multiply_linked fail when a seal lands between their link and unlink). Today
/// the other name keeps nlink 2 and its archived ctime: the unlink only whites out one name
/// in the writable layer and the lower inode behind the other name is never touched.
#[test]
fn hard_links_of_an_archived_inode_follow_unlink() {
    let m = Mounted::new(SMALL);
    for kind in ["file", "fifo"] {
        let a = m.path(&format!("{kind}-a"));
        let b = m.path(&format!("{kind}-b"));
        if kind == "file" {
            fs::write(&a, b"x").unwrap();
        } else {
            let out = Command::new("mkfifo").arg(&a).status().unwrap();
            assert!(out.success());
        }
        fs::hard_link(&a, &b).unwrap();
        archive_now(&m);
        let before = fs::symlink_metadata(&b).unwrap();
        assert_eq!(before.nlink(), 2, "{kind}");
        std::thread::sleep(Duration::from_millis(20));
        fs::remove_file(&a).unwrap();
        let after = fs::symlink_metadata(&b).unwrap();
        assert_eq!(
            after.nlink(),
            1,
            "{kind}: nlink after unlinking the other name"
        );
        assert!(
            (after.ctime(), after.ctime_nsec()) > (before.ctime(), before.ctime_nsec()),
            "{kind}: ctime must move forward on unlink of another name"
        );
        assert_eq!(after.ino(), before.ino(), "{kind}");
    }
}

/// The archived layers of `status --json`, oldest first: (id, level, generations sealed in it).
fn archived_stack(m: &Mounted) -> Vec<(u64, u64, Vec<u64>)> {
    let s = status(m);
    let mut out: Vec<(u64, u64, Vec<u64>)> = s["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["kind"] == "archived")
        .map(|l| {
            (
                l["id"].as_u64().unwrap(),
                l["level"].as_u64().unwrap(),
                l["generations"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|g| g.as_u64().unwrap())
                    .collect(),
            )
        })
        .collect();
    out.reverse();
    out
}

/// SPEC problem 1 as the seed scenario, with the original's layer history: threshold 100 MiB
/// and files of 60 MiB scaled down to 10 MiB and 6 MiB (`cp -a` of random_file01..09, `rm -rf
/// src`, `mkdir src`, then random_file01, 09, 02, 03, 04, 05, 06 copied one by one).
///
/// The original sealed its upper directory `dir_NN` as layer `arc_NN` each time the data
/// written reached the threshold (synchronously, a file being written included up to where it
/// was): 960 MiB in all, so nine seals, `arc_00`..`arc_08`; and it merged everything when a
/// fifth layer had accumulated: `arc_00`..`arc_04` during the copy (→ `arc_00_04`), then
/// `arc_00_04` + `arc_05`..`arc_08` around random_file06 (→ `arc_00_08`), which is where
/// random_file07 and random_file08 came back: the merge included the base layers holding them,
/// `arc_05` with the opaque `src` made by `mkdir` over the removed one, and newer layers whose
/// `src` was not opaque.
///
/// Here the test plays the threshold (the daemon's is set out of reach, as its background
/// check would seal at timing-dependent points): files are copied through the mount in 1 MiB
/// writes and `spinfs archive --wait` seals each time 10 MiB were written since the last
/// seal, with the file being written open (spinfs moves it to the new generation, as SPEC
/// problem 5 requires, so it is sealed when complete). spinfs generation G+1 is the original's
/// `dir_G`. With `--merge-fanin 5` the first merge (`arc_00`..`arc_04`, five level-0 layers)
/// is the daemon's own background merge; spinfs merges tiered, so `arc_00_04` (level 1) plus
/// four level-0 layers is not due by its rule and the second merge is forced with
/// `spinfs merge` at the point where the original merged. After every write, seal and merge,
/// and after a remount, `ls src` must be exactly what was copied, never random_file07/08.
#[test]
fn seed_scenario_problem_1_merges_00_04_then_00_08() {
    const MIB: usize = 1 << 20;
    const FILE: usize = 6 * MIB;
    const THRESHOLD: usize = 10 * MIB;
    let mut args = SMALL.to_vec();
    args.extend(["--archive-threshold", "1G", "--merge-fanin", "5"]);
    let mut m = Mounted::new(&args);
    let content = |i: u64| data(i, FILE);
    // ls src must be exactly `expect` (None: src does not exist).
    let check = |m: &Mounted, expect: Option<&BTreeSet<String>>, when: &str| {
        let src = m.path("src");
        match expect {
            None => assert!(!src.exists(), "{when}: src exists"),
            Some(e) => {
                let got = names(&src);
                for gone in ["random_file07", "random_file08"] {
                    assert!(
                        e.contains(gone) || !got.contains(gone),
                        "{when}: deleted {gone} came back: {got:?}"
                    );
                }
                assert_eq!(&got, e, "{when}: ls src");
            }
        }
    };
    // Bytes written since the last seal; generations sealed, in order (arc_NN = seals[NN]);
    // merges that happened at a seal.
    struct Played {
        since_seal: usize,
        seals: Vec<u64>,
        merges_seen: Vec<Vec<u64>>,
    }
    let mut p = Played {
        since_seal: 0,
        seals: Vec::new(),
        merges_seen: Vec::new(),
    };
    // Copies random_file0{i} into src in 1 MiB writes, sealing where the threshold falls.
    let copy = |p: &mut Played, m: &Mounted, i: u64, expect: &mut BTreeSet<String>| {
        let name = format!("random_file0{i}");
        let data = content(i);
        let mut f = fs::File::create(m.path(&format!("src/{name}"))).unwrap();
        expect.insert(name.clone());
        for (k, piece) in data.chunks(MIB).enumerate() {
            f.write_all(piece).unwrap();
            p.since_seal += piece.len();
            if p.since_seal >= THRESHOLD {
                p.since_seal -= THRESHOLD;
                let before = archived_stack(m);
                let g = status(m)["layers"][0]["id"].as_u64().unwrap();
                archive_now(m);
                p.seals.push(g);
                let after = archived_stack(m);
                // The sealed generation is the newest layer now (unless merged at once).
                let newest = &after.last().unwrap().2;
                assert!(
                    newest.contains(&g),
                    "arc_{:02}: generation {g} not in the newest layer: {after:?}",
                    p.seals.len() - 1
                );
                if after.len() <= before.len() {
                    p.merges_seen.push(newest.clone());
                }
                check(
                    m,
                    Some(expect),
                    &format!("seal while writing {name} ({k} MiB)"),
                );
            }
        }
        drop(f);
        check(m, Some(expect), &format!("after copying {name}"));
        assert!(fs::read(m.path(&format!("src/{name}"))).unwrap() == data);
    };

    // 1. cp -a src/ MNT/ (the original's layers arc_00..arc_04 come from it)
    fs::create_dir(m.path("src")).unwrap();
    let mut expect = BTreeSet::new();
    for i in 1..=9 {
        copy(&mut p, &m, i, &mut expect);
    }
    assert_eq!(p.seals.len(), 5, "arc_00..arc_04 sealed during the copy");
    // The daemon merges arc_00..arc_04 in the background (five level-0 layers).
    wait_until("the merge of arc_00..arc_04", || {
        archived_stack(&m).len() == 1
    });
    let stack = archived_stack(&m);
    assert_eq!(
        (stack[0].1, &stack[0].2),
        (1, &p.seals[..5].to_vec()),
        "arc_00_04: one level-1 layer holding generations {:?}: {stack:?}",
        &p.seals[..5]
    );
    check(&m, Some(&expect), "after the merge of arc_00..arc_04");

    // 2. rm -rf src; mkdir src
    fs::remove_dir_all(m.path("src")).unwrap();
    check(&m, None, "after rm -rf src");
    fs::create_dir(m.path("src")).unwrap();
    let mut expect = BTreeSet::new();
    check(&m, Some(&expect), "after mkdir src");

    // 3. random_file01, 09, 02, 03, 04, 05 (arc_05..arc_08 are sealed among them)
    for i in [1, 9, 2, 3, 4, 5] {
        copy(&mut p, &m, i, &mut expect);
    }
    assert_eq!(p.seals.len(), 9, "arc_05..arc_08 sealed: {:?}", p.seals);
    assert!(p.merges_seen.is_empty(), "no merge during the seals");
    let stack = archived_stack(&m);
    let levels: Vec<u64> = stack.iter().map(|l| l.1).collect();
    assert_eq!(
        levels,
        [1, 0, 0, 0, 0],
        "arc_00_04 + arc_05..arc_08: {stack:?}"
    );
    for (k, l) in stack[1..].iter().enumerate() {
        assert_eq!(l.2, [p.seals[5 + k]], "arc_{:02}: {stack:?}", 5 + k);
    }
    // The original merged arc_00_04 + arc_05..arc_08 here.
    spinfs_ok(&["merge", m.store.to_str().unwrap(), "--wait"]);
    let stack = archived_stack(&m);
    assert_eq!(stack.len(), 1, "arc_00_08: {stack:?}");
    assert_eq!(
        stack[0].2, p.seals,
        "arc_00_08 holds every generation: {stack:?}"
    );
    check(&m, Some(&expect), "after the merge of arc_00_04..arc_08");

    // 4. random_file06: where the original showed random_file07 and random_file08 again
    copy(&mut p, &m, 6, &mut expect);
    assert_eq!(p.seals.len(), 9);
    m.remount();
    check(&m, Some(&expect), "after remount");
    archive_now(&m);
    check(&m, Some(&expect), "after the last seal");
    for i in [1, 9, 2, 3, 4, 5, 6] {
        let got = fs::read(m.path(&format!("src/random_file0{i}"))).unwrap();
        assert!(got == content(i), "content of random_file0{i}");
    }
}

/// A threshold the SSD cannot hold one and a half times is a misconfiguration: every seal
/// would find the SSD short of space and hold its daemon-served writers until it commits.
/// The mount says so in its log, with the largest threshold that would keep them writing;
/// a threshold that fits says nothing.
#[test]
fn a_threshold_larger_than_the_ssd_is_reported_at_mount() {
    const WARNING: &str = "less than 1.5 x archive_threshold free";
    let big = Mounted::new(&["--archive-threshold", "1024T"]);
    let log = fs::read_to_string(big.store.join("spinfs.log")).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains(WARNING))
        .unwrap_or_else(|| panic!("no warning for a 1 PiB threshold:\n{log}"));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("an archive_threshold of at most "), "{line}");
    drop(big);
    let fits = Mounted::new(&["--archive-threshold", "64M"]);
    let log = fs::read_to_string(fits.store.join("spinfs.log")).unwrap();
    assert!(!log.contains(WARNING), "{log}");
}
