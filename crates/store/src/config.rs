//! The store's configuration: every `spinfs mkfs` option, persisted in `STORE/spinfs.toml`.
//!
//! The file is written once by mkfs and read at every start; it is plain TOML so that an
//! operator can read it, and it is validated on every load so that a hand edit that makes the
//! geometry impossible is refused with a clear message instead of corrupting the media.

use crate::size::format_size;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Version of the config file format written by this build.
pub const CONFIG_VERSION: u32 = 1;

/// Name of the config file inside a store.
pub const CONFIG_FILE: &str = "spinfs.toml";

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// Every tunable of a store. Sizes are in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Config file format version (`CONFIG_VERSION`).
    pub version: u32,
    /// Archive medium URI: `dir:PATH` or `file:PATH`.
    pub media: String,
    /// Data in the writable layer that triggers a seal.
    pub archive_threshold: u64,
    /// Number of archived layers merged into one.
    pub merge_fanin: u32,
    /// Size of one media container, device metadata included.
    pub container_size: u64,
    /// Size of one media object (the last object of a container may be shorter).
    pub object_size: u64,
    /// Staging/write chunk size, also the EROFS chunk size of archived files.
    pub chunk_size: u64,
    /// Bound of the SSD cache of archived data.
    pub cache_size: u64,
    /// Bytes at the head of every archived file kept on the SSD.
    pub head_size: u64,
    /// Bound on archived images held open at once.
    pub max_open_images: u32,
    /// Chunk maps of stacked files whose encoding is longer than this many bytes are kept
    /// in a sidecar file instead of the upper file's xattr (absent = 1 KiB; 0 = always a
    /// sidecar, for tests). Not a mkfs option.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack_map_inline_max: Option<u64>,
    /// Media I/O scheduler tunables (`[media_io]`; absent in older files = defaults).
    #[serde(default)]
    pub media_io: MediaIoConfig,
    /// Simulated slow media for tests and benchmarks (`[media_model]`; absent = none):
    /// archived reads pay its switch, seek and transfer times on top of the real I/O.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_model: Option<MediaModelConfig>,
    /// Injected media faults for tests (`[[media_fault]]` tables; absent = none): media
    /// operations matching a rule stall, fail or read short (see `spinfs_media::fault`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub media_fault: Vec<MediaFaultConfig>,
}

/// One injected media fault (`[[media_fault]]`), for tests of failing and slow media.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MediaFaultConfig {
    /// "read", "write" (data, record log and new containers), "sync" or "any".
    pub op: String,
    /// "error" (EIO), "stall" (wait `stall_ms`, then proceed), "hang" (wait while the rule
    /// is active), "short" (reads return half the bytes asked).
    pub action: String,
    /// Containers concerned (default all).
    #[serde(default)]
    pub containers: Vec<u64>,
    /// "metadata" (headers and record logs), "data" (objects) or "any" (default).
    #[serde(default)]
    pub area: Option<String>,
    /// First and last object index (within a container) concerned (default all).
    #[serde(default)]
    pub objects: Option<[u64; 2]>,
    /// Duration of a stall.
    #[serde(default)]
    pub stall_ms: u64,
    /// Matching operations let through before the fault starts.
    #[serde(default)]
    pub after: u64,
    /// The rule is active only while this file exists (switch a fault on and off on a
    /// running mount).
    #[serde(default)]
    pub while_exists: Option<PathBuf>,
}

