//! End-to-end tests of the `ffwd` binary: train/save/eval/predict, checkpoint round trip,
//! and every user-facing error (one line, exit code 1, no panic, no partial checkpoint).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use ffwd::data::digits;
use ffwd::models::Classifier;
use safetensors::SafeTensors;

fn ffwd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ffwd")).args(args).output().unwrap()
}

fn ffwd_stdin(args: &[&str], input: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ffwd")).args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// Asserts a clean failure and returns its stderr.
fn fails(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "expected exit 1, stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(err.trim().lines().count(), 1, "error should be one line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    err
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn train_save_eval_predict_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.safetensors");
    let metrics = dir.path().join("m.json");
    let out = ok(&ffwd(&["train", "-q", "--layer", "fff", "--depth", "2", "--leaf", "8", "--epochs", "30", "--save", p(&model), "--metrics", p(&metrics)]));
    assert!(out.contains("test accuracy"), "{out}");
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    for key in ["test_accuracy", "train_accuracy", "epochs", "train_seconds", "params", "neurons_per_inference"] {
        assert!(m.get(key).is_some(), "metrics lack {key}: {m}");
    }
    assert_eq!(m["epochs"], 30);
    assert_eq!(m["neurons_per_inference"], 2 + 8);
    let acc = m["test_accuracy"].as_f64().unwrap();
    assert!(acc > 0.9, "fff d2 ℓ8 reaches 0.93 on digits in 30 epochs, got {acc}");
    // eval reproduces the training run's final test accuracy
    let out = ok(&ffwd(&["eval", "--model", p(&model), "--data", "digits"]));
    assert!(out.contains(&format!("test accuracy {acc:.4}")), "{out} vs {acc}");
    // predict: one line per sample, same as the library
    let split = digits::split().unwrap();
    let rows: Vec<String> = (0..5).map(|i| split.test.row(i).iter().map(|v| v.to_string()).collect::<Vec<_>>().join(",")).collect();
    let out = ok(&ffwd_stdin(&["predict", "--model", p(&model)], &rows.join("\n")));
    let loaded = Classifier::load(&model).unwrap();
    let want = loaded.predict(&split.test.x[..5 * 64], 5).unwrap();
    let got: Vec<u32> = out.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(got, want);
    // bf16 leaves: the test accuracy within a sample or two of f32 (360 test samples)
    let out = ok(&ffwd(&["eval", "--model", p(&model), "--data", "digits", "--bf16"]));
    let acc16: f64 =
        out.split("test accuracy ").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{out}"));
    assert!((acc16 - acc).abs() <= 0.01, "bf16 {acc16} vs f32 {acc}");
}

#[test]
fn checkpoint_round_trip_is_exact_for_every_layer() {
    let dir = tempfile::tempdir().unwrap();
    let split = digits::split().unwrap();
    for layer in ["dense", "fff", "ufff", "moe", "smoe", "pkm", "channelidle"] {
        let path = dir.path().join(format!("{layer}.safetensors"));
        ok(&ffwd(&["train", "-q", "--layer", layer, "--epochs", "1", "--master-leaf", "3", "--save", p(&path)]));
        let a = Classifier::load(&path).unwrap();
        assert_eq!(a.layer().kind(), layer);
        let again = dir.path().join("again.safetensors");
        a.save(&again).unwrap();
        let (b1, b2) = (std::fs::read(&path).unwrap(), std::fs::read(&again).unwrap());
        let (s1, s2) = (SafeTensors::deserialize(&b1).unwrap(), SafeTensors::deserialize(&b2).unwrap());
        // the training run's file adds optimizer and run state to the model's own entries
        let (m1, m2) =
            (SafeTensors::read_metadata(&b1).unwrap().1.metadata().clone().unwrap(), SafeTensors::read_metadata(&b2).unwrap().1.metadata().clone().unwrap());
        for key in ["ffwd.format", "ffwd.config"] {
            assert_eq!(m1[key], m2[key], "{layer}: metadata {key}");
        }
        assert!(m1.contains_key("ffwd.state") && m1.contains_key("ffwd.optim.step") && !m2.contains_key("ffwd.state"));
        let mut names = s2.names();
        names.sort();
        assert!(!names.is_empty() && names.iter().all(|n| n.starts_with("ffn.")), "{names:?}");
        for n in names {
            let (t1, t2) = (s1.tensor(n).unwrap(), s2.tensor(n).unwrap());
            assert!(t1.shape() == t2.shape() && t1.data() == t2.data(), "{layer}: tensor {n} differs after re-save");
        }
        let b = Classifier::load(&again).unwrap();
        assert_eq!(a.logits(&split.test.x, split.test.len()).unwrap(), b.logits(&split.test.x, split.test.len()).unwrap());
        assert_eq!(a.config(), b.config());
    }
    let leftovers: Vec<_> =
        std::fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().contains(".tmp")).collect();
    assert!(leftovers.is_empty());
}

