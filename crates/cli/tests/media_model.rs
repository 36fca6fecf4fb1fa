//! `[media_model]`: archived reads through the mount pay the modelled media's time, and
//! `spinfs status --json` reports the model's counters.

mod common;

use common::*;
use std::fs;
use std::io::Write;
use std::time::Instant;

#[test]
fn archived_reads_go_through_the_model() {
    let mut m = Mounted::new(&[
        "--container-size",
        "32M",
        "--object-size",
        "64K",
        "--chunk-size",
        "1M",
    ]);
    let body: Vec<u8> = (0..6u32 << 20).map(|i| (i % 251) as u8).collect();
    fs::write(m.path("f"), &body).unwrap();
    archive_now(&m);
    m.umount();
    // 8 MB/s: the 6 MiB file cannot come back in less than ~0.75 s.
    fs::OpenOptions::new()
        .append(true)
        .open(m.store.join("spinfs.toml"))
        .unwrap()
        .write_all(b"\n[media_model]\nswitch_ms = 20\nseek_ms = 2\nbandwidth = 8000000\n")
        .unwrap();
    m.mount();
    assert_eq!(status(&m)["media"]["model"]["ops"], 0);
    let t = Instant::now();
    assert!(fs::read(m.path("f")).unwrap() == body);
    let took = t.elapsed().as_secs_f64();
    let s = status(&m);
    let model = &s["media"]["model"];
    let read = model["bytes_read"].as_u64().unwrap();
    assert!(read >= 6 << 20, "{s}");
    assert!(model["switches"].as_u64().unwrap() >= 1, "{s}");
    let sim = model["sim_time_ms"].as_u64().unwrap() as f64 / 1000.0;
    assert!(sim >= (6 << 20) as f64 / 8e6, "{s}");
    assert!(
        took >= 0.9 * sim,
        "read took {took:.2} s, the model says {sim:.2} s"
    );

    // Random small reads fetch only the objects covering them (no read-ahead), sequential
    // ones few large media reads.
    let seq_reads = s["media"]["reads"].as_u64().unwrap();
    assert!(
        seq_reads <= 20,
        "sequential 6 MiB in {seq_reads} media reads: {s}"
    );
    m.umount();
    fs::remove_dir_all(m.store.join("cache")).unwrap();
    m.mount();
    let f = fs::File::open(m.path("f")).unwrap();
    let mut b = [0u8; 4096];
    for (i, at) in [5u64 << 20, 1 << 20, 3 << 20, 2 << 20].iter().enumerate() {
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, *at).unwrap();
        assert!(b[..] == body[*at as usize..*at as usize + 4096], "read {i}");
    }
    let s = status(&m);
    let objects = s["media"]["objects_read"].as_u64().unwrap();
    assert!(
        objects <= 4 * 2 + 1,
        "4 random reads fetched {objects} objects: {s}"
    );
    drop(f);

    // A bad section is refused at mount with a one-line error.
    m.umount();
    let cfg = m.store.join("spinfs.toml");
    let text = fs::read_to_string(&cfg).unwrap();
    fs::write(&cfg, text.replace("bandwidth = 8000000", "bandwidth = 0")).unwrap();
    let out = spinfs(&["mount", m.store.to_str().unwrap(), m.mnt.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("media_model.bandwidth"),
        "{}",
        stderr(&out)
    );
    fs::write(&cfg, text).unwrap();
    m.mount();
}
