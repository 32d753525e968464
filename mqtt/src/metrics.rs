//! Prometheus metrics of the device gate, registered in an injected registry.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// The gate's metrics.
#[derive(Debug, Clone)]
pub struct GateMetrics {
    /// Device connections open now.
    pub connections: IntGauge,
    /// The most device connections at once (the limit).
    pub max_connections: IntGauge,
    /// Device connections let through to the broker.
    pub accepted: IntCounter,
    /// Connections refused or closed, by reason.
    pub refused: IntCounterVec,
}

impl GateMetrics {
    /// Create and register the metrics.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = GateMetrics {
            connections: IntGauge::new(
                "vitaltrail_mqtt_gate_connections",
                "Device MQTT connections open through the gate",
            )?,
            max_connections: IntGauge::new(
                "vitaltrail_mqtt_gate_connections_max",
                "Most device MQTT connections the gate holds at once",
            )?,
            accepted: IntCounter::new(
                "vitaltrail_mqtt_gate_accepted_total",
                "Device connections authenticated and let through to the broker",
            )?,
            refused: IntCounterVec::new(
                Opts::new(
                    "vitaltrail_mqtt_gate_refused_total",
                    "Device connections refused or closed by the gate, by reason",
                ),
                &["reason"],
            )?,
        };
        registry.register(Box::new(m.connections.clone()))?;
        registry.register(Box::new(m.max_connections.clone()))?;
        registry.register(Box::new(m.accepted.clone()))?;
        registry.register(Box::new(m.refused.clone()))?;
        Ok(m)
    }

    /// Metrics registered nowhere (tests).
    pub fn unregistered() -> Self {
        Self::new(&Registry::new()).expect("fresh registry")
    }
}
