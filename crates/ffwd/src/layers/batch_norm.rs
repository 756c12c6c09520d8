//! Batch normalisation over the feature axis (Ioffe & Szegedy 2015) for the channel-idle FFN:
//! training normalises with the batch's mean and biased variance and updates running
//! estimates (momentum 0.1, unbiased variance, as PyTorch); inference uses the running
//! estimates, so it is an affine map `s ⊙ x + t` that folds into the next linear map.
//!
//! Parameters: `{prefix}.weight` (γ), `{prefix}.bias` (β), and the running estimates
//! `{prefix}.running_mean`, `{prefix}.running_var` stored as parameters without gradient or
//! decay (so checkpoints carry them; optimizers leave them alone).

use crate::core::Param;

/// ε added to the variance.
pub const EPS: f32 = 1e-5;
/// Weight of the newest batch in the running estimates.
pub const MOMENTUM: f32 = 0.1;

/// Batch normalisation of `n` features.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    /// γ (`n`).
    pub gamma: Param,
    /// β (`n`).
    pub beta: Param,
    /// Running mean (`n`), updated by training forwards.
    pub running_mean: Param,
    /// Running variance (`n`), updated by training forwards.
    pub running_var: Param,
    /// Normalised input of the last training forward (`batch × n`).
    xhat: Vec<f32>,
    /// `1 / √(var + ε)` of the last training forward (`n`).
    inv_std: Vec<f32>,
    /// Per-feature scratch (`n` each).
    sums: Vec<f32>,
    sums2: Vec<f32>,
}

impl BatchNorm {
    /// γ = 1, β = 0, running mean 0 and variance 1.
    pub fn new(prefix: &str, n: usize) -> Self {
        let mut gamma = Param::zeros(&format!("{prefix}.weight"), &[n], false);
        gamma.value.fill(1.0);
        let mut running_var = Param::zeros(&format!("{prefix}.running_var"), &[n], false);
        running_var.value.fill(1.0);
        BatchNorm {
            gamma,
            beta: Param::zeros(&format!("{prefix}.bias"), &[n], false),
            running_mean: Param::zeros(&format!("{prefix}.running_mean"), &[n], false),
            running_var,
            xhat: Vec::new(),
            inv_std: Vec::new(),
            sums: Vec::new(),
            sums2: Vec::new(),
        }
    }

    fn n(&self) -> usize {
        self.gamma.len()
    }

    /// Training forward: `x` (`batch × n`) → `y`, with batch statistics; updates the running
    /// estimates. `batch` must be at least 1 (a batch of 1 has variance 0: `y = β`).
    pub fn forward_train(&mut self, x: &[f32], batch: usize, y: &mut [f32]) {
        let n = self.n();
        super::ensure_len(&mut self.xhat, batch * n);
        super::ensure_len(&mut self.inv_std, n);
        // row-major passes (contiguous, vectorisable): the mean, then the centred variance
        let inv_b = 1.0 / batch as f32;
        let mean = &mut self.mean_buf(n);
        for row in x[..batch * n].chunks_exact(n) {
            mean.iter_mut().zip(row).for_each(|(m, &v)| *m += v);
        }
        mean.iter_mut().for_each(|m| *m *= inv_b);
        let mut var = std::mem::take(&mut self.sums2);
        var.clear();
        var.resize(n, 0.0);
        for row in x[..batch * n].chunks_exact(n) {
            var.iter_mut().zip(row).zip(mean.iter()).for_each(|((s, &v), &m)| *s += (v - m) * (v - m));
        }
        var.iter_mut().for_each(|s| *s *= inv_b);
        for (inv, &v) in self.inv_std.iter_mut().zip(&var) {
            *inv = 1.0 / (v + EPS).sqrt();
        }
        for ((xr, hr), yr) in x[..batch * n].chunks_exact(n).zip(self.xhat.chunks_exact_mut(n)).zip(y[..batch * n].chunks_exact_mut(n)) {
            for j in 0..n {
                let xh = (xr[j] - mean[j]) * self.inv_std[j];
                hr[j] = xh;
                yr[j] = self.gamma.value[j] * xh + self.beta.value[j];
            }
        }
        let unbias = if batch > 1 { batch as f32 / (batch - 1) as f32 } else { 1.0 };
        for j in 0..n {
            self.running_mean.value[j] = (1.0 - MOMENTUM) * self.running_mean.value[j] + MOMENTUM * mean[j];
            self.running_var.value[j] = (1.0 - MOMENTUM) * self.running_var.value[j] + MOMENTUM * var[j] * unbias;
        }
        self.sums = std::mem::take(mean);
        self.sums2 = var;
    }

    /// A zeroed per-feature buffer (reusing the last forward's).
    fn mean_buf(&mut self, n: usize) -> Vec<f32> {
        let mut v = std::mem::take(&mut self.sums);
        v.clear();
        v.resize(n, 0.0);
        v
    }

    /// Backward of the last training forward: adds dγ, dβ; writes dx (`batch × n`).
    pub fn backward(&mut self, dy: &[f32], batch: usize, dx: &mut [f32]) {
        let n = self.n();
        let inv_b = 1.0 / batch as f32;
        // Σ dy and Σ dy·x̂ per feature, row-major
        let mut sum_dy = std::mem::take(&mut self.sums);
        let mut sum_dy_xh = std::mem::take(&mut self.sums2);
        sum_dy.clear();
        sum_dy.resize(n, 0.0);
        sum_dy_xh.clear();
        sum_dy_xh.resize(n, 0.0);
        for (gr, hr) in dy[..batch * n].chunks_exact(n).zip(self.xhat.chunks_exact(n)) {
            for j in 0..n {
                sum_dy[j] += gr[j];
                sum_dy_xh[j] += gr[j] * hr[j];
            }
        }
        for j in 0..n {
            self.gamma.grad[j] += sum_dy_xh[j];
            self.beta.grad[j] += sum_dy[j];
        }
        // dx = γ/σ · (dy − mean(dy) − x̂ · mean(dy·x̂))
        for ((gr, hr), dr) in dy[..batch * n].chunks_exact(n).zip(self.xhat.chunks_exact(n)).zip(dx[..batch * n].chunks_exact_mut(n)) {
            for j in 0..n {
                dr[j] = self.gamma.value[j] * self.inv_std[j] * (gr[j] - inv_b * sum_dy[j] - hr[j] * inv_b * sum_dy_xh[j]);
            }
        }
        (self.sums, self.sums2) = (sum_dy, sum_dy_xh);
    }

    /// The inference map `y = s ⊙ x + t` (running estimates).
    pub fn affine(&self) -> (Vec<f32>, Vec<f32>) {
        let s: Vec<f32> = self.gamma.value.iter().zip(&self.running_var.value).map(|(g, v)| g / (v + EPS).sqrt()).collect();
        let t = self.beta.value.iter().zip(&self.running_mean.value).zip(&s).map(|((b, m), s)| b - m * s).collect();
        (s, t)
    }

    /// The four parameters: γ, β, running mean, running variance.
    pub fn params(&self) -> [&Param; 4] {
        [&self.gamma, &self.beta, &self.running_mean, &self.running_var]
    }

    /// Visits them mutably in [`BatchNorm::params`] order.
    pub fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        f(&mut self.gamma);
        f(&mut self.beta);
        f(&mut self.running_mean);
        f(&mut self.running_var);
    }
}
