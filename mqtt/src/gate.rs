//! The device gate of the embedded broker: mutual TLS, then an MQTT 3.1.1
//! stream that may touch only the device's own topics.
//!
//! For each connection, in order:
//! 1. a handshake slot: at most [`GateConfig::max_handshakes`] connections
//!    in the handshake at once, and [`GateConfig::max_handshakes_per_ip`]
//!    from one address, else closed at once;
//! 2. the TLS handshake, within [`GateConfig::handshake_timeout`], with a
//!    client certificate of the device CA ([`crate::pki`]);
//! 3. the device is the certificate's Ed25519 public key (its `did:key`;
//!    the certificate's common name, if any, must be that DID too), and the
//!    registry must hold it as active;
//! 4. the first packet is CONNECT (at most 16 KiB), within the same
//!    timeout again (the handshake slot is held until then);
//! 5. a device slot (at most [`GateConfig::max_connections`] devices), so
//!    connections that never finish TLS and CONNECT cannot keep devices
//!    out; the handshake slot is given back. The gate replaces its client ID with the DID (so no device
//!    can take over another client's ID or session, the pipeline's
//!    included), its login with the gate's own, caps its keep-alive at
//!    [`MAX_KEEP_ALIVE_SECS`], and drops a will for any topic but the
//!    device's own;
//! 6. then every packet from the device is checked before it is passed on:
//!    PUBLISH at QoS 0 or 1 only to exactly `vitals/<did>`, never retained,
//!    and only while the device is still active; SUBSCRIBE only to
//!    `receipts/<did>`; acknowledgements of QoS 1, pings, unsubscribes.
//!    Anything else (QoS 2 included: rumqttd would hold such messages
//!    until a PUBREL that need never come) closes the connection. What the
//!    broker sends back is passed through.
//!
//! A closed connection costs the device nothing it cannot resend: the
//! broker acknowledged none of what the gate did not pass on. Every
//! refusal is counted by reason (`vitaltrail_mqtt_gate_refused_total`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
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

/// The wards of an active viewer (a nurse station), by name and the
/// fingerprint of its certificate's key (only the latest certificate
/// issued for a name counts); `None`: not an active viewer
/// ([`crate::viewers`]).
#[derive(Clone)]
pub struct ViewerCheck(pub Arc<WardsOf>);

/// A viewer's name and key fingerprint → its wards, if active.
pub type WardsOf = dyn Fn(&str, &str) -> Option<Vec<String>> + Send + Sync;

impl std::fmt::Debug for ViewerCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ViewerCheck")
    }
}

/// Who a verified client certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Peer {
    /// A device, by DID.
    Device(String),
    /// A nurse station, by name and key fingerprint.
    Viewer(String, String),
}

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
    /// Most connections in the TLS handshake at once.
    pub max_handshakes: usize,
    /// Most connections in the TLS handshake at once from one IP address.
    pub max_handshakes_per_ip: usize,
    /// Most device connections at once (after their certificate verified).
    pub max_connections: usize,
    /// Publishes per second one device may send, on average…
    pub max_publish_rate: f64,
    /// …and in a burst (a device resending its buffer after a reconnect).
    pub publish_burst: f64,
    /// Close a device that has not read what the broker sends it for this
    /// long.
    pub stall_timeout: Duration,
    /// Largest MQTT packet a device may send.
    pub max_packet: usize,
    /// Nurse stations: none unless set.
    pub viewers: ViewerCheck,
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
            handshake_timeout: Duration::from_secs(5),
            max_handshakes: 512,
            max_handshakes_per_ip: 32,
            max_connections: 10_000,
            max_publish_rate: 1000.0,
            publish_burst: 10_000.0,
            stall_timeout: Duration::from_secs(10),
            max_packet: crate::embedded::MAX_PAYLOAD + 1024,
            viewers: ViewerCheck(Arc::new(|_, _| None)),
        })
    }
}

