//! pd-router's files: the EndpointPickerConfig YAML and the endpoints file.
//! Bad input is an error message, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = sidecar::router::config::parse_scheduling(text);
    let _ = sidecar::router::config::parse_endpoints(text);
    let _ = sidecar::router::config::parse_decode(text);
    let _ = sidecar::router::config::parse_prefill(text);
});