#[test]
fn config_file_and_flag_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, "layer = \"ufff\"\nepochs = 2\n[ufff]\ndepth = 3\n").unwrap();
    let metrics = dir.path().join("m.json");
    ok(&ffwd(&["train", "-q", "--config", p(&cfg), "--depth", "4", "--metrics", p(&metrics)]));
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    assert_eq!(m["epochs"], 2);
    assert_eq!(m["neurons_per_inference"], 5); // flag depth 4 wins over the file's 3
    assert_eq!(m["layer"]["kind"], "ufff");
}

#[test]
fn unknown_config_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "epochs = 2\n[fff]\nleaves = 4\n").unwrap();
    let err = fails(&ffwd(&["train", "--config", p(&cfg)]));
    assert!(err.contains("bad.toml") && err.contains("unknown field `leaves`") && err.contains("line 3"), "{err}");
}

#[test]
fn missing_files_are_named() {
    let err = fails(&ffwd(&["train", "--data", "idx:/no/such/dir"]));
    assert!(err.contains("/no/such/dir"), "{err}");
    let err = fails(&ffwd(&["train", "--data", "csv:/no/such.csv"]));
    assert!(err.contains("/no/such.csv") && err.contains("No such file"), "{err}");
    let err = fails(&ffwd(&["eval", "--model", "/no/model.safetensors"]));
    assert!(err.contains("/no/model.safetensors"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("train-images-idx3-ubyte"), [0u8, 0, 8, 3, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]).unwrap();
    let err = fails(&ffwd(&["train", "--data", &format!("idx:{}", p(dir.path()))]));
    assert!(err.contains("train-labels-idx1-ubyte"), "{err}");
}

fn idx_dir(images_magic: u32, truncate: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let n = 4u32;
    let mut img = images_magic.to_be_bytes().to_vec();
    for d in [n, 2, 2] {
        img.extend_from_slice(&d.to_be_bytes());
    }
    img.extend((0..n * 4).map(|i| (i * 13 % 256) as u8));
    if truncate {
        img.truncate(img.len() - 3);
    }
    let mut lab = 0x0801u32.to_be_bytes().to_vec();
    lab.extend_from_slice(&n.to_be_bytes());
    lab.extend([0u8, 1, 0, 1]);
    for prefix in ["train", "t10k"] {
        std::fs::write(dir.path().join(format!("{prefix}-images-idx3-ubyte")), &img).unwrap();
        std::fs::write(dir.path().join(format!("{prefix}-labels-idx1-ubyte")), &lab).unwrap();
    }
    dir
}

#[test]
fn idx_bad_magic_and_truncation() {
    let good = idx_dir(0x0803, false);
    ok(&ffwd(&["train", "-q", "--epochs", "1", "--data", &format!("idx:{}", p(good.path()))]));
    let bad = idx_dir(0x0903, false);
    let err = fails(&ffwd(&["train", "--data", &format!("idx:{}", p(bad.path()))]));
    assert!(err.contains("train-images-idx3-ubyte") && err.contains("bad IDX magic 0x00000903"), "{err}");
    let short = idx_dir(0x0803, true);
    let err = fails(&ffwd(&["train", "--data", &format!("idx:{}", p(short.path()))]));
    assert!(err.contains("train-images-idx3-ubyte") && err.contains("truncated"), "{err}");
}

#[test]
fn csv_nan_and_shape_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let nan = dir.path().join("nan.csv");
    std::fs::write(&nan, "y,a,b\n0,1,2\n1,inf,3\n").unwrap();
    let err = fails(&ffwd(&["train", "--data", &format!("csv:{}", p(&nan))]));
    assert!(err.contains("nan.csv") && err.contains("non-finite value at row 3, column 2"), "{err}");
    // a digits model evaluated on 2-feature data
    let csv = dir.path().join("two.csv");
    std::fs::write(&csv, (0..20).map(|i| format!("{},{},{}\n", i % 2, i, -i)).collect::<String>()).unwrap();
    let model = dir.path().join("m.safetensors");
    ok(&ffwd(&["train", "-q", "--epochs", "1", "--save", p(&model)]));
    let err = fails(&ffwd(&["eval", "--model", p(&model), "--data", &format!("csv:{}", p(&csv))]));
    assert!(err.contains("axis `features` expected 64, got 2"), "{err}");
    let err = fails(&ffwd_stdin(&["predict", "--model", p(&model)], "1,2,3\n"));
    assert!(err.contains("line 1: 3 features, the model expects 64"), "{err}");
    // and the CSV trains fine on its own
    ok(&ffwd(&["train", "-q", "--epochs", "2", "--data", &format!("csv:{}", p(&csv))]));
}

#[test]
fn failed_save_leaves_no_partial_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    // the target is an existing directory: the rename fails after the temp file was written
    let target = dir.path().join("taken");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("keep"), "x").unwrap();
    let err = fails(&ffwd(&["train", "-q", "--epochs", "1", "--save", p(&target)]));
    assert!(err.contains("taken"), "{err}");
    let names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    assert_eq!(names, vec!["taken".to_string()], "temp file left behind");
    // a directory that does not exist
    let err = fails(&ffwd(&["train", "-q", "--epochs", "1", "--save", p(&dir.path().join("nope/m.safetensors"))]));
    assert!(err.contains("nope"), "{err}");
    // a file that is not a checkpoint
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, "not a checkpoint").unwrap();
    let err = fails(&ffwd(&["eval", "--model", p(&junk)]));
    assert!(err.contains("junk.safetensors") && err.contains("not a safetensors file"), "{err}");
}

