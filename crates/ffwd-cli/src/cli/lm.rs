//! `ffwd lm train` and `ffwd lm sample`: the character-level transformer language model.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use ffwd::core::Rng;
use ffwd::data::text::{read_text, tiny_shakespeare, CharTokenizer};
use ffwd::models::Lm;
use ffwd::optim::AdamW;
use ffwd::spec::{FfnKind, FfnShape};
use ffwd::train::lm::{save_lm_run, train_lm, LmCheckpoint, LmEval, LmProgress, LmRunConfig, LmTrainOptions, LmTrainState};

/// `ffwd lm …`.
#[derive(Subcommand, Debug)]
pub enum LmCommand {
    /// Train a character-level transformer LM (default text: the embedded tiny-shakespeare).
    Train(Box<LmTrainArgs>),
    /// Generate text from a trained LM (KV cache; FFN through its conditional inference kernel).
    Sample(LmSampleArgs),
    /// Held-out loss of a saved LM (converted ones too) on its run's validation split.
    Eval(LmEvalArgs),
}

/// Options of `ffwd lm eval`.
#[derive(Args, Debug)]
pub struct LmEvalArgs {
    /// LM checkpoint.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// The text the model was trained on (its last val_fraction is scored) [default: embedded tiny-shakespeare].
    #[arg(long, value_name = "FILE")]
    text: Option<PathBuf>,
    /// Batches of held-out windows (the run's batch size and sequence length).
    #[arg(long, default_value_t = 20)]
    batches: usize,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Score with the FFN blocks on bf16 weight matrices (as `ffwd lm sample --bf16`).
    #[arg(long)]
    bf16: bool,
}

