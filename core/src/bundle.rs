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

/// The `format` value of a version-1 bundle (no anchor).
pub const FORMAT_V1: &str = "vitaltrail/proof-bundle/v1";
/// The `format` value of a version-2 bundle (with its anchor part).
pub const FORMAT_V2: &str = "vitaltrail/proof-bundle/v2";
/// Largest bundle we parse.
pub const MAX_BUNDLE_BYTES: usize = 64 * 1024;

/// A proof that one reading is in a log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProofBundle {
    /// [`FORMAT_V1`] or [`FORMAT_V2`].
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
    /// v2: the proof from the checkpoint to an anchor ([`AnchorProof`]).
    /// v1: reserved; a v1 bundle that carries it (even as `null`) fails.
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

/// An optional member that, when present, must have its type: `null` is a
/// member of the wrong type (`docs/proof-bundle.md` §1.1), not an absent
/// one.
fn not_null<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> std::result::Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A v2 bundle read strictly, for its anchor part: unknown, duplicate and
/// mistyped members anywhere in it are refused.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct StrictV2 {
    format: serde::de::IgnoredAny,
    envelope: serde::de::IgnoredAny,
    log_time_ms: serde::de::IgnoredAny,
    leaf_index: serde::de::IgnoredAny,
    inclusion_proof: serde::de::IgnoredAny,
    checkpoint: serde::de::IgnoredAny,
    anchor: AnchorProof,
}

/// The anchor part of a v2 bundle (`docs/proof-bundle.md` §1.1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnchorProof {
    /// `"anchored"`, or `"pending"` (no anchor covers the checkpoint yet;
    /// then no other member appears).
    pub status: String,
    /// The epoch record (53 bytes), standard base64.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "not_null"
    )]
    pub epoch_record: Option<String>,
    /// The index of the partition's head among the epoch's heads.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "not_null"
    )]
    pub head_index: Option<u64>,
    /// Inclusion proof of the head in the epoch's heads tree.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "not_null"
    )]
    pub head_proof: Option<Vec<String>>,
    /// The epoch log's signed checkpoint at the anchored size.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "not_null"
    )]
    pub epoch_checkpoint: Option<String>,
    /// Inclusion proof of the epoch record in the epoch log at that size.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "not_null"
    )]
    pub epoch_proof: Option<Vec<String>>,
    /// The local ledger's signed record anchoring that size.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "not_null"
    )]
    pub ledger_record: Option<String>,
    /// The EVM transaction anchoring that size.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "not_null"
    )]
    pub evm: Option<EvmReceipt>,
}

/// Where an EVM chain holds the anchor (`docs/anchoring.md` §6): the
/// registry's `Anchored(submitter, keccak256(origin), size, root)` event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvmReceipt {
    /// EIP-155 chain id.
    pub chain_id: u64,
    /// The registry's address, `0x` and 40 hex digits.
    pub contract: String,
    /// The anchoring address, `0x` and 40 hex digits.
    pub submitter: String,
    /// The transaction, `0x` and 64 hex digits.
    pub tx_hash: String,
    /// The block that held it when the bundle was made.
    pub block_number: u64,
}

impl EvmReceipt {
    /// `Ok` when every field has its documented form.
    pub fn check_form(&self) -> std::result::Result<(), String> {
        let hex = |s: &str, n: usize, what: &str| {
            let ok = s.len() == 2 + n
                && s.starts_with("0x")
                && s[2..].bytes().all(|b| b.is_ascii_hexdigit());
            if ok {
                Ok(())
            } else {
                Err(format!("{what} is not 0x and {n} hex digits"))
            }
        };
        hex(&self.contract, 40, "contract")?;
        hex(&self.submitter, 40, "submitter")?;
        hex(&self.tx_hash, 64, "tx_hash")
    }
}

/// `"status"` of an anchored bundle.
pub const ANCHORED: &str = "anchored";
/// `"status"` of a bundle whose checkpoint no anchor covers yet.
pub const PENDING: &str = "pending";

