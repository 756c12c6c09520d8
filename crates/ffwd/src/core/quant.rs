//! Block-quantized weights in ggml's Q8_0 and Q4_0 formats and the integer dot products the
//! quantized inference kernels run on.
//!
//! A block holds 32 consecutive values of a row and one scale `d` (an IEEE half):
//! * **Q8_0** (34 bytes): `d = amax / 127`, `q = round(x / d)` as 32 `i8`; value `q · d`.
//! * **Q4_0** (18 bytes): `d = m / −8` where `m` is the value of largest magnitude,
//!   `q = min(15, ⌊x / d + 8.5⌋)` as 32 nibbles (byte `j` holds value `j` in its low nibble and
//!   value `j + 16` in its high one); value `(q − 8) · d`.
//!
//! [`pack`] and [`unpack`] read and write these bytes exactly as ggml lays them out. A row
//! whose length is not a multiple of 32 is zero-padded to the next multiple (readers see the
//! padded width). Packing the unpacked values gives the same blocks back, so a kernel that
//! quantizes a loaded checkpoint's weights computes on exactly the stored blocks.
//!
//! The kernels ([`QMatrix`]) keep the blocks split into integer values and f32 scales and
//! multiply them with activations quantized on the fly to 8 bits per value with an f32 scale
//! per block ([`QAct`]): `Σ_b d_w,b · d_x,b · Σ_i q_w,i · q_x,i`, the inner sums in exact
//! integer arithmetic. Three code paths, chosen at run time like the f32 ones
//! (`FFWD_SIMD`): AVX-512 VNNI (`vpdpbusd`), AVX2 (`vpmaddubsw`) and portable code. They
//! compute the same 4-value partial sums into the same 16 f32 lanes in the same order, so
//! every path returns bit-identical results.

use half::f16;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Values per block.
pub const QK: usize = 32;

/// A block-quantized format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum QFormat {
    /// 8-bit values, one f16 scale per 32 (8.5 bits per weight).
    #[serde(rename = "q8_0")]
    Q8_0,
    /// 4-bit values, one f16 scale per 32 (4.5 bits per weight).
    #[serde(rename = "q4_0")]
    Q4_0,
}

impl QFormat {
    /// Name as on the command line and in metadata (`q8_0`, `q4_0`).
    pub fn name(self) -> &'static str {
        match self {
            QFormat::Q8_0 => "q8_0",
            QFormat::Q4_0 => "q4_0",
        }
    }

    /// Parses [`QFormat::name`].
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" | "q8" => Ok(QFormat::Q8_0),
            "q4_0" | "q4" => Ok(QFormat::Q4_0),
            _ => Err(Error::Invalid(format!("unknown quantization format `{s}` (expected q8_0 or q4_0)"))),
        }
    }

    /// Bytes of one block in ggml's layout.
    pub fn block_bytes(self) -> usize {
        match self {
            QFormat::Q8_0 => 2 + QK,
            QFormat::Q4_0 => 2 + QK / 2,
        }
    }

    /// Largest error of a dequantized value, relative to its block's largest magnitude:
    /// half a step for Q8_0 (steps of amax/127), one step for Q4_0 (steps of amax/8; the
    /// side opposite the largest value is clamped at 7 steps), plus the f16 rounding of the
    /// scale.
    pub fn error_bound(self) -> f32 {
        match self {
            QFormat::Q8_0 => 0.5 / 127.0 + 1e-3,
            QFormat::Q4_0 => 1.0 / 8.0 + 1e-3,
        }
    }
}

/// Row length after padding to whole blocks.
pub fn padded(cols: usize) -> usize {
    cols.div_ceil(QK).saturating_mul(QK)
}

/// Whether rows of `cols` values are quantized at all: at least one block, and padding to
/// whole blocks adds at most half (40 values would take 64). Both the checkpoint converter
/// and the kernels apply this rule, so a kernel computes on exactly the blocks a file stores
/// and keeps in f32 exactly the matrices the file keeps in f32.
pub fn worth_quantizing(cols: usize) -> bool {
    cols >= QK && padded(cols) * 2 <= cols * 3
}

/// Bytes of a `rows × cols` matrix in `format` (rows padded to whole blocks).
pub fn packed_len(format: QFormat, rows: usize, cols: usize) -> usize {
    rows.saturating_mul(padded(cols) / QK).saturating_mul(format.block_bytes())
}

/// One block of `x` (≤ 32 values, the rest taken as zero) in ggml's bytes.
fn pack_block(format: QFormat, x: &[f32], out: &mut [u8]) {
    let v = |i: usize| x.get(i).copied().unwrap_or(0.0);
    match format {
        QFormat::Q8_0 => {
            let amax = (0..QK).map(|i| v(i).abs()).fold(0.0f32, f32::max);
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            for i in 0..QK {
                out[2 + i] = ((v(i) * id).round() as i8) as u8;
            }
        }
        QFormat::Q4_0 => {
            let (mut amax, mut max) = (0.0f32, 0.0f32);
            for i in 0..QK {
                if amax < v(i).abs() {
                    (amax, max) = (v(i).abs(), v(i));
                }
            }
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            let q = |i: usize| ((v(i) * id + 8.5) as i8).clamp(0, 15) as u8;
            for j in 0..QK / 2 {
                out[2 + j] = q(j) | (q(j + QK / 2) << 4);
            }
        }
    }
}

/// One block's scale and its 32 integer values (Q4_0 values already minus 8).
fn unpack_block(format: QFormat, b: &[u8]) -> (f32, [i8; QK]) {
    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
    let mut q = [0i8; QK];
    match format {
        QFormat::Q8_0 => {
            for i in 0..QK {
                q[i] = b[2 + i] as i8;
            }
        }
        QFormat::Q4_0 => {
            for j in 0..QK / 2 {
                q[j] = (b[2 + j] & 0x0F) as i8 - 8;
                q[j + QK / 2] = (b[2 + j] >> 4) as i8 - 8;
            }
        }
    }
    (d, q)
}

