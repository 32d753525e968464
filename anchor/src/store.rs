//! The epoch log and what proofs need besides it.
//!
//! # Files (in `<data>/anchor/`)
//!
//! | file | content |
//! |---|---|
//! | `epochs/` | the epoch log: a [`DurableLog`] whose leaf `n` is epoch `n`'s record |
//! | `state.redb` | per epoch its heads; the partition checkpoint notes; for each (origin, size) the first epoch holding it; the epoch log's signed checkpoint at every size; the partitions stopped by forks; the Kafka offset |
//! | `anchor.vkey` | the anchor's verifier key (epoch log checkpoints and ledger records) |
//!
//! `state.redb` is opened in redb's single-writer mode, so `prove` and
//! queries read it while the anchor runs.
//!
//! # Commit order, and recovery
//!
//! Closing epoch `n`: (1) one redb transaction stores its heads, the new
//! notes, the first-epoch index and the Kafka offset; (2) the epoch record
//! is appended to the epoch log (fsynced); (3) the epoch log checkpoint at
//! size `n + 1` is signed and stored. A crash after (1) leaves heads for an
//! epoch the log does not hold: opening appends its record (derived from
//! those heads, so the same bytes), then signs what is unsigned. No epoch
//! is lost and none is written twice.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use vitaltrail_core::anchor::{EpochRecord, PartitionHead};
use vitaltrail_core::merkle::Hash;
use vitaltrail_core::{Checkpoint, LogPublicKey, LogSigner};
use vitaltrail_log::DurableLog;

use crate::error::{Error, Result, state_err};
use crate::heads::{Heads, Held};

const HEADS: TableDefinition<u64, &[u8]> = TableDefinition::new("heads");
const NOTES: TableDefinition<(&str, u64), &str> = TableDefinition::new("notes");
const FIRST: TableDefinition<(&str, u64), u64> = TableDefinition::new("first_epoch");
const EPOCH_NOTES: TableDefinition<u64, &str> = TableDefinition::new("epoch_checkpoints");
const STOPPED: TableDefinition<&str, &str> = TableDefinition::new("stopped");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The `meta` key of the number of ledger records written (so a ledger
/// cut short, or removed with its `ledger.head`, is refused).
pub const LEDGER_RECORDS: &str = "ledger_records";

/// How many of the newest epochs are read back on open.
pub const RECHECKED_EPOCHS: u64 = 4096;

/// redb's page cache for the anchor state.
const DB_CACHE_BYTES: usize = 16 * 1024 * 1024;

fn builder() -> redb::Builder {
    let mut b = redb::Builder::new();
    b.set_cache_size(DB_CACHE_BYTES)
        .set_concurrency_mode(redb::ConcurrencyMode::SingleWriter);
    b
}

/// The epoch log's directory under an anchor directory.
pub fn epochs_dir(anchor_dir: &Path) -> PathBuf {
    anchor_dir.join("epochs")
}

/// An epoch's heads, as stored: `u64be(time_ms) ‖ u32be(n) ‖ n × (u16be(len) ‖ head)`.
fn encode_heads(time_ms: u64, heads: &[PartitionHead]) -> Result<Vec<u8>> {
    let mut b = Vec::with_capacity(12 + heads.len() * 80);
    b.extend_from_slice(&time_ms.to_be_bytes());
    b.extend_from_slice(&(heads.len() as u32).to_be_bytes());
    for h in heads {
        let e = h.encode()?;
        b.extend_from_slice(&(e.len() as u16).to_be_bytes());
        b.extend_from_slice(&e);
    }
    Ok(b)
}

fn decode_heads(path: &Path, b: &[u8]) -> Result<(u64, Vec<PartitionHead>)> {
    let bad = || state_err(path, "a stored epoch's heads do not parse");
    if b.len() < 12 {
        return Err(bad());
    }
    let time = u64::from_be_bytes(b[..8].try_into().map_err(|_| bad())?);
    let n = u32::from_be_bytes(b[8..12].try_into().map_err(|_| bad())?) as usize;
    let mut at = 12;
    let mut heads = Vec::with_capacity(n.min(vitaltrail_core::anchor::MAX_EPOCH_PARTITIONS));
    for _ in 0..n {
        let len = u16::from_be_bytes(
            b.get(at..at + 2)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        ) as usize;
        at += 2;
        heads.push(PartitionHead::decode(b.get(at..at + len).ok_or_else(bad)?)?);
        at += len;
    }
    if at != b.len() {
        return Err(bad());
    }
    Ok((time, heads))
}

/// Read back epochs `range` of `log`: each leaf against its stored hash,
/// each a well-formed record in its place.
pub fn check_epochs(log: &DurableLog, range: std::ops::Range<u64>) -> Result<()> {
    for e in range {
        let rec = EpochRecord::decode(&log.leaf(e)?)?;
        if rec.epoch != e {
            return Err(state_err(
                log.dir(),
                format!("epoch log leaf {e} holds epoch {}", rec.epoch),
            ));
        }
    }
    Ok(())
}

/// What closing an epoch made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// The epoch's number.
    pub epoch: u64,
    /// The epoch log's size after it.
    pub size: u64,
    /// The epoch log's root at that size.
    pub root: Hash,
    /// When it closed, Unix ms.
    pub time_ms: u64,
}

