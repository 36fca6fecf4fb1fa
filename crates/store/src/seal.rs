//! Sealing: a frozen generation's tree becomes an EROFS image pair on the media.
//!
//! The blob streams to the media chunk by chunk while the meta image is built in memory
//! (proportional to the tree, not the data); the meta follows the blob onto the media, one
//! commit makes both durable, and only then is the meta published on the SSD
//! (`layers/<id>.meta`) and the manifest switched by the caller.

use crate::layout::StoreLayout;
use crate::manifest::{ImageRecord, LayerRecord};
use crate::markers::{CTIME_XATTR, INO_XATTR, REALDEV_XATTR};
use crate::sys::{self, Errno};
use spinfs_erofs::ReadAt;
use spinfs_erofs::{
    BlobSink, FileData, Metadata, Node, NodeId, NodeKind, Source, Tree, WriteOptions, write_image,
};
use spinfs_media::{ImageKind, ImageRef, MediaScheduler, Medium, MediumWriter};
use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("sealing generation {generation}: {path}: {error}")]
    Io {
        generation: u64,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("sealing generation {generation}: image: {error}")]
    Image {
        generation: u64,
        error: spinfs_erofs::Error,
    },
    #[error("sealing generation {generation}: media: {error}")]
    Media {
        generation: u64,
        error: spinfs_media::MediaError,
    },
}

/// What a generation holds, as the image will show it.
#[derive(Debug, Default, Clone, Copy)]
pub struct TreeStats {
    /// Non-directory inodes (each hard-linked inode once), whiteouts excluded.
    pub files: u64,
    /// Bytes of regular-file data.
    pub bytes: u64,
}

/// The inode number of an entry of generation `generation`'s tree: the copy-up's recorded
/// number if there is one, else derived from the backing inode (see `volume`).
pub fn generation_ino(generation: u64, backing_ino: u64, recorded: Option<u64>) -> u64 {
    recorded.unwrap_or((generation << 32) | (backing_ino & 0xffff_ffff))
}

fn recorded_ino(xattrs: &[(Vec<u8>, Vec<u8>)]) -> Option<u64> {
    xattrs
        .iter()
        .find(|(n, _)| n.as_slice() == INO_XATTR)
        .and_then(|(_, v)| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map(u64::from_le_bytes)
}

/// Reads a file of the frozen tree by directory descriptor and name, opening it for each
/// read: paths of deep trees can exceed PATH_MAX, and a descriptor per file would not scale.
///
/// Reads bypass the page cache (O_DIRECT, where the filesystem allows it): a seal reads a
/// whole generation once, and buffered reads with their read-ahead both flood the disk queue
/// ahead of the mount's own writes and fsyncs (measured on mq-deadline: a concurrent buffered
/// sequential read multiplies fdatasync p99 by 3-5, a direct one leaves it unchanged) and
/// fill the page cache with data about to be deleted. Ranges with no data (SEEK_DATA) read
/// as zeros without I/O, so sparse files stay cheap.
struct TreeFile {
    dir: Arc<OwnedFd>,
    name: CString,
}

/// Alignment of direct reads.
const DIRECT_ALIGN: u64 = 4096;
/// Largest single direct read: each one holds the disk queue as long as it takes, so a
/// mount's fsync waits at most about that long behind the seal (measured on mq-deadline:
/// fdatasync p99 alone 5-8 ms; beside 4 MiB direct reads 9 ms, 1 MiB 7 ms, 256 KiB 5 ms, at
/// 550-625 MB/s each).
const DIRECT_PIECE: usize = 256 << 10;

thread_local! {
    /// The aligned buffer of direct reads, reused by the sealing thread.
    static DIRECT_BUF: std::cell::RefCell<spinfs_media::buf::AlignedBuf> =
        std::cell::RefCell::new(spinfs_media::buf::AlignedBuf::zeroed(0));
}

impl TreeFile {
    fn open(&self, flags: i32) -> std::io::Result<std::fs::File> {
        sys::openat(self.dir.as_fd(), &self.name, flags, 0)
            .map(std::fs::File::from)
            .map_err(|e| std::io::Error::from_raw_os_error(e.0))
    }
}

impl ReadAt for TreeFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let len = buf.len() as u64;
        let file = match self.open(libc::O_RDONLY | libc::O_DIRECT) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return self.open(libc::O_RDONLY)?.read_exact_at(buf, offset);
            }
            Err(e) => return Err(e),
        };
        // A hole up to the end of the range (or of the file): zeros, no I/O.
        // SAFETY: lseek on a descriptor we own.
        let data = unsafe { libc::lseek(file.as_raw_fd(), offset as i64, libc::SEEK_DATA) };
        if (data < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO))
            || (data >= 0 && data as u64 >= offset + len)
        {
            buf.fill(0);
            return Ok(());
        }
        let start = offset - offset % DIRECT_ALIGN;
        let end = (offset + len).next_multiple_of(DIRECT_ALIGN);
        DIRECT_BUF.with(|cell| {
            let mut aligned = cell.borrow_mut();
            if aligned.capacity() < (end - start) as usize {
                *aligned = spinfs_media::buf::AlignedBuf::zeroed((end - start) as usize);
            }
            let want = (end - start) as usize;
            let space = &mut aligned.full_mut()[..want];
            let mut done = 0usize;
            while done < want {
                // `space` is aligned and `done` a multiple of the alignment, as O_DIRECT
                // requires.
                let piece = (want - done).min(DIRECT_PIECE);
                match FileExt::read_at(&file, &mut space[done..done + piece], start + done as u64) {
                    Ok(0) => break,
                    Ok(n) => {
                        done += n;
                        if !done.is_multiple_of(DIRECT_ALIGN as usize) {
                            break; // end of file
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            let from = (offset - start) as usize;
            if done < from + len as usize {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "file shorter than its size in the frozen tree",
                ));
            }
            let bytes = &space[..done];
            buf.copy_from_slice(&bytes[from..from + len as usize]);
            Ok(())
        })
    }
}

