//! Randomized differential test through the real mount.
//!
//! A seeded generator produces sequences of operations over a small namespace (three names,
//! depth up to three, so names collide and get reused): writes at random offsets, appends,
//! truncates, unlink, mkdir, rmdir, renames (plain, RENAME_NOREPLACE, RENAME_EXCHANGE), symlinks,
//! hard links, chmod, user xattrs, descriptors held open across steps (pwrite through them,
//! unlinked files living on), and, interleaved at random points, forced seals
//! (`spinfs archive --wait`), forced merges (`spinfs merge --wait`) and remounts (which close
//! the held descriptors). Writes reach up to ~500 KiB per file against a 1 MiB archive
//! threshold and 64 KiB chunks, so threshold seals can also start in the background.
//!
//! The reference is an in-memory model of POSIX semantics with inode identity. Every operation
//! runs on the spinfs mount and on a plain directory on the test disk (ext4); the errno of
//! each must match the model's expectation, and after every step the visible tree of both must
//! match the model: names, types, modes, sizes and contents of regular files, symlink targets,
//! user xattrs, nlink of regular files, readdir d_ino == st_ino, names the model calls hard
//! links share one st_ino, and a model node keeps its st_ino across seals, merges and
//! remounts; held descriptors are checked by fstat and pread. A disagreement between the
//! model and ext4 is a model bug and reported as such. Each sequence also ends with a remount
//! and a last comparison. A failing sequence is minimised (steps dropped while it still
//! fails) and printed in both forms as `SPINFS_DIFF_REPLAY='...'`.
//!
//! The second reference is the kernel: at every seal, merge and remount step and at the end of
//! each sequence (not after every step: it costs an overlayfs mount and a walk, and between
//! those steps only the writable tree changes, which the model covers), the mount is compared
//! with kernel overlayfs, mounted read-only over the store's own layers: the writable
//! generation's SSD tree (`STORE/gens/G/tree`, which uses the overlayfs conventions) on top,
//! then every archived layer exported with `spinfs export` and mounted by the kernel's erofs
//! (file-backed, `device=` per blob in the layer's device order), newest first. Compared:
//! names, types, modes, sizes and contents of regular files, nlink of regular files, symlink
//! targets, every xattr listed (names and values, the root's too) and hard-link groups (the
//! sets of names sharing an inode). A generation frozen for sealing is in neither the tree nor
//! a layer, so the comparison waits until no seal runs, and looks again when a background
//! seal or merge changed the layers while it looked. Known differences, handled: the spinfs
//! xattrs (`trusted.overlay.spinfs.*`) and markers are hidden by both sides; kernel overlayfs
//! cannot show a user's char 0/0 device (spinfs keeps one apart from a whiteout with a marker
//! xattr), and the generator makes no device nodes at all; inode numbers differ by design
//! (overlayfs numbers per layer), so identity is compared as hard-link groups. Stacked files
//! (file stacking: a sparse upper file plus the chunk map `trusted.overlay.spinfs.stack`, in a
//! sidecar file for odd seeds)
//! mean nothing to kernel overlayfs, which shows the sparse upper file: for every regular file
//! of the tree carrying a map, the oracle rebuilds the expected content without spinfs's read
//! path — below chunks from the lower file the map names, read through a second read-only
//! kernel overlayfs of the archived layers alone (the namespace below the tree), with zeros
//! past the map's limit and the lower file's end; every other byte from the upper file — and
//! compares that (names, types, modes, xattrs, nlink and link groups as for any file).
//!
//! Not compared (known limitations): st_size and nlink of directories, atime/ctime/mtime.
//!
//! Environment:
//! - `SPINFS_DIFF_SEQUENCES` (default 150), `SPINFS_DIFF_OPS` (default 40 per sequence),
//!   `SPINFS_DIFF_SEED` (first seed, default 1; sequence i uses seed + i).
//! - `SPINFS_DIFF_REPLAY='...'`: run exactly this step list (printed on failure) instead.
//! - `SPINFS_DIFF_NO_SHRINK=1`: report a failure without minimising it.
//! - `SPINFS_DIFF_NO_LINKS=1`: generate no hard links (a debugging aid only).
//! - `SPINFS_DIFF_ORACLE_EVERY` (default 1): the kernel overlayfs comparison runs on the
//!   sequences whose seed is a multiple of it; `SPINFS_DIFF_NO_ORACLE=1` turns it off (also in
//!   replays, where it is on by default).
//!
//! Step syntax (`;`-separated): `w:PATH:OFF:LEN:SEED` write (O_CREAT), `a:PATH:LEN:SEED`
//! append, `t:PATH:LEN` truncate(2), `u:PATH` unlink, `m:PATH` mkdir, `r:PATH` rmdir,
//! `n:FROM:TO:FLAGS` renameat2 (1 NOREPLACE, 2 EXCHANGE), `s:TARGET:PATH` symlink,
//! `l:FROM:TO` link, `c:PATH:OCTAL` chmod, `x:PATH:NAME:SEED` lsetxattr, `X:PATH:NAME`
//! lremovexattr, `o:SLOT:PATH` open O_RDWR into a slot, `f:SLOT:OFF:LEN:SEED` pwrite through
//! it, `k:SLOT` close, `S` seal, `M` merge, `R` remount. `scripts/diff-soak.sh` runs many more.

mod common;

use common::*;
use spinfs_store::stackmap::{MAPS_DIR, STACK_XATTR, StackMap, Stored};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::CString;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MKFS: &[&str] = &[
    "--container-size",
    "32M",
    "--object-size",
    "64K",
    "--chunk-size",
    "64K",
    "--archive-threshold",
    "1M",
    "--merge-fanin",
    "2",
];

/// The kernel-overlayfs oracle runs on every ORACLE_EVERY-th sequence (seed divisible by it).
const ORACLE_EVERY: u64 = 1;

const NAMES: &[&str] = &["a", "b", "c"];
const XNAMES: &[&str] = &["user.x", "user.y"];
const MODES: &[u32] = &[0o755, 0o700, 0o644, 0o600, 0o444, 0o751];
const UMASK: u32 = 0o022;

// ---------------------------------------------------------------------------------------------
// Operations and their replayable text form

#[derive(Clone, Debug, PartialEq)]
enum Op {
    Write {
        p: String,
        off: u64,
        len: u64,
        seed: u64,
    },
    Append {
        p: String,
        len: u64,
        seed: u64,
    },
    Trunc {
        p: String,
        len: u64,
    },
    Unlink {
        p: String,
    },
    Mkdir {
        p: String,
    },
    Rmdir {
        p: String,
    },
    /// flags: 0, RENAME_NOREPLACE (1) or RENAME_EXCHANGE (2)
    Rename {
        a: String,
        b: String,
        flags: u32,
    },
    Symlink {
        target: String,
        p: String,
    },
    Link {
        a: String,
        b: String,
    },
    Chmod {
        p: String,
        mode: u32,
    },
    SetX {
        p: String,
        name: String,
        seed: u64,
    },
    RmX {
        p: String,
        name: String,
    },
    /// Open `p` read-write (no create) and keep the descriptor in `slot` (closing what it held).
    Open {
        slot: usize,
        p: String,
    },
    /// pwrite through the descriptor held in `slot`.
    FdWrite {
        slot: usize,
        off: u64,
        len: u64,
        seed: u64,
    },
    /// Close the descriptor held in `slot`.
    Close {
        slot: usize,
    },
    Seal,
    Merge,
    /// Closes every held descriptor, unmounts and mounts again.
    Remount,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Op::Write { p, off, len, seed } => write!(f, "w:{p}:{off}:{len}:{seed}"),
            Op::Append { p, len, seed } => write!(f, "a:{p}:{len}:{seed}"),
            Op::Trunc { p, len } => write!(f, "t:{p}:{len}"),
            Op::Unlink { p } => write!(f, "u:{p}"),
            Op::Mkdir { p } => write!(f, "m:{p}"),
            Op::Rmdir { p } => write!(f, "r:{p}"),
            Op::Rename { a, b, flags } => write!(f, "n:{a}:{b}:{flags}"),
            Op::Symlink { target, p } => write!(f, "s:{target}:{p}"),
            Op::Link { a, b } => write!(f, "l:{a}:{b}"),
            Op::Chmod { p, mode } => write!(f, "c:{p}:{mode:o}"),
            Op::SetX { p, name, seed } => write!(f, "x:{p}:{name}:{seed}"),
            Op::RmX { p, name } => write!(f, "X:{p}:{name}"),
            Op::Open { slot, p } => write!(f, "o:{slot}:{p}"),
            Op::FdWrite {
                slot,
                off,
                len,
                seed,
            } => write!(f, "f:{slot}:{off}:{len}:{seed}"),
            Op::Close { slot } => write!(f, "k:{slot}"),
            Op::Seal => write!(f, "S"),
            Op::Merge => write!(f, "M"),
            Op::Remount => write!(f, "R"),
        }
    }
}