#[test]
fn bad_flags_are_clean_errors() {
    let err = fails(&ffwd(&["train", "--data", "mnist"]));
    assert!(err.contains("unknown data spec `mnist`"), "{err}");
    let err = fails(&ffwd(&["train", "--layer", "fff", "--width", "100"]));
    assert!(err.contains("not a positive multiple"), "{err}");
    let err = fails(&ffwd(&["train", "--depth", "3"]));
    assert!(err.contains("--depth applies to"), "{err}");
    let help = ok(&ffwd(&["train", "--help"]));
    assert!(help.contains("--hardening") && help.contains("idx:DIR"), "{help}");
}

#[test]
fn mixture_training_reports_expert_load() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("m.json");
    let out = ffwd(&["train", "--layer", "moe", "--experts", "4", "--expert-width", "8", "--top-k", "1", "--epochs", "30", "--metrics", p(&metrics)]);
    let text = ok(&out);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("expert load"), "{log}");
    assert!(text.contains("test accuracy"), "{text}");
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    let load = m["history"][1]["expert_load"].as_array().unwrap();
    assert_eq!(load.len(), 4);
    let total: f64 = load.iter().map(|v| v.as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-3, "expert shares sum to {total}");
    assert_eq!(m["neurons_per_inference"], 8);
    assert!(m["test_accuracy"].as_f64().unwrap() > 0.8, "{m}");
    let err = fails(&ffwd(&["train", "--layer", "moe", "--experts", "4", "--top-k", "5"]));
    assert!(err.contains("moe.k must be in 1..=4"), "{err}");
    let err = fails(&ffwd(&["train", "--layer", "pkm", "--width", "200"]));
    assert!(err.contains("not a square"), "{err}");
    let err = fails(&ffwd(&["train", "--top-k", "2"]));
    assert!(err.contains("--top-k applies to"), "{err}");
}

#[test]
fn lm_train_sample_resume_and_bench() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    let corpus: String = (0..400).map(|i| ["the cat sat on the mat. ", "a dog ran to the log. "][i % 2]).collect();
    std::fs::write(&text, &corpus).unwrap();
    let (model, metrics) = (dir.path().join("lm.safetensors"), dir.path().join("lm.json"));
    let tiny = ["--context", "16", "--d-model", "16", "--heads", "2", "--layers", "1", "--batch", "4", "--eval-every", "5", "--eval-batches", "2"];
    let mut args = vec![
        "lm",
        "train",
        "-q",
        "--text",
        p(&text),
        "--steps",
        "20",
        "--stop-at",
        "10",
        "--save",
        p(&model),
        "--metrics",
        p(&metrics),
        "--ffn",
        "smoe",
        "--experts",
        "4",
        "--ffn-width",
        "32",
    ];
    args.extend(tiny);
    let out = ok(&ffwd(&args));
    assert!(out.contains("val loss"), "{out}");
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    for key in ["val_loss", "val_bpc", "train_tokens_per_s", "params", "ffn_params", "ffn_active_params_per_token"] {
        assert!(m[key].as_f64().unwrap() > 0.0, "{key} in {m}");
    }
    assert_eq!(m["steps"], 10);
    assert!(m["ffn_active_params_per_token"].as_f64().unwrap() < m["ffn_params"].as_f64().unwrap());
    // sampling: the prompt comes back first; unknown characters are refused by name
    let s = ok(&ffwd(&["lm", "sample", "--model", p(&model), "--prompt", "the ", "--tokens", "20", "--seed", "1"]));
    assert!(s.starts_with("the ") && s.trim_end().chars().count() >= 20, "{s}");
    let again = ok(&ffwd(&["lm", "sample", "--model", p(&model), "--prompt", "the ", "--tokens", "20", "--seed", "1"]));
    assert_eq!(s, again, "same seed, same text");
    let err = fails(&ffwd(&["lm", "sample", "--model", p(&model), "--prompt", "Zebra"]));
    assert!(err.contains("'Z'") && err.contains("vocabulary"), "{err}");
    // stopping at 10 of 20 steps and resuming equals 20 steps in one go
    ok(&ffwd(&["lm", "train", "-q", "--text", p(&text), "--resume", p(&model), "--save", p(&model), "--metrics", p(&metrics)]));
    let resumed: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    let straight = dir.path().join("straight.json");
    let mut args =
        vec!["lm", "train", "-q", "--text", p(&text), "--steps", "20", "--metrics", p(&straight), "--ffn", "smoe", "--experts", "4", "--ffn-width", "32"];
    args.extend(tiny);
    ok(&ffwd(&args));
    let straight: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&straight).unwrap()).unwrap();
    assert_eq!(resumed["steps"], 20);
    assert_eq!(resumed["val_loss"], straight["val_loss"], "resumed run must continue the same run");
    let b = ok(&ffwd(&["bench", "--model", p(&model), "--json"]));
    let v: serde_json::Value = serde_json::from_str(b.trim()).unwrap();
    assert!(v["generate_tokens_per_s"].as_f64().unwrap() > 0.0, "{v}");
    // errors: empty text, windows longer than the context
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let err = fails(&ffwd(&["lm", "train", "--text", p(&empty)]));
    assert!(err.contains("empty"), "{err}");
    let err = fails(&ffwd(&["lm", "train", "--text", p(&text), "--context", "16", "--seq-len", "32", "--steps", "1"]));
    assert!(err.contains("context"), "{err}");
}

