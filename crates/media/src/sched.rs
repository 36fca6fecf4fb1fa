//! The media I/O scheduler: the block layer's ideas applied to cold media.
//!
//! [`SchedQueue`] is the policy, a deterministic structure driven by explicit time so that
//! it can be tested as properties and simulated against the media model. [`MediaScheduler`]
//! runs it on a dispatcher thread in front of a [`Device`] (the medium, or the media model).
//!
//! Policy (the `Elevator` policy; `Fifo` is the baseline it is measured against):
//! - priority classes: foreground reads, then metadata, then background (archive writes);
//! - a container once loaded is drained (batching), in ascending offset order from the head
//!   (C-SCAN elevator); the next container is the one holding the oldest request;
//! - deadlines: after `batch_limit` dispatches in one container, an expired request (any
//!   class) takes over, so nothing starves behind a busy container or a higher class;
//! - adjacent or overlapping reads of one container are merged into one device read;
//! - background writes pass a token bucket (`bg_write_rate`, `bg_write_burst`, like io.max)
//!   and are held for a window after a foreground read slower than `latency_target` (like
//!   wbt), unless their deadline has expired.

use crate::buf::AlignedBuf;
use crate::error::{MediaError, Result};
use crate::fgsync::ForegroundSyncs;
use crate::medium::Medium;
use std::collections::{HashMap, HashSet};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Priority class of a request, highest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// Reads a user is waiting for.
    Foreground = 0,
    /// Metadata reads (container indexes, meta images).
    Metadata = 1,
    /// Archive writes and background reads (merge, verify).
    Background = 2,
}

/// Direction of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
}

/// Dispatch policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Priorities, batching per container, elevator order, merging, deadlines.
    Elevator,
    /// Arrival order, nothing else (the baseline).
    Fifo,
}

/// Scheduler tunables.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedConfig {
    pub policy: Policy,
    /// Deadline per class (foreground, metadata, background) from arrival.
    pub deadlines: [Duration; 3],
    /// Dispatches in one container before an expired request elsewhere may take over.
    pub batch_limit: u32,
    /// Largest merged read in bytes.
    pub max_merge: u64,
    /// Background write bandwidth cap in bytes/s; 0 = no cap.
    pub bg_write_rate: u64,
    /// Token bucket depth in bytes.
    pub bg_write_burst: u64,
    /// Foreground read latency above which background writes back off; zero = off.
    pub latency_target: Duration,
    /// Adapt the background write rate to foreground sync latency (see
    /// [`SchedQueue::foreground_sync`]): halve it when a sync reported while background
    /// writes run is slower than the sync target, raise it again step by step otherwise.
    pub adaptive: bool,
    /// Sync latency target of the adaptive rate; zero = twice the sync latency measured
    /// while no background write runs.
    pub sync_target: Duration,
}

impl Default for SchedConfig {
    fn default() -> Self {
        SchedConfig {
            policy: Policy::Elevator,
            deadlines: [
                Duration::from_secs(30),
                Duration::from_secs(60),
                Duration::from_secs(300),
            ],
            batch_limit: 64,
            max_merge: 4 << 20,
            bg_write_rate: 0,
            bg_write_burst: 8 << 20,
            latency_target: Duration::ZERO,
            adaptive: false,
            sync_target: Duration::ZERO,
        }
    }
}

/// Background writes within this time of a sync make it a sync "during background writes".
const BG_RECENT: Duration = Duration::from_millis(250);
/// Sync target until enough quiet syncs were measured (automatic target).
const DEFAULT_SYNC_TARGET: Duration = Duration::from_millis(20);
/// Smallest automatic sync target.
const MIN_SYNC_TARGET: Duration = Duration::from_millis(2);
/// Quiet syncs measured before the automatic target uses them.
const BASELINE_SAMPLES: u32 = 8;
/// The adaptive rate is raised at most this often...
const INCREASE_EVERY: Duration = Duration::from_millis(200);
/// ...by this fraction of the measured write bandwidth; it is lowered at most once per
/// `DECREASE_EVERY`, to half, never below `1 / MIN_RATE_DIV` of that bandwidth.
const INCREASE_DIV: f64 = 16.0;
const DECREASE_EVERY: Duration = Duration::from_millis(100);
const MIN_RATE_DIV: f64 = 16.0;
/// Floor of the adaptive rate whatever the bandwidth estimate (bytes/s).
const MIN_RATE: f64 = 1024.0 * 1024.0;

