//! Every operation of the writable layer through a real FUSE mount.

mod common;

use common::*;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{
    DirEntryExt, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt, symlink,
};
use std::path::Path;

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn lstat(p: &Path) -> libc::stat {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::lstat(c(p).as_ptr(), &mut st) };
    assert_eq!(
        r,
        0,
        "lstat {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
    st
}

#[test]
fn read_write_at_any_offset_and_truncate() {
    let m = Mounted::new(&[]);
    let p = m.path("f");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.write_all_at(b"hello", 0).unwrap();
    f.write_all_at(b"world", 1 << 20).unwrap();
    f.write_all_at(b"HE", 0).unwrap();
    assert_eq!(f.metadata().unwrap().len(), (1 << 20) + 5);
    let mut buf = [0u8; 5];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"HEllo");
    f.read_exact_at(&mut buf, 1 << 20).unwrap();
    assert_eq!(&buf, b"world");
    f.read_exact_at(&mut buf, 4096).unwrap();
    assert_eq!(buf, [0; 5], "the gap reads as zeros");
    f.set_len(3).unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"HEl");
    f.set_len(10).unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"HEl\0\0\0\0\0\0\0");
    // truncate(2) by path, without a handle
    let r = unsafe { libc::truncate(c(&p).as_ptr(), 1) };
    assert_eq!(r, 0);
    assert_eq!(fs::read(&p).unwrap(), b"H");
    // append mode writes at the end whatever the offset
    let mut a = OpenOptions::new().append(true).open(&p).unwrap();
    a.write_all(b"ij").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"Hij");
    // O_TRUNC on open
    File::create(&p).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), 0);
}

#[test]
fn large_sequential_io_round_trips() {
    let m = Mounted::new(&[]);
    let p = m.path("big");
    let data: Vec<u8> = (0..(8 << 20) as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    fs::write(&p, &data).unwrap();
    assert_eq!(fs::read(&p).unwrap(), data);
}

#[test]
fn fallocate_punch_hole_zero_range_and_seek_data_hole() {
    let m = Mounted::new(&[]);
    let p = m.path("sparse");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    let fd = f.as_raw_fd();
    const MIB: i64 = 1 << 20;
    // plain allocation extends the file
    assert_eq!(unsafe { libc::fallocate(fd, 0, 0, 4 * MIB) }, 0);
    assert_eq!(f.metadata().unwrap().len(), 4 * MIB as u64);
    f.write_all_at(&vec![0xAB; 4 * MIB as usize], 0).unwrap();
    // punch a hole in the middle: size unchanged, zeros read back, blocks freed
    let before = f.metadata().unwrap().blocks();
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    assert_eq!(unsafe { libc::fallocate(fd, mode, MIB, MIB) }, 0);
    assert_eq!(f.metadata().unwrap().len(), 4 * MIB as u64);
    assert!(f.metadata().unwrap().blocks() < before);
    let mut buf = vec![0u8; MIB as usize];
    f.read_exact_at(&mut buf, MIB as u64).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    // SEEK_DATA / SEEK_HOLE see the hole
    let hole = unsafe { libc::lseek(fd, 0, libc::SEEK_HOLE) };
    assert_eq!(hole, MIB);
    let data = unsafe { libc::lseek(fd, MIB, libc::SEEK_DATA) };
    assert_eq!(data, 2 * MIB);
    // zero range
    let zr = libc::FALLOC_FL_ZERO_RANGE;
    assert_eq!(unsafe { libc::fallocate(fd, zr, 3 * MIB, 4096) }, 0);
    let mut small = [1u8; 4096];
    f.read_exact_at(&mut small, 3 * MIB as u64).unwrap();
    assert!(small.iter().all(|&b| b == 0));
    f.read_exact_at(&mut small, 3 * MIB as u64 + 4096).unwrap();
    assert!(small.iter().all(|&b| b == 0xAB));
    // a fully sparse file: SEEK_DATA finds nothing
    let s = File::create(m.path("holey")).unwrap();
    s.set_len(10 * MIB as u64).unwrap();
    let r = unsafe { libc::lseek(s.as_raw_fd(), 0, libc::SEEK_DATA) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ENXIO)
    );
}

