//! The filesystem as the mount sees it: a POSIX API keyed by inode numbers.
//!
//! Today the volume is the writable generation only: a real directory tree on the SSD, every
//! known inode held by an `O_PATH` descriptor so that it stays reachable after a rename or an
//! unlink (SPEC problem 3), and every regular file a real file that the FUSE adapter can hand
//! to the kernel for passthrough I/O. Archived layers will sit below this tree.
//!
//! Inode numbers: the root is 1; any other inode of generation G is `G << 32 | backing inode`.
//! Backing (ext4) inode numbers are 32-bit and stable, and an inode number cannot be reused
//! while we hold a descriptor of the inode, so numbers stay stable for the life of a file and
//! across remounts, and readdir's d_ino is derived the same way as st_ino.

use crate::archive::ArchivedLayer;
use crate::lower::{
    FrozenTree, LowerPart, cstr, lower_lookup, tree_is_opaque, tree_is_whiteout, tree_recorded_ino,
};
use crate::markers;
use crate::sys::{self, Errno, FsCreds, SysResult};
use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

mod stacking;
#[cfg(test)]
mod tests;
pub use stacking::StackStats;
use stacking::{StackCounters, StackedFile};

/// The root directory's inode number.
pub const ROOT_INO: u64 = 1;

/// File types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Regular,
    Directory,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl FileKind {
    pub fn from_mode(mode: u32) -> FileKind {
        match mode & libc::S_IFMT {
            libc::S_IFDIR => FileKind::Directory,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFCHR => FileKind::CharDevice,
            libc::S_IFBLK => FileKind::BlockDevice,
            _ => FileKind::Regular,
        }
    }

    fn from_dtype(t: u8) -> Option<FileKind> {
        Some(match t {
            libc::DT_DIR => FileKind::Directory,
            libc::DT_LNK => FileKind::Symlink,
            libc::DT_FIFO => FileKind::Fifo,
            libc::DT_SOCK => FileKind::Socket,
            libc::DT_CHR => FileKind::CharDevice,
            libc::DT_BLK => FileKind::BlockDevice,
            libc::DT_REG => FileKind::Regular,
            _ => return None,
        })
    }
}

/// A timestamp: seconds and nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: u32,
}

/// Attributes of an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub kind: FileKind,
    /// Permission bits including set-id and sticky bits (mode & 0o7777).
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    /// Device number in the C library's encoding.
    pub rdev: u64,
    pub blksize: u32,
}

impl Attr {
    /// The attributes a backing-filesystem stat reports, under inode number `ino`.
    pub fn from_stat(st: &libc::stat, ino: u64) -> Attr {
        let ts = |sec: i64, nsec: i64| Timestamp {
            sec,
            nsec: nsec as u32,
        };
        Attr {
            ino,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: ts(st.st_atime, st.st_atime_nsec),
            mtime: ts(st.st_mtime, st.st_mtime_nsec),
            ctime: ts(st.st_ctime, st.st_ctime_nsec),
            kind: FileKind::from_mode(st.st_mode),
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev,
            blksize: st.st_blksize as u32,
        }
    }
}

/// A time to set: now, or a given instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetTime {
    Now,
    At(Timestamp),
}

/// Attribute changes of a setattr request; `None` leaves a field alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// Who asks.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// One directory entry for readdir.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub ino: u64,
    /// Cookie to continue reading after this entry.
    pub next: i64,
    pub kind: FileKind,
    pub name: Vec<u8>,
}

/// Filesystem-wide figures for statfs.
#[derive(Debug, Clone, Copy)]
pub struct FsStats {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// Where an object lives in the stack.
#[derive(Clone, Default)]
struct Placement {
    /// `O_PATH` descriptor in the writable tree.
    upper: Option<Arc<OwnedFd>>,
    /// Non-directories: the topmost lower instance when there is no upper one.
    /// Directories: every lower part that merges below the upper one (down to an opaque one).
    lower: Vec<LowerPart>,
}

impl Placement {
    fn is_upper_only(&self) -> bool {
        self.upper.is_some() && self.lower.is_empty()
    }
}

/// A name resolved through the stack.
struct Resolved {
    ino: u64,
    kind: FileKind,
    place: Placement,
}

struct NodeState {
    place: Placement,
    /// Stack epoch `place` was resolved in.
    epoch: u64,
    /// The name this inode was last reached by (copy-ups recreate it there).
    parent: u64,
    name: Vec<u8>,
}

struct Node {
    kind: FileKind,
    lookups: AtomicU64,
    /// Whether this directory's upper part has a default POSIX ACL: unknown, no or yes.
    /// Cached because every create asks, and only our own setxattr/removexattr change it.
    default_acl: AtomicU8,
    st: RwLock<NodeState>,
}

const ACL_UNKNOWN: u8 = 0;
const ACL_NONE: u8 = 1;
const ACL_PRESENT: u8 = 2;
const DEFAULT_ACL_XATTR: &[u8] = b"system.posix_acl_default";

enum HandleKind {
    /// A file or directory of the writable tree.
    Upper(OwnedFd),
    /// A file that lives only in an archived layer.
    Lower(LowerPart),
    /// A directory with lower parts: its merged listing, taken at opendir.
    Merged(Vec<DirEntry>),
    /// A stacked file (chunks above and below), served by the daemon.
    Stacked(Arc<StackedFile>),
}

/// An open file or directory.
pub struct Handle {
    pub ino: u64,
    kind: HandleKind,
    /// Opened for writing: the file must stay in the writable tree across a freeze.
    writable: bool,
    /// File size last counted into the writable layer's total.
    counted: AtomicU64,
    /// Bytes written through this handle since flow control last looked (see `throttle`).
    unchecked: AtomicU64,
    /// Serialises getdents on directory handles (the position is the descriptor's).
    dir_lock: Mutex<()>,
    /// How entries of the tree an upper directory handle reads are numbered: that of the
    /// stack it was opened in, which stays right when a freeze makes that tree the frozen
    /// generation before the handle is read.
    numbering: TreeNumbering,
    /// An upper directory handle whose tree was sealed: its listing, read before the tree
    /// was deleted (see `Volume::list_handles_of`).
    listing: Mutex<Option<Vec<DirEntry>>>,
}

/// How the entries of one SSD tree are numbered (see `Volume::upper_ino`).
#[derive(Clone, Copy)]
struct TreeNumbering {
    generation: u64,
    root_backing_ino: u64,
    may_have_recorded: bool,
}

impl TreeNumbering {
    fn of(stack: &Stack) -> TreeNumbering {
        TreeNumbering {
            generation: stack.generation,
            root_backing_ino: stack.root_backing_ino,
            may_have_recorded: stack.may_have_recorded(),
        }
    }

    /// The inode number of an entry of this tree.
    fn ino(&self, fd: BorrowedFd<'_>, st: &libc::stat) -> u64 {
        if st.st_ino == self.root_backing_ino {
            return ROOT_INO;
        }
        // Copy-ups and moved files record their number.
        let recorded = if self.may_have_recorded {
            tree_recorded_ino(fd)
        } else {
            None
        };
        crate::seal::generation_ino(self.generation, st.st_ino, recorded)
    }
}

impl Handle {
    /// The backing descriptor, for passthrough registration by the FUSE adapter; `None` when
    /// the daemon must serve the I/O (archived data).
    pub fn backing_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.kind {
            HandleKind::Upper(fd) => Some(fd.as_fd()),
            _ => None,
        }
    }

    /// Whether the daemon serves this handle's data from an archived layer (head cache,
    /// unit cache, media): the FUSE adapter opens such files with direct I/O so the kernel
    /// asks for exactly what the application reads (no readahead past a sniffed header).
    pub fn serves_archived(&self) -> bool {
        matches!(&self.kind, HandleKind::Lower(part) if part.is_archived())
    }

    fn fd(&self) -> SysResult<BorrowedFd<'_>> {
        match &self.kind {
            HandleKind::Upper(fd) => Ok(fd.as_fd()),
            _ => Err(Errno::EBADF),
        }
    }
}

/// The layers as they stand: the writable tree on top, then a generation frozen for sealing,
/// then the archived layers. Replaced as a whole (under the volume's lock) when a generation
/// is frozen or a seal completes; nodes notice by the epoch and re-resolve their placement.
struct Stack {
    epoch: u64,
    generation: u64,
    root_backing_ino: u64,
    /// `gens/G/work`: copy-ups and whiteouts are prepared here and renamed into place.
    work: Arc<OwnedFd>,
    frozen: Option<Arc<FrozenTree>>,
    /// Archived layers, newest first.
    archived: Vec<Arc<ArchivedLayer>>,
}

impl Stack {
    fn has_lowers(&self) -> bool {
        self.frozen.is_some() || !self.archived.is_empty()
    }

    /// Whether entries of the writable tree may carry a recorded inode number: copy-ups
    /// (which need lower layers) and files moved on from a frozen generation (so any
    /// generation after the first one).
    fn may_have_recorded(&self) -> bool {
        self.has_lowers() || self.generation > 1
    }

    fn lower_roots(&self) -> SysResult<Vec<LowerPart>> {
        let mut out = Vec::new();
        // Overlayfs ignores opaque markers on layer roots: every root merges.
        if let Some(f) = &self.frozen {
            out.push(LowerPart::tree_root(f)?);
        }
        for layer in &self.archived {
            out.push(LowerPart::image_root(layer)?);
        }
        Ok(out)
    }
}

/// The mounted filesystem.
pub struct Volume {
    stack: RwLock<Arc<Stack>>,
    nodes: RwLock<HashMap<u64, Arc<Node>>>,
    /// Stacked files someone holds, by inode number (one shared state per inode).
    stacked: Mutex<HashMap<u64, std::sync::Weak<StackedFile>>>,
    /// log2 of the stacking granule (the store's chunk size).
    chunk_bits: AtomicU8,
    /// Chunk maps encoded longer than this go to a sidecar file (see `crate::stackmap`).
    stack_inline_max: std::sync::atomic::AtomicUsize,
    /// Next sidecar map id to try (ids are unique within a generation: created exclusively).
    next_map_id: AtomicU64,
    /// The archive threshold (0 = unknown, no flow control): the writable tree reaching it
    /// wakes the archiver through `seal_kick` at once rather than at its next periodic
    /// check, and daemon-served writers wait for room below `write_limit` free.
    seal_threshold: AtomicU64,
    /// Wakes the archiver (set by it; see `set_seal_kick`).
    seal_kick: std::sync::OnceLock<SealKick>,
    /// Sealed generations whose frozen tree is still being deleted from the SSD: their space
    /// is coming back, so short writers keep waiting for it (see `throttle`).
    dropping: AtomicU64,
    /// The frozen trees `sealed` swapped out, while anything may still hold them (see
    /// `sealed_tree_unused`).
    retired_trees: Mutex<Vec<(u64, std::sync::Weak<FrozenTree>)>>,
    /// Seals completed (and their frozen trees deleted), with a condition variable for
    /// writers waiting on one.
    seals_done: (Mutex<u64>, std::sync::Condvar),
    /// Writers waiting in `throttle` (the archiver seals at normal priority while any do).
    writers_waiting: AtomicU64,
    stack_counters: StackCounters,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    next_tmp: AtomicU64,
    /// Bytes of file data in the writable tree (see `upper_bytes`).
    upper_bytes: AtomicI64,
    /// Held shared by every operation that changes the writable tree, exclusively while a
    /// generation is frozen: nothing can land in a tree after it was frozen.
    gate: RwLock<()>,
    /// Odd while the gate is held exclusively (a freeze, seal or merge changing the stack),
    /// bumped at its start and end: operations that do not hold the gate (lookups, opendir)
    /// check it did not move while they resolved, see `stack_change_begin`.
    stack_seq: AtomicU64,
    /// Tests: called by `freeze` right after the stack swap, before files are moved and
    /// carried over (the window operations without the gate could see).
    #[cfg(test)]
    pub(crate) after_swap_hook: Mutex<Option<Box<dyn Fn() + Send>>>,
    /// Tests: called once by the next resolution of a stacked file's lower file, after it
    /// took the stack it resolves in.
    #[cfg(test)]
    pub(crate) before_lower_resolve_hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// See `set_sync_observer`.
    sync_observer: std::sync::OnceLock<SyncObserver>,
    /// See `set_foreground_syncs`.
    foreground_syncs: std::sync::OnceLock<Arc<spinfs_media::ForegroundSyncs>>,
}

/// Wakes the archiver: the writable tree reached the threshold or writers wait for room.
pub type SealKick = Box<dyn Fn() + Send + Sync>;

/// Told how long each fsync of a writable file took.
pub type SyncObserver = Box<dyn Fn(std::time::Duration) + Send + Sync>;

thread_local! {
    /// How many gate guards this thread holds (the gate is not re-entrant by itself).
    static GATE_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// A held gate (shared or exclusive), counted per thread.
enum GateGuard<'a> {
    Shared(#[allow(dead_code)] std::sync::RwLockReadGuard<'a, ()>),
    /// With the volume's `stack_seq`, made even again when the guard goes.
    Exclusive(
        #[allow(dead_code)] std::sync::RwLockWriteGuard<'a, ()>,
        &'a AtomicU64,
    ),
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        if let GateGuard::Exclusive(_, seq) = self {
            seq.fetch_add(1, Ordering::Release);
        }
        GATE_DEPTH.with(|d| d.set(d.get() - 1));
    }
}

