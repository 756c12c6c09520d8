//! AR-Net forecaster (Triebe et al. 2019): the last `lags` values of a standardised series
//! predict the next `horizon` values directly (one output per step ahead).
//!
//! `ŷ = AR(x) + FFN(x)`: `AR` is a linear map `lags → horizon` (`ar.weight`: `horizon × lags`,
//! `ar.bias`), which alone is a classic AR(p) model learned by gradient descent; AR-Net's
//! sparsity regulariser on its weights drives unneeded lags to zero. The optional FFN (any
//! layer kind, `ffn.*`) adds a non-linear term. The input's column `j` holds lag `lags − j`
//! (the last column is the most recent value).

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::checkpoint::{CheckpointReader, CheckpointWriter, CONFIG_KEY, FORECASTER_FORMAT};
use crate::core::{Param, Rng};
use crate::data::timeseries::Frequency;
use crate::error::{check_matrix, Error, Result};
use crate::kernels::{InferKernel, Workspace};
use crate::layers::{param_count, Input, Layer, LayerConfig, Linear};

/// Everything needed to rebuild a forecaster (stored in checkpoint metadata).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForecastConfig {
    /// Past values the model reads (p).
    pub lags: usize,
    /// Steps ahead it predicts (h).
    pub horizon: usize,
    /// The FFN added to the linear AR map (`None`: linear AR-Net).
    pub layer: Option<LayerConfig>,
    /// Mean of the series' training part (standardisation).
    pub mean: f32,
    /// Standard deviation of the series' training part.
    pub std: f32,
    /// The series' sampling step (for the timestamps of forecasts).
    pub freq: Frequency,
    /// The value column it was trained on.
    pub column: String,
}

impl ForecastConfig {
    /// Scalars of the model's parameters, computed without building it (`None` on overflow).
    pub fn param_count(&self) -> Option<usize> {
        let ar = self.horizon.checked_mul(self.lags.checked_add(1)?)?;
        match &self.layer {
            Some(l) => ar.checked_add(l.param_count(self.lags, self.horizon)?),
            None => Some(ar),
        }
    }
}

/// AR-Net's sparsity regulariser per weight: `2 / (1 + exp(−c₁·|w|^(1/c₂))) − 1`, c₁ = c₂ = 3.
pub fn sparsity_penalty(w: f32) -> f32 {
    2.0 / (1.0 + (-3.0 * w.abs().cbrt()).exp()) - 1.0
}

/// Derivative of [`sparsity_penalty`]; |w| is clamped at 1e-4 where `|w|^(−2/3)` diverges.
pub fn sparsity_grad(w: f32) -> f32 {
    let a = w.abs().max(1e-4);
    let e = (-3.0 * a.cbrt()).exp();
    let s = 2.0 * 3.0 * e / ((1.0 + e) * (1.0 + e)) / 3.0 * a.powf(-2.0 / 3.0);
    if w < 0.0 {
        -s
    } else {
        s
    }
}

/// Prefix of the AR map's parameters.
pub const AR_PREFIX: &str = "ar";
/// Prefix of the FFN's parameters in checkpoints.
pub const FFN_PREFIX: &str = "ffn.";

/// `x` (`batch × lags`, standardised) → `batch × horizon` (standardised).
///
/// ```
/// use ffwd::data::timeseries::Frequency;
/// use ffwd::models::{ForecastConfig, Forecaster};
///
/// let cfg = ForecastConfig { lags: 3, horizon: 2, layer: None, mean: 10.0, std: 2.0, freq: Frequency::Yearly, column: "y".into() };
/// let model = Forecaster::new(cfg, 0)?;
/// let next = model.forecast(&[9.0, 10.0, 11.0, 12.0])?; // the last 3 values are read
/// assert_eq!(next.len(), 2);
/// # Ok::<(), ffwd::Error>(())
/// ```
pub struct Forecaster {
    cfg: ForecastConfig,
    ar: Linear,
    ffn: Option<Box<dyn Layer>>,
    kernel: OnceLock<Option<Box<dyn InferKernel>>>,
    y: Vec<f32>,
    dy: Vec<f32>,
}

