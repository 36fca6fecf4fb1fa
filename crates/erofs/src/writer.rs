//! Turns a [`Tree`] into a meta image (written sequentially) and streams new file data to a
//! [`BlobSink`].
//!
//! Layout of a meta image, in block order: block 0 holds the superblock at byte 1024 and the
//! device table right after it (continuing into the next blocks if long); then the inode area
//! (extended 64-byte inodes in breadth-first order, root first, each followed by its inline
//! xattrs and either its inline tail or its chunk index array); then the data area holding the
//! full blocks of directories and symlinks that do not fit inline. Memory use is proportional
//! to the number of inodes and chunks, never to the file data.

use crate::error::{Error, Result, invalid};
use crate::io::{BlobSink, ReadAt};
use crate::ondisk::*;
use crate::tree::{
    Chunk, FileData, Node, NodeId, NodeKind, SPINFS_INO_XATTR, Source, Tree, xattr_index,
};
use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::AsRawFd;

/// log2 of the block size the writer uses (4 KiB).
pub const BLOCK_BITS: u8 = 12;
const BS: u64 = 1 << BLOCK_BITS;
/// Default chunk size: 4 MiB.
pub const DEFAULT_CHUNK_BITS: u8 = 22;
/// Largest chunk the writer streams (it holds one chunk in memory).
pub const MAX_STREAM_CHUNK_BITS: u8 = 30;
const MAX_CHUNK_BITS: u8 = BLOCK_BITS + 31;

/// One blob device of an image: a tag (at most 64 bytes; the kernel opens it as a path when
/// no `device=` option is given) and its size in blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub tag: Vec<u8>,
    pub blocks: u64,
}

/// How to write an image.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// Default log2 chunk size of regular files (12..=30).
    pub chunk_bits: u8,
    /// Devices that already exist, ids 1..=n, for [`Chunk::Existing`] references. A new blob,
    /// when a sink is given, becomes device n+1.
    pub devices: Vec<DeviceSpec>,
    /// Tag of the new blob device.
    pub new_blob_tag: Vec<u8>,
    /// Superblock build time (also the time of compact inodes; this writer only writes
    /// extended inodes, so it is informational).
    pub build_time: u64,
    pub uuid: [u8; 16],
    pub volume_name: Vec<u8>,
    /// Store `New` chunks that contain only zeros as holes.
    pub zero_chunks_as_holes: bool,
    /// Store identical `New` chunks once (BLAKE3 of each padded chunk, within this image).
    pub dedup_chunks: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            chunk_bits: DEFAULT_CHUNK_BITS,
            devices: Vec::new(),
            new_blob_tag: b"blob".to_vec(),
            build_time: 0,
            uuid: [0; 16],
            volume_name: Vec::new(),
            zero_chunks_as_holes: true,
            dedup_chunks: true,
        }
    }
}

/// What [`write_image`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteSummary {
    /// The device table of the image, in order (device 1 first).
    pub devices: Vec<DeviceSpec>,
    /// Device id of the new blob, if one was written.
    pub new_blob_device: Option<u16>,
    /// Bytes handed to the blob sink.
    pub blob_bytes: u64,
    /// Size of the meta image.
    pub meta_bytes: u64,
    pub inodes: u64,
    /// Chunks streamed into the blob, chunks stored as holes, and chunks that reuse an
    /// identical chunk already streamed.
    pub data_chunks: u64,
    pub hole_chunks: u64,
    pub dedup_chunks: u64,
}

/// Checks a chunk size in bytes given by a user: a power of two of at least 4 KiB and at most
/// 1 GiB. Returns its log2.
pub fn chunk_bits_for_size(size: u64) -> Result<u8> {
    if !size.is_power_of_two() || !(BS..=(1 << MAX_STREAM_CHUNK_BITS)).contains(&size) {
        return invalid(format!(
            "chunk size {size} must be a power of two between 4096 and {}",
            1u64 << MAX_STREAM_CHUNK_BITS
        ));
    }
    Ok(size.trailing_zeros() as u8)
}

/// Per-inode layout decided before anything is written.
#[derive(Clone, Copy, Default)]
struct Slot {
    offset: u64,
    layout: u16,
    xattr_size: u32,
    /// Bytes stored after the inode and xattrs (inline tail).
    tail: u32,
    data_blocks: u32,
    data_blkaddr: u32,
    size: u64,
    nlink: u32,
}

