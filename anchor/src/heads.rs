//! What the anchor believes about each partition log: its latest verified
//! checkpoint. A checkpoint is taken only if it is signed by that
//! partition's log key and (after the first) is a proven extension of the
//! one held before it; one whose (unsigned) proof fails is refused, and
//! the head stays. Two signed checkpoints of one size with two roots are
//! a fork: the partition is never advanced again, and nothing of the fork
//! is anchored.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vitaltrail_bus::checkpoints::PublishedCheckpoint;
use vitaltrail_core::anchor::PartitionHead;
use vitaltrail_core::merkle::{self, Hash};
use vitaltrail_core::{Checkpoint, LogPublicKey};

/// A partition's latest verified checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// Tree size.
    pub size: u64,
    /// Root at that size.
    pub root: Hash,
    /// The signed note.
    pub note: String,
}

/// What became of an offered checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// Verified and newer: the partition's head moved.
    Advanced,
    /// The head already held (a republish).
    Duplicate,
    /// Older than the head (a republish after a restart).
    Stale,
    /// Newer, but its proof starts at a size other than the head's: it
    /// cannot be checked, so it is not taken. A later one may link up.
    Gap,
    /// It contradicts the head: the partition is stopped.
    Fork(String),
    /// Not signed by the partition's log key, malformed, or its
    /// consistency proof fails (`bad_proof`).
    Rejected(&'static str),
    /// The partition was stopped by an earlier fork.
    Stopped,
}

impl Offer {
    /// Its label in `vitaltrail_anchor_checkpoints_total{outcome}`.
    pub fn label(&self) -> &'static str {
        match self {
            Offer::Advanced => "advanced",
            Offer::Duplicate => "duplicate",
            Offer::Stale => "stale",
            Offer::Gap => "gap",
            Offer::Fork(_) => "fork",
            Offer::Rejected(r) => r,
            Offer::Stopped => "stopped",
        }
    }
}

/// The partition log keys the anchor trusts: `<data>/partitions/*/log.vkey`
/// (looked at again, at most every 100 ms, when an unknown origin
/// appears) and the ones configured.
#[derive(Debug)]
pub struct TrustedKeys {
    data_dir: PathBuf,
    configured: Vec<LogPublicKey>,
    keys: HashMap<String, LogPublicKey>,
    scanned: Option<Instant>,
}

impl TrustedKeys {
    /// Keys from `data_dir` and `configured`.
    pub fn new(data_dir: &Path, configured: Vec<LogPublicKey>) -> Self {
        let mut t = TrustedKeys {
            data_dir: data_dir.to_owned(),
            configured,
            keys: HashMap::new(),
            scanned: None,
        };
        t.scan();
        t
    }

    fn scan(&mut self) {
        self.scanned = Some(Instant::now());
        for k in &self.configured {
            self.keys.insert(k.name().to_owned(), k.clone());
        }
        let Ok(dirs) = std::fs::read_dir(self.data_dir.join("partitions")) else {
            return;
        };
        for d in dirs.flatten() {
            let Ok(text) = std::fs::read_to_string(d.path().join("log.vkey")) else {
                continue;
            };
            match LogPublicKey::parse(text.trim()) {
                // A configured key for an origin wins over a file.
                Ok(k) if !self.configured.iter().any(|c| c.name() == k.name()) => {
                    self.keys.insert(k.name().to_owned(), k);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(path = %d.path().display(), error = %e, "unreadable log.vkey")
                }
            }
        }
    }

    /// The key of `origin`.
    pub fn get(&mut self, origin: &str) -> Option<&LogPublicKey> {
        if !self.keys.contains_key(origin)
            && self
                .scanned
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(100))
        {
            self.scan();
        }
        self.keys.get(origin)
    }
}

/// The heads of every partition, and which moved since the last epoch.
#[derive(Debug)]
pub struct Heads {
    held: BTreeMap<String, Held>,
    stopped: BTreeSet<String>,
    moved: BTreeSet<String>,
    keys: TrustedKeys,
}

