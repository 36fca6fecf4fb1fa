//! Property tests against the kernel: random trees are written and compared with the kernel's
//! view of the image; random layer stacks are merged and compared with kernel overlayfs.

mod common;

use common::*;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

/// Cases per property: 64 by default, `SPINFS_PROPTEST_CASES` for longer runs.
fn cases() -> u32 {
    std::env::var("SPINFS_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

#[derive(Debug, Clone)]
enum Kind {
    File { len: usize, hole_at: Option<usize> },
    Dir,
    Symlink(String),
    Fifo,
    Chr(u32, u32),
    HardLinkToPrev,
}

#[derive(Debug, Clone)]
struct Spec {
    parent: usize,
    name: String,
    kind: Kind,
    perm: u32,
    mtime: (i64, i64),
    xattr: Option<(String, Vec<u8>)>,
}

fn name_strategy() -> impl Strategy<Value = String> {
    prop::string::string_regex("[a-zA-Z0-9._-]{1,12}|[!-]x|\\.[a-z]{1,3}")
        .unwrap()
        .prop_filter("not . or ..", |n| n != "." && n != "..")
}

fn kind_strategy() -> impl Strategy<Value = Kind> {
    prop_oneof![
        4 => (0usize..200_000, prop::option::of(0usize..150_000))
            .prop_map(|(len, hole_at)| Kind::File { len, hole_at }),
        3 => Just(Kind::Dir),
        1 => "[a-z/.]{1,300}".prop_map(Kind::Symlink),
        1 => Just(Kind::Fifo),
        1 => (0u32..300, 0u32..2000).prop_map(|(a, b)| Kind::Chr(a, b)),
        1 => Just(Kind::HardLinkToPrev),
    ]
}

fn spec_strategy() -> impl Strategy<Value = Spec> {
    (
        0usize..64,
        name_strategy(),
        kind_strategy(),
        prop_oneof![
            Just(0o644u32),
            Just(0o755),
            Just(0o4711),
            Just(0o1777),
            Just(0o600)
        ],
        (0i64..2_000_000_000, 0i64..1_000_000_000),
        prop::option::of((
            prop_oneof![
                Just("user.a".to_string()),
                Just("trusted.b".to_string()),
                Just("security.c".to_string())
            ],
            prop::collection::vec(any::<u8>(), 0..200),
        )),
    )
        .prop_map(|(parent, name, kind, perm, mtime, xattr)| Spec {
            parent,
            name,
            kind,
            perm,
            mtime,
            xattr,
        })
}

/// Materialises specs under `root`; returns nothing (the tree on disk is the truth).
fn materialise(root: &Path, specs: &[Spec]) {
    fs::create_dir_all(root).unwrap();
    let mut dirs = vec![root.to_path_buf()];
    let mut last_file: Option<std::path::PathBuf> = None;
    let mut created = Vec::new();
    for s in specs {
        let parent = dirs[s.parent % dirs.len()].clone();
        let p = parent.join(&s.name);
        if fs::symlink_metadata(&p).is_ok() {
            continue;
        }
        match &s.kind {
            Kind::File { len, hole_at } => {
                let f = fs::File::create(&p).unwrap();
                let data = pattern(*len, *len as u64);
                match hole_at {
                    Some(h) if *h < *len => {
                        use std::os::unix::fs::FileExt;
                        f.write_all_at(&data[..*h], 0).unwrap();
                        let resume = (*h + 70_000).min(*len);
                        f.write_all_at(&data[resume..], resume as u64).unwrap();
                        f.set_len(*len as u64).unwrap();
                    }
                    _ => fs::write(&p, &data).unwrap(),
                }
                last_file = Some(p.clone());
            }
            Kind::Dir => {
                fs::create_dir(&p).unwrap();
                dirs.push(p.clone());
            }
            Kind::Symlink(t) => std::os::unix::fs::symlink(t, &p).unwrap(),
            Kind::Fifo => mknod(&p, libc::S_IFIFO | 0o644, 0, 0),
            Kind::Chr(a, b) => mknod(&p, libc::S_IFCHR | 0o644, *a, *b),
            Kind::HardLinkToPrev => match &last_file {
                Some(f) => fs::hard_link(f, &p).unwrap(),
                None => continue,
            },
        }
        if !matches!(s.kind, Kind::Symlink(_) | Kind::HardLinkToPrev) {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&p, fs::Permissions::from_mode(s.perm)).unwrap();
        }
        if let Some((k, v)) = &s.xattr {
            // user.* only exists on files and directories.
            let regular_or_dir = matches!(s.kind, Kind::File { .. } | Kind::Dir);
            if regular_or_dir || !k.starts_with("user.") {
                set_xattr(&p, k, v);
            }
        }
        created.push((p, s.mtime));
    }
    // Times last (creating children changes directory mtimes).
    for (p, (sec, ns)) in created {
        set_mtime(&p, sec, ns);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_match_the_kernel(
        specs in prop::collection::vec(spec_strategy(), 1..60),
        chunk_bits in prop_oneof![Just(12u8), Just(13), Just(16), Just(22)],
    ) {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        materialise(&src, &specs);
        let (meta, blob) = (t.path().join("meta"), t.path().join("blob"));
        build_dir(&src, &meta, &blob, chunk_bits);
        let want = snapshot(&src, SnapOpts::default());
        let blobs = vec![blob];
        let m = mount_erofs(&meta, &blobs, &t.path().join("mnt"));
        assert_same("kernel vs source", &want, &snapshot(&m.path, SnapOpts::default()));
        drop(m);
        assert_same("reader vs source", &want, &reader_snapshot(&meta, &blobs, SnapOpts::default()));
        fsck(&meta, &blobs, None);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases() / 2, failure_persistence: None, ..ProptestConfig::default() })]

    /// Our reader agrees with the kernel on random trees formatted by mkfs.erofs 1.5.
    #[test]
    fn reader_matches_kernel_on_random_mkfs_images(
        specs in prop::collection::vec(spec_strategy(), 1..60),
        chunk in prop_oneof![Just(None), Just(Some(4096u32)), Just(Some(4 << 20))],
    ) {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        materialise(&src, &specs);
        let (meta, blob) = (t.path().join("meta"), t.path().join("blob"));
        let mut cmd = std::process::Command::new("mkfs.erofs");
        let mut blobs = Vec::new();
        if let Some(c) = chunk {
            cmd.arg(format!("--chunksize={c}")).arg(format!("--blobdev={}", blob.display()));
            blobs.push(blob.clone());
        }
        let out = cmd.arg(&meta).arg(&src).output().unwrap();
        prop_assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let m = mount_erofs(&meta, &blobs, &t.path().join("mnt"));
        let kernel = snapshot(&m.path, SnapOpts::default());
        drop(m);
        assert_same("reader vs kernel (mkfs.erofs image)", &kernel, &reader_snapshot(&meta, &blobs, SnapOpts::default()));
    }
}

