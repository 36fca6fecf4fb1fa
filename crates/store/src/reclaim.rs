//! Deleting a sealed generation's tree from the SSD without stalling the mount's own I/O.
//!
//! Unlinking a large file frees all its blocks at once. On a filesystem mounted with online
//! discard the freed extents go to the disk as discards of up to an extent each (128 MiB on
//! ext4), back to back, and every write or flush of the mount queues behind them (measured
//! with block tracepoints on ext4 without a journal: a 2 GiB generation's unlink issued ~20
//! discards of ~120 MiB taking ~20 ms each; the mount's fdatasyncs took 20-45 ms for the
//! half second it lasted, against 0.7 ms otherwise). A journalled filesystem does the same
//! work in one commit.
//!
//! So a large file is first drained: its data is punched out from the start in steps of
//! `step` bytes (holes skipped with SEEK_DATA), resting after each step `rest` times as long
//! as the step took, so that the disk spends at most 1 / (1 + rest) of its time on the
//! deletion and anything of the mount waits behind one step's discard at most. Each step
//! first waits for a sync of the mount under way (`spinfs_media::fgsync`). Then the tree is
//! removed as before. Smaller steps cost less per sync (a 4 KiB writer with an fdatasync
//! every 16 writes on the VM's ext4, beside a 2 GiB file drained with rest 1: sync p84
//! 2.5 ms with 8 MiB steps, 1.15 ms with 4 MiB, 0.9 ms with 1 MiB, 0.65-0.7 ms alone; the
//! drain took 1.2, 1.3 and 2.0-2.2 s).
//!
//! Only a file nobody can read any more is drained: the deleter takes a write lease on it
//! (which the kernel grants only while no other open file description of the inode exists:
//! no daemon handle, no passthrough backing file, no other process), unlinks its name, and
//! drains it only when that was its last name (st_nlink 0; a hard link elsewhere keeps its
//! data). The lease is checked before every step: an open that breaks it (which can only
//! come through a descriptor held on the inode since, not through a name) stops the drain.

use crate::sys::{self, Errno, SysResult};
use spinfs_media::ForegroundSyncs;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// How a tree is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// Bytes punched out of a large file per step; 0 = no draining (plain removal).
    pub step: u64,
    /// Rest after a step, as a multiple of the time the step took.
    pub rest: u32,
}

/// fcntl's F_SETSIG (Linux; not in the libc crate).
const F_SETSIG: libc::c_int = 10;

/// Longest rest after one step, whatever the step took.
const MAX_REST: Duration = Duration::from_millis(200);

/// What a paced removal did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RemoveStats {
    /// Files drained before their removal.
    pub drained_files: u64,
    /// Bytes punched out of them (allocated data, holes skipped).
    pub drained_bytes: u64,
    /// Steps taken.
    pub steps: u64,
    /// Large files left whole to the plain removal: open elsewhere, another name, or a
    /// filesystem without leases or hole punching.
    pub skipped_files: u64,
}

/// Removes the tree at `root` (which must exist), draining its large files first as `pace`
/// says. `urgent` is asked before every step and rest: while it answers true (writers wait
/// for the room), steps follow each other without rest; otherwise each step first waits for
/// a sync of `syncs` under way (see `spinfs_media::fgsync`).
pub fn remove_tree(
    root: &Path,
    pace: Pace,
    urgent: &dyn Fn() -> bool,
    syncs: Option<&ForegroundSyncs>,
) -> std::io::Result<RemoveStats> {
    let mut stats = RemoveStats::default();
    if pace.step > 0 {
        let yields = Yields { urgent, syncs };
        drain_tree(root, pace, &yields, &mut stats).map_err(|e| {
            std::io::Error::new(
                std::io::Error::from_raw_os_error(e.0).kind(),
                format!("draining {}: {e}", root.display()),
            )
        })?;
    }
    std::fs::remove_dir_all(root)?;
    Ok(stats)
}

/// What a drain gives way to.
struct Yields<'a> {
    urgent: &'a dyn Fn() -> bool,
    syncs: Option<&'a ForegroundSyncs>,
}

