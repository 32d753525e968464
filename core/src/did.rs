//! Device identity: ed25519 keys and their W3C `did:key` identifiers.
//!
//! A device's ID is `did:key:z<base58btc(0xed 0x01 ‖ public key)>`: the
//! multicodec `ed25519-pub` prefix (varint 0xed, encoded as the two bytes
//! `0xed 0x01`), multibase `z` (base58btc, Bitcoin alphabet). Parsing accepts
//! only keys that the signature rules of [`crate::sig`] can ever accept:
//! canonically encoded points that are not of small order.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::sig;

const PREFIX: &str = "did:key:z";
const MULTICODEC_ED25519_PUB: [u8; 2] = [0xed, 0x01];
/// A `did:key` for ed25519 is 56 characters; anything much longer is junk.
const MAX_DID_LEN: usize = 128;

/// A device identity: a `did:key` naming an ed25519 public key.
///
/// Equality, ordering and hashing follow the DID string.
#[derive(Clone)]
pub struct DeviceId {
    did: String,
    key: VerifyingKey,
}

impl DeviceId {
    /// The DID of a verifying key. Fails for keys that could never verify
    /// (small order, non-canonical encoding).
    pub fn from_verifying_key(key: VerifyingKey) -> Result<Self> {
        sig::check_public_key(&key)?;
        let mut bytes = Vec::with_capacity(34);
        bytes.extend_from_slice(&MULTICODEC_ED25519_PUB);
        bytes.extend_from_slice(key.as_bytes());
        let did = format!("{PREFIX}{}", bs58::encode(bytes).into_string());
        Ok(DeviceId { did, key })
    }

    /// Parse a `did:key` string.
    pub fn parse(s: &str) -> Result<Self> {
        if s.len() > MAX_DID_LEN {
            return Err(Error::InvalidDid("too long"));
        }
        let rest = s.strip_prefix(PREFIX).ok_or(Error::InvalidDid(
            "must start with did:key:z (base58btc multibase)",
        ))?;
        let bytes = bs58::decode(rest)
            .into_vec()
            .map_err(|_| Error::InvalidDid("not base58btc"))?;
        let key_bytes = bytes
            .strip_prefix(&MULTICODEC_ED25519_PUB)
            .ok_or(Error::InvalidDid("multicodec is not ed25519-pub (0xed01)"))?;
        let key_bytes: [u8; 32] = key_bytes
            .try_into()
            .map_err(|_| Error::InvalidDid("ed25519 public key must be 32 bytes"))?;
        let key = VerifyingKey::from_bytes(&key_bytes)
            .map_err(|_| Error::InvalidDid("not a point on the curve"))?;
        sig::check_public_key(&key)?;
        // base58 has one encoding per byte string, but leading '1's encode
        // leading zero bytes; reject any string that is not the canonical one.
        if bs58::encode(&bytes).into_string() != rest {
            return Err(Error::InvalidDid("not in canonical form"));
        }
        Ok(DeviceId {
            did: s.to_owned(),
            key,
        })
    }

    /// The DID string.
    pub fn as_str(&self) -> &str {
        &self.did
    }

    /// The ed25519 public key.
    pub fn verifying_key(&self) -> &VerifyingKey {
        &self.key
    }
}

/// A bounded cache of parsed DIDs, for hot paths that see the same devices
/// again and again: parsing a `did:key` decodes base58 and decompresses a
/// curve point (about 13 µs), a lookup here costs a hash.
///
/// Only DIDs that parsed are cached, so every answer equals
/// [`DeviceId::parse`]'s. When full, the cache is emptied and refilled; put
/// only DIDs from a bounded set in it (registered devices, or readings an
/// upstream tier already verified), never arbitrary input.
#[derive(Debug)]
pub struct DidCache {
    map: std::collections::HashMap<String, DeviceId>,
    capacity: usize,
}

impl DidCache {
    /// A cache holding at most `capacity` DIDs.
    pub fn new(capacity: usize) -> Self {
        DidCache {
            map: std::collections::HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// [`DeviceId::parse`], remembered.
    pub fn resolve(&mut self, s: &str) -> Result<DeviceId> {
        if let Some(d) = self.map.get(s) {
            return Ok(d.clone());
        }
        let d = DeviceId::parse(s)?;
        if self.map.len() >= self.capacity {
            self.map.clear();
        }
        self.map.insert(s.to_owned(), d.clone());
        Ok(d)
    }

    /// DIDs cached now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True if nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl Default for DidCache {
    /// Room for 100,000 devices (about 45 MB when full: a decompressed key
    /// and its DID string, about 450 bytes each).
    fn default() -> Self {
        DidCache::new(100_000)
    }
}

impl PartialEq for DeviceId {
    fn eq(&self, other: &Self) -> bool {
        self.did == other.did
    }
}
impl Eq for DeviceId {}
impl std::hash::Hash for DeviceId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.did.hash(state)
    }
}
impl PartialOrd for DeviceId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for DeviceId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.did.cmp(&other.did)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.did)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.did)
    }
}

impl FromStr for DeviceId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        DeviceId::parse(s)
    }
}

impl serde::Serialize for DeviceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.did)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DeviceId::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// An ed25519 secret key (a device's or a log's).
///
/// The secret never appears in `Debug` output and is zeroized on drop
/// (ed25519-dalek's `zeroize` feature).
pub struct SecretKey {
    key: SigningKey,
    id: DeviceId,
}

