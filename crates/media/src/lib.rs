//! Archive media: container/object layout, backends, I/O scheduler and media model.
//!
//! A medium ([`Medium`]) is a sequence of self-describing containers on a [`Backend`]
//! (`dir:PATH`, `file:PATH`). [`MediumWriter`] appends images and makes them durable with an
//! explicit `commit`; [`MediumReader`] returns byte ranges of images, fetching and verifying
//! only the objects that cover them; [`Catalogue::scan`] rebuilds what the medium holds from
//! the medium alone; [`MediaScheduler`] orders media I/O; [`model`] simulates slow media.

pub mod backend;
pub mod buf;
pub mod catalog;
pub mod error;
pub mod fault;
pub mod fgsync;
pub mod layout;
pub mod medium;
pub mod model;
pub mod reader;
pub mod sched;
pub mod writer;

pub use backend::{Backend, BackendOptions, EngineChoice, open_backend};
pub use catalog::{
    Catalogue, ContainerSummary, DamagedObject, IncompleteImage, VerifyReport, verify,
};
pub use error::{MediaError, Result};
pub use fault::{FaultAction, FaultArea, FaultBackend, FaultOp, FaultRule};
pub use fgsync::{ForegroundSyncs, YieldStats};
pub use layout::{Extent, Geometry, ImageExtents, ImageKind, ImageRef, MediumId};
pub use medium::Medium;
pub use model::{MediaModel, ModelCounters, ModelDevice, ModelParams};
pub use reader::{MediumReader, ReadOptions};
pub use sched::{
    AdaptiveStats, Class, Device, MediaScheduler, PendingRead, Policy, SchedConfig, WriteGrant,
};
pub use writer::{CommitInfo, MediumWriter, WriterStats};
