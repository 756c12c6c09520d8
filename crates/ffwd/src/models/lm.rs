//! A decoder-only pre-LayerNorm transformer language model whose feedforward slot takes any
//! ffwd layer (dense 2-/3-layer, `fff`, `ufff`, `moe`, `smoe`, `hash`, `pkm`).
//!
//! ```text
//! x₀ = tok_emb[token] + pos_emb[position]                      (B·T × d)
//! sequential block:  x ← x + Attn(LN₁(x));  x ← x + FFN(LN₂(x))
//! parallel block:    a = LN₁(x);  x ← x + Attn(a) + FFN(a)       (PAF, `parallel = true`)
//! logits = LN_f(x) · tok_embᵀ                                   (B·T × V, tied embedding)
//! ```
//!
//! Training runs the FFN's training forward (soft routing for trees); evaluation and
//! generation run its inference kernel (hard routing), through [`Lm::logits`] and the
//! KV-cached [`Generator`]. Parameter names (safetensors keys): `tok_emb.weight`,
//! `pos_emb.weight`, `blocks.{i}.ln1.*`, `blocks.{i}.attn.{qkv,proj}.*`, `blocks.{i}.ln2.*`,
//! `blocks.{i}.ffn.<the layer's own names>`, `ln_f.*`.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::core::gemm::{matmul, MatMut, MatRef};
use crate::core::loss::softmax_cross_entropy;
use crate::core::profile::span;
use crate::core::{Activation, Param, Rng};
use crate::error::{check_dim, Error, Result};
use crate::kernels::{InferKernel, Precision, Workspace};
use crate::layers::attention::{CausalSelfAttention, KvCache};
use crate::layers::ensure_len;
use crate::layers::guided::{is_guide, keep_mask};
use crate::layers::layer_norm::LayerNorm;
use crate::layers::{DenseConfig, Input, Layer, LayerConfig};

/// Shape of the language model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LmConfig {
    /// Vocabulary size (set from the tokenizer).
    pub vocab: usize,
    /// Maximum context length (learned positions).
    pub context: usize,
    /// Model width.
    pub d_model: usize,
    /// Attention heads (divide `d_model`).
    pub heads: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Parallel attention + FFN (PAF): both read the same normalised input.
    pub parallel: bool,
    /// The feedforward layer of every block (`d_model → d_model`).
    pub ffn: LayerConfig,
    /// The first block's feedforward layer when it differs from `ffn` (the structured-FFN
    /// paper keeps the first block dense).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_ffn: Option<LayerConfig>,
}

impl LmConfig {
    /// Scalars of the model's parameters, computed without building it (`None` on overflow).
    pub fn param_count(&self) -> Option<usize> {
        let d = self.d_model;
        // attention: qkv 3d² + 3d, projection d² + d; two LayerNorms (one when parallel)
        let norms = d.checked_mul(if self.parallel { 2 } else { 4 })?;
        let attn = d.checked_mul(d)?.checked_add(d)?.checked_mul(4)?;
        let block = |ffn: &LayerConfig| attn.checked_add(norms)?.checked_add(ffn.param_count(d, d)?);
        let emb = self.vocab.checked_add(self.context)?.checked_mul(d)?;
        let first = block(self.first_ffn.as_ref().unwrap_or(&self.ffn))?;
        let rest = block(&self.ffn)?.checked_mul(self.layers.saturating_sub(1))?;
        emb.checked_add(first)?.checked_add(rest)?.checked_add(d.checked_mul(2)?)
    }
}

impl Default for LmConfig {
    fn default() -> Self {
        // a nanoGPT "baby GPT" scaled to two CPU cores: 4 × 192 wide, 128 characters of context
        LmConfig {
            vocab: 0,
            context: 128,
            d_model: 192,
            heads: 6,
            layers: 4,
            parallel: false,
            ffn: LayerConfig::Dense(DenseConfig { width: 768, layers: 2, activation: Activation::Gelu }),
            first_ffn: None,
        }
    }
}

struct Block {
    ln1: LayerNorm,
    attn: CausalSelfAttention,
    /// `None` in the parallel layout.
    ln2: Option<LayerNorm>,
    ffn: Box<dyn Layer>,
}

/// Per-block activations of the last training forward (all `B·T × d`).
#[derive(Default)]
struct Cache {
    /// Block input (residual stream).
    x: Vec<f32>,
    /// `LN₁(x)`.
    a: Vec<f32>,
    /// Attention output.
    att: Vec<f32>,
    /// `x + att` (sequential layout).
    mid: Vec<f32>,
    /// `LN₂(mid)` (sequential layout).
    bn: Vec<f32>,
    /// FFN output.
    f: Vec<f32>,
}

