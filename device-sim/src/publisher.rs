//! Drive simulated devices: sign readings at a steady rate, inject attacks,
//! publish with QoS 1, and wait until the broker acknowledged everything.
//!
//! With receipts on ([`SimConfig::receipts`]) each device behaves as
//! `docs/receipts.md` asks of a real one: it keeps every reading in a
//! bounded store-and-forward buffer until the pipeline's receipt for it
//! arrives on `receipts/<did>`, checks the receipt's proof against the log
//! key when it has one, resends what is still unreceipted after
//! [`SimConfig::resend_after`] or a reconnect, and reports `receipted`
//! next to `acked` (the broker's PUBACK, which means only that the broker
//! holds the message in memory).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use vitaltrail_core::envelope::{self, UnsignedReading};
use vitaltrail_core::receipt::{self, Receipt, Status};
use vitaltrail_core::{Clock, LogPublicKey, SecretKey};
use vitaltrail_mqtt::{MqttEndpoint, Pki};

use crate::attacks::{self, Attack};
use crate::physiology::{Patient, Scenario};
use crate::{Error, Result};

/// Typed simulator configuration.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The MQTT broker.
    pub mqtt: MqttEndpoint,
    /// MQTT client ID (of the one connection all devices share when
    /// `device_tls` is off).
    pub client_id: String,
    /// Each device connects on its own, over mutual TLS, with a certificate
    /// this CA issues for its key now (what a real device gets once, when
    /// it is registered). Off: one shared plain connection.
    pub device_tls: Option<Arc<Pki>>,
    /// Readings per second, per device.
    pub rate: f64,
    /// How long to send for.
    pub duration: Duration,
    /// Attacks to inject.
    pub attacks: Vec<Attack>,
    /// How many messages of each attack.
    pub attack_count: usize,
    /// How long to wait for the last acknowledgements.
    pub ack_timeout: Duration,
    /// Keep readings until their receipt comes, resend the rest, and fail
    /// if some never get one.
    pub receipts: bool,
    /// Resend a reading that has no receipt after this long.
    pub resend_after: Duration,
    /// How long to wait for the last receipts.
    pub receipt_timeout: Duration,
    /// Most unreceipted readings kept (the store-and-forward buffer); a full
    /// buffer holds the device back.
    pub buffer: usize,
    /// Log verifier keys to check receipts against (by origin); receipts
    /// of logs not listed are counted but not verified.
    pub log_keys: Vec<LogPublicKey>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            mqtt: MqttEndpoint::default(),
            client_id: "vitaltrail-sim".into(),
            device_tls: None,
            rate: 1.0,
            duration: Duration::from_secs(10),
            attacks: vec![],
            attack_count: 1,
            ack_timeout: Duration::from_secs(30),
            receipts: false,
            resend_after: Duration::from_secs(5),
            receipt_timeout: Duration::from_secs(60),
            buffer: 100_000,
            log_keys: vec![],
        }
    }
}

/// One simulated device.
#[derive(Debug)]
pub struct SimDevice {
    /// Its key (its DID is `key.did()`).
    pub key: SecretKey,
    /// Its patient.
    pub patient: Patient,
    next_seq: u64,
    first: Option<Vec<u8>>,
}

impl SimDevice {
    /// A device with this key, patient seed and scenario.
    pub fn new(key: SecretKey, patient_seed: u64, scenario: Scenario) -> Self {
        SimDevice {
            key,
            patient: Patient::new(patient_seed, scenario, patient_seed.is_multiple_of(5)),
            next_seq: 1,
            first: None,
        }
    }
}

/// `n` devices whose keys derive from `seed` (so a run can be repeated and
/// its devices registered in advance), cycling through `scenarios`.
pub fn devices(seed: u64, n: usize, scenarios: &[Scenario]) -> Vec<SimDevice> {
    (0..n)
        .map(|i| {
            let mut h = blake3::Hasher::new_derive_key("vitaltrail device-sim key v1");
            h.update(&seed.to_le_bytes());
            h.update(&(i as u64).to_le_bytes());
            let key = loop {
                // A derived seed names a usable key with overwhelming probability;
                // re-derive in the impossible case it does not.
                if let Ok(k) = SecretKey::from_seed(h.finalize().as_bytes()) {
                    break k;
                }
                h.update(b"again");
            };
            let scenario = scenarios
                .get(i % scenarios.len().max(1))
                .copied()
                .unwrap_or(Scenario::Steady);
            SimDevice::new(key, seed.wrapping_mul(31).wrapping_add(i as u64), scenario)
        })
        .collect()
}

