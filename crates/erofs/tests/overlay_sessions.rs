//! The whole life of layers as the original system produced them: random file operations on
//! a kernel overlayfs whose upper directory is sealed into an image every few operations
//! (whiteouts and opaque directories are made by the kernel itself), then every merge of
//! those images must show what overlayfs shows over them. SPEC problem 1 is one such
//! sequence; this explores many.

mod common;

use common::*;
use proptest::prelude::*;
use std::ffi::CString;
use std::fs;
use std::path::{Path, PathBuf};

fn cases() -> u32 {
    std::env::var("SPINFS_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(160)
}

const PATHS: [&str; 9] = [
    "a", "b", "a/x", "a/y", "a/d", "a/d/z", "b/x", "b/d", "b/d/z",
];

#[derive(Debug, Clone)]
enum Op {
    Write(usize, u8),
    Mkdir(usize),
    Remove(usize),
    Symlink(usize),
    HardLink(usize, usize),
    Rename(usize, usize),
    Seal,
}

fn op() -> impl Strategy<Value = Op> {
    let p = 0..PATHS.len();
    prop_oneof![
        4 => (p.clone(), any::<u8>()).prop_map(|(a, b)| Op::Write(a, b)),
        2 => p.clone().prop_map(Op::Mkdir),
        3 => p.clone().prop_map(Op::Remove),
        1 => p.clone().prop_map(Op::Symlink),
        1 => (p.clone(), p.clone()).prop_map(|(a, b)| Op::HardLink(a, b)),
        1 => (p.clone(), p).prop_map(|(a, b)| Op::Rename(a, b)),
        3 => Just(Op::Seal),
    ]
}

/// Read-write overlayfs; unmounted (synchronously) by `seal`, or lazily when dropped.
fn mount_rw(lowers: &[PathBuf], upper: &Path, work: &Path, target: &Path) -> Mount {
    fs::create_dir_all(target).unwrap();
    let lower = lowers
        .iter()
        .map(|l| l.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let data = format!(
        "lowerdir={lower},upperdir={},workdir={},redirect_dir=off,index=off,metacopy=off",
        upper.display(),
        work.display()
    );
    let c = |s: &str| CString::new(s).unwrap();
    let (src, t, f, d) = (
        c("overlay"),
        c(&target.display().to_string()),
        c("overlay"),
        c(&data),
    );
    // SAFETY: valid NUL-terminated strings for the duration of the call.
    let r = unsafe { libc::mount(src.as_ptr(), t.as_ptr(), f.as_ptr(), 0, d.as_ptr().cast()) };
    assert_eq!(
        r,
        0,
        "mount overlay {data}: {}",
        std::io::Error::last_os_error()
    );
    Mount {
        path: target.to_path_buf(),
    }
}

fn apply(root: &Path, op: &Op) {
    // Errors are part of the game (a parent that is a file, EXDEV on directory renames with
    // redirect_dir=off, ...): the kernel's resulting state is the truth either way.
    let p = |i: usize| root.join(PATHS[i]);
    let _ = match op {
        Op::Write(i, n) => p(*i)
            .parent()
            .map(fs::create_dir_all)
            .unwrap_or(Ok(()))
            .and_then(|_| fs::write(p(*i), vec![*n; 100 + *n as usize * 37])),
        Op::Mkdir(i) => fs::create_dir_all(p(*i)),
        Op::Remove(i) => fs::remove_dir_all(p(*i)).or_else(|_| fs::remove_file(p(*i))),
        Op::Symlink(i) => std::os::unix::fs::symlink("target", p(*i)),
        Op::HardLink(i, j) => fs::hard_link(p(*i), p(*j)),
        Op::Rename(i, j) => fs::rename(p(*i), p(*j)),
        Op::Seal => Ok(()),
    };
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn sealed_overlay_sessions_merge_like_overlayfs(ops in prop::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_path_buf();
        let bottom = base.join("bottom");
        fs::create_dir(&bottom).unwrap();
        let mut metas: Vec<PathBuf> = Vec::new(); // newest first
        let mut blobs: Vec<PathBuf> = Vec::new();
        let mut mounts: Vec<Mount> = Vec::new();
        let mut generation = 0;
        let mut ops = ops;
        ops.push(Op::Seal);
        let mut session: Option<(Mount, PathBuf)> = None;
        for op in &ops {
            if session.is_none() {
                let upper = base.join(format!("upper{generation}"));
                let work = base.join(format!("work{generation}"));
                fs::create_dir_all(&upper).unwrap();
                fs::create_dir_all(&work).unwrap();
                let mut lowers: Vec<PathBuf> = mounts.iter().map(|m| m.path.clone()).collect();
                lowers.push(bottom.clone());
                let m = mount_rw(&lowers, &upper, &work, &base.join(format!("ov{generation}")));
                session = Some((m, upper));
            }
            let (m, _) = session.as_ref().unwrap();
            apply(&m.path, op);
            if let Op::Seal = op {
                let (m, upper) = session.take().unwrap();
                let c = CString::new(m.path.display().to_string()).unwrap();
                // SAFETY: valid path; a synchronous unmount so the upper is complete.
                assert_eq!(unsafe { libc::umount2(c.as_ptr(), 0) }, 0);
                std::mem::forget(m);
                let (meta, blob) = (base.join(format!("meta{generation}")), base.join(format!("blob{generation}")));
                build_dir(&upper, &meta, &blob, 12);
                let mnt = mount_erofs(&meta, std::slice::from_ref(&blob), &base.join(format!("layer{generation}")));
                metas.insert(0, meta);
                blobs.insert(0, blob);
                mounts.insert(0, mnt);
                generation += 1;
            }
        }
        if metas.len() >= 2 {
            let stack = Stack::from_images(dir, metas, blobs, mounts);
            stack.check_all_merges();
        }
    }
}
