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
    /// Revoked: it may no longer connect or subscribe.
    #[serde(default)]
    pub revoked: bool,
}

/// `viewers.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Viewers {
    /// By name.
    pub viewers: BTreeMap<String, Viewer>,
}

/// A viewer's name: 1-64 of letters, digits, `-`, `_` and `.`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
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

    /// Add (or replace the wards of) `name`.
    pub fn add(&mut self, name: &str, wards: &[String], now_ms: u64) -> Result<()> {
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
                revoked: false,
            },
        );
        Ok(())
    }

    /// The wards of an active viewer.
    pub fn wards(&self, name: &str) -> Option<&[String]> {
        self.viewers
            .get(name)
            .filter(|v| !v.revoked)
            .map(|v| v.wards.as_slice())
    }
}

/// `viewers.json`, re-read when its modification time changes.
#[derive(Debug)]
pub struct ViewersFile {
    path: PathBuf,
    cached: Mutex<(Option<SystemTime>, Viewers)>,
}

impl ViewersFile {
    /// Follow `path`.
    pub fn new(path: PathBuf) -> Self {
        ViewersFile {
            path,
            cached: Mutex::new((None, Viewers::default())),
        }
    }

    /// The wards of active viewer `name`, from the file as it is now (an
    /// unreadable file: none, so nobody is let in on a broken list).
    pub fn wards(&self, name: &str) -> Option<Vec<String>> {
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let mut c = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if mtime.is_none() || c.0 != mtime {
            match Viewers::load(&self.path) {
                Ok(v) => *c = (mtime, v),
                Err(e) => {
                    tracing::warn!(error = %e, "viewers file unreadable: no viewer is let in");
                    *c = (None, Viewers::default());
                }
            }
        }
        c.1.wards(name).map(<[String]>::to_vec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viewers_are_named_safely_and_revocation_takes_their_wards() {
        let mut v = Viewers::default();
        v.add("nurse-3", &["ward-3".into(), "ward-3".into()], 1)
            .unwrap();
        assert_eq!(v.wards("nurse-3"), Some(&["ward-3".to_owned()][..]));
        assert!(v.add("nurse 3", &["ward-3".into()], 1).is_err());
        assert!(v.add("viewer:x", &["ward-3".into()], 1).is_err());
        assert!(v.add("n", &[], 1).is_err());
        assert!(v.add("n", &["ward/3".into()], 1).is_err());
        assert!(v.add("n", &["#".into()], 1).is_err());
        let dir = tempfile::tempdir().unwrap();
        let f = viewers_file(dir.path());
        v.save(&f).unwrap();
        let file = ViewersFile::new(f.clone());
        assert_eq!(file.wards("nurse-3"), Some(vec!["ward-3".to_owned()]));
        assert_eq!(file.wards("nurse-4"), None);
        v.viewers.get_mut("nurse-3").unwrap().revoked = true;
        // A later modification time, whatever the file system's precision.
        std::thread::sleep(std::time::Duration::from_millis(20));
        v.save(&f).unwrap();
        let t = SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(t)
            .unwrap();
        assert_eq!(file.wards("nurse-3"), None, "revoked");
    }
}
