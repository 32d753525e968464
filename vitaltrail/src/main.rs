//! The `vitaltrail` command. Thin: it parses arguments and calls the library
//! crates; see `commands.rs` for what each subcommand does.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// jemalloc: it hands freed memory back to the system on a timer (and
/// fragments less than glibc's malloc under many threads), so the resident
/// size of a long-running `up` stays flat (`benches/scripts/soak`). On by
/// default; `scripts/demo` builds without it (the `jemalloc` feature).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[macro_use]
mod out;
mod commands;
mod demo;
mod node_args;
mod pipeline_cmds;

/// Verifiable vital signs, from the device to a public chain.
#[derive(Debug, Parser)]
#[command(name = "vitaltrail", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Device and log keys.
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Sign and check single reading envelopes.
    Reading {
        #[command(subcommand)]
        cmd: ReadingCmd,
    },
    /// Work on a standalone durable Merkle log.
    Log {
        #[command(subcommand)]
        cmd: LogCmd,
    },
    /// Verify a proof bundle: offline, or with --rpc also against an EVM
    /// chain. Exits 0 only if every check passes, 2 if the bundle is valid
    /// up to its checkpoint but not anchored yet, else 1.
    Verify {
        /// The proof bundle (JSON); `-` for standard input.
        bundle: PathBuf,
        /// The log's verifier key (`name+keyid+base64`), or a file holding it.
        /// Without it, the key is taken from the data directory (`--data`).
        #[arg(long, env = "VITALTRAIL_LOG_KEY")]
        log_key: Option<String>,
        /// The anchor's verifier key (epoch log checkpoints and ledger
        /// records), or a file holding it; for a v2 bundle. Default:
        /// <data>/anchor/anchor.vkey.
        #[arg(long, env = "VITALTRAIL_ANCHOR_VKEY")]
        anchor_key: Option<String>,
        /// Also ask this EVM JSON-RPC endpoint whether the registry holds
        /// the anchored root (a v2 bundle with an EVM receipt).
        #[arg(long)]
        rpc: Option<String>,
        /// With --rpc: blocks deep the anchor must be.
        #[arg(long, default_value_t = 1, requires = "rpc")]
        confirmations: u64,
        /// With --rpc: the registry the anchor must be in (default:
        /// <data>/anchor/evm.json's; never the bundle's own word).
        #[arg(long, requires = "rpc")]
        evm_contract: Option<String>,
        /// With --rpc: the address that must have anchored it (default:
        /// <data>/anchor/evm.json's submitter).
        #[arg(long, requires = "rpc")]
        evm_submitter: Option<String>,
        /// The `vitaltrail up` data directory to take the log key from.
        #[arg(long, env = "VITALTRAIL_DATA", default_value = vitaltrail_node::config::DEFAULT_DATA_DIR)]
        data: PathBuf,
        /// Also require the reading to be signed by this device DID.
        #[arg(long)]
        device: Option<String>,
    },
    /// Run the whole pipeline in one process: embedded MQTT broker, ingest,
    /// in-process bus, attestor, /metrics. Stops on Ctrl-C.
    Up(node_args::UpArgs),
    /// Run one ingest process (distributed mode): MQTT in, Kafka out.
    Ingest(node_args::IngestArgs),
    /// Run one attestor process (distributed mode) for a set of partitions.
    Attest(node_args::AttestArgs),
    /// Run the anchor (distributed mode): epochs over vitals.checkpoints,
    /// anchored to the local ledger and, when configured, an EVM chain.
    /// `vitaltrail up` runs it in process.
    Anchor(node_args::AnchorArgs),
    /// Run the alert engine (distributed mode) over vitals.logged, where
    /// the attestors announce every leaf once it is durable. `vitaltrail
    /// up` runs it in process.
    Alerts(node_args::AlertsArgs),
    /// Score NEWS2 (RCP 2017, chart 1) from the parameters given, with the
    /// alert engine's own code. Prints JSON: total, per-parameter scores,
    /// the parameters missing, and the risk band.
    News2 {
        /// Respiration rate, /min.
        #[arg(long)]
        rr: Option<f64>,
        /// SpO2, %.
        #[arg(long)]
        spo2: Option<f64>,
        /// The SpO2 chart: 1, or 2 (hypercapnic respiratory failure with a
        /// prescribed 88-92 % target).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
        scale: u8,
        /// On supplemental oxygen (else air).
        #[arg(long)]
        oxygen: bool,
        /// Systolic blood pressure, mmHg.
        #[arg(long)]
        sbp: Option<f64>,
        /// Pulse, /min.
        #[arg(long)]
        pulse: Option<f64>,
        /// ACVPU: A (alert), C (new confusion), V (voice), P (pain), U (unresponsive).
        #[arg(long)]
        consciousness: Option<vitaltrail_core::news2::Consciousness>,
        /// Temperature, °C.
        #[arg(long)]
        temp: Option<f64>,
    },
    /// The layered configuration of up, ingest, attest and anchor.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Simulated wearables: sign readings and publish them over MQTT (QoS 1).
    Sim {
        /// The MQTT broker.
        #[arg(long, env = "VITALTRAIL_MQTT", default_value = "127.0.0.1:8883")]
        mqtt: String,
        /// Connect each device on its own, over mutual TLS, with a
        /// certificate for its key from this data directory's device CA
        /// (<DIR>/mqtt, which `vitaltrail up` creates). Default: the
        /// --register directory, once it has a CA.
        #[arg(long)]
        tls: Option<PathBuf>,
        /// Connect plainly, one connection for every device (a broker
        /// without authentication).
        #[arg(long, conflicts_with = "tls")]
        no_tls: bool,
        /// Number of devices.
        #[arg(long, default_value_t = 10)]
        devices: usize,
        /// Readings per second per device.
        #[arg(long, default_value_t = 1.0)]
        rate: f64,
        /// Seconds to run.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Scenario for every device, a comma-separated list cycled over the
        /// devices, or `mix` (steady, deterioration, hypoxia, tachy, brady,
        /// dropout, silent, clock-skew).
        #[arg(long, default_value = "steady")]
        scenario: String,
        /// Inject an attack (repeatable; `all` for every one): forged-signature,
        /// wrong-key, replay, duplicate-seq, malformed-cbor, oversize, unknown-device.
        #[arg(long = "attack")]
        attacks: Vec<String>,
        /// Messages per attack.
        #[arg(long, default_value_t = 1)]
        attack_count: usize,
        /// Seed for device keys and patients (same seed, same devices).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Register the devices in this data directory's registry first.
        #[arg(long)]
        register: Option<PathBuf>,
        /// Replay a file of beat-to-beat (RR) intervals, one per line in ms,
        /// as heart-rate readings of one device at the times the beats happened.
        #[arg(long)]
        replay_rr: Option<PathBuf>,
        /// Replay the real MIT-BIH ECG (record 208) in scipy's `ecg.dat`
        /// (scripts/setup puts it in ~/.cache/vitaltrail-tools/ecg.dat):
        /// beats are detected (Pan-Tompkins) and become heart-rate readings
        /// of one device at the times they happened.
        #[arg(long, conflicts_with = "replay_rr")]
        replay_ecg: Option<PathBuf>,
        /// Replay speed: 1 = real time, 10 = ten times faster, 0 = at once
        /// (the beats then end now).
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Ignore receipts (docs/receipts.md): behave like a device that
        /// trusts the broker's PUBACK. By default each device keeps every
        /// reading until its receipt comes, resends the rest, and the run
        /// fails if some reading never gets one.
        #[arg(long)]
        no_receipts: bool,
        /// Log verifier keys (`name+keyid+base64`, repeatable) to check
        /// receipts against; with --register, those of that data directory
        /// are used too.
        #[arg(long = "log-key")]
        log_keys: Vec<String>,
    },
    /// MQTT broker configuration.
    Mqtt {
        #[command(subcommand)]
        cmd: MqttCmd,
    },
    /// Run SQL over the verified data: tables readings, checkpoints, anchors, rejected.
    Query {
        /// One SQL statement, e.g. "SELECT loinc, avg(value) FROM readings GROUP BY loinc".
        sql: String,
        /// The data directory.
        #[arg(long, env = "VITALTRAIL_DATA", default_value = vitaltrail_node::config::DEFAULT_DATA_DIR)]
        data: PathBuf,
        /// Output format: table, csv, json or parquet (parquet needs --out).
        #[arg(long, default_value = "table")]
        format: String,
        /// Write the result here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Readings as FHIR R4 resources.
    Fhir {
        #[command(subcommand)]
        cmd: FhirCmd,
    },
    /// The device registry.
    Devices {
        #[command(subcommand)]
        cmd: DevicesCmd,
    },
    /// Nurse stations: MQTT clients that may subscribe only to
    /// `alerts/<ward>` of their wards.
    Viewers {
        #[command(subcommand)]
        cmd: ViewersCmd,
    },
    /// Write a proof bundle for one logged reading.
    Prove {
        /// The device DID.
        #[arg(long)]
        device: String,
        /// The reading's seq.
        #[arg(long)]
        seq: u64,
        /// The data directory.
        #[arg(long, env = "VITALTRAIL_DATA", default_value = vitaltrail_node::config::DEFAULT_DATA_DIR)]
        data: PathBuf,
        /// Write the bundle here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Wait until the reading is logged, checkpointed and anchored
        /// (at most --timeout seconds; then a `pending` bundle).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 60.0, requires = "wait")]
        timeout: f64,
    },
    /// Run the end-to-end demo: sign, log, checkpoint, prove, verify, tamper.
    Demo {
        /// Where to keep the demo's keys and log (created; must be empty or absent).
        #[arg(long, default_value = "demo-data", env = "VITALTRAIL_DEMO_DIR")]
        dir: PathBuf,
        /// How many readings to sign and log.
        #[arg(long, default_value_t = 1000)]
        readings: u64,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    /// Print the effective configuration (built-in defaults, then the
    /// file, then VITALTRAIL_* variables) as TOML, with every possible
    /// secret redacted. The output is a valid configuration file.
    Print {
        /// Whose configuration: up, ingest, attest or anchor.
        #[arg(long, default_value = "up")]
        role: vitaltrail_node::config::Role,
        #[command(flatten)]
        config: node_args::ConfigFile,
    },
}

#[derive(Debug, Subcommand)]
enum FhirCmd {
    /// A patient's readings as vital-signs Observations: a searchset Bundle
    /// (as GET /fhir/Observation answers, every page in one), or NDJSON.
    Observations {
        /// The patient.
        #[arg(long)]
        patient: String,
        /// From this device time: YYYY, YYYY-MM, YYYY-MM-DD (UTC) or an
        /// RFC 3339 date-time with a zone.
        #[arg(long)]
        since: Option<String>,
        /// Before this device time (same forms).
        #[arg(long)]
        until: Option<String>,
        /// Only these LOINC codes (85354-9: blood pressure); repeat or
        /// separate with commas.
        #[arg(long = "code")]
        codes: Vec<String>,
        /// One Observation per line (FHIR bulk data NDJSON) instead of a
        /// Bundle.
        #[arg(long)]
        ndjson: bool,
        /// The data directory.
        #[arg(long, env = "VITALTRAIL_DATA", default_value = vitaltrail_node::config::DEFAULT_DATA_DIR)]
        data: PathBuf,
    },
}

#[derive(Debug, clap::Subcommand)]
enum ViewersCmd {
    /// Add a nurse station (or change its wards), and issue its MQTT client
    /// certificate and key (`<out>/<name>.pem`, `<name>.key`, with the
    /// broker's CA as `<out>/server-ca.pem`) and its HTTP token for
    /// acknowledging alarms (`<out>/<name>.token`). Adding a name again
    /// replaces its certificate and token: the old ones stop working.
    Add {
        /// Its name (letters, digits, '-', '_', '.').
        name: String,
        /// A ward whose alerts it receives (repeat for more).
        #[arg(long = "ward", required = true)]
        wards: Vec<String>,
        /// Where to write its certificate and key (default: the current directory).
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// The data directory (viewers list, CA).
        #[arg(long, env = "VITALTRAIL_DATA", default_value = vitaltrail_node::config::DEFAULT_DATA_DIR)]
        data: PathBuf,
    },
    /// Revoke a nurse station: it can no longer connect or subscribe.
    Revoke {
        /// Its name.
        name: String,
        /// The data directory.
        #[arg(long, env = "VITALTRAIL_DATA", default_value = vitaltrail_node::config::DEFAULT_DATA_DIR)]
        data: PathBuf,
    },
    /// List the nurse stations and their wards.
    List {
        /// The data directory.
        #[arg(long, env = "VITALTRAIL_DATA", default_value = vitaltrail_node::config::DEFAULT_DATA_DIR)]
        data: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum MqttCmd {
    /// Write a Mosquitto 2.0 configuration that holds devices and the
    /// pipeline to the embedded broker's rules: mutual TLS, the DID as user
    /// name and client ID, and an ACL from the registry. Run it again after
    /// registry changes, then send Mosquitto SIGHUP.
    Mosquitto {
        /// Write mosquitto.conf, acl and the certificates here.
        #[arg(long)]
        out: PathBuf,
        /// The devices' listener.
        #[arg(long, default_value = "127.0.0.1:8883")]
        listen: std::net::SocketAddr,
        /// The pipeline's listener (ingest and attest --mqtt-tls).
        #[arg(long, default_value = "127.0.0.1:8884")]
        pipeline_listen: std::net::SocketAddr,
        /// More names for the broker's certificate (besides localhost,
        /// 127.0.0.1 and the listeners' addresses).
        #[arg(long = "name")]
        names: Vec<String>,
        /// The user Mosquitto runs as (default: its own, `mosquitto`, which
        /// must then be able to read <out>/server.key).
        #[arg(long)]
        user: Option<String>,
        /// The data directory (registry, CA).
        #[arg(long, env = "VITALTRAIL_DATA", default_value = vitaltrail_node::config::DEFAULT_DATA_DIR)]
        data: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum DevicesCmd {
    /// Print a device's MQTT client certificate (PEM), issued by
    /// <data>/mqtt/ca.pem for the device's own key; the device is its DID's
    /// key holder and must be registered and active.
    Cert {
        /// The device DID.
        did: String,
        /// The data directory.
        #[arg(long, env = "VITALTRAIL_DATA", default_value = vitaltrail_node::config::DEFAULT_DATA_DIR)]
        data: PathBuf,
    },
    /// Register a device for a patient.
    Add {
        /// The device DID.
        did: String,
        /// The patient (a pseudonymous ID).
        #[arg(long)]
        patient: String,
        /// Ward or care team.
        #[arg(long)]
        ward: Option<String>,
        /// The data directory.
        #[arg(long, env = "VITALTRAIL_DATA", default_value = vitaltrail_node::config::DEFAULT_DATA_DIR)]
        data: PathBuf,
        /// Also publish the registration to the vitals.devices topic of this
        /// Kafka cluster (distributed mode: every ingest and attestor follows it).
        #[arg(long, env = "VITALTRAIL_KAFKA")]
        kafka: Option<String>,
    },
    /// List registered devices (DID, patient, ward, state).
    List {
        /// The data directory.
        #[arg(long, env = "VITALTRAIL_DATA", default_value = vitaltrail_node::config::DEFAULT_DATA_DIR)]
        data: PathBuf,
    },
    /// Revoke a device: its readings are rejected from now on.
    Revoke {
        /// The device DID.
        did: String,
        /// The data directory.
        #[arg(long, env = "VITALTRAIL_DATA", default_value = vitaltrail_node::config::DEFAULT_DATA_DIR)]
        data: PathBuf,
        /// Also publish the revocation to the vitals.devices topic of this
        /// Kafka cluster (it may know the device even if this directory does not).
        #[arg(long, env = "VITALTRAIL_KAFKA")]
        kafka: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCmd {
    /// Generate an ed25519 key (PKCS#8 PEM, mode 0600) and print its DID.
    New {
        /// Where to write the key. Refuses to overwrite.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the DID of a key, and its log verifier key when given a log name.
    Show {
        /// The key file.
        #[arg(long)]
        key: PathBuf,
        /// Also print the signed-note verifier key for a log of this name.
        #[arg(long)]
        log_name: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ReadingCmd {
    /// Read a reading as JSON on stdin and write the signed COSE_Sign1 bytes.
    ///
    /// Input: {"seq": 1, "time": 1700000000000, "measurements":
    /// [{"code": "8867-4", "value": 72, "unit": "/min"}], "meta": {...}}.
    /// "time" may be omitted (now).
    Sign {
        /// The device key.
        #[arg(long)]
        key: PathBuf,
        /// Write the envelope here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Read COSE bytes (a file, or stdin) and print the verified reading as JSON.
    Verify {
        /// The envelope file; stdin when absent.
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum LogCmd {
    /// Verify envelope files and append them to the log (all or none).
    Append {
        /// The log directory (created if absent).
        #[arg(long)]
        dir: PathBuf,
        /// Envelope files (COSE_Sign1 bytes).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Sign a checkpoint of the log's current state and store it.
    Checkpoint {
        /// The log directory.
        #[arg(long)]
        dir: PathBuf,
        /// The log's signing key.
        #[arg(long)]
        key: PathBuf,
        /// The log's name (checkpoint origin).
        #[arg(long, default_value = "vitaltrail.local/log")]
        origin: String,
    },
    /// Write a proof bundle for leaf N against the latest checkpoint.
    Prove {
        /// The log directory.
        #[arg(long)]
        dir: PathBuf,
        /// The leaf index.
        #[arg(long)]
        index: u64,
        /// Write the bundle here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=off"));
    // Colour only on a terminal (never into a log file), and never with
    // NO_COLOR set (https://no-color.org).
    use std::io::IsTerminal as _;
    let ansi = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() -> ExitCode {
    // A panic exits 101, as an unwinding one did; the service commands
    // make it 70 (`exit_on_panic`).
    vitaltrail_node::exit_on_panic_with(101);
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Keys {
            cmd: KeysCmd::New { out },
        } => commands::keys_new(&out),
        Command::Keys {
            cmd: KeysCmd::Show { key, log_name },
        } => commands::keys_show(&key, log_name.as_deref()),
        Command::Reading {
            cmd: ReadingCmd::Sign { key, out },
        } => commands::reading_sign(&key, out.as_deref()),
        Command::Reading {
            cmd: ReadingCmd::Verify { file },
        } => commands::reading_verify(file.as_deref()),
        Command::Log {
            cmd: LogCmd::Append { dir, files },
        } => commands::log_append(&dir, &files),
        Command::Log {
            cmd: LogCmd::Checkpoint { dir, key, origin },
        } => commands::log_checkpoint(&dir, &key, &origin),
        Command::Log {
            cmd: LogCmd::Prove { dir, index, out },
        } => commands::log_prove(&dir, index, out.as_deref()),
        Command::Verify {
            bundle,
            log_key,
            anchor_key,
            rpc,
            confirmations,
            evm_contract,
            evm_submitter,
            data,
            device,
        } => commands::verify(
            &bundle,
            &commands::VerifyKeys {
                log_key: log_key.as_deref(),
                anchor_key: anchor_key.as_deref(),
                rpc: rpc.as_deref(),
                confirmations,
                evm_contract: evm_contract.as_deref(),
                evm_submitter: evm_submitter.as_deref(),
            },
            &data,
            device.as_deref(),
        ),
        Command::Alerts(args) => {
            init_tracing();
            match &args.cmd {
                Some(node_args::AlertsCmd::ExportKey { bus_key, data, out }) => {
                    pipeline_cmds::alerts_export_key(bus_key.as_deref(), data, out)
                }
                Some(node_args::AlertsCmd::Ack {
                    id,
                    by,
                    server,
                    data,
                }) => pipeline_cmds::alerts_ack(id, by, server, data),
                None => pipeline_cmds::alerts(&args),
            }
        }
        Command::Anchor(args) => {
            init_tracing();
            match &args.cmd {
                Some(node_args::AnchorCmd::VerifyLedger { data, anchor_key }) => {
                    pipeline_cmds::anchor_verify_ledger(data, anchor_key.as_deref())
                }
                Some(node_args::AnchorCmd::Deploy {
                    rpc,
                    key_file,
                    data,
                    confirmations,
                }) => pipeline_cmds::anchor_deploy(rpc, key_file.as_deref(), data, *confirmations),
                None => pipeline_cmds::anchor(args),
            }
        }
        Command::Up(args) => {
            init_tracing();
            pipeline_cmds::up(args)
        }
        Command::Sim {
            mqtt,
            tls,
            no_tls,
            devices,
            rate,
            duration,
            scenario,
            attacks,
            attack_count,
            seed,
            register,
            replay_rr,
            replay_ecg,
            speed,
            no_receipts,
            log_keys,
        } => {
            init_tracing();
            pipeline_cmds::sim(pipeline_cmds::SimArgs {
                tls,
                no_tls,
                receipts: !no_receipts,
                log_keys,
                mqtt,
                devices,
                rate,
                duration_secs: duration,
                scenario,
                attacks,
                attack_count,
                seed,
                register,
                replay_rr,
                replay_ecg,
                speed,
            })
        }
        Command::Devices {
            cmd:
                DevicesCmd::Add {
                    did,
                    patient,
                    ward,
                    data,
                    kafka,
                },
        } => pipeline_cmds::devices_add(&data, &did, &patient, ward.as_deref(), kafka),
        Command::Ingest(args) => {
            init_tracing();
            pipeline_cmds::ingest(args)
        }
        Command::Attest(args) => {
            init_tracing();
            pipeline_cmds::attest(args)
        }
        Command::Config {
            cmd: ConfigCmd::Print { role, config },
        } => pipeline_cmds::config_print(role, &config),
        Command::Devices {
            cmd: DevicesCmd::List { data },
        } => pipeline_cmds::devices_list(&data),
        Command::Devices {
            cmd: DevicesCmd::Cert { did, data },
        } => pipeline_cmds::devices_cert(&data, &did),
        Command::Mqtt {
            cmd:
                MqttCmd::Mosquitto {
                    out,
                    listen,
                    pipeline_listen,
                    names,
                    user,
                    data,
                },
        } => pipeline_cmds::mqtt_mosquitto(&data, &out, listen, pipeline_listen, names, user),
        Command::Devices {
            cmd: DevicesCmd::Revoke { did, data, kafka },
        } => pipeline_cmds::devices_revoke(&data, &did, kafka),
        Command::Viewers { cmd } => match cmd {
            ViewersCmd::Add {
                name,
                wards,
                out,
                data,
            } => pipeline_cmds::viewers_add(&data, &name, &wards, &out),
            ViewersCmd::Revoke { name, data } => pipeline_cmds::viewers_revoke(&data, &name),
            ViewersCmd::List { data } => pipeline_cmds::viewers_list(&data),
        },
        Command::Query {
            sql,
            data,
            format,
            out,
        } => pipeline_cmds::query(&data, &sql, &format, out.as_deref()),
        Command::Fhir {
            cmd:
                FhirCmd::Observations {
                    patient,
                    since,
                    until,
                    codes,
                    ndjson,
                    data,
                },
        } => pipeline_cmds::fhir_observations(
            &data,
            &patient,
            since.as_deref(),
            until.as_deref(),
            &codes,
            ndjson,
        ),
        Command::Prove {
            device,
            seq,
            data,
            out,
            wait,
            timeout,
        } => pipeline_cmds::prove(
            &data,
            &device,
            seq,
            out.as_deref(),
            wait.then(|| std::time::Duration::from_secs_f64(timeout.clamp(0.0, 86_400.0))),
        ),
        Command::Demo { dir, readings } => demo::run(&dir, readings),
        Command::News2 {
            rr,
            spo2,
            scale,
            oxygen,
            sbp,
            pulse,
            consciousness,
            temp,
        } => commands::news2(&vitaltrail_core::news2::Observations {
            respiration_rate: rr,
            spo2,
            scale: if scale == 2 {
                vitaltrail_core::news2::SpO2Scale::Scale2
            } else {
                vitaltrail_core::news2::SpO2Scale::Scale1
            },
            oxygen,
            systolic_bp: sbp,
            pulse,
            consciousness,
            temperature: temp,
        }),
    };
    match result {
        Ok(code) => code,
        // `vitaltrail … | head`: a normal end, as for `ls`.
        Err(e) if out::is_stdout_closed(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, never a backtrace.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
