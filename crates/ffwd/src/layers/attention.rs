//! Causal multi-head self-attention with explicit backward, and its single-token step over a
//! KV cache for generation.
//!
//! Shapes: the input is `B·T × d` (B sequences of T positions, row-major), `heads` divides `d`,
//! head width `hd = d / heads`. `qkv` maps `d → 3d` (queries, keys, values side by side),
//! `proj` maps `d → d`. Parameters: `qkv.weight` (`3d × d`), `qkv.bias`, `proj.weight`,
//! `proj.bias`.

use std::cell::RefCell;

use rayon::prelude::*;

use super::{ensure_len, Linear};
use crate::core::attention as fused;
use crate::core::gemm::{matmul_bias, matmul_bt, MatMut, MatRef};
use crate::core::profile::span;
use crate::core::scratch::with_buffer;
use crate::core::simd::{axpy, dot};
use crate::core::{Param, Rng};

/// The key/value caches of one sequence being decoded: per block, `capacity × d` keys and
/// values, and the number of positions filled.
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    pos: usize,
}

impl KvCache {
    /// Empty caches for `blocks` blocks of `capacity` positions of width `d`.
    pub fn new(blocks: usize, capacity: usize, d: usize) -> Self {
        KvCache { k: vec![vec![0.0; capacity * d]; blocks], v: vec![vec![0.0; capacity * d]; blocks], pos: 0 }
    }

    /// Positions filled.
    pub fn len(&self) -> usize {
        self.pos
    }

    /// True before the first position.
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// Forgets the cached positions.
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// Marks one more position filled (after every block wrote its keys and values there).
    pub fn advance(&mut self) {
        self.pos += 1;
    }
}

/// Causal self-attention over sequences.
#[derive(Clone, Debug)]
pub struct CausalSelfAttention {
    /// `d → 3d`.
    pub qkv: Linear,
    /// `d → d`.
    pub proj: Linear,
    heads: usize,
    // caches of the last forward
    qkv_out: Vec<f32>,
    /// Log-sum-exp of every query's scores, `b·heads × t`.
    lse: Vec<f32>,
    heads_out: Vec<f32>,
    merged: Vec<f32>,
    // backward scratch
    d_merged: Vec<f32>,
    d_heads: Vec<f32>,
    d_qkv: Vec<f32>,
}

impl CausalSelfAttention {
    /// `heads` heads over width `d`; weights `N(0, 0.02²)`, the output projection scaled by
    /// `proj_scale` (GPT-2 uses `1/√(2·layers)` so the residual stream does not grow with depth).
    pub fn new(prefix: &str, d: usize, heads: usize, proj_scale: f32, rng: &mut Rng) -> Self {
        let mut qkv = Linear::new(&format!("{prefix}.qkv"), d, 3 * d, rng);
        let mut proj = Linear::new(&format!("{prefix}.proj"), d, d, rng);
        for v in &mut qkv.weight.value {
            *v = 0.02 * rng.normal();
        }
        for v in &mut proj.weight.value {
            *v = 0.02 * proj_scale * rng.normal();
        }
        qkv.bias.value.fill(0.0);
        proj.bias.value.fill(0.0);
        CausalSelfAttention {
            qkv,
            proj,
            heads,
            qkv_out: Vec::new(),
            lse: Vec::new(),
            heads_out: Vec::new(),
            merged: Vec::new(),
            d_merged: Vec::new(),
            d_heads: Vec::new(),
            d_qkv: Vec::new(),
        }
    }

    /// Model width `d`.
    pub fn dim(&self) -> usize {
        self.proj.out_features()
    }

