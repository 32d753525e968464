//! The local ledger and v2 bundles through the CLI, as an operator meets
//! them: a ledger edited, cut, reordered or with a record deleted is
//! refused by `up` and by `anchor verify-ledger`; a reading not anchored
//! yet gets a `pending` bundle that `verify` answers with exit code 2.

use crate::common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use vitaltrail_core::SystemClock;
use vitaltrail_device_sim::physiology::Scenario;
use vitaltrail_device_sim::publisher::{self, SimConfig};

/// Run `up` with `extra` flags, 3 devices for 3 s, call `during` with the
/// DIDs while `up` still runs, then SIGTERM.
async fn run_up(data: &Path, extra: &[&str], during: impl FnOnce(&[String])) {
    let mut devs = publisher::devices(77, 3, &[Scenario::Steady]);
    let reg = vitaltrail_bus::datadir::registry_file(data);
    for (i, d) in devs.iter().enumerate() {
        reg.add(d.key.did(), &format!("patient-{i}"), None, 0)
            .unwrap();
    }
    let mqtt = common::free_addr();
    let mut args: Vec<String> = [
        "up",
        "--data",
        &data.display().to_string(),
        "--mqtt-listen",
        &mqtt.to_string(),
        "--metrics-listen",
        &common::free_addr().to_string(),
        "--checkpoint-interval-ms",
        "200",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut up = common::Proc::spawn(&args, data.join("up.log"));
    common::wait_port(mqtt.port());
    let sim = SimConfig {
        mqtt: vitaltrail_mqtt::MqttEndpoint::plain("127.0.0.1", mqtt.port()),
        device_tls: common::device_tls(data),
        client_id: "sim-cli".into(),
        rate: 5.0,
        duration: Duration::from_secs(3),
        ..SimConfig::default()
    };
    publisher::run(&sim, &mut devs, Arc::new(SystemClock))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let dids: Vec<String> = devs.iter().map(|d| d.key.did().to_string()).collect();
    during(&dids);
    let pid = up.child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(up.child.wait().unwrap().success());
}

fn vt(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vitaltrail"))
        .args(args)
        .output()
        .unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .args([
            "-a",
            &format!("{}/.", from.display()),
            &to.display().to_string(),
        ])
        .status()
        .unwrap();
    assert!(st.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tampered_ledger_is_refused_by_up_and_by_verify_ledger() {
    let data = tempfile::tempdir().unwrap();
    run_up(data.path(), &[], |_| {}).await;
    let d = data.path().display().to_string();
    let o = vt(&["anchor", "verify-ledger", "--data", &d]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ledger = data.path().join("anchor/ledger.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(&ledger)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(lines.len() >= 3, "{} ledger records", lines.len());
    let edit_root = |l: &str| {
        let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
        let r = v["record"].as_str().unwrap().to_owned();
        // Change one character of the signed root line.
        let at = r.find("\n\n").unwrap() - 30;
        let mut b = r.into_bytes();
        b[at] = if b[at] == b'A' { b'B' } else { b'A' };
        v["record"] = String::from_utf8(b).unwrap().into();
        v.to_string()
    };
    let mut cases: Vec<(&str, Vec<String>)> = vec![];
    let mut v = lines.clone();
    v[1] = edit_root(&v[1]);
    cases.push(("an edited record", v));
    let mut v = lines.clone();
    let last = v.len() - 1;
    v[last] = edit_root(&v[last]);
    cases.push(("an edited last record", v));
    let mut v = lines.clone();
    v.remove(1);
    cases.push(("a deleted record", v));
    let mut v = lines.clone();
    v.swap(0, 1);
    cases.push(("two records swapped", v));
    let mut v = lines.clone();
    v.pop();
    cases.push(("the last record cut off", v.clone()));
    cases.push(("the last record cut off, ledger.head deleted", v));
    for (what, v) in cases {
        let t = tempfile::tempdir().unwrap();
        copy_dir(data.path(), t.path());
        std::fs::write(t.path().join("anchor/ledger.jsonl"), v.join("\n") + "\n").unwrap();
        if what.contains("ledger.head deleted") {
            std::fs::remove_file(t.path().join("anchor/ledger.head")).unwrap();
        }
        let td = t.path().display().to_string();
        let o = vt(&["anchor", "verify-ledger", "--data", &td]);
        assert!(!o.status.success(), "verify-ledger passed {what}");
        let o = vt(&[
            "up",
            "--data",
            &td,
            "--mqtt-listen",
            &common::free_addr().to_string(),
            "--metrics-listen",
            &common::free_addr().to_string(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "up started on a ledger with {what}");
        assert!(err.contains("ledger"), "{what}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reading_not_yet_anchored_gets_a_pending_bundle_and_exit_code_2() {
    let data = tempfile::tempdir().unwrap();
    let d = data.path().display().to_string();
    let b = data.path().join("p.json");
    let bs = b.display().to_string();
    // Epochs every 10 minutes: the first closes with the first checkpoint,
    // so a reading 2 s into the run (seq 10 at 5/s) is checkpointed, not
    // anchored, until `up` stops.
    run_up(data.path(), &["--epoch-interval-ms", "600000"], |dids| {
        let o = vt(&[
            "prove", "--data", &d, "--device", &dids[0], "--seq", "10", "--out", &bs,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = std::fs::read_to_string(&b).unwrap();
        assert!(text.contains("\"status\": \"pending\""), "{text}");
        let o = vt(&["verify", &bs, "--data", &d]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(o.status.code(), Some(2), "{out}");
        assert!(
            out.contains("ok   inclusion") && out.contains("FAIL anchor: not anchored yet"),
            "{out}"
        );
        // With --rpc too: the chain check is not run for a pending bundle
        // (proof-bundle.md §2, check 12), so it is still exit 2, not 1.
        let o = vt(&["verify", &bs, "--data", &d, "--rpc", "http://127.0.0.1:9"]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(o.status.code(), Some(2), "{out}");
        assert!(!out.contains(" chain"), "{out}");
        // --wait gives up after --timeout with the pending bundle.
        let o = vt(&[
            "prove",
            "--data",
            &d,
            "--device",
            &dids[0],
            "--seq",
            "10",
            "--wait",
            "--timeout",
            "1",
        ]);
        assert!(o.status.success());
        assert!(String::from_utf8_lossy(&o.stderr).contains("not anchored within --timeout"));
    })
    .await;
    // Stopping closed a last epoch: now the same reading is anchored.
    let dids: Vec<String> = vitaltrail_bus::datadir::registry_file(data.path())
        .load()
        .unwrap()
        .devices()
        .map(|e| e.did.clone())
        .collect();
    let mut anchored = 0;
    for did in &dids {
        let o = vt(&[
            "prove", "--data", &d, "--device", did, "--seq", "10", "--out", &bs,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let o = vt(&["verify", &bs, "--data", &d]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stdout)
        );
        anchored += 1;
    }
    assert_eq!(anchored, 3);

    // Restarted with nothing new to anchor: the anchor's gauges say what
    // the epoch log holds at once (vitaltrail_anchor_partitions read 0
    // until an epoch closed), and the error counter is exported at 0
    // (it appeared only at the first error).
    let http = common::free_addr();
    let up = common::Proc::spawn(
        &[
            "up",
            "--data",
            &d,
            "--mqtt-listen",
            &common::free_addr().to_string(),
            "--metrics-listen",
            &http.to_string(),
            "--epoch-interval-ms",
            "600000",
        ]
        .map(str::to_owned),
        data.path().join("up2.log"),
    );
    common::wait_ready(http).await;
    let auth = format!("Bearer {}", common::token(data.path(), "metrics"));
    let (status, _, body) =
        common::http(http, "GET", "/metrics", &[("Authorization", &auth)], "").await;
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body);
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} not exported:\n{text}"))
    };
    assert_eq!(value("vitaltrail_anchor_partitions "), 1.0);
    assert_eq!(
        value("vitaltrail_anchor_errors_total{backend=\"ledger\"} "),
        0.0
    );
    drop(up);
}
