//! The flags of `up`, `ingest`, `attest`, `anchor`, `alerts` and `config print`: each flag
//! that is given becomes one key of the layered configuration
//! (`vitaltrail_node::config`), over the file and the environment. No flag
//! has a default of its own: defaults live in `NodeConfig::defaults`.

use std::net::SocketAddr;
use std::path::PathBuf;

use vitaltrail_node::config::{NodeConfig, Overrides, Role};

/// `--config`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigFile {
    /// The configuration file (TOML; see `vitaltrail config print`).
    /// Default: $VITALTRAIL_CONFIG, else ./vitaltrail.toml if it exists.
    /// Flags override it, and so do VITALTRAIL_* variables.
    #[arg(long = "config", value_name = "FILE")]
    pub path: Option<PathBuf>,
}

impl ConfigFile {
    /// Load the layers for `role` with `flags` on top.
    pub fn load(&self, role: Role, flags: &Overrides) -> vitaltrail_node::Result<NodeConfig> {
        NodeConfig::load(role, self.path.as_deref(), flags)
    }
}

/// What a distributed stage trusts and how it reaches Kafka securely
/// (`vitaltrail ingest` and `vitaltrail attest` alike).
#[derive(Debug, Clone, clap::Args)]
pub struct TrustArgs {
    /// The bus key file shared by every ingest and attestor of the
    /// pipeline (records on vitals.verified carry its MAC); default
    /// <data>/keys/bus.key, created if absent. [kafka.bus_key_file]
    #[arg(long)]
    bus_key: Option<PathBuf>,
    /// librdkafka client properties, one key=value per line (SASL, TLS:
    /// security.protocol, sasl.mechanisms, sasl.username, sasl.password,
    /// ssl.ca.location, …). A file, so that no secret is on a command line.
    /// [kafka.client_config_file]
    #[arg(long)]
    kafka_config_file: Option<PathBuf>,
    /// The operator's DID, whose signature every vitals.devices record
    /// must carry; default: the DID of <data>/keys/operator.pem (the key
    /// `devices add --kafka` signs with). [kafka.operator]
    #[arg(long)]
    operator: Option<String>,
    /// Connect to the MQTT broker over TLS with the pipeline's client
    /// certificate from <data>/mqtt (`vitaltrail mqtt mosquitto` writes a
    /// Mosquitto configuration that requires it). [mqtt.tls]
    #[arg(long)]
    mqtt_tls: bool,
}

impl TrustArgs {
    fn apply(&self, o: &mut Overrides) {
        o.set_opt("kafka.bus_key_file", self.bus_key.clone())
            .set_opt("kafka.client_config_file", self.kafka_config_file.clone())
            .set_opt("kafka.operator", self.operator.clone())
            .set_flag("mqtt.tls", self.mqtt_tls);
    }
}

/// `vitaltrail up`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub config: ConfigFile,
    /// Data directory (logs, checkpoints, rejects, registry, keys).
    /// [data_dir; default vitaltrail-data]
    #[arg(long)]
    data: Option<PathBuf>,
    /// Where devices connect to the embedded MQTT broker: mutual TLS
    /// with a certificate of <data>/mqtt/ca.pem (`vitaltrail devices
    /// cert`), each device held to vitals/<did> and receipts/<did>.
    /// [mqtt.listen; default 127.0.0.1:8883]
    #[arg(long)]
    mqtt_listen: Option<SocketAddr>,
    /// Host names devices reach the broker by (repeatable), for its
    /// certificate besides localhost, 127.0.0.1 and the listen address.
    /// [mqtt.names]
    #[arg(long = "mqtt-name")]
    mqtt_names: Vec<String>,
    /// Use this external MQTT broker (HOST:PORT) instead of the embedded
    /// one. [mqtt.broker]
    #[arg(long)]
    mqtt: Option<String>,
    /// Connect to the external broker over TLS with the pipeline's client
    /// certificate from <data>/mqtt (see `vitaltrail mqtt mosquitto`).
    /// [mqtt.tls]
    #[arg(long)]
    mqtt_tls: bool,
    /// Run the same stages over this Kafka cluster instead of the
    /// in-process bus (bootstrap servers). [kafka.brokers]
    #[arg(long)]
    kafka: Option<String>,
    /// Partitions (one Merkle log each). Default: what the data
    /// directory already holds; for a new one, 1 on the in-process bus
    /// (one log per disk commits in the largest groups) and
    /// kafka.topic_partitions (4) with --kafka.
    /// [partitions]
    #[arg(long)]
    partitions: Option<u32>,
    /// Where /metrics, POST /sql, /healthz and /readyz are served.
    /// [http.listen; default 127.0.0.1:9464]
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Sign a checkpoint at least this often (ms) while readings arrive.
    /// [attestor.checkpoint_interval_ms; default 1000]
    #[arg(long)]
    checkpoint_interval_ms: Option<u64>,
    #[command(flatten)]
    anchor: AnchorFlags,
}

