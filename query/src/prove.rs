//! Proof bundles from a data directory: from a reading, named by its
//! device and seq, to its anchor (`docs/proof-bundle.md`).
//!
//! The reading is found through each partition's seq index (read beside
//! the running attestor), not by decoding leaves. With anchoring on, the
//! bundle is v2: the partition checkpoint is the one the first epoch
//! holding the leaf took, and the anchor part leads from it to the latest
//! ledger record. A reading that no anchor covers yet gets a v2 bundle
//! whose anchor part says `pending`, with the latest checkpoint.

use std::path::{Path, PathBuf};

use vitaltrail_anchor::ledger::{LedgerLine, ledger_path};
use vitaltrail_anchor::store::EpochReader;
use vitaltrail_attestor::durable::DurableLog;
use vitaltrail_core::bundle::AnchorProof;
use vitaltrail_core::{Checkpoint, DeviceId, ProofBundle, envelope, leaf};

use crate::{Error, Result};

/// A bundle, and what it says.
#[derive(Debug, Clone)]
pub struct Proved {
    /// The bundle.
    pub bundle: ProofBundle,
    /// The partition directory the reading is in (its `log.vkey` verifies
    /// the bundle's checkpoint).
    pub partition_dir: PathBuf,
    /// The leaf index.
    pub leaf: u64,
    /// The partition log's origin.
    pub origin: String,
    /// The anchored epoch log size, when anchored.
    pub anchored_size: Option<u64>,
    /// The bundle carries an EVM receipt.
    pub on_chain: bool,
    /// EVM anchoring is on in this data directory (`anchor/evm.json`
    /// names a submitter): `prove --wait` waits for the chain.
    pub evm_on: bool,
    /// Anchoring is on in this data directory.
    pub anchoring: bool,
}

fn data_err(e: impl std::fmt::Display) -> Error {
    Error::Data(e.to_string())
}

/// The partition directories of a data directory, in partition order.
pub fn partition_dirs(data: &Path) -> Result<Vec<PathBuf>> {
    let root = data.join("partitions");
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir(&root)
        .map_err(|e| Error::Data(format!("{}: {e}", root.display())))?
        .flatten()
        .filter_map(|d| {
            let p: u32 = d.file_name().to_str()?.parse().ok()?;
            Some((p, d.path()))
        })
        .collect();
    dirs.sort();
    Ok(dirs.into_iter().map(|(_, d)| d).collect())
}

/// The ledger's last complete line, and the one anchoring exactly
/// `size` if asked (a torn last line is not a record; the verifier checks
/// the records themselves). Reads line by line.
fn ledger_scan(
    anchor_dir: &Path,
    size: Option<u64>,
) -> Result<(Option<LedgerLine>, Option<LedgerLine>)> {
    use std::io::BufRead as _;
    let path = ledger_path(anchor_dir);
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((None, None)),
        Err(e) => return Err(data_err(format!("{}: {e}", path.display()))),
    };
    let (mut last, mut exact) = (None, None);
    let mut reader = std::io::BufReader::new(file);
    let mut buf = String::new();
    loop {
        buf.clear();
        let n = reader
            .read_line(&mut buf)
            .map_err(|e| data_err(format!("{}: {e}", path.display())))?;
        if n == 0 || !buf.ends_with('\n') {
            break;
        }
        let Ok(l) = serde_json::from_str::<LedgerLine>(buf.trim_end()) else {
            continue;
        };
        if Some(l.size) == size {
            exact = Some(l.clone());
        }
        last = Some(l);
    }
    Ok((last, exact))
}

