//! `spinfs export`: an archived layer written out as a meta/blob pair that the Linux kernel
//! mounts and fsck.erofs accepts, showing exactly what the spinfs mount shows.

mod common;

use common::*;
use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fs;
use std::hash::{Hash, Hasher};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

const SMALL: &[&str] = &[
    "--container-size",
    "32M",
    "--object-size",
    "64K",
    "--chunk-size",
    "1M",
];

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// A kernel erofs mount, detached when dropped (also when a test fails).
struct KernelMount(PathBuf);

impl Drop for KernelMount {
    fn drop(&mut self) {
        let c = cstr(&self.0);
        // SAFETY: a valid path; umount2 has no memory effects on us.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// File-backed mount of `meta` with `device=` for each blob, in order.
fn kernel_mount(meta: &Path, blobs: &[PathBuf], target: &Path) -> KernelMount {
    fs::create_dir_all(target).unwrap();
    let opts = blobs
        .iter()
        .map(|b| format!("device={}", fs::canonicalize(b).unwrap().display()))
        .collect::<Vec<_>>()
        .join(",");
    let (s, t) = (cstr(&fs::canonicalize(meta).unwrap()), cstr(target));
    let (f, d) = (
        CString::new("erofs").unwrap(),
        CString::new(opts.clone()).unwrap(),
    );
    // SAFETY: valid NUL-terminated strings for the duration of the call.
    let r = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            f.as_ptr(),
            libc::MS_RDONLY,
            d.as_ptr().cast(),
        )
    };
    assert_eq!(
        r,
        0,
        "mount -t erofs {} -o {opts}: {}",
        meta.display(),
        std::io::Error::last_os_error()
    );
    KernelMount(target.to_path_buf())
}

fn fsck(meta: &Path, blobs: &[PathBuf]) {
    let mut cmd = Command::new("fsck.erofs");
    for b in blobs {
        cmd.arg(format!("--device={}", b.display()));
    }
    let out = cmd.arg(meta).output().expect("run fsck.erofs");
    assert!(
        out.status.success(),
        "fsck.erofs {}: {}{}",
        meta.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[derive(Debug, PartialEq, Eq)]
struct Entry {
    kind: char,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    content: u64,
    target: Vec<u8>,
    rdev: u64,
    /// Regular files: the first path (sorted) of the same inode.
    link_of: Option<String>,
}

/// Every path below `root` (root itself as ""), as stat and read show it.
fn snapshot(root: &Path) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    let mut first_of: HashMap<u64, String> = HashMap::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let path = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&rel)
        };
        let md = fs::symlink_metadata(&path).unwrap();
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            'd'
        } else if ft.is_file() {
            'f'
        } else if ft.is_symlink() {
            'l'
        } else if ft.is_char_device() {
            'c'
        } else if ft.is_block_device() {
            'b'
        } else if ft.is_fifo() {
            'p'
        } else {
            's'
        };
        let mut e = Entry {
            kind,
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            size: if kind == 'd' { 0 } else { md.len() },
            mtime: (md.mtime(), md.mtime_nsec()),
            content: 0,
            target: Vec::new(),
            rdev: md.rdev(),
            link_of: None,
        };
        match kind {
            'd' => {
                let mut names: Vec<String> = fs::read_dir(&path)
                    .unwrap()
                    .map(|d| d.unwrap().file_name().into_string().unwrap())
                    .collect();
                names.sort();
                for n in names.into_iter().rev() {
                    stack.push(if rel.is_empty() {
                        n
                    } else {
                        format!("{rel}/{n}")
                    });
                }
            }
            'f' => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                fs::read(&path).unwrap().hash(&mut h);
                e.content = h.finish();
                if md.nlink() > 1 {
                    let first = first_of.entry(md.ino()).or_insert_with(|| rel.clone());
                    e.link_of = Some(first.clone());
                }
            }
            'l' => {
                e.target = fs::read_link(&path)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec()
            }
            _ => {}
        }
        out.insert(rel, e);
    }
    out
}

fn export(store: &Path, layer: u64, dir: &Path) -> std::process::Output {
    spinfs(&[
        "export",
        store.to_str().unwrap(),
        "--layer",
        &layer.to_string(),
        dir.to_str().unwrap(),
    ])
}

fn blobs_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("blob.")
        })
        .collect();
    v.sort();
    v
}

fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    let c = cstr(p);
    let ts = [
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
    ];
    // SAFETY: a valid path and two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {}", p.display());
}

