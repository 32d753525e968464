//! The device gate of the embedded broker: mutual TLS, then an MQTT 3.1.1
//! stream that may touch only the device's own topics.
//!
//! For each connection, in order:
//! 1. a free slot (at most [`GateConfig::max_connections`]), else closed;
//! 2. the TLS handshake, within [`GateConfig::handshake_timeout`], with a
//!    client certificate of the device CA ([`crate::pki`]);
//! 3. the device is the certificate's public key (its `did:key`), and the
//!    registry must hold it as active;
//! 4. the first packet is CONNECT, within the same timeout. The gate
//!    replaces its client ID with the DID (so no device can take over
//!    another client's ID or session, the pipeline's included) and its
//!    login with the gate's own, and drops a will for any topic but the
//!    device's;
//! 5. then every packet from the device is checked before it is passed on:
//!    PUBLISH only to `vitals/<did>` or below it (below it reaches ingest,
//!    which dead-letters it), never retained, and only while the device is
//!    still active; SUBSCRIBE only to `receipts/<did>`. Anything else
//!    closes the connection. What the broker sends back is passed through.
//!
//! A closed connection costs the device nothing it cannot resend: the
//! broker acknowledged none of what the gate did not pass on. Every
//! refusal is counted by reason (`vitaltrail_mqtt_gate_refused_total`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Login, Packet};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use vitaltrail_core::auth::Token;
use vitaltrail_core::topics;

use crate::metrics::GateMetrics;
use crate::{Error, Result};

/// Whether the registry holds a device (by DID) as active.
pub type DeviceCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Typed configuration of the gate.
#[derive(Debug, Clone)]
pub struct GateConfig {
    /// Where devices connect.
    pub listen: SocketAddr,
    /// TLS: the broker's certificate, and the device CA to verify clients.
    pub tls: Arc<rustls::ServerConfig>,
    /// The embedded broker.
    pub upstream: SocketAddr,
    /// The token the gate logs in to the broker with.
    pub token: Token,
    /// Time allowed for the TLS handshake, and again for CONNECT.
    pub handshake_timeout: Duration,
    /// Most device connections at once.
    pub max_connections: usize,
    /// Largest MQTT packet a device may send.
    pub max_packet: usize,
}

impl GateConfig {
    /// A gate on `listen` for the devices of `pki`'s CA, in front of the
    /// broker at `upstream`.
    pub fn new(
        listen: SocketAddr,
        pki: &crate::Pki,
        upstream: SocketAddr,
        token: Token,
    ) -> Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(pki.ca_pem().as_bytes()) {
            roots.add(c.map_err(|e| Error::Tls(format!("CA: {e}")))?)?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        )
        .build()
        .map_err(|e| Error::Tls(e.to_string()))?;
        let cert_path = pki.path("server.pem");
        let key_path = pki.path("server.key");
        let chain = CertificateDer::pem_file_iter(&cert_path)
            .and_then(|i| i.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| Error::Tls(format!("{}: {e}", cert_path.display())))?;
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| Error::Tls(format!("{}: {e}", key_path.display())))?;
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        Ok(GateConfig {
            listen,
            tls: Arc::new(tls),
            upstream,
            token,
            handshake_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_packet: crate::embedded::MAX_PAYLOAD + 1024,
        })
    }
}

/// Run the gate until `shutdown`.
pub async fn run(
    cfg: GateConfig,
    check: DeviceCheck,
    metrics: GateMetrics,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| Error::Broker(format!("gate: binding {}: {e}", cfg.listen)))?;
    tracing::info!(listen = %cfg.listen, "MQTT device gate (mutual TLS) listening");
    metrics.max_connections.set(cfg.max_connections as i64);
    let acceptor = TlsAcceptor::from(cfg.tls.clone());
    let slots = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections));
    let cfg = Arc::new(cfg);
    loop {
        tokio::select! {
            r = listener.accept() => {
                let Ok((tcp, peer)) = r else { continue };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    metrics.refused.with_label_values(&["full"]).inc();
                    continue;
                };
                let (acceptor, cfg, check, metrics) =
                    (acceptor.clone(), cfg.clone(), check.clone(), metrics.clone());
                tokio::spawn(async move {
                    if let Err(reason) = connection(tcp, acceptor, &cfg, &check, &metrics).await {
                        tracing::debug!(%peer, reason, "gate closed a device connection");
                        metrics.refused.with_label_values(&[reason]).inc();
                    }
                    drop(slot);
                });
            }
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        }
    }
}