/// Find `device`'s reading `seq` and prove it as far as it has got.
pub fn prove(data: &Path, device: &DeviceId, seq: u64) -> Result<Proved> {
    let did = device.as_str();
    for dir in partition_dirs(data)? {
        let Some(i) = vitaltrail_attestor::index::lookup(&dir, did, seq).map_err(data_err)? else {
            continue;
        };
        let log = DurableLog::open_read_only(&dir).map_err(data_err)?;
        let bytes = log.leaf(i).map_err(data_err)?;
        let l = leaf::decode(&bytes).map_err(data_err)?;
        let r = envelope::decode_verified_upstream(l.envelope).map_err(data_err)?;
        if r.did != *device || r.seq != seq {
            return Err(Error::Data(format!(
                "the index of {} names leaf {i} for seq {seq} of {did}, which holds another reading",
                dir.display()
            )));
        }
        let latest = log
            .latest_checkpoint()
            .map_err(data_err)?
            .ok_or_else(|| Error::NotYet("the partition has no checkpoint yet".into()))?;
        let cp = Checkpoint::parse_unverified(&latest).map_err(data_err)?;
        if i >= cp.size {
            return Err(Error::NotYet(format!(
                "the reading is logged (leaf {i}) but no checkpoint covers it yet"
            )));
        }
        let anchor_dir = data.join("anchor");
        let plain = |note: &str, size: u64| -> Result<ProofBundle> {
            let proof = log.prove_inclusion(size, i).map_err(data_err)?;
            Ok(ProofBundle::new(l.envelope, l.log_time_ms, i, &proof, note))
        };
        let mut proved = Proved {
            bundle: plain(&latest, cp.size)?,
            partition_dir: dir.clone(),
            leaf: i,
            origin: cp.origin.clone(),
            anchored_size: None,
            on_chain: false,
            evm_on: false,
            anchoring: anchor_dir.join("state.redb").exists(),
        };
        if !proved.anchoring {
            return Ok(proved);
        }
        let reader = EpochReader::open(&anchor_dir).map_err(data_err)?;
        let deployment = vitaltrail_anchor::evm::read_deployment(&anchor_dir).map_err(data_err)?;
        proved.evm_on = deployment.is_some_and(|d| d.submitter.is_some());
        let Some(f) = reader.find(&cp.origin, i).map_err(data_err)? else {
            proved.bundle = proved.bundle.with_anchor(AnchorProof::pending());
            return Ok(proved);
        };
        // The chain's latest confirmed anchor if it covers the epoch, else
        // the ledger's latest; with the ledger's record of that same size.
        let chain = vitaltrail_anchor::evm::confirmed(&anchor_dir)
            .map_err(data_err)?
            .pop()
            .filter(|l| l.size > f.epoch);
        let (last, exact) = ledger_scan(&anchor_dir, chain.as_ref().map(|c| c.size))?;
        let (size, record) = match (&chain, last) {
            (Some(c), _) => (c.size, exact),
            (None, Some(l)) if l.size > f.epoch => (l.size, Some(l)),
            _ => {
                proved.bundle = proved.bundle.with_anchor(AnchorProof::pending());
                return Ok(proved);
            }
        };
        let record = record.map(|l| l.record);
        let record = record.as_deref();
        let evm = chain.map(|c| vitaltrail_core::bundle::EvmReceipt {
            chain_id: c.chain_id,
            contract: c.contract,
            submitter: c.submitter,
            tx_hash: c.tx_hash,
            block_number: c.block_number.unwrap_or_default(),
        });
        proved.on_chain = evm.is_some();
        let epoch_note = reader
            .epoch_checkpoint(size)
            .map_err(data_err)?
            .ok_or_else(|| Error::Data(format!("no epoch checkpoint at size {size}")))?;
        let epoch_proof = reader
            .log()
            .prove_inclusion(size, f.epoch)
            .map_err(data_err)?;
        proved.bundle = plain(&f.note, f.head.size)?.with_anchor(AnchorProof::anchored(
            &f.record,
            f.head_index,
            &f.head_proof,
            &epoch_note,
            &epoch_proof,
            record,
            evm,
        ));
        proved.anchored_size = Some(size);
        return Ok(proved);
    }
    Err(Error::NotFound(format!(
        "no logged and checkpointed reading with seq {seq} from {did}"
    )))
}