/// Writes `tree` as a meta image to `meta` and streams the data of `New` chunks to `blob`.
pub fn write_image(
    tree: &Tree,
    opts: &WriteOptions,
    meta: &mut dyn Write,
    blob: Option<&mut dyn BlobSink>,
) -> Result<WriteSummary> {
    if !(BLOCK_BITS..=MAX_STREAM_CHUNK_BITS).contains(&opts.chunk_bits) {
        return invalid(format!(
            "chunk bits {} out of range {BLOCK_BITS}..={MAX_STREAM_CHUNK_BITS}",
            opts.chunk_bits
        ));
    }
    if opts.volume_name.len() > 16 {
        return invalid("volume name longer than 16 bytes");
    }
    let mut devices = opts.devices.clone();
    let new_dev = if blob.is_some() {
        devices.push(DeviceSpec {
            tag: opts.new_blob_tag.clone(),
            blocks: 0,
        });
        Some(devices.len())
    } else {
        None
    };
    if devices.len() > u16::MAX as usize {
        return invalid(format!("{} devices (at most 65535)", devices.len()));
    }
    for d in &devices {
        if d.tag.len() > 64 {
            return invalid("device tag longer than 64 bytes");
        }
        if d.blocks > u32::MAX as u64 {
            return invalid(format!("device of {} blocks is too large", d.blocks));
        }
    }

    let plan = Plan::new(tree)?;

    // Stream new data first: chunk indexes need the blob addresses.
    let mut stream = Streamer {
        opts,
        sink: blob,
        new_dev: new_dev.map(|d| d as u16),
        blob_blocks: 0,
        buf: Vec::new(),
        data_chunks: 0,
        hole_chunks: 0,
        dedup_chunks: 0,
        seen: std::collections::HashMap::new(),
    };
    // All chunk tables, flat: the table of position `pos` is
    // `chunks[chunk_start[pos]..chunk_start[pos + 1]]`.
    let mut chunks: Vec<u64> = Vec::new();
    let mut chunk_start: Vec<u64> = Vec::with_capacity(plan.order.len() + 1);
    for (pos, &id) in plan.order.iter().enumerate() {
        chunk_start.push(chunks.len() as u64);
        if let NodeKind::File(f) = &tree.node(id).kind
            && f.size > 0
        {
            stream.file(f, &devices, pos, &mut chunks)?;
        }
    }
    chunk_start.push(chunks.len() as u64);
    let table_of = |pos: usize| &chunks[chunk_start[pos] as usize..chunk_start[pos + 1] as usize];
    if let Some(d) = new_dev {
        devices[d - 1].blocks = stream.blob_blocks;
        if stream.blob_blocks > u32::MAX as u64 {
            return invalid("new blob larger than 2^32 blocks");
        }
    }

    // Layout.
    let dev_table_end =
        SUPER_OFFSET + SUPER_SIZE as u64 + (devices.len() * DEVICE_SLOT_SIZE) as u64;
    let mut cursor = dev_table_end;
    let mut slots = vec![Slot::default(); plan.order.len()];
    let mut any_chunked = false;
    for (pos, &id) in plan.order.iter().enumerate() {
        let node = tree.node(id);
        let xattr_size = xattr_area_size(node)?;
        let mut s = Slot {
            xattr_size,
            nlink: plan.nlink[pos],
            ..Slot::default()
        };
        let head = EXTENDED_INODE_SIZE as u64 + xattr_size as u64;
        let mut rec = head;
        match &node.kind {
            NodeKind::Dir(_) => {
                let entries = plan.dir_entries(tree, pos, &[]);
                let size = dir_content(&entries, None);
                s.size = size;
                let nblocks = size.div_ceil(BS);
                let last = size - (nblocks - 1) * BS;
                if head + last <= BS {
                    s.layout = LAYOUT_FLAT_INLINE;
                    s.tail = last as u32;
                    s.data_blocks = (nblocks - 1) as u32;
                    rec += last;
                } else {
                    s.layout = LAYOUT_FLAT_PLAIN;
                    s.data_blocks = nblocks as u32;
                }
            }
            NodeKind::Symlink(target) => {
                let len = target.len() as u64;
                s.size = len;
                if head + len <= BS {
                    s.layout = LAYOUT_FLAT_INLINE;
                    s.tail = len as u32;
                    rec += len;
                } else {
                    s.layout = LAYOUT_FLAT_PLAIN;
                    s.data_blocks = 1;
                }
            }
            NodeKind::File(f) => {
                s.size = f.size;
                if f.size == 0 {
                    s.layout = LAYOUT_FLAT_PLAIN;
                } else {
                    any_chunked = true;
                    s.layout = LAYOUT_CHUNK_BASED;
                    let n = table_of(pos).len() as u64;
                    rec = head.next_multiple_of(CHUNK_INDEX_SIZE as u64)
                        + n * CHUNK_INDEX_SIZE as u64;
                }
            }
            _ => s.layout = LAYOUT_FLAT_PLAIN,
        }
        let fixed = if s.layout == LAYOUT_CHUNK_BASED {
            head
        } else {
            rec
        };
        cursor = cursor.next_multiple_of(INODE_SLOT);
        // Keep an inode with its xattrs and inline data inside one block; a record larger
        // than a block starts on a block boundary.
        if cursor % BS + fixed > BS {
            cursor = cursor.next_multiple_of(BS);
        }
        s.offset = cursor;
        cursor += rec;
        slots[pos] = s;
    }
    let root_nid = slots[0].offset / INODE_SLOT;
    if root_nid > u16::MAX as u64 {
        return invalid("device table too large: root inode beyond nid 65535");
    }
    // fsck.erofs 1.5 reads an xattr header after every inode, even one without xattrs: keep
    // that much slack after the last inode so it never reads past the end of the image.
    let mut next_block = (cursor + XATTR_HEADER_SIZE as u64).div_ceil(BS);
    for s in slots.iter_mut() {
        if s.data_blocks > 0 {
            s.data_blkaddr = u32::try_from(next_block)
                .map_err(|_| Error::Invalid("meta image larger than 2^32 blocks".into()))?;
            next_block += s.data_blocks as u64;
        }
    }
    let total_blocks = u32::try_from(next_block)
        .map_err(|_| Error::Invalid("meta image larger than 2^32 blocks".into()))?;

    // Emit.
    let mut volume_name = [0u8; 16];
    volume_name[..opts.volume_name.len()].copy_from_slice(&opts.volume_name);
    let mut feature_incompat = 0;
    if any_chunked {
        feature_incompat |= FEATURE_INCOMPAT_CHUNKED_FILE;
    }
    if !devices.is_empty() {
        feature_incompat |= FEATURE_INCOMPAT_DEVICE_TABLE;
    }
    let sb = Superblock {
        feature_compat: FEATURE_COMPAT_SB_CHKSUM,
        blkszbits: BLOCK_BITS,
        root_nid: root_nid as u16,
        inos: plan.order.len() as u64,
        build_time: opts.build_time,
        blocks: total_blocks,
        uuid: opts.uuid,
        volume_name,
        feature_incompat,
        extra_devices: devices.len() as u16,
        devt_slotoff: ((SUPER_OFFSET + SUPER_SIZE as u64) / DEVICE_SLOT_SIZE as u64) as u16,
        ..Superblock::default()
    };
    let mut out = MetaOut::new(meta);
    out.pad_to(SUPER_OFFSET)?;
    out.write(&sb.encode())?;
    // Each device is also given its place in a unified address space as if the blobs were
    // appended to the meta image in order. The kernel uses it only when mounted without
    // `device=` options ("flat device" mode), so `cat META BLOB... > one.img` mounts alone;
    // with `device=` the chunk's device id decides. Left 0 if it would not fit 32 bits.
    let mut mapped = Vec::with_capacity(devices.len());
    let mut next = total_blocks as u64;
    for d in &devices {
        mapped.push(next);
        next += d.blocks;
    }
    if next > u32::MAX as u64 {
        mapped.iter_mut().for_each(|m| *m = 0);
    }
    for (d, &mapped_blkaddr) in devices.iter().zip(&mapped) {
        let mut tag = [0u8; 64];
        tag[..d.tag.len()].copy_from_slice(&d.tag);
        out.write(
            &DeviceSlot {
                tag,
                blocks: d.blocks as u32,
                mapped_blkaddr: mapped_blkaddr as u32,
            }
            .encode(),
        )?;
    }
    let nids: Vec<u64> = slots.iter().map(|s| s.offset / INODE_SLOT).collect();
    let mut scratch = Vec::new();
    for (pos, &id) in plan.order.iter().enumerate() {
        let node = tree.node(id);
        let s = &slots[pos];
        out.pad_to(s.offset)?;
        let (type_bits, i_u) = match &node.kind {
            NodeKind::Dir(_) => (S_IFDIR, s.data_blkaddr),
            NodeKind::Symlink(_) => (S_IFLNK, s.data_blkaddr),
            NodeKind::File(f) if f.size == 0 => (S_IFREG, 0),
            NodeKind::File(f) => {
                let bits = f.chunk_bits.unwrap_or(opts.chunk_bits);
                (S_IFREG, CHUNK_FORMAT_INDEXES | (bits - BLOCK_BITS) as u32)
            }
            NodeKind::CharDev(r) => (S_IFCHR, rdev_field(*r)?),
            NodeKind::BlockDev(r) => (S_IFBLK, rdev_field(*r)?),
            NodeKind::Fifo => (S_IFIFO, 0),
            NodeKind::Socket => (S_IFSOCK, 0),
        };
        let inode = ExtendedInode {
            layout: s.layout,
            xattr_icount: if s.xattr_size == 0 {
                0
            } else {
                ((s.xattr_size as usize - XATTR_HEADER_SIZE) / 4 + 1) as u16
            },
            mode: type_bits | (node.meta.perm & 0o7777),
            size: s.size,
            i_u,
            ino: pos as u32 + 1,
            uid: node.meta.uid,
            gid: node.meta.gid,
            mtime: node.meta.mtime as u64,
            mtime_nsec: node.meta.mtime_nsec,
            nlink: s.nlink,
        };
        out.write(&inode.encode())?;
        if s.xattr_size > 0 {
            scratch.clear();
            encode_xattrs(node, &mut scratch)?;
            debug_assert_eq!(scratch.len(), s.xattr_size as usize);
            out.write(&scratch)?;
        }
        match &node.kind {
            NodeKind::Dir(_) if s.tail > 0 => {
                scratch.clear();
                let entries = plan.dir_entries(tree, pos, &nids);
                dir_content(&entries, Some(&mut scratch));
                let start = s.data_blocks as usize * BS as usize;
                out.write(&scratch[start..])?;
            }
            NodeKind::Symlink(t) if s.tail > 0 => out.write(t)?,
            NodeKind::File(_) if s.layout == LAYOUT_CHUNK_BASED => {
                let here = out.pos;
                out.pad_to(here.next_multiple_of(CHUNK_INDEX_SIZE as u64))?;
                for &packed in table_of(pos) {
                    out.write(&chunk_index(packed))?;
                }
            }
            _ => {}
        }
    }
    for (pos, &id) in plan.order.iter().enumerate() {
        let s = &slots[pos];
        if s.data_blocks == 0 {
            continue;
        }
        out.pad_to(s.data_blkaddr as u64 * BS)?;
        match &tree.node(id).kind {
            NodeKind::Dir(_) => {
                scratch.clear();
                let entries = plan.dir_entries(tree, pos, &nids);
                dir_content(&entries, Some(&mut scratch));
                out.write(&scratch[..(s.data_blocks as usize * BS as usize).min(scratch.len())])?;
            }
            NodeKind::Symlink(t) => out.write(t)?,
            _ => {}
        }
    }
    out.pad_to(total_blocks as u64 * BS)?;
    out.finish()?;
    Ok(WriteSummary {
        new_blob_device: new_dev.map(|d| d as u16),
        blob_bytes: stream.blob_blocks * BS,
        meta_bytes: total_blocks as u64 * BS,
        inodes: plan.order.len() as u64,
        data_chunks: stream.data_chunks,
        hole_chunks: stream.hole_chunks,
        dedup_chunks: stream.dedup_chunks,
        devices,
    })
}

