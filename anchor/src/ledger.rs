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

/// What reading a ledger file found.
#[derive(Debug, Clone, Default)]
pub struct Checked {
    /// Complete records.
    pub records: u64,
    /// The last of them.
    pub last: Option<LedgerLine>,
    /// A torn last line (a crash mid-append) follows them.
    pub torn: bool,
}

/// Read and check a ledger file line by line: the chain, and the
/// signature of the last record (or of every record, with
/// `all_signatures`), handing each line to `each`. Holds one line at a
/// time. A torn last line is not a record (`Checked::torn`).
pub fn read_checked(
    path: &Path,
    key: &LogPublicKey,
    all_signatures: bool,
    mut each: impl FnMut(&LedgerLine) -> Result<()>,
) -> Result<Checked> {
    use std::io::BufRead as _;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Checked::default()),
        Err(e) => return Err(lerr(path, e)),
    };
    let mut reader = std::io::BufReader::new(file);
    let mut out = Checked::default();
    let mut prev = Hash([0; 32]);
    let mut buf = String::new();
    loop {
        buf.clear();
        let n = reader.read_line(&mut buf).map_err(|e| lerr(path, e))?;
        if n == 0 {
            break;
        }
        if !buf.ends_with('\n') {
            out.torn = true;
            break;
        }
        let i = out.records;
        let (l, r) = parse_line(path, i as usize, buf.trim_end_matches('\n'))?;
        if r.seq != i {
            return Err(lerr(
                path,
                format!("line {} holds record {}: a gap or a reorder", i + 1, r.seq),
            ));
        }
        if r.prev != prev {
            return Err(lerr(
                path,
                format!("record {i} does not chain to the record before it"),
            ));
        }
        if r.stream != key.name() {
            return Err(lerr(path, format!("record {i} is for {:?}", r.stream)));
        }
        if out.last.as_ref().is_some_and(|p| r.size <= p.size) {
            return Err(lerr(
                path,
                format!("record {i} does not grow the anchored size"),
            ));
        }
        if all_signatures {
            LedgerRecord::open(&l.record, key)
                .map_err(|e| lerr(path, format!("record {i}: {e}")))?;
        }
        each(&l)?;
        prev = LedgerRecord::chain_hash(&l.record);
        out.records += 1;
        out.last = Some(l);
    }
    if let Some(l) = &out.last {
        LedgerRecord::open(&l.record, key)
            .map_err(|e| lerr(path, format!("the last record: {e}")))?;
    }
    Ok(out)
}

/// Check every record of a ledger file; the number of records.
pub fn verify_file(path: &Path, key: &LogPublicKey) -> Result<u64> {
    read_checked(path, key, true, |_| Ok(())).map(|c| c.records)
}

/// The record count `ledger.head` names (`None` without the file).
fn read_head(path: &Path) -> Result<Option<u64>> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t.trim().parse::<u64>().map_err(|e| lerr(path, e))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(lerr(path, e)),
    }
}

/// Refuse a ledger with fewer complete records than `ledger.head` or
/// `min_records` (the count the anchor's state keeps) say it had.
fn check_count(path: &Path, head_path: &Path, records: u64, min_records: u64) -> Result<()> {
    let want = read_head(head_path)?.unwrap_or(0).max(min_records);
    if records < want {
        return Err(lerr(
            path,
            format!(
                "it holds {records} complete records but {want} were written: records were \
                 removed (or the last line lost its newline)"
            ),
        ));
    }
    Ok(())
}

