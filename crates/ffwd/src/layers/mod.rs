//! Feedforward layers. One file, one struct each, all behind the [`Layer`] trait and its two
//! roles: [`Trainable`] (explicit training forward and backward over the parameters) and
//! [`Compile`] (an immutable inference kernel built from the weights).
//!
//! Shapes are row-major: `x` is `batch × in_features`, `y` is `batch × out_features`.

pub mod attention;
pub mod batch_norm;
pub mod channel_idle;
pub mod dense;
pub mod deq;
pub mod experts;
pub mod fff;
pub mod glu;
pub mod guided;
pub mod hash;
pub mod layer_norm;
pub mod linear;
pub mod lowrank;
pub mod moe;
pub mod moefied;
pub mod pkm;
pub mod smoe;
pub mod structured;
pub mod ufff;

use serde::{Deserialize, Serialize};

use crate::core::{Param, Rng};
use crate::error::{Error, Result};
use crate::kernels::{InferKernel, Precision, Workspace};

pub use channel_idle::{ChannelIdle, ChannelIdleConfig};
pub use dense::{Dense, DenseConfig};
pub use deq::{Deq, DeqConfig};
pub use fff::{Fff, FffConfig};
pub use glu::{Glu, GluConfig};
pub use hash::{Hash, HashConfig};
pub use linear::Linear;
pub use lowrank::{LowRank, LowRankConfig};
pub use moe::{Moe, MoeConfig};
pub use moefied::{Moefied, MoefiedConfig, MoefiedRouter};
pub use pkm::{Pkm, PkmConfig};
pub use smoe::{Smoe, SmoeConfig};
pub use structured::{BlockKind, Structured, StructuredConfig};
pub use ufff::{Ufff, UfffConfig};

/// The input of a training pass: `x` (`batch × in_features`, row-major) and, for layers that
/// route by token (hash layers), the token id of every row.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    /// Features, `batch × in_features`.
    pub x: &'a [f32],
    /// Rows.
    pub batch: usize,
    /// Token id of every row (`batch`), for layers that route by token; `None` elsewhere.
    pub ids: Option<&'a [u32]>,
}

impl<'a> Input<'a> {
    /// Features without token ids.
    pub fn new(x: &'a [f32], batch: usize) -> Self {
        Input { x, batch, ids: None }
    }

    /// The same rows with their token ids.
    pub fn with_ids(self, ids: &'a [u32]) -> Self {
        Input { ids: Some(ids), ..self }
    }
}

/// A feedforward layer: its shape and configuration, what training needs ([`Trainable`]) and
/// what inference needs ([`Compile`]: an immutable kernel built from the weights).
///
/// ```
/// use ffwd::prelude::*;
/// use ffwd::layers::{FffConfig, HashConfig};
///
/// let mut rng = Rng::new(0);
/// let mut fff = LayerConfig::Fff(FffConfig { depth: 2, leaf: 4, ..Default::default() }).build(6, 3, &mut rng)?;
/// let (x, batch) = (vec![0.1f32; 5 * 6], 5);
/// let mut y = vec![0.0; batch * 3];
/// fff.forward_train(Input::new(&x, batch), &mut y, &mut rng)?;      // soft routing, cached
/// fff.backward(Input::new(&x, batch), &vec![1.0; batch * 3], None)?; // adds into the gradients
/// let kernel = fff.kernel();                                          // hard routing, immutable
/// kernel.forward(&x, batch, &mut y, &mut Workspace::new())?;
///
/// // a hash layer routes by token id: the ids travel with the input
/// let mut hash = LayerConfig::Hash(HashConfig { experts: 4, expert_width: 2, ..Default::default() }).build(6, 3, &mut rng)?;
/// hash.forward_train(Input::new(&x, batch).with_ids(&[3, 1, 4, 1, 5]), &mut y, &mut rng)?;
/// assert!(hash.forward_train(Input::new(&x, batch), &mut y, &mut rng).is_err());
/// # Ok::<(), ffwd::Error>(())
/// ```
pub trait Layer: Trainable + Compile {
    /// Short kind name (`dense`, `fff`, `ufff`, …).
    fn kind(&self) -> &'static str;
    /// Width of the input.
    fn in_features(&self) -> usize;
    /// Width of the output.
    fn out_features(&self) -> usize;
    /// The configuration that rebuilds this layer (with the same in/out widths).
    fn config(&self) -> LayerConfig;
}

