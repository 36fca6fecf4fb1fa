//! Shared helpers of the kernel-oracle tests: mounts with guards, tree snapshots, builders.
#![allow(dead_code)]

use spinfs_erofs::{Blobs, Image, WriteOptions};
use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fs::{self, File};
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// A kernel mount, unmounted when dropped (also when a test fails).
pub struct Mount {
    pub path: PathBuf,
}

impl Drop for Mount {
    fn drop(&mut self) {
        let c = cstr(&self.path);
        // SAFETY: c is a valid path; umount2 has no memory effects on us.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

fn mount(src: &Path, target: &Path, fstype: &str, data: &str) -> Mount {
    fs::create_dir_all(target).unwrap();
    let (s, t) = (cstr(src), cstr(target));
    let f = CString::new(fstype).unwrap();
    let d = CString::new(data).unwrap();
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
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
        "mount -t {fstype} {} {} -o {data}: {} (these tests need root and a kernel with erofs \
         file-backed mounts and overlayfs)",
        src.display(),
        target.display(),
        std::io::Error::last_os_error()
    );
    Mount {
        path: target.to_path_buf(),
    }
}

/// File-backed mount of a meta image with its blobs, in device order.
pub fn mount_erofs(meta: &Path, blobs: &[PathBuf], target: &Path) -> Mount {
    let data = blobs
        .iter()
        .map(|b| format!("device={}", fs::canonicalize(b).unwrap().display()))
        .collect::<Vec<_>>()
        .join(",");
    mount(&fs::canonicalize(meta).unwrap(), target, "erofs", &data)
}

/// Read-only overlayfs over `lowers`, newest first.
pub fn mount_overlay(lowers: &[PathBuf], target: &Path) -> Mount {
    let data = format!(
        "lowerdir={}",
        lowers
            .iter()
            .map(|l| l.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    );
    mount(Path::new("overlay"), target, "overlay", &data)
}

/// What a tree looks like through a mount or our reader, path by path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, u32),
    /// Size for files and symlinks (directory sizes are layout-dependent).
    pub size: u64,
    pub content: u64,
    pub target: Vec<u8>,
    pub rdev: u64,
    pub nlink: u64,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// For hard links: the first path (in sorted order) of the same inode.
    pub link_of: Option<String>,
}

#[derive(Clone, Copy)]
pub struct SnapOpts {
    pub nlink: bool,
    pub dir_nlink: bool,
    /// Drop trusted.overlay.* (overlayfs hides them).
    pub hide_overlay_xattrs: bool,
    pub content: bool,
}

impl Default for SnapOpts {
    fn default() -> Self {
        SnapOpts {
            nlink: true,
            dir_nlink: true,
            hide_overlay_xattrs: false,
            content: true,
        }
    }
}

pub fn hash_bytes(b: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

fn hash_file(p: &Path) -> u64 {
    let mut data = Vec::new();
    File::open(p).unwrap().read_to_end(&mut data).unwrap();
    hash_bytes(&data)
}

/// Snapshot of a directory tree through the kernel (std::fs + xattr syscalls).
pub fn snapshot(root: &Path, o: SnapOpts) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), String> = HashMap::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for name in names {
            let p = dir.join(&name);
            let r = format!("{rel}/{}", String::from_utf8_lossy(name.as_bytes()));
            // overlayfs iterates a directory that exists in only one layer directly, so that
            // layer's whiteouts are listed although lookup hides them (ENOENT). Such a name
            // is not visible; skip it as `ls -l` would fail on it.
            let md = match fs::symlink_metadata(&p) {
                Ok(md) => md,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => panic!("lstat {}: {e}", p.display()),
            };
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                'd'
            } else if ft.is_file() {
                '-'
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
            let mut xattrs: BTreeMap<_, _> = spinfs_erofs::fromdir::read_xattrs(&p)
                .unwrap()
                .into_iter()
                .collect();
            if o.hide_overlay_xattrs {
                xattrs.retain(|k, _| !k.starts_with(b"trusted.overlay."));
            }
            let link_of = if kind != 'd' {
                let key = (md.dev(), md.ino());
                match inodes.get(&key) {
                    Some(first) => Some(first.clone()),
                    None => {
                        inodes.insert(key, r.clone());
                        None
                    }
                }
            } else {
                None
            };
            let e = Entry {
                kind,
                mode: md.mode(),
                uid: md.uid(),
                gid: md.gid(),
                mtime: (md.mtime(), md.mtime_nsec() as u32),
                size: if kind == 'd' { 0 } else { md.size() },
                content: if kind == '-' && o.content {
                    hash_file(&p)
                } else {
                    0
                },
                target: if kind == 'l' {
                    fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec()
                } else {
                    Vec::new()
                },
                rdev: md.rdev(),
                nlink: if (kind == 'd' && o.dir_nlink) || (kind != 'd' && o.nlink) {
                    md.nlink()
                } else {
                    0
                },
                xattrs,
                link_of,
            };
            if kind == 'd' {
                stack.push((p, r.clone()));
            }
            out.insert(r, e);
        }
    }
    // Root attributes under the key "/".
    let md = fs::symlink_metadata(root).unwrap();
    let mut xattrs: BTreeMap<_, _> = spinfs_erofs::fromdir::read_xattrs(root)
        .unwrap()
        .into_iter()
        .collect();
    if o.hide_overlay_xattrs {
        xattrs.retain(|k, _| !k.starts_with(b"trusted.overlay."));
    }
    out.insert(
        "/".into(),
        Entry {
            kind: 'd',
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            mtime: (md.mtime(), md.mtime_nsec() as u32),
            size: 0,
            content: 0,
            target: Vec::new(),
            rdev: 0,
            nlink: if o.dir_nlink { md.nlink() } else { 0 },
            xattrs,
            link_of: None,
        },
    );
    fix_link_order(&mut out);
    out
}

