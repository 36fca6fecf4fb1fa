//! `spinfs mount` and `spinfs umount`: the daemon's life cycle.

use anyhow::{Context, Result, bail};
use clap::Args;
use spinfs_fuse::{MountConfig, SpinFs};
use spinfs_store::archiver::Archiver;
use spinfs_store::status::{status_json, tree_usage};
use spinfs_store::{Store, Volume};
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct MountArgs {
    /// The store to mount.
    store: PathBuf,
    /// An empty directory to mount it on.
    mountpoint: PathBuf,
    /// Stay in the foreground (log to stderr) instead of running as a daemon.
    #[arg(long)]
    foreground: bool,
    /// Mount options: allow_other, ro, nosuid, nodev, noexec, noatime, sync, dirsync,
    /// threads=N, nopassthrough (all file I/O through the daemon), passthrough_writes (files
    /// opened for writing by kernel passthrough too: a freeze then moves such a file whole
    /// into the new generation), nopassthrough_writes (read-write opens through the daemon
    /// too, by the page cache), direct_writes (read-write opens through the daemon too, by
    /// direct I/O: archived while open at near native write speed, their reads uncached). By
    /// default write-only opens go through the daemon, everything else passthrough.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
}

fn check_mountpoint(mnt: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(mnt).with_context(|| format!("mountpoint {}", mnt.display()))?;
    if !meta.is_dir() {
        bail!("mountpoint {} is not a directory", mnt.display());
    }
    let abs =
        std::fs::canonicalize(mnt).with_context(|| format!("mountpoint {}", mnt.display()))?;
    if std::fs::read_dir(&abs)
        .with_context(|| format!("mountpoint {}", mnt.display()))?
        .next()
        .is_some()
    {
        bail!("mountpoint {} is not empty", mnt.display());
    }
    if find_mount(&abs)?.is_some() {
        bail!("{} is already a spinfs mount", mnt.display());
    }
    Ok(abs)
}

pub fn mount(a: MountArgs) -> Result<ExitCode> {
    let mut cfg = MountConfig::default();
    for o in &a.options {
        cfg.parse_options(o).map_err(anyhow::Error::msg)?;
    }
    let mnt = check_mountpoint(&a.mountpoint)?;
    let mut store = Store::open(&a.store)?;
    cfg.fsname = store.layout().root().display().to_string();

    // The parent waits for the child's word that the kernel handshake is done, so that a
    // successful `spinfs mount` means the mount is usable.
    let mut status_pipe: Option<File> = None;
    if !a.foreground {
        let mut fds = [0; 2];
        // SAFETY: fds has room for two descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            bail!("pipe: {}", std::io::Error::last_os_error());
        }
        // SAFETY: pipe2 returned two fresh descriptors that we now own.
        let (rd, wr) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        // SAFETY: no other thread exists yet in this process, so forking is sound.
        match unsafe { libc::fork() } {
            -1 => bail!("fork: {}", std::io::Error::last_os_error()),
            0 => {
                drop(rd);
                status_pipe = Some(wr);
                // SAFETY: plain syscall in the child.
                unsafe { libc::setsid() };
                redirect_output(&store.layout().log())?;
                store.record_owner()?;
            }
            _child => {
                drop(wr);
                let mut rd = rd;
                let mut msg = String::new();
                let _ = rd.read_to_string(&mut msg);
                return match msg.strip_prefix("ok") {
                    Some(_) => Ok(ExitCode::SUCCESS),
                    None if msg.is_empty() => {
                        bail!(
                            "the spinfs daemon died while mounting; see {}",
                            store.layout().log().display()
                        )
                    }
                    None => bail!("{}", msg.trim_end()),
                };
            }
        }
    }
    init_logging(a.foreground);
    let result = serve(store, &mnt, &cfg, &mut status_pipe);
    if let Err(e) = &result
        && let Some(p) = status_pipe.as_mut()
    {
        let _ = write!(p, "{e:#}");
    }
    result?;
    Ok(ExitCode::SUCCESS)
}

