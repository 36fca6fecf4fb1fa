//! Typed errors of the media layer. Every error names the medium (its URI) and, where it
//! applies, the container and object concerned.

use std::time::Duration;

/// Result type of the media crate.
pub type Result<T, E = MediaError> = std::result::Result<T, E>;

/// Why a media operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// The medium URI cannot be used.
    #[error("media URI '{uri}': {reason}")]
    BadUri { uri: String, reason: String },
    /// The geometry (sizes) is impossible.
    #[error("invalid media geometry: {0}")]
    BadGeometry(String),
    /// The medium was written with another geometry than the one asked for.
    #[error("medium {medium}: {reason}")]
    GeometryMismatch { medium: String, reason: String },
    /// An operating-system I/O error.
    #[error("medium {medium}: {what}: {source}")]
    Io {
        medium: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A container's header or metadata cannot be trusted.
    #[error("medium {medium}: container {container}: {reason}")]
    BadContainer {
        medium: String,
        container: u64,
        reason: String,
    },
    /// An object's data does not match its checksum or its index entry.
    #[error("medium {medium}: container {container} object {object}: {reason}")]
    Damaged {
        medium: String,
        container: u64,
        object: u64,
        reason: String,
    },
    /// A read asked for bytes the medium does not hold for that image.
    #[error("medium {medium}: {reason}")]
    OutOfRange { medium: String, reason: String },
    /// The API was used in a way it does not allow (e.g. append without an open image).
    #[error("medium {medium}: {reason}")]
    Misuse { medium: String, reason: String },
    /// No container is left to write to.
    #[error("medium {medium} is full: container {container} does not fit on it")]
    Full { medium: String, container: u64 },
    /// A request was not served in time.
    #[error("medium {medium}: {what} not served within {waited:?}")]
    Timeout {
        medium: String,
        what: String,
        waited: Duration,
    },
    /// The I/O scheduler has shut down.
    #[error("medium {medium}: the I/O scheduler has stopped")]
    SchedulerStopped { medium: String },
    /// A previous write failed; the writer refuses further work so that nothing is
    /// reported durable that may not be.
    #[error("medium {medium}: writer is poisoned by an earlier failure: {reason}")]
    Poisoned { medium: String, reason: String },
}

impl MediaError {
    pub(crate) fn io(medium: &str, what: impl Into<String>, source: std::io::Error) -> Self {
        MediaError::Io {
            medium: medium.to_string(),
            what: what.into(),
            source,
        }
    }

    /// True when the error is a checksum or consistency failure of stored data.
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            MediaError::Damaged { .. } | MediaError::BadContainer { .. }
        )
    }
}
