//! # vitaltrail-log
//!
//! A durable, file-backed Merkle log: each attestor partition's log and
//! the anchor's epoch log.
//!
//! # Files (in one directory)
//!
//! | file | content |
//! |---|---|
//! | `leaves.dat` | records `u32 BE length ‖ leaf bytes`, appended |
//! | `leaves.idx` | `u64 BE` offset of each record in `leaves.dat` |
//! | `hashes.dat` | the stored hashes (32 bytes each) in the order of [`merkle::stored_hash_index`] |
//! | `HEAD` | two 64-byte commit slots: `u64 generation ‖ u64 size ‖ root ‖ u64 cursor ‖ BLAKE3(first 56 bytes)[..8]` (all big-endian; cursor `u64::MAX` = none) |
//! | `LOCK` | held with an exclusive OS lock while the log is open for writing |
//! | `checkpoint` | the latest signed checkpoint note (written atomically) |
//!
//! # Commit protocol
//!
//! An append writes the records, offsets and stored hashes past the committed
//! end of each file, `fdatasync`s the three files, and only then writes the
//! next `HEAD` slot (alternating slots, so a torn slot never destroys the
//! previous commit) and `fdatasync`s it. A batch is committed when the `HEAD`
//! slot naming its size is durable; [`DurableLog::append_batch`] returns only
//! after that.
//!
//! # Recovery
//!
//! [`DurableLog::open`] reads the newest valid `HEAD` slot, cuts every file
//! back to the committed size (a crash may leave a torn or uncommitted tail;
//! it is discarded), and checks that the stored hashes still produce the
//! committed root. Committed data that is missing is reported as
//! [`Error::Corrupt`], never silently dropped.
//!
//! # Tampering
//!
//! Every leaf read back is re-hashed and compared with its stored hash, and
//! stored hashes are bound to the root signed in checkpoints, so an altered
//! leaf or hash makes reads or proofs fail.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vitaltrail_core::merkle::{self, Frontier, Hash, HashReader};

mod error;

pub use error::{Error, Result};

const HEAD_SLOT: u64 = 64;
/// Largest leaf accepted (an envelope plus the leaf header, with headroom).
pub const MAX_LEAF_BYTES: usize = 1 << 20;

/// The committed state named by a `HEAD` slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    generation: u64,
    size: u64,
    root: Hash,
    cursor: Option<u64>,
}

impl Head {
    fn encode(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[..8].copy_from_slice(&self.generation.to_be_bytes());
        b[8..16].copy_from_slice(&self.size.to_be_bytes());
        b[16..48].copy_from_slice(&self.root.0);
        b[48..56].copy_from_slice(&self.cursor.unwrap_or(u64::MAX).to_be_bytes());
        let sum = blake3::hash(&b[..56]);
        b[56..].copy_from_slice(&sum.as_bytes()[..8]);
        b
    }

    fn decode(b: &[u8]) -> Option<Head> {
        if b.len() != 64 || blake3::hash(&b[..56]).as_bytes()[..8] != b[56..] {
            return None;
        }
        let cursor = u64::from_be_bytes(b[48..56].try_into().ok()?);
        Some(Head {
            generation: u64::from_be_bytes(b[..8].try_into().ok()?),
            size: u64::from_be_bytes(b[8..16].try_into().ok()?),
            root: Hash(b[16..48].try_into().ok()?),
            cursor: (cursor != u64::MAX).then_some(cursor),
        })
    }
}

/// What an append committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Index of the first leaf of the batch.
    pub first_index: u64,
    /// The leaf hashes of the batch, in order.
    pub leaf_hashes: Vec<Hash>,
    /// Tree size after the batch.
    pub size: u64,
    /// Root after the batch.
    pub root: Hash,
}

/// A file-backed, crash-safe Merkle log (see the module docs).
#[derive(Debug)]
pub struct DurableLog {
    dir: PathBuf,
    leaves: File,
    index: File,
    hashes: File,
    head_file: File,
    _lock: File,
    head: Head,
    frontier: Frontier,
    leaves_len: u64,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io("open", path))
}

