//! Image benchmarks, each printed as `name value` against a baseline measured in the same run.
//!
//! - `image_build_vs_mkfs_erofs <ratio>`: time of `mkfs.erofs --blobdev=B --chunksize=4194304`
//!   divided by ours, on one generated tree (2000 files, 1 GiB, mixed sizes, sparse files),
//!   both with a warm page cache. Goal: >= 2.
//! - `merge_4x250k_seconds <s>`: merging 4 meta images of 250k inodes each.
//!
//! Run: `cargo bench -p spinfs-erofs --bench image_bench` (needs erofs-utils; set
//! `SPINFS_BENCH_DIR` to choose where the ~2.2 GiB of scratch data goes, default the system
//! temp dir). `SPINFS_BENCH_ONLY=build|merge` runs one part.

use spinfs_erofs::{
    Chunk, DeviceSpec, FileData, Image, MergeMode, Metadata, Node, NodeKind, Tree, WriteOptions,
    merge_images, write_image,
};
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// 2000 files, 1 GiB of data: many small files, medium ones, a few large, and sparse files
/// whose apparent size exceeds their data.
fn generate_tree(root: &Path) -> u64 {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut sizes = Vec::new();
    for _ in 0..1400 {
        sizes.push(1 + rng.next() % (64 << 10));
    }
    for _ in 0..520 {
        sizes.push((256 << 10) + rng.next() % (2 << 20));
    }
    for _ in 0..60 {
        sizes.push((4 << 20) + rng.next() % (8 << 20));
    }
    let dense: u64 = sizes.iter().sum();
    // Scale the non-sparse part so that total data (including 20 sparse files with 8 MiB of
    // data each) is 1 GiB.
    let target = (1u64 << 30) - 20 * (8 << 20);
    let sizes: Vec<u64> = sizes.iter().map(|s| (s * target / dense).max(1)).collect();
    let mut buf = vec![0u8; 16 << 20];
    let mut total = 0;
    for (i, size) in sizes.iter().enumerate() {
        let dir = root.join(format!("d{:02}", i % 40));
        fs::create_dir_all(&dir).unwrap();
        let f = File::create(dir.join(format!("f{i:04}"))).unwrap();
        let mut off = 0;
        while off < *size {
            let n = (*size - off).min(buf.len() as u64) as usize;
            rng.fill(&mut buf[..n]);
            f.write_all_at(&buf[..n], off).unwrap();
            off += n as u64;
        }
        total += size;
    }
    for i in 0..20 {
        let f = File::create(root.join(format!("sparse{i:02}"))).unwrap();
        // 8 MiB of data spread over 64 MiB: two 4 MiB extents, one unaligned.
        rng.fill(&mut buf[..4 << 20]);
        f.write_all_at(&buf[..4 << 20], 0).unwrap();
        rng.fill(&mut buf[..4 << 20]);
        f.write_all_at(&buf[..4 << 20], (40 << 20) + 12345).unwrap();
        f.set_len(64 << 20).unwrap();
        total += 8 << 20;
    }
    total
}

fn warm(root: &Path) {
    let mut buf = vec![0u8; 1 << 20];
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let mut f = File::open(&p).unwrap();
                while f.read(&mut buf).unwrap() > 0 {}
            }
        }
    }
}

fn ours(src: &Path, out: &Path) -> Duration {
    let start = Instant::now();
    let tree = spinfs_erofs::fromdir::tree_from_dir(src).unwrap();
    let mut meta = File::create(out.join("ours.meta")).unwrap();
    let mut blob = File::create(out.join("ours.blob")).unwrap();
    let opts = WriteOptions {
        chunk_bits: 22,
        ..WriteOptions::default()
    };
    write_image(&tree, &opts, &mut meta, Some(&mut blob)).unwrap();
    start.elapsed()
}

fn mkfs(src: &Path, out: &Path) -> Duration {
    let blob = out.join("mkfs.blob");
    let meta = out.join("mkfs.meta");
    let _ = fs::remove_file(&blob);
    let _ = fs::remove_file(&meta);
    let start = Instant::now();
    let o = Command::new("mkfs.erofs")
        .arg(format!("--blobdev={}", blob.display()))
        .arg("--chunksize=4194304")
        .arg(&meta)
        .arg(src)
        .output()
        .expect("mkfs.erofs must be installed");
    let t = start.elapsed();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    t
}

