//! Random-access reader of EROFS meta images.
//!
//! Nothing is loaded up front beyond the superblock and device table: every call reads the
//! few bytes it needs through [`ReadAt`]. Every on-disk value is bounds-checked; a corrupt or
//! hostile image gives [`Error::Corrupt`], never a panic, an out-of-bounds read, an
//! allocation not backed by bytes actually read, or an endless loop.

use crate::error::{Error, Result, corrupt};
use crate::io::{DeviceReader, ReadAt};
use crate::ondisk::*;
use crate::tree::{SPINFS_INO_XATTR, xattr_prefix};
use std::collections::HashSet;

/// Most extents one [`Image::map`] call returns.
pub const MAX_EXTENTS_PER_MAP: usize = 4096;
/// Longest symlink target accepted.
pub const MAX_SYMLINK: u64 = 4096;

/// The type of an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileType {
    File,
    Dir,
    Symlink,
    CharDev,
    BlockDev,
    Fifo,
    Socket,
}

impl FileType {
    fn from_mode(mode: u16) -> Option<FileType> {
        Some(match mode & S_IFMT {
            S_IFREG => FileType::File,
            S_IFDIR => FileType::Dir,
            S_IFLNK => FileType::Symlink,
            S_IFCHR => FileType::CharDev,
            S_IFBLK => FileType::BlockDev,
            S_IFIFO => FileType::Fifo,
            S_IFSOCK => FileType::Socket,
            _ => return None,
        })
    }

    fn from_dirent(ft: u8) -> Option<FileType> {
        Some(match ft {
            FT_REG_FILE => FileType::File,
            FT_DIR => FileType::Dir,
            FT_SYMLINK => FileType::Symlink,
            FT_CHRDEV => FileType::CharDev,
            FT_BLKDEV => FileType::BlockDev,
            FT_FIFO => FileType::Fifo,
            FT_SOCK => FileType::Socket,
            _ => return None,
        })
    }

    /// One letter as `ls -l` shows it.
    pub fn letter(self) -> char {
        match self {
            FileType::File => '-',
            FileType::Dir => 'd',
            FileType::Symlink => 'l',
            FileType::CharDev => 'c',
            FileType::BlockDev => 'b',
            FileType::Fifo => 'p',
            FileType::Socket => 's',
        }
    }
}

/// A decoded inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    pub nid: u64,
    pub file_type: FileType,
    /// Full `st_mode` (type and permission bits).
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// glibc `dev_t` for device inodes, 0 otherwise.
    pub rdev: u64,
    layout: u16,
    i_u: u32,
    inode_size: u8,
    xattr_size: u32,
    offset: u64,
}

impl Inode {
    /// An overlayfs whiteout: a character device 0/0.
    pub fn is_whiteout(&self) -> bool {
        self.file_type == FileType::CharDev && self.rdev == 0
    }

    pub fn is_dir(&self) -> bool {
        self.file_type == FileType::Dir
    }

    /// log2 of the chunk size of a chunk-based regular file.
    pub fn chunk_bits(&self, image_block_bits: u8) -> Option<u8> {
        (self.layout == LAYOUT_CHUNK_BASED)
            .then(|| image_block_bits + (self.i_u & CHUNK_FORMAT_BLKBITS_MASK) as u8)
    }
}

/// A directory entry ("." and ".." are never returned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub nid: u64,
    pub file_type: FileType,
}

/// Where a range of a file lives: `location` is `(device, byte offset)` (device 0 is the meta
/// image, 1.. the blobs) or `None` for a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub location: Option<(u16, u64)>,
}

/// An extended attribute: full name and value.
pub type Xattr = (Vec<u8>, Vec<u8>);

/// One chunk of a chunk-based file: `None` for a hole, else (device, block).
pub type ChunkRef = Option<(u16, u64)>;

/// A device-table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The tag with trailing NULs removed.
    pub tag: Vec<u8>,
    pub blocks: u32,
    pub mapped_blkaddr: u32,
}

/// Memory given to each image's cache of metadata blocks.
pub const BLOCK_CACHE_BYTES: u64 = 1 << 20;

/// A direct-mapped cache of recently read metadata blocks: inodes, xattrs, dirents and chunk
/// indexes of neighbouring inodes share blocks, so a tree walk does about one read per block
/// instead of several per inode. Bounded by [`BLOCK_CACHE_BYTES`].
struct BlockCache {
    slots: Vec<Option<(u64, Box<[u8]>)>>,
}

/// An open meta image.
pub struct Image<R> {
    meta: R,
    sb: Superblock,
    bits: u8,
    bs: u64,
    devices: Vec<DeviceInfo>,
    cache: std::sync::Mutex<BlockCache>,
}

