//! `vitaltrail up`: the whole pipeline in one process.
//!
//! An embedded MQTT broker (rumqttd) unless an external one is given, the
//! ingest tier, the in-process bounded bus in place of Kafka (the attestor's
//! durable Merkle log is the write-ahead log, and an MQTT acknowledgement
//! waits for it), one attestor worker per partition, and `/metrics`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;
use vitaltrail_attestor::metrics::Metrics as AttestorMetrics;
use vitaltrail_attestor::pipeline::{AttestorConfig, PartitionState, run_partition};
use vitaltrail_bus::deadletter::RejectLog;
use vitaltrail_bus::inproc;
use vitaltrail_core::{Clock, SecretKey, SystemClock};
use vitaltrail_ingest::IngestConfig;
use vitaltrail_ingest::metrics::Metrics as IngestMetrics;
use vitaltrail_ingest::registry::{RegistryFile, SharedRegistry};

/// Typed configuration of `up`.
#[derive(Debug, Clone)]
pub struct UpConfig {
    /// Everything durable lives here.
    pub data_dir: PathBuf,
    /// Where the embedded MQTT broker listens; ignored with `external_mqtt`.
    pub mqtt_listen: SocketAddr,
    /// Use this broker instead of the embedded one.
    pub external_mqtt: Option<(String, u16)>,
    /// Partitions of the in-process bus (one attestor worker and log each).
    pub partitions: u32,
    /// Records each bus partition holds in flight.
    pub bus_capacity: usize,
    /// Where `/metrics` and `POST /sql` are served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Attestor settings (its `data_dir` is overridden by ours).
    pub attestor: AttestorConfig,
    /// Ingest settings (its MQTT endpoint is overridden by ours).
    pub ingest: IngestConfig,
    /// Run the same stages over this Kafka cluster instead of the in-process bus.
    pub kafka: Option<String>,
}

impl Default for UpConfig {
    fn default() -> Self {
        UpConfig {
            data_dir: PathBuf::from("vitaltrail-data"),
            mqtt_listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            external_mqtt: None,
            partitions: 1,
            bus_capacity: 8192,
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            attestor: AttestorConfig::default(),
            ingest: IngestConfig {
                client_id: "vitaltrail-up-ingest".into(),
                share_group: Some("vitaltrail-up".into()),
                connections: 8,
                ..IngestConfig::default()
            },
            kafka: None,
        }
    }
}

/// Write a new key file (PKCS#8 PEM) with mode 0600, refusing to overwrite.
pub fn write_key(path: &Path, key: &SecretKey) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let pem = key.to_pkcs8_pem()?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
    f.write_all(pem.as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// Load the log signing key from `<data>/keys/log.pem`, creating it once.
pub fn log_key(data_dir: &Path) -> Result<SecretKey> {
    let path = data_dir.join("keys").join("log.pem");
    if let Ok(pem) = std::fs::read_to_string(&path) {
        return SecretKey::from_pkcs8_pem(&pem)
            .with_context(|| format!("log key {}", path.display()));
    }
    std::fs::create_dir_all(path.parent().unwrap_or(data_dir))?;
    let key = SecretKey::generate(&mut rand::rngs::OsRng);
    write_key(&path, &key)?;
    Ok(key)
}

/// The patient of a device, from a shared registry (for Parquet rows).
pub fn patient_lookup(reg: &SharedRegistry) -> vitaltrail_attestor::parquet_out::PatientLookup {
    use vitaltrail_ingest::registry::Lookup;
    let reg = reg.clone();
    Arc::new(move |did: &str| {
        reg.with(|r| match r.lookup(did) {
            Lookup::Active(e) | Lookup::Revoked(e) => Some(e.patient.clone()),
            Lookup::Unknown => None,
        })
    })
}

/// The device registry of a data directory.
pub fn registry_file(data_dir: &Path) -> RegistryFile {
    RegistryFile::new(data_dir.join("devices.json"))
}

/// How many partition logs a data directory holds (0 for a new one).
pub fn existing_partitions(data_dir: &Path) -> u32 {
    (0u32..)
        .take_while(|p| data_dir.join("partitions").join(p.to_string()).is_dir())
        .count() as u32
}

/// Start the embedded MQTT broker on `listen` (runs on its own threads).
pub fn start_embedded_broker(listen: SocketAddr) -> Result<()> {
    use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
    let mut v4 = HashMap::new();
    v4.insert(
        "1".to_owned(),
        ServerSettings {
            name: "vitaltrail-v4".into(),
            listen,
            tls: None,
            next_connection_delay_ms: 1,
            connections: ConnectionSettings {
                connection_timeout_ms: 60_000,
                max_payload_size: 256 * 1024,
                max_inflight_count: 1000,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        },
    );
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 1000,
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(v4),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    let mut broker = Broker::new(config);
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })?;
    Ok(())
}

