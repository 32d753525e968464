//! Prometheus metrics of the ingest tier, registered in an injected registry.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// The ingest tier's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// MQTT messages received.
    pub readings_in: IntCounter,
    /// Readings accepted onto the bus.
    pub accepted: IntCounter,
    /// Readings rejected, by reason.
    pub rejected: IntCounterVec,
    /// Messages per verification batch.
    pub batch_size: Histogram,
    /// Time to batch-verify one batch, seconds.
    pub verify_seconds: Histogram,
    /// Time from handing a reading to the bus until it is durably accepted, seconds.
    pub bus_send_seconds: Histogram,
    /// Readings received but not yet acknowledged to MQTT.
    pub pending: IntGauge,
    /// Records waiting in the bus's bounded queues.
    pub queue_depth: IntGauge,
    /// MQTT connections whose subscription the broker has acknowledged
    /// (ingest is ready when all of them are).
    pub subscribed: IntGauge,
    /// Rejection receipts dropped because the publisher's queue was full.
    pub receipts_dropped: IntCounter,
    /// Acknowledgements waiting for room in the MQTT client's queue.
    pub deferred_acks: IntGauge,
}

impl Metrics {
    /// Create and register the metrics.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Metrics {
            deferred_acks: IntGauge::new(
                "vitaltrail_ingest_deferred_acks",
                "MQTT acknowledgements waiting for room in the client's queue",
            )?,
            receipts_dropped: IntCounter::new(
                "vitaltrail_ingest_receipts_dropped_total",
                "Rejection receipts dropped because the publisher's bounded queue was full",
            )?,
            subscribed: IntGauge::new(
                "vitaltrail_ingest_subscribed_connections",
                "MQTT connections whose subscription the broker has acknowledged",
            )?,

            readings_in: IntCounter::new(
                "vitaltrail_ingest_readings_in_total",
                "MQTT messages received",
            )?,
            accepted: IntCounter::new(
                "vitaltrail_ingest_accepted_total",
                "Readings accepted onto the bus",
            )?,
            rejected: IntCounterVec::new(
                Opts::new(
                    "vitaltrail_ingest_rejected_total",
                    "Readings rejected by ingest",
                ),
                &["reason"],
            )?,
            batch_size: Histogram::with_opts(
                HistogramOpts::new(
                    "vitaltrail_ingest_batch_records",
                    "Messages per verification batch",
                )
                .buckets(vec![1.0, 4.0, 16.0, 64.0, 128.0, 256.0, 512.0]),
            )?,
            verify_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "vitaltrail_ingest_verify_seconds",
                    "Time to batch-verify one batch",
                )
                .buckets(vec![0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05]),
            )?,
            bus_send_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "vitaltrail_ingest_bus_send_seconds",
                    "Time until the bus durably accepted a reading",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0,
                ]),
            )?,
            pending: IntGauge::new(
                "vitaltrail_ingest_pending_readings",
                "Readings not yet acknowledged to MQTT",
            )?,
            queue_depth: IntGauge::new(
                "vitaltrail_ingest_queue_depth_records",
                "Records waiting in bus queues",
            )?,
        };
        registry.register(Box::new(m.receipts_dropped.clone()))?;
        registry.register(Box::new(m.deferred_acks.clone()))?;
        registry.register(Box::new(m.subscribed.clone()))?;
        registry.register(Box::new(m.readings_in.clone()))?;
        registry.register(Box::new(m.accepted.clone()))?;
        registry.register(Box::new(m.rejected.clone()))?;
        registry.register(Box::new(m.batch_size.clone()))?;
        registry.register(Box::new(m.verify_seconds.clone()))?;
        registry.register(Box::new(m.bus_send_seconds.clone()))?;
        registry.register(Box::new(m.pending.clone()))?;
        registry.register(Box::new(m.queue_depth.clone()))?;
        Ok(m)
    }
}
