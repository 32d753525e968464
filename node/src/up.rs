//! `vitaltrail up`: the whole pipeline in one process.
//!
//! An embedded MQTT broker (rumqttd, behind the device gate) unless an
//! external one is given, the ingest stage, the in-process bounded bus in
//! place of Kafka (the attestor's durable Merkle log is the write-ahead
//! log, and the pipeline's receipt waits for it), the attestor stage with
//! one worker per partition, the receipt publisher, and the HTTP server.
//! With `kafka`, the same stages run over a real Kafka cluster instead.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use vitaltrail_attestor::pipeline::AttestorConfig;
use vitaltrail_attestor::{AttestBus, StageConfig as AttestStage};
use vitaltrail_bus::deadletter::{RejectLimits, RejectLog};
use vitaltrail_bus::registry::{self, SharedRegistry};
use vitaltrail_bus::{datadir, inproc};
use vitaltrail_core::auth::Token;
use vitaltrail_core::{Clock, SystemClock};
use vitaltrail_ingest::metrics::Metrics as IngestMetrics;
use vitaltrail_ingest::{IngestBus, IngestConfig, StageConfig as IngestStage};
use vitaltrail_mqtt::receipts::{self, ReceiptConfig, ReceiptMetrics};

use crate::config::{NodeConfig, Role};
use crate::http::{HttpConfig, Readiness};
use crate::{Error, Result};

/// Typed configuration of `up`, as [`UpConfig::from_node`] makes it from
/// the layered [`NodeConfig`].
#[derive(Debug, Clone)]
pub struct UpConfig {
    /// Everything durable lives here.
    pub data_dir: PathBuf,
    /// Where devices connect to the embedded broker (mutual TLS, through
    /// the gate); ignored with `external_mqtt`.
    pub mqtt_listen: SocketAddr,
    /// More names for the embedded broker's certificate (besides
    /// `localhost`, `127.0.0.1` and the listen address).
    pub mqtt_names: Vec<String>,
    /// Use this broker instead of the embedded one (how the pipeline
    /// authenticates to it included).
    pub external_mqtt: Option<vitaltrail_mqtt::MqttEndpoint>,
    /// Partitions (one attestor worker and log each).
    pub partitions: u32,
    /// Records each bus partition holds in flight.
    pub bus_capacity: usize,
    /// Where `/metrics` and `POST /sql` are served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Attestor settings (its `data_dir` is overridden by ours).
    pub attestor: AttestorConfig,
    /// Ingest settings (its MQTT endpoint is overridden by ours).
    pub ingest: IngestConfig,
    /// Run the same stages over this Kafka cluster instead of the
    /// in-process bus (its bus key and client properties included).
    pub kafka: Option<vitaltrail_bus::kafka::KafkaConfig>,
    /// Limits of the dead-letter store.
    pub rejects: RejectLimits,
    /// With `kafka`: whose signature `vitals.devices` records must carry
    /// (default: the data directory's operator key).
    pub operator: Option<vitaltrail_core::DeviceId>,
    /// The anchor (its `data_dir` is overridden by ours); none when off.
    pub anchor: Option<vitaltrail_anchor::AnchorConfig>,
    /// The alert engine (over the partition logs, or with `kafka` over
    /// `vitals.logged`); none when off.
    pub alerts: Option<vitaltrail_alerts::AlertsConfig>,
}

impl Default for UpConfig {
    /// [`NodeConfig::defaults`] for `up`, with one partition.
    fn default() -> Self {
        let n = NodeConfig::defaults(Role::Up);
        UpConfig {
            data_dir: n.data_dir.clone(),
            mqtt_listen: n.mqtt.listen,
            mqtt_names: n.mqtt.names.clone(),
            external_mqtt: None,
            partitions: 1,
            bus_capacity: n.bus.capacity,
            metrics_listen: n.http.listen,
            attestor: n.attestor_config(),
            ingest: n.ingest_config(Default::default()),
            kafka: None,
            rejects: n.dead_letters,
            operator: None,
            anchor: Some(n.anchor_config()),
            alerts: Some(n.alerts.clone()),
        }
    }
}

