//! `spinfs fsck STORE [--repair]`: checks a store end to end and repairs what can be repaired
//! without losing data.
//!
//! What is checked, in order:
//! 1. the manifest (magic, version, CRC32C); when damaged, `--repair` rebuilds it from the
//!    newest intact state snapshot on the media (see `state`) and the SSD's generations;
//! 2. the media: every container header and record log (catalogue scan), every recorded
//!    object's CRC32C, and for every image the manifest references: that the media holds it
//!    complete, where the manifest says, and that its objects' CRCs combine to the
//!    whole-image CRC32C the manifest recorded;
//! 3. every archived layer: its SSD meta image against the manifest's length and CRC32C
//!    (`--repair` restores it from the media copy), its device table against the manifest's
//!    blobs, and its whole tree through the reader's validation (every directory, inode,
//!    xattr, symlink and chunk index within device bounds), inode numbers unique in the
//!    layer; damaged blob objects and meta ranges are mapped to the paths they affect;
//!    its head cache (header, fence, every index block and head, the padding before the
//!    index; `--repair` rebuilds it from the meta image and the media);
//! 4. the writable (and frozen) generation trees: recorded inode numbers well-formed and
//!    unique;
//! 5. the chunk cache: every entry's header and data CRC32C (`--repair` drops damaged
//!    entries: they are fetched again from the media on demand);
//! 6. orphans: generation trees, `layers/*` files, work and temp leftovers, cache entries of
//!    images the manifest does not reference (`--repair` removes them).
//!
//! fsck needs the store to itself: it takes the store lock, so it refuses a mounted store
//! (a check beside a running daemon would race with seals and merges and report their
//! in-flight files as orphans). It never writes to the media.

use crate::cache::HeadCache;
use crate::config::{ConfigError, StoreConfig};
use crate::layout::StoreLayout;
use crate::manifest::{ImageRecord, LayerRecord, Manifest};
use crate::markers::INO_XATTR;
use crate::store::{StoreError, take_lock};
use spinfs_erofs::{FileType, Image, Inode, ReadAt};
use spinfs_media::layout::Record;
use spinfs_media::{
    BackendOptions, Catalogue, ImageExtents, ImageKind, ImageRef, Medium, MediumReader, ReadOptions,
};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Exit status: nothing wrong.
pub const EXIT_CLEAN: u8 = 0;
/// Exit status: problems were found and every one was repaired (`--repair` only).
pub const EXIT_REPAIRED: u8 = 1;
/// Exit status: problems remain (found without `--repair`, or not repairable).
pub const EXIT_PROBLEMS: u8 = 4;
/// Exit status: fsck could not run (not a store, in use, unreadable configuration).
pub const EXIT_FAILED: u8 = 8;

/// Paths named per damaged range before "and N more".
const MAX_PATHS: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum FsckError {
    #[error("store {0} does not exist")]
    Missing(PathBuf),
    #[error("{0} is not a spinfs store (no spinfs.toml)")]
    NotAStore(PathBuf),
    #[error(
        "store {path} is in use by process {pid} (mounted?): unmount it first, fsck needs the \
         store to itself"
    )]
    Busy { path: PathBuf, pid: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Store(StoreError),
    #[error("media {uri}: {error}")]
    Media {
        uri: String,
        error: spinfs_media::MediaError,
    },
}

/// What kind of line a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Something is damaged or inconsistent.
    Damage,
    /// Something is left over that nothing references.
    Orphan,
    /// `--repair` fixed the finding before it.
    Repaired,
    /// `--repair` could not fix the finding before it (data is lost or unreachable).
    Unrepairable,
    /// Information, not a problem.
    Note,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Damage => "damage",
            Kind::Orphan => "orphan",
            Kind::Repaired => "repaired",
            Kind::Unrepairable => "cannot repair",
            Kind::Note => "note",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Finding {
    pub kind: Kind,
    pub text: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.label(), self.text)
    }
}

/// Everything fsck found and did.
#[derive(Debug, Clone, Default)]
pub struct FsckReport {
    pub findings: Vec<Finding>,
    /// Counters of what was checked.
    pub layers: u64,
    pub inodes: u64,
    pub media_objects: u64,
    pub media_bytes: u64,
    pub cache_entries: u64,
    pub heads: u64,
}

impl FsckReport {
    /// Problems found (damage and orphans).
    pub fn problems(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| matches!(f.kind, Kind::Damage | Kind::Orphan))
            .count()
    }

    pub fn repaired(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.kind == Kind::Repaired)
            .count()
    }

    /// The exit status (see the `EXIT_*` constants).
    pub fn exit_code(&self, repair: bool) -> u8 {
        let problems = self.problems();
        if problems == 0 {
            return EXIT_CLEAN;
        }
        let unrepairable = self.findings.iter().any(|f| f.kind == Kind::Unrepairable);
        if repair && !unrepairable && self.repaired() > 0 {
            EXIT_REPAIRED
        } else {
            EXIT_PROBLEMS
        }
    }
}

/// How fsck runs.
pub struct FsckOptions<'a> {
    pub repair: bool,
    /// Called as work proceeds: (phase, done, total).
    pub progress: &'a mut dyn FnMut(&str, u64, u64),
}

/// Checks (and with `repair`, repairs) the store at `root`.
pub fn fsck(root: &Path, opts: FsckOptions<'_>) -> Result<FsckReport, FsckError> {
    if !root.exists() {
        return Err(FsckError::Missing(root.to_path_buf()));
    }
    let layout = StoreLayout::new(std::path::absolute(root).unwrap_or(root.to_path_buf()));
    if !layout.config().is_file() {
        return Err(FsckError::NotAStore(root.to_path_buf()));
    }
    let config = StoreConfig::load(layout.root())?;
    let _lock = take_lock(&layout).map_err(|e| match e {
        StoreError::Busy { path, pid } => FsckError::Busy { path, pid },
        e => FsckError::Store(e),
    })?;
    let uri = config.media.clone();
    let media_err = |error| FsckError::Media {
        uri: uri.clone(),
        error,
    };
    let geometry = config.geometry().map_err(media_err)?;
    let medium = Medium::open(
        &config.media,
        geometry,
        BackendOptions {
            read_only: true,
            ..BackendOptions::default()
        },
    )
    .map_err(media_err)?;
    let mut f = Fsck {
        layout,
        config,
        medium: medium.clone(),
        reader: MediumReader::new(medium, None),
        repair: opts.repair,
        progress: opts.progress,
        report: FsckReport::default(),
        objects: HashMap::new(),
        catalogue: Catalogue::default(),
    };
    f.run()?;
    Ok(f.report)
}

