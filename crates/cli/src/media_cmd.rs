//! `spinfs media ...` subcommands: list and verify the archive medium of a store.

use anyhow::{Context, bail};
use spinfs_media::{BackendOptions, Catalogue, Geometry, Medium};
use spinfs_store::{StoreConfig, format_size};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Subcommand)]
pub enum MediaCmd {
    /// List the containers of a store's medium: fill, and what each holds.
    Ls {
        /// The store directory.
        store: PathBuf,
    },
    /// Check every object checksum of a store's medium; exits non-zero on damage.
    Verify {
        /// The store directory.
        store: PathBuf,
    },
}

pub fn run(cmd: MediaCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        MediaCmd::Ls { store } => ls(&store),
        MediaCmd::Verify { store } => verify(&store),
    }
}

/// The media geometry a store's config describes.
pub fn geometry(cfg: &StoreConfig) -> anyhow::Result<Geometry> {
    Ok(Geometry::new(
        cfg.container_size,
        cfg.container_reserved(),
        cfg.object_size,
        cfg.chunk_size,
    )?)
}

/// The medium URI of a store, a relative path being relative to the store directory.
pub fn media_uri(store: &Path, cfg: &StoreConfig) -> anyhow::Result<(String, PathBuf)> {
    let Some((scheme, path)) = cfg.media.split_once(':') else {
        bail!(
            "store {}: media URI '{}' has no scheme",
            store.display(),
            cfg.media
        );
    };
    let path = if Path::new(path).is_absolute() {
        PathBuf::from(path)
    } else {
        store.join(path)
    };
    Ok((format!("{scheme}:{}", path.display()), path))
}

fn open_medium(store: &Path) -> anyhow::Result<Arc<Medium>> {
    let cfg = StoreConfig::load(store)?;
    let (uri, path) = media_uri(store, &cfg)?;
    // Listing and verifying must not create anything.
    if !path.exists() {
        bail!("store {}: medium {uri} does not exist", store.display());
    }
    Medium::open(&uri, geometry(&cfg)?, BackendOptions::default())
        .with_context(|| format!("store {}: cannot open medium {uri}", store.display()))
}

/// A progress line on stderr, only when it is a terminal and the run lasts.
struct Progress {
    what: &'static str,
    start: Instant,
    last: Instant,
    tty: bool,
    shown: bool,
}

impl Progress {
    fn new(what: &'static str) -> Progress {
        let now = Instant::now();
        Progress {
            what,
            start: now,
            last: now,
            tty: std::io::stderr().is_terminal(),
            shown: false,
        }
    }

    fn update(&mut self, done: u64, total: u64) {
        let now = Instant::now();
        if !self.tty
            || now.duration_since(self.start) < Duration::from_millis(500)
            || (now.duration_since(self.last) < Duration::from_millis(200) && done < total)
        {
            return;
        }
        self.last = now;
        self.shown = true;
        let frac = if total == 0 {
            1.0
        } else {
            done as f64 / total as f64
        };
        let width = 30;
        let filled = (frac * width as f64) as usize;
        let secs = now.duration_since(self.start).as_secs_f64();
        eprint!(
            "\r{} [{}{}] {:5.1}% {} / {} ({}/s)  ",
            self.what,
            "#".repeat(filled),
            "-".repeat(width - filled),
            frac * 100.0,
            format_size(done),
            format_size(total),
            format_size((done as f64 / secs.max(1e-3)) as u64)
        );
        let _ = std::io::stderr().flush();
    }

    fn finish(&self) {
        if self.shown {
            eprintln!();
        }
    }
}

fn ls(store: &Path) -> anyhow::Result<ExitCode> {
    let m = open_medium(store)?;
    let g = m.geometry();
    let cat = Catalogue::scan(&m, &mut |_, _| {})?;
    println!(
        "medium {}  id {}  engine {}{}",
        m.uri(),
        m.id().map_or("(empty)".to_string(), |i| i.to_string()),
        m.backend().engine_name(),
        if m.backend().direct_io() {
            " O_DIRECT"
        } else {
            ""
        }
    );
    println!(
        "geometry: containers of {} ({} data, {} metadata), objects of {} ({} per container), \
         chunks of {}",
        format_size(g.container_size),
        format_size(g.usable()),
        format_size(g.reserved),
        format_size(g.object_size),
        g.objects_per_container(),
        format_size(g.chunk_size)
    );
    println!(
        "{:>9}  {:>11}  {:>6}  {:>10}  {:>9}  holds",
        "container", "objects", "fill", "data", "log"
    );
    for c in &cat.containers {
        let mut holds: Vec<String> = c
            .images
            .iter()
            .map(|(img, bytes)| {
                let done = if cat.images.contains_key(img) {
                    ""
                } else {
                    " incomplete"
                };
                format!("{img} {}{done}", format_size(*bytes))
            })
            .collect();
        for mk in &c.markers {
            holds.push(format!("[{mk} complete]"));
        }
        if let Some(t) = &c.torn_log {
            holds.push(format!("(torn log tail ignored: {t})"));
        }
        if c.unrecorded_tail {
            holds.push("(torn data tail ignored)".into());
        }
        println!(
            "{:>9}  {:>5}/{:<5}  {:>5.1}%  {:>10}  {:>4}/{:<4}  {}",
            c.index,
            c.objects,
            c.object_slots,
            100.0 * c.data_bytes as f64 / c.usable as f64,
            format_size(c.data_bytes),
            c.record_blocks,
            c.record_slots,
            holds.join(", ")
        );
    }
    let total: u64 = cat.containers.iter().map(|c| c.data_bytes).sum();
    println!(
        "{} containers, {} of data, {} complete images, {} incomplete writes",
        cat.containers.len(),
        format_size(total),
        cat.images.len(),
        cat.incomplete.len()
    );
    for p in &cat.problems {
        println!("problem: {p}");
    }
    Ok(if cat.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn verify(store: &Path) -> anyhow::Result<ExitCode> {
    let m = open_medium(store)?;
    let mut bar = Progress::new("verifying");
    let rep = spinfs_media::verify(&m, &mut |d, t| bar.update(d, t))?;
    bar.finish();
    for t in &rep.torn {
        println!("torn tail (ignored): {t}");
    }
    for d in &rep.damaged {
        println!(
            "DAMAGED: medium {} container {} object {}{}: {}",
            m.uri(),
            d.container,
            d.object,
            d.image.map_or(String::new(), |i| format!(" ({i})")),
            d.reason
        );
    }
    for p in &rep.problems {
        println!("DAMAGED: {p}");
    }
    println!(
        "checked {} objects ({}) in {} containers: {} damaged objects, {} other problems",
        rep.objects,
        format_size(rep.bytes),
        rep.containers,
        rep.damaged.len(),
        rep.problems.len()
    );
    Ok(if rep.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
