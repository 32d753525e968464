//! Append throughput of the durable log (every batch fsynced) and proof
//! generation from disk at 10^6 leaves.
//!
//! `cargo bench -p vitaltrail-attestor`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use vitaltrail_attestor::DurableLog;

fn append(c: &mut Criterion) {
    let leaf = vec![0x5au8; 290]; // about one envelope plus the leaf header
    let mut g = c.benchmark_group("durable_append_fsync");
    for batch in [1usize, 100, 1000] {
        let dir = tempfile::tempdir().unwrap();
        let mut log = DurableLog::open(dir.path()).unwrap();
        let leaves = vec![leaf.clone(); batch];
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_with_input(BenchmarkId::from_parameter(batch), &leaves, |b, leaves| {
            b.iter(|| black_box(log.append_batch(leaves).unwrap()))
        });
    }
    g.finish();
}

fn proofs(c: &mut Criterion) {
    const N: u64 = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    let mut log = DurableLog::open(dir.path()).unwrap();
    let chunk: Vec<Vec<u8>> = (0..10_000u64).map(|i| i.to_le_bytes().to_vec()).collect();
    while log.size() < N {
        log.append_batch(&chunk).unwrap();
    }
    let mut g = c.benchmark_group("durable_proof_1M");
    let mut i = 0u64;
    g.bench_function("inclusion_prove", |b| {
        b.iter(|| {
            i = (i + 7919) % N;
            black_box(log.prove_inclusion(N, i).unwrap())
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
}

criterion_group! { name = benches; config = config(); targets = append, proofs }
criterion_main!(benches);
