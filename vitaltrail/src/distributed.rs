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
use vitaltrail_attestor::pipeline::{
    AttestorConfig, PartitionState, PublishedCheckpoint, run_partition,
};
use vitaltrail_bus::deadletter::{RejectLog, Rejection};
use vitaltrail_bus::kafka::{
    self, CHECKPOINTS_TOPIC, DEVICES_TOPIC, KafkaConfig, KafkaConsumer, KafkaProducer,
    REJECTED_TOPIC, VERIFIED_TOPIC,
};
use vitaltrail_bus::{PartitionSource, RejectSink};
use vitaltrail_core::{Clock, SystemClock};
use vitaltrail_core::{DeviceId, SecretKey};
use vitaltrail_ingest::IngestConfig;
use vitaltrail_ingest::metrics::Metrics as IngestMetrics;
use vitaltrail_ingest::registry::{DeviceEntry, SharedRegistry, sign_entry};

use crate::up::{log_key, registry_file, serve_metrics};

/// The bus key at `path` (64 hex digits), created (mode 0600) if absent.
/// Every ingest and attestor of one pipeline must use the same key.
pub fn load_bus_key(path: &std::path::Path) -> Result<vitaltrail_core::busauth::BusKey> {
    use vitaltrail_core::busauth::BusKey;
    if !path.exists() {
        let key = BusKey::generate(&mut rand::rngs::OsRng);
        crate::up::write_secret(path, &format!("{}\n", key.to_hex()))?;
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    BusKey::from_hex(&text)
        .with_context(|| format!("{} does not hold a bus key (64 hex digits)", path.display()))
}

/// librdkafka client properties from a file of `key=value` lines (`#`
/// comments), e.g. `security.protocol=SASL_SSL` and `sasl.password=…`: a
/// file, so no secret is ever on a command line.
pub fn read_kafka_client_config(path: &std::path::Path) -> Result<Vec<(String, String)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .with_context(|| format!("{}:{}: expected key=value", path.display(), n + 1))?;
        out.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    Ok(out)
}

/// Follow `vitals.devices` into `shared`: returns once every registration
/// already in the topic is applied, so the process starts with the whole
/// registry; later changes keep arriving in the returned task.
pub async fn follow_registry(
    kafka: &KafkaConfig,
    shared: &SharedRegistry,
    operator: &DeviceId,
) -> Result<tokio::task::JoinHandle<()>> {
    let s = shared.clone();
    let op = operator.clone();
    kafka::follow_topic(kafka, DEVICES_TOPIC, move |k, v| {
        s.apply_topic_record(k, v, &op)
    })
    .await
    .context("reading the device registry topic vitals.devices")
}

/// Publish a device's registry entry to `vitals.devices`, signed by the
/// operator key (and wait until Kafka has it).
pub async fn publish_device(
    kafka: &KafkaConfig,
    entry: &DeviceEntry,
    operator: &SecretKey,
) -> Result<()> {
    kafka::ensure_registry_topic(kafka)
        .await
        .context("creating the Kafka topic vitals.devices")?;
    let producer = KafkaProducer::new(kafka)?;
    producer
        .send_to(DEVICES_TOPIC, &entry.did, &sign_entry(entry, operator))
        .await
        .context("publishing to vitals.devices")
}

/// The registry as the `vitals.devices` topic holds it now.
pub async fn topic_registry(kafka: &KafkaConfig, operator: &DeviceId) -> Result<SharedRegistry> {
    kafka::ensure_registry_topic(kafka)
        .await
        .context("creating the Kafka topic vitals.devices")?;
    let shared = SharedRegistry::fixed(Default::default());
    follow_registry(kafka, &shared, operator).await?.abort();
    Ok(shared)
}

/// The operator key of a data directory (`<data>/keys/operator.pem`),
/// created on first use: it signs every `vitals.devices` record.
pub fn operator_key(data_dir: &std::path::Path) -> Result<SecretKey> {
    let path = data_dir.join("keys").join("operator.pem");
    if !path.exists() {
        let key = SecretKey::generate(&mut rand::rngs::OsRng);
        crate::up::write_secret(&path, &key.to_pkcs8_pem()?)?;
        eprintln!(
            "created the operator key {} (DID {}): give every ingest and attestor --operator {}",
            path.display(),
            key.did(),
            key.did()
        );
    }
    let pem =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    SecretKey::from_pkcs8_pem(&pem).with_context(|| format!("operator key {}", path.display()))
}

