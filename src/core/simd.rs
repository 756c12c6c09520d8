//! Vector kernels with runtime CPU dispatch: AVX-512F, then AVX2+FMA, then portable code.
//! The crate is compiled for baseline x86-64, so these functions pick the widest unit the
//! running CPU has (the check is a cached atomic load).

/// Dot product of the common prefix of `a` and `b`.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    #[cfg(target_arch = "x86_64")]
    {
        if n >= 16 && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked above); slices have equal length n.
            return unsafe { x86::dot_avx512(a, b) };
        }
        if n >= 8 && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { x86::dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

/// `y[i] += alpha * x[i]` over the common prefix.
#[inline]
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &mut y[..n]);
    #[cfg(target_arch = "x86_64")]
    {
        if n >= 16 && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: as in `dot`.
            return unsafe { x86::axpy_avx512(alpha, x, y) };
        }
        if n >= 8 && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
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
        if n >= 16 && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F; every row has n values.
            return unsafe { x86::axpy4_avx512(a, r, y) };
        }
    }
    for i in 0..n {
        y[i] += a[0] * r[0][i] + a[1] * r[1][i] + a[2] * r[2][i] + a[3] * r[3][i];
    }
}

/// Four independent dot products `a[k]·b[k]` in one interleaved pass (all slices of one
/// length): four memory streams in flight instead of one.
#[inline]
pub fn dot4(a: [&[f32]; 4], b: [&[f32]; 4]) -> [f32; 4] {
    let n = a[0].len();
    #[cfg(target_arch = "x86_64")]
    {
        if n >= 16 && a.iter().chain(&b).all(|s| s.len() == n) && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F; all eight slices have n values.
            return unsafe { x86::dot4_avx512(a, b) };
        }
    }
    [dot(a[0], b[0]), dot(a[1], b[1]), dot(a[2], b[2]), dot(a[3], b[3])]
}

/// `R` rows of a small product: `y[k] = bias + Σ_j h[k][j] · w[j, :]`, `w` row-major
/// (`h[k].len() × y[k].len()`). Each row of `w` is loaded once for all `R` outputs and the
/// accumulators stay in registers (32 columns at a time): the leaf MLPs of FFF use it with
/// R = 1 (one sample) and R = 4 (four samples that reached the same leaf).
#[inline]
pub fn gemm_rows<const R: usize>(h: [&[f32]; R], w: &[f32], bias: &[f32], y: [&mut [f32]; R]) {
    let (k, n) = (h[0].len(), bias.len());
    assert!(w.len() >= k * n && h.iter().all(|r| r.len() == k) && y.iter().all(|r| r.len() == n));
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F; shapes checked above.
            return unsafe { x86::gemm_rows_avx512(h, w, bias, y) };
        }
    }
    for (hk, yk) in h.iter().zip(y) {
        yk.copy_from_slice(bias);
        for (j, &hj) in hk.iter().enumerate() {
            axpy(hj, &w[j * n..(j + 1) * n], yk);
        }
    }
}

