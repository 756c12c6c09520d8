//! Grouped expert dispatch, the CPU form of Csordás et al.'s CVMM: the (token, slot) pairs a
//! router produced are counting-sorted by expert, each expert runs one GEMM pair over its
//! contiguous segment of gathered rows, and outputs are combined back per token weighted by
//! the gates. The same segments give the weight gradients in backward. Expert weights are
//! never copied per token and nothing is computed for experts a token did not pick.
//!
//! Shapes: `E` experts of `in → G → out` (`w1`: `E × in × G`, `b1`: `E × G`, `w2`:
//! `E × G × out`), a batch of `B` tokens with `k` slots each (slot `s = b·k + j`), and `S` kept
//! slots (slots can be dropped by a capacity limit).

use rayon::prelude::*;

use super::{Precision, SyncPtr};
use crate::core::gemm::{matmul_packed, matmul_serial, pack_bf16, MatMut, MatRef};
use crate::core::quant::MaybeQuant;
use crate::core::scratch::with_buffer;
use crate::core::sgemm::PackedBf16;
use crate::core::simd::{dot, gemm_small, gemm_small_gather};
use crate::core::Activation;
use crate::error::{Error, Result};

/// Marks a slot that is routed nowhere (dropped by the capacity limit).
pub const DROPPED: u32 = u32::MAX;

/// Sizes of an expert bank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertShape {
    /// Number of experts `E`.
    pub experts: usize,
    /// Input width.
    pub in_features: usize,
    /// Hidden units per expert `G`.
    pub width: usize,
    /// Output width.
    pub out_features: usize,
}

/// Borrowed weights of an expert bank (layouts in the module docs).
#[derive(Clone, Copy)]
pub struct ExpertWeights<'a> {
    /// Sizes.
    pub shape: ExpertShape,
    /// `E × in × G`.
    pub w1: &'a [f32],
    /// `E × G`.
    pub b1: &'a [f32],
    /// `E × G × out`.
    pub w2: &'a [f32],
    /// Hidden nonlinearity.
    pub act: Activation,
}

/// Gradients of an expert bank, same layouts as [`ExpertWeights`].
pub struct ExpertGrads<'a> {
    /// `E × in × G`.
    pub w1: &'a mut [f32],
    /// `E × G`.
    pub b1: &'a mut [f32],
    /// `E × G × out`.
    pub w2: &'a mut [f32],
}

impl ExpertWeights<'_> {
    /// Checks that the weight slices hold exactly the bank's sizes.
    fn check(&self) -> Result<()> {
        let ExpertShape { experts: e, in_features: d, width: g, out_features: o } = self.shape;
        for (name, len, want) in [("w1", self.w1.len(), e * d * g), ("b1", self.b1.len(), e * g), ("w2", self.w2.len(), e * g * o)] {
            if len != want {
                return Err(Error::Invalid(format!("expert bank {name}: {len} values, shape {:?} needs {want}", self.shape)));
            }
        }
        Ok(())
    }
}

/// Checks the segment table of a dispatch: `E + 1` non-decreasing offsets starting at 0, and
/// each buffer (`name`, length, row width) long enough for its last row. Returns `S`.
fn check_segments(offsets: &[u32], experts: usize, buffers: &[(&str, usize, usize)]) -> Result<usize> {
    if offsets.len() < experts + 1 {
        return Err(Error::Invalid(format!("grouped dispatch: {} offsets for {experts} experts (need {})", offsets.len(), experts + 1)));
    }
    let offsets = &offsets[..experts + 1];
    if offsets[0] != 0 {
        return Err(Error::Invalid(format!("grouped dispatch: offsets[0] is {}, expected 0", offsets[0])));
    }
    if let Some(e) = offsets.windows(2).position(|w| w[1] < w[0]) {
        return Err(Error::Invalid(format!("grouped dispatch: offsets decrease at expert {e} ({} > {})", offsets[e], offsets[e + 1])));
    }
    let s = offsets[experts] as usize;
    for &(name, len, width) in buffers {
        let need = s.checked_mul(width).ok_or_else(|| Error::Invalid(format!("grouped dispatch: {s} rows of {width} overflow")))?;
        if len < need {
            return Err(Error::Invalid(format!("grouped dispatch: `{name}` holds {len} values, {s} rows of {width} need {need}")));
        }
    }
    Ok(s)
}

