//! Fast feedforward network inference (see `layers::fff` for the definition): hard descent,
//! then one leaf MLP per sample.

use rayon::prelude::*;

use super::grouped::dispatch;
use super::ufff::TreeStrategy;
use super::{check_io, rows4, InferKernel, Precision, SyncPtr, Workspace};
use crate::core::activation::sigmoid;
use crate::core::gemm::dot;
use crate::core::quant::MaybeQuant;
use crate::core::simd::{dot4, gemm_small, gemm_small_gather, gemm_small_scatter};
use crate::core::Activation;
use crate::error::Result;

/// The always-on master leaf: `fc1` (m × in, m), `fc2` (out × m, out), gate (in, 1).
pub struct MasterWeights {
    /// `m × in`.
    pub w1: Vec<f32>,
    /// `m`.
    pub b1: Vec<f32>,
    /// `out × m`.
    pub w2: Vec<f32>,
    /// `out`.
    pub b2: Vec<f32>,
    /// `in`.
    pub gate_w: Vec<f32>,
    /// Gate bias.
    pub gate_b: f32,
}

/// Inference copy of an [`crate::layers::Fff`]. Both leaf layers are applied with the unpacked
/// register-blocked [`gemm_small`] family: one sample at batch < 8, else every leaf's group of
/// samples at once, read from `x` and written to `y` in place.
pub struct FffKernel {
    in_features: usize,
    out_features: usize,
    depth: usize,
    leaf: usize,
    activation: Activation,
    node_w: Vec<f32>,
    node_b: Vec<f32>,
    w1: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    b2: Vec<f32>,
    master: Option<MasterWeights>,
    strategy: TreeStrategy,
    /// The leaves' matrices as quantized blocks or bf16, rows as stored (`w1s`: `leaves·in × leaf`,
    /// `w2s`: `leaves·leaf × out`); then `w1` and `w2` are empty.
    quant: Option<(MaybeQuant, MaybeQuant)>,
}

