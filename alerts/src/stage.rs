//! The alert stage, `run(config, shutdown)`: it takes readings only once
//! they are durable in a partition log, with their leaf index, from one of
//! two sources ([`AlertsSource`]):
//! - the partition logs of its data directory, followed read-only beside
//!   their writers (one process: `vitaltrail up`);
//! - `vitals.logged` on Kafka, where every attestor announces each leaf
//!   once it is durable, under a MAC (`vitaltrail alerts`, `up --kafka`):
//!   the logs may be on other machines, and several engines split the
//!   topic's partitions, so the patients, between them.
//!
//! It feeds the [`Engine`] and writes every alarm event to `<data>/alerts/`.
//!
//! Durability and restarts (the files are specified in `docs/alerts.md`):
//! - events go to `events-<gen>.jsonl` (fsynced per round), then
//!   `state.json` is replaced atomically with the engine's state, each
//!   partition's cursor (or, from Kafka, each topic partition's offset and
//!   the next leaf expected of each log in it), and the events file's
//!   generation and length;
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
use vitaltrail_bus::kafka::KafkaConfig;
use vitaltrail_bus::logged::{Announced, LOGGED_TOPIC, LoggedConsumer};
use vitaltrail_bus::registry::{Lookup, Registry, SharedRegistry};
use vitaltrail_core::busauth::LoggedKey;
use vitaltrail_core::{Clock, DeviceId, DidCache, envelope, leaf};

use crate::AlertsConfig;
use crate::ack::{AckInbox, AckRequest};
use crate::delivery::{Backoff, ChannelSpec, Channels, Committed, Wards};
use crate::engine::{Engine, Event, LoggedReading};
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// Readings taken from one partition per round, at most.
const ROUND: u64 = 4096;

/// Where the stage takes durable readings from.
// Built once per process: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum AlertsSource {
    /// The partition logs of the data directory, read-only.
    Logs,
    /// `vitals.logged` on Kafka.
    Kafka {
        /// The cluster and client settings (the bus key is not used).
        kafka: KafkaConfig,
        /// The key of the announcements' MAC (derived from the bus key).
        key: LoggedKey,
        /// The `vitals.logged` partitions this engine owns (empty: every
        /// partition of the topic).
        partitions: Vec<u32>,
        /// Other engines own the topic's other partitions. Without it,
        /// `partitions` must cover the whole topic.
        partial: bool,
        /// Whose signature `vitals.devices` records must carry (default:
        /// the data directory's operator key).
        operator: Option<DeviceId>,
    },
}

impl std::fmt::Debug for AlertsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AlertsSource::Logs => f.write_str("Logs"),
            AlertsSource::Kafka {
                kafka,
                partitions,
                partial,
                operator,
                ..
            } => f
                .debug_struct("Kafka")
                .field("kafka", kafka)
                .field("partitions", partitions)
                .field("partial", partial)
                .field("operator", operator)
                .finish_non_exhaustive(),
        }
    }
}

/// The consumer group `vitals.logged` offsets are committed in (for lag
/// monitoring only; each engine resumes from its own state).
pub const LOGGED_GROUP: &str = "vitaltrail-alerts";

/// What the stage needs.
pub struct StageConfig {
    /// Rules and limits.
    pub alerts: AlertsConfig,
    /// Where durable readings come from.
    pub source: AlertsSource,
    /// The data directory whose partition logs, registry and `alerts/`
    /// directory it uses.
    pub data_dir: PathBuf,
    /// The clock of time-driven rules (silence, escalation).
    pub clock: Arc<dyn Clock>,
    /// Where its metrics are registered.
    pub metrics: prometheus::Registry,
    /// The broker nurse stations subscribe to (`alerts/<ward>`), as the
    /// pipeline; `None`: no MQTT delivery.
    pub mqtt: Option<vitaltrail_mqtt::MqttEndpoint>,
    /// Acknowledgements from the HTTP server ([`crate::ack::inbox`]);
    /// `None`: none are taken.
    pub acks: Option<AckInbox>,
    /// Over the logs, in process: told when an attestor commits, so a
    /// round starts at once (at least [`MIN_ROUND_GAP`] after the last)
    /// rather than at the next tick. `None`: rounds at each tick.
    pub wake: Option<Arc<tokio::sync::Notify>>,
}

impl std::fmt::Debug for StageConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageConfig")
            .field("alerts", &self.alerts)
            .field("source", &self.source)
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

/// `state.json`, read.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    /// Per partition: leaves processed (from the logs).
    cursors: BTreeMap<u32, u64>,
    /// From Kafka: per `vitals.logged` partition, the next offset.
    #[serde(default)]
    offsets: BTreeMap<u32, u64>,
    /// From Kafka: per `"<topic partition>/<log partition>"`, the next leaf
    /// index expected (an announcement below it is a repeat).
    #[serde(default)]
    expected: BTreeMap<String, u64>,
    /// The events series (a new one on every rebuild): delivery cursors
    /// of another series start again from the beginning.
    #[serde(default)]
    series: u64,
    /// The current events file's generation and its length once written.
    events_gen: u64,
    events_len: u64,
    engine: Engine,
}

/// `state.json`, written: the same fields, borrowed.
#[derive(Serialize)]
struct SavedRef<'a> {
    cursors: &'a BTreeMap<u32, u64>,
    offsets: &'a BTreeMap<u32, u64>,
    expected: &'a BTreeMap<String, u64>,
    series: u64,
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

/// The device registry as the stage sees it.
enum Devices {
    /// `<data>/devices.json`, re-read when its modification time changes
    /// (checked every round, so a registration the attestor saw is seen).
    File(Option<std::time::SystemTime>, Registry),
    /// Followed from `vitals.devices` and the local file (Kafka).
    Shared(SharedRegistry),
}

/// What the registry says of a device: patient, ward, registered at.
type Registration = (String, Option<String>, u64);

