//! The attestor's streaming side: one worker per partition.
//!
//! For each batch from its [`PartitionSource`] a worker
//!
//! 1. decodes every envelope (the signature was batch-verified by ingest;
//!    proof verifiers re-check it, because the leaf holds the exact bytes);
//! 2. rejects a `(device, seq)` pair that was already logged (`duplicate`:
//!    the per-device window of the last [`SEQ_WINDOW`] seqs answers at once,
//!    the exact seq index on disk for anything older; a never-logged old seq
//!    is a late resend and is kept), a seq more than [`MAX_SEQ_JUMP`] past the device's highest
//!    (`seq_jump`: one bad seq must not lock the device out), and readings
//!    whose device time is more than `max_future_ms` after the time ingest
//!    received them (`clock_skew`). Readings from the past are kept however
//!    old (a wearable syncing after days offline); the `readings` table marks
//!    those that reached the log more than [`LATE_AFTER_MS`] after they were
//!    measured (`late`). A never-logged seq inside the window is accepted
//!    even if newer ones came first: after a crash, a broker may redeliver an
//!    unacknowledged reading after later ones, and it must not be lost;
//! 3. appends the rest to the partition's [`DurableLog`] and the rejects to
//!    the dead-letter store, both fsynced;
//! 4. only then reports each record's outcome to the bus (which is when
//!    ingest acknowledges MQTT, or Kafka offsets may be committed);
//! 5. signs a checkpoint when the interval has passed or enough leaves were
//!    appended, stores it, snapshots the dedup state, and exports the new
//!    leaves to Parquet ([`crate::parquet_out`]); only then is the Kafka
//!    consumer-group offset committed.
//!
//! After a crash the dedup state is the last snapshot plus a scan of the
//! leaves appended after it, so a redelivered reading is recognised.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use vitaltrail_bus::deadletter::{RejectLog, Rejection};
use vitaltrail_bus::{Delivery, Outcome, PartitionSource};
use vitaltrail_core::receipt::{Entry, Receipt};
use vitaltrail_core::{Checkpoint, Clock, DidCache, LogSigner, SecretKey, envelope, leaf};

use crate::durable::{DurableLog, write_atomic};
use crate::error::{Error, Result};
use crate::index::{self, SeqIndex};
use crate::metrics::Metrics;
use crate::parquet_out::{ParquetExporter, PatientLookup, Registered};

/// Typed attestor configuration.
#[derive(Debug, Clone)]
pub struct AttestorConfig {
    /// Where partition logs live: `<data_dir>/partitions/<p>/`.
    pub data_dir: PathBuf,
    /// Checkpoint origin prefix; partition `p` signs as `<prefix>/<p>`.
    pub origin_prefix: String,
    /// Sign a checkpoint at least this often while leaves arrive.
    pub checkpoint_interval: Duration,
    /// …or after this many new leaves, whichever comes first.
    pub checkpoint_every: u64,
    /// Most records processed per batch.
    pub max_batch: usize,
    /// Reject readings whose device time is newer than the time ingest
    /// received them plus this (a device clock running ahead). There is no
    /// past limit: late readings are kept and marked.
    pub max_future_ms: u64,
    /// Build a signed receipt per device per commit (`docs/receipts.md`).
    pub receipts: bool,
    /// With Kafka: the partition count of `vitals.verified`. A record is
    /// then logged only in the partition the partitioner puts its device
    /// in, so a genuine record copied into another partition (whose log
    /// does not know the device's seqs) is rejected (`wrong_partition`).
    pub topic_partitions: Option<u32>,
    /// When and how much to compact the Parquet files.
    pub compaction: crate::parquet_out::CompactionPolicy,
}

impl Default for AttestorConfig {
    fn default() -> Self {
        AttestorConfig {
            data_dir: PathBuf::from("vitaltrail-data"),
            origin_prefix: "vitaltrail.local/log".into(),
            checkpoint_interval: Duration::from_secs(1),
            checkpoint_every: 10_000,
            max_batch: 1024,
            max_future_ms: 5 * 60 * 1000,
            receipts: true,
            topic_partitions: None,
            compaction: Default::default(),
        }
    }
}

impl AttestorConfig {
    /// The directory of partition `p`.
    pub fn partition_dir(&self, p: u32) -> PathBuf {
        self.data_dir.join("partitions").join(p.to_string())
    }

    /// The checkpoint origin of partition `p`.
    pub fn origin(&self, p: u32) -> String {
        format!("{}/{p}", self.origin_prefix)
    }
}

/// How many announced checkpoints may wait for the announcer (the
/// Kafka publisher or the in-process anchor) before a partition waits.
pub const ANNOUNCE_QUEUE: usize = 1024;

/// Width of the per-device anti-replay window, in seqs.
pub const SEQ_WINDOW: u64 = 1024;

/// Largest forward jump from a device's highest logged seq that is
/// accepted (about 12 days of readings at one a second). A larger one is
/// rejected as `seq_jump`, so a single corrupt or hostile seq (2^64 − 1)
/// cannot push the window past every seq the device will really send.
pub const MAX_SEQ_JUMP: u64 = 1 << 20;

/// A reading that reaches the log more than this long after its device
/// time is marked `late` in the `readings` table (5 minutes).
pub const LATE_AFTER_MS: u64 = 5 * 60 * 1000;
const WINDOW_WORDS: usize = (SEQ_WINDOW / 64) as usize;

/// Which seqs of one device are logged: the highest one, and a bitmap of
/// the [`SEQ_WINDOW`] seqs up to it (an RFC 4303-style anti-replay window).
/// A seq that arrives late (a broker redelivered it after newer ones) is
/// still accepted if it is inside the window and was never logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqWindow {
    max: u64,
    bits: Vec<u64>,
}

