//! A backend wrapper that injects faults, for tests and benchmarks of failing and slow media.
//!
//! [`FaultBackend`] forwards everything to the backend it wraps, except the operations that
//! match one of its [`FaultRule`]s: those stall (then proceed, or wait until the rule is
//! switched off), fail with EIO, or (reads) return fewer bytes than asked. A rule picks
//! operations by kind, container, area (metadata or data) and object range, may skip its
//! first matches, and may be active only while a file exists, so that a test switches a
//! fault on and off on a running mount. Nothing here is meant for production media.

use crate::backend::{Backend, WriteOp, WriteTicket};
use crate::error::{MediaError, Result};
use crate::layout::Geometry;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Which operations a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    Read,
    /// Data or metadata writes, and preparing a new container.
    Write,
    /// fdatasync of containers.
    Sync,
    Any,
}

/// Which part of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultArea {
    /// The header and record log (the first `reserved` bytes).
    Metadata,
    /// Objects.
    Data,
    Any,
}

/// What happens to a matching operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// Fails with EIO.
    Error,
    /// Waits this long, then proceeds normally.
    Stall(Duration),
    /// Waits while the rule is active (its `while_exists` file exists; forever without
    /// one), then proceeds normally.
    Hang,
    /// Reads return only the first half of the bytes asked (at least one byte fewer);
    /// for other operations the rule does nothing.
    ShortRead,
}

/// One injected fault.
#[derive(Debug, Clone)]
pub struct FaultRule {
    pub op: FaultOp,
    /// Containers concerned; empty = all.
    pub containers: Vec<u64>,
    pub area: FaultArea,
    /// Objects concerned (first, last; indexes within a container's data area), for data
    /// operations; None = all.
    pub objects: Option<(u64, u64)>,
    pub action: FaultAction,
    /// Matching operations let through before the fault starts.
    pub after: u64,
    /// The rule is active only while this file exists.
    pub while_exists: Option<PathBuf>,
}

/// How often a hanging operation checks whether its rule was switched off.
const HANG_POLL: Duration = Duration::from_millis(20);

struct Rule {
    rule: FaultRule,
    seen: AtomicU64,
    hits: AtomicU64,
}

/// See the module documentation.
pub struct FaultBackend {
    inner: Arc<dyn Backend>,
    geometry: Geometry,
    rules: Vec<Rule>,
}

impl FaultBackend {
    pub fn new(inner: Arc<dyn Backend>, geometry: Geometry, rules: Vec<FaultRule>) -> Self {
        FaultBackend {
            inner,
            geometry,
            rules: rules
                .into_iter()
                .map(|rule| Rule {
                    rule,
                    seen: AtomicU64::new(0),
                    hits: AtomicU64::new(0),
                })
                .collect(),
        }
    }

    /// Faults injected so far, per rule.
    pub fn hits(&self) -> Vec<u64> {
        self.rules
            .iter()
            .map(|r| r.hits.load(Ordering::Relaxed))
            .collect()
    }

    fn active(rule: &FaultRule) -> bool {
        rule.while_exists.as_ref().is_none_or(|p| p.exists())
    }

    fn matches(&self, rule: &FaultRule, op: FaultOp, container: u64, range: (u64, u64)) -> bool {
        if rule.op != FaultOp::Any && rule.op != op {
            return false;
        }
        if !rule.containers.is_empty() && !rule.containers.contains(&container) {
            return false;
        }
        if op == FaultOp::Sync {
            return true;
        }
        let g = self.geometry;
        let (start, end) = range;
        let meta = start < g.reserved;
        let data = end > g.reserved;
        match rule.area {
            FaultArea::Metadata if !meta => return false,
            FaultArea::Data if !data => return false,
            _ => {}
        }
        match rule.objects {
            None => true,
            Some((first, last)) => {
                if !data {
                    return false;
                }
                let s = start.max(g.reserved) - g.reserved;
                let e = end - g.reserved;
                let (o0, o1) = (s / g.object_size, (e - 1) / g.object_size);
                o0 <= last && o1 >= first
            }
        }
    }

