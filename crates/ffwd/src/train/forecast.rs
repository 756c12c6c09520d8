//! Training an AR-Net forecaster on one series, with its baselines and metrics.
//!
//! The series is split in time order (never shuffled across time) into train, validation and
//! test parts; standardisation uses the train part only. A window's origin `t` is the index of
//! its first predicted value: it reads `values[t − lags .. t]` and predicts
//! `values[t .. t + horizon]`, and it belongs to the part that holds all its targets (its
//! inputs may reach back into earlier parts, as a forecast would). Minibatches shuffle the
//! training windows; the last epoch's weights are kept (or the best validation epoch's).
//! Metrics (MAE, RMSE, MASE; raw units, over every step ahead) per part for the model, the
//! seasonal-naive forecast and a least-squares AR(lags).

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::core::Rng;
use crate::data::timeseries::Series;
use crate::error::{Error, Result};
use crate::layers::LayerConfig;
use crate::models::forecast_baselines::{ar_orders, seasonal_naive, seasonal_scale, LeastSquaresAr};
use crate::models::{ForecastConfig, Forecaster};
use crate::optim::{clip_factor, grad_norm, AdamW, GradNoise, Optimizer, Schedule};

/// Options of a forecasting run (the `ffwd forecast train` flags).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForecastOptions {
    /// Past values the model reads (p).
    pub lags: usize,
    /// Steps ahead it predicts directly (h).
    pub horizon: usize,
    /// The FFN added to the linear AR map (`None`: linear AR-Net).
    pub layer: Option<LayerConfig>,
    /// Weight λ of AR-Net's sparsity regulariser on the AR weights (0 = off). It ramps up
    /// linearly over the first fifth of the steps.
    pub sparsity: f32,
    /// Passes over the training windows.
    pub epochs: usize,
    /// Windows per minibatch.
    pub batch: usize,
    /// Peak learning rate (AdamW, cosine decay to 1 % of it).
    pub lr: f32,
    /// Decoupled weight decay of the FFN's weights (the AR weights have the sparsity term).
    pub weight_decay: f32,
    /// Max global gradient norm (0 = off).
    pub clip: f32,
    /// Fraction of the series for validation (the part after the training part).
    pub val_fraction: f32,
    /// Fraction of the series for testing (the last part).
    pub test_fraction: f32,
    /// Seasonal period in steps for the seasonal-naive forecast and MASE (default: 12 for
    /// monthly, 52 for weekly, 7 for daily, 1 otherwise).
    pub season: Option<usize>,
    /// A lag counts as used when its AR weight's magnitude (max over steps ahead) is at least
    /// this (standardised units).
    pub lag_threshold: f32,
    /// Keep the weights of the epoch with the lowest validation error instead of the last
    /// epoch's (the schedule ends at 1 % of the peak rate, so the last weights have settled;
    /// with few validation windows the best epoch is often an early, noisy one).
    pub keep_best: bool,
    /// Seed of initialisation and shuffling.
    pub seed: u64,
    /// Gradient noise η (Neelakantan et al. 2015; 0 = off).
    pub grad_noise: f32,
    /// Gradient noise decay γ.
    pub grad_noise_gamma: f32,
}

impl Default for ForecastOptions {
    fn default() -> Self {
        ForecastOptions {
            lags: 12,
            horizon: 1,
            layer: None,
            sparsity: 0.0,
            epochs: 200,
            batch: 32,
            lr: 0.01,
            weight_decay: 0.0,
            clip: 0.0,
            val_fraction: 0.15,
            test_fraction: 0.15,
            season: None,
            lag_threshold: 0.05,
            keep_best: false,
            seed: 0,
            grad_noise: 0.0,
            grad_noise_gamma: 0.55,
        }
    }
}

/// Mean absolute error, root mean squared error and MASE of a set of forecasts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Mean absolute error (raw units).
    pub mae: f32,
    /// Root mean squared error (raw units).
    pub rmse: f32,
    /// MAE divided by the in-sample seasonal-naive MAE of the training part.
    pub mase: f32,
}

