//! The dead-letter store: every rejected reading, with its reason.
//!
//! In the distributed mode rejects are produced to the `vitals.rejected`
//! topic; in one process they are appended here, to `rejected.jsonl` in the
//! data directory (one JSON object per line, fsynced per batch), which the
//! query layer reads as the `rejected` table. Nothing is silently dropped.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Largest envelope kept verbatim in a rejection record.
pub const MAX_KEPT_BYTES: usize = 16 * 1024;

/// One rejected reading.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// When it was received, Unix ms.
    pub received_ms: u64,
    /// Which stage rejected it: `ingest` or `attestor`.
    pub stage: String,
    /// Machine-readable reason, e.g. `bad_signature`, `unknown_device`, `duplicate`.
    pub reason: String,
    /// Human-readable detail.
    pub detail: String,
    /// The device it claimed to come from, when known.
    pub device: Option<String>,
    /// Its sequence number, when known.
    pub seq: Option<u64>,
    /// The MQTT topic it arrived on, when known.
    pub topic: Option<String>,
    /// Size of the message in bytes.
    pub size: u64,
    /// The message (base64), when at most [`MAX_KEPT_BYTES`].
    pub envelope_b64: Option<String>,
    /// Where it was consumed from (`topic/partition@offset`), when from Kafka;
    /// a redelivered rejection has the same source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl Rejection {
    /// A rejection of `bytes` for `reason`.
    pub fn new(
        stage: &str,
        reason: &str,
        detail: impl Into<String>,
        bytes: &[u8],
        received_ms: u64,
    ) -> Self {
        Rejection {
            received_ms,
            stage: stage.to_owned(),
            reason: reason.to_owned(),
            detail: detail.into(),
            device: None,
            seq: None,
            topic: None,
            size: bytes.len() as u64,
            envelope_b64: (bytes.len() <= MAX_KEPT_BYTES)
                .then(|| base64::engine::general_purpose::STANDARD.encode(bytes)),
            source: None,
        }
    }
}

/// Append-only, fsynced JSON-lines file of rejections.
#[derive(Debug)]
pub struct RejectLog {
    path: PathBuf,
    file: Mutex<File>,
}

fn err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::DeadLetter {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

impl RejectLog {
    /// Open (or create) the store at `path`, cutting a torn last line.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_owned();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(&path, e))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| err(&path, e))?;
        let mut buf = Vec::new();
        file.seek(SeekFrom::Start(0)).map_err(|e| err(&path, e))?;
        file.read_to_end(&mut buf).map_err(|e| err(&path, e))?;
        let keep = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if keep != buf.len() {
            file.set_len(keep as u64).map_err(|e| err(&path, e))?;
            file.sync_all().map_err(|e| err(&path, e))?;
        }
        Ok(RejectLog {
            path,
            file: Mutex::new(file),
        })
    }

    /// Append and fsync. Blocking: call from a blocking context.
    pub fn append(&self, rejections: &[Rejection]) -> Result<()> {
        if rejections.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(rejections.len() * 256);
        for r in rejections {
            serde_json::to_writer(&mut buf, r).map_err(|e| err(&self.path, e))?;
            buf.push(b'\n');
        }
        let mut f = self
            .file
            .lock()
            .map_err(|_| err(&self.path, "lock poisoned"))?;
        f.write_all(&buf).map_err(|e| err(&self.path, e))?;
        f.sync_data().map_err(|e| err(&self.path, e))
    }

    /// Read every rejection (for tests and small stores).
    pub fn read_all(path: impl AsRef<Path>) -> Result<Vec<Rejection>> {
        let path = path.as_ref();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(err(path, e)),
        };
        text.lines()
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| err(path, e)))
            .collect()
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_reopen_and_torn_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("rejected.jsonl");
        let log = RejectLog::open(&p).unwrap();
        let r = Rejection::new("ingest", "bad_signature", "bad signature", b"abc", 5);
        log.append(&[r.clone(), r.clone()]).unwrap();
        drop(log);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"{\"torn")
            .unwrap();
        let log = RejectLog::open(&p).unwrap();
        log.append(std::slice::from_ref(&r)).unwrap();
        let all = RejectLog::read_all(&p).unwrap();
        assert_eq!(all, vec![r.clone(), r.clone(), r]);
        assert_eq!(all[0].envelope_b64.as_deref(), Some("YWJj"));
    }
}