/// Walks the tree by directory descriptors (any depth) and drains every regular file with
/// at least two steps of allocated data.
fn drain_tree(
    root: &Path,
    pace: Pace,
    yields: &Yields<'_>,
    stats: &mut RemoveStats,
) -> SysResult<()> {
    let croot = CString::new(root.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    // SAFETY: AT_FDCWD is a valid directory descriptor for *at calls.
    let cwd = unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) };
    let root_fd = sys::openat(cwd, &croot, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let mut dirs: Vec<OwnedFd> = vec![root_fd];
    while let Some(dir) = dirs.pop() {
        for name in sys::dir_names(dir.as_fd())? {
            let cname = CString::new(name).map_err(|_| Errno::EINVAL)?;
            let st = match sys::fstatat(dir.as_fd(), &cname) {
                Ok(st) => st,
                Err(Errno::ENOENT) => continue,
                Err(e) => return Err(e),
            };
            match st.st_mode & libc::S_IFMT {
                libc::S_IFDIR => {
                    dirs.push(sys::openat(
                        dir.as_fd(),
                        &cname,
                        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                        0,
                    )?);
                }
                libc::S_IFREG if (st.st_blocks as u64) * 512 >= 2 * pace.step => {
                    match drain_file(dir.as_fd(), &cname, pace, yields, stats) {
                        Ok(true) => stats.drained_files += 1,
                        Ok(false) => stats.skipped_files += 1,
                        Err(e) => return Err(e),
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn fcntl(fd: BorrowedFd<'_>, cmd: libc::c_int, arg: libc::c_int) -> SysResult<libc::c_int> {
    // SAFETY: fcntl with an integer argument on a descriptor we hold.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), cmd, arg) };
    if r < 0 { Err(Errno::last()) } else { Ok(r) }
}

/// Whether our write lease on `fd` still stands (no open of the inode is waiting for it).
fn lease_held(fd: BorrowedFd<'_>) -> bool {
    fcntl(fd, libc::F_GETLEASE, 0).is_ok_and(|l| l == libc::F_WRLCK)
}

/// Drains and unlinks `dir/name` when nobody else can read it (see the module comment).
/// Ok(false): left alone for the plain removal.
fn drain_file(
    dir: BorrowedFd<'_>,
    name: &std::ffi::CStr,
    pace: Pace,
    yields: &Yields<'_>,
    stats: &mut RemoveStats,
) -> SysResult<bool> {
    // O_NONBLOCK: a lease held by someone else fails the open instead of waiting for it.
    let fd = match sys::openat(
        dir,
        name,
        libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
        0,
    ) {
        Ok(fd) => fd,
        // Immutable, busy as a running binary, locked by a lease, gone: the plain removal
        // deals with it (and reports what it cannot remove).
        Err(_) => return Ok(false),
    };
    // A lease break must not end the daemon: it would send SIGIO (whose default action is
    // to terminate) to the lease holder. Taking the lease makes this process the signal
    // owner; the signal is made one that is ignored by default, and the owner is cleared
    // right after. The lease is only ever looked at with F_GETLEASE.
    if fcntl(fd.as_fd(), F_SETSIG, libc::SIGWINCH).is_err()
        || fcntl(fd.as_fd(), libc::F_SETLEASE, libc::F_WRLCK).is_err()
    {
        return Ok(false);
    }
    let _ = fcntl(fd.as_fd(), libc::F_SETOWN, 0);
    let release = |fd: &OwnedFd| {
        let _ = fcntl(fd.as_fd(), libc::F_SETLEASE, libc::F_UNLCK);
    };
    if let Err(e) = sys::unlinkat(dir, name, 0) {
        release(&fd);
        return if e == Errno::ENOENT {
            Ok(false)
        } else {
            Err(e)
        };
    }
    // Another name keeps the data (a hard link): not ours to drain. An open that came
    // between the lease and the unlink found the name: it must see the whole file.
    if sys::fstat(fd.as_fd()).map_or(true, |st| st.st_nlink != 0) || !lease_held(fd.as_fd()) {
        release(&fd);
        return Ok(false);
    }
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    let mut at: i64 = 0;
    let mut drained = false;
    loop {
        let start = match sys::lseek(fd.as_fd(), at, libc::SEEK_DATA) {
            Ok(s) => s,
            Err(e) if e.0 == libc::ENXIO => break, // no data from `at` on
            Err(_) => break,
        };
        let hole = sys::lseek(fd.as_fd(), start, libc::SEEK_HOLE).unwrap_or(i64::MAX);
        let end = hole.min(start.saturating_add(pace.step as i64));
        if end <= start || !lease_held(fd.as_fd()) {
            break;
        }
        if let Some(syncs) = yields.syncs
            && !(yields.urgent)()
        {
            syncs.yield_now();
        }
        let t = Instant::now();
        if sys::fallocate(fd.as_fd(), mode, start as u64, (end - start) as u64).is_err() {
            // No hole punching here: the plain unlink (on close) frees the rest.
            break;
        }
        let took = t.elapsed();
        drained = true;
        stats.steps += 1;
        stats.drained_bytes += (end - start) as u64;
        at = end;
        if pace.rest > 0 && !(yields.urgent)() {
            std::thread::sleep((took * pace.rest).min(MAX_REST));
        }
    }
    release(&fd);
    Ok(drained)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;

    const STEP: u64 = 64 << 10;
    const PACE: Pace = Pace {
        step: STEP,
        rest: 1,
    };

    /// A scratch directory on the disk the store would be on (removed when dropped).
    fn scratch(tag: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("spinfs-reclaim-{tag}"))
            .tempdir_in("/var/tmp")
            .unwrap()
    }

    fn write_file(path: &Path, bytes: usize) {
        let mut f = std::fs::File::create(path).unwrap();
        let block: Vec<u8> = (0..64 << 10).map(|i| (i % 251) as u8 + 1).collect();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(block.len());
            f.write_all(&block[..n]).unwrap();
            left -= n;
        }
        f.sync_all().unwrap();
    }

    /// Supports leases and hole punching (where the tests can say anything).
    fn capable(dir: &Path) -> bool {
        let p = dir.join("probe");
        write_file(&p, 2 * STEP as usize);
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        let ok = fcntl(f.as_fd(), libc::F_SETLEASE, libc::F_WRLCK).is_ok()
            && sys::fallocate(
                f.as_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                STEP,
            )
            .is_ok();
        let _ = fcntl(f.as_fd(), libc::F_SETLEASE, libc::F_UNLCK);
        drop(f);
        std::fs::remove_file(&p).unwrap();
        ok
    }

    #[test]
    fn drains_large_files_and_removes_the_tree() {
        let dir = scratch("tree");
        let root = dir.path();
        let tree = root.join("gen");
        std::fs::create_dir_all(tree.join("a/b/c")).unwrap();
        write_file(&tree.join("big"), 10 * STEP as usize + 123);
        write_file(&tree.join("a/b/c/deep"), 3 * STEP as usize);
        write_file(&tree.join("a/small"), 1000);
        std::os::unix::fs::symlink("big", tree.join("a/link")).unwrap();
        let can = capable(root);
        let stats = remove_tree(&tree, PACE, &|| false, None).unwrap();
        assert!(!tree.exists());
        if can {
            assert_eq!(stats.drained_files, 2, "{stats:?}");
            assert_eq!(stats.skipped_files, 0, "{stats:?}");
            // Allocated bytes, rounded to blocks: at least the data written.
            assert!(stats.drained_bytes >= 13 * STEP, "{stats:?}");
            // Never more than one step at a time.
            assert!(stats.steps >= 13, "{stats:?}");
        }
    }

    #[test]
    fn an_open_file_keeps_its_data() {
        let dir = scratch("open");
        let root = dir.path();
        let tree = root.join("gen");
        std::fs::create_dir_all(&tree).unwrap();
        let len = 6 * STEP as usize;
        write_file(&tree.join("held"), len);
        write_file(&tree.join("free"), len);
        let can = capable(root);
        // A reader holds it open (as a daemon handle or a passthrough backing file does).
        let held = std::fs::File::open(tree.join("held")).unwrap();
        let stats = remove_tree(&tree, PACE, &|| false, None).unwrap();
        assert!(!tree.exists());
        if can {
            assert_eq!(stats.drained_files, 1, "{stats:?}");
            assert_eq!(stats.skipped_files, 1, "{stats:?}");
        }
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut &held, &mut back).unwrap();
        assert_eq!(back.len(), len);
        assert!(back.iter().all(|&b| b != 0), "the open file lost data");
    }

    #[test]
    fn a_hard_link_outside_keeps_the_data() {
        let dir = scratch("link");
        let root = dir.path();
        let tree = root.join("gen");
        std::fs::create_dir_all(&tree).unwrap();
        let len = 6 * STEP as usize;
        write_file(&tree.join("shared"), len);
        std::fs::hard_link(tree.join("shared"), root.join("outside")).unwrap();
        let stats = remove_tree(&tree, PACE, &|| false, None).unwrap();
        assert!(!tree.exists());
        assert_eq!(stats.drained_files, 0, "{stats:?}");
        let back = std::fs::read(root.join("outside")).unwrap();
        assert_eq!(back.len(), len);
        assert!(back.iter().all(|&b| b != 0), "the other name lost data");
        assert_eq!(std::fs::metadata(root.join("outside")).unwrap().nlink(), 1);
    }

    #[test]
    fn hard_links_inside_are_drained_once() {
        let dir = scratch("inner");
        let root = dir.path();
        let tree = root.join("gen");
        std::fs::create_dir_all(tree.join("d")).unwrap();
        write_file(&tree.join("one"), 4 * STEP as usize);
        std::fs::hard_link(tree.join("one"), tree.join("d/two")).unwrap();
        let can = capable(root);
        let stats = remove_tree(&tree, PACE, &|| false, None).unwrap();
        assert!(!tree.exists());
        if can {
            // The first name visited is not the last one: left to the walk's later visit.
            assert_eq!(stats.drained_files, 1, "{stats:?}");
            assert_eq!(stats.skipped_files, 1, "{stats:?}");
        }
    }

    #[test]
    fn sparse_files_cost_steps_only_where_data_is() {
        let dir = scratch("sparse");
        let root = dir.path();
        let tree = root.join("gen");
        std::fs::create_dir_all(&tree).unwrap();
        let f = std::fs::File::create(tree.join("sparse")).unwrap();
        let data = vec![7u8; 2 * STEP as usize];
        std::os::unix::fs::FileExt::write_all_at(&f, &data, 1 << 40).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let can = capable(root);
        let stats = remove_tree(&tree, PACE, &|| false, None).unwrap();
        assert!(!tree.exists());
        if can {
            assert_eq!(stats.drained_files, 1, "{stats:?}");
            assert!(stats.steps <= 3, "{stats:?}");
        }
    }

    #[test]
    fn step_zero_is_a_plain_removal() {
        let dir = scratch("plain");
        let root = dir.path();
        let tree = root.join("gen");
        std::fs::create_dir_all(&tree).unwrap();
        write_file(&tree.join("big"), 8 * STEP as usize);
        let stats = remove_tree(&tree, Pace { step: 0, rest: 1 }, &|| false, None).unwrap();
        assert!(!tree.exists());
        assert_eq!(stats, RemoveStats::default());
    }

    #[test]
    fn urgent_skips_the_rests() {
        let dir = scratch("urgent");
        let root = dir.path();
        let tree = root.join("gen");
        std::fs::create_dir_all(&tree).unwrap();
        write_file(&tree.join("big"), 8 * STEP as usize);
        let asked = std::cell::Cell::new(0u32);
        let can = capable(root);
        let stats = remove_tree(
            &tree,
            PACE,
            &|| {
                asked.set(asked.get() + 1);
                true
            },
            None,
        )
        .unwrap();
        assert!(!tree.exists());
        if can {
            assert_eq!(u64::from(asked.get()), stats.steps);
        }
    }

    #[test]
    fn each_step_yields_to_a_sync_under_way() {
        let dir = scratch("yields");
        let root = dir.path();
        let tree = root.join("gen");
        std::fs::create_dir_all(&tree).unwrap();
        write_file(&tree.join("big"), 4 * STEP as usize);
        let can = capable(root);
        let syncs = ForegroundSyncs::new(spinfs_media::fgsync::DEFAULT_MAX_YIELD);
        let sync = syncs.begin();
        let stats = remove_tree(&tree, PACE, &|| false, Some(&syncs)).unwrap();
        assert!(!tree.exists());
        if can {
            // A sync that never ends holds each step for the longest yield.
            assert_eq!(stats.steps, 4);
            assert_eq!(syncs.stats().yields, 4);
            assert!(syncs.stats().yielded >= 4 * spinfs_media::fgsync::DEFAULT_MAX_YIELD);
        }
        // Writers waiting for room: no yield.
        let tree = root.join("gen2");
        std::fs::create_dir_all(&tree).unwrap();
        write_file(&tree.join("big"), 4 * STEP as usize);
        remove_tree(&tree, PACE, &|| true, Some(&syncs)).unwrap();
        assert_eq!(syncs.stats().yields, if can { 4 } else { 0 });
        drop(sync);
    }
}
