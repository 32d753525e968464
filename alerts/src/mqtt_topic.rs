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
    endpoint: MqttEndpoint,
    client_id: String,
    conn: Option<Conn>,
}

/// One connection: the client, what its event loop saw, the loop's task.
#[derive(Debug)]
struct Conn {
    client: AsyncClient,
    seen: mpsc::Receiver<Seen>,
    poller: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

impl MqttAlerts {
    /// Publish (connecting in the background) as `client_id`.
    pub fn new(endpoint: &MqttEndpoint, client_id: &str) -> MqttAlerts {
        MqttAlerts {
            endpoint: endpoint.clone(),
            client_id: client_id.to_owned(),
            conn: None,
        }
    }

    fn connect(&self) -> Conn {
        let mut opts = self.endpoint.options(&self.client_id);
        opts.set_keep_alive(Duration::from_secs(10))
            .set_clean_session(true)
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 16);
        let (tx, seen) = mpsc::channel(64);
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
        Conn {
            client,
            seen,
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
        if line.len() > vitaltrail_mqtt::embedded::MAX_PAYLOAD {
            return Err(SendError {
                why: format!(
                    "MQTT: {} bytes is over the broker's message limit",
                    line.len()
                ),
                permanent: true,
            });
        }
        let conn = match &mut self.conn {
            Some(c) => c,
            None => self.conn.insert(self.connect()),
        };
        // Only this event is in flight on this connection: the first
        // publish sent is this one, and only the PUBACK of its packet ID
        // counts.
        let attempt = async {
            conn.client
                .publish(topic, QoS::AtLeastOnce, false, line.to_vec())
                .await
                .map_err(|e| format!("MQTT: {e}"))?;
            let mut ours = None;
            while let Some(seen) = conn.seen.recv().await {
                match (seen, ours) {
                    (Seen::Sent(p), None) => ours = Some(p),
                    (Seen::Acked(p), Some(o)) if p == o => return Ok(()),
                    _ => {}
                }
            }
            Err("MQTT: the connection task stopped".to_owned())
        };
        let r = match tokio::time::timeout(ACK_TIMEOUT, attempt).await {
            Ok(r) => r,
            Err(_) => Err("MQTT: no PUBACK within 10 s (broker down?)".to_owned()),
        };
        if r.is_err() {
            // A fresh connection for the next attempt: nothing of this one
            // (queued copies, late acknowledgements) carries over.
            self.conn = None;
        }
        r.map_err(SendError::transient)
    }
}