/// The anchor's flags shared by `up` and `anchor`.
#[derive(Debug, Clone, clap::Args)]
pub struct AnchorFlags {
    /// Close an epoch this often (ms). [anchor.epoch_interval_ms; default 1000]
    #[arg(long)]
    epoch_interval_ms: Option<u64>,
    /// Also anchor to the EVM chain at this JSON-RPC URL (key from
    /// anchor.evm_key_file or $VITALTRAIL_EVM_KEY). [anchor.evm_rpc_url]
    #[arg(long)]
    evm_rpc: Option<String>,
    /// The registry's address (default: <data>/anchor/evm.json, which
    /// `vitaltrail anchor deploy` writes). [anchor.evm_contract]
    #[arg(long)]
    evm_contract: Option<String>,
    /// Anchor on chain at most this often (ms). [anchor.evm_interval_ms;
    /// default 3200]
    #[arg(long)]
    evm_interval_ms: Option<u64>,
    /// Blocks deep an anchor must be to count. [anchor.evm_confirmations;
    /// default 1]
    #[arg(long)]
    evm_confirmations: Option<u64>,
}

impl AnchorFlags {
    fn apply(&self, o: &mut Overrides) {
        o.set_opt("anchor.epoch_interval_ms", self.epoch_interval_ms)
            .set_opt("anchor.evm_rpc_url", self.evm_rpc.clone())
            .set_opt("anchor.evm_contract", self.evm_contract.clone())
            .set_opt("anchor.evm_interval_ms", self.evm_interval_ms)
            .set_opt("anchor.evm_confirmations", self.evm_confirmations);
    }
}

impl UpArgs {
    /// The flags given, as configuration keys.
    pub fn overrides(&self) -> Overrides {
        let mut o = Overrides::new();
        o.set_opt("data_dir", self.data.clone())
            .set_opt("mqtt.listen", self.mqtt_listen)
            .set_opt("mqtt.broker", self.mqtt.clone())
            .set_flag("mqtt.tls", self.mqtt_tls)
            .set_opt("kafka.brokers", self.kafka.clone())
            .set_opt("partitions", self.partitions)
            .set_opt("http.listen", self.metrics_listen)
            .set_opt(
                "attestor.checkpoint_interval_ms",
                self.checkpoint_interval_ms,
            );
        if !self.mqtt_names.is_empty() {
            o.set("mqtt.names", self.mqtt_names.clone());
        }
        self.anchor.apply(&mut o);
        o
    }
}

/// `vitaltrail ingest`.
#[derive(Debug, Clone, clap::Args)]
pub struct IngestArgs {
    #[command(flatten)]
    pub config: ConfigFile,
    /// Kafka bootstrap servers. [kafka.brokers]
    #[arg(long)]
    kafka: Option<String>,
    /// The MQTT broker (HOST:PORT). [mqtt.broker; default 127.0.0.1:1883]
    #[arg(long)]
    mqtt: Option<String>,
    /// MQTT client ID, unique per ingest process.
    /// [ingest.client_id; default vitaltrail-ingest-0]
    #[arg(long)]
    client_id: Option<String>,
    /// Shared-subscription group that ingest processes split the load in.
    /// [ingest.share_group; default vitaltrail-ingest]
    #[arg(long)]
    share_group: Option<String>,
    /// MQTT connections in the group from this process, each with its own
    /// verify loop (a broker caps the unacknowledged messages per
    /// connection: rumqttd 100, Mosquitto max_inflight_messages).
    /// [ingest.connections; default 8]
    #[arg(long)]
    connections: Option<usize>,
    /// Where the device registry (devices.json) and keys live.
    /// [data_dir; default vitaltrail-data]
    #[arg(long)]
    data: Option<PathBuf>,
    /// Partitions of vitals.verified, if this process creates the topic.
    /// [kafka.topic_partitions; default 4]
    #[arg(long)]
    topic_partitions: Option<u32>,
    /// Where /metrics is served. [http.listen]
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    trust: TrustArgs,
}

impl IngestArgs {
    /// The flags given, as configuration keys.
    pub fn overrides(&self) -> Overrides {
        let mut o = Overrides::new();
        o.set_opt("kafka.brokers", self.kafka.clone())
            .set_opt("mqtt.broker", self.mqtt.clone())
            .set_opt("ingest.client_id", self.client_id.clone())
            .set_opt("ingest.share_group", self.share_group.clone())
            .set_opt("ingest.connections", self.connections)
            .set_opt("data_dir", self.data.clone())
            .set_opt("kafka.topic_partitions", self.topic_partitions)
            .set_opt("http.listen", self.metrics_listen);
        self.trust.apply(&mut o);
        o
    }
}

