//! The layered configuration of `vitaltrail up`, `ingest` and `attest`.
//!
//! Four layers, each overriding the one before, key by key:
//!
//! 1. **built-in defaults**: [`NodeConfig::defaults`], which take every
//!    stage setting from the stage crate's own `Default` (one place for
//!    each default);
//! 2. **the file**: `--config FILE`, else `$VITALTRAIL_CONFIG`, else
//!    `./vitaltrail.toml` if it exists (TOML, same keys as
//!    `vitaltrail config print`);
//! 3. **environment variables**: `VITALTRAIL_<SECTION>__<KEY>` (two
//!    underscores between levels, e.g. `VITALTRAIL_INGEST__CONNECTIONS=4`),
//!    plus the short names listed in [`ENV_ALIASES`] (`VITALTRAIL_DATA`,
//!    `VITALTRAIL_KAFKA`, …). Values are read like TOML values: `4`, `true`,
//!    `[0, 1]`; a string that looks like a number needs quotes (`"123"`);
//! 4. **command-line flags** ([`Overrides`]).
//!
//! An unknown key in any layer (a typo in the file, or in a
//! `VITALTRAIL_A__B` variable) is an error naming it, never ignored.
//! Secrets are never held inline except librdkafka properties in
//! `[kafka.client]`, whose values [`NodeConfig::to_toml_redacted`] and
//! `Debug` replace with `<redacted>` (all but a short list of harmless
//! ones); keys live in files of the data directory.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};
use vitaltrail_attestor::pipeline::AttestorConfig;
use vitaltrail_bus::datadir;
use vitaltrail_bus::deadletter::RejectLimits;
use vitaltrail_bus::kafka::KafkaConfig;
use vitaltrail_core::DeviceId;
use vitaltrail_ingest::IngestConfig;
use vitaltrail_mqtt::MqttEndpoint;

use crate::{Error, Result};

/// The file read when neither `--config` nor `$VITALTRAIL_CONFIG` is given.
pub const DEFAULT_FILE: &str = "vitaltrail.toml";

/// The default data directory.
pub const DEFAULT_DATA_DIR: &str = "vitaltrail-data";

/// Environment variables with short names, the key each sets, and whether
/// the value is taken as a plain string (as these variables always were)
/// rather than read like a TOML value.
pub const ENV_ALIASES: &[(&str, &str, bool)] = &[
    ("VITALTRAIL_DATA", "data_dir", true),
    ("VITALTRAIL_PARTITIONS", "partitions", false),
    ("VITALTRAIL_MQTT_LISTEN", "mqtt.listen", true),
    ("VITALTRAIL_MQTT", "mqtt.broker", true),
    ("VITALTRAIL_KAFKA", "kafka.brokers", true),
    ("VITALTRAIL_BUS_KEY_FILE", "kafka.bus_key_file", true),
    (
        "VITALTRAIL_KAFKA_CONFIG_FILE",
        "kafka.client_config_file",
        true,
    ),
    ("VITALTRAIL_OPERATOR", "kafka.operator", true),
    ("VITALTRAIL_INGEST_ID", "ingest.client_id", true),
    ("VITALTRAIL_METRICS_LISTEN", "http.listen", true),
    (
        "VITALTRAIL_CHECKPOINT_INTERVAL_MS",
        "attestor.checkpoint_interval_ms",
        false,
    ),
];

/// Most partitions a pipeline may have (one Merkle log, one worker and one
/// set of files each).
pub const MAX_PARTITIONS: u32 = 1024;

/// Covered Parquet files are kept at least this long by default-safe
/// settings: twice a query's timeout (60 s), so no query that listed one
/// finds it gone. Less is allowed (tests), with a warning.
pub const MIN_SAFE_GRACE_MS: u64 = 120_000;

/// What `config print` writes in place of a secret; a configuration that
/// still holds it is refused.
pub const REDACTED: &str = "<redacted>";

/// librdkafka properties that `config print` shows; every other value in
/// `[kafka.client]` may be a secret and is redacted.
pub const PUBLIC_KAFKA_PROPERTIES: &[&str] = &[
    "security.protocol",
    "sasl.mechanisms",
    "sasl.mechanism",
    "sasl.username",
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
    "ssl.endpoint.identification.algorithm",
    "client.id",
];

/// Which command the configuration is for; a few defaults differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `vitaltrail up`: serves HTTP on 127.0.0.1:9464 by default and runs
    /// the embedded broker unless `mqtt.broker` is set.
    Up,
    /// `vitaltrail ingest`: `mqtt.broker` defaults to 127.0.0.1:1883; no
    /// HTTP unless `http.listen` is set.
    Ingest,
    /// `vitaltrail attest`: receipts only with `mqtt.broker`; no HTTP
    /// unless `http.listen` is set.
    Attest,
    /// `vitaltrail anchor`: the anchor over Kafka; no HTTP unless
    /// `http.listen` is set.
    Anchor,
    /// `vitaltrail alerts`: the alert engine over Kafka (`vitals.logged`);
    /// no HTTP unless `http.listen` is set.
    Alerts,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "up" => Ok(Role::Up),
            "ingest" => Ok(Role::Ingest),
            "attest" => Ok(Role::Attest),
            "anchor" => Ok(Role::Anchor),
            "alerts" => Ok(Role::Alerts),
            _ => Err(format!(
                "unknown role {s:?} (up, ingest, attest, anchor, alerts)"
            )),
        }
    }
}

