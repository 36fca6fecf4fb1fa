//! FUSE adapter: turns kernel requests into `spinfs_store::Volume` calls and back.
//!
//! This is the only crate that knows the kernel protocol. It adds what is protocol-specific
//! and nothing else: attribute conversion, reply encoding, and FUSE passthrough bookkeeping
//! (one backing id per inode, shared by all its open handles, as the kernel requires).

use fuser::{
    AccessFlags, BackingId, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use spinfs_store::volume::{
    Attr, Caller, FileKind, Handle, SetAttr, SetTime, Timestamp, XattrReply,
};
use spinfs_store::{Errno as StoreErrno, Volume};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the kernel may cache attributes and names. Every change goes through this daemon
/// (the kernel invalidates on its own writes), so a short TTL costs little and bounds staleness
/// of anything changed behind the mount.
const TTL: Duration = Duration::from_secs(1);

/// Options of one mount.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// Shown as the mount's source in /proc/mounts (the store path).
    pub fsname: String,
    pub allow_other: bool,
    pub read_only: bool,
    /// Extra kernel mount flags: nosuid, nodev, noexec, noatime, dirsync, sync.
    pub flags: Vec<String>,
    pub threads: usize,
    /// Use FUSE passthrough for regular files when the kernel offers it.
    pub passthrough: bool,
    /// Which files opened for writing use passthrough too (see `Writers`).
    pub writers: Writers,
}

/// How files opened for writing are served. A daemon-served writer lets a seal archive the
/// file while it stays open (file stacking: the SSD holds only what was written since the
/// last freeze); a passthrough writer writes straight into the SSD file, which a freeze must
/// then move whole into the new generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writers {
    /// Every writer by passthrough (`-o passthrough_writes`).
    Passthrough,
    /// The default: write-only opens (`cp`, logs, recordings: the files that grow large
    /// while open) by the daemon with direct I/O, near native speed; read-write opens
    /// (databases, images, fsx) by passthrough, as the daemon's page-cache path for them
    /// runs at about a third of native speed.
    WriteOnlyByDaemon,
    /// Every writer by the daemon (`-o nopassthrough_writes`), read-write opens through the
    /// FUSE page cache (reads stay cached, writes run at about a third of native speed).
    ByDaemon,
    /// Every writer by the daemon with direct I/O (`-o direct_writes`): read-write opens write
    /// near native speed and are archived while open, but their reads (and only theirs) go to
    /// the daemon every time instead of the page cache.
    ByDaemonDirect,
}

impl MountConfig {
    /// Parses `-o a,b,c`. Unknown options are refused.
    pub fn parse_options(&mut self, opts: &str) -> Result<(), String> {
        for opt in opts.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            match opt {
                "allow_other" => self.allow_other = true,
                "ro" => self.read_only = true,
                "rw" => self.read_only = false,
                "nosuid" | "nodev" | "noexec" | "noatime" | "dirsync" | "sync" | "suid" | "dev"
                | "exec" | "atime" | "async" => self.flags.push(opt.to_string()),
                "default_permissions" => {}
                "passthrough" => self.passthrough = true,
                "nopassthrough" => self.passthrough = false,
                "passthrough_writes" => self.writers = Writers::Passthrough,
                "nopassthrough_writes" => self.writers = Writers::ByDaemon,
                "direct_writes" => self.writers = Writers::ByDaemonDirect,
                o if o.starts_with("threads=") => {
                    self.threads = o[8..]
                        .parse()
                        .ok()
                        .filter(|n| (1..=256).contains(n))
                        .ok_or_else(|| format!("bad -o value '{o}': threads=1..256"))?;
                }
                other => return Err(format!("unknown -o option '{other}'")),
            }
        }
        Ok(())
    }

    fn fuser_config(&self) -> fuser::Config {
        use fuser::MountOption as M;
        let mut c = fuser::Config::default();
        c.mount_options = vec![
            M::FSName(self.fsname.clone()),
            M::Subtype("spinfs".into()),
            M::DefaultPermissions,
            if self.read_only { M::RO } else { M::RW },
        ];
        for f in &self.flags {
            c.mount_options.push(match f.as_str() {
                "nosuid" => M::NoSuid,
                "nodev" => M::NoDev,
                "noexec" => M::NoExec,
                "noatime" => M::NoAtime,
                "dirsync" => M::DirSync,
                "sync" => M::Sync,
                "suid" => M::Suid,
                "dev" => M::Dev,
                "exec" => M::Exec,
                "atime" => M::Atime,
                _ => M::Async,
            });
        }
        if self.allow_other {
            c.acl = fuser::SessionACL::All;
        }
        c.n_threads = Some(self.threads.max(1));
        c.clone_fd = true;
        c
    }
}

