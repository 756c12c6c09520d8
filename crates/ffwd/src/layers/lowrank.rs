//! Low-rank FFN ("Investigating Low-Rank Training in Transformer Language Models"; the LowRank
//! baseline of Wei et al. 2024, "Building on Efficient Foundations"): each FFN matrix W
//! (`out × in`) is replaced by `U (out × r) · V (r × in)`, so `y = U2 V2 act(U1 V1 x + b1) + b2`.
//! Parameters `r · (in + out)` per map instead of `in · out`; the products cost the same
//! fraction of a dense FFN's.
//!
//! Init as the paper: draw the dense init (PyTorch's uniform ±1/√in), take its truncated SVD
//! and split the singular values evenly, `U = U_r √S_r`, `V = √S_r V_rᵀ`; at full rank the
//! product is the dense init.
//!
//! Parameters: `fc1.v` (r × in), `fc1.u` (h × r), `fc1.bias` (h), `fc2.v` (r × h), `fc2.u`
//! (out × r), `fc2.bias` (out).

use serde::{Deserialize, Serialize};

use super::guided::{GuideConfig, Guides};
use super::{ensure_len, Compile, Input, Layer, LayerConfig, Trainable};
use crate::core::gemm::{add_sum_rows, matmul, matmul_bias, MatMut, MatRef};
use crate::core::svd::svd_truncated;
use crate::core::{Activation, Param, Rng};
use crate::error::{check_matrix, Error, Result};
use crate::kernels::{InferKernel, LowRankKernel};

/// Configuration of [`LowRank`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LowRankConfig {
    /// Hidden units h.
    pub width: usize,
    /// Rank r of both maps (clamped to each map's smaller dimension).
    pub rank: usize,
    /// Hidden nonlinearity.
    pub activation: Activation,
    /// Self-guided training (a dense guide per map, see [`super::guided`]); none: plain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guide: Option<GuideConfig>,
}

impl Default for LowRankConfig {
    fn default() -> Self {
        LowRankConfig { width: 128, rank: 16, activation: Activation::Relu, guide: None }
    }
}

impl LowRankConfig {
    /// The rank of a map `rows × cols`.
    pub fn rank_of(&self, rows: usize, cols: usize) -> usize {
        self.rank.min(rows).min(cols)
    }
}

/// One factored map `y = U (V x) + b`.
#[derive(Clone, Debug)]
pub struct Factored {
    /// `r × in`.
    pub v: Param,
    /// `out × r`.
    pub u: Param,
    /// `out`.
    pub bias: Param,
}

impl Factored {
    fn new(prefix: &str, in_features: usize, out_features: usize, rank: usize, rng: &mut Rng) -> Self {
        // the dense init, then its truncated SVD with √S on both sides
        let bound = 1.0 / (in_features as f32).sqrt();
        let dense: Vec<f32> = (0..out_features * in_features).map(|_| rng.uniform_range(-bound, bound)).collect();
        let (u, s, vt) = svd_truncated(&dense, out_features, in_features, rank, rng);
        let r = s.len();
        let root: Vec<f32> = s.iter().map(|v| v.sqrt()).collect();
        let mut pu = Param::zeros(&format!("{prefix}.u"), &[out_features, r], true);
        let mut pv = Param::zeros(&format!("{prefix}.v"), &[r, in_features], true);
        for i in 0..out_features {
            for c in 0..r {
                pu.value[i * r + c] = u[i * r + c] * root[c];
            }
        }
        for c in 0..r {
            for j in 0..in_features {
                pv.value[c * in_features + j] = root[c] * vt[c * in_features + j];
            }
        }
        let bias = Param::uniform(&format!("{prefix}.bias"), &[out_features], bound, false, rng);
        Factored { v: pv, u: pu, bias }
    }

    /// Rank r.
    pub fn rank(&self) -> usize {
        self.v.shape[0]
    }

    fn dims(&self) -> (usize, usize, usize) {
        (self.v.shape[1], self.rank(), self.u.shape[0])
    }

    /// The product `U V` (`out × in`).
    pub fn dense(&self) -> Vec<f32> {
        let (i, r, o) = self.dims();
        let mut w = vec![0.0f32; o * i];
        matmul(MatMut::new(&mut w, o, i), MatRef::new(&self.u.value, o, r), MatRef::new(&self.v.value, r, i), false);
        w
    }