#[test]
fn bench_a_saved_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("u.safetensors");
    ok(&ffwd(&["train", "-q", "--layer", "ufff", "--depth", "5", "--epochs", "1", "--save", p(&model)]));
    let out = ok(&ffwd(&["bench", "--model", p(&model), "--json", "--budget-ms", "20"]));
    let m: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(m["layer"], "ufff");
    assert_eq!(m["neurons_per_inference"], 6);
    assert!(m["latency_us_batch1"].as_f64().unwrap() > 0.0 && m["samples_per_s"].as_f64().unwrap() > 0.0, "{m}");
    // bf16 weights: the same model, its accuracy within a point of f32's
    let out = ok(&ffwd(&["bench", "--model", p(&model), "--json", "--budget-ms", "20", "--bf16"]));
    let m: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(m["weights"], "bf16");
    let acc = |out: &str| -> f64 { out.split("test accuracy ").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap() };
    let (f32_acc, bf16_acc) = (acc(&ok(&ffwd(&["eval", "--model", p(&model)]))), acc(&ok(&ffwd(&["eval", "--model", p(&model), "--bf16"]))));
    assert!((f32_acc - bf16_acc).abs() <= 0.01, "f32 {f32_acc} vs bf16 {bf16_acc}");
    let row = digits::split().unwrap().test.row(0).iter().map(|v| v.to_string()).collect::<Vec<_>>().join(",");
    let got: Vec<u32> = ok(&ffwd_stdin(&["predict", "--model", p(&model), "--bf16"], &row)).lines().map(|l| l.parse().unwrap()).collect();
    let mut lib = Classifier::load(&model).unwrap();
    lib.set_precision(ffwd::kernels::Precision::Bf16).unwrap();
    assert_eq!(got, lib.predict(digits::split().unwrap().test.row(0), 1).unwrap(), "the CLI's bf16 prediction is the library's");
}

#[test]
fn forward_forward_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str| {
        let metrics = dir.path().join(name);
        ok(&ffwd(&["train", "-q", "--algo", "ff", "--ff-layers", "64,64", "--epochs", "4", "--batch", "50", "--lr", "0.01", "--metrics", p(&metrics)]));
        let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
        m
    };
    let (a, b) = (run("a.json"), run("b.json"));
    assert_eq!(a["algo"], "ff");
    assert_eq!(a["layers"].as_array().unwrap().len(), 2);
    for l in a["layers"].as_array().unwrap() {
        let (pos, neg) = (l["pos_goodness"].as_f64().unwrap(), l["neg_goodness"].as_f64().unwrap());
        assert!(pos > neg, "positives should have more goodness: {l}");
    }
    assert!(a["test_accuracy"].as_f64().unwrap() > 0.6, "{a}");
    assert!(a["test_accuracy_goodness"].as_f64().is_some());
    // same seed, same result
    assert_eq!(a["test_accuracy"], b["test_accuracy"]);
    assert_eq!(a["layers"], b["layers"]);
    // checkpoint: eval reproduces the softmax accuracy, predict answers one line per sample
    let model = dir.path().join("ff.safetensors");
    ok(&ffwd(&["train", "-q", "--algo", "ff", "--ff-layers", "64,64", "--epochs", "4", "--batch", "50", "--lr", "0.01", "--save", p(&model)]));
    let out = ok(&ffwd(&["eval", "--model", p(&model)]));
    let acc = a["test_accuracy"].as_f64().unwrap();
    assert!(out.contains(&format!("test accuracy {acc:.4} (softmax)")), "{out} vs {acc}");
    let split = digits::split().unwrap();
    let rows: Vec<String> = (0..3).map(|i| split.test.row(i).iter().map(|v| v.to_string()).collect::<Vec<_>>().join(" ")).collect();
    let out = ok(&ffwd_stdin(&["predict", "--model", p(&model)], &rows.join("\n")));
    let got: Vec<u32> = out.lines().map(|l| l.parse().unwrap()).collect();
    let mut net = ffwd::train::forward_forward::FfNet::load(&model).unwrap();
    let mut want = vec![0u32; 3];
    net.predict_softmax(&split.test.x[..3 * 64], 3, &mut want);
    assert_eq!(got, want, "the CLI's prediction is the library's");
}