/// Raise this process's soft limit of open files to its hard limit, and
/// return the device connections the gate can then hold: each costs three
/// descriptors in this process (the device's socket, the gate's socket to
/// the broker, the broker's end of it), and 1,024 are kept for the logs,
/// Parquet, redb and the pipeline's own connections. At most 10,000.
pub fn connection_capacity() -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let soft = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    };
    let n = ((soft.saturating_sub(1024) / 3).min(10_000) as usize).max(16);
    if n < 100 {
        tracing::warn!(
            open_files = soft,
            devices = n,
            "the open-file limit leaves room for few device connections; raise `ulimit -n`"
        );
    }
    n
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
    let handshakes = Arc::new(tokio::sync::Semaphore::new(cfg.max_handshakes));
    let devices = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections));
    let per_ip: PerIp = Arc::new(std::sync::Mutex::new(HashMap::new()));
    let cfg = Arc::new(cfg);
    let mut pause = false;
    loop {
        if std::mem::take(&mut pause) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::select! {
            r = listener.accept() => {
                let (tcp, peer) = match r {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors, say: wait, never spin.
                        tracing::warn!(error = %e, "gate: accept failed; pausing");
                        metrics.refused.with_label_values(&["accept"]).inc();
                        pause = true;
                        continue;
                    }
                };
                let Some(hs) = HandshakeSlot::take(&handshakes, &per_ip, source(peer.ip()), cfg.max_handshakes_per_ip) else {
                    metrics.refused.with_label_values(&["busy"]).inc();
                    continue;
                };
                let (acceptor, cfg, check, metrics, devices) =
                    (acceptor.clone(), cfg.clone(), check.clone(), metrics.clone(), devices.clone());
                tokio::spawn(async move {
                    if let Err(reason) = connection(tcp, hs, acceptor, &cfg, &check, &metrics, &devices).await {
                        tracing::debug!(%peer, reason, "gate closed a device connection");
                        metrics.refused.with_label_values(&[reason]).inc();
                    }
                });
            }
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        }
    }
}

type PerIp = Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>;

/// Whom a handshake slot is counted against: the IPv4 address (also when
/// mapped into IPv6), or an IPv6 address's /64 (one host usually holds a
/// whole /64).
fn source(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// A connection's place among those in the TLS handshake; given back when
/// the handshake ends, however it ends.
struct HandshakeSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    per_ip: PerIp,
    ip: IpAddr,
}

