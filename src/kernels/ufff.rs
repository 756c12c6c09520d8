//! UltraFastBERT tree inference (see `layers::ufff` for the definition).

use rayon::prelude::*;

use super::{check_io, counting_sort, InferKernel, SyncPtr, Workspace};
use crate::core::gemm::{axpy, dot};
use crate::core::Activation;
use crate::error::Result;

/// How a batch is walked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TreeStrategy {
    /// Grouped for batches of at least 8 samples, per sample below.
    Auto,
    /// Every sample walks its own path (threads over samples).
    PerSample,
    /// Level by level, samples sorted by node, threads over contiguous runs of the order.
    Grouped,
}

/// Inference copy of a [`crate::layers::Ufff`].
pub struct UfffKernel {
    in_features: usize,
    out_features: usize,
    levels: usize,
    activation: Activation,
    w_in: Vec<f32>,
    b_in: Vec<f32>,
    w_out: Vec<f32>,
    strategy: TreeStrategy,
}

impl UfffKernel {
    /// From the layer's parameters: `w_in` (neurons × in), `b_in` (neurons), `w_out`
    /// (neurons × out), with `levels` = depth + 1.
    pub fn new(w_in: Vec<f32>, b_in: Vec<f32>, w_out: Vec<f32>, in_features: usize, out_features: usize, levels: usize, activation: Activation) -> Self {
        debug_assert_eq!(b_in.len(), (1 << levels) - 1);
        UfffKernel { in_features, out_features, levels, activation, w_in, b_in, w_out, strategy: TreeStrategy::Auto }
    }

    /// Forces a strategy (for tests and benchmarks).
    pub fn with_strategy(mut self, s: TreeStrategy) -> Self {
        self.strategy = s;
        self
    }

    /// One sample: walk from the root, `y = Σ act(z) · w_out[node]`. Returns the leaf-level node.
    #[inline]
    fn walk(&self, x: &[f32], y: &mut [f32]) -> usize {
        let (ni, no) = (self.in_features, self.out_features);
        y.fill(0.0);
        let mut node = 0usize;
        for _ in 0..self.levels {
            let z = dot(&self.w_in[node * ni..(node + 1) * ni], x) + self.b_in[node];
            axpy(self.activation.apply(z), &self.w_out[node * no..(node + 1) * no], y);
            node = 2 * node + 1 + usize::from(z > 0.0);
        }
        node
    }

    fn per_sample(&self, x: &[f32], y: &mut [f32]) {
        let (ni, no) = (self.in_features, self.out_features);
        if y.len() == no {
            self.walk(x, y);
            return;
        }
        x.par_chunks(ni).zip(y.par_chunks_mut(no)).with_min_len(4).for_each(|(xi, yi)| {
            self.walk(xi, yi);
        });
    }

    fn grouped(&self, x: &[f32], batch: usize, y: &mut [f32], ws: &mut Workspace) {
        let (ni, no) = (self.in_features, self.out_features);
        let max_width = 1usize << (self.levels - 1);
        let (_, [nodes, order, counts, _]) = ws.take([0; 4], [batch, batch, max_width + 1, 0]);
        nodes.fill(0);
        y.fill(0.0);
        let (yp, np) = (SyncPtr(y.as_mut_ptr()), SyncPtr(nodes.as_mut_ptr()));
        // about four runs of the order per thread keeps threads busy without splitting groups much
        let chunk = batch.div_ceil(4 * rayon::current_num_threads()).max(8);
        for level in 0..self.levels {
            let base = (1u32 << level) - 1;
            counting_sort(nodes, base, 1 << level, counts, order);
            order.par_chunks(chunk).for_each(|run| {
                for &s in run {
                    let s = s as usize;
                    // SAFETY: `order` is a permutation of 0..batch, so runs touch disjoint
                    // samples: disjoint rows of y and entries of nodes.
                    let (ys, node) = unsafe { (yp.slice(s * no, no), &mut np.slice(s, 1)[0]) };
                    let n = *node as usize;
                    let z = dot(&self.w_in[n * ni..(n + 1) * ni], &x[s * ni..(s + 1) * ni]) + self.b_in[n];
                    axpy(self.activation.apply(z), &self.w_out[n * no..(n + 1) * no], ys);
                    *node = (2 * n + 1 + usize::from(z > 0.0)) as u32;
                }
            });
        }
    }
}

impl InferKernel for UfffKernel {
    fn kind(&self) -> &'static str {
        "ufff"
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
            TreeStrategy::PerSample => self.per_sample(x, y),
            TreeStrategy::Grouped => self.grouped(x, batch, y, ws),
            TreeStrategy::Auto if batch < 8 => self.per_sample(x, y),
            TreeStrategy::Auto => self.grouped(x, batch, y, ws),
        }
        Ok(())
    }

    fn neurons_per_inference(&self) -> usize {
        self.levels
    }

    fn macs_per_sample(&self) -> usize {
        self.levels * (self.in_features + self.out_features)
    }
}
