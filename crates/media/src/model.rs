//! A media model for tests and benchmarks: a library with one drive that loads one container
//! at a time (switch latency), moves its head (seek latency per jump) and transfers at a fixed
//! bandwidth. It keeps counters and the simulated time, and can sit between the scheduler and
//! a real backend, optionally taking a scaled copy of the simulated time in real time: then it
//! keeps an absolute timeline (each access starts when it is dispatched or when the drive is
//! free, whichever is later, and ends its modelled time after that; the caller waits until
//! then), so its wall time is its simulated time, whatever the host's wake-up latencies.

use crate::buf::AlignedBuf;
use crate::error::Result;
use crate::sched::{Device, Next, Op, Request, SchedConfig, SchedQueue};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Costs of the modelled medium.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelParams {
    /// Time to unload the loaded container and load another.
    pub switch: Duration,
    /// Time to move the head to a non-contiguous offset.
    pub seek: Duration,
    /// Transfer rate in bytes per second.
    pub bandwidth: u64,
}

impl ModelParams {
    /// The magneto-electric disk library of the bench: 2 s switch, 10 ms seek, 200 MB/s.
    pub fn disc_library() -> ModelParams {
        ModelParams {
            switch: Duration::from_secs(2),
            seek: Duration::from_millis(10),
            bandwidth: 200_000_000,
        }
    }
}

/// What the model has seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModelCounters {
    pub switches: u64,
    pub seeks: u64,
    pub ops: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub sim_time: Duration,
}

/// The state of the modelled drive.
#[derive(Debug, Clone)]
pub struct MediaModel {
    params: ModelParams,
    loaded: Option<u64>,
    head: u64,
    counters: ModelCounters,
}

impl MediaModel {
    pub fn new(params: ModelParams) -> MediaModel {
        MediaModel {
            params,
            loaded: None,
            head: 0,
            counters: ModelCounters::default(),
        }
    }

    pub fn counters(&self) -> ModelCounters {
        self.counters
    }

    /// Accounts one access and returns its simulated duration.
    pub fn access(&mut self, container: u64, offset: u64, len: u64, write: bool) -> Duration {
        let mut t = Duration::ZERO;
        if self.loaded != Some(container) {
            t += self.params.switch;
            self.counters.switches += 1;
            self.loaded = Some(container);
            self.head = 0;
        }
        if offset != self.head {
            t += self.params.seek;
            self.counters.seeks += 1;
        }
        if self.params.bandwidth > 0 {
            t += Duration::from_secs_f64(len as f64 / self.params.bandwidth as f64);
        }
        self.head = offset + len;
        self.counters.ops += 1;
        if write {
            self.counters.bytes_written += len;
        } else {
            self.counters.bytes_read += len;
        }
        self.counters.sim_time += t;
        t
    }
}

/// The model as a scheduler device, in front of a real device or of nothing (reads then
/// return zeros). One drive: one access served at a time, and one more read of the container
/// it reads queued behind it (`queue_depth` 2), so the drive goes from one read to the next
/// without waiting for the host.
pub struct ModelDevice {
    uri: String,
    inner: Option<Arc<dyn Device>>,
    model: Mutex<Timeline>,
    time_scale: f64,
}

/// The model and when the drive is free (the end of the last access planned).
struct Timeline {
    model: MediaModel,
    free_at: Option<Instant>,
}

/// Sleeps until `due` (again after an early wake-up).
fn sleep_until(due: Instant) {
    loop {
        let now = Instant::now();
        if now >= due {
            return;
        }
        std::thread::sleep(due - now);
    }
}

impl ModelDevice {
    /// `time_scale` > 0 makes each access take (at least) its simulated time times the scale.
    pub fn new(params: ModelParams, inner: Option<Arc<dyn Device>>, time_scale: f64) -> Self {
        let uri = match &inner {
            Some(d) => format!("model:{}", d.uri()),
            None => "model:".to_string(),
        };
        ModelDevice {
            uri,
            inner,
            model: Mutex::new(Timeline {
                model: MediaModel::new(params),
                free_at: None,
            }),
            time_scale,
        }
    }

    pub fn counters(&self) -> ModelCounters {
        self.model
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .model
            .counters()
    }

    /// Accounts an access dispatched at `at` on the timeline: it starts then or when the
    /// drive is free, whichever is later, and is over its (scaled) modelled time after that.
    fn schedule(&self, container: u64, offset: u64, len: u64, write: bool, at: Instant) -> Instant {
        let mut tl = self.model.lock().unwrap_or_else(|p| p.into_inner());
        let t = tl
            .model
            .access(container, offset, len, write)
            .mul_f64(self.time_scale.max(0.0));
        let start = tl.free_at.map_or(at, |f| f.max(at));
        let due = start + t;
        tl.free_at = Some(due);
        due
    }
}

