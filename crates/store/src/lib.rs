//! The layered store: configuration, on-SSD layout, the writable layer and its inode table.
//! Later: manifest, generations, sealing, merging, caches and recovery.

pub mod config;
pub mod size;

pub use config::{ConfigError, StoreConfig};
pub use size::{format_size, parse_size};
