//! A classifier: one feedforward layer from the input features to the class logits, then
//! softmax cross-entropy. Trees (`fff`, `ufff`) train soft and predict with hard routing.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::checkpoint::{CheckpointReader, CheckpointWriter, CLASSIFIER_FORMAT, CONFIG_KEY};
use crate::core::loss::{argmax_rows, softmax_cross_entropy};
use crate::core::{Param, Rng};
use crate::data::Dataset;
use crate::error::{check_dim, check_matrix, Error, Result};
use crate::kernels::{InferKernel, Precision, Workspace};
use crate::layers::guided::{is_guide, keep_mask};
use crate::layers::{param_count, Input, Layer, LayerConfig};

/// Everything needed to rebuild a classifier (stored in checkpoint metadata).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Input features.
    pub in_features: usize,
    /// Output classes.
    pub n_classes: usize,
    /// The feedforward layer between them.
    pub layer: LayerConfig,
}

/// Loss terms and accuracy of one training step.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepStats {
    /// Mean cross-entropy.
    pub loss: f32,
    /// Auxiliary loss of the layer (hardening, load balancing).
    pub aux: f32,
    /// Samples whose training-mode (soft) argmax equals the label.
    pub correct: usize,
}

/// `x → layer → logits → softmax`.
///
/// ```
/// use ffwd::layers::UfffConfig;
/// use ffwd::optim::{AdamW, Optimizer};
/// use ffwd::prelude::*;
///
/// let layer = LayerConfig::Ufff(UfffConfig { depth: 2, ..Default::default() });
/// let cfg = ModelConfig { in_features: 4, n_classes: 3, layer };
/// let mut model = Classifier::new(cfg, 0)?;
/// let (x, labels) = (vec![0.5f32; 2 * 4], [0u32, 2]);
/// let mut opt = AdamW::new(0.0);
/// let stats = model.forward_backward(&x, &labels, &mut Rng::new(1))?; // gradients added
/// opt.step(&mut |f| model.visit_params_mut(f), 1e-3, 1.0 / 2.0);    // update, gradients consumed
/// assert!(stats.loss.is_finite());
/// let p = model.predict_proba(&x, 2)?;                             // inference kernel
/// assert!((p[..3].iter().sum::<f32>() - 1.0).abs() < 1e-5);
/// # Ok::<(), ffwd::Error>(())
/// ```
pub struct Classifier {
    cfg: ModelConfig,
    layer: Box<dyn Layer>,
    /// Weight storage of the inference kernel ([`Classifier::logits`], `predict`, `accuracy`).
    precision: Precision,
    /// The inference kernel of the current weights in `precision`, built on first use and
    /// dropped by every mutable access to the layer, so it never goes stale.
    kernel: OnceLock<Box<dyn InferKernel>>,
    logits: Vec<f32>,
    dlogits: Vec<f32>,
}

/// Prefix of the layer's parameters in checkpoints.
pub const LAYER_PREFIX: &str = "ffn.";

impl ModelConfig {
    /// Scalars of the model's parameters, computed without building it (`None` on overflow).
    pub fn param_count(&self) -> Option<usize> {
        self.layer.param_count(self.in_features, self.n_classes)
    }
}

