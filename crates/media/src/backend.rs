//! Backends: where container bytes live, chosen by a URI.
//!
//! The interface is at the granularity of (container, offset, length) with whole objects and
//! whole metadata blocks, never a stream: a file, a block device, a tape or an object store
//! (one key per object and per metadata block) can all serve it. `dir:` and `file:` are
//! implemented here; both share one I/O engine, io_uring or pread/pwrite, chosen at runtime.

use crate::buf::ALIGN;
use crate::error::{MediaError, Result};
use io_uring::{IoUring, opcode, types};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// One write of a batch: `data` at byte `offset` of container `container`.
pub struct WriteOp<'a> {
    pub container: u64,
    pub offset: u64,
    pub data: &'a [u8],
    /// Index of the buffer holding `data` among those passed to `register_buffers`.
    pub fixed_buf: Option<u16>,
}

/// A batch of writes started by [`Backend::start_writes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[must_use]
pub struct WriteTicket(pub u64);

/// Where the bytes of containers are stored.
pub trait Backend: Send + Sync {
    /// The medium URI, used in every error.
    fn uri(&self) -> &str;
    /// Number of container slots that may hold a container (0..n are probed by a scan).
    fn container_slots(&self) -> Result<u64>;
    /// Makes container `index` writable from scratch (creates its file, checks capacity).
    fn prepare_container(&self, index: u64) -> Result<()>;
    /// Reads up to `buf.len()` bytes at `offset` of container `container`; returns the
    /// number read (less only at the end of what the container holds).
    fn read_at(&self, container: u64, offset: u64, buf: &mut [u8]) -> Result<usize>;
    /// Writes every op; returns when all are written (not necessarily durable).
    fn write_batch(&self, ops: &[WriteOp<'_>]) -> Result<()>;
    /// Starts writing every op and returns, when the engine can write asynchronously
    /// (io_uring); otherwise writes them before returning. `wait_writes` reports the outcome.
    ///
    /// # Safety
    /// The memory of every op's `data` must stay valid and unmodified until `wait_writes`
    /// has returned for the returned ticket.
    unsafe fn start_writes(&self, ops: &[WriteOp<'_>]) -> Result<WriteTicket> {
        self.write_batch(ops)?;
        Ok(WriteTicket(u64::MAX))
    }
    /// Waits until the writes of `ticket` are done; returns their first error.
    fn wait_writes(&self, _ticket: WriteTicket) -> Result<()> {
        Ok(())
    }
    /// Makes every write to the given containers durable.
    fn sync(&self, containers: &[u64]) -> Result<()>;
    /// Forgets container `index` entirely (used by `Medium::format` to wipe a medium).
    fn erase_container(&self, index: u64) -> Result<()>;
    /// Registers staging buffers for zero-copy writes; returns false when unsupported.
    ///
    /// # Safety
    /// Every `(ptr, len)` must stay valid and unmoved until `unregister_buffers` is called.
    unsafe fn register_buffers(&self, _bufs: &[(*mut u8, usize)]) -> bool {
        false
    }
    /// Forgets buffers registered with `register_buffers`.
    fn unregister_buffers(&self) {}
    /// Name of the write engine in use ("io_uring", "pwrite", ...).
    fn engine_name(&self) -> &'static str;
    /// True when I/O bypasses the page cache.
    fn direct_io(&self) -> bool;
}

/// Which write engine a file backend uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineChoice {
    /// io_uring when the kernel allows it, else pwrite.
    Auto,
    /// io_uring or an error.
    Uring,
    /// Portable pread/pwrite.
    Pwrite,
}

/// How to open a backend.
#[derive(Debug, Clone, Copy)]
pub struct BackendOptions {
    pub engine: EngineChoice,
    /// Try O_DIRECT (falls back to buffered I/O where the filesystem refuses it).
    pub direct: bool,
    /// Only read: nothing is created, container files are opened read-only and every write
    /// is refused, so a reader cannot disturb a daemon writing the same medium.
    pub read_only: bool,
}

impl Default for BackendOptions {
    fn default() -> Self {
        BackendOptions {
            engine: EngineChoice::Auto,
            direct: true,
            read_only: false,
        }
    }
}

/// Opens the backend named by `uri` for containers of `container_size` bytes.
pub fn open_backend(
    uri: &str,
    container_size: u64,
    opts: BackendOptions,
) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(FileBackend::open(uri, container_size, opts)?))
}

