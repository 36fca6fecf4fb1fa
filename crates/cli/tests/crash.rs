//! Crash consistency: `kill -9` of the daemon at random moments while files are written and
//! generations are sealed (small threshold, quick seals, forced seals too), then a remount
//! must recover by itself: everything fsync'ed (file and directory) before the kill is
//! byte-identical, removals made durable stay removed, nothing that was never created shows
//! up, the mount works, no seal is left hanging and no leftovers stay in the store.
//!
//! Iterations: `SPINFS_CRASH_ITERATIONS` (default 30; `scripts/crash-soak.sh` runs many
//! more). The random sequence is printed and replayable with `SPINFS_CRASH_SEED`.
//!
//! What a kill -9 of the daemon can and cannot show: the kernel keeps the backing files' page
//! cache, so this exercises the store's own crash consistency (manifest commits, freeze,
//! seals interrupted at any step, recovery and cleanup at the next mount), not power loss.

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Writes a file and makes it durable: data, then the directory entry.
fn write_durable(dir: &Path, name: &str, content: &[u8]) {
    let mut f = fs::File::create(dir.join(name)).unwrap();
    f.write_all(content).unwrap();
    f.sync_all().unwrap();
    drop(f);
    fs::File::open(dir).unwrap().sync_all().unwrap();
}