fn parse_op(s: &str) -> Op {
    let f: Vec<&str> = s.split(':').collect();
    let n = |i: usize| -> u64 { f[i].parse().unwrap_or_else(|_| panic!("bad step {s:?}")) };
    let st = |i: usize| f[i].to_string();
    match f[0] {
        "w" => Op::Write {
            p: st(1),
            off: n(2),
            len: n(3),
            seed: n(4),
        },
        "a" => Op::Append {
            p: st(1),
            len: n(2),
            seed: n(3),
        },
        "t" => Op::Trunc {
            p: st(1),
            len: n(2),
        },
        "u" => Op::Unlink { p: st(1) },
        "m" => Op::Mkdir { p: st(1) },
        "r" => Op::Rmdir { p: st(1) },
        "n" => Op::Rename {
            a: st(1),
            b: st(2),
            flags: n(3) as u32,
        },
        "s" => Op::Symlink {
            target: st(1),
            p: st(2),
        },
        "l" => Op::Link { a: st(1), b: st(2) },
        "c" => Op::Chmod {
            p: st(1),
            mode: u32::from_str_radix(f[2], 8).unwrap(),
        },
        "x" => Op::SetX {
            p: st(1),
            name: st(2),
            seed: n(3),
        },
        "X" => Op::RmX {
            p: st(1),
            name: st(2),
        },
        "o" => Op::Open {
            slot: n(1) as usize,
            p: st(2),
        },
        "f" => Op::FdWrite {
            slot: n(1) as usize,
            off: n(2),
            len: n(3),
            seed: n(4),
        },
        "k" => Op::Close {
            slot: n(1) as usize,
        },
        "S" => Op::Seal,
        "M" => Op::Merge,
        "R" => Op::Remount,
        _ => panic!("bad step {s:?}"),
    }
}

fn format_ops(ops: &[Op]) -> String {
    ops.iter()
        .map(|o| o.to_string())
        .collect::<Vec<_>>()
        .join(";")
}

fn parse_ops(s: &str) -> Vec<Op> {
    s.split(';')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(parse_op)
        .collect()
}

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x2545F4914F6CDD1D) ^ 0x9E3779B97F4A7C15 | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
}

// ---------------------------------------------------------------------------------------------
// The model

#[derive(Clone, Debug)]
enum Kind {
    File(Vec<u8>),
    Dir(BTreeMap<String, usize>),
    Symlink(String),
}

#[derive(Clone, Debug)]
struct Node {
    kind: Kind,
    mode: u32,
    nlink: u32,
    xattrs: BTreeMap<String, Vec<u8>>,
}

struct Model {
    nodes: HashMap<usize, Node>,
    next: usize,
    /// Nodes held open by descriptor slots (an unlinked file lives on while open).
    slots: [Option<usize>; SLOTS],
}

const SLOTS: usize = 2;

type Errno = i32;

/// Where a path leads: the chain of directories from the root to its parent, its name and
/// the node it names, if any.
struct Resolved {
    chain: Vec<usize>,
    name: String,
    child: Option<usize>,
}

impl Resolved {
    fn parent(&self) -> usize {
        *self.chain.last().unwrap()
    }
}

impl Model {
    fn new() -> Model {
        let mut nodes = HashMap::new();
        nodes.insert(
            0,
            Node {
                kind: Kind::Dir(BTreeMap::new()),
                mode: 0o755,
                nlink: 1,
                xattrs: BTreeMap::new(),
            },
        );
        Model {
            nodes,
            next: 1,
            slots: [None; SLOTS],
        }
    }

    fn children(&self, dir: usize) -> &BTreeMap<String, usize> {
        match &self.nodes[&dir].kind {
            Kind::Dir(c) => c,
            _ => unreachable!(),
        }
    }

    fn children_mut(&mut self, dir: usize) -> &mut BTreeMap<String, usize> {
        match &mut self.nodes.get_mut(&dir).unwrap().kind {
            Kind::Dir(c) => c,
            _ => unreachable!(),
        }
    }

    fn is_dir(&self, id: usize) -> bool {
        matches!(self.nodes[&id].kind, Kind::Dir(_))
    }

    /// Walks all but the last component: ENOENT for a missing one or a (dangling) symlink,
    /// ENOTDIR for a non-directory.
    fn resolve(&self, path: &str) -> Result<Resolved, Errno> {
        let comps: Vec<&str> = path.split('/').collect();
        let mut chain = vec![0];
        for c in &comps[..comps.len() - 1] {
            let cur = *chain.last().unwrap();
            match self.children(cur).get(*c) {
                None => return Err(libc::ENOENT),
                Some(&id) => match self.nodes[&id].kind {
                    Kind::Dir(_) => chain.push(id),
                    Kind::File(_) => return Err(libc::ENOTDIR),
                    // Symlink targets never exist: following one ends in ENOENT.
                    Kind::Symlink(_) => return Err(libc::ENOENT),
                },
            }
        }
        let name = comps.last().unwrap().to_string();
        let child = self.children(*chain.last().unwrap()).get(&name).copied();
        Ok(Resolved { chain, name, child })
    }

    fn add(&mut self, kind: Kind, mode: u32) -> usize {
        let id = self.next;
        self.next += 1;
        self.nodes.insert(
            id,
            Node {
                kind,
                mode,
                nlink: 1,
                xattrs: BTreeMap::new(),
            },
        );
        id
    }

    /// Removes the name `name` from `dir` (a non-directory loses a link, a directory goes).
    fn drop_name(&mut self, dir: usize, name: &str) {
        let id = self.children_mut(dir).remove(name).unwrap();
        let n = self.nodes.get_mut(&id).unwrap();
        n.nlink -= 1;
        if (n.nlink == 0 && !self.slots.contains(&Some(id))) || matches!(n.kind, Kind::Dir(_)) {
            self.nodes.remove(&id);
        }
    }

    fn close(&mut self, slot: usize) -> Result<(), Errno> {
        let id = self.slots[slot].take().ok_or(libc::EBADF)?;
        if self.nodes[&id].nlink == 0 && !self.slots.contains(&Some(id)) {
            self.nodes.remove(&id);
        }
        Ok(())
    }

    fn file_mut(&mut self, id: usize) -> &mut Vec<u8> {
        match &mut self.nodes.get_mut(&id).unwrap().kind {
            Kind::File(d) => d,
            _ => unreachable!(),
        }
    }

    fn apply(&mut self, op: &Op) -> Result<(), Errno> {
        match op {
            Op::Write { p, off, len, seed } => {
                let r = self.resolve(p)?;
                let id = match r.child {
                    None => {
                        let id = self.add(Kind::File(Vec::new()), 0o644 & !UMASK);
                        self.children_mut(r.parent()).insert(r.name.clone(), id);
                        id
                    }
                    Some(id) => match self.nodes[&id].kind {
                        Kind::Dir(_) => return Err(libc::EISDIR),
                        Kind::Symlink(_) => return Err(libc::ELOOP),
                        Kind::File(_) => id,
                    },
                };
                let (off, len) = (*off as usize, *len as usize);
                let d = self.file_mut(id);
                if d.len() < off + len {
                    d.resize(off + len, 0);
                }
                d[off..off + len].copy_from_slice(&data(*seed, len));
                Ok(())
            }
            Op::Append { p, len, seed } => {
                let id = self.resolve(p)?.child.ok_or(libc::ENOENT)?;
                match self.nodes[&id].kind {
                    Kind::Dir(_) => Err(libc::EISDIR),
                    Kind::Symlink(_) => Err(libc::ELOOP),
                    Kind::File(_) => {
                        self.file_mut(id)
                            .extend_from_slice(&data(*seed, *len as usize));
                        Ok(())
                    }
                }
            }
            Op::Trunc { p, len } => {
                let id = self.resolve(p)?.child.ok_or(libc::ENOENT)?;
                match self.nodes[&id].kind {
                    Kind::Dir(_) => Err(libc::EISDIR),
                    Kind::Symlink(_) => Err(libc::ENOENT), // truncate(2) follows: dangling
                    Kind::File(_) => {
                        self.file_mut(id).resize(*len as usize, 0);
                        Ok(())
                    }
                }
            }
            Op::Unlink { p } => {
                let r = self.resolve(p)?;
                let id = r.child.ok_or(libc::ENOENT)?;
                if self.is_dir(id) {
                    return Err(libc::EISDIR);
                }
                self.drop_name(r.parent(), &r.name);
                Ok(())
            }
            Op::Mkdir { p } => {
                let r = self.resolve(p)?;
                if r.child.is_some() {
                    return Err(libc::EEXIST);
                }
                let id = self.add(Kind::Dir(BTreeMap::new()), 0o755 & !UMASK);
                self.children_mut(r.parent()).insert(r.name, id);
                Ok(())
            }
            Op::Rmdir { p } => {
                let r = self.resolve(p)?;
                let id = r.child.ok_or(libc::ENOENT)?;
                if !self.is_dir(id) {
                    return Err(libc::ENOTDIR);
                }
                if !self.children(id).is_empty() {
                    return Err(libc::ENOTEMPTY);
                }
                self.drop_name(r.parent(), &r.name);
                Ok(())
            }
            Op::Symlink { target, p } => {
                let r = self.resolve(p)?;
                if r.child.is_some() {
                    return Err(libc::EEXIST);
                }
                let id = self.add(Kind::Symlink(target.clone()), 0o777);
                self.children_mut(r.parent()).insert(r.name, id);
                Ok(())
            }
            Op::Link { a, b } => {
                let old = self.resolve(a)?.child.ok_or(libc::ENOENT)?;
                let r = self.resolve(b)?;
                if r.child.is_some() {
                    return Err(libc::EEXIST);
                }
                if self.is_dir(old) {
                    return Err(libc::EPERM);
                }
                self.nodes.get_mut(&old).unwrap().nlink += 1;
                self.children_mut(r.parent()).insert(r.name, old);
                Ok(())
            }
            Op::Chmod { p, mode } => {
                let id = self.resolve(p)?.child.ok_or(libc::ENOENT)?;
                if let Kind::Symlink(_) = self.nodes[&id].kind {
                    return Err(libc::ENOENT); // chmod follows: dangling
                }
                self.nodes.get_mut(&id).unwrap().mode = *mode;
                Ok(())
            }
            Op::SetX { p, name, seed } => {
                let id = self.resolve(p)?.child.ok_or(libc::ENOENT)?;
                if let Kind::Symlink(_) = self.nodes[&id].kind {
                    return Err(libc::EPERM); // user.* on a symlink
                }
                let v = data(*seed, 1 + (*seed % 40) as usize);
                self.nodes
                    .get_mut(&id)
                    .unwrap()
                    .xattrs
                    .insert(name.clone(), v);
                Ok(())
            }
            Op::RmX { p, name } => {
                let id = self.resolve(p)?.child.ok_or(libc::ENOENT)?;
                if let Kind::Symlink(_) = self.nodes[&id].kind {
                    return Err(libc::EPERM);
                }
                match self.nodes.get_mut(&id).unwrap().xattrs.remove(name) {
                    Some(_) => Ok(()),
                    None => Err(libc::ENODATA),
                }
            }
            Op::Rename { a, b, flags } => self.rename(a, b, *flags),
            Op::Open { slot, p } => {
                let _ = self.close(*slot);
                let id = self.resolve(p)?.child.ok_or(libc::ENOENT)?;
                match self.nodes[&id].kind {
                    Kind::Dir(_) => Err(libc::EISDIR),
                    Kind::Symlink(_) => Err(libc::ELOOP),
                    Kind::File(_) => {
                        self.slots[*slot] = Some(id);
                        Ok(())
                    }
                }
            }
            Op::FdWrite {
                slot,
                off,
                len,
                seed,
            } => {
                let id = self.slots[*slot].ok_or(libc::EBADF)?;
                let (off, len) = (*off as usize, *len as usize);
                let d = self.file_mut(id);
                if d.len() < off + len {
                    d.resize(off + len, 0);
                }
                d[off..off + len].copy_from_slice(&data(*seed, len));
                Ok(())
            }
            Op::Close { slot } => self.close(*slot),
            Op::Remount => {
                for slot in 0..SLOTS {
                    let _ = self.close(slot);
                }
                Ok(())
            }
            Op::Seal | Op::Merge => Ok(()),
        }
    }

