//! UltraFastBERT tree inference (see `layers::ufff` for the definition). The weight rows are
//! kept in f32, or in bf16 ([`Precision::Bf16`]) to halve the bytes each sample streams: at
//! batch sizes where every sample walks its own rows the walk is bound by memory, not FLOPs.

use rayon::prelude::*;

use super::grouped::dispatch;
use super::{check_io, rows4, rows4_mut, InferKernel, Precision, SyncPtr, Workspace};
use crate::core::bf16::{dot4_bf16, dot_bf16, paired_index, to_bf16_paired, weighted_row_sum_bf16, widen_paired_row, Bf16};
use crate::core::gemm::{axpy, dot};
use crate::core::quant::{QAct, QMatrix};
use crate::core::simd::{dot4, weighted_row_sum};
use crate::core::Activation;
use crate::error::Result;

/// How a batch is walked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TreeStrategy {
    /// The measured-faster choice for the kernel and batch size.
    Auto,
    /// Every sample walks its own path (threads over samples).
    PerSample,
    /// Level by level, samples sorted by node, threads over contiguous runs of the order.
    Grouped,
}

/// Most levels a kernel walks (the layer allows depth ≤ 24).
const MAX_LEVELS: usize = 32;

/// A row-major matrix of weight rows in some storage, read by the tree walks.
trait Rows: Sync {
    /// `row · x`.
    fn dot(&self, row: usize, x: &[f32]) -> f32;
    /// Four `rows[k] · xs[k]`, each bit-identical to [`Rows::dot`].
    fn dot4(&self, rows: [usize; 4], xs: [&[f32]; 4]) -> [f32; 4];
    /// `y = Σ coef[l] · row(path[l])` (`y +=` with `accumulate`).
    fn sum(&self, coef: &[f32], path: &[usize], y: &mut [f32], accumulate: bool);
    /// `y += a · row`.
    fn axpy(&self, row: usize, a: f32, y: &mut [f32]);
}

/// `data` viewed as rows of `cols` values.
struct Mat<T> {
    data: Vec<T>,
    cols: usize,
}

impl Rows for Mat<f32> {
    fn dot(&self, row: usize, x: &[f32]) -> f32 {
        dot(&self.data[row * self.cols..(row + 1) * self.cols], x)
    }
    fn dot4(&self, rows: [usize; 4], xs: [&[f32]; 4]) -> [f32; 4] {
        dot4(rows.map(|r| &self.data[r * self.cols..(r + 1) * self.cols]), xs)
    }
    fn sum(&self, coef: &[f32], path: &[usize], y: &mut [f32], accumulate: bool) {
        weighted_row_sum(coef, &self.data, path, y, accumulate);
    }
    fn axpy(&self, row: usize, a: f32, y: &mut [f32]) {
        axpy(a, &self.data[row * self.cols..(row + 1) * self.cols], y);
    }
}

impl Mat<Bf16> {
    /// Back to f32 in natural column order.
    fn widen(&self) -> Mat<f32> {
        let n = self.cols;
        let mut data = vec![0.0; self.data.len()];
        for (src, dst) in self.data.chunks(n.max(1)).zip(data.chunks_mut(n.max(1))) {
            widen_paired_row(src, dst);
        }
        Mat { data, cols: n }
    }
}

impl Rows for Mat<Bf16> {
    fn dot(&self, row: usize, x: &[f32]) -> f32 {
        dot_bf16(&self.data[row * self.cols..(row + 1) * self.cols], x)
    }
    fn dot4(&self, rows: [usize; 4], xs: [&[f32]; 4]) -> [f32; 4] {
        dot4_bf16(rows.map(|r| &self.data[r * self.cols..(r + 1) * self.cols]), xs)
    }
    fn sum(&self, coef: &[f32], path: &[usize], y: &mut [f32], accumulate: bool) {
        weighted_row_sum_bf16(coef, &self.data, path, y, accumulate);
    }
    fn axpy(&self, row: usize, a: f32, y: &mut [f32]) {
        let w = &self.data[row * self.cols..(row + 1) * self.cols];
        for (c, v) in y.iter_mut().enumerate() {
            *v += a * w[paired_index(c, self.cols)].to_f32();
        }
    }
}

/// The two weight matrices in one storage.
enum Weights {
    F32 {
        w_in: Mat<f32>,
        w_out: Mat<f32>,
    },
    Bf16 {
        w_in: Mat<Bf16>,
        w_out: Mat<Bf16>,
    },
    /// Block-quantized rows: the path's dot products in integers against the sample
    /// quantized once to 8 bits, the output rows dequantized as they are summed.
    Quant {
        w_in: QMatrix,
        w_out: QMatrix,
    },
}

/// Samples quantized together by one task of the quantized walk.
const QUANT_CHUNK: usize = 16;

