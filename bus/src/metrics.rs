//! Prometheus metrics of the dead-letter store, registered in an injected
//! registry.

use prometheus::{IntCounter, IntGauge, Registry};

/// The dead-letter store's metrics: its size against its cap, and how many
/// rejections were kept in full or only counted.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Size of the dead-letter file, bytes.
    pub bytes: IntGauge,
    /// Its cap, bytes (past it only summaries are written).
    pub max_bytes: IntGauge,
    /// Rejections written in full.
    pub kept: IntCounter,
    /// Rejections counted in summaries (past a rate or size limit).
    pub summarised: IntCounter,
}

impl Metrics {
    /// Create and register the metrics.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Metrics {
            bytes: IntGauge::new(
                "vitaltrail_bus_dead_letter_bytes",
                "Size of the dead-letter file",
            )?,
            max_bytes: IntGauge::new(
                "vitaltrail_bus_dead_letter_max_bytes",
                "Cap of the dead-letter file; past it rejections are only counted",
            )?,
            kept: IntCounter::new(
                "vitaltrail_bus_dead_letters_kept_total",
                "Rejections written to the dead-letter store in full",
            )?,
            summarised: IntCounter::new(
                "vitaltrail_bus_dead_letters_summarised_total",
                "Rejections only counted, past the per-source rate or the size cap",
            )?,
        };
        registry.register(Box::new(m.bytes.clone()))?;
        registry.register(Box::new(m.max_bytes.clone()))?;
        registry.register(Box::new(m.kept.clone()))?;
        registry.register(Box::new(m.summarised.clone()))?;
        Ok(m)
    }
}