    /// The fault to apply to an operation, if any (stalls and hangs happen here).
    fn check(&self, op: FaultOp, container: u64, range: (u64, u64)) -> Result<Option<FaultAction>> {
        let mut short = None;
        for r in &self.rules {
            if !self.matches(&r.rule, op, container, range) || !Self::active(&r.rule) {
                continue;
            }
            if r.seen.fetch_add(1, Ordering::Relaxed) < r.rule.after {
                continue;
            }
            r.hits.fetch_add(1, Ordering::Relaxed);
            let what = || {
                format!(
                    "container {container}: injected fault ({op:?} of bytes {}..{})",
                    range.0, range.1
                )
            };
            match r.rule.action {
                FaultAction::Error => {
                    tracing::warn!(medium = self.inner.uri(), "{}: EIO", what());
                    return Err(MediaError::io(
                        self.inner.uri(),
                        what(),
                        std::io::Error::from_raw_os_error(libc::EIO),
                    ));
                }
                FaultAction::Stall(d) => {
                    tracing::warn!(medium = self.inner.uri(), "{}: stall {d:?}", what());
                    std::thread::sleep(d);
                }
                FaultAction::Hang => {
                    tracing::warn!(medium = self.inner.uri(), "{}: hang", what());
                    while Self::active(&r.rule) {
                        std::thread::sleep(HANG_POLL);
                    }
                }
                FaultAction::ShortRead if op == FaultOp::Read => {
                    short = Some(FaultAction::ShortRead);
                }
                FaultAction::ShortRead => {}
            }
        }
        Ok(short)
    }

