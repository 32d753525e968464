//! The EVM backend: the epoch log's root, anchored in
//! `AnchorRegistry` (`anchor/contracts/AnchorRegistry.sol`,
//! `docs/anchoring.md` §6) on any EVM JSON-RPC chain, through `alloy`.
//!
//! Every `interval` the latest signed epoch log size is anchored if it is
//! past the last confirmed one, one transaction at a time:
//!
//! * the nonce is the chain's pending count for the anchor's address (it
//!   is the only sender with that key), set on each transaction;
//! * a transaction not mined within `tx_timeout` is sent again with the
//!   same nonce and higher fees (a replacement), so a dropped one does not
//!   stall anchoring;
//! * `AlreadyAnchored` is success when the chain's latest anchor is ours
//!   (same root as the epoch log's at that size), found in the `Anchored`
//!   events; another root there stops the backend (someone else holds the
//!   key);
//! * an anchor counts once it is `confirmations` blocks deep; the last
//!   confirmed one is checked again on every pass, and one a reorg removed
//!   is marked so, and the latest size is anchored again;
//! * RPC failures are counted and retried with backoff; while the chain is
//!   down the epoch log keeps growing and the next anchor covers it all.
//!
//! `<data>/anchor/evm.jsonl` records every submitted, confirmed and
//! reorged anchor (the `anchors` table reads the confirmed ones);
//! `<data>/anchor/evm.json` names the chain, the contract and the
//! submitter, for `prove` and `verify`. A kill -9 at any point is safe:
//! the contract never takes a size twice, and on start the chain's latest
//! anchor is read back.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use alloy::primitives::{Address, B256};
use alloy::primitives::{U256, keccak256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::{BlockNumberOrTag, Filter};
use alloy::signers::local::PrivateKeySigner;
use alloy::sol;
use alloy::sol_types::SolEvent as _;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use vitaltrail_core::merkle::Hash;

use crate::error::{Error, Result};
use crate::metrics::Metrics;

sol!(
    #[sol(rpc, all_derives)]
    AnchorRegistry,
    "contracts/AnchorRegistry.json"
);

use AnchorRegistry::AnchorRegistryErrors as RegistryError;

/// The environment variable a private key may come from.
pub const KEY_ENV: &str = "VITALTRAIL_EVM_KEY";

/// The EVM backend's settings.
#[derive(Clone, PartialEq, Eq)]
pub struct EvmConfig {
    /// The chain's JSON-RPC URL (http or https).
    pub rpc_url: String,
    /// The registry's address; default: `<data>/anchor/evm.json`'s (as
    /// `vitaltrail anchor deploy` wrote it).
    pub contract: Option<String>,
    /// A file holding the private key (hex); default `$VITALTRAIL_EVM_KEY`.
    pub key_file: Option<PathBuf>,
    /// An anchor counts once this many blocks hold it (1: mined).
    pub confirmations: u64,
    /// Anchor at most this often.
    pub interval: Duration,
    /// Send again (same nonce, higher fees) after this long unmined.
    pub tx_timeout: Duration,
    /// Refuse to anchor to another chain.
    pub chain_id: Option<u64>,
}

impl std::fmt::Debug for EvmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry an API key.
        f.debug_struct("EvmConfig")
            .field("rpc_url", &redact_url(&self.rpc_url))
            .field("contract", &self.contract)
            .field("key_file", &self.key_file)
            .field("confirmations", &self.confirmations)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl Default for EvmConfig {
    fn default() -> Self {
        EvmConfig {
            rpc_url: String::new(),
            contract: None,
            key_file: None,
            confirmations: 1,
            // 30,445 gas per anchor (measured on Anvil): at 10,000
            // readings/s, under 1 gas per reading from 3.05 s on.
            interval: Duration::from_millis(3200),
            tx_timeout: Duration::from_secs(60),
            chain_id: None,
        }
    }
}

/// `scheme://host[:port]` of a URL: never its path or query, which may hold
/// a provider's API key.
pub fn redact_url(url: &str) -> String {
    match alloy::transports::http::reqwest::Url::parse(url) {
        Ok(u) => match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{}://{h}:{p}", u.scheme()),
            (Some(h), None) => format!("{}://{h}", u.scheme()),
            _ => "<url>".to_owned(),
        },
        Err(_) => "<url>".to_owned(),
    }
}

