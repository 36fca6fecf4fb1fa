//! `spinfs status`: what a store holds, mounted or not.

use anyhow::{Context, Result};
use spinfs_store::store::store_in_use;
use spinfs_store::{Manifest, StoreConfig, StoreLayout, format_size};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::ExitCode;

/// Files (non-directories, each inode once) and bytes of regular-file data in a tree.
#[derive(Debug, Default, Clone, Copy)]
pub struct TreeUsage {
    pub files: u64,
    pub bytes: u64,
}

pub fn tree_usage(root: &Path) -> Result<TreeUsage> {
    let mut usage = TreeUsage::default();
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            // Entries can vanish under a live mount while we walk.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
        };
        for entry in entries {
            let Ok(entry) = entry else { continue };
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.nlink() == 1 || seen.insert(meta.ino()) {
                usage.files += 1;
                if meta.is_file() {
                    usage.bytes += meta.len();
                }
            }
        }
    }
    Ok(usage)
}

pub fn run(store: &Path, json: bool) -> Result<ExitCode> {
    let layout = StoreLayout::new(store);
    let config = StoreConfig::load(store)?;
    let manifest = Manifest::load(&layout.manifest())?;
    let owner = store_in_use(store);
    let upper = tree_usage(&layout.generation_tree(manifest.upper_gen))?;
    if json {
        let v = serde_json::json!({
            "store": store.display().to_string(),
            "store_id": manifest.store_id,
            "mounted": owner.is_some(),
            "daemon_pid": owner,
            "media_uri": config.media,
            "archive_threshold": config.archive_threshold,
            "layers": [{
                "id": manifest.upper_gen,
                "kind": "upper",
                "files": upper.files,
                "bytes": upper.bytes,
            }],
        });
        println!("{v}");
    } else {
        println!("store     {}", store.display());
        println!(
            "state     {}",
            match &owner {
                Some(pid) => format!("in use by process {pid}"),
                None => "not mounted".into(),
            }
        );
        println!("media     {}", config.media);
        println!(
            "threshold {} (upper layer {:.0}% full)",
            format_size(config.archive_threshold),
            100.0 * upper.bytes as f64 / config.archive_threshold as f64
        );
        println!();
        println!(
            "{:<6} {:<9} {:>10} {:>12}",
            "LAYER", "KIND", "FILES", "BYTES"
        );
        println!(
            "{:<6} {:<9} {:>10} {:>12}",
            manifest.upper_gen,
            "upper",
            upper.files,
            format_size(upper.bytes)
        );
    }
    Ok(ExitCode::SUCCESS)
}
