//! The distributed path on real servers started here on 127.0.0.1: Mosquitto,
//! the nisshi Kafka-protocol broker, two `vitaltrail ingest` processes sharing
//! one MQTT subscription, and a `vitaltrail attest` process, each its own OS
//! process. Then the same with kill -9 of ingest and attestor at random
//! points while the simulator runs.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{Mosquitto, Nisshi, Proc, Rejects, vt};
use vitaltrail_core::SystemClock;
use vitaltrail_device_sim::attacks::Attack;
use vitaltrail_device_sim::physiology::Scenario;
use vitaltrail_device_sim::publisher::{self, SimConfig, SimDevice};
use vitaltrail_node::up;

const PARTITIONS: u32 = 2;

struct Cluster {
    mqtt: Mosquitto,
    kafka: Nisshi,
    ingest: Vec<Proc>,
    attest: Proc,
    /// `vitaltrail anchor`, from vitals.checkpoints (it shares the data
    /// directory, so it finds the partitions' log keys there).
    anchor: Proc,
}

fn start(data: &Path, persistent_kafka: bool) -> Cluster {
    let mqtt = Mosquitto::start(false);
    let kafka = Nisshi::start(persistent_kafka);
    let s = |x: &str| x.to_owned();
    let ingest = (0..2)
        .map(|i| {
            Proc::spawn(
                &[
                    s("ingest"),
                    s("--kafka"),
                    kafka.brokers(),
                    s("--mqtt"),
                    format!("127.0.0.1:{}", mqtt.port),
                    s("--client-id"),
                    format!("ingest-{i}"),
                    s("--data"),
                    data.display().to_string(),
                    s("--topic-partitions"),
                    PARTITIONS.to_string(),
                ],
                data.join(format!("ingest-{i}.log")),
            )
        })
        .collect();
    let attest = Proc::spawn(
        &[
            s("attest"),
            s("--kafka"),
            kafka.brokers(),
            // Receipts go to the same broker the devices use.
            s("--mqtt"),
            format!("127.0.0.1:{}", mqtt.port),
            s("--partitions"),
            s("0,1"),
            s("--topic-partitions"),
            PARTITIONS.to_string(),
            s("--data"),
            data.display().to_string(),
            s("--checkpoint-interval-ms"),
            s("100"),
        ],
        data.join("attest.log"),
    );
    let anchor = Proc::spawn(
        &[
            s("anchor"),
            s("--kafka"),
            kafka.brokers(),
            s("--data"),
            data.display().to_string(),
            s("--epoch-interval-ms"),
            s("200"),
        ],
        data.join("anchor.log"),
    );
    Cluster {
        mqtt,
        kafka,
        ingest,
        attest,
        anchor,
    }
}