/// What a window says about a seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqCheck {
    /// Never logged and acceptable.
    Fresh,
    /// Already logged.
    Seen,
    /// Older than the window: the window cannot tell; the exact seq index
    /// on disk decides.
    TooOld,
}

impl SeqWindow {
    /// The window of a device whose first logged seq is `seq`.
    pub fn new(seq: u64) -> Self {
        let mut w = SeqWindow {
            max: seq,
            bits: vec![0; WINDOW_WORDS],
        };
        w.set(seq);
        w
    }

    fn bit(seq: u64) -> (usize, u64) {
        let i = seq % SEQ_WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    fn set(&mut self, seq: u64) {
        let (w, b) = Self::bit(seq);
        if let Some(word) = self.bits.get_mut(w) {
            *word |= b;
        }
    }

    /// The highest seq recorded.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// `u64 BE max ‖ the bitmap as u64 BE words` (136 bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(8 + 8 * WINDOW_WORDS);
        v.extend_from_slice(&self.max.to_be_bytes());
        for w in &self.bits {
            v.extend_from_slice(&w.to_be_bytes());
        }
        v
    }

    /// The inverse of [`SeqWindow::to_bytes`].
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != 8 + 8 * WINDOW_WORDS {
            return None;
        }
        let word = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_be_bytes(a)
        };
        Some(SeqWindow {
            max: word(0),
            bits: (1..=WINDOW_WORDS).map(word).collect(),
        })
    }

    /// Check `seq` against the window.
    pub fn check(&self, seq: u64) -> SeqCheck {
        if seq > self.max {
            return SeqCheck::Fresh;
        }
        if self.max - seq >= SEQ_WINDOW {
            return SeqCheck::TooOld;
        }
        let (w, b) = Self::bit(seq);
        if self.bits.get(w).is_some_and(|x| x & b != 0) {
            SeqCheck::Seen
        } else {
            SeqCheck::Fresh
        }
    }

    /// Record `seq` as logged (it must have checked [`SeqCheck::Fresh`]).
    /// A seq older than the window leaves the window as it is (the exact
    /// index in redb records it).
    pub fn insert(&mut self, seq: u64) {
        if seq.saturating_add(SEQ_WINDOW) <= self.max {
            return;
        }
        if seq > self.max {
            // Slots of the seqs entering the window start empty.
            let steps = (seq - self.max).min(SEQ_WINDOW);
            for s in (seq - steps + 1)..=seq {
                let (w, b) = Self::bit(s);
                if let Some(word) = self.bits.get_mut(w) {
                    *word &= !b;
                }
            }
            self.max = seq;
        }
        self.set(seq);
    }
}

fn record_seq(map: &mut HashMap<String, SeqWindow>, did: &str, seq: u64) {
    match map.get_mut(did) {
        Some(w) => w.insert(seq),
        None => {
            map.insert(did.to_owned(), SeqWindow::new(seq));
        }
    }
}

/// Where a duplicate's original is.
#[derive(Debug, Clone, Copy)]
enum Original {
    /// Appended earlier in the same batch, at this position.
    InBatch(usize),
    /// In the log at this index.
    Logged(u64),
}

/// What a batch decided for one delivery.
#[derive(Debug)]
enum Fate {
    /// Appended, at this position of the batch's leaves.
    Leaf { pos: usize, did: String, seq: u64 },
    /// Already logged.
    Duplicate {
        did: String,
        seq: u64,
        original: Option<Original>,
    },
    /// Rejected for `reason`.
    Rejected {
        did: String,
        seq: Option<u64>,
        reason: String,
    },
}

impl Fate {
    fn rejected(did: &str, seq: Option<u64>, reason: &str) -> Self {
        Fate::Rejected {
            did: did.to_owned(),
            seq,
            reason: reason.to_owned(),
        }
    }
}

/// What one batch decided: the dead letters, and every delivery's fate in
/// arrival order.
#[derive(Debug, Default)]
struct Decided {
    rejected: Vec<Rejection>,
    fates: Vec<(Delivery, Fate)>,
}

impl Decided {
    /// Refuse `d` (rejected or duplicate, as `fate` says): its dead letter
    /// names the fate's device, seq and reason.
    fn refuse(&mut self, d: Delivery, detail: String, source: Option<String>, fate: Fate) {
        let (did, seq, reason) = match &fate {
            Fate::Rejected { did, seq, reason } => (did.as_str(), *seq, reason.as_str()),
            Fate::Duplicate { did, seq, .. } => (did.as_str(), Some(*seq), "duplicate"),
            Fate::Leaf { .. } => return self.fates.push((d, fate)),
        };
        let p = &d.record;
        let mut rj = Rejection::new("attestor", reason, detail, &p.payload, p.received_ms);
        rj.device = Some(did.to_owned());
        rj.seq = seq;
        rj.source = source;
        self.rejected.push(rj);
        self.fates.push((d, fate));
    }
}

/// One line of `checkpoints.jsonl`: every checkpoint a partition signed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckpointRecord {
    /// Tree size.
    pub size: u64,
    /// When it was signed, Unix ms.
    pub time_ms: u64,
    /// The signed note.
    pub note: String,
}

pub use vitaltrail_bus::checkpoints::PublishedCheckpoint;
pub use vitaltrail_bus::logged::LoggedLeaf;

