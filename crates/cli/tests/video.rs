//! SPEC problems 3 and 4 with real videos and real sniffers: MP4s made by ffmpeg (moov atom
//! first and last) and a directory of files are archived, the store is remounted cold, and
//! then `ffprobe`, `file -P bytes=<head size>`, 4 KiB sniffs and `gio` identify them from
//! the head cache alone (the first and the last 64 KiB of each file by default; no media
//! read), `ffmpeg` decodes all of it straight from the mount, and the bytes are intact.
//! Archived files are opened with direct I/O, so the kernel reads exactly what these tools
//! ask for (no readahead past the head): what they ask for is measured with strace on the
//! originals and checked to fit the head and tail, so the assertions are honest.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

const SMALL: &[&str] = &[
    "--container-size",
    "32M",
    "--object-size",
    "64K",
    "--chunk-size",
    "1M",
];

/// The default head size (and tail size) of `spinfs mkfs`.
const HEAD: u64 = 64 << 10;

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    out
}

/// What ffprobe says about a file: container, duration, and per stream type/codec/size/frames.
fn probe(path: &Path) -> serde_json::Value {
    let out = run(Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "format=format_name,duration:stream=codec_type,codec_name,width,height,nb_frames",
            "-of",
            "json",
        ])
        .arg(path));
    assert!(
        out.stderr.is_empty(),
        "ffprobe complained: {}",
        stderr(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sha256_of(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// A 10-second 320x240 H.264 + AAC MP4 of ffmpeg's test pattern, about 2 MB: the moov atom
/// first (`+faststart`) or last (ffmpeg's default). The pattern compresses well, so its first
/// frames (which ffprobe decodes) are small.
fn make_video(path: &Path, faststart: bool) {
    let out = run(Command::new("ffmpeg").args(["-hide_banner", "-encoders"]));
    let encoder: &[&str] = if String::from_utf8_lossy(&out.stdout).contains(" libx264 ") {
        &["-c:v", "libx264", "-preset", "ultrafast", "-crf", "10"]
    } else {
        &["-c:v", "mpeg4", "-q:v", "2"]
    };
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i"])
        .arg("testsrc2=duration=10:size=320x240:rate=25")
        .args(["-f", "lavfi", "-i", "sine=frequency=440:duration=10"])
        .args(encoder)
        .args(["-pix_fmt", "yuv420p", "-c:a", "aac"]);
    if faststart {
        cmd.args(["-movflags", "+faststart"]);
    }
    run(cmd.arg("-y").arg(path));
}

/// Offset and size of the top-level MP4 box `kind`.
fn mp4_box(path: &Path, kind: &[u8; 4]) -> Option<(u64, u64)> {
    let data = std::fs::read(path).unwrap();
    let mut at = 0usize;
    while at + 8 <= data.len() {
        let mut size = u64::from(u32::from_be_bytes(data[at..at + 4].try_into().unwrap()));
        if size == 1 {
            size = u64::from_be_bytes(data[at + 8..at + 16].try_into().unwrap());
        } else if size == 0 {
            size = (data.len() - at) as u64;
        }
        if &data[at + 4..at + 8] == kind {
            return Some((at as u64, size));
        }
        if size < 8 {
            return None;
        }
        at += size as usize;
    }
    None
}

/// The byte ranges of `file` that `cmd` reads (read, pread64 and lseek of any descriptor
/// open on it), measured with strace. Panics if it maps the file or reads it some other way.
fn ranges_read(cmd: &[&str], file: &Path) -> Vec<(u64, u64)> {
    let dir = tempfile::tempdir_in(test_root()).unwrap();
    let log = dir.path().join("strace.log");
    let mut c = Command::new("strace");
    c.args(["-f", "-y", "-s", "0", "-o"]).arg(&log);
    c.args(["-e", "trace=openat,open,read,pread64,readv,preadv,preadv2,lseek,mmap,sendfile,splice,copy_file_range"]);
    c.args(cmd).arg(file);
    run(&mut c);
    let path = std::fs::canonicalize(file).unwrap();
    let tag = format!("<{}>", path.display());
    let mut pos: BTreeMap<String, u64> = BTreeMap::new();
    let mut out = Vec::new();
    for line in std::fs::read_to_string(&log).unwrap().lines() {
        if !line.contains(&tag) {
            continue;
        }
        // "PID call(ARGS) = RESULT"
        let body = line.split_once(' ').map_or(line, |(_, b)| b).trim();
        let (call, rest) = body
            .split_once('(')
            .unwrap_or_else(|| panic!("strace: {line}"));
        let Some((args, result)) = rest.rsplit_once(") = ") else {
            continue; // unfinished/resumed halves: strace -f prints the whole call again
        };
        let result = result.split_whitespace().next().unwrap_or("");
        let args: Vec<&str> = args.split(", ").collect();
        match call {
            "openat" | "open" => {
                pos.insert(result.to_string(), 0);
            }
            "lseek" => {
                let fd = args[0].split('<').next().unwrap();
                let to: u64 = result.parse().unwrap_or_else(|_| panic!("strace: {line}"));
                let fd = format!("{fd}{tag}");
                pos.insert(fd, to);
            }
            "read" => {
                let n: u64 = result.parse().unwrap_or_else(|_| panic!("strace: {line}"));
                let p = pos.entry(args[0].to_string()).or_insert(0);
                if n > 0 {
                    out.push((*p, n));
                }
                *p += n;
            }
            "pread64" => {
                let n: u64 = result.parse().unwrap_or_else(|_| panic!("strace: {line}"));
                let at: u64 = args[3].parse().unwrap_or_else(|_| panic!("strace: {line}"));
                if n > 0 {
                    out.push((at, n));
                }
            }
            other => panic!("{cmd:?} uses {other} on {}: {line}", file.display()),
        }
    }
    assert!(
        !out.is_empty(),
        "{cmd:?} read nothing of {}?",
        file.display()
    );
    out
}

/// Asserts that every range lies in the first or the last `HEAD` bytes of a file of `size`.
fn assert_in_edges(what: &str, ranges: &[(u64, u64)], size: u64) {
    for &(at, n) in ranges {
        let end = at + n;
        assert!(
            end <= HEAD || at >= size - HEAD,
            "{what} reads bytes {at}..{end} of {size}: outside the head and tail ({HEAD} bytes \
             each), so this test could not be honest; reads: {ranges:?}"
        );
    }
}

const FFPROBE: &[&str] = &[
    "ffprobe",
    "-v",
    "error",
    "-show_entries",
    "format=format_name,duration:stream=codec_type,codec_name,width,height,nb_frames",
    "-of",
    "json",
];

#[test]
fn archived_videos_are_probed_from_the_head_cache_at_the_default_head_size_and_play() {
    let src = tempfile::tempdir_in(test_root()).unwrap();
    let mut originals = Vec::new();
    for (name, faststart) in [("fast.mp4", true), ("end.mp4", false)] {
        let original = src.path().join(name);
        make_video(&original, faststart);
        let len = std::fs::metadata(&original).unwrap().len();
        assert!(
            len > 1 << 20,
            "{name}: a video of a few MB, not {len} bytes"
        );
        // The preconditions that make head and tail enough: where the moov atom is...
        let (moov, moov_len) = mp4_box(&original, b"moov").expect("a moov atom");
        let (mdat, _) = mp4_box(&original, b"mdat").expect("an mdat atom");
        if faststart {
            assert!(
                moov < mdat && moov + moov_len <= HEAD,
                "{name}: moov {moov}+{moov_len}"
            );
        } else {
            assert!(
                moov > mdat && moov >= len - HEAD,
                "{name}: moov {moov}+{moov_len} of {len}"
            );
        }
        // ...and what ffprobe and `file -P bytes=HEAD` read of the original, measured.
        assert_in_edges("ffprobe", &ranges_read(FFPROBE, &original), len);
        let file_cmd = ["file", "-b", "-P", "bytes=65536"];
        let file_reads = ranges_read(&file_cmd, &original);
        assert_in_edges("file -P bytes=65536", &file_reads, len);
        assert!(
            file_reads.iter().any(|&(at, _)| at >= len - HEAD),
            "file(1) no longer reads the tail: {file_reads:?}"
        );
        let want = probe(&original);
        let format = &want["format"];
        assert_eq!(
            format["duration"]
                .as_str()
                .map(|d| d.parse::<f64>().unwrap().round()),
            Some(10.0)
        );
        let streams = want["streams"].as_array().unwrap();
        assert_eq!(streams.len(), 2, "{want}");
        assert_eq!(streams[0]["width"], 320, "{want}");
        assert_eq!(streams[0]["nb_frames"], "250", "{want}");
        originals.push((name, original, len, want, sha256_of(&src.path().join(name))));
    }

    // The default head size: no --head-size.
    let mut m = Mounted::new(SMALL);
    std::fs::create_dir(m.path("videos")).unwrap();
    for (name, original, ..) in &originals {
        std::fs::copy(original, m.path(&format!("videos/{name}"))).unwrap();
    }
    archive_now(&m);
    m.remount(); // cold: nothing of the files in the page cache or the daemon's caches
    let s = status(&m);
    let layers = s["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2, "{s}");
    assert_eq!(
        (layers[0]["kind"].as_str(), layers[0]["files"].as_u64()),
        (Some("upper"), Some(0)),
        "the videos must live only in the archived layer: {s}"
    );
    assert_eq!(layers[1]["kind"], "archived", "{s}");

    // Sniffing: a player's ffprobe and file(1) read only the edges: no media read.
    let before = media_reads(&m);
    for (name, _, _, want, _) in &originals {
        let mounted = m.path(&format!("videos/{name}"));
        assert_eq!(
            &probe(&mounted),
            want,
            "ffprobe of the archived {name} differs"
        );
        let out = run(Command::new("file")
            .args(["-b", "-P", "bytes=65536"])
            .arg(&mounted));
        let what = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(what.contains("ISO Media"), "file says: {what}");
        assert_eq!(
            media_reads(&m),
            before,
            "sniffing the archived {name} read the media (head/tail cache not used)"
        );
    }

    // Playing: the whole stream decodes from the mount, fetched from the media.
    for (name, _, _, _, want_sha) in &originals {
        let mounted = m.path(&format!("videos/{name}"));
        let before = media_reads(&m);
        let out = run(Command::new("ffmpeg")
            .args(["-hide_banner", "-v", "error", "-xerror", "-i"])
            .arg(&mounted)
            .args(["-f", "null", "-"]));
        assert!(out.stderr.is_empty(), "decode errors: {}", stderr(&out));
        assert!(
            media_reads(&m) > before,
            "decoding the whole {name} must have read the media"
        );
        assert_eq!(
            &sha256_of(&mounted),
            want_sha,
            "archived bytes of {name} differ"
        );
    }

    // And again after a remount, from a fresh daemon (the chunk cache may serve it now).
    m.remount();
    for (name, _, _, want, want_sha) in &originals {
        let mounted = m.path(&format!("videos/{name}"));
        assert_eq!(
            &sha256_of(&mounted),
            want_sha,
            "{name} differs after remount"
        );
        assert_eq!(&probe(&mounted), want);
    }
}

/// A file manager opening a folder: every file sniffed (4 KiB, as GIO does for content types,
/// `gio info` itself, `file -P bytes=<head size>`, `head -c`), none of it from the media.
#[test]
fn sniffing_a_directory_of_200_archived_files_reads_no_media() {
    let mut m = Mounted::new(SMALL);
    std::fs::create_dir(m.path("folder")).unwrap();
    let mut files = Vec::new();
    for i in 0..200u64 {
        // Sizes from empty to 1 MiB: shorter than a sniff, shorter than head + tail, longer.
        let len = match i % 5 {
            0 => (i * 37) as usize % 4096,
            1 => 4096 + (i * 997) as usize % 60_000,
            2 => 70_000 + (i * 1013) as usize % 60_000,
            _ => 200_000 + (i * 7919) as usize % (1 << 20),
        };
        let mut bytes = data(i + 1, len);
        if len >= 4 && i % 2 == 0 {
            bytes[..4].copy_from_slice(b"%PDF"); // something for the sniffers to recognise
        }
        let name = format!("folder/f{i:03}.bin");
        std::fs::write(m.path(&name), &bytes).unwrap();
        files.push((name, bytes));
    }
    archive_now(&m);
    m.remount();
    let before = media_reads(&m);

    use std::io::Read;
    for (name, bytes) in &files {
        let mut f = std::fs::File::open(m.path(name)).unwrap();
        let mut buf = vec![0u8; 4096];
        let n = f.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], &bytes[..bytes.len().min(4096)], "{name}");
    }
    assert_eq!(media_reads(&m), before, "4 KiB sniffs read the media");

    let paths: Vec<_> = files.iter().map(|(n, _)| m.path(n)).collect();
    let out = run(Command::new("file")
        .args(["-b", "-P", "bytes=65536"])
        .args(&paths));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        files.len()
    );
    assert_eq!(
        media_reads(&m),
        before,
        "file -P bytes=65536 read the media"
    );

    // gio (libglib2.0-bin) sniffs 4 KiB of files whose name says nothing.
    let out = run(Command::new("gio")
        .args(["info", "-a", "standard::content-type"])
        .args(&paths));
    let types = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        types.matches("standard::content-type:").count(),
        files.len()
    );
    assert_eq!(media_reads(&m), before, "gio info read the media");

    for (name, bytes) in files.iter().step_by(7) {
        let out = run(Command::new("head").args(["-c", "65536"]).arg(m.path(name)));
        assert_eq!(out.stdout, &bytes[..bytes.len().min(65536)], "{name}");
    }
    assert_eq!(media_reads(&m), before, "head -c 65536 read the media");

    // The counter does move when bytes past the edges are read, and mmap (shared, read
    // only) of an archived file works.
    let (name, bytes) = files.iter().find(|(_, b)| b.len() > 600_000).unwrap();
    let out = run(Command::new("python3").arg("-c").arg(
        "import mmap,sys\nf=open(sys.argv[1],'rb')\nm=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ)\nsys.stdout.buffer.write(m[300000:300100])",
    ).arg(m.path(name)));
    assert_eq!(out.stdout, &bytes[300_000..300_100], "mmap of {name}");
    let mid = std::fs::read(m.path(name)).unwrap();
    assert_eq!(&mid, bytes, "{name}");
    assert!(
        media_reads(&m) > before,
        "reading the middle must read the media"
    );
}