impl MediaFaultConfig {
    /// The media crate's rule this describes, or why it cannot be one.
    pub fn rule(&self) -> Result<spinfs_media::FaultRule, ConfigError> {
        use spinfs_media::{FaultAction, FaultArea, FaultOp};
        let bad = |m: String| ConfigError::Invalid(format!("media_fault: {m}"));
        let op = match self.op.as_str() {
            "read" => FaultOp::Read,
            "write" => FaultOp::Write,
            "sync" => FaultOp::Sync,
            "any" => FaultOp::Any,
            o => return Err(bad(format!("op '{o}' is not read, write, sync or any"))),
        };
        let action = match self.action.as_str() {
            "error" => FaultAction::Error,
            "stall" if self.stall_ms > 0 => {
                FaultAction::Stall(std::time::Duration::from_millis(self.stall_ms))
            }
            "stall" => return Err(bad("a stall needs stall_ms > 0".into())),
            "hang" => FaultAction::Hang,
            "short" => FaultAction::ShortRead,
            a => {
                return Err(bad(format!(
                    "action '{a}' is not error, stall, hang or short"
                )));
            }
        };
        let area = match self.area.as_deref() {
            None | Some("any") => FaultArea::Any,
            Some("metadata") => FaultArea::Metadata,
            Some("data") => FaultArea::Data,
            Some(a) => return Err(bad(format!("area '{a}' is not metadata, data or any"))),
        };
        if let Some([a, b]) = self.objects
            && a > b
        {
            return Err(bad(format!("objects [{a}, {b}] is an empty range")));
        }
        Ok(spinfs_media::FaultRule {
            op,
            containers: self.containers.clone(),
            area,
            objects: self.objects.map(|[a, b]| (a, b)),
            action,
            after: self.after,
            while_exists: self.while_exists.clone(),
        })
    }
}

/// A media model in the read path of archived data (see `spinfs_media::ModelDevice`):
/// every media read sleeps the time the modelled library would take for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MediaModelConfig {
    /// Time to unload the loaded container and load another, in milliseconds.
    #[serde(default)]
    pub switch_ms: u64,
    /// Time to move to a non-contiguous offset, in milliseconds.
    #[serde(default)]
    pub seek_ms: u64,
    /// Transfer rate in bytes per second.
    pub bandwidth: u64,
}

impl MediaModelConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.bandwidth < KIB {
            return bad(format!(
                "media_model.bandwidth {} must be at least 1 KiB/s",
                self.bandwidth
            ));
        }
        if self.switch_ms > 3_600_000 || self.seek_ms > 3_600_000 {
            return bad("media_model latencies must be at most one hour".into());
        }
        Ok(())
    }

    /// The model's parameters.
    pub fn params(&self) -> spinfs_media::ModelParams {
        spinfs_media::ModelParams {
            switch: std::time::Duration::from_millis(self.switch_ms),
            seek: std::time::Duration::from_millis(self.seek_ms),
            bandwidth: self.bandwidth,
        }
    }
}