impl Default for MountConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        MountConfig {
            fsname: "spinfs".into(),
            allow_other: false,
            read_only: false,
            flags: Vec::new(),
            threads: (cores * 2).clamp(4, 16),
            passthrough: true,
            writers: Writers::WriteOnlyByDaemon,
        }
    }
}

/// Passthrough state of one inode: the kernel wants the same backing id for every handle
/// opened on an inode while any is open.
struct Backing {
    id: BackingId,
    opens: usize,
    /// (device, inode) of the backing file.
    file: (u64, u64),
}

fn file_id(fd: std::os::fd::BorrowedFd<'_>) -> Option<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a stat into the buffer on success.
    let r = unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) };
    if r != 0 {
        return None;
    }
    // SAFETY: fstat succeeded.
    let st = unsafe { st.assume_init() };
    Some((st.st_dev, st.st_ino))
}

/// The FUSE filesystem.
pub struct SpinFs {
    vol: Arc<Volume>,
    passthrough: AtomicBool,
    writers: Writers,
    backing: Mutex<HashMap<u64, Backing>>,
    /// Handles opened in passthrough mode, by handle number → inode.
    passthrough_handles: Mutex<HashMap<u64, u64>>,
    /// Regular files open without passthrough (archived data served by the daemon): inode →
    /// count, and handle → inode.
    cached_opens: Mutex<HashMap<u64, usize>>,
    cached_handles: Mutex<HashMap<u64, u64>>,
}

impl SpinFs {
    pub fn new(vol: Arc<Volume>, passthrough: bool) -> SpinFs {
        SpinFs {
            vol,
            passthrough: AtomicBool::new(passthrough),
            writers: Writers::WriteOnlyByDaemon,
            backing: Mutex::new(HashMap::new()),
            passthrough_handles: Mutex::new(HashMap::new()),
            cached_opens: Mutex::new(HashMap::new()),
            cached_handles: Mutex::new(HashMap::new()),
        }
    }

    /// Which files opened for writing use passthrough (see `Writers`).
    pub fn with_writers(mut self, writers: Writers) -> SpinFs {
        self.writers = writers;
        self
    }

    /// Whether an open with `flags` gets passthrough (if the kernel and the file allow).
    fn wants_passthrough(&self, flags: i32) -> bool {
        let wants = match flags & libc::O_ACCMODE {
            libc::O_RDONLY if flags & libc::O_TRUNC == 0 => true,
            libc::O_RDWR => !matches!(self.writers, Writers::ByDaemon | Writers::ByDaemonDirect),
            _ => self.writers == Writers::Passthrough,
        };
        self.passthrough.load(Ordering::Relaxed) && wants
    }

    /// Whether a daemon-served regular file opened with `flags` (no passthrough, not archived
    /// data) gets direct I/O. A write-only handle does: the kernel hands the writer's
    /// pages to the daemon without copying them into the FUSE inode's page cache first, and
    /// sends no `security.capability` lookup before every write (the daemon clears set-id
    /// bits itself, `FUSE_WRITE_KILL_SUIDGID`); nothing can be read or mapped through such a
    /// handle, so it loses no caching. Direct-I/O opens leave the inode out of cached mode, so
    /// passthrough readers of the same inode stay possible. A read-write handle does only with
    /// `Writers::ByDaemonDirect`, as it would lose the page cache for its reads.
    fn direct_io(writers: Writers, flags: i32) -> bool {
        match flags & libc::O_ACCMODE {
            libc::O_WRONLY => true,
            libc::O_RDWR => writers == Writers::ByDaemonDirect,
            _ => false,
        }
    }

    /// Mounts and serves until unmounted. `ready` runs once the kernel handshake is done.
    pub fn mount(
        self,
        mountpoint: &Path,
        cfg: &MountConfig,
        ready: impl FnOnce(),
    ) -> io::Result<()> {
        let session = fuser::Session::new(self, mountpoint, &cfg.fuser_config())?;
        ready();
        session.run()
    }

