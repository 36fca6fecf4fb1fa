//! State snapshots on the media: what makes the media self-describing, so that a store can be
//! rebuilt from the media alone (`spinfs recover`) and a damaged manifest from the media
//! (`spinfs fsck --repair`).
//!
//! Every seal and every merge appends, in the same media commit as the layer it makes, one
//! image of kind `State` whose id is that layer's id. It holds:
//!
//! ```text
//! SPINFS-STATE v1 crc32c=XXXXXXXX\n     header line: magic, format version, CRC32C of the body
//! { "manifest": {...}, "config": "..." } JSON body: the manifest as that commit makes it
//!                                          (layers with levels and order, blobs with their
//!                                          media extents, id counters) and the store config
//!                                          (TOML text)
//! ```
//!
//! The media commit makes the layer's images and its snapshot durable together, so the
//! complete snapshot with the highest id describes the newest committed stack (or one layer
//! newer than the SSD manifest, when a crash came between the media commit and the manifest
//! commit: the next start seals that generation again under the same id, which supersedes).
//! Recovery takes the newest snapshot whose every referenced image is complete on the media
//! and matches its recorded whole-image CRC32C, and falls back to older snapshots otherwise.
//! The geometry needed to open the media is in every container header; recovery reads it
//! from the first valid one.

use crate::cache::{HeadCacheWriter, MAX_HEAD_SIZE};
use crate::config::StoreConfig;
use crate::layout::StoreLayout;
use crate::manifest::{ImageRecord, Manifest};
use serde::{Deserialize, Serialize};
use spinfs_erofs::{DeviceReader, FileType, Image};
use spinfs_media::{
    BackendOptions, Catalogue, Geometry, ImageExtents, ImageKind, ImageRef, Medium, MediumReader,
    MediumWriter, ReadOptions,
};
use std::fs;
use std::path::Path;
use std::sync::Arc;

const MAGIC: &str = "SPINFS-STATE";
/// Snapshot format version written by this build.
pub const STATE_VERSION: u32 = 1;

/// A snapshot of the store's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub manifest: Manifest,
    /// The store config as TOML text.
    pub config: String,
}

impl Snapshot {
    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec(self).expect("snapshot serializes");
        let crc = crc32c::crc32c(&body);
        let mut out = format!("{MAGIC} v{STATE_VERSION} crc32c={crc:08x}\n").into_bytes();
        out.extend_from_slice(&body);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Snapshot, String> {
        let nl = bytes
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("no header line")?;
        let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| "header is not text")?;
        let mut parts = header.split(' ');
        if parts.next() != Some(MAGIC) {
            return Err("bad magic".into());
        }
        let version: u32 = parts
            .next()
            .and_then(|v| v.strip_prefix('v'))
            .and_then(|v| v.parse().ok())
            .ok_or("bad version field")?;
        if version != STATE_VERSION {
            return Err(format!(
                "format version {version}; this spinfs reads version {STATE_VERSION}"
            ));
        }
        let crc = parts
            .next()
            .and_then(|c| c.strip_prefix("crc32c="))
            .and_then(|c| u32::from_str_radix(c, 16).ok())
            .ok_or("bad checksum field")?;
        let body = &bytes[nl + 1..];
        if crc32c::crc32c(body) != crc {
            return Err("checksum mismatch".into());
        }
        serde_json::from_slice(body).map_err(|e| format!("bad body: {e}"))
    }
}

/// Appends the snapshot of `manifest` (as the coming commit makes it) as image `state.ID`
/// to the open writer; it becomes durable with the writer's next commit.
pub fn append_snapshot(
    writer: &mut MediumWriter,
    id: u64,
    manifest: &Manifest,
    config: &StoreConfig,
) -> Result<ImageExtents, spinfs_media::MediaError> {
    let mut m = manifest.clone();
    m.sequence += 1;
    let bytes = Snapshot {
        manifest: m,
        config: config.to_toml(),
    }
    .encode();
    writer.begin_image(ImageRef {
        id,
        kind: ImageKind::State,
    })?;
    writer.append(&bytes)?;
    writer.finish_image()
}

