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

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// Logistic sigmoid, stable for large |x|.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
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
    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Relu => x.max(0.0),
            Activation::Gelu => 0.5 * x * (1.0 + libm::erff(x * FRAC_1_SQRT_2)),
            Activation::Silu => x * sigmoid(x),
        }
    }

    /// f'(x).
    #[inline]
    pub fn derivative(self, x: f32) -> f32 {
        match self {
            Activation::Relu => {
                if x > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::Gelu => {
                0.5 * (1.0 + libm::erff(x * FRAC_1_SQRT_2)) + x * FRAC_1_SQRT_2PI * (-0.5 * x * x).exp()
            }
            Activation::Silu => {
                let s = sigmoid(x);
                s * (1.0 + x * (1.0 - s))
            }
        }
    }

    /// `out[i] = f(pre[i])`.
    pub fn forward(self, pre: &[f32], out: &mut [f32]) {
        match self {
            Activation::Relu => {
                for (o, &x) in out.iter_mut().zip(pre) {
                    *o = x.max(0.0);
                }
            }
            _ => {
                for (o, &x) in out.iter_mut().zip(pre) {
                    *o = self.apply(x);
                }
            }
        }
    }

    /// In place: `g[i] *= f'(pre[i])` (turns dL/d(activation) into dL/d(pre-activation)).
    pub fn backward_inplace(self, pre: &[f32], g: &mut [f32]) {
        match self {
            Activation::Relu => {
                for (gi, &x) in g.iter_mut().zip(pre) {
                    if x <= 0.0 {
                        *gi = 0.0;
                    }
                }
            }
            _ => {
                for (gi, &x) in g.iter_mut().zip(pre) {
                    *gi *= self.derivative(x);
                }
            }
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
