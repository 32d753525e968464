//! The alert stage, `run(config, shutdown)`: it follows the partition logs
//! of a data directory (read-only, beside their writers), so it sees a
//! reading only once it is durable and knows its leaf index; feeds the
//! [`Engine`]; and writes every alarm event to `<data>/alerts/`.
//!
//! Durability and restarts (the files are specified in `docs/alerts.md`):
//! - events go to `events-<gen>.jsonl` (fsynced per round), then
//!   `state.json` is replaced atomically with the engine's state, each
//!   partition's cursor, and the events file's generation and length;
//! - on start, events past the saved length (and any later generation) are
//!   cut: the readings behind them are read again from the log and raise
//!   the same events, with the same IDs (reading-driven events are timed by
//!   the leaf's log time), so the file holds each event once;
//! - a missing or unreadable state file means a rebuild from the start of
//!   every log.
//!
//! The events file is bounded: past `max_events_bytes` a new generation
//! starts and the one before the previous is deleted.
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use vitaltrail_core::{Clock, DidCache, envelope, leaf};

use crate::AlertsConfig;
use crate::engine::{Engine, Event, LoggedReading};
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// Readings taken from one partition per round, at most.
const ROUND: u64 = 4096;

/// What the stage needs.
pub struct StageConfig {
    /// Rules and limits.
    pub alerts: AlertsConfig,
    /// The data directory whose partition logs, registry and `alerts/`
    /// directory it uses.
    pub data_dir: PathBuf,
    /// The clock of time-driven rules (silence, escalation).
    pub clock: Arc<dyn Clock>,
    /// Where its metrics are registered.
    pub metrics: prometheus::Registry,
}

impl std::fmt::Debug for StageConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageConfig")
            .field("alerts", &self.alerts)
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

/// `state.json`, read.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    /// Per partition: leaves processed.
    cursors: BTreeMap<u32, u64>,
    /// The current events file's generation and its length once written.
    events_gen: u64,
    events_len: u64,
    engine: Engine,
}

/// `state.json`, written: the same fields, borrowed.
#[derive(Serialize)]
struct SavedRef<'a> {
    cursors: &'a BTreeMap<u32, u64>,
    events_gen: u64,
    events_len: u64,
    engine: &'a Engine,
}

/// `<data>/alerts`.
pub fn alerts_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("alerts")
}

/// The events file of generation `generation`.
pub fn events_file(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("events-{generation:06}.jsonl"))
}

/// The event files present, oldest first.
pub fn event_files(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let g = name.strip_prefix("events-")?.strip_suffix(".jsonl")?;
            Some((g.parse().ok()?, e.path()))
        })
        .collect();
    v.sort();
    v
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error + use<> {
    let path = path.to_owned();
    move |source| Error::Io { op, path, source }
}

struct Stage {
    cfg: StageConfig,
    dir: PathBuf,
    engine: Engine,
    cursors: BTreeMap<u32, u64>,
    events_gen: u64,
    events_len: u64,
    events: std::fs::File,
    registry: (
        Option<std::time::SystemTime>,
        vitaltrail_bus::registry::Registry,
    ),
    metrics: Metrics,
    /// The cursors in the saved state (`None`: not saved since open).
    saved_cursors: Option<BTreeMap<u32, u64>>,
    /// Parsed `did:key`s (bounded; a parse is a curve-point decompression,
    /// issue #20).
    dids: DidCache,
}

