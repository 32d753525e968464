//! The ingest stage: [`run`] wires [`crate::service::serve`] to its bus,
//! its registry and its receipt publisher, for `vitaltrail ingest` (Kafka)
//! and for `vitaltrail up` (the in-process bus).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use vitaltrail_bus::deadletter::RejectLog;
use vitaltrail_bus::inproc::InProcProducer;
use vitaltrail_bus::kafka::{self, KafkaConfig, KafkaProducer};
use vitaltrail_bus::registry::{self, SharedRegistry};
use vitaltrail_bus::{RejectSink, datadir};
use vitaltrail_core::receipt::Receipt;
use vitaltrail_core::{Clock, DeviceId};
use vitaltrail_mqtt::receipts::{self, ReceiptConfig, ReceiptMetrics};

use crate::metrics::Metrics;
use crate::{IngestConfig, Result};

/// Where ingest hands readings, and what comes with that choice.
// Built once per process: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum IngestBus {
    /// Kafka (`vitals.verified`, rejections to `vitals.rejected`). The
    /// registry is `<data>/devices.json` merged with `vitals.devices`,
    /// whose records must be signed by `operator` (default: the data
    /// directory's operator key). Receipts of final rejections go out on
    /// the stage's own MQTT connection.
    Kafka {
        /// The cluster, the bus key and client settings.
        kafka: KafkaConfig,
        /// Whose signature `vitals.devices` records must carry.
        operator: Option<DeviceId>,
    },
    /// The in-process bus of `vitaltrail up`: rejections to the process's
    /// dead-letter store, their receipts to its receipt publisher, and the
    /// registry the process already follows.
    InProc {
        /// The bus.
        producer: InProcProducer,
        /// The dead-letter store.
        rejects: Arc<RejectLog>,
        /// The process's receipt queue.
        receipts: mpsc::Sender<Receipt>,
        /// The registry.
        devices: SharedRegistry,
    },
}

/// Typed configuration of the ingest stage.
pub struct StageConfig {
    /// MQTT and batching.
    pub ingest: IngestConfig,
    /// The bus.
    pub bus: IngestBus,
    /// The data directory (registry file, operator key).
    pub data_dir: PathBuf,
    /// This stage's metrics (`Metrics::new` on the caller's registry, so
    /// the caller can read them, e.g. for readiness).
    pub metrics: Metrics,
    /// The registry the caller serves (for the receipt publisher's metrics).
    pub registry: prometheus::Registry,
    /// The clock readings are received by.
    pub clock: Arc<dyn Clock>,
}

/// Run the ingest stage until `shutdown` (then drain, see
/// [`IngestConfig::drain_quiet`]).
pub async fn run(cfg: StageConfig, shutdown: watch::Receiver<bool>) -> Result<()> {
    let metrics = cfg.metrics;
    match cfg.bus {
        IngestBus::InProc {
            producer,
            rejects,
            receipts,
            devices,
        } => {
            crate::service::serve(
                cfg.ingest,
                producer,
                devices,
                RejectSink::File(rejects),
                Some(receipts),
                cfg.clock,
                metrics,
                shutdown,
            )
            .await
        }
        IngestBus::Kafka { kafka, operator } => {
            kafka::ensure_topics(&kafka).await?;
            let producer = KafkaProducer::new(&kafka)?;
            let (devices, _watch) = SharedRegistry::watch(
                datadir::registry_file(&cfg.data_dir),
                Duration::from_millis(500),
            )?;
            let operator = datadir::trusted_operator(operator.as_ref(), &cfg.data_dir)?;
            let follow = registry::follow_topic(&kafka, &devices, &operator).await?;
            // Receipts of ingest's own final rejections, on the same broker.
            let rcfg = ReceiptConfig {
                mqtt: cfg.ingest.mqtt.clone(),
                client_id: format!("{}-receipts", cfg.ingest.client_id),
                ..Default::default()
            };
            let (rtx, rrx) = receipts::queue(&rcfg);
            let publisher = tokio::spawn(receipts::publish(
                rcfg,
                rrx,
                ReceiptMetrics::new(&cfg.registry, "ingest")?,
                shutdown.clone(),
            ));
            let sink = RejectSink::Kafka(producer.clone());
            let res = crate::service::serve(
                cfg.ingest,
                producer,
                devices,
                sink,
                Some(rtx),
                cfg.clock,
                metrics,
                shutdown,
            )
            .await;
            follow.abort();
            let _ = publisher.await;
            res
        }
    }
}

impl std::fmt::Debug for IngestBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IngestBus::Kafka { kafka, operator } => f
                .debug_struct("Kafka")
                .field("kafka", kafka)
                .field("operator", operator)
                .finish(),
            IngestBus::InProc { .. } => f.write_str("InProc"),
        }
    }
}

impl std::fmt::Debug for StageConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageConfig")
            .field("ingest", &self.ingest)
            .field("bus", &self.bus)
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}
