//! `spinfs export`: one archived layer as a plain EROFS image pair in a directory.
//!
//! Writes `DIR/meta.ID` and one `DIR/blob.N` per blob the layer's meta references (the
//! layer's `devices`, in device order), so that the kernel mounts the pair (file-backed
//! mount of the meta with `device=DIR/blob.N` per device, in order) and `fsck.erofs` checks
//! it. The export reads only durable state and never takes the store lock, so it works on a
//! mounted store too: the config and the manifest are read as they are (both are replaced
//! atomically), the meta image comes from the SSD copy (or from the media when that copy is
//! missing or does not match the manifest), and the blobs are read from the media opened
//! read-only, every object checked against its CRC32C and every whole image against the
//! checksum the manifest recorded.

use crate::config::{ConfigError, StoreConfig};
use crate::layout::StoreLayout;
use crate::manifest::{ImageRecord, Manifest, ManifestError};
use spinfs_media::{BackendOptions, ImageKind, Medium, MediumReader, ReadOptions};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Bytes read from the media per request while copying a blob.
const COPY_UNIT: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0} is not a spinfs store (no spinfs.toml)")]
    NotAStore(PathBuf),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("layer {layer} is not an archived layer of this store (archived layers: {known})")]
    UnknownLayer { layer: u64, known: String },
    #[error("export directory {0} is not empty (export never overwrites files)")]
    NotEmpty(PathBuf),
    #[error("export directory {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("{context} {path}: {error}")]
    Io {
        context: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("media {uri}: {error}")]
    Media {
        uri: String,
        error: spinfs_media::MediaError,
    },
    #[error("layer {layer}: {reason}")]
    Damaged { layer: u64, reason: String },
}