    /// Takes (or shares) the inode's backing id, creating it with `open_backing` if this is
    /// the first passthrough open of the inode, and registers handle `fh` as passthrough.
    /// `None` means passthrough is not available and the handle must be served by the daemon.
    fn backing_for<'a>(
        &self,
        mut map: std::sync::MutexGuard<'a, HashMap<u64, Backing>>,
        ino: u64,
        fh: u64,
        file: std::os::fd::BorrowedFd<'_>,
        open_backing: impl FnOnce() -> io::Result<BackingId>,
    ) -> Option<std::sync::MutexGuard<'a, HashMap<u64, Backing>>> {
        let file = file_id(file)?;
        if let Some(b) = map.get(&ino)
            && b.file != file
        {
            // The inode moved to another backing file (a freeze, a copy-up) while handles
            // on the old one are open: this one is served by the daemon.
            return None;
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = map.entry(ino) {
            match open_backing() {
                Ok(id) => {
                    slot.insert(Backing { id, opens: 0, file });
                }
                Err(e) => {
                    tracing::warn!("passthrough unavailable ({e}); serving I/O through the daemon");
                    self.passthrough.store(false, Ordering::Relaxed);
                    return None;
                }
            }
        }
        map.get_mut(&ino).expect("inserted above").opens += 1;
        self.passthrough_handles.lock().unwrap().insert(fh, ino);
        Some(map)
    }

    /// Decides how the handle `fh` of the regular file `ino` is served and registers it:
    /// by passthrough when `wants` it, the handle has a backing file and no daemon-served
    /// handle of the inode is open (the kernel refuses passthrough beside cached opens), else
    /// by the daemon. `Conflict`: a daemon-served handle is asked for while passthrough
    /// handles of the inode are open, which the kernel refuses (it wants every open of an
    /// inode in passthrough mode to use the same backing file): the caller opens the file
    /// again for passthrough. Decision and registration happen under the `backing` lock, so
    /// concurrent opens of an inode cannot pick conflicting modes.
    fn serve<'a>(
        &'a self,
        ino: u64,
        fh: u64,
        handle: &Handle,
        wants: bool,
        flags: i32,
        open_backing: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> io::Result<BackingId>,
    ) -> Served<'a> {
        let map = self.backing.lock().unwrap();
        let daemon_served = self.cached_opens.lock().unwrap().contains_key(&ino);
        if wants
            && !daemon_served
            && let Some(fd) = handle.backing_fd()
        {
            // `None`: the inode's passthrough handles are on another backing file (a freeze
            // or a copy-up moved it) or passthrough is unavailable: served by the daemon.
            match self.backing_for(map, ino, fh, fd, || open_backing(fd)) {
                Some(map) => return Served::Passthrough(map),
                None => return self.serve_by_daemon(self.backing.lock().unwrap(), ino, fh, flags),
            }
        }
        if !wants && map.contains_key(&ino) && handle.backing_fd().is_none() {
            return Served::Conflict;
        }
        self.serve_by_daemon(map, ino, fh, flags)
    }

    /// Registers `fh` as a daemon-served handle of `ino` (which keeps later opens of the
    /// inode off passthrough until it is released). A write-only handle gets direct I/O
    /// and so may a read-write one (see `direct_io`), any other the page cache.
    fn serve_by_daemon<'a>(
        &'a self,
        map: std::sync::MutexGuard<'a, HashMap<u64, Backing>>,
        ino: u64,
        fh: u64,
        flags: i32,
    ) -> Served<'a> {
        let direct = Self::direct_io(self.writers, flags) || map.contains_key(&ino);
        *self.cached_opens.lock().unwrap().entry(ino).or_insert(0) += 1;
        self.cached_handles.lock().unwrap().insert(fh, ino);
        drop(map);
        Served::Daemon(if direct {
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            FopenFlags::empty()
        })
    }

    fn drop_cached(&self, fh: u64) {
        let Some(ino) = self.cached_handles.lock().unwrap().remove(&fh) else {
            return;
        };
        let mut map = self.cached_opens.lock().unwrap();
        if let Some(n) = map.get_mut(&ino) {
            *n -= 1;
            if *n == 0 {
                map.remove(&ino);
            }
        }
    }

    fn drop_passthrough(&self, fh: u64) {
        let Some(ino) = self.passthrough_handles.lock().unwrap().remove(&fh) else {
            return;
        };
        let mut map = self.backing.lock().unwrap();
        if let Some(b) = map.get_mut(&ino) {
            b.opens -= 1;
            if b.opens == 0 {
                map.remove(&ino);
            }
        }
    }
}

