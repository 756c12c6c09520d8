//! Backpropagation training of a [`Classifier`]: shuffled minibatches, warmup + cosine LR,
//! AdamW or SGD, optional global-norm clipping, evaluation (hard inference) after each epoch.
//! After the buffers are sized by the first step, a step allocates nothing.
//!
//! Every random choice is a function of the seed and the position in the run: epoch `e`'s
//! order comes from a stream forked by `e`, step `s`'s input dropout and stochastic layers from
//! streams forked by `s`. So a run resumed from a checkpoint written after step `s`
//! ([`TrainState`], the optimizer's state and the weights) continues exactly as the
//! uninterrupted run would have.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::checkpoint::{CheckpointReader, STATE_KEY, TRAIN_KEY};
use crate::core::Rng;
use crate::data::Split;
use crate::error::{Error, Result};
use crate::models::Classifier;
use crate::optim::{clip_factor, grad_norm, AdamW, GradNoise, Optimizer, OptimizerKind, Schedule, Sgd};

/// Hyper-parameters of a training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Passes over the training set.
    pub epochs: usize,
    /// Minibatch size.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f32,
    /// Linear warmup steps.
    pub warmup: usize,
    /// Final LR as a fraction of the peak (cosine decay).
    pub min_lr_ratio: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// Optimizer.
    pub optimizer: OptimizerKind,
    /// SGD momentum.
    pub momentum: f32,
    /// Max global gradient norm (0 = no clipping).
    pub clip: f32,
    /// Seed of the shuffling and stochastic layers.
    pub seed: u64,
    /// Probability of zeroing each input feature of a training sample (inverted dropout on
    /// the input; 0 = off). A data-agnostic regulariser.
    pub input_dropout: f32,
    /// Call [`Progress::checkpoint`] every this many steps (0 = never).
    pub save_every: usize,
    /// Gradient noise η (variance at step 0; 0 = off), added before clipping.
    pub grad_noise: f32,
    /// Gradient noise decay γ: variance η / (1 + t)^γ.
    pub grad_noise_gamma: f32,
}

/// What happened in one epoch.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochReport {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training cross-entropy.
    pub train_loss: f32,
    /// Mean auxiliary loss.
    pub aux_loss: f32,
    /// Training accuracy of the training-mode (soft) forward, over the epoch.
    pub train_accuracy_soft: f32,
    /// Test accuracy with inference (hard) routing.
    pub test_accuracy: f32,
    /// Learning rate at the end of the epoch.
    pub lr: f32,
    /// Wall-clock seconds of the epoch's training steps.
    pub seconds: f64,
    /// Mixture layers: the share of routed slots each expert received, averaged over the
    /// epoch's steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_load: Option<Vec<f32>>,
    /// Deep-equilibrium layers: iterations and residuals of the epoch's fixed-point solves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed_point: Option<SolverEpoch>,
    /// FFF trees: the mean soft-decision entropy over the epoch's steps (nats; 0 = hard).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision_entropy: Option<f32>,
    /// Routed layers: how many test samples (at most 10,000) each unit (leaf, expert) receives
    /// at inference at the end of the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_usage: Option<RouteUsage>,
}

pub use crate::kernels::RouteUsage;

/// Routing counts of the model's kernel over (at most 10,000 rows of) `data`; `None` for
/// layers without routing or with more than 4,096 units (kept out of the metrics).
fn route_usage(model: &Classifier, data: &crate::data::Dataset) -> Result<Option<RouteUsage>> {
    let n = data.len().min(10_000);
    if n == 0 {
        return Ok(None);
    }
    let mut counts = Vec::new();
    let unit = model.kernel()?.route_usage(&data.x[..n * data.dim], n, &mut counts);
    Ok(unit.filter(|_| counts.len() <= 4096).map(|u| RouteUsage { unit: u.to_string(), counts }))
}

/// The fixed-point solves of a deep-equilibrium layer over an epoch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SolverEpoch {
    /// Training steps.
    pub steps: usize,
    /// Mean iterations of the forward solve.
    pub forward_iterations: f32,
    /// Mean iterations of the adjoint (backward) solve.
    pub backward_iterations: f32,
    /// Largest relative residual of a forward solve.
    pub forward_residual: f32,
    /// Largest relative residual of an adjoint solve.
    pub backward_residual: f32,
    /// Steps in which a solve stopped at its iteration cap above the tolerance.
    pub unconverged: usize,
}

