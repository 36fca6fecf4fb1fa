//! Sealing: a frozen generation's tree becomes an EROFS image pair on the media.
//!
//! The blob streams to the media chunk by chunk while the meta image is built in memory
//! (proportional to the tree, not the data); the meta follows the blob onto the media, one
//! commit makes both durable, and only then is the meta published on the SSD
//! (`layers/<id>.meta`) and the manifest switched by the caller.

use crate::layout::StoreLayout;
use crate::manifest::{ImageRecord, LayerRecord};
use crate::markers::{INO_XATTR, REALDEV_XATTR};
use spinfs_erofs::{
    BlobSink, FileData, Metadata, Node, NodeId, NodeKind, Source, Tree, WriteOptions, write_image,
};
use spinfs_media::{ImageKind, ImageRef, Medium, MediumWriter};
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
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

/// Paths this long are not handed to the kernel whole: a tree may be deeper than PATH_MAX
/// (4096 bytes, ENAMETOOLONG), so such directories are reached through `/proc/self/fd/N`
/// of a descriptor opened relative to their parent.
const SHORTEN_AT: usize = 2048;

/// Descriptors that keep `/proc/self/fd/N` paths of a built tree valid; drop after writing.
#[derive(Default)]
pub struct PathAnchors(Vec<std::os::fd::OwnedFd>);

/// `dir` as a path the kernel accepts: itself when short, else `/proc/self/fd/N` of a
/// descriptor of it, opened through its (already short) parent path.
fn anchor(dir: PathBuf, anchors: &mut PathAnchors) -> std::io::Result<PathBuf> {
    if dir.as_os_str().len() < SHORTEN_AT {
        return Ok(dir);
    }
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a valid C string; the descriptor returned is owned below.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let path = PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&fd)
    ));
    anchors.0.push(fd);
    Ok(path)
}

/// Describes generation `generation`'s tree at `root` for the image writer. The root gets
/// inode number 1; markers (whiteouts, opaque directories, escaped user xattrs) are kept as
/// they are, since images use the same conventions as the SSD tree. File sources below very
/// deep directories are reached through the returned descriptors: keep them until the image
/// is written.
pub fn build_tree(
    root: &Path,
    generation: u64,
) -> Result<(Tree, TreeStats, PathAnchors), SealError> {
    let mut anchors = PathAnchors::default();
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |error| SealError::Io {
            generation,
            path,
            error,
        }
    };
    let md = fs::symlink_metadata(root).map_err(io(root))?;
    let mut root_meta = metadata_of(root, &md, generation)?;
    root_meta.ino = crate::volume::ROOT_INO;
    let mut tree = Tree::new(root_meta);
    let mut stats = TreeStats::default();
    let mut links: HashMap<u64, NodeId> = HashMap::new();
    let mut stack: Vec<(PathBuf, NodeId)> = vec![(root.to_path_buf(), tree.root())];
    while let Some((dir, id)) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(&dir)
            .map_err(io(&dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io(&dir))?;
        names.sort();
        for name in names {
            let path = dir.join(&name);
            let md = fs::symlink_metadata(&path).map_err(io(&path))?;
            if !md.is_dir()
                && md.nlink() > 1
                && let Some(&target) = links.get(&md.ino())
            {
                tree.link(id, name.as_bytes(), target);
                continue;
            }
            let ft = md.file_type();
            let meta = metadata_of(&path, &md, generation)?;
            let kind = if ft.is_dir() {
                NodeKind::Dir(Vec::new())
            } else if ft.is_file() {
                stats.bytes += md.len();
                NodeKind::File(FileData {
                    size: md.len(),
                    chunk_bits: None,
                    chunks: None,
                    source: Some(Source::Path(path.clone())),
                })
            } else if ft.is_symlink() {
                let target = fs::read_link(&path).map_err(io(&path))?;
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
            let whiteout = matches!(kind, NodeKind::CharDev(0))
                && !meta
                    .xattrs
                    .iter()
                    .any(|(n, _)| n.as_slice() == REALDEV_XATTR);
            if !ft.is_dir() && !whiteout {
                stats.files += 1;
            }
            let is_dir = ft.is_dir();
            let child = tree.add(id, name.as_bytes(), Node { meta, kind });
            if is_dir {
                let path = anchor(path.clone(), &mut anchors).map_err(io(&path))?;
                stack.push((path, child));
            } else if md.nlink() > 1 {
                links.insert(md.ino(), child);
            }
        }
    }
    Ok((tree, stats, anchors))
}

fn metadata_of(path: &Path, md: &fs::Metadata, generation: u64) -> Result<Metadata, SealError> {
    let mut xattrs = spinfs_erofs::fromdir::read_xattrs(path)
        .map_err(|error| SealError::Image { generation, error })?;
    let recorded = recorded_ino(&xattrs);
    xattrs.retain(|(n, _)| n.as_slice() != INO_XATTR);
    Ok(Metadata {
        ino: generation_ino(generation, md.ino(), recorded),
        perm: (md.mode() & 0o7777) as u16,
        uid: md.uid(),
        gid: md.gid(),
        mtime: md.mtime(),
        mtime_nsec: md.mtime_nsec() as u32,
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
    chunk_size: u64,
    head_size: u64,
    tree_root: &Path,
    generation: u64,
    layer_id: u64,
) -> Result<Sealed, SealError> {
    let (tree, stats, _anchors) = build_tree(tree_root, generation)?;
    // The heads first: they come from the SSD tree, which is still there.
    if head_size > 0 {
        write_heads(layout, &tree, head_size, generation, layer_id)?;
    }
    let media = |error| SealError::Media { generation, error };
    let image = |error| SealError::Image { generation, error };
    let mut writer = MediumWriter::open(medium.clone(), None).map_err(media)?;
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
    use std::os::unix::fs::FileExt;
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
        let Some(Source::Path(path)) = &data.source else {
            continue;
        };
        let want = (data.size as usize).min(buf.len());
        let f = fs::File::open(path).map_err(|error| SealError::Io {
            generation,
            path: path.clone(),
            error,
        })?;
        f.read_exact_at(&mut buf[..want], 0)
            .map_err(|error| SealError::Io {
                generation,
                path: path.clone(),
                error,
            })?;
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