/// A tree with every kind of entry, odd modes and owners, exact timestamps and files that
/// span several chunks and media objects (and a hole).
fn populate(m: &Mounted) {
    fs::create_dir_all(m.path("d/e/f")).unwrap();
    fs::write(m.path("empty"), b"").unwrap();
    fs::write(m.path("small"), b"hello, kernel").unwrap();
    fs::write(m.path("d/big"), data(1, 3 * 1024 * 1024 + 12345)).unwrap();
    fs::write(m.path("d/e/f/deep"), data(2, 70_000)).unwrap();
    let sparse = fs::File::create(m.path("d/sparse")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"tail", 5 * 1024 * 1024).unwrap();
    drop(sparse);
    fs::hard_link(m.path("d/big"), m.path("d/e/big-link")).unwrap();
    std::os::unix::fs::symlink("../small", m.path("d/sym")).unwrap();
    std::os::unix::fs::symlink("x".repeat(300), m.path("longsym")).unwrap();
    let fifo = cstr(&m.path("d/fifo"));
    // SAFETY: a valid path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    let dev = cstr(&m.path("d/null"));
    // SAFETY: a valid path.
    assert_eq!(
        unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) },
        0
    );
    fs::set_permissions(m.path("small"), fs::Permissions::from_mode(0o4751)).unwrap();
    fs::set_permissions(m.path("d/e"), fs::Permissions::from_mode(0o1777)).unwrap();
    std::os::unix::fs::lchown(m.path("d/e/f/deep"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::lchown(m.path("d/sym"), Some(42), Some(43)).unwrap();
    for (i, p) in [
        "empty",
        "small",
        "d/big",
        "d/e/f/deep",
        "d/sparse",
        "d/sym",
        "longsym",
        "d/fifo",
        "d/null",
        "d/e/f",
        "d/e",
        "d",
    ]
    .iter()
    .enumerate()
    {
        set_mtime(&m.path(p), 1_600_000_000 + i as i64, 123_456_789 + i as i64);
    }
}

#[test]
fn exported_layer_mounts_in_the_kernel_and_matches_the_mount() {
    let mut m = Mounted::new(SMALL);
    populate(&m);
    archive_now(&m);
    let ours = snapshot(&m.mnt);
    assert!(ours.len() >= 14, "{ours:?}");

    // Mounted: the daemon holds the store lock; export reads without it.
    let work = tempfile::tempdir_in(test_root()).unwrap();
    let dir = work.path().join("x1");
    let out = export(&m.store, 1, &dir);
    assert!(out.status.success(), "{}", stderr(&out));
    let meta = dir.join("meta.1");
    let blobs = blobs_in(&dir);
    assert_eq!(blobs, vec![dir.join("blob.1")]);
    fsck(&meta, &blobs);
    {
        let target = work.path().join("k1");
        let _k = kernel_mount(&meta, &blobs, &target);
        let kernel = snapshot(&target);
        assert_eq!(kernel.len(), ours.len());
        for (path, e) in &ours {
            assert_eq!(kernel.get(path), Some(e), "{path:?}");
        }
    }

    // Unmounted: the same bytes.
    m.umount();
    let dir2 = work.path().join("x2");
    let out = export(&m.store, 1, &dir2);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        fs::read(&meta).unwrap(),
        fs::read(dir2.join("meta.1")).unwrap()
    );
    assert!(
        fs::read(&blobs[0]).unwrap() == fs::read(dir2.join("blob.1")).unwrap(),
        "blob differs"
    );
    m.mount();

    // A second layer with a whiteout and an opaque directory shows them as EROFS does.
    fs::remove_file(m.path("small")).unwrap();
    fs::remove_dir_all(m.path("d/e")).unwrap();
    fs::create_dir(m.path("d/e")).unwrap();
    fs::write(m.path("d/e/new"), b"new").unwrap();
    archive_now(&m);
    let dir3 = work.path().join("x3");
    let out = export(&m.store, 2, &dir3);
    assert!(out.status.success(), "{}", stderr(&out));
    let blobs3 = blobs_in(&dir3);
    fsck(&dir3.join("meta.2"), &blobs3);
    let target = work.path().join("k2");
    let _k = kernel_mount(&dir3.join("meta.2"), &blobs3, &target);
    let wh = fs::symlink_metadata(target.join("small")).unwrap();
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "whiteout"
    );
    let out = Command::new("getfattr")
        .args([
            "--absolute-names",
            "-n",
            "trusted.overlay.opaque",
            "--only-values",
        ])
        .arg(target.join("d/e"))
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"y", "opaque: {}", stderr(&out));
    assert_eq!(fs::read(target.join("d/e/new")).unwrap(), b"new");
}

#[test]
fn export_refuses_bad_arguments_with_one_line() {
    let m = Mounted::new(SMALL);
    fs::write(m.path("f"), b"x").unwrap();
    archive_now(&m);
    let work = tempfile::tempdir_in(test_root()).unwrap();

    let one_line = |o: &std::process::Output, want: &str| {
        assert!(!o.status.success());
        let e = stderr(o);
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains(want), "{e}");
    };
    let o = export(&m.store, 7, &work.path().join("a"));
    one_line(&o, "layer 7 is not an archived layer");
    assert!(!work.path().join("a").exists() || blobs_in(&work.path().join("a")).is_empty());

    let full = work.path().join("full");
    fs::create_dir(&full).unwrap();
    fs::write(full.join("meta.1"), b"keep me").unwrap();
    one_line(&export(&m.store, 1, &full), "is not empty");
    assert_eq!(fs::read(full.join("meta.1")).unwrap(), b"keep me");

    let file = work.path().join("file");
    fs::write(&file, b"").unwrap();
    one_line(&export(&m.store, 1, &file), "is not a directory");

    one_line(
        &export(&work.path().join("nostore"), 1, &work.path().join("b")),
        "is not a spinfs store",
    );
    let o = spinfs(&["export", m.store.to_str().unwrap(), "--layer", "x", "d"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));

    // A missing directory is created (parents too).
    let deep = work.path().join("new/deeper");
    let o = export(&m.store, 1, &deep);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(deep.join("meta.1").is_file() && deep.join("blob.1").is_file());
}
