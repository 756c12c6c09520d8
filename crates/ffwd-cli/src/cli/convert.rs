//! `ffwd convert`: a trained checkpoint in, a smaller or faster one out that every other
//! command reads. The conversions live in the library (`ffwd::convert`); this shell parses,
//! calls and prints.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use ffwd::checkpoint::{write_atomic, CheckpointReader, CLASSIFIER_FORMAT, CONVERTED_KEY, LM_FORMAT, TRAIN_KEY};
use ffwd::config::TrainConfig;
use ffwd::convert::moefy::{classifier_with_k, finetune_classifier, lm_set_k, moefy_classifier, moefy_lm, MoefyOptions, MoefyReport, Split};
use ffwd::convert::quantize::{converted, quantize_checkpoint};
use ffwd::convert::shrink::{LowRankReport, RankChoice};
use ffwd::core::quant::QFormat;
use ffwd::core::Activation;
use ffwd::data::DataSpec;
use ffwd::layers::MoefiedRouter;
use ffwd::models::Classifier;
use ffwd::optim::AdamW;
use ffwd::train::lm::{lm_checkpoint, LmCheckpoint};

/// Conversions of trained checkpoints.
#[derive(Subcommand, Debug)]
pub enum ConvertCommand {
    /// Store the weight matrices as ggml Q8_0 or Q4_0 blocks (biases, norms and short rows stay
    /// f32; optimizer state is dropped). Dense and ufff layers then run integer kernels, fff
    /// leaves and mixture experts are dequantized per leaf or expert, other layers run f32 on
    /// the dequantized weights.
    Quantize(QuantizeArgs),
    /// Split a dense ReLU FFN into experts (MoEfication): balanced k-means of its neurons, a
    /// router trained on calibration inputs, top-K experts at inference. Classifiers
    /// (--calib DATA) and LMs (calibrated on their training text).
    Moefy(MoefyArgs),
    /// Factor a dense FFN's maps by truncated SVD into the LowRank layer (classifiers, LMs).
    Lowrank(LowrankArgs),
    /// Drop a mixture's least-used experts by its router's choices on calibration data
    /// (moe, smoe and centroid-routed moefied classifiers).
    PruneExperts(PruneArgs),
    /// Import a state dict of the PyTorch package `fastfeedforward` (class FFF, saved with
    /// safetensors) as a classifier checkpoint.
    Fastfeedforward(FffArgs),
}