/// "." is the layer root: only an opaque marker is applied there (overlayfs ignores it).
const PATHS: [&str; 13] = [
    "a", "b", "c", "a/x", "a/y", "a/d", "a/d/p", "a/d/q", "b/x", "b/d", "b/d/p", "c/x", ".",
];

#[derive(Debug, Clone, Copy)]
enum LKind {
    File,
    Dir,
    Opaque,
    Whiteout,
    Symlink,
    Fifo,
}

fn layer_items(layer: usize, picks: &[(usize, LKind)]) -> Vec<Item> {
    let mut chosen: BTreeMap<&'static str, LKind> = BTreeMap::new();
    for &(i, k) in picks {
        chosen.insert(PATHS[i % PATHS.len()], k);
    }
    let nondir = |k: LKind| !matches!(k, LKind::Dir | LKind::Opaque);
    let mut items = Vec::new();
    for (&p, &k) in &chosen {
        // Skip entries below a non-directory of the same layer.
        let blocked = chosen
            .iter()
            .any(|(&q, &qk)| p.starts_with(&format!("{q}/")) && nondir(qk));
        if blocked || (p == "." && !matches!(k, LKind::Opaque)) {
            continue;
        }
        let content = format!("layer{layer}:{p}");
        items.push(match k {
            LKind::File => Item::File(p, content.into_bytes()),
            LKind::Dir => Item::Dir(p),
            LKind::Opaque => Item::Opaque(p),
            LKind::Whiteout => Item::Whiteout(p),
            LKind::Symlink => Item::Symlink(p, Box::leak(content.into_boxed_str())),
            LKind::Fifo => Item::Fifo(p),
        });
    }
    items
}