/// Options of `ffwd lm train`.
#[derive(Args, Debug)]
pub struct LmTrainArgs {
    /// UTF-8 text to train on; its last --val-fraction is held out [default: embedded tiny-shakespeare].
    #[arg(long, value_name = "FILE")]
    text: Option<PathBuf>,
    /// TOML file with `[model]` (context, d_model, heads, layers, parallel, ffn) and `[train]` tables.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Continue the run saved in this checkpoint (model, AdamW moments, step, options, data order).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["config", "context", "d_model", "heads", "layers", "parallel", "ffn", "ffn_width", "depth", "trees", "rank", "blocks", "experts", "top_k", "balanced_hash", "first_dense", "guided", "reduce_flop", "seed", "seq_len"])]
    resume: Option<PathBuf>,
    /// Context length in characters [default: 128].
    #[arg(long)]
    context: Option<usize>,
    /// Model width [default: 192].
    #[arg(long)]
    d_model: Option<usize>,
    /// Attention heads [default: 6].
    #[arg(long)]
    heads: Option<usize>,
    /// Transformer blocks [default: 4].
    #[arg(long)]
    layers: Option<usize>,
    /// Parallel attention and FFN (PAF layout).
    #[arg(long)]
    parallel: bool,
    /// Feedforward block of every layer: dense, dense3 (three maps), swiglu, geglu, reglu (gated), lowrank, blockdense, blockshuffle, fff, ufff, moe, smoe,
    /// hash (routed by the input character), pkm or channelidle (RePaViT: BatchNorm before each map, GELU on a quarter of
    /// the channels, the rest linear and folded into one d × d map at inference).
    #[arg(long, value_parser = parse_ffn)]
    ffn: Option<FfnKind>,
    /// FFN hidden size: dense units; fff total leaf width; ufff neurons per tree
    /// (2^(depth+1)−1); moe/smoe/hash experts × expert width; pkm values [default: 4·d_model,
    /// 1023 for ufff].
    #[arg(long)]
    ffn_width: Option<usize>,
    /// fff/ufff depth [default: 3 for fff, 9 for ufff].
    #[arg(long)]
    depth: Option<usize>,
    /// ufff parallel trees (UltraFastBERT's KxD) [default: 1].
    #[arg(long)]
    trees: Option<usize>,
    /// lowrank and blockdense rank of both FFN maps [default: d_model / 4]; blockshuffle middle
    /// width [default: d_model].
    #[arg(long)]
    rank: Option<usize>,
    /// blockdense/blockshuffle blocks [default: 4 / 2].
    #[arg(long)]
    blocks: Option<usize>,
    /// moe/smoe/hash experts [default: 16].
    #[arg(long)]
    experts: Option<usize>,
    /// moe/smoe experts per token; pkm values per head [default: 2; 8 for pkm].
    #[arg(long)]
    top_k: Option<usize>,
    /// hash: balanced table from the training text's character frequencies (default: random hash).
    #[arg(long)]
    balanced_hash: bool,
    /// lowrank/blockdense/blockshuffle: self-guided training (Wei et al. 2024): each map runs
    /// α·W x + (1 − α)·structured(x) with a dense guide W started at the map's own matrix, α
    /// decaying 1 → 0 on a cosine over this share of the steps; the guides are dropped when
    /// α reaches 0 (`--guided` alone: 0.5).
    #[arg(long, value_name = "FRACTION", num_args = 0..=1, default_missing_value = "0.5")]
    guided: Option<f32>,
    /// With --guided: compute the dense branch only with probability α per forward.
    #[arg(long, requires = "guided")]
    reduce_flop: bool,
    /// Keep the first block's FFN dense (GELU, 4·d_model wide) whatever --ffn is, as the
    /// structured-FFN paper does.
    #[arg(long)]
    first_dense: bool,
    /// Optimizer steps [default: 3000].
    #[arg(long)]
    steps: Option<usize>,
    /// Sequences per micro-batch [default: 16].
    #[arg(long)]
    batch: Option<usize>,
    /// Micro-batches accumulated per step [default: 1].
    #[arg(long)]
    accum: Option<usize>,
    /// Training window length [default: the context].
    #[arg(long)]
    seq_len: Option<usize>,
    /// Peak learning rate (warmup, then cosine decay) [default: 0.001].
    #[arg(long)]
    lr: Option<f32>,
    /// Warmup steps [default: 100].
    #[arg(long)]
    warmup: Option<usize>,
    /// Final LR as a fraction of the peak [default: 0.1].
    #[arg(long)]
    min_lr_ratio: Option<f32>,
    /// AdamW weight decay [default: 0.1].
    #[arg(long)]
    weight_decay: Option<f32>,
    /// Global gradient-norm clip (0 = off) [default: 1].
    #[arg(long)]
    clip: Option<f32>,
    /// Gradient noise η: Gaussian noise of variance η / (1 + step)^γ added to the mean
    /// gradient before clipping (Neelakantan et al. 2015) [default: 0 = off].
    #[arg(long, value_name = "ETA")]
    grad_noise: Option<f32>,
    /// Gradient noise decay γ [default: 0.55].
    #[arg(long, value_name = "GAMMA")]
    grad_noise_gamma: Option<f32>,
    /// Operands of the training step's matrix products: f32, or bf16 (mixed precision:
    /// bfloat16 operands through AVX512_BF16 `vdpbf16ps` with f32 accumulation; f32 master
    /// weights, AdamW state, attention core, LayerNorm and evaluation) [default: f32]
    #[arg(long, value_name = "f32|bf16", value_parser = parse_precision)]
    precision: Option<ffwd::core::gemm::ProductPrecision>,
    /// Evaluate on the held-out tail every N steps [default: 250].
    #[arg(long)]
    eval_every: Option<usize>,
    /// Batches of held-out windows per evaluation [default: 16].
    #[arg(long)]
    eval_batches: Option<usize>,
    /// Fraction of the text held out for validation [default: 0.1].
    #[arg(long)]
    val_fraction: Option<f32>,
    /// Seed of initialisation and batch order [default: 0].
    #[arg(long)]
    seed: Option<u64>,
    /// Train for this many minutes as a complete run: the number of steps is estimated from
    /// the measured step time (at most --steps, which then only caps it) and the cosine decay
    /// ends at the deadline, followed by a final evaluation.
    #[arg(long)]
    max_minutes: Option<f64>,
    /// Stop after this step (the LR schedule still spans --steps; resume later to finish).
    #[arg(long)]
    stop_at: Option<usize>,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Save the model (with optimizer state, for --resume) here.
    #[arg(long, value_name = "PATH")]
    save: Option<PathBuf>,
    /// Also save to --save every N steps (atomically: a kill leaves the previous complete
    /// checkpoint), so that --resume can continue an interrupted run.
    #[arg(long, value_name = "N", requires = "save")]
    save_every: Option<usize>,
    /// Write metrics JSON here.
    #[arg(long, value_name = "PATH")]
    metrics: Option<PathBuf>,
    /// Only the final summary.
    #[arg(long, short)]
    quiet: bool,
    /// Time every operation of the training step (LayerNorm, attention parts, FFN, logits,
    /// optimizer, …) and print each one's share of the step at the end.
    #[arg(long)]
    profile: bool,
}

