//! `ffwd train`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use ffwd::config::{Algo, LayerKind, LayerShape, TrainConfig};
use ffwd::core::Activation;
use ffwd::data::DataSpec;
use ffwd::kernels::pkm::PkmScoring;
use ffwd::models::Classifier;
use ffwd::optim::{Optimizer, OptimizerKind};
use ffwd::train::forward_forward::{train_ff, LabelInput, Negatives};
use ffwd::train::{load_run, new_optimizer, save_run, train_from, EpochReport, Progress, TrainState};

/// Options of `ffwd train`. Flags override the values of `--config`.
#[derive(Args, Debug, Default, Clone, PartialEq)]
pub struct TrainArgs {
    /// Continue the run saved in this checkpoint by `--save` (weights, optimizer state, step,
    /// configuration; the data is read again from the run's data spec). Only --epochs, --save,
    /// --save-every, --metrics, --threads and --quiet may be given with it.
    #[arg(long, value_name = "PATH")]
    resume: Option<PathBuf>,
    /// TOML run configuration (see `configs/`); flags below override its values.
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// Data: `digits` (embedded, default), `idx:DIR` (MNIST-format files) or `csv:FILE`.
    #[arg(long, value_name = "SPEC")]
    data: Option<String>,
    /// Fraction of a CSV file held out as the test set [default: 0.2].
    #[arg(long)]
    holdout: Option<f32>,
    /// Which CSV column holds the label: first or last [default: first].
    #[arg(long, value_parser = super::eval::parse_label)]
    csv_label: Option<ffwd::data::csv::LabelColumn>,
    /// Training algorithm: bp (backpropagation) or ff (Forward-Forward; dense ReLU MLP with
    /// the widths of --ff-layers; --epochs, --batch, --lr, --seed apply to it) [default: bp].
    #[arg(long)]
    algo: Option<Algo>,
    /// Forward-Forward hidden widths, comma separated [default: 1000,1000,1000].
    #[arg(long, value_name = "W,W,...", value_delimiter = ',')]
    ff_layers: Option<Vec<usize>>,
    /// Forward-Forward negatives: hard (from the model's own prediction) or random [default: hard].
    #[arg(long, value_parser = parse_negatives)]
    ff_negatives: Option<Negatives>,
    /// Collaborative Forward-Forward (each layer's probability includes the others' goodness).
    #[arg(long)]
    ff_collaborative: bool,
    /// Forward-Forward label input: overlay (one-hot over the first features, the paper's
    /// MNIST setting) or concat (extra inputs after the features, paper section 3.4)
    /// [default: overlay].
    #[arg(long, value_parser = parse_label_input)]
    ff_label_input: Option<LabelInput>,
    /// Forward-Forward peer-normalisation strength [default: 0.03].
    #[arg(long)]
    ff_peer: Option<f32>,
    /// Forward-Forward goodness threshold θ [default: the layer width].
    #[arg(long)]
    ff_theta: Option<f32>,
    /// Evaluate the 10-pass goodness predictor every N epochs (and at the end) [default: 10].
    #[arg(long, default_value_t = 10)]
    ff_goodness_every: usize,
    /// Layer between the input and the softmax: dense, glu (gated: --activation silu = SwiGLU,
    /// gelu = GEGLU, relu = ReGLU), lowrank (U·V factors, --rank), blockdense and blockshuffle (block-structured maps, --rank, --blocks), deq (deep equilibrium: the fixed point of one block, --deq-*), fff, ufff, moe, smoe or pkm
    /// [default: dense].
    #[arg(long)]
    layer: Option<LayerKind>,
    /// Hidden width: dense, glu and deq units; fff total leaf width 2^depth·leaf; ufff neurons 2^(depth+1)−1;
    /// moe/smoe experts·expert_width; pkm memory values n_keys².
    #[arg(long)]
    width: Option<usize>,
    /// Tree depth: fff router levels (2^depth leaves); ufff depth D (D+1 neurons per path).
    #[arg(long)]
    depth: Option<usize>,
    /// ufff parallel trees K (UltraFastBERT's KxD configurations) [default: 1].
    #[arg(long)]
    trees: Option<usize>,
    /// lowrank rank r of both maps [default: 16]; blockdense rank r, blockshuffle middle width m
    /// [default: a quarter of each map's smaller side / the smaller side].
    #[arg(long)]
    rank: Option<usize>,
    /// blockdense/blockshuffle blocks nb [default: 4 / 2].
    #[arg(long)]
    blocks: Option<usize>,
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
    /// moe/smoe number of experts [default: 16].
    #[arg(long)]
    experts: Option<usize>,
    /// moe/smoe hidden units per expert [default: 8].
    #[arg(long)]
    expert_width: Option<usize>,
    /// moe/smoe experts per token; pkm values read per head [default: 2 for moe/smoe, 8 for pkm].
    #[arg(long)]
    top_k: Option<usize>,
    /// moe: do not renormalise the top-k gates (Switch style: gate = softmax probability).
    #[arg(long)]
    no_renormalize: bool,
    /// moe Switch load-balancing loss α [default: 0.01].
    #[arg(long)]
    balance: Option<f32>,
    /// moe router z-loss coefficient [default: 0.001].
    #[arg(long)]
    z_loss: Option<f32>,
    /// moe capacity factor; slots beyond ⌈tokens·k/E·factor⌉ per expert are dropped (0 = off).
    #[arg(long)]
    capacity_factor: Option<f32>,
    /// smoe entropy regularisation γ on the batch-mean router distribution [default: 0.001].
    #[arg(long)]
    entropy: Option<f32>,
    /// smoe expert dropout δ before the top-k [default: 0].
    #[arg(long)]
    expert_dropout: Option<f32>,
    /// pkm sub-keys per half n (n² memory values) [default: 16].
    #[arg(long)]
    n_keys: Option<usize>,
    /// pkm query heads [default: 2].
    #[arg(long)]
    heads: Option<usize>,
    /// deq equilibrium state size [default: 64].
    #[arg(long)]
    deq_state: Option<usize>,
    /// deq fixed-point solver: anderson, broyden or picard [default: anderson].
    #[arg(long, value_parser = parse_solver)]
    deq_solver: Option<ffwd::core::fixed_point::Solver>,
    /// deq solver iteration cap [default: 30].
    #[arg(long)]
    deq_max_iter: Option<usize>,
    /// deq solver tolerance on the relative residual [default: 1e-4].
    #[arg(long)]
    deq_tol: Option<f32>,
    /// pkm query width per head (even) [default: 32].
    #[arg(long)]
    key_dim: Option<usize>,
    /// pkm scoring of the selected values: relu (Csordás) or softmax (Lample) [default: relu].
    #[arg(long, value_parser = parse_scoring)]
    scoring: Option<PkmScoring>,
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
    /// Gradient noise η: Gaussian noise of variance η / (1 + step)^γ added to the gradients
    /// before clipping (Neelakantan et al. 2015) [default: 0 = off].
    #[arg(long, value_name = "ETA")]
    grad_noise: Option<f32>,
    /// Gradient noise decay γ [default: 0.55].
    #[arg(long, value_name = "GAMMA")]
    grad_noise_gamma: Option<f32>,
    /// Seed of initialisation, shuffling and region leak [default: 0].
    #[arg(long)]
    seed: Option<u64>,
    /// Worker threads (0 = all cores). Same seed and thread count give the same numbers.
    #[arg(long)]
    threads: Option<usize>,
    /// Save the trained model to this `.safetensors` file (with the optimizer and run state,
    /// so that --resume can continue it).
    #[arg(long, value_name = "PATH")]
    save: Option<String>,
    /// Also save to --save every N steps (atomically: a kill leaves the previous complete
    /// checkpoint) [default: 0 = only at the end].
    #[arg(long, value_name = "N")]
    save_every: Option<usize>,
    /// Write metrics (accuracies, time, parameters, neurons per inference) as JSON here.
    #[arg(long, value_name = "PATH")]
    metrics: Option<String>,
    /// Print only the final summary (no progress bar or per-epoch lines).
    #[arg(long, short)]
    quiet: bool,
}