/// Sorts slots by expert. `assign[s]` is the expert of slot `s` or [`DROPPED`].
/// Writes `offsets` (`E + 1`: expert `e` owns sorted rows `offsets[e]..offsets[e+1]`), `order`
/// (sorted row → slot, stable) and `pos` (slot → sorted row, or `DROPPED`).
/// Returns the number of kept slots `S`.
pub fn dispatch(assign: &[u32], experts: usize, offsets: &mut [u32], order: &mut [u32], pos: &mut [u32]) -> usize {
    let offsets = &mut offsets[..experts + 1];
    offsets.fill(0);
    for &e in assign {
        if e != DROPPED {
            offsets[e as usize + 1] += 1;
        }
    }
    for e in 0..experts {
        offsets[e + 1] += offsets[e];
    }
    // use offsets[e] as the write cursor, then shift back
    for (s, &e) in assign.iter().enumerate() {
        if e == DROPPED {
            pos[s] = DROPPED;
        } else {
            let r = offsets[e as usize];
            order[r as usize] = s as u32;
            pos[s] = r;
            offsets[e as usize] = r + 1;
        }
    }
    for e in (1..=experts).rev() {
        offsets[e] = offsets[e - 1];
    }
    offsets[0] = 0;
    offsets[experts] as usize
}

/// Runs every expert on its segment: gathers its rows `xs = x[token of slot]`, then
/// `pre = xs·W1ₑ + b1ₑ`, `h = act(pre)`, `ys = h·W2ₑ`. `x`: `B × in` with `k` slots per token,
/// `order`/`offsets` from [`dispatch`]; writes `xs`: `S × in`, `h`: `S × G`, `ys`: `S × out`,
/// and `pre` (`S × G`) when given (training). Experts run in parallel, each on one thread,
/// and each gathers its own rows right before its GEMM (they are still in cache).
///
/// Errors (nothing is written) when the weights do not match `w.shape`, `offsets` is not a
/// valid segment table, a buffer is too short for `S` rows, or `order` names a slot outside
/// `x`.
#[allow(clippy::too_many_arguments)]
pub fn experts_forward(
    w: &ExpertWeights<'_>,
    x: &[f32],
    k: usize,
    order: &[u32],
    offsets: &[u32],
    xs: &mut [f32],
    pre: Option<&mut [f32]>,
    h: &mut [f32],
    ys: &mut [f32],
) -> Result<()> {
    let ExpertShape { experts, in_features: d, width: g, out_features: o } = w.shape;
    w.check()?;
    let pre_len = pre.as_ref().map_or(usize::MAX, |p| p.len());
    let s = check_segments(offsets, experts, &[("xs", xs.len(), d), ("h", h.len(), g), ("ys", ys.len(), o), ("pre", pre_len, g), ("order", order.len(), 1)])?;
    let tokens = if k == 0 { 0 } else { x.len() / d.max(1) };
    if let Some(&bad) = order[..s].iter().find(|&&slot| k == 0 || slot as usize / k >= tokens) {
        return Err(Error::Invalid(format!("grouped dispatch: slot {bad} is outside the {tokens} tokens × {k} slots of x")));
    }
    let pre_ptr = pre.map(|p| SyncPtr(p.as_mut_ptr()));
    let (h_ptr, ys_ptr, xs_ptr) = (SyncPtr(h.as_mut_ptr()), SyncPtr(ys.as_mut_ptr()), SyncPtr(xs.as_mut_ptr()));
    let run = |e: usize| {
        let (r0, r1) = (offsets[e] as usize, offsets[e + 1] as usize);
        let n = r1 - r0;
        if n == 0 {
            return;
        }
        // SAFETY: expert segments are disjoint row ranges of xs, h, pre and ys.
        let (xe, hs, yo) = unsafe { (xs_ptr.slice(r0 * d, n * d), h_ptr.slice(r0 * g, n * g), ys_ptr.slice(r0 * o, n * o)) };
        for (row, &slot) in xe.chunks_exact_mut(d).zip(&order[r0..r1]) {
            let t = slot as usize / k;
            row.copy_from_slice(&x[t * d..(t + 1) * d]);
        }
        let b1 = &w.b1[e * g..(e + 1) * g];
        let (w1, w2) = (&w.w1[e * d * g..(e + 1) * d * g], &w.w2[e * g * o..(e + 1) * g * o]);
        product(xe, d, w1, g, Some(b1), hs);
        if let Some(p) = pre_ptr {
            // SAFETY: as above.
            unsafe { p.slice(r0 * g, n * g) }.copy_from_slice(hs);
        }
        w.act.apply_inplace(hs);
        product(hs, g, w2, o, None, yo);
    };
    if s * d * g >= 1 << 17 && rayon::current_num_threads() > 1 {
        (0..experts).into_par_iter().for_each(run);
    } else {
        (0..experts).for_each(run);
    }
    Ok(())
}

