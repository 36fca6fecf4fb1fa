//! The layered store: configuration, on-SSD layout, manifest, and the volume that the mount
//! serves. Archived layers, sealing, merging and caches build on these.

pub mod archive;
pub mod archiver;
pub mod cache;
pub mod config;
pub mod control;
pub mod export;
pub mod fsck;
pub mod layout;
pub mod lower;
pub mod manifest;
pub mod markers;
pub mod reclaim;
pub mod seal;
pub mod size;
pub mod stackmap;
pub mod state;
pub mod status;
pub mod store;
pub mod sys;
pub mod units;
pub mod volume;

pub use config::{ConfigError, StoreConfig};
pub use layout::StoreLayout;
pub use manifest::Manifest;
pub use size::{format_size, parse_size};
pub use store::{Store, StoreError};
pub use sys::Errno;
pub use volume::Volume;
