//! Builds a [`Tree`] from a directory on disk: every inode kind, hard links (by device and
//! inode number), xattrs; regular files are streamed from their paths when the image is
//! written (holes found with `SEEK_DATA`).

use crate::error::{Error, Result};
use crate::tree::{FileData, Metadata, Node, NodeId, NodeKind, Source, Tree};
use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Describes the tree under `root` (the root's own attributes become the image root's).
pub fn tree_from_dir(root: &Path) -> Result<Tree> {
    let md =
        fs::symlink_metadata(root).map_err(|e| Error::io(format!("stat {}", root.display()), e))?;
    if !md.is_dir() {
        return Err(Error::Invalid(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let mut tree = Tree::new(metadata(root, &md)?);
    let mut links: HashMap<(u64, u64), NodeId> = HashMap::new();
    let mut stack: Vec<(PathBuf, NodeId)> = vec![(root.to_path_buf(), tree.root())];
    while let Some((dir, id)) = stack.pop() {
        let rd = fs::read_dir(&dir).map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
        let mut names = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
            names.push(entry.file_name());
        }
        names.sort();
        for name in names {
            let path = dir.join(&name);
            let md = fs::symlink_metadata(&path)
                .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
            let key = (md.dev(), md.ino());
            if !md.is_dir()
                && md.nlink() > 1
                && let Some(&target) = links.get(&key)
            {
                tree.link(id, name.as_bytes(), target);
                continue;
            }
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                NodeKind::Dir(Vec::new())
            } else if ft.is_file() {
                NodeKind::File(FileData {
                    size: md.len(),
                    chunk_bits: None,
                    chunks: None,
                    source: Some(Source::Path(path.clone())),
                })
            } else if ft.is_symlink() {
                let target = fs::read_link(&path)
                    .map_err(|e| Error::io(format!("readlink {}", path.display()), e))?;
                NodeKind::Symlink(target.as_os_str().as_bytes().to_vec())
            } else if ft.is_char_device() {
                NodeKind::CharDev(md.rdev())
            } else if ft.is_block_device() {
                NodeKind::BlockDev(md.rdev())
            } else if ft.is_fifo() {
                NodeKind::Fifo
            } else {
                NodeKind::Socket
            };
            let node = Node {
                meta: metadata(&path, &md)?,
                kind,
            };
            let is_dir = node.is_dir();
            let child = tree.add(id, name.as_bytes(), node);
            if is_dir {
                stack.push((path, child));
            } else if md.nlink() > 1 {
                links.insert(key, child);
            }
        }
    }
    Ok(tree)
}

fn metadata(path: &Path, md: &fs::Metadata) -> Result<Metadata> {
    Ok(Metadata {
        ino: 0,
        perm: (md.mode() & 0o7777) as u16,
        uid: md.uid(),
        gid: md.gid(),
        mtime: md.mtime(),
        mtime_nsec: md.mtime_nsec() as u32,
        xattrs: read_xattrs(path)?,
    })
}

/// All xattrs of `path` (not following symlinks), sorted by name.
pub fn read_xattrs(path: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let err = |e| Error::io(format!("list xattrs of {}", path.display()), e);
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::Invalid(format!("path {} contains NUL", path.display())))?;
    let names = loop {
        // SAFETY: c is a valid NUL-terminated path; a null buffer with size 0 asks for the size.
        let n = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOTSUP) {
                return Ok(Vec::new());
            }
            return Err(err(e));
        }
        let mut buf = vec![0u8; n as usize];
        // SAFETY: buf is writable for buf.len() bytes.
        let m = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if m >= 0 {
            buf.truncate(m as usize);
            break buf;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(err(e));
        }
    };
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).expect("split on NUL");
        let value = loop {
            // SAFETY: valid C strings; null buffer with size 0 asks for the value size.
            let n = unsafe { libc::lgetxattr(c.as_ptr(), cname.as_ptr(), std::ptr::null_mut(), 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                // Removed since listed, or hidden by the VFS (user.* on special files).
                if e.raw_os_error() == Some(libc::ENODATA) {
                    break None;
                }
                return Err(err(e));
            }
            let mut buf = vec![0u8; n as usize];
            // SAFETY: buf is writable for buf.len() bytes.
            let m = unsafe {
                libc::lgetxattr(
                    c.as_ptr(),
                    cname.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if m >= 0 {
                buf.truncate(m as usize);
                break Some(buf);
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENODATA) {
                break None;
            }
            if e.raw_os_error() != Some(libc::ERANGE) {
                return Err(err(e));
            }
        };
        if let Some(value) = value {
            out.push((name.to_vec(), value));
        }
    }
    out.sort();
    Ok(out)
}
