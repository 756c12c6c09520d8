//! σ-MoE (Csordás, Irie & Schmidhuber 2023, "Approximating Two-Layer Feedforward Networks for
//! Efficient Transformers"): sigmoid gates `s = σ(W₃ x)`, the top-k experts by `s`, and
//! `y = b2 + Σ_{e ∈ top} s_e · W2ᵉ act(W1ᵉ x + b1ᵉ)`.
//!
//! Training extras, as in the paper: expert dropout (each expert's score is masked before the
//! top-k with probability δ; the gates of the chosen experts are unchanged) and the entropy
//! regulariser `γ · Σ_e p̄_e log p̄_e` with `p̄` the batch mean of `softmax(W₃ x)` (minimising it
//! maximises the entropy of the mean selection; it equals `−γ log E` at uniform routing).
//! Initialisation: `W1 ~ N(0, 1/in)`, `W2 ~ N(0, 1/(E·G))`, router rows rescaled to equal norm.
//!
//! Parameters: `router.weight` (`E × in`), then `w1`, `b1`, `w2`, `b2` (biases start at zero;
//! the paper has none).

use serde::{Deserialize, Serialize};

use super::experts::{router_backward, router_logits, router_ranking, ExpertBank};
use super::moe::check_mixture;
use super::{ensure_len, Compile, Input, Layer, LayerConfig, Trainable};
use crate::core::{Activation, Param, Rng};
use crate::error::{check_matrix, Error, Result};
use crate::kernels::grouped::{ExpertShape, DROPPED};
use crate::kernels::moe::{route_sigmoid, softmax, Router};
use crate::kernels::{InferKernel, MoeKernel, Precision};

/// Configuration of [`Smoe`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmoeConfig {
    /// Number of experts `E`.
    pub experts: usize,
    /// Hidden units per expert `G`.
    pub expert_width: usize,
    /// Experts per token `K`.
    pub k: usize,
    /// Entropy regularisation γ.
    pub entropy: f32,
    /// Expert dropout δ (training only).
    pub expert_dropout: f32,
    /// Expert nonlinearity.
    pub activation: Activation,
}

impl Default for SmoeConfig {
    fn default() -> Self {
        // 16 × 8 = the w = 128 budget; γ = 1e-3 is the paper's; δ = 0 because the paper's 0.05
        // is tuned for language models (set it with --expert-dropout).
        SmoeConfig { experts: 16, expert_width: 8, k: 2, entropy: 1e-3, expert_dropout: 0.0, activation: Activation::Relu }
    }
}

/// A σ-MoE layer.
#[derive(Clone, Debug)]
pub struct Smoe {
    cfg: SmoeConfig,
    /// `E × in`.
    pub router: Param,
    /// The experts.
    pub bank: ExpertBank,
    logits: Vec<f32>,
    /// Row softmax of the logits (for the entropy regulariser).
    probs: Vec<f32>,
    /// Batch mean of `probs`.
    mean_p: Vec<f32>,
    assign: Vec<u32>,
    gates: Vec<f32>,
    dgates: Vec<f32>,
    dlogits: Vec<f32>,
    mask: Vec<bool>,
    aux: f32,
}

impl Smoe {
    /// A new σ-MoE `in_features → out_features`.
    pub fn new(cfg: SmoeConfig, in_features: usize, out_features: usize, rng: &mut Rng) -> Result<Self> {
        check_mixture(cfg.experts, cfg.expert_width, cfg.k, "smoe")?;
        if !(0.0..1.0).contains(&cfg.expert_dropout) {
            return Err(Error::Config(format!("smoe.expert_dropout must be in [0, 1), got {}", cfg.expert_dropout)));
        }
        let (e, g) = (cfg.experts, cfg.expert_width);
        let shape = ExpertShape { experts: e, in_features, width: g, out_features };
        let mut router = Param::zeros("router.weight", &[e, in_features], true);
        for v in &mut router.value {
            *v = rng.normal() / (in_features as f32).sqrt();
        }
        // paper: router rows renormalised to the same norm, so no expert starts favoured
        let norms: Vec<f32> = router.value.chunks(in_features).map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt()).collect();
        let mean = norms.iter().sum::<f32>() / e as f32;
        for (row, n) in router.value.chunks_mut(in_features).zip(&norms) {
            for v in row {
                *v *= mean / n.max(1e-12);
            }
        }
        let bank = ExpertBank::new(shape, cfg.activation, 1.0 / (in_features as f32).sqrt(), 1.0 / ((e * g) as f32).sqrt(), rng);
        Ok(Smoe {
            cfg,
            router,
            bank,
            logits: Vec::new(),
            probs: Vec::new(),
            mean_p: vec![0.0; e],
            assign: Vec::new(),
            gates: Vec::new(),
            dgates: Vec::new(),
            dlogits: Vec::new(),
            mask: vec![false; e],
            aux: 0.0,
        })
    }

    /// Experts of every row ranked by router logit, best first (`batch × E`). `x`: `batch × in`.
    pub fn routing(&self, x: &[f32], batch: usize) -> Result<Vec<u32>> {
        router_ranking(&self.router, x, batch, "smoe input x")
    }

    /// The entropy regulariser `γ Σ p̄ log p̄` of a batch-mean distribution.
    pub fn entropy_loss(gamma: f32, mean_p: &[f32]) -> f32 {
        gamma * mean_p.iter().map(|&p| if p > 0.0 { p * p.ln() } else { 0.0 }).sum::<f32>()
    }
}