/// The MQTT broker to use: the external one, or the embedded one, started
/// here and ready to accept connections.
async fn mqtt_endpoint(cfg: &UpConfig) -> Result<(String, u16)> {
    match &cfg.external_mqtt {
        Some((h, p)) => Ok((h.clone(), *p)),
        None => {
            start_embedded_broker(cfg.mqtt_listen)?;
            wait_for_port(cfg.mqtt_listen, Duration::from_secs(5)).await?;
            Ok((cfg.mqtt_listen.ip().to_string(), cfg.mqtt_listen.port()))
        }
    }
}

/// Wait until something accepts TCP connections on `addr`.
pub async fn wait_for_port(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("nothing is listening on {addr} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Serve `/metrics` from `registry` until `shutdown`.
pub async fn serve_metrics(
    listen: SocketAddr,
    registry: prometheus::Registry,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    serve_http(listen, registry, None, shutdown).await
}

#[cfg(feature = "sql")]
/// `POST /sql`: the body is one SQL statement; the answer is a JSON array of
/// rows, or an Arrow IPC stream when `Accept: application/vnd.apache.arrow.stream`.
async fn sql_handler(
    data: PathBuf,
    headers: axum::http::HeaderMap,
    body: String,
) -> (
    axum::http::StatusCode,
    [(&'static str, &'static str); 1],
    Vec<u8>,
) {
    use axum::http::StatusCode;
    use vitaltrail_query::{Format, QueryEngine, encode};
    const IPC: &str = "application/vnd.apache.arrow.stream";
    let arrow = headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(IPC));
    let result = async {
        let engine = QueryEngine::open(&data).await?;
        let batches = engine.sql(&body).await?;
        encode(
            &batches,
            if arrow {
                Format::ArrowIpc
            } else {
                Format::Json
            },
        )
    }
    .await;
    match result {
        Ok(bytes) => (
            StatusCode::OK,
            [("content-type", if arrow { IPC } else { "application/json" })],
            bytes,
        ),
        Err(e) => {
            let status = match e {
                vitaltrail_query::Error::Sql(_) | vitaltrail_query::Error::Format(_) => {
                    StatusCode::BAD_REQUEST
                }
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            let body = serde_json::json!({ "error": e.to_string() })
                .to_string()
                .into_bytes();
            (status, [("content-type", "application/json")], body)
        }
    }
}

/// Serve `/metrics`, and `POST /sql` over `data` when given, until `shutdown`.
pub async fn serve_http(
    listen: SocketAddr,
    registry: prometheus::Registry,
    data: Option<PathBuf>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    use axum::routing::get;
    #[allow(unused_mut)]
    let mut app = axum::Router::new();
    #[cfg(feature = "sql")]
    if let Some(data) = data {
        app = app.route(
            "/sql",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
                sql_handler(data.clone(), headers, body)
            }),
        );
    }
    #[cfg(not(feature = "sql"))]
    let _ = data;
    let app = app.route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let text = prometheus::TextEncoder::new()
                    .encode_to_string(&registry.gather())
                    .unwrap_or_default();
                ([("content-type", "text/plain; version=0.0.4")], text)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the metrics listener {listen}"))?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            while shutdown.changed().await.is_ok() {
                if *shutdown.borrow() {
                    break;
                }
            }
        })
        .await?;
    Ok(())
}