fn read_at(f: &File, path: &Path, buf: &mut [u8], at: u64) -> Result<()> {
    f.read_exact_at(buf, at).map_err(|e| {
        if e.kind() == ErrorKind::UnexpectedEof {
            Error::Corrupt {
                path: path.to_owned(),
                detail: format!("short read of {} bytes at offset {at}", buf.len()),
            }
        } else {
            Error::Io {
                op: "read",
                path: path.to_owned(),
                source: e,
            }
        }
    })
}

/// `fsync` a directory, making renames and creations in it durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync directory", dir))
}

impl DurableLog {
    /// Open (or create) the log in `dir`, repairing an uncommitted tail.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_owned();
        std::fs::create_dir_all(&dir).map_err(io("create directory", &dir))?;
        let lock = open_rw(&dir.join("LOCK"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(Error::Locked(dir)),
            Err(std::fs::TryLockError::Error(e)) => return Err(io("lock", &dir)(e)),
        }
        let leaves = open_rw(&dir.join("leaves.dat"))?;
        let index = open_rw(&dir.join("leaves.idx"))?;
        let hashes = open_rw(&dir.join("hashes.dat"))?;
        let head_file = open_rw(&dir.join("HEAD"))?;
        sync_dir(&dir)?;

        let mut slots = [0u8; 128];
        let head_len = head_file.metadata().map_err(io("stat", &dir))?.len();
        let n = head_len.min(128) as usize;
        head_file
            .read_exact_at(&mut slots[..n], 0)
            .map_err(io("read", &dir.join("HEAD")))?;
        let valid = [&slots[..64], &slots[64..]]
            .iter()
            .filter_map(|s| Head::decode(s))
            .max_by_key(|h| h.generation);
        let empty = Head {
            generation: 0,
            size: 0,
            root: merkle::empty_root(),
            cursor: None,
        };
        let head = match valid {
            Some(h) => h,
            None => {
                // A new log gets a generation-0 record before anything else,
                // so "no valid record" is legitimate only for a directory in
                // which nothing was ever written.
                let data_len = [&leaves, &index, &hashes]
                    .iter()
                    .map(|f| f.metadata().map(|m| m.len()).unwrap_or(u64::MAX))
                    .sum::<u64>();
                if head_len != 0 || data_len != 0 {
                    return Err(Error::Corrupt {
                        path: dir,
                        detail: "HEAD holds no valid commit record; refusing to guess the size"
                            .into(),
                    });
                }
                head_file
                    .write_all_at(&empty.encode(), 0)
                    .and_then(|_| head_file.sync_all())
                    .map_err(io("write", &dir.join("HEAD")))?;
                sync_dir(&dir)?;
                empty
            }
        };

        let mut log = DurableLog {
            leaves,
            index,
            hashes,
            head_file,
            _lock: lock,
            head,
            frontier: Frontier::new(),
            leaves_len: 0,
            dir,
        };
        log.recover()?;
        Ok(log)
    }