thread_local! {
    /// One leaf's dequantized `W1`, `W2` (grows once per thread).
    static LEAF: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

impl FffKernel {
    /// From the layer's parameters in the `fastfeedforward` layouts: `node_w` (nodes × in),
    /// `node_b` (nodes), `w1s` (leaves × in × leaf), `b1s` (leaves × leaf), `w2s` (leaves ×
    /// leaf × out), `b2s` (leaves × out).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node_w: Vec<f32>,
        node_b: Vec<f32>,
        w1s: &[f32],
        b1: Vec<f32>,
        w2: Vec<f32>,
        b2: Vec<f32>,
        in_features: usize,
        out_features: usize,
        depth: usize,
        leaf: usize,
        activation: Activation,
        master: Option<MasterWeights>,
    ) -> Self {
        let (leaves, nodes) = (1usize.checked_shl(depth as u32).unwrap_or(0), (1usize << depth.min(63)) - 1);
        let ok = leaves > 0
            && Some(node_w.len()) == nodes.checked_mul(in_features)
            && node_b.len() == nodes
            && Some(w1s.len()) == leaves.checked_mul(in_features).and_then(|v| v.checked_mul(leaf))
            && Some(b1.len()) == leaves.checked_mul(leaf)
            && Some(w2.len()) == leaves.checked_mul(leaf).and_then(|v| v.checked_mul(out_features))
            && Some(b2.len()) == leaves.checked_mul(out_features);
        assert!(ok, "fff kernel: weights do not match depth {depth}, leaf {leaf}, {in_features} → {out_features}");
        FffKernel {
            in_features,
            out_features,
            depth,
            leaf,
            activation,
            node_w,
            node_b,
            w1: w1s.to_vec(),
            b1,
            w2,
            b2,
            master,
            strategy: TreeStrategy::Auto,
            quant: None,
        }
    }

    /// The same kernel with the leaves' matrices stored in `precision` (Q8_0/Q4_0 blocks or
    /// bf16; the nodes, biases and master leaf stay f32). Each leaf that receives samples is
    /// widened to f32 once per call before its products: the weights cross memory at 4.5,
    /// 8.5 or 16 bits, which is what bounds a deep tree at batch (every sample reads a
    /// different leaf).
    pub fn with_precision(mut self, precision: Precision) -> Result<Self> {
        if precision == Precision::F32 {
            return Ok(self);
        }
        let leaves = 1usize << self.depth;
        let (ni, no, lw) = (self.in_features, self.out_features, self.leaf);
        let w1 = precision.store(std::mem::take(&mut self.w1), leaves * ni, lw)?;
        let w2 = precision.store(std::mem::take(&mut self.w2), leaves * lw, no)?;
        self.quant = Some((w1, w2));
        Ok(self)
    }

    /// Runs `f` with leaf `leaf`'s `W1` (`in × leaf`) and `W2` (`leaf × out`): slices of the
    /// f32 weights, or the stored rows widened into a per-thread buffer.
    #[inline]
    fn with_leaf<R>(&self, leaf: usize, f: impl FnOnce(&[f32], &[f32]) -> R) -> R {
        let (ni, no, lw) = (self.in_features, self.out_features, self.leaf);
        match &self.quant {
            None => f(&self.w1[leaf * ni * lw..(leaf + 1) * ni * lw], &self.w2[leaf * lw * no..(leaf + 1) * lw * no]),
            Some((q1, q2)) => LEAF.with_borrow_mut(|(a, b)| f(q1.rows(leaf * ni, (leaf + 1) * ni, a), q2.rows(leaf * lw, (leaf + 1) * lw, b))),
        }
    }

    /// Forces a strategy (for tests and benchmarks).
    pub fn with_strategy(mut self, s: TreeStrategy) -> Self {
        self.strategy = s;
        self
    }

    fn nodes(&self) -> usize {
        (1 << self.depth) - 1
    }

    #[inline]
    fn node_step(&self, n: usize, x: &[f32]) -> usize {
        let ni = self.in_features;
        let z = dot(&self.node_w[n * ni..(n + 1) * ni], x) + self.node_b[n];
        2 * n + 1 + usize::from(z >= 0.0)
    }

    /// Leaf reached by each sample (hard descent; logit ≥ 0 goes right).
    pub fn leaves(&self, x: &[f32], batch: usize) -> Vec<usize> {
        x.chunks(self.in_features)
            .take(batch)
            .map(|xs| {
                let mut n = 0;
                while n < self.nodes() {
                    n = self.node_step(n, xs);
                }
                n - self.nodes()
            })
            .collect()
    }

    /// Leaf MLP (and master blend) of one sample: `h` has room for max(leaf, master) values.
    #[inline]
    fn leaf_forward(&self, leaf: usize, x: &[f32], y: &mut [f32], h: &mut [f32]) {
        let (ni, no, lw) = (self.in_features, self.out_features, self.leaf);
        let hl = &mut h[..lw];
        self.with_leaf(leaf, |w1, w2| {
            gemm_small(x, ni, w1, lw, Some(&self.b1[leaf * lw..(leaf + 1) * lw]), hl);
            self.activation.apply_inplace(hl);
            gemm_small(hl, lw, w2, no, Some(&self.b2[leaf * no..(leaf + 1) * no]), y);
        });
        if let Some(m) = &self.master {
            blend_master(m, self.activation, x, y, h);
        }
    }

    fn scratch(&self) -> usize {
        self.leaf.max(self.master.as_ref().map_or(0, |m| m.b1.len()))
    }

    fn per_sample(&self, x: &[f32], batch: usize, y: &mut [f32], ws: &mut Workspace) {
        let (ni, no, hw) = (self.in_features, self.out_features, self.scratch());
        let ([h, _, _, _], _) = ws.take([batch * hw, 0, 0, 0], [0; 4]);
        let work = |((xs, ys), hs): ((&[f32], &mut [f32]), &mut [f32])| {
            let mut n = 0;
            while n < self.nodes() {
                n = self.node_step(n, xs);
            }
            self.leaf_forward(n - self.nodes(), xs, ys, hs);
        };
        if batch == 1 {
            work(((x, y), h));
        } else {
            x.par_chunks(ni).zip(y.par_chunks_mut(no)).zip(h.par_chunks_mut(hw)).with_min_len(4).for_each(work);
        }
    }

    /// Batched descent: samples walk down four at a time in lockstep (their x rows stay in L1
    /// for all `depth` dot products, and the four row reads of a level are independent
    /// streams; the top levels' rows are shared and cache-resident), threads over samples.
    /// Leaves `nodes[s]` at sample s's leaf position (heap index). A level-major variant
    /// sorting samples by node at every level measured 3x slower here (x re-read per level,
    /// one synchronisation per level).
    fn descend_batch(&self, x: &[f32], nodes: &mut [u32]) {
        let (ni, inner) = (self.in_features, self.nodes());
        nodes.par_chunks_mut(4).zip(x.par_chunks(4 * ni)).with_min_len(2).for_each(|(nq, xq)| {
            if nq.len() == 4 {
                let xs = rows4(xq, ni);
                let mut n = [0usize; 4];
                // every leaf is at the same depth, so the four walks end together
                while n[0] < inner {
                    let z = dot4(n.map(|m| &self.node_w[m * ni..(m + 1) * ni]), xs);
                    for k in 0..4 {
                        n[k] = 2 * n[k] + 1 + usize::from(z[k] + self.node_b[n[k]] >= 0.0);
                    }
                }
                for (node, m) in nq.iter_mut().zip(n) {
                    *node = m as u32;
                }
            } else {
                for (node, xs) in nq.iter_mut().zip(xq.chunks(ni)) {
                    let mut n = 0;
                    while n < inner {
                        n = self.node_step(n, xs);
                    }
                    *node = n as u32;
                }
            }
        });
    }

    /// Leaves reached by the batched descent. `x`: `batch × in`.
    pub fn leaves_grouped(&self, x: &[f32], batch: usize, ws: &mut Workspace) -> Result<Vec<usize>> {
        crate::error::check_matrix("fff kernel input x", x.len(), batch, self.in_features)?;
        let ([..], [nodes, _, _, _]) = ws.take([0; 4], [batch, 0, 0, 0]);
        self.descend_batch(x, nodes);
        Ok(nodes.iter().map(|&n| n as usize - self.nodes()).collect())
    }

    /// Batched: descent per sample, then the samples are counting-sorted by leaf and every leaf
    /// runs its two products over its group of rows (the grouped dispatch of a mixture with
    /// one expert per sample and gate 1): the first reads the group's rows of `x` in place, the
    /// second writes straight into their rows of `y`, so each leaf's weights are read once
    /// per batch and no row is copied.
    fn grouped(&self, x: &[f32], batch: usize, y: &mut [f32], ws: &mut Workspace) {
        let (ni, no, lw, hw) = (self.in_features, self.out_features, self.leaf, self.scratch());
        let leaves = 1usize << self.depth;
        let ([h], [nodes, order, pos, offsets]) = ws.take([batch * hw], [batch, batch, batch, leaves + 1]);
        self.descend_batch(x, nodes);
        let first_leaf = self.nodes() as u32;
        nodes.iter_mut().for_each(|n| *n -= first_leaf);
        dispatch(nodes, leaves, offsets, order, pos);
        let (order, offsets) = (&*order, &*offsets);
        let (hp, yp) = (SyncPtr(h.as_mut_ptr()), SyncPtr(y.as_mut_ptr()));
        let run = |leaf: usize| {
            let (r0, r1) = (offsets[leaf] as usize, offsets[leaf + 1] as usize);
            if r0 == r1 {
                return;
            }
            let idx = &order[r0..r1];
            // SAFETY: leaves own disjoint segments of h.
            let hs = unsafe { hp.slice(r0 * lw, (r1 - r0) * lw) };
            self.with_leaf(leaf, |w1, w2| {
                gemm_small_gather(x, idx, ni, w1, lw, Some(&self.b1[leaf * lw..(leaf + 1) * lw]), hs);
                self.activation.apply_inplace(hs);
                // SAFETY: `order` is a permutation of 0..batch, so the leaves write disjoint
                // rows of y (batch × out), and nothing else touches y meanwhile.
                unsafe { gemm_small_scatter(hs, lw, w2, no, Some(&self.b2[leaf * no..(leaf + 1) * no]), yp.ptr(), idx) };
            });
        };
        if rayon::current_num_threads() > 1 && batch >= 8 {
            (0..leaves).into_par_iter().for_each(run);
        } else {
            (0..leaves).for_each(run);
        }
        if let Some(m) = &self.master {
            let act = self.activation;
            y.par_chunks_mut(no).zip(x.par_chunks(ni)).zip(h.par_chunks_mut(hw)).with_min_len(8).for_each(|((ys, xs), hs)| blend_master(m, act, xs, ys, hs));
        }
    }
}

