//! One instance of a file or directory in a read-only layer below the writable tree: an
//! archived image, or the SSD tree of a generation frozen for sealing.

use crate::archive::{ArchivedLayer, Xattr};
use crate::markers;
use crate::stackmap::{STACK_XATTR, StackMap, StackRef, Stored};
use crate::sys::{self, Errno, SysResult};
use crate::volume::{Attr, FileKind, ROOT_INO, Timestamp};
use spinfs_erofs::{FileType, Inode};
use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

/// A frozen generation's tree, read-only while it is sealed.
pub struct FrozenTree {
    pub generation: u64,
    /// Backing inode number of the tree's root (it is the volume's root).
    pub root_backing_ino: u64,
    pub root: Arc<OwnedFd>,
    /// The archived layers below it when it was frozen (newest first): the lower files of
    /// its stacked files are found there.
    pub below: Vec<Arc<ArchivedLayer>>,
}

impl FrozenTree {
    /// The lower file of one of this tree's stacked files.
    fn stacked_lower(&self, map: &StackMap) -> SysResult<Option<LowerPart>> {
        let roots = self
            .below
            .iter()
            .map(LowerPart::image_root)
            .collect::<SysResult<Vec<_>>>()?;
        resolve_path(&roots, &map.lower_path)
    }
}

#[derive(Clone)]
pub enum LowerPart {
    Image {
        layer: Arc<ArchivedLayer>,
        inode: Inode,
        /// Path from the layer root (components joined by `/`; empty for the root).
        path: Arc<[u8]>,
    },
    Tree {
        tree: Arc<FrozenTree>,
        fd: Arc<OwnedFd>,
        st: libc::stat,
        path: Arc<[u8]>,
    },
}

fn child_path(parent: &[u8], name: &[u8]) -> Arc<[u8]> {
    if parent.is_empty() {
        Arc::from(name)
    } else {
        let mut v = Vec::with_capacity(parent.len() + 1 + name.len());
        v.extend_from_slice(parent);
        v.push(b'/');
        v.extend_from_slice(name);
        Arc::from(v)
    }
}

/// Lower parts of `name` below a directory whose lower parts are `parts`: the topmost
/// instance, and for a directory every further one down to an opaque one. `Ok(None)` when
/// the name does not exist below or a whiteout hides it.
pub(crate) fn lower_lookup(parts: &[LowerPart], name: &[u8]) -> SysResult<Option<Vec<LowerPart>>> {
    let mut found: Vec<LowerPart> = Vec::new();
    for p in parts {
        let Some(child) = p.lookup(name)? else {
            continue;
        };
        let is_dir = child.is_dir();
        if found.is_empty() {
            if child.is_whiteout()? {
                return Ok(None);
            }
            let opaque = is_dir && child.is_opaque()?;
            found.push(child);
            if !is_dir || opaque {
                break;
            }
        } else {
            // Below a directory: only directories merge; anything else ends the merge.
            if !is_dir {
                break;
            }
            let opaque = child.is_opaque()?;
            found.push(child);
            if opaque {
                break;
            }
        }
    }
    Ok(if found.is_empty() { None } else { Some(found) })
}

/// The file at `path` (components joined by `/`) in the namespace the layer roots `roots`
/// (newest first) show.
pub(crate) fn resolve_path(roots: &[LowerPart], path: &[u8]) -> SysResult<Option<LowerPart>> {
    let mut parts = roots.to_vec();
    for comp in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
        if parts.is_empty() || !parts[0].is_dir() {
            return Ok(None);
        }
        match lower_lookup(&parts, comp)? {
            Some(p) => parts = p,
            None => return Ok(None),
        }
    }
    Ok(parts.into_iter().next())
}