/// The whole configuration of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Everything durable lives here.
    pub data_dir: PathBuf,
    /// Partitions (one Merkle log each). Unset: what the data directory
    /// already holds; for a new one, 1 on the in-process bus and
    /// `kafka.topic_partitions` with Kafka.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u32>,
    /// MQTT.
    pub mqtt: MqttSection,
    /// Kafka (the distributed mode, or `up` over Kafka).
    pub kafka: KafkaSection,
    /// The in-process bus of `up`.
    pub bus: BusSection,
    /// Ingest.
    pub ingest: IngestSection,
    /// The attestor.
    pub attestor: AttestorSection,
    /// The anchor.
    pub anchor: AnchorSection,
    /// The alert engine (`up` runs it in process); see
    /// `vitaltrail_alerts::AlertsConfig`.
    pub alerts: vitaltrail_alerts::AlertsConfig,
    /// The dead-letter store (`<data>/rejected.jsonl`).
    pub dead_letters: RejectLimits,
    /// The HTTP server (`/metrics`, `POST /sql`, health).
    pub http: HttpSection,
}

/// `[mqtt]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSection {
    /// Where devices connect to the embedded broker (mutual TLS through
    /// the gate). `up` only.
    pub listen: SocketAddr,
    /// More host names for the embedded broker's certificate.
    pub names: Vec<String>,
    /// An external broker (`HOST:PORT`): `up` uses it instead of the
    /// embedded one, `ingest` reads from it, `attest` sends receipts to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    /// Reach the external broker over TLS with the pipeline's client
    /// certificate from `<data>/mqtt`.
    pub tls: bool,
}

/// `[kafka]`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSection {
    /// Bootstrap servers. With it, `up` runs over Kafka; `ingest` and
    /// `attest` need it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brokers: Option<String>,
    /// Partitions of `vitals.verified` when a process creates the topic.
    pub topic_partitions: u32,
    /// The bus key file; default `<data>/keys/bus.key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus_key_file: Option<PathBuf>,
    /// librdkafka properties, one `key=value` per line (SASL, TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_config_file: Option<PathBuf>,
    /// More librdkafka properties, after the file's. Values may be
    /// secrets: `config print` and `Debug` redact them.
    pub client: BTreeMap<String, String>,
    /// The DID whose signature every `vitals.devices` record must carry;
    /// default: the data directory's operator key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
}

impl std::fmt::Debug for KafkaSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSection")
            .field("brokers", &self.brokers)
            .field("topic_partitions", &self.topic_partitions)
            .field("bus_key_file", &self.bus_key_file)
            .field("client_config_file", &self.client_config_file)
            .field("client", &redact_client(&self.client))
            .field("operator", &self.operator)
            .finish()
    }
}

fn redact_client(client: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    client
        .iter()
        .map(|(k, v)| {
            let shown = if PUBLIC_KAFKA_PROPERTIES.contains(&k.as_str()) {
                v.clone()
            } else {
                REDACTED.to_owned()
            };
            (k.clone(), shown)
        })
        .collect()
}

/// `[bus]`: the in-process bus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusSection {
    /// Records each partition holds in flight.
    pub capacity: usize,
}

/// `[ingest]`; see `vitaltrail_ingest::IngestConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestSection {
    /// MQTT client ID, unique per ingest process (`-<i>` is added per
    /// connection).
    pub client_id: String,
    /// Shared-subscription group ingest processes split the load in.
    pub share_group: String,
    /// MQTT connections from this process, each with its own verify loop.
    pub connections: usize,
    /// Most messages verified in one batch.
    pub max_batch: usize,
    /// Most messages received but not yet acknowledged, per connection.
    pub max_pending: usize,
    /// On shutdown, drain until nothing arrived for this long (ms)…
    pub drain_quiet_ms: u64,
    /// …or this long at most (ms).
    pub drain_max_ms: u64,
}

/// `[attestor]`; see `vitaltrail_attestor::pipeline::AttestorConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestorSection {
    /// `attest`: the `vitals.verified` partitions this process owns;
    /// default all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<Vec<u32>>,
    /// `attest`: other attestors own the topic's other partitions.
    pub partial: bool,
    /// `attest`: copy `vitals.rejected` into `<data>/rejected.jsonl`.
    pub copy_dead_letters: bool,
    /// Checkpoint origin prefix; partition `p` signs as `<prefix>/<p>`.
    pub origin_prefix: String,
    /// Sign a checkpoint at least this often (ms) while readings arrive…
    pub checkpoint_interval_ms: u64,
    /// …or after this many new leaves.
    pub checkpoint_every: u64,
    /// Most records processed per batch.
    pub max_batch: usize,
    /// Reject readings from further than this (ms) in the future of the
    /// time ingest received them.
    pub max_future_ms: u64,
    /// Publish signed receipts.
    pub receipts: bool,
    /// Compact a date directory's Parquet files of a partition once it
    /// holds this many small ones.
    pub compact_min_files: usize,
    /// Files this large are not small; a merge stops adding files here.
    pub compact_target_bytes: u64,
    /// Delete merged (covered) files this long (ms) after the file that
    /// covers them was written (longer than any query runs).
    pub compact_grace_ms: u64,
    /// Look for files to compact at most this often (ms).
    pub compact_every_ms: u64,
}

/// `[anchor]`; see `vitaltrail_anchor::AnchorConfig`. `Debug` shows the
/// RPC URL as `scheme://host[:port]` (`vitaltrail_anchor::evm::redact_url`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnchorSection {
    /// `up`: run the anchor in process.
    pub enabled: bool,
    /// Close an epoch this often (ms), when a partition's checkpoint moved.
    pub epoch_interval_ms: u64,
    /// The epoch log's origin (the anchor key's name).
    pub origin: String,
    /// The anchor key (PKCS#8 PEM). Default: the PEM text in
    /// `$VITALTRAIL_ANCHOR_KEY`, else `<data>/keys/anchor.pem`, created
    /// once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Partition log verifier keys to trust besides
    /// `<data>/partitions/*/log.vkey`.
    pub log_keys: Vec<String>,
    /// Anchor to the local ledger (`<data>/anchor/ledger.jsonl`).
    pub ledger: bool,
    /// Anchor to an EVM chain through this JSON-RPC URL too (unset: no
    /// chain). `config print` shows it as `scheme://host[:port]` (the port
    /// only when not the scheme's default): a provider's API key may be in
    /// its path or query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evm_rpc_url: Option<String>,
    /// The registry's address; default `<data>/anchor/evm.json`'s (what
    /// `vitaltrail anchor deploy` wrote).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evm_contract: Option<String>,
    /// A file holding the chain private key (hex); default
    /// `$VITALTRAIL_EVM_KEY`. Never a flag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evm_key_file: Option<PathBuf>,
    /// Refuse any other chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evm_chain_id: Option<u64>,
    /// An anchor counts once this many blocks hold it.
    pub evm_confirmations: u64,
    /// Anchor on chain at most this often (ms).
    pub evm_interval_ms: u64,
    /// Replace a transaction not mined within this long (ms).
    pub evm_tx_timeout_ms: u64,
}