/// The language model.
///
/// ```
/// use ffwd::prelude::*;
/// use ffwd::layers::UfffConfig;
///
/// let ffn = LayerConfig::Ufff(UfffConfig { depth: 3, trees: 2, ..Default::default() });
/// let cfg = LmConfig { vocab: 10, context: 16, d_model: 16, heads: 2, layers: 1, parallel: false, ffn, first_ffn: None };
/// let mut lm = Lm::new(cfg, 0)?;
/// let tokens: Vec<u32> = (0..2 * 8).map(|i| i % 10).collect();
/// let targets: Vec<u32> = tokens.iter().map(|t| (t + 1) % 10).collect();
/// let (loss, _aux) = lm.forward_backward(&tokens, &targets, 2, 8, &mut Rng::new(1))?; // b = 2, t = 8
/// assert!((loss - (10f32).ln()).abs() < 0.5); // about uniform before training
/// let next = lm.generator().generate(&[1, 2, 3], 5, 0.0, 0, &mut Rng::new(0))?;   // KV cache
/// assert_eq!(next.len(), 5);
/// # Ok::<(), ffwd::Error>(())
/// ```
pub struct Lm {
    cfg: LmConfig,
    /// `V × d`, shared with the output layer.
    pub tok_emb: Param,
    /// `context × d`.
    pub pos_emb: Param,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    caches: Vec<Cache>,
    x_out: Vec<f32>,
    xf: Vec<f32>,
    logits: Vec<f32>,
    dlogits: Vec<f32>,
    g: Vec<f32>,
    da: Vec<f32>,
    dtmp: Vec<f32>,
    /// FFN inference kernels, built from the weights on first use and dropped by every
    /// mutable access to the parameters ([`Lm::visit_params_mut`]), so they never go stale.
    kernels: OnceLock<Vec<Box<dyn InferKernel>>>,
    /// Transposed projection and embedding weights for batched decoding, cached as `kernels`.
    decode: OnceLock<DecodeWeights>,
    ws: Workspace,
    /// Weight storage of the FFN inference kernels.
    precision: Precision,
}

/// Weights of the batched decoder in the layout its products read in place: per block the
/// attention projections transposed (`d × 3d`, `d × d`), and the embedding transposed
/// (`d × V`) for the logits.
struct DecodeWeights {
    attn: Vec<(Vec<f32>, Vec<f32>)>,
    emb_t: Vec<f32>,
}

impl Lm {
    /// A freshly initialised model (GPT-2 initialisation: N(0, 0.02²) embeddings, output
    /// projections of attention scaled by 1/√(2·layers)).
    pub fn new(cfg: LmConfig, seed: u64) -> Result<Self> {
        if cfg.vocab == 0 || cfg.context == 0 || cfg.layers == 0 {
            return Err(Error::Config(format!("lm needs vocab, context and layers > 0, got {}, {}, {}", cfg.vocab, cfg.context, cfg.layers)));
        }
        if cfg.heads == 0 || !cfg.d_model.is_multiple_of(cfg.heads) {
            return Err(Error::Config(format!("lm d_model {} must be a positive multiple of heads {}", cfg.d_model, cfg.heads)));
        }
        crate::layers::check_size("lm", cfg.param_count())?;
        let mut rng = Rng::new(seed);
        let d = cfg.d_model;
        let normal = |name: &str, shape: &[usize], rng: &mut Rng| {
            let mut p = Param::zeros(name, shape, true);
            for v in &mut p.value {
                *v = 0.02 * rng.normal();
            }
            p
        };
        let tok_emb = normal("tok_emb.weight", &[cfg.vocab, d], &mut rng);
        let pos_emb = normal("pos_emb.weight", &[cfg.context, d], &mut rng);
        let proj_scale = 1.0 / ((2 * cfg.layers) as f32).sqrt();
        let mut blocks = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            blocks.push(Block {
                ln1: LayerNorm::new(&format!("blocks.{i}.ln1"), d),
                attn: CausalSelfAttention::new(&format!("blocks.{i}.attn"), d, cfg.heads, proj_scale, &mut rng),
                ln2: (!cfg.parallel).then(|| LayerNorm::new(&format!("blocks.{i}.ln2"), d)),
                ffn: match (&cfg.first_ffn, i) {
                    (Some(first), 0) => first.build(d, d, &mut rng)?,
                    _ => cfg.ffn.build(d, d, &mut rng)?,
                },
            });
        }
        let caches = (0..cfg.layers).map(|_| Cache::default()).collect();
        Ok(Lm {
            ln_f: LayerNorm::new("ln_f", d),
            cfg,
            tok_emb,
            pos_emb,
            blocks,
            caches,
            x_out: Vec::new(),
            xf: Vec::new(),
            logits: Vec::new(),
            dlogits: Vec::new(),
            g: Vec::new(),
            da: Vec::new(),
            dtmp: Vec::new(),
            kernels: OnceLock::new(),
            decode: OnceLock::new(),
            ws: Workspace::new(),
            precision: Precision::F32,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LmConfig {
        &self.cfg
    }

    /// The FFN inference kernels of the current weights ([`Lm::logits`], [`Generator`]): built
    /// on first use after any change of the parameters.
    fn kernels(&self) -> &[Box<dyn InferKernel>] {
        // `set_precision` checked that every FFN has a kernel in this precision
        self.kernels.get_or_init(|| self.blocks.iter().map(|b| b.ffn.kernel_with(self.precision).unwrap_or_else(|_| b.ffn.kernel())).collect())
    }

    /// Runs the FFN inference kernels with their weights stored in `precision` (attention,
    /// embeddings and LayerNorms stay f32); an error naming the layer kind when the FFN has no
    /// kernel in that precision.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        let kernels = self.blocks.iter().map(|b| b.ffn.kernel_with(precision)).collect::<Result<Vec<_>>>()?;
        self.precision = precision;
        self.kernels = OnceLock::from(kernels);
        Ok(())
    }

    /// The weight storage of the FFN inference kernels.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    fn decode_weights(&self) -> &DecodeWeights {
        self.decode.get_or_init(|| DecodeWeights {
            attn: self.blocks.iter().map(|b| b.attn.transposed()).collect(),
            emb_t: crate::kernels::dense::transpose(&self.tok_emb.value, self.cfg.vocab, self.cfg.d_model),
        })
    }

