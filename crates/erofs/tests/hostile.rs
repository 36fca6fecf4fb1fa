//! Corrupt and hostile images: every one must give an error (or a consistent answer), never
//! a panic, a hang or a huge allocation. Runs without root.

use spinfs_erofs::ondisk::{le16, put16, put32, put64, superblock_checksum};
use spinfs_erofs::{
    Chunk, Error, FileData, Image, Metadata, Node, NodeKind, Source, Tree, WriteOptions,
    write_image,
};
use std::sync::Arc;

fn meta(perm: u16) -> Metadata {
    Metadata {
        perm,
        mtime: 1_700_000_000,
        mtime_nsec: 42,
        ..Metadata::default()
    }
}

/// A small but varied image, held in memory with its blob.
fn sample() -> (Vec<u8>, Vec<u8>) {
    let mut t = Tree::new(meta(0o755));
    let d = t.add(
        t.root(),
        "adir",
        Node {
            meta: meta(0o755),
            kind: NodeKind::Dir(vec![]),
        },
    );
    let sub = t.add(
        d,
        "sub",
        Node {
            meta: meta(0o700),
            kind: NodeKind::Dir(vec![]),
        },
    );
    let data: Arc<Vec<u8>> = Arc::new((0..20_000u32).map(|i| (i * 7) as u8).collect());
    let f = t.add(
        d,
        "file",
        Node {
            meta: Metadata {
                xattrs: vec![(b"user.a".to_vec(), b"b".to_vec())],
                ..meta(0o644)
            },
            kind: NodeKind::File(FileData {
                size: 20_000,
                chunk_bits: Some(12),
                chunks: Some(vec![
                    Chunk::New,
                    Chunk::Hole,
                    Chunk::New,
                    Chunk::New,
                    Chunk::New,
                ]),
                source: Some(Source::Reader(data)),
            }),
        },
    );
    t.link(sub, "hardlink", f);
    t.add(
        t.root(),
        "link",
        Node {
            meta: meta(0o777),
            kind: NodeKind::Symlink(b"adir/file".to_vec()),
        },
    );
    t.add(
        t.root(),
        "wh",
        Node {
            meta: meta(0o644),
            kind: NodeKind::CharDev(0),
        },
    );
    for i in 0..150 {
        t.add(
            sub,
            format!("zz_entry_{i:03}"),
            Node {
                meta: meta(0o600),
                kind: NodeKind::Fifo,
            },
        );
    }
    let mut m = Vec::new();
    let mut b = Vec::new();
    write_image(
        &t,
        &WriteOptions {
            chunk_bits: 12,
            ..WriteOptions::default()
        },
        &mut m,
        Some(&mut b),
    )
    .unwrap();
    (m, b)
}

fn fix_checksum(img: &mut [u8]) {
    put32(img, 1028, 0);
    let c = superblock_checksum(&img[1024..4096]);
    put32(img, 1028, c);
}

/// Location of a directory's first data block in the meta image.
fn dir_data(img: &[u8], path: &[u8]) -> usize {
    let image = Image::open(img).unwrap();
    let ino = image.resolve(path).unwrap();
    let ext = image.map(&ino, 0, ino.size).unwrap();
    match ext[0].location {
        Some((0, off)) => off as usize,
        other => panic!("directory data at {other:?}"),
    }
}

/// Finds the dirent whose name is `name` in the directory block at `blk`; returns its offset.
fn find_dirent(img: &[u8], blk: usize, name: &[u8]) -> usize {
    let n = le16(img, blk + 8) as usize / 12;
    for i in 0..n {
        let off = le16(img, blk + i * 12 + 8) as usize;
        let end = if i + 1 < n {
            le16(img, blk + (i + 1) * 12 + 8) as usize
        } else {
            off + img[blk + off..].iter().take_while(|&&b| b != 0).count()
        };
        if &img[blk + off..blk + end] == name {
            return blk + i * 12;
        }
    }
    panic!("no dirent {:?}", String::from_utf8_lossy(name));
}

fn expect_corrupt(img: &[u8], what: &str) {
    let res = Image::open(img).and_then(|i| i.verify(None));
    match res {
        Err(Error::Corrupt(_)) => {}
        other => panic!("{what}: expected a corruption error, got {other:?}"),
    }
}

#[test]
fn sample_verifies() {
    let (m, b) = sample();
    let img = Image::open(&m[..]).unwrap();
    let devs = spinfs_erofs::Blobs(vec![b]);
    let s = img.verify(Some(&devs)).unwrap();
    assert_eq!(s.inodes, 156);
    assert_eq!(s.data_bytes, 20_000 - 4096, "the hole is not read");
}

#[test]
fn rejects_name_with_slash_or_nul() {
    let (mut m, _) = sample();
    let blk = dir_data(&m, b"/");
    let d = find_dirent(&m, blk, b"adir");
    let off = le16(&m, d + 8) as usize;
    m[blk + off + 1] = b'/';
    fix_checksum(&mut m);
    expect_corrupt(&m, "slash in name");

    let (mut m, _) = sample();
    let blk = dir_data(&m, b"/");
    let d = find_dirent(&m, blk, b"adir");
    let off = le16(&m, d + 8) as usize;
    m[blk + off + 1] = 0;
    fix_checksum(&mut m);
    expect_corrupt(&m, "NUL inside a name");
}