/// The training side of a layer: hand-written forward and backward passes over its
/// parameters.
///
/// Buffers for the training pass live inside the layer and grow only when the batch grows,
/// so a training step at a fixed batch size allocates nothing.
pub trait Trainable: Send + Sync {
    /// Training-mode forward (soft routing for FFF trees): `input.x` (`batch × in`) →
    /// `y` (`batch × out`). Caches what [`Trainable::backward`] needs; `rng` drives
    /// stochastic parts (region leak, dropout).
    fn forward_train(&mut self, input: Input<'_>, y: &mut [f32], rng: &mut Rng) -> Result<()>;
    /// Backward of the last `forward_train` on the same input. `dy`: `batch × out` is dL/dy.
    /// *Adds* this batch's gradient (including that of [`Trainable::aux_loss`]) into every
    /// parameter's `grad`, so that several micro-batches accumulate; call
    /// [`Trainable::zero_grad`] before the first backward of a step. When given, writes (not
    /// adds) dL/dx into `dx`: `batch × in`.
    fn backward(&mut self, input: Input<'_>, dy: &[f32], dx: Option<&mut [f32]>) -> Result<()>;
    /// Zeroes every parameter gradient (only the touched rows of sparse ones).
    fn zero_grad(&mut self) {
        self.visit_params_mut(&mut |p| p.zero_grad());
    }
    /// Auxiliary loss of the last `forward_train` (hardening, load balancing), already weighted.
    fn aux_loss(&self) -> f32 {
        0.0
    }
    /// Share of the routed slots each expert received in the last `forward_train`
    /// (mixture layers only).
    fn expert_load(&self) -> Option<&[f32]> {
        None
    }
    /// Mean Bernoulli entropy (nats) of the soft tree decisions of the last `forward_train`
    /// (FFF trees only): how far training is from hard routing.
    fn decision_entropy(&self) -> Option<f32> {
        None
    }
    /// Iterations and residuals of the last forward and adjoint fixed-point solves
    /// (deep-equilibrium layers only).
    fn fixed_point_stats(&self) -> Option<deq::FixedPointStats> {
        None
    }
    /// Where training stands (`step` of `total`), told before every step's forward. Layers that
    /// follow a schedule read it (self-guided structured FFNs set α, and drop their dense guides
    /// when it reaches 0); returns the names of the parameters it dropped, whose optimizer state
    /// the trainer then drops too.
    fn set_progress(&mut self, _step: usize, _total: usize) -> Vec<String> {
        Vec::new()
    }
    /// Drops the dense guides of self-guided training now (a checkpoint saved after the guided
    /// phase holds none); returns the dropped parameters' names.
    fn drop_guides(&mut self) -> Vec<String> {
        Vec::new()
    }
    /// The parameters in a fixed order; names are their safetensors keys within the layer.
    fn params(&self) -> Vec<&Param>;
    /// Visits the parameters mutably in the same order as [`Trainable::params`] (no allocation).
    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param));
}

