//! Nurse stations ("viewers"): clients that may subscribe only to the
//! alert topics of their wards, `alerts/<ward>`, and publish nowhere.
//!
//! They are listed in `<data>/viewers.json` (`vitaltrail viewers add`),
//! which the gate re-reads when it changes, so a change of wards or a
//! revocation takes effect at the viewer's next subscription (and a revoked
//! viewer cannot connect again). A viewer proves who it is with a client
//! certificate of the device CA whose common name is `viewer:<name>` and
//! whose key is ECDSA P-256, never Ed25519 (an Ed25519 certificate names a
//! device, by its key).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The common-name prefix of a viewer's certificate, and of its MQTT
/// client ID and user name.
pub const PREFIX: &str = "viewer:";

/// The file, in a data directory.
pub fn viewers_file(data_dir: &Path) -> PathBuf {
    data_dir.join("viewers.json")
}

/// One viewer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Viewer {
    /// The wards whose `alerts/<ward>` it may subscribe to.
    pub wards: Vec<String>,
    /// When added (Unix ms).
    pub added_ms: u64,
    /// SHA-256 (hex) of the key (SubjectPublicKeyInfo) of the one
    /// certificate that may connect as it: the latest issued.
    pub key_sha256: String,
    /// Revoked: it may no longer connect or subscribe.
    #[serde(default)]
    pub revoked: bool,
    /// SHA-256 (hex) of its HTTP bearer token (`POST /alerts/<id>/ack`):
    /// the latest issued. Empty: none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token_sha256: String,
}

/// `viewers.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Viewers {
    /// By name.
    pub viewers: BTreeMap<String, Viewer>,
}

/// The fingerprint of a certificate's key: SHA-256 of its DER
/// SubjectPublicKeyInfo, lowercase hex.
pub fn key_fingerprint(spki_der: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(spki_der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The fingerprint of a bearer token: SHA-256 of its text, lowercase hex.
pub fn token_fingerprint(token: &str) -> String {
    key_fingerprint(token.as_bytes())
}

/// A viewer's name: 1-64 of letters, digits, `-`, `_` and `.`, not
/// starting with `.`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Viewers {
    /// Read `path` (absent: none).
    pub fn load(path: &Path) -> Result<Viewers> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Viewers::default()),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// Write `path` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("viewers.json");
        let bytes =
            serde_json::to_vec_pretty(self).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        vitaltrail_log::write_atomic(dir, name, &bytes)
            .map_err(|e| Error::InvalidArgument(e.to_string()))
    }

    /// Add `name` (or replace its wards, its certificate and its token):
    /// only the certificate whose key has fingerprint `key_sha256` may
    /// connect as it, and only the token with fingerprint `token_sha256`
    /// acknowledges as it.
    pub fn add(
        &mut self,
        name: &str,
        wards: &[String],
        key_sha256: &str,
        token_sha256: &str,
        now_ms: u64,
    ) -> Result<()> {
        if !valid_name(name) {
            return Err(Error::InvalidArgument(format!(
                "viewer name {name:?}: 1-64 letters, digits, '-', '_' or '.'"
            )));
        }
        if wards.is_empty() {
            return Err(Error::InvalidArgument(
                "a viewer needs at least one ward".into(),
            ));
        }
        if let Some(w) = wards
            .iter()
            .find(|w| !vitaltrail_core::topics::ward_topic_safe(w))
        {
            return Err(Error::InvalidArgument(format!(
                "ward {w:?} cannot be an MQTT topic level (1-64 bytes; no '/', '+', '#', leading '$', whitespace)"
            )));
        }
        let mut wards = wards.to_vec();
        wards.sort();
        wards.dedup();
        self.viewers.insert(
            name.to_owned(),
            Viewer {
                wards,
                added_ms: now_ms,
                key_sha256: key_sha256.to_owned(),
                revoked: false,
                token_sha256: token_sha256.to_owned(),
            },
        );
        Ok(())
    }

    /// The wards of an active viewer, whatever its certificate (the ACL
    /// of a broker that cannot pin keys).
    pub fn wards(&self, name: &str) -> Option<&[String]> {
        self.viewers
            .get(name)
            .filter(|v| !v.revoked)
            .map(|v| v.wards.as_slice())
    }

    /// The wards of an active viewer connecting with the certificate key
    /// `key_sha256`, which must be the one pinned.
    pub fn wards_for(&self, name: &str, key_sha256: &str) -> Option<&[String]> {
        self.viewers
            .get(name)
            .filter(|v| !v.revoked && !v.key_sha256.is_empty() && v.key_sha256 == key_sha256)
            .map(|v| v.wards.as_slice())
    }
}