/// The writer: the epoch log and the state beside it.
#[derive(Debug)]
pub struct EpochStore {
    dir: PathBuf,
    db_path: PathBuf,
    log: DurableLog,
    db: std::sync::Arc<redb::Database>,
    signer: LogSigner,
}

/// Writes counters into the anchor state beside the epoch loop (a backend
/// recording its progress, such as the ledger's record count).
#[derive(Debug, Clone)]
pub struct MetaHandle {
    db: std::sync::Arc<redb::Database>,
    path: PathBuf,
}

impl MetaHandle {
    /// Store a counter.
    pub fn set(&self, key: &str, value: u64) -> Result<()> {
        let tx = self
            .db
            .begin_write()
            .map_err(|e| state_err(&self.path, e))?;
        {
            let mut t = tx.open_table(META).map_err(|e| state_err(&self.path, e))?;
            t.insert(key, value).map_err(|e| state_err(&self.path, e))?;
        }
        tx.commit().map_err(|e| state_err(&self.path, e))
    }
}

impl EpochStore {
    /// Open (or create) the store in `anchor_dir`, finishing an epoch a
    /// crash interrupted. The signer's name is the epoch log's origin.
    pub fn open(anchor_dir: &Path, signer: LogSigner) -> Result<Self> {
        std::fs::create_dir_all(anchor_dir).map_err(|e| Error::Io {
            op: "creating",
            path: anchor_dir.to_owned(),
            source: e,
        })?;
        let db_path = anchor_dir.join("state.redb");
        let db = builder()
            .create(&db_path)
            .map_err(|e| state_err(&db_path, e))?;
        {
            let tx = db.begin_write().map_err(|e| state_err(&db_path, e))?;
            tx.open_table(HEADS).map_err(|e| state_err(&db_path, e))?;
            tx.open_table(NOTES).map_err(|e| state_err(&db_path, e))?;
            tx.open_table(FIRST).map_err(|e| state_err(&db_path, e))?;
            tx.open_table(EPOCH_NOTES)
                .map_err(|e| state_err(&db_path, e))?;
            tx.open_table(STOPPED).map_err(|e| state_err(&db_path, e))?;
            tx.open_table(META).map_err(|e| state_err(&db_path, e))?;
            tx.commit().map_err(|e| state_err(&db_path, e))?;
        }
        let log = DurableLog::open(epochs_dir(anchor_dir))?;
        let mut s = EpochStore {
            dir: anchor_dir.to_owned(),
            db_path,
            log,
            db: std::sync::Arc::new(db),
            signer,
        };
        s.recover()?;
        // Only once the key verifies what the epoch log holds: verifiers
        // are provisioned from this file.
        vitaltrail_log::write_atomic(
            anchor_dir,
            "anchor.vkey",
            format!("{}\n", s.signer.public_key()).as_bytes(),
        )?;
        Ok(s)
    }