impl<R: ReadAt> Image<R> {
    /// Reads and checks the superblock and device table.
    pub fn open(meta: R) -> Result<Image<R>> {
        let mut raw = [0u8; SUPER_SIZE];
        meta.read_at(&mut raw, SUPER_OFFSET)
            .map_err(|e| Error::io("read superblock", e))?;
        let Some(sb) = Superblock::decode(&raw) else {
            return corrupt("bad superblock magic (not an EROFS image)");
        };
        if !(9..=16).contains(&sb.blkszbits) {
            return corrupt(format!("block size 2^{} unsupported", sb.blkszbits));
        }
        let bits = sb.blkszbits;
        let bs = 1u64 << bits;
        if sb.feature_compat & FEATURE_COMPAT_SB_CHKSUM != 0 {
            let len = if bs > SUPER_OFFSET {
                bs - SUPER_OFFSET
            } else {
                bs
            };
            let mut block = vec![0u8; len as usize];
            meta.read_at(&mut block, SUPER_OFFSET)
                .map_err(|e| Error::io("read superblock", e))?;
            put32(&mut block, 4, 0);
            if superblock_checksum(&block) != sb.checksum {
                return corrupt("superblock checksum mismatch");
            }
        }
        let unknown = sb.feature_incompat & !FEATURE_INCOMPAT_SUPPORTED;
        if unknown != 0 {
            return Err(Error::Unsupported(format!(
                "incompatible features {unknown:#x} (compression or newer format)"
            )));
        }
        if sb.dirblkbits != 0 {
            return Err(Error::Unsupported("dirblkbits != 0".into()));
        }
        let mut devices = Vec::new();
        let base = sb.devt_slotoff as u64 * DEVICE_SLOT_SIZE as u64;
        for i in 0..sb.extra_devices as u64 {
            let mut slot = [0u8; DEVICE_SLOT_SIZE];
            meta.read_at(&mut slot, base + i * DEVICE_SLOT_SIZE as u64)
                .map_err(|e| Error::io(format!("read device slot {}", i + 1), e))?;
            let s = DeviceSlot::decode(&slot);
            let end = s.tag.iter().position(|&b| b == 0).unwrap_or(64);
            devices.push(DeviceInfo {
                tag: s.tag[..end].to_vec(),
                blocks: s.blocks,
                mapped_blkaddr: s.mapped_blkaddr,
            });
        }
        let slots = (BLOCK_CACHE_BYTES >> bits).max(16) as usize;
        let image = Image {
            meta,
            sb,
            bits,
            bs,
            devices,
            cache: std::sync::Mutex::new(BlockCache {
                slots: vec![None; slots],
            }),
        };
        let root = image.root()?;
        if !root.is_dir() {
            return corrupt("root inode is not a directory");
        }
        Ok(image)
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    pub fn block_bits(&self) -> u8 {
        self.bits
    }

    pub fn block_size(&self) -> u64 {
        self.bs
    }

    /// The device table (index 0 = device 1).
    pub fn devices(&self) -> &[DeviceInfo] {
        &self.devices
    }

    pub fn meta(&self) -> &R {
        &self.meta
    }

    pub fn root_nid(&self) -> u64 {
        self.sb.root_nid as u64
    }

    pub fn root(&self) -> Result<Inode> {
        self.inode(self.root_nid())
    }

    fn read(&self, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.sb.blocks as u64 * self.bs) {
            return corrupt(format!("{what} at {offset} lies beyond the image"));
        }
        let blk = offset >> self.bits;
        let within = (offset & (self.bs - 1)) as usize;
        if buf.is_empty() || within + buf.len() > self.bs as usize {
            return self
                .meta
                .read_at(buf, offset)
                .map_err(|e| Error::io(format!("read {what} at {offset}"), e));
        }
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            let slot = (blk % cache.slots.len() as u64) as usize;
            if let Some((b, data)) = &cache.slots[slot]
                && *b == blk
            {
                buf.copy_from_slice(&data[within..within + buf.len()]);
                return Ok(());
            }
        }
        let mut block = vec![0u8; self.bs as usize].into_boxed_slice();
        if self.meta.read_at(&mut block, blk << self.bits).is_err() {
            // A short image (truncated after its superblock was written): read just the range.
            return self
                .meta
                .read_at(buf, offset)
                .map_err(|e| Error::io(format!("read {what} at {offset}"), e));
        }
        buf.copy_from_slice(&block[within..within + buf.len()]);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let slot = (blk % cache.slots.len() as u64) as usize;
        cache.slots[slot] = Some((blk, block));
        Ok(())
    }

    /// Decodes the inode with number `nid`.
    pub fn inode(&self, nid: u64) -> Result<Inode> {
        let offset = nid
            .checked_mul(INODE_SLOT)
            .and_then(|o| o.checked_add(self.sb.meta_blkaddr as u64 * self.bs))
            .ok_or_else(|| Error::Corrupt(format!("nid {nid} out of range")))?;
        let mut b = [0u8; EXTENDED_INODE_SIZE];
        self.read(&mut b[..COMPACT_INODE_SIZE], offset, "inode")?;
        let format = le16(&b, 0);
        let extended = format & 1 == 1;
        let layout = (format >> 1) & 7;
        if format & !0x1f != 0 {
            return Err(Error::Unsupported(format!("inode format {format:#x}")));
        }
        let nlink_1 = format & 0x10 != 0;
        let xattr_icount = le16(&b, 2);
        let mode = le16(&b, 4);
        let Some(file_type) = FileType::from_mode(mode) else {
            return corrupt(format!("inode {nid} has invalid mode {mode:o}"));
        };
        let mut ino = Inode {
            nid,
            file_type,
            mode,
            uid: 0,
            gid: 0,
            nlink: 0,
            size: 0,
            mtime: 0,
            mtime_nsec: 0,
            rdev: 0,
            layout,
            i_u: le32(&b, 16),
            inode_size: 0,
            xattr_size: xattr_ibody_size(xattr_icount) as u32,
            offset,
        };
        if extended {
            self.read(
                &mut b[COMPACT_INODE_SIZE..],
                offset + COMPACT_INODE_SIZE as u64,
                "inode",
            )?;
            ino.inode_size = EXTENDED_INODE_SIZE as u8;
            ino.size = le64(&b, 8);
            ino.uid = le32(&b, 24);
            ino.gid = le32(&b, 28);
            ino.mtime = le64(&b, 32) as i64;
            ino.mtime_nsec = le32(&b, 40);
            ino.nlink = le32(&b, 44);
        } else {
            ino.inode_size = COMPACT_INODE_SIZE as u8;
            ino.nlink = if nlink_1 { 1 } else { le16(&b, 6) as u32 };
            ino.size = le32(&b, 8) as u64;
            ino.uid = le16(&b, 24) as u32;
            ino.gid = le16(&b, 26) as u32;
            let rel = if self.sb.feature_compat & FEATURE_COMPAT_MTIME != 0 {
                le32(&b, 12) as u64
            } else {
                0
            };
            ino.mtime = self.sb.build_time.wrapping_add(rel) as i64;
            ino.mtime_nsec = self.sb.build_time_nsec;
        }
        if ino.mtime_nsec >= 1_000_000_000 {
            return corrupt(format!("inode {nid} has mtime nanoseconds out of range"));
        }
        match file_type {
            FileType::CharDev | FileType::BlockDev => ino.rdev = decode_rdev(ino.i_u),
            FileType::Fifo | FileType::Socket => {}
            _ => match layout {
                LAYOUT_FLAT_PLAIN | LAYOUT_FLAT_INLINE => {}
                LAYOUT_CHUNK_BASED if file_type == FileType::File => {
                    let cbits = self.bits as u32 + (ino.i_u & CHUNK_FORMAT_BLKBITS_MASK);
                    if cbits > 48
                        || ino.i_u & !(CHUNK_FORMAT_BLKBITS_MASK | CHUNK_FORMAT_INDEXES) != 0
                    {
                        return corrupt(format!("inode {nid} has a bad chunk format"));
                    }
                }
                LAYOUT_COMPRESSED_FULL | LAYOUT_COMPRESSED_COMPACT => {
                    return Err(Error::Unsupported(format!("inode {nid} is compressed")));
                }
                _ => return corrupt(format!("inode {nid} has invalid data layout {layout}")),
            },
        }
        let flat = matches!(
            file_type,
            FileType::File | FileType::Dir | FileType::Symlink
        ) && layout != LAYOUT_CHUNK_BASED;
        if flat && ino.size > (self.sb.blocks as u64 + 1) * self.bs {
            return corrupt(format!("inode {nid}: size {} exceeds the image", ino.size));
        }
        if file_type == FileType::Dir && ino.size == 0 {
            return corrupt(format!("directory inode {nid} is empty (no . and ..)"));
        }
        Ok(ino)
    }

    /// Maps one byte position of a FLAT_PLAIN/FLAT_INLINE inode to an absolute meta-image
    /// offset, with how many bytes are contiguous from there (within the file).
    fn flat_location(&self, ino: &Inode, pos: u64) -> Result<(u64, u64)> {
        let nblocks = ino.size.div_ceil(self.bs);
        let inline = ino.layout == LAYOUT_FLAT_INLINE;
        let plain_blocks = nblocks - u64::from(inline && nblocks > 0);
        if pos < plain_blocks * self.bs {
            let start = ino.i_u as u64;
            if start + plain_blocks > self.sb.blocks as u64 {
                return corrupt(format!("data of inode {} lies beyond the image", ino.nid));
            }
            let contiguous = plain_blocks * self.bs - pos;
            return Ok((start * self.bs + pos, contiguous.min(ino.size - pos)));
        }
        let tail_start = plain_blocks * self.bs;
        let tail_len = ino.size - tail_start;
        let at = ino.offset + ino.inode_size as u64 + ino.xattr_size as u64;
        if at % self.bs + tail_len > self.bs {
            return corrupt(format!("inline data of inode {} crosses a block", ino.nid));
        }
        Ok((at + (pos - tail_start), ino.size - pos))
    }

    /// Reads bytes `[pos, pos + buf.len())` of a non-chunked inode stored in the meta image.
    fn read_flat(&self, ino: &Inode, mut pos: u64, mut buf: &mut [u8]) -> Result<()> {
        while !buf.is_empty() {
            let (at, avail) = self.flat_location(ino, pos)?;
            if avail == 0 {
                return corrupt("read past the end of an inode");
            }
            let n = (avail.min(buf.len() as u64)) as usize;
            let (head, rest) = buf.split_at_mut(n);
            self.read(head, at, "inode data")?;
            buf = rest;
            pos += n as u64;
        }
        Ok(())
    }

    /// The target of a symlink.
    pub fn readlink(&self, ino: &Inode) -> Result<Vec<u8>> {
        if ino.file_type != FileType::Symlink {
            return Err(Error::Invalid(format!(
                "inode {} is not a symlink",
                ino.nid
            )));
        }
        if ino.size == 0 || ino.size > MAX_SYMLINK {
            return corrupt(format!("symlink inode {} has size {}", ino.nid, ino.size));
        }
        let mut target = vec![0u8; ino.size as usize];
        self.read_flat(ino, 0, &mut target)?;
        if target.contains(&0) {
            return corrupt(format!("symlink inode {} contains NUL", ino.nid));
        }
        Ok(target)
    }

    fn dir_check(&self, ino: &Inode) -> Result<u64> {
        if !ino.is_dir() {
            return Err(Error::NotADirectory(format!("inode {}", ino.nid)));
        }
        if ino.layout != LAYOUT_FLAT_PLAIN && ino.layout != LAYOUT_FLAT_INLINE {
            return Err(Error::Unsupported(format!(
                "directory {} with layout {}",
                ino.nid, ino.layout
            )));
        }
        Ok(ino.size.div_ceil(self.bs))
    }

    /// Reads and validates one directory block: (entry name, nid, type) in order.
    fn dir_block(&self, ino: &Inode, block: u64) -> Result<Vec<(Vec<u8>, u64, FileType)>> {
        let start = block * self.bs;
        let len = (ino.size - start).min(self.bs) as usize;
        let mut buf = vec![0u8; len];
        self.read_flat(ino, start, &mut buf)?;
        let bad = |why: &str| Error::Corrupt(format!("directory {} block {block}: {why}", ino.nid));
        if len < DIRENT_SIZE {
            return Err(bad("shorter than one entry"));
        }
        let first = le16(&buf, 8) as usize;
        if first < DIRENT_SIZE || !first.is_multiple_of(DIRENT_SIZE) || first >= len {
            return Err(bad("bad first name offset"));
        }
        let n = first / DIRENT_SIZE;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let d = i * DIRENT_SIZE;
            let nid = le64(&buf, d);
            let off = le16(&buf, d + 8) as usize;
            let ft = buf[d + 10];
            let end = if i + 1 < n {
                le16(&buf, d + DIRENT_SIZE + 8) as usize
            } else {
                len
            };
            if off < first || end <= off || end > len {
                return Err(bad("name offsets out of order"));
            }
            let mut name = &buf[off..end];
            if i + 1 == n {
                let nul = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                if name[nul..].iter().any(|&b| b != 0) {
                    return Err(bad("name contains NUL"));
                }
                name = &name[..nul];
            }
            if name.is_empty() || name.len() > NAME_MAX {
                return Err(bad("empty or too long name"));
            }
            if name.contains(&0) || name.contains(&b'/') {
                return Err(bad("name contains NUL or '/'"));
            }
            let Some(ft) = FileType::from_dirent(ft) else {
                return Err(bad("unknown file type"));
            };
            out.push((name.to_vec(), nid, ft));
        }
        Ok(out)
    }

    /// Iterates over a directory's entries in name order, validating as it goes.
    pub fn read_dir<'a>(&'a self, dir: &Inode) -> Result<DirIter<'a, R>> {
        let blocks = self.dir_check(dir)?;
        Ok(DirIter {
            image: self,
            dir: dir.clone(),
            blocks,
            block: 0,
            pending: Vec::new().into_iter(),
            prev: None,
            dot: false,
            dotdot: None,
            done: false,
            after: None,
        })
    }

    /// Continues a directory listing after the entry named `after` (which need not exist),
    /// finding the starting block by binary search: what a FUSE readdir with an offset needs
    /// on directories of millions of entries.
    pub fn read_dir_after<'a>(&'a self, dir: &Inode, after: &[u8]) -> Result<DirIter<'a, R>> {
        let blocks = self.dir_check(dir)?;
        let (mut lo, mut hi) = (0u64, blocks);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            let entries = self.dir_block(dir, mid)?;
            match entries.first() {
                Some(first) if first.0.as_slice() <= after => lo = mid,
                Some(_) => hi = mid,
                None => return corrupt("empty directory block"),
            }
        }
        let mut it = self.read_dir(dir)?;
        it.block = lo;
        it.after = Some(after.to_vec());
        Ok(it)
    }

    /// All entries of a directory and the nid its ".." names.
    pub fn dir_entries(&self, dir: &Inode) -> Result<(Vec<DirEntry>, u64)> {
        let mut it = self.read_dir(dir)?;
        let mut out = Vec::new();
        for e in &mut it {
            out.push(e?);
        }
        let parent = it
            .dotdot
            .ok_or_else(|| Error::Corrupt(format!("directory {} has no '..'", dir.nid)))?;
        Ok((out, parent))
    }

    /// Finds `name` in a directory by binary search over its sorted blocks.
    pub fn lookup(&self, dir: &Inode, name: &[u8]) -> Result<Option<DirEntry>> {
        let blocks = self.dir_check(dir)?;
        if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
            return Ok(None);
        }
        let (mut lo, mut hi) = (0u64, blocks);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let entries = self.dir_block(dir, mid)?;
            let (first, last) = match (entries.first(), entries.last()) {
                (Some(f), Some(l)) => (&f.0, &l.0),
                _ => return corrupt("empty directory block"),
            };
            if name < first.as_slice() {
                hi = mid;
            } else if name > last.as_slice() {
                lo = mid + 1;
            } else {
                return Ok(entries
                    .binary_search_by(|e| e.0.as_slice().cmp(name))
                    .ok()
                    .map(|i| {
                        let (n, nid, ft) = entries[i].clone();
                        DirEntry {
                            name: n,
                            nid,
                            file_type: ft,
                        }
                    }));
            }
        }
        Ok(None)
    }

    /// Resolves a '/'-separated path from the root without following symlinks.
    pub fn resolve(&self, path: &[u8]) -> Result<Inode> {
        let mut cur = self.root()?;
        for comp in path
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
        {
            let shown = String::from_utf8_lossy(path).into_owned();
            if comp == b".." {
                return Err(Error::Invalid(format!("path {shown:?} contains '..'")));
            }
            if !cur.is_dir() {
                return Err(Error::NotADirectory(shown));
            }
            let Some(e) = self.lookup(&cur, comp)? else {
                return Err(Error::NotFound(shown));
            };
            let next = self.inode(e.nid)?;
            if next.file_type != e.file_type {
                return corrupt(format!("{shown:?}: entry type disagrees with inode"));
            }
            cur = next;
        }
        Ok(cur)
    }

    /// All xattrs as (full name, value), except the hidden `trusted.overlay.spinfs.ino`.
    pub fn xattrs(&self, ino: &Inode) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut all = self.raw_xattrs(ino)?;
        all.retain(|(n, _)| n.as_slice() != SPINFS_INO_XATTR);
        Ok(all)
    }

    /// One xattr's value.
    pub fn xattr(&self, ino: &Inode, name: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .raw_xattrs(ino)?
            .into_iter()
            .find(|(n, _)| n.as_slice() == name)
            .map(|(_, v)| v))
    }

    /// The persistent spinfs inode number, if the image records one.
    pub fn spinfs_ino(&self, ino: &Inode) -> Result<Option<u64>> {
        match self.xattr(ino, SPINFS_INO_XATTR)? {
            None => Ok(None),
            Some(v) => match <[u8; 8]>::try_from(v.as_slice()) {
                Ok(a) => Ok(Some(u64::from_le_bytes(a))),
                Err(_) => corrupt(format!("inode {}: bad trusted.overlay.spinfs.ino", ino.nid)),
            },
        }
    }

    /// Every xattr including `trusted.overlay.spinfs.ino`.
    pub fn raw_xattrs(&self, ino: &Inode) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        if ino.xattr_size == 0 {
            return Ok(Vec::new());
        }
        let mut area = vec![0u8; ino.xattr_size as usize];
        self.read(&mut area, ino.offset + ino.inode_size as u64, "xattrs")?;
        let shared = area[4] as usize;
        let mut pos = XATTR_HEADER_SIZE;
        let mut out = Vec::new();
        for i in 0..shared {
            let off = XATTR_HEADER_SIZE + 4 * i;
            if off + 4 > area.len() {
                return corrupt(format!("inode {}: shared xattr list overflows", ino.nid));
            }
            let id = le32(&area, off) as u64;
            let at = self.sb.xattr_blkaddr as u64 * self.bs + id * 4;
            let mut head = [0u8; XATTR_ENTRY_SIZE];
            self.read(&mut head, at, "shared xattr")?;
            let total = XATTR_ENTRY_SIZE + head[0] as usize + le16(&head, 2) as usize;
            let mut entry = vec![0u8; total];
            self.read(&mut entry, at, "shared xattr")?;
            out.push(self.xattr_entry(ino, &entry)?.1);
            pos = off + 4;
        }
        while pos + XATTR_ENTRY_SIZE <= area.len() {
            let (len, kv) = self.xattr_entry(ino, &area[pos..])?;
            out.push(kv);
            pos += len.next_multiple_of(4);
        }
        Ok(out)
    }

    fn xattr_entry(&self, ino: &Inode, b: &[u8]) -> Result<(usize, Xattr)> {
        let name_len = b[0] as usize;
        let index = b[1];
        let value_len = le16(b, 2) as usize;
        let total = XATTR_ENTRY_SIZE + name_len + value_len;
        if total > b.len() {
            return corrupt(format!("inode {}: xattr entry overflows", ino.nid));
        }
        let Some(prefix) = xattr_prefix(index) else {
            return Err(Error::Unsupported(format!(
                "inode {}: xattr name index {index:#x}",
                ino.nid
            )));
        };
        let mut name = prefix.to_vec();
        name.extend_from_slice(&b[XATTR_ENTRY_SIZE..XATTR_ENTRY_SIZE + name_len]);
        let value = b[XATTR_ENTRY_SIZE + name_len..total].to_vec();
        Ok((total, (name, value)))
    }

    fn chunk_index_base(&self, ino: &Inode) -> (u64, u64) {
        let unit = if ino.i_u & CHUNK_FORMAT_INDEXES != 0 {
            8
        } else {
            4
        };
        let base =
            (ino.offset + ino.inode_size as u64 + ino.xattr_size as u64).next_multiple_of(unit);
        (base, unit)
    }

    /// The bytes of the meta image that describe `ino` itself: its inode, inline xattrs and
    /// either its inline tail or its chunk index array, as `(offset, length)`. Directory and
    /// symlink blocks stored apart are found with [`Image::map`] (device 0). Used to say which
    /// files a damaged range of a meta image affects.
    pub fn inode_range(&self, ino: &Inode) -> (u64, u64) {
        let start = ino.offset;
        let body = ino.inode_size as u64 + ino.xattr_size as u64;
        let end = if ino.layout == LAYOUT_CHUNK_BASED && ino.file_type == FileType::File {
            let (base, unit) = self.chunk_index_base(ino);
            let bits = ino.chunk_bits(self.bits).unwrap_or(self.bits);
            base + ino.size.div_ceil(1u64 << bits.min(63)) * unit
        } else if ino.layout == LAYOUT_FLAT_INLINE {
            start + body + ino.size % self.bs.max(1)
        } else {
            start + body
        };
        (start, end.saturating_sub(start))
    }

    /// Reads chunk entries `[first, first + out.len())` of a chunk-based inode.
    fn chunk_refs(&self, ino: &Inode, first: u64, count: usize) -> Result<Vec<ChunkRef>> {
        let (base, unit) = self.chunk_index_base(ino);
        let mut raw = vec![0u8; count * unit as usize];
        self.read(&mut raw, base + first * unit, "chunk indexes")?;
        let mask = ((self.devices.len() as u32 + 1).next_power_of_two() - 1) as u16;
        let mut out = Vec::with_capacity(count);
        for e in raw.chunks_exact(unit as usize) {
            if unit == 4 {
                let blk = le32(e, 0);
                out.push((blk != NULL_ADDR).then_some((0, blk as u64)));
            } else {
                let lo = le32(e, 4);
                if lo == NULL_ADDR {
                    out.push(None);
                    continue;
                }
                let dev = le16(e, 2) & mask;
                if dev as usize > self.devices.len() {
                    return corrupt(format!("inode {}: chunk on unknown device {dev}", ino.nid));
                }
                let blk = ((le16(e, 0) as u64) << 32) | lo as u64;
                out.push(Some((dev, blk)));
            }
        }
        Ok(out)
    }

    /// The whole chunk table of a chunk-based file and its log2 chunk size. The table grows
    /// only as index bytes are actually read, so a lying size cannot force a huge allocation.
    pub fn chunk_table(&self, ino: &Inode) -> Result<(u8, Vec<ChunkRef>)> {
        let Some(bits) = ino.chunk_bits(self.bits) else {
            return Err(Error::Invalid(format!(
                "inode {} is not chunk-based",
                ino.nid
            )));
        };
        let n = ino.size.div_ceil(1u64 << bits);
        let mut out = Vec::new();
        let mut i = 0u64;
        while i < n {
            let batch = (n - i).min(512) as usize;
            out.extend(self.chunk_refs(ino, i, batch)?);
            i += batch as u64;
        }
        Ok((bits, out))
    }

    /// Maps `[offset, offset + len)` of an inode (clipped to its size) to extents. Returns at
    /// most [`MAX_EXTENTS_PER_MAP`] extents covering a prefix of the range; call again from
    /// the end of the last one for more.
    pub fn map(&self, ino: &Inode, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(ino.size);
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        let push = |out: &mut Vec<Extent>, e: Extent| {
            if let Some(last) = out.last_mut() {
                let contiguous = match (last.location, e.location) {
                    (None, None) => true,
                    (Some((d1, o1)), Some((d2, o2))) => d1 == d2 && o1 + last.len == o2,
                    _ => false,
                };
                if contiguous {
                    last.len += e.len;
                    return;
                }
            }
            out.push(e);
        };
        match (ino.file_type, ino.layout) {
            (FileType::File, LAYOUT_CHUNK_BASED) => {
                let bits = ino.chunk_bits(self.bits).unwrap_or(self.bits);
                let cs = 1u64 << bits;
                while pos < end && out.len() < MAX_EXTENTS_PER_MAP {
                    let first = pos >> bits;
                    let last = (end - 1) >> bits;
                    let batch = (last - first + 1).min(512) as usize;
                    for (k, r) in self.chunk_refs(ino, first, batch)?.into_iter().enumerate() {
                        let cstart = (first + k as u64) << bits;
                        let from = pos.max(cstart);
                        let to = end.min(cstart.saturating_add(cs));
                        if from >= to {
                            break;
                        }
                        let location = match r {
                            None => None,
                            Some((dev, blk)) => {
                                self.check_device_range(ino, dev, blk, cs.min(ino.size - cstart))?;
                                Some((dev, (blk << self.bits) + (from - cstart)))
                            }
                        };
                        push(
                            &mut out,
                            Extent {
                                offset: from,
                                len: to - from,
                                location,
                            },
                        );
                        pos = to;
                        if out.len() >= MAX_EXTENTS_PER_MAP {
                            break;
                        }
                    }
                }
            }
            (FileType::File | FileType::Dir | FileType::Symlink, _) => {
                while pos < end && out.len() < MAX_EXTENTS_PER_MAP {
                    let (at, avail) = self.flat_location(ino, pos)?;
                    let n = avail.min(end - pos);
                    if n == 0 {
                        break;
                    }
                    push(
                        &mut out,
                        Extent {
                            offset: pos,
                            len: n,
                            location: Some((0, at)),
                        },
                    );
                    pos += n;
                }
            }
            _ => {}
        }
        Ok(out)
    }

    fn check_device_range(&self, ino: &Inode, dev: u16, blk: u64, len: u64) -> Result<()> {
        let limit = if dev == 0 {
            self.sb.blocks as u64
        } else {
            match self.devices.get(dev as usize - 1) {
                Some(d) if d.blocks != 0 => d.blocks as u64,
                // A slot without a block count (older mkfs.erofs) cannot be checked.
                _ => u64::MAX >> self.bits,
            }
        };
        let nblk = len.div_ceil(self.bs);
        if blk.checked_add(nblk).is_none_or(|e| e > limit) {
            return corrupt(format!(
                "inode {}: chunk at block {blk} beyond device {dev}",
                ino.nid
            ));
        }
        Ok(())
    }

    /// Reads file data at `offset` into `buf`; returns the bytes read (short only at EOF).
    pub fn read_data(
        &self,
        ino: &Inode,
        offset: u64,
        buf: &mut [u8],
        devices: &dyn DeviceReader,
    ) -> Result<usize> {
        if ino.file_type != FileType::File {
            return Err(Error::Invalid(format!(
                "inode {} is not a regular file",
                ino.nid
            )));
        }
        let want = (buf.len() as u64).min(ino.size.saturating_sub(offset));
        let mut done = 0u64;
        while done < want {
            let extents = self.map(ino, offset + done, want - done)?;
            if extents.is_empty() {
                return corrupt(format!("inode {}: no extent for offset", ino.nid));
            }
            for e in extents {
                let at = (e.offset - offset) as usize;
                let dst = &mut buf[at..at + e.len as usize];
                match e.location {
                    None => dst.fill(0),
                    Some((0, off)) => self.read(dst, off, "file data")?,
                    Some((dev, off)) => devices
                        .read_device(dev, dst, off)
                        .map_err(|err| Error::io(format!("read device {dev} at {off}"), err))?,
                }
                done = e.offset + e.len - offset;
            }
        }
        Ok(want as usize)
    }

    /// Visits every entry of the tree depth-first (parents before children, names in
    /// order), with its '/'-separated path. Checks that every directory's ".." names its
    /// parent and that no directory is reached twice (cycles).
    pub fn walk(
        &self,
        mut visit: impl FnMut(&[u8], &DirEntry, &Inode) -> Result<()>,
    ) -> Result<()> {
        let root = self.root()?;
        let mut seen = HashSet::new();
        seen.insert(root.nid);
        let mut stack: Vec<(Vec<u8>, Inode, u64)> = vec![(Vec::new(), root.clone(), root.nid)];
        while let Some((path, dir, parent)) = stack.pop() {
            let (entries, dotdot) = self.dir_entries(&dir)?;
            if dotdot != parent {
                return corrupt(format!(
                    "directory {:?}: '..' does not name its parent",
                    String::from_utf8_lossy(&path)
                ));
            }
            let mut subdirs = Vec::new();
            for e in entries {
                let ino = self.inode(e.nid)?;
                let mut p = path.clone();
                p.push(b'/');
                p.extend_from_slice(&e.name);
                if ino.file_type != e.file_type {
                    return corrupt(format!(
                        "{:?}: entry type disagrees with inode",
                        String::from_utf8_lossy(&p)
                    ));
                }
                visit(&p, &e, &ino)?;
                if ino.is_dir() {
                    if !seen.insert(ino.nid) {
                        return corrupt(format!(
                            "{:?}: directory reached twice (cycle or directory hard link)",
                            String::from_utf8_lossy(&p)
                        ));
                    }
                    subdirs.push((p, ino, dir.nid));
                }
            }
            stack.extend(subdirs.into_iter().rev());
        }
        Ok(())
    }
}