/// Whose signature the registry topic must carry: `--operator`, else the
/// data directory's own operator key.
pub fn trusted_operator(given: Option<&DeviceId>, data_dir: &std::path::Path) -> Result<DeviceId> {
    match given {
        Some(d) => Ok(d.clone()),
        None => Ok(operator_key(data_dir)?.did().clone()),
    }
}

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
    /// Register metrics here (served by the caller) instead of a registry
    /// of this stage's own.
    pub metrics: Option<prometheus::Registry>,
    /// Whose signature `vitals.devices` records must carry (default: this
    /// data directory's operator key).
    pub operator: Option<DeviceId>,
}

/// Run one ingest process until `shutdown`.
pub async fn run_ingest(cfg: IngestProcessConfig, shutdown: watch::Receiver<bool>) -> Result<()> {
    kafka::ensure_topics(&cfg.kafka)
        .await
        .context("creating Kafka topics")?;
    let producer = KafkaProducer::new(&cfg.kafka)?;
    let registry = cfg.metrics.clone().unwrap_or_default();
    let metrics = IngestMetrics::new(&registry)?;
    let (devices, _watch) =
        SharedRegistry::watch(registry_file(&cfg.data_dir), Duration::from_millis(500))?;
    let operator = trusted_operator(cfg.operator.as_ref(), &cfg.data_dir)?;
    let follow = follow_registry(&cfg.kafka, &devices, &operator).await?;
    if let Some(listen) = cfg.metrics_listen {
        tokio::spawn(serve_metrics(
            listen,
            registry.clone(),
            cfg.data_dir.clone(),
            shutdown.clone(),
        ));
    }
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let sink = RejectSink::Kafka(producer.clone());
    // Receipts of ingest's own final rejections, on the same broker.
    let rcfg = vitaltrail_ingest::receipts::ReceiptConfig {
        mqtt: cfg.ingest.mqtt.clone(),
        client_id: format!("{}-receipts", cfg.ingest.client_id),
        ..Default::default()
    };
    let (rtx, rrx) = vitaltrail_ingest::receipts::queue(&rcfg);
    let publisher = tokio::spawn(vitaltrail_ingest::receipts::publish(
        rcfg,
        rrx,
        vitaltrail_ingest::receipts::ReceiptMetrics::new(&registry, "ingest")?,
        shutdown.clone(),
    ));
    let res = vitaltrail_ingest::run(
        cfg.ingest,
        producer,
        devices,
        sink,
        Some(rtx),
        clock,
        metrics,
        shutdown,
    )
    .await;
    follow.abort();
    let _ = publisher.await;
    Ok(res?)
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
    /// Limits of the local dead-letter store.
    pub rejects: vitaltrail_bus::deadletter::RejectLimits,
    /// The MQTT broker to publish receipts to (`receipts/<did>`); none
    /// without it.
    pub mqtt: Option<vitaltrail_mqtt::MqttEndpoint>,
    /// Whose signature `vitals.devices` records must carry (default: this
    /// data directory's operator key).
    pub operator: Option<DeviceId>,
    /// Other attestors own the topic's other partitions. Without it, the
    /// partitions given must cover the whole topic.
    pub partial: bool,
    /// Attestor settings (`data_dir` included).
    pub attestor: AttestorConfig,
    /// Where `/metrics` is served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Register metrics here (served by the caller) instead of a registry
    /// of this stage's own.
    pub metrics: Option<prometheus::Registry>,
}

/// Check, from the topic's metadata, that `ours` are partitions of
/// `vitals.verified`, and (unless `partial`) that they are all of them: a
/// partition nobody attests is readings nobody logs.
pub fn check_coverage(kafka: &KafkaConfig, ours: &[u32], partial: bool) -> Result<u32> {
    let n = kafka::topic_partitions(kafka, VERIFIED_TOPIC)?;
    if let Some(p) = ours.iter().find(|&&p| p >= n) {
        anyhow::bail!("{VERIFIED_TOPIC} has {n} partitions; partition {p} does not exist");
    }
    let missing: Vec<u32> = (0..n).filter(|p| !ours.contains(p)).collect();
    if !missing.is_empty() && !partial {
        anyhow::bail!(
            "{VERIFIED_TOPIC} has {n} partitions but this attestor owns {ours:?}: nobody would log \
             partitions {missing:?}. Give every partition (--partitions), or pass --partial when \
             other attestors own the rest"
        );
    }
    if !missing.is_empty() {
        tracing::warn!(?missing, "partitions left to other attestors (--partial)");
    }
    Ok(n)
}

