//! The partition pipeline over the in-process bus: what is logged, what is
//! rejected and why, checkpoints, and dedup across a restart.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use vitaltrail_attestor::metrics::Metrics;
use vitaltrail_attestor::pipeline::{
    AttestorConfig, MAX_SEQ_JUMP, PartitionState, read_checkpoints, run_partition,
};
use vitaltrail_bus::deadletter::RejectLog;
use vitaltrail_bus::{Outcome, Producer, Record, inproc};
use vitaltrail_core::envelope::{Measurement, UnsignedReading, sign};
use vitaltrail_core::{Checkpoint, Clock, LogPublicKey, MockClock, SecretKey, merkle};

const NOW: u64 = 1_800_000_000_000;

fn reading(key: &SecretKey, seq: u64, time: u64) -> Record {
    let env = sign(
        key,
        &UnsignedReading {
            seq,
            time,
            measurements: vec![Measurement {
                code: "8867-4".into(),
                value: 70.0,
                unit: "/min".into(),
            }],
            meta: None,
        },
    )
    .unwrap();
    Record {
        key: key.did().to_string(),
        payload: env,
        received_ms: time,
    }
}

async fn start(
    cfg: &AttestorConfig,
    clock: MockClock,
) -> (
    inproc::InProcProducer,
    watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    start_with_receipts(cfg, clock, None).await
}

