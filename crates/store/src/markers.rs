//! Names the store gives meaning to inside its layers (SSD trees and images alike).
//!
//! Everything the store marks lives under `trusted.overlay.`, the namespace kernel overlayfs
//! reserves and hides: a user's own `trusted.overlay.X` is stored escaped as
//! `trusted.overlay.overlay.X` (the overlayfs convention), so user xattrs and markers can
//! never be confused, and kernel overlayfs over our layers shows the same names we do.

/// Persistent spinfs inode number of an entry whose identity is not derived from where it
/// lives: a copy-up keeps the number of what it copied. 8 bytes, little-endian. The same name
/// carries every inode's number inside images.
pub const INO_XATTR: &[u8] = spinfs_erofs::tree::SPINFS_INO_XATTR;
/// Opaque directory: lower layers' entries of this directory are hidden.
pub const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";
/// ctime of an archived inode (EROFS keeps only mtime): 8-byte seconds + 4-byte nanoseconds,
/// little-endian.
pub const CTIME_XATTR: &[u8] = b"trusted.overlay.spinfs.ctime";
/// On a character device 0/0 that a user made: it is a device, not a whiteout.
pub const REALDEV_XATTR: &[u8] = spinfs_erofs::tree::SPINFS_REALDEV_XATTR;
/// Prefix of the reserved namespace.
pub const INTERNAL_PREFIX: &[u8] = b"trusted.overlay.";
/// Prefix under which users' own `trusted.overlay.*` names are stored.
pub const ESCAPED_PREFIX: &[u8] = b"trusted.overlay.overlay.";

/// Maps a user's xattr name to the stored name.
pub fn escape_xattr(name: &[u8]) -> Vec<u8> {
    match name.strip_prefix(INTERNAL_PREFIX) {
        Some(rest) => [ESCAPED_PREFIX, rest].concat(),
        None => name.to_vec(),
    }
}

/// Maps a stored xattr name to what users see; `None` for the store's own markers.
pub fn unescape_xattr(stored: &[u8]) -> Option<Vec<u8>> {
    if let Some(rest) = stored.strip_prefix(ESCAPED_PREFIX) {
        Some([INTERNAL_PREFIX, rest].concat())
    } else if stored.starts_with(INTERNAL_PREFIX) {
        None
    } else {
        Some(stored.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_round_trips_and_hides_markers() {
        for user in [
            &b"user.a"[..],
            b"trusted.overlay.opaque",
            b"trusted.overlay.overlay.x",
            b"security.s",
        ] {
            assert_eq!(unescape_xattr(&escape_xattr(user)).as_deref(), Some(user));
        }
        assert_eq!(unescape_xattr(OPAQUE_XATTR), None);
        assert_eq!(unescape_xattr(INO_XATTR), None);
        assert_eq!(unescape_xattr(REALDEV_XATTR), None);
        assert_eq!(unescape_xattr(CTIME_XATTR), None);
    }
}