/// Describes generation `generation`'s tree at `root` for the image writer. The root gets
/// inode number 1; markers (whiteouts, opaque directories, escaped user xattrs) are kept as
/// they are, since images use the same conventions as the SSD tree. The walk goes by
/// directory descriptors, so depth is unlimited.
pub fn build_tree(root: &Path, generation: u64) -> Result<(Tree, TreeStats), SealError> {
    let err = |path: &Path, e: Errno| SealError::Io {
        generation,
        path: path.to_path_buf(),
        error: std::io::Error::from_raw_os_error(e.0),
    };
    let croot = CString::new(root.as_os_str().as_bytes()).map_err(|_| err(root, Errno::EINVAL))?;
    // SAFETY: AT_FDCWD is a valid directory descriptor for *at calls.
    let cwd = unsafe { std::os::fd::BorrowedFd::borrow_raw(libc::AT_FDCWD) };
    let root_fd = sys::openat(cwd, &croot, libc::O_RDONLY | libc::O_DIRECTORY, 0)
        .map_err(|e| err(root, e))?;
    let st = sys::fstat(root_fd.as_fd()).map_err(|e| err(root, e))?;
    let mut root_meta = metadata_of(root_fd.as_fd(), &st, generation).map_err(|e| err(root, e))?;
    root_meta.ino = crate::volume::ROOT_INO;
    let mut tree = Tree::new(root_meta);
    let mut stats = TreeStats::default();
    let mut links: HashMap<u64, NodeId> = HashMap::new();
    let mut stack: Vec<(PathBuf, Arc<OwnedFd>, NodeId)> =
        vec![(root.to_path_buf(), Arc::new(root_fd), tree.root())];
    while let Some((dir_path, dir, id)) = stack.pop() {
        let mut names = Vec::new();
        let mut pos = 0;
        loop {
            let batch =
                sys::read_dir_at(dir.as_fd(), pos, 64 * 1024).map_err(|e| err(&dir_path, e))?;
            if batch.is_empty() {
                break;
            }
            for e in batch {
                pos = e.off;
                if e.name != b"." && e.name != b".." {
                    names.push(e.name);
                }
            }
        }
        names.sort();
        for name in names {
            let path = dir_path.join(std::ffi::OsStr::from_bytes(&name));
            let cname = CString::new(name.clone()).map_err(|_| err(&path, Errno::EINVAL))?;
            let st = sys::fstatat(dir.as_fd(), &cname).map_err(|e| err(&path, e))?;
            let fmt = st.st_mode & libc::S_IFMT;
            if fmt != libc::S_IFDIR
                && st.st_nlink > 1
                && let Some(&target) = links.get(&st.st_ino)
            {
                tree.link(id, name, target);
                continue;
            }
            let pfd = sys::open_path(dir.as_fd(), &cname).map_err(|e| err(&path, e))?;
            let meta = metadata_of(pfd.as_fd(), &st, generation).map_err(|e| err(&path, e))?;
            let kind = match fmt {
                libc::S_IFDIR => NodeKind::Dir(Vec::new()),
                libc::S_IFREG => {
                    stats.bytes += st.st_size as u64;
                    // Read through the directory descriptor (any depth), bypassing the
                    // page cache (see `TreeFile`).
                    let source = Source::Reader(Arc::new(TreeFile {
                        dir: dir.clone(),
                        name: cname.clone(),
                    }));
                    NodeKind::File(FileData {
                        size: st.st_size as u64,
                        chunk_bits: None,
                        chunks: None,
                        source: Some(source),
                    })
                }
                libc::S_IFLNK => {
                    NodeKind::Symlink(sys::readlink_fd(pfd.as_fd()).map_err(|e| err(&path, e))?)
                }
                libc::S_IFCHR => NodeKind::CharDev(st.st_rdev),
                libc::S_IFBLK => NodeKind::BlockDev(st.st_rdev),
                libc::S_IFIFO => NodeKind::Fifo,
                _ => NodeKind::Socket,
            };
            let whiteout = matches!(kind, NodeKind::CharDev(0))
                && !meta
                    .xattrs
                    .iter()
                    .any(|(n, _)| n.as_slice() == REALDEV_XATTR);
            if fmt != libc::S_IFDIR && !whiteout {
                stats.files += 1;
            }
            let child = tree.add(id, name, Node { meta, kind });
            if fmt == libc::S_IFDIR {
                let dfd = sys::openat(dir.as_fd(), &cname, libc::O_RDONLY | libc::O_DIRECTORY, 0)
                    .map_err(|e| err(&path, e))?;
                stack.push((path, Arc::new(dfd), child));
            } else if st.st_nlink > 1 {
                links.insert(st.st_ino, child);
            }
        }
    }
    Ok((tree, stats))
}

