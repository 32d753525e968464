//! `vitaltrail demo`: the foundation end to end, in one process, on disk.
//!
//! Devices sign readings, the batch verifier checks them, a durable log takes
//! them, a signed checkpoint covers them, a proof bundle is written and
//! verified offline, and then tampered copies are shown failing.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use vitaltrail_attestor::DurableLog;
use vitaltrail_core::envelope::{self, Measurement, UnsignedReading};
use vitaltrail_core::{
    Checkpoint, Clock, LogSigner, ProofBundle, SecretKey, SystemClock, leaf, merkle,
};

use crate::commands::write_key;

fn vitals(seq: u64, device: usize) -> Vec<Measurement> {
    // Deterministic, plausible values; no randomness needed for a demo.
    let wobble = |period: u64, amp: f64| ((seq % period) as f64 / period as f64 - 0.5) * amp;
    let hr = 68.0 + device as f64 * 3.0 + wobble(17, 8.0);
    vec![
        Measurement {
            code: "8867-4".into(),
            value: hr.round(),
            unit: "/min".into(),
        },
        Measurement {
            code: "2708-6".into(),
            value: (97.0 + wobble(13, 2.0)).round(),
            unit: "%".into(),
        },
        Measurement {
            code: "9279-1".into(),
            value: (15.0 + wobble(11, 4.0)).round(),
            unit: "/min".into(),
        },
        Measurement {
            code: "8310-5".into(),
            value: ((36.8 + wobble(23, 0.6)) * 10.0).round() / 10.0,
            unit: "Cel".into(),
        },
    ]
}

fn print_report(label: &str, r: &vitaltrail_core::bundle::Report) -> Result<()> {
    match r.first_failure() {
        None => outln!("  {label}: every check passes"),
        Some((name, why)) => outln!("  {label}: REJECTED at {name}: {why}"),
    }
    Ok(())
}

