//! File stacking (SPEC §2.1): archived files are changed without copying them whole. Only
//! the chunks a change touches come up to the SSD and go to the media at the next seal;
//! metadata changes copy no data; a file spreads over several images and reads back whole.
//! Measured with the daemon's status counters (`stacking`, `media.bytes_written`).

mod common;

use common::*;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

const MIB: u64 = 1 << 20;

/// Content of byte `pos` of a test file: non-zero, different in every chunk (so neither
/// zero-chunk elision nor chunk dedup can make a test pass), cheap to generate.
fn pattern(seed: u64, pos: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let p = pos + i as u64;
        let x = (p / 4096).wrapping_mul(0x9E37_79B9).wrapping_add(seed) ^ (p % 4096);
        *b = (x as u8) | 1;
    }
}

fn write_pattern(path: &Path, seed: u64, size: u64) {
    let mut f = File::create(path).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(MIB) as usize;
        pattern(seed, pos, &mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        pos += n as u64;
    }
    f.sync_all().unwrap();
}

/// Reads `path` whole and checks it against `expect(pos, buf)`.
fn check_file(path: &Path, size: u64, expect: &dyn Fn(u64, &mut [u8])) {
    let mut f = File::open(path).unwrap();
    assert_eq!(f.metadata().unwrap().len(), size, "{}", path.display());
    let mut got = vec![0u8; MIB as usize];
    let mut want = vec![0u8; MIB as usize];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(MIB) as usize;
        f.read_exact(&mut got[..n]).unwrap();
        expect(pos, &mut want[..n]);
        if got[..n] != want[..n] {
            let i = (0..n).find(|&i| got[i] != want[i]).unwrap();
            panic!("{}: byte {} differs", path.display(), pos + i as u64);
        }
        pos += n as u64;
    }
}

fn counter(m: &Mounted, name: &str) -> u64 {
    status(m)["stacking"][name].as_u64().unwrap()
}

fn media_written(m: &Mounted) -> u64 {
    status(m)["media"]["bytes_written"].as_u64().unwrap()
}

/// An overwrite of 4 KiB in the middle of a large archived file brings one chunk to the SSD
/// and one chunk (plus a meta image) to the media.
#[test]
fn overwrite_in_a_large_archived_file_copies_one_chunk() {
    let size: u64 = std::env::var("SPINFS_STACK_BIG_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048)
        * MIB;
    let chunk = 4 * MIB;
    let mut m = Mounted::new(&["--archive-threshold", "64G"]);
    let path = m.path("big");
    write_pattern(&path, 7, size);
    archive_now(&m);
    let media_before = media_written(&m);
    let at = size / 2 + 12_345;
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0xAB; 4096], at).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(counter(&m, "chunks_copied_up"), 1);
    let copied = counter(&m, "bytes_copied_up");
    assert!(copied <= chunk, "copied up {copied} bytes");
    // The SSD holds the chunk, not the file.
    let gens = m.store.join("gens");
    let mut allocated = 0;
    for g in std::fs::read_dir(&gens).unwrap() {
        let p = g.unwrap().path().join("tree/big");
        if let Ok(md) = std::fs::metadata(&p) {
            allocated += md.blocks() * 512;
        }
    }
    assert!(allocated <= chunk + 4096, "{allocated} bytes on the SSD");
    let expect = |pos: u64, buf: &mut [u8]| {
        pattern(7, pos, buf);
        for (i, b) in buf.iter_mut().enumerate() {
            let p = pos + i as u64;
            if (at..at + 4096).contains(&p) {
                *b = 0xAB;
            }
        }
    };
    check_file(&path, size, &expect);
    archive_now(&m);
    let sealed = media_written(&m) - media_before;
    assert!(
        sealed <= chunk + MIB,
        "the seal after the overwrite wrote {sealed} bytes to the media"
    );
    m.remount();
    check_file(&path, size, &expect);
}