    /// `t = x Vᵀ` (`batch × r`), `y = t Uᵀ + b` (`batch × out`).
    fn forward(&self, x: &[f32], batch: usize, t: &mut [f32], y: &mut [f32]) {
        let (i, r, o) = self.dims();
        matmul(MatMut::new(&mut t[..batch * r], batch, r), MatRef::new(x, batch, i), MatRef::new(&self.v.value, r, i).t(), false);
        matmul_bias(MatMut::new(&mut y[..batch * o], batch, o), MatRef::new(&t[..batch * r], batch, r), MatRef::new(&self.u.value, o, r).t(), &self.bias.value);
    }

    /// Adds the gradients of U, V, b; `dt` (`batch × r`) is scratch; writes dx when given.
    fn backward(&mut self, x: &[f32], t: &[f32], batch: usize, dy: &[f32], dt: &mut [f32], dx: Option<&mut [f32]>) {
        let (i, r, o) = self.dims();
        let (t, dt) = (&t[..batch * r], &mut dt[..batch * r]);
        matmul(MatMut::new(&mut self.u.grad, o, r), MatRef::new(dy, batch, o).t(), MatRef::new(t, batch, r), true);
        add_sum_rows(dy, o, &mut self.bias.grad);
        matmul(MatMut::new(dt, batch, r), MatRef::new(dy, batch, o), MatRef::new(&self.u.value, o, r), false);
        matmul(MatMut::new(&mut self.v.grad, r, i), MatRef::new(dt, batch, r).t(), MatRef::new(x, batch, i), true);
        if let Some(dx) = dx {
            matmul(MatMut::new(dx, batch, i), MatRef::new(dt, batch, r), MatRef::new(&self.v.value, r, i), false);
        }
    }
}

/// A low-rank feedforward layer.
#[derive(Clone, Debug)]
pub struct LowRank {
    cfg: LowRankConfig,
    fc1: Factored,
    fc2: Factored,
    /// Per-batch buffers: `x V1ᵀ`, pre-activations, activations, `a V2ᵀ`, and gradients.
    t1: Vec<f32>,
    z: Vec<f32>,
    a: Vec<f32>,
    t2: Vec<f32>,
    dt: Vec<f32>,
    da: Vec<f32>,
    last_batch: usize,
    /// Dense guides of fc1 and fc2 while self-guided training lasts.
    guides: Guides,
}

impl LowRank {
    /// A new layer `in_features → width → out_features` of rank `cfg.rank`.
    pub fn new(cfg: LowRankConfig, in_features: usize, out_features: usize, rng: &mut Rng) -> Result<Self> {
        if cfg.width == 0 || cfg.rank == 0 {
            return Err(Error::Config(format!("lowrank.width and lowrank.rank must be positive, got {} and {}", cfg.width, cfg.rank)));
        }
        let fc1 = Factored::new("fc1", in_features, cfg.width, cfg.rank_of(cfg.width, in_features), rng);
        let fc2 = Factored::new("fc2", cfg.width, out_features, cfg.rank_of(out_features, cfg.width), rng);
        let guides = Guides::new(cfg.guide, || [&fc1, &fc2].map(|m| (m.dense(), m.dims().2, m.dims().0)))?;
        Ok(LowRank { cfg, fc1, fc2, t1: Vec::new(), z: Vec::new(), a: Vec::new(), t2: Vec::new(), dt: Vec::new(), da: Vec::new(), last_batch: 0, guides })
    }

    /// The two factored maps.
    pub fn maps(&self) -> [&Factored; 2] {
        [&self.fc1, &self.fc2]
    }

    /// The dense guides (self-guided training, until the guided phase ends).
    pub fn guides(&self) -> &Guides {
        &self.guides
    }

    /// The dense guides, mutably (tests set α with them).
    pub fn guides_mut(&mut self) -> &mut Guides {
        &mut self.guides
    }
}

impl Layer for LowRank {
    fn kind(&self) -> &'static str {
        "lowrank"
    }

    fn in_features(&self) -> usize {
        self.fc1.v.shape[1]
    }

    fn out_features(&self) -> usize {
        self.fc2.u.shape[0]
    }

    fn config(&self) -> LayerConfig {
        LayerConfig::LowRank(self.cfg.clone())
    }
}