    fn check_writes(&self, ops: &[WriteOp<'_>]) -> Result<()> {
        for o in ops {
            self.check(
                FaultOp::Write,
                o.container,
                (o.offset, o.offset + o.data.len() as u64),
            )?;
        }
        Ok(())
    }
}

impl Backend for FaultBackend {
    fn uri(&self) -> &str {
        self.inner.uri()
    }
    fn container_slots(&self) -> Result<u64> {
        self.inner.container_slots()
    }
    fn prepare_container(&self, index: u64) -> Result<()> {
        self.check(FaultOp::Write, index, (0, self.geometry.reserved))?;
        self.inner.prepare_container(index)
    }
    fn read_at(&self, container: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let end = offset + buf.len() as u64;
        let short = self.check(FaultOp::Read, container, (offset, end))?;
        let n = self.inner.read_at(container, offset, buf)?;
        Ok(match short {
            Some(FaultAction::ShortRead) => (n / 2).min(n.saturating_sub(1)),
            _ => n,
        })
    }
    fn write_batch(&self, ops: &[WriteOp<'_>]) -> Result<()> {
        self.check_writes(ops)?;
        self.inner.write_batch(ops)
    }
    unsafe fn start_writes(&self, ops: &[WriteOp<'_>]) -> Result<WriteTicket> {
        self.check_writes(ops)?;
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { self.inner.start_writes(ops) }
    }
    fn wait_writes(&self, ticket: WriteTicket) -> Result<()> {
        self.inner.wait_writes(ticket)
    }
    fn sync(&self, containers: &[u64]) -> Result<()> {
        for &c in containers {
            self.check(FaultOp::Sync, c, (0, 0))?;
        }
        self.inner.sync(containers)
    }
    fn erase_container(&self, index: u64) -> Result<()> {
        self.inner.erase_container(index)
    }
    unsafe fn register_buffers(&self, bufs: &[(*mut u8, usize)]) -> bool {
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { self.inner.register_buffers(bufs) }
    }
    fn unregister_buffers(&self) {
        self.inner.unregister_buffers()
    }
    fn engine_name(&self) -> &'static str {
        self.inner.engine_name()
    }
    fn direct_io(&self) -> bool {
        self.inner.direct_io()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendOptions, open_backend};
    use crate::buf::AlignedBuf;

    fn geometry() -> Geometry {
        Geometry::new(8 << 20, 64 << 10, 64 << 10, 64 << 10).unwrap()
    }

    fn rule(op: FaultOp, action: FaultAction) -> FaultRule {
        FaultRule {
            op,
            containers: Vec::new(),
            area: FaultArea::Any,
            objects: None,
            action,
            after: 0,
            while_exists: None,
        }
    }

    fn backend(rules: Vec<FaultRule>) -> (tempfile::TempDir, FaultBackend) {
        let dir = tempfile::tempdir().unwrap();
        let uri = format!("dir:{}", dir.path().display());
        let inner = open_backend(&uri, 8 << 20, BackendOptions::default()).unwrap();
        for c in 0..2 {
            inner.prepare_container(c).unwrap();
            let mut b = AlignedBuf::zeroed(8 << 20);
            b.fill(c as u8 + 1);
            inner
                .write_batch(&[WriteOp {
                    container: c,
                    offset: 0,
                    data: &b,
                    fixed_buf: None,
                }])
                .unwrap();
        }
        (dir, FaultBackend::new(inner, geometry(), rules))
    }

    #[test]
    fn rules_pick_container_area_objects_and_skip_the_first_matches() {
        let mut r = rule(FaultOp::Read, FaultAction::Error);
        r.containers = vec![1];
        r.objects = Some((2, 3));
        r.after = 1;
        let (_d, b) = backend(vec![r]);
        let mut buf = AlignedBuf::zeroed(64 << 10);
        let obj = |i: u64| (64 << 10) + i * (64 << 10);
        // container 0, metadata, other objects: untouched
        assert_eq!(b.read_at(0, obj(2), &mut buf).unwrap(), 64 << 10);
        assert_eq!(b.read_at(1, 0, &mut buf).unwrap(), 64 << 10);
        assert_eq!(b.read_at(1, obj(1), &mut buf).unwrap(), 64 << 10);
        assert_eq!(b.read_at(1, obj(4), &mut buf).unwrap(), 64 << 10);
        // the first match passes (after = 1), the next ones fail, a range overlapping counts
        assert_eq!(b.read_at(1, obj(2), &mut buf).unwrap(), 64 << 10);
        assert!(b.read_at(1, obj(3), &mut buf).is_err());
        let mut two = AlignedBuf::zeroed(128 << 10);
        assert!(b.read_at(1, obj(1), &mut two).is_err());
        assert_eq!(b.hits(), vec![2]);
    }

    #[test]
    fn short_reads_stalls_and_switched_rules() {
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("on");
        let mut hang = rule(FaultOp::Sync, FaultAction::Hang);
        hang.while_exists = Some(flag.clone());
        let mut w = rule(FaultOp::Write, FaultAction::Error);
        w.area = FaultArea::Metadata;
        let (_d, b) = backend(vec![
            rule(FaultOp::Read, FaultAction::ShortRead),
            rule(FaultOp::Read, FaultAction::Stall(Duration::from_millis(50))),
            hang,
            w,
        ]);
        let mut buf = AlignedBuf::zeroed(8192);
        let t = std::time::Instant::now();
        assert_eq!(b.read_at(0, 64 << 10, &mut buf).unwrap(), 4096);
        assert!(t.elapsed() >= Duration::from_millis(50));
        // no flag: the hang rule is off
        b.sync(&[0]).unwrap();
        std::fs::write(&flag, b"").unwrap();
        let b = Arc::new(b);
        let b2 = b.clone();
        let h = std::thread::spawn(move || b2.sync(&[0]));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!h.is_finished(), "sync must hang while the flag exists");
        std::fs::remove_file(&flag).unwrap();
        h.join().unwrap().unwrap();
        let data = AlignedBuf::zeroed(4096);
        let op = |offset| WriteOp {
            container: 0,
            offset,
            data: &data,
            fixed_buf: None,
        };
        assert!(b.write_batch(&[op(8192)]).is_err());
        b.write_batch(&[op(64 << 10)]).unwrap();
        assert!(b.prepare_container(2).is_err());
    }
}