impl HandshakeSlot {
    fn take(
        all: &Arc<tokio::sync::Semaphore>,
        per_ip: &PerIp,
        ip: IpAddr,
        max_per_ip: usize,
    ) -> Option<Self> {
        let permit = all.clone().try_acquire_owned().ok()?;
        let mut m = per_ip.lock().ok()?;
        let n = m.get(&ip).copied().unwrap_or(0);
        if n >= max_per_ip {
            return None;
        }
        m.insert(ip, n + 1);
        Some(HandshakeSlot {
            _permit: permit,
            per_ip: per_ip.clone(),
            ip,
        })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.per_ip.lock()
            && let Some(n) = m.get_mut(&self.ip)
        {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// The device a verified client certificate names: its Ed25519 public key
/// (its `did:key`). A common name, if the certificate has one, must be that
/// same DID, so that the gate and Mosquitto (which goes by the common
/// name) can never take one certificate for two different devices.
fn device_of(cert: &CertificateDer<'_>) -> Option<String> {
    const ED25519: &str = "1.3.101.112";
    let (_, x) = x509_parser::parse_x509_certificate(cert).ok()?;
    let spki = x.public_key();
    if spki.algorithm.algorithm.to_id_string() != ED25519 {
        return None;
    }
    let raw: [u8; 32] = spki.subject_public_key.data.as_ref().try_into().ok()?;
    let key = ed25519_dalek::VerifyingKey::from_bytes(&raw).ok()?;
    let did = vitaltrail_core::DeviceId::from_verifying_key(key)
        .ok()?
        .as_str()
        .to_owned();
    for cn in x.subject().iter_common_name() {
        if cn.as_str().ok()? != did {
            return None;
        }
    }
    Some(did)
}

/// The viewer a verified client certificate names, with its key's
/// fingerprint: an ECDSA P-256 key (an Ed25519 one names a device) and
/// exactly one common name, `viewer:<name>`.
fn viewer_of(cert: &CertificateDer<'_>) -> Option<(String, String)> {
    const EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
    const P256: &str = "1.2.840.10045.3.1.7";
    let (_, x) = x509_parser::parse_x509_certificate(cert).ok()?;
    let spki = x.public_key();
    if spki.algorithm.algorithm.to_id_string() != EC_PUBLIC_KEY {
        return None;
    }
    let curve = spki.algorithm.parameters.as_ref()?.as_oid().ok()?;
    if curve.to_id_string() != P256 {
        return None;
    }
    let mut cns = x.subject().iter_common_name();
    let cn = cns.next()?.as_str().ok()?;
    if cns.next().is_some() {
        return None;
    }
    let name = cn.strip_prefix(crate::viewers::PREFIX)?;
    crate::viewers::valid_name(name)
        .then(|| (name.to_owned(), crate::viewers::key_fingerprint(spki.raw)))
}

/// What a viewer sent, checked: it subscribes only to `alerts/<ward>` of
/// its wards as they are now (no wildcards), and publishes nothing.
fn admit_viewer(
    p: Packet,
    (name, key): (&str, &str),
    viewers: &ViewerCheck,
) -> std::result::Result<Packet, Refused> {
    match p {
        Packet::Publish(_) => Err("topic"),
        Packet::Subscribe(mut s) => {
            let Some(wards) = (viewers.0)(name, key) else {
                return Err("not_registered");
            };
            let allowed = |path: &str| {
                wards
                    .iter()
                    .any(|w| topics::alerts_topic(w).as_deref() == Some(path))
            };
            if s.filters.is_empty() || !s.filters.iter().all(|f| allowed(&f.path)) {
                return Err("subscribe");
            }
            for f in &mut s.filters {
                if f.qos == rumqttc::mqttbytes::QoS::ExactlyOnce {
                    f.qos = rumqttc::mqttbytes::QoS::AtLeastOnce;
                }
            }
            Ok(Packet::Subscribe(s))
        }
        p @ (Packet::Unsubscribe(_) | Packet::PubAck(_) | Packet::PingReq | Packet::Disconnect) => {
            Ok(p)
        }
        Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => Err("qos"),
        _ => Err("protocol"),
    }
}

/// How often a connected viewer's subscriptions are checked again.
const VIEWER_RECHECK: Duration = Duration::from_secs(2);

/// The longest keep-alive a device may ask for: the broker notices a dead
/// device within 1.5 times this.
pub const MAX_KEEP_ALIVE_SECS: u16 = 300;

/// The kernel send buffer of a device connection.
const SEND_BUFFER: usize = 64 * 1024;

/// The largest CONNECT packet the gate reads.
const MAX_CONNECT: usize = 16 * 1024;

type Refused = &'static str;

/// A token bucket: `rate` per second, at most `burst` saved up.
#[derive(Debug)]
struct Pace {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Option<tokio::time::Instant>,
}

impl Pace {
    fn new(rate: f64, burst: f64) -> Self {
        Pace {
            rate: rate.max(1.0),
            burst: burst.max(1.0),
            tokens: burst.max(1.0),
            at: None,
        }
    }

    /// Take one token at `now`; how long to wait first, if any.
    fn take(&mut self, now: tokio::time::Instant) -> Option<Duration> {
        if let Some(at) = self.at {
            let refill = now.saturating_duration_since(at).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + refill).min(self.burst);
        }
        self.at = Some(now);
        self.tokens -= 1.0;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

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
        .is_some_and(|rest| rest == did)
}

/// What the device sent, checked; `Err` closes the connection.
fn admit(p: Packet, did: &str, check: &DeviceCheck) -> std::result::Result<Packet, Refused> {
    match p {
        Packet::Publish(mut p) => {
            if p.qos == rumqttc::mqttbytes::QoS::ExactlyOnce {
                return Err("qos");
            }
            if !own_publish_topic(did, &p.topic) {
                return Err("topic");
            }
            if !check(did) {
                return Err("not_registered");
            }
            p.retain = false;
            Ok(Packet::Publish(p))
        }
        Packet::Subscribe(mut s) => {
            let own = topics::receipts_topic(did);
            if s.filters.iter().all(|f| Some(&f.path) == own.as_ref()) && !s.filters.is_empty() {
                // rumqttd delivers at the subscription's QoS, not the lower
                // of it and the publisher's: grant at most QoS 1, so that
                // receipts never come at QoS 2 (whose PUBREC the gate
                // refuses).
                for f in &mut s.filters {
                    if f.qos == rumqttc::mqttbytes::QoS::ExactlyOnce {
                        f.qos = rumqttc::mqttbytes::QoS::AtLeastOnce;
                    }
                }
                Ok(Packet::Subscribe(s))
            } else {
                Err("subscribe")
            }
        }
        p @ (Packet::Unsubscribe(_) | Packet::PubAck(_) | Packet::PingReq | Packet::Disconnect) => {
            Ok(p)
        }
        Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => Err("qos"),
        _ => Err("protocol"),
    }
}

async fn connection(
    tcp: TcpStream,
    handshake: HandshakeSlot,
    acceptor: TlsAcceptor,
    cfg: &GateConfig,
    check: &DeviceCheck,
    metrics: &GateMetrics,
    devices: &Arc<tokio::sync::Semaphore>,
) -> std::result::Result<(), Refused> {
    let _ = tcp.set_nodelay(true);
    // A small send buffer, so that a device that stops reading is noticed
    // (and closed, `stall_timeout` later) after little has piled up.
    let _ = socket2::SockRef::from(&tcp).set_send_buffer_size(SEND_BUFFER);
    let tls = match tokio::time::timeout(cfg.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => return Err("tls"),
        Err(_) => return Err("handshake_timeout"),
    };
    let peer = {
        let cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or("certificate")?;
        match device_of(cert) {
            Some(did) => Peer::Device(did),
            None => {
                let (name, key) = viewer_of(cert).ok_or("certificate")?;
                Peer::Viewer(name, key)
            }
        }
    };
    let active = match &peer {
        Peer::Device(did) => check(did),
        Peer::Viewer(name, key) => (cfg.viewers.0)(name, key).is_some(),
    };
    if !active {
        return Err("not_registered");
    }
    // The client ID: the DID, or `viewer:<name>`.
    let did = match &peer {
        Peer::Device(did) => did.clone(),
        Peer::Viewer(name, _) => format!("{}{name}", crate::viewers::PREFIX),
    };
    let (mut rd, mut wr) = tokio::io::split(tls);
    let mut buf = BytesMut::with_capacity(4096);
    let first = tokio::time::timeout(
        cfg.handshake_timeout,
        read_packet(&mut rd, &mut buf, MAX_CONNECT),
    )
    .await
    .map_err(|_| "no_connect")??;
    let Some(Packet::Connect(mut c)) = first else {
        return Err("no_connect");
    };
    // A verified device: it now holds a device slot, not a handshake slot.
    let _device = devices.clone().try_acquire_owned().map_err(|_| "full")?;
    drop(handshake);
    c.client_id = did.clone();
    // A viewer's session is always clean: a persistent one would bring
    // back, at CONNECT, subscriptions the gate never sees again (a ward
    // taken from it since).
    if matches!(peer, Peer::Viewer(..)) {
        c.clean_session = true;
    }
    c.login = Some(Login::new(crate::GATE_USER, cfg.token.expose()));
    if c.keep_alive == 0 || c.keep_alive > MAX_KEEP_ALIVE_SECS {
        c.keep_alive = MAX_KEEP_ALIVE_SECS;
    }
    if let Some(w) = &mut c.last_will {
        if matches!(peer, Peer::Device(_)) && own_publish_topic(&did, &w.topic) {
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
    // Broker → device: passed through as it comes. A device that stops
    // reading is closed after `stall_timeout`: the broker would otherwise
    // keep everything for it (acknowledgements of what it still sends
    // included) for as long as the connection lasts.
    let stall = cfg.stall_timeout;
    let mut down = tokio::spawn(async move {
        let mut b = vec![0u8; 16 * 1024];
        let r = loop {
            let n = match urd.read(&mut b).await {
                Ok(0) | Err(_) => break Ok(()),
                Ok(n) => n,
            };
            match tokio::time::timeout(stall, wr.write_all(&b[..n])).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break Ok(()),
                Err(_) => break Err("stalled"),
            }
        };
        let _ = wr.shutdown().await;
        r
    });
    let mut pace = Pace::new(cfg.max_publish_rate, cfg.publish_burst);
    // A viewer's subscriptions, checked again every few seconds against the
    // viewers file: revoked, or a ward taken away, it is closed.
    let mut subscribed: Vec<String> = Vec::new();
    let mut recheck = tokio::time::interval(VIEWER_RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Device → broker: checked packet by packet.
    let result = loop {
        tokio::select! {
            _ = recheck.tick(), if matches!(peer, Peer::Viewer(..)) => {
                if let Peer::Viewer(name, key) = &peer {
                    let wards = (cfg.viewers.0)(name, key);
                    let still = wards.is_some_and(|w| subscribed.iter().all(|t| {
                        w.iter().any(|x| topics::alerts_topic(x).as_deref() == Some(t.as_str()))
                    }));
                    if !still {
                        break Err("not_registered");
                    }
                }
            }
            p = read_packet(&mut rd, &mut buf, cfg.max_packet) => {
                let p = match p {
                    Ok(Some(p)) => p,
                    Ok(None) => break Ok(()),
                    Err(r) => break Err(r),
                };
                if matches!(p, Packet::Publish(_)) {
                    // Over its rate, a device is read more slowly (TCP holds
                    // it back); nothing it sent is lost.
                    if let Some(wait) = pace.take(tokio::time::Instant::now()) {
                        tokio::time::sleep(wait).await;
                    }
                }
                let admitted = match &peer {
                    Peer::Device(d) => admit(p, d, check),
                    Peer::Viewer(name, key) => admit_viewer(p, (name, key), &cfg.viewers),
                };
                let p = match admitted {
                    Ok(p) => {
                        if let (Peer::Viewer(..), Packet::Subscribe(s)) = (&peer, &p) {
                            for f in &s.filters {
                                if !subscribed.contains(&f.path) && subscribed.len() < 1024 {
                                    subscribed.push(f.path.clone());
                                }
                            }
                        }
                        p
                    }
                    Err(r) => {
                        // Counted by the caller; per-connection logs are
                        // debug, so a device cannot flood the log.
                        tracing::debug!(device = %did, reason = r, "gate closed a device connection");
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
            r = &mut down => break r.unwrap_or(Ok(())),
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
    fn a_device_over_its_rate_is_slowed_after_its_burst() {
        let t0 = tokio::time::Instant::now();
        let mut p = Pace::new(100.0, 10.0);
        for _ in 0..10 {
            assert_eq!(p.take(t0), None);
        }
        // The 11th at once waits one token's time; a second later there
        // is room for the burst again.
        let w = p.take(t0).unwrap();
        assert!((w.as_secs_f64() - 0.01).abs() < 1e-9, "{w:?}");
        let later = t0 + Duration::from_secs(1);
        for _ in 0..10 {
            assert_eq!(p.take(later), None);
        }
        assert!(p.take(later).is_some());
    }

    #[test]
    fn a_viewer_subscribes_only_to_its_wards_and_publishes_nothing() {
        use rumqttc::mqttbytes::QoS;
        use rumqttc::mqttbytes::v4::{Publish, Subscribe, SubscribeFilter};
        let viewers = ViewerCheck(Arc::new(|n: &str, k: &str| {
            (n == "nurse-3" && k == "k1").then(|| vec!["ward-3".to_owned(), "ward-4".to_owned()])
        }));
        let sub = |paths: &[&str]| {
            Packet::Subscribe(Subscribe::new_many(
                paths
                    .iter()
                    .map(|p| SubscribeFilter::new((*p).to_owned(), QoS::ExactlyOnce)),
            ))
        };
        match admit_viewer(
            sub(&["alerts/ward-3", "alerts/ward-4"]),
            ("nurse-3", "k1"),
            &viewers,
        ) {
            Ok(Packet::Subscribe(s)) => {
                assert!(s.filters.iter().all(|f| f.qos == QoS::AtLeastOnce))
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            vec!["alerts/ward-5"],
            vec!["alerts/#"],
            vec!["alerts/+"],
            vec!["#"],
            vec!["alerts/ward-3", "alerts/ward-5"],
            vec!["alerts/ward-3/x"],
            vec!["receipts/#"],
            vec!["$share/g/alerts/ward-3"],
        ] {
            assert_eq!(
                admit_viewer(sub(&bad), ("nurse-3", "k1"), &viewers).err(),
                Some("subscribe"),
                "{bad:?}"
            );
        }
        assert_eq!(
            admit_viewer(sub(&["alerts/ward-3"]), ("nurse-9", "k1"), &viewers).err(),
            Some("not_registered"),
            "revoked since it connected"
        );
        assert_eq!(
            admit_viewer(sub(&["alerts/ward-3"]), ("nurse-3", "k0"), &viewers).err(),
            Some("not_registered"),
            "an older certificate of the name"
        );
        for topic in ["alerts/ward-3", "vitals/x"] {
            let p = Publish::new(topic, QoS::AtLeastOnce, vec![1u8]);
            assert_eq!(
                admit_viewer(Packet::Publish(p), ("nurse-3", "k1"), &viewers).err(),
                Some("topic")
            );
        }
        // A device may not subscribe to alerts at all.
        let yes: DeviceCheck = Arc::new(|_| true);
        assert_eq!(
            admit(sub(&["alerts/ward-3"]), DID, &yes).err(),
            Some("subscribe")
        );
    }

    #[test]
    fn viewer_certificates_are_told_from_device_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let pki = crate::Pki::load_or_create(dir.path(), &[]).unwrap();
        let (pem, _key, pin) = pki.issue_viewer("nurse-3").unwrap();
        let der = CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let (name, key) = viewer_of(&der).unwrap();
        assert_eq!(name, "nurse-3");
        assert_eq!(key, pin, "the gate sees the fingerprint the list pins");
        let (pem2, _, _) = pki.issue_viewer("nurse-3").unwrap();
        let der2 = CertificateDer::pem_slice_iter(pem2.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert_ne!(viewer_of(&der2).unwrap().1, key, "a new key each time");
        assert_eq!(device_of(&der), None);
        let key = vitaltrail_core::SecretKey::from_seed(&[7; 32]).unwrap();
        let dev = pki.issue_device(key.did()).unwrap();
        let der = CertificateDer::pem_slice_iter(dev.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(viewer_of(&der), None);
        assert_eq!(device_of(&der).as_deref(), Some(key.did().as_str()));
    }

    #[test]
    fn a_device_publishes_only_under_its_own_topic() {
        assert!(own_publish_topic(DID, &format!("vitals/{DID}")));
        for t in [
            format!("vitals/{DID}/extra"),
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
        let q2 = Packet::Subscribe(Subscribe::new(own.clone(), QoS::ExactlyOnce));
        match admit(q2, DID, &yes) {
            Ok(Packet::Subscribe(s)) => assert_eq!(s.filters[0].qos, QoS::AtLeastOnce),
            other => panic!("{other:?}"),
        }
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
        // QoS 2 would make the broker hold messages until a PUBREL.
        let q2 = Publish::new(format!("vitals/{DID}"), QoS::ExactlyOnce, vec![1u8]);
        assert_eq!(admit(Packet::Publish(q2), DID, &yes).err(), Some("qos"));
        assert_eq!(
            admit(
                Packet::PubRel(rumqttc::mqttbytes::v4::PubRel::new(1)),
                DID,
                &yes
            )
            .err(),
            Some("qos")
        );
    }
}
