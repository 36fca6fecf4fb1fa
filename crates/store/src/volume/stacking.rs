//! File stacking in the volume: stacked files (see `crate::stackmap`) served by the daemon.
//!
//! A stacked file has one [`StackedFile`] while anything holds it (its open handles, an
//! operation in progress), shared through the volume's registry so that every handle of the
//! inode sees one map and one upper descriptor. Reads assemble upper chunks and lower bytes;
//! a change to a below chunk copies that chunk up first (made durable before the map says so:
//! a crash leaves either the old map, the chunk still read from below, or the new map with
//! the chunk's old bytes in the upper file). When no chunk is below any more the map is
//! removed and the file is an ordinary one again (passthrough for its next opens).

use super::*;
use crate::lower::{resolve_path, stacked_read, stacked_seek, tree_stack_map};
use crate::stackmap::{STACK_XATTR, StackMap};
use std::sync::Weak;

/// Counters of file stacking (for `spinfs status`).
#[derive(Debug, Default)]
pub struct StackCounters {
    /// Metadata-only copy-ups (a lower regular file got a stacked upper file, no data).
    pub stacked_copy_ups: AtomicU64,
    /// Chunks copied up from below, and their bytes (data actually written to the SSD).
    pub chunks_copied: AtomicU64,
    pub bytes_copied: AtomicU64,
    /// Stacked files that became ordinary files (nothing left below).
    pub unstacked: AtomicU64,
}

/// A snapshot of [`StackCounters`].
#[derive(Debug, Clone, Copy, Default)]
pub struct StackStats {
    pub stacked_copy_ups: u64,
    pub chunks_copied: u64,
    pub bytes_copied: u64,
    pub unstacked: u64,
}

pub(super) struct StackState {
    /// Read-write descriptor of the upper file.
    pub(super) fd: OwnedFd,
    /// `None` once every chunk is upper (an ordinary file still served by the daemon).
    pub(super) map: Option<StackMap>,
    /// Where the lower file is found: `None` = below the writable tree (the volume's current
    /// lower layers); `Some` = these archived layers (the file stayed in a frozen or
    /// unlinked state).
    pub(super) below: Option<Vec<Arc<ArchivedLayer>>>,
}

pub(super) struct StackedFile {
    pub(super) ino: u64,
    pub(super) st: RwLock<StackState>,
    /// The lower file resolved for the stack epoch it was resolved in.
    lower: Mutex<Option<(u64, Option<LowerPart>)>>,
}

fn xattr_name() -> CString {
    cstr(STACK_XATTR)
}

impl Volume {
    pub fn stack_stats(&self) -> StackStats {
        let c = &self.stack_counters;
        StackStats {
            stacked_copy_ups: c.stacked_copy_ups.load(Ordering::Relaxed),
            chunks_copied: c.chunks_copied.load(Ordering::Relaxed),
            bytes_copied: c.bytes_copied.load(Ordering::Relaxed),
            unstacked: c.unstacked.load(Ordering::Relaxed),
        }
    }

    /// Sets the stacking granule (the store's chunk size, a power of two ≥ 4 KiB).
    pub fn set_chunk_size(&self, size: u64) {
        if size.is_power_of_two() && (4096..=(1 << 30)).contains(&size) {
            self.chunk_bits
                .store(size.trailing_zeros() as u8, Ordering::Relaxed);
        }
    }

