//! A disk with a volatile write cache that loses power on demand, for `power_loss.rs`.
//!
//! A tiny FUSE filesystem served by a thread of the test process exposes one regular file,
//! `diskN`, used as the backing file of a loop device that carries ext4 (mounted with
//! `data=writeback,noauto_da_alloc`: the weakest ordering ext4 offers), on which the spinfs
//! store *and* its media live. The loop driver turns every write the block layer sends into
//! a FUSE WRITE and every cache flush (REQ_PREFLUSH; FUA is emulated with flushes since the
//! loop device has no FUA) into a FUSE FSYNC. So this file sees exactly what a disk sees:
//! writes land in a volatile cache (`pending`) and become durable only at a flush, as with
//! dm-log-writes.
//!
//! `cut` is the power failure: of the writes since the last flush each is dropped, kept, or
//! torn at 512-byte sector granularity (every sector kept or lost on its own), chosen at
//! random (or all dropped in the strict mode); the result becomes `disk(N+1)`, which the test
//! mounts again (ext4 replays its journal, then spinfs recovers). The dead generation fails
//! from the cut on (writes and flushes get EIO, as nothing completes on a disk without
//! power: a process still running for the few milliseconds until it is killed must not see
//! an fsync succeed that was not durable).
//!
//! Limits: one device with one cache (the store and the media fail together, which is the
//! common case of a single machine, not separate media hardware that keeps power); writes
//! are not reordered *across* flushes (a disk that honours flushes never does) and sectors
//! are atomic (512 B); the page cache of the killed system is gone at the cut because the
//! next mount is a new loop device on a new file; the filesystem under the store is ext4
//! only, so spinfs is tested against the states ext4 (with its journal) can leave, which
//! are fewer than POSIX allows (e.g. a rename and the data it replaced are ordered by the
//! journal even in data=writeback).

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

const BLOCK: u64 = 4096;
const SECTOR: usize = 512;
const TTL: Duration = Duration::from_secs(0);

type Block = Arc<[u8; BLOCK as usize]>;

#[derive(Default, Clone)]
struct Image {
    blocks: HashMap<u64, Block>,
}

