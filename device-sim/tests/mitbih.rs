//! The real MIT-BIH record 208 (scipy's `ecg.dat`): vitaltrail's beat
//! detector against an independent one (neurokit2, fixture made by
//! `tests/fixtures/mitbih/gen_reference_beats.py`), scored the way
//! ANSI/AAMI EC57 (and WFDB's `bxb`) score QRS detectors: a detection
//! matches a reference beat within 150 ms.
//!
//! The three reference detectors disagree with each other by 1–9 %, so the
//! bar is agreement with neurokit2's own method, and with the beats that at
//! least two of the three references find, at no worse than 98 % either way.

use std::path::PathBuf;

use vitaltrail_device_sim::ecg::{MITBIH_HZ, default_ecg_path, detect_beats, load_scipy_ecg};
use vitaltrail_device_sim::replay::beat_readings;

/// The recording, or a clear failure saying how to get it.
fn ecg_dat() -> PathBuf {
    let p = default_ecg_path();
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup (it extracts scipy/misc/ecg.dat from \
         Debian's python3-scipy with `apt-get download python3-scipy` and dpkg-deb), \
         or point VITALTRAIL_ECG_DAT at the file",
        p.display()
    );
    p
}

fn reference(method: &str) -> Vec<usize> {
    let text = include_str!("fixtures/mitbih/reference_beats.json");
    let v: serde_json::Value = serde_json::from_str(text).unwrap();
    v["methods"][method]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// (true positives, false positives, false negatives) within `tol` samples.
fn score(found: &[usize], truth: &[usize], tol: usize) -> (usize, usize, usize) {
    let mut used = vec![false; truth.len()];
    let mut tp = 0;
    for &f in found {
        let best = truth
            .iter()
            .enumerate()
            .filter(|(i, t)| !used[*i] && t.abs_diff(f) <= tol)
            .min_by_key(|(_, t)| t.abs_diff(f));
        if let Some((i, _)) = best {
            used[i] = true;
            tp += 1;
        }
    }
    (tp, found.len() - tp, truth.len() - tp)
}

#[test]
fn record_208_beats_agree_with_an_independent_detector() {
    let mv = load_scipy_ecg(&ecg_dat()).unwrap();
    assert_eq!(mv.len(), 108_000, "5 minutes at 360 Hz");
    let found = detect_beats(&mv, MITBIH_HZ);
    let tol = (0.150 * MITBIH_HZ) as usize;
    for method in ["neurokit", "pantompkins1985", "hamilton2002"] {
        let truth = reference(method);
        let (tp, fp, fn_) = score(&found, &truth, tol);
        eprintln!(
            "{method}: {} reference beats, {} found, TP {tp} FP {fp} FN {fn_}",
            truth.len(),
            found.len()
        );
    }
    let nk = reference("neurokit");
    let others = [reference("pantompkins1985"), reference("hamilton2002")];
    let majority: Vec<usize> = nk
        .iter()
        .copied()
        .filter(|&b| {
            others
                .iter()
                .any(|o| o.iter().any(|&x| x.abs_diff(b) <= tol))
        })
        .collect();
    for (name, truth) in [("neurokit", &nk), ("majority", &majority)] {
        let (tp, fp, fn_) = score(&found, truth, tol);
        let se = tp as f64 / (tp + fn_) as f64;
        let ppv = tp as f64 / (tp + fp) as f64;
        assert!(
            se >= 0.98 && ppv >= 0.98,
            "against {name}: sensitivity {se:.4}, PPV {ppv:.4}"
        );
    }

    let times: Vec<f64> = found
        .iter()
        .map(|&i| i as f64 * 1000.0 / MITBIH_HZ)
        .collect();
    let readings = beat_readings(&times, 1_700_000_000_000, 1, "mitbih-208");
    assert!(readings.len() + 5 >= found.len());
    let hr: Vec<f64> = readings.iter().map(|r| r.measurements[0].value).collect();
    let mean = hr.iter().sum::<f64>() / hr.len() as f64;
    assert!((80.0..=120.0).contains(&mean), "mean HR {mean}");
    assert!(
        readings
            .windows(2)
            .all(|w| w[0].time < w[1].time && w[0].seq + 1 == w[1].seq)
    );
}