/// The weights an inference pass over an expert bank reads.
#[derive(Clone, Copy)]
pub enum ExpertSource<'a> {
    /// f32 weights, read in place.
    F32(&'a ExpertWeights<'a>),
    /// bf16 pre-packed for the AVX512_BF16 products: each segment's rows are gathered and
    /// multiplied on bf16 operand pairs.
    Packed(&'a PackedExperts),
    /// Quantized blocks or bf16: each expert that received rows is widened to f32 once per
    /// call into a per-thread buffer (the blocks run along the output axis of each product,
    /// so the integer dot products of `core::quant` do not apply; the weights cross memory at
    /// 4.5, 8.5 or 16 bits).
    Quant(&'a QuantExperts),
}

impl ExpertSource<'_> {
    fn shape(&self) -> ExpertShape {
        match self {
            ExpertSource::F32(w) => w.shape,
            ExpertSource::Quant(q) => q.shape,
            ExpertSource::Packed(p) => p.shape,
        }
    }
}

/// [`experts_forward`] for inference: no copies of the gathered rows (each expert's first
/// product reads the rows of `x` in place through `tok`, scratch of `S` token indices) and the
/// unpacked small-product kernel for both maps, whose weights are read in place (packing
/// them per call, as the GEMM library does, cost more than the products at the widths of
/// experts: measured 1.5x on a MoEfied MNIST layer at batch 256).
#[allow(clippy::too_many_arguments)]
pub fn experts_infer(w: ExpertSource<'_>, x: &[f32], k: usize, order: &[u32], offsets: &[u32], tok: &mut [u32], h: &mut [f32], ys: &mut [f32]) -> Result<()> {
    let ExpertShape { experts, in_features: d, width: g, out_features: o } = w.shape();
    if let ExpertSource::F32(w) = w {
        w.check()?;
    }

    let s = check_segments(offsets, experts, &[("h", h.len(), g), ("ys", ys.len(), o), ("order", order.len(), 1), ("tok", tok.len(), 1)])?;
    let tokens = if k == 0 { 0 } else { x.len() / d.max(1) };
    for (t, &slot) in tok[..s].iter_mut().zip(&order[..s]) {
        if k == 0 || slot as usize / k >= tokens {
            return Err(Error::Invalid(format!("grouped dispatch: slot {slot} is outside the {tokens} tokens × {k} slots of x")));
        }
        *t = slot / k as u32;
    }
    let (h_ptr, ys_ptr) = (SyncPtr(h.as_mut_ptr()), SyncPtr(ys.as_mut_ptr()));
    let tok = &tok[..s];
    let run = |e: usize| {
        let (r0, r1) = (offsets[e] as usize, offsets[e + 1] as usize);
        let n = r1 - r0;
        if n == 0 {
            return;
        }
        // SAFETY: expert segments are disjoint row ranges of h and ys.
        let (hs, yo) = unsafe { (h_ptr.slice(r0 * g, n * g), ys_ptr.slice(r0 * o, n * o)) };
        let mut segment = |w1: &[f32], b1: &[f32], w2: &[f32], act: Activation| {
            gemm_small_gather(x, &tok[r0..r1], d, w1, g, Some(b1), hs);
            act.apply_inplace(hs);
            gemm_small(hs, g, w2, o, None, yo);
        };
        match w {
            ExpertSource::F32(w) => segment(&w.w1[e * d * g..(e + 1) * d * g], &w.b1[e * g..(e + 1) * g], &w.w2[e * g * o..(e + 1) * g * o], w.act),
            ExpertSource::Quant(q) => {
                DEQ.with_borrow_mut(|(b1, b2)| segment(q.w1.rows(e * d, (e + 1) * d, b1), &q.b1[e * g..(e + 1) * g], q.w2.rows(e * g, (e + 1) * g, b2), q.act))
            }
            ExpertSource::Packed(p) => p.segment(e, x, &tok[r0..r1], hs, yo),
        }
    };
    // below a quarter million multiply-adds in the first maps a fork-join costs more than it
    // saves (a MoEfied MNIST layer at batch 1, 8 experts of 784 × 32: 2x faster serial; the
    // σ-MoE benchmark at batch 1, 4 experts of 512 × 128, is at the threshold and gains)
    if s * d * g >= 1 << 18 && rayon::current_num_threads() > 1 {
        (0..experts).into_par_iter().for_each(run);
    } else {
        (0..experts).for_each(run);
    }
    Ok(())
}