/// Options of `ffwd convert lowrank`.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("size").required(true).args(["rank", "energy"])))]
pub struct LowrankArgs {
    /// Checkpoint with dense two-map FFNs (a classifier or an LM).
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// Where to write the converted checkpoint.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
    /// Rank of both maps (clamped to each map's smaller side).
    #[arg(long)]
    rank: Option<usize>,
    /// Keep this fraction of each map's energy (squared singular values); the larger rank of
    /// the maps (and blocks) is used.
    #[arg(long)]
    energy: Option<f32>,
    /// Classifier: fine-tune for this many epochs afterwards (the run's recipe at a tenth of
    /// its learning rate).
    #[arg(long, default_value_t = 0)]
    finetune: usize,
    /// Classifier data to score (and fine-tune on) [default: the training run's].
    #[arg(long, value_name = "SPEC")]
    calib: Option<String>,
    /// LM: its training text [default: embedded tiny-shakespeare].
    #[arg(long, value_name = "FILE")]
    text: Option<PathBuf>,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

/// Options of `ffwd convert prune-experts`.
#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Mixture classifier checkpoint.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// Where to write the pruned checkpoint.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
    /// Experts to keep.
    #[arg(long)]
    keep: usize,
    /// Data whose training split decides which experts are used (and whose test split is
    /// scored) [default: the training run's].
    #[arg(long, value_name = "SPEC")]
    calib: Option<String>,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

/// Options of `ffwd convert fastfeedforward`.
#[derive(Args, Debug)]
pub struct FffArgs {
    /// The package's state dict (`safetensors.torch.save_file(model.state_dict(), path)`).
    #[arg(long, value_name = "PATH")]
    state: PathBuf,
    /// Where to write the classifier checkpoint.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
    /// The activation the model was built with (the package does not store it; its default
    /// is ReLU).
    #[arg(long, default_value = "relu", value_parser = super::train::parse_activation)]
    activation: Activation,
}

/// Options of `ffwd convert moefy`.
#[derive(Args, Debug)]
pub struct MoefyArgs {
    /// Checkpoint with dense two-map FFNs (a classifier or an LM).
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// Where to write the converted checkpoint.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
    /// Classifier calibration data (its training split calibrates, its test split is scored):
    /// `digits`, `idx:DIR` or `csv:FILE` [default: the training run's data].
    #[arg(long, value_name = "SPEC")]
    calib: Option<String>,
    /// LM: the text it was trained on [default: embedded tiny-shakespeare].
    #[arg(long, value_name = "FILE")]
    text: Option<PathBuf>,
    /// LM: calibration windows of the run's sequence length from the training text.
    #[arg(long, default_value_t = 64)]
    windows: usize,
    /// Neurons per expert (must divide the FFN width).
    #[arg(long, default_value_t = 32)]
    expert_width: usize,
    /// Experts run per input in the saved model [default: a quarter of the experts].
    #[arg(long, default_value_t = 0)]
    k: usize,
    /// Router: mlp (trained, the paper's) or centroid (expert centroids, nothing trained).
    #[arg(long, default_value = "mlp", value_parser = parse_router)]
    router: MoefiedRouter,
    /// Router training epochs.
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Cluster neurons by: coactivation (their activations on the calibration inputs) or
    /// weights (their input weight vectors).
    #[arg(long, default_value = "coactivation", value_parser = parse_split)]
    split: Split,
    /// Most calibration rows used.
    #[arg(long, default_value_t = 20_000)]
    max_rows: usize,
    /// Convert a GELU/SiLU FFN anyway (exact with every expert, approximate when skipping).
    #[arg(long)]
    approximate: bool,
    /// Seed of the clustering, shuffle and split.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Classifier: fine-tune the experts (router fixed) for this many epochs on the
    /// calibration data, with the original run's recipe at a tenth of its learning rate.
    #[arg(long, default_value_t = 0)]
    finetune: usize,
    /// Also score the model at 10, 20, 25, 30, 50 and 100 % of the experts.
    #[arg(long)]
    sweep: bool,
    /// Write the conversion report (and the sweep) here as JSON.
    #[arg(long, value_name = "PATH")]
    report: Option<PathBuf>,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn parse_split(s: &str) -> Result<Split, String> {
    match s {
        "coactivation" => Ok(Split::Coactivation),
        "weights" => Ok(Split::Weights),
        _ => Err(format!("unknown split `{s}` (coactivation, weights)")),
    }
}

fn parse_router(s: &str) -> Result<MoefiedRouter, String> {
    match s {
        "mlp" => Ok(MoefiedRouter::Mlp),
        "centroid" => Ok(MoefiedRouter::Centroid),
        _ => Err(format!("unknown router `{s}` (mlp, centroid)")),
    }
}

/// Options of `ffwd convert quantize`.
#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// Checkpoint to convert (classifier, LM, forecaster or Forward-Forward net).
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// Where to write the quantized checkpoint.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
    /// Block format: q8_0 (8.5 bits per weight) or q4_0 (4.5 bits per weight).
    #[arg(long, default_value = "q8_0", value_parser = parse_format)]
    format: QFormat,
    /// Mixture of Quantized Experts: quantize only the FFN/expert weights; routers,
    /// attention and embeddings stay f32.
    #[arg(long)]
    experts_only: bool,
}

fn parse_format(s: &str) -> Result<QFormat, String> {
    QFormat::parse(s).map_err(|e| e.to_string())
}

/// Runs a conversion.
pub fn run(c: ConvertCommand) -> anyhow::Result<()> {
    match c {
        ConvertCommand::Quantize(a) => quantize(a),
        ConvertCommand::Moefy(a) => moefy(a),
        ConvertCommand::Lowrank(a) => lowrank(a),
        ConvertCommand::PruneExperts(a) => prune(a),
        ConvertCommand::Fastfeedforward(a) => fastfeedforward(a),
    }
}

/// Writes a converted classifier with its conversion history.
fn save_classifier(model: &Classifier, history: &[serde_json::Value], out: &std::path::Path) -> anyhow::Result<()> {
    let mut w = model.checkpoint()?;
    w.json(CONVERTED_KEY, history)?;
    Ok(w.write(out)?)
}

/// Writes a converted LM with its vocabulary, run options and state, a fresh optimizer (the
/// old moments do not fit the new parameters) and its conversion history.
fn save_lm(ck: &LmCheckpoint, history: &[serde_json::Value], out: &std::path::Path) -> anyhow::Result<()> {
    let fresh = AdamW::new(ck.options.weight_decay);
    let mut w = lm_checkpoint(&ck.lm, &ck.tokenizer, &ck.options, &ck.state, &fresh)?;
    w.json(CONVERTED_KEY, history)?;
    Ok(w.write(out)?)
}

/// A classifier's data split: `--calib` or the training run's data options.
fn classifier_split(ck: &CheckpointReader, calib: Option<&str>) -> anyhow::Result<(ffwd::data::Split, TrainConfig)> {
    let base = ck.json_opt::<TrainConfig>(TRAIN_KEY).ok().flatten().unwrap_or_default();
    let spec: DataSpec = calib.map_or_else(|| base.data.clone(), str::to_string).parse()?;
    Ok((spec.load(base.holdout, base.seed, base.csv_label)?, base))
}

fn lowrank(a: LowrankArgs) -> anyhow::Result<()> {
    super::init_threads(a.threads)?;
    let choice = match (a.rank, a.energy) {
        (Some(r), _) => RankChoice::Rank(r),
        (None, Some(f)) => RankChoice::Energy(f),
        (None, None) => anyhow::bail!("give --rank or --energy"),
    };
    let ck = CheckpointReader::open(&a.model)?;
    let mut history = converted(&ck)?;
    let print = |what: &str, r: &LowRankReport| {
        println!(
            "{what}: rank {}, energy kept {:.3} / {:.3}, relative error {:.3} / {:.3} (fc1 / fc2), params {} -> {}",
            r.rank, r.energy[0], r.energy[1], r.rel_error[0], r.rel_error[1], r.params[0], r.params[1]
        )
    };
    match ck.format() {
        f if f == CLASSIFIER_FORMAT => {
            let model = Classifier::from_checkpoint(&ck)?;
            let (split, base) = classifier_split(&ck, a.calib.as_deref())?;
            let (layer, report) = ffwd::convert::shrink::lowrank(model.layer(), choice)?;
            print("lowrank", &report);
            let mut out = Classifier::from_layer(layer);
            let (before, after) = (model.accuracy(&split.test)?, out.accuracy(&split.test)?);
            println!("test accuracy {before:.4} (dense) -> {after:.4}");
            if a.finetune > 0 {
                let tuned = finetune_classifier(&mut out, &split, &base, a.finetune)?;
                println!("fine-tuned for {} epochs: test accuracy {tuned:.4}", a.finetune);
            }
            history.push(serde_json::json!({"method": "lowrank", "report": report, "finetune_epochs": a.finetune}));
            save_classifier(&out, &history, &a.out)?;
        }
        f if f == LM_FORMAT => {
            anyhow::ensure!(a.finetune == 0, "--finetune: language models are fine-tuned with `ffwd lm train --resume` on the converted file");
            let mut lmck = LmCheckpoint::from_checkpoint(&ck)?;
            let text = super::lm::text_or_embedded(a.text.as_deref())?;
            let before = lmck.held_out_loss(&text, 20)?;
            let reports = ffwd::convert::shrink::lowrank_lm(&mut lmck.lm, choice)?;
            for (l, r) in reports.iter().enumerate() {
                print(&format!("block {l}"), r);
            }
            let after = lmck.held_out_loss(&text, 20)?;
            println!("held-out loss {before:.4} (dense) -> {after:.4}");
            history.push(serde_json::json!({"method": "lowrank", "reports": reports}));
            save_lm(&lmck, &history, &a.out)?;
        }
        other => anyhow::bail!("{}: lowrank converts classifier and lm checkpoints, this one is `{other}`", a.model.display()),
    }
    println!("wrote {}", a.out.display());
    Ok(())
}

fn prune(a: PruneArgs) -> anyhow::Result<()> {
    super::init_threads(a.threads)?;
    let ck = CheckpointReader::open(&a.model)?;
    ck.expect_format(CLASSIFIER_FORMAT)?;
    let mut history = converted(&ck)?;
    let model = Classifier::from_checkpoint(&ck)?;
    let (split, _) = classifier_split(&ck, a.calib.as_deref())?;
    let (pruned, report) = ffwd::convert::shrink::prune_experts(&model, &split.train, a.keep)?;
    let (before, after) = (model.accuracy(&split.test)?, pruned.accuracy(&split.test)?);
    println!(
        "kept experts {:?} ({:.1} % of the routed slots on {} calibration rows); test accuracy {before:.4} -> {after:.4}",
        report.kept,
        100.0 * report.kept_share,
        split.train.len()
    );
    history.push(serde_json::json!({"method": "prune-experts", "report": report}));
    save_classifier(&pruned, &history, &a.out)?;
    println!("wrote {}", a.out.display());
    Ok(())
}

fn fastfeedforward(a: FffArgs) -> anyhow::Result<()> {
    let fff = ffwd::convert::fastfeedforward::load_fff(&a.state, a.activation)?;
    let model = Classifier::from_layer(Box::new(fff));
    save_classifier(&model, &[serde_json::json!({"method": "fastfeedforward", "source": a.state.display().to_string()})], &a.out)?;
    let c = model.config();
    let depth = match &c.layer {
        ffwd::layers::LayerConfig::Fff(f) => f.depth,
        _ => 0,
    };
    println!("{}: fff {} -> {}, depth {depth}, wrote {}", a.state.display(), c.in_features, c.n_classes, a.out.display());
    Ok(())
}

/// Experts run at the sweep's fractions (10, 20, 25, 30, 50, 100 %).
fn sweep_ks(experts: usize) -> Vec<usize> {
    let mut ks: Vec<usize> = [0.1, 0.2, 0.25, 0.3, 0.5, 1.0].iter().map(|f| ((experts as f64 * f).round() as usize).clamp(1, experts)).collect();
    ks.dedup();
    ks
}

fn print_recall(r: &MoefyReport, what: &str) {
    let recall: Vec<String> = r.recall.iter().map(|x| format!("K={} {:.3} (oracle {:.3})", x.k, x.router, x.oracle)).collect();
    let bce = r.router_bce.map_or(String::new(), |(a, b)| format!(", router BCE {a:.4} -> {b:.4}"));
    println!(
        "{what}: {} experts x {} ({:?} split, cohesion {:.3}){bce}; activation-mass recall {}",
        r.experts,
        r.expert_width,
        r.split,
        r.cohesion,
        recall.join(", ")
    );
}

fn moefy(a: MoefyArgs) -> anyhow::Result<()> {
    super::init_threads(a.threads)?;
    let opts = MoefyOptions {
        expert_width: a.expert_width,
        k: a.k,
        router: a.router,
        epochs: a.epochs,
        max_rows: a.max_rows,
        approximate: a.approximate,
        seed: a.seed,
        split: a.split,
        ..Default::default()
    };
    let pb = if a.quiet { ProgressBar::hidden() } else { ProgressBar::new(0) };
    pb.set_style(ProgressStyle::with_template("{elapsed_precise} {msg:12} [{bar:30}] {pos}/{len}").expect("static template").progress_chars("=> "));
    let mut progress = |stage: &str, done: usize, total: usize| {
        pb.set_message(stage.to_string());
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    };
    let ck = CheckpointReader::open(&a.model)?;
    let mut history = converted(&ck)?;
    let mut sweep = Vec::new();
    let reports: Vec<MoefyReport>;
    match ck.format() {
        f if f == CLASSIFIER_FORMAT => {
            let model = Classifier::from_checkpoint(&ck)?;
            let (split, base) = classifier_split(&ck, a.calib.as_deref())?;
            let (mut converted_model, report) = moefy_classifier(&model, &split.train, &opts, &mut progress)?;
            pb.finish_and_clear();
            print_recall(&report, "moefied");
            if a.finetune > 0 {
                let before = converted_model.accuracy(&split.test)?;
                let after = finetune_classifier(&mut converted_model, &split, &base, a.finetune)?;
                println!("fine-tuned the experts for {} epochs: test accuracy {before:.4} -> {after:.4} at K = {}", a.finetune, report.k);
            }
            if a.sweep {
                let dense = model.accuracy(&split.test)?;
                println!("dense: test accuracy {dense:.4}");
                for k in sweep_ks(report.experts) {
                    let acc = classifier_with_k(&converted_model, k)?.accuracy(&split.test)?;
                    println!(
                        "  K = {k:>3} of {} ({:>5.1} %): test accuracy {acc:.4} ({:.2} % of dense)",
                        report.experts,
                        100.0 * k as f64 / report.experts as f64,
                        100.0 * acc / dense
                    );
                    sweep.push(serde_json::json!({"k": k, "experts": report.experts, "test_accuracy": acc, "dense_test_accuracy": dense}));
                }
            }
            history.push(serde_json::json!({"method": "moefy", "report": report, "finetune_epochs": a.finetune}));
            save_classifier(&converted_model, &history, &a.out)?;
            reports = vec![report];
        }
        f if f == LM_FORMAT => {
            let mut lmck = LmCheckpoint::from_checkpoint(&ck)?;
            let text = super::lm::text_or_embedded(a.text.as_deref())?;
            let dense = if a.sweep { Some(lmck.held_out_loss(&text, 20)?) } else { None };
            let tokens = lmck.tokenizer.encode(&text)?;
            let n_train = tokens.len() - (tokens.len() as f64 * lmck.options.val_fraction as f64) as usize;
            reports = moefy_lm(&mut lmck.lm, &tokens[..n_train], lmck.options.seq_len, a.windows, &opts, &mut progress)?;
            pb.finish_and_clear();
            for (l, r) in reports.iter().enumerate() {
                print_recall(r, &format!("block {l}"));
            }
            let k = reports[0].k;
            if let Some(dense) = dense {
                println!("dense: held-out loss {dense:.4}");
                for kk in sweep_ks(reports[0].experts) {
                    lm_set_k(&mut lmck.lm, kk)?;
                    let loss = lmck.held_out_loss(&text, 20)?;
                    println!(
                        "  K = {kk:>3} of {} ({:>5.1} %): held-out loss {loss:.4} ({:+.4})",
                        reports[0].experts,
                        100.0 * kk as f64 / reports[0].experts as f64,
                        loss - dense
                    );
                    sweep.push(serde_json::json!({"k": kk, "experts": reports[0].experts, "held_out_loss": loss, "dense_held_out_loss": dense}));
                }
                lm_set_k(&mut lmck.lm, k)?;
            }
            history.push(serde_json::json!({"method": "moefy", "reports": reports}));
            save_lm(&lmck, &history, &a.out)?;
        }
        other => anyhow::bail!("{}: moefy converts classifier and lm checkpoints, this one is `{other}`", a.model.display()),
    }
    if let Some(path) = &a.report {
        let doc = serde_json::json!({"model": a.model.display().to_string(), "reports": reports, "sweep": sweep});
        write_atomic(path, serde_json::to_string_pretty(&doc)?.as_bytes())?;
    }
    println!("wrote {} (K = {} of {} experts)", a.out.display(), reports[0].k, reports[0].experts);
    Ok(())
}

fn quantize(a: QuantizeArgs) -> anyhow::Result<()> {
    let ck = CheckpointReader::open(&a.model)?;
    let (bytes, report) = quantize_checkpoint(&ck, a.format, a.experts_only)?;
    write_atomic(&a.out, &bytes)?;
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    println!(
        "{}: {} tensors as {}{}, {} kept f32{}; model tensors {:.2} MiB -> {:.2} MiB ({:.1}x smaller); wrote {}",
        a.model.display(),
        report.quantized.len(),
        a.format.name(),
        if a.experts_only { " (experts only)" } else { "" },
        report.kept.len(),
        if report.dropped > 0 { format!(", {} optimizer tensors dropped", report.dropped) } else { String::new() },
        mib(report.bytes_before),
        mib(report.bytes_after),
        report.bytes_before as f64 / report.bytes_after.max(1) as f64,
        a.out.display()
    );
    Ok(())
}
