//! Kill and resume: `ffwd lm train --save X --save-every N` (and `ffwd train`) is SIGKILLed at
//! random moments, saves included. The file on disk is then always a complete checkpoint
//! (or absent, before the first save), and `--resume` reaches bit-identical final parameters
//! and optimizer state to an uninterrupted run.
//!
//! `FFWD_KILL_TRIALS=N` sets the number of LM kills (default 12; the README's longer run
//! uses more); the test prints how many kills landed mid-run and mid-save (a kill during a
//! save leaves the writer's temporary file behind, next to the intact checkpoint).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ffwd::core::Rng;
use ffwd::models::Classifier;
use ffwd::train::lm::LmCheckpoint;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ffwd")
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn run_ok(args: &[String]) {
    let out = Command::new(bin()).args(args).output().unwrap();
    assert!(out.status.success(), "ffwd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Runs `args` and kills the process with SIGKILL after `after`; true if it was still running.
fn kill_after(args: &[String], after: Duration) -> bool {
    let mut child = Command::new(bin()).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    while t0.elapsed() < after {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    true
}

/// Parameters, optimizer moments (m, v) and step of an LM checkpoint.
type LmState = (Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<Vec<f32>>, usize);

fn lm_state(path: &Path) -> LmState {
    let ck = LmCheckpoint::load(path).unwrap_or_else(|e| panic!("{}: not a complete checkpoint: {e}", path.display()));
    let params = ck.lm.named_params().into_iter().map(|(_, p)| p.value.clone()).collect();
    let (m, v) = ck.optimizer.moments();
    (params, m.to_vec(), v.to_vec(), ck.state.step)
}

fn lm_args(text: &Path, save: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["lm", "train", "-q", "--text", p(text), "--threads", "2", "--save", p(save)].iter().map(|s| s.to_string()).collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Kill/resume trials of one FFN kind; returns how many kills landed while the run was going,
/// and how many of those during a save.
fn lm_trials(ffn: &[&str], trials: usize, seed: u64) -> (usize, usize) {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    let s: String = ffwd::data::text::tiny_shakespeare().unwrap().chars().take(30_000).collect();
    std::fs::write(&text, s).unwrap();
    let mut model = vec!["--context", "32", "--d-model", "32", "--heads", "2", "--layers", "2", "--batch", "8", "--steps", "80", "--eval-every", "20"];
    model.extend_from_slice(ffn);
    model.extend_from_slice(&["--save-every", "2"]);
    // the uninterrupted run, timed
    let whole = dir.path().join("whole.safetensors");
    let t0 = Instant::now();
    run_ok(&lm_args(&text, &whole, &model));
    let span = t0.elapsed();
    let want = lm_state(&whole);
    assert_eq!(want.3, 80);
    let mut rng = Rng::new(seed);
    let (mut landed, mut in_save) = (0, 0);
    for trial in 0..trials {
        let path = dir.path().join(format!("killed{trial}.safetensors"));
        let at = span.mul_f32(rng.uniform() * 0.95);
        landed += kill_after(&lm_args(&text, &path, &model), at) as usize;
        let tmp_prefix = format!(".killed{trial}.safetensors.tmp");
        in_save += std::fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with(&tmp_prefix)).count();
        if path.exists() {
            // complete, and an earlier state of the same run
            let (_, _, _, step) = lm_state(&path);
            assert!(step <= 80 && step.is_multiple_of(2), "trial {trial}: step {step}");
            run_ok(&lm_args(&text, &path, &["--resume", p(&path)]));
        } else {
            run_ok(&lm_args(&text, &path, &model));
        }
        let got = lm_state(&path);
        assert!(got == want, "trial {trial} (killed after {at:?}): the resumed run differs from the uninterrupted one");
    }
    (landed, in_save)
}

#[test]
fn killed_lm_runs_resume_to_the_same_parameters() {
    let trials: usize = std::env::var("FFWD_KILL_TRIALS").ok().and_then(|v| v.parse().ok()).unwrap_or(12);
    let (d, ds) = lm_trials(&["--ffn", "dense", "--ffn-width", "64"], trials - trials / 3, 1);
    let (u, us) = lm_trials(&["--ffn", "ufff", "--ffn-width", "63"], trials / 3, 2);
    eprintln!("kill/resume: {trials} trials, {} killed mid-run, {} of them during a save; every resumed run bit-identical", d + u, ds + us);
    assert!(d + u >= trials / 3, "too few kills landed mid-run ({} of {trials})", d + u);
}

#[test]
fn killed_classifier_runs_resume_to_the_same_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let base = [
        "train",
        "-q",
        "--layer",
        "fff",
        "--depth",
        "2",
        "--leaf",
        "8",
        "--epochs",
        "6",
        "--input-dropout",
        "0.1",
        "--region-leak",
        "0.1",
        "--threads",
        "2",
        "--save-every",
        "7",
    ];
    let args = |save: &PathBuf| -> Vec<String> { base.iter().map(|s| s.to_string()).chain(["--save".to_string(), p(save).to_string()]).collect() };
    let whole = dir.path().join("whole.safetensors");
    let t0 = Instant::now();
    run_ok(&args(&whole));
    let span = t0.elapsed();
    let values = |path: &Path| -> Vec<Vec<f32>> { Classifier::load(path).unwrap().named_params().into_iter().map(|(_, p)| p.value.clone()).collect() };
    let want = values(&whole);
    let mut rng = Rng::new(5);
    for trial in 0..6 {
        let path = dir.path().join(format!("killed{trial}.safetensors"));
        let at = span.mul_f32(rng.uniform() * 1.1);
        kill_after(&args(&path), at);
        if path.exists() {
            let resume: Vec<String> = ["train", "-q", "--threads", "2", "--resume", p(&path), "--save", p(&path)].iter().map(|s| s.to_string()).collect();
            run_ok(&resume);
        } else {
            run_ok(&args(&path));
        }
        assert!(values(&path) == want, "trial {trial} (killed after {at:?}): the resumed run differs");
    }
    // a resumed run refuses flags that would change it
    let out = Command::new(bin()).args(["train", "--resume", p(&whole), "--lr", "0.1"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--resume") && err.lines().count() == 1, "{err}");
}
