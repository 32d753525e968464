//! Anchoring on a real EVM chain: Anvil (npm `@foundry-rs/anvil-linux-amd64`,
//! 1 s blocks) started on 127.0.0.1 by the test, the registry deployed by
//! `vitaltrail anchor deploy`, a running `up` anchoring to it, bundles
//! verified through `--rpc`, the anchors checked with `cast` as an
//! independent client, a chain outage and a reorg in the middle of a run,
//! and tampered bundles refused.

use crate::common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ANVIL_ADDRESS, ANVIL_KEY, Anvil};
use vitaltrail_core::SystemClock;
use vitaltrail_device_sim::physiology::Scenario;
use vitaltrail_device_sim::publisher::{self, SimConfig};

fn vt_env(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vitaltrail"))
        .args(args)
        .env("VITALTRAIL_EVM_KEY", ANVIL_KEY)
        .output()
        .unwrap()
}

/// The confirmed (and not reorged) chain anchors of a data directory.
fn confirmed(data: &std::path::Path) -> Vec<vitaltrail_anchor::evm::EvmLine> {
    vitaltrail_anchor::evm::confirmed(&data.join("anchor")).unwrap()
}

/// Wait for `f`; on a timeout, fail with the anchor's files and log.
async fn wait_for(
    data: &std::path::Path,
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() >= deadline {
            let tail = |p: std::path::PathBuf| {
                let t = std::fs::read_to_string(p).unwrap_or_default();
                let lines: Vec<&str> = t.lines().collect();
                lines[lines.len().saturating_sub(4)..].join("\n")
            };
            panic!(
                "{what} within {timeout:?}\nevm.jsonl: {}\nup.log: {}",
                tail(vitaltrail_anchor::evm::evm_path(&data.join("anchor"))),
                std::fs::read_to_string(data.join("up.log"))
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains("vitaltrail_anchor"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anchors_on_anvil_through_an_outage_and_a_reorg() {
    let mut anvil = Anvil::start();
    let data = tempfile::tempdir().unwrap();
    let d = data.path().display().to_string();
    let o = vt_env(&["anchor", "deploy", "--rpc", &anvil.url(), "--data", &d]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let contract = String::from_utf8(o.stdout).unwrap().trim().to_owned();
    assert!(
        anvil.cast(&["code", &contract]).len() > 10,
        "no code at {contract}"
    );
    let mut devs = publisher::devices(900, 4, &[Scenario::Steady]);
    let reg = vitaltrail_bus::datadir::registry_file(data.path());
    for (i, dv) in devs.iter().enumerate() {
        reg.add(dv.key.did(), &format!("patient-{i}"), None, 0)
            .unwrap();
    }
    let mqtt = common::free_addr();
    let args: Vec<String> = [
        "up",
        "--data",
        &d,
        "--mqtt-listen",
        &mqtt.to_string(),
        "--metrics-listen",
        &common::free_addr().to_string(),
        "--checkpoint-interval-ms",
        "250",
        "--epoch-interval-ms",
        "250",
        "--evm-rpc",
        &anvil.url(),
        "--evm-interval-ms",
        "500",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // The key of Anvil's test account, in the child's environment only.
    let mut up = common::Proc::spawn_env(
        &args,
        data.path().join("up.log"),
        &[
            ("VITALTRAIL_EVM_KEY", ANVIL_KEY),
            ("RUST_LOG", "warn,vitaltrail_anchor::evm=debug"),
        ],
    );
    common::wait_port(mqtt.port());
    let sim = SimConfig {
        mqtt: vitaltrail_mqtt::MqttEndpoint::plain("127.0.0.1", mqtt.port()),
        device_tls: common::device_tls(data.path()),
        client_id: "sim-anvil".into(),
        rate: 10.0,
        duration: Duration::from_secs(14),
        ..SimConfig::default()
    };
    let sim_task = tokio::spawn(async move {
        let r = publisher::run(&sim, &mut devs, Arc::new(SystemClock)).await;
        (r, devs)
    });
    // Anchors arrive.
    wait_for(
        data.path(),
        "a first chain anchor",
        Duration::from_secs(20),
        || !confirmed(data.path()).is_empty(),
    )
    .await;
    // The chain goes down for 4 s while readings keep coming; nothing is
    // skipped: the epoch log grows, and the next anchor covers it all.
    let before_outage = confirmed(data.path()).last().unwrap().size;
    anvil.stop();
    tokio::time::sleep(Duration::from_secs(4)).await;
    up.assert_running();
    anvil.start_again();
    wait_for(
        data.path(),
        "an anchor after the outage",
        Duration::from_secs(30),
        || {
            confirmed(data.path())
                .last()
                .is_some_and(|l| l.size > before_outage)
        },
    )
    .await;
    // A reorg takes the latest anchor away (snapshot, anchor, revert):
    // the backend notices and anchors again.
    let snap = anvil.cast(&["rpc", "evm_snapshot"]);
    let snap = snap.trim_matches('"').to_owned();
    let at_snap = confirmed(data.path()).last().unwrap().size;
    wait_for(
        data.path(),
        "an anchor after the snapshot",
        Duration::from_secs(20),
        || {
            confirmed(data.path())
                .last()
                .is_some_and(|l| l.size > at_snap)
        },
    )
    .await;
    let lost = confirmed(data.path()).last().unwrap().clone();
    assert_eq!(anvil.cast(&["rpc", "evm_revert", &snap]), "true");
    wait_for(
        data.path(),
        "the reorged anchor to be noticed",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(vitaltrail_anchor::evm::evm_path(
                &data.path().join("anchor"),
            ))
            .unwrap()
            .contains(&format!("\"kind\":\"reorged\",\"size\":{}", lost.size))
        },
    )
    .await;
    let (report, _devs) = sim_task.await.unwrap();
    let report = report.unwrap();
    common::wait_anchored(data.path(), Duration::from_secs(30)).await;
    let epochs = vitaltrail_anchor::store::EpochReader::open(&data.path().join("anchor"))
        .unwrap()
        .log()
        .size();
    wait_for(
        data.path(),
        &format!("the chain to anchor every epoch ({epochs})"),
        Duration::from_secs(30),
        || {
            confirmed(data.path())
                .last()
                .is_some_and(|l| l.size >= epochs)
        },
    )
    .await;

    // Every confirmed anchor is on chain, checked with cast alone: the
    // latest by `isLatest`, each by its `Anchored` event; sizes grow, and
    // no size is anchored twice.
    let stream = anvil.cast(&["keccak", "vitaltrail.local/epochs"]);
    let all = confirmed(data.path());
    assert!(all.windows(2).all(|w| w[0].size < w[1].size), "{all:?}");
    let last = all.last().unwrap();
    assert_eq!(
        anvil.cast(&[
            "call",
            &contract,
            "isLatest(address,bytes32,uint64,bytes32)(bool)",
            ANVIL_ADDRESS,
            &stream,
            &last.size.to_string(),
            &format!("0x{}", last.root),
        ]),
        "true"
    );
    assert_eq!(
        anvil.cast(&[
            "call",
            &contract,
            "latestSize(address,bytes32)(uint64)",
            ANVIL_ADDRESS,
            &stream
        ]),
        last.size.to_string()
    );
    let logs = anvil.cast(&[
        "logs",
        "--json",
        "--from-block",
        "earliest",
        "--address",
        &contract,
        "Anchored(address indexed,bytes32 indexed,uint64 indexed,bytes32)",
    ]);
    let logs: Vec<serde_json::Value> = serde_json::from_str(&logs).unwrap();
    let mut sizes: Vec<u64> = logs
        .iter()
        .map(|l| {
            u64::from_str_radix(
                l["topics"][3].as_str().unwrap().trim_start_matches("0x"),
                16,
            )
            .unwrap()
        })
        .collect();
    let n = sizes.len();
    sizes.dedup();
    assert_eq!(sizes.len(), n, "a size was anchored twice: {sizes:?}");
    for a in &all {
        assert!(
            sizes.contains(&a.size),
            "anchor at {} is not on chain",
            a.size
        );
        let data_hex = logs
            .iter()
            .find(|l| {
                u64::from_str_radix(
                    l["topics"][3].as_str().unwrap().trim_start_matches("0x"),
                    16,
                )
                .unwrap()
                    == a.size
            })
            .unwrap()["data"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(data_hex, format!("0x{}", a.root));
    }

    // A bundle from the beginning of the run verifies through --rpc, and
    // `verify` fails once any part of it is changed.
    let did = vitaltrail_bus::datadir::registry_file(data.path())
        .load()
        .unwrap()
        .devices()
        .next()
        .unwrap()
        .did
        .clone();
    let bundle = data.path().join("b.json");
    let o = vt_env(&[
        "prove",
        "--data",
        &d,
        "--device",
        &did,
        "--seq",
        "2",
        "--wait",
        "--out",
        &bundle.display().to_string(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rpc = anvil.url();
    let verify = |path: &std::path::Path| {
        vt_env(&[
            "verify",
            &path.display().to_string(),
            "--data",
            &d,
            "--rpc",
            &rpc,
        ])
    };
    let o = verify(&bundle);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for check in [
        "ok   evm_receipt",
        "ok   chain",
        "ok   ledger_signature",
        "ok   epoch_inclusion",
    ] {
        assert!(out.contains(check), "{out}");
    }
    let text = std::fs::read_to_string(&bundle).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let tampered = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut t = v.clone();
        f(&mut t);
        let p = data.path().join("t.json");
        std::fs::write(&p, t.to_string()).unwrap();
        verify(&p)
    };
    let flip_hash = |s: &str| {
        let mut b = s.as_bytes().to_vec();
        b[3] = if b[3] == b'A' { b'B' } else { b'A' };
        String::from_utf8(b).unwrap()
    };
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "leaf index",
            Box::new(|t| t["leaf_index"] = (t["leaf_index"].as_u64().unwrap() + 1).into()),
        ),
        (
            "head proof",
            Box::new(move |t| {
                let h = t["anchor"]["head_proof"][0].as_str().map(flip_hash);
                if let Some(h) = h {
                    t["anchor"]["head_proof"][0] = h.into();
                } else {
                    t["anchor"]["head_index"] = 7.into();
                }
            }),
        ),
        (
            "epoch proof",
            Box::new(move |t| {
                let h = t["anchor"]["epoch_proof"][0].as_str().map(flip_hash);
                if let Some(h) = h {
                    t["anchor"]["epoch_proof"][0] = h.into();
                } else {
                    t["anchor"]["epoch_record"] = "AAAA".into();
                }
            }),
        ),
        (
            "epoch record",
            Box::new(|t| {
                // A character in the middle (the heads root): always a
                // different record.
                let mut r = t["anchor"]["epoch_record"]
                    .as_str()
                    .unwrap()
                    .as_bytes()
                    .to_vec();
                r[40] = if r[40] == b'A' { b'B' } else { b'A' };
                t["anchor"]["epoch_record"] = String::from_utf8(r).unwrap().into();
            }),
        ),
        (
            "epoch checkpoint",
            Box::new(|t| {
                let c = t["anchor"]["epoch_checkpoint"].as_str().unwrap().replacen(
                    "epochs\n",
                    "epochs\n1",
                    1,
                );
                t["anchor"]["epoch_checkpoint"] = c.into();
            }),
        ),
        (
            "ledger record",
            Box::new(|t| {
                let c = t["anchor"]["ledger_record"]
                    .as_str()
                    .unwrap()
                    .replacen("\n\n", "\n1\n\n", 1);
                t["anchor"]["ledger_record"] = c.into();
            }),
        ),
        (
            "evm submitter",
            Box::new(|t| {
                t["anchor"]["evm"]["submitter"] =
                    "0x70997970C51812dc3A010C7d01b50e0d17dc79C8".into()
            }),
        ),
        (
            "evm contract",
            Box::new(|t| {
                t["anchor"]["evm"]["contract"] = "0x0000000000000000000000000000000000000001".into()
            }),
        ),
        (
            "evm chain",
            Box::new(|t| t["anchor"]["evm"]["chain_id"] = 1.into()),
        ),
        (
            "evm transaction",
            Box::new(|t| t["anchor"]["evm"]["tx_hash"] = format!("0x{}", "ab".repeat(32)).into()),
        ),
        // `null` is a member of the wrong type, not an absent one (#19).
        (
            "null ledger record",
            Box::new(|t| t["anchor"]["ledger_record"] = serde_json::Value::Null),
        ),
        (
            "null evm receipt",
            Box::new(|t| t["anchor"]["evm"] = serde_json::Value::Null),
        ),
    ];
    for (what, f) in cases {
        let o = tampered(&*f);
        assert!(
            !o.status.success(),
            "a bundle with a changed {what} verified: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
    let pid = up.child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(up.child.wait().unwrap().success());
    // `up` may stop with its last anchor sent but not yet mined (1 s
    // blocks): mine it now, so the chain no longer changes under the
    // assertions below.
    anvil.cast(&["rpc", "evm_mine", "--rpc-url", &anvil.url()]);
    common::check_tables(data.path(), &report).await;
    common::check_anchoring(data.path(), 10);

    // In the `anchors` table, `stream` is the epoch log's origin on every
    // row, and `target` says where it was anchored (#19).
    let o = vt_env(&[
        "query",
        "--data",
        &d,
        "--format",
        "csv",
        "SELECT DISTINCT backend, stream, target FROM anchors ORDER BY backend",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let chain_id = anvil.cast(&["chain-id", "--rpc-url", &anvil.url()]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!(
            "backend,stream,target\nevm,vitaltrail.local/epochs,evm:{chain_id}:{}\nledger,vitaltrail.local/epochs,ledger\n",
            contract.to_ascii_lowercase()
        )
    );

    // docs/anchoring.md §6.1's cast commands run as written (one failed
    // in cast 1.7: #19), against the latest confirmed anchor.
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/anchoring.md"))
        .unwrap();
    let at = doc.find("With cast").expect("the cast section");
    let start = doc[at..].find("```sh\n").unwrap() + at + "```sh\n".len();
    let end = doc[start..].find("```").unwrap() + start;
    let script = &doc[start..end];
    let last = confirmed(data.path()).last().unwrap().clone();
    let cast = common::npm_tool("cast-linux-amd64", "cast");
    let path = format!(
        "{}:{}",
        cast.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let o = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .env("PATH", path)
        .env("RPC", anvil.url())
        .env("CONTRACT", &contract)
        .env("SUBMITTER", ANVIL_ADDRESS)
        .env("ORIGIN", "vitaltrail.local/epochs")
        .env("N", last.size.to_string())
        .env("R", format!("0x{}", last.root))
        .env("TX", &last.tx_hash)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "the documented cast commands failed: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[1], chain_id, "{out}");
    assert!(
        out.to_ascii_lowercase()
            .contains(&last.tx_hash.to_ascii_lowercase()),
        "the Anchored log of size {} is not listed: {out}",
        last.size
    );
    // The informative lines: the anchor may have submitted a later root
    // that it had not yet recorded as confirmed when `up` stopped (mined
    // above), so the contract's latest size is at least N, and `isLatest`
    // is true exactly when it is N (CI once saw latestSize 52 for a last
    // confirmed 51).
    let latest: u64 = lines[lines.len() - 2].parse().expect("latestSize");
    assert!(latest >= last.size, "{out}");
    assert_eq!(
        lines.last().copied(),
        Some(if latest == last.size { "true" } else { "false" }),
        "{out}"
    );
    // The root the anchor submitted at that latest size is the latest.
    let text = std::fs::read_to_string(vitaltrail_anchor::evm::evm_path(
        &data.path().join("anchor"),
    ))
    .unwrap();
    let root = text
        .lines()
        .filter_map(|l| serde_json::from_str::<vitaltrail_anchor::evm::EvmLine>(l).ok())
        .find(|l| l.size == latest)
        .unwrap_or_else(|| panic!("no evm.jsonl line at the latest size {latest}"))
        .root;
    let stream = anvil.cast(&["keccak", "vitaltrail.local/epochs"]);
    let is_latest = anvil.cast(&[
        "call",
        "--rpc-url",
        &anvil.url(),
        &contract,
        "isLatest(address,bytes32,uint64,bytes32)(bool)",
        ANVIL_ADDRESS,
        &stream,
        &latest.to_string(),
        &format!("0x{root}"),
    ]);
    assert_eq!(is_latest, "true", "{out}");
}