/// A row-major `rows × cols` matrix in ggml blocks (each row padded to whole blocks).
pub fn pack(format: QFormat, values: &[f32], rows: usize, cols: usize) -> Result<Vec<u8>> {
    crate::error::check_matrix("quantized matrix", values.len(), rows, cols)?;
    let bb = format.block_bytes();
    let nb = padded(cols) / QK;
    let mut out = vec![0u8; rows * nb * bb];
    for (r, row) in values.chunks(cols.max(1)).enumerate().take(rows) {
        for b in 0..nb {
            let x = &row[b * QK..((b + 1) * QK).min(cols)];
            pack_block(format, x, &mut out[(r * nb + b) * bb..(r * nb + b + 1) * bb]);
        }
    }
    Ok(out)
}

/// The `rows × cols` values of ggml blocks written by [`pack`] (the padding dropped); an error
/// when `bytes` does not hold exactly that many blocks.
pub fn unpack(format: QFormat, bytes: &[u8], rows: usize, cols: usize) -> Result<Vec<f32>> {
    let want = rows.checked_mul(padded(cols) / QK).and_then(|n| n.checked_mul(format.block_bytes()));
    if want != Some(bytes.len()) {
        return Err(Error::Invalid(format!("{} matrix {rows} × {cols}: expected {want:?} bytes, got {}", format.name(), bytes.len())));
    }
    let (bb, nb) = (format.block_bytes(), padded(cols) / QK);
    let mut out = vec![0.0f32; rows * cols];
    for r in 0..rows {
        for b in 0..nb {
            let (d, q) = unpack_block(format, &bytes[(r * nb + b) * bb..(r * nb + b + 1) * bb]);
            for i in 0..QK.min(cols - b * QK) {
                out[r * cols + b * QK + i] = q[i] as f32 * d;
            }
        }
    }
    Ok(out)
}

/// Activations quantized to 8 bits with an f32 scale per block of 32 (`d = amax / 127`), the
/// right-hand side of the integer products; rows of `padded(cols)` values. Buffers only grow.
#[derive(Clone, Debug, Default)]
pub struct QAct {
    /// Values, `rows × padded(cols)`.
    pub q: Vec<i8>,
    /// Scale of every block, `rows × blocks`.
    pub d: Vec<f32>,
    /// Sum of every block's values (for the offset of Q4_0's unsigned nibbles).
    pub sum: Vec<i32>,
    /// Blocks per row.
    pub nb: usize,
}

impl QAct {
    /// Quantizes `rows` rows of `cols` values (`x`: `rows × cols`) into this buffer: per block
    /// `d = amax / 127`, `q = x · (1/d)` rounded to nearest even. Every SIMD path gives the
    /// same bytes.
    pub fn quantize(&mut self, x: &[f32], rows: usize, cols: usize) {
        let nb = padded(cols) / QK;
        self.nb = nb;
        grow(&mut self.q, rows * nb * QK);
        grow(&mut self.d, rows * nb);
        grow(&mut self.sum, rows * nb);
        for r in 0..rows {
            let row = &x[r * cols..(r + 1) * cols];
            for b in 0..nb {
                let v = &row[b * QK..((b + 1) * QK).min(cols)];
                let q = &mut self.q[(r * nb + b) * QK..(r * nb + b + 1) * QK];
                (self.d[r * nb + b], self.sum[r * nb + b]) = quantize_block(v, q);
            }
        }
    }

    /// Row `r`: values, scales, block sums.
    #[inline]
    pub fn row(&self, r: usize) -> (&[i8], &[f32], &[i32]) {
        let nb = self.nb;
        (&self.q[r * nb * QK..(r + 1) * nb * QK], &self.d[r * nb..(r + 1) * nb], &self.sum[r * nb..(r + 1) * nb])
    }
}

/// One block of activations (≤ 32 values, the rest zero) into `q`; returns its scale and sum.
#[inline]
fn quantize_block(v: &[f32], q: &mut [i8]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if crate::core::cpu::avx512() {
        // SAFETY: AVX-512F/BW are present; `v` has ≤ 32 values and `q` 32.
        return unsafe { x86::quantize_block_avx512(v, q) };
    }
    let amax = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut s = 0i32;
    for (i, qi) in q.iter_mut().enumerate() {
        // adding and subtracting 1.5·2²³ rounds to nearest even, as `vcvtps2dq` does
        *qi = v.get(i).map_or(0, |&x| ((x * id + ROUND) - ROUND) as i8);
        s += *qi as i32;
    }
    (d, s)
}

/// 1.5 · 2²³: `(x + ROUND) − ROUND` is `x` rounded to nearest even for `|x| < 2²²`.
const ROUND: f32 = 12_582_912.0;

fn grow<T: Default + Clone>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    }
}

/// A quantized `rows × cols` matrix as the kernels read it: per row, the integer values
/// (Q8_0: one `i8` each; Q4_0: the nibbles as ggml packs them, 16 bytes a block) and one f32
/// scale per block.
#[derive(Clone, Debug)]
pub struct QMatrix {
    format: QFormat,
    rows: usize,
    cols: usize,
    nb: usize,
    data: Vec<u8>,
    scales: Vec<f32>,
}

impl QMatrix {
    /// Quantizes a row-major `rows × cols` matrix.
    pub fn from_f32(format: QFormat, w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        Self::from_blocks(format, &pack(format, w, rows, cols)?, rows, cols)
    }

    /// From ggml blocks ([`pack`]'s layout).
    pub fn from_blocks(format: QFormat, bytes: &[u8], rows: usize, cols: usize) -> Result<Self> {
        let nb = padded(cols) / QK;
        if bytes.len() != packed_len(format, rows, cols) {
            return Err(Error::Invalid(format!(
                "{} matrix {rows} × {cols}: expected {} bytes, got {}",
                format.name(),
                packed_len(format, rows, cols),
                bytes.len()
            )));
        }
        let (bb, qb) = (format.block_bytes(), format.block_bytes() - 2);
        let mut data = vec![0u8; rows * nb * qb];
        let mut scales = vec![0.0f32; rows * nb];
        for (i, block) in bytes.chunks_exact(bb).enumerate() {
            scales[i] = f16::from_le_bytes([block[0], block[1]]).to_f32();
            data[i * qb..(i + 1) * qb].copy_from_slice(&block[2..]);
        }
        if format == QFormat::Q4_0 {
            for row in data.chunks_exact_mut(nb * qb) {
                let ggml = row.to_vec();
                for g in 0..nb / 4 {
                    for k in 0..4 {
                        let src = &ggml[(4 * g + k) * 16..(4 * g + k + 1) * 16];
                        for i in 0..QK {
                            let q = if i < 16 { src[i] & 0x0F } else { src[i - 16] >> 4 };
                            let byte = &mut row[g * 64 + (k % 2) * 32 + i];
                            *byte = if k < 2 { (*byte & 0xF0) | q } else { (*byte & 0x0F) | (q << 4) };
                        }
                    }
                }
            }
        }
        Ok(QMatrix { format, rows, cols, nb, data, scales })
    }

