//! Dense baseline kernel: a chain of Linear maps with an activation between them.

use rayon::prelude::*;

use super::{check_io, InferKernel, Workspace};
use crate::core::gemm::{axpy, matmul_bias, MatMut, MatRef};
use crate::core::quant::{QFormat, QMatrix};
use crate::core::simd::axpy4;
use crate::core::Activation;
use crate::error::Result;
use crate::layers::Linear;

/// Output columns per rayon task in the batch-1 GEMV.
const GEMV_COLS: usize = 512;

/// Dense inference: GEMV at batch 1, GEMM above. Weights are stored transposed (`in × out`),
/// the layout in which the GEMM reads both operands row-major (measured ~1.5x faster than
/// multiplying by a transposed view) and the batch-1 GEMV streams rows. Quantized weights
/// ([`DenseKernel::quantized`]) stay `out × in` in blocks along `in`, and every map quantizes
/// its input rows to 8 bits before the integer products.
pub struct DenseKernel {
    /// `(weights, bias out, out, in)` per Linear map.
    linears: Vec<(Weights, Vec<f32>, usize, usize)>,
    activation: Activation,
}

/// One map's weights.
enum Weights {
    /// `weightᵀ`, `in × out`.
    F32(Vec<f32>),
    /// `weight`, `out × in`, block-quantized.
    Quant(QMatrix),
}

impl DenseKernel {
    /// From Linear maps (first to last) and the activation applied between them.
    pub fn new(linears: &[Linear], activation: Activation) -> Self {
        let linears = linears.iter().map(|l| (Weights::F32(transposed(l)), l.bias.value.clone(), l.out_features(), l.in_features())).collect();
        DenseKernel { linears, activation }
    }

    /// From Linear maps with their weights block-quantized to `format` (biases stay f32; a
    /// map whose input is too narrow to quantize, [`crate::core::quant::worth_quantizing`],
    /// stays f32).
    pub fn quantized(linears: &[Linear], activation: Activation, format: QFormat) -> Result<Self> {
        let linears = linears
            .iter()
            .map(|l| {
                let w = if crate::core::quant::worth_quantizing(l.in_features()) {
                    Weights::Quant(QMatrix::from_f32(format, &l.weight.value, l.out_features(), l.in_features())?)
                } else {
                    Weights::F32(transposed(l))
                };
                Ok((w, l.bias.value.clone(), l.out_features(), l.in_features()))
            })
            .collect::<Result<_>>()?;
        Ok(DenseKernel { linears, activation })
    }

    fn max_width(&self) -> usize {
        self.linears.iter().map(|l| l.2).max().unwrap_or(0)
    }
}

/// A linear map's weight (`out × in`) transposed to `in × out`, the layout the kernels'
/// products and matrix-vector paths read.
pub(crate) fn transposed(l: &Linear) -> Vec<f32> {
    transpose(&l.weight.value, l.out_features(), l.in_features())
}

/// A row-major `rows × cols` matrix transposed to `cols × rows`.
pub(crate) fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = m[i * cols + j];
        }
    }
    t
}

/// `y = Wᵀᵀ·x + b` for one sample from `wt` (`in × out`): `y = b + Σ_i x_i · wt[i, :]`, the
/// output columns split across threads when the matrix is large.
pub(crate) fn gemv(wt: &[f32], b: &[f32], x: &[f32], y: &mut [f32]) {
    let o = y.len();
    let cols = |(c, yc): (usize, &mut [f32])| {
        let c0 = c * GEMV_COLS;
        let w = yc.len();
        yc.copy_from_slice(&b[c0..c0 + w]);
        let row = |i: usize| &wt[i * o + c0..i * o + c0 + w];
        let quads = x.len() / 4 * 4;
        for i in (0..quads).step_by(4) {
            axpy4([x[i], x[i + 1], x[i + 2], x[i + 3]], [row(i), row(i + 1), row(i + 2), row(i + 3)], yc);
        }
        for (i, &xi) in x.iter().enumerate().skip(quads) {
            axpy(xi, row(i), yc);
        }
    };
    if o * x.len() >= 1 << 16 {
        y.par_chunks_mut(GEMV_COLS).enumerate().for_each(cols);
    } else {
        y.chunks_mut(GEMV_COLS).enumerate().for_each(cols);
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
        let mut q = std::mem::take(&mut ws.q);
        let ([a, b, _, _], _) = ws.take([batch * w, batch * w, 0, 0], [0; 4]);
        let last = self.linears.len() - 1;
        let mut input: &[f32] = x;
        let (mut cur, mut next) = (a, b);
        for (i, (wt, bias, o, n)) in self.linears.iter().enumerate() {
            let out: &mut [f32] = if i == last { &mut *y } else { &mut cur[..batch * o] };
            match wt {
                Weights::F32(wt) if batch == 1 => gemv(wt, bias, input, out),
                Weights::F32(wt) => matmul_bias(MatMut::new(out, batch, *o), MatRef::new(input, batch, *n), MatRef::new(wt, *n, *o), bias),
                Weights::Quant(m) => {
                    q.quantize(input, batch, *n);
                    m.matmul(&q, batch, Some(bias), out);
                }
            }
            if i == last {
                break;
            }
            self.activation.apply_inplace(out);
            std::mem::swap(&mut cur, &mut next);
            input = &next[..batch * o];
        }
        ws.q = q;
        Ok(())
    }

    fn neurons_per_inference(&self) -> usize {
        self.linears[..self.linears.len() - 1].iter().map(|l| l.2).sum()
    }

    fn macs_per_sample(&self) -> usize {
        self.linears.iter().map(|l| l.2 * l.3).sum()
    }
}