/// An expert bank whose matrices are stored as quantized blocks or bf16, rows as in the checkpoint
/// (`w1`: `E·in × G`, `w2`: `E·G × out`, blocks along the last axis).
pub struct QuantExperts {
    /// Sizes.
    pub shape: ExpertShape,
    /// Hidden nonlinearity.
    pub act: Activation,
    /// `E·in × G`.
    pub w1: MaybeQuant,
    /// `E × G`.
    pub b1: Vec<f32>,
    /// `E·G × out`.
    pub w2: MaybeQuant,
}

impl QuantExperts {
    /// Stores a bank's matrices in `precision` (Q8_0/Q4_0 blocks or bf16; biases stay f32).
    pub fn new(w: &ExpertWeights<'_>, precision: Precision) -> Result<Self> {
        w.check()?;
        let ExpertShape { experts: e, in_features: d, width: g, out_features: o } = w.shape;
        Ok(QuantExperts {
            shape: w.shape,
            act: w.act,
            w1: precision.store(w.w1.to_vec(), e * d, g)?,
            b1: w.b1.to_vec(),
            w2: precision.store(w.w2.to_vec(), e * g, o)?,
        })
    }
}

/// An expert bank whose matrices are packed once for bf16 products ([`crate::core::gemm::matmul_packed`]): every segment multiplies on bf16
/// operand pairs with f32 accumulation, its rows rounded to bf16 while packed.
pub struct PackedExperts {
    /// Sizes.
    pub shape: ExpertShape,
    /// Hidden nonlinearity.
    pub act: Activation,
    /// `E × G`.
    pub b1: Vec<f32>,
    w1: Vec<PackedBf16>,
    w2: Vec<PackedBf16>,
}

