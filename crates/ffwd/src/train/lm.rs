//! Training of the language model: random windows of the training text, AdamW with warmup +
//! cosine decay, global-norm clipping, gradient accumulation, and evaluation of the inference
//! path on fixed windows of the held-out tail. The windows of step `s` are drawn from an RNG
//! seeded by `(seed, s)`, so a resumed run sees exactly the batches the uninterrupted run
//! would have seen.
//!
//! Gradient accumulation: a step draws its `accum · batch` windows once, in order, and splits
//! them into `accum` micro-batches of `batch`; their gradients are summed into the parameters
//! and averaged. So `accum = k, batch = b` trains on exactly the windows of `accum = 1,
//! batch = k·b`, and for every FFN whose loss is a mean over tokens (dense, fff without
//! load balancing, dropout or region leak, ufff, hash, pkm) gives the same parameters up to
//! rounding. The mixtures' balance (`moe`), z-loss and entropy (`smoe`) terms are computed per
//! micro-batch and averaged, which is not the term of the whole batch: their statistics
//! (expert shares, the batch-mean router distribution) are nonlinear in the batch, and so
//! are capacity drops and fff's load balancing.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::checkpoint::{CheckpointReader, CheckpointWriter, CONFIG_KEY, LM_FORMAT, STATE_KEY, TRAIN_KEY, VOCAB_KEY};
use crate::core::gemm::{with_bf16_products, ProductPrecision};
use crate::core::{profile, Rng};
use crate::data::text::CharTokenizer;
use crate::error::{Error, Result};
use crate::models::{Lm, LmConfig};
use crate::optim::{clip_factor, grad_norm, AdamW, GradNoise, Optimizer, Schedule};
use crate::train::distributed;

/// Hyper-parameters of a language-model run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LmTrainOptions {
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per micro-batch.
    pub batch: usize,
    /// Micro-batches accumulated per step.
    pub accum: usize,
    /// Sequence length of training windows (at most the model's context).
    pub seq_len: usize,
    /// Peak learning rate.
    pub lr: f32,
    /// Warmup steps.
    pub warmup: usize,
    /// Final LR as a fraction of the peak.
    pub min_lr_ratio: f32,
    /// Decoupled weight decay (matrices and embeddings; not norms and biases).
    pub weight_decay: f32,
    /// Max global gradient norm (0 = off).
    pub clip: f32,
    /// AdamW β₁.
    pub beta1: f32,
    /// AdamW β₂ (0.99 as nanoGPT for small character models: few tokens per step).
    pub beta2: f32,
    /// AdamW ε.
    pub eps: f32,
    /// Evaluate every this many steps (and at the end).
    pub eval_every: usize,
    /// Batches of held-out windows per evaluation.
    pub eval_batches: usize,
    /// Fraction of the text (its tail) held out for validation.
    pub val_fraction: f32,
    /// Seed of initialisation and batch sampling.
    pub seed: u64,
    /// Call [`LmProgress::checkpoint`] every this many steps (0 = never); the CLI saves the
    /// run there (`--save-every`).
    pub save_every: usize,
    /// Gradient noise η (variance at step 0 of the mean gradient; 0 = off), before clipping.
    pub grad_noise: f32,
    /// Gradient noise decay γ: variance η / (1 + t)^γ.
    pub grad_noise_gamma: f32,
    /// Operands of the training step's matrix products (`bf16`: mixed precision, f32 master
    /// weights, optimizer state, attention core, LayerNorm and evaluation; needs AVX512_BF16).
    pub precision: ProductPrecision,
}

impl Default for LmTrainOptions {
    fn default() -> Self {
        // nanoGPT's Shakespeare-char recipe (lr 1e-3, min lr 1e-4, β₂ 0.99), scaled down to
        // what two cores train in about ten minutes
        LmTrainOptions {
            steps: 3000,
            batch: 16,
            accum: 1,
            seq_len: 128,
            lr: 1e-3,
            warmup: 100,
            min_lr_ratio: 0.1,
            weight_decay: 0.1,
            clip: 1.0,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            eval_every: 250,
            eval_batches: 16,
            val_fraction: 0.1,
            seed: 0,
            save_every: 0,
            grad_noise: 0.0,
            grad_noise_gamma: 0.55,
            precision: ProductPrecision::F32,
        }
    }
}

