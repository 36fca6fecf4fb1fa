//! The in-memory description of a filesystem tree that the writer turns into an image.
//!
//! A [`Tree`] is a graph of [`Node`]s: directories list `(name, NodeId)` entries and a
//! non-directory reached by several entries is one inode with several hard links. The store
//! builds one directly from its own metadata (no staging copy); [`crate::fromdir`] builds one
//! from a directory on disk; the merge builds one from images.

use crate::io::ReadAt;
use std::path::PathBuf;
use std::sync::Arc;

/// Index of a node in its [`Tree`].
pub type NodeId = u32;

/// Name of the xattr that carries the persistent 64-bit spinfs inode number.
pub const SPINFS_INO_XATTR: &[u8] = b"trusted.overlay.spinfs.ino";
/// Name of the overlayfs opaque-directory marker.
pub const OVERLAY_OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";
/// Marks a character device 0/0 that is a real device node of the user's, not an overlay
/// whiteout (spinfs's convention; merges keep such a node like any other).
pub const SPINFS_REALDEV_XATTR: &[u8] = b"trusted.overlay.spinfs.realdev";

/// Attributes shared by every kind of inode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    /// Persistent spinfs inode number (0 = none). Stored as the 8-byte little-endian xattr
    /// `trusted.overlay.spinfs.ino`, which the reader returns here and hides from the xattr list.
    pub ino: u64,
    /// Permission bits including setuid/setgid/sticky (`0o7777`); the type comes from the kind.
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch (may be negative).
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Extended attributes as full names (`user.x`, `trusted.overlay.opaque`,
    /// `security.selinux`, `system.posix_acl_access`, ...) and raw values.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Where the bytes of a regular file come from when they must be streamed into the blob.
#[derive(Clone)]
pub enum Source {
    /// A file on disk, opened when its turn comes; holes found with `SEEK_DATA`.
    Path(PathBuf),
    /// Any random-access reader (the store's SSD file, a buffer, ...).
    Reader(Arc<dyn ReadAt>),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Path(p) => write!(f, "Path({})", p.display()),
            Source::Reader(_) => write!(f, "Reader(..)"),
        }
    }
}

/// One chunk of a regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Unallocated: reads as zeros, stores nothing.
    Hole,
    /// Streamed from the file's [`Source`] into the new blob (all-zero chunks become holes).
    New,
    /// Already stored: block `block` of device `device` (1 = first blob device of the image
    /// being written, in the order of [`crate::WriteOptions::devices`]).
    Existing { device: u16, block: u64 },
}

/// A regular file.
#[derive(Debug, Clone)]
pub struct FileData {
    pub size: u64,
    /// log2 of the chunk size for this file; `None` = the image default.
    pub chunk_bits: Option<u8>,
    /// Per-chunk plan, `ceil(size / chunk size)` entries; `None` = every chunk is `New`.
    pub chunks: Option<Vec<Chunk>>,
    /// Needed when some chunk is `New`.
    pub source: Option<Source>,
}

/// What kind of inode a node is, with its kind-specific payload.
#[derive(Debug, Clone)]
pub enum NodeKind {
    Dir(Vec<(Vec<u8>, NodeId)>),
    File(FileData),
    Symlink(Vec<u8>),
    /// Character device with a glibc `dev_t`. `CharDev(0)` is an overlayfs whiteout.
    CharDev(u64),
    BlockDev(u64),
    Fifo,
    Socket,
}

/// One inode of the tree.
#[derive(Debug, Clone)]
pub struct Node {
    pub meta: Metadata,
    pub kind: NodeKind,
}

impl Node {
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, NodeKind::Dir(_))
    }
}

/// A filesystem tree to write. Node 0 is the root directory.
#[derive(Debug, Clone)]
pub struct Tree {
    nodes: Vec<Node>,
}

impl Tree {
    /// A tree holding only a root directory with `meta`.
    pub fn new(meta: Metadata) -> Tree {
        Tree {
            nodes: vec![Node {
                meta,
                kind: NodeKind::Dir(Vec::new()),
            }],
        }
    }

    pub fn root(&self) -> NodeId {
        0
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }

    /// The node `id`, if it exists.
    pub fn get(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id as usize)
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id as usize]
    }

    /// Creates `node` and links it as `name` in directory `parent`. Names are validated when
    /// the image is written.
    ///
    /// # Panics
    /// If `parent` is not a directory node of this tree (a programming error of the caller).
    pub fn add(&mut self, parent: NodeId, name: impl Into<Vec<u8>>, node: Node) -> NodeId {
        let id = NodeId::try_from(self.nodes.len()).expect("more than 2^32 nodes");
        self.nodes.push(node);
        self.link(parent, name, id);
        id
    }

    /// Adds one more name for an existing node (a hard link when `target` is not a directory).
    ///
    /// # Panics
    /// If `parent` is not a directory node of this tree.
    pub fn link(&mut self, parent: NodeId, name: impl Into<Vec<u8>>, target: NodeId) {
        match &mut self.nodes[parent as usize].kind {
            NodeKind::Dir(entries) => entries.push((name.into(), target)),
            _ => panic!("Tree::link: node {parent} is not a directory"),
        }
    }
}

/// Splits a full xattr name into the EROFS name index and suffix.
pub(crate) fn xattr_index(name: &[u8]) -> Option<(u8, &[u8])> {
    const PREFIXES: [(&[u8], u8); 4] = [
        (b"user.", 1),
        (b"trusted.", 4),
        (b"security.", 6),
        (b"lustre.", 5),
    ];
    if name == b"system.posix_acl_access" {
        return Some((2, b""));
    }
    if name == b"system.posix_acl_default" {
        return Some((3, b""));
    }
    for (prefix, index) in PREFIXES {
        if let Some(suffix) = name.strip_prefix(prefix) {
            return Some((index, suffix));
        }
    }
    None
}

/// The full-name prefix of an EROFS xattr name index.
pub(crate) fn xattr_prefix(index: u8) -> Option<&'static [u8]> {
    Some(match index {
        1 => b"user.",
        2 => b"system.posix_acl_access",
        3 => b"system.posix_acl_default",
        4 => b"trusted.",
        5 => b"lustre.",
        6 => b"security.",
        _ => return None,
    })
}
