//! Fixed-point solvers for deep-equilibrium layers: find `z = f(z)` for a batch of rows.
//!
//! * [`Solver::Anderson`] (Walker & Ni 2011, as in the DEQ code): keeps the last `memory`
//!   iterates `X` and their images `F`, and per row takes the affine combination `α` (Σα = 1)
//!   that minimises `‖Σ α_i (F_i − X_i)‖²` (+ λ‖α‖²), then steps to
//!   `β·Σ α_i F_i + (1 − β)·Σ α_i X_i`.
//! * [`Solver::Broyden`]: Broyden's "good" method on `g(z) = f(z) − z` per row, with the
//!   inverse Jacobian kept as `−I + Σ u_k v_kᵀ` (at most `max_iter` rank-one terms).
//! * [`Solver::Picard`]: plain iteration `z ← f(z)`.
//!
//! The residual is the batch's relative one, `‖f(z) − z‖ / ‖f(z)‖` (Frobenius norms), and the
//! returned `z` is the iterate with the lowest residual seen. The solver owns its scratch, so
//! repeated solves of the same size allocate nothing.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The map whose fixed point is sought: `f(z, out)` writes f of a batch of rows into `out`.
pub type MapFn<'a> = dyn FnMut(&[f32], &mut [f32]) -> Result<()> + 'a;

/// Which fixed-point method.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Solver {
    /// Anderson acceleration.
    #[default]
    Anderson,
    /// Broyden's good method (limited memory of `max_iter` updates).
    Broyden,
    /// Plain iteration.
    Picard,
}

/// Settings of a solve.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SolverConfig {
    /// Method.
    pub solver: Solver,
    /// Stop when the relative residual falls below this.
    pub tol: f32,
    /// Iteration cap (evaluations of f).
    pub max_iter: usize,
    /// Anderson: iterates remembered.
    pub memory: usize,
    /// Anderson: mixing β.
    pub beta: f32,
}

impl Default for SolverConfig {
    fn default() -> Self {
        SolverConfig { solver: Solver::Anderson, tol: 1e-4, max_iter: 30, memory: 5, beta: 1.0 }
    }
}

impl SolverConfig {
    /// Checks the settings.
    pub fn validate(&self, what: &str) -> Result<()> {
        // the caps bound the scratch: memory × rows × dim (Anderson), max_iter × rows × dim (Broyden)
        let ok = self.tol > 0.0
            && self.tol.is_finite()
            && (1..=10_000).contains(&self.max_iter)
            && (1..=64).contains(&self.memory)
            && self.beta > 0.0
            && self.beta <= 1.0;
        if !ok {
            return Err(Error::Config(format!("{what}: solver needs tol > 0, max_iter in 1..=10000, memory in 1..=64 and 0 < beta ≤ 1, got {self:?}")));
        }
        Ok(())
    }
}

/// Outcome of a solve.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SolveStats {
    /// Evaluations of f.
    pub iterations: usize,
    /// Relative residual of the returned iterate.
    pub residual: f32,
    /// Whether the residual reached the tolerance.
    pub converged: bool,
}

/// A fixed-point solver with its scratch buffers.
#[derive(Clone, Debug, Default)]
pub struct FixedPoint {
    xs: Vec<f32>,
    fs: Vec<f32>,
    best: Vec<f32>,
    cur: Vec<f32>,
    img: Vec<f32>,
    us: Vec<f32>,
    vs: Vec<f32>,
    g: Vec<f32>,
    dx: Vec<f32>,
    dg: Vec<f32>,
    tmp: Vec<f32>,
    /// Anderson's bordered Gram system, right-hand side and weights (f64).
    small: Vec<f64>,
}

fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

fn rel_residual(f: &[f32], x: &[f32]) -> f32 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (a, b) in f.iter().zip(x) {
        num += ((a - b) as f64).powi(2);
        den += (*a as f64).powi(2);
    }
    (num.sqrt() / (den.sqrt() + 1e-9)) as f32
}

impl FixedPoint {
    /// A solver with empty scratch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Solves `z = f(z)` for `rows × dim` values; `z` holds the initial guess and receives
    /// the solution. `f(z, out)` writes f of a whole batch into `out`.
    pub fn solve(&mut self, cfg: &SolverConfig, z: &mut [f32], rows: usize, dim: usize, f: &mut MapFn<'_>) -> Result<SolveStats> {
        let n = rows * dim;
        if z.len() != n {
            return Err(Error::Shape { what: "fixed-point iterate".into(), axis: "len", expected: n, got: z.len() });
        }
        match cfg.solver {
            Solver::Picard => self.picard(cfg, z, f),
            Solver::Anderson => self.anderson(cfg, z, rows, dim, f),
            Solver::Broyden => self.broyden(cfg, z, rows, dim, f),
        }
    }