/// Tunables of the media I/O scheduler (see `spinfs_media::SchedConfig`). Times in
/// milliseconds, sizes in bytes, rates in bytes per second.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaIoConfig {
    /// Deadline of foreground reads, after which they overtake other containers' batches.
    pub read_deadline_ms: u64,
    /// Deadline of metadata reads.
    pub metadata_deadline_ms: u64,
    /// Deadline of background I/O (archive writes).
    pub background_deadline_ms: u64,
    /// Requests served in one container before an expired request elsewhere takes over.
    pub batch_limit: u32,
    /// Largest merged read.
    pub max_merge: u64,
    /// Cap on background write bandwidth; 0 = none.
    pub background_write_rate: u64,
    /// Token bucket depth of that cap.
    pub background_write_burst: u64,
    /// Foreground read latency above which background writes back off; 0 = off.
    pub latency_target_ms: u64,
    /// A media read not served within this time fails instead of stalling the mount.
    pub request_timeout_ms: u64,
    /// I/O priority class of the archiver's I/O (reading frozen generations, writing seals
    /// and merges): "idle" (served when the disk has nothing else to do, within the I/O
    /// scheduler's aging limit), "best-effort" (lowest level of the default class) or
    /// "inherit". Only I/O schedulers that honour priorities (mq-deadline, bfq) act on it.
    pub background_io_class: String,
    /// CPU nice value of the archiver thread (0-19): seals hash and checksum every byte.
    /// Applies when `background_sched_idle` is off.
    pub background_nice: i32,
    /// Run the archiver thread under the SCHED_IDLE policy: any other thread of the daemon
    /// that wakes up (serving the mount) takes the CPU from it at once, where a nice value
    /// only shares the CPU out by weight and lets the archiver finish its time slice. Off
    /// by default: while other processes keep every core busy it slows seals down (see
    /// README). Seals that writers wait for run at normal priority regardless.
    pub background_sched_idle: bool,
    /// Time slice of the archiver thread under SCHED_OTHER, in milliseconds (Linux 6.12 and
    /// later; 1-100, 0 = the kernel's default of about 1-3 ms). A thread of the mount that
    /// wakes up takes the CPU from a thread with a longer slice at once, where the default
    /// lets the archiver finish its slice first; the archiver keeps its share of the CPU by
    /// its nice value, unlike under `background_sched_idle`.
    pub background_slice_ms: u64,
    /// Adapt the background media write rate to the latency of fsync/fdatasync on the
    /// writable layer (for media sharing a disk with the SSD store): a sync slower than the
    /// target while seal or merge writes run halves their rate (from the measured write
    /// bandwidth, down to 1/16 of it) and holds them briefly; fast syncs raise it again by
    /// 1/16 of the bandwidth every 200 ms. `background_write_rate` stays a hard cap. Off by
    /// default (see README: it slowed seals without a measurable gain on the disks tried).
    pub background_write_adaptive: bool,
    /// The sync latency target of that adaptation; 0 = twice the sync latency measured
    /// while no background write runs (20 ms until 8 such syncs were seen).
    pub sync_latency_target_ms: u64,
    /// While an fsync/fdatasync of the writable layer runs, seal and merge writes to the
    /// media, the seal's reads of the frozen generation and the steps of a sealed tree's
    /// deletion hold their next piece (256 KiB writes and reads, 1 MiB punches) back for at
    /// most this long (0 = never): the sync then finds the disk busy with at most one
    /// background piece. Seals that writers wait for never hold back.
    pub sync_yield_ms: u64,
    /// Deleting a sealed generation's tree from the SSD: large files are punched out in
    /// steps of this many bytes first (a multiple of 4 KiB; 0 = unlink at once), so that
    /// the discards or journal work of freeing them do not hold up the mount's I/O.
    pub tree_delete_step: u64,
    /// Rest after each step of that deletion, as a multiple of the time the step took (the
    /// deletion then takes at most 1 / (1 + rest) of the disk's time). No rest while
    /// writers wait for room.
    pub tree_delete_rest: u32,
}

impl Default for MediaIoConfig {
    fn default() -> Self {
        MediaIoConfig {
            read_deadline_ms: 30_000,
            metadata_deadline_ms: 60_000,
            background_deadline_ms: 300_000,
            batch_limit: 64,
            max_merge: 4 * MIB,
            background_write_rate: 0,
            background_write_burst: 8 * MIB,
            latency_target_ms: 0,
            request_timeout_ms: 60_000,
            background_io_class: "idle".into(),
            background_nice: 10,
            background_sched_idle: false,
            background_slice_ms: 100,
            background_write_adaptive: false,
            sync_latency_target_ms: 0,
            sync_yield_ms: 2,
            tree_delete_step: MIB,
            tree_delete_rest: 1,
        }
    }
}

