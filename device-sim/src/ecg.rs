//! Replay of a real ECG: the MIT-BIH Arrhythmia Database record 208 that
//! ships as `scipy/misc/ecg.dat` (5 minutes, 360 Hz, normal and premature
//! ventricular beats). Beats are detected with the Pan–Tompkins method and
//! become heart-rate readings at the times the beats happened.
//!
//! The file is a zip archive holding `ecg.npy`: 108,000 little-endian `u2`
//! samples; millivolts are `(raw - 1024) / 200`.
//!
//! The detector (Pan & Tompkins, IEEE TBME 32(3), 1985), run offline so the
//! filters can be zero-phase:
//!
//! 1. band-pass 5–15 Hz (Butterworth biquads, forward and backward);
//! 2. five-point derivative, squaring, and a 150 ms moving-window integral;
//! 3. local maxima at least 200 ms apart (the refractory period) are
//!    classified as QRS or noise against adaptive levels
//!    (`SPKI`, `NPKI`, threshold `NPKI + 0.25 (SPKI - NPKI)`);
//! 4. a peak within 360 ms of the last beat whose steepest slope is under
//!    half of that beat's is a T wave, not a beat;
//! 5. when no beat comes for 1.66× the mean RR, the interval is searched
//!    back with half the threshold;
//! 6. each beat is placed at the largest |band-passed| sample within
//!    ±100 ms of its integral peak (the R peak, or the QS of a PVC).

use std::io::Read;
use std::path::Path;

use biquad::{Biquad, Coefficients, DirectForm2Transposed, Q_BUTTERWORTH_F64, ToHertz, Type};

use crate::{Error, Result};

/// Sampling rate of MIT-BIH recordings.
pub const MITBIH_HZ: f64 = 360.0;

/// Largest archive or array this loader accepts (the real file is 119 KB
/// zipped, 216 KB unzipped); anything bigger is not the scipy recording.
const MAX_BYTES: u64 = 64 << 20;

/// Where `scripts/setup` puts scipy's `ecg.dat`:
/// `$VITALTRAIL_ECG_DAT`, else `~/.cache/vitaltrail-tools/ecg.dat`.
pub fn default_ecg_path() -> std::path::PathBuf {
    std::env::var_os("VITALTRAIL_ECG_DAT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/vitaltrail-tools/ecg.dat")
        })
}

