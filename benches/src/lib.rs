//! # vitaltrail-benches
//!
//! End-to-end load runs (`src/bin/e2e.rs`:
//! `cargo run --release -p vitaltrail-benches --bin e2e`) that drive the whole
//! pipeline and print sustained throughput and p50/p99 latency, next to the
//! ceilings they are compared with (batch verification alone, transport
//! alone). Micro-benchmarks live beside the hot code, in each crate's
//! `benches/` (e.g. `core/benches/core.rs`).