impl std::fmt::Debug for AnchorSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnchorSection")
            .field("enabled", &self.enabled)
            .field("epoch_interval_ms", &self.epoch_interval_ms)
            .field("origin", &self.origin)
            .field("key_file", &self.key_file)
            .field("log_keys", &self.log_keys)
            .field("ledger", &self.ledger)
            .field(
                "evm_rpc_url",
                &self
                    .evm_rpc_url
                    .as_deref()
                    .map(vitaltrail_anchor::evm::redact_url),
            )
            .field("evm_contract", &self.evm_contract)
            .field("evm_key_file", &self.evm_key_file)
            .field("evm_chain_id", &self.evm_chain_id)
            .field("evm_confirmations", &self.evm_confirmations)
            .field("evm_interval_ms", &self.evm_interval_ms)
            .field("evm_tx_timeout_ms", &self.evm_tx_timeout_ms)
            .finish()
    }
}

/// `[http]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// Where `/metrics`, `POST /sql` (`up`), `/healthz` and `/readyz` are
    /// served; none when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
}

impl NodeConfig {
    /// The built-in defaults for `role`: every stage setting from the
    /// stage crate's `Default`.
    pub fn defaults(role: Role) -> NodeConfig {
        let i = IngestConfig::default();
        let a = AttestorConfig::default();
        let an = vitaltrail_anchor::AnchorConfig::default();
        let evm = vitaltrail_anchor::evm::EvmConfig::default();
        NodeConfig {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            partitions: None,
            mqtt: MqttSection {
                listen: SocketAddr::from(([127, 0, 0, 1], 8883)),
                names: vec![],
                broker: (role == Role::Ingest).then(|| "127.0.0.1:1883".to_owned()),
                tls: false,
            },
            kafka: KafkaSection {
                brokers: None,
                topic_partitions: 4,
                bus_key_file: None,
                client_config_file: None,
                client: BTreeMap::new(),
                operator: None,
            },
            bus: BusSection {
                capacity: vitaltrail_bus::inproc::DEFAULT_CAPACITY,
            },
            ingest: IngestSection {
                // `up` keeps names of its own, so that it never shares a
                // session or a share group with `vitaltrail ingest` on one
                // external broker.
                client_id: match role {
                    Role::Up => "vitaltrail-up-ingest".to_owned(),
                    _ => i.client_id,
                },
                share_group: match role {
                    Role::Up => "vitaltrail-up".to_owned(),
                    _ => i.share_group.unwrap_or_default(),
                },
                connections: i.connections,
                max_batch: i.max_batch,
                max_pending: i.max_pending,
                drain_quiet_ms: i.drain_quiet.as_millis() as u64,
                drain_max_ms: i.drain_max.as_millis() as u64,
            },
            attestor: AttestorSection {
                partitions: None,
                partial: false,
                copy_dead_letters: true,
                origin_prefix: a.origin_prefix,
                checkpoint_interval_ms: a.checkpoint_interval.as_millis() as u64,
                checkpoint_every: a.checkpoint_every,
                max_batch: a.max_batch,
                max_future_ms: a.max_future_ms,
                receipts: a.receipts,
                compact_min_files: a.compaction.min_files,
                compact_target_bytes: a.compaction.target_bytes,
                compact_grace_ms: a.compaction.grace.as_millis() as u64,
                compact_every_ms: a.compaction.every.as_millis() as u64,
            },
            anchor: AnchorSection {
                enabled: true,
                epoch_interval_ms: an.epoch_interval.as_millis() as u64,
                origin: an.origin,
                key_file: an.key_file,
                log_keys: an.log_keys,
                ledger: an.ledger,
                evm_rpc_url: None,
                evm_contract: None,
                evm_key_file: None,
                evm_chain_id: None,
                evm_confirmations: evm.confirmations,
                evm_interval_ms: evm.interval.as_millis() as u64,
                evm_tx_timeout_ms: evm.tx_timeout.as_millis() as u64,
            },
            alerts: vitaltrail_alerts::AlertsConfig::default(),
            dead_letters: RejectLimits::default(),
            http: HttpSection {
                listen: (role == Role::Up).then(|| SocketAddr::from(([127, 0, 0, 1], 9464))),
            },
        }
    }