impl SecretKey {
    /// A fresh key from a cryptographic RNG.
    pub fn generate<R: rand_core::CryptoRngCore + ?Sized>(rng: &mut R) -> Self {
        loop {
            let key = SigningKey::generate(rng);
            // A random key is of small order with probability ~2^-250; loop
            // rather than unwrap so the invariant holds without a panic path.
            if let Ok(id) = DeviceId::from_verifying_key(key.verifying_key()) {
                return SecretKey { key, id };
            }
        }
    }

    /// From the 32-byte seed of RFC 8032.
    pub fn from_seed(seed: &[u8; 32]) -> Result<Self> {
        let key = SigningKey::from_bytes(seed);
        let id = DeviceId::from_verifying_key(key.verifying_key())?;
        Ok(SecretKey { key, id })
    }

    /// Parse a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`), the
    /// format `openssl genpkey -algorithm ed25519` writes.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self> {
        let key = SigningKey::from_pkcs8_pem(pem)
            .map_err(|e| Error::InvalidKey(format!("not a PKCS#8 ed25519 PEM key: {e}")))?;
        let id = DeviceId::from_verifying_key(key.verifying_key())?;
        Ok(SecretKey { key, id })
    }

    /// Encode as PKCS#8 PEM, version 1 (RFC 8410 §7: the private key only,
    /// what `openssl genpkey -algorithm ed25519` writes and every TLS stack
    /// reads; OpenSSL 3.0 refuses ed25519-dalek's version 2 encoding). The
    /// returned string is zeroized on drop.
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>> {
        let bytes = ed25519_dalek::pkcs8::KeypairBytes {
            secret_key: self.key.to_bytes(),
            public_key: None,
        };
        bytes
            .to_pkcs8_pem(Default::default())
            .map_err(|e| Error::InvalidKey(format!("cannot encode key: {e}")))
    }

    /// The key's DID.
    pub fn did(&self) -> &DeviceId {
        &self.id
    }

    /// The public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Sign `msg` (pure Ed25519, RFC 8032).
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.key.sign(msg).to_bytes()
    }
}

impl Clone for SecretKey {
    fn clone(&self) -> Self {
        // Each copy zeroizes its own secret on drop.
        SecretKey {
            key: self.key.clone(),
            id: self.id.clone(),
        }
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey")
            .field("did", &self.id.did)
            .field("secret", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn did_roundtrip_and_known_value() {
        // RFC 8032 test 1 key; the DID was computed independently by the
        // pycose fixture script (core/tests/fixtures/cose).
        let seed = hex::decode("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
            .unwrap();
        let k = SecretKey::from_seed(&seed.try_into().unwrap()).unwrap();
        assert_eq!(
            k.did().as_str(),
            "did:key:z6MktwupdmLXVVqTzCw4i46r4uGyosGXRnR3XjN4Zq7oMMsw"
        );
        let parsed = DeviceId::parse(k.did().as_str()).unwrap();
        assert_eq!(&parsed, k.did());
        assert_eq!(parsed.verifying_key(), &k.verifying_key());
    }

    #[test]
    fn malformed_dids_are_rejected() {
        let good = "did:key:z6MktwupdmLXVVqTzCw4i46r4uGyosGXRnR3XjN4Zq7oMMsw";
        for bad in [
            "",
            "did:key:",
            "did:web:example.com",
            "did:key:6MktwupdmLXVVqTzCw4i46r4uGyosGXRnR3XjN4Zq7oMMsw",
            "did:key:z6MktwupdmLXVVqTzCw4i46r4uGyosGXRnR3XjN4Zq7oMMs",
            "did:key:z6MktwupdmLXVVqTzCw4i46r4uGyosGXRnR3XjN4Zq7oMMsw1",
            "did:key:z0OIl",
            // secp256k1 multicodec (0xe7 0x01)
            "did:key:zQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBme",
        ] {
            assert!(DeviceId::parse(bad).is_err(), "{bad:?} parsed");
        }
        assert!(DeviceId::parse(&format!("{good}{}", "x".repeat(200))).is_err());
        // Small-order public key (the identity point, y = 1).
        let mut ident = vec![0xed, 0x01, 1];
        ident.extend([0u8; 31]);
        let did = format!("did:key:z{}", bs58::encode(ident).into_string());
        assert_eq!(
            DeviceId::parse(&did),
            Err(Error::InvalidDid("small-order public key"))
        );
    }

    #[test]
    fn did_cache_answers_as_parse_and_stays_bounded() {
        let mut cache = DidCache::new(3);
        let keys: Vec<SecretKey> = (1..=5u8)
            .map(|i| SecretKey::from_seed(&[i; 32]).unwrap())
            .collect();
        for _ in 0..2 {
            for k in &keys {
                let s = k.did().as_str();
                let got = cache.resolve(s).unwrap();
                assert_eq!(&got, k.did());
                assert_eq!(got.verifying_key(), &k.verifying_key());
                assert!(cache.len() <= 3);
            }
        }
        let bad = "did:key:z6MktwupdmLXVVqTzCw4i46r4uGyosGXRnR3XjN4Zq7oMMs";
        assert_eq!(cache.resolve(bad), DeviceId::parse(bad));
        assert!(
            cache.resolve(bad).is_err(),
            "failures are not cached as successes"
        );
    }

    #[test]
    fn secret_never_in_debug() {
        let seed = [7u8; 32];
        let k = SecretKey::from_seed(&seed).unwrap();
        let dbg = format!("{k:?} {:#?}", k);
        let pem = k.to_pkcs8_pem().unwrap();
        assert!(dbg.contains("<redacted>"));
        assert!(!dbg.contains(&hex::encode(seed)));
        assert!(!dbg.contains("0707070707"));
        let b64_body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(!dbg.contains(&b64_body));
        let back = SecretKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(back.did(), k.did());
    }
}
