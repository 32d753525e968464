//! The subcommands of the pipeline (issue #4): `up`, `sim`, `devices`, `prove`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use vitaltrail::up::{self, UpConfig};
use vitaltrail_attestor::DurableLog;
use vitaltrail_attestor::pipeline::AttestorConfig;
use vitaltrail_core::{Checkpoint, Clock, DeviceId, ProofBundle, SystemClock, envelope, leaf};
use vitaltrail_device_sim::attacks::Attack;
use vitaltrail_device_sim::physiology::Scenario;
use vitaltrail_device_sim::publisher::{self, SimConfig};

/// A shutdown signal that turns true on Ctrl-C or SIGTERM.
fn shutdown_on_ctrl_c() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        tracing::info!("shutting down");
        let _ = tx.send(true);
    });
    rx
}

/// Arguments of `vitaltrail ingest`.
#[derive(Debug)]
pub struct IngestArgs {
    pub kafka: String,
    pub mqtt: String,
    pub client_id: String,
    pub share_group: String,
    pub connections: usize,
    pub data: PathBuf,
    pub topic_partitions: i32,
    pub metrics_listen: Option<SocketAddr>,
    pub trust: TrustArgs,
}

/// What a distributed stage trusts and how it reaches Kafka securely
/// (`vitaltrail ingest` and `vitaltrail attest` alike).
#[derive(Debug, clap::Args)]
pub struct TrustArgs {
    /// The bus key file shared by every ingest and attestor of the
    /// pipeline (records on vitals.verified carry its MAC); default
    /// <data>/keys/bus.key, created if absent.
    #[arg(long, env = "VITALTRAIL_BUS_KEY_FILE")]
    bus_key: Option<PathBuf>,
    /// librdkafka client properties, one key=value per line (SASL, TLS:
    /// security.protocol, sasl.mechanisms, sasl.username, sasl.password,
    /// ssl.ca.location, …). A file, so that no secret is on a command line.
    #[arg(long, env = "VITALTRAIL_KAFKA_CONFIG_FILE")]
    kafka_config_file: Option<PathBuf>,
    /// The operator's DID, whose signature every vitals.devices record
    /// must carry; default: the DID of <data>/keys/operator.pem (the key
    /// `devices add --kafka` signs with).
    #[arg(long, env = "VITALTRAIL_OPERATOR")]
    operator: Option<String>,
    /// Connect to the MQTT broker over TLS with the pipeline's client
    /// certificate from <data>/mqtt (`vitaltrail mqtt mosquitto` writes a
    /// Mosquitto configuration that requires it).
    #[arg(long)]
    mqtt_tls: bool,
}

/// The MQTT broker at `addr`; with `tls`, over TLS with the pipeline's
/// client certificate from `<data>/mqtt`.
pub fn pipeline_mqtt(addr: &str, tls: bool, data: &Path) -> Result<vitaltrail_mqtt::MqttEndpoint> {
    let e = vitaltrail_mqtt::MqttEndpoint::parse(addr)?;
    if !tls {
        return Ok(e);
    }
    let pki = vitaltrail_mqtt::Pki::open(data).with_context(|| {
        format!(
            "--mqtt-tls needs the pipeline certificate in {}/mqtt (`vitaltrail mqtt mosquitto` makes it)",
            data.display()
        )
    })?;
    Ok(e.with_tls(pki.pipeline_tls()?))
}

impl TrustArgs {
    /// The Kafka settings: brokers, partitions, the bus key (`--bus-key`,
    /// else `<data>/keys/bus.key`) and the client file.
    fn kafka(
        &self,
        brokers: String,
        partitions: i32,
        data: &Path,
    ) -> Result<vitaltrail_bus::kafka::KafkaConfig> {
        let key_path = self
            .bus_key
            .clone()
            .unwrap_or_else(|| up::bus_key_path(data));
        Ok(vitaltrail_bus::kafka::KafkaConfig {
            brokers,
            partitions,
            bus_key: Some(vitaltrail::distributed::load_bus_key(&key_path)?),
            client: self
                .kafka_config_file
                .as_deref()
                .map(vitaltrail::distributed::read_kafka_client_config)
                .transpose()?
                .unwrap_or_default(),
            ..Default::default()
        })
    }

