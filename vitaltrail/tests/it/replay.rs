//! Real-data replay through the whole embedded pipeline, driven as a user
//! would from the README: `vitaltrail up`, then `vitaltrail sim
//! --replay-ecg` (MIT-BIH record 208) and `--replay-rr`, then `query`,
//! `prove` and `verify`.

use crate::common;

use common::vt;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn ecg_dat() -> PathBuf {
    let p = vitaltrail_device_sim::ecg::default_ecg_path();
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup (it extracts scipy/misc/ecg.dat from Debian's \
         python3-scipy), or point VITALTRAIL_ECG_DAT at the file",
        p.display()
    );
    p
}

/// Rows of a `query --format json` answer.
fn rows(data: &Path, sql: &str) -> Vec<serde_json::Value> {
    let out = vt(&[
        "query",
        sql,
        "--data",
        data.to_str().unwrap(),
        "--format",
        "json",
    ]);
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .flat_map(
            |l| match serde_json::from_str::<serde_json::Value>(l).unwrap() {
                serde_json::Value::Array(a) => a,
                v => vec![v],
            },
        )
        .collect()
}

fn wait_rows(data: &Path, did: &str, want: u64) {
    let sql = format!("SELECT count(*) AS n FROM readings WHERE device = '{did}'");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = rows(data, &sql)
            .first()
            .and_then(|r| r["n"].as_u64())
            .unwrap_or(0);
        if n == want {
            return;
        }
        assert!(n < want, "{n} rows for {did}, {want} published");
        assert!(Instant::now() < deadline, "{n} of {want} rows after 60 s");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn ecg_and_rr_replays_reach_the_log_and_prove() {
    let ecg = ecg_dat();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    let mqtt = common::free_addr().to_string();
    let _up = common::Proc::spawn(
        &[
            "up",
            "--data",
            d,
            "--mqtt-listen",
            &mqtt,
            "--partitions",
            "2",
            "--checkpoint-interval-ms",
            "100",
        ]
        .map(String::from),
        dir.path().join("up.log"),
    );
    common::wait_port(mqtt.rsplit(':').next().unwrap().parse().unwrap());

    // MIT-BIH record 208 at full speed: one reading per detected beat.
    let sim = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["sim", "--mqtt", &mqtt, "--register", d, "--speed", "0"];
        args.extend_from_slice(extra);
        serde_json::from_str(&vt(&args)).unwrap()
    };
    let report = sim(&["--replay-ecg", ecg.to_str().unwrap(), "--seed", "208"]);
    let did = report["devices"][0]["did"].as_str().unwrap().to_owned();
    let n = report["valid_readings"].as_u64().unwrap();
    assert!((450..=520).contains(&n), "{n} beats in 5 min of record 208");
    wait_rows(&data, &did, n);
    let stats = &rows(
        &data,
        &format!(
            "SELECT avg(value) AS mean, min(value) AS lo, max(value) AS hi, \
             CAST(max(device_time) AS BIGINT) - CAST(min(device_time) AS BIGINT) AS span \
             FROM readings WHERE device = '{did}' AND loinc = '8867-4' AND unit = '/min'"
        ),
    )[0];
    let mean = stats["mean"].as_f64().unwrap();
    assert!((85.0..=115.0).contains(&mean), "{stats}");
    assert!(stats["lo"].as_f64().unwrap() >= 30.0, "{stats}");
    assert!(stats["hi"].as_f64().unwrap() <= 300.0, "{stats}");
    // The beats span the 5-minute recording.
    let span = stats["span"].as_i64().unwrap();
    assert!((290_000..=300_000).contains(&span), "{stats}");

    let bundle = dir.path().join("beat.json");
    vt(&[
        "prove",
        "--wait",
        "--device",
        &did,
        "--seq",
        "100",
        "--data",
        d,
        "--out",
        bundle.to_str().unwrap(),
    ]);
    vt(&[
        "verify",
        bundle.to_str().unwrap(),
        "--data",
        d,
        "--device",
        &did,
    ]);

    // A chest-strap RR export: three intervals, three HR readings.
    let rr = dir.path().join("rr.txt");
    std::fs::write(&rr, "# polar h10\n800\n750\n1000\n").unwrap();
    let report = sim(&["--replay-rr", rr.to_str().unwrap(), "--seed", "9"]);
    let did = report["devices"][0]["did"].as_str().unwrap().to_owned();
    assert_eq!(report["valid_readings"], 3);
    wait_rows(&data, &did, 3);
    let hr: Vec<f64> = rows(
        &data,
        &format!("SELECT value FROM readings WHERE device = '{did}' ORDER BY seq"),
    )
    .iter()
    .map(|r| r["value"].as_f64().unwrap())
    .collect();
    assert_eq!(hr, vec![75.0, 80.0, 60.0]);
}
