//! The dead-letter store: every rejected reading, with its reason.
//!
//! In the distributed mode rejects are produced to the `vitals.rejected`
//! topic; in one process they are appended here, to `rejected.jsonl` in the
//! data directory (one JSON object per line, fsynced per batch), which the
//! query layer reads as the `rejected` table. Nothing is silently dropped.
//!
//! **Bounded.** A flood of garbage must not fill the disk or the memory, so
//! the store keeps every rejection in full only while
//!
//! - its source (the device it claims, else its MQTT topic, else
//!   `unknown`) is within a per-source token bucket
//!   ([`RejectLimits::per_source_per_sec`], burst
//!   [`RejectLimits::per_source_burst`]), and
//! - the file is below [`RejectLimits::max_bytes`].
//!
//! Past either limit, rejections are *counted*, not kept: once per
//! [`RejectLimits::summary_every_ms`] (a minute once the file is full) the
//! counts are written as summary records, one per (stage, reason, source),
//! whose `count` says how many rejections each stands for (at most
//! [`MAX_SUMMARY_LINES`] a flush; the rest merge into one `*` line). So every
//! rejection is accounted for in the `rejected` table (`sum(count)`), and
//! the file grows by at most a few kilobytes a minute once full. Time is the
//! rejections' own `received_ms`, so the limits are deterministic in tests.

use std::collections::{BTreeMap, HashMap};
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
    /// How many rejections this record stands for: 1, or more for a
    /// summary written past a limit (see the module docs).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub count: u64,
}

fn one() -> u64 {
    1
}

fn is_one(n: &u64) -> bool {
    *n == 1
}

/// Longest topic or device kept in a rejection (and used as a rate-limit
/// source), in bytes; longer ones are cut at a character boundary.
pub const MAX_FIELD_CHARS: usize = 256;

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Most summary records one flush writes; the rest merge into one.
pub const MAX_SUMMARY_LINES: usize = 64;

/// The limits of a [`RejectLog`].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RejectLimits {
    /// Past this file size only summaries are written.
    pub max_bytes: u64,
    /// Full records kept per source per second (token-bucket rate).
    pub per_source_per_sec: f64,
    /// Full records a source may send in a burst.
    pub per_source_burst: f64,
    /// Sources tracked at once; past it, new sources share one bucket.
    pub max_sources: usize,
    /// How often counted rejections are written as summaries, while the
    /// file is below `max_bytes` (60 s once it is full).
    pub summary_every_ms: u64,
}

impl Default for RejectLimits {
    fn default() -> Self {
        RejectLimits {
            max_bytes: 128 * 1024 * 1024,
            per_source_per_sec: 20.0,
            per_source_burst: 200.0,
            max_sources: 10_000,
            summary_every_ms: 1000,
        }
    }
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
            count: 1,
        }
    }

    /// The source a rejection is rate-limited under (at most
    /// [`MAX_FIELD_CHARS`] characters, so hostile topics cannot blow up the
    /// limiter's memory).
    fn limit_key(&self) -> &str {
        let k = self
            .device
            .as_deref()
            .or(self.topic.as_deref())
            .unwrap_or("unknown");
        truncate(k, MAX_FIELD_CHARS)
    }

    /// Cut the free-text fields a sender controls (topic, device, detail)
    /// to [`MAX_FIELD_CHARS`] characters.
    pub fn bounded(mut self) -> Self {
        for s in [&mut self.topic, &mut self.device].into_iter().flatten() {
            let cut = truncate(s, MAX_FIELD_CHARS).len();
            s.truncate(cut);
        }
        let cut = truncate(&self.detail, 4 * MAX_FIELD_CHARS).len();
        self.detail.truncate(cut);
        self
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

#[derive(Debug, Default)]
struct Tally {
    count: u64,
    bytes: u64,
    last_ms: u64,
}

/// Counters of a store, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RejectStats {
    /// The file's size in bytes.
    pub bytes: u64,
    /// Rejections written in full.
    pub kept: u64,
    /// Rejections only counted (past a limit).
    pub summarised: u64,
}

#[derive(Debug)]
struct State {
    file: File,
    limits: RejectLimits,
    stats: RejectStats,
    now_ms: u64,
    buckets: HashMap<String, Bucket>,
    tallies: BTreeMap<(String, String, String), Tally>,
    last_flush_ms: u64,
}

