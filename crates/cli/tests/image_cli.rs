//! `spinfs image build|merge|ls|cat` end to end, including clear errors.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

fn spinfs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_spinfs"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = spinfs(args);
    assert!(
        o.status.success(),
        "spinfs {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn fails(args: &[&str], needle: &str) {
    let o = spinfs(args);
    assert!(!o.status.success(), "spinfs {args:?} should fail");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(needle),
        "spinfs {args:?}: expected {needle:?} in {err:?}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err:?}");
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn fsck(meta: &Path, blobs: &[&Path]) {
    let mut cmd = Command::new("fsck.erofs");
    for b in blobs {
        cmd.arg(format!("--device={}", b.display()));
    }
    let o = cmd
        .arg(meta)
        .output()
        .expect("fsck.erofs must be installed");
    assert!(
        o.status.success(),
        "fsck.erofs: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn build_ls_cat_merge() {
    let t = tempfile::tempdir().unwrap();
    let old = t.path().join("old");
    let new = t.path().join("new");
    fs::create_dir_all(old.join("docs")).unwrap();
    fs::create_dir_all(new.join("docs")).unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(old.join("docs/big.bin"), &big).unwrap();
    fs::write(old.join("docs/old.txt"), b"old text\n").unwrap();
    fs::write(new.join("docs/new.txt"), b"new text\n").unwrap();
    std::os::unix::fs::symlink("docs/new.txt", new.join("latest")).unwrap();

    let (m_old, b_old) = (t.path().join("meta.old"), t.path().join("blob.old"));
    let (m_new, b_new) = (t.path().join("meta.new"), t.path().join("blob.new"));
    let out = ok(&[
        "image",
        "build",
        p(&old),
        p(&m_old),
        p(&b_old),
        "--chunk-size",
        "64K",
    ]);
    assert!(out.contains("inodes"), "{out}");
    ok(&["image", "build", p(&new), p(&m_new), p(&b_new)]);
    fsck(&m_old, &[&b_old]);
    fsck(&m_new, &[&b_new]);

    let ls = ok(&["image", "ls", p(&m_new)]);
    assert!(
        ls.contains(" docs\n") && ls.contains("latest -> docs/new.txt"),
        "{ls}"
    );
    let ls = ok(&["image", "ls", p(&m_old), "/docs"]);
    assert!(ls.contains(" 3000000 ") && ls.contains("big.bin"), "{ls}");
    let one = ok(&["image", "ls", p(&m_old), "docs/old.txt"]);
    assert!(
        one.starts_with("-rw-r--r--") && one.contains("docs/old.txt"),
        "{one}"
    );

    let cat = spinfs(&[
        "image",
        "cat",
        p(&m_old),
        "--device",
        p(&b_old),
        "/docs/big.bin",
    ]);
    assert!(cat.status.success());
    assert_eq!(cat.stdout, big);

    // Merge, newest first, and read through the merged image with both blobs in order.
    let merged = t.path().join("meta.merged");
    let out = ok(&[
        "image",
        "merge",
        p(&merged),
        p(&m_new),
        p(&m_old),
        "--strip-overlay",
    ]);
    assert!(
        out.contains("device 1:") && out.contains("device 2:"),
        "{out}"
    );
    fsck(&merged, &[&b_new, &b_old]);
    let ls = ok(&["image", "ls", p(&merged), "docs"]);
    for name in ["big.bin", "new.txt", "old.txt"] {
        assert!(ls.contains(name), "{ls}");
    }
    let cat = spinfs(&[
        "image",
        "cat",
        p(&merged),
        "--device",
        p(&b_new),
        "--device",
        p(&b_old),
        "docs/big.bin",
    ]);
    assert_eq!(cat.stdout, big);
    let cat = ok(&[
        "image",
        "cat",
        p(&merged),
        "--device",
        p(&b_new),
        "--device",
        p(&b_old),
        "docs/new.txt",
    ]);
    assert_eq!(cat, "new text\n");
}

#[test]
fn clear_errors() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"x").unwrap();
    let (meta, blob) = (t.path().join("meta"), t.path().join("blob"));
    let missing = t.path().join("missing");

    fails(
        &["image", "build", p(&missing), p(&meta), p(&blob)],
        "missing: not a directory",
    );
    fails(
        &[
            "image",
            "build",
            p(&src),
            p(&meta),
            p(&blob),
            "--chunk-size",
            "3K",
        ],
        "power of two",
    );
    fails(
        &[
            "image",
            "build",
            p(&src),
            p(&meta),
            p(&blob),
            "--chunk-size",
            "lots",
        ],
        "not a size",
    );
    ok(&["image", "build", p(&src), p(&meta), p(&blob)]);
    fails(&["image", "ls", p(&meta), "/nope"], "not found");
    fails(&["image", "ls", p(&meta), "/f/x"], "not a directory");
    fails(
        &["image", "cat", p(&meta), "--device", p(&blob), "/"],
        "not a regular file",
    );
    fails(
        &[
            "image",
            "cat",
            p(&meta),
            "--device",
            p(&blob),
            "--device",
            p(&blob),
            "/f",
        ],
        "1 blob device(s); 2 --device given",
    );
    fails(&["image", "ls", p(&blob)], "not an EROFS image");
    fails(&["image", "ls", p(&missing)], "cannot open");
    fails(
        &["image", "merge", p(&t.path().join("out")), p(&blob)],
        "not an EROFS image",
    );
}