/// The inference side of a layer: an immutable kernel built from the current weights.
pub trait Compile {
    /// The inference kernel of this layer (a copy of the weights in the layout it reads
    /// fastest); build once, call many times with a reused [`Workspace`].
    fn kernel(&self) -> Box<dyn InferKernel>;
    /// [`Compile::kernel`] with its weights stored in `precision`. Layers without a kernel in
    /// that precision return an error: bf16 and Q8_0/Q4_0 are implemented for `dense`,
    /// `ufff`, the leaves of `fff` and the experts of `moe`, `smoe` and `moefied` (each
    /// through [`Compile::stored_kernel`]).
    fn kernel_with(&self, precision: Precision) -> Result<Box<dyn InferKernel>> {
        if precision == Precision::F32 {
            return Ok(self.kernel());
        }
        self.stored_kernel(precision).unwrap_or_else(|| {
            Err(Error::Invalid(format!(
                "{} weights are implemented for dense, ufff, fff, moe, smoe and moefied layers, not {}",
                precision.name(),
                self.kernel().kind()
            )))
        })
    }
    /// The kernel with its weight matrices stored in `precision` (bf16 or Q8_0/Q4_0 blocks);
    /// `None` for layers without such a kernel (the default).
    fn stored_kernel(&self, precision: Precision) -> Option<Result<Box<dyn InferKernel>>> {
        let _ = precision;
        None
    }
    /// Inference (hard routing for trees): `x`: `batch × in` → `y`: `batch × out`.
    /// Convenience: builds the kernel and a workspace on every call.
    fn infer(&self, x: &[f32], batch: usize, y: &mut [f32]) -> Result<()> {
        self.kernel().forward(x, batch, y, &mut Workspace::new())
    }
    /// Hidden neurons one sample evaluates at inference.
    fn neurons_per_inference(&self) -> usize;
}

/// Configuration of any layer kind, as stored in checkpoint metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum LayerConfig {
    /// Linear → activation → … → Linear.
    Dense(DenseConfig),
    /// Deep-equilibrium FFN (Bai et al. 2019): the fixed point of a weight-tied block.
    Deq(DeqConfig),
    /// Fast feedforward network (Belcak & Wattenhofer 2023).
    Fff(FffConfig),
    /// Gated FFN: SwiGLU, GEGLU, ReGLU (Shazeer 2020).
    Glu(GluConfig),
    /// Low-rank FFN: each matrix as U·V (SVD init).
    #[serde(rename = "lowrank")]
    LowRank(LowRankConfig),
    /// BlockDense FFN (Wei et al. 2024): block-diagonal then low-rank maps.
    #[serde(rename = "blockdense")]
    BlockDense(StructuredConfig),
    /// BlockShuffle FFN (Wei et al. 2024, Monarch-style): block-diagonal, shuffle, block-diagonal.
    #[serde(rename = "blockshuffle")]
    BlockShuffle(StructuredConfig),
    /// Channel-idle FFN (RePaViT): batch norms, the last θ of the hidden channels linear.
    #[serde(rename = "channelidle")]
    ChannelIdle(ChannelIdleConfig),
    /// UltraFastBERT tree of single neurons.
    Ufff(UfffConfig),
    /// Top-k softmax mixture of experts (Switch, Mixtral-style).
    Moe(MoeConfig),
    /// σ-MoE (Csordás et al. 2023).
    Smoe(SmoeConfig),
    /// A dense ReLU FFN split into experts with a predicting router (MoEfication, Zhang et
    /// al. 2022); made by `ffwd convert moefy`.
    Moefied(MoefiedConfig),
    /// Hash-routed experts (Roller et al. 2021); needs token ids.
    Hash(HashConfig),
    /// Product-key memory (Lample et al. 2019).
    Pkm(PkmConfig),
}