impl State {
    /// Take a token from `key`'s bucket.
    fn admit(&mut self, key: &str, now: u64) -> bool {
        let l = self.limits;
        if !self.buckets.contains_key(key) && self.buckets.len() >= l.max_sources {
            // Forget sources whose buckets have refilled; if none has, new
            // sources share one bucket.
            self.buckets.retain(|_, b| {
                b.tokens + (now.saturating_sub(b.at_ms) as f64 / 1000.0) * l.per_source_per_sec
                    < l.per_source_burst
            });
        }
        let key = if self.buckets.contains_key(key) || self.buckets.len() < l.max_sources {
            key
        } else {
            "*"
        };
        let b = self.buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: l.per_source_burst,
            at_ms: now,
        });
        let refill = (now.saturating_sub(b.at_ms) as f64 / 1000.0) * l.per_source_per_sec;
        b.tokens = (b.tokens + refill).min(l.per_source_burst);
        b.at_ms = b.at_ms.max(now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn tally(&mut self, r: &Rejection) {
        let key = (r.stage.clone(), r.reason.clone(), r.limit_key().to_owned());
        let key = if self.tallies.contains_key(&key) || self.tallies.len() < self.limits.max_sources
        {
            key
        } else {
            (r.stage.clone(), r.reason.clone(), "*".to_owned())
        };
        let t = self.tallies.entry(key).or_default();
        t.count = t.count.saturating_add(r.count);
        t.bytes = t.bytes.saturating_add(r.size);
        t.last_ms = t.last_ms.max(r.received_ms);
        self.stats.summarised = self.stats.summarised.saturating_add(r.count);
    }

    /// Summary records of the counted rejections, if a flush is due.
    fn flush(&mut self, force: bool) -> Vec<Rejection> {
        let every = if self.stats.bytes >= self.limits.max_bytes {
            60_000
        } else {
            self.limits.summary_every_ms
        };
        if self.tallies.is_empty()
            || (!force && self.now_ms.saturating_sub(self.last_flush_ms) < every)
        {
            return vec![];
        }
        self.last_flush_ms = self.now_ms;
        let mut all: Vec<_> = std::mem::take(&mut self.tallies).into_iter().collect();
        all.sort_by_key(|t| std::cmp::Reverse(t.1.count));
        let mut rest = Tally::default();
        let mut out = Vec::new();
        for (i, ((stage, reason, source), t)) in all.into_iter().enumerate() {
            if i + 1 < MAX_SUMMARY_LINES {
                out.push(summary(&stage, &reason, &source, &t));
            } else {
                rest.count = rest.count.saturating_add(t.count);
                rest.bytes = rest.bytes.saturating_add(t.bytes);
                rest.last_ms = rest.last_ms.max(t.last_ms);
            }
        }
        if rest.count > 0 {
            out.push(summary("*", "*", "*", &rest));
        }
        out
    }
}

fn summary(stage: &str, reason: &str, source: &str, t: &Tally) -> Rejection {
    Rejection {
        received_ms: t.last_ms,
        stage: stage.to_owned(),
        reason: reason.to_owned(),
        detail: format!(
            "{} rejections ({} bytes) from {source} counted, not kept: past the dead-letter rate or size limit",
            t.count, t.bytes
        ),
        device: (source.starts_with("did:")).then(|| source.to_owned()),
        seq: None,
        topic: None,
        size: t.bytes,
        envelope_b64: None,
        source: None,
        count: t.count,
    }
}

/// Append-only, fsynced, bounded JSON-lines file of rejections.
#[derive(Debug)]
pub struct RejectLog {
    path: PathBuf,
    state: Mutex<State>,
    metrics: Option<crate::metrics::Metrics>,
}