    /// Every parameter with its full safetensors key, in a fixed order.
    pub fn named_params(&self) -> Vec<(String, &Param)> {
        let mut v: Vec<(String, &Param)> = vec![(self.tok_emb.name.clone(), &self.tok_emb), (self.pos_emb.name.clone(), &self.pos_emb)];
        for (i, b) in self.blocks.iter().enumerate() {
            v.extend(b.ln1.params().into_iter().map(|p| (p.name.clone(), p)));
            v.extend(b.attn.params().into_iter().map(|p| (p.name.clone(), p)));
            if let Some(ln2) = &b.ln2 {
                v.extend(ln2.params().into_iter().map(|p| (p.name.clone(), p)));
            }
            v.extend(b.ffn.params().into_iter().map(|p| (format!("blocks.{i}.ffn.{}", p.name), p)));
        }
        v.extend(self.ln_f.params().into_iter().map(|p| (p.name.clone(), p)));
        v
    }

    /// Visits every parameter in [`Lm::named_params`] order. Drops the cached inference
    /// kernels (the parameters may change).
    pub fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.kernels.take();
        self.decode.take();
        f(&mut self.tok_emb);
        f(&mut self.pos_emb);
        for b in &mut self.blocks {
            b.ln1.visit_params_mut(f);
            b.attn.visit_params_mut(f);
            if let Some(ln2) = &mut b.ln2 {
                ln2.visit_params_mut(f);
            }
            b.ffn.visit_params_mut(f);
        }
        self.ln_f.visit_params_mut(f);
    }

    /// Zeroes every gradient (the touched rows only of sparse ones): call before the first
    /// micro-batch of a step.
    pub fn zero_grad(&mut self) {
        self.visit_params_mut(&mut |p| p.zero_grad());
    }

    /// Number of parameters.
    pub fn param_count(&self) -> usize {
        self.named_params().iter().map(|(_, p)| p.len()).sum()
    }

    /// Parameters of the FFN layers.
    pub fn ffn_param_count(&self) -> usize {
        self.blocks.iter().map(|b| crate::layers::param_count(b.ffn.as_ref())).sum()
    }

    /// FFN parameters one token touches at inference, summed over blocks (the multiply-adds
    /// of the FFN inference kernels per token).
    pub fn ffn_active_params_per_token(&self) -> usize {
        self.kernels().iter().map(|k| k.macs_per_sample()).sum()
    }

    fn check_tokens(&self, tokens: &[u32], b: usize, t: usize, what: &str) -> Result<()> {
        if t == 0 || b == 0 {
            return Err(Error::Invalid(format!("{what}: empty batch or sequence")));
        }
        if t > self.cfg.context {
            return Err(Error::Invalid(format!("{what}: sequence of {t} tokens is longer than the model's context of {}", self.cfg.context)));
        }
        check_dim(what, "tokens", b * t, tokens.len())?;
        if let Some(&bad) = tokens.iter().find(|&&v| v as usize >= self.cfg.vocab) {
            return Err(Error::Invalid(format!("{what}: token id {bad} is outside the vocabulary of {}", self.cfg.vocab)));
        }
        Ok(())
    }

    fn embed(&self, tokens: &[u32], t: usize, x: &mut [f32]) {
        let d = self.cfg.d_model;
        for (r, (row, &tok)) in x.chunks_exact_mut(d).zip(tokens).enumerate() {
            let (te, pe) = (&self.tok_emb.value[tok as usize * d..][..d], &self.pos_emb.value[(r % t) * d..][..d]);
            for ((v, a), b) in row.iter_mut().zip(te).zip(pe) {
                *v = a + b;
            }
        }
    }

    /// Runs the blocks over `b` sequences of `t` tokens (training forward when `train`, else
    /// the FFN inference kernels) and leaves `LN_f(x)` in `self.xf` and the logits in
    /// `self.logits`.
    fn forward(&mut self, tokens: &[u32], b: usize, t: usize, train: bool, rng: &mut Rng) -> Result<()> {
        let (d, v, rows) = (self.cfg.d_model, self.cfg.vocab, b * t);
        for c in &mut self.caches {
            for buf in [&mut c.x, &mut c.a, &mut c.att, &mut c.mid, &mut c.bn, &mut c.f] {
                ensure_len(buf, rows * d);
            }
        }
        ensure_len(&mut self.x_out, rows * d);
        ensure_len(&mut self.xf, rows * d);
        ensure_len(&mut self.logits, rows * v);
        let mut x0 = std::mem::take(&mut self.caches[0].x);
        let s = span("embed");
        self.embed(tokens, t, &mut x0[..rows * d]);
        drop(s);
        self.caches[0].x = x0;
        if !train {
            self.kernels();
        }
        let parallel = self.cfg.parallel;
        for l in 0..self.blocks.len() {
            let (head, tail) = self.caches.split_at_mut(l + 1);
            let (blk, c) = (&mut self.blocks[l], &mut head[l]);
            let n = rows * d;
            let s = span("layernorm fwd");
            blk.ln1.forward(&c.x[..n], rows, &mut c.a[..n]);
            drop(s);
            blk.attn.forward(&c.a[..n], b, t, &mut c.att[..n]);
            let ffn_in: &[f32] = if parallel {
                &c.a[..n]
            } else {
                let s = span("residual fwd");
                for ((m, &x), &a) in c.mid[..n].iter_mut().zip(&c.x[..n]).zip(&c.att[..n]) {
                    *m = x + a;
                }
                drop(s);
                let _s = span("layernorm fwd");
                blk.ln2.as_mut().expect("sequential block has ln2").forward(&c.mid[..n], rows, &mut c.bn[..n]);
                &c.bn[..n]
            };
            let s = span("ffn fwd");
            if train {
                blk.ffn.forward_train(Input::new(ffn_in, rows).with_ids(tokens), &mut c.f[..n], rng)?;
            } else {
                let kernel = &self.kernels.get().ok_or_else(|| Error::Invalid("lm: inference kernels missing".into()))?[l];
                kernel.forward_tokens(ffn_in, tokens, rows, &mut c.f[..n], &mut self.ws)?;
            }
            drop(s);
            let _s = span("residual fwd");
            let base: &[f32] = if parallel { &c.x[..n] } else { &c.mid[..n] };
            let next = match tail.first_mut() {
                Some(nc) => &mut nc.x,
                None => &mut self.x_out,
            };
            if parallel {
                for (((o, &x), &a), &f) in next[..n].iter_mut().zip(base).zip(&c.att[..n]).zip(&c.f[..n]) {
                    *o = x + a + f;
                }
            } else {
                for ((o, &x), &f) in next[..n].iter_mut().zip(base).zip(&c.f[..n]) {
                    *o = x + f;
                }
            }
        }
        let s = span("layernorm fwd");
        self.ln_f.forward(&self.x_out[..rows * d], rows, &mut self.xf[..rows * d]);
        drop(s);
        let _s = span("logits fwd");
        matmul(
            MatMut::new(&mut self.logits[..rows * v], rows, v),
            MatRef::new(&self.xf[..rows * d], rows, d),
            MatRef::new(&self.tok_emb.value, v, d).t(),
            false,
        );
        Ok(())
    }

    /// One micro-batch's forward and backward on `b` sequences of `t` tokens (`tokens`,
    /// `targets`: `b·t`, the targets being the next tokens). *Adds* the gradient of the mean
    /// cross-entropy plus the FFN auxiliary losses into every parameter's `grad` (call
    /// [`Lm::zero_grad`] before a step's first micro-batch) and returns `(mean cross-entropy in
    /// nats per token, summed FFN auxiliary loss)`.
    pub fn forward_backward(&mut self, tokens: &[u32], targets: &[u32], b: usize, t: usize, rng: &mut Rng) -> Result<(f32, f32)> {
        self.check_tokens(tokens, b, t, "lm training batch")?;
        self.check_tokens(targets, b, t, "lm training targets")?;
        self.forward(tokens, b, t, true, rng)?;
        let (d, v, rows) = (self.cfg.d_model, self.cfg.vocab, b * t);
        let n = rows * d;
        ensure_len(&mut self.dlogits, rows * v);
        let s = span("loss");
        let (loss, _) = softmax_cross_entropy(&self.logits[..rows * v], targets, v, &mut self.dlogits[..rows * v]);
        drop(s);
        let aux: f32 = self.blocks.iter().map(|b| b.ffn.aux_loss()).sum();
        let s = span("logits bwd");
        // output layer (tied): dE = dlogitsᵀ · xf, dxf = dlogits · E
        let dl = MatRef::new(&self.dlogits[..rows * v], rows, v);
        matmul(MatMut::new(&mut self.tok_emb.grad, v, d), dl.t(), MatRef::new(&self.xf[..n], rows, d), true);
        ensure_len(&mut self.da, n);
        ensure_len(&mut self.g, n);
        ensure_len(&mut self.dtmp, n);
        matmul(MatMut::new(&mut self.da[..n], rows, d), dl, MatRef::new(&self.tok_emb.value, v, d), false);
        drop(s);
        let s = span("layernorm bwd");
        self.g[..n].fill(0.0);
        self.ln_f.backward(&self.x_out[..n], rows, &self.da[..n], &mut self.g[..n]);
        drop(s);
        let parallel = self.cfg.parallel;
        for l in (0..self.blocks.len()).rev() {
            let (blk, c) = (&mut self.blocks[l], &self.caches[l]);
            let (g, da, dtmp) = (&mut self.g[..n], &mut self.da[..n], &mut self.dtmp[..n]);
            // g holds dL/d(block output) on entry and dL/d(block input) on exit
            if parallel {
                da.fill(0.0);
                blk.attn.backward(&c.a[..n], b, t, g, da);
                blk.ffn.backward(Input::new(&c.a[..n], rows).with_ids(tokens), g, Some(dtmp))?;
                for (a, &x) in da.iter_mut().zip(dtmp.iter()) {
                    *a += x;
                }
            } else {
                let s = span("ffn bwd");
                blk.ffn.backward(Input::new(&c.bn[..n], rows).with_ids(tokens), g, Some(dtmp))?;
                drop(s);
                let s = span("layernorm bwd");
                blk.ln2.as_mut().expect("sequential block has ln2").backward(&c.mid[..n], rows, dtmp, g);
                drop(s);
                da.fill(0.0);
                blk.attn.backward(&c.a[..n], b, t, g, da);
            }
            let _s = span("layernorm bwd");
            blk.ln1.backward(&c.x[..n], rows, da, g);
        }
        let _s = span("embed bwd");
        // embeddings: scatter-add the stream's gradient
        for (r, (row, &tok)) in self.g[..n].chunks_exact(d).zip(tokens).enumerate() {
            for (e, &gv) in self.tok_emb.grad[tok as usize * d..][..d].iter_mut().zip(row) {
                *e += gv;
            }
            for (e, &gv) in self.pos_emb.grad[(r % t) * d..][..d].iter_mut().zip(row) {
                *e += gv;
            }
        }
        Ok((loss, aux))
    }

    /// Inference logits of `b` sequences of `t` tokens (FFN inference kernels): `b·t × V`.
    pub fn logits(&mut self, tokens: &[u32], b: usize, t: usize) -> Result<Vec<f32>> {
        self.check_tokens(tokens, b, t, "lm input")?;
        self.forward(tokens, b, t, false, &mut Rng::new(0))?;
        Ok(self.logits[..b * t * self.cfg.vocab].to_vec())
    }

    /// Mean cross-entropy (nats per token) of the inference path on `b` sequences of `t`
    /// tokens against `targets`.
    pub fn eval_loss(&mut self, tokens: &[u32], targets: &[u32], b: usize, t: usize) -> Result<f32> {
        self.check_tokens(tokens, b, t, "lm eval batch")?;
        self.check_tokens(targets, b, t, "lm eval targets")?;
        self.forward(tokens, b, t, false, &mut Rng::new(0))?;
        let (v, rows) = (self.cfg.vocab, b * t);
        ensure_len(&mut self.dlogits, rows * v);
        Ok(softmax_cross_entropy(&self.logits[..rows * v], targets, v, &mut self.dlogits[..rows * v]).0)
    }

    /// Tells every FFN where training stands (`step` of `total`): self-guided FFNs set α and
    /// drop their dense guides when it reaches 0. Returns, when parameters were dropped, which
    /// of the previous [`Lm::named_params`] remain (for [`crate::optim::Optimizer::retain`]).
    pub fn set_progress(&mut self, step: usize, total: usize) -> Option<Vec<bool>> {
        self.with_dropped(&mut |b| b.set_progress(step, total))
    }

    /// Drops the dense guides of self-guided FFNs now; which of the previous
    /// [`Lm::named_params`] remain, when some were dropped.
    pub fn drop_guides(&mut self) -> Option<Vec<bool>> {
        self.with_dropped(&mut |b| b.drop_guides())
    }

    /// Runs `f` on every FFN holding a guide (nothing else follows a schedule); the keep-mask
    /// of the parameters `f` dropped, if any.
    fn with_dropped(&mut self, f: &mut dyn FnMut(&mut dyn Layer) -> Vec<String>) -> Option<Vec<bool>> {
        // the names are only needed when an FFN holds a guide (small lists, once per step)
        if !self.blocks.iter().any(|b| b.ffn.params().iter().any(|p| is_guide(&p.name))) {
            return None;
        }
        // α changes the inference kernels even when nothing is dropped
        self.kernels.take();
        let before: Vec<String> = self.named_params().into_iter().map(|(n, _)| n).collect();
        let mut dropped = Vec::new();
        for (i, b) in self.blocks.iter_mut().enumerate() {
            dropped.extend(f(b.ffn.as_mut()).into_iter().map(|n| format!("blocks.{i}.ffn.{n}")));
        }
        keep_mask(&before, &dropped)
    }

    /// The FFN of block `l` (`None` past the last block).
    pub fn ffn(&self, l: usize) -> Option<&dyn Layer> {
        self.blocks.get(l).map(|b| b.ffn.as_ref())
    }

    /// Replaces every block's FFN (a conversion: `layers[i]` for block `i`, all built from
    /// `cfg`, `d_model → d_model`); the model's configuration then records `cfg`.
    pub fn replace_ffns(&mut self, cfg: LayerConfig, layers: Vec<Box<dyn Layer>>) -> Result<()> {
        let d = self.cfg.d_model;
        if layers.len() != self.blocks.len() {
            return Err(Error::Invalid(format!("lm: {} FFNs for {} blocks", layers.len(), self.blocks.len())));
        }
        if let Some(bad) = layers.iter().find(|l| l.config() != cfg || l.in_features() != d || l.out_features() != d) {
            return Err(Error::Invalid(format!(
                "lm: a replacement FFN ({} {}→{}) does not match the configuration or d_model {d}",
                bad.kind(),
                bad.in_features(),
                bad.out_features()
            )));
        }
        for (b, l) in self.blocks.iter_mut().zip(layers) {
            b.ffn = l;
        }
        self.cfg.ffn = cfg;
        self.cfg.first_ffn = None;
        self.kernels.take();
        Ok(())
    }

    /// Runs the inference path over `b` sequences of `t` tokens and returns, per block, the
    /// input its FFN read (`b·t × d_model` each: the second LayerNorm's output, or the first's
    /// in the parallel layout). For analyses of what FFN units respond to (`ffwd inspect`).
    pub fn ffn_inputs(&mut self, tokens: &[u32], b: usize, t: usize) -> Result<Vec<Vec<f32>>> {
        self.check_tokens(tokens, b, t, "lm input")?;
        self.forward(tokens, b, t, false, &mut Rng::new(0))?;
        let n = b * t * self.cfg.d_model;
        let parallel = self.cfg.parallel;
        Ok(self.caches.iter().map(|c| if parallel { c.a[..n].to_vec() } else { c.bn[..n].to_vec() }).collect())
    }

    /// Inference routing counts of every block's FFN over `b` sequences of `t` tokens (units:
    /// `leaf`, `expert`); `None` for FFNs without routing (dense, hash layers that route by
    /// token id).
    pub fn route_usage(&mut self, tokens: &[u32], b: usize, t: usize) -> Result<Vec<Option<crate::kernels::RouteUsage>>> {
        let inputs = self.ffn_inputs(tokens, b, t)?;
        let kernels = self.kernels();
        Ok(inputs
            .iter()
            .zip(kernels)
            .map(|(x, k)| {
                let mut counts = Vec::new();
                k.route_usage(x, b * t, &mut counts).map(|u| crate::kernels::RouteUsage { unit: u.to_string(), counts })
            })
            .collect())
    }

    /// A generator that feeds one token at a time through KV caches. It borrows the model, so
    /// the weights cannot change while it lives.
    pub fn generator(&self) -> Generator<'_> {
        Generator { decoder: self.decoder(), seq: self.sequence() }
    }

    /// A decoder that advances several sequences by one token each in one batched pass
    /// (continuous batching: sequences may join and leave between steps).
    pub fn decoder(&self) -> Decoder<'_> {
        Decoder {
            lm: self,
            kernels: self.kernels(),
            weights: self.decode_weights(),
            ws: Workspace::new(),
            rows: 0,
            x: Vec::new(),
            a: Vec::new(),
            att: Vec::new(),
            bn: Vec::new(),
            f: Vec::new(),
            qkv: Vec::new(),
            o: Vec::new(),
            scores: Vec::new(),
            logits: Vec::new(),
        }
    }

    /// An empty key/value cache for one sequence of up to `context` tokens.
    pub fn sequence(&self) -> Sequence {
        KvCache::new(self.blocks.len(), self.cfg.context, self.cfg.d_model)
    }
}

