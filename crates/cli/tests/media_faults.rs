//! Failing and slow media, through the real mount: the media backend sits behind injected
//! faults (`[[media_fault]]` in spinfs.toml, each rule switched on and off by a flag file),
//! and the mount must stay responsive, fail only the affected requests (EIO, within
//! `media_io.request_timeout_ms`), keep a frozen generation readable while its seal fails
//! and retry it until the fault clears, never reporting durable what is not. Also: a
//! generation a crash left frozen is sealed again in the background while the mount serves
//! it (the mount returns at once).

mod common;

use common::*;
use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Small containers so that a few MiB span several; the request timeout short.
const MKFS: &[&str] = &[
    "--archive-threshold",
    "1G",
    "--chunk-size",
    "64K",
    "--container-size",
    "8M",
    "--object-size",
    "64K",
    "--head-size",
    "4K",
];
const TIMEOUT_MS: u64 = 1500;

/// Replaces the request timeout and appends fault rules to the (unmounted) store's config.
fn configure(store: &Path, rules: &str) {
    let path = store.join("spinfs.toml");
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains("request_timeout_ms = 60000"), "{text}");
    let text = text.replace(
        "request_timeout_ms = 60000",
        &format!("request_timeout_ms = {TIMEOUT_MS}"),
    );
    fs::write(&path, format!("{text}\n{rules}")).unwrap();
}

fn rule(op: &str, action: &str, containers: &[u64], flag: &Path) -> String {
    format!(
        "[[media_fault]]\nop = \"{op}\"\naction = \"{action}\"\ncontainers = {containers:?}\n\
         while_exists = \"{}\"\n",
        flag.display()
    )
}

fn write_durable(path: &Path, content: &[u8]) {
    let mut f = fs::File::create(path).unwrap();
    f.write_all(content).unwrap();
    f.sync_all().unwrap();
    drop(f);
    fs::File::open(path.parent().unwrap())
        .unwrap()
        .sync_all()
        .unwrap();
}

/// The manifest's JSON body.
fn manifest(store: &Path) -> serde_json::Value {
    let text = fs::read_to_string(store.join("manifest")).unwrap();
    serde_json::from_str(&text[text.find('\n').unwrap() + 1..]).unwrap()
}

/// Containers holding the blobs of the archived layer that sealed generation `generation`.
fn containers_of_generation(store: &Path, generation: u64) -> BTreeSet<u64> {
    let m = manifest(store);
    let layer = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| {
            l["generations"]
                .as_array()
                .unwrap()
                .contains(&generation.into())
        })
        .unwrap_or_else(|| panic!("no layer holds generation {generation}: {m}"));
    let mut out = BTreeSet::new();
    for b in layer["devices"].as_array().unwrap() {
        let blob = m["blobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == *b)
            .unwrap();
        for e in blob["extents"].as_array().unwrap() {
            out.insert(e[0].as_u64().unwrap());
        }
    }
    out
}

