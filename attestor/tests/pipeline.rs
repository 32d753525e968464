//! The partition pipeline over the in-process bus: what is logged, what is
//! rejected and why, checkpoints, and dedup across a restart.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use vitaltrail_attestor::metrics::Metrics;
use vitaltrail_attestor::pipeline::{
    AttestorConfig, PartitionState, read_checkpoints, run_partition,
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
    let key = SecretKey::from_seed(&[42; 32]).unwrap();
    let (tx, parts) = inproc::bus(1, 64);
    let rejects = Arc::new(RejectLog::open(cfg.data_dir.join("rejected.jsonl")).unwrap());
    let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let patients: vitaltrail_attestor::parquet_out::PatientLookup = Arc::new(|_| None);
    let state = PartitionState::open(cfg, 0, &key, metrics, patients).unwrap();
    let cfg = cfg.clone();
    let clock: Arc<dyn Clock> = Arc::new(clock);
    let handle = tokio::spawn(async move {
        let p = parts.into_iter().next().unwrap();
        run_partition(p, state, cfg, rejects, clock, None, stop_rx)
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
        max_past_ms: 60_000,
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
    assert_eq!(
        send(reading(&dev, 3, NOW - 61_000)).await,
        Outcome::Rejected {
            reason: "clock_skew".into()
        }
    );
    assert_eq!(
        send(reading(&dev, 3, NOW + 6_000)).await,
        Outcome::Rejected {
            reason: "clock_skew".into()
        }
    );
    assert_eq!(
        send(reading(&dev, 5, NOW + 1_000)).await,
        Outcome::Logged {
            partition: 0,
            index: 2
        }
    );
    // A second device is independent.
    let dev2 = SecretKey::from_seed(&[2; 32]).unwrap();
    assert_eq!(
        send(reading(&dev2, 1, NOW)).await,
        Outcome::Logged {
            partition: 0,
            index: 3
        }
    );
    // A reading redelivered late (4 after 5) is still logged, once.
    assert_eq!(
        send(reading(&dev, 4, NOW)).await,
        Outcome::Logged {
            partition: 0,
            index: 4
        }
    );
    assert_eq!(
        send(reading(&dev, 4, NOW)).await,
        Outcome::Rejected {
            reason: "duplicate".into()
        }
    );
    // One older than the anti-replay window is refused.
    assert_eq!(
        send(reading(&dev, 5000, NOW)).await,
        Outcome::Logged {
            partition: 0,
            index: 5
        }
    );
    assert_eq!(
        send(reading(&dev, 3, NOW)).await,
        Outcome::Rejected {
            reason: "replay".into()
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
            "clock_skew",
            "duplicate",
            "replay"
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
    assert_eq!(cps.last().unwrap().size, 6);
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
        tx.send(reading(&dev, 5000, NOW)).await.unwrap(),
        Outcome::Rejected {
            reason: "duplicate".into()
        }
    );
    assert_eq!(
        tx.send(reading(&dev, 5001, NOW)).await.unwrap(),
        Outcome::Logged {
            partition: 0,
            index: 6
        }
    );
    stop.send(true).unwrap();
    h.await.unwrap();
}