/// The adaptive background write rate (see `SchedConfig::adaptive`).
#[derive(Debug, Default, Clone)]
struct Adaptive {
    /// Current limit in bytes/s; None = not limiting.
    rate: Option<f64>,
    /// Background write bandwidth of the device (EWMA over granted writes), bytes/s.
    bandwidth: Option<f64>,
    /// Sync latency while no background write runs (EWMA), and how many were seen.
    baseline: Option<f64>,
    samples: u32,
    last_bg: Option<Duration>,
    last_decrease: Duration,
    last_increase: Duration,
    decreases: u64,
}

/// What the adaptive write rate is doing (for status and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AdaptiveStats {
    /// Current limit in bytes/s (None: not limiting).
    pub rate: Option<f64>,
    /// Measured background write bandwidth, bytes/s.
    pub bandwidth: Option<f64>,
    /// Sync target in use.
    pub sync_target: Duration,
    /// Times the rate was halved.
    pub decreases: u64,
}

/// A request as the queue sees it. Times are offsets from the scheduler's epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: u64,
    pub class: Class,
    pub op: Op,
    pub container: u64,
    pub offset: u64,
    pub len: u64,
    pub arrival: Duration,
}

/// One device operation chosen by the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatch {
    /// Requests served by this operation (several when reads were merged).
    pub ids: Vec<u64>,
    pub class: Class,
    pub op: Op,
    pub container: u64,
    pub offset: u64,
    pub len: u64,
    /// Earliest arrival among the served requests.
    pub oldest_arrival: Duration,
    /// True when a deadline forced this choice.
    pub expired: bool,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    Dispatch(Dispatch),
    /// Only throttled requests are pending: ask again at this time.
    WaitUntil(Duration),
    Idle,
}

/// The scheduling policy state.
#[derive(Debug)]
pub struct SchedQueue {
    cfg: SchedConfig,
    pending: Vec<Request>,
    head: Option<(u64, u64)>,
    batch_count: u32,
    tokens: f64,
    tokens_at: Duration,
    wbt_hold_until: Duration,
    adaptive: Adaptive,
}

impl SchedQueue {
    pub fn new(cfg: SchedConfig) -> SchedQueue {
        let tokens = cfg.bg_write_burst as f64;
        SchedQueue {
            cfg,
            pending: Vec::new(),
            head: None,
            batch_count: 0,
            tokens,
            tokens_at: Duration::ZERO,
            wbt_hold_until: Duration::ZERO,
            adaptive: Adaptive::default(),
        }
    }

