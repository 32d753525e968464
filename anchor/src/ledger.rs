//! The local ledger: an append-only file of ledger records
//! (`docs/anchoring.md` §5), each signed by the anchor key and chained to
//! the one before by hash.
//!
//! `<data>/anchor/ledger.jsonl` holds one JSON object per line:
//! `{"seq", "stream", "size", "root", "time_ms", "record"}`. `record` is
//! the signed note and the only authority; the other members repeat it
//! for readers, and must agree with it.
//!
//! **On open** every line is parsed, the hash chain is followed from the
//! first record (`prev` of record `n` is BLAKE3 of record `n − 1`'s note),
//! sequence numbers must count up from 0 and sizes must grow, and the last
//! record's signature is checked, which through the chain authenticates
//! every earlier record: an edit, a gap or a reorder anywhere is found.
//! `ledger.head` (written after each append) names the last record, so a
//! cut-off tail is found too. A torn last line (a crash mid-append) is cut
//! off. [`verify_file`] also checks every signature.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vitaltrail_core::anchor::LedgerRecord;
use vitaltrail_core::merkle::Hash;
use vitaltrail_core::{LogPublicKey, LogSigner};

use crate::error::{Error, Result};

/// The ledger file of an anchor directory.
pub fn ledger_path(anchor_dir: &Path) -> PathBuf {
    anchor_dir.join("ledger.jsonl")
}

/// One line of the ledger file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerLine {
    /// The record's position.
    pub seq: u64,
    /// The epoch log's origin.
    pub stream: String,
    /// The epoch log size anchored.
    pub size: u64,
    /// Its root, lowercase hex.
    pub root: String,
    /// When it was written, Unix ms.
    pub time_ms: u64,
    /// The signed ledger record note.
    pub record: String,
}

fn lerr(path: &Path, detail: impl std::fmt::Display) -> Error {
    Error::Ledger {
        path: path.to_owned(),
        detail: detail.to_string(),
    }
}

/// Parse a line, and check that its members repeat its record.
fn parse_line(path: &Path, n: usize, line: &str) -> Result<(LedgerLine, LedgerRecord)> {
    let l: LedgerLine =
        serde_json::from_str(line).map_err(|e| lerr(path, format!("line {}: {e}", n + 1)))?;
    let r = LedgerRecord::parse_unverified(&l.record)
        .map_err(|e| lerr(path, format!("line {}: {e}", n + 1)))?;
    if r.seq != l.seq
        || r.stream != l.stream
        || r.size != l.size
        || r.root.to_hex() != l.root
        || r.time_ms != l.time_ms
    {
        return Err(lerr(
            path,
            format!("line {}: its members differ from its record", n + 1),
        ));
    }
    Ok((l, r))
}

/// Read and check a ledger file: the chain, and the signature of the last
/// record (or of every record, with `all_signatures`). Returns its lines.
/// A torn last line is ignored (and reported in the second value).
pub fn read_checked(
    path: &Path,
    key: &LogPublicKey,
    all_signatures: bool,
) -> Result<(Vec<LedgerLine>, bool)> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((vec![], false)),
        Err(e) => return Err(lerr(path, e)),
    };
    let complete = text.rfind('\n').map_or(0, |i| i + 1);
    let torn = complete < text.len();
    let mut out = Vec::new();
    let mut prev = Hash([0; 32]);
    let mut last_size = None;
    for (n, line) in text[..complete].lines().enumerate() {
        let (l, r) = parse_line(path, n, line)?;
        if r.seq != n as u64 {
            return Err(lerr(
                path,
                format!("line {} holds record {}: a gap or a reorder", n + 1, r.seq),
            ));
        }
        if r.prev != prev {
            return Err(lerr(
                path,
                format!("record {n} does not chain to the record before it"),
            ));
        }
        if r.stream != key.name() {
            return Err(lerr(path, format!("record {n} is for {:?}", r.stream)));
        }
        if last_size.is_some_and(|s| r.size <= s) {
            return Err(lerr(
                path,
                format!("record {n} does not grow the anchored size"),
            ));
        }
        if all_signatures {
            LedgerRecord::open(&l.record, key)
                .map_err(|e| lerr(path, format!("record {n}: {e}")))?;
        }
        last_size = Some(r.size);
        prev = LedgerRecord::chain_hash(&l.record);
        out.push(l);
    }
    if let Some(l) = out.last() {
        LedgerRecord::open(&l.record, key)
            .map_err(|e| lerr(path, format!("the last record: {e}")))?;
    }
    Ok((out, torn))
}

