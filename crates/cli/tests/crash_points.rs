//! Crash at every durable step: the daemon runs with one crash point armed
//! (`SPINFS_FAILPOINTS`, see crates/failpoints) and kills itself with SIGKILL when it gets
//! there, while a workload writes durable files (data, mode, owner, mtime, name: all
//! fsync'ed) and unsynced ones, forces seals and merges and reads archived files back (chunk
//! cache fills). Then a remount must recover by itself: every durable file byte-identical
//! with its metadata, durable removals still removed, nothing that was never created, the
//! mount working, no leftovers in the store and `spinfs fsck` clean.
//!
//! Every registered point (each `fail_point!` in the sources) is crashed at once, then
//! random points at a random pass, then kills at random moments (no point armed). The test
//! asserts that every registered point was reached, so a renamed or unreachable point fails.
//!
//! Environment: `SPINFS_CRASH_SEED` (replay), `SPINFS_CRASH_POINT_EXTRA` (random point/pass
//! crashes, default 6), `SPINFS_CRASH_RANDOM_KILLS` (default 6), `SPINFS_CRASH_POINT_ROUNDS`
//! (repeats of the whole plan, default 1; scripts/reliability-soak.sh raises them).
//!
//! The store keeps every stacked file's chunk map in a sidecar file (`stack_map_inline_max =
//! 0`), so the workload's copy-ups and rewrites of archived files pass the map files' points.
//!
//! A kill -9 leaves the kernel's page cache intact: power loss is `power_loss.rs`.

mod common;
mod faults;

use common::*;
use faults::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

