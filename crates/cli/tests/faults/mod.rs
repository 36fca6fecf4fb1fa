//! Shared by the fault-injection tests (`crash_points.rs`, `power_loss.rs`): the workload
//! (durable files with metadata, unsynced writers, seals, merges, reads of archived data),
//! the model of what must survive a crash, and the checks after recovery.
#![allow(dead_code)]

pub mod disk;

use crate::common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A seed from `var` or the clock (printed by the tests, so runs replay).
pub fn seed_from(var: &str) -> u64 {
    std::env::var(var)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{var}: not a number")))
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        })
}

pub fn env_u64(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{var}: not a number")))
        .unwrap_or(default)
}

/// Every `fail_point!("NAME")` in the sources of the workspace's crates: the registered
/// crash points. Read from the source, so a point added anywhere is covered by the test
/// and a point renamed or made unreachable makes it fail.
pub fn registered_points() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut BTreeSet<String>) {
        for e in fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = fs::read_to_string(&p).unwrap();
                let mut rest = text.as_str();
                while let Some(i) = rest.find("fail_point!(\"") {
                    rest = &rest[i + "fail_point!(\"".len()..];
                    let end = rest.find('"').unwrap();
                    out.insert(rest[..end].to_string());
                }
            }
        }
    }
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut out = BTreeSet::new();
    for c in ["media", "store", "erofs", "fuse", "cli"] {
        walk(&crates.join(c).join("src"), &mut out);
    }
    out
}

/// A store and its mount point; mounts with extra environment (crash points). Never leaves
/// a mount behind.
pub struct Site {
    pub store: PathBuf,
    pub mnt: PathBuf,
    pub mounted: bool,
}

impl Site {
    /// mkfs a store at `root/store` with small containers, objects and chunks (so seals,
    /// container roll-overs and merges happen within a few files) and a low threshold.
    pub fn create(root: &Path) -> Site {
        let store = root.join("store");
        let mnt = root.join("mnt");
        fs::create_dir_all(&mnt).unwrap();
        spinfs_ok(&[
            "mkfs",
            store.to_str().unwrap(),
            "--archive-threshold",
            "2M",
            "--chunk-size",
            "64K",
            "--container-size",
            "1M",
            "--object-size",
            "64K",
            "--merge-fanin",
            "2",
        ]);
        Site {
            store,
            mnt,
            mounted: false,
        }
    }

