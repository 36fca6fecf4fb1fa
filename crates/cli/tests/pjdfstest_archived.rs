//! pjdfstest on a tree that is being archived under it: a background thread forces a seal
//! every 100-200 ms for the whole run, so the files and directories pjdfstest creates are
//! sealed into archived layers between its steps, and its later operations (chmod, chown,
//! rename, link, unlink, truncate, utimensat, ...) land on archived entries. The failure set
//! must equal the checked-in expected list exactly, as on a plain mount.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every pjdfstest case, the permission ones included (chmod/chown/utimensat rules, write
/// access for renames, modes and owners of new files, S_ISGID clearing), with seals landing
/// between its steps. (It was ignored for a while for an archived hard-link nlink/ctime bug,
/// fixed since; `security.rs` checks permissions on entries known to be archived.)
#[test]
fn pjdfstest_while_the_tree_is_archived_under_it() {
    let m = Mounted::new(&[
        "--container-size",
        "64M",
        "--object-size",
        "64K",
        "--chunk-size",
        "64K",
    ]);
    set_mode(&m.mnt, 0o755);
    let dir = m.path("pjd");
    std::fs::create_dir(&dir).unwrap();
    set_mode(&dir, 0o777);

    let stop = Arc::new(AtomicBool::new(false));
    let sealer = {
        let stop = stop.clone();
        let store = m.store.clone();
        std::thread::spawn(move || {
            let (mut sealed, mut empty, mut errors) = (0u64, 0u64, Vec::new());
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let out = spinfs(&["archive", store.to_str().unwrap(), "--wait"]);
                let text = String::from_utf8_lossy(&out.stdout);
                if !out.status.success() {
                    errors.push(format!("{text}{}", stderr(&out)));
                } else if text.contains("sealed layer") {
                    sealed += 1;
                } else {
                    empty += 1;
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(100 + (i * 37) % 101));
            }
            (sealed, empty, errors)
        })
    };

    let start = Instant::now();
    let out = Command::new(repo().join("scripts/pjdfstest.sh"))
        .arg(&dir)
        .arg(repo().join("tests/pjdfstest/spinfs.expected"))
        .output()
        .expect("run pjdfstest.sh");
    stop.store(true, Ordering::Relaxed);
    let (sealed, empty, errors) = sealer.join().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    let s = spinfs_ok(&["status", m.store.to_str().unwrap(), "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&s.stdout).unwrap();
    let archived = s["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["kind"] == "archived")
        .count();
    println!(
        "pjdfstest ran {:.1}s under {sealed} seals ({empty} requests found nothing to seal); \
         {archived} archived layers",
        start.elapsed().as_secs_f64()
    );
    assert!(errors.is_empty(), "spinfs archive failed: {errors:#?}");
    assert!(
        out.status.success(),
        "pjdfstest failures differ from the expected set:\n{text}"
    );
    // The run must really have been archived under: many seals with content.
    assert!(sealed >= 5, "only {sealed} seals happened during the run");
}