/// Marks a directory of the writable tree opaque: lower layers' entries stay hidden below it.
fn set_opaque(dir: BorrowedFd<'_>) -> SysResult<()> {
    sys::setxattr_fd(dir, &cstr(markers::OPAQUE_XATTR), b"y", 0)
}

fn at_cwd() -> BorrowedFd<'static> {
    // SAFETY: AT_FDCWD is a valid directory descriptor for *at calls.
    unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) }
}

fn open_dir_path(path: &Path) -> SysResult<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    sys::openat(at_cwd(), &c, libc::O_PATH | libc::O_DIRECTORY, 0)
}

fn make_work_dir(work: &Path) -> SysResult<OwnedFd> {
    let c = CString::new(work.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    if let Err(e) = sys::mkdirat(at_cwd(), &c, 0o700)
        && e != Errno::EEXIST
    {
        return Err(e);
    }
    open_dir_path(work)
}

impl Volume {
    /// Opens the writable tree of generation `generation` (`tree`, with its work directory
    /// `work` beside it) over the archived layers `lowers`, newest first.
    pub fn new(
        tree: &Path,
        work: &Path,
        generation: u64,
        lowers: Vec<Arc<ArchivedLayer>>,
    ) -> SysResult<Volume> {
        let root_fd = open_dir_path(tree)?;
        let work_fd = make_work_dir(work)?;
        let st = sys::fstat(root_fd.as_fd())?;
        let stack = Stack {
            epoch: 0,
            generation,
            root_backing_ino: st.st_ino,
            work: Arc::new(work_fd),
            frozen: None,
            archived: lowers,
        };
        let root = Node {
            kind: FileKind::Directory,
            lookups: AtomicU64::new(1),
            default_acl: AtomicU8::new(ACL_UNKNOWN),
            st: RwLock::new(NodeState {
                place: Placement {
                    upper: Some(Arc::new(root_fd)),
                    lower: stack.lower_roots()?,
                },
                parent: ROOT_INO,
                name: Vec::new(),
                epoch: 0,
            }),
        };
        let mut nodes = HashMap::new();
        nodes.insert(ROOT_INO, Arc::new(root));
        Ok(Volume {
            stack: RwLock::new(Arc::new(stack)),
            nodes: RwLock::new(nodes),
            stacked: Mutex::new(HashMap::new()),
            chunk_bits: AtomicU8::new(spinfs_erofs::writer::DEFAULT_CHUNK_BITS),
            stack_inline_max: std::sync::atomic::AtomicUsize::new(
                crate::stackmap::DEFAULT_INLINE_MAX,
            ),
            next_map_id: AtomicU64::new(stacking::first_map_id()),
            seal_threshold: AtomicU64::new(0),
            seal_kick: std::sync::OnceLock::new(),
            dropping: AtomicU64::new(0),
            retired_trees: Mutex::new(Vec::new()),
            seals_done: (Mutex::new(0), std::sync::Condvar::new()),
            writers_waiting: AtomicU64::new(0),
            stack_counters: StackCounters::default(),
            handles: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            next_tmp: AtomicU64::new(0),
            upper_bytes: AtomicI64::new(0),
            gate: RwLock::new(()),
            stack_seq: AtomicU64::new(0),
            #[cfg(test)]
            after_swap_hook: Mutex::new(None),
            #[cfg(test)]
            before_lower_resolve_hook: Mutex::new(None),
            sync_observer: std::sync::OnceLock::new(),
            foreground_syncs: std::sync::OnceLock::new(),
        })
    }

    fn shared_gate(&self) -> GateGuard<'_> {
        let g = GateGuard::Shared(self.gate.read().unwrap());
        GATE_DEPTH.with(|d| d.set(d.get() + 1));
        g
    }

    fn exclusive_gate(&self) -> GateGuard<'_> {
        let g = GateGuard::Exclusive(self.gate.write().unwrap(), &self.stack_seq);
        self.stack_seq.fetch_add(1, Ordering::AcqRel);
        GATE_DEPTH.with(|d| d.set(d.get() + 1));
        g
    }

    /// For an operation that resolves names without holding the gate: waits until no freeze,
    /// seal or merge is changing the stack and returns the change count to pass to
    /// `stack_unchanged_since` once the resolution is done. `None` when this thread holds the
    /// gate already (nothing can change the stack under it).
    ///
    /// The stack epoch alone is not enough: a freeze swaps the stack first and only then moves
    /// the files open for writing and carries the stacked files over, and these may still
    /// change in the frozen tree until carried. A name resolved in that window would cache a
    /// frozen file's attributes (a size that is no longer true once carried) under the new
    /// epoch, and the carry would then copy up from that stale placement.
    fn stack_change_begin(&self) -> Option<u64> {
        if GATE_DEPTH.with(|d| d.get()) > 0 {
            return None;
        }
        loop {
            let seq = self.stack_seq.load(Ordering::Acquire);
            if seq.is_multiple_of(2) {
                return Some(seq);
            }
            // A change is under way: wait for it to end.
            drop(self.shared_gate());
        }
    }

    /// Whether no stack change started since `stack_change_begin` returned `seq`.
    fn stack_unchanged_since(&self, seq: Option<u64>) -> bool {
        seq.is_none_or(|s| self.stack_seq.load(Ordering::Acquire) == s)
    }

    fn stack(&self) -> Arc<Stack> {
        self.stack.read().unwrap().clone()
    }

    fn work(&self) -> Arc<OwnedFd> {
        self.stack().work.clone()
    }

    /// The generation of the writable tree.
    pub fn generation(&self) -> u64 {
        self.stack().generation
    }

    /// Freezes the writable generation: the tree `new_tree` of generation `new_gen` becomes
    /// the writable one, the old tree stays below it, read-only, until `sealed` replaces it
    /// with its archived layer. Files open for writing move into the new tree first (their
    /// descriptors stay valid: a rename keeps the inode), so nothing written after the freeze
    /// lands in the frozen generation. Operations wait only for the swap itself.
    pub fn freeze(&self, new_gen: u64, new_tree: &Path, new_work: &Path) -> SysResult<()> {
        let new_root = open_dir_path(new_tree)?;
        let new_work = make_work_dir(new_work)?;
        let new_root_ino = sys::fstat(new_root.as_fd())?.st_ino;
        let _gate = self.exclusive_gate();
        let root = self.node(ROOT_INO)?;
        let old = self.stack();
        if old.frozen.is_some() {
            return Err(Errno(libc::EBUSY));
        }
        let old_root = self.place(ROOT_INO, &root)?.upper.ok_or(Errno::EIO)?;
        // Files open for writing, with their descriptor and name in the old tree.
        let mut moving: Vec<u64> = self
            .handles
            .read()
            .unwrap()
            .values()
            .filter(|h| h.writable && matches!(h.kind, HandleKind::Upper(_)))
            .map(|h| h.ino)
            .collect();
        moving.sort_unstable();
        moving.dedup();
        let mut old_places = Vec::new();
        for ino in moving {
            let Ok(node) = self.node(ino) else { continue };
            let Ok(place) = self.place(ino, &node) else {
                continue;
            };
            let (parent, name) = {
                let st = node.st.read().unwrap();
                (st.parent, st.name.clone())
            };
            let Some(fd) = place.upper else { continue };
            let Ok(pnode) = self.node(parent) else {
                continue;
            };
            let Some(pfd) = self.place(parent, &pnode).ok().and_then(|p| p.upper) else {
                continue;
            };
            old_places.push((ino, fd, parent, pfd, name));
        }
        // Stacked files someone holds go on reading their lower files where they are until
        // they are carried over to the new tree below.
        let carried = self.pin_stacked(&old.archived);
        let frozen = Arc::new(FrozenTree {
            generation: old.generation,
            root_backing_ino: old.root_backing_ino,
            root: old_root,
            below: old.archived.clone(),
        });
        let stack = Arc::new(Stack {
            epoch: old.epoch + 1,
            generation: new_gen,
            root_backing_ino: new_root_ino,
            work: Arc::new(new_work),
            frozen: Some(frozen),
            archived: old.archived.clone(),
        });
        {
            // The root's placement and the stack change together: every re-resolution goes
            // through the root, so readers see the old or the new stack, never a mix.
            let mut st = root.st.write().unwrap();
            st.place = Placement {
                upper: Some(Arc::new(new_root)),
                lower: stack.lower_roots()?,
            };
            st.epoch = stack.epoch;
            *self.stack.write().unwrap() = stack;
        }
        #[cfg(test)]
        if let Some(hook) = &*self.after_swap_hook.lock().unwrap() {
            hook();
        }
        self.upper_bytes.store(0, Ordering::Relaxed);
        for (ino, fd, parent, old_pfd, name) in old_places {
            if let Err(e) = self.move_to_new_tree(ino, &fd, parent, &old_pfd, &name) {
                tracing::warn!(
                    ino,
                    "a file open for writing stays in the frozen generation: {e}"
                );
            }
        }
        self.carry_stacked_over(carried);
        Ok(())
    }

    /// Moves a file of the just-frozen tree into the new writable tree under the same name.
    fn move_to_new_tree(
        &self,
        ino: u64,
        fd: &Arc<OwnedFd>,
        parent: u64,
        old_pfd: &Arc<OwnedFd>,
        name: &[u8],
    ) -> SysResult<()> {
        let st = sys::fstat(fd.as_fd())?;
        if st.st_nlink == 0 {
            return Ok(()); // unlinked: lives on through its descriptors only
        }
        let cname = CString::new(name).map_err(|_| Errno::EIO)?;
        // The name it was last reached by may be gone while others remain (hard links).
        let at_name = sys::fstatat(old_pfd.as_fd(), &cname).is_ok_and(|a| a.st_ino == st.st_ino);
        // It keeps its number in the new generation.
        sys::setxattr_fd(fd.as_fd(), &cstr(markers::INO_XATTR), &ino.to_le_bytes(), 0)?;
        if at_name {
            let new_pfd = self.copy_up(parent)?;
            // The frozen generation is sealed as a layer over the archived ones: where the
            // name exists in them, the moved file leaves a whiteout behind, or the layer
            // would let the older entry show through it (stale data under a duplicate inode
            // number once the layers merge).
            let pnode = self.node(parent)?;
            let below = self.place(parent, &pnode)?.lower.iter().any(|part| {
                matches!(part, LowerPart::Image { .. })
                    && part.lookup(name).ok().flatten().is_some()
            });
            let whiteout = if below { libc::RENAME_WHITEOUT } else { 0 };
            sys::renameat2(
                old_pfd.as_fd(),
                &cname,
                new_pfd.as_fd(),
                &cname,
                libc::RENAME_NOREPLACE | whiteout,
            )?;
        }
        if !at_name || st.st_nlink > 1 {
            // Its other names move along, or they would be sealed apart from it (and a
            // file left open for writing in the frozen generation cannot be reopened once
            // its names lead to the sealed layer).
            let stack = self.stack();
            let froot = stack.frozen.as_ref().ok_or(Errno::EIO)?.root.clone();
            self.bring_up_aliases(ino, fd.as_fd(), Some((froot.as_fd(), st.st_ino)))?;
        }
        let node = self.node(ino)?;
        let mut ns = node.st.write().unwrap();
        ns.place = Placement {
            upper: Some(fd.clone()),
            lower: Vec::new(),
        };
        ns.epoch = self.stack().epoch;
        drop(ns);
        self.upper_bytes.fetch_add(st.st_size, Ordering::Relaxed);
        Ok(())
    }

    /// Puts the tree `tree` of generation `generation` below the writable one as the
    /// frozen generation, as `freeze` leaves it: a generation that a crash left frozen is
    /// served from the SSD while the archiver seals it again. Called before the volume
    /// serves anything.
    pub fn restore_frozen(&self, generation: u64, tree: &Path) -> SysResult<()> {
        let root_fd = open_dir_path(tree)?;
        let root_backing_ino = sys::fstat(root_fd.as_fd())?.st_ino;
        let _gate = self.exclusive_gate();
        let old = self.stack();
        if old.frozen.is_some() {
            return Err(Errno(libc::EBUSY));
        }
        let stack = Arc::new(Stack {
            epoch: old.epoch + 1,
            generation: old.generation,
            root_backing_ino: old.root_backing_ino,
            work: old.work.clone(),
            frozen: Some(Arc::new(FrozenTree {
                generation,
                root_backing_ino,
                root: Arc::new(root_fd),
                // A frozen generation is newer than every archived layer: the lower files of
                // its stacked files are in them.
                below: old.archived.clone(),
            })),
            archived: old.archived.clone(),
        });
        let root = self.node(ROOT_INO)?;
        let mut st = root.st.write().unwrap();
        st.place.lower = stack.lower_roots()?;
        st.epoch = stack.epoch;
        *self.stack.write().unwrap() = stack;
        Ok(())
    }

    /// The frozen generation `generation` is sealed as `layer`: the layer takes its place
    /// (`None`: the generation was empty and simply goes).
    pub fn sealed(&self, generation: u64, layer: Option<Arc<ArchivedLayer>>) -> SysResult<()> {
        self.list_handles_of(generation);
        let _gate = self.exclusive_gate();
        let old = self.stack();
        if old.frozen.as_ref().map(|f| f.generation) != Some(generation) {
            return Err(Errno::EINVAL);
        }
        let mut archived: Vec<Arc<ArchivedLayer>> = layer.into_iter().collect();
        archived.extend(old.archived.iter().cloned());
        let stack = Arc::new(Stack {
            epoch: old.epoch + 1,
            generation: old.generation,
            root_backing_ino: old.root_backing_ino,
            work: old.work.clone(),
            frozen: None,
            archived,
        });
        let root = self.node(ROOT_INO)?;
        {
            let mut st = root.st.write().unwrap();
            st.place.lower = stack.lower_roots()?;
            st.epoch = stack.epoch;
            *self.stack.write().unwrap() = stack.clone();
        }
        if let Some(f) = &old.frozen {
            let mut retired = self.retired_trees.lock().unwrap();
            retired.retain(|(_, w)| w.strong_count() > 0);
            retired.push((generation, Arc::downgrade(f)));
        }
        drop(old);
        self.forget_stale_lowers(stack.epoch);
        // Its frozen tree still takes the SSD's space until `generation_dropped`.
        self.dropping.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Whether nothing holds the frozen tree of `generation` (passed to `sealed`) any more:
    /// no stack, no placement, handle or cached lower file of the volume refers to it, and
    /// none can again (they only come from those). Its files may then be drained before
    /// their removal (`crate::reclaim`): every reader of them reopens an `O_PATH` descriptor
    /// of such a `LowerPart::Tree`, which a write lease does not see, and would read the
    /// punched holes. Waits up to `patience` for operations in flight to let go.
    pub fn sealed_tree_unused(&self, generation: u64, patience: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + patience;
        loop {
            let held = self
                .retired_trees
                .lock()
                .unwrap()
                .iter()
                .any(|(g, w)| *g == generation && w.strong_count() > 0);
            if !held {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// The frozen tree of a generation passed to `sealed` was deleted from the SSD (or its
    /// deletion failed and was reported): writers waiting for room look again.
    pub fn generation_dropped(&self) {
        let _ = self
            .dropping
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        *self.seals_done.0.lock().unwrap() += 1;
        self.seals_done.1.notify_all();
    }

    /// Sets flow control from the archive threshold: daemon-served writers wait for a seal
    /// when the SSD has less than 1.5 × the threshold free (see `throttle`), and the tree
    /// reaching the threshold wakes the archiver (see `set_seal_kick`).
    ///
    /// An SSD with less than that free from the start is short of space at every seal: its
    /// writers would wait for each seal to commit. That is logged as a warning.
    pub fn set_flow_control(&self, threshold: u64) {
        self.seal_threshold.store(threshold, Ordering::Relaxed);
        let limit = self.write_limit();
        if let Ok(s) = self.statfs() {
            let free = s.bavail.saturating_mul(s.frsize as u64);
            if limit > 0 && free < limit {
                tracing::warn!(
                    free,
                    archive_threshold = threshold,
                    "the SSD has less than 1.5 x archive_threshold free: writers served by the \
                     daemon will wait for every seal to commit; an archive_threshold of at \
                     most {} keeps them writing",
                    crate::size::format_size(free / 3 * 2)
                );
            }
        }
    }

    /// Free SSD space below which daemon-served writers wait for room: 1.5 × the threshold
    /// (0 = no flow control).
    fn write_limit(&self) -> u64 {
        let t = self.seal_threshold.load(Ordering::Relaxed);
        t.saturating_add(t / 2)
    }

    /// Whether the writable tree holds enough to be worth sealing for room: at least an
    /// eighth of the write limit, so that a nearly empty tree is not sealed again and again
    /// on an SSD filled by something else.
    fn worth_sealing_for_room(&self) -> bool {
        self.upper_bytes.load(Ordering::Relaxed) >= (self.write_limit() / 8) as i64
    }

    /// Sets what wakes the archiver (once).
    pub fn set_seal_kick(&self, kick: SealKick) {
        let _ = self.seal_kick.set(kick);
    }

    fn kick_archiver(&self) {
        if let Some(kick) = self.seal_kick.get() {
            kick();
        }
    }

    /// Whether writers wait for space and the writable tree is worth sealing for it
    /// (`worth_sealing_for_room`): the archiver then seals before the threshold.
    pub fn seal_for_room(&self) -> bool {
        self.writers_waiting() && self.worth_sealing_for_room()
    }

    /// Flow control: while the SSD has less than the write limit left, a daemon-served
    /// writer waits for room when room is coming or can be made: a seal is under way (the
    /// frozen tree goes when it commits; a writer that went on meanwhile could fill the SSD
    /// before then), a sealed generation's tree is being deleted, or the writable tree holds
    /// enough to be sealed (the archiver is woken to seal it at once, before the threshold
    /// if need be). It waits as long as a seal is under way (at most ten minutes) and 20 s
    /// more for one to start; after that it goes on regardless. Plenty of free space never
    /// waits.
    ///
    /// Measuring costs an fstat and a statfs, so a handle is looked at once per 1/64 of the
    /// limit written through it (at most 16 MiB, at least every write of 64 KiB or more): a
    /// writer overshoots the limit by less than that.
    fn throttle(&self, h: &Handle, written: usize) {
        let limit = self.write_limit();
        if limit == 0 {
            return;
        }
        let step = (limit / 64).clamp(64 << 10, 16 << 20);
        let since = h.unchecked.fetch_add(written as u64, Ordering::Relaxed) + written as u64;
        if since < step {
            return;
        }
        h.unchecked.store(0, Ordering::Relaxed);
        self.count_growth_gated(h);
        let coming = || self.stack().frozen.is_some() || self.dropping.load(Ordering::Relaxed) > 0;
        let over = || {
            self.statfs()
                .is_ok_and(|s| s.bavail.saturating_mul(s.frsize as u64) < limit)
                && (coming() || self.worth_sealing_for_room())
        };
        if !over() {
            return;
        }
        self.writers_waiting.fetch_add(1, Ordering::Relaxed);
        self.kick_archiver();
        let start = std::time::Instant::now();
        let cap = start + std::time::Duration::from_secs(600);
        let mut deadline = start + std::time::Duration::from_secs(20);
        loop {
            let now = std::time::Instant::now();
            if coming() {
                // A seal is under way, or its tree is being deleted.
                deadline = deadline.max(now + std::time::Duration::from_secs(20));
            }
            if now >= deadline.min(cap) {
                tracing::warn!("the SSD is short of space and no seal came: writing on");
                break;
            }
            let done = self.seals_done.0.lock().unwrap();
            let wait = (deadline - now).min(std::time::Duration::from_millis(100));
            drop(self.seals_done.1.wait_timeout(done, wait).unwrap());
            self.count_growth_gated(h);
            if !over() {
                break;
            }
        }
        self.writers_waiting.fetch_sub(1, Ordering::Relaxed);
    }

    /// Whether writers are waiting for a seal to make room on the SSD (see `throttle`).
    pub fn writers_waiting(&self) -> bool {
        self.writers_waiting.load(Ordering::Relaxed) > 0
    }

    /// Archived layers `old` (ids, adjacent in the stack) were merged into `layer`, which
    /// takes their place. They are retired (see `ArchivedLayer::retire`).
    pub fn merged(&self, old: &[u64], layer: Arc<ArchivedLayer>) -> SysResult<()> {
        let _gate = self.exclusive_gate();
        let stack = self.stack();
        let pos = stack
            .archived
            .iter()
            .position(|l| old.contains(&l.id))
            .ok_or(Errno::EINVAL)?;
        let mut archived: Vec<Arc<ArchivedLayer>> = Vec::new();
        for (i, l) in stack.archived.iter().enumerate() {
            if i == pos {
                archived.push(layer.clone());
            }
            if old.contains(&l.id) {
                l.retire();
            } else {
                archived.push(l.clone());
            }
        }
        let new = Arc::new(Stack {
            epoch: stack.epoch + 1,
            generation: stack.generation,
            root_backing_ino: stack.root_backing_ino,
            work: stack.work.clone(),
            frozen: stack.frozen.clone(),
            archived,
        });
        let root = self.node(ROOT_INO)?;
        let mut st = root.st.write().unwrap();
        st.place.lower = new.lower_roots()?;
        st.epoch = new.epoch;
        *self.stack.write().unwrap() = new;
        Ok(())
    }

    /// Whether a frozen generation is waiting to be sealed.
    pub fn frozen_generation(&self) -> Option<u64> {
        self.stack().frozen.as_ref().map(|f| f.generation)
    }

    /// The current placement of a node, re-resolved from its parent by name when the stack
    /// changed since it was last resolved.
    fn place(&self, ino: u64, node: &Node) -> SysResult<Placement> {
        let stack = self.stack();
        {
            let st = node.st.read().unwrap();
            if st.epoch == stack.epoch {
                return Ok(st.place.clone());
            }
        }
        // Not while a freeze is moving files: a half-moved tree would resolve wrongly. (The
        // gate is re-entrant for readers here: callers holding it shared are not blocked, as
        // a freeze waits for them before it takes it.)
        let _gate = self.gate_unless_held();
        let stack = self.stack();
        {
            let st = node.st.read().unwrap();
            if st.epoch == stack.epoch {
                return Ok(st.place.clone());
            }
        }
        let (parent, name) = {
            let st = node.st.read().unwrap();
            (st.parent, st.name.clone())
        };
        let fresh = if ino == ROOT_INO {
            let mut st = node.st.write().unwrap();
            st.place.lower = stack.lower_roots()?;
            st.epoch = stack.epoch;
            return Ok(st.place.clone());
        } else {
            match self.node(parent) {
                Ok(pnode) => {
                    let pplace = self.place(parent, &pnode)?;
                    self.resolve(&pplace, &name)?
                }
                // The directory it was reached in is gone (removed, and forgotten).
                Err(_) => None,
            }
        };
        let fresh = match fresh {
            Some(r) if r.ino == ino => Some((parent, name, r.place)),
            // The name it was known by is gone; a file may still have other names (hard
            // links): look for one, or its placement would stay on a dropped instance.
            _ if node.kind != FileKind::Directory => self.find_name(ino)?,
            _ => None,
        };
        let mut st = node.st.write().unwrap();
        if let Some((p, n, place)) = fresh {
            st.place = place;
            if self.node(p).is_ok() {
                st.parent = p;
                st.name = n;
            }
        }
        // Otherwise renamed away or removed meanwhile: keep what we had (an orphan still
        // reads).
        st.epoch = stack.epoch;
        Ok(st.place.clone())
    }

    /// Some visible name of a non-directory `ino`: (parent directory, name, placement), by
    /// walking the merged namespace.
    fn find_name(&self, ino: u64) -> SysResult<Option<(u64, Vec<u8>, Placement)>> {
        let root = self.node(ROOT_INO)?;
        let mut stack = vec![(ROOT_INO, self.place(ROOT_INO, &root)?)];
        while let Some((dino, place)) = stack.pop() {
            for (name, cino, kind) in self.merged_names(&place)? {
                if kind != FileKind::Directory && cino != ino {
                    continue;
                }
                let Some(r) = self.resolve(&place, &name)? else {
                    continue;
                };
                if r.kind == FileKind::Directory {
                    stack.push((r.ino, r.place));
                } else if r.ino == ino {
                    return Ok(Some((dino, name, r.place)));
                }
            }
        }
        Ok(None)
    }

    /// Number of archived layers below the writable tree.
    pub fn lower_count(&self) -> usize {
        self.stack().archived.len()
    }

    fn node(&self, ino: u64) -> SysResult<Arc<Node>> {
        self.nodes
            .read()
            .unwrap()
            .get(&ino)
            .cloned()
            .ok_or(Errno::ENOENT)
    }

    fn handle(&self, fh: u64) -> SysResult<Arc<Handle>> {
        self.handles
            .read()
            .unwrap()
            .get(&fh)
            .cloned()
            .ok_or(Errno::EBADF)
    }

    // ----- identity and attributes -------------------------------------------------------

    /// The inode number of an entry of the writable tree.
    /// Callers must know that `fd` is in the current stack's writable tree (they hold the
    /// gate, or check that the stack's epoch did not move meanwhile).
    fn upper_ino(&self, fd: BorrowedFd<'_>, st: &libc::stat) -> u64 {
        TreeNumbering::of(&self.stack()).ino(fd, st)
    }

    fn upper_attr(&self, fd: BorrowedFd<'_>, st: &libc::stat) -> Attr {
        Attr::from_stat(st, self.upper_ino(fd, st))
    }

    fn attr_of(&self, ino: u64, place: &Placement) -> SysResult<Attr> {
        if let Some(fd) = &place.upper {
            let st = sys::fstat(fd.as_fd())?;
            let mut a = self.upper_attr(fd.as_fd(), &st);
            a.ino = ino;
            return Ok(a);
        }
        let part = place.lower.first().ok_or(Errno::EIO)?;
        Ok(part.attr(ino))
    }

    fn upper_is_whiteout(fd: BorrowedFd<'_>, st: &libc::stat) -> bool {
        tree_is_whiteout(fd, st)
    }

    fn upper_is_opaque(fd: BorrowedFd<'_>) -> bool {
        tree_is_opaque(fd)
    }

    // ----- resolution --------------------------------------------------------------------

    /// Lower parts of `name` below a directory whose lower parts are `parts`: the topmost
    /// instance, and for a directory every further one down to an opaque one. `Ok(None)` when
    /// the name does not exist below or a whiteout hides it.
    fn lower_lookup(parts: &[LowerPart], name: &[u8]) -> SysResult<Option<Vec<LowerPart>>> {
        lower_lookup(parts, name)
    }

    /// Resolves `name` in a directory placed at `dir`. `Ok(None)` = does not exist.
    fn resolve(&self, dir: &Placement, name: &[u8]) -> SysResult<Option<Resolved>> {
        let cname = CString::new(name).map_err(|_| Errno::EINVAL)?;
        if let Some(pfd) = &dir.upper {
            match sys::open_path(pfd.as_fd(), &cname) {
                Ok(fd) => {
                    let st = sys::fstat(fd.as_fd())?;
                    if Self::upper_is_whiteout(fd.as_fd(), &st) {
                        return Ok(None);
                    }
                    let kind = FileKind::from_mode(st.st_mode);
                    let ino = self.upper_ino(fd.as_fd(), &st);
                    let lower = if kind == FileKind::Directory
                        && !dir.lower.is_empty()
                        && !Self::upper_is_opaque(fd.as_fd())
                    {
                        match Self::lower_lookup(&dir.lower, name)? {
                            Some(parts) if parts[0].is_dir() => parts,
                            _ => Vec::new(),
                        }
                    } else {
                        Vec::new()
                    };
                    return Ok(Some(Resolved {
                        ino,
                        kind,
                        place: Placement {
                            upper: Some(Arc::new(fd)),
                            lower,
                        },
                    }));
                }
                Err(Errno(libc::ENOENT)) => {}
                Err(e) => return Err(e),
            }
        }
        let Some(parts) = Self::lower_lookup(&dir.lower, name)? else {
            return Ok(None);
        };
        let top = &parts[0];
        Ok(Some(Resolved {
            ino: top.ino()?,
            kind: top.kind(),
            place: Placement {
                upper: None,
                lower: parts,
            },
        }))
    }

    /// Registers an entry resolved under the current stack as known to the kernel (one more
    /// reference). For callers holding the gate (the stack cannot change under them).
    fn remember(&self, parent: u64, name: &[u8], r: Resolved) -> SysResult<Attr> {
        let epoch = self.stack().epoch;
        self.remember_at(parent, name, r, epoch)
    }

    /// `remember` for an entry resolved under the stack of epoch `epoch`: a placement of an
    /// older stack than the node's is not kept (the node's is newer), and one kept with an
    /// older epoch than the current stack's is resolved again when next used.
    fn remember_at(&self, parent: u64, name: &[u8], r: Resolved, epoch: u64) -> SysResult<Attr> {
        let attr = self.attr_of(r.ino, &r.place)?;
        let mut nodes = self.nodes.write().unwrap();
        match nodes.get(&r.ino) {
            Some(node) if node.kind == r.kind => {
                node.lookups.fetch_add(1, Ordering::Relaxed);
                let mut st = node.st.write().unwrap();
                if epoch >= st.epoch {
                    st.place = r.place;
                    st.parent = parent;
                    st.name = name.to_vec();
                    st.epoch = epoch;
                }
            }
            _ => {
                nodes.insert(
                    r.ino,
                    Arc::new(Node {
                        kind: r.kind,
                        lookups: AtomicU64::new(1),
                        default_acl: AtomicU8::new(ACL_UNKNOWN),
                        st: RwLock::new(NodeState {
                            place: r.place,
                            parent,
                            name: name.to_vec(),
                            epoch,
                        }),
                    }),
                );
            }
        }
        Ok(attr)
    }

    fn remember_upper(&self, parent: u64, dir: &Placement, name: &CStr) -> SysResult<Attr> {
        let r = self.resolve(dir, name.to_bytes())?.ok_or(Errno::ENOENT)?;
        self.remember(parent, name.to_bytes(), r)
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> SysResult<Attr> {
        let p = self.node(parent)?;
        if p.kind != FileKind::Directory {
            return Err(Errno::ENOTDIR);
        }
        let name = sys::cname(name)?;
        // Lookups do not hold the gate. When a freeze, a seal or a merge changes the stack
        // while the parent is placed and the name resolved, the entry was found in one stack
        // and numbered in the other (an entry of the frozen tree got the new generation's
        // number), looked for in a frozen tree that is being deleted (ENOENT), or found in
        // the frozen tree while a freeze still carries it over (a stale size): resolve again
        // once the change is over.
        loop {
            let seq = self.stack_change_begin();
            let epoch = self.stack().epoch;
            let place = self.place(parent, &p)?;
            let r = self.resolve(&place, name.to_bytes());
            if self.stack_unchanged_since(seq) {
                let r = r?.ok_or(Errno::ENOENT)?;
                return self.remember_at(parent, name.to_bytes(), r, epoch);
            }
        }
    }

    /// The kernel dropped `n` references to `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut nodes = self.nodes.write().unwrap();
        if let Some(node) = nodes.get(&ino) {
            let have = node.lookups.load(Ordering::Relaxed);
            node.lookups
                .store(have.saturating_sub(n), Ordering::Relaxed);
            if have <= n {
                nodes.remove(&ino);
            }
        }
    }

    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> SysResult<Attr> {
        if let Some(fh) = fh
            && let Ok(h) = self.handle(fh)
        {
            match &h.kind {
                HandleKind::Upper(fd) => {
                    let st = sys::fstat(fd.as_fd())?;
                    let mut a = self.upper_attr(fd.as_fd(), &st);
                    a.ino = ino;
                    return Ok(a);
                }
                HandleKind::Lower(part) => match self.live_stacked(ino) {
                    Some(sf) => {
                        let st = sys::fstat(sf.st.read().unwrap().fd.as_fd())?;
                        let mut a = Attr::from_stat(&st, ino);
                        a.ino = ino;
                        return Ok(a);
                    }
                    None => return Ok(part.attr(ino)),
                },
                HandleKind::Stacked(sf) => {
                    let st = sys::fstat(sf.st.read().unwrap().fd.as_fd())?;
                    return Ok(Attr::from_stat(&st, ino));
                }
                HandleKind::Merged(_) => {}
            }
        }
        let n = self.node(ino)?;
        self.attr_of(ino, &self.place(ino, &n)?)
    }

    // ----- copy-up -----------------------------------------------------------------------

    fn tmp_name(&self) -> CString {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        CString::new(format!("t{}.{n}", std::process::id())).expect("no NUL")
    }

    /// Makes sure `ino` has an upper instance (copying it up, and its parents, if needed)
    /// and returns its descriptor.
    fn copy_up(&self, ino: u64) -> SysResult<Arc<OwnedFd>> {
        let node = self.node(ino)?;
        if let Some(fd) = self.place(ino, &node)?.upper {
            return Ok(fd);
        }
        let (parent, name) = {
            let st = node.st.read().unwrap();
            (st.parent, st.name.clone())
        };
        if ino == ROOT_INO || name.is_empty() {
            return Err(Errno::EIO);
        }
        // The parent first, without holding this node's lock (locks are never nested).
        let pfd = self.copy_up(parent)?;
        let mut st = node.st.write().unwrap();
        if let Some(fd) = &st.place.upper {
            return Ok(fd.clone());
        }
        let part = st.place.lower.first().cloned().ok_or(Errno::EIO)?;
        let cname = CString::new(name.clone()).map_err(|_| Errno::EIO)?;
        // Already copied (as part of a directory copied up whole): adopt that copy.
        if let Ok(existing) = sys::open_path(pfd.as_fd(), &cname)
            && tree_recorded_ino(existing.as_fd()) == Some(ino)
        {
            let fd = Arc::new(existing);
            st.place.upper = Some(fd.clone());
            if node.kind != FileKind::Directory {
                st.place.lower.clear();
            }
            return Ok(fd);
        }
        let fd = self.copy_up_part(&part, ino, pfd.as_fd(), &cname)?;
        let fd = Arc::new(fd);
        st.place.upper = Some(fd.clone());
        if node.kind != FileKind::Directory {
            st.place.lower.clear();
        }
        drop(st);
        if node.kind != FileKind::Directory && part.attr(ino).nlink > 1 {
            self.link_up_aliases(ino, fd.as_fd())?;
        }
        Ok(fd)
    }

    /// Before a name of a lower-only file with several names goes away, the file is copied up
    /// with all its names, so that the names that remain count one link less.
    fn up_if_linked_below(&self, parent: u64, name: &CStr, r: &Resolved) -> SysResult<()> {
        let linked = r.kind != FileKind::Directory
            && r.place.upper.is_none()
            && r.place
                .lower
                .first()
                .is_some_and(|p| p.attr(r.ino).nlink > 1);
        if !linked {
            return Ok(());
        }
        let again = Resolved {
            ino: r.ino,
            kind: r.kind,
            place: r.place.clone(),
        };
        self.remember(parent, name.to_bytes(), again)?;
        let res = self.copy_up(r.ino).map(drop);
        self.forget(r.ino, 1);
        res
    }

    /// A lower file with several names was copied up by one of them: its other visible
    /// names become hard links of the copy, or they would go on showing the old lower
    /// instance (its data and its link count) under the same inode number.
    fn link_up_aliases(&self, ino: u64, copy: BorrowedFd<'_>) -> SysResult<()> {
        self.bring_up_aliases(ino, copy, None)
    }

    /// Links `copy` at every other visible lower-only name of `ino`; with `frozen` (the frozen
    /// tree's root and the backing inode number of a file being moved out of it), names of
    /// that same backing file are moved from the frozen tree instead.
    fn bring_up_aliases(
        &self,
        ino: u64,
        copy: BorrowedFd<'_>,
        frozen: Option<(BorrowedFd<'_>, u64)>,
    ) -> SysResult<()> {
        // Every visible lower-only name of `ino`, as a path of names from the root.
        let mut aliases: Vec<Vec<Vec<u8>>> = Vec::new();
        let root = self.node(ROOT_INO)?;
        let mut stack = vec![(Vec::<Vec<u8>>::new(), self.place(ROOT_INO, &root)?)];
        while let Some((path, place)) = stack.pop() {
            for (name, cino, kind) in self.merged_names(&place)? {
                if kind != FileKind::Directory && cino != ino {
                    continue;
                }
                let Some(r) = self.resolve(&place, &name)? else {
                    continue;
                };
                let mut p = path.clone();
                p.push(name);
                if r.kind == FileKind::Directory {
                    stack.push((p, r.place));
                } else if r.ino == ino && r.place.upper.is_none() {
                    aliases.push(p);
                }
            }
        }
        for path in aliases {
            // Walk down, registering the directories on the way so they can be copied up.
            let mut held = Vec::new();
            let mut parent = ROOT_INO;
            let res = (|| -> SysResult<()> {
                for comp in &path[..path.len() - 1] {
                    let pnode = self.node(parent)?;
                    let pplace = self.place(parent, &pnode)?;
                    let r = self.resolve(&pplace, comp)?.ok_or(Errno::ENOENT)?;
                    let child = r.ino;
                    self.remember(parent, comp, r)?;
                    held.push(child);
                    parent = child;
                }
                let pfd = self.copy_up(parent)?;
                let name = CString::new(path.last().unwrap().clone()).map_err(|_| Errno::EIO)?;
                if let Some((froot, backing)) = frozen {
                    let mut dir = sys::open_path(froot, c".")?;
                    for comp in &path[..path.len() - 1] {
                        let c = CString::new(comp.clone()).map_err(|_| Errno::EIO)?;
                        dir = sys::open_path(dir.as_fd(), &c)?;
                    }
                    if sys::fstatat(dir.as_fd(), &name)?.st_ino == backing {
                        return sys::renameat2(
                            dir.as_fd(),
                            &name,
                            pfd.as_fd(),
                            &name,
                            libc::RENAME_NOREPLACE,
                        );
                    }
                }
                match sys::link_fd(copy, pfd.as_fd(), &name) {
                    Ok(()) | Err(Errno(libc::EEXIST)) => Ok(()),
                    Err(e) => Err(e),
                }
            })();
            for h in held {
                self.forget(h, 1);
            }
            res?;
        }
        Ok(())
    }

    /// Copies one lower object into `dir/name` of the writable tree: prepared in the work
    /// directory and renamed into place, so a crash never leaves a partial copy visible.
    fn copy_up_part(
        &self,
        part: &LowerPart,
        ino: u64,
        dir: BorrowedFd<'_>,
        name: &CStr,
    ) -> SysResult<OwnedFd> {
        let a = part.attr(ino);
        let tmp = self.tmp_name();
        let work = self.work();
        let work = work.as_fd();
        let perm = a.perm as u32;
        match a.kind {
            FileKind::Directory => sys::mkdirat(work, &tmp, 0o700)?,
            FileKind::Regular => {
                let f = sys::openat(
                    work,
                    &tmp,
                    libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                    0o600,
                )?;
                // File stacking: no data is copied, chunks come up when they change.
                let stacked = a.size > 0;
                if stacked {
                    self.make_stacked(part, f.as_fd())?;
                }
                match part.tree_fd() {
                    _ if stacked => {}
                    // On the SSD already: let the kernel copy (and keep holes).
                    Some(src) => {
                        let src = sys::reopen(src.as_fd(), libc::O_RDONLY)?;
                        let mut off = 0u64;
                        while off < a.size {
                            let n = sys::copy_file_range(
                                src.as_fd(),
                                off,
                                f.as_fd(),
                                off,
                                (a.size - off).min(1 << 30) as usize,
                            )?;
                            if n == 0 {
                                break;
                            }
                            off += n as u64;
                        }
                    }
                    None => {
                        let mut buf = vec![0u8; 1 << 20];
                        let mut off = 0u64;
                        while off < a.size {
                            // Copy data, leave holes as holes.
                            match part.seek(off, true)? {
                                None => break,
                                Some(d) => off = d,
                            }
                            let hole = part.seek(off, false)?.unwrap_or(a.size);
                            while off < hole {
                                let want = ((hole - off) as usize).min(buf.len());
                                let n = part.read(off, &mut buf[..want])?;
                                if n == 0 {
                                    break;
                                }
                                let mut done = 0;
                                while done < n {
                                    done +=
                                        sys::pwrite(f.as_fd(), &buf[done..n], off + done as u64)?;
                                }
                                off += n as u64;
                            }
                        }
                    }
                }
                sys::ftruncate(f.as_fd(), a.size)?;
                sys::fsync(f.as_fd(), false)?;
            }
            FileKind::Symlink => {
                let t = CString::new(part.readlink()?).map_err(|_| Errno::EIO)?;
                sys::symlinkat(&t, work, &tmp)?;
            }
            kind => {
                let fmt = match kind {
                    FileKind::CharDevice => libc::S_IFCHR,
                    FileKind::BlockDevice => libc::S_IFBLK,
                    FileKind::Fifo => libc::S_IFIFO,
                    _ => libc::S_IFSOCK,
                };
                sys::mknodat(work, &tmp, fmt | 0o600, a.rdev)?;
            }
        }
        let fd = sys::open_path(work, &tmp)?;
        let result = (|| {
            for (n, v) in part.raw_xattrs()? {
                // Layer markers describe the lower instance's place in its layer (an opaque
                // lower directory hides what is below *it*): a copy-up must not inherit them.
                // Users' own xattrs (escaped) and the real-device mark do come along.
                if markers::unescape_xattr(&n).is_none() && n.as_slice() != markers::REALDEV_XATTR {
                    continue;
                }
                let n = CString::new(n).map_err(|_| Errno::EIO)?;
                sys::setxattr_fd(fd.as_fd(), &n, &v, 0)?;
            }
            sys::setxattr_fd(fd.as_fd(), &cstr(markers::INO_XATTR), &ino.to_le_bytes(), 0)?;
            sys::chown_fd(fd.as_fd(), a.uid, a.gid)?;
            if a.kind != FileKind::Symlink {
                sys::chmod_fd(fd.as_fd(), perm)?;
            }
            let t = libc::timespec {
                tv_sec: a.mtime.sec,
                tv_nsec: a.mtime.nsec as i64,
            };
            sys::utimens_fd(fd.as_fd(), &[t, t])?;
            spinfs_failpoints::fail_point!("copy_up.prepared");
            sys::renameat2(work, &tmp, dir, name, libc::RENAME_NOREPLACE)?;
            spinfs_failpoints::fail_point!("copy_up.placed");
            Ok(())
        })();
        if let Err(e) = result {
            let flags = if a.kind == FileKind::Directory {
                libc::AT_REMOVEDIR
            } else {
                0
            };
            let _ = sys::unlinkat(work, &tmp, flags);
            return Err(e);
        }
        Ok(fd)
    }

    /// Copies a whole directory subtree up (used before a directory with lower parts moves
    /// to another name, where its lower parts would no longer be found), and marks it opaque.
    fn copy_up_tree(&self, ino: u64) -> SysResult<Arc<OwnedFd>> {
        let dfd = self.copy_up(ino)?;
        let node = self.node(ino)?;
        let place = self.place(ino, &node)?;
        for (name, _, _) in self.merged_names(&place)? {
            let cname = CString::new(name.clone()).map_err(|_| Errno::EIO)?;
            let Some(r) = self.resolve(&place, &name)? else {
                continue;
            };
            if r.place.upper.is_none() {
                let part = r.place.lower.first().cloned().ok_or(Errno::EIO)?;
                let fd = Arc::new(self.copy_up_part(&part, r.ino, dfd.as_fd(), &cname)?);
                // A node the kernel holds for it must now use the copy.
                if let Ok(child) = self.node(r.ino) {
                    let mut cst = child.st.write().unwrap();
                    cst.place.upper = Some(fd.clone());
                    if child.kind != FileKind::Directory {
                        cst.place.lower.clear();
                    }
                }
                if r.kind != FileKind::Directory && part.attr(r.ino).nlink > 1 {
                    self.link_up_aliases(r.ino, fd.as_fd())?;
                }
            }
            if r.kind == FileKind::Directory && !r.place.lower.is_empty() {
                // Recurse through a temporary node so the child's lower parts come along.
                self.remember(ino, &name, r)?;
                let child_ino = self
                    .resolve(&place, &name)?
                    .map(|c| c.ino)
                    .ok_or(Errno::EIO)?;
                let res = self.copy_up_tree(child_ino);
                self.forget(child_ino, 1);
                res?;
            }
        }
        // Opaque and without lower parts, the directory is listed straight from the writable
        // tree from now on: whiteouts that hid lower entries must go, or they would be listed.
        self.clear_whiteouts(dfd.as_fd())?;
        set_opaque(dfd.as_fd())?;
        let mut st = node.st.write().unwrap();
        st.place.lower.clear();
        Ok(dfd)
    }

    // ----- attributes --------------------------------------------------------------------

    pub fn setattr(&self, ino: u64, fh: Option<u64>, set: &SetAttr) -> SysResult<Attr> {
        let _gate = self.shared_gate();
        let handle = fh.and_then(|fh| self.handle(fh).ok());
        let handle_fd = handle.as_ref().and_then(|h| h.fd().ok());
        let upper = match handle_fd {
            Some(_) => None,
            None => Some(self.copy_up(ino)?),
        };
        let stacked = match (&handle, &upper) {
            (Some(h), _) if matches!(h.kind, HandleKind::Stacked(_)) => match &h.kind {
                HandleKind::Stacked(sf) => Some(sf.clone()),
                _ => None,
            },
            (_, Some(u)) if handle_fd.is_none() && self.node(ino)?.kind == FileKind::Regular => {
                self.stacked_file(ino, u.as_fd())?
            }
            _ => None,
        };
        let target: BorrowedFd<'_> = match (&handle_fd, &upper) {
            (Some(fd), _) => *fd,
            (None, Some(u)) => u.as_fd(),
            (None, None) => return Err(Errno::EIO),
        };
        if set.uid.is_some() || set.gid.is_some() {
            sys::chown_fd(
                target,
                set.uid.unwrap_or(u32::MAX),
                set.gid.unwrap_or(u32::MAX),
            )?;
        }
        if let Some(mode) = set.mode {
            sys::chmod_fd(target, mode & 0o7777)?;
        }
        if let Some(size) = set.size {
            match handle_fd {
                _ if stacked.is_some() => {
                    self.stacked_truncate(stacked.as_ref().expect("checked"), size)?
                }
                Some(fd) => sys::ftruncate(fd, size)?,
                None => {
                    let f = sys::reopen(target, libc::O_WRONLY)?;
                    sys::ftruncate(f.as_fd(), size)?;
                }
            }
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let conv = |t: Option<SetTime>| match t {
                None => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                },
                Some(SetTime::Now) => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_NOW,
                },
                Some(SetTime::At(ts)) => libc::timespec {
                    tv_sec: ts.sec,
                    tv_nsec: ts.nsec as i64,
                },
            };
            sys::utimens_fd(target, &[conv(set.atime), conv(set.mtime)])?;
        }
        let st = sys::fstat(target)?;
        let mut a = self.upper_attr(target, &st);
        a.ino = ino;
        Ok(a)
    }

    pub fn readlink(&self, ino: u64) -> SysResult<Vec<u8>> {
        let n = self.node(ino)?;
        let place = self.place(ino, &n)?;
        match &place.upper {
            Some(fd) => sys::readlink_fd(fd.as_fd()),
            None => {
                let p = place.lower.first().ok_or(Errno::EIO)?;
                p.readlink()
            }
        }
    }

    // ----- creating names ----------------------------------------------------------------

    /// Creates an inode through `make` with the caller's ownership. If the backing
    /// filesystem refuses the caller's own credentials (access granted through a supplementary
    /// group, which the kernel already checked), it is made as root and handed over.
    fn make_owned(
        &self,
        parent: BorrowedFd<'_>,
        name: &CStr,
        caller: &Caller,
        make: impl Fn() -> SysResult<()>,
    ) -> SysResult<()> {
        let first = {
            let _creds = FsCreds::switch(caller.uid, caller.gid);
            make()
        };
        match first {
            Err(Errno(libc::EACCES)) | Err(Errno(libc::EPERM)) if caller.uid != 0 => {
                make()?;
                let pst = sys::fstat(parent)?;
                let gid = if pst.st_mode & libc::S_ISGID != 0 {
                    pst.st_gid
                } else {
                    caller.gid
                };
                let fd = sys::open_path(parent, name)?;
                let before = sys::fstat(fd.as_fd())?;
                sys::chown_fd(fd.as_fd(), caller.uid, gid)?;
                if before.st_mode & libc::S_IFMT != libc::S_IFLNK
                    && before.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0
                {
                    sys::chmod_fd(fd.as_fd(), before.st_mode & 0o7777)?;
                }
                Ok(())
            }
            other => other,
        }
    }

    /// The mode to create with: the kernel sends it unmasked (POSIX ACLs are on); the umask
    /// applies unless the parent has a default ACL, which the backing filesystem then applies.
    fn create_mode(parent: &Node, pfd: BorrowedFd<'_>, mode: u32, umask: u32) -> u32 {
        let mut state = parent.default_acl.load(Ordering::Relaxed);
        if state == ACL_UNKNOWN {
            let present = sys::getxattr_fd(pfd, c"system.posix_acl_default", &mut []).is_ok();
            state = if present { ACL_PRESENT } else { ACL_NONE };
            parent.default_acl.store(state, Ordering::Relaxed);
        }
        if state == ACL_PRESENT {
            mode
        } else {
            mode & !umask
        }
    }

    /// Prepares `name` in directory `parent` for a new entry: the directory is copied up,
    /// and a whiteout in the way is removed. Returns the parent node, its upper descriptor,
    /// its placement, and whether lower layers have (hidden) entries of that name.
    fn prepare_create(
        &self,
        parent: u64,
        name: &CStr,
    ) -> SysResult<(Arc<Node>, Arc<OwnedFd>, Placement, bool)> {
        let p = self.node(parent)?;
        let pfd = self.copy_up(parent)?;
        let place = self.place(parent, &p)?;
        let mut below = false;
        if !place.lower.is_empty() {
            if let Ok(fd) = sys::open_path(pfd.as_fd(), name) {
                let st = sys::fstat(fd.as_fd())?;
                if Self::upper_is_whiteout(fd.as_fd(), &st) {
                    sys::unlinkat(pfd.as_fd(), name, 0)?;
                }
            }
            below = place
                .lower
                .iter()
                .map(|part| part.lookup(name.to_bytes()))
                .collect::<SysResult<Vec<_>>>()?
                .iter()
                .any(Option::is_some);
        }
        Ok((p, pfd, place, below))
    }

    pub fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u64,
        caller: &Caller,
    ) -> SysResult<Attr> {
        let _gate = self.shared_gate();
        let name = sys::cname(name)?;
        let (p, pfd, place, _) = self.prepare_create(parent, &name)?;
        let mode = Self::create_mode(&p, pfd.as_fd(), mode, umask);
        let realdev = mode & libc::S_IFMT == libc::S_IFCHR && rdev == 0;
        self.make_owned(pfd.as_fd(), &name, caller, || {
            sys::mknodat(pfd.as_fd(), &name, mode, rdev)
        })?;
        if realdev {
            // A user's 0/0 device: marked so that it is never taken for a whiteout.
            let fd = sys::open_path(pfd.as_fd(), &name)?;
            sys::setxattr_fd(fd.as_fd(), &cstr(markers::REALDEV_XATTR), b"1", 0)?;
        }
        self.remember_upper(parent, &place, &name)
    }

    pub fn mkdir(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        caller: &Caller,
    ) -> SysResult<Attr> {
        let _gate = self.shared_gate();
        let name = sys::cname(name)?;
        let (p, pfd, place, below) = self.prepare_create(parent, &name)?;
        let mode = Self::create_mode(&p, pfd.as_fd(), mode, umask);
        self.make_owned(pfd.as_fd(), &name, caller, || {
            sys::mkdirat(pfd.as_fd(), &name, mode)
        })?;
        if below {
            // A new directory over a removed one must not show the old one's entries.
            set_opaque(sys::open_path(pfd.as_fd(), &name)?.as_fd())?;
        }
        self.remember_upper(parent, &place, &name)
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &OsStr,
        caller: &Caller,
    ) -> SysResult<Attr> {
        let _gate = self.shared_gate();
        let name = sys::cname(name)?;
        let target = CString::new(target.as_bytes()).map_err(|_| Errno::EINVAL)?;
        let (_, pfd, place, _) = self.prepare_create(parent, &name)?;
        self.make_owned(pfd.as_fd(), &name, caller, || {
            sys::symlinkat(&target, pfd.as_fd(), &name)
        })?;
        self.remember_upper(parent, &place, &name)
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> SysResult<Attr> {
        let _gate = self.shared_gate();
        let fd = self.copy_up(ino)?;
        let name = sys::cname(newname)?;
        let (_, pfd, place, _) = self.prepare_create(newparent, &name)?;
        sys::link_fd(fd.as_fd(), pfd.as_fd(), &name)?;
        self.remember_upper(newparent, &place, &name)
    }

    // ----- removing names ----------------------------------------------------------------

    /// Whether a name exists (visible or hidden) in the lower parts of a directory, so that
    /// removing it needs a whiteout.
    fn exists_below(place: &Placement, name: &[u8]) -> SysResult<bool> {
        for part in &place.lower {
            if part.lookup(name)?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Leaves a whiteout at `dir/name`, replacing whatever non-directory is there.
    fn whiteout(&self, dir: BorrowedFd<'_>, name: &CStr) -> SysResult<()> {
        let tmp = self.tmp_name();
        let work = self.work();
        sys::mknodat(work.as_fd(), &tmp, libc::S_IFCHR, 0)?;
        if let Err(e) = sys::renameat2(work.as_fd(), &tmp, dir, name, 0) {
            let _ = sys::unlinkat(work.as_fd(), &tmp, 0);
            return Err(e);
        }
        Ok(())
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> SysResult<()> {
        let _gate = self.shared_gate();
        let p = self.node(parent)?;
        let name = sys::cname(name)?;
        let place = self.place(parent, &p)?;
        let r = self
            .resolve(&place, name.to_bytes())?
            .ok_or(Errno::ENOENT)?;
        if r.kind == FileKind::Directory {
            return Err(Errno::EISDIR);
        }
        if let Some(fd) = &r.place.upper
            && let Ok(st) = sys::fstat(fd.as_fd())
            && st.st_nlink == 1
            && r.kind == FileKind::Regular
        {
            // A stacked file counts what it holds on the SSD, not its size.
            let held = match crate::lower::tree_is_stacked(fd.as_fd()) {
                Ok(true) => st.st_blocks * 512,
                _ => st.st_size,
            };
            self.upper_bytes.fetch_sub(held, Ordering::Relaxed);
        }
        if place.lower.is_empty() || !Self::exists_below(&place, name.to_bytes())? {
            let pfd = place.upper.ok_or(Errno::EIO)?;
            return sys::unlinkat(pfd.as_fd(), &name, 0);
        }
        self.up_if_linked_below(parent, &name, &r)?;
        let pfd = self.copy_up(parent)?;
        self.whiteout(pfd.as_fd(), &name)
    }

    /// Every visible name of a merged directory: (name, ino, kind).
    fn merged_names(&self, place: &Placement) -> SysResult<Vec<(Vec<u8>, u64, FileKind)>> {
        let mut seen: HashMap<Vec<u8>, bool> = HashMap::new(); // name -> visible
        let mut out = Vec::new();
        if let Some(fd) = &place.upper {
            let dfd = sys::reopen(fd.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
            let mut pos = 0;
            loop {
                let batch = sys::read_dir_at(dfd.as_fd(), pos, 64 * 1024)?;
                if batch.is_empty() {
                    break;
                }
                for e in batch {
                    pos = e.off;
                    if e.name == b"." || e.name == b".." {
                        continue;
                    }
                    let cname = CString::new(e.name.clone()).map_err(|_| Errno::EIO)?;
                    let cfd = match sys::open_path(fd.as_fd(), &cname) {
                        Ok(f) => f,
                        Err(Errno(libc::ENOENT)) => continue,
                        Err(err) => return Err(err),
                    };
                    let st = sys::fstat(cfd.as_fd())?;
                    if Self::upper_is_whiteout(cfd.as_fd(), &st) {
                        seen.insert(e.name, false);
                        continue;
                    }
                    out.push((
                        e.name.clone(),
                        self.upper_ino(cfd.as_fd(), &st),
                        FileKind::from_mode(st.st_mode),
                    ));
                    seen.insert(e.name, true);
                }
            }
        }
        for part in &place.lower {
            for (name, child) in part.entries()? {
                if seen.contains_key(&name) {
                    continue;
                }
                if child.is_whiteout()? {
                    seen.insert(name, false);
                    continue;
                }
                out.push((name.clone(), child.ino()?, child.kind()));
                seen.insert(name, true);
            }
        }
        Ok(out)
    }

    /// Removes every whiteout inside an upper directory (before it is removed or replaced).
    fn clear_whiteouts(&self, dir: BorrowedFd<'_>) -> SysResult<()> {
        let dfd = sys::reopen(dir, libc::O_RDONLY | libc::O_DIRECTORY)?;
        let mut pos = 0;
        let mut names = Vec::new();
        loop {
            let batch = sys::read_dir_at(dfd.as_fd(), pos, 64 * 1024)?;
            if batch.is_empty() {
                break;
            }
            for e in batch {
                pos = e.off;
                if e.kind == libc::DT_CHR {
                    names.push(e.name);
                }
            }
        }
        for n in names {
            let c = CString::new(n).map_err(|_| Errno::EIO)?;
            let fd = sys::open_path(dir, &c)?;
            let st = sys::fstat(fd.as_fd())?;
            if Self::upper_is_whiteout(fd.as_fd(), &st) {
                sys::unlinkat(dir, &c, 0)?;
            }
        }
        Ok(())
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> SysResult<()> {
        let _gate = self.shared_gate();
        let p = self.node(parent)?;
        let name = sys::cname(name)?;
        let place = self.place(parent, &p)?;
        let r = self
            .resolve(&place, name.to_bytes())?
            .ok_or(Errno::ENOENT)?;
        if r.kind != FileKind::Directory {
            return Err(Errno::ENOTDIR);
        }
        if place.lower.is_empty() {
            let pfd = place.upper.ok_or(Errno::EIO)?;
            return sys::unlinkat(pfd.as_fd(), &name, libc::AT_REMOVEDIR);
        }
        if !self.merged_names(&r.place)?.is_empty() {
            return Err(Errno::ENOTEMPTY);
        }
        let pfd = self.copy_up(parent)?;
        if let Some(ufd) = &r.place.upper {
            self.clear_whiteouts(ufd.as_fd())?;
            sys::unlinkat(pfd.as_fd(), &name, libc::AT_REMOVEDIR)?;
        }
        if Self::exists_below(&place, name.to_bytes())? {
            self.whiteout(pfd.as_fd(), &name)?;
        }
        Ok(())
    }

    /// rename(2) with RENAME_NOREPLACE / RENAME_EXCHANGE flags, across layers.
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> SysResult<()> {
        let _gate = self.shared_gate();
        const SUPPORTED: u32 = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE;
        if flags & !SUPPORTED != 0 {
            return Err(Errno::EINVAL);
        }
        let name = sys::cname(name)?;
        let newname = sys::cname(newname)?;
        let p = self.node(parent)?;
        let np = self.node(newparent)?;
        let (pplace, npplace) = (self.place(parent, &p)?, self.place(newparent, &np)?);
        if pplace.is_upper_only() && npplace.is_upper_only() {
            // Fast path: nothing below either directory.
            let (a, b) = (pplace.upper.unwrap(), npplace.upper.unwrap());
            let ino_at = |dir: &OwnedFd, n: &CStr| -> Option<u64> {
                let fd = sys::open_path(dir.as_fd(), n).ok()?;
                let st = sys::fstat(fd.as_fd()).ok()?;
                Some(self.upper_ino(fd.as_fd(), &st))
            };
            let src = ino_at(&a, &name);
            let dst = if flags & libc::RENAME_EXCHANGE != 0 {
                ino_at(&b, &newname)
            } else {
                None
            };
            sys::renameat2(a.as_fd(), &name, b.as_fd(), &newname, flags)?;
            self.renamed(src, newparent, &newname, dst, parent, &name);
            return Ok(());
        }
        let src = self
            .resolve(&pplace, name.to_bytes())?
            .ok_or(Errno::ENOENT)?;
        let dst = self.resolve(&npplace, newname.to_bytes())?;
        if flags & libc::RENAME_NOREPLACE != 0 && dst.is_some() {
            return Err(Errno::EEXIST);
        }
        if flags & libc::RENAME_EXCHANGE != 0 && dst.is_none() {
            return Err(Errno::ENOENT);
        }
        if let Some(d) = &dst {
            if d.ino == src.ino {
                return Ok(());
            }
            if flags & libc::RENAME_EXCHANGE == 0 {
                match (
                    src.kind == FileKind::Directory,
                    d.kind == FileKind::Directory,
                ) {
                    (true, false) => return Err(Errno::ENOTDIR),
                    (false, true) => return Err(Errno::EISDIR),
                    (true, true) if !self.merged_names(&d.place)?.is_empty() => {
                        return Err(Errno::ENOTEMPTY);
                    }
                    _ => {}
                }
            }
        }
        // Bring both ends into the writable tree. A directory with lower parts is copied up
        // whole: at another name its lower parts would no longer be found.
        let pfd = self.copy_up(parent)?;
        let npfd = self.copy_up(newparent)?;
        let bring_up = |r: &Resolved, dir: u64, n: &CStr| -> SysResult<()> {
            self.remember(
                dir,
                n.to_bytes(),
                Resolved {
                    ino: r.ino,
                    kind: r.kind,
                    place: r.place.clone(),
                },
            )?;
            let res = if r.kind == FileKind::Directory && !r.place.lower.is_empty() {
                self.copy_up_tree(r.ino).map(drop)
            } else {
                self.copy_up(r.ino).map(drop)
            };
            self.forget(r.ino, 1);
            res
        };
        bring_up(&src, parent, &name)?;
        let src_below = Self::exists_below(&pplace, name.to_bytes())?;
        if flags & libc::RENAME_EXCHANGE != 0 {
            let d = dst.as_ref().expect("checked above");
            bring_up(d, newparent, &newname)?;
            // Each directory arrives at the other's name, where lower entries may lie: it
            // must hide them (its whole content is in the writable tree by now).
            for (r, dir, n) in [(&src, &npfd, &newname), (d, &pfd, &name)] {
                if r.kind == FileKind::Directory {
                    set_opaque(sys::open_path(dir.as_fd(), n)?.as_fd())?;
                }
            }
            sys::renameat2(
                pfd.as_fd(),
                &name,
                npfd.as_fd(),
                &newname,
                libc::RENAME_EXCHANGE,
            )?;
            self.renamed(
                Some(src.ino),
                newparent,
                &newname,
                Some(d.ino),
                parent,
                &name,
            );
            return Ok(());
        }
        if let Some(d) = &dst {
            self.up_if_linked_below(newparent, &newname, d)?;
            if let Some(ufd) = &d.place.upper
                && d.kind == FileKind::Directory
            {
                self.clear_whiteouts(ufd.as_fd())?;
            }
            if d.kind == FileKind::Directory && !d.place.lower.is_empty() {
                // The moved directory must hide the replaced one's lower entries.
                let sfd = self.copy_up(src.ino)?;
                set_opaque(sfd.as_fd())?;
            }
        } else if src.kind == FileKind::Directory
            && Self::exists_below(&npplace, newname.to_bytes())?
        {
            // A removed lower entry (now a whiteout) lies below the new name: the moved
            // directory replaces the whiteout and must hide what the whiteout hid.
            let sfd = self.copy_up(src.ino)?;
            set_opaque(sfd.as_fd())?;
            if let Ok(fd) = sys::open_path(npfd.as_fd(), &newname) {
                let st = sys::fstat(fd.as_fd())?;
                if Self::upper_is_whiteout(fd.as_fd(), &st) {
                    sys::unlinkat(npfd.as_fd(), &newname, 0)?;
                }
            }
        } else if let Ok(fd) = sys::open_path(npfd.as_fd(), &newname) {
            // A whiteout holds the destination name: rename replaces it, except for dirs.
            let st = sys::fstat(fd.as_fd())?;
            if Self::upper_is_whiteout(fd.as_fd(), &st) && src.kind == FileKind::Directory {
                sys::unlinkat(npfd.as_fd(), &newname, 0)?;
            }
        }
        if !src_below {
            sys::renameat2(pfd.as_fd(), &name, npfd.as_fd(), &newname, 0)?;
        } else if src.kind != FileKind::Directory {
            // Move and leave a whiteout in one step.
            sys::renameat2(
                pfd.as_fd(),
                &name,
                npfd.as_fd(),
                &newname,
                libc::RENAME_WHITEOUT,
            )?;
        } else {
            sys::renameat2(pfd.as_fd(), &name, npfd.as_fd(), &newname, 0)?;
            self.whiteout(pfd.as_fd(), &name)?;
        }
        self.renamed(Some(src.ino), newparent, &newname, None, parent, &name);
        Ok(())
    }

    /// Records new names after a rename (re-resolution after a stack change goes by name).
    fn renamed(
        &self,
        src: Option<u64>,
        newparent: u64,
        newname: &CStr,
        exchanged: Option<u64>,
        parent: u64,
        name: &CStr,
    ) {
        let set = |ino: Option<u64>, p: u64, n: &CStr| {
            if let Some(node) = ino.and_then(|i| self.node(i).ok()) {
                let mut st = node.st.write().unwrap();
                st.parent = p;
                st.name = n.to_bytes().to_vec();
            }
        };
        set(src, newparent, newname);
        set(exchanged, parent, name);
    }

    // ----- open files --------------------------------------------------------------------

    fn add_handle(&self, ino: u64, kind: HandleKind, writable: bool) -> u64 {
        let numbering = TreeNumbering::of(&self.stack());
        self.add_handle_numbered(ino, kind, writable, numbering)
    }

    fn add_handle_numbered(
        &self,
        ino: u64,
        kind: HandleKind,
        writable: bool,
        numbering: TreeNumbering,
    ) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let counted = match (&kind, writable) {
            (HandleKind::Upper(fd), true) => {
                sys::fstat(fd.as_fd()).map_or(0, |st| st.st_size as u64)
            }
            (HandleKind::Stacked(sf), true) => self.stacked_usage(sf),
            _ => 0,
        };
        self.handles.write().unwrap().insert(
            fh,
            Arc::new(Handle {
                ino,
                kind,
                writable,
                counted: AtomicU64::new(counted),
                unchecked: AtomicU64::new(0),
                dir_lock: Mutex::new(()),
                numbering,
                listing: Mutex::new(None),
            }),
        );
        fh
    }

    /// Adds the growth of a writable handle's file since it was last counted.
    fn count_growth(&self, h: &Handle) {
        if !h.writable {
            return;
        }
        let now = match &h.kind {
            HandleKind::Upper(fd) => sys::fstat(fd.as_fd()).ok().map(|st| st.st_size as u64),
            HandleKind::Stacked(sf) => Some(self.stacked_usage(sf)),
            _ => None,
        };
        if let Some(now) = now {
            let before = h.counted.swap(now, Ordering::Relaxed);
            let delta = now as i64 - before as i64;
            let total = self.upper_bytes.fetch_add(delta, Ordering::Relaxed) + delta;
            let threshold = self.seal_threshold.load(Ordering::Relaxed) as i64;
            if threshold > 0 && total >= threshold && total - delta < threshold {
                self.kick_archiver();
            }
        }
    }

    /// Bytes of file data in the writable tree (kept up to date incrementally; files held
    /// open for writing are counted as they grow when this is called).
    pub fn upper_bytes(&self) -> u64 {
        let handles: Vec<Arc<Handle>> = self.handles.read().unwrap().values().cloned().collect();
        for h in handles {
            self.count_growth_gated(&h);
        }
        self.upper_bytes.load(Ordering::Relaxed).max(0) as u64
    }

    /// Sets the writable tree's byte count (measured by the caller at start-up).
    pub fn set_upper_bytes(&self, bytes: u64) {
        self.upper_bytes.store(bytes as i64, Ordering::Relaxed);
    }

    /// Flags for the backing descriptor: the kernel already did O_TRUNC (as a setattr) and
    /// computes append offsets itself, so neither may act again on our descriptor.
    fn backing_flags(flags: i32) -> i32 {
        flags & !(libc::O_TRUNC | libc::O_APPEND | libc::O_CREAT | libc::O_EXCL)
    }

    /// Opens a file; returns the handle number. `daemon_io`: the caller serves this handle's
    /// I/O through the daemon (no passthrough), so a regular file open for writing can stay
    /// in a generation that is frozen and sealed while it is open (see `freeze`).
    pub fn open(&self, ino: u64, flags: i32, daemon_io: bool) -> SysResult<(u64, Arc<Handle>)> {
        let _gate = self.shared_gate();
        let n = self.node(ino)?;
        let place = self.place(ino, &n)?;
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        let upper = match place.upper {
            Some(fd) => Some(fd),
            None if writes || n.kind != FileKind::Regular => Some(self.copy_up(ino)?),
            None => None,
        };
        let stacked = match &upper {
            Some(fd) if n.kind == FileKind::Regular && daemon_io => {
                Some(self.daemon_file(ino, fd.as_fd())?)
            }
            // Open beside a daemon-served handle (a writer): share its state, so this handle
            // follows the file when a freeze carries it over to a stacked copy (a reader of a
            // growing log must see what is written after the seal).
            Some(_)
                if n.kind == FileKind::Regular
                    && let Some(sf) = self.live_stacked(ino) =>
            {
                Some(sf)
            }
            Some(fd) if n.kind == FileKind::Regular && self.stack().may_have_recorded() => {
                self.stacked_file(ino, fd.as_fd())?
            }
            _ => None,
        };
        let kind = match upper {
            _ if stacked.is_some() => HandleKind::Stacked(stacked.expect("checked")),
            Some(fd) => HandleKind::Upper(sys::reopen(fd.as_fd(), Self::backing_flags(flags))?),
            None => HandleKind::Lower(place.lower.first().cloned().ok_or(Errno::EIO)?),
        };
        let fh = self.add_handle(ino, kind, writes);
        Ok((fh, self.handle(fh)?))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        caller: &Caller,
        daemon_io: bool,
    ) -> SysResult<(Attr, u64, Arc<Handle>)> {
        let _gate = self.shared_gate();
        let cname = sys::cname(name)?;
        let (p, pfd, place, _) = self.prepare_create(parent, &cname)?;
        let mode = Self::create_mode(&p, pfd.as_fd(), mode, umask);
        // Create and open in one call; O_EXCL only if the caller asked for it, so that an
        // existing file is opened as open(2) would.
        let open_flags = Self::backing_flags(flags) | libc::O_CREAT | (flags & libc::O_EXCL);
        let file = std::cell::Cell::new(None);
        self.make_owned(pfd.as_fd(), &cname, caller, || {
            let fd = sys::openat(pfd.as_fd(), &cname, open_flags, mode & 0o7777)?;
            file.set(Some(fd));
            Ok(())
        })?;
        let fd = file.take().ok_or(Errno::EIO)?;
        let attr = self.remember_upper(parent, &place, &cname)?;
        let kind = if daemon_io && attr.kind == FileKind::Regular {
            HandleKind::Stacked(self.daemon_file(attr.ino, fd.as_fd())?)
        } else {
            HandleKind::Upper(fd)
        };
        let fh = self.add_handle(attr.ino, kind, true);
        Ok((attr, fh, self.handle(fh)?))
    }

    /// Calls `reply` with up to `size` bytes of the file from `offset` (short at end of
    /// file), without an intermediate copy where it can (archived data) and without zero-filling
    /// a fresh buffer for every request (one buffer per thread otherwise).
    pub fn read_with<R>(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
        reply: impl FnOnce(&[u8]) -> R,
    ) -> SysResult<R> {
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let h = self.handle(fh)?;
        match &h.kind {
            HandleKind::Upper(fd) => BUF.with(|cell| {
                let mut fresh = Vec::new();
                let mut held = cell.try_borrow_mut();
                let buf = match held.as_deref_mut() {
                    Ok(b) => b,
                    Err(_) => &mut fresh,
                };
                let want = size as usize;
                if buf.len() < want {
                    buf.resize(want, 0);
                }
                let mut done = 0;
                while done < want {
                    let n = sys::pread(fd.as_fd(), &mut buf[done..want], offset + done as u64)?;
                    if n == 0 {
                        break;
                    }
                    done += n;
                }
                Ok(reply(&buf[..done]))
            }),
            HandleKind::Lower(part) => match self.live_stacked(h.ino) {
                // Copied up (stacked) since it was opened: read the file as it is now.
                Some(sf) => {
                    let mut buf = vec![0u8; size as usize];
                    let n = self.stacked_read(&sf, offset, &mut buf)?;
                    Ok(reply(&buf[..n]))
                }
                None => part.read_with(offset, size as usize, reply),
            },
            HandleKind::Stacked(sf) => {
                let mut buf = vec![0u8; size as usize];
                let n = self.stacked_read(sf, offset, &mut buf)?;
                Ok(reply(&buf[..n]))
            }
            HandleKind::Merged(_) => Err(Errno::EISDIR),
        }
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> SysResult<Vec<u8>> {
        let h = self.handle(fh)?;
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        match &h.kind {
            HandleKind::Upper(fd) => {
                while done < buf.len() {
                    let n = sys::pread(fd.as_fd(), &mut buf[done..], offset + done as u64)?;
                    if n == 0 {
                        break;
                    }
                    done += n;
                }
            }
            HandleKind::Lower(part) => {
                // Copied up (stacked) since it was opened: read the file as it is now.
                done = match self.live_stacked(h.ino) {
                    Some(sf) => self.stacked_read(&sf, offset, &mut buf)?,
                    None => part.read(offset, &mut buf)?,
                };
            }
            HandleKind::Stacked(sf) => {
                done = self.stacked_read(sf, offset, &mut buf)?;
            }
            HandleKind::Merged(_) => return Err(Errno::EISDIR),
        }
        buf.truncate(done);
        Ok(buf)
    }

    /// Writes `data` at `offset`. `kill_suidgid`: the writer lacks CAP_FSETID and the kernel
    /// left it to us to clear the file's set-user-ID bit and its set-group-ID bit (when group
    /// execute is set), as a write by such a caller does (FUSE direct-I/O writes).
    pub fn write(&self, fh: u64, offset: u64, data: &[u8], kill_suidgid: bool) -> SysResult<usize> {
        let h = self.handle(fh)?;
        if let HandleKind::Stacked(sf) = &h.kind {
            let n = self.stacked_write(sf, offset, data, kill_suidgid)?;
            self.throttle(&h, n);
            return Ok(n);
        }
        let fd = h.fd()?;
        if kill_suidgid {
            Self::clear_setid(fd)?;
        }
        let mut done = 0;
        while done < data.len() {
            done += sys::pwrite(fd, &data[done..], offset + done as u64)?;
        }
        // Only daemon-served writes come here (passthrough writes go to the file directly):
        // they are counted as they land, so the tree reaching the threshold starts a seal
        // at once and a writer short of room waits for one.
        self.throttle(&h, done);
        Ok(done)
    }

    /// Clears the set-user-ID bit and the set-group-ID bit (when group execute is set, i.e.
    /// not a mandatory-locking mark) of the file behind `fd`, as a write by an unprivileged
    /// caller does. One fstat when neither is set.
    pub(crate) fn clear_setid(fd: BorrowedFd<'_>) -> SysResult<()> {
        let mode = sys::fstat(fd)?.st_mode & 0o7777;
        let mut kill = libc::S_ISUID;
        if mode & libc::S_IXGRP != 0 {
            kill |= libc::S_ISGID;
        }
        if mode & kill != 0 {
            sys::chmod_fd(fd, mode & !kill)?;
        }
        Ok(())
    }

    pub fn release(&self, fh: u64) {
        // Removed and counted with freezes kept out: a freeze in between carries the file
        // into the new tree without this handle (so without resetting its count), and the
        // count would then take the file's old size off the new tree's total (the archiver
        // then saw less than the threshold while the tree held more, and never sealed).
        let _gate = self.gate_unless_held();
        let h = self.handles.write().unwrap().remove(&fh);
        if let Some(h) = h {
            self.count_growth(&h);
        }
    }

    /// The gate held shared, unless this thread holds it already (it is not re-entrant).
    fn gate_unless_held(&self) -> Option<GateGuard<'_>> {
        if GATE_DEPTH.with(|d| d.get()) > 0 {
            None
        } else {
            Some(self.shared_gate())
        }
    }

    /// `count_growth` with freezes kept out: a freeze resets the counts of the handles it
    /// carries over, so a count must not straddle it.
    fn count_growth_gated(&self, h: &Handle) {
        let _gate = self.gate_unless_held();
        self.count_growth(h);
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> SysResult<()> {
        let h = self.handle(fh)?;
        match &h.kind {
            HandleKind::Upper(fd) => self.observed_sync(|| sys::fsync(fd.as_fd(), datasync)),
            HandleKind::Stacked(sf) => self.observed_sync(|| self.stacked_fsync(sf, datasync)),
            // Archived data is durable on the media already.
            _ => Ok(()),
        }
    }

    /// Runs a sync of a writable file, reporting its duration to the sync observer.
    /// Background I/O yields to it while it runs (see `set_foreground_syncs`).
    fn observed_sync(&self, sync: impl FnOnce() -> SysResult<()>) -> SysResult<()> {
        let started = std::time::Instant::now();
        let under_way = self.foreground_syncs.get().map(|s| s.begin());
        let r = sync();
        if let Some(observe) = self.sync_observer.get() {
            observe(started.elapsed());
        }
        drop(under_way);
        r
    }

    /// Calls `observe` with the duration of every fsync/fdatasync of a writable file (the
    /// media scheduler paces background writes by it). Set once.
    pub fn set_sync_observer(&self, observe: SyncObserver) {
        let _ = self.sync_observer.set(observe);
    }

    /// Every fsync/fdatasync of a writable file or directory counts as under way in `syncs`
    /// while it runs: seal and merge writes, the seal's reads and a sealed tree's deletion
    /// hold their next piece of I/O back meanwhile (see `spinfs_media::fgsync`). Set once.
    pub fn set_foreground_syncs(&self, syncs: Arc<spinfs_media::ForegroundSyncs>) {
        let _ = self.foreground_syncs.set(syncs);
    }

    pub fn fallocate(&self, fh: u64, mode: i32, offset: u64, len: u64) -> SysResult<()> {
        let h = self.handle(fh)?;
        if let HandleKind::Stacked(sf) = &h.kind {
            return self.stacked_fallocate(sf, mode, offset, len);
        }
        sys::fallocate(h.fd()?, mode, offset, len)
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> SysResult<i64> {
        let h = self.handle(fh)?;
        // SEEK_DATA/SEEK_HOLE of daemon-served data: (start, whether data is sought).
        let data_seek = || -> SysResult<(u64, bool)> {
            let data = match whence {
                libc::SEEK_DATA => true,
                libc::SEEK_HOLE => false,
                _ => return Err(Errno::EINVAL),
            };
            let start = u64::try_from(offset).map_err(|_| Errno(libc::ENXIO))?;
            Ok((start, data))
        };
        let found = match &h.kind {
            HandleKind::Upper(fd) => return sys::lseek(fd.as_fd(), offset, whence),
            HandleKind::Merged(_) => return Err(Errno::EISDIR),
            HandleKind::Stacked(sf) => {
                let (start, data) = data_seek()?;
                self.stacked_seek(sf, start, data)?
            }
            HandleKind::Lower(part) => {
                let (start, data) = data_seek()?;
                part.seek(start, data)?
            }
        };
        found.map(|o| o as i64).ok_or(Errno(libc::ENXIO))
    }

    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> SysResult<usize> {
        let hi = self.handle(fh_in)?;
        let ho = self.handle(fh_out)?;
        if matches!(ho.kind, HandleKind::Stacked(_)) {
            let data = self.read(fh_in, off_in, len.min(8 << 20) as u32)?;
            return self.write(fh_out, off_out, &data, false);
        }
        let out = ho.fd()?;
        match &hi.kind {
            HandleKind::Upper(fd) => {
                let len = len.min(1 << 30) as usize;
                sys::copy_file_range(fd.as_fd(), off_in, out, off_out, len)
            }
            _ => {
                let data = self.read(fh_in, off_in, len.min(8 << 20) as u32)?;
                let mut done = 0;
                while done < data.len() {
                    done += sys::pwrite(out, &data[done..], off_out + done as u64)?;
                }
                Ok(done)
            }
        }
    }

    // ----- directories -------------------------------------------------------------------

    pub fn opendir(&self, ino: u64) -> SysResult<u64> {
        let n = self.node(ino)?;
        // Like lookups, opendir does not hold the gate: when a freeze, a seal or a merge
        // changes the stack meanwhile, the placement (or listing) came from one stack and the
        // numbers from the other (entries of the just-frozen tree got the new generation's
        // numbers), so it starts again once the change is over.
        loop {
            let seq = self.stack_change_begin();
            let stack = self.stack();
            let res = self.opendir_in(ino, &n, &stack);
            if self.stack_unchanged_since(seq) && self.stack().epoch == stack.epoch {
                return res;
            }
            if let Ok(fh) = res {
                self.release(fh);
            }
        }
    }

    fn opendir_in(&self, ino: u64, n: &Node, stack: &Stack) -> SysResult<u64> {
        let place = self.place(ino, n)?;
        let numbering = TreeNumbering::of(stack);
        if place.is_upper_only() {
            let fd = place.upper.unwrap();
            let dfd = sys::reopen(fd.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
            return Ok(self.add_handle_numbered(ino, HandleKind::Upper(dfd), false, numbering));
        }
        // A merged directory: list it once, so offsets stay stable for seekdir/telldir.
        let parent = n.st.read().unwrap().parent;
        let mut list = vec![
            DirEntry {
                ino,
                next: 1,
                kind: FileKind::Directory,
                name: b".".to_vec(),
            },
            DirEntry {
                ino: if ino == ROOT_INO { ROOT_INO } else { parent },
                next: 2,
                kind: FileKind::Directory,
                name: b"..".to_vec(),
            },
        ];
        for (name, cino, kind) in self.merged_names(&place)? {
            let next = list.len() as i64 + 1;
            list.push(DirEntry {
                ino: cino,
                next,
                kind,
                name,
            });
        }
        Ok(self.add_handle_numbered(ino, HandleKind::Merged(list), false, numbering))
    }

    /// Entries of an open directory from position cookie `pos` (0 = start), "." and ".."
    /// included.
    pub fn readdir(&self, fh: u64, pos: i64) -> SysResult<Vec<DirEntry>> {
        let h = self.handle(fh)?;
        let fd = match &h.kind {
            HandleKind::Merged(list) => {
                let start = usize::try_from(pos).unwrap_or(usize::MAX).min(list.len());
                return Ok(list[start..].iter().take(1024).cloned().collect());
            }
            HandleKind::Upper(fd) => fd,
            HandleKind::Lower(_) | HandleKind::Stacked(_) => return Err(Errno::ENOTDIR),
        };
        let _guard = h.dir_lock.lock().unwrap();
        if let Some(list) = &*h.listing.lock().unwrap() {
            // The handle's tree was sealed and is gone: its listing, read just before. `pos`
            // is a cookie of that tree (an entry's `next`): continue after that entry.
            let start = match pos {
                0 => 0,
                _ => list
                    .iter()
                    .position(|e| e.next == pos)
                    .map_or(list.len(), |i| i + 1),
            };
            return Ok(list[start..].iter().take(1024).cloned().collect());
        }
        let raw = sys::read_dir_at(fd.as_fd(), pos, 32 * 1024)?;
        Self::number_entries(&h, fd.as_fd(), raw)
    }

    /// Directory entries of an upper directory handle, numbered as the tree the handle reads
    /// (it may have been frozen since opendir).
    fn number_entries(
        h: &Handle,
        fd: BorrowedFd<'_>,
        raw: Vec<sys::RawDirEntry>,
    ) -> SysResult<Vec<DirEntry>> {
        let tree = h.numbering;
        let mut out = Vec::with_capacity(raw.len());
        for e in raw {
            let ino = if e.name == b".." && h.ino == ROOT_INO {
                ROOT_INO
            } else if e.name == b"." {
                h.ino
            } else if e.ino == tree.root_backing_ino {
                ROOT_INO
            } else if !tree.may_have_recorded || e.name == b".." {
                crate::seal::generation_ino(tree.generation, e.ino, None)
            } else {
                // Copy-ups carry their number; read it.
                let name = CString::new(e.name.clone()).map_err(|_| Errno::EIO)?;
                match sys::open_path(fd, &name) {
                    Ok(cfd) => {
                        let st = sys::fstat(cfd.as_fd())?;
                        tree.ino(cfd.as_fd(), &st)
                    }
                    Err(_) => continue,
                }
            };
            let kind = match FileKind::from_dtype(e.kind) {
                Some(k) => k,
                None => {
                    let name = CString::new(e.name.clone()).map_err(|_| Errno::EIO)?;
                    FileKind::from_mode(sys::fstatat(fd, &name)?.st_mode)
                }
            };
            out.push(DirEntry {
                ino,
                next: e.off,
                kind,
                name: e.name,
            });
        }
        Ok(out)
    }

    /// Directory handles opened on the tree of `generation` (before it was frozen) read their
    /// whole listing now: the tree is deleted once its layer is in place, and a directory
    /// opened before a freeze is read on, by the cookies of that tree, after the seal.
    fn list_handles_of(&self, generation: u64) {
        let handles: Vec<Arc<Handle>> = self
            .handles
            .read()
            .unwrap()
            .values()
            .filter(|h| h.numbering.generation == generation)
            .cloned()
            .collect();
        for h in handles {
            let HandleKind::Upper(fd) = &h.kind else {
                continue;
            };
            if !sys::fstat(fd.as_fd()).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR) {
                continue;
            }
            let _guard = h.dir_lock.lock().unwrap();
            let mut list = Vec::new();
            let mut pos = 0;
            let res = loop {
                match sys::read_dir_at(fd.as_fd(), pos, 64 * 1024) {
                    Ok(raw) if raw.is_empty() => break Ok(()),
                    Ok(raw) => {
                        pos = raw.last().map_or(pos, |e| e.off);
                        match Self::number_entries(&h, fd.as_fd(), raw) {
                            Ok(entries) => list.extend(entries),
                            Err(e) => break Err(e),
                        }
                    }
                    Err(e) => break Err(e),
                }
            };
            match res {
                Ok(()) => *h.listing.lock().unwrap() = Some(list),
                Err(e) => tracing::warn!(
                    ino = h.ino,
                    "listing an open directory of a sealed generation: {e}"
                ),
            }
        }
    }

    pub fn fsyncdir(&self, fh: u64, datasync: bool) -> SysResult<()> {
        let h = self.handle(fh)?;
        match &h.kind {
            HandleKind::Merged(_) => {
                // A directory with lower parts: its changes (new names, whiteouts) are in
                // its upper part, which must be synced like any directory.
                let node = self.node(h.ino)?;
                match self.place(h.ino, &node)?.upper {
                    Some(fd) => {
                        let dir = sys::reopen(fd.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
                        self.observed_sync(|| sys::fsync(dir.as_fd(), datasync))
                    }
                    None => Ok(()), // never changed since it was archived
                }
            }
            _ => self.fsync(fh, datasync),
        }
    }

    pub fn statfs(&self) -> SysResult<FsStats> {
        let root = self.node(ROOT_INO)?;
        let fd = self.place(ROOT_INO, &root)?.upper.ok_or(Errno::EIO)?;
        let st = sys::fstatvfs(fd.as_fd())?;
        Ok(FsStats {
            blocks: st.f_blocks,
            bfree: st.f_bfree,
            bavail: st.f_bavail,
            files: st.f_files,
            ffree: st.f_ffree,
            bsize: st.f_bsize as u32,
            namelen: st.f_namemax as u32,
            frsize: st.f_frsize as u32,
        })
    }

    // ----- xattrs ------------------------------------------------------------------------

    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> SysResult<()> {
        let _gate = self.shared_gate();
        let n = self.node(ino)?;
        let fd = self.copy_up(ino)?;
        if name.as_bytes() == DEFAULT_ACL_XATTR {
            n.default_acl.store(ACL_UNKNOWN, Ordering::Relaxed);
        }
        let stored =
            CString::new(markers::escape_xattr(name.as_bytes())).map_err(|_| Errno::EINVAL)?;
        sys::setxattr_fd(fd.as_fd(), &stored, value, flags)
    }

    /// Reads an xattr; with `size` 0 only its length.
    pub fn getxattr(&self, ino: u64, name: &OsStr, size: u32) -> SysResult<XattrReply> {
        let n = self.node(ino)?;
        let place = self.place(ino, &n)?;
        let value = match &place.upper {
            Some(fd) => {
                let stored = CString::new(markers::escape_xattr(name.as_bytes()))
                    .map_err(|_| Errno::EINVAL)?;
                if size == 0 {
                    let len = sys::getxattr_fd(fd.as_fd(), &stored, &mut [])?;
                    return Ok(XattrReply::Size(len as u32));
                }
                let mut buf = vec![0u8; size as usize];
                let len = sys::getxattr_fd(fd.as_fd(), &stored, &mut buf)?;
                buf.truncate(len);
                return Ok(XattrReply::Data(buf));
            }
            None => {
                let p = place.lower.first().ok_or(Errno::EIO)?;
                p.xattrs()?
                    .into_iter()
                    .find(|(n, _)| n.as_slice() == name.as_bytes())
                    .map(|(_, v)| v)
                    .ok_or(Errno::ENODATA)?
            }
        };
        if size == 0 {
            Ok(XattrReply::Size(value.len() as u32))
        } else if value.len() > size as usize {
            Err(Errno::ERANGE)
        } else {
            Ok(XattrReply::Data(value))
        }
    }

    pub fn listxattr(&self, ino: u64, size: u32) -> SysResult<XattrReply> {
        let n = self.node(ino)?;
        let place = self.place(ino, &n)?;
        let mut out = Vec::new();
        match &place.upper {
            Some(fd) => {
                let mut buf = vec![0u8; 64 * 1024];
                let len = sys::listxattr_fd(fd.as_fd(), &mut buf)?;
                for name in buf[..len].split(|&b| b == 0).filter(|s| !s.is_empty()) {
                    if let Some(user) = markers::unescape_xattr(name) {
                        out.extend_from_slice(&user);
                        out.push(0);
                    }
                }
            }
            None => {
                let p = place.lower.first().ok_or(Errno::EIO)?;
                for (name, _) in p.xattrs()? {
                    out.extend_from_slice(&name);
                    out.push(0);
                }
            }
        }
        if size == 0 {
            Ok(XattrReply::Size(out.len() as u32))
        } else if out.len() > size as usize {
            Err(Errno::ERANGE)
        } else {
            Ok(XattrReply::Data(out))
        }
    }

    pub fn removexattr(&self, ino: u64, name: &OsStr) -> SysResult<()> {
        let _gate = self.shared_gate();
        let n = self.node(ino)?;
        let fd = self.copy_up(ino)?;
        if name.as_bytes() == DEFAULT_ACL_XATTR {
            n.default_acl.store(ACL_UNKNOWN, Ordering::Relaxed);
        }
        let stored =
            CString::new(markers::escape_xattr(name.as_bytes())).map_err(|_| Errno::EINVAL)?;
        sys::removexattr_fd(fd.as_fd(), &stored)
    }

    /// access(2) check with the caller's uid and primary gid.
    pub fn access(&self, ino: u64, mask: i32, caller: &Caller) -> SysResult<()> {
        let a = self.getattr(ino, None)?;
        if mask == libc::F_OK {
            return Ok(());
        }
        let mode = a.perm as u32;
        if caller.uid == 0 {
            // Root may do anything but execute a file nobody may execute.
            if mask & libc::X_OK != 0 && a.kind != FileKind::Directory && mode & 0o111 == 0 {
                return Err(Errno::EACCES);
            }
            return Ok(());
        }
        let bits = if caller.uid == a.uid {
            (mode >> 6) & 7
        } else if caller.gid == a.gid {
            (mode >> 3) & 7
        } else {
            mode & 7
        };
        if (mask as u32) & !bits & 7 != 0 {
            return Err(Errno::EACCES);
        }
        Ok(())
    }

    /// Number of inodes the kernel currently references (for status and tests).
    pub fn known_inodes(&self) -> usize {
        self.nodes.read().unwrap().len()
    }
}

/// Answer to getxattr/listxattr: the length asked for, or the data.
#[derive(Debug)]
pub enum XattrReply {
    Size(u32),
    Data(Vec<u8>),
}
