//! The archiver: the daemon's background worker that seals the writable generation when it
//! reaches the archive threshold (or when asked), without blocking the mount.
//!
//! One seal at a time: freeze (a manifest commit and a brief swap in the volume), then build
//! and write the image pair while the mount keeps serving, then commit the layer, swap it in,
//! and drop the frozen tree from the SSD.

use crate::store::Store;
use crate::volume::Volume;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How often the writable layer's size is checked against the threshold.
const TICK: Duration = Duration::from_millis(500);
/// Wait before retrying a failed seal; doubled at each failure in a row.
const RETRY_FIRST: Duration = Duration::from_secs(2);
/// Longest wait between retries.
const RETRY_MAX: Duration = Duration::from_secs(60);

/// When to try again after `failures` failures in a row.
fn retry_delay(failures: u32) -> Duration {
    RETRY_FIRST
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(RETRY_MAX)
}

#[derive(Debug, Default, Clone)]
struct State {
    /// Seal requests not yet served (each `request` waits for a seal that started after it).
    requested: u64,
    /// Seals started and finished.
    started: u64,
    finished: u64,
    sealing: bool,
    last_error: Option<String>,
    shutdown: bool,
    merge_requested: u64,
    merges_finished: u64,
    merge_error: Option<String>,
    /// The volume asked for a look now (the tree reached the threshold, or writers wait
    /// for room): see `Volume::set_seal_kick`.
    kicked: bool,
}

/// Outcome of a requested seal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SealOutcome {
    Sealed { layer: u64, files: u64, bytes: u64 },
    Empty,
    Queued,
}

pub struct Archiver {
    store: Mutex<Store>,
    vol: Arc<Volume>,
    threshold: u64,
    state: Mutex<State>,
    cv: Condvar,
    last: Mutex<Option<SealOutcome>>,
    /// The manifest as last committed, readable while a seal holds the store.
    snapshot: Mutex<crate::manifest::Manifest>,
    last_merge: Mutex<Option<u64>>,
    /// The configured background priority.
    priority: Priority,
    /// The mount's syncs that background I/O yields to (not during urgent seals).
    syncs: Arc<spinfs_media::ForegroundSyncs>,
}

impl Archiver {
    /// Starts the worker thread.
    ///
    /// A frozen generation left by a crash (see `Store::recover_leftovers`) is sealed again
    /// at once, in the background: the mount serves it as the frozen layer meanwhile, and a
    /// seal requested now waits for that seal and one more.
    pub fn start(store: Store, vol: Arc<Volume>) -> Arc<Archiver> {
        let threshold = store.config().archive_threshold;
        let io = &store.config().media_io;
        let priority = Priority {
            io_class: io.background_io_class.clone(),
            nice: io.background_nice,
            sched_idle: io.background_sched_idle,
            slice: std::time::Duration::from_millis(io.background_slice_ms),
        };
        let resealing = store.manifest().frozen.is_some();
        let snapshot = Mutex::new(store.manifest().clone());
        let syncs = store.foreground_syncs();
        let a = Arc::new(Archiver {
            syncs,
            snapshot,
            last_merge: Mutex::new(None),
            store: Mutex::new(store),
            vol,
            threshold,
            state: Mutex::new(State {
                sealing: resealing,
                started: resealing as u64,
                ..State::default()
            }),
            cv: Condvar::new(),
            last: Mutex::new(None),
            priority: priority.clone(),
        });
        let weak = Arc::downgrade(&a);
        a.vol.set_seal_kick(Box::new(move || {
            if let Some(a) = weak.upgrade() {
                a.state.lock().unwrap().kicked = true;
                a.cv.notify_all();
            }
        }));
        let worker = a.clone();
        std::thread::Builder::new()
            .name("spinfs-archiver".into())
            .spawn(move || {
                set_background_priority(&priority);
                worker.run(resealing)
            })
            .expect("spawn archiver thread");
        a
    }

