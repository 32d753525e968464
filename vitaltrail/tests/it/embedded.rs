//! End to end on the embedded path: rumqttd, ingest, the in-process bus and
//! the attestor in one process; the simulator publishes a known set that
//! includes every attack. Afterwards every valid reading is in a log exactly
//! once, every bad one is in `rejected` with the right reason, and proofs for
//! a sample verify offline.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use vitaltrail_attestor::pipeline::AttestorConfig;
use vitaltrail_core::SystemClock;
use vitaltrail_device_sim::attacks::Attack;
use vitaltrail_device_sim::physiology::Scenario;
use vitaltrail_device_sim::publisher::{self, SimConfig};
use vitaltrail_node::up::{self, UpConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_pipeline_logs_valid_readings_once_and_rejects_every_attack() {
    let data = tempfile::tempdir().unwrap();
    let mqtt = common::free_addr();
    let partitions = 3;
    let cfg = UpConfig {
        data_dir: data.path().to_owned(),
        mqtt_listen: mqtt,
        partitions,
        metrics_listen: Some(common::free_addr()),
        attestor: AttestorConfig {
            checkpoint_interval: Duration::from_millis(100),
            ..AttestorConfig::default()
        },
        ..UpConfig::default()
    };
    let metrics_addr = cfg.metrics_listen.unwrap();

    let scenarios = [
        Scenario::Steady,
        Scenario::Deterioration,
        Scenario::ClockSkew,
        Scenario::AcuteHypoxia,
        Scenario::SensorDropout,
    ];
    let mut devs = publisher::devices(7, 6, &scenarios);
    let reg = vitaltrail_bus::datadir::registry_file(data.path());
    for (i, d) in devs.iter().enumerate() {
        reg.add(d.key.did(), &format!("patient-{i}"), Some("ward-3"), 0)
            .unwrap();
    }

    let (stop, stop_rx) = watch::channel(false);
    let pipeline = tokio::spawn(up::run(cfg.clone(), stop_rx));
    vitaltrail_node::wait_for_port(mqtt, Duration::from_secs(10))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Devices that keep every reading until its receipt verifies against
    // the log keys.
    let log_keys = (0..partitions)
        .map(|p| {
            let k = data.path().join(format!("partitions/{p}/log.vkey"));
            vitaltrail_core::LogPublicKey::parse(std::fs::read_to_string(k).unwrap().trim())
                .unwrap()
        })
        .collect();
    let sim = SimConfig {
        mqtt: vitaltrail_mqtt::MqttEndpoint::plain("127.0.0.1", mqtt.port()),
        device_tls: common::device_tls(data.path()),
        rate: 25.0,
        duration: Duration::from_secs(2),
        attacks: Attack::ALL.to_vec(),
        attack_count: 2,
        receipts: true,
        log_keys,
        ..SimConfig::default()
    };
    let report = publisher::run(&sim, &mut devs, Arc::new(SystemClock))
        .await
        .unwrap();
    assert_eq!(report.acked, report.published);
    assert!(report.valid_count() > 150, "{report:?}");
    // With device TLS the simulator has no certificate for an unregistered
    // device, so the unknown-device attacks are counted as not sent, not
    // logged as noise (issue #18).
    assert_eq!(
        report.attacks_not_sent,
        std::collections::BTreeMap::from([("unknown_device".to_string(), 2)]),
        "{report:?}"
    );
    assert!(!report.expected_rejects.contains_key("unknown_device"));
    // Every valid reading has a receipt whose proof verified; the
    // clock-skewed device's readings were rejected by receipt.
    assert_eq!(report.receipted, report.valid_count(), "{report:?}");
    assert_eq!(report.receipts_verified, report.valid_count(), "{report:?}");
    assert_eq!(
        report.receipt_rejects.get("clock_skew"),
        report.expected_rejects.get("clock_skew"),
        "{report:?}"
    );
    common::wait_settled(data.path(), partitions, &report, Duration::from_secs(30)).await;

    let auth = format!("Bearer {}", common::token(data.path(), "metrics"));
    let (status, _, body) = common::http(
        metrics_addr,
        "GET",
        "/metrics",
        &[("Authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(status, 200);
    let body = String::from_utf8(body).unwrap();
    assert!(
        body.contains("vitaltrail_ingest_readings_in_total"),
        "{body}"
    );
    assert!(
        body.contains("vitaltrail_attestor_appended_total"),
        "{body}"
    );

    stop.send(true).unwrap();
    pipeline.await.unwrap().unwrap();
    // Rejections are resent a few times before a device believes them
    // (docs/receipts.md §4), so a rejected reading may be rejected again.
    common::check_outcome_with(data.path(), partitions, &report, common::Rejects::AtLeast);
}