/// The state a worker owns for one partition.
pub struct PartitionState {
    partition: u32,
    dir: PathBuf,
    log: DurableLog,
    index: SeqIndex,
    signer: LogSigner,
    origin: String,
    last_cp_size: u64,
    /// The size of the checkpoint signed before the latest (0: none).
    prev_cp_size: u64,
    last_cp_at: Option<Instant>,
    metrics: Metrics,
    exporter: ParquetExporter,
    /// The high-water mark the partition's compaction thread works below
    /// (the thread ends once this state is dropped).
    compact: Arc<std::sync::atomic::AtomicU64>,
    patients: PatientLookup,
    /// Parsed DIDs of this partition's devices (the log, dedup rebuild and
    /// Parquet export all decode the same devices' readings).
    dids: DidCache,
    /// With `vitals.logged`: the first leaf not yet announced when the
    /// worker started (its backlog), and each commit's leaves kept.
    announce_from: Option<u64>,
    announce: bool,
    /// The leaves of the last commit, to announce ([`Self::take_logged`]).
    logged: Vec<LoggedLeaf>,
}

impl std::fmt::Debug for PartitionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionState")
            .field("partition", &self.partition)
            .field("size", &self.log.size())
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

fn state_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::State {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

impl PartitionState {
    /// Open partition `p`'s log and rebuild its dedup state. `patients`
    /// names the patient of a device for the Parquet rows.
    pub fn open(
        cfg: &AttestorConfig,
        p: u32,
        key: &SecretKey,
        metrics: Metrics,
        patients: PatientLookup,
    ) -> Result<Self> {
        let dir = cfg.partition_dir(p);
        let log = DurableLog::open(&dir)?;
        let origin = cfg.origin(p);
        let signer = LogSigner::new(&origin, key.clone())?;
        let last_cp_size = fork_guard(&log, &signer, &dir)?;
        // Only once the key verifies what the log holds: devices and
        // verifiers are provisioned from this file.
        write_atomic(
            &dir,
            "log.vkey",
            format!("{}\n", signer.public_key()).as_bytes(),
        )?;
        let mut dids = DidCache::default();
        let index = SeqIndex::open(&dir, &log, &mut dids)?;
        let exporter = ParquetExporter::open(&cfg.data_dir, &dir, p)?;
        let compact = Arc::new(std::sync::atomic::AtomicU64::new(exporter.high_water()));
        spawn_compactor(
            &cfg.data_dir,
            p,
            cfg.compaction,
            metrics.clone(),
            compact.clone(),
        );
        metrics
            .tree_size
            .with_label_values(&[&p.to_string()])
            .set(log.size() as i64);
        Ok(PartitionState {
            partition: p,
            dir,
            log,
            index,
            signer,
            origin,
            last_cp_size,
            prev_cp_size: 0,
            last_cp_at: None,
            metrics,
            exporter,
            compact,
            patients,
            dids,
            announce_from: None,
            announce: false,
            logged: Vec::new(),
        })
    }

    /// Announce leaves on `vitals.logged` from leaf `from` on: the worker
    /// first hands over `from..size` (read back from the log), then keeps
    /// each commit's leaves ([`Self::take_logged`]).
    pub fn announce_logged(&mut self, from: u64) {
        self.announce = true;
        self.announce_from = Some(from);
    }

    /// The partition.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// The leaves the last commit logged, to announce (empty unless
    /// [`Self::announce_logged`]).
    pub fn take_logged(&mut self) -> Vec<LoggedLeaf> {
        std::mem::take(&mut self.logged)
    }

    /// The record key a leaf of `did` is announced under: the patient it is
    /// registered to, or the DID if the registry no longer knows it.
    fn announce_key(&self, did: &str) -> String {
        match (self.patients)(did) {
            Registered::Active(p) | Registered::Revoked(p) => p,
            Registered::Unknown => did.to_owned(),
        }
    }

    /// Leaves `from..to` (clamped to the log) read back for announcing,
    /// e.g. those committed before a crash but never announced.
    pub fn logged_range(&mut self, from: u64, to: u64) -> Result<Vec<LoggedLeaf>> {
        let to = to.min(self.log.size());
        let mut out = Vec::with_capacity(to.saturating_sub(from) as usize);
        for index in from..to {
            let leaf = self.log.leaf(index)?;
            let did = leaf::decode(&leaf).ok().and_then(|l| {
                envelope::decode_verified_upstream_with(l.envelope, |s| self.dids.resolve(s))
                    .ok()
                    .map(|r| r.did.as_str().to_owned())
            });
            let key = match did {
                Some(d) => self.announce_key(&d),
                // Never logged by this attestor (it decodes every leaf
                // first); announced under no patient rather than dropped.
                None => String::new(),
            };
            out.push(LoggedLeaf {
                partition: self.partition,
                index,
                key,
                leaf,
            });
        }
        Ok(out)
    }

    /// The last `n` checkpoints this partition signed, oldest first, as
    /// announced: each with its consistency proof from the one before. A
    /// restart announces them again, since any of them may have been
    /// signed but not yet taken by the announcer (its queue holds at most
    /// [`ANNOUNCE_QUEUE`]); readers deduplicate on (origin, size).
    pub fn recent_published(&self, n: usize) -> Result<Vec<PublishedCheckpoint>> {
        let all = read_checkpoints(&self.dir)?;
        let start = all.len().saturating_sub(n);
        let mut out = Vec::with_capacity(all.len() - start);
        for k in start..all.len() {
            let from = if k == 0 { 0 } else { all[k - 1].size };
            let c = &all[k];
            out.push(self.published(from, c.size, c.time_ms, c.note.clone())?);
        }
        Ok(out)
    }

    /// A checkpoint of size `size`, announced with its consistency proof
    /// from `from`.
    fn published(
        &self,
        from: u64,
        size: u64,
        time_ms: u64,
        note: String,
    ) -> Result<PublishedCheckpoint> {
        let consistency = if from > 0 && from < size {
            self.log
                .prove_consistency(from, size)?
                .iter()
                .map(|h| h.to_base64())
                .collect()
        } else {
            vec![]
        };
        Ok(PublishedCheckpoint {
            partition: self.partition,
            origin: self.origin.clone(),
            size,
            time_ms,
            note,
            from_size: from,
            consistency,
        })
    }

    /// The partition log.
    pub fn log(&self) -> &DurableLog {
        &self.log
    }

    /// The offset below which everything is in the log, a checkpoint and
    /// Parquet (what may be committed to the consumer group).
    pub fn settled_offset(&self) -> Option<u64> {
        (self.exporter.high_water() == self.log.size() && self.last_cp_size == self.log.size())
            .then(|| self.resume_offset())
            .flatten()
    }

    /// The input offset to resume from: one past the cursor committed with
    /// the log (`None`: from the beginning).
    pub fn resume_offset(&self) -> Option<u64> {
        self.log.cursor().map(|c| c + 1)
    }

    /// Decide, persist, and report a batch. Blocking (fsync). With
    /// `durable_offsets`, the batch's last offset is committed as the log's
    /// cursor in the same write as its leaves. With `cfg.receipts`, returns
    /// one [`Receipt`] per device in the batch, signed once for the commit.
    pub fn process(
        &mut self,
        batch: Vec<Delivery>,
        now_ms: u64,
        cfg: &AttestorConfig,
        rejects: &RejectLog,
        durable_offsets: bool,
    ) -> Result<Vec<Receipt>> {
        let cursor = if durable_offsets {
            batch.iter().map(|d| d.offset).max().or(self.log.cursor())
        } else {
            self.log.cursor()
        };
        let start = Instant::now();
        let part = self.partition.to_string();
        self.metrics
            .batch_size
            .with_label_values(&[&part])
            .observe(batch.len() as f64);
        let mut leaves = Vec::with_capacity(batch.len());
        let mut logged = Vec::with_capacity(batch.len());
        // With `announce`: each leaf's `vitals.logged` key.
        let mut keys = Vec::new();
        let mut dec = Decided::default();
        // Windows of the devices this batch touched, applied once durable.
        let mut pending: HashMap<String, SeqWindow> = HashMap::new();
        // (device, seq) → position in `leaves`, for duplicates in one batch.
        let mut in_batch: HashMap<(String, u64), usize> = HashMap::new();
        for d in batch {
            let payload = &d.record.payload;
            let source = durable_offsets.then(|| format!("partition {}@{}", d.partition, d.offset));
            // Not from ingest: refuse before looking at the envelope
            // (docs/threat-model.md, the bus).
            if !d.authentic {
                let fate = Fate::rejected(&d.record.key, None, "unauthenticated_record");
                let detail =
                    "the record's bus MAC is missing or wrong: it did not come from ingest";
                dec.refuse(d, detail.into(), source, fate);
                continue;
            }
            let reading =
                match envelope::decode_verified_upstream_with(payload, |s| self.dids.resolve(s)) {
                    Ok(r) => r,
                    Err(e) => {
                        let fate = Fate::rejected(&d.record.key, None, e.code());
                        dec.refuse(d, e.to_string(), source, fate);
                        continue;
                    }
                };
            let did = reading.did.as_str().to_owned();
            // Not as ingest checked it, or not a device we log.
            let home = cfg
                .topic_partitions
                .map(|n| vitaltrail_bus::partition_for(&did, n));
            let mut patient = None;
            let refusal = if d.record.key != did {
                Some((
                    "key_mismatch",
                    format!(
                        "record key {} is not the envelope's signer {did}",
                        d.record.key
                    ),
                ))
            } else if let Some(h) = home.filter(|&h| h != d.partition) {
                Some((
                    "wrong_partition",
                    format!("{did} belongs in partition {h}, not {}", d.partition),
                ))
            } else {
                match (self.patients)(&did) {
                    Registered::Active(p) => {
                        // The vitals.logged key, from this same lookup.
                        patient = Some(p);
                        None
                    }
                    Registered::Revoked(_) => {
                        Some(("revoked_device", format!("{did} was revoked")))
                    }
                    Registered::Unknown => {
                        Some(("unknown_device", format!("{did} is not registered")))
                    }
                }
            };
            if let Some((code, detail)) = refusal {
                let fate = Fate::rejected(&did, Some(reading.seq), code);
                dec.refuse(d, detail, source, fate);
                continue;
            }
            if !pending.contains_key(&did)
                && let Some(w) = self.index.window(&did)?
            {
                pending.insert(did.clone(), w);
            }
            let window = pending.get(&did);
            let mut seen = window.map_or(SeqCheck::Fresh, |w| w.check(reading.seq));
            let jump = window.and_then(|w| reading.seq.checked_sub(w.max()));
            let received = d.record.received_ms;
            // Seen by the window, or older than it: the exact index decides.
            // Logged before means a duplicate (with the original's index);
            // never logged means a late resend, which is kept.
            let mut original = None;
            if seen != SeqCheck::Fresh {
                original = match in_batch.get(&(did.clone(), reading.seq)) {
                    Some(&pos) => Some(Original::InBatch(pos)),
                    None => self
                        .index
                        .index_of(&did, reading.seq)?
                        .map(Original::Logged),
                };
                if original.is_none() && seen == SeqCheck::TooOld {
                    seen = SeqCheck::Fresh;
                }
            }
            let reason = match seen {
                // In the window, or older than it and in the index: logged
                // before.
                SeqCheck::Seen | SeqCheck::TooOld => {
                    self.metrics
                        .rejected
                        .with_label_values(&["duplicate"])
                        .inc();
                    let detail = format!("seq {} of this device was already logged", reading.seq);
                    let seq = reading.seq;
                    dec.refuse(d, detail, source, Fate::Duplicate { did, seq, original });
                    continue;
                }
                _ if jump.is_some_and(|j| j > MAX_SEQ_JUMP) => Some((
                    "seq_jump",
                    format!(
                        "seq {} is more than {MAX_SEQ_JUMP} past this device's highest logged seq {}",
                        reading.seq,
                        reading.seq - jump.unwrap_or(0)
                    ),
                )),
                _ if reading.time > received.saturating_add(cfg.max_future_ms) => Some((
                    "clock_skew",
                    format!(
                        "device time {} is more than {} ms after ingest received it at {received}",
                        reading.time, cfg.max_future_ms
                    ),
                )),
                _ => None,
            };
            match reason {
                Some((code, detail)) => {
                    let fate = Fate::rejected(&did, Some(reading.seq), code);
                    dec.refuse(d, detail, source, fate);
                }
                None => {
                    record_seq(&mut pending, &did, reading.seq);
                    in_batch.insert((did.clone(), reading.seq), leaves.len());
                    let (pos, seq) = (leaves.len(), reading.seq);
                    leaves.push(leaf::encode(now_ms, payload));
                    if self.announce {
                        keys.push(patient.take().unwrap_or_else(|| did.clone()));
                    }
                    logged.push(reading);
                    dec.fates.push((d, Fate::Leaf { pos, did, seq }));
                }
            }
        }
        // Rejections first: a crash between the two writes redelivers the
        // batch, which repeats a rejection (same `source`), never loses one.
        let Decided { rejected, fates } = dec;
        rejects.append(&rejected)?;
        let appended = self.log.append_batch_at(&leaves, cursor)?;
        // Durable: now the index may follow, and the outcomes be reported.
        let first = appended.first_index;
        let in_log: Vec<index::Logged> = logged
            .iter()
            .enumerate()
            .map(|(i, r)| index::Logged {
                did: r.did.as_str().to_owned(),
                seq: r.seq,
                index: first + i as u64,
            })
            .collect();
        self.index
            .commit(&pending, &in_log, self.log.size(), false)?;
        self.exporter
            .stage(first, now_ms, logged, &appended.leaf_hashes);
        let appended_count = leaves.len() as u64;
        if self.announce {
            self.logged = keys
                .into_iter()
                .zip(leaves)
                .enumerate()
                .map(|(i, (key, leaf))| LoggedLeaf {
                    partition: self.partition,
                    index: first + i as u64,
                    key,
                    leaf,
                })
                .collect();
        }
        for r in rejected.iter().filter(|r| r.reason != "duplicate") {
            self.metrics.rejected.with_label_values(&[&r.reason]).inc();
        }
        self.metrics
            .appended
            .with_label_values(&[&part])
            .inc_by(appended_count);
        self.metrics
            .tree_size
            .with_label_values(&[&part])
            .set(self.log.size() as i64);
        self.metrics
            .checkpoint_lag
            .with_label_values(&[&part])
            .set((self.log.size() - self.last_cp_size) as i64);
        self.metrics
            .commit_seconds
            .with_label_values(&[&part])
            .observe(start.elapsed().as_secs_f64());
        // Report the outcomes first (ingest acknowledges MQTT on them), then
        // build the receipts from the messages kept back.
        let mut decided: Vec<(Vec<u8>, Fate)> = Vec::with_capacity(fates.len());
        for (mut d, fate) in fates {
            let payload = if cfg.receipts {
                std::mem::take(&mut d.record.payload)
            } else {
                Vec::new()
            };
            match &fate {
                Fate::Leaf { pos, .. } => d.complete(Outcome::Logged {
                    partition: self.partition,
                    index: first + *pos as u64,
                }),
                Fate::Duplicate { .. } => d.complete(Outcome::Rejected {
                    reason: "duplicate".into(),
                }),
                Fate::Rejected { reason, .. } => d.complete(Outcome::Rejected {
                    reason: reason.clone(),
                }),
            }
            decided.push((payload, fate));
        }
        if cfg.receipts {
            self.receipts(&decided, first, now_ms)
        } else {
            Ok(vec![])
        }
    }

    /// The receipts of one commit: one checkpoint signed for the tree as
    /// this commit left it, and per device its entries with their proofs.
    fn receipts(
        &mut self,
        fates: &[(Vec<u8>, Fate)],
        first: u64,
        now_ms: u64,
    ) -> Result<Vec<Receipt>> {
        let size = self.log.size();
        // (device, the leaf index its proof is for, entry position), in
        // decision order; proofs are filled in below for every index named.
        let mut wanted: Vec<(String, Option<u64>, usize)> = Vec::with_capacity(fates.len());
        let mut entries: Vec<Entry> = Vec::with_capacity(fates.len());
        for (msg, fate) in fates {
            let (did, at) = match fate {
                Fate::Leaf { pos, did, seq } => {
                    let idx = first + *pos as u64;
                    entries.push(Entry::in_log(*seq, msg, idx, now_ms, &[], false));
                    (did.clone(), Some(idx))
                }
                Fate::Duplicate { did, seq, original } => {
                    let idx = match original {
                        Some(Original::InBatch(pos)) => Some(first + *pos as u64),
                        Some(Original::Logged(idx)) => Some(*idx),
                        None => None,
                    };
                    // Only the same message is "already in the log": a
                    // different message reusing a logged seq (the device's
                    // key signed two readings with one seq, and the other
                    // came first) is refused, never given the other's
                    // proof (#18's CI caught one such receipt).
                    let at = match idx {
                        Some(idx) => {
                            let l = self.log.leaf(idx)?;
                            let l = leaf::decode(&l)?;
                            (l.envelope == msg.as_slice()).then_some((idx, l.log_time_ms))
                        }
                        None => None,
                    };
                    match at {
                        Some((idx, t)) => {
                            entries.push(Entry::in_log(*seq, msg, idx, t, &[], true));
                            (did.clone(), Some(idx))
                        }
                        None => {
                            entries.push(Entry::rejected(Some(*seq), msg, "duplicate"));
                            (did.clone(), None)
                        }
                    }
                }
                Fate::Rejected { did, seq, reason } => {
                    entries.push(Entry::rejected(*seq, msg, reason));
                    (did.clone(), None)
                }
            };
            wanted.push((did, at, entries.len() - 1));
        }
        let indexes: Vec<u64> = wanted.iter().filter_map(|w| w.1).collect();
        let note = if indexes.is_empty() {
            None
        } else {
            let proofs = self.log.prove_inclusion_many(size, &indexes)?;
            let mut proofs = proofs.into_iter();
            for (_, at, pos) in &wanted {
                if at.is_some()
                    && let Some(p) = proofs.next()
                {
                    entries[*pos].proof = Some(p.iter().map(|h| h.to_base64()).collect());
                }
            }
            let cp = Checkpoint {
                origin: self.origin.clone(),
                size,
                root: self.log.root(),
                extensions: vec![],
            };
            Some(cp.sign(&self.signer)?)
        };
        // Group by device, keeping each device's entries in order.
        let mut by_device: Vec<(String, Vec<Entry>)> = Vec::new();
        let mut slot: HashMap<String, usize> = HashMap::new();
        for ((did, _, _), e) in wanted.into_iter().zip(entries) {
            let i = *slot.entry(did.clone()).or_insert_with(|| {
                by_device.push((did.clone(), Vec::new()));
                by_device.len() - 1
            });
            by_device[i].1.push(e);
        }
        Ok(by_device
            .into_iter()
            .flat_map(|(did, es)| Receipt::split(&did, note.clone(), es))
            .collect())
    }

    /// Tell the compaction thread how far the rows are committed.
    fn notify_compactor(&self) {
        self.compact.store(
            self.exporter.high_water(),
            std::sync::atomic::Ordering::Release,
        );
    }

    /// Sign a checkpoint over leaves no checkpoint covers yet, and export
    /// leaves that have no rows yet, whatever the interval says. Run on
    /// start, so no row stays missing until new traffic arrives.
    pub fn catch_up(&mut self, now_ms: u64, cfg: &AttestorConfig) -> Result<Option<String>> {
        let note = self.maybe_checkpoint(now_ms, cfg, true)?;
        if self.exporter.high_water() < self.log.size() {
            self.exporter
                .export(&self.log, &self.patients, &mut self.dids)?;
        }
        self.notify_compactor();
        Ok(note)
    }

    /// Sign, store and return a checkpoint if one is due (or `force`d and
    /// the tree grew). Also snapshots the dedup state.
    pub fn maybe_checkpoint(
        &mut self,
        now_ms: u64,
        cfg: &AttestorConfig,
        force: bool,
    ) -> Result<Option<String>> {
        let size = self.log.size();
        if size == self.last_cp_size {
            return Ok(None);
        }
        let due = force
            || size - self.last_cp_size >= cfg.checkpoint_every
            || self
                .last_cp_at
                .is_none_or(|t| t.elapsed() >= cfg.checkpoint_interval);
        if !due {
            return Ok(None);
        }
        let cp = Checkpoint {
            origin: self.origin.clone(),
            size,
            root: self.log.root(),
            extensions: vec![],
        };
        let note = cp.sign(&self.signer)?;
        let rec = CheckpointRecord {
            size,
            time_ms: now_ms,
            note: note.clone(),
        };
        let path = self.dir.join("checkpoints.jsonl");
        let mut line = serde_json::to_vec(&rec).map_err(|e| state_err(&path, e))?;
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| state_err(&path, e))?;
        f.write_all(&line)
            .and_then(|_| f.sync_data())
            .map_err(|e| state_err(&path, e))?;
        self.log.store_checkpoint(&note)?;
        self.index.sync()?;
        self.exporter
            .export(&self.log, &self.patients, &mut self.dids)?;
        self.notify_compactor();
        self.prev_cp_size = self.last_cp_size;
        self.last_cp_size = size;
        self.last_cp_at = Some(Instant::now());
        let part = self.partition.to_string();
        self.metrics.checkpoints.with_label_values(&[&part]).inc();
        self.metrics
            .checkpoint_lag
            .with_label_values(&[&part])
            .set(0);
        Ok(Some(note))
    }
}

