//! Top-k softmax mixture of experts (Shazeer et al. 2017; Switch, Fedus et al. 2022, with
//! k = 1; Mixtral-style with k = 2 and renormalised gates).
//!
//! `p = softmax(W_r x)` over `E` experts, the `k` largest are run, `y = b2 + Σ g_j E_j(x)`
//! with `g_j = p_j` (or `p_j / Σ_top p`, which is also the softmax over the top-k logits).
//! Auxiliary losses: the Switch balance loss `α · E · Σ_i f_i · P_i` (`f_i` the share of the
//! `B·k` routed slots that chose expert `i`, no gradient; `P_i` the batch-mean router
//! probability; it equals `α` under uniform routing) and the router z-loss
//! `β · mean_b (logsumexp h_b)²`. An optional capacity `⌈B·k/E · factor⌉` drops, in token
//! order, the slots an expert receives beyond it (training only): a dropped slot contributes
//! nothing, so in a residual block the token passes through unchanged.
//!
//! Parameters: `router.weight` (`E × in`), then the expert bank `w1`, `b1`, `w2`, `b2`.

use serde::{Deserialize, Serialize};

use super::experts::{apply_capacity, router_backward, router_logits, router_ranking, ExpertBank};
use super::{ensure_len, Compile, Input, Layer, LayerConfig, Trainable};
use crate::core::{Activation, Param, Rng};
use crate::error::{check_matrix, Error, Result};
use crate::kernels::grouped::ExpertShape;
use crate::kernels::moe::{route_softmax, Router};
use crate::kernels::{InferKernel, MoeKernel, Precision};

/// Configuration of [`Moe`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MoeConfig {
    /// Number of experts `E`.
    pub experts: usize,
    /// Hidden units per expert `G`.
    pub expert_width: usize,
    /// Experts per token (1 = Switch, 2 = Mixtral).
    pub k: usize,
    /// Renormalise the top-k gates to sum to 1.
    pub renormalize: bool,
    /// Switch balance loss coefficient α.
    pub balance: f32,
    /// Router z-loss coefficient β.
    pub z_loss: f32,
    /// Capacity factor (0 = no capacity limit); training only.
    pub capacity_factor: f32,
    /// Expert nonlinearity.
    pub activation: Activation,
}

impl Default for MoeConfig {
    fn default() -> Self {
        // 16 experts × 8 = 128 hidden units, the w = 128 budget of the FFF comparison;
        // α = 1e-2 and β = 1e-3 are the Switch / ST-MoE defaults.
        MoeConfig { experts: 16, expert_width: 8, k: 2, renormalize: true, balance: 1e-2, z_loss: 1e-3, capacity_factor: 0.0, activation: Activation::Relu }
    }
}

/// A top-k softmax mixture of two-layer experts.
#[derive(Clone, Debug)]
pub struct Moe {
    cfg: MoeConfig,
    /// `E × in`.
    pub router: Param,
    /// The experts.
    pub bank: ExpertBank,
    logits: Vec<f32>,
    probs: Vec<f32>,
    lse: Vec<f32>,
    topk: Vec<u32>,
    assign: Vec<u32>,
    gates: Vec<f32>,
    dgates: Vec<f32>,
    dlogits: Vec<f32>,
    counts: Vec<u32>,
    /// Share of the routed slots (before capacity) that chose each expert (`f_i`).
    frac: Vec<f32>,
    aux: f32,
}

pub(crate) fn check_mixture(experts: usize, width: usize, k: usize, name: &str) -> Result<()> {
    if experts == 0 || width == 0 {
        return Err(Error::Config(format!("{name}.experts and {name}.expert_width must be positive, got {experts} and {width}")));
    }
    if k == 0 || k > experts {
        return Err(Error::Config(format!("{name}.k must be in 1..={experts} (the number of experts), got {k}")));
    }
    Ok(())
}

