//! Inference kernel of the mixture layers (`moe`, `smoe`, `hash`): route every row (router
//! GEMM + top-k, or a token hash), sort the slots by expert, run each expert once over its
//! segment ([`super::grouped`]), combine weighted by the gates.
//!
//! Shapes: `x` is `batch × in`, `y` is `batch × out`; `ids` (hash routing) is `batch`.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::grouped::{self, ExpertShape, ExpertSource, ExpertWeights, QuantExperts};
use super::{check_io, InferKernel, Workspace};
use crate::core::gemm::matmul_bt;
use crate::core::Activation;
use crate::error::{check_dim, Error, Result};

/// How a mixture picks its experts.
#[derive(Clone, Debug, PartialEq)]
pub enum Router {
    /// `p = softmax(W x)`, top-k by `p`, gates `p` (renormalised over the top-k when set,
    /// which equals a softmax over the top-k logits).
    Softmax {
        /// Router weights, `experts × in`.
        weight: Vec<f32>,
        /// Renormalise the top-k gates to sum to 1.
        renormalize: bool,
    },
    /// σ-MoE: gates `σ(W x)`, top-k by gate.
    Sigmoid {
        /// Router weights, `experts × in`.
        weight: Vec<f32>,
    },
    /// Hash layer: one expert per token from its id, gate 1.
    Hash(HashTable),
    /// MoEfication's router: scores `W2 tanh(W1 x + b1) + b2`, top-k by score, gates 1.
    Mlp {
        /// `experts × in`.
        w1: Vec<f32>,
        /// `experts`.
        b1: Vec<f32>,
        /// `experts × experts`.
        w2: Vec<f32>,
        /// `experts`.
        b2: Vec<f32>,
    },
    /// Scores `W x`, top-k by score, gates 1 (MoEfication's centroid router).
    Linear {
        /// `experts × in`.
        weight: Vec<f32>,
    },
}

impl Router {
    /// Scores of `batch` rows of `x` (`batch × d`) into `out` (`batch × experts`): the
    /// logits of the softmax and sigmoid routers, the scores of the MLP and linear ones;
    /// `hidden` is scratch. Hash routers have no scores (`out` is left as is).
    pub fn scores(&self, x: &[f32], batch: usize, d: usize, experts: usize, hidden: &mut Vec<f32>, out: &mut [f32]) {
        match self {
            Router::Softmax { weight, .. } | Router::Sigmoid { weight } | Router::Linear { weight } => matmul_bt(out, x, batch, d, weight, experts),
            Router::Mlp { w1, b1, w2, b2 } => crate::layers::moefied::mlp_scores(w1, b1, w2, b2, x, batch, d, experts, hidden, out),
            Router::Hash(_) => {}
        }
    }

    /// Top-k experts and gates of one row of scores.
    fn route(&self, scores: &[f32], k: usize, idx: &mut [u32], gates: &mut [f32]) {
        match self {
            Router::Softmax { renormalize, .. } => route_softmax_gates(scores, k, *renormalize, idx, gates),
            Router::Sigmoid { .. } => route_sigmoid(scores, k, idx, gates, |_| false),
            Router::Mlp { .. } | Router::Linear { .. } | Router::Hash(_) => {
                grouped::top_k(scores, k, idx, gates, |_| false);
                gates.fill(1.0);
            }
        }
    }
}

/// Token id → expert map of a hash layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashTable {
    /// Seed of the random hash (used for ids the table does not cover).
    pub seed: u64,
    /// Explicit map (balanced variant); empty = pure random hash.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub table: Vec<u32>,
}