/// Check every record of a ledger file; the number of records.
pub fn verify_file(path: &Path, key: &LogPublicKey) -> Result<usize> {
    read_checked(path, key, true).map(|(l, _)| l.len())
}

/// Check every record of the ledger of `anchor_dir` and that each root is
/// the epoch log's at its size; the number of records, and whether a torn
/// last line was found.
pub fn verify_against_log(anchor_dir: &Path, key: &LogPublicKey) -> Result<(usize, bool)> {
    let path = ledger_path(anchor_dir);
    let (lines, torn) = read_checked(&path, key, true)?;
    let log = vitaltrail_log::DurableLog::open_read_only(crate::store::epochs_dir(anchor_dir))?;
    for l in &lines {
        if l.size > log.size() {
            return Err(lerr(
                &path,
                format!(
                    "record {} anchors size {} but the epoch log holds {}",
                    l.seq,
                    l.size,
                    log.size()
                ),
            ));
        }
        if log.root_at(l.size)?.to_hex() != l.root {
            return Err(lerr(
                &path,
                format!(
                    "record {}: the epoch log's root at size {} differs",
                    l.seq, l.size
                ),
            ));
        }
    }
    Ok((lines.len(), torn))
}

/// The ledger, open for appending.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    head_path: PathBuf,
    last: Option<LedgerLine>,
    prev: Hash,
}

impl Ledger {
    /// Open (or create) the ledger of `anchor_dir`, checking it.
    pub fn open(anchor_dir: &Path, key: &LogPublicKey) -> Result<Self> {
        let path = ledger_path(anchor_dir);
        let head_path = anchor_dir.join("ledger.head");
        let (lines, torn) = read_checked(&path, key, false)?;
        if torn {
            // Cut the torn tail (a crash mid-append): it was never
            // acknowledged.
            let text = std::fs::read(&path).map_err(|e| lerr(&path, e))?;
            let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| lerr(&path, e))?;
            f.set_len(complete as u64)
                .and_then(|_| f.sync_all())
                .map_err(|e| lerr(&path, e))?;
            tracing::warn!(path = %path.display(), "cut a torn last ledger line");
        }
        let head = match std::fs::read_to_string(&head_path) {
            Ok(t) => Some(t.trim().parse::<u64>().map_err(|e| lerr(&head_path, e))?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(lerr(&head_path, e)),
        };
        let n = lines.len() as u64;
        if let Some(h) = head
            && h > n
        {
            return Err(lerr(
                &path,
                format!(
                    "ledger.head names {h} records but the ledger holds {n}: records were removed"
                ),
            ));
        }
        let prev = lines
            .last()
            .map_or(Hash([0; 32]), |l| LedgerRecord::chain_hash(&l.record));
        Ok(Ledger {
            path,
            head_path,
            last: lines.into_iter().last(),
            prev,
        })
    }

    /// The last record.
    pub fn last(&self) -> Option<&LedgerLine> {
        self.last.as_ref()
    }

    /// The anchored size (0 when empty).
    pub fn anchored_size(&self) -> u64 {
        self.last.as_ref().map_or(0, |l| l.size)
    }

    /// Append a record anchoring the epoch log at `size` with `root`;
    /// durable when it returns.
    pub fn append(
        &mut self,
        signer: &LogSigner,
        size: u64,
        root: Hash,
        time_ms: u64,
    ) -> Result<LedgerLine> {
        if size <= self.anchored_size() {
            return Err(lerr(&self.path, format!("size {size} is anchored already")));
        }
        let seq = self.last.as_ref().map_or(0, |l| l.seq + 1);
        let rec = LedgerRecord {
            seq,
            prev: self.prev,
            stream: signer.name().to_owned(),
            size,
            root,
            time_ms,
        };
        let note = rec.sign(signer)?;
        let line = LedgerLine {
            seq,
            stream: rec.stream.clone(),
            size,
            root: root.to_hex(),
            time_ms,
            record: note.clone(),
        };
        let mut bytes = serde_json::to_vec(&line).map_err(|e| lerr(&self.path, e))?;
        bytes.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| lerr(&self.path, e))?;
        f.write_all(&bytes)
            .and_then(|_| f.sync_data())
            .map_err(|e| lerr(&self.path, e))?;
        if seq == 0
            && let Some(dir) = self.path.parent()
        {
            vitaltrail_log::sync_dir(dir)?;
        }
        if let Some(dir) = self.head_path.parent() {
            vitaltrail_log::write_atomic(dir, "ledger.head", format!("{}\n", seq + 1).as_bytes())?;
        }
        self.prev = LedgerRecord::chain_hash(&note);
        self.last = Some(line.clone());
        Ok(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vitaltrail_core::SecretKey;
    use vitaltrail_core::merkle::leaf_hash;

    fn signer() -> LogSigner {
        LogSigner::new(
            "vitaltrail.test/epochs",
            SecretKey::from_seed(&[3; 32]).unwrap(),
        )
        .unwrap()
    }

    fn ledger_of(n: u64) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::open(dir.path(), &signer().public_key()).unwrap();
        for i in 1..=n {
            l.append(&signer(), i * 2, leaf_hash(&i.to_be_bytes()), 1000 + i)
                .unwrap();
        }
        dir
    }

