//! The one Ed25519 verification rule set for device readings, used by the
//! single and the batch path alike. (Checkpoint note signatures are checked
//! by the standard signed-note verifier; see `crate::checkpoint`.)
//!
//! Single and batch verification are known to disagree on edge cases when the
//! single check is cofactorless (`[s]B = R + [k]A`) and the batch check mixes
//! in random coefficients (ed25519-dalek's `verify_batch` does exactly that:
//! a signature whose `R` has a torsion component passes its batch with
//! probability 1/8 and never passes alone). We use **one** rule, so that an
//! envelope's verdict never depends on which path checked it:
//!
//! 1. `A` (the public key) is a canonical encoding (`y < p`, no negative
//!    zero) of a point that is not of small order. Checked when the
//!    `did:key` is parsed.
//! 2. `R` is a canonical encoding (a byte test; no curve arithmetic).
//! 3. `s < ℓ` (no scalar malleability).
//! 4. The **cofactored** equation `[8][s]B = [8]R + [8][k]A` holds, where
//!    `k = SHA-512(R ‖ A ‖ M) mod ℓ`.
//!
//! Rule 4 (with 3) is ZIP 215, which `ed25519-zebra` implements for both
//! single and batch verification, designed so that the two agree on every
//! input; rules 1–2 are our stricter encoding checks, applied identically
//! before either path. Honest RFC 8032 signers always satisfy all four.
//! A signature that passes only the cofactored equation (an `R` with a
//! torsion component) is accepted by both paths alike.
//!
//! Batch coefficients come from a ChaCha20 stream seeded with BLAKE3 over
//! every input of the batch (Fiat–Shamir, as ed25519-dalek and merlin do), so
//! verification is deterministic and needs no injected randomness.
//! Signing uses ed25519-dalek (RFC 8032).

use ed25519_dalek::{Signature, VerifyingKey};
use ed25519_zebra as zebra;
use rand_core::SeedableRng as _;

use crate::error::{Error, Result};

/// `p = 2^255 - 19`, little-endian.
const P_BYTES: [u8; 32] = {
    let mut p = [0xffu8; 32];
    p[0] = 0xed;
    p[31] = 0x7f;
    p
};

/// True if `bytes` is the canonical encoding of an Edwards y coordinate with
/// its sign bit: `y < p`, and the sign bit is clear when `x = 0` (`y = ±1`).
pub fn is_canonical_point_encoding(bytes: &[u8; 32]) -> bool {
    let mut y = *bytes;
    let sign = y[31] >> 7;
    y[31] &= 0x7f;
    // y < p, comparing little-endian byte strings from the top.
    let mut below_p = false;
    for i in (0..32).rev() {
        if y[i] != P_BYTES[i] {
            below_p = y[i] < P_BYTES[i];
            break;
        }
    }
    if !below_p {
        return false;
    }
    if sign == 1 {
        let mut one = [0u8; 32];
        one[0] = 1;
        let mut minus_one = P_BYTES;
        minus_one[0] = 0xec;
        if y == one || y == minus_one {
            return false;
        }
    }
    true
}

/// Rule 1: a public key the rule set can accept.
pub fn check_public_key(key: &VerifyingKey) -> Result<()> {
    if !is_canonical_point_encoding(key.as_bytes()) {
        return Err(Error::InvalidDid("non-canonical public key encoding"));
    }
    if key.is_weak() {
        return Err(Error::InvalidDid("small-order public key"));
    }
    Ok(())
}

/// Rules 2–3 on the signature bytes (cheap; no curve arithmetic).
pub fn check_signature_encoding(sig: &[u8; 64]) -> Result<Signature> {
    let r: &[u8; 32] = sig[..32].try_into().map_err(|_| Error::BadSignature)?;
    if !is_canonical_point_encoding(r) {
        return Err(Error::BadSignature);
    }
    // s < ℓ (rule 3) is enforced by ed25519-zebra in both the single and the
    // batch path (ZIP 215 requires a canonical s); tested below.
    Ok(Signature::from_bytes(sig))
}

/// Verify one signature under the rule set (rules 2–4; rule 1 is the
/// caller's, via [`crate::DeviceId`]).
pub fn verify(key: &VerifyingKey, msg: &[u8], sig: &[u8; 64]) -> Result<()> {
    let s = check_signature_encoding(sig)?;
    let vk = zebra::VerificationKey::try_from(key.to_bytes()).map_err(|_| Error::BadSignature)?;
    vk.verify(&s, msg).map_err(|_| Error::BadSignature)
}