    fn recover(&mut self) -> Result<()> {
        let size = self.log.size();
        let last = {
            let tx = self.db.begin_read().map_err(|e| self.err(e))?;
            let t = tx.open_table(HEADS).map_err(|e| self.err(e))?;
            let last = t.last().map_err(|e| self.err(e))?;
            last.map(|(k, v)| (k.value(), v.value().to_vec()))
        };
        match last {
            None if size == 0 => {}
            Some((k, _)) if k + 1 == size => {}
            // Heads stored, record not appended: finish the epoch.
            Some((k, v)) if k == size => {
                let (time, heads) = decode_heads(&self.db_path, &v)?;
                let rec = EpochRecord::new(k, time, &heads)?;
                self.log.append_batch(&[rec.encode()])?;
                tracing::info!(epoch = k, "finished an epoch a crash interrupted");
            }
            other => {
                return Err(state_err(
                    &self.db_path,
                    format!(
                        "the state's last epoch is {:?} but the epoch log holds {size}: \
                         the state or the log was replaced",
                        other.map(|(k, _)| k)
                    ),
                ));
            }
        }
        // The newest epochs read back (each leaf is re-hashed against its
        // stored hash) and are in place: a damaged log is refused before
        // anything is built on it. `anchor verify-ledger` reads them all.
        let size = self.log.size();
        check_epochs(&self.log, size.saturating_sub(RECHECKED_EPOCHS)..size)?;
        // The signed checkpoint must describe this log (fork guard).
        let signed = self.latest_signed()?;
        match signed {
            Some((n, note)) => {
                let cp = Checkpoint::open(&note, &self.signer.public_key())?;
                if n > size || self.log.root_at(n)? != cp.root {
                    return Err(state_err(
                        &self.db_path,
                        format!("the epoch log does not extend its checkpoint at size {n}"),
                    ));
                }
                if n < size {
                    self.sign()?;
                }
            }
            None if size > 0 => {
                self.sign()?;
            }
            None => {}
        }
        Ok(())
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        state_err(&self.db_path, e)
    }

    fn latest_signed(&self) -> Result<Option<(u64, String)>> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(EPOCH_NOTES).map_err(|e| self.err(e))?;
        let last = t.last().map_err(|e| self.err(e))?;
        Ok(last.map(|(k, v)| (k.value(), v.value().to_owned())))
    }

    fn sign(&mut self) -> Result<String> {
        let size = self.log.size();
        let note = Checkpoint {
            origin: self.signer.name().to_owned(),
            size,
            root: self.log.root(),
            extensions: vec![],
        }
        .sign(&self.signer)?;
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut t = tx.open_table(EPOCH_NOTES).map_err(|e| self.err(e))?;
            t.insert(size, note.as_str()).map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        self.log.store_checkpoint(&note)?;
        Ok(note)
    }

    /// The heads of the last epoch and the partitions stopped by forks,
    /// to start [`Heads`] from.
    pub fn load(&self) -> Result<(BTreeMap<String, Held>, BTreeSet<String>)> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(HEADS).map_err(|e| self.err(e))?;
        let notes = tx.open_table(NOTES).map_err(|e| self.err(e))?;
        let mut held = BTreeMap::new();
        if let Some((_, v)) = t.last().map_err(|e| self.err(e))? {
            let (_, heads) = decode_heads(&self.db_path, v.value())?;
            for h in heads {
                let note = notes
                    .get((h.origin.as_str(), h.size))
                    .map_err(|e| self.err(e))?
                    .ok_or_else(|| self.err(format!("no note for {} at {}", h.origin, h.size)))?
                    .value()
                    .to_owned();
                held.insert(
                    h.origin,
                    Held {
                        size: h.size,
                        root: h.root,
                        note,
                    },
                );
            }
        }
        let stopped = tx.open_table(STOPPED).map_err(|e| self.err(e))?;
        let mut out = BTreeSet::new();
        for e in stopped.iter().map_err(|e| self.err(e))? {
            let (k, _) = e.map_err(|e| self.err(e))?;
            out.insert(k.value().to_owned());
        }
        Ok((held, out))
    }

    /// A writer of counters, for a backend's task.
    pub fn meta_handle(&self) -> MetaHandle {
        MetaHandle {
            db: self.db.clone(),
            path: self.db_path.clone(),
        }
    }

    /// A stored counter (`None` if never set).
    pub fn meta(&self, key: &str) -> Result<Option<u64>> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(META).map_err(|e| self.err(e))?;
        Ok(t.get(key).map_err(|e| self.err(e))?.map(|v| v.value()))
    }

    /// Close an epoch holding `heads` if any moved (`None` otherwise):
    /// store it, append its record, sign the epoch log. `meta` is stored
    /// with it (the Kafka offset its heads came up to).
    pub fn close_epoch(
        &mut self,
        heads: &mut Heads,
        time_ms: u64,
        meta: &[(&str, u64)],
    ) -> Result<Option<Closed>> {
        let stopped_changed = {
            let tx = self.db.begin_read().map_err(|e| self.err(e))?;
            let t = tx.open_table(STOPPED).map_err(|e| self.err(e))?;
            t.len().map_err(|e| self.err(e))? as usize != heads.stopped().len()
        };
        if !heads.moved() && !stopped_changed {
            return Ok(None);
        }
        let epoch = self.log.size();
        let list = heads.heads();
        let rec = (!list.is_empty() && heads.moved())
            .then(|| EpochRecord::new(epoch, time_ms, &list))
            .transpose()?;
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            if rec.is_some() {
                let mut t = tx.open_table(HEADS).map_err(|e| self.err(e))?;
                t.insert(epoch, encode_heads(time_ms, &list)?.as_slice())
                    .map_err(|e| self.err(e))?;
                let mut notes = tx.open_table(NOTES).map_err(|e| self.err(e))?;
                let mut first = tx.open_table(FIRST).map_err(|e| self.err(e))?;
                for o in heads.moved_origins() {
                    let Some(h) = heads.get(o) else { continue };
                    notes
                        .insert((o, h.size), h.note.as_str())
                        .map_err(|e| self.err(e))?;
                    first.insert((o, h.size), epoch).map_err(|e| self.err(e))?;
                }
            }
            let mut stopped = tx.open_table(STOPPED).map_err(|e| self.err(e))?;
            for o in heads.stopped() {
                stopped
                    .insert(o.as_str(), "fork")
                    .map_err(|e| self.err(e))?;
            }
            let mut m = tx.open_table(META).map_err(|e| self.err(e))?;
            for (k, v) in meta {
                m.insert(*k, *v).map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))?;
        let Some(rec) = rec else {
            return Ok(None);
        };
        self.log.append_batch(&[rec.encode()])?;
        self.sign()?;
        heads.closed();
        Ok(Some(Closed {
            epoch,
            size: self.log.size(),
            root: self.log.root(),
            time_ms,
        }))
    }

    /// The epoch log.
    pub fn log(&self) -> &DurableLog {
        &self.log
    }

    /// The anchor directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The anchor's verifier key.
    pub fn public_key(&self) -> LogPublicKey {
        self.signer.public_key()
    }

    /// The signer (for the ledger, which the same key signs).
    pub fn signer(&self) -> &LogSigner {
        &self.signer
    }
}

