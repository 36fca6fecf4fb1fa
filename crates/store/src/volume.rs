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

use crate::sys::{self, Errno, FsCreds, SysResult};
use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// The root directory's inode number.
pub const ROOT_INO: u64 = 1;

/// xattr names under this prefix are the store's own (overlay markers); a user's xattr with
/// this prefix is stored escaped as `trusted.overlay.overlay.*`, the overlayfs convention, so
/// kernel overlayfs over our layers shows the same names.
const INTERNAL_XATTR_PREFIX: &[u8] = b"trusted.overlay.";
const ESCAPED_XATTR_PREFIX: &[u8] = b"trusted.overlay.overlay.";

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

struct Node {
    fd: OwnedFd,
    lookups: AtomicU64,
    /// Whether this directory has a default POSIX ACL: unknown, no or yes. Cached because
    /// every create asks, and only our own setxattr/removexattr can change it.
    default_acl: AtomicU8,
}

const ACL_UNKNOWN: u8 = 0;
const ACL_NONE: u8 = 1;
const ACL_PRESENT: u8 = 2;
const DEFAULT_ACL_XATTR: &[u8] = b"system.posix_acl_default";

impl Node {
    fn new(fd: OwnedFd) -> Node {
        Node {
            fd,
            lookups: AtomicU64::new(1),
            default_acl: AtomicU8::new(ACL_UNKNOWN),
        }
    }
}

/// An open file or directory.
pub struct Handle {
    pub ino: u64,
    fd: OwnedFd,
    /// Serialises getdents on directory handles (the position is the descriptor's).
    dir_lock: Mutex<()>,
}

impl Handle {
    /// The backing descriptor (for passthrough registration by the FUSE adapter).
    pub fn backing_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The mounted filesystem.
pub struct Volume {
    generation: u64,
    root_backing_ino: u64,
    nodes: RwLock<HashMap<u64, Arc<Node>>>,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
}

impl Volume {
    /// Opens the tree of writable generation `generation` at `tree`.
    pub fn new(tree: &Path, generation: u64) -> SysResult<Volume> {
        let path = CString::new(tree.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
        let root_fd = sys::openat(
            // SAFETY: AT_FDCWD is a valid directory descriptor for *at calls.
            unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) },
            &path,
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )?;
        let st = sys::fstat(root_fd.as_fd())?;
        let mut nodes = HashMap::new();
        nodes.insert(ROOT_INO, Arc::new(Node::new(root_fd)));
        Ok(Volume {
            generation,
            root_backing_ino: st.st_ino,
            nodes: RwLock::new(nodes),
            handles: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        })
    }

