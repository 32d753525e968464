//! Receipts: the pipeline's own word to a device about what became of its
//! readings. Specified in `docs/receipts.md`.
//!
//! An MQTT broker's PUBACK only says the broker holds a message in memory.
//! A receipt says more, and proves it: once a commit of the log has made a
//! reading durable, the attestor publishes one receipt per device per
//! commit. It carries a checkpoint signed by the log key for the tree at
//! that commit, and for each of the device's readings its leaf index, log
//! time and an RFC 9162 inclusion proof. One signature per commit, never
//! one per reading. A device that holds the envelope it sent can check,
//! offline and at once, that the reading is in the log.
//!
//! Duplicates (a resent reading already logged) get the original's index
//! and proof; final rejections get their reason, matched to the message by
//! its BLAKE3 hash, so the device stops resending.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, LogPublicKey};
use crate::error::{Error, Result};
use crate::leaf;
use crate::merkle::{self, Hash};

/// The `receipt` value of a version-1 receipt.
pub const FORMAT_V1: &str = "vitaltrail/receipt/v1";
/// Largest receipt parsed.
pub const MAX_RECEIPT_BYTES: usize = 256 * 1024;
/// Largest receipt published: below [`MAX_RECEIPT_BYTES`] and below the
/// brokers' 256 KiB message limit. Larger ones are split ([`Receipt::split`]).
pub const MAX_PUBLISHED_RECEIPT_BYTES: usize = 192 * 1024;

/// What became of one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Appended to the log in this commit.
    Logged,
    /// Already in the log: `index` and `log_time_ms` are the original's.
    Duplicate,
    /// Finally rejected; `reason` says why. Resending will not help.
    Rejected,
}

/// One message's fate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The reading's seq, when the message could be decoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Its fate.
    pub status: Status,
    /// BLAKE3 of the message bytes as received (standard base64).
    pub message_hash: String,
    /// Logged or duplicate: the leaf index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u64>,
    /// Logged or duplicate: the leaf's log time, Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_time_ms: Option<u64>,
    /// Logged or duplicate: inclusion proof in the checkpoint's tree,
    /// deepest sibling first (standard base64 each); present (possibly
    /// empty, for a 1-leaf tree) exactly when `index` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<Vec<String>>,
    /// Rejected: the machine-readable reason (as in the dead letters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A receipt for one device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// Always [`FORMAT_V1`].
    pub receipt: String,
    /// The device the receipt is for.
    pub did: String,
    /// The signed checkpoint the proofs lead to; present whenever an entry
    /// is logged or a duplicate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// One per message, in the order the pipeline decided them.
    pub entries: Vec<Entry>,
}

/// The `message_hash` of message bytes.
pub fn message_hash(bytes: &[u8]) -> String {
    B64.encode(blake3::hash(bytes).as_bytes())
}

impl Entry {
    /// A logged (or, with `duplicate`, already logged) reading.
    pub fn in_log(
        seq: u64,
        message: &[u8],
        index: u64,
        log_time_ms: u64,
        proof: &[Hash],
        duplicate: bool,
    ) -> Self {
        Entry {
            seq: Some(seq),
            status: if duplicate {
                Status::Duplicate
            } else {
                Status::Logged
            },
            message_hash: message_hash(message),
            index: Some(index),
            log_time_ms: Some(log_time_ms),
            proof: Some(proof.iter().map(|h| B64.encode(h.0)).collect()),
            reason: None,
        }
    }

    /// A final rejection.
    pub fn rejected(seq: Option<u64>, message: &[u8], reason: &str) -> Self {
        Entry {
            seq,
            status: Status::Rejected,
            message_hash: message_hash(message),
            index: None,
            log_time_ms: None,
            proof: None,
            reason: Some(reason.to_owned()),
        }
    }
}

impl Receipt {
    /// A receipt for `did`.
    pub fn new(did: &str, checkpoint: Option<String>, entries: Vec<Entry>) -> Self {
        Receipt {
            receipt: FORMAT_V1.to_owned(),
            did: did.to_owned(),
            checkpoint,
            entries,
        }
    }