/// Where a partition log's leaf was first anchored.
#[derive(Debug, Clone)]
pub struct Found {
    /// The epoch whose heads first cover the leaf.
    pub epoch: u64,
    /// Its record.
    pub record: EpochRecord,
    /// The partition's head in it.
    pub head: PartitionHead,
    /// Its index among the epoch's heads.
    pub head_index: u64,
    /// Inclusion proof of the head in the epoch's heads tree.
    pub head_proof: Vec<Hash>,
    /// The partition's signed checkpoint note at the head.
    pub note: String,
}

/// A reader beside a running anchor (for `prove` and queries).
pub struct EpochReader {
    db_path: PathBuf,
    log: DurableLog,
    db: redb::ReadOnlyDatabase,
}

impl std::fmt::Debug for EpochReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochReader")
            .field("db_path", &self.db_path)
            .finish_non_exhaustive()
    }
}

impl EpochReader {
    /// Open `anchor_dir` read-only.
    pub fn open(anchor_dir: &Path) -> Result<Self> {
        let db_path = anchor_dir.join("state.redb");
        if !db_path.exists() {
            return Err(Error::NotFound(format!(
                "{} has no anchor state: is anchoring on?",
                anchor_dir.display()
            )));
        }
        let db = builder().open_read_only(&db_path).map_err(|e| match e {
            // A writer that crashed leaves the file to be repaired, which
            // only a writer does.
            redb::DatabaseError::RepairAborted => Error::NotFound(format!(
                "{} was not closed cleanly (the anchor crashed): start the anchor \
                 (vitaltrail up or vitaltrail anchor) once to recover it",
                db_path.display()
            )),
            e => state_err(&db_path, e),
        })?;
        let log = DurableLog::open_read_only(epochs_dir(anchor_dir))?;
        Ok(EpochReader { db_path, log, db })
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        state_err(&self.db_path, e)
    }

    /// The epoch log.
    pub fn log(&self) -> &DurableLog {
        &self.log
    }

