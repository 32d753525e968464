//! The device registry: which DIDs may send readings, for which patient.
//!
//! In one process it is the file `devices.json` in the data directory,
//! edited by `vitaltrail devices add|list|revoke` (atomic replace under an
//! exclusive lock) and reloaded by ingest when it changes. A revoked device
//! is rejected from the next reload on (`revoked_device`).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use vitaltrail_core::DeviceId;

use crate::error::{Error, Result};

/// One registered device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntry {
    /// The device's `did:key`.
    pub did: String,
    /// The patient the device is attached to (a pseudonymous ID, never a name).
    pub patient: String,
    /// Ward or care team, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ward: Option<String>,
    /// When it was registered, Unix ms.
    pub added_ms: u64,
    /// When it was revoked, Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<u64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    devices: Vec<DeviceEntry>,
}

/// What the registry says about a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// Registered and not revoked.
    Active(&'a DeviceEntry),
    /// Registered, then revoked.
    Revoked(&'a DeviceEntry),
    /// Never registered.
    Unknown,
}

/// An in-memory snapshot of the registry.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    devices: BTreeMap<String, DeviceEntry>,
}

impl Registry {
    /// Look a device up.
    pub fn lookup(&self, did: &str) -> Lookup<'_> {
        match self.devices.get(did) {
            None => Lookup::Unknown,
            Some(e) if e.revoked_ms.is_some() => Lookup::Revoked(e),
            Some(e) => Lookup::Active(e),
        }
    }

    /// All devices, by DID.
    pub fn devices(&self) -> impl Iterator<Item = &DeviceEntry> {
        self.devices.values()
    }
}

/// The registry file.
#[derive(Debug, Clone)]
pub struct RegistryFile {
    path: PathBuf,
}

fn io(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Registry {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

impl RegistryFile {
    /// The registry at `path` (which need not exist yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        RegistryFile { path: path.into() }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read the current registry (empty if the file does not exist).
    pub fn load(&self) -> Result<Registry> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Registry::default()),
            Err(e) => return Err(io(&self.path, e)),
        };
        let f: FileFormat = serde_json::from_slice(&bytes).map_err(|e| io(&self.path, e))?;
        let mut devices = BTreeMap::new();
        for d in f.devices {
            DeviceId::parse(&d.did).map_err(|e| io(&self.path, format!("{}: {e}", d.did)))?;
            devices.insert(d.did.clone(), d);
        }
        Ok(Registry { devices })
    }

    fn edit(&self, f: impl FnOnce(&mut BTreeMap<String, DeviceEntry>) -> Result<()>) -> Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| io(&self.path, e))?;
        let lock_path = self.path.with_extension("lock");
        let lock = File::create(&lock_path).map_err(|e| io(&lock_path, e))?;
        lock.lock().map_err(|e| io(&lock_path, e))?;
        let mut reg = self.load()?;
        f(&mut reg.devices)?;
        let out = FileFormat {
            devices: reg.devices.into_values().collect(),
        };
        let bytes = serde_json::to_vec_pretty(&out).map_err(|e| io(&self.path, e))?;
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, &bytes)
            .and_then(|_| File::open(&tmp)?.sync_all())
            .and_then(|_| std::fs::rename(&tmp, &self.path))
            .and_then(|_| File::open(dir)?.sync_all())
            .map_err(|e| io(&self.path, e))
    }

    /// Register a device (or re-activate a revoked one with new details).
    pub fn add(
        &self,
        did: &DeviceId,
        patient: &str,
        ward: Option<&str>,
        now_ms: u64,
    ) -> Result<()> {
        if patient.trim().is_empty() {
            return Err(Error::InvalidArgument("patient must not be empty".into()));
        }
        self.edit(|m| {
            if let Some(e) = m.get(did.as_str())
                && e.revoked_ms.is_none()
            {
                return Err(Error::InvalidArgument(format!(
                    "{did} is already registered to patient {}",
                    e.patient
                )));
            }
            m.insert(
                did.to_string(),
                DeviceEntry {
                    did: did.to_string(),
                    patient: patient.to_owned(),
                    ward: ward.map(str::to_owned),
                    added_ms: now_ms,
                    revoked_ms: None,
                },
            );
            Ok(())
        })
    }

    /// Revoke a device.
    pub fn revoke(&self, did: &DeviceId, now_ms: u64) -> Result<()> {
        self.edit(|m| match m.get_mut(did.as_str()) {
            None => Err(Error::InvalidArgument(format!("{did} is not registered"))),
            Some(e) if e.revoked_ms.is_some() => {
                Err(Error::InvalidArgument(format!("{did} is already revoked")))
            }
            Some(e) => {
                e.revoked_ms = Some(now_ms);
                Ok(())
            }
        })
    }

    fn modified(&self) -> Option<SystemTime> {
        std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok()
    }
}

/// A registry shared with ingest, reloaded when the file changes.
#[derive(Debug, Clone)]
pub struct SharedRegistry {
    inner: Arc<RwLock<Registry>>,
}

impl SharedRegistry {
    /// A fixed registry (tests).
    pub fn fixed(reg: Registry) -> Self {
        SharedRegistry {
            inner: Arc::new(RwLock::new(reg)),
        }
    }

    /// Load `file` now and reload it every `every` while the task runs.
    pub fn watch(
        file: RegistryFile,
        every: Duration,
    ) -> Result<(Self, tokio::task::JoinHandle<()>)> {
        let shared = SharedRegistry::fixed(file.load()?);
        let s = shared.clone();
        let handle = tokio::spawn(async move {
            let mut seen = file.modified();
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let m = file.modified();
                if m != seen {
                    match file.load() {
                        Ok(r) => {
                            if let Ok(mut g) = s.inner.write() {
                                *g = r;
                            }
                            seen = m;
                            tracing::info!(path = %file.path().display(), "device registry reloaded");
                        }
                        Err(e) => tracing::warn!(error = %e, "device registry not reloaded"),
                    }
                }
            }
        });
        Ok((shared, handle))
    }

    /// Run `f` on the current snapshot.
    pub fn with<T>(&self, f: impl FnOnce(&Registry) -> T) -> T {
        match self.inner.read() {
            Ok(g) => f(&g),
            Err(p) => f(&p.into_inner()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vitaltrail_core::SecretKey;

    #[test]
    fn add_list_revoke() {
        let d = tempfile::tempdir().unwrap();
        let f = RegistryFile::new(d.path().join("devices.json"));
        let a = SecretKey::from_seed(&[1; 32]).unwrap();
        let b = SecretKey::from_seed(&[2; 32]).unwrap();
        f.add(a.did(), "patient-1", Some("ward-7"), 10).unwrap();
        f.add(b.did(), "patient-2", None, 11).unwrap();
        assert!(f.add(a.did(), "patient-9", None, 12).is_err());
        let r = f.load().unwrap();
        assert!(
            matches!(r.lookup(a.did().as_str()), Lookup::Active(e) if e.patient == "patient-1")
        );
        assert_eq!(r.lookup("did:key:zNope"), Lookup::Unknown);
        f.revoke(a.did(), 20).unwrap();
        assert!(f.revoke(a.did(), 21).is_err());
        let r = f.load().unwrap();
        assert!(matches!(r.lookup(a.did().as_str()), Lookup::Revoked(_)));
        assert_eq!(r.devices().count(), 2);
        // Re-activating a revoked device is allowed.
        f.add(a.did(), "patient-3", None, 30).unwrap();
        assert!(
            matches!(f.load().unwrap().lookup(a.did().as_str()), Lookup::Active(e) if e.patient == "patient-3")
        );
    }
}
