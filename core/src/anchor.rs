//! Anchoring formats (see `docs/anchoring.md`): the partition head, the
//! epoch record that the epoch log commits to, and the signed ledger
//! record. No I/O: the anchor stage stores them, verifiers check them.
//!
//! * A **partition head** is one partition log's verified checkpoint as an
//!   epoch holds it: `(origin, size, root)`.
//! * An **epoch record** commits to the heads of every partition at the
//!   epoch's close, as the root of an RFC 9162 BLAKE3 tree over the heads
//!   in origin order. It is one leaf of the **epoch log**, a Merkle log of
//!   the same structure as a partition log, whose checkpoints the anchor
//!   key signs.
//! * A **ledger record** is the local ledger's signed, hash-chained word
//!   that the epoch log had a given root at a given size.

use crate::checkpoint::{LogPublicKey, LogSigner};
use crate::error::{Error, Result};
use crate::merkle::{self, Hash, MemoryTree};

/// First byte of an encoded partition head.
pub const HEAD_TAG: u8 = 0x50;
/// First byte of an encoded epoch record.
pub const EPOCH_TAG: u8 = 0x45;
/// Length of an encoded epoch record.
pub const EPOCH_RECORD_LEN: usize = 1 + 8 + 8 + 4 + 32;
/// Most partitions one epoch holds.
pub const MAX_EPOCH_PARTITIONS: usize = 1024;
/// Longest partition origin, in bytes.
pub const MAX_ORIGIN_BYTES: usize = 255;
/// The first line of every ledger record's body.
pub const LEDGER_HEADER: &str = "vitaltrail/ledger/v1";
/// Largest ledger record note we parse.
pub const MAX_LEDGER_RECORD_BYTES: usize = 4096;

fn bad(detail: impl Into<String>) -> Error {
    Error::MalformedAnchor(detail.into())
}

/// One partition log's checkpoint as an epoch holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionHead {
    /// The partition log's origin (its key name).
    pub origin: String,
    /// Its tree size.
    pub size: u64,
    /// Its root at that size.
    pub root: Hash,
}

impl PartitionHead {
    /// `0x50 ‖ u8(len(origin)) ‖ origin ‖ u64be(size) ‖ root`.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let o = self.origin.as_bytes();
        if o.is_empty() || o.len() > MAX_ORIGIN_BYTES {
            return Err(bad(format!("origin of {} bytes", o.len())));
        }
        let mut b = Vec::with_capacity(2 + o.len() + 40);
        b.push(HEAD_TAG);
        b.push(o.len() as u8);
        b.extend_from_slice(o);
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.root.0);
        Ok(b)
    }

    /// Parse [`PartitionHead::encode`]'s output, exactly.
    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() < 2 || b[0] != HEAD_TAG {
            return Err(bad("not a partition head"));
        }
        let n = b[1] as usize;
        if n == 0 || b.len() != 2 + n + 40 {
            return Err(bad("partition head of the wrong length"));
        }
        let origin = std::str::from_utf8(&b[2..2 + n])
            .map_err(|_| bad("origin is not UTF-8"))?
            .to_owned();
        let size = u64::from_be_bytes(b[2 + n..10 + n].try_into().expect("8 bytes"));
        let root = Hash(b[10 + n..].try_into().expect("32 bytes"));
        Ok(PartitionHead { origin, size, root })
    }
}

/// The heads of an epoch, in the order the tree takes them: sorted by
/// origin (bytewise), each origin once.
pub fn check_heads(heads: &[PartitionHead]) -> Result<()> {
    if heads.is_empty() || heads.len() > MAX_EPOCH_PARTITIONS {
        return Err(bad(format!("{} partitions in an epoch", heads.len())));
    }
    for w in heads.windows(2) {
        if w[0].origin.as_bytes() >= w[1].origin.as_bytes() {
            return Err(bad("partition heads out of order or repeated"));
        }
    }
    Ok(())
}

/// The tree over an epoch's heads (leaf `i` = head `i` encoded).
pub fn heads_tree(heads: &[PartitionHead]) -> Result<MemoryTree> {
    check_heads(heads)?;
    let mut t = MemoryTree::with_capacity(heads.len());
    for h in heads {
        t.append(&h.encode()?);
    }
    Ok(t)
}