/// Start partition `p`'s compaction thread; it compacts below the latest
/// high-water mark in `hw`, every `policy.every` (also while the partition
/// is idle), and ends once the partition's state (the other holder of
/// `hw`) is dropped. Compaction
/// is housekeeping of derived files: its failures are logged and counted
/// (`vitaltrail_attestor_parquet_compaction_errors_total`), retried on the
/// next pass, and never stop the partition.
fn spawn_compactor(
    data_dir: &Path,
    p: u32,
    policy: crate::parquet_out::CompactionPolicy,
    metrics: Metrics,
    hw: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut compactor = crate::parquet_out::Compactor::new(data_dir, p);
    let part = p.to_string();
    let spawned = std::thread::Builder::new()
        .name(format!("vitaltrail-compact-{p}"))
        .spawn(move || {
            let tick = policy.every.max(Duration::from_millis(50));
            loop {
                std::thread::sleep(tick);
                // The partition is gone: stop (its files are someone
                // else's now).
                if Arc::strong_count(&hw) == 1 {
                    return;
                }
                let h = hw.load(std::sync::atomic::Ordering::Acquire);
                match compactor.compact(h, &policy, false) {
                    Ok(Some(stats)) => {
                        metrics
                            .parquet_files
                            .with_label_values(&[&part])
                            .set(stats.live_files as i64);
                        if stats.merged > 0 {
                            metrics
                                .parquet_compactions
                                .with_label_values(&[&part])
                                .inc();
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(partition = %part, error = %e, "Parquet compaction failed; retrying on the next pass");
                        metrics
                            .parquet_compaction_errors
                            .with_label_values(&[&part])
                            .inc();
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(partition = p, error = %e, "no compaction thread: Parquet files stay uncompacted");
    }
}

/// The fork guard, on open: the latest checkpoint this partition signed
/// must describe a prefix of the log as it is now (its size at most the
/// log's, its root the log's root at that size), and the log must be a
/// consistency-proven extension of it. Otherwise the log was replaced (an
/// older backup restored beside a newer checkpoint, or edited), and signing
/// anything now would fork the history: refuse to start. Returns the
/// checkpoint's size.
fn fork_guard(log: &DurableLog, signer: &LogSigner, dir: &Path) -> Result<u64> {
    let Some(note) = log.latest_checkpoint()? else {
        return Ok(0);
    };
    let cp = Checkpoint::open(&note, &signer.public_key())?;
    let fork = |why: String| Error::Fork {
        path: dir.to_owned(),
        detail: why,
    };
    if cp.size > log.size() {
        return Err(fork(format!(
            "the last signed checkpoint has {} leaves but the log only {}: an older log was restored",
            cp.size,
            log.size()
        )));
    }
    if log.root_at(cp.size)? != cp.root {
        return Err(fork(format!(
            "the log's first {} leaves do not have the root the last checkpoint signed",
            cp.size
        )));
    }
    let proof = log.prove_consistency(cp.size, log.size())?;
    vitaltrail_core::merkle::verify_consistency(cp.size, log.size(), &cp.root, &log.root(), &proof)
        .map_err(|e| fork(format!("the log does not extend the last checkpoint: {e}")))?;
    Ok(cp.size)
}

/// Read every checkpoint a partition signed, oldest first.
pub fn read_checkpoints(dir: &Path) -> Result<Vec<CheckpointRecord>> {
    let path = dir.join("checkpoints.jsonl");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(state_err(&path, e)),
    };
    // A torn last line (crash mid-write) is not a checkpoint that was stored.
    text.lines()
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_str(l).ok())
        .map(Ok)
        .collect()
}

/// Commit the consumer-group offset up to what the log, a checkpoint and
/// Parquet all hold. The log's own cursor is what a restart resumes from;
/// the group offset feeds lag monitoring and other consumers.
async fn commit_settled<S: PartitionSource>(source: &mut S, state: &PartitionState) {
    if !source.durable_offsets() {
        return;
    }
    if let Some(next) = state.settled_offset()
        && let Err(e) = source.commit(next).await
    {
        tracing::warn!(error = %e, "could not commit the consumer offset");
    }
}

/// Announce a new checkpoint (waits when the announcer is behind: bounded).
async fn announce(
    to: Option<&tokio::sync::mpsc::Sender<PublishedCheckpoint>>,
    state: &PartitionState,
    note: Option<String>,
    now_ms: u64,
) {
    if let (Some(tx), Some(note)) = (to, note) {
        let cp = match state.published(state.prev_cp_size, state.last_cp_size, now_ms, note) {
            Ok(cp) => cp,
            // The checkpoint is stored; a restart announces it again.
            Err(e) => {
                tracing::warn!(error = %e, "could not prove a checkpoint's consistency; it is announced again on restart");
                return;
            }
        };
        if tx.send(cp).await.is_err() {
            tracing::warn!(
                "checkpoint announcer is gone; the checkpoint stays in the data directory"
            );
        }
    }
}

/// Hand a commit's receipts to the publisher without waiting: a full
/// queue drops them (counted), since a device without a receipt resends and
/// gets a duplicate's receipt. The log never waits for MQTT.
fn hand_over(
    to: Option<&tokio::sync::mpsc::Sender<Receipt>>,
    receipts: Vec<Receipt>,
    metrics: &Metrics,
) {
    let Some(tx) = to else {
        return;
    };
    for r in receipts {
        match tx.try_send(r) {
            Ok(()) => metrics.receipts.inc(),
            Err(_) => metrics.receipts_dropped.inc(),
        }
    }
}

/// Where a partition worker hands what it made, each optional.
#[derive(Debug, Default, Clone)]
pub struct Outlets {
    /// Each new checkpoint (the anchor, `vitals.checkpoints`).
    pub checkpoints: Option<tokio::sync::mpsc::Sender<PublishedCheckpoint>>,
    /// Each commit's receipts (never waits: a full queue drops them).
    pub receipts: Option<tokio::sync::mpsc::Sender<Receipt>>,
    /// Each commit's leaves, for `vitals.logged` (waits: bounded), once
    /// the state was told to keep them ([`PartitionState::announce_logged`]).
    pub logged: Option<tokio::sync::mpsc::Sender<Vec<LoggedLeaf>>>,
    /// Told after each durable commit (never waits): the in-process alert
    /// engine reads the new leaves at once instead of at its next tick.
    pub committed: Option<Arc<tokio::sync::Notify>>,
}

/// Run one partition until the source closes or `shutdown` turns true,
/// handing checkpoints, receipts and logged leaves to `outlets`.
pub async fn run_partition<S: PartitionSource>(
    mut source: S,
    mut state: PartitionState,
    cfg: AttestorConfig,
    rejects: Arc<RejectLog>,
    clock: Arc<dyn Clock>,
    outlets: Outlets,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let Outlets {
        checkpoints,
        receipts,
        logged,
        committed,
    } = outlets;
    let cfg = AttestorConfig {
        receipts: cfg.receipts && receipts.is_some(),
        ..cfg
    };
    // Catch up before taking anything new: a crash (or a failed export)
    // after a commit may have left leaves without a checkpoint or rows.
    let now = clock.now_ms();
    let cp = tokio::task::block_in_place(|| state.catch_up(now, &cfg))?;
    announce(checkpoints.as_ref(), &state, cp, now).await;
    // Leaves committed before but never announced, in bounded chunks.
    if let (Some(tx), Some(mut next)) = (logged.as_ref(), state.announce_from.take()) {
        let size = state.log.size();
        while next < size {
            let to = size.min(next.saturating_add(1024));
            let leaves = tokio::task::block_in_place(|| state.logged_range(next, to))?;
            state.metrics.logged_pending.add(leaves.len() as i64);
            if tx.send(leaves).await.is_err() {
                break;
            }
            next = to;
        }
    }
    let mut tick = tokio::time::interval(cfg.checkpoint_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(cfg.max_batch);
    loop {
        tokio::select! {
            more = source.next_batch(cfg.max_batch, &mut batch) => {
                if !more? {
                    break;
                }
                let now = clock.now_ms();
                let taken = std::mem::take(&mut batch);
                let durable = source.durable_offsets();
                let (out, cp) = tokio::task::block_in_place(|| {
                    let out = state.process(taken, now, &cfg, &rejects, durable)?;
                    Ok::<_, Error>((out, state.maybe_checkpoint(now, &cfg, false)?))
                })?;
                hand_over(receipts.as_ref(), out, &state.metrics);
                if let Some(n) = &committed {
                    n.notify_one();
                }
                let leaves = state.take_logged();
                if let Some(tx) = logged.as_ref().filter(|_| !leaves.is_empty()) {
                    // Closed only when the announcer failed, which stops
                    // the stage; its watermark makes a restart announce
                    // these again.
                    state.metrics.logged_pending.add(leaves.len() as i64);
                    let _ = tx.send(leaves).await;
                }
                state
                    .metrics
                    .windows_cached
                    .with_label_values(&[&state.partition.to_string()])
                    .set(state.index.cached() as i64);
                if cp.is_some() {
                    commit_settled(&mut source, &state).await;
                }
                announce(checkpoints.as_ref(), &state, cp, now).await;
            }
            _ = tick.tick() => {
                let now = clock.now_ms();
                let cp = tokio::task::block_in_place(|| state.maybe_checkpoint(now, &cfg, false))?;
                if cp.is_some() {
                    commit_settled(&mut source, &state).await;
                }
                announce(checkpoints.as_ref(), &state, cp, now).await;
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    break;
                }
            }
        }
    }
    let now = clock.now_ms();
    let cp = tokio::task::block_in_place(|| state.maybe_checkpoint(now, &cfg, true))?;
    announce(checkpoints.as_ref(), &state, cp, now).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_accepts_late_readings_once_and_refuses_stale_ones() {
        let mut w = SeqWindow::new(10);
        assert_eq!(w.check(10), SeqCheck::Seen);
        assert_eq!(w.check(11), SeqCheck::Fresh);
        w.insert(15);
        for s in [11, 12, 13, 14] {
            assert_eq!(w.check(s), SeqCheck::Fresh, "{s} arrives late");
        }
        w.insert(12);
        assert_eq!(w.check(12), SeqCheck::Seen);
        assert_eq!(w.check(15), SeqCheck::Seen);
        w.insert(15 + SEQ_WINDOW);
        assert_eq!(w.check(15), SeqCheck::TooOld);
        assert_eq!(
            w.check(16),
            SeqCheck::Fresh,
            "slot reused for a new seq must start empty"
        );
        assert_eq!(w.check(14 + SEQ_WINDOW), SeqCheck::Fresh);
        assert_eq!(w.check(15 + SEQ_WINDOW), SeqCheck::Seen);
        w.insert(u64::MAX - 1);
        assert_eq!(w.check(u64::MAX - 1), SeqCheck::Seen);
        assert_eq!(w.check(u64::MAX), SeqCheck::Fresh);
    }

    #[test]
    fn a_failing_compaction_is_counted_and_retried_never_fatal() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("readings/date=2027-01-15");
        std::fs::create_dir_all(dir.join("p0-000000000000-000000000001.parquet")).unwrap();
        let registry = prometheus::Registry::new();
        let metrics = Metrics::new(&registry).unwrap();
        let policy = crate::parquet_out::CompactionPolicy {
            every: std::time::Duration::ZERO,
            ..Default::default()
        };
        let hw = Arc::new(std::sync::atomic::AtomicU64::new(10));
        spawn_compactor(data.path(), 0, policy, metrics.clone(), hw.clone());
        let errors = || {
            metrics
                .parquet_compaction_errors
                .with_label_values(&["0"])
                .get()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while errors() < 2 {
            assert!(
                Instant::now() < deadline,
                "the compaction thread stopped retrying"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(hw);
    }
}
