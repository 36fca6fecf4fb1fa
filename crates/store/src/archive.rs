//! Archived layers as the volume reads them: a meta image on the SSD and blob devices on the
//! media, read through the media reader (only the objects a range needs).

use crate::cache::HeadCache;
use crate::layout::StoreLayout;
use crate::manifest::{LayerRecord, Manifest};
use crate::markers::{OPAQUE_XATTR, REALDEV_XATTR, unescape_xattr};
use crate::sys::Errno;
use spinfs_erofs::{DeviceReader, FileType, Image, Inode};

/// An extended attribute: full name and value.
pub type Xattr = (Vec<u8>, Vec<u8>);
use crate::units::{BlobSource, UnitCache};
use spinfs_media::{ImageKind, MediumReader, ReadOptions};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;

/// One archived layer, open.
/// Bounds the meta images held open at once (`max_open_images`): layers open their image
/// through the pool, which closes the least recently used one beyond the bound.
pub struct ImagePool {
    max: usize,
    open: Mutex<Vec<(u64, Arc<Image<File>>)>>, // most recently used last
    opens: std::sync::atomic::AtomicU64,
}

impl ImagePool {
    pub fn new(max: usize) -> Arc<ImagePool> {
        Arc::new(ImagePool {
            max: max.max(1),
            open: Mutex::new(Vec::new()),
            opens: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn get(&self, layer: u64, path: &Path) -> Result<Arc<Image<File>>, Errno> {
        let mut open = self.open.lock().unwrap();
        if let Some(i) = open.iter().position(|(id, _)| *id == layer) {
            let entry = open.remove(i);
            let img = entry.1.clone();
            open.push(entry);
            return Ok(img);
        }
        let file = File::open(path).map_err(|e| {
            tracing::error!(layer, "{}: {e}", path.display());
            Errno::EIO
        })?;
        let img = Arc::new(Image::open(file).map_err(eio(layer))?);
        self.opens
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if open.len() >= self.max {
            open.remove(0);
        }
        open.push((layer, img.clone()));
        Ok(img)
    }

    /// Images open right now, and opens since start.
    pub fn stats(&self) -> (usize, u64) {
        (
            self.open.lock().unwrap().len(),
            self.opens.load(std::sync::atomic::Ordering::Relaxed),
        )
    }
}

pub struct ArchivedLayer {
    pub id: u64,
    /// Set when a merge replaced this layer (see `retire`).
    retired: std::sync::atomic::AtomicBool,
    /// The open image of a retired layer (its file is gone).
    pinned: Mutex<Option<Arc<Image<File>>>>,
    heads_path: PathBuf,
    meta_path: PathBuf,
    pool: Arc<ImagePool>,
    blobs: BlobDevices,
    heads: Option<HeadCache>,
}

struct BlobDevices {
    layer: u64,
    devices: Vec<BlobSource>,
    cache: Option<Arc<UnitCache>>,
}

/// The blob devices as one read sees them: read-ahead bounded by the end of the file's data
/// that follows the read on the same device (`u64::MAX`: unbounded).
struct BoundedDevices<'a> {
    blobs: &'a BlobDevices,
    ahead_limit: u64,
}

impl DeviceReader for BoundedDevices<'_> {
    fn read_device(&self, device: u16, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.blobs
            .read_bounded(device, buf, offset, self.ahead_limit)
    }
}

impl BlobDevices {
    fn source(&self, device: u16) -> std::io::Result<&BlobSource> {
        (device as usize)
            .checked_sub(1)
            .and_then(|i| self.devices.get(i))
            .ok_or_else(|| {
                std::io::Error::other(format!("layer {}: no blob for device {device}", self.layer))
            })
    }
}

impl DeviceReader for BlobDevices {
    fn read_device(&self, device: u16, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.read_bounded(device, buf, offset, u64::MAX)
    }
}

impl BlobDevices {
    fn read_bounded(
        &self,
        device: u16,
        buf: &mut [u8],
        offset: u64,
        ahead_limit: u64,
    ) -> std::io::Result<()> {
        let src = self.source(device)?;
        let Some(cache) = &self.cache else {
            let opts = ReadOptions {
                timeout: src.timeout,
                ..ReadOptions::default()
            };
            let data = src
                .reader
                .read(&src.extents, offset, buf.len() as u64, opts)
                .map_err(std::io::Error::other)?;
            buf.copy_from_slice(&data);
            return Ok(());
        };
        // From memory, the SSD cache, or the media (see `units`).
        cache.read(src, offset, buf, ahead_limit)
    }
}

thread_local! {
    /// Replies that are not one slice of a cached unit are assembled here: one buffer per
    /// FUSE worker thread, grown to the largest request and never zero-filled again.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn eio<E: std::fmt::Display>(layer: u64) -> impl Fn(E) -> Errno {
    move |e| {
        tracing::error!(layer, "archived layer: {e}");
        Errno::EIO
    }
}

impl ArchivedLayer {
    pub fn open(
        layout: &StoreLayout,
        manifest: &Manifest,
        record: &LayerRecord,
        reader: Arc<MediumReader>,
        timeout: Option<std::time::Duration>,
        cache: Option<Arc<UnitCache>>,
        pool: Arc<ImagePool>,
    ) -> Result<ArchivedLayer, String> {
        let path = layout.layer_meta(record.id);
        // Checked now, so that a missing or damaged meta image is named at mount.
        let file = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Image::open(file).map_err(|e| format!("{}: {e}", path.display()))?;
        let blobs: HashMap<u64, _> = manifest.blobs.iter().map(|b| (b.id, b)).collect();
        let devices = record
            .devices
            .iter()
            .map(|id| {
                blobs
                    .get(id)
                    .map(|b| BlobSource {
                        extents: b.to_extents(ImageKind::Blob),
                        reader: reader.clone(),
                        timeout,
                    })
                    .ok_or_else(|| format!("layer {}: blob {id} is not in the manifest", record.id))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let heads_path = layout.layer_heads(record.id);
        let heads = if heads_path.exists() {
            match HeadCache::open(&heads_path) {
                Ok(h) => Some(h),
                Err(e) => {
                    // Reads fall back to the media; fsck --repair rebuilds the file.
                    tracing::error!(layer = record.id, "head cache unusable: {e}");
                    None
                }
            }
        } else {
            None
        };
        Ok(ArchivedLayer {
            id: record.id,
            retired: std::sync::atomic::AtomicBool::new(false),
            pinned: Mutex::new(None),
            heads_path: heads_path.clone(),
            meta_path: path,
            pool,
            blobs: BlobDevices {
                layer: record.id,
                devices,
                cache,
            },
            heads,
        })
    }

    /// Marks this layer as replaced by a merge: its image stays open for whoever still reads
    /// through it (open files, nodes not yet re-resolved), and its SSD files go at once.
    pub fn retire(&self) {
        if let Ok(img) = self.pool.get(self.id, &self.meta_path) {
            *self.pinned.lock().unwrap() = Some(img);
        }
        self.retired
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = std::fs::remove_file(&self.meta_path);
        let _ = std::fs::remove_file(&self.heads_path);
    }

    fn image(&self) -> Result<Arc<Image<File>>, Errno> {
        if let Some(img) = self.pinned.lock().unwrap().as_ref() {
            return Ok(img.clone());
        }
        self.pool.get(self.id, &self.meta_path)
    }

    pub fn root(&self) -> Result<Inode, Errno> {
        self.image()?.root().map_err(eio(self.id))
    }

    pub fn inode(&self, nid: u64) -> Result<Inode, Errno> {
        self.image()?.inode(nid).map_err(eio(self.id))
    }

    pub fn lookup(&self, dir: &Inode, name: &[u8]) -> Result<Option<Inode>, Errno> {
        match self.image()?.lookup(dir, name).map_err(eio(self.id))? {
            Some(e) => Ok(Some(self.inode(e.nid)?)),
            None => Ok(None),
        }
    }

    /// Every entry of a directory except "." and "..": (name, nid, type).
    pub fn entries(&self, dir: &Inode) -> Result<Vec<(Vec<u8>, u64, FileType)>, Errno> {
        let (list, _) = self.image()?.dir_entries(dir).map_err(eio(self.id))?;
        Ok(list
            .into_iter()
            .filter(|e| e.name != b"." && e.name != b"..")
            .map(|e| (e.name, e.nid, e.file_type))
            .collect())
    }

    pub fn ino(&self, inode: &Inode) -> Result<u64, Errno> {
        self.image()?
            .spinfs_ino(inode)
            .map_err(eio(self.id))?
            .ok_or_else(|| {
                tracing::error!(
                    layer = self.id,
                    nid = inode.nid,
                    "inode has no spinfs number"
                );
                Errno::EIO
            })
    }

    /// A whiteout (char 0/0 not marked as a user's device).
    pub fn is_whiteout(&self, inode: &Inode) -> Result<bool, Errno> {
        if !inode.is_whiteout() {
            return Ok(false);
        }
        Ok(self
            .image()?
            .xattr(inode, REALDEV_XATTR)
            .map_err(eio(self.id))?
            .is_none())
    }

    pub fn is_opaque(&self, inode: &Inode) -> Result<bool, Errno> {
        Ok(self
            .image()?
            .xattr(inode, OPAQUE_XATTR)
            .map_err(eio(self.id))?
            .is_some_and(|v| v == b"y"))
    }

    /// The ctime recorded at seal time, if any.
    pub fn ctime(&self, inode: &Inode) -> Option<(i64, u32)> {
        let v = self
            .image()
            .ok()?
            .xattr(inode, crate::markers::CTIME_XATTR)
            .ok()??;
        let sec = i64::from_le_bytes(v.get(..8)?.try_into().ok()?);
        let nsec = u32::from_le_bytes(v.get(8..12)?.try_into().ok()?);
        (nsec < 1_000_000_000).then_some((sec, nsec))
    }

    pub fn readlink(&self, inode: &Inode) -> Result<Vec<u8>, Errno> {
        self.image()?.readlink(inode).map_err(eio(self.id))
    }

    /// User-visible xattrs (markers hidden, escaped names restored).
    pub fn xattrs(&self, inode: &Inode) -> Result<Vec<Xattr>, Errno> {
        Ok(self
            .image()?
            .xattrs(inode)
            .map_err(eio(self.id))?
            .into_iter()
            .filter_map(|(n, v)| unescape_xattr(&n).map(|n| (n, v)))
            .collect())
    }

    /// Raw stored xattrs (for copy-up).
    pub fn raw_xattrs(&self, inode: &Inode) -> Result<Vec<Xattr>, Errno> {
        self.image()?.xattrs(inode).map_err(eio(self.id))
    }

    /// Reads file data into `buf`; returns the bytes read (short at end of file).
    pub fn read(&self, inode: &Inode, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        self.read_with(inode, offset, buf.len(), |data| {
            buf[..data.len()].copy_from_slice(data);
            data.len()
        })
    }

    /// Calls `reply` with the file's bytes from `offset`, up to `len` (short at end of file),
    /// without copying them where it can: reads inside the head or the tail of the file come
    /// from the head cache (never from the media), a read whose units were loaded together
    /// (one unit, or a run read ahead) is replied from their buffer, anything else is
    /// assembled in a per-thread buffer.
    pub fn read_with<R>(
        &self,
        inode: &Inode,
        offset: u64,
        len: usize,
        reply: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, Errno> {
        let size = inode.size;
        if offset >= size || len == 0 {
            return Ok(reply(&[]));
        }
        let end = offset.saturating_add(len as u64).min(size);
        let n = (end - offset) as usize;
        if let Some(heads) = &self.heads
            && (offset < heads.head_size() || end > size.saturating_sub(heads.tail_size()))
            && let Some(edges) = self.edges(heads, inode)
            && let Some(bytes) = edges.range(size, offset, end)
        {
            return Ok(reply(bytes));
        }
        let img = self.image()?;
        let extents = img.map(inode, offset, n as u64).map_err(eio(self.id))?;
        let ahead_limit = self.ahead_limit(&img, inode, &extents)?;
        if let Some(cache) = &self.blobs.cache
            && let [e] = extents.as_slice()
            && e.offset == offset
            && e.len == n as u64
            && let Some((dev, at)) = e.location.filter(|&(dev, _)| dev > 0)
        {
            let src = self.blobs.source(dev).map_err(eio(self.id))?;
            if let Some(bytes) = cache
                .read_joined(src, at, n as u64, ahead_limit)
                .map_err(|e| self.data_error(&img, inode, offset, n, e))?
            {
                return Ok(reply(&bytes));
            }
        }
        let devices = BoundedDevices {
            blobs: &self.blobs,
            ahead_limit,
        };
        SCRATCH.with(|cell| {
            let mut fresh = Vec::new();
            let mut held = cell.try_borrow_mut();
            let buf = match held.as_deref_mut() {
                Ok(b) => b,
                Err(_) => &mut fresh,
            };
            if buf.len() < n {
                buf.resize(n, 0);
            }
            let got = img
                .read_data(inode, offset, &mut buf[..n], &devices)
                .map_err(|e| self.data_error(&img, inode, offset, n, e))?;
            Ok(reply(&buf[..got]))
        })
    }

    /// Logs unreadable archived data, named by the inode number users see (st_ino) so the
    /// damaged file can be found (`find -inum`; `spinfs fsck` names its paths), as EIO.
    fn data_error(
        &self,
        img: &Image<File>,
        inode: &Inode,
        offset: u64,
        len: usize,
        e: impl std::fmt::Display,
    ) -> Errno {
        let ino = img.spinfs_ino(inode).ok().flatten().unwrap_or(0);
        tracing::error!(
            layer = self.id,
            ino,
            offset,
            len,
            "archived file data unreadable: {e}"
        );
        Errno::EIO
    }

    /// Where read-ahead after a read (whose `extents` these are) must stop in the blob: the
    /// end of the file's data that continues the read's last extent on the same device, up
    /// to the read-ahead window; so a sequential reader never makes the media read past its
    /// file's end into other files' bytes.
    fn ahead_limit(
        &self,
        img: &Image<File>,
        inode: &Inode,
        extents: &[spinfs_erofs::Extent],
    ) -> Result<u64, Errno> {
        let Some(cache) = &self.blobs.cache else {
            return Ok(u64::MAX);
        };
        let Some(last) = extents.last() else {
            return Ok(u64::MAX);
        };
        let Some((dev, at)) = last.location else {
            return Ok(0);
        };
        let mut limit = at + last.len;
        let mut pos = last.offset + last.len;
        let window_end = limit + cache.ahead_window();
        while pos < inode.size && limit < window_end {
            let next = img
                .map(inode, pos, (window_end - limit).min(inode.size - pos))
                .map_err(eio(self.id))?;
            let Some(e) = next.first() else { break };
            match e.location {
                Some((d, o)) if d == dev && o == limit && e.offset == pos => {
                    limit += e.len;
                    pos += e.len;
                }
                _ => break,
            }
        }
        Ok(limit)
    }

    fn edges(&self, heads: &HeadCache, inode: &Inode) -> Option<crate::cache::Edges> {
        let ino = self.image().ok()?.spinfs_ino(inode).ok()??;
        match heads.edges(ino) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(layer = self.id, ino, "head cache: {e}");
                None
            }
        }
    }

    /// First data or hole offset at or after `offset` (SEEK_DATA/SEEK_HOLE semantics).
    pub fn seek(&self, inode: &Inode, offset: u64, data: bool) -> Result<Option<u64>, Errno> {
        if offset >= inode.size {
            // Past the end there is neither data nor a hole (ENXIO).
            return Ok(None);
        }
        let extents = self
            .image()?
            .map(inode, offset, inode.size - offset)
            .map_err(eio(self.id))?;
        for e in extents {
            let is_data = e.location.is_some();
            if is_data == data {
                return Ok(Some(e.offset.max(offset)));
            }
        }
        Ok(if data { None } else { Some(inode.size) })
    }
}