    fn picard(&mut self, cfg: &SolverConfig, z: &mut [f32], f: &mut MapFn<'_>) -> Result<SolveStats> {
        let n = z.len();
        grow(&mut self.img, n);
        grow(&mut self.best, n);
        let mut stats = SolveStats { iterations: 0, residual: f32::INFINITY, converged: false };
        for it in 1..=cfg.max_iter {
            f(z, &mut self.img[..n])?;
            let r = rel_residual(&self.img[..n], z);
            z.copy_from_slice(&self.img[..n]);
            stats.iterations = it;
            if r < stats.residual {
                stats.residual = r;
            }
            if r < cfg.tol {
                stats.converged = true;
                break;
            }
        }
        Ok(stats)
    }

    fn anderson(&mut self, cfg: &SolverConfig, z: &mut [f32], rows: usize, dim: usize, f: &mut MapFn<'_>) -> Result<SolveStats> {
        let (n, m) = (z.len(), cfg.memory.max(1));
        grow(&mut self.xs, m * n);
        grow(&mut self.fs, m * n);
        grow(&mut self.best, n);
        let (xs, fs) = (&mut self.xs, &mut self.fs);
        let mut stats = SolveStats { iterations: 0, residual: f32::INFINITY, converged: false };
        // X0 = z, F0 = f(z)
        xs[..n].copy_from_slice(z);
        let (x0, f0) = (&xs[..n], &mut fs[..n]);
        f(x0, f0)?;
        stats.iterations = 1;
        let record = |k: usize, xs: &[f32], fs: &[f32], best: &mut [f32], stats: &mut SolveStats| {
            let (x, fx) = (&xs[k * n..(k + 1) * n], &fs[k * n..(k + 1) * n]);
            let r = rel_residual(fx, x);
            if r < stats.residual {
                stats.residual = r;
                // the image is one more fixed-point step: at least as good as the iterate
                best.copy_from_slice(fx);
            }
            r < cfg.tol
        };
        if record(0, xs, fs, &mut self.best[..n], &mut stats) {
            stats.converged = true;
            z.copy_from_slice(&self.best[..n]);
            return Ok(stats);
        }
        let small = &mut self.small;
        if small.len() < (m + 1) * (m + 1) + 2 * m + 1 {
            small.resize((m + 1) * (m + 1) + 2 * m + 1, 0.0);
        }
        let (h, rest) = small.split_at_mut((m + 1) * (m + 1));
        let (rhs, alpha) = rest.split_at_mut(m + 1);
        for k in 1..cfg.max_iter {
            let slot = k % m;
            // iterates stored so far: k (slots fill in order, then wrap)
            let used = k.min(m);
            // the new iterate, row by row
            let mut next = std::mem::take(&mut self.tmp);
            grow(&mut next, n);
            for r in 0..rows {
                let row = |i: usize| i * n + r * dim..i * n + (r + 1) * dim;
                // H = [[0, 1ᵀ], [1, GGᵀ + λI]] α' = [1, 0]
                let s = used + 1;
                for a in 0..used {
                    for b in 0..=a {
                        let (ra, rb) = (row(a), row(b));
                        let mut dot = 0.0f64;
                        for ((fa, xa), (fb, xb)) in fs[ra.clone()].iter().zip(&xs[ra]).zip(fs[rb.clone()].iter().zip(&xs[rb])) {
                            dot += ((fa - xa) as f64) * ((fb - xb) as f64);
                        }
                        h[(a + 1) * s + b + 1] = dot;
                        h[(b + 1) * s + a + 1] = dot;
                    }
                }
                let scale = (1..=used).map(|a| h[a * s + a]).fold(0.0f64, f64::max).max(1e-30);
                for a in 1..=used {
                    h[a * s + a] += 1e-6 * scale;
                    h[a] = 1.0;
                    h[a * s] = 1.0;
                }
                h[0] = 0.0;
                rhs[..s].iter_mut().for_each(|v| *v = 0.0);
                rhs[0] = 1.0;
                if !solve_dense(&mut h[..s * s], &mut rhs[..s], s) {
                    // degenerate history: fall back to the latest image
                    alpha[..used].iter_mut().for_each(|v| *v = 0.0);
                    alpha[(k - 1) % m] = 1.0;
                } else {
                    alpha[..used].copy_from_slice(&rhs[1..s]);
                }
                let out = &mut next[r * dim..(r + 1) * dim];
                out.iter_mut().for_each(|v| *v = 0.0);
                let beta = cfg.beta as f64;
                for (a, &al) in alpha[..used].iter().enumerate() {
                    let ra = row(a);
                    for ((o, &fv), &xv) in out.iter_mut().zip(&fs[ra.clone()]).zip(&xs[ra]) {
                        *o += (al * (beta * fv as f64 + (1.0 - beta) * xv as f64)) as f32;
                    }
                }
            }
            xs[slot * n..(slot + 1) * n].copy_from_slice(&next[..n]);
            self.tmp = next;
            let (xk, fk) = (&xs[slot * n..(slot + 1) * n], &mut fs[slot * n..(slot + 1) * n]);
            f(xk, fk)?;
            stats.iterations = k + 1;
            if !fs[slot * n..(slot + 1) * n].iter().all(|v| v.is_finite()) {
                break;
            }
            if record(slot, xs, fs, &mut self.best[..n], &mut stats) {
                stats.converged = true;
                break;
            }
        }
        z.copy_from_slice(&self.best[..n]);
        Ok(stats)
    }