fn rdev_field(rdev: u64) -> Result<u32> {
    encode_rdev(rdev).ok_or_else(|| {
        Error::Invalid(format!(
            "device number {}:{} does not fit EROFS (major < 4096, minor < 2^20)",
            dev_major(rdev),
            dev_minor(rdev)
        ))
    })
}

fn chunk_index(packed: u64) -> [u8; 8] {
    // packed = device << 48 | block; a hole is NULL_ADDR on device 0.
    let mut b = [0u8; 8];
    put16(&mut b, 0, 0);
    put16(&mut b, 2, (packed >> 48) as u16);
    put32(&mut b, 4, packed as u32);
    b
}

fn pack_chunk(device: u16, block: u32) -> u64 {
    ((device as u64) << 48) | block as u64
}
const HOLE: u64 = NULL_ADDR as u64;

/// Traversal order, parents and link counts; validates the shape of the tree.
struct Plan {
    order: Vec<NodeId>,
    /// For each position of a directory: its entries sorted by name (indexes into the
    /// directory's entry list). Empty for non-directories.
    sorted: Vec<Vec<u32>>,
    parent: Vec<u32>,
    pos_of: Vec<u32>,
    nlink: Vec<u32>,
}

const UNSEEN: u32 = u32::MAX;

impl Plan {
    fn new(tree: &Tree) -> Result<Plan> {
        if tree.is_empty() || !tree.node(tree.root()).is_dir() {
            return invalid("the root of the tree must be a directory");
        }
        check_node(tree.node(tree.root()), b"/")?;
        let mut pos_of = vec![UNSEEN; tree.len()];
        let mut order = vec![tree.root()];
        let mut parent = vec![0u32];
        let mut sorted: Vec<Vec<u32>> = vec![Vec::new()];
        let mut nlink = vec![2u32];
        pos_of[tree.root() as usize] = 0;
        let mut queue = VecDeque::from([0u32]);
        while let Some(pos) = queue.pop_front() {
            let id = order[pos as usize];
            let NodeKind::Dir(entries) = &tree.node(id).kind else {
                continue;
            };
            let mut idx: Vec<u32> = (0..entries.len() as u32).collect();
            idx.sort_unstable_by(|&a, &b| entries[a as usize].0.cmp(&entries[b as usize].0));
            for w in idx.windows(2) {
                if entries[w[0] as usize].0 == entries[w[1] as usize].0 {
                    return invalid(format!(
                        "duplicate name {:?} in a directory",
                        String::from_utf8_lossy(&entries[w[0] as usize].0)
                    ));
                }
            }
            for &i in &idx {
                let (name, child) = &entries[i as usize];
                check_name(name)?;
                let Some(child_node) = tree.get(*child) else {
                    return invalid(format!("entry refers to missing node {child}"));
                };
                let cpos = pos_of[*child as usize];
                if child_node.is_dir() {
                    if cpos != UNSEEN {
                        return invalid(format!(
                            "directory node {child} is linked more than once (or forms a cycle)"
                        ));
                    }
                    nlink[pos as usize] += 1;
                }
                if cpos == UNSEEN {
                    check_node(child_node, name)?;
                    let new_pos = order.len() as u32;
                    pos_of[*child as usize] = new_pos;
                    order.push(*child);
                    parent.push(pos);
                    sorted.push(Vec::new());
                    nlink.push(if child_node.is_dir() { 2 } else { 1 });
                    queue.push_back(new_pos);
                } else {
                    nlink[cpos as usize] =
                        nlink[cpos as usize].checked_add(1).ok_or_else(|| {
                            Error::Invalid("more than 2^32 links to one inode".into())
                        })?;
                }
            }
            sorted[pos as usize] = idx;
        }
        Ok(Plan {
            order,
            sorted,
            parent,
            pos_of,
            nlink,
        })
    }