/// Check the ledger of `anchor_dir` whole: every record's signature, the
/// chain, that no record was removed (`ledger.head`, and the count in the
/// anchor's state), that every epoch of the epoch log reads back (its
/// stored hashes) and is in place, and that each record's root is the
/// epoch log's at its size. The number of records, and whether a torn
/// last line was found.
pub fn verify_against_log(anchor_dir: &Path, key: &LogPublicKey) -> Result<(u64, bool)> {
    let path = ledger_path(anchor_dir);
    let log = vitaltrail_log::DurableLog::open_read_only(crate::store::epochs_dir(anchor_dir))?;
    crate::store::check_epochs(&log, 0..log.size())?;
    let c = read_checked(&path, key, true, |l| {
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
        Ok(())
    })?;
    let state = crate::store::EpochReader::open(anchor_dir)
        .ok()
        .and_then(|r| r.meta(crate::store::LEDGER_RECORDS).ok().flatten())
        .unwrap_or(0);
    check_count(&path, &anchor_dir.join("ledger.head"), c.records, state)?;
    Ok((c.records, c.torn))
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
    /// Open (or create) the ledger of `anchor_dir`, checking it. It must
    /// hold at least `min_records` records (what the anchor's state says
    /// were written), and as many as `ledger.head` says; nothing is cut
    /// before that is known.
    pub fn open(anchor_dir: &Path, key: &LogPublicKey, min_records: u64) -> Result<Self> {
        let path = ledger_path(anchor_dir);
        let head_path = anchor_dir.join("ledger.head");
        let c = read_checked(&path, key, false, |_| Ok(()))?;
        check_count(&path, &head_path, c.records, min_records)?;
        if c.torn {
            // Cut the torn tail (a crash mid-append): it was never
            // acknowledged, and every record written is there.
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
        let prev = c
            .last
            .as_ref()
            .map_or(Hash([0; 32]), |l| LedgerRecord::chain_hash(&l.record));
        Ok(Ledger {
            path,
            head_path,
            last: c.last,
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

/// The ledger as a [`crate::backend::Backend`]: every new signed epoch log
/// size becomes one record at once (fsynced), and its count is kept in the
/// anchor's state.
#[derive(Debug)]
pub struct LedgerBackend {
    ledger: Ledger,
    signer: LogSigner,
    meta: crate::store::MetaHandle,
    metrics: crate::metrics::Metrics,
}

impl LedgerBackend {
    /// The backend over an opened ledger; `signer` is the anchor key.
    pub fn new(
        ledger: Ledger,
        signer: LogSigner,
        meta: crate::store::MetaHandle,
        metrics: crate::metrics::Metrics,
    ) -> Self {
        // Exported from the start (0), not first at the first error.
        metrics.anchor_errors.with_label_values(&["ledger"]);
        LedgerBackend {
            ledger,
            signer,
            meta,
            metrics,
        }
    }

    fn anchor(&mut self, t: &crate::backend::Target) -> Result<()> {
        let (size, root, closed) = *t;
        let pending = size.saturating_sub(self.ledger.anchored_size());
        self.metrics
            .epochs_pending
            .with_label_values(&["ledger"])
            .set(pending as i64);
        if pending == 0 {
            return Ok(());
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let line = match self.ledger.append(&self.signer, size, root, now) {
            Ok(l) => l,
            Err(e) => {
                self.metrics
                    .anchor_errors
                    .with_label_values(&["ledger"])
                    .inc();
                return Err(e);
            }
        };
        self.meta.set(crate::store::LEDGER_RECORDS, line.seq + 1)?;
        let m = &self.metrics;
        m.anchors.with_label_values(&["ledger"]).inc();
        m.anchored_size
            .with_label_values(&["ledger"])
            .set(size as i64);
        m.epochs_pending.with_label_values(&["ledger"]).set(0);
        m.anchor_latency
            .with_label_values(&["ledger"])
            .observe(closed.elapsed().as_secs_f64());
        Ok(())
    }
}

impl crate::backend::Backend for LedgerBackend {
    fn name(&self) -> &'static str {
        "ledger"
    }

    fn run(
        self: Box<Self>,
        mut targets: tokio::sync::watch::Receiver<Option<crate::backend::Target>>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> crate::backend::BoxFuture<Result<()>> {
        let mut me = *self;
        Box::pin(async move {
            loop {
                let target = *targets.borrow_and_update();
                if let Some(t) = target {
                    tokio::task::block_in_place(|| me.anchor(&t))?;
                }
                // The stage stops us after its last epoch: that one was
                // anchored just now.
                if *stop.borrow() {
                    return Ok(());
                }
                tokio::select! {
                    r = targets.changed() => if r.is_err() { return Ok(()) },
                    _ = stop.changed() => {}
                }
            }
        })
    }

    fn essential(&self) -> bool {
        true
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
        let mut l = Ledger::open(dir.path(), &signer().public_key(), 0).unwrap();
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
        let l = Ledger::open(dir.path(), &signer().public_key(), 0).unwrap();
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
                Ledger::open(dir.path(), &key, 0).is_err(),
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
        let mut l = Ledger::open(dir.path(), &key, 0).unwrap();
        assert_eq!(l.anchored_size(), 6);
        l.append(&signer(), 7, leaf_hash(b"y"), 0).unwrap();
        assert_eq!(verify_file(&ledger_path(dir.path()), &key).unwrap(), 4);
    }
    /// The reviewer's cases: a last line that lost its newline is not cut
    /// by an open that then refuses (the record stays for the operator),
    /// and a ledger cut short with its `ledger.head` gone is refused by the
    /// count the anchor's state keeps.
    #[test]
    fn nothing_is_cut_before_the_count_is_known_and_a_lost_head_does_not_hide_a_cut() {
        let dir = ledger_of(4);
        let key = signer().public_key();
        let path = ledger_path(dir.path());
        let full = std::fs::read(&path).unwrap();
        std::fs::write(&path, &full[..full.len() - 1]).unwrap();
        assert!(Ledger::open(dir.path(), &key, 0).is_err());
        assert_eq!(
            std::fs::read(&path).unwrap().len(),
            full.len() - 1,
            "the open cut it"
        );
        std::fs::write(&path, &full).unwrap();
        let mut v = lines(dir.path());
        v.pop();
        write_lines(dir.path(), &v);
        std::fs::remove_file(dir.path().join("ledger.head")).unwrap();
        assert!(
            Ledger::open(dir.path(), &key, 0).is_ok(),
            "the file alone cannot tell"
        );
        assert!(Ledger::open(dir.path(), &key, 4).is_err());
        std::fs::remove_file(&path).unwrap();
        assert!(Ledger::open(dir.path(), &key, 4).is_err());
    }
}
