//! `vitaltrail up`: the whole pipeline in one process.
//!
//! An embedded MQTT broker (rumqttd) unless an external one is given, the
//! ingest tier, the in-process bounded bus in place of Kafka (the attestor's
//! durable Merkle log is the write-ahead log, and an MQTT acknowledgement
//! waits for it), one attestor worker per partition, and `/metrics`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;
use vitaltrail_attestor::metrics::Metrics as AttestorMetrics;
use vitaltrail_attestor::pipeline::{AttestorConfig, PartitionState, run_partition};
use vitaltrail_bus::deadletter::{RejectLimits, RejectLog};
use vitaltrail_bus::inproc;
use vitaltrail_core::auth::Token;
use vitaltrail_core::{Clock, SecretKey, SystemClock};
use vitaltrail_ingest::IngestConfig;
use vitaltrail_ingest::metrics::Metrics as IngestMetrics;
use vitaltrail_ingest::registry::{RegistryFile, SharedRegistry};

/// Typed configuration of `up`.
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
    /// Limits of the dead-letter store.
    pub rejects: RejectLimits,
    /// Extra librdkafka client properties (SASL, TLS) with `kafka`.
    pub kafka_client: Vec<(String, String)>,
}

impl Default for UpConfig {
    fn default() -> Self {
        UpConfig {
            data_dir: PathBuf::from("vitaltrail-data"),
            mqtt_listen: SocketAddr::from(([127, 0, 0, 1], 8883)),
            mqtt_names: vec![],
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
            rejects: RejectLimits::default(),
            kafka_client: vec![],
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

/// What a shared registry says about a device (for the attestor's own
/// registry check and the patient in Parquet rows).
pub fn patient_lookup(reg: &SharedRegistry) -> vitaltrail_attestor::parquet_out::PatientLookup {
    use vitaltrail_ingest::registry::Lookup;
    let reg = reg.clone();
    use vitaltrail_attestor::parquet_out::Registered;
    Arc::new(move |did: &str| {
        reg.with(|r| match r.lookup(did) {
            Lookup::Active(e) => Registered::Active(e.patient.clone()),
            Lookup::Revoked(e) => Registered::Revoked(e.patient.clone()),
            Lookup::Unknown => Registered::Unknown,
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

/// Start an open embedded MQTT broker on `listen`, with no gate and no
/// authentication: for benchmarks and tests of the transport only, never
/// for devices. The returned future resolves, with the reason, if the
/// broker stops.
pub fn start_embedded_broker(
    listen: SocketAddr,
) -> Result<impl std::future::Future<Output = Result<()>> + Send + 'static> {
    let dead =
        vitaltrail_mqtt::embedded::start(&vitaltrail_mqtt::embedded::EmbeddedConfig::open(listen))?;
    Ok(async move { dead.await.map_err(anyhow::Error::from) })
}

/// Whether the registry holds a device as active (the gate's check).
pub fn device_check(reg: &SharedRegistry) -> vitaltrail_mqtt::gate::DeviceCheck {
    use vitaltrail_ingest::registry::Lookup;
    let reg = reg.clone();
    Arc::new(move |did: &str| reg.with(|r| matches!(r.lookup(did), Lookup::Active(_))))
}

/// A free TCP port on loopback (for the embedded broker, which only the
/// gate and the pipeline in this process reach).
fn free_loopback_port() -> Result<SocketAddr> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(l.local_addr()?)
}

/// Make every panic, on any thread (the embedded broker's included), end
/// the process: a stage that died must never leave a zombie that accepts
/// connections and logs nothing. Every acknowledgement waits for
/// durability, so a restart loses nothing that was acknowledged by the
/// pipeline.
pub fn exit_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        eprintln!(
            "vitaltrail: a thread panicked; exiting so that a supervisor restarts the process"
        );
        std::process::exit(70);
    }));
}

/// A stage's life: resolves (with an error) only if the stage dies.
type Watchdog = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>;

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
    let pki = Pki::load_or_create(&cfg.data_dir, &names)
        .context("the MQTT certificate authority (<data>/mqtt)")?;
    let internal = free_loopback_port()?;
    let broker = embedded::start(&embedded::EmbeddedConfig {
        listen: internal,
        token: Some(token.clone()),
        max_connections: 10_010,
    })?;
    wait_for_port(internal, Duration::from_secs(5)).await?;
    let mut gate_cfg = gate::GateConfig::new(cfg.mqtt_listen, &pki, internal, token.clone())?;
    gate_cfg.max_connections = gate::connection_capacity();
    let metrics = vitaltrail_mqtt::metrics::GateMetrics::new(registry)?;
    let gate = tokio::spawn(gate::run(
        gate_cfg,
        device_check(devices),
        metrics,
        shutdown,
    ));
    wait_for_port(cfg.mqtt_listen, Duration::from_secs(5)).await?;
    let watchdog = async move {
        tokio::select! {
            r = broker => r.map_err(anyhow::Error::from),
            r = gate => match r {
                Ok(Ok(())) => std::future::pending().await,
                Ok(Err(e)) => Err(anyhow::Error::from(e).context("the MQTT device gate stopped")),
                Err(e) => Err(anyhow::anyhow!("the MQTT device gate panicked: {e}")),
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

/// The bus key of a data directory (`<data>/keys/bus.key`).
pub fn bus_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keys").join("bus.key")
}

/// The bearer token of `/metrics` (`<data>/keys/metrics.token`).
pub fn metrics_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keys").join("metrics.token")
}

/// The bearer token of `POST /sql` (`<data>/keys/sql.token`).
pub fn sql_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keys").join("sql.token")
}

/// Serve `/metrics` from `registry` until `shutdown` (no SQL).
pub async fn serve_metrics(
    listen: SocketAddr,
    registry: prometheus::Registry,
    data_dir: PathBuf,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    serve_http(listen, registry, data_dir, false, None, shutdown).await
}

/// Whether the process is ready to take readings.
pub type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

/// Serve, until `shutdown`:
/// - `GET /metrics` (Prometheus text), bearer token `<data>/keys/metrics.token`;
/// - `POST /sql` over `data_dir` when `sql`, bearer token `<data>/keys/sql.token`
///   (see `vitaltrail_query::http`);
/// - `GET /healthz`, unauthenticated, which says only `ok`: the process
///   exits when a stage dies, so a process that answers is serving;
/// - `GET /readyz`, unauthenticated: 200 `ready` once every ingest
///   connection is subscribed (a device publishing before that is
///   acknowledged by the broker and dropped: it gets no receipt), else 503.
///
/// Both tokens are created (mode 0600) on first use; neither is logged.
pub async fn serve_http(
    listen: SocketAddr,
    registry: prometheus::Registry,
    data_dir: PathBuf,
    sql: bool,
    ready: Option<Readiness>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    use axum::routing::get;
    let metrics_token = load_or_create_token(&metrics_token_path(&data_dir))?;
    #[allow(unused_mut)]
    let mut app = axum::Router::new();
    #[cfg(feature = "sql")]
    if sql {
        let token = load_or_create_token(&sql_token_path(&data_dir))?;
        app = app.merge(vitaltrail_query::http::router(
            vitaltrail_query::http::SqlService {
                data_dir: data_dir.clone(),
                token,
                limits: vitaltrail_query::QueryLimits::default(),
                concurrent: Arc::new(tokio::sync::Semaphore::new(
                    vitaltrail_query::http::MAX_CONCURRENT_QUERIES,
                )),
            },
        ));
    }
    #[cfg(not(feature = "sql"))]
    let _ = sql;
    let app = app
        .route(
            "/metrics",
            get(move |headers: axum::http::HeaderMap| {
                let registry = registry.clone();
                let token = metrics_token.clone();
                async move { metrics_page(&headers, &token, &registry) }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.as_ref().is_none_or(|r| r());
                async move {
                    use axum::http::StatusCode;
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the HTTP listener {listen}"))?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await?;
    Ok(())
}

/// Write a new secret file (mode 0600); an existing file is kept.
pub fn write_secret(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut f) => f
            .write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .with_context(|| format!("writing {}", path.display())),
        // Another process created it first: theirs stands.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

/// Read the bearer token at `path`, creating it (mode 0600) if absent.
pub fn load_or_create_token(path: &Path) -> Result<Token> {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            return Token::parse(s.trim()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let token = Token::generate(&mut rand::rngs::OsRng);
    write_secret(path, &format!("{}\n", token.expose()))?;
    // Read back: if another process won the race, its token stands.
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Token::parse(text.trim()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn metrics_page(
    headers: &axum::http::HeaderMap,
    token: &Token,
    registry: &prometheus::Registry,
) -> axum::response::Response {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    let h = |n: header::HeaderName| headers.get(n).map(|v| v.as_bytes());
    if let Err(r) = token.authorize(h(header::ORIGIN), h(header::HOST), h(header::AUTHORIZATION)) {
        let status = StatusCode::from_u16(r.status()).unwrap_or(StatusCode::FORBIDDEN);
        return (
            status,
            [("www-authenticate", "Bearer")],
            format!("{}\n", r.message()),
        )
            .into_response();
    }
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap_or_default();
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}

/// `up --kafka`: the distributed stages (ingest, attestor for every
/// partition) in one process, over a real Kafka cluster.
async fn run_over_kafka(
    cfg: UpConfig,
    brokers: String,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    use crate::distributed::{AttestProcessConfig, IngestProcessConfig, run_attest, run_ingest};
    let registry = prometheus::Registry::new();
    let kafka = vitaltrail_bus::kafka::KafkaConfig {
        brokers,
        partitions: cfg.partitions as i32,
        bus_key: Some(crate::distributed::load_bus_key(&bus_key_path(
            &cfg.data_dir,
        ))?),
        client: cfg.kafka_client.clone(),
        ..Default::default()
    };
    // Topics first (both stages would create them, and the registry
    // follower reads one), then the gate's registry check (the local file
    // and vitals.devices, as ingest and the attestor keep their own), then
    // both stages.
    vitaltrail_bus::kafka::ensure_topics(&kafka).await?;
    let (devices, _watch) =
        SharedRegistry::watch(registry_file(&cfg.data_dir), Duration::from_millis(500))?;
    let operator = crate::distributed::trusted_operator(None, &cfg.data_dir)?;
    let _follow = crate::distributed::follow_registry(&kafka, &devices, &operator).await?;
    let (mqtt, broker) = mqtt_endpoint(&cfg, &devices, &registry, shutdown.clone()).await?;
    let ingest = IngestProcessConfig {
        kafka: kafka.clone(),
        ingest: IngestConfig {
            mqtt: mqtt.clone(),
            ..cfg.ingest.clone()
        },
        data_dir: cfg.data_dir.clone(),
        metrics_listen: None,
        metrics: Some(registry.clone()),
        operator: None,
    };
    let attest = AttestProcessConfig {
        kafka,
        partitions: (0..cfg.partitions).collect(),
        dead_letters: true,
        rejects: cfg.rejects,
        mqtt: Some(mqtt.clone()),
        operator: None,
        partial: false,
        attestor: AttestorConfig {
            data_dir: cfg.data_dir.clone(),
            ..cfg.attestor.clone()
        },
        metrics_listen: None,
        metrics: Some(registry.clone()),
    };
    // One /metrics (and POST /sql) for both stages.
    if let Some(listen) = cfg.metrics_listen {
        tokio::spawn(serve_http(
            listen,
            registry,
            cfg.data_dir.clone(),
            true,
            None,
            shutdown.clone(),
        ));
    }
    let a = tokio::spawn(run_attest(attest, shutdown.clone()));
    let i = tokio::spawn(run_ingest(ingest, shutdown));
    let both = async {
        let (a, i) = tokio::join!(a, i);
        a.map_err(|e| anyhow::anyhow!("attestor panicked: {e}"))??;
        i.map_err(|e| anyhow::anyhow!("ingest panicked: {e}"))??;
        Ok(())
    };
    tokio::select! {
        r = both => r,
        r = broker => r,
    }
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
    let rejects = open_rejects(&cfg.data_dir, cfg.rejects, &registry)?;

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
    // Stop order: ingest drains first (what the broker holds for it reaches
    // the log), then the attestors, then the HTTP server and the
    // dead-letter flusher.
    let (attest_stop, attest_stop_rx) = watch::channel(false);
    let (rest_stop, rest_stop_rx) = watch::channel(false);
    let mut attestors = tokio::task::JoinSet::new();
    let (receipts_tx, receipts_rx) = vitaltrail_ingest::receipts::queue(&Default::default());
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
            Some(receipts_tx.clone()),
            attest_stop_rx.clone(),
        );
        attestors.spawn(async move { run.await.map_err(anyhow::Error::from) });
    }

    let (mqtt, broker) = mqtt_endpoint(&cfg, &devices, &registry, rest_stop_rx.clone()).await?;
    let mut broker = broker;
    let mut others = tokio::task::JoinSet::new();
    others.spawn({
        let cfg = vitaltrail_ingest::receipts::ReceiptConfig {
            mqtt: mqtt.clone(),
            client_id: format!("{}-receipts", cfg.ingest.client_id),
            ..Default::default()
        };
        let m = vitaltrail_ingest::receipts::ReceiptMetrics::new(&registry, "up")?;
        let stop = rest_stop_rx.clone();
        async move {
            vitaltrail_ingest::receipts::publish(cfg, receipts_rx, m, stop)
                .await
                .map_err(anyhow::Error::from)
        }
    });
    others.spawn(flush_rejects(
        rejects.clone(),
        clock.clone(),
        rest_stop_rx.clone(),
    ));
    if let Some(listen) = cfg.metrics_listen {
        let subscribed = i_metrics.subscribed.clone();
        let want = cfg.ingest.connections.max(1) as i64;
        let ready: Readiness = Arc::new(move || subscribed.get() >= want);
        others.spawn(serve_http(
            listen,
            registry,
            cfg.data_dir.clone(),
            true,
            Some(ready),
            rest_stop_rx.clone(),
        ));
    }
    let ingest_cfg = IngestConfig {
        mqtt: mqtt.clone(),
        // The embedded broker's sessions die with this process.
        clean_session: cfg.external_mqtt.is_none(),
        ..cfg.ingest.clone()
    };
    let mut ingest = tokio::spawn({
        let rejects = rejects.clone();
        let clock = clock.clone();
        async move {
            vitaltrail_ingest::run(
                ingest_cfg,
                producer,
                devices,
                vitaltrail_bus::RejectSink::File(rejects),
                Some(receipts_tx),
                clock,
                i_metrics,
                shutdown,
            )
            .await
            .map_err(anyhow::Error::from)
        }
    });
    let devices_at = match &cfg.external_mqtt {
        Some(e) => format!("{}:{}", e.host, e.port),
        None => cfg.mqtt_listen.to_string(),
    };
    tracing::info!(mqtt = %devices_at, data = %cfg.data_dir.display(), partitions = cfg.partitions, "vitaltrail is up");
    // Until ingest has drained, any other stage ending is a failure.
    tokio::select! {
        r = &mut broker => r?,
        r = &mut ingest => r.map_err(|e| anyhow::anyhow!("ingest panicked: {e}"))??,
        Some(r) = attestors.join_next() => {
            r.map_err(|e| anyhow::anyhow!("an attestor panicked: {e}"))??;
            anyhow::bail!("an attestor stopped while ingest was running");
        }
        Some(r) = others.join_next() => {
            r.map_err(|e| anyhow::anyhow!("a stage panicked: {e}"))??;
            anyhow::bail!("the HTTP server or the dead-letter flusher stopped while ingest was running");
        }
    }
    let _ = attest_stop.send(true);
    join_stages(attestors).await?;
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
            Err(e) => return Err(anyhow::anyhow!("a stage panicked: {e}")),
        }
    }
    Ok(())
}
