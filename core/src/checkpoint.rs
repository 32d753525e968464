//! Signed tree heads in the C2SP `tlog-checkpoint` text form, signed as a
//! C2SP `signed-note` with Ed25519 (see `docs/checkpoint.md`).
//!
//! The note machinery (signature lines, key IDs, verifier keys) is cloudflare's
//! `signed_note` crate and the body parser is `tlog_tiles::Checkpoint`, so our
//! checkpoints verify with any C2SP note verifier. Checkpoint signatures are
//! standard RFC 8032 note signatures checked by `signed_note`'s verifier (as
//! Go's `sumdb/note` does); the single/batch rule set of [`crate::sig`] is for
//! device readings, which are batch-verified. The one difference from
//! C2SP tlog-checkpoint is the tree hash: BLAKE3 with RFC 9162 domain
//! separation instead of SHA-256.

use std::fmt;

use signed_note::{Note, StandardVerifier, VerifierList};

use crate::did::SecretKey;
use crate::error::{Error, Result};
use crate::merkle::Hash;

/// Largest checkpoint note we parse.
pub const MAX_CHECKPOINT_BYTES: usize = 8 * 1024;

/// A tree head: the log's origin, its size and its root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's unique name, e.g. `vitaltrail.example/log/0`.
    pub origin: String,
    /// Number of leaves.
    pub size: u64,
    /// The BLAKE3 RFC 9162 root.
    pub root: Hash,
    /// Extension lines (each without its newline), opaque to verifiers.
    pub extensions: Vec<String>,
}

impl Checkpoint {
    /// The checkpoint body (the note text): origin, size, base64 root, then
    /// extension lines, each ending in a newline.
    pub fn body(&self) -> Result<String> {
        let mut ext = String::new();
        for e in &self.extensions {
            ext.push_str(e);
            ext.push('\n');
        }
        let cp = tlog_tiles::Checkpoint::new(
            &self.origin,
            self.size,
            tlog_tiles::Hash(self.root.0),
            &ext,
        )
        .map_err(|e| Error::MalformedCheckpoint(e.to_string()))?;
        if self.origin.contains('\n') {
            return Err(Error::MalformedCheckpoint(
                "origin contains a newline".into(),
            ));
        }
        String::from_utf8(cp.to_bytes()).map_err(|e| Error::MalformedCheckpoint(e.to_string()))
    }

    /// Sign the checkpoint, returning the complete note text.
    pub fn sign(&self, signer: &LogSigner) -> Result<String> {
        if signer.name != self.origin {
            return Err(Error::MalformedCheckpoint(format!(
                "log key is named {:?} but the checkpoint origin is {:?}",
                signer.name, self.origin
            )));
        }
        sign_note(&self.body()?, signer)
    }

    /// Parse a signed checkpoint note and verify it carries a valid signature
    /// by `log_key`. Unknown extra signatures (e.g. witnesses) are allowed.
    pub fn open(note: &str, log_key: &LogPublicKey) -> Result<Checkpoint> {
        let cp = Self::parse_unverified(note)?;
        open_note(note, log_key)?;
        if cp.origin != log_key.name {
            return Err(Error::CheckpointSignature);
        }
        Ok(cp)
    }

    /// Parse a checkpoint note **without** checking any signature.
    pub fn parse_unverified(note: &str) -> Result<Checkpoint> {
        if note.len() > MAX_CHECKPOINT_BYTES {
            return Err(Error::MalformedCheckpoint("note too large".into()));
        }
        let parsed = parse_note(note)?;
        let cp = tlog_tiles::Checkpoint::from_bytes(parsed.text())
            .map_err(|e| Error::MalformedCheckpoint(e.to_string()))?;
        Ok(Checkpoint {
            origin: cp.origin().to_owned(),
            size: cp.size(),
            root: Hash(cp.hash().0),
            extensions: cp.extension().lines().map(str::to_owned).collect(),
        })
    }
}

/// Parse a signed note under the rules of `docs/checkpoint.md` §2, which
/// are stricter than `signed_note`'s: no Unicode control character but
/// newline anywhere (it lets DEL and C1 through), and no empty line in the
/// text (split at the last `"\n\n"`, so splitting at the first empty
/// line instead gives the same text for every note we take).
fn parse_note(note: &str) -> Result<Note> {
    if let Some(c) = note.chars().find(|&c| c.is_control() && c != '\n') {
        return Err(Error::MalformedCheckpoint(format!(
            "control character U+{:04X} in the note",
            c as u32
        )));
    }
    let parsed =
        Note::from_bytes(note.as_bytes()).map_err(|e| Error::MalformedCheckpoint(e.to_string()))?;
    let text = parsed.text();
    if text.starts_with(b"\n") || text.windows(2).any(|w| w == b"\n\n") {
        return Err(Error::MalformedCheckpoint(
            "an empty line in the note text".into(),
        ));
    }
    Ok(parsed)
}