    /// Number of heads.
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// `x`: `b·t × d` → `y`: `b·t × d` (overwritten); caches what backward needs.
    pub fn forward(&mut self, x: &[f32], b: usize, t: usize, y: &mut [f32]) {
        let (d, nh) = (self.dim(), self.heads);
        let hd = d / nh;
        let rows = b * t;
        ensure_len(&mut self.qkv_out, rows * 3 * d);
        ensure_len(&mut self.lse, b * nh * t);
        ensure_len(&mut self.heads_out, b * nh * t * hd);
        ensure_len(&mut self.merged, rows * d);
        let s = span("attn qkv fwd");
        self.qkv.forward(x, rows, &mut self.qkv_out);
        drop(s);
        let s = span("attn core fwd");
        let scale = 1.0 / (hd as f32).sqrt();
        let qkv = &self.qkv_out[..rows * 3 * d];
        self.lse[..b * nh * t].par_chunks_mut(t).zip(self.heads_out[..b * nh * t * hd].par_chunks_mut(t * hd)).enumerate().for_each(|(item, (lse, o))| {
            let head = head_of(qkv, item, nh, t, d);
            with_buffer(&SCRATCH, fused::scratch_len(t, hd), |scratch| fused::forward(head, scale, o, lse, scratch));
        });
        // heads side by side: merged[bb·t + i, h·hd + c] = o_(bb,h)[i, c]
        let ho = &self.heads_out;
        self.merged[..rows * d].par_chunks_mut(d).enumerate().for_each(|(r, row)| {
            let (bb, i) = (r / t, r % t);
            for h in 0..nh {
                let item = bb * nh + h;
                row[h * hd..(h + 1) * hd].copy_from_slice(&ho[item * t * hd + i * hd..item * t * hd + (i + 1) * hd]);
            }
        });
        drop(s);
        let _s = span("attn proj fwd");
        self.proj.forward(&self.merged, rows, y);
    }

    /// Backward of the last forward on the same `x`: adds the parameter gradients and adds
    /// dL/dx into `dx` (`b·t × d`).
    pub fn backward(&mut self, x: &[f32], b: usize, t: usize, dy: &[f32], dx: &mut [f32]) {
        let (d, nh) = (self.dim(), self.heads);
        let hd = d / nh;
        let rows = b * t;
        ensure_len(&mut self.d_merged, rows * d);
        ensure_len(&mut self.d_heads, b * nh * 3 * t * hd);
        ensure_len(&mut self.d_qkv, rows * 3 * d);
        let s = span("attn proj bwd");
        self.proj.backward(&self.merged[..rows * d], rows, dy, Some(&mut self.d_merged[..rows * d]), false);
        drop(s);
        let s = span("attn core bwd");
        let scale = 1.0 / (hd as f32).sqrt();
        let (qkv, lse, ho, dm) = (&self.qkv_out[..rows * 3 * d], &self.lse[..b * nh * t], &self.heads_out[..b * nh * t * hd], &self.d_merged[..rows * d]);
        self.d_heads[..b * nh * 3 * t * hd].par_chunks_mut(3 * t * hd).enumerate().for_each(|(item, dh)| {
            let (bb, h) = (item / nh, item % nh);
            let head = head_of(qkv, item, nh, t, d);
            let (dq, rest) = dh.split_at_mut(t * hd);
            let (dk, dv) = rest.split_at_mut(t * hd);
            let (o, lse) = (&ho[item * t * hd..(item + 1) * t * hd], &lse[item * t..(item + 1) * t]);
            let d_o = &dm[bb * t * d + h * hd..];
            with_buffer(&SCRATCH, fused::scratch_len(t, hd), |scratch| fused::backward(head, scale, o, lse, d_o, d, dq, dk, dv, scratch));
        });
        let dh = &self.d_heads;
        self.d_qkv[..rows * 3 * d].par_chunks_mut(3 * d).enumerate().for_each(|(r, row)| {
            let (bb, i) = (r / t, r % t);
            for h in 0..nh {
                let item = (bb * nh + h) * 3 * t * hd;
                for part in 0..3 {
                    let src = &dh[item + part * t * hd + i * hd..item + part * t * hd + (i + 1) * hd];
                    row[part * d + h * hd..part * d + (h + 1) * hd].copy_from_slice(src);
                }
            }
        });
        drop(s);
        let _s = span("attn qkv bwd");
        self.qkv.backward(x, rows, &self.d_qkv[..rows * 3 * d], Some(dx), true);
    }

