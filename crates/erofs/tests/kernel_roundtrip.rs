//! Images written by our writer, checked against the kernel (file-backed erofs mount),
//! fsck.erofs and our own reader.

mod common;

use common::*;
use spinfs_erofs::{
    Blobs, Chunk, DeviceSpec, FileData, Image, Metadata, Node, NodeKind, Source, Tree,
    WriteOptions, write_image,
};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

fn roundtrip(chunk_bits: u8) {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    make_rich_tree(&src);
    let (meta, blob) = (t.path().join("meta"), t.path().join("blob"));
    let summary = build_dir(&src, &meta, &blob, chunk_bits);
    assert!(
        summary.hole_chunks > 0,
        "sparse and zero chunks become holes"
    );
    assert_eq!(
        fs::metadata(&blob).unwrap().len(),
        summary.blob_bytes,
        "blob size matches the device table"
    );
    let want = snapshot(&src, SnapOpts::default());
    let blobs = vec![blob.clone()];

    let mnt = mount_erofs(&meta, &blobs, &t.path().join("mnt"));
    assert_same(
        "kernel mount vs source",
        &want,
        &snapshot(&mnt.path, SnapOpts::default()),
    );
    drop(mnt);

    assert_same(
        "our reader vs source",
        &want,
        &reader_snapshot(&meta, &blobs, SnapOpts::default()),
    );

    // fsck.erofs 1.5 checks the image; its --extract mishandles NULL_ADDR hole chunks (it
    // does not advance the output over them), so compare extracted content only for files
    // without holes. The kernel comparison above covers the sparse files.
    let ext = t.path().join("extract");
    fsck(&meta, &blobs, Some(&ext));
    let got = snapshot(
        &ext,
        SnapOpts {
            nlink: false,
            dir_nlink: false,
            content: true,
            ..SnapOpts::default()
        },
    );
    for name in [
        "/small",
        "/exact_block",
        "/dir/multi_chunk",
        "/linked",
        "/dir/link2",
    ] {
        assert_eq!(
            got[name].content, want[name].content,
            "fsck --extract content of {name}"
        );
        assert_eq!(got[name].size, want[name].size);
    }
    assert_eq!(got["/sym"].target, b"small");
}

#[test]
fn rich_tree_4m_chunks_matches_kernel() {
    roundtrip(22);
}

#[test]
fn rich_tree_4k_chunks_matches_kernel() {
    roundtrip(12);
}

#[test]
fn rich_tree_1m_chunks_matches_kernel() {
    roundtrip(20);
}

#[test]
fn file_larger_than_4gib() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    let size = 5 * (1u64 << 30) + 12345;
    let f = File::create(src.join("huge")).unwrap();
    let marks = [
        0u64,
        (4u64 << 30) - 3,
        (4u64 << 30) + 4 * 1024 * 1024 + 77,
        size - 100,
    ];
    for (i, &m) in marks.iter().enumerate() {
        f.write_all_at(&pattern(100, i as u64), m).unwrap();
    }
    f.set_len(size).unwrap();
    drop(f);
    let (meta, blob) = (t.path().join("meta"), t.path().join("blob"));
    let s = build_dir(&src, &meta, &blob, 22);
    assert!(
        s.blob_bytes < 32 << 20,
        "holes are not stored: {} bytes",
        s.blob_bytes
    );
    let blobs = vec![blob.clone()];
    let mnt = mount_erofs(&meta, &blobs, &t.path().join("mnt"));
    let g = File::open(mnt.path.join("huge")).unwrap();
    assert_eq!(g.metadata().unwrap().len(), size);
    let img = Image::open(File::open(&meta).unwrap()).unwrap();
    let ino = img.resolve(b"/huge").unwrap();
    let devs = Blobs(vec![File::open(&blob).unwrap()]);
    for (i, &m) in marks.iter().enumerate() {
        let mut k = vec![0u8; 100];
        g.read_exact_at(&mut k, m).unwrap();
        assert_eq!(k, pattern(100, i as u64), "kernel read at {m}");
        let mut r = vec![0u8; 100];
        assert_eq!(img.read_data(&ino, m, &mut r, &devs).unwrap(), 100);
        assert_eq!(r, k, "reader at {m}");
    }
    let mut k = vec![1u8; 4096];
    g.read_exact_at(&mut k, 2 << 30).unwrap();
    assert!(k.iter().all(|&b| b == 0), "hole reads as zeros");
    drop(mnt);
    fsck(&meta, &blobs, None);
}