/// `vitaltrail attest`.
#[derive(Debug, Clone, clap::Args)]
pub struct AttestArgs {
    #[command(flatten)]
    pub config: ConfigFile,
    /// Kafka bootstrap servers. [kafka.brokers]
    #[arg(long)]
    kafka: Option<String>,
    /// The MQTT broker (HOST:PORT) to publish receipts to
    /// (`receipts/<did>`); without it, no receipts. [mqtt.broker]
    #[arg(long)]
    mqtt: Option<String>,
    /// The vitals.verified partitions this process owns, e.g. 0,1,2,3.
    /// [attestor.partitions; default 0..kafka.topic_partitions]
    #[arg(long, value_delimiter = ',')]
    partitions: Option<Vec<u32>>,
    /// Other attestors own the topic's other partitions. Without it,
    /// --partitions must cover every partition of vitals.verified, or
    /// the attestor refuses to start. [attestor.partial]
    #[arg(long)]
    partial: bool,
    /// Partitions of vitals.verified, if this process creates the topic.
    /// [kafka.topic_partitions; default 4]
    #[arg(long)]
    topic_partitions: Option<u32>,
    /// Data directory (partition logs, checkpoints, rejects, log key).
    /// [data_dir; default vitaltrail-data]
    #[arg(long)]
    data: Option<PathBuf>,
    /// Do not copy vitals.rejected into <data>/rejected.jsonl.
    /// [attestor.copy_dead_letters = false]
    #[arg(long)]
    no_dead_letters: bool,
    /// Sign a checkpoint at least this often (ms) while readings arrive.
    /// [attestor.checkpoint_interval_ms; default 1000]
    #[arg(long)]
    checkpoint_interval_ms: Option<u64>,
    /// Where /metrics is served. [http.listen]
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    trust: TrustArgs,
}

impl AttestArgs {
    /// The flags given, as configuration keys.
    pub fn overrides(&self) -> Overrides {
        let mut o = Overrides::new();
        o.set_opt("kafka.brokers", self.kafka.clone())
            .set_opt("mqtt.broker", self.mqtt.clone())
            .set_opt("attestor.partitions", self.partitions.clone())
            .set_flag("attestor.partial", self.partial)
            .set_opt("kafka.topic_partitions", self.topic_partitions)
            .set_opt("data_dir", self.data.clone())
            .set_opt(
                "attestor.checkpoint_interval_ms",
                self.checkpoint_interval_ms,
            )
            .set_opt("http.listen", self.metrics_listen);
        if self.no_dead_letters {
            o.set("attestor.copy_dead_letters", false);
        }
        self.trust.apply(&mut o);
        o
    }
}

/// `vitaltrail alerts`.
#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AlertsArgs {
    #[command(subcommand)]
    pub cmd: Option<AlertsCmd>,
    #[command(flatten)]
    pub config: ConfigFile,
    /// Kafka bootstrap servers. [kafka.brokers]
    #[arg(long)]
    kafka: Option<String>,
    /// The vitals.logged partitions this engine owns, e.g. 0,1.
    /// [alerts.partitions; default every partition of the topic]
    #[arg(long, value_delimiter = ',')]
    partitions: Option<Vec<u32>>,
    /// Other engines own the topic's other partitions. Without it,
    /// --partitions must cover every partition of vitals.logged, or the
    /// engine refuses to start. [alerts.partial]
    #[arg(long)]
    partial: bool,
    /// Data directory (the engine's state and events in <data>/alerts,
    /// the local registry file). [data_dir; default vitaltrail-data]
    #[arg(long)]
    data: Option<PathBuf>,
    /// The file holding the vitals.logged key (`vitaltrail alerts
    /// export-key`), so this machine needs no bus key. Default: derived
    /// from the bus key file. [alerts.logged_key_file]
    #[arg(long)]
    logged_key_file: Option<PathBuf>,
    /// The pipeline's bus key file, to derive the vitals.logged key from
    /// (never created here). [kafka.bus_key_file]
    #[arg(long)]
    bus_key: Option<PathBuf>,
    /// librdkafka client properties, one key=value per line.
    /// [kafka.client_config_file]
    #[arg(long)]
    kafka_config_file: Option<PathBuf>,
    /// The operator's DID, whose signature every vitals.devices record
    /// must carry; default: the DID of <data>/keys/operator.pem.
    /// [kafka.operator]
    #[arg(long)]
    operator: Option<String>,
    /// Where /metrics is served. [http.listen]
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
}

