//! Creating and opening a store: mkfs, the exclusive lock, config and manifest.

use crate::config::{ConfigError, StoreConfig};
use crate::layout::StoreLayout;
use crate::manifest::{Manifest, ManifestError};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {0} does not exist")]
    Missing(PathBuf),
    #[error("{0} is not a spinfs store (no spinfs.toml)")]
    NotAStore(PathBuf),
    #[error("store directory {0} exists and is not empty")]
    NotEmpty(PathBuf),
    #[error("store {path} is in use by process {pid} (mounted, or another spinfs command runs)")]
    Busy { path: PathBuf, pid: String },
    #[error("{context} {path}: {error}")]
    Io {
        context: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

fn io_err(context: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |error| StoreError::Io {
        context,
        path,
        error,
    }
}

/// An open store, exclusively locked by this process for as long as it lives.
#[derive(Debug)]
pub struct Store {
    layout: StoreLayout,
    config: StoreConfig,
    manifest: Manifest,
    lock: File,
}

impl Store {
    /// `spinfs mkfs`: creates a store in `root`, which must not exist or be an empty
    /// directory. `config.media` may be empty, meaning the embedded `dir:STORE/media`.
    /// Nothing is written unless the configuration is valid.
    pub fn create(root: &Path, mut config: StoreConfig) -> Result<(), StoreError> {
        if config.media.is_empty() {
            let abs = absolute(root)?;
            config.media = format!("dir:{}", abs.join("media").display());
        }
        config.validate()?;
        match fs::read_dir(root) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(StoreError::NotEmpty(root.to_path_buf()));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir_all(root).map_err(io_err("cannot create store", root))?;
            }
            Err(e) => return Err(io_err("cannot read store directory", root)(e)),
        }
        let layout = StoreLayout::new(root);
        let mut manifest = Manifest::new(random_id()?);
        fs::create_dir_all(layout.generation_tree(manifest.upper_gen))
            .map_err(io_err("cannot create", &layout.gens()))?;
        if let Some(dir) = config.media.strip_prefix("dir:") {
            fs::create_dir_all(dir)
                .map_err(io_err("cannot create media directory", Path::new(dir)))?;
        }
        let cfg_path = layout.config();
        let mut f = File::create(&cfg_path).map_err(io_err("cannot write", &cfg_path))?;
        f.write_all(config.to_toml().as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(io_err("cannot write", &cfg_path))?;
        manifest.commit(&layout.manifest())?;
        Ok(())
    }

    /// Opens an existing store and takes its exclusive lock.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        if !root.exists() {
            return Err(StoreError::Missing(root.to_path_buf()));
        }
        let layout = StoreLayout::new(absolute(root)?);
        if !layout.config().exists() {
            return Err(StoreError::NotAStore(root.to_path_buf()));
        }
        let config = StoreConfig::load(layout.root())?;
        let lock = take_lock(&layout)?;
        let manifest = Manifest::load(&layout.manifest())?;
        Ok(Store {
            layout,
            config,
            manifest,
            lock,
        })
    }

    pub fn layout(&self) -> &StoreLayout {
        &self.layout
    }
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Records this process's pid in the lock file (after a daemon forked).
    pub fn record_owner(&mut self) -> Result<(), StoreError> {
        let path = self.layout.lock();
        write_pid(&mut self.lock).map_err(io_err("cannot write", &path))
    }
}

/// Whether some process holds the store's lock right now (the store is mounted or busy).
pub fn store_in_use(root: &Path) -> Option<String> {
    let layout = StoreLayout::new(root);
    match take_lock(&layout) {
        Ok(_) => None,
        Err(StoreError::Busy { pid, .. }) => Some(pid),
        Err(_) => None,
    }
}

fn take_lock(layout: &StoreLayout) -> Result<File, StoreError> {
    let path = layout.lock();
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err("cannot open lock", &path))?;
    // SAFETY: flock on a descriptor we own.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        let mut pid = String::new();
        let _ = f.read_to_string(&mut pid);
        let pid = pid.trim();
        return Err(StoreError::Busy {
            path: layout.root().to_path_buf(),
            pid: if pid.is_empty() {
                "?".into()
            } else {
                pid.into()
            },
        });
    }
    write_pid(&mut f).map_err(io_err("cannot write", &path))?;
    Ok(f)
}

fn write_pid(f: &mut File) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    f.set_len(0)?;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(std::process::id().to_string().as_bytes())
}

fn absolute(p: &Path) -> Result<PathBuf, StoreError> {
    std::path::absolute(p).map_err(io_err("cannot resolve", p))
}

fn random_id() -> Result<String, StoreError> {
    let mut bytes = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(io_err("cannot read", Path::new("/dev/urandom")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> StoreConfig {
        StoreConfig::default()
    }

    #[test]
    fn mkfs_then_open_locks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("s");
        Store::create(&root, small()).unwrap();
        assert!(root.join("media").is_dir());
        let s = Store::open(&root).unwrap();
        assert_eq!(s.manifest().upper_gen, 1);
        assert!(s.layout().generation_tree(1).is_dir());
        let again = Store::open(&root).unwrap_err();
        assert!(matches!(again, StoreError::Busy { .. }), "{again}");
        drop(s);
        Store::open(&root).unwrap();
    }

    #[test]
    fn mkfs_refuses_non_empty_and_bad_config_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x"), b"1").unwrap();
        assert!(matches!(
            Store::create(dir.path(), small()),
            Err(StoreError::NotEmpty(_))
        ));
        let fresh = dir.path().join("fresh");
        let bad = StoreConfig {
            chunk_size: 12345,
            ..small()
        };
        assert!(Store::create(&fresh, bad).is_err());
        assert!(!fresh.exists(), "a refused mkfs must not create anything");
    }
}