thread_local! {
    /// Quantized samples of the current task of the quantized walk (grows once per thread).
    static QX: std::cell::RefCell<QAct> = std::cell::RefCell::new(QAct::default());
}

/// Inference copy of a [`crate::layers::Ufff`].
pub struct UfffKernel {
    in_features: usize,
    out_features: usize,
    /// Parallel trees K.
    trees: usize,
    levels: usize,
    activation: Activation,
    weights: Weights,
    b_in: Vec<f32>,
    strategy: TreeStrategy,
}

impl UfffKernel {
    /// From the layer's parameters: `w_in` (neurons × in), `b_in` (neurons), `w_out`
    /// (neurons × out), with `levels` = depth + 1; f32 weights.
    ///
    /// # Panics
    /// If `levels` exceeds 32 (the layer allows at most 25).
    pub fn new(w_in: Vec<f32>, b_in: Vec<f32>, w_out: Vec<f32>, in_features: usize, out_features: usize, levels: usize, activation: Activation) -> Self {
        Self::forest(w_in, b_in, w_out, in_features, out_features, 1, levels, activation)
    }

    /// `trees` parallel trees of `levels` levels each, stored tree by tree (tree t owns
    /// neurons `t·n .. (t+1)·n`, n = 2^levels − 1); their outputs add up.
    ///
    /// # Panics
    /// If `levels` exceeds 32, `trees` is 0 or the weights do not hold `trees · n` neurons.
    #[allow(clippy::too_many_arguments)]
    pub fn forest(
        w_in: Vec<f32>,
        b_in: Vec<f32>,
        w_out: Vec<f32>,
        in_features: usize,
        out_features: usize,
        trees: usize,
        levels: usize,
        activation: Activation,
    ) -> Self {
        assert!((1..=MAX_LEVELS).contains(&levels) && trees > 0, "ufff kernel: {trees} trees of {levels} levels (1..={MAX_LEVELS} levels)");
        let n = ((1usize << levels) - 1) * trees;
        assert!(
            b_in.len() == n && Some(w_in.len()) == n.checked_mul(in_features) && Some(w_out.len()) == n.checked_mul(out_features),
            "ufff kernel: weights do not match {n} neurons of {in_features} → {out_features}"
        );
        let weights = Weights::F32 { w_in: Mat { data: w_in, cols: in_features }, w_out: Mat { data: w_out, cols: out_features } };
        UfffKernel { in_features, out_features, trees, levels, activation, weights, b_in, strategy: TreeStrategy::Auto }
    }

    /// Forces a strategy (for tests and benchmarks).
    pub fn with_strategy(mut self, s: TreeStrategy) -> Self {
        self.strategy = s;
        self
    }

    /// The same kernel with its weight rows stored in `precision` (biases stay f32). bf16
    /// rounds every weight to 8 significant bits, Q8_0/Q4_0 to their blocks (from f32 rows
    /// only); a logit near zero may then send a sample down the other branch than the f32
    /// kernel would.
    pub fn with_precision(mut self, precision: Precision) -> Result<Self> {
        if let (Some(format), Weights::F32 { w_in, w_out }) = (precision.quant(), &self.weights) {
            if !(crate::core::quant::worth_quantizing(w_in.cols) && crate::core::quant::worth_quantizing(w_out.cols)) {
                return Err(crate::error::Error::Invalid(format!(
                    "ufff rows of {} → {} values are too short for {} blocks of 32 (both sides need at least 32, padded by at most half)",
                    w_in.cols,
                    w_out.cols,
                    format.name()
                )));
            }
            let w_in = QMatrix::from_f32(format, &w_in.data, w_in.data.len() / w_in.cols.max(1), w_in.cols)?;
            let w_out = QMatrix::from_f32(format, &w_out.data, w_out.data.len() / w_out.cols.max(1), w_out.cols)?;
            self.weights = Weights::Quant { w_in, w_out };
            return Ok(self);
        }
        self.weights = match (self.weights, precision) {
            (Weights::F32 { w_in, w_out }, Precision::Bf16) => Weights::Bf16 {
                w_in: Mat { data: to_bf16_paired(&w_in.data, w_in.cols), cols: w_in.cols },
                w_out: Mat { data: to_bf16_paired(&w_out.data, w_out.cols), cols: w_out.cols },
            },
            (Weights::Bf16 { w_in, w_out }, Precision::F32) => Weights::F32 { w_in: w_in.widen(), w_out: w_out.widen() },
            (w, _) => w,
        };
        Ok(self)
    }