impl UpConfig {
    /// The typed configuration of `up` from the layered one: reads the
    /// pipeline's MQTT credentials and the bus key where they are needed.
    pub fn from_node(n: &NodeConfig) -> Result<UpConfig> {
        let partitions = n.up_partitions();
        // What can fail on a setting first; the bus key (which is created
        // when absent) last.
        let external_mqtt = n.external_mqtt()?;
        let operator = n.operator()?;
        let kafka = match n.kafka.brokers {
            Some(_) => Some(n.kafka_config(partitions)?),
            None => None,
        };
        Ok(UpConfig {
            data_dir: n.data_dir.clone(),
            mqtt_listen: n.mqtt.listen,
            mqtt_names: n.mqtt.names.clone(),
            external_mqtt,
            partitions,
            bus_capacity: n.bus.capacity,
            metrics_listen: n.http.listen,
            attestor: n.attestor_config(),
            ingest: n.ingest_config(Default::default()),
            kafka,
            rejects: n.dead_letters,
            operator,
            anchor: n.anchor.enabled.then(|| n.anchor_config()),
            alerts: n.alerts.enabled.then(|| n.alerts.clone()),
        })
    }
}

impl UpConfig {
    /// Run over the Kafka cluster at `brokers`, with the data directory's
    /// bus key (created if absent) and no further client properties.
    pub fn over_kafka(mut self, brokers: &str) -> Result<UpConfig> {
        self.kafka = Some(vitaltrail_bus::kafka::KafkaConfig {
            brokers: brokers.to_owned(),
            partitions: self.partitions as i32,
            bus_key: Some(datadir::load_bus_key(&datadir::bus_key_path(
                &self.data_dir,
            ))?),
            ..Default::default()
        });
        Ok(self)
    }
}

/// A stage's life: resolves (with an error) only if the stage dies.
type Watchdog = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>;

/// A free TCP port on loopback (for the embedded broker, which only the
/// gate and the pipeline in this process reach).
fn free_loopback_port() -> Result<SocketAddr> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| Error::io("binding a loopback port", e))?;
    l.local_addr()
        .map_err(|e| Error::io("binding a loopback port", e))
}

/// The MQTT broker the pipeline uses: the external one, or the embedded
/// one, started here with its device gate and ready to accept
/// connections, with their watchdog. The embedded broker listens on a
/// loopback port for the gate and the pipeline only (with a token made for
/// this run); devices reach it through the gate on `cfg.mqtt_listen`, with
/// a certificate of `<data>/mqtt/ca.pem`.
async fn mqtt_endpoint(
    cfg: &UpConfig,
    devices: &SharedRegistry,
    registry: &prometheus::Registry,
    shutdown: watch::Receiver<bool>,
) -> Result<(vitaltrail_mqtt::MqttEndpoint, Watchdog)> {
    use vitaltrail_mqtt::{Login, MqttEndpoint, PIPELINE_USER, Pki, embedded, gate};
    if let Some(e) = &cfg.external_mqtt {
        return Ok((e.clone(), Box::pin(std::future::pending())));
    }
    // Fresh for every run and never written down: only this process's
    // gate and pipeline use it.
    let token = Token::generate(&mut rand::rngs::OsRng);
    let mut names = cfg.mqtt_names.clone();
    if !cfg.mqtt_listen.ip().is_unspecified() {
        names.push(cfg.mqtt_listen.ip().to_string());
    }
    let pki = Pki::load_or_create(&cfg.data_dir, &names)?;
    let internal = free_loopback_port()?;
    let broker = embedded::start(&embedded::EmbeddedConfig {
        listen: internal,
        token: Some(token.clone()),
        max_connections: 10_010,
    })?;
    crate::wait_for_port(internal, Duration::from_secs(5)).await?;
    let mut gate_cfg = gate::GateConfig::new(cfg.mqtt_listen, &pki, internal, token.clone())?;
    gate_cfg.max_connections = gate::connection_capacity();
    // Nurse stations: their wards' alerts only (re-read as the file changes).
    let viewers = Arc::new(vitaltrail_mqtt::viewers::ViewersFile::new(
        vitaltrail_mqtt::viewers::viewers_file(&cfg.data_dir),
    ));
    gate_cfg.viewers = gate::ViewerCheck(Arc::new(move |n: &str, k: &str| viewers.wards(n, k)));
    let metrics = vitaltrail_mqtt::metrics::GateMetrics::new(registry)?;
    let gate = tokio::spawn(gate::run(
        gate_cfg,
        crate::device_check(devices),
        metrics,
        shutdown,
    ));
    crate::wait_for_port(cfg.mqtt_listen, Duration::from_secs(5)).await?;
    let watchdog = async move {
        tokio::select! {
            r = broker => r.map_err(Error::from),
            r = gate => match r {
                Ok(Ok(())) => std::future::pending().await,
                Ok(Err(e)) => Err(Error::StageStopped(format!("the MQTT device gate stopped: {e}"))),
                Err(e) => Err(Error::StageStopped(format!("the MQTT device gate panicked: {e}"))),
            },
        }
    };
    let mut endpoint = MqttEndpoint::plain("127.0.0.1", internal.port());
    endpoint.login = Some(Login {
        username: PIPELINE_USER.into(),
        password: token,
    });
    Ok((endpoint, Box::pin(watchdog)))
}