    /// The directory at `pos` as (name, nid, file type), including "." and "..", sorted.
    fn dir_entries<'t>(
        &self,
        tree: &'t Tree,
        pos: usize,
        nids: &[u64],
    ) -> Vec<(&'t [u8], u64, u8)> {
        let nid = |p: usize| nids.get(p).copied().unwrap_or(0);
        let NodeKind::Dir(entries) = &tree.node(self.order[pos]).kind else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(entries.len() + 2);
        out.push((&b"."[..], nid(pos), FT_DIR));
        out.push((&b".."[..], nid(self.parent[pos] as usize), FT_DIR));
        for &i in &self.sorted[pos] {
            let (name, child) = &entries[i as usize];
            let cpos = self.pos_of[*child as usize] as usize;
            out.push((
                name.as_slice(),
                nid(cpos),
                node_file_type(tree.node(*child)),
            ));
        }
        // Children are sorted; "." and ".." must be sorted among them.
        out.sort_by(|a, b| a.0.cmp(b.0));
        out
    }
}

fn node_file_type(node: &Node) -> u8 {
    match node.kind {
        NodeKind::Dir(_) => FT_DIR,
        NodeKind::File(_) => FT_REG_FILE,
        NodeKind::Symlink(_) => FT_SYMLINK,
        NodeKind::CharDev(_) => FT_CHRDEV,
        NodeKind::BlockDev(_) => FT_BLKDEV,
        NodeKind::Fifo => FT_FIFO,
        NodeKind::Socket => FT_SOCK,
    }
}

