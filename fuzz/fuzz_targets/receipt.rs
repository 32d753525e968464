//! Untrusted receipts (what a device parses off MQTT): parsing and checking
//! every entry never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vitaltrail_core::receipt::Receipt;
use vitaltrail_core::{LogSigner, SecretKey};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Receipt::from_json(data) {
        let key = LogSigner::new("fuzz.example/log", SecretKey::from_seed(&[7; 32]).unwrap()).unwrap();
        for e in &r.entries {
            let _ = r.verify_entry(e, data, &key.public_key());
        }
    }
});