    /// The quantized walk: samples in chunks, each chunk quantized once, then four samples
    /// at a time down their paths in lockstep with integer dot products, and each output as
    /// one pass over its path's dequantized rows.
    fn per_sample_quant(&self, w_in: &QMatrix, w_out: &QMatrix, x: &[f32], y: &mut [f32]) {
        let (ni, no, levels) = (self.in_features, self.out_features, self.levels);
        let per_tree = (1usize << levels) - 1;
        let chunk = |(xc, yc): (&[f32], &mut [f32])| {
            QX.with_borrow_mut(|q| {
                let rows = xc.len() / ni;
                q.quantize(xc, rows, ni);
                for s0 in (0..rows).step_by(4) {
                    let n = (rows - s0).min(4);
                    for t in 0..self.trees {
                        let base = t * per_tree;
                        let (mut path, mut coef) = ([[0usize; MAX_LEVELS]; 4], [[0.0f32; MAX_LEVELS]; 4]);
                        let mut node = [base; 4];
                        for l in 0..levels {
                            // a partial group repeats its first sample in the empty slots
                            let xs = std::array::from_fn(|k| q.row(s0 + if k < n { k } else { 0 }));
                            let z = w_in.dot4(node, xs);
                            for k in 0..4 {
                                let zk = z[k] + self.b_in[node[k]];
                                (path[k][l], coef[k][l]) = (node[k], self.activation.apply(zk));
                                node[k] = base + 2 * (node[k] - base) + 1 + usize::from(zk > 0.0);
                            }
                        }
                        for k in 0..n {
                            let ys = &mut yc[(s0 + k) * no..(s0 + k + 1) * no];
                            if t == 0 {
                                w_out.weighted_row_sum(&coef[k][..levels], &path[k][..levels], ys);
                            } else {
                                for l in 0..levels {
                                    w_out.axpy(path[k][l], coef[k][l], ys);
                                }
                            }
                        }
                    }
                }
            })
        };
        if y.len() == no {
            chunk((x, y));
        } else {
            x.par_chunks(QUANT_CHUNK * ni).zip(y.par_chunks_mut(QUANT_CHUNK * no)).for_each(chunk);
        }
    }

    /// One sample down its path: the path's dot products first (x stays in L1), then
    /// `y = Σ act(z) · w_out[node]` over the path in one pass, so `y` is written once instead
    /// of read and written at every level (measured: 1.4x faster at batch 256 than fused
    /// dot → axpy per level, `cargo bench --bench tree_kernels`).
    /// Several trees: one after the other, each adding its path's sum into `y`.
    #[inline]
    fn walk<R: Rows>(&self, w_in: &R, w_out: &R, x: &[f32], y: &mut [f32]) {
        let levels = self.levels;
        let per_tree = (1usize << levels) - 1;
        for t in 0..self.trees {
            let (mut path, mut coef) = ([0usize; MAX_LEVELS], [0.0f32; MAX_LEVELS]);
            let (base, mut node) = (t * per_tree, 0);
            for l in 0..levels {
                let z = w_in.dot(base + node, x) + self.b_in[base + node];
                (path[l], coef[l]) = (base + node, self.activation.apply(z));
                node = 2 * node + 1 + usize::from(z > 0.0);
            }
            w_out.sum(&coef[..levels], &path[..levels], y, t > 0);
        }
    }

    /// Four samples down their paths: the dot products in lockstep (at each level their
    /// four row reads are independent, so the memory system works on four streams instead of
    /// waiting on one), then each sample's output in one pass over its path.
    fn walk4<R: Rows>(&self, w_in: &R, w_out: &R, xs: [&[f32]; 4], mut ys: [&mut [f32]; 4]) {
        let levels = self.levels;
        let per_tree = (1usize << levels) - 1;
        for t in 0..self.trees {
            let (mut path, mut coef) = ([[0usize; MAX_LEVELS]; 4], [[0.0f32; MAX_LEVELS]; 4]);
            let base = t * per_tree;
            let mut node = [base; 4];
            for l in 0..levels {
                let z = w_in.dot4(node, xs);
                for k in 0..4 {
                    let zk = z[k] + self.b_in[node[k]];
                    (path[k][l], coef[k][l]) = (node[k], self.activation.apply(zk));
                    node[k] = base + 2 * (node[k] - base) + 1 + usize::from(zk > 0.0);
                }
            }
            for (k, y) in ys.iter_mut().enumerate() {
                w_out.sum(&coef[k][..levels], &path[k][..levels], y, t > 0);
            }
        }
    }

    fn per_sample<R: Rows>(&self, w_in: &R, w_out: &R, x: &[f32], y: &mut [f32]) {
        let (ni, no) = (self.in_features, self.out_features);
        if y.len() == no {
            self.walk(w_in, w_out, x, y);
            return;
        }
        x.par_chunks(4 * ni).zip(y.par_chunks_mut(4 * no)).for_each(|(xq, yq)| {
            if yq.len() == 4 * no {
                self.walk4(w_in, w_out, rows4(xq, ni), rows4_mut(yq, no));
            } else {
                for (xi, yi) in xq.chunks(ni).zip(yq.chunks_mut(no)) {
                    self.walk(w_in, w_out, xi, yi);
                }
            }
        });
    }

