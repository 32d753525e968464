//! The per-partition index of what the log holds for each device, in an
//! embedded redb database (`<partition>/index.redb`):
//!
//! | table | key | value |
//! |---|---|---|
//! | `windows` | BLAKE3(DID) | the device's anti-replay window ([`SeqWindow`], 136 bytes) |
//! | `seqs` | BLAKE3(DID) ‖ u64 BE seq | the reading's leaf index |
//! | `meta` | `"covered"` | the log size the index reflects |
//!
//! Memory is bounded: only the windows of the most recently active
//! [`WINDOW_CACHE`] devices are kept in memory; an idle device's window is
//! read back from disk when it sends again. What each log commit changes
//! (the windows it touched and the new seqs) is staged in memory and
//! written in one durable redb transaction at the next checkpoint, or once
//! [`STAGE_MAX`] seqs are staged; so the index costs one write a second,
//! not one per commit, and never the whole map. The log is the source of
//! truth: after a crash the index opens at its last durable state (redb
//! guarantees a consistent one) and the leaves past `covered` are scanned
//! back in, so nothing is lost.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use redb::{Database, Durability, ReadableDatabase as _, ReadableTable as _, TableDefinition};
use vitaltrail_core::{DidCache, envelope, leaf};

use crate::durable::DurableLog;
use crate::error::{Error, Result};
use crate::pipeline::SeqWindow;

const WINDOWS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("windows");
const SEQS: TableDefinition<&[u8; 40], u64> = TableDefinition::new("seqs");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// redb's page cache per partition. Its default (1 GiB) let a partition's
/// resident memory grow with the index, i.e. with every reading ever
/// logged; the accesses are to recent seqs of each device, so a small cache
/// serves them.
pub const DB_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// Windows kept in memory at most (about 200 bytes each).
pub const WINDOW_CACHE: usize = 100_000;

/// Seqs staged in memory at most before they are written out.
pub const STAGE_MAX: usize = 50_000;

fn did_key(did: &str) -> [u8; 32] {
    *blake3::hash(did.as_bytes()).as_bytes()
}

fn seq_key(did: &str, seq: u64) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..32].copy_from_slice(&did_key(did));
    k[32..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// The leaf index of `did`'s reading `seq` in the index of the partition
/// whose state is in `dir`, read beside a running attestor. Everything a
/// signed checkpoint covers is indexed; `None` if it is not (yet).
pub fn lookup(dir: &Path, did: &str, seq: u64) -> Result<Option<u64>> {
    let path = dir.join("index.redb");
    if !path.exists() {
        return Ok(None);
    }
    let db = redb::Builder::new()
        .set_cache_size(1024 * 1024)
        .set_concurrency_mode(redb::ConcurrencyMode::SingleWriter)
        .open_read_only(&path)
        .map_err(|e| match e {
            redb::DatabaseError::RepairAborted => db_err(
                &path,
                "not closed cleanly (the attestor crashed): start it once to recover the index",
            ),
            e => db_err(&path, e),
        })?;
    let tx = db.begin_read().map_err(|e| db_err(&path, e))?;
    let t = match tx.open_table(SEQS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(db_err(&path, e)),
    };
    Ok(t.get(&seq_key(did, seq))
        .map_err(|e| db_err(&path, e))?
        .map(|v| v.value()))
}

/// The index of one partition.
pub struct SeqIndex {
    path: PathBuf,
    db: Database,
    cache: lru::LruCache<String, SeqWindow>,
    /// What the log holds that redb does not yet: windows and seqs.
    staged_windows: HashMap<String, SeqWindow>,
    staged_seqs: HashMap<(String, u64), u64>,
    /// The log size the staged state reflects.
    covered: u64,
}

impl std::fmt::Debug for SeqIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeqIndex")
            .field("covered", &self.covered)
            .field("cached", &self.cache.len())
            .finish_non_exhaustive()
    }
}