/// Ready once every ingest connection is subscribed.
fn ingest_ready(metrics: &IngestMetrics, want: usize) -> Readiness {
    let subscribed = metrics.subscribed.clone();
    Arc::new(move || subscribed.get() >= want as i64)
}

/// Wait for a stage that must run until `shutdown`: it ending sooner, even
/// without an error, is a failure (a pipeline missing a stage must not
/// look alive).
async fn until_shutdown<E>(
    name: &str,
    task: &mut tokio::task::JoinHandle<std::result::Result<(), E>>,
    shutdown: &watch::Receiver<bool>,
) -> Result<()>
where
    Error: From<E>,
{
    match task.await {
        Ok(Ok(())) if *shutdown.borrow() => Ok(()),
        Ok(Ok(())) => Err(Error::StageStopped(format!(
            "{name} stopped while the pipeline was running"
        ))),
        Ok(Err(e)) => Err(Error::from(e)),
        Err(e) => Err(Error::StageStopped(format!("{name} panicked: {e}"))),
    }
}

/// `up --kafka`: the distributed stages (ingest, attestor for every
/// partition) in one process, over a real Kafka cluster.
async fn run_over_kafka(
    cfg: UpConfig,
    kafka: vitaltrail_bus::kafka::KafkaConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let registry = prometheus::Registry::new();
    // Topics first (both stages would create them, and the registry
    // follower reads one), then the gate's registry check (the local file
    // and vitals.devices, as ingest and the attestor keep their own), then
    // both stages.
    vitaltrail_bus::kafka::ensure_topics(&kafka).await?;
    let (devices, _watch) = SharedRegistry::watch(
        datadir::registry_file(&cfg.data_dir),
        Duration::from_millis(500),
    )?;
    let operator = datadir::trusted_operator(cfg.operator.as_ref(), &cfg.data_dir)?;
    let _follow = registry::follow_topic(&kafka, &devices, &operator).await?;
    let (mqtt, broker) = mqtt_endpoint(&cfg, &devices, &registry, shutdown.clone()).await?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let i_metrics = IngestMetrics::new(&registry)?;
    let ingest = IngestStage {
        ingest: ingest_config(&cfg, &mqtt),
        bus: IngestBus::Kafka {
            kafka: kafka.clone(),
            operator: Some(operator.clone()),
        },
        data_dir: cfg.data_dir.clone(),
        metrics: i_metrics.clone(),
        registry: registry.clone(),
        clock: clock.clone(),
    };
    let anchor = cfg.anchor.clone().map(|a| vitaltrail_anchor::StageConfig {
        anchor: vitaltrail_anchor::AnchorConfig {
            data_dir: cfg.data_dir.clone(),
            ..a
        },
        source: vitaltrail_anchor::AnchorSource::Kafka(kafka.clone()),
        metrics: registry.clone(),
    });
    // The alert engine follows vitals.logged, as `vitaltrail alerts` does.
    let mut ack_handle = None;
    let alerts = match (&cfg.alerts, &kafka.bus_key) {
        (Some(a), Some(bus_key)) => Some(vitaltrail_alerts::StageConfig {
            alerts: a.clone(),
            source: vitaltrail_alerts::AlertsSource::Kafka {
                kafka: kafka.clone(),
                key: bus_key.logged_key(),
                partitions: Vec::new(),
                partial: false,
                operator: Some(operator.clone()),
            },
            data_dir: cfg.data_dir.clone(),
            clock: clock.clone(),
            metrics: registry.clone(),
            mqtt: Some(mqtt.clone()),
            wake: None,
            // Only where an engine runs to take them.
            acks: cfg.metrics_listen.map(|_| {
                let (h, i) = vitaltrail_alerts::ack::inbox();
                ack_handle = Some(h);
                i
            }),
        }),
        (Some(_), None) => {
            tracing::warn!("no bus key: the alert engine does not run");
            None
        }
        (None, _) => None,
    };
    let attest = AttestStage {
        attestor: AttestorConfig {
            data_dir: cfg.data_dir.clone(),
            ..cfg.attestor.clone()
        },
        bus: AttestBus::Kafka {
            kafka,
            partitions: (0..cfg.partitions).collect(),
            partial: false,
            dead_letters: true,
            rejects: cfg.rejects,
            operator: Some(operator),
            mqtt: Some(mqtt.clone()),
        },
        metrics: registry.clone(),
        clock,
    };
    // One /metrics (and POST /sql) for both stages.
    let mut http = match cfg.metrics_listen {
        Some(listen) => tokio::spawn(crate::http::run(
            HttpConfig {
                listen,
                registry: registry.clone(),
                data_dir: cfg.data_dir.clone(),
                sql: true,
                ready: Some(ingest_ready(&i_metrics, cfg.ingest.connections.max(1))),
                alerts: ack_handle,
            },
            shutdown.clone(),
        )),
        None => tokio::spawn(std::future::pending()),
    };
    let mut a = tokio::spawn(vitaltrail_attestor::run(attest, shutdown.clone()));
    let mut i = tokio::spawn(vitaltrail_ingest::run(ingest, shutdown.clone()));
    // The anchor reads vitals.checkpoints, as `vitaltrail anchor` does,
    // and the alert engine vitals.logged: one task, the first to fail
    // stops both.
    let (stop_anchor, stop_alerts) = (shutdown.clone(), shutdown.clone());
    let mut an = tokio::spawn(async move {
        let idle = |mut stop: watch::Receiver<bool>| async move {
            let _ = stop.wait_for(|s| *s).await;
            Ok::<(), Error>(())
        };
        let anchor = async move {
            match anchor {
                Some(stage) => Ok(vitaltrail_anchor::run(stage, stop_anchor).await?),
                None => idle(stop_anchor).await,
            }
        };
        let alerts = async move {
            match alerts {
                Some(stage) => Ok(vitaltrail_alerts::run(stage, stop_alerts).await?),
                None => idle(stop_alerts).await,
            }
        };
        tokio::try_join!(anchor, alerts).map(|_| ())
    });
    let mut broker = broker;
    let mut anchor_done = false;
    // Any stage ending before shutdown stops the process; on shutdown,
    // ingest drains and the attestor finishes what it has.
    tokio::select! {
        r = until_shutdown("the attestor", &mut a, &shutdown) => {
            r?;
            until_shutdown("ingest", &mut i, &shutdown).await?;
        }
        r = until_shutdown("ingest", &mut i, &shutdown) => {
            r?;
            until_shutdown("the attestor", &mut a, &shutdown).await?;
        }
        r = until_shutdown("the HTTP server", &mut http, &shutdown) => {
            r?;
            until_shutdown("ingest", &mut i, &shutdown).await?;
            until_shutdown("the attestor", &mut a, &shutdown).await?;
        }
        r = until_shutdown("the anchor or the alert engine", &mut an, &shutdown) => {
            anchor_done = true;
            r?;
            until_shutdown("ingest", &mut i, &shutdown).await?;
            until_shutdown("the attestor", &mut a, &shutdown).await?;
        }
        r = &mut broker => r?,
    }
    if !anchor_done {
        until_shutdown("the anchor or the alert engine", &mut an, &shutdown).await?;
    }
    Ok(())
}

