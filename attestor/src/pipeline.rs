//! The attestor's streaming side: one worker per partition.
//!
//! For each batch from its [`PartitionSource`] a worker
//!
//! 1. decodes every envelope (the signature was batch-verified by ingest;
//!    proof verifiers re-check it, because the leaf holds the exact bytes);
//! 2. rejects a `(device, seq)` pair that was already logged (`duplicate`) or
//!    is older than the per-device anti-replay window of [`SEQ_WINDOW`] seqs
//!    (`replay`), and readings whose device time is outside the skew window
//!    (`clock_skew`). A never-logged seq inside the window is accepted even if
//!    newer ones came first: after a crash, a broker may redeliver an
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
use vitaltrail_core::{Checkpoint, Clock, DidCache, LogSigner, SecretKey, envelope, leaf};

use crate::durable::{DurableLog, write_atomic};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::parquet_out::{ParquetExporter, PatientLookup};

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
    /// Reject readings whose device time is older than log time minus this.
    pub max_past_ms: u64,
    /// Reject readings whose device time is newer than log time plus this.
    pub max_future_ms: u64,
}

impl Default for AttestorConfig {
    fn default() -> Self {
        AttestorConfig {
            data_dir: PathBuf::from("vitaltrail-data"),
            origin_prefix: "vitaltrail.local/log".into(),
            checkpoint_interval: Duration::from_secs(1),
            checkpoint_every: 10_000,
            max_batch: 1024,
            max_past_ms: 24 * 3600 * 1000,
            max_future_ms: 5 * 60 * 1000,
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

/// Width of the per-device anti-replay window, in seqs.
pub const SEQ_WINDOW: u64 = 1024;
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
    /// Older than the window: cannot be told apart from a replay.
    TooOld,
}

impl SeqWindow {
    fn new(seq: u64) -> Self {
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
    pub fn insert(&mut self, seq: u64) {
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

#[derive(Debug, Serialize, Deserialize)]
struct DedupSnapshot {
    size: u64,
    windows: HashMap<String, SeqWindow>,
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

/// A checkpoint as a partition worker announces it to other systems (the
/// Kafka topic `vitals.checkpoints`, key = `origin`, value = this as JSON).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublishedCheckpoint {
    /// The partition whose log it commits to.
    pub partition: u32,
    /// The log's origin line.
    pub origin: String,
    /// Tree size.
    pub size: u64,
    /// When it was signed, Unix ms.
    pub time_ms: u64,
    /// The signed note.
    pub note: String,
}

/// The state a worker owns for one partition.
pub struct PartitionState {
    partition: u32,
    dir: PathBuf,
    log: DurableLog,
    windows: HashMap<String, SeqWindow>,
    signer: LogSigner,
    origin: String,
    last_cp_size: u64,
    last_cp_at: Option<Instant>,
    metrics: Metrics,
    exporter: ParquetExporter,
    patients: PatientLookup,
    /// Parsed DIDs of this partition's devices (the log, dedup rebuild and
    /// Parquet export all decode the same devices' readings).
    dids: DidCache,
}

impl std::fmt::Debug for PartitionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionState")
            .field("partition", &self.partition)
            .field("size", &self.log.size())
            .field("devices", &self.windows.len())
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
        write_atomic(
            &dir,
            "log.vkey",
            format!("{}\n", signer.public_key()).as_bytes(),
        )?;
        let snap_path = dir.join("dedup.json");
        let (mut windows, from) = match std::fs::read(&snap_path) {
            Ok(b) => {
                let s: DedupSnapshot =
                    serde_json::from_slice(&b).map_err(|e| state_err(&snap_path, e))?;
                if s.size > log.size() {
                    return Err(state_err(&snap_path, "snapshot is ahead of the log"));
                }
                (s.windows, s.size)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (HashMap::new(), 0),
            Err(e) => return Err(state_err(&snap_path, e)),
        };
        let mut dids = DidCache::default();
        for i in from..log.size() {
            let bytes = log.leaf(i)?;
            let l = leaf::decode(&bytes)?;
            let r = envelope::decode_verified_upstream_with(l.envelope, |s| dids.resolve(s))?;
            record_seq(&mut windows, r.did.as_str(), r.seq);
        }
        let last_cp_size = match log.latest_checkpoint()? {
            Some(note) => Checkpoint::open(&note, &signer.public_key())?.size,
            None => 0,
        };
        let exporter = ParquetExporter::open(&cfg.data_dir, &dir, p)?;
        metrics
            .tree_size
            .with_label_values(&[&p.to_string()])
            .set(log.size() as i64);
        Ok(PartitionState {
            partition: p,
            dir,
            log,
            windows,
            signer,
            origin,
            last_cp_size,
            last_cp_at: None,
            metrics,
            exporter,
            patients,
            dids,
        })
    }

    /// The latest checkpoint this partition signed, as announced.
    pub fn latest_published(&self) -> Result<Option<PublishedCheckpoint>> {
        Ok(read_checkpoints(&self.dir)?
            .pop()
            .map(|c| PublishedCheckpoint {
                partition: self.partition,
                origin: self.origin.clone(),
                size: c.size,
                time_ms: c.time_ms,
                note: c.note,
            }))
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
    /// cursor in the same write as its leaves.
    pub fn process(
        &mut self,
        batch: Vec<Delivery>,
        now_ms: u64,
        cfg: &AttestorConfig,
        rejects: &RejectLog,
        durable_offsets: bool,
    ) -> Result<()> {
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
        let mut rejected = Vec::new();
        // (delivery, Some(leaf position in `leaves`) or None for rejected)
        let mut fates: Vec<(Delivery, std::result::Result<usize, String>)> =
            Vec::with_capacity(batch.len());
        // Windows of the devices this batch touched, applied once durable.
        let mut pending: HashMap<String, SeqWindow> = HashMap::new();
        for d in batch {
            let payload = &d.record.payload;
            let source = durable_offsets.then(|| format!("partition {}@{}", d.partition, d.offset));
            let reading =
                match envelope::decode_verified_upstream_with(payload, |s| self.dids.resolve(s)) {
                    Ok(r) => r,
                    Err(e) => {
                        let mut rj = Rejection::new(
                            "attestor",
                            e.code(),
                            e.to_string(),
                            payload,
                            d.record.received_ms,
                        );
                        rj.device = Some(d.record.key.clone());
                        rj.source = source;
                        rejected.push(rj);
                        fates.push((d, Err(e.code().to_owned())));
                        continue;
                    }
                };
            let did = reading.did.as_str();
            let seen = pending
                .get(did)
                .or_else(|| self.windows.get(did))
                .map_or(SeqCheck::Fresh, |w| w.check(reading.seq));
            let reason = match seen {
                SeqCheck::Seen => Some((
                    "duplicate",
                    format!("seq {} of this device was already logged", reading.seq),
                )),
                SeqCheck::TooOld => Some((
                    "replay",
                    format!(
                        "seq {} is older than the {SEQ_WINDOW}-reading anti-replay window",
                        reading.seq
                    ),
                )),
                _ if reading.time.saturating_add(cfg.max_past_ms) < now_ms => Some((
                    "clock_skew",
                    format!(
                        "device time {} is more than {} ms before log time {now_ms}",
                        reading.time, cfg.max_past_ms
                    ),
                )),
                _ if reading.time > now_ms.saturating_add(cfg.max_future_ms) => Some((
                    "clock_skew",
                    format!(
                        "device time {} is more than {} ms after log time {now_ms}",
                        reading.time, cfg.max_future_ms
                    ),
                )),
                _ => None,
            };
            match reason {
                Some((code, detail)) => {
                    let mut rj =
                        Rejection::new("attestor", code, detail, payload, d.record.received_ms);
                    rj.device = Some(did.to_owned());
                    rj.seq = Some(reading.seq);
                    rj.source = source;
                    rejected.push(rj);
                    fates.push((d, Err(code.to_owned())));
                }
                None => {
                    if !pending.contains_key(did) {
                        let w = self.windows.get(did).cloned();
                        if let Some(w) = w {
                            pending.insert(did.to_owned(), w);
                        }
                    }
                    record_seq(&mut pending, did, reading.seq);
                    leaves.push(leaf::encode(now_ms, payload));
                    logged.push(reading);
                    fates.push((d, Ok(leaves.len() - 1)));
                }
            }
        }
        // Rejections first: a crash between the two writes redelivers the
        // batch, which repeats a rejection (same `source`), never loses one.
        rejects.append(&rejected)?;
        let appended = self.log.append_batch_at(&leaves, cursor)?;
        // Durable: now the outcomes may be reported.
        self.windows.extend(pending);
        self.exporter
            .stage(appended.first_index, now_ms, logged, &appended.leaf_hashes);
        for r in &rejected {
            self.metrics.rejected.with_label_values(&[&r.reason]).inc();
        }
        self.metrics
            .appended
            .with_label_values(&[&part])
            .inc_by(leaves.len() as u64);
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
        for (d, fate) in fates {
            match fate {
                Ok(i) => d.complete(Outcome::Logged {
                    partition: self.partition,
                    index: appended.first_index + i as u64,
                }),
                Err(reason) => d.complete(Outcome::Rejected { reason }),
            }
        }
        Ok(())
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
        let snap = DedupSnapshot {
            size,
            windows: self.windows.clone(),
        };
        let bytes = serde_json::to_vec(&snap).map_err(|e| state_err(&self.dir, e))?;
        write_atomic(&self.dir, "dedup.json", &bytes)?;
        self.exporter
            .export(&self.log, &self.patients, &mut self.dids)?;
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
        let cp = PublishedCheckpoint {
            partition: state.partition,
            origin: state.origin.clone(),
            size: state.log.size(),
            time_ms: now_ms,
            note,
        };
        if tx.send(cp).await.is_err() {
            tracing::warn!(
                "checkpoint announcer is gone; the checkpoint stays in the data directory"
            );
        }
    }
}

/// Run one partition until the source closes or `shutdown` turns true.
/// Each new checkpoint is also sent to `checkpoints`, if given.
pub async fn run_partition<S: PartitionSource>(
    mut source: S,
    mut state: PartitionState,
    cfg: AttestorConfig,
    rejects: Arc<RejectLog>,
    clock: Arc<dyn Clock>,
    checkpoints: Option<tokio::sync::mpsc::Sender<PublishedCheckpoint>>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
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
                let cp = tokio::task::block_in_place(|| {
                    state.process(taken, now, &cfg, &rejects, durable)?;
                    state.maybe_checkpoint(now, &cfg, false)
                })?;
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
}
