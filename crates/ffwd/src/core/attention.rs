//! Fused causal attention of one (sequence, head) pair, forward and backward, in the manner of
//! FlashAttention-2: the scores are computed one tile of [`ROWS`] queries × [`KEY_BLOCK`] keys
//! at a time, the softmax runs online (a running maximum and sum per query, the output rescaled
//! when the maximum grows), and only each query's log-sum-exp is kept for the backward, which
//! recomputes the probabilities tile by tile. The `T × T` score matrix never exists; tiles
//! above the diagonal are never computed.
//!
//! The tile operations run on AVX-512F register tiles when the CPU has it (`FFWD_SIMD` can
//! force the portable code) and on portable loops otherwise. Keys and values are read
//! transposed (`hd × T`, packed once per call into the caller's scratch) so that the score and
//! gradient tiles are outer-product updates over contiguous key vectors.
//!
//! Shapes: a head's queries, keys and values are `t` rows of `hd` values, row `i` at `i·rs`
//! (so heads can be read in place from a fused `B·T × 3d` projection); outputs are contiguous
//! `t × hd`.

use super::activation::exp_approx;
use super::simd::lane_sum;

/// Keys per score tile.
pub const KEY_BLOCK: usize = 64;
/// Queries per score tile.
pub const ROWS: usize = 4;

/// One head's inputs: query, key and value rows `i` at `i·rs` in `q`, `k`, `v` (`hd` values
/// each), `t` positions.
#[derive(Clone, Copy, Debug)]
pub struct Head<'a> {
    /// Queries, `t` rows at stride `rs`.
    pub q: &'a [f32],
    /// Keys, `t` rows at stride `rs`.
    pub k: &'a [f32],
    /// Values, `t` rows at stride `rs`.
    pub v: &'a [f32],
    /// Row stride of `q`, `k`, `v`.
    pub rs: usize,
    /// Positions.
    pub t: usize,
    /// Head width.
    pub hd: usize,
}

impl Head<'_> {
    fn check(&self) {
        let need = if self.t == 0 { 0 } else { (self.t - 1) * self.rs + self.hd };
        assert!(self.hd > 0 && self.rs >= self.hd, "attention head: width {} at row stride {}", self.hd, self.rs);
        assert!(self.q.len() >= need && self.k.len() >= need && self.v.len() >= need, "attention head: {} rows need {need} values", self.t);
    }
}

/// Scratch values [`forward`] and [`backward`] need for `t` positions of width `hd`.
pub fn scratch_len(t: usize, hd: usize) -> usize {
    4 * hd * t.next_multiple_of(KEY_BLOCK) + 2 * ROWS * hd
}

type Tile = [[f32; KEY_BLOCK]; ROWS];

/// Causal softmax attention of one head: `o[i] = Σ_{j ≤ i} softmax_j(scale · q_i·k_j) v_j`
/// (`o`: `t × hd`), and `lse[i]` = the log-sum-exp of query `i`'s scaled scores (`t`), which
/// [`backward`] needs. `scratch`: at least [`scratch_len`] values.
pub fn forward(h: Head<'_>, scale: f32, o: &mut [f32], lse: &mut [f32], scratch: &mut [f32]) {
    h.check();
    assert!(o.len() >= h.t * h.hd && lse.len() >= h.t && scratch.len() >= scratch_len(h.t, h.hd), "attention forward: output or scratch too short");
    #[cfg(target_arch = "x86_64")]
    if super::cpu::avx512() {
        // SAFETY: the CPU has AVX-512F; sizes checked above.
        return unsafe { x86::forward(h, scale, o, lse, scratch) };
    }
    forward_body::<Portable>(h, scale, o, lse, scratch)
}

