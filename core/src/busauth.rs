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
//!
//! The attestor announces every leaf it logged on `vitals.logged`, for the
//! alert engine, under a second key derived from the bus key
//! ([`LoggedKey`]): the engine holds only that one, so it can check an
//! announcement but can neither make one for `vitals.verified` nor reach
//! the log.
//!
//! ```text
//! logged key = BLAKE3-derive_key("vitaltrail 2026-12 vitals.logged announcement key v1", bus key)
//! mac        = BLAKE3-keyed(logged key, "vitaltrail/logged-record/v1" ‖ u32be(len(key)) ‖ key
//!                           ‖ u32be(log partition) ‖ u64be(leaf index) ‖ leaf)
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

/// The BLAKE3 key-derivation context of [`LoggedKey`].
pub const LOGGED_KEY_CONTEXT: &str = "vitaltrail 2026-12 vitals.logged announcement key v1";
const LOGGED_DOMAIN: &[u8] = b"vitaltrail/logged-record/v1";

impl BusKey {
    /// The key of `vitals.logged` announcements, derived from this one.
    pub fn logged_key(&self) -> LoggedKey {
        LoggedKey(blake3::derive_key(LOGGED_KEY_CONTEXT, &self.0))
    }
}

/// The key of the MAC on `vitals.logged` announcements (secret): derived
/// from the bus key, so the attestor needs nothing new, and held by the
/// alert engine instead of the bus key.
#[derive(Clone)]
pub struct LoggedKey([u8; 32]);

impl std::fmt::Debug for LoggedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoggedKey(<redacted>)")
    }
}

impl Drop for LoggedKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl LoggedKey {
    /// The key as 64 lowercase hex digits (to store; secret).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parse 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(s: &str) -> Option<Self> {
        BusKey::from_hex(s).map(|k| LoggedKey(k.0))
    }

    /// The MAC of one announcement: record key, the log partition and leaf
    /// index it names, and the leaf.
    pub fn mac(&self, key: &str, partition: u32, index: u64, leaf: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(LOGGED_DOMAIN);
        h.update(&(key.len() as u32).to_be_bytes());
        h.update(key.as_bytes());
        h.update(&partition.to_be_bytes());
        h.update(&index.to_be_bytes());
        h.update(leaf);
        *h.finalize().as_bytes()
    }

    /// Whether `mac` is the MAC of this announcement (constant time).
    pub fn check(&self, key: &str, partition: u32, index: u64, leaf: &[u8], mac: &[u8]) -> bool {
        mac.len() == 32 && bool::from(self.mac(key, partition, index, leaf).ct_eq(mac))
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

    #[test]
    fn logged_key_is_derived_apart_and_binds_every_field() {
        let bus = BusKey::from_hex(&"11".repeat(32)).unwrap();
        let k = bus.logged_key();
        // Known answer from an independent implementation (Python's
        // `blake3` package: `blake3.blake3(b"\x11" * 32,
        // derive_key_context=LOGGED_KEY_CONTEXT).hexdigest()`).
        assert_eq!(
            k.to_hex(),
            "3a64ee1bd0d5a82143f1200326941fdae90e676876d0827bf7e2167902cde2fd"
        );
        assert_ne!(k.to_hex(), bus.to_hex());
        let m = k.mac("patient-1", 3, 42, b"leaf");
        assert!(
            LoggedKey::from_hex(&k.to_hex())
                .unwrap()
                .check("patient-1", 3, 42, b"leaf", &m)
        );
        assert!(!k.check("patient-2", 3, 42, b"leaf", &m));
        assert!(!k.check("patient-1", 4, 42, b"leaf", &m));
        assert!(!k.check("patient-1", 3, 43, b"leaf", &m));
        assert!(!k.check("patient-1", 3, 42, b"leaF", &m));
        for pos in 0..32 {
            let mut bad = m;
            bad[pos] ^= 0x80;
            assert!(!k.check("patient-1", 3, 42, b"leaf", &bad));
        }
        // A bus-record MAC under the bus key is never a logged-record MAC.
        assert!(!k.check(
            "patient-1",
            3,
            42,
            b"leaf",
            &bus.mac("patient-1", 3, b"leaf")
        ));
        assert!(!format!("{k:?}").contains(&k.to_hex()));
    }
}
