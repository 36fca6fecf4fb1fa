//! Our reader against the kernel on images made by mkfs.erofs 1.5 (`--blobdev --chunksize`,
//! compact inodes, shared xattrs, flat inline files).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn mkfs(args: &[String], meta: &Path, src: &Path) {
    let out = Command::new("mkfs.erofs")
        .args(args)
        .arg(meta)
        .arg(src)
        .output()
        .expect("mkfs.erofs (erofs-utils) must be installed");
    assert!(
        out.status.success(),
        "mkfs.erofs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn compare(args: &[&str], with_blob: bool) {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    make_rich_tree(&src);
    // mkfs.erofs 1.5 fails ("Could not format the device: ENOENT") on 255-byte names.
    std::fs::remove_file(src.join("dir").join("L".repeat(255))).unwrap();
    // Many files sharing one xattr make mkfs.erofs store it as a shared xattr.
    for i in 0..5 {
        let p = src.join(format!("shared{i}"));
        std::fs::write(&p, pattern(100 + i, i as u64)).unwrap();
        set_xattr(&p, "user.common", b"same value everywhere");
    }
    let meta = t.path().join("meta");
    let blob = t.path().join("blob");
    let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    if with_blob {
        a.push(format!("--blobdev={}", blob.display()));
    }
    mkfs(&a, &meta, &src);
    let blobs: Vec<PathBuf> = if with_blob { vec![blob] } else { vec![] };
    let m = mount_erofs(&meta, &blobs, &t.path().join("mnt"));
    let o = SnapOpts::default();
    let kernel = snapshot(&m.path, o);
    drop(m);
    assert_same(
        "our reader vs kernel on a mkfs.erofs image",
        &kernel,
        &reader_snapshot(&meta, &blobs, o),
    );
    // Sanity: the kernel shows the source tree (mkfs.erofs keeps it faithfully).
    assert_eq!(kernel["/dir/multi_chunk"].size, 9 * 1024 * 1024 + 17);
}

#[test]
fn mkfs_blobdev_chunksize_4m() {
    compare(&["--chunksize=4194304"], true);
}

#[test]
fn mkfs_blobdev_chunksize_4k() {
    compare(&["--chunksize=4096"], true);
}

#[test]
fn mkfs_flat_inline_no_blob() {
    compare(&[], false);
}

#[test]
fn mkfs_compact_inodes_fixed_time() {
    // -T gives every inode the same mtime, so mkfs.erofs writes compact inodes.
    compare(&["-T", "1600000000", "--chunksize=4194304"], true);
}