/// The in-memory description the store uses: data from a reader, chunks that already live
/// on an existing device, holes, persistent 64-bit inode numbers.
#[test]
fn in_memory_tree_with_existing_chunks_and_inos() {
    let t = tempfile::tempdir().unwrap();
    let cs = 1u64 << 16;
    // An "old" blob written earlier: 3 chunks of distinct data.
    let old_blob = t.path().join("old_blob");
    let old: Vec<u8> = (0..3).flat_map(|i| pattern(cs as usize, 100 + i)).collect();
    fs::write(&old_blob, &old).unwrap();
    let new_data = Arc::new(pattern(2 * cs as usize, 7));

    let meta_of = |ino: u64, mtime: i64| Metadata {
        ino,
        perm: 0o640,
        uid: 10,
        gid: 20,
        mtime,
        mtime_nsec: 999_999_999,
        xattrs: vec![(b"user.k".to_vec(), b"v".to_vec())],
    };
    let mut tree = Tree::new(Metadata {
        perm: 0o755,
        ino: 1 << 40,
        ..Metadata::default()
    });
    let d = tree.add(
        tree.root(),
        "d",
        Node {
            meta: meta_of(0xFFFF_FFFF_0000_0001, 5),
            kind: NodeKind::Dir(vec![]),
        },
    );
    // Chunks: old chunk 2, new, hole, old chunk 0, new (short tail).
    let size = 4 * cs + 1000;
    let stacked = tree.add(
        d,
        "stacked",
        Node {
            meta: meta_of(u64::MAX - 1, 6),
            kind: NodeKind::File(FileData {
                size,
                chunk_bits: Some(16),
                chunks: Some(vec![
                    Chunk::Existing {
                        device: 1,
                        block: 2 * cs / 4096,
                    },
                    Chunk::New,
                    Chunk::Hole,
                    Chunk::Existing {
                        device: 1,
                        block: 0,
                    },
                    Chunk::New,
                ]),
                source: Some(Source::Reader(
                    new_data.clone() as Arc<dyn spinfs_erofs::ReadAt>
                )),
            }),
        },
    );
    tree.link(tree.root(), "hardlink", stacked);
    // user.* xattrs are hidden by the VFS on special files: give the whiteout a trusted one.
    let mut wh_meta = meta_of(77, 7);
    wh_meta.xattrs = vec![(b"trusted.k".to_vec(), b"w".to_vec())];
    tree.add(
        tree.root(),
        "wh",
        Node {
            meta: wh_meta,
            kind: NodeKind::CharDev(0),
        },
    );

    let opts = WriteOptions {
        chunk_bits: 16,
        devices: vec![DeviceSpec {
            tag: b"old".to_vec(),
            blocks: 3 * cs / 4096,
        }],
        ..WriteOptions::default()
    };
    let (meta, new_blob) = (t.path().join("meta"), t.path().join("new_blob"));
    // New chunks are read from the source at their own file offsets: a short source fails
    // cleanly.
    let err = write_image(&tree, &opts, &mut Vec::new(), Some(&mut Vec::new())).unwrap_err();
    assert!(err.to_string().contains("read file data"), "{err}");

    // The source must cover every New chunk's own file offsets: rebuild with a full-size
    // source and check everything end to end.
    let full = Arc::new(pattern(size as usize, 9));
    if let NodeKind::File(f) = &mut tree.node_mut(stacked).kind {
        f.source = Some(Source::Reader(full.clone() as Arc<dyn spinfs_erofs::ReadAt>));
    }
    let mut sink = Vec::new();
    let s = write_image(
        &tree,
        &opts,
        &mut File::create(&meta).unwrap(),
        Some(&mut sink),
    )
    .unwrap();
    fs::write(&new_blob, &sink).unwrap();
    assert_eq!(s.new_blob_device, Some(2));
    assert_eq!(s.devices.len(), 2);
    assert_eq!(s.data_chunks, 2);
    assert_eq!(
        s.blob_bytes,
        cs + 4096,
        "the short tail chunk is padded to one block"
    );
    let mut expect = vec![0u8; size as usize];
    let c = cs as usize;
    expect[..c].copy_from_slice(&old[2 * c..]);
    expect[c..2 * c].copy_from_slice(&full[c..2 * c]);
    expect[3 * c..4 * c].copy_from_slice(&old[..c]);
    expect[4 * c..].copy_from_slice(&full[4 * c..]);

    let blobs: Vec<PathBuf> = vec![old_blob.clone(), new_blob.clone()];
    let mnt = mount_erofs(&meta, &blobs, &t.path().join("mnt"));
    assert_eq!(fs::read(mnt.path.join("d/stacked")).unwrap(), expect);
    let snap = snapshot(&mnt.path, SnapOpts::default());
    assert_eq!(snap["/d/stacked"].nlink, 2);
    assert_eq!(snap["/hardlink"].link_of.as_deref(), Some("/d/stacked"));
    assert_eq!(snap["/d/stacked"].mtime, (6, 999_999_999));
    assert_eq!(snap["/wh"].kind, 'c');
    // The kernel shows the ino xattr (trusted.* is visible to root); our reader hides it.
    assert_eq!(
        snap["/d/stacked"]
            .xattrs
            .get(&b"trusted.overlay.spinfs.ino"[..])
            .map(|v| v.as_slice()),
        Some(&(u64::MAX - 1).to_le_bytes()[..])
    );
    drop(mnt);

    let img = Image::open(File::open(&meta).unwrap()).unwrap();
    let ino = img.resolve(b"d/stacked").unwrap();
    assert_eq!(img.spinfs_ino(&ino).unwrap(), Some(u64::MAX - 1));
    assert_eq!(
        img.xattrs(&ino).unwrap(),
        vec![(b"user.k".to_vec(), b"v".to_vec())]
    );
    assert_eq!(img.spinfs_ino(&img.root().unwrap()).unwrap(), Some(1 << 40));
    assert_eq!(
        img.spinfs_ino(&img.resolve(b"d").unwrap()).unwrap(),
        Some(0xFFFF_FFFF_0000_0001)
    );
    let devs = Blobs(vec![
        File::open(&old_blob).unwrap(),
        File::open(&new_blob).unwrap(),
    ]);
    let mut got = vec![0u8; size as usize];
    img.read_data(&ino, 0, &mut got, &devs).unwrap();
    assert_eq!(got, expect);
    let ext = img.map(&ino, 0, size).unwrap();
    assert_eq!(ext[0].location, Some((1, 2 * cs)));
    assert_eq!(ext[1].location, Some((2, 0)));
    assert_eq!(ext[2].location, None);
    assert_eq!(ext[3].location, Some((1, 0)));
    fsck(&meta, &blobs, None);
}

