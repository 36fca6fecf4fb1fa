//! Feeds arbitrary bytes to the EROFS reader as a meta image.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    spinfs_erofs::fuzzing::fuzz_reader(data);
});