impl LayerConfig {
    /// Builds a freshly initialised layer `in_features → out_features`.
    pub fn build(&self, in_features: usize, out_features: usize, rng: &mut Rng) -> Result<Box<dyn Layer>> {
        if in_features == 0 || out_features == 0 {
            return Err(Error::Config(format!("layer needs positive widths, got in_features {in_features}, out_features {out_features}")));
        }
        check_size(self.kind(), self.param_count(in_features, out_features))?;
        Ok(match self {
            LayerConfig::Dense(c) => Box::new(Dense::new(c.clone(), in_features, out_features, rng)?),
            LayerConfig::Deq(c) => Box::new(Deq::new(c.clone(), in_features, out_features, rng)?),
            LayerConfig::Fff(c) => Box::new(Fff::new(c.clone(), in_features, out_features, rng)?),
            LayerConfig::Glu(c) => Box::new(Glu::new(c.clone(), in_features, out_features, rng)?),
            LayerConfig::LowRank(c) => Box::new(LowRank::new(c.clone(), in_features, out_features, rng)?),
            LayerConfig::BlockDense(c) => Box::new(Structured::new(BlockKind::BlockDense, c.clone(), in_features, out_features, rng)?),
            LayerConfig::BlockShuffle(c) => Box::new(Structured::new(BlockKind::BlockShuffle, c.clone(), in_features, out_features, rng)?),
            LayerConfig::ChannelIdle(c) => Box::new(ChannelIdle::new(c.clone(), in_features, out_features, rng)?),
            LayerConfig::Ufff(c) => Box::new(Ufff::new(c.clone(), in_features, out_features, rng)?),
            LayerConfig::Moe(c) => Box::new(Moe::new(c.clone(), in_features, out_features, rng)?),
            LayerConfig::Smoe(c) => Box::new(Smoe::new(c.clone(), in_features, out_features, rng)?),
            LayerConfig::Moefied(c) => Box::new(Moefied::new(c.clone(), in_features, out_features, rng)?),
            LayerConfig::Hash(c) => Box::new(Hash::new(c.clone(), in_features, out_features, rng)?),
            LayerConfig::Pkm(c) => Box::new(Pkm::new(c.clone(), in_features, out_features, rng)?),
        })
    }

    /// Scalars of the parameters of a layer `in_features → out_features` with this
    /// configuration, computed without building it (`None` when the count overflows). Loaders
    /// compare it with the tensors a file holds before allocating anything.
    pub fn param_count(&self, in_features: usize, out_features: usize) -> Option<usize> {
        let (i, o) = (in_features, out_features);
        // a·b + c·d + … with overflow checks
        let sum = |terms: &[(usize, usize)]| terms.iter().try_fold(0usize, |acc, &(a, b)| acc.checked_add(a.checked_mul(b)?));
        let bank = |e: usize, g: usize| sum(&[(e, i.checked_mul(g)?), (e, g), (e, g.checked_mul(o)?), (o, 1)]);
        match self {
            LayerConfig::Dense(c) => {
                // in → w, (layers − 2) × (w → w), w → out; fewer than 2 maps is refused by new
                let (w, inner) = (c.width, c.layers.saturating_sub(2));
                sum(&[(i, w), (w, 1), (inner, w.checked_mul(w)?.checked_add(w)?), (w, o), (o, 1)])
            }
            LayerConfig::Deq(c) => c.param_count(i, o),
            LayerConfig::Glu(c) => sum(&[(2 * c.width, i.checked_add(1)?), (o, c.width.checked_add(1)?)]),
            LayerConfig::LowRank(c) => {
                let (h, r1, r2) = (c.width, c.rank_of(c.width, i), c.rank_of(o, c.width));
                sum(&[(r1, i.checked_add(h)?), (h, 1), (r2, h.checked_add(o)?), (o, 1)])
            }
            LayerConfig::BlockDense(c) => c.param_count(BlockKind::BlockDense, i, o),
            LayerConfig::BlockShuffle(c) => c.param_count(BlockKind::BlockShuffle, i, o),
            LayerConfig::ChannelIdle(c) => c.param_count(i, o),
            LayerConfig::Fff(c) => {
                let leaves = 1usize.checked_shl(u32::try_from(c.depth).ok()?)?;
                let m = c.master_leaf;
                let master = if m > 0 { sum(&[(i, m), (m, 1), (m, o), (o, 1), (i, 1), (1, 1)])? } else { 0 };
                sum(&[
                    (leaves - 1, i.checked_add(1)?),
                    (leaves, i.checked_mul(c.leaf)?),
                    (leaves, c.leaf),
                    (leaves, c.leaf.checked_mul(o)?),
                    (leaves, o),
                    (master, 1),
                ])
            }
            LayerConfig::Ufff(c) => {
                let n = (1usize.checked_shl(u32::try_from(c.depth.checked_add(1)?).ok()?)? - 1).checked_mul(c.trees)?;
                n.checked_mul(i.checked_add(1)?.checked_add(o)?)
            }
            LayerConfig::Moe(c) => sum(&[(c.experts, i), (bank(c.experts, c.expert_width)?, 1)]),
            LayerConfig::Smoe(c) => sum(&[(c.experts, i), (bank(c.experts, c.expert_width)?, 1)]),
            LayerConfig::Moefied(c) => c.param_count(i, o),
            LayerConfig::Hash(c) => bank(c.experts, c.expert_width),
            LayerConfig::Pkm(c) => {
                let hd = c.heads.checked_mul(c.key_dim)?;
                sum(&[(hd, i), (hd, 1), (c.heads, c.n_keys.checked_mul(c.key_dim)?), (c.n_keys.checked_mul(c.n_keys)?, o), (o, 1)])
            }
        }
    }

