//! Product-key memory lookup (Lample et al. 2019) and its inference kernel.
//!
//! Per head, the query `q` (`key_dim`) is split in halves scored against two sub-key tables of
//! `n` keys each (`s1 = K1 q1`, `s2 = K2 q2`); the top-k of each half give `k²` candidate
//! sums `s1[i] + s2[j]`, whose top-k select value rows `i·n + j` of a shared `n² × out` table.
//! Output: `y = bias + Σ_heads Σ_top act(score) · V[i·n + j]`, with `act` = ReLU (Csordás et
//! al.) or a softmax over the k scores (Lample et al.).
//!
//! Shapes: `x` is `batch × in`, `y` is `batch × out`.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::grouped::top_k;
use super::{check_io, InferKernel, Workspace};
use crate::core::gemm::{add_row_bias, matmul, matmul_bt, MatMut, MatRef};
use crate::core::simd::{axpy, dot};
use crate::error::Result;

/// How selected memory scores become weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PkmScoring {
    /// `max(score, 0)` (Csordás et al. 2023).
    Relu,
    /// Softmax over the k selected scores (Lample et al. 2019).
    Softmax,
}

/// Sizes of a product-key memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PkmShape {
    /// Input width.
    pub in_features: usize,
    /// Output width (value width).
    pub out_features: usize,
    /// Heads (queries) sharing one value table.
    pub heads: usize,
    /// Query width per head (even; split in halves).
    pub key_dim: usize,
    /// Sub-keys per half `n` (the table has `n²` values).
    pub n_keys: usize,
    /// Values read per head.
    pub k: usize,
}

impl PkmShape {
    /// Sub-key scores per row: two halves × heads × n.
    pub fn scores_per_row(&self) -> usize {
        2 * self.heads * self.n_keys
    }
}

/// Queries `q = x · Wqᵀ + bq` (`batch × heads·key_dim`, from `x`: `batch × in`) and their
/// sub-key scores `s` (as [`subkey_scores`]): the scoring half of a lookup, shared by the layer
/// and the kernel.
#[allow(clippy::too_many_arguments)]
pub fn queries_and_scores(
    shape: &PkmShape,
    x: &[f32],
    batch: usize,
    query_w: &[f32],
    query_b: &[f32],
    keys1: &[f32],
    keys2: &[f32],
    q: &mut [f32],
    s: &mut [f32],
) {
    let hd = shape.heads * shape.key_dim;
    let q = &mut q[..batch * hd];
    matmul_bt(q, x, batch, shape.in_features, query_w, hd);
    add_row_bias(q, query_b);
    subkey_scores(shape, q, batch, keys1, keys2, s);
}

/// Sub-key scores of a batch: `s` (`batch × 2·heads·n`, half `a` of head `h` at column
/// `(2h + a)·n`) from the queries `q` (`batch × heads·key_dim`) and sub-keys `keys1`, `keys2`
/// (`heads × n × key_dim/2` each).
pub fn subkey_scores(shape: &PkmShape, q: &[f32], batch: usize, keys1: &[f32], keys2: &[f32], s: &mut [f32]) {
    let (n, half, hd) = (shape.n_keys, shape.key_dim / 2, shape.heads * shape.key_dim);
    let sw = shape.scores_per_row();
    for h in 0..shape.heads {
        for (a, keys) in [keys1, keys2].into_iter().enumerate() {
            let qa = MatRef::strided(&q[h * shape.key_dim + a * half..], batch, half, hd, 1);
            let ka = MatRef::new(&keys[h * n * half..(h + 1) * n * half], n, half);
            if batch <= 4 {
                // a handful of dot products: no GEMM call at batch 1
                for b in 0..batch {
                    let qv = &q[b * hd + h * shape.key_dim + a * half..][..half];
                    for (i, kr) in keys[h * n * half..(h + 1) * n * half].chunks_exact(half).enumerate() {
                        s[b * sw + (2 * h + a) * n + i] = dot(qv, kr);
                    }
                }
                continue;
            }
            let out = MatMut::strided(&mut s[(2 * h + a) * n..], batch, n, sw, 1);
            matmul(out, qa, ka.t(), false);
        }
    }
}

/// Largest `k` (values per head) a product-key memory supports (Lample uses 32; the
/// parameter-matched setting of Csordás et al. reads 128).
pub const MAX_K: usize = 128;

/// Candidates of the pruned product search: Σ_{a<k} ⌊k/(a+1)⌋ ≤ k·(1 + ln k) < 1024 for k ≤ 128.
const MAX_CAND: usize = 1024;

