//! Untrusted envelope bytes: never panic, and batch == single.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vitaltrail_core::envelope;

fuzz_target!(|data: &[u8]| {
    let single = envelope::verify(data);
    let batch = envelope::verify_batch(&[data]);
    assert_eq!(batch[0], single);
});
