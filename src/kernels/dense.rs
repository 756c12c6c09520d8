//! Dense baseline kernel: a chain of Linear maps with an activation between them.

use rayon::prelude::*;

use super::{check_io, InferKernel, Workspace};
use crate::core::gemm::{add_row_bias, dot, matmul, MatMut, MatRef};
use crate::core::Activation;
use crate::error::Result;
use crate::layers::Linear;

/// Rows per rayon task in the batch-1 GEMV.
const GEMV_ROWS: usize = 64;

/// Dense inference: GEMV at batch 1, GEMM above.
pub struct DenseKernel {
    /// `(weight out × in, bias out)` per Linear map.
    linears: Vec<(Vec<f32>, Vec<f32>, usize, usize)>,
    activation: Activation,
}

impl DenseKernel {
    /// From Linear maps (first to last) and the activation applied between them.
    pub fn new(linears: &[Linear], activation: Activation) -> Self {
        DenseKernel {
            linears: linears.iter().map(|l| (l.weight.value.clone(), l.bias.value.clone(), l.out_features(), l.in_features())).collect(),
            activation,
        }
    }

    fn max_width(&self) -> usize {
        self.linears.iter().map(|l| l.2).max().unwrap_or(0)
    }
}

/// `y = W·x + b` for one sample, rows split across threads when the matrix is large.
fn gemv(w: &[f32], b: &[f32], x: &[f32], y: &mut [f32]) {
    let n_in = x.len();
    let rows = |(c, yc): (usize, &mut [f32])| {
        for (r, yr) in yc.iter_mut().enumerate() {
            let j = c * GEMV_ROWS + r;
            *yr = dot(&w[j * n_in..(j + 1) * n_in], x) + b[j];
        }
    };
    if y.len() * n_in >= 1 << 16 {
        y.par_chunks_mut(GEMV_ROWS).enumerate().for_each(rows);
    } else {
        y.chunks_mut(GEMV_ROWS).enumerate().for_each(rows);
    }
}

impl InferKernel for DenseKernel {
    fn kind(&self) -> &'static str {
        "dense"
    }

    fn in_features(&self) -> usize {
        self.linears[0].3
    }

    fn out_features(&self) -> usize {
        self.linears[self.linears.len() - 1].2
    }

    fn forward(&self, x: &[f32], batch: usize, y: &mut [f32], ws: &mut Workspace) -> Result<()> {
        check_io(self, x, batch, y)?;
        let w = self.max_width();
        let ([a, b, _, _], _) = ws.take([batch * w, batch * w, 0, 0], [0; 4]);
        let last = self.linears.len() - 1;
        let mut input: &[f32] = x;
        let (mut cur, mut next) = (a, b);
        for (i, (wt, bias, o, n)) in self.linears.iter().enumerate() {
            let out: &mut [f32] = if i == last { &mut *y } else { &mut cur[..batch * o] };
            if batch == 1 {
                gemv(wt, bias, input, out);
            } else {
                out.fill(0.0);
                add_row_bias(out, bias);
                matmul(MatMut::new(out, batch, *o), MatRef::new(input, batch, *n), MatRef::new(wt, *o, *n).t(), true);
            }
            if i == last {
                break;
            }
            let act = self.activation;
            out.iter_mut().for_each(|v| *v = act.apply(*v));
            std::mem::swap(&mut cur, &mut next);
            input = &next[..batch * o];
        }
        Ok(())
    }

    fn neurons_per_inference(&self) -> usize {
        self.linears[..self.linears.len() - 1].iter().map(|l| l.2).sum()
    }

    fn macs_per_sample(&self) -> usize {
        self.linears.iter().map(|l| l.2 * l.3).sum()
    }
}
