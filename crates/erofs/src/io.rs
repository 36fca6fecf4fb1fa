//! Random-access I/O traits: where meta images and blob devices are read from, and where new
//! blob data is written to.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// Random-access reads of an image or of file data.
pub trait ReadAt: Send + Sync {
    /// Fills all of `buf` from byte `offset`; reading past the end is an
    /// `UnexpectedEof` error, never a short read.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for std::fs::File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }
}

impl ReadAt for [u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).ok().filter(|&s| s <= self.len());
        match start.and_then(|s| self.get(s..s.checked_add(buf.len())?)) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the buffer",
            )),
        }
    }
}

impl ReadAt for Vec<u8> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_at(buf, offset)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for Arc<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
}

/// Reads file data from the devices of an image: device 0 is the meta image itself, device
/// `n >= 1` the n-th entry of its device table (the blobs).
pub trait DeviceReader {
    fn read_device(&self, device: u16, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

/// A [`DeviceReader`] over a list of blob readers (index 0 = device 1).
pub struct Blobs<R>(pub Vec<R>);

impl<R: ReadAt> DeviceReader for Blobs<R> {
    fn read_device(&self, device: u16, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match (device as usize).checked_sub(1).and_then(|i| self.0.get(i)) {
            Some(r) => r.read_at(buf, offset),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no reader for device {device}"),
            )),
        }
    }
}

/// Receives the new blob's data, in order: the first byte of each call lands at the blob
/// offset equal to the total length of the previous calls. Each call is one chunk, padded
/// with zeros to a whole number of blocks.
pub trait BlobSink {
    fn write_chunk(&mut self, data: &[u8]) -> io::Result<()>;
}

impl BlobSink for std::fs::File {
    fn write_chunk(&mut self, data: &[u8]) -> io::Result<()> {
        io::Write::write_all(self, data)
    }
}

impl BlobSink for Vec<u8> {
    fn write_chunk(&mut self, data: &[u8]) -> io::Result<()> {
        self.extend_from_slice(data);
        Ok(())
    }
}

/// Adapts any `io::Write` to a [`BlobSink`].
pub struct WriteSink<W>(pub W);

impl<W: io::Write> BlobSink for WriteSink<W> {
    fn write_chunk(&mut self, data: &[u8]) -> io::Result<()> {
        self.0.write_all(data)
    }
}
