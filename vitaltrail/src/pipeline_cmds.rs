//! The subcommands of the pipeline: `up`, `ingest`, `attest`, `anchor`,
//! `sim`, `devices`, `prove`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use vitaltrail_core::{Checkpoint, Clock, DeviceId, ProofBundle, SystemClock};
use vitaltrail_device_sim::attacks::Attack;
use vitaltrail_device_sim::physiology::Scenario;
use vitaltrail_device_sim::publisher::{self, SimConfig};
use vitaltrail_node::config::Role;
use vitaltrail_node::up::{self, UpConfig};

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

/// `vitaltrail ingest`.
pub fn ingest(a: crate::node_args::IngestArgs) -> Result<ExitCode> {
    let cfg = a.config.load(Role::Ingest, &a.overrides())?;
    vitaltrail_node::exit_on_panic();
    runtime()?.block_on(async move {
        vitaltrail_node::process::run_ingest(cfg, shutdown_on_ctrl_c()).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `vitaltrail attest`.
pub fn attest(a: crate::node_args::AttestArgs) -> Result<ExitCode> {
    let cfg = a.config.load(Role::Attest, &a.overrides())?;
    vitaltrail_node::exit_on_panic();
    runtime()?.block_on(async move {
        vitaltrail_node::process::run_attest(cfg, shutdown_on_ctrl_c()).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `vitaltrail anchor`.
pub fn anchor(a: crate::node_args::AnchorArgs) -> Result<ExitCode> {
    let cfg = a.config.load(Role::Anchor, &a.overrides())?;
    vitaltrail_node::exit_on_panic();
    runtime()?.block_on(async move {
        vitaltrail_node::process::run_anchor(cfg, shutdown_on_ctrl_c()).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `vitaltrail alerts`.
pub fn alerts(a: &crate::node_args::AlertsArgs) -> Result<ExitCode> {
    let cfg = a.config.load(Role::Alerts, &a.overrides())?;
    vitaltrail_node::exit_on_panic();
    runtime()?.block_on(async move {
        vitaltrail_node::process::run_alerts(cfg, shutdown_on_ctrl_c()).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `vitaltrail alerts export-key`: the vitals.logged key, derived from an
/// existing bus key, to a new file (mode 0600).
pub fn alerts_export_key(bus_key: Option<&Path>, data: &Path, out: &Path) -> Result<ExitCode> {
    let path = bus_key.map_or_else(
        || vitaltrail_bus::datadir::bus_key_path(data),
        Path::to_owned,
    );
    if !path.exists() {
        bail!("no bus key at {}", path.display());
    }
    if out.exists() {
        bail!("{} exists; not overwritten", out.display());
    }
    let key = vitaltrail_bus::datadir::load_bus_key(&path)?.logged_key();
    vitaltrail_bus::datadir::write_secret(out, &format!("{}\n", key.to_hex()))?;
    eprintln!(
        "wrote the vitals.logged key (derived from {}) to {}",
        path.display(),
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `vitaltrail alerts ack ID --as NAME`: `POST /alerts/<id>/ack` with the
/// operator's token; prints the acknowledged alarm.
pub fn alerts_ack(id: &str, by: &str, server: &str, data: &Path) -> Result<ExitCode> {
    let token_path = vitaltrail_bus::datadir::alerts_token_path(data);
    let token = std::fs::read_to_string(&token_path).with_context(|| {
        format!(
            "reading the operator's token {} (it is made when the alert engine's HTTP server \
             first starts)",
            token_path.display()
        )
    })?;
    let mut url =
        reqwest::Url::parse(server).with_context(|| format!("--server {server:?}: not a URL"))?;
    // The operator's token goes in the clear over http: only to this
    // machine.
    let loopback = match url.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    };
    if !(url.scheme() == "https" || (url.scheme() == "http" && loopback)) {
        bail!(
            "--server {server:?}: the operator's token is sent only over https, or over http to \
             this machine (127.0.0.1, ::1, localhost)"
        );
    }
    url.path_segments_mut()
        .map_err(|()| anyhow::anyhow!("--server {server:?}: not an http(s) URL"))?
        .pop_if_empty()
        .extend(["alerts", id, "ack"]);
    // reqwest is built without a TLS provider of its own.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (status, body) = runtime()?
        .block_on(async move {
            let client = reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(std::time::Duration::from_secs(30))
                .build()?;
            let r = client
                .post(url)
                .bearer_auth(token.trim())
                .header("content-type", "application/json")
                .body(serde_json::json!({ "as": by }).to_string())
                .send()
                .await?;
            let status = r.status();
            Ok::<_, reqwest::Error>((status, r.text().await?))
        })
        .with_context(|| format!("reaching the alert engine at {server}"))?;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    if !status.is_success() {
        let why = v["error"].as_str().map_or(body.trim(), |s| s);
        bail!("{status}: {why}");
    }
    let alarm = &v["alarm"];
    outln!(
        "acknowledged {} ({} {}, ward {}) by {} at {}",
        alarm["id"].as_str().unwrap_or(id),
        alarm["severity"].as_str().unwrap_or("?"),
        alarm["rule"].as_str().unwrap_or("?"),
        alarm["ward"].as_str().unwrap_or("-"),
        alarm["ack"]["by"].as_str().unwrap_or(by),
        alarm["ack"]["at_ms"]
    );
    Ok(ExitCode::SUCCESS)
}

/// `vitaltrail anchor verify-ledger`: every record of the local ledger,
/// and that each root is the epoch log's at its size.
pub fn anchor_verify_ledger(data: &Path, anchor_key: Option<&str>) -> Result<ExitCode> {
    let key = anchor_key_for(data, anchor_key)?;
    let (n, torn) = vitaltrail_anchor::ledger::verify_against_log(&data.join("anchor"), &key)?;
    outln!(
        "ok   {n} ledger records: chain, signatures (key {key}) and roots verified{}",
        if torn {
            "; a torn last line (a crash mid-append) is not a record"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// `vitaltrail anchor deploy`.
pub fn anchor_deploy(
    rpc: &str,
    key_file: Option<&Path>,
    data: &Path,
    confirmations: u64,
) -> Result<ExitCode> {
    let signer = vitaltrail_anchor::evm::load_key(key_file)?;
    let dir = data.join("anchor");
    let d = runtime()?.block_on(vitaltrail_anchor::evm::deploy(
        rpc,
        signer,
        confirmations,
        &dir,
    ))?;
    outln!("{}", d.contract);
    eprintln!(
        "deployed AnchorRegistry at {} on chain {} (tx {}, block {}); written to {}",
        d.contract,
        d.chain_id,
        d.tx_hash.as_deref().unwrap_or("?"),
        d.block_number.map_or("?".to_owned(), |b| b.to_string()),
        vitaltrail_anchor::evm::deployment_path(&dir).display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The anchor's verifier key: `--anchor-key` (a key or a file holding
/// one), else `<data>/anchor/anchor.vkey`.
pub fn anchor_key_for(data: &Path, given: Option<&str>) -> Result<vitaltrail_core::LogPublicKey> {
    if let Some(k) = given {
        return crate::commands::parse_log_key(k);
    }
    let path = data.join("anchor").join("anchor.vkey");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("no anchor key at {}; pass --anchor-key", path.display()))?;
    Ok(vitaltrail_core::LogPublicKey::parse(text.trim())?)
}

/// `vitaltrail up`.
pub fn up(a: crate::node_args::UpArgs) -> Result<ExitCode> {
    let node = a.config.load(Role::Up, &a.overrides())?;
    let cfg = UpConfig::from_node(&node)?;
    vitaltrail_node::exit_on_panic();
    runtime()?.block_on(async move { up::run(cfg, shutdown_on_ctrl_c()).await })?;
    Ok(ExitCode::SUCCESS)
}

/// `vitaltrail config print`.
pub fn config_print(role: Role, file: &crate::node_args::ConfigFile) -> Result<ExitCode> {
    let cfg = file.load(role, &Default::default())?;
    out!("{}", cfg.to_toml_redacted()?);
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
        let reg = vitaltrail_bus::datadir::registry_file(data);
        let existing = reg.load()?;
        for (i, d) in devs.iter().enumerate() {
            if matches!(
                existing.lookup(d.key.did().as_str()),
                vitaltrail_bus::registry::Lookup::Unknown
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
        "disconnections": report.disconnections,
        "valid_readings": report.valid_count(),
        "expected_rejects": report.expected_rejects,
        "attacks_not_sent": report.attacks_not_sent,
    });
    outln!("{}", serde_json::to_string_pretty(&summary)?);
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
    let reg = vitaltrail_bus::datadir::registry_file(data).load()?;
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
    out!("{}", pki.issue_device(&did)?);
    Ok(ExitCode::SUCCESS)
}

/// The viewers file, changed under a lock (one writer at a time).
fn with_viewers<T>(
    data: &Path,
    f: impl FnOnce(&mut vitaltrail_mqtt::viewers::Viewers) -> Result<T>,
) -> Result<T> {
    use vitaltrail_mqtt::viewers::{Viewers, viewers_file};
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let lock_path = data.join("viewers.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;
    let file = viewers_file(data);
    let mut v = Viewers::load(&file)?;
    let out = f(&mut v)?;
    v.save(&file)?;
    Ok(out)
}

/// `vitaltrail viewers add`.
pub fn viewers_add(data: &Path, name: &str, wards: &[String], out: &Path) -> Result<ExitCode> {
    let pki = vitaltrail_mqtt::Pki::open(data).with_context(|| {
        format!(
            "no device CA in {}/mqtt yet: `vitaltrail up` or `vitaltrail mqtt mosquitto` makes it",
            data.display()
        )
    })?;
    let now = vitaltrail_core::Clock::now_ms(&vitaltrail_core::SystemClock);
    // A refused name or ward issues no certificate (checked on a copy).
    vitaltrail_mqtt::viewers::Viewers::default().add(name, wards, "", "", now)?;
    let (cert, key, pin) = pki.issue_viewer(name)?;
    let token = vitaltrail_core::auth::Token::generate(&mut rand::rngs::OsRng);
    let token_pin = vitaltrail_mqtt::viewers::token_fingerprint(token.expose());
    // The secrets are written before the list names them: a failure
    // leaves the old certificate and token in force, not a viewer with
    // nothing to prove itself with.
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // Never among the data directory's own keys and tokens (a viewer
    // named "sql" or "operator" would replace them).
    let canon = |p: &Path| p.canonicalize().ok();
    if canon(out).is_some()
        && [data.to_owned(), data.join("keys")]
            .iter()
            .any(|d| canon(d) == canon(out))
    {
        bail!(
            "--out {}: a station's files go to a directory of their own, never the data \
             directory or its keys",
            out.display()
        );
    }
    vitaltrail_mqtt::pki::write(&out.join(format!("{name}.key")), &key, true)?;
    vitaltrail_mqtt::pki::write(&out.join(format!("{name}.pem")), &cert, false)?;
    vitaltrail_mqtt::pki::write(
        &out.join(format!("{name}.token")),
        &format!("{}\n", token.expose()),
        true,
    )?;
    // Only this certificate connects as `name` from now on, and only this
    // token acknowledges as it: any earlier one (a lost or stolen
    // station's) no longer does.
    with_viewers(data, |v| Ok(v.add(name, wards, &pin, &token_pin, now)?))?;
    vitaltrail_mqtt::pki::write(&out.join("server-ca.pem"), &pki.server_ca_pem()?, false)?;
    eprintln!(
        "viewer {name} may subscribe to {} and acknowledge their alarms; its certificate and key: {}/{name}.pem, {}/{name}.key (trust {}/server-ca.pem for the broker); its HTTP token: {}/{name}.token",
        wards
            .iter()
            .map(|w| format!("alerts/{w}"))
            .collect::<Vec<_>>()
            .join(", "),
        out.display(),
        out.display(),
        out.display(),
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `vitaltrail viewers revoke`.
pub fn viewers_revoke(data: &Path, name: &str) -> Result<ExitCode> {
    with_viewers(data, |v| match v.viewers.get_mut(name) {
        Some(x) => {
            x.revoked = true;
            Ok(())
        }
        None => anyhow::bail!("no viewer {name:?}"),
    })?;
    eprintln!(
        "viewer {name} revoked: the gate disconnects it within seconds and lets it in no more; \
         with Mosquitto, run `vitaltrail mqtt mosquitto` again and send it SIGHUP: it may still \
         connect, but receives nothing"
    );
    Ok(ExitCode::SUCCESS)
}

/// `vitaltrail viewers list`.
pub fn viewers_list(data: &Path) -> Result<ExitCode> {
    let v = vitaltrail_mqtt::viewers::Viewers::load(&vitaltrail_mqtt::viewers::viewers_file(data))?;
    for (name, x) in &v.viewers {
        outln!(
            "{name}\t{}\t{}",
            x.wards.join(","),
            if x.revoked { "revoked" } else { "active" }
        );
    }
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
    let viewers =
        vitaltrail_mqtt::viewers::Viewers::load(&vitaltrail_mqtt::viewers::viewers_file(data))?;
    vitaltrail_mqtt::mosquitto::write(&pki, &cfg, &active, &viewers, out)?;
    eprintln!(
        "wrote {}/mosquitto.conf and its ACL for {} active device(s) and {} viewer(s); start `mosquitto -c {}/mosquitto.conf`",
        out.display(),
        active.len(),
        viewers.viewers.values().filter(|v| !v.revoked).count(),
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
    let file = vitaltrail_bus::datadir::registry_file(data);
    file.add(&did, patient, ward, SystemClock.now_ms())?;
    if let Some(brokers) = kafka {
        let entry = local_entry(&file, &did)?;
        let op = vitaltrail_bus::datadir::operator_key(data)?;
        runtime()?.block_on(vitaltrail_bus::registry::publish_to_topic(
            &kafka_cfg(brokers),
            &entry,
            &op,
        ))?;
        outln!("registered {did} for patient {patient} (published to vitals.devices)");
    } else {
        outln!("registered {did} for patient {patient}");
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
    file: &vitaltrail_bus::registry::RegistryFile,
    did: &DeviceId,
) -> Result<vitaltrail_bus::registry::DeviceEntry> {
    use vitaltrail_bus::registry::Lookup;
    match file.load()?.lookup(did.as_str()) {
        Lookup::Active(e) | Lookup::Revoked(e) => Ok(e.clone()),
        Lookup::Unknown => anyhow::bail!("{did} is not in {}", file.path().display()),
    }
}

/// `vitaltrail devices revoke`.
pub fn devices_revoke(data: &Path, did: &str, kafka: Option<String>) -> Result<ExitCode> {
    use vitaltrail_bus::registry::Lookup;
    let did = DeviceId::parse(did).context("DID")?;
    let file = vitaltrail_bus::datadir::registry_file(data);
    let now = SystemClock.now_ms();
    let Some(brokers) = kafka else {
        file.revoke(&did, now)?;
        outln!("revoked {did}");
        return Ok(ExitCode::SUCCESS);
    };
    let cfg = kafka_cfg(brokers);
    let op = vitaltrail_bus::datadir::operator_key(data)?;
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
            let topic = rt.block_on(vitaltrail_bus::registry::from_topic(&cfg, op.did()))?;
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
    rt.block_on(vitaltrail_bus::registry::publish_to_topic(
        &cfg, &entry, &op,
    ))?;
    outln!("revoked {did} (published to vitals.devices)");
    Ok(ExitCode::SUCCESS)
}

/// `vitaltrail devices list`.
pub fn devices_list(data: &Path) -> Result<ExitCode> {
    let reg = vitaltrail_bus::datadir::registry_file(data).load()?;
    for d in reg.devices() {
        let state = if d.revoked_ms.is_some() {
            "revoked"
        } else {
            "active"
        };
        outln!(
            "{}\t{}\t{}\t{state}",
            d.did,
            d.patient,
            d.ward.as_deref().unwrap_or("-")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn partition_dirs(data: &Path) -> Result<Vec<PathBuf>> {
    vitaltrail_query::prove::partition_dirs(data).with_context(|| {
        format!(
            "{} has no partition logs; is it a `vitaltrail up` data directory?",
            data.display()
        )
    })
}

/// `vitaltrail prove --device DID --seq N [--wait]`.
pub fn prove(
    data: &Path,
    device: &str,
    seq: u64,
    out: Option<&Path>,
    wait: Option<Duration>,
) -> Result<ExitCode> {
    let did = DeviceId::parse(device).context("--device")?;
    let deadline = wait.map(|w| std::time::Instant::now() + w);
    let proved = loop {
        let r = vitaltrail_query::prove::prove(data, &did, seq);
        // With the chain on, --wait waits for the chain's anchor.
        let anchored = matches!(&r, Ok(p)
            if !p.anchoring || (p.anchored_size.is_some() && (p.on_chain || !p.evm_on)));
        let retry = match &r {
            Ok(_) => !anchored,
            Err(vitaltrail_query::Error::NotYet(_) | vitaltrail_query::Error::NotFound(_)) => true,
            Err(_) => false,
        };
        match deadline {
            Some(d) if retry && std::time::Instant::now() < d => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Some(_) if retry && r.is_ok() => {
                eprintln!("warning: not anchored within --timeout; the bundle says `pending`");
                break r?;
            }
            _ => break r?,
        }
    };
    let json = format!("{}\n", proved.bundle.to_json());
    match out {
        Some(p) => std::fs::write(p, json).with_context(|| format!("writing {}", p.display()))?,
        None => out!("{json}"),
    }
    let how = match (proved.anchoring, proved.anchored_size) {
        (false, _) => "anchoring is off: a v1 bundle, up to the checkpoint".to_owned(),
        (true, Some(n)) if proved.on_chain => {
            format!("anchored on chain (and in the ledger) at epoch log size {n}")
        }
        (true, Some(n)) => format!("anchored by the ledger at epoch log size {n}"),
        (true, None) => {
            "not anchored yet (the bundle says `pending`; prove --wait waits)".to_owned()
        }
    };
    eprintln!(
        "proved seq {seq} of {did}: leaf {} of {}; {how} (log key: {})",
        proved.leaf,
        proved.origin,
        proved.partition_dir.join("log.vkey").display()
    );
    Ok(ExitCode::SUCCESS)
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

/// `vitaltrail fhir observations`: every page of the search, as one
/// searchset Bundle or as NDJSON, written as it is read.
pub fn fhir_observations(
    data: &Path,
    patient: &str,
    since: Option<&str>,
    until: Option<&str>,
    codes: &[String],
    ndjson: bool,
) -> Result<ExitCode> {
    use vitaltrail_query::fhir::{MAX_COUNT, Search};
    let mut pairs: Vec<(&str, String)> = vec![("patient", patient.to_owned())];
    if let Some(s) = since {
        pairs.push(("date", format!("ge{s}")));
    }
    if let Some(u) = until {
        pairs.push(("date", format!("lt{u}")));
    }
    for c in codes {
        pairs.push(("code", c.clone()));
    }
    let count = MAX_COUNT.to_string();
    pairs.push(("_count", count));
    let mut search = Search::from_pairs(pairs.iter().map(|(k, v)| (*k, v.as_str())))?;
    let rt = runtime()?;
    let engine = rt.block_on(vitaltrail_query::QueryEngine::open(data))?;
    let now = vitaltrail_core::Clock::now_ms(&vitaltrail_core::SystemClock);
    use std::io::Write as _;
    let mut w = std::io::BufWriter::new(std::io::stdout().lock());
    let mut first = true;
    loop {
        let page = rt.block_on(engine.observations(&search))?;
        for o in &page.observations {
            if ndjson {
                writeln!(w, "{o}")
            } else {
                if first {
                    // The entries: only if there is one (FHIR JSON has no
                    // empty arrays).
                    write!(
                        w,
                        "{{\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"timestamp\":{},\"entry\":[",
                        serde_json::Value::from(vitaltrail_query::fhir::instant(now))
                    )
                    .map_err(crate::out::stdout_error)?;
                }
                let e = vitaltrail_query::fhir::entry(o, &vitaltrail_query::fhir::urn_uuid);
                write!(w, "{}\n{e}", if first { "" } else { "," })
            }
            .map_err(crate::out::stdout_error)?;
            first = false;
        }
        match page.next {
            Some(c) => search.after = Some(c),
            None => break,
        }
    }
    if !ndjson {
        if first {
            write!(
                w,
                "{{\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"timestamp\":{}",
                serde_json::Value::from(vitaltrail_query::fhir::instant(now))
            )
            .map_err(crate::out::stdout_error)?;
            writeln!(w, "}}")
        } else {
            writeln!(w, "]}}")
        }
        .map_err(crate::out::stdout_error)?;
    }
    w.flush().map_err(crate::out::stdout_error)?;
    Ok(ExitCode::SUCCESS)
}

/// `vitaltrail query`: one read-only statement, in the chosen format.
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
    crate::commands::write_output(out, &bytes)?;
    Ok(ExitCode::SUCCESS)
}
