//! The worked examples in docs/ were computed by Python scripts written from
//! the specifications alone (docs/vectors/*.py). Our implementation must agree.

use vitaltrail_core::merkle::{self, Hash, MemoryTree};
use vitaltrail_core::{LogPublicKey, ProofBundle};

fn root_of(leaves: &[&[u8]]) -> Hash {
    let mut t = MemoryTree::new();
    for l in leaves {
        t.append(l);
    }
    t.root()
}

#[test]
fn merkle_roots_match_docs() {
    let h = |s: &str| Hash::from_hex(s).unwrap();
    assert_eq!(
        root_of(&[]),
        h("af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262")
    );
    assert_eq!(
        root_of(&[b"a"]),
        h("1ff621ee3430890e869728995a6cee4f2b0b61271bfc19b0092b06d778750ae8")
    );
    assert_eq!(
        root_of(&[b"a", b"b"]),
        h("6564e87d8619ea09c801c567c641d47fe817ae3b2cf80685cde2eb6557247eca")
    );
    let abc = h("6c62dd52a0971b7d00a7cead004e0c3f3c0766e3f5359a0f8297768d2b02d03c");
    assert_eq!(root_of(&[b"a", b"b", b"c"]), abc);
    // Index 2 of [a, b, c]: the proof is the root of [a, b].
    let mut t = MemoryTree::new();
    for l in [b"a", b"b", b"c"] {
        t.append(l);
    }
    let p = t.prove_inclusion(3, 2).unwrap();
    assert_eq!(
        p,
        vec![h(
            "6564e87d8619ea09c801c567c641d47fe817ae3b2cf80685cde2eb6557247eca"
        )]
    );
    merkle::verify_inclusion(&merkle::leaf_hash(b"c"), 2, 3, &p, &abc).unwrap();
}

#[test]
fn python_made_bundle_verifies() {
    let bundle =
        ProofBundle::from_json(include_bytes!("../../docs/vectors/example_bundle.json")).unwrap();
    let key = LogPublicKey::parse(include_str!("../../docs/vectors/example_log.vkey")).unwrap();
    let report = bundle.verify(&key, None);
    assert!(report.ok(), "{:?}", report.checks);
    let mut tampered = bundle.clone();
    tampered.log_time_ms += 1;
    assert!(!tampered.verify(&key, None).ok());
}