impl Forecaster {
    /// A freshly initialised forecaster; `seed` fixes the initial weights.
    pub fn new(cfg: ForecastConfig, seed: u64) -> Result<Self> {
        if cfg.lags == 0 || cfg.horizon == 0 {
            return Err(Error::Config(format!("forecaster needs lags ≥ 1 and horizon ≥ 1, got lags {} and horizon {}", cfg.lags, cfg.horizon)));
        }
        if !(cfg.std.is_finite() && cfg.std > 0.0 && cfg.mean.is_finite()) {
            return Err(Error::Config(format!("forecaster standardisation needs a finite mean and a positive std, got {} and {}", cfg.mean, cfg.std)));
        }
        crate::layers::check_size("the forecaster", cfg.param_count())?;
        let mut rng = Rng::new(seed).fork(0xf0ca);
        let ar = Linear::new(AR_PREFIX, cfg.lags, cfg.horizon, &mut rng);
        let ffn = match &cfg.layer {
            Some(l) => Some(l.build(cfg.lags, cfg.horizon, &mut rng)?),
            None => None,
        };
        Ok(Forecaster { cfg, ar, ffn, kernel: OnceLock::new(), y: Vec::new(), dy: Vec::new() })
    }

    /// The configuration.
    pub fn config(&self) -> &ForecastConfig {
        &self.cfg
    }

    /// The AR weights, `horizon × lags` (row k: step k + 1 ahead; column j: lag `lags − j`).
    pub fn ar_weights(&self) -> &[f32] {
        &self.ar.weight.value
    }

    /// The FFN, if any.
    pub fn ffn(&self) -> Option<&dyn Layer> {
        self.ffn.as_deref()
    }

    /// Number of trainable scalars.
    pub fn param_count(&self) -> usize {
        self.ar.weight.len() + self.ar.bias.len() + self.ffn.as_deref().map_or(0, param_count)
    }

    /// Parameters with their checkpoint names.
    pub fn named_params(&self) -> Vec<(String, &Param)> {
        let mut v = vec![(self.ar.weight.name.clone(), &self.ar.weight), (self.ar.bias.name.clone(), &self.ar.bias)];
        if let Some(f) = &self.ffn {
            v.extend(f.params().into_iter().map(|p| (format!("{FFN_PREFIX}{}", p.name), p)));
        }
        v
    }