impl SolverEpoch {
    fn add(&mut self, s: &crate::layers::deq::FixedPointStats) {
        self.steps += 1;
        self.forward_iterations += s.forward.iterations as f32;
        self.backward_iterations += s.backward.iterations as f32;
        self.forward_residual = self.forward_residual.max(s.forward.residual);
        self.backward_residual = self.backward_residual.max(s.backward.residual);
        self.unconverged += usize::from(!(s.forward.converged && s.backward.converged));
    }

    fn mean(mut self) -> Self {
        let n = self.steps.max(1) as f32;
        self.forward_iterations /= n;
        self.backward_iterations /= n;
        self
    }
}

/// Summary of a training run.
#[derive(Clone, Debug, Serialize)]
pub struct TrainReport {
    /// Per-epoch history.
    pub history: Vec<EpochReport>,
    /// Final test accuracy (inference routing).
    pub test_accuracy: f32,
    /// Final training-set accuracy (inference routing).
    pub train_accuracy: f32,
    /// Seconds spent in training steps (evaluation excluded).
    pub train_seconds: f64,
    /// Optimizer steps taken.
    pub steps: usize,
}

/// Receives progress while training (the CLI draws a progress bar with it).
pub trait Progress {
    /// Called after every step with the running mean loss and soft accuracy of the epoch.
    fn step(&mut self, _epoch: usize, _step_in_epoch: usize, _steps_per_epoch: usize, _loss: f32, _acc: f32) {}
    /// Called after every epoch.
    fn epoch(&mut self, _report: &EpochReport) {}
    /// Called every `save_every` steps with the model, the optimizer and the run state as they
    /// are after that step: the place to write a resumable checkpoint. An error stops training.
    fn checkpoint(&mut self, _model: &Classifier, _opt: &dyn Optimizer, _state: &TrainState) -> Result<()> {
        Ok(())
    }
}

/// Sums over the steps of the epoch in progress.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochSums {
    /// Σ loss · batch.
    pub loss: f64,
    /// Σ auxiliary loss · batch.
    pub aux: f64,
    /// Correct training-mode predictions.
    pub correct: usize,
    /// Samples seen.
    pub seen: usize,
    /// Seconds of training steps.
    pub seconds: f64,
    /// Per-expert load summed over steps (mixture layers).
    pub load: Option<Vec<f32>>,
    /// Fixed-point solves summed over steps (deep-equilibrium layers).
    #[serde(default)]
    pub solver: Option<SolverEpoch>,
    /// Σ mean decision entropy over steps, and the steps (FFF trees).
    #[serde(default)]
    pub entropy: Option<(f64, usize)>,
}

/// Where a run stands; saved in checkpoints so that a run can resume.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// Seconds spent in training steps so far.
    pub train_seconds: f64,
    /// Every finished epoch.
    pub history: Vec<EpochReport>,
    /// The epoch in progress.
    pub epoch: EpochSums,
}

/// The optimizer `opts` asks for, fresh.
pub fn new_optimizer(opts: &TrainOptions) -> Box<dyn Optimizer> {
    match opts.optimizer {
        OptimizerKind::Adamw => Box::new(AdamW::new(opts.weight_decay)),
        OptimizerKind::Sgd => Box::new(Sgd::new(opts.momentum, opts.weight_decay)),
    }
}

/// Progress sink that ignores everything.
pub struct Silent;
impl Progress for Silent {}

/// Trains `model` on `split.train` from scratch, evaluating on `split.test` after each epoch.
pub fn train(model: &mut Classifier, split: &Split, opts: &TrainOptions, progress: &mut dyn Progress) -> Result<TrainReport> {
    let mut opt = new_optimizer(opts);
    train_from(model, split, opts, opt.as_mut(), &mut TrainState::default(), progress)
}

