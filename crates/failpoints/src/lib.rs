//! Crash points in the durable steps of spinfs, for the fault-injection tests.
//!
//! `fail_point!("name")` marks a place where a crash must leave a recoverable store. With the
//! `enabled` feature, the process reads `SPINFS_FAILPOINTS` once, at the first point it
//! passes: a `;`-separated list of `NAME` or `NAME@N` (crash at the N-th pass, 1-based; `NAME`
//! is `NAME@1`). Reaching an armed point appends `NAME@N` to the file named by
//! `SPINFS_FAILPOINTS_HITS` (when set, fsync'ed so the record survives), prints it to stderr
//! and sends SIGKILL to the whole process: no destructor, no buffered write and no other
//! thread runs after it, exactly as `kill -9` at that instant. `SPINFS_FAILPOINTS_TRACE=FILE`
//! appends the name of every point passed (armed or not) to FILE, for finding which points a
//! workload reaches.
//!
//! Without the feature the macro expands to nothing.

#[cfg(feature = "enabled")]
#[macro_export]
macro_rules! fail_point {
    ($name:literal) => {
        $crate::hit($name)
    };
}

#[cfg(not(feature = "enabled"))]
#[macro_export]
macro_rules! fail_point {
    ($name:literal) => {};
}

#[cfg(feature = "enabled")]
mod enabled {
    use std::collections::HashMap;
    use std::io::Write;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Config {
        /// name -> (pass that crashes, passes so far)
        armed: HashMap<String, (u64, AtomicU64)>,
        hits_file: Option<String>,
        trace_file: Option<std::sync::Mutex<std::fs::File>>,
    }

    fn config() -> &'static Config {
        static CONFIG: OnceLock<Config> = OnceLock::new();
        CONFIG.get_or_init(|| {
            let mut armed = HashMap::new();
            if let Ok(spec) = std::env::var("SPINFS_FAILPOINTS") {
                for item in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                    let (name, nth) = match item.split_once('@') {
                        Some((n, c)) => match c.parse::<u64>() {
                            Ok(c) if c >= 1 => (n, c),
                            _ => {
                                eprintln!("SPINFS_FAILPOINTS: bad count in {item:?}; ignored");
                                continue;
                            }
                        },
                        None => (item, 1),
                    };
                    armed.insert(name.to_string(), (nth, AtomicU64::new(0)));
                }
            }
            let trace_file = std::env::var("SPINFS_FAILPOINTS_TRACE").ok().and_then(|p| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .ok()
                    .map(std::sync::Mutex::new)
            });
            Config {
                armed,
                hits_file: std::env::var("SPINFS_FAILPOINTS_HITS").ok(),
                trace_file,
            }
        })
    }

    pub fn hit(name: &'static str) {
        let cfg = config();
        if let Some(t) = &cfg.trace_file {
            let _ = writeln!(t.lock().unwrap(), "{name}");
        }
        let Some((nth, passes)) = cfg.armed.get(name) else {
            return;
        };
        let pass = passes.fetch_add(1, Ordering::SeqCst) + 1;
        if pass != *nth {
            return;
        }
        if let Some(path) = &cfg.hits_file
            && let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
        {
            let _ = writeln!(f, "{name}@{pass}");
            let _ = f.sync_all();
        }
        eprintln!("spinfs: fail point {name}@{pass} reached: SIGKILL");
        // SAFETY: plain syscalls on our own process.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        // SIGKILL is delivered before kill(2) returns to user space; never go on regardless.
        std::process::abort();
    }
}

#[cfg(feature = "enabled")]
pub use enabled::hit;

/// Whether this build carries fail points (the `enabled` feature).
pub const ENABLED: bool = cfg!(feature = "enabled");