/// Run one attestor process until `shutdown`.
pub async fn run_attest(cfg: AttestProcessConfig, shutdown: watch::Receiver<bool>) -> Result<()> {
    kafka::ensure_topics(&cfg.kafka)
        .await
        .context("creating Kafka topics")?;
    let n = check_coverage(&cfg.kafka, &cfg.partitions, cfg.partial)?;
    let mut cfg = cfg;
    cfg.attestor.topic_partitions = Some(n);
    let data = cfg.attestor.data_dir.clone();
    std::fs::create_dir_all(&data)?;
    let key = log_key(&data)?;
    let registry = cfg.metrics.clone().unwrap_or_default();
    let metrics = AttestorMetrics::new(&registry)?;
    let rejects = crate::up::open_rejects(&data, cfg.rejects, &registry)?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);

    let (devices, _watch) =
        SharedRegistry::watch(registry_file(&data), Duration::from_millis(500))?;
    let operator = trusted_operator(cfg.operator.as_ref(), &data)?;
    let follow = follow_registry(&cfg.kafka, &devices, &operator).await?;
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
    // Checkpoints to vitals.checkpoints: first the latest of each partition
    // (one signed before a crash may not have been published), then each
    // new one.
    let (cp_tx, cp_rx) = tokio::sync::mpsc::channel(1024);
    for state in &states {
        if let Some(cp) = state.latest_published()? {
            cp_tx.send(cp).await.ok();
        }
    }
    tasks.spawn(publish_checkpoints(
        KafkaProducer::new(&cfg.kafka)?,
        cp_rx,
        shutdown.clone(),
    ));
    let receipts_tx = match &cfg.mqtt {
        Some(mqtt) => {
            let rcfg = vitaltrail_ingest::receipts::ReceiptConfig {
                mqtt: mqtt.clone(),
                client_id: format!(
                    "vitaltrail-attest-receipts-{}",
                    cfg.partitions
                        .iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join("-")
                ),
                ..Default::default()
            };
            let (tx, rx) = vitaltrail_ingest::receipts::queue(&rcfg);
            let m = vitaltrail_ingest::receipts::ReceiptMetrics::new(&registry, "attestor")?;
            tasks.spawn({
                let stop = shutdown.clone();
                async move {
                    vitaltrail_ingest::receipts::publish(rcfg, rx, m, stop)
                        .await
                        .map_err(anyhow::Error::from)
                }
            });
            Some(tx)
        }
        None => None,
    };
    for (source, state) in sources.into_iter().zip(states) {
        let run = run_partition(
            source,
            state,
            cfg.attestor.clone(),
            rejects.clone(),
            clock.clone(),
            Some(cp_tx.clone()),
            receipts_tx.clone(),
            shutdown.clone(),
        );
        tasks.spawn(async move { run.await.map_err(anyhow::Error::from) });
    }
    drop(cp_tx);
    drop(receipts_tx);
    if cfg.dead_letters {
        let kcfg = cfg.kafka.clone();
        let rejects = rejects.clone();
        let data = data.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move { copy_dead_letters(kcfg, rejects, data, shutdown).await });
    }
    if let Some(listen) = cfg.metrics_listen {
        tasks.spawn(serve_metrics(
            listen,
            registry,
            data.clone(),
            shutdown.clone(),
        ));
    }
    tracing::info!(partitions = ?cfg.partitions, data = %data.display(), "attestor is up");
    let res = crate::up::join_stages(tasks).await;
    follow.abort();
    res
}

/// Produce announced checkpoints to `vitals.checkpoints` (key = origin),
/// in order, until every partition worker is gone. While Kafka is down the
/// send waits (the producer never times out), and the bounded channel
/// holds the workers back rather than dropping a checkpoint.
async fn publish_checkpoints(
    producer: KafkaProducer,
    mut rx: tokio::sync::mpsc::Receiver<PublishedCheckpoint>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    while let Some(cp) = rx.recv().await {
        let json = serde_json::to_vec(&cp)?;
        let send = producer.send_to(CHECKPOINTS_TOPIC, &cp.origin, &json);
        tokio::select! {
            r = send => r.context("publishing to vitals.checkpoints")?,
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
                // The topic is not authenticated: a record stands for one
                // rejection, at a time no later than now.
                r.count = 1;
                r.received_ms = r.received_ms.min(SystemClock.now_ms());
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
