//! The attestor stage: [`run`] opens the partitions it owns, feeds each
//! from its bus into [`crate::pipeline::run_partition`], and runs what goes
//! with them: the receipt publisher, and with Kafka the checkpoint
//! publisher (`vitals.checkpoints`) and the dead-letter copy
//! (`vitals.rejected` into `<data>/rejected.jsonl`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use vitaltrail_bus::PartitionSource;
use vitaltrail_bus::datadir;
use vitaltrail_bus::deadletter::{RejectLimits, RejectLog, Rejection};
use vitaltrail_bus::inproc::InProcPartition;
use vitaltrail_bus::kafka::{
    self, CHECKPOINTS_TOPIC, KafkaConfig, KafkaConsumer, KafkaProducer, REJECTED_TOPIC,
    VERIFIED_TOPIC,
};
use vitaltrail_bus::logged::LOGGED_TOPIC;
use vitaltrail_bus::registry::{self, Lookup, SharedRegistry};
use vitaltrail_core::busauth::LoggedKey;
use vitaltrail_core::receipt::Receipt;
use vitaltrail_core::{Clock, DeviceId, SystemClock};
use vitaltrail_mqtt::receipts::{self, ReceiptConfig, ReceiptMetrics};

use crate::metrics::Metrics;
use crate::parquet_out::{PatientLookup, Registered};
use crate::pipeline::{
    ANNOUNCE_QUEUE, AttestorConfig, LoggedLeaf, Outlets, PartitionState, PublishedCheckpoint,
    run_partition,
};
use crate::{Error, Result};

/// Where the attestor's records come from, and what comes with that choice.
// Built once per process: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum AttestBus {
    /// Kafka: the `vitals.verified` partitions this process owns.
    Kafka {
        /// The cluster, the bus key and client settings.
        kafka: KafkaConfig,
        /// The partitions this process owns.
        partitions: Vec<u32>,
        /// Other attestors own the topic's other partitions. Without it,
        /// `partitions` must cover the whole topic.
        partial: bool,
        /// Also copy `vitals.rejected` into `<data>/rejected.jsonl`.
        dead_letters: bool,
        /// Limits of the local dead-letter store.
        rejects: RejectLimits,
        /// Whose signature `vitals.devices` records must carry (default:
        /// the data directory's operator key).
        operator: Option<DeviceId>,
        /// The MQTT broker to publish receipts to; none without it.
        mqtt: Option<vitaltrail_mqtt::MqttEndpoint>,
    },
    /// The in-process bus of `vitaltrail up`, with the process's
    /// dead-letter store, receipt queue and registry.
    InProc {
        /// Every partition of the bus.
        partitions: Vec<InProcPartition>,
        /// The dead-letter store.
        rejects: Arc<RejectLog>,
        /// The process's receipt queue.
        receipts: mpsc::Sender<Receipt>,
        /// The registry.
        devices: SharedRegistry,
        /// Where to announce every checkpoint (the in-process anchor):
        /// first the recent ones of each partition, then each new one.
        checkpoints: Option<mpsc::Sender<PublishedCheckpoint>>,
        /// Told after each durable commit (the in-process alert engine).
        committed: Option<Arc<tokio::sync::Notify>>,
    },
}

/// Typed configuration of the attestor stage.
pub struct StageConfig {
    /// Log, checkpoint and batching settings (`data_dir` included).
    pub attestor: AttestorConfig,
    /// The bus.
    pub bus: AttestBus,
    /// Where this stage registers its metrics (served by the caller).
    pub metrics: prometheus::Registry,
    /// The clock.
    pub clock: Arc<dyn Clock>,
}

