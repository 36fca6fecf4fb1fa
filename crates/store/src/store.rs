//! Creating and opening a store: mkfs, the exclusive lock, config and manifest.

use crate::archive::{ArchivedLayer, ImagePool};
use crate::cache::ChunkCache;
use crate::config::{ConfigError, StoreConfig};
use crate::layout::StoreLayout;
use crate::manifest::{FrozenGen, LayerRecord};
use crate::manifest::{Manifest, ManifestError};
use crate::seal;
use crate::units::UnitCache;
use spinfs_media::{
    BackendOptions, Device, ForegroundSyncs, MediaScheduler, Medium, MediumReader, ModelDevice,
};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    #[error(
        "{error}; run `spinfs fsck --repair {}` to rebuild it from the state snapshots on the \
         media (or `spinfs recover --media URI NEWSTORE` to rebuild a whole store from the media)",
        store.display()
    )]
    ManifestDamaged {
        error: ManifestError,
        store: PathBuf,
    },
    #[error("media {uri}: {error}")]
    Media {
        uri: String,
        error: spinfs_media::MediaError,
    },
    #[error(transparent)]
    Seal(#[from] crate::seal::SealError),
    #[error("archived layer: {0}")]
    Layer(String),
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
pub struct Store {
    layout: StoreLayout,
    config: StoreConfig,
    manifest: Manifest,
    lock: File,
    medium: Option<Arc<Medium>>,
    reader: Option<Arc<MediumReader>>,
    model: Option<Arc<ModelDevice>>,
    cache: Option<Arc<ChunkCache>>,
    pool: Option<Arc<ImagePool>>,
    sched: Option<Arc<MediaScheduler>>,
    units: Option<Arc<UnitCache>>,
    /// Syncs of the writable layer that seals, merges and tree deletions yield to.
    syncs: Arc<ForegroundSyncs>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.layout.root())
            .field("manifest", &self.manifest)
            .finish()
    }
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
        let manifest = Manifest::load(&layout.manifest()).map_err(|error| match error {
            ManifestError::Io { error: ref e, .. } if e.kind() != std::io::ErrorKind::NotFound => {
                StoreError::Manifest(error)
            }
            // Written by a newer spinfs: not damage, nothing to rebuild.
            ManifestError::Version { .. } => StoreError::Manifest(error),
            error => StoreError::ManifestDamaged {
                error,
                store: root.to_path_buf(),
            },
        })?;
        let syncs = Arc::new(ForegroundSyncs::new(std::time::Duration::from_millis(
            config.media_io.sync_yield_ms,
        )));
        Ok(Store {
            layout,
            config,
            manifest,
            lock,
            medium: None,
            reader: None,
            model: None,
            cache: None,
            pool: None,
            sched: None,
            units: None,
            syncs,
        })
    }

    /// The archive medium, opened on first use.
    pub fn medium(&mut self) -> Result<Arc<Medium>, StoreError> {
        if let Some(m) = &self.medium {
            return Ok(m.clone());
        }
        let uri = self.config.media.clone();
        let media_err = |error| StoreError::Media {
            uri: uri.clone(),
            error,
        };
        let geometry = self.config.geometry().map_err(media_err)?;
        let m = if self.config.media_fault.is_empty() {
            Medium::open(&uri, geometry, BackendOptions::default()).map_err(media_err)?
        } else {
            // Injected faults (tests): the backend behind a wrapper that applies them.
            let rules = self
                .config
                .media_fault
                .iter()
                .map(|f| f.rule())
                .collect::<Result<Vec<_>, _>>()?;
            tracing::warn!(
                rules = rules.len(),
                "media faults are injected ([[media_fault]])"
            );
            let inner = spinfs_media::open_backend(
                &uri,
                geometry.container_size,
                BackendOptions::default(),
            )
            .map_err(media_err)?;
            let backend = Arc::new(spinfs_media::FaultBackend::new(inner, geometry, rules));
            Medium::with_backend(backend, geometry).map_err(media_err)?
        };
        self.medium = Some(m.clone());
        Ok(m)
    }

    /// The media I/O scheduler: foreground reads before background archive writes, reads
    /// batched per container in offset order, background bandwidth capped.
    pub fn scheduler(&mut self) -> Result<Arc<MediaScheduler>, StoreError> {
        if let Some(s) = &self.sched {
            return Ok(s.clone());
        }
        let medium = self.medium()?;
        let s = MediaScheduler::new(medium, self.config.media_io.sched_config());
        s.set_foreground_syncs(self.syncs.clone());
        self.sched = Some(s.clone());
        Ok(s)
    }

    /// The syncs of the writable layer that background I/O (seals, merges, the deletion of
    /// a sealed tree) yields to: the mount reports its fsyncs here (see
    /// `spinfs_media::fgsync`).
    pub fn foreground_syncs(&self) -> Arc<ForegroundSyncs> {
        self.syncs.clone()
    }

    /// The shared reader of archived data. With a `[media_model]`, its reads go through a
    /// scheduler in front of the model in front of the medium.
    pub fn reader(&mut self) -> Result<Arc<MediumReader>, StoreError> {
        if let Some(r) = &self.reader {
            return Ok(r.clone());
        }
        let medium = self.medium()?;
        let sched = match &self.config.media_model {
            Some(m) => {
                let model = Arc::new(ModelDevice::new(
                    m.params(),
                    Some(medium.clone() as Arc<dyn Device>),
                    1.0,
                ));
                self.model = Some(model.clone());
                MediaScheduler::new(model, self.config.media_io.sched_config())
            }
            None => self.scheduler()?,
        };
        let r = Arc::new(MediumReader::new(medium, Some(sched)));
        self.reader = Some(r.clone());
        Ok(r)
    }

    /// The pool bounding open meta images.
    pub fn image_pool(&mut self) -> Arc<ImagePool> {
        self.pool
            .get_or_insert_with(|| ImagePool::new(self.config.max_open_images as usize))
            .clone()
    }

    /// The media model archived reads go through (`[media_model]`), once the reader exists.
    pub fn media_model(&self) -> Option<Arc<ModelDevice>> {
        self.model.clone()
    }

    /// The chunk cache of archived data (`None` when cache_size is 0).
    pub fn chunk_cache(&mut self) -> Result<Option<Arc<ChunkCache>>, StoreError> {
        if self.config.cache_size == 0 {
            return Ok(None);
        }
        if let Some(c) = &self.cache {
            return Ok(Some(c.clone()));
        }
        let c = Arc::new(
            ChunkCache::open(
                &self.layout.chunk_cache(),
                self.config.cache_size,
                self.config.object_size,
            )
            .map_err(|e| StoreError::Layer(format!("chunk cache: {e}")))?,
        );
        self.cache = Some(c.clone());
        Ok(Some(c))
    }

    /// The read path in front of the chunk cache (`None` when cache_size is 0).
    pub fn unit_cache(&mut self) -> Result<Option<Arc<UnitCache>>, StoreError> {
        if let Some(u) = &self.units {
            return Ok(Some(u.clone()));
        }
        let Some(chunks) = self.chunk_cache()? else {
            return Ok(None);
        };
        let u = UnitCache::new(chunks);
        self.units = Some(u.clone());
        Ok(Some(u))
    }

    /// Counters of archived reads: (media reader, chunk cache).
    pub fn read_stats(&self) -> (spinfs_media::reader::ReaderStats, crate::cache::CacheStats) {
        (
            self.reader.as_ref().map(|r| r.stats()).unwrap_or_default(),
            self.cache.as_ref().map(|c| c.stats()).unwrap_or_default(),
        )
    }

    /// Opens every archived layer, newest first.
    pub fn open_layers(&mut self) -> Result<Vec<Arc<ArchivedLayer>>, StoreError> {
        let ids: Vec<u64> = self.manifest.layers.iter().rev().map(|l| l.id).collect();
        ids.into_iter().map(|id| self.open_layer(id)).collect()
    }

    /// Finishes or rolls back whatever a crash interrupted, and removes leftovers: a frozen
    /// generation is sealed again, generation trees and meta images that the manifest does
    /// not reference are deleted, and work directories are emptied.
    pub fn recover(&mut self) -> Result<(), StoreError> {
        if let Some(frozen) = self.manifest.frozen.clone() {
            tracing::info!(
                generation = frozen.generation,
                layer = frozen.layer,
                "sealing a generation a crash interrupted"
            );
            self.seal_frozen(frozen)?;
            spinfs_failpoints::fail_point!("recover.resealed");
        }
        self.recover_leftovers()
    }

    /// `recover` without sealing: a frozen generation stays (its tree is kept) for the
    /// caller to serve and seal in the background (the mount does: `Archiver::start`).
    /// Everything else a crash left behind is removed, including whatever an interrupted
    /// seal of the frozen generation had written on the SSD (its meta and head files);
    /// what it wrote on the media after the last commit is ignored by the next writer.
    pub fn recover_leftovers(&mut self) -> Result<(), StoreError> {
        let mut live_gens: Vec<u64> = vec![self.manifest.upper_gen];
        if let Some(frozen) = &self.manifest.frozen {
            tracing::info!(
                generation = frozen.generation,
                layer = frozen.layer,
                "a crash interrupted the seal of a generation: it stays frozen and is sealed again"
            );
            live_gens.push(frozen.generation);
        }
        if let Ok(entries) = fs::read_dir(self.layout.gens()) {
            for e in entries.flatten() {
                let keep = e
                    .file_name()
                    .to_str()
                    .and_then(|n| u64::from_str_radix(n, 16).ok())
                    .is_some_and(|g| live_gens.contains(&g));
                if !keep {
                    tracing::info!(path = %e.path().display(), "removing a leftover generation");
                    fs::remove_dir_all(e.path()).map_err(io_err("cannot remove", &e.path()))?;
                }
            }
        }
        let work = self.layout.generation_work(self.manifest.upper_gen);
        if work.exists() {
            fs::remove_dir_all(&work).map_err(io_err("cannot clean", &work))?;
        }
        let live_layers: Vec<PathBuf> = self
            .manifest
            .layers
            .iter()
            .flat_map(|l| [self.layout.layer_meta(l.id), self.layout.layer_heads(l.id)])
            .collect();
        if let Ok(entries) = fs::read_dir(self.layout.layers()) {
            for e in entries.flatten() {
                if !live_layers.contains(&e.path()) {
                    tracing::info!(path = %e.path().display(), "removing a leftover meta image");
                    fs::remove_file(e.path()).map_err(io_err("cannot remove", &e.path()))?;
                }
            }
        }
        // A manifest commit interrupted before its rename.
        let tmp_manifest = self.layout.manifest().with_extension("new");
        match fs::remove_file(&tmp_manifest) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io_err("cannot remove", &tmp_manifest)(e));
            }
            _ => {}
        }
        Ok(())
    }

    /// Seals the writable generation now (the store must not be mounted: the caller holds
    /// the lock). Returns the new layer, or `None` when the writable layer is empty.
    pub fn archive(&mut self) -> Result<Option<LayerRecord>, StoreError> {
        self.recover()?;
        let tree = self.layout.generation_tree(self.manifest.upper_gen);
        let empty = fs::read_dir(&tree)
            .map_err(io_err("cannot read", &tree))?
            .next()
            .is_none();
        if empty {
            return Ok(None);
        }
        let frozen = self.freeze()?;
        let layer = self.seal_frozen(frozen.clone())?;
        // Unmounted: nothing else reads the tree.
        self.drop_generation(frozen.generation, true, &|| false)?;
        // Merges that are now due, as the daemon would run them.
        while self.merge(false)?.is_some() {}
        Ok(layer)
    }

    /// Freezes the writable generation: a new, empty one (with the same root attributes)
    /// takes over, and the manifest records the frozen one before anything else happens.
    pub fn freeze(&mut self) -> Result<FrozenGen, StoreError> {
        let old = self.manifest.upper_gen;
        let new = self.manifest.next_gen;
        let new_tree = self.layout.generation_tree(new);
        fs::create_dir_all(&new_tree).map_err(io_err("cannot create", &new_tree))?;
        copy_root_attributes(&self.layout.generation_tree(old), &new_tree)?;
        File::open(self.layout.gens())
            .and_then(|d| d.sync_all())
            .map_err(io_err("cannot sync", &self.layout.gens()))?;
        let frozen = FrozenGen {
            generation: old,
            layer: self.manifest.next_layer,
        };
        self.manifest.frozen = Some(frozen.clone());
        self.manifest.upper_gen = new;
        self.manifest.next_gen += 1;
        self.manifest.next_layer += 1;
        self.manifest.commit(&self.layout.manifest())?;
        spinfs_failpoints::fail_point!("seal.freeze_committed");
        Ok(frozen)
    }

    /// Seals a frozen generation into its layer, commits it, and drops the SSD copy.
    /// `None` when the frozen tree turned out empty (its files were open for writing and
    /// moved on to the new generation): no layer is made.
    pub fn seal_frozen(&mut self, frozen: FrozenGen) -> Result<Option<LayerRecord>, StoreError> {
        let tree = self.layout.generation_tree(frozen.generation);
        let empty = fs::read_dir(&tree)
            .map_err(io_err("cannot read", &tree))?
            .next()
            .is_none();
        if empty {
            self.manifest.frozen = None;
            self.manifest.commit(&self.layout.manifest())?;
            return Ok(None);
        }
        let medium = self.medium()?;
        let sched = self.scheduler()?;
        let tree = self.layout.generation_tree(frozen.generation);
        let (manifest, config) = (&self.manifest, &self.config);
        let lowers = Arc::new(
            seal::LowerImages::open(
                &self.layout,
                &self.manifest,
                Arc::new(spinfs_media::MediumReader::new(medium.clone(), None)),
            )
            .map_err(StoreError::Layer)?,
        );
        let sealed = seal::seal_generation(
            &self.layout,
            &medium,
            Some(sched),
            self.config.chunk_size,
            self.config.head_size,
            &tree,
            frozen.generation,
            frozen.layer,
            Some(&lowers),
            // The state snapshot goes to the media in the seal's own commit.
            &mut |writer, sealed| {
                let next = with_sealed(manifest, sealed);
                crate::state::append_snapshot(writer, sealed.layer.id, &next, config).map(drop)
            },
        )?;
        self.manifest = with_sealed(&self.manifest, &sealed);
        self.manifest.commit(&self.layout.manifest())?;
        spinfs_failpoints::fail_point!("seal.manifest_committed");
        Ok(Some(sealed.layer))
    }

    /// The layers a merge should combine now: the oldest run of `merge_fanin` adjacent layers
    /// of one level (levels never increase from older to newer layers, so runs are adjacent).
    /// Indexes into `manifest.layers` (oldest first).
    pub fn merge_candidates(&self, force: bool) -> Option<std::ops::Range<usize>> {
        let layers = &self.manifest.layers;
        let fanin = self.config.merge_fanin as usize;
        let mut i = 0;
        while i < layers.len() {
            let level = layers[i].level;
            let mut j = i;
            while j < layers.len() && layers[j].level == level {
                j += 1;
            }
            if j - i >= fanin {
                return Some(i..i + fanin);
            }
            i = j;
        }
        // Forced: merge the newest fan-in layers (at least two), whatever their levels.
        if force && layers.len() >= 2 {
            let n = fanin.min(layers.len());
            return Some(layers.len() - n..layers.len());
        }
        None
    }

    /// Merges the layers `run` (indexes into `manifest.layers`, oldest first) into one layer
    /// whose meta references the existing blobs: no data is rewritten. The merged meta goes to
    /// the media, then the SSD, then the manifest; the old metas stay until nothing uses them.
    pub fn merge_layers(&mut self, run: std::ops::Range<usize>) -> Result<LayerRecord, StoreError> {
        use spinfs_erofs::{Image, MergeMode, NodeKind, WriteOptions, merge_tree, write_image};
        let layer_err = |m: String| StoreError::Layer(m);
        let inputs: Vec<LayerRecord> = self.manifest.layers[run.clone()].to_vec();
        let reaches_bottom = run.start == 0;
        let mode = if reaches_bottom {
            MergeMode::StripOverlay
        } else {
            MergeMode::KeepOverlay
        };
        // Newest first, as overlay order has it.
        let mut images = Vec::new();
        for rec in inputs.iter().rev() {
            let path = self.layout.layer_meta(rec.id);
            let f = File::open(&path).map_err(io_err("cannot open", &path))?;
            images.push(Image::open(f).map_err(|e| layer_err(format!("{}: {e}", path.display())))?);
        }
        let (mut tree, devices) =
            merge_tree(&images, mode).map_err(|e| layer_err(format!("merge: {e}")))?;
        let newest_first: Vec<&LayerRecord> = inputs.iter().rev().collect();
        // One device per blob: layers with stacked files list older blobs again.
        let mut blob_ids = Vec::new();
        let mut specs: Vec<spinfs_erofs::DeviceSpec> = Vec::new();
        let mut remap: Vec<u16> = Vec::with_capacity(devices.len());
        for d in &devices {
            let rec = newest_first[d.layer];
            let blob = *rec
                .devices
                .get(d.layer_device as usize - 1)
                .ok_or_else(|| {
                    layer_err(format!("layer {} has no device {}", rec.id, d.layer_device))
                })?;
            match blob_ids.iter().position(|b| *b == blob) {
                Some(i) => {
                    specs[i].blocks = specs[i].blocks.max(d.blocks);
                    remap.push(i as u16 + 1)
                }
                None => {
                    blob_ids.push(blob);
                    specs.push(spinfs_erofs::DeviceSpec {
                        tag: format!("blob.{blob}").into_bytes(),
                        blocks: d.blocks,
                    });
                    remap.push(blob_ids.len() as u16);
                }
            }
        }
        for id in 0..tree.len() as u32 {
            if let NodeKind::File(f) = &mut tree.node_mut(id).kind
                && let Some(chunks) = &mut f.chunks
            {
                for c in chunks.iter_mut() {
                    if let spinfs_erofs::Chunk::Existing { device, .. } = c {
                        *device = *remap
                            .get(*device as usize - 1)
                            .ok_or_else(|| layer_err(format!("merge: no device {device}")))?;
                    }
                }
            }
        }
        let (mut files, mut bytes) = (0u64, 0u64);
        let mut seen = std::collections::HashSet::new();
        for id in 0..tree.len() as u32 {
            let n = tree.node(id);
            match &n.kind {
                NodeKind::Dir(_) | NodeKind::CharDev(0) => {}
                kind => {
                    if seen.insert(n.meta.ino) {
                        files += 1;
                        if let NodeKind::File(f) = kind {
                            bytes += f.size;
                        }
                    }
                }
            }
        }
        let id = self.manifest.next_layer;
        let opts = WriteOptions {
            chunk_bits: self.config.chunk_size.trailing_zeros() as u8,
            devices: specs,
            volume_name: format!("spinfs.{id}").into_bytes(),
            ..WriteOptions::default()
        };
        let mut meta = Vec::new();
        write_image(&tree, &opts, &mut meta, None).map_err(|e| layer_err(format!("merge: {e}")))?;
        spinfs_failpoints::fail_point!("merge.image_built");
        // Media first, then the SSD copy, then the manifest.
        let medium = self.medium()?;
        let sched = self.scheduler()?;
        let uri = self.config.media.clone();
        let media_err = |error| StoreError::Media {
            uri: uri.clone(),
            error,
        };
        let mut writer =
            spinfs_media::MediumWriter::open(medium, Some(sched)).map_err(media_err)?;
        writer
            .begin_image(spinfs_media::ImageRef {
                id,
                kind: spinfs_media::ImageKind::Meta,
            })
            .map_err(media_err)?;
        writer.append(&meta).map_err(media_err)?;
        let extents = writer.finish_image().map_err(media_err)?;
        spinfs_failpoints::fail_point!("merge.meta_appended");
        let record = LayerRecord {
            id,
            meta: crate::manifest::ImageRecord::from_extents(&extents),
            devices: blob_ids,
            generations: inputs.iter().flat_map(|l| l.generations.clone()).collect(),
            files,
            bytes,
            level: inputs.iter().map(|l| l.level).max().unwrap_or(0) + 1,
        };
        let mut next = self.manifest.clone();
        next.next_layer += 1;
        next.layers.splice(run, [record.clone()]);
        // The state snapshot goes to the media in the merge's own commit.
        crate::state::append_snapshot(&mut writer, id, &next, &self.config).map_err(media_err)?;
        writer.commit().map_err(media_err)?;
        spinfs_failpoints::fail_point!("merge.media_committed");
        seal::publish_meta(&self.layout, id, &meta)
            .map_err(io_err("cannot write", &self.layout.layer_meta(id)))?;
        spinfs_failpoints::fail_point!("merge.meta_published");
        self.merge_head_caches(&newest_first, id)?;
        spinfs_failpoints::fail_point!("merge.heads_merged");
        self.manifest = next;
        self.manifest.commit(&self.layout.manifest())?;
        spinfs_failpoints::fail_point!("merge.manifest_committed");
        Ok(record)
    }

    /// The merged layer's head cache: every input's heads (keys are inode numbers, which the
    /// merge keeps), the newest winning.
    fn merge_head_caches(&self, newest_first: &[&LayerRecord], id: u64) -> Result<(), StoreError> {
        use crate::cache::{HeadCache, MergeInput, merge_heads};
        if self.config.head_size == 0 {
            return Ok(());
        }
        let mut caches = Vec::new();
        for rec in newest_first {
            let path = self.layout.layer_heads(rec.id);
            if path.exists() {
                caches.push(
                    HeadCache::open(&path)
                        .map_err(|e| StoreError::Layer(format!("head cache: {e}")))?,
                );
            }
        }
        let same = |k: u64| Some(k);
        let inputs: Vec<MergeInput<'_>> = caches
            .iter()
            .map(|c| MergeInput {
                cache: c,
                key_map: &same,
            })
            .collect();
        merge_heads(
            &self.layout.layer_heads(id),
            id,
            self.config.head_size.min(crate::cache::MAX_HEAD_SIZE),
            &inputs,
        )
        .map_err(|e| StoreError::Layer(format!("head cache: {e}")))?;
        Ok(())
    }

    /// Merges one run of layers if one is due (or, with `force`, the newest ones).
    pub fn merge(&mut self, force: bool) -> Result<Option<LayerRecord>, StoreError> {
        match self.merge_candidates(force) {
            Some(run) => self.merge_layers(run).map(Some),
            None => Ok(None),
        }
    }

    /// Deletes a sealed generation's SSD tree (after the volume stopped using it), its large
    /// files drained first at the configured pace (see `reclaim`) when `drain` (nothing of
    /// the mount can read them any more: `Volume::sealed_tree_unused`); without rests while
    /// `urgent` answers true.
    pub fn drop_generation(
        &self,
        generation: u64,
        drain: bool,
        urgent: &dyn Fn() -> bool,
    ) -> Result<(), StoreError> {
        let gen_dir = self.layout.generation(generation);
        let io = &self.config.media_io;
        let pace = crate::reclaim::Pace {
            step: if drain { io.tree_delete_step } else { 0 },
            rest: io.tree_delete_rest,
        };
        let start = std::time::Instant::now();
        let stats = crate::reclaim::remove_tree(&gen_dir, pace, urgent, Some(&self.syncs))
            .map_err(io_err("cannot remove", &gen_dir))?;
        tracing::info!(
            generation,
            drained_files = stats.drained_files,
            drained_bytes = stats.drained_bytes,
            steps = stats.steps,
            skipped_files = stats.skipped_files,
            seconds = start.elapsed().as_secs_f64(),
            "generation tree deleted"
        );
        Ok(())
    }

    /// Checks the SSD copy of layer `rec`'s meta image against the manifest's length and
    /// CRC32C; when it is missing or damaged, restores it from its media copy (checked against
    /// the same CRC). A layer whose both copies are damaged keeps its SSD copy (the reader
    /// then fails with EIO where the damage makes it inconsistent) and is logged.
    fn ensure_meta(&mut self, rec: &LayerRecord) -> Result<(), StoreError> {
        let path = self.layout.layer_meta(rec.id);
        let why = match file_crc(&path) {
            Ok((len, crc)) if len == rec.meta.length && crc == rec.meta.crc => return Ok(()),
            Ok((len, _)) if len != rec.meta.length => {
                format!("is {len} bytes, the manifest records {}", rec.meta.length)
            }
            Ok((_, crc)) => format!(
                "fails its checksum (crc32c {crc:08x}, the manifest records {:08x})",
                rec.meta.crc
            ),
            Err(e) => format!("cannot be read: {e}"),
        };
        let reader = self.reader()?;
        let opts = spinfs_media::ReadOptions {
            class: spinfs_media::Class::Metadata,
            timeout: Some(self.config.media_io.request_timeout()),
        };
        let extents = rec.meta.to_extents(spinfs_media::ImageKind::Meta);
        match reader.read(&extents, 0, rec.meta.length, opts) {
            Ok(b) if crc32c::crc32c(&b) == rec.meta.crc => {
                seal::publish_meta(&self.layout, rec.id, &b)
                    .map_err(io_err("cannot write", &path))?;
                tracing::warn!(
                    layer = rec.id,
                    "meta image {} {why}: restored from its media copy",
                    path.display()
                );
            }
            Ok(_) => tracing::error!(
                layer = rec.id,
                "meta image {} {why}, and its media copy fails its checksum too",
                path.display()
            ),
            Err(e) => tracing::error!(
                layer = rec.id,
                "meta image {} {why}, and its media copy cannot be read: {e}",
                path.display()
            ),
        }
        Ok(())
    }

    /// Opens one archived layer of the manifest.
    pub fn open_layer(&mut self, id: u64) -> Result<Arc<ArchivedLayer>, StoreError> {
        if let Some(rec) = self.manifest.layers.iter().find(|l| l.id == id).cloned() {
            self.ensure_meta(&rec)?;
        }
        let reader = self.reader()?;
        let cache = self.unit_cache()?;
        let pool = self.image_pool();
        let timeout = Some(self.config.media_io.request_timeout());
        let rec = self
            .manifest
            .layers
            .iter()
            .find(|l| l.id == id)
            .ok_or_else(|| StoreError::Layer(format!("layer {id} is not in the manifest")))?;
        Ok(Arc::new(
            ArchivedLayer::open(
                &self.layout,
                &self.manifest,
                rec,
                reader,
                timeout,
                cache,
                pool,
            )
            .map_err(StoreError::Layer)?,
        ))
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

/// The manifest once sealed layer `sealed` is committed: its blob and layer added, the
/// frozen generation done.
fn with_sealed(m: &Manifest, sealed: &seal::Sealed) -> Manifest {
    let mut m = m.clone();
    if let Some(blob) = &sealed.blob {
        m.blobs.retain(|b| b.id != blob.id);
        m.blobs.push(blob.clone());
    }
    m.layers.retain(|l| l.id != sealed.layer.id);
    m.layers.push(sealed.layer.clone());
    m.frozen = None;
    m
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

pub(crate) fn take_lock(layout: &StoreLayout) -> Result<File, StoreError> {
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

/// Gives `to` the mode, owner, times and xattrs of `from` (a new generation's root must look
/// like the one it replaces: the root of the writable tree is the root users see).
fn copy_root_attributes(from: &Path, to: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let md = fs::metadata(from).map_err(io_err("cannot stat", from))?;
    std::os::unix::fs::chown(to, Some(md.uid()), Some(md.gid()))
        .map_err(io_err("cannot chown", to))?;
    fs::set_permissions(to, fs::Permissions::from_mode(md.mode() & 0o7777))
        .map_err(io_err("cannot chmod", to))?;
    for (name, value) in spinfs_erofs::fromdir::read_xattrs(from)
        .map_err(|e| StoreError::Layer(format!("xattrs of {}: {e}", from.display())))?
    {
        let path = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(to.as_os_str()))
            .map_err(|_| StoreError::Layer("path with NUL".into()))?;
        let cname = std::ffi::CString::new(name)
            .map_err(|_| StoreError::Layer("xattr name with NUL".into()))?;
        // SAFETY: valid C strings and a readable value buffer.
        let r = unsafe {
            libc::lsetxattr(
                path.as_ptr(),
                cname.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if r != 0 {
            return Err(io_err("cannot set xattr on", to)(
                std::io::Error::last_os_error(),
            ));
        }
    }
    let t = |s: i64, ns: i64| libc::timespec {
        tv_sec: s,
        tv_nsec: ns,
    };
    let times = [
        t(md.atime(), md.atime_nsec()),
        t(md.mtime(), md.mtime_nsec()),
    ];
    let path = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(to.as_os_str()))
        .map_err(|_| StoreError::Layer("path with NUL".into()))?;
    // SAFETY: valid C string and two timespecs.
    if unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0) } != 0 {
        return Err(io_err("cannot set times on", to)(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Length and CRC32C of a file, read in bounded pieces.
pub(crate) fn file_crc(path: &Path) -> std::io::Result<(u64, u32)> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut len, mut crc) = (0u64, 0u32);
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok((len, crc));
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        len += n as u64;
    }
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

pub(crate) fn random_id() -> Result<String, StoreError> {
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
