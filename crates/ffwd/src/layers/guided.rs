//! Self-guided training of structured maps (Wei et al. 2024, "Building on Efficient
//! Foundations", the remedy for the slow early training of low-rank and block FFNs): each
//! structured map `S` (`in → out`, bias `b`) trains next to a dense guide `W` (`out × in`,
//! initialised to `S`'s own matrix) and outputs
//!
//! `y = α · W x + (1 − α) · S x + b`,
//!
//! with α decaying from 1 to 0 on a cosine over the first `fraction` of the training steps.
//! With `reduce_flop` the dense branch runs only with probability α per forward (the
//! reference's `_check_guide_layer`); otherwise the output is `S x + b`. When α reaches 0 the
//! guide is dropped: it leaves the parameters (and so the checkpoint and the optimizer), and
//! the layer is the plain structured map.
//!
//! Parameter: `{map}.guide` (`out × in`).

use serde::{Deserialize, Serialize};

use crate::core::gemm::{add_sum_rows, matmul, MatMut, MatRef};
use crate::core::{Param, Rng};
use crate::error::{Error, Result};

/// Self-guided training options of a structured FFN.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuideConfig {
    /// Share of the training steps over which α decays from 1 to 0 (cosine); the dense guide
    /// is dropped at its end.
    pub fraction: f32,
    /// Compute the dense branch only with probability α per forward (fewer FLOPs as α falls).
    pub reduce_flop: bool,
}

impl Default for GuideConfig {
    fn default() -> Self {
        GuideConfig { fraction: 0.5, reduce_flop: false }
    }
}

impl GuideConfig {
    /// Checks the fraction.
    pub fn validate(&self) -> Result<()> {
        if !(self.fraction > 0.0 && self.fraction <= 1.0) {
            return Err(Error::Config(format!("guide.fraction must be in (0, 1], got {}", self.fraction)));
        }
        Ok(())
    }

    /// α at `step` of a run of `total` steps: `½ (1 + cos(π · step / (fraction · total)))`
    /// during the guided phase, 0 after it.
    pub fn alpha(&self, step: usize, total: usize) -> f32 {
        let end = self.fraction as f64 * total as f64;
        if end <= 0.0 || step as f64 >= end {
            return 0.0;
        }
        (0.5 * (1.0 + (std::f64::consts::PI * step as f64 / end).cos())) as f32
    }
}

/// The dense guide of one structured map `in → out`.
#[derive(Clone, Debug)]
pub struct Guide {
    /// `out × in`.
    pub w: Param,
    cfg: GuideConfig,
    alpha: f32,
    /// Whether the last forward ran the dense branch.
    active: bool,
    /// `batch × out` scratch: the dense branch's output, then the structured branch's share of dy.
    buf: Vec<f32>,
}

impl Guide {
    /// A guide named `{prefix}.guide` holding `dense` (`out × in`, the structured map's own
    /// matrix); α starts at 1.
    pub fn new(prefix: &str, dense: Vec<f32>, out: usize, inp: usize, cfg: GuideConfig) -> Self {
        let mut w = Param::zeros(&format!("{prefix}.guide"), &[out, inp], true);
        w.value = dense;
        Guide { w, cfg, alpha: 1.0, active: false, buf: Vec::new() }
    }

    /// The current α.
    pub fn alpha(&self) -> f32 {
        self.alpha
    }

    /// Sets α for `step` of `total`; true when the guided phase is over (α = 0: drop the guide).
    pub fn set_progress(&mut self, step: usize, total: usize) -> bool {
        self.alpha = self.cfg.alpha(step, total);
        self.alpha == 0.0
    }

    /// Sets α directly (tests; inference at a chosen mix).
    pub fn set_alpha(&mut self, alpha: f32) {
        self.alpha = alpha.clamp(0.0, 1.0);
    }

    /// Training forward: `y` holds the structured map's output `S x + b` of `x` (`batch × in`);
    /// mixes in the dense branch, `y ← (1 − α)·y + α·(W x + b)`, unless α is 0 or
    /// `reduce_flop` skips it this time (drawn from `rng`).
    pub fn forward(&mut self, x: &[f32], batch: usize, bias: &[f32], y: &mut [f32], rng: &mut Rng) {
        let a = self.alpha;
        self.active = a > 0.0 && (!self.cfg.reduce_flop || rng.uniform() < a);
        if !self.active {
            return;
        }
        let (out, inp) = (self.w.shape[0], self.w.shape[1]);
        super::ensure_len(&mut self.buf, batch * out);
        let g = &mut self.buf[..batch * out];
        matmul(MatMut::new(g, batch, out), MatRef::new(x, batch, inp), MatRef::new(&self.w.value, out, inp).t(), false);
        for (yr, gr) in y[..batch * out].chunks_exact_mut(out).zip(g.chunks_exact(out)) {
            for ((yv, &gv), &b) in yr.iter_mut().zip(gr).zip(bias) {
                *yv = (1.0 - a) * *yv + a * (gv + b);
            }
        }
    }

    /// The upstream gradient the structured branch sees: `dy` itself when the last forward
    /// did not run the dense branch, `(1 − α)·dy` when it did (then call
    /// [`Guide::backward`] after the structured backward).
    pub fn structured_dy<'a>(&'a mut self, dy: &'a [f32]) -> &'a [f32] {
        if !self.active {
            return dy;
        }
        super::ensure_len(&mut self.buf, dy.len());
        let s = &mut self.buf[..dy.len()];
        for (o, &d) in s.iter_mut().zip(dy) {
            *o = (1.0 - self.alpha) * d;
        }
        s
    }