/// What a shared registry says about a device (for the attestor's own
/// registry check and the patient in Parquet rows).
pub fn patient_lookup(reg: &SharedRegistry) -> PatientLookup {
    let reg = reg.clone();
    Arc::new(move |did: &str| {
        reg.with(|r| match r.lookup(did) {
            Lookup::Active(e) => Registered::Active(e.patient.clone()),
            Lookup::Revoked(e) => Registered::Revoked(e.patient.clone()),
            Lookup::Unknown => Registered::Unknown,
        })
    })
}

/// Check, from the topic's metadata, that `ours` are partitions of
/// `vitals.verified`, and (unless `partial`) that they are all of them: a
/// partition nobody attests is readings nobody logs.
pub fn check_coverage(kafka: &KafkaConfig, ours: &[u32], partial: bool) -> Result<u32> {
    let n = kafka::topic_partitions(kafka, VERIFIED_TOPIC)?;
    if let Some(p) = ours.iter().find(|&&p| p >= n) {
        return Err(Error::Coverage(format!(
            "{VERIFIED_TOPIC} has {n} partitions; partition {p} does not exist"
        )));
    }
    let missing: Vec<u32> = (0..n).filter(|p| !ours.contains(p)).collect();
    if !missing.is_empty() && !partial {
        return Err(Error::Coverage(format!(
            "{VERIFIED_TOPIC} has {n} partitions but this attestor owns {ours:?}: nobody would log \
             partitions {missing:?}. Give every partition (--partitions), or pass --partial when \
             other attestors own the rest"
        )));
    }
    if !missing.is_empty() {
        tracing::warn!(?missing, "partitions left to other attestors (--partial)");
    }
    Ok(n)
}