/// An LM run configuration file: `[model]` (the [`LmConfig`]) and `[train]` (the
/// [`LmTrainOptions`]) tables; unknown keys are errors.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LmRunConfig {
    /// The model's shape (its `vocab` is set from the text).
    pub model: LmConfig,
    /// The run's options.
    pub train: LmTrainOptions,
}

impl LmRunConfig {
    /// Reads a TOML file.
    pub fn from_toml_file(path: &std::path::Path) -> Result<Self> {
        crate::config::read_toml(path)
    }
}

/// One evaluation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LmEval {
    /// Steps done.
    pub step: usize,
    /// Mean training loss since the previous evaluation (nats per token).
    pub train_loss: f32,
    /// Held-out loss of the inference path (nats per token).
    pub val_loss: f32,
    /// The same in bits per character.
    pub val_bpc: f32,
    /// Training throughput since the previous evaluation.
    pub train_tokens_per_s: f64,
    /// Training seconds so far.
    pub seconds: f64,
    /// Routed FFNs: per block, how the first held-out batch's tokens spread over the units
    /// (leaves, experts) at inference; absent for FFNs without routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_usage: Option<Vec<Option<crate::train::RouteUsage>>>,
}

/// Per-block routing counts of the inference path on the first held-out batch (`None` when no
/// block's FFN routes).
fn lm_route_usage(lm: &mut Lm, val: &[u32], batch: usize, t: usize) -> Result<Option<Vec<Option<crate::train::RouteUsage>>>> {
    let span = val.len() - t - 1;
    let (mut x, mut y) = (vec![0u32; batch * t], vec![0u32; batch * t]);
    windows(val, (0..batch).map(|j| j * span / batch.max(1)), t, &mut x, &mut y);
    let usage: Vec<Option<crate::train::RouteUsage>> = lm.route_usage(&x, batch, t)?.into_iter().map(|u| u.filter(|u| u.counts.len() <= 4096)).collect();
    Ok(usage.iter().any(Option::is_some).then_some(usage))
}

/// Where a run stands (saved in checkpoints so that `--resume` continues it).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LmTrainState {
    /// Steps done.
    pub step: usize,
    /// Training seconds so far.
    pub seconds: f64,
    /// Every evaluation so far.
    pub history: Vec<LmEval>,
    /// With a time budget: the step at which the run plans to end (the cosine schedule's
    /// length), re-estimated from the measured step time so that the decay ends at the
    /// deadline.
    #[serde(default)]
    pub planned_steps: Option<usize>,
}

/// Receives progress while training.
pub trait LmProgress {
    /// After every step.
    fn step(&mut self, _step: usize, _total: usize, _loss: f32, _tokens_per_s: f64) {}
    /// After every evaluation.
    fn eval(&mut self, _e: &LmEval) {}
    /// Every `save_every` steps (with the model, the optimizer and the run state as they are
    /// after that step): the place to write a resumable checkpoint. An error stops training.
    fn checkpoint(&mut self, _lm: &Lm, _opt: &AdamW, _state: &LmTrainState) -> Result<()> {
        Ok(())
    }
}

/// Progress sink that ignores everything.
pub struct Quiet;
impl LmProgress for Quiet {}

/// Token ids of a text split into a training head and a held-out tail.
pub struct TextData {
    /// Training tokens.
    pub train: Vec<u32>,
    /// Held-out tokens.
    pub val: Vec<u32>,
}

impl TextData {
    /// Splits `tokens`: the last `val_fraction` is held out. Both parts must hold more than
    /// `seq_len` tokens.
    pub fn split(tokens: Vec<u32>, val_fraction: f32, seq_len: usize) -> Result<Self> {
        if !(0.0..1.0).contains(&val_fraction) {
            return Err(Error::Config(format!("val_fraction must be in [0, 1), got {val_fraction}")));
        }
        let n_val = (tokens.len() as f64 * val_fraction as f64) as usize;
        let cut = tokens.len() - n_val;
        let (train, val) = (tokens[..cut].to_vec(), tokens[cut..].to_vec());
        if train.len() <= seq_len || (val_fraction > 0.0 && val.len() <= seq_len) {
            return Err(Error::Invalid(format!("text too short: {} training and {} held-out tokens for windows of {seq_len} (+1)", train.len(), val.len())));
        }
        Ok(TextData { train, val })
    }
}