    /// The format.
    pub fn format(&self) -> QFormat {
        self.format
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (before padding).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of weights and scales the kernels stream.
    pub fn bytes(&self) -> usize {
        self.data.len() + 2 * self.scales.len()
    }

    /// Row `r`'s integer data. Q4_0 rows are re-laid out for the 512-bit kernels: each full
    /// group of four blocks is 64 bytes whose low nibbles hold blocks `4g`, `4g + 1` (value `j`
    /// of the pair in byte `j`) and whose high nibbles hold blocks `4g + 2`, `4g + 3`, so one
    /// load and one mask give two blocks in order; blocks after the last full group keep
    /// ggml's layout ([`q4_value`]).
    fn row_data(&self, r: usize) -> &[u8] {
        let qb = self.format.block_bytes() - 2;
        &self.data[r * self.nb * qb..(r + 1) * self.nb * qb]
    }

    /// `row r · x` for one quantized activation row (`x` from a [`QAct`] of `cols` columns).
    #[inline]
    pub fn dot(&self, r: usize, x: (&[i8], &[f32], &[i32])) -> f32 {
        let ws = &self.scales[r * self.nb..(r + 1) * self.nb];
        dot(self.format, crate::core::cpu::level(), self.row_data(r), ws, x)
    }

    /// Four `row rs[k] · xs[k]` at once (independent loads in flight); each bit-identical to
    /// [`QMatrix::dot`].
    #[inline]
    pub fn dot4(&self, rs: [usize; 4], xs: [(&[i8], &[f32], &[i32]); 4]) -> [f32; 4] {
        #[cfg(target_arch = "x86_64")]
        if crate::core::cpu::avx512() && vnni() {
            let nb = self.nb;
            let ws = rs.map(|r| &self.scales[r * nb..(r + 1) * nb]);
            let w = rs.map(|r| self.row_data(r));
            // SAFETY: AVX-512F/BW/VL + VNNI are present; every row and activation holds `nb` blocks.
            return unsafe {
                if xs[1..].iter().all(|x| std::ptr::eq(x.0, xs[0].0)) {
                    x86::dot4_avx512::<true>(self.format, w, ws, xs)
                } else {
                    x86::dot4_avx512::<false>(self.format, w, ws, xs)
                }
            };
        }
        std::array::from_fn(|k| self.dot(rs[k], xs[k]))
    }

    /// `y = Σ_l coef[l] · row rows[l]` (dequantized on the fly; `y` has `cols` values), one
    /// pass over `y`.
    pub fn weighted_row_sum(&self, coef: &[f32], rows: &[usize], y: &mut [f32]) {
        assert!(coef.len() == rows.len() && rows.iter().all(|&r| r < self.rows) && y.len() == self.cols, "weighted_row_sum: shapes");
        #[cfg(target_arch = "x86_64")]
        if crate::core::cpu::avx512() {
            // SAFETY: AVX-512F/BW are present; rows are in bounds (asserted) and `y` is one row.
            return unsafe { x86::weighted_row_sum_avx512(self, coef, rows, y) };
        }
        y.fill(0.0);
        for (&c, &r) in coef.iter().zip(rows) {
            self.axpy(r, c, y);
        }
    }

    /// `y += a · row r` (dequantized on the fly; `y` has `cols` values).
    pub fn axpy(&self, r: usize, a: f32, y: &mut [f32]) {
        let data = self.row_data(r);
        let ws = &self.scales[r * self.nb..(r + 1) * self.nb];
        for (b, yb) in y.chunks_mut(QK).enumerate() {
            let s = a * ws[b];
            match self.format {
                QFormat::Q8_0 => {
                    for (v, &q) in yb.iter_mut().zip(&data[b * QK..(b + 1) * QK]) {
                        *v += s * (q as i8) as f32;
                    }
                }
                QFormat::Q4_0 => {
                    for (i, v) in yb.iter_mut().enumerate() {
                        *v += s * (q4_value(data, self.nb, b, i) as i32 - 8) as f32;
                    }
                }
            }
        }
    }

    /// Rows `r0..r1` dequantized into `out` (grown to `(r1 − r0) × cols` if shorter).
    pub fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut Vec<f32>) {
        assert!(r0 <= r1 && r1 <= self.rows, "dequantize_rows: rows {r0}..{r1} of {}", self.rows);
        let n = (r1 - r0) * self.cols;
        if out.len() < n {
            out.resize(n, 0.0);
        }
        #[cfg(target_arch = "x86_64")]
        if crate::core::cpu::avx512() {
            // SAFETY: AVX-512F/BW are present; rows are in bounds (asserted), `out` holds them.
            return unsafe { x86::dequantize_rows_avx512(self, r0, r1, &mut out[..n]) };
        }
        for (r, row) in (r0..r1).zip(out[..n].chunks_mut(self.cols.max(1))) {
            row.fill(0.0);
            self.axpy(r, 1.0, row);
        }
    }

