//! Yield points of background I/O for the mount's syncs.
//!
//! An fsync of the writable layer (the SSD) waits for its data, its inode and a cache flush,
//! one after the other; each waits behind whatever the disk is busy with. Seals read and
//! write the same disk in pieces of 256 KiB, one after the other, and a disk serves what it
//! was given in turn: the kernel's I/O priorities act only on requests not yet dispatched
//! (a steady writer's fdatasync on the VM disk during a 2 GiB seal: median 0.85-1.0 ms in
//! most half-second spans against 0.65-0.75 ms alone; with the yield below, 0.65-0.8 ms).
//!
//! So background I/O asks [`ForegroundSyncs::yield_now`] before each piece: while a sync of
//! the writable layer is under way ([`ForegroundSyncs::begin`]) the piece waits for it, up
//! to a limit ([`DEFAULT_MAX_YIELD`] unless configured: a mount that syncs without a pause
//! still lets a seal go on at a piece per limit or better). A sync then finds the disk busy
//! with at most the one background piece already in flight. Seals that writers wait for
//! (the SSD is short of space) do not yield: they are the writers' I/O
//! ([`ForegroundSyncs::set_bypass`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Longest wait of one background piece for foreground syncs, by default.
pub const DEFAULT_MAX_YIELD: Duration = Duration::from_millis(2);

/// Foreground syncs in flight, and background I/O waiting for them to end.
#[derive(Debug, Default)]
pub struct ForegroundSyncs {
    /// Longest wait of one piece (zero: no waiting).
    max_yield: Duration,
    active: Mutex<usize>,
    idle: Condvar,
    bypass: AtomicBool,
    yields: AtomicU64,
    yielded_ns: AtomicU64,
}

/// A foreground sync under way; it ends when this is dropped.
#[must_use = "the sync counts as under way until this is dropped"]
pub struct SyncUnderWay<'a>(&'a ForegroundSyncs);

impl Drop for SyncUnderWay<'_> {
    fn drop(&mut self) {
        let mut n = self.0.active.lock().unwrap_or_else(|p| p.into_inner());
        *n -= 1;
        if *n == 0 {
            self.0.idle.notify_all();
        }
    }
}

/// What yielding cost background I/O.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct YieldStats {
    /// Background pieces that waited for a sync.
    pub yields: u64,
    /// Their total wait.
    pub yielded: Duration,
}

impl ForegroundSyncs {
    /// Background pieces wait at most `max_yield` each (zero: they never wait).
    pub fn new(max_yield: Duration) -> ForegroundSyncs {
        ForegroundSyncs {
            max_yield,
            ..ForegroundSyncs::default()
        }
    }

    /// A foreground sync starts; it counts as under way until the result is dropped.
    pub fn begin(&self) -> SyncUnderWay<'_> {
        *self.active.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        SyncUnderWay(self)
    }

    /// Called by background I/O before each piece: waits while a foreground sync is under
    /// way, at most the limit given to [`new`](Self::new). Returns how long it waited.
    pub fn yield_now(&self) -> Duration {
        self.yield_for(self.max_yield)
    }

    /// [`yield_now`](Self::yield_now) with another limit.
    pub fn yield_for(&self, limit: Duration) -> Duration {
        if limit.is_zero() || self.bypass.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        let mut n = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if *n == 0 {
            return Duration::ZERO;
        }
        let start = Instant::now();
        let deadline = start + limit;
        while *n > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            n = self
                .idle
                .wait_timeout(n, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(n);
        let waited = start.elapsed();
        self.yields.fetch_add(1, Ordering::Relaxed);
        self.yielded_ns
            .fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
        waited
    }

    /// Syncs under way now.
    pub fn under_way(&self) -> usize {
        *self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// While set, background I/O does not yield (writers wait for the seal that runs).
    pub fn set_bypass(&self, bypass: bool) {
        self.bypass.store(bypass, Ordering::Relaxed);
    }

    pub fn stats(&self) -> YieldStats {
        YieldStats {
            yields: self.yields.load(Ordering::Relaxed),
            yielded: Duration::from_nanos(self.yielded_ns.load(Ordering::Relaxed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn no_sync_no_wait() {
        let s = ForegroundSyncs::new(DEFAULT_MAX_YIELD);
        assert_eq!(s.yield_now(), Duration::ZERO);
        assert_eq!(s.stats(), YieldStats::default());
    }

    #[test]
    fn a_piece_waits_for_the_sync_under_way_to_end() {
        let s = Arc::new(ForegroundSyncs::new(DEFAULT_MAX_YIELD));
        let sync = s.begin();
        let (s2, (tx, rx)) = (s.clone(), std::sync::mpsc::channel());
        let t = std::thread::spawn(move || {
            tx.send(()).unwrap();
            s2.yield_for(Duration::from_secs(30))
        });
        rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        drop(sync);
        let waited = t.join().unwrap();
        // It waited for the sync (not for the 30 s limit).
        assert!(waited >= Duration::from_millis(40), "{waited:?}");
        assert!(waited < Duration::from_secs(20), "{waited:?}");
        assert_eq!(s.stats().yields, 1);
        assert!(s.stats().yielded >= Duration::from_millis(40));
    }

    #[test]
    fn a_sync_that_does_not_end_holds_a_piece_only_up_to_the_limit() {
        let s = ForegroundSyncs::new(DEFAULT_MAX_YIELD);
        let _a = s.begin();
        let _b = s.begin();
        let waited = s.yield_for(Duration::from_millis(30));
        assert!(waited >= Duration::from_millis(30), "{waited:?}");
        assert!(s.yield_now() >= DEFAULT_MAX_YIELD);
        assert_eq!(s.stats().yields, 2);
        // A limit of zero: no waiting at all.
        let off = ForegroundSyncs::new(Duration::ZERO);
        let _c = off.begin();
        assert_eq!(off.yield_now(), Duration::ZERO);
        assert_eq!(off.stats().yields, 0);
    }

    #[test]
    fn every_sync_must_end_before_the_piece_goes() {
        let s = Arc::new(ForegroundSyncs::new(DEFAULT_MAX_YIELD));
        let a = s.begin();
        let b = s.begin();
        drop(a);
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.yield_for(Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished(), "one sync is still under way");
        drop(b);
        assert!(t.join().unwrap() >= Duration::from_millis(40));
    }

    #[test]
    fn bypass_skips_the_wait() {
        let s = ForegroundSyncs::new(DEFAULT_MAX_YIELD);
        let _a = s.begin();
        s.set_bypass(true);
        assert_eq!(s.yield_for(Duration::from_secs(30)), Duration::ZERO);
        s.set_bypass(false);
        assert!(s.yield_for(Duration::from_millis(5)) >= Duration::from_millis(5));
    }
}