#[test]
fn fsync_fdatasync_and_copy_file_range() {
    let m = Mounted::new(&[]);
    let src = m.path("src");
    let data: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
    fs::write(&src, &data).unwrap();
    let fi = File::open(&src).unwrap();
    fi.sync_all().unwrap();
    fi.sync_data().unwrap();
    let fo = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path("dst"))
        .unwrap();
    let mut off_in: i64 = 1000;
    let mut off_out: i64 = 10;
    let mut left = data.len() - 1000;
    while left > 0 {
        let n = unsafe {
            libc::copy_file_range(
                fi.as_raw_fd(),
                &mut off_in,
                fo.as_raw_fd(),
                &mut off_out,
                left,
                0,
            )
        };
        assert!(
            n > 0,
            "copy_file_range: {}",
            std::io::Error::last_os_error()
        );
        left -= n as usize;
    }
    fo.sync_all().unwrap();
    let out = fs::read(m.path("dst")).unwrap();
    assert_eq!(out.len(), 10 + data.len() - 1000);
    assert_eq!(&out[..10], &[0; 10]);
    assert_eq!(&out[10..], &data[1000..]);
    // directory fsync
    let d = File::open(&m.mnt).unwrap();
    d.sync_all().unwrap();
}

#[test]
fn all_file_types() {
    let m = Mounted::new(&[]);
    fs::create_dir(m.path("dir")).unwrap();
    fs::write(m.path("dir/file"), b"x").unwrap();
    symlink("dir/file", m.path("link")).unwrap();
    assert_eq!(
        fs::read_link(m.path("link")).unwrap(),
        Path::new("dir/file")
    );
    assert_eq!(fs::read(m.path("link")).unwrap(), b"x");
    let long_target = "t".repeat(4000);
    symlink(&long_target, m.path("longlink")).unwrap();
    assert_eq!(
        fs::read_link(m.path("longlink")).unwrap().as_os_str().len(),
        4000
    );
    fs::hard_link(m.path("dir/file"), m.path("hard")).unwrap();
    assert_eq!(fs::metadata(m.path("hard")).unwrap().nlink(), 2);
    assert_eq!(
        fs::metadata(m.path("hard")).unwrap().ino(),
        fs::metadata(m.path("dir/file")).unwrap().ino()
    );
    let mk = |name: &str, mode: u32, dev: libc::dev_t| {
        let r = unsafe { libc::mknod(c(&m.path(name)).as_ptr(), mode, dev) };
        assert_eq!(r, 0, "mknod {name}: {}", std::io::Error::last_os_error());
    };
    mk("fifo", libc::S_IFIFO | 0o640, 0);
    mk("chr", libc::S_IFCHR | 0o600, libc::makedev(1, 3));
    mk("blk", libc::S_IFBLK | 0o600, libc::makedev(259, 70000));
    mk("sock", libc::S_IFSOCK | 0o600, 0);
    let ft = |n: &str| fs::symlink_metadata(m.path(n)).unwrap().file_type();
    assert!(ft("fifo").is_fifo());
    assert!(ft("chr").is_char_device());
    assert!(ft("blk").is_block_device());
    assert!(ft("sock").is_socket());
    assert!(ft("link").is_symlink());
    assert_eq!(lstat(&m.path("chr")).st_rdev, libc::makedev(1, 3));
    assert_eq!(lstat(&m.path("blk")).st_rdev, libc::makedev(259, 70000));
    assert_eq!(lstat(&m.path("fifo")).st_mode & 0o7777, 0o640);
    // a real socket bound in the mount
    let l = std::os::unix::net::UnixListener::bind(m.path("dir/real.sock")).unwrap();
    drop(l);
    assert!(ft("dir/real.sock").is_socket());
    // rmdir / unlink
    assert!(
        fs::remove_dir(m.path("dir")).is_err(),
        "non-empty rmdir must fail"
    );
    fs::remove_file(m.path("dir/file")).unwrap();
    fs::remove_file(m.path("dir/real.sock")).unwrap();
    fs::remove_dir(m.path("dir")).unwrap();
    assert_eq!(fs::metadata(m.path("hard")).unwrap().nlink(), 1);
    assert_eq!(fs::read(m.path("hard")).unwrap(), b"x");
}

