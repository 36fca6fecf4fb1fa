//! Scheduler policy as properties (proptest) over simulated time, and the threaded scheduler
//! in real time (throttle accuracy, timeouts, reads through the model).

use proptest::prelude::*;
use spinfs_media::model::{ModelParams, simulate};
use spinfs_media::sched::{Dispatch, Next, Op, Request, SchedQueue};
use spinfs_media::*;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MS: Duration = Duration::from_millis(1);

fn params() -> ModelParams {
    ModelParams {
        switch: Duration::from_secs(2),
        seek: Duration::from_millis(10),
        bandwidth: 200_000_000,
    }
}

fn far_deadlines() -> SchedConfig {
    SchedConfig {
        deadlines: [Duration::from_secs(1 << 30); 3],
        ..SchedConfig::default()
    }
}

fn class_of(c: u8) -> Class {
    [Class::Foreground, Class::Metadata, Class::Background][c as usize % 3]
}

fn req_strategy() -> impl Strategy<Value = Vec<(u8, u64, u64, u64, u64)>> {
    // (class, container, offset in 64K units, length in 4K units, arrival ms)
    prop::collection::vec((0u8..3, 0u64..6, 0u64..100, 1u64..40, 0u64..5000), 1..60)
}

fn build(v: &[(u8, u64, u64, u64, u64)], at_zero: bool) -> Vec<Request> {
    v.iter()
        .enumerate()
        .map(|(i, &(c, cont, off, len, arr))| Request {
            id: i as u64,
            class: class_of(c),
            op: Op::Read,
            container: cont,
            offset: off * 65536,
            len: len * 4096,
            arrival: if at_zero {
                Duration::ZERO
            } else {
                Duration::from_millis(arr)
            },
        })
        .collect()
}