impl Moe {
    /// A new mixture `in_features → out_features`.
    pub fn new(cfg: MoeConfig, in_features: usize, out_features: usize, rng: &mut Rng) -> Result<Self> {
        check_mixture(cfg.experts, cfg.expert_width, cfg.k, "moe")?;
        if !(cfg.capacity_factor >= 0.0 && cfg.capacity_factor.is_finite()) {
            return Err(Error::Config(format!("moe.capacity_factor must be ≥ 0, got {}", cfg.capacity_factor)));
        }
        let e = cfg.experts;
        let shape = ExpertShape { experts: e, in_features, width: cfg.expert_width, out_features };
        // Switch initialises the router small (std √(0.1/in)) so routing starts near uniform
        let mut router = Param::zeros("router.weight", &[e, in_features], true);
        let std = (0.1 / in_features as f32).sqrt();
        for v in &mut router.value {
            *v = std * rng.normal();
        }
        // experts: PyTorch Linear's scale (std 1/√(3·fan_in))
        let bank = ExpertBank::new(shape, cfg.activation, 1.0 / (3.0 * in_features as f32).sqrt(), 1.0 / (3.0 * cfg.expert_width as f32).sqrt(), rng);
        Ok(Moe {
            cfg,
            router,
            bank,
            logits: Vec::new(),
            probs: Vec::new(),
            lse: Vec::new(),
            topk: Vec::new(),
            assign: Vec::new(),
            gates: Vec::new(),
            dgates: Vec::new(),
            dlogits: Vec::new(),
            counts: Vec::new(),
            frac: vec![0.0; e],
            aux: 0.0,
        })
    }

    /// Capacity per expert for a batch (`usize::MAX` when unlimited).
    pub fn capacity(&self, batch: usize) -> usize {
        if self.cfg.capacity_factor > 0.0 {
            ((batch * self.cfg.k) as f32 / self.cfg.experts as f32 * self.cfg.capacity_factor).ceil() as usize
        } else {
            usize::MAX
        }
    }

    /// Experts of every row ranked by router logit, best first (`batch × E`). `x`: `batch × in`.
    pub fn routing(&self, x: &[f32], batch: usize) -> Result<Vec<u32>> {
        router_ranking(&self.router, x, batch, "moe input x")
    }

    /// Slots dropped by the capacity limit in the last training forward.
    pub fn dropped(&self) -> usize {
        self.bank.dropped()
    }
}

impl Layer for Moe {
    fn kind(&self) -> &'static str {
        "moe"
    }

    fn in_features(&self) -> usize {
        self.bank.shape.in_features
    }

    fn out_features(&self) -> usize {
        self.bank.shape.out_features
    }

    fn config(&self) -> LayerConfig {
        LayerConfig::Moe(self.cfg.clone())
    }
}

impl Trainable for Moe {
    fn forward_train(&mut self, input: Input<'_>, y: &mut [f32], _rng: &mut Rng) -> Result<()> {
        let (x, batch) = (input.x, input.batch);
        let (d, e, k) = (self.in_features(), self.cfg.experts, self.cfg.k);
        check_matrix("moe input x", x.len(), batch, d)?;
        check_matrix("moe output y", y.len(), batch, self.out_features())?;
        ensure_len(&mut self.logits, batch * e);
        ensure_len(&mut self.probs, batch * e);
        ensure_len(&mut self.lse, batch);
        ensure_len(&mut self.gates, batch * k);
        if self.topk.len() < batch * k {
            self.topk.resize(batch * k, 0);
        }
        let logits = &mut self.logits[..batch * e];
        router_logits(&self.router, x, batch, logits);
        for b in 0..batch {
            let r = b * e..(b + 1) * e;
            let s = b * k..(b + 1) * k;
            self.lse[b] = route_softmax(&logits[r.clone()], k, self.cfg.renormalize, &mut self.probs[r], &mut self.topk[s.clone()], &mut self.gates[s]);
        }
        // f_i over the routed slots, before any capacity drop
        self.frac.fill(0.0);
        for &i in &self.topk[..batch * k] {
            self.frac[i as usize] += 1.0 / (batch * k) as f32;
        }
        let mut aux = 0.0;
        if self.cfg.balance > 0.0 {
            for i in 0..e {
                let p_i: f32 = (0..batch).map(|b| self.probs[b * e + i]).sum::<f32>() / batch as f32;
                aux += self.cfg.balance * e as f32 * self.frac[i] * p_i;
            }
        }
        if self.cfg.z_loss > 0.0 {
            aux += self.cfg.z_loss * self.lse[..batch].iter().map(|l| l * l).sum::<f32>() / batch as f32;
        }
        self.aux = aux;
        self.assign.clear();
        self.assign.extend_from_slice(&self.topk[..batch * k]);
        let cap = self.capacity(batch);
        if cap != usize::MAX {
            apply_capacity(&mut self.assign, e, cap, &mut self.counts);
        }
        self.bank.forward(x, batch, k, &self.assign, &self.gates, y)?;
        Ok(())
    }