/// Ingest's settings on `mqtt`: on the embedded broker its sessions are
/// clean, on both paths. They die with this process anyway, and rumqttd
/// 0.20 panics (taking the process down) when the last member of a shared
/// subscription group with a persistent session disconnects with messages
/// in flight (`router/routing.rs`, "group must exists").
fn ingest_config(cfg: &UpConfig, mqtt: &vitaltrail_mqtt::MqttEndpoint) -> IngestConfig {
    IngestConfig {
        mqtt: mqtt.clone(),
        clean_session: cfg.external_mqtt.is_none(),
        ..cfg.ingest.clone()
    }
}

/// Run everything until `shutdown` turns true.
pub async fn run(mut cfg: UpConfig, shutdown: watch::Receiver<bool>) -> Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| Error::io(format!("creating {}", cfg.data_dir.display()), e))?;
    if let Some(kafka) = cfg.kafka.clone() {
        return run_over_kafka(cfg, kafka, shutdown).await;
    }
    cfg.attestor.data_dir = cfg.data_dir.clone();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let registry = prometheus::Registry::new();
    let rejects = open_rejects(&cfg.data_dir, cfg.rejects, &registry)?;

    let (devices, _watch) = SharedRegistry::watch(
        datadir::registry_file(&cfg.data_dir),
        Duration::from_millis(500),
    )?;
    let existing = datadir::existing_partitions(&cfg.data_dir);
    if existing != 0 && existing != cfg.partitions {
        return Err(Error::DataDir(format!(
            "{} holds {existing} partition logs but {} were asked for; devices are \
             assigned to partitions by hash, so the count cannot change (pass --partitions {existing})",
            cfg.data_dir.display(),
            cfg.partitions
        )));
    }
    let (producer, partitions) = inproc::bus(cfg.partitions, cfg.bus_capacity);
    // Stop order: ingest drains first (what the broker holds for it reaches
    // the log), then the attestors, then the HTTP server and the
    // dead-letter flusher.
    let (attest_stop, attest_stop_rx) = watch::channel(false);
    let (rest_stop, rest_stop_rx) = watch::channel(false);
    let (receipts_tx, receipts_rx) = receipts::queue(&Default::default());
    let mut others = tokio::task::JoinSet::new();
    // The anchor takes every checkpoint the attestor signs; it ends once
    // the attestor has (its queue closes), after a last epoch.
    let checkpoints = match &cfg.anchor {
        Some(anchor) => {
            let (tx, rx) =
                tokio::sync::mpsc::channel(vitaltrail_attestor::pipeline::ANNOUNCE_QUEUE);
            let stage = vitaltrail_anchor::StageConfig {
                anchor: vitaltrail_anchor::AnchorConfig {
                    data_dir: cfg.data_dir.clone(),
                    ..anchor.clone()
                },
                source: vitaltrail_anchor::AnchorSource::InProc(rx),
                metrics: registry.clone(),
            };
            let stop = rest_stop_rx.clone();
            others.spawn(async move { Ok(vitaltrail_anchor::run(stage, stop).await?) });
            Some(tx)
        }
        None => None,
    };
    // The attestors wake the alert engine at each commit.
    let alerts_wake = Arc::new(tokio::sync::Notify::new());
    let mut attestor = tokio::spawn(vitaltrail_attestor::run(
        AttestStage {
            attestor: cfg.attestor.clone(),
            bus: AttestBus::InProc {
                partitions,
                rejects: rejects.clone(),
                receipts: receipts_tx.clone(),
                devices: devices.clone(),
                checkpoints,
                committed: cfg.alerts.as_ref().map(|_| alerts_wake.clone()),
            },
            metrics: registry.clone(),
            clock: clock.clone(),
        },
        attest_stop_rx,
    ));

    let (mqtt, broker) = mqtt_endpoint(&cfg, &devices, &registry, rest_stop_rx.clone()).await?;
    // The alert engine follows the partition logs; it stops after the
    // attestors, with a last round over what they committed.
    let mut ack_handle = None;
    if let Some(alerts) = &cfg.alerts {
        let acks = cfg.metrics_listen.map(|_| {
            let (h, i) = vitaltrail_alerts::ack::inbox();
            ack_handle = Some(h);
            i
        });
        let stage = vitaltrail_alerts::StageConfig {
            alerts: alerts.clone(),
            source: vitaltrail_alerts::AlertsSource::Logs,
            data_dir: cfg.data_dir.clone(),
            clock: clock.clone(),
            metrics: registry.clone(),
            mqtt: Some(mqtt.clone()),
            acks,
            wake: Some(alerts_wake.clone()),
        };
        let stop = rest_stop_rx.clone();
        others.spawn(async move { Ok(vitaltrail_alerts::run(stage, stop).await?) });
    }
    let mut broker = broker;
    others.spawn({
        let rcfg = ReceiptConfig {
            mqtt: mqtt.clone(),
            client_id: format!("{}-receipts", cfg.ingest.client_id),
            ..Default::default()
        };
        let m = ReceiptMetrics::new(&registry, "up")?;
        let stop = rest_stop_rx.clone();
        async move { Ok(receipts::publish(rcfg, receipts_rx, m, stop).await?) }
    });
    others.spawn(flush_rejects(
        rejects.clone(),
        clock.clone(),
        rest_stop_rx.clone(),
    ));
    let i_metrics = IngestMetrics::new(&registry)?;
    let ingest_stage = IngestStage {
        ingest: ingest_config(&cfg, &mqtt),
        bus: IngestBus::InProc {
            producer,
            rejects: rejects.clone(),
            receipts: receipts_tx,
            devices,
        },
        data_dir: cfg.data_dir.clone(),
        metrics: i_metrics.clone(),
        registry: registry.clone(),
        clock,
    };
    if let Some(listen) = cfg.metrics_listen {
        let ready = ingest_ready(&i_metrics, cfg.ingest.connections.max(1));
        others.spawn(crate::http::run(
            HttpConfig {
                listen,
                registry,
                data_dir: cfg.data_dir.clone(),
                sql: true,
                ready: Some(ready),
                alerts: ack_handle,
            },
            rest_stop_rx.clone(),
        ));
    }
    let shutdown_seen = shutdown.clone();
    let mut ingest = tokio::spawn(vitaltrail_ingest::run(ingest_stage, shutdown));
    let devices_at = match &cfg.external_mqtt {
        Some(e) => format!("{}:{}", e.host, e.port),
        None => cfg.mqtt_listen.to_string(),
    };
    tracing::info!(mqtt = %devices_at, data = %cfg.data_dir.display(), partitions = cfg.partitions, "vitaltrail is up");
    // Until ingest has drained, any other stage ending is a failure.
    tokio::select! {
        r = &mut broker => r?,
        r = until_shutdown("ingest", &mut ingest, &shutdown_seen) => r?,
        r = &mut attestor => {
            r.map_err(|e| Error::StageStopped(format!("the attestor panicked: {e}")))??;
            return Err(Error::StageStopped("the attestor stopped while ingest was running".into()));
        }
        Some(r) = others.join_next() => {
            r.map_err(|e| Error::StageStopped(format!("a stage panicked: {e}")))??;
            return Err(Error::StageStopped(
                "the HTTP server, the receipt publisher, the dead-letter flusher, the anchor or the alert engine stopped while ingest was running".into(),
            ));
        }
    }
    let _ = attest_stop.send(true);
    attestor
        .await
        .map_err(|e| Error::StageStopped(format!("the attestor panicked: {e}")))??;
    let _ = rest_stop.send(true);
    join_stages(others).await
}