    /// Load the layers for `role`: defaults, the file, the process's
    /// environment, then `flags`. The file is `file` if given, else
    /// `$VITALTRAIL_CONFIG`, else `./vitaltrail.toml` if it exists.
    pub fn load(role: Role, file: Option<&Path>, flags: &Overrides) -> Result<NodeConfig> {
        // Only our own variables need be text; anything else in the
        // environment (even not UTF-8) is none of our business.
        let env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| {
                let k = k.into_string().ok()?;
                k.starts_with("VITALTRAIL_")
                    .then(|| (k, v.to_string_lossy().into_owned()))
            })
            .collect();
        let file = match file {
            Some(f) => Some(f.to_path_buf()),
            None => match env.iter().find(|(k, _)| k == "VITALTRAIL_CONFIG") {
                Some((_, v)) => Some(PathBuf::from(v)),
                None => Some(PathBuf::from(DEFAULT_FILE)).filter(|p| p.exists()),
            },
        };
        Self::load_from(role, file.as_deref(), env, flags)
    }

    /// [`NodeConfig::load`] with the environment given (for tests). A file
    /// that is given must exist.
    pub fn load_from(
        role: Role,
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &Overrides,
    ) -> Result<NodeConfig> {
        let mut fig = Figment::from(figment::providers::Serialized::defaults(
            NodeConfig::defaults(role),
        ));
        if let Some(f) = file {
            if !f.exists() {
                return Err(Error::Config(format!(
                    "the configuration file {} does not exist",
                    f.display()
                )));
            }
            use figment::providers::Format as _;
            fig = fig.merge(figment::providers::Toml::file_exact(f));
        }
        for var in env_layers(env)? {
            fig = fig.merge(var);
        }
        let cfg: NodeConfig = fig.merge(flags.clone()).extract()?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Contradictions no single key shows.
    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.data_dir.as_os_str().is_empty() {
            return bad("data_dir is empty (an unset VITALTRAIL_DATA?)".into());
        }
        let at_least_one = [
            ("ingest.connections", self.ingest.connections),
            ("ingest.max_batch", self.ingest.max_batch),
            ("ingest.max_pending", self.ingest.max_pending),
            ("bus.capacity", self.bus.capacity),
            ("attestor.max_batch", self.attestor.max_batch),
            ("dead_letters.max_sources", self.dead_letters.max_sources),
        ];
        for (k, v) in at_least_one {
            if v == 0 {
                return bad(format!("{k} must be at least 1"));
            }
        }
        if self.ingest.connections > 1 && self.ingest.share_group.is_empty() {
            return bad("ingest.connections > 1 needs an ingest.share_group".into());
        }
        for (k, v) in [
            ("partitions", self.partitions.unwrap_or(1)),
            ("kafka.topic_partitions", self.kafka.topic_partitions),
        ] {
            if v == 0 || v > MAX_PARTITIONS {
                return bad(format!("{k} must be between 1 and {MAX_PARTITIONS}"));
            }
        }
        if let Some(p) = &self.attestor.partitions {
            if p.is_empty() {
                return bad("attestor.partitions is empty".into());
            }
            if let Some(x) = p.iter().find(|&&x| x >= MAX_PARTITIONS) {
                return bad(format!(
                    "attestor.partitions: {x} is past the largest partition ({})",
                    MAX_PARTITIONS - 1
                ));
            }
        }
        for (k, v) in [
            (
                "attestor.checkpoint_interval_ms",
                self.attestor.checkpoint_interval_ms,
            ),
            ("attestor.checkpoint_every", self.attestor.checkpoint_every),
            (
                "attestor.compact_target_bytes",
                self.attestor.compact_target_bytes,
            ),
            ("dead_letters.max_bytes", self.dead_letters.max_bytes),
        ] {
            if v == 0 {
                return bad(format!("{k} must be at least 1"));
            }
        }
        if self.anchor.evm_interval_ms < 100 || self.anchor.evm_tx_timeout_ms < 1000 {
            return bad(
                "anchor.evm_interval_ms must be at least 100 and anchor.evm_tx_timeout_ms at least 1000"
                    .into(),
            );
        }
        if self.anchor.epoch_interval_ms < 10 {
            return bad("anchor.epoch_interval_ms must be at least 10".into());
        }
        if !vitaltrail_core::checkpoint::is_valid_log_name(&self.anchor.origin) {
            return bad(format!(
                "anchor.origin {:?} is not a valid key name (non-empty, no spaces or '+')",
                self.anchor.origin
            ));
        }
        // Every partition's origin, `<prefix>/<p>`, must be a key name and
        // fit an epoch's head (checked for the longest, the last partition).
        let longest = format!("{}/{}", self.attestor.origin_prefix, MAX_PARTITIONS - 1);
        if self.attestor.origin_prefix.is_empty()
            || !vitaltrail_core::checkpoint::is_valid_log_name(&longest)
            || longest.len() > vitaltrail_core::anchor::MAX_ORIGIN_BYTES
        {
            return bad(format!(
                "attestor.origin_prefix {:?} does not make valid log names (`<prefix>/<partition>`: no spaces or '+', at most {} bytes)",
                self.attestor.origin_prefix,
                vitaltrail_core::anchor::MAX_ORIGIN_BYTES
            ));
        }
        if !vitaltrail_core::anchor::is_valid_stream(&self.anchor.origin) {
            return bad(format!(
                "anchor.origin {:?} is reserved or too long for a ledger record (docs/anchoring.md §5)",
                self.anchor.origin
            ));
        }
        for k in &self.anchor.log_keys {
            if let Err(e) = vitaltrail_core::LogPublicKey::parse(k) {
                return bad(format!("anchor.log_keys: {e}"));
            }
        }
        if let Err(e) = self.alerts.validate() {
            return bad(format!("alerts: {e}"));
        }
        if self.attestor.compact_min_files < 2 {
            return bad("attestor.compact_min_files must be at least 2".into());
        }
        if self.attestor.compact_grace_ms < MIN_SAFE_GRACE_MS {
            tracing::warn!(
                grace_ms = self.attestor.compact_grace_ms,
                "attestor.compact_grace_ms is under twice the query timeout: a long query may find a merged file gone"
            );
        }
        for (k, v) in [
            (
                "dead_letters.per_source_per_sec",
                self.dead_letters.per_source_per_sec,
            ),
            (
                "dead_letters.per_source_burst",
                self.dead_letters.per_source_burst,
            ),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!("{k} must be a number above 0"));
            }
        }
        if self.mqtt.tls && self.mqtt.broker.is_none() {
            return bad("mqtt.tls is for an external broker: set mqtt.broker too".into());
        }
        if let Some(b) = &self.mqtt.broker {
            MqttEndpoint::parse(b).map_err(|e| Error::Config(format!("mqtt.broker: {e}")))?;
        }
        self.operator()?;
        if let Some((k, _)) = self
            .kafka
            .client
            .iter()
            .find(|(_, v)| v.as_str() == REDACTED)
        {
            return bad(format!(
                "kafka.client.{k:?} is {REDACTED}: this file came from `config print`; put the \
                 secret back, or move it to kafka.client_config_file"
            ));
        }
        Ok(())
    }

    /// The configuration as TOML, with every possibly secret value
    /// replaced by `<redacted>`: what `vitaltrail config print` shows.
    pub fn to_toml_redacted(&self) -> Result<String> {
        let mut shown = self.clone();
        shown.kafka.client = redact_client(&self.kafka.client);
        shown.anchor.evm_rpc_url = self
            .anchor
            .evm_rpc_url
            .as_deref()
            .map(vitaltrail_anchor::evm::redact_url);
        // A webhook URL's path or query may hold a token.
        for w in &mut shown.alerts.webhooks {
            w.url = vitaltrail_alerts::webhook::redact_url(&w.url);
        }
        toml::to_string_pretty(&shown)
            .map_err(|e| Error::Config(format!("the configuration cannot be printed: {e}")))
    }

    /// Ingest's settings, with `mqtt` as its broker.
    pub fn ingest_config(&self, mqtt: MqttEndpoint) -> IngestConfig {
        let i = &self.ingest;
        IngestConfig {
            mqtt,
            client_id: i.client_id.clone(),
            share_group: Some(i.share_group.clone()).filter(|g| !g.is_empty()),
            max_batch: i.max_batch,
            max_pending: i.max_pending,
            connections: i.connections,
            drain_quiet: Duration::from_millis(i.drain_quiet_ms),
            drain_max: Duration::from_millis(i.drain_max_ms),
            ..IngestConfig::default()
        }
    }

    /// The anchor's settings.
    pub fn anchor_config(&self) -> vitaltrail_anchor::AnchorConfig {
        let a = &self.anchor;
        vitaltrail_anchor::AnchorConfig {
            data_dir: self.data_dir.clone(),
            epoch_interval: Duration::from_millis(a.epoch_interval_ms),
            origin: a.origin.clone(),
            key_file: a.key_file.clone(),
            log_keys: a.log_keys.clone(),
            ledger: a.ledger,
            evm: a
                .evm_rpc_url
                .clone()
                .map(|rpc_url| vitaltrail_anchor::evm::EvmConfig {
                    rpc_url,
                    contract: a.evm_contract.clone(),
                    key_file: a.evm_key_file.clone(),
                    confirmations: a.evm_confirmations,
                    interval: Duration::from_millis(a.evm_interval_ms),
                    tx_timeout: Duration::from_millis(a.evm_tx_timeout_ms),
                    chain_id: a.evm_chain_id,
                }),
        }
    }

    /// The attestor's settings.
    pub fn attestor_config(&self) -> AttestorConfig {
        let a = &self.attestor;
        AttestorConfig {
            data_dir: self.data_dir.clone(),
            origin_prefix: a.origin_prefix.clone(),
            checkpoint_interval: Duration::from_millis(a.checkpoint_interval_ms),
            checkpoint_every: a.checkpoint_every,
            max_batch: a.max_batch,
            max_future_ms: a.max_future_ms,
            receipts: a.receipts,
            topic_partitions: None,
            compaction: vitaltrail_attestor::parquet_out::CompactionPolicy {
                min_files: a.compact_min_files,
                target_bytes: a.compact_target_bytes,
                grace: Duration::from_millis(a.compact_grace_ms),
                every: Duration::from_millis(a.compact_every_ms),
            },
        }
    }

    /// The partition count `up` uses: `partitions`, else what the data
    /// directory holds, else 1 (in-process) or `kafka.topic_partitions`.
    pub fn up_partitions(&self) -> u32 {
        match (
            self.partitions,
            datadir::existing_partitions(&self.data_dir),
        ) {
            (Some(n), _) => n,
            (None, 0) if self.kafka.brokers.is_some() => self.kafka.topic_partitions,
            (None, 0) => 1,
            (None, n) => n,
        }
    }

    /// The Kafka settings: brokers, the bus key (created if absent) and
    /// the client properties (the file's, then `[kafka.client]`).
    pub fn kafka_config(&self, partitions: u32) -> Result<KafkaConfig> {
        let key_path = self
            .kafka
            .bus_key_file
            .clone()
            .unwrap_or_else(|| datadir::bus_key_path(&self.data_dir));
        let base = self.kafka_config_without_bus_key(partitions)?;
        Ok(KafkaConfig {
            bus_key: Some(datadir::load_bus_key(&key_path)?),
            ..base
        })
    }

    /// The key of `vitals.logged` for the alert engine: the file
    /// `alerts.logged_key_file`, else derived from the bus key file, which
    /// must exist (an engine never creates a bus key: one it made would
    /// check nothing any attestor announced).
    pub fn logged_key(&self) -> Result<vitaltrail_core::busauth::LoggedKey> {
        if let Some(f) = &self.alerts.logged_key_file {
            let text = std::fs::read_to_string(f).map_err(|e| {
                Error::Config(format!("alerts.logged_key_file {}: {e}", f.display()))
            })?;
            return vitaltrail_core::busauth::LoggedKey::from_hex(&text).ok_or_else(|| {
                Error::Config(format!(
                    "alerts.logged_key_file {} does not hold a key (64 hex digits)",
                    f.display()
                ))
            });
        }
        let path = self
            .kafka
            .bus_key_file
            .clone()
            .unwrap_or_else(|| datadir::bus_key_path(&self.data_dir));
        if !path.exists() {
            return Err(Error::Config(format!(
                "no vitals.logged key: give alerts.logged_key_file (--logged-key-file; made by \
                 `vitaltrail alerts export-key` where the bus key is), or the pipeline's bus key \
                 (kafka.bus_key_file, --bus-key); {} does not exist",
                path.display()
            )));
        }
        Ok(datadir::load_bus_key(&path)?.logged_key())
    }

    /// [`NodeConfig::kafka_config`] for a stage that neither writes nor
    /// reads `vitals.verified` (the anchor): no bus key.
    pub fn kafka_config_without_bus_key(&self, partitions: u32) -> Result<KafkaConfig> {
        let brokers = self.kafka.brokers.clone().ok_or_else(|| {
            Error::Config("kafka.brokers (--kafka, VITALTRAIL_KAFKA) is needed".into())
        })?;
        let mut client = match &self.kafka.client_config_file {
            Some(f) => datadir::read_kafka_client_config(f)?,
            None => vec![],
        };
        client.extend(
            self.kafka
                .client
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        Ok(KafkaConfig {
            brokers,
            partitions: partitions as i32,
            client,
            ..Default::default()
        })
    }

    /// `kafka.operator`, parsed.
    pub fn operator(&self) -> Result<Option<DeviceId>> {
        self.kafka
            .operator
            .as_deref()
            .map(|d| DeviceId::parse(d).map_err(|e| Error::Config(format!("kafka.operator: {e}"))))
            .transpose()
    }

    /// The external MQTT broker, if any; with `mqtt.tls`, over TLS with
    /// the pipeline's client certificate from `<data>/mqtt`.
    pub fn external_mqtt(&self) -> Result<Option<MqttEndpoint>> {
        let Some(addr) = &self.mqtt.broker else {
            return Ok(None);
        };
        let e = MqttEndpoint::parse(addr)?;
        if !self.mqtt.tls {
            return Ok(Some(e));
        }
        let pki = vitaltrail_mqtt::Pki::open(&self.data_dir).map_err(|e| {
            Error::Config(format!(
                "mqtt.tls needs the pipeline certificate in {}/mqtt (`vitaltrail mqtt mosquitto` makes it): {e}",
                self.data_dir.display()
            ))
        })?;
        Ok(Some(e.with_tls(pki.pipeline_tls()?)))
    }
}