fn bench_build(dir: &Path) {
    let src = dir.join("tree");
    let total = generate_tree(&src);
    warm(&src);
    // Alternate and keep the best of two runs each, so neither side pays for a cold cache.
    let mut best_ours = Duration::MAX;
    let mut best_mkfs = Duration::MAX;
    for _ in 0..2 {
        best_ours = best_ours.min(ours(&src, dir));
        best_mkfs = best_mkfs.min(mkfs(&src, dir));
    }
    let our_blob = fs::metadata(dir.join("ours.blob")).unwrap().len();
    let mkfs_blob = fs::metadata(dir.join("mkfs.blob")).unwrap().len();
    eprintln!(
        "tree: 2020 files, {} MiB of data; ours {:.2}s (blob {} MiB), mkfs.erofs {:.2}s (blob {} MiB)",
        total >> 20,
        best_ours.as_secs_f64(),
        our_blob >> 20,
        best_mkfs.as_secs_f64(),
        mkfs_blob >> 20
    );
    println!(
        "image_build_vs_mkfs_erofs {:.2}",
        best_mkfs.as_secs_f64() / best_ours.as_secs_f64()
    );
    fs::remove_dir_all(&src).unwrap();
    for f in ["ours.meta", "ours.blob", "mkfs.meta", "mkfs.blob"] {
        let _ = fs::remove_file(dir.join(f));
    }
}

/// A layer of 250k inodes: 500 directories of 499 one-chunk files. Layers share directory
/// names so the merge has real overlay work (merged directories, overridden files, whiteouts,
/// an opaque directory).
fn layer_tree(layer: u64) -> Tree {
    let meta = |ino: u64| Metadata {
        ino,
        perm: 0o644,
        uid: 1000,
        gid: 1000,
        mtime: 1_700_000_000 + ino as i64,
        mtime_nsec: 1,
        xattrs: Vec::new(),
    };
    let mut t = Tree::new(meta(1));
    let mut ino = layer << 40;
    for d in 0..500u64 {
        ino += 1;
        let mut dm = meta(ino);
        dm.perm = 0o755;
        if d % 97 == (layer * 13) % 97 {
            dm.xattrs
                .push((b"trusted.overlay.opaque".to_vec(), b"y".to_vec()));
        }
        let dir = t.add(
            t.root(),
            format!("dir{:03}", (d + layer * 50) % 600),
            Node {
                meta: dm,
                kind: NodeKind::Dir(Vec::new()),
            },
        );
        for f in 0..499u64 {
            ino += 1;
            let name = format!("file-{:05}", f * 4 + layer);
            let kind = if f % 50 == 7 {
                NodeKind::CharDev(0)
            } else {
                NodeKind::File(FileData {
                    size: 100_000 + f,
                    chunk_bits: None,
                    chunks: Some(vec![Chunk::Existing {
                        device: 1,
                        block: d * 499 + f,
                    }]),
                    source: None,
                })
            };
            t.add(
                dir,
                name,
                Node {
                    meta: meta(ino),
                    kind,
                },
            );
        }
    }
    t
}

fn bench_merge(dir: &Path) {
    let mut metas = Vec::new();
    for layer in 0..4u64 {
        let t = layer_tree(layer);
        let p = dir.join(format!("layer{layer}.meta"));
        let opts = WriteOptions {
            devices: vec![DeviceSpec {
                tag: format!("blob{layer}").into_bytes(),
                blocks: 500 * 499 * 25,
            }],
            ..WriteOptions::default()
        };
        let s = write_image(&t, &opts, &mut File::create(&p).unwrap(), None).unwrap();
        assert_eq!(s.inodes, 1 + 500 * 500);
        metas.push(p);
    }
    let start = Instant::now();
    let images: Vec<_> = metas
        .iter()
        .map(|m| Image::open(File::open(m).unwrap()).unwrap())
        .collect();
    let out = dir.join("merged.meta");
    let s = merge_images(
        &images,
        MergeMode::KeepOverlay,
        &WriteOptions::default(),
        &mut File::create(&out).unwrap(),
    )
    .unwrap();
    let secs = start.elapsed().as_secs_f64();
    if std::env::var_os("SPINFS_BENCH_DETAIL").is_some() {
        let t0 = Instant::now();
        let (tree, _) = spinfs_erofs::merge::merge_tree(&images, MergeMode::KeepOverlay).unwrap();
        eprintln!("  merge_tree {:.2}s", t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        let opts = WriteOptions {
            devices: s
                .devices
                .iter()
                .map(|d| DeviceSpec {
                    tag: d.tag.clone(),
                    blocks: d.blocks,
                })
                .collect(),
            ..WriteOptions::default()
        };
        write_image(&tree, &opts, &mut std::io::sink(), None).unwrap();
        eprintln!("  write_image {:.2}s", t0.elapsed().as_secs_f64());
    }
    eprintln!(
        "merged {} inodes into {} MiB of meta",
        s.write.inodes,
        s.write.meta_bytes >> 20
    );
    println!("merge_4x250k_seconds {secs:.2}");
    for m in metas {
        fs::remove_file(m).unwrap();
    }
    fs::remove_file(out).unwrap();
}

fn main() {
    let base = std::env::var_os("SPINFS_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(base).unwrap();
    let only = std::env::var("SPINFS_BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "build" {
        bench_build(dir.path());
    }
    if only.is_empty() || only == "merge" {
        bench_merge(dir.path());
    }
}
