//! Authenticating records on the bus between ingest and the attestor.
//!
//! Anyone who can produce to Kafka could otherwise append to the log. Every
//! record ingest produces to `vitals.verified` carries a MAC (header
//! `vt-mac`) under a key shared by the ingest and attestor processes and
//! nobody else ([`BusKey`], `keys/bus.key`). The attestor rejects a record
//! whose MAC is missing or wrong (`unauthenticated_record`) before it looks
//! at the envelope. Specified in `docs/kafka-topics.md`.
//!
//! ```text
//! mac = BLAKE3-keyed(bus key, "vitaltrail/bus-record/v1" ‖ u32be(len(key)) ‖ key ‖ u64be(received_ms) ‖ payload)
//! ```

use subtle::ConstantTimeEq as _;

/// The bus key (secret): 32 bytes.
#[derive(Clone)]
pub struct BusKey([u8; 32]);

impl std::fmt::Debug for BusKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BusKey(<redacted>)")
    }
}

impl Drop for BusKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

const DOMAIN: &[u8] = b"vitaltrail/bus-record/v1";

impl BusKey {
    /// A new random key.
    pub fn generate<R: rand_core::RngCore + rand_core::CryptoRng>(rng: &mut R) -> Self {
        let mut k = [0u8; 32];
        rng.fill_bytes(&mut k);
        BusKey(k)
    }

    /// The key as 64 lowercase hex digits (to store; secret).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parse 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(s: &str) -> Option<Self> {
        let s = s.trim();
        if s.len() != 64 || !s.is_ascii() {
            return None;
        }
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(BusKey(k))
    }

    /// The MAC of one record.
    pub fn mac(&self, key: &str, received_ms: u64, payload: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(DOMAIN);
        h.update(&(key.len() as u32).to_be_bytes());
        h.update(key.as_bytes());
        h.update(&received_ms.to_be_bytes());
        h.update(payload);
        *h.finalize().as_bytes()
    }

    /// Whether `mac` is the MAC of this record (constant time).
    pub fn check(&self, key: &str, received_ms: u64, payload: &[u8], mac: &[u8]) -> bool {
        mac.len() == 32 && bool::from(self.mac(key, received_ms, payload).ct_eq(mac))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_change_breaks_the_mac() {
        use rand_core::SeedableRng as _;
        let k = BusKey::generate(&mut rand_chacha::ChaCha20Rng::from_seed([3; 32]));
        let k2 = BusKey::from_hex(&k.to_hex()).unwrap();
        let m = k.mac("did:key:zA", 7, b"payload");
        assert!(k2.check("did:key:zA", 7, b"payload", &m));
        assert!(!k.check("did:key:zB", 7, b"payload", &m));
        assert!(!k.check("did:key:zA", 8, b"payload", &m));
        assert!(!k.check("did:key:zA", 7, b"payloaD", &m));
        assert!(!k.check("did:key:zA", 7, b"payload", &m[..31]));
        // Field boundaries are unambiguous.
        assert_ne!(k.mac("ab", 1, b"c"), k.mac("a", 1, b"bc"));
        let other = BusKey::generate(&mut rand_chacha::ChaCha20Rng::from_seed([4; 32]));
        assert!(!other.check("did:key:zA", 7, b"payload", &m));
        for pos in 0..32 {
            let mut bad = m;
            bad[pos] ^= 1;
            assert!(!k.check("did:key:zA", 7, b"payload", &bad));
        }
        assert!(!format!("{k:?}").contains(&k.to_hex()));
        assert!(BusKey::from_hex("zz").is_none());
    }
}