    /// rename(2)/renameat2(2) in the order Linux checks things (fs/namei.c do_renameat2,
    /// lock_rename's trap, vfs_rename).
    fn rename(&mut self, a: &str, b: &str, flags: u32) -> Result<(), Errno> {
        let ra = self.resolve(a)?;
        let rb = self.resolve(b)?;
        let old = ra.child.ok_or(libc::ENOENT)?;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        if flags & libc::RENAME_NOREPLACE != 0 && rb.child.is_some() {
            return Err(libc::EEXIST);
        }
        if exchange && rb.child.is_none() {
            return Err(libc::ENOENT);
        }
        // lock_rename's trap: the child of the higher parent on the way to the lower one.
        let (c1, c2) = (&ra.chain, &rb.chain);
        let trap = if ra.parent() == rb.parent() {
            None
        } else if c2.len() < c1.len() && c1[..c2.len()] == c2[..] {
            Some(c1[c2.len()])
        } else if c1.len() < c2.len() && c2[..c1.len()] == c1[..] {
            Some(c2[c1.len()])
        } else {
            None
        };
        if trap == Some(old) {
            return Err(libc::EINVAL);
        }
        if trap.is_some() && trap == rb.child {
            return Err(if exchange {
                libc::EINVAL
            } else {
                libc::ENOTEMPTY
            });
        }
        if rb.child == Some(old) {
            return Ok(()); // the same inode: nothing to do
        }
        if exchange {
            let new = rb.child.unwrap();
            self.children_mut(ra.parent()).insert(ra.name.clone(), new);
            self.children_mut(rb.parent()).insert(rb.name.clone(), old);
            return Ok(());
        }
        if let Some(new) = rb.child {
            match (self.is_dir(old), self.is_dir(new)) {
                (true, false) => return Err(libc::ENOTDIR),
                (false, true) => return Err(libc::EISDIR),
                (true, true) if !self.children(new).is_empty() => return Err(libc::ENOTEMPTY),
                _ => {}
            }
            self.drop_name(rb.parent(), &rb.name);
        }
        self.children_mut(ra.parent()).remove(&ra.name);
        self.children_mut(rb.parent()).insert(rb.name, old);
        Ok(())
    }

    /// Every visible path with the node it names.
    fn paths(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        let mut stack = vec![(String::new(), 0usize)];
        while let Some((prefix, dir)) = stack.pop() {
            for (name, &id) in self.children(dir) {
                let p = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}/{name}")
                };
                if self.is_dir(id) {
                    stack.push((p.clone(), id));
                }
                out.insert(p, id);
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Generating operations

fn random_path(rng: &mut Rng) -> String {
    let depth = match rng.below(20) {
        0..=9 => 1,
        10..=16 => 2,
        _ => 3,
    };
    (0..depth)
        .map(|_| *rng.pick(NAMES))
        .collect::<Vec<_>>()
        .join("/")
}

/// Mostly an existing path (of the wanted kind when there is one), sometimes any path.
fn pick_path(rng: &mut Rng, m: &Model, want: Option<bool>) -> String {
    if rng.below(10) < 7 {
        let cands: Vec<String> = m
            .paths()
            .into_iter()
            .filter(|(_, id)| want.is_none_or(|d| m.is_dir(*id) == d))
            .map(|(p, _)| p)
            .collect();
        if !cands.is_empty() {
            return rng.pick(&cands).clone();
        }
    }
    random_path(rng)
}

/// A new name inside an existing directory (or any path).
fn pick_new(rng: &mut Rng, m: &Model) -> String {
    if rng.below(10) < 7 {
        let dirs: Vec<String> = m
            .paths()
            .into_iter()
            .filter(|(p, id)| m.is_dir(*id) && p.matches('/').count() < 2)
            .map(|(p, _)| p)
            .collect();
        let name = *rng.pick(NAMES);
        if !dirs.is_empty() && rng.below(3) > 0 {
            return format!("{}/{name}", rng.pick(&dirs));
        }
        return name.to_string();
    }
    random_path(rng)
}

/// `SPINFS_DIFF_NO_LINKS=1` generates no hard links (to look past the open hard-link bug).
fn no_links() -> bool {
    std::env::var_os("SPINFS_DIFF_NO_LINKS").is_some()
}

fn gen_op(rng: &mut Rng, m: &Model) -> Op {
    let len = |rng: &mut Rng| match rng.below(4) {
        0 => 1 + rng.below(100),
        1 => 1 + rng.below(5000),
        2 => 1 + rng.below(70_000),
        _ => 1 + rng.below(200_000),
    };
    let off = |rng: &mut Rng| match rng.below(4) {
        0 => 0,
        1 => rng.below(10_000),
        2 => (rng.below(4) * 65536).saturating_sub(rng.below(100)),
        _ => rng.below(300_000),
    };
    match rng.below(112) {
        100..=103 => Op::Open {
            slot: rng.below(SLOTS as u64) as usize,
            p: pick_path(rng, m, Some(false)),
        },
        104..=109 => {
            let open: Vec<usize> = (0..SLOTS).filter(|&i| m.slots[i].is_some()).collect();
            match open.is_empty() {
                true => Op::Open {
                    slot: rng.below(SLOTS as u64) as usize,
                    p: pick_path(rng, m, Some(false)),
                },
                false => Op::FdWrite {
                    slot: *rng.pick(&open),
                    off: off(rng),
                    len: len(rng),
                    seed: rng.below(1 << 20),
                },
            }
        }
        110..=111 => {
            // Mostly a slot that holds something.
            let open: Vec<usize> = (0..SLOTS).filter(|&i| m.slots[i].is_some()).collect();
            let slot = match open.is_empty() || rng.below(4) == 0 {
                true => rng.below(SLOTS as u64) as usize,
                false => *rng.pick(&open),
            };
            Op::Close { slot }
        }
        0..=13 => {
            let p = if rng.below(2) == 0 {
                pick_path(rng, m, Some(false))
            } else {
                pick_new(rng, m)
            };
            Op::Write {
                p,
                off: off(rng),
                len: len(rng),
                seed: rng.below(1 << 20),
            }
        }
        14..=19 => Op::Append {
            p: pick_path(rng, m, Some(false)),
            len: len(rng),
            seed: rng.below(1 << 20),
        },
        20..=26 => {
            let l = if rng.below(3) == 0 { 0 } else { off(rng) };
            Op::Trunc {
                p: pick_path(rng, m, Some(false)),
                len: l,
            }
        }
        27..=33 => Op::Unlink {
            p: pick_path(rng, m, None),
        },
        34..=43 => Op::Mkdir {
            p: pick_new(rng, m),
        },
        44..=50 => Op::Rmdir {
            p: pick_path(rng, m, Some(true)),
        },
        51..=65 => {
            let a = pick_path(rng, m, None);
            let b = if rng.below(2) == 0 {
                pick_path(rng, m, None)
            } else {
                pick_new(rng, m)
            };
            let flags = match rng.below(6) {
                0 => libc::RENAME_NOREPLACE,
                1 => libc::RENAME_EXCHANGE,
                _ => 0,
            };
            Op::Rename { a, b, flags }
        }
        66..=69 => Op::Symlink {
            target: format!("t{}", rng.below(3)),
            p: pick_new(rng, m),
        },
        70..=75 if !no_links() => Op::Link {
            a: pick_path(rng, m, Some(false)),
            b: pick_new(rng, m),
        },
        76..=79 => Op::Chmod {
            p: pick_path(rng, m, None),
            mode: *rng.pick(MODES),
        },
        80..=84 => Op::SetX {
            p: pick_path(rng, m, None),
            name: rng.pick(XNAMES).to_string(),
            seed: rng.below(1 << 20),
        },
        85..=86 => Op::RmX {
            p: pick_path(rng, m, None),
            name: rng.pick(XNAMES).to_string(),
        },
        70..=75 => Op::Mkdir {
            p: pick_new(rng, m),
        },
        87..=92 => Op::Seal,
        93..=97 => Op::Merge,
        _ => Op::Remount,
    }
}

// ---------------------------------------------------------------------------------------------
// Running operations on a real directory

fn cpath(root: &Path, rel: &str) -> CString {
    CString::new(root.join(rel).as_os_str().as_bytes()).unwrap()
}

fn errno() -> Errno {
    std::io::Error::last_os_error().raw_os_error().unwrap()
}

fn check(rc: libc::c_int) -> Result<(), Errno> {
    if rc < 0 { Err(errno()) } else { Ok(()) }
}

fn write_at(root: &Path, p: &str, flags: i32, off: Option<u64>, buf: &[u8]) -> Result<(), Errno> {
    let c = cpath(root, p);
    // SAFETY: plain system calls on owned buffers.
    unsafe {
        let fd = libc::open(
            c.as_ptr(),
            libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | flags,
            0o644,
        );
        if fd < 0 {
            return Err(errno());
        }
        let mut done = 0usize;
        let mut res = Ok(());
        while done < buf.len() {
            let n = match off {
                Some(o) => libc::pwrite(
                    fd,
                    buf[done..].as_ptr().cast(),
                    buf.len() - done,
                    (o + done as u64) as libc::off_t,
                ),
                None => libc::write(fd, buf[done..].as_ptr().cast(), buf.len() - done),
            };
            if n <= 0 {
                res = Err(if n < 0 { errno() } else { libc::EIO });
                break;
            }
            done += n as usize;
        }
        if libc::close(fd) < 0 && res.is_ok() {
            res = Err(errno());
        }
        res
    }
}

/// Runs a namespace/data operation under `root` and returns its errno.
/// Descriptors held by the slots of `Op::Open`.
type Fds = [Option<OwnedFd>; SLOTS];

fn pwrite_all(fd: BorrowedFd<'_>, off: u64, buf: &[u8]) -> Result<(), Errno> {
    let mut done = 0usize;
    while done < buf.len() {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                buf[done..].as_ptr().cast(),
                buf.len() - done,
                (off + done as u64) as libc::off_t,
            )
        };
        if n <= 0 {
            return Err(if n < 0 { errno() } else { libc::EIO });
        }
        done += n as usize;
    }
    Ok(())
}