    /// The background write rate in force: the configured cap and the adaptive rate.
    fn rate(&self) -> Option<f64> {
        let cap = (self.cfg.bg_write_rate > 0).then_some(self.cfg.bg_write_rate as f64);
        match (cap, self.adaptive.rate) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn sync_target(&self) -> Duration {
        if !self.cfg.sync_target.is_zero() {
            return self.cfg.sync_target;
        }
        match self.adaptive.baseline {
            Some(b) if self.adaptive.samples >= BASELINE_SAMPLES => {
                Duration::from_secs_f64(2.0 * b).max(MIN_SYNC_TARGET)
            }
            _ => DEFAULT_SYNC_TARGET,
        }
    }

    /// What the adaptive write rate is doing.
    pub fn adaptive_stats(&self) -> AdaptiveStats {
        AdaptiveStats {
            rate: self.adaptive.rate,
            bandwidth: self.adaptive.bandwidth,
            sync_target: self.sync_target(),
            decreases: self.adaptive.decreases,
        }
    }

    /// Reports a sync of foreground data (an fsync of the writable layer, on a disk the
    /// media may share) that took `latency`, finished at `now`. Without background writes
    /// in the last moments it measures the quiet latency; during them, one slower than the
    /// sync target halves the background write rate (starting from the measured write
    /// bandwidth) and holds background writes for that latency, like wbt shrinking its
    /// queue depth. `next` raises the rate again while syncs stay fast.
    pub fn foreground_sync(&mut self, now: Duration, latency: Duration) {
        if !self.cfg.adaptive {
            return;
        }
        let a = &mut self.adaptive;
        let busy = a.last_bg.is_some_and(|t| now.saturating_sub(t) < BG_RECENT);
        if !busy {
            let l = latency.as_secs_f64();
            a.baseline = Some(match a.baseline {
                Some(b) => b + (l - b) / 8.0,
                None => l,
            });
            a.samples += 1;
            return;
        }
        let target = self.sync_target();
        if latency <= target {
            return;
        }
        self.wbt_hold_until = self.wbt_hold_until.max(now + latency);
        let a = &mut self.adaptive;
        if now < a.last_decrease + DECREASE_EVERY && a.decreases > 0 {
            return;
        }
        let Some(bw) = a.bandwidth else { return };
        let floor = (bw / MIN_RATE_DIV).max(MIN_RATE);
        a.rate = Some((a.rate.unwrap_or(bw) / 2.0).max(floor));
        a.last_decrease = now;
        a.last_increase = now;
        a.decreases += 1;
    }

    /// Additive increase of the adaptive rate while no sync complains.
    fn adapt(&mut self, now: Duration) {
        let a = &mut self.adaptive;
        let (Some(rate), Some(bw)) = (a.rate, a.bandwidth) else {
            return;
        };
        if now < a.last_increase + INCREASE_EVERY {
            return;
        }
        let steps = ((now - a.last_increase).as_secs_f64() / INCREASE_EVERY.as_secs_f64()).floor();
        let r = rate + steps * bw / INCREASE_DIV;
        a.rate = (r < bw).then_some(r);
        a.last_increase = now;
    }

    pub fn config(&self) -> &SchedConfig {
        &self.cfg
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Pending requests per class.
    pub fn depth(&self) -> [usize; 3] {
        let mut d = [0; 3];
        for r in &self.pending {
            d[r.class as usize] += 1;
        }
        d
    }

    pub fn push(&mut self, r: Request) {
        self.pending.push(r);
    }

    /// Removes a request that has not been dispatched; false if it is not pending.
    pub fn cancel(&mut self, id: u64) -> bool {
        let before = self.pending.len();
        self.pending.retain(|r| r.id != id);
        before != self.pending.len()
    }

    fn deadline(&self, r: &Request) -> Duration {
        r.arrival + self.cfg.deadlines[r.class as usize]
    }

    fn refill(&mut self, now: Duration) {
        self.adapt(now);
        if now > self.tokens_at {
            let dt = (now - self.tokens_at).as_secs_f64();
            let rate = self.rate().unwrap_or(f64::INFINITY);
            self.tokens = (self.tokens + dt * rate).min(self.cfg.bg_write_burst as f64);
            self.tokens_at = now;
        }
    }

    fn throttled_write(r: &Request) -> bool {
        r.op == Op::Write && r.class == Class::Background
    }

    /// When request `r` may be dispatched (`now` if it may now).
    fn eligible_at(&self, r: &Request, now: Duration) -> Duration {
        if !Self::throttled_write(r) {
            return now;
        }
        let mut at = now;
        if let Some(rate) = self.rate() {
            let need = (r.len as f64).min(self.cfg.bg_write_burst as f64);
            if self.tokens < need {
                let secs = (need - self.tokens) / rate;
                at = at.max(now + Duration::from_secs_f64(secs) + Duration::from_nanos(1));
            }
        }
        if self.deadline(r) > now && self.wbt_hold_until > now {
            at = at.max(self.wbt_hold_until.min(self.deadline(r)));
        }
        at
    }

    /// Chooses the next operation at time `now`.
    pub fn next(&mut self, now: Duration) -> Next {
        self.next_with(now, &HashSet::new())
    }

    /// A read of a container with a read in flight waits for it.
    fn blocked(r: &Request, busy: &HashSet<u64>) -> bool {
        r.op == Op::Read && busy.contains(&r.container)
    }

    /// Chooses the next operation at time `now`, leaving reads of the containers in `busy`
    /// pending (containers with a read in flight: one read per container at a time, so that
    /// a stalled container holds up only its own reads). `Idle` when only such reads are
    /// pending.
    pub fn next_with(&mut self, now: Duration, busy: &HashSet<u64>) -> Next {
        self.next_within(now, busy, None)
    }

    /// Like [`next_with`](Self::next_with) for a device that is busy but queues reads behind
    /// the ones it serves (see [`Device::queue_depth`]): dispatches the policy's choice only
    /// when it is a read of one of the containers in `reading` (being read: no switch, the
    /// device starts it the moment it is free), `Idle` otherwise. Anything else waits for the
    /// device, so that a decision to move elsewhere is taken as late as possible.
    pub fn next_behind(
        &mut self,
        now: Duration,
        busy: &HashSet<u64>,
        reading: &HashSet<u64>,
    ) -> Next {
        self.next_within(now, busy, Some(reading))
    }

    fn next_within(
        &mut self,
        now: Duration,
        busy: &HashSet<u64>,
        behind: Option<&HashSet<u64>>,
    ) -> Next {
        if self.pending.is_empty() {
            return Next::Idle;
        }
        self.refill(now);
        let eligible: Vec<bool> = self
            .pending
            .iter()
            .map(|r| !Self::blocked(r, busy) && self.eligible_at(r, now) <= now)
            .collect();
        if !eligible.iter().any(|&e| e) {
            return match self
                .pending
                .iter()
                .filter(|r| !Self::blocked(r, busy))
                .map(|r| self.eligible_at(r, now))
                .min()
            {
                Some(t) => Next::WaitUntil(t),
                None => Next::Idle,
            };
        }
        let pick = match self.cfg.policy {
            Policy::Fifo => self.pick_fifo(&eligible),
            Policy::Elevator => self.pick_elevator(&eligible, now),
        };
        if let Some(reading) = behind {
            let r = &self.pending[pick.0];
            if r.op != Op::Read || !reading.contains(&r.container) {
                return Next::Idle;
            }
        }
        Next::Dispatch(self.take(pick))
    }

    fn pick_fifo(&self, eligible: &[bool]) -> (usize, bool) {
        let i = (0..self.pending.len())
            .filter(|&i| eligible[i])
            .min_by_key(|&i| (self.pending[i].arrival, self.pending[i].id))
            .expect("one is eligible");
        (i, false)
    }

    fn pick_elevator(&self, eligible: &[bool], now: Duration) -> (usize, bool) {
        let cands = || (0..self.pending.len()).filter(|&i| eligible[i]);
        let class = cands()
            .map(|i| self.pending[i].class)
            .min()
            .expect("one is eligible");
        let oldest_expired = cands()
            .filter(|&i| self.deadline(&self.pending[i]) <= now)
            .min_by_key(|&i| (self.deadline(&self.pending[i]), self.pending[i].id));
        let head_container = self.head.map(|h| h.0);
        let in_head = |c: Class| {
            cands().any(|i| {
                Some(self.pending[i].container) == head_container && self.pending[i].class == c
            })
        };
        let (class, container, expired) = match oldest_expired {
            Some(e) if self.batch_count >= self.cfg.batch_limit || !in_head(class) => {
                let r = &self.pending[e];
                (r.class, r.container, true)
            }
            _ if in_head(class) => (class, head_container.expect("in_head"), false),
            _ => {
                let o = cands()
                    .filter(|&i| self.pending[i].class == class)
                    .min_by_key(|&i| (self.deadline(&self.pending[i]), self.pending[i].id))
                    .expect("class has a candidate");
                (class, self.pending[o].container, false)
            }
        };
        let head_off = match self.head {
            Some((c, off)) if c == container => off,
            _ => 0,
        };
        let in_target = || {
            cands().filter(|&i| {
                self.pending[i].class == class && self.pending[i].container == container
            })
        };
        let key = |i: &usize| (self.pending[*i].offset, self.pending[*i].id);
        let i = in_target()
            .filter(|&i| self.pending[i].offset >= head_off)
            .min_by_key(key)
            .or_else(|| in_target().min_by_key(key))
            .expect("target has a candidate");
        (i, expired)
    }

    fn take(&mut self, (i, expired): (usize, bool)) -> Dispatch {
        let first = self.pending.swap_remove(i);
        let mut d = Dispatch {
            ids: vec![first.id],
            class: first.class,
            op: first.op,
            container: first.container,
            offset: first.offset,
            len: first.len,
            oldest_arrival: first.arrival,
            expired,
        };
        if first.op == Op::Read && self.cfg.policy == Policy::Elevator {
            loop {
                let end = d.offset + d.len;
                let m = self.pending.iter().position(|r| {
                    r.op == Op::Read
                        && r.container == d.container
                        && r.offset <= end
                        && r.offset + r.len >= d.offset
                        && (r.offset + r.len).max(end) - r.offset.min(d.offset)
                            <= self.cfg.max_merge.max(d.len)
                });
                let Some(m) = m else { break };
                let r = self.pending.swap_remove(m);
                let start = d.offset.min(r.offset);
                d.len = (r.offset + r.len).max(end) - start;
                d.offset = start;
                d.ids.push(r.id);
                d.oldest_arrival = d.oldest_arrival.min(r.arrival);
            }
        }
        if Self::throttled_write(&first) {
            if self.rate().is_some() {
                self.tokens -= first.len as f64;
            }
            self.adaptive.last_bg = Some(self.tokens_at);
        }
        match self.head {
            Some((c, _)) if c == d.container => self.batch_count += 1,
            _ => self.batch_count = 1,
        }
        self.head = Some((d.container, d.offset + d.len));
        d
    }

    /// Reports that `d`, dispatched at `started`, finished at `now` (feeds the latency
    /// target and the background write bandwidth estimate).
    pub fn complete(&mut self, d: &Dispatch, started: Duration, now: Duration) {
        if d.class == Class::Foreground {
            self.foreground_latency(now, now.saturating_sub(d.oldest_arrival));
        }
        if d.op == Op::Write && d.class == Class::Background {
            let a = &mut self.adaptive;
            a.last_bg = Some(now);
            let secs = now.saturating_sub(started).as_secs_f64();
            if secs > 0.0 && d.len >= 64 * 1024 {
                let bw = d.len as f64 / secs;
                a.bandwidth = Some(match a.bandwidth {
                    Some(b) => b + (bw - b) / 8.0,
                    None => bw,
                });
            }
        }
    }

    /// Reports a foreground operation (a media read, or I/O the user waited for elsewhere,
    /// such as an fsync of the writable layer on a disk the media share) that took
    /// `latency`, finished at `now`: above the latency target, background writes hold off
    /// for one target's time (like wbt).
    pub fn foreground_latency(&mut self, now: Duration, latency: Duration) {
        let target = self.cfg.latency_target;
        if !target.is_zero() && latency > target {
            self.wbt_hold_until = self.wbt_hold_until.max(now + target);
        }
    }
}

/// What the scheduler drives: the medium, or the media model in front of it.
pub trait Device: Send + Sync {
    fn uri(&self) -> &str;
    /// Reads `len` bytes at container byte `offset` (fewer at the end of what exists).
    fn read(&self, container: u64, offset: u64, len: u64) -> Result<AlignedBuf>;
    /// Called when a write of `len` bytes at `offset` is granted (a model accounts for it).
    fn granting_write(&self, _container: u64, _offset: u64, _len: u64) {}
    /// Operations the device serves at once (on different containers). A modelled library
    /// with one drive serves one; a disk or an object store serves several, so that one
    /// stalled container does not hold up the others.
    fn max_inflight(&self) -> usize {
        1
    }
    /// Reads of one container the device takes at once: with more than one, the scheduler
    /// hands the device the next read of a container it is reading while it still serves the
    /// previous one (even with `max_inflight` operations in flight), so that the device
    /// starts it the moment it is free instead of idling while the host answers the
    /// previous read and dispatches the next, as a drive with a command queue does.
    fn queue_depth(&self) -> usize {
        1
    }
    /// A device that keeps its own timeline of service (the media model) accounts an
    /// operation dispatched at `at` on it, in dispatch order, and returns when it will be
    /// over; the scheduler then carries it out with [`read_planned`](Self::read_planned) or
    /// [`granting_write_planned`](Self::granting_write_planned). `None`: a real device.
    fn plan(
        &self,
        _op: Op,
        _container: u64,
        _offset: u64,
        _len: u64,
        _at: Instant,
    ) -> Option<Instant> {
        None
    }
    /// A read [`plan`](Self::plan)ned to be over at `due`.
    fn read_planned(
        &self,
        container: u64,
        offset: u64,
        len: u64,
        _due: Instant,
    ) -> Result<AlignedBuf> {
        self.read(container, offset, len)
    }
    /// A write grant [`plan`](Self::plan)ned to be given at `due`.
    fn granting_write_planned(&self, container: u64, offset: u64, len: u64, _due: Instant) {
        self.granting_write(container, offset, len)
    }
}

impl Device for Medium {
    fn uri(&self) -> &str {
        Medium::uri(self)
    }
    fn read(&self, container: u64, offset: u64, len: u64) -> Result<AlignedBuf> {
        let mut buf = AlignedBuf::zeroed(len as usize);
        let n = self.backend().read_at(container, offset, &mut buf)?;
        buf.set_len(n.min(len as usize));
        Ok(buf)
    }
    fn max_inflight(&self) -> usize {
        MEDIUM_INFLIGHT
    }
}

/// Operations in flight at once on a medium (each on its own container).
pub const MEDIUM_INFLIGHT: usize = 4;

/// Counters of a scheduler.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedStats {
    pub requests: u64,
    pub dispatches: u64,
    pub merged: u64,
    pub expired: u64,
    pub reads: u64,
    pub bytes_read: u64,
    pub writes: u64,
    pub bytes_written: u64,
    pub timeouts: u64,
}

enum Reply {
    Read(mpsc::Sender<Result<Vec<u8>>>),
    Write(mpsc::Sender<WriteGrant>),
}

struct State {
    q: SchedQueue,
    replies: HashMap<u64, (Reply, u64, u64)>,
    next_id: u64,
    shutdown: bool,
    stats: SchedStats,
    /// Reads in flight per container (at most `Device::queue_depth`).
    reading: HashMap<u64, usize>,
    /// Operations in flight (reads being served, write grants held).
    inflight: usize,
}

struct Shared {
    st: Mutex<State>,
    cv: Condvar,
    device: Arc<dyn Device>,
    epoch: Instant,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An operation dispatched as `d` at `started` is over: its container and slot are
    /// free again.
    fn finish(&self, d: &Dispatch, started: Duration) {
        let mut st = self.lock();
        self.finish_locked(&mut st, d, started);
    }

