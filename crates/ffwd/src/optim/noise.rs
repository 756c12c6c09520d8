//! Gradient noise (Neelakantan et al. 2015, "Adding Gradient Noise Improves Learning for Very
//! Deep Networks"): before clipping, every gradient gets Gaussian noise of variance
//! `η / (1 + t)^γ` at step t (γ = 0.55 in the paper). The noise of step t is drawn from a
//! stream of the run's seed forked by t, so runs repeat and a resumed run continues exactly.
//! Sparse parameters (touched-row gradients) get noise on their touched rows only: the rows a
//! step does not update stay zero, as the lazy optimizers expect.

use serde::{Deserialize, Serialize};

use crate::core::{ParamVisitor, Rng};

/// Gradient-noise schedule.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GradNoise {
    /// η: the variance at step 0 (0 = off).
    pub eta: f32,
    /// γ: the decay exponent of the variance.
    pub gamma: f32,
}

impl GradNoise {
    /// The noise's standard deviation at step `step`: √(η / (1 + t)^γ).
    pub fn std(&self, step: usize) -> f32 {
        (self.eta / (1.0 + step as f64).powf(self.gamma as f64) as f32).sqrt()
    }

    /// Adds `scale` · N(0, std(step)²) to every visited gradient (a summed gradient over k
    /// micro-batches passes `scale = k`, so that the mean gradient gets the scheduled noise).
    pub fn apply(&self, step: usize, scale: f32, rng: &mut Rng, params: &mut ParamVisitor<'_>) {
        let s = self.std(step) * scale;
        if s == 0.0 {
            return;
        }
        params(&mut |p| {
            let w = p.row_len();
            let crate::core::Param { grad, touched_rows, .. } = p;
            match touched_rows {
                None => grad.iter_mut().for_each(|g| *g += s * rng.normal()),
                Some(set) => {
                    for &r in set.rows() {
                        grad[r as usize * w..(r as usize + 1) * w].iter_mut().for_each(|g| *g += s * rng.normal());
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Param;

    #[test]
    fn the_variance_follows_the_schedule_and_repeats() {
        let noise = GradNoise { eta: 0.3, gamma: 0.55 };
        for step in [0usize, 9, 99, 999] {
            let mut p = Param::zeros("w", &[200, 100], true);
            noise.apply(step, 1.0, &mut Rng::new(7).fork(step as u64), &mut |f| f(&mut p));
            let n = p.grad.len() as f64;
            let mean = p.grad.iter().map(|&g| g as f64).sum::<f64>() / n;
            let var = p.grad.iter().map(|&g| (g as f64 - mean).powi(2)).sum::<f64>() / n;
            let want = 0.3 / (1.0 + step as f64).powf(0.55);
            assert!((var / want - 1.0).abs() < 0.03, "step {step}: variance {var} vs {want}");
            assert!(mean.abs() < 4.0 * (want / n).sqrt(), "step {step}: mean {mean}");
            // the same seed and step give the same noise
            let mut q = Param::zeros("w", &[200, 100], true);
            noise.apply(step, 1.0, &mut Rng::new(7).fork(step as u64), &mut |f| f(&mut q));
            assert_eq!(p.grad, q.grad);
        }
        // a scale multiplies the deviation; eta 0 adds nothing
        let mut p = Param::zeros("w", &[50, 40], true);
        noise.apply(0, 2.0, &mut Rng::new(1), &mut |f| f(&mut p));
        let var = p.grad.iter().map(|&g| (g as f64).powi(2)).sum::<f64>() / p.grad.len() as f64;
        assert!((var / (4.0 * 0.3) - 1.0).abs() < 0.1, "{var}");
        let mut z = Param::zeros("w", &[5, 4], true);
        GradNoise { eta: 0.0, gamma: 0.55 }.apply(0, 1.0, &mut Rng::new(1), &mut |f| f(&mut z));
        assert!(z.grad.iter().all(|&g| g == 0.0));
    }

    #[test]
    fn sparse_gradients_get_noise_on_their_touched_rows_only() {
        let mut p = Param::zeros("table", &[10, 3], true);
        p.track_rows();
        if let Some(set) = &mut p.touched_rows {
            set.insert(2);
            set.insert(7);
        }
        GradNoise { eta: 1.0, gamma: 0.55 }.apply(3, 1.0, &mut Rng::new(5), &mut |f| f(&mut p));
        for r in 0..10 {
            let row = &p.grad[r * 3..(r + 1) * 3];
            assert_eq!(row.iter().any(|&g| g != 0.0), r == 2 || r == 7, "row {r}: {row:?}");
        }
    }
}
