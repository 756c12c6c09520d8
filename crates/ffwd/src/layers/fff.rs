//! Fast Feedforward Network (Belcak & Wattenhofer 2023, arXiv 2308.14711), with the two
//! additions of "Enhancing Fast Feed Forward Networks with Load Balancing and a Master Leaf
//! Node" (2024).
//!
//! A balanced binary tree of `depth` levels of node routers (`2^depth − 1` nodes, heap order:
//! the children of node `i` are `2i+1` left and `2i+2` right) over `2^depth` leaf MLPs
//! `in → leaf → out`. Leaves are numbered left to right, so the root decision is the most
//! significant bit of the leaf index.
//!
//! * **Training** (soft): node `i` sends weight `p = σ(w_i·x + b_i)` to its right child and
//!   `1 − p` to its left; a leaf's mixture weight is the product along its path, and all
//!   leaves are evaluated and mixed (their output bias `b2s` included).
//! * **Hardening**: `h · mean over (batch, nodes) of H(p)`, H the Bernoulli entropy of the
//!   decision with `p` clamped to `[1e-6, 1 − 1e-6]` (as the reference package).
//! * **Region leak** `r`: with probability `r` per node and sample, `p ↦ 1 − p` (training only).
//! * **Leaf dropout** `δ`: inverted dropout on the leaves' hidden activations (training only),
//!   as the reference package's `dropout` argument.
//! * **Inference** (hard): descend one path and evaluate one leaf. **Tie rule**: go right iff
//!   the node logit is `≥ 0` (σ ≥ ½, the paper's Algorithm 1). The reference package's
//!   `torch.round(p)` sends exactly ½ left; the two differ only on exact zeros of the logit.
//!   Greedy descent equals the argmax of the soft path weights whenever every decision on the
//!   way is confident (the hardened regime); for soft trees the two may differ.
//! * **Load balancing** (weight `α`, 0 = off): `α · n_leaves · Σ_l f_l · P_l` with `f_l` the
//!   fraction of the batch whose hard path ends at leaf `l` (no gradient) and `P_l` the batch
//!   mean of the leaf's soft mixture weight; equals `α` when routing is uniform.
//! * **Master leaf** (width `m`, 0 = off): an always-on dense MLP `in → m → out` and a learned
//!   gate `g = σ(w_g·x + b_g)`; the output is `(1 − g)·tree + g·master`, so `g → 0` recovers the
//!   plain tree. It is evaluated at inference too.
//!
//! Parameters and layouts match the `fastfeedforward` 0.2.1 package: `node_weights`
//! (nodes × in), `node_biases` (nodes × 1), `w1s` (leaves × in × leaf), `b1s` (leaves × leaf),
//! `w2s` (leaves × leaf × out), `b2s` (leaves × out); master leaf: `master.fc1.*`,
//! `master.fc2.*`, `master.gate.*`.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{ensure_len, Compile, Input, Layer, LayerConfig, Linear, Trainable};
use crate::core::activation::sigmoid;
use crate::core::gemm::{add_row_bias, add_sum_rows, axpy, dot, matmul, MatMut, MatRef};
use crate::core::{Activation, Param, Rng};
use crate::error::{check_matrix, Error, Result};
use crate::kernels::fff::MasterWeights;
use crate::kernels::{FffKernel, InferKernel, Precision};

/// Clamp of the node probabilities inside the entropy, as in the reference package.
const ENTROPY_EPS: f32 = 1e-6;

/// Configuration of [`Fff`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FffConfig {
    /// Router levels: `2^depth` leaves, `2^depth − 1` nodes. 0 gives a single leaf.
    pub depth: usize,
    /// Hidden units of each leaf MLP (ℓ). Training width is `2^depth · leaf`.
    pub leaf: usize,
    /// Leaf nonlinearity.
    pub activation: Activation,
    /// Hardening weight h on the mean node-decision entropy.
    pub hardening: f32,
    /// Probability of flipping a node decision during training.
    pub region_leak: f32,
    /// Dropout probability on the leaves' hidden activations during training.
    pub dropout: f32,
    /// Weight α of the leaf load-balancing term (0 = off).
    pub load_balance: f32,
    /// Hidden width of the always-on master leaf (0 = off; 8 in the paper's code).
    pub master_leaf: usize,
}

