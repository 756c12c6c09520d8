//! Truncated singular value decomposition for initialising factored layers (LowRank's
//! `U = U_r √S_r`, `V = √S_r V_rᵀ`): a randomized range finder (Halko, Martinsson, Tropp
//! 2011; 8 extra columns, two power iterations, re-orthonormalised by modified Gram–Schmidt)
//! reduces the matrix to `k ≈ r` rows, whose SVD one-sided Jacobi rotations compute exactly.
//! When `r` reaches the smaller dimension the range is captured whole and the decomposition
//! is exact to rounding. Runs in f64, allocates; for initialisation, not hot loops.

use super::Rng;

/// The `r` largest singular triplets of `a` (`m × n`, row-major): `(u, s, vt)` with `u`
/// `m × r`, `s` descending (`r`), `vt` `r × n`, all f32. `r` is clamped to `min(m, n)`.
pub fn svd_truncated(a: &[f32], m: usize, n: usize, r: usize, rng: &mut Rng) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert_eq!(a.len(), m * n, "svd_truncated: a is not m × n");
    let r = r.min(m).min(n);
    let k = (r + 8).min(m).min(n);
    let a64: Vec<f64> = a.iter().map(|&v| v as f64).collect();
    // y = A Ω (m × k), then (A Aᵀ)² y, orthonormalised between products
    let omega: Vec<f64> = (0..n * k).map(|_| rng.normal() as f64).collect();
    let mut y = mul(&a64, m, n, &omega, k);
    orthonormalize(&mut y, m, k);
    for _ in 0..2 {
        let z = mul_tn(&a64, m, n, &y, k); // Aᵀ y: n × k
        let mut z = z;
        orthonormalize(&mut z, n, k);
        y = mul(&a64, m, n, &z, k);
        orthonormalize(&mut y, m, k);
    }
    // B = Qᵀ A (k × n); Jacobi on the columns of Bᵀ (n × k): Bᵀ W = U_b Σ
    let bt = mul_tn(&a64, m, n, &y, k); // Aᵀ Q = Bᵀ, n × k
    let (ub, sigma, w) = jacobi(bt, n, k);
    // A ≈ Q B = (Q W) Σ U_bᵀ
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&i, &j| sigma[j].total_cmp(&sigma[i]));
    let qw = mul(&y, m, k, &w, k); // m × k
    let mut u = vec![0.0f32; m * r];
    let mut s = vec![0.0f32; r];
    let mut vt = vec![0.0f32; r * n];
    for (c, &j) in order.iter().take(r).enumerate() {
        s[c] = sigma[j] as f32;
        for i in 0..m {
            u[i * r + c] = qw[i * k + j] as f32;
        }
        for i in 0..n {
            vt[c * n + i] = ub[i * k + j] as f32;
        }
    }
    (u, s, vt)
}

/// `a (m × n) · b (n × k)`.
fn mul(a: &[f64], m: usize, n: usize, b: &[f64], k: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * k];
    for i in 0..m {
        let row = &mut out[i * k..(i + 1) * k];
        for (p, &av) in a[i * n..(i + 1) * n].iter().enumerate() {
            if av != 0.0 {
                row.iter_mut().zip(&b[p * k..(p + 1) * k]).for_each(|(o, &bv)| *o += av * bv);
            }
        }
    }
    out
}

/// `aᵀ (n × m) · y (m × k)` for `a` `m × n`.
fn mul_tn(a: &[f64], m: usize, n: usize, y: &[f64], k: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * k];
    for i in 0..m {
        let yr = &y[i * k..(i + 1) * k];
        for (p, &av) in a[i * n..(i + 1) * n].iter().enumerate() {
            out[p * k..(p + 1) * k].iter_mut().zip(yr).for_each(|(o, &yv)| *o += av * yv);
        }
    }
    out
}

/// Orthonormalises the `k` columns of `y` (`rows × k`) in place by modified Gram–Schmidt,
/// twice (one pass loses orthogonality on ill-conditioned inputs); a column that vanishes is
/// left at zero.
fn orthonormalize(y: &mut [f64], rows: usize, k: usize) {
    for _ in 0..2 {
        for j in 0..k {
            for p in 0..j {
                let d: f64 = (0..rows).map(|i| y[i * k + j] * y[i * k + p]).sum();
                for i in 0..rows {
                    y[i * k + j] -= d * y[i * k + p];
                }
            }
            let norm = (0..rows).map(|i| y[i * k + j] * y[i * k + j]).sum::<f64>().sqrt();
            let inv = if norm > 1e-300 { 1.0 / norm } else { 0.0 };
            for i in 0..rows {
                y[i * k + j] *= inv;
            }
        }
    }
}

