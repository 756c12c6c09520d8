//! Backpropagation training of a [`Classifier`]: shuffled minibatches, warmup + cosine LR,
//! AdamW or SGD, optional global-norm clipping, evaluation (hard inference) after each epoch.
//! After the buffers are sized by the first step, a step allocates nothing.

use std::time::Instant;

use serde::Serialize;

use crate::core::Rng;
use crate::data::Split;
use crate::error::{Error, Result};
use crate::models::Classifier;
use crate::optim::{clip_factor, grad_norm, AdamW, Optimizer, OptimizerKind, Schedule, Sgd};

/// Hyper-parameters of a training run.
#[derive(Clone, Debug)]
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
}

/// What happened in one epoch.
#[derive(Clone, Debug, Serialize)]
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert_load: Option<Vec<f32>>,
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
}

/// Progress sink that ignores everything.
pub struct Silent;
impl Progress for Silent {}

/// Trains `model` on `split.train`, evaluating on `split.test` after each epoch.
pub fn train(model: &mut Classifier, split: &Split, opts: &TrainOptions, progress: &mut dyn Progress) -> Result<TrainReport> {
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
    let n = data.len();
    let batch = opts.batch.min(n);
    let steps_per_epoch = n.div_ceil(batch);
    let total = steps_per_epoch * opts.epochs;
    let schedule = Schedule { peak: opts.lr, warmup: opts.warmup.min(total / 2), total, min_ratio: opts.min_lr_ratio };
    let mut opt: Box<dyn Optimizer> = match opts.optimizer {
        OptimizerKind::Adamw => Box::new(AdamW::new(opts.weight_decay)),
        OptimizerKind::Sgd => Box::new(Sgd::new(opts.momentum, opts.weight_decay)),
    };
    let root = Rng::new(opts.seed);
    let mut shuffle_rng = root.fork(1);
    let mut layer_rng = root.fork(2);
    let mut input_rng = root.fork(3);
    if !(0.0..1.0).contains(&opts.input_dropout) {
        return Err(Error::Config(format!("input_dropout must be in [0, 1), got {}", opts.input_dropout)));
    }
    let mut order: Vec<usize> = (0..n).collect();
    let mut xb = vec![0.0f32; batch * data.dim];
    let mut yb = vec![0u32; batch];
    let mut history = Vec::with_capacity(opts.epochs);
    let mut train_seconds = 0.0;
    let mut step = 0;
    for epoch in 1..=opts.epochs {
        shuffle_rng.shuffle(&mut order);
        let t0 = Instant::now();
        let (mut loss_sum, mut aux_sum, mut correct, mut seen) = (0.0f64, 0.0f64, 0usize, 0usize);
        let mut lr = schedule.lr(step);
        let mut load: Option<Vec<f32>> = model.layer().expert_load().map(|l| vec![0.0; l.len()]);
        for (s, idx) in order.chunks(batch).enumerate() {
            let b = idx.len();
            data.gather(idx, &mut xb[..b * data.dim], &mut yb[..b]);
            if opts.input_dropout > 0.0 {
                let keep = 1.0 / (1.0 - opts.input_dropout);
                for v in &mut xb[..b * data.dim] {
                    *v = if input_rng.uniform() < opts.input_dropout { 0.0 } else { *v * keep };
                }
            }
            model.zero_grad();
            let stats = model.forward_backward(&xb[..b * data.dim], &yb[..b], &mut layer_rng)?;
            if !stats.loss.is_finite() {
                return Err(Error::Invalid(format!("loss became {} at epoch {epoch}, step {s}: lower the learning rate", stats.loss)));
            }
            if let (Some(acc), Some(l)) = (load.as_mut(), model.layer().expert_load()) {
                for (a, v) in acc.iter_mut().zip(l) {
                    *a += v / steps_per_epoch as f32;
                }
            }
            let scale = if opts.clip > 0.0 { clip_factor(grad_norm(&mut |f| model.visit_params_mut(f)), opts.clip) } else { 1.0 };
            lr = schedule.lr(step);
            opt.step(&mut |f| model.visit_params_mut(f), lr, scale);
            step += 1;
            loss_sum += stats.loss as f64 * b as f64;
            aux_sum += stats.aux as f64 * b as f64;
            correct += stats.correct;
            seen += b;
            progress.step(epoch, s + 1, steps_per_epoch, (loss_sum / seen as f64) as f32, correct as f32 / seen as f32);
        }
        let seconds = t0.elapsed().as_secs_f64();
        train_seconds += seconds;
        let report = EpochReport {
            epoch,
            train_loss: (loss_sum / seen as f64) as f32,
            aux_loss: (aux_sum / seen as f64) as f32,
            train_accuracy_soft: correct as f32 / seen as f32,
            test_accuracy: model.accuracy(&split.test)?,
            lr,
            seconds,
            expert_load: load,
        };
        progress.epoch(&report);
        history.push(report);
    }
    let test_accuracy = history.last().map_or(0.0, |r| r.test_accuracy);
    let train_accuracy = model.accuracy(&split.train)?;
    Ok(TrainReport { history, test_accuracy, train_accuracy, train_seconds, steps: step })
}