impl Stage {
    fn open(cfg: StageConfig) -> Result<Self> {
        let dir = alerts_dir(&cfg.data_dir);
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let state = dir.join("state.json");
        let saved: Option<Saved> = match std::fs::read(&state) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(s) => Some(s),
                // Unreadable, or an engine section that does not restore
                // (an edited file, one from another version): a rebuild,
                // never a stage failure.
                Err(e) => {
                    tracing::warn!(error = %e, "alert state unreadable; rebuilding from the logs");
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io("read", &state)(e)),
        };
        let (engine, cursors, events_gen, events_len) = match saved {
            Some(s) => (
                s.engine.with_config(cfg.alerts.clone()),
                s.cursors,
                s.events_gen,
                s.events_len,
            ),
            None => {
                // A rebuild: every event is raised again from the logs.
                for (_, f) in event_files(&dir) {
                    std::fs::remove_file(&f).map_err(io("remove", &f))?;
                }
                (Engine::new(cfg.alerts.clone()), BTreeMap::new(), 0, 0)
            }
        };
        // Cut what was written after the state was saved.
        for (g, f) in event_files(&dir) {
            if g > events_gen {
                std::fs::remove_file(&f).map_err(io("remove", &f))?;
            }
        }
        let path = events_file(&dir, events_gen);
        let events = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io("open", &path))?;
        let len = events.metadata().map_err(io("stat", &path))?.len();
        if len > events_len {
            events.set_len(events_len).map_err(io("truncate", &path))?;
        }
        let metrics = Metrics::new(&cfg.metrics)?;
        metrics
            .events_file_max_bytes
            .set(cfg.alerts.max_events_bytes as i64);
        Ok(Stage {
            dir,
            engine,
            cursors,
            events_gen,
            events_len: events_len.min(len),
            events,
            registry: (None, Default::default()),
            metrics,
            saved_cursors: None,
            dids: DidCache::default(),
            cfg,
        })
    }

    fn registry(&mut self) -> Result<()> {
        let file = vitaltrail_bus::datadir::registry_file(&self.cfg.data_dir);
        let mtime = std::fs::metadata(file.path())
            .and_then(|m| m.modified())
            .ok();
        if mtime != self.registry.0 || mtime.is_none() {
            self.registry = (mtime, file.load()?);
        }
        Ok(())
    }

    /// Take what the logs committed since the last round; returns the
    /// events raised.
    fn round(&mut self) -> Result<Vec<Event>> {
        self.registry()?;
        let mut out = Vec::new();
        let partitions = vitaltrail_bus::datadir::existing_partitions(&self.cfg.data_dir);
        for p in 0..partitions {
            let dir = self.cfg.data_dir.join("partitions").join(p.to_string());
            let log = match vitaltrail_log::DurableLog::open_read_only(&dir) {
                Ok(l) => l,
                // A partition whose log is not there yet.
                Err(e) => {
                    tracing::debug!(partition = p, error = %e, "partition log not readable yet");
                    continue;
                }
            };
            let from = self.cursors.get(&p).copied().unwrap_or(0);
            let to = log.size().min(from.saturating_add(ROUND));
            self.metrics
                .lag
                .with_label_values(&[&p.to_string()])
                .set((log.size() - from.min(log.size())) as i64);
            for n in from..to {
                let bytes = log.leaf(n)?;
                if let Some(r) = self.decode(p, n, &bytes) {
                    let (reading, log_time) = r;
                    out.extend(self.engine.reading(&reading, log_time));
                    self.metrics.readings.inc();
                } else {
                    self.metrics.undecodable.inc();
                }
            }
            self.cursors.insert(p, to.max(from));
        }
        out.extend(self.engine.tick(self.cfg.clock.now_ms()));
        Ok(out)
    }

    fn decode(&mut self, partition: u32, n: u64, bytes: &[u8]) -> Option<(LoggedReading, u64)> {
        let l = leaf::decode(bytes).ok()?;
        // The log holds only what ingest verified (docs/threat-model.md);
        // a proof bundle re-checks the signature for anyone who asks.
        let dids = &mut self.dids;
        let r = envelope::decode_verified_upstream_with(l.envelope, |s| dids.resolve(s)).ok()?;
        // The registration the reading was logged under: a reading logged
        // before the device's current registration (a device reassigned to
        // another patient since) is not attributed to the new patient.
        let entry = match self.registry.1.lookup(r.did.as_str()) {
            vitaltrail_bus::registry::Lookup::Active(e)
            | vitaltrail_bus::registry::Lookup::Revoked(e) => Some(e),
            vitaltrail_bus::registry::Lookup::Unknown => None,
        }
        .filter(|e| e.added_ms <= l.log_time_ms);
        Some((
            LoggedReading {
                partition,
                log_index: n,
                device: r.did.as_str().to_owned(),
                seq: r.seq,
                time_ms: r.time,
                patient: entry.map(|e| e.patient.clone()),
                ward: entry.and_then(|e| e.ward.clone()),
                measurements: r
                    .measurements
                    .into_iter()
                    .map(|m| (m.code, m.value))
                    .collect(),
            },
            l.log_time_ms,
        ))
    }

    /// Events to the file (fsynced), then the state (atomically).
    fn persist(&mut self, events: &[Event]) -> Result<()> {
        // The engine changes only with readings (the cursors move) or
        // events; otherwise there is nothing to save.
        if events.is_empty() && self.saved_cursors.as_ref() == Some(&self.cursors) {
            return Ok(());
        }
        if !events.is_empty() {
            if self.events_len >= self.cfg.alerts.max_events_bytes {
                self.events_gen += 1;
                let path = events_file(&self.dir, self.events_gen);
                self.events = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(io("open", &path))?;
                self.events_len = 0;
                for (g, f) in event_files(&self.dir) {
                    if g + 1 < self.events_gen {
                        std::fs::remove_file(&f).map_err(io("remove", &f))?;
                    }
                }
            }
            let mut buf = Vec::new();
            for e in events {
                serde_json::to_writer(&mut buf, e).map_err(|e| Error::State(e.to_string()))?;
                buf.push(b'\n');
                self.metrics
                    .events
                    .with_label_values(&[e.kind.as_str()])
                    .inc();
            }
            let path = events_file(&self.dir, self.events_gen);
            self.events.write_all(&buf).map_err(io("append", &path))?;
            self.events.sync_data().map_err(io("fsync", &path))?;
            self.events_len += buf.len() as u64;
        }
        let saved = SavedRef {
            cursors: &self.cursors,
            events_gen: self.events_gen,
            events_len: self.events_len,
            engine: &self.engine,
        };
        let bytes = serde_json::to_vec(&saved).map_err(|e| Error::State(e.to_string()))?;
        vitaltrail_log::write_atomic(&self.dir, "state.json", &bytes)?;
        self.saved_cursors = Some(self.cursors.clone());
        self.metrics.active.set(self.engine.active().count() as i64);
        self.metrics.patients.set(self.engine.patients() as i64);
        self.metrics
            .dropped
            .set(self.engine.dropped_patients as i64);
        Ok(())
    }
}

/// Run until `shutdown` turns true (a last round is taken and saved).
pub async fn run(cfg: StageConfig, mut shutdown: watch::Receiver<bool>) -> Result<()> {
    let tick = Duration::from_millis(cfg.alerts.tick_ms.clamp(10, 60_000));
    let mut stage = tokio::task::spawn_blocking(move || Stage::open(cfg))
        .await
        .map_err(|e| Error::State(format!("alert stage task: {e}")))??;
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stop = tokio::select! {
            _ = interval.tick() => false,
            _ = shutdown.changed() => true,
        } || *shutdown.borrow();
        stage = tokio::task::spawn_blocking(move || -> Result<Stage> {
            let events = stage.round()?;
            stage.persist(&events)?;
            Ok(stage)
        })
        .await
        .map_err(|e| Error::State(format!("alert stage task: {e}")))??;
        if stop {
            return Ok(());
        }
    }
}
