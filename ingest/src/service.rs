//! The ingest loop: MQTT → checks → batch verification → bus → MQTT ack.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use futures::stream::FuturesOrdered;
use rumqttc::{AsyncClient, Event, Packet, Publish, QoS};
use tokio::sync::{mpsc, watch};
use vitaltrail_bus::deadletter::Rejection;
use vitaltrail_bus::{Outcome, Producer, Record, RejectSink};
use vitaltrail_core::receipt::{Entry, Receipt};
use vitaltrail_core::{Clock, DeviceId, DidCache, envelope};
use vitaltrail_mqtt::MqttEndpoint;

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use vitaltrail_bus::registry::{Lookup, SharedRegistry};

/// Topic prefix devices publish under: `vitals/<device DID>`.
pub const TOPIC_PREFIX: &str = vitaltrail_core::topics::VITALS;

/// Typed ingest configuration.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// The MQTT broker, and how ingest authenticates to it.
    pub mqtt: MqttEndpoint,
    /// MQTT client ID; must be unique per ingest process (persistent session).
    pub client_id: String,
    /// Shared-subscription group; `None` subscribes to `vitals/#` directly.
    pub share_group: Option<String>,
    /// Most messages verified in one batch.
    pub max_batch: usize,
    /// Most messages received but not yet acknowledged (bounded), per
    /// connection.
    pub max_pending: usize,
    /// MQTT connections, each with its own verify loop, sharing the
    /// subscription. A broker bounds the unacknowledged messages it sends
    /// one connection (rumqttd: 100, Mosquitto: `max_inflight_messages`,
    /// default 20), and a reading is acknowledged only once durable, so one
    /// connection carries at most that many readings per commit round trip.
    /// More than one needs a `share_group`.
    pub connections: usize,
    /// On shutdown, keep taking messages until none has arrived for this
    /// long (what the broker holds for ingest reaches the log)…
    pub drain_quiet: Duration,
    /// …or until this much time has passed.
    pub drain_max: Duration,
    /// Connect with a clean session. Right for a broker that lives in this
    /// process (its sessions die with it anyway, and rumqttd 0.20 panics
    /// when the last member of a share group leaves a persistent session
    /// with messages in flight); wrong for an external broker, whose
    /// persistent session keeps unacknowledged readings across a restart
    /// of ingest.
    pub clean_session: bool,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            mqtt: MqttEndpoint::default(),
            client_id: "vitaltrail-ingest-0".into(),
            share_group: Some("vitaltrail-ingest".into()),
            max_batch: 256,
            max_pending: 4096,
            connections: 8,
            drain_quiet: Duration::from_millis(300),
            drain_max: Duration::from_secs(10),
            clean_session: false,
        }
    }
}

impl IngestConfig {
    /// The subscription filter: everything under `vitals/`, so a message
    /// on any topic there that is not exactly `vitals/<did>` is
    /// dead-lettered (`topic_mismatch`), never silently left unread.
    pub fn filter(&self) -> String {
        match &self.share_group {
            Some(g) => format!("$share/{g}/{TOPIC_PREFIX}#"),
            None => format!("{TOPIC_PREFIX}#"),
        }
    }
}

type Pending = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = (Publish, std::result::Result<(), vitaltrail_bus::Error>)>
            + Send,
    >,
>;