/// Verify many signatures under the rule set. Returns one verdict per input,
/// equal to what [`verify`] returns for it; a failing batch is split in
/// halves until the bad signatures are isolated.
pub fn verify_many(items: &[(&VerifyingKey, &[u8], &[u8; 64])]) -> Vec<Result<()>> {
    let mut out: Vec<Result<()>> = items
        .iter()
        .map(|(_, _, sig)| check_signature_encoding(sig).map(|_| ()))
        .collect();
    let live: Vec<usize> = (0..items.len()).filter(|&i| out[i].is_ok()).collect();
    let mut bad = Vec::new();
    bisect(items, &live, &mut bad);
    for b in bad {
        out[b] = Err(Error::BadSignature);
    }
    out
}

fn batch_ok(items: &[(&VerifyingKey, &[u8], &[u8; 64])], which: &[usize]) -> bool {
    let mut seed = blake3::Hasher::new_derive_key("vitaltrail 2025 ed25519 batch coefficients");
    let mut v = zebra::batch::Verifier::new();
    for &i in which {
        let (k, m, s) = items[i];
        seed.update(k.as_bytes());
        seed.update(s);
        seed.update(&(m.len() as u64).to_le_bytes());
        seed.update(m);
        v.queue((
            zebra::VerificationKeyBytes::from(k.to_bytes()),
            Signature::from_bytes(s),
            m,
        ));
    }
    let rng = rand_chacha::ChaCha20Rng::from_seed(*seed.finalize().as_bytes());
    v.verify(rng).is_ok()
}