/// What a run sent, and what the pipeline should therefore do with it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimReport {
    /// Valid readings that should be logged, per device DID: their seqs.
    pub valid: BTreeMap<String, Vec<u64>>,
    /// Messages that must be rejected, by expected reason.
    pub expected_rejects: BTreeMap<String, u64>,
    /// Messages published.
    pub published: u64,
    /// Messages the broker acknowledged.
    pub acked: u64,
    /// Readings whose receipt says they are in the log (logged, or a
    /// duplicate of a logged one).
    pub receipted: u64,
    /// Readings whose receipt verified against a log key.
    pub receipts_verified: u64,
    /// Readings finally rejected by receipt, by reason.
    pub receipt_rejects: BTreeMap<String, u64>,
    /// Readings sent again for want of a receipt.
    pub resent: u64,
    /// Connections lost and connection attempts that failed, each retried
    /// (every 200 ms). Attacks cost some: a broker that gates topics
    /// closes the connection of a device that breaks its rules.
    pub disconnections: u64,
    /// Attacks not sent, by the reason they would have been rejected for:
    /// with device TLS the simulator has no certificate for a device that
    /// is not registered (the gate would refuse its connection), so it
    /// cannot send the unknown-device attack; and a duplicate-seq attack is
    /// not sent (with a warning) when the reading it would reuse got no
    /// receipt in time.
    pub attacks_not_sent: BTreeMap<String, u64>,
}

impl SimReport {
    /// Number of valid readings sent.
    pub fn valid_count(&self) -> u64 {
        self.valid.values().map(|v| v.len() as u64).sum()
    }
}