/// Layout corner cases only an in-memory tree can produce (ext4 caps xattrs at one block):
/// inline xattrs spanning several blocks, a symlink and a directory pushed out of inline
/// layout by their xattrs, 30 devices (the device table spills past block 0).
#[test]
fn layout_corner_cases() {
    let t = tempfile::tempdir().unwrap();
    let big_xattrs: Vec<(Vec<u8>, Vec<u8>)> = (0..4u8)
        .map(|i| (format!("user.x{i}").into_bytes(), vec![b'a' + i; 3000]))
        .collect();
    let m = |xattrs: Vec<(Vec<u8>, Vec<u8>)>| Metadata {
        perm: 0o755,
        mtime: 1,
        mtime_nsec: 2,
        xattrs,
        ..Metadata::default()
    };
    let mut tree = Tree::new(m(vec![]));
    let blob_data = Arc::new(pattern(8192, 1));
    tree.add(
        tree.root(),
        "bigx",
        Node {
            meta: m(big_xattrs.clone()),
            kind: NodeKind::File(FileData {
                size: 8192,
                chunk_bits: None,
                chunks: None,
                source: Some(Source::Reader(
                    blob_data.clone() as Arc<dyn spinfs_erofs::ReadAt>
                )),
            }),
        },
    );
    let long = vec![b'y'; 4000];
    tree.add(
        tree.root(),
        "longsym",
        Node {
            meta: m(vec![(b"trusted.t".to_vec(), vec![b't'; 500])]),
            kind: NodeKind::Symlink(long.clone()),
        },
    );
    let d = tree.add(
        tree.root(),
        "d",
        Node {
            meta: m(vec![(b"user.big".to_vec(), vec![b'q'; 3900])]),
            kind: NodeKind::Dir(vec![]),
        },
    );
    tree.add(
        d,
        "x",
        Node {
            meta: m(vec![]),
            kind: NodeKind::Fifo,
        },
    );
    // 30 existing one-block devices, each holding one chunk of a file.
    let mut devices = Vec::new();
    let mut blobs = Vec::new();
    for i in 0..30u16 {
        let p = t.path().join(format!("dev{i:02}"));
        fs::write(&p, pattern(4096, 1000 + i as u64)).unwrap();
        blobs.push(p);
        devices.push(DeviceSpec {
            tag: format!("dev{i}").into_bytes(),
            blocks: 1,
        });
        tree.add(
            d,
            format!("f{i:02}"),
            Node {
                meta: m(vec![]),
                kind: NodeKind::File(FileData {
                    size: 4000,
                    chunk_bits: Some(12),
                    chunks: Some(vec![Chunk::Existing {
                        device: i + 1,
                        block: 0,
                    }]),
                    source: None,
                }),
            },
        );
    }
    let opts = WriteOptions {
        devices,
        ..WriteOptions::default()
    };
    let meta = t.path().join("meta");
    let new_blob = t.path().join("new_blob");
    let mut sink = File::create(&new_blob).unwrap();
    let s = write_image(
        &tree,
        &opts,
        &mut File::create(&meta).unwrap(),
        Some(&mut sink),
    )
    .unwrap();
    assert_eq!(s.new_blob_device, Some(31));
    blobs.push(new_blob);
    let img = Image::open(File::open(&meta).unwrap()).unwrap();
    assert!(
        img.root_nid() * 32 > 4096,
        "root inode lies after a device table longer than a block"
    );
    assert_eq!(img.devices().len(), 31);
    drop(img);

    let mnt = mount_erofs(&meta, &blobs, &t.path().join("mnt"));
    let snap = snapshot(&mnt.path, SnapOpts::default());
    for (k, v) in &big_xattrs {
        assert_eq!(snap["/bigx"].xattrs.get(k), Some(v));
    }
    assert_eq!(fs::read(mnt.path.join("bigx")).unwrap(), *blob_data);
    assert_eq!(snap["/longsym"].target, long);
    assert_eq!(snap["/longsym"].xattrs[&b"trusted.t"[..]], vec![b't'; 500]);
    assert_eq!(snap["/d"].xattrs[&b"user.big"[..]], vec![b'q'; 3900]);
    assert_eq!(snap["/d/x"].kind, 'p');
    for i in 0..30u64 {
        let got = fs::read(mnt.path.join(format!("d/f{i:02}"))).unwrap();
        assert_eq!(got, pattern(4096, 1000 + i)[..4000]);
    }
    let via_reader = reader_snapshot(&meta, &blobs, SnapOpts::default());
    assert_same("reader vs kernel", &snap, &via_reader);
    drop(mnt);
    fsck(&meta, &blobs, None);
}

