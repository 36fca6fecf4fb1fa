//! The writer streams data chunk by chunk (memory independent of the data), and one open
//! image serves concurrent readers. No root needed.

use spinfs_erofs::{
    BlobSink, DeviceReader, FileData, Image, Metadata, Node, NodeKind, ReadAt, Source, Tree,
    WriteOptions, write_image,
};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A virtual file of `size` bytes whose content is a function of the offset; records the
/// largest read it was asked for.
struct Synthetic {
    size: u64,
    largest_read: AtomicU64,
}

fn byte_at(off: u64) -> u8 {
    (off.wrapping_mul(2_654_435_761) >> 13) as u8 | 1
}

impl ReadAt for Synthetic {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.largest_read
            .fetch_max(buf.len() as u64, Ordering::Relaxed);
        if offset + buf.len() as u64 > self.size {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "past end"));
        }
        for (i, b) in buf.iter_mut().enumerate() {
            *b = byte_at(offset + i as u64);
        }
        Ok(())
    }
}

/// Keeps only a checksum of what it receives, and checks each piece is one padded chunk.
struct CountingSink {
    bytes: u64,
    calls: u64,
    largest: usize,
}

impl BlobSink for CountingSink {
    fn write_chunk(&mut self, data: &[u8]) -> io::Result<()> {
        assert_eq!(data.len() % 4096, 0, "chunks are padded to whole blocks");
        self.bytes += data.len() as u64;
        self.calls += 1;
        self.largest = self.largest.max(data.len());
        Ok(())
    }
}

#[test]
fn data_streams_in_chunk_sized_pieces() {
    let size = 300 * (1 << 20) + 123;
    let src = Arc::new(Synthetic {
        size,
        largest_read: AtomicU64::new(0),
    });
    let mut tree = Tree::new(Metadata::default());
    tree.add(
        tree.root(),
        "big",
        Node {
            meta: Metadata::default(),
            kind: NodeKind::File(FileData {
                size,
                chunk_bits: None,
                chunks: None,
                source: Some(Source::Reader(src.clone())),
            }),
        },
    );
    let mut sink = CountingSink {
        bytes: 0,
        calls: 0,
        largest: 0,
    };
    let mut meta = Vec::new();
    // The synthetic content repeats every 2 MiB: without dedup every chunk is streamed.
    let opts = WriteOptions {
        dedup_chunks: false,
        ..WriteOptions::default()
    };
    let s = write_image(&tree, &opts, &mut meta, Some(&mut sink)).unwrap();
    assert_eq!(sink.calls, 76, "300 MiB + 123 bytes in 4 MiB chunks");
    assert_eq!(sink.largest, 4 << 20);
    assert_eq!(sink.bytes, 300 * (1 << 20) + 4096);
    assert_eq!(s.blob_bytes, sink.bytes);
    assert_eq!(
        src.largest_read.load(Ordering::Relaxed),
        4 << 20,
        "reads one chunk at a time"
    );
    assert!(
        meta.len() < 64 << 10,
        "metadata stays small: {}",
        meta.len()
    );
}

/// Serves device 1 from the synthetic content as laid out by the writer (one file, chunks in
/// order, so blob offset = file offset for every chunk but the padded tail).
struct SyntheticBlob;

impl DeviceReader for SyntheticBlob {
    fn read_device(&self, device: u16, buf: &mut [u8], offset: u64) -> io::Result<()> {
        assert_eq!(device, 1);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = byte_at(offset + i as u64);
        }
        Ok(())
    }
}

#[test]
fn one_image_many_reader_threads() {
    let mut tree = Tree::new(Metadata::default());
    let size = 16 << 20;
    let src = Arc::new(Synthetic {
        size,
        largest_read: AtomicU64::new(0),
    });
    for d in 0..20 {
        let dir = tree.add(
            tree.root(),
            format!("d{d}"),
            Node {
                meta: Metadata::default(),
                kind: NodeKind::Dir(Vec::new()),
            },
        );
        for f in 0..50 {
            tree.add(
                dir,
                format!("f{f}"),
                Node {
                    meta: Metadata {
                        ino: d * 1000 + f + 1,
                        ..Metadata::default()
                    },
                    kind: NodeKind::Fifo,
                },
            );
        }
    }
    tree.add(
        tree.root(),
        "data",
        Node {
            meta: Metadata::default(),
            kind: NodeKind::File(FileData {
                size,
                chunk_bits: Some(16),
                chunks: None,
                source: Some(Source::Reader(src)),
            }),
        },
    );
    let mut meta = Vec::new();
    let mut sink = CountingSink {
        bytes: 0,
        calls: 0,
        largest: 0,
    };
    // SyntheticBlob assumes blob offset = file offset: no dedup.
    let opts = WriteOptions {
        dedup_chunks: false,
        ..WriteOptions::default()
    };
    write_image(&tree, &opts, &mut meta, Some(&mut sink)).unwrap();
    let img = Arc::new(Image::open(meta).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                for round in 0..200u64 {
                    let d = (t * 7 + round) % 20;
                    let f = (t * 13 + round * 3) % 50;
                    let ino = img.resolve(format!("/d{d}/f{f}").as_bytes()).unwrap();
                    assert_eq!(img.spinfs_ino(&ino).unwrap(), Some(d * 1000 + f + 1));
                    let data = img.resolve(b"/data").unwrap();
                    let off = (round * 65_537 * (t + 1)) % (16 << 20);
                    let mut buf = vec![0u8; 10_000];
                    let n = img.read_data(&data, off, &mut buf, &SyntheticBlob).unwrap();
                    for (i, b) in buf[..n].iter().enumerate() {
                        assert_eq!(*b, byte_at(off + i as u64));
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}
