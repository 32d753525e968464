//! The CLI, driven as a user would: real processes, real files.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vitaltrail"))
}

fn run(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut c = bin();
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    c.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = c.spawn().expect("spawn vitaltrail");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn ok(args: &[&str], stdin: Option<&[u8]>) -> String {
    let o = run(args, stdin);
    assert!(
        o.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// A failure is exactly one line on stderr, with no backtrace.
fn fails(args: &[&str], stdin: Option<&[u8]>) -> String {
    let o = run(args, stdin);
    assert!(!o.status.success(), "{args:?} unexpectedly succeeded");
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    err
}

fn p(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().unwrap().to_owned()
}

#[test]
fn keys_sign_verify_log_prove_verify() {
    let d = tempfile::tempdir().unwrap();
    let dev = p(d.path(), "dev.pem");
    let did = ok(&["keys", "new", "--out", &dev], None).trim().to_owned();
    assert!(did.starts_with("did:key:z6Mk"), "{did}");
    // The key file is private.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&dev).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Refuses to overwrite.
    assert_eq!(
        fails(&["keys", "new", "--out", &dev], None).lines().count(),
        1
    );
    assert_eq!(ok(&["keys", "show", "--key", &dev], None).trim(), did);

    let mut files = vec![];
    for seq in 0..5 {
        let json = format!(
            r#"{{"seq": {seq}, "time": 1700000000000, "measurements": [{{"code": "8867-4", "value": {}, "unit": "/min"}}, {{"code": "8310-5", "value": 36.9, "unit": "Cel"}}], "meta": {{"fw": "2.1"}}}}"#,
            60 + seq
        );
        let f = p(d.path(), &format!("r{seq}.cose"));
        ok(
            &["reading", "sign", "--key", &dev, "--out", &f],
            Some(json.as_bytes()),
        );
        files.push(f);
    }
    let out = ok(&["reading", "verify", &files[2]], None);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["did"], did.as_str());
    assert_eq!(v["seq"], 2);
    assert_eq!(v["measurements"][0]["value"], 62.0);
    assert_eq!(v["meta"]["fw"], "2.1");
    // Also over stdin.
    let bytes = std::fs::read(&files[2]).unwrap();
    ok(&["reading", "verify"], Some(&bytes));

    // Tampered and malformed envelopes: non-zero, the reason on one line.
    let mut t = bytes.clone();
    let n = t.len();
    t[n - 1] ^= 1;
    let err = fails(&["reading", "verify"], Some(&t));
    assert!(err.contains("bad_signature"), "{err}");
    assert_eq!(err.lines().count(), 1);
    assert!(fails(&["reading", "verify"], Some(b"\xd2\x84garbage")).contains("malformed"));
    // Invalid measurement input is refused at signing time.
    let err = fails(
        &["reading", "sign", "--key", &dev, "--out", &p(d.path(), "x")],
        Some(br#"{"seq": 1, "measurements": [{"code": "8867-5", "value": 1, "unit": "/min"}]}"#),
    );
    assert!(err.contains("LOINC"), "{err}");

    // The log: append (all or none), checkpoint, prove, verify.
    let log = p(d.path(), "log");
    let logkey = p(d.path(), "log.pem");
    ok(&["keys", "new", "--out", &logkey], None);
    let bad = p(d.path(), "bad.cose");
    std::fs::write(&bad, &t).unwrap();
    let err = fails(&["log", "append", "--dir", &log, &files[0], &bad], None);
    assert!(err.contains("nothing was appended"), "{err}");
    let mut args = vec!["log", "append", "--dir", log.as_str()];
    args.extend(files.iter().map(String::as_str));
    assert!(ok(&args, None).contains("tree size 5"));
    let err = fails(&["log", "prove", "--dir", &log, "--index", "0"], None);
    assert!(err.contains("no checkpoint"), "{err}");
    let note = ok(
        &[
            "log",
            "checkpoint",
            "--dir",
            &log,
            "--key",
            &logkey,
            "--origin",
            "test.example/log",
        ],
        None,
    );
    assert!(note.starts_with("test.example/log\n5\n"), "{note}");
    let vkey = std::fs::read_to_string(Path::new(&log).join("log.vkey")).unwrap();
    let vkey = vkey.trim();
    let err = fails(&["log", "prove", "--dir", &log, "--index", "5"], None);
    assert!(err.contains("not covered"), "{err}");
    let bundle = p(d.path(), "b3.json");
    ok(
        &[
            "log", "prove", "--dir", &log, "--index", "3", "--out", &bundle,
        ],
        None,
    );

    let out = ok(&["verify", &bundle, "--log-key", vkey], None);
    assert!(out.contains("ok   inclusion"), "{out}");
    // The key may also be given as a file, and the device pinned.
    ok(
        &[
            "verify",
            &bundle,
            "--log-key",
            &p(Path::new(&log), "log.vkey"),
            "--device",
            &did,
        ],
        None,
    );

    // Any flipped byte of the bundle file fails verification.
    let b = std::fs::read(&bundle).unwrap();
    let mut tampered = 0;
    for i in (0..b.len()).step_by(7) {
        let mut t = b.clone();
        t[i] ^= 0x01;
        let f = p(d.path(), "t.json");
        std::fs::write(&f, &t).unwrap();
        let o = run(&["verify", &f, "--log-key", vkey], None);
        let same = serde_json::from_slice::<serde_json::Value>(&t).ok()
            == serde_json::from_slice::<serde_json::Value>(&b).ok();
        if !same {
            assert!(!o.status.success(), "flip at {i} verified");
            tampered += 1;
        }
    }
    assert!(tampered > 50);

    // A second checkpoint after more appends must be consistent and verify.
    let mut args = vec!["log", "append", "--dir", log.as_str()];
    args.extend(files.iter().map(String::as_str));
    ok(&args, None);
    ok(
        &[
            "log",
            "checkpoint",
            "--dir",
            &log,
            "--key",
            &logkey,
            "--origin",
            "test.example/log",
        ],
        None,
    );
    ok(
        &[
            "log", "prove", "--dir", &log, "--index", "9", "--out", &bundle,
        ],
        None,
    );
    ok(&["verify", &bundle, "--log-key", vkey], None);
    // A different log key names the failed check.
    let other = p(d.path(), "other.pem");
    ok(&["keys", "new", "--out", &other], None);
    let other_vkey = ok(
        &[
            "keys",
            "show",
            "--key",
            &other,
            "--log-name",
            "test.example/log",
        ],
        None,
    );
    let other_vkey = other_vkey.lines().nth(1).unwrap();
    let o = run(&["verify", &bundle, "--log-key", other_vkey], None);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("FAIL checkpoint_signature"));
}

#[test]
fn demo_runs_and_catches_every_tamper() {
    let d = tempfile::tempdir().unwrap();
    let dir = p(d.path(), "demo");
    let out = ok(&["demo", "--dir", &dir, "--readings", "300"], None);
    assert!(out.contains("genuine bundle: every check passes"), "{out}");
    assert_eq!(out.matches("REJECTED").count(), 6, "{out}");
    // The bundle it leaves behind verifies with the CLI.
    ok(
        &[
            "verify",
            &p(Path::new(&dir), "bundle.json"),
            "--log-key",
            &p(Path::new(&dir), "log/log.vkey"),
        ],
        None,
    );
    // A non-empty directory is refused.
    fails(&["demo", "--dir", &dir], None);
}

#[test]
fn bad_arguments_are_one_line_errors() {
    let err = fails(
        &[
            "verify",
            "/nonexistent.json",
            "--log-key",
            "x+00000000+AAAA",
        ],
        None,
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let err = fails(
        &["reading", "sign", "--key", "/nonexistent.pem"],
        Some(b"{}"),
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

fn run_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = bin();
    c.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

#[test]
fn config_layers_unknown_keys_and_redaction() {
    let d = tempfile::tempdir().unwrap();
    let file = p(d.path(), "vitaltrail.toml");
    std::fs::write(
        &file,
        "data_dir = \"/srv/vitaltrail\"\n[ingest]\nconnections = 2\nmax_batch = 64\n\
         [kafka]\nbrokers = \"k1:9092\"\n[kafka.client]\n\"sasl.password\" = \"hunter2-sekret\"\n\
         \"sasl.username\" = \"pipeline\"\n",
    )
    .unwrap();
    // The environment overrides the file, key by key.
    let o = run_env(
        &["config", "print", "--role", "ingest", "--config", &file],
        &[("VITALTRAIL_INGEST__CONNECTIONS", "3")],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let printed = String::from_utf8(o.stdout).unwrap();
    assert!(printed.contains("connections = 3"), "{printed}");
    assert!(printed.contains("max_batch = 64"), "{printed}");
    assert!(
        printed.contains("data_dir = \"/srv/vitaltrail\""),
        "{printed}"
    );
    assert!(
        printed.contains("\"sasl.username\" = \"pipeline\""),
        "{printed}"
    );
    // No secret in the dump.
    assert!(!printed.contains("hunter2"), "{printed}");
    assert!(printed.contains("<redacted>"), "{printed}");
    // What is printed is a configuration file that prints the same, once
    // the secret is put back (with <redacted> in it, it is refused).
    let again = p(d.path(), "printed.toml");
    std::fs::write(&again, &printed).unwrap();
    let o = run_env(
        &["config", "print", "--role", "ingest", "--config", &again],
        &[],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("<redacted>"));
    std::fs::write(&again, printed.replace("<redacted>", "hunter2-sekret")).unwrap();
    let o = run_env(
        &["config", "print", "--role", "ingest", "--config", &again],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8(o.stdout).unwrap(), printed);

    // An unknown key stops `up` before it touches anything, naming the key.
    let bad = p(d.path(), "bad.toml");
    let data = p(d.path(), "data");
    std::fs::write(
        &bad,
        format!("data_dir = \"{data}\"\n[attestor]\ncheckpoint_intervall_ms = 5\n"),
    )
    .unwrap();
    let err = fails(&["up", "--config", &bad], None);
    assert!(err.contains("checkpoint_intervall_ms"), "{err}");
    assert!(!Path::new(&data).exists(), "nothing was created");
    // So does a misspelt variable.
    let o = run_env(
        &["config", "print"],
        &[("VITALTRAIL_HTTP__LISTENN", "127.0.0.1:1")],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("listenn"));
    // Someone else's variable that is not UTF-8 is none of our business.
    {
        use std::os::unix::ffi::OsStrExt as _;
        let o = bin()
            .args(["config", "print"])
            .env("JUNK", std::ffi::OsStr::from_bytes(b"\xff\xfe"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    // A secret in a bad value never reaches stderr.
    let secret = p(d.path(), "secret.toml");
    std::fs::write(&secret, "[kafka.client]\n\"sasl.password\" = 987654321\n").unwrap();
    let err = fails(&["up", "--config", &secret], None);
    assert!(!err.contains("987654321"), "{err}");
    // A flag overrides the file (and the stage needs what it needs).
    let err = fails(&["ingest", "--config", &file, "--connections", "0"], None);
    assert!(err.contains("ingest.connections"), "{err}");
    // A reserved anchor origin stops `up` before anything is written (it
    // started, logged readings, then stopped at the first ledger write).
    let o = run_env(
        &["up", "--data", &data],
        &[("VITALTRAIL_ANCHOR__ORIGIN", "vitaltrail/ledger/v1")],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("anchor.origin") && err.contains("reserved"),
        "{err}"
    );
    assert!(!Path::new(&data).exists(), "nothing was created");
    // So does an origin prefix that makes no valid log name (a 300-byte one
    // stopped `up` at the first epoch; one with a space, at the attestor).
    for prefix in ["a b", "a+b", "", &"x".repeat(300)] {
        let o = run_env(
            &["up", "--data", &data],
            &[("VITALTRAIL_ATTESTOR__ORIGIN_PREFIX", prefix)],
        );
        assert!(!o.status.success(), "{prefix:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("attestor.origin_prefix"), "{prefix:?}: {err}");
        assert!(!Path::new(&data).exists(), "nothing was created");
    }
}

/// docs/configuration.md shows exactly what `config print --role up`
/// prints with nothing set.
#[test]
fn the_documented_defaults_are_the_printed_ones() {
    let d = tempfile::tempdir().unwrap();
    let mut c = bin();
    c.args(["config", "print", "--role", "up"])
        .current_dir(d.path());
    for (k, _) in std::env::vars() {
        if k.starts_with("VITALTRAIL_") {
            c.env_remove(k);
        }
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let printed = String::from_utf8(o.stdout).unwrap();
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/configuration.md"
    ))
    .unwrap();
    let at = doc.find("## Every key").expect("the defaults section");
    let block = &doc[at..];
    let start = block.find("```toml\n").unwrap() + "```toml\n".len();
    let end = block[start..].find("```").unwrap();
    assert_eq!(
        &block[start..start + end],
        printed,
        "update docs/configuration.md"
    );
}

/// `vitaltrail news2` prints the documented JSON, scores only what it is
/// given, and refuses what it cannot score.
#[test]
fn news2_scores_from_flags() {
    let j = |args: &[&str]| -> serde_json::Value {
        serde_json::from_str(&ok(&[&["news2"], args].concat(), None)).unwrap()
    };
    // A sepsis-like picture: RR 22 (2), SpO2 93 (2), SBP 100 (2), pulse 115
    // (2), temperature 38.5 (1), alert (0), on air (0) = 9, high.
    let v = j(&[
        "--rr",
        "22",
        "--spo2",
        "93",
        "--sbp",
        "100",
        "--pulse",
        "115",
        "--consciousness",
        "A",
        "--temp",
        "38.5",
    ]);
    assert_eq!(v["total"], 9, "{v}");
    assert_eq!(v["risk"], "high", "{v}");
    assert_eq!(v["parameters"]["spo2"], 2, "{v}");
    assert_eq!(v["parameters"]["air_or_oxygen"], 0, "{v}");
    assert_eq!(v["missing"], serde_json::json!([]), "{v}");
    assert_eq!(
        v.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["missing", "parameters", "risk", "total"]
    );
    // Scale 2 on oxygen: 97 % scores 3, plus 2 for oxygen; the rest missing.
    let v = j(&["--spo2", "97", "--scale", "2", "--oxygen"]);
    assert_eq!(v["total"], 5, "{v}");
    assert_eq!(v["risk"], "medium", "{v}");
    assert_eq!(
        v["missing"],
        serde_json::json!([
            "respiration_rate",
            "systolic_bp",
            "pulse",
            "consciousness",
            "temperature"
        ]),
        "{v}"
    );
    // A single 3 alone is low-medium; new confusion scores 3.
    let v = j(&["--consciousness", "C"]);
    assert_eq!(
        (v["total"].as_u64(), v["risk"].as_str()),
        (Some(3), Some("low-medium")),
        "{v}"
    );
    // Nothing given: only air scored, everything else missing, low.
    let v = j(&[]);
    assert_eq!(v["total"], 0, "{v}");
    assert_eq!(v["missing"].as_array().unwrap().len(), 6, "{v}");
    fails(&["news2", "--scale", "3"], None);
    fails(&["news2", "--consciousness", "X"], None);
    fails(&["news2", "--pulse", "NaN"], None);
}

/// `vitaltrail devices list | head -n 1`: a reader that has gone is a
/// normal end, as it is for `ls`: exit 0, nothing on stderr, no panic
/// ("failed printing to stdout: Broken pipe" before). The pipe's read end
/// is closed before the command starts, so every write fails: the test is
/// deterministic where `| head` is a race.
#[test]
fn a_closed_stdout_ends_each_command_quietly() {
    let d = tempfile::tempdir().unwrap();
    let data = p(d.path(), "data");
    let key = p(d.path(), "dev.pem");
    for i in 0..5 {
        let k = p(d.path(), &format!("d{i}.pem"));
        let did = ok(&["keys", "new", "--out", &k], None).trim().to_owned();
        ok(
            &[
                "devices",
                "add",
                &did,
                "--patient",
                &format!("pt-{i}"),
                "--data",
                &data,
            ],
            None,
        );
    }
    ok(&["keys", "new", "--out", &key], None);
    let demo = p(d.path(), "demo");
    let cases: [&[&str]; 6] = [
        &["devices", "list", "--data", &data],
        &[
            "keys",
            "show",
            "--key",
            &key,
            "--log-name",
            "example.org/log",
        ],
        &["news2", "--rr", "22", "--spo2", "93"],
        &["config", "print", "--role", "up"],
        &["demo", "--dir", &demo, "--readings", "40"],
        &["query", "--data", &data, "SELECT 1 AS one"],
    ];
    let closed = |args: &[&str]| {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        bin()
            .args(args)
            .current_dir(d.path())
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    };
    for args in cases {
        let o = closed(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{args:?}: {:?} {err}", o.status);
        assert!(err.is_empty(), "{args:?} wrote to stderr: {err}");
    }
    // But a verdict is never the printing's: `verify` of a tampered bundle
    // with its reader gone still exits 1 (it exited 0 in review).
    let demo = p(d.path(), "demo2");
    ok(&["demo", "--dir", &demo, "--readings", "40"], None);
    let key = p(Path::new(&demo), "log/log.vkey");
    let good = p(Path::new(&demo), "bundle.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&good).unwrap()).unwrap();
    v["log_time_ms"] = (v["log_time_ms"].as_u64().unwrap() + 1).into();
    let bad = p(d.path(), "bad.json");
    std::fs::write(&bad, v.to_string()).unwrap();
    let o = closed(&["verify", &good, "--log-key", &key]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = closed(&["verify", &bad, "--log-key", &key]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
