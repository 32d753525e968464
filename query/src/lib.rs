//! # vitaltrail-query
//!
//! **Status: planned (issue #4 and later).** This crate will own the read
//! side: DataFusion SQL over the Parquet readings, checkpoints, anchors,
//! rejects and alerts, served over the CLI, HTTP and Flight SQL; building and
//! checking proof bundles from a reading to its anchor; and critical-event
//! alert rules (NEWS2 and others) for remote-monitoring nurses.