/// Run the simulation against the broker.
pub async fn run(
    cfg: &SimConfig,
    devs: &mut [SimDevice],
    clock: Arc<dyn Clock>,
) -> Result<SimReport> {
    let keys: Vec<&SecretKey> = devs.iter().map(|d| &d.key).collect();
    let mut session = connect(cfg, &keys)?;
    let mut report = SimReport::default();
    let stranger = SecretKey::from_seed(blake3::hash(cfg.client_id.as_bytes()).as_bytes())?;
    let n = devs.len().max(1);
    let total_valid = ((cfg.duration.as_secs_f64() * cfg.rate * n as f64).round() as u64).max(1);
    // Attacks go out spread over the middle of the run.
    let mut attack_plan: Vec<(u64, Attack)> = Vec::new();
    let total_attacks = (cfg.attacks.len() * cfg.attack_count) as u64;
    for (k, a) in cfg
        .attacks
        .iter()
        .flat_map(|a| std::iter::repeat_n(*a, cfg.attack_count))
        .enumerate()
    {
        let at = total_valid / 10 + (k as u64 * (total_valid * 8 / 10)) / total_attacks.max(1);
        attack_plan.push((at, a));
    }
    attack_plan.sort_by_key(|(at, _)| *at);
    let mut attack_iter = attack_plan.into_iter().peekable();

    let start = Instant::now();
    let per_sec = cfg.rate * n as f64;
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let mut i = 0usize;
    let mut last_resend = Instant::now();
    while sent < total_valid {
        tick.tick().await;
        if session.receipts && last_resend.elapsed() >= Duration::from_millis(500) {
            session.resend_due(cfg).await?;
            last_resend = Instant::now();
        }
        let due = ((start.elapsed().as_secs_f64() * per_sec) as u64).min(total_valid);
        while sent < due {
            let progress = sent as f64 / total_valid as f64;
            let d = &mut devs[i % n];
            i += 1;
            sent += 1;
            if !d.patient.sends_at(progress) {
                continue;
            }
            let time = (clock.now_ms() as i64 + d.patient.scenario().clock_offset_ms()) as u64;
            let reading = UnsignedReading {
                seq: d.next_seq,
                time,
                measurements: d.patient.vitals(progress),
                meta: None,
            };
            let bytes = envelope::sign(&d.key, &reading)?;
            let did = d.key.did().to_string();
            if d.first.is_none() {
                d.first = Some(bytes.clone());
            }
            if d.patient.scenario() == Scenario::ClockSkew {
                *report
                    .expected_rejects
                    .entry("clock_skew".into())
                    .or_default() += 1;
            } else {
                report
                    .valid
                    .entry(did.clone())
                    .or_default()
                    .push(d.next_seq);
            }
            let (seq, valid) = (d.next_seq, d.patient.scenario() != Scenario::ClockSkew);
            d.next_seq += 1;
            session.send(cfg, &did, seq, bytes, valid).await?;
            report.published += 1;

            while attack_iter.peek().is_some_and(|(at, _)| *at <= sent) {
                let Some((_, attack)) = attack_iter.next() else {
                    break;
                };
                // Attacks target a device that is not clock-skewed and has sent.
                let Some(t) = devs
                    .iter_mut()
                    .find(|d| d.first.is_some() && d.patient.scenario() != Scenario::ClockSkew)
                else {
                    continue;
                };
                let fresh = UnsignedReading {
                    seq: t.next_seq,
                    time: clock.now_ms(),
                    measurements: t.patient.vitals(progress),
                    meta: None,
                };
                let earlier = t.first.clone().unwrap_or_default();
                // A reused seq must reach the pipeline after the genuine
                // reading, or the genuine one is the duplicate: with
                // receipts, wait (bounded) until that reading is receipted.
                if attack == Attack::DuplicateSeq
                    && !session
                        .until_receipted(cfg, &t.key.did().to_string(), t.next_seq - 1)
                        .await?
                {
                    tracing::warn!(
                        "sim: the reading a duplicate-seq attack would reuse has no receipt after {:?}; attack not sent",
                        cfg.receipt_timeout
                    );
                    *report
                        .attacks_not_sent
                        .entry(attack.expected_reason().into())
                        .or_default() += 1;
                    continue;
                }
                let (claimed, bad) =
                    attacks::forge(attack, &t.key, &fresh, t.next_seq - 1, &earlier, &stranger)?;
                // Attacks are not kept for resending: nothing but a
                // rejection will ever come back for them. With device TLS
                // a device that is not registered has no connection (the
                // broker's gate refuses it), so its attack cannot be sent.
                if !session.publish(claimed.as_str(), bad).await? {
                    tracing::debug!(attack = ?attack, "sim: no connection for the claimed device; attack not sent");
                    *report
                        .attacks_not_sent
                        .entry(attack.expected_reason().into())
                        .or_default() += 1;
                    continue;
                }
                report.published += 1;
                *report
                    .expected_rejects
                    .entry(attack.expected_reason().into())
                    .or_default() += 1;
            }
        }
    }
    // Wait for the broker to acknowledge everything, and the receipts.
    finish(cfg, session, report).await
}

/// How often a device resends a message the pipeline rejected before it
/// believes the rejection (rejections are not signed: docs/receipts.md §4).
pub const REJECTION_RETRIES: u32 = 3;

/// One reading waiting for its receipt.
#[derive(Debug)]
struct Unreceipted {
    did: String,
    seq: u64,
    bytes: Vec<u8>,
    sent: Instant,
    /// Sent again at the next resend, whatever its age.
    resend_now: bool,
    /// Rejections received so far.
    rejections: u32,
    /// Whether the pipeline should log it (false: a reading the run means
    /// to be rejected, such as a skewed clock's).
    expect_valid: bool,
}

/// What the receipts said, shared with the connection task.
#[derive(Debug, Default)]
struct Tracker {
    /// By message hash.
    pending: HashMap<String, Unreceipted>,
    receipted: u64,
    verified: u64,
    invalid: u64,
    rejects: BTreeMap<String, u64>,
    /// Readings expected to be logged that were finally rejected, by reason.
    unexpected: BTreeMap<String, u64>,
    /// Set on a reconnect: resend everything pending.
    reconnected: bool,
}