fn db_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::State {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

/// One reading the log now holds.
#[derive(Debug, Clone)]
pub struct Logged {
    /// Its device.
    pub did: String,
    /// Its seq.
    pub seq: u64,
    /// Its leaf index.
    pub index: u64,
}

impl SeqIndex {
    /// Open (or create) the index in `dir` and bring it up to `log`'s size,
    /// keeping at most [`WINDOW_CACHE`] windows in memory.
    pub fn open(dir: &Path, log: &DurableLog, dids: &mut DidCache) -> Result<Self> {
        Self::open_with(dir, log, dids, WINDOW_CACHE)
    }

    /// [`SeqIndex::open`], keeping at most `cache` windows in memory.
    pub fn open_with(
        dir: &Path,
        log: &DurableLog,
        dids: &mut DidCache,
        cache: usize,
    ) -> Result<Self> {
        let path = dir.join("index.redb");
        let db = redb::Builder::new()
            .set_cache_size(DB_CACHE_BYTES)
            // `prove` reads the index beside the running attestor.
            .set_concurrency_mode(redb::ConcurrencyMode::SingleWriter)
            .create(&path)
            .map_err(|e| db_err(&path, e))?;
        let covered = {
            let tx = db.begin_write().map_err(|e| db_err(&path, e))?;
            let covered = {
                // Create the tables on first use.
                tx.open_table(WINDOWS).map_err(|e| db_err(&path, e))?;
                tx.open_table(SEQS).map_err(|e| db_err(&path, e))?;
                let meta = tx.open_table(META).map_err(|e| db_err(&path, e))?;
                meta.get("covered")
                    .map_err(|e| db_err(&path, e))?
                    .map_or(0, |v| v.value())
            };
            tx.commit().map_err(|e| db_err(&path, e))?;
            covered
        };
        if covered > log.size() {
            return Err(db_err(
                &path,
                format!(
                    "the index covers {covered} leaves but the log holds {}: \
                     the log is older than its index (restored from a backup?)",
                    log.size()
                ),
            ));
        }
        let mut idx = SeqIndex {
            path,
            db,
            cache: lru::LruCache::new(NonZeroUsize::new(cache).unwrap_or(NonZeroUsize::MIN)),
            staged_windows: HashMap::new(),
            staged_seqs: HashMap::new(),
            covered,
        };
        // Scan what the index has not seen yet, in chunks.
        let mut from = covered;
        while from < log.size() {
            let to = (from + 10_000).min(log.size());
            let mut windows: HashMap<String, SeqWindow> = HashMap::new();
            let mut logged = Vec::new();
            for i in from..to {
                let bytes = log.leaf(i)?;
                let l = leaf::decode(&bytes)?;
                let r = envelope::decode_verified_upstream_with(l.envelope, |s| dids.resolve(s))?;
                let did = r.did.as_str().to_owned();
                if !windows.contains_key(&did)
                    && let Some(w) = idx.window(&did)?
                {
                    windows.insert(did.clone(), w);
                }
                match windows.get_mut(&did) {
                    Some(w) => w.insert(r.seq),
                    None => {
                        windows.insert(did.clone(), SeqWindow::new(r.seq));
                    }
                }
                logged.push(Logged {
                    did,
                    seq: r.seq,
                    index: i,
                });
            }
            idx.commit(&windows, &logged, to, true)?;
            from = to;
        }
        Ok(idx)
    }

    /// The log size the index reflects.
    pub fn covered(&self) -> u64 {
        self.covered
    }

    /// Devices whose windows are in memory.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// A device's window (from memory, else from disk), if it ever sent.
    pub fn window(&mut self, did: &str) -> Result<Option<SeqWindow>> {
        if let Some(w) = self.cache.get(did) {
            return Ok(Some(w.clone()));
        }
        if let Some(w) = self.staged_windows.get(did) {
            let w = w.clone();
            self.cache.put(did.to_owned(), w.clone());
            return Ok(Some(w));
        }
        let tx = self.db.begin_read().map_err(|e| db_err(&self.path, e))?;
        let t = tx.open_table(WINDOWS).map_err(|e| db_err(&self.path, e))?;
        let Some(v) = t.get(&did_key(did)).map_err(|e| db_err(&self.path, e))? else {
            return Ok(None);
        };
        let w = SeqWindow::from_bytes(v.value())
            .ok_or_else(|| db_err(&self.path, "a stored window does not decode"))?;
        self.cache.put(did.to_owned(), w.clone());
        Ok(Some(w))
    }

    /// The leaf index of `did`'s reading `seq`, if it is logged.
    pub fn index_of(&self, did: &str, seq: u64) -> Result<Option<u64>> {
        if let Some(&i) = self.staged_seqs.get(&(did.to_owned(), seq)) {
            return Ok(Some(i));
        }
        let tx = self.db.begin_read().map_err(|e| db_err(&self.path, e))?;
        let t = tx.open_table(SEQS).map_err(|e| db_err(&self.path, e))?;
        Ok(t.get(&seq_key(did, seq))
            .map_err(|e| db_err(&self.path, e))?
            .map(|v| v.value()))
    }

    /// Record what a log commit appended: the windows it changed and the
    /// readings, the index then covering `covered` leaves. Staged in memory;
    /// `durable` (or a full stage) writes everything out and fsyncs.
    pub fn commit(
        &mut self,
        windows: &HashMap<String, SeqWindow>,
        logged: &[Logged],
        covered: u64,
        durable: bool,
    ) -> Result<()> {
        for (did, w) in windows {
            self.cache.put(did.clone(), w.clone());
            self.staged_windows.insert(did.clone(), w.clone());
        }
        for l in logged {
            self.staged_seqs.insert((l.did.clone(), l.seq), l.index);
        }
        self.covered = covered;
        if durable || self.staged_seqs.len() >= STAGE_MAX {
            self.write_out()?;
        }
        Ok(())
    }

    /// Write what is staged in one durable transaction.
    fn write_out(&mut self) -> Result<()> {
        let p = &self.path;
        let mut tx = self.db.begin_write().map_err(|e| db_err(p, e))?;
        tx.set_durability(Durability::Immediate)
            .map_err(|e| db_err(p, e))?;
        {
            let mut wt = tx.open_table(WINDOWS).map_err(|e| db_err(p, e))?;
            for (did, w) in &self.staged_windows {
                wt.insert(&did_key(did), w.to_bytes().as_slice())
                    .map_err(|e| db_err(p, e))?;
            }
            let mut st = tx.open_table(SEQS).map_err(|e| db_err(p, e))?;
            for ((did, seq), index) in &self.staged_seqs {
                st.insert(&seq_key(did, *seq), *index)
                    .map_err(|e| db_err(p, e))?;
            }
            let mut mt = tx.open_table(META).map_err(|e| db_err(p, e))?;
            mt.insert("covered", self.covered)
                .map_err(|e| db_err(p, e))?;
        }
        tx.commit().map_err(|e| db_err(p, e))?;
        self.staged_windows.clear();
        self.staged_seqs.clear();
        Ok(())
    }

    /// Write out and make durable everything staged.
    pub fn sync(&mut self) -> Result<()> {
        self.write_out()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vitaltrail_core::SecretKey;
    use vitaltrail_core::envelope::{Measurement, UnsignedReading, sign};

    fn env(k: &SecretKey, seq: u64) -> Vec<u8> {
        sign(
            k,
            &UnsignedReading {
                seq,
                time: 1_800_000_000_000,
                measurements: vec![Measurement {
                    code: "8867-4".into(),
                    value: 60.0,
                    unit: "/min".into(),
                }],
                meta: None,
            },
        )
        .unwrap()
    }

    #[test]
    fn rebuilds_what_a_crash_lost_and_finds_every_seq() {
        let d = tempfile::tempdir().unwrap();
        let mut log = DurableLog::open(d.path()).unwrap();
        let a = SecretKey::from_seed(&[1; 32]).unwrap();
        let b = SecretKey::from_seed(&[2; 32]).unwrap();
        let leaves: Vec<Vec<u8>> = (1..=30u64)
            .map(|s| leaf::encode(5, &env(if s % 2 == 0 { &a } else { &b }, s)))
            .collect();
        log.append_batch(&leaves).unwrap();
        let mut dids = DidCache::default();
        {
            let idx = SeqIndex::open(d.path(), &log, &mut dids).unwrap();
            assert_eq!(idx.covered(), 30);
        }
        // More leaves the index never saw (a crash before its commit).
        let more: Vec<Vec<u8>> = (31..=40u64).map(|s| leaf::encode(6, &env(&a, s))).collect();
        log.append_batch(&more).unwrap();
        let mut idx = SeqIndex::open(d.path(), &log, &mut dids).unwrap();
        assert_eq!(idx.covered(), 40);
        let (da, db) = (a.did().to_string(), b.did().to_string());
        assert_eq!(idx.index_of(&da, 2).unwrap(), Some(1));
        assert_eq!(idx.index_of(&db, 29).unwrap(), Some(28));
        assert_eq!(idx.index_of(&da, 40).unwrap(), Some(39));
        assert_eq!(idx.index_of(&da, 41).unwrap(), None);
        assert_eq!(idx.index_of(&db, 2).unwrap(), None);
        assert_eq!(idx.window(&da).unwrap().unwrap().max(), 40);
        assert_eq!(idx.window(&db).unwrap().unwrap().max(), 29);
        assert!(idx.window("did:key:zNobody").unwrap().is_none());
        drop(idx);
        // Memory is bounded: with room for 1 window, the idle device's
        // window is evicted, and read back from disk when it sends again.
        let mut small = SeqIndex::open_with(d.path(), &log, &mut dids, 1).unwrap();
        assert_eq!(small.window(&da).unwrap().unwrap().max(), 40);
        assert_eq!(small.window(&db).unwrap().unwrap().max(), 29);
        assert_eq!(small.cached(), 1);
        let mut w = small.window(&da).unwrap().unwrap();
        w.insert(41);
        let logged = [Logged {
            did: da.clone(),
            seq: 41,
            index: 40,
        }];
        small
            .commit(&HashMap::from([(da.clone(), w)]), &logged, 41, false)
            .unwrap();
        assert_eq!(small.window(&db).unwrap().unwrap().max(), 29);
        assert_eq!(
            small.window(&da).unwrap().unwrap().max(),
            41,
            "read back from disk"
        );
        assert_eq!(small.cached(), 1);
        drop(small);
        // A log older than its index is refused, never silently used.
        let older = tempfile::tempdir().unwrap();
        let mut small = DurableLog::open(older.path()).unwrap();
        small.append_batch(&leaves[..3]).unwrap();
        std::fs::copy(d.path().join("index.redb"), older.path().join("index.redb")).unwrap();
        assert!(SeqIndex::open(older.path(), &small, &mut dids).is_err());
    }
}
