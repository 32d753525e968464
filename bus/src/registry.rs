//! The device registry: which DIDs may send readings, for which patient.
//!
//! In one process it is the file `devices.json` in the data directory,
//! edited by `vitaltrail devices add|list|revoke` (atomic replace under an
//! exclusive lock) and reloaded by ingest when it changes. A revoked device
//! is rejected from the next reload on (`revoked_device`).
//!
//! In the distributed mode the registry reaches every ingest and attestor
//! process as the compacted Kafka topic `vitals.devices` (key = DID, value
//! = a [`DeviceEntry`] as JSON), which `vitaltrail devices add|revoke
//! --kafka` writes. Each process merges the topic with its local file; where
//! both know a device, the later registration or revocation wins.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use vitaltrail_core::DeviceId;

use crate::{Error, Result};

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
        // IDs are matched exactly (alert settings, grants): " p1" and "p1"
        // must not be two patients by accident.
        if patient.trim() != patient || ward.is_some_and(|w| w.trim() != w || w.is_empty()) {
            return Err(Error::InvalidArgument(
                "patient and ward must not have whitespace around them (nor be empty)".into(),
            ));
        }
        // They travel in alerts, headers and topics: no control characters.
        if patient
            .chars()
            .chain(ward.unwrap_or("").chars())
            .any(char::is_control)
        {
            return Err(Error::InvalidArgument(
                "patient and ward must not hold control characters".into(),
            ));
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

/// Domain of the operator's signature on a registry record.
const ENTRY_DOMAIN: &[u8] = b"vitaltrail/registry-record/v1\n";

/// A record of the `vitals.devices` topic: a [`DeviceEntry`]'s JSON bytes,
/// signed by the operator key (`docs/kafka-topics.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedEntry {
    /// Standard base64 of the entry's JSON bytes.
    pub entry: String,
    /// The operator's `did:key`.
    pub signer: String,
    /// Standard base64 of Ed25519(operator, "vitaltrail/registry-record/v1\n" ‖ entry bytes).
    pub sig: String,
}

/// The topic record value for `entry`, signed by `operator`.
pub fn sign_entry(entry: &DeviceEntry, operator: &vitaltrail_core::SecretKey) -> Vec<u8> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let bytes = serde_json::to_vec(entry).unwrap_or_default();
    let mut msg = ENTRY_DOMAIN.to_vec();
    msg.extend_from_slice(&bytes);
    let rec = SignedEntry {
        entry: b64.encode(&bytes),
        signer: operator.did().to_string(),
        sig: b64.encode(operator.sign(&msg)),
    };
    serde_json::to_vec(&rec).unwrap_or_default()
}

/// Check a topic record value's signature by `operator`; the entry bytes.
pub fn open_entry(value: &[u8], operator: &DeviceId) -> Result<Vec<u8>> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let bad = |d: String| Error::InvalidArgument(format!("registry record: {d}"));
    let rec: SignedEntry = serde_json::from_slice(value).map_err(|e| bad(e.to_string()))?;
    if rec.signer != operator.as_str() {
        return Err(bad(format!("signed by {}, not the operator", rec.signer)));
    }
    let bytes = b64.decode(&rec.entry).map_err(|e| bad(e.to_string()))?;
    let sig: [u8; 64] = b64
        .decode(&rec.sig)
        .map_err(|e| bad(e.to_string()))?
        .try_into()
        .map_err(|_| bad("signature is not 64 bytes".into()))?;
    let mut msg = ENTRY_DOMAIN.to_vec();
    msg.extend_from_slice(&bytes);
    vitaltrail_core::sig::verify(operator.verifying_key(), &msg, &sig)
        .map_err(|_| bad("bad signature".into()))?;
    Ok(bytes)
}

/// The sources a [`SharedRegistry`] merges.
#[derive(Debug, Default)]
struct Layers {
    /// `devices.json` of the data directory.
    file: Registry,
    /// The `vitals.devices` Kafka topic (distributed mode).
    topic: BTreeMap<String, DeviceEntry>,
    /// What lookups see.
    merged: Registry,
}

/// Where both sources know a device, the later event wins (a registration
/// at `added_ms`, a revocation at `revoked_ms`); on a tie, the revocation.
fn event(e: &DeviceEntry) -> (u64, bool) {
    match e.revoked_ms {
        Some(t) => (t.max(e.added_ms), true),
        None => (e.added_ms, false),
    }
}

impl Layers {
    /// Rebuild the whole merged view (after the file was reloaded).
    fn remerge(&mut self) {
        let mut merged = self.file.devices.clone();
        for (did, t) in &self.topic {
            if merged.get(did).is_none_or(|f| event(t) > event(f)) {
                merged.insert(did.clone(), t.clone());
            }
        }
        self.merged = Registry { devices: merged };
    }