fn err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::DeadLetter {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

impl RejectLog {
    /// Open (or create) the store at `path` with the default limits.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, RejectLimits::default())
    }

    /// Open (or create) the store at `path`, cutting a torn last line.
    pub fn open_with(path: impl AsRef<Path>, limits: RejectLimits) -> Result<Self> {
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
        // Only the tail can be torn: look at the last 64 KiB, not the whole file.
        let len = file.metadata().map_err(|e| err(&path, e))?.len();
        let from = len.saturating_sub(64 * 1024);
        let mut tail = Vec::new();
        file.seek(SeekFrom::Start(from))
            .map_err(|e| err(&path, e))?;
        file.read_to_end(&mut tail).map_err(|e| err(&path, e))?;
        let keep = match tail.iter().rposition(|&b| b == b'\n') {
            Some(i) => from + i as u64 + 1,
            None if from == 0 => 0,
            None => len,
        };
        if keep != len {
            file.set_len(keep).map_err(|e| err(&path, e))?;
            file.sync_all().map_err(|e| err(&path, e))?;
        }
        Ok(RejectLog {
            path,
            state: Mutex::new(State {
                file,
                limits,
                stats: RejectStats {
                    bytes: keep,
                    ..RejectStats::default()
                },
                now_ms: 0,
                buckets: HashMap::new(),
                tallies: BTreeMap::new(),
                last_flush_ms: 0,
            }),
            metrics: None,
        })
    }

    /// Report the store's size and counts in `metrics` from now on.
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> Self {
        if let Ok(st) = self.state.get_mut() {
            metrics.max_bytes.set(st.limits.max_bytes as i64);
            metrics.bytes.set(st.stats.bytes as i64);
        }
        self.metrics = Some(metrics);
        self
    }

    /// The store's counters.
    pub fn stats(&self) -> RejectStats {
        self.state.lock().map(|s| s.stats).unwrap_or_default()
    }

    /// The store's limits.
    pub fn limits(&self) -> RejectLimits {
        self.state.lock().map(|s| s.limits).unwrap_or_default()
    }

    /// Advance the store's clock to `now_ms` and write the counted
    /// rejections if a summary is due (call about once a second, so counts
    /// do not wait for the next rejection). Blocking.
    pub fn tick(&self, now_ms: u64) -> Result<()> {
        let mut st = self
            .state
            .lock()
            .map_err(|_| err(&self.path, "lock poisoned"))?;
        st.now_ms = st.now_ms.max(now_ms);
        let recs = st.flush(false);
        self.write(&mut st, &recs)
    }

    /// Write the counted rejections now (at shutdown). Blocking.
    pub fn flush(&self) -> Result<()> {
        let mut st = self
            .state
            .lock()
            .map_err(|_| err(&self.path, "lock poisoned"))?;
        let recs = st.flush(true);
        self.write(&mut st, &recs)
    }

    fn write(&self, st: &mut State, recs: &[Rejection]) -> Result<()> {
        if recs.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(recs.len() * 256);
        for r in recs {
            self.line(&mut buf, r)?;
        }
        self.write_bytes(st, &buf)
    }

    /// Serialize one record as a line onto `buf`.
    fn line(&self, buf: &mut Vec<u8>, r: &Rejection) -> Result<()> {
        serde_json::to_writer(&mut *buf, r).map_err(|e| err(&self.path, e))?;
        buf.push(b'\n');
        Ok(())
    }

    fn write_bytes(&self, st: &mut State, buf: &[u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        st.file.write_all(buf).map_err(|e| err(&self.path, e))?;
        st.file.sync_data().map_err(|e| err(&self.path, e))?;
        st.stats.bytes += buf.len() as u64;
        if let Some(m) = &self.metrics {
            m.bytes.set(st.stats.bytes as i64);
        }
        Ok(())
    }

    /// Append (within the limits, see the module docs) and fsync.
    /// Blocking: call from a blocking context. When it returns, every
    /// rejection is either written in full or counted in a summary that
    /// the next flush writes.
    pub fn append(&self, rejections: &[Rejection]) -> Result<()> {
        if rejections.is_empty() {
            return Ok(());
        }
        let mut st = self
            .state
            .lock()
            .map_err(|_| err(&self.path, "lock poisoned"))?;
        // The lines this append writes, each serialized once; their size
        // counts against the cap, so one batch cannot overshoot it.
        let mut buf = Vec::with_capacity(rejections.len() * 256);
        for r in rejections {
            st.now_ms = st.now_ms.max(r.received_ms);
            let now = st.now_ms;
            let start = buf.len();
            self.line(&mut buf, &r.clone().bounded())?;
            let room = st.stats.bytes + buf.len() as u64 <= st.limits.max_bytes;
            if room && r.count == 1 && st.admit(r.limit_key(), now) {
                st.stats.kept += 1;
                if let Some(m) = &self.metrics {
                    m.kept.inc();
                }
            } else {
                buf.truncate(start);
                st.tally(r);
                if let Some(m) = &self.metrics {
                    m.summarised.inc_by(r.count);
                }
            }
        }
        for r in st.flush(false) {
            self.line(&mut buf, &r)?;
        }
        self.write_bytes(&mut st, &buf)
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

    fn garbage(device: &str, at: u64, n: usize) -> Rejection {
        let mut r = Rejection::new("ingest", "malformed_cbor", "junk", &vec![0xff; n], at);
        r.device = Some(device.to_owned());
        r
    }

    /// Rejections accounted for: full records plus summary counts.
    fn accounted(p: &Path) -> u64 {
        RejectLog::read_all(p)
            .unwrap()
            .iter()
            .map(|r| r.count)
            .sum()
    }

    #[test]
    fn a_flooding_source_is_counted_not_kept_and_others_still_get_through() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("rejected.jsonl");
        let limits = RejectLimits {
            per_source_per_sec: 10.0,
            per_source_burst: 20.0,
            ..RejectLimits::default()
        };
        let log = RejectLog::open_with(&p, limits).unwrap();
        // 10 s of a flood, 1000 a second, from one source; one a second
        // from a well-behaved one.
        let mut sent = 0;
        for s in 0..10u64 {
            for i in 0..1000u64 {
                let t = s * 1000 + i;
                let batch = vec![garbage("did:key:zFlood", t, 16 * 1024)];
                log.append(&batch).unwrap();
                sent += 1;
            }
            log.append(&[garbage("did:key:zOther", s * 1000 + 999, 10)])
                .unwrap();
            sent += 1;
        }
        log.flush().unwrap();
        let all = RejectLog::read_all(&p).unwrap();
        let full_flood = all
            .iter()
            .filter(|r| r.count == 1 && r.device.as_deref() == Some("did:key:zFlood"))
            .count();
        // The burst, then about 10 a second.
        assert!((20..=130).contains(&full_flood), "{full_flood}");
        let other = all
            .iter()
            .filter(|r| r.device.as_deref() == Some("did:key:zOther"))
            .count();
        assert_eq!(other, 10, "a quiet source is never summarised");
        assert_eq!(accounted(&p), sent, "every rejection is accounted for");
        let st = log.stats();
        assert_eq!(st.kept + st.summarised, sent);
        assert_eq!(st.bytes, std::fs::metadata(&p).unwrap().len());
    }

    #[test]
    fn hostile_topics_are_cut_and_share_bounded_sources() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("rejected.jsonl");
        let log = RejectLog::open(&p).unwrap();
        let long = format!("vitals/{}", "é".repeat(30_000));
        let mut r = Rejection::new("ingest", "topic_mismatch", long.clone(), b"x", 1);
        r.topic = Some(long.clone());
        log.append(&[r]).unwrap();
        let back = &RejectLog::read_all(&p).unwrap()[0];
        assert!(back.topic.as_ref().unwrap().len() <= MAX_FIELD_CHARS);
        assert!(long.starts_with(back.topic.as_deref().unwrap()));
        assert!(back.detail.len() <= 4 * MAX_FIELD_CHARS);
        let st = log.state.lock().unwrap();
        assert!(st.buckets.keys().all(|k| k.len() <= MAX_FIELD_CHARS));
    }

    #[test]
    fn past_the_byte_cap_only_summaries_are_written() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("rejected.jsonl");
        let limits = RejectLimits {
            max_bytes: 256 * 1024,
            per_source_per_sec: 1e9,
            per_source_burst: 1e9,
            max_sources: 100,
            summary_every_ms: 1000,
        };
        let log = RejectLog::open_with(&p, limits).unwrap();
        // 20 s of 16 KiB garbage from ever-new sources, 500 a second.
        let mut sent = 0u64;
        for t in 0..1_000u64 {
            // In batches, as ingest hands them over.
            let batch: Vec<Rejection> = (0..10)
                .map(|i| garbage(&format!("did:key:z{t}-{i}"), t * 20, 16 * 1024))
                .collect();
            log.append(&batch).unwrap();
            sent += 10;
        }
        log.flush().unwrap();
        let size = std::fs::metadata(&p).unwrap().len();
        // The cap, and a few summary flushes (once a minute past the cap,
        // at most MAX_SUMMARY_LINES lines each).
        assert!(size < 256 * 1024 + 2 * 64 * 400, "{size}");
        assert_eq!(accounted(&p), sent);
        assert!(log.stats().summarised > 9000);
        // The source map stayed bounded.
        let st = log.state.lock().unwrap();
        assert!(st.buckets.len() <= 100 && st.tallies.len() <= 100);
    }
}
