//! Drive simulated devices: sign readings at a steady rate, inject attacks,
//! publish with QoS 1, and wait until the broker acknowledged everything.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use vitaltrail_core::envelope::{self, UnsignedReading};
use vitaltrail_core::{Clock, SecretKey};

use crate::attacks::{self, Attack};
use crate::physiology::{Patient, Scenario};
use crate::{Error, Result};

/// Typed simulator configuration.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// MQTT broker host.
    pub mqtt_host: String,
    /// MQTT broker port.
    pub mqtt_port: u16,
    /// MQTT client ID.
    pub client_id: String,
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
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            mqtt_host: "127.0.0.1".into(),
            mqtt_port: 1883,
            client_id: "vitaltrail-sim".into(),
            rate: 1.0,
            duration: Duration::from_secs(10),
            attacks: vec![],
            attack_count: 1,
            ack_timeout: Duration::from_secs(30),
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
    let (client, acked, poller) = connect(cfg);
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
    while sent < total_valid {
        tick.tick().await;
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
            d.next_seq += 1;
            publish(&client, &did, bytes).await?;
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
                let (claimed, bad) =
                    attacks::forge(attack, &t.key, &fresh, t.next_seq - 1, &earlier, &stranger)?;
                publish(&client, claimed.as_str(), bad).await?;
                report.published += 1;
                *report
                    .expected_rejects
                    .entry(attack.expected_reason().into())
                    .or_default() += 1;
            }
        }
    }
    // Wait for the broker to acknowledge everything.
    finish(cfg, client, acked, poller, report).await
}

async fn publish(client: &AsyncClient, did: &str, bytes: Vec<u8>) -> Result<()> {
    client
        .publish(format!("vitals/{did}"), QoS::AtLeastOnce, false, bytes)
        .await
        .map_err(|e| Error::Mqtt(e.to_string()))
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
    let (client, acked, poller) = connect(cfg);
    let mut report = SimReport::default();
    let did = key.did().to_string();
    let start = Instant::now();
    let t0 = readings.first().map_or(0, |r| r.time);
    for r in readings {
        if speed > 0.0 {
            let due = Duration::from_secs_f64((r.time - t0) as f64 / 1000.0 / speed);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        publish(&client, &did, envelope::sign(key, r)?).await?;
        report.published += 1;
        report.valid.entry(did.clone()).or_default().push(r.seq);
    }
    finish(cfg, client, acked, poller, report).await
}

/// Connect with a persistent session; a background task drives the
/// connection (rumqttc reconnects and resends what was not acknowledged)
/// and counts the broker's acknowledgements.
fn connect(cfg: &SimConfig) -> (AsyncClient, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let mut opts = MqttOptions::new(&cfg.client_id, &cfg.mqtt_host, cfg.mqtt_port);
    opts.set_keep_alive(Duration::from_secs(10))
        .set_clean_session(false)
        .set_inflight(1000)
        .set_max_packet_size(256 * 1024, 256 * 1024);
    let (client, mut eventloop) = AsyncClient::new(opts, 4096);
    let acked = Arc::new(AtomicU64::new(0));
    let acks = acked.clone();
    let poller = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acks.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "sim: MQTT connection error; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    (client, acked, poller)
}

/// Wait until the broker acknowledged everything published (or time out).
async fn finish(
    cfg: &SimConfig,
    client: AsyncClient,
    acked: Arc<AtomicU64>,
    poller: tokio::task::JoinHandle<()>,
    mut report: SimReport,
) -> Result<SimReport> {
    let deadline = Instant::now() + cfg.ack_timeout;
    while acked.load(Ordering::Relaxed) < report.published && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    report.acked = acked.load(Ordering::Relaxed);
    let _ = client.disconnect().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    poller.abort();
    if report.acked < report.published {
        return Err(Error::Unacknowledged {
            missing: report.published - report.acked,
            waited_ms: cfg.ack_timeout.as_millis() as u64,
        });
    }
    Ok(report)
}
