//! Reliability soak (outside CI: ignored; `scripts/reliability-soak.sh DURATION` runs it).
//!
//! For the given time, epochs of about 20 crash iterations each, on a fresh store (every
//! third epoch on the power-cut disk of `faults/disk.rs`, the others on the test root):
//! concurrent writers (durable files with metadata, unsynced files) and readers (checking
//! every byte they get), forced seals and merges, then a crash at a random fail point and
//! pass or a kill -9 at a random moment (with a power cut on the disk epochs), sometimes
//! followed by corruption of an SSD cache (a chunk-cache entry or a head cache: flipped
//! byte or truncation), then a remount and the checks of `crash_points.rs`. Lost bytes of
//! durable files are counted (any makes the run fail).
//!
//! With a `spinfs fsck` command in the binary, each corruption must be reported by
//! `spinfs fsck STORE` (non-zero exit) and repaired by `spinfs fsck --repair STORE`, and
//! meta images and the manifest are corrupted too (repaired from the media); without one,
//! only the cache corruptions that the read path itself detects and routes around are
//! injected.
//!
//! Environment: `SPINFS_SOAK_SECONDS` (default 300), `SPINFS_CRASH_SEED`.

mod common;
mod faults;

use common::*;
use faults::disk::DiskMount;
use faults::*;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mount_ext4(file: &Path, dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    run(Command::new("mount")
        .args(["-t", "ext4", "-o", "loop,data=writeback,noauto_da_alloc"])
        .arg(file)
        .arg(dir));
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// Damages one SSD file of the (unmounted) store; returns what was damaged.
fn corrupt(store: &Path, rng: &mut Rng, with_fsck: bool) -> Option<String> {
    let mut candidates: Vec<(String, PathBuf)> = Vec::new();
    let mut cache = Vec::new();
    files_under(&store.join("cache"), &mut cache);
    for p in cache {
        let rel = p
            .strip_prefix(store)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if rel.contains("/i") {
            candidates.push(("chunk-cache entry".into(), p));
        }
    }
    for e in fs::read_dir(store.join("layers"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let p = e.path();
        match p.extension().and_then(|x| x.to_str()) {
            Some("heads") => candidates.push(("head cache".into(), p)),
            Some("meta") if with_fsck => candidates.push(("meta image".into(), p)),
            _ => {}
        }
    }
    if with_fsck {
        candidates.push(("manifest".into(), store.join("manifest")));
    }
    if candidates.is_empty() {
        return None;
    }
    // a kind first (uniformly: chunk-cache entries are many), then one file of that kind
    let mut kinds: Vec<&String> = candidates.iter().map(|(k, _)| k).collect();
    kinds.sort();
    kinds.dedup();
    let kind = kinds[rng.below(kinds.len() as u64) as usize].clone();
    candidates.retain(|(k, _)| *k == kind);
    let (kind, path) = candidates.swap_remove(rng.below(candidates.len() as u64) as usize);
    let mut bytes = fs::read(&path).ok()?;
    if bytes.is_empty() {
        return None;
    }
    let how = if rng.below(3) == 0 {
        let len = rng.below(bytes.len() as u64) as usize;
        bytes.truncate(len);
        format!("truncated to {len}")
    } else {
        let at = rng.below(bytes.len() as u64) as usize;
        bytes[at] ^= 1 << rng.below(8);
        format!("bit flipped at {at}")
    };
    fs::write(&path, &bytes).unwrap();
    Some(format!("{kind} ({}: {how})", path.display()))
}

fn fsck_available() -> bool {
    let out = spinfs(&["fsck", "--help"]);
    out.status.success()
}

#[derive(Default)]
struct Totals {
    counts: Counts,
    points: BTreeMap<String, u64>,
    kills: u64,
    power_cuts: u64,
    corruptions: BTreeMap<String, u64>,
    files_verified: u64,
    bytes_lost: u64,
    iterations: u64,
    epochs: u64,
}

impl Totals {
    fn print(&self, secs: f64) {
        let c = &self.counts;
        println!(
            "soak: {secs:.0} s, {} epochs, {} crash iterations",
            self.epochs, self.iterations
        );
        println!(
            "operations {} ({} seals and {} merges requested, {} archived reads, {} concurrent reads checked)",
            c.ops, c.seals, c.merges, c.reads, c.concurrent_reads
        );
        println!(
            "crash points {} distinct, {} crashes at points, {} kill -9 at random moments, {} power cuts",
            self.points.len(),
            self.points.values().sum::<u64>(),
            self.kills,
            self.power_cuts
        );
        println!(
            "corruptions injected {} {:?}",
            self.corruptions.values().sum::<u64>(),
            self.corruptions
        );
        println!("files verified {}", self.files_verified);
        println!("bytes lost {}", self.bytes_lost);
    }
}

#[test]
#[ignore = "soak: run by scripts/reliability-soak.sh"]
fn reliability_soak() {
    let secs = env_u64("SPINFS_SOAK_SECONDS", 300);
    let seed = seed_from("SPINFS_CRASH_SEED");
    let with_fsck = fsck_available();
    println!(
        "soak: {secs} s, SPINFS_CRASH_SEED={seed}, fsck {}",
        if with_fsck {
            "available"
        } else {
            "not in this build"
        }
    );
    let points: Vec<String> = registered_points()
        .into_iter()
        .filter(|p| !p.starts_with("recover."))
        .collect();
    let rng = Arc::new(Mutex::new(Rng(seed)));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut t = Totals::default();
    while Instant::now() < deadline {
        let power = t.epochs % 3 == 2;
        t.epochs += 1;
        let tmp = tempfile::Builder::new()
            .prefix("soak")
            .tempdir_in(test_root())
            .unwrap();
        let dm = power.then(|| {
            let dm = DiskMount::new(&tmp.path().join("dev"), 2 << 30);
            run(Command::new("mkfs.ext4")
                .args(["-q", "-F", "-b", "4096", "-E"])
                .arg("nodiscard,lazy_itable_init=0,lazy_journal_init=0")
                .arg(dm.file()));
            dm.disk.settle();
            dm
        });
        let ext = tmp.path().join("ext");
        let root = if let Some(dm) = &dm {
            mount_ext4(&dm.file(), &ext);
            ext.clone()
        } else {
            tmp.path().to_path_buf()
        };
        let mut site = Site::create(&root);
        site.mount();
        fs::create_dir(site.dir()).unwrap();
        fs::File::open(&site.mnt).unwrap().sync_all().unwrap();
        site.umount();
        let mut model = Model::default();
        for it in 0..20 {
            if Instant::now() >= deadline {
                break;
            }
            t.iterations += 1;
            let tag = format!("e{}i{it}", t.epochs);
            let r = rng.lock().unwrap().next();
            let at_point = r.is_multiple_of(2);
            let point = format!(
                "{}@{}",
                points[((r >> 8) % points.len() as u64) as usize],
                1 + (r >> 32) % 4
            );
            let ctx = format!(
                "epoch {} iteration {it} ({}{}; SPINFS_CRASH_SEED={seed})",
                t.epochs,
                if at_point { point.as_str() } else { "kill -9" },
                if power { ", power cut" } else { "" }
            );
            let hits = tmp.path().join("hits");
            let env = if at_point {
                vec![
                    ("SPINFS_FAILPOINTS", point.clone()),
                    ("SPINFS_FAILPOINTS_HITS", hits.to_str().unwrap().to_string()),
                ]
            } else {
                Vec::new()
            };
            site.mount_env(&env)
                .unwrap_or_else(|e| panic!("{ctx}: mount: {e}"));
            let cut_done = Arc::new(Mutex::new(false));
            let cut: Option<Arc<dyn Fn() + Send + Sync>> = dm.as_ref().map(|dm| {
                let disk = dm.disk.clone();
                let rng = rng.clone();
                let done = cut_done.clone();
                let strict = r.is_multiple_of(3);
                Arc::new(move || {
                    let mut rng = rng.lock().unwrap();
                    disk.cut(strict, &mut |n| rng.below(n));
                    *done.lock().unwrap() = true;
                }) as Arc<dyn Fn() + Send + Sync>
            });
            let killer = (!at_point).then(|| Killer {
                after: Duration::from_millis(rng.lock().unwrap().below(800)),
                first: cut.clone(),
            });
            let mut wrng = Rng(rng.lock().unwrap().next() | 1);
            let before = fs::read_to_string(&hits)
                .unwrap_or_default()
                .lines()
                .count();
            workload(&site, &mut model, &mut wrng, &tag, 4, killer, &mut t.counts);
            if let Some(cut) = &cut
                && !*cut_done.lock().unwrap()
            {
                cut();
            }
            if let Some(pid) = live_daemon(&site.store) {
                kill9(pid);
            }
            let new_hits: Vec<String> = fs::read_to_string(&hits)
                .unwrap_or_default()
                .lines()
                .skip(before)
                .map(str::to_string)
                .collect();
            if at_point && new_hits.contains(&point) {
                *t.points
                    .entry(point.split('@').next().unwrap().to_string())
                    .or_default() += 1;
            } else {
                t.kills += 1;
            }
            site.reap();
            if let Some(dm) = &dm {
                t.power_cuts += 1;
                let st = Command::new("umount").arg("-l").arg(&ext).status().unwrap();
                assert!(st.success());
                mount_ext4(&dm.file(), &ext);
            }
            let mut crng = Rng(rng.lock().unwrap().next() | 1);
            if crng.below(2) == 0
                && let Some(what) = corrupt(&site.store, &mut crng, with_fsck)
            {
                let kind = what.split(" (").next().unwrap().to_string();
                *t.corruptions.entry(kind).or_default() += 1;
                if with_fsck {
                    let out = spinfs(&["fsck", site.arg()]);
                    assert!(
                        !out.status.success(),
                        "{ctx}: fsck did not notice {what}: {}",
                        String::from_utf8_lossy(&out.stdout)
                    );
                    // Exit 1: problems found and all repaired.
                    let out = spinfs(&["fsck", "--repair", site.arg()]);
                    assert_eq!(
                        out.status.code(),
                        Some(1),
                        "{ctx}: fsck --repair after {what}: {}{}",
                        String::from_utf8_lossy(&out.stdout),
                        stderr(&out)
                    );
                    let out = spinfs(&["fsck", site.arg()]);
                    assert!(
                        out.status.success(),
                        "{ctx}: fsck after the repair of {what}: {}{}",
                        String::from_utf8_lossy(&out.stdout),
                        stderr(&out)
                    );
                }
            }
            site.mount();
            let (verified, lost, what) = lost_bytes(&site.dir(), &model);
            t.files_verified += verified;
            t.bytes_lost += lost;
            if lost > 0 || !what.is_empty() {
                t.print(start.elapsed().as_secs_f64());
                panic!("{ctx}: durable data lost or changed: {what:?}");
            }
            verify_after_crash(&mut site, &mut model, &ctx);
        }
        drop(site);
        if dm.is_some() {
            let _ = Command::new("umount").arg("-l").arg(&ext).status();
        }
        drop(dm);
    }
    t.print(start.elapsed().as_secs_f64());
    assert_eq!(t.bytes_lost, 0);
}
