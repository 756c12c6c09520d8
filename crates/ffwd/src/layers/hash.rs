//! Hash layer (Roller et al. 2021, "Hash Layers For Large Sparse Models"): each token goes to
//! one expert chosen by a fixed hash of its **input token id** — no router parameters, no
//! balance loss, gate 1. Two variants: a seeded random hash (ParlAI's random vocabulary →
//! bucket map, here the SplitMix64 hash of `seed ⊕ id`) and the balanced hash, which assigns
//! tokens greedily by training-set frequency (most frequent token to the currently lightest
//! bucket; [`balanced_table`]).
//!
//! The layer needs token ids: pass them with the training input ([`super::Input::with_ids`]), and
//! [`crate::kernels::InferKernel::forward_tokens`] at inference. The language model does.
//!
//! Parameters: the expert bank `w1`, `b1`, `w2`, `b2`.

use serde::{Deserialize, Serialize};

use super::experts::ExpertBank;
use super::moe::check_mixture;
use super::{Compile, Input, Layer, LayerConfig, Trainable};
use crate::core::{Activation, Param, Rng};
use crate::error::{check_dim, check_matrix, Error, Result};
use crate::kernels::grouped::ExpertShape;
use crate::kernels::moe::{HashTable, Router};
use crate::kernels::{InferKernel, MoeKernel};

/// Configuration of [`Hash`](struct@Hash).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HashConfig {
    /// Number of experts (ParlAI uses 32 buckets).
    pub experts: usize,
    /// Hidden units per expert.
    pub expert_width: usize,
    /// Seed of the random hash.
    pub seed: u64,
    /// Explicit id → expert map (the balanced variant, from [`balanced_table`]); ids outside
    /// it use the random hash.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub table: Vec<u32>,
    /// Expert nonlinearity.
    pub activation: Activation,
}

impl Default for HashConfig {
    fn default() -> Self {
        HashConfig { experts: 16, expert_width: 8, seed: 0, table: Vec::new(), activation: Activation::Relu }
    }
}

/// The balanced hash: token ids sorted by descending frequency (ties: lower id first), each
/// assigned to the bucket with the least total frequency so far (ties: lower bucket).
/// `freqs[id]` is the training-set count of token `id`. Returns the id → expert table.
pub fn balanced_table(freqs: &[u64], experts: usize) -> Vec<u32> {
    let mut ids: Vec<usize> = (0..freqs.len()).collect();
    ids.sort_by(|&a, &b| freqs[b].cmp(&freqs[a]).then(a.cmp(&b)));
    let mut load = vec![0u64; experts.max(1)];
    let mut table = vec![0u32; freqs.len()];
    for id in ids {
        let (e, _) = load.iter().enumerate().min_by_key(|&(i, &l)| (l, i)).unwrap_or((0, &0));
        load[e] += freqs[id].max(1);
        table[id] = e as u32;
    }
    table
}

/// A hash-routed mixture of two-layer experts.
#[derive(Clone, Debug)]
pub struct Hash {
    cfg: HashConfig,
    routing: HashTable,
    /// The experts.
    pub bank: ExpertBank,
    assign: Vec<u32>,
    gates: Vec<f32>,
    dgates: Vec<f32>,
}

impl Hash {
    /// A new hash layer `in_features → out_features`.
    pub fn new(cfg: HashConfig, in_features: usize, out_features: usize, rng: &mut Rng) -> Result<Self> {
        check_mixture(cfg.experts, cfg.expert_width, 1, "hash")?;
        if let Some(&bad) = cfg.table.iter().find(|&&e| e as usize >= cfg.experts) {
            return Err(Error::Config(format!("hash.table maps a token to expert {bad}, but there are {} experts", cfg.experts)));
        }
        let shape = ExpertShape { experts: cfg.experts, in_features, width: cfg.expert_width, out_features };
        let bank = ExpertBank::new(shape, cfg.activation, 1.0 / (3.0 * in_features as f32).sqrt(), 1.0 / (3.0 * cfg.expert_width as f32).sqrt(), rng);
        let routing = HashTable { seed: cfg.seed, table: cfg.table.clone() };
        Ok(Hash { cfg, routing, bank, assign: Vec::new(), gates: Vec::new(), dgates: Vec::new() })
    }

    /// Expert of token `id`.
    pub fn expert_of(&self, id: u32) -> u32 {
        self.routing.expert(id, self.cfg.experts)
    }
}

impl Layer for Hash {
    fn kind(&self) -> &'static str {
        "hash"
    }

    fn in_features(&self) -> usize {
        self.bank.shape.in_features
    }

    fn out_features(&self) -> usize {
        self.bank.shape.out_features
    }

    fn config(&self) -> LayerConfig {
        LayerConfig::Hash(self.cfg.clone())
    }
}

impl Trainable for Hash {
    fn forward_train(&mut self, input: Input<'_>, y: &mut [f32], _rng: &mut Rng) -> Result<()> {
        let (x, batch) = (input.x, input.batch);
        check_matrix("hash input x", x.len(), batch, self.in_features())?;
        check_matrix("hash output y", y.len(), batch, self.out_features())?;
        let Some(ids) = input.ids else {
            return Err(Error::Invalid("hash layer: routes by token ids, but the input has none (Input::with_ids)".into()));
        };
        check_dim("hash layer token ids", "batch", batch, ids.len())?;
        self.assign.clear();
        let e = self.cfg.experts;
        let routing = &self.routing;
        self.assign.extend(ids.iter().map(|&id| routing.expert(id, e)));
        self.gates.clear();
        self.gates.resize(batch, 1.0);
        self.bank.forward(x, batch, 1, &self.assign, &self.gates, y)?;
        Ok(())
    }

    fn backward(&mut self, input: Input<'_>, dy: &[f32], dx: Option<&mut [f32]>) -> Result<()> {
        let (x, batch) = (input.x, input.batch);
        check_matrix("hash input x", x.len(), batch, self.in_features())?;
        check_matrix("hash output gradient dy", dy.len(), batch, self.out_features())?;
        if let Some(dx) = dx.as_deref() {
            check_matrix("hash input gradient dx", dx.len(), batch, self.in_features())?;
        }
        self.dgates.resize(batch, 0.0);
        self.bank.backward(batch, dy, &mut self.dgates, dx, false)?;
        Ok(())
    }

    fn params(&self) -> Vec<&Param> {
        self.bank.params().to_vec()
    }

    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.bank.visit_params_mut(f);
    }

    fn expert_load(&self) -> Option<&[f32]> {
        Some(self.bank.load())
    }
}

impl Compile for Hash {
    fn kernel(&self) -> Box<dyn InferKernel> {
        Box::new(MoeKernel::new("hash", Router::Hash(self.routing.clone()), 1, &self.bank.weights(), &self.bank.b2.value))
    }

    fn neurons_per_inference(&self) -> usize {
        self.cfg.expert_width
    }
}
