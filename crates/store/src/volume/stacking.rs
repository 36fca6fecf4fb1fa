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
use crate::lower::{resolve_path, stacked_read, stacked_seek, tree_stack_map_at};
use crate::stackmap::{MAPS_DIR, STACK_XATTR, StackMap, StackRef};
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
    /// Chunk maps written to a sidecar file (too long for the xattr).
    pub map_files_written: AtomicU64,
}

/// A snapshot of [`StackCounters`].
#[derive(Debug, Clone, Copy, Default)]
pub struct StackStats {
    pub stacked_copy_ups: u64,
    pub chunks_copied: u64,
    pub bytes_copied: u64,
    pub unstacked: u64,
    pub map_files_written: u64,
}

pub(super) struct StackState {
    /// Read-write descriptor of the upper file.
    pub(super) fd: OwnedFd,
    /// `None` once every chunk is upper (an ordinary file still served by the daemon).
    pub(super) map: Option<StackMap>,
    /// The sidecar file the durable map is in (`None`: in the xattr, or no map).
    pub(super) stored: Option<StackRef>,
    /// A directory of the generation the upper file is in (its work directory): sidecar maps
    /// are at `../stackmaps` from there.
    pub(super) gen_dir: Arc<OwnedFd>,
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
            map_files_written: c.map_files_written.load(Ordering::Relaxed),
        }
    }

    /// Sets the stacking granule (the store's chunk size, a power of two ≥ 4 KiB).
    pub fn set_chunk_size(&self, size: u64) {
        if size.is_power_of_two() && (4096..=(1 << 30)).contains(&size) {
            self.chunk_bits
                .store(size.trailing_zeros() as u8, Ordering::Relaxed);
        }
    }

    /// Chunk maps whose encoding is longer than `bytes` are kept in a sidecar file rather than
    /// in the upper file's xattr (0: always a sidecar; for tests).
    pub fn set_stack_map_inline_max(&self, bytes: usize) {
        self.stack_inline_max.store(bytes, Ordering::Relaxed);
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
        // The caller fsyncs the file (its xattr) before renaming it into the tree.
        self.store_map(f, self.work().as_fd(), &map, None)?;
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
        let gen_dir = self.work();
        let Some((map, stored)) = tree_stack_map_at(upper, gen_dir.as_fd())? else {
            return Ok(None);
        };
        let fd = sys::reopen(upper, libc::O_RDWR)?;
        let sf = Arc::new(StackedFile {
            ino,
            st: RwLock::new(StackState {
                fd,
                map: Some(map),
                stored,
                gen_dir,
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
                stored: None,
                gen_dir: self.work(),
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
        loop {
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
            #[cfg(test)]
            if let Some(hook) = self.before_lower_resolve_hook.lock().unwrap().take() {
                hook();
            }
            let roots = match &st.below {
                None => stack.lower_roots()?,
                Some(layers) => layers
                    .iter()
                    .map(LowerPart::image_root)
                    .collect::<SysResult<Vec<_>>>()?,
            };
            let found = resolve_path(&roots, &map.lower_path);
            // A seal that completed meanwhile deleted the frozen tree these roots began with
            // (it is deleted once its layer is swapped in): the lower file was then found
            // further down, an older version of it, or not at all. Resolve again in the
            // stack that replaced it (pinned layers are archived ones: never deleted).
            if st.below.is_none() && self.stack().epoch != stack.epoch {
                continue;
            }
            let found = match found? {
                Some(p) if p.kind() == FileKind::Regular && p.size() == map.lower_size => Some(p),
                other => {
                    tracing::error!(
                        ino = sf.ino,
                        path = %String::from_utf8_lossy(&map.lower_path),
                        lower_size = map.lower_size,
                        found = ?other.as_ref().map(|p| (p.kind(), p.size(), p.whereabouts())),
                        pinned = st.below.is_some(),
                        generation = stack.generation,
                        epoch = stack.epoch,
                        frozen = ?stack.frozen.as_ref().map(|f| f.generation),
                        "the lower file of a stacked file is missing or changed"
                    );
                    return Err(Errno::EIO);
                }
            };
            *sf.lower.lock().unwrap() = Some((epoch, found.clone()));
            return Ok(found);
        }
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

    /// Makes `map` the durable chunk map of the upper file `f` of the generation that
    /// `gen_dir` (its tree root or work directory) belongs to, replacing the sidecar `old`:
    /// in the xattr when it is short enough, else in a new sidecar file made durable (file
    /// and directory) before the xattr names it. The superseded sidecar is removed once the
    /// new xattr is durable (`f` is fsync'ed then). Returns the sidecar the map is now in.
    fn store_map(
        &self,
        f: BorrowedFd<'_>,
        gen_dir: BorrowedFd<'_>,
        map: &StackMap,
        old: Option<StackRef>,
    ) -> SysResult<Option<StackRef>> {
        let enc = map.encode();
        let mut new = None;
        let inline = enc.len() <= self.stack_inline_max.load(Ordering::Relaxed)
            && match sys::setxattr_fd(f, &xattr_name(), &enc, 0) {
                Ok(()) => true,
                // Too long for this filesystem's xattr space: a sidecar after all.
                Err(Errno(libc::E2BIG)) | Err(Errno(libc::ENOSPC)) | Err(Errno(libc::ERANGE)) => {
                    false
                }
                Err(e) => return Err(e),
            };
        if !inline {
            let (dir, r) = self.write_sidecar(gen_dir, &enc)?;
            if let Err(e) = sys::setxattr_fd(f, &xattr_name(), &r.encode(), 0) {
                let _ = sys::unlinkat(dir.as_fd(), &cstr(r.file_name().as_bytes()), 0);
                return Err(e);
            }
            self.stack_counters
                .map_files_written
                .fetch_add(1, Ordering::Relaxed);
            new = Some(r);
        }
        if let Some(o) = old.filter(|o| Some(*o) != new) {
            // The old sidecar goes only once no crash can bring back the xattr naming it.
            sys::fsync(f, false)?;
            spinfs_failpoints::fail_point!("stack_map.switched");
            remove_sidecar(gen_dir, &o);
        }
        Ok(new)
    }

    /// Writes `enc` to a new sidecar file of the generation of `gen_dir` and makes it durable
    /// (file, directory, and the directory's own entry). Returns the
    /// sidecar directory and the reference to the file.
    fn write_sidecar(&self, gen_dir: BorrowedFd<'_>, enc: &[u8]) -> SysResult<(OwnedFd, StackRef)> {
        let maps = cstr(format!("../{MAPS_DIR}").as_bytes());
        match sys::mkdirat(gen_dir, &maps, 0o700) {
            Ok(()) | Err(Errno(libc::EEXIST)) => {}
            Err(e) => return Err(e),
        }
        let dir = sys::openat(gen_dir, &maps, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        // The directory's entry durable too, whoever made it: a thread that found it made by
        // another may get here before that one's fsync (cheap once it is: nothing to commit).
        let parent = sys::openat(gen_dir, c"..", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        sys::fsync(parent.as_fd(), false)?;
        let (file, r) = loop {
            let id = self.next_map_id.fetch_add(1, Ordering::Relaxed);
            let r = StackRef::for_bytes(id, enc);
            match sys::openat(
                dir.as_fd(),
                &cstr(r.file_name().as_bytes()),
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                0o600,
            ) {
                Ok(file) => break (file, r),
                Err(Errno(libc::EEXIST)) => continue,
                Err(e) => return Err(e),
            }
        };
        let written = (|| {
            let mut done = 0;
            while done < enc.len() {
                done += sys::pwrite(file.as_fd(), &enc[done..], done as u64)?;
            }
            sys::fsync(file.as_fd(), true)?;
            sys::fsync(dir.as_fd(), false)
        })();
        if let Err(e) = written {
            let _ = sys::unlinkat(dir.as_fd(), &cstr(r.file_name().as_bytes()), 0);
            return Err(e);
        }
        spinfs_failpoints::fail_point!("stack_map.sidecar_synced");
        Ok((dir, r))
    }

    /// Writes the map (after the data it describes), or removes it when nothing is below. An
    /// unlinked file keeps its map in memory only (a crash takes the file with it).
    fn commit_map(&self, sf: &StackedFile, st: &mut StackState) -> SysResult<()> {
        let Some(map) = &st.map else { return Ok(()) };
        let linked = sys::fstat(st.fd.as_fd())?.st_nlink > 0;
        if !map.all_upper() {
            if linked {
                st.stored = self.store_map(st.fd.as_fd(), st.gen_dir.as_fd(), map, st.stored)?;
            } else if let Some(o) = st.stored.take() {
                remove_sidecar(st.gen_dir.as_fd(), &o);
            }
            return Ok(());
        }
        match sys::removexattr_fd(st.fd.as_fd(), &xattr_name()) {
            Ok(()) | Err(Errno(libc::ENODATA)) => {}
            Err(e) => return Err(e),
        }
        if let Some(o) = st.stored.take() {
            if linked {
                sys::fsync(st.fd.as_fd(), false)?;
                spinfs_failpoints::fail_point!("stack_map.unstacked");
            }
            remove_sidecar(st.gen_dir.as_fd(), &o);
        }
        st.map = None;
        *sf.lower.lock().unwrap() = None;
        self.stack_counters
            .unstacked
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Prepares `[off, off + len)` for a change that clears its bytes: below chunks it
    /// touches are copied up unless the change clears all their bytes, and the map marks them
    /// upper (a crash after the map and before the change shows zeros there, its result).
    fn stacked_prepare(
        &self,
        sf: &StackedFile,
        st: &mut StackState,
        off: u64,
        len: u64,
    ) -> SysResult<()> {
        let touched = self.stacked_copy_touched(sf, st, off, len)?;
        self.stacked_mark_upper(sf, st, &touched)
    }

    /// The below chunks `[off, off + len)` touches, after copying up those whose old bytes
    /// the change does not wholly replace. The map is not changed here.
    fn stacked_copy_touched(
        &self,
        sf: &StackedFile,
        st: &StackState,
        off: u64,
        len: u64,
    ) -> SysResult<Vec<u64>> {
        let Some(map) = &st.map else {
            return Ok(Vec::new());
        };
        let size = sys::fstat(st.fd.as_fd())?.st_size as u64;
        let touched = map.touched(off, len, size);
        let copy: Vec<u64> = touched.iter().filter(|t| t.1).map(|t| t.0).collect();
        self.copy_chunks(sf, st, &copy)?;
        Ok(touched.into_iter().map(|t| t.0).collect())
    }

    /// The chunks `touched` become upper in the map, which is committed.
    fn stacked_mark_upper(
        &self,
        sf: &StackedFile,
        st: &mut StackState,
        touched: &[u64],
    ) -> SysResult<()> {
        let Some(map) = st.map.as_mut() else {
            return Ok(());
        };
        if touched.is_empty() {
            return Ok(());
        }
        for c in touched {
            map.set_upper(*c, c + 1);
        }
        self.commit_map(sf, st)
    }

    /// A write: below chunks it touches are copied up first unless it replaces all their
    /// bytes; then the data goes in and is made durable *before* the map says those chunks
    /// are upper, so a crash leaves each of them below (its old bytes) or upper with the new
    /// bytes, never upper without them (a chunk of zeros where the write replaced it whole).
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
        let touched = self.stacked_copy_touched(sf, &st, offset, data.len() as u64)?;
        let mut done = 0;
        while done < data.len() {
            done += sys::pwrite(st.fd.as_fd(), &data[done..], offset + done as u64)?;
        }
        if !touched.is_empty() {
            sys::fsync(st.fd.as_fd(), true)?;
            self.stacked_mark_upper(sf, &mut st, &touched)?;
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
        let frozen = sys::fstat(st.fd.as_fd())?;
        let node = self.node(sf.ino)?;
        let place = self.place(sf.ino, &node)?;
        let upper = match place.upper {
            Some(u) => u,
            None => self.copy_up(sf.ino)?,
        };
        let gen_dir = self.work();
        let (map, stored) = match tree_stack_map_at(upper.as_fd(), gen_dir.as_fd())? {
            Some((m, r)) => (Some(m), r),
            None => (None, None),
        };
        let new = sys::fstat(upper.as_fd())?;
        let want = (frozen.st_size > 0).then_some(frozen.st_size as u64);
        if new.st_ino == frozen.st_ino || map.as_ref().map(|m| m.lower_size) != want {
            // The copy must be the frozen file's stacked copy (an empty file: an ordinary
            // one), in the new tree.
            tracing::error!(
                ino = sf.ino,
                frozen_size = frozen.st_size,
                frozen_backing = frozen.st_ino,
                copy_backing = new.st_ino,
                lower_size = ?map.as_ref().map(|m| m.lower_size),
                "a stacked file carried over does not stand on its frozen copy"
            );
        }
        st.fd = sys::reopen(upper.as_fd(), libc::O_RDWR)?;
        st.map = map;
        st.stored = stored;
        st.gen_dir = gen_dir;
        st.below = None;
        *sf.lower.lock().unwrap() = None;
        Ok(())
    }
}

/// Removes a superseded sidecar map (best effort: one left behind is unreferenced, and goes
/// with its generation).
fn remove_sidecar(gen_dir: BorrowedFd<'_>, r: &StackRef) {
    let path = cstr(r.path_from_gen_child().as_bytes());
    if let Err(e) = sys::unlinkat(gen_dir, &path, 0)
        && e != Errno::ENOENT
    {
        tracing::warn!(
            sidecar = r.file_name(),
            "cannot remove a superseded chunk map: {e}"
        );
    }
}

/// A starting point for sidecar ids that differs between daemon runs (ids are created
/// exclusively, so a collision only costs a retry).
pub(super) fn first_map_id() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    now ^ (u64::from(std::process::id()) << 40)
}