    /// Visits the parameters mutably (AR map first); drops the cached inference kernel.
    pub fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.kernel.take();
        f(&mut self.ar.weight);
        f(&mut self.ar.bias);
        if let Some(l) = &mut self.ffn {
            l.visit_params_mut(f);
        }
    }

    /// Zeroes every gradient.
    pub fn zero_grad(&mut self) {
        self.visit_params_mut(&mut |p| p.zero_grad());
    }

    /// Forward and backward on one batch of standardised windows: `x` is `batch × lags`,
    /// `target` `batch × horizon`. *Adds* the gradient of mean squared error + the FFN's
    /// auxiliary loss + `sparsity` · (mean AR-Net penalty over the AR weights) into the
    /// gradients. Returns (mean squared error, sparsity term).
    pub fn forward_backward(&mut self, x: &[f32], target: &[f32], sparsity: f32, rng: &mut Rng) -> Result<(f32, f32)> {
        let (p, h) = (self.cfg.lags, self.cfg.horizon);
        let batch = target.len() / h;
        check_matrix("forecast targets", target.len(), batch, h)?;
        check_matrix("forecast input", x.len(), batch, p)?;
        self.kernel.take();
        crate::layers::ensure_len(&mut self.y, 2 * batch * h);
        crate::layers::ensure_len(&mut self.dy, batch * h);
        let (y, extra) = self.y.split_at_mut(batch * h);
        self.ar.forward(x, batch, y);
        if let Some(f) = &mut self.ffn {
            let extra = &mut extra[..batch * h];
            f.forward_train(Input::new(x, batch), extra, rng)?;
            y.iter_mut().zip(extra.iter()).for_each(|(a, b)| *a += b);
        }
        let n = (batch * h) as f32;
        let mut sse = 0.0f64;
        for ((d, &yy), &t) in self.dy.iter_mut().zip(y.iter()).zip(target) {
            let e = yy - t;
            sse += (e as f64) * (e as f64);
            *d = 2.0 * e / n;
        }
        let dy = &self.dy[..batch * h];
        self.ar.backward(x, batch, dy, None, false);
        if let Some(f) = &mut self.ffn {
            f.backward(Input::new(x, batch), dy, None)?;
        }
        let mut reg = 0.0f64;
        if sparsity > 0.0 {
            let m = self.ar.weight.len() as f32;
            for (g, &w) in self.ar.weight.grad.iter_mut().zip(&self.ar.weight.value) {
                reg += sparsity_penalty(w) as f64;
                *g += sparsity * sparsity_grad(w) / m;
            }
            reg *= sparsity as f64 / m as f64;
        }
        Ok(((sse / n as f64) as f32, reg as f32))
    }

    fn ffn_kernel(&self) -> Option<&dyn InferKernel> {
        self.kernel.get_or_init(|| self.ffn.as_ref().map(|f| f.kernel())).as_deref()
    }

    /// Inference on standardised windows: `x` (`batch × lags`) → `batch × horizon`
    /// (trees route hard).
    pub fn predict_standardised(&self, x: &[f32], batch: usize) -> Result<Vec<f32>> {
        check_matrix("forecast input", x.len(), batch, self.cfg.lags)?;
        let h = self.cfg.horizon;
        let mut y = vec![0.0; batch * h];
        self.ar.forward(x, batch, &mut y);
        if let Some(k) = self.ffn_kernel() {
            let mut extra = vec![0.0; batch * h];
            k.forward(x, batch, &mut extra, &mut Workspace::new())?;
            y.iter_mut().zip(&extra).for_each(|(a, b)| *a += b);
        }
        Ok(y)
    }

    /// The next `horizon` values after `history` (raw units; its last `lags` values are read).
    pub fn forecast(&self, history: &[f32]) -> Result<Vec<f32>> {
        let p = self.cfg.lags;
        if history.len() < p {
            return Err(Error::Invalid(format!("forecast needs the last {p} values (the model's lags), got {}", history.len())));
        }
        if let Some(bad) = history[history.len() - p..].iter().position(|v| !v.is_finite()) {
            return Err(Error::Invalid(format!("forecast history: value {} of the last {p} is not finite", bad + 1)));
        }
        let x: Vec<f32> = history[history.len() - p..].iter().map(|&v| (v - self.cfg.mean) / self.cfg.std).collect();
        Ok(self.predict_standardised(&x, 1)?.into_iter().map(|z| z * self.cfg.std + self.cfg.mean).collect())
    }

    /// A checkpoint writer holding this model (format `forecaster/1`).
    pub fn checkpoint(&self) -> Result<CheckpointWriter<'_>> {
        let mut w = CheckpointWriter::new(FORECASTER_FORMAT);
        w.params(&self.named_params()).json(CONFIG_KEY, &self.cfg)?;
        Ok(w)
    }

    /// Saves the model to `path` (atomically).
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        self.checkpoint()?.write(path)
    }

    /// Loads a model saved by [`Forecaster::save`].
    pub fn load(path: &std::path::Path) -> Result<Self> {
        Self::from_checkpoint(&CheckpointReader::open(path)?)
    }

    /// The model stored in an opened checkpoint.
    pub fn from_checkpoint(ck: &CheckpointReader) -> Result<Self> {
        ck.expect_format(FORECASTER_FORMAT)?;
        let cfg: ForecastConfig = ck.json(CONFIG_KEY)?;
        ck.check_claim("the forecaster", cfg.param_count())?;
        let st = ck.tensors()?;
        let mut model = ck.about(Forecaster::new(cfg, 0))?;
        let named: Vec<(String, Vec<usize>)> = model.named_params().iter().map(|(n, p)| (n.clone(), p.shape.clone())).collect();
        ck.fill_named(&st, &named, &mut |f| model.visit_params_mut(f))?;
        Ok(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn penalty_gradient_matches_finite_differences() {
        for w in [-0.8f32, -0.05, 0.01, 0.3, 1.5] {
            let eps = 1e-3 * w.abs();
            let fd = (sparsity_penalty(w + eps) as f64 - sparsity_penalty(w - eps) as f64) / (2.0 * eps as f64);
            assert!((fd - sparsity_grad(w) as f64).abs() < 2e-3 * fd.abs().max(1.0), "w {w}: fd {fd} vs {}", sparsity_grad(w));
        }
        assert_eq!(sparsity_penalty(0.0), 0.0);
        assert!(sparsity_penalty(10.0) > 0.99);
    }
}