impl PackedExperts {
    /// Packs a bank; `None` where the CPU lacks AVX512_BF16.
    pub fn new(w: &ExpertWeights<'_>) -> Result<Option<Self>> {
        w.check()?;
        let ExpertShape { experts: e, in_features: d, width: g, out_features: o } = w.shape;
        // one packed matrix per expert (the bank's sizes were checked above)
        let pack = |m: &[f32], rows: usize, cols: usize| -> Option<Vec<PackedBf16>> {
            (0..e).map(|i| pack_bf16(MatRef::new(&m[i * rows * cols..(i + 1) * rows * cols], rows, cols))).collect()
        };
        let (Some(w1), Some(w2)) = (pack(w.w1, d, g), pack(w.w2, g, o)) else { return Ok(None) };
        Ok(Some(PackedExperts { shape: w.shape, act: w.act, b1: w.b1.to_vec(), w1, w2 }))
    }

    /// Expert `e` over rows `idx` of `x` (`· × in`): `h = act(x[idx]·W1ₑ + b1ₑ)` (`h`:
    /// `n × G`), `out = h·W2ₑ` (`out`: `n × out`, `n = idx.len()`). The rows are gathered
    /// into a per-thread buffer first.
    pub fn segment(&self, e: usize, x: &[f32], idx: &[u32], h: &mut [f32], out: &mut [f32]) {
        let ExpertShape { in_features: d, width: g, out_features: o, .. } = self.shape;
        let n = idx.len();
        // (the product may run rayon jobs on this thread, which `with_buffer` allows for)
        with_buffer(&GATHER, n * d, |xs| {
            for (row, &t) in xs.chunks_exact_mut(d).zip(idx) {
                row.copy_from_slice(&x[t as usize * d..(t as usize + 1) * d]);
            }
            matmul_packed(MatMut::new(&mut h[..n * g], n, g), MatRef::new(xs, n, d), &self.w1[e], Some(&self.b1[e * g..(e + 1) * g]));
        });
        self.act.apply_inplace(&mut h[..n * g]);
        matmul_packed(MatMut::new(&mut out[..n * o], n, o), MatRef::new(&h[..n * g], n, g), &self.w2[e], None);
    }
}

