//! EROFS on-disk format: structures, image writer, reader and overlay-exact merge.
//!
//! This crate knows nothing of FUSE or media policy. It turns a [`Tree`] (built by the store,
//! from a directory with [`fromdir::tree_from_dir`], or by [`merge`]) into a meta image plus
//! blob data, and reads such images back through [`Image`].

pub mod error;
pub mod fromdir;
pub mod io;
pub mod merge;
pub mod ondisk;
pub mod reader;
pub mod tree;
pub mod writer;

pub use error::{Error, Result};
pub use io::{BlobSink, Blobs, DeviceReader, ReadAt, WriteSink};
pub use merge::{MergeMode, MergeSummary, MergedDevice, merge_images, merge_tree};
pub use reader::{DirEntry, Extent, FileType, Image, Inode, VerifyStats};
pub use tree::{Chunk, FileData, Metadata, Node, NodeId, NodeKind, Source, Tree};
pub use writer::{DeviceSpec, WriteOptions, WriteSummary, chunk_bits_for_size, write_image};

#[doc(hidden)]
pub mod fuzzing;
