//! The broker `vitaltrail up` runs in process (rumqttd 0.20).
//!
//! rumqttd has no topic ACLs, and it does a TLS handshake inside its accept
//! loop, with no timeout (one silent client would stall every other). So
//! devices never reach it directly: they connect to the [`crate::gate`],
//! which terminates mutual TLS, checks the device's certificate and the
//! registry, and holds each device to its own topics. rumqttd listens only
//! for the gate and the pipeline (ingest, the receipt publisher), on
//! loopback, and with a login it takes only the users
//! [`crate::PIPELINE_USER`] and [`crate::GATE_USER`] with the node's token.
//! Without a login it is open: for benchmarks and tests only, never `up`.

use std::collections::HashMap;
use std::net::SocketAddr;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use subtle::ConstantTimeEq as _;
use vitaltrail_core::auth::Token;

use crate::{Error, Result};

/// The largest message the broker takes (and what ingest and the gate allow).
pub const MAX_PAYLOAD: usize = 256 * 1024;

/// The memory rumqttd keeps per subscription filter (a device's receipt
/// topic): this many segments of this many bytes, whether or not the
/// messages were delivered.
pub const SEGMENT_SIZE: usize = 64 * 1024;
/// See [`SEGMENT_SIZE`].
pub const SEGMENT_COUNT: usize = 2;

/// Typed configuration of the embedded broker.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// Where it listens (loopback, for the gate and the pipeline).
    pub listen: SocketAddr,
    /// The token its clients must give (with user name
    /// [`crate::PIPELINE_USER`] or [`crate::GATE_USER`]); `None` leaves it
    /// open (tests and benchmarks only).
    pub token: Option<Token>,
    /// Most connections at once.
    pub max_connections: usize,
}

impl EmbeddedConfig {
    /// An open broker on `listen` (tests and benchmarks).
    pub fn open(listen: SocketAddr) -> Self {
        EmbeddedConfig {
            listen,
            token: None,
            max_connections: 10_010,
        }
    }
}

fn settings(listen: SocketAddr) -> ServerSettings {
    ServerSettings {
        name: "vitaltrail".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: MAX_PAYLOAD,
            max_inflight_count: 1000,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}

/// Start the broker (on its own threads). The returned future resolves,
/// with the reason, if the broker stops: the caller must treat that as the
/// death of a stage.
pub fn start(
    cfg: &EmbeddedConfig,
) -> Result<impl std::future::Future<Output = Result<()>> + Send + use<>> {
    let mut v4 = HashMap::new();
    let mut s = settings(cfg.listen);
    if let Some(token) = &cfg.token {
        let token = token.clone();
        s.set_auth_handler(move |_client_id, user: String, pass: String| {
            let ok = (user == crate::PIPELINE_USER || user == crate::GATE_USER)
                && pass.len() == token.expose().len()
                && bool::from(pass.as_bytes().ct_eq(token.expose().as_bytes()));
            if !ok {
                tracing::warn!(user = %user, "embedded broker refused a client (wrong user or token)");
            }
            async move { ok }
        });
    }
    v4.insert("1".to_owned(), s);
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: cfg.max_connections,
            max_outgoing_packet_count: 1000,
            // rumqttd keeps every message of a filter in memory, delivered
            // or not, up to size × count. Per receipt topic (one filter per
            // device) that would be 160 MiB: keep 2 × 64 KiB (an offline
            // device's older receipts are dropped; it resends and gets a
            // duplicate receipt). Only the readings filter keeps more.
            max_segment_size: SEGMENT_SIZE,
            max_segment_count: SEGMENT_COUNT,
            custom_segment: Some(HashMap::from([(
                vitaltrail_core::topics::VITALS_FILTER.to_owned(),
                rumqttd::SegmentConfig {
                    max_segment_size: 16 * 1024 * 1024,
                    max_segment_count: 10,
                },
            )])),
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(v4),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    let mut broker = Broker::new(config);
    let (tx, rx) = tokio::sync::oneshot::channel::<String>();
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            // A panic here drops `tx` as well: the receiver sees it either way.
            let why = match broker.start() {
                Ok(()) => "the embedded MQTT broker returned".to_owned(),
                Err(e) => format!("the embedded MQTT broker failed: {e}"),
            };
            let _ = tx.send(why);
        })
        .map_err(|e| Error::Broker(e.to_string()))?;
    Ok(async move {
        let why = rx
            .await
            .unwrap_or_else(|_| "the embedded MQTT broker thread panicked".to_owned());
        tracing::error!(reason = %why, "a stage died");
        Err(Error::Broker(why))
    })
}