impl HashTable {
    /// Expert of token `id` among `experts`.
    #[inline]
    pub fn expert(&self, id: u32, experts: usize) -> u32 {
        match self.table.get(id as usize) {
            Some(&e) => e,
            None => (splitmix64(self.seed ^ (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) % experts as u64) as u32,
        }
    }
}

pub use crate::core::rng::splitmix64;

/// Softmax routing of one row: top-k of `logits` into `idx`, gates into `gates`, `p` (same
/// length as `logits`) receives the full softmax. Returns log-sum-exp of the logits.
pub fn route_softmax(logits: &[f32], k: usize, renormalize: bool, p: &mut [f32], idx: &mut [u32], gates: &mut [f32]) -> f32 {
    let lse = softmax(logits, p);
    grouped::top_k(logits, k, idx, gates, |_| false);
    let mut s = 0.0;
    for (g, &i) in gates.iter_mut().zip(idx.iter()) {
        *g = p[i as usize];
        s += *g;
    }
    if renormalize {
        for g in gates.iter_mut() {
            *g /= s;
        }
    }
    lse
}

/// `p = softmax(logits)` (same length); returns the log-sum-exp of the logits.
pub fn softmax(logits: &[f32], p: &mut [f32]) -> f32 {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut z = 0.0;
    for (pi, &l) in p.iter_mut().zip(logits) {
        *pi = (l - m).exp();
        z += *pi;
    }
    for pi in p.iter_mut() {
        *pi /= z;
    }
    m + z.ln()
}

/// [`route_softmax`] without the full probability vector (inference): top-k of `logits`
/// into `idx`, their softmax probabilities (renormalised when set) into `gates`.
pub fn route_softmax_gates(logits: &[f32], k: usize, renormalize: bool, idx: &mut [u32], gates: &mut [f32]) {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    grouped::top_k(logits, k, idx, gates, |_| false);
    let z = if renormalize { gates.iter().map(|&l| (l - m).exp()).sum::<f32>() } else { logits.iter().map(|&l| (l - m).exp()).sum::<f32>() };
    for g in gates.iter_mut() {
        *g = (*g - m).exp() / z;
    }
}

/// σ-MoE routing of one row: top-k by logit (experts with `skip(e)` excluded, for expert
/// dropout), gates `σ(logit)`. Slots beyond the available experts get [`grouped::DROPPED`].
pub fn route_sigmoid(logits: &[f32], k: usize, idx: &mut [u32], gates: &mut [f32], skip: impl Fn(usize) -> bool) {
    let n = grouped::top_k(logits, k, idx, gates, skip);
    for (j, (g, i)) in gates.iter_mut().zip(idx.iter_mut()).enumerate() {
        if j < n {
            *g = crate::core::activation::sigmoid(*g);
        } else {
            *g = 0.0;
            *i = grouped::DROPPED;
        }
    }
}

/// A ready-to-run mixture layer.
pub struct MoeKernel {
    kind: &'static str,
    router: Router,
    k: usize,
    shape: ExpertShape,
    act: Activation,
    w1: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    b2: Vec<f32>,
    /// The experts as quantized blocks or bf16 (then `w1`, `w2` are empty).
    quant: Option<QuantExperts>,
    /// The experts packed for bf16 products (then `w1`, `w2` are empty).
    packed: Option<super::grouped::PackedExperts>,
}

impl MoeKernel {
    /// The same kernel with its expert matrices stored in `precision`: Q8_0/Q4_0 blocks
    /// (Mixture of Quantized Experts) or bf16 (packed for the AVX512_BF16 products where the
    /// CPU has them, else widened per call); the router stays f32.
    pub fn with_precision(mut self, precision: super::Precision) -> Result<Self> {
        if precision == super::Precision::F32 {
            return Ok(self);
        }
        let w = ExpertWeights { shape: self.shape, w1: &self.w1, b1: &self.b1, w2: &self.w2, act: self.act };
        // bf16 on AVX512_BF16: packed for the bf16 products; else stored and widened per call
        let packed = if precision == super::Precision::Bf16 { super::grouped::PackedExperts::new(&w)? } else { None };
        match packed {
            Some(p) => self.packed = Some(p),
            None => self.quant = Some(QuantExperts::new(&w, precision)?),
        }
        (self.w1, self.w2) = (Vec::new(), Vec::new());
        Ok(self)
    }

    /// A kernel over copies of the given weights (layouts as in [`super::grouped`]).
    pub fn new(kind: &'static str, router: Router, k: usize, weights: &ExpertWeights<'_>, b2: &[f32]) -> Self {
        MoeKernel {
            kind,
            router,
            k,
            shape: weights.shape,
            act: weights.act,
            w1: weights.w1.to_vec(),
            b1: weights.b1.to_vec(),
            w2: weights.w2.to_vec(),
            b2: b2.to_vec(),
            quant: None,
            packed: None,
        }
    }