/// Fills `x`, `y` (`b·t` each) with `b` windows of `src` starting at `starts`, `y` shifted by one.
fn windows(src: &[u32], starts: impl Iterator<Item = usize>, t: usize, x: &mut [u32], y: &mut [u32]) {
    for ((s, xr), yr) in starts.zip(x.chunks_exact_mut(t)).zip(y.chunks_exact_mut(t)) {
        xr.copy_from_slice(&src[s..s + t]);
        yr.copy_from_slice(&src[s + 1..s + t + 1]);
    }
}

/// Held-out loss of the inference path over `batches` batches of evenly spaced windows.
pub fn validate(lm: &mut Lm, val: &[u32], batch: usize, t: usize, batches: usize) -> Result<f32> {
    let n = batch * batches.max(1);
    let span = val.len() - t - 1;
    let (mut x, mut y) = (vec![0u32; batch * t], vec![0u32; batch * t]);
    let mut total = 0.0f64;
    for bi in 0..batches.max(1) {
        windows(val, (0..batch).map(|j| (bi * batch + j) * span / n.max(1)), t, &mut x, &mut y);
        total += lm.eval_loss(&x, &y, batch, t)? as f64;
    }
    Ok((total / batches.max(1) as f64) as f32)
}

/// Trains `lm` from `state.step` to `opts.steps` (or up to step `stop_at` — the schedule still
/// spans `opts.steps`, so a later resume continues the same run), evaluating every
/// `opts.eval_every` steps and when it stops. `opt` carries AdamW's moments (restored when
/// resuming); its hyper-parameters are set from `opts`.
///
/// With a time `budget` the run is a complete run of that length: the step time is measured
/// (evaluations included) and every [`REPLAN_EVERY`] steps the planned number of steps
/// (`state.planned_steps`, at most `opts.steps`) is re-estimated, so the cosine decay ends
/// at the deadline rather than being cut off in the middle (the clock stops the run only if it
/// overruns the budget by 10 %).
#[allow(clippy::too_many_arguments)]
pub fn train_lm(
    lm: &mut Lm,
    data: &TextData,
    opts: &LmTrainOptions,
    opt: &mut AdamW,
    state: &mut LmTrainState,
    budget: Option<Duration>,
    stop_at: Option<usize>,
    progress: &mut dyn LmProgress,
) -> Result<()> {
    let t = opts.seq_len;
    if t == 0 || t > lm.config().context {
        return Err(Error::Config(format!("seq_len {t} must be in 1..={} (the model's context)", lm.config().context)));
    }
    if opts.batch == 0 || opts.accum == 0 || opts.steps == 0 {
        return Err(Error::Config("steps, batch and accum must be positive".into()));
    }
    opts.precision.check()?;
    if data.train.len() <= t + 1 || data.val.len() <= t + 1 {
        return Err(Error::Invalid(format!("text too short for windows of {t} tokens")));
    }
    let (b, k) = (opts.batch, opts.accum);
    // data parallel: the step's k micro-batches are shared out, micro-batch m to rank m mod N
    let group = distributed::group();
    let (rank, ranks) = distributed::rank_and_size();
    distributed::check_divides("accum (micro-batches per step)", k)?;
    let mut sync = distributed::GradSync::new();
    let mut schedule = Schedule { peak: opts.lr, warmup: opts.warmup.min(opts.steps / 2), total: opts.steps, min_ratio: opts.min_lr_ratio };
    if budget.is_none() {
        state.planned_steps = None;
    }
    if let Some(p) = state.planned_steps {
        schedule.total = p;
    }
    let first_step = state.step;
    (opt.beta1, opt.beta2, opt.eps, opt.weight_decay) = (opts.beta1, opts.beta2, opts.eps, opts.weight_decay);
    let (mut x, mut y) = (vec![0u32; k * b * t], vec![0u32; k * b * t]);
    let start = Instant::now();
    let base_seconds = state.seconds;
    let (mut loss_sum, mut loss_n, mut tokens_since, mut since) = (0.0f64, 0usize, 0usize, Instant::now());
    let span = data.train.len() - t - 1;
    let end = stop_at.map_or(opts.steps, |s| s.min(opts.steps));
    let root = Rng::new(opts.seed);
    while state.step < end.min(schedule.total) {
        // the step's k·b windows, drawn once, in order; micro-batch m takes windows m·b..(m+1)·b
        let mut rng = root.fork(state.step as u64 + 1);
        let s = profile::span("data");
        windows(&data.train, (0..k * b).map(|_| rng.below(span + 1)), t, &mut x, &mut y);
        drop(s);
        // scheduled layers (self-guided FFNs) follow the run; dropped guides leave AdamW too
        if let Some(keep) = lm.set_progress(state.step, schedule.total) {
            opt.retain(&keep);
        }
        // the gradients are zero here: the optimizer's step consumed the last ones
        let mut step_loss = 0.0f32;
        for micro in (rank..k).step_by(ranks) {
            let r = micro * b * t..(micro + 1) * b * t;
            // stochastic layers draw from a stream of their own per (step, micro-batch)
            let mut layer_rng = root.fork(((state.step as u64) << 20 | micro as u64) ^ 0x1a7e_0000_0000_0000);
            let bf16 = opts.precision == ProductPrecision::Bf16;
            let (loss, _aux) = with_bf16_products(bf16, || lm.forward_backward(&x[r.clone()], &y[r], b, t, &mut layer_rng))?;
            if !loss.is_finite() {
                return Err(Error::Invalid(format!("loss became {loss} at step {}: lower the learning rate", state.step)));
            }
            step_loss += loss / k as f32;
        }
        if let Some(g) = group {
            // one fused all-reduce of every gradient (the sum over all k micro-batches), and
            // the step's loss
            let s = profile::span("all-reduce");
            sync.all_reduce(g, 1.0, &mut |f| lm.visit_params_mut(f));
            let mut l = [step_loss as f64];
            distributed::sum_f64(&mut l);
            step_loss = l[0] as f32;
            drop(s);
        }
        // the gradients hold the sum over micro-batches: average (and clip) in the update
        let inv_k = 1.0 / k as f32;
        let s = profile::span("optimizer (clip + AdamW)");
        // the gradients hold a sum over k micro-batches: noise of k times the deviation
        let noise = GradNoise { eta: opts.grad_noise, gamma: opts.grad_noise_gamma };
        noise.apply(state.step, k as f32, &mut root.fork(state.step as u64 ^ 0x6e01_5e00_0000_0000), &mut |f| lm.visit_params_mut(f));
        let clip = if opts.clip > 0.0 { clip_factor(grad_norm(&mut |f| lm.visit_params_mut(f)) * inv_k, opts.clip) } else { 1.0 };
        opt.step(&mut |f| lm.visit_params_mut(f), schedule.lr(state.step), clip * inv_k);
        drop(s);
        state.step += 1;
        loss_sum += step_loss as f64;
        loss_n += 1;
        tokens_since += b * t * k;
        if let Some(bd) = budget {
            let done = state.step - first_step;
            if done >= REPLAN_EVERY && done.is_multiple_of(REPLAN_EVERY) {
                // every rank plans with the ranks' mean step time, so that all stop together
                let now = start.elapsed().as_secs_f64();
                let mut clock = [now / done as f64 / ranks as f64, (bd.as_secs_f64() - now) / ranks as f64];
                distributed::sum_f64(&mut clock);
                let (per_step, left) = (clock[0], clock[1]);
                let planned = (state.step + (left / per_step).max(0.0) as usize).clamp(state.step + 1, opts.steps);
                state.planned_steps = Some(planned);
                schedule.total = planned;
            }
        }
        progress.step(state.step, schedule.total.min(end), (loss_sum / loss_n as f64) as f32, tokens_since as f64 / since.elapsed().as_secs_f64().max(1e-9));
        let finished = state.step >= end.min(schedule.total);
        // the plan ends the run at the deadline; the clock is only a backstop (10 % late)
        let mut out_of_time = budget.is_some_and(|bd| start.elapsed() >= bd.mul_f64(1.1)) || finished;
        if budget.is_some() && group.is_some() {
            // one rank's clock must not stop it alone: the others would wait for it forever
            let mut any = [f64::from(u8::from(out_of_time))];
            distributed::sum_f64(&mut any);
            out_of_time = any[0] > 0.0;
        }
        if state.step.is_multiple_of(opts.eval_every.max(1)) || state.step == opts.steps || out_of_time {
            let tps = tokens_since as f64 / since.elapsed().as_secs_f64().max(1e-9);
            state.seconds = base_seconds + start.elapsed().as_secs_f64();
            let val_loss = {
                let on = profile::enabled();
                profile::enable(false); // evaluation is not part of the step's profile
                let v = validate(lm, &data.val, b, t, opts.eval_batches);
                if on {
                    profile::enable_keep();
                }
                v?
            };
            let e = LmEval {
                step: state.step,
                train_loss: (loss_sum / loss_n.max(1) as f64) as f32,
                val_loss,
                val_bpc: val_loss / std::f32::consts::LN_2,
                train_tokens_per_s: tps,
                seconds: state.seconds,
                route_usage: lm_route_usage(lm, &data.val, b, t)?,
            };
            progress.eval(&e);
            state.history.push(e);
            (loss_sum, loss_n, tokens_since) = (0.0, 0, 0);
            since = Instant::now();
        }
        // after the step's evaluation, so a resumed run's history has every evaluation once
        if opts.save_every > 0 && state.step.is_multiple_of(opts.save_every) {
            state.seconds = base_seconds + start.elapsed().as_secs_f64();
            progress.checkpoint(lm, opt, state)?;
        }
        if out_of_time {
            break;
        }
    }
    // a run that ended with its schedule is past any guided phase: the guides go now, so the
    // saved model is the plain structured one
    if state.step >= schedule.total {
        if let Some(keep) = lm.set_progress(state.step, schedule.total) {
            opt.retain(&keep);
        }
    }
    Ok(())
}