/// fsck.erofs 1.5 reads 12 bytes after every inode (an xattr header, even when there are no
/// xattrs); an image whose last inode ends exactly at the end of the image used to fail it.
/// Sweep the number of entries so the inode area ends on every 32-byte position of a block.
#[test]
fn last_inode_at_a_block_boundary_passes_fsck() {
    let t = tempfile::tempdir().unwrap();
    let mut hit_boundary = false;
    for n in 0..140 {
        let mut tree = Tree::new(Metadata::default());
        for i in 0..n {
            tree.add(
                tree.root(),
                format!("f{i:03}"),
                Node {
                    meta: Metadata::default(),
                    kind: NodeKind::Fifo,
                },
            );
        }
        let meta = t.path().join(format!("meta{n}"));
        let s = write_image(
            &tree,
            &WriteOptions::default(),
            &mut File::create(&meta).unwrap(),
            None,
        )
        .unwrap();
        let img = Image::open(File::open(&meta).unwrap()).unwrap();
        let root = img.root().unwrap();
        let (entries, _) = img.dir_entries(&root).unwrap();
        let last_end = entries.iter().map(|e| e.nid * 32 + 64).max().unwrap_or(0);
        hit_boundary |= last_end % 4096 == 0;
        assert!(s.meta_bytes >= last_end + 12, "slack after the last inode");
        fsck(&meta, &[], None);
    }
    assert!(hit_boundary, "the sweep reaches a block boundary");
}

