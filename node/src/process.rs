//! One stage per process, over Kafka: `vitaltrail ingest`,
//! `vitaltrail attest`, `vitaltrail anchor` and `vitaltrail alerts`, each with its own `/metrics` when `http.listen`
//! is set.

use std::sync::Arc;

use tokio::sync::watch;
use vitaltrail_attestor::{AttestBus, StageConfig as AttestStage};
use vitaltrail_core::{Clock, SystemClock};
use vitaltrail_ingest::{IngestBus, StageConfig as IngestStage};

use crate::config::NodeConfig;
use crate::http::HttpConfig;
use crate::{Error, Result};

/// Serve `/metrics` for a stage process, if `http.listen` is set.
fn serve_metrics(
    cfg: &NodeConfig,
    registry: &prometheus::Registry,
    shutdown: &watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<Result<()>>> {
    serve_http(cfg, registry, None, shutdown)
}

/// Serve `/metrics` (and, for the alert engine, `POST /alerts/<id>/ack`)
/// if `http.listen` is set.
fn serve_http(
    cfg: &NodeConfig,
    registry: &prometheus::Registry,
    alerts: Option<vitaltrail_alerts::AckHandle>,
    shutdown: &watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<Result<()>>> {
    cfg.http.listen.map(|listen| {
        tokio::spawn(crate::http::run(
            HttpConfig {
                listen,
                registry: registry.clone(),
                data_dir: cfg.data_dir.clone(),
                sql: false,
                ready: None,
                alerts,
            },
            shutdown.clone(),
        ))
    })
}

/// Run `stage`; the HTTP server failing (its port taken) stops it too.
async fn with_http(
    http: Option<tokio::task::JoinHandle<Result<()>>>,
    stage: impl std::future::Future<Output = Result<()>>,
) -> Result<()> {
    let Some(mut http) = http else {
        return stage.await;
    };
    tokio::pin!(stage);
    tokio::select! {
        r = &mut stage => {
            http.abort();
            r
        }
        r = &mut http => match r {
            // It stops on shutdown, before the stage has drained.
            Ok(Ok(())) => stage.await,
            Ok(Err(e)) => Err(e),
            Err(e) => Err(Error::StageStopped(format!("the HTTP server panicked: {e}"))),
        },
    }
}

/// The ingest stage's configuration from the layered one.
pub fn ingest_stage(cfg: &NodeConfig, registry: &prometheus::Registry) -> Result<IngestStage> {
    let mqtt = cfg
        .external_mqtt()?
        .ok_or_else(|| Error::Config("ingest needs an MQTT broker (mqtt.broker, --mqtt)".into()))?;
    let operator = cfg.operator()?;
    // Last: the bus key is created when absent.
    let kafka = cfg.kafka_config(cfg.kafka.topic_partitions)?;
    Ok(IngestStage {
        ingest: cfg.ingest_config(mqtt),
        bus: IngestBus::Kafka { kafka, operator },
        data_dir: cfg.data_dir.clone(),
        metrics: vitaltrail_ingest::metrics::Metrics::new(registry)?,
        registry: registry.clone(),
        clock: Arc::new(SystemClock) as Arc<dyn Clock>,
    })
}

/// The attestor stage's configuration from the layered one.
pub fn attest_stage(cfg: &NodeConfig, registry: &prometheus::Registry) -> Result<AttestStage> {
    let partitions = match &cfg.attestor.partitions {
        Some(p) if !p.is_empty() => p.clone(),
        Some(_) => return Err(Error::Config("attestor.partitions is empty".into())),
        None => (0..cfg.kafka.topic_partitions).collect(),
    };
    let operator = cfg.operator()?;
    let mqtt = cfg.external_mqtt()?;
    // Last: the bus key is created when absent.
    let kafka = cfg.kafka_config(cfg.kafka.topic_partitions)?;
    Ok(AttestStage {
        attestor: cfg.attestor_config(),
        bus: AttestBus::Kafka {
            kafka,
            partitions,
            partial: cfg.attestor.partial,
            dead_letters: cfg.attestor.copy_dead_letters,
            rejects: cfg.dead_letters,
            operator,
            mqtt,
        },
        metrics: registry.clone(),
        clock: Arc::new(SystemClock) as Arc<dyn Clock>,
    })
}

/// `vitaltrail ingest`: run the ingest stage until `shutdown`.
pub async fn run_ingest(cfg: NodeConfig, shutdown: watch::Receiver<bool>) -> Result<()> {
    let registry = prometheus::Registry::new();
    let stage = ingest_stage(&cfg, &registry)?;
    let http = serve_metrics(&cfg, &registry, &shutdown);
    let run = vitaltrail_ingest::run(stage, shutdown);
    with_http(http, async move { Ok(run.await?) }).await
}

/// `vitaltrail attest`: run the attestor stage until `shutdown`.
pub async fn run_attest(cfg: NodeConfig, shutdown: watch::Receiver<bool>) -> Result<()> {
    let registry = prometheus::Registry::new();
    let stage = attest_stage(&cfg, &registry)?;
    let http = serve_metrics(&cfg, &registry, &shutdown);
    let run = vitaltrail_attestor::run(stage, shutdown);
    with_http(http, async move { Ok(run.await?) }).await
}

/// The alert stage's configuration from the layered one (over Kafka).
pub fn alerts_stage(
    cfg: &NodeConfig,
    registry: &prometheus::Registry,
) -> Result<vitaltrail_alerts::StageConfig> {
    let partitions = match &cfg.alerts.partitions {
        Some(p) if p.is_empty() => return Err(Error::Config("alerts.partitions is empty".into())),
        Some(p) => p.clone(),
        None => Vec::new(),
    };
    let operator = cfg.operator()?;
    let key = cfg.logged_key()?;
    let kafka = cfg.kafka_config_without_bus_key(cfg.kafka.topic_partitions)?;
    Ok(vitaltrail_alerts::StageConfig {
        alerts: cfg.alerts.clone(),
        source: vitaltrail_alerts::AlertsSource::Kafka {
            kafka,
            key,
            partitions,
            partial: cfg.alerts.partial,
            operator,
        },
        data_dir: cfg.data_dir.clone(),
        clock: Arc::new(SystemClock) as Arc<dyn Clock>,
        metrics: registry.clone(),
        // Nurse stations' alerts go to the pipeline's broker, if one is set.
        mqtt: if cfg.alerts.mqtt {
            cfg.external_mqtt()?
        } else {
            None
        },
        acks: None,
        wake: None,
    })
}

/// `vitaltrail alerts`: run the alert engine over `vitals.logged` until
/// `shutdown`.
pub async fn run_alerts(cfg: NodeConfig, shutdown: watch::Receiver<bool>) -> Result<()> {
    let registry = prometheus::Registry::new();
    let mut stage = alerts_stage(&cfg, &registry)?;
    // Acknowledgements come to the process that holds the alarms.
    let handle = cfg.http.listen.map(|_| {
        let (h, i) = vitaltrail_alerts::ack::inbox();
        stage.acks = Some(i);
        h
    });
    let http = serve_http(&cfg, &registry, handle, &shutdown);
    let run = vitaltrail_alerts::run(stage, shutdown);
    with_http(http, async move { Ok(run.await?) }).await
}

/// `vitaltrail anchor`: run the anchor over `vitals.checkpoints` until
/// `shutdown`.
pub async fn run_anchor(cfg: NodeConfig, shutdown: watch::Receiver<bool>) -> Result<()> {
    let registry = prometheus::Registry::new();
    let kafka = cfg.kafka_config_without_bus_key(cfg.kafka.topic_partitions)?;
    let stage = vitaltrail_anchor::StageConfig {
        anchor: cfg.anchor_config(),
        source: vitaltrail_anchor::AnchorSource::Kafka(kafka),
        metrics: registry.clone(),
    };
    let http = serve_metrics(&cfg, &registry, &shutdown);
    let run = vitaltrail_anchor::run(stage, shutdown);
    with_http(http, async move { Ok(run.await?) }).await
}