/// Every xattr of an inode (by descriptor), sorted by name.
fn xattrs_of(fd: std::os::fd::BorrowedFd<'_>) -> Result<Vec<crate::archive::Xattr>, Errno> {
    let mut buf = vec![0u8; 64 * 1024];
    let len = match sys::listxattr_fd(fd, &mut buf) {
        Ok(n) => n,
        Err(Errno(libc::ENOTSUP)) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for name in buf[..len].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let c = CString::new(name).map_err(|_| Errno::EIO)?;
        let n = match sys::getxattr_fd(fd, &c, &mut []) {
            Ok(n) => n,
            Err(Errno(libc::ENODATA)) => continue,
            Err(e) => return Err(e),
        };
        let mut v = vec![0u8; n];
        let n = sys::getxattr_fd(fd, &c, &mut v)?;
        v.truncate(n);
        out.push((name.to_vec(), v));
    }
    out.sort();
    Ok(out)
}

fn metadata_of(
    fd: std::os::fd::BorrowedFd<'_>,
    st: &libc::stat,
    generation: u64,
) -> Result<Metadata, Errno> {
    let mut xattrs = xattrs_of(fd)?;
    let recorded = recorded_ino(&xattrs);
    xattrs.retain(|(n, _)| n.as_slice() != INO_XATTR && n.as_slice() != CTIME_XATTR);
    // EROFS inodes keep only mtime: ctime travels in a marker so it does not move at a seal.
    let mut ctime = st.st_ctime.to_le_bytes().to_vec();
    ctime.extend_from_slice(&(st.st_ctime_nsec as u32).to_le_bytes());
    xattrs.push((CTIME_XATTR.to_vec(), ctime));
    xattrs.sort();
    Ok(Metadata {
        ino: generation_ino(generation, st.st_ino, recorded),
        perm: (st.st_mode & 0o7777) as u16,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime: st.st_mtime,
        mtime_nsec: st.st_mtime_nsec as u32,
        xattrs,
    })
}

/// Streams blob chunks into the media writer.
struct MediaSink<'a> {
    writer: &'a mut MediumWriter,
}

impl BlobSink for MediaSink<'_> {
    fn write_chunk(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.writer
            .append(data)
            .map(drop)
            .map_err(std::io::Error::other)
    }
}

/// A sealed layer, durable on the media and published on the SSD, not yet in the manifest.
#[derive(Debug, Clone)]
pub struct Sealed {
    pub layer: LayerRecord,
    /// The blob written for it, if the generation held any data.
    pub blob: Option<ImageRecord>,
}

