//! UltraFastBERT tree ("Exponentially Faster Language Modelling", Belcak & Wattenhofer 2023,
//! arXiv 2311.10770): a balanced binary tree in which every node is one neuron.
//!
//! `depth` D follows UltraFastBERT's convention: D + 1 neuron levels, `2^(D+1) − 1` neurons
//! (D = 11 → 4095 neurons, 12 evaluated per sample). For each sample, starting at the root:
//! `z = w_in[i]·x + b_in[i]`, `a = act(z)` (exact GELU by default), `y += a · w_out[i]`, then
//! move to `2i + 1 + [z > 0]` (the reference's rule: exactly 0 goes left). Output has no bias.
//!
//! Training is conditional as well: only the neurons on each sample's path are computed and
//! receive gradient (the sign routing itself has no gradient, as in the reference), so the
//! forward and backward cost O(batch · depth · (in + out)), not O(batch · width · (in + out)).
//! The reference instead computes all neurons and masks. With `sparse_update` (default), the
//! gradient is also stored sparsely (only the touched rows are zeroed and filled) and the
//! optimizers update only the neurons this batch visited (lazy AdamW/SGD, as PyTorch's
//! SparseAdam): the whole step is then independent of the tree's width.
//!
//! `trees` K > 1 gives UltraFastBERT's "KxD" configurations: K independent trees of depth D
//! side by side, each sample walks all of them and their outputs add up (K · (D+1) neurons per
//! sample). Neurons are stored tree by tree (tree t owns rows `t·n .. (t+1)·n`, n = 2^(D+1) − 1),
//! the reference's `view(batch, K, n_nodes)` order.
//!
//! Parameters (our layout, rows are neurons): `in_weight` (K·n × in), `in_bias` (K·n),
//! `out_weight` (K·n × out). UltraFastBERT's `linear_out.weight` is the transpose of
//! `out_weight`. Init as the reference: uniform ±√(1/in) for `in_*`, ±√(1/((D+1)·K)) for
//! `out_weight`.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{ensure_len, Compile, Input, Layer, LayerConfig, Trainable};
use crate::core::gemm::{axpy, dot};
use crate::core::simd::weighted_row_sum;
use crate::core::{Activation, Param, Rng};
use crate::error::{check_matrix, Error, Result};
use crate::kernels::{InferKernel, Precision, UfffKernel};

/// Configuration of [`Ufff`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UfffConfig {
    /// Depth D: D + 1 neurons per path, `2^(D+1) − 1` neurons per tree.
    pub depth: usize,
    /// Parallel trees K (UltraFastBERT's "KxD"; 1 = one tree, as UltraFastBERT-1x11).
    pub trees: usize,
    /// Neuron nonlinearity (UltraFastBERT: exact GELU).
    pub activation: Activation,
    /// Update only the neurons visited by the batch (lazy optimizer step; see module docs).
    pub sparse_update: bool,
}

impl Default for UfffConfig {
    fn default() -> Self {
        // depth 7 → 255 neurons, 8 per sample: the classifier setting of the foundation issue.
        UfffConfig { depth: 7, trees: 1, activation: Activation::Gelu, sparse_update: true }
    }
}

/// An UltraFastBERT-style tree layer.
#[derive(Clone, Debug)]
pub struct Ufff {
    cfg: UfffConfig,
    in_features: usize,
    out_features: usize,
    in_weight: Param,
    in_bias: Param,
    out_weight: Param,
    /// Neuron visited at each level of each tree, `batch × K·(D+1)`.
    path: Vec<u32>,
    /// Pre-activation at each level of each tree, `batch × K·(D+1)`.
    z: Vec<f32>,
    /// dL/dz at each level of each tree, `batch × K·(D+1)`.
    dz: Vec<f32>,
    last_batch: usize,
}