    fn map_ino(&self, backing_ino: u64) -> u64 {
        if backing_ino == self.root_backing_ino {
            ROOT_INO
        } else {
            (self.generation << 32) | (backing_ino & 0xffff_ffff)
        }
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

    fn attr_of(&self, st: &libc::stat) -> Attr {
        let ts = |sec: i64, nsec: i64| Timestamp {
            sec,
            nsec: nsec as u32,
        };
        Attr {
            ino: self.map_ino(st.st_ino),
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

    /// Registers a looked-up inode (one more kernel reference) and returns its attributes.
    fn remember(&self, fd: OwnedFd) -> SysResult<Attr> {
        let st = sys::fstat(fd.as_fd())?;
        let attr = self.attr_of(&st);
        let mut nodes = self.nodes.write().unwrap();
        match nodes.get(&attr.ino) {
            Some(node) => {
                node.lookups.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                nodes.insert(attr.ino, Arc::new(Node::new(fd)));
            }
        }
        Ok(attr)
    }

    fn remember_child(&self, parent: &Node, name: &CStr) -> SysResult<Attr> {
        let fd = sys::open_path(parent.fd.as_fd(), name)?;
        self.remember(fd)
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> SysResult<Attr> {
        let p = self.node(parent)?;
        let name = sys::cname(name)?;
        self.remember_child(&p, &name)
    }

    /// The kernel dropped `n` references to `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut nodes = self.nodes.write().unwrap();
        if let Some(node) = nodes.get(&ino) {
            let prev = node.lookups.fetch_sub(
                n.min(node.lookups.load(Ordering::Relaxed)),
                Ordering::Relaxed,
            );
            if prev <= n {
                nodes.remove(&ino);
            }
        }
    }

    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> SysResult<Attr> {
        if let Some(fh) = fh
            && let Ok(h) = self.handle(fh)
        {
            return Ok(self.attr_of(&sys::fstat(h.fd.as_fd())?));
        }
        let n = self.node(ino)?;
        Ok(self.attr_of(&sys::fstat(n.fd.as_fd())?))
    }

    pub fn setattr(&self, ino: u64, fh: Option<u64>, set: &SetAttr) -> SysResult<Attr> {
        let node = self.node(ino)?;
        let handle = fh.and_then(|fh| self.handle(fh).ok());
        let target: BorrowedFd<'_> = match &handle {
            Some(h) => h.fd.as_fd(),
            None => node.fd.as_fd(),
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
            match &handle {
                Some(h) => sys::ftruncate(h.fd.as_fd(), size)?,
                None => {
                    let f = sys::reopen(node.fd.as_fd(), libc::O_WRONLY)?;
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
        Ok(self.attr_of(&sys::fstat(target)?))
    }

    pub fn readlink(&self, ino: u64) -> SysResult<Vec<u8>> {
        let n = self.node(ino)?;
        sys::readlink_fd(n.fd.as_fd())
    }

    /// Creates an inode through `make` with the caller's ownership. If the backing
    /// filesystem refuses the caller's own credentials (access granted through a supplementary
    /// group, which the kernel already checked), it is made as root and handed over.
    fn make_owned(
        &self,
        parent: &Node,
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
                let pst = sys::fstat(parent.fd.as_fd())?;
                let gid = if pst.st_mode & libc::S_ISGID != 0 {
                    pst.st_gid
                } else {
                    caller.gid
                };
                let fd = sys::open_path(parent.fd.as_fd(), name)?;
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
    fn create_mode(parent: &Node, mode: u32, umask: u32) -> u32 {
        let mut state = parent.default_acl.load(Ordering::Relaxed);
        if state == ACL_UNKNOWN {
            let present =
                sys::getxattr_fd(parent.fd.as_fd(), c"system.posix_acl_default", &mut []).is_ok();
            state = if present { ACL_PRESENT } else { ACL_NONE };
            parent.default_acl.store(state, Ordering::Relaxed);
        }
        if state == ACL_PRESENT {
            mode
        } else {
            mode & !umask
        }
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
        let p = self.node(parent)?;
        let name = sys::cname(name)?;
        let mode = Self::create_mode(&p, mode, umask);
        self.make_owned(&p, &name, caller, || {
            sys::mknodat(p.fd.as_fd(), &name, mode, rdev)
        })?;
        self.remember_child(&p, &name)
    }

    pub fn mkdir(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        caller: &Caller,
    ) -> SysResult<Attr> {
        let p = self.node(parent)?;
        let name = sys::cname(name)?;
        let mode = Self::create_mode(&p, mode, umask);
        self.make_owned(&p, &name, caller, || {
            sys::mkdirat(p.fd.as_fd(), &name, mode)
        })?;
        self.remember_child(&p, &name)
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &OsStr,
        caller: &Caller,
    ) -> SysResult<Attr> {
        let p = self.node(parent)?;
        let name = sys::cname(name)?;
        let target = CString::new(target.as_bytes()).map_err(|_| Errno::EINVAL)?;
        self.make_owned(&p, &name, caller, || {
            sys::symlinkat(&target, p.fd.as_fd(), &name)
        })?;
        self.remember_child(&p, &name)
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> SysResult<Attr> {
        let n = self.node(ino)?;
        let p = self.node(newparent)?;
        let name = sys::cname(newname)?;
        sys::link_fd(n.fd.as_fd(), p.fd.as_fd(), &name)?;
        self.remember_child(&p, &name)
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> SysResult<()> {
        let p = self.node(parent)?;
        sys::unlinkat(p.fd.as_fd(), &sys::cname(name)?, 0)
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> SysResult<()> {
        let p = self.node(parent)?;
        sys::unlinkat(p.fd.as_fd(), &sys::cname(name)?, libc::AT_REMOVEDIR)
    }

    /// rename(2) with RENAME_NOREPLACE / RENAME_EXCHANGE flags.
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> SysResult<()> {
        const SUPPORTED: u32 = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE;
        if flags & !SUPPORTED != 0 {
            return Err(Errno::EINVAL);
        }
        let p = self.node(parent)?;
        let np = self.node(newparent)?;
        sys::renameat2(
            p.fd.as_fd(),
            &sys::cname(name)?,
            np.fd.as_fd(),
            &sys::cname(newname)?,
            flags,
        )
    }

    fn add_handle(&self, ino: u64, fd: OwnedFd) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.write().unwrap().insert(
            fh,
            Arc::new(Handle {
                ino,
                fd,
                dir_lock: Mutex::new(()),
            }),
        );
        fh
    }

    /// Flags for the backing descriptor: the kernel already did O_TRUNC (as a setattr) and
    /// computes append offsets itself, so neither may act again on our descriptor.
    fn backing_flags(flags: i32) -> i32 {
        flags & !(libc::O_TRUNC | libc::O_APPEND | libc::O_CREAT | libc::O_EXCL)
    }

    /// Opens a file; returns the handle number.
    pub fn open(&self, ino: u64, flags: i32) -> SysResult<(u64, Arc<Handle>)> {
        let n = self.node(ino)?;
        let fd = sys::reopen(n.fd.as_fd(), Self::backing_flags(flags))?;
        let fh = self.add_handle(ino, fd);
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
    ) -> SysResult<(Attr, u64, Arc<Handle>)> {
        let p = self.node(parent)?;
        let cname = sys::cname(name)?;
        let mode = Self::create_mode(&p, mode, umask);
        // Create and open in one call; O_EXCL only if the caller asked for it, so that an
        // existing file is opened as open(2) would.
        let open_flags = Self::backing_flags(flags) | libc::O_CREAT | (flags & libc::O_EXCL);
        let file = std::cell::Cell::new(None);
        self.make_owned(&p, &cname, caller, || {
            let fd = sys::openat(p.fd.as_fd(), &cname, open_flags, mode & 0o7777)?;
            file.set(Some(fd));
            Ok(())
        })?;
        let fd = file.take().ok_or(Errno::EIO)?;
        let path_fd = sys::open_path(p.fd.as_fd(), &cname)?;
        let attr = self.remember(path_fd)?;
        let fh = self.add_handle(attr.ino, fd);
        Ok((attr, fh, self.handle(fh)?))
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> SysResult<Vec<u8>> {
        let h = self.handle(fh)?;
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            let n = sys::pread(h.fd.as_fd(), &mut buf[done..], offset + done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf.truncate(done);
        Ok(buf)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> SysResult<usize> {
        let h = self.handle(fh)?;
        let mut done = 0;
        while done < data.len() {
            done += sys::pwrite(h.fd.as_fd(), &data[done..], offset + done as u64)?;
        }
        Ok(done)
    }

    pub fn release(&self, fh: u64) {
        self.handles.write().unwrap().remove(&fh);
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> SysResult<()> {
        let h = self.handle(fh)?;
        sys::fsync(h.fd.as_fd(), datasync)
    }

    pub fn fallocate(&self, fh: u64, mode: i32, offset: u64, len: u64) -> SysResult<()> {
        let h = self.handle(fh)?;
        sys::fallocate(h.fd.as_fd(), mode, offset, len)
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> SysResult<i64> {
        let h = self.handle(fh)?;
        sys::lseek(h.fd.as_fd(), offset, whence)
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
        let len = len.min(1 << 30) as usize;
        sys::copy_file_range(hi.fd.as_fd(), off_in, ho.fd.as_fd(), off_out, len)
    }

    pub fn opendir(&self, ino: u64) -> SysResult<u64> {
        let n = self.node(ino)?;
        let fd = sys::reopen(n.fd.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
        Ok(self.add_handle(ino, fd))
    }

    /// Entries of an open directory from position cookie `pos` (0 = start), "." and ".."
    /// included, as many as one backing read returns.
    pub fn readdir(&self, fh: u64, pos: i64) -> SysResult<Vec<DirEntry>> {
        let h = self.handle(fh)?;
        let _guard = h.dir_lock.lock().unwrap();
        let raw = sys::read_dir_at(h.fd.as_fd(), pos, 32 * 1024)?;
        let mut out = Vec::with_capacity(raw.len());
        for e in raw {
            let ino = if e.name == b".." && h.ino == ROOT_INO {
                ROOT_INO
            } else {
                self.map_ino(e.ino)
            };
            let kind = match FileKind::from_dtype(e.kind) {
                Some(k) => k,
                None => {
                    let name = CString::new(e.name.clone()).map_err(|_| Errno::EIO)?;
                    FileKind::from_mode(sys::fstatat(h.fd.as_fd(), &name)?.st_mode)
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

    pub fn fsyncdir(&self, fh: u64, datasync: bool) -> SysResult<()> {
        self.fsync(fh, datasync)
    }

    pub fn statfs(&self) -> SysResult<FsStats> {
        let root = self.node(ROOT_INO)?;
        let st = sys::fstatvfs(root.fd.as_fd())?;
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

    fn backing_xattr_name(name: &OsStr) -> SysResult<CString> {
        let b = name.as_bytes();
        let stored = if b.starts_with(INTERNAL_XATTR_PREFIX) {
            let mut v = ESCAPED_XATTR_PREFIX.to_vec();
            v.extend_from_slice(&b[INTERNAL_XATTR_PREFIX.len()..]);
            v
        } else {
            b.to_vec()
        };
        CString::new(stored).map_err(|_| Errno::EINVAL)
    }

    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> SysResult<()> {
        let n = self.node(ino)?;
        if name.as_bytes() == DEFAULT_ACL_XATTR {
            n.default_acl.store(ACL_UNKNOWN, Ordering::Relaxed);
        }
        sys::setxattr_fd(n.fd.as_fd(), &Self::backing_xattr_name(name)?, value, flags)
    }

    /// Reads an xattr: with `size` 0 returns the length only (as an empty vec of that len
    /// is not needed, the length is returned in the Err-free `Ok(Err(len))` form).
    pub fn getxattr(&self, ino: u64, name: &OsStr, size: u32) -> SysResult<XattrReply> {
        let n = self.node(ino)?;
        let cname = Self::backing_xattr_name(name)?;
        if size == 0 {
            let len = sys::getxattr_fd(n.fd.as_fd(), &cname, &mut [])?;
            return Ok(XattrReply::Size(len as u32));
        }
        let mut buf = vec![0u8; size as usize];
        let len = sys::getxattr_fd(n.fd.as_fd(), &cname, &mut buf)?;
        buf.truncate(len);
        Ok(XattrReply::Data(buf))
    }

    pub fn listxattr(&self, ino: u64, size: u32) -> SysResult<XattrReply> {
        let n = self.node(ino)?;
        let mut buf = vec![0u8; 64 * 1024];
        let len = sys::listxattr_fd(n.fd.as_fd(), &mut buf)?;
        let mut out = Vec::with_capacity(len);
        for name in buf[..len].split(|&b| b == 0).filter(|s| !s.is_empty()) {
            if let Some(rest) = name.strip_prefix(ESCAPED_XATTR_PREFIX) {
                out.extend_from_slice(INTERNAL_XATTR_PREFIX);
                out.extend_from_slice(rest);
            } else if name.starts_with(INTERNAL_XATTR_PREFIX) {
                continue;
            } else {
                out.extend_from_slice(name);
            }
            out.push(0);
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
        let n = self.node(ino)?;
        if name.as_bytes() == DEFAULT_ACL_XATTR {
            n.default_acl.store(ACL_UNKNOWN, Ordering::Relaxed);
        }
        sys::removexattr_fd(n.fd.as_fd(), &Self::backing_xattr_name(name)?)
    }

    /// access(2) check with the caller's uid and primary gid.
    pub fn access(&self, ino: u64, mask: i32, caller: &Caller) -> SysResult<()> {
        let n = self.node(ino)?;
        let st = sys::fstat(n.fd.as_fd())?;
        if mask == libc::F_OK {
            return Ok(());
        }
        let mode = st.st_mode;
        if caller.uid == 0 {
            // Root may do anything but execute a file nobody may execute.
            if mask & libc::X_OK != 0 && mode & libc::S_IFMT != libc::S_IFDIR && mode & 0o111 == 0 {
                return Err(Errno::EACCES);
            }
            return Ok(());
        }
        let bits = if caller.uid == st.st_uid {
            (mode >> 6) & 7
        } else if caller.gid == st.st_gid {
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