/// One leaf of the epoch log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochRecord {
    /// The epoch's number: its leaf index in the epoch log.
    pub epoch: u64,
    /// When it closed, Unix ms.
    pub time_ms: u64,
    /// How many partition heads it holds.
    pub partitions: u32,
    /// The root of the tree over its heads.
    pub heads_root: Hash,
}

impl EpochRecord {
    /// The record for `heads` (sorted, see [`check_heads`]).
    pub fn new(epoch: u64, time_ms: u64, heads: &[PartitionHead]) -> Result<Self> {
        let t = heads_tree(heads)?;
        Ok(EpochRecord {
            epoch,
            time_ms,
            partitions: heads.len() as u32,
            heads_root: t.root(),
        })
    }

    /// `0x45 ‖ u64be(epoch) ‖ u64be(time_ms) ‖ u32be(partitions) ‖ heads_root`.
    pub fn encode(&self) -> [u8; EPOCH_RECORD_LEN] {
        let mut b = [0u8; EPOCH_RECORD_LEN];
        b[0] = EPOCH_TAG;
        b[1..9].copy_from_slice(&self.epoch.to_be_bytes());
        b[9..17].copy_from_slice(&self.time_ms.to_be_bytes());
        b[17..21].copy_from_slice(&self.partitions.to_be_bytes());
        b[21..].copy_from_slice(&self.heads_root.0);
        b
    }

    /// Parse [`EpochRecord::encode`]'s output, exactly.
    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != EPOCH_RECORD_LEN || b[0] != EPOCH_TAG {
            return Err(bad("not an epoch record"));
        }
        let partitions = u32::from_be_bytes(b[17..21].try_into().expect("4 bytes"));
        if partitions == 0 || partitions as usize > MAX_EPOCH_PARTITIONS {
            return Err(bad(format!("{partitions} partitions in an epoch")));
        }
        Ok(EpochRecord {
            epoch: u64::from_be_bytes(b[1..9].try_into().expect("8 bytes")),
            time_ms: u64::from_be_bytes(b[9..17].try_into().expect("8 bytes")),
            partitions,
            heads_root: Hash(b[21..].try_into().expect("32 bytes")),
        })
    }

    /// Its leaf hash in the epoch log: `BLAKE3(0x00 ‖ record)`.
    pub fn leaf_hash(&self) -> Hash {
        merkle::leaf_hash(&self.encode())
    }

    /// Check that `head` is leaf `index` of this epoch's heads tree.
    pub fn verify_head(&self, head: &PartitionHead, index: u64, proof: &[Hash]) -> Result<()> {
        merkle::verify_inclusion(
            &merkle::leaf_hash(&head.encode()?),
            index,
            u64::from(self.partitions),
            proof,
            &self.heads_root,
        )
    }
}

/// A ledger record: the anchor's signed word that the epoch log `stream`
/// had `root` at `size`, chained to the record before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRecord {
    /// Its 0-based position in the ledger.
    pub seq: u64,
    /// BLAKE3 of the previous record's complete note (32 zero bytes for
    /// the first record).
    pub prev: Hash,
    /// The epoch log's origin (the anchor key's name).
    pub stream: String,
    /// The epoch log's size.
    pub size: u64,
    /// Its root at that size.
    pub root: Hash,
    /// When it was written, Unix ms.
    pub time_ms: u64,
}

/// Whether `name` may be an epoch log's origin as a ledger record's stream:
/// non-empty, at most [`MAX_ORIGIN_BYTES`], no control characters, and not
/// the reserved [`LEDGER_HEADER`] (`docs/anchoring.md` §5).
pub fn is_valid_stream(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_ORIGIN_BYTES
        && !name.chars().any(char::is_control)
        && name != LEDGER_HEADER
}

