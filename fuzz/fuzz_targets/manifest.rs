//! Manifest decoding: arbitrary bytes as `STORE/manifest`. Decoding must never panic; what
//! decodes must encode back to bytes that decode to the same manifest.
//!
//! First byte even: the rest is the whole file. Odd: the rest is the JSON body, given a
//! header with the right magic, version and CRC32C, so mutations reach the body parser (a
//! fuzzer does not guess checksums).
#![no_main]

use spinfs_store::Manifest;
use std::path::Path;

fn check(bytes: &[u8]) {
    let path = Path::new("fuzz/manifest");
    if let Ok(m) = Manifest::decode(bytes, path) {
        let again = Manifest::decode(&m.encode(), path).expect("a re-encoded manifest decodes");
        assert_eq!(
            again.encode(),
            m.encode(),
            "round trip changed the manifest"
        );
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        check(rest);
        return;
    }
    let template = Manifest::new("fuzz".into()).encode();
    let header = &template[..template.iter().position(|&b| b == b'\n').unwrap()];
    let at = header.windows(7).position(|w| w == b"crc32c=").unwrap() + 7;
    let mut file = header[..at].to_vec();
    file.extend_from_slice(format!("{:08x}\n", crc32c::crc32c(rest)).as_bytes());
    file.extend_from_slice(rest);
    file.push(b'\n');
    check(&file);
});