    /// `--operator`, parsed.
    fn operator(&self) -> Result<Option<DeviceId>> {
        self.operator
            .as_deref()
            .map(DeviceId::parse)
            .transpose()
            .context("--operator")
    }
}

/// `vitaltrail ingest`.
pub fn ingest(a: IngestArgs) -> Result<ExitCode> {
    let IngestArgs {
        kafka,
        mqtt,
        client_id,
        share_group,
        connections,
        data,
        topic_partitions,
        metrics_listen,
        trust,
    } = a;
    use vitaltrail::distributed::{IngestProcessConfig, run_ingest};
    up::exit_on_panic();
    let cfg = IngestProcessConfig {
        kafka: trust.kafka(kafka, topic_partitions, &data)?,
        ingest: vitaltrail_ingest::IngestConfig {
            mqtt: pipeline_mqtt(&mqtt, trust.mqtt_tls, &data)?,
            client_id,
            share_group: Some(share_group),
            connections,
            ..Default::default()
        },
        data_dir: data,
        metrics_listen,
        metrics: None,
        operator: trust.operator()?,
    };
    runtime()?.block_on(async move { run_ingest(cfg, shutdown_on_ctrl_c()).await })?;
    Ok(ExitCode::SUCCESS)
}

/// `vitaltrail attest`.
#[allow(clippy::too_many_arguments)]
pub fn attest(
    kafka: String,
    mqtt: Option<String>,
    partitions: Vec<u32>,
    topic_partitions: i32,
    data: PathBuf,
    dead_letters: bool,
    checkpoint_interval_ms: u64,
    metrics_listen: Option<SocketAddr>,
    trust: TrustArgs,
    partial: bool,
) -> Result<ExitCode> {
    use vitaltrail::distributed::{AttestProcessConfig, run_attest};
    up::exit_on_panic();
    let cfg = AttestProcessConfig {
        kafka: trust.kafka(kafka, topic_partitions, &data)?,
        partitions,
        dead_letters,
        rejects: Default::default(),
        mqtt: mqtt
            .as_deref()
            .map(|m| pipeline_mqtt(m, trust.mqtt_tls, &data))
            .transpose()?,
        operator: trust.operator()?,
        partial,
        attestor: AttestorConfig {
            data_dir: data,
            checkpoint_interval: Duration::from_millis(checkpoint_interval_ms),
            ..AttestorConfig::default()
        },
        metrics_listen,
        metrics: None,
    };
    runtime()?.block_on(async move { run_attest(cfg, shutdown_on_ctrl_c()).await })?;
    Ok(ExitCode::SUCCESS)
}

