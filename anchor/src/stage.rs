//! The anchor stage, `run(StageConfig, shutdown)`: take the partitions'
//! checkpoints (in process, or from `vitals.checkpoints`), close an epoch
//! every `epoch_interval` in which a head moved, and anchor the epoch log
//! with each backend.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use vitaltrail_bus::PartitionSource as _;
use vitaltrail_bus::checkpoints::PublishedCheckpoint;
use vitaltrail_bus::datadir;
use vitaltrail_bus::kafka::{CHECKPOINTS_TOPIC, KafkaConfig, KafkaConsumer};
use vitaltrail_core::{LogPublicKey, LogSigner};

use crate::backend::{Backend, Target};
use crate::heads::{Heads, Offer, TrustedKeys};
use crate::ledger::{Ledger, LedgerBackend};
use crate::metrics::Metrics;
use crate::store::EpochStore;
use crate::{Error, Result};

/// The anchor's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnchorConfig {
    /// The data directory; the anchor keeps `<data_dir>/anchor/`.
    pub data_dir: PathBuf,
    /// Close an epoch this often (when a head moved).
    pub epoch_interval: Duration,
    /// The epoch log's origin, which is the anchor key's name.
    pub origin: String,
    /// The anchor key (PKCS#8 PEM); default `$VITALTRAIL_ANCHOR_KEY`,
    /// else `<data>/keys/anchor.pem`.
    pub key_file: Option<PathBuf>,
    /// Partition log verifier keys to trust besides
    /// `<data>/partitions/*/log.vkey`.
    pub log_keys: Vec<String>,
    /// Anchor to the local ledger (`<data>/anchor/ledger.jsonl`).
    pub ledger: bool,
    /// Anchor to an EVM chain too.
    pub evm: Option<crate::evm::EvmConfig>,
}

impl Default for AnchorConfig {
    fn default() -> Self {
        AnchorConfig {
            data_dir: PathBuf::from("vitaltrail-data"),
            epoch_interval: Duration::from_secs(1),
            origin: "vitaltrail.local/epochs".to_owned(),
            key_file: None,
            log_keys: vec![],
            ledger: true,
            evm: None,
        }
    }
}

impl AnchorConfig {
    /// `<data_dir>/anchor`.
    pub fn anchor_dir(&self) -> PathBuf {
        self.data_dir.join("anchor")
    }
}

/// Where the checkpoints come from.
#[derive(Debug)]
pub enum AnchorSource {
    /// The attestor in this process announces them.
    InProc(mpsc::Receiver<PublishedCheckpoint>),
    /// `vitals.checkpoints`, resumed from the offset stored with the last
    /// epoch.
    Kafka(KafkaConfig),
}

/// Typed configuration of the anchor stage.
#[derive(Debug)]
pub struct StageConfig {
    /// Settings.
    pub anchor: AnchorConfig,
    /// The source of checkpoints.
    pub source: AnchorSource,
    /// Where this stage registers its metrics (served by the caller).
    pub metrics: prometheus::Registry,
}

/// How long an epoch waits after the first head moved, for the other
/// partitions' checkpoints of the same round.
const COALESCE: Duration = Duration::from_millis(50);

/// The key the offset of the next `vitals.checkpoints` record is stored
/// under.
const KAFKA_OFFSET: &str = "kafka_offset";

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Everything the loop owns.
struct Anchor {
    store: EpochStore,
    heads: Heads,
    metrics: Metrics,
    /// The latest signed epoch log size, for every backend.
    targets: watch::Sender<Option<Target>>,
    /// When the last epoch closed.
    last_close: Option<Instant>,
    /// When a refused checkpoint was last logged.
    warned: Option<Instant>,
}

