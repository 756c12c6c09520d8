//! Dense feedforward block: `layers` Linear maps with an activation between them.
//! `layers = 2` is the classic FFN (Linear → act → Linear); `layers = 3` is the three-layer
//! variant of "Attention Is Not All You Need: The Importance of Feedforward Networks in
//! Transformer Models" (Linear → act → Linear → act → Linear). Every hidden layer has `width` units.

use serde::{Deserialize, Serialize};

use super::{ensure_len, Compile, Input, Layer, LayerConfig, Linear, Trainable};
use crate::core::{Activation, Param, Rng};
use crate::error::{check_matrix, Error, Result};
use crate::kernels::{DenseKernel, InferKernel, Precision};

/// Configuration of [`Dense`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DenseConfig {
    /// Hidden units per hidden layer.
    pub width: usize,
    /// Number of Linear maps (2 or more); 2 = one hidden layer.
    pub layers: usize,
    /// Hidden nonlinearity.
    pub activation: Activation,
}

impl Default for DenseConfig {
    fn default() -> Self {
        // w = 128 is the width of the FFF paper's Table 1 comparison.
        DenseConfig { width: 128, layers: 2, activation: Activation::Relu }
    }
}

/// A dense multi-layer perceptron block. Parameters: `fc1.weight`, `fc1.bias`, `fc2.weight`, …
#[derive(Clone, Debug)]
pub struct Dense {
    cfg: DenseConfig,
    linears: Vec<Linear>,
    /// Pre-activations of each hidden layer, `batch × width` each.
    pre: Vec<Vec<f32>>,
    /// Activations of each hidden layer, `batch × width` each.
    act: Vec<Vec<f32>>,
    /// Two gradient buffers of `batch × width`, swapped while walking back.
    grad_a: Vec<f32>,
    grad_b: Vec<f32>,
}

impl Dense {
    /// A new block `in_features → width (→ width …) → out_features`.
    pub fn new(cfg: DenseConfig, in_features: usize, out_features: usize, rng: &mut Rng) -> Result<Self> {
        if cfg.layers < 2 {
            return Err(Error::Config(format!("dense.layers must be at least 2, got {}", cfg.layers)));
        }
        if cfg.width == 0 {
            return Err(Error::Config("dense.width must be positive".into()));
        }
        let mut linears = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let fan_in = if i == 0 { in_features } else { cfg.width };
            let fan_out = if i + 1 == cfg.layers { out_features } else { cfg.width };
            linears.push(Linear::new(&format!("fc{}", i + 1), fan_in, fan_out, rng));
        }
        let hidden = cfg.layers - 1;
        Ok(Dense { cfg, linears, pre: vec![Vec::new(); hidden], act: vec![Vec::new(); hidden], grad_a: Vec::new(), grad_b: Vec::new() })
    }

    /// The Linear maps, first to last.
    pub fn linears(&self) -> &[Linear] {
        &self.linears
    }
}

impl Layer for Dense {
    fn kind(&self) -> &'static str {
        "dense"
    }

    fn in_features(&self) -> usize {
        self.linears[0].in_features()
    }

    fn out_features(&self) -> usize {
        self.linears[self.linears.len() - 1].out_features()
    }

    fn config(&self) -> LayerConfig {
        LayerConfig::Dense(self.cfg.clone())
    }
}

impl Trainable for Dense {
    fn forward_train(&mut self, input: Input<'_>, y: &mut [f32], _rng: &mut Rng) -> Result<()> {
        let (x, batch) = (input.x, input.batch);
        check_matrix("dense input x", x.len(), batch, self.in_features())?;
        check_matrix("dense output y", y.len(), batch, self.out_features())?;
        let w = self.cfg.width;
        for h in 0..self.pre.len() {
            ensure_len(&mut self.pre[h], batch * w);
            ensure_len(&mut self.act[h], batch * w);
            let input: &[f32] = if h == 0 { x } else { &self.act[h - 1] };
            self.linears[h].forward(input, batch, &mut self.pre[h]);
            let _s = crate::core::profile::span("ffn activation");
            let (pre, act) = (&self.pre[h][..batch * w], &mut self.act[h][..batch * w]);
            self.cfg.activation.forward(pre, act);
        }
        let last = self.linears.len() - 1;
        self.linears[last].forward(&self.act[last - 1], batch, y);
        Ok(())
    }

    fn backward(&mut self, input: Input<'_>, dy: &[f32], mut dx: Option<&mut [f32]>) -> Result<()> {
        let (x, batch) = (input.x, input.batch);
        check_matrix("dense input x", x.len(), batch, self.in_features())?;
        check_matrix("dense output gradient dy", dy.len(), batch, self.out_features())?;
        if let Some(dx) = dx.as_deref() {
            check_matrix("dense input gradient dx", dx.len(), batch, self.in_features())?;
        }
        let w = self.cfg.width;
        ensure_len(&mut self.grad_a, batch * w);
        ensure_len(&mut self.grad_b, batch * w);
        let last = self.linears.len() - 1;
        for i in (0..=last).rev() {
            let input: &[f32] = if i == 0 { x } else { &self.act[i - 1] };
            let upstream: &[f32] = if i == last { dy } else { &self.grad_a };
            if i == 0 {
                self.linears[0].backward(input, batch, upstream, dx.as_deref_mut(), false);
            } else {
                self.linears[i].backward(input, batch, upstream, Some(&mut self.grad_b[..batch * w]), false);
                let _s = crate::core::profile::span("ffn activation");
                self.cfg.activation.backward_inplace(&self.pre[i - 1][..batch * w], &mut self.grad_b[..batch * w]);
                std::mem::swap(&mut self.grad_a, &mut self.grad_b);
            }
        }
        Ok(())
    }

    fn params(&self) -> Vec<&Param> {
        self.linears.iter().flat_map(|l| [&l.weight, &l.bias]).collect()
    }

    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        for l in &mut self.linears {
            f(&mut l.weight);
            f(&mut l.bias);
        }
    }
}

impl Compile for Dense {
    fn kernel(&self) -> Box<dyn InferKernel> {
        Box::new(DenseKernel::new(&self.linears, self.cfg.activation))
    }

    fn stored_kernel(&self, precision: Precision) -> Option<Result<Box<dyn InferKernel>>> {
        Some(DenseKernel::with_precision(&self.linears, self.cfg.activation, precision).map(|k| Box::new(k) as Box<dyn InferKernel>))
    }

    fn neurons_per_inference(&self) -> usize {
        self.cfg.width * (self.cfg.layers - 1)
    }
}