fn served_once(reqs: &[Request], dispatches: &[(Duration, Dispatch)]) {
    let mut seen = HashMap::new();
    for (_, d) in dispatches {
        for id in &d.ids {
            *seen.entry(*id).or_insert(0) += 1;
            let r = &reqs[*id as usize];
            // Every request lies inside the operation that serves it.
            assert!(r.container == d.container && r.offset >= d.offset);
            assert!(r.offset + r.len <= d.offset + d.len);
        }
    }
    assert_eq!(seen.len(), reqs.len());
    assert!(seen.values().all(|&n| n == 1));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_request_served_exactly_once(v in req_strategy(), fifo in any::<bool>()) {
        let reqs = build(&v, false);
        let cfg = SchedConfig {
            policy: if fifo { Policy::Fifo } else { Policy::Elevator },
            deadlines: [200 * MS, 400 * MS, 800 * MS],
            batch_limit: 4,
            ..SchedConfig::default()
        };
        let r = simulate(cfg, params(), reqs.clone());
        served_once(&reqs, &r.dispatches);
        for (_, d) in &r.dispatches {
            let largest = d.ids.iter().map(|i| reqs[*i as usize].len).max().unwrap();
            prop_assert!(d.len <= (4u64 << 20).max(largest));
        }
    }

    #[test]
    fn priority_classes_in_order(v in req_strategy()) {
        let reqs = build(&v, true);
        let r = simulate(far_deadlines(), params(), reqs.clone());
        let classes: Vec<Class> = r.dispatches.iter().map(|(_, d)| d.class).collect();
        let mut sorted = classes.clone();
        sorted.sort();
        prop_assert_eq!(classes, sorted);
    }

    #[test]
    fn batched_per_container_in_offset_order(v in req_strategy()) {
        let mut reqs = build(&v, true);
        for r in &mut reqs {
            r.class = Class::Foreground;
        }
        let r = simulate(far_deadlines(), params(), reqs.clone());
        let distinct: std::collections::HashSet<u64> = reqs.iter().map(|r| r.container).collect();
        // One load per container, and inside a container the head only moves forward.
        prop_assert_eq!(r.counters.switches, distinct.len() as u64);
        for w in r.dispatches.windows(2) {
            let (a, b) = (&w[0].1, &w[1].1);
            if a.container == b.container {
                prop_assert!(b.offset >= a.offset + a.len, "{:?} then {:?}", a, b);
            }
        }
        let fifo = simulate(
            SchedConfig { policy: Policy::Fifo, ..far_deadlines() },
            params(),
            reqs.clone(),
        );
        prop_assert!(r.makespan <= fifo.makespan);
    }

    #[test]
    fn deadline_bounds_starvation(batch_limit in 1u32..20, deadline_ms in 100u64..3000, n in 300u64..600) {
        // A backlogged stream of 4 MiB foreground reads keeps container 0 busy for ever (they
        // arrive every 5 ms, each takes 31 ms); one background read waits in container 5.
        // Without its deadline it would wait for the whole stream (more than 9 s).
        let mut reqs: Vec<Request> = (0..n)
            .map(|i| Request {
                id: i,
                class: Class::Foreground,
                op: Op::Read,
                container: 0,
                offset: i * (4 << 20),
                len: 4 << 20,
                arrival: Duration::from_millis(i * 5),
            })
            .collect();
        reqs.push(Request {
            id: n,
            class: Class::Background,
            op: Op::Read,
            container: 5,
            offset: 0,
            len: 4096,
            arrival: Duration::ZERO,
        });
        let cfg = SchedConfig {
            deadlines: [Duration::from_secs(1 << 30), Duration::from_secs(1 << 30), Duration::from_millis(deadline_ms)],
            batch_limit,
            ..SchedConfig::default()
        };
        let r = simulate(cfg, params(), reqs);
        let done: HashMap<u64, Duration> = r.completions.iter().copied().collect();
        let service = Duration::from_millis(10) + Duration::from_secs_f64((4u64 << 20) as f64 / 2e8);
        // Load container 0 first, then after expiry at most batch_limit more reads there
        // (plus the one in progress), then load container 5 and read.
        let switch = Duration::from_secs(2);
        let bound = Duration::from_millis(deadline_ms) + switch + service * (batch_limit + 1) + switch + service;
        prop_assert!(done[&n] <= bound, "waited {:?}, bound {:?}", done[&n], bound);
    }
}

#[test]
fn token_bucket_rate_is_accurate() {
    // 200 backlogged background writes of 256 KiB through a 10 MB/s cap on a fast device.
    let cfg = SchedConfig {
        bg_write_rate: 10_000_000,
        bg_write_burst: 1 << 20,
        ..far_deadlines()
    };
    let fast = ModelParams {
        switch: Duration::ZERO,
        seek: Duration::ZERO,
        bandwidth: 0,
    };
    let reqs: Vec<Request> = (0..200)
        .map(|i| Request {
            id: i,
            class: Class::Background,
            op: Op::Write,
            container: 0,
            offset: i * 262144,
            len: 262144,
            arrival: Duration::ZERO,
        })
        .collect();
    let r = simulate(cfg, fast, reqs);
    let total = 200.0 * 262144.0;
    let expect = (total - (1 << 20) as f64) / 10e6;
    let got = r.dispatches.last().unwrap().0.as_secs_f64();
    assert!(
        (got - expect).abs() / expect < 0.01,
        "last write at {got} s, expected {expect} s"
    );
    // At no time did the dispatched bytes exceed burst + rate * t.
    let mut bytes = 0.0;
    for (t, d) in &r.dispatches {
        bytes += d.len as f64;
        assert!(bytes <= (1 << 20) as f64 + 10e6 * t.as_secs_f64() + 1.0);
    }
}

