//! Publish → anchored latency of every reading in a data directory, after
//! a run (`benches/scripts/anchor-latency` drives it): for each leaf of
//! each partition, the device's time of the reading (the simulator stamps
//! it as it publishes, on the same machine), the first epoch that holds
//! the leaf, and the first ledger record and the first confirmed chain
//! anchor covering that epoch. Prints p50/p90/p99/max per backend, and the
//! chain's gas per anchor and per reading.
//!
//!   cargo run --release -p vitaltrail-anchor --example anchor_latency -- DATA_DIR

use std::path::Path;

use vitaltrail_anchor::store::EpochReader;
use vitaltrail_core::{Checkpoint, envelope, leaf};
use vitaltrail_log::DurableLog;

fn pct(v: &mut [u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let data = std::env::args()
        .nth(1)
        .ok_or("usage: anchor_latency DATA_DIR")?;
    let data = Path::new(&data);
    let adir = data.join("anchor");
    let reader = EpochReader::open(&adir)?;
    let ledger: Vec<vitaltrail_anchor::ledger::LedgerLine> =
        std::fs::read_to_string(vitaltrail_anchor::ledger::ledger_path(&adir))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
    let chain = vitaltrail_anchor::evm::confirmed(&adir)?;
    let (mut to_ledger, mut to_chain, mut readings) = (Vec::new(), Vec::new(), 0u64);
    let mut parts: Vec<_> = std::fs::read_dir(data.join("partitions"))?
        .flatten()
        .map(|d| d.path())
        .collect();
    parts.sort();
    let (mut first, mut last) = (u64::MAX, 0u64);
    for dir in parts {
        let log = DurableLog::open_read_only(&dir)?;
        let Some(note) = log.latest_checkpoint()? else {
            continue;
        };
        let origin = Checkpoint::parse_unverified(&note)?.origin;
        for i in 0..log.size() {
            let bytes = log.leaf(i)?;
            let l = leaf::decode(&bytes)?;
            let r = envelope::decode_verified_upstream(l.envelope)?;
            readings += 1;
            first = first.min(r.time);
            last = last.max(r.time);
            let Some(f) = reader.find(&origin, i)? else {
                continue;
            };
            if let Some(a) = ledger.iter().find(|a| a.size > f.epoch) {
                to_ledger.push(a.time_ms.saturating_sub(r.time));
            }
            if let Some(a) = chain.iter().find(|a| a.size > f.epoch) {
                to_chain.push(a.time_ms.saturating_sub(r.time));
            }
        }
    }
    let secs = (last.saturating_sub(first) as f64 / 1000.0).max(0.001);
    println!(
        "{readings} readings over {secs:.1} s ({:.0}/s); {} epochs",
        readings as f64 / secs,
        reader.log().size()
    );
    for (name, v) in [("ledger", &mut to_ledger), ("evm", &mut to_chain)] {
        if v.is_empty() {
            println!("{name}: no anchors");
            continue;
        }
        let n = v.len();
        println!(
            "{name}: {n} readings anchored; publish → anchored p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
            pct(v, 0.5),
            pct(v, 0.9),
            pct(v, 0.99),
            pct(v, 1.0)
        );
    }
    if !chain.is_empty() {
        let gas: u64 = chain.iter().filter_map(|c| c.gas_used).sum();
        let mut each: Vec<u64> = chain.iter().filter_map(|c| c.gas_used).collect();
        // The first anchor of a stream writes a fresh slot (about 17k
        // more); every later one updates it.
        let steady = pct(&mut each, 0.5);
        let span = chain
            .last()
            .unwrap()
            .time_ms
            .saturating_sub(chain[0].time_ms) as f64
            / 1000.0;
        let every = span / (chain.len().max(2) - 1) as f64;
        println!(
            "evm: {} anchors, {:.0} gas per anchor on average ({steady} each after the first), \
             one every {every:.2} s; {:.3} gas per reading at this rate; at 10,000 readings/s, \
             {:.3} gas per reading",
            chain.len(),
            gas as f64 / chain.len() as f64,
            gas as f64 / readings as f64,
            steady as f64 / (10_000.0 * every)
        );
    }
    Ok(())
}