/// `up --kafka`: the distributed stages (ingest, attestor for every
/// partition) in one process, over a real Kafka cluster.
async fn run_over_kafka(
    cfg: UpConfig,
    brokers: String,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    use crate::distributed::{AttestProcessConfig, IngestProcessConfig, run_attest, run_ingest};
    let (host, port) = mqtt_endpoint(&cfg).await?;
    let registry = prometheus::Registry::new();
    let kafka = vitaltrail_bus::kafka::KafkaConfig {
        brokers,
        partitions: cfg.partitions as i32,
        ..Default::default()
    };
    let ingest = IngestProcessConfig {
        kafka: kafka.clone(),
        ingest: IngestConfig {
            mqtt_host: host,
            mqtt_port: port,
            ..cfg.ingest.clone()
        },
        data_dir: cfg.data_dir.clone(),
        metrics_listen: None,
        metrics: Some(registry.clone()),
    };
    let attest = AttestProcessConfig {
        kafka,
        partitions: (0..cfg.partitions).collect(),
        dead_letters: true,
        attestor: AttestorConfig {
            data_dir: cfg.data_dir.clone(),
            ..cfg.attestor.clone()
        },
        metrics_listen: None,
        metrics: Some(registry.clone()),
    };
    // One /metrics (and POST /sql) for both stages.
    if let Some(listen) = cfg.metrics_listen {
        tokio::spawn(serve_metrics(listen, registry, shutdown.clone()));
    }
    // Topics first (both stages would create them), then both stages.
    vitaltrail_bus::kafka::ensure_topics(&ingest.kafka).await?;
    let a = tokio::spawn(run_attest(attest, shutdown.clone()));
    let i = tokio::spawn(run_ingest(ingest, shutdown));
    let (a, i) = tokio::join!(a, i);
    a.map_err(|e| anyhow::anyhow!("attestor panicked: {e}"))??;
    i.map_err(|e| anyhow::anyhow!("ingest panicked: {e}"))??;
    Ok(())
}

/// Run everything until `shutdown` turns true.
pub async fn run(mut cfg: UpConfig, shutdown: watch::Receiver<bool>) -> Result<()> {
    if let Some(brokers) = cfg.kafka.clone() {
        std::fs::create_dir_all(&cfg.data_dir)?;
        return run_over_kafka(cfg, brokers, shutdown).await;
    }
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    cfg.attestor.data_dir = cfg.data_dir.clone();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let registry = prometheus::Registry::new();
    let a_metrics = AttestorMetrics::new(&registry)?;
    let i_metrics = IngestMetrics::new(&registry)?;
    let key = log_key(&cfg.data_dir)?;
    let rejects = Arc::new(RejectLog::open(cfg.data_dir.join("rejected.jsonl"))?);

    let (devices, _watch) =
        SharedRegistry::watch(registry_file(&cfg.data_dir), Duration::from_millis(500))?;
    let patients = patient_lookup(&devices);
    let existing = existing_partitions(&cfg.data_dir);
    if existing != 0 && existing != cfg.partitions {
        anyhow::bail!(
            "{} holds {existing} partition logs but {} were asked for; devices are \
             assigned to partitions by hash, so the count cannot change (pass --partitions {existing})",
            cfg.data_dir.display(),
            cfg.partitions
        );
    }
    let (producer, partitions) = inproc::bus(cfg.partitions, cfg.bus_capacity);
    let mut tasks = tokio::task::JoinSet::new();
    for part in partitions {
        use vitaltrail_bus::PartitionSource as _;
        let state = PartitionState::open(
            &cfg.attestor,
            part.partition(),
            &key,
            a_metrics.clone(),
            patients.clone(),
        )
        .with_context(|| format!("opening partition {}", part.partition()))?;
        let run = run_partition(
            part,
            state,
            cfg.attestor.clone(),
            rejects.clone(),
            clock.clone(),
            None,
            shutdown.clone(),
        );
        tasks.spawn(async move { run.await.map_err(anyhow::Error::from) });
    }

    let (host, port) = mqtt_endpoint(&cfg).await?;
    let ingest_cfg = IngestConfig {
        mqtt_host: host.clone(),
        mqtt_port: port,
        ..cfg.ingest.clone()
    };
    tasks.spawn({
        let rejects = rejects.clone();
        let clock = clock.clone();
        let shutdown = shutdown.clone();
        async move {
            vitaltrail_ingest::run(
                ingest_cfg,
                producer,
                devices,
                vitaltrail_bus::RejectSink::File(rejects),
                clock,
                i_metrics,
                shutdown,
            )
            .await
            .map_err(anyhow::Error::from)
        }
    });
    if let Some(listen) = cfg.metrics_listen {
        tasks.spawn(serve_http(
            listen,
            registry,
            Some(cfg.data_dir.clone()),
            shutdown.clone(),
        ));
    }
    tracing::info!(mqtt = %format!("{host}:{port}"), data = %cfg.data_dir.display(), partitions = cfg.partitions, "vitaltrail is up");
    join_stages(tasks).await
}

/// Wait for every stage; the first to fail stops everything (nothing is
/// acknowledged that was not made durable, so devices resend after a restart).
pub async fn join_stages(mut tasks: tokio::task::JoinSet<Result<()>>) -> Result<()> {
    while let Some(res) = tasks.join_next().await {
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(anyhow::anyhow!("a stage panicked: {e}")),
        }
    }
    Ok(())
}
