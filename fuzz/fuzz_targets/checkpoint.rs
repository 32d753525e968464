//! Untrusted checkpoint notes: parsing and verification never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vitaltrail_core::{Checkpoint, LogSigner, SecretKey};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = Checkpoint::parse_unverified(text);
    let key = LogSigner::new("fuzz.example/log", SecretKey::from_seed(&[7; 32]).unwrap()).unwrap();
    let _ = Checkpoint::open(text, &key.public_key());
});
