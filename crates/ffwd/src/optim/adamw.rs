//! AdamW (Loshchilov & Hutter), fused: one pass per parameter updates moments and value.

use rayon::prelude::*;

use super::Optimizer;
use crate::core::{Param, ParamVisitor};
use crate::error::Result;

/// Parameters at least this long are updated in parallel chunks.
const PAR_CHUNK: usize = 1 << 15;

/// AdamW with bias correction; weight decay applies to parameters marked `decay`.
#[derive(Clone, Debug)]
pub struct AdamW {
    /// β₁.
    pub beta1: f32,
    /// β₂.
    pub beta2: f32,
    /// ε.
    pub eps: f32,
    /// Decoupled weight decay λ (multiplied by the learning rate, as PyTorch).
    pub weight_decay: f32,
    t: u64,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl AdamW {
    /// New optimizer with PyTorch's default betas and ε.
    pub fn new(weight_decay: f32) -> Self {
        AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay, t: 0, m: Vec::new(), v: Vec::new() }
    }

    /// First and second moments, one vector per parameter in visiting order (empty before
    /// the first step).
    pub fn moments(&self) -> (&[Vec<f32>], &[Vec<f32>]) {
        (&self.m, &self.v)
    }
}

/// Moments below this are flushed to zero: parameters whose gradient stays zero (dead ReLU
/// rows) would otherwise decay into subnormal floats, which are ~100x slower to compute with.
const FLUSH: f32 = 1e-30;

#[inline]
#[allow(clippy::too_many_arguments)]
fn update(w: &mut [f32], g: &mut [f32], m: &mut [f32], v: &mut [f32], lr: f32, b1: f32, b2: f32, eps: f32, bc1: f32, bc2: f32, decay: f32, gs: f32) {
    let step = lr / bc1;
    let inv_bc2 = 1.0 / bc2;
    let n = w.len();
    let (g, m, v) = (&mut g[..n], &mut m[..n], &mut v[..n]);
    for (((wi, gr), mi), vi) in w.iter_mut().zip(g.iter_mut()).zip(m.iter_mut()).zip(v.iter_mut()) {
        // the gradient is consumed: cleared in the same pass, ready for the next step
        let gi = std::mem::take(gr) * gs;
        let mut mn = b1 * *mi + (1.0 - b1) * gi;
        let mut vn = b2 * *vi + (1.0 - b2) * gi * gi;
        if mn.abs() < FLUSH {
            mn = 0.0;
        }
        if vn < FLUSH {
            vn = 0.0;
        }
        *mi = mn;
        *vi = vn;
        *wi = *wi * decay - step * mn / ((vn * inv_bc2).sqrt() + eps);
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, params: &mut ParamVisitor<'_>, lr: f32, grad_scale: f32) {
        self.t += 1;
        let t = self.t as i32;
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        let wd = self.weight_decay;
        let (ms, vs) = (&mut self.m, &mut self.v);
        let mut idx = 0;
        params(&mut |p: &mut Param| {
            if ms.len() <= idx {
                ms.push(vec![0.0; p.len()]);
                vs.push(vec![0.0; p.len()]);
            }
            let (m, v) = (&mut ms[idx], &mut vs[idx]);
            let decay = if p.decay { 1.0 - lr * wd } else { 1.0 };
            let w = p.row_len();
            if let Some(set) = &mut p.touched_rows {
                for &r in set.rows() {
                    let r = r as usize * w..(r as usize + 1) * w;
                    update(&mut p.value[r.clone()], &mut p.grad[r.clone()], &mut m[r.clone()], &mut v[r], lr, b1, b2, eps, bc1, bc2, decay, grad_scale);
                }
                set.clear();
            } else if p.len() >= 2 * PAR_CHUNK {
                p.value
                    .par_chunks_mut(PAR_CHUNK)
                    .zip(p.grad.par_chunks_mut(PAR_CHUNK))
                    .zip(m.par_chunks_mut(PAR_CHUNK).zip(v.par_chunks_mut(PAR_CHUNK)))
                    .for_each(|((w, g), (m, v))| update(w, g, m, v, lr, b1, b2, eps, bc1, bc2, decay, grad_scale));
            } else {
                update(&mut p.value, &mut p.grad, m, v, lr, b1, b2, eps, bc1, bc2, decay, grad_scale);
            }
            idx += 1;
        });
    }

    fn steps(&self) -> u64 {
        self.t
    }

    fn slot_names(&self) -> &'static [&'static str] {
        &["m", "v"]
    }

    fn slots(&self) -> Vec<&[Vec<f32>]> {
        vec![&self.m, &self.v]
    }

    fn restore(&mut self, steps: u64, slots: Vec<Vec<Vec<f32>>>) -> Result<()> {
        super::check_slots(self.slot_names(), &slots)?;
        let mut it = slots.into_iter();
        (self.t, self.m, self.v) = (steps, it.next().unwrap_or_default(), it.next().unwrap_or_default());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_by_lr_times_sign() {
        // With bias correction, Adam's first step is lr·g/(|g|+eps) ≈ lr·sign(g).
        let mut p = Param::zeros("w", &[3], true);
        p.value = vec![1.0, -2.0, 0.5];
        p.grad = vec![0.3, -4.0, 0.0];
        let mut opt = AdamW::new(0.0);
        opt.step(&mut |f| f(&mut p), 0.1, 1.0);
        assert!((p.value[0] - 0.9).abs() < 1e-5);
        assert!((p.value[1] + 1.9).abs() < 1e-5);
        assert_eq!(p.value[2], 0.5);
        assert!(p.grad.iter().all(|&g| g == 0.0), "the step consumes the gradient");
    }

    #[test]
    fn decay_applies_only_to_marked_params() {
        let mut w = Param::zeros("w", &[1], true);
        let mut b = Param::zeros("b", &[1], false);
        w.value[0] = 1.0;
        b.value[0] = 1.0;
        let mut opt = AdamW::new(0.5);
        opt.step(
            &mut |f| {
                f(&mut w);
                f(&mut b)
            },
            0.1,
            1.0,
        );
        assert!((w.value[0] - 0.95).abs() < 1e-6);
        assert_eq!(b.value[0], 1.0);
    }

    #[test]
    fn minimises_a_quadratic() {
        let mut p = Param::zeros("w", &[70_000], true);
        p.value.iter_mut().enumerate().for_each(|(i, v)| *v = (i % 7) as f32 - 3.0);
        let mut opt = AdamW::new(0.0);
        for _ in 0..300 {
            for i in 0..p.len() {
                p.grad[i] = 2.0 * p.value[i];
            }
            opt.step(&mut |f| f(&mut p), 0.05, 1.0);
        }
        assert!(p.value.iter().all(|v| v.abs() < 0.05));
    }

    #[test]
    fn sparse_step_updates_and_clears_only_the_touched_rows() {
        let mut p = Param::zeros("t", &[3, 2], true);
        p.track_rows();
        p.value = vec![1.0; 6];
        p.grad[2..4].copy_from_slice(&[0.5, -0.5]);
        p.touched_rows.as_mut().unwrap().insert(1);
        let mut opt = AdamW::new(0.1);
        opt.step(&mut |f| f(&mut p), 0.1, 1.0);
        assert_eq!(&p.value[0..2], &[1.0, 1.0]);
        assert_eq!(&p.value[4..6], &[1.0, 1.0]);
        assert!(p.value[2] < 1.0 && p.value[3] > 0.9);
        assert!(p.grad.iter().all(|&g| g == 0.0) && p.touched_rows.as_ref().unwrap().is_empty());
    }
}