    /// Runs `f` with the store (for status and other commands).
    pub fn with_store<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        f(&mut self.store.lock().unwrap())
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.vol
    }

    /// The manifest as last committed.
    pub fn manifest(&self) -> crate::manifest::Manifest {
        self.snapshot.lock().unwrap().clone()
    }

    /// Whether a seal is running right now.
    pub fn sealing(&self) -> bool {
        self.state.lock().unwrap().sealing
    }

    /// Asks for a seal of the writable generation; with `wait`, returns when it is durable.
    pub fn request(&self, wait: bool) -> Result<SealOutcome, String> {
        let mut st = self.state.lock().unwrap();
        st.requested += 1;
        let target = st.finished + if st.sealing { 2 } else { 1 };
        self.cv.notify_all();
        if !wait {
            return Ok(SealOutcome::Queued);
        }
        while st.finished < target && !st.shutdown {
            st = self.cv.wait(st).unwrap();
        }
        if let Some(e) = &st.last_error {
            return Err(e.clone());
        }
        drop(st);
        Ok(self
            .last
            .lock()
            .unwrap()
            .clone()
            .unwrap_or(SealOutcome::Empty))
    }

    /// Asks for a merge of archived layers (one due by the fan-in rule, else the newest
    /// ones); with `wait`, returns when it is committed.
    pub fn request_merge(&self, wait: bool) -> Result<Option<u64>, String> {
        let mut st = self.state.lock().unwrap();
        st.merge_requested += 1;
        let target = st.merges_finished + 1;
        self.cv.notify_all();
        if !wait {
            return Ok(None);
        }
        while st.merges_finished < target && !st.shutdown {
            st = self.cv.wait(st).unwrap();
        }
        if let Some(e) = &st.merge_error {
            return Err(e.clone());
        }
        drop(st);
        Ok(*self.last_merge.lock().unwrap())
    }

    pub fn shutdown(&self) {
        self.state.lock().unwrap().shutdown = true;
        self.cv.notify_all();
    }

    fn run(self: Arc<Self>, resealing: bool) {
        let mut failures = 0u32;
        let mut retry_at: Option<Instant> = None;
        if resealing {
            // Marked as started in `start`, so that requests count it as running.
            let result = self.seal_once(false);
            if result.is_ok() {
                spinfs_failpoints::fail_point!("recover.resealed");
            }
            self.seal_done(result, &mut failures, &mut retry_at);
        }
        loop {
            let asked = {
                let mut st = self.state.lock().unwrap();
                if st.shutdown {
                    return;
                }
                if st.requested == 0 && st.merge_requested == 0 && !st.kicked {
                    st = self.cv.wait_timeout(st, TICK).unwrap().0;
                }
                st.kicked = false;
                if st.shutdown {
                    return;
                }
                let asked = st.requested > 0;
                st.requested = 0;
                asked
            };
            let backing_off = retry_at.is_some_and(|t| Instant::now() < t);
            self.merge_step(backing_off);
            // Writers short of room make it seal before the threshold.
            let full = self.vol.upper_bytes() >= self.threshold || self.vol.seal_for_room();
            // A frozen generation left by a failed seal is sealed again when its retry is
            // due (it stays readable as the frozen layer meanwhile).
            let frozen = self.snapshot.lock().unwrap().frozen.is_some();
            if !asked && (backing_off || (!full && !frozen)) {
                continue;
            }
            {
                let mut st = self.state.lock().unwrap();
                st.sealing = true;
                st.started += 1;
            }
            let result = self.seal_once(asked);
            self.seal_done(result, &mut failures, &mut retry_at);
        }
    }

    /// Records the outcome of a seal, answers waiters, schedules a retry after a failure.
    fn seal_done(
        &self,
        result: Result<SealOutcome, String>,
        failures: &mut u32,
        retry_at: &mut Option<Instant>,
    ) {
        let mut st = self.state.lock().unwrap();
        st.sealing = false;
        st.finished += 1;
        match result {
            Ok(outcome) => {
                st.last_error = None;
                *failures = 0;
                *retry_at = None;
                *self.last.lock().unwrap() = Some(outcome);
            }
            Err(e) => {
                *failures += 1;
                let delay = retry_delay(*failures);
                tracing::error!(
                    failures = *failures,
                    "seal failed (retry in {delay:?}, or at the next request): {e}"
                );
                st.last_error = Some(e);
                // Do not spin on a persistent failure: the next attempt waits, unless a
                // seal is requested meanwhile.
                *retry_at = Some(Instant::now() + delay);
            }
        }
        self.cv.notify_all();
    }

    /// Runs the merges that are due (and one forced merge if asked for). While seals are
    /// failing (`backing_off`), only a forced merge runs: the media are likely at fault.
    fn merge_step(&self, backing_off: bool) {
        let forced = {
            let mut st = self.state.lock().unwrap();
            let f = st.merge_requested > 0;
            st.merge_requested = 0;
            f
        };
        if backing_off && !forced {
            return;
        }
        let mut first = true;
        loop {
            let result = self.merge_once(forced && first);
            first = false;
            let done = !matches!(result, Ok(Some(_)));
            if let Ok(Some(id)) = &result {
                *self.last_merge.lock().unwrap() = Some(*id);
            }
            if forced {
                let mut st = self.state.lock().unwrap();
                st.merge_error = result.as_ref().err().cloned();
                st.merges_finished += 1;
                self.cv.notify_all();
            }
            if let Err(e) = &result {
                tracing::error!("merge failed: {e}");
            }
            if done || forced {
                // A forced merge answers its caller at once; due merges follow next tick.
                return;
            }
        }
    }

    fn merge_once(&self, force: bool) -> Result<Option<u64>, String> {
        let mut store = self.store.lock().unwrap();
        let Some(run) = store.merge_candidates(force) else {
            return Ok(None);
        };
        let old: Vec<u64> = store.manifest().layers[run.clone()]
            .iter()
            .map(|l| l.id)
            .collect();
        tracing::info!(layers = ?old, "merging");
        let record = store.merge_layers(run).map_err(|e| e.to_string())?;
        *self.snapshot.lock().unwrap() = store.manifest().clone();
        let layer = store.open_layer(record.id).map_err(|e| e.to_string())?;
        self.vol
            .merged(&old, layer)
            .map_err(|e| format!("switching to merged layer {}: {e}", record.id))?;
        spinfs_failpoints::fail_point!("merge.layer_swapped");
        tracing::info!(layer = record.id, level = record.level, "merged");
        Ok(Some(record.id))
    }

    /// Seals a frozen generation left by a crash or a failed seal, then (when `asked`) the
    /// writable generation.
    fn seal_once(&self, asked: bool) -> Result<SealOutcome, String> {
        // Writers blocked on a full SSD wait for this seal: it is their I/O now, so it does
        // not yield the disk to others (back to the background priority for the next one).
        let urgent = self.vol.writers_waiting();
        if urgent {
            set_background_priority(&Priority::normal());
            self.syncs.set_bypass(true);
        }
        let out = self.seal_once_inner(asked);
        if urgent {
            set_background_priority(&self.priority);
            self.syncs.set_bypass(false);
        }
        out
    }

    fn seal_once_inner(&self, asked: bool) -> Result<SealOutcome, String> {
        let mut store = self.store.lock().unwrap();
        if let Some(frozen) = store.manifest().frozen.clone() {
            // An earlier seal failed after the freeze, or a crash interrupted it: seal that
            // generation again first. Freezing once more would overwrite the manifest's
            // record of it while the volume still writes into the tree the manifest would
            // then call frozen (and the next mount would delete the forgotten generation's
            // tree as a leftover).
            let out = self.seal_frozen(&mut store, frozen)?;
            if !asked {
                return Ok(out);
            }
            // A request asks for what is in the writable generation now.
            return match self.freeze_and_seal(&mut store)? {
                SealOutcome::Empty => Ok(out),
                o => Ok(o),
            };
        }
        self.freeze_and_seal(&mut store)
    }

    /// Freezes the writable generation and seals it.
    fn freeze_and_seal(&self, store: &mut Store) -> Result<SealOutcome, String> {
        let upper = store.layout().generation_tree(store.manifest().upper_gen);
        let empty = std::fs::read_dir(&upper)
            .map_err(|e| format!("{}: {e}", upper.display()))?
            .next()
            .is_none();
        if empty {
            return Ok(SealOutcome::Empty);
        }
        let frozen = store.freeze().map_err(|e| e.to_string())?;
        *self.snapshot.lock().unwrap() = store.manifest().clone();
        let new_gen = store.manifest().upper_gen;
        let tree = store.layout().generation_tree(new_gen);
        let work = store.layout().generation_work(new_gen);
        self.vol
            .freeze(new_gen, &tree, &work)
            .map_err(|e| format!("freezing generation {}: {e}", frozen.generation))?;
        spinfs_failpoints::fail_point!("seal.volume_frozen");
        self.seal_frozen(store, frozen)
    }

    /// Seals the frozen generation, swaps its layer into the volume, drops its tree.
    fn seal_frozen(
        &self,
        store: &mut Store,
        frozen: crate::manifest::FrozenGen,
    ) -> Result<SealOutcome, String> {
        tracing::info!(
            generation = frozen.generation,
            layer = frozen.layer,
            "sealing"
        );
        let layer = store
            .seal_frozen(frozen.clone())
            .map_err(|e| e.to_string())?;
        *self.snapshot.lock().unwrap() = store.manifest().clone();
        let opened = match &layer {
            Some(l) => Some(store.open_layer(l.id).map_err(|e| e.to_string())?),
            None => None,
        };
        self.vol
            .sealed(frozen.generation, opened)
            .map_err(|e| format!("switching to the sealed layer: {e}"))?;
        spinfs_failpoints::fail_point!("seal.layer_swapped");
        // Its files drained first only when nothing of the volume holds the tree any more,
        // and without rests while writers wait for room (they want the space back at once).
        let drain = self
            .vol
            .sealed_tree_unused(frozen.generation, std::time::Duration::from_millis(200));
        let dropped =
            store.drop_generation(frozen.generation, drain, &|| self.vol.writers_waiting());
        self.vol.generation_dropped();
        dropped.map_err(|e| e.to_string())?;
        spinfs_failpoints::fail_point!("seal.tree_deleted");
        let Some(layer) = layer else {
            tracing::info!(
                generation = frozen.generation,
                "frozen generation held only open files"
            );
            return Ok(SealOutcome::Empty);
        };
        tracing::info!(
            layer = layer.id,
            files = layer.files,
            bytes = layer.bytes,
            "sealed"
        );
        Ok(SealOutcome::Sealed {
            layer: layer.id,
            files: layer.files,
            bytes: layer.bytes,
        })
    }
}