impl Default for FffConfig {
    fn default() -> Self {
        // depth 4 × leaf 8 = width 128, the FFF paper's Table 1 setting; h = 3 as in its tables.
        FffConfig { depth: 4, leaf: 8, activation: Activation::Relu, hardening: 3.0, region_leak: 0.0, dropout: 0.0, load_balance: 0.0, master_leaf: 0 }
    }
}

/// Master leaf: a small always-on MLP and its blending gate.
#[derive(Clone, Debug)]
struct MasterLeaf {
    fc1: Linear,
    fc2: Linear,
    gate: Linear,
    pre: Vec<f32>,
    act: Vec<f32>,
    out: Vec<f32>,
    g: Vec<f32>,
    dact: Vec<f32>,
    dout: Vec<f32>,
    dgate: Vec<f32>,
}

/// A fast feedforward network. See the module documentation for the exact semantics.
#[derive(Clone, Debug)]
pub struct Fff {
    cfg: FffConfig,
    in_features: usize,
    out_features: usize,
    node_weights: Param,
    node_biases: Param,
    w1s: Param,
    b1s: Param,
    w2s: Param,
    b2s: Param,
    master: Option<MasterLeaf>,
    // ---- training buffers (grow with the batch) ----
    /// Node logits, `batch × nodes`.
    z: Vec<f32>,
    /// σ(logit), `batch × nodes` (before any leak flip).
    p: Vec<f32>,
    /// Leak flips, `batch × nodes`.
    flip: Vec<bool>,
    /// Reach probability of every tree position (nodes then leaves), `batch × (2·leaves − 1)`.
    reach: Vec<f32>,
    /// Leaf pre-activations and activations, `batch × (leaves·leaf)`.
    pre1: Vec<f32>,
    h: Vec<f32>,
    /// Dropout scale of each leaf activation (0 or 1/(1−δ)), `batch × (leaves·leaf)`.
    drop: Vec<f32>,
    /// Leaf outputs with bias, `batch × (leaves·out)`.
    o: Vec<f32>,
    /// Tree output before the master blend, `batch × out`.
    tree_y: Vec<f32>,
    /// Hard leaf of each sample and the batch share of each leaf.
    hard_leaf: Vec<usize>,
    leaf_share: Vec<f32>,
    // backward scratch
    dtree: Vec<f32>,
    do_: Vec<f32>,
    dh: Vec<f32>,
    s: Vec<f32>,
    dz: Vec<f32>,
    aux: f32,
    /// Mean node-decision entropy of the last training forward (nats).
    entropy: f32,
    last_batch: usize,
}

impl Fff {
    /// A new FFF `in_features → out_features`, initialised as the reference package
    /// (uniform ±1/√in for nodes and the first leaf layer, ±1/√leaf for the second).
    pub fn new(cfg: FffConfig, in_features: usize, out_features: usize, rng: &mut Rng) -> Result<Self> {
        if cfg.leaf == 0 {
            return Err(Error::Config("fff.leaf must be positive".into()));
        }
        if cfg.depth > 20 {
            return Err(Error::Config(format!("fff.depth {} is too large (at most 20)", cfg.depth)));
        }
        if !(0.0..=1.0).contains(&cfg.region_leak) {
            return Err(Error::Config(format!("fff.region_leak must be in [0, 1], got {}", cfg.region_leak)));
        }
        if !(0.0..1.0).contains(&cfg.dropout) {
            return Err(Error::Config(format!("fff.dropout must be in [0, 1), got {}", cfg.dropout)));
        }
        if cfg.hardening < 0.0 || cfg.load_balance < 0.0 {
            return Err(Error::Config("fff.hardening and fff.load_balance must be non-negative".into()));
        }
        let leaves = 1usize << cfg.depth;
        let nodes = leaves - 1;
        let b1 = 1.0 / (in_features as f32).sqrt();
        let b2 = 1.0 / (cfg.leaf as f32).sqrt();
        let node_weights = Param::uniform("node_weights", &[nodes, in_features], b1, true, rng);
        let node_biases = Param::uniform("node_biases", &[nodes, 1], b1, false, rng);
        let w1s = Param::uniform("w1s", &[leaves, in_features, cfg.leaf], b1, true, rng);
        let b1s = Param::uniform("b1s", &[leaves, cfg.leaf], b1, false, rng);
        let w2s = Param::uniform("w2s", &[leaves, cfg.leaf, out_features], b2, true, rng);
        let b2s = Param::uniform("b2s", &[leaves, out_features], b2, false, rng);
        let master = (cfg.master_leaf > 0).then(|| {
            let mut gate = Linear::new("master.gate", in_features, 1, rng);
            // Start with the gate mostly closed so the tree carries the signal early on.
            gate.bias.value[0] = -2.0;
            MasterLeaf {
                fc1: Linear::new("master.fc1", in_features, cfg.master_leaf, rng),
                fc2: Linear::new("master.fc2", cfg.master_leaf, out_features, rng),
                gate,
                pre: Vec::new(),
                act: Vec::new(),
                out: Vec::new(),
                g: Vec::new(),
                dact: Vec::new(),
                dout: Vec::new(),
                dgate: Vec::new(),
            }
        });
        Ok(Fff {
            cfg,
            in_features,
            out_features,
            node_weights,
            node_biases,
            w1s,
            b1s,
            w2s,
            b2s,
            master,
            z: Vec::new(),
            p: Vec::new(),
            flip: Vec::new(),
            reach: Vec::new(),
            pre1: Vec::new(),
            h: Vec::new(),
            drop: Vec::new(),
            o: Vec::new(),
            tree_y: Vec::new(),
            hard_leaf: Vec::new(),
            leaf_share: vec![0.0; leaves],
            dtree: Vec::new(),
            do_: Vec::new(),
            dh: Vec::new(),
            s: Vec::new(),
            dz: Vec::new(),
            aux: 0.0,
            entropy: 0.0,
            last_batch: 0,
        })
    }

