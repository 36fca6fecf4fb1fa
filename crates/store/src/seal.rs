//! Sealing: a frozen generation's tree becomes an EROFS image pair on the media.
//!
//! The blob streams to the media chunk by chunk while the meta image is built in memory
//! (proportional to the tree, not the data); the meta follows the blob onto the media, one
//! commit makes both durable, and only then is the meta published on the SSD
//! (`layers/<id>.meta`) and the manifest switched by the caller.

use crate::cache::HeadCache;
use crate::layout::StoreLayout;
use crate::manifest::Manifest;
use crate::manifest::{ImageRecord, LayerRecord};
use crate::markers::{CTIME_XATTR, INO_XATTR, REALDEV_XATTR};
use crate::stackmap::StackMap;
use crate::sys::{self, Errno};
use spinfs_erofs::ReadAt;
use spinfs_erofs::{
    BlobSink, Chunk, DeviceReader, DeviceSpec, FileData, Image, Inode, Metadata, Node, NodeId,
    NodeKind, Source, Tree, WriteOptions, write_image,
};
use spinfs_media::{ForegroundSyncs, ImageExtents, MediumReader, ReadOptions};
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
///
/// Each direct read first waits for a sync of the writable layer under way (see
/// `spinfs_media::fgsync`).
struct TreeFile {
    dir: Arc<OwnedFd>,
    name: CString,
    syncs: Option<Arc<ForegroundSyncs>>,
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
                if let Some(syncs) = &self.syncs {
                    syncs.yield_now();
                }
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
/// Direct reads of its files yield to `syncs` (see `TreeFile`).
pub fn build_tree(
    root: &Path,
    generation: u64,
    lowers: Option<&Arc<LowerImages>>,
    syncs: Option<&Arc<ForegroundSyncs>>,
) -> Result<(Tree, TreeStats, Vec<u64>), SealError> {
    let mut referenced: Vec<u64> = Vec::new();
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
    // Sidecar chunk maps are found from the tree root (`../stackmaps`).
    let root_fd = Arc::new(root_fd);
    let mut stack: Vec<(PathBuf, Arc<OwnedFd>, NodeId)> =
        vec![(root.to_path_buf(), root_fd.clone(), tree.root())];
    while let Some((dir_path, dir, id)) = stack.pop() {
        let mut names = sys::dir_names(dir.as_fd()).map_err(|e| err(&dir_path, e))?;
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
                libc::S_IFREG
                    if crate::lower::tree_is_stacked(pfd.as_fd()).map_err(|e| err(&path, e))? =>
                {
                    stats.bytes += st.st_size as u64;
                    let map = crate::lower::tree_stack_map(pfd.as_fd(), root_fd.as_fd())
                        .map_err(|e| err(&path, e))?
                        .ok_or_else(|| err(&path, Errno::EIO))?;
                    let lowers = lowers.ok_or_else(|| err(&path, Errno::EIO))?;
                    let (chunks, chunk_bits, lower) = lowers
                        .plan(&map, st.st_size as u64, &mut referenced)
                        .map_err(|e| SealError::Io {
                            generation,
                            path: path.clone(),
                            error: std::io::Error::other(e),
                        })?;
                    NodeKind::File(FileData {
                        size: st.st_size as u64,
                        chunk_bits,
                        chunks: Some(chunks),
                        source: Some(Source::Reader(Arc::new(StackedSource {
                            upper: TreeFile {
                                dir: dir.clone(),
                                name: cname.clone(),
                                syncs: syncs.cloned(),
                            },
                            map,
                            lower,
                        }))),
                    })
                }
                libc::S_IFREG => {
                    stats.bytes += st.st_size as u64;
                    // Read through the directory descriptor (any depth), bypassing the
                    // page cache (see `TreeFile`).
                    let source = Source::Reader(Arc::new(TreeFile {
                        dir: dir.clone(),
                        name: cname.clone(),
                        syncs: syncs.cloned(),
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
    Ok((tree, stats, referenced))
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
    xattrs.retain(|(n, _)| {
        n.as_slice() != INO_XATTR
            && n.as_slice() != CTIME_XATTR
            && n.as_slice() != crate::stackmap::STACK_XATTR
    });
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
        spinfs_failpoints::fail_point!("seal.blob_chunk");
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

/// Called with the open media writer and the sealed layer after its images are appended and
/// before the media commit, so that what it appends (the state snapshot) is committed with
/// them.
pub type BeforeCommit<'a> =
    &'a mut dyn FnMut(&mut MediumWriter, &Sealed) -> Result<(), spinfs_media::MediaError>;

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
    lowers: Option<&Arc<LowerImages>>,
    before_commit: BeforeCommit<'_>,
) -> Result<Sealed, SealError> {
    let syncs = sched.as_ref().and_then(|s| s.foreground_syncs());
    let (tree, stats, referenced) = build_tree(tree_root, generation, lowers, syncs.as_ref())?;
    // Blobs that stacked files' below chunks stay in: devices 1..=n, the new blob n+1.
    let devices: Vec<DeviceSpec> = referenced
        .iter()
        .map(|id| DeviceSpec {
            tag: format!("blob.{id}").into_bytes(),
            blocks: lowers.map_or(0, |l| l.blob_blocks(*id)),
        })
        .collect();
    // The heads first: they come from the SSD tree, which is still there.
    if head_size > 0 {
        write_heads(layout, &tree, head_size, generation, layer_id)?;
        spinfs_failpoints::fail_point!("seal.heads_written");
    }
    let media = |error| SealError::Media { generation, error };
    let image = |error| SealError::Image { generation, error };
    let mut writer = MediumWriter::open(medium.clone(), sched).map_err(media)?;
    let opts = WriteOptions {
        chunk_bits: chunk_size.trailing_zeros() as u8,
        new_blob_tag: format!("blob.{layer_id}").into_bytes(),
        volume_name: format!("spinfs.{layer_id}").into_bytes(),
        devices,
        ..WriteOptions::default()
    };
    let mut meta = Vec::new();
    let has_data = stats.bytes > 0 && has_new_data(&tree);
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
        let blob = writer.finish_image().map_err(media)?;
        spinfs_failpoints::fail_point!("seal.blob_streamed");
        Some(blob)
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
    spinfs_failpoints::fail_point!("seal.meta_appended");
    let blob = blob.map(|b| ImageRecord::from_extents(&b));
    let sealed = Sealed {
        layer: LayerRecord {
            id: layer_id,
            meta: ImageRecord::from_extents(&meta_extents),
            devices: referenced
                .iter()
                .copied()
                .chain(blob.iter().map(|b| b.id))
                .collect(),
            generations: vec![generation],
            files: stats.files,
            bytes: stats.bytes,
            level: 0,
        },
        blob,
    };
    before_commit(&mut writer, &sealed).map_err(media)?;
    writer.commit().map_err(media)?;
    spinfs_failpoints::fail_point!("seal.media_committed");
    publish_meta(layout, layer_id, &meta).map_err(|error| SealError::Io {
        generation,
        path: layout.layer_meta(layer_id),
        error,
    })?;
    spinfs_failpoints::fail_point!("seal.meta_published");
    Ok(sealed)
}

/// Whether any chunk of `tree` is new data (else no blob is written).
fn has_new_data(tree: &Tree) -> bool {
    (0..tree.len() as NodeId).any(|id| match &tree.node(id).kind {
        NodeKind::File(f) => match &f.chunks {
            None => f.size > 0,
            Some(c) => c.contains(&Chunk::New),
        },
        _ => false,
    })
}

/// Writes the head cache of a layer: the first and the last `head_size` bytes of every
/// regular file (the tail only where the file is longer than its head), keyed by inode
/// number.
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
    let edge = head_size.min(crate::cache::MAX_HEAD_SIZE) as usize;
    let mut buf = vec![0u8; 2 * edge];
    let mut seen = std::collections::HashSet::new();
    for id in 0..tree.len() as NodeId {
        let node = tree.node(id);
        let NodeKind::File(data) = &node.kind else {
            continue;
        };
        if !seen.insert(node.meta.ino) {
            continue;
        }
        let head = (data.size as usize).min(edge);
        let tail = (data.size - head as u64).min(edge as u64) as usize;
        let tail_at = data.size - tail as u64;
        let (head_buf, tail_buf) = buf.split_at_mut(edge);
        let read = match &data.source {
            Some(Source::Path(path)) => fs::File::open(path)
                .and_then(|f| {
                    f.read_exact_at(&mut head_buf[..head], 0)?;
                    f.read_exact_at(&mut tail_buf[..tail], tail_at)
                })
                .map_err(|error| SealError::Io {
                    generation,
                    path: path.clone(),
                    error,
                }),
            Some(Source::Reader(r)) => r
                .read_at(&mut head_buf[..head], 0)
                .and_then(|()| r.read_at(&mut tail_buf[..tail], tail_at))
                .map_err(|error| SealError::Io {
                    generation,
                    path: layout.layer_heads(layer_id),
                    error,
                }),
            None => continue,
        };
        read?;
        w.add_file(
            node.meta.ino,
            data.size,
            &head_buf[..head],
            &tail_buf[..tail],
        )
        .map_err(cache_err)?;
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
    spinfs_failpoints::fail_point!("layer_meta.before_rename");
    fs::rename(&tmp, &path)?;
    spinfs_failpoints::fail_point!("layer_meta.after_rename");
    fs::File::open(&dir)?.sync_all()
}

/// The archived layers below a generation being sealed, as the seal needs them for stacked
/// files: where each lower file is (by path, with overlay lookup rules), its chunk table, and
/// its bytes (head cache, else the media) for the few chunks that must be rewritten.
pub struct LowerImages {
    /// Newest first.
    layers: Vec<LowerImage>,
    blobs: HashMap<u64, ImageExtents>,
    reader: Arc<MediumReader>,
}

struct LowerImage {
    image: Image<fs::File>,
    /// Blob ids of devices 1..=n.
    devices: Vec<u64>,
    heads: Option<HeadCache>,
}

impl LowerImages {
    /// Opens the layers of `manifest` (meta images on the SSD).
    pub fn open(
        layout: &StoreLayout,
        manifest: &Manifest,
        reader: Arc<MediumReader>,
    ) -> Result<LowerImages, String> {
        let mut layers = Vec::new();
        for rec in manifest.layers.iter().rev() {
            let path = layout.layer_meta(rec.id);
            let f = fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let image = Image::open(f).map_err(|e| format!("{}: {e}", path.display()))?;
            let heads_path = layout.layer_heads(rec.id);
            let heads = if heads_path.exists() {
                HeadCache::open(&heads_path).ok()
            } else {
                None
            };
            layers.push(LowerImage {
                image,
                devices: rec.devices.clone(),
                heads,
            });
        }
        let blobs = manifest
            .blobs
            .iter()
            .map(|b| (b.id, b.to_extents(ImageKind::Blob)))
            .collect();
        Ok(LowerImages {
            layers,
            blobs,
            reader,
        })
    }

    fn blob_blocks(&self, id: u64) -> u64 {
        self.blobs.get(&id).map_or(0, |b| b.length.div_ceil(4096))
    }

    /// The file at `path` in the namespace of all the layers: (layer index, inode).
    fn resolve(&self, path: &[u8]) -> Result<Option<(usize, Inode)>, String> {
        let e = |e: spinfs_erofs::Error| e.to_string();
        let mut parts: Vec<(usize, Inode)> = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            parts.push((i, l.image.root().map_err(e)?));
        }
        for comp in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            if parts.is_empty() || !parts[0].1.is_dir() {
                return Ok(None);
            }
            let mut found: Vec<(usize, Inode)> = Vec::new();
            for (i, dir) in &parts {
                let img = &self.layers[*i].image;
                let Some(ent) = img.lookup(dir, comp).map_err(e)? else {
                    continue;
                };
                let child = img.inode(ent.nid).map_err(e)?;
                let is_dir = child.is_dir();
                let opaque = is_dir
                    && img
                        .xattr(&child, crate::markers::OPAQUE_XATTR)
                        .map_err(e)?
                        .is_some_and(|v| v == b"y");
                if found.is_empty() {
                    let whiteout = child.is_whiteout()
                        && img.xattr(&child, REALDEV_XATTR).map_err(e)?.is_none();
                    if whiteout {
                        return Ok(None);
                    }
                    found.push((*i, child));
                    if !is_dir || opaque {
                        break;
                    }
                } else {
                    if !is_dir {
                        break;
                    }
                    found.push((*i, child));
                    if opaque {
                        break;
                    }
                }
            }
            if found.is_empty() {
                return Ok(None);
            }
            parts = found;
        }
        Ok(parts.into_iter().next())
    }

    /// The chunk plan of a stacked file of `size` bytes: below chunks whose bytes all count
    /// point at the lower file's blob chunks (their blob ids are added to `referenced`, whose
    /// order gives device numbers), the rest is new data or holes.
    fn plan(
        self: &Arc<Self>,
        map: &StackMap,
        size: u64,
        referenced: &mut Vec<u64>,
    ) -> Result<ChunkPlan, String> {
        let path = String::from_utf8_lossy(&map.lower_path).into_owned();
        let (li, inode) = self
            .resolve(&map.lower_path)?
            .ok_or_else(|| format!("stacked file: lower file {path} not found"))?;
        if inode.file_type != spinfs_erofs::FileType::File || inode.size != map.lower_size {
            return Err(format!("stacked file: lower file {path} changed"));
        }
        let layer = &self.layers[li];
        let table = if inode.size > 0 {
            Some(layer.image.chunk_table(&inode).map_err(|e| e.to_string())?)
        } else {
            None
        };
        let bits = map.chunk_bits;
        let cs = 1u64 << bits;
        let n = size.div_ceil(cs);
        let mut chunks = Vec::with_capacity(n as usize);
        for c in 0..n {
            if !map.is_below(c) {
                chunks.push(Chunk::New);
                continue;
            }
            let (ls, le) = map.lower_range(c);
            let logical_end = ((c + 1) * cs).min(size);
            if le <= ls {
                chunks.push(Chunk::Hole);
                continue;
            }
            let reference = match &table {
                Some((tbits, refs)) if *tbits == bits && logical_end <= le => {
                    refs.get(c as usize).copied()
                }
                _ => None,
            };
            match reference {
                Some(None) => chunks.push(Chunk::Hole),
                Some(Some((dev, block))) if dev >= 1 => {
                    let blob = *layer
                        .devices
                        .get(dev as usize - 1)
                        .ok_or_else(|| format!("stacked file {path}: no blob for device {dev}"))?;
                    let pos = match referenced.iter().position(|b| *b == blob) {
                        Some(p) => p,
                        None => {
                            referenced.push(blob);
                            referenced.len() - 1
                        }
                    };
                    chunks.push(Chunk::Existing {
                        device: pos as u16 + 1,
                        block,
                    });
                }
                _ => chunks.push(Chunk::New),
            }
        }
        let lower = LowerData {
            images: self.clone(),
            layer: li,
            inode,
        };
        Ok((chunks, Some(bits), Some(lower)))
    }
}

/// A stacked file's chunks, their size (log2) and its lower file.
type ChunkPlan = (Vec<Chunk>, Option<u8>, Option<LowerData>);

/// The bytes of a lower file, read from its layer's head cache or the media.
struct LowerData {
    images: Arc<LowerImages>,
    layer: usize,
    inode: Inode,
}

impl DeviceReader for LowerData {
    fn read_device(&self, device: u16, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let l = &self.images.layers[self.layer];
        let blob = (device as usize)
            .checked_sub(1)
            .and_then(|i| l.devices.get(i))
            .and_then(|id| self.images.blobs.get(id))
            .ok_or_else(|| std::io::Error::other(format!("no blob for device {device}")))?;
        let data = self
            .images
            .reader
            .read(blob, offset, buf.len() as u64, ReadOptions::default())
            .map_err(std::io::Error::other)?;
        buf.copy_from_slice(&data);
        Ok(())
    }
}

impl LowerData {
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let l = &self.images.layers[self.layer];
        if let Some(heads) = &l.heads
            && let Ok(Some(ino)) = l.image.spinfs_ino(&self.inode)
            && let Ok(Some(head)) = heads.get(ino)
            && offset + buf.len() as u64 <= head.len() as u64
        {
            buf.copy_from_slice(&head[offset as usize..offset as usize + buf.len()]);
            return Ok(buf.len());
        }
        l.image
            .read_data(&self.inode, offset, buf, self)
            .map_err(std::io::Error::other)
    }
}

/// A stacked file of the frozen tree as the image shows it: upper chunks from the SSD, below
/// chunks from the lower file up to the map's limit, zeros elsewhere.
struct StackedSource {
    upper: TreeFile,
    map: StackMap,
    lower: Option<LowerData>,
}

impl ReadAt for StackedSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let fd = sys::openat(self.upper.dir.as_fd(), &self.upper.name, libc::O_RDONLY, 0)
            .map_err(|e| std::io::Error::from_raw_os_error(e.0))?;
        let f = fs::File::from(fd);
        let size = f.metadata()?.len();
        buf.fill(0);
        let end = (offset + buf.len() as u64).min(size);
        let bits = self.map.chunk_bits;
        let mut pos = offset;
        while pos < end {
            let c = pos >> bits;
            let cend = ((c + 1) << bits).min(end);
            let out = &mut buf[(pos - offset) as usize..(cend - offset) as usize];
            if self.map.is_below(c) {
                let (_, le) = self.map.lower_range(c);
                let lend = cend.min(le).max(pos);
                if lend > pos {
                    let lower = self
                        .lower
                        .as_ref()
                        .ok_or_else(|| std::io::Error::other("stacked file without lower"))?;
                    lower.read(pos, &mut out[..(lend - pos) as usize])?;
                }
            } else {
                let mut done = 0;
                while done < out.len() {
                    let n = FileExt::read_at(&f, &mut out[done..], pos + done as u64)?;
                    if n == 0 {
                        break;
                    }
                    done += n;
                }
            }
            pos = cend;
        }
        Ok(())
    }
}