/// A library message about an option, with the option named as its flag
/// (`top_k` → `--top-k`).
pub(crate) fn flag_names(msg: &str) -> String {
    let mut out = msg.to_string();
    for key in ["expert_width", "dense_layers", "top_k", "experts", "depth", "trees", "rank", "blocks", "leaf", "width", "activation"] {
        if let Some(rest) = out.strip_prefix(&format!("config: {key} ")) {
            out = format!("--{} {rest}", key.replace('_', "-"));
            break;
        }
    }
    out
}

fn parse_scoring(s: &str) -> Result<PkmScoring, String> {
    match s {
        "relu" => Ok(PkmScoring::Relu),
        "softmax" => Ok(PkmScoring::Softmax),
        _ => Err(format!("unknown scoring `{s}` (relu, softmax)")),
    }
}

fn parse_solver(s: &str) -> Result<ffwd::core::fixed_point::Solver, String> {
    use ffwd::core::fixed_point::Solver;
    match s {
        "anderson" => Ok(Solver::Anderson),
        "broyden" => Ok(Solver::Broyden),
        "picard" => Ok(Solver::Picard),
        _ => Err(format!("unknown solver `{s}` (anderson, broyden, picard)")),
    }
}

pub(crate) fn parse_activation(s: &str) -> Result<Activation, String> {
    Activation::parse(s).ok_or_else(|| format!("unknown activation `{s}` (relu, gelu, silu)"))
}

