//! The `file:` backend on a raw block device (a loop device), with O_DIRECT and io_uring.

use spinfs_media::backend::BackendOptions;
use spinfs_media::*;
use std::process::Command;

/// Detaches the loop device when dropped, also when the test fails.
struct LoopDev(String);

impl LoopDev {
    fn attach(file: &std::path::Path) -> LoopDev {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(file)
            .output()
            .expect("run losetup");
        assert!(
            out.status.success(),
            "losetup failed (the test needs root and loop devices): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDev(String::from_utf8(out.stdout).unwrap().trim().to_string())
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn file_backend_on_loop_device() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("disk.img");
    // Room for exactly 3 containers of 1 MiB.
    std::fs::File::create(&img)
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    let dev = LoopDev::attach(&img);
    let g = Geometry::with_default_reserve(1 << 20, 64 << 10, 256 << 10).unwrap();
    let uri = format!("file:{}", dev.0);
    let opts = BackendOptions {
        engine: EngineChoice::Uring,
        direct: true,
        read_only: false,
    };
    let m = Medium::open(&uri, g, opts).unwrap();
    assert!(m.backend().direct_io(), "a block device takes O_DIRECT");
    let mut w = MediumWriter::open(m.clone(), None).unwrap();
    let a: Vec<u8> = (0..(2 * g.usable() + 5000))
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    w.begin_image(ImageRef {
        id: 1,
        kind: ImageKind::Blob,
    })
    .unwrap();
    w.append(&a).unwrap();
    let e = w.finish_image().unwrap();
    w.commit().unwrap();
    assert_eq!(e.extents.len(), 3);
    assert_eq!(e.extents[2].container, 2);
    // The device is full: a fourth container does not fit.
    w.begin_image(ImageRef {
        id: 2,
        kind: ImageKind::Blob,
    })
    .unwrap();
    let err = w.append(&vec![1u8; g.usable() as usize]).unwrap_err();
    assert!(
        matches!(err, MediaError::Full { container: 3, .. }),
        "{err}"
    );
    drop(w);

    let m = Medium::open(
        &uri,
        g,
        BackendOptions {
            engine: EngineChoice::Pwrite,
            direct: true,
            read_only: false,
        },
    )
    .unwrap();
    let cat = Catalogue::scan(&m, &mut |_, _| {}).unwrap();
    assert_eq!(
        cat.images[&ImageRef {
            id: 1,
            kind: ImageKind::Blob
        }],
        e
    );
    let r = MediumReader::new(m.clone(), None);
    let off = g.usable() - 100;
    assert_eq!(
        r.read(&e, off, 300, ReadOptions::default()).unwrap(),
        &a[off as usize..][..300]
    );
    assert!(verify(&m, &mut |_, _| {}).unwrap().is_clean());
}