#[test]
fn eval_takes_the_training_runs_csv_options() {
    // a CSV with the label last: the run's csv_label, holdout and seed travel in the checkpoint
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("d.csv");
    let split = digits::split().unwrap();
    let mut text = String::new();
    for i in 0..split.train.len() {
        let row: Vec<String> = split.train.row(i).iter().map(|v| v.to_string()).collect();
        text += &format!("{},{}\n", row.join(","), split.train.y[i]);
    }
    std::fs::write(&csv, text).unwrap();
    let data = format!("csv:{}", p(&csv));
    let model = dir.path().join("m.safetensors");
    let out = ok(&ffwd(&["train", "-q", "--data", &data, "--csv-label", "last", "--holdout", "0.3", "--seed", "4", "--epochs", "20", "--save", p(&model)]));
    let acc = out.split("test accuracy ").nth(1).unwrap().split_whitespace().next().unwrap().to_string();
    let ev = ok(&ffwd(&["eval", "--model", p(&model)]));
    assert!(ev.contains(&format!("test accuracy {acc}")), "{ev} vs {acc}");
    // read with the label first (what eval did before it took the run's options), the first
    // pixel (always 0) becomes every label and the model is scored against the wrong classes
    let ev = ok(&ffwd(&["eval", "--model", p(&model), "--csv-label", "first"]));
    assert!(!ev.contains(&format!("test accuracy {acc}")), "{ev} vs {acc}");
    // and a config file's data options are used when given
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, format!("data = \"{data}\"\ncsv_label = \"last\"\nholdout = 0.3\nseed = 4\n")).unwrap();
    let ev = ok(&ffwd(&["eval", "--model", p(&model), "--config", p(&cfg)]));
    assert!(ev.contains(&format!("test accuracy {acc}")), "{ev} vs {acc}");
}

#[test]
fn io_errors_say_their_cause_once() {
    for args in [
        vec!["predict", "--model", "missing.safetensors"],
        vec!["eval", "--model", "missing.safetensors"],
        vec!["train", "--data", "csv:missing.csv"],
        vec!["train", "--data", "idx:missing-dir"],
        vec!["lm", "train", "--text", "missing.txt"],
    ] {
        let err = fails(&ffwd(&args));
        let cause = if err.contains("No such file") { "No such file" } else { "no such directory" };
        assert_eq!(err.matches(cause).count(), 1, "{args:?}: {err}");
        assert!(err.contains("missing"), "{err}");
    }
}

#[test]
fn every_shipped_config_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            ffwd::config::TrainConfig::from_toml_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 5, "expected the shipped configs, found {n}");
    // language-model configs: one quick step each through the binary
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, "to be or not to be, that is the question. ".repeat(40)).unwrap();
    let mut m = 0;
    for entry in std::fs::read_dir(dir.join("lm")).unwrap() {
        let path = entry.unwrap().path();
        let out = ffwd(&[
            "lm",
            "train",
            "-q",
            "--config",
            p(&path),
            "--text",
            p(&text),
            "--steps",
            "1",
            "--d-model",
            "12",
            "--heads",
            "2",
            "--layers",
            "1",
            "--context",
            "16",
            "--batch",
            "2",
            "--eval-batches",
            "1",
        ]);
        ok(&out);
        m += 1;
    }
    assert!(m >= 2);
}

#[test]
fn parallel_trees_and_shorthands_that_do_not_apply() {
    // UltraFastBERT's KxD: 3 trees of depth 2, 3·3 = 9 neurons per sample
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("m.json");
    ok(&ffwd(&["train", "-q", "--layer", "ufff", "--depth", "2", "--trees", "3", "--epochs", "2", "--metrics", p(&metrics)]));
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    assert_eq!((m["neurons_per_inference"].as_u64(), m["layer"]["trees"].as_u64()), (Some(9), Some(3)), "{m}");
    let err = fails(&ffwd(&["train", "--layer", "dense", "--trees", "2"]));
    assert!(err.contains("--trees applies to ufff, not the dense layer"), "{err}");
    let err = fails(&ffwd(&["train", "--layer", "moe", "--depth", "2"]));
    assert!(err.contains("--depth applies to fff or ufff"), "{err}");
    let err = fails(&ffwd(&["lm", "train", "--ffn", "dense", "--trees", "2", "--steps", "1"]));
    assert!(err.contains("--trees applies to ffn ufff, not dense"), "{err}");
    let err = fails(&ffwd(&["lm", "train", "--depth", "2", "--steps", "1"]));
    assert!(err.contains("--depth applies to ffn fff or ufff, not dense"), "{err}");
}

#[test]
fn gradient_noise_is_seeded_on_every_trainer() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, noise: &str| {
        let m = dir.path().join(name);
        ok(&ffwd(&["train", "-q", "--layer", "fff", "--depth", "2", "--epochs", "3", "--grad-noise", noise, "--metrics", p(&m)]));
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&m).unwrap()).unwrap();
        let losses: Vec<f64> = v["history"].as_array().unwrap().iter().map(|e| e["train_loss"].as_f64().unwrap()).collect();
        (losses, v["config"]["grad_noise"].as_f64())
    };
    let (a, eta) = run("a.json", "0.05");
    let (b, _) = run("b.json", "0.05");
    let (c, _) = run("c.json", "0");
    assert_eq!(eta, Some(0.05f32 as f64));
    assert_eq!(a, b, "the same seed gives the same noise");
    assert_ne!(a, c, "noise changes the run");
    // Forward-Forward takes it on its layers' local gradients
    let ff = |name: &str, noise: &str| {
        let m = dir.path().join(name);
        ok(&ffwd(&["train", "-q", "--algo", "ff", "--ff-layers", "50", "--epochs", "2", "--grad-noise", noise, "--metrics", p(&m)]));
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&m).unwrap()).unwrap();
        v["layers"].to_string()
    };
    assert_eq!(ff("f1.json", "0.01"), ff("f2.json", "0.01"));
    assert_ne!(ff("f3.json", "0.01"), ff("f4.json", "0"));
}

