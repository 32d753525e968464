//! Proof bundles: one self-contained JSON document that proves a reading is
//! in a log, modelled on C2SP tlog-proof. Specified in `docs/proof-bundle.md`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, LogPublicKey};
use crate::did::DeviceId;
use crate::envelope::{self, Reading};
use crate::error::{Error, Result};
use crate::leaf;
use crate::merkle::{self, Hash};

/// The `format` value of a version-1 bundle.
pub const FORMAT_V1: &str = "vitaltrail/proof-bundle/v1";
/// Largest bundle we parse.
pub const MAX_BUNDLE_BYTES: usize = 64 * 1024;

/// A proof that one reading is in a log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProofBundle {
    /// Always [`FORMAT_V1`].
    pub format: String,
    /// The COSE_Sign1 envelope, standard base64.
    pub envelope: String,
    /// When the log accepted the reading, Unix ms (part of the leaf).
    pub log_time_ms: u64,
    /// The leaf's index in the log.
    pub leaf_index: u64,
    /// RFC 9162 inclusion proof, deepest sibling first, standard base64 each.
    pub inclusion_proof: Vec<String>,
    /// The signed checkpoint note the proof leads to.
    pub checkpoint: String,
    /// Reserved for the proof from the checkpoint to an anchor. A version-1
    /// verifier that does not understand it must fail the bundle.
    /// `"anchor": null` counts as present.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub anchor: Option<serde_json::Value>,
}

fn present<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

impl ProofBundle {
    /// Assemble a bundle.
    pub fn new(
        envelope: &[u8],
        log_time_ms: u64,
        leaf_index: u64,
        proof: &[Hash],
        checkpoint_note: &str,
    ) -> Self {
        ProofBundle {
            format: FORMAT_V1.to_owned(),
            envelope: B64.encode(envelope),
            log_time_ms,
            leaf_index,
            inclusion_proof: proof.iter().map(Hash::to_base64).collect(),
            checkpoint: checkpoint_note.to_owned(),
            anchor: None,
        }
    }

    /// Parse JSON (untrusted).
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_BUNDLE_BYTES {
            return Err(Error::MalformedBundle(format!(
                "{} bytes, the limit is {MAX_BUNDLE_BYTES}",
                bytes.len()
            )));
        }
        serde_json::from_slice(bytes).map_err(|e| Error::MalformedBundle(e.to_string()))
    }

    /// Pretty JSON.
    pub fn to_json(&self) -> String {
        // Serializing plain strings and integers cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Run every check. `device`, when given, pins the expected signer.
    pub fn verify(&self, log_key: &LogPublicKey, device: Option<&DeviceId>) -> Report {
        let mut r = Report::default();
        r.push(
            "format",
            if self.format == FORMAT_V1 {
                Ok(())
            } else {
                Err(format!("unknown format {:?}", self.format))
            },
        );
        let env = B64
            .decode(&self.envelope)
            .map_err(|e| format!("envelope is not base64: {e}"));
        let reading = env
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|b| envelope::verify(b).map_err(|e| format!("{} ({})", e, e.code())));
        r.push(
            "envelope_signature",
            reading.as_ref().map(|_| ()).map_err(Clone::clone),
        );
        if let Some(d) = device {
            r.push(
                "device",
                match &reading {
                    Ok(rd) if rd.did == *d => Ok(()),
                    Ok(rd) => Err(format!("signed by {}, expected {d}", rd.did)),
                    Err(_) => Err("envelope did not verify".into()),
                },
            );
        }
        let cp = Checkpoint::open(&self.checkpoint, log_key).map_err(|e| e.to_string());
        r.push(
            "checkpoint_signature",
            cp.as_ref().map(|_| ()).map_err(Clone::clone),
        );
        let proof: std::result::Result<Vec<Hash>, String> = self
            .inclusion_proof
            .iter()
            .map(|h| {
                Hash::from_base64(h).ok_or_else(|| format!("{h:?} is not a base64 32-byte hash"))
            })
            .collect();
        let inclusion = match (&env, &cp, &proof) {
            (Ok(env), Ok(cp), Ok(proof)) => {
                let lh = leaf::hash(self.log_time_ms, env);
                merkle::verify_inclusion(&lh, self.leaf_index, cp.size, proof, &cp.root)
                    .map_err(|e| e.to_string())
            }
            (_, _, Err(e)) => Err(e.clone()),
            _ => Err("needs a decodable envelope and a valid checkpoint".into()),
        };
        r.push("inclusion", inclusion);
        if self.anchor.is_some() {
            r.push(
                "anchor",
                Err("this verifier does not support anchor proofs".into()),
            );
        }
        r.reading = reading.ok();
        r.checkpoint = cp.ok();
        r
    }
}