fn layer_kinds(store: &Path) -> Vec<String> {
    status_of(store)["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["kind"].as_str().unwrap().to_string())
        .collect()
}

/// Reads a whole file; the error's raw OS code on failure.
fn read_all(path: &Path) -> Result<Vec<u8>, i32> {
    let mut f = fs::File::open(path).map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    let mut v = Vec::new();
    f.read_to_end(&mut v)
        .map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    Ok(v)
}

/// Reads `path` expecting EIO; returns how long the failure took.
fn expect_eio(path: &Path, what: &str) -> Duration {
    let t = Instant::now();
    let r = read_all(path);
    let took = t.elapsed();
    assert_eq!(
        r.err(),
        Some(libc::EIO),
        "{what}: reading {}",
        path.display()
    );
    took
}

/// The unaffected parts of the mount work: an archived file on healthy containers, the
/// writable layer, listings.
fn healthy(m: &Mounted, a: &[u8], what: &str) {
    assert_eq!(
        read_all(&m.path("a.bin")).unwrap_or_else(|e| panic!("{what}: a.bin: errno {e}")),
        a,
        "{what}: a.bin"
    );
    let p = m.path("w.txt");
    fs::write(&p, what.as_bytes()).unwrap();
    assert_eq!(fs::read(&p).unwrap(), what.as_bytes());
    let listed = names(&m.mnt);
    assert!(
        listed.contains("a.bin") && listed.contains("b.bin"),
        "{what}: {listed:?}"
    );
}

#[test]
fn stalled_failing_and_short_reads_fail_only_their_files_within_the_timeout() {
    let mut m = Mounted::new(MKFS);
    let a = data(1, 7 << 20);
    let b = data(2, 12 << 20);
    write_durable(&m.path("a.bin"), &a);
    archive_now(&m);
    write_durable(&m.path("b.bin"), &b);
    archive_now(&m);
    m.umount();
    let in_a = containers_of_generation(&m.store, 1);
    let in_b = containers_of_generation(&m.store, 2);
    let bad: Vec<u64> = in_b.difference(&in_a).copied().collect();
    assert!(
        !bad.is_empty(),
        "b.bin must reach containers a.bin does not use: {in_a:?} {in_b:?}"
    );
    let flags = m.dir.path().join("flags");
    fs::create_dir(&flags).unwrap();
    let (hang, err, short) = (flags.join("hang"), flags.join("err"), flags.join("short"));
    configure(
        &m.store,
        &[
            rule("read", "hang", &bad, &hang),
            rule("read", "error", &bad, &err),
            rule("read", "short", &bad, &short),
        ]
        .concat(),
    );
    m.mount();

    // A stalled container: reads of b.bin fail with EIO once the request timeout passed,
    // while the stalled read is still stuck in the medium; everything else works meanwhile.
    fs::write(&hang, b"").unwrap();
    let took = expect_eio(&m.path("b.bin"), "stalled container");
    assert!(
        took >= Duration::from_millis(TIMEOUT_MS) && took < Duration::from_secs(60),
        "a stalled read failed after {took:?} (timeout {TIMEOUT_MS} ms)"
    );
    healthy(&m, &a, "while a container is stalled");
    expect_eio(&m.path("b.bin"), "stalled container, again");
    healthy(&m, &a, "while a container is still stalled");
    fs::remove_file(&hang).unwrap();

    // Failing reads: EIO at once, nothing else affected.
    fs::write(&err, b"").unwrap();
    expect_eio(&m.path("b.bin"), "failing container");
    healthy(&m, &a, "while a container fails");
    fs::remove_file(&err).unwrap();

    // Short reads: the objects are incomplete, EIO.
    fs::write(&short, b"").unwrap();
    expect_eio(&m.path("b.bin"), "short reads");
    healthy(&m, &a, "while a container reads short");
    fs::remove_file(&short).unwrap();

    // Faults cleared: the file reads back whole, now and after a remount.
    assert_eq!(
        read_all(&m.path("b.bin")).unwrap(),
        b,
        "b.bin after the faults"
    );
    m.remount();
    assert_eq!(read_all(&m.path("b.bin")).unwrap(), b);
    assert_eq!(read_all(&m.path("a.bin")).unwrap(), a);
    assert!(
        fs::read_to_string(m.store.join("spinfs.log"))
            .unwrap()
            .contains("injected fault"),
        "the daemon log names the injected faults"
    );
}

fn log_count(store: &Path, what: &str) -> usize {
    fs::read_to_string(store.join("spinfs.log"))
        .unwrap_or_default()
        .matches(what)
        .count()
}

/// Waits until `cond` holds (polling), failing with `what` after `secs` seconds.
fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn layers_committed(store: &Path) -> usize {
    manifest(store)["layers"].as_array().unwrap().len()
}

#[test]
fn failing_archive_writes_keep_the_generation_frozen_and_retry_until_the_fault_clears() {
    let mut m = Mounted::new(MKFS);
    let a = data(3, 3 << 20);
    write_durable(&m.path("a.bin"), &a);
    archive_now(&m);
    m.umount();
    let flags = m.dir.path().join("flags");
    fs::create_dir(&flags).unwrap();
    let (werr, serr) = (flags.join("write"), flags.join("sync"));
    // Writes fail after a few have gone through (part of the blob reaches the media).
    let mut rules = rule("write", "error", &[], &werr);
    rules += "after = 3\n";
    rules += &rule("sync", "error", &[], &serr);
    configure(&m.store, &rules);
    m.mount();
    let store = m.store.to_str().unwrap().to_string();
    let layers_before = layers_committed(&m.store);

    let files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| {
            (
                format!("c{i}.bin"),
                data(10 + i, 1 << 20 | (i as usize * 4099)),
            )
        })
        .collect();
    for (name, content) in &files {
        write_durable(&m.path(name), content);
    }
    let check = |m: &Mounted, what: &str| {
        for (name, content) in &files {
            assert_eq!(
                read_all(&m.path(name)).unwrap_or_else(|e| panic!("{what}: {name}: errno {e}")),
                *content,
                "{what}: {name}"
            );
        }
        assert_eq!(read_all(&m.path("a.bin")).unwrap(), a, "{what}: a.bin");
    };

    for (flag, what) in [(&werr, "failing writes"), (&serr, "failing syncs")] {
        fs::write(flag, b"").unwrap();
        let failed_before = log_count(&m.store, "seal failed");
        let out = spinfs(&["archive", &store, "--wait"]);
        assert!(
            !out.status.success(),
            "{what}: the seal must fail: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        // Nothing new is committed; the generation stays frozen and readable.
        assert_eq!(layers_committed(&m.store), layers_before, "{what}");
        assert!(!manifest(&m.store)["frozen"].is_null(), "{what}");
        assert!(
            layer_kinds(&m.store).contains(&"sealing".to_string()),
            "{what}"
        );
        check(&m, what);
        healthy_writes(&m, what);
        // The archiver tries again by itself (after a back-off), and fails again.
        wait_for(30, "a retry of the failed seal", || {
            log_count(&m.store, "seal failed") >= failed_before + 2
        });
        assert_eq!(layers_committed(&m.store), layers_before, "{what}");
        check(&m, what);
        fs::remove_file(flag).unwrap();
    }

    // The fault cleared: the retry seals the frozen generation (a request hurries it).
    spinfs_ok(&["archive", &store, "--wait"]);
    wait_for(30, "the frozen generation sealed", || {
        manifest(&m.store)["frozen"].is_null()
    });
    assert!(layers_committed(&m.store) > layers_before);
    assert!(!layer_kinds(&m.store).contains(&"sealing".to_string()));
    check(&m, "after the fault cleared");
    m.remount();
    check(&m, "after a remount");
    m.umount();
    // Every image the manifest references is complete and intact on the media.
    spinfs_ok(&["media", "verify", &store]);
    m.mount();
}

fn healthy_writes(m: &Mounted, what: &str) {
    let p = m.path("new.txt");
    fs::write(&p, what.as_bytes()).unwrap();
    assert_eq!(fs::read(&p).unwrap(), what.as_bytes());
}

/// The daemon's pid (the lock file holds it).
fn daemon_pid(store: &Path) -> i32 {
    let pid: i32 = fs::read_to_string(store.join("lock"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "spinfs", "pid {pid} is not our daemon");
    pid
}

fn lock_free(store: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(store.join("lock")).unwrap();
    // SAFETY: flock on a descriptor we own; closing it releases the lock.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// kill -9 of the daemon, then the mount point detached and the store released.
fn kill_daemon(m: &mut Mounted) {
    let pid = daemon_pid(&m.store);
    // SAFETY: kill(2) on the daemon this test mounted.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let st = Command::new("umount")
        .arg("-l")
        .arg(&m.mnt)
        .status()
        .unwrap();
    assert!(st.success());
    wait_for(30, "the killed daemon to release the store", || {
        lock_free(&m.store)
    });
    // The guard still counts the store as mounted: the caller mounts it again.
}

#[test]
fn a_generation_left_frozen_by_a_crash_is_served_at_once_and_resealed_in_the_background() {
    let mut m = Mounted::new(MKFS);
    let old = data(20, 2 << 20);
    write_durable(&m.path("old.bin"), &old);
    archive_now(&m);
    m.umount();
    // Media writes hang while the flag exists: a seal started then cannot finish, so the
    // states below are observed, not raced.
    let flag: PathBuf = m.dir.path().join("hold-writes");
    configure(&m.store, &rule("write", "hang", &[], &flag));
    m.mount();
    let store = m.store.to_str().unwrap().to_string();
    fs::create_dir(m.path("d")).unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| (format!("d/f{i}"), data(30 + i, (3 << 20) + i as usize * 7)))
        .collect();
    for (name, content) in &files {
        write_durable(&m.path(name), content);
    }
    let check = |m: &Mounted, what: &str| {
        for (name, content) in &files {
            assert_eq!(
                read_all(&m.path(name)).unwrap_or_else(|e| panic!("{what}: {name}: errno {e}")),
                *content,
                "{what}: {name}"
            );
        }
        assert_eq!(read_all(&m.path("old.bin")).unwrap(), old, "{what}");
    };
    fs::write(&flag, b"").unwrap();
    spinfs_ok(&["archive", &store]);
    wait_for(30, "the seal to start", || {
        !manifest(&m.store)["frozen"].is_null()
    });
    let frozen_gen = manifest(&m.store)["frozen"]["generation"].as_u64().unwrap();
    // Let the seal reach the media (where it hangs), then crash.
    wait_for(30, "the seal to reach the media", || {
        log_count(&m.store, "injected fault") > 0
    });
    kill_daemon(&mut m);

    // Twice: the mount returns while the frozen generation cannot be sealed (writes still
    // hang), serves it as the frozen layer, and a crash during that reseal is recovered
    // the same way.
    for round in 0..2 {
        let what = format!("remount {round} with the seal held");
        m.mount();
        let kinds = layer_kinds(&m.store);
        assert_eq!(kinds[0], "upper", "{what}: {kinds:?}");
        assert_eq!(kinds[1], "sealing", "{what}: {kinds:?}");
        assert_eq!(
            manifest(&m.store)["frozen"]["generation"].as_u64(),
            Some(frozen_gen),
            "{what}"
        );
        check(&m, &what);
        let p = m.path(&format!("during{round}"));
        write_durable(&p, what.as_bytes());
        assert_eq!(fs::read(&p).unwrap(), what.as_bytes());
        wait_for(30, "the reseal to reach the media", || {
            log_count(&m.store, "injected fault") > round + 1
        });
        // Still frozen: the reseal cannot have finished.
        assert!(layer_kinds(&m.store).contains(&"sealing".to_string()));
        if round == 0 {
            kill_daemon(&mut m);
        }
    }
    // The fault clears: the background reseal completes by itself.
    fs::remove_file(&flag).unwrap();
    wait_for(120, "the background reseal", || {
        manifest(&m.store)["frozen"].is_null()
    });
    let kinds = layer_kinds(&m.store);
    assert!(!kinds.contains(&"sealing".to_string()), "{kinds:?}");
    let sealed = containers_of_generation(&m.store, frozen_gen);
    assert!(!sealed.is_empty());
    check(&m, "after the background reseal");
    // Only the writable generation is left on the SSD, once the sealed tree's deletion (paced
    // after the commit, see `reclaim`) is over.
    let upper = manifest(&m.store)["upper_gen"].as_u64().unwrap();
    wait_for(60, "the sealed tree's deletion", || {
        names(&m.store.join("gens")) == BTreeSet::from([format!("{upper:016x}")])
    });
    assert_eq!(
        names(&m.store.join("gens")),
        BTreeSet::from([format!("{upper:016x}")])
    );
    m.remount();
    check(&m, "after a remount");
    for round in 0..2 {
        let p = m.path(&format!("during{round}"));
        assert_eq!(
            fs::read(&p).unwrap(),
            format!("remount {round} with the seal held").as_bytes()
        );
    }
    m.umount();
    spinfs_ok(&["media", "verify", &store]);
    m.mount();
}
