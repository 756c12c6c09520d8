//! The expert bank shared by the mixture layers (`moe`, `smoe`, `hash`): `E` two-layer
//! experts `in → G → out` and one shared output bias, run through the grouped dispatch of
//! [`crate::kernels::grouped`]. A router (owned by the layer) decides, per token, `k` experts
//! and their gates; the bank does the rest, forward and backward, without touching experts a
//! token did not pick.
//!
//! Parameters: `w1` (`E × in × G`), `b1` (`E × G`), `w2` (`E × G × out`), `b2` (`out`).

use crate::core::gemm::{matmul, MatMut, MatRef};
use crate::core::{Activation, Param, Rng};
use crate::error::{check_matrix, Result};
use crate::kernels::grouped::{self, ExpertGrads, ExpertShape, ExpertWeights, DROPPED};

use super::ensure_len;

/// Expert weights plus the caches of the last training forward.
#[derive(Clone, Debug)]
pub struct ExpertBank {
    /// Sizes.
    pub shape: ExpertShape,
    /// Hidden nonlinearity.
    pub act: Activation,
    /// `E × in × G`.
    pub w1: Param,
    /// `E × G`.
    pub b1: Param,
    /// `E × G × out`.
    pub w2: Param,
    /// `out`, added once per token.
    pub b2: Param,
    /// Slots per token of the last forward.
    k: usize,
    gates: Vec<f32>,
    offsets: Vec<u32>,
    order: Vec<u32>,
    pos: Vec<u32>,
    xs: Vec<f32>,
    pre: Vec<f32>,
    h: Vec<f32>,
    ys: Vec<f32>,
    dys: Vec<f32>,
    dh: Vec<f32>,
    dxs: Vec<f32>,
    /// Share of the kept slots each expert received in the last forward (`E`).
    load: Vec<f32>,
    /// Slots dropped by the capacity limit in the last forward.
    dropped: usize,
}

impl ExpertBank {
    /// A bank with `w1 ~ N(0, std1²)`, `w2 ~ N(0, std2²)`, zero biases.
    pub fn new(shape: ExpertShape, act: Activation, std1: f32, std2: f32, rng: &mut Rng) -> Self {
        let ExpertShape { experts: e, in_features: d, width: g, out_features: o } = shape;
        let normal = |name: &str, dims: &[usize], std: f32, rng: &mut Rng| {
            let mut p = Param::zeros(name, dims, true);
            for v in &mut p.value {
                *v = std * rng.normal();
            }
            p
        };
        ExpertBank {
            shape,
            act,
            w1: normal("w1", &[e, d, g], std1, rng),
            b1: Param::zeros("b1", &[e, g], false),
            w2: normal("w2", &[e, g, o], std2, rng),
            b2: Param::zeros("b2", &[o], false),
            k: 0,
            gates: Vec::new(),
            offsets: vec![0; e + 1],
            order: Vec::new(),
            pos: Vec::new(),
            xs: Vec::new(),
            pre: Vec::new(),
            h: Vec::new(),
            ys: Vec::new(),
            dys: Vec::new(),
            dh: Vec::new(),
            dxs: Vec::new(),
            load: vec![0.0; e],
            dropped: 0,
        }
    }