impl Anchor {
    /// The loop's state, and the ledger backend if it is on (checked
    /// against the epoch log).
    fn open(cfg: &AnchorConfig, metrics: Metrics) -> Result<(Self, Option<LedgerBackend>)> {
        let key = datadir::anchor_key(&cfg.data_dir, cfg.key_file.as_deref())?;
        let signer = LogSigner::new(&cfg.origin, key.clone())?;
        let ledger_signer = LogSigner::new(&cfg.origin, key)?;
        let store = EpochStore::open(&cfg.anchor_dir(), signer)?;
        let configured = cfg
            .log_keys
            .iter()
            .map(|k| LogPublicKey::parse(k))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let (held, stopped) = store.load()?;
        let heads = Heads::new(TrustedKeys::new(&cfg.data_dir, configured), held, stopped);
        let ledger = if cfg.ledger {
            let written = store.meta(crate::store::LEDGER_RECORDS)?.unwrap_or(0);
            let l = Ledger::open(&cfg.anchor_dir(), &store.public_key(), written)?;
            // The ledger may not anchor more than the epoch log holds, nor
            // another root: that is a ledger of another log.
            if l.anchored_size() > store.log().size() {
                return Err(Error::Ledger {
                    path: crate::ledger::ledger_path(&cfg.anchor_dir()),
                    detail: format!(
                        "it anchors size {} but the epoch log holds {}",
                        l.anchored_size(),
                        store.log().size()
                    ),
                });
            }
            if let Some(last) = l.last()
                && store.log().root_at(last.size)?.to_hex() != last.root
            {
                return Err(Error::Ledger {
                    path: crate::ledger::ledger_path(&cfg.anchor_dir()),
                    detail: format!("its root at size {} is not the epoch log's", last.size),
                });
            }
            Some(LedgerBackend::new(
                l,
                ledger_signer,
                store.meta_handle(),
                metrics.clone(),
            ))
        } else {
            None
        };
        metrics.forked_partitions.set(heads.stopped().len() as i64);
        metrics.epoch_log_size.set(store.log().size() as i64);
        // What the latest epoch held, from the start (not 0 until the
        // first epoch after a restart closes).
        metrics.partitions.set(heads.heads().len() as i64);
        let size = store.log().size();
        let target = (size > 0).then(|| (size, store.log().root(), Instant::now()));
        let a = Anchor {
            store,
            heads,
            metrics,
            targets: watch::Sender::new(target),
            last_close: None,
            warned: None,
        };
        tracing::info!(
            origin = %cfg.origin,
            epochs = a.store.log().size(),
            key = %a.store.public_key(),
            "anchor is up"
        );
        Ok((a, ledger))
    }

    fn offer(&mut self, cp: &PublishedCheckpoint) {
        let outcome = self.heads.offer(cp);
        self.metrics
            .checkpoints
            .with_label_values(&[outcome.label()])
            .inc();
        match &outcome {
            Offer::Fork(_) => self
                .metrics
                .forked_partitions
                .set(self.heads.stopped().len() as i64),
            // Anyone on the topic can send these: counted always, logged at
            // most once a second.
            Offer::Rejected(r)
                if self
                    .warned
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) =>
            {
                self.warned = Some(Instant::now());
                tracing::warn!(origin = %cp.origin, size = cp.size, reason = r, "checkpoint refused (see vitaltrail_anchor_checkpoints_total)")
            }
            Offer::Gap => {
                tracing::debug!(origin = %cp.origin, size = cp.size, from = cp.from_size, "checkpoint does not link to the held one")
            }
            _ => {}
        }
    }

    /// Close an epoch if a head moved, and hand its size to the backends.
    fn tick(&mut self, meta: &[(&str, u64)]) -> Result<()> {
        if let Some(c) = self.store.close_epoch(&mut self.heads, now_ms(), meta)? {
            self.metrics.epochs.inc();
            self.metrics.epoch_log_size.set(c.size as i64);
            self.metrics.partitions.set(self.heads.heads().len() as i64);
            self.last_close = Some(Instant::now());
            self.targets
                .send_replace(Some((c.size, c.root, Instant::now())));
        }
        Ok(())
    }
}