    /// Open a log for reading while its writer may be running: no lock, no
    /// repair. It sees the state committed when it was opened.
    pub fn open_read_only(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_owned();
        let ro = |name: &str| -> Result<File> {
            let p = dir.join(name);
            File::open(&p).map_err(io("open", &p))
        };
        let head_file = ro("HEAD")?;
        let mut slots = [0u8; 128];
        let n = head_file
            .metadata()
            .map_err(io("stat", &dir))?
            .len()
            .min(128) as usize;
        head_file
            .read_exact_at(&mut slots[..n], 0)
            .map_err(io("read", &dir.join("HEAD")))?;
        let head = [&slots[..64], &slots[64..]]
            .iter()
            .filter_map(|s| Head::decode(s))
            .max_by_key(|h| h.generation)
            .ok_or_else(|| Error::Corrupt {
                path: dir.clone(),
                detail: "HEAD holds no valid commit record".into(),
            })?;
        let mut log = DurableLog {
            leaves: ro("leaves.dat")?,
            index: ro("leaves.idx")?,
            hashes: ro("hashes.dat")?,
            head_file,
            _lock: ro("HEAD")?,
            head,
            frontier: Frontier::new(),
            leaves_len: u64::MAX,
            dir,
        };
        log.frontier = Frontier::load(head.size, &log)?;
        if log.frontier.root() != head.root {
            return Err(log.corrupt("stored hashes do not produce the committed root"));
        }
        Ok(log)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn corrupt(&self, detail: impl Into<String>) -> Error {
        Error::Corrupt {
            path: self.dir.clone(),
            detail: detail.into(),
        }
    }

    fn recover(&mut self) -> Result<()> {
        let size = self.head.size;
        let idx_want = size * 8;
        let hashes_want = merkle::stored_hash_count(size) * 32;
        let len = |f: &File, p: PathBuf| -> Result<u64> {
            Ok(f.metadata().map_err(io("stat", &p))?.len())
        };
        let idx_len = len(&self.index, self.path("leaves.idx"))?;
        let hashes_len = len(&self.hashes, self.path("hashes.dat"))?;
        let leaves_len = len(&self.leaves, self.path("leaves.dat"))?;
        if idx_len < idx_want || hashes_len < hashes_want {
            return Err(self.corrupt(format!(
                "HEAD commits {size} leaves but the index or hash file is shorter"
            )));
        }
        let leaves_want = if size == 0 {
            0
        } else {
            let (off, len) = self.record_location(size - 1)?;
            off + 4 + len
        };
        if leaves_len < leaves_want {
            return Err(self.corrupt(format!(
                "HEAD commits {size} leaves but leaves.dat is {leaves_len} bytes, expected {leaves_want}"
            )));
        }
        // Discard any uncommitted tail.
        for (f, have, want, name) in [
            (&self.index, idx_len, idx_want, "leaves.idx"),
            (&self.hashes, hashes_len, hashes_want, "hashes.dat"),
            (&self.leaves, leaves_len, leaves_want, "leaves.dat"),
        ] {
            if have > want {
                let p = self.dir.join(name);
                f.set_len(want).map_err(io("truncate", &p))?;
                f.sync_all().map_err(io("fsync", &p))?;
            }
        }
        self.leaves_len = leaves_want;
        self.frontier = Frontier::load(size, self)?;
        if self.frontier.root() != self.head.root {
            return Err(self.corrupt("stored hashes do not produce the committed root"));
        }
        if size > 0 {
            // Cheap end-to-end check of the last record against its hash.
            self.leaf(size - 1)?;
        }
        Ok(())
    }

    fn record_location(&self, n: u64) -> Result<(u64, u64)> {
        let mut b = [0u8; 8];
        read_at(&self.index, &self.path("leaves.idx"), &mut b, n * 8)?;
        let off = u64::from_be_bytes(b);
        let mut l = [0u8; 4];
        read_at(&self.leaves, &self.path("leaves.dat"), &mut l, off)?;
        Ok((off, u64::from(u32::from_be_bytes(l))))
    }

    /// Number of committed leaves.
    pub fn size(&self) -> u64 {
        self.head.size
    }

    /// The committed root.
    pub fn root(&self) -> Hash {
        self.head.root
    }

    /// The directory holding the log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The input cursor committed with the last append, if any.
    pub fn cursor(&self) -> Option<u64> {
        self.head.cursor
    }

    /// Append leaves and make them durable. Returns after the commit.
    pub fn append_batch<L: AsRef<[u8]>>(&mut self, leaves: &[L]) -> Result<Appended> {
        self.append_batch_at(leaves, self.head.cursor)
    }

    /// Append leaves and move the input cursor in one durable commit. A batch
    /// with no leaves still commits a changed cursor.
    pub fn append_batch_at<L: AsRef<[u8]>>(
        &mut self,
        leaves: &[L],
        cursor: Option<u64>,
    ) -> Result<Appended> {
        let first_index = self.head.size;
        if leaves.is_empty() && cursor != self.head.cursor {
            let head = Head {
                generation: self.head.generation + 1,
                cursor,
                ..self.head
            };
            self.write_head(head)?;
        }
        if leaves.is_empty() {
            return Ok(Appended {
                first_index,
                leaf_hashes: vec![],
                size: self.head.size,
                root: self.head.root,
            });
        }
        let total: usize = leaves.iter().map(|l| l.as_ref().len() + 4).sum();
        let mut rec = Vec::with_capacity(total);
        let mut idx = Vec::with_capacity(leaves.len() * 8);
        let mut stored = Vec::with_capacity(leaves.len() * 2);
        let mut leaf_hashes = Vec::with_capacity(leaves.len());
        let mut frontier = self.frontier.clone();
        for l in leaves {
            let l = l.as_ref();
            if l.len() > MAX_LEAF_BYTES {
                return Err(vitaltrail_core::Error::Oversize {
                    len: l.len(),
                    max: MAX_LEAF_BYTES,
                }
                .into());
            }
            idx.extend_from_slice(&(self.leaves_len + rec.len() as u64).to_be_bytes());
            rec.extend_from_slice(&(l.len() as u32).to_be_bytes());
            rec.extend_from_slice(l);
            let h = merkle::leaf_hash(l);
            leaf_hashes.push(h);
            frontier.append(h, &mut stored);
        }
        let hash_bytes: Vec<u8> = stored.iter().flat_map(|h| h.0).collect();
        let old = self.head.size;
        self.leaves
            .write_all_at(&rec, self.leaves_len)
            .map_err(io("write", &self.path("leaves.dat")))?;
        self.index
            .write_all_at(&idx, old * 8)
            .map_err(io("write", &self.path("leaves.idx")))?;
        self.hashes
            .write_all_at(&hash_bytes, merkle::stored_hash_count(old) * 32)
            .map_err(io("write", &self.path("hashes.dat")))?;
        // The three data files are flushed concurrently (a commit waits for
        // the slowest, not the sum); HEAD is written only after all three.
        let files = [
            (&self.leaves, "leaves.dat"),
            (&self.index, "leaves.idx"),
            (&self.hashes, "hashes.dat"),
        ];
        std::thread::scope(|s| {
            let others: Vec<_> = files[1..]
                .iter()
                .map(|(f, name)| s.spawn(move || f.sync_data().map_err(|e| (*name, e))))
                .collect();
            let first = files[0].0.sync_data().map_err(|e| (files[0].1, e));
            others.into_iter().fold(first, |acc, h| {
                let r = h
                    .join()
                    .unwrap_or_else(|_| Err(("fsync thread", std::io::Error::other("panicked"))));
                acc.and(r)
            })
        })
        .map_err(|(name, e)| io("fsync", &self.dir.join(name))(e))?;
        let head = Head {
            generation: self.head.generation + 1,
            size: frontier.size(),
            root: frontier.root(),
            cursor,
        };
        self.write_head(head)?;
        self.frontier = frontier;
        self.leaves_len += rec.len() as u64;
        Ok(Appended {
            first_index,
            leaf_hashes,
            size: head.size,
            root: head.root,
        })
    }

    fn write_head(&mut self, head: Head) -> Result<()> {
        let slot = (head.generation % 2) * HEAD_SLOT;
        self.head_file
            .write_all_at(&head.encode(), slot)
            .map_err(io("write", &self.path("HEAD")))?;
        self.head_file
            .sync_data()
            .map_err(io("fsync", &self.path("HEAD")))?;
        self.head = head;
        Ok(())
    }

    /// Read leaf `n`, checking it against its stored hash.
    pub fn leaf(&self, n: u64) -> Result<Vec<u8>> {
        if n >= self.size() {
            return Err(vitaltrail_core::Error::InvalidProofRequest(format!(
                "no leaf {n}: the log has {} leaves",
                self.size()
            ))
            .into());
        }
        let (off, len) = self.record_location(n)?;
        if len as usize > MAX_LEAF_BYTES
            || off
                .checked_add(4 + len)
                .is_none_or(|end| end > self.leaves_len)
        {
            return Err(self.corrupt(format!("record {n} has an impossible length")));
        }
        let mut buf = vec![0u8; len as usize];
        read_at(&self.leaves, &self.path("leaves.dat"), &mut buf, off + 4)?;
        let stored = self.read_hashes(&[merkle::stored_hash_index(0, n)])?;
        if merkle::leaf_hash(&buf) != stored[0] {
            return Err(self.corrupt(format!("leaf {n} does not match its stored hash")));
        }
        Ok(buf)
    }

    /// Hash of leaf `n`.
    pub fn leaf_hash(&self, n: u64) -> Result<Hash> {
        if n >= self.size() {
            return Err(vitaltrail_core::Error::InvalidProofRequest(format!("no leaf {n}")).into());
        }
        Ok(self.read_hashes(&[merkle::stored_hash_index(0, n)])?[0])
    }

    /// Root of the first `size` leaves.
    pub fn root_at(&self, size: u64) -> Result<Hash> {
        self.check_size(size)?;
        merkle::tree_hash(size, self)
    }

    /// Inclusion proof of leaf `index` in the tree of `size` leaves.
    pub fn prove_inclusion(&self, size: u64, index: u64) -> Result<Vec<Hash>> {
        self.check_size(size)?;
        merkle::prove_inclusion(size, index, self)
    }

    /// Inclusion proofs of many leaves in the tree of `size` leaves,
    /// reading each stored hash once (the proofs of leaves appended
    /// together share most of their paths).
    pub fn prove_inclusion_many(&self, size: u64, indexes: &[u64]) -> Result<Vec<Vec<Hash>>> {
        self.check_size(size)?;
        let memo = Memo {
            log: self,
            seen: std::cell::RefCell::new(std::collections::HashMap::new()),
        };
        indexes
            .iter()
            .map(|&i| merkle::prove_inclusion(size, i, &memo))
            .collect()
    }

    /// Consistency proof from `old` to `new` leaves.
    pub fn prove_consistency(&self, old: u64, new: u64) -> Result<Vec<Hash>> {
        self.check_size(new)?;
        merkle::prove_consistency(old, new, self)
    }

    fn check_size(&self, size: u64) -> Result<()> {
        if size > self.size() {
            return Err(vitaltrail_core::Error::InvalidProofRequest(format!(
                "size {size} is beyond the log size {}",
                self.size()
            ))
            .into());
        }
        Ok(())
    }

    /// Store `note` as the latest checkpoint (atomically: temp file, fsync,
    /// rename, fsync directory).
    pub fn store_checkpoint(&self, note: &str) -> Result<()> {
        write_atomic(&self.dir, "checkpoint", note.as_bytes())
    }

    /// The latest stored checkpoint note, if any.
    pub fn latest_checkpoint(&self) -> Result<Option<String>> {
        let p = self.path("checkpoint");
        match std::fs::read_to_string(&p) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("read", &p)(e)),
        }
    }
}

