//! End-to-end load run: `cargo run --release -p vitaltrail-benches --bin e2e`.
//!
//! In one run it measures, on this machine:
//! 1. the ceiling of batch verification alone (one core, batches of 256);
//! 2. the ceiling of the transport alone: MQTT QoS 1 through the embedded
//!    broker to a subscriber that acknowledges, no verification;
//! 3. the embedded pipeline (`vitaltrail up`: rumqttd → ingest → in-process
//!    bus → attestor, fsynced) at full speed: sustained readings/s;
//! 4. the same at a fixed offered rate: p50/p99 latency from publish to the
//!    leaf's log time and to the device's receipt, CPU per reading and peak
//!    memory;
//! 5. the Kafka path (`up --kafka` against a nisshi broker this bench starts
//!    on 127.0.0.1): its own transport ceiling (MQTT → Kafka, no
//!    verification), then 3 and 4 again.
//!
//! The pipeline's `/metrics` gives the per-stage means printed under each
//! full-speed line (batch sizes, verify time, bus send → durable, commit).
//!
//! The pipeline runs in a child process: this binary again, with the hidden
//! `--serve-pipeline DIR`, calling `up::run` with `up`'s defaults (not the
//! `vitaltrail` binary: no tracing output, no SQL endpoint). The CPU per
//! reading and the peak memory reported for it are the pipeline's alone,
//! read from `/proc/<pid>` (issue #20). The devices all run in this
//! process, each on its own mutual-TLS connection subscribed to its
//! receipts, on the same 2 cores; their CPU is reported apart. Each phase
//! is measured until its readings are appended and receipted and the
//! pipeline is quiet again, so the work a phase causes is counted in it.
//!
//! With alerts (issue #21), during the latency run `--alert-probes`
//! patients of a ward each publish one reading that raises a NEWS2 alarm
//! (SpO2 80 %), spread over the run, on top of the background load; the
//! bench reports publish → the alarm on MQTT `alerts/<ward>` (a nurse
//! station subscribed through the gate with its viewer certificate) and
//! publish → the webhook POST (a receiver in this process). The same path
//! run again with the alert engine off gives the engine's CPU per reading,
//! at full speed and at the offered rate.
//!
//! Readings are signed before the clock starts, so signing cost is not
//! counted (the probes' are signed as they are sent).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::Parser;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::watch;
use vitaltrail_attestor::DurableLog;
use vitaltrail_node::up::{self, UpConfig};

use vitaltrail_bus::kafka::{KafkaConfig, KafkaProducer};
use vitaltrail_core::envelope::{self, UnsignedReading};
use vitaltrail_core::receipt::{Receipt, Status};
use vitaltrail_core::{Clock, SecretKey, SystemClock, leaf};
use vitaltrail_device_sim::physiology::{Patient, Scenario};

/// The allocator of the `vitaltrail` binary, so the figures are its own.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
struct Args {
    /// Readings per measurement.
    #[arg(long, default_value_t = 60_000)]
    readings: usize,
    /// Simulated devices.
    #[arg(long, default_value_t = 200)]
    devices: usize,
    /// Offered rate for the latency run, readings/s.
    #[arg(long, default_value_t = 5_000.0)]
    latency_rate: f64,
    /// Partitions (default: `up`'s).
    #[arg(long)]
    partitions: Option<u32>,
    /// Checkpoint interval of the attestor, ms (default: `up`'s).
    #[arg(long)]
    checkpoint_interval_ms: Option<u64>,
    /// Ingest MQTT connections sharing the subscription (default: `up`'s).
    #[arg(long)]
    ingest_connections: Option<usize>,
    /// Skip the Kafka path (it starts a nisshi broker on 127.0.0.1 from
    /// $NISSHI_BIN, $NISSHI_ROOT/bin or
    /// ~/.cache/vitaltrail-tools/nisshi-0.8.1-lean/bin; scripts/setup builds it).
    #[arg(long)]
    skip_kafka: bool,
    /// Skip the embedded path.
    #[arg(long)]
    skip_embedded: bool,
    /// Partitions of vitals.verified on the Kafka path (one attestor log
    /// each; on one 2-core machine with one disk, 2 commit in larger groups
    /// than 4).
    #[arg(long, default_value_t = 2)]
    kafka_partitions: u32,
    /// Internal: run the pipeline (`up::run`) on this data directory until
    /// SIGTERM; the bench starts itself so, to measure `up` alone.
    #[arg(long, hide = true)]
    serve_pipeline: Option<std::path::PathBuf>,
    /// Internal (with --serve-pipeline): the MQTT listen address.
    #[arg(long, hide = true)]
    serve_mqtt: Option<std::net::SocketAddr>,
    /// Internal (with --serve-pipeline): the metrics listen address.
    #[arg(long, hide = true)]
    serve_metrics: Option<std::net::SocketAddr>,
    /// Internal (with --serve-pipeline): Kafka brokers (the Kafka path).
    #[arg(long, hide = true)]
    serve_kafka: Option<String>,
    /// Internal (with --serve-pipeline): no receipts.
    #[arg(long, hide = true)]
    serve_no_receipts: bool,
    /// Patients whose alarms are timed during each latency run (0: none,
    /// and no run with the engine off).
    #[arg(long, default_value_t = 200)]
    alert_probes: usize,
    /// Internal (with --serve-pipeline): no alert engine.
    #[arg(long, hide = true)]
    serve_no_alerts: bool,
    /// Internal (with --serve-pipeline): POST alarm events here.
    #[arg(long, hide = true)]
    serve_webhook: Option<String>,
    /// Internal (with --serve-pipeline): the webhook's secret file.
    #[arg(long, hide = true)]
    serve_webhook_secret: Option<std::path::PathBuf>,
}