/// One-sided Jacobi SVD of `x` (`rows × k`, `rows ≥ k` not required): rotates column pairs
/// until they are orthogonal, so `x W = U Σ`. Returns `(U` (`rows × k`, unit columns; zero
/// for a zero σ), `σ`, `W` (`k × k`, orthogonal)).
fn jacobi(mut x: Vec<f64>, rows: usize, k: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut w = vec![0.0; k * k];
    for i in 0..k {
        w[i * k + i] = 1.0;
    }
    for _sweep in 0..60 {
        let mut rotated = false;
        for p in 0..k {
            for q in p + 1..k {
                let (mut alpha, mut beta, mut gamma) = (0.0f64, 0.0f64, 0.0f64);
                for i in 0..rows {
                    let (a, b) = (x[i * k + p], x[i * k + q]);
                    alpha += a * a;
                    beta += b * b;
                    gamma += a * b;
                }
                if gamma.abs() <= 1e-15 * (alpha * beta).sqrt() || gamma == 0.0 {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for i in 0..rows {
                    let (a, b) = (x[i * k + p], x[i * k + q]);
                    x[i * k + p] = c * a - s * b;
                    x[i * k + q] = s * a + c * b;
                }
                for i in 0..k {
                    let (a, b) = (w[i * k + p], w[i * k + q]);
                    w[i * k + p] = c * a - s * b;
                    w[i * k + q] = s * a + c * b;
                }
            }
        }
        if !rotated {
            break;
        }
    }
    let mut sigma = vec![0.0; k];
    for (j, sj) in sigma.iter_mut().enumerate() {
        *sj = (0..rows).map(|i| x[i * k + j] * x[i * k + j]).sum::<f64>().sqrt();
        let inv = if *sj > 1e-300 { 1.0 / *sj } else { 0.0 };
        for i in 0..rows {
            x[i * k + j] *= inv;
        }
    }
    (x, sigma, w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reconstruct(u: &[f32], s: &[f32], vt: &[f32], m: usize, n: usize) -> Vec<f32> {
        let r = s.len();
        (0..m * n).map(|idx| (0..r).map(|c| u[(idx / n) * r + c] * s[c] * vt[c * n + idx % n]).sum()).collect()
    }

    #[test]
    fn full_rank_reconstructs_and_truncation_keeps_the_largest_directions() {
        let mut rng = Rng::new(3);
        for (m, n) in [(12, 7), (7, 12), (30, 30)] {
            let a: Vec<f32> = (0..m * n).map(|_| rng.normal()).collect();
            let (u, s, vt) = svd_truncated(&a, m, n, m.min(n), &mut rng);
            let back = reconstruct(&u, &s, &vt, m, n);
            for (x, y) in a.iter().zip(&back) {
                assert!((x - y).abs() < 1e-4, "{m}×{n}: {x} vs {y}");
            }
            assert!(s.windows(2).all(|w| w[0] >= w[1]), "descending: {s:?}");
            // orthonormal factors
            let r = s.len();
            for p in 0..r {
                for q in 0..r {
                    let du: f32 = (0..m).map(|i| u[i * r + p] * u[i * r + q]).sum();
                    let dv: f32 = (0..n).map(|i| vt[p * n + i] * vt[q * n + i]).sum();
                    let want = if p == q { 1.0 } else { 0.0 };
                    assert!((du - want).abs() < 1e-4 && (dv - want).abs() < 1e-4, "{m}×{n} ({p},{q}): {du} {dv}");
                }
            }
        }
        // a rank-3 matrix plus a little noise: rank 3 captures it, the error is the noise's
        let (m, n) = (40, 25);
        let f: Vec<f32> = (0..m * 3).map(|_| rng.normal()).collect();
        let g: Vec<f32> = (0..3 * n).map(|_| rng.normal()).collect();
        let a: Vec<f32> = (0..m * n).map(|idx| (0..3).map(|c| f[(idx / n) * 3 + c] * g[c * n + idx % n]).sum::<f32>() + 1e-3 * rng.normal()).collect();
        let (u, s, vt) = svd_truncated(&a, m, n, 3, &mut rng);
        let back = reconstruct(&u, &s, &vt, m, n);
        let err = a.iter().zip(&back).map(|(x, y)| (x - y).powi(2)).sum::<f32>().sqrt();
        assert!(err < 0.05, "rank-3 residual {err}");
    }
}