    /// Receipts for `did` holding `entries` in order, each at most
    /// [`MAX_PUBLISHED_RECEIPT_BYTES`] as JSON; every one carries the same
    /// checkpoint (when any of its entries needs it).
    pub fn split(did: &str, checkpoint: Option<String>, entries: Vec<Entry>) -> Vec<Receipt> {
        let base = Receipt::new(did, None, vec![]).to_json().len()
            + checkpoint.as_ref().map_or(0, |c| c.len() * 2 + 16);
        let mut out = Vec::new();
        let mut cur: Vec<Entry> = Vec::new();
        let mut size = base;
        for e in entries {
            let n = serde_json::to_vec(&e).map_or(0, |v| v.len()) + 1;
            if !cur.is_empty() && size + n > MAX_PUBLISHED_RECEIPT_BYTES {
                out.push(std::mem::take(&mut cur));
                size = base;
            }
            size += n;
            cur.push(e);
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out.into_iter()
            .map(|es| {
                let needs = es.iter().any(|e| e.status != Status::Rejected);
                Receipt::new(did, needs.then(|| checkpoint.clone()).flatten(), es)
            })
            .collect()
    }

    /// Serialize (compact JSON).
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parse untrusted bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_RECEIPT_BYTES {
            return Err(Error::MalformedReceipt("receipt too large".into()));
        }
        let r: Receipt =
            serde_json::from_slice(bytes).map_err(|e| Error::MalformedReceipt(e.to_string()))?;
        if r.receipt != FORMAT_V1 {
            return Err(Error::MalformedReceipt(format!(
                "unknown receipt format {:?}",
                r.receipt
            )));
        }
        Ok(r)
    }