    /// Recompute the merged entry of one device: O(log n), no clone of the
    /// registry (a topic record changes one device).
    fn remerge_one(&mut self, did: &str) {
        let winner = match (self.file.devices.get(did), self.topic.get(did)) {
            (Some(f), Some(t)) => Some(if event(t) > event(f) { t } else { f }),
            (f, t) => f.or(t),
        }
        .cloned();
        match winner {
            Some(e) => {
                self.merged.devices.insert(did.to_owned(), e);
            }
            None => {
                self.merged.devices.remove(did);
            }
        }
    }
}

/// A registry shared with ingest and the attestor: the registry file,
/// reloaded when it changes, merged with the `vitals.devices` topic when
/// the process follows one ([`SharedRegistry::apply_topic_record`]).
#[derive(Debug, Clone)]
pub struct SharedRegistry {
    inner: Arc<RwLock<Layers>>,
}

impl SharedRegistry {
    /// A fixed registry (tests).
    pub fn fixed(reg: Registry) -> Self {
        let mut layers = Layers {
            file: reg,
            ..Layers::default()
        };
        layers.remerge();
        SharedRegistry {
            inner: Arc::new(RwLock::new(layers)),
        }
    }

    fn edit(&self, f: impl FnOnce(&mut Layers)) {
        let mut g = match self.inner.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut g);
        g.remerge();
    }

    fn edit_one(&self, did: &str, f: impl FnOnce(&mut Layers)) {
        let mut g = match self.inner.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut g);
        g.remerge_one(did);
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
                            s.edit(|l| l.file = r);
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

    /// Apply one record of the `vitals.devices` topic: key = DID, value =
    /// a [`SignedEntry`] by `operator` ([`sign_entry`]). A record that is
    /// not signed by the operator, does not parse, or whose key is not its
    /// entry's DID, is skipped with a warning. A tombstone (no value) is
    /// ignored: deleting a record must never un-revoke a device.
    pub fn apply_topic_record(&self, key: &[u8], value: Option<&[u8]>, operator: &DeviceId) {
        let did = String::from_utf8_lossy(key).into_owned();
        let Some(v) = value else {
            tracing::warn!(key = %did, "registry tombstone ignored: records are never deleted");
            return;
        };
        let v = match open_entry(v, operator) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(key = %did, error = %e, "registry record is not signed by the operator; skipped");
                return;
            }
        };
        let v = v.as_slice();
        {
            match serde_json::from_slice::<DeviceEntry>(v) {
                Ok(e) if e.did == did && DeviceId::parse(&e.did).is_ok() => {
                    let d = did.clone();
                    self.edit_one(&d, |l| {
                        // An older record replayed onto the topic (a signed
                        // registration from before a revocation) never
                        // wins: the later event stands.
                        if l.topic.get(&did).is_none_or(|old| event(&e) >= event(old)) {
                            l.topic.insert(did, e);
                        } else {
                            tracing::warn!(key = %did, "registry record older than the one applied; skipped");
                        }
                    });
                }
                Ok(_) => {
                    tracing::warn!(key = %did, "registry record: key is not its entry's valid DID; skipped")
                }
                Err(e) => {
                    tracing::warn!(key = %did, error = %e, "registry record is not a device entry; skipped")
                }
            }
        }
    }

    /// Run `f` on the current snapshot.
    pub fn with<T>(&self, f: impl FnOnce(&Registry) -> T) -> T {
        match self.inner.read() {
            Ok(g) => f(&g.merged),
            Err(p) => f(&p.into_inner().merged),
        }
    }
}

/// Follow `vitals.devices` into `shared`: returns once every registration
/// already in the topic is applied, so the process starts with the whole
/// registry; later changes keep arriving in the returned task. Records not
/// signed by `operator` are ignored.
pub async fn follow_topic(
    kafka: &crate::kafka::KafkaConfig,
    shared: &SharedRegistry,
    operator: &DeviceId,
) -> Result<tokio::task::JoinHandle<()>> {
    let s = shared.clone();
    let op = operator.clone();
    crate::kafka::follow_topic(kafka, crate::kafka::DEVICES_TOPIC, move |k, v| {
        s.apply_topic_record(k, v, &op)
    })
    .await
}

/// Publish a device's registry entry to `vitals.devices`, signed by the
/// operator key (and wait until Kafka has it).
pub async fn publish_to_topic(
    kafka: &crate::kafka::KafkaConfig,
    entry: &DeviceEntry,
    operator: &vitaltrail_core::SecretKey,
) -> Result<()> {
    crate::kafka::ensure_registry_topic(kafka).await?;
    let producer = crate::kafka::KafkaProducer::new(kafka)?;
    producer
        .send_to(
            crate::kafka::DEVICES_TOPIC,
            &entry.did,
            &sign_entry(entry, operator),
        )
        .await
}

