//! `[media_model]`: archived reads through the mount pay the modelled media's time, and
//! `spinfs status --json` reports the model's counters.

mod common;

use common::*;
use std::fs;
use std::io::Write;
use std::time::Instant;

fn status(m: &Mounted) -> serde_json::Value {
    let out = spinfs_ok(&["status", m.store.to_str().unwrap(), "--json"]);
    serde_json::from_slice(&out.stdout).unwrap()
}

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
    spinfs_ok(&["archive", m.store.to_str().unwrap(), "--wait"]);
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