/// Selects the `k ≤ MAX_K` memory slots of one (row, head) from its two sub-key score vectors
/// (`s1`, `s2`: `n` each). Writes value indices `idx`, sub-key indices `sub1`, `sub2`, raw
/// scores `score` (descending) and weights `weight` (all `k`). Uses only stack scratch.
///
/// Only pairs `(a, c)` of the two sorted top-k lists with `(a+1)(c+1) ≤ k` are scored: any
/// other pair has at least `k` pairs at least as large (those with a smaller or equal rank in
/// both lists), so it cannot be in the top k. That is ~k ln k sums instead of k².
#[allow(clippy::too_many_arguments)]
pub fn select(
    s1: &[f32],
    s2: &[f32],
    k: usize,
    scoring: PkmScoring,
    idx: &mut [u32],
    sub1: &mut [u32],
    sub2: &mut [u32],
    score: &mut [f32],
    weight: &mut [f32],
) {
    debug_assert!(k <= MAX_K);
    let n = s1.len();
    let (mut v1, mut v2) = ([0.0f32; MAX_K], [0.0f32; MAX_K]);
    let (mut i1, mut i2) = ([0u32; MAX_K], [0u32; MAX_K]);
    top_k(s1, k, &mut i1[..k], &mut v1[..k], |_| false);
    top_k(s2, k, &mut i2[..k], &mut v2[..k], |_| false);
    let mut cand = [0.0f32; MAX_CAND];
    let mut pair = [0u32; MAX_CAND];
    let mut m = 0;
    for (a, &va) in v1[..k].iter().enumerate() {
        for (c, &vc) in v2[..k / (a + 1)].iter().enumerate() {
            cand[m] = va + vc;
            pair[m] = (a * MAX_K + c) as u32;
            m += 1;
        }
    }
    let mut ci = [0u32; MAX_K];
    top_k(&cand[..m], k, &mut ci[..k], score, |_| false);
    for t in 0..k {
        let p = pair[ci[t] as usize] as usize;
        let (a, c) = (p / MAX_K, p % MAX_K);
        sub1[t] = i1[a];
        sub2[t] = i2[c];
        idx[t] = i1[a] * n as u32 + i2[c];
    }
    match scoring {
        PkmScoring::Relu => {
            for (w, &s) in weight.iter_mut().zip(score.iter()) {
                *w = s.max(0.0);
            }
        }
        PkmScoring::Softmax => {
            let m = score[0]; // scores are sorted descending
            let mut z = 0.0;
            for (w, &s) in weight.iter_mut().zip(score.iter()) {
                *w = (s - m).exp();
                z += *w;
            }
            for w in weight.iter_mut() {
                *w /= z;
            }
        }
    }
}

/// A ready-to-run product-key memory.
pub struct PkmKernel {
    shape: PkmShape,
    scoring: PkmScoring,
    /// `heads·key_dim × in`.
    query_w: Vec<f32>,
    query_b: Vec<f32>,
    keys1: Vec<f32>,
    keys2: Vec<f32>,
    /// `n² × out`.
    values: Vec<f32>,
    bias: Vec<f32>,
}

impl PkmKernel {
    /// A kernel over copies of the given parameters (layouts as in `layers::pkm`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(shape: PkmShape, scoring: PkmScoring, query_w: &[f32], query_b: &[f32], keys1: &[f32], keys2: &[f32], values: &[f32], bias: &[f32]) -> Self {
        PkmKernel {
            shape,
            scoring,
            query_w: query_w.to_vec(),
            query_b: query_b.to_vec(),
            keys1: keys1.to_vec(),
            keys2: keys2.to_vec(),
            values: values.to_vec(),
            bias: bias.to_vec(),
        }
    }
}

impl InferKernel for PkmKernel {
    fn kind(&self) -> &'static str {
        "pkm"
    }

    fn in_features(&self) -> usize {
        self.shape.in_features
    }

    fn out_features(&self) -> usize {
        self.shape.out_features
    }

    fn forward(&self, x: &[f32], batch: usize, y: &mut [f32], ws: &mut Workspace) -> Result<()> {
        check_io(self, x, batch, y)?;
        let PkmShape { out_features: o, heads, key_dim, k, .. } = self.shape;
        let hd = heads * key_dim;
        let sw = self.shape.scores_per_row();
        let ([q, s], []) = ws.take([batch * hd, batch * sw], []);
        queries_and_scores(&self.shape, x, batch, &self.query_w, &self.query_b, &self.keys1, &self.keys2, q, s);
        let n = self.shape.n_keys;
        let s = &*s;
        let row = |(b, yb): (usize, &mut [f32])| {
            let (mut idx, mut sub1, mut sub2) = ([0u32; MAX_K], [0u32; MAX_K], [0u32; MAX_K]);
            let (mut score, mut weight) = ([0.0f32; MAX_K], [0.0f32; MAX_K]);
            yb.copy_from_slice(&self.bias);
            for h in 0..heads {
                let r = &s[b * sw + 2 * h * n..b * sw + (2 * h + 2) * n];
                select(&r[..n], &r[n..], k, self.scoring, &mut idx[..k], &mut sub1[..k], &mut sub2[..k], &mut score[..k], &mut weight[..k]);
                for t in 0..k {
                    if weight[t] != 0.0 {
                        let v = idx[t] as usize;
                        axpy(weight[t], &self.values[v * o..(v + 1) * o], yb);
                    }
                }
            }
        };
        if batch >= 8 {
            y.par_chunks_mut(o).enumerate().with_min_len(4).for_each(row);
        } else {
            y.chunks_mut(o).enumerate().for_each(row);
        }
        Ok(())
    }

    fn neurons_per_inference(&self) -> usize {
        self.shape.heads * self.shape.k
    }

    fn macs_per_sample(&self) -> usize {
        let PkmShape { in_features: d, out_features: o, heads, key_dim, n_keys, k } = self.shape;
        heads * key_dim * d + heads * key_dim * n_keys + heads * k * o
    }
}