/// Run the attestor stage until `shutdown`, or until every source closes.
pub async fn run(cfg: StageConfig, shutdown: watch::Receiver<bool>) -> Result<()> {
    let StageConfig {
        attestor,
        bus,
        metrics,
        clock,
    } = cfg;
    std::fs::create_dir_all(&attestor.data_dir).map_err(|e| Error::Io {
        op: "creating",
        path: attestor.data_dir.clone(),
        source: e,
    })?;
    let key = datadir::log_key(&attestor.data_dir)?;
    let a_metrics = Metrics::new(&metrics)?;
    match bus {
        AttestBus::InProc {
            partitions,
            rejects,
            receipts,
            devices,
            checkpoints,
            committed,
        } => {
            let patients = patient_lookup(&devices);
            let mut tasks = tokio::task::JoinSet::new();
            for part in partitions {
                let p = part.partition();
                let state =
                    PartitionState::open(&attestor, p, &key, a_metrics.clone(), patients.clone())?;
                if let Some(tx) = &checkpoints {
                    for cp in state.recent_published(ANNOUNCE_QUEUE + 1)? {
                        tx.send(cp).await.ok();
                    }
                }
                tasks.spawn(run_partition(
                    part,
                    state,
                    attestor.clone(),
                    rejects.clone(),
                    clock.clone(),
                    Outlets {
                        checkpoints: checkpoints.clone(),
                        receipts: Some(receipts.clone()),
                        logged: None,
                        committed: committed.clone(),
                    },
                    shutdown.clone(),
                ));
            }
            drop(receipts);
            join(tasks).await
        }
        AttestBus::Kafka {
            kafka,
            partitions,
            partial,
            dead_letters,
            rejects,
            operator,
            mqtt,
        } => {
            kafka::ensure_topics(&kafka).await?;
            let n = check_coverage(&kafka, &partitions, partial)?;
            let attestor = AttestorConfig {
                topic_partitions: Some(n),
                ..attestor
            };
            let data = attestor.data_dir.clone();
            let rejects = Arc::new(
                RejectLog::open_with(data.join("rejected.jsonl"), rejects)?
                    .with_metrics(vitaltrail_bus::metrics::Metrics::new(&metrics)?),
            );
            let (devices, _watch) =
                SharedRegistry::watch(datadir::registry_file(&data), Duration::from_millis(500))?;
            let operator = datadir::trusted_operator(operator.as_ref(), &data)?;
            let follow = registry::follow_topic(&kafka, &devices, &operator).await?;
            let patients = patient_lookup(&devices);
            let mut states = Vec::new();
            let mut starts = Vec::new();
            for &p in &partitions {
                let state =
                    PartitionState::open(&attestor, p, &key, a_metrics.clone(), patients.clone())?;
                starts.push((p, state.resume_offset()));
                states.push(state);
            }
            let (_consumer, sources) = KafkaConsumer::assign(&kafka, VERIFIED_TOPIC, &starts)?;
            let mut tasks = tokio::task::JoinSet::new();
            // Checkpoints to vitals.checkpoints: first the latest of each
            // partition (one signed before a crash may not have been
            // published), then each new one.
            let (cp_tx, cp_rx) = mpsc::channel(ANNOUNCE_QUEUE);
            for state in &states {
                for cp in state.recent_published(ANNOUNCE_QUEUE + 1)? {
                    cp_tx.send(cp).await.ok();
                }
            }
            tasks.spawn(publish_checkpoints(
                KafkaProducer::new(&kafka)?,
                cp_rx,
                shutdown.clone(),
            ));
            // Leaves to vitals.logged: each worker first announces those
            // committed but never announced (a crash), then each commit's.
            let logged_tx = match kafka.bus_key.as_ref() {
                Some(bus_key) => {
                    let (tx, rx) = mpsc::channel(LOGGED_QUEUE);
                    let mut marks = BTreeMap::new();
                    for state in &mut states {
                        let dir = attestor.partition_dir(state.partition());
                        let from = announced_mark(&dir, state.log().size())?;
                        state.announce_logged(from);
                        marks.insert(state.partition(), (dir, from));
                    }
                    tasks.spawn(publish_logged(
                        KafkaProducer::new(&kafka)?,
                        bus_key.logged_key(),
                        rx,
                        marks,
                        a_metrics.clone(),
                        shutdown.clone(),
                    ));
                    Some(tx)
                }
                None => {
                    tracing::warn!(
                        "no bus key: leaves are not announced on {LOGGED_TOPIC}, so no alert engine can follow this attestor"
                    );
                    None
                }
            };
            let receipts_tx = match mqtt {
                Some(mqtt) => {
                    let names: Vec<String> = partitions.iter().map(|p| p.to_string()).collect();
                    let rcfg = ReceiptConfig {
                        mqtt,
                        client_id: format!("vitaltrail-attest-receipts-{}", names.join("-")),
                        ..Default::default()
                    };
                    let (tx, rx) = receipts::queue(&rcfg);
                    let m = ReceiptMetrics::new(&metrics, "attestor")?;
                    let stop = shutdown.clone();
                    tasks.spawn(async move { Ok(receipts::publish(rcfg, rx, m, stop).await?) });
                    Some(tx)
                }
                None => None,
            };
            for (source, state) in sources.into_iter().zip(states) {
                tasks.spawn(run_partition(
                    source,
                    state,
                    attestor.clone(),
                    rejects.clone(),
                    clock.clone(),
                    Outlets {
                        checkpoints: Some(cp_tx.clone()),
                        receipts: receipts_tx.clone(),
                        logged: logged_tx.clone(),
                        committed: None,
                    },
                    shutdown.clone(),
                ));
            }
            drop(cp_tx);
            drop(receipts_tx);
            drop(logged_tx);
            if dead_letters {
                tasks.spawn(copy_dead_letters(
                    kafka.clone(),
                    rejects.clone(),
                    data.clone(),
                    shutdown.clone(),
                ));
            }
            tracing::info!(partitions = ?partitions, data = %data.display(), "attestor is up");
            let res = join(tasks).await;
            follow.abort();
            res
        }
    }
}

/// Wait for every task; the first to fail stops everything.
async fn join(mut tasks: tokio::task::JoinSet<Result<()>>) -> Result<()> {
    while let Some(res) = tasks.join_next().await {
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(Error::Panicked(e.to_string())),
        }
    }
    Ok(())
}