/// `y = a·w + bias` for a short row-major `a` (`rows × k`), `w` (`k × n`), `y` (`rows × n`),
/// `bias` (`n`, or zero when `None`). No packing: one to three rows stream `w` row by row
/// (four rows of `w` per pass over `y`); four or more rows read 64-column panels of `w` in
/// place while blocks of four rows of `a` pass them, with 16 accumulators in registers. For
/// products of a few rows (a grouped expert dispatch at batch 1), where packing `w` costs
/// more than the product. With `w` in cache it runs at 100–160 GFLOP/s on one core, like the
/// GEMM library, but on wide-`k` products of tens of rows the library is up to 40 % faster
/// (`cargo bench --bench moe_loop -- --gemm`), so the dispatch uses it from five rows on.
pub fn gemm_small(a: &[f32], k: usize, w: &[f32], n: usize, bias: Option<&[f32]>, y: &mut [f32]) {
    let rows = a.len().checked_div(k).unwrap_or(0);
    assert!(k > 0 && a.len() == rows * k && w.len() >= k * n && y.len() == rows * n, "gemm_small: shapes");
    assert!(bias.is_none_or(|b| b.len() == n), "gemm_small: bias length");
    #[cfg(target_arch = "x86_64")]
    {
        if rows >= 4 && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F; shapes checked above.
            return unsafe { x86::gemm_small_avx512(a, k, w, n, bias, y, rows) };
        }
    }
    // One to three rows: the product is a stream over `w`, read row after row (contiguous,
    // which the hardware prefetcher follows best) four rows per pass over `y`.
    for (ar, yr) in a.chunks_exact(k).zip(y.chunks_exact_mut(n.max(1))) {
        match bias {
            Some(b) => yr.copy_from_slice(b),
            None => yr.fill(0.0),
        }
        let mut j = 0;
        while j + 4 <= k {
            prefetch_rows(w, (j + PREFETCH_ROWS) * n, 4 * n);
            axpy4([ar[j], ar[j + 1], ar[j + 2], ar[j + 3]], [&w[j * n..], &w[(j + 1) * n..], &w[(j + 2) * n..], &w[(j + 3) * n..]], yr);
            j += 4;
        }
        for (jj, &aj) in ar.iter().enumerate().skip(j) {
            axpy(aj, &w[jj * n..(jj + 1) * n], yr);
        }
    }
    if rows > 0 {
        return;
    }
    for (ar, yr) in a.chunks_exact(k).zip(y.chunks_exact_mut(n.max(1))) {
        match bias {
            Some(b) => yr.copy_from_slice(b),
            None => yr.fill(0.0),
        }
        for (j, &aj) in ar.iter().enumerate() {
            axpy(aj, &w[j * n..(j + 1) * n], yr);
        }
    }
}

/// How far ahead (in rows of `w`) the streaming path of [`gemm_small`] prefetches: expert
/// weights are short streams that the hardware prefetcher ramps up on too late.
const PREFETCH_ROWS: usize = 16;