impl MediaIoConfig {
    /// Checks the media I/O tunables.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.batch_limit == 0 {
            return bad("media_io.batch_limit must be at least 1".into());
        }
        if self.read_deadline_ms == 0
            || self.metadata_deadline_ms == 0
            || self.background_deadline_ms == 0
        {
            return bad("media_io deadlines must be at least 1 ms".into());
        }
        if !["idle", "best-effort", "inherit"].contains(&self.background_io_class.as_str()) {
            return bad(format!(
                "media_io.background_io_class '{}' is not idle, best-effort or inherit",
                self.background_io_class
            ));
        }
        if !(0..=19).contains(&self.background_nice) {
            return bad(format!(
                "media_io.background_nice {} is not within 0-19",
                self.background_nice
            ));
        }
        if self.sync_yield_ms > 1000 {
            return bad(format!(
                "media_io.sync_yield_ms {} is above 1000",
                self.sync_yield_ms
            ));
        }
        if self.background_slice_ms > 100 {
            return bad(format!(
                "media_io.background_slice_ms {} is above 100",
                self.background_slice_ms
            ));
        }
        if self.request_timeout_ms == 0 {
            return bad("media_io.request_timeout_ms must be at least 1 ms".into());
        }
        if !self.tree_delete_step.is_multiple_of(4 * KIB) {
            return bad(format!(
                "media_io.tree_delete_step {} is not a multiple of 4 KiB",
                self.tree_delete_step
            ));
        }
        if self.tree_delete_rest > 100 {
            return bad(format!(
                "media_io.tree_delete_rest {} is above 100",
                self.tree_delete_rest
            ));
        }
        if self.background_write_rate != 0 && self.background_write_burst < 4 * KIB {
            return bad(format!(
                "media_io.background_write_burst {} is below 4 KiB",
                self.background_write_burst
            ));
        }
        Ok(())
    }

    /// The scheduler configuration these tunables describe.
    pub fn sched_config(&self) -> spinfs_media::SchedConfig {
        use std::time::Duration;
        spinfs_media::SchedConfig {
            policy: spinfs_media::Policy::Elevator,
            deadlines: [
                Duration::from_millis(self.read_deadline_ms),
                Duration::from_millis(self.metadata_deadline_ms),
                Duration::from_millis(self.background_deadline_ms),
            ],
            batch_limit: self.batch_limit,
            max_merge: self.max_merge,
            bg_write_rate: self.background_write_rate,
            bg_write_burst: self.background_write_burst,
            latency_target: Duration::from_millis(self.latency_target_ms),
            adaptive: self.background_write_adaptive,
            sync_target: Duration::from_millis(self.sync_latency_target_ms),
        }
    }

    /// The per-request timeout.
    pub fn request_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.request_timeout_ms)
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            version: CONFIG_VERSION,
            media: String::new(),
            archive_threshold: GIB,
            merge_fanin: 4,
            container_size: 480 * MIB,
            object_size: 252 * KIB,
            chunk_size: 4 * MIB,
            cache_size: 10 * GIB,
            head_size: 64 * KIB,
            max_open_images: 64,
            stack_map_inline_max: None,
            media_io: MediaIoConfig::default(),
            media_model: None,
            media_fault: Vec::new(),
        }
    }
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("config {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path} has version {found}, this spinfs reads version {CONFIG_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("impossible configuration: {0}")]
    Invalid(String),
    #[error("cannot write config {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
}

impl StoreConfig {
    /// Device-metadata space reserved at the end of every container (headers, per-object
    /// checksums, index). It is 1/96 of the container rounded up to 4 KiB, at least 64 KiB:
    /// exactly the 5 MiB of a 480 MiB container that SPEC §1 describes.
    pub fn container_reserved(&self) -> u64 {
        (self.container_size / 96)
            .next_multiple_of(4 * KIB)
            .max(64 * KIB)
    }

    /// Bytes of a container that hold filesystem data (475 MiB by default).
    pub fn container_usable(&self) -> u64 {
        self.container_size
            .saturating_sub(self.container_reserved())
    }

    /// Objects per container; the last one is shorter when the usable space is not a whole
    /// number of objects (1931 objects, the last of 40 KiB, by default).
    pub fn objects_per_container(&self) -> u64 {
        self.container_usable().div_ceil(self.object_size.max(1))
    }