/// Checks what the format cannot represent in a node's own attributes.
fn check_node(node: &Node, name: &[u8]) -> Result<()> {
    let shown = || String::from_utf8_lossy(name).into_owned();
    if node.meta.mtime_nsec >= 1_000_000_000 {
        return invalid(format!("{:?}: mtime nanoseconds out of range", shown()));
    }
    if let NodeKind::Symlink(t) = &node.kind
        && (t.is_empty() || t.len() >= BS as usize || t.contains(&0))
    {
        return invalid(format!(
            "{:?}: symlink target must be 1..4095 bytes without NUL",
            shown()
        ));
    }
    Ok(())
}

fn check_name(name: &[u8]) -> Result<()> {
    if name.is_empty()
        || name == b"."
        || name == b".."
        || name.len() > NAME_MAX
        || name.contains(&b'/')
        || name.contains(&0)
    {
        return invalid(format!(
            "invalid file name {:?}",
            String::from_utf8_lossy(name)
        ));
    }
    Ok(())
}

/// Lays out directory entries in blocks (entries never span blocks; every block but the last
/// is padded with zeros to the block size). Returns the directory size; appends the bytes to
/// `out` when given.
pub(crate) fn dir_content(entries: &[(&[u8], u64, u8)], mut out: Option<&mut Vec<u8>>) -> u64 {
    let mut size = 0u64;
    let mut start = 0;
    while start < entries.len() {
        let mut end = start;
        let mut used = 0usize;
        while end < entries.len() {
            let need = DIRENT_SIZE + entries[end].0.len();
            if used + need > BS as usize {
                break;
            }
            used += need;
            end += 1;
        }
        let last = end == entries.len();
        if let Some(out) = out.as_deref_mut() {
            let base = out.len();
            let mut nameoff = (end - start) * DIRENT_SIZE;
            for &(name, nid, ft) in &entries[start..end] {
                let mut d = [0u8; DIRENT_SIZE];
                put64(&mut d, 0, nid);
                put16(&mut d, 8, nameoff as u16);
                d[10] = ft;
                out.extend_from_slice(&d);
                nameoff += name.len();
            }
            for &(name, _, _) in &entries[start..end] {
                out.extend_from_slice(name);
            }
            if !last {
                out.resize(base + BS as usize, 0);
            }
        }
        size += if last { used as u64 } else { BS };
        start = end;
    }
    size
}

