//! The subcommands of issue #3: keys, single readings, the standalone log,
//! and offline bundle verification.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use vitaltrail_attestor::DurableLog;
use vitaltrail_core::{
    Checkpoint, Clock, DeviceId, LogPublicKey, LogSigner, ProofBundle, SecretKey, SystemClock,
    UnsignedReading, envelope, leaf, merkle,
};

/// Read a file, or stdin for `-`/`None`.
pub fn read_input(path: Option<&Path>) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    match path {
        None => {
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading stdin")?;
        }
        Some(p) if p == Path::new("-") => {
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading stdin")?;
        }
        Some(p) => buf = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
    }
    Ok(buf)
}

/// Write bytes to a file, or stdout.
pub(crate) fn write_output(path: Option<&Path>, bytes: &[u8]) -> Result<()> {
    match path {
        Some(p) => std::fs::write(p, bytes).with_context(|| format!("writing {}", p.display())),
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(bytes).map_err(crate::out::stdout_error)?;
            out.flush().map_err(crate::out::stdout_error)
        }
    }
}

/// Load a PKCS#8 PEM key file.
pub fn load_key(path: &Path) -> Result<SecretKey> {
    let pem =
        std::fs::read_to_string(path).with_context(|| format!("reading key {}", path.display()))?;
    SecretKey::from_pkcs8_pem(&pem).with_context(|| format!("key {}", path.display()))
}

pub use vitaltrail_bus::datadir::write_key;

pub fn keys_new(out: &Path) -> Result<ExitCode> {
    let key = SecretKey::generate(&mut rand::rngs::OsRng);
    write_key(out, &key)?;
    outln!("{}", key.did());
    Ok(ExitCode::SUCCESS)
}

