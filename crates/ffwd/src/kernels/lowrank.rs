//! Low-rank FFN inference (see `layers::lowrank`): four thin products over weights stored
//! transposed (`in × r`, `r × out`), the layout the products read row-major.

use super::{check_io, InferKernel, Workspace};
use crate::core::gemm::{matmul, matmul_bias, MatMut, MatRef};
use crate::core::{Activation, Param};
use crate::error::Result;
use crate::layers::lowrank::Factored;

/// A matrix parameter transposed.
fn transpose(p: &Param) -> Vec<f32> {
    super::dense::transpose(&p.value, p.shape[0], p.shape[1])
}

/// One factored map: `Vᵀ` (`in × r`), `Uᵀ` (`r × out`), bias.
struct Map {
    vt: Vec<f32>,
    ut: Vec<f32>,
    bias: Vec<f32>,
    dims: (usize, usize, usize),
}

impl Map {
    fn new(f: &Factored) -> Self {
        let dims = (f.v.shape[1], f.v.shape[0], f.u.shape[0]);
        Map { vt: transpose(&f.v), ut: transpose(&f.u), bias: f.bias.value.clone(), dims }
    }

    fn forward(&self, x: &[f32], batch: usize, t: &mut [f32], y: &mut [f32]) {
        let (i, r, o) = self.dims;
        matmul(MatMut::new(&mut t[..batch * r], batch, r), MatRef::new(x, batch, i), MatRef::new(&self.vt, i, r), false);
        matmul_bias(MatMut::new(&mut y[..batch * o], batch, o), MatRef::new(&t[..batch * r], batch, r), MatRef::new(&self.ut, r, o), &self.bias);
    }
}

/// Inference copy of a [`crate::layers::LowRank`].
pub struct LowRankKernel {
    fc1: Map,
    fc2: Map,
    activation: Activation,
}

impl LowRankKernel {
    /// From the layer's two factored maps.
    pub fn new(fc1: &Factored, fc2: &Factored, activation: Activation) -> Self {
        LowRankKernel { fc1: Map::new(fc1), fc2: Map::new(fc2), activation }
    }
}

impl InferKernel for LowRankKernel {
    fn kind(&self) -> &'static str {
        "lowrank"
    }

    fn in_features(&self) -> usize {
        self.fc1.dims.0
    }

    fn out_features(&self) -> usize {
        self.fc2.dims.2
    }

    fn forward(&self, x: &[f32], batch: usize, y: &mut [f32], ws: &mut Workspace) -> Result<()> {
        check_io(self, x, batch, y)?;
        let (h, r) = (self.fc1.dims.2, self.fc1.dims.1.max(self.fc2.dims.1));
        let ([t, a, _, _], _) = ws.take([batch * r, batch * h, 0, 0], [0; 4]);
        self.fc1.forward(x, batch, t, a);
        self.activation.apply_inplace(a);
        self.fc2.forward(a, batch, t, y);
        Ok(())
    }

    fn neurons_per_inference(&self) -> usize {
        self.fc1.dims.2
    }

    fn macs_per_sample(&self) -> usize {
        let m = |d: (usize, usize, usize)| d.1 * (d.0 + d.2);
        m(self.fc1.dims) + m(self.fc2.dims)
    }
}