    /// One new position of each of `n` sequences: `x` (`n × d`, row i for sequence i) → `y`
    /// (`n × d`). `caches[i]` is sequence i's cache; this block's keys and values (block
    /// `layer`) are written at its position, which the caller advances after the last block.
    /// The projections run as `n`-row
    /// products; attention runs per sequence. `qkv` (`≥ n × 3d`), `o` (`≥ n × d`) and `scores`
    /// (`≥` the largest position + 1) are scratch.
    ///
    /// `transposed` holds the projections' weights transposed (`d × 3d`, `d × d`): above four
    /// rows the products then read them in place, without packing.
    #[allow(clippy::too_many_arguments)]
    pub fn step_batch(
        &self,
        x: &[f32],
        caches: &mut [&mut KvCache],
        layer: usize,
        qkv: &mut [f32],
        o: &mut [f32],
        scores: &mut [f32],
        y: &mut [f32],
        transposed: Option<(&[f32], &[f32])>,
    ) {
        let (d, nh, n) = (self.dim(), self.heads, caches.len());
        let hd = d / nh;
        let (qkv, o) = (&mut qkv[..n * 3 * d], &mut o[..n * d]);
        let wide = transposed.filter(|_| n > 4);
        if let Some((qkv_t, _)) = wide {
            matmul_bias(MatMut::new(qkv, n, 3 * d), MatRef::new(x, n, d), MatRef::new(qkv_t, d, 3 * d), &self.qkv.bias.value);
        } else {
            matmul_bt(qkv, x, n, d, &self.qkv.weight.value, 3 * d);
            for row in qkv.chunks_mut(3 * d) {
                for (v, b) in row.iter_mut().zip(&self.qkv.bias.value) {
                    *v += b;
                }
            }
        }
        let scale = 1.0 / (hd as f32).sqrt();
        o.fill(0.0);
        for (r, cache) in caches.iter_mut().enumerate() {
            let (pos, row) = (cache.pos, &qkv[r * 3 * d..(r + 1) * 3 * d]);
            let KvCache { k, v, .. } = &mut **cache;
            let (k_cache, v_cache) = (&mut k[layer], &mut v[layer]);
            k_cache[pos * d..(pos + 1) * d].copy_from_slice(&row[d..2 * d]);
            v_cache[pos * d..(pos + 1) * d].copy_from_slice(&row[2 * d..]);
            let o = &mut o[r * d..(r + 1) * d];
            for h in 0..nh {
                let q = &row[h * hd..(h + 1) * hd];
                let att = &mut scores[..=pos];
                for (j, a) in att.iter_mut().enumerate() {
                    *a = dot(q, &k_cache[j * d + h * hd..j * d + (h + 1) * hd]);
                }
                causal_softmax(att, pos, scale);
                for (j, &a) in att.iter().enumerate() {
                    axpy(a, &v_cache[j * d + h * hd..j * d + (h + 1) * hd], &mut o[h * hd..(h + 1) * hd]);
                }
            }
        }
        if let Some((_, proj_t)) = wide {
            matmul_bias(MatMut::new(&mut y[..n * d], n, d), MatRef::new(o, n, d), MatRef::new(proj_t, d, d), &self.proj.bias.value);
            return;
        }
        matmul_bt(&mut y[..n * d], o, n, d, &self.proj.weight.value, d);
        for row in y[..n * d].chunks_mut(d) {
            for (v, b) in row.iter_mut().zip(&self.proj.bias.value) {
                *v += b;
            }
        }
    }

    /// The projections' weights transposed (`d × 3d`, `d × d`), for [`Self::step_batch`].
    pub fn transposed(&self) -> (Vec<f32>, Vec<f32>) {
        let d = self.dim();
        (crate::kernels::dense::transpose(&self.qkv.weight.value, 3 * d, d), crate::kernels::dense::transpose(&self.proj.weight.value, d, d))
    }

    /// The parameters: `qkv.weight`, `qkv.bias`, `proj.weight`, `proj.bias`.
    pub fn params(&self) -> [&Param; 4] {
        [&self.qkv.weight, &self.qkv.bias, &self.proj.weight, &self.proj.bias]
    }

    /// Visits the parameters in [`CausalSelfAttention::params`] order.
    pub fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        f(&mut self.qkv.weight);
        f(&mut self.qkv.bias);
        f(&mut self.proj.weight);
        f(&mut self.proj.bias);
    }
}

/// Head `item % heads` of sequence `item / heads` of a fused `b·t × 3d` projection.
fn head_of(qkv: &[f32], item: usize, heads: usize, t: usize, d: usize) -> fused::Head<'_> {
    let (bb, h) = (item / heads, item % heads);
    let hd = d / heads;
    let base = bb * t * 3 * d + h * hd;
    fused::Head { q: &qkv[base..], k: &qkv[base + d..], v: &qkv[base + 2 * d..], rs: 3 * d, t, hd }
}

thread_local! {
    /// Scratch of the fused attention kernel on this thread (only grows).
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Softmax of `scale · row[..=i]` in place; entries after `i` (the future) become 0.
fn causal_softmax(row: &mut [f32], i: usize, scale: f32) {
    let m = row[..=i].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) * scale;
    let mut z = 0.0;
    for v in &mut row[..=i] {
        *v = (*v * scale - m).exp();
        z += *v;
    }
    let inv = 1.0 / z;
    for v in &mut row[..=i] {
        *v *= inv;
    }
    for v in &mut row[i + 1..] {
        *v = 0.0;
    }
}