#[test]
fn rejects_misplaced_dot_entries() {
    // "." naming another directory.
    let (mut m, _) = sample();
    let blk = dir_data(&m, b"/adir/sub");
    let dot = find_dirent(&m, blk, b".");
    let root_nid = le16(&m, 1024 + 14) as u64;
    put64(&mut m, dot, root_nid);
    fix_checksum(&mut m);
    expect_corrupt(&m, "'.' naming the root");

    // ".." naming something other than the parent.
    let (mut m, _) = sample();
    let blk = dir_data(&m, b"/adir/sub");
    let d = find_dirent(&m, blk, b"..");
    let sub_nid = Image::open(&m[..])
        .unwrap()
        .resolve(b"/adir/sub")
        .unwrap()
        .nid;
    put64(&mut m, d, sub_nid);
    fix_checksum(&mut m);
    expect_corrupt(&m, "'..' naming itself");
}

#[test]
fn rejects_directory_cycles() {
    // adir/sub's first real entry redirected to adir: a directory reached twice.
    let (mut m, _) = sample();
    let image = Image::open(&m[..]).unwrap();
    let adir = image.resolve(b"/adir").unwrap().nid;
    drop(image);
    let blk = dir_data(&m, b"/adir/sub");
    let d = find_dirent(&m, blk, b"hardlink");
    put64(&mut m, d, adir);
    m[d + 10] = 2; // directory
    fix_checksum(&mut m);
    expect_corrupt(&m, "cycle");
}

#[test]
fn rejects_unsorted_and_out_of_range() {
    let (mut m, _) = sample();
    let blk = dir_data(&m, b"/");
    let d = find_dirent(&m, blk, b"wh");
    let off = le16(&m, d + 8) as usize;
    m[blk + off] = b'a'; // "ah" now sorts before "adir"/"link"
    fix_checksum(&mut m);
    expect_corrupt(&m, "unsorted names");

    let (mut m, _) = sample();
    let blk = dir_data(&m, b"/");
    let d = find_dirent(&m, blk, b"wh");
    put64(&mut m, d, u64::MAX / 2);
    fix_checksum(&mut m);
    expect_corrupt(&m, "nid out of range");
}

#[test]
fn rejects_bad_superblock() {
    let (m, _) = sample();
    let mut bad = m.clone();
    bad[1024 + 40] ^= 1;
    assert!(
        matches!(Image::open(&bad[..]), Err(Error::Corrupt(_))),
        "checksum"
    );
    let mut bad = m.clone();
    bad[1024] = 0;
    assert!(
        matches!(Image::open(&bad[..]), Err(Error::Corrupt(_))),
        "magic"
    );
    assert!(Image::open(&m[..2000]).is_err(), "truncated");
    assert!(Image::open(&[][..]).is_err(), "empty");
    let mut bad = m.clone();
    bad[1024 + 12] = 40;
    fix_checksum(&mut bad);
    assert!(
        matches!(Image::open(&bad[..]), Err(Error::Corrupt(_))),
        "block size"
    );
}

#[test]
fn lying_sizes_do_not_allocate_or_loop() {
    // Give the file a size of 2^62 bytes: mapping it must stop at the end of the image.
    let (mut m, _) = sample();
    let image = Image::open(&m[..]).unwrap();
    let ino = image.resolve(b"/adir/file").unwrap();
    let at = image.superblock().meta_blkaddr as usize * 4096 + ino.nid as usize * 32;
    drop(image);
    put64(&mut m, at + 8, 1 << 62);
    fix_checksum(&mut m);
    let image = Image::open(&m[..]).unwrap();
    let ino = image.resolve(b"/adir/file").unwrap();
    assert!(image.chunk_table(&ino).is_err());
    assert!(image.verify(None).is_err());
    // Directory claiming a huge size.
    let (mut m, _) = sample();
    let image = Image::open(&m[..]).unwrap();
    let ino = image.resolve(b"/adir").unwrap();
    let at = ino.nid as usize * 32;
    drop(image);
    put64(&mut m, at + 8, u64::MAX - 5);
    fix_checksum(&mut m);
    expect_corrupt(&m, "huge directory");
    // Symlink claiming a huge size.
    let (mut m, _) = sample();
    let image = Image::open(&m[..]).unwrap();
    let ino = image.resolve(b"/link").unwrap();
    let at = ino.nid as usize * 32;
    drop(image);
    put16(&mut m, at + 8, 0xffff);
    fix_checksum(&mut m);
    assert!(Image::open(&m[..]).unwrap().verify(None).is_err());
}

/// Deterministic mutation fuzzing under stable Rust: random byte flips over the sample and
/// the fuzz seed corpus, with the superblock checksum refreshed half of the time so the
/// mutations get past it.
#[test]
fn mutation_fuzz_never_panics() {
    let mut seeds = vec![sample().0];
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/reader");
    if let Ok(rd) = std::fs::read_dir(&corpus) {
        for e in rd {
            seeds.push(std::fs::read(e.unwrap().path()).unwrap());
        }
    }
    let iterations: u64 = std::env::var("SPINFS_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..iterations {
        let seed = &seeds[(i as usize) % seeds.len()];
        let mut m = seed.clone();
        let flips = 1 + rnd() % 8;
        for _ in 0..flips {
            let pos = (rnd() % m.len() as u64) as usize;
            match rnd() % 4 {
                0 => m[pos] = 0,
                1 => m[pos] = 0xff,
                _ => m[pos] ^= 1 << (rnd() % 8),
            }
        }
        if rnd() % 2 == 0 && m.len() >= 4096 {
            fix_checksum(&mut m);
        }
        if rnd() % 16 == 0 {
            let cut = (rnd() % m.len() as u64) as usize;
            m.truncate(cut);
        }
        spinfs_erofs::fuzzing::fuzz_reader(&m);
    }
}
