//! The `vitaltrail` command. Thin: it parses arguments and calls the library
//! crates; see `commands.rs` for what each subcommand does.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod commands;
mod demo;

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
    /// Verify a proof bundle offline. Exits 0 only if every check passes.
    Verify {
        /// The proof bundle (JSON); `-` for standard input.
        bundle: PathBuf,
        /// The log's verifier key (`name+keyid+base64`), or a file holding it.
        #[arg(long, env = "VITALTRAIL_LOG_KEY")]
        log_key: String,
        /// Also require the reading to be signed by this device DID.
        #[arg(long)]
        device: Option<String>,
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

fn main() -> ExitCode {
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
            device,
        } => commands::verify(&bundle, &log_key, device.as_deref()),
        Command::Demo { dir, readings } => demo::run(&dir, readings),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line, never a backtrace.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
