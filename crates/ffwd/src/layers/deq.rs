//! Deep-equilibrium FFN (Bai, Kolter & Koltun 2019): the output reads the fixed point
//! `z* = f(z*, x)` of one weight-tied FFN block instead of a stack of layers.
//!
//! `u = inject(x)` (`width × in`), `f(z) = fc2 · act(fc1 · z + u)` (`fc1`: `width × state`,
//! `fc2`: `state × width`, both with biases), `y = out · f(z*)`. The forward pass finds `z*`
//! with a [`FixedPoint`] solver (Anderson by default; Broyden or plain iteration as options)
//! from `z = 0`; nothing of the iterations is kept. The backward pass is implicit
//! differentiation: with `g_z = outᵀ dy`, it solves the adjoint fixed point
//! `g = J_f(z*)ᵀ g + g_z` with the same solver, then backpropagates `g` through one
//! application of `f` at `z*`. Memory is constant in the number of iterations.
//!
//! Each pass records its iterations and residual ([`Trainable::fixed_point_stats`]); a solve
//! that stops at `max_iter` above the tolerance is reported, never silently used as exact.
//! `fc2` starts at half PyTorch's scale so that `f` starts as a contraction, and with
//! `lipschitz = γ > 0` (default 0.9) it stays one: before every training forward (and in the
//! inference kernel) `fc2` is scaled down, if needed, so that
//! `‖fc2‖₂ · ‖fc1‖₂ · Lip(act) ≤ γ` (spectral norms by power iteration). That is a projection
//! after each optimizer step, as in contractive DEQs: the fixed point exists, is unique, and
//! plain iteration already converges at rate γ. Without it (`lipschitz = 0`) the equilibrium
//! typically stiffens as training goes on and solves start to hit their cap.

use serde::{Deserialize, Serialize};

use super::{ensure_len, Compile, Input, Layer, LayerConfig, Linear, Trainable};
use crate::core::fixed_point::{FixedPoint, SolveStats, SolverConfig};
use crate::core::gemm::{matmul, MatMut, MatRef};
use crate::core::{Activation, Param, Rng};
use crate::error::{check_matrix, Error, Result};
use crate::kernels::{InferKernel, Workspace};

/// Configuration of [`Deq`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeqConfig {
    /// Size of the equilibrium state z.
    pub state: usize,
    /// Hidden units of the block f.
    pub width: usize,
    /// Hidden nonlinearity of f.
    pub activation: Activation,
    /// Solver of the forward and the adjoint (backward) fixed points.
    pub solver: SolverConfig,
    /// Bound γ on the Lipschitz constant of f in z kept by projecting `fc2` (0 = off).
    pub lipschitz: f32,
}

impl Default for DeqConfig {
    fn default() -> Self {
        DeqConfig { state: 64, width: 128, activation: Activation::Relu, solver: SolverConfig::default(), lipschitz: 0.9 }
    }
}

impl DeqConfig {
    /// Scalars of a layer `in → out` (`None` on overflow).
    pub fn param_count(&self, in_features: usize, out_features: usize) -> Option<usize> {
        let (d, w) = (self.state, self.width);
        let lin = |i: usize, o: usize| o.checked_mul(i.checked_add(1)?);
        lin(in_features, w)?.checked_add(lin(d, w)?)?.checked_add(lin(w, d)?)?.checked_add(lin(d, out_features)?)
    }
}

/// Iterations and residuals of the last forward (and, after a backward, adjoint) solve.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FixedPointStats {
    /// The forward solve of the last `forward_train`.
    pub forward: SolveStats,
    /// The adjoint solve of the last `backward`.
    pub backward: SolveStats,
}

/// The maps of f and their evaluation, shared by training and the inference kernel.
#[derive(Clone, Debug)]
pub(crate) struct DeqMaps {
    pub(crate) inject: Linear,
    pub(crate) fc1: Linear,
    pub(crate) fc2: Linear,
    pub(crate) out: Linear,
    pub(crate) activation: Activation,
}

