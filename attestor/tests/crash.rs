//! Crash safety: a child process appends to a durable log as fast as it can
//! and reports each commit; the parent kills it with SIGKILL at random points,
//! reopens the log, and checks that nothing committed was lost, nothing was
//! duplicated, and the root is the one a naive in-memory tree computes.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use vitaltrail_attestor::DurableLog;
use vitaltrail_core::MemoryTree;
use vitaltrail_core::merkle;

const CHILD_ENV: &str = "VITALTRAIL_CRASH_CHILD_DIR";
const MAX_BATCH: u64 = 7;

fn leaf(i: u64) -> Vec<u8> {
    let mut v = format!("reading {i} ").into_bytes();
    v.resize(40 + (i % 200) as usize, (i % 251) as u8);
    v
}

/// Not a test on its own: the body of the child process that
/// `kill_9_loses_nothing` spawns (it returns at once when not spawned so).
#[test]
fn crash_child_helper() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut log = DurableLog::open(&dir).expect("child opens log");
    let mut out = std::io::stdout().lock();
    loop {
        let n = log.size();
        let batch = 1 + n % MAX_BATCH;
        let leaves: Vec<Vec<u8>> = (n..n + batch).map(leaf).collect();
        log.append_batch(&leaves).expect("append");
        writeln!(out, "\ncommitted {}", log.size()).unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn kill_9_loses_nothing_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut reference = MemoryTree::new();
    let mut last_size = 0u64;
    let mut rng = 0x9e3779b97f4a7c15u64;
    let rounds = 40;
    for round in 0..rounds {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child_helper",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut max = 0u64;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.trim().strip_prefix("committed ") {
                    max = max.max(n.parse().unwrap());
                }
            }
            tx.send(max).unwrap();
        });
        // xorshift: a deterministic spread of kill points, 2..80 ms.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(2 + rng % 78));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        let reported = rx.recv().unwrap();

        let log = DurableLog::open(dir.path()).expect("reopen after kill -9");
        let size = log.size();
        assert!(
            size >= reported,
            "round {round}: committed {reported} but reopened at {size}"
        );
        assert!(
            size >= last_size,
            "round {round}: size went back from {last_size} to {size}"
        );
        assert!(
            size <= reported.max(last_size) + MAX_BATCH,
            "round {round}: {size} is more than one batch past the last commit"
        );
        while reference.size() < size {
            reference.append(&leaf(reference.size()));
        }
        assert_eq!(
            log.root(),
            reference.root_at(size).unwrap(),
            "round {round}: root"
        );
        if size > 0 {
            let i = rng % size;
            assert_eq!(log.leaf(i).unwrap(), leaf(i));
            let p = log.prove_inclusion(size, i).unwrap();
            merkle::verify_inclusion(&merkle::leaf_hash(&leaf(i)), i, size, &p, &log.root())
                .unwrap();
        }
        if last_size > 0 && size > last_size {
            let c = log.prove_consistency(last_size, size).unwrap();
            merkle::verify_consistency(
                last_size,
                size,
                &reference.root_at(last_size).unwrap(),
                &log.root(),
                &c,
            )
            .unwrap();
        }
        last_size = size;
    }
    // Every leaf is there exactly once, in order.
    let log = DurableLog::open(dir.path()).unwrap();
    assert!(
        log.size() > 50,
        "the child appended too little ({}) to test anything",
        log.size()
    );
    for i in 0..log.size() {
        assert_eq!(log.leaf(i).unwrap(), leaf(i), "leaf {i}");
    }
    eprintln!("{rounds} kills; final size {}", log.size());
}