    fn finish_locked(&self, st: &mut State, d: &Dispatch, started: Duration) {
        st.inflight -= 1;
        if d.op == Op::Read
            && let Some(n) = st.reading.get_mut(&d.container)
        {
            *n -= 1;
            if *n == 0 {
                st.reading.remove(&d.container);
            }
        }
        let now = self.epoch.elapsed();
        st.q.complete(d, started, now);
        self.cv.notify_all();
    }
}

/// Use of one container of the device for one granted background write; dropping it tells
/// the scheduler the write is done (other containers are served meanwhile).
pub struct WriteGrant {
    done: Option<(Arc<Shared>, Dispatch, Duration)>,
}

impl Drop for WriteGrant {
    fn drop(&mut self) {
        if let Some((sh, d, started)) = self.done.take() {
            sh.finish(&d, started);
        }
    }
}

/// A read queued with [`MediaScheduler::submit_read`].
pub struct PendingRead {
    sched: Arc<MediaScheduler>,
    id: u64,
    rx: mpsc::Receiver<Result<Vec<u8>>>,
    container: u64,
    offset: u64,
    len: u64,
    submitted: Instant,
}

impl PendingRead {
    /// Waits for the data until `deadline` (forever when None); on timeout the request is
    /// withdrawn if it has not been dispatched yet (a dispatched one finishes unseen).
    pub fn wait(self, deadline: Option<Instant>) -> Result<Vec<u8>> {
        let uri = || self.sched.shared.device.uri().to_string();
        let res = match deadline {
            Some(d) => self
                .rx
                .recv_timeout(d.saturating_duration_since(Instant::now()))
                .map_err(|e| matches!(e, mpsc::RecvTimeoutError::Timeout)),
            None => self.rx.recv().map_err(|_| false),
        };
        match res {
            Ok(r) => r,
            Err(true) => {
                let mut st = self.sched.lock();
                st.q.cancel(self.id);
                st.replies.remove(&self.id);
                st.stats.timeouts += 1;
                Err(MediaError::Timeout {
                    medium: uri(),
                    what: format!(
                        "read of {} bytes at {} of container {}",
                        self.len, self.offset, self.container
                    ),
                    waited: self.submitted.elapsed(),
                })
            }
            Err(false) => Err(MediaError::SchedulerStopped { medium: uri() }),
        }
    }
}

/// The scheduler: a dispatcher thread choosing operations, and worker threads carrying them
/// out, at most `Device::max_inflight` operations at once and one read per container, plus
/// the reads a device queues behind the ones it serves (`Device::queue_depth`).
pub struct MediaScheduler {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Background writes yield to these syncs (see `crate::fgsync`).
    syncs: std::sync::OnceLock<Arc<ForegroundSyncs>>,
}

/// Work handed to a worker thread.
/// (dispatch, its requests' replies, when it was dispatched, when the device plans to be
/// over with it).
enum Job {
    Read(Dispatch, Vec<(Reply, u64, u64)>, Duration, Option<Instant>),
    Write(Dispatch, Vec<(Reply, u64, u64)>, Duration, Option<Instant>),
}

impl MediaScheduler {
    pub fn new(device: Arc<dyn Device>, cfg: SchedConfig) -> Arc<MediaScheduler> {
        let max_inflight = device.max_inflight().max(1);
        let workers = max_inflight * device.queue_depth().max(1);
        let shared = Arc::new(Shared {
            st: Mutex::new(State {
                q: SchedQueue::new(cfg),
                replies: HashMap::new(),
                next_id: 0,
                shutdown: false,
                stats: SchedStats::default(),
                reading: HashMap::new(),
                inflight: 0,
            }),
            cv: Condvar::new(),
            device,
            epoch: Instant::now(),
        });
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..workers {
            let sh = shared.clone();
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("media-io-{i}"))
                .spawn(move || worker(&sh, &rx))
                .expect("spawn a media I/O thread");
        }
        let s2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name("media-sched".into())
            .spawn(move || dispatcher(&s2, max_inflight, tx))
            .expect("spawn the media scheduler thread");
        Arc::new(MediaScheduler {
            shared,
            thread: Mutex::new(Some(thread)),
            syncs: std::sync::OnceLock::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.lock()
    }

    pub fn stats(&self) -> SchedStats {
        self.lock().stats
    }

    /// Pending requests per class.
    pub fn depth(&self) -> [usize; 3] {
        self.lock().q.depth()
    }

    /// Reports a foreground operation outside the media that took `latency` (for instance
    /// an fsync of the writable layer): over the latency target, background writes hold off
    /// (see [`SchedQueue::foreground_latency`]).
    pub fn report_foreground_latency(&self, latency: Duration) {
        let mut st = self.lock();
        let now = self.shared.epoch.elapsed();
        st.q.foreground_latency(now, latency);
    }

    /// Reports a foreground sync (fsync of the writable layer) that took `latency`: feeds
    /// the adaptive background write rate (see [`SchedQueue::foreground_sync`]).
    pub fn report_foreground_sync(&self, latency: Duration) {
        let mut st = self.lock();
        let now = self.shared.epoch.elapsed();
        st.q.foreground_sync(now, latency);
        self.shared.cv.notify_all();
    }

    /// What the adaptive background write rate is doing.
    pub fn adaptive_stats(&self) -> AdaptiveStats {
        self.lock().q.adaptive_stats()
    }

    fn submit(
        &self,
        class: Class,
        op: Op,
        container: u64,
        offset: u64,
        len: u64,
        reply: Reply,
    ) -> Result<u64> {
        let mut st = self.lock();
        if st.shutdown {
            return Err(MediaError::SchedulerStopped {
                medium: self.shared.device.uri().to_string(),
            });
        }
        let id = st.next_id;
        st.next_id += 1;
        st.stats.requests += 1;
        st.replies.insert(id, (reply, offset, len));
        st.q.push(Request {
            id,
            class,
            op,
            container,
            offset,
            len,
            arrival: self.shared.epoch.elapsed(),
        });
        self.shared.cv.notify_all();
        Ok(id)
    }

    /// Reads `len` bytes at byte `offset` of `container`, waiting at most `timeout`.
    pub fn read(
        self: &Arc<Self>,
        class: Class,
        container: u64,
        offset: u64,
        len: u64,
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        self.submit_read(class, container, offset, len)?
            .wait(deadline)
    }

    /// Queues a read and returns at once; several queued reads can be merged and batched.
    pub fn submit_read(
        self: &Arc<Self>,
        class: Class,
        container: u64,
        offset: u64,
        len: u64,
    ) -> Result<PendingRead> {
        let (tx, rx) = mpsc::channel();
        let id = self.submit(class, Op::Read, container, offset, len, Reply::Read(tx))?;
        Ok(PendingRead {
            sched: self.clone(),
            id,
            rx,
            container,
            offset,
            len,
            submitted: Instant::now(),
        })
    }

    /// Background writes (and the seal's reads of the SSD) yield to `syncs` from now on
    /// (set once; see `crate::fgsync`).
    pub fn set_foreground_syncs(&self, syncs: Arc<ForegroundSyncs>) {
        let _ = self.syncs.set(syncs);
    }

    /// The foreground syncs background I/O yields to, when set.
    pub fn foreground_syncs(&self) -> Option<Arc<ForegroundSyncs>> {
        self.syncs.get().cloned()
    }

    /// Waits until a write of `len` bytes at `offset` of `container` may go to the device.
    /// The container is the writer's until the grant is dropped. A background write first
    /// waits for a foreground sync under way (see `crate::fgsync`).
    pub fn acquire_write(
        &self,
        class: Class,
        container: u64,
        offset: u64,
        len: u64,
    ) -> Result<WriteGrant> {
        if class == Class::Background
            && let Some(syncs) = self.syncs.get()
        {
            syncs.yield_now();
        }
        let (tx, rx) = mpsc::channel();
        self.submit(class, Op::Write, container, offset, len, Reply::Write(tx))?;
        rx.recv().map_err(|_| MediaError::SchedulerStopped {
            medium: self.shared.device.uri().to_string(),
        })
    }
}

impl Drop for MediaScheduler {
    fn drop(&mut self) {
        self.lock().shutdown = true;
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

fn dispatcher(sh: &Arc<Shared>, max_inflight: usize, jobs: mpsc::Sender<Job>) {
    let depth = sh.device.queue_depth().max(1);
    loop {
        let job = {
            let mut st = sh.lock();
            let d = loop {
                if st.shutdown && st.q.is_empty() {
                    // Workers finish what they hold, then see the channel closed. Nobody
                    // waits on a request any more: waiters hold the scheduler alive.
                    return;
                }
                // With `max_inflight` operations in flight, only reads queued behind the
                // reads of their container (up to the device's queue depth) may go.
                let full = st.inflight >= max_inflight;
                if full && (depth == 1 || st.reading.is_empty()) {
                    st = sh.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                    continue;
                }
                let now = sh.epoch.elapsed();
                let State { q, reading, .. } = &mut *st;
                let blocked: HashSet<u64> = reading
                    .iter()
                    .filter(|&(_, &n)| n >= depth)
                    .map(|(&c, _)| c)
                    .collect();
                let next = if full {
                    let behind: HashSet<u64> = reading.keys().copied().collect();
                    q.next_behind(now, &blocked, &behind)
                } else {
                    q.next_with(now, &blocked)
                };
                match next {
                    Next::Dispatch(d) => break d,
                    Next::WaitUntil(t) => {
                        let wait = t.saturating_sub(now).max(Duration::from_micros(50));
                        st = sh
                            .cv
                            .wait_timeout(st, wait)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                    Next::Idle => st = sh.cv.wait(st).unwrap_or_else(|p| p.into_inner()),
                }
            };
            st.stats.dispatches += 1;
            st.stats.merged += d.ids.len() as u64 - 1;
            st.stats.expired += d.expired as u64;
            st.inflight += 1;
            // A read holds its container (a stalled container then ties up one worker, and
            // its other requests wait, timing out, instead of taking more). A write grant
            // only takes a slot: the writer does its own I/O, and reads of data already
            // committed in that container need not wait for it.
            if d.op == Op::Read {
                *st.reading.entry(d.container).or_insert(0) += 1;
            }
            let replies: Vec<(Reply, u64, u64)> = d
                .ids
                .iter()
                .filter_map(|id| st.replies.remove(id))
                .collect();
            let now = sh.epoch.elapsed();
            // Planned in dispatch order, under the lock.
            let due = sh
                .device
                .plan(d.op, d.container, d.offset, d.len, sh.epoch + now);
            match d.op {
                Op::Read => Job::Read(d, replies, now, due),
                Op::Write => Job::Write(d, replies, now, due),
            }
        };
        if let Err(mpsc::SendError(job)) = jobs.send(job) {
            // No worker left (cannot happen while the dispatcher holds the sender, but a
            // request must never be left without an answer).
            let (Job::Read(d, _, t, _) | Job::Write(d, _, t, _)) = &job;
            sh.finish(d, *t);
        }
    }
}

fn worker(sh: &Arc<Shared>, jobs: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        let job = match jobs.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        match job {
            Job::Read(d, replies, started, due) => serve_read(sh, &d, replies, started, due),
            Job::Write(d, replies, _, due) => {
                match due {
                    Some(due) => {
                        sh.device
                            .granting_write_planned(d.container, d.offset, d.len, due)
                    }
                    None => sh.device.granting_write(d.container, d.offset, d.len),
                }
                {
                    let mut st = sh.lock();
                    st.stats.writes += 1;
                    st.stats.bytes_written += d.len;
                }
                // One grant per dispatch (writes are never merged); the container is the
                // writer's until it drops the grant, which finishes the dispatch.
                // The write's time starts when the writer may write.
                let started = sh.epoch.elapsed();
                let mut grant = Some(WriteGrant {
                    done: Some((sh.clone(), d.clone(), started)),
                });
                for (reply, _, _) in replies {
                    let Reply::Write(tx) = reply else { continue };
                    if let Some(g) = grant.take() {
                        // A writer gone meanwhile drops the grant it was sent: finished.
                        let _ = tx.send(g);
                    }
                }
                // No writer waits any more (withdrawn): the dispatch is over.
                drop(grant);
            }
        }
    }
}

/// Reads `d` from the device, frees the device for the next dispatch at once (before the
/// data is handed out, so the device does not sit idle while it is copied), then answers.
fn serve_read(
    sh: &Shared,
    d: &Dispatch,
    replies: Vec<(Reply, u64, u64)>,
    started: Duration,
    due: Option<Instant>,
) {
    let res = match due {
        Some(due) => sh.device.read_planned(d.container, d.offset, d.len, due),
        None => sh.device.read(d.container, d.offset, d.len),
    };
    {
        // Counted before anyone is answered, so a caller sees its own read in the stats.
        let mut st = sh.lock();
        st.stats.reads += 1;
        st.stats.bytes_read += res.as_ref().map_or(0, |b| b.len() as u64);
        sh.finish_locked(&mut st, d, started);
    }
    let mut first_err = None;
    let res = match res {
        Ok(b) => Ok(b),
        Err(e) => {
            let msg = e.to_string();
            first_err = Some(e);
            Err(msg)
        }
    };
    for (reply, offset, len) in replies {
        let Reply::Read(tx) = reply else { continue };
        let out = match &res {
            Ok(buf) => {
                let start = ((offset - d.offset) as usize).min(buf.len());
                let end = (start + len as usize).min(buf.len());
                Ok(buf[start..end].to_vec())
            }
            Err(msg) => Err(first_err.take().unwrap_or_else(|| {
                MediaError::io(
                    sh.device.uri(),
                    format!("merged read of container {}", d.container),
                    std::io::Error::other(msg.clone()),
                )
            })),
        };
        let _ = tx.send(out);
    }
}
