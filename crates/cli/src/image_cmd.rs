//! `spinfs image ...` subcommands: build, merge, list and read EROFS image pairs on their own,
//! the way mkfs.erofs and friends are used.

use anyhow::{Context, bail};
use spinfs_erofs::reader::FileType;
use spinfs_erofs::{Blobs, Image, MergeMode, WriteOptions};
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Subcommand)]
pub enum ImageCmd {
    /// Build a meta image and its blob from a directory tree.
    Build {
        /// Directory to archive.
        src_dir: PathBuf,
        /// Meta image to write.
        meta: PathBuf,
        /// Blob (file data) to write.
        blob: PathBuf,
        /// Chunk size: a power of two from 4K to 1G (K/M/G suffixes).
        #[arg(long, default_value = "4M")]
        chunk_size: String,
    },
    /// Merge meta images, newest first (as overlayfs lowerdir=newest:...:oldest), into one
    /// that references the original blobs.
    Merge {
        /// Merged meta image to write.
        out_meta: PathBuf,
        /// Input meta images, newest first.
        #[arg(required = true)]
        metas: Vec<PathBuf>,
        /// The merge reaches the bottom layer: drop whiteouts and opaque markers.
        #[arg(long)]
        strip_overlay: bool,
    },
    /// List a directory of a meta image (or show one entry), like `ls -l`.
    Ls {
        meta: PathBuf,
        /// Path inside the image (default: the root).
        path: Option<String>,
    },
    /// Write a file's contents to standard output.
    Cat {
        meta: PathBuf,
        /// Blob devices in order (repeat for merged images).
        #[arg(long = "device", required = true)]
        devices: Vec<PathBuf>,
        /// Path inside the image.
        path: String,
    },
}

pub fn run(cmd: ImageCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCmd::Build {
            src_dir,
            meta,
            blob,
            chunk_size,
        } => build(&src_dir, &meta, &blob, &chunk_size),
        ImageCmd::Merge {
            out_meta,
            metas,
            strip_overlay,
        } => merge(&out_meta, &metas, strip_overlay),
        ImageCmd::Ls { meta, path } => ls(&meta, path.as_deref().unwrap_or("/")),
        ImageCmd::Cat {
            meta,
            devices,
            path,
        } => cat(&meta, &devices, &path),
    }
}

fn open_image(path: &Path) -> anyhow::Result<Image<File>> {
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    Image::open(f).with_context(|| format!("{}", path.display()))
}

/// The tag stored for a blob: its absolute path when it fits (the kernel then finds it
/// without `device=`), else its file name.
fn blob_tag(blob: &Path) -> Vec<u8> {
    let abs = std::path::absolute(blob).unwrap_or_else(|_| blob.to_path_buf());
    let bytes = abs.as_os_str().as_bytes();
    if bytes.len() < 64 {
        return bytes.to_vec();
    }
    let name = blob.file_name().map_or(&b"blob"[..], |n| n.as_bytes());
    name[..name.len().min(63)].to_vec()
}

fn build(src: &Path, meta: &Path, blob: &Path, chunk_size: &str) -> anyhow::Result<ExitCode> {
    let size = spinfs_store::parse_size(chunk_size)
        .map_err(|_| anyhow::anyhow!("--chunk-size {chunk_size:?}: not a size"))?;
    let chunk_bits = spinfs_erofs::chunk_bits_for_size(size)
        .map_err(|e| anyhow::anyhow!("--chunk-size {chunk_size}: {e}"))?;
    if !src.is_dir() {
        bail!("{}: not a directory", src.display());
    }
    let tree = spinfs_erofs::fromdir::tree_from_dir(src)
        .with_context(|| format!("cannot scan {}", src.display()))?;
    let opts = WriteOptions {
        chunk_bits,
        new_blob_tag: blob_tag(blob),
        ..WriteOptions::default()
    };
    let mut blob_file =
        File::create(blob).with_context(|| format!("cannot create {}", blob.display()))?;
    let mut meta_file =
        File::create(meta).with_context(|| format!("cannot create {}", meta.display()))?;
    let summary = spinfs_erofs::write_image(&tree, &opts, &mut meta_file, Some(&mut blob_file))
        .with_context(|| format!("cannot build {} from {}", meta.display(), src.display()))?;
    blob_file
        .sync_all()
        .with_context(|| format!("cannot write {}", blob.display()))?;
    meta_file
        .sync_all()
        .with_context(|| format!("cannot write {}", meta.display()))?;
    println!(
        "{}: {} inodes, {} bytes; {}: {} bytes ({} chunks, {} holes, {} duplicates)",
        meta.display(),
        summary.inodes,
        summary.meta_bytes,
        blob.display(),
        summary.blob_bytes,
        summary.data_chunks,
        summary.hole_chunks,
        summary.dedup_chunks
    );
    Ok(ExitCode::SUCCESS)
}