fn register(data: &Path, devs: &[SimDevice]) {
    let reg = vitaltrail_bus::datadir::registry_file(data);
    for (i, d) in devs.iter().enumerate() {
        reg.add(d.key.did(), &format!("p{i}"), None, 0).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_ingest_processes_and_an_attestor_over_kafka() {
    let data = tempfile::tempdir().unwrap();
    let mut devs = publisher::devices(
        21,
        6,
        &[
            Scenario::Steady,
            Scenario::Bradyarrhythmia,
            Scenario::ClockSkew,
        ],
    );
    register(data.path(), &devs);
    let mut c = start(data.path(), false);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for p in c.ingest.iter_mut().chain([&mut c.attest]) {
        p.assert_running();
    }
    let sim = SimConfig {
        mqtt: vitaltrail_mqtt::MqttEndpoint::plain("127.0.0.1", c.mqtt.port),
        rate: 20.0,
        duration: Duration::from_secs(3),
        attacks: Attack::ALL.to_vec(),
        attack_count: 2,
        ..SimConfig::default()
    };
    let mut report = publisher::run(&sim, &mut devs, Arc::new(SystemClock))
        .await
        .unwrap();
    common::wait_settled(data.path(), PARTITIONS, &report, Duration::from_secs(60)).await;

    // An outsider who can produce to Kafka: a validly signed reading of a
    // registered device, straight to vitals.verified without the bus MAC,
    // and one with the right MAC under another device's key. Neither may
    // reach the log.
    use vitaltrail_bus::Producer as _;
    let env = |seq: u64| {
        vitaltrail_core::envelope::sign(
            &devs[0].key,
            &vitaltrail_core::UnsignedReading {
                seq,
                time: vitaltrail_core::Clock::now_ms(&SystemClock),
                measurements: vec![vitaltrail_core::Measurement {
                    code: "8867-4".into(),
                    value: 250.0,
                    unit: "/min".into(),
                }],
                meta: None,
            },
        )
        .unwrap()
    };
    let kcfg = |bus_key| vitaltrail_bus::kafka::KafkaConfig {
        brokers: c.kafka.brokers(),
        bus_key,
        ..Default::default()
    };
    let outsider = vitaltrail_bus::kafka::KafkaProducer::new(&kcfg(None)).unwrap();
    outsider
        .send(vitaltrail_bus::Record {
            key: devs[0].key.did().to_string(),
            payload: env(1_000_000),
            received_ms: vitaltrail_core::Clock::now_ms(&SystemClock),
        })
        .await
        .unwrap();
    // A key no DID has (a topic with wildcards): rejected, and the receipt
    // publisher must not stumble over it.
    outsider
        .send(vitaltrail_bus::Record {
            key: "vitals/#".into(),
            payload: env(1_000_002),
            received_ms: 0,
        })
        .await
        .unwrap();
    let key =
        vitaltrail_bus::datadir::load_bus_key(&vitaltrail_bus::datadir::bus_key_path(data.path()))
            .unwrap();
    let insider = vitaltrail_bus::kafka::KafkaProducer::new(&kcfg(Some(key))).unwrap();
    insider
        .send(vitaltrail_bus::Record {
            key: devs[1].key.did().to_string(),
            payload: env(1_000_001),
            received_ms: vitaltrail_core::Clock::now_ms(&SystemClock),
        })
        .await
        .unwrap();
    report
        .expected_rejects
        .insert("unauthenticated_record".into(), 2);
    report.expected_rejects.insert("key_mismatch".into(), 1);
    common::wait_settled(data.path(), PARTITIONS, &report, Duration::from_secs(60)).await;
    for p in c.ingest.iter_mut().chain([&mut c.attest, &mut c.anchor]) {
        p.assert_running();
    }
    // The distributed anchor, from vitals.checkpoints: every partition's
    // latest checkpoint in an epoch, and the readings provable to it.
    common::wait_anchored(data.path(), Duration::from_secs(60)).await;
    // Beside the running stages (a killed one's state needs its next start
    // to recover before it can be read).
    common::check_anchoring(data.path(), 10);
    drop(c);
    common::check_outcome(data.path(), PARTITIONS, &report, false);
    common::check_tables(data.path(), &report).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_ingest_and_attestor_loses_and_duplicates_nothing() {
    let data = tempfile::tempdir().unwrap();
    let mut devs = publisher::devices(22, 6, &[Scenario::Steady, Scenario::Deterioration]);
    register(data.path(), &devs);
    let mut c = start(data.path(), false);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sim = SimConfig {
        mqtt: vitaltrail_mqtt::MqttEndpoint::plain("127.0.0.1", c.mqtt.port),
        rate: 20.0,
        duration: Duration::from_secs(8),
        attacks: Attack::ALL.to_vec(),
        attack_count: 2,
        ack_timeout: Duration::from_secs(60),
        ..SimConfig::default()
    };
    let sim_task =
        tokio::spawn(async move { publisher::run(&sim, &mut devs, Arc::new(SystemClock)).await });
    // kill -9 a random stage every 300-900 ms while the simulator runs.
    let mut rng = 0x2545f4914f6cdd1du64;
    let mut kills = 0;
    while !sim_task.is_finished() {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(Duration::from_millis(300 + rng % 600)).await;
        match rng % 4 {
            0 => c.attest.crash_and_restart(),
            3 => c.anchor.crash_and_restart(),
            n => c.ingest[(n - 1) as usize].crash_and_restart(),
        }
        kills += 1;
    }
    let report = sim_task.await.unwrap().unwrap();
    assert!(kills >= 6, "only {kills} kills");
    common::wait_settled(data.path(), PARTITIONS, &report, Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    common::wait_anchored(data.path(), Duration::from_secs(60)).await;
    // …and anchored: kills of the anchor and the attestor lost no epoch
    // and doubled none (checked beside the running stages).
    common::check_anchoring(data.path(), 10);
    drop(c);
    common::check_outcome_with(data.path(), PARTITIONS, &report, Rejects::AtLeast);
    // …and in the tables: every reading's rows once, none missing.
    common::check_tables(data.path(), &report).await;
    eprintln!(
        "{kills} kills; {} readings logged exactly once, in the log and in the tables",
        report.valid_count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_is_lost_when_the_kafka_broker_restarts() {
    let data = tempfile::tempdir().unwrap();
    let mut devs = publisher::devices(23, 4, &[Scenario::Steady, Scenario::AcuteHypoxia]);
    register(data.path(), &devs);
    let mut c = start(data.path(), true);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sim = SimConfig {
        mqtt: vitaltrail_mqtt::MqttEndpoint::plain("127.0.0.1", c.mqtt.port),
        rate: 20.0,
        duration: Duration::from_secs(5),
        attacks: vec![Attack::ForgedSignature, Attack::Replay],
        ack_timeout: Duration::from_secs(60),
        ..SimConfig::default()
    };
    let sim_task =
        tokio::spawn(async move { publisher::run(&sim, &mut devs, Arc::new(SystemClock)).await });
    tokio::time::sleep(Duration::from_millis(2000)).await;
    tokio::task::block_in_place(|| c.kafka.restart());
    let report = sim_task.await.unwrap().unwrap();
    common::wait_settled(data.path(), PARTITIONS, &report, Duration::from_secs(90)).await;
    for p in c.ingest.iter_mut().chain([&mut c.attest]) {
        p.assert_running();
    }
    drop(c);
    common::check_outcome_with(data.path(), PARTITIONS, &report, Rejects::AtLeast);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn up_with_kafka_runs_the_same_stages_in_one_process() {
    let kafka = Nisshi::start(false);
    let data = tempfile::tempdir().unwrap();
    let mut devs = publisher::devices(24, 4, &[Scenario::Steady, Scenario::ClockSkew]);
    register(data.path(), &devs);
    let mqtt = common::free_addr();
    let cfg = up::UpConfig {
        data_dir: data.path().to_owned(),
        mqtt_listen: mqtt,
        partitions: PARTITIONS,
        metrics_listen: None,
        attestor: vitaltrail_attestor::pipeline::AttestorConfig {
            checkpoint_interval: Duration::from_millis(100),
            ..Default::default()
        },
        ..up::UpConfig::default()
    }
    .over_kafka(&kafka.brokers())
    .unwrap();
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let pipeline = tokio::spawn(up::run(cfg, stop_rx));
    vitaltrail_node::wait_for_port(mqtt, Duration::from_secs(10))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sim = SimConfig {
        device_tls: common::device_tls(data.path()),
        mqtt: vitaltrail_mqtt::MqttEndpoint::plain("127.0.0.1", mqtt.port()),
        rate: 20.0,
        duration: Duration::from_secs(2),
        attacks: Attack::ALL.to_vec(),
        ..SimConfig::default()
    };
    let report = publisher::run(&sim, &mut devs, Arc::new(SystemClock))
        .await
        .unwrap();
    common::wait_settled(data.path(), PARTITIONS, &report, Duration::from_secs(60)).await;
    stop.send(true).unwrap();
    pipeline.await.unwrap().unwrap();
    common::check_outcome(data.path(), PARTITIONS, &report, false);
    common::check_tables(data.path(), &report).await;
}

/// The registry reaches every ingest and the attestor only through the
/// compacted `vitals.devices` topic (their data directories hold no
/// registry file), before they start and while they run; a revocation from
/// an operator directory that never saw the device reaches them too; and
/// every checkpoint is on `vitals.checkpoints`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registry_and_checkpoints_travel_over_kafka() {
    let mqtt = Mosquitto::start(false);
    let kafka = Nisshi::start(false);
    let brokers = kafka.brokers();
    let dirs: Vec<tempfile::TempDir> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let (op, op2, att) = (dirs[0].path(), dirs[1].path(), dirs[2].path());
    let mut devs = publisher::devices(31, 3, &[Scenario::Steady]);
    let did = |i: usize| devs[i].key.did().to_string();
    let (a, b, c) = (did(0), did(1), did(2));
    // A is registered before any stage runs.
    vt(&[
        "devices",
        "add",
        &a,
        "--patient",
        "pt-a",
        "--data",
        op.to_str().unwrap(),
        "--kafka",
        &brokers,
    ]);

    // The operator key that signed it; the stages trust it by its DID, and
    // a second operator directory holds the same key.
    let op_key = op.join("keys/operator.pem");
    let operator =
        vitaltrail_core::SecretKey::from_pkcs8_pem(&std::fs::read_to_string(&op_key).unwrap())
            .unwrap()
            .did()
            .to_string();
    std::fs::create_dir_all(op2.join("keys")).unwrap();
    std::fs::copy(&op_key, op2.join("keys/operator.pem")).unwrap();
    // One bus key for every stage (their data directories differ).
    let bus_key = op.join("keys/bus.key").display().to_string();

    let s = |x: &str| x.to_owned();
    let mut procs: Vec<Proc> = (0..2)
        .map(|i| {
            let d = dirs[3 + i].path();
            Proc::spawn(
                &[
                    s("ingest"),
                    s("--kafka"),
                    brokers.clone(),
                    s("--mqtt"),
                    format!("127.0.0.1:{}", mqtt.port),
                    s("--client-id"),
                    format!("ingest-{i}"),
                    s("--data"),
                    d.display().to_string(),
                    s("--topic-partitions"),
                    PARTITIONS.to_string(),
                    s("--operator"),
                    operator.clone(),
                    s("--bus-key"),
                    bus_key.clone(),
                ],
                d.join("ingest.log"),
            )
        })
        .collect();
    procs.push(Proc::spawn(
        &[
            s("attest"),
            s("--kafka"),
            brokers.clone(),
            s("--partitions"),
            s("0,1"),
            s("--topic-partitions"),
            PARTITIONS.to_string(),
            s("--data"),
            att.display().to_string(),
            s("--checkpoint-interval-ms"),
            s("100"),
            s("--operator"),
            operator.clone(),
            s("--bus-key"),
            bus_key.clone(),
        ],
        att.join("attest.log"),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    // B is registered while they run.
    vt(&[
        "devices",
        "add",
        &b,
        "--patient",
        "pt-b",
        "--data",
        op.to_str().unwrap(),
        "--kafka",
        &brokers,
    ]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for p in &mut procs {
        p.assert_running();
    }

    let sim = SimConfig {
        mqtt: vitaltrail_mqtt::MqttEndpoint::plain("127.0.0.1", mqtt.port),
        rate: 20.0,
        duration: Duration::from_secs(2),
        ..SimConfig::default()
    };
    let mut report = publisher::run(&sim, &mut devs, Arc::new(SystemClock))
        .await
        .unwrap();
    // C was never registered.
    let c_sent = report.valid.remove(&c).unwrap().len() as u64;
    report
        .expected_rejects
        .insert("unknown_device".into(), c_sent);
    common::wait_settled(att, PARTITIONS, &report, Duration::from_secs(60)).await;

    // Revoked from a directory that never knew A: taken from the topic.
    vt(&[
        "devices",
        "revoke",
        &a,
        "--data",
        op2.to_str().unwrap(),
        "--kafka",
        &brokers,
    ]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut only_a = vec![devs.remove(0)];
    let later = publisher::run(&sim, &mut only_a, Arc::new(SystemClock))
        .await
        .unwrap();
    let a_later = later.valid[&a].len() as u64;
    report
        .expected_rejects
        .insert("revoked_device".into(), a_later);
    common::wait_settled(att, PARTITIONS, &report, Duration::from_secs(60)).await;
    for p in &mut procs {
        p.assert_running();
    }
    drop(procs);
    common::check_outcome(att, PARTITIONS, &report, false);

    // The attestor took the patients from the topic too.
    let patients = vt(&[
        "query",
        "SELECT DISTINCT patient FROM readings ORDER BY patient",
        "--data",
        att.to_str().unwrap(),
        "--format",
        "csv",
    ]);
    assert_eq!(
        patients.lines().skip(1).collect::<Vec<_>>(),
        ["pt-a", "pt-b"],
        "{patients}"
    );

    // Every checkpoint of each partition is on vitals.checkpoints, in order.
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    let cfg = vitaltrail_bus::kafka::KafkaConfig {
        brokers: brokers.clone(),
        ..Default::default()
    };
    vitaltrail_bus::kafka::follow_topic(
        &cfg,
        vitaltrail_bus::kafka::CHECKPOINTS_TOPIC,
        move |_, v| {
            let cp: vitaltrail_attestor::pipeline::PublishedCheckpoint =
                serde_json::from_slice(v.unwrap()).unwrap();
            g.lock().unwrap().push(cp);
        },
    )
    .await
    .unwrap()
    .abort();
    let got = got.lock().unwrap().clone();
    let mut checked = 0;
    for p in 0..PARTITIONS {
        let dir = att.join("partitions").join(p.to_string());
        let local: Vec<(u64, String)> = vitaltrail_attestor::pipeline::read_checkpoints(&dir)
            .unwrap()
            .into_iter()
            .map(|c| (c.size, c.note))
            .collect();
        let published: Vec<(u64, String)> = got
            .iter()
            .filter(|c| c.partition == p)
            .map(|c| (c.size, c.note.clone()))
            .collect();
        assert_eq!(published, local, "partition {p}");
        checked += local.len();
    }
    assert!(checked > 0, "no checkpoints at all");
}

/// An attestor whose partitions leave part of `vitals.verified` unowned
/// refuses to start, unless told other attestors own the rest; the
/// in-process partitioner is librdkafka's, so a device lands in the same
/// partition on both buses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_coverage_and_partitioning_match_kafka() {
    let kafka = Nisshi::start(false);
    let data = tempfile::tempdir().unwrap();
    let d = data.path().to_str().unwrap().to_owned();
    let b = kafka.brokers();
    let args = |extra: &[&str]| {
        let mut a = vec![
            "attest",
            "--kafka",
            &b,
            "--partitions",
            "0",
            "--topic-partitions",
            "2",
            "--data",
            &d,
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_vitaltrail"))
        .args(args(&[]))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("nobody would log partitions [1]"), "{err}");
    let mut partial = Proc::spawn(&args(&["--partial"]), data.path().join("attest.log"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    partial.assert_running();
    drop(partial);

    // `up --kafka` whose attestor cannot start (partitions 2 and 3 do not
    // exist) stops with that error at once, instead of running on, ready,
    // without a log.
    let up_data = tempfile::tempdir().unwrap();
    let mut up = std::process::Command::new(env!("CARGO_BIN_EXE_vitaltrail"))
        .args([
            "up",
            "--kafka",
            &b,
            "--partitions",
            "4",
            "--data",
            up_data.path().to_str().unwrap(),
            "--mqtt-listen",
            &common::free_addr().to_string(),
            "--metrics-listen",
            &common::free_addr().to_string(),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = up.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = up.kill();
            let _ = up.wait();
            panic!("up --kafka kept running without its attestor");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut up.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("does not exist"), "{err}");

    // librdkafka's own partitioner puts each device where ours does.
    use vitaltrail_bus::Producer as _;
    let p = vitaltrail_bus::kafka::KafkaProducer::new(&vitaltrail_bus::kafka::KafkaConfig {
        brokers: b.clone(),
        ..Default::default()
    })
    .unwrap();
    for dev in publisher::devices(40, 24, &[Scenario::Steady]) {
        let key = dev.key.did().to_string();
        let out = p
            .send(vitaltrail_bus::Record {
                key: key.clone(),
                payload: b"x".to_vec(),
                received_ms: 0,
            })
            .await
            .unwrap();
        assert_eq!(
            out,
            vitaltrail_bus::Outcome::Accepted {
                partition: vitaltrail_bus::partition_for(&key, 2)
            },
            "{key}"
        );
    }
}

fn s_(x: &str) -> String {
    x.to_owned()
}

/// The events an alert engine's data directory holds, in order.
/// Every record of the topic `alerts`: (record key, value, event-key
/// header, signature header), in each partition's order.
fn alerts_topic(brokers: &str) -> Vec<(String, Vec<u8>, String, String)> {
    use rdkafka::Message as _;
    use rdkafka::consumer::Consumer as _;
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "alerts-topic-check")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset("alerts", p as i32, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let mut idle = 0;
    while idle < 5 {
        match consumer.poll(Duration::from_millis(300)) {
            Some(Ok(m)) => {
                idle = 0;
                let header = |name: &str| {
                    use rdkafka::message::Headers as _;
                    m.headers()
                        .and_then(|h| h.iter().find(|x| x.key == name))
                        .and_then(|x| x.value)
                        .map(|v| String::from_utf8(v.to_vec()).unwrap())
                        .unwrap_or_default()
                };
                out.push((
                    String::from_utf8(m.key().unwrap_or_default().to_vec()).unwrap(),
                    m.payload().unwrap_or_default().to_vec(),
                    header("vt-event-key"),
                    header("vt-signature"),
                ));
            }
            Some(Err(e)) => panic!("reading the alerts topic: {e}"),
            None => idle += 1,
        }
    }
    out
}

fn engine_events(dir: &Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for (_, f) in vitaltrail_alerts::stage::event_files(&dir.join("alerts")) {
        let text = std::fs::read_to_string(f).unwrap();
        out.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()),
        );
    }
    out
}

/// `vitaltrail alerts` as two processes over `vitals.logged`, each owning
/// one of its partitions and holding only the exported vitals.logged key,
/// on their own machines' directories (no partition log there): each ill
/// patient is alerted by exactly the engine owning the patient's
/// partition, with evidence naming the leaves in the attestor's logs; an
/// engine killed -9 and restarted mid-stream raises nothing twice; and
/// announcements forged without the key (a steady patient's device
/// "reporting" SpO2 70 %) raise nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn alert_engines_split_vitals_logged_and_survive_kill_9() {
    const TOPIC_SECRET: &str = "the alerts topic's consumers' key";
    let data = tempfile::tempdir().unwrap();
    let scenarios = [
        Scenario::Steady,
        Scenario::Deterioration,
        Scenario::AcuteHypoxia,
        Scenario::Steady,
    ];
    // One ill patient in each vitals.logged partition, so each engine has
    // one to alert on.
    let name_in = |stem: &str, p: u32| {
        (0..)
            .map(|i| format!("{stem}-{i}"))
            .find(|n| vitaltrail_bus::partition_for(n, PARTITIONS) == p)
            .unwrap()
    };
    let (det, hyp) = (name_in("deteriorating", 0), name_in("hypoxic", 1));
    let names = [s_("steady-a"), det.clone(), hyp.clone(), s_("steady-b")];
    let mut devs = publisher::devices(25, scenarios.len(), &scenarios);
    let hyp_did = devs[2].key.did().as_str().to_owned();
    let reg = vitaltrail_bus::datadir::registry_file(data.path());
    for (d, name) in devs.iter().zip(&names) {
        reg.add(d.key.did(), name, Some("ward-3"), 0).unwrap();
    }
    let steady_key = devs[0].key.clone();
    let mut c = start(data.path(), false);
    let s = |x: &str| x.to_owned();
    // The stages create the bus key as they start.
    let bus_key_file = vitaltrail_bus::datadir::bus_key_path(data.path());
    for _ in 0..100 {
        if std::fs::read_to_string(&bus_key_file).is_ok_and(|t| t.trim().len() == 64) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Two engine machines: a registry copy and the exported key, no bus key.
    let engines: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let https: Vec<std::net::SocketAddr> = (0..2).map(|_| common::free_addr()).collect();
    let mut procs: Vec<Proc> = engines
        .iter()
        .enumerate()
        .map(|(i, dir)| {
            std::fs::copy(
                data.path().join("devices.json"),
                dir.path().join("devices.json"),
            )
            .unwrap();
            let key = dir.path().join("logged.key");
            let conf = dir.path().join("engine.toml");
            std::fs::write(dir.path().join("alerts-topic.secret"), TOPIC_SECRET).unwrap();
            std::fs::write(
                &conf,
                format!(
                    "[alerts.kafka_topic]\nenabled = true\nsecret_file = \"{}\"\n",
                    dir.path().join("alerts-topic.secret").display()
                ),
            )
            .unwrap();
            vt(&[
                "alerts",
                "export-key",
                "--data",
                data.path().to_str().unwrap(),
                "--out",
                key.to_str().unwrap(),
            ]);
            Proc::spawn(
                &[
                    s("alerts"),
                    s("--config"),
                    conf.display().to_string(),
                    s("--kafka"),
                    c.kafka.brokers(),
                    s("--partitions"),
                    i.to_string(),
                    s("--partial"),
                    s("--data"),
                    dir.path().display().to_string(),
                    s("--logged-key-file"),
                    key.display().to_string(),
                    s("--metrics-listen"),
                    https[i].to_string(),
                ],
                dir.path().join("alerts.log"),
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sim = SimConfig {
        mqtt: vitaltrail_mqtt::MqttEndpoint::plain("127.0.0.1", c.mqtt.port),
        rate: 10.0,
        duration: Duration::from_secs(8),
        ack_timeout: Duration::from_secs(60),
        ..SimConfig::default()
    };
    let sim_task =
        tokio::spawn(async move { publisher::run(&sim, &mut devs, Arc::new(SystemClock)).await });
    // Forged announcements: a steady patient's device at SpO2 70 %, under
    // a key derived from some other bus key, on both partitions.
    let forger = vitaltrail_bus::kafka::KafkaProducer::new(&vitaltrail_bus::kafka::KafkaConfig {
        brokers: c.kafka.brokers(),
        ..Default::default()
    })
    .unwrap();
    let wrong = vitaltrail_core::busauth::BusKey::generate(&mut rand::rngs::OsRng).logged_key();
    let now = vitaltrail_core::Clock::now_ms(&SystemClock);
    let forged: Vec<vitaltrail_bus::logged::LoggedLeaf> = (0..40u64)
        .map(|i| {
            let env = vitaltrail_core::envelope::sign(
                &steady_key,
                &vitaltrail_core::UnsignedReading {
                    seq: 1_000_000 + i,
                    time: now + i * 100,
                    measurements: vec![vitaltrail_core::Measurement {
                        code: "2708-6".into(),
                        value: 70.0,
                        unit: "%".into(),
                    }],
                    meta: None,
                },
            )
            .unwrap();
            vitaltrail_bus::logged::LoggedLeaf {
                partition: (i % 2) as u32,
                index: 1_000_000 + i,
                key: if i % 2 == 0 { s("steady-a") } else { s("x") },
                leaf: vitaltrail_core::leaf::encode(now + i * 100, &env),
            }
        })
        .collect();
    forger.send_logged(&wrong, &forged).await.unwrap();
    // kill -9 each engine once mid-stream, and the attestor between them.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    procs[0].crash_and_restart();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    c.attest.crash_and_restart();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    procs[1].crash_and_restart();
    let report = sim_task.await.unwrap().unwrap();
    common::wait_settled(data.path(), PARTITIONS, &report, Duration::from_secs(90)).await;
    // Both ill patients reach emergency (in whichever engine).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let emergency = |evs: &[serde_json::Value], p: &str| {
        evs.iter().any(|e| {
            e["alarm"]["subject"] == p
                && e["alarm"]["rule"] == "news2"
                && e["alarm"]["severity"] == "emergency"
        })
    };
    loop {
        let all: Vec<serde_json::Value> = engines
            .iter()
            .flat_map(|d| engine_events(d.path()))
            .collect();
        if emergency(&all, &det) && emergency(&all, &hyp) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no emergency for both ill patients within 60 s: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Acknowledged at the engine holding the alarm (the operator's token
    // of that engine's machine); the other engine does not hold it.
    let evs0 = engine_events(engines[0].path());
    let held = evs0
        .iter()
        .find(|e| {
            e["kind"] == "raised"
                && e["alarm"]["subject"] == det.as_str()
                && !evs0
                    .iter()
                    .any(|c| c["kind"] == "cleared" && c["alarm"]["id"] == e["alarm"]["id"])
        })
        .expect("engine 0 holds the deteriorating patient's active alarm");
    let id = held["alarm"]["id"].as_str().unwrap().to_owned();
    for h in &https {
        common::wait_port(h.port());
    }
    let ack = |engine: usize| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vitaltrail"))
            .args([
                "alerts",
                "ack",
                &id,
                "--as",
                "nurse.kim",
                "--server",
                &format!("http://{}", https[engine]),
                "--data",
                engines[engine].path().to_str().unwrap(),
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let o = ack(1);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("404"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = ack(0);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        engine_events(engines[0].path())
            .iter()
            .any(|e| e["kind"] == "acknowledged" && e["alarm"]["id"] == id.as_str()),
        "answered before it was written"
    );
    // Genuine announcements of the hypoxic patient's low-SpO2 readings,
    // copied (MAC and all) into the other engine's partition: dropped
    // there as misplaced, so that engine never alerts on the patient.
    {
        use rdkafka::message::{Header, OwnedHeaders};
        let bus_key = vitaltrail_bus::datadir::load_bus_key(&bus_key_file).unwrap();
        let lk = bus_key.logged_key();
        let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", c.kafka.brokers())
            .create()
            .unwrap();
        let mut copied = 0;
        for p in 0..PARTITIONS {
            let log = vitaltrail_attestor::DurableLog::open_read_only(
                data.path().join(format!("partitions/{p}")),
            )
            .unwrap();
            for n in 0..log.size() {
                let leaf = log.leaf(n).unwrap();
                let r = vitaltrail_core::envelope::verify(
                    vitaltrail_core::leaf::decode(&leaf).unwrap().envelope,
                )
                .unwrap();
                let low = r
                    .measurements
                    .iter()
                    .any(|m| m.code == "2708-6" && m.value <= 91.0);
                if r.did.as_str() != hyp_did || !low {
                    continue;
                }
                let mut pos = [0u8; 12];
                pos[..4].copy_from_slice(&p.to_be_bytes());
                pos[4..].copy_from_slice(&n.to_be_bytes());
                let mac = lk.mac(&hyp, p, n, &leaf);
                let headers = OwnedHeaders::new()
                    .insert(Header {
                        key: "vt-log",
                        value: Some(&pos[..]),
                    })
                    .insert(Header {
                        key: "vt-mac",
                        value: Some(&mac[..]),
                    });
                producer
                    .send(
                        rdkafka::producer::FutureRecord::to("vitals.logged")
                            .partition(0)
                            .key(&hyp)
                            .payload(&leaf)
                            .headers(headers),
                        Duration::from_secs(10),
                    )
                    .await
                    .unwrap();
                copied += 1;
            }
        }
        assert!(copied >= 5, "only {copied} low-SpO2 leaves to copy");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for p in procs.iter_mut() {
        p.assert_running();
    }
    // Every event of both engines reaches the topic alerts, keyed by its
    // patient, byte for byte, signed; in order per alarm.
    let secret = vitaltrail_alerts::webhook::Secret::from_bytes(TOPIC_SECRET.as_bytes());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let lines: Vec<Vec<u8>> = engines
            .iter()
            .flat_map(|d| {
                vitaltrail_alerts::stage::event_files(&d.path().join("alerts"))
                    .into_iter()
                    .flat_map(|(_, f)| {
                        std::fs::read(f)
                            .unwrap()
                            .split(|b| *b == b'\n')
                            .filter(|l| !l.is_empty())
                            .map(<[u8]>::to_vec)
                            .collect::<Vec<_>>()
                    })
            })
            .collect();
        let records = alerts_topic(&c.kafka.brokers());
        let missing = lines
            .iter()
            .filter(|l| !records.iter().any(|r| &r.1 == *l))
            .count();
        if missing == 0 && !lines.is_empty() {
            let mut first: Vec<&str> = Vec::new();
            for (key, value, event_key, sig) in &records {
                let e: vitaltrail_alerts::Event = serde_json::from_slice(value).unwrap();
                assert_eq!(key, &e.alarm.subject, "keyed by patient");
                assert_eq!(event_key, &vitaltrail_alerts::fhir::event_key(&e));
                assert_eq!(sig, &secret.sign(value), "signature of {event_key}");
                if !first.contains(&event_key.as_str()) {
                    first.push(event_key);
                }
            }
            for l in &lines {
                let e: vitaltrail_alerts::Event = serde_json::from_slice(l).unwrap();
                let ours: Vec<String> = lines
                    .iter()
                    .map(|l| serde_json::from_slice::<vitaltrail_alerts::Event>(l).unwrap())
                    .filter(|x| x.alarm.id == e.alarm.id)
                    .map(|x| vitaltrail_alerts::fhir::event_key(&x))
                    .collect();
                let arrived: Vec<&str> = first
                    .iter()
                    .copied()
                    .filter(|k| ours.iter().any(|o| o == k))
                    .collect();
                assert_eq!(arrived, ours, "{}: out of order", e.alarm.id);
            }
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{missing} of {} events not on the topic alerts",
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(procs);
    for (i, dir) in engines.iter().enumerate() {
        let evs = engine_events(dir.path());
        // Each event once (an event's identity: its alarm, kind and time).
        let mut seen = std::collections::BTreeSet::new();
        for e in &evs {
            let id = (
                e["alarm"]["id"].to_string(),
                e["kind"].to_string(),
                e["at_ms"].to_string(),
            );
            assert!(seen.insert(id), "engine {i}: event twice: {e}");
        }
        for e in &evs {
            let subject = e["alarm"]["subject"].as_str().unwrap();
            assert!(
                !subject.starts_with("steady"),
                "engine {i}: alert for a steady patient (a forged announcement?): {e}"
            );
            // Only the engine owning the patient's partition alerts on it (the
            // copies in partition 0 of the patient of partition 1 included).
            assert_eq!(
                vitaltrail_bus::partition_for(subject, PARTITIONS),
                i as u32,
                "engine {i} alerted on {subject}: {e}"
            );
            assert_eq!(e["alarm"]["ward"], "ward-3");
        }
        assert!(
            evs.iter().any(|e| e["alarm"]["rule"] == "news2"),
            "engine {i} raised no NEWS2 alarm for the ill patient it owns"
        );
        // One NEWS2 episode per patient: a restart raised none again.
        let mut raised: BTreeMap<&str, usize> = BTreeMap::new();
        for e in evs
            .iter()
            .filter(|e| e["kind"] == "raised" && e["alarm"]["rule"] == "news2")
        {
            *raised
                .entry(e["alarm"]["subject"].as_str().unwrap())
                .or_default() += 1;
        }
        assert!(raised.values().all(|&n| n == 1), "engine {i}: {raised:?}");
        // Evidence names leaves of the attestor's logs.
        for e in &evs {
            for ev in e["alarm"]["evidence"].as_array().unwrap() {
                let p = ev["partition"].as_u64().unwrap();
                let log = vitaltrail_attestor::DurableLog::open_read_only(
                    data.path().join(format!("partitions/{p}")),
                )
                .unwrap();
                let leaf = log.leaf(ev["log_index"].as_u64().unwrap()).unwrap();
                let l = vitaltrail_core::leaf::decode(&leaf).unwrap();
                let r = vitaltrail_core::envelope::verify(l.envelope).unwrap();
                assert_eq!(r.did.as_str(), ev["device"].as_str().unwrap());
                assert_eq!(r.seq, ev["seq"].as_u64().unwrap());
            }
        }
    }
    // Every leaf of both logs is on vitals.logged under a valid MAC, byte
    // for byte, despite the attestor's kill -9 (repeats allowed, no gap).
    let bus_key =
        vitaltrail_bus::datadir::load_bus_key(&vitaltrail_bus::datadir::bus_key_path(data.path()))
            .unwrap();
    let reader = vitaltrail_bus::logged::LoggedConsumer::assign(
        &vitaltrail_bus::kafka::KafkaConfig {
            brokers: c.kafka.brokers(),
            ..Default::default()
        },
        "test-reader",
        bus_key.logged_key(),
        &[(0, None), (1, None)],
    )
    .unwrap();
    let logs: Vec<vitaltrail_attestor::DurableLog> = (0..PARTITIONS)
        .map(|p| {
            vitaltrail_attestor::DurableLog::open_read_only(
                data.path().join(format!("partitions/{p}")),
            )
            .unwrap()
        })
        .collect();
    let want: usize = logs.iter().map(|l| l.size() as usize).sum();
    let mut got = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while got.len() < want {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {want} leaves announced",
            got.len()
        );
        let mut batch = Vec::new();
        reader
            .next_batch(10_000, Duration::from_millis(500), &mut batch)
            .await;
        for a in batch {
            let (p, n) = a.position.unwrap();
            let log = &logs[p as usize];
            if n >= log.size() || a.leaf != log.leaf(n).unwrap() {
                // The forged records, and only they, differ from the log.
                assert!(
                    !a.authentic && n >= 1_000_000,
                    "{p}/{n}: not the log's leaf"
                );
                continue;
            }
            assert!(
                a.authentic,
                "{p}/{n}: a genuine announcement without a valid MAC"
            );
            got.insert((p, n));
        }
    }
    // The two ill patients between them: both alerted, each by one engine.
    let all: Vec<serde_json::Value> = engines
        .iter()
        .flat_map(|d| engine_events(d.path()))
        .collect();
    for p in [&det, &hyp] {
        assert_eq!(
            all.iter()
                .filter(|e| e["alarm"]["subject"] == p.as_str()
                    && e["alarm"]["rule"] == "news2"
                    && e["kind"] == "raised")
                .count(),
            1,
            "{p}: {all:?}"
        );
    }
    drop(c);
}