thread_local! {
    /// The gathered rows of one packed segment (grows once per thread).
    static GATHER: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// One expert's dequantized `W1ₑ` and `W2ₑ` (grows once per thread).
    static DEQ: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// `y = a·w (+ bias)` for one expert segment (`a`: `rows × k`, `w`: `k × n`): the unpacked
/// [`gemm_small`] for up to [`SMALL_ROWS`] rows, the GEMM library above.
fn product(a: &[f32], k: usize, w: &[f32], n: usize, bias: Option<&[f32]>, y: &mut [f32]) {
    let rows = a.len() / k;
    if rows <= SMALL_ROWS {
        return gemm_small(a, k, w, n, bias, y);
    }
    for row in y.chunks_exact_mut(n) {
        match bias {
            Some(b) => row.copy_from_slice(b),
            None => row.fill(0.0),
        }
    }
    matmul_serial(MatMut::new(y, rows, n), MatRef::new(a, rows, k), MatRef::new(w, k, n), true);
}

/// Segments up to this many rows use [`gemm_small`].
const SMALL_ROWS: usize = 4;

/// `y[b] = bias + Σⱼ gates[b·k+j] · ys[pos[b·k+j]]` over the kept slots of each token.
/// `y`: `B × out`, `ys`: `S × out`, `gates`/`pos`: `B·k`.
pub fn combine(ys: &[f32], pos: &[u32], gates: &[f32], k: usize, bias: &[f32], y: &mut [f32]) {
    let o = bias.len();
    let one = |(b, row): (usize, &mut [f32])| {
        row.copy_from_slice(bias);
        for j in 0..k {
            let s = b * k + j;
            if pos[s] != DROPPED {
                let r = pos[s] as usize;
                crate::core::simd::axpy(gates[s], &ys[r * o..(r + 1) * o], row);
            }
        }
    };
    if y.len() * k >= 1 << 16 {
        y.par_chunks_mut(o).enumerate().for_each(one);
    } else {
        y.chunks_mut(o).enumerate().for_each(one);
    }
}

/// Backward of [`combine`]: `dys[pos[s]] = gates[s] · dy[b]` and `dgates[s] = dy[b] · ys[pos[s]]`
/// (0 for dropped slots).
#[allow(clippy::too_many_arguments)]
pub fn combine_backward(dy: &[f32], ys: &[f32], pos: &[u32], gates: &[f32], k: usize, o: usize, dys: &mut [f32], dgates: &mut [f32]) {
    for (s, (&p, dg)) in pos.iter().zip(dgates.iter_mut()).enumerate() {
        if p == DROPPED {
            *dg = 0.0;
            continue;
        }
        let (b, r) = (s / k, p as usize);
        let dyb = &dy[b * o..(b + 1) * o];
        *dg = dot(dyb, &ys[r * o..(r + 1) * o]);
        for (d, &v) in dys[r * o..(r + 1) * o].iter_mut().zip(dyb) {
            *d = gates[s] * v;
        }
    }
}

/// Backward of [`experts_forward`] over the same segments. Adds into every expert's weight
/// gradients (nothing for experts that got no rows) and writes `dxs` (`S × in`), the gradient
/// of the gathered rows. `dh` is scratch of `S × G`.
///
/// Errors (nothing is written) when the weights or gradients do not match `w.shape`,
/// `offsets` is not a valid segment table, or a buffer is too short for `S` rows.
#[allow(clippy::too_many_arguments)]
pub fn experts_backward(
    w: &ExpertWeights<'_>,
    grads: ExpertGrads<'_>,
    offsets: &[u32],
    xs: &[f32],
    pre: &[f32],
    h: &[f32],
    dys: &[f32],
    dh: &mut [f32],
    dxs: &mut [f32],
) -> Result<()> {
    let ExpertShape { experts, in_features: d, width: g, out_features: o } = w.shape;
    w.check()?;
    ExpertWeights { shape: w.shape, w1: &*grads.w1, b1: &*grads.b1, w2: &*grads.w2, act: w.act }.check()?;
    let s = check_segments(
        offsets,
        experts,
        &[("xs", xs.len(), d), ("pre", pre.len(), g), ("h", h.len(), g), ("dys", dys.len(), o), ("dh", dh.len(), g), ("dxs", dxs.len(), d)],
    )?;
    let ptrs = (SyncPtr(grads.w1.as_mut_ptr()), SyncPtr(grads.b1.as_mut_ptr()), SyncPtr(grads.w2.as_mut_ptr()));
    let (dh_ptr, dxs_ptr) = (SyncPtr(dh.as_mut_ptr()), SyncPtr(dxs.as_mut_ptr()));
    let run = |e: usize| {
        let (p1, pb, p2) = ptrs;
        // SAFETY: each expert owns its own gradient blocks and row segment.
        let (gw1, gb1, gw2) = unsafe { (p1.slice(e * d * g, d * g), pb.slice(e * g, g), p2.slice(e * g * o, g * o)) };
        let (r0, r1) = (offsets[e] as usize, offsets[e + 1] as usize);
        let n = r1 - r0;
        if n == 0 {
            return;
        }
        // SAFETY: as above.
        let (dhs, dx) = unsafe { (dh_ptr.slice(r0 * g, n * g), dxs_ptr.slice(r0 * d, n * d)) };
        let (hs, dy, x) = (&h[r0 * g..r1 * g], &dys[r0 * o..r1 * o], &xs[r0 * d..r1 * d]);
        let w1 = MatRef::new(&w.w1[e * d * g..(e + 1) * d * g], d, g);
        let w2 = MatRef::new(&w.w2[e * g * o..(e + 1) * g * o], g, o);
        matmul_serial(MatMut::new(gw2, g, o), MatRef::new(hs, n, g).t(), MatRef::new(dy, n, o), true);
        matmul_serial(MatMut::new(dhs, n, g), MatRef::new(dy, n, o), w2.t(), false);
        w.act.backward_inplace(&pre[r0 * g..r1 * g], dhs);
        matmul_serial(MatMut::new(gw1, d, g), MatRef::new(x, n, d).t(), MatRef::new(dhs, n, g), true);
        crate::core::gemm::add_sum_rows(dhs, g, gb1);
        matmul_serial(MatMut::new(dx, n, d), MatRef::new(dhs, n, g), w1.t(), false);
    };
    if experts > 1 && rayon::current_num_threads() > 1 && s * d * g >= 1 << 16 {
        (0..experts).into_par_iter().for_each(run);
    } else {
        (0..experts).for_each(run);
    }
    Ok(())
}

/// `dx[b] (+)= Σⱼ dxs[pos[b·k+j]]`: the input gradient of each token from its kept slots.
pub fn scatter_rows_add(dxs: &[f32], pos: &[u32], k: usize, d: usize, dx: &mut [f32], accumulate: bool) {
    for (b, row) in dx.chunks_exact_mut(d).enumerate() {
        if !accumulate {
            row.fill(0.0);
        }
        for j in 0..k {
            let p = pos[b * k + j];
            if p != DROPPED {
                let r = p as usize;
                for (v, &g) in row.iter_mut().zip(&dxs[r * d..(r + 1) * d]) {
                    *v += g;
                }
            }
        }
    }
}

/// The `k` largest of `scores` in descending order (ties: lower index first), written to
/// `idx` and `val` (both length `k ≤ scores.len()`). `skip(i)` excludes entries.
pub fn top_k(scores: &[f32], k: usize, idx: &mut [u32], val: &mut [f32], skip: impl Fn(usize) -> bool) -> usize {
    let mut n = 0;
    for (i, &s) in scores.iter().enumerate() {
        if skip(i) {
            continue;
        }
        if n == k && s <= val[k - 1] {
            continue;
        }
        // insertion: find the slot, shift the tail
        let mut p = if n < k { n } else { k - 1 };
        while p > 0 && val[p - 1] < s {
            if p < k {
                val[p] = val[p - 1];
                idx[p] = idx[p - 1];
            }
            p -= 1;
        }
        val[p] = s;
        idx[p] = i as u32;
        if n < k {
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatch_sorts_stably_and_skips_dropped() {
        let assign = [2u32, 0, DROPPED, 2, 1, 0];
        let (mut off, mut order, mut pos) = ([0u32; 4], [0u32; 6], [0u32; 6]);
        let s = dispatch(&assign, 3, &mut off, &mut order, &mut pos);
        assert_eq!(s, 5);
        assert_eq!(off, [0, 2, 3, 5]);
        assert_eq!(&order[..5], &[1, 5, 4, 0, 3]);
        assert_eq!(pos, [3, 0, DROPPED, 4, 2, 1]);
    }

    #[test]
    fn top_k_orders_descending_with_low_index_ties() {
        let scores = [0.5, 2.0, -1.0, 2.0, 3.0, 0.5];
        let (mut idx, mut val) = ([0u32; 3], [0f32; 3]);
        assert_eq!(top_k(&scores, 3, &mut idx, &mut val, |_| false), 3);
        assert_eq!(idx, [4, 1, 3]);
        assert_eq!(val, [3.0, 2.0, 2.0]);
        let (mut idx, mut val) = ([0u32; 2], [0f32; 2]);
        top_k(&scores, 2, &mut idx, &mut val, |i| i == 4);
        assert_eq!(idx, [1, 3]);
        let (mut idx, mut val) = ([0u32; 4], [0f32; 4]);
        assert_eq!(top_k(&scores[..2], 4, &mut idx, &mut val, |_| false), 2);
        assert_eq!(&idx[..2], &[1, 0]);
    }
}