/// Runs an operation under `root` (with the descriptors held there) and returns its errno.
fn exec(root: &Path, fds: &mut Fds, op: &Op) -> Result<(), Errno> {
    match op {
        Op::Open { slot, p } => {
            fds[*slot] = None;
            let c = cpath(root, p);
            // SAFETY: a NUL-terminated path.
            let fd = unsafe {
                libc::open(
                    c.as_ptr(),
                    libc::O_RDWR | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                )
            };
            if fd < 0 {
                return Err(errno());
            }
            // SAFETY: a descriptor we just opened and own.
            fds[*slot] = Some(unsafe { OwnedFd::from_raw_fd(fd) });
            return Ok(());
        }
        Op::FdWrite {
            slot,
            off,
            len,
            seed,
        } => {
            let fd = fds[*slot].as_ref().ok_or(libc::EBADF)?;
            return pwrite_all(fd.as_fd(), *off, &data(*seed, *len as usize));
        }
        Op::Close { slot } => {
            let fd = fds[*slot].take().ok_or(libc::EBADF)?;
            // SAFETY: we own the descriptor and give it up here.
            return check(unsafe { libc::close(fd.into_raw_fd()) });
        }
        Op::Remount => {
            for fd in fds.iter_mut() {
                *fd = None;
            }
            return Ok(());
        }
        _ => {}
    }
    // SAFETY: plain system calls on NUL-terminated paths that live across the call.
    unsafe {
        match op {
            Op::Write { p, off, len, seed } => write_at(
                root,
                p,
                libc::O_CREAT,
                Some(*off),
                &data(*seed, *len as usize),
            ),
            Op::Append { p, len, seed } => {
                write_at(root, p, libc::O_APPEND, None, &data(*seed, *len as usize))
            }
            Op::Trunc { p, len } => {
                check(libc::truncate(cpath(root, p).as_ptr(), *len as libc::off_t))
            }
            Op::Unlink { p } => check(libc::unlink(cpath(root, p).as_ptr())),
            Op::Mkdir { p } => check(libc::mkdir(cpath(root, p).as_ptr(), 0o755)),
            Op::Rmdir { p } => check(libc::rmdir(cpath(root, p).as_ptr())),
            Op::Rename { a, b, flags } => check(libc::renameat2(
                libc::AT_FDCWD,
                cpath(root, a).as_ptr(),
                libc::AT_FDCWD,
                cpath(root, b).as_ptr(),
                *flags,
            )),
            Op::Symlink { target, p } => {
                let t = CString::new(target.as_str()).unwrap();
                check(libc::symlink(t.as_ptr(), cpath(root, p).as_ptr()))
            }
            Op::Link { a, b } => check(libc::linkat(
                libc::AT_FDCWD,
                cpath(root, a).as_ptr(),
                libc::AT_FDCWD,
                cpath(root, b).as_ptr(),
                0,
            )),
            Op::Chmod { p, mode } => check(libc::chmod(cpath(root, p).as_ptr(), *mode)),
            Op::SetX { p, name, seed } => {
                let v = data(*seed, 1 + (*seed % 40) as usize);
                let n = CString::new(name.as_str()).unwrap();
                check(libc::lsetxattr(
                    cpath(root, p).as_ptr(),
                    n.as_ptr(),
                    v.as_ptr().cast(),
                    v.len(),
                    0,
                ))
            }
            Op::RmX { p, name } => {
                let n = CString::new(name.as_str()).unwrap();
                check(libc::lremovexattr(cpath(root, p).as_ptr(), n.as_ptr()))
            }
            _ => Ok(()),
        }
    }
}

fn errname(e: Result<(), Errno>) -> String {
    match e {
        Ok(()) => "ok".into(),
        Err(e) => {
            let n = match e {
                libc::ENOENT => "ENOENT",
                libc::EEXIST => "EEXIST",
                libc::ENOTEMPTY => "ENOTEMPTY",
                libc::ENOTDIR => "ENOTDIR",
                libc::EISDIR => "EISDIR",
                libc::EINVAL => "EINVAL",
                libc::EPERM => "EPERM",
                libc::ELOOP => "ELOOP",
                libc::ENODATA => "ENODATA",
                libc::EXDEV => "EXDEV",
                libc::EIO => "EIO",
                libc::EBADF => "EBADF",
                _ => "",
            };
            format!("{n}({e})")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Observing a tree and comparing it with the model

#[derive(Debug)]
struct Seen {
    kind: char,
    mode: u32,
    ino: u64,
    nlink: u64,
    content: Vec<u8>,
    target: String,
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn user_xattrs(p: &Path) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut out = BTreeMap::new();
    let mut buf = vec![0u8; 4096];
    // SAFETY: buffers are sized as passed.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(format!(
            "llistxattr {}: {}",
            p.display(),
            errname(Err(errno()))
        ));
    }
    for name in buf[..n as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
    {
        if !name.starts_with(b"user.") {
            continue;
        }
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        // SAFETY: as above.
        let n = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        if n < 0 {
            return Err(format!(
                "lgetxattr {}: {}",
                p.display(),
                errname(Err(errno()))
            ));
        }
        v.truncate(n as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), v);
    }
    Ok(out)
}

fn observe(root: &Path) -> Result<BTreeMap<String, Seen>, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let rd = std::fs::read_dir(&dir).map_err(|e| format!("opendir {rel:?}: {e}"))?;
        for e in rd {
            let e = e.map_err(|e| format!("readdir {rel:?}: {e}"))?;
            let name = e.file_name().into_string().unwrap();
            let p = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let full = root.join(&p);
            let md = std::fs::symlink_metadata(&full).map_err(|e| format!("lstat {p}: {e}"))?;
            if e.ino() != md.ino() {
                return Err(format!(
                    "{p}: readdir d_ino {} != st_ino {}",
                    e.ino(),
                    md.ino()
                ));
            }
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                'd'
            } else if ft.is_file() {
                'f'
            } else if ft.is_symlink() {
                'l'
            } else {
                '?'
            };
            let mut s = Seen {
                kind,
                mode: md.mode() & 0o7777,
                ino: md.ino(),
                nlink: md.nlink(),
                content: Vec::new(),
                target: String::new(),
                xattrs: user_xattrs(&full)?,
            };
            match kind {
                'd' => stack.push(p.clone()),
                'f' => {
                    s.content = std::fs::read(&full).map_err(|e| format!("read {p}: {e}"))?;
                    if s.content.len() as u64 != md.len() {
                        return Err(format!(
                            "{p}: st_size {} but read {} bytes",
                            md.len(),
                            s.content.len()
                        ));
                    }
                }
                'l' => {
                    s.target = std::fs::read_link(&full)
                        .map_err(|e| format!("readlink {p}: {e}"))?
                        .to_string_lossy()
                        .into_owned();
                }
                _ => {}
            }
            out.insert(p, s);
        }
    }
    Ok(out)
}