impl Layer for Smoe {
    fn kind(&self) -> &'static str {
        "smoe"
    }

    fn in_features(&self) -> usize {
        self.bank.shape.in_features
    }

    fn out_features(&self) -> usize {
        self.bank.shape.out_features
    }

    fn config(&self) -> LayerConfig {
        LayerConfig::Smoe(self.cfg.clone())
    }
}

impl Trainable for Smoe {
    fn forward_train(&mut self, input: Input<'_>, y: &mut [f32], rng: &mut Rng) -> Result<()> {
        let (x, batch) = (input.x, input.batch);
        let (d, e, k) = (self.in_features(), self.cfg.experts, self.cfg.k);
        check_matrix("smoe input x", x.len(), batch, d)?;
        check_matrix("smoe output y", y.len(), batch, self.out_features())?;
        ensure_len(&mut self.logits, batch * e);
        ensure_len(&mut self.probs, batch * e);
        ensure_len(&mut self.gates, batch * k);
        if self.assign.len() < batch * k {
            self.assign.resize(batch * k, 0);
        }
        let logits = &mut self.logits[..batch * e];
        router_logits(&self.router, x, batch, logits);
        let delta = self.cfg.expert_dropout;
        self.mean_p.fill(0.0);
        for b in 0..batch {
            let row = &logits[b * e..(b + 1) * e];
            for m in self.mask.iter_mut() {
                *m = delta > 0.0 && rng.uniform() < delta;
            }
            let mask = &self.mask;
            route_sigmoid(row, k, &mut self.assign[b * k..(b + 1) * k], &mut self.gates[b * k..(b + 1) * k], |i| mask[i]);
            let p = &mut self.probs[b * e..(b + 1) * e];
            softmax(row, p);
            for (&pi, mp) in p.iter().zip(self.mean_p.iter_mut()) {
                *mp += pi / batch as f32;
            }
        }
        self.aux = if self.cfg.entropy > 0.0 { Self::entropy_loss(self.cfg.entropy, &self.mean_p) } else { 0.0 };
        self.bank.forward(x, batch, k, &self.assign[..batch * k], &self.gates[..batch * k], y)?;
        Ok(())
    }

    fn backward(&mut self, input: Input<'_>, dy: &[f32], dx: Option<&mut [f32]>) -> Result<()> {
        let (x, batch) = (input.x, input.batch);
        let (d, e, k) = (self.in_features(), self.cfg.experts, self.cfg.k);
        check_matrix("smoe input x", x.len(), batch, d)?;
        check_matrix("smoe output gradient dy", dy.len(), batch, self.out_features())?;
        if let Some(dx) = dx.as_deref() {
            check_matrix("smoe input gradient dx", dx.len(), batch, d)?;
        }
        ensure_len(&mut self.dgates, batch * k);
        ensure_len(&mut self.dlogits, batch * e);
        let mut dx = dx;
        self.bank.backward(batch, dy, &mut self.dgates, dx.as_deref_mut(), false)?;
        let gamma = self.cfg.entropy;
        let inv_b = 1.0 / batch as f32;
        for b in 0..batch {
            let dl = &mut self.dlogits[b * e..(b + 1) * e];
            // entropy term: dL/dp_{b,i} = γ (log p̄_i + 1) / B, through the row softmax
            if gamma > 0.0 {
                let p = &self.probs[b * e..(b + 1) * e];
                let mut pdp = 0.0;
                for ((v, &pi), &mp) in dl.iter_mut().zip(p).zip(&self.mean_p) {
                    *v = gamma * (mp.max(1e-30).ln() + 1.0) * inv_b;
                    pdp += pi * *v;
                }
                for (v, &pi) in dl.iter_mut().zip(p) {
                    *v = pi * (*v - pdp);
                }
            } else {
                dl.fill(0.0);
            }
            // gates: s = σ(h), ds/dh = s (1 − s)
            for j in 0..k {
                let i = self.assign[b * k + j];
                if i != DROPPED {
                    let s = self.gates[b * k + j];
                    dl[i as usize] += self.dgates[b * k + j] * s * (1.0 - s);
                }
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

impl Smoe {
    fn mixture_kernel(&self) -> MoeKernel {
        let router = Router::Sigmoid { weight: self.router.value.clone() };
        MoeKernel::new("smoe", router, self.cfg.k, &self.bank.weights(), &self.bank.b2.value)
    }
}

impl Compile for Smoe {
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
