//! Merges N meta images into one that shows exactly what kernel overlayfs shows for
//! `lowerdir=newest:...:oldest`, referencing the original blobs as extra devices (no file
//! data is read or copied).
//!
//! Resolution follows overlayfs lookup: for each name the newest layer that has it decides;
//! a whiteout (char 0/0) hides the name; a non-directory hides everything below; directories
//! merge downwards until a layer whose directory is opaque (`trusted.overlay.opaque=y`, that
//! layer still included), or a layer where the name is a whiteout or a non-directory (not
//! included). The merged directory takes the attributes of the newest one.
//!
//! With [`MergeMode::KeepOverlay`] the result is meant to sit above older layers: whiteouts
//! that win are kept, and a merged directory is marked opaque when its merge stopped inside
//! the merged set (any opaque member, or a whiteout / non-directory below), so nothing from
//! older layers can leak into it: the regression of SPEC problem 1. With
//! [`MergeMode::StripOverlay`] nothing is below: whiteouts are dropped and `trusted.overlay.*`
//! xattrs removed, except spinfs's per-inode records (`trusted.overlay.spinfs.*`) and escaped
//! user xattrs (`trusted.overlay.overlay.*`).

use crate::error::{Error, Result, corrupt};
use crate::io::ReadAt;
use crate::reader::{DirEntry, FileType, Image, Inode};
use crate::tree::{
    Chunk, FileData, Metadata, Node, NodeId, NodeKind, OVERLAY_OPAQUE_XATTR, SPINFS_INO_XATTR,
    SPINFS_REALDEV_XATTR, Tree,
};
use crate::writer::{DeviceSpec, WriteOptions, WriteSummary, write_image};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;

/// Whether older layers remain below the merged set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeMode {
    /// Older layers remain below: keep whiteouts and opaque markers.
    KeepOverlay,
    /// The merge reaches the bottom: drop whiteouts and overlay xattrs.
    StripOverlay,
}

/// One device of the merged image and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedDevice {
    /// Index of the input image (0 = newest).
    pub layer: usize,
    /// Device id within that image (1 = its first blob).
    pub layer_device: u16,
    pub tag: Vec<u8>,
    pub blocks: u64,
}

/// The result of a merge.
#[derive(Debug, Clone)]
pub struct MergeSummary {
    /// The merged image's devices in order: device 1 is `devices[0]`. Mount with one
    /// `device=` per entry, in this order.
    pub devices: Vec<MergedDevice>,
    pub write: WriteSummary,
}

/// Merges `layers` (index 0 = newest) into a tree plus its device list.
pub fn merge_tree<R: ReadAt>(
    layers: &[Image<R>],
    mode: MergeMode,
) -> Result<(Tree, Vec<MergedDevice>)> {
    if layers.is_empty() {
        return Err(Error::Invalid("nothing to merge".into()));
    }
    let mut devices = Vec::new();
    let mut dev_base = Vec::with_capacity(layers.len());
    for (i, img) in layers.iter().enumerate() {
        dev_base.push(devices.len() as u16);
        for (d, info) in img.devices().iter().enumerate() {
            devices.push(MergedDevice {
                layer: i,
                layer_device: d as u16 + 1,
                tag: info.tag.clone(),
                blocks: info.blocks as u64,
            });
        }
    }
    if devices.len() > u16::MAX as usize {
        return Err(Error::Invalid(
            "merged image would have more than 65535 devices".into(),
        ));
    }
    let mut m = Merger {
        layers,
        mode,
        dev_base,
        devices,
        links: HashMap::new(),
        seen_dirs: HashSet::new(),
    };

    // overlayfs always merges the layer roots: an opaque marker on a root is ignored.
    let mut chain = Vec::new();
    for (i, img) in layers.iter().enumerate() {
        let root = img.root()?;
        chain.push(Member {
            layer: i,
            dir: root.clone(),
            parent: root.nid,
        });
    }
    let stopped = false;
    let root_meta = m.dir_meta(&chain[0], stopped)?;
    let mut tree = Tree::new(root_meta);
    let mut work: Vec<(NodeId, Vec<Member>, bool)> = vec![(tree.root(), chain, stopped)];
    while let Some((out, chain, out_opaque)) = work.pop() {
        for member in &chain {
            if !m.seen_dirs.insert((member.layer, member.dir.nid)) {
                return corrupt(format!(
                    "layer {}: directory {} reached twice (cycle)",
                    member.layer, member.dir.nid
                ));
            }
        }
        let mut names: BTreeMap<Vec<u8>, Vec<(usize, DirEntry, u64)>> = BTreeMap::new();
        for member in &chain {
            let img = &layers[member.layer];
            let (entries, dotdot) = img.dir_entries(&member.dir)?;
            if dotdot != member.parent {
                return corrupt(format!(
                    "layer {}: directory {} has a wrong '..'",
                    member.layer, member.dir.nid
                ));
            }
            for e in entries {
                let parent = member.dir.nid;
                names
                    .entry(e.name.clone())
                    .or_default()
                    .push((member.layer, e, parent));
            }
        }
        for (name, cands) in names {
            let (layer, ref top_entry, parent_nid) = cands[0];
            let top = m.inode(layer, top_entry)?;
            if m.is_whiteout(layer, &top)? {
                // Inside an opaque directory a whiteout hides nothing: drop it.
                if mode == MergeMode::KeepOverlay && !out_opaque {
                    m.add_leaf(&mut tree, out, name, layer, &top)?;
                }
                continue;
            }
            if !top.is_dir() {
                m.add_leaf(&mut tree, out, name, layer, &top)?;
                continue;
            }
            let mut stopped = m.is_opaque(layer, &top)?;
            let mut sub = vec![Member {
                layer,
                dir: top,
                parent: parent_nid,
            }];
            if !stopped {
                for (l, e, p) in &cands[1..] {
                    let ino = m.inode(*l, e)?;
                    if !ino.is_dir() {
                        // A whiteout or non-directory below ends the merge there.
                        stopped = true;
                        break;
                    }
                    let opaque = m.is_opaque(*l, &ino)?;
                    sub.push(Member {
                        layer: *l,
                        dir: ino,
                        parent: *p,
                    });
                    if opaque {
                        stopped = true;
                        break;
                    }
                }
            }
            let meta = m.dir_meta(&sub[0], stopped)?;
            let id = tree.add(
                out,
                name,
                Node {
                    meta,
                    kind: NodeKind::Dir(Vec::new()),
                },
            );
            work.push((id, sub, stopped));
        }
    }
    Ok((tree, m.devices))
}

