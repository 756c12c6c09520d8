//! Vector forms of the scalar approximations in [`super::activation`] (`exp_approx`,
//! `erf_approx`, exact GELU and its derivative), written once over a lane type ([`Lanes`]:
//! 8 lanes of AVX2, 16 of AVX-512F). Every function performs the scalar code's operations in
//! the scalar code's order, with no fused multiply-adds, so each lane is bit-identical to the
//! scalar function on every instruction set.
//!
//! The lane types' methods wrap `std::arch` intrinsics and are `#[inline(always)]`: call
//! these functions only from a function compiled with the lane type's target feature
//! (`avx2,fma` for `__m256`, `avx512f` for `__m512`), where they inline into plain vector code.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::activation::{FRAC_1_SQRT_2, FRAC_1_SQRT_2PI};

/// A vector of f32 lanes with the operations the approximations use.
pub(crate) trait Lanes: Copy {
    /// Lanes per vector.
    const N: usize;
    /// All lanes `v`.
    fn splat(v: f32) -> Self;
    /// Loads `N` values from `p`.
    ///
    /// # Safety
    /// `p` must be valid for reading `N` values, and the CPU must have the lane type's feature.
    unsafe fn load(p: *const f32) -> Self;
    /// Stores `N` values to `p`.
    ///
    /// # Safety
    /// `p` must be valid for writing `N` values, and the CPU must have the lane type's feature.
    unsafe fn store(self, p: *mut f32);
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    fn min(self, o: Self) -> Self;
    fn max(self, o: Self) -> Self;
    /// `|x|`.
    fn abs(self) -> Self;
    /// `|self|` with the sign bit of `sign`.
    fn with_sign_of(self, sign: Self) -> Self;
    /// `2ⁿ` for lanes holding integers `n` in the normal exponent range.
    fn exp2_int(self) -> Self;
    /// Per lane: `if self < limit { then } else { other }`.
    fn lt_select(self, limit: Self, then: Self, other: Self) -> Self;
}

macro_rules! lanes {
    ($t:ty, $n:expr, $p:ident) => {
        impl Lanes for $t {
            const N: usize = $n;
            #[inline(always)]
            fn splat(v: f32) -> Self {
                // SAFETY (all methods): callers run with the lane type's target feature
                // (module documentation).
                unsafe { paste_op!($p, set1_ps)(v) }
            }
            #[inline(always)]
            unsafe fn load(p: *const f32) -> Self {
                unsafe { paste_op!($p, loadu_ps)(p) }
            }
            #[inline(always)]
            unsafe fn store(self, p: *mut f32) {
                unsafe { paste_op!($p, storeu_ps)(p, self) }
            }
            #[inline(always)]
            fn add(self, o: Self) -> Self {
                unsafe { paste_op!($p, add_ps)(self, o) }
            }
            #[inline(always)]
            fn sub(self, o: Self) -> Self {
                unsafe { paste_op!($p, sub_ps)(self, o) }
            }
            #[inline(always)]
            fn mul(self, o: Self) -> Self {
                unsafe { paste_op!($p, mul_ps)(self, o) }
            }
            #[inline(always)]
            fn div(self, o: Self) -> Self {
                unsafe { paste_op!($p, div_ps)(self, o) }
            }
            #[inline(always)]
            fn min(self, o: Self) -> Self {
                unsafe { paste_op!($p, min_ps)(self, o) }
            }
            #[inline(always)]
            fn max(self, o: Self) -> Self {
                unsafe { paste_op!($p, max_ps)(self, o) }
            }
            #[inline(always)]
            fn abs(self) -> Self {
                unsafe { bits!($p, and, self, paste_op!($p, set1_epi32)(0x7fff_ffff)) }
            }
            #[inline(always)]
            fn with_sign_of(self, sign: Self) -> Self {
                unsafe {
                    let s = bits!($p, and, sign, paste_op!($p, set1_epi32)(i32::MIN));
                    let a = self.abs();
                    bits!($p, or, a, paste_op!($p, castps_si)(s))
                }
            }
            #[inline(always)]
            fn exp2_int(self) -> Self {
                unsafe {
                    let e = paste_op!($p, add_epi32)(paste_op!($p, cvttps_epi32)(self), paste_op!($p, set1_epi32)(127));
                    paste_op!($p, castsi_ps)(paste_op!($p, slli23)(e))
                }
            }
            #[inline(always)]
            fn lt_select(self, limit: Self, then: Self, other: Self) -> Self {
                unsafe { select!($p, self, limit, then, other) }
            }
        }
    };
}

/// `_mm256_<op>` / `_mm512_<op>`, with the cast names of each width.
macro_rules! paste_op {
    (m256, castps_si) => {
        _mm256_castps_si256
    };
    (m512, castps_si) => {
        _mm512_castps_si512
    };
    (m256, castsi_ps) => {
        _mm256_castsi256_ps
    };
    (m512, castsi_ps) => {
        _mm512_castsi512_ps
    };
    (m256, $op:ident) => {
        concat_idents_256!($op)
    };
    (m512, $op:ident) => {
        concat_idents_512!($op)
    };
}

