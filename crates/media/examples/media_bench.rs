//! Media benchmarks (run through `bench/media_bench.sh`).
//!
//! (a) Sequential append throughput to a `dir:` medium with the io_uring and the pwrite
//!     engines, against a raw direct-I/O write of the same bytes (a copy in /dev/shm) with
//!     `dd bs=4M oflag=direct conv=fsync` in the same directory, in the same run. Rounds are
//!     interleaved and the median of each is reported.
//! (b) Scattered recall of 500 random 1 MiB ranges over 20 containers through the media
//!     model (2 s container switch, 10 ms seek, 200 MB/s): simulated media time with the
//!     scheduler's elevator policy against FIFO.
//!
//! Usage: media_bench [DIR] [MiB] [ROUNDS]   (defaults: /var/tmp, 1024, 3)

use spinfs_media::backend::BackendOptions;
use spinfs_media::model::{ModelParams, simulate};
use spinfs_media::sched::{Op, Request};
use spinfs_media::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn geometry() -> Geometry {
    Geometry::with_default_reserve(480 * MIB, 252 << 10, 4 * MIB).expect("default geometry")
}

fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x1234_5678_9abc_def1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Appends `total` bytes as one image and commits; returns MB/s.
fn append_run(dir: &Path, engine: EngineChoice, total: u64, buf: &[u8]) -> (f64, bool) {
    let media = dir.join("bench-media");
    let _ = std::fs::remove_dir_all(&media);
    let uri = format!("dir:{}", media.display());
    let opts = BackendOptions {
        engine,
        direct: true,
        read_only: false,
    };
    let m = Medium::open(&uri, geometry(), opts).expect("open medium");
    let direct = m.backend().direct_io();
    let mut w = MediumWriter::open(m, None).expect("writer");
    let start = Instant::now();
    w.begin_image(ImageRef {
        id: 1,
        kind: ImageKind::Blob,
    })
    .expect("begin");
    let mut left = total;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        w.append(&buf[..n]).expect("append");
        left -= n as u64;
    }
    w.finish_image().expect("finish");
    w.commit().expect("commit");
    let secs = start.elapsed().as_secs_f64();
    drop(w);
    let _ = std::fs::remove_dir_all(&media);
    (total as f64 / secs / 1e6, direct)
}

/// `dd` of the same bytes (read from a copy in RAM, /dev/shm) with O_DIRECT and a final
/// fsync; returns MB/s.
fn dd_run(dir: &Path, total: u64, src: &Path) -> f64 {
    let out = dir.join("bench-dd.raw");
    let start = Instant::now();
    let st = Command::new("dd")
        .arg(format!("if={}", src.display()))
        .arg(format!("of={}", out.display()))
        .arg("bs=4M")
        .arg(format!("count={}", total / (4 * MIB)))
        .arg("iflag=fullblock")
        .arg("oflag=direct")
        .arg("conv=fsync")
        .arg("status=none")
        .status()
        .expect("run dd");
    let secs = start.elapsed().as_secs_f64();
    assert!(st.success(), "dd failed");
    let _ = std::fs::remove_file(&out);
    total as f64 / secs / 1e6
}

/// Writes the byte stream the appends write (the pattern repeated) to a RAM-backed file.
fn dd_source(total: u64, buf: &[u8]) -> std::path::PathBuf {
    use std::io::Write;
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() { shm } else { Path::new("/tmp") };
    let path = dir.join(format!("spinfs-media-bench-{}.src", std::process::id()));
    let mut f = std::fs::File::create(&path).expect("create dd source");
    let mut left = total;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).expect("write dd source");
        left -= n as u64;
    }
    path
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn recall_requests() -> Vec<Request> {
    let g = geometry();
    let mut x: u64 = 42;
    let mut rnd = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    (0..500)
        .map(|i| {
            let container = rnd(20);
            let start = rnd(g.usable() - MIB);
            // The reader fetches the objects covering the range.
            let first = start / g.object_size;
            let last = (start + MIB - 1) / g.object_size;
            Request {
                id: i,
                class: Class::Foreground,
                op: Op::Read,
                container,
                offset: g.data_to_container(first * g.object_size),
                len: (last - first + 1) * g.object_size,
                arrival: Duration::ZERO,
            }
        })
        .collect()
}

fn recall(policy: Policy) -> (Duration, spinfs_media::ModelCounters) {
    let cfg = SchedConfig {
        policy,
        ..SchedConfig::default()
    };
    let r = simulate(cfg, ModelParams::disc_library(), recall_requests());
    (r.makespan, r.counters)
}

/// The same recall through the threaded scheduler and a `ModelDevice` (no sleeping): the
/// model's simulated time of what the dispatcher actually did.
fn recall_threaded() -> spinfs_media::ModelCounters {
    let dev = std::sync::Arc::new(ModelDevice::new(ModelParams::disc_library(), None, 0.0));
    let s = MediaScheduler::new(dev.clone(), SchedConfig::default());
    let pending: Vec<_> = recall_requests()
        .iter()
        .map(|r| {
            s.submit_read(r.class, r.container, r.offset, r.len)
                .expect("submit")
        })
        .collect();
    for p in pending {
        p.wait(None).expect("read");
    }
    dev.counters()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = Path::new(args.get(1).map_or("/var/tmp", |s| s.as_str())).to_path_buf();
    let mib: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let rounds: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3);
    let total = mib.next_multiple_of(4) * MIB;
    let buf = pattern(64 * MIB as usize);

    let src = dd_source(total, &buf);
    let (mut uring, mut pwrite, mut raw) = (Vec::new(), Vec::new(), Vec::new());
    let mut direct = true;
    for _ in 0..rounds {
        let (u, d1) = append_run(&dir, EngineChoice::Uring, total, &buf);
        let (p, d2) = append_run(&dir, EngineChoice::Pwrite, total, &buf);
        let r = dd_run(&dir, total, &src);
        direct &= d1 && d2;
        uring.push(u);
        pwrite.push(p);
        raw.push(r);
    }
    let _ = std::fs::remove_file(&src);
    let (u, p, r) = (median(uring), median(pwrite), median(raw));
    println!(
        "# (a) sequential append of {mib} MiB to dir:{} (O_DIRECT: {direct}), median of {rounds}",
        dir.display()
    );
    println!("media_append_uring_MBps {u:.0}");
    println!("media_append_pwrite_MBps {p:.0}");
    println!("media_append_raw_dd_direct_MBps {r:.0}");
    println!("media_append_uring_vs_raw {:.3}", u / r);
    println!("media_append_pwrite_vs_raw {:.3}", p / r);

    let (fifo, fc) = recall(Policy::Fifo);
    let (sched, sc) = recall(Policy::Elevator);
    println!(
        "# (b) recall of 500 random 1 MiB ranges over 20 containers, model 2 s switch / 10 ms seek / 200 MB/s"
    );
    println!(
        "recall_fifo_sim_s {:.1} (switches {}, seeks {})",
        fifo.as_secs_f64(),
        fc.switches,
        fc.seeks
    );
    println!(
        "recall_scheduled_sim_s {:.1} (switches {}, seeks {})",
        sched.as_secs_f64(),
        sc.switches,
        sc.seeks
    );
    let tc = recall_threaded();
    println!(
        "recall_threaded_scheduler_sim_s {:.1} (switches {}, seeks {})",
        tc.sim_time.as_secs_f64(),
        tc.switches,
        tc.seeks
    );
    println!(
        "recall_fifo_vs_scheduled {:.2}",
        fifo.as_secs_f64() / sched.as_secs_f64()
    );
}