/// `file` at its defaults (file 5.44) reads the first 7 MiB of a file and then the last
/// 7 MiB (`pread` at size - 7 MiB; its `bytes` parameter, 7 MiB by default, sets both), so a
/// 64 KiB head and tail serve it only for files of up to 128 KiB; `file -P bytes=<head
/// size>` stays within them (see above), and a store made with `--head-size 7M` serves
/// `file` at its defaults for any file. This test states the limit and checks both halves.
#[test]
fn file_at_its_defaults_reads_7_mib_at_each_end() {
    const SEVEN: u64 = 7 << 20;
    let src = tempfile::tempdir_in(test_root()).unwrap();
    let original = src.path().join("big.gz");
    let mut bytes = data(9, 20 << 20);
    bytes[..4].copy_from_slice(&[0x1f, 0x8b, 0x08, 0x00]);
    std::fs::write(&original, &bytes).unwrap();
    let size = bytes.len() as u64;
    let reads = ranges_read(&["file", "-b"], &original);
    assert_eq!(
        reads,
        vec![(0, SEVEN), (size - SEVEN, SEVEN)],
        "file(1) no longer reads 7 MiB at each end: revisit the head size advice"
    );

    let mut m = Mounted::new(&[SMALL, &["--head-size", "7M"]].concat());
    std::fs::copy(&original, m.path("big.gz")).unwrap();
    archive_now(&m);
    m.remount();
    let before = media_reads(&m);
    let out = run(Command::new("file").arg("-b").arg(m.path("big.gz")));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("gzip"),
        "{out:?}"
    );
    assert_eq!(
        media_reads(&m),
        before,
        "`file` read the media despite a 7 MiB head and tail"
    );
    // One more byte than the edges hold does go to the media.
    let out = run(Command::new("file")
        .args(["-b", "-P", "bytes=8388608"])
        .arg(m.path("big.gz")));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("gzip"),
        "{out:?}"
    );
    assert!(
        media_reads(&m) > before,
        "reading past the 7 MiB head must read the media"
    );
}