/// `y = (1 − g)·y + g·master(x)` for one sample, `g = σ(gate·x + b)`; `h` has room for the
/// master's hidden units.
fn blend_master(m: &MasterWeights, act: Activation, x: &[f32], y: &mut [f32], h: &mut [f32]) {
    let (ni, mw) = (x.len(), m.b1.len());
    let g = sigmoid(dot(&m.gate_w, x) + m.gate_b);
    for (k, hk) in h[..mw].iter_mut().enumerate() {
        *hk = act.apply(dot(&m.w1[k * ni..(k + 1) * ni], x) + m.b1[k]);
    }
    for (j, yj) in y.iter_mut().enumerate() {
        let mo = dot(&m.w2[j * mw..(j + 1) * mw], &h[..mw]) + m.b2[j];
        *yj = (1.0 - g) * *yj + g * mo;
    }
}

impl InferKernel for FffKernel {
    fn kind(&self) -> &'static str {
        "fff"
    }

    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }

    fn forward(&self, x: &[f32], batch: usize, y: &mut [f32], ws: &mut Workspace) -> Result<()> {
        check_io(self, x, batch, y)?;
        match self.strategy {
            TreeStrategy::PerSample => self.per_sample(x, batch, y, ws),
            TreeStrategy::Grouped => self.grouped(x, batch, y, ws),
            TreeStrategy::Auto if batch < 8 => self.per_sample(x, batch, y, ws),
            TreeStrategy::Auto => self.grouped(x, batch, y, ws),
        }
        Ok(())
    }

    fn route_usage(&self, x: &[f32], batch: usize, counts: &mut Vec<u64>) -> Option<&'static str> {
        counts.resize(1 << self.depth, 0);
        if x.len() == batch * self.in_features {
            for leaf in self.leaves(x, batch) {
                counts[leaf] += 1;
            }
        }
        Some("leaf")
    }

    fn neurons_per_inference(&self) -> usize {
        self.depth + self.leaf + self.master.as_ref().map_or(0, |m| m.b1.len() + 1)
    }

    fn macs_per_sample(&self) -> usize {
        let (ni, no) = (self.in_features, self.out_features);
        self.depth * ni + self.leaf * (ni + no) + self.master.as_ref().map_or(0, |m| m.b1.len() * (ni + no) + ni)
    }
}