impl Heads {
    /// Start from the heads of the last epoch (and the partitions stopped
    /// by forks).
    pub fn new(keys: TrustedKeys, held: BTreeMap<String, Held>, stopped: BTreeSet<String>) -> Self {
        Heads {
            held,
            stopped,
            moved: BTreeSet::new(),
            keys,
        }
    }

    /// Check `cp` and take it if it verifies and is newer.
    pub fn offer(&mut self, cp: &PublishedCheckpoint) -> Offer {
        if self.stopped.contains(&cp.origin) {
            return Offer::Stopped;
        }
        let Some(key) = self.keys.get(&cp.origin) else {
            return Offer::Rejected("unknown_log");
        };
        let Ok(opened) = Checkpoint::open(&cp.note, key) else {
            return Offer::Rejected("bad_signature");
        };
        if opened.origin != cp.origin || opened.size != cp.size {
            return Offer::Rejected("mismatch");
        }
        let Some(held) = self.held.get(&cp.origin) else {
            // The first checkpoint of a partition: nothing to extend.
            self.take(cp, opened.root);
            return Offer::Advanced;
        };
        if opened.size == held.size {
            return if opened.root == held.root {
                Offer::Duplicate
            } else {
                self.fork(&cp.origin, format!("two roots at size {}", opened.size))
            };
        }
        if opened.size < held.size {
            return Offer::Stale;
        }
        if cp.from_size != held.size {
            return Offer::Gap;
        }
        let proof: Option<Vec<Hash>> = cp
            .consistency
            .iter()
            .map(|h| Hash::from_base64(h))
            .collect();
        let Some(proof) = proof else {
            return Offer::Rejected("malformed");
        };
        let checked = if held.size == 0 {
            Ok(())
        } else {
            merkle::verify_consistency(held.size, opened.size, &held.root, &opened.root, &proof)
        };
        match checked {
            Ok(()) => {
                self.take(cp, opened.root);
                Offer::Advanced
            }
            // The proof is not signed: anyone on the topic can send a bad
            // one with a genuine note, so it proves nothing about the log.
            // Refused (the head stays); only two signed heads of one size
            // with two roots prove a fork.
            Err(_) => Offer::Rejected("bad_proof"),
        }
    }

    fn take(&mut self, cp: &PublishedCheckpoint, root: Hash) {
        self.held.insert(
            cp.origin.clone(),
            Held {
                size: cp.size,
                root,
                note: cp.note.clone(),
            },
        );
        self.moved.insert(cp.origin.clone());
    }

    fn fork(&mut self, origin: &str, detail: String) -> Offer {
        tracing::error!(origin, %detail, "partition log fork: anchoring of this partition stops");
        self.stopped.insert(origin.to_owned());
        Offer::Fork(detail)
    }

    /// True when some head moved since [`Heads::closed`].
    pub fn moved(&self) -> bool {
        !self.moved.is_empty()
    }

    /// The origins whose heads moved since [`Heads::closed`].
    pub fn moved_origins(&self) -> impl Iterator<Item = &str> {
        self.moved.iter().map(String::as_str)
    }

    /// Every head, in origin order.
    pub fn heads(&self) -> Vec<PartitionHead> {
        self.held
            .iter()
            .map(|(o, h)| PartitionHead {
                origin: o.clone(),
                size: h.size,
                root: h.root,
            })
            .collect()
    }

    /// The held checkpoint of `origin`.
    pub fn get(&self, origin: &str) -> Option<&Held> {
        self.held.get(origin)
    }

    /// The partitions stopped by forks.
    pub fn stopped(&self) -> &BTreeSet<String> {
        &self.stopped
    }