    /// The dequantized values, `rows × cols`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for (r, row) in out.chunks_mut(self.cols.max(1)).enumerate().take(self.rows) {
            self.axpy(r, 1.0, row);
        }
        out
    }

    /// `y = x · Wᵀ + bias` for `batch` quantized rows `x` (`QAct` of `cols` columns): `y` is
    /// `batch × rows`. Threads over blocks of output rows (batch 1) or of samples.
    pub fn matmul(&self, x: &QAct, batch: usize, bias: Option<&[f32]>, y: &mut [f32]) {
        use rayon::prelude::*;
        let o = self.rows;
        let one = |s: usize, yr: &mut [f32], r0: usize| {
            let xs = x.row(s);
            let quads = yr.len() / 4 * 4;
            for j in (0..quads).step_by(4) {
                let d = self.dot4([r0 + j, r0 + j + 1, r0 + j + 2, r0 + j + 3], [xs; 4]);
                for (k, dk) in d.into_iter().enumerate() {
                    yr[j + k] = dk + bias.map_or(0.0, |b| b[r0 + j + k]);
                }
            }
            for j in quads..yr.len() {
                yr[j] = self.dot(r0 + j, xs) + bias.map_or(0.0, |b| b[r0 + j]);
            }
        };
        let work = o * self.nb * QK * batch;
        if batch == 1 {
            const ROWS: usize = 64;
            if work >= 1 << 16 {
                y[..o].par_chunks_mut(ROWS).enumerate().for_each(|(c, yc)| one(0, yc, c * ROWS));
            } else {
                one(0, &mut y[..o], 0);
            }
            return;
        }
        // samples in groups of 8 and output rows in tiles of 64, so a tile of weights is
        // reused from cache by all samples of the group
        const TILE: usize = 64;
        let group = |(g, yg): (usize, &mut [f32])| {
            for t in (0..o).step_by(TILE) {
                let n = TILE.min(o - t);
                for (k, yr) in yg.chunks_mut(o).enumerate() {
                    one(g * 8 + k, &mut yr[t..t + n], t);
                }
            }
        };
        if work >= 1 << 16 {
            y[..batch * o].par_chunks_mut(8 * o).enumerate().for_each(group);
        } else {
            y[..batch * o].chunks_mut(8 * o).enumerate().for_each(group);
        }
    }
}

/// A matrix that is quantized when its rows are worth it ([`worth_quantizing`]) and kept in
/// f32 otherwise, or stored in bf16; read a range of rows at a time as f32.
#[derive(Clone, Debug)]
pub enum MaybeQuant {
    /// Rows too short to quantize.
    F32 {
        /// `rows × cols`.
        data: Vec<f32>,
        /// Values per row.
        cols: usize,
    },
    /// Block-quantized rows.
    Quant(QMatrix),
    /// Rows rounded to bf16 (row-major, widened to f32 when read).
    Bf16 {
        /// `rows × cols`.
        data: Vec<crate::core::bf16::Bf16>,
        /// Values per row.
        cols: usize,
    },
}

impl MaybeQuant {
    /// `data` (`rows × cols`) in `format` if its rows are worth quantizing.
    pub fn new(format: QFormat, data: Vec<f32>, rows: usize, cols: usize) -> Result<Self> {
        if worth_quantizing(cols) {
            Ok(MaybeQuant::Quant(QMatrix::from_f32(format, &data, rows, cols)?))
        } else {
            crate::error::check_matrix("matrix", data.len(), rows, cols)?;
            Ok(MaybeQuant::F32 { data, cols })
        }
    }

    /// `data` (`rows × cols`) rounded to bf16 (nearest even).
    pub fn bf16(data: &[f32], rows: usize, cols: usize) -> Result<Self> {
        crate::error::check_matrix("matrix", data.len(), rows, cols)?;
        Ok(MaybeQuant::Bf16 { data: crate::core::bf16::to_bf16(data), cols })
    }

    /// Rows `r0..r1` as f32: borrowed, or dequantized (widened) into `buf`.
    #[inline]
    pub fn rows<'a>(&'a self, r0: usize, r1: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
        match self {
            MaybeQuant::F32 { data, cols } => &data[r0 * cols..r1 * cols],
            MaybeQuant::Quant(q) => {
                q.dequantize_rows(r0, r1, buf);
                &buf[..(r1 - r0) * q.cols]
            }
            MaybeQuant::Bf16 { data, cols } => {
                let n = (r1 - r0) * cols;
                crate::core::scratch::grow(buf, n);
                crate::core::bf16::widen_into(&data[r0 * cols..r1 * cols], &mut buf[..n]);
                &buf[..n]
            }
        }
    }
}

/// Value `i` (0–15, before subtracting 8) of block `b` of a Q4_0 row of `nb` blocks in the
/// kernels' layout ([`QMatrix`]'s `row_data`).
#[inline]
fn q4_value(w: &[u8], nb: usize, b: usize, i: usize) -> u8 {
    let full = nb / 4 * 4;
    if b < full {
        let (g, k) = (b / 4, b % 4);
        let byte = w[g * 64 + (k % 2) * 32 + i];
        if k < 2 {
            byte & 0x0F
        } else {
            byte >> 4
        }
    } else {
        let byte = w[full * 16 + (b - full) * 16 + i % 16];
        if i < 16 {
            byte & 0x0F
        } else {
            byte >> 4
        }
    }
}

/// Fixed-order sum of the 16 lanes every path accumulates into.
#[inline]
fn reduce16(l: &[f32; 16]) -> f32 {
    let h: [f32; 8] = std::array::from_fn(|k| l[k] + l[k + 8]);
    let t: [f32; 4] = std::array::from_fn(|k| h[k] + h[k + 4]);
    let u = [t[0] + t[2], t[1] + t[3]];
    u[0] + u[1]
}