/// Prefetches `w[from..from + len]` into L2 (no-op past the end or off x86).
#[inline]
fn prefetch_rows(w: &[f32], from: usize, len: usize) {
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
    pub unsafe fn gemm_small_avx512(a: &[f32], k: usize, w: &[f32], n: usize, bias: Option<&[f32]>, y: &mut [f32], rows: usize) {
        let (pa, pw, py) = (a.as_ptr(), w.as_ptr(), y.as_mut_ptr());
        let pb = bias.map_or(std::ptr::null(), |b| b.as_ptr());
        // one to three rows: 128-column panels read longer contiguous runs of each row of `w`
        // (the product is a stream over `w`); four or more: 64 columns × 4 rows in registers
        if rows < 4 {
            panels::<8>(pa, k, pw, n, pb, py, rows);
        } else {
            panels::<4>(pa, k, pw, n, pb, py, rows);
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn panels<const NV: usize>(pa: *const f32, k: usize, pw: *const f32, n: usize, pb: *const f32, py: *mut f32, rows: usize) {
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
                if NV <= 4 {
                    while r + 4 <= rows {
                        panel::<4, NV>(pa.add(r * k + j0), k, wp, n, kk, py.add(r * n + c), n, first, bc, m);
                        r += 4;
                    }
                }
                while r < rows {
                    panel::<1, NV>(pa.add(r * k + j0), k, wp, n, kk, py.add(r * n + c), n, first, bc, m);
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
        a: *const f32,
        lda: usize,
        w: *const f32,
        ldw: usize,
        kk: usize,
        y: *mut f32,
        ldy: usize,
        first: bool,
        bias: *const f32,
        m: [__mmask16; NV],
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; R];
        for r in 0..R {
            for q in 0..NV {
                if m[q] != 0 {
                    acc[r][q] = if !first {
                        _mm512_maskz_loadu_ps(m[q], y.add(r * ldy + 16 * q))
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
                    let av = _mm512_set1_ps(*a.add(r * lda + j));
                    for q in 0..NV {
                        acc[r][q] = _mm512_fmadd_ps(av, wr[q], acc[r][q]);
                    }
                }
            }
        } else {
            for j in 0..kk {
                let wr: [__m512; NV] = std::array::from_fn(|q| _mm512_maskz_loadu_ps(m[q], w.add(j * ldw + 16 * q)));
                for r in 0..R {
                    let av = _mm512_set1_ps(*a.add(r * lda + j));
                    for q in 0..NV {
                        acc[r][q] = _mm512_fmadd_ps(av, wr[q], acc[r][q]);
                    }
                }
            }
        }
        for r in 0..R {
            for q in 0..NV {
                if m[q] != 0 {
                    _mm512_mask_storeu_ps(y.add(r * ldy + 16 * q), m[q], acc[r][q]);
                }
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot4_avx512(a: [&[f32]; 4], b: [&[f32]; 4]) -> [f32; 4] {
        let n = a[0].len();
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 16 <= n {
            for k in 0..4 {
                acc[k] = _mm512_fmadd_ps(_mm512_loadu_ps(a[k].as_ptr().add(i)), _mm512_loadu_ps(b[k].as_ptr().add(i)), acc[k]);
            }
            i += 16;
        }
        if i < n {
            let m: __mmask16 = (1u32 << (n - i)) as u16 - 1;
            for k in 0..4 {
                acc[k] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a[k].as_ptr().add(i)), _mm512_maskz_loadu_ps(m, b[k].as_ptr().add(i)), acc[k]);
            }
        }
        acc.map(|v| _mm512_reduce_add_ps(v))
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn gemm_rows_avx512<const R: usize>(h: [&[f32]; R], w: &[f32], bias: &[f32], y: [&mut [f32]; R]) {
        let (kk, n) = (h[0].len(), bias.len());
        let (pw, pb) = (w.as_ptr(), bias.as_ptr());
        let ph = h.map(|s| s.as_ptr());
        let py = y.map(|s| s.as_mut_ptr());
        let mut c = 0;
        // 64 columns at a time when R ≤ 2 or the output is wide: four accumulators per row, one
        // broadcast feeds four FMAs (fewer loads per FMA, more independent FMA chains)
        if R <= 2 || n >= 128 {
            while c + 64 <= n {
                let mut a = [[_mm512_setzero_ps(); 4]; R];
                for k in 0..R {
                    for q in 0..4 {
                        a[k][q] = _mm512_loadu_ps(pb.add(c + 16 * q));
                    }
                }
                for j in 0..kk {
                    let wr = [0, 1, 2, 3].map(|q| _mm512_loadu_ps(pw.add(j * n + c + 16 * q)));
                    for k in 0..R {
                        let hv = _mm512_set1_ps(*ph[k].add(j));
                        for q in 0..4 {
                            a[k][q] = _mm512_fmadd_ps(hv, wr[q], a[k][q]);
                        }
                    }
                }
                for k in 0..R {
                    for q in 0..4 {
                        _mm512_storeu_ps(py[k].add(c + 16 * q), a[k][q]);
                    }
                }
                c += 64;
            }
        }
        // one row, 32 columns: four partial sums over j so that four FMA chains run at once
        // (a single chain waits on the FMA latency at every step)
        if R == 1 {
            while c + 32 <= n {
                let mut a = [[_mm512_setzero_ps(); 2]; 4];
                let mut j = 0;
                while j + 4 <= kk {
                    for u in 0..4 {
                        let hv = _mm512_set1_ps(*ph[0].add(j + u));
                        a[u][0] = _mm512_fmadd_ps(hv, _mm512_loadu_ps(pw.add((j + u) * n + c)), a[u][0]);
                        a[u][1] = _mm512_fmadd_ps(hv, _mm512_loadu_ps(pw.add((j + u) * n + c + 16)), a[u][1]);
                    }
                    j += 4;
                }
                while j < kk {
                    let hv = _mm512_set1_ps(*ph[0].add(j));
                    a[0][0] = _mm512_fmadd_ps(hv, _mm512_loadu_ps(pw.add(j * n + c)), a[0][0]);
                    a[0][1] = _mm512_fmadd_ps(hv, _mm512_loadu_ps(pw.add(j * n + c + 16)), a[0][1]);
                    j += 1;
                }
                for q in 0..2 {
                    let sum = _mm512_add_ps(_mm512_add_ps(a[0][q], a[1][q]), _mm512_add_ps(a[2][q], a[3][q]));
                    _mm512_storeu_ps(py[0].add(c + 16 * q), _mm512_add_ps(sum, _mm512_loadu_ps(pb.add(c + 16 * q))));
                }
                c += 32;
            }
        }
        // 32 columns at a time: two accumulators per row, one broadcast feeds two FMAs
        while c < n {
            let m: __mmask16 = if c + 16 <= n { 0xffff } else { ((1u32 << (n - c)) - 1) as u16 };
            let mut a0 = [_mm512_maskz_loadu_ps(m, pb.add(c)); R];
            for j in 0..kk {
                let w0 = _mm512_maskz_loadu_ps(m, pw.add(j * n + c));
                for k in 0..R {
                    a0[k] = _mm512_fmadd_ps(_mm512_set1_ps(*ph[k].add(j)), w0, a0[k]);
                }
            }
            for k in 0..R {
                _mm512_mask_storeu_ps(py[k].add(c), m, a0[k]);
            }
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
    fn gemm_rows_matches_naive_on_every_column_path() {
        let mut r = Rng::new(9);
        for &k in &[1usize, 3, 4, 5, 9, 33] {
            for &n in &[1usize, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 130, 200] {
                let w: Vec<f32> = (0..k * n).map(|_| r.normal()).collect();
                let bias: Vec<f32> = (0..n).map(|_| r.normal()).collect();
                let h: Vec<Vec<f32>> = (0..4).map(|_| (0..k).map(|_| r.normal()).collect()).collect();
                let want =
                    |row: &[f32]| -> Vec<f64> { (0..n).map(|c| bias[c] as f64 + (0..k).map(|j| row[j] as f64 * w[j * n + c] as f64).sum::<f64>()).collect() };
                let mut y4 = vec![vec![0.0f32; n]; 4];
                {
                    let [a, b, c, d] = &mut y4[..] else { unreachable!() };
                    gemm_rows([&h[0][..], &h[1], &h[2], &h[3]], &w, &bias, [a, b, c, d]);
                }
                let mut y1 = vec![0.0f32; n];
                gemm_rows([&h[2][..]], &w, &bias, [&mut y1]);
                let mut y2 = vec![vec![0.0f32; n]; 2];
                {
                    let [a, b] = &mut y2[..] else { unreachable!() };
                    gemm_rows([&h[0][..], &h[1]], &w, &bias, [a, b]);
                }
                for (got, row) in y4.iter().zip(&h).chain([(&y1, &h[2])]).chain(y2.iter().zip(&h)) {
                    for (g, w) in got.iter().zip(want(row)) {
                        assert!((*g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()), "k={k} n={n}: {g} vs {w}");
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
            let (wa, wb): (f64, f64) = (a.iter().map(|x| (*x as f64).powi(2)).sum(), b.iter().map(|x| (*x as f64).powi(2)).sum());
            for (got, w) in d4.iter().zip([want, want, wa, wb]) {
                assert!((*got as f64 - w).abs() < 1e-4 * (1.0 + w.abs()), "dot4 n={n}");
            }
            if n > 0 {
                // gemm_rows with k = 3 rows of width n, R = 4 and R = 1
                let w: Vec<f32> = (0..3 * n).map(|i| (i % 7) as f32 - 3.0).collect();
                let hs = [[1.0f32, 2.0, 3.0], [0.5, 0.0, -1.0], [0.0, 0.0, 0.0], [-2.0, 1.0, 0.25]];
                let mut ys = vec![vec![0.0f32; n]; 4];
                {
                    let [y0, y1, y2, y3] = &mut ys[..] else { unreachable!() };
                    gemm_rows([&hs[0], &hs[1], &hs[2], &hs[3]], &w, &b, [y0, y1, y2, y3]);
                }
                let mut y1 = vec![0.0f32; n];
                gemm_rows([&hs[3]], &w, &b, [&mut y1]);
                for k in 0..4 {
                    for i in 0..n {
                        let want = b[i] + (0..3).map(|j| hs[k][j] * w[j * n + i]).sum::<f32>();
                        assert!((ys[k][i] - want).abs() < 1e-4 * (1.0 + want.abs()), "gemm_rows n={n}");
                        if k == 3 {
                            assert!((y1[i] - want).abs() < 1e-4 * (1.0 + want.abs()), "gemm_rows R=1 n={n}");
                        }
                    }
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
