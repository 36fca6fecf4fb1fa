//! The EROFS on-disk structures this crate reads and writes, as plain byte layouts.
//!
//! Source of truth: linux `fs/erofs/erofs_fs.h` and erofs-utils `include/erofs_fs.h`. Every
//! multi-byte field is little-endian. Sizes are asserted by the encoders (they produce arrays).

pub const SUPER_OFFSET: u64 = 1024;
pub const SUPER_MAGIC: u32 = 0xE0F5_E1E2;
pub const SUPER_SIZE: usize = 128;
pub const DEVICE_SLOT_SIZE: usize = 128;
pub const INODE_SLOT: u64 = 32;
pub const COMPACT_INODE_SIZE: usize = 32;
pub const EXTENDED_INODE_SIZE: usize = 64;
pub const DIRENT_SIZE: usize = 12;
pub const CHUNK_INDEX_SIZE: usize = 8;
pub const XATTR_HEADER_SIZE: usize = 12;
pub const XATTR_ENTRY_SIZE: usize = 4;
pub const NAME_MAX: usize = 255;
/// The block address that marks a hole in a chunk index.
pub const NULL_ADDR: u32 = 0xFFFF_FFFF;

pub const FEATURE_COMPAT_SB_CHKSUM: u32 = 0x1;
pub const FEATURE_COMPAT_MTIME: u32 = 0x2;
pub const FEATURE_INCOMPAT_ZERO_PADDING: u32 = 0x1;
pub const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x4;
pub const FEATURE_INCOMPAT_DEVICE_TABLE: u32 = 0x8;
/// Incompatible features a reader of this crate understands.
pub const FEATURE_INCOMPAT_SUPPORTED: u32 =
    FEATURE_INCOMPAT_ZERO_PADDING | FEATURE_INCOMPAT_CHUNKED_FILE | FEATURE_INCOMPAT_DEVICE_TABLE;

pub const LAYOUT_FLAT_PLAIN: u16 = 0;
pub const LAYOUT_COMPRESSED_FULL: u16 = 1;
pub const LAYOUT_FLAT_INLINE: u16 = 2;
pub const LAYOUT_COMPRESSED_COMPACT: u16 = 3;
pub const LAYOUT_CHUNK_BASED: u16 = 4;

pub const CHUNK_FORMAT_BLKBITS_MASK: u32 = 0x1F;
pub const CHUNK_FORMAT_INDEXES: u32 = 0x20;

pub const FT_UNKNOWN: u8 = 0;
pub const FT_REG_FILE: u8 = 1;
pub const FT_DIR: u8 = 2;
pub const FT_CHRDEV: u8 = 3;
pub const FT_BLKDEV: u8 = 4;
pub const FT_FIFO: u8 = 5;
pub const FT_SOCK: u8 = 6;
pub const FT_SYMLINK: u8 = 7;

pub const S_IFMT: u16 = 0o170000;
pub const S_IFSOCK: u16 = 0o140000;
pub const S_IFLNK: u16 = 0o120000;
pub const S_IFREG: u16 = 0o100000;
pub const S_IFBLK: u16 = 0o060000;
pub const S_IFDIR: u16 = 0o040000;
pub const S_IFCHR: u16 = 0o020000;
pub const S_IFIFO: u16 = 0o010000;

pub fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
pub fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
pub fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}
pub fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
pub fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// The superblock fields this crate uses (128 bytes at byte 1024).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Superblock {
    pub checksum: u32,
    pub feature_compat: u32,
    pub blkszbits: u8,
    pub root_nid: u16,
    pub inos: u64,
    pub build_time: u64,
    pub build_time_nsec: u32,
    pub blocks: u32,
    pub meta_blkaddr: u32,
    pub xattr_blkaddr: u32,
    pub uuid: [u8; 16],
    pub volume_name: [u8; 16],
    pub feature_incompat: u32,
    pub extra_devices: u16,
    pub devt_slotoff: u16,
    pub dirblkbits: u8,
    pub xattr_prefix_count: u8,
    pub packed_nid: u64,
}

impl Superblock {
    pub fn decode(b: &[u8; SUPER_SIZE]) -> Option<Superblock> {
        if le32(b, 0) != SUPER_MAGIC {
            return None;
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[48..64]);
        let mut volume_name = [0u8; 16];
        volume_name.copy_from_slice(&b[64..80]);
        Some(Superblock {
            checksum: le32(b, 4),
            feature_compat: le32(b, 8),
            blkszbits: b[12],
            root_nid: le16(b, 14),
            inos: le64(b, 16),
            build_time: le64(b, 24),
            build_time_nsec: le32(b, 32),
            blocks: le32(b, 36),
            meta_blkaddr: le32(b, 40),
            xattr_blkaddr: le32(b, 44),
            uuid,
            volume_name,
            feature_incompat: le32(b, 80),
            extra_devices: le16(b, 86),
            devt_slotoff: le16(b, 88),
            dirblkbits: b[90],
            xattr_prefix_count: b[91],
            packed_nid: le64(b, 96),
        })
    }

    pub fn encode(&self) -> [u8; SUPER_SIZE] {
        let mut b = [0u8; SUPER_SIZE];
        put32(&mut b, 0, SUPER_MAGIC);
        put32(&mut b, 4, self.checksum);
        put32(&mut b, 8, self.feature_compat);
        b[12] = self.blkszbits;
        put16(&mut b, 14, self.root_nid);
        put64(&mut b, 16, self.inos);
        put64(&mut b, 24, self.build_time);
        put32(&mut b, 32, self.build_time_nsec);
        put32(&mut b, 36, self.blocks);
        put32(&mut b, 40, self.meta_blkaddr);
        put32(&mut b, 44, self.xattr_blkaddr);
        b[48..64].copy_from_slice(&self.uuid);
        b[64..80].copy_from_slice(&self.volume_name);
        put32(&mut b, 80, self.feature_incompat);
        put16(&mut b, 86, self.extra_devices);
        put16(&mut b, 88, self.devt_slotoff);
        b[90] = self.dirblkbits;
        b[91] = self.xattr_prefix_count;
        put64(&mut b, 96, self.packed_nid);
        b
    }
}