/// Seals generation `generation` (tree at `tree_root`) as layer `layer_id`.
#[allow(clippy::too_many_arguments)]
pub fn seal_generation(
    layout: &StoreLayout,
    medium: &Arc<Medium>,
    sched: Option<Arc<MediaScheduler>>,
    chunk_size: u64,
    head_size: u64,
    tree_root: &Path,
    generation: u64,
    layer_id: u64,
) -> Result<Sealed, SealError> {
    let (tree, stats) = build_tree(tree_root, generation)?;
    // The heads first: they come from the SSD tree, which is still there.
    if head_size > 0 {
        write_heads(layout, &tree, head_size, generation, layer_id)?;
    }
    let media = |error| SealError::Media { generation, error };
    let image = |error| SealError::Image { generation, error };
    let mut writer = MediumWriter::open(medium.clone(), sched).map_err(media)?;
    let opts = WriteOptions {
        chunk_bits: chunk_size.trailing_zeros() as u8,
        new_blob_tag: format!("blob.{layer_id}").into_bytes(),
        volume_name: format!("spinfs.{layer_id}").into_bytes(),
        ..WriteOptions::default()
    };
    let mut meta = Vec::new();
    let has_data = stats.bytes > 0;
    let blob = if has_data {
        writer
            .begin_image(ImageRef {
                id: layer_id,
                kind: ImageKind::Blob,
            })
            .map_err(media)?;
        write_image(
            &tree,
            &opts,
            &mut meta,
            Some(&mut MediaSink {
                writer: &mut writer,
            }),
        )
        .map_err(image)?;
        Some(writer.finish_image().map_err(media)?)
    } else {
        write_image(&tree, &opts, &mut meta, None).map_err(image)?;
        None
    };
    writer
        .begin_image(ImageRef {
            id: layer_id,
            kind: ImageKind::Meta,
        })
        .map_err(media)?;
    writer.append(&meta).map_err(media)?;
    let meta_extents = writer.finish_image().map_err(media)?;
    writer.commit().map_err(media)?;
    publish_meta(layout, layer_id, &meta).map_err(|error| SealError::Io {
        generation,
        path: layout.layer_meta(layer_id),
        error,
    })?;
    let blob = blob.map(|b| ImageRecord::from_extents(&b));
    Ok(Sealed {
        layer: LayerRecord {
            id: layer_id,
            meta: ImageRecord::from_extents(&meta_extents),
            devices: blob.iter().map(|b| b.id).collect(),
            generations: vec![generation],
            files: stats.files,
            bytes: stats.bytes,
            level: 0,
        },
        blob,
    })
}

/// Writes the head cache of a layer: the first `head_size` bytes of every regular file,
/// keyed by inode number.
fn write_heads(
    layout: &StoreLayout,
    tree: &Tree,
    head_size: u64,
    generation: u64,
    layer_id: u64,
) -> Result<(), SealError> {
    let cache_err = |e: crate::cache::CacheError| SealError::Io {
        generation,
        path: layout.layer_heads(layer_id),
        error: std::io::Error::other(e.to_string()),
    };
    fs::create_dir_all(layout.layers()).map_err(|error| SealError::Io {
        generation,
        path: layout.layers(),
        error,
    })?;
    let mut w = crate::cache::HeadCacheWriter::create(
        &layout.layer_heads(layer_id),
        layer_id,
        head_size.min(crate::cache::MAX_HEAD_SIZE),
    )
    .map_err(cache_err)?;
    let mut buf = vec![0u8; head_size.min(crate::cache::MAX_HEAD_SIZE) as usize];
    let mut seen = std::collections::HashSet::new();
    for id in 0..tree.len() as NodeId {
        let node = tree.node(id);
        let NodeKind::File(data) = &node.kind else {
            continue;
        };
        if !seen.insert(node.meta.ino) {
            continue;
        }
        let want = (data.size as usize).min(buf.len());
        let read = match &data.source {
            Some(Source::Path(path)) => fs::File::open(path)
                .and_then(|f| f.read_exact_at(&mut buf[..want], 0))
                .map_err(|error| SealError::Io {
                    generation,
                    path: path.clone(),
                    error,
                }),
            Some(Source::Reader(r)) => {
                r.read_at(&mut buf[..want], 0)
                    .map_err(|error| SealError::Io {
                        generation,
                        path: layout.layer_heads(layer_id),
                        error,
                    })
            }
            None => continue,
        };
        read?;
        w.add(node.meta.ino, &buf[..want]).map_err(cache_err)?;
    }
    w.finish().map_err(cache_err)?;
    Ok(())
}

/// Writes `layers/<id>.meta` atomically and durably.
pub fn publish_meta(layout: &StoreLayout, id: u64, meta: &[u8]) -> std::io::Result<()> {
    let dir = layout.layers();
    fs::create_dir_all(&dir)?;
    let path = layout.layer_meta(id);
    let tmp = path.with_extension("meta.tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(meta)?;
    f.sync_all()?;
    fs::rename(&tmp, &path)?;
    fs::File::open(&dir)?.sync_all()
}
