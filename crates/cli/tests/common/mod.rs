//! Shared helpers for tests that run the real `spinfs` binary against a real FUSE mount.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn spinfs_bin() -> &'static str {
    env!("CARGO_BIN_EXE_spinfs")
}

/// Runs `spinfs ARGS...` and returns its output.
pub fn spinfs(args: &[&str]) -> Output {
    Command::new(spinfs_bin())
        .args(args)
        .output()
        .expect("run spinfs")
}

/// Like `spinfs`, asserting success.
pub fn spinfs_ok(args: &[&str]) -> Output {
    let out = spinfs(args);
    assert!(
        out.status.success(),
        "spinfs {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A store in a temporary directory, mounted for the guard's lifetime.
pub struct Mounted {
    pub dir: tempfile::TempDir,
    pub store: PathBuf,
    pub mnt: PathBuf,
    mounted: bool,
    /// `-o` options of every mount.
    opts: String,
}

impl Mounted {
    /// mkfs with `mkfs_args` and mount with `-o allow_other` (tests act as other users too).
    /// SPINFS_TEST_MOUNT_OPTS replaces `allow_other` (e.g. `allow_other,passthrough_writes`
    /// to run a suite with kernel passthrough for writers, or `allow_other,nopassthrough` for
    /// every file served by the daemon).
    pub fn new(mkfs_args: &[&str]) -> Mounted {
        let opts = std::env::var("SPINFS_TEST_MOUNT_OPTS").unwrap_or_else(|_| "allow_other".into());
        Mounted::with_options(mkfs_args, &opts)
    }

    /// Like `new`, mounting with `-o opts`.
    pub fn with_options(mkfs_args: &[&str], opts: &str) -> Mounted {
        let dir = tempfile::Builder::new()
            .prefix("m")
            .tempdir_in(test_root())
            .expect("tempdir");
        let store = dir.path().join("store");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        // Other users must be able to reach the mount point for permission tests.
        set_mode(dir.path(), 0o755);
        let mut args = vec!["mkfs", store.to_str().unwrap()];
        args.extend_from_slice(mkfs_args);
        spinfs_ok(&args);
        let mut m = Mounted {
            dir,
            store,
            mnt,
            mounted: false,
            opts: opts.to_string(),
        };
        m.mount();
        m
    }

    pub fn mount(&mut self) {
        spinfs_ok(&[
            "mount",
            self.store.to_str().unwrap(),
            self.mnt.to_str().unwrap(),
            "-o",
            &self.opts,
        ]);
        self.mounted = true;
    }

    pub fn umount(&mut self) {
        spinfs_ok(&["umount", self.mnt.to_str().unwrap()]);
        self.mounted = false;
    }

    pub fn remount(&mut self) {
        self.umount();
        self.mount();
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            let out = spinfs(&["umount", self.mnt.to_str().unwrap()]);
            if !out.status.success() {
                // Never leave a mount behind, even when a test failed with files open.
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            }
        }
    }
}

/// Where test stores live: on the machine's real disk (ext4), not a tmpfs, so that the
/// backing filesystem supports everything spinfs relies on.
pub fn test_root() -> PathBuf {
    let root = std::env::var_os("SPINFS_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/spt"));
    std::fs::create_dir_all(&root).unwrap();
    set_mode(&root, 0o755);
    root
}

pub fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs a command as another user (uid/gid, no supplementary groups).
pub fn as_user(uid: u32, gid: u32, cmd: &[&str]) -> Output {
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .args(cmd)
        .output()
        .expect("run setpriv")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Deterministic pseudo-random content (xorshift64 seeded from `seed`).
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The names in a directory.
pub fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

/// `spinfs status STORE --json`.
pub fn status_of(store: &Path) -> serde_json::Value {
    let out = spinfs_ok(&["status", store.to_str().unwrap(), "--json"]);
    serde_json::from_slice(&out.stdout).unwrap()
}

pub fn status(m: &Mounted) -> serde_json::Value {
    status_of(&m.store)
}

pub fn archived_layers(m: &Mounted) -> usize {
    status(m)["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["kind"] == "archived")
        .count()
}

pub fn media_reads(m: &Mounted) -> u64 {
    status(m)["media"]["reads"].as_u64().unwrap()
}

/// `spinfs archive STORE --wait`: seals the writable layer and returns once it is durable.
pub fn archive_now(m: &Mounted) {
    spinfs_ok(&["archive", m.store.to_str().unwrap(), "--wait"]);
}