    /// Kind name.
    pub fn kind(&self) -> &'static str {
        match self {
            LayerConfig::Dense(_) => "dense",
            LayerConfig::Deq(_) => "deq",
            LayerConfig::Fff(_) => "fff",
            LayerConfig::Glu(_) => "glu",
            LayerConfig::LowRank(_) => "lowrank",
            LayerConfig::BlockDense(_) => "blockdense",
            LayerConfig::BlockShuffle(_) => "blockshuffle",
            LayerConfig::ChannelIdle(_) => "channelidle",
            LayerConfig::Ufff(_) => "ufff",
            LayerConfig::Moe(_) => "moe",
            LayerConfig::Smoe(_) => "smoe",
            LayerConfig::Moefied(_) => "moefied",
            LayerConfig::Hash(_) => "hash",
            LayerConfig::Pkm(_) => "pkm",
        }
    }
}

/// Most parameters a model may have (2³² scalars: 16 GiB of values, as much again of
/// gradients): larger requests are configuration mistakes, refused before allocating.
pub const MAX_PARAMS: usize = 1 << 32;

/// Refuses parameter counts above [`MAX_PARAMS`] (or that overflow) with an error naming `what`.
pub fn check_size(what: &str, count: Option<usize>) -> Result<usize> {
    match count {
        Some(n) if n <= MAX_PARAMS => Ok(n),
        Some(n) => Err(Error::Config(format!("{what}: {n} parameters is more than the limit of {MAX_PARAMS}"))),
        None => Err(Error::Config(format!("{what}: the parameter count overflows"))),
    }
}

/// Grows a buffer to at least `n` values (allocates only when the batch grows).
pub(crate) use crate::core::scratch::grow as ensure_len;

/// Sets `dst`'s parameters, in order, to `src`'s values (a layer rebuilt under another
/// configuration of the same parameter shapes); an error, with `dst` unchanged, when the
/// parameter lists differ in length or shape.
pub fn copy_params(src: &dyn Layer, dst: &mut dyn Layer) -> Result<()> {
    let from = src.params();
    let to: Vec<Vec<usize>> = dst.params().iter().map(|p| p.shape.clone()).collect();
    if from.len() != to.len() || from.iter().zip(&to).any(|(a, b)| &a.shape != b) {
        return Err(Error::Invalid(format!("a {} layer's parameters do not match a {} layer's shapes", src.kind(), dst.kind())));
    }
    let mut it = from.into_iter();
    dst.visit_params_mut(&mut |p| {
        if let Some(s) = it.next() {
            p.value.clone_from(&s.value);
        }
    });
    Ok(())
}

/// Counts the scalars of a layer's parameters.
pub fn param_count(layer: &dyn Layer) -> usize {
    layer.params().iter().map(|p| p.len()).sum()
}
