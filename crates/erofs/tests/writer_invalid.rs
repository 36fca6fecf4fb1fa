//! Tree descriptions the writer must refuse with a clear error (no root needed).

use spinfs_erofs::{
    Chunk, DeviceSpec, Error, FileData, Metadata, Node, NodeKind, Source, Tree, WriteOptions,
    write_image,
};
use std::sync::Arc;

fn fifo() -> Node {
    Node {
        meta: Metadata::default(),
        kind: NodeKind::Fifo,
    }
}

fn dir() -> Node {
    Node {
        meta: Metadata::default(),
        kind: NodeKind::Dir(Vec::new()),
    }
}

fn file(size: u64, chunks: Option<Vec<Chunk>>, source: Option<Source>) -> Node {
    Node {
        meta: Metadata::default(),
        kind: NodeKind::File(FileData {
            size,
            chunk_bits: Some(12),
            chunks,
            source,
        }),
    }
}

fn refuse(tree: &Tree, opts: &WriteOptions, needle: &str) {
    let mut blob = Vec::new();
    match write_image(tree, opts, &mut Vec::new(), Some(&mut blob)) {
        Err(e @ (Error::Invalid(_) | Error::Io { .. })) => {
            assert!(e.to_string().contains(needle), "expected {needle:?} in {e}")
        }
        other => panic!("expected an error containing {needle:?}, got {other:?}"),
    }
}

fn with(f: impl FnOnce(&mut Tree)) -> Tree {
    let mut t = Tree::new(Metadata::default());
    f(&mut t);
    t
}

#[test]
fn bad_names() {
    let o = WriteOptions::default();
    for name in [&b""[..], b".", b"..", b"a/b", b"a\0b", &[b'x'; 256]] {
        refuse(
            &with(|t| {
                t.add(t.root(), name.to_vec(), fifo());
            }),
            &o,
            "invalid file name",
        );
    }
    refuse(
        &with(|t| {
            t.add(t.root(), "same", fifo());
            t.add(t.root(), "same", fifo());
        }),
        &o,
        "duplicate name",
    );
}

#[test]
fn bad_shapes() {
    let o = WriteOptions::default();
    refuse(
        &with(|t| {
            let d = t.add(t.root(), "d", dir());
            t.link(t.root(), "again", d);
        }),
        &o,
        "linked more than once",
    );
    refuse(
        &with(|t| {
            let d = t.add(t.root(), "d", dir());
            t.link(d, "loop", t.root());
        }),
        &o,
        "linked more than once",
    );
    refuse(&with(|t| t.link(t.root(), "ghost", 99)), &o, "missing node");
}

#[test]
fn bad_attributes() {
    let o = WriteOptions::default();
    let node = |meta: Metadata| Node {
        meta,
        kind: NodeKind::Fifo,
    };
    refuse(
        &with(|t| {
            t.add(
                t.root(),
                "x",
                node(Metadata {
                    mtime_nsec: 1_000_000_000,
                    ..Metadata::default()
                }),
            );
        }),
        &o,
        "nanoseconds",
    );
    refuse(
        &with(|t| {
            t.add(
                t.root(),
                "x",
                node(Metadata {
                    xattrs: vec![(b"system.foo".to_vec(), b"v".to_vec())],
                    ..Metadata::default()
                }),
            );
        }),
        &o,
        "namespace",
    );
    refuse(
        &with(|t| {
            t.add(
                t.root(),
                "x",
                node(Metadata {
                    xattrs: vec![(b"trusted.overlay.spinfs.ino".to_vec(), vec![0; 8])],
                    ..Metadata::default()
                }),
            );
        }),
        &o,
        "reserved",
    );
    refuse(
        &with(|t| {
            t.add(
                t.root(),
                "x",
                node(Metadata {
                    xattrs: vec![(b"user.v".to_vec(), vec![0; 70_000])],
                    ..Metadata::default()
                }),
            );
        }),
        &o,
        "too long",
    );
    for target in [Vec::new(), vec![b'a'; 4096], b"a\0b".to_vec()] {
        refuse(
            &with(|t| {
                t.add(
                    t.root(),
                    "l",
                    Node {
                        meta: Metadata::default(),
                        kind: NodeKind::Symlink(target),
                    },
                );
            }),
            &o,
            "symlink target",
        );
    }
    refuse(
        &with(|t| {
            t.add(
                t.root(),
                "c",
                Node {
                    meta: Metadata::default(),
                    kind: NodeKind::CharDev(spinfs_erofs::ondisk::make_dev(5000, 1)),
                },
            );
        }),
        &o,
        "does not fit",
    );
}

#[test]
fn bad_chunks() {
    let o = WriteOptions {
        devices: vec![DeviceSpec {
            tag: b"d".to_vec(),
            blocks: 4,
        }],
        ..WriteOptions::default()
    };
    refuse(
        &with(|t| {
            t.add(t.root(), "f", file(10_000, Some(vec![Chunk::Hole]), None));
        }),
        &o,
        "needs 3 chunk entries",
    );
    refuse(
        &with(|t| {
            t.add(t.root(), "f", file(100, None, None));
        }),
        &o,
        "no data source",
    );
    refuse(
        &with(|t| {
            t.add(
                t.root(),
                "f",
                file(
                    100,
                    Some(vec![Chunk::Existing {
                        device: 3,
                        block: 0,
                    }]),
                    None,
                ),
            );
        }),
        &o,
        "unknown device",
    );
    refuse(
        &with(|t| {
            t.add(
                t.root(),
                "f",
                file(
                    100,
                    Some(vec![Chunk::Existing {
                        device: 1,
                        block: 4,
                    }]),
                    None,
                ),
            );
        }),
        &o,
        "outside its 4 blocks",
    );
    let short: Arc<Vec<u8>> = Arc::new(vec![1; 10]);
    refuse(
        &with(|t| {
            t.add(t.root(), "f", file(100, None, Some(Source::Reader(short))));
        }),
        &o,
        "read file data",
    );
    refuse(
        &with(|t| {
            t.add(
                t.root(),
                "f",
                file(1, None, Some(Source::Path("/nonexistent/x".into()))),
            );
        }),
        &o,
        "open /nonexistent/x",
    );
    // New data without a blob sink.
    let t = with(|t| {
        t.add(
            t.root(),
            "f",
            file(100, None, Some(Source::Reader(Arc::new(vec![1u8; 100])))),
        );
    });
    assert!(write_image(&t, &o, &mut Vec::new(), None).is_err());
    // Bad options.
    let t = Tree::new(Metadata::default());
    for bits in [11u8, 31] {
        assert!(
            write_image(
                &t,
                &WriteOptions {
                    chunk_bits: bits,
                    ..WriteOptions::default()
                },
                &mut Vec::new(),
                None
            )
            .is_err()
        );
    }
    for size in [0u64, 1000, 2048, 4097, 1 << 31] {
        assert!(spinfs_erofs::chunk_bits_for_size(size).is_err(), "{size}");
    }
    assert_eq!(spinfs_erofs::chunk_bits_for_size(4 << 20).unwrap(), 22);
}
