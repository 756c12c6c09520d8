//! Element-wise activations with their derivatives, computed from the pre-activation.

use serde::{Deserialize, Serialize};

/// Hidden-unit nonlinearity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// max(0, x).
    #[default]
    Relu,
    /// Exact GELU, x·Φ(x) with the error function (not the tanh approximation).
    Gelu,
    /// SiLU / swish, x·σ(x).
    Silu,
}

pub(crate) const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// Slices at least this long are split over the threads, in chunks of [`PAR_CHUNK`].
const PAR_MIN: usize = 1 << 16;
const PAR_CHUNK: usize = 1 << 14;
pub(crate) const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// e^x with a Cody–Waite reduction and a degree-6 polynomial (relative error < 2e-7 over the
/// f32 range), written in plain arithmetic so that loops over it vectorise.
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding and subtracting rounds to an integer
    let x = x.clamp(-87.3, 88.7);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// erf(x), vectorisable: its Maclaurin series for |x| < 0.5 (where the tail formula loses
/// digits to cancellation), Abramowitz & Stegun 7.1.26 above. Absolute error < 2e-7.
#[inline(always)]
pub fn erf_approx(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let tail = (1.0 - poly * exp_approx(-a * a)).copysign(x);
    let x2 = x * x;
    // 2/√π · (x − x³/3 + x⁵/10 − x⁷/42 + x⁹/216 − x¹¹/1320 + x¹³/9360)
    let series = std::f32::consts::FRAC_2_SQRT_PI
        * x
        * (1.0 + x2 * (-1.0 / 3.0 + x2 * (0.1 + x2 * (-1.0 / 42.0 + x2 * (1.0 / 216.0 + x2 * (-1.0 / 1320.0 + x2 * (1.0 / 9360.0)))))));
    if a < 0.5 {
        series
    } else {
        tail
    }
}

/// Logistic sigmoid, stable for large |x|.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    // exp of −|x| never overflows; pick the stable form for each sign
    let e = exp_approx(-x.abs());
    let s = 1.0 / (1.0 + e);
    if x >= 0.0 {
        s
    } else {
        e * s
    }
}

impl Activation {
    /// Parses `relu`, `gelu` or `silu`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "relu" => Some(Activation::Relu),
            "gelu" => Some(Activation::Gelu),
            "silu" => Some(Activation::Silu),
            _ => None,
        }
    }

    /// f(x).
    #[inline(always)]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Relu => x.max(0.0),
            Activation::Gelu => 0.5 * x * (1.0 + erf_approx(x * FRAC_1_SQRT_2)),
            Activation::Silu => x * sigmoid(x),
        }
    }

    /// f'(x).
    #[inline(always)]
    pub fn derivative(self, x: f32) -> f32 {
        match self {
            Activation::Relu => {
                if x > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::Gelu => 0.5 * (1.0 + erf_approx(x * FRAC_1_SQRT_2)) + x * FRAC_1_SQRT_2PI * exp_approx(-0.5 * x * x),
            Activation::Silu => {
                let s = sigmoid(x);
                s * (1.0 + x * (1.0 - s))
            }
        }
    }

    /// `out[i] = f(pre[i])`, vectorised for the running CPU, and spread over the threads for
    /// long slices (a training batch's hidden layer).
    pub fn forward(self, pre: &[f32], out: &mut [f32]) {
        if pre.len() >= PAR_MIN && rayon::current_num_threads() > 1 {
            use rayon::prelude::*;
            return pre.par_chunks(PAR_CHUNK).zip(out.par_chunks_mut(PAR_CHUNK)).for_each(|(p, o)| self.forward_serial(p, o));
        }
        self.forward_serial(pre, out)
    }

    fn forward_serial(self, pre: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::core::cpu::avx512() {
                // SAFETY: the CPU has AVX-512F.
                return unsafe { simd_x86::forward_avx512(self, pre, out) };
            }
            if crate::core::cpu::avx2() {
                // SAFETY: the CPU has AVX2 and FMA.
                return unsafe { simd_x86::forward_avx2(self, pre, out) };
            }
        }
        forward_impl(self, pre, out)
    }

    /// In place: `g[i] *= f'(pre[i])` (turns dL/d(activation) into dL/d(pre-activation)).
    pub fn backward_inplace(self, pre: &[f32], g: &mut [f32]) {
        if pre.len() >= PAR_MIN && rayon::current_num_threads() > 1 {
            use rayon::prelude::*;
            return pre.par_chunks(PAR_CHUNK).zip(g.par_chunks_mut(PAR_CHUNK)).for_each(|(p, gc)| self.backward_serial(p, gc));
        }
        self.backward_serial(pre, g)
    }

    fn backward_serial(self, pre: &[f32], g: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::core::cpu::avx512() {
                // SAFETY: the CPU has AVX-512F.
                return unsafe { simd_x86::backward_avx512(self, pre, g) };
            }
            if crate::core::cpu::avx2() {
                // SAFETY: the CPU has AVX2 and FMA.
                return unsafe { simd_x86::backward_avx2(self, pre, g) };
            }
        }
        backward_impl(self, pre, g)
    }

    /// In place: `x[i] = f(x[i])`.
    pub fn apply_inplace(self, x: &mut [f32]) {
        // forward reads and writes element by element, so aliasing through a copy of the
        // pointer is not needed: run it chunk-wise through a small stack buffer.
        let mut buf = [0.0f32; 256];
        for c in x.chunks_mut(256) {
            let n = c.len();
            buf[..n].copy_from_slice(c);
            self.forward(&buf[..n], c);
        }
    }
}