enum Place {
    /// One file per container in a directory.
    Dir(PathBuf),
    /// Containers at fixed offsets of one file or block device.
    File {
        file: Arc<File>,
        /// Containers that fit on a block device; None for a growable regular file.
        capacity: Option<u64>,
    },
}

struct Uring {
    ring: IoUring,
    registered: bool,
    next_ticket: u64,
    inflight: HashMap<u64, Inflight>,
}

/// A started batch: what is needed to finish short writes and report errors.
struct Inflight {
    remaining: usize,
    ops: Vec<InflightOp>,
    error: Option<(usize, std::io::Error)>,
    short: Vec<(usize, usize)>,
}

struct InflightOp {
    file: Arc<File>,
    at: u64,
    container: u64,
    offset: u64,
    ptr: *const u8,
    len: usize,
}

// SAFETY: the raw pointers in InflightOp are only dereferenced under the start_writes
// contract (the caller keeps the memory valid until wait_writes returns).
unsafe impl Send for Uring {}

enum Engine {
    Pwrite,
    Uring(Box<Mutex<Uring>>),
}

/// The `dir:` and `file:` backends.
pub struct FileBackend {
    uri: String,
    place: Place,
    container_size: u64,
    direct: bool,
    read_only: bool,
    files: Mutex<HashMap<u64, Arc<File>>>,
    engine: Engine,
}

const RING_ENTRIES: u32 = 64;

fn open_maybe_direct(path: &Path, create: bool, direct: bool) -> std::io::Result<(File, bool)> {
    match open_rw(path, create, direct, true) {
        // A read-only medium can still be listed, read and verified.
        Err(e)
            if !create
                && (e.kind() == std::io::ErrorKind::PermissionDenied
                    || e.raw_os_error() == Some(libc::EROFS)) =>
        {
            open_rw(path, false, direct, false)
        }
        r => r,
    }
}

