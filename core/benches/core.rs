//! Criterion benches for the hot paths in core.
//!
//! `cargo bench -p vitaltrail-core` (release). Throughputs are per element.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ed25519_dalek::Verifier as _;
use vitaltrail_core::envelope::{self, Measurement, UnsignedReading};
use vitaltrail_core::merkle::{self, Hash, MemoryTree};
use vitaltrail_core::{Checkpoint, LogSigner, ProofBundle, SecretKey, leaf, sig};

fn reading(seq: u64) -> UnsignedReading {
    UnsignedReading {
        seq,
        time: 1_700_000_000_000 + seq,
        measurements: vec![
            Measurement {
                code: "8867-4".into(),
                value: 72.0,
                unit: "/min".into(),
            },
            Measurement {
                code: "2708-6".into(),
                value: 97.0,
                unit: "%".into(),
            },
            Measurement {
                code: "9279-1".into(),
                value: 15.0,
                unit: "/min".into(),
            },
            Measurement {
                code: "8310-5".into(),
                value: 36.8,
                unit: "Cel".into(),
            },
        ],
        meta: None,
    }
}

fn envelopes(n: usize) -> Vec<Vec<u8>> {
    let keys: Vec<SecretKey> = (0..16u8)
        .map(|i| SecretKey::from_seed(&[i + 1; 32]).unwrap())
        .collect();
    (0..n)
        .map(|i| envelope::sign(&keys[i % 16], &reading(i as u64)).unwrap())
        .collect()
}

fn verification(c: &mut Criterion) {
    let mut g = c.benchmark_group("verify");
    for n in [1usize, 16, 64, 256] {
        let envs = envelopes(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("envelope_single", n), &envs, |b, envs| {
            b.iter(|| {
                for e in envs {
                    black_box(envelope::verify(e).unwrap());
                }
            })
        });
        g.bench_with_input(BenchmarkId::new("envelope_batch", n), &envs, |b, envs| {
            b.iter(|| black_box(envelope::verify_batch(envs)))
        });
        // Signatures alone, on the same messages: our rule set single vs
        // batch, and ed25519-dalek's plain (cofactorless) verify as a baseline.
        let keys: Vec<SecretKey> = (0..n)
            .map(|i| SecretKey::from_seed(&[(i % 250) as u8 + 1; 32]).unwrap())
            .collect();
        let vks: Vec<_> = keys.iter().map(|k| k.verifying_key()).collect();
        let sigs: Vec<[u8; 64]> = keys.iter().zip(&envs).map(|(k, e)| k.sign(e)).collect();
        let items: Vec<(&ed25519_dalek::VerifyingKey, &[u8], &[u8; 64])> = (0..n)
            .map(|i| (&vks[i], envs[i].as_slice(), &sigs[i]))
            .collect();
        g.bench_with_input(BenchmarkId::new("sig_single", n), &items, |b, items| {
            b.iter(|| {
                for (k, m, s) in items {
                    sig::verify(k, m, s).unwrap();
                }
            })
        });
        g.bench_with_input(BenchmarkId::new("sig_batch", n), &items, |b, items| {
            b.iter(|| black_box(sig::verify_many(items)))
        });
        g.bench_with_input(
            BenchmarkId::new("dalek_verify_baseline", n),
            &items,
            |b, items| {
                b.iter(|| {
                    for (k, m, s) in items {
                        k.verify(m, &ed25519_dalek::Signature::from_bytes(s))
                            .unwrap();
                    }
                })
            },
        );
    }
    g.finish();
}

fn hashing(c: &mut Criterion) {
    let env = envelopes(1).pop().unwrap();
    let mut g = c.benchmark_group("leaf");
    g.throughput(Throughput::Elements(1));
    g.bench_function(format!("leaf_hash_{}B_envelope", env.len()), |b| {
        b.iter(|| black_box(leaf::hash(black_box(1_700_000_000_000), black_box(&env))))
    });
    g.finish();
}

fn append(c: &mut Criterion) {
    const N: usize = 1_000_000;
    let hashes: Vec<Hash> = (0..N as u64)
        .map(|i| merkle::leaf_hash(&i.to_le_bytes()))
        .collect();
    let env = envelopes(1).pop().unwrap();
    let mut g = c.benchmark_group("append_memory");
    g.sample_size(10);
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("1M_leaf_hashes", |b| {
        b.iter(|| {
            let mut t = MemoryTree::with_capacity(N);
            for h in &hashes {
                t.append_hash(*h);
            }
            black_box(t.root())
        })
    });
    g.throughput(Throughput::Elements(100_000));
    g.bench_function(format!("100k_leaves_hashed_{}B", env.len() + 9), |b| {
        b.iter(|| {
            let mut t = MemoryTree::with_capacity(100_000);
            for i in 0..100_000u64 {
                t.append_hash(leaf::hash(i, &env));
            }
            black_box(t.root())
        })
    });
    g.finish();
}

fn proofs(c: &mut Criterion) {
    const N: u64 = 1_000_000;
    let mut t = MemoryTree::with_capacity(N as usize);
    let dev = SecretKey::from_seed(&[1; 32]).unwrap();
    let env = envelope::sign(&dev, &reading(424_242)).unwrap();
    for i in 0..N {
        if i == 424_242 {
            t.append_hash(leaf::hash(5, &env));
        } else {
            t.append(&i.to_le_bytes());
        }
    }
    let root = t.root();
    let mut g = c.benchmark_group("proof_1M");
    let mut i = 0u64;
    g.bench_function("inclusion_prove", |b| {
        b.iter(|| {
            i = (i + 7919) % N;
            black_box(t.prove_inclusion(N, i).unwrap())
        })
    });
    let p = t.prove_inclusion(N, 424_242).unwrap();
    let lh = leaf::hash(5, &env);
    g.bench_function("inclusion_verify", |b| {
        b.iter(|| merkle::verify_inclusion(&lh, 424_242, N, black_box(&p), &root).unwrap())
    });
    g.bench_function("consistency_prove", |b| {
        b.iter(|| {
            i = (i + 7919) % N;
            black_box(t.prove_consistency(i + 1, N).unwrap())
        })
    });
    let log = LogSigner::new("bench/log", SecretKey::from_seed(&[2; 32]).unwrap()).unwrap();
    let note = Checkpoint {
        origin: "bench/log".into(),
        size: N,
        root,
        extensions: vec![],
    }
    .sign(&log)
    .unwrap();
    let bundle = ProofBundle::new(&env, 5, 424_242, &p, &note);
    let json = bundle.to_json();
    let pk = log.public_key();
    g.bench_function("bundle_parse_and_verify", |b| {
        b.iter(|| {
            let b = ProofBundle::from_json(json.as_bytes()).unwrap();
            assert!(b.verify(&pk, None).ok());
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
}

criterion_group! { name = benches; config = config(); targets = verification, hashing, append, proofs }
criterion_main!(benches);