/// Mount data for the kernel: no device options at all.
fn mount_flat(image: &std::path::Path, target: &std::path::Path) -> Mount {
    fs::create_dir_all(target).unwrap();
    let c = |p: &std::path::Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let (s, t) = (c(image), c(target));
    // SAFETY: valid NUL-terminated strings; empty mount data.
    let r = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            c"erofs".as_ptr(),
            libc::MS_RDONLY,
            c"".as_ptr().cast(),
        )
    };
    assert_eq!(
        r,
        0,
        "mount {}: {}",
        image.display(),
        std::io::Error::last_os_error()
    );
    Mount {
        path: target.to_path_buf(),
    }
}

/// Device slots carry unified addresses as if the blobs followed the meta image, so
/// `cat META BLOB... > one.img` mounts without `device=`, also for merged images; a meta
/// image mounted alone without its blobs fails reads with EIO instead of returning garbage.
#[test]
fn concatenated_image_mounts_without_device_options() {
    let t = tempfile::tempdir().unwrap();
    let mut metas = Vec::new();
    let mut blobs = Vec::new();
    for layer in 0..2 {
        let src = t.path().join(format!("src{layer}"));
        fs::create_dir_all(src.join("d")).unwrap();
        fs::write(src.join(format!("d/f{layer}")), pattern(5 << 20, layer)).unwrap();
        fs::write(src.join("common"), pattern(70_000, 10 + layer)).unwrap();
        let (m, b) = (
            t.path().join(format!("meta{layer}")),
            t.path().join(format!("blob{layer}")),
        );
        build_dir(&src, &m, &b, 20);
        metas.push(m);
        blobs.push(b);
    }
    let concat = |parts: &[&PathBuf], out: &PathBuf| {
        let mut all = Vec::new();
        for p in parts {
            all.extend(fs::read(p).unwrap());
        }
        fs::write(out, all).unwrap();
    };
    let one = t.path().join("one.img");
    concat(&[&metas[0], &blobs[0]], &one);
    let m = mount_flat(&one, &t.path().join("mnt_one"));
    assert_same(
        "concatenated image vs source",
        &snapshot(&t.path().join("src0"), SnapOpts::default()),
        &snapshot(&m.path, SnapOpts::default()),
    );
    drop(m);

    let alone = mount_flat(&metas[0], &t.path().join("mnt_alone"));
    let err = fs::read(alone.path.join("d/f0")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    drop(alone);

    let images: Vec<_> = metas
        .iter()
        .map(|m| Image::open(File::open(m).unwrap()).unwrap())
        .collect();
    let merged = t.path().join("merged");
    spinfs_erofs::merge_images(
        &images,
        spinfs_erofs::MergeMode::StripOverlay,
        &WriteOptions::default(),
        &mut File::create(&merged).unwrap(),
    )
    .unwrap();
    let with_devices = mount_erofs(&merged, &blobs, &t.path().join("mnt_merged"));
    let want = snapshot(&with_devices.path, SnapOpts::default());
    drop(with_devices);
    let one = t.path().join("merged_one.img");
    concat(&[&merged, &blobs[0], &blobs[1]], &one);
    let m = mount_flat(&one, &t.path().join("mnt_merged_one"));
    assert_same(
        "concatenated merged image",
        &want,
        &snapshot(&m.path, SnapOpts::default()),
    );
    assert_eq!(fs::read(m.path.join("d/f1")).unwrap(), pattern(5 << 20, 1));
}

/// Identical chunks are stored once (BLAKE3 within the image) and every file still reads
/// back right through the kernel and fsck.erofs.
#[test]
fn duplicate_chunks_are_stored_once() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("copies")).unwrap();
    let a = pattern(9 << 20, 77);
    fs::write(src.join("a"), &a).unwrap();
    fs::write(src.join("copies/a1"), &a).unwrap();
    fs::write(src.join("copies/a2"), &a).unwrap();
    let mut b = a[..4 << 20].to_vec(); // first chunk shared, rest different
    b.extend(pattern(3 << 20, 78));
    fs::write(src.join("b"), &b).unwrap();
    fs::write(src.join("tail_only"), &a[8 << 20..]).unwrap(); // same bytes as a's tail chunk

    let tree = spinfs_erofs::fromdir::tree_from_dir(&src).unwrap();
    let (meta, blob) = (t.path().join("meta"), t.path().join("blob"));
    let s = write_image(
        &tree,
        &WriteOptions::default(),
        &mut File::create(&meta).unwrap(),
        Some(&mut File::create(&blob).unwrap()),
    )
    .unwrap();
    // a: 3 chunks (4M, 4M, 1M); b: its first chunk is a's, then 3M new; tail_only = a's tail.
    assert_eq!(s.data_chunks, 4, "{s:?}");
    assert_eq!(s.dedup_chunks, 3 + 3 + 1 + 1, "{s:?}");
    assert_eq!(s.blob_bytes, (9 << 20) + (3 << 20));
    let no_dedup = write_image(
        &tree,
        &WriteOptions {
            dedup_chunks: false,
            ..WriteOptions::default()
        },
        &mut Vec::new(),
        Some(&mut spinfs_erofs::WriteSink(std::io::sink())),
    )
    .unwrap();
    assert_eq!(no_dedup.dedup_chunks, 0);
    assert_eq!(no_dedup.blob_bytes, (9 << 20) * 3 + (7 << 20) + (1 << 20));

    let blobs = vec![blob];
    let want = snapshot(&src, SnapOpts::default());
    let m = mount_erofs(&meta, &blobs, &t.path().join("mnt"));
    assert_same(
        "deduplicated image vs source",
        &want,
        &snapshot(&m.path, SnapOpts::default()),
    );
    drop(m);
    let ext = t.path().join("extract");
    fsck(&meta, &blobs, Some(&ext));
    assert_same(
        "fsck.erofs --extract of a deduplicated image",
        &snapshot(
            &src,
            SnapOpts {
                nlink: false,
                dir_nlink: false,
                ..SnapOpts::default()
            },
        ),
        &snapshot(
            &ext,
            SnapOpts {
                nlink: false,
                dir_nlink: false,
                ..SnapOpts::default()
            },
        ),
    );
}