/// The archiver thread's priority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priority {
    /// "idle", "best-effort" (its lowest level), "normal" (best-effort's default level) or
    /// "inherit".
    pub io_class: String,
    /// Nice value under SCHED_OTHER.
    pub nice: i32,
    /// SCHED_IDLE instead of SCHED_OTHER with `nice`.
    pub sched_idle: bool,
    /// Time slice under SCHED_OTHER (zero = the kernel's default).
    pub slice: std::time::Duration,
}

impl Priority {
    /// What the mount's own threads have: for seals that writers wait for.
    pub fn normal() -> Priority {
        Priority {
            io_class: "normal".into(),
            nice: 0,
            sched_idle: false,
            slice: std::time::Duration::ZERO,
        }
    }
}

/// Gives the calling thread (the archiver) a low I/O priority and a low CPU priority, so
/// that seals and merges yield the disk and the CPU to the mount's users (or, with
/// `Priority::normal`, the mount's priority back). Failures are logged, not fatal.
pub fn set_background_priority(p: &Priority) {
    const IOPRIO_CLASS_BE: libc::c_int = 2;
    const IOPRIO_CLASS_IDLE: libc::c_int = 3;
    const IOPRIO_CLASS_SHIFT: libc::c_int = 13;
    const IOPRIO_WHO_PROCESS: libc::c_int = 1;
    let class = p.io_class.as_str();
    let prio = match class {
        "idle" => Some(IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT),
        "best-effort" => Some((IOPRIO_CLASS_BE << IOPRIO_CLASS_SHIFT) | 7),
        // The default level of the best-effort class (for seals that writers wait for).
        "normal" => Some((IOPRIO_CLASS_BE << IOPRIO_CLASS_SHIFT) | 4),
        _ => None,
    };
    if let Some(prio) = prio {
        // SAFETY: ioprio_set on the calling thread (who = 0) with a valid priority value.
        let r = unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, prio) };
        if r != 0 {
            tracing::warn!(
                "cannot set the archiver's I/O priority to {class}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    // SAFETY: sched_setscheduler on the calling thread (pid 0) with a valid parameter
    // (priority 0, as SCHED_IDLE and SCHED_OTHER require).
    let policy = if p.sched_idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param { sched_priority: 0 };
    if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
        tracing::warn!(
            "cannot set the archiver's scheduling policy: {}",
            std::io::Error::last_os_error()
        );
    }
    if !p.sched_idle && (p.nice > 0 || class == "normal") {
        // SAFETY: gettid has no arguments; setpriority on this thread's id.
        let r = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, p.nice)
        };
        if r != 0 {
            tracing::warn!(
                "cannot set the archiver's nice value to {}: {}",
                p.nice,
                std::io::Error::last_os_error()
            );
        }
    }
    if !p.sched_idle
        && let Err(e) = crate::sys::set_thread_slice(p.slice)
    {
        tracing::warn!("cannot set the archiver's time slice to {:?}: {e}", p.slice);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's (policy, nice value, I/O priority).
    fn current() -> (i32, i32, i32) {
        // SAFETY: plain queries on the calling thread.
        unsafe {
            let policy = libc::sched_getscheduler(0);
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            *libc::__errno_location() = 0;
            let nice = libc::getpriority(libc::PRIO_PROCESS, tid);
            let io = libc::syscall(libc::SYS_ioprio_get, 1, 0) as i32;
            (policy, nice, io)
        }
    }

    #[test]
    fn background_priority_and_back() {
        // A thread of its own: the settings are per thread.
        std::thread::spawn(|| {
            let bg = Priority {
                io_class: "idle".into(),
                nice: 10,
                sched_idle: true,
                slice: std::time::Duration::from_millis(100),
            };
            set_background_priority(&bg);
            let (policy, _, io) = current();
            assert_eq!(policy, libc::SCHED_IDLE);
            assert_eq!(io >> 13, 3, "idle I/O class");
            // Writers wait for room: the mount's own priority.
            set_background_priority(&Priority::normal());
            assert_eq!(current(), (libc::SCHED_OTHER, 0, (2 << 13) | 4));
            // background_sched_idle = false: nice value and best-effort's lowest level.
            let default_slice = crate::sys::thread_slice().unwrap();
            let nice = Priority {
                io_class: "best-effort".into(),
                nice: 10,
                sched_idle: false,
                slice: std::time::Duration::from_millis(100),
            };
            set_background_priority(&nice);
            assert_eq!(current(), (libc::SCHED_OTHER, 10, (2 << 13) | 7));
            // Linux 6.12 and later report a fair task's slice (earlier ones zero).
            if !default_slice.is_zero() {
                assert_eq!(
                    crate::sys::thread_slice().unwrap(),
                    std::time::Duration::from_millis(100)
                );
                assert!(default_slice < std::time::Duration::from_millis(100));
                // Back to the mount's priority: the default slice again.
                set_background_priority(&Priority::normal());
                assert_eq!(crate::sys::thread_slice().unwrap(), default_slice);
                assert_eq!(current(), (libc::SCHED_OTHER, 0, (2 << 13) | 4));
            }
        })
        .join()
        .unwrap();
    }
}