/// (name index, name suffix, value).
type RawXattr<'a> = (u8, &'a [u8], &'a [u8]);

fn xattr_list(node: &Node) -> Result<Vec<RawXattr<'_>>> {
    let mut list = Vec::with_capacity(node.meta.xattrs.len());
    for (name, value) in &node.meta.xattrs {
        if name.as_slice() == SPINFS_INO_XATTR {
            return invalid("xattr trusted.overlay.spinfs.ino is reserved (use Metadata::ino)");
        }
        let Some((index, suffix)) = xattr_index(name) else {
            return invalid(format!(
                "xattr {:?} has a namespace EROFS cannot store",
                String::from_utf8_lossy(name)
            ));
        };
        if suffix.len() > 255 || value.len() > u16::MAX as usize {
            return invalid(format!(
                "xattr {:?} name or value too long",
                String::from_utf8_lossy(name)
            ));
        }
        list.push((index, suffix, value.as_slice()));
    }
    list.sort();
    for w in list.windows(2) {
        if w[0].0 == w[1].0 && w[0].1 == w[1].1 {
            return invalid("duplicate xattr name");
        }
    }
    Ok(list)
}

/// `SPINFS_INO_XATTR` without its `trusted.` prefix (EROFS name index 4).
const SPINFS_INO_SUFFIX: &[u8] = SPINFS_INO_XATTR.split_at(b"trusted.".len()).1;

fn xattr_area_size(node: &Node) -> Result<u32> {
    let list = xattr_list(node)?;
    let mut size: usize = list
        .iter()
        .map(|(_, s, v)| (XATTR_ENTRY_SIZE + s.len() + v.len()).next_multiple_of(4))
        .sum();
    if node.meta.ino != 0 {
        size += (XATTR_ENTRY_SIZE + SPINFS_INO_SUFFIX.len() + 8).next_multiple_of(4);
    }
    if size == 0 {
        return Ok(0);
    }
    let total = XATTR_HEADER_SIZE + size;
    if (total - XATTR_HEADER_SIZE) / 4 + 1 > u16::MAX as usize {
        return invalid("inline xattrs larger than EROFS allows (256 KiB)");
    }
    Ok(total as u32)
}