/// Options of `ffwd lm sample`.
#[derive(Args, Debug)]
pub struct LmSampleArgs {
    /// Checkpoint written by `ffwd lm train --save`.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// Text to continue. Characters outside the model's vocabulary are refused.
    #[arg(long, default_value = "\n")]
    prompt: String,
    /// Characters to generate.
    #[arg(long, default_value_t = 500)]
    tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Sample among the k most likely characters only (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Run the FFN blocks on bf16 weight matrices (dense, ufff, fff leaves, moe/smoe
    /// experts; attention and embeddings stay f32).
    #[arg(long)]
    bf16: bool,
}

/// Runs `ffwd lm …`.
pub fn run(cmd: LmCommand) -> anyhow::Result<()> {
    match cmd {
        LmCommand::Train(a) => run_train(*a),
        LmCommand::Sample(a) => run_sample(a),
        LmCommand::Eval(a) => run_eval(a),
    }
}

/// A library message about an option, with the option named as its flag
/// (`ffn_width` → `--ffn-width`).
fn flag_names(msg: &str) -> String {
    const KEYS: [&str; 11] = ["ffn_width", "balanced_hash", "top_k", "experts", "depth", "trees", "rank", "blocks", "seq_len", "guided", "reduce_flop"];
    // whole words only (`rank` in `lowrank` stays)
    let msg = msg.trim_start_matches("config: ");
    let mut out = String::with_capacity(msg.len() + 16);
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if KEYS.contains(&word.as_str()) {
            out.push_str("--");
            out.push_str(&word.replace('_', "-"));
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for ch in msg.chars() {
        if ch.is_ascii_alphanumeric() || ch == '_' {
            word.push(ch);
        } else {
            flush(&mut word, &mut out);
            out.push(ch);
        }
    }
    flush(&mut word, &mut out);
    out
}

fn parse_ffn(s: &str) -> Result<FfnKind, String> {
    s.parse().map_err(|e: ffwd::Error| e.to_string().trim_start_matches("config: ").to_string())
}

struct Bar<'a> {
    pb: ProgressBar,
    quiet: bool,
    /// `--save` with what a checkpoint needs besides the model and optimizer.
    save: Option<(&'a std::path::Path, &'a CharTokenizer, &'a LmTrainOptions)>,
}

impl LmProgress for Bar<'_> {
    fn checkpoint(&mut self, lm: &Lm, opt: &AdamW, state: &LmTrainState) -> ffwd::Result<()> {
        if let Some((path, tokenizer, options)) = self.save {
            save_lm_run(lm, tokenizer, options, state, opt, path)?;
        }
        Ok(())
    }

    fn step(&mut self, step: usize, total: usize, loss: f32, tps: f64) {
        self.pb.set_length(total as u64);
        self.pb.set_position(step as u64);
        if step.is_multiple_of(10) {
            self.pb.set_message(format!("loss {loss:.4}  {tps:.0} tok/s"));
        }
    }

    fn eval(&mut self, e: &LmEval) {
        if self.quiet {
            return;
        }
        let line = format!(
            "step {:>6}  train {:.4}  val {:.4} nats ({:.3} bpc)  {:.0} tok/s  {:.0}s",
            e.step, e.train_loss, e.val_loss, e.val_bpc, e.train_tokens_per_s, e.seconds
        );
        if self.pb.is_hidden() {
            eprintln!("{line}");
        } else {
            self.pb.println(line);
        }
    }
}

fn run_train(mut a: LmTrainArgs) -> anyhow::Result<()> {
    let threads = super::init_threads(a.threads)?;
    // data parallel: the ranks after the first train silently and write nothing
    let primary = super::parallel::primary();
    if !primary {
        a.quiet = true;
        (a.save, a.metrics) = (None, None);
    }
    let (text, source) = match &a.text {
        Some(p) => (read_text(p)?, p.display().to_string()),
        None => (tiny_shakespeare()?, "tiny-shakespeare (embedded)".to_string()),
    };
    // the options the flags set, on top of the run file's (or the checkpoint's)
    let flags = |opts: &mut LmTrainOptions| {
        let set = |v: Option<usize>, f: &mut usize| {
            if let Some(v) = v {
                *f = v;
            }
        };
        set(a.steps, &mut opts.steps);
        set(a.batch, &mut opts.batch);
        set(a.accum, &mut opts.accum);
        set(a.seq_len, &mut opts.seq_len);
        set(a.warmup, &mut opts.warmup);
        set(a.eval_every, &mut opts.eval_every);
        set(a.eval_batches, &mut opts.eval_batches);
        set(a.save_every, &mut opts.save_every);
        if let Some(p) = a.precision {
            opts.precision = p;
        }
        for (v, f) in [
            (a.lr, &mut opts.lr),
            (a.min_lr_ratio, &mut opts.min_lr_ratio),
            (a.weight_decay, &mut opts.weight_decay),
            (a.clip, &mut opts.clip),
            (a.grad_noise, &mut opts.grad_noise),
            (a.grad_noise_gamma, &mut opts.grad_noise_gamma),
            (a.val_fraction, &mut opts.val_fraction),
        ] {
            if let Some(v) = v {
                *f = v;
            }
        }
    };
    // a resumed run keeps its model, options, vocabulary and optimizer; flags may extend --steps
    let (mut lm, tokenizer, opts, data, mut state, mut opt) = if let Some(path) = &a.resume {
        let LmCheckpoint { lm, tokenizer, mut options, state, optimizer } = LmCheckpoint::load_to_resume(path)?;
        flags(&mut options);
        let data = ffwd::spec::lm_data(&lm, &tokenizer, &text, &options).with_context(|| format!("{source} with the run of {}", path.display()))?;
        (lm, tokenizer, options, data, state, optimizer)
    } else {
        let mut file = match &a.config {
            Some(p) => LmRunConfig::from_toml_file(p)?,
            None => LmRunConfig::default(),
        };
        let m = &mut file.model;
        m.context = a.context.unwrap_or(m.context);
        m.d_model = a.d_model.unwrap_or(m.d_model);
        m.heads = a.heads.unwrap_or(m.heads);
        m.layers = a.layers.unwrap_or(m.layers);
        m.parallel |= a.parallel;
        // without a file, or with a new --context, windows span the whole context (0 = context)
        if a.config.is_none() || a.context.is_some() {
            file.train.seq_len = 0;
        }
        file.train.seed = a.seed.unwrap_or(file.train.seed);
        flags(&mut file.train);
        let shape = FfnShape {
            ffn: a.ffn,
            ffn_width: a.ffn_width,
            depth: a.depth,
            trees: a.trees,
            rank: a.rank,
            blocks: a.blocks,
            experts: a.experts,
            top_k: a.top_k,
            balanced_hash: a.balanced_hash,
            first_dense: a.first_dense,
            guided: a.guided,
            reduce_flop: a.reduce_flop,
        };
        // without a file, the default dense FFN's width follows --d-model (4·d_model)
        let shape = if a.config.is_none() { shape.with_default_kind() } else { shape };
        let run = ffwd::spec::lm(&file, &shape, &text).map_err(|e| anyhow::anyhow!("{}", flag_names(&e.to_string())))?;
        (run.lm, run.tokenizer, run.options, run.data, LmTrainState::default(), AdamW::new(0.0))
    };
    if !a.quiet {
        eprintln!(
            "text {source}: {} train / {} held-out characters, vocabulary {} | {} layers × d {} ({} heads, context {}{}), ffn {} | {} params ({} ffn, {} ffn params active per token) | {threads} threads",
            data.train.len(),
            data.val.len(),
            tokenizer.len(),
            lm.config().layers,
            lm.config().d_model,
            lm.config().heads,
            lm.config().context,
            if lm.config().parallel { ", parallel" } else { "" },
            lm.config().ffn.kind(),
            lm.param_count(),
            lm.ffn_param_count(),
            lm.ffn_active_params_per_token()
        );
    }
    let pb = if a.quiet { ProgressBar::hidden() } else { ProgressBar::new(opts.steps as u64) };
    pb.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps  {msg}  ETA {eta}").expect("static template").progress_chars("=> "),
    );
    pb.set_position(state.step as u64);
    let mut bar = Bar { pb, quiet: a.quiet, save: a.save.as_deref().map(|p| (p, &tokenizer, &opts)) };
    let budget = a.max_minutes.map(|m| Duration::from_secs_f64(m * 60.0));
    ffwd::core::profile::enable(a.profile);
    train_lm(&mut lm, &data, &opts, &mut opt, &mut state, budget, a.stop_at, &mut bar)?;
    ffwd::core::profile::enable(false);
    bar.pb.finish_and_clear();
    super::parallel::finish(state.step, state.seconds, &mut |f| lm.visit_params_mut(f))?;
    if !primary {
        return Ok(());
    }
    if a.profile {
        let rows = ffwd::core::profile::report();
        let total: f64 = rows.iter().map(|r| r.1).sum();
        eprintln!("profile of the training step ({:.2} s measured over {} steps):", total, state.step);
        for (name, secs, calls) in &rows {
            eprintln!("  {name:<26} {:>6.1} %  {:>9.2} ms/step  ({calls} calls)", 100.0 * secs / total, 1e3 * secs / state.step.max(1) as f64);
        }
    }
    let last = state.history.last().cloned();
    let tps_mean = if state.seconds > 0.0 { (state.step * opts.batch * opts.accum * opts.seq_len) as f64 / state.seconds } else { 0.0 };
    if let Some(e) = &last {
        println!(
            "val loss {:.4} nats/char ({:.3} bpc) after {} steps, {:.0}s, {:.0} tokens/s | {} params, {} ffn, {} ffn active per token",
            e.val_loss,
            e.val_bpc,
            state.step,
            state.seconds,
            tps_mean,
            lm.param_count(),
            lm.ffn_param_count(),
            lm.ffn_active_params_per_token()
        );
    }
    if let Some(path) = &a.save {
        let ck = LmCheckpoint { lm, tokenizer, options: opts.clone(), state: state.clone(), optimizer: opt };
        ck.save(path)?;
        eprintln!("saved {}", path.display());
        write_metrics(&a, &ck.lm, &opts, &state, last.as_ref(), tps_mean, threads, &source)?;
    } else {
        write_metrics(&a, &lm, &opts, &state, last.as_ref(), tps_mean, threads, &source)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn write_metrics(
    a: &LmTrainArgs,
    lm: &Lm,
    opts: &LmTrainOptions,
    state: &LmTrainState,
    last: Option<&LmEval>,
    tps: f64,
    threads: usize,
    source: &str,
) -> anyhow::Result<()> {
    let Some(path) = &a.metrics else { return Ok(()) };
    let m = json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "val_loss": last.map(|e| e.val_loss),
        "val_bpc": last.map(|e| e.val_bpc),
        "train_loss": last.map(|e| e.train_loss),
        "train_tokens_per_s": tps,
        "params": lm.param_count(),
        "ffn_params": lm.ffn_param_count(),
        "ffn_active_params_per_token": lm.ffn_active_params_per_token(),
        "steps": state.step,
        "train_seconds": state.seconds,
        "threads": threads,
        "text": source,
        "model": lm.config(),
        "train": opts,
        "history": state.history,
    });
    ffwd::checkpoint::write_atomic(path, serde_json::to_string_pretty(&m)?.as_bytes()).context("writing metrics")?;
    Ok(())
}

/// The text at `path`, or the embedded tiny-shakespeare.
pub(crate) fn text_or_embedded(path: Option<&std::path::Path>) -> anyhow::Result<String> {
    Ok(match path {
        Some(p) => read_text(p)?,
        None => tiny_shakespeare()?,
    })
}

/// Loads an LM checkpoint, with its FFN blocks on bf16 weights when asked.
fn load_lm(path: &std::path::Path, bf16: bool) -> anyhow::Result<LmCheckpoint> {
    let mut ck = LmCheckpoint::load(path)?;
    if bf16 {
        ck.lm.set_precision(ffwd::kernels::Precision::Bf16)?;
        super::note_bf16_speed();
    }
    Ok(ck)
}

fn run_eval(a: LmEvalArgs) -> anyhow::Result<()> {
    super::init_threads(a.threads)?;
    let mut ck = load_lm(&a.model, a.bf16)?;
    let text = text_or_embedded(a.text.as_deref())?;
    let loss = ck.held_out_loss(&text, a.batches)?;
    println!(
        "{}: held-out loss {loss:.4} nats/char ({:.4} bits/char), {} FFN, {} weights, {} batches of {} x {}",
        a.model.display(),
        loss / std::f32::consts::LN_2,
        ck.lm.config().ffn.kind(),
        ck.lm.precision().name(),
        a.batches,
        ck.options.batch,
        ck.options.seq_len
    );
    Ok(())
}

fn run_sample(a: LmSampleArgs) -> anyhow::Result<()> {
    super::init_threads(a.threads)?;
    let ck = load_lm(&a.model, a.bf16)?;
    let t0 = Instant::now();
    let out = ck.generate_text(&a.prompt, a.tokens, a.temperature, a.top_k, a.seed).context("prompt")?;
    let secs = t0.elapsed().as_secs_f64();
    println!("{}{}", a.prompt, out);
    let n = out.chars().count();
    eprintln!(
        "{n} characters in {secs:.2}s ({:.0} tokens/s, KV cache, {} FFN, {} weights)",
        n as f64 / secs.max(1e-9),
        ck.lm.config().ffn.kind(),
        ck.lm.precision().name()
    );
    Ok(())
}

/// Generation speed of a saved LM at batch 1: tokens per second while filling the context
/// once from a one-token prompt (greedy, KV cache), median of `rounds` rounds. (Past the context
/// the generator re-prefills half of it, which `ffwd lm sample` reports separately.)
pub fn generate_tokens_per_s(path: &std::path::Path, rounds: usize) -> anyhow::Result<(f64, String, usize)> {
    let ck = LmCheckpoint::load(path)?;
    let mut g = ck.lm.generator();
    let mut rng = Rng::new(0);
    let n = ck.lm.config().context.saturating_sub(1).max(1);
    g.generate(&[0], n, 0.0, 0, &mut rng)?; // warm-up
    let mut rates = Vec::with_capacity(rounds.max(1));
    for _ in 0..rounds.max(1) {
        let t0 = Instant::now();
        let made = g.generate(&[0], n, 0.0, 0, &mut rng)?.len();
        rates.push(made as f64 / t0.elapsed().as_secs_f64().max(1e-9));
    }
    rates.sort_by(|a, b| a.total_cmp(b));
    Ok((rates[rates.len() / 2], ck.lm.config().ffn.kind().to_string(), ck.lm.param_count()))
}

fn parse_precision(s: &str) -> Result<ffwd::core::gemm::ProductPrecision, String> {
    ffwd::core::gemm::ProductPrecision::parse(s).ok_or_else(|| format!("`{s}` is not f32 or bf16"))
}