/// An RPC error, with every URL in its text cut to `scheme://host`
/// (reqwest names the URL it failed on, and its path may hold a
/// provider's API key).
fn rpc_err(e: impl std::fmt::Display) -> Error {
    Error::Evm(scrub_urls(&e.to_string()))
}

/// `text` with each URL in it cut to `scheme://host[:port]`.
pub fn scrub_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        // The scheme: the letters before "://".
        let start = rest[..i]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.'))
            .map_or(0, |j| j + 1);
        let end = rest[i..]
            .find(|c: char| c.is_whitespace() || matches!(c, ')' | '"' | '\'' | '>' | ','))
            .map_or(rest.len(), |j| i + j);
        out.push_str(&rest[..start]);
        out.push_str(&redact_url(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// The private key: `key_file` (hex, `0x` optional), else `$VITALTRAIL_EVM_KEY`.
/// Errors never show the key.
pub fn load_key(key_file: Option<&Path>) -> Result<PrivateKeySigner> {
    let (text, from) = match key_file {
        Some(f) => (
            std::fs::read_to_string(f).map_err(|e| Error::Io {
                op: "reading",
                path: f.to_owned(),
                source: e,
            })?,
            f.display().to_string(),
        ),
        None => (
            std::env::var(KEY_ENV).map_err(|_| {
                Error::Setting(format!(
                    "no EVM key: set anchor.evm_key_file or ${KEY_ENV} (never a flag)"
                ))
            })?,
            format!("${KEY_ENV}"),
        ),
    };
    text.trim()
        .parse::<PrivateKeySigner>()
        .map_err(|_| Error::Setting(format!("{from} does not hold a 32-byte hex private key")))
}

fn install_tls() {
    // reqwest is built without a TLS provider of its own: use ring, as the
    // rest of the process does. Installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn url(rpc: &str) -> Result<alloy::transports::http::reqwest::Url> {
    rpc.parse()
        .map_err(|_| Error::Setting(format!("{} is not a URL", redact_url(rpc))))
}

/// How long one JSON-RPC request may take: a chain that hangs is retried
/// like one that is down.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(20);

fn http_client() -> Result<reqwest::Client> {
    install_tls();
    reqwest::Client::builder()
        .timeout(RPC_TIMEOUT)
        .connect_timeout(Duration::from_secs(5))
        .build()
        .map_err(rpc_err)
}

/// A provider that signs with `signer`.
pub fn wallet_provider(rpc: &str, signer: PrivateKeySigner) -> Result<DynProvider> {
    Ok(ProviderBuilder::new()
        .wallet(signer)
        .connect_reqwest(http_client()?, url(rpc)?)
        .erased())
}

/// A read-only provider.
pub fn read_provider(rpc: &str) -> Result<DynProvider> {
    Ok(ProviderBuilder::new()
        .connect_reqwest(http_client()?, url(rpc)?)
        .erased())
}

/// The registry's stream id of an epoch log: `keccak256(origin)`.
pub fn stream_id(origin: &str) -> B256 {
    keccak256(origin.as_bytes())
}

/// Where a deployment (and the anchor's submitter) is written down.
pub fn deployment_path(anchor_dir: &Path) -> PathBuf {
    anchor_dir.join("evm.json")
}

/// `<data>/anchor/evm.json`: which chain, contract and submitter the
/// anchors of this data directory are in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    /// EIP-155 chain id.
    pub chain_id: u64,
    /// The registry's address (checksummed hex).
    pub contract: String,
    /// The address that anchors (checksummed hex); set once the anchor ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitter: Option<String>,
    /// The deploying transaction, if deployed from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_hash: Option<String>,
    /// Its block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_number: Option<u64>,
}

/// Read `<data>/anchor/evm.json`, if there is one.
pub fn read_deployment(anchor_dir: &Path) -> Result<Option<Deployment>> {
    let p = deployment_path(anchor_dir);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| crate::error::state_err(&p, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(crate::error::state_err(&p, e)),
    }
}

fn write_deployment(anchor_dir: &Path, d: &Deployment) -> Result<()> {
    std::fs::create_dir_all(anchor_dir).map_err(|e| Error::Io {
        op: "creating",
        path: anchor_dir.to_owned(),
        source: e,
    })?;
    let mut b = serde_json::to_vec_pretty(d).map_err(rpc_err)?;
    b.push(b'\n');
    Ok(vitaltrail_log::write_atomic(anchor_dir, "evm.json", &b)?)
}

/// `vitaltrail anchor deploy`: deploy the registry with `signer`, wait
/// for `confirmations`, and write `<data>/anchor/evm.json`.
pub async fn deploy(
    rpc: &str,
    signer: PrivateKeySigner,
    confirmations: u64,
    anchor_dir: &Path,
) -> Result<Deployment> {
    let me = signer.address();
    let p = wallet_provider(rpc, signer)?;
    let chain_id = p.get_chain_id().await.map_err(rpc_err)?;
    let receipt = AnchorRegistry::deploy_builder(p.clone())
        .send()
        .await
        .map_err(rpc_err)?
        .with_required_confirmations(confirmations.max(1))
        .with_timeout(Some(Duration::from_secs(300)))
        .get_receipt()
        .await
        .map_err(rpc_err)?;
    if !receipt.status() {
        return Err(Error::Evm("the deployment reverted".into()));
    }
    let contract = receipt
        .contract_address
        .ok_or_else(|| Error::Evm("the deployment made no contract".into()))?;
    let d = Deployment {
        chain_id,
        contract: contract.to_checksum(None),
        submitter: Some(me.to_checksum(None)),
        tx_hash: Some(format!("{:#x}", receipt.transaction_hash)),
        block_number: receipt.block_number,
    };
    write_deployment(anchor_dir, &d)?;
    Ok(d)
}

/// One line of `<data>/anchor/evm.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvmLine {
    /// `submitted`, `confirmed` or `reorged`.
    pub kind: String,
    /// The epoch log size.
    pub size: u64,
    /// Its root, lowercase hex.
    pub root: String,
    /// The transaction.
    pub tx_hash: String,
    /// Its nonce (submitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<u64>,
    /// The block holding it (confirmed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_number: Option<u64>,
    /// That block's hash (confirmed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_hash: Option<String>,
    /// Gas used (confirmed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gas_used: Option<u64>,
    /// Confirmations when it was recorded (confirmed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmations: Option<u64>,
    /// The epoch log's origin, whose keccak256 is the event's stream
    /// (absent from lines written before it was recorded).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub origin: String,
    /// EIP-155 chain id.
    pub chain_id: u64,
    /// The registry.
    pub contract: String,
    /// The anchoring address.
    pub submitter: String,
    /// When it was written, Unix ms.
    pub time_ms: u64,
}

