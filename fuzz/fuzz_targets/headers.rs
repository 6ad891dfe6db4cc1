//! Routing header values and allow-list entries: `x-prefiller-host-port`
//! (comma lists, `http://` prefixes, IPv6) and `--ssrf-allowlist`-style
//! entries. No input may panic, and a target outside a non-empty allow-list
//! is never allowed by accident of parsing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sidecar::config::{split_host_port, Allowlist};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(value) = http::HeaderValue::from_str(text) {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-prefiller-host-port", value);
        for sampling in [false, true] {
            if let Some(target) = sidecar::proxy::prefill_target(&headers, sampling) {
                let _ = split_host_port(&target);
            }
        }
    }
    let (entries, probe) = text.split_once('\n').unwrap_or((text, "10.0.0.1:8000"));
    if let Ok(list) = Allowlist::parse(entries.split(',')) {
        let _ = list.allows(probe);
    }
    let _ = sidecar::config::parse_duration(probe);
});