pub fn keys_show(path: &Path, log_name: Option<&str>) -> Result<ExitCode> {
    let key = load_key(path)?;
    outln!("{}", key.did());
    if let Some(name) = log_name {
        outln!("{}", LogSigner::new(name, key)?.public_key());
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SignInput {
    seq: u64,
    time: Option<u64>,
    measurements: Vec<envelope::Measurement>,
    #[serde(default)]
    meta: Option<serde_json::Map<String, serde_json::Value>>,
}

pub fn reading_sign(key: &Path, out: Option<&Path>) -> Result<ExitCode> {
    let key = load_key(key)?;
    let input = read_input(None)?;
    let input: SignInput = serde_json::from_slice(&input).context("reading JSON on stdin")?;
    let reading = UnsignedReading {
        seq: input.seq,
        time: input.time.unwrap_or_else(|| SystemClock.now_ms()),
        measurements: input.measurements,
        meta: input.meta,
    };
    let bytes = envelope::sign(&key, &reading)?;
    if out.is_none() && std::io::stdout().is_terminal() {
        bail!("refusing to write binary COSE to a terminal; use --out FILE or a pipe");
    }
    write_output(out, &bytes)?;
    Ok(ExitCode::SUCCESS)
}

pub fn reading_verify(file: Option<&Path>) -> Result<ExitCode> {
    let bytes = read_input(file)?;
    match envelope::verify(&bytes) {
        Ok(r) => {
            outln!("{}", serde_json::to_string_pretty(&r)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => bail!("envelope rejected ({}): {e}", e.code()),
    }
}

pub fn log_append(dir: &Path, files: &[PathBuf]) -> Result<ExitCode> {
    let mut envs = Vec::with_capacity(files.len());
    for f in files {
        envs.push(std::fs::read(f).with_context(|| format!("reading {}", f.display()))?);
    }
    let verdicts = envelope::verify_batch(&envs);
    let mut failed = 0;
    for (f, v) in files.iter().zip(&verdicts) {
        if let Err(e) = v {
            eprintln!("{}: rejected ({}): {e}", f.display(), e.code());
            failed += 1;
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {} envelopes rejected; nothing was appended",
            files.len()
        );
    }
    let now = SystemClock.now_ms();
    let leaves: Vec<Vec<u8>> = envs.iter().map(|e| leaf::encode(now, e)).collect();
    let mut log = DurableLog::open(dir)?;
    let a = log.append_batch(&leaves)?;
    outln!(
        "appended {} readings at indexes {}..{}; tree size {}, root {}",
        leaves.len(),
        a.first_index,
        a.size - 1,
        a.size,
        a.root
    );
    Ok(ExitCode::SUCCESS)
}

pub fn log_checkpoint(dir: &Path, key: &Path, origin: &str) -> Result<ExitCode> {
    let signer = LogSigner::new(origin, load_key(key)?)?;
    let log = DurableLog::open(dir)?;
    // A new checkpoint must extend the previous one: check it before signing.
    if let Some(prev) = log.latest_checkpoint()? {
        let prev = Checkpoint::open(&prev, &signer.public_key())
            .context("the stored checkpoint does not verify with this key")?;
        let proof = log.prove_consistency(prev.size, log.size())?;
        merkle::verify_consistency(prev.size, log.size(), &prev.root, &log.root(), &proof)
            .context("the log is not consistent with its previous checkpoint")?;
    }
    let cp = Checkpoint {
        origin: origin.to_owned(),
        size: log.size(),
        root: log.root(),
        extensions: vec![],
    };
    let note = cp.sign(&signer)?;
    log.store_checkpoint(&note)?;
    vitaltrail_attestor::durable::write_atomic(
        dir,
        "log.vkey",
        format!("{}\n", signer.public_key()).as_bytes(),
    )?;
    out!("{note}");
    Ok(ExitCode::SUCCESS)
}

pub fn log_prove(dir: &Path, index: u64, out: Option<&Path>) -> Result<ExitCode> {
    let log = DurableLog::open(dir)?;
    let note = log
        .latest_checkpoint()?
        .context("the log has no checkpoint yet; run `vitaltrail log checkpoint` first")?;
    let cp = Checkpoint::parse_unverified(&note)?;
    if index >= cp.size {
        bail!(
            "leaf {index} is not covered by the latest checkpoint (size {}); run `vitaltrail log checkpoint`",
            cp.size
        );
    }
    let leaf_bytes = log.leaf(index)?;
    let l = leaf::decode(&leaf_bytes)?;
    let proof = log.prove_inclusion(cp.size, index)?;
    let bundle = ProofBundle::new(l.envelope, l.log_time_ms, index, &proof, &note);
    write_output(out, format!("{}\n", bundle.to_json()).as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

/// Accept a verifier key string or a file holding one.
pub fn parse_log_key(arg: &str) -> Result<LogPublicKey> {
    if arg.contains('+') && !Path::new(arg).exists() {
        return Ok(LogPublicKey::parse(arg)?);
    }
    let text = std::fs::read_to_string(arg)
        .with_context(|| format!("{arg:?} is neither a verifier key nor a readable file"))?;
    Ok(LogPublicKey::parse(&text)?)
}

/// What `vitaltrail verify` trusts, besides the bundle.
#[derive(Debug, Clone, Copy)]
pub struct VerifyKeys<'a> {
    /// The partition log's verifier key (or a file), else the data dir's.
    pub log_key: Option<&'a str>,
    /// The anchor's verifier key (or a file), else the data dir's.
    pub anchor_key: Option<&'a str>,
    /// An EVM JSON-RPC URL to ask about the EVM receipt.
    pub rpc: Option<&'a str>,
    /// Blocks deep the chain anchor must be.
    pub confirmations: u64,
    /// The registry the anchor must be in (else `<data>/anchor/evm.json`).
    pub evm_contract: Option<&'a str>,
    /// Who must have anchored it (else `<data>/anchor/evm.json`).
    pub evm_submitter: Option<&'a str>,
}

/// The chain check of `verify --rpc`: the registry and submitter are the
/// pinned ones, never the bundle's word, and the chain holds the epoch
/// checkpoint's root at its size, deep enough.
fn chain_check(
    report: &vitaltrail_core::bundle::Report,
    keys: &VerifyKeys<'_>,
    rpc: &str,
    data: &Path,
) -> std::result::Result<String, String> {
    let evm = report
        .evm
        .as_ref()
        .ok_or("the bundle carries no EVM receipt")?;
    let ecp = report
        .epoch_checkpoint
        .as_ref()
        .ok_or("needs a valid epoch checkpoint")?;
    let deployed = vitaltrail_anchor::evm::read_deployment(&data.join("anchor"))
        .ok()
        .flatten();
    let contract = keys
        .evm_contract
        .map(str::to_owned)
        .or_else(|| deployed.as_ref().map(|d| d.contract.clone()))
        .ok_or("no registry to trust: pass --evm-contract")?;
    let submitter = keys
        .evm_submitter
        .map(str::to_owned)
        .or_else(|| deployed.as_ref().and_then(|d| d.submitter.clone()))
        .ok_or("no submitter to trust: pass --evm-submitter")?;
    let parse = |s: &str| {
        s.parse::<vitaltrail_anchor::evm::Address>()
            .map_err(|_| format!("{s:?} is not an address"))
    };
    let (contract, submitter) = (parse(&contract)?, parse(&submitter)?);
    if let Some(d) = &deployed
        && keys.evm_contract.is_none()
        && d.chain_id != evm.chain_id
    {
        return Err(format!(
            "the bundle names chain {}, the trusted registry is on chain {}",
            evm.chain_id, d.chain_id
        ));
    }
    if parse(&evm.contract)? != contract || parse(&evm.submitter)? != submitter {
        return Err(format!(
            "the bundle names registry {} and submitter {}, not the trusted {contract} and {submitter}",
            evm.contract, evm.submitter
        ));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let c = rt
        .block_on(vitaltrail_anchor::evm::check_on_chain(
            rpc,
            &vitaltrail_anchor::evm::OnChain {
                chain_id: evm.chain_id,
                contract,
                submitter,
                stream: vitaltrail_anchor::evm::stream_id(&ecp.origin),
                size: ecp.size,
                root: vitaltrail_anchor::evm::B256::from(ecp.root.0),
                tx_hash: evm
                    .tx_hash
                    .parse()
                    .map_err(|_| format!("{:?} is not a transaction hash", evm.tx_hash))?,
            },
            keys.confirmations,
        ))
        .map_err(|e| e.to_string())?;
    Ok(format!(
        "chain {} holds root {} at size {} in block {} ({} confirmations{})",
        evm.chain_id,
        ecp.root,
        ecp.size,
        c.block_number,
        c.confirmations,
        if c.latest { ", the latest anchor" } else { "" }
    ))
}

/// `vitaltrail verify`: exit 0 when every check passes, 2 when every
/// check but `anchor` passes and the anchor is pending, 1 otherwise.
pub fn verify(
    bundle: &Path,
    keys: &VerifyKeys<'_>,
    data: &Path,
    device: Option<&str>,
) -> Result<ExitCode> {
    let (log_key, anchor_key) = (keys.log_key, keys.anchor_key);
    let device = device
        .map(DeviceId::parse)
        .transpose()
        .context("--device")?;
    let bytes = read_input(Some(bundle))?;
    let bundle = ProofBundle::from_json(&bytes)?;
    let key = match log_key {
        Some(k) => parse_log_key(k)?,
        None => parse_log_key(&crate::pipeline_cmds::log_key_for(data, &bundle)?)?,
    };
    let anchor = if bundle.format == vitaltrail_core::bundle::FORMAT_V2 {
        match crate::pipeline_cmds::anchor_key_for(data, anchor_key) {
            Ok(k) => Some(k),
            // The anchor checks then fail, saying why.
            Err(e) => {
                eprintln!("warning: {e:#}");
                None
            }
        }
    } else {
        None
    };
    let mut report = bundle.verify_anchored(&key, anchor.as_ref(), device.as_ref());
    let mut chain_note = None;
    // Check 12 (`chain`) is not run for a pending bundle, as checks 7-10
    // are not: it is valid up to its checkpoint (exit 2) with or without
    // --rpc. A v1 bundle names no anchor, so it fails the check.
    let pending = bundle
        .anchor_proof()
        .is_some_and(|a| a.status == vitaltrail_core::bundle::PENDING);
    if pending && keys.rpc.is_some() {
        eprintln!("chain not asked: the bundle is pending (no anchor to look for)");
    }
    if let Some(rpc) = keys.rpc.filter(|_| !pending) {
        let r = chain_check(&report, keys, rpc, data);
        chain_note = r.as_ref().ok().cloned();
        report.add("chain", r.map(|_| ()));
    }
    // The exit code is the verdict: a reader of stdout that has gone
    // (`verify b.json | head -n 1`) stops the printing, never the verdict.
    let code = if report.ok() {
        ExitCode::SUCCESS
    } else if report.ok_but_pending() {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    };
    match print_verdict(&report, &bundle, chain_note.as_deref()) {
        Err(e) if !crate::out::is_stdout_closed(&e) => return Err(e),
        _ => {}
    }
    if report.ok_but_pending() {
        eprintln!("not anchored yet: valid up to the signed checkpoint (vitaltrail prove --wait)");
    } else if !report.ok() {
        let (name, why) = report.first_failure().unwrap_or(("verify", "failed"));
        eprintln!("error: verification failed at {name}: {why}");
    }
    Ok(code)
}

/// What `verify` prints on stdout: every check by name, then what the
/// bundle proves.
fn print_verdict(
    report: &vitaltrail_core::bundle::Report,
    bundle: &ProofBundle,
    chain_note: Option<&str>,
) -> Result<()> {
    for (name, r) in &report.checks {
        match r {
            Ok(()) => outln!("ok   {name}"),
            Err(e) => outln!("FAIL {name}: {e}"),
        }
    }
    if let (Some(r), Some(cp)) = (&report.reading, &report.checkpoint)
        && (report.ok() || report.ok_but_pending())
    {
        outln!(
            "verified: reading seq {} from {} is leaf {} of {} (tree size {})",
            r.seq,
            r.did,
            bundle.leaf_index,
            cp.origin,
            cp.size
        );
    }
    if report.ok() {
        if let Some(e) = &report.epoch_checkpoint {
            outln!(
                "anchored: in epoch log {} at size {}{}",
                e.origin,
                e.size,
                match &report.ledger {
                    Some(l) => format!(", ledger record {} (local ledger)", l.seq),
                    None => String::new(),
                }
            );
        }
        if let Some(n) = chain_note {
            outln!("on chain: {n}");
        } else if let Some(e) = &report.evm {
            outln!(
                "claims an anchor on chain {} (tx {}, block {}): not checked; pass --rpc",
                e.chain_id,
                e.tx_hash,
                e.block_number
            );
        }
    }
    Ok(())
}

/// `vitaltrail news2`: score and print JSON.
pub fn news2(o: &vitaltrail_core::news2::Observations) -> Result<ExitCode> {
    let score = vitaltrail_core::news2::score(o)?;
    outln!("{}", serde_json::to_string(&score)?);
    Ok(ExitCode::SUCCESS)
}