/// A stacked file fragmented far past what an xattr holds (4 KiB written into every other
/// chunk of an archived file of 8192 16 KiB chunks: a map of 4096 runs) keeps its map in a
/// sidecar file: only the touched chunks come up, the file is never made whole, and it
/// reads back byte-identical after a seal, a merge and a remount; fsck is clean.
#[test]
fn a_fragmented_archived_file_keeps_a_map_larger_than_an_xattr() {
    use spinfs_store::stackmap::{MAPS_DIR, STACK_XATTR, Stored};
    let chunk: u64 = 16 * 1024;
    let chunks: u64 = 8192;
    let size = chunks * chunk - 1000;
    let mut m = Mounted::new(&[
        "--chunk-size",
        "16K",
        "--archive-threshold",
        "64G",
        "--merge-fanin",
        "2",
    ]);
    let path = m.path("frag");
    write_pattern(&path, 11, size);
    archive_now(&m);
    let media_before = media_written(&m);
    let touched: Vec<u64> = (0..chunks).step_by(2).collect();
    let at = |c: u64| c * chunk + 4096; // inside the chunk: its old bytes must come up
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    for &c in &touched {
        f.write_all_at(&[0xC5; 4096], at(c)).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let n = touched.len() as u64;
    assert_eq!(counter(&m, "chunks_copied_up"), n);
    assert_eq!(counter(&m, "bytes_copied_up"), n * chunk);
    assert_eq!(counter(&m, "unstacked"), 0, "the file was made whole");
    assert!(counter(&m, "map_files_written") >= 1);
    // The upper file's xattr names a sidecar holding a map no xattr could: the only file of
    // the generation's map directory (superseded maps are gone).
    let gens: Vec<_> = std::fs::read_dir(m.store.join("gens"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(gens.len(), 1, "{gens:?}");
    let upper = gens[0].join("tree/frag");
    let c = std::ffi::CString::new(upper.to_str().unwrap()).unwrap();
    let name = std::ffi::CString::new(STACK_XATTR).unwrap();
    let mut v = vec![0u8; 65536];
    // SAFETY: valid C strings, a buffer of the size passed.
    let len = unsafe { libc::lgetxattr(c.as_ptr(), name.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
    assert!(len > 0, "no map xattr: {}", std::io::Error::last_os_error());
    v.truncate(len as usize);
    let Stored::Sidecar(r) = Stored::decode(&v).unwrap() else {
        panic!("the map is in the xattr ({len} bytes)");
    };
    assert!(r.len > 4096, "a map of {} bytes", r.len);
    let maps: Vec<String> = std::fs::read_dir(gens[0].join(MAPS_DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(maps, vec![r.file_name()]);
    let map = r
        .load(&std::fs::read(gens[0].join(MAPS_DIR).join(r.file_name())).unwrap())
        .unwrap();
    assert_eq!(map.below_chunks(), chunks - n);
    assert_eq!(map.below_runs().len() as u64, chunks - n);
    // The SSD holds the touched chunks, not the file.
    let allocated = std::fs::metadata(&upper).unwrap().blocks() * 512;
    assert!(allocated <= n * chunk + MIB, "{allocated} bytes on the SSD");
    let expect = |pos: u64, buf: &mut [u8]| {
        pattern(11, pos, buf);
        for (i, b) in buf.iter_mut().enumerate() {
            let p = pos + i as u64;
            let c = p / chunk;
            if c.is_multiple_of(2) && (at(c)..at(c) + 4096).contains(&p) {
                *b = 0xC5;
            }
        }
    };
    check_file(&path, size, &expect);
    // The seal writes the touched chunks (and a meta image), not the file.
    archive_now(&m);
    let sealed = media_written(&m) - media_before;
    assert!(
        sealed <= n * chunk + 2 * MIB,
        "the seal after the writes wrote {sealed} bytes to the media"
    );
    check_file(&path, size, &expect);
    spinfs_ok(&["merge", m.store.to_str().unwrap(), "--wait"]);
    assert_eq!(archived_layers(&m), 1, "the two layers were merged");
    m.remount();
    check_file(&path, size, &expect);
    m.umount();
    let out = spinfs_ok(&["fsck", m.store.to_str().unwrap()]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        !report.contains("damage") && !report.contains("orphan"),
        "fsck: {report}"
    );
}

/// chmod, chown, utimens, xattrs, rename and link of an archived file copy no data, and the
/// next seal writes no blob data for it.
#[test]
fn metadata_changes_copy_no_data() {
    let m = Mounted::new(&["--chunk-size", "1M"]);
    let size = 24 * MIB + 333;
    write_pattern(&m.path("f"), 3, size);
    std::fs::create_dir(m.path("d")).unwrap();
    archive_now(&m);
    let media_before = media_written(&m);
    let p = m.path("f");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(&p, Some(1), Some(2)).unwrap();
    let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
    File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_modified(t)
        .unwrap();
    let ok = std::process::Command::new("setfattr")
        .args(["-n", "user.k", "-v", "v"])
        .arg(&p)
        .status()
        .unwrap();
    assert!(ok.success());
    std::fs::rename(&p, m.path("d/g")).unwrap();
    std::fs::hard_link(m.path("d/g"), m.path("h")).unwrap();
    assert_eq!(counter(&m, "bytes_copied_up"), 0);
    assert_eq!(counter(&m, "chunks_copied_up"), 0);
    assert!(counter(&m, "stacked_copy_ups") >= 1);
    let md = std::fs::metadata(m.path("h")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o640);
    assert_eq!((md.uid(), md.gid(), md.nlink()), (1, 2, 2));
    assert_eq!(md.mtime(), 1_000_000);
    check_file(&m.path("h"), size, &|pos, b| pattern(3, pos, b));
    archive_now(&m);
    let sealed = media_written(&m) - media_before;
    assert!(sealed < 256 * 1024, "the seal wrote {sealed} bytes");
    check_file(&m.path("d/g"), size, &|pos, b| pattern(3, pos, b));
    assert!(!m.path("f").exists());
}

/// Every kind of change to a stacked file, across seals and merges: writes (inside and
/// across chunks), appends, shrinking and extending truncates, punched holes, zeroed ranges,
/// allocation, copy_file_range in both directions. SEEK_DATA/SEEK_HOLE agree with ext4.
#[test]
fn changes_of_every_kind_across_seals_and_merges() {
    use std::os::fd::AsRawFd;
    let mut m = Mounted::new(&[
        "--chunk-size",
        "64K",
        "--object-size",
        "64K",
        "--container-size",
        "32M",
        "--merge-fanin",
        "2",
    ]);
    let reference = tempfile::tempfile_in(test_root()).unwrap();
    let size = 3 * MIB + 100;
    write_pattern(&m.path("f"), 11, size);
    let mut buf = vec![0u8; size as usize];
    pattern(11, 0, &mut buf);
    reference.write_all_at(&buf, 0).unwrap();
    archive_now(&m);
    let mut rng = 0x1234_5678_u64;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let other = m.path("src");
    write_pattern(&other, 5, MIB);
    let other_ref = {
        let mut v = vec![0u8; MIB as usize];
        pattern(5, 0, &mut v);
        v
    };
    for round in 0..24 {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(0)
            .open(m.path("f"))
            .unwrap();
        for _ in 0..6 {
            let len = reference.metadata().unwrap().len();
            let off = next(len + 200_000);
            let n = 1 + next(150_000);
            let files = [f.as_raw_fd(), reference.as_raw_fd()];
            match next(7) {
                0 => {
                    let data: Vec<u8> = (0..n).map(|i| (i as u8) ^ (round as u8) | 0x80).collect();
                    f.write_all_at(&data, off).unwrap();
                    reference.write_all_at(&data, off).unwrap();
                }
                1 => {
                    let to = next(len + 100_000);
                    f.set_len(to).unwrap();
                    reference.set_len(to).unwrap();
                }
                2 | 3 => {
                    let mode = match next(3) {
                        0 => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        1 => libc::FALLOC_FL_ZERO_RANGE,
                        _ => 0,
                    };
                    for fd in files {
                        // SAFETY: plain syscall on open descriptors.
                        let r = unsafe { libc::fallocate(fd, mode, off as i64, n as i64) };
                        assert_eq!(
                            r,
                            0,
                            "fallocate {mode:#x}: {}",
                            std::io::Error::last_os_error()
                        );
                    }
                }
                4 => {
                    // Append through O_APPEND.
                    let data = vec![0x5A_u8 ^ round as u8; n as usize];
                    OpenOptions::new()
                        .append(true)
                        .open(m.path("f"))
                        .unwrap()
                        .write_all(&data)
                        .unwrap();
                    reference.write_all_at(&data, len).unwrap();
                }
                5 => {
                    // copy_file_range into the stacked file.
                    let src = File::open(&other).unwrap();
                    let cnt = n.min(MIB);
                    let mut done = 0;
                    while done < cnt {
                        let mut oi = done as i64;
                        let mut oo = (off + done) as i64;
                        // SAFETY: plain syscall on open descriptors.
                        let r = unsafe {
                            libc::copy_file_range(
                                src.as_raw_fd(),
                                &mut oi,
                                f.as_raw_fd(),
                                &mut oo,
                                (cnt - done) as usize,
                                0,
                            )
                        };
                        assert!(
                            r > 0,
                            "copy_file_range: {}",
                            std::io::Error::last_os_error()
                        );
                        done += r as u64;
                    }
                    reference
                        .write_all_at(&other_ref[..cnt as usize], off)
                        .unwrap();
                }
                _ => {
                    // copy_file_range out of the stacked file.
                    let out = m.path("copy");
                    let _ = std::fs::remove_file(&out);
                    std::fs::copy(m.path("f"), &out).unwrap();
                    let a = std::fs::read(&out).unwrap();
                    let mut b = vec![0u8; len as usize];
                    reference.read_exact_at(&mut b, 0).unwrap();
                    assert!(a == b, "round {round}: copy of the stacked file differs");
                }
            }
        }
        drop(f);
        let len = reference.metadata().unwrap().len();
        let got = std::fs::read(m.path("f")).unwrap();
        let mut want = vec![0u8; len as usize];
        reference.read_exact_at(&mut want, 0).unwrap();
        assert_eq!(got.len(), want.len(), "round {round}: size");
        if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
            panic!("round {round}: byte {i} differs");
        }
        check_seek(&m.path("f"), &reference, len, round);
        match round % 4 {
            0 | 1 => archive_now(&m),
            2 => {
                archive_now(&m);
                spinfs_ok(&["merge", m.store.to_str().unwrap(), "--wait"]);
            }
            _ => m.remount(),
        }
    }
}

/// SEEK_DATA/SEEK_HOLE on the mount are right: every hole it reports reads as zeros in the
/// reference (ext4) file, every range ext4 reports as a hole of a whole 64 KiB chunk is a
/// hole on the mount too, and the end of file is a hole.
fn check_seek(path: &Path, reference: &File, len: u64, round: usize) {
    use std::os::fd::AsRawFd;
    let f = File::open(path).unwrap();
    let seek = |fd: i32, pos: u64, whence: i32| -> Option<u64> {
        // SAFETY: plain syscall on an open descriptor.
        let r = unsafe { libc::lseek(fd, pos as i64, whence) };
        (r >= 0).then_some(r as u64)
    };
    let mut data = vec![0u8; len as usize];
    reference.read_exact_at(&mut data, 0).unwrap();
    let mut pos = 0;
    let mut holes = Vec::new();
    while pos < len {
        let h = seek(f.as_raw_fd(), pos, libc::SEEK_HOLE).expect("SEEK_HOLE");
        assert!(h >= pos && h <= len, "round {round}: SEEK_HOLE {pos} = {h}");
        if h == len {
            break;
        }
        let d = seek(f.as_raw_fd(), h, libc::SEEK_DATA).unwrap_or(len);
        assert!(d > h, "round {round}: SEEK_DATA {h} = {d}");
        if let Some(i) = (h..d).find(|&i| data[i as usize] != 0) {
            panic!("round {round}: byte {i} is data but lies in a reported hole {h}..{d}");
        }
        holes.push((h, d));
        pos = d;
    }
    // Whole chunks ext4 holds no data in are holes on the mount.
    let chunk = 64 * 1024;
    let mut c = 0;
    while (c + 1) * chunk <= len {
        let rd = seek(reference.as_raw_fd(), c * chunk, libc::SEEK_DATA).unwrap_or(len);
        if rd >= (c + 1) * chunk {
            let covered = holes
                .iter()
                .any(|&(h, d)| h <= c * chunk && d >= (c + 1) * chunk);
            assert!(
                covered,
                "round {round}: chunk {c} is a hole in ext4, data on the mount"
            );
        }
        c += 1;
    }
}

/// An ext4 filesystem in a file, loop-mounted as a small SSD; unmounted on drop.
struct SmallSsd {
    dir: tempfile::TempDir,
    mnt: std::path::PathBuf,
}

impl SmallSsd {
    fn new(size_mib: u64) -> SmallSsd {
        let dir = tempfile::Builder::new()
            .prefix("ssd")
            .tempdir_in(test_root())
            .unwrap();
        let img = dir.path().join("ssd.img");
        File::create(&img).unwrap().set_len(size_mib * MIB).unwrap();
        let run = |cmd: &mut std::process::Command| {
            let out = cmd.output().unwrap();
            assert!(out.status.success(), "{cmd:?}: {}", stderr(&out));
        };
        run(std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&img));
        let mnt = dir.path().join("ssd");
        std::fs::create_dir(&mnt).unwrap();
        run(std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt));
        SmallSsd { dir, mnt }
    }
}

impl Drop for SmallSsd {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.mnt).status();
    }
}

/// A spinfs mount on a store inside `ssd`, with its media on the big disk; unmounted on drop.
struct SpinMount {
    store: std::path::PathBuf,
    mnt: std::path::PathBuf,
    opts: String,
}

impl SpinMount {
    fn mount(&self) {
        spinfs_ok(&[
            "mount",
            self.store.to_str().unwrap(),
            self.mnt.to_str().unwrap(),
            "-o",
            &self.opts,
        ]);
    }
    fn umount(&self) {
        spinfs_ok(&["umount", self.mnt.to_str().unwrap()]);
    }
}

impl Drop for SpinMount {
    fn drop(&mut self) {
        let out = spinfs(&["umount", self.mnt.to_str().unwrap()]);
        if !out.status.success() {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.mnt)
                .status();
        }
    }
}

/// A file held open for writing across many seals (`cp` of a file larger than the SSD, on a
/// default mount: files open for writing are served by the daemon): its sealed prefix goes to the media while
/// it grows, so it fits although the SSD could never hold it; it spans many images and reads
/// back byte-identical after a remount. Sizes scale with SPINFS_STACK_SSD_MIB /
/// SPINFS_STACK_FILE_MIB / SPINFS_STACK_THRESHOLD_MIB (defaults 300 / 1024 / 64;
/// scripts/stacking-soak.sh runs 5 GiB with a 1 GiB threshold).
#[test]
fn a_file_larger_than_the_ssd_is_written_through_one_descriptor() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (ssd_mib, file_mib, threshold_mib) = (
        env("SPINFS_STACK_SSD_MIB", 300),
        env("SPINFS_STACK_FILE_MIB", 1024),
        env("SPINFS_STACK_THRESHOLD_MIB", 64),
    );
    let ssd = SmallSsd::new(ssd_mib);
    let store = ssd.mnt.join("store");
    let media = ssd.dir.path().join("media");
    let mnt = ssd.dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    spinfs_ok(&[
        "mkfs",
        store.to_str().unwrap(),
        "--media",
        &format!("dir:{}", media.display()),
        "--archive-threshold",
        &format!("{threshold_mib}M"),
        "--cache-size",
        "16M",
    ]);
    let m = SpinMount {
        store: store.clone(),
        mnt: mnt.clone(),
        opts: "allow_other".into(),
    };
    m.mount();
    let size = file_mib * MIB;
    let src = ssd.dir.path().join("src");
    write_pattern(&src, 42, size);
    let out = std::process::Command::new("cp")
        .arg(&src)
        .arg(mnt.join("big"))
        .output()
        .unwrap();
    assert!(out.status.success(), "cp: {}", stderr(&out));
    spinfs_ok(&["archive", store.to_str().unwrap(), "--wait"]);
    let st = status_of(&store);
    let mut blobs = std::collections::BTreeSet::new();
    for l in st["layers"].as_array().unwrap() {
        for b in l["blobs"].as_array().into_iter().flatten() {
            blobs.insert(b.as_u64().unwrap());
        }
    }
    let expect_images = (file_mib / threshold_mib).min(5);
    assert!(
        blobs.len() as u64 >= expect_images,
        "the file spans {} images: {st}",
        blobs.len()
    );
    m.umount();
    m.mount();
    check_file(&mnt.join("big"), size, &|pos, b| pattern(42, pos, b));
}