/// Metrics of one part of the series.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SplitMetrics {
    /// `train`, `val` or `test`.
    pub split: String,
    /// Forecast windows (origins) scored.
    pub windows: usize,
    /// The trained model.
    pub model: Metrics,
    /// Seasonal-naive (over the windows where a full season precedes the origin).
    pub seasonal_naive: Metrics,
    /// Least-squares AR(lags), direct multi-step.
    pub ar_least_squares: Metrics,
}

/// One epoch of training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ForecastEpoch {
    /// 1-based.
    pub epoch: usize,
    /// Mean squared error of the training windows (standardised, training mode).
    pub train_mse: f32,
    /// Mean sparsity term.
    pub sparsity: f32,
    /// Mean squared error of the validation windows (standardised, inference).
    pub val_mse: f32,
}

/// Everything a run measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ForecastReport {
    /// The value column.
    pub column: String,
    /// The sampling step (`yearly`, `monthly`, `weekly`, …).
    pub frequency: String,
    /// Values in the series.
    pub values: usize,
    /// Missing values that were filled.
    pub filled: usize,
    /// Values in the train, validation and test parts.
    pub split_values: [usize; 3],
    /// p.
    pub lags: usize,
    /// h.
    pub horizon: usize,
    /// Seasonal period used by the baselines and MASE.
    pub season: usize,
    /// Trainable scalars.
    pub params: usize,
    /// Per-epoch losses.
    pub history: Vec<ForecastEpoch>,
    /// The epoch with the lowest validation error.
    pub best_epoch: usize,
    /// The epoch whose weights were kept (the last, or the best with `keep_best`).
    pub kept_epoch: usize,
    /// Metrics per part.
    pub metrics: Vec<SplitMetrics>,
    /// Per lag 1..=p (most recent first): the AR weight of largest magnitude over the steps
    /// ahead, with its sign.
    pub ar_weights: Vec<f32>,
    /// The lags (1 = most recent) whose weight reaches `lag_threshold`.
    pub active_lags: Vec<usize>,
    /// The AR order a least-squares fit needs by AIC (orders 1..=lags, training part).
    pub aic_order: usize,
    /// The AR order a least-squares fit needs by BIC (orders 1..=lags, training part).
    pub bic_order: usize,
    /// Seconds of training.
    pub train_seconds: f64,
}

impl ForecastReport {
    /// The metrics of one part (`train`, `val`, `test`).
    pub fn split(&self, name: &str) -> Option<&SplitMetrics> {
        self.metrics.iter().find(|m| m.split == name)
    }
}

/// Standardised windows of one part of the series.
struct Windows {
    origins: Vec<usize>,
    x: Vec<f32>,
    y: Vec<f32>,
}

impl Windows {
    fn new(z: &[f32], range: std::ops::Range<usize>, p: usize, h: usize) -> Self {
        let (mut origins, mut x, mut y) = (Vec::new(), Vec::new(), Vec::new());
        for t in range.start.max(p)..=range.end.saturating_sub(h) {
            if t + h > range.end || t < p {
                continue;
            }
            origins.push(t);
            x.extend_from_slice(&z[t - p..t]);
            y.extend_from_slice(&z[t..t + h]);
        }
        Windows { origins, x, y }
    }

    fn len(&self) -> usize {
        self.origins.len()
    }
}