/// Make `link_of` independent of traversal order: point every member of a link group at the
/// smallest path of the group.
fn fix_link_order(snap: &mut BTreeMap<String, Entry>) {
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (p, e) in snap.iter() {
        let head = e.link_of.clone().unwrap_or_else(|| p.clone());
        groups.entry(head).or_default().push(p.clone());
    }
    for (_, mut members) in groups {
        if members.len() < 2 {
            continue;
        }
        members.sort();
        let first = members[0].clone();
        for m in &members {
            snap.get_mut(m).unwrap().link_of = (m != &first).then(|| first.clone());
        }
    }
}

/// Snapshot of an image through our reader.
pub fn reader_snapshot(meta: &Path, blobs: &[PathBuf], o: SnapOpts) -> BTreeMap<String, Entry> {
    let img = Image::open(File::open(meta).unwrap()).unwrap();
    let devs = Blobs(blobs.iter().map(|b| File::open(b).unwrap()).collect());
    let mut out = BTreeMap::new();
    let mut first_path: HashMap<u64, String> = HashMap::new();
    let entry = |ino: &spinfs_erofs::Inode, link_of: Option<String>| -> Entry {
        let mut xattrs: BTreeMap<_, _> = img.xattrs(ino).unwrap().into_iter().collect();
        if o.hide_overlay_xattrs {
            xattrs.retain(|k, _| !k.starts_with(b"trusted.overlay."));
        }
        let kind = ino.file_type.letter();
        let content = if kind == '-' && o.content {
            let mut data = vec![0u8; ino.size as usize];
            let n = img.read_data(ino, 0, &mut data, &devs).unwrap();
            assert_eq!(n as u64, ino.size);
            hash_bytes(&data)
        } else {
            0
        };
        Entry {
            kind,
            mode: ino.mode as u32,
            uid: ino.uid,
            gid: ino.gid,
            mtime: (ino.mtime, ino.mtime_nsec),
            size: if kind == 'd' { 0 } else { ino.size },
            content,
            target: if kind == 'l' {
                img.readlink(ino).unwrap()
            } else {
                Vec::new()
            },
            rdev: ino.rdev,
            nlink: if (kind == 'd' && o.dir_nlink) || (kind != 'd' && o.nlink) {
                ino.nlink as u64
            } else {
                0
            },
            xattrs,
            link_of,
        }
    };
    let root = img.root().unwrap();
    out.insert("/".to_string(), entry(&root, None));
    img.walk(|path, _e, ino| {
        let p = String::from_utf8_lossy(path).into_owned();
        let link_of = if ino.is_dir() {
            None
        } else {
            match first_path.get(&ino.nid) {
                Some(f) => Some(f.clone()),
                None => {
                    first_path.insert(ino.nid, p.clone());
                    None
                }
            }
        };
        out.insert(p, entry(ino, link_of));
        Ok(())
    })
    .unwrap();
    fix_link_order(&mut out);
    out
}