/// What [`Image::verify`] looked at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyStats {
    pub inodes: u64,
    pub directories: u64,
    pub data_bytes: u64,
}

impl<R: ReadAt> Image<R> {
    /// Checks the whole image: every directory (names, order, ".", "..", cycles), inode,
    /// xattr, symlink and chunk mapping, and with `devices` also reads all file data. The
    /// work is bounded by the size of the image and its devices.
    pub fn verify(&self, devices: Option<&dyn DeviceReader>) -> Result<VerifyStats> {
        let mut stats = VerifyStats::default();
        let mut done = HashSet::new();
        let root = self.root()?;
        self.xattrs(&root)?;
        stats.inodes += 1;
        stats.directories += 1;
        let mut buf = Vec::new();
        self.walk(|_, _, ino| {
            if !done.insert(ino.nid) {
                return Ok(());
            }
            stats.inodes += 1;
            self.raw_xattrs(ino)?;
            match ino.file_type {
                FileType::Dir => stats.directories += 1,
                FileType::Symlink => {
                    self.readlink(ino)?;
                }
                FileType::File => {
                    let mut pos = 0;
                    while pos < ino.size {
                        let extents = self.map(ino, pos, ino.size - pos)?;
                        let Some(last) = extents.last() else {
                            return corrupt(format!("inode {}: unmapped data", ino.nid));
                        };
                        let next = last.offset + last.len;
                        if let Some(devs) = devices {
                            for e in extents.iter().filter(|e| e.location.is_some()) {
                                let mut off = e.offset;
                                while off < e.offset + e.len {
                                    let n = (e.offset + e.len - off).min(1 << 20) as usize;
                                    buf.resize(n, 0);
                                    self.read_data(ino, off, &mut buf, devs)?;
                                    stats.data_bytes += n as u64;
                                    off += n as u64;
                                }
                            }
                        }
                        pos = next;
                    }
                }
                _ => {}
            }
            Ok(())
        })?;
        Ok(stats)
    }
}