/// The ward of the alert probes.
const PROBE_WARD: &str = "ward-bench";

/// utime + stime of a process (`self` or a pid), from /proc (clock ticks of
/// 1/100 s).
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(") ").map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

/// Peak resident size of a process (`self` or a pid), MB.
fn peak_rss_mb(pid: &str) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .map(|l| l.local_addr().map(|a| a.port()).unwrap_or(0))
        .unwrap_or(0)
}

struct Signed {
    did: String,
    seq: u64,
    bytes: Vec<u8>,
}

fn sign_all(keys: &[SecretKey], n: usize, first_seq: u64) -> Result<Vec<Signed>> {
    let now = SystemClock.now_ms();
    let mut patients: Vec<Patient> = (0..keys.len())
        .map(|i| Patient::new(i as u64, Scenario::Steady, false))
        .collect();
    (0..n)
        .map(|i| {
            let d = i % keys.len();
            let seq = first_seq + (i / keys.len()) as u64;
            let r = UnsignedReading {
                seq,
                time: now,
                measurements: patients[d].vitals(0.5),
                meta: None,
            };
            Ok(Signed {
                did: keys[d].did().to_string(),
                seq,
                bytes: envelope::sign(&keys[d], &r)?,
            })
        })
        .collect()
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// When each (did, seq) was first receipted as in the log, Unix ms.
#[derive(Default)]
struct Receipted {
    at: std::sync::Mutex<HashMap<(String, u64), u64>>,
}

impl Receipted {
    /// How many readings have been receipted.
    fn count(&self) -> u64 {
        self.at.lock().map_or(0, |m| m.len() as u64)
    }
}

/// Simulated devices: one plain connection for all (an open broker), or,
/// through the gate, one mutual-TLS connection per device, as real devices
/// have. They stay connected until dropped, so receipts for readings still
/// in the pipeline reach them.
struct Devices {
    clients: HashMap<String, AsyncClient>,
    pollers: Vec<tokio::task::JoinHandle<()>>,
    acked: Arc<AtomicU64>,
}

impl Devices {
    fn connect(
        port: u16,
        tls: Option<(&vitaltrail_mqtt::Pki, &[SecretKey])>,
        receipted: Option<&Arc<Receipted>>,
    ) -> Result<Devices> {
        let mut d = Devices {
            clients: HashMap::new(),
            pollers: Vec::new(),
            acked: Arc::new(AtomicU64::new(0)),
        };
        let plain = vitaltrail_mqtt::MqttEndpoint::plain("127.0.0.1", port);
        match tls {
            None => d.open(
                format!("bench-pub-{}", free_port()),
                plain,
                String::new(),
                None,
            ),
            Some((pki, keys)) => {
                for k in keys {
                    let did = k.did().to_string();
                    let ep = plain.clone().with_tls(pki.device_tls(k)?);
                    d.open(did.clone(), ep, did, receipted);
                }
            }
        }
        Ok(d)
    }

    fn open(
        &mut self,
        id: String,
        endpoint: vitaltrail_mqtt::MqttEndpoint,
        did: String,
        receipted: Option<&Arc<Receipted>>,
    ) {
        let mut opts = endpoint.options(&id);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_inflight(1000)
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut el) = AsyncClient::new(opts, 10_000);
        // A device subscribes to its receipts, as real devices do, so `up`
        // pays for delivering them.
        let receipted = receipted.cloned();
        if receipted.is_some() {
            let _ = client.try_subscribe(format!("receipts/{did}"), QoS::AtLeastOnce);
        }
        let a = self.acked.clone();
        self.pollers.push(tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let (Some(rc), Ok(r)) = (&receipted, Receipt::from_json(&p.payload)) {
                            let now = SystemClock.now_ms();
                            let mut m = rc.at.lock().unwrap_or_else(|e| e.into_inner());
                            for e in r.entries {
                                if let (Some(seq), Status::Logged | Status::Duplicate) =
                                    (e.seq, e.status)
                                {
                                    m.entry((r.did.clone(), seq)).or_insert(now);
                                }
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }));
        self.clients.insert(did, client);
    }

    /// Publish everything (optionally paced) and wait for the broker's
    /// acks; returns the publish time of each (did, seq) in Unix ms.
    async fn send(
        &self,
        msgs: &[Signed],
        rate: Option<f64>,
    ) -> Result<HashMap<(String, u64), u64>> {
        let acked0 = self.acked.load(Ordering::Relaxed);
        let mut sent = HashMap::with_capacity(msgs.len());
        let start = Instant::now();
        for (i, m) in msgs.iter().enumerate() {
            if let Some(r) = rate {
                let due = Duration::from_secs_f64(i as f64 / r);
                if let Some(w) = due.checked_sub(start.elapsed()) {
                    tokio::time::sleep(w).await;
                }
            }
            sent.insert((m.did.clone(), m.seq), SystemClock.now_ms());
            let client = self
                .clients
                .get(&m.did)
                .or_else(|| self.clients.get(""))
                .context("no connection for a device")?;
            client
                .publish(
                    format!("vitals/{}", m.did),
                    QoS::AtLeastOnce,
                    false,
                    m.bytes.clone(),
                )
                .await?;
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.acked.load(Ordering::Relaxed) < acked0 + msgs.len() as u64 {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the broker did not ack every publish within 120 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(sent)
    }
}

impl Drop for Devices {
    fn drop(&mut self) {
        for p in &self.pollers {
            p.abort();
        }
    }
}

/// The bearer token the bench gives its pipelines' `/metrics`.
const METRICS_TOKEN: &str = "bench-metrics-token-0123456789abcdef0123456789abcdef";

/// The pipeline's own `/metrics` page.
async fn scrape(listen: std::net::SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(listen).await.ok()?;
    s.write_all(
        format!(
            "GET /metrics HTTP/1.0\r\nHost: {listen}\r\nAuthorization: Bearer {METRICS_TOKEN}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    Some(body)
}

/// Sum of every sample of a metric family (all label sets).
fn metric_total(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Leaves appended (committed to the durable logs) so far.
async fn appended(listen: std::net::SocketAddr) -> u64 {
    scrape(listen).await.map_or(0, |b| {
        metric_total(&b, "vitaltrail_attestor_tree_size_leaves") as u64
    })
}

/// Means of the pipeline's own histograms, from its `/metrics`.
async fn stage_means(listen: std::net::SocketAddr) -> Option<String> {
    let body = scrape(listen).await?;
    let mean = |h: &str| {
        metric_total(&body, &format!("{h}_sum"))
            / metric_total(&body, &format!("{h}_count")).max(1.0)
    };
    Some(format!(
        "ingest batch {:.0} msgs, verify {:.1} ms/batch, bus send->durable {:.1} ms; attestor batch {:.0} leaves, commit {:.2} ms",
        mean("vitaltrail_ingest_batch_records"),
        mean("vitaltrail_ingest_verify_seconds") * 1e3,
        mean("vitaltrail_ingest_bus_send_seconds") * 1e3,
        mean("vitaltrail_attestor_batch_records"),
        mean("vitaltrail_attestor_commit_seconds") * 1e3,
    ))
}

/// One way of running the pipeline.
struct Path {
    name: &'static str,
    kafka: Option<String>,
    partitions: u32,
    /// Build and publish receipts (docs/receipts.md).
    receipts: bool,
    /// Run the alert engine (and, with `--alert-probes`, time alarms).
    alerts: bool,
}

/// The pipeline child: `up::run` on `dir` until SIGTERM (`--serve-pipeline`).
async fn serve_pipeline(a: &Args, dir: &std::path::Path) -> Result<()> {
    let mut cfg = UpConfig {
        data_dir: dir.to_owned(),
        mqtt_listen: a.serve_mqtt.context("--serve-mqtt")?,
        partitions: a.partitions.unwrap_or(UpConfig::default().partitions),
        metrics_listen: Some(a.serve_metrics.context("--serve-metrics")?),
        ..UpConfig::default()
    };
    if let Some(brokers) = &a.serve_kafka {
        cfg = cfg.over_kafka(brokers)?;
    }
    if let Some(ms) = a.checkpoint_interval_ms {
        cfg.attestor.checkpoint_interval = Duration::from_millis(ms);
    }
    cfg.attestor.receipts = !a.serve_no_receipts;
    if a.serve_no_alerts {
        cfg.alerts = None;
    }
    if let (Some(alerts), Some(url), Some(secret)) =
        (&mut cfg.alerts, &a.serve_webhook, &a.serve_webhook_secret)
    {
        alerts
            .webhooks
            .push(vitaltrail_alerts::webhook::WebhookConfig {
                name: "bench".into(),
                url: url.clone(),
                wards: vec![PROBE_WARD.into()],
                secret_file: secret.clone(),
                timeout_ms: 10_000,
                first_backoff_ms: 100,
                max_backoff_ms: 1_000,
            });
    }
    if let Some(n) = a.ingest_connections {
        cfg.ingest.connections = n;
    }
    vitaltrail_node::exit_on_panic();
    let (stop, stop_rx) = watch::channel(false);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Stop on SIGTERM, or when the bench that started it is gone (killed
    // without running its drop), so no pipeline is left running.
    let parent = std::os::unix::process::parent_id();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = tick.tick() => {
                    if std::os::unix::process::parent_id() != parent {
                        break;
                    }
                }
            }
        }
        let _ = stop.send(true);
    });
    up::run(cfg, stop_rx).await?;
    Ok(())
}

/// The pipeline in its own process (this binary with `--serve-pipeline`),
/// stopped with SIGTERM on drop if still running.
struct Child {
    child: std::process::Child,
    pid: String,
}

impl Child {
    fn start(
        a: &Args,
        path: &Path,
        data: &std::path::Path,
        mqtt: std::net::SocketAddr,
        metrics: std::net::SocketAddr,
        webhook: Option<(&str, &std::path::Path)>,
    ) -> Result<Child> {
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.arg("--serve-pipeline")
            .arg(data)
            .arg("--serve-mqtt")
            .arg(mqtt.to_string())
            .arg("--serve-metrics")
            .arg(metrics.to_string())
            .arg("--partitions")
            .arg(path.partitions.to_string());
        if let Some(k) = &path.kafka {
            cmd.arg("--serve-kafka").arg(k);
        }
        if !path.receipts {
            cmd.arg("--serve-no-receipts");
        }
        if !path.alerts {
            cmd.arg("--serve-no-alerts");
        }
        if let Some((url, secret)) = webhook {
            cmd.arg("--serve-webhook")
                .arg(url)
                .arg("--serve-webhook-secret")
                .arg(secret);
        }
        if let Some(ms) = a.checkpoint_interval_ms {
            cmd.arg("--checkpoint-interval-ms").arg(ms.to_string());
        }
        if let Some(n) = a.ingest_connections {
            cmd.arg("--ingest-connections").arg(n.to_string());
        }
        let log = std::fs::File::create(data.join("pipeline.log"))?;
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the pipeline process")?;
        let pid = child.id().to_string();
        Ok(Child { child, pid })
    }

    /// SIGTERM, then wait (60 s at most, then SIGKILL): the pipeline
    /// drains and stops cleanly.
    async fn stop(&mut self, data: &std::path::Path) -> Result<()> {
        std::process::Command::new("kill")
            .args(["-TERM", &self.pid])
            .status()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let st = loop {
            if let Some(st) = self.child.try_wait()? {
                break st;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                anyhow::bail!("the pipeline process did not stop within 60 s of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        anyhow::ensure!(
            st.success(),
            "the pipeline process exited with {st}; its log: {}",
            std::fs::read_to_string(data.join("pipeline.log")).unwrap_or_default()
        );
        Ok(())
    }

    /// An error (with its log) if the pipeline process has exited.
    fn alive(&mut self, data: &std::path::Path) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            anyhow::bail!(
                "the pipeline process exited with {st}; its log: {}",
                std::fs::read_to_string(data.join("pipeline.log")).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Wait until the pipeline has appended `target` leaves and, with
    /// `receipts`, its devices hold `receipts.1` receipts (each 120 s at
    /// most), then until it is quiet (under 5% of a core over 500 ms, 10 s
    /// at most), so the work a phase caused (checkpoints, Parquet, receipts,
    /// alerts) is counted in that phase and not the next.
    async fn settle(
        &mut self,
        data: &std::path::Path,
        metrics: std::net::SocketAddr,
        target: u64,
        receipts: Option<(&Receipted, u64)>,
    ) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while appended(metrics).await < target {
            self.alive(data)?;
            anyhow::ensure!(
                Instant::now() < deadline,
                "{target} leaves not appended within 120 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some((r, want)) = receipts {
            let deadline = Instant::now() + Duration::from_secs(120);
            while r.count() < want && Instant::now() < deadline {
                self.alive(data)?;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let c0 = cpu_seconds(&self.pid);
            tokio::time::sleep(Duration::from_millis(500)).await;
            if cpu_seconds(&self.pid) - c0 < 0.025 || Instant::now() >= deadline {
                return Ok(());
            }
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// When each probe patient's alarm arrived, by patient, Unix ms.
type Arrivals = Arc<std::sync::Mutex<HashMap<String, u64>>>;

fn arrived(at: &Arrivals, patient: &str) {
    at.lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(patient.to_owned())
        .or_insert_with(|| SystemClock.now_ms());
}

/// A webhook receiver on 127.0.0.1 (HTTP/1.1, keep-alive): answers 200 to
/// every POST and notes when each patient's `raised` event first came, by
/// the `Idempotency-Key` header (`<rule>/<patient>/<ms>-<n>#raised`).
async fn webhook_receiver() -> Result<(String, Arrivals)> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let at: Arrivals = Arc::default();
    let got = at.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let got = got.clone();
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut r = BufReader::new(r);
                loop {
                    let (mut len, mut key) = (0usize, String::new());
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let l = line.trim_end();
                        if l.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = l.split_once(':') {
                            match k.trim().to_ascii_lowercase().as_str() {
                                "content-length" => len = v.trim().parse().unwrap_or(0),
                                "idempotency-key" => key = v.trim().to_owned(),
                                _ => {}
                            }
                        }
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    if let Some(id) = key.strip_suffix("#raised")
                        && let Some(patient) = id.split('/').nth(1)
                    {
                        arrived(&got, patient);
                    }
                    if w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    Ok((url, at))
}

/// A nurse station of [`PROBE_WARD`]: a viewer certificate from the data
/// directory's CA, pinned in its viewers file, subscribed to
/// `alerts/<ward>` through the gate; notes when each patient's `raised`
/// event first came.
async fn nurse_station(data: &std::path::Path, port: u16) -> Result<(AsyncClient, Arrivals)> {
    use vitaltrail_mqtt::viewers::{Viewers, viewers_file};
    let pki = vitaltrail_mqtt::Pki::open(data)?;
    let (cert, key, pin) = pki.issue_viewer("bench")?;
    let file = viewers_file(data);
    let mut v = Viewers::load(&file)?;
    v.add(
        "bench",
        &[PROBE_WARD.to_owned()],
        &pin,
        "",
        SystemClock.now_ms(),
    )?;
    v.save(&file)?;
    let tls = vitaltrail_mqtt::ClientTls::new(&pki.server_ca_pem()?, &cert, &key)?;
    let mut opts = vitaltrail_mqtt::MqttEndpoint::plain("127.0.0.1", port)
        .with_tls(tls)
        .options("viewer:bench");
    opts.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = AsyncClient::new(opts, 1_000);
    client
        .subscribe(format!("alerts/{PROBE_WARD}"), QoS::AtLeastOnce)
        .await?;
    let at: Arrivals = Arc::default();
    let got = at.clone();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Ok(e) = serde_json::from_slice::<serde_json::Value>(&p.payload) else {
                        continue;
                    };
                    if e["kind"] == "raised"
                        && let Some(patient) = e["alarm"]["patient"].as_str()
                    {
                        arrived(&got, patient);
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    Ok((client, at))
}

/// Publish one alarm-raising reading (SpO2 80 %, NEWS2 scores it 3) per
/// probe patient, evenly over `over`; when each was published, by patient.
async fn send_probes(
    devices: &Devices,
    keys: &[SecretKey],
    over: Duration,
) -> Result<HashMap<String, u64>> {
    let mut sent = HashMap::new();
    let start = Instant::now();
    for (i, k) in keys.iter().enumerate() {
        let due = over.mul_f64(i as f64 / keys.len() as f64);
        if let Some(w) = due.checked_sub(start.elapsed()) {
            tokio::time::sleep(w).await;
        }
        let m = |code: &str, value: f64, unit: &str| vitaltrail_core::Measurement {
            code: code.into(),
            value,
            unit: unit.into(),
        };
        let now = SystemClock.now_ms();
        let r = UnsignedReading {
            seq: 1,
            time: now,
            measurements: vec![
                m("8867-4", 80.0, "/min"),
                m("2708-6", 80.0, "%"),
                m("9279-1", 16.0, "/min"),
            ],
            meta: None,
        };
        let did = k.did().to_string();
        sent.insert(format!("probe-{i}"), now);
        devices
            .clients
            .get(&did)
            .context("no connection for a probe")?
            .publish(
                format!("vitals/{did}"),
                QoS::AtLeastOnce,
                false,
                envelope::sign(k, &r)?,
            )
            .await?;
    }
    Ok(sent)
}

/// p50 and p99 of arrival − publish, over the probes that arrived.
fn probe_latency(sent: &HashMap<String, u64>, at: &Arrivals) -> (f64, f64, usize) {
    let at = at.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<f64> = sent
        .iter()
        .filter_map(|(p, t0)| Some(at.get(p)?.saturating_sub(*t0) as f64))
        .collect();
    let n = v.len();
    (pct(&mut v.clone(), 0.5), pct(&mut v, 0.99), n)
}

/// Full speed, then latency at a fixed rate, through the pipeline process
/// on `path`. CPU is `up`'s alone (the child), the devices' apart.
async fn run_path(
    a: &Args,
    path: &Path,
    keys: &[SecretKey],
    msgs: &[Signed],
    verify_rate: f64,
    transport_rate: f64,
) -> Result<(f64, f64)> {
    let partitions = path.partitions;
    let data = tempfile::tempdir()?;
    let reg = vitaltrail_bus::datadir::registry_file(data.path());
    for (i, k) in keys.iter().enumerate() {
        reg.add(k.did(), &format!("bench-{i}"), None, 0)?;
    }
    // The alert probes: a patient each, on the probe ward.
    // The probes publish in the engine-off run too, so both runs carry
    // the same load; only the timing of their alarms needs the engine.
    let probes_on = a.alert_probes > 0;
    let probing = path.alerts && probes_on;
    let probe_keys: Vec<SecretKey> = (0..if probes_on { a.alert_probes } else { 0 })
        .map(|_| SecretKey::generate(&mut rand_core::OsRng))
        .collect();
    for (i, k) in probe_keys.iter().enumerate() {
        reg.add(k.did(), &format!("probe-{i}"), Some(PROBE_WARD), 0)?;
    }
    let hook = if probing {
        let secret = data.path().join("webhook.secret");
        std::fs::write(&secret, "bench-webhook-secret-0123456789\n")?;
        Some((webhook_receiver().await?, secret))
    } else {
        None
    };
    let mqtt: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let metrics_listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    std::fs::create_dir_all(data.path().join("keys"))?;
    std::fs::write(
        vitaltrail_bus::datadir::metrics_token_path(data.path()),
        format!("{METRICS_TOKEN}\n"),
    )?;
    let mut child = Child::start(
        a,
        path,
        data.path(),
        mqtt,
        metrics_listen,
        hook.as_ref()
            .map(|((url, _), secret)| (url.as_str(), secret.as_path())),
    )?;
    vitaltrail_node::wait_for_port(mqtt, Duration::from_secs(30))
        .await
        .with_context(|| {
            format!(
                "the pipeline process did not listen; its log: {}",
                std::fs::read_to_string(data.path().join("pipeline.log")).unwrap_or_default()
            )
        })?;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let name = path.name;
    let pid = child.pid.clone();
    let pki = vitaltrail_mqtt::Pki::open(data.path())?;
    let receipted = Arc::new(Receipted::default());
    let devices = Devices::connect(
        mqtt.port(),
        Some((&pki, keys)),
        path.receipts.then_some(&receipted),
    )?;
    let probes = Devices::connect(mqtt.port(), Some((&pki, &probe_keys)), None)?;
    let station = if probing {
        Some(nurse_station(data.path(), mqtt.port()).await?)
    } else {
        None
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (up0, dev0) = (cpu_seconds(&pid), cpu_seconds("self"));
    let t = Instant::now();
    devices.send(msgs, None).await?;
    while appended(metrics_listen).await < msgs.len() as u64 {
        child.alive(data.path())?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    let e2e_rate = msgs.len() as f64 / secs;
    let full_receipts = msgs.len() as u64;
    child
        .settle(
            data.path(),
            metrics_listen,
            msgs.len() as u64,
            path.receipts.then_some((&*receipted, full_receipts)),
        )
        .await?;
    let stage_means = stage_means(metrics_listen).await.unwrap_or_default();
    let per = |cpu: f64, n: usize| cpu / n as f64 * 1e6;
    let up_full = per(cpu_seconds(&pid) - up0, msgs.len());
    let dev_full = per(cpu_seconds("self") - dev0, msgs.len());
    let rss_full = peak_rss_mb(&pid);
    let got_full = receipted.count();
    println!(
        "{name} pipeline ({partitions} partitions), full speed: {e2e_rate:>9.0} readings/s  ({:.2}x the verify ceiling, {:.2}x its transport); up alone {up_full:.0} µs CPU per reading ({:.2}x verify + transport), peak RSS {rss_full:.0} MB; the devices {dev_full:.0} µs{}",
        e2e_rate / verify_rate,
        e2e_rate / transport_rate,
        up_full / (1e6 / verify_rate + 1e6 / transport_rate),
        if path.receipts {
            format!("; {got_full} of {full_receipts} receipted")
        } else {
            String::new()
        },
    );
    println!("  where the time goes (means over the run): {stage_means}");

    // Latency at a fixed offered rate: new seqs for the same devices, on
    // the same connections. The peak RSS is reset (clear_refs 5) so the
    // figure is this phase's own.
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    let n = ((a.latency_rate * 10.0) as usize).min(a.readings);
    let msgs2 = sign_all(keys, n, 1_000_000)?;
    let before = appended(metrics_listen).await;
    let (up0, dev0) = (cpu_seconds(&pid), cpu_seconds("self"));
    let over = Duration::from_secs_f64(n as f64 / a.latency_rate);
    let (sent, probe_sent) = tokio::join!(
        devices.send(&msgs2, Some(a.latency_rate)),
        send_probes(&probes, &probe_keys, over)
    );
    let (sent, probe_sent) = (sent?, probe_sent?);
    child
        .settle(
            data.path(),
            metrics_listen,
            before + n as u64,
            path.receipts.then_some((&*receipted, got_full + n as u64)),
        )
        .await?;
    // Every probe's alarm on both channels (30 s at most).
    let alarms = match (&station, &hook) {
        (Some((_, mqtt_at)), Some(((_, hook_at), _))) => {
            let deadline = Instant::now() + Duration::from_secs(30);
            let all = |at: &Arrivals| at.lock().map_or(0, |m| m.len()) >= probe_keys.len();
            while !(all(mqtt_at) && all(hook_at)) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Some((
                probe_latency(&probe_sent, mqtt_at),
                probe_latency(&probe_sent, hook_at),
            ))
        }
        _ => None,
    };
    let up_rate = per(cpu_seconds(&pid) - up0, n);
    let dev_rate = per(cpu_seconds("self") - dev0, n);
    let rss = peak_rss_mb(&pid);
    let mut rlat: Vec<f64> = {
        let m = receipted.at.lock().unwrap_or_else(|e| e.into_inner());
        sent.iter()
            .filter_map(|(k, t0)| Some(m.get(k)?.saturating_sub(*t0) as f64))
            .collect()
    };
    drop(devices);
    drop(probes);
    drop(station);
    child.stop(data.path()).await?;
    let mut lat = Vec::with_capacity(n);
    for p in 0..partitions {
        let log = DurableLog::open(data.path().join("partitions").join(p.to_string()))?;
        for i in 0..log.size() {
            let l = log.leaf(i)?;
            let l = leaf::decode(&l)?;
            let r = envelope::decode_verified_upstream(l.envelope)?;
            if let Some(t0) = sent.get(&(r.did.to_string(), r.seq)) {
                lat.push(l.log_time_ms.saturating_sub(*t0) as f64);
            }
        }
    }
    println!(
        "{name} pipeline at {:.0}/s offered: p50 {:.0} ms, p99 {:.0} ms publish->leaf ({} readings); up alone {up_rate:.0} µs CPU per reading ({:.2}x its full-speed cost), peak RSS {rss:.0} MB; the devices {dev_rate:.0} µs",
        a.latency_rate,
        pct(&mut lat.clone(), 0.5),
        pct(&mut lat, 0.99),
        n,
        up_rate / up_full,
    );
    if path.receipts {
        println!(
            "  publish->receipt at {:.0}/s: p50 {:.0} ms, p99 {:.0} ms ({} of {n} receipted)",
            a.latency_rate,
            pct(&mut rlat.clone(), 0.5),
            pct(&mut rlat, 0.99),
            rlat.len(),
        );
    }
    if let Some(((m50, m99, mn), (w50, w99, wn))) = alarms {
        let k = probe_keys.len();
        println!(
            "  publish->alarm at {:.0}/s background: MQTT alerts/{PROBE_WARD} p50 {m50:.0} ms, p99 {m99:.0} ms ({mn} of {k}); webhook p50 {w50:.0} ms, p99 {w99:.0} ms ({wn} of {k})",
            a.latency_rate,
        );
    }
    Ok((up_full, up_rate))
}

/// A nisshi broker on 127.0.0.1 (memory storage), killed on drop.
struct Nisshi {
    child: std::process::Child,
    brokers: String,
}

impl Nisshi {
    fn start() -> Result<Nisshi> {
        let bin = std::env::var_os("NISSHI_BIN")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                std::env::var_os("NISSHI_ROOT")
                    .map(|r| std::path::PathBuf::from(r).join("bin/nisshi"))
            })
            .unwrap_or_else(|| {
                std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default())
                    .join(".cache/vitaltrail-tools/nisshi-0.8.1-lean/bin/nisshi")
            });
        anyhow::ensure!(
            bin.is_file(),
            "{} is missing: run scripts/setup (it builds the nisshi Kafka broker), set NISSHI_BIN, or pass --skip-kafka",
            bin.display()
        );
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = std::process::Command::new(bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args([
                "--storage-engine",
                "memory://nisshi/",
                "--group-initial-rebalance-delay",
                "0s",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "nisshi did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Nisshi {
            child,
            brokers: format!("127.0.0.1:{port}"),
        })
    }
}

impl Drop for Nisshi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The transport ceiling of the Kafka path: MQTT QoS 1 through rumqttd to
/// `connections` subscribers sharing the subscription, each producing every
/// message to Kafka (idempotent, acks=all) and acknowledging it to MQTT once
/// Kafka has it: ingest without checks or verification.
async fn transport_to_kafka(msgs: &[Signed], brokers: &str, connections: usize) -> Result<f64> {
    use futures::StreamExt as _;
    let port = free_port();
    tokio::spawn(vitaltrail_node::start_embedded_broker(
        format!("127.0.0.1:{port}").parse()?,
    )?);
    vitaltrail_node::wait_for_port(format!("127.0.0.1:{port}").parse()?, Duration::from_secs(5))
        .await?;
    let kcfg = KafkaConfig {
        brokers: brokers.to_owned(),
        ..KafkaConfig::default()
    };
    let producer = KafkaProducer::new(&kcfg)?;
    let got = Arc::new(AtomicU64::new(0));
    for i in 0..connections {
        let mut opts = MqttOptions::new(format!("bench-kafka-sub-{i}"), "127.0.0.1", port);
        opts.set_manual_acks(true)
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut el) = AsyncClient::new(opts, 10_000);
        client
            .subscribe("$share/bench/vitals/+", QoS::AtLeastOnce)
            .await?;
        let g = got.clone();
        let producer = producer.clone();
        tokio::spawn(async move {
            let mut pending = futures::stream::FuturesOrdered::new();
            loop {
                tokio::select! {
                    ev = el.poll() => match ev {
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let producer = producer.clone();
                            pending.push_back(async move {
                                let key = p.topic.clone();
                                let r = producer.send_to("bench.transport", &key, &p.payload).await;
                                (p, r)
                            });
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    },
                    Some((p, r)) = pending.next(), if !pending.is_empty() => {
                        if r.is_ok() {
                            g.fetch_add(1, Ordering::Relaxed);
                            let _ = client.ack(&p).await;
                        }
                    }
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    Devices::connect(port, None, None)?.send(msgs, None).await?;
    while got.load(Ordering::Relaxed) < msgs.len() as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(msgs.len() as f64 / t.elapsed().as_secs_f64())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let a = Args::parse();
    if let Some(dir) = &a.serve_pipeline {
        return serve_pipeline(&a, dir).await;
    }
    let partitions = a.partitions.unwrap_or(UpConfig::default().partitions);
    let keys: Vec<SecretKey> = (0..a.devices)
        .map(|_| SecretKey::generate(&mut rand_core::OsRng))
        .collect();
    println!(
        "vitaltrail e2e bench: {} readings, {} devices, {} partitions, 2 cores",
        a.readings, a.devices, partitions
    );

    // 1. Batch verification alone, one core.
    let msgs = sign_all(&keys, a.readings, 1)?;
    let t = Instant::now();
    for chunk in msgs.chunks(256) {
        let v =
            envelope::verify_batch(&chunk.iter().map(|m| m.bytes.as_slice()).collect::<Vec<_>>());
        assert!(v.iter().all(|r| r.is_ok()));
    }
    let verify_rate = a.readings as f64 / t.elapsed().as_secs_f64();
    println!("ceiling  batch verification alone (1 core):       {verify_rate:>9.0} readings/s");

    // 2. Transport alone: MQTT QoS 1 through rumqttd to an acking subscriber.
    let port = free_port();
    tokio::spawn(vitaltrail_node::start_embedded_broker(
        format!("127.0.0.1:{port}").parse()?,
    )?);
    vitaltrail_node::wait_for_port(format!("127.0.0.1:{port}").parse()?, Duration::from_secs(5))
        .await?;
    let got = Arc::new(AtomicU64::new(0));
    {
        let mut opts = MqttOptions::new("bench-sub", "127.0.0.1", port);
        opts.set_manual_acks(true)
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut el) = AsyncClient::new(opts, 10_000);
        client.subscribe("vitals/+", QoS::AtLeastOnce).await?;
        let g = got.clone();
        tokio::spawn(async move {
            while let Ok(ev) = el.poll().await {
                if let Event::Incoming(Packet::Publish(p)) = ev {
                    g.fetch_add(1, Ordering::Relaxed);
                    let _ = client.ack(&p).await;
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let t = Instant::now();
    Devices::connect(port, None, None)?
        .send(&msgs, None)
        .await?;
    while got.load(Ordering::Relaxed) < a.readings as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let transport_rate = a.readings as f64 / t.elapsed().as_secs_f64();
    println!("ceiling  transport alone (MQTT QoS 1, no verify): {transport_rate:>9.0} readings/s");

    // 3 + 4. The embedded pipeline.
    let embedded = Path {
        name: "embedded",
        kafka: None,
        partitions,
        receipts: true,
        alerts: true,
    };
    // What the alert engine costs: the same path with it off.
    let engine_cost = |name: &str, on: (f64, f64), off: (f64, f64)| {
        println!(
            "  {name}: the alert engine costs {:.1} µs CPU per reading at full speed ({:.0} on, {:.0} off), {:.1} µs at {:.0}/s ({:.0} on, {:.0} off)",
            on.0 - off.0,
            on.0,
            off.0,
            on.1 - off.1,
            a.latency_rate,
            on.1,
            off.1
        );
    };
    if !a.skip_embedded {
        let on = run_path(&a, &embedded, &keys, &msgs, verify_rate, transport_rate).await?;
        if a.alert_probes > 0 {
            let no_alerts = Path {
                name: "embedded, alert engine off",
                alerts: false,
                kafka: None,
                ..embedded
            };
            let off = run_path(&a, &no_alerts, &keys, &msgs, verify_rate, transport_rate).await?;
            engine_cost("embedded", on, off);
        }
        // The same without receipts: what one signature per commit and the
        // proofs cost.
        let off = Path {
            name: "embedded, receipts off",
            receipts: false,
            ..embedded
        };
        run_path(&a, &off, &keys, &msgs, verify_rate, transport_rate).await?;
    }

    // The same on the Kafka path: `up --kafka` against a real broker.
    if !a.skip_kafka {
        let broker = Nisshi::start()?;
        let k_transport = transport_to_kafka(&msgs, &broker.brokers, 8).await?;
        println!(
            "ceiling  transport alone (MQTT QoS 1 -> Kafka, no verify): {k_transport:>9.0} readings/s"
        );
        let kafka = Path {
            name: "kafka",
            kafka: Some(broker.brokers.clone()),
            partitions: a.kafka_partitions,
            receipts: true,
            alerts: true,
        };
        let on = run_path(&a, &kafka, &keys, &msgs, verify_rate, k_transport).await?;
        let mut broker = broker;
        if a.alert_probes > 0 {
            drop(broker);
            broker = Nisshi::start()?;
            let no_alerts = Path {
                name: "kafka, alert engine off",
                kafka: Some(broker.brokers.clone()),
                alerts: false,
                ..kafka
            };
            let off = run_path(&a, &no_alerts, &keys, &msgs, verify_rate, k_transport).await?;
            engine_cost("kafka", on, off);
        }
        // A fresh broker: the first run's records must not be read again.
        drop(broker);
        let broker = Nisshi::start()?;
        let off = Path {
            name: "kafka, receipts off",
            kafka: Some(broker.brokers.clone()),
            receipts: false,
            ..kafka
        };
        run_path(&a, &off, &keys, &msgs, verify_rate, k_transport).await?;
    }
    println!(
        "peak memory of the bench process (the devices): {:>9.0} MB",
        peak_rss_mb("self")
    );
    Ok(())
}