#[test]
fn slow_foreground_reads_hold_background_writes() {
    let cfg = SchedConfig {
        latency_target: 50 * MS,
        ..far_deadlines()
    };
    let mut q = SchedQueue::new(cfg);
    q.push(Request {
        id: 0,
        class: Class::Foreground,
        op: Op::Read,
        container: 1,
        offset: 0,
        len: 4096,
        arrival: Duration::ZERO,
    });
    q.push(Request {
        id: 1,
        class: Class::Background,
        op: Op::Write,
        container: 0,
        offset: 0,
        len: 4096,
        arrival: Duration::ZERO,
    });
    let Next::Dispatch(d) = q.next(Duration::ZERO) else {
        panic!()
    };
    assert_eq!(d.class, Class::Foreground);
    // The read took 2 s (> 50 ms target): writes wait one window after it.
    q.complete(&d, Duration::ZERO, Duration::from_secs(2));
    assert_eq!(
        q.next(Duration::from_secs(2)),
        Next::WaitUntil(Duration::from_secs(2) + 50 * MS)
    );
    assert!(matches!(
        q.next(Duration::from_secs(2) + 50 * MS),
        Next::Dispatch(_)
    ));
}

#[test]
fn threaded_scheduler_throttles_writes_in_real_time() {
    let dev = Arc::new(ModelDevice::new(
        ModelParams {
            switch: Duration::ZERO,
            seek: Duration::ZERO,
            bandwidth: 0,
        },
        None,
        0.0,
    ));
    let cfg = SchedConfig {
        bg_write_rate: 8 << 20,
        bg_write_burst: 256 << 10,
        ..SchedConfig::default()
    };
    let s = MediaScheduler::new(dev.clone(), cfg);
    let start = Instant::now();
    for i in 0..16u64 {
        let g = s
            .acquire_write(Class::Background, 0, i * (256 << 10), 256 << 10)
            .unwrap();
        drop(g);
    }
    let el = start.elapsed().as_secs_f64();
    // 4 MiB at 8 MiB/s with a 256 KiB burst: 15/32 s.
    let expect = 15.0 / 32.0;
    assert!(
        el >= expect * 0.97 && el < expect * 1.5,
        "took {el} s, expected {expect} s"
    );
    assert_eq!(dev.counters().bytes_written, 4 << 20);
    assert_eq!(s.stats().writes, 16);
}

#[test]
fn read_times_out_on_slow_media_and_is_withdrawn() {
    let slow = ModelParams {
        switch: Duration::from_millis(300),
        seek: Duration::ZERO,
        bandwidth: 0,
    };
    let dev = Arc::new(ModelDevice::new(slow, None, 1.0));
    let s = MediaScheduler::new(dev.clone(), SchedConfig::default());
    let a = s.submit_read(Class::Foreground, 1, 0, 4096).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    // Container 2 needs another 300 ms switch after the first read's: more than 100 ms.
    let e = s
        .read(
            Class::Foreground,
            2,
            0,
            4096,
            Some(Duration::from_millis(100)),
        )
        .unwrap_err();
    assert!(matches!(e, MediaError::Timeout { .. }), "{e}");
    assert_eq!(a.wait(None).unwrap().len(), 4096);
    assert_eq!(s.stats().timeouts, 1);
    drop(s);
    // The withdrawn read never reached the device.
    assert_eq!(dev.counters().switches, 1);
}

/// A device whose container 1 hangs until released; every read returns `len` bytes.
struct HangingDevice {
    release: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
    inflight: usize,
}

impl Device for HangingDevice {
    fn uri(&self) -> &str {
        "test:hanging"
    }
    fn read(&self, container: u64, _offset: u64, len: u64) -> Result<buf::AlignedBuf> {
        if container == 1 {
            let mut r = self.release.lock().unwrap();
            while !*r {
                r = self.cv.wait(r).unwrap();
            }
        }
        Ok(buf::AlignedBuf::zeroed(len as usize))
    }
    fn max_inflight(&self) -> usize {
        self.inflight
    }
}