impl Ufff {
    /// A new tree `in_features → out_features`.
    pub fn new(cfg: UfffConfig, in_features: usize, out_features: usize, rng: &mut Rng) -> Result<Self> {
        if cfg.depth > 24 {
            return Err(Error::Config(format!("ufff.depth {} is too large (at most 24)", cfg.depth)));
        }
        if cfg.trees == 0 {
            return Err(Error::Config("ufff.trees must be at least 1".into()));
        }
        let n = ((1usize << (cfg.depth + 1)) - 1).checked_mul(cfg.trees).ok_or_else(|| Error::Config(format!("ufff.trees {} is too large", cfg.trees)))?;
        let bi = (1.0 / in_features as f32).sqrt();
        let bo = (1.0 / ((cfg.depth + 1) * cfg.trees) as f32).sqrt();
        let mut in_weight = Param::uniform("in_weight", &[n, in_features], bi, true, rng);
        let mut in_bias = Param::uniform("in_bias", &[n], bi, false, rng);
        let mut out_weight = Param::uniform("out_weight", &[n, out_features], bo, true, rng);
        if cfg.sparse_update {
            for p in [&mut in_weight, &mut in_bias, &mut out_weight] {
                p.track_rows();
            }
        }
        Ok(Ufff { in_weight, in_bias, out_weight, cfg, in_features, out_features, path: Vec::new(), z: Vec::new(), dz: Vec::new(), last_batch: 0 })
    }

    /// Total neurons, K · (2^(D+1) − 1).
    pub fn n_neurons(&self) -> usize {
        self.in_bias.len()
    }

    /// Levels per path, D + 1.
    pub fn levels(&self) -> usize {
        self.cfg.depth + 1
    }

    /// Neurons one sample visits, K · (D + 1).
    pub fn path_len(&self) -> usize {
        self.levels() * self.cfg.trees
    }

    /// One sample: writes `y` (length out), and the visited path and pre-activations
    /// (`K·(D+1)` each, tree by tree).
    #[inline]
    fn walk(&self, x: &[f32], y: &mut [f32], path: &mut [u32], z: &mut [f32]) {
        let (ni, lv) = (self.in_features, self.levels());
        let per_tree = (1usize << lv) - 1;
        // per tree, the path first, then y in one pass over it (as the inference kernel, bit
        // for bit)
        for t in 0..self.cfg.trees {
            let (mut nodes, mut coef) = ([0usize; 32], [0.0f32; 32]);
            let mut local = 0usize;
            for lvl in 0..lv {
                let node = t * per_tree + local;
                let zv = dot(&self.in_weight.value[node * ni..(node + 1) * ni], x) + self.in_bias.value[node];
                (nodes[lvl], coef[lvl]) = (node, self.cfg.activation.apply(zv));
                path[t * lv + lvl] = node as u32;
                z[t * lv + lvl] = zv;
                local = 2 * local + 1 + usize::from(zv > 0.0);
            }
            weighted_row_sum(&coef[..lv], &self.out_weight.value, &nodes[..lv], y, t > 0);
        }
    }

    fn tree_kernel(&self) -> UfffKernel {
        let (w_in, b_in, w_out) = (self.in_weight.value.clone(), self.in_bias.value.clone(), self.out_weight.value.clone());
        UfffKernel::forest(w_in, b_in, w_out, self.in_features, self.out_features, self.cfg.trees, self.levels(), self.cfg.activation)
    }

    /// Neurons that hold gradient with `sparse_update`: visited by a training batch since the
    /// last [`Param::zero_grad`], in first-visit order (empty without `sparse_update`).
    pub fn touched(&self) -> &[u32] {
        self.in_weight.touched_rows.as_ref().map_or(&[], |s| s.rows())
    }

    /// Neurons visited by each sample. `x`: `batch × in` → `batch × K·(D+1)` neuron indices
    /// (tree by tree).
    pub fn paths(&self, x: &[f32], batch: usize) -> Result<Vec<u32>> {
        check_matrix("ufff input x", x.len(), batch, self.in_features)?;
        let lv = self.path_len();
        let mut path = vec![0u32; batch * lv];
        let mut z = vec![0.0f32; lv];
        let mut y = vec![0.0f32; self.out_features];
        for (xi, pi) in x.chunks(self.in_features).zip(path.chunks_mut(lv)) {
            self.walk(xi, &mut y, pi, &mut z);
        }
        Ok(path)
    }
}

impl Layer for Ufff {
    fn kind(&self) -> &'static str {
        "ufff"
    }

    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }

    fn config(&self) -> LayerConfig {
        LayerConfig::Ufff(self.cfg.clone())
    }
}