macro_rules! concat_idents_256 {
    (set1_ps) => {
        _mm256_set1_ps
    };
    (set1_epi32) => {
        _mm256_set1_epi32
    };
    (loadu_ps) => {
        _mm256_loadu_ps
    };
    (storeu_ps) => {
        _mm256_storeu_ps
    };
    (add_ps) => {
        _mm256_add_ps
    };
    (sub_ps) => {
        _mm256_sub_ps
    };
    (mul_ps) => {
        _mm256_mul_ps
    };
    (div_ps) => {
        _mm256_div_ps
    };
    (min_ps) => {
        _mm256_min_ps
    };
    (max_ps) => {
        _mm256_max_ps
    };
    (add_epi32) => {
        _mm256_add_epi32
    };
    (cvttps_epi32) => {
        _mm256_cvttps_epi32
    };
    (slli23) => {
        _mm256_slli_epi32::<23>
    };
}

macro_rules! concat_idents_512 {
    (set1_ps) => {
        _mm512_set1_ps
    };
    (set1_epi32) => {
        _mm512_set1_epi32
    };
    (loadu_ps) => {
        _mm512_loadu_ps
    };
    (storeu_ps) => {
        _mm512_storeu_ps
    };
    (add_ps) => {
        _mm512_add_ps
    };
    (sub_ps) => {
        _mm512_sub_ps
    };
    (mul_ps) => {
        _mm512_mul_ps
    };
    (div_ps) => {
        _mm512_div_ps
    };
    (min_ps) => {
        _mm512_min_ps
    };
    (max_ps) => {
        _mm512_max_ps
    };
    (add_epi32) => {
        _mm512_add_epi32
    };
    (cvttps_epi32) => {
        _mm512_cvttps_epi32
    };
    (slli23) => {
        _mm512_slli_epi32::<23>
    };
}

/// A bitwise `and`/`or` of a float vector with an integer vector, as floats.
macro_rules! bits {
    (m256, and, $a:expr, $b:expr) => {
        _mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256($a), $b))
    };
    (m256, or, $a:expr, $b:expr) => {
        _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256($a), $b))
    };
    (m512, and, $a:expr, $b:expr) => {
        _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512($a), $b))
    };
    (m512, or, $a:expr, $b:expr) => {
        _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512($a), $b))
    };
}

macro_rules! select {
    (m256, $a:expr, $limit:expr, $then:expr, $other:expr) => {
        _mm256_blendv_ps($other, $then, _mm256_cmp_ps::<_CMP_LT_OQ>($a, $limit))
    };
    (m512, $a:expr, $limit:expr, $then:expr, $other:expr) => {
        _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>($a, $limit), $other, $then)
    };
}

lanes!(__m256, 8, m256);
lanes!(__m512, 16, m512);

/// [`exp_approx`](super::activation::exp_approx), lane-wise.
#[inline(always)]
pub(crate) fn exp<V: Lanes>(x: V) -> V {
    let c = V::splat;
    let x = x.max(c(-87.3)).min(c(88.7));
    let round = c(12_582_912.0);
    let n = x.mul(c(std::f32::consts::LOG2_E)).add(round).sub(round);
    let r = x.sub(n.mul(c(0.693_145_75))).sub(n.mul(c(1.428_606_8e-6)));
    let mut p = c(1.0 / 720.0);
    for k in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = c(k).add(r.mul(p));
    }
    p.mul(n.exp2_int())
}

/// [`erf_approx`](super::activation::erf_approx), lane-wise.
#[inline(always)]
pub(crate) fn erf<V: Lanes>(x: V) -> V {
    let c = V::splat;
    let a = x.abs();
    let t = c(1.0).div(c(1.0).add(c(0.327_591_1).mul(a)));
    let mut poly = c(1.061_405_4);
    for k in [-1.453_152_1, 1.421_413_7, -0.284_496_74, 0.254_829_6] {
        poly = c(k).add(t.mul(poly));
    }
    poly = t.mul(poly);
    let e = exp(a.mul(c(-1.0)).mul(a));
    let tail = c(1.0).sub(poly.mul(e)).with_sign_of(x);
    let x2 = x.mul(x);
    let mut s = c(1.0 / 9360.0);
    for k in [-1.0 / 1320.0, 1.0 / 216.0, -1.0 / 42.0, 0.1, -1.0 / 3.0, 1.0] {
        s = c(k).add(x2.mul(s));
    }
    let series = c(std::f32::consts::FRAC_2_SQRT_PI).mul(x).mul(s);
    a.lt_select(c(0.5), series, tail)
}

/// Exact GELU, `0.5·x·(1 + erf(x/√2))`, lane-wise.
#[inline(always)]
pub(crate) fn gelu<V: Lanes>(x: V) -> V {
    let c = V::splat;
    c(0.5).mul(x).mul(c(1.0).add(erf(x.mul(c(FRAC_1_SQRT_2)))))
}

/// GELU′, lane-wise.
#[inline(always)]
pub(crate) fn gelu_derivative<V: Lanes>(x: V) -> V {
    let c = V::splat;
    let cdf = c(0.5).mul(c(1.0).add(erf(x.mul(c(FRAC_1_SQRT_2)))));
    let pdf = exp(c(-0.5).mul(x).mul(x));
    cdf.add(x.mul(c(FRAC_1_SQRT_2PI)).mul(pdf))
}
