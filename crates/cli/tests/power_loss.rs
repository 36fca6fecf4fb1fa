//! Power loss: the store and its media live on ext4 on a loop device whose backing file is
//! a simulated disk with a volatile write cache (tests/faults/disk.rs: writes since the last
//! cache flush are dropped, kept or torn at 512-byte sectors when the power fails). The
//! daemon crashes at a random crash point (SPINFS_FAILPOINTS) or at a random moment, the
//! power fails at that instant, and the disk comes back with only what was made durable
//! (fsync, fdatasync, directory fsync as ext4 turns them into flushes): ext4 replays its
//! journal, spinfs recovers at mount, and the checks of `crash_points.rs` follow (every
//! fsync'ed file byte-identical with its metadata, durable removals kept, nothing never
//! created, no leftovers, fsck clean). One cut in three is strict (every unflushed write
//! lost); the others keep or tear unflushed writes at random.
//!
//! Environment: `SPINFS_POWER_CUTS` (default 16), `SPINFS_CRASH_SEED` (replay).

mod common;
mod faults;

use common::*;
use faults::disk::DiskMount;
use faults::*;
use std::fs;
use std::path::Path;
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

/// ext4 on a loop device over `file` (the loop device goes away with the mount).
fn mount_ext4(file: &Path, dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    run(Command::new("mount")
        .arg("-t")
        .arg("ext4")
        .arg("-o")
        .arg("loop,data=writeback,noauto_da_alloc")
        .arg(file)
        .arg(dir));
}

/// Lazily unmounts `dir` on drop (a failed test must not leave it).
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn power_cut_at_crash_points_and_random_moments_loses_nothing_durable() {
    let seed = seed_from("SPINFS_CRASH_SEED");
    let cuts = env_u64("SPINFS_POWER_CUTS", 16);
    println!("power loss: {cuts} cuts, SPINFS_CRASH_SEED={seed}");
    let rng = Arc::new(Mutex::new(Rng(seed)));
    let points: Vec<String> = registered_points()
        .into_iter()
        .filter(|p| !p.starts_with("recover."))
        .collect();
    let tmp = tempfile::Builder::new()
        .prefix("pl")
        .tempdir_in(test_root())
        .unwrap();
    let dm = DiskMount::new(&tmp.path().join("dev"), 1 << 30);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-E"])
        .arg("nodiscard,lazy_itable_init=0,lazy_journal_init=0")
        .arg(dm.file()));
    dm.disk.settle();
    let ext = tmp.path().join("ext");
    mount_ext4(&dm.file(), &ext);
    let _ext_guard = Unmount(ext.clone());
    let mut site = Site::create(&ext);
    site.mount();
    fs::create_dir(site.dir()).unwrap();
    fs::File::open(&site.mnt).unwrap().sync_all().unwrap();
    site.umount();

    let hits_file = tmp.path().join("hits");
    let mut model = Model::default();
    let mut counts = Counts::default();
    let (mut at_points, mut at_random, mut fsck_runs) = (0u64, 0u64, 0u64);
    let (mut dropped, mut kept, mut torn) = (0u64, 0u64, 0u64);
    let (mut unsynced_written, mut unsynced_lost) = (0u64, 0u64);
    let start = Instant::now();
    for i in 0..cuts {
        let strict = i % 3 == 0;
        let tag = format!("p{i}");
        let mut r = rng.lock().unwrap().next();
        let use_point = i % 2 == 0;
        let (what, env) = if use_point {
            let p = &points[(r % points.len() as u64) as usize];
            r /= points.len() as u64;
            let spec = format!("{p}@{}", 1 + r % 3);
            (
                spec.clone(),
                vec![
                    ("SPINFS_FAILPOINTS", spec),
                    (
                        "SPINFS_FAILPOINTS_HITS",
                        hits_file.to_str().unwrap().to_string(),
                    ),
                ],
            )
        } else {
            ("a random moment".to_string(), Vec::new())
        };
        let ctx = format!(
            "cut {i} at {what} ({}; SPINFS_CRASH_SEED={seed})",
            if strict { "strict" } else { "torn" }
        );
        site.mount_env(&env)
            .unwrap_or_else(|e| panic!("{ctx}: mount: {e}"));
        let cut_result = Arc::new(Mutex::new(None));
        let cut = {
            let disk = dm.disk.clone();
            let rng = rng.clone();
            let cut_result = cut_result.clone();
            Arc::new(move || {
                let mut rng = rng.lock().unwrap();
                let s = disk.cut(strict, &mut |n| rng.below(n));
                *cut_result.lock().unwrap() = Some(s);
            })
        };
        let killer = (!use_point).then(|| Killer {
            after: Duration::from_millis(rng.lock().unwrap().below(800)),
            first: Some(cut.clone()),
        });
        let mut wrng = Rng(rng.lock().unwrap().next() | 1);
        let died = workload(&site, &mut model, &mut wrng, &tag, 4, killer, &mut counts);
        if cut_result.lock().unwrap().is_none() {
            // crashed at its point (or not: then the power fails now all the same)
            cut();
            if let Some(pid) = live_daemon(&site.store) {
                kill9(pid);
            }
        }
        if use_point && died {
            at_points += 1;
        } else {
            at_random += 1;
        }
        let s = cut_result.lock().unwrap().unwrap();
        dropped += s.dropped;
        kept += s.kept;
        torn += s.torn;
        site.reap();
        // the machine comes back: the disk holds only what survived the cut
        let st = Command::new("umount").arg("-l").arg(&ext).status().unwrap();
        assert!(st.success(), "{ctx}: umount -l {}", ext.display());
        mount_ext4(&dm.file(), &ext);
        site.mount();
        // what a kill -9 keeps (the page cache) and a power cut may not: files written
        // without fsync
        unsynced_written += counts.unsynced_last.len() as u64;
        unsynced_lost += counts
            .unsynced_last
            .iter()
            .filter(|(name, content)| {
                fs::read(site.dir().join(name)).ok().as_ref() != Some(content)
            })
            .count() as u64;
        if verify_after_crash(&mut site, &mut model, &ctx) {
            fsck_runs += 1;
        }
    }
    let s = dm.disk.stats();
    println!(
        "power loss: {cuts} cuts in {:.1}s ({at_points} at crash points, {at_random} at random \
         moments); the disk saw {} writes ({} MiB) and {} flushes; at the cuts {dropped} \
         unflushed writes were dropped, {kept} kept, {torn} torn; {unsynced_lost} of \
         {unsynced_written} files written without fsync were lost or damaged; {} operations; {} durable \
         files and {} durable removals checked after each; fsck ran {fsck_runs} times",
        start.elapsed().as_secs_f64(),
        s.writes,
        s.bytes >> 20,
        s.flushes,
        counts.ops,
        model.durable.len(),
        model.removed.len(),
    );
    assert!(
        dropped + torn + unsynced_lost > 0,
        "no cut lost anything that was not durable: the test did not test power loss"
    );
    drop(site);
}