impl Devices {
    fn lookup(&self, did: &str) -> Option<Registration> {
        let pick = |r: &Registry| match r.lookup(did) {
            Lookup::Active(e) | Lookup::Revoked(e) => {
                Some((e.patient.clone(), e.ward.clone(), e.added_ms))
            }
            Lookup::Unknown => None,
        };
        match self {
            Devices::File(_, r) => pick(r),
            Devices::Shared(s) => s.with(pick),
        }
    }
}

/// The saved positions, to tell whether a round moved any.
#[derive(Clone, PartialEq)]
struct Marks {
    cursors: BTreeMap<u32, u64>,
    offsets: BTreeMap<u32, u64>,
}

struct Stage {
    cfg: StageConfig,
    dir: PathBuf,
    engine: Engine,
    cursors: BTreeMap<u32, u64>,
    offsets: BTreeMap<u32, u64>,
    expected: BTreeMap<String, u64>,
    /// Over Kafka: how many partitions `vitals.logged` has.
    logged_partitions: u32,
    series: u64,
    events_gen: u64,
    events_len: u64,
    events: std::fs::File,
    registry: Devices,
    metrics: Metrics,
    /// The positions in the saved state (`None`: not saved since open).
    saved: Option<Marks>,
    /// Parsed `did:key`s (bounded; a parse is a curve-point decompression,
    /// issue #20).
    dids: DidCache,
    /// The delivery channels' cursors, for dead letters at rotation.
    channels: Channels,
    /// What is committed, for the delivery channels.
    committed: watch::Sender<Committed>,
    /// The latest log time of a leaf taken (the log's clock, while behind).
    log_now: u64,
    /// When the state was last saved.
    saved_at: Option<std::time::Instant>,
    /// When the clock-driven rules last ran: at most once per `tick_ms`,
    /// however often commits start rounds.
    ticked: Option<std::time::Instant>,
}

/// A round that raised nothing saves the state at most this often.
const SAVE_EVERY: Duration = Duration::from_secs(5);