/// Sign `body` as a signed note with one signature, by `signer`.
pub(crate) fn sign_note(body: &str, signer: &LogSigner) -> Result<String> {
    let mut note =
        Note::new(body.as_bytes(), &[]).map_err(|e| Error::MalformedCheckpoint(e.to_string()))?;
    note.add_sigs(&[signer])
        .map_err(|e| Error::MalformedCheckpoint(e.to_string()))?;
    String::from_utf8(note.to_bytes()).map_err(|e| Error::MalformedCheckpoint(e.to_string()))
}

/// Check that `note` carries a valid signature by `key`; its text.
pub(crate) fn open_note(note: &str, key: &LogPublicKey) -> Result<String> {
    let parsed = parse_note(note)?;
    let verifiers = VerifierList::new(vec![Box::new(key.verifier()?)]);
    parsed
        .verify(&verifiers)
        .map_err(|_| Error::CheckpointSignature)?;
    String::from_utf8(parsed.text().to_vec()).map_err(|e| Error::MalformedCheckpoint(e.to_string()))
}

/// True when `name` can name a log key (non-empty, no spaces or `+`).
pub fn is_valid_log_name(name: &str) -> bool {
    signed_note::is_key_name_valid(name)
}

/// A log's signing key: an ed25519 key and the log's name (its origin).
pub struct LogSigner {
    name: String,
    key: SecretKey,
    id: u32,
}

impl LogSigner {
    /// A signer for the log named `name`.
    pub fn new(name: &str, key: SecretKey) -> Result<Self> {
        if !is_valid_log_name(name) {
            return Err(Error::InvalidKey(format!(
                "{name:?} is not a valid note key name (non-empty, no spaces or '+')"
            )));
        }
        let id = signed_note::key_id(name, &encoded_public(&key));
        Ok(LogSigner {
            name: name.to_owned(),
            key,
            id,
        })
    }

    /// The matching public key.
    pub fn public_key(&self) -> LogPublicKey {
        LogPublicKey {
            name: self.name.clone(),
            vkey: signed_note::new_ed25519_verifier_key(&self.name, &self.key.verifying_key()),
        }
    }

    /// The log's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn encoded_public(key: &SecretKey) -> Vec<u8> {
    let mut v = vec![0x01]; // signed-note algorithm byte for Ed25519
    v.extend_from_slice(key.verifying_key().as_bytes());
    v
}

impl signed_note::Signer for LogSigner {
    fn name(&self) -> &str {
        &self.name
    }
    fn key_id(&self) -> u32 {
        self.id
    }
    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, ed25519_dalek::SignatureError> {
        Ok(self.key.sign(msg).to_vec())
    }
}

impl fmt::Debug for LogSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogSigner")
            .field("name", &self.name)
            .field("key", &self.key)
            .finish()
    }
}

/// A log's public key as a C2SP signed-note verifier key:
/// `<name>+<8 hex key ID>+<base64(0x01 ‖ ed25519 public key)>`.
#[derive(Clone, PartialEq, Eq)]
pub struct LogPublicKey {
    name: String,
    vkey: String,
}

impl LogPublicKey {
    /// Parse a verifier key string.
    pub fn parse(vkey: &str) -> Result<Self> {
        let vkey = vkey.trim();
        // `signed_note` takes upper-case hex too; the format says lower.
        let id = vkey.split('+').nth(1).unwrap_or_default();
        if id.len() != 8 || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(Error::InvalidKey(
                "log verifier key: the key ID is not 8 lowercase hex digits".into(),
            ));
        }
        StandardVerifier::new(vkey)
            .map_err(|e| Error::InvalidKey(format!("log verifier key: {e}")))?;
        let name = vkey.split('+').next().unwrap_or_default().to_owned();
        Ok(LogPublicKey {
            name,
            vkey: vkey.to_owned(),
        })
    }

    /// The log's name (checkpoint origin).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The verifier key string.
    pub fn as_str(&self) -> &str {
        &self.vkey
    }

    fn verifier(&self) -> Result<StandardVerifier> {
        StandardVerifier::new(&self.vkey).map_err(|e| Error::InvalidKey(e.to_string()))
    }
}

impl fmt::Display for LogPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.vkey)
    }
}

