//! The alert stage over real partition logs on disk: it raises from
//! durable readings with their log positions, and a restart, or a crash
//! between writing events and saving its state, leaves each event once.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use vitaltrail_alerts::{AlertsConfig, StageConfig, stage};
use vitaltrail_core::{Measurement, MockClock, SecretKey, UnsignedReading, envelope, leaf};
use vitaltrail_log::DurableLog;

const T0: u64 = 1_700_000_000_000;

fn reading(key: &SecretKey, seq: u64, t: u64, m: &[(&str, f64, &str)]) -> Vec<u8> {
    let r = UnsignedReading {
        seq,
        time: t,
        measurements: m
            .iter()
            .map(|(c, v, u)| Measurement {
                code: (*c).into(),
                value: *v,
                unit: (*u).into(),
            })
            .collect(),
        meta: None,
    };
    leaf::encode(t + 5, &envelope::sign(key, &r).unwrap())
}

/// Append SpO2 readings at 5 s steps from `t`; returns the next seq.
fn append(data: &Path, key: &SecretKey, seq: u64, t: u64, spo2: &[f64]) -> u64 {
    let mut log = DurableLog::open(data.join("partitions/0")).unwrap();
    let leaves: Vec<Vec<u8>> = spo2
        .iter()
        .enumerate()
        .map(|(i, v)| {
            reading(
                key,
                seq + i as u64,
                t + i as u64 * 5_000,
                &[("2708-6", *v, "%"), ("8867-4", 80.0, "/min")],
            )
        })
        .collect();
    log.append_batch(&leaves).unwrap();
    seq + spo2.len() as u64
}

/// A stage over the logs of `data`: ticks every 20 ms, no device-silent
/// rule unless `alerts` sets one, no channels.
fn config(data: &Path, clock: Arc<MockClock>, alerts: AlertsConfig) -> StageConfig {
    StageConfig {
        alerts,
        source: vitaltrail_alerts::AlertsSource::Logs,
        data_dir: data.to_owned(),
        clock,
        metrics: prometheus::Registry::new(),
        mqtt: None,
        acks: None,
        wake: None,
    }
}

/// What [`config`] takes unless a test says otherwise.
fn quick() -> AlertsConfig {
    AlertsConfig {
        tick_ms: 20,
        silent_after_ms: None,
        ..Default::default()
    }
}

async fn run_once(data: &Path) {
    let cfg = config(data, Arc::new(MockClock::new(T0 + 60_000)), quick());
    let (tx, rx) = watch::channel(false);
    let h = tokio::spawn(stage::run(cfg, rx));
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.send(true).unwrap();
    h.await.unwrap().unwrap();
}

