//! EROFS on-disk format: structures, image writer, reader and overlay-exact merge.