impl AnchorProof {
    /// The anchor part of a bundle not anchored yet.
    pub fn pending() -> Self {
        AnchorProof {
            status: PENDING.to_owned(),
            epoch_record: None,
            head_index: None,
            head_proof: None,
            epoch_checkpoint: None,
            epoch_proof: None,
            ledger_record: None,
            evm: None,
        }
    }

    /// An anchored part.
    pub fn anchored(
        record: &crate::anchor::EpochRecord,
        head_index: u64,
        head_proof: &[Hash],
        epoch_checkpoint: &str,
        epoch_proof: &[Hash],
        ledger_record: Option<&str>,
        evm: Option<EvmReceipt>,
    ) -> Self {
        AnchorProof {
            status: ANCHORED.to_owned(),
            epoch_record: Some(B64.encode(record.encode())),
            head_index: Some(head_index),
            head_proof: Some(head_proof.iter().map(Hash::to_base64).collect()),
            epoch_checkpoint: Some(epoch_checkpoint.to_owned()),
            epoch_proof: Some(epoch_proof.iter().map(Hash::to_base64).collect()),
            ledger_record: ledger_record.map(str::to_owned),
            evm,
        }
    }
}

fn hashes(list: &[String]) -> std::result::Result<Vec<Hash>, String> {
    list.iter()
        .map(|h| Hash::from_base64(h).ok_or_else(|| format!("{h:?} is not a base64 32-byte hash")))
        .collect()
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
        // Objects only: serde would also take a struct written as a JSON
        // array of its members in order, which §1 does not allow.
        let v: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| Error::MalformedBundle(e.to_string()))?;
        let anchor = v.get("anchor");
        let evm = anchor.and_then(|a| a.get("evm"));
        if !v.is_object()
            || (v.get("format").and_then(|f| f.as_str()) == Some(FORMAT_V2)
                && (!anchor.is_some_and(|a| a.is_object()) || evm.is_some_and(|e| !e.is_object())))
        {
            return Err(Error::MalformedBundle(
                "the bundle, `anchor` and `evm` must be JSON objects".into(),
            ));
        }
        let b: ProofBundle =
            serde_json::from_slice(bytes).map_err(|e| Error::MalformedBundle(e.to_string()))?;
        // v2 requires its anchor part, in its documented shape.
        if b.format == FORMAT_V2 {
            if b.anchor.is_none() {
                return Err(Error::MalformedBundle("a v2 bundle needs `anchor`".into()));
            }
            // From the bytes again, not from the parsed value: a duplicate
            // member inside `anchor` or `evm` is then refused, where a
            // JSON value would keep the last silently.
            let a = serde_json::from_slice::<StrictV2>(bytes)
                .map_err(|e| Error::MalformedBundle(format!("anchor: {e}")))?
                .anchor;
            let all = [
                a.epoch_record.is_some(),
                a.head_index.is_some(),
                a.head_proof.is_some(),
                a.epoch_checkpoint.is_some(),
                a.epoch_proof.is_some(),
            ];
            let receipts = a.ledger_record.is_some() || a.evm.is_some();
            let shape_ok = match a.status.as_str() {
                ANCHORED => all.iter().all(|x| *x) && receipts,
                PENDING => !all.iter().any(|x| *x) && !receipts,
                _ => false,
            };
            if !shape_ok {
                return Err(Error::MalformedBundle(format!(
                    "anchor: status {:?} with the wrong members",
                    a.status
                )));
            }
        }
        Ok(b)
    }

    /// Turn this into a v2 bundle with `anchor` as its anchor part.
    pub fn with_anchor(mut self, anchor: AnchorProof) -> Self {
        self.format = FORMAT_V2.to_owned();
        self.anchor = serde_json::to_value(anchor).ok();
        self
    }

    /// The anchor part of a v2 bundle.
    pub fn anchor_proof(&self) -> Option<AnchorProof> {
        if self.format != FORMAT_V2 {
            return None;
        }
        serde_json::from_value(self.anchor.clone()?).ok()
    }

    /// Pretty JSON.
    pub fn to_json(&self) -> String {
        // Serializing plain strings and integers cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Run every check of a v1 bundle (a v2 bundle's anchor checks fail
    /// without the anchor key: see [`ProofBundle::verify_anchored`]).
    /// `device`, when given, pins the expected signer.
    pub fn verify(&self, log_key: &LogPublicKey, device: Option<&DeviceId>) -> Report {
        self.verify_anchored(log_key, None, device)
    }

    /// Run every check; `anchor_key` is the anchor's verifier key (epoch
    /// log checkpoints and ledger records), needed for a v2 bundle.
    pub fn verify_anchored(
        &self,
        log_key: &LogPublicKey,
        anchor_key: Option<&LogPublicKey>,
        device: Option<&DeviceId>,
    ) -> Report {
        let mut r = Report::default();
        r.push(
            "format",
            if self.format == FORMAT_V1 || self.format == FORMAT_V2 {
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
        if self.format == FORMAT_V2 {
            self.verify_anchor_part(&mut r, cp.as_ref().ok(), anchor_key);
        } else if self.anchor.is_some() {
            r.push("anchor", Err("a v1 bundle carries no anchor".into()));
        }
        r.reading = reading.ok();
        r.checkpoint = cp.ok();
        r
    }
}

impl ProofBundle {
    /// The checks of a v2 bundle's anchor part (`docs/proof-bundle.md`
    /// §2, checks 6–10).
    fn verify_anchor_part(
        &self,
        r: &mut Report,
        cp: Option<&Checkpoint>,
        anchor_key: Option<&LogPublicKey>,
    ) {
        let Some(a) = self.anchor_proof() else {
            r.push("anchor", Err("no anchor part".into()));
            return;
        };
        if a.status == PENDING {
            r.pending = true;
            r.push(
                "anchor",
                Err("not anchored yet: the checkpoint is signed, but no anchor covers it (prove --wait)".into()),
            );
            return;
        }
        r.push("anchor", Ok(()));
        let (Some(rec), Some(hi), Some(hp), Some(ecp), Some(ep)) = (
            &a.epoch_record,
            a.head_index,
            &a.head_proof,
            &a.epoch_checkpoint,
            &a.epoch_proof,
        ) else {
            r.push("epoch_record", Err("incomplete anchor part".into()));
            return;
        };
        let record = B64
            .decode(rec)
            .map_err(|e| format!("epoch_record is not base64: {e}"))
            .and_then(|b| crate::anchor::EpochRecord::decode(&b).map_err(|e| e.to_string()));
        let head = match (&record, cp) {
            (Ok(rec), Some(cp)) => hashes(hp).and_then(|p| {
                let head = crate::anchor::PartitionHead {
                    origin: cp.origin.clone(),
                    size: cp.size,
                    root: cp.root,
                };
                rec.verify_head(&head, hi, &p).map_err(|e| {
                    format!(
                        "the checkpoint (size {}) is not head {hi} of epoch {}: {e}",
                        cp.size, rec.epoch
                    )
                })
            }),
            (Err(e), _) => Err(e.clone()),
            (_, None) => Err("needs a valid checkpoint".into()),
        };
        r.push("epoch_record", head);
        let epoch_cp = match anchor_key {
            Some(k) => Checkpoint::open(ecp, k).map_err(|e| e.to_string()),
            None => Err("no anchor key given (--anchor-key)".into()),
        };
        r.push(
            "epoch_checkpoint_signature",
            epoch_cp.as_ref().map(|_| ()).map_err(Clone::clone),
        );
        let inclusion = match (&record, &epoch_cp) {
            (Ok(rec), Ok(ecp)) => hashes(ep).and_then(|p| {
                merkle::verify_inclusion(&rec.leaf_hash(), rec.epoch, ecp.size, &p, &ecp.root)
                    .map_err(|e| {
                        format!(
                            "epoch {} is not in the epoch log at size {}: {e}",
                            rec.epoch, ecp.size
                        )
                    })
            }),
            _ => Err("needs a valid epoch record and epoch checkpoint".into()),
        };
        r.push("epoch_inclusion", inclusion);
        if let Some(note) = &a.ledger_record {
            let ledger = match (anchor_key, &epoch_cp) {
                (Some(k), Ok(ecp)) => crate::anchor::LedgerRecord::open(note, k)
                    .map_err(|e| e.to_string())
                    .and_then(|l| {
                        if l.stream == ecp.origin && l.size == ecp.size && l.root == ecp.root {
                            Ok(l)
                        } else {
                            Err(format!(
                                "it anchors size {} of {:?}, not the epoch checkpoint's size {}",
                                l.size, l.stream, ecp.size
                            ))
                        }
                    }),
                (None, _) => Err("no anchor key given (--anchor-key)".into()),
                _ => Err("needs a valid epoch checkpoint".into()),
            };
            r.ledger = ledger.as_ref().ok().cloned();
            r.push("ledger_signature", ledger.map(|_| ()));
        }
        if let Some(evm) = &a.evm {
            r.push("evm_receipt", evm.check_form());
            r.evm = Some(evm.clone());
        }
        r.epoch_checkpoint = epoch_cp.ok();
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
    /// v2: the verified epoch log checkpoint (the anchored size and root).
    pub epoch_checkpoint: Option<Checkpoint>,
    /// v2: the verified ledger record, if the bundle carries one.
    pub ledger: Option<crate::anchor::LedgerRecord>,
    /// v2: the anchor part says `pending` (every other check may pass).
    pub pending: bool,
    /// v2: the EVM receipt, if the bundle carries one (its chain check is
    /// the caller's: it needs the network).
    pub evm: Option<EvmReceipt>,
}

impl Report {
    fn push(&mut self, name: &'static str, r: std::result::Result<(), String>) {
        self.checks.push((name, r));
    }

    /// True only if every check passed.
    pub fn ok(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|(_, r)| r.is_ok())
    }

    /// Add a check the caller ran (the chain check of `verify --rpc`).
    pub fn add(&mut self, name: &'static str, r: std::result::Result<(), String>) {
        self.push(name, r);
    }

    /// True when every check but `anchor` passed and the anchor is
    /// pending: the reading is in a signed checkpoint, not yet anchored.
    pub fn ok_but_pending(&self) -> bool {
        self.pending && self.checks.iter().all(|(n, r)| r.is_ok() || *n == "anchor")
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
    /// A v2 bundle: leaf `pick` of an `n`-leaf partition log, whose
    /// checkpoint is head 1 of 3 of epoch 2 of a 5-epoch log, anchored by
    /// a ledger record at size 5.
    fn build_v2(n: u64, pick: u64) -> (ProofBundle, LogPublicKey, LogSigner) {
        use crate::anchor::{EpochRecord, LedgerRecord, PartitionHead, heads_tree};
        let (b, pk, _) = build(n, pick);
        let cp = Checkpoint::parse_unverified(&b.checkpoint).unwrap();
        let anchor = LogSigner::new(
            "vitaltrail.test/epochs",
            SecretKey::from_seed(&[4; 32]).unwrap(),
        )
        .unwrap();
        let other = |o: &str| PartitionHead {
            origin: o.into(),
            size: 3,
            root: merkle::leaf_hash(o.as_bytes()),
        };
        let heads = vec![
            other("vitaltrail.test/log/"),
            PartitionHead {
                origin: cp.origin.clone(),
                size: cp.size,
                root: cp.root,
            },
            other("vitaltrail.test/log/1"),
        ];
        let mut epochs = MemoryTree::new();
        let mut rec = None;
        for e in 0..5u64 {
            let r = EpochRecord::new(e, 1000 + e, &heads).unwrap();
            epochs.append(&r.encode());
            if e == 2 {
                rec = Some(r);
            }
        }
        let rec = rec.unwrap();
        let note = Checkpoint {
            origin: anchor.name().into(),
            size: 5,
            root: epochs.root(),
            extensions: vec![],
        }
        .sign(&anchor)
        .unwrap();
        let ledger = LedgerRecord {
            seq: 0,
            prev: Hash([0; 32]),
            stream: anchor.name().into(),
            size: 5,
            root: epochs.root(),
            time_ms: 2000,
        }
        .sign(&anchor)
        .unwrap();
        let head_proof = heads_tree(&heads).unwrap().prove_inclusion(3, 1).unwrap();
        let part = AnchorProof::anchored(
            &rec,
            1,
            &head_proof,
            &note,
            &epochs.prove_inclusion(5, 2).unwrap(),
            Some(&ledger),
            None,
        );
        (b.with_anchor(part), pk, anchor)
    }

    #[test]
    fn an_anchored_bundle_verifies_and_any_flipped_byte_fails() {
        let (b, pk, anchor) = build_v2(9, 4);
        let r = b.verify_anchored(&pk, Some(&anchor.public_key()), None);
        assert!(r.ok(), "{:?}", r.checks);
        let names: Vec<_> = r.checks.iter().map(|c| c.0).collect();
        assert_eq!(
            names,
            [
                "format",
                "envelope_signature",
                "checkpoint_signature",
                "inclusion",
                "anchor",
                "epoch_record",
                "epoch_checkpoint_signature",
                "epoch_inclusion",
                "ledger_signature"
            ]
        );
        assert_eq!(r.epoch_checkpoint.unwrap().size, 5);
        let json = b.to_json().into_bytes();
        assert_eq!(ProofBundle::from_json(&json).unwrap(), b);
        let mut checked = 0;
        for i in 0..json.len() {
            let mut t = json.clone();
            t[i] ^= 0x01;
            let Ok(t) = ProofBundle::from_json(&t) else {
                continue;
            };
            if t == b {
                continue;
            }
            checked += 1;
            assert!(
                !t.verify_anchored(&pk, Some(&anchor.public_key()), None)
                    .ok(),
                "flip at {i} still verifies"
            );
        }
        assert!(checked > 200, "{checked}");
        // Without the anchor key, or with another one, it does not verify.
        assert!(!b.verify_anchored(&pk, None, None).ok());
        let stranger = LogSigner::new(
            "vitaltrail.test/epochs",
            SecretKey::from_seed(&[5; 32]).unwrap(),
        )
        .unwrap();
        let r = b.verify_anchored(&pk, Some(&stranger.public_key()), None);
        assert_eq!(r.first_failure().unwrap().0, "epoch_checkpoint_signature");
    }

    #[test]
    fn a_pending_bundle_says_so_and_shapes_are_strict() {
        let (b, pk, _) = build(5, 2);
        let p = b.clone().with_anchor(AnchorProof::pending());
        let p = ProofBundle::from_json(p.to_json().as_bytes()).unwrap();
        let r = p.verify_anchored(&pk, None, None);
        assert!(!r.ok());
        assert!(r.ok_but_pending(), "{:?}", r.checks);
        // A pending part with anchored members, an anchored one missing
        // some, an unknown status or member, or none at all: malformed.
        let mut v: serde_json::Value = serde_json::from_str(&p.to_json()).unwrap();
        v["anchor"]["head_index"] = 1.into();
        assert!(ProofBundle::from_json(v.to_string().as_bytes()).is_err());
        let mut v: serde_json::Value = serde_json::from_str(&p.to_json()).unwrap();
        v["anchor"]["status"] = "anchored".into();
        assert!(ProofBundle::from_json(v.to_string().as_bytes()).is_err());
        let mut v: serde_json::Value = serde_json::from_str(&p.to_json()).unwrap();
        v["anchor"]["extra"] = 1.into();
        assert!(ProofBundle::from_json(v.to_string().as_bytes()).is_err());
        let mut v: serde_json::Value = serde_json::from_str(&p.to_json()).unwrap();
        v.as_object_mut().unwrap().remove("anchor");
        assert!(ProofBundle::from_json(v.to_string().as_bytes()).is_err());
        // An anchored bundle whose checkpoint is not the epoch's head.
        let (b2, pk2, anchor) = build_v2(9, 4);
        let (other, _, _) = build(10, 4);
        let mut t = b2.clone();
        t.checkpoint = other.checkpoint;
        t.inclusion_proof = other.inclusion_proof;
        let r = t.verify_anchored(&pk2, Some(&anchor.public_key()), None);
        assert_eq!(r.first_failure().unwrap().0, "epoch_record");
    }

    /// `null` is a member of the wrong type, not an absent member (§1.1):
    /// `"ledger_record": null` beside an `evm` receipt, or `"evm": null`
    /// beside a ledger record, made a bundle that verified (issue #19).
    #[test]
    fn a_null_anchor_member_is_malformed_not_absent() {
        let (b, _, _) = build_v2(9, 4);
        let good: serde_json::Value = serde_json::from_str(&b.to_json()).unwrap();
        assert!(good["anchor"]["ledger_record"].is_string());
        let members = [
            "epoch_record",
            "head_index",
            "head_proof",
            "epoch_checkpoint",
            "epoch_proof",
            "ledger_record",
            "evm",
        ];
        for m in members {
            let mut v = good.clone();
            v["anchor"][m] = serde_json::Value::Null;
            match ProofBundle::from_json(v.to_string().as_bytes()) {
                Err(Error::MalformedBundle(_)) => {}
                other => panic!("\"{m}\": null gave {other:?}"),
            }
        }
        // A member twice, inside `anchor` or inside `evm`: malformed, not
        // the last one silently.
        let text = b.to_json();
        let twice = text.replacen(
            "\"head_index\":",
            "\"head_index\": 0,\n    \"head_index\":",
            1,
        );
        assert_ne!(twice, text);
        assert!(matches!(
            ProofBundle::from_json(twice.as_bytes()),
            Err(Error::MalformedBundle(_))
        ));
        let mut with_evm = good.clone();
        with_evm["anchor"]["evm"] = serde_json::json!({
            "chain_id": 1, "contract": format!("0x{}", "11".repeat(20)),
            "submitter": format!("0x{}", "22".repeat(20)),
            "tx_hash": format!("0x{}", "33".repeat(32)), "block_number": 5
        });
        let text = serde_json::to_string_pretty(&with_evm).unwrap();
        assert!(ProofBundle::from_json(text.as_bytes()).is_ok());
        let twice = text.replacen(
            "\"block_number\":",
            "\"block_number\": 4,\n \"block_number\":",
            1,
        );
        assert!(matches!(
            ProofBundle::from_json(twice.as_bytes()),
            Err(Error::MalformedBundle(_))
        ));
        // Arrays in place of objects (serde takes a struct as the array of
        // its members in order): malformed, at every level.
        let arr = |v: &serde_json::Value, order: &[&str]| {
            serde_json::Value::Array(order.iter().map(|k| v[*k].clone()).collect())
        };
        let evm_order = [
            "chain_id",
            "contract",
            "submitter",
            "tx_hash",
            "block_number",
        ];
        let mut t = with_evm.clone();
        t["anchor"]["evm"] = arr(&with_evm["anchor"]["evm"], &evm_order);
        assert!(ProofBundle::from_json(t.to_string().as_bytes()).is_err());
        let (p1, _, _) = build(5, 2);
        let pending: serde_json::Value =
            serde_json::from_str(&p1.with_anchor(AnchorProof::pending()).to_json()).unwrap();
        let mut t = pending.clone();
        t["anchor"] = serde_json::json!(["pending"]);
        assert!(ProofBundle::from_json(t.to_string().as_bytes()).is_err());
        let (v1, _, _) = build(5, 2);
        let v1: serde_json::Value = serde_json::from_str(&v1.to_json()).unwrap();
        let top = [
            "format",
            "envelope",
            "log_time_ms",
            "leaf_index",
            "inclusion_proof",
            "checkpoint",
        ];
        assert!(ProofBundle::from_json(arr(&v1, &top).to_string().as_bytes()).is_err());
        assert!(ProofBundle::from_json(v1.to_string().as_bytes()).is_ok());
        // The same for a pending part.
        let (b, _, _) = build(5, 2);
        let p = b.with_anchor(AnchorProof::pending());
        let good: serde_json::Value = serde_json::from_str(&p.to_json()).unwrap();
        for m in members {
            let mut v = good.clone();
            v["anchor"][m] = serde_json::Value::Null;
            assert!(
                matches!(
                    ProofBundle::from_json(v.to_string().as_bytes()),
                    Err(Error::MalformedBundle(_))
                ),
                "pending with \"{m}\": null"
            );
        }
    }
}