/// A recorded object on the media.
struct ObjectInfo {
    image: ImageRef,
    image_offset: u64,
    len: u64,
    crc: u32,
    damage: Option<String>,
}

/// A damaged byte range of an image: (offset, length, what).
type DamagedRange = (u64, u64, String);
/// Per inode, the damaged ranges it touches: meta range indexes, (device, range index).
type Touched = HashMap<u64, (Vec<usize>, Vec<(usize, usize)>)>;
/// Identity of a visible object: (0 = tree / 1 = layer, generation or layer id, inode).
type Ident = (u64, u64, u64);

/// What the media says about one image the manifest references.
#[derive(Default)]
struct MediaImage {
    /// The media copy can be read whole and matches the manifest's CRC.
    intact: bool,
    damaged: Vec<DamagedRange>,
}

struct Fsck<'a> {
    layout: StoreLayout,
    config: StoreConfig,
    medium: Arc<Medium>,
    reader: MediumReader,
    repair: bool,
    progress: &'a mut dyn FnMut(&str, u64, u64),
    report: FsckReport,
    objects: HashMap<(u64, u64), ObjectInfo>,
    catalogue: Catalogue,
}

impl Fsck<'_> {
    fn push(&mut self, kind: Kind, text: impl Into<String>) {
        self.report.findings.push(Finding {
            kind,
            text: text.into(),
        });
    }

    fn fixed(&mut self, text: impl Into<String>) {
        self.push(Kind::Repaired, text);
    }

    fn cannot(&mut self, text: impl Into<String>) {
        self.push(Kind::Unrepairable, text);
    }

    fn run(&mut self) -> Result<(), FsckError> {
        self.scan_media()?;
        let manifest_path = self.layout.manifest();
        let manifest = match Manifest::load(&manifest_path) {
            Ok(m) => Some(m),
            // Written by a newer spinfs: not damage; this build must not touch the store.
            Err(e @ crate::manifest::ManifestError::Version { .. }) => {
                return Err(FsckError::Store(StoreError::Manifest(e)));
            }
            Err(crate::manifest::ManifestError::Io { path, error })
                if error.kind() != std::io::ErrorKind::NotFound =>
            {
                return Err(FsckError::Store(StoreError::Manifest(
                    crate::manifest::ManifestError::Io { path, error },
                )));
            }
            Err(e) => {
                self.push(Kind::Damage, e.to_string());
                if self.repair {
                    match crate::state::rebuild_manifest(
                        &self.layout,
                        &self.medium,
                        &self.catalogue,
                    ) {
                        Ok((m, text)) => {
                            self.fixed(text);
                            Some(m)
                        }
                        Err(e) => {
                            self.cannot(format!(
                                "the manifest cannot be rebuilt from the media: {e}"
                            ));
                            None
                        }
                    }
                } else {
                    self.push(
                        Kind::Note,
                        "run `spinfs fsck --repair` to rebuild the manifest from the media's \
                         state snapshots",
                    );
                    None
                }
            }
        };
        let Some(manifest) = manifest else {
            self.check_unreferenced_media(&HashSet::new());
            return Ok(());
        };
        if let Some(fr) = &manifest.frozen {
            self.push(
                Kind::Note,
                format!(
                    "generation {} is frozen, to be sealed into layer {} at the next mount",
                    fr.generation, fr.layer
                ),
            );
        }
        let referenced = self.check_manifest_images(&manifest);
        self.check_unreferenced_media(&referenced);
        let n = manifest.layers.len() as u64;
        for (i, rec) in manifest.layers.iter().enumerate() {
            (self.progress)("layers", i as u64, n);
            self.check_layer(&manifest, rec);
        }
        (self.progress)("layers", n, n);
        self.check_trees(&manifest);
        self.check_visible_numbers(&manifest);
        self.check_orphans(&manifest);
        self.check_chunk_cache(&manifest)?;
        Ok(())
    }

    /// Scans the catalogue and reads every recorded object, checking its CRC32C.
    fn scan_media(&mut self) -> Result<(), FsckError> {
        let uri = self.config.media.clone();
        let media_err = |error| FsckError::Media {
            uri: uri.clone(),
            error,
        };
        let progress = &mut *self.progress;
        let cat = Catalogue::scan(&self.medium, &mut |d, t| progress("media scan", d, t))
            .map_err(media_err)?;
        for p in &cat.problems {
            self.report.findings.push(Finding {
                kind: Kind::Damage,
                text: format!("media {}: {p}", self.config.media),
            });
            if self.repair {
                self.report.findings.push(Finding {
                    kind: Kind::Unrepairable,
                    text: "the media is append-only: fsck does not rewrite it".into(),
                });
            }
        }
        let g = self.medium.geometry();
        let total: u64 = cat.containers.iter().map(|c| c.data_bytes).sum();
        let mut done = 0u64;
        for s in &cat.containers {
            let Ok(scan) = self.medium.scan_container(s.index) else {
                continue; // reported by the catalogue
            };
            for (o, slot) in scan.objects.iter().enumerate() {
                let Some(i) = slot else { continue };
                let rec = scan.records[*i].1;
                let Record::Object {
                    image,
                    image_offset,
                    len,
                    crc,
                    ..
                } = rec
                else {
                    continue;
                };
                let o = o as u64;
                let damage = match self
                    .medium
                    .read_object_raw(s.index, o, len as u64)
                    .and_then(|data| self.medium.check_object(s.index, o, &rec, &data))
                {
                    Ok(()) => None,
                    Err(spinfs_media::MediaError::Damaged { reason, .. }) => Some(reason),
                    Err(e) => Some(e.to_string()),
                };
                self.objects.insert(
                    (s.index, o),
                    ObjectInfo {
                        image,
                        image_offset,
                        len: len as u64,
                        crc,
                        damage,
                    },
                );
                self.report.media_objects += 1;
                self.report.media_bytes += len as u64;
                done += len as u64;
                (self.progress)("media objects", done, total);
            }
        }
        let _ = g;
        self.catalogue = cat;
        Ok(())
    }

    /// Checks one image the manifest references against the media: complete, where the
    /// manifest says, objects intact, whole-image CRC.
    fn media_image(&mut self, rec: &ImageRecord, kind: ImageKind, owner: &str) -> MediaImage {
        let image = ImageRef { id: rec.id, kind };
        let mut out = MediaImage::default();
        let g = self.medium.geometry();
        let mut problems = Vec::new();
        match self.catalogue.images.get(&image) {
            None => problems.push(format!(
                "{owner}: {image} is not complete on the media (no valid completion record)"
            )),
            Some(e) if e.length != rec.length || e.crc != rec.crc => problems.push(format!(
                "{owner}: {image} on the media has {} bytes (crc32c {:08x}), the manifest \
                 records {} bytes (crc32c {:08x})",
                e.length, e.crc, rec.length, rec.crc
            )),
            Some(_) => {}
        }
        let mut crc = 0u32;
        let mut covered = 0u64;
        let mut whole = true;
        for &(container, offset, length, image_offset) in &rec.extents {
            if image_offset != covered {
                problems.push(format!(
                    "{owner}: {image}: the manifest's extents leave a gap at byte {covered}"
                ));
                whole = false;
                break;
            }
            let mut pos = offset;
            let end = offset.saturating_add(length);
            while pos < end {
                let object = pos / g.object_size;
                let at_image = image_offset + (pos - offset);
                let Some(info) = self.objects.get(&(container, object)) else {
                    problems.push(format!(
                        "{owner}: {image}: container {container} object {object} (image bytes \
                         from {at_image}) is not recorded on the media"
                    ));
                    out.damaged.push((
                        at_image,
                        end - pos,
                        format!("container {container} object {object}: not recorded"),
                    ));
                    whole = false;
                    break;
                };
                if info.image != image || info.image_offset != at_image || pos % g.object_size != 0
                {
                    problems.push(format!(
                        "{owner}: {image}: container {container} object {object} holds {} from \
                         byte {}, the manifest expects {image} from byte {at_image}",
                        info.image, info.image_offset
                    ));
                    out.damaged.push((
                        at_image,
                        info.len,
                        format!("container {container} object {object}: other data"),
                    ));
                    whole = false;
                    break;
                }
                if let Some(reason) = &info.damage {
                    out.damaged.push((
                        at_image,
                        info.len,
                        format!("container {container} object {object}: {reason}"),
                    ));
                    whole = false;
                }
                crc = crc32c::crc32c_combine(crc, info.crc, info.len as usize);
                pos += info.len;
                covered = at_image + info.len;
            }
        }
        if whole && covered != rec.length {
            problems.push(format!(
                "{owner}: {image}: the manifest's extents cover {covered} of {} bytes",
                rec.length
            ));
            whole = false;
        }
        if whole && crc != rec.crc {
            problems.push(format!(
                "{owner}: {image}: whole-image checksum mismatch on the media (crc32c {crc:08x}, \
                 the manifest records {:08x})",
                rec.crc
            ));
            whole = false;
        }
        out.intact = whole && problems.is_empty();
        for p in problems {
            self.push(Kind::Damage, p);
            if self.repair {
                self.cannot(format!(
                    "{owner}: {image} has no other copy (fsck does not rewrite the media)"
                ));
            }
        }
        out
    }

    /// Checks every image the manifest references on the media; returns them.
    fn check_manifest_images(&mut self, m: &Manifest) -> HashSet<ImageRef> {
        let mut refs = HashSet::new();
        for l in &m.layers {
            refs.insert(ImageRef {
                id: l.meta.id,
                kind: ImageKind::Meta,
            });
            for d in &l.devices {
                refs.insert(ImageRef {
                    id: *d,
                    kind: ImageKind::Blob,
                });
            }
            if !l.devices.iter().all(|d| m.blobs.iter().any(|b| b.id == *d)) {
                self.push(
                    Kind::Damage,
                    format!(
                        "manifest: layer {} references a blob the manifest does not list",
                        l.id
                    ),
                );
                if self.repair {
                    self.cannot(format!("layer {}: its missing blob cannot be found", l.id));
                }
            }
        }
        refs
    }

    /// Damaged objects of images nothing references are reported, with no file affected.
    fn check_unreferenced_media(&mut self, referenced: &HashSet<ImageRef>) {
        let mut lines = Vec::new();
        let mut keys: Vec<_> = self.objects.keys().copied().collect();
        keys.sort();
        for k in keys {
            let info = &self.objects[&k];
            if let Some(reason) = &info.damage
                && !referenced.contains(&info.image)
            {
                lines.push(format!(
                    "media {}: container {} object {} ({} bytes {}..{}, not referenced by the \
                     manifest: no file affected): {reason}",
                    self.config.media,
                    k.0,
                    k.1,
                    info.image,
                    info.image_offset,
                    info.image_offset + info.len
                ));
            }
        }
        for l in lines {
            self.push(Kind::Damage, l);
            if self.repair {
                self.cannot("the media is append-only; that damaged object stays (it is unused)");
            }
        }
    }

    fn check_layer(&mut self, m: &Manifest, rec: &LayerRecord) {
        self.report.layers += 1;
        let who = format!("layer {} (level {})", rec.id, rec.level);
        let media_meta = self.media_image(&rec.meta, ImageKind::Meta, &who);
        let blobs: HashMap<u64, &ImageRecord> = m.blobs.iter().map(|b| (b.id, b)).collect();
        let mut devices = Vec::new();
        let mut blob_damage: Vec<Vec<DamagedRange>> = Vec::new();
        let mut blob_intact = true;
        for id in &rec.devices {
            match blobs.get(id) {
                Some(b) => {
                    let mi = self.media_image(b, ImageKind::Blob, &who);
                    blob_intact &= mi.intact;
                    blob_damage.push(mi.damaged);
                    devices.push(b.to_extents(ImageKind::Blob));
                }
                None => {
                    blob_damage.push(Vec::new());
                    blob_intact = false;
                }
            }
        }
        // The SSD meta image against the manifest.
        let path = self.layout.layer_meta(rec.id);
        let ssd = fs::read(&path);
        let ssd_ok = matches!(&ssd, Ok(b) if b.len() as u64 == rec.meta.length
            && crc32c::crc32c(b) == rec.meta.crc);
        let mut meta: Option<Vec<u8>> = None;
        if ssd_ok {
            meta = ssd.ok();
        } else {
            let why = match &ssd {
                Ok(b) if b.len() as u64 != rec.meta.length => format!(
                    "is {} bytes, the manifest records {}",
                    b.len(),
                    rec.meta.length
                ),
                Ok(b) => format!(
                    "checksum mismatch (crc32c {:08x}, the manifest records {:08x})",
                    crc32c::crc32c(b),
                    rec.meta.crc
                ),
                Err(e) => format!("cannot be read: {e}"),
            };
            self.push(
                Kind::Damage,
                format!("{who}: meta image {} {why}", path.display()),
            );
            if media_meta.intact {
                let extents = rec.meta.to_extents(ImageKind::Meta);
                match self
                    .reader
                    .read(&extents, 0, rec.meta.length, ReadOptions::default())
                {
                    Ok(b) if crc32c::crc32c(&b) == rec.meta.crc => {
                        if self.repair {
                            match crate::seal::publish_meta(&self.layout, rec.id, &b) {
                                Ok(()) => self.fixed(format!(
                                    "{who}: meta image {} restored from its media copy",
                                    path.display()
                                )),
                                Err(e) => self
                                    .cannot(format!("{who}: cannot write {}: {e}", path.display())),
                            }
                        }
                        meta = Some(b);
                    }
                    Ok(_) => {
                        self.push(
                            Kind::Damage,
                            format!(
                                "{who}: meta image {} on the media fails its checksum",
                                rec.id
                            ),
                        );
                        if self.repair {
                            self.cannot(format!("{who}: no intact copy of meta image {}", rec.id));
                        }
                    }
                    Err(e) => {
                        self.push(Kind::Damage, format!("{who}: meta image: {e}"));
                        if self.repair {
                            self.cannot(format!(
                                "{who}: no readable copy of meta image {}",
                                rec.id
                            ));
                        }
                    }
                }
            } else {
                if self.repair {
                    self.cannot(format!(
                        "{who}: neither the SSD nor the media holds an intact copy of meta image \
                         {}: the layer's metadata is damaged",
                        rec.id
                    ));
                }
                // Check what can still be read, to name what is affected.
                if let Ok(b) = ssd {
                    meta = Some(b);
                }
            }
        }
        let unmapped = |f: &mut Self| {
            // Without a readable meta image, damaged ranges cannot be mapped to files.
            let walk = Walk {
                meta_affected: media_meta
                    .damaged
                    .iter()
                    .map(|r| (r.clone(), Vec::new()))
                    .collect(),
                blob_affected: blob_damage
                    .iter()
                    .map(|v| v.iter().map(|r| (r.clone(), Vec::new())).collect())
                    .collect(),
                ..Walk::default()
            };
            f.report_ranges(rec, &who, &walk, ssd_ok);
        };
        let Some(meta) = meta else {
            unmapped(self);
            return;
        };
        let image = match Image::open(meta.as_slice()) {
            Ok(i) => i,
            Err(e) => {
                self.push(Kind::Damage, format!("{who}: meta image: {e}"));
                unmapped(self);
                return;
            }
        };
        // The device table names the layer's blobs, each large enough.
        let table = image.devices();
        if table.len() != rec.devices.len() {
            self.push(
                Kind::Damage,
                format!(
                    "{who}: its meta image has {} devices, the manifest lists {} blobs",
                    table.len(),
                    rec.devices.len()
                ),
            );
            if self.repair {
                self.cannot(format!("{who}: the manifest and the meta image disagree"));
            }
        } else {
            for (i, (slot, id)) in table.iter().zip(&rec.devices).enumerate() {
                let need = slot.blocks as u64 * image.block_size();
                if let Some(b) = blobs.get(id)
                    && need > b.length
                {
                    self.push(
                        Kind::Damage,
                        format!(
                            "{who}: device {} needs {need} bytes, blob {id} holds {}",
                            i + 1,
                            b.length
                        ),
                    );
                    if self.repair {
                        self.cannot(format!("{who}: blob {id} is too short"));
                    }
                }
            }
        }
        let walk = walk_image(&image, &media_meta.damaged, &blob_damage);
        self.report.inodes += walk.inodes;
        for p in &walk.problems {
            self.push(Kind::Damage, format!("{who}: {p}"));
        }
        if !walk.problems.is_empty() && self.repair {
            self.cannot(format!(
                "{who}: its meta image is structurally damaged in every copy"
            ));
        }
        self.report_ranges(rec, &who, &walk, ssd_ok);
        self.check_heads(rec, &who, &image, &devices, blob_intact);
    }

    /// Reports damaged meta and blob ranges with the files they affect.
    fn report_ranges(&mut self, rec: &LayerRecord, who: &str, walk: &Walk, ssd_ok: bool) {
        for (range, paths) in &walk.meta_affected {
            let (at, len, what) = range;
            let text = format!(
                "{who}: meta image {} on the media, bytes {at}..{}: {what}; {}{}",
                rec.meta.id,
                at + len,
                if ssd_ok {
                    "the SSD copy is intact (no file affected now, but the layer's metadata has \
                     no second copy); metadata there: "
                } else {
                    "metadata of: "
                },
                name_paths(paths)
            );
            self.push(Kind::Damage, text);
            if self.repair {
                self.cannot(format!(
                    "{who}: the media is append-only; meta image {} keeps the damaged object",
                    rec.meta.id
                ));
            }
        }
        for (dev, ranges) in walk.blob_affected.iter().enumerate() {
            for (range, paths) in ranges {
                let (at, len, what) = range;
                let blob = rec.devices.get(dev).copied().unwrap_or(0);
                self.push(
                    Kind::Damage,
                    format!(
                        "{who}: blob {blob}, bytes {at}..{}: {what}; files affected: {}",
                        at + len,
                        name_paths(paths)
                    ),
                );
                if self.repair {
                    self.cannot(format!(
                        "{who}: blob {blob} has no other copy: data of {} is lost in bytes \
                         {at}..{} of the blob",
                        name_paths(paths),
                        at + len
                    ));
                }
            }
        }
    }

    fn check_heads(
        &mut self,
        rec: &LayerRecord,
        who: &str,
        image: &Image<&[u8]>,
        devices: &[ImageExtents],
        blob_intact: bool,
    ) {
        if self.config.head_size == 0 {
            return;
        }
        let path = self.layout.layer_heads(rec.id);
        let mut problems: Vec<String> = Vec::new();
        if !path.exists() {
            problems.push(format!("head cache {} is missing", path.display()));
        } else {
            match HeadCache::open(&path) {
                Ok(h) => {
                    self.report.heads += h.len();
                    if h.layer_id() != rec.id {
                        problems.push(format!(
                            "head cache {} names layer {}",
                            path.display(),
                            h.layer_id()
                        ));
                    }
                    problems.extend(h.verify().iter().map(|p| p.to_string()));
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        if problems.is_empty() {
            return;
        }
        for p in &problems {
            self.push(Kind::Damage, format!("{who}: {p}"));
        }
        if !self.repair {
            return;
        }
        match self.rebuild_heads(rec, image, devices) {
            Ok((n, missing)) if missing.is_empty() => self.fixed(format!(
                "{who}: head cache {} rebuilt from the meta image and the media ({n} heads)",
                path.display()
            )),
            Ok((n, missing)) => {
                self.fixed(format!(
                    "{who}: head cache {} rebuilt from the meta image and the media ({n} heads)",
                    path.display()
                ));
                self.cannot(format!(
                    "{who}: the heads of {} could not be read (damaged blob{}): reads of their \
                     first bytes fail",
                    name_paths(&missing),
                    if blob_intact { "?" } else { "" }
                ));
            }
            Err(e) => self.cannot(format!("{who}: cannot rebuild {}: {e}", path.display())),
        }
    }

    /// Writes the layer's head cache anew from the meta image and the media. Returns the
    /// heads written and the paths whose head could not be read.
    fn rebuild_heads(
        &mut self,
        rec: &LayerRecord,
        image: &Image<&[u8]>,
        devices: &[ImageExtents],
    ) -> Result<(u64, Vec<Vec<u8>>), String> {
        let path = self.layout.layer_heads(rec.id);
        let old = HeadCache::open(&path).ok();
        let missing = crate::state::write_heads(
            &path,
            rec.id,
            self.config.head_size,
            image.meta(),
            &self.reader,
            devices,
            old.as_ref(),
        )?;
        let n = HeadCache::open(&path).map(|h| h.len()).unwrap_or(0);
        Ok((n, missing.into_iter().map(String::into_bytes).collect()))
    }

    /// The writable and frozen trees: recorded inode numbers well-formed and unique.
    fn check_trees(&mut self, m: &Manifest) {
        let mut gens = vec![m.upper_gen];
        if let Some(f) = &m.frozen {
            gens.push(f.generation);
        }
        for g in gens {
            let tree = self.layout.generation_tree(g);
            if !tree.is_dir() {
                self.push(
                    Kind::Damage,
                    format!("generation {g}: its tree {} is missing", tree.display()),
                );
                if self.repair {
                    match fs::create_dir_all(&tree) {
                        Ok(()) => self.fixed(format!(
                            "generation {g}: an empty tree {} created (its files are lost)",
                            tree.display()
                        )),
                        Err(e) => self.cannot(format!("cannot create {}: {e}", tree.display())),
                    }
                }
                continue;
            }
            let mut numbers: HashMap<u64, (PathBuf, u64)> = HashMap::new();
            let mut stack = vec![tree.clone()];
            let mut problems = Vec::new();
            let maps_dir = self.layout.generation(g).join(crate::stackmap::MAPS_DIR);
            let mut sidecars: HashSet<String> = HashSet::new();
            while let Some(dir) = stack.pop() {
                let Ok(entries) = fs::read_dir(&dir) else {
                    problems.push(format!("cannot read directory {}", dir.display()));
                    continue;
                };
                for e in entries.flatten() {
                    let p = e.path();
                    let Ok(md) = fs::symlink_metadata(&p) else {
                        continue;
                    };
                    self.report.inodes += 1;
                    let recorded = match spinfs_erofs::fromdir::read_xattrs(&p) {
                        Ok(x) => {
                            if md.is_file()
                                && let Some((_, v)) = x
                                    .iter()
                                    .find(|(n, _)| n.as_slice() == crate::stackmap::STACK_XATTR)
                                && let Err(e) = check_stack_map(&maps_dir, v, &mut sidecars)
                            {
                                problems.push(format!("{}: chunk map: {e}", p.display()));
                            }
                            x.into_iter()
                                .find(|(n, _)| n.as_slice() == INO_XATTR)
                                .map(|(_, v)| v)
                        }
                        Err(err) => {
                            problems.push(format!("{}: xattrs: {err}", p.display()));
                            None
                        }
                    };
                    let number = match recorded {
                        Some(v) => match <[u8; 8]>::try_from(v.as_slice()) {
                            Ok(b) if u64::from_le_bytes(b) != 0 => Some(u64::from_le_bytes(b)),
                            _ => {
                                problems.push(format!(
                                    "{}: recorded inode number is malformed ({} bytes)",
                                    p.display(),
                                    v.len()
                                ));
                                None
                            }
                        },
                        None => Some(crate::seal::generation_ino(g, md.ino(), None)),
                    };
                    if let Some(num) = number {
                        match numbers.get(&num) {
                            Some((other, backing)) if *backing != md.ino() => {
                                problems.push(format!(
                                    "inode number {num:#x} is used by {} and {}",
                                    other.display(),
                                    p.display()
                                ))
                            }
                            Some(_) => {}
                            None => {
                                numbers.insert(num, (p.clone(), md.ino()));
                            }
                        }
                    }
                    if md.is_dir() {
                        stack.push(p);
                    }
                }
            }
            for p in problems {
                self.push(Kind::Damage, format!("generation {g}: {p}"));
                if self.repair {
                    self.cannot("fsck does not change the writable tree's files");
                }
            }
            // Sidecar maps no file names any more (a stacked file removed or replaced, or a
            // crash between writing one and switching to it): they go with the generation at
            // its seal, or now with --repair.
            let mut unreferenced: Vec<PathBuf> = fs::read_dir(&maps_dir)
                .map(|d| {
                    d.flatten()
                        .filter(|e| !e.file_name().to_str().is_some_and(|n| sidecars.contains(n)))
                        .map(|e| e.path())
                        .collect()
                })
                .unwrap_or_default();
            unreferenced.sort();
            for p in unreferenced {
                self.push(
                    Kind::Note,
                    format!(
                        "generation {g}: {} is a chunk map no file uses (removed when the \
                         generation is sealed)",
                        p.display()
                    ),
                );
                if self.repair {
                    match fs::remove_file(&p) {
                        Ok(()) => self.fixed(format!("removed {}", p.display())),
                        Err(e) => self.cannot(format!("cannot remove {}: {e}", p.display())),
                    }
                }
            }
        }
    }

    /// Inode numbers are unique across the visible stack: two different objects (different
    /// layer inodes or writable-tree inodes) visible under any names never share a number.
    /// The stack is resolved as the volume resolves it (whiteouts hide, non-directories hide
    /// what is below, directories merge down to the first opaque one).
    fn check_visible_numbers(&mut self, m: &Manifest) {
        let mut images = Vec::new();
        for l in m.layers.iter().rev() {
            let path = self.layout.layer_meta(l.id);
            let ok = fs::File::open(&path)
                .ok()
                .and_then(|f| Image::open(f).ok())
                .filter(|_| {
                    crate::store::file_crc(&path)
                        .is_ok_and(|(len, crc)| len == l.meta.length && crc == l.meta.crc)
                });
            match ok {
                Some(img) => images.push((l.id, img)),
                None => {
                    self.push(
                        Kind::Note,
                        format!(
                            "inode numbers across the stack not checked: layer {}'s meta image \
                             is damaged",
                            l.id
                        ),
                    );
                    return;
                }
            }
        }
        let mut trees = vec![(m.upper_gen, self.layout.generation_tree(m.upper_gen))];
        if let Some(f) = &m.frozen {
            trees.push((f.generation, self.layout.generation_tree(f.generation)));
        }
        let problems = visible_numbers(&trees, &images);
        for p in problems {
            self.push(Kind::Damage, p);
            if self.repair {
                self.cannot("fsck does not renumber inodes");
            }
        }
    }

    fn remove_orphan(&mut self, path: &Path, what: &str) {
        self.push(Kind::Orphan, format!("{what} {}", path.display()));
        if !self.repair {
            return;
        }
        let r = if fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
            fs::remove_dir_all(path)
        } else {
            fs::remove_file(path)
        };
        match r {
            Ok(()) => self.fixed(format!("removed {}", path.display())),
            Err(e) => self.cannot(format!("cannot remove {}: {e}", path.display())),
        }
    }

    fn check_orphans(&mut self, m: &Manifest) {
        let mut live_gens = vec![m.upper_gen];
        if let Some(f) = &m.frozen {
            live_gens.push(f.generation);
        }
        let mut found = Vec::new();
        if let Ok(entries) = fs::read_dir(self.layout.gens()) {
            for e in entries.flatten() {
                let live = e
                    .file_name()
                    .to_str()
                    .and_then(|n| u64::from_str_radix(n, 16).ok())
                    .is_some_and(|g| live_gens.contains(&g));
                if !live {
                    found.push((e.path(), "generation not in the manifest"));
                    continue;
                }
                // A live generation holds its tree and possibly a work directory.
                if let Ok(inner) = fs::read_dir(e.path()) {
                    for x in inner.flatten() {
                        let name = x.file_name();
                        if name == "tree" || name == crate::stackmap::MAPS_DIR {
                            continue;
                        }
                        if name == "work" {
                            if let Ok(w) = fs::read_dir(x.path()) {
                                for y in w.flatten() {
                                    found.push((y.path(), "work-directory leftover"));
                                }
                            }
                            continue;
                        }
                        found.push((x.path(), "unknown file in a generation"));
                    }
                }
            }
        }
        let live_files: HashSet<PathBuf> = m
            .layers
            .iter()
            .flat_map(|l| [self.layout.layer_meta(l.id), self.layout.layer_heads(l.id)])
            .collect();
        if let Ok(entries) = fs::read_dir(self.layout.layers()) {
            let mut list: Vec<_> = entries.flatten().map(|e| e.path()).collect();
            list.sort();
            for p in list {
                if !live_files.contains(&p) {
                    found.push((p, "layer file not in the manifest"));
                }
            }
        }
        let new = self.layout.manifest().with_extension("new");
        if new.exists() {
            found.push((new, "uncommitted manifest"));
        }
        for (p, what) in found {
            self.remove_orphan(&p, what);
        }
    }

    fn check_chunk_cache(&mut self, m: &Manifest) -> Result<(), FsckError> {
        let dir = self.layout.chunk_cache();
        if !dir.exists() {
            return Ok(());
        }
        let unit = self.config.object_size;
        let progress = &mut *self.progress;
        let ins = crate::cache::inspect_dir(&dir, unit, &mut |d, t| progress("chunk cache", d, t))
            .map_err(|e| FsckError::Store(StoreError::Layer(format!("chunk cache: {e}"))))?;
        self.report.cache_entries = ins.entries;
        let blobs: HashSet<u64> = m.blobs.iter().map(|b| b.id).collect();
        let orphan_images: Vec<u64> = ins
            .images
            .iter()
            .copied()
            .filter(|i| !blobs.contains(i))
            .collect();
        for p in &ins.problems {
            self.push(Kind::Damage, p.to_string());
        }
        // Leftovers of interrupted cache writes are expected after any daemon exit and are
        // cleared when the cache is next opened: a note, not a problem.
        for p in &ins.leftovers {
            self.push(
                Kind::Note,
                format!(
                    "chunk cache leftover {} (removed when the cache is next opened)",
                    p.display()
                ),
            );
        }
        for i in &orphan_images {
            self.push(
                Kind::Orphan,
                format!("chunk cache entries of image {i}, which the manifest does not reference"),
            );
        }
        if ins.format_mismatch && ins.entries > 0 {
            self.push(
                Kind::Damage,
                format!(
                    "chunk cache {}: its format file is missing or names another unit",
                    dir.display()
                ),
            );
        }
        let dirty = !ins.problems.is_empty()
            || (!ins.leftovers.is_empty() && self.repair)
            || !orphan_images.is_empty()
            || (ins.format_mismatch && ins.entries > 0);
        if !self.repair || !dirty {
            return Ok(());
        }
        let capacity = self.config.cache_size.max(1);
        match crate::cache::ChunkCache::open(&dir, capacity, unit) {
            Ok(cache) => {
                // Opening removed the leftovers (and every entry if the format differed).
                for p in &ins.leftovers {
                    self.push(
                        Kind::Note,
                        format!("removed chunk cache leftover {}", p.display()),
                    );
                }
                if ins.format_mismatch && ins.entries > 0 {
                    self.fixed("dropped every chunk cache entry (format or unit changed)");
                }
                let dropped = cache.repair();
                for p in &ins.problems {
                    if dropped.iter().any(|d| d.path == p.path) || !p.path.exists() {
                        self.fixed(format!(
                            "dropped damaged chunk cache entry {} (fetched again from the media \
                             when read)",
                            p.path.display()
                        ));
                    } else {
                        self.cannot(format!(
                            "chunk cache entry {} could not be dropped",
                            p.path.display()
                        ));
                    }
                }
                for i in orphan_images {
                    match cache.remove_image(i) {
                        Ok(()) => self.fixed(format!("removed chunk cache entries of image {i}")),
                        Err(e) => self.cannot(format!("chunk cache image {i}: {e}")),
                    }
                }
            }
            Err(e) => self.cannot(format!("chunk cache {}: {e}", dir.display())),
        }
        Ok(())
    }
}

/// What a walk of one image found.
#[derive(Default)]
struct Walk {
    inodes: u64,
    problems: Vec<String>,
    /// Damaged meta ranges and the paths whose metadata lies there.
    meta_affected: Vec<(DamagedRange, Vec<Vec<u8>>)>,
    /// Per device (index = device - 1): damaged blob ranges and the files with data there.
    blob_affected: Vec<Vec<(DamagedRange, Vec<Vec<u8>>)>>,
}

fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

fn show(p: &[u8]) -> String {
    if p.is_empty() {
        "/".into()
    } else {
        String::from_utf8_lossy(p).into_owned()
    }
}

fn name_paths(paths: &[Vec<u8>]) -> String {
    if paths.is_empty() {
        return "no file".into();
    }
    let mut s: Vec<String> = paths.iter().take(MAX_PATHS).map(|p| show(p)).collect();
    if paths.len() > MAX_PATHS {
        s.push(format!("and {} more", paths.len() - MAX_PATHS));
    }
    s.join(", ")
}

/// Walks the whole tree of `image` through the reader's validation, reporting every
/// problem with its path and continuing past damaged subtrees; checks inode-number
/// uniqueness; maps damaged meta and blob ranges to the paths they affect.
fn walk_image<R: ReadAt>(
    image: &Image<R>,
    meta_damage: &[DamagedRange],
    blob_damage: &[Vec<DamagedRange>],
) -> Walk {
    let mut w = Walk {
        meta_affected: meta_damage
            .iter()
            .map(|r| (r.clone(), Vec::new()))
            .collect(),
        blob_affected: blob_damage
            .iter()
            .map(|v| v.iter().map(|r| (r.clone(), Vec::new())).collect())
            .collect(),
        ..Walk::default()
    };
    let root = match image.root() {
        Ok(r) => r,
        Err(e) => {
            w.problems.push(format!("root directory: {e}"));
            return w;
        }
    };
    let mut numbers: HashMap<u64, (u64, Vec<u8>)> = HashMap::new();
    let mut seen: HashSet<u64> = HashSet::new();
    // Per inode, the ranges (meta indexes, per-device blob indexes) it touches, computed
    // once per inode and applied to every name it has.
    let mut touched: Touched = HashMap::new();
    let mut dirs_seen: HashSet<u64> = HashSet::new();
    dirs_seen.insert(root.nid);
    let mut stack: Vec<(Vec<u8>, Inode, u64)> = vec![(Vec::new(), root.clone(), root.nid)];
    let mut first = true;
    while let Some((path, dir, parent)) = stack.pop() {
        let dir_nid = dir.nid;
        if first {
            // The root's own inode.
            first = false;
            visit_inode(
                image,
                &path,
                &dir,
                &mut w,
                &mut numbers,
                &mut seen,
                &mut touched,
            );
        }
        let (entries, dotdot) = match image.dir_entries(&dir) {
            Ok(x) => x,
            Err(e) => {
                w.problems.push(format!("directory {}: {e}", show(&path)));
                continue;
            }
        };
        if dotdot != parent {
            w.problems.push(format!(
                "directory {}: '..' does not name its parent",
                show(&path)
            ));
        }
        let mut subdirs = Vec::new();
        for e in entries {
            let mut p = path.clone();
            p.push(b'/');
            p.extend_from_slice(&e.name);
            let ino = match image.inode(e.nid) {
                Ok(i) => i,
                Err(err) => {
                    w.problems
                        .push(format!("{} (nid {}): {err}", show(&p), e.nid));
                    continue;
                }
            };
            if ino.file_type != e.file_type {
                w.problems
                    .push(format!("{}: entry type disagrees with its inode", show(&p)));
            }
            visit_inode(
                image,
                &p,
                &ino,
                &mut w,
                &mut numbers,
                &mut seen,
                &mut touched,
            );
            if ino.is_dir() {
                if !dirs_seen.insert(ino.nid) {
                    w.problems.push(format!(
                        "{}: directory reached twice (cycle or directory hard link)",
                        show(&p)
                    ));
                    continue;
                }
                subdirs.push((p, ino, dir_nid));
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    w
}

fn visit_inode<R: ReadAt>(
    image: &Image<R>,
    path: &[u8],
    ino: &Inode,
    w: &mut Walk,
    numbers: &mut HashMap<u64, (u64, Vec<u8>)>,
    seen: &mut HashSet<u64>,
    touched: &mut Touched,
) {
    if seen.insert(ino.nid) {
        w.inodes += 1;
        let mut meta_hits = Vec::new();
        let mut blob_hits = Vec::new();
        let note = |w: &mut Walk, m: String| w.problems.push(format!("{}: {m}", show(path)));
        if let Err(e) = image.raw_xattrs(ino) {
            note(w, format!("xattrs: {e}"));
        }
        match image.spinfs_ino(ino) {
            Ok(Some(n)) => match numbers.get(&n) {
                Some((nid, other)) if *nid != ino.nid => note(
                    w,
                    format!(
                        "inode number {n:#x} is also used by {} (nid {nid})",
                        show(other)
                    ),
                ),
                Some(_) => {}
                None => {
                    numbers.insert(n, (ino.nid, path.to_vec()));
                }
            },
            Ok(None) if !ino.is_whiteout() => note(w, "no spinfs inode number".into()),
            Ok(None) => {}
            Err(e) => note(w, format!("inode number: {e}")),
        }
        if ino.file_type == FileType::Symlink
            && let Err(e) = image.readlink(ino)
        {
            note(w, format!("symlink target: {e}"));
        }
        let (at, len) = image.inode_range(ino);
        for (i, (r, _)) in w.meta_affected.iter().enumerate() {
            if overlaps(at, len, r.0, r.1) {
                meta_hits.push(i);
            }
        }
        if matches!(
            ino.file_type,
            FileType::File | FileType::Dir | FileType::Symlink
        ) {
            let mut pos = 0u64;
            while pos < ino.size {
                let extents = match image.map(ino, pos, ino.size - pos) {
                    Ok(x) => x,
                    Err(e) => {
                        note(w, format!("data mapping: {e}"));
                        break;
                    }
                };
                let Some(last) = extents.last() else {
                    note(w, format!("unmapped data at byte {pos}"));
                    break;
                };
                pos = last.offset + last.len;
                for e in &extents {
                    let Some((dev, off)) = e.location else {
                        continue;
                    };
                    if dev == 0 {
                        for (i, (r, _)) in w.meta_affected.iter().enumerate() {
                            if overlaps(off, e.len, r.0, r.1) {
                                meta_hits.push(i);
                            }
                        }
                    } else if let Some(ranges) = w.blob_affected.get(dev as usize - 1) {
                        for (i, (r, _)) in ranges.iter().enumerate() {
                            if overlaps(off, e.len, r.0, r.1) {
                                blob_hits.push((dev as usize - 1, i));
                            }
                        }
                    }
                }
            }
        }
        meta_hits.dedup();
        blob_hits.dedup();
        touched.insert(ino.nid, (meta_hits, blob_hits));
    }
    if let Some((meta_hits, blob_hits)) = touched.get(&ino.nid) {
        for &i in meta_hits {
            w.meta_affected[i].1.push(path.to_vec());
        }
        for &(d, i) in blob_hits {
            w.blob_affected[d][i].1.push(path.to_vec());
        }
    }
}

/// One part of a merged directory: a writable/frozen tree directory or a layer directory.
#[derive(Clone)]
enum Part {
    Tree { generation: u64, dir: PathBuf },
    Layer { index: usize, dir: Inode },
}

/// What a name is in one part.
enum Found {
    Whiteout,
    Dir {
        part: Part,
        opaque: bool,
        number: u64,
        ident: (u64, u64, u64),
    },
    Other {
        number: u64,
        ident: (u64, u64, u64),
        at: String,
    },
}

fn has_xattr(list: &[(Vec<u8>, Vec<u8>)], name: &[u8]) -> Option<Vec<u8>> {
    list.iter()
        .find(|(n, _)| n.as_slice() == name)
        .map(|(_, v)| v.clone())
}

fn lookup_part(part: &Part, name: &[u8], images: &[(u64, Image<fs::File>)]) -> Option<Found> {
    use crate::markers::{OPAQUE_XATTR, REALDEV_XATTR};
    use std::os::unix::ffi::OsStrExt;
    match part {
        Part::Tree { generation, dir } => {
            let p = dir.join(std::ffi::OsStr::from_bytes(name));
            let md = fs::symlink_metadata(&p).ok()?;
            let x = spinfs_erofs::fromdir::read_xattrs(&p).unwrap_or_default();
            let ft = md.file_type();
            use std::os::unix::fs::FileTypeExt;
            if ft.is_char_device() && md.rdev() == 0 && has_xattr(&x, REALDEV_XATTR).is_none() {
                return Some(Found::Whiteout);
            }
            let number = has_xattr(&x, INO_XATTR)
                .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                .map(u64::from_le_bytes)
                .unwrap_or_else(|| crate::seal::generation_ino(*generation, md.ino(), None));
            let ident = (0, *generation, md.ino());
            if md.is_dir() {
                return Some(Found::Dir {
                    part: Part::Tree {
                        generation: *generation,
                        dir: p,
                    },
                    opaque: has_xattr(&x, OPAQUE_XATTR).is_some_and(|v| v == b"y"),
                    number,
                    ident,
                });
            }
            Some(Found::Other {
                number,
                ident,
                at: format!("writable generation {generation}"),
            })
        }
        Part::Layer { index, dir } => {
            let (id, image) = &images[*index];
            let e = image.lookup(dir, name).ok()??;
            let ino = image.inode(e.nid).ok()?;
            let x = image.raw_xattrs(&ino).unwrap_or_default();
            if ino.is_whiteout() && has_xattr(&x, REALDEV_XATTR).is_none() {
                return Some(Found::Whiteout);
            }
            let number = image.spinfs_ino(&ino).ok().flatten().unwrap_or(0);
            let ident = (1, *id, ino.nid);
            if ino.is_dir() {
                return Some(Found::Dir {
                    part: Part::Layer {
                        index: *index,
                        dir: ino,
                    },
                    opaque: has_xattr(&x, OPAQUE_XATTR).is_some_and(|v| v == b"y"),
                    number,
                    ident,
                });
            }
            Some(Found::Other {
                number,
                ident,
                at: format!("layer {id}"),
            })
        }
    }
}

fn part_names(part: &Part, images: &[(u64, Image<fs::File>)]) -> Vec<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    match part {
        Part::Tree { dir, .. } => fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().as_bytes().to_vec())
                    .collect()
            })
            .unwrap_or_default(),
        Part::Layer { index, dir } => images[*index]
            .1
            .dir_entries(dir)
            .map(|(l, _)| l.into_iter().map(|e| e.name).collect())
            .unwrap_or_default(),
    }
}