/// Command-line flags: only those given, each under its key path.
#[derive(Debug, Clone, Default)]
pub struct Overrides(Vec<(String, Value)>);

impl Overrides {
    /// No flags.
    pub fn new() -> Self {
        Overrides::default()
    }

    /// Set `key` (a path such as `ingest.connections`) to `value`.
    pub fn set(&mut self, key: &str, value: impl Serialize) -> &mut Self {
        match Value::serialize(value) {
            Ok(v) => self.0.push((key.to_owned(), v)),
            // Only plain values are given here; one that does not
            // serialize is a programming error, reported at extraction.
            Err(e) => self.0.push((
                key.to_owned(),
                Value::from(format!("<unserializable: {e}>")),
            )),
        }
        self
    }

    /// Set `key` to `value` if given.
    pub fn set_opt<T: Serialize>(&mut self, key: &str, value: Option<T>) -> &mut Self {
        if let Some(v) = value {
            self.set(key, v);
        }
        self
    }

    /// Set `key` to `true` if `flag`.
    pub fn set_flag(&mut self, key: &str, flag: bool) -> &mut Self {
        if flag {
            self.set(key, true);
        }
        self
    }
}

fn nested(pairs: &[(String, Value)]) -> Dict {
    let mut dict = Dict::new();
    for (k, v) in pairs {
        if let Value::Dict(_, d) = figment::util::nest(k, v.clone()) {
            merge_into(&mut dict, d);
        }
    }
    dict
}