/// Model node -> st_ino, kept for the life of a sequence (identity across seals and remounts).
type Idents = HashMap<usize, u64>;

fn compare(m: &Model, seen: &BTreeMap<String, Seen>, idents: &mut Idents) -> Vec<String> {
    let mut diffs = Vec::new();
    let paths = m.paths();
    for p in seen.keys() {
        if !paths.contains_key(p) {
            diffs.push(format!("{p}: present, the model has no such name"));
        }
    }
    let mut by_ino: HashMap<u64, usize> = HashMap::new();
    for (p, &id) in &paths {
        let Some(s) = seen.get(p) else {
            diffs.push(format!("{p}: missing"));
            continue;
        };
        let n = &m.nodes[&id];
        let kind = match n.kind {
            Kind::File(_) => 'f',
            Kind::Dir(_) => 'd',
            Kind::Symlink(_) => 'l',
        };
        if s.kind != kind {
            diffs.push(format!("{p}: type {} expected {kind}", s.kind));
            continue;
        }
        // A symlink's mode is always 0777 on Linux.
        if s.mode != n.mode {
            diffs.push(format!("{p}: mode {:o} expected {:o}", s.mode, n.mode));
        }
        match &n.kind {
            Kind::File(d) => {
                if s.content != *d {
                    let first = s.content.iter().zip(d.iter()).position(|(x, y)| x != y);
                    diffs.push(format!(
                        "{p}: content differs: size {} expected {}, first differing byte at {:?}",
                        s.content.len(),
                        d.len(),
                        first
                    ));
                }
                if s.nlink != n.nlink as u64 {
                    diffs.push(format!("{p}: nlink {} expected {}", s.nlink, n.nlink));
                }
            }
            Kind::Symlink(t) if s.target != *t => {
                diffs.push(format!("{p}: symlink target {:?} expected {t:?}", s.target));
            }
            _ => {}
        }
        if s.xattrs != n.xattrs {
            diffs.push(format!(
                "{p}: user xattrs {:?} expected {:?}",
                s.xattrs.keys(),
                n.xattrs.keys()
            ));
        }
        match idents.get(&id) {
            Some(&ino) if ino != s.ino => diffs.push(format!(
                "{p}: st_ino {} but this node had st_ino {ino}",
                s.ino
            )),
            _ => {
                idents.insert(id, s.ino);
            }
        }
        match by_ino.get(&s.ino) {
            Some(&other) if other != id => diffs.push(format!(
                "{p}: st_ino {} is shared with a different node",
                s.ino
            )),
            _ => {
                by_ino.insert(s.ino, id);
            }
        }
    }
    diffs
}

/// Files held open: attributes by descriptor (fstat: getattr with a file handle) and the
/// whole content by pread, also for files unlinked meanwhile.
fn compare_fds(m: &Model, fds: &Fds, idents: &mut Idents) -> Vec<String> {
    let mut diffs = Vec::new();
    for (slot, id) in m.slots.iter().enumerate() {
        let Some(id) = *id else { continue };
        let Some(fd) = &fds[slot] else {
            diffs.push(format!("slot {slot}: no descriptor held"));
            continue;
        };
        let Kind::File(want) = &m.nodes[&id].kind else {
            unreachable!()
        };
        let f = std::fs::File::from(fd.try_clone().unwrap());
        let md = match f.metadata() {
            Ok(md) => md,
            Err(e) => {
                diffs.push(format!("slot {slot}: fstat: {e}"));
                continue;
            }
        };
        let mut got = vec![0u8; md.len() as usize];
        use std::os::unix::fs::FileExt;
        if let Err(e) = f.read_exact_at(&mut got, 0) {
            diffs.push(format!("slot {slot}: pread of {} bytes: {e}", md.len()));
            continue;
        }
        if got != *want {
            let first = got.iter().zip(want.iter()).position(|(x, y)| x != y);
            diffs.push(format!(
                "slot {slot}: content by descriptor differs: size {} expected {}, first \
                 differing byte at {first:?}",
                got.len(),
                want.len()
            ));
        }
        if md.nlink() != m.nodes[&id].nlink as u64 {
            diffs.push(format!(
                "slot {slot}: fstat nlink {} expected {}",
                md.nlink(),
                m.nodes[&id].nlink
            ));
        }
        match idents.get(&id) {
            Some(&ino) if ino != md.ino() => diffs.push(format!(
                "slot {slot}: fstat st_ino {} but this node had st_ino {ino}",
                md.ino()
            )),
            _ => {
                idents.insert(id, md.ino());
            }
        }
    }
    diffs
}

// ---------------------------------------------------------------------------------------------
// The second reference: kernel overlayfs over the store's own layers

/// Everything the oracle compares of one name.
#[derive(Debug, PartialEq)]
struct Full {
    kind: char,
    mode: u32,
    /// Regular files only (a directory's size is its layer's business).
    nlink: u64,
    content: Vec<u8>,
    target: String,
    /// Every xattr listed, with its value.
    xattrs: BTreeMap<String, Vec<u8>>,
}

/// A visible tree by path, and its hard-link groups.
type View = (BTreeMap<String, Full>, BTreeSet<Vec<String>>);

fn cstr_path(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn all_xattrs(p: &Path) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let c = cstr_path(p);
    let mut out = BTreeMap::new();
    let mut buf = vec![0u8; 65536];
    // SAFETY: buffers are sized as passed.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(format!(
            "llistxattr {}: {}",
            p.display(),
            errname(Err(errno()))
        ));
    }
    for name in buf[..n as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
    {
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        // SAFETY: as above.
        let n = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        if n < 0 {
            return Err(format!(
                "lgetxattr {} {}: {}",
                p.display(),
                String::from_utf8_lossy(name),
                errname(Err(errno()))
            ));
        }
        v.truncate(n as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), v);
    }
    Ok(out)
}

/// The visible tree under `root` ("" is the root itself), and the hard-link groups: the sets
/// of non-directory paths sharing one (st_dev, st_ino).
fn observe_full(root: &Path) -> Result<View, String> {
    let mut out = BTreeMap::new();
    let mut groups: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
    let md = std::fs::symlink_metadata(root).map_err(|e| format!("lstat root: {e}"))?;
    out.insert(
        String::new(),
        Full {
            kind: 'd',
            mode: md.mode() & 0o7777,
            nlink: 0,
            content: Vec::new(),
            target: String::new(),
            xattrs: all_xattrs(root)?,
        },
    );
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let rd = std::fs::read_dir(root.join(&rel)).map_err(|e| format!("opendir {rel:?}: {e}"))?;
        for e in rd {
            let e = e.map_err(|e| format!("readdir {rel:?}: {e}"))?;
            let name = e.file_name().into_string().unwrap();
            let p = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let full = root.join(&p);
            let md = std::fs::symlink_metadata(&full).map_err(|e| format!("lstat {p}: {e}"))?;
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                'd'
            } else if ft.is_file() {
                'f'
            } else if ft.is_symlink() {
                'l'
            } else if ft.is_char_device() {
                'c'
            } else {
                '?'
            };
            let mut f = Full {
                kind,
                mode: md.mode() & 0o7777,
                nlink: 0,
                content: Vec::new(),
                target: String::new(),
                xattrs: all_xattrs(&full)?,
            };
            match kind {
                'd' => stack.push(p.clone()),
                'f' => {
                    f.nlink = md.nlink();
                    f.content = std::fs::read(&full).map_err(|e| format!("read {p}: {e}"))?;
                    if f.content.len() as u64 != md.len() {
                        return Err(format!(
                            "{p}: st_size {} but read {} bytes",
                            md.len(),
                            f.content.len()
                        ));
                    }
                }
                'l' => {
                    f.target = std::fs::read_link(&full)
                        .map_err(|e| format!("readlink {p}: {e}"))?
                        .to_string_lossy()
                        .into_owned();
                }
                _ => {}
            }
            if kind != 'd' {
                groups
                    .entry((md.dev(), md.ino()))
                    .or_default()
                    .push(p.clone());
            }
            out.insert(p, f);
        }
    }
    let groups = groups
        .into_values()
        .map(|mut g| {
            g.sort();
            g
        })
        .collect();
    Ok((out, groups))
}