/// Load `ecg.dat` (scipy's zip with `ecg.npy`) as millivolts.
pub fn load_scipy_ecg(path: &Path) -> Result<Vec<f64>> {
    let bad = |reason: String| Error::Ecg {
        path: path.display().to_string(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| bad(format!("not a zip archive like scipy's ecg.dat: {e}")))?;
    let entry = zip
        .by_name("ecg.npy")
        .map_err(|e| bad(format!("no ecg.npy inside: {e}")))?;
    if entry.size() > MAX_BYTES {
        return Err(bad(format!("ecg.npy is {} bytes", entry.size())));
    }
    let mut bytes = Vec::with_capacity(entry.size() as usize);
    entry
        .take(MAX_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(format!("reading ecg.npy: {e}")))?;
    let npy = npyz::NpyFile::new(&bytes[..]).map_err(|e| bad(format!("ecg.npy: {e}")))?;
    if npy.shape().len() != 1 {
        return Err(bad(format!(
            "ecg.npy has shape {:?}, expected one dimension",
            npy.shape()
        )));
    }
    let raw: Vec<u16> = npy
        .into_vec()
        .map_err(|e| bad(format!("ecg.npy is not an array of u2: {e}")))?;
    if raw.is_empty() {
        return Err(bad("ecg.npy is empty".into()));
    }
    Ok(raw
        .iter()
        .map(|&r| (f64::from(r) - 1024.0) / 200.0)
        .collect())
}

/// Zero-phase band-pass: a Butterworth high-pass and low-pass biquad, run
/// forward then backward so QRS timing is not shifted.
fn bandpass(x: &[f64], fs: f64, low: f64, high: f64) -> Vec<f64> {
    let coeffs = |kind, f: f64| {
        Coefficients::<f64>::from_params(kind, fs.hz(), f.hz(), Q_BUTTERWORTH_F64)
            .expect("cut-off frequencies are below Nyquist for every supported rate")
    };
    let pass = |input: &mut Vec<f64>| {
        let mut hp = DirectForm2Transposed::<f64>::new(coeffs(Type::HighPass, low));
        let mut lp = DirectForm2Transposed::<f64>::new(coeffs(Type::LowPass, high));
        for v in input.iter_mut() {
            *v = lp.run(hp.run(*v));
        }
    };
    let mut y = x.to_vec();
    pass(&mut y);
    y.reverse();
    pass(&mut y);
    y.reverse();
    y
}

/// Beats of an ECG in millivolts sampled at `fs` Hz, as sample indices of
/// their R peaks (ascending, at least 200 ms apart).
pub fn detect_beats(ecg_mv: &[f64], fs: f64) -> Vec<usize> {
    if fs < 100.0 || ecg_mv.len() < (2.0 * fs) as usize {
        return Vec::new();
    }
    let ms = |m: f64| ((m / 1000.0) * fs).round() as usize;
    let filtered = bandpass(ecg_mv, fs, 5.0, 15.0);
    let n = filtered.len();
    // Centred five-point derivative, squared.
    let mut slope = vec![0.0; n];
    for i in 2..n.saturating_sub(2) {
        slope[i] =
            (2.0 * filtered[i + 1] + filtered[i + 2] - 2.0 * filtered[i - 1] - filtered[i - 2])
                / 8.0;
    }
    let squared: Vec<f64> = slope.iter().map(|d| d * d).collect();
    // Centred 150 ms moving-window integral via a prefix sum.
    let w = ms(150.0).max(1);
    let mut prefix = vec![0.0; n + 1];
    for i in 0..n {
        prefix[i + 1] = prefix[i] + squared[i];
    }
    let mwi: Vec<f64> = (0..n)
        .map(|i| {
            let lo = i.saturating_sub(w / 2);
            let hi = (i + w - w / 2).min(n);
            (prefix[hi] - prefix[lo]) / w as f64
        })
        .collect();

    // Candidate peaks: local maxima of the integral, 200 ms refractory
    // (the larger of two close maxima wins).
    let refractory = ms(200.0);
    let mut peaks: Vec<usize> = Vec::new();
    for i in 1..n - 1 {
        if mwi[i] > mwi[i - 1] && mwi[i] >= mwi[i + 1] {
            match peaks.last() {
                Some(&p) if i - p < refractory => {
                    if mwi[i] > mwi[p] {
                        *peaks.last_mut().expect("non-empty") = i;
                    }
                }
                _ => peaks.push(i),
            }
        }
    }

    // Learning phase: the first two seconds set the levels.
    let learn = ms(2000.0).min(n);
    let max0 = mwi[..learn].iter().cloned().fold(0.0, f64::max);
    let mean0 = mwi[..learn].iter().sum::<f64>() / learn as f64;
    let mut spki = 0.25 * max0;
    let mut npki = 0.5 * mean0;
    let threshold = |spki: f64, npki: f64| npki + 0.25 * (spki - npki);

    let max_slope = |centre: usize| {
        let lo = centre.saturating_sub(ms(75.0));
        let hi = (centre + ms(75.0)).min(n);
        slope[lo..hi].iter().map(|d| d.abs()).fold(0.0, f64::max)
    };

    let mut beats: Vec<usize> = Vec::new(); // integral peaks of QRS
    let mut rr: Vec<usize> = Vec::new();
    let mut last_slope = 0.0;
    let mut k = 0;
    while k < peaks.len() {
        let p = peaks[k];
        // Search back when the gap since the last beat is too long.
        if let Some(&last) = beats.last()
            && rr.len() >= 2
        {
            let recent = &rr[rr.len().saturating_sub(8)..];
            let mean_rr = recent.iter().sum::<usize>() / recent.len();
            if p - last > mean_rr * 166 / 100 {
                let t2 = 0.5 * threshold(spki, npki);
                let best = peaks[..k]
                    .iter()
                    .copied()
                    .filter(|&q| q > last + refractory && p > q + refractory && mwi[q] > t2)
                    .max_by(|a, b| mwi[*a].total_cmp(&mwi[*b]));
                if let Some(q) = best {
                    spki = 0.25 * mwi[q] + 0.75 * spki;
                    rr.push(q - last);
                    beats.push(q);
                    last_slope = max_slope(q);
                    continue; // re-examine p against the new last beat
                }
            }
        }
        let th = threshold(spki, npki);
        if mwi[p] > th {
            let s = max_slope(p);
            let t_wave = beats
                .last()
                .is_some_and(|&last| p - last < ms(360.0) && s < 0.5 * last_slope);
            if t_wave {
                npki = 0.125 * mwi[p] + 0.875 * npki;
            } else {
                spki = 0.125 * mwi[p] + 0.875 * spki;
                if let Some(&last) = beats.last() {
                    rr.push(p - last);
                }
                beats.push(p);
                last_slope = s;
            }
        } else {
            npki = 0.125 * mwi[p] + 0.875 * npki;
        }
        k += 1;
    }

    // Place each beat at its largest deflection.
    let half = ms(100.0);
    let mut out: Vec<usize> = beats
        .iter()
        .map(|&b| {
            let lo = b.saturating_sub(half);
            let hi = (b + half + 1).min(n);
            (lo..hi)
                .max_by(|&a, &c| filtered[a].abs().total_cmp(&filtered[c].abs()))
                .unwrap_or(b)
        })
        .collect();
    out.dedup_by(|a, b| a.abs_diff(*b) < refractory);
    out
}

/// Beat times (ms from the start of the recording) of an ECG.
pub fn beat_times_ms(ecg_mv: &[f64], fs: f64) -> Vec<f64> {
    detect_beats(ecg_mv, fs)
        .into_iter()
        .map(|i| i as f64 * 1000.0 / fs)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A synthetic ECG with known beat times: P, QRS and T waves as
    /// Gaussians, premature wide inverted beats, baseline wander, mains hum
    /// and noise.
    fn synthetic(fs: f64, secs: f64, seed: u64) -> (Vec<f64>, Vec<f64>) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n = (fs * secs) as usize;
        let mut x = vec![0.0; n];
        let mut beats = Vec::new();
        let mut t = 0.4;
        let gauss = |x: &mut [f64], centre: f64, width: f64, amp: f64| {
            let c = centre * fs;
            let w = width * fs;
            let lo = (c - 5.0 * w).max(0.0) as usize;
            let hi = ((c + 5.0 * w) as usize).min(x.len());
            for (i, v) in x.iter_mut().enumerate().take(hi).skip(lo) {
                let d = (i as f64 - c) / w;
                *v += amp * (-0.5 * d * d).exp();
            }
        };
        while t < secs - 0.5 {
            let pvc = rng.gen_bool(0.15);
            if pvc {
                gauss(&mut x, t, 0.025, -1.4);
                gauss(&mut x, t + 0.3, 0.06, 0.5);
            } else {
                gauss(&mut x, t - 0.16, 0.02, 0.15);
                gauss(&mut x, t, 0.008, 1.6);
                gauss(&mut x, t + 0.03, 0.008, -0.3);
                gauss(&mut x, t + 0.28, 0.045, 0.35);
            }
            beats.push(t * 1000.0);
            let rr: f64 = if pvc {
                rng.gen_range(0.9..1.2)
            } else {
                rng.gen_range(0.45..1.1)
            };
            t += rr;
        }
        for (i, v) in x.iter_mut().enumerate() {
            let s = i as f64 / fs;
            *v += 0.4 * (2.0 * std::f64::consts::PI * 0.25 * s).sin()
                + 0.05 * (2.0 * std::f64::consts::PI * 60.0 * s).sin()
                + rng.gen_range(-0.04..0.04);
        }
        (x, beats)
    }

    #[test]
    fn finds_every_synthetic_beat_and_nothing_else() {
        for seed in 0..5 {
            let (x, truth) = synthetic(MITBIH_HZ, 120.0, seed);
            let found = beat_times_ms(&x, MITBIH_HZ);
            assert_eq!(
                found.len(),
                truth.len(),
                "seed {seed}: found {} beats, {} in truth",
                found.len(),
                truth.len()
            );
            for (f, t) in found.iter().zip(&truth) {
                assert!(
                    (f - t).abs() <= 40.0,
                    "seed {seed}: beat at {t} ms found at {f} ms"
                );
            }
        }
    }

    #[test]
    fn flat_or_short_signals_have_no_beats() {
        assert!(detect_beats(&[0.0; 10_000], MITBIH_HZ).is_empty());
        assert!(detect_beats(&[1.0; 100], MITBIH_HZ).is_empty());
        assert!(detect_beats(&[], MITBIH_HZ).is_empty());
    }

    #[test]
    fn loader_rejects_files_that_are_not_the_recording() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ecg.dat");
        std::fs::write(&p, b"not a zip").unwrap();
        assert!(matches!(load_scipy_ecg(&p), Err(Error::Ecg { .. })));
        assert!(load_scipy_ecg(&dir.path().join("missing")).is_err());
    }
}