fn merge_into(into: &mut Dict, from: Dict) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(Value::Dict(_, a)), Value::Dict(_, b)) => merge_into(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

impl Provider for Overrides {
    fn metadata(&self) -> Metadata {
        Metadata::named("command-line flags")
    }

    fn data(&self) -> std::result::Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(nested(&self.0)))
    }
}

/// One environment variable, as a layer of its own (so an error names it).
struct EnvVar {
    name: String,
    key: String,
    value: Value,
}

/// The environment's layers: first the short names, then the
/// `VITALTRAIL_<SECTION>__<KEY>` forms (which win over a short name for the
/// same key), each group in name order, so the result never depends on the
/// order of the environment.
fn env_layers(vars: impl IntoIterator<Item = (String, String)>) -> Result<Vec<EnvVar>> {
    let mut aliases = Vec::new();
    let mut nested = Vec::new();
    for (name, raw) in vars {
        if let Some((_, key, plain)) = ENV_ALIASES.iter().find(|(n, _, _)| *n == name) {
            let value = if *plain {
                Value::from(raw)
            } else {
                raw.parse().unwrap_or_else(|_| Value::from(raw.clone()))
            };
            aliases.push(EnvVar {
                name,
                key: (*key).to_owned(),
                value,
            });
            continue;
        }
        let Some(rest) = name.strip_prefix("VITALTRAIL_") else {
            continue;
        };
        if !rest.contains("__") {
            // Another command's variable (VITALTRAIL_LOG_KEY,
            // VITALTRAIL_CONFIG, …), not a configuration key.
            continue;
        }
        let key = rest.to_ascii_lowercase().replace("__", ".");
        if key == "kafka.client" || key.starts_with("kafka.client.") {
            // librdkafka property names have dots, which a variable name
            // cannot carry, and their values may be secrets that an error
            // message would show.
            return Err(Error::Config(format!(
                "{name}: librdkafka properties cannot be set from the environment; put them in \
                 kafka.client_config_file (VITALTRAIL_KAFKA_CONFIG_FILE) or in [kafka.client] \
                 of the configuration file"
            )));
        }
        let value = raw.parse().unwrap_or_else(|_| Value::from(raw.clone()));
        nested.push(EnvVar { name, key, value });
    }
    aliases.sort_by(|a, b| a.name.cmp(&b.name));
    nested.sort_by(|a, b| a.name.cmp(&b.name));
    aliases.extend(nested);
    Ok(aliases)
}

