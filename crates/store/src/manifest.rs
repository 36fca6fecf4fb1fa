//! The manifest: the one durable record of the store's state.
//!
//! Every durable state change is a new manifest written next to the old one, fsync'ed, renamed
//! over it and the directory fsync'ed, so a crash leaves either the old or the new manifest,
//! never a mix. The file is a header line carrying a magic, the format version and a CRC32C of
//! the JSON body that follows; anything else is rejected with a precise error.

use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: &str = "SPINFS-MANIFEST";
/// Manifest format version written by this build.
pub const MANIFEST_VERSION: u32 = 1;

/// The state of a store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Random identity of the store, also written on its media.
    pub store_id: String,
    /// Incremented by every commit.
    pub sequence: u64,
    /// Generation id of the writable layer (its tree is `gens/<id>/tree`).
    pub upper_gen: u64,
    /// Next generation id to hand out; ids are never reused.
    pub next_gen: u64,
    /// A generation frozen for sealing whose image is not committed yet: after a crash it is
    /// sealed again (its tree is `gens/<id>/tree`, read-only, below the writable one).
    #[serde(default)]
    pub frozen: Option<FrozenGen>,
    /// Archived layers, oldest first.
    #[serde(default)]
    pub layers: Vec<LayerRecord>,
    /// Blob images on the media, referenced by layers (a merged layer references several).
    #[serde(default)]
    pub blobs: Vec<ImageRecord>,
    /// Next layer/blob id to hand out; ids are never reused (they name images on the media).
    #[serde(default = "one")]
    pub next_layer: u64,
}

fn one() -> u64 {
    1
}

/// A generation being sealed into layer `layer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrozenGen {
    pub generation: u64,
    pub layer: u64,
}

/// One archived layer: a meta image (also kept on the SSD as `layers/<id>.meta`) whose
/// devices 1..=n are the blobs `devices[0..n]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerRecord {
    pub id: u64,
    pub meta: ImageRecord,
    /// Blob ids in device order.
    pub devices: Vec<u64>,
    /// Generations sealed into this layer (several after a merge).
    pub generations: Vec<u64>,
    /// Non-directory inodes and regular-file bytes (for status).
    pub files: u64,
    pub bytes: u64,
    /// Merge level: 0 for a sealed generation, n+1 for a merge of layers of level n.
    #[serde(default)]
    pub level: u32,
}

