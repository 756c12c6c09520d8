//! Gated FFN inference (see `layers::glu`): the fused gate/value product, the gate, the output
//! product; batch 1 as two matrix-vector products over the transposed weights.

use super::dense::{gemv, transposed};
use super::{check_io, InferKernel, Workspace};
use crate::core::gemm::{matmul_bias, MatMut, MatRef};
use crate::core::Activation;
use crate::error::Result;
use crate::layers::glu::gate;
use crate::layers::Linear;

/// Inference copy of a [`crate::layers::Glu`]: weights transposed to `in × 2h` and `h × out`.
pub struct GluKernel {
    w13t: Vec<f32>,
    b13: Vec<f32>,
    w2t: Vec<f32>,
    b2: Vec<f32>,
    in_features: usize,
    width: usize,
    out_features: usize,
    activation: Activation,
}

impl GluKernel {
    /// From the layer's fused gate/value map (`2h × in`) and output map (`out × h`).
    pub fn new(fc13: &Linear, fc2: &Linear, activation: Activation) -> Self {
        GluKernel {
            w13t: transposed(fc13),
            b13: fc13.bias.value.clone(),
            w2t: transposed(fc2),
            b2: fc2.bias.value.clone(),
            in_features: fc13.in_features(),
            width: fc2.in_features(),
            out_features: fc2.out_features(),
            activation,
        }
    }
}

impl InferKernel for GluKernel {
    fn kind(&self) -> &'static str {
        "glu"
    }

    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }

    fn forward(&self, x: &[f32], batch: usize, y: &mut [f32], ws: &mut Workspace) -> Result<()> {
        check_io(self, x, batch, y)?;
        let (ni, h, no) = (self.in_features, self.width, self.out_features);
        let ([z, hidden, _, _], _) = ws.take([batch * 2 * h, batch * h, 0, 0], [0; 4]);
        if batch == 1 {
            gemv(&self.w13t, &self.b13, x, z);
        } else {
            matmul_bias(MatMut::new(z, batch, 2 * h), MatRef::new(x, batch, ni), MatRef::new(&self.w13t, ni, 2 * h), &self.b13);
        }
        gate(self.activation, z, h, hidden);
        if batch == 1 {
            gemv(&self.w2t, &self.b2, hidden, y);
        } else {
            matmul_bias(MatMut::new(y, batch, no), MatRef::new(hidden, batch, h), MatRef::new(&self.w2t, h, no), &self.b2);
        }
        Ok(())
    }

    fn neurons_per_inference(&self) -> usize {
        2 * self.width
    }

    fn macs_per_sample(&self) -> usize {
        self.width * (2 * self.in_features + self.out_features)
    }
}