impl Image {
    fn read(&self, mut off: u64, buf: &mut [u8]) {
        let mut done = 0;
        while done < buf.len() {
            let b = off / BLOCK;
            let within = (off % BLOCK) as usize;
            let n = (BLOCK as usize - within).min(buf.len() - done);
            match self.blocks.get(&b) {
                Some(blk) => buf[done..done + n].copy_from_slice(&blk[within..within + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
            off += n as u64;
        }
    }

    /// Writes `data` at `off`, keeping only the 512-byte sectors for which `keep` says so.
    fn write(&mut self, mut off: u64, data: &[u8], keep: &dyn Fn(usize) -> bool) {
        let start = off;
        let mut done = 0;
        while done < data.len() {
            let b = off / BLOCK;
            let within = (off % BLOCK) as usize;
            let n = (BLOCK as usize - within).min(data.len() - done);
            let blk = self
                .blocks
                .entry(b)
                .or_insert_with(|| Arc::new([0; BLOCK as usize]));
            let blk = Arc::make_mut(blk);
            for i in 0..n {
                let sector = ((off - start) as usize + i) / SECTOR;
                if keep(sector) {
                    blk[within + i] = data[done + i];
                }
            }
            done += n;
            off += n as u64;
        }
    }
}

/// One power-on period of the disk.
struct Generation_ {
    /// What reads see: durable + everything written since.
    current: Image,
    /// What survives a power cut for sure.
    durable: Image,
    /// Writes since the last flush (the volatile cache), in order.
    pending: Vec<(u64, Vec<u8>)>,
    /// Powered off: writes and flushes fail.
    dead: bool,
}

#[derive(Default, Debug, Clone, Copy)]
pub struct DiskStats {
    pub writes: u64,
    pub bytes: u64,
    pub flushes: u64,
    /// At the cuts: pending writes dropped, kept and torn.
    pub dropped: u64,
    pub kept: u64,
    pub torn: u64,
}

struct State {
    gens: Vec<Generation_>,
    size: u64,
    stats: DiskStats,
}

#[derive(Clone)]
pub struct Disk {
    state: Arc<Mutex<State>>,
}

struct DiskFs {
    state: Arc<Mutex<State>>,
}

const ROOT: u64 = 1;

fn attr(ino: u64, size: u64) -> FileAttr {
    let now = SystemTime::UNIX_EPOCH;
    FileAttr {
        ino: INodeNo(ino),
        size: if ino == ROOT { 0 } else { size },
        blocks: 0,
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        kind: if ino == ROOT {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: if ino == ROOT { 0o755 } else { 0o600 },
        nlink: if ino == ROOT { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLOCK as u32,
        flags: 0,
    }
}

impl DiskFs {
    /// Generation index of inode `ino` (file `disk<i>` is inode i + 2).
    fn gen_of(&self, ino: INodeNo) -> Option<usize> {
        let st = self.state.lock().unwrap();
        let g = ino.0.checked_sub(2)? as usize;
        (g < st.gens.len()).then_some(g)
    }
}

impl Filesystem for DiskFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let st = self.state.lock().unwrap();
        let g = name
            .to_str()
            .and_then(|n| n.strip_prefix("disk"))
            .and_then(|n| n.parse::<usize>().ok());
        match g {
            Some(g) if parent.0 == ROOT && g < st.gens.len() => {
                reply.entry(&TTL, &attr(g as u64 + 2, st.size), Generation(0))
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let size = self.state.lock().unwrap().size;
        if ino.0 == ROOT || self.gen_of(ino).is_some() {
            reply.attr(&TTL, &attr(ino.0, size))
        } else {
            reply.error(Errno::ENOENT)
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.gen_of(ino) {
            // no page cache for the device file: every block I/O reaches this code
            Some(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(g) = self.gen_of(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let st = self.state.lock().unwrap();
        let len = (size as u64).min(st.size.saturating_sub(offset)) as usize;
        let mut buf = vec![0; len];
        st.gens[g].current.read(offset, &mut buf);
        reply.data(&buf)
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(g) = self.gen_of(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let mut st = self.state.lock().unwrap();
        if offset + data.len() as u64 > st.size {
            return reply.error(Errno::ENOSPC);
        }
        let gen_ = &mut st.gens[g];
        if gen_.dead {
            // powered off: nothing completes (a success here could reach a process that
            // still runs after the cut and make it believe its data durable)
            return reply.error(Errno::EIO);
        }
        gen_.current.write(offset, data, &|_| true);
        gen_.pending.push((offset, data.to_vec()));
        st.stats.writes += 1;
        st.stats.bytes += data.len() as u64;
        reply.written(data.len() as u32)
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let Some(g) = self.gen_of(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let mut st = self.state.lock().unwrap();
        let gen_ = &mut st.gens[g];
        if gen_.dead {
            return reply.error(Errno::EIO);
        }
        for (off, data) in std::mem::take(&mut gen_.pending) {
            gen_.durable.write(off, &data, &|_| true);
        }
        st.stats.flushes += 1;
        reply.ok()
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        // discard / write-zeroes from the loop driver: a write of zeros
        let Some(g) = self.gen_of(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) == 0 {
            return reply.ok();
        }
        let mut st = self.state.lock().unwrap();
        let end = (offset + length).min(st.size);
        let zeros = vec![0u8; end.saturating_sub(offset) as usize];
        let gen_ = &mut st.gens[g];
        if gen_.dead {
            return reply.error(Errno::EIO);
        }
        gen_.current.write(offset, &zeros, &|_| true);
        gen_.pending.push((offset, zeros));
        reply.ok()
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let n = self.state.lock().unwrap().gens.len();
        for g in offset as usize..n {
            if reply.add(
                INodeNo(g as u64 + 2),
                g as u64 + 1,
                FileType::RegularFile,
                format!("disk{g}"),
            ) {
                break;
            }
        }
        reply.ok()
    }
}

/// The served disk; unmounted on drop (after whatever sits on it).
pub struct DiskMount {
    pub disk: Disk,
    pub dir: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl DiskMount {
    /// Serves an all-zero disk of `size` bytes as `dir/disk0`.
    pub fn new(dir: &Path, size: u64) -> DiskMount {
        std::fs::create_dir_all(dir).unwrap();
        let state = Arc::new(Mutex::new(State {
            gens: vec![Generation_ {
                current: Image::default(),
                durable: Image::default(),
                pending: Vec::new(),
                dead: false,
            }],
            size,
            stats: DiskStats::default(),
        }));
        let mut cfg = Config::default();
        cfg.mount_options = vec![
            MountOption::FSName("spinfs-test-disk".into()),
            MountOption::RW,
        ];
        let session = fuser::spawn_mount(
            DiskFs {
                state: state.clone(),
            },
            dir,
            &cfg,
        )
        .expect("mount the test disk");
        DiskMount {
            disk: Disk { state },
            dir: dir.to_path_buf(),
            session: Some(session),
        }
    }

    /// The file of the current generation.
    pub fn file(&self) -> PathBuf {
        let n = self.disk.state.lock().unwrap().gens.len();
        self.dir.join(format!("disk{}", n - 1))
    }
}

impl Drop for DiskMount {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            // lazily: a failed test may leave a loop device on it, which goes with it
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.dir)
                .status();
            drop(s);
        }
    }
}

impl Disk {
    /// Everything written so far becomes durable (after mkfs, a clean start).
    pub fn settle(&self) {
        let mut st = self.state.lock().unwrap();
        let g = st.gens.last_mut().unwrap();
        for (off, data) in std::mem::take(&mut g.pending) {
            g.durable.write(off, &data, &|_| true);
        }
    }

    /// The power fails now. `strict`: every write since the last flush is lost; otherwise
    /// each is dropped, kept or torn (sectors kept at random), `rand` drawing the choices.
    /// The surviving image becomes the next generation's file (see `DiskMount::file`).
    pub fn cut(&self, strict: bool, rand: &mut dyn FnMut(u64) -> u64) -> DiskStats {
        let mut st = self.state.lock().unwrap();
        let g = st.gens.last_mut().unwrap();
        g.dead = true;
        let mut image = g.durable.clone();
        let pending = std::mem::take(&mut g.pending);
        let (mut dropped, mut kept, mut torn) = (0, 0, 0);
        for (off, data) in &pending {
            match if strict { 0 } else { rand(3) } {
                0 => dropped += 1,
                1 => {
                    image.write(*off, data, &|_| true);
                    kept += 1;
                }
                _ => {
                    let sectors = data.len().div_ceil(SECTOR);
                    let keep: Vec<bool> = (0..sectors).map(|_| rand(2) == 0).collect();
                    image.write(*off, data, &|s| keep[s]);
                    torn += 1;
                }
            }
        }
        // the dead generation keeps its own view for whatever still reads it
        st.gens.push(Generation_ {
            current: image.clone(),
            durable: image,
            pending: Vec::new(),
            dead: false,
        });
        // generations two back are unused by now: free their memory
        let n = st.gens.len();
        if n >= 3 {
            st.gens[n - 3].current = Image::default();
            st.gens[n - 3].durable = Image::default();
        }
        st.stats.dropped += dropped;
        st.stats.kept += kept;
        st.stats.torn += torn;
        DiskStats {
            dropped,
            kept,
            torn,
            ..st.stats
        }
    }

    pub fn stats(&self) -> DiskStats {
        self.state.lock().unwrap().stats
    }
}