    /// An epoch holding the current heads is durable.
    pub fn closed(&mut self) {
        self.moved.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vitaltrail_core::{LogSigner, MemoryTree, SecretKey};

    struct Log {
        tree: MemoryTree,
        signer: LogSigner,
    }

    impl Log {
        fn new(seed: u8) -> Self {
            Log {
                tree: MemoryTree::new(),
                signer: LogSigner::new(
                    "vitaltrail.test/log/0",
                    SecretKey::from_seed(&[seed; 32]).unwrap(),
                )
                .unwrap(),
            }
        }

        fn grow(&mut self, n: u64) {
            for _ in 0..n {
                let i = self.tree.size();
                self.tree.append(&i.to_be_bytes());
            }
        }

        fn cp(&self, from: u64) -> PublishedCheckpoint {
            let size = self.tree.size();
            let note = Checkpoint {
                origin: "vitaltrail.test/log/0".into(),
                size,
                root: self.tree.root(),
                extensions: vec![],
            }
            .sign(&self.signer)
            .unwrap();
            let consistency = if from > 0 && from < size {
                self.tree
                    .prove_consistency(from, size)
                    .unwrap()
                    .iter()
                    .map(Hash::to_base64)
                    .collect()
            } else {
                vec![]
            };
            PublishedCheckpoint {
                partition: 0,
                origin: "vitaltrail.test/log/0".into(),
                size,
                time_ms: 0,
                note,
                from_size: from,
                consistency,
            }
        }
    }

    fn heads(log: &Log) -> Heads {
        let dir = tempfile::tempdir().unwrap();
        Heads::new(
            TrustedKeys::new(dir.path(), vec![log.signer.public_key()]),
            BTreeMap::new(),
            BTreeSet::new(),
        )
    }

    #[test]
    fn extensions_advance_and_republishes_do_not() {
        let mut log = Log::new(1);
        let mut h = heads(&log);
        log.grow(5);
        assert_eq!(h.offer(&log.cp(0)), Offer::Advanced);
        assert!(h.moved());
        h.closed();
        assert_eq!(h.offer(&log.cp(0)), Offer::Duplicate);
        let old = log.cp(0);
        log.grow(7);
        assert_eq!(h.offer(&log.cp(5)), Offer::Advanced);
        assert_eq!(h.get("vitaltrail.test/log/0").unwrap().size, 12);
        assert_eq!(h.offer(&old), Offer::Stale);
        // A proof from a size we do not hold cannot be checked.
        log.grow(1);
        assert_eq!(h.offer(&log.cp(6)), Offer::Gap);
        assert_eq!(h.offer(&log.cp(12)), Offer::Advanced);
    }

    #[test]
    fn a_fork_stops_the_partition_for_good() {
        let mut log = Log::new(1);
        let mut h = heads(&log);
        log.grow(4);
        assert_eq!(h.offer(&log.cp(0)), Offer::Advanced);
        // Another history under the same key: same size, other root.
        let mut other = Log::new(1);
        other.tree.append(b"forged");
        other.grow(3);
        assert!(matches!(h.offer(&other.cp(0)), Offer::Fork(_)));
        log.grow(2);
        assert_eq!(h.offer(&log.cp(4)), Offer::Stopped);
        assert!(h.stopped().contains("vitaltrail.test/log/0"));
        // A longer history whose proof from our size fails is refused,
        // not taken and not a fork (the proof is unsigned: anyone can spoil
        // one); the genuine extension is taken after it.
        let mut h = heads(&log);
        let mut small = Log::new(1);
        small.grow(4);
        assert_eq!(h.offer(&small.cp(0)), Offer::Advanced);
        let mut bad = Log::new(1);
        bad.tree.append(b"forged");
        bad.grow(8);
        assert_eq!(h.offer(&bad.cp(4)), Offer::Rejected("bad_proof"));
        small.grow(3);
        let mut spoiled = small.cp(4);
        spoiled.consistency.clear();
        assert_eq!(h.offer(&spoiled), Offer::Rejected("bad_proof"));
        assert!(h.stopped().is_empty());
        assert_eq!(h.offer(&small.cp(4)), Offer::Advanced);
    }

    #[test]
    fn unknown_or_wrongly_signed_checkpoints_are_refused() {
        let mut log = Log::new(1);
        let mut h = heads(&log);
        let mut stranger = Log::new(2);
        stranger.grow(3);
        assert_eq!(h.offer(&stranger.cp(0)), Offer::Rejected("bad_signature"));
        log.grow(3);
        let mut cp = log.cp(0);
        cp.size = 4;
        assert_eq!(h.offer(&cp), Offer::Rejected("mismatch"));
        let mut cp = log.cp(0);
        cp.origin = "vitaltrail.test/log/9".into();
        assert_eq!(h.offer(&cp), Offer::Rejected("unknown_log"));
        assert!(!h.moved());
    }
}