/// The key/value caches of one sequence being decoded (per block, `context × d`).
pub type Sequence = KvCache;

/// The tokens one sequence being generated has seen (prompt and samples), with the rule
/// `ffwd lm sample` and the server share for its cache: the prompt's last `context` tokens are
/// fed, and a full cache restarts from the last half of the history.
pub struct Stream {
    history: Vec<u32>,
}

impl Stream {
    /// Starts on `prompt` (at least one token): resets `seq` and feeds all but the last of the
    /// prompt's last `context` tokens; the last one is fed by the first step.
    pub fn start(dec: &mut Decoder<'_>, seq: &mut Sequence, prompt: &[u32]) -> Result<Self> {
        if prompt.is_empty() {
            return Err(Error::Invalid("generation needs a prompt of at least one token".into()));
        }
        seq.reset();
        let start = prompt.len().saturating_sub(dec.lm.cfg.context);
        dec.feed(seq, &prompt[start..prompt.len() - 1])?;
        Ok(Stream { history: prompt.to_vec() })
    }

    /// Before a step: when `seq` is full, restarts it from the last half of the history.
    pub fn make_room(&self, dec: &mut Decoder<'_>, seq: &mut Sequence) -> Result<()> {
        let ctx = dec.lm.cfg.context;
        if seq.len() >= ctx {
            seq.reset();
            let from = self.history.len() - ctx / 2;
            dec.feed(seq, &self.history[from..self.history.len() - 1])?;
        }
        Ok(())
    }