/// Iterator over a directory (see [`Image::read_dir`]).
pub struct DirIter<'a, R> {
    image: &'a Image<R>,
    dir: Inode,
    blocks: u64,
    block: u64,
    pending: std::vec::IntoIter<(Vec<u8>, u64, FileType)>,
    prev: Option<Vec<u8>>,
    dot: bool,
    dotdot: Option<u64>,
    done: bool,
    /// Set when listing resumes mid-directory: skip names up to this one.
    after: Option<Vec<u8>>,
}

impl<R> DirIter<'_, R> {
    /// The nid named by "..", once iteration has finished.
    pub fn parent(&self) -> Option<u64> {
        self.dotdot
    }
}

impl<R: ReadAt> Iterator for DirIter<'_, R> {
    type Item = Result<DirEntry>;

    fn next(&mut self) -> Option<Result<DirEntry>> {
        loop {
            if self.done {
                return None;
            }
            if let Some((name, nid, ft)) = self.pending.next() {
                if self.prev.as_ref().is_some_and(|p| *p >= name) {
                    self.done = true;
                    return Some(corrupt(format!(
                        "directory {}: names not sorted or duplicated",
                        self.dir.nid
                    )));
                }
                self.prev = Some(name.clone());
                let dots = name == b"." || name == b"..";
                if dots && ft != FileType::Dir {
                    self.done = true;
                    return Some(corrupt(format!(
                        "directory {}: bad '.' entry",
                        self.dir.nid
                    )));
                }
                if name == b"." {
                    if nid != self.dir.nid {
                        self.done = true;
                        return Some(corrupt(format!(
                            "directory {}: '.' does not name itself",
                            self.dir.nid
                        )));
                    }
                    self.dot = true;
                    continue;
                }
                if name == b".." {
                    self.dotdot = Some(nid);
                    continue;
                }
                if self.after.as_ref().is_some_and(|a| name <= *a) {
                    continue;
                }
                return Some(Ok(DirEntry {
                    name,
                    nid,
                    file_type: ft,
                }));
            }
            if self.block == self.blocks {
                self.done = true;
                if self.after.is_none() && (!self.dot || self.dotdot.is_none()) {
                    return Some(corrupt(format!(
                        "directory {} lacks '.' or '..'",
                        self.dir.nid
                    )));
                }
                return None;
            }
            match self.image.dir_block(&self.dir, self.block) {
                Ok(v) => self.pending = v.into_iter(),
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
            self.block += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::Image;
    use crate::tree::{Metadata, Node, NodeKind, Tree};
    use crate::writer::{WriteOptions, write_image};

    #[test]
    fn read_dir_after_resumes_anywhere() {
        let mut t = Tree::new(Metadata::default());
        let mut names: Vec<Vec<u8>> = (0..3000)
            .map(|i| format!("name-{:05}-{}", (i * 7919) % 3000, "x".repeat(i % 50)).into_bytes())
            .collect();
        for n in &names {
            t.add(
                t.root(),
                n.clone(),
                Node {
                    meta: Metadata::default(),
                    kind: NodeKind::Fifo,
                },
            );
        }
        names.sort();
        let mut meta = Vec::new();
        write_image(&t, &WriteOptions::default(), &mut meta, None).unwrap();
        let img = Image::open(&meta[..]).unwrap();
        let root = img.root().unwrap();
        assert!(root.size > 20 * 4096, "a multi-block directory");
        let all: Vec<Vec<u8>> = img
            .read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().name)
            .collect();
        assert_eq!(all, names);
        for k in (0..names.len()).step_by(97) {
            let rest: Vec<Vec<u8>> = img
                .read_dir_after(&root, &names[k])
                .unwrap()
                .map(|e| e.unwrap().name)
                .collect();
            assert_eq!(rest, names[k + 1..], "after {k}");
        }
        let from_start: Vec<_> = img
            .read_dir_after(&root, b"")
            .unwrap()
            .map(|e| e.unwrap().name)
            .collect();
        assert_eq!(from_start, names);
        assert_eq!(img.read_dir_after(&root, b"zzz").unwrap().count(), 0);
        for n in names.iter().step_by(101) {
            let e = img.lookup(&root, n).unwrap().unwrap();
            assert_eq!(&e.name, n);
        }
        assert!(img.lookup(&root, b"name-").unwrap().is_none());
        assert!(img.lookup(&root, b"zzz").unwrap().is_none());
    }
}