/// The daemon's pid (the lock file holds it), checked to be a live spinfs process.
fn daemon_pid(store: &Path) -> i32 {
    let pid: i32 = fs::read_to_string(store.join("lock"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(
        comm.trim(),
        "spinfs",
        "pid {pid} from the lock is not our daemon"
    );
    pid
}

/// Whether the store's lock is free (a killed daemon releases it when its last thread is
/// gone; its main thread may be a zombie well before that).
fn lock_free(store: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(store.join("lock")).unwrap();
    // SAFETY: flock on a descriptor we own; closing it releases the lock.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// The state and kernel wait channel of every thread of `pid`, for a diagnosis.
fn threads(pid: i32) -> String {
    let mut out = String::new();
    for t in fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let p = t.path();
        let stat = fs::read_to_string(p.join("stat")).unwrap_or_default();
        let wchan = fs::read_to_string(p.join("wchan")).unwrap_or_default();
        let stack = fs::read_to_string(p.join("stack")).unwrap_or_default();
        out += &format!("{stat}\n  wchan={wchan}\n{stack}\n");
    }
    out
}

/// Archiver events in the daemon log since byte `from`: (seals started, seals finished).
fn seal_events(log: &Path, from: usize) -> (usize, usize) {
    let text = fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text[from.min(text.len())..]).into_owned();
    (
        text.matches("archiver: sealing ").count(),
        text.matches("archiver: sealed ").count(),
    )
}

fn log_len(log: &Path) -> usize {
    fs::metadata(log).map(|m| m.len() as usize).unwrap_or(0)
}

/// What the store holds on disk must be exactly what its manifest references (checked
/// while quiescent: no seal running).
fn check_no_leftovers(store: &Path, what: &str) {
    let text = fs::read_to_string(store.join("manifest")).unwrap();
    let body = &text[text.find('\n').unwrap() + 1..];
    let manifest: serde_json::Value = serde_json::from_str(body).unwrap();
    assert!(
        manifest["frozen"].is_null(),
        "{what}: a frozen generation remains: {manifest}"
    );
    let upper = manifest["upper_gen"].as_u64().unwrap();
    let gens = names(&store.join("gens"));
    assert_eq!(
        gens,
        BTreeSet::from([format!("{upper:016x}")]),
        "{what}: generations on the SSD besides the writable one"
    );
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
    assert!(
        stray.is_empty(),
        "{what}: stray files in layers/: {stray:?}"
    );
    for l in manifest["layers"].as_array().unwrap() {
        let id = l["id"].as_u64().unwrap();
        assert!(
            have.contains(&format!("{id:016x}.meta")),
            "{what}: meta image of layer {id} missing"
        );
    }
}

#[test]
fn kill_9_during_writes_and_seals_loses_nothing_durable() {
    let iterations: u64 = std::env::var("SPINFS_CRASH_ITERATIONS")
        .ok()
        .map(|v| v.parse().expect("SPINFS_CRASH_ITERATIONS"))
        .unwrap_or(30);
    let seed: u64 = std::env::var("SPINFS_CRASH_SEED")
        .ok()
        .map(|v| v.parse().expect("SPINFS_CRASH_SEED"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("crash test: {iterations} iterations, SPINFS_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let mut m = Mounted::new(&[
        "--archive-threshold",
        "1M",
        "--chunk-size",
        "64K",
        "--container-size",
        "8M",
        "--object-size",
        "64K",
    ]);
    let store = m.store.clone();
    let log = store.join("spinfs.log");
    let dir: PathBuf = m.path("d");
    fs::create_dir(&dir).unwrap();
    fs::File::open(&m.mnt).unwrap().sync_all().unwrap();

    // name -> content of every file made durable; names removed durably; names that were
    // being written without fsync (may exist after a crash, with any prefix of their data).
    let mut durable: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut removed: BTreeSet<String> = BTreeSet::new();
    let mut maybe: BTreeSet<String> = BTreeSet::new();
    let (mut in_seal, mut outside, mut interrupted_recovered) = (0u64, 0u64, 0u64);
    // Generations sealed so far: merges reduce the number of layers, never this set.
    let mut last_gens: std::collections::BTreeSet<u64> = Default::default();
    let mut last_id = 0u64;
    let start = Instant::now();

    for it in 0..iterations {
        let log_from = log_len(&log);
        // 1. durable files, and a durable removal of an older one
        for k in 0..3 {
            let name = format!("i{it}_d{k}");
            let content = data(seed ^ (it << 8 | k), 4096 + rng.below(200_000) as usize);
            write_durable(&dir, &name, &content);
            durable.insert(name, content);
        }
        if durable.len() > 6 && rng.below(2) == 0 {
            let victim = durable
                .keys()
                .nth(rng.below(durable.len() as u64 - 3) as usize)
                .unwrap()
                .clone();
            fs::remove_file(dir.join(&victim)).unwrap();
            fs::File::open(&dir).unwrap().sync_all().unwrap();
            durable.remove(&victim);
            removed.insert(victim);
        }
        if rng.below(2) == 0 {
            spinfs_ok(&["archive", store.to_str().unwrap()]);
        }
        // 2. a writer that keeps writing without fsync (threshold seals follow) until killed
        let stop = Arc::new(AtomicBool::new(false));
        let first_maybe: Vec<String> = (0..80).map(|k| format!("i{it}_n{k}")).collect();
        maybe.extend(first_maybe.iter().cloned());
        let writer = {
            let dir = dir.clone();
            let stop = stop.clone();
            let seed = seed ^ it;
            std::thread::spawn(move || {
                for (k, name) in first_maybe.iter().enumerate() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let len = 1000 + (k * 7919 + seed as usize) % 100_000;
                    if fs::write(dir.join(name), data(seed + k as u64, len)).is_err() {
                        break; // the daemon is gone
                    }
                    std::thread::sleep(Duration::from_millis(8));
                }
            })
        };
        // 3. kill -9 at a random moment
        std::thread::sleep(Duration::from_millis(rng.below(500)));
        if rng.below(3) != 0 {
            // most kills aim at a seal: ask for one and strike while it runs
            spinfs_ok(&["archive", store.to_str().unwrap()]);
            std::thread::sleep(Duration::from_millis(rng.below(25)));
        }
        let pid = daemon_pid(&store);
        // SAFETY: kill(2) on the daemon this test mounted.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        stop.store(true, Ordering::Relaxed);
        let st = Command::new("umount")
            .arg("-l")
            .arg(&m.mnt)
            .status()
            .unwrap();
        assert!(st.success(), "umount -l {}", m.mnt.display());
        let deadline = Instant::now() + Duration::from_secs(20);
        while !lock_free(&store) {
            assert!(
                Instant::now() < deadline,
                "iteration {it}: daemon {pid} still holds the store 20 s after SIGKILL:\n{}",
                threads(pid)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        writer.join().unwrap();
        let (started, finished) = seal_events(&log, log_from);
        let mut during_seal = started > finished;

        // 4. remount: recovery runs by itself
        let log_from = log_len(&log);
        m.mount();
        if fs::read_to_string(&log)
            .map(|t| t[log_from.min(t.len())..].contains("a crash interrupted"))
            .unwrap_or(false)
        {
            interrupted_recovered += 1;
            // frozen before the daemon logged "sealing": a seal all the same
            during_seal = true;
        }
        if during_seal {
            in_seal += 1;
        } else {
            outside += 1;
        }
        let ctx = format!("iteration {it} (seed {seed})");
        // Every durable file while there are few; in long soaks every 10th iteration, else
        // the last iterations' files and a random sample (reading all is quadratic).
        let full = durable.len() <= 150 || it % 10 == 9 || it + 1 == iterations;
        let sample: BTreeSet<&String> = if full {
            durable.keys().collect()
        } else {
            let keys: Vec<&String> = durable.keys().collect();
            (0..40)
                .map(|_| keys[rng.below(keys.len() as u64) as usize])
                .chain(durable.keys().filter(|k| {
                    k.split('_').next().unwrap()[1..].parse::<u64>().unwrap() + 4 >= it
                }))
                .collect()
        };
        let check_files = |when: &str| {
            for name in &sample {
                let content = &durable[*name];
                let got = fs::read(dir.join(name))
                    .unwrap_or_else(|e| panic!("{ctx} {when}: durable {name}: {e}"));
                assert!(
                    got == *content,
                    "{ctx} {when}: durable {name} differs ({} bytes, want {})",
                    got.len(),
                    content.len()
                );
            }
            let listed = names(&dir);
            for name in &listed {
                assert!(
                    durable.contains_key(name) || maybe.contains(name),
                    "{ctx} {when}: {name} was never created (or was removed: {})",
                    removed.contains(name)
                );
            }
            for name in durable.keys() {
                assert!(
                    listed.contains(name),
                    "{ctx} {when}: durable {name} not listed"
                );
            }
            for name in &removed {
                assert!(
                    !listed.contains(name),
                    "{ctx} {when}: removed {name} is back"
                );
            }
        };
        check_files("after recovery");
        // 5. the mount works
        let probe = dir.join("probe");
        fs::write(&probe, b"probe").unwrap();
        assert_eq!(fs::read(&probe).unwrap(), b"probe", "{ctx}");
        fs::remove_file(&probe).unwrap();
        assert!(!probe.exists(), "{ctx}");
        // 6. quiesce (one seal after recovery; nothing writes now) and check the store
        spinfs_ok(&["archive", store.to_str().unwrap(), "--wait"]);
        let s = status_of(&store);
        let layers = s["layers"].as_array().unwrap();
        assert!(
            layers.iter().all(|l| l["kind"] != "sealing"),
            "{ctx}: a seal is left hanging: {s}"
        );
        let archived: Vec<&serde_json::Value> =
            layers.iter().filter(|l| l["kind"] == "archived").collect();
        let top = archived
            .iter()
            .map(|l| l["id"].as_u64().unwrap())
            .max()
            .unwrap_or(0);
        let gens: std::collections::BTreeSet<u64> = archived
            .iter()
            .flat_map(|l| l["generations"].as_array().unwrap().iter())
            .map(|g| g.as_u64().unwrap())
            .collect();
        assert!(
            top >= last_id && gens.is_superset(&last_gens),
            "{ctx}: sealed generations went from {last_gens:?} (top layer {last_id}) to {gens:?} (top {top}): {s}"
        );
        last_gens = gens;
        last_id = top;
        check_no_leftovers(&store, &ctx);
        check_files("after a seal");
        // what a crash left of unsynced files is now settled: those still here are kept as
        // they are (any prefix of their data), the others are gone for good
        let listed = names(&dir);
        maybe.retain(|n| listed.contains(n));
    }
    m.umount();
    println!(
        "crash test: {iterations} kills in {:.1}s: {in_seal} during a seal, {outside} outside \
         one; {interrupted_recovered} mounts resealed an interrupted generation; \
         {} durable files, {} durable removals checked",
        start.elapsed().as_secs_f64(),
        durable.len(),
        removed.len()
    );
    assert!(
        iterations < 10 || in_seal > 0,
        "no kill landed during a seal: the test did not test what it should"
    );
}

/// Archived layers as `status --json` lists them, oldest first: (id, generations).
fn layer_list(store: &Path) -> Vec<(u64, Vec<u64>)> {
    let s = status_of(store);
    let mut out: Vec<(u64, Vec<u64>)> = s["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["kind"] == "archived")
        .map(|l| {
            (
                l["id"].as_u64().unwrap(),
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

/// `after` must be `before` with zero or more runs of adjacent layers each replaced by one
/// new layer holding exactly the run's generations: old layers or merged ones, never a mix.
fn old_or_merged(before: &[(u64, Vec<u64>)], after: &[(u64, Vec<u64>)]) -> Result<usize, String> {
    let known: BTreeSet<u64> = before.iter().map(|l| l.0).collect();
    let (mut i, mut merged) = (0, 0);
    for (id, gens) in after {
        if known.contains(id) {
            match before.get(i) {
                Some(b) if b.0 == *id && b.1 == *gens => i += 1,
                _ => return Err(format!("layer {id} out of place")),
            }
            continue;
        }
        // A new layer: a merge of before[i..j] for some j >= i + 2.
        let mut acc: Vec<u64> = Vec::new();
        let mut j = i;
        while j < before.len() && acc.len() < gens.len() {
            acc.extend(&before[j].1);
            j += 1;
        }
        if acc != *gens || j - i < 2 {
            return Err(format!(
                "new layer {id} holds generations {gens:?}, not a merge of adjacent layers"
            ));
        }
        merged += 1;
        i = j;
    }
    if i != before.len() {
        return Err(format!("layers {:?} lost", &before[i..]));
    }
    Ok(merged)
}

/// Archiver merge events in the daemon log since byte `from`: (started, finished, the
/// duration of the last finished one).
fn merge_events(log: &Path, from: usize) -> (usize, usize, Option<Duration>) {
    let text = fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text[from.min(text.len())..]).into_owned();
    // "2026-11-28T17:12:00.465932Z  INFO spinfs_store::archiver: merging layers=[1, 2]"
    let secs = |line: &str| -> Option<f64> {
        let t = line.split_whitespace().next()?.split('T').nth(1)?;
        let t = t.trim_end_matches('Z');
        let f: Vec<&str> = t.split(':').collect();
        Some(
            f[0].parse::<f64>().ok()? * 3600.0
                + f[1].parse::<f64>().ok()? * 60.0
                + f[2].parse::<f64>().ok()?,
        )
    };
    let (mut started, mut finished, mut last_start, mut last) = (0, 0, None, None);
    for line in text.lines() {
        if line.contains("archiver: merging ") {
            started += 1;
            last_start = secs(line);
        } else if line.contains("archiver: merged ") {
            finished += 1;
            if let (Some(a), Some(b)) = (last_start, secs(line))
                && b >= a
            {
                last = Some(Duration::from_secs_f64(b - a));
            }
        }
    }
    (started, finished, last)
}

/// Crash safety of merging (SPEC §2.3, issue #6): `kill -9` of the daemon at random points
/// of merges. A base layer of 15,000 inodes makes each merge of it take long enough (tens of
/// milliseconds) to be hit: every iteration changes a few files (new ones, an overwrite of an
/// archived one, a removal), seals them as a new layer on top, asks for a merge, waits for the
/// daemon to log that it started merging and strikes at a random moment within the duration
/// of a recent complete merge (some kills land after the commit: before the daemon logs the
/// merge as done, or just after). After the
/// remount the manifest must hold the old layers or the merged one, never a mix; no partial
/// output may remain (meta or head-cache partials in `layers/`, work files, generations); every
/// file keeps its content and its inode number, removed files stay removed; then a merge run
/// to completion must work. The number of kills that landed inside a merge (the daemon had
/// logged "merging" and not "merged") is counted and must be at least a third of them.
///
/// Iterations: `SPINFS_CRASH_ITERATIONS` (default 30, shared with the test above;
/// `scripts/crash-soak.sh` runs many more), seed `SPINFS_CRASH_SEED`.
#[test]
fn kill_9_during_merges_leaves_old_or_merged_layers() {
    use std::os::unix::fs::MetadataExt;
    let iterations: u64 = std::env::var("SPINFS_CRASH_ITERATIONS")
        .ok()
        .map(|v| v.parse().expect("SPINFS_CRASH_ITERATIONS"))
        .unwrap_or(30);
    let seed: u64 = std::env::var("SPINFS_CRASH_SEED")
        .ok()
        .map(|v| v.parse().expect("SPINFS_CRASH_SEED"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("merge crash test: {iterations} iterations, SPINFS_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let mut m = Mounted::new(&[
        "--archive-threshold",
        "1G",
        "--merge-fanin",
        "2",
        "--chunk-size",
        "64K",
        "--container-size",
        "32M",
        "--object-size",
        "64K",
    ]);
    let store = m.store.clone();
    let log = store.join("spinfs.log");
    // The base: 50 directories of 300 empty files (below the daemon's open-file limit: it
    // holds a descriptor per inode the kernel knows), sealed and merged with a first layer.
    const DIRS: usize = 50;
    const PER_DIR: usize = 300;
    let mut base_ino: BTreeMap<String, u64> = BTreeMap::new();
    for d in 0..DIRS {
        fs::create_dir(m.path(&format!("b{d}"))).unwrap();
        for i in 0..PER_DIR {
            let rel = format!("b{d}/f{i}");
            let f = fs::File::create(m.path(&rel)).unwrap();
            base_ino.insert(rel, f.metadata().unwrap().ino());
        }
    }
    fs::create_dir(m.path("c")).unwrap();
    archive_now(&m);
    m.remount(); // let the kernel's references to the base go
    let mut mounted_at = log_len(&log);
    // name -> (content, st_ino) of the changing files; names removed.
    let mut files: BTreeMap<String, (Vec<u8>, u64)> = BTreeMap::new();
    let mut removed: BTreeSet<String> = BTreeSet::new();
    let (mut inside, mut outside, mut merged_kept, mut cleaned) = (0u64, 0u64, 0usize, 0u64);
    // Durations of the last complete merges: the strike falls within the shortest of the
    // last three (the machine's load makes them vary), so most kills land inside a merge.
    let mut durations: Vec<Duration> = vec![Duration::from_millis(50)];
    let start = Instant::now();
    for it in 0..iterations {
        let ctx = format!("iteration {it} (seed {seed})");
        // 1. changes, sealed as a new layer on top of the base
        for k in 0..2 {
            let name = format!("c/i{it}_{k}");
            let content = data(seed ^ (it << 8 | k), 1 + rng.below(100_000) as usize);
            write_durable(&m.path("c"), &name[2..], &content);
            let ino = fs::metadata(m.path(&name)).unwrap().ino();
            files.insert(name, (content, ino));
        }
        if files.len() > 4 {
            let keys: Vec<String> = files.keys().cloned().collect();
            let victim = keys[rng.below(keys.len() as u64 - 2) as usize].clone();
            if rng.below(2) == 0 {
                fs::remove_file(m.path(&victim)).unwrap();
                files.remove(&victim);
                removed.insert(victim);
            } else {
                // an archived file overwritten: copied up, same inode number
                let content = data(seed ^ it ^ 0x5555, 1 + rng.below(50_000) as usize);
                fs::write(m.path(&victim), &content).unwrap();
                files.get_mut(&victim).unwrap().0 = content;
            }
            fs::File::open(m.path("c")).unwrap().sync_all().unwrap();
        }
        archive_now(&m);
        // 2. quiescent: no merge running, then ask for one and strike during it
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (s, f, _) = merge_events(&log, mounted_at);
            if s == f {
                break;
            }
            assert!(Instant::now() < deadline, "{ctx}: a merge never finishes");
            std::thread::sleep(Duration::from_millis(5));
        }
        let before = layer_list(&store);
        assert!(before.len() >= 2, "{ctx}: nothing to merge: {before:?}");
        let log_from = log_len(&log);
        spinfs_ok(&["merge", store.to_str().unwrap()]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while merge_events(&log, log_from).0 == 0 {
            assert!(Instant::now() < deadline, "{ctx}: the merge did not start");
            std::thread::sleep(Duration::from_micros(500));
        }
        let window = *durations.iter().rev().take(3).min().unwrap();
        let delay = rng.below(window.as_micros() as u64 + 1);
        std::thread::sleep(Duration::from_micros(delay));
        let pid = daemon_pid(&store);
        // SAFETY: kill(2) on the daemon this test mounted.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        let st = Command::new("umount")
            .arg("-l")
            .arg(&m.mnt)
            .status()
            .unwrap();
        assert!(st.success(), "umount -l {}", m.mnt.display());
        let deadline = Instant::now() + Duration::from_secs(20);
        while !lock_free(&store) {
            assert!(
                Instant::now() < deadline,
                "{ctx}: daemon {pid} still holds the store 20 s after SIGKILL:\n{}",
                threads(pid)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let (started, finished, _) = merge_events(&log, log_from);
        if started > finished {
            inside += 1;
        } else {
            outside += 1;
        }
        // 3. remount: old layers or the merged one, nothing half-written left
        let log_mount = log_len(&log);
        m.mount();
        if fs::read_to_string(&log)
            .map(|t| t[log_mount.min(t.len())..].contains("removing a leftover meta image"))
            .unwrap_or(false)
        {
            cleaned += 1;
        }
        let after = layer_list(&store);
        match old_or_merged(&before, &after) {
            Ok(n) => merged_kept += n,
            Err(e) => panic!("{ctx}: {e}\nbefore the kill: {before:?}\nafter: {after:?}"),
        }
        check_no_leftovers(&store, &ctx);
        let upper = status_of(&store)["layers"][0]["id"].as_u64().unwrap();
        let work = store.join(format!("gens/{upper:016x}/work"));
        assert!(
            !work.exists() || names(&work).is_empty(),
            "{ctx}: work files left: {:?}",
            names(&work)
        );
        // 4. every file's content and inode number
        let check = |when: &str, all_base: bool, rng: &mut Rng| {
            for (name, (content, ino)) in &files {
                let got =
                    fs::read(m.path(name)).unwrap_or_else(|e| panic!("{ctx} {when}: {name}: {e}"));
                assert!(got == *content, "{ctx} {when}: {name} differs");
                let md = fs::metadata(m.path(name)).unwrap();
                assert_eq!(md.ino(), *ino, "{ctx} {when}: st_ino of {name}");
            }
            for name in &removed {
                assert!(
                    !m.path(name).exists(),
                    "{ctx} {when}: removed {name} is back"
                );
            }
            let listed: BTreeSet<String> = names(&m.path("c"))
                .into_iter()
                .map(|n| format!("c/{n}"))
                .collect();
            let want: BTreeSet<String> = files.keys().cloned().collect();
            assert_eq!(listed, want, "{ctx} {when}: ls c");
            // The base: one directory (all of it at the end), names and inode numbers.
            let dirs: Vec<usize> = if all_base {
                (0..DIRS).collect()
            } else {
                vec![rng.below(DIRS as u64) as usize]
            };
            for d in dirs {
                assert_eq!(
                    names(&m.path(&format!("b{d}"))).len(),
                    PER_DIR,
                    "{ctx} {when}: b{d}"
                );
                for i in 0..PER_DIR {
                    let rel = format!("b{d}/f{i}");
                    let md = fs::metadata(m.path(&rel))
                        .unwrap_or_else(|e| panic!("{ctx} {when}: {rel}: {e}"));
                    assert_eq!(md.ino(), base_ino[&rel], "{ctx} {when}: st_ino of {rel}");
                }
            }
        };
        check("after recovery", it + 1 == iterations, &mut rng);
        // 5. a merge run to completion works, and measures the next strike's window
        if layer_list(&store).len() >= 2 {
            let log_from = log_len(&log);
            spinfs_ok(&["merge", store.to_str().unwrap(), "--wait"]);
            if let (_, _, Some(d)) = merge_events(&log, log_from) {
                durations.push(d);
            }
            check_no_leftovers(&store, &ctx);
            check("after a complete merge", false, &mut rng);
        }
        m.umount(); // bounded descriptor use in the daemon
        mounted_at = log_len(&log);
        m.mount();
    }
    m.umount();
    println!(
        "merge crash test: {iterations} kills in {:.1}s: {inside} inside a merge, {outside} \
         outside one; {merged_kept} merges survived a kill just after their commit; last merge \
         took {:?}; {cleaned} mounts removed partial or orphaned layer files; {} files and {} \
         removals checked",
        start.elapsed().as_secs_f64(),
        durations.last().unwrap(),
        files.len(),
        removed.len()
    );
    assert!(
        iterations < 10 || inside * 3 >= iterations,
        "only {inside} of {iterations} kills landed inside a merge: the test did not test what \
         it should"
    );
}
