//! The status report (`spinfs status --json`), the same from the daemon and offline.

use crate::cache::CacheStats;
use crate::config::StoreConfig;
use crate::manifest::Manifest;
use serde_json::{Value, json};
use spinfs_media::ModelCounters;
use spinfs_media::reader::ReaderStats;

/// Files and bytes of the writable (or a frozen) tree.
#[derive(Debug, Default, Clone, Copy)]
pub struct TreeUsage {
    pub files: u64,
    pub bytes: u64,
}

/// Files (non-directories, each inode once, whiteouts excluded) and the regular-file bytes
/// an SSD tree holds (a file's size, or its allocated bytes when smaller: holes and a stacked
/// file's chunks below take no SSD space).
pub fn tree_usage(root: &std::path::Path) -> std::io::Result<TreeUsage> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut usage = TreeUsage::default();
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            // Entries can vanish under a live mount while we walk.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.file_type().is_char_device() && meta.rdev() == 0 {
                // whiteouts (or a user's 0/0 device; counting those is not worth an xattr read)
            } else if meta.nlink() == 1 || seen.insert(meta.ino()) {
                usage.files += 1;
                if meta.is_file() {
                    // The data it holds on the SSD: a stacked file's chunks below (and a
                    // sparse file's holes) take no space here and are not sealed again,
                    // as the volume counts them (`Volume::upper_bytes`).
                    usage.bytes += meta.len().min(meta.blocks() * 512);
                }
            }
        }
    }
    Ok(usage)
}

/// Builds the status object. `upper` is the writable tree, `frozen` a generation being sealed.
#[allow(clippy::too_many_arguments)]
pub fn status_json(
    manifest: &Manifest,
    config: &StoreConfig,
    mounted: bool,
    upper: TreeUsage,
    frozen: Option<TreeUsage>,
    reads: ReaderStats,
    cache: CacheStats,
    model: Option<ModelCounters>,
) -> Value {
    let mut layers = vec![json!({
        "id": manifest.upper_gen, "kind": "upper", "files": upper.files, "bytes": upper.bytes,
    })];
    if let (Some(f), Some(u)) = (&manifest.frozen, frozen) {
        layers.push(json!({
            "id": f.generation, "kind": "sealing", "layer": f.layer,
            "files": u.files, "bytes": u.bytes,
        }));
    }
    for l in manifest.layers.iter().rev() {
        layers.push(json!({
            "id": l.id, "kind": "archived", "files": l.files, "bytes": l.bytes,
            "generations": l.generations, "blobs": l.devices, "level": l.level,
        }));
    }
    let images = manifest
        .layers
        .iter()
        .map(|l| &l.meta)
        .chain(manifest.blobs.iter());
    let mut containers = std::collections::BTreeSet::new();
    let mut written = 0u64;
    for img in images {
        written += img.length;
        for e in &img.extents {
            containers.insert(e.0);
        }
    }
    let mut media = json!({
        "containers_used": containers.len(),
        "bytes_written": written,
        "reads": reads.reads,
        "bytes_read": reads.bytes_fetched,
        "objects_read": reads.objects_fetched,
    });
    if let Some(m) = model {
        media["model"] = json!({
            "switches": m.switches,
            "seeks": m.seeks,
            "ops": m.ops,
            "bytes_read": m.bytes_read,
            "bytes_written": m.bytes_written,
            "sim_time_ms": m.sim_time.as_millis() as u64,
        });
    }
    json!({
        "store_id": manifest.store_id,
        "mounted": mounted,
        "media_uri": config.media,
        "archive_threshold": config.archive_threshold,
        "layers": layers,
        "media": media,
        "cache": {
            "hits": cache.hits,
            "misses": cache.misses,
            "bytes": cache.bytes,
            "entries": cache.entries,
            "evictions": cache.evictions,
            "capacity": config.cache_size,
        },
    })
}