/// Differences between the kernel overlayfs view and the spinfs mount.
fn compare_full(kernel: &View, ours: &View) -> Vec<String> {
    let mut diffs = Vec::new();
    for p in kernel
        .0
        .keys()
        .chain(ours.0.keys())
        .collect::<BTreeSet<_>>()
    {
        match (kernel.0.get(p), ours.0.get(p)) {
            (Some(k), None) => diffs.push(format!(
                "{p:?}: overlayfs shows it ({}), spinfs not",
                k.kind
            )),
            (None, Some(o)) => diffs.push(format!(
                "{p:?}: spinfs shows it ({}), overlayfs not",
                o.kind
            )),
            (Some(k), Some(o)) if k != o => {
                let mut d = Vec::new();
                if k.kind != o.kind {
                    d.push(format!("type {} vs {}", k.kind, o.kind));
                }
                if k.mode != o.mode {
                    d.push(format!("mode {:o} vs {:o}", k.mode, o.mode));
                }
                if k.nlink != o.nlink {
                    d.push(format!("nlink {} vs {}", k.nlink, o.nlink));
                }
                if k.content != o.content {
                    let at = k
                        .content
                        .iter()
                        .zip(&o.content)
                        .position(|(a, b)| a != b)
                        .unwrap_or(k.content.len().min(o.content.len()));
                    d.push(format!(
                        "content ({} vs {} bytes, first difference at {at})",
                        k.content.len(),
                        o.content.len()
                    ));
                }
                if k.target != o.target {
                    d.push(format!("target {:?} vs {:?}", k.target, o.target));
                }
                if k.xattrs != o.xattrs {
                    d.push(format!(
                        "xattrs {:?} vs {:?}",
                        k.xattrs.keys(),
                        o.xattrs.keys()
                    ));
                }
                diffs.push(format!("{p:?}: overlayfs vs spinfs: {}", d.join(", ")));
            }
            _ => {}
        }
    }
    if kernel.1 != ours.1 {
        let only_k: Vec<_> = kernel.1.difference(&ours.1).collect();
        let only_o: Vec<_> = ours.1.difference(&kernel.1).collect();
        diffs.push(format!(
            "hard-link groups differ: overlayfs {only_k:?}, spinfs {only_o:?}"
        ));
    }
    diffs
}

/// A kernel mount, detached when dropped (also when a test fails).
struct KernelMount(PathBuf);