impl LedgerRecord {
    /// The note body: seven lines, each ending in a newline.
    pub fn body(&self) -> Result<String> {
        if !is_valid_stream(&self.stream) {
            return Err(bad("bad stream name"));
        }
        Ok(format!(
            "{LEDGER_HEADER}\n{}\n{}\n{}\n{}\n{}\n{}\n",
            self.seq,
            self.prev.to_base64(),
            self.stream,
            self.size,
            self.root.to_base64(),
            self.time_ms
        ))
    }

    /// The signed note. The signer must be the anchor key, named `stream`.
    pub fn sign(&self, signer: &LogSigner) -> Result<String> {
        if signer.name() != self.stream {
            return Err(bad(format!(
                "anchor key is named {:?} but the stream is {:?}",
                signer.name(),
                self.stream
            )));
        }
        crate::checkpoint::sign_note(&self.body()?, signer)
    }

    /// Parse a ledger record note and check its signature by `key`, whose
    /// name must be the record's stream.
    pub fn open(note: &str, key: &LogPublicKey) -> Result<Self> {
        if note.len() > MAX_LEDGER_RECORD_BYTES {
            return Err(bad("ledger record too large"));
        }
        let text = crate::checkpoint::open_note(note, key).map_err(|e| match e {
            Error::CheckpointSignature => Error::AnchorSignature,
            e => e,
        })?;
        let r = Self::parse_body(&text)?;
        if r.stream != key.name() {
            return Err(Error::AnchorSignature);
        }
        Ok(r)
    }

    /// Parse a ledger record note **without** checking its signature.
    pub fn parse_unverified(note: &str) -> Result<Self> {
        if note.len() > MAX_LEDGER_RECORD_BYTES {
            return Err(bad("ledger record too large"));
        }
        let parsed =
            signed_note::Note::from_bytes(note.as_bytes()).map_err(|e| bad(e.to_string()))?;
        let text = std::str::from_utf8(parsed.text()).map_err(|_| bad("not UTF-8"))?;
        Self::parse_body(text)
    }

    fn parse_body(text: &str) -> Result<Self> {
        let Some(body) = text.strip_suffix('\n') else {
            return Err(bad("ledger record body does not end in a newline"));
        };
        let lines: Vec<&str> = body.split('\n').collect();
        let [header, seq, prev, stream, size, root, time] = lines[..] else {
            return Err(bad("a ledger record body has 7 lines"));
        };
        if header != LEDGER_HEADER {
            return Err(bad("not a vitaltrail/ledger/v1 record"));
        }
        let num = |s: &str, what: &str| -> Result<u64> {
            if s.is_empty()
                || !s.bytes().all(|c| c.is_ascii_digit())
                || (s.len() > 1 && s.starts_with('0'))
            {
                return Err(bad(format!("{what} is not a decimal integer")));
            }
            s.parse()
                .map_err(|_| bad(format!("{what} is out of range")))
        };
        let hash = |s: &str, what: &str| {
            Hash::from_base64(s).ok_or_else(|| bad(format!("{what} is not a base64 hash")))
        };
        let r = LedgerRecord {
            seq: num(seq, "seq")?,
            prev: hash(prev, "prev")?,
            stream: stream.to_owned(),
            size: num(size, "size")?,
            root: hash(root, "root")?,
            time_ms: num(time, "time")?,
        };
        // Round trip: one text per record.
        if r.body()? != text {
            return Err(bad("ledger record body is not canonical"));
        }
        Ok(r)
    }