    /// `spinfs mount` with `env` added; Err when the daemon failed (or died) while mounting.
    pub fn mount_env(&mut self, env: &[(&str, String)]) -> Result<(), String> {
        let mut cmd = Command::new(spinfs_bin());
        cmd.args([
            "mount",
            self.store.to_str().unwrap(),
            self.mnt.to_str().unwrap(),
        ]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        if out.status.success() {
            self.mounted = true;
            Ok(())
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    pub fn mount(&mut self) {
        if let Err(e) = self.mount_env(&[]) {
            panic!("mount {}: {e}", self.store.display());
        }
    }

    pub fn umount(&mut self) {
        spinfs_ok(&["umount", self.mnt.to_str().unwrap()]);
        self.mounted = false;
    }

    /// After the daemon died: detach the dead mount and wait until the store's lock is free.
    pub fn reap(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            self.mounted = false;
        }
        wait_lock_free(&self.store, Duration::from_secs(30));
    }

    pub fn dir(&self) -> PathBuf {
        self.mnt.join("d")
    }

    pub fn arg(&self) -> &str {
        self.store.to_str().unwrap()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if self.mounted {
            let out = spinfs(&["umount", self.mnt.to_str().unwrap()]);
            if !out.status.success() {
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            }
        }
    }
}

/// The daemon's pid from the store's lock file, if that process is alive (not a zombie).
pub fn live_daemon(store: &Path) -> Option<i32> {
    let pid: i32 = fs::read_to_string(store.join("lock"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat.rsplit(')').next()?.trim_start().chars().next()?;
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    (comm.trim() == "spinfs" && state != 'Z' && state != 'X').then_some(pid)
}

pub fn kill9(pid: i32) {
    // SAFETY: kill(2) on the daemon the test mounted.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

pub fn lock_free(store: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = fs::File::open(store.join("lock")) else {
        return true;
    };
    // SAFETY: flock on a descriptor we own; closing it releases the lock.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

pub fn wait_lock_free(store: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !lock_free(store) {
        assert!(
            Instant::now() < deadline,
            "the killed daemon still holds {} after {timeout:?}",
            store.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A file made durable: content and the metadata set before its fsync.
#[derive(Clone, Debug)]
pub struct FileState {
    pub content: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    /// A chmod not known to be durable yet: the mode may be this one instead.
    pub alt_mode: Option<u32>,
    /// A rewrite (same bytes) whose restored mtime is not known to be durable yet: the mtime
    /// may be that of the write.
    pub mtime_unsure: bool,
}

/// What must (and may) be there after a crash.
#[derive(Default)]
pub struct Model {
    /// Files whose data, metadata and directory entry were fsync'ed.
    pub durable: BTreeMap<String, FileState>,
    /// Names whose removal was made durable.
    pub removed: BTreeSet<String>,
    /// Names created without (completed) fsync: may or may not exist, with any content.
    pub maybe: BTreeSet<String>,
}

impl Model {
    /// The name of a durable file picked at random (there is at least one).
    fn random_durable(&self, rng: &mut Rng) -> String {
        let i = rng.below(self.durable.len() as u64) as usize;
        self.durable.keys().nth(i).unwrap().clone()
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Writes a file with its metadata and makes both and its name durable.
pub fn write_durable(dir: &Path, name: &str, st: &FileState) -> std::io::Result<()> {
    let path = dir.join(name);
    let mut f = fs::File::create(&path)?;
    f.write_all(&st.content)?;
    f.set_permissions(fs::Permissions::from_mode(st.mode))?;
    std::os::unix::fs::fchown(&f, Some(st.uid), Some(st.gid))?;
    f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(st.mtime as u64))?;
    f.sync_all()?;
    drop(f);
    sync_dir(dir)
}

pub fn new_state(rng: &mut Rng, seed: u64, max_len: u64) -> FileState {
    FileState {
        content: data(seed, 1 + rng.below(max_len) as usize),
        mode: 0o600 | (rng.below(0o100) as u32),
        uid: [0, 1000, 4242][rng.below(3) as usize],
        gid: [0, 100, 777][rng.below(3) as usize],
        mtime: 1_000_000_000 + rng.below(1 << 30) as i64,
        alt_mode: None,
        mtime_unsure: false,
    }
}

/// Every durable file byte-identical with its metadata, every durable removal still
/// removed, nothing listed that was never created.
pub fn check_files(dir: &Path, model: &Model, ctx: &str) {
    let listed = names(dir);
    for (name, st) in &model.durable {
        let path = dir.join(name);
        let meta =
            fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("{ctx}: durable {name}: {e}"));
        let got = fs::read(&path).unwrap_or_else(|e| panic!("{ctx}: durable {name}: {e}"));
        assert!(
            got == st.content,
            "{ctx}: durable {name} differs ({} bytes, want {})",
            got.len(),
            st.content.len()
        );
        let mode = meta.mode() & 0o7777;
        let mode_ok = mode == st.mode || Some(mode) == st.alt_mode;
        let mtime = if st.mtime_unsure {
            st.mtime
        } else {
            meta.mtime()
        };
        assert_eq!(
            (mode_ok, meta.uid(), meta.gid(), mtime),
            (true, st.uid, st.gid, st.mtime),
            "{ctx}: durable {name}: mode {mode:o} (want {:o} or {:?}), uid/gid/mtime",
            st.mode,
            st.alt_mode
        );
        assert!(listed.contains(name), "{ctx}: durable {name} not listed");
    }
    for name in &listed {
        assert!(
            model.durable.contains_key(name) || model.maybe.contains(name),
            "{ctx}: {name} was never created (or was removed durably: {})",
            model.removed.contains(name)
        );
    }
    for name in &model.removed {
        assert!(!listed.contains(name), "{ctx}: removed {name} is back");
    }
}

/// Counts what the mount lost of the durable files: (files verified, bytes lost, what).
/// A missing file loses all its bytes; a differing one the bytes that differ (and the
/// length difference); wrong metadata is listed (and counts no bytes).
pub fn lost_bytes(dir: &Path, model: &Model) -> (u64, u64, Vec<String>) {
    let (mut verified, mut lost, mut what) = (0u64, 0u64, Vec::new());
    for (name, st) in &model.durable {
        verified += 1;
        let path = dir.join(name);
        let got = match fs::read(&path) {
            Ok(g) => g,
            Err(e) => {
                lost += st.content.len() as u64;
                what.push(format!("{name}: {e}"));
                continue;
            }
        };
        let differ = got.iter().zip(&st.content).filter(|(a, b)| a != b).count() as u64
            + got.len().abs_diff(st.content.len()) as u64;
        if differ > 0 {
            lost += differ;
            what.push(format!("{name}: {differ} bytes differ"));
        }
        if let Ok(meta) = fs::symlink_metadata(&path)
            && ((meta.mode() & 0o7777 != st.mode && Some(meta.mode() & 0o7777) != st.alt_mode)
                || (meta.uid(), meta.gid()) != (st.uid, st.gid)
                || (!st.mtime_unsure && meta.mtime() != st.mtime))
        {
            what.push(format!("{name}: metadata differs"));
        }
    }
    (verified, lost, what)
}

/// After a crash the unsynced files that remain are kept as they are from then on; the
/// others are gone.
pub fn settle_maybe(dir: &Path, model: &mut Model) {
    let listed = names(dir);
    model.maybe.retain(|n| listed.contains(n));
    // likewise the mode of a chmod that a crash interrupted (checked to be old or new)
    for (name, st) in model.durable.iter_mut() {
        if st.alt_mode.take().is_some() {
            st.mode = fs::symlink_metadata(dir.join(name)).unwrap().mode() & 0o7777;
        }
        if std::mem::take(&mut st.mtime_unsure) {
            st.mtime = fs::symlink_metadata(dir.join(name)).unwrap().mtime();
        }
    }
}

/// What the store holds on disk is exactly what its manifest references (checked while
/// quiescent: no seal running): no frozen generation, no other generation tree, no meta or
/// head file of a layer that is not in the manifest, no partial files, an empty cache tmp/.
pub fn check_no_leftovers(store: &Path, ctx: &str) {
    let text = fs::read_to_string(store.join("manifest")).unwrap();
    let body = &text[text.find('\n').unwrap() + 1..];
    let manifest: serde_json::Value = serde_json::from_str(body).unwrap();
    assert!(
        manifest["frozen"].is_null(),
        "{ctx}: a frozen generation remains: {manifest}"
    );
    let upper = manifest["upper_gen"].as_u64().unwrap();
    assert_eq!(
        names(&store.join("gens")),
        BTreeSet::from([format!("{upper:016x}")]),
        "{ctx}: generations on the SSD besides the writable one"
    );
    let work = store
        .join("gens")
        .join(format!("{upper:016x}"))
        .join("work");
    if work.exists() {
        let left = names(&work);
        assert!(left.is_empty(), "{ctx}: work directory not empty: {left:?}");
    }
    let mut want = BTreeSet::new();
    for l in manifest["layers"].as_array().unwrap() {
        let id = l["id"].as_u64().unwrap();
        want.insert(format!("{id:016x}.meta"));
        want.insert(format!("{id:016x}.heads"));
    }
    let layers = store.join("layers");
    let have = if layers.exists() {
        names(&layers)
    } else {
        BTreeSet::new()
    };
    let stray: Vec<_> = have.difference(&want).collect();
    assert!(stray.is_empty(), "{ctx}: stray files in layers/: {stray:?}");
    for l in manifest["layers"].as_array().unwrap() {
        let id = l["id"].as_u64().unwrap();
        assert!(
            have.contains(&format!("{id:016x}.meta")),
            "{ctx}: meta image of layer {id} missing"
        );
    }
    assert!(
        !store.join("manifest.new").exists(),
        "{ctx}: an interrupted manifest commit left manifest.new"
    );
    // entries being written by the live daemon (named PID.N) are not leftovers
    let live = live_daemon(store).map(|pid| format!("{pid}."));
    let left: Vec<String> = cache_tmp_files(store)
        .into_iter()
        .filter(|n| live.as_ref().is_none_or(|p| !n.starts_with(p)))
        .collect();
    assert!(
        left.is_empty(),
        "{ctx}: chunk cache tmp/ holds leftovers: {left:?}"
    );
}

fn cache_tmp_files(store: &Path) -> Vec<String> {
    let tmp = store.join("cache").join("tmp");
    if tmp.exists() {
        names(&tmp).into_iter().collect()
    } else {
        Vec::new()
    }
}

/// `spinfs fsck STORE` on the unmounted store must report it clean. Returns false (and
/// checks nothing) while this build has no `fsck` command.
pub fn fsck_clean(store: &Path, ctx: &str) -> bool {
    let out: Output = spinfs(&["fsck", store.to_str().unwrap()]);
    let err = stderr(&out);
    if !out.status.success() && err.contains("unrecognized subcommand") {
        return false;
    }
    assert!(
        out.status.success(),
        "{ctx}: spinfs fsck {} is not clean: {}{err}",
        store.display(),
        String::from_utf8_lossy(&out.stdout)
    );
    true
}

/// An operation on the mount failed: only legal when the daemon is gone (give a dying
/// daemon a moment to show as dead).
fn expect_dead(store: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while live_daemon(store).is_some() {
        assert!(Instant::now() < deadline, "{what}, but the daemon is alive");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A crash at a random moment: `first` (e.g. a power cut) runs, then the daemon gets
/// SIGKILL, `after` the workload started.
pub struct Killer {
    pub after: Duration,
    pub first: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// Counters of the workload.
#[derive(Default, Debug)]
pub struct Counts {
    pub ops: u64,
    pub seals: u64,
    pub merges: u64,
    pub reads: u64,
    /// Reads by the concurrent reader that returned the durable bytes.
    pub concurrent_reads: u64,
    /// Files written without fsync by the last workload, with their content.
    pub unsynced_last: Vec<(String, Vec<u8>)>,
}

/// One crash iteration's workload against a mounted site: rounds of durable files (and
/// durable removals), a chmod of an older file (a copy-up of an archived one), fsync'ed or
/// not, forced seals and merges and reads of freshly archived files (chunk-cache fills),
/// with an unsynced writer and a checking reader in the background, until the daemon dies
/// or `rounds` are done. `killer`: crash at a random moment. Returns whether the daemon died
/// during the workload.
#[allow(clippy::too_many_arguments)]
pub fn workload(
    site: &Site,
    model: &mut Model,
    rng: &mut Rng,
    tag: &str,
    rounds: u32,
    killer: Option<Killer>,
    counts: &mut Counts,
) -> bool {
    let dir = site.dir();
    let store = site.store.clone();
    let dead = |s: &Path| live_daemon(s).is_none();
    // an unsynced writer: its files may survive with any content, or not at all
    let stop = Arc::new(AtomicBool::new(false));
    let unsynced: Vec<String> = (0..40).map(|k| format!("{tag}_n{k}")).collect();
    model.maybe.extend(unsynced.iter().cloned());
    let seed = rng.next();
    let writer = {
        let dir = dir.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut done = Vec::new();
            for (k, name) in unsynced.iter().enumerate() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let len = 1000 + (k * 7919 + seed as usize) % 150_000;
                let content = data(seed + k as u64, len);
                if fs::write(dir.join(name), &content).is_err() {
                    break;
                }
                done.push((name.clone(), content));
                std::thread::sleep(Duration::from_millis(15));
            }
            done
        })
    };
    let killer = killer.map(|k| {
        let store = store.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let until = Instant::now() + k.after;
            while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(2));
            }
            if let Some(f) = &k.first {
                f();
            }
            if let Some(pid) = live_daemon(&store) {
                kill9(pid);
            }
        })
    });
    // a concurrent reader of durable files: any successful read must return their bytes;
    // a read may fail only for a file removed meanwhile or once the daemon is gone
    let reader = {
        let dir = dir.clone();
        let stop = stop.clone();
        let store = store.clone();
        let files: Vec<(String, Vec<u8>)> = model
            .durable
            .iter()
            .rev()
            .take(12)
            .map(|(n, st)| (n.clone(), st.content.clone()))
            .collect();
        let tag = tag.to_string();
        std::thread::spawn(move || {
            let mut ok = 0u64;
            let mut k = 0usize;
            while !stop.load(Ordering::Relaxed) && !files.is_empty() {
                let (name, content) = &files[k % files.len()];
                k += 1;
                match fs::read(dir.join(name)) {
                    Ok(got) => {
                        assert!(
                            got == *content,
                            "{tag}: concurrent read of {name} returned other bytes ({} vs {})",
                            got.len(),
                            content.len()
                        );
                        ok += 1;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => {
                        expect_dead(&store, &format!("{tag}: concurrent read of {name}: {e}"));
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            ok
        })
    };
    let mut written: Vec<String> = Vec::new();
    let mut died = false;
    'rounds: for round in 0..rounds {
        for k in 0..2 {
            if dead(&store) {
                died = true;
                break 'rounds;
            }
            let name = format!("{tag}_r{round}_{k}");
            let mut st = new_state(rng, rng.0 ^ u64::from(round), 200_000);
            if k == 0 && st.content.len() < 140_000 {
                // One file a round larger than the head and tail the head cache keeps
                // (64 KiB each): its read-back after the seal goes to the media and fills
                // the chunk cache, so the chunk-cache fail points are reached in every run
                // (a run whose files all fitted the head cache never reached
                // chunk_cache.entry_placed).
                st.content = data(rng.0 ^ u64::from(round), 140_000 + st.content.len() / 3);
            }
            model.maybe.insert(name.clone());
            counts.ops += 1;
            if let Err(e) = write_durable(&dir, &name, &st) {
                expect_dead(&store, &format!("{tag}: writing {name}: {e}"));
                died = true;
                break 'rounds;
            }
            model.maybe.remove(&name);
            model.durable.insert(name.clone(), st);
            written.push(name);
        }
        // removals keep the model at about 40 files (bounded checks)
        let removals = if model.durable.len() > 40 {
            2
        } else {
            u32::from(model.durable.len() > 8 && rng.below(3) == 0)
        };
        for _ in 0..removals {
            let victim = model
                .durable
                .keys()
                .nth(rng.below(model.durable.len() as u64 - 4) as usize)
                .unwrap()
                .clone();
            counts.ops += 1;
            // until the directory fsync returns, the removal may or may not be durable
            // (the name may stay: kept as a maybe-present name)
            model.durable.remove(&victim);
            model.maybe.insert(victim.clone());
            if let Err(e) = fs::remove_file(dir.join(&victim)).and_then(|_| sync_dir(&dir)) {
                expect_dead(&store, &format!("{tag}: removing {victim}: {e}"));
                died = true;
                break 'rounds;
            }
            model.maybe.remove(&victim);
            model.removed.insert(victim);
        }
        counts.seals += 1;
        counts.ops += 1;
        let _ = spinfs(&["archive", site.arg(), "--wait"]);
        // read back what was archived (archived reads fill the chunk cache)
        for name in written.iter().rev().take(3) {
            counts.reads += 1;
            counts.ops += 1;
            if let Ok(got) = fs::read(dir.join(name)) {
                assert!(
                    got == model.durable[name].content || dead(&store),
                    "{tag}: {name} reads back different bytes while mounted"
                );
            }
        }
        // a chmod of an older (archived) file: a copy-up; fsync'ed half of the time
        if model.durable.len() > 4 {
            let name = model.random_durable(rng);
            let sync = rng.below(2) == 0;
            let st = model.durable.get_mut(&name).unwrap();
            let new = st.mode ^ 0o044;
            st.alt_mode = Some(new);
            counts.ops += 1;
            let path = dir.join(&name);
            let r = fs::set_permissions(&path, fs::Permissions::from_mode(new)).and_then(|_| {
                if sync {
                    fs::File::open(&path)?.sync_all()
                } else {
                    Ok(())
                }
            });
            if let Err(e) = r {
                expect_dead(&store, &format!("{tag}: chmod {name}: {e}"));
                died = true;
                break 'rounds;
            }
            if sync {
                st.mode = new;
                st.alt_mode = None;
            }
        }
        // rewrite part of an older (archived) file, then all of it, with its own bytes: a
        // stacked file's chunk copy-up and map switch, then the end of its map (nothing left
        // below); the content never changes whatever a crash keeps, the mtime is restored
        if model.durable.len() > 4 {
            let name = model.random_durable(rng);
            let st = model.durable.get_mut(&name).unwrap();
            st.mtime_unsure = true;
            counts.ops += 1;
            let r = (|| -> std::io::Result<()> {
                use std::os::unix::fs::FileExt;
                let f = fs::OpenOptions::new().write(true).open(dir.join(&name))?;
                let head = st.content.len().min(4096);
                f.write_all_at(&st.content[..head], 0)?;
                f.sync_all()?;
                f.write_all_at(&st.content, 0)?;
                f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(st.mtime as u64))?;
                f.sync_all()
            })();
            if let Err(e) = r {
                expect_dead(&store, &format!("{tag}: rewriting {name}: {e}"));
                died = true;
                break 'rounds;
            }
            st.mtime_unsure = false;
        }
        if round % 2 == 1 {
            counts.merges += 1;
            counts.ops += 1;
            let _ = spinfs(&["merge", site.arg(), "--wait"]);
        }
    }
    if !died {
        died = dead(&store);
    }
    stop.store(true, Ordering::Relaxed);
    counts.unsynced_last = writer.join().unwrap();
    counts.concurrent_reads += reader.join().unwrap();
    counts.ops += counts.unsynced_last.len() as u64;
    if let Some(k) = killer {
        k.join().unwrap();
        died = true;
    }
    died
}

/// After a crash and remount: the checks, then quiesce (one seal), check again and check
/// for leftovers, unmount and run fsck. Returns whether fsck ran.
pub fn verify_after_crash(site: &mut Site, model: &mut Model, ctx: &str) -> bool {
    let dir = site.dir();
    check_files(&dir, model, &format!("{ctx}, after recovery"));
    // the mount works
    let probe = dir.join("probe");
    fs::write(&probe, b"probe").unwrap();
    assert_eq!(fs::read(&probe).unwrap(), b"probe", "{ctx}");
    fs::remove_file(&probe).unwrap();
    spinfs_ok(&["archive", site.arg(), "--wait"]);
    let s = status_of(&site.store);
    assert!(
        s["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["kind"] != "sealing"),
        "{ctx}: a seal is left hanging: {s}"
    );
    check_no_leftovers(&site.store, ctx);
    check_files(&dir, model, &format!("{ctx}, after a seal"));
    settle_maybe(&dir, model);
    site.umount();
    let left = cache_tmp_files(&site.store);
    assert!(
        left.is_empty(),
        "{ctx}: chunk cache tmp/ not empty after a clean unmount: {left:?}"
    );
    fsck_clean(&site.store, ctx)
}
