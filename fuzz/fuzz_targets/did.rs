//! Untrusted did:key strings and leaf bytes never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vitaltrail_core::{DeviceId, leaf};

fuzz_target!(|data: &[u8]| {
    let _ = leaf::decode(data);
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(d) = DeviceId::parse(s) {
            assert_eq!(d.as_str(), s);
        }
    }
});