/// Write `name` in `dir` atomically and durably.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let dst = dir.join(name);
    let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(bytes).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("fsync", &tmp))?;
    std::fs::rename(&tmp, &dst).map_err(io("rename", &dst))?;
    sync_dir(dir)
}

/// A [`HashReader`] that reads each stored hash of a log at most once.
struct Memo<'a> {
    log: &'a DurableLog,
    seen: std::cell::RefCell<std::collections::HashMap<u64, Hash>>,
}

impl HashReader for Memo<'_> {
    type Error = Error;

    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>> {
        let missing: Vec<u64> = {
            let seen = self.seen.borrow();
            indexes
                .iter()
                .copied()
                .filter(|i| !seen.contains_key(i))
                .collect()
        };
        if !missing.is_empty() {
            let got = self.log.read_hashes(&missing)?;
            self.seen.borrow_mut().extend(missing.into_iter().zip(got));
        }
        let seen = self.seen.borrow();
        indexes
            .iter()
            .map(|i| {
                seen.get(i)
                    .copied()
                    .ok_or_else(|| self.log.corrupt(format!("stored hash {i} vanished")))
            })
            .collect()
    }
}

impl HashReader for DurableLog {
    type Error = Error;

    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>> {
        let limit = merkle::stored_hash_count(self.head.size.max(self.frontier.size()));
        let path = self.path("hashes.dat");
        indexes
            .iter()
            .map(|&i| {
                if i >= limit {
                    return Err(self.corrupt(format!("stored hash {i} is past the end")));
                }
                let mut b = [0u8; 32];
                read_at(&self.hashes, &path, &mut b, i * 32)?;
                Ok(Hash(b))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vitaltrail_core::MemoryTree;

    fn leaf(i: u64) -> Vec<u8> {
        format!("leaf number {i} {}", "x".repeat((i % 50) as usize)).into_bytes()
    }

    #[test]
    fn append_reopen_same_root_and_proofs() {
        let dir = tempfile::tempdir().unwrap();
        let mut mem = MemoryTree::new();
        {
            let mut log = DurableLog::open(dir.path()).unwrap();
            assert_eq!(log.size(), 0);
            assert_eq!(log.root(), merkle::empty_root());
            for batch in 0..20u64 {
                let ls: Vec<Vec<u8>> = (batch * 13..batch * 13 + 13).map(leaf).collect();
                let a = log.append_batch(&ls).unwrap();
                for l in &ls {
                    mem.append(l);
                }
                assert_eq!(a.first_index, batch * 13);
                assert_eq!(a.root, mem.root());
            }
        }
        let log = DurableLog::open(dir.path()).unwrap();
        assert_eq!(log.size(), 260);
        assert_eq!(log.root(), mem.root());
        for i in [0u64, 1, 100, 259] {
            assert_eq!(log.leaf(i).unwrap(), leaf(i));
            let p = log.prove_inclusion(260, i).unwrap();
            assert_eq!(p, mem.prove_inclusion(260, i).unwrap());
            merkle::verify_inclusion(&merkle::leaf_hash(&leaf(i)), i, 260, &p, &log.root())
                .unwrap();
        }
        let c = log.prove_consistency(100, 260).unwrap();
        merkle::verify_consistency(100, 260, &log.root_at(100).unwrap(), &log.root(), &c).unwrap();
    }

    #[test]
    fn cursor_is_committed_with_the_leaves() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = DurableLog::open(dir.path()).unwrap();
            assert_eq!(log.cursor(), None);
            log.append_batch_at(&[leaf(0)], Some(41)).unwrap();
            log.append_batch_at::<Vec<u8>>(&[], Some(45)).unwrap();
            assert_eq!(log.size(), 1);
        }
        let mut log = DurableLog::open(dir.path()).unwrap();
        assert_eq!(log.cursor(), Some(45));
        log.append_batch(&[leaf(1)]).unwrap();
        drop(log);
        let log = DurableLog::open_read_only(dir.path()).unwrap();
        assert_eq!((log.size(), log.cursor()), (2, Some(45)));
    }

    #[test]
    fn second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _a = DurableLog::open(dir.path()).unwrap();
        assert!(matches!(
            DurableLog::open(dir.path()),
            Err(Error::Locked(_))
        ));
    }