pub fn run(dir: &Path, readings: u64) -> Result<ExitCode> {
    if readings < 2 {
        bail!("--readings must be at least 2");
    }
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!(
            "{} is not empty; pass --dir with a new directory",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir.join("keys"))
        .with_context(|| format!("creating {}", dir.display()))?;
    let clock = SystemClock;
    let origin = "vitaltrail.demo/log/0";

    outln!("1. keys");
    let log_key = SecretKey::generate(&mut rand::rngs::OsRng);
    write_key(&dir.join("keys/log.pem"), &log_key)?;
    let signer = LogSigner::new(origin, log_key)?;
    let devices: Vec<SecretKey> = (0..5)
        .map(|_| SecretKey::generate(&mut rand::rngs::OsRng))
        .collect();
    for (i, d) in devices.iter().enumerate() {
        write_key(&dir.join(format!("keys/device-{i}.pem")), d)?;
        outln!("  device {i}: {}", d.did());
    }
    outln!("  log key:  {}", signer.public_key());

    outln!("2. {readings} readings signed as COSE_Sign1 envelopes");
    let t0 = clock.now_ms();
    let envs: Vec<Vec<u8>> = (0..readings)
        .map(|i| {
            let d = (i % devices.len() as u64) as usize;
            let seq = i / devices.len() as u64;
            envelope::sign(
                &devices[d],
                &UnsignedReading {
                    seq,
                    time: t0 + i,
                    measurements: vitals(seq, d),
                    meta: None,
                },
            )
        })
        .collect::<Result<_, _>>()?;
    let avg = envs.iter().map(Vec::len).sum::<usize>() / envs.len();
    outln!("  average envelope: {avg} bytes");

    outln!("3. batch verification");
    let start = Instant::now();
    let verdicts = envelope::verify_batch(&envs);
    let ok = verdicts.iter().filter(|v| v.is_ok()).count();
    outln!(
        "  {ok}/{} verified in {:.1} ms",
        envs.len(),
        start.elapsed().as_secs_f64() * 1e3
    );

    outln!("4. durable Merkle log, with a checkpoint half way");
    let log_dir = dir.join("log");
    let mut log = DurableLog::open(&log_dir)?;
    let half = readings / 2;
    let mut first_note = String::new();
    for (chunk_start, chunk) in (0..).step_by(100).zip(envs.chunks(100)) {
        let now = clock.now_ms();
        let leaves: Vec<Vec<u8>> = chunk.iter().map(|e| leaf::encode(now, e)).collect();
        log.append_batch(&leaves)?;
        if first_note.is_empty() && chunk_start + 100 >= half {
            let cp = Checkpoint {
                origin: origin.into(),
                size: log.size(),
                root: log.root(),
                extensions: vec![],
            };
            first_note = cp.sign(&signer)?;
        }
    }
    let cp = Checkpoint {
        origin: origin.into(),
        size: log.size(),
        root: log.root(),
        extensions: vec![],
    };
    let note = cp.sign(&signer)?;
    log.store_checkpoint(&note)?;
    vitaltrail_attestor::durable::write_atomic(
        &log_dir,
        "log.vkey",
        format!("{}\n", signer.public_key()).as_bytes(),
    )?;
    let first = Checkpoint::open(&first_note, &signer.public_key())?;
    let cproof = log.prove_consistency(first.size, cp.size)?;
    merkle::verify_consistency(first.size, cp.size, &first.root, &cp.root, &cproof)?;
    outln!("  tree size {}, root {}", cp.size, cp.root);
    outln!(
        "  checkpoint at size {} is consistent with size {} ({} hashes of proof)",
        first.size,
        cp.size,
        cproof.len()
    );
    out!(
        "{}",
        note.lines()
            .map(|l| format!("  | {l}\n"))
            .collect::<String>()
    );

    outln!("5. proof bundle for one reading, verified offline");
    let index = readings / 3;
    let l = log.leaf(index)?;
    let l = leaf::decode(&l)?;
    let proof = log.prove_inclusion(cp.size, index)?;
    let bundle = ProofBundle::new(l.envelope, l.log_time_ms, index, &proof, &note);
    let bundle_path = dir.join("bundle.json");
    std::fs::write(&bundle_path, bundle.to_json())?;
    let pk = signer.public_key();
    let report = bundle.verify(&pk, None);
    print_report("genuine bundle", &report)?;
    if !report.ok() {
        bail!("the genuine bundle did not verify");
    }

    outln!("6. tampering is detected");
    let mut all_caught = true;
    let mut check = |label: &str, b: &ProofBundle| -> Result<()> {
        let r = b.verify(&pk, None);
        print_report(label, &r)?;
        all_caught &= !r.ok();
        Ok(())
    };
    let env = l.envelope.to_vec();
    // a) a measurement value changed inside the signed envelope
    let mut t = bundle.clone();
    let mut e = env.clone();
    let pos = e.len() - 70;
    e[pos] ^= 0x01;
    t.envelope = ProofBundle::new(&e, 0, 0, &[], "").envelope;
    check("one bit of the envelope flipped", &t)?;
    // b) the reading re-signed by another key claiming the same device
    let forged = envelope::sign(
        &SecretKey::generate(&mut rand::rngs::OsRng),
        &UnsignedReading {
            seq: 0,
            time: t0,
            measurements: vitals(0, 0),
            meta: None,
        },
    )?;
    let mut t = bundle.clone();
    t.envelope = ProofBundle::new(&forged, 0, 0, &[], "").envelope;
    check("a reading from another device swapped in", &t)?;
    // c) the acceptance time rewritten
    let mut t = bundle.clone();
    t.log_time_ms += 1;
    check("log time moved by 1 ms", &t)?;
    // d) a proof hash altered
    let mut t = bundle.clone();
    if let Some(h) = t.inclusion_proof.first_mut() {
        *h = merkle::Hash([7; 32]).to_base64();
    }
    check("one proof hash replaced", &t)?;
    // e) a checkpoint claiming a different size
    let mut t = bundle.clone();
    t.checkpoint = t.checkpoint.replacen(
        &format!("\n{}\n", cp.size),
        &format!("\n{}\n", cp.size + 1),
        1,
    );
    check("checkpoint size edited", &t)?;
    // f) a different log key
    let other = LogSigner::new(origin, SecretKey::generate(&mut rand::rngs::OsRng))?.public_key();
    let r = bundle.verify(&other, None);
    print_report("checked against another log's key", &r)?;
    all_caught &= !r.ok();

    outln!();
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "vitaltrail".into());
    outln!("Try it yourself:");
    outln!(
        "  {exe} verify {} --log-key {}",
        bundle_path.display(),
        log_dir.join("log.vkey").display()
    );
    outln!("  {exe} log prove --dir {} --index 0", log_dir.display());
    if !all_caught {
        bail!("a tampered bundle verified");
    }
    Ok(ExitCode::SUCCESS)
}
