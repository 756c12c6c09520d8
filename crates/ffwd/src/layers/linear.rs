//! `y = x Wᵀ + b`, the building block of the dense layers. `weight` is `out × in`
//! (PyTorch's layout), `bias` is `out`.

use crate::core::gemm::{add_sum_rows, matmul, matmul_bias, MatMut, MatRef};
use crate::core::{Param, Rng};

/// A fully connected map with PyTorch's layout and initialisation (uniform ±1/√in).
#[derive(Clone, Debug)]
pub struct Linear {
    /// `out × in`.
    pub weight: Param,
    /// `out`.
    pub bias: Param,
}

impl Linear {
    /// A new layer whose parameters are named `{prefix}.weight` and `{prefix}.bias`.
    pub fn new(prefix: &str, in_features: usize, out_features: usize, rng: &mut Rng) -> Self {
        let bound = 1.0 / (in_features as f32).sqrt();
        Linear {
            weight: Param::uniform(&format!("{prefix}.weight"), &[out_features, in_features], bound, true, rng),
            bias: Param::uniform(&format!("{prefix}.bias"), &[out_features], bound, false, rng),
        }
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.weight.shape[1]
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.weight.shape[0]
    }

    /// `x`: `batch × in` → `y`: `batch × out`. Sizes are the caller's responsibility.
    pub fn forward(&self, x: &[f32], batch: usize, y: &mut [f32]) {
        let (i, o) = (self.in_features(), self.out_features());
        let y = &mut y[..batch * o];
        let _s = crate::core::profile::span("linear fwd");
        matmul_bias(MatMut::new(y, batch, o), MatRef::new(x, batch, i), MatRef::new(&self.weight.value, o, i).t(), &self.bias.value);
    }

    /// Adds dW = dyᵀx and db = Σ dy into the gradients; writes (or adds, with
    /// `accumulate_dx`) dx = dy W.
    pub fn backward(&mut self, x: &[f32], batch: usize, dy: &[f32], dx: Option<&mut [f32]>, accumulate_dx: bool) {
        let (i, o) = (self.in_features(), self.out_features());
        let dy = &dy[..batch * o];
        let s = crate::core::profile::span("linear bwd dW");
        matmul(MatMut::new(&mut self.weight.grad, o, i), MatRef::new(dy, batch, o).t(), MatRef::new(x, batch, i), true);
        drop(s);
        let s = crate::core::profile::span("linear bwd db");
        add_sum_rows(dy, o, &mut self.bias.grad);
        drop(s);
        let _s = crate::core::profile::span("linear bwd dx");
        if let Some(dx) = dx {
            matmul(MatMut::new(dx, batch, i), MatRef::new(dy, batch, o), MatRef::new(&self.weight.value, o, i), accumulate_dx);
        }
    }
}
