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

/// Every alarm event of the events files, with its key, in file order.
fn written_events(data: &std::path::Path) -> Vec<(String, vitaltrail_alerts::Event)> {
    let dir = vitaltrail_alerts::stage::alerts_dir(data);
    let mut out = Vec::new();
    for (_, f) in vitaltrail_alerts::stage::event_files(&dir) {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        // A line still being written has no newline yet.
        for l in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
            let e: vitaltrail_alerts::Event = serde_json::from_str(l).unwrap();
            out.push((vitaltrail_alerts::fhir::event_key(&e), e));
        }
    }
    out
}

/// Start a nurse station (`nurse_station.py` with `args`, `listen` mode,
/// writing to `got`) and wait until the broker granted its subscription.
async fn start_station(mut args: Vec<String>, got: &std::path::Path) -> common::KillOnDrop {
    args.push(got.display().to_string());
    let listener = common::KillOnDrop(
        std::process::Command::new(common::python())
            .args(args)
            .spawn()
            .unwrap(),
    );
    let ready = got.with_extension("jsonl.ready");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !ready.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the nurse station did not subscribe"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    listener
}

/// The messages a nurse station wrote to `got`.
fn station_messages(got: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(got)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Wait (30 s at most, `running` checked each time) until the station
/// writing to `got` has every event the engine wrote for ward 3, and ward
/// 7 has raised something (else the ward filter is untested); the
/// station's messages then.
async fn until_ward_3_delivered(
    data: &std::path::Path,
    got: &std::path::Path,
    mut running: impl FnMut(),
) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        running();
        let written = written_events(data);
        let rx = station_messages(got);
        let keys: Vec<String> = rx
            .iter()
            .map(|m| {
                vitaltrail_alerts::fhir::event_key(
                    &serde_json::from_value(m["event"].clone()).unwrap(),
                )
            })
            .collect();
        let ours: Vec<&String> = written
            .iter()
            .filter(|(_, e)| e.alarm.ward.as_deref() == Some("ward-3"))
            .map(|(k, _)| k)
            .collect();
        if !ours.is_empty() && ours.iter().all(|k| keys.contains(k)) {
            assert!(
                written
                    .iter()
                    .any(|(_, e)| e.alarm.ward.as_deref() == Some("ward-7")),
                "ward 7 raised nothing: the filter is untested"
            );
            return rx;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ward-3 events not received: {ours:?} vs {keys:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the receiver took (`took: true` lines), in arrival order, and the
/// count of each kind of refusal.
fn received(out: &std::path::Path) -> (Vec<serde_json::Value>, BTreeMap<String, usize>) {
    let mut took = Vec::new();
    let mut refused = BTreeMap::new();
    for l in std::fs::read_to_string(out).unwrap_or_default().lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        if v["took"] == true {
            took.push(v);
        } else {
            *refused
                .entry(v["why"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    (took, refused)
}

/// Webhooks end to end, with `up` as its own process killed (-9) while it
/// retries: an independent receiver (Python standard library, from
/// docs/alerts.md) that checks every signature, and refuses every attempt
/// while it is "down", gets every event of its ward at least once, as a
/// FHIR Communication, in order per alarm, and none of another ward.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhooks_deliver_every_event_in_order_through_refusals_and_kill_9() {
    use std::time::Instant;
    let data = tempfile::tempdir().unwrap();
    let secret = data.path().join("hook.secret");
    std::fs::write(&secret, "a shared secret of the ward-3 EHR\n").unwrap();
    let out = data.path().join("received.jsonl");
    let port_file = data.path().join("hook.port");
    // The receiver is down until this file goes.
    let closed = data.path().join("hook.closed");
    std::fs::write(&closed, "").unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/webhook_receiver.py"
    );
    let receiver = common::KillOnDrop(
        std::process::Command::new(common::python())
            .arg(script)
            .arg(&secret)
            .arg(&out)
            .arg(&port_file)
            .arg(&closed)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !port_file.exists() {
        assert!(Instant::now() < deadline, "the receiver did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let port = std::fs::read_to_string(&port_file).unwrap();
    let conf = data.path().join("vitaltrail.toml");
    std::fs::write(
        &conf,
        format!(
            "[[alerts.webhooks]]\nname = \"ehr\"\nurl = \"http://127.0.0.1:{port}/fhir/hook?token=not-logged\"\n\
             wards = [\"ward-3\"]\nsecret_file = \"{}\"\nfirst_backoff_ms = 300\nmax_backoff_ms = 1000\n",
            secret.display()
        ),
    )
    .unwrap();
    let scenarios = [
        Scenario::Deterioration,
        Scenario::AcuteHypoxia,
        Scenario::Deterioration,
        Scenario::Steady,
    ];
    let mut devs = publisher::devices(21, scenarios.len(), &scenarios);
    let reg = vitaltrail_bus::datadir::registry_file(data.path());
    let wards = ["ward-3", "ward-3", "ward-7", "ward-3"];
    for (i, (d, w)) in devs.iter().zip(wards).enumerate() {
        // A patient ID that is not ASCII travels in the signed body as is,
        // and percent-encoded in the Idempotency-Key header.
        let name = if i == 1 {
            "Ünal Öztürk-1".to_owned()
        } else {
            format!("patient-{i}")
        };
        reg.add(d.key.did(), &name, Some(w), 0).unwrap();
    }
    let mqtt = common::free_addr();
    let args: Vec<String> = vec![
        "up".into(),
        "--config".into(),
        conf.display().to_string(),
        "--data".into(),
        data.path().display().to_string(),
        "--mqtt-listen".into(),
        mqtt.to_string(),
        "--metrics-listen".into(),
        common::free_addr().to_string(),
        "--checkpoint-interval-ms".into(),
        "200".into(),
    ];
    // A proxy in the environment must not carry the alerts (in the clear,
    // to whoever runs it): nothing listens there, so a proxied POST fails.
    let proxy = "http://127.0.0.1:9";
    let mut up = common::Proc::spawn_env(
        &args,
        data.path().join("up.log"),
        &[
            ("HTTP_PROXY", proxy),
            ("http_proxy", proxy),
            ("ALL_PROXY", proxy),
            ("HTTPS_PROXY", proxy),
        ],
    );
    common::wait_port(mqtt.port());
    let sim = SimConfig {
        mqtt: vitaltrail_mqtt::MqttEndpoint::plain("127.0.0.1", mqtt.port()),
        device_tls: common::device_tls(data.path()),
        client_id: "sim-hooks".into(),
        rate: 10.0,
        duration: Duration::from_secs(10),
        ..SimConfig::default()
    };
    publisher::run(&sim, &mut devs, Arc::new(SystemClock))
        .await
        .unwrap();
    let refused = |_: ()| received(&out).1.get("refused").copied().unwrap_or(0);
    let wait = |what: &'static str, f: &dyn Fn() -> bool, up: &mut common::Proc| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !f() {
            up.assert_running();
            assert!(
                Instant::now() < deadline,
                "{what}: {}",
                std::fs::read_to_string(data.path().join("up.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // Killed while it retries, twice.
    wait(
        "the receiver refused nothing",
        &|| refused(()) >= 3,
        &mut up,
    );
    up.crash_and_restart();
    common::wait_port(mqtt.port());
    let before = refused(());
    wait(
        "no retry after the restart",
        &|| refused(()) > before,
        &mut up,
    );
    up.crash_and_restart();
    common::wait_port(mqtt.port());
    // The receiver is back: killed again once deliveries have begun.
    std::fs::remove_file(&closed).unwrap();
    wait(
        "nothing delivered",
        &|| !received(&out).0.is_empty(),
        &mut up,
    );
    up.crash_and_restart();
    common::wait_port(mqtt.port());
    // Everything of ward 3 the engine wrote arrives.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        up.assert_running();
        let written = written_events(data.path());
        let (took, _) = received(&out);
        let keys: std::collections::BTreeSet<&str> =
            took.iter().map(|t| t["key"].as_str().unwrap()).collect();
        let missing: Vec<&String> = written
            .iter()
            .filter(|(_, e)| e.alarm.ward.as_deref() == Some("ward-3"))
            .map(|(k, _)| k)
            .filter(|k| !keys.contains(k.as_str()))
            .collect();
        if missing.is_empty() && !written.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not delivered: {missing:?}\n{}",
            std::fs::read_to_string(data.path().join("up.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = up.child.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(up.child.wait().unwrap().success());
    drop(receiver);

    let written = written_events(data.path());
    let (took, refused) = received(&out);
    eprintln!(
        "{} events written, {} requests taken, {refused:?}",
        written.len(),
        took.len()
    );
    assert!(
        refused.get("refused").copied().unwrap_or(0) >= 4,
        "{refused:?}"
    );
    assert_eq!(refused.len(), 1, "bad signatures or bodies: {refused:?}");
    // Ward 7's patient raised alarms; none went to ward 3's receiver.
    assert!(
        written
            .iter()
            .any(|(_, e)| e.alarm.ward.as_deref() == Some("ward-7")),
        "the ward-7 patient raised nothing: the filter is untested"
    );
    let ours: Vec<&(String, vitaltrail_alerts::Event)> = written
        .iter()
        .filter(|(_, e)| e.alarm.ward.as_deref() == Some("ward-3"))
        .collect();
    for t in &took {
        let key = t["key"].as_str().unwrap();
        let (_, e) = ours
            .iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("{key} is not a ward-3 event"));
        // The body is the event's Communication.
        assert_eq!(t["body"], vitaltrail_alerts::fhir::communication(e));
    }
    // In order per alarm: first arrivals follow the events file.
    let mut first: Vec<&str> = Vec::new();
    for t in &took {
        let k = t["key"].as_str().unwrap();
        if !first.contains(&k) {
            first.push(k);
        }
    }
    let mut alarms: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (k, e) in &ours {
        alarms.entry(e.alarm.id.as_str()).or_default().push(k);
    }
    for (alarm, keys) in alarms {
        let arrived: Vec<&str> = first.iter().copied().filter(|k| keys.contains(k)).collect();
        assert_eq!(arrived, keys, "{alarm}: out of order");
    }
    // The URL's token is never logged.
    let log = std::fs::read_to_string(data.path().join("up.log")).unwrap();
    assert!(!log.contains("not-logged"), "{log}");
}

/// A nurse station (paho-mqtt, with the certificate `vitaltrail viewers
/// add` issued) subscribed to `alerts/ward-3` gets every event of ward 3
/// the engine committed, and nothing of ward 7; it may not subscribe to
/// another ward or a wildcard, nor publish; once a new certificate is
/// issued for its name, the old one is disconnected within seconds and
/// refused; revoked, the new one is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nurse_station_gets_its_wards_alerts_over_mqtt_and_nothing_else() {
    use std::time::Instant;
    let data = tempfile::tempdir().unwrap();
    let scenarios = [
        Scenario::Deterioration,
        Scenario::AcuteHypoxia,
        Scenario::Deterioration,
    ];
    let mut devs = publisher::devices(31, scenarios.len(), &scenarios);
    let reg = vitaltrail_bus::datadir::registry_file(data.path());
    for (i, (d, w)) in devs.iter().zip(["ward-3", "ward-3", "ward-7"]).enumerate() {
        reg.add(d.key.did(), &format!("patient-{i}"), Some(w), 0)
            .unwrap();
    }
    let mqtt = common::free_addr();
    let http = common::free_addr();
    let args: Vec<String> = vec![
        "up".into(),
        "--data".into(),
        data.path().display().to_string(),
        "--mqtt-listen".into(),
        mqtt.to_string(),
        "--metrics-listen".into(),
        http.to_string(),
    ];
    let mut up = common::Proc::spawn(&args, data.path().join("up.log"));
    common::wait_port(mqtt.port());
    let station = data.path().join("station");
    let d = data.path().to_str().unwrap();
    common::vt(&[
        "viewers",
        "add",
        "nurse-3",
        "--ward",
        "ward-3",
        "--out",
        station.to_str().unwrap(),
        "--data",
        d,
    ]);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/nurse_station.py"
    );
    let port = mqtt.port().to_string();
    let base = |mode: &str, topic: &str| -> Vec<String> {
        vec![
            script.into(),
            "127.0.0.1".into(),
            port.clone(),
            station.join("server-ca.pem").display().to_string(),
            station.join("nurse-3.pem").display().to_string(),
            station.join("nurse-3.key").display().to_string(),
            mode.into(),
            topic.into(),
        ]
    };
    let attempt = |mode: &str, topic: &str| -> serde_json::Value {
        let o = std::process::Command::new(common::python())
            .args(base(mode, topic))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    // Outside its wards: the gate closes the connection.
    for (mode, topic) in [
        ("try-subscribe", "alerts/ward-7"),
        ("try-subscribe", "alerts/#"),
        ("try-subscribe", "vitals/#"),
        ("try-publish", "alerts/ward-3"),
    ] {
        let r = attempt(mode, topic);
        assert_eq!(r["connected"], true, "{mode} {topic}: {r}");
        assert_eq!(r["closed"], true, "{mode} {topic}: {r}");
        assert!(r["granted"].is_null(), "{mode} {topic}: {r}");
    }
    let got = data.path().join("station.jsonl");
    let listener = start_station(base("listen", "alerts/ward-3"), &got).await;
    let sim = SimConfig {
        mqtt: vitaltrail_mqtt::MqttEndpoint::plain("127.0.0.1", mqtt.port()),
        device_tls: common::device_tls(data.path()),
        client_id: "sim-station".into(),
        rate: 10.0,
        duration: Duration::from_secs(10),
        ..SimConfig::default()
    };
    publisher::run(&sim, &mut devs, Arc::new(SystemClock))
        .await
        .unwrap();
    let received = |_: ()| station_messages(&got);
    for m in &until_ward_3_delivered(data.path(), &got, || up.assert_running()).await {
        assert_eq!(m["topic"], "alerts/ward-3");
        assert_eq!(m["event"]["alarm"]["ward"], "ward-3");
    }
    // Acknowledgement (urllib): the station's token names who; the body
    // does not.
    let active = |ward: &str| -> String {
        let w = written_events(data.path());
        w.iter()
            .map(|(_, e)| e)
            .find(|e| {
                e.alarm.ward.as_deref() == Some(ward)
                    && e.alarm.severity != vitaltrail_alerts::Severity::Warning
                    && !w.iter().any(|(_, l)| {
                        l.alarm.id == e.alarm.id
                            && matches!(
                                l.kind,
                                vitaltrail_alerts::EventKind::Cleared
                                    | vitaltrail_alerts::EventKind::Acknowledged
                            )
                    })
            })
            .map(|e| e.alarm.id.clone())
            .unwrap_or_else(|| panic!("no active alarm on {ward}: {w:#?}"))
    };
    let (ours, theirs) = (active("ward-3"), active("ward-7"));
    let token = station.join("nurse-3.token");
    let base_url = format!("http://{http}");
    let ack = |id: &str, token: &std::path::Path, body: &str, origin: &str| -> serde_json::Value {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/ack_client.py");
        let mut a = vec![
            script.to_owned(),
            base_url.clone(),
            id.to_owned(),
            token.display().to_string(),
            body.to_owned(),
        ];
        if !origin.is_empty() {
            a.push(origin.to_owned());
        }
        let o = std::process::Command::new(common::python())
            .args(&a)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let none = std::path::Path::new("-");
    let r = ack(&ours, none, "", "");
    assert_eq!(r["status"], 401, "no token: {r}");
    let r = ack(&ours, &token, "", "http://evil.example");
    assert_eq!(r["status"], 403, "another origin: {r}");
    let r = ack(&theirs, &token, "", "");
    let unknown = ack("news2/nobody/1-1", &token, "", "");
    assert_eq!(r["status"], 404, "another ward's alarm: {r}");
    assert_eq!(unknown["status"], 404, "{unknown}");
    assert_eq!(
        r["body"]["error"].as_str().unwrap().replace(&theirs, "X"),
        unknown["body"]["error"]
            .as_str()
            .unwrap()
            .replace("news2/nobody/1-1", "X"),
        "another ward's alarm reads as none"
    );
    let r = ack(&format!("raw:{ours}"), &token, r#"{"as":"mallory"}"#, "");
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["body"]["kind"], "acknowledged");
    assert_eq!(r["body"]["alarm"]["id"], ours.as_str());
    assert_eq!(
        r["body"]["alarm"]["ack"]["by"], "nurse-3",
        "from the token: {r}"
    );
    assert_eq!(r["body"]["alarm"]["ack"]["via"], "viewer");
    let r = ack(&ours, &token, "", "");
    assert_eq!(r["status"], 409, "twice: {r}");
    assert_eq!(r["body"]["code"], "already-acknowledged", "{r}");
    assert_eq!(r["body"]["by"], "nurse-3", "{r}");
    // It is delivered: the station hears its own acknowledgement.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !received(())
        .iter()
        .any(|m| m["event"]["kind"] == "acknowledged" && m["event"]["alarm"]["id"] == ours.as_str())
    {
        assert!(
            Instant::now() < deadline,
            "the acknowledgement was not delivered on alerts/ward-3"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The operator, on a charge nurse's behalf, any ward.
    let cli = |id: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vitaltrail"))
            .args([
                "alerts",
                "ack",
                id,
                "--as",
                "charge.nurse",
                "--server",
                &base_url,
                "--data",
                d,
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let o = cli(&theirs);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&theirs) && out.contains("by charge.nurse"),
        "{out}"
    );
    let o = cli(&theirs);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("409"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let acked: Vec<_> = written_events(data.path())
        .into_iter()
        .filter(|(_, e)| e.kind == vitaltrail_alerts::EventKind::Acknowledged)
        .map(|(_, e)| (e.alarm.id, e.alarm.ack.unwrap()))
        .collect();
    assert_eq!(acked.len(), 2, "{acked:?}");
    assert_eq!(acked[0].0, ours);
    assert_eq!(acked[1].0, theirs);
    assert_eq!(acked[1].1.by, "charge.nurse");
    assert_eq!(
        acked[1].1.via,
        Some(vitaltrail_alerts::ack::AckVia::Operator)
    );

    // A new certificate for the name (a stolen station replaced): the
    // connected station with the old one is cut off, and no longer let in.
    assert!(!data.path().join("station.jsonl.closed").exists());
    let replaced = data.path().join("station-2");
    common::vt(&[
        "viewers",
        "add",
        "nurse-3",
        "--ward",
        "ward-3",
        "--out",
        replaced.to_str().unwrap(),
        "--data",
        d,
    ]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !data.path().join("station.jsonl.closed").exists() {
        assert!(
            Instant::now() < deadline,
            "a station with a replaced certificate stayed connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(listener);
    let r = attempt("try-subscribe", "alerts/ward-3");
    assert_eq!(r["connected"], false, "the old certificate: {r}");
    let r = ack(&ours, &token, "", "");
    assert_eq!(r["status"], 401, "the old token: {r}");
    let with_new = |mode: &str| -> serde_json::Value {
        let mut a = base(mode, "alerts/ward-3");
        a[3] = replaced.join("server-ca.pem").display().to_string();
        a[4] = replaced.join("nurse-3.pem").display().to_string();
        a[5] = replaced.join("nurse-3.key").display().to_string();
        let o = std::process::Command::new(common::python())
            .args(a)
            .output()
            .unwrap();
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let r = with_new("try-subscribe");
    assert_eq!(
        r["granted"],
        serde_json::json!([1]),
        "the new certificate: {r}"
    );
    let new_token = replaced.join("nurse-3.token");
    let r = ack(&ours, &new_token, "", "");
    assert_eq!(r["status"], 409, "the new token is the station's: {r}");
    // Revoked: no longer let in.
    common::vt(&["viewers", "revoke", "nurse-3", "--data", d]);
    let r = with_new("try-subscribe");
    assert_eq!(r["connected"], false, "{r}");
    let r = ack(&ours, &new_token, "", "");
    assert_eq!(r["status"], 401, "revoked: {r}");
}

/// On a real Mosquitto configured by `vitaltrail mqtt mosquitto`: the
/// engine publishes each ward's events to `alerts/<ward>` as the pipeline,
/// a nurse station (paho-mqtt, the certificate `viewers add` issued) gets
/// every event of its ward and nothing of another although it subscribes
/// to `alerts/#` (Mosquitto's ACL filters each message; publishing is
/// refused by the same ACL, unit-tested in `mqtt/src/mosquitto.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nurse_station_on_mosquitto_gets_its_wards_alerts_and_nothing_else() {
    use vitaltrail_mqtt::{MqttEndpoint, Pki};
    let data = tempfile::tempdir().unwrap();
    let d = data.path().to_str().unwrap().to_owned();
    let pki = Pki::load_or_create(data.path(), &[]).unwrap();
    let scenarios = [Scenario::Deterioration, Scenario::AcuteHypoxia];
    let mut devs = publisher::devices(51, scenarios.len(), &scenarios);
    let reg = vitaltrail_bus::datadir::registry_file(data.path());
    for (i, (dv, w)) in devs.iter().zip(["ward-3", "ward-7"]).enumerate() {
        reg.add(dv.key.did(), &format!("patient-{i}"), Some(w), 0)
            .unwrap();
    }
    let station = data.path().join("station");
    common::vt(&[
        "viewers",
        "add",
        "nurse-3",
        "--ward",
        "ward-3",
        "--out",
        station.to_str().unwrap(),
        "--data",
        &d,
    ]);
    let (_broker, dev_port, _pipe, cfg) = common::configured_mosquitto(data.path());
    let acl = std::fs::read_to_string(data.path().join("mosquitto/acl")).unwrap();
    assert!(acl.contains("topic read alerts/ward-3"), "{acl}");
    let (stop, stop_rx) = watch::channel(false);
    let mut pipeline = tokio::spawn(up::run(cfg, stop_rx));
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/nurse_station.py"
    );
    let port = dev_port.to_string();
    let base = |mode: &str, topic: &str| -> Vec<String> {
        vec![
            script.into(),
            "127.0.0.1".into(),
            port.clone(),
            pki.path("server-ca.pem").display().to_string(),
            station.join("nurse-3.pem").display().to_string(),
            station.join("nurse-3.key").display().to_string(),
            mode.into(),
            topic.into(),
        ]
    };
    // Mosquitto 2.0 grants any subscription and applies its ACL to each
    // message: the station subscribes to every alert topic, and only its
    // ward's reach it.
    let got = data.path().join("station.jsonl");
    let _listener = start_station(base("listen", "alerts/#"), &got).await;
    let sim = SimConfig {
        mqtt: MqttEndpoint::plain("127.0.0.1", dev_port),
        device_tls: common::device_tls(data.path()),
        client_id: "sim-mosquitto-station".into(),
        rate: 10.0,
        duration: Duration::from_secs(10),
        ..SimConfig::default()
    };
    publisher::run(&sim, &mut devs, Arc::new(SystemClock))
        .await
        .unwrap();
    until_ward_3_delivered(data.path(), &got, || {
        assert!(!pipeline.is_finished(), "up stopped")
    })
    .await;
    // Time for ward 7's events (written before or after ward 3's last) to
    // reach the station too, if the ACL let them: none may have.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rx = std::fs::read_to_string(&got).unwrap();
    assert!(!rx.is_empty());
    for l in rx.lines() {
        let m: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(m["topic"], "alerts/ward-3", "{m}");
        assert_eq!(m["event"]["alarm"]["ward"], "ward-3", "{m}");
    }
    stop.send(true).unwrap();
    (&mut pipeline).await.unwrap().unwrap();
}
