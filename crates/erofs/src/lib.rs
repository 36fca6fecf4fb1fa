//! EROFS on-disk format: structures, image writer, reader and overlay-exact merge.
//!
//! This crate knows nothing of FUSE or media policy. It turns a [`Tree`] (built by the store,
//! from a directory with [`fromdir::tree_from_dir`], or by [`merge`]) into a meta image plus
//! blob data, and reads such images back through [`Image`].
//!
//! ```
//! use spinfs_erofs::*;
//! use std::sync::Arc;
//!
//! let mut tree = Tree::new(Metadata { perm: 0o755, ino: 1, ..Metadata::default() });
//! let data: Arc<Vec<u8>> = Arc::new(b"hello".to_vec());
//! let file = FileData { size: 5, chunk_bits: None, chunks: None, source: Some(Source::Reader(data)) };
//! let meta = Metadata { perm: 0o644, ino: 2, ..Metadata::default() };
//! tree.add(tree.root(), "greeting", Node { meta, kind: NodeKind::File(file) });
//!
//! // The meta image goes to any `Write`, new data to any `BlobSink`, chunk by chunk.
//! let (mut meta_image, mut blob) = (Vec::new(), Vec::new());
//! let summary = write_image(&tree, &WriteOptions::default(), &mut meta_image, Some(&mut blob))?;
//! assert_eq!(summary.new_blob_device, Some(1));
//!
//! // Read it back through `ReadAt` (a file, the media, a buffer) and a `DeviceReader`.
//! let image = Image::open(&meta_image[..])?;
//! let ino = image.resolve(b"/greeting")?;
//! assert_eq!(image.spinfs_ino(&ino)?, Some(2));
//! let extents = image.map(&ino, 0, ino.size)?;
//! assert_eq!(extents[0].location, Some((1, 0))); // device 1 (the blob), byte 0
//! let mut buf = [0u8; 5];
//! image.read_data(&ino, 0, &mut buf, &Blobs(vec![blob]))?;
//! assert_eq!(&buf, b"hello");
//! # Ok::<(), spinfs_erofs::Error>(())
//! ```

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
pub use reader::{
    ChunkRef, DeviceInfo, DirEntry, DirIter, Extent, FileType, Image, Inode, VerifyStats, Xattr,
};
pub use tree::{Chunk, FileData, Metadata, Node, NodeId, NodeKind, Source, Tree};
pub use writer::{DeviceSpec, WriteOptions, WriteSummary, chunk_bits_for_size, write_image};

#[doc(hidden)]
pub mod fuzzing;