impl Trainable for LowRank {
    fn forward_train(&mut self, input: Input<'_>, y: &mut [f32], rng: &mut Rng) -> Result<()> {
        let (x, batch) = (input.x, input.batch);
        let (ni, no, h) = (self.in_features(), self.out_features(), self.cfg.width);
        check_matrix("lowrank input x", x.len(), batch, ni)?;
        check_matrix("lowrank output y", y.len(), batch, no)?;
        let (r1, r2) = (self.fc1.rank(), self.fc2.rank());
        ensure_len(&mut self.t1, batch * r1);
        ensure_len(&mut self.t2, batch * r2);
        ensure_len(&mut self.z, batch * h);
        ensure_len(&mut self.a, batch * h);
        self.fc1.forward(x, batch, &mut self.t1, &mut self.z);
        if let Some(g) = self.guides.get_mut(0) {
            g.forward(x, batch, &self.fc1.bias.value, &mut self.z[..batch * h], rng);
        }
        self.a[..batch * h].copy_from_slice(&self.z[..batch * h]);
        self.cfg.activation.apply_inplace(&mut self.a[..batch * h]);
        self.fc2.forward(&self.a[..batch * h], batch, &mut self.t2, y);
        if let Some(g) = self.guides.get_mut(1) {
            g.forward(&self.a[..batch * h], batch, &self.fc2.bias.value, y, rng);
        }
        self.last_batch = batch;
        Ok(())
    }

    fn backward(&mut self, input: Input<'_>, dy: &[f32], dx: Option<&mut [f32]>) -> Result<()> {
        let (x, batch) = (input.x, input.batch);
        let (ni, no, h) = (self.in_features(), self.out_features(), self.cfg.width);
        check_matrix("lowrank input x", x.len(), batch, ni)?;
        check_matrix("lowrank output gradient dy", dy.len(), batch, no)?;
        if batch != self.last_batch {
            return Err(Error::Invalid(format!("lowrank backward: batch {batch} differs from the last forward's {}", self.last_batch)));
        }
        if let Some(dx) = dx.as_deref() {
            check_matrix("lowrank input gradient dx", dx.len(), batch, ni)?;
        }
        ensure_len(&mut self.dt, batch * self.fc1.rank().max(self.fc2.rank()));
        ensure_len(&mut self.da, batch * h);
        // with a guide, the factored branch sees (1 − α)·dy and the guide adds its share
        let mut g2 = self.guides.get_mut(1);
        let dy2 = g2.as_mut().map_or(dy, |g| g.structured_dy(dy));
        self.fc2.backward(&self.a[..batch * h], &self.t2, batch, dy2, &mut self.dt, Some(&mut self.da[..batch * h]));
        if let Some(g) = g2.as_mut() {
            g.backward(&self.a[..batch * h], batch, dy, &mut self.fc2.bias.grad, Some(&mut self.da[..batch * h]));
        }
        let act = self.cfg.activation;
        for (d, &z) in self.da[..batch * h].iter_mut().zip(&self.z[..batch * h]) {
            *d *= act.derivative(z);
        }
        let mut dx = dx;
        let da = &self.da[..batch * h];
        let mut g1 = self.guides.get_mut(0);
        let d1 = g1.as_mut().map_or(da, |g| g.structured_dy(da));
        self.fc1.backward(x, &self.t1, batch, d1, &mut self.dt, dx.as_deref_mut());
        if let Some(g) = g1.as_mut() {
            g.backward(x, batch, da, &mut self.fc1.bias.grad, dx);
        }
        Ok(())
    }

    fn params(&self) -> Vec<&Param> {
        let mut v = vec![&self.fc1.v, &self.fc1.u, &self.fc1.bias, &self.fc2.v, &self.fc2.u, &self.fc2.bias];
        v.extend(self.guides.params());
        v
    }

    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        for p in [&mut self.fc1.v, &mut self.fc1.u, &mut self.fc1.bias, &mut self.fc2.v, &mut self.fc2.u, &mut self.fc2.bias] {
            f(p);
        }
        self.guides.visit(f);
    }

    fn set_progress(&mut self, step: usize, total: usize) -> Vec<String> {
        self.guides.set_progress(step, total)
    }

    fn drop_guides(&mut self) -> Vec<String> {
        self.guides.drop_all()
    }
}

impl Compile for LowRank {
    fn kernel(&self) -> Box<dyn InferKernel> {
        Box::new(LowRankKernel::new(&self.fc1, &self.fc2, self.cfg.activation, &self.guides))
    }

    fn neurons_per_inference(&self) -> usize {
        self.cfg.width
    }
}
