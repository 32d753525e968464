//! Publishing receipts (`docs/receipts.md`) to `receipts/<did>`, QoS 1.
//!
//! The attestor builds one receipt per device per log commit; ingest builds
//! one per device for the messages it finally rejected. Both hand them to a
//! bounded queue that [`publish`] drains onto MQTT through its own
//! connection. The log never waits for MQTT: a full queue drops receipts
//! (counted), and a device without a receipt resends, which the attestor
//! answers with a duplicate's receipt.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, QoS};
use tokio::sync::{mpsc, watch};
use vitaltrail_core::receipt::Receipt;

/// The publisher's metrics; `publisher` (a constant label) tells apart the
/// publishers of one process (`ingest`, `attestor`).
#[derive(Debug, Clone)]
pub struct ReceiptMetrics {
    /// Receipts published to MQTT.
    pub published: prometheus::IntCounter,
    /// Receipts waiting in the bounded queue.
    pub queued: prometheus::IntGauge,
    /// Receipts not published: not for a valid DID, or refused by the client.
    pub skipped: prometheus::IntCounter,
}

impl ReceiptMetrics {
    /// Create and register the metrics.
    pub fn new(registry: &prometheus::Registry, publisher: &str) -> prometheus::Result<Self> {
        let label = |o: prometheus::Opts| o.const_label("publisher", publisher);
        let m = ReceiptMetrics {
            published: prometheus::IntCounter::with_opts(label(prometheus::Opts::new(
                "vitaltrail_ingest_receipts_published_total",
                "Receipts published to MQTT (receipts/<did>, QoS 1)",
            )))?,
            queued: prometheus::IntGauge::with_opts(label(prometheus::Opts::new(
                "vitaltrail_ingest_receipts_queued",
                "Receipts waiting in the publisher's bounded queue",
            )))?,
            skipped: prometheus::IntCounter::with_opts(label(prometheus::Opts::new(
                "vitaltrail_ingest_receipts_skipped_total",
                "Receipts not published: not for a valid DID, or refused by the MQTT client",
            )))?,
        };
        registry.register(Box::new(m.published.clone()))?;
        registry.register(Box::new(m.queued.clone()))?;
        registry.register(Box::new(m.skipped.clone()))?;
        Ok(m)
    }
}

/// Topic prefix of receipts: `receipts/<device DID>`.
pub const RECEIPTS_PREFIX: &str = vitaltrail_core::topics::RECEIPTS;

/// Where receipts go.
#[derive(Debug, Clone)]
pub struct ReceiptConfig {
    /// The MQTT broker, and how the publisher authenticates to it.
    pub mqtt: crate::MqttEndpoint,
    /// The publisher's client ID.
    pub client_id: String,
    /// Receipts queued for publishing at most.
    pub queue: usize,
}

impl Default for ReceiptConfig {
    fn default() -> Self {
        ReceiptConfig {
            mqtt: crate::MqttEndpoint::default(),
            client_id: "vitaltrail-receipts".into(),
            queue: 65_536,
        }
    }
}

/// A bounded queue of receipts for [`publish`].
pub fn queue(cfg: &ReceiptConfig) -> (mpsc::Sender<Receipt>, mpsc::Receiver<Receipt>) {
    mpsc::channel(cfg.queue.max(1))
}

/// Publish receipts from `rx` until it closes or `shutdown` (then what is
/// queued is still sent, for a moment). Reconnects on its own.
pub async fn publish(
    cfg: ReceiptConfig,
    mut rx: mpsc::Receiver<Receipt>,
    metrics: ReceiptMetrics,
    mut shutdown: watch::Receiver<bool>,
) -> crate::Result<()> {
    let mut opts = cfg.mqtt.options(&cfg.client_id);
    opts.set_keep_alive(Duration::from_secs(10))
        .set_clean_session(true)
        .set_inflight(1000)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 4096);
    let poller = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(_)) | Ok(Event::Outgoing(_)) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "receipt publisher: MQTT connection error; reconnecting");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    let mut stopping = false;
    // Parsed `did:key`s of devices with readings in the log (bounded): a
    // parse is a curve-point decompression.
    let mut dids = vitaltrail_core::DidCache::default();
    loop {
        let r = if stopping {
            // What is still queued, for a moment; then stop.
            tokio::time::timeout(Duration::from_millis(500), rx.recv())
                .await
                .ok()
                .flatten()
        } else {
            tokio::select! {
                r = rx.recv() => r,
                _ = shutdown.wait_for(|s| *s) => {
                    stopping = true;
                    continue;
                }
            }
        };
        let Some(r) = r else {
            break;
        };
        metrics.queued.set(rx.len() as i64);
        // The DID comes from a record (Kafka) or an MQTT topic: publish only
        // to a valid DID's topic, never to one a hostile key could shape
        // (wildcards, levels).
        // Only a receipt with a logged entry (so a checkpoint) names a
        // registered device; a rejection may name any DID, and those must
        // not churn the cache (core::DidCache).
        let topic = vitaltrail_core::topics::receipts_topic(&r.did).filter(|_| {
            if r.checkpoint.is_some() {
                dids.resolve(&r.did).is_ok()
            } else {
                vitaltrail_core::DeviceId::parse(&r.did).is_ok()
            }
        });
        let Some(topic) = topic else {
            metrics.skipped.inc();
            continue;
        };
        if let Err(e) = client
            .publish(topic, QoS::AtLeastOnce, false, r.to_json())
            .await
        {
            if poller.is_finished() {
                break;
            }
            tracing::warn!(error = %e, "receipt not published");
            metrics.skipped.inc();
            continue;
        }
        metrics.published.inc();
    }
    let _ = client.disconnect().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    poller.abort();
    Ok(())
}