impl Classifier {
    /// A checkpoint writer holding this model (format `classifier/1`: parameters `ffn.*` and
    /// the configuration); add run state to it, or write it as is ([`Classifier::save`]).
    pub fn checkpoint(&self) -> Result<CheckpointWriter<'_>> {
        let mut w = CheckpointWriter::new(CLASSIFIER_FORMAT);
        w.params(&self.named_params()).json(CONFIG_KEY, &self.cfg)?;
        Ok(w)
    }

    /// Saves the model to `path` (atomically).
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        self.checkpoint()?.write(path)
    }

    /// Loads a model saved by [`Classifier::save`] (or any `classifier/1` checkpoint).
    pub fn load(path: &std::path::Path) -> Result<Self> {
        Self::from_checkpoint(&CheckpointReader::open(path)?)
    }

    /// The model stored in an opened checkpoint.
    pub fn from_checkpoint(ck: &CheckpointReader) -> Result<Self> {
        ck.expect_format(CLASSIFIER_FORMAT)?;
        let cfg: ModelConfig = ck.json(CONFIG_KEY)?;
        ck.check_claim("the classifier", cfg.param_count())?;
        let st = ck.tensors()?;
        let mut model = ck.about(Classifier::new(cfg, 0))?;
        // self-guided layers: a model saved after the guided phase holds no dense guides
        if model.named_params().iter().any(|(n, _)| is_guide(n) && st.tensor(n).is_err()) {
            model.layer_mut().drop_guides();
        }
        ck.fill_params(&st, LAYER_PREFIX, &mut |f| model.visit_params_mut(f))?;
        if let Some(q) = ck.quant() {
            // a layer without a quantized kernel runs f32 on the dequantized weights
            let _ = model.set_precision(Precision::of(q.format));
        }
        Ok(model)
    }

    /// A freshly initialised classifier; `seed` fixes the initial weights.
    pub fn new(cfg: ModelConfig, seed: u64) -> Result<Self> {
        let mut rng = Rng::new(seed).fork(0x1a7e);
        let layer = cfg.layer.build(cfg.in_features, cfg.n_classes, &mut rng)?;
        Ok(Self::assemble(cfg, layer))
    }

    fn assemble(cfg: ModelConfig, layer: Box<dyn Layer>) -> Self {
        Classifier { cfg, layer, precision: Precision::F32, kernel: OnceLock::new(), logits: Vec::new(), dlogits: Vec::new() }
    }

    /// A classifier around a built layer (a conversion's output): `in_features → n_classes`
    /// are the layer's widths.
    pub fn from_layer(layer: Box<dyn Layer>) -> Self {
        let cfg = ModelConfig { in_features: layer.in_features(), n_classes: layer.out_features(), layer: layer.config() };
        Self::assemble(cfg, layer)
    }

    /// The same weights under another configuration of the same parameter shapes (a MoEfied
    /// layer with another number of active experts, say); an error when the shapes differ.
    pub fn with_layer_config(&self, layer: LayerConfig) -> Result<Self> {
        let mut m = Classifier::new(ModelConfig { layer, ..self.cfg.clone() }, 0)?;
        crate::layers::copy_params(self.layer.as_ref(), m.layer_mut())?;
        Ok(m)
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The feedforward layer.
    pub fn layer(&self) -> &dyn Layer {
        self.layer.as_ref()
    }

    /// The feedforward layer, mutably (drops the cached inference kernel).
    pub fn layer_mut(&mut self) -> &mut dyn Layer {
        self.kernel.take();
        self.layer.as_mut()
    }

    /// Tells the layer where training stands (`step` of `total`; self-guided layers set α and
    /// drop their dense guides when it reaches 0). Returns, when parameters were dropped,
    /// which of the previous parameters remain (for [`crate::optim::Optimizer::retain`]).
    pub fn set_progress(&mut self, step: usize, total: usize) -> Option<Vec<bool>> {
        let before: Vec<String> = self.layer.params().iter().map(|p| p.name.clone()).collect();
        if !before.iter().any(|n| is_guide(n)) {
            return None;
        }
        let dropped = self.layer_mut().set_progress(step, total);
        keep_mask(&before, &dropped)
    }

    /// Number of trainable scalars.
    pub fn param_count(&self) -> usize {
        param_count(self.layer.as_ref())
    }

    /// Parameters with their checkpoint names (`ffn.` + the layer's name).
    pub fn named_params(&self) -> Vec<(String, &Param)> {
        self.layer.params().into_iter().map(|p| (format!("{LAYER_PREFIX}{}", p.name), p)).collect()
    }

    /// Zeroes every gradient (the touched rows only of sparse ones).
    pub fn zero_grad(&mut self) {
        self.layer.zero_grad()
    }

    /// Visits the parameters mutably (for optimizers and loaders); drops the cached inference
    /// kernel.
    pub fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.kernel.take();
        self.layer.visit_params_mut(f)
    }

    /// Forward and backward on one batch: `x` is `batch × in_features`, `labels` has `batch`
    /// entries. *Adds* the gradient of (mean cross-entropy + auxiliary loss) into the
    /// parameters' `grad` (call [`Classifier::zero_grad`] before a step).
    pub fn forward_backward(&mut self, x: &[f32], labels: &[u32], rng: &mut Rng) -> Result<StepStats> {
        let batch = labels.len();
        let c = self.cfg.n_classes;
        check_matrix("classifier input", x.len(), batch, self.cfg.in_features)?;
        if let Some(&bad) = labels.iter().find(|&&l| l as usize >= c) {
            return Err(Error::Invalid(format!("label {bad} out of range for {c} classes")));
        }
        crate::layers::ensure_len(&mut self.logits, batch * c);
        crate::layers::ensure_len(&mut self.dlogits, batch * c);
        let logits = &mut self.logits[..batch * c];
        self.layer.forward_train(Input::new(x, batch), logits, rng)?;
        let dlogits = &mut self.dlogits[..batch * c];
        let (loss, correct) = softmax_cross_entropy(logits, labels, c, dlogits);
        self.layer.backward(Input::new(x, batch), dlogits, None)?;
        Ok(StepStats { loss, aux: self.layer.aux_loss(), correct })
    }

    /// Runs inference with the layer's weights stored in `precision` (an error if the layer
    /// has no kernel in that precision). A quantized checkpoint sets its format on load.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        let kernel = self.layer.kernel_with(precision)?;
        self.precision = precision;
        self.kernel = OnceLock::from(kernel);
        Ok(())
    }

    /// The weight storage of the inference kernel.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The inference kernel of the current weights in the chosen precision (built once, then
    /// reused until the parameters are borrowed mutably).
    pub fn kernel(&self) -> Result<&dyn InferKernel> {
        if let Some(k) = self.kernel.get() {
            return Ok(k.as_ref());
        }
        let k = self.layer.kernel_with(self.precision)?;
        Ok(self.kernel.get_or_init(|| k).as_ref())
    }

    /// Inference logits: `x` (`batch × in_features`) → `batch × n_classes`.
    pub fn logits(&self, x: &[f32], batch: usize) -> Result<Vec<f32>> {
        check_matrix("classifier input", x.len(), batch, self.cfg.in_features)?;
        let mut y = vec![0.0; batch * self.cfg.n_classes];
        self.kernel()?.forward(x, batch, &mut y, &mut Workspace::new())?;
        Ok(y)
    }

    /// Class probabilities (softmax of the inference logits): `x` (`batch × in_features`) →
    /// `batch × n_classes`, each row summing to 1.
    pub fn predict_proba(&self, x: &[f32], batch: usize) -> Result<Vec<f32>> {
        Ok(self.classify(x, batch)?.1)
    }

    /// Classes (as [`Classifier::predict`]: argmax of the logits) and class probabilities
    /// (as [`Classifier::predict_proba`]) from one inference pass.
    pub fn classify(&self, x: &[f32], batch: usize) -> Result<(Vec<u32>, Vec<f32>)> {
        let logits = self.logits(x, batch)?;
        let c = self.cfg.n_classes;
        let mut classes = vec![0; batch];
        argmax_rows(&logits, c, &mut classes);
        let mut p = vec![0.0; logits.len()];
        for (l, pr) in logits.chunks_exact(c).zip(p.chunks_exact_mut(c)) {
            crate::kernels::moe::softmax(l, pr);
        }
        Ok((classes, p))
    }

    /// Predicted class of each row of `x` (`batch × in_features`).
    pub fn predict(&self, x: &[f32], batch: usize) -> Result<Vec<u32>> {
        let y = self.logits(x, batch)?;
        let mut out = vec![0; batch];
        argmax_rows(&y, self.cfg.n_classes, &mut out);
        Ok(out)
    }

    /// Inference accuracy on a data set (hard routing for trees), through the layer's kernel.
    pub fn accuracy(&self, data: &Dataset) -> Result<f32> {
        check_dim("data set", "features", self.cfg.in_features, data.dim)?;
        if data.is_empty() {
            return Err(Error::Invalid("cannot evaluate on an empty data set".into()));
        }
        const CHUNK: usize = 1024;
        let (kernel, mut ws, c) = (self.kernel()?, Workspace::new(), self.cfg.n_classes);
        let mut y = vec![0.0; CHUNK * c];
        let mut pred = vec![0u32; CHUNK];
        let mut correct = 0usize;
        for start in (0..data.len()).step_by(CHUNK) {
            let n = (start + CHUNK).min(data.len()) - start;
            kernel.forward(&data.x[start * data.dim..(start + n) * data.dim], n, &mut y[..n * c], &mut ws)?;
            argmax_rows(&y[..n * c], c, &mut pred[..n]);
            correct += pred[..n].iter().zip(&data.y[start..start + n]).filter(|(p, y)| p == y).count();
        }
        Ok(correct as f32 / data.len() as f32)
    }
}