fn series(name: &str) -> String {
    format!("{}/../ffwd/assets/timeseries/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn forecast_train_save_predict_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (model, metrics, csv) = (dir.path().join("f.safetensors"), dir.path().join("f.json"), dir.path().join("next.csv"));
    let sun = series("sunspots.csv");
    let out = ok(&ffwd(&[
        "forecast",
        "train",
        "--data",
        &sun,
        "--lags",
        "12",
        "--horizon",
        "3",
        "--sparsity",
        "0.3",
        "--epochs",
        "40",
        "--quiet",
        "--save",
        p(&model),
        "--metrics",
        p(&metrics),
    ]));
    assert!(out.contains("least-squares AR") && out.contains("test"), "{out}");
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    let test = doc["report"]["metrics"].as_array().unwrap().iter().find(|m| m["split"] == "test").unwrap().clone();
    assert!(test["model"]["mase"].as_f64().unwrap() < test["seasonal_naive"]["mase"].as_f64().unwrap(), "{test}");
    ok(&ffwd(&["forecast", "predict", "--model", p(&model), "--data", &sun, "--out", p(&csv)]));
    let text = std::fs::read_to_string(&csv).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "step,time,forecast");
    assert!(lines[1].starts_with("1,2009,") && lines[3].starts_with("3,2011,"), "{text}");
    // errors: gaps without --fill, an unknown column, a classifier given to predict, shape flags without --ffn
    let co2 = series("co2.csv");
    let e = fails(&ffwd(&["forecast", "train", "--data", &co2, "--quiet"]));
    assert!(e.contains("59 of 2284 weekly values missing") && e.contains("--fill linear"), "{e}");
    let e = fails(&ffwd(&["forecast", "train", "--data", &sun, "--column", "nope", "--quiet"]));
    assert!(e.contains("no column `nope`"), "{e}");
    let e = fails(&ffwd(&["forecast", "train", "--data", &sun, "--width", "8", "--quiet"]));
    assert!(e.contains("give --ffn"), "{e}");
    let e = fails(&ffwd(&["forecast", "train", "--data", &sun, "--ffn", "fff", "--depth", "2", "--width", "7", "--quiet"]));
    assert!(e.contains("width 7 is not"), "{e}");
    let clf = dir.path().join("c.safetensors");
    ok(&ffwd(&["train", "--epochs", "1", "--quiet", "--save", p(&clf)]));
    let e = fails(&ffwd(&["forecast", "predict", "--model", p(&clf), "--data", &sun]));
    assert!(e.contains("forecaster/1"), "{e}");
    // with an FFN (and a linear fill of the weekly CO2 gaps)
    ok(&ffwd(&["forecast", "train", "--data", &co2, "--fill", "linear", "--lags", "8", "--ffn", "dense", "--width", "8", "--epochs", "2", "--quiet"]));
}

#[test]
fn report_from_training_runs_and_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, f, html) = (dir.path().join("dense.json"), dir.path().join("fff.json"), dir.path().join("fc.json"), dir.path().join("r.html"));
    ok(&ffwd(&["train", "--epochs", "2", "--quiet", "--metrics", p(&a)]));
    ok(&ffwd(&["train", "--layer", "fff", "--depth", "2", "--epochs", "2", "--quiet", "--metrics", p(&b)]));
    ok(&ffwd(&["forecast", "train", "--data", &series("sunspots.csv"), "--epochs", "5", "--quiet", "--metrics", p(&f)]));
    let bench = dir.path().join("bench.json");
    let out = ok(&ffwd(&["bench", "--quick", "--json", "--only", "fff"]));
    std::fs::write(&bench, out).unwrap();
    let lm = dir.path().join("lm.json");
    ok(&ffwd(&[
        "lm",
        "train",
        "--ffn",
        "moe",
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--d-model",
        "16",
        "--heads",
        "2",
        "--layers",
        "2",
        "--context",
        "16",
        "--quiet",
        "--metrics",
        p(&lm),
    ]));
    ok(&ffwd(&["report", p(&a), p(&b), p(&f), p(&lm), "--bench", p(&bench), "--out", p(&html)]));
    let text = std::fs::read_to_string(&html).unwrap();
    let doc = roxmltree::Document::parse_with_options(&text, roxmltree::ParsingOptions { allow_dtd: true, ..Default::default() }).unwrap();
    let series: Vec<&str> = doc.descendants().filter_map(|n| n.attribute("data-series")).collect();
    assert!(series.contains(&"dense.json") && series.contains(&"fff.json") && series.contains(&"fc.json: validation"), "{series:?}");
    // the LM's routed FFN: one spread series per block, a point per evaluation
    let lm_doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&lm).unwrap()).unwrap();
    assert_eq!(lm_doc["history"].as_array().unwrap().len(), 2);
    assert_eq!(lm_doc["history"][1]["route_usage"].as_array().unwrap().len(), 2);
    assert!(series.contains(&"lm.json block 0") && series.contains(&"lm.json block 1") && series.contains(&"lm.json: validation"), "{series:?}");
    assert!(text.contains("Speedup over ffwd&#39;s dense layer") || text.contains("Speedup over ffwd's dense layer"));
    let metrics: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&a).unwrap()).unwrap();
    assert!(metrics["command"].as_str().unwrap().contains("--metrics"));
    // errors: nothing given, a file that is not JSON, a JSON that is not a metrics file
    fails(&ffwd(&["report", "--out", p(&html)]));
    let junk = dir.path().join("junk.json");
    std::fs::write(&junk, "{\"a\": 1").unwrap();
    let e = fails(&ffwd(&["report", p(&junk), "--out", p(&html)]));
    assert!(e.contains("junk.json") && e.contains("not JSON"), "{e}");
    let e = fails(&ffwd(&["report", p(&bench), "--out", p(&html)]));
    assert!(e.contains("bench.json") && e.contains("not"), "{e}");
}

