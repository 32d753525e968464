//! Who may do what on the broker (docs/threat-model.md, "Broker"), tried by
//! an independent hostile client (`tests/interop/outsider.py`, paho-mqtt)
//! while devices publish, against the embedded broker's gate and against a
//! real Mosquitto configured by `vitaltrail mqtt mosquitto`. Nothing the
//! outsider does may let it read a reading or a receipt, publish as another
//! device, take the pipeline's place, or cost a reading.

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use vitaltrail_attestor::pipeline::AttestorConfig;
use vitaltrail_core::{SecretKey, SystemClock};
use vitaltrail_device_sim::physiology::Scenario;
use vitaltrail_device_sim::publisher::{self, SimConfig, SimDevice};
use vitaltrail_mqtt::{MqttEndpoint, Pki};
use vitaltrail_node::up::{self, UpConfig};

/// The devices of a run: five honest ones, an insider (registered, active,
/// hostile) and a device revoked after it got its certificate.
struct Cast {
    devs: Vec<SimDevice>,
    insider: SecretKey,
    revoked: SecretKey,
}

fn register(data: &Path) -> Cast {
    let devs = publisher::devices(61, 5, &[Scenario::Steady]);
    let insider = SecretKey::from_seed(&[91; 32]).unwrap();
    let revoked = SecretKey::from_seed(&[92; 32]).unwrap();
    let reg = vitaltrail_bus::datadir::registry_file(data);
    for (i, d) in devs.iter().enumerate() {
        reg.add(d.key.did(), &format!("p{i}"), None, 0).unwrap();
    }
    reg.add(insider.did(), "p-insider", None, 0).unwrap();
    reg.add(revoked.did(), "p-revoked", None, 0).unwrap();
    Cast {
        devs,
        insider,
        revoked,
    }
}

/// Certificates and keys for the outsider, written to files.
fn identity(data: &Path, pki: &Pki, key: &SecretKey, name: &str) -> (String, String) {
    let dir = data.join("outsider");
    std::fs::create_dir_all(&dir).unwrap();
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, pki.issue_device(key.did()).unwrap()).unwrap();
    std::fs::write(&k, key.to_pkcs8_pem().unwrap().as_bytes()).unwrap();
    (c.display().to_string(), k.display().to_string())
}

#[allow(clippy::too_many_arguments)]
async fn run_outsider(
    port: u16,
    ca: &Path,
    insider: (String, String),
    revoked: (String, String),
    own: &str,
    victim: &str,
    pipeline_id: &str,
    share_group: &str,
) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/outsider.py");
    let args = vec![
        "127.0.0.1".to_owned(),
        port.to_string(),
        format!("--ca={}", ca.display()),
        format!("--cert={}", insider.0),
        format!("--key={}", insider.1),
        format!("--revoked-cert={}", revoked.0),
        format!("--revoked-key={}", revoked.1),
        format!("--own={own}"),
        format!("--victim={victim}"),
        format!("--pipeline-id={pipeline_id}"),
        format!("--share-group={share_group}"),
        "--listen-seconds=1.5".to_owned(),
    ];
    let py = common::python();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(py)
            .arg(script)
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "outsider.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What holds on any authenticated broker: nothing received but the
/// insider's own receipt, and no connection without a valid device
/// certificate. `revoked_connects`: Mosquitto lets a revoked device's
/// still-valid certificate connect, with no ACL line (so no rights); the
/// gate refuses it outright.
fn check_refused(r: &serde_json::Value, revoked_connects: bool) {
    let attempts = r.as_object().unwrap();
    assert!(attempts.len() >= 16, "{r}");
    // The control: its own topics work, so the zeros below mean refusal.
    assert_eq!(r["control_own_topics"]["connected"], true, "{r}");
    assert!(
        r["control_own_topics"]["own"].as_u64().unwrap() >= 1,
        "the insider's own rejection receipt never came: {r}"
    );
    for (name, a) in attempts {
        assert_eq!(a["received"], 0, "{name} received messages: {r}");
    }
    for name in [
        "plain_tcp",
        "tls_without_certificate",
        "foreign_certificate",
    ] {
        assert_eq!(r[name]["connected"], false, "{name} was let in: {r}");
    }
    assert_eq!(r["revoked_device"]["connected"], revoked_connects, "{r}");
}