/// `vitaltrail up`.
#[allow(clippy::too_many_arguments)]
pub fn up(
    data: PathBuf,
    mqtt_listen: SocketAddr,
    mqtt_names: Vec<String>,
    mqtt: Option<String>,
    mqtt_tls: bool,
    kafka: Option<String>,
    partitions: Option<u32>,
    metrics_listen: SocketAddr,
    checkpoint_interval_ms: u64,
) -> Result<ExitCode> {
    let partitions = match (partitions, up::existing_partitions(&data)) {
        (Some(n), _) => n,
        (None, 0) if kafka.is_some() => 4,
        (None, 0) => 1,
        (None, n) => n,
    };
    let external_mqtt = mqtt
        .as_deref()
        .map(|m| pipeline_mqtt(m, mqtt_tls, &data))
        .transpose()?;
    let cfg = UpConfig {
        data_dir: data,
        mqtt_listen,
        mqtt_names,
        external_mqtt,
        kafka,
        partitions,
        metrics_listen: Some(metrics_listen),
        attestor: AttestorConfig {
            checkpoint_interval: Duration::from_millis(checkpoint_interval_ms),
            ..AttestorConfig::default()
        },
        ..UpConfig::default()
    };
    up::exit_on_panic();
    runtime()?.block_on(async move {
        let stop = shutdown_on_ctrl_c();
        up::run(cfg, stop).await
    })?;
    Ok(ExitCode::SUCCESS)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Options of `vitaltrail sim`.
#[derive(Debug)]
pub struct SimArgs {
    pub mqtt: String,
    pub devices: usize,
    pub rate: f64,
    pub duration_secs: f64,
    pub scenario: String,
    pub attacks: Vec<String>,
    pub attack_count: usize,
    pub seed: u64,
    pub register: Option<PathBuf>,
    pub replay_rr: Option<PathBuf>,
    pub replay_ecg: Option<PathBuf>,
    pub speed: f64,
    pub receipts: bool,
    pub log_keys: Vec<String>,
    pub tls: Option<PathBuf>,
    pub no_tls: bool,
}

/// `vitaltrail sim`.
pub fn sim(a: SimArgs) -> Result<ExitCode> {
    let scenarios: Vec<Scenario> = match a.scenario.as_str() {
        "mix" => Scenario::ALL.to_vec(),
        s => s
            .split(',')
            .map(|n| Scenario::parse(n).with_context(|| format!("unknown scenario {n:?}")))
            .collect::<Result<_>>()?,
    };
    let mut attacks = Vec::new();
    for n in &a.attacks {
        if n == "all" {
            attacks.extend(Attack::ALL);
        } else {
            attacks.push(Attack::parse(n).with_context(|| {
                let names: Vec<&str> = Attack::ALL.iter().map(|a| a.name()).collect();
                format!("unknown attack {n:?}; one of: all, {}", names.join(", "))
            })?);
        }
    }
    let mqtt = vitaltrail_mqtt::MqttEndpoint::parse(&a.mqtt)?;
    // Device certificates: from --tls, else from the --register directory
    // once `up` has made its CA there.
    let tls_dir = match (&a.tls, &a.register) {
        _ if a.no_tls => None,
        (Some(d), _) => Some(d.clone()),
        (None, Some(d)) if d.join("mqtt").join("ca.key").exists() => Some(d.clone()),
        _ => None,
    };
    let device_tls = tls_dir
        .map(|d| {
            vitaltrail_mqtt::Pki::open(&d)
                .map(Arc::new)
                .with_context(|| {
                    format!(
                        "the device CA of {} (does `vitaltrail up` run there?)",
                        d.display()
                    )
                })
        })
        .transpose()?;
    let replaying = a.replay_rr.is_some() || a.replay_ecg.is_some();
    let devices = if replaying { 1 } else { a.devices };
    let mut devs = publisher::devices(a.seed, devices, &scenarios);
    if let Some(data) = &a.register {
        let reg = up::registry_file(data);
        let existing = reg.load()?;
        for (i, d) in devs.iter().enumerate() {
            if matches!(
                existing.lookup(d.key.did().as_str()),
                vitaltrail_ingest::registry::Lookup::Unknown
            ) {
                reg.add(
                    d.key.did(),
                    &format!("sim-patient-{}-{i}", a.seed),
                    Some("sim"),
                    SystemClock.now_ms(),
                )?;
            }
        }
        // Ingest reloads the registry every 0.5 s.
        std::thread::sleep(Duration::from_millis(1200));
    }
    let mut log_keys = Vec::new();
    for k in &a.log_keys {
        log_keys.push(vitaltrail_core::LogPublicKey::parse(k.trim()).context("--log-key")?);
    }
    if let Some(data) = &a.register {
        log_keys.extend(data_log_keys(data));
    }
    let cfg = SimConfig {
        mqtt,
        device_tls,
        client_id: format!("vitaltrail-sim-{}", a.seed),
        rate: a.rate,
        duration: Duration::from_secs_f64(a.duration_secs),
        attacks,
        attack_count: a.attack_count,
        receipts: a.receipts,
        log_keys,
        ..SimConfig::default()
    };
    let report = if !replaying {
        runtime()?.block_on(publisher::run(&cfg, &mut devs, Arc::new(SystemClock)))?
    } else {
        use vitaltrail_device_sim::{ecg, replay};
        // Beat times in ms from the start of the recording.
        let (beats, source) = match (&a.replay_rr, &a.replay_ecg) {
            (Some(path), _) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let rr = replay::parse_rr(&text).with_context(|| format!("{}", path.display()))?;
                (replay::rr_beat_times(&rr), "rr-replay")
            }
            (None, Some(path)) => {
                let mv = ecg::load_scipy_ecg(path)?;
                let beats = ecg::beat_times_ms(&mv, ecg::MITBIH_HZ);
                eprintln!(
                    "sim: {} beats detected in {:.0} s of ECG",
                    beats.len(),
                    mv.len() as f64 / ecg::MITBIH_HZ
                );
                (beats, "mitbih-208")
            }
            (None, None) => anyhow::bail!("nothing to replay"),
        };
        let span = beats.last().copied().unwrap_or(0.0);
        let now = SystemClock.now_ms();
        // At full speed the recording ends now; otherwise it starts now.
        let start = if a.speed > 0.0 {
            now
        } else {
            now.saturating_sub(span as u64)
        };
        let readings = replay::beat_readings(&beats, start, 1, source);
        let key = &devs[0].key;
        runtime()?.block_on(publisher::replay(&cfg, key, &readings, a.speed))?
    };
    let summary = serde_json::json!({
        "devices": devs.iter().map(|d| serde_json::json!({
            "did": d.key.did().to_string(),
            "scenario": format!("{:?}", d.patient.scenario()),
        })).collect::<Vec<_>>(),
        "published": report.published,
        "acked": report.acked,
        "receipted": report.receipted,
        "receipts_verified": report.receipts_verified,
        "receipt_rejects": report.receipt_rejects,
        "resent": report.resent,
        "valid_readings": report.valid_count(),
        "expected_rejects": report.expected_rejects,
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(ExitCode::SUCCESS)
}

/// The log verifier keys of a data directory's partitions (those that
/// exist yet).
fn data_log_keys(data: &Path) -> Vec<vitaltrail_core::LogPublicKey> {
    let Ok(dirs) = partition_dirs(data) else {
        return vec![];
    };
    dirs.iter()
        .filter_map(|d| std::fs::read_to_string(d.join("log.vkey")).ok())
        .filter_map(|k| vitaltrail_core::LogPublicKey::parse(k.trim()).ok())
        .collect()
}

/// The DIDs the registry of `data` holds as active.
fn active_devices(data: &Path) -> Result<Vec<String>> {
    let reg = up::registry_file(data).load()?;
    Ok(reg
        .devices()
        .filter(|e| e.revoked_ms.is_none())
        .map(|e| e.did.clone())
        .collect())
}

/// `vitaltrail devices cert`.
pub fn devices_cert(data: &Path, did: &str) -> Result<ExitCode> {
    let did = DeviceId::parse(did).context("DID")?;
    if !active_devices(data)?.iter().any(|d| d == did.as_str()) {
        bail!(
            "{} is not an active device of {}: register it first (`vitaltrail devices add`)",
            did.as_str(),
            data.display()
        );
    }
    let pki = vitaltrail_mqtt::Pki::open(data).with_context(|| {
        format!(
            "no device CA in {}/mqtt yet: `vitaltrail up` or `vitaltrail mqtt mosquitto` makes it",
            data.display()
        )
    })?;
    print!("{}", pki.issue_device(&did)?);
    Ok(ExitCode::SUCCESS)
}

/// `vitaltrail mqtt mosquitto`.
pub fn mqtt_mosquitto(
    data: &Path,
    out: &Path,
    listen: SocketAddr,
    pipeline_listen: SocketAddr,
    mut names: Vec<String>,
    user: Option<String>,
) -> Result<ExitCode> {
    names.push(listen.ip().to_string());
    names.push(pipeline_listen.ip().to_string());
    let pki = vitaltrail_mqtt::Pki::load_or_create(data, &names)?;
    let active = active_devices(data)?;
    let cfg = vitaltrail_mqtt::mosquitto::MosquittoConfig {
        devices: listen,
        pipeline: pipeline_listen,
        user,
    };
    vitaltrail_mqtt::mosquitto::write(&pki, &cfg, &active, out)?;
    eprintln!(
        "wrote {}/mosquitto.conf and its ACL for {} active device(s); start `mosquitto -c {}/mosquitto.conf`",
        out.display(),
        active.len(),
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `vitaltrail devices add`.
pub fn devices_add(
    data: &Path,
    did: &str,
    patient: &str,
    ward: Option<&str>,
    kafka: Option<String>,
) -> Result<ExitCode> {
    let did = DeviceId::parse(did).context("DID")?;
    let file = up::registry_file(data);
    file.add(&did, patient, ward, SystemClock.now_ms())?;
    if let Some(brokers) = kafka {
        let entry = local_entry(&file, &did)?;
        let op = vitaltrail::distributed::operator_key(data)?;
        runtime()?.block_on(vitaltrail::distributed::publish_device(
            &kafka_cfg(brokers),
            &entry,
            &op,
        ))?;
        println!("registered {did} for patient {patient} (published to vitals.devices)");
    } else {
        println!("registered {did} for patient {patient}");
    }
    Ok(ExitCode::SUCCESS)
}

fn kafka_cfg(brokers: String) -> vitaltrail_bus::kafka::KafkaConfig {
    vitaltrail_bus::kafka::KafkaConfig {
        brokers,
        ..Default::default()
    }
}

fn local_entry(
    file: &vitaltrail_ingest::registry::RegistryFile,
    did: &DeviceId,
) -> Result<vitaltrail_ingest::registry::DeviceEntry> {
    use vitaltrail_ingest::registry::Lookup;
    match file.load()?.lookup(did.as_str()) {
        Lookup::Active(e) | Lookup::Revoked(e) => Ok(e.clone()),
        Lookup::Unknown => anyhow::bail!("{did} is not in {}", file.path().display()),
    }
}

/// `vitaltrail devices revoke`.
pub fn devices_revoke(data: &Path, did: &str, kafka: Option<String>) -> Result<ExitCode> {
    use vitaltrail_ingest::registry::Lookup;
    let did = DeviceId::parse(did).context("DID")?;
    let file = up::registry_file(data);
    let now = SystemClock.now_ms();
    let Some(brokers) = kafka else {
        file.revoke(&did, now)?;
        println!("revoked {did}");
        return Ok(ExitCode::SUCCESS);
    };
    let cfg = kafka_cfg(brokers);
    let op = vitaltrail::distributed::operator_key(data)?;
    let rt = runtime()?;
    let local = file.load()?;
    let mut entry = match local.lookup(did.as_str()) {
        Lookup::Active(_) => {
            file.revoke(&did, now)?;
            local_entry(&file, &did)?
        }
        _ => {
            // Known only to the cluster, or revoked here already: revoke
            // what the topic holds.
            let topic = rt.block_on(vitaltrail::distributed::topic_registry(&cfg, op.did()))?;
            match topic.with(|r| match r.lookup(did.as_str()) {
                Lookup::Active(e) => Some(e.clone()),
                _ => None,
            }) {
                Some(e) => e,
                None => anyhow::bail!("{did} is not an active device here or in vitals.devices"),
            }
        }
    };
    entry.revoked_ms.get_or_insert(now);
    rt.block_on(vitaltrail::distributed::publish_device(&cfg, &entry, &op))?;
    println!("revoked {did} (published to vitals.devices)");
    Ok(ExitCode::SUCCESS)
}

/// `vitaltrail devices list`.
pub fn devices_list(data: &Path) -> Result<ExitCode> {
    let reg = up::registry_file(data).load()?;
    for d in reg.devices() {
        let state = if d.revoked_ms.is_some() {
            "revoked"
        } else {
            "active"
        };
        println!(
            "{}\t{}\t{}\t{state}",
            d.did,
            d.patient,
            d.ward.as_deref().unwrap_or("-")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn partition_dirs(data: &Path) -> Result<Vec<PathBuf>> {
    let root = data.join("partitions");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .with_context(|| {
            format!(
                "{} has no partition logs; is it a `vitaltrail up` data directory?",
                data.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("HEAD").exists())
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// `vitaltrail prove --device DID --seq N`.
pub fn prove(data: &Path, device: &str, seq: u64, out: Option<&Path>) -> Result<ExitCode> {
    let did = DeviceId::parse(device).context("--device")?;
    for dir in partition_dirs(data)? {
        let log = DurableLog::open_read_only(&dir)?;
        for i in (0..log.size()).rev() {
            let bytes = log.leaf(i)?;
            let l = leaf::decode(&bytes)?;
            let r = envelope::decode_verified_upstream(l.envelope)?;
            if r.did != did || r.seq != seq {
                continue;
            }
            let note = log
                .latest_checkpoint()?
                .context("the partition has no checkpoint yet; retry in a second")?;
            let cp = Checkpoint::parse_unverified(&note)?;
            if i >= cp.size {
                bail!(
                    "the reading is logged (leaf {i}) but not yet covered by a checkpoint; retry in a second"
                );
            }
            let proof = log.prove_inclusion(cp.size, i)?;
            let bundle = ProofBundle::new(l.envelope, l.log_time_ms, i, &proof, &note);
            let json = format!("{}\n", bundle.to_json());
            match out {
                Some(p) => {
                    std::fs::write(p, json).with_context(|| format!("writing {}", p.display()))?
                }
                None => print!("{json}"),
            }
            eprintln!(
                "proved seq {seq} of {did}: leaf {i} of {} (log key: {})",
                cp.origin,
                dir.join("log.vkey").display()
            );
            return Ok(ExitCode::SUCCESS);
        }
    }
    bail!("no logged reading with seq {seq} from {did}")
}

/// The verifier key for a checkpoint origin, from a data directory.
pub fn log_key_for(data: &Path, bundle: &ProofBundle) -> Result<String> {
    let origin = Checkpoint::parse_unverified(&bundle.checkpoint)?.origin;
    for dir in partition_dirs(data)? {
        let vkey = std::fs::read_to_string(dir.join("log.vkey")).unwrap_or_default();
        if vkey.split('+').next() == Some(origin.as_str()) {
            return Ok(vkey.trim().to_owned());
        }
    }
    bail!(
        "no log named {origin:?} in {}; pass --log-key",
        data.display()
    )
}

/// `vitaltrail query`.
pub fn query(data: &Path, sql: &str, format: &str, out: Option<&Path>) -> Result<ExitCode> {
    use vitaltrail_query::{Format, QueryEngine, encode};
    let fmt = match format {
        "table" => Format::Table,
        "csv" => Format::Csv,
        "json" => Format::Json,
        "parquet" => Format::Parquet,
        other => bail!("unknown --format {other:?}; one of table, csv, json, parquet"),
    };
    if fmt == Format::Parquet && out.is_none() {
        bail!("--format parquet needs --out FILE");
    }
    let bytes = runtime()?.block_on(async {
        let engine = QueryEngine::open(data).await?;
        let batches = engine.sql(sql).await?;
        encode(&batches, fmt)
    })?;
    match out {
        Some(p) => std::fs::write(p, bytes).with_context(|| format!("writing {}", p.display()))?,
        None => {
            use std::io::Write;
            std::io::stdout().lock().write_all(&bytes)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