fn parse_label_input(s: &str) -> Result<LabelInput, String> {
    match s {
        "overlay" => Ok(LabelInput::Overlay),
        "concat" => Ok(LabelInput::Concat),
        _ => Err(format!("unknown label input `{s}` (overlay, concat)")),
    }
}

fn parse_negatives(s: &str) -> Result<Negatives, String> {
    match s {
        "hard" => Ok(Negatives::Hard),
        "random" => Ok(Negatives::Random),
        _ => Err(format!("unknown negatives `{s}` (hard, random)")),
    }
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
    set!(
        data,
        holdout,
        csv_label,
        algo,
        layer,
        epochs,
        batch,
        lr,
        warmup,
        optimizer,
        weight_decay,
        clip,
        seed,
        input_dropout,
        threads,
        grad_noise,
        grad_noise_gamma
    );
    // Forward-Forward keeps its own schedule in [ff]; the generic flags override it when given
    if let Some(v) = a.epochs {
        c.ff.epochs = v;
    }
    if let Some(v) = a.batch {
        c.ff.batch = v;
    }
    if let Some(v) = a.lr {
        c.ff.lr = v;
    }
    if let Some(v) = a.seed {
        c.ff.seed = v;
    }
    if let Some(v) = a.ff_layers.clone() {
        c.ff.layers = v;
    }
    if let Some(v) = a.ff_negatives {
        c.ff.negatives = v;
    }
    if a.ff_collaborative {
        c.ff.collaborative = true;
    }
    if let Some(v) = a.ff_label_input {
        c.ff.label_input = v;
    }
    if let Some(v) = a.ff_peer {
        c.ff.peer = v;
    }
    if a.ff_theta.is_some() {
        c.ff.theta = a.ff_theta;
    }
    if let Some(v) = a.save.clone() {
        c.save = Some(v);
    }
    if let Some(v) = a.metrics.clone() {
        c.metrics = Some(v);
    }
    if let Some(v) = a.save_every {
        c.save_every = v;
    }
    if a.no_renormalize {
        c.moe.renormalize = false;
    }
    if let Some(v) = a.balance {
        c.moe.balance = v;
    }
    if let Some(v) = a.z_loss {
        c.moe.z_loss = v;
    }
    if let Some(v) = a.capacity_factor {
        c.moe.capacity_factor = v;
    }
    if let Some(v) = a.entropy {
        c.smoe.entropy = v;
    }
    if let Some(v) = a.expert_dropout {
        c.smoe.expert_dropout = v;
    }
    if let Some(v) = a.n_keys {
        c.pkm.n_keys = v;
    }
    if let Some(v) = a.heads {
        c.pkm.heads = v;
    }
    if let Some(v) = a.key_dim {
        c.pkm.key_dim = v;
    }
    if let Some(v) = a.scoring {
        c.pkm.scoring = v;
    }
    // the shorthands that depend on the selected layer: the library maps them
    let shape = LayerShape {
        width: a.width,
        depth: a.depth,
        trees: a.trees,
        rank: a.rank,
        blocks: a.blocks,
        leaf: a.leaf,
        experts: a.experts,
        expert_width: a.expert_width,
        top_k: a.top_k,
        activation: a.activation,
        dense_layers: a.dense_layers,
    };
    c.apply_shape(&shape).map_err(|e| anyhow::anyhow!("{}", flag_names(&e.to_string())))?;
    if let Some(v) = a.hardening {
        c.fff.hardening = v;
    }
    if let Some(v) = a.deq_state {
        c.deq.state = v;
    }
    if let Some(v) = a.deq_solver {
        c.deq.solver.solver = v;
    }
    if let Some(v) = a.deq_max_iter {
        c.deq.solver.max_iter = v;
    }
    if let Some(v) = a.deq_tol {
        c.deq.solver.tol = v;
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

struct Bar<'a> {
    pb: ProgressBar,
    quiet: bool,
    /// Where and what to save at `--save-every` points.
    save: Option<(&'a str, &'a TrainConfig)>,
}

impl Progress for Bar<'_> {
    fn checkpoint(&mut self, model: &Classifier, opt: &dyn Optimizer, state: &TrainState) -> ffwd::Result<()> {
        if let Some((path, cfg)) = self.save {
            save_run(path.as_ref(), model, opt, cfg.optimizer, state, cfg)?;
        }
        Ok(())
    }

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
        let mut line = format!(
            "epoch {:>3}  loss {:.4}  aux {:.4}  train(running) {:.4}  test {:.4}  lr {:.2e}  {:.1}s",
            r.epoch, r.train_loss, r.aux_loss, r.train_accuracy_soft, r.test_accuracy, r.lr, r.seconds
        );
        if let Some(load) = &r.expert_load {
            // load relative to uniform: 1.00 everywhere is perfect balance
            let e = load.len() as f32;
            let (lo, hi) = load.iter().fold((f32::MAX, 0.0f32), |(a, b), &v| (a.min(v * e), b.max(v * e)));
            line += &format!("  expert load {lo:.2}–{hi:.2}× uniform");
        }
        if let Some(s) = &r.fixed_point {
            line += &format!("  deq iterations fwd {:.1} bwd {:.1}", s.forward_iterations, s.backward_iterations);
            if s.unconverged > 0 {
                line += &format!(
                    "\nwarning: {} of {} steps stopped a fixed-point solve at its iteration cap (largest residual: forward {:.1e}, backward {:.1e}); their gradients are approximate — raise [deq.solver] max_iter or lower the learning rate",
                    s.unconverged, s.steps, s.forward_residual, s.backward_residual
                );
            }
        }
        if self.pb.is_hidden() {
            eprintln!("{line}");
        } else {
            self.pb.println(line);
        }
    }
}