/// The backends' tasks: (name, essential, outcome).
type Backends = tokio::task::JoinSet<(&'static str, bool, Result<()>)>;

/// A backend that ended: an essential one's failure (or any panic) stops
/// the stage; another's is logged.
fn backend_ended(
    r: std::result::Result<(&'static str, bool, Result<()>), tokio::task::JoinError>,
) -> Result<()> {
    match r {
        Ok((_, _, Ok(()))) => Ok(()),
        Ok((name, true, Err(e))) => {
            tracing::error!(backend = name, error = %e, "anchoring backend failed; stopping");
            Err(e)
        }
        Ok((name, false, Err(e))) => {
            tracing::error!(backend = name, error = %e, "anchoring backend stopped; epochs and the other backends go on");
            Ok(())
        }
        Err(e) => Err(Error::Bus(vitaltrail_bus::Error::Kafka(format!(
            "an anchoring backend panicked: {e}"
        )))),
    }
}

/// Run the anchor stage until `shutdown` (then close a last epoch), or
/// until its in-process source closes.
pub async fn run(cfg: StageConfig, shutdown: watch::Receiver<bool>) -> Result<()> {
    let StageConfig {
        anchor,
        source,
        metrics,
    } = cfg;
    let metrics = Metrics::new(&metrics)?;
    let (mut a, ledger) = tokio::task::block_in_place(|| Anchor::open(&anchor, metrics.clone()))?;
    // Every backend runs beside the epoch loop, as a task of its own: a
    // slow or absent chain never holds epochs, or the ledger, back.
    let mut backends: Vec<Box<dyn Backend>> = Vec::new();
    if let Some(l) = ledger {
        backends.push(Box::new(l));
    }
    if let Some(cfg) = &anchor.evm {
        let epochs = crate::store::epochs_dir(&anchor.anchor_dir());
        let root_at = Box::new(move |size: u64| {
            Ok(vitaltrail_log::DurableLog::open_read_only(&epochs)?.root_at(size)?)
        });
        backends.push(Box::new(crate::evm::EvmAnchor::new(
            cfg.clone(),
            &anchor.anchor_dir(),
            &anchor.origin,
            metrics,
            root_at,
        )?));
    }
    // The backends stop after the loop's last epoch, so the ledger
    // anchors that one too.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Backends::new();
    for b in backends {
        let (name, essential) = (b.name(), b.essential());
        let (targets, stop) = (a.targets.subscribe(), stop_rx.clone());
        tasks.spawn(async move { (name, essential, b.run(targets, stop).await) });
    }
    let res = run_loop(&mut a, source, &anchor, shutdown, &mut tasks).await;
    let _ = stop_tx.send(true);
    while let Some(r) = tasks.join_next().await {
        backend_ended(r)?;
    }
    res
}

async fn run_loop(
    a: &mut Anchor,
    source: AnchorSource,
    anchor: &AnchorConfig,
    mut shutdown: watch::Receiver<bool>,
    tasks: &mut Backends,
) -> Result<()> {
    // An epoch closes `COALESCE` after the first head moved (so the other
    // partitions' checkpoints of the same round join it), but no sooner
    // than `epoch_interval` after the one before.
    let interval = anchor.epoch_interval;
    let due = |a: &Anchor| -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        let after_last = a
            .last_close
            .map_or(now, |t| tokio::time::Instant::from_std(t + interval));
        after_last.max(now + COALESCE)
    };
    let far = || tokio::time::Instant::now() + Duration::from_secs(3600);
    let mut deadline = far();
    // An epoch the ledger has not anchored yet (a crash in between) is
    // anchored now, not at the next epoch.
    tokio::task::block_in_place(|| a.tick(&[]))?;
    match source {
        AnchorSource::InProc(mut rx) => {
            loop {
                tokio::select! {
                    cp = rx.recv() => match cp {
                        Some(cp) => {
                            a.metrics.queue_depth.set(rx.len() as i64);
                            let was = a.heads.moved();
                            a.offer(&cp);
                            if !was && a.heads.moved() {
                                deadline = due(a);
                            }
                        }
                        None => break,
                    },
                    _ = tokio::time::sleep_until(deadline) => {
                        tokio::task::block_in_place(|| a.tick(&[]))?;
                        deadline = if a.heads.moved() { due(a) } else { far() };
                    }
                    Some(r) = tasks.join_next() => backend_ended(r)?,
                    _ = shutdown.changed() => {
                        if *shutdown.borrow() {
                            // What the attestor announced while stopping.
                            while let Ok(cp) = rx.try_recv() {
                                a.offer(&cp);
                            }
                            break;
                        }
                    }
                }
            }
            tokio::task::block_in_place(|| a.tick(&[]))
        }
        AnchorSource::Kafka(kafka) => {
            vitaltrail_bus::kafka::ensure_topics(&kafka).await?;
            // Every partition of the topic (one unless it was made with
            // more), each from the offset stored with the last epoch.
            let n = vitaltrail_bus::kafka::topic_partitions(&kafka, CHECKPOINTS_TOPIC)?.max(1);
            let key = |p: u32| format!("{KAFKA_OFFSET}/{p}");
            let mut next = std::collections::BTreeMap::new();
            let mut starts = Vec::new();
            for p in 0..n {
                let o = a.store.meta(&key(p))?;
                next.insert(p, o.unwrap_or(0));
                starts.push((p, o));
            }
            let kafka = KafkaConfig {
                group_id: "vitaltrail-anchor".to_owned(),
                ..kafka
            };
            let (_consumer, parts) = KafkaConsumer::assign(&kafka, CHECKPOINTS_TOPIC, &starts)?;
            let (tx, mut rx) = mpsc::channel::<(u32, u64, Vec<u8>)>(1024);
            let mut readers = tokio::task::JoinSet::new();
            for mut part in parts {
                let tx = tx.clone();
                readers.spawn(async move {
                    let mut batch = Vec::new();
                    while part.next_batch(256, &mut batch).await? {
                        for d in batch.drain(..) {
                            if tx
                                .send((d.partition, d.offset, d.record.payload))
                                .await
                                .is_err()
                            {
                                return Ok(());
                            }
                        }
                    }
                    Ok::<(), Error>(())
                });
            }
            drop(tx);
            let meta = |next: &std::collections::BTreeMap<u32, u64>| -> Vec<(String, u64)> {
                next.iter().map(|(p, o)| (key(*p), *o)).collect()
            };
            loop {
                tokio::select! {
                    got = rx.recv() => {
                        let Some((p, offset, payload)) = got else { break };
                        next.insert(p, offset + 1);
                        let was = a.heads.moved();
                        match serde_json::from_slice::<PublishedCheckpoint>(&payload) {
                            Ok(cp) => a.offer(&cp),
                            Err(_) => a.metrics.checkpoints.with_label_values(&["malformed"]).inc(),
                        }
                        if !was && a.heads.moved() {
                            deadline = due(a);
                        }
                    }
                    _ = tokio::time::sleep_until(deadline) => {
                        let m = meta(&next);
                        tokio::task::block_in_place(|| a.tick(&as_refs(&m)))?;
                        deadline = if a.heads.moved() { due(a) } else { far() };
                    }
                    Some(r) = tasks.join_next() => backend_ended(r)?,
                    Some(r) = readers.join_next() => {
                        r.map_err(|e| {
                            Error::Bus(vitaltrail_bus::Error::Kafka(format!(
                                "a {CHECKPOINTS_TOPIC} reader panicked: {e}"
                            )))
                        })??;
                    }
                    _ = shutdown.changed() => {
                        if *shutdown.borrow() {
                            break;
                        }
                    }
                }
            }
            readers.abort_all();
            let m = meta(&next);
            tokio::task::block_in_place(|| a.tick(&as_refs(&m)))
        }
    }
}

/// `(key, offset)` pairs as `tick` takes them.
fn as_refs(m: &[(String, u64)]) -> Vec<(&str, u64)> {
    m.iter().map(|(k, v)| (k.as_str(), *v)).collect()
}