/// A snapshot found on the media and checked.
pub struct Found {
    pub id: u64,
    pub snapshot: Snapshot,
    /// Snapshots newer than this one that were skipped, with why.
    pub skipped: Vec<String>,
}

/// Finds the newest snapshot whose every referenced image is complete on the media and
/// intact (whole-image CRC32C), falling back to older ones. With `read_all`, every byte of
/// every referenced image is read and checked; without, the catalogue's records are trusted
/// for blobs (meta images are always read).
pub fn newest_snapshot(
    medium: &Arc<Medium>,
    cat: &Catalogue,
    read_all: bool,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<Found, String> {
    let reader = MediumReader::new(medium.clone(), None);
    let mut states: Vec<&ImageExtents> = cat
        .images
        .values()
        .filter(|e| e.image.kind == ImageKind::State)
        .collect();
    states.sort_by_key(|e| std::cmp::Reverse(e.image.id));
    if states.is_empty() {
        return Err(format!(
            "the media {} holds no state snapshot (nothing archived yet, or written by a \
             spinfs without snapshots)",
            medium.uri()
        ));
    }
    let mut skipped = Vec::new();
    for e in states {
        match check_snapshot(&reader, cat, e, read_all, progress) {
            Ok(snapshot) => {
                return Ok(Found {
                    id: e.image.id,
                    snapshot,
                    skipped,
                });
            }
            Err(why) => skipped.push(format!("{}: {why}", e.image)),
        }
    }
    Err(format!(
        "no intact state snapshot on the media: {}",
        skipped.join("; ")
    ))
}

fn read_whole(reader: &MediumReader, e: &ImageExtents) -> Result<Vec<u8>, String> {
    let b = reader
        .read(e, 0, e.length, ReadOptions::default())
        .map_err(|x| x.to_string())?;
    if crc32c::crc32c(&b) != e.crc {
        return Err(format!("{}: whole-image checksum mismatch", e.image));
    }
    Ok(b)
}

fn check_snapshot(
    reader: &MediumReader,
    cat: &Catalogue,
    e: &ImageExtents,
    read_all: bool,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<Snapshot, String> {
    let snap = Snapshot::decode(&read_whole(reader, e)?)?;
    let m = &snap.manifest;
    let mut wanted: Vec<(&ImageRecord, ImageKind)> = Vec::new();
    for l in &m.layers {
        wanted.push((&l.meta, ImageKind::Meta));
        for d in &l.devices {
            let b = m
                .blobs
                .iter()
                .find(|b| b.id == *d)
                .ok_or_else(|| format!("layer {} references blob {d}, which it lacks", l.id))?;
            wanted.push((b, ImageKind::Blob));
        }
    }
    let total: u64 = wanted.iter().map(|(r, _)| r.length).sum();
    let mut done = 0;
    for (rec, kind) in wanted {
        let image = ImageRef { id: rec.id, kind };
        let on = cat
            .images
            .get(&image)
            .ok_or_else(|| format!("{image} is not complete on the media"))?;
        let ours = rec.to_extents(kind);
        if on.length != rec.length || on.crc != rec.crc {
            return Err(format!(
                "{image} on the media differs from the snapshot's record"
            ));
        }
        if on.extents != ours.extents {
            return Err(format!(
                "{image} lies elsewhere on the media than the snapshot records"
            ));
        }
        if read_all || kind == ImageKind::Meta {
            // Read in pieces so memory stays bounded for large blobs.
            let mut crc = 0u32;
            let mut at = 0u64;
            while at < rec.length {
                let n = (8u64 << 20).min(rec.length - at);
                let b = reader
                    .read(&ours, at, n, ReadOptions::default())
                    .map_err(|x| x.to_string())?;
                crc = crc32c::crc32c_append(crc, &b);
                at += n;
                done += n;
                progress("verifying images", done, total);
            }
            if crc != rec.crc {
                return Err(format!("{image}: whole-image checksum mismatch"));
            }
        }
    }
    Ok(snap)
}

/// The highest image id on the media (complete or not), so that new ids never reuse one.
fn max_media_id(cat: &Catalogue) -> u64 {
    let complete = cat.images.keys().map(|i| i.id).max().unwrap_or(0);
    let partial = cat.incomplete.iter().map(|i| i.image.id).max().unwrap_or(0);
    complete.max(partial)
}

/// Rebuilds the manifest of the store at `layout` from the newest intact snapshot on the
/// media and the generations on the SSD, and commits it. Returns it with a description of
/// what was done.
///
/// Media without a single complete image, and without damage that could hide one, never
/// had a commit (every commit completes its images and carries a snapshot): then there are
/// no layers, and the manifest is rebuilt from the SSD alone, under a new store id (a crash
/// before the first seal committed, then a damaged manifest).
pub fn rebuild_manifest(
    layout: &StoreLayout,
    medium: &Arc<Medium>,
    cat: &Catalogue,
) -> Result<(Manifest, String), String> {
    let (mut m, from, skipped) = if cat.images.is_empty() && cat.problems.is_empty() {
        let id = crate::store::random_id().map_err(|e| e.to_string())?;
        (
            Manifest::new(id),
            "manifest rebuilt from the SSD (nothing committed to the media yet; new store id)"
                .to_string(),
            Vec::new(),
        )
    } else {
        let found = newest_snapshot(medium, cat, false, &mut |_, _, _| {})?;
        let from = format!(
            "manifest rebuilt from state snapshot {} on the media",
            found.id
        );
        (found.snapshot.manifest, from, found.skipped)
    };
    let sealed: std::collections::HashSet<u64> = m
        .layers
        .iter()
        .flat_map(|l| l.generations.iter().copied())
        .collect();
    let mut gens: Vec<u64> = fs::read_dir(layout.gens())
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| u64::from_str_radix(n, 16).ok())
                })
                .collect()
        })
        .unwrap_or_default();
    gens.sort();
    let live: Vec<u64> = gens
        .iter()
        .copied()
        .filter(|g| !sealed.contains(g) && layout.generation_tree(*g).is_dir())
        .collect();
    let max_gen = gens.iter().copied().max().unwrap_or(0);
    m.next_gen = m.next_gen.max(max_gen + 1);
    m.next_layer = m.next_layer.max(max_media_id(cat) + 1);
    m.frozen = None;
    let mut text = format!("{from} ({} layers)", m.layers.len());
    match live.as_slice() {
        [] => {
            m.upper_gen = m.next_gen;
            m.next_gen += 1;
            fs::create_dir_all(layout.generation_tree(m.upper_gen))
                .map_err(|e| format!("cannot create a writable generation: {e}"))?;
            text.push_str(&format!(", new empty writable generation {}", m.upper_gen));
        }
        [.., older, upper] => {
            m.upper_gen = *upper;
            m.frozen = Some(crate::manifest::FrozenGen {
                generation: *older,
                layer: m.next_layer,
            });
            m.next_layer += 1;
            text.push_str(&format!(
                ", writable generation {upper}, generation {older} frozen for sealing"
            ));
        }
        [upper] => {
            m.upper_gen = *upper;
            text.push_str(&format!(", writable generation {upper}"));
        }
    }
    if !skipped.is_empty() {
        text.push_str(&format!(
            " (newer snapshots skipped: {})",
            skipped.join("; ")
        ));
    }
    m.commit(&layout.manifest())
        .map_err(|e| format!("cannot write the manifest: {e}"))?;
    Ok((m, text))
}