    fn broyden(&mut self, cfg: &SolverConfig, z: &mut [f32], rows: usize, dim: usize, f: &mut MapFn<'_>) -> Result<SolveStats> {
        let (n, cap) = (z.len(), cfg.max_iter);
        for b in [&mut self.us, &mut self.vs] {
            grow(b, cap * n);
        }
        for b in [&mut self.best, &mut self.cur, &mut self.img, &mut self.g, &mut self.dx, &mut self.dg, &mut self.tmp] {
            grow(b, n);
        }
        let FixedPoint { us, vs, best, cur, img, g, dx, dg, tmp, .. } = self;
        let (cur, img, g, dx, dg, tmp, best) = (&mut cur[..n], &mut img[..n], &mut g[..n], &mut dx[..n], &mut dg[..n], &mut tmp[..n], &mut best[..n]);
        let mut stats = SolveStats { iterations: 0, residual: f32::INFINITY, converged: false };
        cur.copy_from_slice(z);
        f(cur, img)?;
        stats.iterations = 1;
        for i in 0..n {
            g[i] = img[i] - cur[i];
        }
        let r = rel_residual(img, cur);
        stats.residual = r;
        best.copy_from_slice(img);
        if r < cfg.tol {
            stats.converged = true;
            z.copy_from_slice(best);
            return Ok(stats);
        }
        let mut terms = 0usize;
        // B⁻¹ ≈ −I + Σ u vᵀ (per row); step dx = −B⁻¹ g
        let apply = |us: &[f32], vs: &[f32], terms: usize, v: &[f32], out: &mut [f32], transpose: bool| {
            for r in 0..rows {
                let rr = r * dim..(r + 1) * dim;
                let o = &mut out[rr.clone()];
                for (oo, &vv) in o.iter_mut().zip(&v[rr.clone()]) {
                    *oo = -vv;
                }
                for t in 0..terms {
                    let (u, w) = (&us[t * n + r * dim..t * n + (r + 1) * dim], &vs[t * n + r * dim..t * n + (r + 1) * dim]);
                    let (left, right) = if transpose { (w, u) } else { (u, w) };
                    // (u wᵀ) v = u (w·v); transposed: w (u·v)
                    let dot: f32 = right.iter().zip(&v[rr.clone()]).map(|(a, b)| a * b).sum();
                    for (oo, &l) in o.iter_mut().zip(left) {
                        *oo += l * dot;
                    }
                }
            }
        };
        for k in 1..cfg.max_iter {
            apply(us, vs, terms, g, dx, false);
            dx.iter_mut().for_each(|v| *v = -*v);
            for i in 0..n {
                cur[i] += dx[i];
            }
            f(cur, img)?;
            stats.iterations = k + 1;
            if !img.iter().all(|v| v.is_finite()) {
                break;
            }
            for i in 0..n {
                let gn = img[i] - cur[i];
                dg[i] = gn - g[i];
                g[i] = gn;
            }
            let r = rel_residual(img, cur);
            if r < stats.residual {
                stats.residual = r;
                best.copy_from_slice(img);
            }
            if r < cfg.tol {
                stats.converged = true;
                break;
            }
            if terms == cap {
                break;
            }
            // good Broyden: u = (dx − B⁻¹dg) / (dxᵀB⁻¹dg), v = B⁻ᵀdx, per row
            apply(us, vs, terms, dg, tmp, false); // tmp = B⁻¹ dg
            let (u_new, v_new) = (terms * n, terms * n);
            for r in 0..rows {
                let rr = r * dim..(r + 1) * dim;
                let denom: f32 = dx[rr.clone()].iter().zip(&tmp[rr.clone()]).map(|(a, b)| a * b).sum();
                let denom = if denom.abs() < 1e-12 { 1e-12f32.copysign(denom) } else { denom };
                for (j, i) in rr.clone().enumerate() {
                    us[u_new + r * dim + j] = (dx[i] - tmp[i]) / denom;
                }
            }
            apply(us, vs, terms, dx, tmp, true); // tmp = B⁻ᵀ dx
            vs[v_new..v_new + n].copy_from_slice(tmp);
            terms += 1;
        }
        z.copy_from_slice(best);
        Ok(stats)
    }
}