#[inline(always)]
fn forward_impl(act: Activation, pre: &[f32], out: &mut [f32]) {
    match act {
        Activation::Relu => out.iter_mut().zip(pre).for_each(|(o, &x)| *o = x.max(0.0)),
        Activation::Gelu => out.iter_mut().zip(pre).for_each(|(o, &x)| *o = Activation::Gelu.apply(x)),
        Activation::Silu => out.iter_mut().zip(pre).for_each(|(o, &x)| *o = Activation::Silu.apply(x)),
    }
}

#[inline(always)]
fn backward_impl(act: Activation, pre: &[f32], g: &mut [f32]) {
    match act {
        Activation::Relu => g.iter_mut().zip(pre).for_each(|(gi, &x)| *gi = if x > 0.0 { *gi } else { 0.0 }),
        Activation::Gelu => g.iter_mut().zip(pre).for_each(|(gi, &x)| *gi *= Activation::Gelu.derivative(x)),
        Activation::Silu => g.iter_mut().zip(pre).for_each(|(gi, &x)| *gi *= Activation::Silu.derivative(x)),
    }
}

#[cfg(target_arch = "x86_64")]
mod simd_x86 {
    use std::arch::x86_64::{__m256, __m512};

    use super::{backward_impl, forward_impl, Activation};
    use crate::core::vmath::{gelu, gelu_derivative, Lanes};