/// Asserts two snapshots are equal, printing the first differences readably.
pub fn assert_same(what: &str, a: &BTreeMap<String, Entry>, b: &BTreeMap<String, Entry>) {
    if a == b {
        return;
    }
    let mut diffs = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => diffs.push(format!("only in left: {k} {v:?}")),
            Some(w) if w != v => diffs.push(format!("differs: {k}\n  left  {v:?}\n  right {w:?}")),
            _ => {}
        }
    }
    for (k, v) in b {
        if !a.contains_key(k) {
            diffs.push(format!("only in right: {k} {v:?}"));
        }
    }
    diffs.truncate(20);
    panic!("{what}: trees differ:\n{}", diffs.join("\n"));
}

/// Builds META and BLOB from a directory with our writer.
pub fn build_dir(
    src: &Path,
    meta: &Path,
    blob: &Path,
    chunk_bits: u8,
) -> spinfs_erofs::WriteSummary {
    let tree = spinfs_erofs::fromdir::tree_from_dir(src).unwrap();
    let opts = WriteOptions {
        chunk_bits,
        ..WriteOptions::default()
    };
    let mut m = File::create(meta).unwrap();
    let mut b = File::create(blob).unwrap();
    let s = spinfs_erofs::write_image(&tree, &opts, &mut m, Some(&mut b)).unwrap();
    // Every image the tests write must pass fsck.erofs.
    fsck(meta, &[blob.to_path_buf()], None);
    s
}

