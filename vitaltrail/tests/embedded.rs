//! End to end on the embedded path: rumqttd, ingest, the in-process bus and
//! the attestor in one process; the simulator publishes a known set that
//! includes every attack. Afterwards every valid reading is in a log exactly
//! once, every bad one is in `rejected` with the right reason, and proofs for
//! a sample verify offline.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use vitaltrail::up::{self, UpConfig};
use vitaltrail_attestor::DurableLog;
use vitaltrail_attestor::pipeline::{AttestorConfig, read_checkpoints};
use vitaltrail_bus::deadletter::RejectLog;
use vitaltrail_core::{Checkpoint, LogPublicKey, ProofBundle, SystemClock, envelope, leaf, merkle};
use vitaltrail_device_sim::attacks::Attack;
use vitaltrail_device_sim::physiology::Scenario;
use vitaltrail_device_sim::publisher::{self, SimConfig};

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_pipeline_logs_valid_readings_once_and_rejects_every_attack() {
    let data = tempfile::tempdir().unwrap();
    let mqtt = free_addr();
    let partitions = 3;
    let cfg = UpConfig {
        data_dir: data.path().to_owned(),
        mqtt_listen: mqtt,
        partitions,
        metrics_listen: Some(free_addr()),
        attestor: AttestorConfig {
            checkpoint_interval: Duration::from_millis(100),
            ..AttestorConfig::default()
        },
        ..UpConfig::default()
    };
    let metrics_addr = cfg.metrics_listen.unwrap();

    // Register the simulated devices before they send.
    let scenarios = [
        Scenario::Steady,
        Scenario::Deterioration,
        Scenario::ClockSkew,
        Scenario::AcuteHypoxia,
        Scenario::SensorDropout,
    ];
    let mut devs = publisher::devices(7, 6, &scenarios);
    let reg = up::registry_file(data.path());
    for (i, d) in devs.iter().enumerate() {
        reg.add(d.key.did(), &format!("patient-{i}"), Some("ward-3"), 0)
            .unwrap();
    }

    let (stop, stop_rx) = watch::channel(false);
    let pipeline = tokio::spawn(up::run(cfg.clone(), stop_rx));
    up::wait_for_port(mqtt, Duration::from_secs(10))
        .await
        .unwrap();
    // Give ingest a moment to connect and subscribe.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let sim = SimConfig {
        mqtt_port: mqtt.port(),
        rate: 25.0,
        duration: Duration::from_secs(2),
        attacks: Attack::ALL.to_vec(),
        attack_count: 2,
        ..SimConfig::default()
    };
    let report = publisher::run(&sim, &mut devs, Arc::new(SystemClock))
        .await
        .unwrap();
    assert_eq!(report.acked, report.published);
    let expected_rejects: u64 = report.expected_rejects.values().sum();
    assert!(report.valid_count() > 150, "{report:?}");

    // Wait until every message has been durably decided.
    let deadline = Instant::now() + Duration::from_secs(30);
    let logged = |data: &std::path::Path| -> u64 {
        (0..partitions)
            .map(|p| {
                let dir = data.join("partitions").join(p.to_string());
                read_checkpoints(&dir).unwrap().last().map_or(0, |c| c.size)
            })
            .sum()
    };
    loop {
        let rejected = RejectLog::read_all(data.path().join("rejected.jsonl"))
            .unwrap()
            .len() as u64;
        if logged(data.path()) == report.valid_count() && rejected == expected_rejects {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out: logged {} of {}, rejected {rejected} of {expected_rejects}",
            logged(data.path()),
            report.valid_count()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // /metrics answers in the Prometheus text format.
    let body = http_get(metrics_addr, "/metrics").await;
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

    // Every rejection has the reason its attack calls for.
    let rejected = RejectLog::read_all(data.path().join("rejected.jsonl")).unwrap();
    let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
    for r in &rejected {
        *by_reason.entry(r.reason.clone()).or_default() += 1;
    }
    assert_eq!(by_reason, report.expected_rejects);

    // Every valid reading is logged exactly once; nothing else is.
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut sample = Vec::new();
    for p in 0..partitions {
        let dir = data.path().join("partitions").join(p.to_string());
        let log = DurableLog::open(&dir).unwrap();
        for i in 0..log.size() {
            let l = log.leaf(i).unwrap();
            let l = leaf::decode(&l).unwrap();
            let r = envelope::verify(l.envelope).unwrap();
            seen.entry(r.did.to_string()).or_default().push(r.seq);
            if i % 17 == 0 {
                sample.push((p, i));
            }
        }
    }
    for v in seen.values_mut() {
        let n = v.len();
        let set: BTreeSet<u64> = v.iter().copied().collect();
        assert_eq!(set.len(), n, "a reading was logged twice");
        v.sort();
    }
    assert_eq!(seen, report.valid);

    // Proofs for a sample verify offline against the signed checkpoints.
    assert!(sample.len() > 5);
    for (p, i) in sample {
        let dir = data.path().join("partitions").join(p.to_string());
        let vkey =
            LogPublicKey::parse(&std::fs::read_to_string(dir.join("log.vkey")).unwrap()).unwrap();
        let log = DurableLog::open(&dir).unwrap();
        let note = log.latest_checkpoint().unwrap().unwrap();
        let cp = Checkpoint::open(&note, &vkey).unwrap();
        let l = log.leaf(i).unwrap();
        let l = leaf::decode(&l).unwrap();
        let proof = log.prove_inclusion(cp.size, i).unwrap();
        let b = ProofBundle::new(l.envelope, l.log_time_ms, i, &proof, &note);
        let r = b.verify(&vkey, None);
        assert!(r.ok(), "{:?}", r.checks);
        // And each checkpoint chain is consistent.
        let cps = read_checkpoints(&dir).unwrap();
        for w in cps.windows(2) {
            let a = Checkpoint::open(&w[0].note, &vkey).unwrap();
            let b = Checkpoint::open(&w[1].note, &vkey).unwrap();
            let c = log.prove_consistency(a.size, b.size).unwrap();
            merkle::verify_consistency(a.size, b.size, &a.root, &b.root, &c).unwrap();
        }
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
