//! The `spinfs` command: argument parsing and wiring of the library crates.

mod daemon;
mod fsck_cmd;
mod image_cmd;
mod media_cmd;
mod status;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use spinfs_store::{Store, StoreConfig, parse_size};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "spinfs", version, about = "A tiered archival filesystem")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a store (SSD directory + archive medium).
    Mkfs(MkfsArgs),
    /// Mount a store (runs in the background unless --foreground).
    Mount(daemon::MountArgs),
    /// Unmount a spinfs mount and wait for its daemon to finish.
    Umount {
        /// The mount point.
        mountpoint: PathBuf,
    },
    /// Show layers, media usage, queues, cache and counters.
    Status {
        store: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Seal the writable layer into an archived layer on the media now.
    Archive {
        store: PathBuf,
        /// Return only when the layer is durable on the media (always the case offline).
        #[arg(long)]
        wait: bool,
    },
    /// Merge archived layers now (those due by the fan-in rule, else the newest ones).
    Merge {
        store: PathBuf,
        /// Return only when the merged layer is committed (always the case offline).
        #[arg(long)]
        wait: bool,
    },
    /// Write archived layer ID as a kernel-mountable EROFS pair: DIR/meta.ID, DIR/blob.N.
    Export {
        store: PathBuf,
        /// The archived layer (see `spinfs status`).
        #[arg(long)]
        layer: u64,
        /// Directory to write into (created when missing; must be empty).
        dir: PathBuf,
    },
    /// Check a store (manifest, SSD, media, caches); --repair fixes what can be fixed.
    /// Exit 0: clean; 1: problems found and all repaired; 4: problems remain; 8: could not run.
    Fsck {
        store: PathBuf,
        /// Fix what can be fixed without losing data, and say what cannot be fixed.
        #[arg(long)]
        repair: bool,
        /// Show progress on stderr even when it is not a terminal.
        #[arg(long)]
        progress: bool,
    },
    /// Rebuild a store from its archive media alone (after the SSD store was lost).
    Recover {
        /// The archive medium: dir:PATH or file:PATH.
        #[arg(long)]
        media: String,
        /// Store directory to create (must not exist or be empty).
        store: PathBuf,
        /// Show progress on stderr even when it is not a terminal.
        #[arg(long)]
        progress: bool,
    },
    /// Work with EROFS image pairs directly (build, merge, list, cat).
    #[command(subcommand)]
    Image(image_cmd::ImageCmd),
    /// Inspect and verify the archive media of a store.
    #[command(subcommand)]
    Media(media_cmd::MediaCmd),
}

#[derive(Args)]
struct MkfsArgs {
    /// Store directory to create (must not exist or be empty).
    store: PathBuf,
    /// Archive medium: dir:PATH or file:PATH (default: dir:STORE/media).
    #[arg(long)]
    media: Option<String>,
    /// Writable-layer data that triggers a seal (default 1G).
    #[arg(long, value_name = "SIZE")]
    archive_threshold: Option<String>,
    /// Archived layers merged into one (default 4).
    #[arg(long, value_name = "N")]
    merge_fanin: Option<u32>,
    /// Media container size, metadata included (default 480M).
    #[arg(long, value_name = "SIZE")]
    container_size: Option<String>,
    /// Media object size (default 252K).
    #[arg(long, value_name = "SIZE")]
    object_size: Option<String>,
    /// Write chunk and EROFS chunk size, a power of two >= 4K (default 4M).
    #[arg(long, value_name = "SIZE")]
    chunk_size: Option<String>,
    /// SSD cache for archived data (default 10G).
    #[arg(long, value_name = "SIZE")]
    cache_size: Option<String>,
    /// Head of every archived file kept on the SSD (default 64K).
    #[arg(long, value_name = "SIZE")]
    head_size: Option<String>,
    /// Archived images held open at once (default 64).
    #[arg(long, value_name = "N")]
    max_open_images: Option<u32>,
}

fn size_arg(name: &str, value: &Option<String>, default: u64) -> Result<u64> {
    match value {
        None => Ok(default),
        Some(v) => parse_size(v).with_context(|| format!("--{name}")),
    }
}

fn mkfs(a: MkfsArgs) -> Result<ExitCode> {
    let d = StoreConfig::default();
    let config = StoreConfig {
        media: a.media.clone().unwrap_or_default(),
        archive_threshold: size_arg(
            "archive-threshold",
            &a.archive_threshold,
            d.archive_threshold,
        )?,
        merge_fanin: a.merge_fanin.unwrap_or(d.merge_fanin),
        container_size: size_arg("container-size", &a.container_size, d.container_size)?,
        object_size: size_arg("object-size", &a.object_size, d.object_size)?,
        chunk_size: size_arg("chunk-size", &a.chunk_size, d.chunk_size)?,
        cache_size: size_arg("cache-size", &a.cache_size, d.cache_size)?,
        head_size: size_arg("head-size", &a.head_size, d.head_size)?,
        max_open_images: a.max_open_images.unwrap_or(d.max_open_images),
        ..d
    };
    if let Some(m) = &a.media
        && let Some(p) = m.strip_prefix("file:")
        && !std::path::Path::new(p).exists()
    {
        bail!("media {m}: {p} does not exist (create the file or device first)");
    }
    // Check and claim the medium before the store exists, so that a medium that already
    // holds another store's containers is refused without anything written.
    if config.media.is_empty() {
        Store::create(&a.store, config.clone())?;
        let cfg = StoreConfig::load(&a.store)?;
        format_medium(&cfg)?;
    } else {
        config.validate()?;
        format_medium(&config)?;
        Store::create(&a.store, config)?;
    }
    println!("created spinfs store {}", a.store.display());
    Ok(ExitCode::SUCCESS)
}