    fn run(&self, x: &[f32], ids: Option<&[u32]>, batch: usize, y: &mut [f32], ws: &mut Workspace) -> Result<()> {
        check_io(self, x, batch, y)?;
        let ExpertShape { experts, in_features: d, width: g, out_features: o } = self.shape;
        let k = self.k;
        let slots = batch * k;
        let logits_len = if matches!(self.router, Router::Hash(_)) { 0 } else { batch * experts };
        let hidden_len = if matches!(self.router, Router::Mlp { .. }) { batch * experts } else { 0 };
        let ([logits, gates, h, ys, hidden], [assign, order, pos, offsets]) =
            ws.take([logits_len, slots, slots * g, slots * o, hidden_len], [slots, slots, slots, experts + 1]);
        if let Router::Mlp { w1, b1, w2, b2 } = &self.router {
            crate::layers::moefied::mlp_scores_into(w1, b1, w2, b2, x, batch, d, experts, hidden, logits);
        } else {
            self.router.scores(x, batch, d, experts, &mut Vec::new(), logits);
        }
        match &self.router {
            Router::Hash(table) => {
                let ids = ids.ok_or_else(|| Error::Invalid("hash layer: inference needs token ids (use forward_tokens)".into()))?;
                check_dim("hash layer token ids", "batch", batch, ids.len())?;
                for (b, &id) in ids.iter().enumerate() {
                    assign[b] = table.expert(id, experts);
                    gates[b] = 1.0;
                }
            }
            router => {
                let route = |((l, ib), gb): ((&[f32], &mut [u32]), &mut [f32])| router.route(l, k, ib, gb);
                if batch >= 64 {
                    let rows = logits.par_chunks_exact(experts).zip(assign.par_chunks_exact_mut(k)).zip(gates.par_chunks_exact_mut(k));
                    rows.with_min_len(32).for_each(route);
                } else {
                    logits.chunks_exact(experts).zip(assign.chunks_exact_mut(k)).zip(gates.chunks_exact_mut(k)).for_each(route);
                }
            }
        }
        let s = grouped::dispatch(assign, experts, offsets, order, pos);
        let w = ExpertWeights { shape: self.shape, w1: &self.w1, b1: &self.b1, w2: &self.w2, act: self.act };
        let source = match (&self.packed, &self.quant) {
            (Some(p), _) => ExpertSource::Packed(p),
            (None, Some(q)) => ExpertSource::Quant(q),
            (None, None) => ExpertSource::F32(&w),
        };
        // `assign` is free once dispatched: it holds the token of every sorted slot
        grouped::experts_infer(source, x, k, &order[..s], offsets, &mut assign[..s], &mut h[..s * g], &mut ys[..s * o])?;
        grouped::combine(ys, pos, gates, k, &self.b2, y);
        Ok(())
    }
}

impl InferKernel for MoeKernel {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn in_features(&self) -> usize {
        self.shape.in_features
    }

    fn out_features(&self) -> usize {
        self.shape.out_features
    }

    fn forward(&self, x: &[f32], batch: usize, y: &mut [f32], ws: &mut Workspace) -> Result<()> {
        self.run(x, None, batch, y, ws)
    }

    fn forward_tokens(&self, x: &[f32], ids: &[u32], batch: usize, y: &mut [f32], ws: &mut Workspace) -> Result<()> {
        self.run(x, Some(ids), batch, y, ws)
    }

    fn route_usage(&self, x: &[f32], batch: usize, counts: &mut Vec<u64>) -> Option<&'static str> {
        // hash layers route by token id, which this call does not have
        let (experts, d, k) = (self.shape.experts, self.shape.in_features, self.k);
        if matches!(self.router, Router::Hash(_)) {
            return None;
        }
        counts.resize(experts, 0);
        if x.len() != batch * d {
            return Some("expert");
        }
        let mut logits = vec![0.0f32; batch * experts];
        self.router.scores(x, batch, d, experts, &mut Vec::new(), &mut logits);
        let (mut idx, mut gates) = (vec![0u32; k], vec![0.0f32; k]);
        for l in logits.chunks_exact(experts) {
            self.router.route(l, k, &mut idx, &mut gates);
            idx.iter().for_each(|&e| counts[e as usize] += 1);
        }
        Some("expert")
    }

    fn neurons_per_inference(&self) -> usize {
        self.k * self.shape.width
    }

    fn macs_per_sample(&self) -> usize {
        let ExpertShape { experts, in_features: d, width: g, out_features: o } = self.shape;
        let router = match self.router {
            Router::Hash(_) => 0,
            Router::Mlp { .. } => experts * (d + experts),
            _ => experts * d,
        };
        router + self.k * g * (d + o)
    }
}
