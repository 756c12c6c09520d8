//! Layer normalisation over the last axis (Ba, Kiros & Hinton 2016):
//! `y = (x − μ) / √(σ² + ε) · γ + β` per row. Parameters: `weight` (γ), `bias` (β).

use rayon::prelude::*;

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
    /// Per-block γ and β gradients of the last backward.
    partial: Vec<f32>,
}

/// A forward block: rows of x, of y, and their means and inverse deviations.
type RowsOut<'a> = (((&'a [f32], &'a mut [f32]), &'a mut [f32]), &'a mut [f32]);
/// A backward block: rows of x, of dy, of dx, and the block's γ/β gradient.
type RowsGrad<'a> = (((&'a [f32], &'a [f32]), &'a mut [f32]), &'a mut [f32]);

/// Rows per parallel block of [`LayerNorm::forward`] and [`LayerNorm::backward`].
pub const ROW_BLOCK: usize = 64;

impl LayerNorm {
    /// γ = 1, β = 0; parameters named `{prefix}.weight`, `{prefix}.bias`.
    pub fn new(prefix: &str, d: usize) -> Self {
        let mut weight = Param::zeros(&format!("{prefix}.weight"), &[d], false);
        weight.value.fill(1.0);
        LayerNorm { weight, bias: Param::zeros(&format!("{prefix}.bias"), &[d], false), eps: 1e-5, mean: Vec::new(), rstd: Vec::new(), partial: Vec::new() }
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

    /// `x`, `y`: `rows × d`; caches the statistics. Rows run in parallel blocks.
    pub fn forward(&mut self, x: &[f32], rows: usize, y: &mut [f32]) {
        let d = self.dim();
        self.mean.resize(rows, 0.0);
        self.rstd.resize(rows, 0.0);
        let (w, b, eps) = (&self.weight.value, &self.bias.value, self.eps);
        let block = |(((xb, yb), mb), rb): RowsOut<'_>| {
            for (((xr, yr), m_out), r_out) in xb.chunks_exact(d).zip(yb.chunks_exact_mut(d)).zip(mb.iter_mut()).zip(rb.iter_mut()) {
                let (m, r) = stats(xr, eps);
                (*m_out, *r_out) = (m, r);
                for (((yi, &xi), &g), &bb) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                    *yi = (xi - m) * r * g + bb;
                }
            }
        };
        let (x, y) = (&x[..rows * d], &mut y[..rows * d]);
        if rows >= 2 * ROW_BLOCK && rayon::current_num_threads() > 1 {
            x.par_chunks(ROW_BLOCK * d)
                .zip(y.par_chunks_mut(ROW_BLOCK * d))
                .zip(self.mean.par_chunks_mut(ROW_BLOCK))
                .zip(self.rstd.par_chunks_mut(ROW_BLOCK))
                .for_each(block);
        } else {
            block((((x, y), &mut self.mean[..]), &mut self.rstd[..]));
        }
    }

    /// Backward of the last [`LayerNorm::forward`] on the same `x`: adds the parameter
    /// gradients and adds dL/dx into `dx` (the residual stream's gradient accumulates).
    /// Rows run in parallel blocks of [`ROW_BLOCK`]; each block's γ/β gradient is summed
    /// apart and the blocks are added in order, so the result does not depend on the
    /// thread count.
    pub fn backward(&mut self, x: &[f32], rows: usize, dy: &[f32], dx: &mut [f32]) {
        let d = self.dim();
        let blocks = rows.div_ceil(ROW_BLOCK);
        self.partial.resize(blocks * 2 * d, 0.0);
        let (w, mean, rstd) = (&self.weight.value, &self.mean, &self.rstd);
        let inv_d = 1.0 / d as f32;
        let block = |(bi, (((xb, dyb), dxb), part)): (usize, RowsGrad<'_>)| {
            let (gw, gb) = part.split_at_mut(d);
            gw.fill(0.0);
            gb.fill(0.0);
            for (r, ((xr, dyr), dxr)) in xb.chunks_exact(d).zip(dyb.chunks_exact(d)).zip(dxb.chunks_exact_mut(d)).enumerate() {
                let i = bi * ROW_BLOCK + r;
                let (m, rs) = (mean[i], rstd[i]);
                // with x̂ = (x − μ)·r and g = dy·γ: dx = r · (g − mean(g) − x̂ · mean(g · x̂))
                let (mut sg, mut sgx) = (0.0f32, 0.0f32);
                for j in 0..d {
                    let xh = (xr[j] - m) * rs;
                    let g = dyr[j] * w[j];
                    sg += g;
                    sgx += g * xh;
                    gw[j] += dyr[j] * xh;
                    gb[j] += dyr[j];
                }
                let (mg, mgx) = (sg * inv_d, sgx * inv_d);
                for j in 0..d {
                    let xh = (xr[j] - m) * rs;
                    dxr[j] += rs * (dyr[j] * w[j] - mg - xh * mgx);
                }
            }
        };
        let (x, dy, dx) = (&x[..rows * d], &dy[..rows * d], &mut dx[..rows * d]);
        let n = ROW_BLOCK * d;
        if blocks >= 2 && rayon::current_num_threads() > 1 {
            x.par_chunks(n).zip(dy.par_chunks(n)).zip(dx.par_chunks_mut(n)).zip(self.partial.par_chunks_mut(2 * d)).enumerate().for_each(block);
        } else {
            x.chunks(n).zip(dy.chunks(n)).zip(dx.chunks_mut(n)).zip(self.partial.chunks_mut(2 * d)).enumerate().for_each(block);
        }
        for part in self.partial.chunks_exact(2 * d) {
            for ((gw, gb), (pw, pb)) in self.weight.grad.iter_mut().zip(self.bias.grad.iter_mut()).zip(part[..d].iter().zip(&part[d..])) {
                *gw += pw;
                *gb += pb;
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