/// Reads the geometry of the medium at `uri` from its first valid container header.
pub fn probe_geometry(uri: &str) -> Result<Geometry, String> {
    let guess = StoreConfig::default();
    let opts = BackendOptions {
        read_only: true,
        ..BackendOptions::default()
    };
    let backend =
        spinfs_media::open_backend(uri, guess.container_size, opts).map_err(|e| e.to_string())?;
    let slots = backend.container_slots().map_err(|e| e.to_string())?;
    // Container 0 sits at offset 0 whatever the container size; later containers of a
    // `file:` medium sit at multiples of the (unknown) size, so only `dir:` media are probed
    // beyond container 0.
    let probe = if uri.starts_with("dir:") {
        slots
    } else {
        slots.min(1)
    };
    for i in 0..probe {
        let mut blk = spinfs_media::buf::AlignedBuf::zeroed(4096);
        if backend.read_at(i, 0, &mut blk).unwrap_or(0) < 4096 {
            continue;
        }
        if let Ok(h) = spinfs_media::layout::ContainerHeader::decode(&blk) {
            return Ok(h.geometry);
        }
    }
    Err(format!(
        "{uri} holds no spinfs media (no valid container header)"
    ))
}

/// What `recover` rebuilt.
pub struct Recovered {
    pub snapshot: u64,
    pub layers: usize,
    pub skipped: Vec<String>,
    pub heads_missing: Vec<String>,
}

