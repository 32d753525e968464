//! Prometheus metrics of the anchor, registered in an injected registry.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// The anchor's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Partition checkpoints offered, by outcome (`advanced`, `duplicate`,
    /// `stale`, `gap`, `fork`, `unknown_log`, `bad_signature`, …).
    pub checkpoints: IntCounterVec,
    /// Partitions stopped by a fork (never anchored again).
    pub forked_partitions: IntGauge,
    /// Partitions in the latest epoch.
    pub partitions: IntGauge,
    /// Epochs closed.
    pub epochs: IntCounter,
    /// The epoch log's size.
    pub epoch_log_size: IntGauge,
    /// Epochs not yet covered by an anchor of each backend.
    pub epochs_pending: IntGaugeVec,
    /// Anchors written (ledger) or confirmed (chain), by backend.
    pub anchors: IntCounterVec,
    /// The epoch log size each backend has anchored.
    pub anchored_size: IntGaugeVec,
    /// Seconds from an epoch's close to its anchor (durable or confirmed).
    pub anchor_latency: HistogramVec,
    /// Anchor attempts that failed (retried), by backend.
    pub anchor_errors: IntCounterVec,
    /// Gas used by confirmed anchor transactions.
    pub gas_used: IntCounterVec,
    /// Confirmations of the latest anchor transaction.
    pub confirmations: IntGaugeVec,
    /// Announced checkpoints waiting for the anchor (the bounded queue).
    pub queue_depth: IntGauge,
}

impl Metrics {
    /// Create and register the metrics.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Metrics {
            checkpoints: IntCounterVec::new(
                Opts::new(
                    "vitaltrail_anchor_checkpoints_total",
                    "Partition checkpoints offered to the anchor, by outcome",
                ),
                &["outcome"],
            )?,
            forked_partitions: IntGauge::new(
                "vitaltrail_anchor_forked_partitions",
                "Partitions whose log forked: they are never anchored again (needs an operator)",
            )?,
            partitions: IntGauge::new(
                "vitaltrail_anchor_partitions",
                "Partitions held in the latest epoch",
            )?,
            epochs: IntCounter::new("vitaltrail_anchor_epochs_total", "Epochs closed")?,
            epoch_log_size: IntGauge::new(
                "vitaltrail_anchor_epoch_log_size",
                "Epochs in the epoch log",
            )?,
            epochs_pending: IntGaugeVec::new(
                Opts::new(
                    "vitaltrail_anchor_epochs_pending",
                    "Epochs not yet covered by an anchor, per backend",
                ),
                &["backend"],
            )?,
            anchors: IntCounterVec::new(
                Opts::new(
                    "vitaltrail_anchor_anchors_total",
                    "Anchors written (ledger) or confirmed (chain), per backend",
                ),
                &["backend"],
            )?,
            anchored_size: IntGaugeVec::new(
                Opts::new(
                    "vitaltrail_anchor_anchored_size",
                    "The epoch log size each backend has anchored",
                ),
                &["backend"],
            )?,
            anchor_latency: HistogramVec::new(
                HistogramOpts::new(
                    "vitaltrail_anchor_latency_seconds",
                    "Seconds from an epoch's close to an anchor covering it (durable or confirmed)",
                )
                .buckets(vec![
                    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0,
                ]),
                &["backend"],
            )?,
            anchor_errors: IntCounterVec::new(
                Opts::new(
                    "vitaltrail_anchor_errors_total",
                    "Anchor attempts that failed and are retried (RPC errors), per backend",
                ),
                &["backend"],
            )?,
            gas_used: IntCounterVec::new(
                Opts::new(
                    "vitaltrail_anchor_gas_used_total",
                    "Gas used by confirmed anchor transactions",
                ),
                &["backend"],
            )?,
            confirmations: IntGaugeVec::new(
                Opts::new(
                    "vitaltrail_anchor_confirmations",
                    "Confirmations of the latest anchor transaction",
                ),
                &["backend"],
            )?,
            queue_depth: IntGauge::new(
                "vitaltrail_anchor_queue_depth",
                "Announced checkpoints waiting for the anchor (bounded)",
            )?,
        };
        registry.register(Box::new(m.checkpoints.clone()))?;
        registry.register(Box::new(m.forked_partitions.clone()))?;
        registry.register(Box::new(m.partitions.clone()))?;
        registry.register(Box::new(m.epochs.clone()))?;
        registry.register(Box::new(m.epoch_log_size.clone()))?;
        registry.register(Box::new(m.epochs_pending.clone()))?;
        registry.register(Box::new(m.anchors.clone()))?;
        registry.register(Box::new(m.anchored_size.clone()))?;
        registry.register(Box::new(m.anchor_latency.clone()))?;
        registry.register(Box::new(m.anchor_errors.clone()))?;
        registry.register(Box::new(m.gas_used.clone()))?;
        registry.register(Box::new(m.confirmations.clone()))?;
        registry.register(Box::new(m.queue_depth.clone()))?;
        Ok(m)
    }
}