#[test]
fn inspect_a_trained_lm() {
    let dir = tempfile::tempdir().unwrap();
    let (m, text, out) = (dir.path().join("lm.safetensors"), dir.path().join("t.txt"), dir.path().join("i.json"));
    let corpus = "to be or not to be, that is the question. ".repeat(40);
    std::fs::write(&text, &corpus).unwrap();
    ok(&ffwd(&[
        "lm",
        "train",
        "--text",
        p(&text),
        "--steps",
        "5",
        "--d-model",
        "16",
        "--heads",
        "2",
        "--layers",
        "1",
        "--context",
        "16",
        "--quiet",
        "--save",
        p(&m),
    ]));
    let said = ok(&ffwd(&["inspect", "--model", p(&m), "--text", p(&text), "--tail", "0.5", "--top", "3", "--quiet", "--out", p(&out)]));
    assert!(said.contains("block 0 (dense FFN): 64 neurons"), "{said}");
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(doc["chars"].as_u64().unwrap() as usize, corpus.len() / 2);
    assert_eq!(doc["blocks"][0]["units"][0]["triggers"].as_array().unwrap().len(), 3);
    // a character outside the model's vocabulary is a one-line error
    std::fs::write(&text, "xyz{").unwrap();
    let e = fails(&ffwd(&["inspect", "--model", p(&m), "--text", p(&text), "--quiet", "--out", p(&out)]));
    assert!(e.contains("not in the model's vocabulary"), "{e}");
}

/// The Chromium binary, if installed (Debian package `chromium`).
fn chromium() -> Option<String> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success()))
        .map(|b| b.to_string())
}