    /// The first epoch that holds leaf `leaf` of the log `origin`, with
    /// everything a bundle needs from it; `None` if no epoch holds it yet.
    pub fn find(&self, origin: &str, leaf: u64) -> Result<Option<Found>> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let first = tx.open_table(FIRST).map_err(|e| self.err(e))?;
        let Some(hit) = first
            .range((origin, leaf.saturating_add(1))..=(origin, u64::MAX))
            .map_err(|e| self.err(e))?
            .next()
        else {
            return Ok(None);
        };
        let (k, v) = hit.map_err(|e| self.err(e))?;
        let size = k.value().1;
        let epoch = v.value();
        // The epoch log may be behind the state by one epoch (a crash, or
        // an append in progress): not anchored yet.
        if epoch >= self.log.size() {
            return Ok(None);
        }
        let heads_t = tx.open_table(HEADS).map_err(|e| self.err(e))?;
        let raw = heads_t
            .get(epoch)
            .map_err(|e| self.err(e))?
            .ok_or_else(|| self.err(format!("no heads for epoch {epoch}")))?;
        let (time, heads) = decode_heads(&self.db_path, raw.value())?;
        let record = EpochRecord::new(epoch, time, &heads)?;
        let head_index = heads
            .iter()
            .position(|h| h.origin == origin)
            .ok_or_else(|| self.err(format!("epoch {epoch} does not hold {origin}")))?;
        let head = heads[head_index].clone();
        if head.size != size {
            return Err(self.err(format!("epoch {epoch} holds {origin} at another size")));
        }
        let tree = vitaltrail_core::anchor::heads_tree(&heads)?;
        let head_proof = tree.prove_inclusion(heads.len() as u64, head_index as u64)?;
        let notes = tx.open_table(NOTES).map_err(|e| self.err(e))?;
        let note = notes
            .get((origin, size))
            .map_err(|e| self.err(e))?
            .ok_or_else(|| self.err(format!("no note for {origin} at {size}")))?
            .value()
            .to_owned();
        Ok(Some(Found {
            epoch,
            record,
            head,
            head_index: head_index as u64,
            head_proof,
            note,
        }))
    }

    /// A stored counter (`None` if never set).
    pub fn meta(&self, key: &str) -> Result<Option<u64>> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(META).map_err(|e| self.err(e))?;
        Ok(t.get(key).map_err(|e| self.err(e))?.map(|v| v.value()))
    }

    /// The signed epoch log checkpoint at `size`.
    pub fn epoch_checkpoint(&self, size: u64) -> Result<Option<String>> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(EPOCH_NOTES).map_err(|e| self.err(e))?;
        Ok(t.get(size)
            .map_err(|e| self.err(e))?
            .map(|v| v.value().to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heads::TrustedKeys;
    use vitaltrail_bus::checkpoints::PublishedCheckpoint;
    use vitaltrail_core::{MemoryTree, SecretKey};

    fn anchor_signer() -> LogSigner {
        LogSigner::new(
            "vitaltrail.test/epochs",
            SecretKey::from_seed(&[7; 32]).unwrap(),
        )
        .unwrap()
    }

    fn log_signer(p: u32) -> LogSigner {
        LogSigner::new(
            &format!("vitaltrail.test/log/{p}"),
            SecretKey::from_seed(&[1; 32]).unwrap(),
        )
        .unwrap()
    }

    fn cp(p: u32, tree: &MemoryTree, from: u64) -> PublishedCheckpoint {
        let size = tree.size();
        let origin = format!("vitaltrail.test/log/{p}");
        PublishedCheckpoint {
            partition: p,
            origin: origin.clone(),
            size,
            time_ms: 0,
            note: Checkpoint {
                origin,
                size,
                root: tree.root(),
                extensions: vec![],
            }
            .sign(&log_signer(p))
            .unwrap(),
            from_size: from,
            consistency: if from > 0 && from < size {
                tree.prove_consistency(from, size)
                    .unwrap()
                    .iter()
                    .map(Hash::to_base64)
                    .collect()
            } else {
                vec![]
            },
        }
    }

    fn heads(dir: &Path, store: &EpochStore) -> Heads {
        let (held, stopped) = store.load().unwrap();
        Heads::new(
            TrustedKeys::new(
                dir,
                vec![log_signer(0).public_key(), log_signer(1).public_key()],
            ),
            held,
            stopped,
        )
    }

    #[test]
    fn epochs_find_the_first_head_covering_a_leaf_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let adir = dir.path().join("anchor");
        let mut store = EpochStore::open(&adir, anchor_signer()).unwrap();
        let mut h = heads(dir.path(), &store);
        let (mut t0, mut t1) = (MemoryTree::new(), MemoryTree::new());
        for i in 0..3u64 {
            t0.append(&i.to_be_bytes());
        }
        h.offer(&cp(0, &t0, 0));
        // Nothing moved in between: no epoch.
        let c = store.close_epoch(&mut h, 10, &[]).unwrap().unwrap();
        assert_eq!((c.epoch, c.size), (0, 1));
        assert!(store.close_epoch(&mut h, 11, &[]).unwrap().is_none());
        for i in 3..8u64 {
            t0.append(&i.to_be_bytes());
        }
        t1.append(b"x");
        h.offer(&cp(0, &t0, 3));
        h.offer(&cp(1, &t1, 0));
        store
            .close_epoch(&mut h, 12, &[("kafka_offset", 5)])
            .unwrap()
            .unwrap();
        drop(store);
        let store = EpochStore::open(&adir, anchor_signer()).unwrap();
        assert_eq!(store.meta("kafka_offset").unwrap(), Some(5));
        let (held, _) = store.load().unwrap();
        assert_eq!(held["vitaltrail.test/log/0"].size, 8);
        let r = EpochReader::open(&adir).unwrap();
        let f = r.find("vitaltrail.test/log/0", 2).unwrap().unwrap();
        assert_eq!((f.epoch, f.head.size), (0, 3));
        let f = r.find("vitaltrail.test/log/0", 3).unwrap().unwrap();
        assert_eq!((f.epoch, f.head.size, f.head_index), (1, 8, 0));
        f.record
            .verify_head(&f.head, f.head_index, &f.head_proof)
            .unwrap();
        assert!(r.find("vitaltrail.test/log/0", 8).unwrap().is_none());
        let f = r.find("vitaltrail.test/log/1", 0).unwrap().unwrap();
        assert_eq!((f.epoch, f.head_index), (1, 1));
        // The epoch log's checkpoints verify with the anchor key.
        let note = r.epoch_checkpoint(2).unwrap().unwrap();
        let epoch_cp = Checkpoint::open(&note, &anchor_signer().public_key()).unwrap();
        assert_eq!(epoch_cp.root, r.log().root_at(2).unwrap());
    }

    #[test]
    fn a_crash_between_storing_heads_and_appending_finishes_the_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let adir = dir.path().join("anchor");
        let mut store = EpochStore::open(&adir, anchor_signer()).unwrap();
        let mut h = heads(dir.path(), &store);
        let mut t0 = MemoryTree::new();
        t0.append(b"a");
        h.offer(&cp(0, &t0, 0));
        store.close_epoch(&mut h, 1, &[]).unwrap().unwrap();
        // Simulate the crash: heads of epoch 1 stored, nothing appended.
        t0.append(b"b");
        h.offer(&cp(0, &t0, 1));
        let list = h.heads();
        let tx = store.db.begin_write().unwrap();
        tx.open_table(HEADS)
            .unwrap()
            .insert(1, encode_heads(2, &list).unwrap().as_slice())
            .unwrap();
        tx.commit().unwrap();
        drop(store);
        let store = EpochStore::open(&adir, anchor_signer()).unwrap();
        assert_eq!(store.log().size(), 2);
        let want = EpochRecord::new(1, 2, &list).unwrap().encode();
        assert_eq!(store.log().leaf(1).unwrap(), want.to_vec());
        let r = EpochReader::open(&adir).unwrap();
        assert!(r.epoch_checkpoint(2).unwrap().is_some());
    }

    #[test]
    fn a_damaged_epoch_is_refused_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let adir = dir.path().join("anchor");
        let mut store = EpochStore::open(&adir, anchor_signer()).unwrap();
        let mut h = heads(dir.path(), &store);
        let mut t0 = MemoryTree::new();
        for k in 0..6u64 {
            t0.append(&k.to_be_bytes());
            h.offer(&cp(0, &t0, k));
            store.close_epoch(&mut h, k, &[]).unwrap().unwrap();
        }
        drop(store);
        let leaves = epochs_dir(&adir).join("leaves.dat");
        let mut b = std::fs::read(&leaves).unwrap();
        b[150] ^= 1;
        std::fs::write(&leaves, &b).unwrap();
        let e = EpochStore::open(&adir, anchor_signer()).unwrap_err();
        assert!(
            e.to_string().contains("corrupt") || e.to_string().contains("hash"),
            "{e}"
        );
    }
}