/// The raw value of an SSD tree file's stack xattr, if it has one.
fn stack_xattr(fd: std::os::fd::BorrowedFd<'_>) -> SysResult<Option<Vec<u8>>> {
    let name = cstr(STACK_XATTR);
    loop {
        let n = match sys::getxattr_fd(fd, &name, &mut []) {
            Ok(n) => n,
            Err(Errno(libc::ENODATA)) | Err(Errno(libc::ENOTSUP)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut v = vec![0u8; n];
        match sys::getxattr_fd(fd, &name, &mut v) {
            Ok(n) => {
                v.truncate(n);
                return Ok(Some(v));
            }
            // It grew in between (an inline map became longer): ask again.
            Err(Errno(libc::ERANGE)) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Whether an SSD tree file is a stacked file (it has a stack xattr).
pub(crate) fn tree_is_stacked(fd: std::os::fd::BorrowedFd<'_>) -> SysResult<bool> {
    Ok(stack_xattr(fd)?.is_some())
}

/// How an SSD tree file's stack map is stored, if it is a stacked file.
pub(crate) fn tree_stored_map(fd: std::os::fd::BorrowedFd<'_>) -> SysResult<Option<Stored>> {
    let Some(v) = stack_xattr(fd)? else {
        return Ok(None);
    };
    match Stored::decode(&v) {
        Ok(s) => Ok(Some(s)),
        Err(e) => {
            tracing::error!("a stacked file's chunk map is damaged");
            Err(e)
        }
    }
}

/// Reads the sidecar map `r` of the generation that `gen_dir_child` (a directory directly in
/// the generation's directory: its tree root or work directory) belongs to.
pub(crate) fn read_sidecar(
    gen_dir_child: std::os::fd::BorrowedFd<'_>,
    r: &StackRef,
) -> SysResult<StackMap> {
    let path = cstr(r.path_from_gen_child().as_bytes());
    let f =
        sys::openat(gen_dir_child, &path, libc::O_RDONLY | libc::O_CLOEXEC, 0).map_err(|e| {
            tracing::error!(
                sidecar = r.file_name(),
                "a stacked file's chunk map file: {e}"
            );
            if e == Errno::ENOENT { Errno::EIO } else { e }
        })?;
    let size = sys::fstat(f.as_fd())?.st_size as u64;
    if size != r.len {
        tracing::error!(
            sidecar = r.file_name(),
            "a stacked file's chunk map file has the wrong length"
        );
        return Err(Errno::EIO);
    }
    let mut v = vec![0u8; r.len as usize];
    let mut done = 0;
    while done < v.len() {
        let n = sys::pread(f.as_fd(), &mut v[done..], done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    r.load(&v[..done]).inspect_err(|_| {
        tracing::error!(
            sidecar = r.file_name(),
            "a stacked file's chunk map file is damaged"
        );
    })
}

/// The stack map of an SSD tree file, if it is a stacked file, with the sidecar it was read
/// from. `gen_dir_child`: a directory directly in the file's generation directory (its tree
/// root or work directory), where a sidecar is looked for.
pub(crate) fn tree_stack_map_at(
    fd: std::os::fd::BorrowedFd<'_>,
    gen_dir_child: std::os::fd::BorrowedFd<'_>,
) -> SysResult<Option<(StackMap, Option<StackRef>)>> {
    match tree_stored_map(fd)? {
        None => Ok(None),
        Some(Stored::Inline(m)) => Ok(Some((m, None))),
        Some(Stored::Sidecar(r)) => Ok(Some((read_sidecar(gen_dir_child, &r)?, Some(r)))),
    }
}

/// The stack map of an SSD tree file, if it is a stacked file (see [`tree_stack_map_at`]).
pub(crate) fn tree_stack_map(
    fd: std::os::fd::BorrowedFd<'_>,
    gen_dir_child: std::os::fd::BorrowedFd<'_>,
) -> SysResult<Option<StackMap>> {
    Ok(tree_stack_map_at(fd, gen_dir_child)?.map(|(m, _)| m))
}

/// Reads `[offset, offset + buf.len())` of a stacked file (upper descriptor `upper`, readable)
/// clipped to its size: upper chunks from the upper file, below chunks from `lower` up to the
/// map's limit, zeros beyond. Returns the bytes read.
pub(crate) fn stacked_read(
    upper: std::os::fd::BorrowedFd<'_>,
    map: &StackMap,
    lower: Option<&LowerPart>,
    offset: u64,
    buf: &mut [u8],
) -> SysResult<usize> {
    let size = sys::fstat(upper)?.st_size as u64;
    if offset >= size {
        return Ok(0);
    }
    let end = (offset + buf.len() as u64).min(size);
    let bits = map.chunk_bits;
    let mut pos = offset;
    while pos < end {
        let c = pos >> bits;
        let cend = ((c + 1) << bits).min(end);
        let out = &mut buf[(pos - offset) as usize..(cend - offset) as usize];
        let filled = if map.is_below(c) {
            let (_, le) = map.lower_range(c);
            let lend = cend.min(le).max(pos);
            if lend > pos {
                let lower = lower.ok_or(Errno::EIO)?;
                let want = (lend - pos) as usize;
                let mut done = 0;
                while done < want {
                    let n = lower.read(pos + done as u64, &mut out[done..want])?;
                    if n == 0 {
                        break;
                    }
                    done += n;
                }
                done
            } else {
                0
            }
        } else {
            let mut done = 0;
            while done < out.len() {
                let n = sys::pread(upper, &mut out[done..], pos + done as u64)?;
                if n == 0 {
                    break;
                }
                done += n;
            }
            done
        };
        out[filled..].fill(0);
        pos = cend;
    }
    Ok((end - offset) as usize)
}

/// SEEK_DATA (`data`) or SEEK_HOLE from `offset` in a stacked file; `None` = ENXIO.
pub(crate) fn stacked_seek(
    upper: std::os::fd::BorrowedFd<'_>,
    map: &StackMap,
    lower: Option<&LowerPart>,
    offset: u64,
    data: bool,
) -> SysResult<Option<u64>> {
    let size = sys::fstat(upper)?.st_size as u64;
    if offset >= size {
        return Ok(None);
    }
    let bits = map.chunk_bits;
    let whence = if data {
        libc::SEEK_DATA
    } else {
        libc::SEEK_HOLE
    };
    let mut pos = offset;
    while pos < size {
        let c = pos >> bits;
        let cend = ((c + 1) << bits).min(size);
        if map.is_below(c) {
            let (_, le) = map.lower_range(c);
            let lend = cend.min(le);
            if pos < lend {
                let lower = lower.ok_or(Errno::EIO)?;
                let r = lower.seek(pos, data)?;
                match r {
                    Some(x) if x < lend => return Ok(Some(x.max(pos))),
                    _ if !data && lend < cend => return Ok(Some(lend)),
                    _ => {}
                }
            } else if !data {
                return Ok(Some(pos));
            }
        } else {
            match sys::lseek(upper, pos as i64, whence) {
                Ok(x) if (x as u64) < cend => return Ok(Some(x as u64)),
                Ok(_) | Err(Errno(libc::ENXIO)) => {}
                Err(e) => return Err(e),
            }
        }
        pos = cend;
    }
    Ok(if data { None } else { Some(size) })
}

fn kind_of_type(t: FileType) -> FileKind {
    match t {
        FileType::Dir => FileKind::Directory,
        FileType::Symlink => FileKind::Symlink,
        FileType::Fifo => FileKind::Fifo,
        FileType::Socket => FileKind::Socket,
        FileType::CharDev => FileKind::CharDevice,
        FileType::BlockDev => FileKind::BlockDevice,
        _ => FileKind::Regular,
    }
}

pub(crate) fn cstr(b: &[u8]) -> CString {
    CString::new(b).expect("marker names have no NUL")
}

/// Whether an SSD tree entry is a whiteout (char 0/0 not marked as a user's device).
pub(crate) fn tree_is_whiteout(fd: std::os::fd::BorrowedFd<'_>, st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFCHR
        && st.st_rdev == 0
        && sys::getxattr_fd(fd, &cstr(markers::REALDEV_XATTR), &mut []).is_err()
}

pub(crate) fn tree_is_opaque(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    let mut v = [0u8; 1];
    matches!(sys::getxattr_fd(fd, &cstr(markers::OPAQUE_XATTR), &mut v), Ok(1) if v[0] == b'y')
}

/// The recorded inode number of an SSD tree entry (copy-ups), if any.
pub(crate) fn tree_recorded_ino(fd: std::os::fd::BorrowedFd<'_>) -> Option<u64> {
    let mut buf = [0u8; 8];
    match sys::getxattr_fd(fd, &cstr(markers::INO_XATTR), &mut buf) {
        Ok(8) => Some(u64::from_le_bytes(buf)),
        _ => None,
    }
}

/// Stored xattrs of an SSD tree entry except the inode number.
fn tree_raw_xattrs(fd: std::os::fd::BorrowedFd<'_>) -> SysResult<Vec<Xattr>> {
    let mut buf = vec![0u8; 64 * 1024];
    let len = sys::listxattr_fd(fd, &mut buf)?;
    let mut out = Vec::new();
    for name in buf[..len].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        if name == markers::INO_XATTR {
            continue;
        }
        let c = CString::new(name).map_err(|_| Errno::EIO)?;
        let n = sys::getxattr_fd(fd, &c, &mut [])?;
        let mut v = vec![0u8; n];
        let n = sys::getxattr_fd(fd, &c, &mut v)?;
        v.truncate(n);
        out.push((name.to_vec(), v));
    }
    Ok(out)
}

impl LowerPart {
    pub fn image_root(layer: &Arc<ArchivedLayer>) -> SysResult<LowerPart> {
        Ok(LowerPart::Image {
            layer: layer.clone(),
            inode: layer.root()?,
            path: Arc::from(&b""[..]),
        })
    }

    pub fn tree_root(tree: &Arc<FrozenTree>) -> SysResult<LowerPart> {
        let st = sys::fstat(tree.root.as_fd())?;
        Ok(LowerPart::Tree {
            tree: tree.clone(),
            fd: tree.root.clone(),
            st,
            path: Arc::from(&b""[..]),
        })
    }

    pub fn kind(&self) -> FileKind {
        match self {
            LowerPart::Image { inode, .. } => kind_of_type(inode.file_type),
            LowerPart::Tree { st, .. } => FileKind::from_mode(st.st_mode),
        }
    }

    pub fn is_dir(&self) -> bool {
        self.kind() == FileKind::Directory
    }

    /// The entry `name` of this directory, whiteouts included.
    pub fn lookup(&self, name: &[u8]) -> SysResult<Option<LowerPart>> {
        match self {
            LowerPart::Image { layer, inode, path } => {
                Ok(layer.lookup(inode, name)?.map(|i| LowerPart::Image {
                    layer: layer.clone(),
                    inode: i,
                    path: child_path(path, name),
                }))
            }
            LowerPart::Tree { tree, fd, path, .. } => {
                let c = CString::new(name).map_err(|_| Errno::EINVAL)?;
                match sys::open_path(fd.as_fd(), &c) {
                    Ok(child) => {
                        let st = sys::fstat(child.as_fd())?;
                        Ok(Some(LowerPart::Tree {
                            tree: tree.clone(),
                            fd: Arc::new(child),
                            st,
                            path: child_path(path, name),
                        }))
                    }
                    Err(Errno(libc::ENOENT)) => Ok(None),
                    Err(e) => Err(e),
                }
            }
        }
    }

    pub fn is_whiteout(&self) -> SysResult<bool> {
        match self {
            LowerPart::Image { layer, inode, .. } => layer.is_whiteout(inode),
            LowerPart::Tree { fd, st, .. } => Ok(tree_is_whiteout(fd.as_fd(), st)),
        }
    }

    pub fn is_opaque(&self) -> SysResult<bool> {
        match self {
            LowerPart::Image { layer, inode, .. } => layer.is_opaque(inode),
            LowerPart::Tree { fd, .. } => Ok(tree_is_opaque(fd.as_fd())),
        }
    }

    pub fn ino(&self) -> SysResult<u64> {
        match self {
            LowerPart::Image { layer, inode, .. } => layer.ino(inode),
            LowerPart::Tree { tree, fd, st, .. } => {
                if st.st_ino == tree.root_backing_ino {
                    return Ok(ROOT_INO);
                }
                Ok(crate::seal::generation_ino(
                    tree.generation,
                    st.st_ino,
                    tree_recorded_ino(fd.as_fd()),
                ))
            }
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            LowerPart::Image { inode, .. } => inode.size,
            LowerPart::Tree { st, .. } => st.st_size as u64,
        }
    }

    pub fn attr(&self, ino: u64) -> Attr {
        match self {
            LowerPart::Image {
                inode: i, layer, ..
            } => {
                let t = Timestamp {
                    sec: i.mtime,
                    nsec: i.mtime_nsec,
                };
                let ctime = layer
                    .ctime(i)
                    .map_or(t, |(sec, nsec)| Timestamp { sec, nsec });
                Attr {
                    ino,
                    size: i.size,
                    blocks: i.size.div_ceil(512),
                    atime: t,
                    mtime: t,
                    ctime,
                    kind: kind_of_type(i.file_type),
                    perm: i.mode & 0o7777,
                    nlink: i.nlink,
                    uid: i.uid,
                    gid: i.gid,
                    rdev: i.rdev,
                    blksize: 4096,
                }
            }
            LowerPart::Tree { st, fd, .. } => {
                // Live, not the stat taken at lookup: a file moved on to the writable tree
                // keeps changing while a node may still know it by this instance.
                let st = sys::fstat(fd.as_fd()).unwrap_or(*st);
                Attr::from_stat(&st, ino)
            }
        }
    }

    /// Every entry of this directory except "." and "..".
    pub fn entries(&self) -> SysResult<Vec<(Vec<u8>, LowerPart)>> {
        match self {
            LowerPart::Image { layer, inode, path } => layer
                .entries(inode)?
                .into_iter()
                .map(|(name, nid, _)| {
                    let path = child_path(path, &name);
                    Ok((
                        name,
                        LowerPart::Image {
                            layer: layer.clone(),
                            inode: layer.inode(nid)?,
                            path,
                        },
                    ))
                })
                .collect(),
            LowerPart::Tree { fd, .. } => {
                let dfd = sys::reopen(fd.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
                let mut out = Vec::new();
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
                        if let Some(child) = self.lookup(&e.name)? {
                            out.push((e.name, child));
                        }
                    }
                }
                Ok(out)
            }
        }
    }

    pub fn readlink(&self) -> SysResult<Vec<u8>> {
        match self {
            LowerPart::Image { layer, inode, .. } => layer.readlink(inode),
            LowerPart::Tree { fd, .. } => sys::readlink_fd(fd.as_fd()),
        }
    }

    /// User-visible xattrs.
    pub fn xattrs(&self) -> SysResult<Vec<Xattr>> {
        match self {
            LowerPart::Image { layer, inode, .. } => layer.xattrs(inode),
            LowerPart::Tree { fd, .. } => Ok(tree_raw_xattrs(fd.as_fd())?
                .into_iter()
                .filter_map(|(n, v)| markers::unescape_xattr(&n).map(|n| (n, v)))
                .collect()),
        }
    }

    /// Stored xattrs (markers and escapes as they are), without the inode number.
    pub fn raw_xattrs(&self) -> SysResult<Vec<Xattr>> {
        match self {
            LowerPart::Image { layer, inode, .. } => layer.raw_xattrs(inode),
            LowerPart::Tree { fd, .. } => tree_raw_xattrs(fd.as_fd()),
        }
    }

    /// Reads file data; returns the bytes read (short at end of file).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> SysResult<usize> {
        match self {
            LowerPart::Image { layer, inode, .. } => layer.read(inode, offset, buf),
            LowerPart::Tree { fd, tree, .. } => {
                let f = sys::reopen(fd.as_fd(), libc::O_RDONLY)?;
                if let Some(map) = tree_stack_map(f.as_fd(), tree.root.as_fd())? {
                    let lower = tree.stacked_lower(&map)?;
                    return stacked_read(f.as_fd(), &map, lower.as_ref(), offset, buf);
                }
                let mut done = 0;
                while done < buf.len() {
                    let n = sys::pread(f.as_fd(), &mut buf[done..], offset + done as u64)?;
                    if n == 0 {
                        break;
                    }
                    done += n;
                }
                Ok(done)
            }
        }
    }

    /// Calls `reply` with the file's bytes from `offset`, up to `len` (short at end of
    /// file), without copying archived bytes where it can (see `ArchivedLayer::read_with`).
    pub fn read_with<R>(
        &self,
        offset: u64,
        len: usize,
        reply: impl FnOnce(&[u8]) -> R,
    ) -> SysResult<R> {
        match self {
            LowerPart::Image { layer, inode, .. } => layer.read_with(inode, offset, len, reply),
            LowerPart::Tree { .. } => {
                let mut buf = vec![0u8; len];
                let n = self.read(offset, &mut buf)?;
                Ok(reply(&buf[..n]))
            }
        }
    }

    /// Whether this is a file of an archived layer (its data comes from the media).
    pub fn is_archived(&self) -> bool {
        matches!(self, LowerPart::Image { .. })
    }

    /// Where this part lives, for diagnostics.
    pub fn whereabouts(&self) -> String {
        match self {
            LowerPart::Image { layer, inode, .. } => {
                format!("archived layer {} (nid {})", layer.id, inode.nid)
            }
            LowerPart::Tree { tree, st, .. } => format!(
                "frozen generation {} (backing inode {})",
                tree.generation, st.st_ino
            ),
        }
    }

    /// First data (or hole) offset at or after `offset`; `None` past the end.
    pub fn seek(&self, offset: u64, data: bool) -> SysResult<Option<u64>> {
        match self {
            LowerPart::Image { layer, inode, .. } => layer.seek(inode, offset, data),
            LowerPart::Tree { fd, tree, .. } => {
                let f = sys::reopen(fd.as_fd(), libc::O_RDONLY)?;
                if let Some(map) = tree_stack_map(f.as_fd(), tree.root.as_fd())? {
                    let lower = tree.stacked_lower(&map)?;
                    return stacked_seek(f.as_fd(), &map, lower.as_ref(), offset, data);
                }
                let whence = if data {
                    libc::SEEK_DATA
                } else {
                    libc::SEEK_HOLE
                };
                match sys::lseek(f.as_fd(), offset as i64, whence) {
                    Ok(o) => Ok(Some(o as u64)),
                    Err(Errno(libc::ENXIO)) => Ok(None),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Path from the layer root (components joined by `/`).
    pub fn path(&self) -> &[u8] {
        match self {
            LowerPart::Image { path, .. } | LowerPart::Tree { path, .. } => path,
        }
    }

    /// A descriptor to read this file's data from, when it lives on the SSD.
    pub fn tree_fd(&self) -> Option<&Arc<OwnedFd>> {
        match self {
            LowerPart::Tree { fd, .. } => Some(fd),
            LowerPart::Image { .. } => None,
        }
    }

    pub fn perm(&self) -> u32 {
        self.attr(0).perm as u32
    }
}