/// The flags that may accompany `--resume` (they do not change what the run computes).
fn resume_flags_only(a: &TrainArgs) -> bool {
    let allowed = TrainArgs {
        resume: a.resume.clone(),
        epochs: a.epochs,
        save: a.save.clone(),
        save_every: a.save_every,
        metrics: a.metrics.clone(),
        threads: a.threads,
        quiet: a.quiet,
        ff_goodness_every: a.ff_goodness_every,
        ..Default::default()
    };
    *a == allowed
}

pub fn run(mut a: TrainArgs) -> anyhow::Result<()> {
    // data parallel: the ranks after the first train silently and write nothing
    let primary = super::parallel::primary();
    a.quiet |= !primary;
    // a resumed run keeps its configuration, model, optimizer and step
    let (cfg, resumed) = match &a.resume {
        Some(path) => {
            anyhow::ensure!(
                resume_flags_only(&a),
                "--resume continues a run as configured: only --epochs, --save, --save-every, --metrics, --threads and --quiet may be given with it"
            );
            let run = load_run::<TrainConfig>(path, |c| new_optimizer(&c.train_options()))?;
            let mut cfg = run.config.clone();
            cfg.epochs = a.epochs.unwrap_or(cfg.epochs);
            cfg.save = a.save.clone().or(cfg.save);
            cfg.save_every = a.save_every.unwrap_or(cfg.save_every);
            cfg.metrics = a.metrics.clone().or(cfg.metrics);
            cfg.threads = a.threads.unwrap_or(cfg.threads);
            (cfg, Some(run))
        }
        None => (resolve(&a)?, None),
    };
    let threads = super::init_threads(cfg.threads)?;
    anyhow::ensure!(cfg.save_every == 0 || cfg.save.is_some(), "--save-every needs --save (where to write the checkpoints)");
    let mut cfg = cfg;
    if !primary {
        (cfg.save, cfg.metrics) = (None, None);
    }
    let cfg = cfg;
    let spec: DataSpec = cfg.data.parse()?;
    let split = spec.load(cfg.holdout, cfg.seed, cfg.csv_label)?;
    if cfg.algo == Algo::Ff {
        anyhow::ensure!(ffwd::train::distributed::group().is_none(), "Forward-Forward training is not data-parallel: run it in one process");
        return run_ff(&a, &cfg, &split, threads);
    }
    let opts = cfg.train_options();
    let (mut model, mut state, mut opt) = match resumed {
        Some(run) => (run.model, run.state, run.optimizer),
        None => (ffwd::spec::classifier(&cfg, &split.train)?, TrainState::default(), new_optimizer(&opts)),
    };
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
    let steps = split.train.len().div_ceil(opts.batch.min(split.train.len()).max(1)) * opts.epochs;
    let pb = if a.quiet { ProgressBar::hidden() } else { ProgressBar::new(steps as u64) };
    pb.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps  {msg}  ETA {eta}").expect("static template").progress_chars("=> "),
    );
    pb.set_position(state.step as u64);
    let mut bar = Bar { pb, quiet: a.quiet, save: cfg.save.as_deref().map(|p| (p, &cfg)) };
    let report = train_from(&mut model, &split, &opts, opt.as_mut(), &mut state, &mut bar)?;
    bar.pb.finish_and_clear();
    super::parallel::finish(report.steps, report.train_seconds, &mut |f| model.visit_params_mut(f))?;
    if !primary {
        return Ok(());
    }
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
        save_run(path.as_ref(), &model, opt.as_ref(), cfg.optimizer, &state, &cfg)?;
        eprintln!("saved {path}");
    }
    if let Some(path) = &cfg.metrics {
        let metrics = json!({
            "command": std::env::args().collect::<Vec<_>>().join(" "),
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

fn run_ff(a: &TrainArgs, cfg: &TrainConfig, split: &ffwd::data::Split, threads: usize) -> anyhow::Result<()> {
    let mut net = ffwd::spec::ff_net(cfg, &split.train)?;
    let params = ffwd::train::forward_forward::FfNet::param_count(&cfg.ff, split.train.dim, split.train.n_classes).unwrap_or(0);
    if !a.quiet {
        eprintln!(
            "data {}: {} train / {} test | Forward-Forward {:?} ({params} params, negatives {:?}{}) | {threads} threads",
            cfg.data,
            split.train.len(),
            split.test.len(),
            cfg.ff.layers,
            cfg.ff.negatives,
            if cfg.ff.collaborative { ", collaborative" } else { "" }
        );
    }
    let pb = if a.quiet { ProgressBar::hidden() } else { ProgressBar::new(cfg.ff.epochs as u64) };
    pb.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} epochs  {msg}  ETA {eta}").expect("static template").progress_chars("=> "),
    );
    let quiet = a.quiet;
    let history = train_ff(&mut net, split, a.ff_goodness_every, &mut |e| {
        pb.inc(1);
        let layers: Vec<String> = e.layers.iter().map(|l| format!("{:.3}/{:.3}/{:.0}:{:.0}", l.loss, l.accuracy, l.pos_goodness, l.neg_goodness)).collect();
        let line = format!(
            "epoch {:>3}  layers loss/acc/G+:G- {}  head {:.4}  test softmax {:.4}{}  {:.1}s",
            e.epoch,
            layers.join(" "),
            e.head_loss,
            e.test_accuracy,
            e.test_accuracy_goodness.map(|g| format!(" goodness {g:.4}")).unwrap_or_default(),
            e.seconds
        );
        pb.set_message(format!("test {:.4}", e.test_accuracy));
        if !quiet {
            if pb.is_hidden() {
                eprintln!("{line}");
            } else {
                pb.println(line);
            }
        }
    })?;
    pb.finish_and_clear();
    let last = history.last().ok_or_else(|| anyhow::anyhow!("no epoch ran"))?;
    let train_seconds: f64 = history.iter().map(|e| e.seconds).sum();
    let (train_acc, _) = net.accuracy(&split.train, false)?;
    println!(
        "test accuracy {:.4} (softmax), {} (goodness)  train accuracy {:.4}  ({} epochs, {:.1}s training, {params} params)",
        last.test_accuracy,
        last.test_accuracy_goodness.map(|g| format!("{g:.4}")).unwrap_or("-".into()),
        train_acc,
        history.len(),
        train_seconds
    );
    if let Some(path) = &cfg.save {
        net.save(path.as_ref())?;
        eprintln!("saved {path}");
    }
    if let Some(path) = &cfg.metrics {
        let metrics = json!({
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "algo": "ff",
            "test_accuracy": last.test_accuracy,
            "test_accuracy_goodness": last.test_accuracy_goodness,
            "train_accuracy": train_acc,
            "epochs": history.len(),
            "train_seconds": train_seconds,
            "params": params,
            "neurons_per_inference": cfg.ff.layers.iter().sum::<usize>(),
            "layers": last.layers,
            "threads": threads,
            "config": cfg,
            "history": history,
        });
        ffwd::checkpoint::write_atomic(path.as_ref(), serde_json::to_string_pretty(&metrics)?.as_bytes()).with_context(|| "writing metrics")?;
    }
    Ok(())
}