/// How a regular-file handle is served (see `SpinFs::serve`).
enum Served<'a> {
    /// By passthrough: the locked map holds the inode's backing id.
    Passthrough(std::sync::MutexGuard<'a, HashMap<u64, Backing>>),
    /// By the daemon, opened with these flags.
    Daemon(FopenFlags),
    /// Refused: passthrough handles of the inode are open (the caller opens for passthrough).
    Conflict,
}

fn err(e: StoreErrno) -> Errno {
    Errno::from_i32(e.0)
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn time(ts: Timestamp) -> SystemTime {
    if ts.sec >= 0 {
        UNIX_EPOCH + Duration::new(ts.sec as u64, ts.nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(ts.sec.unsigned_abs())
            + Duration::from_nanos(ts.nsec as u64)
    }
}

fn timestamp(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let (mut sec, mut nsec) = (-(d.as_secs() as i64), d.subsec_nanos());
            if nsec > 0 {
                sec -= 1;
                nsec = 1_000_000_000 - nsec;
            }
            Timestamp { sec, nsec }
        }
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(timestamp(t)),
    })
}

fn kind(k: FileKind) -> FileType {
    match k {
        FileKind::Regular => FileType::RegularFile,
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

/// The kernel's 32-bit device encoding (new_encode_dev).
fn encode_dev(dev: u64) -> u32 {
    let major = libc::major(dev);
    let minor = libc::minor(dev);
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn decode_dev(dev: u32) -> u64 {
    let major = (dev & 0xfff00) >> 8;
    let minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
    libc::makedev(major, minor)
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: time(a.atime),
        mtime: time(a.mtime),
        ctime: time(a.ctime),
        crtime: time(a.ctime),
        kind: kind(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: encode_dev(a.rdev),
        blksize: a.blksize,
        flags: 0,
    }
}

const GEN: Generation = Generation(0);

/// Attributes sent with a negative lookup reply (only the zero node id matters).
const NEGATIVE: Attr = Attr {
    ino: 0,
    size: 0,
    blocks: 0,
    atime: Timestamp { sec: 0, nsec: 0 },
    mtime: Timestamp { sec: 0, nsec: 0 },
    ctime: Timestamp { sec: 0, nsec: 0 },
    kind: FileKind::Regular,
    perm: 0,
    nlink: 0,
    uid: 0,
    gid: 0,
    rdev: 0,
    blksize: 4096,
};

impl Filesystem for SpinFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Archived files are opened with direct I/O (see `open`); FUSE_DIRECT_IO_ALLOW_MMAP
        // keeps shared read-only mmap of them working.
        let wanted = InitFlags::FUSE_POSIX_ACL
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_ASYNC_DIO
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP;
        let _ = config.add_capabilities(wanted & config.capabilities());
        if self.passthrough.load(Ordering::Relaxed) {
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !ok {
                tracing::warn!("kernel offers no FUSE passthrough; serving I/O through the daemon");
                self.passthrough.store(false, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.vol.lookup(parent.0, name) {
            Ok(a) => reply.entry(&TTL, &file_attr(&a), GEN),
            // A negative entry (node id 0) lets the kernel cache the miss; it drops it itself
            // when a name is created through the mount.
            Err(e) if e.0 == libc::ENOENT => {
                let mut neg = file_attr(&NEGATIVE);
                neg.ino = INodeNo(0);
                reply.entry(&TTL, &neg, GEN)
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.vol.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.vol.getattr(ino.0, fh.map(|f| f.0)) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
        };
        match self.vol.setattr(ino.0, fh.map(|f| f.0), &set) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.vol.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(err(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        match self
            .vol
            .mknod(parent.0, name, mode, umask, decode_dev(rdev), &caller(req))
        {
            Ok(a) => reply.entry(&TTL, &file_attr(&a), GEN),
            Err(e) => reply.error(err(e)),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        match self.vol.mkdir(parent.0, name, mode, umask, &caller(req)) {
            Ok(a) => reply.entry(&TTL, &file_attr(&a), GEN),
            Err(e) => reply.error(err(e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.vol.unlink(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.vol.rmdir(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        match self
            .vol
            .symlink(parent.0, link_name, target.as_os_str(), &caller(req))
        {
            Ok(a) => reply.entry(&TTL, &file_attr(&a), GEN),
            Err(e) => reply.error(err(e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self
            .vol
            .rename(parent.0, name, newparent.0, newname, flags.bits())
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        match self.vol.link(ino.0, newparent.0, newname) {
            Ok(a) => reply.entry(&TTL, &file_attr(&a), GEN),
            Err(e) => reply.error(err(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut wants = self.wants_passthrough(flags.0);
        loop {
            let (fh, handle) = match self.vol.open(ino.0, flags.0, !wants) {
                Ok(h) => h,
                Err(e) => return reply.error(err(e)),
            };
            let regular = self
                .vol
                .getattr(ino.0, Some(fh))
                .map(|a| a.kind == FileKind::Regular)
                .unwrap_or(false);
            if !regular {
                return reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            if handle.serves_archived() {
                // Archived data: direct I/O, so the kernel sends exactly the reads the
                // application makes. With the page cache, its readahead would turn a 4 KiB
                // header sniff into reads of 16-128 KiB and more, past the head cache and onto
                // the media (SPEC problem 4); sequential readers get the daemon's own
                // read-ahead instead (units). Direct-I/O opens do not put the inode in cached
                // mode, so they do not block passthrough opens either.
                return reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
            }
            match self.serve(ino.0, fh, &handle, wants, flags.0, |fd| {
                reply.open_backing(fd)
            }) {
                Served::Passthrough(map) => {
                    return reply.opened_passthrough(
                        FileHandle(fh),
                        FopenFlags::empty(),
                        &map[&ino.0].id,
                    );
                }
                Served::Daemon(f) => return reply.opened(FileHandle(fh), f),
                Served::Conflict => {
                    // Opened for writing while readers hold the file by passthrough: this
                    // writer uses passthrough too (a freeze then moves the file whole).
                    self.vol.release(fh);
                    wants = true;
                }
            }
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut reply = Some(reply);
        let sent = self.vol.read_with(fh.0, offset, size, |d| {
            if let Some(r) = reply.take() {
                r.data(d);
            }
        });
        if let (Err(e), Some(r)) = (sent, reply.take()) {
            r.error(err(e));
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // Direct-I/O writes by a caller without CAP_FSETID: the kernel leaves clearing the
        // set-user-ID and set-group-ID bits to us (cached writes clear them in the kernel).
        let kill_suidgid = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        match self.vol.write(fh.0, offset, data, kill_suidgid) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(err(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing is buffered in the daemon and locks are the kernel's: ENOSYS tells the
        // kernel never to send FLUSH again, saving a round trip on every close.
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.drop_passthrough(fh.0);
        self.drop_cached(fh.0);
        self.vol.release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.vol.fsync(fh.0, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.vol.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.vol.readdir(fh.0, offset as i64) {
            Ok(e) => e,
            Err(e) => return reply.error(err(e)),
        };
        for e in entries {
            if reply.add(
                INodeNo(e.ino),
                e.next as u64,
                kind(e.kind),
                OsStr::from_bytes(&e.name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.vol.release(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.vol.fsyncdir(fh.0, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.vol.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        match self.vol.setxattr(ino.0, name, value, flags) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.vol.getxattr(ino.0, name, size) {
            Ok(XattrReply::Size(n)) => reply.size(n),
            Ok(XattrReply::Data(d)) => reply.data(&d),
            Err(e) => reply.error(err(e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.vol.listxattr(ino.0, size) {
            Ok(XattrReply::Size(n)) => reply.size(n),
            Ok(XattrReply::Data(d)) => reply.data(&d),
            Err(e) => reply.error(err(e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.vol.removexattr(ino.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.vol.access(ino.0, mask.bits(), &caller(req)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let wants = self.wants_passthrough(flags);
        let (attr, mut fh, mut handle) =
            match self
                .vol
                .create(parent.0, name, mode, umask, flags, &caller(req), !wants)
            {
                Ok(r) => r,
                Err(e) => return reply.error(err(e)),
            };
        let fattr = file_attr(&attr);
        if attr.kind != FileKind::Regular {
            return reply.created(&TTL, &fattr, GEN, FileHandle(fh), FopenFlags::empty());
        }
        let mut served = self.serve(attr.ino, fh, &handle, wants, flags, |fd| {
            reply.open_backing(fd)
        });
        if let Served::Conflict = served {
            // An existing file open by passthrough readers (O_CREAT without O_EXCL): as in
            // `open`, this writer uses passthrough too.
            drop(served);
            self.vol.release(fh);
            let reopen = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC);
            (fh, handle) = match self.vol.open(attr.ino, reopen, false) {
                Ok(h) => h,
                Err(e) => return reply.error(err(e)),
            };
            served = self.serve(attr.ino, fh, &handle, true, flags, |fd| {
                reply.open_backing(fd)
            });
        }
        match served {
            Served::Passthrough(map) => reply.created_passthrough(
                &TTL,
                &fattr,
                GEN,
                FileHandle(fh),
                FopenFlags::empty(),
                &map[&attr.ino].id,
            ),
            Served::Daemon(f) => reply.created(&TTL, &fattr, GEN, FileHandle(fh), f),
            // `serve` with `wants` never answers Conflict.
            Served::Conflict => reply.error(Errno::EIO),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.vol.fallocate(fh.0, mode, offset, length) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.vol.lseek(fh.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(err(e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        match self.vol.copy_file_range(
            fh_in.0,
            offset_in,
            fh_out.0,
            offset_out,
            len.min(u32::MAX as u64),
        ) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_round_trip() {
        for (maj, min) in [(0, 0), (1, 3), (8, 17), (259, 65536), (4095, 0xfffff)] {
            let dev = libc::makedev(maj, min);
            assert_eq!(decode_dev(encode_dev(dev)), dev, "{maj}:{min}");
        }
    }

    #[test]
    fn timestamps_round_trip_before_and_after_epoch() {
        for ts in [
            Timestamp { sec: 0, nsec: 0 },
            Timestamp {
                sec: 1_700_000_000,
                nsec: 123_456_789,
            },
            Timestamp { sec: -1, nsec: 500 },
            Timestamp {
                sec: -86_400,
                nsec: 999_999_999,
            },
        ] {
            assert_eq!(timestamp(time(ts)), ts);
        }
    }

    #[test]
    fn write_only_opens_get_direct_io_and_read_write_ones_with_direct_writes() {
        for w in [
            Writers::WriteOnlyByDaemon,
            Writers::ByDaemon,
            Writers::ByDaemonDirect,
        ] {
            assert!(SpinFs::direct_io(w, libc::O_WRONLY));
            assert!(SpinFs::direct_io(w, libc::O_WRONLY | libc::O_APPEND));
            assert!(!SpinFs::direct_io(w, libc::O_RDONLY | libc::O_TRUNC));
            assert_eq!(
                SpinFs::direct_io(w, libc::O_RDWR),
                w == Writers::ByDaemonDirect
            );
        }
    }

    #[test]
    fn mount_options() {
        let mut c = MountConfig::default();
        c.parse_options("allow_other,noatime,threads=3").unwrap();
        assert!(c.allow_other);
        assert_eq!(c.threads, 3);
        assert!(c.parse_options("bogus").unwrap_err().contains("bogus"));
        // Write-only opens are served by the daemon unless asked otherwise; readers and
        // read-write opens by passthrough.
        let d = MountConfig::default();
        assert!(d.passthrough && d.writers == Writers::WriteOnlyByDaemon);
        c.parse_options("passthrough_writes").unwrap();
        assert!(c.passthrough && c.writers == Writers::Passthrough);
        c.parse_options("nopassthrough_writes").unwrap();
        assert!(c.passthrough && c.writers == Writers::ByDaemon);
        c.parse_options("direct_writes").unwrap();
        assert!(c.passthrough && c.writers == Writers::ByDaemonDirect);
        c.parse_options("nopassthrough").unwrap();
        assert!(!c.passthrough);
        assert!(c.parse_options("threads=0").is_err());
    }
}