    /// The hash that the next record's `prev` holds: BLAKE3 of this
    /// record's complete note.
    pub fn chain_hash(note: &str) -> Hash {
        Hash(*blake3::hash(note.as_bytes()).as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::did::SecretKey;

    fn heads(n: usize) -> Vec<PartitionHead> {
        (0..n)
            .map(|i| PartitionHead {
                origin: format!("vitaltrail.test/log/{i:02}"),
                size: i as u64 * 7 + 1,
                root: merkle::leaf_hash(&[i as u8]),
            })
            .collect()
    }

    #[test]
    fn every_head_proves_into_its_epoch_and_nothing_else_does() {
        for n in 1..12 {
            let hs = heads(n);
            let rec = EpochRecord::new(5, 1_700_000_000_000, &hs).unwrap();
            assert_eq!(EpochRecord::decode(&rec.encode()).unwrap(), rec);
            let t = heads_tree(&hs).unwrap();
            for (i, h) in hs.iter().enumerate() {
                let p = t.prove_inclusion(n as u64, i as u64).unwrap();
                rec.verify_head(h, i as u64, &p).unwrap();
                let mut other = h.clone();
                other.size += 1;
                assert!(rec.verify_head(&other, i as u64, &p).is_err());
                if n > 1 {
                    assert!(rec.verify_head(h, ((i + 1) % n) as u64, &p).is_err());
                }
            }
        }
    }

    #[test]
    fn heads_must_be_sorted_unique_and_bounded() {
        let mut hs = heads(3);
        hs.swap(0, 1);
        assert!(EpochRecord::new(0, 0, &hs).is_err());
        let mut hs = heads(2);
        hs[1].origin = hs[0].origin.clone();
        assert!(EpochRecord::new(0, 0, &hs).is_err());
        assert!(EpochRecord::new(0, 0, &[]).is_err());
        let h = &heads(1)[0];
        assert_eq!(PartitionHead::decode(&h.encode().unwrap()).unwrap(), *h);
        let long = PartitionHead {
            origin: "x".repeat(256),
            ..h.clone()
        };
        assert!(long.encode().is_err());
    }

    #[test]
    fn decoders_take_exactly_what_encoders_give() {
        let rec = EpochRecord::new(1, 2, &heads(3)).unwrap().encode();
        for len in 0..rec.len() {
            assert!(EpochRecord::decode(&rec[..len]).is_err());
        }
        let mut longer = rec.to_vec();
        longer.push(0);
        assert!(EpochRecord::decode(&longer).is_err());
        let h = heads(1)[0].encode().unwrap();
        for len in 0..h.len() {
            assert!(PartitionHead::decode(&h[..len]).is_err());
        }
    }

    fn signer() -> LogSigner {
        LogSigner::new(
            "vitaltrail.test/epochs",
            SecretKey::from_seed(&[9; 32]).unwrap(),
        )
        .unwrap()
    }

    fn record() -> LedgerRecord {
        LedgerRecord {
            seq: 3,
            prev: merkle::leaf_hash(b"prev"),
            stream: "vitaltrail.test/epochs".into(),
            size: 41,
            root: merkle::leaf_hash(b"root"),
            time_ms: 1_700_000_000_123,
        }
    }

    #[test]
    fn ledger_records_round_trip_and_any_flipped_byte_fails() {
        let s = signer();
        let note = record().sign(&s).unwrap();
        assert_eq!(
            LedgerRecord::open(&note, &s.public_key()).unwrap(),
            record()
        );
        let b = note.as_bytes();
        for i in 0..b.len() {
            let mut t = b.to_vec();
            t[i] ^= 0x01;
            if let Ok(t) = String::from_utf8(t) {
                assert!(
                    LedgerRecord::open(&t, &s.public_key()).is_err(),
                    "flip at {i} still opens: {t:?}"
                );
            }
        }
    }

    #[test]
    fn a_ledger_record_is_no_checkpoint_and_a_checkpoint_no_ledger_record() {
        let s = signer();
        let note = record().sign(&s).unwrap();
        assert!(crate::Checkpoint::open(&note, &s.public_key()).is_err());
        let cp = crate::Checkpoint {
            origin: "vitaltrail.test/epochs".into(),
            size: 41,
            root: record().root,
            extensions: vec![],
        }
        .sign(&s)
        .unwrap();
        assert!(LedgerRecord::open(&cp, &s.public_key()).is_err());
        // Another key, or one named otherwise, does not open it.
        let other = LogSigner::new(
            "vitaltrail.test/epochs",
            SecretKey::from_seed(&[10; 32]).unwrap(),
        )
        .unwrap();
        assert_eq!(
            LedgerRecord::open(&note, &other.public_key()),
            Err(Error::AnchorSignature)
        );
        let renamed = LogSigner::new("other", SecretKey::from_seed(&[9; 32]).unwrap()).unwrap();
        assert!(LedgerRecord::open(&note, &renamed.public_key()).is_err());
        assert!(record().sign(&renamed).is_err());
    }
}