/// Trains `model` from `state.step` to the end of `opts.epochs` (a fresh run when `state` is
/// the default; a resumed one with the state, optimizer and weights of a checkpoint).
pub fn train_from(
    model: &mut Classifier,
    split: &Split,
    opts: &TrainOptions,
    opt: &mut dyn Optimizer,
    state: &mut TrainState,
    progress: &mut dyn Progress,
) -> Result<TrainReport> {
    let data = &split.train;
    crate::error::check_dim("training data", "features", model.config().in_features, data.dim)?;
    if data.n_classes > model.config().n_classes {
        return Err(Error::Invalid(format!("data has {} classes, model has {}", data.n_classes, model.config().n_classes)));
    }
    if opts.batch == 0 || opts.epochs == 0 {
        return Err(Error::Config(format!("batch ({}) and epochs ({}) must be positive", opts.batch, opts.epochs)));
    }
    if !(opts.lr > 0.0 && opts.lr.is_finite()) {
        return Err(Error::Config(format!("lr must be positive, got {}", opts.lr)));
    }
    if !(0.0..1.0).contains(&opts.input_dropout) {
        return Err(Error::Config(format!("input_dropout must be in [0, 1), got {}", opts.input_dropout)));
    }
    let n = data.len();
    let batch = opts.batch.min(n);
    // data parallel: every minibatch's rows are shared out in contiguous slices, one per rank
    let group = crate::train::distributed::group();
    let (rank, ranks) = crate::train::distributed::rank_and_size();
    if batch < ranks {
        return Err(Error::Config(format!("batch {batch} is smaller than the {ranks} data-parallel ranks")));
    }
    let mut sync = crate::train::distributed::GradSync::new();
    let steps_per_epoch = n.div_ceil(batch);
    let total = steps_per_epoch * opts.epochs;
    let schedule = Schedule { peak: opts.lr, warmup: opts.warmup.min(total / 2), total, min_ratio: opts.min_lr_ratio };
    let root = Rng::new(opts.seed);
    let (shuffle_root, layer_root, input_root, noise_root) = (root.fork(1), root.fork(2), root.fork(3), root.fork(4));
    let noise = GradNoise { eta: opts.grad_noise, gamma: opts.grad_noise_gamma };
    let mut order: Vec<usize> = (0..n).collect();
    let mut order_epoch = usize::MAX;
    let mut xb = vec![0.0f32; batch * data.dim];
    let mut yb = vec![0u32; batch];
    if state.epoch.load.is_none() {
        state.epoch.load = model.layer().expert_load().map(|l| vec![0.0; l.len()]);
    }
    while state.step < total {
        let (epoch, s) = (state.step / steps_per_epoch + 1, state.step % steps_per_epoch);
        if order_epoch != epoch {
            order.iter_mut().enumerate().for_each(|(i, o)| *o = i);
            shuffle_root.fork(epoch as u64).shuffle(&mut order);
            order_epoch = epoch;
        }
        let t0 = Instant::now();
        let step_rows = &order[s * batch..((s + 1) * batch).min(n)];
        let idx = &step_rows[step_rows.len() * rank / ranks..step_rows.len() * (rank + 1) / ranks];
        let b = idx.len();
        data.gather(idx, &mut xb[..b * data.dim], &mut yb[..b]);
        if opts.input_dropout > 0.0 {
            let mut input_rng = input_root.fork(state.step as u64);
            let keep = 1.0 / (1.0 - opts.input_dropout);
            for v in &mut xb[..b * data.dim] {
                *v = if input_rng.uniform() < opts.input_dropout { 0.0 } else { *v * keep };
            }
        }
        // scheduled layers (self-guided FFNs) follow the run; dropped guides leave the optimizer
        if let Some(keep) = model.set_progress(state.step, total) {
            opt.retain(&keep);
        }
        // the gradients are zero here: the optimizer's step consumed the last ones
        let mut stats =
            if b > 0 { model.forward_backward(&xb[..b * data.dim], &yb[..b], &mut layer_root.fork(state.step as u64))? } else { Default::default() };
        if let Some(g) = group {
            // the step's gradient is the mean over all its rows: each rank's mean weighted by its
            // share of the rows, summed over the ranks in one fused all-reduce
            sync.all_reduce(g, b as f32 / step_rows.len() as f32, &mut |f| model.visit_params_mut(f));
            let mut s = [stats.loss as f64 * b as f64, stats.aux as f64 * b as f64, stats.correct as f64];
            crate::train::distributed::sum_f64(&mut s);
            let rows = step_rows.len() as f64;
            stats = crate::models::StepStats { loss: (s[0] / rows) as f32, aux: (s[1] / rows) as f32, correct: s[2] as usize };
        }
        let b = if group.is_some() { step_rows.len() } else { b };
        if !stats.loss.is_finite() {
            return Err(Error::Invalid(format!("loss became {} at epoch {epoch}, step {s}: lower the learning rate", stats.loss)));
        }
        let sums = &mut state.epoch;
        if let (Some(acc), Some(l)) = (sums.load.as_mut(), model.layer().expert_load()) {
            for (a, v) in acc.iter_mut().zip(l) {
                *a += v;
            }
        }
        if let Some(s) = model.layer().fixed_point_stats() {
            sums.solver.get_or_insert_with(SolverEpoch::default).add(&s);
        }
        if let Some(e) = model.layer().decision_entropy() {
            let acc = sums.entropy.get_or_insert((0.0, 0));
            (acc.0, acc.1) = (acc.0 + e as f64, acc.1 + 1);
        }
        noise.apply(state.step, 1.0, &mut noise_root.fork(state.step as u64), &mut |f| model.visit_params_mut(f));
        let scale = if opts.clip > 0.0 { clip_factor(grad_norm(&mut |f| model.visit_params_mut(f)), opts.clip) } else { 1.0 };
        let lr = schedule.lr(state.step);
        opt.step(&mut |f| model.visit_params_mut(f), lr, scale);
        state.step += 1;
        sums.loss += stats.loss as f64 * b as f64;
        sums.aux += stats.aux as f64 * b as f64;
        sums.correct += stats.correct;
        sums.seen += b;
        let dt = t0.elapsed().as_secs_f64();
        sums.seconds += dt;
        state.train_seconds += dt;
        progress.step(epoch, s + 1, steps_per_epoch, (sums.loss / sums.seen as f64) as f32, sums.correct as f32 / sums.seen as f32);
        if s + 1 == steps_per_epoch {
            let sums = std::mem::take(&mut state.epoch);
            let seen = sums.seen.max(1) as f64;
            let report = EpochReport {
                epoch,
                train_loss: (sums.loss / seen) as f32,
                aux_loss: (sums.aux / seen) as f32,
                train_accuracy_soft: (sums.correct as f64 / seen) as f32,
                test_accuracy: model.accuracy(&split.test)?,
                lr,
                seconds: sums.seconds,
                expert_load: sums.load.map(|l| l.iter().map(|v| v / steps_per_epoch as f32).collect()),
                fixed_point: sums.solver.map(SolverEpoch::mean),
                decision_entropy: sums.entropy.map(|(s, n)| (s / n.max(1) as f64) as f32),
                route_usage: route_usage(model, &split.test)?,
            };
            state.epoch.load = model.layer().expert_load().map(|l| vec![0.0; l.len()]);
            progress.epoch(&report);
            state.history.push(report);
        }
        if opts.save_every > 0 && state.step.is_multiple_of(opts.save_every) {
            progress.checkpoint(model, &*opt, state)?;
        }
    }
    // the run is over, and with it any guided phase: the saved model is the structured one
    if let Some(keep) = model.set_progress(state.step, total) {
        opt.retain(&keep);
    }
    let test_accuracy = state.history.last().map_or(0.0, |r| r.test_accuracy);
    let train_accuracy = model.accuracy(&split.train)?;
    Ok(TrainReport { history: state.history.clone(), test_accuracy, train_accuracy, train_seconds: state.train_seconds, steps: state.step })
}