/// The dead letters after a run: only the insider's own junk, on its own
/// topic (the control, and on Mosquitto perhaps its QoS 2 message, which
/// Mosquitto takes), `n` of them. Their reasons, counted.
fn check_dead_letters(
    data: &Path,
    insider: &SecretKey,
    n: std::ops::RangeInclusive<usize>,
) -> std::collections::BTreeMap<String, u64> {
    let text = std::fs::read_to_string(data.join("rejected.jsonl")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(n.contains(&lines.len()), "dead letters: {text}");
    let mut reasons = std::collections::BTreeMap::new();
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(
            v["topic"],
            format!("vitals/{}", insider.did().as_str()),
            "{text}"
        );
        *reasons
            .entry(v["reason"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    reasons
}

fn sim(port: u16, data: &Path, log_keys: Vec<vitaltrail_core::LogPublicKey>) -> SimConfig {
    SimConfig {
        mqtt: MqttEndpoint::plain("127.0.0.1", port),
        device_tls: Some(Arc::new(Pki::open(data).unwrap())),
        rate: 10.0,
        duration: Duration::from_secs(12),
        receipts: true,
        receipt_timeout: Duration::from_secs(60),
        log_keys,
        ..SimConfig::default()
    }
}

fn log_key(data: &Path) -> vitaltrail_core::LogPublicKey {
    let vkey = data.join("partitions/0/log.vkey");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !vkey.exists() {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    vitaltrail_core::LogPublicKey::parse(std::fs::read_to_string(vkey).unwrap().trim()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outsider_on_the_embedded_broker_gets_nothing_and_costs_nothing() {
    let data = tempfile::tempdir().unwrap();
    let mut cast = register(data.path());
    let mqtt = common::free_addr();
    let http = common::free_addr();
    let cfg = UpConfig {
        data_dir: data.path().to_owned(),
        mqtt_listen: mqtt,
        metrics_listen: Some(http),
        attestor: AttestorConfig {
            checkpoint_interval: Duration::from_millis(100),
            ..AttestorConfig::default()
        },
        ..UpConfig::default()
    };
    let pipeline_id = format!("{}-0", cfg.ingest.client_id);
    let share_group = cfg.ingest.share_group.clone().unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let mut pipeline = tokio::spawn(up::run(cfg, stop_rx));
    common::wait_ready(http).await;
    let pki = Pki::open(data.path()).unwrap();
    let insider = identity(data.path(), &pki, &cast.insider, "insider");
    let revoked = identity(data.path(), &pki, &cast.revoked, "revoked");
    vitaltrail_bus::datadir::registry_file(data.path())
        .revoke(cast.revoked.did(), 1)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // Connections that never start TLS must not hold up anyone else
    // (rumqttd's own TLS listener would stall on the first of them).
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(tokio::net::TcpStream::connect(mqtt).await.unwrap());
    }
    let victim = cast.devs[0].key.did().to_string();
    let sim_cfg = sim(mqtt.port(), data.path(), vec![log_key(data.path())]);
    let mut devs = std::mem::take(&mut cast.devs);
    let devices =
        tokio::spawn(
            async move { publisher::run(&sim_cfg, &mut devs, Arc::new(SystemClock)).await },
        );
    let own = cast.insider.did().to_string();
    let r = run_outsider(
        mqtt.port(),
        &pki.path("server-ca.pem"),
        insider,
        revoked,
        &own,
        &victim,
        &pipeline_id,
        &share_group,
    )
    .await;
    check_refused(&r, false);
    // The gate closes a connection at its first step out of bounds.
    for name in [
        "subscribe_all_vitals",
        "subscribe_victim_vitals",
        "join_ingest_share_group",
        "subscribe_all_receipts",
        "subscribe_victim_receipts",
        "subscribe_everything",
        "publish_as_victim",
        "forge_victim_receipt",
        "publish_below_own_topic",
        "publish_qos2",
    ] {
        assert_eq!(r[name]["closed"], true, "{name} was not closed: {r}");
    }
    let report = devices.await.unwrap().unwrap();
    assert!(report.valid_count() >= 500, "{report:?}");
    assert_eq!(report.receipts_verified, report.valid_count(), "{report:?}");
    assert!(!pipeline.is_finished(), "up stopped");
    drop(idle);
    common::wait_settled(data.path(), 1, &report, Duration::from_secs(30)).await;

    // Every refusal is counted, by reason.
    let auth = format!("Bearer {}", common::token(data.path(), "metrics"));
    let (_, _, body) = common::http(http, "GET", "/metrics", &[("Authorization", &auth)], "").await;
    let body = String::from_utf8(body).unwrap();
    for reason in ["subscribe", "topic", "not_registered", "tls", "qos"] {
        assert!(
            body.contains(&format!(
                "vitaltrail_mqtt_gate_refused_total{{reason=\"{reason}\"}}"
            )),
            "no {reason} refusal counted:\n{body}"
        );
    }
    stop.send(true).unwrap();
    (&mut pipeline).await.unwrap().unwrap();
    // Exactly the devices' readings, once each; nothing the outsider sent
    // reached ingest (not even as a dead letter).
    let mut expected = report.clone();
    // The control's junk, once per time it had to publish it.
    let sent = r["control_own_topics"]["sent"].as_u64().unwrap() as usize;
    let reason = check_dead_letters(data.path(), &cast.insider, 1..=sent);
    expected.expected_rejects.extend(reason);
    common::check_outcome(data.path(), 1, &expected, false);
}

/// A Mosquitto configured by `vitaltrail mqtt mosquitto` from the
/// registry of `data` ([`common::configured_mosquitto`]), whose ACL names
/// the insider and not the revoked device.
fn configured_mosquitto(data: &Path, cast: &Cast) -> (common::Mosquitto, u16, u16, UpConfig) {
    let (broker, dev_port, pipe_port, cfg) = common::configured_mosquitto(data);
    let acl = std::fs::read_to_string(data.join("mosquitto").join("acl")).unwrap();
    assert!(!acl.contains(cast.revoked.did().as_str()), "{acl}");
    assert!(acl.contains(cast.insider.did().as_str()), "{acl}");
    (broker, dev_port, pipe_port, cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outsider_on_a_configured_mosquitto_gets_nothing_and_costs_nothing() {
    let data = tempfile::tempdir().unwrap();
    let mut cast = register(data.path());
    // The revoked device got its certificate while it was active.
    let pki = Pki::load_or_create(data.path(), &[]).unwrap();
    let insider = identity(data.path(), &pki, &cast.insider, "insider");
    let revoked = identity(data.path(), &pki, &cast.revoked, "revoked");
    vitaltrail_bus::datadir::registry_file(data.path())
        .revoke(cast.revoked.did(), 1)
        .unwrap();
    let (_broker, dev_port, pipe_port, cfg) = configured_mosquitto(data.path(), &cast);
    let pipeline_id = format!("{}-0", cfg.ingest.client_id);
    let (stop, stop_rx) = watch::channel(false);
    let mut pipeline = tokio::spawn(up::run(cfg, stop_rx));
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let victim = cast.devs[0].key.did().to_string();
    let sim_cfg = sim(dev_port, data.path(), vec![log_key(data.path())]);
    let mut devs = std::mem::take(&mut cast.devs);
    let devices =
        tokio::spawn(
            async move { publisher::run(&sim_cfg, &mut devs, Arc::new(SystemClock)).await },
        );
    let own = cast.insider.did().to_string();
    let r = run_outsider(
        dev_port,
        &pki.path("server-ca.pem"),
        insider.clone(),
        revoked,
        &own,
        &victim,
        &pipeline_id,
        "vitaltrail-ingest",
    )
    .await;
    check_refused(&r, true);
    // Mosquitto takes QoS 2 (it bounds what it holds); on the device's own
    // topic it is just junk for ingest to dead-letter.
    assert_eq!(r["publish_qos2"]["connected"], true, "{r}");
    // A device certificate does not open the pipeline's listener.
    let r2 = run_outsider(
        pipe_port,
        &pki.path("server-ca.pem"),
        insider.clone(),
        insider,
        &own,
        &victim,
        &pipeline_id,
        "vitaltrail-ingest",
    )
    .await;
    for (name, a) in r2.as_object().unwrap() {
        assert_eq!(
            a["connected"], false,
            "pipeline listener let in {name}: {r2}"
        );
    }
    let report = devices.await.unwrap().unwrap();
    assert!(report.valid_count() >= 500, "{report:?}");
    assert_eq!(report.receipts_verified, report.valid_count(), "{report:?}");
    assert!(!pipeline.is_finished(), "up stopped");
    common::wait_settled(data.path(), 1, &report, Duration::from_secs(30)).await;
    stop.send(true).unwrap();
    (&mut pipeline).await.unwrap().unwrap();
    let mut expected = report.clone();
    // The QoS 2 junk, and the control's, once per time it was published.
    let sent = r["control_own_topics"]["sent"].as_u64().unwrap() as usize;
    let reason = check_dead_letters(data.path(), &cast.insider, 1..=1 + sent);
    expected.expected_rejects.extend(reason);
    common::check_outcome(data.path(), 1, &expected, true);
}

/// A device that floods its own topic with junk through Mosquitto, faster
/// than ingest takes it, must not wedge ingest: afterwards other devices'
/// readings are still receipted, and `up` still stops when asked. (Ingest
/// used to wait to queue an acknowledgement while its MQTT event loop
/// waited for ingest to take a message: a deadlock, shutdown included.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_through_mosquitto_does_not_wedge_ingest() {
    use rumqttc::{AsyncClient, Event, Packet, QoS};
    let data = tempfile::tempdir().unwrap();
    let mut cast = register(data.path());
    vitaltrail_bus::datadir::registry_file(data.path())
        .revoke(cast.revoked.did(), 1)
        .unwrap();
    let (_broker, dev_port, _pipe, mut cfg) = configured_mosquitto(data.path(), &cast);
    // One connection, so one connection's acknowledgements pile up.
    cfg.ingest.connections = 1;
    let (stop, stop_rx) = watch::channel(false);
    let pipeline = tokio::spawn(up::run(cfg, stop_rx));
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let pki = Pki::open(data.path()).unwrap();
    let e =
        MqttEndpoint::plain("127.0.0.1", dev_port).with_tls(pki.device_tls(&cast.insider).unwrap());
    let mut opts = e.options("flood");
    opts.set_inflight(1000);
    let (client, mut ev) = AsyncClient::new(opts, 4096);
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let a = acked.clone();
    let poll = tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    a.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let topic = format!("vitals/{}", cast.insider.did());
    let junk = vec![0xa5u8; 1024];
    let n = 30_000u64;
    for _ in 0..n {
        client
            .publish(topic.clone(), QoS::AtLeastOnce, false, junk.clone())
            .await
            .unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while acked.load(std::sync::atomic::Ordering::Relaxed) < n {
        assert!(
            std::time::Instant::now() < deadline,
            "Mosquitto did not take the flood"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    poll.abort();

    // Other devices still get their receipts...
    let mut sim_cfg = sim(dev_port, data.path(), vec![log_key(data.path())]);
    sim_cfg.duration = Duration::from_secs(2);
    sim_cfg.receipt_timeout = Duration::from_secs(90);
    sim_cfg.ack_timeout = Duration::from_secs(90);
    let mut devs = std::mem::take(&mut cast.devs);
    let report = publisher::run(&sim_cfg, &mut devs, Arc::new(SystemClock))
        .await
        .unwrap();
    assert_eq!(report.receipts_verified, report.valid_count(), "{report:?}");
    // ...and `up` stops when asked.
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(30), pipeline)
        .await
        .expect("up did not stop within 30 s of the signal")
        .unwrap()
        .unwrap();
}
