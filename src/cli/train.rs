//! `ffwd train`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use ffwd::checkpoint::save_classifier;
use ffwd::config::{LayerKind, TrainConfig};
use ffwd::core::Activation;
use ffwd::data::DataSpec;
use ffwd::models::{Classifier, ModelConfig};
use ffwd::optim::OptimizerKind;
use ffwd::train::{train, EpochReport, Progress};

/// Options of `ffwd train`. Flags override the values of `--config`.
#[derive(Args, Debug, Default)]
pub struct TrainArgs {
    /// TOML run configuration (see `configs/`); flags below override its values.
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// Data: `digits` (embedded, default), `idx:DIR` (MNIST-format files) or `csv:FILE`.
    #[arg(long, value_name = "SPEC")]
    data: Option<String>,
    /// Fraction of a CSV file held out as the test set [default: 0.2].
    #[arg(long)]
    holdout: Option<f32>,
    /// Layer between the input and the softmax: dense, fff or ufff [default: dense].
    #[arg(long)]
    layer: Option<LayerKind>,
    /// Hidden width: dense units; fff total leaf width 2^depth·leaf; ufff neurons 2^(depth+1)−1.
    #[arg(long)]
    width: Option<usize>,
    /// Tree depth: fff router levels (2^depth leaves); ufff depth D (D+1 neurons per path).
    #[arg(long)]
    depth: Option<usize>,
    /// fff leaf width ℓ.
    #[arg(long)]
    leaf: Option<usize>,
    /// Number of Linear maps of the dense layer (2 = classic FFN, 3 = three-layer FFN).
    #[arg(long, value_name = "N")]
    dense_layers: Option<usize>,
    /// Hidden activation: relu, gelu (exact) or silu.
    #[arg(long, value_parser = parse_activation)]
    activation: Option<Activation>,
    /// fff hardening weight h on the mean node entropy [default: 3].
    #[arg(long)]
    hardening: Option<f32>,
    /// fff region-leak probability during training [default: 0].
    #[arg(long)]
    region_leak: Option<f32>,
    /// fff dropout on the leaves' hidden units during training [default: 0].
    #[arg(long)]
    dropout: Option<f32>,
    /// fff leaf load-balancing weight α (0 = off).
    #[arg(long)]
    load_balance: Option<f32>,
    /// fff master-leaf width (0 = off; the paper's code uses 8).
    #[arg(long)]
    master_leaf: Option<usize>,
    /// Training epochs [default: 100].
    #[arg(long)]
    epochs: Option<usize>,
    /// Minibatch size [default: 32].
    #[arg(long)]
    batch: Option<usize>,
    /// Peak learning rate (warmup, then cosine decay) [default: 0.002].
    #[arg(long)]
    lr: Option<f32>,
    /// Warmup steps [default: 100].
    #[arg(long)]
    warmup: Option<usize>,
    /// Optimizer: adamw or sgd (with --momentum) [default: adamw].
    #[arg(long, value_parser = parse_optimizer)]
    optimizer: Option<OptimizerKind>,
    /// Decoupled weight decay of weights, not biases [default: 0.1].
    #[arg(long)]
    weight_decay: Option<f32>,
    /// Clip the global gradient norm to this value (0 = off).
    #[arg(long)]
    clip: Option<f32>,
    /// Inverted dropout on the input features during training, any layer [default: 0].
    #[arg(long)]
    input_dropout: Option<f32>,
    /// Seed of initialisation, shuffling and region leak [default: 0].
    #[arg(long)]
    seed: Option<u64>,
    /// Worker threads (0 = all cores). Same seed and thread count give the same numbers.
    #[arg(long)]
    threads: Option<usize>,
    /// Save the trained model to this `.safetensors` file.
    #[arg(long, value_name = "PATH")]
    save: Option<String>,
    /// Write metrics (accuracies, time, parameters, neurons per inference) as JSON here.
    #[arg(long, value_name = "PATH")]
    metrics: Option<String>,
    /// Print only the final summary (no progress bar or per-epoch lines).
    #[arg(long, short)]
    quiet: bool,
}

fn parse_activation(s: &str) -> Result<Activation, String> {
    Activation::parse(s).ok_or_else(|| format!("unknown activation `{s}` (relu, gelu, silu)"))
}

fn parse_optimizer(s: &str) -> Result<OptimizerKind, String> {
    match s {
        "adamw" => Ok(OptimizerKind::Adamw),
        "sgd" => Ok(OptimizerKind::Sgd),
        _ => Err(format!("unknown optimizer `{s}` (adamw, sgd)")),
    }
}

