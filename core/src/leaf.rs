//! The log leaf: what the Merkle log commits to for one reading.
//!
//! ```text
//! leaf = 0x01                      version
//!      ‖ u64 big-endian             log time: when the log accepted the reading, Unix ms
//!      ‖ envelope bytes             the COSE_Sign1 exactly as received
//! leaf hash = BLAKE3(0x00 ‖ leaf)
//! ```
//!
//! The envelope is the last field, so no length prefix is needed. Because the
//! envelope carries the device's 64-byte Ed25519 signature, which nobody can
//! predict without the device's secret key, a leaf hash does not let anyone
//! brute-force the low-entropy values (heart rate, SpO2…) inside it.

use crate::error::{Error, Result};

/// Current leaf version byte.
pub const LEAF_VERSION: u8 = 1;
const HEADER: usize = 1 + 8;

/// Encode a leaf.
pub fn encode(log_time_ms: u64, envelope: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER + envelope.len());
    v.push(LEAF_VERSION);
    v.extend_from_slice(&log_time_ms.to_be_bytes());
    v.extend_from_slice(envelope);
    v
}

/// A decoded leaf, borrowing the envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf<'a> {
    /// When the log accepted the reading, Unix ms.
    pub log_time_ms: u64,
    /// The envelope bytes as received.
    pub envelope: &'a [u8],
}

/// Decode a leaf.
pub fn decode(leaf: &[u8]) -> Result<Leaf<'_>> {
    if leaf.len() < HEADER || leaf[0] != LEAF_VERSION {
        return Err(Error::InvalidField {
            field: "leaf",
            reason: "not a version-1 leaf".into(),
        });
    }
    let mut t = [0u8; 8];
    t.copy_from_slice(&leaf[1..HEADER]);
    Ok(Leaf {
        log_time_ms: u64::from_be_bytes(t),
        envelope: &leaf[HEADER..],
    })
}

/// The leaf hash of a reading accepted at `log_time_ms`.
pub fn hash(log_time_ms: u64, envelope: &[u8]) -> crate::merkle::Hash {
    let mut h = blake3::Hasher::new();
    h.update(&[crate::merkle::LEAF_PREFIX, LEAF_VERSION]);
    h.update(&log_time_ms.to_be_bytes());
    h.update(envelope);
    crate::merkle::Hash(*h.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_hash_agree() {
        let l = encode(1234, b"abc");
        assert_eq!(
            decode(&l).unwrap(),
            Leaf {
                log_time_ms: 1234,
                envelope: b"abc"
            }
        );
        assert_eq!(hash(1234, b"abc"), crate::merkle::leaf_hash(&l));
        assert_ne!(hash(1235, b"abc"), hash(1234, b"abc"));
        assert!(decode(&[1, 2]).is_err());
        assert!(decode(&encode(1, b"")[..]).is_ok());
        let mut v2 = encode(1, b"x");
        v2[0] = 2;
        assert!(decode(&v2).is_err());
    }
}
