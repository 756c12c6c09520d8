//! Dense baseline kernel: a chain of Linear maps with an activation between them.

use rayon::prelude::*;

use super::{check_io, InferKernel, Precision, Workspace};
use crate::core::bf16::{to_bf16_paired, weighted_row_sum_bf16, widen_paired_row, Bf16};
use crate::core::gemm::{axpy, matmul_bias, matmul_packed, pack_bf16, MatMut, MatRef};
use crate::core::quant::QMatrix;
use crate::core::simd::axpy4;
use crate::core::Activation;
use crate::error::Result;
use crate::layers::Linear;

/// Output columns per rayon task in the batch-1 GEMV.
const GEMV_COLS: usize = 512;

/// Dense inference: GEMV at batch 1, GEMM above. Weights are stored transposed (`in × out`),
/// the layout in which the GEMM reads both operands row-major (measured ~1.5x faster than
/// multiplying by a transposed view) and the batch-1 GEMV streams rows. Quantized weights
/// ([`DenseKernel::with_precision`]) stay `out × in` in blocks along `in`, and every map
/// quantizes its input rows to 8 bits before the integer products. bf16 weights are kept
/// twice (together the bytes of the f32 weights): as `in × out` column blocks that a GEMV
/// streams once per call (batch 1 and 2: half the bytes of f32 cross memory, which bounds
/// batch 1), and packed once into the bf16 pair panels of the AVX512_BF16 micro-kernel, which
/// larger batches multiply against (`vdpbf16ps`, activations rounded to bf16 while packed,
/// f32 accumulation). Without AVX512_BF16 only the blocks exist: up to 48 rows stream them,
/// more widen them to f32 per call for the f32 products.
pub struct DenseKernel {
    /// `(weights, bias out, out, in)` per Linear map.
    linears: Vec<(Weights, Vec<f32>, usize, usize)>,
    activation: Activation,
    /// `0, 1, …, in − 1` of the widest map (the row list of the bf16 GEMV).
    iota: Vec<usize>,
}

/// One map's weights.
enum Weights {
    /// `weightᵀ`, `in × out`.
    F32(Vec<f32>),
    /// `weight`, `out × in`, block-quantized.
    Quant(QMatrix),
    /// `weightᵀ`, `in × out`, rounded to bf16, in column blocks; and packed for the bf16
    /// products where the CPU has them.
    Bf16(Bf16Blocks, Option<crate::core::sgemm::PackedBf16>),
}

/// Batches up to this many rows read bf16 weights in place ([`gemv_bf16`]) on CPUs with
/// AVX512_BF16; larger ones run the bf16 products on the pre-packed weights (768-4095-768 at
/// batch 1: 259 µs in place, 601 µs packed; at batch 16: 3.3 ms in place, 1.3 ms packed).
const BF16_GEMV_ROWS: usize = 2;

/// Without AVX512_BF16, batches up to this many rows read bf16 weights in place; larger ones
/// widen them to f32 per call and run the f32 products.
const BF16_ROWS: usize = 48;

impl DenseKernel {
    /// From Linear maps (first to last) and the activation applied between them.
    pub fn new(linears: &[Linear], activation: Activation) -> Self {
        let linears = linears.iter().map(|l| (Weights::F32(transposed(l)), l.bias.value.clone(), l.out_features(), l.in_features())).collect();
        DenseKernel { linears, activation, iota: Vec::new() }
    }