    /// Number of leaves, `2^depth`.
    pub fn n_leaves(&self) -> usize {
        1 << self.cfg.depth
    }

    /// Number of router nodes, `2^depth − 1`.
    pub fn n_nodes(&self) -> usize {
        self.n_leaves() - 1
    }

    /// The configuration.
    pub fn cfg(&self) -> &FffConfig {
        &self.cfg
    }

    /// Leaf reached by hard descent for one sample `x` (length `in`).
    #[inline]
    fn descend(&self, x: &[f32]) -> usize {
        let nodes = self.n_nodes();
        let mut node = 0;
        while node < nodes {
            let logit = dot(&self.node_weights.value[node * self.in_features..(node + 1) * self.in_features], x) + self.node_biases.value[node];
            node = 2 * node + 1 + usize::from(logit >= 0.0);
        }
        node - nodes
    }

    /// Hard-descent leaf of each sample. `x`: `batch × in` → `batch` leaf indices.
    pub fn hard_leaves(&self, x: &[f32], batch: usize) -> Result<Vec<usize>> {
        check_matrix("fff input x", x.len(), batch, self.in_features)?;
        Ok(x.par_chunks(self.in_features).map(|xi| self.descend(xi)).collect())
    }

    /// Soft mixture weights of the leaves. `x`: `batch × in` → `batch × leaves` (rows sum to 1).
    pub fn soft_mixture(&self, x: &[f32], batch: usize) -> Result<Vec<f32>> {
        check_matrix("fff input x", x.len(), batch, self.in_features)?;
        let (nodes, leaves) = (self.n_nodes(), self.n_leaves());
        let mut out = vec![0.0; batch * leaves];
        let mut reach = vec![0.0; 2 * leaves - 1];
        for (xi, row) in x.chunks(self.in_features).zip(out.chunks_mut(leaves)) {
            reach[0] = 1.0;
            for i in 0..nodes {
                let p = sigmoid(dot(&self.node_weights.value[i * self.in_features..(i + 1) * self.in_features], xi) + self.node_biases.value[i]);
                reach[2 * i + 1] = reach[i] * (1.0 - p);
                reach[2 * i + 2] = reach[i] * p;
            }
            row.copy_from_slice(&reach[nodes..]);
        }
        Ok(out)
    }

    /// Share of the last training batch routed (hard) to each leaf.
    pub fn leaf_share(&self) -> &[f32] {
        &self.leaf_share
    }