/// Backward of [`forward`]: given the forward's output `o` and `lse` and the output gradient
/// `d_o` (row `i` at `i·do_rs`, `hd` values), writes `dq`, `dk`, `dv` (`t × hd` each).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    h: Head<'_>,
    scale: f32,
    o: &[f32],
    lse: &[f32],
    d_o: &[f32],
    do_rs: usize,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    scratch: &mut [f32],
) {
    h.check();
    let n = h.t * h.hd;
    assert!(o.len() >= n && lse.len() >= h.t && dq.len() >= n && dk.len() >= n && dv.len() >= n, "attention backward: buffers too short");
    assert!(h.t == 0 || d_o.len() >= (h.t - 1) * do_rs + h.hd, "attention backward: output gradient too short");
    assert!(scratch.len() >= scratch_len(h.t, h.hd), "attention backward: scratch too short");
    #[cfg(target_arch = "x86_64")]
    if super::cpu::avx512() {
        // SAFETY: the CPU has AVX-512F; sizes checked above.
        return unsafe { x86::backward(h, scale, o, lse, d_o, do_rs, dq, dk, dv, scratch) };
    }
    backward_body::<Portable>(h, scale, o, lse, d_o, do_rs, dq, dk, dv, scratch)
}

/// The three tile operations, per instruction set.
trait TileOps {
    /// `s[r][j] = Σ_c a[r·hd + c] · bt[c·tp + j]` for every r < ROWS, j < 16·nv (`nv` ≤ 4
    /// vectors of 16 keys; the rest of `s` is left as it is).
    fn scores(a: &[f32], hd: usize, bt: &[f32], tp: usize, nv: usize, s: &mut Tile);
    /// `out[c·tp + j] += Σ_r a[r·hd + c] · p[r][j]` for every c < hd, j < 16·nv.
    fn accumulate_t(p: &Tile, a: &[f32], hd: usize, out: &mut [f32], tp: usize, nv: usize);
    /// `out[r·hd + c] += Σ_{j < nb} p[r][j] · w[j·rs + c]` for r < rows, c < hd.
    #[allow(clippy::too_many_arguments)]
    fn accumulate_rows(p: &Tile, rows: usize, nb: usize, w: &[f32], rs: usize, hd: usize, out: &mut [f32]);
    /// `row[j] = exp(row[j] − sub)` for j < n, 0 for n ≤ j < 16·nv ([`exp_approx`]'s
    /// arithmetic, so every instruction set gives the same bits).
    fn exp_masked(row: &mut [f32; KEY_BLOCK], nv: usize, n: usize, sub: f32);
    /// `p[j] = exp(p[j] − lse)`, `d[j] = p[j]·(d[j] − dd)` for j < n; both 0 for n ≤ j < 16·nv.
    fn grad_masked(p: &mut [f32; KEY_BLOCK], d: &mut [f32; KEY_BLOCK], nv: usize, n: usize, lse: f32, dd: f32);
}

struct Portable;

impl TileOps for Portable {
    #[inline(always)]
    fn exp_masked(row: &mut [f32; KEY_BLOCK], nv: usize, n: usize, sub: f32) {
        for (j, v) in row[..16 * nv].iter_mut().enumerate() {
            *v = if j < n { exp_approx(*v - sub) } else { 0.0 };
        }
    }

    #[inline(always)]
    fn grad_masked(p: &mut [f32; KEY_BLOCK], d: &mut [f32; KEY_BLOCK], nv: usize, n: usize, lse: f32, dd: f32) {
        for (j, (pv, dv)) in p[..16 * nv].iter_mut().zip(d[..16 * nv].iter_mut()).enumerate() {
            // P = exp(S − lse); dS = P ⊙ (dP − D)
            (*pv, *dv) = if j < n {
                let e = exp_approx(*pv - lse);
                (e, e * (*dv - dd))
            } else {
                (0.0, 0.0)
            };
        }
    }

    #[inline(always)]
    fn scores(a: &[f32], hd: usize, bt: &[f32], tp: usize, nv: usize, s: &mut Tile) {
        let w = 16 * nv;
        for (r, row) in s.iter_mut().enumerate() {
            let row = &mut row[..w];
            row.fill(0.0);
            for c in 0..hd {
                let av = a[r * hd + c];
                let b = &bt[c * tp..c * tp + w];
                for (x, &bv) in row.iter_mut().zip(b) {
                    *x += av * bv;
                }
            }
        }
    }