/// `vitaltrail alerts …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum AlertsCmd {
    /// Write the vitals.logged key, derived from the pipeline's bus key, to
    /// a new file (mode 0600) for an alert engine's machine: it lets the
    /// engine check the attestors' announcements, and nothing else.
    ExportKey {
        /// The bus key file. Default: <data>/keys/bus.key.
        #[arg(long)]
        bus_key: Option<PathBuf>,
        /// The data directory holding keys/bus.key.
        #[arg(long, env = "VITALTRAIL_DATA", default_value = vitaltrail_node::config::DEFAULT_DATA_DIR)]
        data: PathBuf,
        /// The file to write (refused if it exists).
        #[arg(long)]
        out: PathBuf,
    },
    /// Acknowledge an active alarm on someone's behalf, as the operator
    /// (the token <data>/keys/alerts.token), through the HTTP server of
    /// the process running the alert engine. Nurse stations use their own
    /// token: POST /alerts/<id>/ack.
    Ack {
        /// The alarm ID (as in the events and the `alerts` table).
        id: String,
        /// Who acknowledges (recorded, with "via": "operator").
        #[arg(long = "as")]
        by: String,
        /// The engine's HTTP server (`http.listen` of `up` or `alerts`).
        #[arg(long, env = "VITALTRAIL_HTTP", default_value = "http://127.0.0.1:9464")]
        server: String,
        /// The data directory holding keys/alerts.token.
        #[arg(long, env = "VITALTRAIL_DATA", default_value = vitaltrail_node::config::DEFAULT_DATA_DIR)]
        data: PathBuf,
    },
}

impl AlertsArgs {
    /// The flags given, as configuration keys.
    pub fn overrides(&self) -> Overrides {
        let mut o = Overrides::new();
        o.set_opt("kafka.brokers", self.kafka.clone())
            .set_opt("alerts.partitions", self.partitions.clone())
            .set_flag("alerts.partial", self.partial)
            .set_opt("data_dir", self.data.clone())
            .set_opt("alerts.logged_key_file", self.logged_key_file.clone())
            .set_opt("kafka.bus_key_file", self.bus_key.clone())
            .set_opt("kafka.client_config_file", self.kafka_config_file.clone())
            .set_opt("kafka.operator", self.operator.clone())
            .set_opt("http.listen", self.metrics_listen);
        o
    }
}

/// `vitaltrail anchor`.
#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AnchorArgs {
    #[command(subcommand)]
    pub cmd: Option<AnchorCmd>,
    #[command(flatten)]
    pub config: ConfigFile,
    /// Kafka bootstrap servers. [kafka.brokers]
    #[arg(long)]
    kafka: Option<String>,
    /// Data directory (the anchor's state in <data>/anchor, the partition
    /// log keys in <data>/partitions/*/log.vkey). [data_dir; default
    /// vitaltrail-data]
    #[arg(long)]
    data: Option<PathBuf>,
    #[command(flatten)]
    anchor: AnchorFlags,
    /// librdkafka client properties, one key=value per line.
    /// [kafka.client_config_file]
    #[arg(long)]
    kafka_config_file: Option<PathBuf>,
    /// Where /metrics is served. [http.listen]
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
}

/// `vitaltrail anchor …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum AnchorCmd {
    /// Deploy the AnchorRegistry contract (anchor/contracts) to an EVM
    /// chain, wait for it, and write <data>/anchor/evm.json. The key comes
    /// from --key-file or $VITALTRAIL_EVM_KEY, never a flag.
    Deploy {
        /// The chain's JSON-RPC URL.
        #[arg(long)]
        rpc: String,
        /// A file holding the deployer's private key (hex).
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// The data directory to write <data>/anchor/evm.json in.
        #[arg(long, env = "VITALTRAIL_DATA", default_value = vitaltrail_node::config::DEFAULT_DATA_DIR)]
        data: PathBuf,
        /// Blocks deep the deployment must be.
        #[arg(long, default_value_t = 1)]
        confirmations: u64,
    },
    /// Check the local ledger: every record's signature, the hash chain,
    /// and each root against the epoch log.
    VerifyLedger {
        /// The data directory.
        #[arg(long, env = "VITALTRAIL_DATA", default_value = vitaltrail_node::config::DEFAULT_DATA_DIR)]
        data: PathBuf,
        /// The anchor's verifier key, or a file holding it. Default:
        /// <data>/anchor/anchor.vkey.
        #[arg(long)]
        anchor_key: Option<String>,
    },
}

impl AnchorArgs {
    /// The flags given, as configuration keys.
    pub fn overrides(&self) -> Overrides {
        let mut o = Overrides::new();
        o.set_opt("kafka.brokers", self.kafka.clone())
            .set_opt("data_dir", self.data.clone())
            .set_opt("kafka.client_config_file", self.kafka_config_file.clone())
            .set_opt("http.listen", self.metrics_listen);
        self.anchor.apply(&mut o);
        o
    }
}
