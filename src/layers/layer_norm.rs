//! Layer normalisation over the last axis (Ba, Kiros & Hinton 2016):
//! `y = (x − μ) / √(σ² + ε) · γ + β` per row. Parameters: `weight` (γ), `bias` (β).

use crate::core::Param;

/// LayerNorm of rows of width `d`, with the per-row statistics cached for backward.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    /// γ, `d`.
    pub weight: Param,
    /// β, `d`.
    pub bias: Param,
    eps: f32,
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

impl LayerNorm {
    /// γ = 1, β = 0; parameters named `{prefix}.weight`, `{prefix}.bias`.
    pub fn new(prefix: &str, d: usize) -> Self {
        let mut weight = Param::zeros(&format!("{prefix}.weight"), &[d], false);
        weight.value.fill(1.0);
        LayerNorm { weight, bias: Param::zeros(&format!("{prefix}.bias"), &[d], false), eps: 1e-5, mean: Vec::new(), rstd: Vec::new() }
    }

    /// Width of a row.
    pub fn dim(&self) -> usize {
        self.weight.len()
    }

    /// One row without caching (inference): `x`, `y`: `d`.
    pub fn forward_row(&self, x: &[f32], y: &mut [f32]) {
        let (m, r) = stats(x, self.eps);
        for (((yi, &xi), &g), &b) in y.iter_mut().zip(x).zip(&self.weight.value).zip(&self.bias.value) {
            *yi = (xi - m) * r * g + b;
        }
    }

    /// `x`, `y`: `rows × d`; caches the statistics.
    pub fn forward(&mut self, x: &[f32], rows: usize, y: &mut [f32]) {
        let d = self.dim();
        self.mean.resize(rows, 0.0);
        self.rstd.resize(rows, 0.0);
        for (i, (xr, yr)) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).take(rows).enumerate() {
            let (m, r) = stats(xr, self.eps);
            self.mean[i] = m;
            self.rstd[i] = r;
            for (((yi, &xi), &g), &b) in yr.iter_mut().zip(xr).zip(&self.weight.value).zip(&self.bias.value) {
                *yi = (xi - m) * r * g + b;
            }
        }
    }

    /// Backward of the last [`LayerNorm::forward`] on the same `x`: adds the parameter
    /// gradients and adds dL/dx into `dx` (the residual stream's gradient accumulates).
    pub fn backward(&mut self, x: &[f32], rows: usize, dy: &[f32], dx: &mut [f32]) {
        let d = self.dim();
        let inv_d = 1.0 / d as f32;
        for i in 0..rows {
            let (xr, dyr, dxr) = (&x[i * d..(i + 1) * d], &dy[i * d..(i + 1) * d], &mut dx[i * d..(i + 1) * d]);
            let (m, r) = (self.mean[i], self.rstd[i]);
            // with x̂ = (x − μ)·r and g = dy·γ: dx = r · (g − mean(g) − x̂ · mean(g · x̂))
            let (mut sg, mut sgx) = (0.0f32, 0.0f32);
            for j in 0..d {
                let xh = (xr[j] - m) * r;
                let g = dyr[j] * self.weight.value[j];
                sg += g;
                sgx += g * xh;
                self.weight.grad[j] += dyr[j] * xh;
                self.bias.grad[j] += dyr[j];
            }
            let (mg, mgx) = (sg * inv_d, sgx * inv_d);
            for j in 0..d {
                let xh = (xr[j] - m) * r;
                dxr[j] += r * (dyr[j] * self.weight.value[j] - mg - xh * mgx);
            }
        }
    }

    /// The parameters, γ then β.
    pub fn params(&self) -> [&Param; 2] {
        [&self.weight, &self.bias]
    }

    /// Visits γ then β.
    pub fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        f(&mut self.weight);
        f(&mut self.bias);
    }
}

fn stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let m = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - m) * (v - m)).sum::<f32>() / n;
    (m, 1.0 / (var + eps).sqrt())
}
