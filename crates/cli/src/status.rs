//! `spinfs status`: what a store holds, mounted or not.

use anyhow::{Context, Result};
use spinfs_store::status::{status_json, tree_usage};
use spinfs_store::store::store_in_use;
use spinfs_store::{Manifest, StoreConfig, StoreLayout, format_size};
use std::path::Path;
use std::process::ExitCode;

pub fn run(store: &Path, json: bool) -> Result<ExitCode> {
    let v = if store_in_use(store).is_some() {
        let answer = spinfs_store::control::call(
            store,
            &serde_json::json!({"cmd": "status"}),
            Some(std::time::Duration::from_secs(30)),
        )
        .map_err(anyhow::Error::msg)?;
        answer["status"].clone()
    } else {
        let layout = StoreLayout::new(store);
        let config = StoreConfig::load(store)?;
        let manifest = Manifest::load(&layout.manifest())?;
        let upper = tree_usage(&layout.generation_tree(manifest.upper_gen))
            .with_context(|| format!("cannot read the writable layer of {}", store.display()))?;
        let frozen = manifest
            .frozen
            .as_ref()
            .and_then(|f| tree_usage(&layout.generation_tree(f.generation)).ok());
        status_json(
            &manifest,
            &config,
            false,
            upper,
            frozen,
            Default::default(),
            Default::default(),
            None,
        )
    };
    if json {
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    println!("store     {}", store.display());
    println!(
        "state     {}",
        if v["mounted"] == true {
            "mounted"
        } else {
            "not mounted"
        }
    );
    println!("media     {}", v["media_uri"].as_str().unwrap_or("?"));
    let upper_bytes = n(&v["layers"][0]["bytes"]);
    let threshold = n(&v["archive_threshold"]).max(1);
    println!(
        "threshold {} (writable layer {:.0}% full)",
        format_size(threshold),
        100.0 * upper_bytes as f64 / threshold as f64
    );
    println!();
    println!(
        "{:<6} {:<9} {:>10} {:>12}",
        "LAYER", "KIND", "FILES", "BYTES"
    );
    for l in v["layers"].as_array().into_iter().flatten() {
        println!(
            "{:<6} {:<9} {:>10} {:>12}",
            n(&l["id"]),
            l["kind"].as_str().unwrap_or("?"),
            n(&l["files"]),
            format_size(n(&l["bytes"]))
        );
    }
    let m = &v["media"];
    println!();
    println!(
        "media     {} containers used, {} written, {} reads ({} read)",
        n(&m["containers_used"]),
        format_size(n(&m["bytes_written"])),
        n(&m["reads"]),
        format_size(n(&m["bytes_read"]))
    );
    let c = &v["cache"];
    println!(
        "cache     {} of {} used, {} hits, {} misses",
        format_size(n(&c["bytes"])),
        format_size(n(&c["capacity"])),
        n(&c["hits"]),
        n(&c["misses"])
    );
    Ok(ExitCode::SUCCESS)
}