/// Produce announced checkpoints to `vitals.checkpoints` (key = origin),
/// in order, until every partition worker is gone. While Kafka is down the
/// send waits (the producer never times out), and the bounded channel
/// holds the workers back rather than dropping a checkpoint.
async fn publish_checkpoints(
    producer: KafkaProducer,
    mut rx: mpsc::Receiver<PublishedCheckpoint>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    while let Some(cp) = rx.recv().await {
        let json = serde_json::to_vec(&cp).map_err(|e| Error::State {
            path: PathBuf::from(CHECKPOINTS_TOPIC),
            detail: e.to_string(),
        })?;
        let send = producer.send_to(CHECKPOINTS_TOPIC, &cp.origin, &json);
        tokio::select! {
            r = send => r?,
            // Stopping with Kafka down: the checkpoint is in the data
            // directory, and the next start publishes the latest again.
            _ = async {
                let _ = shutdown.wait_for(|stop| *stop).await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            } => {
                tracing::warn!(origin = %cp.origin, "stopping before Kafka took checkpoint; it is republished on the next start");
                return Ok(());
            }
        }
    }
    Ok(())
}

/// How many commits' leaves may wait for the `vitals.logged` announcer;
/// past that the partition workers wait (bounded memory, never a loss).
pub const LOGGED_QUEUE: usize = 64;

/// The file holding how many leaves of a partition were announced on
/// `vitals.logged` (Kafka has every leaf below it).
const ANNOUNCED_FILE: &str = "logged.announced";