impl Tracker {
    fn apply(&mut self, r: &Receipt, keys: &[LogPublicKey]) {
        let key = r.checkpoint.as_deref().and_then(|note| {
            let origin = vitaltrail_core::Checkpoint::parse_unverified(note)
                .ok()?
                .origin;
            keys.iter().find(|k| k.name() == origin)
        });
        for e in &r.entries {
            let Some(u) = self.pending.get_mut(&e.message_hash) else {
                continue;
            };
            if u.did != r.did {
                continue;
            }
            match e.status {
                Status::Logged | Status::Duplicate => {
                    // With log keys, only a proof counts: a receipt with no
                    // checkpoint, another log's, or a bad proof is not one.
                    if !keys.is_empty() {
                        match key {
                            Some(k) if r.verify_entry(e, &u.bytes, k).is_ok() => {
                                self.verified += 1;
                            }
                            _ => {
                                self.invalid += 1;
                                continue;
                            }
                        }
                    }
                    self.receipted += 1;
                }
                Status::Rejected => {
                    u.rejections += 1;
                    if u.rejections < REJECTION_RETRIES {
                        u.resend_now = true;
                        continue;
                    }
                    let reason = e.reason.clone().unwrap_or_default();
                    if u.expect_valid {
                        *self.unexpected.entry(reason.clone()).or_default() += 1;
                    }
                    *self.rejects.entry(reason).or_default() += 1;
                }
            }
            self.pending.remove(&e.message_hash);
        }
    }
}

/// The MQTT sessions of the simulator: one shared by every device, or,
/// with device TLS, one per device. Each is a persistent session whose
/// background task drives the connection (rumqttc reconnects and resends
/// what the broker did not acknowledge), counts the broker's
/// acknowledgements and, with receipts on, applies receipts.
struct Session {
    /// By DID; the shared connection is under "".
    clients: HashMap<String, AsyncClient>,
    counts: Arc<Counts>,
    pollers: Vec<tokio::task::JoinHandle<()>>,
    tracker: Arc<Mutex<Tracker>>,
    receipts: bool,
    resent: u64,
}

fn connect(cfg: &SimConfig, keys: &[&SecretKey]) -> Result<Session> {
    let mut s = Session {
        clients: HashMap::new(),
        counts: Arc::default(),
        pollers: vec![],
        tracker: Arc::new(Mutex::new(Tracker::default())),
        receipts: cfg.receipts,
        resent: 0,
    };
    let mut open = |endpoint: &MqttEndpoint, client_id: &str, dids: Vec<String>, name: String| {
        let mut opts = endpoint.options(client_id);
        opts.set_keep_alive(Duration::from_secs(10))
            .set_clean_session(false)
            .set_inflight(1000)
            .set_max_packet_size(256 * 1024, 1 << 20);
        let (client, eventloop) = AsyncClient::new(opts, 4096);
        s.pollers.push(tokio::spawn(poll(
            eventloop,
            client.clone(),
            dids,
            s.counts.clone(),
            s.tracker.clone(),
            cfg.log_keys.clone(),
            cfg.receipts,
        )));
        s.clients.insert(name, client);
    };
    match &cfg.device_tls {
        None => open(
            &cfg.mqtt,
            &cfg.client_id,
            keys.iter().map(|k| k.did().to_string()).collect(),
            String::new(),
        ),
        Some(pki) => {
            for k in keys {
                let did = k.did().to_string();
                let endpoint = cfg
                    .mqtt
                    .clone()
                    .with_tls(pki.device_tls(k).map_err(|e| Error::Mqtt(e.to_string()))?);
                open(&endpoint, &did, vec![did.clone()], did.clone());
            }
        }
    }
    Ok(s)
}

/// What the connection tasks count.
#[derive(Debug, Default)]
struct Counts {
    /// The broker's acknowledgements (PUBACK).
    acked: AtomicU64,
    /// Connections lost, and connection attempts refused or failed (each
    /// is retried, every 200 ms).
    disconnections: AtomicU64,
}