    /// After the structured backward ran on [`Guide::structured_dy`]: adds the dense branch's
    /// share, `∂W += α·dyᵀ x`, the bias's missing `α·Σ dy`, and `dx += α·dy W` (`dx` already
    /// holds the structured branch's input gradient). Nothing when the branch did not run.
    pub fn backward(&mut self, x: &[f32], batch: usize, dy: &[f32], bias_grad: &mut [f32], dx: Option<&mut [f32]>) {
        if !self.active {
            return;
        }
        let (out, inp, a) = (self.w.shape[0], self.w.shape[1], self.alpha);
        let s = &mut self.buf[..batch * out];
        for (o, &d) in s.iter_mut().zip(dy) {
            *o = a * d;
        }
        add_sum_rows(s, out, bias_grad);
        matmul(MatMut::new(&mut self.w.grad, out, inp), MatRef::new(s, batch, out).t(), MatRef::new(x, batch, inp), true);
        if let Some(dx) = dx {
            matmul(MatMut::new(&mut dx[..batch * inp], batch, inp), MatRef::new(s, batch, out), MatRef::new(&self.w.value, out, inp), true);
        }
    }

    /// The effective matrix for inference: `α·W + (1 − α)·structured` (`out × in`).
    pub fn merged(&self, structured: &[f32]) -> Vec<f32> {
        let a = self.alpha;
        self.w.value.iter().zip(structured).map(|(&w, &s)| a * w + (1.0 - a) * s).collect()
    }
}

/// Whether the parameter named `name` (within a layer or with a model's prefix) is a dense guide.
pub fn is_guide(name: &str) -> bool {
    name.ends_with(".guide")
}

/// Which of the parameters named `before` (visiting order) remain once those named `dropped`
/// left; `None` when none left (the optimizer's state then stays as it is).
pub(crate) fn keep_mask(before: &[String], dropped: &[String]) -> Option<Vec<bool>> {
    (!dropped.is_empty()).then(|| before.iter().map(|n| !dropped.contains(n)).collect())
}

/// The guides of a two-map FFN, `[fc1, fc2]`, present while the guided phase lasts.
#[derive(Clone, Debug, Default)]
pub struct Guides(pub Option<[Guide; 2]>);

impl Guides {
    /// The guides of maps `fc1` and `fc2` under `cfg` (none without it): `dense` gives each
    /// map's own matrix with its shape, `(out × in values, out, in)`, and is called only then.
    pub fn new(cfg: Option<GuideConfig>, dense: impl FnOnce() -> [(Vec<f32>, usize, usize); 2]) -> Result<Self> {
        let Some(cfg) = cfg else { return Ok(Guides::default()) };
        cfg.validate()?;
        let [(w1, o1, i1), (w2, o2, i2)] = dense();
        Ok(Guides(Some([Guide::new("fc1", w1, o1, i1, cfg), Guide::new("fc2", w2, o2, i2, cfg)])))
    }

    /// Sets α on both; drops them when the phase is over and returns the dropped parameters'
    /// names (within the layer).
    pub fn set_progress(&mut self, step: usize, total: usize) -> Vec<String> {
        let Some(g) = &mut self.0 else { return Vec::new() };
        let done = g.iter_mut().fold(false, |d, g| g.set_progress(step, total) | d);
        if !done {
            return Vec::new();
        }
        self.drop_all()
    }

    /// Drops both guides; returns their parameters' names.
    pub fn drop_all(&mut self) -> Vec<String> {
        self.0.take().map(|g| g.iter().map(|g| g.w.name.clone()).collect()).unwrap_or_default()
    }

    /// The guide of map `i` (0 = fc1), if any.
    pub fn get(&self, i: usize) -> Option<&Guide> {
        self.0.as_ref().map(|g| &g[i])
    }

    /// The guide of map `i`, mutably.
    pub fn get_mut(&mut self, i: usize) -> Option<&mut Guide> {
        self.0.as_mut().map(|g| &mut g[i])
    }

    /// The guides' parameters.
    pub fn params(&self) -> Vec<&Param> {
        self.0.iter().flat_map(|g| g.iter().map(|g| &g.w)).collect()
    }

    /// Visits the guides' parameters.
    pub fn visit(&mut self, f: &mut dyn FnMut(&mut Param)) {
        for g in self.0.iter_mut().flatten() {
            f(&mut g.w);
        }
    }

    /// Whether the inference kernel must run the mixed matrices (a guide with α > 0).
    pub fn mixing(&self) -> bool {
        self.0.as_ref().is_some_and(|g| g[0].alpha > 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpha_is_a_cosine_from_one_to_zero_over_the_fraction() {
        let c = GuideConfig { fraction: 0.5, reduce_flop: false };
        assert_eq!(c.alpha(0, 100), 1.0);
        assert!((c.alpha(25, 100) - 0.5).abs() < 1e-6);
        assert!(c.alpha(49, 100) > 0.0 && c.alpha(49, 100) < 0.01);
        assert_eq!(c.alpha(50, 100), 0.0);
        assert_eq!(c.alpha(99, 100), 0.0);
        assert!(GuideConfig { fraction: 0.0, reduce_flop: false }.validate().is_err());
    }

    #[test]
    fn reduce_flop_runs_the_dense_branch_about_alpha_of_the_time() {
        let mut g = Guide::new("m", vec![1.0; 4], 2, 2, GuideConfig { fraction: 1.0, reduce_flop: true });
        g.set_alpha(0.3);
        let mut rng = Rng::new(5);
        let mut y = vec![0.0; 2];
        let runs = (0..2000)
            .filter(|_| {
                g.forward(&[1.0, 1.0], 1, &[0.0, 0.0], &mut y, &mut rng);
                g.active
            })
            .count();
        assert!((runs as f64 / 2000.0 - 0.3).abs() < 0.04, "{runs}");
    }
}