/// The outcome of [`ProofBundle::verify`]: every check by name.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// `(check name, Ok or the reason it failed)`, in the order run.
    pub checks: Vec<(&'static str, std::result::Result<(), String>)>,
    /// The verified reading, when the envelope verified.
    pub reading: Option<Reading>,
    /// The verified checkpoint, when it verified.
    pub checkpoint: Option<Checkpoint>,
}

impl Report {
    fn push(&mut self, name: &'static str, r: std::result::Result<(), String>) {
        self.checks.push((name, r));
    }

    /// True only if every check passed.
    pub fn ok(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|(_, r)| r.is_ok())
    }

    /// The first failed check.
    pub fn first_failure(&self) -> Option<(&'static str, &str)> {
        self.checks
            .iter()
            .find_map(|(n, r)| r.as_ref().err().map(|e| (*n, e.as_str())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::LogSigner;
    use crate::did::SecretKey;
    use crate::envelope::{Measurement, UnsignedReading, sign};
    use crate::merkle::MemoryTree;

    fn build(n: u64, pick: u64) -> (ProofBundle, LogPublicKey, DeviceId) {
        let dev = SecretKey::from_seed(&[1; 32]).unwrap();
        let log = LogSigner::new(
            "vitaltrail.test/log/0",
            SecretKey::from_seed(&[2; 32]).unwrap(),
        )
        .unwrap();
        let mut tree = MemoryTree::new();
        let mut envs = vec![];
        for seq in 0..n {
            let e = sign(
                &dev,
                &UnsignedReading {
                    seq,
                    time: 1_700_000_000_000 + seq,
                    measurements: vec![Measurement {
                        code: "8867-4".into(),
                        value: 60.0 + seq as f64,
                        unit: "/min".into(),
                    }],
                    meta: None,
                },
            )
            .unwrap();
            tree.append_hash(leaf::hash(1_700_000_000_100 + seq, &e));
            envs.push(e);
        }
        let cp = Checkpoint {
            origin: log.name().into(),
            size: n,
            root: tree.root(),
            extensions: vec![],
        };
        let note = cp.sign(&log).unwrap();
        let proof = tree.prove_inclusion(n, pick).unwrap();
        let b = ProofBundle::new(
            &envs[pick as usize],
            1_700_000_000_100 + pick,
            pick,
            &proof,
            &note,
        );
        (b, log.public_key(), dev.did().clone())
    }

    #[test]
    fn good_bundle_verifies_and_roundtrips() {
        let (b, pk, did) = build(37, 20);
        let r = b.verify(&pk, Some(&did));
        assert!(r.ok(), "{:?}", r.checks);
        let json = b.to_json();
        assert_eq!(ProofBundle::from_json(json.as_bytes()).unwrap(), b);
        assert_eq!(r.reading.unwrap().seq, 20);
    }

    #[test]
    fn every_flipped_byte_of_the_json_fails() {
        let (b, pk, did) = build(9, 4);
        let json = b.to_json().into_bytes();
        let mut checked = 0;
        for i in 0..json.len() {
            let mut t = json.clone();
            t[i] ^= 0x01;
            let Ok(t) = ProofBundle::from_json(&t) else {
                continue;
            };
            if t == b {
                continue; // a flip that JSON decodes to the same bundle (e.g. in whitespace)
            }
            checked += 1;
            let r = t.verify(&pk, Some(&did));
            assert!(!r.ok(), "flip at {i} still verifies");
        }
        assert!(checked > 100);
    }

    #[test]
    fn failures_are_named() {
        let (mut b, pk, did) = build(5, 2);
        b.leaf_index = 3;
        assert_eq!(
            b.verify(&pk, Some(&did)).first_failure().unwrap().0,
            "inclusion"
        );
        let (mut b, pk, _) = build(5, 2);
        b.anchor = Some(serde_json::json!({"chain": "x"}));
        assert_eq!(b.verify(&pk, None).first_failure().unwrap().0, "anchor");
        let mut v: serde_json::Value = serde_json::from_str(&build(5, 2).0.to_json()).unwrap();
        v["anchor"] = serde_json::Value::Null;
        let b = ProofBundle::from_json(v.to_string().as_bytes()).unwrap();
        assert_eq!(b.verify(&pk, None).first_failure().unwrap().0, "anchor");
        let (b, pk, _) = build(5, 2);
        let other = SecretKey::from_seed(&[9; 32]).unwrap();
        assert_eq!(
            b.verify(&pk, Some(other.did())).first_failure().unwrap().0,
            "device"
        );
        let other_log = LogSigner::new(
            "vitaltrail.test/log/0",
            SecretKey::from_seed(&[3; 32]).unwrap(),
        )
        .unwrap();
        assert_eq!(
            b.verify(&other_log.public_key(), None)
                .first_failure()
                .unwrap()
                .0,
            "checkpoint_signature"
        );
        assert!(ProofBundle::from_json(br#"{"format":"x"}"#).is_err());
        assert!(ProofBundle::from_json(b"[]").is_err());
    }
}
