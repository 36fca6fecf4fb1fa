//! Flow control of daemon-served writes (`Volume::throttle`) on a small SSD.
//!
//! A writer must not run the SSD out of space while room is coming: a seal under way, a
//! sealed generation whose tree is still being deleted, or a writable tree big enough to be
//! sealed (the archiver is woken for it). CI once saw `cp` of a file larger than the SSD fail
//! with ENOSPC: writers were let go as soon as the sealed layer was swapped in, before its
//! frozen tree had been deleted, and writes to plain (not stacked) files were not counted
//! until the archiver's next periodic check. These tests drive the volume directly on a
//! loop-mounted ext4, with an SSD filler standing in for the rest of the store.

use spinfs_store::Volume;
use spinfs_store::volume::{Caller, ROOT_INO};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn caller() -> Caller {
    Caller {
        uid: 0,
        gid: 0,
        pid: 1,
    }
}

/// A loop-mounted ext4 of `mib` MiB; unmounted on drop.
struct SmallSsd {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl SmallSsd {
    fn new(mib: u64) -> SmallSsd {
        let dir = tempfile::Builder::new()
            .prefix("flow")
            .tempdir_in("/var/tmp")
            .unwrap();
        let img = dir.path().join("ssd.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(mib * MIB)
            .unwrap();
        let ok = |c: &mut std::process::Command| {
            let out = c.output().unwrap();
            assert!(out.status.success(), "{c:?}: {out:?}");
        };
        ok(std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&img));
        let mnt = dir.path().join("ssd");
        std::fs::create_dir(&mnt).unwrap();
        ok(std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt));
        SmallSsd { _dir: dir, mnt }
    }

    fn free(&self) -> u64 {
        let st = nix_statvfs(&self.mnt);
        st.0 * st.1
    }

    /// Fills the SSD until `left` bytes are free (a file outside the trees).
    fn fill_to(&self, left: u64) {
        let free = self.free();
        assert!(free > left, "only {free} bytes free");
        let f = std::fs::File::create(self.mnt.join("filler")).unwrap();
        use std::os::unix::fs::FileExt;
        let block = vec![0x5au8; MIB as usize];
        let mut pos = 0;
        while pos < free - left {
            let n = (free - left - pos).min(MIB);
            f.write_all_at(&block[..n as usize], pos).unwrap();
            pos += n;
        }
        f.sync_all().unwrap();
        assert!(self.free() < left + 2 * MIB, "free {}", self.free());
    }

    fn unfill(&self) {
        std::fs::remove_file(self.mnt.join("filler")).unwrap();
    }
}

impl Drop for SmallSsd {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.mnt).status();
    }
}

/// (available blocks, fragment size) of the filesystem holding `p`.
fn nix_statvfs(p: &Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    (st.f_bavail as u64, st.f_frsize as u64)
}

/// A volume on a loop-mounted ext4 of 96 MiB with flow control for `threshold`.
fn small_volume(threshold: u64) -> (SmallSsd, PathBuf, Arc<Volume>) {
    let ssd = SmallSsd::new(96);
    let root = ssd.mnt.join("store");
    let vol = Arc::new(volume(&root));
    vol.set_flow_control(threshold);
    (ssd, root, vol)
}

fn volume(root: &Path) -> Volume {
    let tree = root.join("gens/1/tree");
    std::fs::create_dir_all(&tree).unwrap();
    Volume::new(&tree, &root.join("gens/1/work"), 1, Vec::new()).unwrap()
}

/// Creates `name` open for daemon-served writing; returns its handle.
fn create(vol: &Volume, name: &str) -> u64 {
    let (_, fh, _) = vol
        .create(
            ROOT_INO,
            OsStr::new(name),
            0o644,
            0o022,
            libc::O_RDWR,
            &caller(),
            true,
        )
        .unwrap();
    fh
}

fn write_mib(vol: &Volume, fh: u64, from_mib: u64, mib: u64) {
    let block = vec![7u8; MIB as usize];
    for i in from_mib..from_mib + mib {
        assert_eq!(vol.write(fh, i * MIB, &block, false).unwrap(), block.len());
    }
}

fn kicks(vol: &Volume) -> Arc<AtomicU64> {
    let n = Arc::new(AtomicU64::new(0));
    let m = n.clone();
    vol.set_seal_kick(Box::new(move || {
        m.fetch_add(1, Ordering::Relaxed);
    }));
    n
}

/// A write in a thread; `done` turns true when it returns.
fn writer(vol: &Arc<Volume>, fh: u64, at: u64) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let done = Arc::new(AtomicBool::new(false));
    let (v, d) = (vol.clone(), done.clone());
    let t = std::thread::spawn(move || {
        v.write(fh, at, &vec![1u8; 1 << 20], false).unwrap();
        d.store(true, Ordering::Relaxed);
    });
    (done, t)
}

fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let end = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Daemon-served writes to a plain file of the writable tree are counted as they land: the
/// tree reaching the threshold wakes the archiver once, at the write that crosses it.
#[test]
fn reaching_the_threshold_wakes_the_archiver_at_once() {
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let vol = volume(tmp.path());
    vol.set_flow_control(8 * MIB);
    let kicked = kicks(&vol);
    let fh = create(&vol, "f");
    write_mib(&vol, fh, 0, 7);
    assert_eq!(kicked.load(Ordering::Relaxed), 0);
    write_mib(&vol, fh, 7, 1);
    assert_eq!(
        kicked.load(Ordering::Relaxed),
        1,
        "the crossing write wakes it"
    );
    write_mib(&vol, fh, 8, 4);
    assert_eq!(kicked.load(Ordering::Relaxed), 1, "once per crossing");
    assert_eq!(vol.upper_bytes(), 12 * MIB);
    vol.release(fh);
}

/// After a seal swaps its layer in, its frozen tree still holds the SSD until it is
/// deleted: a writer short of room waits for that, instead of writing into ENOSPC.
#[test]
fn short_writers_wait_until_the_sealed_tree_is_deleted() {
    let (ssd, root, vol) = small_volume(8 * MIB); // writers wait below 12 MiB free
    let old = create(&vol, "old");
    write_mib(&vol, old, 0, 6);
    vol.release(old);
    let tree2 = root.join("gens/2/tree");
    std::fs::create_dir_all(&tree2).unwrap();
    vol.freeze(2, &tree2, &root.join("gens/2/work")).unwrap();
    let fh = create(&vol, "new");
    ssd.fill_to(6 * MIB);
    // The seal is done: its layer (none here) takes the frozen generation's place.
    vol.sealed(1, None).unwrap();
    let (done, t) = writer(&vol, fh, 0);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !done.load(Ordering::Relaxed),
        "a writer with 6 MiB free went on while the sealed tree was still on the SSD"
    );
    assert!(vol.writers_waiting());
    std::fs::remove_dir_all(root.join("gens/1")).unwrap();
    ssd.unfill();
    vol.generation_dropped();
    wait_for("the writer to go on", || done.load(Ordering::Relaxed));
    t.join().unwrap();
    assert!(!vol.writers_waiting());
    vol.release(fh);
}

/// Short of room with a writable tree worth sealing and no seal under way, a writer waits
/// and wakes the archiver, which is told to seal before the threshold.
#[test]
fn short_writers_ask_for_a_seal_before_the_threshold() {
    let (ssd, _root, vol) = small_volume(16 * MIB); // writers wait below 24 MiB free
    let kicked = kicks(&vol);
    let fh = create(&vol, "f");
    write_mib(&vol, fh, 0, 4); // under the threshold, over an eighth of the limit
    assert!(!vol.seal_for_room());
    ssd.fill_to(20 * MIB);
    let (done, t) = writer(&vol, fh, 4 * MIB);
    wait_for("the writer to wait", || vol.writers_waiting());
    assert!(!done.load(Ordering::Relaxed));
    assert!(
        kicked.load(Ordering::Relaxed) >= 1,
        "the archiver was not woken"
    );
    assert!(vol.seal_for_room(), "the archiver is not asked to seal");
    ssd.unfill();
    wait_for("the writer to go on", || done.load(Ordering::Relaxed));
    t.join().unwrap();
    assert!(!vol.seal_for_room());
    vol.release(fh);
}

/// A nearly empty writable tree on an SSD filled by something else: sealing it would not
/// make room, so the writer neither waits nor asks for a seal.
#[test]
fn a_nearly_empty_tree_is_not_sealed_for_room() {
    let (ssd, _root, vol) = small_volume(16 * MIB);
    let kicked = kicks(&vol);
    let fh = create(&vol, "f");
    ssd.fill_to(20 * MIB);
    write_mib(&vol, fh, 0, 1);
    assert!(!vol.writers_waiting());
    assert_eq!(kicked.load(Ordering::Relaxed), 0);
    vol.release(fh);
}

/// The writable tree's byte count stays exact while writers open, write and close files as
/// freezes carry them over: a handle released while a freeze carried its file took the
/// file's old size off the new tree's total, so the archiver saw less than the threshold
/// while the tree held more and never sealed (SPEC problem 1's test timed out 7 runs in 40
/// under load).
#[test]
fn the_tree_count_stays_exact_across_freezes_of_files_being_written() {
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let root = tmp.path().to_path_buf();
    let vol = Arc::new(volume(&root));
    vol.set_flow_control(1 << 40);
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (vol, stop) = (vol.clone(), stop.clone());
            std::thread::spawn(move || {
                // One write per file: a later write into the part a freeze put below would
                // copy it up from the frozen file, which the empty "layer" below drops.
                let block = vec![3u8; 256 << 10];
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let fh = create(&vol, &format!("w{w}.{i}"));
                    vol.write(fh, 0, &block, false).unwrap();
                    vol.release(fh);
                    i += 1;
                }
            })
        })
        .collect();
    for g in 2..40u64 {
        std::thread::sleep(Duration::from_millis(5));
        let tree = root.join(format!("gens/{g}/tree"));
        std::fs::create_dir_all(&tree).unwrap();
        vol.freeze(g, &tree, &root.join(format!("gens/{g}/work")))
            .unwrap();
        // Sealed at once (as an empty layer: the count is about the new tree only).
        vol.sealed(g - 1, None).unwrap();
        vol.generation_dropped();
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let tree = root.join("gens/39/tree");
    let on_disk = spinfs_store::status::tree_usage(&tree).unwrap().bytes;
    assert_eq!(
        vol.upper_bytes(),
        on_disk,
        "the count drifted from the tree"
    );
}