/// Where announcing resumes: the partition's mark, or, the first time (no
/// mark yet), the log's size now, written down so a crash before the first
/// announcement loses nothing. A log that existed before announcing was
/// built is not announced back to its start.
fn announced_mark(dir: &Path, size: u64) -> Result<u64> {
    let path = dir.join(ANNOUNCED_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().parse::<u64>().map_err(|e| Error::State {
            path: path.clone(),
            detail: format!("not a leaf count: {e}"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            crate::durable::write_atomic(dir, ANNOUNCED_FILE, size.to_string().as_bytes())?;
            Ok(size)
        }
        Err(e) => Err(Error::Io {
            op: "reading",
            path,
            source: e,
        }),
    }
}

/// Produce each commit's leaves to `vitals.logged`, in order, until every
/// partition worker is gone. Several waiting commits go out together. Once
/// Kafka has a partition's leaves, its mark moves on in memory, and is
/// written down (fsynced) at most once a second, after a second idle, and
/// at the end: a crash
/// announces at most the leaves since the last write again, which the
/// engine drops by leaf index. While Kafka is down the send waits and the
/// bounded queue holds the workers back.
async fn publish_logged(
    producer: KafkaProducer,
    key: LoggedKey,
    mut rx: mpsc::Receiver<Vec<LoggedLeaf>>,
    mut marks: BTreeMap<u32, (PathBuf, u64)>,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let mut written = std::time::Instant::now();
    let mut dirty = false;
    let write = |marks: &BTreeMap<u32, (PathBuf, u64)>| -> Result<()> {
        tokio::task::block_in_place(|| {
            for (dir, mark) in marks.values() {
                crate::durable::write_atomic(dir, ANNOUNCED_FILE, mark.to_string().as_bytes())?;
            }
            Ok(())
        })
    };
    let mut batch: Vec<LoggedLeaf> = Vec::new();
    loop {
        // Idle for a second with an unwritten mark: write it.
        let first = match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
            Ok(Some(first)) => first,
            Ok(None) => break,
            Err(_) => {
                if dirty {
                    write(&marks)?;
                    written = std::time::Instant::now();
                    dirty = false;
                }
                continue;
            }
        };
        batch.clear();
        batch.extend(first);
        while batch.len() < 8192 {
            match rx.try_recv() {
                Ok(more) => batch.extend(more),
                Err(_) => break,
            }
        }
        tokio::select! {
            r = producer.send_logged(&key, &batch) => r?,
            // Stopping with Kafka down: the mark was not moved, so the next
            // start announces these leaves.
            _ = async {
                let _ = shutdown.wait_for(|stop| *stop).await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            } => {
                tracing::warn!(leaves = batch.len(), "stopping before Kafka took logged leaves; they are announced on the next start");
                metrics.logged_pending.sub(batch.len() as i64);
                break;
            }
        }
        for l in &batch {
            if let Some((_, mark)) = marks.get_mut(&l.partition) {
                *mark = (*mark).max(l.index + 1);
            }
        }
        metrics.logged_pending.sub(batch.len() as i64);
        metrics.logged_announced.inc_by(batch.len() as u64);
        dirty = true;
        if written.elapsed() >= Duration::from_secs(1) {
            write(&marks)?;
            written = std::time::Instant::now();
            dirty = false;
        }
    }
    if dirty {
        write(&marks)?;
    }
    Ok(())
}

/// Copy `vitals.rejected` into the local dead-letter file, resuming from a
/// cursor file written after each fsynced append (a crash in between repeats
/// records, each carrying its `source`; none is lost).
async fn copy_dead_letters(
    kcfg: KafkaConfig,
    rejects: Arc<RejectLog>,
    data: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let start = std::fs::read_to_string(data.join("rejected.cursor"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let (_c, mut parts) = KafkaConsumer::assign(&kcfg, REJECTED_TOPIC, &[(0, start)])?;
    let mut source = parts
        .pop()
        .ok_or_else(|| Error::Coverage(format!("{REJECTED_TOPIC} has no partition 0")))?;
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            more = source.next_batch(1000, &mut batch) => {
                if !more? {
                    return Ok(());
                }
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    return Ok(());
                }
                continue;
            }
        }
        let taken = std::mem::take(&mut batch);
        let next = taken.iter().map(|d| d.offset + 1).max().unwrap_or(0);
        let recs: Vec<Rejection> = taken
            .iter()
            .map(|d| {
                let mut r: Rejection =
                    serde_json::from_slice(&d.record.payload).unwrap_or_else(|e| {
                        Rejection::new(
                            "ingest",
                            "malformed_dead_letter",
                            e.to_string(),
                            &d.record.payload,
                            0,
                        )
                    });
                r.source = Some(format!("{REJECTED_TOPIC}/0@{}", d.offset));
                // The topic is not authenticated: a record stands for one
                // rejection, at a time no later than now.
                r.count = 1;
                r.received_ms = r.received_ms.min(SystemClock.now_ms());
                r
            })
            .collect();
        tokio::task::block_in_place(|| -> Result<()> {
            rejects.append(&recs)?;
            crate::durable::write_atomic(&data, "rejected.cursor", next.to_string().as_bytes())?;
            Ok(())
        })?;
        let _ = source.commit(next).await;
    }
}

impl std::fmt::Debug for AttestBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttestBus::Kafka {
                kafka,
                partitions,
                partial,
                dead_letters,
                rejects,
                operator,
                mqtt,
            } => f
                .debug_struct("Kafka")
                .field("kafka", kafka)
                .field("partitions", partitions)
                .field("partial", partial)
                .field("dead_letters", dead_letters)
                .field("rejects", rejects)
                .field("operator", operator)
                .field("mqtt", mqtt)
                .finish(),
            AttestBus::InProc { partitions, .. } => f
                .debug_struct("InProc")
                .field("partitions", &partitions.len())
                .finish_non_exhaustive(),
        }
    }
}

impl std::fmt::Debug for StageConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageConfig")
            .field("attestor", &self.attestor)
            .field("bus", &self.bus)
            .finish_non_exhaustive()
    }
}
