//! Thin, checked wrappers over the Linux system calls the writable layer needs.
//!
//! Everything works relative to `O_PATH` descriptors so that an inode stays reachable after it
//! was renamed or unlinked (SPEC problem 3) and no path is ever rebuilt from names.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

/// An errno value returned to the kernel as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub const EPERM: Errno = Errno(libc::EPERM);
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const EBADF: Errno = Errno(libc::EBADF);
    pub const EACCES: Errno = Errno(libc::EACCES);
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    pub const ENOTDIR: Errno = Errno(libc::ENOTDIR);
    pub const EISDIR: Errno = Errno(libc::EISDIR);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const ERANGE: Errno = Errno(libc::ERANGE);
    pub const ENODATA: Errno = Errno(libc::ENODATA);
    pub const ENOTSUP: Errno = Errno(libc::EOPNOTSUPP);
    pub const ENAMETOOLONG: Errno = Errno(libc::ENAMETOOLONG);
    pub const ENOTEMPTY: Errno = Errno(libc::ENOTEMPTY);
    pub const EXDEV: Errno = Errno(libc::EXDEV);

    /// The calling thread's current errno.
    pub fn last() -> Errno {
        Errno(
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    }
}

impl From<io::Error> for Errno {
    fn from(e: io::Error) -> Errno {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", io::Error::from_raw_os_error(self.0))
    }
}

impl std::error::Error for Errno {}

pub type SysResult<T> = Result<T, Errno>;

fn check(ret: libc::c_int) -> SysResult<libc::c_int> {
    if ret < 0 { Err(Errno::last()) } else { Ok(ret) }
}

fn check_long(ret: libc::c_long) -> SysResult<libc::c_long> {
    if ret < 0 { Err(Errno::last()) } else { Ok(ret) }
}

fn check_ssize(ret: libc::ssize_t) -> SysResult<usize> {
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(ret as usize)
    }
}

/// A name as a C string; names with NUL or '/' never reach the backing filesystem.
pub fn cname(name: &OsStr) -> SysResult<CString> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.contains(&b'/') {
        return Err(Errno::EINVAL);
    }
    if bytes.len() > 255 {
        return Err(Errno::ENAMETOOLONG);
    }
    CString::new(bytes).map_err(|_| Errno::EINVAL)
}

const EMPTY: &CStr = c"";

pub fn fd_of(raw: RawFd) -> OwnedFd {
    // SAFETY: callers pass a descriptor that a successful system call just returned and that
    // nothing else owns.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

pub fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> SysResult<OwnedFd> {
    // SAFETY: name is a valid C string; the returned descriptor is owned by us.
    let fd = check(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode,
        )
    })?;
    Ok(fd_of(fd))
}

/// Opens an `O_PATH` descriptor of `name` in `dir` without following a final symlink.
pub fn open_path(dir: BorrowedFd<'_>, name: &CStr) -> SysResult<OwnedFd> {
    openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)
}

/// Reopens an inode held by an `O_PATH` descriptor with real access flags.
pub fn reopen(fd: BorrowedFd<'_>, flags: i32) -> SysResult<OwnedFd> {
    let path = proc_path(fd);
    let flags = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_NOFOLLOW);
    // SAFETY: path is a valid C string.
    let raw = check(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) })?;
    Ok(fd_of(raw))
}

pub fn proc_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL")
}

pub fn fstat(fd: BorrowedFd<'_>) -> SysResult<libc::stat> {
    // SAFETY: st is plain old data fully written by the kernel on success.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        check(libc::fstatat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        ))?;
        Ok(st)
    }
}

pub fn fstatat(dir: BorrowedFd<'_>, name: &CStr) -> SysResult<libc::stat> {
    // SAFETY: as in fstat.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        check(libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        ))?;
        Ok(st)
    }
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> SysResult<()> {
    // SAFETY: valid C string.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

pub fn mknodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32, dev: libc::dev_t) -> SysResult<()> {
    // SAFETY: valid C string.
    check(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, dev) }).map(drop)
}