    fn ensure_buffers(&mut self, batch: usize) {
        let (nodes, leaves, lw, no) = (self.n_nodes(), self.n_leaves(), self.cfg.leaf, self.out_features);
        ensure_len(&mut self.z, batch * nodes);
        ensure_len(&mut self.p, batch * nodes);
        if self.flip.len() < batch * nodes {
            self.flip.resize(batch * nodes, false);
        }
        ensure_len(&mut self.reach, batch * (2 * leaves - 1));
        ensure_len(&mut self.s, batch * (2 * leaves - 1));
        ensure_len(&mut self.pre1, batch * leaves * lw);
        ensure_len(&mut self.h, batch * leaves * lw);
        if self.cfg.dropout > 0.0 {
            ensure_len(&mut self.drop, batch * leaves * lw);
        }
        ensure_len(&mut self.dh, batch * leaves * lw);
        ensure_len(&mut self.o, batch * leaves * no);
        ensure_len(&mut self.do_, batch * leaves * no);
        ensure_len(&mut self.tree_y, batch * no);
        ensure_len(&mut self.dtree, batch * no);
        ensure_len(&mut self.dz, batch * nodes);
        if self.hard_leaf.len() < batch {
            self.hard_leaf.resize(batch, 0);
        }
        if let Some(m) = &mut self.master {
            let mw = self.cfg.master_leaf;
            ensure_len(&mut m.pre, batch * mw);
            ensure_len(&mut m.act, batch * mw);
            ensure_len(&mut m.dact, batch * mw);
            ensure_len(&mut m.out, batch * no);
            ensure_len(&mut m.dout, batch * no);
            ensure_len(&mut m.g, batch);
            ensure_len(&mut m.dgate, batch);
        }
    }
}

/// Bernoulli entropy of a clamped probability.
#[inline]
fn entropy(p: f32) -> f32 {
    let p = p.clamp(ENTROPY_EPS, 1.0 - ENTROPY_EPS);
    -p * p.ln() - (1.0 - p) * (1.0 - p).ln()
}

/// dH/dp of the clamped entropy (zero where the clamp is active).
#[inline]
fn entropy_grad(p: f32) -> f32 {
    if p <= ENTROPY_EPS || p >= 1.0 - ENTROPY_EPS {
        0.0
    } else {
        ((1.0 - p) / p).ln()
    }
}

impl Layer for Fff {
    fn kind(&self) -> &'static str {
        "fff"
    }

    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }

    fn config(&self) -> LayerConfig {
        LayerConfig::Fff(self.cfg.clone())
    }
}