    fn lines(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(ledger_path(dir))
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write_lines(dir: &Path, lines: &[String]) {
        let mut t = lines.join("\n");
        t.push('\n');
        std::fs::write(ledger_path(dir), t).unwrap();
    }

    #[test]
    fn appends_reopen_and_verify() {
        let dir = ledger_of(5);
        let l = Ledger::open(dir.path(), &signer().public_key()).unwrap();
        assert_eq!(l.anchored_size(), 10);
        assert_eq!(
            verify_file(&ledger_path(dir.path()), &signer().public_key()).unwrap(),
            5
        );
        let mut l = l;
        assert!(l.append(&signer(), 10, leaf_hash(b"x"), 0).is_err());
        l.append(&signer(), 11, leaf_hash(b"x"), 0).unwrap();
        assert_eq!(lines(dir.path()).len(), 6);
    }

    #[test]
    fn editing_deleting_or_reordering_a_record_is_detected() {
        let key = signer().public_key();
        let base = lines(ledger_of(5).path());
        let mut cases: Vec<(&str, Vec<String>)> = vec![];
        for i in 0..5 {
            let mut v = base.clone();
            v.remove(i);
            cases.push(("delete", v));
        }
        for i in 0..4 {
            let mut v = base.clone();
            v.swap(i, i + 1);
            cases.push(("swap", v));
        }
        // An edit of a repeated member, and of the record itself.
        let mut v = base.clone();
        v[2] = v[2].replace("\"size\":6", "\"size\":7");
        cases.push(("member", v));
        for i in 0..5 {
            let mut v = base.clone();
            let mut l: LedgerLine = serde_json::from_str(&v[i]).unwrap();
            l.record = l.record.replacen(
                &format!("\n{}\n", (i + 1) * 2),
                &format!("\n{}\n", (i + 1) * 2 + 1),
                1,
            );
            l.size += 1;
            v[i] = serde_json::to_string(&l).unwrap();
            cases.push(("record", v));
        }
        for (what, v) in cases {
            let dir = tempfile::tempdir().unwrap();
            write_lines(dir.path(), &v);
            // The head file says 5: a deleted last record is found too.
            std::fs::write(dir.path().join("ledger.head"), "5\n").unwrap();
            assert!(
                Ledger::open(dir.path(), &key).is_err(),
                "{what}: {v:#?} opened"
            );
            assert!(verify_file(&ledger_path(dir.path()), &key).is_err() || what == "delete");
        }
    }

    #[test]
    fn any_flipped_byte_of_the_file_is_detected() {
        let dir = ledger_of(3);
        let key = signer().public_key();
        let bytes = std::fs::read(ledger_path(dir.path())).unwrap();
        for i in 0..bytes.len() - 1 {
            let mut t = bytes.clone();
            t[i] ^= 0x01;
            let d = tempfile::tempdir().unwrap();
            std::fs::write(ledger_path(d.path()), &t).unwrap();
            std::fs::write(d.path().join("ledger.head"), "3\n").unwrap();
            assert!(
                verify_file(&ledger_path(d.path()), &key).is_err(),
                "flip at {i} verifies"
            );
        }
    }

    #[test]
    fn a_torn_last_line_is_cut_and_appending_goes_on() {
        let dir = ledger_of(3);
        let key = signer().public_key();
        let mut t = std::fs::read(ledger_path(dir.path())).unwrap();
        t.extend_from_slice(b"{\"seq\":3,\"str");
        std::fs::write(ledger_path(dir.path()), &t).unwrap();
        let mut l = Ledger::open(dir.path(), &key).unwrap();
        assert_eq!(l.anchored_size(), 6);
        l.append(&signer(), 7, leaf_hash(b"y"), 0).unwrap();
        assert_eq!(verify_file(&ledger_path(dir.path()), &key).unwrap(), 4);
    }
}
