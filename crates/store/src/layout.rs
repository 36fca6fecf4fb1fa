//! Where things live inside a store directory.
//!
//! ```text
//! STORE/spinfs.toml      configuration (mkfs options)
//! STORE/manifest         the durable source of truth (see manifest.rs)
//! STORE/lock             flock'ed by the daemon (or an offline command); holds its pid
//! STORE/gens/G/tree/     the tree of writable generation G, real files on the SSD
//! STORE/gens/G/work/     its scratch space (copy-ups, whiteouts), emptied at mount
//! STORE/gens/G/stackmaps/ chunk maps of its stacked files too long for an xattr
//! STORE/layers/ID.meta   meta image of archived layer ID (also on the media)
//! STORE/layers/ID.heads  head cache of layer ID: the first head_size bytes of its files
//! STORE/cache/           chunk cache of archived data read from the media
//! STORE/control.sock     the daemon's control socket (owner only)
//! STORE/media/           the embedded `dir:` medium when mkfs got no --media
//! STORE/spinfs.log       the daemon's log when it runs in the background
//! ```

use std::path::{Path, PathBuf};

/// Paths of one store.
#[derive(Debug, Clone)]
pub struct StoreLayout {
    root: PathBuf,
}

impl StoreLayout {
    pub fn new(root: impl Into<PathBuf>) -> StoreLayout {
        StoreLayout { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn config(&self) -> PathBuf {
        self.root.join(crate::config::CONFIG_FILE)
    }
    pub fn manifest(&self) -> PathBuf {
        self.root.join("manifest")
    }
    pub fn lock(&self) -> PathBuf {
        self.root.join("lock")
    }
    pub fn gens(&self) -> PathBuf {
        self.root.join("gens")
    }
    pub fn generation(&self, gen_id: u64) -> PathBuf {
        self.gens().join(format!("{gen_id:016x}"))
    }
    pub fn generation_tree(&self, gen_id: u64) -> PathBuf {
        self.generation(gen_id).join("tree")
    }
    /// Scratch space of generation G's tree (copy-ups and whiteouts are prepared here).
    pub fn generation_work(&self, gen_id: u64) -> PathBuf {
        self.generation(gen_id).join("work")
    }
    /// Meta images of archived layers, kept on the SSD.
    pub fn layers(&self) -> PathBuf {
        self.root.join("layers")
    }
    pub fn layer_meta(&self, id: u64) -> PathBuf {
        self.layers().join(format!("{id:016x}.meta"))
    }
    /// Head cache of archived layer ID (first bytes of every file, keyed by inode number).
    pub fn layer_heads(&self, id: u64) -> PathBuf {
        self.layers().join(format!("{id:016x}.heads"))
    }
    /// The chunk cache of archived data.
    pub fn chunk_cache(&self) -> PathBuf {
        self.root.join("cache")
    }
    pub fn control_socket(&self) -> PathBuf {
        self.root.join("control.sock")
    }
    pub fn default_media(&self) -> PathBuf {
        self.root.join("media")
    }
    pub fn log(&self) -> PathBuf {
        self.root.join("spinfs.log")
    }
}