/// The device a verified client certificate names: its public key.
fn device_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, x) = x509_parser::parse_x509_certificate(cert).ok()?;
    let raw: [u8; 32] = x
        .public_key()
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .ok()?;
    let key = ed25519_dalek::VerifyingKey::from_bytes(&raw).ok()?;
    Some(
        vitaltrail_core::DeviceId::from_verifying_key(key)
            .ok()?
            .as_str()
            .to_owned(),
    )
}

type Refused = &'static str;

async fn read_packet<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> std::result::Result<Option<Packet>, Refused> {
    loop {
        match Packet::read(buf, max) {
            Ok(p) => return Ok(Some(p)),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(n)) => {
                buf.reserve(n.min(max));
                match rd.read_buf(buf).await {
                    Ok(0) | Err(_) => return Ok(None),
                    Ok(_) => {}
                }
            }
            Err(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(_)) => return Err("too_large"),
            Err(_) => return Err("malformed"),
        }
    }
}

fn own_publish_topic(did: &str, topic: &str) -> bool {
    topic
        .strip_prefix(topics::VITALS)
        .and_then(|rest| rest.strip_prefix(did))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// What the device sent, checked; `Err` closes the connection.
fn admit(p: Packet, did: &str, check: &DeviceCheck) -> std::result::Result<Packet, Refused> {
    match p {
        Packet::Publish(mut p) => {
            if !own_publish_topic(did, &p.topic) {
                return Err("topic");
            }
            if !check(did) {
                return Err("not_registered");
            }
            p.retain = false;
            Ok(Packet::Publish(p))
        }
        Packet::Subscribe(s) => {
            let own = topics::receipts_topic(did);
            if s.filters.iter().all(|f| Some(&f.path) == own.as_ref()) && !s.filters.is_empty() {
                Ok(Packet::Subscribe(s))
            } else {
                Err("subscribe")
            }
        }
        p @ (Packet::Unsubscribe(_)
        | Packet::PubAck(_)
        | Packet::PubRec(_)
        | Packet::PubRel(_)
        | Packet::PubComp(_)
        | Packet::PingReq
        | Packet::Disconnect) => Ok(p),
        _ => Err("protocol"),
    }
}

async fn connection(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    cfg: &GateConfig,
    check: &DeviceCheck,
    metrics: &GateMetrics,
) -> std::result::Result<(), Refused> {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(cfg.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => return Err("tls"),
        Err(_) => return Err("handshake_timeout"),
    };
    let did = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(device_of)
        .ok_or("certificate")?;
    if !check(&did) {
        return Err("not_registered");
    }
    let (mut rd, mut wr) = tokio::io::split(tls);
    let mut buf = BytesMut::with_capacity(4096);
    let first = tokio::time::timeout(
        cfg.handshake_timeout,
        read_packet(&mut rd, &mut buf, cfg.max_packet),
    )
    .await
    .map_err(|_| "no_connect")??;
    let Some(Packet::Connect(mut c)) = first else {
        return Err("no_connect");
    };
    c.client_id = did.clone();
    c.login = Some(Login::new(crate::GATE_USER, cfg.token.expose()));
    if let Some(w) = &mut c.last_will {
        if own_publish_topic(&did, &w.topic) {
            w.retain = false;
        } else {
            c.last_will = None;
        }
    }
    let up = TcpStream::connect(cfg.upstream)
        .await
        .map_err(|_| "upstream")?;
    let _ = up.set_nodelay(true);
    let (mut urd, mut uwr) = up.into_split();
    let mut out = BytesMut::with_capacity(4096);
    Packet::Connect(c)
        .write(&mut out, cfg.max_packet)
        .map_err(|_| "malformed")?;
    uwr.write_all(&out).await.map_err(|_| "upstream")?;
    metrics.accepted.inc();
    metrics.connections.inc();
    tracing::debug!(device = %did, "device connected through the gate");
    // Broker → device: passed through as it comes.
    let mut down = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut urd, &mut wr).await;
        let _ = wr.shutdown().await;
    });
    // Device → broker: checked packet by packet.
    let result = loop {
        tokio::select! {
            p = read_packet(&mut rd, &mut buf, cfg.max_packet) => {
                let p = match p {
                    Ok(Some(p)) => p,
                    Ok(None) => break Ok(()),
                    Err(r) => break Err(r),
                };
                let p = match admit(p, &did, check) {
                    Ok(p) => p,
                    Err(r) => {
                        tracing::warn!(device = %did, reason = r, "gate closed a device connection");
                        break Err(r);
                    }
                };
                out.clear();
                if p.write(&mut out, cfg.max_packet).is_err() {
                    break Err("malformed");
                }
                if uwr.write_all(&out).await.is_err() {
                    break Ok(());
                }
            }
            _ = &mut down => break Ok(()),
        }
    };
    down.abort();
    metrics.connections.dec();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const DID: &str = "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK";

    #[test]
    fn a_device_publishes_only_under_its_own_topic() {
        assert!(own_publish_topic(DID, &format!("vitals/{DID}")));
        assert!(own_publish_topic(DID, &format!("vitals/{DID}/extra")));
        for t in [
            "vitals/#".to_owned(),
            "vitals/".to_owned(),
            format!("vitals/{DID}x"),
            format!("receipts/{DID}"),
            format!("x/vitals/{DID}"),
            "vitals/did:key:z6MkiTBz1ymuepAQ4HEHYSF1H8quG5GLVVQR3djdX3mDooWp".to_owned(),
        ] {
            assert!(!own_publish_topic(DID, &t), "{t}");
        }
    }

    #[test]
    fn subscriptions_and_publishes_outside_its_own_close_the_connection() {
        use rumqttc::mqttbytes::QoS;
        use rumqttc::mqttbytes::v4::{Publish, Subscribe, SubscribeFilter};
        let yes: DeviceCheck = Arc::new(|_| true);
        let no: DeviceCheck = Arc::new(|_| false);
        let sub = |paths: &[&str]| {
            Packet::Subscribe(Subscribe::new_many(
                paths
                    .iter()
                    .map(|p| SubscribeFilter::new((*p).to_owned(), QoS::AtLeastOnce)),
            ))
        };
        let own = format!("receipts/{DID}");
        assert!(admit(sub(&[&own]), DID, &yes).is_ok());
        for bad in [
            vec!["vitals/#"],
            vec!["#"],
            vec!["$share/vitaltrail-up/vitals/#"],
            vec!["receipts/+"],
            vec![own.as_str(), "receipts/#"],
        ] {
            assert_eq!(
                admit(sub(&bad), DID, &yes).err(),
                Some("subscribe"),
                "{bad:?}"
            );
        }
        let mut p = Publish::new(format!("vitals/{DID}"), QoS::AtLeastOnce, vec![1u8]);
        p.retain = true;
        match admit(Packet::Publish(p.clone()), DID, &yes) {
            Ok(Packet::Publish(q)) => assert!(!q.retain, "retain is dropped"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            admit(Packet::Publish(p), DID, &no).err(),
            Some("not_registered"),
            "a device revoked while connected is closed at its next publish"
        );
        assert_eq!(admit(Packet::PingResp, DID, &yes).err(), Some("protocol"));
    }
}
