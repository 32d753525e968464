//! Prometheus metrics of the attestor, registered in an injected registry.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

/// The attestor's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Readings appended to a partition log.
    pub appended: IntCounterVec,
    /// Readings rejected by the attestor, by reason (`duplicate`, `replay`, `clock_skew`, …).
    pub rejected: IntCounterVec,
    /// Leaves in each partition log.
    pub tree_size: IntGaugeVec,
    /// Leaves appended since the last checkpoint of each partition.
    pub checkpoint_lag: IntGaugeVec,
    /// Checkpoints signed.
    pub checkpoints: IntCounterVec,
    /// Time to make one batch durable (log + rejects), seconds.
    pub commit_seconds: HistogramVec,
    /// Records per processed batch.
    pub batch_size: HistogramVec,
    /// Receipts handed to the publisher.
    pub receipts: IntCounter,
    /// Receipts dropped because the publisher's queue was full (the
    /// device resends and gets a duplicate's receipt).
    pub receipts_dropped: IntCounter,
    /// Logged leaves handed to the `vitals.logged` announcer that Kafka
    /// has not acknowledged yet (bounded by its queue).
    pub logged_pending: prometheus::IntGauge,
    /// Leaves announced on `vitals.logged` (Kafka has them).
    pub logged_announced: IntCounter,
    /// Device windows held in memory (bounded; the rest are on disk).
    pub windows_cached: IntGaugeVec,
    /// Live Parquet files of each partition (compaction keeps it bounded).
    pub parquet_files: IntGaugeVec,
    /// Compactions (runs of small files merged into one).
    pub parquet_compactions: IntCounterVec,
    /// Compaction passes that failed (retried on the next pass).
    pub parquet_compaction_errors: IntCounterVec,
}

impl Metrics {
    /// Create and register the metrics.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Metrics {
            receipts: IntCounter::new(
                "vitaltrail_attestor_receipts_total",
                "Receipts handed to the MQTT publisher",
            )?,
            receipts_dropped: IntCounter::new(
                "vitaltrail_attestor_receipts_dropped_total",
                "Receipts dropped because the publisher's bounded queue was full",
            )?,
            logged_pending: prometheus::IntGauge::new(
                "vitaltrail_attestor_logged_pending",
                "Logged leaves handed to the vitals.logged announcer and not yet acknowledged by Kafka",
            )?,
            logged_announced: IntCounter::new(
                "vitaltrail_attestor_logged_announced_total",
                "Leaves announced on vitals.logged (acknowledged by Kafka)",
            )?,
            parquet_files: IntGaugeVec::new(
                Opts::new(
                    "vitaltrail_attestor_parquet_files",
                    "Live Parquet files of the readings table per partition (compacted past 16 small files per date)",
                ),
                &["partition"],
            )?,
            parquet_compaction_errors: IntCounterVec::new(
                Opts::new(
                    "vitaltrail_attestor_parquet_compaction_errors_total",
                    "Parquet compaction passes that failed (retried; the partition keeps logging)",
                ),
                &["partition"],
            )?,
            parquet_compactions: IntCounterVec::new(
                Opts::new(
                    "vitaltrail_attestor_parquet_compactions_total",
                    "Runs of small Parquet files merged into one",
                ),
                &["partition"],
            )?,
            windows_cached: IntGaugeVec::new(
                Opts::new(
                    "vitaltrail_attestor_windows_cached",
                    "Device anti-replay windows held in memory (at most 100000 per partition)",
                ),
                &["partition"],
            )?,
            appended: IntCounterVec::new(
                Opts::new(
                    "vitaltrail_attestor_appended_total",
                    "Readings appended to a partition log",
                ),
                &["partition"],
            )?,
            rejected: IntCounterVec::new(
                Opts::new(
                    "vitaltrail_attestor_rejected_total",
                    "Readings rejected by the attestor",
                ),
                &["reason"],
            )?,
            tree_size: IntGaugeVec::new(
                Opts::new(
                    "vitaltrail_attestor_tree_size_leaves",
                    "Leaves in the partition log",
                ),
                &["partition"],
            )?,
            checkpoint_lag: IntGaugeVec::new(
                Opts::new(
                    "vitaltrail_attestor_checkpoint_lag_leaves",
                    "Leaves appended since the last signed checkpoint",
                ),
                &["partition"],
            )?,
            checkpoints: IntCounterVec::new(
                Opts::new(
                    "vitaltrail_attestor_checkpoints_total",
                    "Checkpoints signed",
                ),
                &["partition"],
            )?,
            commit_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "vitaltrail_attestor_commit_seconds",
                    "Time to make one batch durable",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5,
                ]),
                &["partition"],
            )?,
            batch_size: HistogramVec::new(
                HistogramOpts::new(
                    "vitaltrail_attestor_batch_records",
                    "Records per processed batch",
                )
                .buckets(vec![1.0, 4.0, 16.0, 64.0, 256.0, 1024.0]),
                &["partition"],
            )?,
        };
        registry.register(Box::new(m.receipts.clone()))?;
        registry.register(Box::new(m.receipts_dropped.clone()))?;
        registry.register(Box::new(m.logged_pending.clone()))?;
        registry.register(Box::new(m.logged_announced.clone()))?;
        registry.register(Box::new(m.windows_cached.clone()))?;
        registry.register(Box::new(m.parquet_files.clone()))?;
        registry.register(Box::new(m.parquet_compactions.clone()))?;
        registry.register(Box::new(m.parquet_compaction_errors.clone()))?;
        registry.register(Box::new(m.appended.clone()))?;
        registry.register(Box::new(m.rejected.clone()))?;
        registry.register(Box::new(m.tree_size.clone()))?;
        registry.register(Box::new(m.checkpoint_lag.clone()))?;
        registry.register(Box::new(m.checkpoints.clone()))?;
        registry.register(Box::new(m.commit_seconds.clone()))?;
        registry.register(Box::new(m.batch_size.clone()))?;
        Ok(m)
    }
}
