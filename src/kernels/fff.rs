//! Fast feedforward network inference (see `layers::fff` for the definition): hard descent,
//! then one leaf MLP per sample.

use rayon::prelude::*;

use super::ufff::TreeStrategy;
use super::{check_io, counting_sort, InferKernel, SyncPtr, Workspace};
use crate::core::activation::sigmoid;
use crate::core::gemm::{axpy, dot};
use crate::core::simd::{dot_1x4, gemm_4xn};
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

/// Inference copy of an [`crate::layers::Fff`], with the first leaf layer transposed to
/// `leaves × leaf × in` so that every hidden unit is one contiguous dot product.
pub struct FffKernel {
    in_features: usize,
    out_features: usize,
    depth: usize,
    leaf: usize,
    activation: Activation,
    node_w: Vec<f32>,
    node_b: Vec<f32>,
    w1t: Vec<f32>,
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
        let leaves = 1usize << depth;
        let mut w1t = vec![0.0; w1s.len()];
        for l in 0..leaves {
            let (src, dst) = (&w1s[l * in_features * leaf..], &mut w1t[l * in_features * leaf..(l + 1) * in_features * leaf]);
            for i in 0..in_features {
                for j in 0..leaf {
                    dst[j * in_features + i] = src[i * leaf + j];
                }
            }
        }
        FffKernel { in_features, out_features, depth, leaf, activation, node_w, node_b, w1t, b1, w2, b2, master, strategy: TreeStrategy::Auto }
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
        let w1 = &self.w1t[leaf * lw * ni..(leaf + 1) * lw * ni];
        let b1 = &self.b1[leaf * lw..(leaf + 1) * lw];
        for j in 0..lw {
            h[j] = self.activation.apply(dot(&w1[j * ni..(j + 1) * ni], x) + b1[j]);
        }
        y.copy_from_slice(&self.b2[leaf * no..(leaf + 1) * no]);
        let w2 = &self.w2[leaf * lw * no..(leaf + 1) * lw * no];
        for (j, &hj) in h[..lw].iter().enumerate() {
            if hj != 0.0 {
                axpy(hj, &w2[j * no..(j + 1) * no], y);
            }
        }
        if let Some(m) = &self.master {
            let mw = m.b1.len();
            let g = sigmoid(dot(&m.gate_w, x) + m.gate_b);
            for k in 0..mw {
                h[k] = self.activation.apply(dot(&m.w1[k * ni..(k + 1) * ni], x) + m.b1[k]);
            }
            for (j, yj) in y.iter_mut().enumerate() {
                let mo = dot(&m.w2[j * mw..(j + 1) * mw], &h[..mw]) + m.b2[j];
                *yj = (1.0 - g) * *yj + g * mo;
            }
        }
    }

    /// Leaf MLP of four samples that reached the same leaf (no master leaf): each weight row
    /// is loaded once for the four.
    fn leaf_forward4(&self, leaf: usize, x: [&[f32]; 4], y: [&mut [f32]; 4], h: [&mut [f32]; 4]) {
        let (ni, no, lw) = (self.in_features, self.out_features, self.leaf);
        let w1 = &self.w1t[leaf * lw * ni..(leaf + 1) * lw * ni];
        let b1 = &self.b1[leaf * lw..(leaf + 1) * lw];
        let [h0, h1, h2, h3] = h;
        for j in 0..lw {
            let d = dot_1x4(&w1[j * ni..(j + 1) * ni], x);
            h0[j] = self.activation.apply(d[0] + b1[j]);
            h1[j] = self.activation.apply(d[1] + b1[j]);
            h2[j] = self.activation.apply(d[2] + b1[j]);
            h3[j] = self.activation.apply(d[3] + b1[j]);
        }
        let w2 = &self.w2[leaf * lw * no..(leaf + 1) * lw * no];
        gemm_4xn([&h0[..lw], &h1[..lw], &h2[..lw], &h3[..lw]], w2, &self.b2[leaf * no..(leaf + 1) * no], y);
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

    /// Level-wise grouped descent: leaves `nodes[s]` at sample s's leaf position (heap index).
    fn descend_grouped(&self, x: &[f32], nodes: &mut [u32], order: &mut [u32], counts: &mut [u32]) {
        let ni = self.in_features;
        let batch = nodes.len();
        nodes.fill(0);
        let chunk = batch.div_ceil(4 * rayon::current_num_threads()).max(8);
        let np = SyncPtr(nodes.as_mut_ptr());
        for level in 0..self.depth {
            counting_sort(nodes, (1u32 << level) - 1, 1 << level, counts, order);
            order.par_chunks(chunk).for_each(|run| {
                for &s in run {
                    let s = s as usize;
                    // SAFETY: `order` is a permutation of 0..batch: runs own disjoint entries.
                    let node = unsafe { &mut np.slice(s, 1)[0] };
                    *node = self.node_step(*node as usize, &x[s * ni..(s + 1) * ni]) as u32;
                }
            });
        }
    }

    /// Leaves reached by the batched (level-grouped) descent. `x`: `batch × in`.
    pub fn leaves_grouped(&self, x: &[f32], batch: usize, ws: &mut Workspace) -> Result<Vec<usize>> {
        crate::error::check_matrix("fff kernel input x", x.len(), batch, self.in_features)?;
        let ([..], [nodes, order, counts, _]) = ws.take([0; 4], [batch, batch, (1 << self.depth) + 1, 0]);
        self.descend_grouped(x, nodes, order, counts);
        Ok(nodes.iter().map(|&n| n as usize - self.nodes()).collect())
    }

    fn grouped(&self, x: &[f32], batch: usize, y: &mut [f32], ws: &mut Workspace) {
        let (ni, no, hw) = (self.in_features, self.out_features, self.scratch());
        let leaves = 1usize << self.depth;
        let ([h, _, _, _], [nodes, order, counts, _]) = ws.take([batch * hw, 0, 0, 0], [batch, batch, leaves + 1, 0]);
        self.descend_grouped(x, nodes, order, counts);
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
