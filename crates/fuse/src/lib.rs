//! FUSE adapter: turns kernel requests into store calls.