fn open_rw(path: &Path, create: bool, direct: bool, write: bool) -> std::io::Result<(File, bool)> {
    let mut o = OpenOptions::new();
    o.read(true).write(write);
    if create {
        o.create(true).truncate(true);
    }
    if direct {
        let mut od = o.clone();
        od.custom_flags(libc::O_DIRECT);
        match od.open(path) {
            Ok(f) => return Ok((f, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    Ok((o.open(path)?, false))
}

impl FileBackend {
    /// Opens `dir:PATH` (creating the directory) or `file:PATH` (an existing block device,
    /// or a regular file created when absent).
    pub fn open(uri: &str, container_size: u64, opts: BackendOptions) -> Result<FileBackend> {
        let bad = |reason: &str| MediaError::BadUri {
            uri: uri.to_string(),
            reason: reason.to_string(),
        };
        let (scheme, path) = uri
            .split_once(':')
            .ok_or_else(|| bad("expected dir:PATH or file:PATH"))?;
        if path.is_empty() {
            return Err(bad("empty path"));
        }
        let path = PathBuf::from(path);
        let io = |what: String, e| MediaError::io(uri, what, e);
        let (place, direct) = match scheme {
            "dir" if opts.read_only => {
                if !path.is_dir() {
                    return Err(bad("no such media directory"));
                }
                (Place::Dir(path), false)
            }
            "file" if opts.read_only => {
                let (file, _) = open_rw(&path, false, false, false)
                    .map_err(|e| io(format!("cannot open {}", path.display()), e))?;
                let meta = file
                    .metadata()
                    .map_err(|e| io(format!("cannot stat {}", path.display()), e))?;
                let capacity = if meta.file_type().is_block_device() {
                    use std::io::{Seek, SeekFrom};
                    let mut f = &file;
                    let len = f
                        .seek(SeekFrom::End(0))
                        .map_err(|e| io(format!("cannot size {}", path.display()), e))?;
                    Some(len / container_size)
                } else {
                    None
                };
                (
                    Place::File {
                        file: Arc::new(file),
                        capacity,
                    },
                    false,
                )
            }
            "dir" => {
                std::fs::create_dir_all(&path)
                    .map_err(|e| io(format!("cannot create directory {}", path.display()), e))?;
                // Probe O_DIRECT support once on a scratch file of the directory.
                let probe = path.join(".direct-probe");
                let direct = match open_maybe_direct(&probe, true, opts.direct) {
                    Ok((_, d)) => d,
                    // Read-only: writes will fail with their own error; reads stay buffered.
                    Err(e)
                        if e.kind() == std::io::ErrorKind::PermissionDenied
                            || e.raw_os_error() == Some(libc::EROFS) =>
                    {
                        false
                    }
                    Err(e) => return Err(io(format!("cannot write in {}", path.display()), e)),
                };
                let _ = std::fs::remove_file(&probe);
                (Place::Dir(path), direct)
            }
            "file" => {
                let exists = path.exists();
                let (file, direct) = open_maybe_direct(&path, false, opts.direct)
                    .or_else(|e| {
                        if exists {
                            Err(e)
                        } else {
                            let f = OpenOptions::new()
                                .read(true)
                                .write(true)
                                .create_new(true)
                                .open(&path)?;
                            drop(f);
                            open_maybe_direct(&path, false, opts.direct)
                        }
                    })
                    .map_err(|e| io(format!("cannot open {}", path.display()), e))?;
                let meta = file
                    .metadata()
                    .map_err(|e| io(format!("cannot stat {}", path.display()), e))?;
                let capacity = if meta.file_type().is_block_device() {
                    use std::io::{Seek, SeekFrom};
                    let size = (&file)
                        .seek(SeekFrom::End(0))
                        .map_err(|e| io(format!("cannot size {}", path.display()), e))?;
                    Some(size / container_size)
                } else if meta.is_file() {
                    None
                } else {
                    return Err(bad("file: needs a regular file or a block device"));
                };
                (
                    Place::File {
                        file: Arc::new(file),
                        capacity,
                    },
                    direct,
                )
            }
            _ => return Err(bad("unknown scheme (expected dir: or file:)")),
        };
        let engine = match opts.engine {
            EngineChoice::Pwrite => Engine::Pwrite,
            EngineChoice::Uring | EngineChoice::Auto => match IoUring::new(RING_ENTRIES) {
                Ok(ring) => Engine::Uring(Box::new(Mutex::new(Uring {
                    ring,
                    registered: false,
                    next_ticket: 0,
                    inflight: HashMap::new(),
                }))),
                Err(e) if opts.engine == EngineChoice::Uring => {
                    return Err(io("io_uring is not available".into(), e));
                }
                Err(e) => {
                    tracing::info!("io_uring unavailable ({e}), using pwrite");
                    Engine::Pwrite
                }
            },
        };
        Ok(FileBackend {
            uri: uri.to_string(),
            place,
            container_size,
            direct,
            read_only: opts.read_only,
            files: Mutex::new(HashMap::new()),
            engine,
        })
    }

    fn container_path(dir: &Path, index: u64) -> PathBuf {
        dir.join(format!("c{index:08}.spc"))
    }

    fn refuse_write(&self) -> Result<()> {
        if self.read_only {
            return Err(MediaError::Misuse {
                medium: self.uri.clone(),
                reason: "opened read-only".into(),
            });
        }
        Ok(())
    }

    /// The file holding `container` and the byte offset of the container in it.
    fn locate(&self, container: u64, create: bool) -> Result<(Arc<File>, u64)> {
        if create {
            self.refuse_write()?;
        }
        match &self.place {
            Place::File { file, capacity } => {
                if let Some(cap) = capacity
                    && container >= *cap
                {
                    return Err(MediaError::Full {
                        medium: self.uri.clone(),
                        container,
                    });
                }
                let base =
                    container
                        .checked_mul(self.container_size)
                        .ok_or_else(|| MediaError::Full {
                            medium: self.uri.clone(),
                            container,
                        })?;
                Ok((file.clone(), base))
            }
            Place::Dir(dir) => {
                let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
                if !create && let Some(f) = files.get(&container) {
                    return Ok((f.clone(), 0));
                }
                let path = Self::container_path(dir, container);
                let opened = if self.read_only {
                    open_rw(&path, false, false, false)
                } else {
                    open_maybe_direct(&path, create, self.direct)
                };
                let (f, _) = opened.map_err(|e| {
                    MediaError::io(
                        &self.uri,
                        format!("container {container}: cannot open {}", path.display()),
                        e,
                    )
                })?;
                let f = Arc::new(f);
                files.insert(container, f.clone());
                Ok((f, 0))
            }
        }
    }

    fn pwrite_all(&self, file: &File, data: &[u8], at: u64, container: u64) -> Result<()> {
        file.write_all_at(data, at).map_err(|e| {
            MediaError::io(
                &self.uri,
                format!("container {container}: write at {at}"),
                e,
            )
        })
    }
}

/// Adjacent ops merged: same container, contiguous on the media and in memory, same
/// registered buffer.
struct Run {
    container: u64,
    offset: u64,
    ptr: *const u8,
    len: usize,
    fixed_buf: Option<u16>,
}

/// Largest single write handed to the kernel.
const MAX_RUN: usize = 16 << 20;

fn coalesce(ops: &[WriteOp<'_>]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::with_capacity(ops.len());
    for op in ops {
        debug_assert!(op.offset % ALIGN as u64 == 0 && op.data.len() % ALIGN == 0);
        if let Some(r) = runs.last_mut()
            && r.container == op.container
            && r.offset + r.len as u64 == op.offset
            && r.ptr.wrapping_add(r.len) == op.data.as_ptr()
            && r.fixed_buf == op.fixed_buf
            && r.len + op.data.len() <= MAX_RUN
        {
            r.len += op.data.len();
            continue;
        }
        runs.push(Run {
            container: op.container,
            offset: op.offset,
            ptr: op.data.as_ptr(),
            len: op.data.len(),
            fixed_buf: op.fixed_buf,
        });
    }
    runs
}

/// Moves every available completion to its batch.
fn reap(u: &mut Uring) {
    let mut cq = u.ring.completion();
    cq.sync();
    for cqe in cq {
        let ticket = cqe.user_data() >> 20;
        let i = (cqe.user_data() & ((1 << 20) - 1)) as usize;
        let Some(b) = u.inflight.get_mut(&ticket) else {
            continue;
        };
        b.remaining -= 1;
        let res = cqe.result();
        if res < 0 {
            b.error
                .get_or_insert((i, std::io::Error::from_raw_os_error(-res)));
        } else if (res as usize) < b.ops[i].len {
            b.short.push((i, res as usize));
        }
    }
}

impl Backend for FileBackend {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn container_slots(&self) -> Result<u64> {
        match &self.place {
            Place::File { file, capacity } => match capacity {
                Some(c) => Ok(*c),
                None => {
                    let len = file
                        .metadata()
                        .map_err(|e| MediaError::io(&self.uri, "cannot stat", e))?
                        .len();
                    Ok(len.div_ceil(self.container_size))
                }
            },
            Place::Dir(dir) => {
                // One past the highest container file: a missing file in between is a
                // damaged container to report, not the end of the medium.
                let rd = std::fs::read_dir(dir).map_err(|e| {
                    MediaError::io(&self.uri, format!("cannot list {}", dir.display()), e)
                })?;
                let mut n = 0;
                for entry in rd.flatten() {
                    let name = entry.file_name();
                    let Some(name) = name.to_str() else { continue };
                    if let Some(num) = name.strip_prefix('c').and_then(|r| r.strip_suffix(".spc"))
                        && num.len() == 8
                        && let Ok(i) = num.parse::<u64>()
                    {
                        n = n.max(i + 1);
                    }
                }
                Ok(n)
            }
        }
    }

    fn prepare_container(&self, index: u64) -> Result<()> {
        self.locate(index, true)?;
        if let Place::Dir(dir) = &self.place {
            // The new file's directory entry must be durable before anything in it is.
            File::open(dir).and_then(|d| d.sync_all()).map_err(|e| {
                MediaError::io(
                    &self.uri,
                    format!("cannot sync directory {}", dir.display()),
                    e,
                )
            })?;
        }
        Ok(())
    }

    fn read_at(&self, container: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let (file, base) = match self.locate(container, false) {
            Ok(x) => x,
            // A container file that does not exist holds nothing.
            Err(MediaError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(0);
            }
            Err(e) => return Err(e),
        };
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], base + offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // O_DIRECT refuses a read that starts past the end on some filesystems.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && done > 0 => break,
                Err(e) => {
                    return Err(MediaError::io(
                        &self.uri,
                        format!("container {container}: read at {}", offset + done as u64),
                        e,
                    ));
                }
            }
        }
        Ok(done)
    }

    fn write_batch(&self, ops: &[WriteOp<'_>]) -> Result<()> {
        self.refuse_write()?;
        if let Engine::Pwrite = self.engine {
            for r in coalesce(ops) {
                let (f, base) = self.locate(r.container, false)?;
                // SAFETY: `r` spans memory of adjacent ops borrowed for this whole call.
                let data = unsafe { std::slice::from_raw_parts(r.ptr, r.len) };
                self.pwrite_all(&f, data, base + r.offset, r.container)?;
            }
            return Ok(());
        }
        // SAFETY: `ops` borrows its data for this whole call, and we wait before returning.
        let t = unsafe { self.start_writes(ops) }?;
        self.wait_writes(t)
    }

    unsafe fn start_writes(&self, ops: &[WriteOp<'_>]) -> Result<WriteTicket> {
        self.refuse_write()?;
        let Engine::Uring(uring) = &self.engine else {
            self.write_batch(ops)?;
            return Ok(WriteTicket(u64::MAX));
        };
        let runs = coalesce(ops);
        let mut located = Vec::with_capacity(runs.len());
        for r in &runs {
            let (f, base) = self.locate(r.container, false)?;
            located.push(InflightOp {
                file: f,
                at: base + r.offset,
                container: r.container,
                offset: r.offset,
                ptr: r.ptr,
                len: r.len,
            });
        }
        let mut guard = uring.lock().unwrap_or_else(|p| p.into_inner());
        let u = &mut *guard;
        let ticket = u.next_ticket;
        u.next_ticket += 1;
        for (i, (run, l)) in runs.iter().zip(&located).enumerate() {
            let fd = types::Fd(l.file.as_raw_fd());
            let entry = match run.fixed_buf {
                Some(idx) if u.registered => opcode::WriteFixed::new(fd, l.ptr, l.len as u32, idx)
                    .offset(l.at)
                    .build(),
                _ => opcode::Write::new(fd, l.ptr, l.len as u32)
                    .offset(l.at)
                    .build(),
            }
            .user_data((ticket << 20) | i as u64);
            loop {
                // SAFETY: the data stays valid until wait_writes (the caller's contract), the
                // file is kept alive in `inflight` until its completion is reaped.
                if unsafe { u.ring.submission().push(&entry) }.is_ok() {
                    break;
                }
                // Submission queue full: hand what is queued to the kernel and retry.
                u.ring
                    .submit()
                    .map_err(|e| MediaError::io(&self.uri, "io_uring submit", e))?;
                reap(u);
            }
        }
        u.inflight.insert(
            ticket,
            Inflight {
                remaining: runs.len(),
                ops: located,
                error: None,
                short: Vec::new(),
            },
        );
        u.ring
            .submit()
            .map_err(|e| MediaError::io(&self.uri, "io_uring submit", e))?;
        Ok(WriteTicket(ticket))
    }

    fn wait_writes(&self, ticket: WriteTicket) -> Result<()> {
        let Engine::Uring(uring) = &self.engine else {
            return Ok(());
        };
        let mut guard = uring.lock().unwrap_or_else(|p| p.into_inner());
        let u = &mut *guard;
        loop {
            reap(u);
            match u.inflight.get(&ticket.0) {
                None => return Ok(()),
                Some(b) if b.remaining == 0 => break,
                Some(_) => {}
            }
            if let Err(e) = u.ring.submit_and_wait(1)
                && e.raw_os_error() != Some(libc::EINTR)
            {
                return Err(MediaError::io(&self.uri, "io_uring wait", e));
            }
        }
        let b = u.inflight.remove(&ticket.0).expect("checked above");
        drop(guard);
        if let Some((i, e)) = b.error {
            let op = &b.ops[i];
            return Err(MediaError::io(
                &self.uri,
                format!("container {}: write at {}", op.container, op.offset),
                e,
            ));
        }
        for (i, done) in b.short {
            let op = &b.ops[i];
            // SAFETY: start_writes' contract keeps ptr valid for len bytes until we return.
            let data = unsafe { std::slice::from_raw_parts(op.ptr, op.len) };
            self.pwrite_all(&op.file, &data[done..], op.at + done as u64, op.container)?;
        }
        Ok(())
    }

    fn sync(&self, containers: &[u64]) -> Result<()> {
        match &self.place {
            Place::File { file, .. } => file
                .sync_data()
                .map_err(|e| MediaError::io(&self.uri, "fdatasync", e)),
            Place::Dir(_) => {
                for &c in containers {
                    let (f, _) = self.locate(c, false)?;
                    f.sync_data().map_err(|e| {
                        MediaError::io(&self.uri, format!("container {c}: fdatasync"), e)
                    })?;
                }
                Ok(())
            }
        }
    }

    fn erase_container(&self, index: u64) -> Result<()> {
        self.refuse_write()?;
        match &self.place {
            Place::Dir(dir) => {
                self.files
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&index);
                let path = Self::container_path(dir, index);
                match std::fs::remove_file(&path) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(MediaError::io(
                        &self.uri,
                        format!("container {index}: cannot remove {}", path.display()),
                        e,
                    )),
                }
            }
            Place::File { .. } => {
                // Zero the header and the first record slot: the container then reads as
                // never written.
                let zero = crate::buf::AlignedBuf::zeroed(2 * ALIGN);
                self.write_batch(&[WriteOp {
                    container: index,
                    offset: 0,
                    data: &zero,
                    fixed_buf: None,
                }])
            }
        }
    }

    unsafe fn register_buffers(&self, bufs: &[(*mut u8, usize)]) -> bool {
        let Engine::Uring(u) = &self.engine else {
            return false;
        };
        let mut u = u.lock().unwrap_or_else(|p| p.into_inner());
        if u.registered {
            let _ = u.ring.submitter().unregister_buffers();
        }
        let iov: Vec<libc::iovec> = bufs
            .iter()
            .map(|&(p, l)| libc::iovec {
                iov_base: p.cast(),
                iov_len: l,
            })
            .collect();
        // SAFETY: the caller guarantees the buffers outlive the registration.
        u.registered = unsafe { u.ring.submitter().register_buffers(&iov) }.is_ok();
        u.registered
    }

    fn unregister_buffers(&self) {
        if let Engine::Uring(u) = &self.engine {
            let mut u = u.lock().unwrap_or_else(|p| p.into_inner());
            if u.registered {
                let _ = u.ring.submitter().unregister_buffers();
                u.registered = false;
            }
        }
    }

    fn engine_name(&self) -> &'static str {
        match self.engine {
            Engine::Pwrite => "pwrite",
            Engine::Uring(_) => "io_uring",
        }
    }

    fn direct_io(&self) -> bool {
        self.direct
    }
}