impl Viewers {
    /// The active viewer whose token has fingerprint `token_sha256`: its
    /// name and wards.
    pub fn by_token(&self, token_sha256: &str) -> Option<(&str, &[String])> {
        use subtle::ConstantTimeEq as _;
        if token_sha256.is_empty() {
            return None;
        }
        self.viewers
            .iter()
            .find(|(_, v)| {
                !v.revoked
                    && v.token_sha256.len() == token_sha256.len()
                    && bool::from(v.token_sha256.as_bytes().ct_eq(token_sha256.as_bytes()))
            })
            .map(|(n, v)| (n.as_str(), v.wards.as_slice()))
    }
}

/// What identifies a version of the file: device, inode, length, mtime.
type Stamp = (u64, u64, u64, Option<SystemTime>);

/// `viewers.json`, re-read when it changes.
#[derive(Debug)]
pub struct ViewersFile {
    path: PathBuf,
    cached: Mutex<(Option<Stamp>, Viewers)>,
}

impl ViewersFile {
    /// Follow `path`.
    pub fn new(path: PathBuf) -> Self {
        ViewersFile {
            path,
            cached: Mutex::new((None, Viewers::default())),
        }
    }

    /// The wards of active viewer `name` with the certificate key
    /// `key_sha256`, from the file as it is now (an unreadable file: none,
    /// so nobody is let in on a broken list). The file is read again when
    /// its identity (device, inode: every save replaces it), length or
    /// modification time changes.
    pub fn wards(&self, name: &str, key_sha256: &str) -> Option<Vec<String>> {
        self.with(|v| v.wards_for(name, key_sha256).map(<[String]>::to_vec))
    }

    /// The active viewer holding bearer token `token` (its name and
    /// wards), from the file as it is now.
    pub fn by_token(&self, token: &str) -> Option<(String, Vec<String>)> {
        let fp = token_fingerprint(token);
        self.with(|v| v.by_token(&fp).map(|(n, w)| (n.to_owned(), w.to_vec())))
    }

    fn with<T>(&self, f: impl FnOnce(&Viewers) -> T) -> T {
        use std::os::unix::fs::MetadataExt as _;
        let stamp = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino(), m.len(), m.modified().ok()));
        let mut c = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if stamp.is_none() || c.0 != stamp {
            match Viewers::load(&self.path) {
                Ok(v) => *c = (stamp, v),
                Err(e) => {
                    if c.0.is_some() || c.1 != Viewers::default() {
                        tracing::warn!(error = %e, "viewers file unreadable: no viewer is let in");
                    }
                    *c = (None, Viewers::default());
                }
            }
        }
        f(&c.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viewers_are_named_safely_and_revocation_takes_their_wards() {
        let mut v = Viewers::default();
        v.add(
            "nurse-3",
            &["ward-3".into(), "ward-3".into()],
            "k1",
            &token_fingerprint("t1"),
            1,
        )
        .unwrap();
        assert_eq!(v.wards("nurse-3"), Some(&["ward-3".to_owned()][..]));
        assert!(v.add("nurse 3", &["ward-3".into()], "k", "", 1).is_err());
        assert!(v.add("viewer:x", &["ward-3".into()], "k", "", 1).is_err());
        assert!(v.add("..", &["ward-3".into()], "k", "", 1).is_err());
        assert!(v.add("n", &[], "k", "", 1).is_err());
        assert!(v.add("n", &["ward/3".into()], "k", "", 1).is_err());
        assert!(v.add("n", &["#".into()], "k", "", 1).is_err());
        let dir = tempfile::tempdir().unwrap();
        let f = viewers_file(dir.path());
        v.save(&f).unwrap();
        let file = ViewersFile::new(f.clone());
        assert_eq!(file.wards("nurse-3", "k1"), Some(vec!["ward-3".to_owned()]));
        assert_eq!(file.wards("nurse-3", "k0"), None, "not the pinned key");
        assert_eq!(file.wards("nurse-4", "k1"), None);
        assert_eq!(
            file.by_token("t1"),
            Some(("nurse-3".to_owned(), vec!["ward-3".to_owned()]))
        );
        assert_eq!(file.by_token("t2"), None, "not its token");
        assert_eq!(file.by_token(""), None);
        v.viewers.get_mut("nurse-3").unwrap().revoked = true;
        // Saved again at once (the same modification time, on a coarse
        // clock): a new file all the same.
        v.save(&f).unwrap();
        assert_eq!(file.wards("nurse-3", "k1"), None, "revoked");
        assert_eq!(file.by_token("t1"), None, "revoked");
    }
}