#[test]
fn a_stalled_container_holds_up_only_its_own_requests() {
    let dev = Arc::new(HangingDevice {
        release: std::sync::Mutex::new(false),
        cv: std::sync::Condvar::new(),
        inflight: 4,
    });
    let s = MediaScheduler::new(dev.clone(), SchedConfig::default());
    let stuck = s.submit_read(Class::Foreground, 1, 0, 4096).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    // Another request for the stalled container waits and times out, without taking a
    // second worker...
    let e = s
        .read(
            Class::Foreground,
            1,
            8192,
            4096,
            Some(Duration::from_millis(100)),
        )
        .unwrap_err();
    assert!(matches!(e, MediaError::Timeout { .. }), "{e}");
    // ...while other containers are served, and a write is granted.
    for c in [0, 2, 3, 0, 2] {
        let got = s
            .read(Class::Foreground, c, 0, 4096, Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(got.len(), 4096);
    }
    drop(
        s.acquire_write(Class::Background, 1, 1 << 20, 4096)
            .unwrap(),
    );
    assert_eq!(s.stats().timeouts, 1);
    *dev.release.lock().unwrap() = true;
    dev.cv.notify_all();
    assert_eq!(stuck.wait(None).unwrap().len(), 4096);
    // The container is served again.
    assert_eq!(
        s.read(Class::Foreground, 1, 0, 4096, Some(Duration::from_secs(5)))
            .unwrap()
            .len(),
        4096
    );
}

#[test]
fn adaptive_rate_halves_on_slow_syncs_during_background_writes_and_recovers() {
    let cfg = SchedConfig {
        adaptive: true,
        bg_write_burst: 1 << 20,
        ..far_deadlines()
    };
    let mut q = SchedQueue::new(cfg);
    let mut t = Duration::ZERO;
    // Quiet syncs of 1 ms: the automatic target becomes 2 ms.
    for _ in 0..10 {
        t += 10 * MS;
        q.foreground_sync(t, MS);
    }
    assert_eq!(q.adaptive_stats().sync_target, 2 * MS);
    assert_eq!(q.adaptive_stats().rate, None);
    // Background writes of 1 MiB taking 10 ms each: 100 MiB/s measured, not limited.
    let write = |q: &mut SchedQueue, id: u64, t: &mut Duration| {
        q.push(Request {
            id,
            class: Class::Background,
            op: Op::Write,
            container: 0,
            offset: id << 20,
            len: 1 << 20,
            arrival: *t,
        });
        let d = loop {
            match q.next(*t) {
                Next::Dispatch(d) => break d,
                Next::WaitUntil(w) => *t = w,
                Next::Idle => panic!("idle with a write pending"),
            }
        };
        let started = *t;
        *t += 10 * MS;
        q.complete(&d, started, *t);
    };
    let start = t;
    for id in 0..20 {
        write(&mut q, id, &mut t);
    }
    assert_eq!(t - start, 200 * MS, "unlimited: back to back");
    let bw = q.adaptive_stats().bandwidth.unwrap();
    assert!((bw - (100 << 20) as f64).abs() < 1.0, "{bw}");
    // A slow sync while they run: halved, and writes hold for that sync's time.
    q.foreground_sync(t, 30 * MS);
    let st = q.adaptive_stats();
    assert_eq!(st.rate, Some(bw / 2.0));
    assert_eq!(st.decreases, 1);
    // Another slow one at once does not halve again (one decrease per 100 ms).
    q.foreground_sync(t + MS, 30 * MS);
    assert_eq!(q.adaptive_stats().decreases, 1);
    // Slow syncs keep coming while writes go on: down to the floor (1/16 of the
    // bandwidth), never below.
    let mut id = 1000;
    for _ in 0..8 {
        let last = t;
        while t < last + 110 * MS {
            write(&mut q, id, &mut t);
            id += 1;
        }
        q.foreground_sync(t, 30 * MS);
    }
    assert_eq!(q.adaptive_stats().rate, Some(bw / 16.0));
    t += 100 * MS;
    // At 1/16 of the bandwidth (plus the burst), 20 MiB take about 3 s instead of 200 ms,
    // less as the rate climbs back (1/16 every 200 ms without complaints).
    let before = t;
    for id in 20..40 {
        write(&mut q, id, &mut t);
    }
    let took = t - before;
    assert!(
        took > Duration::from_millis(800) && took < Duration::from_secs(4),
        "{took:?}"
    );
    // Quiet for long enough: the limit is lifted.
    t += Duration::from_secs(5);
    q.push(Request {
        id: 99,
        class: Class::Foreground,
        op: Op::Read,
        container: 0,
        offset: 0,
        len: 4096,
        arrival: t,
    });
    assert!(matches!(q.next(t), Next::Dispatch(_)));
    assert_eq!(q.adaptive_stats().rate, None);
    // Fast syncs during background writes change nothing.
    write(&mut q, 100, &mut t);
    q.foreground_sync(t, MS);
    assert_eq!(q.adaptive_stats().rate, None);
}

#[test]
fn next_behind_queues_only_the_policy_choice_for_a_container_being_read() {
    let read = |id: u64, class: Class, container: u64, offset: u64| Request {
        id,
        class,
        op: Op::Read,
        container,
        offset,
        len: 4096,
        arrival: Duration::ZERO,
    };
    let none = std::collections::HashSet::new();
    let reading: std::collections::HashSet<u64> = [1].into();
    let mut q = SchedQueue::new(far_deadlines());
    q.push(read(0, Class::Foreground, 1, 0));
    q.push(read(1, Class::Foreground, 1, 4096));
    q.push(read(2, Class::Foreground, 2, 0));
    let Next::Dispatch(d) = q.next_with(Duration::ZERO, &none) else {
        panic!("nothing dispatched")
    };
    assert_eq!(
        (d.container, d.offset, d.len),
        (1, 0, 8192),
        "merged: {d:?}"
    );
    // Container 1 being read: the other container's read waits for the device.
    assert_eq!(q.next_behind(Duration::ZERO, &none, &reading), Next::Idle);
    assert_eq!(q.len(), 1);
    // The elevator drains container 1 first: its next read goes behind the one in flight.
    q.push(read(3, Class::Foreground, 1, 65536));
    let Next::Dispatch(d) = q.next_behind(Duration::ZERO, &none, &reading) else {
        panic!("the next read of container 1 was not queued behind")
    };
    assert_eq!((d.container, d.offset), (1, 65536));
    // A read of container 1 of a lower class than what waits elsewhere does not jump ahead.
    q.push(read(4, Class::Background, 1, 131072));
    assert_eq!(q.next_behind(Duration::ZERO, &none, &reading), Next::Idle);
    assert_eq!(q.len(), 2);
}

#[test]
fn model_timeline_queues_accesses_behind_each_other() {
    let p = ModelParams {
        switch: Duration::from_millis(10),
        seek: Duration::from_millis(1),
        bandwidth: 100_000_000,
    };
    let dev = ModelDevice::new(p, None, 1.0);
    let t0 = Instant::now();
    // Switch + 1 MB: 20 ms; then 1 MB more, contiguous, dispatched at the same moment: it
    // starts when the first is over.
    let a = dev.plan(Op::Read, 3, 0, 1_000_000, t0).unwrap();
    assert_eq!(a - t0, Duration::from_millis(20));
    let b = dev.plan(Op::Read, 3, 1_000_000, 1_000_000, t0).unwrap();
    assert_eq!(b - t0, Duration::from_millis(30));
    // Dispatched while the drive is still busy (at 25 ms): starts at 30 ms, with a seek.
    let c = dev
        .plan(Op::Read, 3, 0, 1_000_000, t0 + Duration::from_millis(25))
        .unwrap();
    assert_eq!(c - t0, Duration::from_millis(41));
    // Dispatched after the drive went idle: starts when dispatched.
    let late = t0 + Duration::from_secs(1);
    let d = dev.plan(Op::Read, 3, 1_000_000, 1_000_000, late).unwrap();
    assert_eq!(d - late, Duration::from_millis(10));
    let c = dev.counters();
    assert_eq!((c.switches, c.seeks, c.ops), (1, 1, 4));
    assert_eq!(c.sim_time, Duration::from_millis(51));
    // Scale 0: nothing waits, the counters still count.
    let fast = ModelDevice::new(p, None, 0.0);
    let now = Instant::now();
    assert_eq!(fast.plan(Op::Read, 1, 0, 1_000_000, now), Some(now));
    assert_eq!(fast.counters().sim_time, Duration::from_millis(20));
}

/// A device that holds every read until released, records what it serves, and queues
/// `depth` reads per container behind one in service.
struct GateDevice {
    open: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
    /// (container, offset) of the reads started and not finished yet, and of all started.
    inflight: std::sync::Mutex<Vec<(u64, u64)>>,
    started: std::sync::Mutex<Vec<(u64, u64)>>,
    depth: usize,
}

impl Device for GateDevice {
    fn uri(&self) -> &str {
        "test:gate"
    }
    fn read(&self, container: u64, offset: u64, len: u64) -> Result<buf::AlignedBuf> {
        self.inflight.lock().unwrap().push((container, offset));
        self.started.lock().unwrap().push((container, offset));
        let mut o = self.open.lock().unwrap();
        while !*o {
            o = self.cv.wait(o).unwrap();
        }
        drop(o);
        self.inflight
            .lock()
            .unwrap()
            .retain(|&r| r != (container, offset));
        Ok(buf::AlignedBuf::zeroed(len as usize))
    }
    fn queue_depth(&self) -> usize {
        self.depth
    }
}

#[test]
fn a_device_with_a_queue_gets_the_next_read_of_its_container_while_it_serves_one() {
    let dev = Arc::new(GateDevice {
        open: std::sync::Mutex::new(false),
        cv: std::sync::Condvar::new(),
        inflight: std::sync::Mutex::new(Vec::new()),
        started: std::sync::Mutex::new(Vec::new()),
        depth: 2,
    });
    let s = MediaScheduler::new(dev.clone(), SchedConfig::default());
    // Opens the gate however the test ends (the scheduler waits for its reads when dropped).
    struct Opener(Arc<GateDevice>);
    impl Drop for Opener {
        fn drop(&mut self) {
            *self.0.open.lock().unwrap_or_else(|p| p.into_inner()) = true;
            self.0.cv.notify_all();
        }
    }
    let opener = Opener(dev.clone());
    let wait_for = |n: usize| {
        let t = Instant::now();
        while dev.inflight.lock().unwrap().len() < n {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{n} reads never started"
            );
            std::thread::sleep(MS);
        }
    };
    let a = s.submit_read(Class::Foreground, 1, 0, 4096).unwrap();
    wait_for(1);
    // Not adjacent to the first (no merge): queued behind it on the device.
    let b = s.submit_read(Class::Foreground, 1, 1 << 20, 4096).unwrap();
    wait_for(2);
    // The device is full: another container's read and a third read of container 1 wait
    // in the scheduler (where they can still be reordered or withdrawn).
    let c = s.submit_read(Class::Foreground, 2, 0, 4096).unwrap();
    let d = s.submit_read(Class::Foreground, 1, 2 << 20, 4096).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let mut held = dev.inflight.lock().unwrap().clone();
    held.sort();
    assert_eq!(held, vec![(1, 0), (1, 1 << 20)]);
    drop(opener);
    for r in [a, b, c, d] {
        assert_eq!(
            r.wait(Some(Instant::now() + Duration::from_secs(10)))
                .unwrap()
                .len(),
            4096
        );
    }
    assert_eq!(dev.started.lock().unwrap().len(), 4);
    assert_eq!(s.stats().reads, 4);
}
