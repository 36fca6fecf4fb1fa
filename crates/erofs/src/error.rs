//! Typed errors of the format crate.

use std::io;

/// Everything that can go wrong while writing, reading or merging images.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error, with what was being done when it happened.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The image violates the EROFS format or a spinfs invariant.
    #[error("corrupt image: {0}")]
    Corrupt(String),
    /// The image is valid EROFS but uses a feature this crate does not implement.
    #[error("unsupported image feature: {0}")]
    Unsupported(String),
    /// The caller's tree description or arguments cannot be written as an image.
    #[error("invalid input: {0}")]
    Invalid(String),
    /// A path or name does not exist in the image.
    #[error("not found: {0}")]
    NotFound(String),
    /// A path component that must be a directory is not one.
    #[error("not a directory: {0}")]
    NotADirectory(String),
}

/// Result alias of the crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

pub(crate) fn corrupt<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Corrupt(msg.into()))
}

pub(crate) fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Invalid(msg.into()))
}
