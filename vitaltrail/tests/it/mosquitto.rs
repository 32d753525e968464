//! Against a real Mosquitto (started here on 127.0.0.1, stopped by the test):
//! the pipeline with a shared subscription, interop with an independent
//! publisher (`mosquitto_pub`) sending a pycose-signed envelope, and a broker
//! restart in the middle of a run.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use vitaltrail_attestor::pipeline::{AttestorConfig, read_checkpoints};
use vitaltrail_bus::deadletter::RejectLog;
use vitaltrail_core::{DeviceId, SystemClock};
use vitaltrail_device_sim::attacks::Attack;
use vitaltrail_device_sim::physiology::Scenario;
use vitaltrail_device_sim::publisher::{self, SimConfig};
use vitaltrail_ingest::IngestConfig;
use vitaltrail_node::up::{self, UpConfig};

fn config(data: &std::path::Path, mqtt_port: u16, partitions: u32) -> UpConfig {
    UpConfig {
        data_dir: data.to_owned(),
        external_mqtt: Some(vitaltrail_mqtt::MqttEndpoint::plain("127.0.0.1", mqtt_port)),
        partitions,
        metrics_listen: None,
        attestor: AttestorConfig {
            checkpoint_interval: Duration::from_millis(100),
            ..AttestorConfig::default()
        },
        ingest: IngestConfig {
            share_group: Some("vitaltrail-ingest".into()),
            ..IngestConfig::default()
        },
        ..UpConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipeline_over_mosquitto_with_a_shared_subscription() {
    let broker = common::Mosquitto::start(false);
    let data = tempfile::tempdir().unwrap();
    let partitions = 2;
    let mut devs = publisher::devices(
        11,
        5,
        &[
            Scenario::Steady,
            Scenario::Tachyarrhythmia,
            Scenario::ClockSkew,
        ],
    );
    let reg = vitaltrail_bus::datadir::registry_file(data.path());
    for (i, d) in devs.iter().enumerate() {
        reg.add(d.key.did(), &format!("p{i}"), None, 0).unwrap();
    }
    let (stop, stop_rx) = watch::channel(false);
    let pipeline = tokio::spawn(up::run(
        config(data.path(), broker.port, partitions),
        stop_rx,
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sim = SimConfig {
        mqtt: vitaltrail_mqtt::MqttEndpoint::plain("127.0.0.1", broker.port),
        rate: 20.0,
        duration: Duration::from_secs(2),
        attacks: Attack::ALL.to_vec(),
        ..SimConfig::default()
    };
    let report = publisher::run(&sim, &mut devs, Arc::new(SystemClock))
        .await
        .unwrap();
    common::wait_settled(data.path(), partitions, &report, Duration::from_secs(30)).await;
    stop.send(true).unwrap();
    pipeline.await.unwrap().unwrap();
    common::check_outcome(data.path(), partitions, &report, false);
    common::check_tables(data.path(), &report).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pycose_envelope_published_with_mosquitto_pub_is_accepted() {
    let broker = common::Mosquitto::start(false);
    let pubbin = common::require(
        "mosquitto_pub",
        "install Debian package `mosquitto-clients`",
    );
    let manifest: serde_json::Value = serde_json::from_str(include_str!(
        "../../../core/tests/fixtures/cose/manifest.json"
    ))
    .unwrap();
    let case = |name: &str| {
        let c = manifest["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()
            .clone();
        (
            c["did"].as_str().unwrap().to_owned(),
            hex::decode(c["cose_hex"].as_str().unwrap()).unwrap(),
        )
    };
    let (did, good) = case("valid_multi_meta");
    let (_, forged) = case("tampered_signature");
    let data = tempfile::tempdir().unwrap();
    vitaltrail_bus::datadir::registry_file(data.path())
        .add(&DeviceId::parse(&did).unwrap(), "interop-patient", None, 0)
        .unwrap();
    // The fixtures carry a 2023 device time: kept, as late readings.
    let cfg = config(data.path(), broker.port, 1);
    let (stop, stop_rx) = watch::channel(false);
    let pipeline = tokio::spawn(up::run(cfg, stop_rx));
    tokio::time::sleep(Duration::from_millis(500)).await;

    for (name, bytes) in [("good", &good), ("forged", &forged)] {
        let f = data.path().join(format!("{name}.cose"));
        std::fs::write(&f, bytes).unwrap();
        let st = std::process::Command::new(&pubbin)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &broker.port.to_string(),
                "-q",
                "1",
                "-V",
                "mqttv311",
            ])
            .args(["-t", &format!("vitals/{did}"), "-f"])
            .arg(&f)
            .status()
            .unwrap();
        assert!(st.success());
    }
    let pdir = data.path().join("partitions/0");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let logged = read_checkpoints(&pdir)
            .unwrap()
            .last()
            .map_or(0, |c| c.size);
        let rejected = RejectLog::read_all(data.path().join("rejected.jsonl")).unwrap();
        if logged == 1 && rejected.len() == 1 {
            assert_eq!(rejected[0].reason, "bad_signature");
            assert_eq!(rejected[0].device.as_deref(), Some(did.as_str()));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "logged {logged}, rejected {rejected:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.send(true).unwrap();
    pipeline.await.unwrap().unwrap();
    let log = vitaltrail_attestor::DurableLog::open(&pdir).unwrap();
    let leaf = log.leaf(0).unwrap();
    // The leaf holds the pycose bytes exactly as published.
    assert_eq!(
        vitaltrail_core::leaf::decode(&leaf).unwrap().envelope,
        good.as_slice()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_is_lost_when_mosquitto_restarts_mid_run() {
    let mut broker = common::Mosquitto::start(true);
    let data = tempfile::tempdir().unwrap();
    let partitions = 2;
    let mut devs = publisher::devices(13, 4, &[Scenario::Steady, Scenario::Deterioration]);
    let reg = vitaltrail_bus::datadir::registry_file(data.path());
    for (i, d) in devs.iter().enumerate() {
        reg.add(d.key.did(), &format!("p{i}"), None, 0).unwrap();
    }
    let (stop, stop_rx) = watch::channel(false);
    let pipeline = tokio::spawn(up::run(
        config(data.path(), broker.port, partitions),
        stop_rx,
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sim = SimConfig {
        mqtt: vitaltrail_mqtt::MqttEndpoint::plain("127.0.0.1", broker.port),
        rate: 25.0,
        duration: Duration::from_secs(4),
        attacks: vec![Attack::ForgedSignature, Attack::UnknownDevice],
        ack_timeout: Duration::from_secs(60),
        ..SimConfig::default()
    };
    let sim_task = tokio::spawn(async move {
        let report = publisher::run(&sim, &mut devs, Arc::new(SystemClock)).await;
        (report, devs)
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tokio::task::spawn_blocking(move || {
        broker.restart();
        broker
    })
    .await
    .map(|b| {
        let data = data.path().to_owned();
        async move {
            let (report, _devs) = sim_task.await.unwrap();
            let report = report.unwrap();
            common::wait_settled(&data, partitions, &report, Duration::from_secs(60)).await;
            stop.send(true).unwrap();
            pipeline.await.unwrap().unwrap();
            // A restart may redeliver readings already logged: they must
            // come back as `duplicate`, never be logged twice.
            common::check_outcome(&data, partitions, &report, true);
            drop(b);
        }
    })
    .unwrap()
    .await;
}