    /// Checks every rule that makes a geometry usable. Returns the first violation.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.media.is_empty() {
            return bad("no media URI".into());
        }
        if !(self.media.starts_with("dir:") || self.media.starts_with("file:"))
            || self.media.len() <= 5
        {
            return bad(format!(
                "media URI '{}' is not dir:PATH or file:PATH",
                self.media
            ));
        }
        if !self.chunk_size.is_power_of_two() || self.chunk_size < 4 * KIB {
            return bad(format!(
                "chunk size {} must be a power of two of at least 4 KiB",
                self.chunk_size
            ));
        }
        if self.chunk_size > GIB {
            return bad(format!(
                "chunk size {} is larger than 1 GiB",
                format_size(self.chunk_size)
            ));
        }
        if self.object_size == 0 || !self.object_size.is_multiple_of(4 * KIB) {
            return bad(format!(
                "object size {} must be a non-zero multiple of 4 KiB",
                self.object_size
            ));
        }
        if !self.container_size.is_multiple_of(4 * KIB) {
            return bad(format!(
                "container size {} must be a multiple of 4 KiB",
                self.container_size
            ));
        }
        if self.object_size > self.container_usable() {
            return bad(format!(
                "object size {} is larger than the usable space of a container ({} of {})",
                format_size(self.object_size),
                format_size(self.container_usable()),
                format_size(self.container_size)
            ));
        }
        if self.chunk_size > self.container_usable() {
            return bad(format!(
                "chunk size {} is larger than the usable space of a container ({})",
                format_size(self.chunk_size),
                format_size(self.container_usable())
            ));
        }
        if self.objects_per_container() > 1 << 20 {
            return bad(format!(
                "{} objects per container is too many (at most {}): use larger objects",
                self.objects_per_container(),
                1 << 20
            ));
        }
        if self.archive_threshold < self.chunk_size {
            return bad(format!(
                "archive threshold {} is smaller than the chunk size {}",
                format_size(self.archive_threshold),
                format_size(self.chunk_size)
            ));
        }
        if self.merge_fanin < 2 {
            return bad(format!(
                "merge fan-in {} must be at least 2",
                self.merge_fanin
            ));
        }
        if self.merge_fanin > 64 {
            return bad(format!(
                "merge fan-in {} must be at most 64",
                self.merge_fanin
            ));
        }
        if self.max_open_images == 0 {
            return bad("max open images must be at least 1".into());
        }
        if self.max_open_images < self.merge_fanin {
            return bad(format!(
                "max open images {} must be at least the merge fan-in {}",
                self.max_open_images, self.merge_fanin
            ));
        }
        if !self.head_size.is_multiple_of(4 * KIB) {
            return bad(format!(
                "head size {} must be a multiple of 4 KiB (0 disables the head cache)",
                self.head_size
            ));
        }
        if self.cache_size != 0 && self.cache_size < self.object_size {
            return bad(format!(
                "cache size {} is smaller than one object ({})",
                format_size(self.cache_size),
                format_size(self.object_size)
            ));
        }
        self.media_io.validate()?;
        if let Some(m) = &self.media_model {
            m.validate()?;
        }
        for f in &self.media_fault {
            f.rule()?;
        }
        Ok(())
    }

    /// The media geometry this configuration describes.
    pub fn geometry(&self) -> Result<spinfs_media::Geometry, spinfs_media::MediaError> {
        spinfs_media::Geometry::new(
            self.container_size,
            self.container_reserved(),
            self.object_size,
            self.chunk_size,
        )
    }

    /// Reads and validates `STORE/spinfs.toml`.
    pub fn load(store: &Path) -> Result<StoreConfig, ConfigError> {
        let path = store.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|error| ConfigError::Read {
            path: path.clone(),
            error,
        })?;
        Self::parse(&text, &path)
    }

    /// Parses and validates config text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<StoreConfig, ConfigError> {
        // Check the version before the fields so that a newer format says so plainly.
        #[derive(Deserialize)]
        struct VersionOnly {
            version: Option<u32>,
        }
        let probe: VersionOnly = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })?;
        match probe.version {
            Some(CONFIG_VERSION) => {}
            Some(found) => {
                return Err(ConfigError::Version {
                    path: path.to_path_buf(),
                    found,
                });
            }
            None => {
                return Err(ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: "missing field `version`".into(),
                });
            }
        }
        let cfg: StoreConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })?;
        cfg.validate().map_err(|e| match e {
            ConfigError::Invalid(m) => ConfigError::Parse {
                path: path.to_path_buf(),
                message: m,
            },
            other => other,
        })?;
        Ok(cfg)
    }

    /// Renders the config file text.
    pub fn to_toml(&self) -> String {
        let mut out = String::from(
            "# spinfs store configuration, written by `spinfs mkfs`. Sizes are in bytes.\n",
        );
        out.push_str(&toml::to_string(self).expect("config serializes"));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> StoreConfig {
        StoreConfig {
            media: "dir:/tmp/x".into(),
            ..StoreConfig::default()
        }
    }

    #[test]
    fn default_geometry_matches_spec() {
        let c = cfg();
        c.validate().unwrap();
        assert_eq!(c.container_usable(), 475 * MIB);
        assert_eq!(c.container_reserved(), 5 * MIB);
        assert_eq!(c.objects_per_container(), 1931);
    }

    #[test]
    fn rejects_impossible() {
        type Mutation = Box<dyn Fn(&mut StoreConfig)>;
        let cases: Vec<Mutation> = vec![
            Box::new(|c| c.object_size = c.container_size * 2),
            Box::new(|c| c.chunk_size = 3 * MIB),
            Box::new(|c| c.chunk_size = 2 * KIB),
            Box::new(|c| c.object_size = 1000),
            Box::new(|c| c.merge_fanin = 1),
            Box::new(|c| c.max_open_images = 0),
            Box::new(|c| c.archive_threshold = 1),
            Box::new(|c| c.media = "s4:bucket".into()),
            Box::new(|c| c.container_size = 1000),
            Box::new(|c| c.head_size = 100),
            Box::new(|c| c.media_io.batch_limit = 0),
            Box::new(|c| c.media_io.background_slice_ms = 101),
            Box::new(|c| c.media_io.sync_yield_ms = 1001),
        ];
        for (i, mutate) in cases.iter().enumerate() {
            let mut c = cfg();
            mutate(&mut c);
            assert!(c.validate().is_err(), "case {i} should be rejected: {c:?}");
        }
    }

    #[test]
    fn round_trips_and_rejects_bad_files() {
        let c = cfg();
        let text = c.to_toml();
        assert_eq!(StoreConfig::parse(&text, Path::new("x")).unwrap(), c);
        assert!(StoreConfig::parse("garbage = [", Path::new("x")).is_err());
        // A file without [media_io] (written before it existed) gets the defaults.
        let old = text.split("[media_io]").next().unwrap().to_string();
        assert_eq!(StoreConfig::parse(&old, Path::new("x")).unwrap(), c);
        let mut tuned = c.clone();
        tuned.media_io.background_write_rate = 50 << 20;
        let t = StoreConfig::parse(&tuned.to_toml(), Path::new("x")).unwrap();
        assert_eq!(t.media_io.sched_config().bg_write_rate, 50 << 20);
        let unknown = text.replace("[media_io]", "[media_io]\nbogus = 1");
        assert!(StoreConfig::parse(&unknown, Path::new("x")).is_err());
        // [media_model] is optional, checked, and survives a round trip.
        let model =
            format!("{text}\n[media_model]\nswitch_ms = 5\nseek_ms = 1\nbandwidth = 200000000\n");
        let m = StoreConfig::parse(&model, Path::new("x")).unwrap();
        let mm = m.media_model.clone().unwrap();
        assert_eq!(
            (mm.switch_ms, mm.seek_ms, mm.bandwidth),
            (5, 1, 200_000_000)
        );
        assert_eq!(StoreConfig::parse(&m.to_toml(), Path::new("x")).unwrap(), m);
        assert!(!text.contains("media_model"));
        let slow = model.replace("bandwidth = 200000000", "bandwidth = 0");
        assert!(StoreConfig::parse(&slow, Path::new("x")).is_err());
        let nobw = model.replace("bandwidth = 200000000", "");
        assert!(StoreConfig::parse(&nobw, Path::new("x")).is_err());
        let newer = text.replace("version = 1", "version = 99");
        let e = StoreConfig::parse(&newer, Path::new("x")).unwrap_err();
        assert!(e.to_string().contains("version 99"), "{e}");
    }
}
