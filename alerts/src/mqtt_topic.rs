//! MQTT `alerts/<ward>`: each alarm event of a ward, published at QoS 1
//! to the broker nurse stations subscribe to (`docs/alerts.md` §MQTT).
//! The event is taken once the broker's PUBACK says it holds it (in
//! memory: what a nurse station that is offline gets depends on its
//! session, see the doc).
use std::time::Duration;

use rumqttc::{AsyncClient, Event as MqttEvent, Outgoing, Packet, QoS};
use tokio::sync::mpsc;
use vitaltrail_mqtt::MqttEndpoint;

use crate::delivery::{SendError, Sink};
use crate::engine::Event;

/// How long the broker has to acknowledge one event.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// What the connection saw of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Sent with this packet ID.
    Sent(u16),
    /// Acknowledged (PUBACK) by the broker.
    Acked(u16),
}

/// The broker as a delivery channel.
#[derive(Debug)]
pub struct MqttAlerts {
    client: AsyncClient,
    acks: mpsc::Receiver<Seen>,
    poller: tokio::task::JoinHandle<()>,
}

impl Drop for MqttAlerts {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

impl MqttAlerts {
    /// Connect (in the background, reconnecting) as `client_id`.
    pub fn new(endpoint: &MqttEndpoint, client_id: &str) -> MqttAlerts {
        let mut opts = endpoint.options(client_id);
        opts.set_keep_alive(Duration::from_secs(10))
            .set_clean_session(true)
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 16);
        let (tx, acks) = mpsc::channel(64);
        let poller = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(MqttEvent::Incoming(Packet::PubAck(a))) => {
                        let _ = tx.try_send(Seen::Acked(a.pkid));
                    }
                    Ok(MqttEvent::Outgoing(Outgoing::Publish(pkid))) => {
                        let _ = tx.try_send(Seen::Sent(pkid));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "alerts publisher: MQTT connection error; reconnecting");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
        MqttAlerts {
            client,
            acks,
            poller,
        }
    }
}

impl Sink for MqttAlerts {
    async fn send(&mut self, event: &Event, line: &[u8]) -> std::result::Result<(), SendError> {
        // An event without a ward (or one that cannot be a topic level) has
        // no topic: nothing to deliver here.
        let Some(topic) = event
            .alarm
            .ward
            .as_deref()
            .and_then(vitaltrail_core::topics::alerts_topic)
        else {
            return Ok(());
        };
        // Acknowledgements of earlier attempts (one at a time) are stale.
        while self.acks.try_recv().is_ok() {}
        self.client
            .publish(topic, QoS::AtLeastOnce, false, line.to_vec())
            .await
            .map_err(|e| SendError::transient(format!("MQTT: {e}")))?;
        // Only this event is in flight: the first publish sent after it is
        // this one, and only the PUBACK of its packet ID counts (a late
        // one of an earlier attempt does not).
        let acked = tokio::time::timeout(ACK_TIMEOUT, async {
            let mut ours = None;
            while let Some(seen) = self.acks.recv().await {
                match (seen, ours) {
                    (Seen::Sent(p), None) => ours = Some(p),
                    (Seen::Acked(p), Some(o)) if p == o => return true,
                    _ => {}
                }
            }
            false
        })
        .await;
        match acked {
            Ok(true) => Ok(()),
            Ok(false) => Err(SendError::transient("MQTT: the connection task stopped")),
            Err(_) => Err(SendError::transient(
                "MQTT: no PUBACK within 10 s (broker down?)",
            )),
        }
    }
}
