//! Receipts checked by an independent device: a Python client written
//! from docs/receipts.md alone (paho-mqtt, `cryptography`, `blake3`)
//! publishes envelopes to `vitaltrail up`, and verifies every receipt's
//! checkpoint signature and inclusion proof against the log key.

use crate::common;

use std::time::Duration;

use tokio::sync::watch;
use vitaltrail_attestor::pipeline::AttestorConfig;
use vitaltrail_core::SecretKey;
use vitaltrail_core::envelope::{Measurement, UnsignedReading, sign};
use vitaltrail_node::up::{self, UpConfig};

/// The flags that give the Python device its mutual-TLS files: the CA of
/// `up`'s data directory, a certificate for the key, and the key (PKCS#8).
fn device_files(data: &std::path::Path, key: &SecretKey) -> Vec<String> {
    let pki = vitaltrail_mqtt::Pki::open(data).unwrap();
    let dir = data.join("py-device");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cert.pem"), pki.issue_device(key.did()).unwrap()).unwrap();
    std::fs::write(dir.join("key.pem"), key.to_pkcs8_pem().unwrap().as_bytes()).unwrap();
    vec![
        format!("--ca={}", pki.path("server-ca.pem").display()),
        format!("--cert={}", dir.join("cert.pem").display()),
        format!("--key={}", dir.join("key.pem").display()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_independent_device_verifies_its_receipts() {
    let py = common::python();
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
    let key = SecretKey::from_seed(&[77; 32]).unwrap();
    vitaltrail_bus::datadir::registry_file(data.path())
        .add(key.did(), "interop-patient", None, 0)
        .unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let pipeline = tokio::spawn(up::run(cfg, stop_rx));
    vitaltrail_node::wait_for_port(mqtt, Duration::from_secs(10))
        .await
        .unwrap();
    let vkey = data.path().join("partitions/0/log.vkey");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !vkey.exists() {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let now = vitaltrail_core::Clock::now_ms(&vitaltrail_core::SystemClock);
    let mut files = Vec::new();
    for seq in 1..=20u64 {
        let env = sign(
            &key,
            &UnsignedReading {
                seq,
                time: now,
                measurements: vec![Measurement {
                    code: "8867-4".into(),
                    value: 60.0 + seq as f64,
                    unit: "/min".into(),
                }],
                meta: None,
            },
        )
        .unwrap();
        let p = data.path().join(format!("r{seq}.cose"));
        std::fs::write(&p, env).unwrap();
        files.push(p);
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/receipt_device.py"
    );
    let did = key.did().to_string();
    let out = tokio::task::spawn_blocking({
        let (py, vkey, files) = (py.clone(), vkey.clone(), files.clone());
        let port = mqtt.port().to_string();
        let tls = device_files(data.path(), &key);
        move || {
            std::process::Command::new(py)
                .arg(script)
                .args(["127.0.0.1", &port, &did])
                .arg(&vkey)
                .args(&files)
                .args(["--junk", "--resend-first"])
                .args(tls)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Every reading verified by the independent client, the resend as a
    // duplicate of the original, and the junk rejected with its reason.
    assert_eq!(v["verified"], 21, "{v}");
    assert_eq!(v["duplicates"], 1, "{v}");
    assert_eq!(v["bad"], 0, "{v}");
    assert_eq!(v["unreceipted"], 0, "{v}");
    let rejected: u64 = v["rejected"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(rejected, 1, "{v}");
    stop.send(true).unwrap();
    pipeline.await.unwrap().unwrap();
}
