//! A MoEfied FFN (Zhang et al. 2022, "MoEfication: Transformer Feed-forward Layers are
//! Mixtures of Experts"): the hidden neurons of a trained ReLU FFN split into `E` experts of
//! `G` neurons, a router that predicts which experts fire, and `y = b2 + Σ_{e ∈ top-K} E_e(x)`
//! (an unweighted sum: each expert is a slice of the dense layer, so with every expert
//! selected the layer *is* the dense one).
//!
//! Routers: `mlp` (the paper's: `tanh(R1 x + c1)` then `R2 · + c2`, trained by
//! `ffwd convert moefy` with binary cross-entropy against each expert's activation mass) or
//! `centroid` (scores `R1 x`, R1 the experts' mean normalised input weights; nothing trained).
//! The router is fixed: training this layer (fine-tuning) updates the experts only.
//!
//! Parameters: `router.w1` (`E × in`), and for `mlp` `router.b1` (`E`), `router.w2` (`E × E`),
//! `router.b2` (`E`); then the expert bank `w1` (`E × in × G`), `b1`, `w2` (`E × G × out`), `b2`.

use serde::{Deserialize, Serialize};

use super::experts::ExpertBank;
use super::moe::check_mixture;
use super::{ensure_len, Compile, Input, Layer, LayerConfig, Trainable};
use crate::core::gemm::matmul_bt;
use crate::core::{Activation, Param, Rng};
use crate::error::{check_matrix, Result};
use crate::kernels::grouped::{top_k, ExpertShape};
use crate::kernels::moe::Router;
use crate::kernels::{InferKernel, MoeKernel, Precision};

/// How a MoEfied layer picks its experts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MoefiedRouter {
    /// `R2 tanh(R1 x + c1) + c2`, trained on the dense layer's activations.
    #[default]
    Mlp,
    /// `R1 x` with R1 the expert centroids.
    Centroid,
}

/// Configuration of [`Moefied`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MoefiedConfig {
    /// Experts `E`.
    pub experts: usize,
    /// Neurons per expert `G`.
    pub expert_width: usize,
    /// Experts run per input.
    pub k: usize,
    /// The router.
    pub router: MoefiedRouter,
    /// Hidden nonlinearity (ReLU: the split is exact only for a layer whose neurons are off
    /// when negative).
    pub activation: Activation,
}

impl Default for MoefiedConfig {
    fn default() -> Self {
        MoefiedConfig { experts: 32, expert_width: 32, k: 8, router: MoefiedRouter::Mlp, activation: Activation::Relu }
    }
}

impl MoefiedConfig {
    /// Scalars of the parameters for `in_features → out_features` (`None` on overflow).
    pub fn param_count(&self, i: usize, o: usize) -> Option<usize> {
        let (e, g) = (self.experts, self.expert_width);
        let router = match self.router {
            MoefiedRouter::Mlp => e.checked_mul(i.checked_add(e)?.checked_add(2)?)?,
            MoefiedRouter::Centroid => e.checked_mul(i)?,
        };
        let bank = e.checked_mul(g)?.checked_mul(i.checked_add(o)?.checked_add(1)?)?.checked_add(o)?;
        router.checked_add(bank)
    }
}

/// A MoEfied feedforward layer.
#[derive(Clone, Debug)]
pub struct Moefied {
    cfg: MoefiedConfig,
    /// Router parameters (`w1`, and `b1`, `w2`, `b2` for the MLP router).
    pub router: Vec<Param>,
    /// The experts.
    pub bank: ExpertBank,
    hidden: Vec<f32>,
    scores: Vec<f32>,
    assign: Vec<u32>,
    gates: Vec<f32>,
    dgates: Vec<f32>,
    val: Vec<f32>,
}

impl Moefied {
    /// A layer with zero weights (`ffwd convert moefy` fills them; an identity `R2`).
    pub fn new(cfg: MoefiedConfig, in_features: usize, out_features: usize, rng: &mut Rng) -> Result<Self> {
        check_mixture(cfg.experts, cfg.expert_width, cfg.k, "moefied")?;
        let e = cfg.experts;
        let mut router = vec![Param::zeros("router.w1", &[e, in_features], false)];
        if cfg.router == MoefiedRouter::Mlp {
            let mut w2 = Param::zeros("router.w2", &[e, e], false);
            for i in 0..e {
                w2.value[i * e + i] = 1.0;
            }
            router.extend([Param::zeros("router.b1", &[e], false), w2, Param::zeros("router.b2", &[e], false)]);
        }
        let shape = ExpertShape { experts: e, in_features, width: cfg.expert_width, out_features };
        let bank = ExpertBank::new(shape, cfg.activation, 0.0, 0.0, rng);
        Ok(Moefied { cfg, router, bank, hidden: Vec::new(), scores: Vec::new(), assign: Vec::new(), gates: Vec::new(), dgates: Vec::new(), val: Vec::new() })
    }

    /// The configuration.
    pub fn moefied_config(&self) -> &MoefiedConfig {
        &self.cfg
    }