    fn backward(&mut self, input: Input<'_>, dy: &[f32], dx: Option<&mut [f32]>) -> Result<()> {
        let (x, batch) = (input.x, input.batch);
        let (d, e, k) = (self.in_features(), self.cfg.experts, self.cfg.k);
        check_matrix("moe input x", x.len(), batch, d)?;
        check_matrix("moe output gradient dy", dy.len(), batch, self.out_features())?;
        if let Some(dx) = dx.as_deref() {
            check_matrix("moe input gradient dx", dx.len(), batch, d)?;
        }
        ensure_len(&mut self.dgates, batch * k);
        ensure_len(&mut self.dlogits, batch * e);
        let mut dx = dx;
        self.bank.backward(batch, dy, &mut self.dgates, dx.as_deref_mut(), false)?;
        // router: gates → probabilities → logits
        let inv_b = 1.0 / batch as f32;
        for b in 0..batch {
            let p = &self.probs[b * e..(b + 1) * e];
            let dl = &mut self.dlogits[b * e..(b + 1) * e];
            // dl holds dL/dp first
            for (i, v) in dl.iter_mut().enumerate() {
                *v = if self.cfg.balance > 0.0 { self.cfg.balance * e as f32 * self.frac[i] * inv_b } else { 0.0 };
            }
            let (idx, g, dg) = (&self.topk[b * k..(b + 1) * k], &self.gates[b * k..(b + 1) * k], &self.dgates[b * k..(b + 1) * k]);
            if self.cfg.renormalize {
                let s: f32 = idx.iter().map(|&i| p[i as usize]).sum();
                let gdg: f32 = g.iter().zip(dg).map(|(a, b)| a * b).sum();
                for (&i, &dgj) in idx.iter().zip(dg) {
                    dl[i as usize] += (dgj - gdg) / s;
                }
            } else {
                for (&i, &dgj) in idx.iter().zip(dg) {
                    dl[i as usize] += dgj;
                }
            }
            let pdp: f32 = p.iter().zip(dl.iter()).map(|(a, b)| a * b).sum();
            let z = self.cfg.z_loss * 2.0 * self.lse[b] * inv_b;
            for (v, &pi) in dl.iter_mut().zip(p) {
                *v = pi * (*v - pdp) + z * pi;
            }
        }
        router_backward(&mut self.router, x, batch, &self.dlogits, dx);
        Ok(())
    }

    fn aux_loss(&self) -> f32 {
        self.aux
    }

    fn params(&self) -> Vec<&Param> {
        let mut v = vec![&self.router];
        v.extend(self.bank.params());
        v
    }

    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        f(&mut self.router);
        self.bank.visit_params_mut(f);
    }

    fn expert_load(&self) -> Option<&[f32]> {
        Some(self.bank.load())
    }
}

impl Moe {
    fn mixture_kernel(&self) -> MoeKernel {
        let router = Router::Softmax { weight: self.router.value.clone(), renormalize: self.cfg.renormalize };
        MoeKernel::new("moe", router, self.cfg.k, &self.bank.weights(), &self.bank.b2.value)
    }
}

impl Compile for Moe {
    fn kernel(&self) -> Box<dyn InferKernel> {
        Box::new(self.mixture_kernel())
    }

    fn stored_kernel(&self, precision: Precision) -> Option<Result<Box<dyn InferKernel>>> {
        Some(self.mixture_kernel().with_precision(precision).map(|k| Box::new(k) as Box<dyn InferKernel>))
    }

    fn neurons_per_inference(&self) -> usize {
        self.cfg.k * self.cfg.expert_width
    }
}