/// With a time budget, the planned length of the run is re-estimated every this many steps.
pub const REPLAN_EVERY: usize = 20;

/// A language model with everything needed to sample from it or resume its training
/// (format `lm/1`: parameters under their full names, AdamW's moments as `optim.m.*` and
/// `optim.v.*`, and in the metadata the configuration, the vocabulary, the run's options and
/// its state).
pub struct LmCheckpoint {
    /// The model.
    pub lm: Lm,
    /// Its vocabulary.
    pub tokenizer: CharTokenizer,
    /// The options of the run that produced it.
    pub options: LmTrainOptions,
    /// Where that run stood.
    pub state: LmTrainState,
    /// AdamW with its moments (fresh when the file has none).
    pub optimizer: AdamW,
}

impl LmCheckpoint {
    /// Saves everything to `path` (atomically).
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        save_lm_run(&self.lm, &self.tokenizer, &self.options, &self.state, &self.optimizer, path)
    }

    /// Continues `prompt` by `n` characters (KV cache; temperature 0 = greedy; only the
    /// `top_k` most likely characters when `top_k > 0`; `seed` drives the sampler). Prompt
    /// characters outside the vocabulary are an error naming the first.
    pub fn generate_text(&self, prompt: &str, n: usize, temperature: f32, top_k: usize, seed: u64) -> Result<String> {
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(Error::Invalid(format!("temperature must be a finite number ≥ 0, got {temperature}")));
        }
        let ids = self.tokenizer.encode(prompt)?;
        let out = self.lm.generator().generate(&ids, n, temperature, top_k, &mut Rng::new(seed))?;
        Ok(self.tokenizer.decode(&out))
    }

    /// Held-out loss (nats per character) of the inference path on `text`'s last
    /// `val_fraction` (the run's split and sequence length): `batches` batches of the run's
    /// batch size of evenly spaced windows. The figure a run reports, for a converted model.
    pub fn held_out_loss(&mut self, text: &str, batches: usize) -> Result<f32> {
        let tokens = self.tokenizer.encode(text)?;
        let data = TextData::split(tokens, self.options.val_fraction, self.options.seq_len)?;
        if data.val.is_empty() {
            return Err(Error::Invalid("the run held nothing out (val_fraction 0)".into()));
        }
        validate(&mut self.lm, &data.val, self.options.batch, self.options.seq_len, batches)
    }

    /// Loads a checkpoint written by [`LmCheckpoint::save`] or [`save_lm_run`].
    pub fn load(path: &std::path::Path) -> Result<Self> {
        Self::from_checkpoint(&CheckpointReader::open(path)?)
    }

    /// Loads a checkpoint to continue its training: as [`LmCheckpoint::load`], but a quantized
    /// file is refused (training continues from f32 weights only).
    pub fn load_to_resume(path: &std::path::Path) -> Result<Self> {
        let ck = CheckpointReader::open(path)?;
        ck.refuse_quantized("resuming training")?;
        Self::from_checkpoint(&ck)
    }

    /// The checkpoint stored in an opened file.
    pub fn from_checkpoint(ck: &CheckpointReader) -> Result<Self> {
        ck.expect_format(LM_FORMAT)?;
        let cfg: LmConfig = ck.json(CONFIG_KEY)?;
        let tokenizer: CharTokenizer = ck.json(VOCAB_KEY)?;
        let options: LmTrainOptions = ck.json(TRAIN_KEY)?;
        let state: LmTrainState = ck.json(STATE_KEY)?;
        if tokenizer.len() != cfg.vocab {
            return Err(ck.error(format!("vocabulary has {} characters, config says {}", tokenizer.len(), cfg.vocab)));
        }
        ck.check_claim("the language model", cfg.param_count())?;
        let st = ck.tensors()?;
        let mut lm = ck.about(Lm::new(cfg, 0))?;
        // self-guided FFNs: a checkpoint saved after the guided phase holds no dense guides
        if lm.named_params().iter().any(|(n, _)| crate::layers::guided::is_guide(n) && st.tensor(n).is_err()) {
            lm.drop_guides();
        }
        // parameters are stored under their full names (Lm::named_params, visiting order)
        let named: Vec<(String, Vec<usize>)> = lm.named_params().into_iter().map(|(n, p)| (n, p.shape.clone())).collect();
        ck.fill_named(&st, &named, &mut |f| lm.visit_params_mut(f))?;
        let mut optimizer = AdamW::new(options.weight_decay);
        ck.read_optimizer(&st, &mut optimizer, &named)?;
        // α as the run left it (the guides drop here if their phase ended with the last step)
        if let Some(keep) = lm.set_progress(state.step, state.planned_steps.unwrap_or(options.steps)) {
            optimizer.retain(&keep);
        }
        if let Some(q) = ck.quant() {
            // an FFN without a quantized kernel runs f32 on the dequantized weights
            let _ = lm.set_precision(crate::kernels::Precision::of(q.format));
        }
        Ok(LmCheckpoint { lm, tokenizer, options, state, optimizer })
    }
}

/// Saves a language model, its vocabulary, the run's options and state, and AdamW's moments,
/// so that training can resume exactly (a checkpoint in the middle of a run).
pub fn save_lm_run(
    lm: &Lm,
    tokenizer: &CharTokenizer,
    options: &LmTrainOptions,
    state: &LmTrainState,
    optimizer: &AdamW,
    path: &std::path::Path,
) -> Result<()> {
    lm_checkpoint(lm, tokenizer, options, state, optimizer)?.write(path)
}

/// The checkpoint [`save_lm_run`] writes, as a writer (for bytes in memory).
pub fn lm_checkpoint<'a>(
    lm: &'a Lm,
    tokenizer: &CharTokenizer,
    options: &LmTrainOptions,
    state: &LmTrainState,
    optimizer: &'a AdamW,
) -> Result<CheckpointWriter<'a>> {
    let named = lm.named_params();
    let mut w = CheckpointWriter::new(LM_FORMAT);
    w.params(&named).optimizer("adamw", optimizer, &named);
    w.json(CONFIG_KEY, lm.config())?.json(VOCAB_KEY, tokenizer)?.json(TRAIN_KEY, options)?.json(STATE_KEY, state)?;
    Ok(w)
}