    /// Router scores of `batch` rows of `x` into `scores` (`batch × E`); `hidden` is scratch.
    pub fn router_scores(&self, x: &[f32], batch: usize, hidden: &mut Vec<f32>, scores: &mut [f32]) {
        self.router_kernel().scores(x, batch, self.in_features(), self.cfg.experts, hidden, scores);
    }

    fn router_kernel(&self) -> Router {
        match self.cfg.router {
            MoefiedRouter::Mlp => Router::Mlp {
                w1: self.router[0].value.clone(),
                b1: self.router[1].value.clone(),
                w2: self.router[2].value.clone(),
                b2: self.router[3].value.clone(),
            },
            MoefiedRouter::Centroid => Router::Linear { weight: self.router[0].value.clone() },
        }
    }

    fn mixture_kernel(&self) -> MoeKernel {
        MoeKernel::new("moefied", self.router_kernel(), self.cfg.k, &self.bank.weights(), &self.bank.b2.value)
    }
}

impl Layer for Moefied {
    fn kind(&self) -> &'static str {
        "moefied"
    }

    fn in_features(&self) -> usize {
        self.bank.shape.in_features
    }

    fn out_features(&self) -> usize {
        self.bank.shape.out_features
    }

    fn config(&self) -> LayerConfig {
        LayerConfig::Moefied(self.cfg.clone())
    }
}

impl Trainable for Moefied {
    fn forward_train(&mut self, input: Input<'_>, y: &mut [f32], _rng: &mut Rng) -> Result<()> {
        let (x, batch) = (input.x, input.batch);
        let (d, e, k) = (self.in_features(), self.cfg.experts, self.cfg.k);
        check_matrix("moefied input x", x.len(), batch, d)?;
        check_matrix("moefied output y", y.len(), batch, self.out_features())?;
        ensure_len(&mut self.scores, batch * e);
        ensure_len(&mut self.gates, batch * k);
        ensure_len(&mut self.val, k);
        if self.assign.len() < batch * k {
            self.assign.resize(batch * k, 0);
        }
        let mut scores = std::mem::take(&mut self.scores);
        let mut hidden = std::mem::take(&mut self.hidden);
        self.router_scores(x, batch, &mut hidden, &mut scores[..batch * e]);
        for b in 0..batch {
            top_k(&scores[b * e..(b + 1) * e], k, &mut self.assign[b * k..(b + 1) * k], &mut self.val[..k], |_| false);
        }
        (self.scores, self.hidden) = (scores, hidden);
        self.gates[..batch * k].fill(1.0);
        self.bank.forward(x, batch, k, &self.assign[..batch * k], &self.gates[..batch * k], y)
    }

    fn backward(&mut self, input: Input<'_>, dy: &[f32], dx: Option<&mut [f32]>) -> Result<()> {
        let (x, batch) = (input.x, input.batch);
        check_matrix("moefied input x", x.len(), batch, self.in_features())?;
        check_matrix("moefied output gradient dy", dy.len(), batch, self.out_features())?;
        if let Some(dx) = dx.as_deref() {
            check_matrix("moefied input gradient dx", dx.len(), batch, self.in_features())?;
        }
        ensure_len(&mut self.dgates, batch * self.cfg.k);
        // the router is fixed: the gates' gradient goes nowhere
        self.bank.backward(batch, dy, &mut self.dgates, dx, false)
    }

    fn expert_load(&self) -> Option<&[f32]> {
        Some(self.bank.load())
    }

    fn params(&self) -> Vec<&Param> {
        let mut v: Vec<&Param> = self.router.iter().collect();
        v.extend(self.bank.params());
        v
    }

    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.router.iter_mut().for_each(&mut *f);
        self.bank.visit_params_mut(f);
    }
}

impl Compile for Moefied {
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

/// Scores of the MLP router (shared by the layer and the inference kernel); `hidden` grows.
#[allow(clippy::too_many_arguments)]
pub(crate) fn mlp_scores(w1: &[f32], b1: &[f32], w2: &[f32], b2: &[f32], x: &[f32], batch: usize, d: usize, e: usize, hidden: &mut Vec<f32>, out: &mut [f32]) {
    ensure_len(hidden, batch * e);
    mlp_scores_into(w1, b1, w2, b2, x, batch, d, e, &mut hidden[..batch * e], out);
}

/// [`mlp_scores`] with `hidden` (`batch × e`) given.
#[allow(clippy::too_many_arguments)]
pub(crate) fn mlp_scores_into(w1: &[f32], b1: &[f32], w2: &[f32], b2: &[f32], x: &[f32], batch: usize, d: usize, e: usize, h: &mut [f32], out: &mut [f32]) {
    matmul_bt(h, x, batch, d, w1, e);
    for row in h.chunks_exact_mut(e) {
        for (v, &b) in row.iter_mut().zip(b1) {
            *v = (*v + b).tanh();
        }
    }
    matmul_bt(out, h, batch, e, w2, e);
    for row in out.chunks_exact_mut(e) {
        for (v, &b) in row.iter_mut().zip(b2) {
            *v += b;
        }
    }
}