/// Saves a classifier in the middle (or at the end) of a run: the model, the optimizer's
/// state, the run state and `config` (the run's configuration, JSON), so that
/// [`load_run`] can continue it exactly.
pub fn save_run<C: Serialize>(
    path: &std::path::Path,
    model: &Classifier,
    opt: &dyn Optimizer,
    kind: OptimizerKind,
    state: &TrainState,
    config: &C,
) -> Result<()> {
    let named = model.named_params();
    let mut w = model.checkpoint()?;
    w.optimizer(kind.name(), opt, &named).json(TRAIN_KEY, config)?.json(STATE_KEY, state)?;
    w.write(path)
}

/// A run read back by [`load_run`].
pub struct SavedRun<C> {
    /// The model with its trained weights.
    pub model: Classifier,
    /// The run's configuration.
    pub config: C,
    /// Where the run stood.
    pub state: TrainState,
    /// The optimizer with its state.
    pub optimizer: Box<dyn Optimizer>,
}

/// Loads a checkpoint written by [`save_run`]; `optimizer_for` builds the run's optimizer from
/// its configuration, and its state is then restored from the file.
pub fn load_run<C: serde::de::DeserializeOwned>(path: &std::path::Path, optimizer_for: impl FnOnce(&C) -> Box<dyn Optimizer>) -> Result<SavedRun<C>> {
    let ck = CheckpointReader::open(path)?;
    ck.refuse_quantized("resuming training")?;
    let model = Classifier::from_checkpoint(&ck)?;
    let (Some(config), Some(state)) = (ck.json_opt::<C>(TRAIN_KEY)?, ck.json_opt::<TrainState>(STATE_KEY)?) else {
        return Err(ck.error("holds a model but no run state to resume (it was not written by `ffwd train --save`)"));
    };
    let mut optimizer = optimizer_for(&config);
    let named: Vec<(String, Vec<usize>)> = model.named_params().into_iter().map(|(n, p)| (n, p.shape.clone())).collect();
    ck.read_optimizer(&ck.tensors()?, optimizer.as_mut(), &named)?;
    Ok(SavedRun { model, config, state, optimizer })
}