/// Drive one connection until aborted.
async fn poll(
    mut eventloop: EventLoop,
    sub: AsyncClient,
    dids: Vec<String>,
    counts: Arc<Counts>,
    track: Arc<Mutex<Tracker>>,
    keys: Vec<LogPublicKey>,
    receipts: bool,
) {
    let mut connected_before = false;
    let mut down_since: Option<Instant> = None;
    let mut last_warned: Option<Instant> = None;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) if !receipts => {
                down_since = None;
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                counts.acked.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) if receipts => {
                down_since = None;
                for d in &dids {
                    if let Some(t) = vitaltrail_core::topics::receipts_topic(d) {
                        let _ = sub.subscribe(t, QoS::AtLeastOnce).await;
                    }
                }
                if connected_before && let Ok(mut t) = track.lock() {
                    t.reconnected = true;
                }
                connected_before = true;
            }
            Ok(Event::Incoming(Packet::Publish(p))) if receipts => {
                match Receipt::from_json(&p.payload) {
                    Ok(r) => {
                        if let Ok(mut t) = track.lock() {
                            t.apply(&r, &keys);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "sim: a receipt does not parse"),
                }
            }
            Ok(_) => {}
            Err(e) => {
                // The broker closes a connection on purpose when an attack
                // breaks its rules, and rumqttc reconnects: that is counted
                // (the summary's `disconnections`), not a warning. A
                // connection that stays down is one.
                counts.disconnections.fetch_add(1, Ordering::Relaxed);
                let since = *down_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= STILL_DOWN
                    && last_warned.is_none_or(|w| w.elapsed() >= STILL_DOWN)
                {
                    tracing::warn!(error = %e, down_for_s = since.elapsed().as_secs(), "sim: cannot reach the MQTT broker; retrying");
                    last_warned = Some(Instant::now());
                } else {
                    tracing::debug!(error = %e, "sim: MQTT connection closed; reconnecting");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// How long a connection may stay down before the simulator warns.
const STILL_DOWN: Duration = Duration::from_secs(5);

impl Session {
    /// Publish one reading of `did`, keeping it until its receipt comes.
    /// With a full buffer, first waits for receipts (resending as due).
    async fn send(
        &mut self,
        cfg: &SimConfig,
        did: &str,
        seq: u64,
        bytes: Vec<u8>,
        expect_valid: bool,
    ) -> Result<()> {
        if self.receipts {
            while self.unreceipted() >= cfg.buffer.max(1) {
                self.resend_due(cfg).await?;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if let Ok(mut t) = self.tracker.lock() {
                t.pending.insert(
                    receipt::message_hash(&bytes),
                    Unreceipted {
                        did: did.to_owned(),
                        seq,
                        bytes: bytes.clone(),
                        sent: Instant::now(),
                        resend_now: false,
                        rejections: 0,
                        expect_valid,
                    },
                );
            }
        }
        self.publish(did, bytes).await.map(|_| ())
    }

    /// Publish a message on `did`'s topic, over that device's connection
    /// (or the shared one). `false`: there is none for `did`.
    async fn publish(&self, did: &str, bytes: Vec<u8>) -> Result<bool> {
        let Some(client) = self.clients.get(did).or_else(|| self.clients.get("")) else {
            return Ok(false);
        };
        client
            .publish(format!("vitals/{did}"), QoS::AtLeastOnce, false, bytes)
            .await
            .map_err(|e| Error::Mqtt(e.to_string()))?;
        Ok(true)
    }

    /// With receipts, wait until `did`'s reading `seq` is no longer
    /// waiting for its receipt (resending as due), for at most the receipt
    /// timeout; false if it still is. Without receipts, true at once.
    async fn until_receipted(&mut self, cfg: &SimConfig, did: &str, seq: u64) -> Result<bool> {
        if !self.receipts {
            return Ok(true);
        }
        let deadline = Instant::now() + cfg.receipt_timeout;
        loop {
            let waiting = self
                .tracker
                .lock()
                .is_ok_and(|t| t.pending.values().any(|u| u.did == did && u.seq == seq));
            if !waiting {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            self.resend_due(cfg).await?;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn unreceipted(&self) -> usize {
        self.tracker.lock().map(|t| t.pending.len()).unwrap_or(0)
    }

    /// Resend what has waited too long for its receipt (everything, after
    /// a reconnect).
    async fn resend_due(&mut self, cfg: &SimConfig) -> Result<()> {
        let mut due: Vec<(String, u64, Vec<u8>)> = {
            let Ok(mut t) = self.tracker.lock() else {
                return Ok(());
            };
            let all = std::mem::take(&mut t.reconnected);
            t.pending
                .values_mut()
                .filter(|u| all || u.resend_now || u.sent.elapsed() >= cfg.resend_after)
                .map(|u| {
                    u.sent = Instant::now();
                    u.resend_now = false;
                    (u.did.clone(), u.seq, u.bytes.clone())
                })
                .collect()
        };
        // Oldest first, as the device produced them.
        due.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        for (did, _, bytes) in due {
            self.publish(&did, bytes).await?;
            self.resent += 1;
        }
        Ok(())
    }
}

/// Wait until the broker acknowledged everything published, then, with
/// receipts on, until every reading has its receipt (or time out).
async fn finish(cfg: &SimConfig, mut s: Session, mut report: SimReport) -> Result<SimReport> {
    let deadline = Instant::now() + cfg.ack_timeout;
    // Resends are acknowledged too.
    while s.counts.acked.load(Ordering::Relaxed) < report.published + s.resent
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    report.acked = s.counts.acked.load(Ordering::Relaxed).min(report.published);
    if s.receipts {
        let deadline = Instant::now() + cfg.receipt_timeout;
        while s.unreceipted() > 0 && Instant::now() < deadline {
            s.resend_due(cfg).await?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for c in s.clients.values() {
        let _ = c.disconnect().await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    for p in &s.pollers {
        p.abort();
    }
    report.resent = s.resent;
    report.disconnections = s.counts.disconnections.load(Ordering::Relaxed);
    let (missing, invalid, unexpected) = match s.tracker.lock() {
        Ok(t) => {
            report.receipted = t.receipted;
            report.receipts_verified = t.verified;
            report.receipt_rejects = t.rejects.clone();
            (t.pending.len() as u64, t.invalid, t.unexpected.clone())
        }
        Err(_) => (0, 0, BTreeMap::new()),
    };
    // With receipts, the pipeline's word counts, not the broker's: a broker
    // that restarted may never acknowledge what it lost, and the resend
    // got a receipt.
    if report.acked < report.published && !(s.receipts && missing == 0) {
        return Err(Error::Unacknowledged {
            missing: report.published - report.acked,
            waited_ms: cfg.ack_timeout.as_millis() as u64,
        });
    }
    if invalid > 0 {
        return Err(Error::BadReceipts(invalid));
    }
    if !unexpected.is_empty() {
        return Err(Error::UnexpectedRejections(format!("{unexpected:?}")));
    }
    if s.receipts && missing > 0 {
        return Err(Error::Unreceipted {
            missing,
            waited_ms: cfg.receipt_timeout.as_millis() as u64,
            acked: report.acked,
        });
    }
    Ok(report)
}

/// Publish prepared readings of one device, paced like the original
/// (`speed` 1.0 = real time, 10.0 = ten times faster, 0 = as fast as
/// possible), and wait for the broker's acknowledgements.
pub async fn replay(
    cfg: &SimConfig,
    key: &SecretKey,
    readings: &[UnsignedReading],
    speed: f64,
) -> Result<SimReport> {
    let did = key.did().to_string();
    let mut session = connect(cfg, &[key])?;
    let mut report = SimReport::default();
    let start = Instant::now();
    let t0 = readings.first().map_or(0, |r| r.time);
    for r in readings {
        if speed > 0.0 {
            let due = Duration::from_secs_f64((r.time - t0) as f64 / 1000.0 / speed);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        session
            .send(cfg, &did, r.seq, envelope::sign(key, r)?, true)
            .await?;
        report.published += 1;
        report.valid.entry(did.clone()).or_default().push(r.seq);
    }
    finish(cfg, session, report).await
}