    #[test]
    fn torn_tails_are_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let root;
        {
            let mut log = DurableLog::open(dir.path()).unwrap();
            log.append_batch(&(0..10).map(leaf).collect::<Vec<_>>())
                .unwrap();
            root = log.root();
        }
        // Simulate a crash mid-append: garbage past the committed end of
        // every file, and a torn write into the next HEAD slot.
        for (name, junk) in [
            ("leaves.dat", 77usize),
            ("leaves.idx", 5),
            ("hashes.dat", 40),
        ] {
            let mut f = OpenOptions::new()
                .append(true)
                .open(dir.path().join(name))
                .unwrap();
            f.write_all(&vec![0xab; junk]).unwrap();
        }
        let head = OpenOptions::new()
            .write(true)
            .open(dir.path().join("HEAD"))
            .unwrap();
        head.write_all_at(&[0x55; 30], 0).unwrap(); // generation 1 wrote slot 1; tear slot 0
        let mut log = DurableLog::open(dir.path()).unwrap();
        assert_eq!(log.size(), 10);
        assert_eq!(log.root(), root);
        // And it keeps working after the repair.
        log.append_batch(&[leaf(10)]).unwrap();
        drop(log);
        let log = DurableLog::open(dir.path()).unwrap();
        assert_eq!(log.size(), 11);
        assert_eq!(log.leaf(10).unwrap(), leaf(10));
    }

    #[test]
    fn tampering_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = DurableLog::open(dir.path()).unwrap();
            log.append_batch(&(0..8).map(leaf).collect::<Vec<_>>())
                .unwrap();
        }
        // Flip a byte inside leaf 2's data.
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.path().join("leaves.dat"))
            .unwrap();
        let mut b = [0u8; 1];
        let at = (4 + leaf(0).len() + 4 + leaf(1).len() + 4 + 3) as u64;
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 1], at).unwrap();
        let log = DurableLog::open(dir.path()).unwrap();
        assert!(matches!(log.leaf(2), Err(Error::Corrupt { .. })));
        assert!(log.leaf(3).is_ok());
        drop(log);
        // Flip a byte of a stored hash that the root depends on.
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.path().join("hashes.dat"))
            .unwrap();
        f.write_all_at(&[0xff], merkle::stored_hash_index(3, 0) * 32)
            .unwrap();
        assert!(matches!(
            DurableLog::open(dir.path()),
            Err(Error::Corrupt { .. })
        ));
    }

    #[test]
    fn a_destroyed_head_is_an_error_not_an_empty_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = DurableLog::open(dir.path()).unwrap();
            log.append_batch(&(0..8).map(leaf).collect::<Vec<_>>())
                .unwrap();
            log.append_batch(&(8..9).map(leaf).collect::<Vec<_>>())
                .unwrap();
        }
        std::fs::remove_file(dir.path().join("HEAD")).unwrap();
        assert!(matches!(
            DurableLog::open(dir.path()),
            Err(Error::Corrupt { .. })
        ));
        std::fs::write(dir.path().join("HEAD"), [0x11; 128]).unwrap();
        assert!(matches!(
            DurableLog::open(dir.path()),
            Err(Error::Corrupt { .. })
        ));
        // The data is still there, untouched.
        assert!(
            std::fs::metadata(dir.path().join("leaves.dat"))
                .unwrap()
                .len()
                > 0
        );
    }

    #[test]
    fn crash_before_the_first_commit_opens_empty() {
        let dir = tempfile::tempdir().unwrap();
        drop(DurableLog::open(dir.path()).unwrap());
        // Uncommitted bytes from a first append that never reached HEAD.
        std::fs::write(dir.path().join("leaves.dat"), b"\0\0\0\x05hello").unwrap();
        let log = DurableLog::open(dir.path()).unwrap();
        assert_eq!(log.size(), 0);
        assert_eq!(
            std::fs::metadata(dir.path().join("leaves.dat"))
                .unwrap()
                .len(),
            0
        );
    }

    #[test]
    fn missing_committed_data_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = DurableLog::open(dir.path()).unwrap();
            log.append_batch(&(0..8).map(leaf).collect::<Vec<_>>())
                .unwrap();
        }
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join("leaves.dat"))
            .unwrap();
        f.set_len(20).unwrap();
        assert!(matches!(
            DurableLog::open(dir.path()),
            Err(Error::Corrupt { .. })
        ));
    }
}