/// Applies the flags on top of the config file (or the defaults).
fn resolve(a: &TrainArgs) -> anyhow::Result<TrainConfig> {
    let mut c = match &a.config {
        Some(p) => TrainConfig::from_toml_file(p)?,
        None => TrainConfig::default(),
    };
    macro_rules! set {
        ($($field:ident),*) => { $( if let Some(v) = a.$field.clone() { c.$field = v; } )* };
    }
    set!(data, holdout, layer, epochs, batch, lr, warmup, optimizer, weight_decay, clip, seed, input_dropout, threads);
    if let Some(v) = a.save.clone() {
        c.save = Some(v);
    }
    if let Some(v) = a.metrics.clone() {
        c.metrics = Some(v);
    }
    if let Some(d) = a.depth {
        match c.layer {
            LayerKind::Fff => c.fff.depth = d,
            LayerKind::Ufff => c.ufff.depth = d,
            LayerKind::Dense => anyhow::bail!("--depth applies to --layer fff or ufff, not dense"),
        }
    }
    if let Some(l) = a.leaf {
        c.fff.leaf = l;
    }
    if let Some(w) = a.width {
        c.set_width(w)?;
    }
    if let Some(n) = a.dense_layers {
        c.dense.layers = n;
    }
    if let Some(act) = a.activation {
        match c.layer {
            LayerKind::Dense => c.dense.activation = act,
            LayerKind::Fff => c.fff.activation = act,
            LayerKind::Ufff => c.ufff.activation = act,
        }
    }
    if let Some(v) = a.hardening {
        c.fff.hardening = v;
    }
    if let Some(v) = a.region_leak {
        c.fff.region_leak = v;
    }
    if let Some(v) = a.dropout {
        c.fff.dropout = v;
    }
    if let Some(v) = a.load_balance {
        c.fff.load_balance = v;
    }
    if let Some(v) = a.master_leaf {
        c.fff.master_leaf = v;
    }
    Ok(c)
}

struct Bar {
    pb: ProgressBar,
    quiet: bool,
}

impl Progress for Bar {
    fn step(&mut self, epoch: usize, step: usize, steps: usize, loss: f32, acc: f32) {
        self.pb.inc(1);
        if step.is_multiple_of(16) || step == steps {
            self.pb.set_message(format!("epoch {epoch} loss {loss:.4} acc {acc:.4}"));
        }
    }

    fn epoch(&mut self, r: &EpochReport) {
        if self.quiet {
            return;
        }
        let line = format!(
            "epoch {:>3}  loss {:.4}  aux {:.4}  train(running) {:.4}  test {:.4}  lr {:.2e}  {:.1}s",
            r.epoch, r.train_loss, r.aux_loss, r.train_accuracy_soft, r.test_accuracy, r.lr, r.seconds
        );
        if self.pb.is_hidden() {
            eprintln!("{line}");
        } else {
            self.pb.println(line);
        }
    }
}

pub fn run(a: TrainArgs) -> anyhow::Result<()> {
    let cfg = resolve(&a)?;
    let threads = super::init_threads(cfg.threads)?;
    let spec: DataSpec = cfg.data.parse()?;
    let split = spec.load(cfg.holdout, cfg.seed, cfg.csv_label)?;
    let model_cfg = ModelConfig { in_features: split.train.dim, n_classes: split.train.n_classes, layer: cfg.layer_config() };
    let mut model = Classifier::new(model_cfg, cfg.seed)?;
    if !a.quiet {
        eprintln!(
            "data {}: {} train / {} test, {} features, {} classes | layer {} ({} params, {} neurons per inference) | {} threads",
            cfg.data,
            split.train.len(),
            split.test.len(),
            split.train.dim,
            split.train.n_classes,
            model.layer().kind(),
            model.param_count(),
            model.layer().neurons_per_inference(),
            threads
        );
    }
    let opts = cfg.train_options();
    let steps = split.train.len().div_ceil(opts.batch.min(split.train.len()).max(1)) * opts.epochs;
    let pb = if a.quiet { ProgressBar::hidden() } else { ProgressBar::new(steps as u64) };
    pb.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps  {msg}  ETA {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let mut bar = Bar { pb, quiet: a.quiet };
    let report = train(&mut model, &split, &opts, &mut bar)?;
    bar.pb.finish_and_clear();
    println!(
        "test accuracy {:.4}  train accuracy {:.4}  ({} epochs, {:.1}s training, {} params, {} neurons per inference)",
        report.test_accuracy,
        report.train_accuracy,
        opts.epochs,
        report.train_seconds,
        model.param_count(),
        model.layer().neurons_per_inference()
    );
    if let Some(path) = &cfg.save {
        save_classifier(&model, path.as_ref())?;
        eprintln!("saved {path}");
    }
    if let Some(path) = &cfg.metrics {
        let metrics = json!({
            "test_accuracy": report.test_accuracy,
            "train_accuracy": report.train_accuracy,
            "epochs": opts.epochs,
            "steps": report.steps,
            "train_seconds": report.train_seconds,
            "params": model.param_count(),
            "neurons_per_inference": model.layer().neurons_per_inference(),
            "layer": model.config().layer,
            "data": cfg.data,
            "train_samples": split.train.len(),
            "test_samples": split.test.len(),
            "threads": threads,
            "seed": cfg.seed,
            "config": cfg,
            "history": report.history,
        });
        let text = serde_json::to_string_pretty(&metrics)?;
        ffwd::checkpoint::write_atomic(path.as_ref(), text.as_bytes()).with_context(|| "writing metrics")?;
    }
    Ok(())
}