pub fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> SysResult<()> {
    // SAFETY: valid C strings.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// Hard-links the inode behind an `O_PATH` descriptor as `dir/name`.
pub fn link_fd(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &CStr) -> SysResult<()> {
    // SAFETY: valid C strings; AT_EMPTY_PATH links the descriptor's inode (we hold
    // CAP_DAC_READ_SEARCH as root).
    check(unsafe {
        libc::linkat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    })
    .map(drop)
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> SysResult<()> {
    // SAFETY: valid C string.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

pub fn renameat2(
    olddir: BorrowedFd<'_>,
    oldname: &CStr,
    newdir: BorrowedFd<'_>,
    newname: &CStr,
    flags: u32,
) -> SysResult<()> {
    // SAFETY: valid C strings.
    check_long(unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            olddir.as_raw_fd(),
            oldname.as_ptr(),
            newdir.as_raw_fd(),
            newname.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

pub fn readlink_fd(fd: BorrowedFd<'_>) -> SysResult<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: buf is writable for its length.
    let n = check_ssize(unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(n);
    Ok(buf)
}

/// chmod of the inode behind any descriptor (fchmodat2 with AT_EMPTY_PATH, Linux ≥ 6.6).
pub fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> SysResult<()> {
    const SYS_FCHMODAT2: libc::c_long = 452;
    // SAFETY: valid C string.
    check_long(unsafe {
        libc::syscall(
            SYS_FCHMODAT2,
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            mode,
            libc::AT_EMPTY_PATH,
        )
    })
    .map(drop)
}

pub fn chown_fd(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> SysResult<()> {
    // SAFETY: valid C string.
    check(unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn utimens_fd(fd: BorrowedFd<'_>, times: &[libc::timespec; 2]) -> SysResult<()> {
    // SAFETY: times points to two timespecs. utimensat with an empty path acts on the
    // descriptor itself, also an O_PATH one of a symlink.
    check(unsafe {
        libc::utimensat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            times.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> SysResult<()> {
    let size = i64::try_from(size).map_err(|_| Errno(libc::EFBIG))?;
    // SAFETY: plain syscall on an owned descriptor.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), size) }).map(drop)
}

// f*xattr calls refuse O_PATH descriptors, and so do the *xattrat calls with an empty path,
// so xattrs go through the descriptor's /proc magic link. Resolving a magic link lands on the
// inode itself without following it further, so this also reaches a symlink's own xattrs.

/// Reads an xattr into `buf` (an empty buf asks for the length only). Returns the length.
pub fn getxattr_fd(fd: BorrowedFd<'_>, name: &CStr, buf: &mut [u8]) -> SysResult<usize> {
    let path = proc_path(fd);
    // SAFETY: valid C strings; buf is writable for its length.
    check_ssize(unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })
}

pub fn setxattr_fd(fd: BorrowedFd<'_>, name: &CStr, value: &[u8], flags: i32) -> SysResult<()> {
    let path = proc_path(fd);
    // SAFETY: valid C strings; value is readable for its length.
    check(unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

pub fn listxattr_fd(fd: BorrowedFd<'_>, buf: &mut [u8]) -> SysResult<usize> {
    let path = proc_path(fd);
    // SAFETY: valid C string; buf is writable for its length.
    check_ssize(unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
}

pub fn removexattr_fd(fd: BorrowedFd<'_>, name: &CStr) -> SysResult<()> {
    let path = proc_path(fd);
    // SAFETY: valid C strings.
    check(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) }).map(drop)
}

/// Switches the calling thread's filesystem uid/gid for the lifetime of the guard, so that
/// inodes created on the backing filesystem get the caller's ownership and the backing
/// filesystem applies the caller's set-group-id rules.
pub struct FsCreds {
    active: bool,
}

impl FsCreds {
    pub fn switch(uid: u32, gid: u32) -> FsCreds {
        if uid == 0 && gid == 0 {
            return FsCreds { active: false };
        }
        // SAFETY: setfsuid/setfsgid affect only the calling thread and cannot fail for root.
        unsafe {
            libc::setfsgid(gid);
            libc::setfsuid(uid);
        }
        FsCreds { active: true }
    }
}

impl Drop for FsCreds {
    fn drop(&mut self) {
        if self.active {
            // SAFETY: restores root, which the daemon runs as.
            unsafe {
                libc::setfsuid(0);
                libc::setfsgid(0);
            }
        }
    }
}

pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> SysResult<usize> {
    // SAFETY: buf is writable for its length.
    check_ssize(unsafe {
        libc::pread(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            offset as i64,
        )
    })
}

pub fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> SysResult<usize> {
    // SAFETY: buf is readable for its length.
    check_ssize(unsafe {
        libc::pwrite(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            offset as i64,
        )
    })
}

pub fn fsync(fd: BorrowedFd<'_>, datasync: bool) -> SysResult<()> {
    // SAFETY: plain syscalls on a descriptor.
    check(unsafe {
        if datasync {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }
    })
    .map(drop)
}

pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> SysResult<()> {
    // SAFETY: plain syscall.
    check(unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset as i64, len as i64) }).map(drop)
}

pub fn lseek(fd: BorrowedFd<'_>, offset: i64, whence: i32) -> SysResult<i64> {
    // SAFETY: plain syscall.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), offset, whence) };
    if r < 0 { Err(Errno::last()) } else { Ok(r) }
}

pub fn copy_file_range(
    fd_in: BorrowedFd<'_>,
    off_in: u64,
    fd_out: BorrowedFd<'_>,
    off_out: u64,
    len: usize,
) -> SysResult<usize> {
    let mut oi = off_in as i64;
    let mut oo = off_out as i64;
    // SAFETY: offsets are valid pointers to locals.
    check_ssize(unsafe {
        libc::copy_file_range(
            fd_in.as_raw_fd(),
            &mut oi,
            fd_out.as_raw_fd(),
            &mut oo,
            len,
            0,
        )
    })
}

pub fn fstatvfs(fd: BorrowedFd<'_>) -> SysResult<libc::statvfs> {
    // SAFETY: st is plain old data written by the kernel.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        check(libc::fstatvfs(fd.as_raw_fd(), &mut st))?;
        Ok(st)
    }
}

/// One directory entry as the backing filesystem returns it.
pub struct RawDirEntry {
    pub ino: u64,
    pub off: i64,
    pub kind: u8,
    pub name: Vec<u8>,
}

/// Every name in the directory open as `fd` (read from the start), "." and ".." left out.
pub fn dir_names(fd: BorrowedFd<'_>) -> SysResult<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    let mut pos = 0;
    loop {
        let batch = read_dir_at(fd, pos, 64 * 1024)?;
        if batch.is_empty() {
            return Ok(names);
        }
        for e in batch {
            pos = e.off;
            if e.name != b"." && e.name != b".." {
                names.push(e.name);
            }
        }
    }
}

/// Reads directory entries with getdents64 starting at a position cookie (0 = start).
/// The cookies are the backing filesystem's own, stable for seekdir/telldir.
pub fn read_dir_at(fd: BorrowedFd<'_>, pos: i64, max_bytes: usize) -> SysResult<Vec<RawDirEntry>> {
    lseek(fd, pos, libc::SEEK_SET)?;
    let mut buf = vec![0u8; max_bytes.max(4096)];
    // SAFETY: buf is writable for its length.
    let n = check_long(unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            fd.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    })? as usize;
    let mut out = Vec::new();
    let mut at = 0;
    while at + 19 <= n {
        let ino = u64::from_ne_bytes(buf[at..at + 8].try_into().unwrap());
        let off = i64::from_ne_bytes(buf[at + 8..at + 16].try_into().unwrap());
        let reclen = u16::from_ne_bytes(buf[at + 16..at + 18].try_into().unwrap()) as usize;
        let kind = buf[at + 18];
        if reclen == 0 || at + reclen > n {
            return Err(Errno::EIO);
        }
        let name_area = &buf[at + 19..at + reclen];
        let len = name_area
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(name_area.len());
        out.push(RawDirEntry {
            ino,
            off,
            kind,
            name: name_area[..len].to_vec(),
        });
        at += reclen;
    }
    Ok(out)
}

/// Runs `f` with the raw descriptor number (for ioctl-style callers).
/// `struct sched_attr` of sched_setattr(2) (its first version, 56 bytes).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
    util_min: u32,
    util_max: u32,
}

/// The calling thread's scheduling attributes.
fn sched_getattr() -> SysResult<SchedAttr> {
    let mut a = SchedAttr::default();
    // SAFETY: sched_getattr on the calling thread (pid 0) into a buffer of the size given.
    check_long(unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut a as *mut SchedAttr,
            std::mem::size_of::<SchedAttr>() as libc::c_uint,
            0,
        )
    })?;
    Ok(a)
}

/// Sets the calling thread's time slice under SCHED_OTHER (Linux 6.12 and later take
/// `sched_runtime` as the slice of a fair task, clamped to 0.1-100 ms; zero restores the
/// default). Its policy must be SCHED_OTHER; its nice value is kept.
pub fn set_thread_slice(slice: std::time::Duration) -> SysResult<()> {
    let cur = sched_getattr()?;
    let a = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_nice: cur.sched_nice,
        sched_runtime: slice.as_nanos() as u64,
        ..SchedAttr::default()
    };
    // SAFETY: sched_setattr on the calling thread (pid 0) with a fully initialised attr.
    check_long(unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &a as *const SchedAttr, 0) })?;
    Ok(())
}

/// The calling thread's time slice as the kernel reports it (zero before Linux 6.12).
pub fn thread_slice() -> SysResult<std::time::Duration> {
    Ok(std::time::Duration::from_nanos(
        sched_getattr()?.sched_runtime,
    ))
}

pub fn raw(fd: BorrowedFd<'_>) -> RawFd {
    fd.as_raw_fd()
}