fn bisect(items: &[(&VerifyingKey, &[u8], &[u8; 64])], which: &[usize], bad: &mut Vec<usize>) {
    if which.is_empty() || batch_ok(items, which) {
        return;
    }
    if which.len() == 1 {
        bad.push(which[0]);
        return;
    }
    let mid = which.len() / 2;
    bisect(items, &which[..mid], bad);
    bisect(items, &which[mid..], bad);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::did::SecretKey;
    use curve25519_dalek::constants::{ED25519_BASEPOINT_POINT, EIGHT_TORSION};
    use curve25519_dalek::scalar::Scalar;
    use ed25519_dalek::Verifier as _;

    fn sha512(parts: &[&[u8]]) -> [u8; 64] {
        use sha2::Digest as _;
        let mut h = sha2::Sha512::new();
        for p in parts {
            h.update(p);
        }
        h.finalize().into()
    }

    fn vectors() -> Vec<(&'static str, &'static str, &'static str, &'static str)> {
        // RFC 8032 §7.1: (secret, public, message, signature).
        vec![
            (
                "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
                "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
                "",
                "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
            ),
            (
                "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
                "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
                "72",
                "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
            ),
            (
                "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
                "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
                "af82",
                "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
            ),
        ]
    }

    #[test]
    fn rfc8032_vectors() {
        for (sk, pk, msg, sig) in vectors() {
            let seed: [u8; 32] = hex::decode(sk).unwrap().try_into().unwrap();
            let key = SecretKey::from_seed(&seed).unwrap();
            assert_eq!(hex::encode(key.verifying_key().as_bytes()), pk);
            let msg = hex::decode(msg).unwrap();
            let got = key.sign(&msg);
            assert_eq!(hex::encode(got), sig);
            let sig: [u8; 64] = hex::decode(sig).unwrap().try_into().unwrap();
            verify(&key.verifying_key(), &msg, &sig).unwrap();
            let vk = key.verifying_key();
            assert!(verify_many(&[(&vk, msg.as_slice(), &sig)])[0].is_ok());
            let mut bad = sig;
            bad[10] ^= 1;
            assert!(verify(&key.verifying_key(), &msg, &bad).is_err());
        }
    }

    #[test]
    fn canonical_encoding_rule() {
        let mut p = P_BYTES;
        assert!(!is_canonical_point_encoding(&p));
        p[0] = 0xec; // p - 1
        assert!(is_canonical_point_encoding(&p));
        p[31] |= 0x80; // -0 with y = p - 1
        assert!(!is_canonical_point_encoding(&p));
        let mut one = [0u8; 32];
        one[0] = 1;
        assert!(is_canonical_point_encoding(&one));
        one[31] = 0x80;
        assert!(!is_canonical_point_encoding(&one));
        assert!(!is_canonical_point_encoding(&[0xff; 32]));
        let mut y = [0xff; 32];
        y[31] = 0x7f;
        y[0] = 0xee; // p + 1
        assert!(!is_canonical_point_encoding(&y));
    }

    /// Build a signature whose R has a torsion component: valid under the
    /// cofactored equation, invalid under the cofactorless one.
    fn mixed_order_signature(key_seed: [u8; 32], msg: &[u8]) -> (VerifyingKey, [u8; 64]) {
        let sk = ed25519_dalek::SigningKey::from_bytes(&key_seed);
        let a = sk.verifying_key();
        let r_scalar = Scalar::from_bytes_mod_order([42u8; 32]);
        let r_point = ED25519_BASEPOINT_POINT * r_scalar + EIGHT_TORSION[1];
        let r_bytes = r_point.compress().to_bytes();
        let k = Scalar::from_bytes_mod_order_wide(&sha512(&[&r_bytes, a.as_bytes(), msg]));
        let a_scalar = sk.to_scalar();
        let s = r_scalar + k * a_scalar;
        let mut sig = [0u8; 64];
        sig[..32].copy_from_slice(&r_bytes);
        sig[32..].copy_from_slice(s.as_bytes());
        (a, sig)
    }

    #[test]
    fn mixed_order_r_single_equals_batch() {
        let msg = b"edge case";
        let (a, sig) = mixed_order_signature([9u8; 32], msg);
        // Cofactorless verification (ed25519-dalek's `verify`) rejects it...
        assert!(a.verify(msg, &Signature::from_bytes(&sig)).is_err());
        // ...and dalek's own batch verifier accepts it for some batches
        // and not others: the disagreement this module exists to avoid.
        // ...our rule (cofactored) accepts it, on both paths alike.
        let single = verify(&a, msg, &sig).is_ok();
        let batch = verify_many(&[(&a, msg.as_slice(), &sig)])[0].is_ok();
        assert!(single);
        assert_eq!(single, batch);
        // In a batch with honest signatures too.
        let honest = SecretKey::from_seed(&[3u8; 32]).unwrap();
        let hsig = honest.sign(msg);
        let hk = honest.verifying_key();
        let v = verify_many(&[(&hk, msg.as_slice(), &hsig), (&a, msg.as_slice(), &sig)]);
        assert!(v.iter().all(|r| r.is_ok()));
    }

    #[test]
    fn small_order_r_and_noncanonical_inputs() {
        let key = SecretKey::from_seed(&[5u8; 32]).unwrap();
        let vk = key.verifying_key();
        let msg = b"m";
        let good = key.sign(msg);
        // Non-canonical R: replace R with an encoding >= p.
        let mut bad_r = good;
        bad_r[..32].copy_from_slice(&[0xff; 32]);
        // s >= ℓ: add ℓ to s (still 32 bytes since s < ℓ < 2^253).
        let mut big_s = good;
        let s = Scalar::from_canonical_bytes(good[32..].try_into().unwrap()).unwrap();
        let l_plus_s = add_l(s.as_bytes());
        big_s[32..].copy_from_slice(&l_plus_s);
        // Small-order R (identity) with s = 0: accepted by cofactored
        // verification only if [8][k]A = 0, which cannot hold for a
        // non-small-order A, so both paths reject.
        let mut ident = [0u8; 64];
        ident[0] = 1;
        for sig in [bad_r, big_s, ident] {
            let single = verify(&vk, msg, &sig).is_ok();
            let batch = verify_many(&[(&vk, msg.as_slice(), &sig)])[0].is_ok();
            assert!(!single);
            assert_eq!(single, batch);
        }
        // Small-order public keys never become a DeviceId.
        for t in EIGHT_TORSION.iter() {
            let bytes = t.compress().to_bytes();
            if let Ok(k) = VerifyingKey::from_bytes(&bytes) {
                assert!(check_public_key(&k).is_err());
            }
        }
    }

    fn add_l(s: &[u8; 32]) -> [u8; 32] {
        // ℓ = 2^252 + 27742317777372353535851937790883648493, little-endian.
        const L: [u8; 32] = [
            0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9,
            0xde, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        let mut out = [0u8; 32];
        let mut carry = 0u16;
        for i in 0..32 {
            let v = u16::from(s[i]) + u16::from(L[i]) + carry;
            out[i] = v as u8;
            carry = v >> 8;
        }
        out
    }

    #[test]
    fn batch_isolates_bad_signatures() {
        let keys: Vec<SecretKey> = (0..40u8)
            .map(|i| SecretKey::from_seed(&[i; 32]).unwrap())
            .collect();
        let msgs: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 10]).collect();
        let mut sigs: Vec<[u8; 64]> = keys.iter().zip(&msgs).map(|(k, m)| k.sign(m)).collect();
        let bad_at = [0usize, 7, 8, 39];
        for &i in &bad_at {
            sigs[i][40] ^= 0x10;
        }
        let vks: Vec<VerifyingKey> = keys.iter().map(|k| k.verifying_key()).collect();
        let items: Vec<(&VerifyingKey, &[u8], &[u8; 64])> = (0..40)
            .map(|i| (&vks[i], msgs[i].as_slice(), &sigs[i]))
            .collect();
        let v = verify_many(&items);
        for i in 0..40 {
            assert_eq!(v[i].is_err(), bad_at.contains(&i), "item {i}");
            assert_eq!(v[i].is_ok(), verify(&vks[i], &msgs[i], &sigs[i]).is_ok());
        }
    }
}