fn encode_xattrs(node: &Node, out: &mut Vec<u8>) -> Result<()> {
    let ino = node.meta.ino.to_le_bytes();
    let mut list = xattr_list(node)?;
    if node.meta.ino != 0 {
        list.push((4, SPINFS_INO_SUFFIX, &ino));
    }
    out.extend_from_slice(&[0u8; XATTR_HEADER_SIZE]);
    for (index, suffix, value) in list {
        let start = out.len();
        out.push(suffix.len() as u8);
        out.push(index);
        out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        out.extend_from_slice(suffix);
        out.extend_from_slice(value);
        out.resize(start + (out.len() - start).next_multiple_of(4), 0);
    }
    Ok(())
}

struct Streamer<'o, 's> {
    opts: &'o WriteOptions,
    sink: Option<&'s mut dyn BlobSink>,
    new_dev: Option<u16>,
    blob_blocks: u64,
    buf: Vec<u8>,
    data_chunks: u64,
    hole_chunks: u64,
    dedup_chunks: u64,
    /// BLAKE3 of each streamed chunk (padded) -> its first block in the new blob.
    seen: std::collections::HashMap<[u8; 32], u32>,
}

enum Opened {
    File(std::fs::File, String),
    Reader(std::sync::Arc<dyn ReadAt>),
}

impl Streamer<'_, '_> {
    /// Resolves every chunk of `f` to a packed (device, block) or hole, streaming new ones.
    fn file(
        &mut self,
        f: &FileData,
        devices: &[DeviceSpec],
        pos: usize,
        table: &mut Vec<u64>,
    ) -> Result<()> {
        let bits = f.chunk_bits.unwrap_or(self.opts.chunk_bits);
        if !(BLOCK_BITS..=MAX_CHUNK_BITS).contains(&bits) {
            return invalid(format!("file chunk bits {bits} out of range"));
        }
        let cs = 1u64 << bits;
        let n = f.size.div_ceil(cs);
        if let Some(c) = &f.chunks
            && c.len() as u64 != n
        {
            return invalid(format!(
                "file of {} bytes with {}-byte chunks needs {n} chunk entries, got {}",
                f.size,
                cs,
                c.len()
            ));
        }
        let mut opened: Option<Opened> = None;
        for i in 0..n {
            let chunk = f.chunks.as_ref().map_or(Chunk::New, |c| c[i as usize]);
            let start = i * cs;
            let len = cs.min(f.size - start);
            let packed = match chunk {
                Chunk::Hole => {
                    self.hole_chunks += 1;
                    HOLE
                }
                Chunk::Existing { device, block } => {
                    let Some(d) = (device as usize)
                        .checked_sub(1)
                        .and_then(|i| devices.get(i))
                    else {
                        return invalid(format!("chunk refers to unknown device {device}"));
                    };
                    let end = block.checked_add(len.div_ceil(BS));
                    if block >= NULL_ADDR as u64 || end.is_none_or(|e| e > d.blocks) {
                        return invalid(format!(
                            "chunk at block {block} of device {device} lies outside its {} blocks",
                            d.blocks
                        ));
                    }
                    pack_chunk(device, block as u32)
                }
                Chunk::New => {
                    if bits > MAX_STREAM_CHUNK_BITS {
                        return invalid("new data in chunks larger than 1 GiB");
                    }
                    if opened.is_none() {
                        opened = Some(match &f.source {
                            Some(Source::Path(p)) => Opened::File(
                                std::fs::File::open(p)
                                    .map_err(|e| Error::io(format!("open {}", p.display()), e))?,
                                p.display().to_string(),
                            ),
                            Some(Source::Reader(r)) => Opened::Reader(r.clone()),
                            None => {
                                return invalid(format!(
                                    "file at position {pos} has new chunks but no data source"
                                ));
                            }
                        });
                    }
                    self.new_chunk(opened.as_ref().expect("opened above"), start, len)?
                }
            };
            table.push(packed);
        }
        Ok(())
    }