impl KernelMount {
    fn new(src: &str, target: &Path, fstype: &str, opts: &str) -> Result<KernelMount, String> {
        std::fs::create_dir_all(target).unwrap();
        let (s, t, f, o) = (
            CString::new(src).unwrap(),
            cstr_path(target),
            CString::new(fstype).unwrap(),
            CString::new(opts).unwrap(),
        );
        // SAFETY: valid NUL-terminated strings for the duration of the call.
        let r = unsafe {
            libc::mount(
                s.as_ptr(),
                t.as_ptr(),
                f.as_ptr(),
                libc::MS_RDONLY,
                o.as_ptr().cast(),
            )
        };
        if r != 0 {
            return Err(format!(
                "mount -t {fstype} {src} -o {opts}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(KernelMount(target.to_path_buf()))
    }
}

impl Drop for KernelMount {
    fn drop(&mut self) {
        let c = cstr_path(&self.0);
        // SAFETY: a valid path; umount2 has no memory effects on us.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// The stacked files of a writable tree (file stacking): every regular file carrying the map
/// xattr, by path, with its decoded map.
fn stacked_files(tree: &Path) -> Result<Vec<(String, StackMap)>, String> {
    let mut out = Vec::new();
    let mut stack = vec![String::new()];
    let xattr = CString::new(STACK_XATTR).unwrap();
    while let Some(rel) = stack.pop() {
        let rd = std::fs::read_dir(tree.join(&rel)).map_err(|e| format!("opendir {rel:?}: {e}"))?;
        for e in rd {
            let e = e.map_err(|e| format!("readdir {rel:?}: {e}"))?;
            let name = e.file_name().into_string().unwrap();
            let p = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let ft = e.file_type().map_err(|e| format!("lstat {p}: {e}"))?;
            if ft.is_dir() {
                stack.push(p);
                continue;
            }
            if !ft.is_file() {
                continue;
            }
            let c = cstr_path(&tree.join(&p));
            let mut v = vec![0u8; 65536];
            // SAFETY: the buffer is sized as passed.
            let n = unsafe {
                libc::lgetxattr(c.as_ptr(), xattr.as_ptr(), v.as_mut_ptr().cast(), v.len())
            };
            if n < 0 {
                match errno() {
                    libc::ENODATA => continue,
                    e => return Err(format!("lgetxattr {p} (stack map): {}", errname(Err(e)))),
                }
            }
            v.truncate(n as usize);
            let map = match Stored::decode(&v)
                .map_err(|e| format!("{p:?}: the stack map does not decode ({e:?})"))?
            {
                Stored::Inline(m) => m,
                Stored::Sidecar(r) => {
                    let side = tree.parent().unwrap().join(MAPS_DIR).join(r.file_name());
                    let bytes = std::fs::read(&side)
                        .map_err(|e| format!("{p:?}: its sidecar map {side:?}: {e}"))?;
                    r.load(&bytes).map_err(|e| {
                        format!("{p:?}: its sidecar map {side:?} does not check ({e:?})")
                    })?
                }
            };
            out.push((p, map));
        }
    }
    Ok(out)
}

/// The content a stacked file must show, reconstructed without spinfs: `upper` is its sparse
/// upper file as the kernel reads it, `lower` the file its map names as kernel overlayfs over
/// the archived layers shows it. Chunks below take the lower bytes below the map's limit and
/// zeros past it (or past the lower file's end); every other byte is the upper file's.
fn reconstruct_stacked(
    p: &str,
    map: &StackMap,
    upper: &[u8],
    lower: &[u8],
) -> Result<Vec<u8>, String> {
    if lower.len() as u64 != map.lower_size {
        return Err(format!(
            "{p:?}: the stack map says its lower file {:?} has {} bytes, kernel overlayfs over \
             the layers shows {}",
            String::from_utf8_lossy(&map.lower_path),
            map.lower_size,
            lower.len()
        ));
    }
    let mut out = upper.to_vec();
    let size = out.len() as u64;
    let cs = map.chunk_size();
    for &(first, end) in map.below_runs() {
        for c in first..end {
            let start = c * cs;
            if start >= size {
                return Err(format!(
                    "{p:?}: chunk {c} is below but the file ends at {size} (map {map:?})"
                ));
            }
            for off in start..((c + 1) * cs).min(size) {
                out[off as usize] = if off < map.limit {
                    lower.get(off as usize).copied().unwrap_or(0)
                } else {
                    0
                };
            }
        }
    }
    Ok(out)
}

/// The store's durable state as far as the oracle needs it.
#[derive(PartialEq, Debug)]
struct StoreState {
    upper_gen: u64,
    frozen: bool,
    /// Archived layer ids, newest first.
    layers: Vec<u64>,
    /// Each layer's blob ids in device order (`spinfs export` names blobs by id).
    devices: HashMap<u64, Vec<u64>>,
}

fn store_state(store: &Path) -> Result<StoreState, String> {
    let text =
        std::fs::read_to_string(store.join("manifest")).map_err(|e| format!("manifest: {e}"))?;
    let body = &text[text.find('\n').ok_or("manifest without a header")? + 1..];
    let m: serde_json::Value = serde_json::from_str(body).map_err(|e| format!("manifest: {e}"))?;
    let mut layers: Vec<u64> = m["layers"]
        .as_array()
        .ok_or("manifest without layers")?
        .iter()
        .map(|l| l["id"].as_u64().unwrap())
        .collect();
    layers.reverse();
    let devices = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let d = l["devices"].as_array().unwrap();
            let d = d.iter().map(|b| b.as_u64().unwrap()).collect();
            (l["id"].as_u64().unwrap(), d)
        })
        .collect();
    Ok(StoreState {
        devices,
        upper_gen: m["upper_gen"]
            .as_u64()
            .ok_or("manifest without upper_gen")?,
        frozen: !m["frozen"].is_null(),
        layers,
    })
}

/// Kernel overlayfs over kernel erofs mounts of the exported archived layers (`spinfs export`,
/// mounted file-backed with `device=` per blob, kept for the sequence: layers never change)
/// and the writable generation's SSD tree on top, read-only, newest first.
struct Oracle {
    /// Declared before `dir`: unmounted before the directory goes.
    layers: HashMap<u64, KernelMount>,
    dir: tempfile::TempDir,
    checks: usize,
    /// Stacked files whose content was reconstructed from their map (summed over checks).
    stacked: usize,
}

impl Oracle {
    fn new() -> Oracle {
        Oracle {
            layers: HashMap::new(),
            dir: tempfile::Builder::new()
                .prefix("oracle")
                .tempdir_in(test_root())
                .unwrap(),
            checks: 0,
            stacked: 0,
        }
    }

    fn mount_layer(&mut self, store: &Path, id: u64, devices: &[u64]) -> Result<(), String> {
        if self.layers.contains_key(&id) {
            return Ok(());
        }
        let x = self.dir.path().join(format!("x{id}"));
        spinfs_try(&[
            "export",
            store.to_str().unwrap(),
            "--layer",
            &id.to_string(),
            x.to_str().unwrap(),
        ])?;
        let opts = devices
            .iter()
            .map(|b| format!("device={}", x.join(format!("blob.{b}")).display()))
            .collect::<Vec<_>>()
            .join(",");
        let meta = x.join(format!("meta.{id}"));
        let k = KernelMount::new(
            meta.to_str().unwrap(),
            &self.dir.path().join(format!("k{id}")),
            "erofs",
            &opts,
        )?;
        self.layers.insert(id, k);
        Ok(())
    }

    /// Compares the mount with kernel overlayfs over the store's layers. Waits out a seal in
    /// progress (a frozen generation is in neither the writable tree nor a layer) and observes
    /// again when the store changed meanwhile (a background seal or merge).
    fn compare(&mut self, store: &Path, mnt: &Path) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if Instant::now() > deadline {
                return Err("kernel overlayfs oracle: the store never settled".into());
            }
            let before = store_state(store)?;
            if before.frozen {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            let res = self.compare_in(store, mnt, &before);
            // A seal or merge that ran meanwhile may have changed the layers under the walk
            // (or removed the tree it walked): look again.
            if store_state(store)? != before {
                continue;
            }
            return res;
        }
    }

    fn compare_in(&mut self, store: &Path, mnt: &Path, before: &StoreState) -> Result<(), String> {
        {
            for &id in &before.layers {
                self.mount_layer(store, id, &before.devices[&id])?;
            }
            let tree = store.join(format!("gens/{:016x}/tree", before.upper_gen));
            let empty = self.dir.path().join("empty");
            std::fs::create_dir_all(&empty).unwrap();
            // At least two lower layers are needed without an upper one: an empty bottom.
            let mut lower = vec![tree.display().to_string()];
            lower.extend(
                before
                    .layers
                    .iter()
                    .map(|id| self.layers[id].0.display().to_string()),
            );
            lower.push(empty.display().to_string());
            self.checks += 1;
            let target = self.dir.path().join(format!("ov{}", self.checks));
            let mut kernel = {
                let _ov = KernelMount::new(
                    "overlay",
                    &target,
                    "overlay",
                    &format!("lowerdir={}", lower.join(":")),
                )?;
                observe_full(&target).map_err(|e| format!("overlayfs walk: {e}"))?
            };
            // Kernel overlayfs shows a stacked file's sparse upper file: its expected content
            // is rebuilt from the map, the upper file and the lower file as kernel overlayfs
            // over the archived layers alone (the namespace below the tree) shows it.
            let stacked = stacked_files(&tree).map_err(|e| format!("writable tree walk: {e}"))?;
            if !stacked.is_empty() {
                if before.layers.is_empty() {
                    return Err(format!(
                        "stacked files {:?} in the writable tree, but no layer below it",
                        stacked.iter().map(|(p, _)| p).collect::<Vec<_>>()
                    ));
                }
                let below = self.dir.path().join(format!("below{}", self.checks));
                let _ov = KernelMount::new(
                    "overlay",
                    &below,
                    "overlay",
                    &format!("lowerdir={}", lower[1..].join(":")),
                )?;
                for (p, map) in &stacked {
                    let lp = below.join(std::ffi::OsStr::from_bytes(&map.lower_path));
                    let lower = match std::fs::symlink_metadata(&lp) {
                        Ok(md) if md.file_type().is_file() => std::fs::read(&lp)
                            .map_err(|e| format!("overlayfs below: read {}: {e}", lp.display()))?,
                        r => {
                            return Err(format!(
                                "{p:?}: the stack map's lower file {:?} is no regular file in \
                                 kernel overlayfs over the layers ({:?})",
                                String::from_utf8_lossy(&map.lower_path),
                                r.map(|md| md.file_type())
                            ));
                        }
                    };
                    let f = kernel
                        .0
                        .get_mut(p)
                        .filter(|f| f.kind == 'f')
                        .ok_or_else(|| {
                            format!("{p:?}: a stacked file of the tree is no file in overlayfs")
                        })?;
                    f.content = reconstruct_stacked(p, map, &f.content, &lower)?;
                }
                self.stacked += stacked.len();
            }
            let ours = observe_full(mnt).map_err(|e| format!("spinfs walk: {e}"))?;
            let diffs = compare_full(&kernel, &ours);
            if diffs.is_empty() {
                return Ok(());
            }
            let stacked: Vec<_> = stacked.iter().map(|(p, _)| p).collect();
            Err(format!(
                "kernel overlayfs over {} differs (stacked files, content rebuilt from their \
                 maps: {stacked:?}):\n  {}",
                lower.join(":"),
                diffs.join("\n  ")
            ))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A sequence

/// How many steps of each kind ran, by expected result ("n ENOTEMPTY(39)": 12), and under
/// `ORACLE_KEY` how many comparisons with kernel overlayfs passed.
type Stats = BTreeMap<String, usize>;

const ORACLE_KEY: &str = "kernel overlayfs comparisons";
/// Under this key: how many stacked files' contents the oracle rebuilt from their maps.
const STACKED_KEY: &str = "stacked files rebuilt";

struct Failure {
    /// The steps up to and including the one that failed.
    ops: Vec<Op>,
    msg: String,
}

fn spinfs_try(args: &[&str]) -> Result<(), String> {
    let out = spinfs(args);
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "spinfs {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Runs `steps` (replay) or `nops` generated steps from `seed`, checking after every step
/// (and with `oracle`, against kernel overlayfs at every seal, merge and remount and at the end).
fn run_sequence(
    seed: u64,
    steps: Option<&[Op]>,
    nops: usize,
    oracle: bool,
) -> Result<Stats, Failure> {
    let mut done: Vec<Op> = Vec::new();
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_inner(seed, steps, nops, oracle, &mut done)
    }));
    match res {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(msg)) => Err(Failure { ops: done, msg }),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(Failure {
                ops: done,
                msg: format!("panic: {msg}"),
            })
        }
    }
}

fn run_inner(
    seed: u64,
    steps: Option<&[Op]>,
    nops: usize,
    oracle: bool,
    done: &mut Vec<Op>,
) -> Result<Stats, String> {
    let mut mnt = Mounted::new(MKFS);
    if seed % 2 == 1 {
        // Odd seeds keep every chunk map in a sidecar file (gens/G/stackmaps), as maps too
        // long for an xattr are kept.
        mnt.umount();
        let cfg = mnt.store.join("spinfs.toml");
        let text = std::fs::read_to_string(&cfg).unwrap();
        std::fs::write(&cfg, format!("stack_map_inline_max = 0\n{text}")).unwrap();
        mnt.mount();
    }
    let mut kernel = oracle.then(Oracle::new);
    let plain = tempfile::Builder::new()
        .prefix("plain")
        .tempdir_in(test_root())
        .unwrap();
    let mut model = Model::new();
    let mut rng = Rng::new(seed);
    let (mut id_spinfs, mut id_plain) = (Idents::new(), Idents::new());
    let total = steps.map_or(nops, |s| s.len());
    let mut stats = Stats::new();
    let mut fds_plain: Fds = Default::default();
    let mut fds_spinfs: Fds = Default::default();
    for i in 0..total {
        let op = match steps {
            Some(s) => s[i].clone(),
            None => gen_op(&mut rng, &model),
        };
        done.push(op.clone());
        let want = model.apply(&op);
        let kind = op.to_string().split(':').next().unwrap().to_string();
        *stats
            .entry(format!("{kind} {}", errname(want)))
            .or_default() += 1;
        let got_plain = exec(plain.path(), &mut fds_plain, &op);
        let got = exec(&mnt.mnt, &mut fds_spinfs, &op);
        match op {
            Op::Seal => spinfs_try(&["archive", mnt.store.to_str().unwrap(), "--wait"])?,
            Op::Merge => spinfs_try(&["merge", mnt.store.to_str().unwrap(), "--wait"])?,
            Op::Remount => mnt.remount(),
            _ => {}
        }
        let mut diffs = Vec::new();
        if got_plain != want {
            diffs.push(format!(
                "MODEL BUG: ext4 returned {} where the model expects {}",
                errname(got_plain),
                errname(want)
            ));
        }
        if got != want {
            diffs.push(format!(
                "spinfs returned {} where the model expects {}",
                errname(got),
                errname(want)
            ));
        }
        match observe(plain.path()) {
            Ok(seen) => {
                for d in compare(&model, &seen, &mut id_plain) {
                    diffs.push(format!("MODEL BUG (ext4 differs): {d}"));
                }
            }
            Err(e) => diffs.push(format!("MODEL BUG? ext4 walk: {e}")),
        }
        for d in compare_fds(&model, &fds_plain, &mut id_plain) {
            diffs.push(format!("MODEL BUG (ext4 differs): {d}"));
        }
        match observe(&mnt.mnt) {
            Ok(seen) => diffs.extend(compare(&model, &seen, &mut id_spinfs)),
            Err(e) => diffs.push(format!("spinfs walk: {e}")),
        }
        diffs.extend(compare_fds(&model, &fds_spinfs, &mut id_spinfs));
        if let Some(k) = &mut kernel
            && diffs.is_empty()
            && matches!(op, Op::Seal | Op::Merge | Op::Remount)
        {
            match k.compare(&mnt.store, &mnt.mnt) {
                Ok(()) => *stats.entry(ORACLE_KEY.into()).or_default() += 1,
                Err(e) => diffs.push(e),
            }
        }
        if !diffs.is_empty() {
            return Err(format!(
                "step {i} `{op}`:\n  {}{}",
                diffs.join("\n  "),
                daemon_complaints(&mnt.store)
            ));
        }
    }
    // A final remount must show the same tree.
    fds_spinfs = Default::default();
    drop(fds_spinfs);
    mnt.remount();
    let seen =
        observe(&mnt.mnt).map_err(|e| format!("after the final remount: spinfs walk: {e}"))?;
    let mut diffs = compare(&model, &seen, &mut id_spinfs);
    if let Some(k) = &mut kernel
        && diffs.is_empty()
    {
        match k.compare(&mnt.store, &mnt.mnt) {
            Ok(()) => *stats.entry(ORACLE_KEY.into()).or_default() += 1,
            Err(e) => diffs.push(e),
        }
    }
    if !diffs.is_empty() {
        done.push(Op::Remount);
        return Err(format!(
            "after the final remount:\n  {}",
            diffs.join("\n  ")
        ));
    }
    if let Some(k) = &kernel {
        stats.insert(STACKED_KEY.into(), k.stacked);
    }
    // The store the sequence leaves behind must be consistent for `spinfs fsck`.
    mnt.umount();
    let out = spinfs(&["fsck", mnt.store.to_str().unwrap()]);
    if !out.status.success() {
        return Err(format!(
            "spinfs fsck after the sequence (exit {:?}):\n  {}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout)
                .trim_end()
                .replace('\n', "\n  "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(stats)
}

/// The daemon's warnings and errors (its log), for a failure report.
fn daemon_complaints(store: &Path) -> String {
    let log = std::fs::read_to_string(store.join("spinfs.log")).unwrap_or_default();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    if lines.is_empty() {
        return String::new();
    }
    format!(
        "\n  daemon log warnings and errors:\n    {}",
        lines[lines.len().saturating_sub(20)..].join("\n    ")
    )
}

/// Shrinks a failing step list: drops chunks, then single steps, while it still fails.
fn shrink(seed: u64, mut ops: Vec<Op>, oracle: bool, budget: Duration) -> (Vec<Op>, String, usize) {
    let start = Instant::now();
    let mut runs = 0;
    let mut msg = String::new();
    let mut chunk = (ops.len() / 2).max(1);
    while chunk >= 1 && start.elapsed() < budget {
        let mut i = 0;
        let mut progress = false;
        while i < ops.len() && start.elapsed() < budget {
            let mut cand = ops.clone();
            cand.drain(i..(i + chunk).min(ops.len()));
            runs += 1;
            match run_sequence(seed, Some(&cand), 0, oracle) {
                Err(f) => {
                    ops = f.ops;
                    msg = f.msg;
                    progress = true;
                }
                Ok(_) => i += chunk,
            }
        }
        if !progress {
            if chunk == 1 {
                break;
            }
            chunk /= 2;
        }
    }
    (ops, msg, runs)
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn report(seed: u64, f: Failure, oracle: bool) -> String {
    let mut s = format!(
        "divergence (seed {seed}, {} steps):\n{}\nreplay: SPINFS_DIFF_REPLAY='{}'\n",
        f.ops.len(),
        f.msg,
        format_ops(&f.ops)
    );
    if std::env::var_os("SPINFS_DIFF_NO_SHRINK").is_none() {
        let (min, msg, runs) = shrink(seed, f.ops, oracle, Duration::from_secs(90));
        s += &format!(
            "minimised ({runs} runs) to {} steps:\n{msg}\nreplay: SPINFS_DIFF_REPLAY='{}'\n",
            min.len(),
            format_ops(&min)
        );
    }
    s
}

fn set_umask() {
    // SAFETY: umask has no memory effects.
    unsafe { libc::umask(UMASK) };
}

#[test]
fn differential_random_sequences() {
    set_umask();
    if let Ok(r) = std::env::var("SPINFS_DIFF_REPLAY") {
        let ops = parse_ops(&r);
        let oracle = std::env::var_os("SPINFS_DIFF_NO_ORACLE").is_none();
        let st = match run_sequence(0, Some(&ops), 0, oracle) {
            Ok(st) => st,
            Err(f) => panic!("{}", report(0, f, oracle)),
        };
        eprintln!(
            "replay of {} steps: no divergence ({} kernel overlayfs comparisons, {} stacked \
             files rebuilt from their maps)",
            ops.len(),
            st.get(ORACLE_KEY).unwrap_or(&0),
            st.get(STACKED_KEY).unwrap_or(&0)
        );
        return;
    }
    let n = env_num("SPINFS_DIFF_SEQUENCES", 150);
    let nops = env_num("SPINFS_DIFF_OPS", 40) as usize;
    let first = env_num("SPINFS_DIFF_SEED", 1);
    let every = env_num("SPINFS_DIFF_ORACLE_EVERY", ORACLE_EVERY).max(1);
    let start = Instant::now();
    let mut total = 0;
    let mut all = Stats::new();
    let (mut with_oracle, mut compared, mut stacked) = (0, 0, 0);
    for seed in first..first + n {
        let oracle = seed % every == 0 && std::env::var_os("SPINFS_DIFF_NO_ORACLE").is_none();
        with_oracle += oracle as u64;
        match run_sequence(seed, None, nops, oracle) {
            Ok(mut st) => {
                compared += st.remove(ORACLE_KEY).unwrap_or(0);
                stacked += st.remove(STACKED_KEY).unwrap_or(0);
                for (k, v) in st {
                    total += v;
                    *all.entry(k).or_default() += v;
                }
            }
            Err(f) => panic!("{}", report(seed, f, oracle)),
        }
    }
    eprintln!(
        "{n} sequences ({with_oracle} also against kernel overlayfs: {compared} comparisons, \
         {stacked} stacked files rebuilt from their maps), {total} steps, no divergence ({:.1}s)\nsteps by expected result: {}",
        start.elapsed().as_secs_f64(),
        all.iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

#[test]
fn replay_format_round_trips() {
    let mut rng = Rng::new(7);
    let m = Model::new();
    let ops: Vec<Op> = (0..500).map(|_| gen_op(&mut rng, &m)).collect();
    assert_eq!(parse_ops(&format_ops(&ops)), ops);
}

/// Runs a named regression sequence (a minimised replay string).
fn regression(steps: &str) {
    set_umask();
    if let Err(f) = run_sequence(0, Some(&parse_ops(steps)), 0, true) {
        panic!("{}", report(0, f, true));
    }
}

/// A directory with lower parts moved by RENAME_EXCHANGE (or rename) is copied up whole and
/// made opaque; the whiteout of its moved-away archived child `c/b/a` stayed in the copy and,
/// the directory now being upper-only, readdir listed it: `ls b/b` showed `a`, `stat b/b/a`
/// said ENOENT.
#[test]
fn regression_whiteout_listed_after_directory_copy_up() {
    regression("m:c;m:c/b;m:a;m:c/b/a;w:b:1082:84515:485940;S;n:c/b/a:a/c:1;n:b:c:2");
    regression("m:c;m:c/b;m:c/b/a;S;r:c/b/a;n:c:d:0");
}

/// An archived file with two names, copied up through one of them (write, append, chmod,
/// rename, or a directory moved whole), left the other name on the old lower instance: the
/// same st_ino with a different content and link count; unlinking one archived name left
/// nlink 2 on the other.
#[test]
fn regression_archived_hard_links_copy_up_together() {
    regression("w:c:7318:189681:243256;l:c:b;S;w:b:182951:29:627908");
    regression("w:c:0:100:1;l:c:b;S;w:b:50:10:2;R");
    regression("w:b:210044:189958:580463;l:b:c;S;u:c");
    regression("m:a;w:a/a:0:10:1;l:a/a:a/b;S;n:a:c:0;w:c/b:0:5:2");
    regression("m:a;w:a/a:0:10:1;l:a/a:b;S;n:a:c:0;w:b:0:5:2;R");
    regression("w:a:0:10:1;l:a:b;w:c:0:3:3;S;n:c:b:0;R");
}

/// A node is re-resolved by the name it was last reached by; once that name was unlinked
/// (another hard link remaining), a seal left its placement on the dropped frozen instance:
/// `stat c` said nlink 0.
#[test]
fn regression_hard_link_found_by_another_name_after_seal() {
    regression("w:c:260424:51:881699;l:c:a;u:a;S");
    regression("w:c:0:9:1;l:c:a;S;u:a;S;M;R");
}

/// A directory moved to a name with archived entries below (RENAME_EXCHANGE with an archived
/// directory, or rename onto the whiteout of a removed archived directory) was not made
/// opaque: after a remount the old archived children showed through it.
#[test]
fn regression_moved_directory_hides_lower_entries() {
    regression("m:c;w:c/a:0:5:1;S;m:b;n:b:c:2;R");
    regression("m:n;m:n/x;S;r:n/x;r:n;m:y;n:y:n:0;R");
}

/// A file open for writing is moved out of a generation being frozen, by the name it was
/// last reached by only: its other hard links were sealed apart from it (both names then
/// nlink 1), and when that name had been unlinked it stayed in the frozen generation, where a
/// new open of its remaining name (now leading to the sealed layer) failed with EIO (the
/// kernel refuses to mix passthrough and daemon-served opens of one inode).
#[test]
fn regression_open_hard_linked_file_moves_with_all_names_at_freeze() {
    regression("m:c;w:c/b:4639:65683:502799;l:c/b:c/c;n:c/b:b:0;o:1:b;S");
    regression("m:c;w:c/b:4639:65683:502799;l:c/b:c/c;n:c/b:b:0;o:1:b;u:b;S");
    regression("m:c;w:c/b:4639:65683:502799;l:c/b:c/c;n:c/b:b:0;o:1:b;S;f:1:0:10:3;S;M;u:b;S;R");
}

/// A hard-linked file last reached through a directory that was then emptied and removed:
/// after a seal, re-resolving it went through the forgotten directory node and failed, so
/// `stat b` said ENOENT while `ls` listed b.
#[test]
fn regression_hard_link_reached_through_removed_directory() {
    regression("m:c;w:b:9010:79149:96395;l:b:c/a;u:c/a;r:c;S");
}

/// Seed 1048: an archived file exchanged with a new one, the new one held open for writing
/// across a seal. The freeze moved the open file out of the frozen generation without leaving
/// a whiteout at its name, so the sealed layer let the older archived entry show through:
/// stale data under a duplicate inode number in the merged layer (found by `spinfs fsck` at
/// the end of the sequence, hidden in the mount by the newer file).
#[test]
fn regression_file_moved_at_freeze_leaves_a_whiteout_over_older_layers() {
    regression("s:t1:a;S;w:c:65528:407:763381;n:a:c:2;o:1:a;S;S");
    regression("w:a:0:5:2;S;w:c:0:10:1;n:a:c:2;o:1:a;S;S");
}