/// Largest singular value of a row-major `rows × cols` matrix by power iteration on `WᵀW`
/// (40 steps from a fixed start: deterministic; it approaches σ from below).
fn spectral_norm(w: &[f32], rows: usize, cols: usize) -> f32 {
    let mut v: Vec<f64> = (0..cols).map(|i| 1.0 + (i % 7) as f64 * 0.1).collect();
    let mut u = vec![0.0f64; rows];
    let mut sigma = 0.0;
    for _ in 0..40 {
        let nv = v.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-300);
        v.iter_mut().for_each(|a| *a /= nv);
        for (r, ur) in u.iter_mut().enumerate() {
            *ur = w[r * cols..(r + 1) * cols].iter().zip(&v).map(|(&a, b)| a as f64 * b).sum();
        }
        sigma = u.iter().map(|a| a * a).sum::<f64>().sqrt();
        v.iter_mut().for_each(|a| *a = 0.0);
        for (r, &ur) in u.iter().enumerate() {
            for (vc, &a) in v.iter_mut().zip(&w[r * cols..(r + 1) * cols]) {
                *vc += a as f64 * ur;
            }
        }
    }
    sigma as f32
}

/// A Lipschitz constant of the activation (the sup of |f'|).
fn activation_lipschitz(a: Activation) -> f32 {
    match a {
        Activation::Relu => 1.0,
        Activation::Gelu => 1.13,
        Activation::Silu => 1.1,
    }
}

impl DeqMaps {
    /// Scales `fc1.weight` and `fc2.weight` down by the same factor so that
    /// ‖fc2‖₂·‖fc1‖₂·Lip(act) ≤ `gamma` (no-op when it holds or `gamma` is 0); returns the
    /// factor applied to each.
    pub(crate) fn project(&mut self, gamma: f32) -> f32 {
        if gamma <= 0.0 {
            return 1.0;
        }
        let (d, w) = (self.state(), self.width());
        let bound = spectral_norm(&self.fc2.weight.value, d, w) * spectral_norm(&self.fc1.weight.value, w, d) * activation_lipschitz(self.activation);
        if bound <= gamma || !bound.is_finite() {
            return 1.0;
        }
        let s = (gamma / bound).sqrt();
        self.fc1.weight.value.iter_mut().for_each(|v| *v *= s);
        self.fc2.weight.value.iter_mut().for_each(|v| *v *= s);
        s
    }

    fn state(&self) -> usize {
        self.fc1.in_features()
    }

    fn width(&self) -> usize {
        self.fc1.out_features()
    }

    /// `out = f(z)` for `batch` rows, leaving the pre-activations in `a` and the activations in
    /// `h` (`batch × width` each).
    pub(crate) fn eval(&self, u: &[f32], z: &[f32], batch: usize, a: &mut [f32], h: &mut [f32], out: &mut [f32]) {
        debug_assert_eq!(a.len(), u.len());
        self.fc1.forward(z, batch, a);
        a.iter_mut().zip(u).for_each(|(p, q)| *p += q);
        self.activation.forward(a, h);
        self.fc2.forward(h, batch, out);
    }

    /// Solves `z = f(z)` for `batch` rows from `z = 0`; `z` receives `f(z*)` and `a`, `h` the
    /// pre-activations and activations at the returned iterate.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn equilibrium(
        &self,
        solver: &mut FixedPoint,
        cfg: &SolverConfig,
        u: &[f32],
        batch: usize,
        z: &mut [f32],
        a: &mut [f32],
        h: &mut [f32],
        tmp: &mut [f32],
    ) -> Result<SolveStats> {
        z.iter_mut().for_each(|v| *v = 0.0);
        let stats = solver.solve(cfg, z, batch, self.state(), &mut |zz, out| {
            self.eval(u, zz, batch, a, h, out);
            Ok(())
        })?;
        // the solver returns the image f(z_s) of its best iterate z_s; keep z_s's activations by
        // evaluating once more at the returned point (one more fixed-point step)
        tmp.copy_from_slice(z);
        self.eval(u, tmp, batch, a, h, z);
        Ok(stats)
    }
}

/// A deep-equilibrium layer. Parameters: `inject.*`, `fc1.*`, `fc2.*`, `out.*`.
pub struct Deq {
    cfg: DeqConfig,
    maps: DeqMaps,
    solver: FixedPoint,
    stats: FixedPointStats,
    u: Vec<f32>,
    /// The point z_s at which f was last evaluated (its pre-activations in `a`).
    zs: Vec<f32>,
    /// f(z_s): the equilibrium the output reads.
    z: Vec<f32>,
    a: Vec<f32>,
    h: Vec<f32>,
    gz: Vec<f32>,
    g: Vec<f32>,
    t: Vec<f32>,
}