impl Stage {
    fn open(cfg: StageConfig, registry: Devices) -> Result<Self> {
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
        let (engine, cursors, offsets, expected, series, events_gen, events_len) = match saved {
            Some(s) => (
                s.engine.with_config(cfg.alerts.clone()),
                s.cursors,
                s.offsets,
                s.expected,
                s.series,
                s.events_gen,
                s.events_len,
            ),
            None => {
                // A rebuild: every event is raised again from the logs. Over
                // Kafka only what the topic still holds can be read again,
                // so the old events are kept aside, never deleted.
                let files = event_files(&dir);
                let aside = dir.join(format!("replaced-{}", cfg.clock.now_ms()));
                if matches!(cfg.source, AlertsSource::Kafka { .. }) && !files.is_empty() {
                    std::fs::create_dir_all(&aside).map_err(io("create", &aside))?;
                    tracing::warn!(to = %aside.display(), "alert state lost: the events so far are kept aside, and the engine starts again from the oldest vitals.logged record Kafka holds");
                }
                for (_, f) in files {
                    if matches!(cfg.source, AlertsSource::Kafka { .. }) {
                        let to = aside.join(f.file_name().unwrap_or_default());
                        std::fs::rename(&f, &to).map_err(io("move", &f))?;
                    } else {
                        std::fs::remove_file(&f).map_err(io("remove", &f))?;
                    }
                }
                (
                    Engine::new(cfg.alerts.clone()),
                    BTreeMap::new(),
                    BTreeMap::new(),
                    BTreeMap::new(),
                    // Under 2^53, so JSON tools read it exactly.
                    rand::random::<u64>() >> 11,
                    0,
                    0,
                )
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
        let events_len = events_len.min(len);
        Ok(Stage {
            channels: Channels::default(),
            committed: watch::Sender::new(Committed {
                series,
                generation: events_gen,
                len: events_len,
            }),
            series,
            dir,
            engine,
            cursors,
            offsets,
            expected,
            logged_partitions: 1,
            events_gen,
            events_len,
            events,
            registry,
            metrics,
            saved: None,
            dids: DidCache::default(),
            log_now: 0,
            saved_at: None,
            ticked: None,
            cfg,
        })
    }

    /// Start a delivery channel over this stage's events files (its dead
    /// letters bounded as they are).
    fn start_channel<S: crate::delivery::Sink>(
        &self,
        name: String,
        wards: Wards,
        backoff: Backoff,
        sink: S,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<tokio::task::JoinHandle<Result<()>>> {
        crate::delivery::start_channel(
            ChannelSpec {
                name,
                wards,
                backoff,
                dead_letters_max: self.cfg.alerts.max_events_bytes,
            },
            sink,
            self.dir.clone(),
            self.channels.clone(),
            self.committed.subscribe(),
            shutdown.clone(),
            self.metrics.clone(),
        )
    }

    fn registry(&mut self) -> Result<()> {
        let Devices::File(seen, reg) = &mut self.registry else {
            return Ok(());
        };
        let file = vitaltrail_bus::datadir::registry_file(&self.cfg.data_dir);
        let mtime = std::fs::metadata(file.path())
            .and_then(|m| m.modified())
            .ok();
        if mtime != *seen || mtime.is_none() {
            *reg = file.load()?;
            *seen = mtime;
        }
        Ok(())
    }

    /// Take `acks`, then `announced` (Kafka) or what the logs committed
    /// since the last round; returns the events raised, and the answers to
    /// give once they are durable.
    fn round(&mut self, announced: Vec<Announced>, acks: Vec<AckRequest>) -> Result<Round> {
        let mut answers = Vec::with_capacity(acks.len());
        let mut out = Vec::new();
        // First, so an acknowledgement stops an escalation due this round.
        let now = self.cfg.clock.now_ms();
        for a in acks {
            let r = self.engine.acknowledge(&a.id, &a.actor, now);
            if let Ok(ev) = &r {
                out.push(ev.clone());
            }
            self.metrics
                .acks
                .with_label_values(&[match &r {
                    Ok(_) => "taken",
                    Err(e) => e.outcome(),
                }])
                .inc();
            answers.push((a.reply, r));
        }
        let out = self.take(announced, out)?;
        Ok(Round {
            events: out,
            answers,
        })
    }

    fn take(&mut self, announced: Vec<Announced>, mut out: Vec<Event>) -> Result<Vec<Event>> {
        self.registry()?;
        if matches!(self.cfg.source, AlertsSource::Kafka { .. }) {
            // A full batch: more is waiting (a backlog, a rebuild).
            let behind = announced.len() >= ROUND as usize;
            self.take_announced(announced, &mut out);
            if self.tick_due() {
                out.extend(self.engine.tick(self.tick_time(behind)));
            }
            return Ok(out);
        }
        let mut behind = false;
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
            behind |= to < log.size();
            for n in from..to {
                let bytes = log.leaf(n)?;
                self.score(p, n, &bytes, None, &mut out);
            }
            self.cursors.insert(p, to.max(from));
        }
        if self.tick_due() {
            out.extend(self.engine.tick(self.tick_time(behind)));
        }
        Ok(out)
    }

    /// Whether the clock-driven rules run this round: at most once per
    /// `tick_ms`, however often commits start rounds.
    fn tick_due(&mut self) -> bool {
        let every = Duration::from_millis(self.cfg.alerts.tick_ms);
        match self.ticked {
            Some(t) if t.elapsed() < every => false,
            _ => {
                self.ticked = Some(std::time::Instant::now());
                true
            }
        }
    }

    /// The time the clock-driven rules (silence, escalation) are judged at:
    /// the engine's clock once it has caught up with the log; while it is
    /// behind (a backlog, a rebuild), the log time of the latest leaf it
    /// took, so they are timed as they would have been then, not all at
    /// once by today's clock.
    fn tick_time(&self, behind: bool) -> u64 {
        if behind {
            self.log_now
        } else {
            self.cfg.clock.now_ms()
        }
    }

    /// Score announcements in order: each once (a repeat, at or below a
    /// leaf already taken from its log in its topic partition, is dropped),
    /// and only if its MAC checks out and it is in the partition its key
    /// belongs in (a genuine record copied elsewhere is dropped).
    fn take_announced(&mut self, announced: Vec<Announced>, out: &mut Vec<Event>) {
        for a in announced {
            let next = self.offsets.entry(a.topic_partition).or_insert(0);
            if *next > 0 && a.offset > *next {
                tracing::warn!(
                    partition = a.topic_partition,
                    from = *next,
                    to = a.offset,
                    "vitals.logged records skipped: the saved offset is no longer in Kafka (retention); readings in between are not scored"
                );
            }
            *next = (*next).max(a.offset.saturating_add(1));
            let Some((p, n)) = a.position.filter(|_| a.authentic) else {
                // Anyone who can produce to Kafka can write the topic; only
                // an attestor holds the key (docs/threat-model.md).
                self.metrics.unauthentic.inc();
                let count = self.metrics.unauthentic.get();
                if count == 1 || count.is_multiple_of(10_000) {
                    tracing::warn!(
                        count,
                        partition = a.topic_partition,
                        offset = a.offset,
                        "vitals.logged records without a valid MAC are dropped; if none is taken, \
                         this engine's key (--logged-key-file) is not the one exported from this \
                         pipeline's bus key"
                    );
                }
                continue;
            };
            if vitaltrail_bus::partition_for(&a.key, self.logged_partitions) != a.topic_partition {
                self.metrics.misplaced.inc();
                continue;
            }
            let expected = self
                .expected
                .entry(format!("{}/{p}", a.topic_partition))
                .or_insert(0);
            if n < *expected {
                self.metrics.repeats.inc();
                continue;
            }
            *expected = n.saturating_add(1);
            self.score(p, n, &a.leaf, Some(&a.key), out);
        }
    }

    /// Feed one durable leaf to the engine; `announced`: the patient the
    /// attestor announced it under.
    fn score(
        &mut self,
        p: u32,
        n: u64,
        bytes: &[u8],
        announced: Option<&str>,
        out: &mut Vec<Event>,
    ) {
        if let Some((reading, log_time)) = self.decode(p, n, bytes, announced) {
            self.log_now = self.log_now.max(log_time);
            out.extend(self.engine.reading(&reading, log_time));
            self.metrics.readings.inc();
        } else {
            self.metrics.undecodable.inc();
        }
    }

    fn decode(
        &mut self,
        partition: u32,
        n: u64,
        bytes: &[u8],
        announced: Option<&str>,
    ) -> Option<(LoggedReading, u64)> {
        let l = leaf::decode(bytes).ok()?;
        // The log holds only what ingest verified (docs/threat-model.md);
        // a proof bundle re-checks the signature for anyone who asks.
        let dids = &mut self.dids;
        let r = envelope::decode_verified_upstream_with(l.envelope, |s| dids.resolve(s)).ok()?;
        // The registration the reading was logged under: a reading logged
        // before the device's current registration (a device reassigned to
        // another patient since) is not attributed to the new patient.
        let entry = self.registry.lookup(r.did.as_str());
        let (patient, ward) = match (announced, entry) {
            (None, Some(e)) if e.2 <= l.log_time_ms => (Some(e.0), e.1),
            (None, _) => (None, None),
            // Over Kafka the patient is the one the attestor announced (the
            // key the MAC covers, and the one this engine's partition
            // follows), with the ward if this registry agrees.
            (Some(key), Some(e)) if e.0 == key && e.2 <= l.log_time_ms => (Some(e.0), e.1),
            // Registered to someone else, or after the reading was logged
            // (a reassignment announced again after an attestor restart).
            (Some(_), Some(_)) => (None, None),
            // This registry has not caught up with the attestor's.
            (Some(key), None) if key != r.did.as_str() => (Some(key.to_owned()), None),
            (Some(_), None) => (None, None),
        };
        Some((
            LoggedReading {
                partition,
                log_index: n,
                device: r.did.as_str().to_owned(),
                seq: r.seq,
                time_ms: r.time,
                patient,
                ward,
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
    #[cfg(test)]
    fn persist(&mut self, events: &[Event]) -> Result<()> {
        self.persist_when(events, true)
    }

    /// Save what a round did. Events are always committed at once (the
    /// delivery channels send only what is committed). A round that raised
    /// nothing is saved only every [`SAVE_EVERY`] (or when `force`, at a
    /// stop): until then a crash re-reads its leaves from the log, which
    /// gives the same state, so the state file is not rewritten for
    /// readings that changed no alarm.
    fn persist_when(&mut self, events: &[Event], force: bool) -> Result<()> {
        self.metrics.active.set(self.engine.active().count() as i64);
        self.metrics.patients.set(self.engine.patients() as i64);
        self.metrics
            .dropped
            .set(self.engine.dropped_patients as i64);
        self.metrics.forgotten.set(self.engine.forgotten as i64);
        self.metrics.late.set(self.engine.late_readings as i64);
        let marks = Marks {
            cursors: self.cursors.clone(),
            offsets: self.offsets.clone(),
        };
        if events.is_empty()
            && (self.saved.as_ref() == Some(&marks)
                || (!force && self.saved_at.is_some_and(|t| t.elapsed() < SAVE_EVERY)))
        {
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
                        // The outbox's bound: what a channel has not
                        // delivered of it goes to its dead letters first.
                        if let Err(e) = crate::delivery::dead_letter_generation(
                            &self.dir,
                            &self.channels,
                            self.series,
                            g,
                            &f,
                            self.cfg.alerts.max_events_bytes,
                            &self.metrics,
                        ) {
                            // Kept, and tried again at the next rotation:
                            // never deleted undelivered and uncounted.
                            tracing::error!(error = %e, generation = g, "moving undelivered events to dead letters failed; the events file is kept");
                            continue;
                        }
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
            offsets: &self.offsets,
            expected: &self.expected,
            series: self.series,
            events_gen: self.events_gen,
            events_len: self.events_len,
            engine: &self.engine,
        };
        let bytes = serde_json::to_vec(&saved).map_err(|e| Error::State(e.to_string()))?;
        vitaltrail_log::write_atomic(&self.dir, "state.json", &bytes)?;
        self.committed.send_replace(Committed {
            series: self.series,
            generation: self.events_gen,
            len: self.events_len,
        });
        self.saved = Some(marks);
        self.saved_at = Some(std::time::Instant::now());
        self.metrics.state_saves.inc();
        Ok(())
    }
}

/// Run until `shutdown` turns true (a last round is taken and saved).
pub async fn run(cfg: StageConfig, shutdown: watch::Receiver<bool>) -> Result<()> {
    match cfg.source.clone() {
        AlertsSource::Logs => {
            let devices = Devices::File(None, Registry::default());
            let stage = open(cfg, devices).await?;
            let delivery = start_delivery(&stage, &shutdown).await?;
            let res = follow_logs(stage, shutdown).await;
            finish(delivery, res).await
        }
        AlertsSource::Kafka {
            kafka,
            key,
            partitions,
            partial,
            operator,
        } => {
            if !cfg.alerts.enabled {
                return Err(Error::Coverage(
                    "alerts.enabled is false: nothing for the alert engine to do".into(),
                ));
            }
            vitaltrail_bus::logged::ensure_logged_topic(&kafka).await?;
            let (partitions, n) = check_coverage(&kafka, partitions, partial)?;
            let data = cfg.data_dir.clone();
            let (devices, watch) = SharedRegistry::watch(
                vitaltrail_bus::datadir::registry_file(&data),
                Duration::from_millis(500),
            )?;
            let operator = vitaltrail_bus::datadir::trusted_operator(operator.as_ref(), &data)?;
            let follow =
                vitaltrail_bus::registry::follow_topic(&kafka, &devices, &operator).await?;
            let mut stage = open(cfg, Devices::Shared(devices)).await?;
            stage.logged_partitions = n;
            let starts: Vec<(u32, Option<u64>)> = partitions
                .iter()
                .map(|p| (*p, stage.offsets.get(p).copied()))
                .collect();
            let consumer = LoggedConsumer::assign(&kafka, LOGGED_GROUP, key, &starts)?;
            let delivery = start_delivery(&stage, &shutdown).await?;
            tracing::info!(partitions = ?partitions, data = %data.display(), "alert engine is up on {LOGGED_TOPIC}");
            let res = follow_kafka(stage, consumer, shutdown).await;
            follow.abort();
            watch.abort();
            finish(delivery, res).await
        }
    }
}

/// Start a delivery task per configured channel (a channel whose setting
/// cannot work, an unreadable secret say, stops the stage now).
async fn start_delivery(
    stage: &Stage,
    shutdown: &watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<Result<()>>>> {
    let mut tasks = Vec::new();
    let res = start_channels(stage, shutdown, &mut tasks).await;
    if res.is_err() {
        // None left running behind a stage that failed to start.
        for t in &tasks {
            t.abort();
        }
    }
    res.map(|()| tasks)
}

async fn start_channels(
    stage: &Stage,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut Vec<tokio::task::JoinHandle<Result<()>>>,
) -> Result<()> {
    if let (true, Some(endpoint)) = (stage.cfg.alerts.mqtt, &stage.cfg.mqtt) {
        tracing::info!(
            channel = "mqtt-alerts",
            "delivering alarm events to MQTT alerts/<ward>"
        );
        // One engine per client ID: the engine's data directory names it.
        let id = format!(
            "vitaltrail-alerts-{:08x}",
            stage.series as u32 ^ (stage.series >> 32) as u32
        );
        tasks.push(stage.start_channel(
            "mqtt-alerts".into(),
            Wards::All,
            Backoff {
                first: Duration::from_millis(200),
                max: Duration::from_secs(10),
            },
            crate::mqtt_topic::MqttAlerts::new(endpoint, &id),
            shutdown,
        )?);
    }
    let topic = &stage.cfg.alerts.kafka_topic;
    if topic.enabled {
        let AlertsSource::Kafka { kafka, .. } = &stage.cfg.source else {
            return Err(Error::Setting(
                "alerts.kafka_topic.enabled: the engine runs over the local logs, with no Kafka \
                 cluster to write to (run it with --kafka)"
                    .into(),
            ));
        };
        let sink = crate::kafka_topic::KafkaTopic::new(kafka, topic).await?;
        tracing::info!(
            channel = "kafka-alerts",
            "delivering alarm events to the Kafka topic alerts"
        );
        tasks.push(stage.start_channel(
            "kafka-alerts".into(),
            Wards::All,
            // rdkafka retries inside a send; this paces the rare failure.
            Backoff {
                first: Duration::from_millis(500),
                max: Duration::from_secs(30),
            },
            sink,
            shutdown,
        )?);
    }
    for w in &stage.cfg.alerts.webhooks {
        let sink = crate::webhook::Webhook::new(w)?;
        let name = format!("webhook-{}", w.name);
        tracing::info!(channel = %name, url = %crate::webhook::redact_url(&w.url), "delivering alarm events to a webhook");
        tasks.push(stage.start_channel(
            name,
            Wards::from_list(&w.wards),
            Backoff {
                first: Duration::from_millis(w.first_backoff_ms),
                max: Duration::from_millis(w.max_backoff_ms),
            },
            sink,
            shutdown,
        )?);
    }
    Ok(())
}

/// Wait for the delivery tasks (they stop on the same shutdown); the
/// stage's own result first.
async fn finish(tasks: Vec<tokio::task::JoinHandle<Result<()>>>, res: Result<()>) -> Result<()> {
    for t in tasks {
        if res.is_err() {
            t.abort();
            continue;
        }
        t.await
            .map_err(|e| Error::State(format!("delivery task: {e}")))??;
    }
    res
}

async fn open(cfg: StageConfig, devices: Devices) -> Result<Stage> {
    tokio::task::spawn_blocking(move || Stage::open(cfg, devices))
        .await
        .map_err(|e| Error::State(format!("alert stage task: {e}")))?
}

/// What one round raised, and the acknowledgements' answers.
struct Round {
    events: Vec<Event>,
    answers: Vec<(
        tokio::sync::oneshot::Sender<crate::ack::AckResult>,
        crate::ack::AckResult,
    )>,
}

/// One round on a blocking thread: take, score, persist, then answer the
/// acknowledgements (a failure drops them unanswered: not taken).
async fn round(
    mut stage: Stage,
    announced: Vec<Announced>,
    acks: Vec<AckRequest>,
    last: bool,
) -> Result<Stage> {
    tokio::task::spawn_blocking(move || -> Result<Stage> {
        let Round { events, answers } = stage.round(announced, acks)?;
        stage.persist_when(&events, last)?;
        for (reply, r) in answers {
            // The caller may have gone: the acknowledgement stands.
            let _ = reply.send(r);
        }
        Ok(stage)
    })
    .await
    .map_err(|e| Error::State(format!("alert stage task: {e}")))?
}

/// Check, from the topic's metadata, that `ours` are partitions of
/// `vitals.logged`, and (unless `partial`) all of them: a partition no
/// engine follows is patients nobody is alerted about.
fn check_coverage(kafka: &KafkaConfig, ours: Vec<u32>, partial: bool) -> Result<(Vec<u32>, u32)> {
    let n = vitaltrail_bus::kafka::topic_partitions(kafka, LOGGED_TOPIC)?;
    if ours.is_empty() {
        return Ok(((0..n).collect(), n));
    }
    if let Some(p) = ours.iter().find(|&&p| p >= n) {
        return Err(Error::Coverage(format!(
            "{LOGGED_TOPIC} has {n} partitions; partition {p} does not exist"
        )));
    }
    let missing: Vec<u32> = (0..n).filter(|p| !ours.contains(p)).collect();
    if !missing.is_empty() && !partial {
        return Err(Error::Coverage(format!(
            "{LOGGED_TOPIC} has {n} partitions but this engine owns {ours:?}: nobody would alert \
             on the patients of partitions {missing:?}. Give every partition (--partitions), or \
             pass --partial when other engines own the rest"
        )));
    }
    if !missing.is_empty() {
        tracing::warn!(
            ?missing,
            "vitals.logged partitions left to other engines (--partial)"
        );
    }
    Ok((ours, n))
}

/// The partition logs, one round per tick.
async fn follow_logs(mut stage: Stage, mut shutdown: watch::Receiver<bool>) -> Result<()> {
    let tick = Duration::from_millis(stage.cfg.alerts.tick_ms.clamp(10, 60_000));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut inbox = stage.cfg.acks.take();
    let wake = stage.cfg.wake.clone();
    loop {
        let mut acks = Vec::new();
        let stop = tokio::select! {
            _ = interval.tick() => false,
            () = async {
                match &wake {
                    Some(w) => w.notified().await,
                    None => std::future::pending().await,
                }
            } => false,
            Some(first) = next_ack(&mut inbox) => {
                acks = drain(&mut inbox, first);
                false
            }
            _ = shutdown.changed() => true,
        } || *shutdown.borrow();
        if acks.is_empty() {
            acks = waiting(&mut inbox);
        }
        let started = tokio::time::Instant::now();
        stage = round(stage, Vec::new(), acks, stop).await?;
        if stop {
            return Ok(());
        }
        // Acknowledgements start rounds at once, but never more often than
        // this: a flood of them cannot keep the engine from its readings.
        tokio::select! {
            _ = tokio::time::sleep_until(started + MIN_ROUND_GAP) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// The next acknowledgement (never, without an inbox).
async fn next_ack(inbox: &mut Option<AckInbox>) -> Option<AckRequest> {
    match inbox {
        Some(i) => i.recv().await,
        None => std::future::pending().await,
    }
}

fn drain(inbox: &mut Option<AckInbox>, first: AckRequest) -> Vec<AckRequest> {
    match inbox {
        Some(i) => i.drain(first),
        None => vec![first],
    }
}

fn waiting(inbox: &mut Option<AckInbox>) -> Vec<AckRequest> {
    inbox
        .as_mut()
        .map(AckInbox::take_waiting)
        .unwrap_or_default()
}

/// Rounds start at least this far apart (each one fsyncs).
const MIN_ROUND_GAP: Duration = Duration::from_millis(20);

/// `vitals.logged`: a round as soon as announcements arrive (rounds at
/// least [`MIN_ROUND_GAP`] apart), and at least once per tick for the
/// rules timed by the clock.
async fn follow_kafka(
    mut stage: Stage,
    consumer: LoggedConsumer,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let tick = Duration::from_millis(stage.cfg.alerts.tick_ms.clamp(10, 60_000));
    let mut batch = Vec::new();
    let mut inbox = stage.cfg.acks.take();
    loop {
        let started = tokio::time::Instant::now();
        let mut acks = Vec::new();
        let stop = tokio::select! {
            _ = consumer.next_batch(ROUND as usize, tick, &mut batch) => false,
            Some(first) = next_ack(&mut inbox) => {
                acks = drain(&mut inbox, first);
                false
            }
            _ = shutdown.changed() => true,
        } || *shutdown.borrow();
        if acks.is_empty() {
            acks = waiting(&mut inbox);
        }
        stage = round(stage, std::mem::take(&mut batch), acks, stop).await?;
        // Lag monitoring only: the engine resumes from its own state.
        if let Err(e) = consumer.commit(&stage.offsets) {
            tracing::debug!(error = %e, "committing vitals.logged offsets");
        }
        if stop {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep_until(started + MIN_ROUND_GAP) => {}
            _ = shutdown.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vitaltrail_core::{Measurement, MockClock, SecretKey, UnsignedReading};

    const T0: u64 = 1_700_000_000_000;

    fn leaf_of(key: &SecretKey, seq: u64) -> Vec<u8> {
        let r = UnsignedReading {
            seq,
            time: T0 + seq * 1000,
            measurements: vec![Measurement {
                code: "2708-6".into(),
                value: 97.0,
                unit: "%".into(),
            }],
            meta: None,
        };
        leaf::encode(T0 + seq * 1000 + 5, &envelope::sign(key, &r).unwrap())
    }

    /// A patient whose records belong in topic partition `tp` of 2.
    fn patient_in(tp: u32) -> String {
        (0..)
            .map(|i| format!("pt-{i}"))
            .find(|k| vitaltrail_bus::partition_for(k, 2) == tp)
            .unwrap()
    }

    fn ann(
        k: &LoggedKey,
        tp: u32,
        offset: u64,
        p: u32,
        n: u64,
        leaf: &[u8],
        forged: bool,
    ) -> Announced {
        let key = patient_in(tp);
        let mac = k.mac(&key, p, n, leaf);
        Announced {
            topic_partition: tp,
            offset,
            key: key.clone(),
            position: Some((p, n)),
            leaf: leaf.to_vec(),
            authentic: !forged && k.check(&key, p, n, leaf, &mac),
        }
    }

    fn stage(data: &Path, key: &LoggedKey) -> Stage {
        stage_with(data, key, AlertsConfig::default())
    }

    fn stage_with(data: &Path, key: &LoggedKey, alerts: AlertsConfig) -> Stage {
        let cfg = StageConfig {
            alerts,
            source: AlertsSource::Kafka {
                kafka: KafkaConfig::default(),
                key: key.clone(),
                partitions: vec![0, 1],
                partial: false,
                operator: None,
            },
            data_dir: data.to_owned(),
            clock: Arc::new(MockClock::new(T0)),
            metrics: prometheus::Registry::new(),
            mqtt: None,
            acks: None,
            wake: None,
        };
        let mut st = Stage::open(cfg, Devices::File(None, Registry::default())).unwrap();
        st.logged_partitions = 2;
        st
    }

    /// Each leaf position is scored once per topic partition, whatever the
    /// repeats (an attestor's restart) and interleaving; a record without a
    /// valid MAC is never scored and moves no expectation; and the offsets
    /// and expectations survive a restart of the stage.
    #[test]
    fn announcements_are_scored_once_each_and_only_when_authentic() {
        let data = tempfile::tempdir().unwrap();
        let key = vitaltrail_core::busauth::BusKey::from_hex(&"22".repeat(32))
            .unwrap()
            .logged_key();
        let dev = SecretKey::from_seed(&[9; 32]).unwrap();
        let l: Vec<Vec<u8>> = (0..8).map(|s| leaf_of(&dev, s)).collect();
        let mut st = stage(data.path(), &key);
        let mut out = Vec::new();
        let batch = vec![
            ann(&key, 0, 0, 0, 0, &l[0], false),
            ann(&key, 0, 1, 0, 1, &l[1], false),
            // A forged record far ahead must not make 2.. look like repeats.
            ann(&key, 0, 2, 0, 500, &l[2], true),
            ann(&key, 0, 3, 0, 2, &l[2], false),
            // The attestor restarted and announced 1 and 2 again.
            ann(&key, 0, 4, 0, 1, &l[1], false),
            ann(&key, 0, 5, 0, 2, &l[2], false),
            ann(&key, 0, 6, 0, 3, &l[3], false),
            // Another log in the same topic partition, and the same log
            // position under another patient's key in another topic
            // partition: both new.
            ann(&key, 0, 7, 1, 0, &l[4], false),
            ann(&key, 1, 0, 0, 4, &l[5], false),
        ];
        // A genuine record copied into the other topic partition.
        let mut copied = batch[0].clone();
        copied.topic_partition = 1;
        copied.offset = 1;
        let mut batch = batch;
        batch.push(copied);
        st.take_announced(batch, &mut out);
        assert_eq!(st.metrics.readings.get(), 6);
        assert_eq!(st.metrics.repeats.get(), 2);
        assert_eq!(st.metrics.unauthentic.get(), 1);
        assert_eq!(st.metrics.misplaced.get(), 1);
        assert_eq!(st.offsets, BTreeMap::from([(0, 8), (1, 2)]));
        st.persist(&out).unwrap();
        drop(st);
        // Restarted: the saved expectations still drop repeats.
        let mut st = stage(data.path(), &key);
        assert_eq!(st.offsets, BTreeMap::from([(0, 8), (1, 2)]));
        st.take_announced(
            vec![
                ann(&key, 0, 8, 0, 3, &l[3], false),
                ann(&key, 0, 9, 0, 4, &l[6], false),
                ann(&key, 1, 2, 0, 4, &l[5], false),
            ],
            &mut out,
        );
        assert_eq!(st.metrics.readings.get(), 1);
        assert_eq!(st.metrics.repeats.get(), 2);
    }

    fn event(i: u64, ward: &str) -> Event {
        Event {
            alarm: crate::Alarm {
                id: format!("hr-high/patient-{i}/{}-1", T0 + i),
                rule: "hr-high".into(),
                subject: format!("patient-{i}"),
                ward: Some(ward.into()),
                patient: Some(format!("patient-{i}")),
                severity: crate::Severity::Urgent,
                reason: "HR 150 for 60 s".into(),
                active: true,
                ack: None,
                raised_ms: T0 + i,
                updated_ms: T0 + i,
                cleared_ms: None,
                escalation: 0,
                evidence: Vec::new(),
            },
            kind: crate::EventKind::Raised,
            at_ms: T0 + i,
            notify: None,
        }
    }

    /// A channel that refuses while `refuse` is above 0 (counting down if
    /// `countdown`), and records every event it takes.
    #[derive(Clone, Default)]
    struct Receiver {
        got: Arc<std::sync::Mutex<Vec<String>>>,
        refuse: Arc<std::sync::atomic::AtomicI64>,
        countdown: bool,
        /// An event it refuses for what it is (a 4xx), every time.
        poison: Option<String>,
    }

    impl crate::delivery::Sink for Receiver {
        async fn send(
            &mut self,
            e: &Event,
            _line: &[u8],
        ) -> std::result::Result<(), crate::delivery::SendError> {
            use std::sync::atomic::Ordering::SeqCst;
            if self.poison.as_deref() == Some(crate::fhir::event_key(e).as_str()) {
                return Err(crate::delivery::SendError {
                    why: "422".into(),
                    permanent: true,
                });
            }
            if self.refuse.load(SeqCst) > 0 {
                if self.countdown {
                    self.refuse.fetch_sub(1, SeqCst);
                }
                return Err(crate::delivery::SendError::transient("503"));
            }
            self.got.lock().unwrap().push(crate::fhir::event_key(e));
            Ok(())
        }
    }

    fn spawn_channel(
        st: &Stage,
        rx: &Receiver,
        wards: Wards,
        stop: &watch::Sender<bool>,
    ) -> tokio::task::JoinHandle<Result<()>> {
        let backoff = Backoff {
            first: Duration::from_millis(1),
            max: Duration::from_millis(4),
        };
        st.start_channel("test".into(), wards, backoff, rx.clone(), &stop.subscribe())
            .unwrap()
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A receiver that refuses at first, and a delivery task killed in
    /// the middle of its batch: after a restart every committed event of
    /// its wards arrives, at least once, in the order written; none of
    /// another ward does.
    #[tokio::test]
    async fn delivery_survives_refusals_and_a_crash_in_order() {
        let data = tempfile::tempdir().unwrap();
        let key = vitaltrail_core::busauth::BusKey::from_hex(&"22".repeat(32))
            .unwrap()
            .logged_key();
        let mut st = stage(data.path(), &key);
        let rx = Receiver {
            countdown: true,
            ..Receiver::default()
        };
        rx.refuse.store(3, std::sync::atomic::Ordering::SeqCst);
        let (stop, _) = watch::channel(false);
        let wards = Wards::from_list(&["ward-3".into()]);
        let task = spawn_channel(&st, &rx, wards.clone(), &stop);
        until("the channel's cursor", || {
            st.dir.join("delivery/test.json").exists()
        })
        .await;
        let mut all = Vec::new();
        for i in 0..10 {
            let e = event(i, if i % 4 == 3 { "ward-9" } else { "ward-3" });
            all.push(e.clone());
            st.persist(&[e]).unwrap();
        }
        until("four deliveries", || rx.got.lock().unwrap().len() >= 4).await;
        // kill -9 of the task: its batch's cursor is not saved.
        task.abort();
        let _ = task.await;
        for i in 10..15 {
            let e = event(i, "ward-3");
            all.push(e.clone());
            st.persist(&[e]).unwrap();
        }
        let task = spawn_channel(&st, &rx, wards.clone(), &stop);
        let want: Vec<String> = all
            .iter()
            .filter(|e| wards.wants(e))
            .map(crate::fhir::event_key)
            .collect();
        until("every event", || {
            let got = rx.got.lock().unwrap();
            want.iter().all(|k| got.contains(k))
        })
        .await;
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
        let got = rx.got.lock().unwrap().clone();
        // In order: first arrivals follow the file; nothing foreign.
        let mut first = Vec::new();
        for k in &got {
            if !first.contains(k) {
                first.push(k.clone());
            }
        }
        assert_eq!(first, want, "{got:?}");
        assert_eq!(
            st.metrics
                .delivery_failures
                .with_label_values(&["test"])
                .get(),
            3
        );
        // The cursor is at the committed end: a restart resends nothing.
        let c: crate::delivery::Cursor =
            serde_json::from_slice(&std::fs::read(st.dir.join("delivery/test.json")).unwrap())
                .unwrap();
        assert_eq!((c.generation, c.offset), (st.events_gen, st.events_len));
    }

    /// A receiver down past the outbox's bound: the events files keep
    /// their two generations, and every event of the generations deleted
    /// meanwhile that the channel had not delivered is in its dead letters
    /// (counted), the rest delivered once it is back: none lost.
    #[tokio::test]
    async fn undelivered_events_past_the_bound_go_to_dead_letters() {
        let data = tempfile::tempdir().unwrap();
        let key = vitaltrail_core::busauth::BusKey::from_hex(&"22".repeat(32))
            .unwrap()
            .logged_key();
        let alerts = AlertsConfig {
            max_events_bytes: 1500,
            ..AlertsConfig::default()
        };
        let mut st = stage_with(data.path(), &key, alerts);
        let rx = Receiver::default();
        rx.refuse.store(1, std::sync::atomic::Ordering::SeqCst);
        let (stop, _) = watch::channel(false);
        // No wait for the task to run: the channel is registered before
        // it starts, so a rotation at once still dead-letters for it.
        let task = spawn_channel(&st, &rx, Wards::All, &stop);
        let mut all = Vec::new();
        for i in 0..40 {
            let e = event(i, "ward-3");
            all.push(crate::fhir::event_key(&e));
            st.persist(&[e]).unwrap();
        }
        assert!(event_files(&st.dir).len() <= 2);
        let dead = |_: ()| -> Vec<String> {
            let d = st.dir.join("dead-letters");
            let mut out = Vec::new();
            for f in ["test.1.jsonl", "test.jsonl"] {
                for l in std::fs::read_to_string(d.join(f))
                    .unwrap_or_default()
                    .lines()
                {
                    out.push(crate::fhir::event_key(&serde_json::from_str(l).unwrap()));
                }
            }
            out
        };
        let dl = dead(());
        assert!(
            st.metrics.dead_letters.with_label_values(&["test"]).get() >= 30,
            "{} dead letters",
            dl.len()
        );
        rx.refuse.store(0, std::sync::atomic::Ordering::SeqCst);
        let last = all.last().unwrap().clone();
        until("the last event", || rx.got.lock().unwrap().contains(&last)).await;
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
        let got = rx.got.lock().unwrap().clone();
        // Every event delivered or in the dead letters, but for the oldest
        // dead letters, discarded past their bound and counted.
        let missing: Vec<&String> = all
            .iter()
            .filter(|k| !got.contains(k) && !dl.contains(k))
            .collect();
        let discarded = st
            .metrics
            .dead_letters_discarded
            .with_label_values(&["test"])
            .get();
        assert_eq!(missing.len() as u64, discarded, "{missing:?}");
        assert_eq!(
            missing,
            all.iter().take(missing.len()).collect::<Vec<_>>(),
            "the oldest are discarded first"
        );
        assert_eq!(
            st.metrics.dead_letters.with_label_values(&["test"]).get(),
            dl.len() as u64 + discarded
        );
    }

    /// An event the receiver refuses for what it is goes to the dead
    /// letters after three refusals; the events behind it are not held.
    #[tokio::test]
    async fn a_refused_event_is_dead_lettered_and_holds_nothing_back() {
        let data = tempfile::tempdir().unwrap();
        let key = vitaltrail_core::busauth::BusKey::from_hex(&"22".repeat(32))
            .unwrap()
            .logged_key();
        let mut st = stage(data.path(), &key);
        let events: Vec<Event> = (0..6).map(|i| event(i, "ward-3")).collect();
        let keys: Vec<String> = events.iter().map(crate::fhir::event_key).collect();
        let rx = Receiver {
            poison: Some(keys[2].clone()),
            ..Receiver::default()
        };
        let (stop, _) = watch::channel(false);
        let task = spawn_channel(&st, &rx, Wards::All, &stop);
        st.persist(&events).unwrap();
        until("the last event", || {
            rx.got.lock().unwrap().contains(&keys[5])
        })
        .await;
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
        let mut want = keys.clone();
        want.remove(2);
        assert_eq!(*rx.got.lock().unwrap(), want);
        let dl = std::fs::read_to_string(st.dir.join("dead-letters/test.jsonl")).unwrap();
        let e: Event = serde_json::from_str(dl.trim()).unwrap();
        assert_eq!(crate::fhir::event_key(&e), keys[2]);
        assert_eq!(
            st.metrics.dead_letters.with_label_values(&["test"]).get(),
            1
        );
        assert_eq!(
            st.metrics
                .delivery_failures
                .with_label_values(&["test"])
                .get(),
            u64::from(crate::delivery::PERMANENT_ATTEMPTS)
        );
    }

    /// A cursor that cannot be trusted never skips: unreadable, it resends
    /// from the oldest events; past what is committed, from the start of
    /// the current generation; in the middle of a line, from its start.
    #[test]
    fn a_doubtful_cursor_resends_rather_than_skips() {
        use crate::delivery::{Cursor, initial_cursor};
        let data = tempfile::tempdir().unwrap();
        let key = vitaltrail_core::busauth::BusKey::from_hex(&"22".repeat(32))
            .unwrap()
            .logged_key();
        let mut st = stage(data.path(), &key);
        st.persist(&[event(0, "w"), event(1, "w")]).unwrap();
        let now = *st.committed.borrow();
        let first_line = std::fs::read(events_file(&st.dir, 0))
            .unwrap()
            .iter()
            .position(|b| *b == b'\n')
            .unwrap() as u64
            + 1;
        let at = |c: &str| {
            std::fs::create_dir_all(st.dir.join("delivery")).unwrap();
            std::fs::write(st.dir.join("delivery/x.json"), c).unwrap();
            initial_cursor(&st.dir, "x", now)
        };
        let cur = |generation: u64, offset: u64| Cursor {
            series: now.series,
            generation,
            offset,
        };
        assert_eq!(at("{not json"), cur(0, 0));
        let json = |g: u64, o: u64| serde_json::to_string(&cur(g, o)).unwrap();
        assert_eq!(at(&json(0, now.len + 5)), cur(0, 0));
        assert_eq!(at(&json(3, 0)), cur(0, 0));
        assert_eq!(at(&json(0, first_line + 7)), cur(0, first_line));
        assert_eq!(at(&json(0, first_line)), cur(0, first_line));
        std::fs::remove_file(st.dir.join("delivery/x.json")).unwrap();
        assert_eq!(
            initial_cursor(&st.dir, "x", now),
            cur(0, now.len),
            "new: from now"
        );
    }
}