#[test]
fn report_renders_in_a_headless_browser() {
    let Some(browser) = chromium() else {
        eprintln!("skipped: no chromium installed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, html, png_path) = (dir.path().join("run.json"), dir.path().join("r.html"), dir.path().join("shot.png"));
    ok(&ffwd(&["train", "--epochs", "3", "--quiet", "--metrics", p(&a)]));
    ok(&ffwd(&["report", p(&a), "--out", p(&html)]));
    let out = Command::new(&browser)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,900"])
        .arg(format!("--screenshot={}", p(&png_path)))
        .arg(format!("file://{}", p(&html)))
        .output()
        .unwrap();
    assert!(png_path.exists(), "no screenshot: {}", String::from_utf8_lossy(&out.stderr));
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png_path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = info.color_type.samples();
    let pixels = &buf[..info.buffer_size()];
    let non_white = pixels.chunks(px).filter(|c| c[..3].iter().any(|&v| v < 200)).count();
    let coloured = pixels.chunks(px).filter(|c| c[..3].iter().max().unwrap() - c[..3].iter().min().unwrap() > 60).count();
    let total = pixels.len() / px;
    assert!(non_white > total / 200, "the page looks blank: {non_white} of {total} pixels are not white");
    assert!(coloured > 100, "no coloured chart lines: {coloured} coloured pixels");
}

#[test]
fn convert_quantize_moefy_lowrank_prune_and_their_errors() {
    let dir = tempfile::tempdir().unwrap();
    let f = |n: &str| dir.path().join(n);
    // a dense ReLU classifier on digits
    ok(&ffwd(&["train", "-q", "--layer", "dense", "--width", "64", "--activation", "relu", "--epochs", "15", "--save", p(&f("d.safetensors"))]));
    let dense = ok(&ffwd(&["eval", "--model", p(&f("d.safetensors"))]));
    // quantize: every other command reads the result
    let out = ok(&ffwd(&["convert", "quantize", "--model", p(&f("d.safetensors")), "--out", p(&f("q.safetensors")), "--format", "q4_0"]));
    assert!(out.contains("as q4_0") && out.contains("smaller"), "{out}");
    let e = ok(&ffwd(&["eval", "--model", p(&f("q.safetensors"))]));
    assert!(e.contains("test accuracy"), "{e}");
    let b = ok(&ffwd(&["bench", "--model", p(&f("q.safetensors")), "--json", "--budget-ms", "20", "--batch", "16"]));
    let v: serde_json::Value = serde_json::from_str(b.trim()).unwrap();
    assert_eq!(v["weights"], "q4_0", "{v}");
    let row = vec!["0.5"; 64].join(",");
    assert_eq!(ok(&ffwd_stdin(&["predict", "--model", p(&f("q.safetensors"))], &row)).lines().count(), 1);
    let err = fails(&ffwd(&["convert", "quantize", "--model", p(&f("q.safetensors")), "--out", p(&f("qq.safetensors"))]));
    assert!(err.contains("quantized already"), "{err}");
    let err = fails(&ffwd(&["train", "--resume", p(&f("q.safetensors")), "--epochs", "16"]));
    assert!(err.contains("quantized"), "{err}");
    let bad = ffwd(&["convert", "quantize", "--model", p(&f("d.safetensors")), "--out", p(&f("x.safetensors")), "--format", "q5_1"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("expected q8_0 or q4_0"));
    // moefy: with every expert the converted model scores exactly as the dense one
    let out = ok(&ffwd(&["convert", "moefy", "--model", p(&f("d.safetensors")), "--out", p(&f("m.safetensors")), "--expert-width", "8", "--sweep", "--quiet"]));
    let dense_acc = dense.split_whitespace().nth(2).unwrap();
    assert!(out.contains(&format!("K =   8 of 8 (100.0 %): test accuracy {dense_acc}")), "{out}\n{dense}");
    assert!(ok(&ffwd(&["eval", "--model", p(&f("m.safetensors"))])).contains("test accuracy"));
    // the moefied model quantizes too (its experts as blocks)
    ok(&ffwd(&["convert", "quantize", "--model", p(&f("m.safetensors")), "--out", p(&f("mq.safetensors")), "--experts-only"]));
    assert!(ok(&ffwd(&["eval", "--model", p(&f("mq.safetensors"))])).contains("test accuracy"));
    // mismatched inputs are one-line errors
    ok(&ffwd(&["train", "-q", "--layer", "dense", "--width", "64", "--activation", "gelu", "--epochs", "1", "--save", p(&f("g.safetensors"))]));
    let err = fails(&ffwd(&["convert", "moefy", "--model", p(&f("g.safetensors")), "--out", p(&f("x.safetensors")), "--quiet"]));
    assert!(err.contains("ReLU"), "{err}");
    let err = fails(&ffwd(&["convert", "moefy", "--model", p(&f("d.safetensors")), "--out", p(&f("x.safetensors")), "--expert-width", "24", "--quiet"]));
    assert!(err.contains("does not divide"), "{err}");
    // lowrank at full rank keeps the accuracy
    let out = ok(&ffwd(&["convert", "lowrank", "--model", p(&f("d.safetensors")), "--out", p(&f("l.safetensors")), "--rank", "64"]));
    assert!(out.contains(&format!("-> {dense_acc}")), "{out}");
    let err = fails(&ffwd(&["convert", "lowrank", "--model", p(&f("m.safetensors")), "--out", p(&f("x.safetensors")), "--rank", "4"]));
    assert!(err.contains("dense"), "{err}");
    // prune-experts: keeping every expert is the identity; a dense model is refused
    ok(&ffwd(&["train", "-q", "--layer", "moe", "--experts", "4", "--expert-width", "8", "--epochs", "5", "--save", p(&f("moe.safetensors"))]));
    let moe_acc = ok(&ffwd(&["eval", "--model", p(&f("moe.safetensors"))])).split_whitespace().nth(2).unwrap().to_string();
    let out = ok(&ffwd(&["convert", "prune-experts", "--model", p(&f("moe.safetensors")), "--out", p(&f("p.safetensors")), "--keep", "4"]));
    assert!(out.contains(&format!("{moe_acc} -> {moe_acc}")), "{out}");
    let out = ok(&ffwd(&["convert", "prune-experts", "--model", p(&f("moe.safetensors")), "--out", p(&f("p.safetensors")), "--keep", "2"]));
    assert!(out.contains("kept experts"), "{out}");
    let err = fails(&ffwd(&["convert", "prune-experts", "--model", p(&f("d.safetensors")), "--out", p(&f("x.safetensors")), "--keep", "2"]));
    assert!(err.contains("prunes moe"), "{err}");
    let err = fails(&ffwd(&["convert", "prune-experts", "--model", p(&f("moe.safetensors")), "--out", p(&f("x.safetensors")), "--keep", "9"]));
    assert!(err.contains("1..=4"), "{err}");
    // fastfeedforward import
    let state = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ffwd/tests/fixtures/fff_d3_state.safetensors");
    ok(&ffwd(&["convert", "fastfeedforward", "--state", p(&state), "--out", p(&f("fff.safetensors"))]));
    assert_eq!(Classifier::load(&f("fff.safetensors")).unwrap().config().layer.kind(), "fff");
    assert!(!f("x.safetensors").exists(), "failed conversions write nothing");
}
