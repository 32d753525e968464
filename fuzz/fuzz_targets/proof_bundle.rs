//! Untrusted proof bundles: parsing and every check never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vitaltrail_core::{LogSigner, ProofBundle, SecretKey};

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = ProofBundle::from_json(data) {
        let key = LogSigner::new("fuzz.example/log", SecretKey::from_seed(&[7; 32]).unwrap()).unwrap();
        let _ = b.verify(&key.public_key(), None);
    }
});