/// [`start`], handing the partition's receipts to `receipts` if given.
async fn start_with_receipts(
    cfg: &AttestorConfig,
    clock: MockClock,
    receipts: Option<tokio::sync::mpsc::Sender<vitaltrail_core::receipt::Receipt>>,
) -> (
    inproc::InProcProducer,
    watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let key = SecretKey::from_seed(&[42; 32]).unwrap();
    let (tx, parts) = inproc::bus(1, 64);
    let rejects = Arc::new(RejectLog::open(cfg.data_dir.join("rejected.jsonl")).unwrap());
    let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let patients: vitaltrail_attestor::parquet_out::PatientLookup =
        Arc::new(|_| vitaltrail_attestor::parquet_out::Registered::Active("p".into()));
    let state = PartitionState::open(cfg, 0, &key, metrics, patients).unwrap();
    let cfg = cfg.clone();
    let clock: Arc<dyn Clock> = Arc::new(clock);
    let handle = tokio::spawn(async move {
        let p = parts.into_iter().next().unwrap();
        run_partition(
            p,
            state,
            cfg,
            rejects,
            clock,
            vitaltrail_attestor::pipeline::Outlets {
                receipts,
                ..Default::default()
            },
            stop_rx,
        )
        .await
        .unwrap();
    });
    (tx, stop, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_replays_and_skew_are_rejected_and_survive_restart() {
    let d = tempfile::tempdir().unwrap();
    let cfg = AttestorConfig {
        data_dir: d.path().to_owned(),
        checkpoint_interval: Duration::from_millis(50),
        checkpoint_every: 3,
        max_future_ms: 5_000,
        ..Default::default()
    };
    let clock = MockClock::new(NOW);
    let dev = SecretKey::from_seed(&[1; 32]).unwrap();
    let (tx, stop, h) = start(&cfg, clock.clone()).await;
    let send = |r: Record| {
        let tx = tx.clone();
        async move { tx.send(r).await.unwrap() }
    };
    assert_eq!(
        send(reading(&dev, 1, NOW)).await,
        Outcome::Logged {
            partition: 0,
            index: 0
        }
    );
    assert_eq!(
        send(reading(&dev, 2, NOW)).await,
        Outcome::Logged {
            partition: 0,
            index: 1
        }
    );
    assert_eq!(
        send(reading(&dev, 2, NOW)).await,
        Outcome::Rejected {
            reason: "duplicate".into()
        }
    );
    assert_eq!(
        send(reading(&dev, 1, NOW)).await,
        Outcome::Rejected {
            reason: "duplicate".into()
        }
    );
    // Skew is judged against when ingest received the reading.
    let mut ahead = reading(&dev, 3, NOW + 6_000);
    ahead.received_ms = NOW;
    assert_eq!(
        send(ahead).await,
        Outcome::Rejected {
            reason: "clock_skew".into()
        }
    );
    // A wearable syncing two days of buffered readings: kept (marked late).
    let mut offline = reading(&dev, 3, NOW - 2 * 24 * 3_600_000);
    offline.received_ms = NOW;
    assert_eq!(
        send(offline).await,
        Outcome::Logged {
            partition: 0,
            index: 2
        }
    );
    // A backlog: the attestor gets to a reading an hour after ingest
    // received it. Not skewed.
    clock.advance(3_600_000);
    assert_eq!(
        send(reading(&dev, 5, NOW + 1_000)).await,
        Outcome::Logged {
            partition: 0,
            index: 3
        }
    );
    // A second device is independent.
    let dev2 = SecretKey::from_seed(&[2; 32]).unwrap();
    assert_eq!(
        send(reading(&dev2, 1, NOW)).await,
        Outcome::Logged {
            partition: 0,
            index: 4
        }
    );
    // A reading redelivered late (4 after 5) is still logged, once.
    assert_eq!(
        send(reading(&dev, 4, NOW)).await,
        Outcome::Logged {
            partition: 0,
            index: 5
        }
    );
    assert_eq!(
        send(reading(&dev, 4, NOW)).await,
        Outcome::Rejected {
            reason: "duplicate".into()
        }
    );
    // Older than the anti-replay window: the exact index decides. Logged
    // before (seq 3): a duplicate; never logged (seq 6): a late resend,
    // kept (a crash or a resend in another order must not lose it).
    assert_eq!(
        send(reading(&dev, 5000, NOW)).await,
        Outcome::Logged {
            partition: 0,
            index: 6
        }
    );
    assert_eq!(
        send(reading(&dev, 3, NOW)).await,
        Outcome::Rejected {
            reason: "duplicate".into()
        }
    );
    assert_eq!(
        send(reading(&dev, 6, NOW)).await,
        Outcome::Logged {
            partition: 0,
            index: 7
        }
    );
    assert_eq!(
        send(reading(&dev, 6, NOW)).await,
        Outcome::Rejected {
            reason: "duplicate".into()
        }
    );
    // One absurd seq is refused instead of moving the window away.
    for seq in [u64::MAX, 5000 + MAX_SEQ_JUMP + 1] {
        assert_eq!(
            send(reading(&dev, seq, NOW)).await,
            Outcome::Rejected {
                reason: "seq_jump".into()
            }
        );
    }
    assert_eq!(
        send(reading(&dev, 5000 + MAX_SEQ_JUMP, NOW)).await,
        Outcome::Logged {
            partition: 0,
            index: 8
        }
    );
    // A new device whose first seq is absurd cannot lock itself out: its
    // normal seqs are older than the window, never logged, and kept.
    let dev3 = SecretKey::from_seed(&[3; 32]).unwrap();
    assert_eq!(
        send(reading(&dev3, u64::MAX, NOW)).await,
        Outcome::Logged {
            partition: 0,
            index: 9
        }
    );
    assert_eq!(
        send(reading(&dev3, 1, NOW)).await,
        Outcome::Logged {
            partition: 0,
            index: 10
        }
    );
    stop.send(true).unwrap();
    h.await.unwrap();

    let rejected = RejectLog::read_all(d.path().join("rejected.jsonl")).unwrap();
    let reasons: Vec<&str> = rejected.iter().map(|r| r.reason.as_str()).collect();
    assert_eq!(
        reasons,
        [
            "duplicate",
            "duplicate",
            "clock_skew",
            "duplicate",
            "duplicate",
            "duplicate",
            "seq_jump",
            "seq_jump"
        ]
    );
    assert!(
        rejected
            .iter()
            .all(|r| r.stage == "attestor" && r.envelope_b64.is_some())
    );

    // Checkpoints were signed, each consistent with the next.
    let pdir = cfg.partition_dir(0);
    let vkey =
        LogPublicKey::parse(&std::fs::read_to_string(pdir.join("log.vkey")).unwrap()).unwrap();
    let cps = read_checkpoints(&pdir).unwrap();
    assert!(!cps.is_empty());
    assert_eq!(cps.last().unwrap().size, 11);
    let log = vitaltrail_attestor::DurableLog::open(&pdir).unwrap();
    let mut prev: Option<Checkpoint> = None;
    for c in &cps {
        let cp = Checkpoint::open(&c.note, &vkey).unwrap();
        if let Some(p) = &prev {
            let proof = log.prove_consistency(p.size, cp.size).unwrap();
            merkle::verify_consistency(p.size, cp.size, &p.root, &cp.root, &proof).unwrap();
        }
        prev = Some(cp);
    }
    drop(log);

    // Restart: dedup state is rebuilt; a redelivered reading is a duplicate.
    clock.advance(10);
    let (tx, stop, h) = start(&cfg, clock.clone()).await;
    assert_eq!(
        tx.send(reading(&dev, 5000 + MAX_SEQ_JUMP, NOW))
            .await
            .unwrap(),
        Outcome::Rejected {
            reason: "duplicate".into()
        }
    );
    assert_eq!(
        tx.send(reading(&dev, 5001 + MAX_SEQ_JUMP, NOW))
            .await
            .unwrap(),
        Outcome::Logged {
            partition: 0,
            index: 11
        }
    );
    stop.send(true).unwrap();
    h.await.unwrap();
}

/// The fork guard: an older log restored beside a newer checkpoint is
/// refused on open, before anything could be signed over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_older_log_beside_a_newer_checkpoint_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let cfg = AttestorConfig {
        data_dir: d.path().to_owned(),
        checkpoint_interval: Duration::from_millis(20),
        checkpoint_every: 1,
        ..Default::default()
    };
    let dev = SecretKey::from_seed(&[5; 32]).unwrap();
    let pdir = cfg.partition_dir(0);
    let backup = d.path().join("backup");
    let log_files = ["leaves.dat", "leaves.idx", "hashes.dat", "HEAD"];
    {
        let (tx, stop, h) = start(&cfg, MockClock::new(NOW)).await;
        for seq in 1..=3 {
            tx.send(reading(&dev, seq, NOW)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The backup: the log files as they were at 3 leaves.
        std::fs::create_dir_all(&backup).unwrap();
        for f in log_files {
            std::fs::copy(pdir.join(f), backup.join(f)).unwrap();
        }
        for seq in 4..=6 {
            tx.send(reading(&dev, seq, NOW)).await.unwrap();
        }
        stop.send(true).unwrap();
        h.await.unwrap();
    }
    let key = SecretKey::from_seed(&[42; 32]).unwrap();
    let open = || {
        let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
        let patients: vitaltrail_attestor::parquet_out::PatientLookup =
            Arc::new(|_| vitaltrail_attestor::parquet_out::Registered::Active("p".into()));
        PartitionState::open(&cfg, 0, &key, metrics, patients)
    };
    assert!(open().is_ok(), "the intact partition opens");
    // Opened with another key (a careless restart), the partition is
    // refused, and its log.vkey, what devices are provisioned from, stays
    // the key that verifies its checkpoints (it was rewritten first).
    let vkey = std::fs::read_to_string(pdir.join("log.vkey")).unwrap();
    let stranger = SecretKey::from_seed(&[43; 32]).unwrap();
    let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
    let patients: vitaltrail_attestor::parquet_out::PatientLookup =
        Arc::new(|_| vitaltrail_attestor::parquet_out::Registered::Active("p".into()));
    assert!(PartitionState::open(&cfg, 0, &stranger, metrics, patients).is_err());
    assert_eq!(
        std::fs::read_to_string(pdir.join("log.vkey")).unwrap(),
        vkey
    );
    // Restore the older log files; the newer checkpoint stays.
    for f in log_files {
        std::fs::copy(backup.join(f), pdir.join(f)).unwrap();
    }
    match open() {
        Err(e @ vitaltrail_attestor::Error::Fork { .. }) => {
            assert!(e.to_string().contains("older log"), "{e}")
        }
        other => panic!("expected the fork guard, got {other:?}"),
    }
    // An edited log (same size, other content) is refused too: a log of 6
    // other leaves beside the checkpoint of the real one.
    let other = d.path().join("other");
    {
        let mut log = vitaltrail_attestor::DurableLog::open(&other).unwrap();
        let leaves: Vec<Vec<u8>> = (0..6u8)
            .map(|i| vec![1, 0, 0, 0, 0, 0, 0, 0, 0, i])
            .collect();
        log.append_batch(&leaves).unwrap();
    }
    for f in log_files {
        std::fs::copy(other.join(f), pdir.join(f)).unwrap();
    }
    std::fs::remove_file(pdir.join("index.redb")).unwrap();
    assert!(matches!(
        open(),
        Err(vitaltrail_attestor::Error::Fork { .. })
    ));
}

/// A failed Parquet export stops the worker after the log commit; a
/// restart with no new traffic writes the missing rows at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_missing_after_a_failed_export_are_written_on_restart() {
    let d = tempfile::tempdir().unwrap();
    let cfg = AttestorConfig {
        data_dir: d.path().to_owned(),
        checkpoint_interval: Duration::from_millis(20),
        checkpoint_every: 1,
        ..Default::default()
    };
    let dev = SecretKey::from_seed(&[6; 32]).unwrap();
    // A file where the export's date directory must go: the export fails.
    let date_dir = d.path().join("readings").join(format!(
        "date={}",
        vitaltrail_attestor::parquet_out::utc_date(NOW)
    ));
    std::fs::create_dir_all(date_dir.parent().unwrap()).unwrap();
    std::fs::write(&date_dir, b"in the way").unwrap();
    let (tx, _stop, h) = start(&cfg, MockClock::new(NOW)).await;
    for seq in 1..=4 {
        // Logged (the commit precedes the export), then the worker stops.
        let _ = tx.send(reading(&dev, seq, NOW)).await;
    }
    assert!(h.await.is_err(), "the worker must stop on a failed export");
    let rows = || {
        let mut n = 0;
        for e in std::fs::read_dir(d.path().join("readings"))
            .unwrap()
            .flatten()
        {
            if e.path().is_dir() {
                n += std::fs::read_dir(e.path()).unwrap().count();
            }
        }
        n
    };
    assert_eq!(rows(), 0);
    std::fs::remove_file(&date_dir).unwrap();
    // Restart, and send nothing.
    let (_tx, stop, h) = start(&cfg, MockClock::new(NOW + 1)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rows() > 0, "the missing rows were not written");
    stop.send(true).unwrap();
    h.await.unwrap();
    let log = vitaltrail_attestor::DurableLog::open(cfg.partition_dir(0)).unwrap();
    let hw: u64 = std::fs::read_to_string(cfg.partition_dir(0).join("parquet.hw"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(hw, log.size());
    assert!(log.size() >= 1);
}

/// A genuine record in a partition its device does not belong to (copied
/// there by someone who can produce to Kafka) is not logged a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_in_the_wrong_partition_is_rejected() {
    let d = tempfile::tempdir().unwrap();
    let cfg = AttestorConfig {
        data_dir: d.path().to_owned(),
        topic_partitions: Some(2),
        ..Default::default()
    };
    // A device whose home is partition 1 and one whose home is 0; the
    // worker here is partition 0.
    let (away, home) = {
        let mut away = None;
        let mut home = None;
        for i in 0..64u8 {
            let k = SecretKey::from_seed(&[i + 100; 32]).unwrap();
            match vitaltrail_bus::partition_for(k.did().as_str(), 2) {
                1 if away.is_none() => away = Some(k),
                0 if home.is_none() => home = Some(k),
                _ => {}
            }
        }
        (away.unwrap(), home.unwrap())
    };
    let (tx, stop, h) = start(&cfg, MockClock::new(NOW)).await;
    assert_eq!(
        tx.send(reading(&away, 1, NOW)).await.unwrap(),
        Outcome::Rejected {
            reason: "wrong_partition".into()
        }
    );
    assert_eq!(
        tx.send(reading(&home, 1, NOW)).await.unwrap(),
        Outcome::Logged {
            partition: 0,
            index: 0
        }
    );
    stop.send(true).unwrap();
    h.await.unwrap();
}

/// A different message reusing a logged seq (the device key signed two
/// readings with one seq) is refused in its receipt with no proof; only the
/// same message again is a duplicate with the original's proof. Before the
/// fix the other message's receipt carried the original's index and proof,
/// which its device could not verify (#18's CI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_message_reusing_a_logged_seq_gets_no_proof() {
    use vitaltrail_core::receipt::{Status, message_hash};
    let d = tempfile::tempdir().unwrap();
    let cfg = AttestorConfig {
        data_dir: d.path().to_owned(),
        checkpoint_interval: Duration::from_millis(50),
        ..Default::default()
    };
    let (rtx, mut rrx) = tokio::sync::mpsc::channel(64);
    let (tx, stop, h) = start_with_receipts(&cfg, MockClock::new(NOW), Some(rtx)).await;
    let dev = SecretKey::from_seed(&[1; 32]).unwrap();
    let first = reading(&dev, 1, NOW);
    let other = reading(&dev, 1, NOW + 1);
    assert_ne!(first.payload, other.payload);
    let logged = Outcome::Logged {
        partition: 0,
        index: 0,
    };
    let dup = Outcome::Rejected {
        reason: "duplicate".into(),
    };
    assert_eq!(tx.send(first.clone()).await.unwrap(), logged);
    assert_eq!(tx.send(other.clone()).await.unwrap(), dup);
    assert_eq!(tx.send(first.clone()).await.unwrap(), dup);
    let mut entries = Vec::new();
    while entries.len() < 3 {
        let r = tokio::time::timeout(Duration::from_secs(10), rrx.recv())
            .await
            .expect("receipts")
            .unwrap();
        entries.extend(r.entries);
    }
    let (h_first, h_other) = (message_hash(&first.payload), message_hash(&other.payload));
    assert_eq!(entries[0].message_hash, h_first);
    assert_eq!(entries[0].status, Status::Logged);
    assert_eq!(entries[1].message_hash, h_other);
    assert_eq!(entries[1].status, Status::Rejected, "{:?}", entries[1]);
    assert_eq!(entries[1].reason.as_deref(), Some("duplicate"));
    assert!(entries[1].index.is_none() && entries[1].proof.is_none());
    assert_eq!(entries[2].message_hash, h_first);
    assert_eq!(entries[2].status, Status::Duplicate);
    assert_eq!(entries[2].index, Some(0));
    assert!(entries[2].proof.is_some());
    stop.send(true).unwrap();
    drop(tx);
    h.await.unwrap();
}
