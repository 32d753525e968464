//! Shared pieces of the end-to-end tests: real servers started on
//! 127.0.0.1 and stopped by the test, and the checks every path must pass.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vitaltrail_attestor::DurableLog;
use vitaltrail_attestor::pipeline::read_checkpoints;
use vitaltrail_bus::deadletter::RejectLog;
use vitaltrail_core::{Checkpoint, LogPublicKey, ProofBundle, envelope, leaf, merkle};
use vitaltrail_device_sim::publisher::SimReport;

/// The Python of the test venv scripts/setup makes (paho-mqtt,
/// `cryptography`, `blake3`), for the independent clients.
#[allow(dead_code)]
pub fn python() -> PathBuf {
    let venv = std::env::var("VITALTRAIL_VENV").unwrap_or_else(|_| {
        format!(
            "{}/.cache/vitaltrail-tools/venv",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let py = Path::new(&venv).join("bin/python");
    assert!(
        py.is_file(),
        "{} is missing: run scripts/setup (it installs paho-mqtt, cryptography and blake3 there)",
        py.display()
    );
    py
}

/// The device CA `vitaltrail up` made in `data` (devices connect through
/// its gate with certificates of it).
#[allow(dead_code)]
pub fn device_tls(data: &Path) -> Option<std::sync::Arc<vitaltrail_mqtt::Pki>> {
    Some(std::sync::Arc::new(
        vitaltrail_mqtt::Pki::open(data).expect("up made its CA in the data directory"),
    ))
}

pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Find a server binary or fail with what to install.
pub fn require(bin: &str, install: &str) -> PathBuf {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/usr/bin"])
    {
        let p = Path::new(dir).join(bin);
        if p.is_file() {
            return p;
        }
    }
    panic!("`{bin}` is not installed; {install} (scripts/setup installs it)");
}

/// A Mosquitto broker on 127.0.0.1, stopped on drop.
pub struct Mosquitto {
    pub port: u16,
    child: Option<Child>,
    conf: PathBuf,
    _dir: tempfile::TempDir,
}

/// A Mosquitto configured by `vitaltrail mqtt mosquitto` from the
/// registry and viewers of `data` (written to `<data>/mosquitto/`), and an
/// `up` configuration whose pipeline uses its pipeline listener with the
/// pipeline certificate. (Broker, device port, pipeline port, config.)
pub fn configured_mosquitto(data: &Path) -> (Mosquitto, u16, u16, vitaltrail_node::up::UpConfig) {
    use vitaltrail_mqtt::{MqttEndpoint, Pki};
    let d = data.to_str().unwrap().to_owned();
    let (dev_port, pipe_port) = (free_addr().port(), free_addr().port());
    let out = data.join("mosquitto");
    vt(&[
        "mqtt",
        "mosquitto",
        "--data",
        &d,
        "--out",
        out.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{dev_port}"),
        "--pipeline-listen",
        &format!("127.0.0.1:{pipe_port}"),
        // The test runs as whoever runs it; so does its broker.
        "--user",
        &whoami(),
    ]);
    let broker = Mosquitto::with_config(out.join("mosquitto.conf"), dev_port);
    wait_port(pipe_port);
    // The pipeline on its own listener, with its certificate.
    let pki = Pki::open(data).unwrap();
    let mqtt = MqttEndpoint::plain("127.0.0.1", pipe_port).with_tls(pki.pipeline_tls().unwrap());
    let cfg = vitaltrail_node::up::UpConfig {
        data_dir: data.to_owned(),
        external_mqtt: Some(mqtt),
        metrics_listen: None,
        attestor: vitaltrail_attestor::pipeline::AttestorConfig {
            checkpoint_interval: Duration::from_millis(100),
            ..Default::default()
        },
        ingest: vitaltrail_ingest::IngestConfig {
            share_group: Some("vitaltrail-ingest".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    (broker, dev_port, pipe_port, cfg)
}

/// The user this test runs as (a configured Mosquitto runs as it too).
pub fn whoami() -> String {
    let o = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8(o.stdout).unwrap().trim().to_owned()
}

impl Mosquitto {
    pub fn start(persistent: bool) -> Mosquitto {
        let bin = require(
            "mosquitto",
            "install Debian packages `mosquitto mosquitto-clients`",
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_addr().port();
        let conf = dir.path().join("mosquitto.conf");
        let mut c = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 1000\nmax_queued_messages 100000\nmessage_size_limit 0\nlog_dest stderr\nlog_type error\n"
        );
        if persistent {
            c.push_str(&format!(
                "persistence true\npersistence_location {}/\nautosave_interval 1\n",
                dir.path().display()
            ));
        } else {
            c.push_str("persistence false\n");
        }
        std::fs::write(&conf, c).unwrap();
        let mut m = Mosquitto {
            port,
            child: None,
            conf,
            _dir: dir,
        };
        m.spawn(&bin);
        m
    }

    /// A Mosquitto with this configuration file, whose first listener is
    /// on `port`.
    #[allow(dead_code)]
    pub fn with_config(conf: PathBuf, port: u16) -> Mosquitto {
        let bin = require(
            "mosquitto",
            "install Debian packages `mosquitto mosquitto-clients`",
        );
        let mut m = Mosquitto {
            port,
            child: None,
            conf,
            _dir: tempfile::tempdir().unwrap(),
        };
        m.spawn(&bin);
        m
    }

    fn spawn(&mut self, bin: &Path) {
        let child = Command::new(bin)
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        wait_port(self.port);
    }

    /// Stop gracefully (SIGTERM, so a persistent broker saves its state) and start again.
    pub fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
        let bin = require(
            "mosquitto",
            "install Debian packages `mosquitto mosquitto-clients`",
        );
        self.spawn(&bin);
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The nisshi Kafka-protocol broker on 127.0.0.1, stopped on drop.
pub struct Nisshi {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    persistent: bool,
}

pub fn nisshi_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NISSHI_BIN") {
        return PathBuf::from(p);
    }
    // Where scripts/setup installs it (NISSHI_ROOT, as there).
    let cached = match std::env::var("NISSHI_ROOT") {
        Ok(root) => PathBuf::from(root).join("bin/nisshi"),
        Err(_) => PathBuf::from(std::env::var("HOME").unwrap_or_default())
            .join(".cache/vitaltrail-tools/nisshi-0.8.1-lean/bin/nisshi"),
    };
    if cached.is_file() {
        return cached;
    }
    require(
        "nisshi",
        "it is looked for in $NISSHI_BIN, $NISSHI_ROOT/bin and ~/.cache/vitaltrail-tools/nisshi-0.8.1-lean/bin",
    )
}

impl Nisshi {
    pub fn start(persistent: bool) -> Nisshi {
        let dir = tempfile::tempdir().unwrap();
        let port = free_addr().port();
        let mut n = Nisshi {
            port,
            child: None,
            dir,
            persistent,
        };
        n.spawn();
        n
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let storage = if self.persistent {
            "sqlite://broker.db"
        } else {
            "memory://nisshi/"
        };
        let child = Command::new(nisshi_bin())
            .current_dir(self.dir.path())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args([
                "--storage-engine",
                storage,
                "--group-initial-rebalance-delay",
                "0s",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("nisshi.log")).unwrap())
            .spawn()
            .expect("start nisshi");
        self.child = Some(child);
        wait_port(self.port);
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kill -9 and start again on the same port and storage.
    pub fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The port must be free before the new broker binds it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.spawn();
    }
}

impl Drop for Nisshi {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Run a `vitaltrail` command to completion; it must succeed. Its stdout.
pub fn vt(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_vitaltrail"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Any child process (an independent client, a receiver), killed and
/// reaped however the test ends.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `vitaltrail` subcommand running as its own process, killed on drop.
pub struct Proc {
    pub child: Child,
    pub args: Vec<String>,
    log: PathBuf,
    env: Vec<(String, String)>,
}

impl Proc {
    pub fn spawn(args: &[String], log: PathBuf) -> Proc {
        Proc::spawn_env(args, log, &[])
    }

    /// [`Proc::spawn`] with more environment variables (a key, say).
    pub fn spawn_env(args: &[String], log: PathBuf, env: &[(&str, &str)]) -> Proc {
        let child = Command::new(env!("CARGO_BIN_EXE_vitaltrail"))
            .args(args)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .expect("spawn vitaltrail");
        Proc {
            child,
            args: args.to_vec(),
            log,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// kill -9, then start the same command again.
    pub fn crash_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let env: Vec<(String, String)> = self.env.clone();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        *self = Proc::spawn_env(&self.args.clone(), self.log.clone(), &env);
    }

    pub fn assert_running(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!(
                "{:?} exited with {st}: {}",
                self.args,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on 127.0.0.1:{port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn logged(data: &Path, partitions: u32) -> u64 {
    (0..partitions)
        .map(|p| {
            read_checkpoints(&data.join("partitions").join(p.to_string()))
                .unwrap()
                .last()
                .map_or(0, |c| c.size)
        })
        .sum()
}

/// Wait until the pipeline has durably decided every message of `report`.
pub async fn wait_settled(data: &Path, partitions: u32, report: &SimReport, timeout: Duration) {
    let expected_rejects: u64 = report.expected_rejects.values().sum();
    let deadline = Instant::now() + timeout;
    loop {
        let rejected = RejectLog::read_all(data.join("rejected.jsonl"))
            .unwrap()
            .len() as u64;
        let n = logged(data, partitions);
        if n >= report.valid_count() && rejected >= expected_rejects {
            // Let a last checkpoint and any redelivery land.
            tokio::time::sleep(Duration::from_millis(300)).await;
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out: logged {n} of {}, rejected {rejected} of {expected_rejects}",
            report.valid_count()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// After the pipeline stopped: every valid reading is logged exactly once,
/// nothing else is; every expected reject is there with its reason (extra
/// `duplicate` rejects of logged readings are allowed when a broker may
/// redeliver); sampled proofs and every checkpoint chain verify.
pub fn check_outcome(data: &Path, partitions: u32, report: &SimReport, allow_redelivery: bool) {
    check_outcome_with(
        data,
        partitions,
        report,
        if allow_redelivery {
            Rejects::Redelivery
        } else {
            Rejects::Exact
        },
    )
}

/// How strictly to compare the rejects with what the simulator expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejects {
    /// Exactly the expected reasons and counts.
    Exact,
    /// Also extra `duplicate`s (a broker redelivered logged readings).
    Redelivery,
    /// Every expected reject at least once; extra copies of expected
    /// reasons allowed (a crashed ingest re-processes redelivered rejects).
    AtLeast,
}

/// Open a partition log for writing (which checks its lock) once the
/// stopped stages have let go of it: a killed process's lock can outlive
/// `wait` by a moment (seen once in CI); 10 s at most.
fn open_log_when_free(dir: &Path) -> DurableLog {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match DurableLog::open(dir) {
            Ok(l) => return l,
            Err(vitaltrail_attestor::durable::Error::Locked(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("{}: {e}", dir.display()),
        }
    }
}

pub fn check_outcome_with(data: &Path, partitions: u32, report: &SimReport, mode: Rejects) {
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut sample = Vec::new();
    for p in 0..partitions {
        let dir = data.join("partitions").join(p.to_string());
        let log = open_log_when_free(&dir);
        for i in 0..log.size() {
            let l = log.leaf(i).unwrap();
            let l = leaf::decode(&l).unwrap();
            let r = envelope::verify(l.envelope).unwrap();
            seen.entry(r.did.to_string()).or_default().push(r.seq);
            if i % 13 == 0 {
                sample.push((p, i));
            }
        }
    }
    for v in seen.values_mut() {
        let n = v.len();
        assert_eq!(
            v.iter().copied().collect::<BTreeSet<u64>>().len(),
            n,
            "a reading was logged twice"
        );
        v.sort();
    }
    assert_eq!(
        &seen, &report.valid,
        "logged readings differ from the valid readings sent"
    );

    let rejected = RejectLog::read_all(data.join("rejected.jsonl")).unwrap();
    let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
    let mut sources = BTreeSet::new();
    for r in &rejected {
        // A record re-read after a crash carries the same source: count it once.
        if let Some(s) = &r.source
            && !sources.insert(s.clone())
        {
            continue;
        }
        *by_reason.entry(r.reason.clone()).or_default() += 1;
    }
    if mode == Rejects::AtLeast {
        for (reason, n) in &report.expected_rejects {
            let got = by_reason.get(reason).copied().unwrap_or(0);
            assert!(got >= *n, "{reason}: {got} rejected, {n} expected");
        }
        for (reason, n) in &by_reason {
            assert!(
                report.expected_rejects.contains_key(reason) || reason == "duplicate",
                "unexpected {reason} x{n}"
            );
        }
    } else if mode == Rejects::Redelivery {
        for (reason, n) in &report.expected_rejects {
            let got = by_reason.get(reason).copied().unwrap_or(0);
            assert!(got >= *n, "{reason}: {got} rejected, {n} expected");
            if reason != "duplicate" {
                assert_eq!(got, *n, "{reason}");
            }
        }
        for (reason, n) in &by_reason {
            assert!(
                report.expected_rejects.contains_key(reason) || reason == "duplicate",
                "unexpected {reason} x{n}"
            );
        }
    } else {
        assert_eq!(by_reason, report.expected_rejects);
    }

    assert!(sample.len() > 3);
    for (p, i) in sample {
        let dir = data.join("partitions").join(p.to_string());
        let vkey =
            LogPublicKey::parse(&std::fs::read_to_string(dir.join("log.vkey")).unwrap()).unwrap();
        let log = open_log_when_free(&dir);
        let note = log.latest_checkpoint().unwrap().unwrap();
        let cp = Checkpoint::open(&note, &vkey).unwrap();
        let l = log.leaf(i).unwrap();
        let l = leaf::decode(&l).unwrap();
        let proof = log.prove_inclusion(cp.size, i).unwrap();
        let b = ProofBundle::new(l.envelope, l.log_time_ms, i, &proof, &note);
        let r = b.verify(&vkey, None);
        assert!(r.ok(), "{:?}", r.checks);
        let cps = read_checkpoints(&dir).unwrap();
        for w in cps.windows(2) {
            let a = Checkpoint::open(&w[0].note, &vkey).unwrap();
            let b = Checkpoint::open(&w[1].note, &vkey).unwrap();
            let c = log.prove_consistency(a.size, b.size).unwrap();
            merkle::verify_consistency(a.size, b.size, &a.root, &b.root, &c).unwrap();
        }
    }
}

pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

pub async fn http_post(addr: SocketAddr, path: &str, body: &str, accept: &str) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAccept: {accept}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = out[split..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(std::str::from_utf8(&b[..i]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[i + 2..i + 2 + n]);
        b = &b[i + 2 + n + 2..];
    }
    out
}

/// The `readings` table holds every valid reading, each measurement once.
pub async fn check_tables(data: &Path, report: &SimReport) {
    let q = vitaltrail_query::QueryEngine::open(data).await.unwrap();
    let b = q
        .sql(
            "SELECT count(*) AS rows, \
             count(DISTINCT device || ':' || CAST(seq AS VARCHAR) || ':' || loinc) AS uniq, \
             count(DISTINCT device || ':' || CAST(seq AS VARCHAR)) AS readings FROM readings",
        )
        .await
        .unwrap();
    let json = vitaltrail_query::encode(&b, vitaltrail_query::Format::Json).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(
        v[0]["rows"], v[0]["uniq"],
        "a measurement row is duplicated: {v}"
    );
    assert_eq!(v[0]["readings"], report.valid_count(), "{v}");
}

/// One HTTP/1.1 request; returns the status, the head (lower-cased) and
/// the (de-chunked) body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&out[..split]).to_ascii_lowercase();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = out[split..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    (status, head, body)
}

/// The bearer token `vitaltrail up` keeps in `<data>/keys/<name>.token`.
pub fn token(data: &Path, name: &str) -> String {
    let p = data.join("keys").join(format!("{name}.token"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(t) = std::fs::read_to_string(&p)
            && t.ends_with('\n')
        {
            return t.trim().to_owned();
        }
        assert!(Instant::now() < deadline, "{} was not created", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait until `vitaltrail up`'s `/readyz` says ingest is subscribed.
pub async fn wait_ready(http: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if tokio::net::TcpStream::connect(http).await.is_ok() {
            let (status, _, _) = self::http(http, "GET", "/readyz", &[], "").await;
            if status == 200 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{http}/readyz never said ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// After a graceful stop (or beside a running anchor, which has caught
/// up): the epoch log holds epochs 0…E−1, each once and
/// in order; the ledger verifies (every signature, the chain, each root
/// against the epoch log) and anchors all E; every partition's latest
/// checkpoint is in an epoch; and `per_partition` readings of each
/// partition, spread over its log, get an anchored v2 bundle that
/// verifies with the log key and the anchor key. Returns the epoch count.
pub fn check_anchoring(data: &Path, per_partition: u64) -> u64 {
    use vitaltrail_anchor::store::EpochReader;
    use vitaltrail_core::anchor::EpochRecord;
    let adir = data.join("anchor");
    let akey = LogPublicKey::parse(
        std::fs::read_to_string(adir.join("anchor.vkey"))
            .unwrap()
            .trim(),
    )
    .unwrap();
    let reader = EpochReader::open(&adir).unwrap();
    let epochs = reader.log().size();
    assert!(epochs > 0, "no epoch was closed");
    let mut last_time = 0;
    for e in 0..epochs {
        let rec = EpochRecord::decode(&reader.log().leaf(e).unwrap()).unwrap();
        assert_eq!(rec.epoch, e, "epoch {e} is out of place: lost or doubled");
        assert!(
            rec.time_ms >= last_time,
            "epoch {e} closed before {}",
            e - 1
        );
        last_time = rec.time_ms;
    }
    let (records, torn) = vitaltrail_anchor::ledger::verify_against_log(&adir, &akey).unwrap();
    assert!(!torn && records > 0);
    let c = vitaltrail_anchor::ledger::read_checked(
        &vitaltrail_anchor::ledger::ledger_path(&adir),
        &akey,
        true,
        |_| Ok(()),
    )
    .unwrap();
    assert_eq!(
        c.last.unwrap().size,
        epochs,
        "the ledger does not anchor every epoch"
    );
    for dir in vitaltrail_query::prove::partition_dirs(data).unwrap() {
        let vkey = LogPublicKey::parse(
            std::fs::read_to_string(dir.join("log.vkey"))
                .unwrap()
                .trim(),
        )
        .unwrap();
        let log = DurableLog::open_read_only(&dir).unwrap();
        let Some(note) = log.latest_checkpoint().unwrap() else {
            continue;
        };
        let cp = Checkpoint::open(&note, &vkey).unwrap();
        if cp.size == 0 {
            continue;
        }
        let f = reader
            .find(&cp.origin, cp.size - 1)
            .unwrap()
            .unwrap_or_else(|| panic!("{} at {} is in no epoch", cp.origin, cp.size));
        assert_eq!(
            f.head.size, cp.size,
            "the latest checkpoint is not anchored"
        );
        let step = (cp.size / per_partition.max(1)).max(1);
        for i in (0..cp.size).step_by(step as usize) {
            let l = log.leaf(i).unwrap();
            let l = leaf::decode(&l).unwrap();
            let r = envelope::decode_verified_upstream(l.envelope).unwrap();
            let p = vitaltrail_query::prove::prove(data, &r.did, r.seq).unwrap();
            assert!(
                p.anchored_size.is_some(),
                "seq {} of {} is not anchored",
                r.seq,
                r.did
            );
            let rep = p.bundle.verify_anchored(&vkey, Some(&akey), Some(&r.did));
            assert!(rep.ok(), "{:?}", rep.checks);
        }
    }
    epochs
}

/// The npm tools scripts/setup installs (Anvil, cast, solc-js).
pub fn npm_tool(package: &str, bin: &str) -> PathBuf {
    let root = std::env::var("VITALTRAIL_NPM")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/vitaltrail-tools/npm")
        });
    let p = root
        .join("node_modules/@foundry-rs")
        .join(package)
        .join("bin")
        .join(bin);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/setup (it installs anchor/contracts/package.json's npm tools into {})",
        p.display(),
        root.display()
    );
    p
}

/// Anvil's first test account (the well-known test mnemonic; tests only).
pub const ANVIL_KEY: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
/// Its address.
pub const ANVIL_ADDRESS: &str = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266";

/// Anvil on 127.0.0.1 with 1 s blocks, its chain kept in a state file
/// across [`Anvil::stop`] and [`Anvil::start_again`]; killed on drop.
pub struct Anvil {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Anvil {
    pub fn start() -> Anvil {
        let mut a = Anvil {
            port: free_addr().port(),
            child: None,
            dir: tempfile::tempdir().unwrap(),
        };
        a.start_again();
        a
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Start (again) on the same port, from the saved chain.
    pub fn start_again(&mut self) {
        let state = self.dir.path().join("state.json");
        let child = Command::new(npm_tool("anvil-linux-amd64", "anvil"))
            .args([
                "--host",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "--block-time",
                "1",
            ])
            .arg("--state")
            .arg(&state)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("anvil.log")).unwrap())
            .spawn()
            .expect("start anvil");
        self.child = Some(child);
        wait_port(self.port);
    }

    /// Stop gracefully (SIGTERM: Anvil saves its chain), wait for the port
    /// to close.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `cast` against this chain; its trimmed stdout (it must succeed).
    pub fn cast(&self, args: &[&str]) -> String {
        let o = Command::new(npm_tool("cast-linux-amd64", "cast"))
            .args(args)
            .env("ETH_RPC_URL", self.url())
            .output()
            .expect("run cast");
        assert!(
            o.status.success(),
            "cast {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap().trim().to_owned()
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Wait until every partition's latest checkpoint is in an epoch and the
/// ledger anchors every epoch (the anchor has caught up).
pub async fn wait_anchored(data: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if anchored_all(data) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the anchor did not catch up within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn anchored_all(data: &Path) -> bool {
    let adir = data.join("anchor");
    let Ok(reader) = vitaltrail_anchor::store::EpochReader::open(&adir) else {
        return false;
    };
    let Ok(dirs) = vitaltrail_query::prove::partition_dirs(data) else {
        return false;
    };
    for dir in dirs {
        let Ok(log) = DurableLog::open_read_only(&dir) else {
            return false;
        };
        let Some(cp) = log
            .latest_checkpoint()
            .ok()
            .flatten()
            .and_then(|n| Checkpoint::parse_unverified(&n).ok())
        else {
            continue;
        };
        if cp.size > 0
            && !matches!(reader.find(&cp.origin, cp.size - 1), Ok(Some(f)) if f.head.size == cp.size)
        {
            return false;
        }
    }
    let text =
        std::fs::read_to_string(vitaltrail_anchor::ledger::ledger_path(&adir)).unwrap_or_default();
    let last = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<vitaltrail_anchor::ledger::LedgerLine>(l).ok());
    last.is_some_and(|l| l.size == reader.log().size())
}