/// Q4_0's offset: its nibbles are `q + 8`, so `Σ_b s_b · 8 · Σ x_b` is subtracted; block `b`
/// adds into lane `b mod 16` (blocks past the end add `0 · 0`), then [`reduce16`], as the
/// vector paths do.
#[inline]
fn q4_offset(ws: &[f32], xd: &[f32], xsum: &[i32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    for b in 0..ws.len().div_ceil(16) * 16 {
        lanes[b % 16] += match (ws.get(b), xd.get(b), xsum.get(b)) {
            (Some(&w), Some(&x), Some(&s)) => (w * x) * (8 * s) as f32,
            _ => 0.0 * 0.0,
        };
    }
    reduce16(&lanes)
}

/// `w · x` of one row of blocks on the given path (the others when the CPU lacks it).
#[inline]
pub(crate) fn dot(format: QFormat, level: crate::core::cpu::SimdLevel, w: &[u8], ws: &[f32], x: (&[i8], &[f32], &[i32])) -> f32 {
    use crate::core::cpu::SimdLevel;
    let (xq, xd, xsum) = x;
    debug_assert!(ws.len() == xd.len() && xq.len() == ws.len() * QK);
    #[cfg(target_arch = "x86_64")]
    {
        if level >= SimdLevel::Avx512 && vnni() {
            // SAFETY: AVX-512F/BW/VL and VNNI are present (checked above); the slices hold
            // `ws.len()` blocks each (asserted by the callers' layouts).
            return unsafe { x86::dot_avx512(format, w, ws, xq, xd, xsum) };
        }
        if level >= SimdLevel::Avx2 {
            // SAFETY: AVX2 and FMA are present (the level is capped at what the CPU has).
            return unsafe { x86::dot_avx2(format, w, ws, xq, xd, xsum) };
        }
    }
    let _ = level;
    dot_portable(format, w, ws, xq, xd, xsum)
}

/// True when the CPU has AVX-512 VNNI with BW and VL.
pub fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *V.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The reference path: 4-value integer partial sums into 16 f32 lanes (block `b` into lanes
/// `8·(b mod 2) …`), a phantom zero block after an odd last one, then [`reduce16`].
pub(crate) fn dot_portable(format: QFormat, w: &[u8], ws: &[f32], xq: &[i8], xd: &[f32], xsum: &[i32]) -> f32 {
    let nb = ws.len();
    let mut acc = [0.0f32; 16];
    let wv = |b: usize, i: usize| -> i32 {
        match format {
            QFormat::Q8_0 => w[b * QK + i] as i8 as i32,
            QFormat::Q4_0 => q4_value(w, nb, b, i) as i32,
        }
    };
    for p in 0..nb.div_ceil(2) {
        for slot in 0..2 {
            let b = 2 * p + slot;
            for k in 0..8 {
                let lane = &mut acc[slot * 8 + k];
                if b < nb {
                    let part: i32 = (0..4).map(|j| wv(b, 4 * k + j) * xq[b * QK + 4 * k + j] as i32).sum();
                    *lane = (part as f32).mul_add(ws[b] * xd[b], *lane);
                } else {
                    *lane = 0.0f32.mul_add(0.0, *lane);
                }
            }
        }
    }
    let r = reduce16(&acc);
    match format {
        QFormat::Q8_0 => r,
        QFormat::Q4_0 => r - q4_offset(ws, xd, xsum),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{q4_offset, reduce16, QFormat, QK};
    use std::arch::x86_64::*;

    /// Two blocks per 512-bit step: Q8_0 as `|x| · (w · sign x)` (`vpdpbusd` multiplies
    /// unsigned by signed bytes), Q4_0 as nibbles (unsigned) · x.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    pub(super) unsafe fn dot_avx512(format: QFormat, w: &[u8], ws: &[f32], xq: &[i8], xd: &[f32], xsum: &[i32]) -> f32 {
        let nb = ws.len();
        let mut acc = _mm512_setzero_ps();
        let zero = _mm512_setzero_si512();
        // SAFETY (whole body): reads stay within `nb` blocks of `w` and `xq`; a partial pair
        // is loaded with a mask that keeps the absent block's bytes untouched.
        unsafe {
            for p in 0..nb.div_ceil(2) {
                let full = 2 * p + 1 < nb;
                let xmask: u64 = if full { u64::MAX } else { (1u64 << 32) - 1 };
                let xv = _mm512_maskz_loadu_epi8(xmask, xq.as_ptr().add(2 * p * QK));
                let dp = match format {
                    QFormat::Q8_0 => {
                        let wv = _mm512_maskz_loadu_epi8(xmask, w.as_ptr().add(2 * p * QK) as *const i8);
                        let sw = _mm512_mask_sub_epi8(wv, _mm512_movepi8_mask(xv), zero, wv);
                        _mm512_dpbusd_epi32(zero, _mm512_abs_epi8(xv), sw)
                    }
                    QFormat::Q4_0 => _mm512_dpbusd_epi32(zero, q4_pair(w, nb, p, full, xmask), xv),
                };
                let s0 = ws[2 * p] * xd[2 * p];
                let s1 = if full { ws[2 * p + 1] * xd[2 * p + 1] } else { 0.0 };
                let sv = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(s0), _mm512_set1_ps(s1));
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), sv, acc);
            }
            let mut lanes = [0.0f32; 16];
            _mm512_storeu_ps(lanes.as_mut_ptr(), acc);
            let r = reduce16(&lanes);
            match format {
                QFormat::Q8_0 => r,
                QFormat::Q4_0 => r - q4_offset(ws, xd, xsum),
            }
        }
    }

    /// Blocks `2p`, `2p + 1` of a Q4_0 row (kernel layout) as 64 unsigned bytes 0–15 (the
    /// second block's zeroed when absent: `full` false, `xmask` its low 32 bytes).
    #[inline(always)]
    unsafe fn q4_pair(w: &[u8], nb: usize, p: usize, full: bool, xmask: u64) -> __m512i {
        let grouped = nb / 4 * 4;
        let low = _mm512_set1_epi8(0x0F);
        // SAFETY: the caller's row holds `nb` blocks; a grouped pair's 64 bytes and a tail
        // pair's 16 or 32 bytes lie in it.
        unsafe {
            if 2 * p < grouped {
                let v = _mm512_loadu_si512(w.as_ptr().add(2 * p / 4 * 64) as *const _);
                if p.is_multiple_of(2) {
                    _mm512_and_si512(v, low)
                } else {
                    _mm512_and_si512(_mm512_srli_epi16(v, 4), low)
                }
            } else {
                let off = grouped * 16 + (2 * p - grouped) * 16;
                let bytes = if full {
                    _mm256_loadu_si256(w.as_ptr().add(off) as *const __m256i)
                } else {
                    _mm256_castsi128_si256(_mm_loadu_si128(w.as_ptr().add(off) as *const __m128i))
                };
                let l = _mm256_set1_epi8(0x0F);
                let lo = _mm256_and_si256(bytes, l);
                let hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), l);
                let z = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                // 128-bit lanes [lo0 lo1 hi0 hi1] → [lo0 hi0 lo1 hi1]: block values in order
                let wv = _mm512_shuffle_i64x2(z, z, 0b11_01_10_00);
                if full {
                    wv
                } else {
                    _mm512_maskz_mov_epi8(xmask, wv)
                }
            }
        }
    }

    /// Block `b` of a Q4_0 row (kernel layout) as two vectors of 16 unsigned bytes 0–15:
    /// values 0–15 and 16–31.
    #[inline(always)]
    unsafe fn q4_block(w: &[u8], nb: usize, b: usize) -> (__m128i, __m128i) {
        let grouped = nb / 4 * 4;
        let low = _mm_set1_epi8(0x0F);
        // SAFETY: the caller's row holds `nb` blocks.
        unsafe {
            if b < grouped {
                let (g, k) = (b / 4, b % 4);
                let base = w.as_ptr().add(g * 64 + (k % 2) * 32);
                let (a, c) = (_mm_loadu_si128(base as *const __m128i), _mm_loadu_si128(base.add(16) as *const __m128i));
                if k < 2 {
                    (_mm_and_si128(a, low), _mm_and_si128(c, low))
                } else {
                    (_mm_and_si128(_mm_srli_epi16(a, 4), low), _mm_and_si128(_mm_srli_epi16(c, 4), low))
                }
            } else {
                let v = _mm_loadu_si128(w.as_ptr().add(grouped * 16 + (b - grouped) * 16) as *const __m128i);
                (_mm_and_si128(v, low), _mm_and_si128(_mm_srli_epi16(v, 4), low))
            }
        }
    }

    /// Block `b` of row `r` of `m` as two vectors of 16 signed values (Q4_0 minus 8).
    #[inline(always)]
    unsafe fn block_values(m: &super::QMatrix, r: usize, b: usize, qb: usize) -> (__m128i, __m128i) {
        // SAFETY: `r` and `b` are in bounds (the callers' loops).
        unsafe {
            match m.format {
                QFormat::Q8_0 => {
                    let src = m.data.as_ptr().add((r * m.nb + b) * qb);
                    (_mm_loadu_si128(src as *const __m128i), _mm_loadu_si128(src.add(16) as *const __m128i))
                }
                QFormat::Q4_0 => {
                    let (lo, hi) = q4_block(m.row_data(r), m.nb, b);
                    let eight = _mm_set1_epi8(8);
                    (_mm_sub_epi8(lo, eight), _mm_sub_epi8(hi, eight))
                }
            }
        }
    }

    /// Masks of the first `n` (≤ 32) lanes over two 16-lane halves.
    #[inline(always)]
    fn halves(n: usize) -> (u16, u16) {
        let m = |k: usize| if k >= 16 { u16::MAX } else { ((1u32 << k) - 1) as u16 };
        (m(n.min(16)), m(n.saturating_sub(16)))
    }

    /// Index vectors that spread the scales of blocks `2p` and `2p + 1` of a 16-block group
    /// over the low and high eight lanes.
    #[inline(always)]
    unsafe fn pair_index(p: usize) -> __m512i {
        let (a, b) = ((2 * p) as i32, (2 * p + 1) as i32);
        _mm512_set_epi32(b, b, b, b, b, b, b, b, a, a, a, a, a, a, a, a)
    }

    /// [`dot_avx512`] for four rows and four activations at once, the same operations per row
    /// in the same order (so bit-identical), scales taken 16 blocks at a time.
    /// `SAME_X`: all four activations are one row (a matrix-vector product), loaded and
    /// prepared once per pair of blocks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    pub(super) unsafe fn dot4_avx512<const SAME_X: bool>(format: QFormat, w: [&[u8]; 4], ws: [&[f32]; 4], xs: [(&[i8], &[f32], &[i32]); 4]) -> [f32; 4] {
        let nb = ws[0].len();
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut off = [_mm512_setzero_ps(); 4];
        let zero = _mm512_setzero_si512();
        // SAFETY (whole body): as dot_avx512, for each of the four rows; scale groups of fewer
        // than 16 blocks are loaded with a mask.
        unsafe {
            for g in (0..nb).step_by(16) {
                let gn = (nb - g).min(16);
                let gmask: u16 = if gn == 16 { u16::MAX } else { (1u16 << gn) - 1 };
                let s: [__m512; 4] = std::array::from_fn(|k| {
                    _mm512_mul_ps(_mm512_maskz_loadu_ps(gmask, ws[k].as_ptr().add(g)), _mm512_maskz_loadu_ps(gmask, xs[k].1.as_ptr().add(g)))
                });
                if format == QFormat::Q4_0 {
                    for k in 0..4 {
                        let sum8 = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(gmask, xs[k].2.as_ptr().add(g)), 3);
                        off[k] = _mm512_add_ps(off[k], _mm512_mul_ps(s[k], _mm512_cvtepi32_ps(sum8)));
                    }
                }
                for p in 0..gn.div_ceil(2) {
                    let b = g + 2 * p;
                    let full = b + 1 < nb;
                    let xmask: u64 = if full { u64::MAX } else { (1u64 << 32) - 1 };
                    let idx = pair_index(p);
                    let x0 = _mm512_maskz_loadu_epi8(xmask, xs[0].0.as_ptr().add(b * QK));
                    let (ax0, neg0) = (_mm512_abs_epi8(x0), _mm512_movepi8_mask(x0));
                    for k in 0..4 {
                        let xv = if SAME_X || k == 0 { x0 } else { _mm512_maskz_loadu_epi8(xmask, xs[k].0.as_ptr().add(b * QK)) };
                        let dp = match format {
                            QFormat::Q8_0 => {
                                let (ax, neg) = if SAME_X || k == 0 { (ax0, neg0) } else { (_mm512_abs_epi8(xv), _mm512_movepi8_mask(xv)) };
                                let wv = _mm512_maskz_loadu_epi8(xmask, w[k].as_ptr().add(b * QK) as *const i8);
                                let sw = _mm512_mask_sub_epi8(wv, neg, zero, wv);
                                _mm512_dpbusd_epi32(zero, ax, sw)
                            }
                            QFormat::Q4_0 => _mm512_dpbusd_epi32(zero, q4_pair(w[k], nb, b / 2, full, xmask), xv),
                        };
                        // lanes of an absent odd block: scale 0 (the group's masked load)
                        let sv = _mm512_permutexvar_ps(idx, s[k]);
                        acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), sv, acc[k]);
                    }
                }
            }
            std::array::from_fn(|k| {
                let mut lanes = [0.0f32; 16];
                _mm512_storeu_ps(lanes.as_mut_ptr(), acc[k]);
                let r = reduce16(&lanes);
                match format {
                    QFormat::Q8_0 => r,
                    QFormat::Q4_0 => {
                        _mm512_storeu_ps(lanes.as_mut_ptr(), off[k]);
                        r - reduce16(&lanes)
                    }
                }
            })
        }
    }

    /// One activation block: `amax`, scale, `vcvtps2dq` (nearest even), narrowed to bytes.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn quantize_block_avx512(v: &[f32], q: &mut [i8]) -> (f32, i32) {
        let n = v.len().min(QK);
        let (m0, m1) = halves(n);
        // SAFETY (whole body): masked loads read only the `n` values of `v`; `q` holds 32 bytes.
        unsafe {
            let a = _mm512_maskz_loadu_ps(m0, v.as_ptr());
            let b = _mm512_maskz_loadu_ps(m1, v.as_ptr().add(16.min(n)));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
            let d = amax / 127.0;
            let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
            let qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, id));
            let qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, id));
            _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(qa));
            _mm_storeu_si128(q.as_mut_ptr().add(16) as *mut __m128i, _mm512_cvtepi32_epi8(qb));
            (d, _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)))
        }
    }

    /// `y = Σ coef[l] · row rows[l]`: 32 columns (one block) at a time, every row's block
    /// widened from bytes or nibbles and scaled, `y` written once.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn weighted_row_sum_avx512(m: &super::QMatrix, coef: &[f32], rows: &[usize], y: &mut [f32]) {
        let (nb, cols) = (m.nb, m.cols);
        let qb = m.format.block_bytes() - 2;
        // SAFETY (whole body): rows are in bounds (checked by the caller); a block's bytes lie
        // in its row; `y` is written with masks past `cols`.
        unsafe {
            for b in 0..nb {
                let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                for (&c, &r) in coef.iter().zip(rows) {
                    let s = _mm512_set1_ps(c * m.scales[r * nb + b]);
                    let (q0, q1) = block_values(m, r, b, qb);
                    a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), s, a0);
                    a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), s, a1);
                }
                let c0 = b * QK;
                let n = (cols - c0).min(QK);
                let (m0, m1) = halves(n);
                _mm512_mask_storeu_ps(y.as_mut_ptr().add(c0), m0, a0);
                if m1 != 0 {
                    _mm512_mask_storeu_ps(y.as_mut_ptr().add(c0 + 16), m1, a1);
                }
            }
        }
    }

    /// Rows `r0..r1` of `m` as f32 into `out` (`(r1 − r0) × cols`), a block at a time.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn dequantize_rows_avx512(m: &super::QMatrix, r0: usize, r1: usize, out: &mut [f32]) {
        let (nb, cols) = (m.nb, m.cols);
        let qb = m.format.block_bytes() - 2;
        // SAFETY (whole body): blocks of rows r0..r1 lie in `m.data`; each output row holds
        // `cols` values, the last block stored with a mask.
        unsafe {
            for (ri, r) in (r0..r1).enumerate() {
                let dst = out.as_mut_ptr().add(ri * cols);
                for b in 0..nb {
                    let s = _mm512_set1_ps(m.scales[r * nb + b]);
                    let (q0, q1) = block_values(m, r, b, qb);
                    let a0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), s);
                    let a1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), s);
                    let c0 = b * QK;
                    let n = (cols - c0).min(QK);
                    if n == QK {
                        _mm512_storeu_ps(dst.add(c0), a0);
                        _mm512_storeu_ps(dst.add(c0 + 16), a1);
                    } else {
                        let (m0, m1) = halves(n);
                        _mm512_mask_storeu_ps(dst.add(c0), m0, a0);
                        _mm512_mask_storeu_ps(dst.add(c0 + 16), m1, a1);
                    }
                }
            }
        }
    }

    /// One block per 256-bit step, even blocks into one accumulator and odd into another.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_avx2(format: QFormat, w: &[u8], ws: &[f32], xq: &[i8], xd: &[f32], xsum: &[i32]) -> f32 {
        let nb = ws.len();
        let mut acc = [_mm256_setzero_ps(); 2];
        let ones = _mm256_set1_epi16(1);
        // SAFETY (whole body): every load reads one block inside `w` / `xq`.
        unsafe {
            for b in 0..nb {
                let xv = _mm256_loadu_si256(xq.as_ptr().add(b * QK) as *const __m256i);
                let p16 = match format {
                    QFormat::Q8_0 => {
                        let wv = _mm256_loadu_si256(w.as_ptr().add(b * QK) as *const __m256i);
                        _mm256_maddubs_epi16(_mm256_sign_epi8(xv, xv), _mm256_sign_epi8(wv, xv))
                    }
                    QFormat::Q4_0 => {
                        let (lo, hi) = q4_block(w, nb, b);
                        _mm256_maddubs_epi16(_mm256_set_m128i(hi, lo), xv)
                    }
                };
                let p32 = _mm256_madd_epi16(p16, ones);
                let s = _mm256_set1_ps(ws[b] * xd[b]);
                acc[b % 2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), s, acc[b % 2]);
            }
            if nb % 2 == 1 {
                acc[1] = _mm256_fmadd_ps(_mm256_setzero_ps(), _mm256_setzero_ps(), acc[1]);
            }
            let mut lanes = [0.0f32; 16];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[1]);
            let r = reduce16(&lanes);
            match format {
                QFormat::Q8_0 => r,
                QFormat::Q4_0 => r - q4_offset(ws, xd, xsum),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::cpu::SimdLevel;
    use crate::core::Rng;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..n).map(|i| rng.normal() * if i % 7 == 0 { 3.0 } else { 1.0 }).collect()
    }

    #[test]
    fn pack_unpack_within_bound_and_idempotent() {
        for format in [QFormat::Q8_0, QFormat::Q4_0] {
            for cols in [32, 50, 784] {
                let w = data(3 * cols, 1);
                let bytes = pack(format, &w, 3, cols).unwrap();
                assert_eq!(bytes.len(), packed_len(format, 3, cols));
                let back = unpack(format, &bytes, 3, cols).unwrap();
                for (r, (a, b)) in w.chunks(cols).zip(back.chunks(cols)).enumerate() {
                    for (bi, (ab, bb)) in a.chunks(QK).zip(b.chunks(QK)).enumerate() {
                        let amax = ab.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                        for (x, y) in ab.iter().zip(bb) {
                            assert!((x - y).abs() <= format.error_bound() * amax, "{format:?} row {r} block {bi}: {x} vs {y}");
                        }
                    }
                }
                assert_eq!(pack(format, &back, 3, cols).unwrap(), bytes, "{format:?}: packing is not idempotent");
                let m = QMatrix::from_blocks(format, &bytes, 3, cols).unwrap();
                assert_eq!(m.dequantize(), back);
                let mut rows = Vec::new();
                m.dequantize_rows(1, 3, &mut rows);
                assert_eq!(rows, back[cols..3 * cols].to_vec());
                assert!(unpack(format, &bytes[1..], 3, cols).is_err());
            }
        }
    }

    #[test]
    fn every_path_is_bit_equal_to_the_reference() {
        let levels = [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512].into_iter().filter(|&l| l <= crate::core::cpu::detected());
        let levels: Vec<_> = levels.collect();
        for format in [QFormat::Q8_0, QFormat::Q4_0] {
            for cols in [32, 64, 96, 784, 1000] {
                let (rows, w, x) = (5, data(5 * cols, 2), data(cols, 3));
                let m = QMatrix::from_f32(format, &w, rows, cols).unwrap();
                let mut a = QAct::default();
                a.quantize(&x, 1, cols);
                let deq = m.dequantize();
                for r in 0..rows {
                    let ws = &m.scales[r * m.nb..(r + 1) * m.nb];
                    let want = dot_portable(format, m.row_data(r), ws, a.row(0).0, a.row(0).1, a.row(0).2);
                    for &l in &levels {
                        let got = dot(format, l, m.row_data(r), ws, a.row(0));
                        assert_eq!(got.to_bits(), want.to_bits(), "{format:?} cols {cols} row {r} on {l:?}: {got} vs {want}");
                    }
                    let four = m.dot4([r, (r + 1) % rows, r, (r + 2) % rows], [a.row(0); 4]);
                    assert_eq!(four[0].to_bits(), want.to_bits(), "{format:?} cols {cols} row {r}: dot4 {} vs {want}", four[0]);
                    assert_eq!(four[2].to_bits(), want.to_bits());
                    // and the integer product is the product of the dequantized operands
                    let xd: Vec<f32> = (0..cols).map(|i| a.q[i] as f32 * a.d[i / QK]).collect();
                    let exact: f64 = deq[r * cols..(r + 1) * cols].iter().zip(&xd).map(|(&p, &q)| p as f64 * q as f64).sum();
                    assert!((want as f64 - exact).abs() <= 1e-4 * (1.0 + exact.abs()), "{format:?}: {want} vs {exact}");
                }
            }
        }
    }

    #[test]
    fn activation_quantization_and_row_sums_agree_across_paths() {
        for cols in [7, 32, 50, 784] {
            let x = data(cols, 9);
            let mut simd = QAct::default();
            simd.quantize(&x, 1, cols);
            // the portable rounding, written out
            for (b, v) in x.chunks(QK).enumerate() {
                let amax = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                let id = 127.0 / amax;
                assert_eq!(simd.d[b], amax / 127.0);
                for (i, &xi) in v.iter().enumerate() {
                    let q = simd.q[b * QK + i] as f32;
                    assert!((xi * (1.0 / (amax / 127.0)) - q).abs() <= 0.5 + 1e-4, "block {b} value {i}: {xi} → {q} (id {id})");
                }
                assert_eq!(simd.sum[b], simd.q[b * QK..(b + 1) * QK].iter().map(|&q| q as i32).sum::<i32>());
            }
        }
        for format in [QFormat::Q8_0, QFormat::Q4_0] {
            let (rows, cols) = (9, 70);
            let m = QMatrix::from_f32(format, &data(rows * cols, 10), rows, cols).unwrap();
            let (coef, path) = ([0.5f32, -1.25, 2.0], [3usize, 0, 8]);
            let mut y = vec![f32::NAN; cols];
            m.weighted_row_sum(&coef, &path, &mut y);
            let mut want = vec![0.0; cols];
            for (&c, &r) in coef.iter().zip(&path) {
                m.axpy(r, c, &mut want);
            }
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{format:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn matmul_matches_dequantized_product() {
        for format in [QFormat::Q8_0, QFormat::Q4_0] {
            let (rows, cols, batch) = (130, 200, 11);
            let (w, x, bias) = (data(rows * cols, 4), data(batch * cols, 5), data(rows, 6));
            let m = QMatrix::from_f32(format, &w, rows, cols).unwrap();
            let deq = m.dequantize();
            let mut a = QAct::default();
            a.quantize(&x, batch, cols);
            let mut y = vec![0.0; batch * rows];
            m.matmul(&a, batch, Some(&bias), &mut y);
            for s in 0..batch {
                let xs = &x[s * cols..(s + 1) * cols];
                let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                for r in 0..rows {
                    let exact: f32 = deq[r * cols..(r + 1) * cols].iter().zip(xs).map(|(p, q)| p * q).sum::<f32>() + bias[r];
                    // the activation rounding: ≤ half a step (amax/254) per value
                    let tol = deq[r * cols..(r + 1) * cols].iter().map(|v| v.abs()).sum::<f32>() * amax / 254.0 + 1e-4;
                    assert!((y[s * rows + r] - exact).abs() <= tol, "{format:?} ({s}, {r}): {} vs {exact}", y[s * rows + r]);
                }
            }
        }
    }
}
