//! SGD with heavy-ball momentum and decoupled weight decay.

use super::Optimizer;
use crate::core::{Param, ParamVisitor};
use crate::error::Result;

/// `v = μ·v + g; w = w·(1 − lr·λ) − lr·v` (PyTorch's SGD with momentum, dampening 0).
#[derive(Clone, Debug)]
pub struct Sgd {
    /// Momentum μ (0 = plain SGD).
    pub momentum: f32,
    /// Weight decay λ.
    pub weight_decay: f32,
    t: u64,
    v: Vec<Vec<f32>>,
}

impl Sgd {
    /// New optimizer.
    pub fn new(momentum: f32, weight_decay: f32) -> Self {
        Sgd { momentum, weight_decay, t: 0, v: Vec::new() }
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, params: &mut ParamVisitor<'_>, lr: f32, grad_scale: f32) {
        self.t += 1;
        let (mu, wd) = (self.momentum, self.weight_decay);
        let vs = &mut self.v;
        let mut idx = 0;
        params(&mut |p: &mut Param| {
            if vs.len() <= idx {
                vs.push(vec![0.0; p.len()]);
            }
            let v = &mut vs[idx];
            let decay = if p.decay { 1.0 - lr * wd } else { 1.0 };
            let (n, row) = (p.value.len(), p.row_len());
            let (value, grad) = (&mut p.value, &mut p.grad);
            let mut apply = |r: std::ops::Range<usize>| {
                for ((w, g), vi) in value[r.clone()].iter_mut().zip(&mut grad[r.clone()]).zip(v[r].iter_mut()) {
                    // the gradient is consumed: cleared in the same pass
                    *vi = mu * *vi + std::mem::take(g) * grad_scale;
                    *w = *w * decay - lr * *vi;
                }
            };
            match &mut p.touched_rows {
                None => apply(0..n),
                Some(set) => {
                    for &r in set.rows() {
                        apply(r as usize * row..(r as usize + 1) * row);
                    }
                    set.clear();
                }
            }
            idx += 1;
        });
    }

    fn steps(&self) -> u64 {
        self.t
    }

    fn slot_names(&self) -> &'static [&'static str] {
        &["momentum"]
    }

    fn slots(&self) -> Vec<&[Vec<f32>]> {
        vec![&self.v]
    }

    fn restore(&mut self, steps: u64, slots: Vec<Vec<Vec<f32>>>) -> Result<()> {
        super::check_slots(self.slot_names(), &slots)?;
        (self.t, self.v) = (steps, slots.into_iter().next().unwrap_or_default());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn momentum_literal_steps() {
        let mut p = Param::zeros("w", &[1], false);
        let mut opt = Sgd::new(0.9, 0.0);
        p.grad[0] = 1.0;
        opt.step(&mut |f| f(&mut p), 0.1, 1.0);
        assert!((p.value[0] + 0.1).abs() < 1e-7);
        assert_eq!(p.grad[0], 0.0, "the step consumes the gradient");
        p.grad[0] = 1.0;
        opt.step(&mut |f| f(&mut p), 0.1, 1.0);
        // v = 0.9 + 1 = 1.9 → w = -0.1 - 0.19
        assert!((p.value[0] + 0.29).abs() < 1e-6);
    }
}