/// Resolves the whole visible namespace over `trees` (top first) and `images` (newest
/// first) and reports inode numbers shared by different visible objects.
/// Checks a stacked file's map xattr `v` (and the sidecar it names in `maps_dir`, which is
/// added to `sidecars`).
fn check_stack_map(
    maps_dir: &Path,
    v: &[u8],
    sidecars: &mut HashSet<String>,
) -> Result<(), String> {
    use crate::stackmap::Stored;
    match Stored::decode(v) {
        Err(_) => Err("the xattr does not decode".into()),
        Ok(Stored::Inline(_)) => Ok(()),
        Ok(Stored::Sidecar(r)) => {
            let name = r.file_name();
            sidecars.insert(name.clone());
            let path = maps_dir.join(&name);
            let bytes = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            r.load(&bytes)
                .map(|_| ())
                .map_err(|_| format!("{} is damaged or not the one recorded", path.display()))
        }
    }
}

fn visible_numbers(trees: &[(u64, PathBuf)], images: &[(u64, Image<fs::File>)]) -> Vec<String> {
    let mut root: Vec<Part> = trees
        .iter()
        .map(|(g, t)| Part::Tree {
            generation: *g,
            dir: t.clone(),
        })
        .collect();
    for (i, (_, img)) in images.iter().enumerate() {
        if let Ok(r) = img.root() {
            root.push(Part::Layer { index: i, dir: r });
        }
    }
    let mut seen: HashMap<u64, (Ident, String, String)> = HashMap::new();
    let mut problems = Vec::new();
    let mut stack: Vec<(Vec<u8>, Vec<Part>)> = vec![(Vec::new(), root)];
    while let Some((path, parts)) = stack.pop() {
        let mut names: Vec<Vec<u8>> = parts.iter().flat_map(|p| part_names(p, images)).collect();
        names.sort();
        names.dedup();
        for name in names {
            let mut p = path.clone();
            p.push(b'/');
            p.extend_from_slice(&name);
            let mut dirs: Vec<Part> = Vec::new();
            let mut top: Option<(u64, (u64, u64, u64), String)> = None;
            for part in &parts {
                match lookup_part(part, &name, images) {
                    None => continue,
                    Some(Found::Whiteout) => break,
                    Some(Found::Other { number, ident, at }) => {
                        if dirs.is_empty() {
                            top = Some((number, ident, at));
                        }
                        break;
                    }
                    Some(Found::Dir {
                        part,
                        opaque,
                        number,
                        ident,
                    }) => {
                        if dirs.is_empty() {
                            let at = match &part {
                                Part::Tree { generation, .. } => {
                                    format!("writable generation {generation}")
                                }
                                Part::Layer { index, .. } => format!("layer {}", images[*index].0),
                            };
                            top = Some((number, ident, at));
                        }
                        dirs.push(part);
                        if opaque {
                            break;
                        }
                    }
                }
            }
            let Some((number, ident, at)) = top else {
                continue;
            };
            if number != 0 {
                match seen.get(&number) {
                    Some((other, opath, oat)) if *other != ident => problems.push(format!(
                        "inode number {number:#x} is visible as two different objects: {} ({oat}) \
                         and {} ({at})",
                        opath,
                        show(&p)
                    )),
                    Some(_) => {}
                    None => {
                        seen.insert(number, (ident, show(&p), at));
                    }
                }
            }
            if !dirs.is_empty() {
                stack.push((p, dirs));
            }
        }
    }
    problems
}