/// The points reached by the crashes so far, from the hits file the daemons append to.
fn hits(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn crash_at_every_point_then_recover() {
    let seed = seed_from("SPINFS_CRASH_SEED");
    let extra = env_u64("SPINFS_CRASH_POINT_EXTRA", 6);
    let random_kills = env_u64("SPINFS_CRASH_RANDOM_KILLS", 6);
    let repeats = env_u64("SPINFS_CRASH_POINT_ROUNDS", 1);
    let rounds = 4;
    let points = registered_points();
    println!(
        "crash points: {} registered, SPINFS_CRASH_SEED={seed}",
        points.len()
    );
    assert!(
        points.len() >= 30,
        "only {} fail points found in the sources: {points:?}",
        points.len()
    );
    let mut rng = Rng(seed);
    let tmp = tempfile::Builder::new()
        .prefix("cp")
        .tempdir_in(test_root())
        .unwrap();
    let hits_file = tmp.path().join("hits");
    let mut site = Site::create(tmp.path());
    // Every chunk map goes to a sidecar file (the map files' durable steps are crash points;
    // with the default only maps of heavily fragmented files would).
    let cfg = site.store.join("spinfs.toml");
    let text = fs::read_to_string(&cfg).unwrap();
    fs::write(&cfg, format!("stack_map_inline_max = 0\n{text}")).unwrap();
    site.mount();
    fs::create_dir(site.dir()).unwrap();
    fs::File::open(&site.mnt).unwrap().sync_all().unwrap();
    site.umount();

    // (point, pass) or a kill after a delay
    enum Step {
        Point(String, u64),
        Kill(Duration),
    }
    let list: Vec<&String> = points.iter().collect();
    let mut plan = Vec::new();
    for _ in 0..repeats {
        plan.extend(points.iter().map(|p| Step::Point(p.clone(), 1)));
        for _ in 0..extra {
            let p = list[rng.below(list.len() as u64) as usize].clone();
            plan.push(Step::Point(p, 1 + rng.below(4)));
        }
        for _ in 0..random_kills {
            plan.push(Step::Kill(Duration::from_millis(rng.below(800))));
        }
    }

    let mut model = Model::default();
    let mut counts = Counts::default();
    let mut reached: BTreeMap<String, u64> = BTreeMap::new();
    let (mut not_reached, mut kills, mut fsck_runs) = (Vec::new(), 0u64, 0u64);
    let start = Instant::now();
    for (i, step) in plan.iter().enumerate() {
        let before = hits(&hits_file).len();
        let tag = format!("s{i}");
        let what = match step {
            Step::Point(p, n) => format!("{p}@{n}"),
            Step::Kill(d) => format!("kill -9 after {d:?}"),
        };
        let ctx = format!("step {i} ({what}; SPINFS_CRASH_SEED={seed})");
        let armed = |spec: String| {
            vec![
                ("SPINFS_FAILPOINTS", spec),
                (
                    "SPINFS_FAILPOINTS_HITS",
                    hits_file.to_str().unwrap().to_string(),
                ),
            ]
        };
        match step {
            Step::Point(p, n) if p.starts_with("recover.") => {
                // leave a frozen generation (crash right after the volume froze), then
                // crash in the next mount's recovery
                site.mount_env(&armed("seal.volume_frozen".into()))
                    .unwrap_or_else(|e| panic!("{ctx}: mount: {e}"));
                let died = workload(&site, &mut model, &mut rng, &tag, rounds, None, &mut counts);
                assert!(died, "{ctx}: seal.volume_frozen not reached");
                site.reap();
                check_no_hang(&site);
                match site.mount_env(&armed(format!("{p}@{n}"))) {
                    Ok(()) => {
                        // The mount serves the frozen generation at once and seals it again
                        // in the background: wait until that reaches the point (the daemon
                        // dies) or the generation is sealed.
                        let want = format!("{p}@{n}");
                        let deadline = Instant::now() + Duration::from_secs(60);
                        while Instant::now() < deadline
                            && !hits(&hits_file)[before..].contains(&want)
                            && live_daemon(&site.store).is_some()
                            && fs::read_dir(site.store.join("gens")).map_or(0, |d| d.count()) > 1
                        {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        if live_daemon(&site.store).is_some() {
                            site.umount(); // recovery did not pass the point
                        } else {
                            site.reap();
                        }
                    }
                    Err(_) => site.reap(),
                }
            }
            Step::Point(p, n) => {
                site.mount_env(&armed(format!("{p}@{n}")))
                    .unwrap_or_else(|e| panic!("{ctx}: mount: {e}"));
                let died = workload(&site, &mut model, &mut rng, &tag, rounds, None, &mut counts);
                if !died && let Some(pid) = live_daemon(&site.store) {
                    kill9(pid);
                }
                site.reap();
            }
            Step::Kill(d) => {
                site.mount();
                let killer = Killer {
                    after: *d,
                    first: None,
                };
                workload(
                    &site,
                    &mut model,
                    &mut rng,
                    &tag,
                    rounds,
                    Some(killer),
                    &mut counts,
                );
                site.reap();
                kills += 1;
            }
        }
        let new_hits: Vec<String> = hits(&hits_file)[before..].to_vec();
        if let Step::Point(p, n) = step {
            let want = format!("{p}@{n}");
            if new_hits.contains(&want) {
                *reached.entry(p.clone()).or_default() += 1;
            } else {
                not_reached.push(want);
            }
        }
        // recovery by a plain mount
        site.mount();
        if verify_after_crash(&mut site, &mut model, &ctx) {
            fsck_runs += 1;
        }
    }
    let unreached: BTreeSet<&String> = points
        .iter()
        .filter(|p| !reached.contains_key(*p))
        .collect();
    println!(
        "crash points: {} distinct of {} registered exercised ({} crashes at points, {} random \
         kills) in {:.1}s; {} operations, {} seals and {} merges requested, {} archived reads, \
         {} concurrent reads checked; \
         {} durable files and {} durable removals checked after each; fsck ran {fsck_runs} \
         times{}",
        reached.len(),
        points.len(),
        reached.values().sum::<u64>(),
        kills,
        start.elapsed().as_secs_f64(),
        counts.ops,
        counts.seals,
        counts.merges,
        counts.reads,
        counts.concurrent_reads,
        model.durable.len(),
        model.removed.len(),
        if fsck_runs == 0 {
            " (this build has no `spinfs fsck`)"
        } else {
            ""
        }
    );
    if !not_reached.is_empty() {
        println!("not reached by their step (the daemon was killed instead): {not_reached:?}");
    }
    assert!(
        unreached.is_empty(),
        "registered fail points never reached: {unreached:?}"
    );
}

/// Nothing of the killed daemon lingers (its lock is free).
fn check_no_hang(site: &Site) {
    assert!(lock_free(&site.store), "the store is still locked");
}

/// A crash before the first seal committed anything to the media, then a damaged manifest
/// (the reliability soak's epoch 38: `media.header.before_sync@1`, then a bit flipped in the
/// manifest). The media holds no state snapshot to rebuild it from, but nothing was ever
/// committed there either: `fsck --repair` rebuilds it from the SSD (the writable and the
/// frozen generation), and the next mount serves every durable file and seals the frozen
/// generation again.
#[test]
fn a_damaged_manifest_before_the_first_commit_is_rebuilt_from_the_ssd() {
    let root = tempfile::Builder::new()
        .prefix("nosnap")
        .tempdir_in(test_root())
        .unwrap();
    let mut site = Site::create(root.path());
    site.mount();
    let durable = data(77, 300 << 10);
    let path = site.mnt.join("durable");
    {
        let mut f = fs::File::create(&path).unwrap();
        std::io::Write::write_all(&mut f, &durable).unwrap();
        f.sync_all().unwrap();
    }
    site.umount();
    // The first container's header is written, not synced, when the daemon dies.
    site.mount_env(&[("SPINFS_FAILPOINTS", "media.header.before_sync@1".into())])
        .unwrap();
    let _ = spinfs(&["archive", site.arg(), "--wait"]);
    site.reap();
    let manifest = site.store.join("manifest");
    let mut bytes = fs::read(&manifest).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    fs::write(&manifest, &bytes).unwrap();

    let out = spinfs(&["fsck", "--repair", site.arg()]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr(&out));
    assert!(
        text.contains("manifest rebuilt from the SSD") && text.contains("frozen for sealing"),
        "{text}"
    );
    assert!(fsck_clean(&site.store, "after the repair"));
    site.mount();
    assert!(fs::read(&path).unwrap() == durable, "the durable file");
    // The frozen generation is sealed again in the background.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = status_of(&site.store);
        let layers = st["layers"].as_array().unwrap();
        if layers.iter().any(|l| l["kind"] == "archived")
            && layers
                .iter()
                .all(|l| l["kind"] != "sealing" && l["kind"] != "frozen")
        {
            break;
        }
        assert!(Instant::now() < deadline, "no reseal: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Its tree is deleted (paced) after the commit.
    let tree = site.store.join("gens/0000000000000001");
    while tree.exists() {
        assert!(Instant::now() < deadline, "the resealed tree stays");
        std::thread::sleep(Duration::from_millis(50));
    }
    site.umount();
    assert!(fsck_clean(&site.store, "after the reseal"));
    site.mount();
    assert!(fs::read(&path).unwrap() == durable, "after the reseal");
    site.umount();
}
