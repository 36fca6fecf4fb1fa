//! The body of the reader fuzz target, shared by `fuzz/` (cargo-fuzz) and the stable
//! mutation test in `tests/hostile.rs`.

use crate::io::DeviceReader;
use crate::reader::{FileType, Image};

/// Serves zeros for any device read below 1 GiB (enough to exercise data paths).
struct ZeroDevices;

impl DeviceReader for ZeroDevices {
    fn read_device(&self, _device: u16, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset.saturating_add(buf.len() as u64) > 1 << 30 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "beyond device",
            ));
        }
        buf.fill(0);
        Ok(())
    }
}

/// Opens `data` as a meta image and exercises every read path. Must never panic, hang or
/// allocate beyond what the input justifies; errors are expected.
pub fn fuzz_reader(data: &[u8]) {
    let Ok(img) = Image::open(data) else {
        return;
    };
    let _ = img.verify(None);
    let mut files = Vec::new();
    let _ = img.walk(|path, _, ino| {
        if files.len() < 64 {
            files.push((path.to_vec(), ino.clone()));
        }
        Ok(())
    });
    let mut buf = vec![0u8; 8192];
    for (path, ino) in files {
        let _ = img.resolve(&path);
        if ino.file_type == FileType::File {
            for off in [0, ino.size / 2, ino.size.saturating_sub(100)] {
                let _ = img.read_data(&ino, off, &mut buf, &ZeroDevices);
            }
        }
        if let Ok(root) = img.root() {
            let _ = img.lookup(&root, path.rsplit(|&b| b == b'/').next().unwrap_or(b""));
        }
    }
}