    /// From Linear maps with their weights stored in `precision` (biases stay f32): bf16, or
    /// blocks of Q8_0/Q4_0 (a map whose input is too narrow to quantize,
    /// [`crate::core::quant::worth_quantizing`], stays f32).
    pub fn with_precision(linears: &[Linear], activation: Activation, precision: Precision) -> Result<Self> {
        let linears: Vec<(Weights, Vec<f32>, usize, usize)> = linears
            .iter()
            .map(|l| {
                let w = match precision.quant() {
                    Some(format) if crate::core::quant::worth_quantizing(l.in_features()) => {
                        Weights::Quant(QMatrix::from_f32(format, &l.weight.value, l.out_features(), l.in_features())?)
                    }
                    None if precision == Precision::Bf16 => {
                        let wt = transposed(l);
                        let packed = pack_bf16(MatRef::new(&wt, l.in_features(), l.out_features()));
                        Weights::Bf16(Bf16Blocks::new(&wt, l.in_features(), l.out_features()), packed)
                    }
                    _ => Weights::F32(transposed(l)),
                };
                Ok((w, l.bias.value.clone(), l.out_features(), l.in_features()))
            })
            .collect::<Result<_>>()?;
        let iota = (0..linears.iter().map(|l| l.3).max().unwrap_or(0)).collect();
        Ok(DenseKernel { linears, activation, iota })
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

/// `weightᵀ` (`in × out`) in bf16, in column blocks of [`BF16_BLOCK`] (the last narrower):
/// block `j` holds columns `j·BF16_BLOCK..` of every row, `in × width` row-major, each row in
/// the paired layout of [`crate::core::bf16::paired_index`], so that one block's GEMV keeps
/// its outputs in registers while it streams the block once.
struct Bf16Blocks {
    data: Vec<Bf16>,
    n: usize,
    o: usize,
}

/// Output columns per bf16 block (a multiple of the kernels' 64-column strips).
const BF16_BLOCK: usize = 128;

impl Bf16Blocks {
    /// From `wt`, `n × o` row-major.
    fn new(wt: &[f32], n: usize, o: usize) -> Self {
        let mut data = Vec::with_capacity(n * o);
        for c0 in (0..o).step_by(BF16_BLOCK) {
            let w = (o - c0).min(BF16_BLOCK);
            // (block j then starts at j·BF16_BLOCK·n: every earlier block is full)
            for i in 0..n {
                data.extend(to_bf16_paired(&wt[i * o + c0..i * o + c0 + w], w));
            }
        }
        Bf16Blocks { data, n, o }
    }

    /// Number of blocks.
    fn count(&self) -> usize {
        self.o.div_ceil(BF16_BLOCK)
    }

    /// `(first column, width, data)` of block `j`.
    fn block(&self, j: usize) -> (usize, usize, &[Bf16]) {
        let c0 = j * BF16_BLOCK;
        let w = (self.o - c0).min(BF16_BLOCK);
        (c0, w, &self.data[c0 * self.n..(c0 + w) * self.n])
    }

    /// The matrix widened to f32, `n × o` row-major, into `out` (threads over blocks).
    fn widen(&self, out: &mut [f32]) {
        let (n, o) = (self.n, self.o);
        assert!(out.len() >= n * o, "widen: output too short");
        let op = super::SyncPtr(out.as_mut_ptr());
        let block = |j: usize| {
            let (c0, w, data) = self.block(j);
            for (i, row) in data.chunks_exact(w).enumerate() {
                // SAFETY: the block owns columns c0..c0+w of every row of `out` (length checked).
                widen_paired_row(row, unsafe { op.slice(i * o + c0, w) });
            }
        };
        (0..self.count()).into_par_iter().for_each(block);
    }
}

/// `y = x·wt + b` for `batch` ≤ [`BF16_ROWS`] rows from bf16 blocks: threads over column
/// blocks, and per block every row's outputs accumulate in registers over all `in` weight
/// rows (`core::bf16::weighted_row_sum_bf16`), the block read from memory once per call.
fn gemv_bf16(wt: &Bf16Blocks, iota: &[usize], b: &[f32], x: &[f32], batch: usize, y: &mut [f32]) {
    let (n, o) = (wt.n, wt.o);
    let yp = super::SyncPtr(y.as_mut_ptr());
    let block = |j: usize| {
        let (c0, w, data) = wt.block(j);
        for r in 0..batch {
            // SAFETY: the block owns columns c0..c0+w of every row of y (`batch × o`).
            let yr = unsafe { yp.slice(r * o + c0, w) };
            yr.copy_from_slice(&b[c0..c0 + w]);
            weighted_row_sum_bf16(&x[r * n..(r + 1) * n], data, &iota[..n], yr, true);
        }
    };
    if batch * o * n >= 1 << 16 {
        (0..wt.count()).into_par_iter().for_each(block);
    } else {
        (0..wt.count()).for_each(block);
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
        let widened =
            if batch > BF16_ROWS { self.linears.iter().filter(|l| matches!(l.0, Weights::Bf16(_, None))).map(|l| l.2 * l.3).max().unwrap_or(0) } else { 0 };
        let ([a, b, wide, _], _) = ws.take([batch * w, batch * w, widened, 0], [0; 4]);
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
                Weights::Bf16(wt, packed) if batch <= BF16_GEMV_ROWS || (packed.is_none() && batch <= BF16_ROWS) => {
                    gemv_bf16(wt, &self.iota, bias, input, batch, out)
                }
                Weights::Bf16(_, Some(p)) => matmul_packed(MatMut::new(out, batch, *o), MatRef::new(input, batch, *n), p, Some(bias)),
                Weights::Bf16(wt, None) => {
                    let wide = &mut wide[..n * o];
                    wt.widen(wide);
                    matmul_bias(MatMut::new(out, batch, *o), MatRef::new(input, batch, *n), MatRef::new(wide, *n, *o), bias);
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