fn serve(mut store: Store, mnt: &Path, cfg: &MountConfig, status: &mut Option<File>) -> Result<()> {
    // SAFETY: umask only affects this process; modes from the kernel are already final.
    unsafe { libc::umask(0) };
    raise_fd_limit();
    // Before any other thread exists, so that all of them inherit the blocked signals.
    spawn_signal_handler(mnt.to_path_buf());
    // A generation a crash left frozen is not sealed here: the mount serves it as the frozen
    // layer at once and the archiver seals it again in the background.
    store.recover_leftovers()?;
    let upper = store.manifest().upper_gen;
    let tree = store.layout().generation_tree(upper);
    let work = store.layout().generation_work(upper);
    let lowers = store.open_layers()?;
    let vol = Arc::new(
        Volume::new(&tree, &work, upper, lowers)
            .with_context(|| format!("cannot open the writable layer {}", tree.display()))?,
    );
    if let Some(frozen) = store.manifest().frozen.clone() {
        let ftree = store.layout().generation_tree(frozen.generation);
        vol.restore_frozen(frozen.generation, &ftree)
            .with_context(|| format!("cannot open the frozen generation {}", ftree.display()))?;
    }
    // Seal and merge writes, the seal's reads and a sealed tree's deletion hold their next
    // piece of I/O back while a sync of the writable layer runs (the media may share its
    // disk).
    vol.set_foreground_syncs(store.foreground_syncs());
    // The scheduler hears how long each of those syncs took (the adaptive background write
    // rate, `background_write_adaptive`, slows seal and merge writes down when they are slow).
    match store.scheduler() {
        Ok(sched) => vol.set_sync_observer(Box::new(move |d| sched.report_foreground_sync(d))),
        // The mount does not need the media to serve the SSD: seals will report it.
        Err(e) => tracing::warn!("media not available at mount: {e}"),
    }
    vol.set_chunk_size(store.config().chunk_size);
    if let Some(n) = store.config().stack_map_inline_max {
        vol.set_stack_map_inline_max(usize::try_from(n).unwrap_or(usize::MAX));
    }
    // Daemon-served writers wait for a seal when the SSD has less than 1.5 × the threshold
    // free, and the tree reaching the threshold wakes the archiver (see Volume::throttle).
    vol.set_flow_control(store.config().archive_threshold);
    let usage = tree_usage(&tree).with_context(|| format!("cannot measure {}", tree.display()))?;
    vol.set_upper_bytes(usage.bytes);
    let layout = store.layout().clone();
    let config = store.config().clone();
    let reader = store.reader()?;
    let cache = store.chunk_cache()?;
    let units = store.unit_cache()?;
    let model = store.media_model();
    let archiver = Archiver::start(store, vol.clone());
    let status_fn = {
        let archiver = archiver.clone();
        let layout = layout.clone();
        let vol = vol.clone();
        Arc::new(move || {
            let manifest = archiver.manifest();
            let upper = tree_usage(&layout.generation_tree(manifest.upper_gen)).unwrap_or_default();
            let frozen = manifest
                .frozen
                .as_ref()
                .and_then(|f| tree_usage(&layout.generation_tree(f.generation)).ok());
            let mut v = status_json(
                &manifest,
                &config,
                true,
                upper,
                frozen,
                reader.stats(),
                cache.as_ref().map(|c| c.stats()).unwrap_or_default(),
                model.as_ref().map(|m| m.counters()),
            );
            let s = vol.stack_stats();
            v["stacking"] = serde_json::json!({
                "stacked_copy_ups": s.stacked_copy_ups,
                "chunks_copied_up": s.chunks_copied,
                "bytes_copied_up": s.bytes_copied,
                "unstacked": s.unstacked,
                "map_files_written": s.map_files_written,
            });
            v
        })
    };
    spinfs_store::control::serve(&layout, archiver.clone(), status_fn)
        .with_context(|| format!("cannot create {}", layout.control_socket().display()))?;
    let fs = SpinFs::new(vol, cfg.passthrough).with_writers(cfg.writers);
    tracing::info!(store = %layout.root().display(), mountpoint = %mnt.display(), "mounting");
    fs.mount(mnt, cfg, || {
        if let Some(mut p) = status.take() {
            let _ = p.write_all(b"ok");
        }
    })
    .with_context(|| format!("cannot mount on {}", mnt.display()))?;
    archiver.shutdown();
    // Archived layers (held by threads that outlive this function) share the unit cache:
    // finish its SSD cache writes now rather than exit in the middle of one.
    if let Some(u) = &units {
        u.flush_and_stop();
    }
    let _ = std::fs::remove_file(layout.control_socket());
    tracing::info!("unmounted; daemon exits");
    Ok(())
}