impl Trainable for Fff {
    fn forward_train(&mut self, input: Input<'_>, y: &mut [f32], rng: &mut Rng) -> Result<()> {
        let (x, batch) = (input.x, input.batch);
        let (ni, no) = (self.in_features, self.out_features);
        check_matrix("fff input x", x.len(), batch, ni)?;
        check_matrix("fff output y", y.len(), batch, no)?;
        self.ensure_buffers(batch);
        self.last_batch = batch;
        let (nodes, leaves, lw) = (self.n_nodes(), self.n_leaves(), self.cfg.leaf);
        let tw = 2 * leaves - 1;

        // Routers: z = x·node_weightsᵀ + b, p = σ(z), optional leak flips, reach top-down.
        let z = &mut self.z[..batch * nodes];
        z.fill(0.0);
        add_row_bias(z, &self.node_biases.value);
        matmul(MatMut::new(z, batch, nodes), MatRef::new(x, batch, ni), MatRef::new(&self.node_weights.value, nodes, ni).t(), true);
        let leak = self.cfg.region_leak;
        for k in 0..batch * nodes {
            self.p[k] = sigmoid(self.z[k]);
            self.flip[k] = leak > 0.0 && rng.uniform() < leak;
        }
        let mut entropy_sum = 0.0f64;
        for b in 0..batch {
            let r = &mut self.reach[b * tw..(b + 1) * tw];
            r[0] = 1.0;
            for i in 0..nodes {
                let p = self.p[b * nodes + i];
                entropy_sum += entropy(p) as f64;
                let q = if self.flip[b * nodes + i] { 1.0 - p } else { p };
                r[2 * i + 1] = r[i] * (1.0 - q);
                r[2 * i + 2] = r[i] * q;
            }
            // hard path for load statistics (no leak, tie rule as at inference)
            let mut node = 0;
            while node < nodes {
                node = 2 * node + 1 + usize::from(self.z[b * nodes + node] >= 0.0);
            }
            self.hard_leaf[b] = node - nodes;
        }
        self.leaf_share.fill(0.0);
        for &l in &self.hard_leaf[..batch] {
            self.leaf_share[l] += 1.0 / batch as f32;
        }

        // Leaves: pre1[:, l] = x·w1s[l] + b1s[l]; h = act(pre1); o[:, l] = h[:, l]·w2s[l] + b2s[l].
        let (lh, lo) = (leaves * lw, leaves * no);
        let pre1 = &mut self.pre1[..batch * lh];
        pre1.fill(0.0);
        add_row_bias(pre1, &self.b1s.value);
        for l in 0..leaves {
            matmul(
                MatMut::strided(&mut pre1[l * lw..], batch, lw, lh, 1),
                MatRef::new(x, batch, ni),
                MatRef::new(&self.w1s.value[l * ni * lw..(l + 1) * ni * lw], ni, lw),
                true,
            );
        }
        self.cfg.activation.forward(pre1, &mut self.h[..batch * lh]);
        if self.cfg.dropout > 0.0 {
            let (p, keep_scale) = (self.cfg.dropout, 1.0 / (1.0 - self.cfg.dropout));
            for (h, d) in self.h[..batch * lh].iter_mut().zip(&mut self.drop[..batch * lh]) {
                *d = if rng.uniform() < p { 0.0 } else { keep_scale };
                *h *= *d;
            }
        }
        let o = &mut self.o[..batch * lo];
        o.fill(0.0);
        add_row_bias(o, &self.b2s.value);
        for l in 0..leaves {
            matmul(
                MatMut::strided(&mut o[l * no..], batch, no, lo, 1),
                MatRef::strided(&self.h[l * lw..], batch, lw, lh, 1),
                MatRef::new(&self.w2s.value[l * lw * no..(l + 1) * lw * no], lw, no),
                true,
            );
        }
        // Mix: tree_y[b] = Σ_l m[b, l] · o[b, l].
        let tree_y = &mut self.tree_y[..batch * no];
        tree_y.fill(0.0);
        for b in 0..batch {
            let m = &self.reach[b * tw + nodes..(b + 1) * tw];
            let yb = &mut tree_y[b * no..(b + 1) * no];
            for (&ml, ol) in m.iter().zip(self.o[b * lo..(b + 1) * lo].chunks_exact(no)) {
                axpy(ml, ol, yb);
            }
        }

        // Master leaf blend or plain copy.
        let y = &mut y[..batch * no];
        if let Some(m) = &mut self.master {
            let mw = self.cfg.master_leaf;
            m.fc1.forward(x, batch, &mut m.pre);
            self.cfg.activation.forward(&m.pre[..batch * mw], &mut m.act[..batch * mw]);
            m.fc2.forward(&m.act, batch, &mut m.out);
            m.gate.forward(x, batch, &mut m.g);
            for b in 0..batch {
                let g = sigmoid(m.g[b]);
                m.g[b] = g;
                for j in 0..no {
                    y[b * no + j] = (1.0 - g) * tree_y[b * no + j] + g * m.out[b * no + j];
                }
            }
        } else {
            y.copy_from_slice(tree_y);
        }

        // Auxiliary losses.
        let mut aux = 0.0f32;
        if nodes > 0 && self.cfg.hardening > 0.0 {
            aux += self.cfg.hardening * (entropy_sum / (batch * nodes) as f64) as f32;
        }
        if self.cfg.load_balance > 0.0 {
            let mut lb = 0.0f64;
            for l in 0..leaves {
                let mean_m: f64 = (0..batch).map(|b| self.reach[b * tw + nodes + l] as f64).sum::<f64>() / batch as f64;
                lb += self.leaf_share[l] as f64 * mean_m;
            }
            aux += self.cfg.load_balance * leaves as f32 * lb as f32;
        }
        self.aux = aux;
        self.entropy = if nodes > 0 { (entropy_sum / (batch * nodes) as f64) as f32 } else { 0.0 };
        Ok(())
    }

