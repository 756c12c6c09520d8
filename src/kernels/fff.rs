//! Fast feedforward network inference (see `layers::fff` for the definition): hard descent,
//! then one leaf MLP per sample.

use rayon::prelude::*;

use super::ufff::TreeStrategy;
use super::{check_io, counting_sort, InferKernel, SyncPtr, Workspace};
use crate::core::activation::sigmoid;
use crate::core::gemm::dot;
use crate::core::simd::gemm_rows;
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

/// Inference copy of an [`crate::layers::Fff`]. Both leaf layers are applied with
/// [`gemm_rows`]: register-blocked, each weight row read once per one or four samples.
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
        FffKernel { in_features, out_features, depth, leaf, activation, node_w, node_b, w1: w1s.to_vec(), b1, w2, b2, master, strategy: TreeStrategy::Auto }
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
        gemm_rows([x], &self.w1[leaf * ni * lw..(leaf + 1) * ni * lw], &self.b1[leaf * lw..(leaf + 1) * lw], [&mut *hl]);
        self.activation.apply_inplace(hl);
        gemm_rows([&*hl], &self.w2[leaf * lw * no..(leaf + 1) * lw * no], &self.b2[leaf * no..(leaf + 1) * no], [y]);
        if let Some(m) = &self.master {
            let mw = m.b1.len();
            let g = sigmoid(dot(&m.gate_w, x) + m.gate_b);
            for (k, hk) in h[..mw].iter_mut().enumerate() {
                *hk = self.activation.apply(dot(&m.w1[k * ni..(k + 1) * ni], x) + m.b1[k]);
            }
            for (j, yj) in y.iter_mut().enumerate() {
                let mo = dot(&m.w2[j * mw..(j + 1) * mw], &h[..mw]) + m.b2[j];
                *yj = (1.0 - g) * *yj + g * mo;
            }
        }
    }

    /// Leaf MLP of four samples that reached the same leaf (no master leaf).
    fn leaf_forward4(&self, leaf: usize, x: [&[f32]; 4], y: [&mut [f32]; 4], h: [&mut [f32]; 4]) {
        let (ni, no, lw) = (self.in_features, self.out_features, self.leaf);
        let [h0, h1, h2, h3] = h;
        let hs = [&mut h0[..lw], &mut h1[..lw], &mut h2[..lw], &mut h3[..lw]];
        gemm_rows(x, &self.w1[leaf * ni * lw..(leaf + 1) * ni * lw], &self.b1[leaf * lw..(leaf + 1) * lw], hs);
        for hk in [&mut h0[..lw], &mut h1[..lw], &mut h2[..lw], &mut h3[..lw]] {
            self.activation.apply_inplace(hk);
        }
        let w2 = &self.w2[leaf * lw * no..(leaf + 1) * lw * no];
        gemm_rows([&h0[..lw], &h1[..lw], &h2[..lw], &h3[..lw]], w2, &self.b2[leaf * no..(leaf + 1) * no], y);
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

    /// Batched descent: each sample walks down on its own (its x stays in L1 for all `depth`
    /// dot products; the top levels' rows are shared and cache-resident), threads over
    /// samples. Leaves `nodes[s]` at sample s's leaf position (heap index). A level-major
    /// variant sorting samples by node at every level measured 3x slower here (x re-read per
    /// level, one synchronisation per level).
    fn descend_batch(&self, x: &[f32], nodes: &mut [u32]) {
        let ni = self.in_features;
        nodes.par_iter_mut().zip(x.par_chunks(ni)).with_min_len(8).for_each(|(node, xs)| {
            let mut n = 0;
            while n < self.nodes() {
                n = self.node_step(n, xs);
            }
            *node = n as u32;
        });
    }

    /// Leaves reached by the batched descent. `x`: `batch × in`.
    pub fn leaves_grouped(&self, x: &[f32], batch: usize, ws: &mut Workspace) -> Result<Vec<usize>> {
        crate::error::check_matrix("fff kernel input x", x.len(), batch, self.in_features)?;
        let ([..], [nodes, _, _, _]) = ws.take([0; 4], [batch, 0, 0, 0]);
        self.descend_batch(x, nodes);
        Ok(nodes.iter().map(|&n| n as usize - self.nodes()).collect())
    }

    fn grouped(&self, x: &[f32], batch: usize, y: &mut [f32], ws: &mut Workspace) {
        let (ni, no, hw) = (self.in_features, self.out_features, self.scratch());
        let leaves = 1usize << self.depth;
        let ([h, _, _, _], [nodes, order, counts, _]) = ws.take([batch * hw, 0, 0, 0], [batch, batch, leaves + 1, 0]);
        self.descend_batch(x, nodes);
        counting_sort(nodes, self.nodes() as u32, leaves, counts, order);
        let chunk = batch.div_ceil(4 * rayon::current_num_threads()).max(8);
        let (yp, hp) = (SyncPtr(y.as_mut_ptr()), SyncPtr(h.as_mut_ptr()));
        let nodes = &*nodes;
        let leaf_of = |s: u32| nodes[s as usize] as usize - self.nodes();
        order.par_chunks(chunk).for_each(|run| {
            // runs are sorted by leaf: take four samples of one leaf together when we can
            let mut i = 0;
            while i < run.len() {
                let leaf = leaf_of(run[i]);
                // SAFETY (both branches): `order` is a permutation of 0..batch, so each
                // sample's rows of y and h belong to exactly one run and one call here.
                if self.master.is_none() && i + 4 <= run.len() && leaf_of(run[i + 3]) == leaf {
                    let s = [run[i] as usize, run[i + 1] as usize, run[i + 2] as usize, run[i + 3] as usize];
                    let (ys, hs) = unsafe { (s.map(|s| yp.slice(s * no, no)), s.map(|s| hp.slice(s * hw, hw))) };
                    self.leaf_forward4(leaf, s.map(|s| &x[s * ni..(s + 1) * ni]), ys, hs);
                    i += 4;
                } else {
                    let s = run[i] as usize;
                    let (ys, hs) = unsafe { (yp.slice(s * no, no), hp.slice(s * hw, hw)) };
                    self.leaf_forward(leaf, &x[s * ni..(s + 1) * ni], ys, hs);
                    i += 1;
                }
            }
        });
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

    fn neurons_per_inference(&self) -> usize {
        self.depth + self.leaf + self.master.as_ref().map_or(0, |m| m.b1.len() + 1)
    }

    fn macs_per_sample(&self) -> usize {
        let (ni, no) = (self.in_features, self.out_features);
        self.depth * ni + self.leaf * (ni + no) + self.master.as_ref().map_or(0, |m| m.b1.len() * (ni + no) + ni)
    }
}