    #[target_feature(enable = "avx512f")]
    pub unsafe fn forward_avx512(act: Activation, pre: &[f32], out: &mut [f32]) {
        if act == Activation::Gelu {
            return gelu_forward::<__m512>(pre, out);
        }
        forward_impl(act, pre, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn forward_avx2(act: Activation, pre: &[f32], out: &mut [f32]) {
        if act == Activation::Gelu {
            return gelu_forward::<__m256>(pre, out);
        }
        forward_impl(act, pre, out)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn backward_avx512(act: Activation, pre: &[f32], g: &mut [f32]) {
        if act == Activation::Gelu {
            return gelu_backward::<__m512>(pre, g);
        }
        backward_impl(act, pre, g)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn backward_avx2(act: Activation, pre: &[f32], g: &mut [f32]) {
        if act == Activation::Gelu {
            return gelu_backward::<__m256>(pre, g);
        }
        backward_impl(act, pre, g)
    }

    /// Exact GELU `V::N` lanes at a time (`core::vmath`: the scalar code's operations in its
    /// order, so every lane is bit-identical to [`Activation::apply`]); the auto-vectoriser
    /// left the scalar form at ~5.5 ns per value. Inlined into the callers above, which
    /// enable `V`'s instruction set.
    #[inline(always)]
    fn gelu_forward<V: Lanes>(pre: &[f32], out: &mut [f32]) {
        let n = pre.len().min(out.len());
        let mut i = 0;
        while i + V::N <= n {
            // SAFETY: i + N ≤ n ≤ both lengths; the caller enables V's instruction set.
            unsafe { gelu(V::load(pre.as_ptr().add(i))).store(out.as_mut_ptr().add(i)) };
            i += V::N;
        }
        for (o, &x) in out[i..n].iter_mut().zip(&pre[i..n]) {
            *o = Activation::Gelu.apply(x);
        }
    }

    /// `g *= GELU′(pre)`, as [`gelu_forward`].
    #[inline(always)]
    fn gelu_backward<V: Lanes>(pre: &[f32], g: &mut [f32]) {
        let n = pre.len().min(g.len());
        let mut i = 0;
        while i + V::N <= n {
            // SAFETY: as in `gelu_forward`.
            unsafe {
                let gp = g.as_mut_ptr().add(i);
                V::load(gp).mul(gelu_derivative(V::load(pre.as_ptr().add(i)))).store(gp);
            }
            i += V::N;
        }
        for (gi, &x) in g[i..n].iter_mut().zip(&pre[i..n]) {
            *gi *= Activation::Gelu.derivative(x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_values() {
        assert_eq!(Activation::Relu.apply(-1.0), 0.0);
        assert_eq!(Activation::Relu.apply(2.5), 2.5);
        // torch.nn.functional.gelu(torch.tensor([1.0, -0.5])) = [0.8413447, -0.1542687]
        assert!((Activation::Gelu.apply(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((Activation::Gelu.apply(-0.5) + 0.154_268_7).abs() < 1e-6);
        // silu(1) = 1/(1+e^-1) = 0.7310586
        assert!((Activation::Silu.apply(1.0) - 0.731_058_6).abs() < 1e-6);
        assert!((sigmoid(-100.0)).abs() < 1e-30 && (sigmoid(100.0) - 1.0).abs() < 1e-7);
    }

    #[test]
    fn approximations_match_libm() {
        let mut x = -30.0f32;
        while x < 30.0 {
            let (e, want) = (exp_approx(x), (x as f64).exp());
            assert!(((e as f64 - want) / want).abs() < 3e-7, "exp({x}) = {e} vs {want}");
            let erf = erf_approx(x);
            assert!((erf - libm::erff(x)).abs() < 3e-7, "erf({x}) = {erf} vs {}", libm::erff(x));
            let s = sigmoid(x) as f64;
            assert!((s - 1.0 / (1.0 + (-x as f64).exp())).abs() < 3e-7, "sigmoid({x})");
            x += 0.0137;
        }
        // the slice kernels (every SIMD path, serial and threaded) equal the scalar forms bit
        // for bit, on values around both branches of erf and the exp clamps
        let pre: Vec<f32> = (0..200_003).map(|i| (i as f32 * 0.000_7 - 70.0) * if i % 3 == 0 { 0.01 } else { 1.0 }).collect();
        for act in [Activation::Relu, Activation::Gelu, Activation::Silu] {
            let mut buf = pre.clone();
            act.apply_inplace(&mut buf[..1000]);
            let mut out = vec![0.0; pre.len()];
            act.forward(&pre, &mut out);
            let mut g = vec![1.5; pre.len()];
            act.backward_inplace(&pre, &mut g);
            for (i, &p) in pre.iter().enumerate() {
                assert_eq!(out[i].to_bits(), act.apply(p).to_bits(), "{act:?} forward at {p}");
                assert_eq!(g[i].to_bits(), (1.5 * act.derivative(p)).to_bits(), "{act:?} backward at {p}");
                if i < 1000 {
                    assert_eq!(buf[i], act.apply(p));
                }
            }
        }
    }

    #[test]
    fn derivatives_match_finite_differences() {
        for act in [Activation::Relu, Activation::Gelu, Activation::Silu] {
            for &x in &[-3.0f32, -0.7, -0.1, 0.3, 1.2, 4.0] {
                let h = 1e-3f64;
                let f = |v: f64| act.apply(v as f32) as f64;
                let num = (f(x as f64 + h) - f(x as f64 - h)) / (2.0 * h);
                let ana = act.derivative(x) as f64;
                assert!((num - ana).abs() < 2e-3, "{act:?} at {x}: {num} vs {ana}");
            }
        }
    }
}