/// A file held open for writing across a seal, with and without `-o passthrough_writes`.
/// By default (the daemon serves write-only opens) the seal archives what was written so far and the
/// descriptor goes on writing into a stacked copy; with `passthrough_writes` the kernel
/// writes into the SSD file itself, so the freeze moves the file whole into the new
/// generation and it reaches the media only once closed and sealed again. Either way every
/// byte written through the descriptor reads back, before and after a remount.
#[test]
fn a_writer_held_open_across_a_seal_with_and_without_passthrough_writes() {
    for opts in ["allow_other", "allow_other,passthrough_writes"] {
        let moved_whole = opts.contains(",passthrough_writes");
        // Default 4 MiB chunks: the 3 MiB first part is one chunk (`pattern` repeats every
        // MiB, so smaller chunks would be deduplicated and not count as written).
        let mut m = Mounted::with_options(&[], opts);
        let first = 3 * MIB;
        let second = MIB + 777;
        let path = m.path("log");
        let mut f = File::create(&path).unwrap();
        // A reader opened beside the writer (`tail -f`) follows it across the seal.
        let mut reader = File::open(&path).unwrap();
        let mut buf = vec![0u8; first as usize];
        pattern(5, 0, &mut buf);
        f.write_all(&buf).unwrap();
        f.sync_all().unwrap();
        let mut head = vec![0u8; 4096];
        reader.read_exact_at(&mut head, 0).unwrap();
        assert!(head[..] == buf[..4096]);
        let before = media_written(&m);
        archive_now(&m);
        let sealed = media_written(&m) - before;
        if moved_whole {
            assert!(
                sealed < first,
                "{opts}: the open file went whole to the new generation, not to the media \
                 ({sealed} bytes written)"
            );
        } else {
            assert!(
                sealed >= first,
                "{opts}: the seal archived the open file's {first} bytes ({sealed} written)"
            );
        }
        // The descriptor goes on after the seal.
        let mut more = vec![0u8; second as usize];
        pattern(5, first, &mut more);
        f.write_all(&more).unwrap();
        f.sync_all().unwrap();
        // The reader first (another handle's reads would fill the page cache it reads from).
        let mut seen = Vec::new();
        reader.read_to_end(&mut seen).unwrap();
        assert_eq!(
            seen.len() as u64,
            first + second,
            "{opts}: the reader sees every byte"
        );
        let mut want = buf.clone();
        want.extend_from_slice(&more);
        assert!(seen == want, "{opts}: the reader sees the bytes written");
        check_file(&path, first + second, &|pos, b| pattern(5, pos, b));
        drop((f, reader));
        let before = media_written(&m);
        archive_now(&m);
        let sealed = media_written(&m) - before;
        let expect = if moved_whole { first + second } else { second };
        assert!(
            sealed >= expect,
            "{opts}: the closed file's {expect} unsealed bytes reached the media ({sealed})"
        );
        m.remount();
        check_file(&path, first + second, &|pos, b| pattern(5, pos, b));
    }
}

