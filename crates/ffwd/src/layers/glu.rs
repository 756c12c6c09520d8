//! Gated FFN (GLU family; Shazeer 2020, "GLU Variants Improve Transformer"):
//! `y = W2 · (act(W1 x) ⊙ (W3 x)) + b2`; SwiGLU with SiLU, GEGLU with (exact) GELU, ReGLU with
//! ReLU. W1 and W3 are one fused product (`fc13`, `2h × in`: rows `0..h` are W1, `h..2h` W3),
//! so the training and inference forward make two products, as a dense FFN does.
//!
//! Widths follow the papers: at a dense FFN's parameter count `h = ⅔ · 4d` (three matrices
//! instead of two). Unlike LLaMA's, the maps carry biases (as ffwd's dense layers do; they
//! start at PyTorch's uniform init).
//!
//! Parameters: `fc13.weight` (2h × in), `fc13.bias` (2h), `fc2.weight` (out × h), `fc2.bias`.

use serde::{Deserialize, Serialize};

use super::{ensure_len, Compile, Input, Layer, LayerConfig, Linear, Trainable};
use crate::core::{Activation, Param, Rng};
use crate::error::{check_matrix, Error, Result};
use crate::kernels::{GluKernel, InferKernel};

/// Configuration of [`Glu`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GluConfig {
    /// Hidden units h (the gate and the value each have h).
    pub width: usize,
    /// Gate nonlinearity: `silu` (SwiGLU), `gelu` (GEGLU) or `relu` (ReGLU).
    pub activation: Activation,
}

impl Default for GluConfig {
    fn default() -> Self {
        // ⅔ of the digits classifier's dense width 128, rounded: about its parameter count
        GluConfig { width: 88, activation: Activation::Silu }
    }
}

impl GluConfig {
    /// The variant's name: `swiglu`, `geglu` or `reglu`.
    pub fn variant(&self) -> &'static str {
        match self.activation {
            Activation::Silu => "swiglu",
            Activation::Gelu => "geglu",
            Activation::Relu => "reglu",
        }
    }
}

/// A gated feedforward layer.
#[derive(Clone, Debug)]
pub struct Glu {
    cfg: GluConfig,
    fc13: Linear,
    fc2: Linear,
    /// `[W1 x | W3 x]` of the last training forward, `batch × 2h`.
    z: Vec<f32>,
    /// `act(W1 x) ⊙ W3 x`, `batch × h`.
    hidden: Vec<f32>,
    /// dL/dhidden, `batch × h`.
    dhidden: Vec<f32>,
    /// dL/dz, `batch × 2h`.
    dz: Vec<f32>,
    last_batch: usize,
}

impl Glu {
    /// A new layer `in_features → h → out_features`.
    pub fn new(cfg: GluConfig, in_features: usize, out_features: usize, rng: &mut Rng) -> Result<Self> {
        if cfg.width == 0 {
            return Err(Error::Config("glu.width must be positive".into()));
        }
        let fc13 = Linear::new("fc13", in_features, 2 * cfg.width, rng);
        let fc2 = Linear::new("fc2", cfg.width, out_features, rng);
        Ok(Glu { cfg, fc13, fc2, z: Vec::new(), hidden: Vec::new(), dhidden: Vec::new(), dz: Vec::new(), last_batch: 0 })
    }

    /// The configuration.
    pub fn cfg(&self) -> &GluConfig {
        &self.cfg
    }

    /// The fused gate/value map (`2h × in`) and the output map (`out × h`).
    pub fn linears(&self) -> [&Linear; 2] {
        [&self.fc13, &self.fc2]
    }
}

/// `hidden[b, j] = act(z[b, j]) · z[b, h + j]` for every row of `z` (`rows × 2h`).
pub(crate) fn gate(act: Activation, z: &[f32], h: usize, hidden: &mut [f32]) {
    for (zr, hr) in z.chunks_exact(2 * h).zip(hidden.chunks_exact_mut(h)) {
        let (z1, z3) = zr.split_at(h);
        for ((o, &a), &g) in hr.iter_mut().zip(z1).zip(z3) {
            *o = act.apply(a) * g;
        }
    }
}

impl Layer for Glu {
    fn kind(&self) -> &'static str {
        "glu"
    }

    fn in_features(&self) -> usize {
        self.fc13.in_features()
    }

    fn out_features(&self) -> usize {
        self.fc2.out_features()
    }

    fn config(&self) -> LayerConfig {
        LayerConfig::Glu(self.cfg.clone())
    }
}

impl Trainable for Glu {
    fn forward_train(&mut self, input: Input<'_>, y: &mut [f32], _rng: &mut Rng) -> Result<()> {
        let (x, batch) = (input.x, input.batch);
        let (ni, no, h) = (self.in_features(), self.out_features(), self.cfg.width);
        check_matrix("glu input x", x.len(), batch, ni)?;
        check_matrix("glu output y", y.len(), batch, no)?;
        ensure_len(&mut self.z, batch * 2 * h);
        ensure_len(&mut self.hidden, batch * h);
        self.fc13.forward(x, batch, &mut self.z);
        gate(self.cfg.activation, &self.z[..batch * 2 * h], h, &mut self.hidden[..batch * h]);
        self.fc2.forward(&self.hidden[..batch * h], batch, y);
        self.last_batch = batch;
        Ok(())
    }

    fn backward(&mut self, input: Input<'_>, dy: &[f32], dx: Option<&mut [f32]>) -> Result<()> {
        let (x, batch) = (input.x, input.batch);
        let (ni, no, h) = (self.in_features(), self.out_features(), self.cfg.width);
        check_matrix("glu input x", x.len(), batch, ni)?;
        check_matrix("glu output gradient dy", dy.len(), batch, no)?;
        if batch != self.last_batch {
            return Err(Error::Invalid(format!("glu backward: batch {batch} differs from the last forward's {}", self.last_batch)));
        }
        if let Some(dx) = dx.as_deref() {
            check_matrix("glu input gradient dx", dx.len(), batch, ni)?;
        }
        ensure_len(&mut self.dhidden, batch * h);
        ensure_len(&mut self.dz, batch * 2 * h);
        self.fc2.backward(&self.hidden[..batch * h], batch, dy, Some(&mut self.dhidden[..batch * h]), false);
        let act = self.cfg.activation;
        for ((zr, dzr), dh) in self.z[..batch * 2 * h].chunks_exact(2 * h).zip(self.dz.chunks_exact_mut(2 * h)).zip(self.dhidden.chunks_exact(h)) {
            let (z1, z3) = zr.split_at(h);
            let (d1, d3) = dzr.split_at_mut(h);
            for j in 0..h {
                // d/dz1 = dh · g · act'(z1), d/dz3 = dh · act(z1)
                d1[j] = dh[j] * z3[j] * act.derivative(z1[j]);
                d3[j] = dh[j] * act.apply(z1[j]);
            }
        }
        self.fc13.backward(x, batch, &self.dz[..batch * 2 * h], dx, false);
        Ok(())
    }

    fn params(&self) -> Vec<&Param> {
        vec![&self.fc13.weight, &self.fc13.bias, &self.fc2.weight, &self.fc2.bias]
    }

    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        f(&mut self.fc13.weight);
        f(&mut self.fc13.bias);
        f(&mut self.fc2.weight);
        f(&mut self.fc2.bias);
    }
}

impl Compile for Glu {
    fn kernel(&self) -> Box<dyn InferKernel> {
        Box::new(GluKernel::new(&self.fc13, &self.fc2, self.cfg.activation))
    }

    fn neurons_per_inference(&self) -> usize {
        2 * self.cfg.width
    }
}