/// The kernel's superblock checksum: CRC32C seeded with ~0 and without the final xor, over
/// bytes [1024, block size) with the checksum field zeroed.
pub fn superblock_checksum(from_1024_to_block_end: &[u8]) -> u32 {
    !crc32c::crc32c(from_1024_to_block_end)
}

/// One 128-byte device table slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSlot {
    pub tag: [u8; 64],
    pub blocks: u32,
    pub mapped_blkaddr: u32,
}

impl DeviceSlot {
    pub fn decode(b: &[u8]) -> DeviceSlot {
        let mut tag = [0u8; 64];
        tag.copy_from_slice(&b[..64]);
        DeviceSlot {
            tag,
            blocks: le32(b, 64),
            mapped_blkaddr: le32(b, 68),
        }
    }
    pub fn encode(&self) -> [u8; DEVICE_SLOT_SIZE] {
        let mut b = [0u8; DEVICE_SLOT_SIZE];
        b[..64].copy_from_slice(&self.tag);
        put32(&mut b, 64, self.blocks);
        put32(&mut b, 68, self.mapped_blkaddr);
        b
    }
}

/// The fields of an on-disk inode, compact or extended, as the writer fills them.
#[derive(Debug, Clone, Default)]
pub struct ExtendedInode {
    pub layout: u16,
    pub xattr_icount: u16,
    pub mode: u16,
    pub size: u64,
    pub i_u: u32,
    pub ino: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    pub mtime_nsec: u32,
    pub nlink: u32,
}

impl ExtendedInode {
    pub fn encode(&self) -> [u8; EXTENDED_INODE_SIZE] {
        let mut b = [0u8; EXTENDED_INODE_SIZE];
        put16(&mut b, 0, 1 | (self.layout << 1));
        put16(&mut b, 2, self.xattr_icount);
        put16(&mut b, 4, self.mode);
        put64(&mut b, 8, self.size);
        put32(&mut b, 16, self.i_u);
        put32(&mut b, 20, self.ino);
        put32(&mut b, 24, self.uid);
        put32(&mut b, 28, self.gid);
        put64(&mut b, 32, self.mtime);
        put32(&mut b, 40, self.mtime_nsec);
        put32(&mut b, 44, self.nlink);
        b
    }
}

/// Size of the inline xattr area for a given `i_xattr_icount`.
pub fn xattr_ibody_size(icount: u16) -> usize {
    if icount == 0 {
        0
    } else {
        XATTR_HEADER_SIZE + 4 * (icount as usize - 1)
    }
}

/// Kernel `new_encode_dev` of a glibc `dev_t`; `None` if major/minor do not fit 12/20 bits.
pub fn encode_rdev(rdev: u64) -> Option<u32> {
    let (major, minor) = (dev_major(rdev), dev_minor(rdev));
    if major >= (1 << 12) || minor >= (1 << 20) {
        return None;
    }
    Some((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12))
}

/// Kernel `new_decode_dev`, returned as a glibc `dev_t`.
pub fn decode_rdev(raw: u32) -> u64 {
    let major = (raw & 0xfff00) >> 8;
    let minor = (raw & 0xff) | ((raw >> 12) & 0xfff00);
    make_dev(major, minor)
}

pub fn dev_major(dev: u64) -> u32 {
    (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff)) as u32
}
pub fn dev_minor(dev: u64) -> u32 {
    (((dev >> 12) & 0xffff_ff00) | (dev & 0xff)) as u32
}
pub fn make_dev(major: u32, minor: u32) -> u64 {
    let (major, minor) = (major as u64, minor as u64);
    ((major & 0xffff_f000) << 32)
        | ((major & 0xfff) << 8)
        | ((minor & 0xffff_ff00) << 12)
        | (minor & 0xff)
}

pub fn file_type_of_mode(mode: u16) -> u8 {
    match mode & S_IFMT {
        S_IFREG => FT_REG_FILE,
        S_IFDIR => FT_DIR,
        S_IFCHR => FT_CHRDEV,
        S_IFBLK => FT_BLKDEV,
        S_IFIFO => FT_FIFO,
        S_IFSOCK => FT_SOCK,
        S_IFLNK => FT_SYMLINK,
        _ => FT_UNKNOWN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rdev_roundtrip() {
        for (ma, mi) in [(0, 0), (1, 3), (8, 1), (4095, 0xfffff), (259, 70000)] {
            let dev = make_dev(ma, mi);
            assert_eq!((dev_major(dev), dev_minor(dev)), (ma, mi));
            assert_eq!(decode_rdev(encode_rdev(dev).unwrap()), dev);
        }
        assert!(encode_rdev(make_dev(4096, 0)).is_none());
    }

    #[test]
    fn superblock_roundtrip() {
        let sb = Superblock {
            blkszbits: 12,
            root_nid: 40,
            inos: 7,
            blocks: 9,
            feature_incompat: FEATURE_INCOMPAT_CHUNKED_FILE,
            extra_devices: 2,
            devt_slotoff: 9,
            ..Default::default()
        };
        assert_eq!(Superblock::decode(&sb.encode()), Some(sb));
    }
}
