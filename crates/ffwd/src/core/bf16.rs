//! bfloat16 weight storage for memory-bound inference kernels. A bf16 value is the top half of
//! an f32 (8 exponent bits, 7 mantissa bits): conversion rounds to nearest even, widening is a
//! shift. The kernels here read bf16 weights, widen them on load and compute in f32 against
//! f32 activations, so only the weights carry the rounding (relative error ≤ 2⁻⁸ per weight)
//! while half the bytes cross the memory system.

/// One bfloat16 value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl Bf16 {
    /// Rounds to the nearest bf16 (ties to even); NaN stays NaN.
    pub fn from_f32(v: f32) -> Self {
        if v.is_nan() {
            return Bf16(((v.to_bits() >> 16) as u16) | 0x40);
        }
        Bf16(round_bits(v))
    }

    /// The exact f32 value.
    #[inline(always)]
    pub fn to_f32(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }
}

/// The bf16 bits of a non-NaN `v`, rounded to nearest even (a NaN may come out as infinity):
/// [`Bf16::from_f32`] without its NaN branch, for loops that convert operands known to be
/// numbers (the bf16 matrix products' packing).
#[inline(always)]
pub(crate) fn round_bits(v: f32) -> u16 {
    let b = v.to_bits();
    (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// `v` rounded to bf16.
pub fn to_bf16(v: &[f32]) -> Vec<Bf16> {
    v.iter().map(|&x| Bf16::from_f32(x)).collect()
}

/// `dst[i] = src[i]` widened to f32 (exact; a loop the compiler vectorises to shifts).
pub fn widen_into(src: &[Bf16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "widen_into: lengths");
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// Storage position of column `c` in a row of `n` columns in the paired layout the kernels
/// here read: every full block of 32 columns is stored as (0, 16), (1, 17), …, (15, 31), so
/// one 64-byte load holds columns 0–15 in the low halves of its 32-bit lanes and 16–31 in
/// the high halves, and widening is one shift or one mask instead of a lane shuffle. The
/// last `n mod 32` columns stay in order.
#[inline]
pub fn paired_index(c: usize, n: usize) -> usize {
    let block = c / 32 * 32;
    if block + 32 > n {
        return c;
    }
    let j = c - block;
    block + if j < 16 { 2 * j } else { 2 * (j - 16) + 1 }
}

/// A row-major `rows × n` matrix rounded to bf16 in the paired layout of [`paired_index`].
pub fn to_bf16_paired(v: &[f32], n: usize) -> Vec<Bf16> {
    let mut out = vec![Bf16::default(); v.len()];
    for (src, dst) in v.chunks(n.max(1)).zip(out.chunks_mut(n.max(1))) {
        for (c, &x) in src.iter().enumerate() {
            dst[paired_index(c, n)] = Bf16::from_f32(x);
        }
    }
    out
}

/// One row stored in the paired layout of [`paired_index`] (`src.len() == dst.len()` columns)
/// widened back to f32 in column order: the inverse of [`to_bf16_paired`] for one row.
pub fn widen_paired_row(src: &[Bf16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "widen_paired_row: lengths");
    let full = dst.len() / 32 * 32;
    // full blocks of 32 hold (0, 16), (1, 17), …; the tail is in order
    for (d, s) in dst[..full].chunks_exact_mut(32).zip(src[..full].chunks_exact(32)) {
        for j in 0..16 {
            d[j] = s[2 * j].to_f32();
            d[16 + j] = s[2 * j + 1].to_f32();
        }
    }
    widen_into(&src[full..], &mut dst[full..]);
}

/// `w · x` with `w` a bf16 row in the paired layout (`w.len() == x.len()`), accumulated in f32.
#[inline]
pub fn dot_bf16(w: &[Bf16], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_bf16: lengths");
    #[cfg(target_arch = "x86_64")]
    {
        if crate::core::cpu::avx512() {
            // SAFETY: the CPU supports AVX-512F; lengths checked.
            return unsafe { x86::dot4(&[w], &[x])[0] };
        }
    }
    let n = x.len();
    x.iter().enumerate().map(|(c, b)| w[paired_index(c, n)].to_f32() * b).sum()
}

/// Four independent [`dot_bf16`]s in one interleaved pass (all slices of one length). Each
/// result is bit-identical to [`dot_bf16`]'s.
#[inline]
pub fn dot4_bf16(w: [&[Bf16]; 4], x: [&[f32]; 4]) -> [f32; 4] {
    let n = w[0].len();
    assert!(w.iter().all(|r| r.len() == n) && x.iter().all(|r| r.len() == n), "dot4_bf16: lengths");
    #[cfg(target_arch = "x86_64")]
    {
        if crate::core::cpu::avx512() {
            // SAFETY: the CPU supports AVX-512F; lengths checked.
            let r = unsafe { x86::dot4(&w, &x) };
            return [r[0], r[1], r[2], r[3]];
        }
    }
    [dot_bf16(w[0], x[0]), dot_bf16(w[1], x[1]), dot_bf16(w[2], x[2]), dot_bf16(w[3], x[3])]
}

/// `y (+)= Σᵢ coef[i] · w[rows[i]·n .. + n]` with `n = y.len()` and `w` in bf16 (paired layout):
/// the bf16 form of [`crate::core::simd::weighted_row_sum`].
#[inline]
pub fn weighted_row_sum_bf16(coef: &[f32], w: &[Bf16], rows: &[usize], y: &mut [f32], accumulate: bool) {
    let n = y.len();
    assert!(coef.len() == rows.len() && rows.iter().all(|&r| crate::core::simd::row_end(r, n).is_some_and(|e| e <= w.len())), "weighted_row_sum_bf16: shapes");
    #[cfg(target_arch = "x86_64")]
    {
        if crate::core::cpu::avx512() {
            // SAFETY: the CPU supports AVX-512F; rows in bounds (asserted).
            return unsafe { x86::weighted_row_sum(coef, w, rows, y, accumulate) };
        }
    }
    if !accumulate {
        y.fill(0.0);
    }
    for (&a, &r) in coef.iter().zip(rows) {
        let row = &w[r * n..(r + 1) * n];
        for (c, v) in y.iter_mut().enumerate() {
            *v += a * row[paired_index(c, n)].to_f32();
        }
    }
}

#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Bf16;
    use std::arch::x86_64::*;

    /// Sixteen bf16 values at `p` widened to f32 (all sixteen must be readable).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const Bf16) -> __m512 {
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }

    /// 32 paired bf16 values at `p` (see `paired_index`) widened: columns 0–15 and 16–31.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load32(p: *const Bf16) -> (__m512, __m512) {
        let v = _mm512_loadu_si512(p as *const __m512i);
        let lo = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
        let hi = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xFFFF_0000u32 as i32)));
        (lo, hi)
    }

    /// The first `len < 16` bf16 values at `p` widened (the rest zero), read one by one so
    /// nothing past the slice is touched.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_tail(p: *const Bf16, len: usize) -> __m512 {
        let mut buf = [0.0f32; 16];
        for i in 0..len {
            buf[i] = (*p.add(i)).to_f32();
        }
        _mm512_loadu_ps(buf.as_ptr())
    }

    /// Up to four dot products with the accumulation order of `simd::dot` (two accumulators
    /// over alternating 16-blocks, the tail into the second).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot4<const R: usize>(w: &[&[Bf16]; R], x: &[&[f32]; R]) -> [f32; R] {
        let n = w[0].len();
        let (pw, px) = (w.map(|s| s.as_ptr()), x.map(|s| s.as_ptr()));
        let (mut s0, mut s1) = ([_mm512_setzero_ps(); R], [_mm512_setzero_ps(); R]);
        let mut i = 0;
        while i + 32 <= n {
            for k in 0..R {
                let (lo, hi) = load32(pw[k].add(i));
                s0[k] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(px[k].add(i)), s0[k]);
                s1[k] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(px[k].add(i + 16)), s1[k]);
            }
            i += 32;
        }
        if i + 16 <= n {
            for k in 0..R {
                s0[k] = _mm512_fmadd_ps(load16(pw[k].add(i)), _mm512_loadu_ps(px[k].add(i)), s0[k]);
            }
            i += 16;
        }
        if i < n {
            let m: __mmask16 = (1u32 << (n - i)) as u16 - 1;
            for k in 0..R {
                s1[k] = _mm512_fmadd_ps(load_tail(pw[k].add(i), n - i), _mm512_maskz_loadu_ps(m, px[k].add(i)), s1[k]);
            }
        }
        std::array::from_fn(|k| _mm512_reduce_add_ps(_mm512_add_ps(s0[k], s1[k])))
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn weighted_row_sum(coef: &[f32], w: &[Bf16], rows: &[usize], y: &mut [f32], accumulate: bool) {
        let n = y.len();
        let (pw, py) = (w.as_ptr(), y.as_mut_ptr());
        let mut c = 0;
        while c + 64 <= n {
            let mut acc: [__m512; 4] = std::array::from_fn(|q| if accumulate { _mm512_loadu_ps(py.add(c + 16 * q)) } else { _mm512_setzero_ps() });
            for (&a, &r) in coef.iter().zip(rows) {
                let (va, p) = (_mm512_set1_ps(a), pw.add(r * n + c));
                let ((w0, w1), (w2, w3)) = (load32(p), load32(p.add(32)));
                acc[0] = _mm512_fmadd_ps(va, w0, acc[0]);
                acc[1] = _mm512_fmadd_ps(va, w1, acc[1]);
                acc[2] = _mm512_fmadd_ps(va, w2, acc[2]);
                acc[3] = _mm512_fmadd_ps(va, w3, acc[3]);
            }
            for q in 0..4 {
                _mm512_storeu_ps(py.add(c + 16 * q), acc[q]);
            }
            c += 64;
        }
        if c + 32 <= n {
            let mut acc: [__m512; 2] = std::array::from_fn(|q| if accumulate { _mm512_loadu_ps(py.add(c + 16 * q)) } else { _mm512_setzero_ps() });
            for (&a, &r) in coef.iter().zip(rows) {
                let (w0, w1) = load32(pw.add(r * n + c));
                acc[0] = _mm512_fmadd_ps(_mm512_set1_ps(a), w0, acc[0]);
                acc[1] = _mm512_fmadd_ps(_mm512_set1_ps(a), w1, acc[1]);
            }
            _mm512_storeu_ps(py.add(c), acc[0]);
            _mm512_storeu_ps(py.add(c + 16), acc[1]);
            c += 32;
        }
        // the last n mod 32 columns are stored in order
        while c < n {
            let len = (n - c).min(16);
            let m: __mmask16 = if len == 16 { 0xFFFF } else { ((1u32 << len) - 1) as u16 };
            let mut acc = if accumulate { _mm512_maskz_loadu_ps(m, py.add(c)) } else { _mm512_setzero_ps() };
            for (&a, &r) in coef.iter().zip(rows) {
                let p = pw.add(r * n + c);
                let v = if len == 16 { load16(p) } else { load_tail(p, len) };
                acc = _mm512_fmadd_ps(_mm512_set1_ps(a), v, acc);
            }
            _mm512_mask_storeu_ps(py.add(c), m, acc);
            c += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Rng;

    #[test]
    fn rounding_is_nearest_even_and_widening_exact() {
        assert_eq!(Bf16::from_f32(1.0).to_f32(), 1.0);
        // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: ties to even (1.0)
        assert_eq!(Bf16::from_f32(1.0 + 1.0 / 256.0).to_f32(), 1.0);
        assert_eq!(Bf16::from_f32(1.0 + 3.0 / 256.0).to_f32(), 1.0 + 4.0 / 256.0);
        assert_eq!(Bf16::from_f32(-2.5).to_f32(), -2.5);
        assert!(Bf16::from_f32(f32::NAN).to_f32().is_nan());
        assert_eq!(Bf16::from_f32(f32::INFINITY).to_f32(), f32::INFINITY);
        let mut r = Rng::new(1);
        for _ in 0..1000 {
            let v = r.normal() * 100.0;
            let q = Bf16::from_f32(v).to_f32();
            assert!((q - v).abs() <= v.abs() / 256.0, "{v} -> {q}");
        }
    }

    #[test]
    fn paired_layout_is_a_permutation_of_each_row() {
        for n in [1usize, 16, 31, 32, 33, 64, 70, 768] {
            let mut seen = vec![false; n];
            for c in 0..n {
                let p = paired_index(c, n);
                assert!(p < n && !seen[p], "n={n} c={c}");
                seen[p] = true;
            }
            let v: Vec<f32> = (0..2 * n).map(|i| (i % 256) as f32).collect();
            let w = to_bf16_paired(&v, n);
            for c in 0..n {
                assert_eq!(w[n + paired_index(c, n)].to_f32(), ((n + c) % 256) as f32, "row 1, n={n} c={c}");
            }
            // widening a paired row gives the columns back in order
            let mut back = vec![f32::NAN; n];
            widen_paired_row(&w[n..], &mut back);
            assert_eq!(back, v[n..], "widened row 1, n={n}");
        }
    }

    #[test]
    fn kernels_match_the_widened_reference_for_every_length() {
        let mut r = Rng::new(2);
        for n in 1..100 {
            // weights already on the bf16 grid, so the paired copy holds them exactly
            let wide: Vec<f32> = (0..4 * n).map(|_| Bf16::from_f32(r.normal()).to_f32()).collect();
            let w = to_bf16_paired(&wide, n);
            let x: Vec<f32> = (0..4 * n).map(|_| r.normal()).collect();
            let rows: [&[Bf16]; 4] = std::array::from_fn(|k| &w[k * n..(k + 1) * n]);
            let xs: [&[f32]; 4] = std::array::from_fn(|k| &x[k * n..(k + 1) * n]);
            let d4 = dot4_bf16(rows, xs);
            for k in 0..4 {
                let want = crate::core::simd::dot(&wide[k * n..(k + 1) * n], xs[k]);
                assert!((d4[k] - want).abs() <= 1e-5 * (1.0 + want.abs()), "dot4_bf16 n={n}");
                // lockstep and single walks must take the same branches
                assert_eq!(dot_bf16(rows[k], xs[k]).to_bits(), d4[k].to_bits(), "dot_bf16 n={n}");
            }
            let (coef, picks) = ([0.5f32, -1.0, 2.0], [3usize, 0, 3]);
            let mut y = x[..n].to_vec();
            weighted_row_sum_bf16(&coef, &w, &picks, &mut y, true);
            let mut want = x[..n].to_vec();
            crate::core::simd::weighted_row_sum(&coef, &wide, &picks, &mut want, true);
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "weighted_row_sum_bf16 n={n}: {a} vs {b}");
            }
        }
    }
}