    /// Borrowed weights for the grouped kernels.
    pub fn weights(&self) -> ExpertWeights<'_> {
        ExpertWeights { shape: self.shape, w1: &self.w1.value, b1: &self.b1.value, w2: &self.w2.value, act: self.act }
    }

    /// Training forward. `x`: `batch × in`; `assign`, `gates`: `batch·k` (expert of each slot or
    /// [`DROPPED`], and its gate); writes `y`: `batch × out`. Sizes are checked by the layer.
    pub fn forward(&mut self, x: &[f32], batch: usize, k: usize, assign: &[u32], gates: &[f32], y: &mut [f32]) -> Result<()> {
        let ExpertShape { experts, in_features: d, width: g, out_features: o } = self.shape;
        let slots = batch * k;
        self.k = k;
        self.gates.clear();
        self.gates.extend_from_slice(&gates[..slots]);
        grow_u32(&mut self.order, slots);
        grow_u32(&mut self.pos, slots);
        let s = grouped::dispatch(&assign[..slots], experts, &mut self.offsets, &mut self.order, &mut self.pos[..slots]);
        self.dropped = slots - s;
        for (l, w) in self.load.iter_mut().zip(self.offsets.windows(2)) {
            *l = (w[1] - w[0]) as f32 / s.max(1) as f32;
        }
        ensure_len(&mut self.xs, s * d);
        ensure_len(&mut self.pre, s * g);
        ensure_len(&mut self.h, s * g);
        ensure_len(&mut self.ys, s * o);
        let w = ExpertWeights { shape: self.shape, w1: &self.w1.value, b1: &self.b1.value, w2: &self.w2.value, act: self.act };
        grouped::experts_forward(
            &w,
            x,
            k,
            &self.order[..s],
            &self.offsets,
            &mut self.xs[..s * d],
            Some(&mut self.pre[..s * g]),
            &mut self.h[..s * g],
            &mut self.ys[..s * o],
        )?;
        grouped::combine(&self.ys, &self.pos[..slots], &self.gates, k, &self.b2.value, &mut y[..batch * o]);
        Ok(())
    }

    /// Backward of the last [`ExpertBank::forward`]. Adds into the bank's gradients, writes
    /// `dgates` (`batch·k`, dL/dgate of every slot, 0 when dropped) and, when given, writes or
    /// adds (`accumulate_dx`) the experts' part of dL/dx into `dx`: `batch × in`.
    pub fn backward(&mut self, batch: usize, dy: &[f32], dgates: &mut [f32], dx: Option<&mut [f32]>, accumulate_dx: bool) -> Result<()> {
        let ExpertShape { experts, in_features: d, width: g, out_features: o } = self.shape;
        let (k, slots) = (self.k, batch * self.k);
        let s = self.offsets[experts] as usize;
        ensure_len(&mut self.dys, s * o);
        ensure_len(&mut self.dh, s * g);
        ensure_len(&mut self.dxs, s * d);
        grouped::combine_backward(dy, &self.ys, &self.pos[..slots], &self.gates, k, o, &mut self.dys, &mut dgates[..slots]);
        crate::core::gemm::add_sum_rows(&dy[..batch * o], o, &mut self.b2.grad);
        let w = ExpertWeights { shape: self.shape, w1: &self.w1.value, b1: &self.b1.value, w2: &self.w2.value, act: self.act };
        let grads = ExpertGrads { w1: &mut self.w1.grad, b1: &mut self.b1.grad, w2: &mut self.w2.grad };
        grouped::experts_backward(
            &w,
            grads,
            &self.offsets,
            &self.xs[..s * d],
            &self.pre[..s * g],
            &self.h[..s * g],
            &self.dys[..s * o],
            &mut self.dh[..s * g],
            &mut self.dxs[..s * d],
        )?;
        if let Some(dx) = dx {
            grouped::scatter_rows_add(&self.dxs, &self.pos[..slots], k, d, &mut dx[..batch * d], accumulate_dx);
        }
        Ok(())
    }

    /// Share of the kept slots each expert received in the last forward.
    pub fn load(&self) -> &[f32] {
        &self.load
    }

    /// Slots dropped by the capacity limit in the last forward.
    pub fn dropped(&self) -> usize {
        self.dropped
    }

    /// The four parameters in order `w1, b1, w2, b2`.
    pub fn params(&self) -> [&Param; 4] {
        [&self.w1, &self.b1, &self.w2, &self.b2]
    }

    /// Visits the four parameters mutably in [`ExpertBank::params`] order.
    pub fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        f(&mut self.w1);
        f(&mut self.b1);
        f(&mut self.w2);
        f(&mut self.b2);
    }
}

fn grow_u32(v: &mut Vec<u32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0);
    }
}

/// Applies a capacity limit in token order (Switch): each expert keeps at most `capacity`
/// slots, later ones become [`DROPPED`]. `counts` is scratch of `E`. Returns the slots dropped.
pub fn apply_capacity(assign: &mut [u32], experts: usize, capacity: usize, counts: &mut Vec<u32>) -> usize {
    counts.clear();
    counts.resize(experts, 0);
    let mut dropped = 0;
    for a in assign.iter_mut() {
        if *a == DROPPED {
            continue;
        }
        let c = &mut counts[*a as usize];
        if (*c as usize) < capacity {
            *c += 1;
        } else {
            *a = DROPPED;
            dropped += 1;
        }
    }
    dropped
}

/// Router logits of a learned mixture: `logits = x · Wᵀ` with `router` of `E × in` (no bias).
/// `x`: `batch × in`, `logits`: `batch × E`.
pub(crate) fn router_logits(router: &Param, x: &[f32], batch: usize, logits: &mut [f32]) {
    let (e, d) = (router.shape[0], router.shape[1]);
    matmul(MatMut::new(&mut logits[..batch * e], batch, e), MatRef::new(x, batch, d), MatRef::new(&router.value, e, d).t(), false);
}

/// Backward of [`router_logits`]: adds the router's gradient `dlᵀ · x` and adds `dl · W`
/// into `dx` when given. `dl`: `batch × E`.
pub(crate) fn router_backward(router: &mut Param, x: &[f32], batch: usize, dl: &[f32], dx: Option<&mut [f32]>) {
    let (e, d) = (router.shape[0], router.shape[1]);
    let dl = MatRef::new(&dl[..batch * e], batch, e);
    matmul(MatMut::new(&mut router.grad, e, d), dl.t(), MatRef::new(x, batch, d), true);
    if let Some(dx) = dx {
        matmul(MatMut::new(dx, batch, d), dl, MatRef::new(&router.value, e, d), true);
    }
}

/// Experts of every row ranked by router logit, best first (`batch × E`): the discrete
/// routing decision, for tests that must know whether a perturbation changed it.
pub(crate) fn router_ranking(router: &Param, x: &[f32], batch: usize, what: &str) -> Result<Vec<u32>> {
    check_matrix(what, x.len(), batch, router.shape[1])?;
    let mut logits = vec![0.0; batch * router.shape[0]];
    router_logits(router, x, batch, &mut logits);
    Ok(rank_rows(&logits, router.shape[0]))
}

/// Indices of every row of a `rows × n` matrix sorted by value, largest first (ties: lower
/// index first).
pub(crate) fn rank_rows(values: &[f32], n: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(values.len());
    for row in values.chunks_exact(n) {
        let mut idx: Vec<u32> = (0..n as u32).collect();
        idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        out.extend(idx);
    }
    out
}