    fn backward(&mut self, input: Input<'_>, dy: &[f32], mut dx: Option<&mut [f32]>) -> Result<()> {
        let (x, batch) = (input.x, input.batch);
        let (ni, no) = (self.in_features, self.out_features);
        check_matrix("fff input x", x.len(), batch, ni)?;
        check_matrix("fff output gradient dy", dy.len(), batch, no)?;
        if let Some(d) = dx.as_deref() {
            check_matrix("fff input gradient dx", d.len(), batch, ni)?;
        }
        if batch != self.last_batch {
            return Err(Error::Invalid(format!("fff backward: batch {batch} differs from the last forward's {}", self.last_batch)));
        }
        let (nodes, leaves, lw) = (self.n_nodes(), self.n_leaves(), self.cfg.leaf);
        let (tw, lh, lo) = (2 * leaves - 1, leaves * lw, leaves * no);
        let dy = &dy[..batch * no];

        // Master leaf and gate; dtree = (1 − g)·dy.
        let mut dx_written = false;
        if let Some(m) = &mut self.master {
            let mw = self.cfg.master_leaf;
            for b in 0..batch {
                let g = m.g[b];
                let mut dg = 0.0;
                for j in 0..no {
                    let d = dy[b * no + j];
                    self.dtree[b * no + j] = (1.0 - g) * d;
                    m.dout[b * no + j] = g * d;
                    dg += d * (m.out[b * no + j] - self.tree_y[b * no + j]);
                }
                m.dgate[b] = dg * g * (1.0 - g);
            }
            m.fc2.backward(&m.act, batch, &m.dout, Some(&mut m.dact[..batch * mw]), false);
            self.cfg.activation.backward_inplace(&m.pre[..batch * mw], &mut m.dact[..batch * mw]);
            m.fc1.backward(x, batch, &m.dact, dx.as_deref_mut(), false);
            m.gate.backward(x, batch, &m.dgate, dx.as_deref_mut(), true);
            dx_written = true;
        } else {
            self.dtree[..batch * no].copy_from_slice(dy);
        }

        // dm[b, l] = dtree[b]·o[b, l] (+ load balance), into the leaf slots of s;
        // do[b, l] = m[b, l]·dtree[b].
        let lb_coef = if self.cfg.load_balance > 0.0 { self.cfg.load_balance * leaves as f32 / batch as f32 } else { 0.0 };
        for b in 0..batch {
            let dt = &self.dtree[b * no..(b + 1) * no];
            for l in 0..leaves {
                let m = self.reach[b * tw + nodes + l];
                let ob = &self.o[b * lo + l * no..b * lo + (l + 1) * no];
                self.s[b * tw + nodes + l] = dot(dt, ob) + lb_coef * self.leaf_share[l];
                for (d, &t) in self.do_[b * lo + l * no..b * lo + (l + 1) * no].iter_mut().zip(dt) {
                    *d = m * t;
                }
            }
        }

        // Leaf second layer: dw2s[l] = h[:, l]ᵀ·do[:, l]; db2s = Σ_b do; dh[:, l] = do[:, l]·w2s[l]ᵀ.
        let do_ = &self.do_[..batch * lo];
        for l in 0..leaves {
            matmul(
                MatMut::new(&mut self.w2s.grad[l * lw * no..(l + 1) * lw * no], lw, no),
                MatRef::strided(&self.h[l * lw..], batch, lw, lh, 1).t(),
                MatRef::strided(&do_[l * no..], batch, no, lo, 1),
                true,
            );
            matmul(
                MatMut::strided(&mut self.dh[l * lw..], batch, lw, lh, 1),
                MatRef::strided(&do_[l * no..], batch, no, lo, 1),
                MatRef::new(&self.w2s.value[l * lw * no..(l + 1) * lw * no], lw, no).t(),
                false,
            );
        }
        add_sum_rows(do_, lo, &mut self.b2s.grad);
        if self.cfg.dropout > 0.0 {
            for (g, d) in self.dh[..batch * lh].iter_mut().zip(&self.drop[..batch * lh]) {
                *g *= d;
            }
        }
        self.cfg.activation.backward_inplace(&self.pre1[..batch * lh], &mut self.dh[..batch * lh]);
        let dpre1 = &self.dh[..batch * lh];
        add_sum_rows(dpre1, lh, &mut self.b1s.grad);
        for l in 0..leaves {
            let dpre_l = MatRef::strided(&dpre1[l * lw..], batch, lw, lh, 1);
            matmul(MatMut::new(&mut self.w1s.grad[l * ni * lw..(l + 1) * ni * lw], ni, lw), MatRef::new(x, batch, ni).t(), dpre_l, true);
            if let Some(d) = dx.as_deref_mut() {
                matmul(MatMut::new(d, batch, ni), dpre_l, MatRef::new(&self.w1s.value[l * ni * lw..(l + 1) * ni * lw], ni, lw).t(), dx_written);
                dx_written = true;
            }
        }

        // Routers, bottom-up: S_i = (1−q)·S_left + q·S_right, dL/dq_i = reach_i·(S_right − S_left).
        if nodes > 0 {
            let hcoef = self.cfg.hardening / (batch * nodes) as f32;
            for b in 0..batch {
                let s = &mut self.s[b * tw..(b + 1) * tw];
                let r = &self.reach[b * tw..(b + 1) * tw];
                for i in (0..nodes).rev() {
                    let k = b * nodes + i;
                    let p = self.p[k];
                    let q = if self.flip[k] { 1.0 - p } else { p };
                    let (sl, sr) = (s[2 * i + 1], s[2 * i + 2]);
                    s[i] = (1.0 - q) * sl + q * sr;
                    let dq = r[i] * (sr - sl);
                    let dp = if self.flip[k] { -dq } else { dq } + hcoef * entropy_grad(p);
                    self.dz[k] = dp * p * (1.0 - p);
                }
            }
            let dz = &self.dz[..batch * nodes];
            matmul(MatMut::new(&mut self.node_weights.grad, nodes, ni), MatRef::new(dz, batch, nodes).t(), MatRef::new(x, batch, ni), true);
            add_sum_rows(dz, nodes, &mut self.node_biases.grad);
            if let Some(d) = dx {
                matmul(MatMut::new(d, batch, ni), MatRef::new(dz, batch, nodes), MatRef::new(&self.node_weights.value, nodes, ni), dx_written);
            }
        }
        Ok(())
    }

