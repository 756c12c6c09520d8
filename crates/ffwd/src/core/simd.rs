//! Vector kernels with runtime CPU dispatch: AVX-512F, then AVX2+FMA, then portable code.
//! The crate is compiled for baseline x86-64, so these functions pick the widest unit the
//! running CPU has (the check is a cached atomic load).

/// `Σ_{i < n} f(i)` in 16 interleaved partial sums (so that the loop vectorises, with the same
/// result on every instruction set), then added up.
#[inline(always)]
pub(crate) fn lane_sum(n: usize, f: impl Fn(usize) -> f32) -> f32 {
    let mut acc = [0.0f32; 16];
    let full = n - n % 16;
    for c in (0..full).step_by(16) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(c + l);
        }
    }
    for (l, a) in acc.iter_mut().enumerate().take(n - full) {
        *a += f(full + l);
    }
    acc.iter().sum()
}

/// Dot product of `a` and `b`; panics when their lengths differ (a caller bug, not input).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: slices of different lengths");
    let n = a.len();
    #[cfg(target_arch = "x86_64")]
    {
        if n >= 16 && crate::core::cpu::avx512() {
            // SAFETY: the CPU supports AVX-512F (checked above); slices have equal length n.
            return unsafe { x86::dot_avx512(a, b) };
        }
        if n >= 8 && crate::core::cpu::avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { x86::dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

/// `y[i] += alpha * x[i]`; panics when the lengths differ (a caller bug, not input).
#[inline]
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy: slices of different lengths");
    let n = x.len();
    #[cfg(target_arch = "x86_64")]
    {
        if n >= 16 && crate::core::cpu::avx512() {
            // SAFETY: as in `dot`.
            return unsafe { x86::axpy_avx512(alpha, x, y) };
        }
        if n >= 8 && crate::core::cpu::avx2() {
            // SAFETY: as in `dot`.
            return unsafe { x86::axpy_avx2(alpha, x, y) };
        }
    }
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// `y += a[0]·r[0] + a[1]·r[1] + a[2]·r[2] + a[3]·r[3]` (four rows in one pass over `y`: a
/// quarter of the loads and stores of four `axpy` calls). Rows must be at least `y.len()` long.
#[inline]
pub fn axpy4(a: [f32; 4], r: [&[f32]; 4], y: &mut [f32]) {
    let n = y.len();
    let r = [&r[0][..n], &r[1][..n], &r[2][..n], &r[3][..n]];
    #[cfg(target_arch = "x86_64")]
    {
        if n >= 16 && crate::core::cpu::avx512() {
            // SAFETY: the CPU supports AVX-512F; every row has n values.
            return unsafe { x86::axpy4_avx512(a, r, y) };
        }
    }
    for i in 0..n {
        y[i] += a[0] * r[0][i] + a[1] * r[1][i] + a[2] * r[2][i] + a[3] * r[3][i];
    }
}

/// `y (+)= Σᵢ coef[i] · w[rows[i]·n .. rows[i]·n + n]` with `n = y.len()` (added to `y` when
/// `accumulate`, else overwriting it): a weighted sum of scattered rows of `w`, `y` written once (each column block of `y` stays in a register while
/// all the rows pass, which also keeps one memory stream per row in flight).
#[inline]
pub fn weighted_row_sum(coef: &[f32], w: &[f32], rows: &[usize], y: &mut [f32], accumulate: bool) {
    let n = y.len();
    assert!(coef.len() == rows.len() && rows.iter().all(|&r| row_end(r, n).is_some_and(|e| e <= w.len())), "weighted_row_sum: shapes");
    #[cfg(target_arch = "x86_64")]
    {
        if crate::core::cpu::avx512() {
            // SAFETY: the CPU supports AVX-512F; every row is in bounds (asserted).
            return unsafe { x86::weighted_row_sum_avx512(coef, w, rows, y, accumulate) };
        }
    }
    if !accumulate {
        y.fill(0.0);
    }
    for (&c, &r) in coef.iter().zip(rows) {
        axpy(c, &w[r * n..(r + 1) * n], y);
    }
}

/// `(r + 1) · n`, the end of row `r` of width `n`, or `None` on overflow (bounds checks must
/// not wrap around in release builds).
#[inline]
pub(crate) fn row_end(r: usize, n: usize) -> Option<usize> {
    r.checked_add(1)?.checked_mul(n)
}

/// `a · b` or `None` on overflow.
#[inline]
fn mul(a: usize, b: usize) -> Option<usize> {
    a.checked_mul(b)
}

/// Four independent dot products `a[k]·b[k]` in one interleaved pass (all slices of one
/// length): four memory streams in flight instead of one. Each result is bit-identical to
/// [`dot`]'s, so lockstep and one-at-a-time tree walks take the same branches.
#[inline]
pub fn dot4(a: [&[f32]; 4], b: [&[f32]; 4]) -> [f32; 4] {
    let n = a[0].len();
    assert!(a.iter().chain(&b).all(|s| s.len() == n), "dot4: slices of different lengths");
    #[cfg(target_arch = "x86_64")]
    {
        if n >= 16 && crate::core::cpu::avx512() {
            // SAFETY: the CPU supports AVX-512F; all eight slices have n values.
            return unsafe { x86::dot4_avx512(a, b) };
        }
    }
    [dot(a[0], b[0]), dot(a[1], b[1]), dot(a[2], b[2]), dot(a[3], b[3])]
}

/// `y = a·w + bias` for a short row-major `a` (`rows × k`), `w` (`k × n`), `y` (`rows × n`),
/// `bias` (`n`, or zero when `None`). No packing: one to three rows stream `w` row by row
/// (narrow outputs of ≤ 32 columns with four partial sums over `k`); four or more rows read
/// panels of `w` in place while blocks of rows of `a` pass them, with the accumulators in
/// registers (64 columns × 4 rows, or 32 × 8 for narrow outputs). For products of a few rows
/// (a grouped expert dispatch at batch 1, a tree leaf), where packing `w` costs more than the
/// product. With `w` in cache it runs at 100–160 GFLOP/s on one core, like the GEMM library,
/// but on wide-`k` products of tens of rows the library is up to 40 % faster
/// (`cargo bench --bench moe_loop -- --gemm`), so the dispatch uses it from five rows on.
pub fn gemm_small(a: &[f32], k: usize, w: &[f32], n: usize, bias: Option<&[f32]>, y: &mut [f32]) {
    let rows = a.len().checked_div(k).unwrap_or(0);
    assert!(k > 0 && a.len() == rows * k && mul(rows, n) == Some(y.len()), "gemm_small: shapes");
    let (pa, py) = (a.as_ptr(), y.as_mut_ptr());
    // SAFETY: row r of `a` is a[r·k..(r+1)·k] and of `y` is y[r·n..(r+1)·n], in bounds and
    // disjoint (shapes asserted above).
    unsafe { small_product(rows, |r| pa.add(r * k), k, w, n, bias, |r| py.add(r * n)) }
}

/// [`gemm_small`] over gathered rows: row `r` of the product reads `a[idx[r]]` (`a`: `? × k`)
/// and writes `y[r]` (`y`: `idx.len() × n`). Saves copying the rows a router picked.
pub fn gemm_small_gather(a: &[f32], idx: &[u32], k: usize, w: &[f32], n: usize, bias: Option<&[f32]>, y: &mut [f32]) {
    let avail = a.len().checked_div(k).unwrap_or(0);
    assert!(k > 0 && mul(idx.len(), n) == Some(y.len()) && idx.iter().all(|&i| (i as usize) < avail), "gemm_small_gather: shapes");
    let (pa, py) = (a.as_ptr(), y.as_mut_ptr());
    // SAFETY: every index is below the row count of `a` (asserted); output rows are disjoint.
    unsafe { small_product(idx.len(), |r| pa.add(idx[r] as usize * k), k, w, n, bias, |r| py.add(r * n)) }
}

/// [`gemm_small`] scattering its output: row `r` of `a` (`rows × k`) writes row `idx[r]` of the
/// matrix at `y` (`n` columns).
///
/// # Safety
/// Every `y + idx[r]·n .. + n` must be valid for writes, the indices distinct, and no other
/// reference may touch those rows during the call.
pub unsafe fn gemm_small_scatter(a: &[f32], k: usize, w: &[f32], n: usize, bias: Option<&[f32]>, y: *mut f32, idx: &[u32]) {
    assert!(k > 0 && mul(idx.len(), k) == Some(a.len()), "gemm_small_scatter: shapes");
    let pa = a.as_ptr();
    // SAFETY: `a` rows in bounds (asserted); the caller vouches for the output rows.
    unsafe { small_product(idx.len(), |r| pa.add(r * k), k, w, n, bias, |r| y.add(idx[r] as usize * n)) }
}

/// The body of the `gemm_small` family: row `r` of the product reads `k` values at `ar(r)` and
/// writes `n` values at `yr(r)`.
///
/// # Safety
/// `ar(r)` valid for `k` reads and `yr(r)` for `n` writes for every `r < rows`, output rows
/// disjoint and unaliased.
unsafe fn small_product(
    rows: usize,
    ar: impl Fn(usize) -> *const f32 + Copy,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    yr: impl Fn(usize) -> *mut f32 + Copy,
) {
    assert!(mul(k, n).is_some_and(|kn| w.len() >= kn) && bias.is_none_or(|b| b.len() == n), "gemm_small: weight or bias length");
    #[cfg(target_arch = "x86_64")]
    {
        if (rows >= 4 || n <= 32) && crate::core::cpu::avx512() {
            // SAFETY: the CPU supports AVX-512F; rows are valid per the caller.
            return unsafe { x86::gemm_small_avx512(rows, ar, k, w, n, bias, yr) };
        }
    }
    // The product is a stream over `w`, read row after row (contiguous, which the hardware
    // prefetcher follows best) four rows per pass over each output row.
    for r in 0..rows {
        // SAFETY: per the caller's contract.
        let (arow, yrow) = unsafe { (std::slice::from_raw_parts(ar(r), k), std::slice::from_raw_parts_mut(yr(r), n)) };
        match bias {
            Some(b) => yrow.copy_from_slice(b),
            None => yrow.fill(0.0),
        }
        let mut j = 0;
        while j + 4 <= k {
            prefetch_rows(w, (j + PREFETCH_ROWS) * n, 4 * n);
            axpy4([arow[j], arow[j + 1], arow[j + 2], arow[j + 3]], [&w[j * n..], &w[(j + 1) * n..], &w[(j + 2) * n..], &w[(j + 3) * n..]], yrow);
            j += 4;
        }
        for (jj, &aj) in arow.iter().enumerate().skip(j) {
            axpy(aj, &w[jj * n..(jj + 1) * n], yrow);
        }
    }
}

/// How far ahead (in rows of `w`) the streaming path of [`gemm_small`] prefetches: expert
/// weights are short streams that the hardware prefetcher ramps up on too late.
const PREFETCH_ROWS: usize = 16;

/// Prefetches `w[from..from + len]` into L2 (no-op past the end or off x86).
#[inline]
pub(crate) fn prefetch_rows(w: &[f32], from: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if from < w.len() {
            let end = (from + len).min(w.len());
            let mut i = from;
            while i < end {
                // SAFETY: prefetch is a hint; the address is in bounds.
                unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(w.as_ptr().add(i) as *const i8) };
                i += 16;
            }
        }
    }
}