    /// Makes `dir/name` in the work directory a stacked copy of the lower regular file
    /// `part`: a sparse file of its size whose every chunk is below. No data is copied.
    pub(super) fn make_stacked(&self, part: &LowerPart, f: BorrowedFd<'_>) -> SysResult<()> {
        let size = part.size();
        let map = StackMap::new(
            self.chunk_bits.load(Ordering::Relaxed),
            part.path().to_vec(),
            size,
        );
        sys::ftruncate(f, size)?;
        sys::setxattr_fd(f, &xattr_name(), &map.encode(), 0)?;
        self.stack_counters
            .stacked_copy_ups
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The live stacked state of `ino` whose upper file is `upper` (`O_PATH`), if the file is
    /// stacked or already shared as such.
    pub(super) fn stacked_file(
        &self,
        ino: u64,
        upper: BorrowedFd<'_>,
    ) -> SysResult<Option<Arc<StackedFile>>> {
        let mut reg = self.stacked.lock().unwrap();
        if let Some(sf) = reg.get(&ino).and_then(Weak::upgrade) {
            return Ok(Some(sf));
        }
        let Some(map) = tree_stack_map(upper)? else {
            return Ok(None);
        };
        let fd = sys::reopen(upper, libc::O_RDWR)?;
        let sf = Arc::new(StackedFile {
            ino,
            st: RwLock::new(StackState {
                fd,
                map: Some(map),
                below: None,
            }),
            lower: Mutex::new(None),
        });
        reg.retain(|_, w| w.strong_count() > 0);
        reg.insert(ino, Arc::downgrade(&sf));
        Ok(Some(sf))
    }

    /// The shared daemon-served state of the regular file `ino` (stacked or not) whose upper
    /// file is `upper`.
    pub(super) fn daemon_file(
        &self,
        ino: u64,
        upper: BorrowedFd<'_>,
    ) -> SysResult<Arc<StackedFile>> {
        if let Some(sf) = self.stacked_file(ino, upper)? {
            return Ok(sf);
        }
        let mut reg = self.stacked.lock().unwrap();
        if let Some(sf) = reg.get(&ino).and_then(Weak::upgrade) {
            return Ok(sf);
        }
        let sf = Arc::new(StackedFile {
            ino,
            st: RwLock::new(StackState {
                fd: sys::reopen(upper, libc::O_RDWR)?,
                map: None,
                below: None,
            }),
            lower: Mutex::new(None),
        });
        reg.insert(ino, Arc::downgrade(&sf));
        Ok(sf)
    }

    /// The live stacked state of `ino` if any handle or operation holds one.
    pub(super) fn live_stacked(&self, ino: u64) -> Option<Arc<StackedFile>> {
        self.stacked
            .lock()
            .unwrap()
            .get(&ino)
            .and_then(Weak::upgrade)
    }

    /// The lower file of a stacked file.
    fn stacked_lower(&self, sf: &StackedFile, st: &StackState) -> SysResult<Option<LowerPart>> {
        let Some(map) = &st.map else {
            return Ok(None);
        };
        let stack = self.stack();
        let epoch = match &st.below {
            None => stack.epoch,
            Some(_) => u64::MAX,
        };
        if let Some((e, l)) = sf.lower.lock().unwrap().as_ref()
            && *e == epoch
        {
            return Ok(l.clone());
        }
        let roots = match &st.below {
            None => stack.lower_roots()?,
            Some(layers) => layers
                .iter()
                .map(LowerPart::image_root)
                .collect::<SysResult<Vec<_>>>()?,
        };
        let found = resolve_path(&roots, &map.lower_path)?;
        let found = match found {
            Some(p) if p.kind() == FileKind::Regular && p.size() == map.lower_size => Some(p),
            other => {
                tracing::error!(
                    ino = sf.ino,
                    path = %String::from_utf8_lossy(&map.lower_path),
                    found = other.is_some(),
                    "the lower file of a stacked file is missing or changed"
                );
                return Err(Errno::EIO);
            }
        };
        *sf.lower.lock().unwrap() = Some((epoch, found.clone()));
        Ok(found)
    }

    pub(super) fn stacked_read(
        &self,
        sf: &StackedFile,
        offset: u64,
        buf: &mut [u8],
    ) -> SysResult<usize> {
        let st = sf.st.read().unwrap();
        match &st.map {
            None => {
                let mut done = 0;
                while done < buf.len() {
                    let n = sys::pread(st.fd.as_fd(), &mut buf[done..], offset + done as u64)?;
                    if n == 0 {
                        break;
                    }
                    done += n;
                }
                Ok(done)
            }
            Some(map) => {
                let lower = self.stacked_lower(sf, &st)?;
                stacked_read(st.fd.as_fd(), map, lower.as_ref(), offset, buf)
            }
        }
    }

    pub(super) fn stacked_seek(
        &self,
        sf: &StackedFile,
        offset: u64,
        data: bool,
    ) -> SysResult<Option<u64>> {
        let st = sf.st.read().unwrap();
        match &st.map {
            None => {
                let whence = if data {
                    libc::SEEK_DATA
                } else {
                    libc::SEEK_HOLE
                };
                match sys::lseek(st.fd.as_fd(), offset as i64, whence) {
                    Ok(o) => Ok(Some(o as u64)),
                    Err(Errno(libc::ENXIO)) => Ok(None),
                    Err(e) => Err(e),
                }
            }
            Some(map) => {
                let lower = self.stacked_lower(sf, &st)?;
                stacked_seek(st.fd.as_fd(), map, lower.as_ref(), offset, data)
            }
        }
    }

    /// Copies the below chunks `chunks` up (their current bytes into the upper file; zeros
    /// are left as holes) and makes them durable. The map is not changed here.
    fn copy_chunks(&self, sf: &StackedFile, st: &StackState, chunks: &[u64]) -> SysResult<()> {
        let Some(map) = &st.map else { return Ok(()) };
        if chunks.is_empty() {
            return Ok(());
        }
        let lower = self.stacked_lower(sf, st)?;
        let size = sys::fstat(st.fd.as_fd())?.st_size as u64;
        let cs = map.chunk_size();
        let mut buf = vec![0u8; cs.min(4 << 20) as usize];
        let mut written = 0u64;
        for &c in chunks {
            let (ls, le) = map.lower_range(c);
            let end = le.min(size).min((c + 1) * cs);
            let mut pos = ls;
            while pos < end {
                let want = ((end - pos) as usize).min(buf.len());
                let n = stacked_read(st.fd.as_fd(), map, lower.as_ref(), pos, &mut buf[..want])?;
                if n == 0 {
                    break;
                }
                // Block by block, skipping zeros (the upper file keeps holes there).
                let mut i = 0;
                while i < n {
                    let j = (i + 4096).min(n);
                    if buf[i..j].iter().any(|&b| b != 0) {
                        let mut k = j;
                        while k < n && buf[k..(k + 4096).min(n)].iter().any(|&b| b != 0) {
                            k = (k + 4096).min(n);
                        }
                        let mut done = i;
                        while done < k {
                            done += sys::pwrite(st.fd.as_fd(), &buf[done..k], pos + done as u64)?;
                        }
                        written += (k - i) as u64;
                        i = k;
                    } else {
                        i = j;
                    }
                }
                pos += n as u64;
            }
        }
        sys::fsync(st.fd.as_fd(), true)?;
        let c = &self.stack_counters;
        c.chunks_copied
            .fetch_add(chunks.len() as u64, Ordering::Relaxed);
        c.bytes_copied.fetch_add(written, Ordering::Relaxed);
        Ok(())
    }

    /// Writes the map (after the data it describes), or removes it when nothing is below. A
    /// map too large for an xattr makes the file whole: its remaining chunks are copied up.
    fn commit_map(&self, sf: &StackedFile, st: &mut StackState) -> SysResult<()> {
        let Some(map) = &st.map else { return Ok(()) };
        if !map.all_upper() {
            match sys::setxattr_fd(st.fd.as_fd(), &xattr_name(), &map.encode(), 0) {
                Ok(()) => return Ok(()),
                Err(Errno(libc::E2BIG)) | Err(Errno(libc::ENOSPC)) | Err(Errno(libc::ERANGE)) => {
                    let rest: Vec<u64> = map.below_runs().iter().flat_map(|&(s, e)| s..e).collect();
                    self.copy_chunks(sf, st, &rest)?;
                }
                Err(e) => return Err(e),
            }
        }
        match sys::removexattr_fd(st.fd.as_fd(), &xattr_name()) {
            Ok(()) | Err(Errno(libc::ENODATA)) => {}
            Err(e) => return Err(e),
        }
        st.map = None;
        *sf.lower.lock().unwrap() = None;
        self.stack_counters
            .unstacked
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Prepares `[off, off + len)` for a change that replaces or clears its bytes: below
    /// chunks it touches are copied up unless the change replaces all their bytes, and the
    /// map marks them upper.
    fn stacked_prepare(
        &self,
        sf: &StackedFile,
        st: &mut StackState,
        off: u64,
        len: u64,
    ) -> SysResult<()> {
        let Some(map) = &st.map else { return Ok(()) };
        let size = sys::fstat(st.fd.as_fd())?.st_size as u64;
        let touched = map.touched(off, len, size);
        if touched.is_empty() {
            return Ok(());
        }
        let copy: Vec<u64> = touched.iter().filter(|t| t.1).map(|t| t.0).collect();
        self.copy_chunks(sf, st, &copy)?;
        let map = st.map.as_mut().expect("checked above");
        for (c, _) in &touched {
            map.set_upper(*c, c + 1);
        }
        self.commit_map(sf, st)
    }

    pub(super) fn stacked_write(
        &self,
        sf: &StackedFile,
        offset: u64,
        data: &[u8],
        kill_suidgid: bool,
    ) -> SysResult<usize> {
        let mut st = sf.st.write().unwrap();
        if kill_suidgid {
            Self::clear_setid(st.fd.as_fd())?;
        }
        self.stacked_prepare(sf, &mut st, offset, data.len() as u64)?;
        let mut done = 0;
        while done < data.len() {
            done += sys::pwrite(st.fd.as_fd(), &data[done..], offset + done as u64)?;
        }
        Ok(done)
    }

    pub(super) fn stacked_truncate(&self, sf: &StackedFile, size: u64) -> SysResult<()> {
        let mut st = sf.st.write().unwrap();
        if let Some(map) = &mut st.map {
            let before = map.clone();
            map.truncate(size);
            if *map != before {
                // The map first: a crash must not let cut-off lower bytes come back.
                self.commit_map(sf, &mut st)?;
            }
        }
        sys::ftruncate(st.fd.as_fd(), size)
    }

    pub(super) fn stacked_fallocate(
        &self,
        sf: &StackedFile,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> SysResult<()> {
        let mut st = sf.st.write().unwrap();
        if st.map.is_some() {
            let clears = mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0;
            let shifts =
                mode & (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) != 0;
            if shifts {
                // Data moves between chunks: make the file whole first.
                let map = st.map.as_mut().expect("checked");
                let rest: Vec<u64> = map.below_runs().iter().flat_map(|&(s, e)| s..e).collect();
                self.copy_chunks(sf, &st, &rest)?;
                st.map.as_mut().expect("checked").set_upper(0, u64::MAX);
                self.commit_map(sf, &mut st)?;
            } else if clears {
                let size = sys::fstat(st.fd.as_fd())?.st_size as u64;
                let end = if mode & libc::FALLOC_FL_KEEP_SIZE != 0 {
                    (offset + len).min(size)
                } else {
                    offset + len
                };
                if end > offset {
                    self.stacked_prepare(sf, &mut st, offset, end - offset)?;
                }
            }
            // Plain allocation changes no bytes: below chunks stay below.
        }
        sys::fallocate(st.fd.as_fd(), mode, offset, len)
    }

    pub(super) fn stacked_fsync(&self, sf: &StackedFile, datasync: bool) -> SysResult<()> {
        let st = sf.st.read().unwrap();
        sys::fsync(st.fd.as_fd(), datasync)
    }

    /// Bytes a stacked file holds on the SSD (for the writable layer's total).
    pub(super) fn stacked_usage(&self, sf: &StackedFile) -> u64 {
        let st = sf.st.read().unwrap();
        match sys::fstat(st.fd.as_fd()) {
            Ok(s) if st.map.is_some() => s.st_blocks as u64 * 512,
            Ok(s) => s.st_size as u64,
            Err(_) => 0,
        }
    }

    /// The stacked files some handle or node still holds.
    fn live_stacked_files(&self) -> Vec<Arc<StackedFile>> {
        self.stacked
            .lock()
            .unwrap()
            .values()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// At a freeze, before the stack changes: every live stacked file resolves its lower
    /// file in `below` (the layers below the tree being frozen) until it is carried over.
    pub(super) fn pin_stacked(&self, below: &[Arc<ArchivedLayer>]) -> Vec<Arc<StackedFile>> {
        let live = self.live_stacked_files();
        let mut carried = Vec::new();
        for sf in live {
            let mut st = sf.st.write().unwrap();
            if st.below.is_none() {
                st.below = Some(below.to_vec());
                *sf.lower.lock().unwrap() = None;
                drop(st);
                carried.push(sf);
            }
        }
        carried
    }

    /// After a freeze: the stacked files `carried` continue in the new writable tree. Their
    /// upper files now belong to the frozen generation (sealed as they are); the new tree gets
    /// metadata-only stacked copies whose lower files are those frozen ones, and every handle
    /// moves along (they share the state). An unlinked file keeps its upper file (nothing
    /// seals it) and its pinned lower layers.
    pub(super) fn carry_stacked_over(&self, carried: Vec<Arc<StackedFile>>) {
        for sf in &carried {
            if let Err(e) = self.carry_one(sf) {
                tracing::warn!(
                    ino = sf.ino,
                    "a stacked file stays in the frozen generation: {e}"
                );
            }
        }
        // Their handles count what the new tree holds of them from now on.
        let handles: Vec<Arc<Handle>> = self.handles.read().unwrap().values().cloned().collect();
        for h in handles {
            if let HandleKind::Stacked(sf) = &h.kind
                && carried.iter().any(|c| Arc::ptr_eq(c, sf))
            {
                let now = self.stacked_usage(sf);
                h.counted.store(now, Ordering::Relaxed);
                if h.writable {
                    self.upper_bytes.fetch_add(now as i64, Ordering::Relaxed);
                }
            }
        }
    }

    /// After a seal: stacked files forget lower files resolved in the stack before it, which
    /// may be files of the tree the seal deleted: a cached descriptor would keep such a file,
    /// and the SSD space it holds, alive until the next freeze (a writer that never reads
    /// below would never resolve it again). They resolve again, in the archived layer, when
    /// next needed.
    pub(super) fn forget_stale_lowers(&self, epoch: u64) {
        let live = self.live_stacked_files();
        for sf in live {
            let mut lower = sf.lower.lock().unwrap();
            if lower
                .as_ref()
                .is_some_and(|(e, _)| *e != u64::MAX && *e < epoch)
            {
                *lower = None;
            }
        }
    }

    fn carry_one(&self, sf: &Arc<StackedFile>) -> SysResult<()> {
        let mut st = sf.st.write().unwrap();
        if sys::fstat(st.fd.as_fd())?.st_nlink == 0 {
            return Ok(());
        }
        // Anything written so far must be in the frozen copy before it is sealed.
        sys::fsync(st.fd.as_fd(), true)?;
        let node = self.node(sf.ino)?;
        let place = self.place(sf.ino, &node)?;
        let upper = match place.upper {
            Some(u) => u,
            None => self.copy_up(sf.ino)?,
        };
        let map = tree_stack_map(upper.as_fd())?;
        st.fd = sys::reopen(upper.as_fd(), libc::O_RDWR)?;
        st.map = map;
        st.below = None;
        *sf.lower.lock().unwrap() = None;
        Ok(())
    }
}