/// The anchors file of an anchor directory.
pub fn evm_path(anchor_dir: &Path) -> PathBuf {
    anchor_dir.join("evm.jsonl")
}

/// The confirmed anchors that no later line marks as reorged, oldest first.
pub fn confirmed(anchor_dir: &Path) -> Result<Vec<EvmLine>> {
    let path = evm_path(anchor_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(crate::error::state_err(&path, e)),
    };
    let complete = text.rfind('\n').map_or(0, |i| i + 1);
    let mut out: Vec<EvmLine> = Vec::new();
    for l in text[..complete].lines() {
        let Ok(l) = serde_json::from_str::<EvmLine>(l) else {
            continue;
        };
        match l.kind.as_str() {
            "confirmed" => out.push(l),
            "reorged" => out.retain(|c| c.tx_hash != l.tx_hash),
            _ => {}
        }
    }
    Ok(out)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub use crate::backend::Target;

/// The backend's loop.
pub struct EvmAnchor {
    cfg: EvmConfig,
    dir: PathBuf,
    provider: DynProvider,
    registry: AnchorRegistry::AnchorRegistryInstance<DynProvider>,
    me: Address,
    stream: B256,
    /// The epoch log's origin (`stream` is its keccak256).
    origin: String,
    chain_id: u64,
    metrics: Metrics,
    /// The epoch log's root at a size (read from the epoch log).
    root_at: Box<dyn Fn(u64) -> Result<Hash> + Send + Sync>,
}

impl std::fmt::Debug for EvmAnchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvmAnchor")
            .field("cfg", &self.cfg)
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl EvmAnchor {
    /// The backend, from its settings: the key and the contract (errors
    /// here are the operator's to fix). `origin` is the epoch log's;
    /// `root_at` reads its roots. Nothing is asked of the chain yet.
    pub fn new(
        cfg: EvmConfig,
        anchor_dir: &Path,
        origin: &str,
        metrics: Metrics,
        root_at: Box<dyn Fn(u64) -> Result<Hash> + Send + Sync>,
    ) -> Result<Self> {
        let signer = load_key(cfg.key_file.as_deref())?;
        let me = signer.address();
        let provider = wallet_provider(&cfg.rpc_url, signer)?;
        let contract = match (&cfg.contract, read_deployment(anchor_dir)?) {
            (Some(c), _) => c.clone(),
            (None, Some(d)) => d.contract,
            (None, None) => {
                return Err(Error::Setting(
                    "no registry: set anchor.evm_contract, or run `vitaltrail anchor deploy`"
                        .into(),
                ));
            }
        };
        let contract: Address = contract
            .parse()
            .map_err(|_| Error::Setting(format!("{contract:?} is not an address")))?;
        // Exported from the start (0), not first at the first error.
        metrics.anchor_errors.with_label_values(&["evm"]);
        Ok(EvmAnchor {
            registry: AnchorRegistry::new(contract, provider.clone()),
            provider,
            me,
            stream: stream_id(origin),
            origin: origin.to_owned(),
            chain_id: 0,
            dir: anchor_dir.to_owned(),
            cfg,
            metrics,
            root_at,
        })
    }

    /// Check the chain (its id, the contract's code) and write down the
    /// submitter in `<data>/anchor/evm.json`.
    async fn check_chain(&mut self) -> Result<()> {
        let chain_id = self.provider.get_chain_id().await.map_err(rpc_err)?;
        if let Some(want) = self.cfg.chain_id
            && want != chain_id
        {
            return Err(Error::Setting(format!(
                "{} is chain {chain_id}, not {want}",
                redact_url(&self.cfg.rpc_url)
            )));
        }
        let contract = *self.registry.address();
        let code = self.provider.get_code_at(contract).await.map_err(rpc_err)?;
        if code.is_empty() {
            return Err(Error::Setting(format!(
                "no contract at {contract} on chain {chain_id}"
            )));
        }
        let deployed = read_deployment(&self.dir)?;
        write_deployment(
            &self.dir,
            &Deployment {
                chain_id,
                contract: contract.to_checksum(None),
                submitter: Some(self.me.to_checksum(None)),
                tx_hash: deployed.as_ref().and_then(|d| d.tx_hash.clone()),
                block_number: deployed.as_ref().and_then(|d| d.block_number),
            },
        )?;
        self.chain_id = chain_id;
        tracing::info!(chain_id, %contract, submitter = %self.me, rpc = %redact_url(&self.cfg.rpc_url), "EVM anchoring is on");
        Ok(())
    }

    fn record(&self, line: &EvmLine) -> Result<()> {
        let path = evm_path(&self.dir);
        let mut b = serde_json::to_vec(line).map_err(rpc_err)?;
        b.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| crate::error::state_err(&path, e))?;
        f.write_all(&b)
            .and_then(|_| f.sync_data())
            .map_err(|e| crate::error::state_err(&path, e))
    }

    fn line(&self, kind: &str, size: u64, root: &Hash, tx: B256) -> EvmLine {
        EvmLine {
            kind: kind.to_owned(),
            size,
            root: root.to_hex(),
            tx_hash: format!("{tx:#x}"),
            nonce: None,
            block_number: None,
            block_hash: None,
            gas_used: None,
            confirmations: None,
            origin: self.origin.clone(),
            chain_id: self.chain_id,
            contract: self.registry.address().to_checksum(None),
            submitter: self.me.to_checksum(None),
            time_ms: now_ms(),
        }
    }

    /// The `Anchored` event of our anchor at `size`, if the chain has one:
    /// (root, tx hash, block number).
    async fn find_event(&self, size: u64) -> Result<Option<(B256, B256, u64)>> {
        Ok(anchored_events(
            &self.provider,
            *self.registry.address(),
            self.me,
            self.stream,
            size,
        )
        .await?
        .into_iter()
        .next())
    }

    /// Confirm the anchor at `size` made by `tx` in `block`: wait until it
    /// is deep enough, then record it. `None` if a reorg took it.
    async fn confirm(
        &self,
        size: u64,
        root: &Hash,
        tx: B256,
        since: Option<Instant>,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Option<EvmLine>> {
        loop {
            let Some(r) = self
                .provider
                .get_transaction_receipt(tx)
                .await
                .map_err(rpc_err)?
            else {
                return Ok(None);
            };
            if !r.status() {
                return Err(Error::Evm(format!(
                    "the anchor transaction {tx:#x} reverted"
                )));
            }
            let (Some(block), Some(hash)) = (r.block_number, r.block_hash) else {
                return Ok(None);
            };
            let head = self.provider.get_block_number().await.map_err(rpc_err)?;
            let depth = (head + 1).saturating_sub(block);
            self.metrics
                .confirmations
                .with_label_values(&["evm"])
                .set(depth as i64);
            if depth >= self.cfg.confirmations.max(1) {
                let mut l = self.line("confirmed", size, root, tx);
                l.block_number = Some(block);
                l.block_hash = Some(format!("{hash:#x}"));
                l.gas_used = Some(r.gas_used);
                l.confirmations = Some(depth);
                self.record(&l)?;
                self.metrics
                    .gas_used
                    .with_label_values(&["evm"])
                    .inc_by(r.gas_used);
                self.metrics.anchors.with_label_values(&["evm"]).inc();
                self.metrics
                    .anchored_size
                    .with_label_values(&["evm"])
                    .set(size as i64);
                if let Some(t) = since {
                    self.metrics
                        .anchor_latency
                        .with_label_values(&["evm"])
                        .observe(t.elapsed().as_secs_f64());
                }
                tracing::debug!(size, block, gas = r.gas_used, "anchored on chain");
                return Ok(Some(l));
            }
            if *shutdown.borrow() {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Is the confirmed anchor `l` still in the chain (same block)?
    async fn still_there(&self, l: &EvmLine) -> Result<bool> {
        let tx: B256 = l.tx_hash.parse().map_err(rpc_err)?;
        let r = self
            .provider
            .get_transaction_receipt(tx)
            .await
            .map_err(rpc_err)?;
        Ok(match r {
            Some(r) => r.block_hash.map(|h| format!("{h:#x}")) == l.block_hash,
            None => false,
        })
    }

    /// One pass: check the last confirmed anchor, then anchor `target` if
    /// it is newer. Returns the confirmed size.
    async fn pass(
        &self,
        target: &Target,
        last: &mut Option<EvmLine>,
        attempt: &mut u32,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<()> {
        if let Some(l) = last.clone()
            && !self.still_there(&l).await?
        {
            tracing::warn!(size = l.size, tx = %l.tx_hash, "a reorg removed the anchor; anchoring again");
            let mut r = l.clone();
            r.kind = "reorged".into();
            r.time_ms = now_ms();
            self.record(&r)?;
            *last = confirmed(&self.dir)?.pop();
        }
        let anchored = last.as_ref().map_or(0, |l| l.size);
        let (size, root, closed) = target;
        self.metrics
            .epochs_pending
            .with_label_values(&["evm"])
            .set(size.saturating_sub(anchored) as i64);
        if *size <= anchored {
            return Ok(());
        }
        tracing::debug!(size, anchored, "anchoring on chain");
        // What the chain holds already (a run before a crash, or a
        // transaction that was mined after all).
        let latest = self
            .registry
            .latestSize(self.me, self.stream)
            .call()
            .await
            .map_err(rpc_err)?;
        if latest > anchored
            && let Some((r, tx, _)) = self.find_event(latest).await?
        {
            let ours = (self.root_at)(latest)?;
            if r.0 != ours.0 {
                return Err(Error::Setting(format!(
                    "the chain holds another root for size {latest} of our stream: \
                         someone else anchors with this key; stopping the EVM backend"
                )));
            }
            if let Some(l) = self.confirm(latest, &ours, tx, None, shutdown).await? {
                *last = Some(l);
            }
            return Ok(());
        }
        if latest >= *size {
            tracing::debug!(latest, size, "the chain is past the target");
            return Ok(());
        }
        // The first nonce not mined: a transaction of ours still pending
        // with it is replaced (higher fees on a retry), never queued behind.
        let nonce = self
            .provider
            .get_transaction_count(self.me)
            .latest()
            .await
            .map_err(rpc_err)?;
        let mut call = self
            .registry
            .anchor(self.stream, *size, B256::from(root.0))
            .nonce(nonce);
        if *attempt > 0 {
            // A replacement: pay more than the one that was not mined.
            let fees = self
                .provider
                .estimate_eip1559_fees()
                .await
                .map_err(rpc_err)?;
            let bump = 1u128 << (*attempt).min(6);
            call = call
                .max_fee_per_gas(fees.max_fee_per_gas.saturating_mul(bump))
                .max_priority_fee_per_gas(
                    fees.max_priority_fee_per_gas.saturating_mul(bump).max(1),
                );
        }
        let pending = match call.send().await {
            Ok(p) => p,
            Err(e) => {
                if let Some(RegistryError::AlreadyAnchored(_)) =
                    e.as_decoded_interface_error::<RegistryError>()
                {
                    // Anchored meanwhile: the next pass reads it back.
                    return Ok(());
                }
                let text = e.to_string();
                if text.contains("underpriced") || text.contains("already known") {
                    // One of ours with this nonce is pending: pay more.
                    *attempt += 1;
                }
                return Err(rpc_err(e));
            }
        };
        let tx = *pending.tx_hash();
        let mut l = self.line("submitted", *size, root, tx);
        l.nonce = Some(nonce);
        self.record(&l)?;
        let deadline = Instant::now() + self.cfg.tx_timeout;
        while Instant::now() < deadline && !*shutdown.borrow() {
            if let Some(l) = self
                .confirm(*size, root, tx, Some(*closed), shutdown)
                .await?
            {
                *last = Some(l);
                *attempt = 0;
                return Ok(());
            }
            // Dropped from the pool (a reorg, a restarted node), or the
            // anchor before it taken by a reorg: start over at once.
            let known = self
                .provider
                .get_transaction_by_hash(tx)
                .await
                .map_err(rpc_err)?
                .is_some();
            let before_gone = match last.as_ref() {
                Some(l) => !self.still_there(l).await?,
                None => false,
            };
            if !known || before_gone {
                tracing::warn!(tx = %format!("{tx:#x}"), known, before_gone, "anchor transaction dropped or its predecessor reorged; starting over");
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        if !*shutdown.borrow() {
            tracing::warn!(tx = %format!("{tx:#x}"), nonce, "anchor transaction not mined in time; sending a replacement");
            *attempt += 1;
        }
        Ok(())
    }

    /// Run until `shutdown`, anchoring what `targets` says. A chain that
    /// is down (at the start too) is retried with backoff.
    async fn run_loop(
        mut self,
        mut targets: watch::Receiver<Option<Target>>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<()> {
        let mut backoff = Duration::from_millis(500);
        loop {
            match self.check_chain().await {
                Ok(()) => break,
                Err(e @ Error::Setting(_)) => return Err(e),
                Err(e) => {
                    self.metrics.anchor_errors.with_label_values(&["evm"]).inc();
                    tracing::warn!(error = %e, retry_in = ?backoff, "the chain is not reachable; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait_for(|s| *s) => return Ok(()),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
        let mut last = confirmed(&self.dir)?.pop();
        let mut attempt = 0u32;
        let mut backoff = Duration::from_millis(500);
        loop {
            // One anchor per `interval` at most, counted from the start of
            // a pass (a pass waits for its confirmation).
            let started = tokio::time::Instant::now();
            let target = *targets.borrow_and_update();
            if let Some(t) = target {
                match self.pass(&t, &mut last, &mut attempt, &shutdown).await {
                    Ok(()) => backoff = Duration::from_millis(500),
                    Err(e @ Error::Setting(_)) => {
                        self.metrics.anchor_errors.with_label_values(&["evm"]).inc();
                        return Err(e);
                    }
                    Err(e) => {
                        self.metrics.anchor_errors.with_label_values(&["evm"]).inc();
                        tracing::warn!(error = %e, retry_in = ?backoff, "EVM anchoring failed; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = shutdown.wait_for(|s| *s) => return Ok(()),
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        continue;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until(started + self.cfg.interval) => {}
                _ = shutdown.wait_for(|s| *s) => return Ok(()),
            }
        }
    }
}

impl crate::backend::Backend for EvmAnchor {
    fn name(&self) -> &'static str {
        "evm"
    }

    fn run(
        self: Box<Self>,
        targets: watch::Receiver<Option<Target>>,
        stop: watch::Receiver<bool>,
    ) -> crate::backend::BoxFuture<Result<()>> {
        Box::pin(self.run_loop(targets, stop))
    }

    fn essential(&self) -> bool {
        false
    }
}

/// The registry's `Anchored` events of `submitter`'s `stream` at `size`
/// that the chain holds (not removed): (root, transaction, block), oldest
/// first.
async fn anchored_events(
    p: &DynProvider,
    contract: Address,
    submitter: Address,
    stream: B256,
    size: u64,
) -> Result<Vec<(B256, B256, u64)>> {
    let filter = Filter::new()
        .address(contract)
        .event_signature(AnchorRegistry::Anchored::SIGNATURE_HASH)
        .topic1(submitter)
        .topic2(stream)
        .topic3(U256::from(size))
        .from_block(BlockNumberOrTag::Earliest)
        .to_block(BlockNumberOrTag::Latest);
    let logs = p.get_logs(&filter).await.map_err(rpc_err)?;
    Ok(logs
        .into_iter()
        .filter(|l| !l.removed)
        .filter_map(|l| {
            let (tx, block) = (l.transaction_hash?, l.block_number?);
            let ev = l.log_decode::<AnchorRegistry::Anchored>().ok()?;
            Some((ev.inner.data.root, tx, block))
        })
        .collect())
}

/// What `vitaltrail verify --rpc` found about an anchor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainCheck {
    /// The block holding the anchor.
    pub block_number: u64,
    /// Its depth now.
    pub confirmations: u64,
    /// Whether it is the stream's latest anchor (`isLatest`).
    pub latest: bool,
}

/// What a bundle claims is on chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OnChain {
    /// EIP-155 chain id.
    pub chain_id: u64,
    /// The registry (the trusted one).
    pub contract: Address,
    /// The anchoring address (the trusted one).
    pub submitter: Address,
    /// `keccak256(epoch log origin)`.
    pub stream: B256,
    /// The epoch log size.
    pub size: u64,
    /// Its root.
    pub root: B256,
    /// The transaction the bundle names.
    pub tx_hash: B256,
}

/// Ask the chain at `rpc` whether the registry holds the anchor `a` (the
/// `Anchored` event of `a.submitter`, `a.stream`, `a.size` with `a.root`,
/// in transaction `a.tx_hash`), at least `confirmations` deep.
pub async fn check_on_chain(rpc: &str, a: &OnChain, confirmations: u64) -> Result<ChainCheck> {
    let OnChain {
        chain_id,
        contract,
        submitter,
        stream,
        size,
        root,
        tx_hash,
    } = *a;
    let p = read_provider(rpc)?;
    let got = p.get_chain_id().await.map_err(rpc_err)?;
    if got != chain_id {
        return Err(Error::Evm(format!(
            "the RPC is chain {got}, the bundle says {chain_id}"
        )));
    }
    let reg = AnchorRegistry::new(contract, p.clone());
    let latest = reg
        .isLatest(submitter, stream, size, root)
        .call()
        .await
        .map_err(rpc_err)?;
    let found = anchored_events(&p, contract, submitter, stream, size)
        .await?
        .into_iter()
        .rev()
        .find(|(r, tx, _)| *r == root && *tx == tx_hash)
        .map(|(_, _, block)| block);
    let Some(block) = found else {
        return Err(Error::Evm(format!(
            "the contract holds no anchor of root {root} at size {size} by {submitter} in transaction {tx_hash}"
        )));
    };
    let head = p.get_block_number().await.map_err(rpc_err)?;
    let depth = (head + 1).saturating_sub(block);
    if depth < confirmations {
        return Err(Error::Evm(format!(
            "the anchor is {depth} blocks deep, {confirmations} are required"
        )));
    }
    Ok(ChainCheck {
        block_number: block,
        confirmations: depth,
        latest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_path_query_and_credentials() {
        assert_eq!(
            redact_url("https://mainnet.example/v3/SECRETKEY?x=1"),
            "https://mainnet.example"
        );
        assert_eq!(redact_url("http://user:pa@host:8545/k"), "http://host:8545");
        assert_eq!(redact_url("https://user:pa/ss@host"), "<url>");
        assert_eq!(redact_url("not a url"), "<url>");
        let e = "error sending request for url (http://127.0.0.1:18599/secretapikey?token=SECRETQ): boom";
        let s = scrub_urls(e);
        assert!(!s.contains("secret") && !s.contains("SECRETQ"), "{s}");
        assert_eq!(
            s,
            "error sending request for url (http://127.0.0.1:18599): boom"
        );
    }
}