/// Trains a forecaster on `series` and scores it and the baselines on every part.
/// `on_epoch` is called after each epoch (progress bars).
pub fn fit_forecaster(series: &Series, opts: &ForecastOptions, on_epoch: &mut dyn FnMut(&ForecastEpoch)) -> Result<(Forecaster, ForecastReport)> {
    let (p, h, n) = (opts.lags, opts.horizon, series.len());
    if p == 0 || h == 0 {
        return Err(Error::Config(format!("lags and horizon must be at least 1, got lags {p}, horizon {h}")));
    }
    let fr = |f: f32, what: &str| {
        if (0.0..0.5).contains(&f) {
            Ok(f)
        } else {
            Err(Error::Config(format!("{what} must be in [0, 0.5), got {f}")))
        }
    };
    let (vf, tf) = (fr(opts.val_fraction, "val_fraction")?, fr(opts.test_fraction, "test_fraction")?);
    if opts.batch == 0 || opts.epochs == 0 {
        return Err(Error::Config("batch and epochs must be at least 1".into()));
    }
    let n_test = (n as f32 * tf).round() as usize;
    let n_val = (n as f32 * vf).round() as usize;
    let n_train = n - n_val - n_test;
    let bounds = [0..n_train, n_train..n_train + n_val, n_train + n_val..n];
    let values = &series.values;
    let train_vals = &values[..n_train];
    let mean = train_vals.iter().map(|&v| v as f64).sum::<f64>() / n_train.max(1) as f64;
    let var = train_vals.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n_train.max(1) as f64;
    let std = if var > 0.0 { var.sqrt() } else { 1.0 };
    let z: Vec<f32> = values.iter().map(|&v| ((v as f64 - mean) / std) as f32).collect();
    let parts: Vec<Windows> = bounds.iter().map(|r| Windows::new(&z, r.clone(), p, h)).collect();
    // the least-squares baseline needs more training windows than coefficients
    for (name, w, r, need) in [("train", &parts[0], &bounds[0], p + 2), ("validation", &parts[1], &bounds[1], 2)] {
        if w.len() < need {
            return Err(Error::Invalid(format!(
                "series `{}` ({n} values) is too short for lags {p} and horizon {h}: the {name} part ({} values) holds {} windows, it needs {need}",
                series.column,
                r.len(),
                w.len()
            )));
        }
    }
    let season = opts.season.unwrap_or_else(|| series.freq.default_season()).max(1);
    let cfg =
        ForecastConfig { lags: p, horizon: h, layer: opts.layer.clone(), mean: mean as f32, std: std as f32, freq: series.freq, column: series.column.clone() };
    let mut model = Forecaster::new(cfg, opts.seed)?;
    // the AR weights are kept sparse by the regulariser, not decayed
    model.visit_params_mut(&mut |q| {
        if q.name.starts_with(crate::models::forecaster::AR_PREFIX) {
            q.decay = false;
        }
    });

    let train = &parts[0];
    let steps_per_epoch = train.len().div_ceil(opts.batch);
    let total = steps_per_epoch * opts.epochs;
    let sched = Schedule { peak: opts.lr, warmup: 0, total, min_ratio: 0.01 };
    let noise = GradNoise { eta: opts.grad_noise, gamma: opts.grad_noise_gamma };
    let mut opt = AdamW::new(opts.weight_decay);
    let mut rng = Rng::new(opts.seed).fork(0x5eed);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let (mut xb, mut yb) = (Vec::with_capacity(opts.batch * p), Vec::with_capacity(opts.batch * h));
    let mut history = Vec::with_capacity(opts.epochs);
    let mut best: Option<(f32, usize, Vec<Vec<f32>>)> = None;
    let started = Instant::now();
    let mut step = 0usize;
    for epoch in 1..=opts.epochs {
        rng.shuffle(&mut order);
        let (mut sse, mut reg, mut seen) = (0.0f64, 0.0f64, 0usize);
        for chunk in order.chunks(opts.batch) {
            xb.clear();
            yb.clear();
            for &i in chunk {
                xb.extend_from_slice(&train.x[i * p..(i + 1) * p]);
                yb.extend_from_slice(&train.y[i * h..(i + 1) * h]);
            }
            let lambda = opts.sparsity * ((step + 1) as f32 / (0.2 * total as f32).max(1.0)).min(1.0);
            let (mse, r) = model.forward_backward(&xb, &yb, lambda, &mut rng)?;
            if !mse.is_finite() {
                return Err(Error::Invalid(format!("training diverged at epoch {epoch} (loss {mse}); lower --lr")));
            }
            noise.apply(step, 1.0, &mut Rng::new(opts.seed).fork(0x401e ^ step as u64), &mut |f| model.visit_params_mut(f));
            let scale = clip_factor(grad_norm(&mut |f| model.visit_params_mut(f)), opts.clip);
            opt.step(&mut |f| model.visit_params_mut(f), sched.lr(step), scale);
            sse += mse as f64 * chunk.len() as f64;
            reg += r as f64 * chunk.len() as f64;
            seen += chunk.len();
            step += 1;
        }
        let val_pred = model.predict_standardised(&parts[1].x, parts[1].len())?;
        let val_mse = (val_pred.iter().zip(&parts[1].y).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / val_pred.len() as f64) as f32;
        let e = ForecastEpoch { epoch, train_mse: (sse / seen as f64) as f32, sparsity: (reg / seen as f64) as f32, val_mse };
        on_epoch(&e);
        history.push(e);
        if best.as_ref().is_none_or(|b| val_mse < b.0) {
            let mut snapshot = Vec::new();
            if opts.keep_best {
                model.visit_params_mut(&mut |q| snapshot.push(q.value.clone()));
            }
            best = Some((val_mse, epoch, snapshot));
        }
    }
    let train_seconds = started.elapsed().as_secs_f64();
    let (best_epoch, kept_epoch) = match best {
        Some((_, epoch, _)) if !opts.keep_best => (epoch, opts.epochs),
        Some((_, epoch, snapshot)) => {
            let mut it = snapshot.into_iter();
            model.visit_params_mut(&mut |q| {
                if let Some(v) = it.next() {
                    q.value = v;
                }
            });
            (epoch, epoch)
        }
        None => (opts.epochs, opts.epochs),
    };

    // baselines fitted on the training part, scored in raw units
    let lsq = LeastSquaresAr::fit(&train.x, &train.y, p, h)?;
    let scale = seasonal_scale(train_vals, season);
    let mut metrics = Vec::new();
    for (name, w) in ["train", "val", "test"].into_iter().zip(&parts) {
        if w.len() == 0 {
            continue;
        }
        let raw = |zv: f32| (zv as f64 * std + mean) as f32;
        let pred = model.predict_standardised(&w.x, w.len())?;
        let (mut m_model, mut m_naive, mut m_lsq) = (Acc::default(), Acc::default(), Acc::default());
        for (i, &t) in w.origins.iter().enumerate() {
            let truth = &values[t..t + h];
            m_model.add(pred[i * h..(i + 1) * h].iter().map(|&v| raw(v)), truth);
            m_lsq.add(lsq.predict(&w.x[i * p..(i + 1) * p]).into_iter().map(raw), truth);
            if let Some(f) = seasonal_naive(values, t, h, season) {
                m_naive.add(f.into_iter(), truth);
            }
        }
        metrics.push(SplitMetrics {
            split: name.into(),
            windows: w.len(),
            model: m_model.done(scale),
            seasonal_naive: m_naive.done(scale),
            ar_least_squares: m_lsq.done(scale),
        });
    }
    let wts = model.ar_weights();
    let ar_weights: Vec<f32> = (1..=p)
        .map(|lag| {
            let j = p - lag;
            (0..h).map(|k| wts[k * p + j]).fold(0.0f32, |a, w| if w.abs() > a.abs() { w } else { a })
        })
        .collect();
    let active_lags = (1..=p).filter(|&l| ar_weights[l - 1].abs() >= opts.lag_threshold).collect();
    let (aic_order, bic_order) = ar_orders(&z[..n_train], p)?;
    let report = ForecastReport {
        column: series.column.clone(),
        frequency: series.freq.name(),
        values: n,
        filled: series.filled,
        split_values: [n_train, n_val, n_test],
        lags: p,
        horizon: h,
        season,
        params: model.param_count(),
        history,
        best_epoch,
        kept_epoch,
        metrics,
        ar_weights,
        active_lags,
        aic_order,
        bic_order,
        train_seconds,
    };
    Ok((model, report))
}

/// Running sums of absolute and squared errors.
#[derive(Default)]
struct Acc {
    abs: f64,
    sq: f64,
    n: usize,
}

impl Acc {
    fn add(&mut self, pred: impl Iterator<Item = f32>, truth: &[f32]) {
        for (a, &b) in pred.zip(truth) {
            let e = (a - b) as f64;
            self.abs += e.abs();
            self.sq += e * e;
            self.n += 1;
        }
    }

    fn done(&self, scale: f32) -> Metrics {
        if self.n == 0 {
            return Metrics { mae: f32::NAN, rmse: f32::NAN, mase: f32::NAN };
        }
        let mae = (self.abs / self.n as f64) as f32;
        Metrics { mae, rmse: (self.sq / self.n as f64).sqrt() as f32, mase: mae / scale }
    }
}