fn events(data: &Path) -> Vec<serde_json::Value> {
    stage::event_files(&stage::alerts_dir(data))
        .into_iter()
        .flat_map(|(_, f)| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn kinds(ev: &[serde_json::Value]) -> Vec<(String, String)> {
    ev.iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_owned(),
                e["alarm"]["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn raises_from_the_log_and_restarts_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let key = SecretKey::from_seed(&[7; 32]).unwrap();
    vitaltrail_bus::datadir::registry_file(data)
        .add(key.did(), "patient-1", Some("ward-3"), T0)
        .unwrap();
    // 35 s of SpO2 84 %: the 30 s rule fires on the 7th low reading (leaf
    // 7); NEWS2 (SpO2 scores 3) at once, on the first.
    let mut seq = append(data, &key, 1, T0, &[97.0]);
    seq = append(data, &key, seq, T0 + 5_000, &[84.0; 8]);
    run_once(data).await;
    let ev = events(data);
    let k = kinds(&ev);
    assert_eq!(k.len(), 2, "{ev:#?}");
    assert_eq!(k[0].0, "raised");
    assert!(k[0].1.starts_with("news2/patient-1/"), "{k:?}");
    assert!(k[1].1.starts_with("spo2-low/patient-1/"), "{k:?}");
    let spo2 = &ev[1]["alarm"];
    assert_eq!(spo2["ward"], "ward-3");
    let evidence = spo2["evidence"].as_array().unwrap();
    assert_eq!(evidence.len(), 7);
    assert_eq!(evidence[0]["log_index"], 1, "the first low reading's leaf");
    assert_eq!(evidence[6]["log_index"], 7);
    assert_eq!(evidence[6]["seq"], 8);
    assert_eq!(evidence[6]["device"], key.did().as_str());
    // A restart with nothing new writes nothing.
    run_once(data).await;
    assert_eq!(kinds(&events(data)), k);
    // A crash after the events were written but before the state was
    // saved: the older state comes back, and the events are not doubled.
    let state = stage::alerts_dir(data).join("state.json");
    let before = std::fs::read(&state).unwrap();
    append(data, &key, seq, T0 + 45_000, &[97.0; 20]);
    run_once(data).await;
    let after = kinds(&events(data));
    assert_eq!(after.len(), 4, "both cleared: {after:?}");
    assert_eq!(after[2].0, "cleared");
    std::fs::write(&state, before).unwrap();
    run_once(data).await;
    assert_eq!(kinds(&events(data)), after, "the same events, once each");
    // A lost state file: a rebuild from the logs, again the same events.
    std::fs::remove_file(&state).unwrap();
    run_once(data).await;
    assert_eq!(kinds(&events(data)), after);
    // A state whose engine section does not restore: a rebuild, not a
    // stage that fails (and takes `up` down with it).
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    v["engine"] = serde_json::json!({"active": []});
    std::fs::write(&state, serde_json::to_vec(&v).unwrap()).unwrap();
    run_once(data).await;
    assert_eq!(kinds(&events(data)), after);
    // The device reassigned to another patient: a rebuild does not move
    // the old patient's alarms to the new one.
    let reg = vitaltrail_bus::datadir::registry_file(data);
    reg.revoke(key.did(), T0 + 500_000).unwrap();
    reg.add(key.did(), "new-admission", Some("ward-9"), T0 + 600_000)
        .unwrap();
    std::fs::remove_file(&state).unwrap();
    run_once(data).await;
    assert!(events(data).is_empty(), "{:?}", kinds(&events(data)));
}

/// Poll `f` for up to 10 s.
async fn until(what: &str, f: impl Fn() -> bool) {
    for _ in 0..1000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

fn station(name: &str, ward: &str) -> vitaltrail_alerts::Actor {
    vitaltrail_alerts::Actor::Viewer {
        name: name.into(),
        wards: vec![ward.into()],
    }
}

#[tokio::test]
async fn an_acknowledgement_is_answered_once_durable_and_stops_escalation() {
    use vitaltrail_alerts::AckRefusal;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_owned();
    let key = SecretKey::from_seed(&[8; 32]).unwrap();
    vitaltrail_bus::datadir::registry_file(&data)
        .add(key.did(), "patient-1", Some("ward-3"), T0)
        .unwrap();
    append(&data, &key, 1, T0 + 5_000, &[84.0; 8]);
    let clock = Arc::new(MockClock::new(T0 + 60_000));
    let start = |clock: Arc<MockClock>| {
        let (handle, inbox) = vitaltrail_alerts::ack::inbox();
        let cfg = StageConfig {
            acks: Some(inbox),
            ..config(
                &data,
                clock,
                AlertsConfig {
                    escalate_after_ms: 120_000,
                    escalation: vec!["charge-nurse".into()],
                    ..quick()
                },
            )
        };
        let (tx, rx) = watch::channel(false);
        (handle, tx, tokio::spawn(stage::run(cfg, rx)))
    };
    let (handle, stop, task) = start(clock.clone());
    until("both alarms raised", || events(&data).len() == 2).await;
    let ev = kinds(&events(&data));
    let (news2, spo2) = (ev[0].1.clone(), ev[1].1.clone());
    assert!(news2.starts_with("news2/"), "{ev:?}");

    // Another ward's station, an unknown alarm, a nameless actor: refused,
    // and nothing written.
    assert_eq!(
        handle
            .acknowledge(&news2, station("ward-4-desk", "ward-4"))
            .await,
        Err(AckRefusal::Unknown(news2.clone()))
    );
    assert_eq!(
        handle
            .acknowledge("news2/patient-1/1-1", station("desk", "ward-3"))
            .await,
        Err(AckRefusal::Unknown("news2/patient-1/1-1".into()))
    );
    assert!(matches!(
        handle.acknowledge("", station("desk", "ward-3")).await,
        Err(AckRefusal::Invalid(_))
    ));
    assert_eq!(events(&data).len(), 2);

    // Taken: the answer comes once the event is in the events file.
    let ack = handle
        .acknowledge(&news2, station("ward-3-desk", "ward-3"))
        .await
        .unwrap();
    assert_eq!(ack.alarm.ack.as_ref().unwrap().by, "ward-3-desk");
    assert_eq!(ack.alarm.ack.as_ref().unwrap().at_ms, T0 + 60_000);
    let written = events(&data);
    assert_eq!(written.len(), 3, "durable before answered");
    assert_eq!(written[2]["kind"], "acknowledged");
    assert_eq!(written[2]["alarm"]["id"], news2.as_str());
    assert_eq!(written[2]["alarm"]["ack"]["via"], "viewer");

    // Past the escalation interval: only the unacknowledged alarm goes up.
    clock.set(T0 + 400_000);
    until("the escalation", || events(&data).len() == 4).await;
    let last = &events(&data)[3];
    assert_eq!(last["kind"], "escalated");
    assert_eq!(last["alarm"]["id"], spo2.as_str());

    // A restart keeps the acknowledgement.
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(
        handle
            .acknowledge(&spo2, station("ward-3-desk", "ward-3"))
            .await,
        Err(AckRefusal::Unavailable),
        "no engine running"
    );
    let (handle, stop, task) = start(clock.clone());
    match handle
        .acknowledge(
            &news2,
            vitaltrail_alerts::Actor::Operator { name: "kim".into() },
        )
        .await
    {
        Err(AckRefusal::AlreadyAcknowledged { by, .. }) => assert_eq!(by, "ward-3-desk"),
        other => panic!("{other:?}"),
    }
    // Cleared alarms are told apart from unknown ones.
    append(&data, &key, 9, T0 + 50_000, &[97.0; 20]);
    until("both cleared", || {
        kinds(&events(&data))
            .iter()
            .filter(|k| k.0 == "cleared")
            .count()
            == 2
    })
    .await;
    assert!(matches!(
        handle
            .acknowledge(&spo2, station("ward-3-desk", "ward-3"))
            .await,
        Err(AckRefusal::Cleared { .. })
    ));
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
}

/// A rebuild (or any backlog past one round) times silence by the log it
/// is catching up with, not by today's clock: a device that streamed
/// without a gap is never called silent in the middle of its history and
/// cleared a round later; once caught up, today's clock says it has been
/// silent since, once.
#[tokio::test]
async fn a_backlog_does_not_make_devices_flap_silent() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_owned();
    let key = SecretKey::from_seed(&[9; 32]).unwrap();
    vitaltrail_bus::datadir::registry_file(&data)
        .add(key.did(), "patient-1", Some("ward-3"), T0)
        .unwrap();
    // 5,000 readings 5 s apart: more than one round takes (4,096).
    append(&data, &key, 1, T0, &[97.0; 5_000]);
    let cfg = config(
        &data,
        // Ten hours after the first reading: the log ends 7 hours in.
        Arc::new(MockClock::new(T0 + 36_000_000)),
        AlertsConfig {
            silent_after_ms: Some(300_000),
            ..quick()
        },
    );
    let (tx, rx) = watch::channel(false);
    let h = tokio::spawn(stage::run(cfg, rx));
    until("the device called silent", || !events(&data).is_empty()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.send(true).unwrap();
    h.await.unwrap().unwrap();
    let k = kinds(&events(&data));
    assert_eq!(k.len(), 1, "{k:?}");
    assert_eq!(k[0].0, "raised");
    assert!(k[0].1.starts_with("device-silent/"), "{k:?}");
}

/// Rounds that raise nothing do not rewrite the state file (at most every
/// 5 s); a crash then re-reads their leaves from the log, and the events
/// come out once each, as if it had never happened.
#[tokio::test]
async fn quiet_rounds_do_not_rewrite_the_state_and_a_crash_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_owned();
    let key = SecretKey::from_seed(&[10; 32]).unwrap();
    vitaltrail_bus::datadir::registry_file(&data)
        .add(key.did(), "patient-1", Some("ward-3"), T0)
        .unwrap();
    let start = |registry: prometheus::Registry| {
        let cfg = StageConfig {
            metrics: registry,
            ..config(&data, Arc::new(MockClock::new(T0 + 60_000)), quick())
        };
        let (tx, rx) = watch::channel(false);
        (tx, tokio::spawn(stage::run(cfg, rx)))
    };
    let saves = |r: &prometheus::Registry| {
        r.gather()
            .iter()
            .find(|f| f.name() == "vitaltrail_alerts_state_saves_total")
            .map_or(0.0, |f| f.get_metric()[0].get_counter().get_value())
    };
    let mut seq = append(&data, &key, 1, T0, &[97.0; 4]);
    let reg = prometheus::Registry::new();
    let (_tx, task) = start(reg.clone());
    until("the first save", || saves(&reg) >= 1.0).await;
    // Steady readings, round after round: no alarm, no save.
    for i in 0..10u64 {
        seq = append(&data, &key, seq, T0 + 20_000 + i * 1_000, &[97.0]);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(saves(&reg), 1.0, "quiet rounds rewrote the state");
    // A crash (no last round, no save), then low SpO2 while it is down.
    task.abort();
    let _ = task.await;
    append(&data, &key, seq, T0 + 40_000, &[84.0; 8]);
    let reg = prometheus::Registry::new();
    let (tx, task) = start(reg.clone());
    until("both alarms", || events(&data).len() == 2).await;
    tx.send(true).unwrap();
    task.await.unwrap().unwrap();
    let k = kinds(&events(&data));
    assert_eq!(k.len(), 2, "each event once: {k:?}");
    // The evidence points at the right leaves, counted across the crash.
    let ev = events(&data);
    let spo2 = ev
        .iter()
        .find(|e| e["alarm"]["rule"] == "spo2-low")
        .unwrap();
    assert_eq!(spo2["alarm"]["evidence"][0]["log_index"], 14, "{spo2}");
}
