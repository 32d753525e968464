//! The attestor's streaming side: one worker per partition.
//!
//! For each batch from its [`PartitionSource`] a worker
//!
//! 1. decodes every envelope (the signature was batch-verified by ingest;
//!    proof verifiers re-check it, because the leaf holds the exact bytes);
//! 2. rejects `(device, seq)` pairs that are not strictly increasing
//!    (`duplicate` when equal to the last, `replay` when lower) and readings
//!    whose device time is outside the skew window (`clock_skew`);
//! 3. appends the rest to the partition's [`DurableLog`] and the rejects to
//!    the dead-letter store, both fsynced;
//! 4. only then reports each record's outcome to the bus (which is when
//!    ingest acknowledges MQTT, or Kafka offsets may be committed);
//! 5. signs a checkpoint when the interval has passed or enough leaves were
//!    appended, stores it, and snapshots the dedup state.
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
use vitaltrail_core::{Checkpoint, Clock, LogSigner, SecretKey, envelope, leaf};

use crate::durable::{DurableLog, write_atomic};
use crate::error::{Error, Result};
use crate::metrics::Metrics;

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

#[derive(Debug, Serialize, Deserialize)]
struct DedupSnapshot {
    size: u64,
    last_seq: HashMap<String, u64>,
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

/// The state a worker owns for one partition.
#[derive(Debug)]
pub struct PartitionState {
    partition: u32,
    dir: PathBuf,
    log: DurableLog,
    last_seq: HashMap<String, u64>,
    signer: LogSigner,
    origin: String,
    last_cp_size: u64,
    last_cp_at: Option<Instant>,
    metrics: Metrics,
}

fn state_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::State {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

impl PartitionState {
    /// Open partition `p`'s log and rebuild its dedup state.
    pub fn open(cfg: &AttestorConfig, p: u32, key: &SecretKey, metrics: Metrics) -> Result<Self> {
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
        let (mut last_seq, from) = match std::fs::read(&snap_path) {
            Ok(b) => {
                let s: DedupSnapshot =
                    serde_json::from_slice(&b).map_err(|e| state_err(&snap_path, e))?;
                if s.size > log.size() {
                    return Err(state_err(&snap_path, "snapshot is ahead of the log"));
                }
                (s.last_seq, s.size)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (HashMap::new(), 0),
            Err(e) => return Err(state_err(&snap_path, e)),
        };
        for i in from..log.size() {
            let bytes = log.leaf(i)?;
            let l = leaf::decode(&bytes)?;
            let r = envelope::decode_verified_upstream(l.envelope)?;
            let e = last_seq.entry(r.did.as_str().to_owned()).or_insert(r.seq);
            *e = (*e).max(r.seq);
        }
        let last_cp_size = match log.latest_checkpoint()? {
            Some(note) => Checkpoint::open(&note, &signer.public_key())?.size,
            None => 0,
        };
        metrics
            .tree_size
            .with_label_values(&[&p.to_string()])
            .set(log.size() as i64);
        Ok(PartitionState {
            partition: p,
            dir,
            log,
            last_seq,
            signer,
            origin,
            last_cp_size,
            last_cp_at: None,
            metrics,
        })
    }

    /// The partition log.
    pub fn log(&self) -> &DurableLog {
        &self.log
    }

    /// Decide, persist, and report a batch. Blocking (fsync).
    pub fn process(
        &mut self,
        batch: Vec<Delivery>,
        now_ms: u64,
        cfg: &AttestorConfig,
        rejects: &RejectLog,
    ) -> Result<()> {
        let start = Instant::now();
        let part = self.partition.to_string();
        self.metrics
            .batch_size
            .with_label_values(&[&part])
            .observe(batch.len() as f64);
        let mut leaves = Vec::with_capacity(batch.len());
        let mut rejected = Vec::new();
        // (delivery, Some(leaf position in `leaves`) or None for rejected)
        let mut fates: Vec<(Delivery, std::result::Result<usize, String>)> =
            Vec::with_capacity(batch.len());
        let mut pending: HashMap<String, u64> = HashMap::new();
        for d in batch {
            let payload = &d.record.payload;
            let reading = match envelope::decode_verified_upstream(payload) {
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
                    rejected.push(rj);
                    fates.push((d, Err(e.code().to_owned())));
                    continue;
                }
            };
            let did = reading.did.as_str();
            let last = pending.get(did).or_else(|| self.last_seq.get(did)).copied();
            let reason = match last {
                Some(l) if reading.seq == l => Some((
                    "duplicate",
                    format!("seq {} was already logged", reading.seq),
                )),
                Some(l) if reading.seq < l => Some((
                    "replay",
                    format!("seq {} is below the last logged seq {l}", reading.seq),
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
                    rejected.push(rj);
                    fates.push((d, Err(code.to_owned())));
                }
                None => {
                    pending.insert(did.to_owned(), reading.seq);
                    leaves.push(leaf::encode(now_ms, payload));
                    fates.push((d, Ok(leaves.len() - 1)));
                }
            }
        }
        let appended = self.log.append_batch(&leaves)?;
        rejects.append(&rejected)?;
        // Durable: now the outcomes may be reported.
        self.last_seq.extend(pending);
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
            last_seq: self.last_seq.clone(),
        };
        let bytes = serde_json::to_vec(&snap).map_err(|e| state_err(&self.dir, e))?;
        write_atomic(&self.dir, "dedup.json", &bytes)?;
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

/// Run one partition until the source closes or `shutdown` turns true.
pub async fn run_partition<S: PartitionSource>(
    mut source: S,
    mut state: PartitionState,
    cfg: AttestorConfig,
    rejects: Arc<RejectLog>,
    clock: Arc<dyn Clock>,
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
                tokio::task::block_in_place(|| {
                    state.process(taken, now, &cfg, &rejects)?;
                    state.maybe_checkpoint(now, &cfg, false)
                })?;
            }
            _ = tick.tick() => {
                let now = clock.now_ms();
                tokio::task::block_in_place(|| state.maybe_checkpoint(now, &cfg, false))?;
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    break;
                }
            }
        }
    }
    let now = clock.now_ms();
    tokio::task::block_in_place(|| state.maybe_checkpoint(now, &cfg, true))?;
    Ok(())
}