fn io_err(context: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ExportError {
    let path = path.to_path_buf();
    move |error| ExportError::Io {
        context,
        path,
        error,
    }
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    pub layer: u64,
    pub meta: PathBuf,
    /// The blob files in device order (device 1 first).
    pub blobs: Vec<PathBuf>,
    /// Bytes written, meta and blobs.
    pub bytes: u64,
}

/// Exports archived layer `layer` of the store at `store` into `dir` (created when missing;
/// must be empty otherwise). Nothing is left in `dir` when the export fails.
pub fn export_layer(store: &Path, layer: u64, dir: &Path) -> Result<Exported, ExportError> {
    let layout = StoreLayout::new(store);
    if !layout.config().exists() {
        return Err(ExportError::NotAStore(store.to_path_buf()));
    }
    let config = StoreConfig::load(store)?;
    let manifest = Manifest::load(&layout.manifest())?;
    let record = manifest
        .layers
        .iter()
        .find(|l| l.id == layer)
        .ok_or_else(|| ExportError::UnknownLayer {
            layer,
            known: if manifest.layers.is_empty() {
                "none".into()
            } else {
                manifest
                    .layers
                    .iter()
                    .map(|l| l.id.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })?;
    let blobs: HashMap<u64, &ImageRecord> = manifest.blobs.iter().map(|b| (b.id, b)).collect();
    let devices = record
        .devices
        .iter()
        .map(|id| {
            blobs.get(id).copied().ok_or_else(|| ExportError::Damaged {
                layer,
                reason: format!("blob {id} is not in the manifest"),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    prepare_dir(dir)?;

    let mut created = Vec::new();
    let result = (|| {
        let media = Media::open(&config)?;
        let meta = meta_bytes(&layout, &media, layer, &record.meta)?;
        check_devices(layer, &meta, &devices)?;
        let meta_path = dir.join(format!("meta.{layer}"));
        let mut f = create_new(&meta_path, &mut created)?;
        f.write_all(&meta)
            .and_then(|_| f.sync_all())
            .map_err(io_err("cannot write", &meta_path))?;
        let mut bytes = meta.len() as u64;
        let mut paths = Vec::new();
        for blob in &devices {
            let path = dir.join(format!("blob.{}", blob.id));
            let f = create_new(&path, &mut created)?;
            bytes += media.copy_blob(layer, blob, &f, &path)?;
            f.sync_all().map_err(io_err("cannot write", &path))?;
            paths.push(path);
        }
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("cannot sync", dir))?;
        Ok(Exported {
            layer,
            meta: meta_path,
            blobs: paths,
            bytes,
        })
    })();
    if result.is_err() {
        for p in created {
            let _ = fs::remove_file(p);
        }
    }
    result
}

/// Creates `dir` when missing; refuses anything but an empty directory.
fn prepare_dir(dir: &Path) -> Result<(), ExportError> {
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(io_err("cannot create", dir))
        }
        Err(e) => Err(io_err("cannot stat", dir)(e)),
        Ok(md) if !md.is_dir() => Err(ExportError::NotADirectory(dir.to_path_buf())),
        Ok(_) => {
            let mut entries = fs::read_dir(dir).map_err(io_err("cannot read", dir))?;
            if entries.next().is_some() {
                return Err(ExportError::NotEmpty(dir.to_path_buf()));
            }
            Ok(())
        }
    }
}

fn create_new(path: &Path, created: &mut Vec<PathBuf>) -> Result<File, ExportError> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err("cannot create", path))?;
    created.push(path.to_path_buf());
    Ok(f)
}

/// The meta image: the SSD copy when it matches the manifest, else the one on the media.
fn meta_bytes(
    layout: &StoreLayout,
    media: &Media,
    layer: u64,
    rec: &ImageRecord,
) -> Result<Vec<u8>, ExportError> {
    let path = layout.layer_meta(layer);
    match fs::read(&path) {
        Ok(b) if b.len() as u64 == rec.length && crc32c::crc32c(&b) == rec.crc => return Ok(b),
        Ok(_) => tracing::warn!(
            "{} does not match the manifest; reading the meta image from the media",
            path.display()
        ),
        Err(e) => tracing::warn!(
            "{}: {e}; reading the meta image from the media",
            path.display()
        ),
    }
    let extents = rec.to_extents(ImageKind::Meta);
    let b = media
        .reader
        .read(&extents, 0, rec.length, ReadOptions::default())
        .map_err(|error| media.err(error))?;
    if crc32c::crc32c(&b) != rec.crc {
        return Err(ExportError::Damaged {
            layer,
            reason: format!("meta image {} does not match its recorded checksum", rec.id),
        });
    }
    Ok(b)
}

/// The meta's device table must name exactly the layer's blobs, each large enough.
fn check_devices(layer: u64, meta: &[u8], devices: &[&ImageRecord]) -> Result<(), ExportError> {
    let damaged = |reason: String| ExportError::Damaged { layer, reason };
    let image = spinfs_erofs::Image::open(meta).map_err(|e| damaged(format!("meta image: {e}")))?;
    let table = image.devices();
    if table.len() != devices.len() {
        return Err(damaged(format!(
            "its meta image has {} devices, the manifest lists {} blobs",
            table.len(),
            devices.len()
        )));
    }
    for (i, (slot, blob)) in table.iter().zip(devices).enumerate() {
        let need = slot.blocks as u64 * image.block_size();
        if need > blob.length {
            return Err(damaged(format!(
                "device {} needs {need} bytes, blob {} holds {}",
                i + 1,
                blob.id,
                blob.length
            )));
        }
    }
    Ok(())
}

/// The store's medium, opened read-only.
struct Media {
    uri: String,
    reader: MediumReader,
}

impl Media {
    fn open(config: &StoreConfig) -> Result<Media, ExportError> {
        let uri = config.media.clone();
        let err = |error| ExportError::Media {
            uri: uri.clone(),
            error,
        };
        let geometry = config.geometry().map_err(err)?;
        let opts = BackendOptions {
            read_only: true,
            ..BackendOptions::default()
        };
        let medium = Medium::open(&uri, geometry, opts).map_err(err)?;
        Ok(Media {
            uri: uri.clone(),
            reader: MediumReader::new(medium, None),
        })
    }

    fn err(&self, error: spinfs_media::MediaError) -> ExportError {
        ExportError::Media {
            uri: self.uri.clone(),
            error,
        }
    }

    /// Copies a whole blob image into `out`; returns its length.
    fn copy_blob(
        &self,
        layer: u64,
        blob: &ImageRecord,
        out: &File,
        path: &Path,
    ) -> Result<u64, ExportError> {
        let extents = blob.to_extents(ImageKind::Blob);
        let mut crc = 0u32;
        let mut at = 0u64;
        while at < blob.length {
            let len = COPY_UNIT.min(blob.length - at);
            let data = self
                .reader
                .read(&extents, at, len, ReadOptions::default())
                .map_err(|e| self.err(e))?;
            crc = crc32c::crc32c_append(crc, &data);
            out.write_all_at(&data, at)
                .map_err(io_err("cannot write", path))?;
            at += len;
        }
        if crc != blob.crc {
            return Err(ExportError::Damaged {
                layer,
                reason: format!("blob {} does not match its recorded checksum", blob.id),
            });
        }
        Ok(blob.length)
    }
}
