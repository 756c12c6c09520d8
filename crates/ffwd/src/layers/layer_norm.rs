//! Layer normalisation over the last axis (Ba, Kiros & Hinton 2016):
//! `y = (x − μ) / √(σ² + ε) · γ + β` per row. Parameters: `weight` (γ), `bias` (β).

use rayon::prelude::*;

use crate::core::simd::lane_sum;
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
        let block = |(((xb, yb), mb), rb): RowsOut<'_>| forward_rows(xb, yb, mb, rb, w, b, eps);
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
        let block = |(bi, (((xb, dyb), dxb), part)): (usize, RowsGrad<'_>)| {
            let r = bi * ROW_BLOCK..bi * ROW_BLOCK + xb.len() / d;
            backward_rows(xb, dyb, dxb, part, w, &mean[r.clone()], &rstd[r]);
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
    let m = lane_sum(x.len(), |i| x[i]) / n;
    let var = lane_sum(x.len(), |i| (x[i] - m) * (x[i] - m)) / n;
    (m, 1.0 / (var + eps).sqrt())
}

/// Normalises the rows of `x` (width `w.len()`) into `y`, recording their means and inverse
/// deviations, on the widest vector unit the CPU has (every path gives the same bits).
fn forward_rows(x: &[f32], y: &mut [f32], mean: &mut [f32], rstd: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::core::cpu::avx512() {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { x86::forward_avx512(x, y, mean, rstd, w, b, eps) };
        }
        if crate::core::cpu::avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { x86::forward_avx2(x, y, mean, rstd, w, b, eps) };
        }
    }
    forward_rows_impl(x, y, mean, rstd, w, b, eps)
}

#[inline(always)]
fn forward_rows_impl(x: &[f32], y: &mut [f32], mean: &mut [f32], rstd: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    let d = w.len();
    for (((xr, yr), m_out), r_out) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).zip(mean.iter_mut()).zip(rstd.iter_mut()) {
        let (m, r) = stats(xr, eps);
        (*m_out, *r_out) = (m, r);
        for (((yi, &xi), &g), &bb) in yr.iter_mut().zip(xr).zip(w).zip(b) {
            *yi = (xi - m) * r * g + bb;
        }
    }
}

/// Backward of [`forward_rows`] for a block of rows: adds dx, writes the block's γ and β
/// gradients into `part` (`2·d`).
fn backward_rows(x: &[f32], dy: &[f32], dx: &mut [f32], part: &mut [f32], w: &[f32], mean: &[f32], rstd: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::core::cpu::avx512() {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { x86::backward_avx512(x, dy, dx, part, w, mean, rstd) };
        }
        if crate::core::cpu::avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { x86::backward_avx2(x, dy, dx, part, w, mean, rstd) };
        }
    }
    backward_rows_impl(x, dy, dx, part, w, mean, rstd)
}

#[inline(always)]
fn backward_rows_impl(x: &[f32], dy: &[f32], dx: &mut [f32], part: &mut [f32], w: &[f32], mean: &[f32], rstd: &[f32]) {
    let d = w.len();
    let inv_d = 1.0 / d as f32;
    let (gw, gb) = part.split_at_mut(d);
    gw.fill(0.0);
    gb.fill(0.0);
    for (((xr, dyr), dxr), (&m, &rs)) in x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(dx.chunks_exact_mut(d)).zip(mean.iter().zip(rstd)) {
        // with x̂ = (x − μ)·r and g = dy·γ: dx = r · (g − mean(g) − x̂ · mean(g · x̂))
        let sg = lane_sum(d, |j| dyr[j] * w[j]);
        let sgx = lane_sum(d, |j| dyr[j] * w[j] * ((xr[j] - m) * rs));
        for (((gw, gb), &dv), &xv) in gw.iter_mut().zip(gb.iter_mut()).zip(dyr).zip(xr) {
            *gw += dv * ((xv - m) * rs);
            *gb += dv;
        }
        let (mg, mgx) = (sg * inv_d, sgx * inv_d);
        for (((dxv, &dv), &g), &xv) in dxr.iter_mut().zip(dyr).zip(w).zip(xr) {
            let xh = (xv - m) * rs;
            *dxv += rs * (dv * g - mg - xh * mgx);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn forward_avx512(x: &[f32], y: &mut [f32], mean: &mut [f32], rstd: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
        super::forward_rows_impl(x, y, mean, rstd, w, b, eps)
    }

    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn forward_avx2(x: &[f32], y: &mut [f32], mean: &mut [f32], rstd: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
        super::forward_rows_impl(x, y, mean, rstd, w, b, eps)
    }

    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn backward_avx512(x: &[f32], dy: &[f32], dx: &mut [f32], part: &mut [f32], w: &[f32], mean: &[f32], rstd: &[f32]) {
        super::backward_rows_impl(x, dy, dx, part, w, mean, rstd)
    }

    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn backward_avx2(x: &[f32], dy: &[f32], dx: &mut [f32], part: &mut [f32], w: &[f32], mean: &[f32], rstd: &[f32]) {
        super::backward_rows_impl(x, dy, dx, part, w, mean, rstd)
    }
}
