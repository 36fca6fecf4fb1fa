//! Bad input: a clear one-line error, a non-zero exit, and nothing changed on disk.

mod common;

use common::*;
use std::fs;
use std::path::Path;

/// Asserts failure with exactly one line on stderr that mentions `needle`.
fn fails_with(args: &[&str], needle: &str) {
    let out = spinfs(args);
    let err = stderr(&out);
    assert!(!out.status.success(), "spinfs {args:?} should fail");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one-line error expected, got: {err}"
    );
    assert!(
        err.contains(needle),
        "spinfs {args:?}: expected '{needle}' in: {err}"
    );
}

/// Every file below `dir` with its content, to show nothing changed.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
                out.push((p.display().to_string(), Vec::new()));
            } else if p.file_name().unwrap() != "lock" {
                out.push((p.display().to_string(), fs::read(&p).unwrap_or_default()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn mkfs_rejects_bad_sizes_and_impossible_geometry() {
    let dir = tempfile::tempdir_in(test_root()).unwrap();
    let s = dir.path().join("s");
    let st = s.to_str().unwrap();
    fails_with(
        &["mkfs", st, "--archive-threshold", "12Q"],
        "invalid size '12Q'",
    );
    fails_with(&["mkfs", st, "--chunk-size=-4K"], "invalid size");
    fails_with(&["mkfs", st, "--no-such-flag"], "unexpected argument");
    fails_with(&["mkfs", st, "--chunk-size", "3M"], "power of two");
    fails_with(&["mkfs", st, "--chunk-size", "2K"], "power of two");
    fails_with(
        &["mkfs", st, "--object-size", "1G", "--container-size", "16M"],
        "larger than the usable space",
    );
    fails_with(&["mkfs", st, "--object-size", "1000"], "multiple of 4 KiB");
    fails_with(&["mkfs", st, "--merge-fanin", "1"], "merge fan-in");
    fails_with(
        &["mkfs", st, "--media", "tape:/dev/st0"],
        "not dir:PATH or file:PATH",
    );
    fails_with(
        &["mkfs", st, "--media", "file:/nonexistent/dev"],
        "does not exist",
    );
    assert!(!s.exists(), "a refused mkfs must create nothing");
    // an existing non-empty directory is refused and left alone
    fs::create_dir(&s).unwrap();
    fs::write(s.join("precious"), b"keep").unwrap();
    fails_with(&["mkfs", st], "not empty");
    assert_eq!(fs::read(s.join("precious")).unwrap(), b"keep");
    assert_eq!(fs::read_dir(&s).unwrap().count(), 1);
}

#[test]
fn mkfs_accepts_every_option_and_records_it() {
    let dir = tempfile::tempdir_in(test_root()).unwrap();
    let s = dir.path().join("s");
    spinfs_ok(&[
        "mkfs",
        s.to_str().unwrap(),
        "--archive-threshold",
        "10M",
        "--merge-fanin",
        "3",
        "--container-size",
        "48M",
        "--object-size",
        "64K",
        "--chunk-size",
        "1M",
        "--cache-size",
        "100M",
        "--head-size",
        "128K",
        "--max-open-images",
        "8",
    ]);
    let cfg = fs::read_to_string(s.join("spinfs.toml")).unwrap();
    for line in [
        "archive_threshold = 10485760",
        "merge_fanin = 3",
        "container_size = 50331648",
        "object_size = 65536",
        "chunk_size = 1048576",
        "cache_size = 104857600",
        "head_size = 131072",
        "max_open_images = 8",
    ] {
        assert!(cfg.contains(line), "{line} missing in:\n{cfg}");
    }
    assert!(cfg.contains(&format!("media = \"dir:{}/media\"", s.display())));
    assert!(s.join("media").is_dir());
    let out = spinfs_ok(&["status", s.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["layers"][0]["kind"], "upper");
    assert_eq!(v["layers"][0]["files"], 0);
    assert_eq!(v["mounted"], false);
}

#[test]
fn mount_refuses_bad_stores_mountpoints_and_options() {
    let dir = tempfile::tempdir_in(test_root()).unwrap();
    let d = dir.path();
    let store = d.join("store");
    let mnt = d.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let (st, mt) = (store.to_str().unwrap(), mnt.to_str().unwrap());
    fails_with(&["mount", st, mt], "does not exist");
    spinfs_ok(&["mkfs", st]);
    let before = snapshot(&store);
    let missing = d.join("nowhere");
    fails_with(&["mount", st, missing.to_str().unwrap()], "nowhere");
    let file = d.join("afile");
    fs::write(&file, b"").unwrap();
    fails_with(&["mount", st, file.to_str().unwrap()], "not a directory");
    let full = d.join("full");
    fs::create_dir(&full).unwrap();
    fs::write(full.join("x"), b"").unwrap();
    fails_with(&["mount", st, full.to_str().unwrap()], "not empty");
    fails_with(
        &["mount", st, mt, "-o", "allow_other,frobnicate"],
        "unknown -o option 'frobnicate'",
    );
    fails_with(&["mount", d.to_str().unwrap(), mt], "not a spinfs store");
    assert_eq!(
        snapshot(&store),
        before,
        "failed mounts must not change the store"
    );
    // an unreadable config
    let cfg = store.join("spinfs.toml");
    let good = fs::read(&cfg).unwrap();
    fs::write(&cfg, b"version = 1\nmedia = [[[").unwrap();
    fails_with(&["mount", st, mt], "spinfs.toml");
    fails_with(&["status", st], "spinfs.toml");
    fs::write(&cfg, &good).unwrap();
    // a damaged manifest
    let man = store.join("manifest");
    let good_manifest = fs::read(&man).unwrap();
    let mut bad = good_manifest.clone();
    let n = bad.len();
    bad[n - 5] ^= 0x20;
    fs::write(&man, &bad).unwrap();
    fails_with(&["mount", st, mt], "manifest");
    fs::write(&man, &good_manifest).unwrap();
    assert!(fs::read_dir(&mnt).unwrap().next().is_none());
}

#[test]
fn a_store_is_mounted_once() {
    let m = Mounted::new(&[]);
    let other = m.dir.path().join("mnt2");
    fs::create_dir(&other).unwrap();
    fails_with(
        &["mount", m.store.to_str().unwrap(), other.to_str().unwrap()],
        "in use by process",
    );
    // mounting something else on top of a live spinfs mount is refused too
    let dir = tempfile::tempdir_in(test_root()).unwrap();
    let s2 = dir.path().join("s2");
    spinfs_ok(&["mkfs", s2.to_str().unwrap()]);
    fails_with(
        &["mount", s2.to_str().unwrap(), m.mnt.to_str().unwrap()],
        "already a spinfs mount",
    );
    let out = spinfs_ok(&["status", m.store.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["mounted"], true);
}

#[test]
fn umount_refuses_what_is_not_a_spinfs_mount() {
    let dir = tempfile::tempdir_in(test_root()).unwrap();
    fails_with(
        &["umount", dir.path().to_str().unwrap()],
        "not a spinfs mount",
    );
    fails_with(&["umount", "/nonexistent/mnt"], "/nonexistent/mnt");
}

#[test]
fn data_survives_umount_and_mount_in_the_foreground() {
    let mut m = Mounted::new(&[]);
    fs::write(m.path("keep"), b"durable").unwrap();
    m.umount();
    // foreground mode: serves until unmounted, then exits 0
    let mut child = std::process::Command::new(spinfs_bin())
        .args([
            "mount",
            m.store.to_str().unwrap(),
            m.mnt.to_str().unwrap(),
            "--foreground",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !m.path("keep").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "foreground mount did not come up"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(fs::read(m.path("keep")).unwrap(), b"durable");
    // SIGTERM unmounts cleanly
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!m.path("keep").exists());
    m.mount();
    assert_eq!(fs::read(m.path("keep")).unwrap(), b"durable");
}