/// Where an image lives on the media.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRecord {
    pub id: u64,
    pub length: u64,
    pub crc: u32,
    /// (container, offset in the data area, length, offset in the image)
    pub extents: Vec<(u64, u64, u64, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("manifest {path} is damaged: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "manifest {path} has format version {found}; this spinfs reads version {MANIFEST_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
}

impl ImageRecord {
    pub fn from_extents(e: &spinfs_media::ImageExtents) -> ImageRecord {
        ImageRecord {
            id: e.image.id,
            length: e.length,
            crc: e.crc,
            extents: e
                .extents
                .iter()
                .map(|x| (x.container, x.offset, x.length, x.image_offset))
                .collect(),
        }
    }

    pub fn to_extents(&self, kind: spinfs_media::ImageKind) -> spinfs_media::ImageExtents {
        spinfs_media::ImageExtents {
            image: spinfs_media::ImageRef { id: self.id, kind },
            length: self.length,
            crc: self.crc,
            extents: self
                .extents
                .iter()
                .map(
                    |&(container, offset, length, image_offset)| spinfs_media::Extent {
                        container,
                        offset,
                        length,
                        image_offset,
                    },
                )
                .collect(),
        }
    }
}

impl Manifest {
    /// The state of a freshly made store.
    pub fn new(store_id: String) -> Manifest {
        Manifest {
            store_id,
            sequence: 0,
            upper_gen: 1,
            next_gen: 2,
            frozen: None,
            layers: Vec::new(),
            blobs: Vec::new(),
            next_layer: 1,
        }
    }

    /// Serialises to the on-disk form.
    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec_pretty(self).expect("manifest serializes");
        let crc = crc32c::crc32c(&body);
        let mut out = format!("{MAGIC} v{MANIFEST_VERSION} crc32c={crc:08x}\n").into_bytes();
        out.extend_from_slice(&body);
        out.push(b'\n');
        out
    }

    /// Parses and verifies the on-disk form; `path` only names the file in errors.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Manifest, ManifestError> {
        let corrupt = |reason: String| ManifestError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let nl = bytes
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| corrupt("no header line".into()))?;
        let header =
            std::str::from_utf8(&bytes[..nl]).map_err(|_| corrupt("header is not text".into()))?;
        let mut parts = header.split(' ');
        if parts.next() != Some(MAGIC) {
            return Err(corrupt("bad magic".into()));
        }
        let version: u32 = parts
            .next()
            .and_then(|v| v.strip_prefix('v'))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| corrupt("bad version field".into()))?;
        if version != MANIFEST_VERSION {
            return Err(ManifestError::Version {
                path: path.to_path_buf(),
                found: version,
            });
        }
        let crc = parts
            .next()
            .and_then(|c| c.strip_prefix("crc32c="))
            .and_then(|c| u32::from_str_radix(c, 16).ok())
            .ok_or_else(|| corrupt("bad checksum field".into()))?;
        let body = &bytes[nl + 1..];
        let body = body.strip_suffix(b"\n").unwrap_or(body);
        let actual = crc32c::crc32c(body);
        if actual != crc {
            return Err(corrupt(format!(
                "checksum mismatch (recorded {crc:08x}, computed {actual:08x})"
            )));
        }
        serde_json::from_slice(body).map_err(|e| corrupt(format!("bad body: {e}")))
    }

    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let bytes = fs::read(path).map_err(|error| ManifestError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        Self::decode(&bytes, path)
    }

    /// Durably replaces the manifest at `path` with this one (write, fsync, rename, fsync dir).
    pub fn commit(&mut self, path: &Path) -> Result<(), ManifestError> {
        self.sequence += 1;
        let io = |error| ManifestError::Io {
            path: path.to_path_buf(),
            error,
        };
        let tmp = path.with_extension("new");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(&self.encode()).map_err(io)?;
        f.sync_all().map_err(io)?;
        spinfs_failpoints::fail_point!("manifest.before_rename");
        fs::rename(&tmp, path).map_err(io)?;
        spinfs_failpoints::fail_point!("manifest.after_rename");
        let dir = path.parent().unwrap_or(Path::new("."));
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        spinfs_failpoints::fail_point!("manifest.committed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest");
        let mut m = Manifest::new("abc".into());
        m.commit(&path).unwrap();
        let back = Manifest::load(&path).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.sequence, 1);
        assert!(!path.with_extension("new").exists());
    }

    #[test]
    fn detects_every_single_bit_flip() {
        let m = Manifest::new("0123456789abcdef".into());
        let bytes = m.encode();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                // A flip either breaks decoding or (in insignificant whitespace) is caught by the
                // checksum; it never yields a different manifest.
                if let Ok(decoded) = Manifest::decode(&b, Path::new("m")) {
                    assert_eq!(
                        decoded, m,
                        "flip at byte {i} bit {bit} changed the manifest"
                    );
                }
            }
        }
    }

    #[test]
    fn rejects_truncation_and_other_versions() {
        let bytes = Manifest::new("x".into()).encode();
        for len in 0..bytes.len() - 1 {
            assert!(
                Manifest::decode(&bytes[..len], Path::new("m")).is_err(),
                "len {len}"
            );
        }
        let text = String::from_utf8(bytes)
            .unwrap()
            .replacen(" v1 ", " v7 ", 1);
        assert!(matches!(
            Manifest::decode(text.as_bytes(), Path::new("m")),
            Err(ManifestError::Version { found: 7, .. })
        ));
    }
}