/// Portable dot product with eight independent accumulators.
#[inline]
pub fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    tail + ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

// Index loops over register arrays read closer to the intrinsics they stand for.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        while i + 32 <= n {
            s0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), s0);
            s1 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i + 16)), _mm512_loadu_ps(pb.add(i + 16)), s1);
            i += 32;
        }
        if i + 16 <= n {
            s0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), s0);
            i += 16;
        }
        if i < n {
            let m: __mmask16 = (1u32 << (n - i)) as u16 - 1;
            s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, pa.add(i)), _mm512_maskz_loadu_ps(m, pb.add(i)), s1);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(s0, s1))
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn axpy_avx512(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len();
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let va = _mm512_set1_ps(alpha);
        let mut i = 0;
        while i + 16 <= n {
            _mm512_storeu_ps(py.add(i), _mm512_fmadd_ps(va, _mm512_loadu_ps(px.add(i)), _mm512_loadu_ps(py.add(i))));
            i += 16;
        }
        if i < n {
            let m: __mmask16 = (1u32 << (n - i)) as u16 - 1;
            let v = _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, px.add(i)), _mm512_maskz_loadu_ps(m, py.add(i)));
            _mm512_mask_storeu_ps(py.add(i), m, v);
        }
    }

    /// Rows of `w` per panel of [`gemm_small_avx512`] before the accumulators are stored.
    const KC: usize = 256;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn gemm_small_avx512(
        rows: usize,
        ar: impl Fn(usize) -> *const f32 + Copy,
        k: usize,
        w: &[f32],
        n: usize,
        bias: Option<&[f32]>,
        yr: impl Fn(usize) -> *mut f32 + Copy,
    ) {
        let pw = w.as_ptr();
        let pb = bias.map_or(std::ptr::null(), |b| b.as_ptr());
        // narrow outputs (a tree leaf's 32 hidden units): one row with partial sums over k, or
        // 32 columns × 8 rows, so no lane idles; one to three wide rows: 128-column panels read
        // longer contiguous runs of each row of `w` (the product is a stream over `w`); four or
        // more: 64 columns × 4 rows in registers
        if rows < 4 && n <= 32 {
            for r in 0..rows {
                narrow_row(ar(r), k, pw, n, pb, yr(r));
            }
        } else if rows < 4 {
            panels::<1, 8>(rows, ar, k, pw, n, pb, yr);
        } else if n <= 32 {
            // blocks of eight rows, then of four, then single rows with partial sums over k
            let eights = rows / 8 * 8;
            panels::<8, 2>(eights, ar, k, pw, n, pb, yr);
            let fours = (rows - eights) / 4 * 4;
            panels::<4, 2>(fours, |r| ar(eights + r), k, pw, n, pb, |r| yr(eights + r));
            for r in eights + fours..rows {
                narrow_row(ar(r), k, pw, n, pb, yr(r));
            }
        } else {
            panels::<4, 4>(rows, ar, k, pw, n, pb, yr);
        }
    }

    /// One row times a `k × n` matrix with `n ≤ 32`: two vectors of output, so four partial sums
    /// over `k` keep eight FMA chains in flight (a single chain would wait on the FMA latency at
    /// every row of `w`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn narrow_row(a: *const f32, k: usize, w: *const f32, n: usize, bias: *const f32, y: *mut f32) {
        let mask = |lo: usize| -> __mmask16 {
            if lo >= n {
                0
            } else if lo + 16 <= n {
                0xFFFF
            } else {
                ((1u32 << (n - lo)) - 1) as u16
            }
        };
        let m = [mask(0), mask(16)];
        let mut acc = [[_mm512_setzero_ps(); 2]; 4];
        let mut j = 0;
        while j + 4 <= k {
            for u in 0..4 {
                let av = _mm512_set1_ps(*a.add(j + u));
                for q in 0..2 {
                    acc[u][q] = _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(m[q], w.add((j + u) * n + 16 * q)), acc[u][q]);
                }
            }
            j += 4;
        }
        while j < k {
            let av = _mm512_set1_ps(*a.add(j));
            for q in 0..2 {
                acc[0][q] = _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(m[q], w.add(j * n + 16 * q)), acc[0][q]);
            }
            j += 1;
        }
        for q in 0..2 {
            let mut v = _mm512_add_ps(_mm512_add_ps(acc[0][q], acc[1][q]), _mm512_add_ps(acc[2][q], acc[3][q]));
            if !bias.is_null() {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m[q], bias.add(16 * q)));
            }
            _mm512_mask_storeu_ps(y.add(16 * q), m[q], v);
        }
    }

    /// Blocks of `R` rows × `16·NV` columns, then the leftover rows one at a time.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn panels<const R: usize, const NV: usize>(
        rows: usize,
        ar: impl Fn(usize) -> *const f32 + Copy,
        k: usize,
        pw: *const f32,
        n: usize,
        pb: *const f32,
        yr: impl Fn(usize) -> *mut f32 + Copy,
    ) {
        let mut c = 0;
        while c < n {
            // masks of the 16-wide vectors of this panel (zero past the end of the row)
            let m: [__mmask16; NV] = std::array::from_fn(|q| {
                let lo = c + 16 * q;
                if lo >= n {
                    0
                } else if lo + 16 <= n {
                    0xFFFF
                } else {
                    ((1u32 << (n - lo)) - 1) as u16
                }
            });
            let bc = if pb.is_null() { pb } else { pb.add(c) };
            let mut j0 = 0;
            while j0 < k {
                let kk = KC.min(k - j0);
                let (wp, first) = (pw.add(j0 * n + c), j0 == 0);
                let mut r = 0;
                if R > 1 {
                    while r + R <= rows {
                        panel::<R, NV>(std::array::from_fn(|i| ar(r + i).add(j0)), wp, n, kk, std::array::from_fn(|i| yr(r + i).add(c)), first, bc, m);
                        r += R;
                    }
                }
                while r < rows {
                    panel::<1, NV>([ar(r).add(j0)], wp, n, kk, [yr(r).add(c)], first, bc, m);
                    r += 1;
                }
                j0 += kk;
            }
            c += 16 * NV;
        }
    }

    /// `R` rows × `16·NV` columns over `kk` rows of `w`: starts from the bias (zero if null)
    /// when `first`, else from `y`, and stores back to `y`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn panel<const R: usize, const NV: usize>(
        a: [*const f32; R],
        w: *const f32,
        ldw: usize,
        kk: usize,
        y: [*mut f32; R],
        first: bool,
        bias: *const f32,
        m: [__mmask16; NV],
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; R];
        for r in 0..R {
            for q in 0..NV {
                if m[q] != 0 {
                    acc[r][q] = if !first {
                        _mm512_maskz_loadu_ps(m[q], y[r].add(16 * q))
                    } else if bias.is_null() {
                        _mm512_setzero_ps()
                    } else {
                        _mm512_maskz_loadu_ps(m[q], bias.add(16 * q))
                    };
                }
            }
        }
        if m[NV - 1] == 0xFFFF {
            for j in 0..kk {
                let wr: [__m512; NV] = std::array::from_fn(|q| _mm512_loadu_ps(w.add(j * ldw + 16 * q)));
                for r in 0..R {
                    let av = _mm512_set1_ps(*a[r].add(j));
                    for q in 0..NV {
                        acc[r][q] = _mm512_fmadd_ps(av, wr[q], acc[r][q]);
                    }
                }
            }
        } else {
            for j in 0..kk {
                let wr: [__m512; NV] = std::array::from_fn(|q| _mm512_maskz_loadu_ps(m[q], w.add(j * ldw + 16 * q)));
                for r in 0..R {
                    let av = _mm512_set1_ps(*a[r].add(j));
                    for q in 0..NV {
                        acc[r][q] = _mm512_fmadd_ps(av, wr[q], acc[r][q]);
                    }
                }
            }
        }
        for r in 0..R {
            for q in 0..NV {
                if m[q] != 0 {
                    _mm512_mask_storeu_ps(y[r].add(16 * q), m[q], acc[r][q]);
                }
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot4_avx512(a: [&[f32]; 4], b: [&[f32]; 4]) -> [f32; 4] {
        // the accumulation order of `dot_avx512`, so each result is bit-identical to `dot`'s
        // (tree walks must pick the same child whichever path computed the logit)
        let n = a[0].len();
        let (pa, pb) = (a.map(|s| s.as_ptr()), b.map(|s| s.as_ptr()));
        let (mut s0, mut s1) = ([_mm512_setzero_ps(); 4], [_mm512_setzero_ps(); 4]);
        let mut i = 0;
        while i + 32 <= n {
            for k in 0..4 {
                s0[k] = _mm512_fmadd_ps(_mm512_loadu_ps(pa[k].add(i)), _mm512_loadu_ps(pb[k].add(i)), s0[k]);
                s1[k] = _mm512_fmadd_ps(_mm512_loadu_ps(pa[k].add(i + 16)), _mm512_loadu_ps(pb[k].add(i + 16)), s1[k]);
            }
            i += 32;
        }
        if i + 16 <= n {
            for k in 0..4 {
                s0[k] = _mm512_fmadd_ps(_mm512_loadu_ps(pa[k].add(i)), _mm512_loadu_ps(pb[k].add(i)), s0[k]);
            }
            i += 16;
        }
        if i < n {
            let m: __mmask16 = (1u32 << (n - i)) as u16 - 1;
            for k in 0..4 {
                s1[k] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, pa[k].add(i)), _mm512_maskz_loadu_ps(m, pb[k].add(i)), s1[k]);
            }
        }
        std::array::from_fn(|k| _mm512_reduce_add_ps(_mm512_add_ps(s0[k], s1[k])))
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn weighted_row_sum_avx512(coef: &[f32], w: &[f32], rows: &[usize], y: &mut [f32], accumulate: bool) {
        let n = y.len();
        let (pw, py) = (w.as_ptr(), y.as_mut_ptr());
        let mut c = 0;
        // 64 columns at a time: four independent FMA chains
        while c + 64 <= n {
            let mut acc: [__m512; 4] = std::array::from_fn(|q| if accumulate { _mm512_loadu_ps(py.add(c + 16 * q)) } else { _mm512_setzero_ps() });
            for (&a, &r) in coef.iter().zip(rows) {
                let (va, p) = (_mm512_set1_ps(a), pw.add(r * n + c));
                for q in 0..4 {
                    acc[q] = _mm512_fmadd_ps(va, _mm512_loadu_ps(p.add(16 * q)), acc[q]);
                }
            }
            for q in 0..4 {
                _mm512_storeu_ps(py.add(c + 16 * q), acc[q]);
            }
            c += 64;
        }
        while c < n {
            let m: __mmask16 = if c + 16 <= n { 0xFFFF } else { ((1u32 << (n - c)) - 1) as u16 };
            let mut acc = if accumulate { _mm512_maskz_loadu_ps(m, py.add(c)) } else { _mm512_setzero_ps() };
            for (&a, &r) in coef.iter().zip(rows) {
                acc = _mm512_fmadd_ps(_mm512_set1_ps(a), _mm512_maskz_loadu_ps(m, pw.add(r * n + c)), acc);
            }
            _mm512_mask_storeu_ps(py.add(c), m, acc);
            c += 16;
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn axpy4_avx512(a: [f32; 4], r: [&[f32]; 4], y: &mut [f32]) {
        let n = y.len();
        let py = y.as_mut_ptr();
        let (p0, p1, p2, p3) = (r[0].as_ptr(), r[1].as_ptr(), r[2].as_ptr(), r[3].as_ptr());
        let (a0, a1, a2, a3) = (_mm512_set1_ps(a[0]), _mm512_set1_ps(a[1]), _mm512_set1_ps(a[2]), _mm512_set1_ps(a[3]));
        let mut i = 0;
        while i + 16 <= n {
            let mut v = _mm512_loadu_ps(py.add(i));
            v = _mm512_fmadd_ps(a0, _mm512_loadu_ps(p0.add(i)), v);
            v = _mm512_fmadd_ps(a1, _mm512_loadu_ps(p1.add(i)), v);
            v = _mm512_fmadd_ps(a2, _mm512_loadu_ps(p2.add(i)), v);
            v = _mm512_fmadd_ps(a3, _mm512_loadu_ps(p3.add(i)), v);
            _mm512_storeu_ps(py.add(i), v);
            i += 16;
        }
        if i < n {
            let m: __mmask16 = (1u32 << (n - i)) as u16 - 1;
            let mut v = _mm512_maskz_loadu_ps(m, py.add(i));
            v = _mm512_fmadd_ps(a0, _mm512_maskz_loadu_ps(m, p0.add(i)), v);
            v = _mm512_fmadd_ps(a1, _mm512_maskz_loadu_ps(m, p1.add(i)), v);
            v = _mm512_fmadd_ps(a2, _mm512_maskz_loadu_ps(m, p2.add(i)), v);
            v = _mm512_fmadd_ps(a3, _mm512_maskz_loadu_ps(m, p3.add(i)), v);
            _mm512_mask_storeu_ps(py.add(i), m, v);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), s1);
            i += 16;
        }
        if i + 8 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
            i += 8;
        }
        let s = _mm256_add_ps(s0, s1);
        let lo = _mm256_castps256_ps128(s);
        let hi = _mm256_extractf128_ps(s, 1);
        let q = _mm_add_ps(lo, hi);
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
        let mut total = _mm_cvtss_f32(q);
        while i < n {
            total += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        total
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy_avx2(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len();
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let va = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(py.add(i), _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i))));
            i += 8;
        }
        while i < n {
            *py.add(i) += alpha * *px.add(i);
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Rng;

    #[test]
    fn gemm_small_family_matches_naive_on_every_path() {
        let mut r = Rng::new(9);
        // k = 300 crosses a KC block; n ≤ 32 takes the narrow paths; rows < 4, 8-row and 4-row
        // blocks and their leftovers
        for &k in &[1usize, 3, 4, 5, 9, 33, 300] {
            for &n in &[1usize, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 130, 200] {
                for &rows in &[1usize, 2, 3, 4, 5, 8, 9, 13] {
                    let w: Vec<f32> = (0..k * n).map(|_| r.normal()).collect();
                    let bias: Vec<f32> = (0..n).map(|_| r.normal()).collect();
                    let a: Vec<f32> = (0..rows * k).map(|_| r.normal()).collect();
                    let want = |row: &[f32], b: bool| -> Vec<f64> {
                        (0..n).map(|c| if b { bias[c] as f64 } else { 0.0 } + (0..k).map(|j| row[j] as f64 * w[j * n + c] as f64).sum::<f64>()).collect()
                    };
                    let close = |got: &[f32], want: Vec<f64>, what: &str| {
                        for (g, w) in got.iter().zip(want) {
                            assert!((*g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()), "{what} rows={rows} k={k} n={n}: {g} vs {w}");
                        }
                    };
                    let mut y = vec![f32::NAN; rows * n];
                    gemm_small(&a, k, &w, n, Some(&bias), &mut y);
                    for i in 0..rows {
                        close(&y[i * n..(i + 1) * n], want(&a[i * k..(i + 1) * k], true), "gemm_small");
                    }
                    gemm_small(&a, k, &w, n, None, &mut y);
                    close(&y[..n], want(&a[..k], false), "gemm_small without bias");
                    // gather: reversed order with a repeat; scatter: reversed
                    let idx: Vec<u32> = (0..rows as u32).rev().chain([0]).collect();
                    let mut yg = vec![f32::NAN; idx.len() * n];
                    gemm_small_gather(&a, &idx, k, &w, n, Some(&bias), &mut yg);
                    for (i, &src) in idx.iter().enumerate() {
                        close(&yg[i * n..(i + 1) * n], want(&a[src as usize * k..(src as usize + 1) * k], true), "gather");
                    }
                    let rev: Vec<u32> = (0..rows as u32).rev().collect();
                    let mut ys = vec![f32::NAN; rows * n];
                    // SAFETY: the indices are a permutation of the rows of ys.
                    unsafe { gemm_small_scatter(&a, k, &w, n, Some(&bias), ys.as_mut_ptr(), &rev) };
                    for (i, &dst) in rev.iter().enumerate() {
                        close(&ys[dst as usize * n..(dst as usize + 1) * n], want(&a[i * k..(i + 1) * k], true), "scatter");
                    }
                }
            }
        }
    }

    #[test]
    fn dispatched_kernels_match_naive_for_every_length() {
        let mut r = Rng::new(5);
        for n in 0..80 {
            let a: Vec<f32> = (0..n).map(|_| r.normal()).collect();
            let b: Vec<f32> = (0..n).map(|_| r.normal()).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-4 * (1.0 + want.abs()), "dot n={n}");
            assert!((dot_portable(&a, &b) as f64 - want).abs() < 1e-4 * (1.0 + want.abs()));
            let d4 = dot4([&a, &b, &a, &b], [&b, &a, &a, &b]);
            assert_eq!(d4[0].to_bits(), dot(&a, &b).to_bits(), "dot4 and dot differ in rounding, n={n}");
            assert_eq!(d4[3].to_bits(), dot(&b, &b).to_bits(), "dot4 and dot differ in rounding, n={n}");
            let (wa, wb): (f64, f64) = (a.iter().map(|x| (*x as f64).powi(2)).sum(), b.iter().map(|x| (*x as f64).powi(2)).sum());
            for (got, w) in d4.iter().zip([want, want, wa, wb]) {
                assert!((*got as f64 - w).abs() < 1e-4 * (1.0 + w.abs()), "dot4 n={n}");
            }
            if n > 0 {
                // gemm_small with k = 3 rows of width n, four rows and one
                let w: Vec<f32> = (0..3 * n).map(|i| (i % 7) as f32 - 3.0).collect();
                let hs = [1.0f32, 2.0, 3.0, 0.5, 0.0, -1.0, 0.0, 0.0, 0.0, -2.0, 1.0, 0.25];
                let mut ys = vec![0.0f32; 4 * n];
                gemm_small(&hs, 3, &w, n, Some(&b), &mut ys);
                let mut y1 = vec![0.0f32; n];
                gemm_small(&hs[9..], 3, &w, n, Some(&b), &mut y1);
                for k in 0..4 {
                    for i in 0..n {
                        let want = b[i] + (0..3).map(|j| hs[3 * k + j] * w[j * n + i]).sum::<f32>();
                        assert!((ys[k * n + i] - want).abs() < 1e-4 * (1.0 + want.abs()), "gemm_small n={n}");
                        if k == 3 {
                            assert!((y1[i] - want).abs() < 1e-4 * (1.0 + want.abs()), "gemm_small one row n={n}");
                        }
                    }
                }
            }
            if n > 0 {
                // rows 2, 0, 2 of a 3 × n matrix, overwriting and accumulating
                let w: Vec<f32> = (0..3 * n).map(|_| r.normal()).collect();
                let (coef, rows) = ([0.5f32, -1.0, 2.0], [2usize, 0, 2]);
                let mut y = b.clone();
                weighted_row_sum(&coef, &w, &rows, &mut y, false);
                let mut acc = b.clone();
                weighted_row_sum(&coef, &w, &rows, &mut acc, true);
                for i in 0..n {
                    let want = 2.5 * w[2 * n + i] - w[i];
                    assert!((y[i] - want).abs() < 1e-5 * (1.0 + want.abs()), "weighted_row_sum n={n}");
                    assert!((acc[i] - b[i] - want).abs() < 1e-5 * (1.0 + want.abs()), "weighted_row_sum accumulate n={n}");
                }
            }
            let mut y4 = b.clone();
            axpy4([0.5, -1.0, 2.0, 0.25], [&a, &b, &a, &b], &mut y4);
            for i in 0..n {
                let want = b[i] + 0.5 * a[i] - b[i] + 2.0 * a[i] + 0.25 * b[i];
                assert!((y4[i] - want).abs() < 1e-5, "axpy4 n={n} i={i}");
            }
            let mut y = b.clone();
            axpy(0.5, &a, &mut y);
            for i in 0..n {
                assert!((y[i] - (b[i] + 0.5 * a[i])).abs() < 1e-6, "axpy n={n} i={i}");
            }
        }
    }
}