fn renameat2(from: &Path, to: &Path, flags: u32) -> std::io::Result<()> {
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            c(from).as_ptr(),
            libc::AT_FDCWD,
            c(to).as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn rename_plain_noreplace_exchange_and_directories() {
    let m = Mounted::new(&[]);
    fs::write(m.path("a"), b"A").unwrap();
    fs::write(m.path("b"), b"B").unwrap();
    let ino_a = fs::metadata(m.path("a")).unwrap().ino();
    let e = renameat2(&m.path("a"), &m.path("b"), libc::RENAME_NOREPLACE).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
    renameat2(&m.path("a"), &m.path("b"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(m.path("a")).unwrap(), b"B");
    assert_eq!(fs::read(m.path("b")).unwrap(), b"A");
    assert_eq!(
        fs::metadata(m.path("b")).unwrap().ino(),
        ino_a,
        "inode follows the name"
    );
    renameat2(&m.path("b"), &m.path("c"), libc::RENAME_NOREPLACE).unwrap();
    fs::rename(m.path("c"), m.path("a")).unwrap();
    assert_eq!(fs::read(m.path("a")).unwrap(), b"A");
    assert!(!m.path("b").exists() && !m.path("c").exists());
    // directories, with content, across directories
    fs::create_dir_all(m.path("x/y/z")).unwrap();
    fs::write(m.path("x/y/z/f"), b"deep").unwrap();
    fs::create_dir(m.path("other")).unwrap();
    fs::rename(m.path("x/y"), m.path("other/y2")).unwrap();
    assert_eq!(fs::read(m.path("other/y2/z/f")).unwrap(), b"deep");
    // over an empty directory; not over a non-empty one
    fs::create_dir(m.path("empty")).unwrap();
    fs::rename(m.path("other/y2"), m.path("empty")).unwrap();
    assert_eq!(fs::read(m.path("empty/z/f")).unwrap(), b"deep");
    fs::create_dir(m.path("full")).unwrap();
    fs::write(m.path("full/k"), b"").unwrap();
    let e = fs::rename(m.path("empty"), m.path("full")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTEMPTY));
    // exchange a file and a directory
    renameat2(&m.path("a"), &m.path("full"), libc::RENAME_EXCHANGE).unwrap();
    assert!(m.path("a").is_dir() && m.path("full").is_file());
}

#[test]
fn chmod_chown_utimens_with_nanoseconds() {
    let m = Mounted::new(&[]);
    let p = m.path("f");
    fs::write(&p, b"x").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o4751)).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o4751);
    std::os::unix::fs::chown(&p, Some(1234), Some(5678)).unwrap();
    let md = fs::metadata(&p).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    let times = [
        libc::timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 123_456_789,
        },
        libc::timespec {
            tv_sec: 1_500_000_000,
            tv_nsec: 987_654_321,
        },
    ];
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c(&p).as_ptr(), times.as_ptr(), 0) };
    assert_eq!(r, 0);
    let md = fs::metadata(&p).unwrap();
    assert_eq!((md.atime(), md.atime_nsec()), (1_000_000_000, 123_456_789));
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_500_000_000, 987_654_321));
    // on a symlink itself (AT_SYMLINK_NOFOLLOW) and a directory
    symlink("f", m.path("l")).unwrap();
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c(&m.path("l")).as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0);
    assert_eq!(lstat(&m.path("l")).st_mtime_nsec, 987_654_321);
    std::os::unix::fs::lchown(m.path("l"), Some(7), Some(8)).unwrap();
    assert_eq!(lstat(&m.path("l")).st_uid, 7);
    assert_eq!(
        fs::metadata(&p).unwrap().uid(),
        1234,
        "lchown must not follow"
    );
    fs::create_dir(m.path("d")).unwrap();
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c(&m.path("d")).as_ptr(), times.as_ptr(), 0) };
    assert_eq!(r, 0);
    assert_eq!(fs::metadata(m.path("d")).unwrap().mtime_nsec(), 987_654_321);
    // ctime moves on metadata changes
    let before = lstat(&p);
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    let after = lstat(&p);
    assert!((after.st_ctime, after.st_ctime_nsec) > (before.st_ctime, before.st_ctime_nsec));
}