fn init_logging(foreground: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPINFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fuser=error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(foreground)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Points stdin at /dev/null and stdout/stderr at the store's log file.
fn redirect_output(log: &Path) -> Result<()> {
    let devnull = File::open("/dev/null")?;
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open log {}", log.display()))?;
    use std::os::fd::AsRawFd;
    // SAFETY: dup2 onto the standard descriptors of this (child) process.
    unsafe {
        libc::dup2(devnull.as_raw_fd(), 0);
        libc::dup2(logf.as_raw_fd(), 1);
        libc::dup2(logf.as_raw_fd(), 2);
    }
    Ok(())
}

fn raise_fd_limit() {
    // Every inode the kernel knows holds an O_PATH descriptor.
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(lim.rlim_max);
            lim.rlim_max = lim.rlim_max.max(nr_open);
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
                lim.rlim_cur = lim.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
    }
}

/// SIGINT/SIGTERM/SIGHUP unmount cleanly, which ends the session.
fn spawn_signal_handler(mnt: PathBuf) {
    // SAFETY: signal mask manipulation before the FUSE threads start, so they inherit it.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        loop {
            let mut sig = 0;
            // SAFETY: waits on the blocked set.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            tracing::info!(signal = sig, "unmounting on signal");
            let path = CString::new(mnt.as_os_str().as_bytes()).expect("no NUL in path");
            // SAFETY: valid C string.
            if unsafe { libc::umount2(path.as_ptr(), 0) } != 0 {
                // Busy: detach now, the session ends when the last user lets go.
                // SAFETY: as above.
                unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
            }
        }
    });
}

/// The store behind a spinfs mount at `mnt` (an absolute, canonical path), if any.
fn find_mount(mnt: &Path) -> Result<Option<PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("/proc/self/mountinfo")?;
    for line in info.lines() {
        // id parent major:minor root mountpoint options... - fstype source superoptions
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < dash + 3 || fields.len() < 5 {
            continue;
        }
        let fstype = fields[dash + 1];
        if unescape(fields[4]) == mnt.as_os_str().as_bytes()
            && (fstype == "fuse" || fstype == "fuse.spinfs")
        {
            // The mount source is the store directory (see MountConfig::fsname).
            let src = PathBuf::from(std::ffi::OsStr::from_bytes(&unescape(fields[dash + 2])));
            if src.join(spinfs_store::config::CONFIG_FILE).exists() {
                return Ok(Some(src));
            }
        }
    }
    Ok(None)
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

pub fn umount(mnt: &Path) -> Result<ExitCode> {
    let abs =
        std::fs::canonicalize(mnt).with_context(|| format!("mountpoint {}", mnt.display()))?;
    let Some(store) = find_mount(&abs)? else {
        bail!("{} is not a spinfs mount", mnt.display());
    };
    let path = CString::new(abs.as_os_str().as_bytes()).context("mountpoint path")?;
    // SAFETY: valid C string.
    if unsafe { libc::umount2(path.as_ptr(), 0) } != 0 {
        let e = std::io::Error::last_os_error();
        bail!("cannot unmount {}: {e}", mnt.display());
    }
    // The daemon releases the store lock when it has finished; wait for that so that the
    // store can be used again as soon as this returns.
    let deadline = Instant::now() + Duration::from_secs(60);
    while spinfs_store::store::store_in_use(&store).is_some() {
        if Instant::now() > deadline {
            bail!(
                "unmounted {}, but the daemon of {} is still running after 60 s",
                mnt.display(),
                store.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn unescapes_mountinfo() {
        assert_eq!(super::unescape(r"/a\040b"), b"/a b");
        assert_eq!(super::unescape(r"/plain"), b"/plain");
        assert_eq!(super::unescape(r"/x\"), b"/x\\");
    }
}