impl fmt::Debug for LogPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LogPublicKey({})", self.vkey)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> LogSigner {
        LogSigner::new(
            "vitaltrail.test/log/0",
            SecretKey::from_seed(&[11; 32]).unwrap(),
        )
        .unwrap()
    }

    fn cp(size: u64) -> Checkpoint {
        Checkpoint {
            origin: "vitaltrail.test/log/0".into(),
            size,
            root: crate::merkle::leaf_hash(&size.to_be_bytes()),
            extensions: vec![],
        }
    }

    #[test]
    fn sign_open_roundtrip_and_text_form() {
        let s = signer();
        let note = cp(42).sign(&s).unwrap();
        let lines: Vec<&str> = note.lines().collect();
        assert_eq!(lines[0], "vitaltrail.test/log/0");
        assert_eq!(lines[1], "42");
        assert_eq!(lines[2], cp(42).root.to_base64());
        assert_eq!(lines[3], "");
        assert!(lines[4].starts_with("\u{2014} vitaltrail.test/log/0 "));
        assert!(note.ends_with('\n'));
        let back = Checkpoint::open(&note, &s.public_key()).unwrap();
        assert_eq!(back, cp(42));
        let pk = LogPublicKey::parse(s.public_key().as_str()).unwrap();
        assert_eq!(pk, s.public_key());

        let mut with_ext = cp(7);
        with_ext.extensions = vec!["time 1700000000000".into()];
        let note = with_ext.sign(&s).unwrap();
        assert_eq!(Checkpoint::open(&note, &s.public_key()).unwrap(), with_ext);
    }

    #[test]
    fn any_flipped_byte_fails() {
        let s = signer();
        let note = cp(1000).sign(&s).unwrap();
        let bytes = note.as_bytes();
        for i in 0..bytes.len() {
            let mut t = bytes.to_vec();
            t[i] ^= 0x01;
            if let Ok(t) = String::from_utf8(t) {
                assert!(
                    Checkpoint::open(&t, &s.public_key()).is_err(),
                    "flip at {i} still verifies: {t:?}"
                );
            }
        }
    }

    #[test]
    fn wrong_key_or_origin_fails() {
        let s = signer();
        let note = cp(3).sign(&s).unwrap();
        let other = LogSigner::new(
            "vitaltrail.test/log/0",
            SecretKey::from_seed(&[12; 32]).unwrap(),
        )
        .unwrap();
        assert_eq!(
            Checkpoint::open(&note, &other.public_key()),
            Err(Error::CheckpointSignature)
        );
        let renamed = LogSigner::new("other", SecretKey::from_seed(&[11; 32]).unwrap()).unwrap();
        assert!(Checkpoint::open(&note, &renamed.public_key()).is_err());
        assert!(cp(3).sign(&renamed).is_err());
        for junk in ["", "\n", "a\n1\n", "x\n\n\u{2014} x AAAA\n"] {
            assert!(Checkpoint::open(junk, &s.public_key()).is_err());
        }
    }
    /// The settled readings of `docs/checkpoint.md`: DEL and C1 controls
    /// are refused (signed_note took them), an empty line in the text is
    /// refused (so the first-empty-line and last-"\n\n" splits agree), a
    /// verifier key's ID must be lower-case hex (signed_note took upper),
    /// and base64 must be canonical (no set unused bits).
    #[test]
    fn the_strict_readings_of_the_format() {
        let s = signer();
        for bad in ["\u{7f}", "\u{85}", "\u{9f}"] {
            let body = format!(
                "vitaltrail.test/log/0\n3\n{}\nx{bad}\n",
                cp(3).root.to_base64()
            );
            let note = sign_note(&body, &s).unwrap();
            assert!(Checkpoint::open(&note, &s.public_key()).is_err(), "{bad:?}");
        }
        let body = format!(
            "vitaltrail.test/log/0\n3\n{}\n\nx\n",
            cp(3).root.to_base64()
        );
        let note = sign_note(&body, &s).unwrap();
        assert!(Checkpoint::open(&note, &s.public_key()).is_err());
        let vkey = s.public_key().as_str().to_owned();
        let mut parts: Vec<String> = vkey.splitn(3, '+').map(str::to_owned).collect();
        parts[1] = parts[1].to_uppercase();
        if parts[1].bytes().any(|b| b.is_ascii_alphabetic()) {
            assert!(LogPublicKey::parse(&parts.join("+")).is_err());
        }
        // A signature line whose last base64 character has a set unused
        // bit decodes to the same bytes: refused, not a second spelling.
        let note = cp(3).sign(&s).unwrap();
        let sig_at = note.rfind(' ').unwrap() + 1;
        let b64 = note[sig_at..].trim_end().to_owned();
        let last = b64.trim_end_matches('=').chars().last().unwrap();
        let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let v = alphabet.find(last).unwrap();
        let sibling = alphabet.as_bytes()[v ^ 1] as char;
        let mut t = note.clone();
        let pos = sig_at + b64.trim_end_matches('=').len() - 1;
        t.replace_range(pos..pos + 1, &sibling.to_string());
        assert!(Checkpoint::open(&t, &s.public_key()).is_err());
        let h = cp(3).root.to_base64();
        let l = h.trim_end_matches('=').chars().last().unwrap();
        let mut h2 = h.clone();
        let p = h.trim_end_matches('=').len() - 1;
        h2.replace_range(
            p..p + 1,
            &(alphabet.as_bytes()[alphabet.find(l).unwrap() ^ 1] as char).to_string(),
        );
        assert!(crate::merkle::Hash::from_base64(&h2).is_none());
    }
}