fn merge(out: &Path, metas: &[PathBuf], strip: bool) -> anyhow::Result<ExitCode> {
    let images = metas
        .iter()
        .map(|m| open_image(m))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mode = if strip {
        MergeMode::StripOverlay
    } else {
        MergeMode::KeepOverlay
    };
    let mut f = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let summary = spinfs_erofs::merge_images(&images, mode, &WriteOptions::default(), &mut f)
        .with_context(|| format!("cannot merge into {}", out.display()))?;
    f.sync_all()
        .with_context(|| format!("cannot write {}", out.display()))?;
    println!(
        "{}: {} inodes, {} bytes, {} devices (mount with one device= per line, in order):",
        out.display(),
        summary.write.inodes,
        summary.write.meta_bytes,
        summary.devices.len()
    );
    for (i, d) in summary.devices.iter().enumerate() {
        println!(
            "device {}: {} device {} ({} blocks, tag {})",
            i + 1,
            metas[d.layer].display(),
            d.layer_device,
            d.blocks,
            String::from_utf8_lossy(&d.tag)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn ls(meta: &Path, path: &str) -> anyhow::Result<ExitCode> {
    let img = open_image(meta)?;
    let ino = img
        .resolve(path.as_bytes())
        .with_context(|| format!("{}: {path}", meta.display()))?;
    let mut out = std::io::stdout().lock();
    if !ino.is_dir() {
        print_entry(&img, &mut out, path.as_bytes(), &ino)?;
        return Ok(ExitCode::SUCCESS);
    }
    // Streamed block by block: memory stays flat for directories of millions of entries.
    let entries = img
        .read_dir(&ino)
        .with_context(|| format!("{}: {path}", meta.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("{}: {path}", meta.display()))?;
        let child = img
            .inode(e.nid)
            .with_context(|| format!("{}: {path}", meta.display()))?;
        print_entry(&img, &mut out, &e.name, &child)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_entry(
    img: &Image<File>,
    out: &mut impl Write,
    name: &[u8],
    ino: &spinfs_erofs::Inode,
) -> anyhow::Result<()> {
    let mut perms = String::new();
    perms.push(ino.file_type.letter());
    for shift in [6, 3, 0] {
        let bits = (ino.mode >> shift) & 7;
        perms.push(if bits & 4 != 0 { 'r' } else { '-' });
        perms.push(if bits & 2 != 0 { 'w' } else { '-' });
        perms.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    let size = match ino.file_type {
        FileType::CharDev | FileType::BlockDev => format!(
            "{}, {}",
            spinfs_erofs::ondisk::dev_major(ino.rdev),
            spinfs_erofs::ondisk::dev_minor(ino.rdev)
        ),
        _ => ino.size.to_string(),
    };
    write!(
        out,
        "{perms} {:>3} {:>5} {:>5} {:>12} {}.{:09} ",
        ino.nlink, ino.uid, ino.gid, size, ino.mtime, ino.mtime_nsec
    )?;
    out.write_all(name)?;
    if ino.file_type == FileType::Symlink {
        out.write_all(b" -> ")?;
        out.write_all(&img.readlink(ino)?)?;
    }
    out.write_all(b"\n")?;
    Ok(())
}

fn cat(meta: &Path, devices: &[PathBuf], path: &str) -> anyhow::Result<ExitCode> {
    let img = open_image(meta)?;
    if devices.len() != img.devices().len() {
        bail!(
            "{} has {} blob device(s); {} --device given",
            meta.display(),
            img.devices().len(),
            devices.len()
        );
    }
    let blobs = Blobs(
        devices
            .iter()
            .map(|d| File::open(d).with_context(|| format!("cannot open {}", d.display())))
            .collect::<anyhow::Result<Vec<_>>>()?,
    );
    let ino = img
        .resolve(path.as_bytes())
        .with_context(|| format!("{}: {path}", meta.display()))?;
    if ino.file_type != FileType::File {
        bail!("{}: {path}: not a regular file", meta.display());
    }
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < ino.size {
        let n = img
            .read_data(&ino, pos, &mut buf, &blobs)
            .with_context(|| format!("{}: {path}: read at {pos}", meta.display()))?;
        if n == 0 {
            break;
        }
        if let Err(e) = out.write_all(&buf[..n]) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(ExitCode::SUCCESS);
            }
            return Err(e).context("write to standard output");
        }
        pos += n as u64;
    }
    out.flush().context("write to standard output")?;
    Ok(ExitCode::SUCCESS)
}
