//! `spinfs media ls` and `spinfs media verify` on a small store.

use spinfs_media::{BackendOptions, Geometry, ImageKind, ImageRef, Medium, MediumWriter};
use spinfs_store::StoreConfig;
use std::process::Command;

fn spinfs() -> Command {
    Command::new(env!("CARGO_BIN_EXE_spinfs"))
}

#[test]
fn ls_and_verify_report_damage_precisely() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path();
    let cfg = StoreConfig {
        media: format!("dir:{}", store.join("media").display()),
        container_size: 1 << 20,
        object_size: 64 << 10,
        chunk_size: 256 << 10,
        archive_threshold: 1 << 20,
        cache_size: 1 << 20,
        ..StoreConfig::default()
    };
    cfg.validate().unwrap();
    std::fs::write(store.join("spinfs.toml"), cfg.to_toml()).unwrap();
    let g = Geometry::new(
        cfg.container_size,
        cfg.container_reserved(),
        cfg.object_size,
        cfg.chunk_size,
    )
    .unwrap();
    let m = Medium::open(&cfg.media, g, BackendOptions::default()).unwrap();
    let mut w = MediumWriter::open(m, None).unwrap();
    for (id, kind, len) in [
        (1, ImageKind::Blob, 1_500_000usize),
        (1, ImageKind::Meta, 5000),
    ] {
        w.begin_image(ImageRef { id, kind }).unwrap();
        w.append(&vec![id as u8 + len as u8; len]).unwrap();
        w.finish_image().unwrap();
    }
    w.commit().unwrap();
    drop(w);

    let out = spinfs().args(["media", "ls"]).arg(store).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("blob.1"), "{text}");
    assert!(text.contains("[meta.1 complete]"), "{text}");
    assert!(text.contains("2 containers"), "{text}");

    let out = spinfs()
        .args(["media", "verify"])
        .arg(store)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Damage object 3 of container 0.
    let path = store.join("media").join("c00000000.spc");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(64 << 10) + 3 * (64 << 10) + 17] ^= 0xFF;
    std::fs::write(&path, bytes).unwrap();
    let out = spinfs()
        .args(["media", "verify"])
        .arg(store)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("container 0 object 3 (blob.1)"), "{text}");
    assert!(text.contains("1 damaged objects"), "{text}");

    let out = spinfs()
        .args(["media", "verify"])
        .arg(t.path().join("nope"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("spinfs.toml"));
}