/// The data directory's dead-letter store, reporting to `registry`.
pub fn open_rejects(
    data_dir: &Path,
    limits: RejectLimits,
    registry: &prometheus::Registry,
) -> Result<Arc<RejectLog>> {
    let log = RejectLog::open_with(data_dir.join("rejected.jsonl"), limits)?
        .with_metrics(vitaltrail_bus::metrics::Metrics::new(registry)?);
    Ok(Arc::new(log))
}

/// Write the dead-letter store's counted rejections once a second until
/// `shutdown`, then once more.
pub async fn flush_rejects(
    rejects: Arc<RejectLog>,
    clock: Arc<dyn Clock>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = clock.now_ms();
                tokio::task::block_in_place(|| rejects.tick(now))?;
            }
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
    Ok(tokio::task::block_in_place(|| rejects.flush())?)
}

/// Wait for every stage; the first to fail stops everything (nothing is
/// acknowledged that was not made durable, so devices resend after a restart).
pub async fn join_stages(mut tasks: tokio::task::JoinSet<Result<()>>) -> Result<()> {
    while let Some(res) = tasks.join_next().await {
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(Error::StageStopped(format!("a stage panicked: {e}"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingest_sessions_are_clean_on_the_embedded_broker_on_both_paths() {
        let mqtt = vitaltrail_mqtt::MqttEndpoint::plain("127.0.0.1", 1883);
        let embedded = UpConfig::default();
        assert!(ingest_config(&embedded, &mqtt).clean_session);
        let kafka = UpConfig::default().over_kafka("127.0.0.1:9092").unwrap();
        assert!(
            ingest_config(&kafka, &mqtt).clean_session,
            "rumqttd panics on a persistent shared-group session's disconnection"
        );
        let external = UpConfig {
            external_mqtt: Some(mqtt.clone()),
            ..UpConfig::default()
        };
        assert!(!ingest_config(&external, &mqtt).clean_session);
    }
}