impl Deq {
    /// A new layer `in_features → out_features`.
    pub fn new(cfg: DeqConfig, in_features: usize, out_features: usize, rng: &mut Rng) -> Result<Self> {
        if cfg.state == 0 || cfg.width == 0 {
            return Err(Error::Config(format!("deq.state and deq.width must be positive, got {} and {}", cfg.state, cfg.width)));
        }
        cfg.solver.validate("deq")?;
        if !(cfg.lipschitz.is_finite() && cfg.lipschitz >= 0.0) {
            return Err(Error::Config(format!("deq.lipschitz must be a finite value ≥ 0 (0 = off), got {}", cfg.lipschitz)));
        }
        let inject = Linear::new("inject", in_features, cfg.width, rng);
        let fc1 = Linear::new("fc1", cfg.state, cfg.width, rng);
        let mut fc2 = Linear::new("fc2", cfg.width, cfg.state, rng);
        fc2.weight.value.iter_mut().for_each(|w| *w *= 0.5);
        let out = Linear::new("out", cfg.state, out_features, rng);
        let maps = DeqMaps { inject, fc1, fc2, out, activation: cfg.activation };
        Ok(Deq {
            cfg,
            maps,
            solver: FixedPoint::new(),
            stats: FixedPointStats::default(),
            u: Vec::new(),
            zs: Vec::new(),
            z: Vec::new(),
            a: Vec::new(),
            h: Vec::new(),
            gz: Vec::new(),
            g: Vec::new(),
            t: Vec::new(),
        })
    }

    /// The equilibrium state of the last `forward_train` (`batch × state`).
    pub fn last_state(&self, batch: usize) -> &[f32] {
        &self.z[..batch * self.cfg.state]
    }
}

impl Layer for Deq {
    fn kind(&self) -> &'static str {
        "deq"
    }

    fn in_features(&self) -> usize {
        self.maps.inject.in_features()
    }

    fn out_features(&self) -> usize {
        self.maps.out.out_features()
    }

    fn config(&self) -> LayerConfig {
        LayerConfig::Deq(self.cfg.clone())
    }
}

impl Trainable for Deq {
    fn forward_train(&mut self, input: Input<'_>, y: &mut [f32], _rng: &mut Rng) -> Result<()> {
        let (x, batch) = (input.x, input.batch);
        check_matrix("deq input x", x.len(), batch, self.in_features())?;
        check_matrix("deq output y", y.len(), batch, self.out_features())?;
        let (d, w) = (self.cfg.state, self.cfg.width);
        for (buf, n) in [(&mut self.u, batch * w), (&mut self.zs, batch * d), (&mut self.z, batch * d), (&mut self.a, batch * w), (&mut self.h, batch * w)] {
            ensure_len(buf, n);
        }
        // the projection that keeps f a contraction (weights changed in place: the optimizer
        // may have left them outside the set)
        self.maps.project(self.cfg.lipschitz);
        let u = &mut self.u[..batch * w];
        self.maps.inject.forward(x, batch, u);
        let (z, zs) = (&mut self.z[..batch * d], &mut self.zs[..batch * d]);
        let (a, h) = (&mut self.a[..batch * w], &mut self.h[..batch * w]);
        self.stats.forward = self.maps.equilibrium(&mut self.solver, &self.cfg.solver, u, batch, z, a, h, zs)?;
        self.stats.backward = SolveStats::default();
        self.maps.out.forward(z, batch, y);
        Ok(())
    }