/// Solves the small dense system `a x = b` in place (Gaussian elimination with partial
/// pivoting); false if singular.
fn solve_dense(a: &mut [f64], b: &mut [f64], n: usize) -> bool {
    for c in 0..n {
        let p = (c..n).max_by(|&i, &j| a[i * n + c].abs().total_cmp(&a[j * n + c].abs())).unwrap_or(c);
        if a[p * n + c].abs() < 1e-300 || !a[p * n + c].is_finite() {
            return false;
        }
        if p != c {
            for k in 0..n {
                a.swap(c * n + k, p * n + k);
            }
            b.swap(c, p);
        }
        for i in c + 1..n {
            let fct = a[i * n + c] / a[c * n + c];
            for k in c..n {
                a[i * n + k] -= fct * a[c * n + k];
            }
            b[i] -= fct * b[c];
        }
    }
    for c in (0..n).rev() {
        let mut s = b[c];
        for k in c + 1..n {
            s -= a[c * n + k] * b[k];
        }
        b[c] = s / a[c * n + c];
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Rng;

    /// z = tanh(A z + c) per row with ‖A‖ < 1: a contraction with a unique fixed point.
    fn problem(rows: usize, dim: usize) -> (Vec<f32>, Vec<f32>) {
        let mut rng = Rng::new(5);
        let a: Vec<f32> = (0..dim * dim).map(|_| rng.normal() * 0.9 / (dim as f32).sqrt()).collect();
        let c: Vec<f32> = (0..rows * dim).map(|_| rng.normal()).collect();
        (a, c)
    }

    fn eval(a: &[f32], c: &[f32], dim: usize, z: &[f32], out: &mut [f32]) {
        for (r, o) in out.chunks_mut(dim).enumerate() {
            for i in 0..dim {
                let s: f32 = (0..dim).map(|j| a[i * dim + j] * z[r * dim + j]).sum();
                o[i] = (s + c[r * dim + i]).tanh();
            }
        }
    }

    #[test]
    fn every_solver_reaches_the_fixed_point_and_anderson_and_broyden_beat_picard() {
        let (rows, dim) = (6, 24);
        let (a, c) = problem(rows, dim);
        let mut reference = vec![0.0; rows * dim];
        let mut tmp = vec![0.0; rows * dim];
        for _ in 0..2000 {
            eval(&a, &c, dim, &reference, &mut tmp);
            reference.copy_from_slice(&tmp);
        }
        let mut iters = Vec::new();
        for solver in [Solver::Picard, Solver::Anderson, Solver::Broyden] {
            let cfg = SolverConfig { solver, tol: 1e-6, max_iter: 500, ..Default::default() };
            let mut z = vec![0.0; rows * dim];
            let stats = FixedPoint::new()
                .solve(&cfg, &mut z, rows, dim, &mut |z, out| {
                    eval(&a, &c, dim, z, out);
                    Ok(())
                })
                .unwrap();
            assert!(stats.converged && stats.residual < 1e-6, "{solver:?}: {stats:?}");
            let err = z.iter().zip(&reference).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(err < 1e-4, "{solver:?}: max error {err}");
            iters.push(stats.iterations);
        }
        assert!(iters[1] < iters[0] && iters[2] < iters[0], "iterations picard/anderson/broyden {iters:?}");
    }

    #[test]
    fn a_capped_solve_reports_no_convergence() {
        let (rows, dim) = (2, 8);
        let (a, c) = problem(rows, dim);
        let cfg = SolverConfig { tol: 1e-7, max_iter: 2, ..Default::default() };
        let mut z = vec![0.0; rows * dim];
        let s = FixedPoint::new()
            .solve(&cfg, &mut z, rows, dim, &mut |z, out| {
                eval(&a, &c, dim, z, out);
                Ok(())
            })
            .unwrap();
        assert!(!s.converged && s.iterations == 2 && s.residual > 1e-7, "{s:?}");
    }
}
