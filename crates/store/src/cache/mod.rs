//! The two SSD caches of archived data.
//!
//! - [`ChunkCache`]: a bounded, persistent LRU cache of archived byte ranges keyed by
//!   (image id, offset) — the store keys by the image offset of a media object — one
//!   checksummed file per entry. Reads of archived data look here before going to the media,
//!   and put what they fetched.
//! - [`HeadCache`]: the first and the last `head_size` bytes of every archived regular file of
//!   one layer, in one immutable checksummed file written at seal time ([`HeadCacheWriter`]) and merged
//!   with the layers ([`merge_heads`]), so that format sniffing never touches the media
//!   (SPEC problem 4).
//!
//! Both detect damage with CRC32C and never hand out bytes that fail their check: a damaged
//! chunk entry is dropped and reported as a miss, a damaged head cache gives a typed error
//! naming the file and key so the caller can fall back to the media and rebuild it.
//!
//! Neither knows EROFS, layers or the media: keys are plain integers supplied by the caller.

mod bytes;
mod chunk;
mod head;

pub use chunk::{
    CHUNK_HEADER_LEN, CacheStats, ChunkCache, ChunkInspection, ChunkProblem, EntryData, MAX_UNIT,
    MIN_UNIT, inspect_dir,
};
pub use head::{
    Edges, HEAD_INDEX_BLOCK, HeadCache, HeadCacheInfo, HeadCacheWriter, HeadProblem, MAX_HEAD_SIZE,
    MergeInput, merge_heads, remove_partial_heads,
};

use std::path::{Path, PathBuf};

/// Errors of both caches. Every variant names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot {op} {path}: {error}")]
    Io {
        op: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cache directory {0} is in use by another process")]
    Busy(PathBuf),
    #[error("{what}: {reason}")]
    InvalidArgument { what: String, reason: String },
    #[error("head cache {path} is damaged: {reason}")]
    HeadCorrupt { path: PathBuf, reason: String },
    #[error("head cache {path}: entry for key {key} is damaged: {reason}")]
    HeadEntryCorrupt {
        path: PathBuf,
        key: u64,
        reason: String,
    },
    #[error("head cache {path} has format version {found}; this spinfs reads version {expected}")]
    HeadVersion {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
}

pub type Result<T, E = CacheError> = std::result::Result<T, E>;

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CacheError {
    let path = path.to_path_buf();
    move |error| CacheError::Io { op, path, error }
}

fn invalid(what: impl Into<String>, reason: impl Into<String>) -> CacheError {
    CacheError::InvalidArgument {
        what: what.into(),
        reason: reason.into(),
    }
}
