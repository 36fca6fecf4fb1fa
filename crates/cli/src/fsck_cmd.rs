//! `spinfs fsck` and `spinfs recover`: thin wrappers over `spinfs_store::fsck` and
//! `spinfs_store::state::recover`.

use anyhow::Result;
use spinfs_store::fsck::{EXIT_FAILED, FsckOptions, fsck as run_fsck};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Progress on stderr, at most a few times a second, overwritten in place on a terminal.
struct Progress {
    on: bool,
    tty: bool,
    last: Option<Instant>,
    shown: bool,
}

impl Progress {
    fn new(forced: bool) -> Progress {
        let tty = std::io::stderr().is_terminal();
        Progress {
            on: forced || tty,
            tty,
            last: None,
            shown: false,
        }
    }

    fn update(&mut self, phase: &str, done: u64, total: u64) {
        if !self.on {
            return;
        }
        let now = Instant::now();
        let finished = total > 0 && done >= total;
        if !finished
            && self
                .last
                .is_some_and(|t| now - t < Duration::from_millis(200))
        {
            return;
        }
        self.last = Some(now);
        let pct = (done * 100).checked_div(total).unwrap_or(100).min(100);
        let line = format!("{phase}: {pct}% ({done}/{total})");
        let mut e = std::io::stderr();
        if self.tty {
            let _ = write!(e, "\r\x1b[K{line}");
        } else {
            let _ = writeln!(e, "{line}");
        }
        self.shown = true;
    }

    fn finish(&mut self) {
        if self.tty && self.shown {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
    }
}

pub fn fsck(store: &Path, repair: bool, progress: bool) -> Result<ExitCode> {
    let mut p = Progress::new(progress);
    let result = run_fsck(
        store,
        FsckOptions {
            repair,
            progress: &mut |phase, d, t| p.update(phase, d, t),
        },
    );
    p.finish();
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("spinfs: fsck: {e}");
            return Ok(ExitCode::from(EXIT_FAILED));
        }
    };
    for f in &report.findings {
        println!("{f}");
    }
    let code = report.exit_code(repair);
    println!(
        "{}: {} layer(s), {} inode(s), {} media object(s) ({}), {} head(s), {} cache entr{}; \
         {} problem(s){}",
        store.display(),
        report.layers,
        report.inodes,
        report.media_objects,
        spinfs_store::format_size(report.media_bytes),
        report.heads,
        report.cache_entries,
        if report.cache_entries == 1 {
            "y"
        } else {
            "ies"
        },
        report.problems(),
        if repair {
            format!(", {} repaired", report.repaired())
        } else {
            String::new()
        }
    );
    Ok(ExitCode::from(code))
}

pub fn recover(media: &str, store: &Path, progress: bool) -> Result<ExitCode> {
    let mut p = Progress::new(progress);
    let result =
        spinfs_store::state::recover(media, store, &mut |phase, d, t| p.update(phase, d, t));
    p.finish();
    let r = result.map_err(|e| anyhow::anyhow!("recover: {e}"))?;
    for s in &r.skipped {
        println!("skipped damaged state snapshot {s}");
    }
    for h in &r.heads_missing {
        println!("head not restored (damaged blob data): {h}");
    }
    println!(
        "recovered store {} from {media}: {} layer(s) as of state snapshot {}, a new empty \
         writable layer",
        store.display(),
        r.layers,
        r.snapshot
    );
    Ok(ExitCode::SUCCESS)
}