    /// The token the next step feeds (the last one seen).
    pub fn last(&self) -> u32 {
        self.history[self.history.len() - 1]
    }

    /// Records the token sampled after a step.
    pub fn push(&mut self, token: u32) {
        self.history.push(token);
    }
}

/// Batched incremental decoding: one [`Decoder::step`] feeds one token to each of `n`
/// sequences and returns `n` rows of logits. The projections, the FFN (its inference kernel,
/// hard routing for trees, at batch n) and the logits run as `n`-row products; attention runs
/// per sequence over its own cache. Buffers grow with the largest `n` seen and are reused.
pub struct Decoder<'a> {
    lm: &'a Lm,
    kernels: &'a [Box<dyn InferKernel>],
    weights: &'a DecodeWeights,
    ws: Workspace,
    rows: usize,
    x: Vec<f32>,
    a: Vec<f32>,
    att: Vec<f32>,
    bn: Vec<f32>,
    f: Vec<f32>,
    qkv: Vec<f32>,
    o: Vec<f32>,
    scores: Vec<f32>,
    logits: Vec<f32>,
}

impl Decoder<'_> {
    fn grow(&mut self, n: usize) {
        if n <= self.rows {
            return;
        }
        let (d, v, ctx) = (self.lm.cfg.d_model, self.lm.cfg.vocab, self.lm.cfg.context);
        for (buf, width) in [
            (&mut self.x, d),
            (&mut self.a, d),
            (&mut self.att, d),
            (&mut self.bn, d),
            (&mut self.f, d),
            (&mut self.qkv, 3 * d),
            (&mut self.o, d),
            (&mut self.logits, v),
        ] {
            buf.resize(n * width, 0.0);
        }
        self.scores.resize(ctx, 0.0);
        self.rows = n;
    }

    /// Feeds `tokens[i]` to `seqs[i]` at its next position; returns the logits (`n × V`, row
    /// i for sequence i) of the token after. Errors (before changing any cache) when a
    /// sequence's context is full or a token is outside the vocabulary.
    pub fn step(&mut self, seqs: &mut [&mut Sequence], tokens: &[u32]) -> Result<&[f32]> {
        let lm = self.lm;
        let (d, v, n) = (lm.cfg.d_model, lm.cfg.vocab, seqs.len());
        crate::error::check_dim("decoder tokens", "sequences", n, tokens.len())?;
        if n == 0 {
            return Err(Error::Invalid("decoder: no sequence to step".into()));
        }
        for (s, &t) in seqs.iter().zip(tokens) {
            if s.len() >= lm.cfg.context {
                return Err(Error::Invalid(format!("generator: context of {} tokens is full", lm.cfg.context)));
            }
            if t as usize >= v {
                return Err(Error::Invalid(format!("generator: token id {t} is outside the vocabulary of {v}")));
            }
        }
        self.grow(n);
        for (r, (s, &t)) in seqs.iter().zip(tokens).enumerate() {
            let x = &mut self.x[r * d..(r + 1) * d];
            for ((x, a), b) in x.iter_mut().zip(&lm.tok_emb.value[t as usize * d..][..d]).zip(&lm.pos_emb.value[s.len() * d..][..d]) {
                *x = a + b;
            }
        }
        let rows = n * d;
        for (l, blk) in lm.blocks.iter().enumerate() {
            for r in 0..n {
                blk.ln1.forward_row(&self.x[r * d..(r + 1) * d], &mut self.a[r * d..(r + 1) * d]);
            }
            let (qkv_t, proj_t) = &self.weights.attn[l];
            blk.attn.step_batch(&self.a[..rows], seqs, l, &mut self.qkv, &mut self.o, &mut self.scores, &mut self.att[..rows], Some((qkv_t, proj_t)));
            if lm.cfg.parallel {
                self.kernels[l].forward_tokens(&self.a[..rows], tokens, n, &mut self.f[..rows], &mut self.ws)?;
                for ((x, a), f) in self.x[..rows].iter_mut().zip(&self.att[..rows]).zip(&self.f[..rows]) {
                    *x += a + f;
                }
            } else {
                for (x, a) in self.x[..rows].iter_mut().zip(&self.att[..rows]) {
                    *x += a;
                }
                let ln2 = blk.ln2.as_ref().expect("sequential block has ln2");
                for r in 0..n {
                    ln2.forward_row(&self.x[r * d..(r + 1) * d], &mut self.bn[r * d..(r + 1) * d]);
                }
                self.kernels[l].forward_tokens(&self.bn[..rows], tokens, n, &mut self.f[..rows], &mut self.ws)?;
                for (x, f) in self.x[..rows].iter_mut().zip(&self.f[..rows]) {
                    *x += f;
                }
            }
        }
        for r in 0..n {
            lm.ln_f.forward_row(&self.x[r * d..(r + 1) * d], &mut self.a[r * d..(r + 1) * d]);
        }
        if n > 4 {
            let emb_t = &self.weights.emb_t;
            matmul(MatMut::new(&mut self.logits[..n * v], n, v), MatRef::new(&self.a[..rows], n, d), MatRef::new(emb_t, d, v), false);
        } else {
            crate::core::gemm::matmul_bt(&mut self.logits[..n * v], &self.a[..rows], n, d, &lm.tok_emb.value, v);
        }
        for s in seqs.iter_mut() {
            s.advance();
        }
        Ok(&self.logits[..n * v])
    }

    /// Feeds `tokens` to one sequence, one step each (a prompt, a restarted cache).
    pub fn feed(&mut self, seq: &mut Sequence, tokens: &[u32]) -> Result<()> {
        for &t in tokens {
            self.step(&mut [&mut *seq], &[t])?;
        }
        Ok(())
    }
}

