//! `cp -a` into the mount preserves everything and prints nothing (SPEC problem 2).

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;

fn build_tree(root: &Path) {
    fs::create_dir_all(root.join("src/sub/deeper")).unwrap();
    for i in 0..9 {
        fs::write(
            root.join(format!("src/random_file0{i}")),
            vec![i as u8; 10_000 + i * 777],
        )
        .unwrap();
    }
    fs::write(root.join("src/sub/exec.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(
        root.join("src/sub/exec.sh"),
        fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    fs::set_permissions(
        root.join("src/sub/deeper"),
        fs::Permissions::from_mode(0o711),
    )
    .unwrap();
    symlink("../random_file01", root.join("src/sub/link")).unwrap();
    fs::hard_link(root.join("src/random_file02"), root.join("src/sub/hard")).unwrap();
    std::os::unix::fs::chown(root.join("src/random_file03"), Some(1000), Some(100)).unwrap();
    let r = Command::new("setfattr")
        .args(["-n", "user.origin", "-v", "camera-7"])
        .arg(root.join("src/random_file04"))
        .status()
        .expect("setfattr (package attr)");
    assert!(r.success());
    let r = Command::new("setfacl")
        .args(["-m", "u:1234:r"])
        .arg(root.join("src/random_file05"))
        .status()
        .unwrap();
    assert!(r.success());
    // odd timestamps, nanoseconds included, on files and directories
    let r = Command::new("touch")
        .args(["-h", "-d", "2001-02-03 04:05:06.123456789"])
        .arg(root.join("src/sub/link"))
        .status()
        .unwrap();
    assert!(r.success());
    let r = Command::new("touch")
        .args(["-d", "1999-12-31 23:59:59.987654321"])
        .arg(root.join("src/sub"))
        .status()
        .unwrap();
    assert!(r.success());
}

fn describe(root: &Path) -> Vec<String> {
    let out = Command::new("find")
        .arg(".")
        .args(["-printf", "%p %y %m %U %G %s %n %T@ %l\n"])
        .current_dir(root)
        .output()
        .unwrap();
    let mut lines: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    lines.retain(|l| !l.starts_with(". "));
    lines.sort();
    lines
}

fn xattrs(root: &Path) -> String {
    let out = Command::new("getfattr")
        .args(["-R", "-h", "-d", "-m", "-", "."])
        .current_dir(root)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn cp_a_preserves_times_modes_owners_links_and_xattrs_silently() {
    let m = Mounted::new(&[]);
    let src = tempfile::tempdir_in(test_root()).unwrap();
    build_tree(src.path());
    let out = Command::new("cp")
        .arg("-a")
        .arg(src.path().join("src"))
        .arg(&m.mnt)
        .output()
        .unwrap();
    assert!(out.status.success(), "cp -a failed: {}", stderr(&out));
    assert_eq!(stderr(&out), "", "cp -a must print nothing");
    let copied = m.path("src");
    assert_eq!(describe(&src.path().join("src")), describe(&copied));
    assert_eq!(xattrs(&src.path().join("src")), xattrs(&copied));
    // hard links stay hard links
    assert_eq!(
        fs::metadata(copied.join("random_file02")).unwrap().ino(),
        fs::metadata(copied.join("sub/hard")).unwrap().ino()
    );
    // and the copy comes back out the same way, byte for byte
    let back = tempfile::tempdir_in(test_root()).unwrap();
    let out = Command::new("cp")
        .arg("-a")
        .arg(&copied)
        .arg(back.path())
        .output()
        .unwrap();
    assert!(
        out.status.success() && stderr(&out).is_empty(),
        "{}",
        stderr(&out)
    );
    let diff = Command::new("diff")
        .arg("-r")
        .arg(src.path().join("src"))
        .arg(back.path().join("src"))
        .output()
        .unwrap();
    assert!(
        diff.status.success(),
        "{}",
        String::from_utf8_lossy(&diff.stdout)
    );
}
