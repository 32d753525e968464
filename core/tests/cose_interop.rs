//! Known-answer tests against COSE_Sign1 envelopes made by an independent
//! implementation (pycose 1.1.0; see tests/fixtures/cose/make_fixtures.py).

use vitaltrail_core::envelope;

#[derive(serde::Deserialize)]
struct Manifest {
    generator: String,
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    cose_hex: String,
    did: String,
    expect: String,
    reading: Option<serde_json::Value>,
}

fn manifest() -> Manifest {
    let text = include_str!("fixtures/cose/manifest.json");
    serde_json::from_str(text).expect("fixture manifest parses")
}

#[test]
fn every_pycose_case_gets_its_expected_verdict() {
    let m = manifest();
    assert!(m.generator.starts_with("pycose"));
    assert!(m.cases.len() >= 19);
    for c in &m.cases {
        let bytes = hex::decode(&c.cose_hex).unwrap();
        let got = envelope::verify(&bytes);
        match (&got, c.expect.as_str()) {
            (Ok(r), "ok") => {
                let want = c.reading.as_ref().unwrap();
                assert_eq!(r.did.as_str(), c.did, "{}", c.name);
                assert_eq!(r.did.as_str(), want["did"], "{}", c.name);
                assert_eq!(r.seq, want["seq"].as_u64().unwrap(), "{}", c.name);
                assert_eq!(r.time, want["time"].as_u64().unwrap(), "{}", c.name);
                let obs = want["obs"].as_array().unwrap();
                assert_eq!(r.measurements.len(), obs.len(), "{}", c.name);
                for (m, o) in r.measurements.iter().zip(obs) {
                    assert_eq!(m.code, o[0], "{}", c.name);
                    assert_eq!(m.value, o[1].as_f64().unwrap(), "{}", c.name);
                    assert_eq!(m.unit, o[2], "{}", c.name);
                }
                let meta = r
                    .meta
                    .clone()
                    .map(serde_json::Value::Object)
                    .unwrap_or(serde_json::Value::Null);
                assert_eq!(meta, want["meta"], "{}", c.name);
            }
            (Err(e), code) => assert_eq!(e.code(), code, "{}: {e}", c.name),
            (Ok(_), code) => panic!("{}: verified, expected {code}", c.name),
        }
        // The batch path gives the same verdict.
        assert_eq!(envelope::verify_batch(&[&bytes])[0], got, "{}", c.name);
    }
}

#[test]
fn all_cases_in_one_batch_match_single_verification() {
    let m = manifest();
    let msgs: Vec<Vec<u8>> = m
        .cases
        .iter()
        .map(|c| hex::decode(&c.cose_hex).unwrap())
        .collect();
    let batch = envelope::verify_batch(&msgs);
    for (i, msg) in msgs.iter().enumerate() {
        assert_eq!(batch[i], envelope::verify(msg), "{}", m.cases[i].name);
    }
}

#[test]
fn flipping_any_bit_of_a_valid_pycose_envelope_fails() {
    for c in manifest().cases.iter().filter(|c| c.expect == "ok") {
        let bytes = hex::decode(&c.cose_hex).unwrap();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut t = bytes.clone();
                t[i] ^= 1 << bit;
                assert!(
                    envelope::verify(&t).is_err(),
                    "{}: byte {i} bit {bit}",
                    c.name
                );
            }
        }
    }
}