    fn backward(&mut self, input: Input<'_>, dy: &[f32], dx: Option<&mut [f32]>) -> Result<()> {
        let (x, batch) = (input.x, input.batch);
        check_matrix("deq input x", x.len(), batch, self.in_features())?;
        check_matrix("deq output gradient dy", dy.len(), batch, self.out_features())?;
        let (d, w) = (self.cfg.state, self.cfg.width);
        if self.z.len() < batch * d {
            return Err(Error::Invalid("deq backward before forward_train".into()));
        }
        for (buf, n) in [(&mut self.gz, batch * d), (&mut self.g, batch * d), (&mut self.t, batch * w)] {
            ensure_len(buf, n);
        }
        let Deq { maps, solver, cfg, stats, zs, z, a, h, gz, g, t, .. } = self;
        let (zs, z, a, h) = (&zs[..batch * d], &z[..batch * d], &a[..batch * w], &h[..batch * w]);
        let (gz, g, t) = (&mut gz[..batch * d], &mut g[..batch * d], &mut t[..batch * w]);
        // output map: dW_out, db_out and g_z = dy · W_out
        maps.out.backward(z, batch, dy, Some(gz), false);
        // adjoint fixed point g = J_f(z_s)ᵀ g + g_z, from g = g_z
        g.copy_from_slice(gz);
        let act = maps.activation;
        let (fc1, fc2) = (&maps.fc1, &maps.fc2);
        stats.backward = solver.solve(&cfg.solver, g, batch, d, &mut |gg, out| {
            // out = ((g W2) ⊙ act'(a)) W1 + g_z
            matmul(MatMut::new(t, batch, w), MatRef::new(gg, batch, d), MatRef::new(&fc2.weight.value, d, w), false);
            act.backward_inplace(a, t);
            out.copy_from_slice(gz);
            matmul(MatMut::new(out, batch, d), MatRef::new(t, batch, w), MatRef::new(&fc1.weight.value, w, d), true);
            Ok(())
        })?;
        // parameter gradients through one application of f at z_s with upstream g
        maps.fc2.backward(h, batch, g, Some(t), false);
        act.backward_inplace(a, t);
        maps.fc1.backward(zs, batch, t, None, false);
        maps.inject.backward(x, batch, t, dx, false);
        Ok(())
    }

    fn fixed_point_stats(&self) -> Option<FixedPointStats> {
        Some(self.stats)
    }

    fn params(&self) -> Vec<&Param> {
        let m = &self.maps;
        [&m.inject, &m.fc1, &m.fc2, &m.out].into_iter().flat_map(|l| [&l.weight, &l.bias]).collect()
    }

    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        let m = &mut self.maps;
        for l in [&mut m.inject, &mut m.fc1, &mut m.fc2, &mut m.out] {
            f(&mut l.weight);
            f(&mut l.bias);
        }
    }
}

impl Compile for Deq {
    fn kernel(&self) -> Box<dyn InferKernel> {
        let mut maps = self.maps.clone();
        maps.project(self.cfg.lipschitz);
        Box::new(DeqKernel { maps, solver: self.cfg.solver })
    }

    fn neurons_per_inference(&self) -> usize {
        // one evaluation of f per solver iteration; the cap bounds it
        self.cfg.width * self.cfg.solver.max_iter
    }
}

thread_local! {
    /// The inference solver's scratch, reused by every call on this thread.
    static SOLVER: std::cell::RefCell<FixedPoint> = std::cell::RefCell::new(FixedPoint::new());
}

/// Inference: the same solve (f32 maps, a solver per call), then the output map.
pub struct DeqKernel {
    maps: DeqMaps,
    solver: SolverConfig,
}

impl InferKernel for DeqKernel {
    fn kind(&self) -> &'static str {
        "deq"
    }

    fn in_features(&self) -> usize {
        self.maps.inject.in_features()
    }

    fn out_features(&self) -> usize {
        self.maps.out.out_features()
    }

    fn forward(&self, x: &[f32], batch: usize, y: &mut [f32], ws: &mut Workspace) -> Result<()> {
        crate::kernels::check_io(self, x, batch, y)?;
        let (d, w) = (self.maps.state(), self.maps.width());
        let ([u, z, a, h, tmp], _) = ws.take([batch * w, batch * d, batch * w, batch * w, batch * d], [0; 0]);
        self.maps.inject.forward(x, batch, u);
        SOLVER.with_borrow_mut(|solver| self.maps.equilibrium(solver, &self.solver, u, batch, z, a, h, tmp))?;
        self.maps.out.forward(z, batch, y);
        Ok(())
    }

    fn neurons_per_inference(&self) -> usize {
        self.maps.width() * self.solver.max_iter
    }

    fn macs_per_sample(&self) -> usize {
        let (d, w) = (self.maps.state(), self.maps.width());
        self.in_features() * w + self.solver.max_iter * 2 * d * w + d * self.out_features()
    }
}