/// Serve ingest until `shutdown` turns true: `cfg.connections` MQTT
/// connections (client IDs `<client_id>-<i>` when more than one), each
/// verifying and acknowledging its own share of the readings.
#[allow(clippy::too_many_arguments)]
pub async fn serve<P: Producer>(
    cfg: IngestConfig,
    producer: P,
    registry: SharedRegistry,
    rejects: RejectSink,
    receipts: Option<mpsc::Sender<Receipt>>,
    clock: Arc<dyn Clock>,
    metrics: Metrics,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let n = cfg.connections.max(1);
    if n > 1 && cfg.share_group.is_none() {
        return Err(Error::InvalidArgument(
            "more than one MQTT connection needs a shared-subscription group".into(),
        ));
    }
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let mut c = cfg.clone();
        if n > 1 {
            c.client_id = format!("{}-{i}", cfg.client_id);
        }
        set.spawn(run_connection(
            c,
            producer.clone(),
            registry.clone(),
            rejects.clone(),
            receipts.clone(),
            clock.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
    }
    let mut first_err = None;
    while let Some(res) = set.join_next().await {
        let res = res.map_err(|e| Error::Mqtt(format!("ingest connection task: {e}")))?;
        if let Err(e) = res {
            // One connection failed: stop the others too.
            set.abort_all();
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// One MQTT connection's loop.
#[allow(clippy::too_many_arguments)]
async fn run_connection<P: Producer>(
    cfg: IngestConfig,
    producer: P,
    registry: SharedRegistry,
    rejects: RejectSink,
    receipts: Option<mpsc::Sender<Receipt>>,
    clock: Arc<dyn Clock>,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let mut opts = cfg.mqtt.options(&cfg.client_id);
    opts.set_keep_alive(Duration::from_secs(10))
        .set_clean_session(cfg.clean_session)
        .set_manual_acks(true)
        // Room for oversize messages, so they are rejected with a reason
        // instead of breaking the connection.
        .set_max_packet_size(256 * 1024, 256 * 1024);
    let (client, mut eventloop) = AsyncClient::new(opts, 1024);
    let (tx, mut rx) = mpsc::channel::<Publish>(cfg.max_pending.max(1));
    let filter = cfg.filter();

    // The event loop drives the connection; it must keep running while
    // readings wait for the bus. A full channel stops it from reading more.
    let sub_client = client.clone();
    let subscribed = metrics.subscribed.clone();
    // It runs through the drain after `shutdown`; it is aborted at the end.
    let poller = tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        let mut counted = false;
        loop {
            let ev = eventloop.poll().await;
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff = Duration::from_millis(100);
                    tracing::info!(filter = %filter, "connected to MQTT; subscribing");
                    if let Err(e) = sub_client.subscribe(filter.clone(), QoS::AtLeastOnce).await {
                        tracing::warn!(error = %e, "subscribe failed");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send(p).await.is_err() {
                        return;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if !counted {
                        subscribed.inc();
                        counted = true;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if counted {
                        subscribed.dec();
                        counted = false;
                    }
                    tracing::warn!(error = %e, "MQTT connection error; reconnecting in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    });

    let mut pending: FuturesOrdered<Pending> = FuturesOrdered::new();
    let mut batch: Vec<Publish> = Vec::with_capacity(cfg.max_batch);
    let mut dids = DidCache::default();
    // This connection's share of the `pending` gauge (all connections add up).
    let mut shown_pending = 0i64;
    // After `shutdown`: keep taking what the broker already holds for us
    // until it has been quiet for `drain_quiet`, or `drain_max` has passed.
    let mut drain: Option<(tokio::time::Instant, tokio::time::Instant)> = None;
    // Acknowledgements the client's queue had no room for yet. The loop
    // never waits to queue one: the queue is drained only by the event
    // loop, which may itself be waiting for this loop to take a message
    // (a deadlock, shutdown included, that a flood through Mosquitto
    // reached). Each entry keeps only what the ack needs (no payload).
    let mut deferred: std::collections::VecDeque<Publish> = std::collections::VecDeque::new();
    loop {
        while let Some(p) = deferred.front() {
            if client.try_ack(p).is_err() {
                break;
            }
            deferred.pop_front();
        }
        metrics.deferred_acks.set(deferred.len() as i64);
        let now_pending = pending.len() as i64;
        metrics.pending.add(now_pending - shown_pending);
        shown_pending = now_pending;
        metrics.queue_depth.set(producer.queue_depth() as i64);
        let room = cfg.max_pending.saturating_sub(pending.len());
        let drain_at = drain.map(|(quiet, hard)| quiet.min(hard));
        tokio::select! {
            n = rx.recv_many(&mut batch, cfg.max_batch.min(room.max(1))), if room > 0 => {
                if n == 0 {
                    break;
                }
                if let Some((quiet, _)) = &mut drain {
                    *quiet = tokio::time::Instant::now() + cfg.drain_quiet;
                }
                let taken = std::mem::take(&mut batch);
                let (futures, rejections, entries) =
                    process_batch(taken, &producer, &registry, &mut dids, clock.as_ref(), &metrics)?;
                // Rejections are durable before any of them is acknowledged
                // or receipted.
                rejects.record(rejections).await?;
                if let Some(tx) = &receipts {
                    for r in group_receipts(entries) {
                        // Full: the device resends; never wait on MQTT here.
                        if tx.try_send(r).is_err() {
                            metrics.receipts_dropped.inc();
                        }
                    }
                }
                for f in futures {
                    pending.push_back(f);
                }
            }
            Some((mut publish, res)) = pending.next(), if !pending.is_empty() => {
                match res {
                    Ok(()) => {
                        if !deferred.is_empty() || client.try_ack(&publish).is_err() {
                            publish.payload = Default::default();
                            deferred.push_back(publish);
                        }
                    }
                    Err(e) => {
                        // Not acknowledged: the broker redelivers it after a
                        // reconnect (persistent session). Force one.
                        tracing::warn!(error = %e, "bus did not accept a reading; reconnecting for redelivery");
                        let _ = client.disconnect().await;
                    }
                }
            }
            _ = async {
                match drain_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {
                if pending.is_empty() || drain.is_some_and(|(_, hard)| tokio::time::Instant::now() >= hard) {
                    break;
                }
                // Quiet, but readings are still on their way to the log:
                // wait for them (the pending branch), then look again.
                if let Some((quiet, _)) = &mut drain {
                    *quiet = tokio::time::Instant::now() + cfg.drain_quiet;
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(5)), if !deferred.is_empty() => {}
            _ = shutdown.changed(), if drain.is_none() => {
                if *shutdown.borrow() {
                    let now = tokio::time::Instant::now();
                    tracing::info!(pending = pending.len(), "draining ingest before shutdown");
                    drain = Some((now + cfg.drain_quiet, now + cfg.drain_max));
                }
            }
        }
    }
    // What the broker still hands over is not taken (not acknowledged, so
    // redelivered later): keep the event loop moving so that the
    // acknowledgements below go out.
    let discard = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    // Let readings already handed to the bus finish, and acknowledge them.
    let acks = async {
        for p in deferred.drain(..) {
            let _ = client.ack(&p).await;
        }
        while let Some((publish, res)) = pending.next().await {
            if res.is_ok() {
                let _ = client.ack(&publish).await;
            }
        }
    };
    if tokio::time::timeout(cfg.drain_max, acks).await.is_err() {
        tracing::warn!(
            "not every acknowledgement went out before shutdown; the broker will redeliver"
        );
    }
    discard.abort();
    metrics.pending.sub(shown_pending);
    let _ = client.disconnect().await;
    poller.abort();
    Ok(())
}

/// What the registry said about a message's device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    Active,
    Revoked,
    Unknown,
}

fn topic_device(topic: &str) -> Option<&str> {
    vitaltrail_core::topics::vitals_device(topic)
}

/// Receipts per device for the rejections of a batch, in order (split
/// below the brokers' message limit).
fn group_receipts(entries: Vec<(String, Entry)>) -> Vec<Receipt> {
    let mut by_device: Vec<(String, Vec<Entry>)> = Vec::new();
    for (did, e) in entries {
        match by_device.iter_mut().find(|(d, _)| *d == did) {
            Some((_, es)) => es.push(e),
            None => by_device.push((did, vec![e])),
        }
    }
    by_device
        .into_iter()
        .flat_map(|(did, es)| Receipt::split(&did, None, es))
        .collect()
}

type Decided = (Vec<Pending>, Vec<Rejection>, Vec<(String, Entry)>);

/// Check and verify one batch, and hand accepted readings to the bus.
/// Returns, in arrival order, one future per message that resolves when its
/// fate is durable, the rejections, which the caller must make durable
/// before awaiting those futures, and a receipt entry for each rejection,
/// for the device whose topic it came on.
fn process_batch<P: Producer>(
    batch: Vec<Publish>,
    producer: &P,
    registry: &SharedRegistry,
    dids: &mut DidCache,
    clock: &dyn Clock,
    metrics: &Metrics,
) -> Result<Decided> {
    let now = clock.now_ms();
    metrics.readings_in.inc_by(batch.len() as u64);
    metrics.batch_size.observe(batch.len() as f64);
    let start = Instant::now();
    // Structural checks and registry lookups, then one batch verification.
    let mut early: Vec<Option<Rejection>> = Vec::with_capacity(batch.len());
    let mut parsed = Vec::with_capacity(batch.len());
    for p in &batch {
        let topic_dev = topic_device(&p.topic);
        let reject = |code: &str, detail: String| {
            let mut r = Rejection::new("ingest", code, detail, &p.payload, now);
            r.topic = Some(p.topic.clone());
            r.device = topic_dev.map(str::to_owned);
            Some(r)
        };
        // One registry lookup per message, on the envelope's kid. Keys of
        // active devices come from the cache; anything else is parsed
        // afresh, so unknown DIDs cannot flush the cache.
        let mut known = Known::Unknown;
        let resolve = |kid: &str| {
            known = registry.with(|r| match r.lookup(kid) {
                Lookup::Active(_) => Known::Active,
                Lookup::Revoked(_) => Known::Revoked,
                Lookup::Unknown => Known::Unknown,
            });
            if known == Known::Active {
                dids.resolve(kid)
            } else {
                DeviceId::parse(kid)
            }
        };
        match envelope::parse_with(&p.payload, resolve) {
            Err(e) => {
                early.push(reject(e.code(), e.to_string()));
                parsed.push(Err(e));
            }
            Ok(env) => {
                let did = env.device().as_str().to_owned();
                let verdict = if topic_dev != Some(did.as_str()) {
                    // Name the signer, not the device the topic names.
                    reject(
                        "topic_mismatch",
                        format!("signed by {did} but published on {}", p.topic),
                    )
                    .map(|mut r| {
                        r.device = Some(did.clone());
                        r
                    })
                } else {
                    match known {
                        Known::Active => None,
                        Known::Revoked => reject("revoked_device", format!("{did} was revoked")),
                        Known::Unknown => {
                            reject("unknown_device", format!("{did} is not registered"))
                        }
                    }
                };
                if verdict.is_some() {
                    // Not verified: keep the batch free of readings we drop anyway.
                    parsed.push(Err(vitaltrail_core::Error::BadSignature));
                } else {
                    parsed.push(Ok(env));
                }
                early.push(verdict);
            }
        }
    }
    let verdicts = tokio::task::block_in_place(|| envelope::verify_parsed(parsed));
    metrics
        .verify_seconds
        .observe(start.elapsed().as_secs_f64());

    let mut rejections = Vec::new();
    let mut accepted_idx = Vec::new();
    for (i, (v, e)) in verdicts.into_iter().zip(early).enumerate() {
        match (e, v) {
            (Some(r), _) => rejections.push((i, r)),
            (None, Ok(reading)) => {
                accepted_idx.push((i, reading.did.as_str().to_owned(), reading.seq))
            }
            (None, Err(err)) => {
                let p = &batch[i];
                let mut r = Rejection::new("ingest", err.code(), err.to_string(), &p.payload, now);
                r.topic = Some(p.topic.clone());
                r.device = topic_device(&p.topic).map(str::to_owned);
                rejections.push((i, r));
            }
        }
    }
    let recs: Vec<Rejection> = rejections.iter().map(|(_, r)| r.clone()).collect();
    let entries: Vec<(String, Entry)> = rejections
        .iter()
        .filter_map(|(i, r)| {
            let p = &batch[*i];
            // The device the topic names, else the signer (a message on
            // `vitals/<did>/extra` still gets its rejection).
            topic_device(&p.topic)
                .map(str::to_owned)
                .or_else(|| r.device.clone())
                .map(|d| (d, Entry::rejected(r.seq, &p.payload, &r.reason)))
        })
        .collect();
    for r in &recs {
        metrics.rejected.with_label_values(&[&r.reason]).inc();
    }
    metrics.accepted.inc_by(accepted_idx.len() as u64);

    let mut futures: Vec<Option<Pending>> = (0..batch.len()).map(|_| None).collect();
    let mut publishes: Vec<Option<Publish>> = batch.into_iter().map(Some).collect();
    for (i, did, _seq) in accepted_idx {
        let Some(p) = publishes[i].take() else {
            continue;
        };
        let producer = producer.clone();
        let hist = metrics.bus_send_seconds.clone();
        let record = Record {
            key: did,
            payload: p.payload.to_vec(),
            received_ms: now,
        };
        let sent = Instant::now();
        futures[i] = Some(Box::pin(async move {
            let res = producer.send(record).await.map(|o: Outcome| {
                hist.observe(sent.elapsed().as_secs_f64());
                tracing::trace!(outcome = ?o, "reading durably handled");
            });
            (p, res)
        }));
    }
    for (i, _) in rejections {
        if let Some(p) = publishes[i].take() {
            futures[i] = Some(Box::pin(async move { (p, Ok(())) }));
        }
    }
    let futures = futures
        .into_iter()
        .map(|f| f.ok_or_else(|| Error::Mqtt("internal: message without a fate".into())))
        .collect::<Result<Vec<_>>>()?;
    Ok((futures, recs, entries))
}