    #[inline(always)]
    fn accumulate_t(p: &Tile, a: &[f32], hd: usize, out: &mut [f32], tp: usize, nv: usize) {
        let w = 16 * nv;
        for c in 0..hd {
            let o = &mut out[c * tp..c * tp + w];
            for (r, pr) in p.iter().enumerate() {
                let av = a[r * hd + c];
                for (x, &pv) in o.iter_mut().zip(pr) {
                    *x += av * pv;
                }
            }
        }
    }

    #[inline(always)]
    fn accumulate_rows(p: &Tile, rows: usize, nb: usize, w: &[f32], rs: usize, hd: usize, out: &mut [f32]) {
        for (r, pr) in p.iter().enumerate().take(rows) {
            let o = &mut out[r * hd..(r + 1) * hd];
            for (j, &pv) in pr.iter().enumerate().take(nb) {
                for (x, &wv) in o.iter_mut().zip(&w[j * rs..j * rs + hd]) {
                    *x += pv * wv;
                }
            }
        }
    }
}

/// `dst[c·tp + j] = src[j·rs + c]` for j < t, zero for t ≤ j < tp (in blocks of 16 keys:
/// strided loads, contiguous 16-value stores).
#[inline(always)]
fn transpose_into(src: &[f32], rs: usize, t: usize, hd: usize, dst: &mut [f32], tp: usize) {
    let mut j0 = 0;
    while j0 < tp {
        let n = t.saturating_sub(j0).min(16);
        for c in 0..hd {
            let mut col = [0.0f32; 16];
            for (j, x) in col.iter_mut().enumerate().take(n) {
                *x = src[(j0 + j) * rs + c];
            }
            dst[c * tp + j0..c * tp + j0 + 16].copy_from_slice(&col);
        }
        j0 += 16;
    }
}

/// Largest of the first `n` values of a tile row.
#[inline(always)]
fn row_max(row: &[f32; KEY_BLOCK], n: usize) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    for (b, ch) in row.chunks_exact(16).enumerate() {
        for (i, (a, &v)) in acc.iter_mut().zip(ch).enumerate() {
            let v = if b * 16 + i < n { v } else { f32::NEG_INFINITY };
            *a = if v > *a { v } else { *a };
        }
    }
    acc.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// The first query of a tile of `rows` starting at `i0`, and the number of keys from `j0` that
/// query `i0 + r` sees in a block of `nb` keys.
#[inline(always)]
fn visible(i0: usize, r: usize, j0: usize, nb: usize) -> usize {
    // j0 ≤ i0 always: key blocks start at multiples of KEY_BLOCK, query tiles at multiples of
    // ROWS (which divides KEY_BLOCK), and a block is visited only if it starts at or before
    // the tile's last query
    (i0 + r + 1 - j0).min(nb)
}