fn xattr_set(p: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let n = CString::new(name).unwrap();
    let r = unsafe {
        libc::lsetxattr(
            c(p).as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn xattr_get(p: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 65536];
    let r = unsafe {
        libc::lgetxattr(
            c(p).as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

fn xattr_list(p: &Path) -> Vec<String> {
    let mut buf = vec![0u8; 65536];
    let r = unsafe { libc::llistxattr(c(p).as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(r >= 0);
    buf.truncate(r as usize);
    let mut v: Vec<String> = buf
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn xattrs_on_every_file_type() {
    let m = Mounted::new(&[]);
    fs::write(m.path("f"), b"").unwrap();
    fs::create_dir(m.path("d")).unwrap();
    symlink("f", m.path("l")).unwrap();
    let r = unsafe { libc::mknod(c(&m.path("p")).as_ptr(), libc::S_IFIFO | 0o644, 0) };
    assert_eq!(r, 0);
    let r = unsafe {
        libc::mknod(
            c(&m.path("cdev")).as_ptr(),
            libc::S_IFCHR | 0o644,
            libc::makedev(1, 7),
        )
    };
    assert_eq!(r, 0);
    for name in ["f", "d", "l", "p", "cdev"] {
        let p = m.path(name);
        // user.* is only allowed on files and directories (as on every Linux filesystem)
        if name == "f" || name == "d" {
            xattr_set(&p, "user.color", b"blue").unwrap();
            assert_eq!(xattr_get(&p, "user.color").unwrap(), b"blue");
        }
        xattr_set(&p, "trusted.k", b"v1").unwrap();
        xattr_set(&p, "security.s", b"\x00\x01binary").unwrap();
        // a name in the namespace spinfs uses for overlay markers is the user's own
        xattr_set(&p, "trusted.overlay.opaque", b"y").unwrap();
        assert_eq!(xattr_get(&p, "trusted.k").unwrap(), b"v1");
        assert_eq!(xattr_get(&p, "security.s").unwrap(), b"\x00\x01binary");
        assert_eq!(xattr_get(&p, "trusted.overlay.opaque").unwrap(), b"y");
        let list = xattr_list(&p);
        assert!(list.contains(&"trusted.k".to_string()), "{name}: {list:?}");
        assert!(
            list.contains(&"trusted.overlay.opaque".to_string()),
            "{name}: {list:?}"
        );
        assert!(
            !list
                .iter()
                .any(|n| n.starts_with("trusted.overlay.overlay.")),
            "{list:?}"
        );
        let n = CString::new("trusted.k").unwrap();
        assert_eq!(unsafe { libc::lremovexattr(c(&p).as_ptr(), n.as_ptr()) }, 0);
        let e = xattr_get(&p, "trusted.k").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENODATA));
    }
    // size probing and ERANGE
    let n = CString::new("user.color").unwrap();
    let f = c(&m.path("f"));
    let len = unsafe { libc::getxattr(f.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
    assert_eq!(len, 4);
    let mut small = [0u8; 2];
    let r = unsafe { libc::getxattr(f.as_ptr(), n.as_ptr(), small.as_mut_ptr().cast(), 2) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ERANGE)
    );
    // XATTR_CREATE on an existing name fails
    let r = unsafe {
        libc::setxattr(
            f.as_ptr(),
            n.as_ptr(),
            b"x".as_ptr().cast(),
            1,
            libc::XATTR_CREATE,
        )
    };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EEXIST)
    );
    // POSIX ACLs through setfacl/getfacl
    let out = std::process::Command::new("setfacl")
        .args(["-m", "u:1234:rwx"])
        .arg(m.path("f"))
        .output()
        .expect("setfacl (package acl)");
    assert!(out.status.success(), "setfacl: {}", stderr(&out));
    let out = std::process::Command::new("getfacl")
        .arg("-c")
        .arg(m.path("f"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("user:1234:rwx"));
}

#[test]
fn statfs_reports_the_backing_space() {
    let m = Mounted::new(&[]);
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c(&m.mnt).as_ptr(), &mut st) }, 0);
    assert!(st.f_blocks > 0 && st.f_bavail > 0 && st.f_bsize > 0);
    assert_eq!(st.f_namemax, 255);
}

#[test]
fn permission_checks_for_other_users() {
    let m = Mounted::new(&[]);
    common::set_mode(&m.mnt, 0o777);
    fs::write(m.path("secret"), b"s").unwrap();
    fs::set_permissions(m.path("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    let secret = m.path("secret");
    let out = as_user(65534, 65534, &["cat", secret.to_str().unwrap()]);
    assert!(!out.status.success(), "nobody read a 0600 root file");
    assert!(
        stderr(&out).contains("Permission denied"),
        "{}",
        stderr(&out)
    );
    fs::set_permissions(m.path("secret"), fs::Permissions::from_mode(0o644)).unwrap();
    let out = as_user(65534, 65534, &["cat", secret.to_str().unwrap()]);
    assert!(out.status.success());
    // a file created by another user belongs to that user
    let theirs = m.path("theirs");
    let out = as_user(1000, 1000, &["touch", theirs.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let md = fs::metadata(&theirs).unwrap();
    assert_eq!((md.uid(), md.gid()), (1000, 1000));
    // ...who may chmod it but not chown it away
    let out = as_user(1000, 1000, &["chmod", "600", theirs.to_str().unwrap()]);
    assert!(out.status.success());
    let out = as_user(1000, 1000, &["chown", "0", theirs.to_str().unwrap()]);
    assert!(!out.status.success());
    // sticky directory: others may not delete my file
    fs::create_dir(m.path("tmp")).unwrap();
    fs::set_permissions(m.path("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    let mine = m.path("tmp/mine");
    assert!(
        as_user(1000, 1000, &["touch", mine.to_str().unwrap()])
            .status
            .success()
    );
    let out = as_user(1001, 1001, &["rm", "-f", mine.to_str().unwrap()]);
    assert!(!out.status.success() || mine.exists(), "sticky bit ignored");
    assert!(mine.exists());
    // set-group-id directories hand their group down
    fs::create_dir(m.path("sgid")).unwrap();
    std::os::unix::fs::chown(m.path("sgid"), Some(0), Some(4242)).unwrap();
    fs::set_permissions(m.path("sgid"), fs::Permissions::from_mode(0o2777)).unwrap();
    let inherit = m.path("sgid/f");
    assert!(
        as_user(1000, 1000, &["touch", inherit.to_str().unwrap()])
            .status
            .success()
    );
    assert_eq!(fs::metadata(&inherit).unwrap().gid(), 4242);
    let sub = m.path("sgid/sub");
    assert!(
        as_user(1000, 1000, &["mkdir", sub.to_str().unwrap()])
            .status
            .success()
    );
    assert_eq!(fs::metadata(&sub).unwrap().mode() & 0o2000, 0o2000);
    // access(2)
    let out = as_user(65534, 65534, &["test", "-w", secret.to_str().unwrap()]);
    assert!(!out.status.success());
}

#[test]
fn open_unlinked_file_keeps_working_through_its_descriptor() {
    let m = Mounted::new(&[]);
    let p = m.path("victim");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.write_all(b"before").unwrap();
    fs::remove_file(&p).unwrap();
    assert!(!p.exists());
    // fstat through the handle (the kernel sends getattr with the file handle)
    let md = f.metadata().unwrap();
    assert_eq!(md.len(), 6);
    assert_eq!(md.nlink(), 0);
    f.write_all_at(b" after", 6).unwrap();
    f.sync_all().unwrap();
    let mut s = String::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "before after");
    f.set_len(3).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 3);
    let fd = f.as_raw_fd();
    assert_eq!(unsafe { libc::fchmod(fd, 0o600) }, 0);
    assert_eq!(f.metadata().unwrap().mode() & 0o777, 0o600);
    // renamed while open: same story
    let q = m.path("moving");
    let mut g = File::create(&q).unwrap();
    fs::create_dir(m.path("dst")).unwrap();
    fs::rename(&q, m.path("dst/moved")).unwrap();
    g.write_all(b"still here").unwrap();
    g.sync_all().unwrap();
    assert_eq!(fs::read(m.path("dst/moved")).unwrap(), b"still here");
}

#[test]
fn inode_numbers_are_stable_and_readdir_matches_stat() {
    let mut m = Mounted::new(&[]);
    fs::create_dir(m.path("d")).unwrap();
    for i in 0..50 {
        fs::write(m.path(&format!("d/f{i}")), b"x").unwrap();
    }
    fs::hard_link(m.path("d/f0"), m.path("hl")).unwrap();
    let mut before = std::collections::BTreeMap::new();
    for e in fs::read_dir(m.path("d")).unwrap() {
        let e = e.unwrap();
        let d_ino = e.ino();
        let st_ino = fs::symlink_metadata(e.path()).unwrap().ino();
        assert_ne!(d_ino, 0);
        assert_eq!(d_ino, st_ino, "d_ino == st_ino for {:?}", e.file_name());
        before.insert(e.file_name(), st_ino);
    }
    assert_eq!(before.len(), 50);
    let root_ino = fs::metadata(&m.mnt).unwrap().ino();
    assert_eq!(root_ino, 1);
    let dir_ino = fs::metadata(m.path("d")).unwrap().ino();
    m.remount();
    for (name, ino) in &before {
        assert_eq!(
            fs::symlink_metadata(m.path("d").join(name)).unwrap().ino(),
            *ino
        );
    }
    assert_eq!(
        fs::metadata(m.path("hl")).unwrap().ino(),
        before[std::ffi::OsStr::new("f0")]
    );
    assert_eq!(fs::metadata(m.path("d")).unwrap().ino(), dir_ino);
    // "." and ".." in readdir
    let dir = CString::new(m.path("d").as_os_str().as_bytes()).unwrap();
    unsafe {
        let dp = libc::opendir(dir.as_ptr());
        assert!(!dp.is_null());
        let mut seen = 0;
        loop {
            let ent = libc::readdir(dp);
            if ent.is_null() {
                break;
            }
            let name = std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()).to_bytes();
            if name == b"." {
                assert_eq!((*ent).d_ino, dir_ino);
                seen += 1;
            } else if name == b".." {
                assert_eq!((*ent).d_ino, 1);
                seen += 1;
            }
        }
        libc::closedir(dp);
        assert_eq!(seen, 2);
    }
}

#[test]
fn seekdir_telldir_are_stable() {
    let m = Mounted::new(&[]);
    for i in 0..300 {
        fs::write(m.path(&format!("entry-with-a-long-name-{i:04}")), b"").unwrap();
    }
    let dir = CString::new(m.mnt.as_os_str().as_bytes()).unwrap();
    unsafe {
        let dp = libc::opendir(dir.as_ptr());
        let mut names = Vec::new();
        let mut positions = Vec::new();
        loop {
            positions.push(libc::telldir(dp));
            let ent = libc::readdir(dp);
            if ent.is_null() {
                break;
            }
            names.push(std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()).to_owned());
        }
        assert_eq!(names.len(), 302);
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 302, "no duplicates");
        for k in [0usize, 1, 150, 299, 301] {
            libc::seekdir(dp, positions[k]);
            let ent = libc::readdir(dp);
            assert!(!ent.is_null());
            assert_eq!(
                std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()),
                names[k].as_c_str()
            );
        }
        libc::closedir(dp);
    }
}

#[test]
fn mmap_reads_and_writes() {
    let m = Mounted::new(&[]);
    let p = m.path("mapped");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.set_len(65536).unwrap();
    unsafe {
        let ptr = libc::mmap(
            std::ptr::null_mut(),
            65536,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(ptr, libc::MAP_FAILED);
        let s = std::slice::from_raw_parts_mut(ptr as *mut u8, 65536);
        s[100..105].copy_from_slice(b"mmap!");
        assert_eq!(libc::msync(ptr, 65536, libc::MS_SYNC), 0);
        libc::munmap(ptr, 65536);
    }
    let data = fs::read(&p).unwrap();
    assert_eq!(&data[100..105], b"mmap!");
}

/// Write-only handles are served by the daemon with direct I/O, read-write ones by
/// passthrough (by the daemon through the page cache with `nopassthrough_writes`, and whenever
/// a daemon-served handle of the file is open), readers by passthrough: every mix of them on
/// one file sees the same bytes. A reader opened before a write-only writer, one opened
/// after, a shared mapping, O_APPEND and O_DIRECT writers; writers opened while a passthrough
/// reader holds the file (the kernel wants one backing file then); set-id bits cleared by an
/// unprivileged write-only or read-write writer. On the default mount and with
/// `nopassthrough_writes`.
#[test]
fn writers_and_readers_of_one_file_in_every_mode_see_the_same_bytes() {
    for opts in ["allow_other", "allow_other,nopassthrough_writes"] {
        writers_and_readers_of_one_file(opts);
    }
}

fn writers_and_readers_of_one_file(opts: &str) {
    let m = Mounted::with_options(&[], opts);
    let p = m.path("mixed");
    let w = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    w.write_all_at(&[b'a'; 8192], 0).unwrap();
    let r = File::open(&p).unwrap();
    let mut buf = vec![0u8; 8192];
    r.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![b'a'; 8192]);
    // A write through the write-only handle shows through the reader's cached pages.
    w.write_all_at(&[b'b'; 100], 4000).unwrap();
    r.read_exact_at(&mut buf, 0).unwrap();
    let mut want = vec![b'a'; 8192];
    want[4000..4100].fill(b'b');
    assert_eq!(buf, want);
    // A shared mapping through a read-write handle, written both ways.
    let rw = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    // SAFETY: a shared mapping of 8 KiB of an open 8 KiB file, unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            rw.as_raw_fd(),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED);
    // SAFETY: the mapping is 8192 bytes long.
    let mapped = unsafe { std::slice::from_raw_parts_mut(map as *mut u8, 8192) };
    assert_eq!(&mapped[4000..4100], &[b'b'; 100][..]);
    w.write_all_at(b"cccc", 0).unwrap();
    assert_eq!(&mapped[..4], b"cccc", "a direct write shows in the mapping");
    mapped[20..24].copy_from_slice(b"dddd");
    // SAFETY: the mapping made above.
    assert_eq!(unsafe { libc::msync(map, 8192, libc::MS_SYNC) }, 0);
    // SAFETY: the mapping made above, not used after.
    assert_eq!(unsafe { libc::munmap(map, 8192) }, 0);
    let mut head = [0u8; 24];
    r.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(&head, b"ccccaaaaaaaaaaaaaaaadddd");
    // O_APPEND, write-only.
    let mut a = OpenOptions::new().append(true).open(&p).unwrap();
    a.write_all(b"END").unwrap();
    assert_eq!(r.metadata().unwrap().len(), 8195);
    // O_DIRECT, write-only, 4 KiB aligned.
    let d = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .unwrap();
    let layout = std::alloc::Layout::from_size_align(4096, 4096).unwrap();
    // SAFETY: a 4096-byte, 4096-aligned allocation, freed below.
    let block = unsafe { std::alloc::alloc(layout) };
    // SAFETY: `block` is 4096 bytes.
    let aligned = unsafe { std::slice::from_raw_parts_mut(block, 4096) };
    aligned.fill(b'z');
    d.write_all_at(aligned, 8192).unwrap();
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(block, layout) };
    let mut tail = vec![0u8; 4096];
    r.read_exact_at(&mut tail, 8192).unwrap();
    assert_eq!(tail, vec![b'z'; 4096]);
    w.sync_all().unwrap();
    w.sync_data().unwrap();
    drop((w, r, rw, a, d));

    // A passthrough reader first, then writers of every kind.
    let q = m.path("reader_first");
    fs::write(&q, b"x").unwrap();
    let r = File::open(&q).unwrap();
    let w = OpenOptions::new().write(true).open(&q).unwrap();
    w.write_all_at(b"yz", 0).unwrap();
    let rw = OpenOptions::new().read(true).write(true).open(&q).unwrap();
    rw.write_all_at(b"!", 2).unwrap();
    let mut got = [0u8; 3];
    r.read_exact_at(&mut got, 0).unwrap();
    assert_eq!(&got, b"yz!");
    drop((r, w, rw));

    // Set-id bits go with an unprivileged write, through either kind of writer.
    common::set_mode(&m.mnt, 0o777);
    // `>>` opens O_WRONLY|O_APPEND, `1<>` O_RDWR; neither truncates (a truncate clears the
    // bits in the kernel, not through a write).
    for (name, redirect) in [("suid_wo", ">>"), ("suid_rw", "1<>")] {
        let f = m.path(name);
        fs::write(&f, b"x").unwrap();
        std::os::unix::fs::chown(&f, Some(65534), Some(65534)).unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o6755)).unwrap();
        let script = format!("printf abc {redirect}'{}'", f.to_str().unwrap());
        let out = as_user(65534, 65534, &["/bin/sh", "-c", &script]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let mode = fs::metadata(&f).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o755, "{name}: set-id bits cleared by the write");
    }
}