/// Merges `layers` (index 0 = newest) and writes the merged meta image to `out`.
/// `opts.devices` is replaced by the merged device list.
pub fn merge_images<R: ReadAt>(
    layers: &[Image<R>],
    mode: MergeMode,
    opts: &WriteOptions,
    out: &mut dyn Write,
) -> Result<MergeSummary> {
    let (tree, devices) = merge_tree(layers, mode)?;
    let mut opts = opts.clone();
    opts.devices = devices
        .iter()
        .map(|d| DeviceSpec {
            tag: d.tag.clone(),
            blocks: d.blocks,
        })
        .collect();
    let write = write_image(&tree, &opts, out, None)?;
    Ok(MergeSummary { devices, write })
}

struct Member {
    layer: usize,
    dir: Inode,
    /// nid of this directory's parent in the same layer (what its ".." must name).
    parent: u64,
}

struct Merger<'a, R> {
    layers: &'a [Image<R>],
    mode: MergeMode,
    dev_base: Vec<u16>,
    devices: Vec<MergedDevice>,
    links: HashMap<(usize, u64), NodeId>,
    seen_dirs: HashSet<(usize, u64)>,
}

impl<R: ReadAt> Merger<'_, R> {
    fn inode(&self, layer: usize, e: &DirEntry) -> Result<Inode> {
        let ino = self.layers[layer].inode(e.nid)?;
        if ino.file_type != e.file_type {
            return corrupt(format!(
                "layer {layer}: entry {:?} type disagrees with its inode",
                String::from_utf8_lossy(&e.name)
            ));
        }
        Ok(ino)
    }

    fn is_opaque(&self, layer: usize, dir: &Inode) -> Result<bool> {
        Ok(self.layers[layer]
            .xattr(dir, OVERLAY_OPAQUE_XATTR)?
            .is_some_and(|v| v == b"y"))
    }

    /// A whiteout: a character device 0/0 not marked as a real device node.
    fn is_whiteout(&self, layer: usize, ino: &Inode) -> Result<bool> {
        Ok(ino.is_whiteout()
            && self.layers[layer]
                .xattr(ino, SPINFS_REALDEV_XATTR)?
                .is_none())
    }

    fn meta(&self, layer: usize, ino: &Inode) -> Result<Metadata> {
        let img = &self.layers[layer];
        let mut xattrs = img.raw_xattrs(ino)?;
        let mut spinfs_ino = 0;
        xattrs.retain(|(n, v)| {
            if n.as_slice() == SPINFS_INO_XATTR {
                if let Ok(a) = <[u8; 8]>::try_from(v.as_slice()) {
                    spinfs_ino = u64::from_le_bytes(a);
                }
                return false;
            }
            true
        });
        if self.mode == MergeMode::StripOverlay {
            // Overlay's own markers go; spinfs's per-inode records (`trusted.overlay.spinfs.*`:
            // ctime, real-device marks) and escaped user xattrs (`trusted.overlay.overlay.*`,
            // a user's `trusted.overlay.X`) are the inode's, not the overlay's, and stay.
            xattrs.retain(|(n, _)| {
                !n.starts_with(b"trusted.overlay.")
                    || n.starts_with(b"trusted.overlay.spinfs.")
                    || n.starts_with(b"trusted.overlay.overlay.")
            });
        }
        Ok(Metadata {
            ino: spinfs_ino,
            perm: ino.mode & 0o7777,
            uid: ino.uid,
            gid: ino.gid,
            mtime: ino.mtime,
            mtime_nsec: ino.mtime_nsec,
            xattrs,
        })
    }

    fn dir_meta(&self, top: &Member, opaque: bool) -> Result<Metadata> {
        let mut meta = self.meta(top.layer, &top.dir)?;
        meta.xattrs
            .retain(|(n, _)| n.as_slice() != OVERLAY_OPAQUE_XATTR);
        if opaque && self.mode == MergeMode::KeepOverlay {
            meta.xattrs
                .push((OVERLAY_OPAQUE_XATTR.to_vec(), b"y".to_vec()));
        }
        Ok(meta)
    }

    fn add_leaf(
        &mut self,
        tree: &mut Tree,
        dir: NodeId,
        name: Vec<u8>,
        layer: usize,
        ino: &Inode,
    ) -> Result<()> {
        // Only inodes with several names can be met again.
        let linked = ino.nlink > 1;
        if linked && let Some(&id) = self.links.get(&(layer, ino.nid)) {
            tree.link(dir, name, id);
            return Ok(());
        }
        let img = &self.layers[layer];
        let kind = match ino.file_type {
            FileType::File => NodeKind::File(self.file(layer, ino)?),
            FileType::Symlink => NodeKind::Symlink(img.readlink(ino)?),
            FileType::CharDev => NodeKind::CharDev(ino.rdev),
            FileType::BlockDev => NodeKind::BlockDev(ino.rdev),
            FileType::Fifo => NodeKind::Fifo,
            FileType::Socket => NodeKind::Socket,
            FileType::Dir => return corrupt("directory handled as a leaf"),
        };
        let meta = self.meta(layer, ino)?;
        let id = tree.add(dir, name, Node { meta, kind });
        if linked {
            self.links.insert((layer, ino.nid), id);
        }
        Ok(())
    }

    fn file(&mut self, layer: usize, ino: &Inode) -> Result<FileData> {
        let img = &self.layers[layer];
        if ino.size == 0 {
            return Ok(FileData {
                size: 0,
                chunk_bits: None,
                chunks: Some(Vec::new()),
                source: None,
            });
        }
        let Some(_) = ino.chunk_bits(img.block_bits()) else {
            return Err(Error::Unsupported(format!(
                "layer {layer}: inode {} keeps its data inside the meta image; only chunk-based \
                 files can be merged without copying",
                ino.nid
            )));
        };
        if img.block_bits() != crate::writer::BLOCK_BITS {
            return Err(Error::Unsupported(format!(
                "layer {layer}: block size {} (only 4096 can be merged)",
                img.block_size()
            )));
        }
        let (bits, table) = img.chunk_table(ino)?;
        let cs = 1u64 << bits;
        let mut chunks = Vec::with_capacity(table.len());
        for (i, r) in table.into_iter().enumerate() {
            chunks.push(match r {
                None => Chunk::Hole,
                Some((0, _)) => {
                    return Err(Error::Unsupported(format!(
                        "layer {layer}: inode {} has chunks inside the meta image",
                        ino.nid
                    )));
                }
                Some((d, block)) => {
                    let device = self.dev_base[layer] + d;
                    let len = cs.min(ino.size - i as u64 * cs);
                    let end = block + len.div_ceil(img.block_size());
                    // Older mkfs.erofs leaves device sizes at 0: learn them from use.
                    let slot = &mut self.devices[device as usize - 1];
                    slot.blocks = slot.blocks.max(end);
                    Chunk::Existing { device, block }
                }
            });
        }
        Ok(FileData {
            size: ino.size,
            chunk_bits: Some(bits),
            chunks: Some(chunks),
            source: None,
        })
    }
}