/// Incremental decoding of one sequence with per-block key/value caches (a [`Decoder`] at
/// batch 1); the FFN runs its inference kernel (hard routing for trees).
pub struct Generator<'a> {
    decoder: Decoder<'a>,
    seq: Sequence,
}

impl Generator<'_> {
    /// Tokens in the cache.
    pub fn len(&self) -> usize {
        self.seq.len()
    }

    /// True before the first token.
    pub fn is_empty(&self) -> bool {
        self.seq.is_empty()
    }

    /// Forgets the cached sequence.
    pub fn reset(&mut self) {
        self.seq.reset();
    }

    /// Feeds `token` at the next position and returns the logits (`V`) for the one after.
    /// Errors when the context is full (call [`Generator::reset`] and re-feed a suffix).
    pub fn step(&mut self, token: u32) -> Result<&[f32]> {
        self.decoder.step(&mut [&mut self.seq], &[token])
    }

    /// Feeds `prompt`, then samples `n` tokens (temperature `temperature`, 0 = greedy; only the
    /// `top_k` most likely when `top_k > 0`). When the context fills up, the cache is rebuilt
    /// from the last half of the context. Returns the sampled tokens.
    pub fn generate(&mut self, prompt: &[u32], n: usize, temperature: f32, top_k: usize, rng: &mut Rng) -> Result<Vec<u32>> {
        let mut stream = Stream::start(&mut self.decoder, &mut self.seq, prompt)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            stream.make_room(&mut self.decoder, &mut self.seq)?;
            let logits = self.decoder.step(&mut [&mut self.seq], &[stream.last()])?;
            let next = sample(logits, temperature, top_k, rng);
            stream.push(next);
            out.push(next);
        }
        Ok(out)
    }
}

/// Draws a token from `logits`: argmax at temperature 0, else softmax(logits / T) restricted
/// to the `top_k` largest (all when 0).
pub fn sample(logits: &[f32], temperature: f32, top_k: usize, rng: &mut Rng) -> u32 {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if temperature <= 0.0 {
        return idx[0] as u32;
    }
    let k = if top_k == 0 { idx.len() } else { top_k.min(idx.len()) };
    let m = logits[idx[0]];
    let w: Vec<f64> = idx[..k].iter().map(|&i| (((logits[i] - m) / temperature) as f64).exp()).collect();
    let total: f64 = w.iter().sum();
    let mut u = rng.uniform() as f64 * total;
    for (j, &wj) in w.iter().enumerate() {
        u -= wj;
        if u <= 0.0 {
            return idx[j] as u32;
        }
    }
    idx[k - 1] as u32
}