impl Provider for EnvVar {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("environment variable {}", self.name))
    }

    fn data(&self) -> std::result::Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(nested(&[(self.key.clone(), self.value.clone())])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_come_from_the_stage_crates() {
        let c = NodeConfig::load_from(Role::Up, None, env(&[]), &Overrides::new()).unwrap();
        assert_eq!(c, NodeConfig::defaults(Role::Up));
        let i = c.ingest_config(MqttEndpoint::default());
        let d = IngestConfig::default();
        assert_eq!(i.connections, d.connections);
        // `up` has names of its own; `ingest` has the stage's.
        assert_eq!(i.client_id, "vitaltrail-up-ingest");
        assert_eq!(i.share_group.as_deref(), Some("vitaltrail-up"));
        let i = NodeConfig::defaults(Role::Ingest).ingest_config(MqttEndpoint::default());
        assert_eq!(i.client_id, d.client_id);
        assert_eq!(i.share_group, d.share_group);
        assert_eq!(i.max_pending, d.max_pending);
        assert_eq!(i.drain_max, d.drain_max);
        let a = c.attestor_config();
        let d = AttestorConfig::default();
        assert_eq!(a.checkpoint_interval, d.checkpoint_interval);
        assert_eq!(a.max_future_ms, d.max_future_ms);
        assert_eq!(c.dead_letters, RejectLimits::default());
        assert_eq!(c.http.listen, Some("127.0.0.1:9464".parse().unwrap()));
        let ingest = NodeConfig::defaults(Role::Ingest);
        assert_eq!(ingest.http.listen, None);
        assert_eq!(ingest.mqtt.broker.as_deref(), Some("127.0.0.1:1883"));
    }

    #[test]
    fn layers_apply_in_order_key_by_key() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("vitaltrail.toml");
        std::fs::write(
            &file,
            "data_dir = \"/from/file\"\n[ingest]\nconnections = 3\nmax_batch = 64\n\
             [attestor]\ncheckpoint_interval_ms = 250\n[http]\nlisten = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        // File over defaults.
        let c = NodeConfig::load_from(Role::Up, Some(&file), env(&[]), &Overrides::new()).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/from/file"));
        assert_eq!(c.ingest.connections, 3);
        assert_eq!(c.ingest.max_batch, 64);
        assert_eq!(c.ingest.max_pending, IngestConfig::default().max_pending);
        // Environment over the file, key by key (nested and alias forms).
        let e = env(&[
            ("VITALTRAIL_INGEST__CONNECTIONS", "5"),
            ("VITALTRAIL_DATA", "/from/env"),
            ("VITALTRAIL_CHECKPOINT_INTERVAL_MS", "500"),
            ("VITALTRAIL_LOG_KEY", "not a config key"),
            ("PATH", "/bin"),
        ]);
        let c = NodeConfig::load_from(Role::Up, Some(&file), e.clone(), &Overrides::new()).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/from/env"));
        assert_eq!(c.ingest.connections, 5);
        assert_eq!(c.ingest.max_batch, 64, "the file's value stands");
        assert_eq!(c.attestor.checkpoint_interval_ms, 500);
        // Flags over everything.
        let mut f = Overrides::new();
        f.set("ingest.connections", 7usize)
            .set("data_dir", "/from/flag")
            .set_opt::<u32>("partitions", None);
        let c = NodeConfig::load_from(Role::Up, Some(&file), e, &f).unwrap();
        assert_eq!(c.ingest.connections, 7);
        assert_eq!(c.data_dir, PathBuf::from("/from/flag"));
        assert_eq!(c.attestor.checkpoint_interval_ms, 500);
        assert_eq!(c.http.listen, Some("127.0.0.1:1".parse().unwrap()));
        assert_eq!(c.partitions, None);
    }

    #[test]
    fn unknown_keys_are_rejected_in_every_layer() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("c.toml");
        std::fs::write(&file, "[ingest]\nconections = 4\n").unwrap();
        let e = NodeConfig::load_from(Role::Up, Some(&file), env(&[]), &Overrides::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("conections"), "{e}");
        std::fs::write(&file, "datadir = \"x\"\n").unwrap();
        let e = NodeConfig::load_from(Role::Up, Some(&file), env(&[]), &Overrides::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("datadir"), "{e}");
        std::fs::write(&file, "[nope]\n").unwrap();
        assert!(NodeConfig::load_from(Role::Up, Some(&file), env(&[]), &Overrides::new()).is_err());
        let e = NodeConfig::load_from(
            Role::Up,
            None,
            env(&[("VITALTRAIL_INGEST__CONECTIONS", "4")]),
            &Overrides::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("conections"), "{e}");
        // A wrong type names the key too.
        let e = NodeConfig::load_from(
            Role::Up,
            None,
            env(&[("VITALTRAIL_INGEST__CONNECTIONS", "many")]),
            &Overrides::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("connections"), "{e}");
        // A missing file that was asked for is an error, not defaults.
        assert!(
            NodeConfig::load_from(
                Role::Up,
                Some(&d.path().join("missing.toml")),
                env(&[]),
                &Overrides::new()
            )
            .is_err()
        );
        // Contradictions.
        let mut f = Overrides::new();
        f.set("ingest.connections", 0usize);
        assert!(NodeConfig::load_from(Role::Up, None, env(&[]), &f).is_err());
    }

    #[test]
    fn a_webhook_url_token_is_never_printed() {
        let d = tempfile::tempdir().unwrap();
        let given = d.path().join("given.toml");
        std::fs::write(
            &given,
            "[[alerts.webhooks]]\nname = \"ehr\"\nurl = \"https://ehr.example:8443/hook?token=hunter2\"\n\
             wards = [\"*\"]\nsecret_file = \"/etc/ehr.secret\"\n",
        )
        .unwrap();
        let c = NodeConfig::load_from(Role::Up, Some(&given), env(&[]), &Overrides::new()).unwrap();
        let printed = c.to_toml_redacted().unwrap();
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("https://ehr.example:8443"), "{printed}");
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn printed_config_round_trips_and_redacts_secrets() {
        let d = tempfile::tempdir().unwrap();
        let given = d.path().join("given.toml");
        std::fs::write(
            &given,
            "[kafka]\nbrokers = \"k:9092\"\n[kafka.client]\n\"sasl.password\" = \"hunter2-secret\"\n\
             \"security.protocol\" = \"SASL_SSL\"\n",
        )
        .unwrap();
        let c =
            NodeConfig::load_from(Role::Ingest, Some(&given), env(&[]), &Overrides::new()).unwrap();
        assert_eq!(
            c.kafka.client.get("sasl.password").map(String::as_str),
            Some("hunter2-secret")
        );
        let printed = c.to_toml_redacted().unwrap();
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("SASL_SSL"), "{printed}");
        assert!(!format!("{c:?}").contains("hunter2"));
        // A printed file still holding <redacted> is refused, not sent to
        // Kafka as the password; with the secret put back it loads as the
        // same configuration.
        let file = d.path().join("printed.toml");
        std::fs::write(&file, &printed).unwrap();
        let e = NodeConfig::load_from(Role::Ingest, Some(&file), env(&[]), &Overrides::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("sasl.password"), "{e}");
        std::fs::write(&file, printed.replace(REDACTED, "hunter2-secret")).unwrap();
        let back =
            NodeConfig::load_from(Role::Ingest, Some(&file), env(&[]), &Overrides::new()).unwrap();
        assert_eq!(back, c);
    }

    fn load_err(file_text: Option<&str>, vars: &[(&str, &str)]) -> String {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("c.toml");
        if let Some(t) = file_text {
            std::fs::write(&file, t).unwrap();
        }
        NodeConfig::load_from(
            Role::Ingest,
            file_text.map(|_| file.as_path()),
            env(vars),
            &Overrides::new(),
        )
        .unwrap_err()
        .to_string()
    }

    #[test]
    fn errors_never_show_a_secret_and_stay_on_one_line() {
        for (text, vars) in [
            // A wrong type under [kafka.client].
            ("[kafka.client]\n\"sasl.password\" = 123456789\n", vec![]),
            ("[kafka.client]\n\"sasl.password\" = true\n", vec![]),
            // A TOML syntax error on the secret's line.
            (
                "[kafka.client]\n\"sasl.password\" = \"123456789-secret\n",
                vec![],
            ),
        ] {
            let e = load_err(Some(text), &vars);
            assert!(!e.contains("123456789") && !e.contains("true"), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
        // librdkafka properties from the environment are refused, with no
        // value quoted.
        for (k, v) in [
            ("VITALTRAIL_KAFKA__CLIENT__SASL_PASSWORD", "123456789"),
            ("VITALTRAIL_KAFKA__CLIENT", "{sasl = \"123456789\"}"),
        ] {
            let e = load_err(None, &[(k, v)]);
            assert!(e.contains(k) && e.contains("client_config_file"), "{e}");
            assert!(!e.contains("123456789"), "{e}");
        }
        // An error names the variable it came from.
        let e = load_err(None, &[("VITALTRAIL_INGEST__MAX_BATCH", "lots")]);
        assert!(e.contains("VITALTRAIL_INGEST__MAX_BATCH"), "{e}");
        assert!(e.contains("ingest.max_batch"), "{e}");
    }

    #[test]
    fn values_that_would_stop_or_wedge_a_stage_are_refused() {
        for (text, key) in [
            ("data_dir = \"\"\n", "data_dir"),
            ("[ingest]\nmax_batch = 0\n", "ingest.max_batch"),
            ("[ingest]\nmax_pending = 0\n", "ingest.max_pending"),
            ("[attestor]\nmax_batch = 0\n", "attestor.max_batch"),
            (
                "[dead_letters]\nmax_sources = 0\n",
                "dead_letters.max_sources",
            ),
            (
                "[dead_letters]\nper_source_per_sec = -1.0\n",
                "per_source_per_sec",
            ),
            (
                "[dead_letters]\nper_source_burst = nan\n",
                "per_source_burst",
            ),
            ("partitions = 4294967295\n", "partitions"),
            (
                "[kafka]\ntopic_partitions = 100000\n",
                "kafka.topic_partitions",
            ),
            ("[attestor]\npartitions = []\n", "attestor.partitions"),
            ("[attestor]\npartitions = [5000]\n", "attestor.partitions"),
            ("[attestor]\ncompact_min_files = 1\n", "compact_min_files"),
            ("[kafka]\noperator = \"not-a-did\"\n", "kafka.operator"),
            ("[mqtt]\nbroker = \"no port\"\n", "mqtt.broker"),
            (
                "[kafka.client]\n\"sasl.password\" = \"<redacted>\"\n",
                "sasl.password",
            ),
        ] {
            let e = load_err(Some(text), &[]);
            assert!(e.contains(key), "{text}: {e}");
        }
        // An empty VITALTRAIL_DATA (an unset variable in a unit file).
        let e = load_err(None, &[("VITALTRAIL_DATA", "")]);
        assert!(e.contains("data_dir"), "{e}");
    }

    #[test]
    fn short_names_take_plain_strings_and_lose_to_the_nested_form() {
        let c = NodeConfig::load_from(
            Role::Up,
            None,
            env(&[("VITALTRAIL_INGEST_ID", "42"), ("VITALTRAIL_DATA", "2024")]),
            &Overrides::new(),
        )
        .unwrap();
        assert_eq!(c.ingest.client_id, "42");
        assert_eq!(c.data_dir, PathBuf::from("2024"));
        // Whatever the order of the environment, the nested form wins.
        for vars in [
            [
                ("VITALTRAIL_KAFKA", "a:1"),
                ("VITALTRAIL_KAFKA__BROKERS", "b:2"),
            ],
            [
                ("VITALTRAIL_KAFKA__BROKERS", "b:2"),
                ("VITALTRAIL_KAFKA", "a:1"),
            ],
        ] {
            let c = NodeConfig::load_from(Role::Up, None, env(&vars), &Overrides::new()).unwrap();
            assert_eq!(c.kafka.brokers.as_deref(), Some("b:2"));
        }
    }
}
