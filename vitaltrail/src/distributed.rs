//! The distributed mode: each stage in its own process, over a real MQTT
//! broker and Kafka. `vitaltrail ingest` scales out behind a shared MQTT
//! subscription; `vitaltrail attest` owns an explicit set of partitions.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;
use vitaltrail_attestor::metrics::Metrics as AttestorMetrics;
use vitaltrail_attestor::pipeline::{AttestorConfig, PartitionState, run_partition};
use vitaltrail_bus::deadletter::{RejectLog, Rejection};
use vitaltrail_bus::kafka::{
    self, KafkaConfig, KafkaConsumer, KafkaProducer, REJECTED_TOPIC, VERIFIED_TOPIC,
};
use vitaltrail_bus::{PartitionSource, RejectSink};
use vitaltrail_core::{Clock, SystemClock};
use vitaltrail_ingest::IngestConfig;
use vitaltrail_ingest::metrics::Metrics as IngestMetrics;
use vitaltrail_ingest::registry::SharedRegistry;

use crate::up::{log_key, registry_file, serve_metrics};

/// Typed configuration of `vitaltrail ingest`.
#[derive(Debug, Clone)]
pub struct IngestProcessConfig {
    /// Kafka.
    pub kafka: KafkaConfig,
    /// MQTT and batching.
    pub ingest: IngestConfig,
    /// Where the device registry (`devices.json`) is read from.
    pub data_dir: PathBuf,
    /// Where `/metrics` is served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

/// Run one ingest process until `shutdown`.
pub async fn run_ingest(cfg: IngestProcessConfig, shutdown: watch::Receiver<bool>) -> Result<()> {
    kafka::ensure_topics(&cfg.kafka)
        .await
        .context("creating Kafka topics")?;
    let producer = KafkaProducer::new(&cfg.kafka)?;
    let registry = prometheus::Registry::new();
    let metrics = IngestMetrics::new(&registry)?;
    let (devices, _watch) =
        SharedRegistry::watch(registry_file(&cfg.data_dir), Duration::from_millis(500))?;
    if let Some(listen) = cfg.metrics_listen {
        tokio::spawn(serve_metrics(listen, registry, shutdown.clone()));
    }
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let sink = RejectSink::Kafka(producer.clone());
    vitaltrail_ingest::run(
        cfg.ingest, producer, devices, sink, clock, metrics, shutdown,
    )
    .await?;
    Ok(())
}

/// Typed configuration of `vitaltrail attest`.
#[derive(Debug, Clone)]
pub struct AttestProcessConfig {
    /// Kafka.
    pub kafka: KafkaConfig,
    /// The `vitals.verified` partitions this process owns.
    pub partitions: Vec<u32>,
    /// Also copy `vitals.rejected` into `<data>/rejected.jsonl`.
    pub dead_letters: bool,
    /// Attestor settings (`data_dir` included).
    pub attestor: AttestorConfig,
    /// Where `/metrics` is served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

/// Run one attestor process until `shutdown`.
pub async fn run_attest(cfg: AttestProcessConfig, shutdown: watch::Receiver<bool>) -> Result<()> {
    kafka::ensure_topics(&cfg.kafka)
        .await
        .context("creating Kafka topics")?;
    let data = cfg.attestor.data_dir.clone();
    std::fs::create_dir_all(&data)?;
    let key = log_key(&data)?;
    let registry = prometheus::Registry::new();
    let metrics = AttestorMetrics::new(&registry)?;
    let rejects = Arc::new(RejectLog::open(data.join("rejected.jsonl"))?);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);

    let (devices, _watch) =
        SharedRegistry::watch(registry_file(&data), Duration::from_millis(500))?;
    let patients = crate::up::patient_lookup(&devices);
    let mut states = Vec::new();
    let mut starts = Vec::new();
    for &p in &cfg.partitions {
        let state = PartitionState::open(&cfg.attestor, p, &key, metrics.clone(), patients.clone())
            .with_context(|| format!("opening partition {p}"))?;
        starts.push((p, state.resume_offset()));
        states.push(state);
    }
    let (_consumer, sources) = KafkaConsumer::assign(&cfg.kafka, VERIFIED_TOPIC, &starts)?;
    let mut tasks = tokio::task::JoinSet::new();
    for (source, state) in sources.into_iter().zip(states) {
        let run = run_partition(
            source,
            state,
            cfg.attestor.clone(),
            rejects.clone(),
            clock.clone(),
            shutdown.clone(),
        );
        tasks.spawn(async move { run.await.map_err(anyhow::Error::from) });
    }
    if cfg.dead_letters {
        let kcfg = cfg.kafka.clone();
        let rejects = rejects.clone();
        let data = data.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move { copy_dead_letters(kcfg, rejects, data, shutdown).await });
    }
    if let Some(listen) = cfg.metrics_listen {
        tasks.spawn(serve_metrics(listen, registry, shutdown.clone()));
    }
    tracing::info!(partitions = ?cfg.partitions, data = %data.display(), "attestor is up");
    crate::up::join_stages(tasks).await
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
    let mut source = parts.pop().context("no dead-letter partition")?;
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
                r
            })
            .collect();
        tokio::task::block_in_place(|| -> Result<()> {
            rejects.append(&recs)?;
            vitaltrail_attestor::durable::write_atomic(
                &data,
                "rejected.cursor",
                next.to_string().as_bytes(),
            )?;
            Ok(())
        })?;
        let _ = source.commit(next).await;
    }
}