/// The registry as the `vitals.devices` topic holds it now.
pub async fn from_topic(
    kafka: &crate::kafka::KafkaConfig,
    operator: &DeviceId,
) -> Result<SharedRegistry> {
    crate::kafka::ensure_registry_topic(kafka).await?;
    let shared = SharedRegistry::fixed(Default::default());
    follow_topic(kafka, &shared, operator).await?.abort();
    Ok(shared)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vitaltrail_core::SecretKey;

    #[test]
    fn topic_records_merge_with_the_file() {
        let a = SecretKey::from_seed(&[1; 32]).unwrap();
        let b = SecretKey::from_seed(&[2; 32]).unwrap();
        let entry = |k: &SecretKey, added: u64, revoked: Option<u64>| DeviceEntry {
            did: k.did().to_string(),
            patient: "p".into(),
            ward: None,
            added_ms: added,
            revoked_ms: revoked,
        };
        let mut file = Registry::default();
        file.devices
            .insert(a.did().to_string(), entry(&a, 10, None));
        let shared = SharedRegistry::fixed(file);
        let key = |k: &SecretKey| k.did().to_string().into_bytes();
        let op = SecretKey::from_seed(&[9; 32]).unwrap();
        let json = |e: &DeviceEntry| sign_entry(e, &op);
        let state = |k: &SecretKey| {
            shared.with(|r| match r.lookup(k.did().as_str()) {
                Lookup::Active(_) => "active",
                Lookup::Revoked(_) => "revoked",
                Lookup::Unknown => "unknown",
            })
        };
        let opd = op.did();
        assert_eq!(state(&b), "unknown");
        shared.apply_topic_record(&key(&b), Some(&json(&entry(&b, 5, None))), opd);
        assert_eq!(state(&b), "active");
        // A later revocation on the topic beats the file's registration.
        shared.apply_topic_record(&key(&a), Some(&json(&entry(&a, 10, Some(20)))), opd);
        assert_eq!(state(&a), "revoked");
        // A record under the wrong key, or that is not an entry, is skipped.
        shared.apply_topic_record(&key(&a), Some(&json(&entry(&b, 1, None))), opd);
        shared.apply_topic_record(&key(&a), Some(b"{not json"), opd);
        assert_eq!(state(&a), "revoked");
        // An unsigned entry, or one signed by anyone but the operator, is
        // skipped: it cannot re-register a revoked device.
        let later = entry(&a, 30, None);
        shared.apply_topic_record(&key(&a), Some(&serde_json::to_vec(&later).unwrap()), opd);
        let intruder = SecretKey::from_seed(&[10; 32]).unwrap();
        shared.apply_topic_record(&key(&a), Some(&sign_entry(&later, &intruder)), opd);
        let mut forged: SignedEntry = serde_json::from_slice(&json(&entry(&a, 1, None))).unwrap();
        forged.entry = {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&later).unwrap())
        };
        shared.apply_topic_record(&key(&a), Some(&serde_json::to_vec(&forged).unwrap()), opd);
        assert_eq!(state(&a), "revoked");
        // The operator's own older registration, replayed after the
        // revocation, does not un-revoke it either.
        shared.apply_topic_record(&key(&a), Some(&json(&entry(&a, 10, None))), opd);
        assert_eq!(state(&a), "revoked");
        // A tombstone un-revokes nothing and forgets nothing.
        shared.apply_topic_record(&key(&a), None, opd);
        assert_eq!(state(&a), "revoked");
        shared.apply_topic_record(&key(&b), None, opd);
        assert_eq!(state(&b), "active");
    }

    #[test]
    fn add_list_revoke() {
        let d = tempfile::tempdir().unwrap();
        let f = RegistryFile::new(d.path().join("devices.json"));
        let a = SecretKey::from_seed(&[1; 32]).unwrap();
        let b = SecretKey::from_seed(&[2; 32]).unwrap();
        f.add(a.did(), "patient-1", Some("ward-7"), 10).unwrap();
        f.add(b.did(), "patient-2", None, 11).unwrap();
        assert!(f.add(a.did(), "patient-9", None, 12).is_err());
        // Whitespace around an ID would make a second patient by accident.
        let c = SecretKey::from_seed(&[3; 32]).unwrap();
        assert!(f.add(c.did(), " patient-1", None, 12).is_err());
        assert!(f.add(c.did(), "patient-1\t", None, 12).is_err());
        assert!(f.add(c.did(), "patient-1", Some("ward-7 "), 12).is_err());
        assert!(f.add(c.did(), "patient-1", Some(""), 12).is_err());
        // Control characters would break alert headers and topics.
        assert!(f.add(c.did(), "patient\u{7}1", None, 12).is_err());
        assert!(f.add(c.did(), "patient-1", Some("w\u{0}"), 12).is_err());
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