#[inline(always)]
fn forward_body<T: TileOps>(h: Head<'_>, scale: f32, o: &mut [f32], lse: &mut [f32], scratch: &mut [f32]) {
    let (t, hd, rs) = (h.t, h.hd, h.rs);
    let tp = t.next_multiple_of(KEY_BLOCK);
    let (kt, rest) = scratch.split_at_mut(hd * tp);
    let qs = &mut rest[..ROWS * hd];
    transpose_into(h.k, rs, t, hd, kt, tp);
    let mut s: Tile = [[0.0; KEY_BLOCK]; ROWS];
    let mut i0 = 0;
    while i0 < t {
        let rows = (t - i0).min(ROWS);
        let last = i0 + rows - 1;
        for r in 0..ROWS {
            // padding rows repeat the last query; their results are never written
            let src = (i0 + r).min(last) * rs;
            for (d, &v) in qs[r * hd..(r + 1) * hd].iter_mut().zip(&h.q[src..src + hd]) {
                *d = v * scale;
            }
        }
        let (mut m, mut l) = ([f32::NEG_INFINITY; ROWS], [0.0f32; ROWS]);
        let ot = &mut o[i0 * hd..(i0 + rows) * hd];
        ot.fill(0.0);
        let mut j0 = 0;
        while j0 <= last {
            let nb = (last + 1 - j0).min(KEY_BLOCK);
            let nv = nb.div_ceil(16);
            T::scores(qs, hd, &kt[j0..], tp, nv, &mut s);
            for (r, row) in s.iter_mut().enumerate().take(rows) {
                let n = visible(i0, r, j0, nb);
                let m_new = m[r].max(row_max(row, n));
                let corr = exp_approx(m[r] - m_new);
                T::exp_masked(row, nv, n, m_new);
                l[r] = l[r] * corr + lane_sum(16 * nv, |j| row[j]);
                m[r] = m_new;
                if corr != 1.0 {
                    ot[r * hd..(r + 1) * hd].iter_mut().for_each(|x| *x *= corr);
                }
            }
            T::accumulate_rows(&s, rows, nb, &h.v[j0 * rs..], rs, hd, ot);
            j0 += KEY_BLOCK;
        }
        for r in 0..rows {
            let inv = 1.0 / l[r];
            ot[r * hd..(r + 1) * hd].iter_mut().for_each(|x| *x *= inv);
            lse[i0 + r] = m[r] + l[r].ln();
        }
        i0 += ROWS;
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_body<T: TileOps>(
    h: Head<'_>,
    scale: f32,
    o: &[f32],
    lse: &[f32],
    d_o: &[f32],
    do_rs: usize,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    scratch: &mut [f32],
) {
    let (t, hd, rs) = (h.t, h.hd, h.rs);
    let tp = t.next_multiple_of(KEY_BLOCK);
    let (kt, rest) = scratch.split_at_mut(hd * tp);
    let (vt, rest) = rest.split_at_mut(hd * tp);
    let (dkt, rest) = rest.split_at_mut(hd * tp);
    let (dvt, rest) = rest.split_at_mut(hd * tp);
    let (qs, rest) = rest.split_at_mut(ROWS * hd);
    let dos = &mut rest[..ROWS * hd];
    transpose_into(h.k, rs, t, hd, kt, tp);
    transpose_into(h.v, rs, t, hd, vt, tp);
    dkt.fill(0.0);
    dvt.fill(0.0);
    dq[..t * hd].fill(0.0);
    let (mut s, mut ds): (Tile, Tile) = ([[0.0; KEY_BLOCK]; ROWS], [[0.0; KEY_BLOCK]; ROWS]);
    let mut i0 = 0;
    while i0 < t {
        let rows = (t - i0).min(ROWS);
        let last = i0 + rows - 1;
        // D_i = dO_i · O_i (= Σ_j P_ij dP_ij); padding rows are zero and contribute nothing
        let mut dd = [0.0f32; ROWS];
        for r in 0..ROWS {
            let (qd, dd_row) = (&mut qs[r * hd..(r + 1) * hd], &mut dos[r * hd..(r + 1) * hd]);
            if r < rows {
                let i = i0 + r;
                qd.iter_mut().zip(&h.q[i * rs..i * rs + hd]).for_each(|(d, &v)| *d = v * scale);
                dd_row.copy_from_slice(&d_o[i * do_rs..i * do_rs + hd]);
                dd[r] = dd_row.iter().zip(&o[i * hd..(i + 1) * hd]).map(|(a, b)| a * b).sum();
            } else {
                qd.fill(0.0);
                dd_row.fill(0.0);
            }
        }
        let mut j0 = 0;
        while j0 <= last {
            let nb = (last + 1 - j0).min(KEY_BLOCK);
            let nv = nb.div_ceil(16);
            T::scores(qs, hd, &kt[j0..], tp, nv, &mut s);
            T::scores(dos, hd, &vt[j0..], tp, nv, &mut ds);
            for r in 0..ROWS {
                let (pr, dr) = (&mut s[r], &mut ds[r]);
                if r >= rows {
                    *pr = [0.0; KEY_BLOCK];
                    *dr = [0.0; KEY_BLOCK];
                    continue;
                }
                let n = visible(i0, r, j0, nb);
                T::grad_masked(pr, dr, nv, n, lse[i0 + r], dd[r]);
            }
            // dVᵀ += dOᵀ P; dKᵀ += (scale·Q)ᵀ dS; dQ += dS K (scaled at the end)
            T::accumulate_t(&s, dos, hd, &mut dvt[j0..], tp, nv);
            T::accumulate_t(&ds, qs, hd, &mut dkt[j0..], tp, nv);
            T::accumulate_rows(&ds, rows, nb, &h.k[j0 * rs..], rs, hd, &mut dq[i0 * hd..]);
            j0 += KEY_BLOCK;
        }
        i0 += ROWS;
    }
    dq[..t * hd].iter_mut().for_each(|x| *x *= scale);
    for j in 0..t {
        for c in 0..hd {
            dk[j * hd + c] = dkt[c * tp + j];
            dv[j * hd + c] = dvt[c * tp + j];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{backward_body, forward_body, Head, Tile, TileOps, KEY_BLOCK, ROWS};
    use crate::core::vmath::exp;

    /// AVX-512F register tiles: a 4 × 64 score tile in 16 zmm accumulators.
    struct Avx512;

    impl TileOps for Avx512 {
        #[inline(always)]
        fn scores(a: &[f32], hd: usize, bt: &[f32], tp: usize, nv: usize, s: &mut Tile) {
            match nv {
                1 => scores_n::<1>(a, hd, bt, tp, s),
                2 => scores_n::<2>(a, hd, bt, tp, s),
                3 => scores_n::<3>(a, hd, bt, tp, s),
                _ => scores_n::<4>(a, hd, bt, tp, s),
            }
        }

        #[inline(always)]
        fn accumulate_t(p: &Tile, a: &[f32], hd: usize, out: &mut [f32], tp: usize, nv: usize) {
            match nv {
                1 => accumulate_t_n::<1>(p, a, hd, out, tp),
                2 => accumulate_t_n::<2>(p, a, hd, out, tp),
                3 => accumulate_t_n::<3>(p, a, hd, out, tp),
                _ => accumulate_t_n::<4>(p, a, hd, out, tp),
            }
        }

        #[inline(always)]
        fn exp_masked(row: &mut [f32; KEY_BLOCK], nv: usize, n: usize, sub: f32) {
            // SAFETY: AVX-512F is enabled in every caller; vectors q < nv ≤ 4 lie inside `row`.
            unsafe {
                let s = _mm512_set1_ps(sub);
                for q in 0..nv.min(4) {
                    let ptr = row.as_mut_ptr().add(16 * q);
                    let e = exp::<__m512>(_mm512_sub_ps(_mm512_loadu_ps(ptr), s));
                    _mm512_storeu_ps(ptr, _mm512_maskz_mov_ps(lanes_below(q, n), e));
                }
            }
        }

        #[inline(always)]
        fn grad_masked(p: &mut [f32; KEY_BLOCK], d: &mut [f32; KEY_BLOCK], nv: usize, n: usize, lse: f32, dd: f32) {
            // SAFETY: as in `exp_masked`.
            unsafe {
                let (l, dv) = (_mm512_set1_ps(lse), _mm512_set1_ps(dd));
                for q in 0..nv.min(4) {
                    let (pp, dp) = (p.as_mut_ptr().add(16 * q), d.as_mut_ptr().add(16 * q));
                    let mask = lanes_below(q, n);
                    let e = _mm512_maskz_mov_ps(mask, exp::<__m512>(_mm512_sub_ps(_mm512_loadu_ps(pp), l)));
                    _mm512_storeu_ps(pp, e);
                    _mm512_storeu_ps(dp, _mm512_maskz_mov_ps(mask, _mm512_mul_ps(e, _mm512_sub_ps(_mm512_loadu_ps(dp), dv))));
                }
            }
        }

        #[inline(always)]
        fn accumulate_rows(p: &Tile, rows: usize, nb: usize, w: &[f32], rs: usize, hd: usize, out: &mut [f32]) {
            assert!(rows <= ROWS && nb <= KEY_BLOCK && out.len() >= rows * hd && (nb == 0 || w.len() >= (nb - 1) * rs + hd));
            // SAFETY: AVX-512F is enabled in every caller (the functions below); masked loads
            // and stores touch only columns < hd of rows < rows (out) and < nb (w).
            unsafe {
                let (wp, op) = (w.as_ptr(), out.as_mut_ptr());
                let mut c0 = 0;
                while c0 < hd {
                    let width = (hd - c0).min(16);
                    let mask: __mmask16 = if width == 16 { 0xffff } else { (1u16 << width) - 1 };
                    let mut acc = [_mm512_setzero_ps(); ROWS];
                    for (r, x) in acc.iter_mut().enumerate().take(rows) {
                        *x = _mm512_maskz_loadu_ps(mask, op.add(r * hd + c0));
                    }
                    for j in 0..nb {
                        let wv = _mm512_maskz_loadu_ps(mask, wp.add(j * rs + c0));
                        for (x, pr) in acc.iter_mut().zip(p) {
                            *x = _mm512_fmadd_ps(_mm512_set1_ps(pr[j]), wv, *x);
                        }
                    }
                    for (r, x) in acc.iter().enumerate().take(rows) {
                        _mm512_mask_storeu_ps(op.add(r * hd + c0), mask, *x);
                    }
                    c0 += 16;
                }
            }
        }
    }

    /// The lanes of 16-key vector `q` whose key index is below `n`.
    #[inline(always)]
    fn lanes_below(q: usize, n: usize) -> __mmask16 {
        let k = n.saturating_sub(16 * q).min(16);
        if k == 16 {
            0xffff
        } else {
            (1u16 << k) - 1
        }
    }

    /// [`TileOps::scores`] over `N` vectors of 16 keys, in `4·N` zmm accumulators.
    #[inline(always)]
    fn scores_n<const N: usize>(a: &[f32], hd: usize, bt: &[f32], tp: usize, s: &mut Tile) {
        assert!(a.len() >= ROWS * hd && bt.len() >= (hd - 1) * tp + 16 * N);
        // SAFETY: AVX-512F is enabled in every caller; reads inside `a` and `bt` (asserted),
        // writes inside `s`.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); N]; ROWS];
            let (ap, bp) = (a.as_ptr(), bt.as_ptr());
            for c in 0..hd {
                let b = bp.add(c * tp);
                let mut bv = [_mm512_setzero_ps(); N];
                for (q, x) in bv.iter_mut().enumerate() {
                    *x = _mm512_loadu_ps(b.add(16 * q));
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*ap.add(r * hd + c));
                    for (x, &bq) in row.iter_mut().zip(&bv) {
                        *x = _mm512_fmadd_ps(av, bq, *x);
                    }
                }
            }
            for (row, out) in acc.iter().zip(s.iter_mut()) {
                for (q, x) in row.iter().enumerate() {
                    _mm512_storeu_ps(out.as_mut_ptr().add(16 * q), *x);
                }
            }
        }
    }

    /// [`TileOps::accumulate_t`] over `N` vectors of 16 keys, the tile held in registers.
    #[inline(always)]
    fn accumulate_t_n<const N: usize>(p: &Tile, a: &[f32], hd: usize, out: &mut [f32], tp: usize) {
        assert!(a.len() >= ROWS * hd && out.len() >= (hd - 1) * tp + 16 * N);
        // SAFETY: as in `scores_n`.
        unsafe {
            let mut pv = [[_mm512_setzero_ps(); N]; ROWS];
            for (row, src) in pv.iter_mut().zip(p) {
                for (q, x) in row.iter_mut().enumerate() {
                    *x = _mm512_loadu_ps(src.as_ptr().add(16 * q));
                }
            }
            let (ap, op) = (a.as_ptr(), out.as_mut_ptr());
            for c in 0..hd {
                let o = op.add(c * tp);
                let mut acc = [_mm512_setzero_ps(); N];
                for (q, x) in acc.iter_mut().enumerate() {
                    *x = _mm512_loadu_ps(o.add(16 * q));
                }
                for (r, row) in pv.iter().enumerate() {
                    let av = _mm512_set1_ps(*ap.add(r * hd + c));
                    for (x, &pq) in acc.iter_mut().zip(row) {
                        *x = _mm512_fmadd_ps(av, pq, *x);
                    }
                }
                for (q, x) in acc.iter().enumerate() {
                    _mm512_storeu_ps(o.add(16 * q), *x);
                }
            }
        }
    }

    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn forward(h: Head<'_>, scale: f32, o: &mut [f32], lse: &mut [f32], scratch: &mut [f32]) {
        forward_body::<Avx512>(h, scale, o, lse, scratch)
    }

    /// # Safety
    /// The CPU has AVX-512F.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn backward(
        h: Head<'_>,
        scale: f32,
        o: &[f32],
        lse: &[f32],
        d_o: &[f32],
        do_rs: usize,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        scratch: &mut [f32],
    ) {
        backward_body::<Avx512>(h, scale, o, lse, d_o, do_rs, dq, dk, dv, scratch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Rng;

    /// Naive f64 causal attention of one head and its gradients for L = Σ o ⊙ g.
    #[allow(clippy::type_complexity)]
    fn naive(q: &[f32], k: &[f32], v: &[f32], g: &[f32], t: usize, hd: usize, scale: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let (mut o, mut dq, mut dk, mut dv) = (vec![0.0; t * hd], vec![0.0; t * hd], vec![0.0; t * hd], vec![0.0; t * hd]);
        for i in 0..t {
            let s: Vec<f64> = (0..=i).map(|j| scale * (0..hd).map(|c| q[i * hd + c] as f64 * k[j * hd + c] as f64).sum::<f64>()).collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            let p: Vec<f64> = s.iter().map(|x| (x - m).exp() / z).collect();
            for (j, pj) in p.iter().enumerate() {
                for c in 0..hd {
                    o[i * hd + c] += pj * v[j * hd + c] as f64;
                }
            }
            // dP_j = g_i · v_j; dS_j = P_j (dP_j − Σ P dP)
            let dp: Vec<f64> = (0..=i).map(|j| (0..hd).map(|c| g[i * hd + c] as f64 * v[j * hd + c] as f64).sum()).collect();
            let dsum: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
            for j in 0..=i {
                let ds = p[j] * (dp[j] - dsum) * scale;
                for c in 0..hd {
                    dq[i * hd + c] += ds * k[j * hd + c] as f64;
                    dk[j * hd + c] += ds * q[i * hd + c] as f64;
                    dv[j * hd + c] += p[j] * g[i * hd + c] as f64;
                }
            }
        }
        (o, dq, dk, dv)
    }

    #[test]
    fn fused_attention_matches_naive_on_ragged_sizes() {
        for &(t, hd) in &[(1, 1), (3, 5), (64, 16), (70, 8), (131, 32), (200, 20)] {
            let mut rng = Rng::new(t as u64 * 31 + hd as u64);
            let rand = |n: usize, rng: &mut Rng| (0..n).map(|_| rng.normal()).collect::<Vec<f32>>();
            // q, k, v interleaved in rows of width 3·hd + 2 (a strided layout like the LM's)
            let rs = 3 * hd + 2;
            let packed = rand(t * rs, &mut rng);
            let col = |off: usize| (0..t).flat_map(|i| packed[i * rs + off..i * rs + off + hd].to_vec()).collect::<Vec<f32>>();
            let (q, k, v) = (col(0), col(hd), col(2 * hd));
            let g = rand(t * hd, &mut rng);
            let scale = 1.0 / (hd as f32).sqrt();
            let h = Head { q: &packed, k: &packed[hd..], v: &packed[2 * hd..], rs, t, hd };
            let mut scratch = vec![f32::NAN; scratch_len(t, hd)];
            let (mut o, mut lse) = (vec![0.0; t * hd], vec![0.0; t]);
            forward(h, scale, &mut o, &mut lse, &mut scratch);
            let (wo, wdq, wdk, wdv) = naive(&q, &k, &v, &g, t, hd, scale as f64);
            let close = |got: &[f32], want: &[f64], what: &str| {
                for (i, (a, b)) in got.iter().zip(want).enumerate() {
                    assert!((*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()), "{what}[{i}] t {t} hd {hd}: {a} vs {b}");
                }
            };
            close(&o, &wo, "o");
            let (mut dq, mut dk, mut dv) = (vec![f32::NAN; t * hd], vec![f32::NAN; t * hd], vec![f32::NAN; t * hd]);
            scratch.fill(f32::NAN);
            backward(h, scale, &o, &lse, &g, hd, &mut dq, &mut dk, &mut dv, &mut scratch);
            close(&dq, &wdq, "dq");
            close(&dk, &wdk, "dk");
            close(&dv, &wdv, "dv");
        }
    }
}