    fn decision_entropy(&self) -> Option<f32> {
        (self.cfg.depth > 0).then_some(self.entropy)
    }

    fn aux_loss(&self) -> f32 {
        self.aux
    }

    fn params(&self) -> Vec<&Param> {
        let mut v = vec![&self.node_weights, &self.node_biases, &self.w1s, &self.b1s, &self.w2s, &self.b2s];
        if let Some(m) = &self.master {
            v.extend([&m.fc1.weight, &m.fc1.bias, &m.fc2.weight, &m.fc2.bias, &m.gate.weight, &m.gate.bias]);
        }
        v
    }

    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        for p in [&mut self.node_weights, &mut self.node_biases, &mut self.w1s, &mut self.b1s, &mut self.w2s, &mut self.b2s] {
            f(p);
        }
        if let Some(m) = &mut self.master {
            for p in [&mut m.fc1.weight, &mut m.fc1.bias, &mut m.fc2.weight, &mut m.fc2.bias, &mut m.gate.weight, &mut m.gate.bias] {
                f(p);
            }
        }
    }
}

impl Fff {
    /// The inference kernel (f32 weights).
    fn tree_kernel(&self) -> FffKernel {
        let master = self.master.as_ref().map(|m| MasterWeights {
            w1: m.fc1.weight.value.clone(),
            b1: m.fc1.bias.value.clone(),
            w2: m.fc2.weight.value.clone(),
            b2: m.fc2.bias.value.clone(),
            gate_w: m.gate.weight.value.clone(),
            gate_b: m.gate.bias.value[0],
        });
        FffKernel::new(
            self.node_weights.value.clone(),
            self.node_biases.value.clone(),
            &self.w1s.value,
            self.b1s.value.clone(),
            self.w2s.value.clone(),
            self.b2s.value.clone(),
            self.in_features,
            self.out_features,
            self.cfg.depth,
            self.cfg.leaf,
            self.cfg.activation,
            master,
        )
    }
}

impl Compile for Fff {
    fn kernel(&self) -> Box<dyn InferKernel> {
        Box::new(self.tree_kernel())
    }

    fn stored_kernel(&self, precision: Precision) -> Option<Result<Box<dyn InferKernel>>> {
        Some(self.tree_kernel().with_precision(precision).map(|k| Box::new(k) as Box<dyn InferKernel>))
    }

    fn neurons_per_inference(&self) -> usize {
        // depth router neurons + one leaf (+ master leaf and its gate neuron)
        self.cfg.depth + self.cfg.leaf + if self.cfg.master_leaf > 0 { self.cfg.master_leaf + 1 } else { 0 }
    }
}