    /// Check that `envelope`, the exact bytes a device sent, is in the log
    /// as `entry` (logged or duplicate) of this receipt says: the
    /// checkpoint is signed by `log_key`, and the leaf made of the entry's
    /// log time and these bytes is at the entry's index under the
    /// checkpoint's root. Returns the verified checkpoint.
    pub fn verify_entry(
        &self,
        entry: &Entry,
        envelope: &[u8],
        log_key: &LogPublicKey,
    ) -> Result<Checkpoint> {
        let (Some(index), Some(log_time_ms)) = (entry.index, entry.log_time_ms) else {
            return Err(Error::MalformedReceipt(
                "the entry is not a logged reading".into(),
            ));
        };
        if entry.status == Status::Rejected {
            return Err(Error::MalformedReceipt("the entry is a rejection".into()));
        }
        let note = self
            .checkpoint
            .as_deref()
            .ok_or_else(|| Error::MalformedReceipt("no checkpoint".into()))?;
        let cp = Checkpoint::open(note, log_key)?;
        let proof = entry
            .proof
            .as_deref()
            .ok_or_else(|| Error::MalformedReceipt("the entry has no proof".into()))?
            .iter()
            .map(|p| {
                let b = B64
                    .decode(p)
                    .map_err(|e| Error::MalformedReceipt(format!("proof hash: {e}")))?;
                let arr: [u8; 32] = b
                    .try_into()
                    .map_err(|_| Error::MalformedReceipt("proof hash is not 32 bytes".into()))?;
                // Canonical base64 only: re-encoding must give the same text.
                if B64.encode(arr) != *p {
                    return Err(Error::MalformedReceipt("non-canonical base64".into()));
                }
                Ok(Hash(arr))
            })
            .collect::<Result<Vec<_>>>()?;
        let leaf = leaf::hash(log_time_ms, envelope);
        merkle::verify_inclusion(&leaf, index, cp.size, &proof, &cp.root)?;
        Ok(cp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::LogSigner;
    use crate::did::SecretKey;
    use crate::merkle::MemoryTree;

    #[test]
    fn a_receipt_proves_the_exact_bytes_and_nothing_else() {
        let key = SecretKey::from_seed(&[9; 32]).unwrap();
        let signer = LogSigner::new("vitaltrail.test/log/0", key).unwrap();
        let vkey = signer.public_key();
        let mut tree = MemoryTree::new();
        let msgs: Vec<Vec<u8>> = (0..7u8).map(|i| vec![i; 40 + i as usize]).collect();
        for (i, m) in msgs.iter().enumerate() {
            tree.append(&leaf::encode(1000 + i as u64, m));
        }
        let cp = Checkpoint {
            origin: "vitaltrail.test/log/0".into(),
            size: tree.size(),
            root: tree.root(),
            extensions: vec![],
        };
        let note = cp.sign(&signer).unwrap();
        let entries: Vec<Entry> = [2u64, 5]
            .iter()
            .map(|&i| {
                let proof = tree.prove_inclusion(7, i).unwrap();
                Entry::in_log(i, &msgs[i as usize], i, 1000 + i, &proof, i == 5)
            })
            .chain([Entry::rejected(Some(9), b"junk", "clock_skew")])
            .collect();
        let r = Receipt::new("did:key:zTest", Some(note), entries);
        let r = Receipt::from_json(&r.to_json()).unwrap();
        assert_eq!(r.entries[1].status, Status::Duplicate);
        for e in &r.entries[..2] {
            let i = e.index.unwrap() as usize;
            assert_eq!(r.verify_entry(e, &msgs[i], &vkey).unwrap().size, 7);
            // Other bytes, a flipped byte: no.
            assert!(r.verify_entry(e, &msgs[(i + 1) % 7], &vkey).is_err());
            for pos in 0..msgs[i].len() {
                let mut m = msgs[i].clone();
                m[pos] ^= 1;
                assert!(r.verify_entry(e, &m, &vkey).is_err());
            }
            // Another index or log time: no.
            let mut moved = e.clone();
            moved.index = Some(e.index.unwrap() + 1);
            assert!(r.verify_entry(&moved, &msgs[i], &vkey).is_err());
            let mut retimed = e.clone();
            retimed.log_time_ms = Some(e.log_time_ms.unwrap() + 1);
            assert!(r.verify_entry(&retimed, &msgs[i], &vkey).is_err());
        }
        assert!(r.verify_entry(&r.entries[2], b"junk", &vkey).is_err());
        assert_eq!(r.entries[2].message_hash, message_hash(b"junk"));
        // Another log's key: no.
        let other = LogSigner::new(
            "vitaltrail.test/log/0",
            SecretKey::from_seed(&[8; 32]).unwrap(),
        )
        .unwrap()
        .public_key();
        assert!(r.verify_entry(&r.entries[0], &msgs[2], &other).is_err());
        // Flip any byte of the JSON: it no longer parses, or an entry that
        // still verifies says exactly what the original said (index, log
        // time, tree). What the proofs do not cover (did, status, hashes,
        // reasons) are hints, as docs/receipts.md says.
        let json = r.to_json();
        for pos in 0..json.len() {
            let mut j = json.clone();
            j[pos] ^= 0x01;
            let Ok(t) = Receipt::from_json(&j) else {
                continue;
            };
            for k in 0..2 {
                let (Some(e), o) = (t.entries.get(k), &r.entries[k]) else {
                    continue;
                };
                let m = &msgs[o.index.unwrap() as usize];
                if let Ok(cp) = t.verify_entry(e, m, &vkey) {
                    assert_eq!(
                        (e.index, e.log_time_ms),
                        (o.index, o.log_time_ms),
                        "flip at {pos}"
                    );
                    assert_eq!((cp.size, cp.root), (7, tree.root()), "flip at {pos}");
                }
            }
        }
        // Large receipts are split below the broker's limit, in order, each
        // with the checkpoint.
        let many: Vec<Entry> = (0..3000u64)
            .map(|i| {
                let proof = vec![Hash([7; 32]); 20];
                Entry::in_log(i, &i.to_be_bytes(), i, 1, &proof, false)
            })
            .collect();
        let parts = Receipt::split("did:key:zT", r.checkpoint.clone(), many.clone());
        assert!(parts.len() > 1);
        assert!(
            parts
                .iter()
                .all(|p| p.to_json().len() <= MAX_PUBLISHED_RECEIPT_BYTES)
        );
        assert!(parts.iter().all(|p| p.checkpoint == r.checkpoint));
        let back: Vec<Entry> = parts.into_iter().flat_map(|p| p.entries).collect();
        assert_eq!(back, many);
        // A 1-leaf tree's proof is empty, and still present.
        let one = Receipt::new(
            "did:key:zT",
            None,
            vec![Entry::in_log(1, b"m", 0, 1, &[], false)],
        );
        assert!(
            String::from_utf8(one.to_json())
                .unwrap()
                .contains("\"proof\":[]")
        );
        let rej = Receipt::new("did:key:zT", None, vec![Entry::rejected(None, b"m", "x")]);
        assert!(!String::from_utf8(rej.to_json()).unwrap().contains("proof"));
        assert!(Receipt::from_json(b"{").is_err());
        assert!(Receipt::from_json(&vec![b' '; MAX_RECEIPT_BYTES + 1]).is_err());
    }
}