    fn grouped<R: Rows>(&self, w_in: &R, w_out: &R, x: &[f32], batch: usize, y: &mut [f32], ws: &mut Workspace) {
        let (ni, no) = (self.in_features, self.out_features);
        let max_width = 1usize << (self.levels - 1);
        // nodes[s]: sample s's node as an index within its level (heap index − 2^level + 1)
        let (_, [nodes, order, pos, offsets]) = ws.take([], [batch, batch, batch, max_width + 1]);
        y.fill(0.0);
        let (yp, np) = (SyncPtr(y.as_mut_ptr()), SyncPtr(nodes.as_mut_ptr()));
        // about four runs of the order per thread keeps threads busy without splitting groups much
        let chunk = batch.div_ceil(4 * rayon::current_num_threads()).max(8);
        let per_tree = (1usize << self.levels) - 1;
        for (t, level) in (0..self.trees).flat_map(|t| (0..self.levels).map(move |l| (t, l))) {
            if level == 0 {
                nodes.fill(0);
            }
            let base = t * per_tree + (1usize << level) - 1;
            dispatch(nodes, 1 << level, offsets, order, pos);
            order.par_chunks(chunk).for_each(|run| {
                for &s in run {
                    let s = s as usize;
                    // SAFETY: `order` is a permutation of 0..batch, so runs touch disjoint
                    // samples: disjoint rows of y and entries of nodes.
                    let (ys, node) = unsafe { (yp.slice(s * no, no), &mut np.slice(s, 1)[0]) };
                    let n = base + *node as usize;
                    let z = w_in.dot(n, &x[s * ni..(s + 1) * ni]) + self.b_in[n];
                    w_out.axpy(n, self.activation.apply(z), ys);
                    *node = 2 * *node + u32::from(z > 0.0);
                }
            });
        }
    }

    fn run<R: Rows>(&self, w_in: &R, w_out: &R, x: &[f32], batch: usize, y: &mut [f32], ws: &mut Workspace) {
        match self.strategy {
            TreeStrategy::PerSample => self.per_sample(w_in, w_out, x, y),
            TreeStrategy::Grouped => self.grouped(w_in, w_out, x, batch, y, ws),
            // Measured here (768-wide rows, 2 MB L2 per core): walking each sample down its whole
            // path keeps its x row in L1 and writes its y row once, and is ~1.9x faster at batch
            // 256 than the level-major grouped walk, which re-reads x and y at every level
            // (`cargo bench --bench tree_kernels`); the rows of the top levels, shared by all
            // samples, stay cache-resident either way.
            TreeStrategy::Auto => self.per_sample(w_in, w_out, x, y),
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
        match &self.weights {
            Weights::F32 { w_in, w_out } => self.run(w_in, w_out, x, batch, y, ws),
            Weights::Bf16 { w_in, w_out } => self.run(w_in, w_out, x, batch, y, ws),
            Weights::Quant { w_in, w_out } => self.per_sample_quant(w_in, w_out, x, y),
        }
        Ok(())
    }

    fn route_usage(&self, x: &[f32], batch: usize, counts: &mut Vec<u64>) -> Option<&'static str> {
        // the last-level neuron each sample reaches in each tree: trees × 2^(levels−1) units
        let (ni, last) = (self.in_features, 1usize << (self.levels - 1));
        counts.resize(self.trees * last, 0);
        if x.len() != batch * ni {
            return Some("leaf");
        }
        let per_tree = (1usize << self.levels) - 1;
        let mut q = QAct::default();
        for xs in x.chunks(ni) {
            if let Weights::Quant { .. } = self.weights {
                q.quantize(xs, 1, ni);
            }
            for t in 0..self.trees {
                let (base, mut node) = (t * per_tree, 0);
                for _ in 1..self.levels {
                    let z = match &self.weights {
                        Weights::F32 { w_in, .. } => w_in.dot(base + node, xs),
                        Weights::Bf16 { w_in, .. } => w_in.dot(base + node, xs),
                        Weights::Quant { w_in, .. } => w_in.dot(base + node, q.row(0)),
                    } + self.b_in[base + node];
                    node = 2 * node + 1 + usize::from(z > 0.0);
                }
                counts[t * last + node - (last - 1)] += 1;
            }
        }
        Some("leaf")
    }

    fn neurons_per_inference(&self) -> usize {
        self.trees * self.levels
    }

    fn macs_per_sample(&self) -> usize {
        self.trees * self.levels * (self.in_features + self.out_features)
    }
}