fn archive(store: &std::path::Path, wait: bool) -> Result<ExitCode> {
    if spinfs_store::store::store_in_use(store).is_some() {
        let v = spinfs_store::control::call(
            store,
            &serde_json::json!({"cmd": "archive", "wait": wait}),
            None,
        )
        .map_err(anyhow::Error::msg)?;
        if let Some(s) = v.get("sealed") {
            println!(
                "sealed layer {} ({} files, {})",
                s["layer"],
                s["files"],
                spinfs_store::format_size(s["bytes"].as_u64().unwrap_or(0))
            );
        } else if v.get("empty").is_some() {
            println!(
                "nothing to archive: the writable layer of {} is empty",
                store.display()
            );
        } else {
            println!("seal of {} requested", store.display());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut s = Store::open(store)?;
    match s.archive()? {
        Some(layer) => println!(
            "sealed layer {} ({} files, {}) onto {}",
            layer.id,
            layer.files,
            spinfs_store::format_size(layer.bytes),
            s.config().media
        ),
        None => println!(
            "nothing to archive: the writable layer of {} is empty",
            store.display()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

fn merge(store: &std::path::Path, wait: bool) -> Result<ExitCode> {
    if spinfs_store::store::store_in_use(store).is_some() {
        let v = spinfs_store::control::call(
            store,
            &serde_json::json!({"cmd": "merge", "wait": wait}),
            None,
        )
        .map_err(anyhow::Error::msg)?;
        match v.get("merged").and_then(|m| m.as_u64()) {
            Some(id) => println!("merged into layer {id}"),
            None if wait => println!("nothing to merge in {}", store.display()),
            None => println!("merge of {} requested", store.display()),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut s = Store::open(store)?;
    s.recover()?;
    match s.merge(true)? {
        Some(layer) => println!(
            "merged into layer {} (level {}, {} files, {})",
            layer.id,
            layer.level,
            layer.files,
            spinfs_store::format_size(layer.bytes)
        ),
        None => println!("nothing to merge in {}", store.display()),
    }
    Ok(ExitCode::SUCCESS)
}

fn export(store: &std::path::Path, layer: u64, dir: &std::path::Path) -> Result<ExitCode> {
    let e = spinfs_store::export::export_layer(store, layer, dir)?;
    let devices: Vec<String> = e.blobs.iter().map(|b| b.display().to_string()).collect();
    println!(
        "exported layer {} ({}): {} with {} device(s) {}",
        e.layer,
        spinfs_store::format_size(e.bytes),
        e.meta.display(),
        devices.len(),
        devices.join(" ")
    );
    Ok(ExitCode::SUCCESS)
}

fn format_medium(cfg: &StoreConfig) -> Result<()> {
    let geometry = media_cmd::geometry(cfg)?;
    if let Some(dir) = cfg.media.strip_prefix("dir:") {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create media directory {dir}"))?;
    }
    spinfs_media::Medium::format(
        &cfg.media,
        geometry,
        spinfs_media::BackendOptions::default(),
        false,
    )
    .with_context(|| format!("media {}", cfg.media))?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line: clap's first line, without its usage block.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("bad arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("spinfs: {first} (see spinfs --help)");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Mkfs(a) => mkfs(a),
        Command::Mount(a) => daemon::mount(a),
        Command::Umount { mountpoint } => daemon::umount(&mountpoint),
        Command::Status { store, json } => status::run(&store, json),
        Command::Archive { store, wait } => archive(&store, wait),
        Command::Merge { store, wait } => merge(&store, wait),
        Command::Export { store, layer, dir } => export(&store, layer, &dir),
        Command::Fsck {
            store,
            repair,
            progress,
        } => fsck_cmd::fsck(&store, repair, progress),
        Command::Recover {
            media,
            store,
            progress,
        } => fsck_cmd::recover(&media, &store, progress),
        Command::Image(cmd) => image_cmd::run(cmd),
        Command::Media(cmd) => media_cmd::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // Errors are one line, whatever the layers below put into their messages.
            let text = format!("{e:#}");
            let line: Vec<&str> = text
                .split('\n')
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("spinfs: {}", line.join(" "));
            ExitCode::FAILURE
        }
    }
}