    fn new_chunk(&mut self, src: &Opened, start: u64, len: u64) -> Result<u64> {
        if let Opened::File(file, _) = src
            && !has_data(file, start, start + len)
        {
            self.hole_chunks += 1;
            return Ok(HOLE);
        }
        let padded = len.next_multiple_of(BS) as usize;
        if self.buf.len() < padded {
            self.buf.resize(padded, 0);
        }
        let buf = &mut self.buf[..padded];
        let read = match src {
            Opened::File(f, name) => ReadAt::read_at(f, &mut buf[..len as usize], start)
                .map_err(|e| Error::io(format!("read {name} at {start}"), e)),
            Opened::Reader(r) => r
                .read_at(&mut buf[..len as usize], start)
                .map_err(|e| Error::io(format!("read file data at {start}"), e)),
        };
        read?;
        buf[len as usize..].fill(0);
        if self.opts.zero_chunks_as_holes && is_zero(buf) {
            self.hole_chunks += 1;
            return Ok(HOLE);
        }
        let (Some(sink), Some(dev)) = (self.sink.as_deref_mut(), self.new_dev) else {
            return invalid("new file data but no blob sink");
        };
        let key = self
            .opts
            .dedup_chunks
            .then(|| *blake3::hash(buf).as_bytes());
        if let Some(&block) = key.as_ref().and_then(|k| self.seen.get(k)) {
            self.dedup_chunks += 1;
            return Ok(pack_chunk(dev, block));
        }
        sink.write_chunk(buf)
            .map_err(|e| Error::io("write blob data", e))?;
        let block = self.blob_blocks;
        if block >= NULL_ADDR as u64 {
            return invalid("new blob larger than 2^32 blocks");
        }
        self.blob_blocks += padded as u64 / BS;
        self.data_chunks += 1;
        if let Some(k) = key {
            self.seen.insert(k, block as u32);
        }
        Ok(pack_chunk(dev, block as u32))
    }
}

/// Whether `[start, end)` of `file` holds any data (not only a hole), by `SEEK_DATA`.
fn has_data(file: &std::fs::File, start: u64, end: u64) -> bool {
    let Ok(off) = libc::off_t::try_from(start) else {
        return true;
    };
    // SAFETY: lseek on a descriptor we own; it only moves the file offset.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, libc::SEEK_DATA) };
    if r < 0 {
        // ENXIO: no data at or after `start`. Any other error: read normally.
        return std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO);
    }
    (r as u64) < end
}

fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_ne_bytes(w.try_into().expect("8 bytes"));
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// Sequential meta output that keeps block 0 in memory until it is complete, so the
/// superblock checksum (which covers the rest of block 0) can be filled in.
struct MetaOut<'a> {
    w: std::io::BufWriter<&'a mut dyn Write>,
    pos: u64,
    block0: Option<Vec<u8>>,
}

impl<'a> MetaOut<'a> {
    fn new(w: &'a mut dyn Write) -> Self {
        MetaOut {
            w: std::io::BufWriter::with_capacity(1 << 20, w),
            pos: 0,
            block0: Some(Vec::with_capacity(BS as usize)),
        }
    }

    fn write(&mut self, mut data: &[u8]) -> Result<()> {
        if let Some(b0) = self.block0.as_mut() {
            let take = data.len().min(BS as usize - b0.len());
            b0.extend_from_slice(&data[..take]);
            self.pos += take as u64;
            data = &data[take..];
            if b0.len() == BS as usize {
                let mut b0 = self.block0.take().expect("present");
                let so = SUPER_OFFSET as usize;
                put32(&mut b0, so + 4, 0);
                let crc = superblock_checksum(&b0[so..]);
                put32(&mut b0, so + 4, crc);
                self.w
                    .write_all(&b0)
                    .map_err(|e| Error::io("write meta image", e))?;
            }
        }
        if !data.is_empty() {
            self.w
                .write_all(data)
                .map_err(|e| Error::io("write meta image", e))?;
            self.pos += data.len() as u64;
        }
        Ok(())
    }

    fn pad_to(&mut self, target: u64) -> Result<()> {
        const ZEROS: [u8; 4096] = [0; 4096];
        if target < self.pos {
            return Err(Error::Invalid(format!(
                "internal layout error: offset {target} already passed ({})",
                self.pos
            )));
        }
        while self.pos < target {
            let n = (target - self.pos).min(ZEROS.len() as u64) as usize;
            self.write(&ZEROS[..n])?;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<()> {
        self.w.flush().map_err(|e| Error::io("write meta image", e))
    }
}