/// Data the writable generation holds on the SSD (the upper layer's bytes in `status`).
fn ssd_bytes(m: &Mounted) -> u64 {
    let st = status(m);
    let upper = st["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["kind"] == "upper")
        .unwrap_or_else(|| panic!("no upper layer: {st}"))
        .clone();
    upper["bytes"].as_u64().unwrap()
}

/// A file held open read-write (a recorder that seeks back to rewrite its header, a
/// database, fsx) across several seals. With `-o direct_writes` (and with
/// `nopassthrough_writes`) the daemon serves the descriptor, so every seal archives what was
/// written so far and the SSD keeps only what came since; on a default mount the kernel
/// writes such a file by passthrough, and every freeze moves it whole into the new generation
/// instead. Either way every byte written, read back through the same descriptor, is right,
/// before and after a remount.
#[test]
fn a_read_write_descriptor_held_open_across_seals() {
    for opts in [
        "allow_other,direct_writes",
        "allow_other,nopassthrough_writes",
        "allow_other",
    ] {
        let archived_while_open = opts != "allow_other";
        let mut m = Mounted::with_options(&[], opts);
        // One default 4 MiB chunk a part, each of other content (no dedup between parts).
        let part = 4 * MIB as usize;
        let rounds = 4;
        let path = m.path("rec");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mut want: Vec<u8> = Vec::new();
        for r in 0..rounds {
            want.extend_from_slice(&data(100 + r as u64, part));
            f.write_all_at(&want[r * part..], (r * part) as u64)
                .unwrap();
            // Seek back: rewrite the header (in the archived first chunk after a seal) and a
            // few bytes straddling the previous part's end.
            let header = data(200 + r as u64, 512);
            want[..512].copy_from_slice(&header);
            f.write_all_at(&header, 0).unwrap();
            if r > 0 {
                let at = r * part - 100;
                let patch = data(300 + r as u64, 200);
                want[at..at + 200].copy_from_slice(&patch);
                f.write_all_at(&patch, at as u64).unwrap();
            }
            f.sync_all().unwrap();
            let mut got = vec![0u8; want.len()];
            f.read_exact_at(&mut got, 0).unwrap();
            assert!(
                got == want,
                "{opts}: round {r}: the descriptor reads its own writes"
            );
            let before = media_written(&m);
            archive_now(&m);
            let sealed = media_written(&m) - before;
            let ssd = ssd_bytes(&m);
            let whole = want.len() as u64;
            if archived_while_open {
                assert!(
                    sealed >= part as u64,
                    "{opts}: round {r}: the seal archived the open file's new part \
                     ({sealed} bytes written to the media)"
                );
                assert!(
                    ssd < part as u64,
                    "{opts}: round {r}: after the seal the SSD holds {ssd} bytes, not the \
                     {whole}-byte file"
                );
            } else {
                assert!(
                    sealed < part as u64,
                    "{opts}: round {r}: the open file went whole to the new generation \
                     ({sealed} bytes written to the media)"
                );
                assert!(
                    ssd >= whole,
                    "{opts}: round {r}: the SSD holds the whole {whole}-byte file ({ssd})"
                );
            }
        }
        let mut got = vec![0u8; want.len()];
        f.read_exact_at(&mut got, 0).unwrap();
        assert!(
            got == want,
            "{opts}: the descriptor reads everything after the last seal"
        );
        drop(f);
        archive_now(&m);
        m.remount();
        let got = std::fs::read(&path).unwrap();
        assert_eq!(got.len(), want.len(), "{opts}: size after a remount");
        assert!(got == want, "{opts}: content after a remount");
    }
}

/// The kernel is the oracle for images with stacked files: a layer whose file keeps most of
/// its chunks in an older blob, exported, mounts with the kernel's erofs (one `device=` per
/// blob, the older one first) and shows the same bytes as the mount; fsck.erofs accepts it.
#[test]
fn kernel_reads_a_stacked_layer_like_the_mount() {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let m = Mounted::new(&["--chunk-size", "1M"]);
    let size = 9 * MIB + 4321;
    write_pattern(&m.path("f"), 9, size);
    archive_now(&m);
    let f = OpenOptions::new().write(true).open(m.path("f")).unwrap();
    f.write_all_at(&[0x11; 5000], 3 * MIB - 100).unwrap();
    f.set_len(7 * MIB + 5).unwrap();
    f.write_all_at(&[0x22; 3000], 8 * MIB).unwrap();
    drop(f);
    archive_now(&m);
    let st = status(&m);
    let layer = st["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["kind"] == "archived")
        .unwrap()
        .clone();
    let blobs = layer["blobs"].as_array().unwrap().len();
    assert!(
        blobs >= 2,
        "the new layer references the older blob: {layer}"
    );
    let dir = m.dir.path().join("export");
    let id = layer["id"].as_u64().unwrap();
    spinfs_ok(&[
        "export",
        m.store.to_str().unwrap(),
        "--layer",
        &id.to_string(),
        dir.to_str().unwrap(),
    ]);
    let meta = dir.join(format!("meta.{id}"));
    let devs: Vec<std::path::PathBuf> =
        (1..=blobs).map(|i| dir.join(format!("blob.{i}"))).collect();
    let mut fsck = std::process::Command::new("fsck.erofs");
    for d in &devs {
        fsck.arg(format!("--device={}", d.display()));
    }
    let out = fsck.arg(&meta).output().unwrap();
    assert!(out.status.success(), "fsck.erofs: {}", stderr(&out));
    let target = m.dir.path().join("kernel");
    std::fs::create_dir(&target).unwrap();
    let opts = devs
        .iter()
        .map(|b| format!("device={}", b.display()))
        .collect::<Vec<_>>()
        .join(",");
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).unwrap();
    let (src, tgt, fstype, data) = (
        c(&meta),
        c(&target),
        CString::new("erofs").unwrap(),
        CString::new(opts.clone()).unwrap(),
    );
    // SAFETY: valid NUL-terminated strings for the duration of the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fstype.as_ptr(),
            libc::MS_RDONLY,
            data.as_ptr().cast(),
        )
    };
    assert_eq!(
        r,
        0,
        "mount -t erofs -o {opts}: {}",
        std::io::Error::last_os_error()
    );
    let kernel = std::fs::read(target.join("f"));
    // SAFETY: a valid path.
    unsafe { libc::umount2(tgt.as_ptr(), libc::MNT_DETACH) };
    let ours = std::fs::read(m.path("f")).unwrap();
    let kernel = kernel.unwrap();
    assert_eq!(kernel.len(), ours.len());
    assert!(
        kernel == ours,
        "the kernel reads other bytes than the mount"
    );
    let mut want = vec![0u8; size as usize];
    pattern(9, 0, &mut want);
    want[(3 * MIB - 100) as usize..(3 * MIB + 4900) as usize].fill(0x11);
    want.truncate((7 * MIB + 5) as usize);
    want.resize((8 * MIB) as usize, 0);
    want.extend_from_slice(&[0x22; 3000]);
    assert!(ours == want, "the mount shows wrong bytes");
}