/// Runs `fsck.erofs --device=... [--extract=DIR] META` and asserts it succeeds.
pub fn fsck(meta: &Path, blobs: &[PathBuf], extract: Option<&Path>) {
    let mut cmd = Command::new("fsck.erofs");
    for b in blobs {
        cmd.arg(format!("--device={}", b.display()));
    }
    if let Some(d) = extract {
        cmd.arg(format!("--extract={}", d.display()));
    }
    cmd.arg(meta);
    let out = cmd
        .output()
        .expect("fsck.erofs (erofs-utils) must be installed");
    assert!(
        out.status.success(),
        "fsck.erofs failed on {}: {}{}",
        meta.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn set_mtime(p: &Path, sec: i64, nsec: i64) {
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
    // SAFETY: valid path and a two-element timespec array.
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

pub fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let c = cstr(p);
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and a value buffer of value.len() bytes.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {name} on {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

pub fn mknod(p: &Path, mode: u32, major: u32, minor: u32) {
    let c = cstr(p);
    // SAFETY: valid path.
    let r = unsafe { libc::mknod(c.as_ptr(), mode, libc::makedev(major, minor)) };
    assert_eq!(
        r,
        0,
        "mknod {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

pub fn whiteout(p: &Path) {
    mknod(p, libc::S_IFCHR | 0o644, 0, 0);
}

pub fn lchown(p: &Path, uid: u32, gid: u32) {
    let c = cstr(p);
    // SAFETY: valid path.
    let r = unsafe { libc::lchown(c.as_ptr(), uid, gid) };
    assert_eq!(r, 0, "lchown {}", p.display());
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// One entry of a layer description for overlay tests.
#[derive(Debug, Clone)]
pub enum Item {
    File(&'static str, Vec<u8>),
    Dir(&'static str),
    Opaque(&'static str),
    Whiteout(&'static str),
    Symlink(&'static str, &'static str),
    HardLink(&'static str, &'static str),
    Fifo(&'static str),
}

/// Creates a layer directory from items (parents created as plain directories), then gives
/// every entry a layer-specific mtime with nanoseconds and directories a layer-specific mode,
/// so the merge's choice of attributes is visible.
pub fn make_layer(root: &Path, layer: usize, items: &[Item]) {
    fs::create_dir_all(root).unwrap();
    let parent = |p: &str| {
        if let Some(d) = Path::new(p).parent() {
            fs::create_dir_all(root.join(d)).unwrap();
        }
    };
    for it in items {
        match it {
            Item::File(p, data) => {
                parent(p);
                fs::write(root.join(p), data).unwrap();
            }
            Item::Dir(p) => fs::create_dir_all(root.join(p)).unwrap(),
            Item::Opaque(p) => {
                fs::create_dir_all(root.join(p)).unwrap();
                set_xattr(&root.join(p), "trusted.overlay.opaque", b"y");
            }
            Item::Whiteout(p) => {
                parent(p);
                whiteout(&root.join(p));
            }
            Item::Symlink(p, t) => {
                parent(p);
                std::os::unix::fs::symlink(t, root.join(p)).unwrap();
            }
            Item::HardLink(p, existing) => {
                parent(p);
                fs::hard_link(root.join(existing), root.join(p)).unwrap();
            }
            Item::Fifo(p) => {
                parent(p);
                mknod(&root.join(p), libc::S_IFIFO | 0o640, 0, 0);
            }
        }
    }
    let mut all = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p.clone());
            }
            all.push(p);
        }
    }
    all.sort();
    all.push(root.to_path_buf());
    for (i, p) in all.iter().enumerate() {
        if fs::symlink_metadata(p).unwrap().is_dir() {
            use std::os::unix::fs::PermissionsExt;
            let mode = [0o755, 0o750, 0o705, 0o711, 0o775, 0o700][layer % 6];
            fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
        }
        set_mtime(
            p,
            1_700_000_000 + layer as i64 * 100_000 + i as i64,
            layer as i64 * 1000 + 7,
        );
    }
}

/// Layers (newest first) built into images and kernel-mounted, with the overlay oracle.
pub struct Stack {
    pub dir: tempfile::TempDir,
    pub metas: Vec<PathBuf>,
    pub blobs: Vec<PathBuf>,
    pub mounts: Vec<Mount>,
    pub empty: PathBuf,
}

impl Stack {
    /// A stack over images already built and mounted (newest first), in `dir`.
    pub fn from_images(
        dir: tempfile::TempDir,
        metas: Vec<PathBuf>,
        blobs: Vec<PathBuf>,
        mounts: Vec<Mount>,
    ) -> Stack {
        let empty = dir.path().join("empty_bottom");
        fs::create_dir_all(&empty).unwrap();
        Stack {
            dir,
            metas,
            blobs,
            mounts,
            empty,
        }
    }

    pub fn build(layers: &[Vec<Item>]) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let mut metas = Vec::new();
        let mut blobs = Vec::new();
        let mut mounts = Vec::new();
        for (i, items) in layers.iter().enumerate() {
            let src = dir.path().join(format!("src{i}"));
            make_layer(&src, i, items);
            let (m, b) = (
                dir.path().join(format!("meta{i}")),
                dir.path().join(format!("blob{i}")),
            );
            build_dir(&src, &m, &b, 12);
            mounts.push(mount_erofs(
                &m,
                std::slice::from_ref(&b),
                &dir.path().join(format!("mnt{i}")),
            ));
            metas.push(m);
            blobs.push(b);
        }
        let empty = dir.path().join("empty");
        fs::create_dir(&empty).unwrap();
        Stack {
            dir,
            metas,
            blobs,
            mounts,
            empty,
        }
    }

    /// Overlay over the given lower directories plus an empty bottom layer (overlayfs wants
    /// two lowers without an upper).
    pub fn overlay(&self, lowers: &[PathBuf], name: &str) -> Mount {
        let mut l = lowers.to_vec();
        l.push(self.empty.clone());
        mount_overlay(&l, &self.dir.path().join(name))
    }

    pub fn layer_mounts(&self, range: std::ops::Range<usize>) -> Vec<PathBuf> {
        self.mounts[range].iter().map(|m| m.path.clone()).collect()
    }

    /// Merges layers `range` with our merge; returns the merged meta and its blob list.
    pub fn merge(
        &self,
        range: std::ops::Range<usize>,
        strip: bool,
        name: &str,
    ) -> (PathBuf, Vec<PathBuf>) {
        let images: Vec<_> = self.metas[range.clone()]
            .iter()
            .map(|m| spinfs_erofs::Image::open(File::open(m).unwrap()).unwrap())
            .collect();
        let out = self.dir.path().join(name);
        let mode = if strip {
            spinfs_erofs::MergeMode::StripOverlay
        } else {
            spinfs_erofs::MergeMode::KeepOverlay
        };
        let s = spinfs_erofs::merge_images(
            &images,
            mode,
            &WriteOptions::default(),
            &mut File::create(&out).unwrap(),
        )
        .unwrap();
        let blobs: Vec<PathBuf> = self.blobs[range.clone()].to_vec();
        fsck(&out, &blobs, None);
        assert_eq!(s.devices.len(), blobs.len());
        for (i, d) in s.devices.iter().enumerate() {
            assert_eq!(
                (d.layer, d.layer_device),
                (i, 1),
                "device order follows layer order"
            );
        }
        (out, blobs)
    }

    /// The full check of a layer stack: the overlay oracle over all layers must equal
    /// (a) our strip-merge of all layers, mounted by the kernel and read by our reader, and
    /// (b) for every contiguous range of at least two layers, overlayfs over the layers above,
    /// our keep-merge of the range, and the layers below.
    pub fn check_all_merges(&self) -> BTreeMap<String, Entry> {
        let n = self.metas.len();
        let o = SnapOpts {
            nlink: false,
            dir_nlink: false,
            hide_overlay_xattrs: true,
            content: true,
        };
        let oracle_mnt = self.overlay(&self.layer_mounts(0..n), "oracle");
        let oracle = snapshot(&oracle_mnt.path, o);
        drop(oracle_mnt);

        let (meta, blobs) = self.merge(0..n, true, "merged_strip");
        fsck(&meta, &blobs, None);
        let m = mount_erofs(&meta, &blobs, &self.dir.path().join("mnt_strip"));
        let kernel_view = snapshot(
            &m.path,
            SnapOpts {
                hide_overlay_xattrs: false,
                ..o
            },
        );
        assert_same(
            "strip merge (kernel mount) vs overlayfs",
            &oracle,
            &kernel_view,
        );
        let full = SnapOpts::default();
        assert_same(
            "strip merge: our reader vs kernel",
            &snapshot(&m.path, full),
            &reader_snapshot(&meta, &blobs, full),
        );
        drop(m);

        for start in 0..n {
            for end in start + 2..=n {
                let name = format!("merged_keep_{start}_{end}");
                let (meta, blobs) = self.merge(start..end, false, &name);
                fsck(&meta, &blobs, None);
                let mm = mount_erofs(&meta, &blobs, &self.dir.path().join(format!("mnt_{name}")));
                let mut lowers = self.layer_mounts(0..start);
                lowers.push(mm.path.clone());
                lowers.extend(self.layer_mounts(end..n));
                let ov = self.overlay(&lowers, &format!("ov_{name}"));
                let got = snapshot(&ov.path, o);
                drop(ov);
                assert_same(
                    &format!("keep merge of layers {start}..{end} under overlayfs"),
                    &oracle,
                    &got,
                );
            }
        }
        oracle
    }
}

/// A tree exercising every inode kind and attribute the format carries.
pub fn make_rich_tree(root: &Path) {
    fs::create_dir_all(root.join("dir/sub/deeper")).unwrap();
    fs::write(root.join("small"), b"hello world\n").unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    fs::write(root.join("exact_block"), pattern(4096, 1)).unwrap();
    fs::write(
        root.join("dir/multi_chunk"),
        pattern(9 * 1024 * 1024 + 17, 2),
    )
    .unwrap();
    fs::write(root.join("zeros"), vec![0u8; 3 * 1024 * 1024]).unwrap();
    // Sparse: data, hole, data, trailing hole.
    let f = File::create(root.join("sparse")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &pattern(5000, 3), 0).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &pattern(7000, 4), 12 * 1024 * 1024 + 5).unwrap();
    f.set_len(30 * 1024 * 1024).unwrap();
    drop(f);
    // Hard links: three names, one inode.
    fs::write(root.join("linked"), b"shared inode").unwrap();
    fs::hard_link(root.join("linked"), root.join("dir/link2")).unwrap();
    fs::hard_link(root.join("linked"), root.join("dir/sub/link3")).unwrap();
    std::os::unix::fs::symlink("small", root.join("sym")).unwrap();
    std::os::unix::fs::symlink("x".repeat(4000), root.join("dir/longsym")).unwrap();
    std::os::unix::fs::symlink("../../small", root.join("dir/sub/up")).unwrap();
    mknod(&root.join("chr"), libc::S_IFCHR | 0o620, 1, 3);
    mknod(&root.join("blk"), libc::S_IFBLK | 0o660, 259, 70000);
    mknod(&root.join("fifo"), libc::S_IFIFO | 0o600, 0, 0);
    std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
    whiteout(&root.join("dir/gone"));
    set_xattr(&root.join("dir/sub"), "trusted.overlay.opaque", b"y");
    set_xattr(&root.join("small"), "user.comment", b"a value");
    set_xattr(&root.join("small"), "user.empty", b"");
    set_xattr(&root.join("small"), "trusted.t", &pattern(300, 5));
    set_xattr(&root.join("small"), "security.s", b"label");
    set_xattr(&root.join("dir"), "user.big", &pattern(3000, 6));
    // POSIX ACLs via the raw xattr format (version 2, entries: user::rw-, user:1000:r--,
    // group::r--, mask::r--, other::---).
    let acl: Vec<u8> = [
        &2u32.to_le_bytes()[..],
        &[1, 0, 6, 0, 0xff, 0xff, 0xff, 0xff],
        &[2, 0, 4, 0, 0xe8, 0x03, 0, 0],
        &[4, 0, 4, 0, 0xff, 0xff, 0xff, 0xff],
        &[0x10, 0, 4, 0, 0xff, 0xff, 0xff, 0xff],
        &[0x20, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
    ]
    .concat();
    set_xattr(&root.join("exact_block"), "system.posix_acl_access", &acl);
    set_xattr(&root.join("dir/sub"), "system.posix_acl_default", &acl);
    // A directory spanning several blocks, names sorting around "." and "..".
    for i in 0..700 {
        fs::write(
            root.join(format!(
                "dir/sub/deeper/entry-{i:04}-{}",
                "n".repeat(i % 40)
            )),
            b"",
        )
        .unwrap();
    }
    fs::write(root.join("dir/-dash"), b"").unwrap();
    fs::write(root.join("dir/!bang"), b"").unwrap();
    fs::write(root.join("dir/.hidden"), b"").unwrap();
    fs::write(root.join("dir/".to_string() + &"L".repeat(255)), b"").unwrap();
    let nonutf8 = std::ffi::OsStr::from_encoded_bytes_unchecked_safe(b"caf\xe9");
    fs::write(root.join("dir").join(nonutf8), b"latin1").unwrap();
    // Attributes.
    fs::set_permissions(
        root.join("small"),
        <fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o4755),
    )
    .unwrap();
    fs::set_permissions(
        root.join("dir/sub"),
        <fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o1777),
    )
    .unwrap();
    lchown(&root.join("small"), 1234, 5678);
    lchown(&root.join("sym"), 4_000_000, 70_000);
    lchown(&root.join("dir"), 100_000, 0);
    for (i, p) in [
        "small",
        "sparse",
        "linked",
        "sym",
        "chr",
        "blk",
        "fifo",
        "sock",
        "dir/gone",
        "dir/sub/deeper",
        "dir/sub",
        "dir",
        "",
    ]
    .iter()
    .enumerate()
    {
        set_mtime(
            &root.join(p),
            1_600_000_000 + i as i64 * 1000,
            123_456_789 + i as i64,
        );
    }
    set_mtime(&root.join("zeros"), -86_400 * 365, 5);
}

pub trait OsStrExt2 {
    fn from_encoded_bytes_unchecked_safe(b: &[u8]) -> &std::ffi::OsStr;
}
impl OsStrExt2 for std::ffi::OsStr {
    fn from_encoded_bytes_unchecked_safe(b: &[u8]) -> &std::ffi::OsStr {
        std::os::unix::ffi::OsStrExt::from_bytes(b)
    }
}
