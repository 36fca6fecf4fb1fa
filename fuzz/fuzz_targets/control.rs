//! Control-socket request parsing: arbitrary bytes as one request line. Must never panic;
//! whatever parses is one of the known requests.
#![no_main]

use spinfs_store::control::{Request, parse_request};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(r) = parse_request(data) {
        assert!(matches!(
            r,
            Request::Status | Request::Archive { .. } | Request::Merge { .. }
        ));
        // anything accepted is a JSON object with a "cmd" string
        let v: serde_json::Value = serde_json::from_slice(data).expect("accepted => JSON");
        assert!(v.get("cmd").and_then(|c| c.as_str()).is_some());
    }
});