fn lkind() -> impl Strategy<Value = LKind> {
    prop_oneof![
        3 => Just(LKind::File),
        2 => Just(LKind::Dir),
        2 => Just(LKind::Opaque),
        3 => Just(LKind::Whiteout),
        1 => Just(LKind::Symlink),
        1 => Just(LKind::Fifo),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_layer_stacks_merge_like_overlayfs(
        layers in prop::collection::vec(prop::collection::vec((0usize..13, lkind()), 1..10), 2..5),
    ) {
        let items: Vec<Vec<Item>> = layers.iter().enumerate().map(|(i, p)| layer_items(i, p)).collect();
        let stack = Stack::build(&items);
        stack.check_all_merges();
    }
}

#[derive(Debug, Clone)]
enum PlanChunk {
    Hole,
    New,
    Old(u64),
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases() / 2, failure_persistence: None, ..ProptestConfig::default() })]

    /// The store's path: in-memory files whose chunks are holes, new data from a reader, or
    /// blocks of an existing blob (file stacking), read back through the kernel and our reader.
    #[test]
    fn in_memory_chunk_plans_match_the_kernel(
        chunk_bits in prop_oneof![Just(12u8), Just(13), Just(16)],
        files in prop::collection::vec(
            (0u64..6, 0u64..70_000, prop::collection::vec(
                prop_oneof![Just(PlanChunk::Hole), Just(PlanChunk::New), (0u64..1000).prop_map(PlanChunk::Old)],
                6,
            )),
            1..8,
        ),
    ) {
        use spinfs_erofs::{Chunk, DeviceSpec, FileData, Metadata, Node, NodeKind, Source, Tree, WriteOptions};
        use std::sync::Arc;
        let t = tempfile::tempdir().unwrap();
        let cs = 1u64 << chunk_bits;
        let old_blocks = 256u64;
        let old: Vec<u8> = pattern((old_blocks * 4096) as usize, 4242);
        let old_blob = t.path().join("old");
        fs::write(&old_blob, &old).unwrap();
        let mut tree = Tree::new(Metadata { perm: 0o755, ..Metadata::default() });
        let mut expected = Vec::new();
        for (i, (full_chunks, extra, plan)) in files.iter().enumerate() {
            let size = (full_chunks * cs + extra % cs).min(6 * cs);
            let n = size.div_ceil(cs) as usize;
            let source: Arc<Vec<u8>> = Arc::new(pattern(size as usize, i as u64 + 1));
            let mut chunks = Vec::new();
            let mut want = vec![0u8; size as usize];
            for (c, p) in plan.iter().take(n).enumerate() {
                let start = c as u64 * cs;
                let len = cs.min(size - start) as usize;
                let range = start as usize..start as usize + len;
                chunks.push(match p {
                    PlanChunk::Hole => Chunk::Hole,
                    PlanChunk::New => {
                        want[range.clone()].copy_from_slice(&source[range]);
                        Chunk::New
                    }
                    PlanChunk::Old(b) => {
                        let span = (cs / 4096).max(1);
                        let block = b % (old_blocks - span + 1);
                        let at = (block * 4096) as usize;
                        want[range].copy_from_slice(&old[at..at + len]);
                        Chunk::Existing { device: 1, block }
                    }
                });
            }
            tree.add(
                tree.root(),
                format!("f{i}"),
                Node {
                    meta: Metadata { perm: 0o644, ino: 100 + i as u64, ..Metadata::default() },
                    kind: NodeKind::File(FileData {
                        size,
                        chunk_bits: Some(chunk_bits),
                        chunks: Some(chunks),
                        source: Some(Source::Reader(source)),
                    }),
                },
            );
            expected.push(want);
        }
        let opts = WriteOptions {
            chunk_bits,
            devices: vec![DeviceSpec { tag: b"old".to_vec(), blocks: old_blocks }],
            ..WriteOptions::default()
        };
        let (meta, new_blob) = (t.path().join("meta"), t.path().join("new"));
        spinfs_erofs::write_image(
            &tree,
            &opts,
            &mut fs::File::create(&meta).unwrap(),
            Some(&mut fs::File::create(&new_blob).unwrap()),
        )
        .unwrap();
        let blobs = vec![old_blob, new_blob];
        let m = mount_erofs(&meta, &blobs, &t.path().join("mnt"));
        for (i, want) in expected.iter().enumerate() {
            let got = fs::read(m.path.join(format!("f{i}"))).unwrap();
            prop_assert!(&got == want, "kernel content of f{}", i);
        }
        drop(m);
        let img = spinfs_erofs::Image::open(fs::File::open(&meta).unwrap()).unwrap();
        let devs = spinfs_erofs::Blobs(blobs.iter().map(|b| fs::File::open(b).unwrap()).collect());
        for (i, want) in expected.iter().enumerate() {
            let ino = img.resolve(format!("f{i}").as_bytes()).unwrap();
            prop_assert_eq!(img.spinfs_ino(&ino).unwrap(), Some(100 + i as u64));
            let mut got = vec![0u8; want.len()];
            img.read_data(&ino, 0, &mut got, &devs).unwrap();
            prop_assert!(&got == want, "reader content of f{}", i);
        }
        fsck(&meta, &blobs, None);
    }
}