impl Trainable for Ufff {
    fn forward_train(&mut self, input: Input<'_>, y: &mut [f32], _rng: &mut Rng) -> Result<()> {
        let (x, batch) = (input.x, input.batch);
        let (ni, no, lv) = (self.in_features, self.out_features, self.path_len());
        check_matrix("ufff input x", x.len(), batch, ni)?;
        check_matrix("ufff output y", y.len(), batch, no)?;
        if self.path.len() < batch * lv {
            self.path.resize(batch * lv, 0);
        }
        ensure_len(&mut self.z, batch * lv);
        ensure_len(&mut self.dz, batch * lv);
        self.last_batch = batch;
        let mut path = std::mem::take(&mut self.path);
        let mut z = std::mem::take(&mut self.z);
        let this = &*self;
        x.par_chunks(ni)
            .zip(y.par_chunks_mut(no))
            .zip(path.par_chunks_mut(lv).zip(z.par_chunks_mut(lv)))
            .for_each(|((xi, yi), (pi, zi))| this.walk(xi, yi, pi, zi));
        self.path = path;
        self.z = z;
        Ok(())
    }

    fn backward(&mut self, input: Input<'_>, dy: &[f32], dx: Option<&mut [f32]>) -> Result<()> {
        let (x, batch) = (input.x, input.batch);
        let (ni, no, lv) = (self.in_features, self.out_features, self.path_len());
        check_matrix("ufff input x", x.len(), batch, ni)?;
        check_matrix("ufff output gradient dy", dy.len(), batch, no)?;
        if batch != self.last_batch {
            return Err(Error::Invalid(format!("ufff backward: batch {batch} differs from the last forward's {}", self.last_batch)));
        }
        let act = self.cfg.activation;
        // dz = (dy · w_out[node]) · act'(z), per sample in parallel.
        {
            let (path, z, w_out) = (&self.path, &self.z, &self.out_weight.value);
            self.dz[..batch * lv].par_chunks_mut(lv).enumerate().for_each(|(b, dzb)| {
                let dyb = &dy[b * no..(b + 1) * no];
                for l in 0..lv {
                    let node = path[b * lv + l] as usize;
                    dzb[l] = dot(dyb, &w_out[node * no..(node + 1) * no]) * act.derivative(z[b * lv + l]);
                }
            });
        }
        if let Some(dx) = dx {
            check_matrix("ufff input gradient dx", dx.len(), batch, ni)?;
            let (path, dz, w_in) = (&self.path, &self.dz, &self.in_weight.value);
            dx.par_chunks_mut(ni).enumerate().for_each(|(b, dxb)| {
                dxb.fill(0.0);
                for l in 0..lv {
                    let node = path[b * lv + l] as usize;
                    axpy(dz[b * lv + l], &w_in[node * ni..(node + 1) * ni], dxb);
                }
            });
        }
        // Parameter gradients, added in sample order (the result does not depend on the thread
        // count). Only path rows are written; with sparse updates they join the row sets.
        for b in 0..batch {
            let (xb, dyb) = (&x[b * ni..(b + 1) * ni], &dy[b * no..(b + 1) * no]);
            for l in 0..lv {
                let node = self.path[b * lv + l] as usize;
                for p in [&mut self.in_weight, &mut self.in_bias, &mut self.out_weight] {
                    if let Some(rows) = &mut p.touched_rows {
                        rows.insert(node as u32);
                    }
                }
                let (zv, d) = (self.z[b * lv + l], self.dz[b * lv + l]);
                axpy(act.apply(zv), dyb, &mut self.out_weight.grad[node * no..(node + 1) * no]);
                axpy(d, xb, &mut self.in_weight.grad[node * ni..(node + 1) * ni]);
                self.in_bias.grad[node] += d;
            }
        }
        Ok(())
    }

    fn params(&self) -> Vec<&Param> {
        vec![&self.in_weight, &self.in_bias, &self.out_weight]
    }

    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        f(&mut self.in_weight);
        f(&mut self.in_bias);
        f(&mut self.out_weight);
    }
}

impl Compile for Ufff {
    fn kernel(&self) -> Box<dyn InferKernel> {
        Box::new(self.tree_kernel())
    }

    fn stored_kernel(&self, precision: Precision) -> Option<Result<Box<dyn InferKernel>>> {
        Some(self.tree_kernel().with_precision(precision).map(|k| Box::new(k) as Box<dyn InferKernel>))
    }

    fn neurons_per_inference(&self) -> usize {
        self.path_len()
    }
}