/// `spinfs recover --media URI STORE`: rebuilds a store in `root` (missing or empty) from the
/// media alone. Nothing is left in `root` when it fails.
pub fn recover(
    uri: &str,
    root: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<Recovered, String> {
    let created = match fs::read_dir(root) {
        Ok(mut d) => {
            if d.next().is_some() {
                return Err(format!(
                    "store directory {} exists and is not empty (recover writes a new store)",
                    root.display()
                ));
            }
            false
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(format!("cannot read {}: {e}", root.display())),
    };
    let geometry = probe_geometry(uri)?;
    let medium = Medium::open(
        uri,
        geometry,
        BackendOptions {
            read_only: true,
            ..BackendOptions::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let cat = Catalogue::scan(&medium, &mut |d, t| progress("media scan", d, t))
        .map_err(|e| e.to_string())?;
    let found = newest_snapshot(&medium, &cat, true, progress)?;
    let mut config = StoreConfig::parse(&found.snapshot.config, Path::new("state snapshot"))
        .map_err(|e| format!("the snapshot's configuration: {e}"))?;
    // The store records its medium by absolute path (the daemon's working directory is /).
    config.media = match uri.split_once(':') {
        Some((scheme, p)) if !p.starts_with('/') => format!(
            "{scheme}:{}",
            std::path::absolute(p)
                .map_err(|e| format!("{uri}: {e}"))?
                .display()
        ),
        _ => uri.to_string(),
    };
    config.validate().map_err(|e| e.to_string())?;
    let g = config.geometry().map_err(|e| e.to_string())?;
    if g != geometry {
        return Err(format!(
            "the snapshot's configuration describes geometry {g:?}, the media has {geometry:?}"
        ));
    }
    let result = write_store(root, &config, &found, &medium, &cat, progress);
    if result.is_err() {
        if created {
            let _ = fs::remove_dir_all(root);
        } else if let Ok(d) = fs::read_dir(root) {
            for e in d.flatten() {
                let p = e.path();
                let _ = if p.is_dir() {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
            }
        }
    }
    result
}

fn write_store(
    root: &Path,
    config: &StoreConfig,
    found: &Found,
    medium: &Arc<Medium>,
    cat: &Catalogue,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<Recovered, String> {
    let io = |what: &str, p: &Path, e: std::io::Error| format!("{what} {}: {e}", p.display());
    fs::create_dir_all(root).map_err(|e| io("cannot create", root, e))?;
    let layout = StoreLayout::new(std::path::absolute(root).map_err(|e| io("", root, e))?);
    let mut m = found.snapshot.manifest.clone();
    m.frozen = None;
    m.upper_gen = m.next_gen.max(m.upper_gen + 1);
    m.next_gen = m.upper_gen + 1;
    m.next_layer = m.next_layer.max(max_media_id(cat) + 1);
    m.sequence = 0;
    let reader = MediumReader::new(medium.clone(), None);
    fs::create_dir_all(layout.layers()).map_err(|e| io("cannot create", &layout.layers(), e))?;
    let mut heads_missing = Vec::new();
    let n = m.layers.len() as u64;
    for (i, l) in m.layers.iter().enumerate() {
        progress("restoring layers", i as u64, n);
        let meta = read_whole(&reader, &l.meta.to_extents(ImageKind::Meta))?;
        crate::seal::publish_meta(&layout, l.id, &meta)
            .map_err(|e| io("cannot write", &layout.layer_meta(l.id), e))?;
        if config.head_size > 0 {
            let devices: Vec<ImageExtents> = l
                .devices
                .iter()
                .filter_map(|d| m.blobs.iter().find(|b| b.id == *d))
                .map(|b| b.to_extents(ImageKind::Blob))
                .collect();
            let missing = write_heads(
                &layout.layer_heads(l.id),
                l.id,
                config.head_size,
                &meta,
                &reader,
                &devices,
                None,
            )?;
            heads_missing.extend(missing.into_iter().map(|p| format!("layer {}: {p}", l.id)));
        }
    }
    progress("restoring layers", n, n);
    let tree = layout.generation_tree(m.upper_gen);
    fs::create_dir_all(&tree).map_err(|e| io("cannot create", &tree, e))?;
    if let Some(newest) = m.layers.last() {
        let meta = fs::read(layout.layer_meta(newest.id))
            .map_err(|e| io("cannot read", &layout.layer_meta(newest.id), e))?;
        root_attributes_from_image(&meta, &tree)?;
    }
    let cfg = layout.config();
    fs::File::create(&cfg)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, config.to_toml().as_bytes())?;
            f.sync_all()
        })
        .map_err(|e| io("cannot write", &cfg, e))?;
    m.commit(&layout.manifest())
        .map_err(|e| format!("cannot write the manifest: {e}"))?;
    Ok(Recovered {
        snapshot: found.id,
        layers: m.layers.len(),
        skipped: found.skipped.clone(),
        heads_missing,
    })
}

/// Blob devices read straight from the media.
pub(crate) struct MediaDevices<'a> {
    pub reader: &'a MediumReader,
    pub devices: &'a [ImageExtents],
}

impl DeviceReader for MediaDevices<'_> {
    fn read_device(&self, device: u16, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let Some(ext) = (device as usize)
            .checked_sub(1)
            .and_then(|i| self.devices.get(i))
        else {
            return Err(std::io::Error::other(format!(
                "no blob for device {device}"
            )));
        };
        let data = self
            .reader
            .read(ext, offset, buf.len() as u64, ReadOptions::default())
            .map_err(std::io::Error::other)?;
        buf.copy_from_slice(&data);
        Ok(())
    }
}

/// Writes the head cache of a layer from its meta image and the media: the first
/// `head_size` bytes of every regular file, keyed by inode number. Returns the paths whose
/// head could not be read (damaged blob data).
pub(crate) fn write_heads(
    path: &Path,
    layer: u64,
    head_size: u64,
    meta: &[u8],
    reader: &MediumReader,
    devices: &[ImageExtents],
    old: Option<&crate::cache::HeadCache>,
) -> Result<Vec<String>, String> {
    let image = Image::open(meta).map_err(|e| format!("meta image of layer {layer}: {e}"))?;
    let head = head_size.min(MAX_HEAD_SIZE);
    let mut w = HeadCacheWriter::create(path, layer, head).map_err(|e| e.to_string())?;
    let devs = MediaDevices { reader, devices };
    let mut seen = std::collections::HashSet::new();
    let mut buf = vec![0u8; head as usize];
    let mut missing = Vec::new();
    let mut err = None;
    image
        .walk(|p, _, ino| {
            if ino.file_type != FileType::File || !seen.insert(ino.nid) {
                return Ok(());
            }
            let Some(key) = image.spinfs_ino(ino)? else {
                return Ok(());
            };
            let want = (ino.size as usize).min(buf.len());
            let head = match image.read_data(ino, 0, &mut buf[..want], &devs) {
                Ok(_) => Some(&buf[..want]),
                // The media copy is damaged: keep the old cache's head if it is intact.
                Err(_) => match old.map(|c| c.get(key)) {
                    Some(Ok(Some(h))) if h.len() == want => {
                        buf[..want].copy_from_slice(&h);
                        Some(&buf[..want])
                    }
                    _ => None,
                },
            };
            match head {
                Some(h) => {
                    if let Err(e) = w.add(key, h) {
                        err.get_or_insert(e.to_string());
                    }
                }
                None => missing.push(String::from_utf8_lossy(p).into_owned()),
            }
            Ok(())
        })
        .map_err(|e| format!("meta image of layer {layer}: {e}"))?;
    if let Some(e) = err {
        return Err(e);
    }
    w.finish().map_err(|e| e.to_string())?;
    Ok(missing)
}

/// Gives a new writable tree's root the attributes of the newest layer's root (mode, owner,
/// mtime, the user's xattrs): the writable root is the root users see.
fn root_attributes_from_image(meta: &[u8], tree: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let image = Image::open(meta).map_err(|e| e.to_string())?;
    let root = image.root().map_err(|e| e.to_string())?;
    std::os::unix::fs::chown(tree, Some(root.uid), Some(root.gid))
        .map_err(|e| format!("cannot chown {}: {e}", tree.display()))?;
    fs::set_permissions(tree, fs::Permissions::from_mode(root.mode as u32 & 0o7777))
        .map_err(|e| format!("cannot chmod {}: {e}", tree.display()))?;
    for (name, value) in image.raw_xattrs(&root).map_err(|e| e.to_string())? {
        let internal = name.starts_with(crate::markers::INTERNAL_PREFIX)
            && !name.starts_with(crate::markers::ESCAPED_PREFIX);
        if internal {
            continue;
        }
        let dir = fs::File::open(tree).map_err(|e| format!("{}: {e}", tree.display()))?;
        let cname = std::ffi::CString::new(name)
            .map_err(|_| "xattr name with NUL in the image".to_string())?;
        crate::sys::setxattr_fd(std::os::fd::AsFd::as_fd(&dir), &cname, &value, 0)
            .map_err(|e| format!("cannot set xattr on {}: {e:?}", tree.display()))?;
    }
    let mtime =
        std::time::UNIX_EPOCH + std::time::Duration::new(root.mtime.max(0) as u64, root.mtime_nsec);
    fs::File::open(tree)
        .and_then(|f| f.set_times(fs::FileTimes::new().set_modified(mtime).set_accessed(mtime)))
        .map_err(|e| format!("cannot set times on {}: {e}", tree.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap() -> Snapshot {
        let mut m = Manifest::new("0123456789abcdef".into());
        m.layers.push(crate::manifest::LayerRecord {
            id: 3,
            meta: ImageRecord {
                id: 3,
                length: 8192,
                crc: 7,
                extents: vec![(0, 65536, 8192, 0)],
            },
            devices: vec![2],
            generations: vec![4, 5],
            files: 10,
            bytes: 1000,
            level: 1,
        });
        Snapshot {
            manifest: m,
            config: StoreConfig::default().to_toml(),
        }
    }

    #[test]
    fn round_trip_and_every_bit_flip_is_caught() {
        let s = snap();
        let bytes = s.encode();
        assert_eq!(Snapshot::decode(&bytes).unwrap(), s);
        for i in (0..bytes.len()).step_by(7) {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                if let Ok(d) = Snapshot::decode(&b) {
                    assert_eq!(d, s, "flip at byte {i} bit {bit} changed the snapshot");
                }
            }
        }
        for len in 0..bytes.len() {
            assert!(Snapshot::decode(&bytes[..len]).is_err(), "len {len}");
        }
        let other = String::from_utf8(bytes)
            .unwrap()
            .replacen(" v1 ", " v2 ", 1);
        assert!(
            Snapshot::decode(other.as_bytes())
                .unwrap_err()
                .contains("format version 2")
        );
    }
}