impl Device for ModelDevice {
    fn uri(&self) -> &str {
        &self.uri
    }
    /// The access takes the modelled time: the real device's time is part of it, not added
    /// to it (the real device stands in for a slower one), unless it is longer.
    fn read(&self, container: u64, offset: u64, len: u64) -> Result<AlignedBuf> {
        let due = self.schedule(container, offset, len, false, Instant::now());
        self.read_planned(container, offset, len, due)
    }
    fn granting_write(&self, container: u64, offset: u64, len: u64) {
        let due = self.schedule(container, offset, len, true, Instant::now());
        self.granting_write_planned(container, offset, len, due);
    }
    fn queue_depth(&self) -> usize {
        2
    }
    fn plan(&self, op: Op, container: u64, offset: u64, len: u64, at: Instant) -> Option<Instant> {
        Some(self.schedule(container, offset, len, op == Op::Write, at))
    }
    /// The real device reads at once (while the drive may still serve an earlier access);
    /// the data is handed over when the modelled access is over.
    fn read_planned(
        &self,
        container: u64,
        offset: u64,
        len: u64,
        due: Instant,
    ) -> Result<AlignedBuf> {
        let r = match &self.inner {
            Some(d) => d.read(container, offset, len),
            None => Ok(AlignedBuf::zeroed(len as usize)),
        };
        sleep_until(due);
        r
    }
    fn granting_write_planned(&self, container: u64, offset: u64, len: u64, due: Instant) {
        sleep_until(due);
        if let Some(d) = &self.inner {
            d.granting_write(container, offset, len);
        }
    }
}

/// Result of a simulated run.
#[derive(Debug, Clone)]
pub struct SimResult {
    /// Simulated time when the last request completed.
    pub makespan: Duration,
    pub counters: ModelCounters,
    /// (request id, completion time) for every request.
    pub completions: Vec<(u64, Duration)>,
    /// Every dispatch in order, with its start time.
    pub dispatches: Vec<(Duration, crate::sched::Dispatch)>,
}

/// Runs `requests` (with their arrival times) through a scheduler queue and the model in
/// simulated time: the device serves one dispatch at a time.
pub fn simulate(cfg: SchedConfig, params: ModelParams, mut requests: Vec<Request>) -> SimResult {
    requests.sort_by_key(|r| (r.arrival, r.id));
    let mut arrivals = requests.into_iter().peekable();
    let mut q = SchedQueue::new(cfg);
    let mut model = MediaModel::new(params);
    let mut now = Duration::ZERO;
    let mut completions = Vec::new();
    let mut dispatches = Vec::new();
    loop {
        while let Some(r) = arrivals.next_if(|r| r.arrival <= now) {
            q.push(r);
        }
        let next_arrival = arrivals.peek().map(|r| r.arrival);
        match q.next(now) {
            Next::Dispatch(d) => {
                let t = model.access(
                    d.container,
                    d.offset,
                    d.len,
                    d.op == crate::sched::Op::Write,
                );
                dispatches.push((now, d.clone()));
                let started = now;
                now += t;
                for id in &d.ids {
                    completions.push((*id, now));
                }
                q.complete(&d, started, now);
            }
            Next::WaitUntil(t) => now = next_arrival.map_or(t, |a| a.min(t)).max(now),
            Next::Idle => match next_arrival {
                Some(a) => now = a,
                None => break,
            },
        }
    }
    SimResult {
        makespan: now,
        counters: model.counters(),
        completions,
        dispatches,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_counts_switches_seeks_and_time() {
        let mut m = MediaModel::new(ModelParams {
            switch: Duration::from_secs(2),
            seek: Duration::from_millis(10),
            bandwidth: 100_000_000,
        });
        let t = m.access(3, 0, 100_000_000, false);
        assert_eq!(t, Duration::from_secs(3));
        let t = m.access(3, 100_000_000, 1_000_000, false);
        assert_eq!(t, Duration::from_millis(10));
        let t = m.access(3, 0, 0, true);
        assert_eq!(t, Duration::from_millis(10));
        m.access(4, 0, 0, false);
        let c = m.counters();
        assert_eq!((c.switches, c.seeks, c.ops), (2, 1, 4));
        assert_eq!(c.bytes_read, 101_000_000);
        assert_eq!(c.sim_time, Duration::from_millis(5020));
    }
}
