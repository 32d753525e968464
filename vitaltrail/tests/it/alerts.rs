//! Alerts end to end: `up` with its alert engine, and the simulator's
//! deterioration, hypoxia and steady patients. The alerts come from the
//! readings in the log, in order, with their log positions; the steady
//! patient raises none; and `vitaltrail query` reads them as the `alerts`
//! table.

use crate::common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use vitaltrail_attestor::pipeline::AttestorConfig;
use vitaltrail_core::SystemClock;
use vitaltrail_device_sim::physiology::Scenario;
use vitaltrail_device_sim::publisher::{self, SimConfig};
use vitaltrail_node::up::{self, UpConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deterioration_and_hypoxia_raise_alerts_in_order_and_steady_none() {
    let data = tempfile::tempdir().unwrap();
    let mqtt = common::free_addr();
    let cfg = UpConfig {
        data_dir: data.path().to_owned(),
        mqtt_listen: mqtt,
        metrics_listen: None,
        attestor: AttestorConfig {
            checkpoint_interval: Duration::from_millis(100),
            ..AttestorConfig::default()
        },
        ..UpConfig::default()
    };
    let scenarios = [
        Scenario::Steady,
        Scenario::Deterioration,
        Scenario::AcuteHypoxia,
        Scenario::Steady,
    ];
    let mut devs = publisher::devices(11, scenarios.len(), &scenarios);
    let reg = vitaltrail_bus::datadir::registry_file(data.path());
    let names = ["steady-a", "deteriorating", "hypoxic", "steady-b"];
    for (d, name) in devs.iter().zip(names) {
        reg.add(d.key.did(), name, Some("ward-3"), 0).unwrap();
    }
    let (stop, stop_rx) = watch::channel(false);
    let pipeline = tokio::spawn(up::run(cfg, stop_rx));
    vitaltrail_node::wait_for_port(mqtt, Duration::from_secs(10))
        .await
        .unwrap();
    let sim = SimConfig {
        mqtt: vitaltrail_mqtt::MqttEndpoint::plain("127.0.0.1", mqtt.port()),
        device_tls: common::device_tls(data.path()),
        rate: 10.0,
        duration: Duration::from_secs(8),
        receipts: true,
        ..SimConfig::default()
    };
    let report = publisher::run(&sim, &mut devs, Arc::new(SystemClock))
        .await
        .unwrap();
    assert!(report.valid_count() >= 250, "{report:?}");
    common::wait_settled(data.path(), 1, &report, Duration::from_secs(30)).await;
    // The engine takes the last committed leaves within a round or two.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.send(true).unwrap();
    pipeline.await.unwrap().unwrap();

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vitaltrail"))
        .args(["query", "--format", "json", "--data"])
        .arg(data.path())
        .arg(
            "SELECT kind, alarm_id, rule, subject, ward, severity, reason, evidence \
             FROM alerts ORDER BY at, alarm_id",
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .flat_map(
            |l| match serde_json::from_str::<serde_json::Value>(l).unwrap() {
                serde_json::Value::Array(a) => a,
                v => vec![v],
            },
        )
        .collect();
    let mut by: BTreeMap<String, Vec<&serde_json::Value>> = BTreeMap::new();
    for r in &rows {
        by.entry(r["subject"].as_str().unwrap().to_owned())
            .or_default()
            .push(r);
    }
    // The steady patients raise nothing.
    assert!(!by.contains_key("steady-a"), "{text}");
    assert!(!by.contains_key("steady-b"), "{text}");
    // Both ill patients: NEWS2 raised first (urgent or already emergency),
    // then, if it was urgent, updated to emergency; never raised twice.
    for p in ["deteriorating", "hypoxic"] {
        let news2: Vec<_> = by
            .get(p)
            .unwrap_or_else(|| panic!("no alert for {p}: {text}"))
            .iter()
            .filter(|r| r["rule"] == "news2")
            .collect();
        assert!(!news2.is_empty(), "{p}: {text}");
        assert_eq!(news2[0]["kind"], "raised", "{p}: {text}");
        assert_eq!(
            news2.iter().filter(|r| r["kind"] == "raised").count(),
            1,
            "{p} raised twice: {text}"
        );
        let last = news2.last().unwrap();
        assert_eq!(last["severity"], "emergency", "{p}: {text}");
        assert_eq!(last["ward"], "ward-3");
        // Each alert names readings in the log by device, seq and leaf.
        let ev: Vec<serde_json::Value> =
            serde_json::from_str(last["evidence"].as_str().unwrap()).unwrap();
        assert!(!ev.is_empty(), "{p}: {text}");
        let log = vitaltrail_attestor::DurableLog::open_read_only(data.path().join("partitions/0"))
            .unwrap();
        for e in ev {
            let i = e["log_index"].as_u64().unwrap();
            let leaf = log.leaf(i).unwrap();
            let l = vitaltrail_core::leaf::decode(&leaf).unwrap();
            let r = vitaltrail_core::envelope::verify(l.envelope).unwrap();
            assert_eq!(r.did.as_str(), e["device"].as_str().unwrap());
            assert_eq!(r.seq, e["seq"].as_u64().unwrap());
            let code = e["code"].as_str().unwrap();
            let m = r.measurements.iter().find(|m| m.code == code).unwrap();
            assert_eq!(m.value, e["value"].as_f64().unwrap());
        }
    }
}
