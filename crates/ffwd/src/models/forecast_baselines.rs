//! The classic forecasts AR-Net is compared with: seasonal-naive and AR(p) fitted by least
//! squares (direct multi-step: one regression per step ahead), and the order an AR model
//! needs by the Bayesian information criterion.

use crate::error::{Error, Result};

/// Seasonal-naive forecast from origin `t` (the index of the first predicted value):
/// `ŷ[t + k] = y[t + k − m·(⌊k/m⌋ + 1)]` for `k` in `0..horizon`; `None` when `t < m`.
pub fn seasonal_naive(values: &[f32], t: usize, horizon: usize, m: usize) -> Option<Vec<f32>> {
    let m = m.max(1);
    (t >= m && t <= values.len()).then(|| (0..horizon).map(|k| values[t + k - m * (k / m + 1)]).collect())
}

/// Mean absolute seasonal difference `mean |y[t] − y[t − m]|` over `values` (MASE's scale).
pub fn seasonal_scale(values: &[f32], m: usize) -> f32 {
    let m = m.max(1);
    if values.len() <= m {
        return f32::NAN;
    }
    let s: f64 = (m..values.len()).map(|t| (values[t] - values[t - m]).abs() as f64).sum();
    (s / (values.len() - m) as f64) as f32
}

/// AR(p) with an intercept, one coefficient set per step ahead, fitted by least squares.
#[derive(Clone, Debug, PartialEq)]
pub struct LeastSquaresAr {
    /// p.
    pub order: usize,
    /// Steps ahead.
    pub horizon: usize,
    /// `horizon × (order + 1)`: for step k, the weights of lags `order … 1` (the input's
    /// column order: oldest first), then the intercept.
    pub coef: Vec<f64>,
}

impl LeastSquaresAr {
    /// Fits on windows `x` (`n × order`, oldest lag first) and targets `y` (`n × horizon`).
    pub fn fit(x: &[f32], y: &[f32], order: usize, horizon: usize) -> Result<Self> {
        let n = y.len() / horizon.max(1);
        if n <= order + 1 {
            return Err(Error::Invalid(format!("least-squares AR({order}) needs more than {} windows, got {n}", order + 1)));
        }
        let k = order + 1;
        // normal equations AᵀA c = Aᵀy with A = [x, 1]
        let (mut ata, mut aty) = (vec![0.0f64; k * k], vec![0.0f64; k * horizon]);
        let mut row = vec![0.0f64; k];
        for i in 0..n {
            for (r, &v) in row.iter_mut().zip(&x[i * order..(i + 1) * order]) {
                *r = v as f64;
            }
            row[order] = 1.0;
            for a in 0..k {
                for b in 0..=a {
                    ata[a * k + b] += row[a] * row[b];
                }
                for s in 0..horizon {
                    aty[a * horizon + s] += row[a] * y[i * horizon + s] as f64;
                }
            }
        }
        for a in 0..k {
            for b in 0..a {
                ata[b * k + a] = ata[a * k + b];
            }
        }
        // a tiny ridge keeps collinear lags solvable
        let tr = (0..k).map(|a| ata[a * k + a]).sum::<f64>() / k as f64;
        for a in 0..k {
            ata[a * k + a] += 1e-10 * tr.max(1e-300);
        }
        let sol = solve_spd(&mut ata, &aty, k, horizon).ok_or_else(|| Error::Invalid(format!("least-squares AR({order}): the lag matrix is singular")))?;
        let mut coef = vec![0.0; horizon * k];
        for a in 0..k {
            for s in 0..horizon {
                coef[s * k + a] = sol[a * horizon + s];
            }
        }
        Ok(LeastSquaresAr { order, horizon, coef })
    }

    /// The forecast of one window (`order` values, oldest first): `horizon` values.
    pub fn predict(&self, window: &[f32]) -> Vec<f32> {
        let k = self.order + 1;
        (0..self.horizon)
            .map(|s| {
                let c = &self.coef[s * k..(s + 1) * k];
                (c[self.order] + window.iter().zip(c).map(|(&v, &w)| v as f64 * w).sum::<f64>()) as f32
            })
            .collect()
    }
}

/// The AR orders in `1..=max_order` with the lowest AIC, `N·ln σ² + 2·(p + 1)`, and the lowest
/// BIC, `N·ln σ² + (p + 1)·ln N`, every order fitted one step ahead by least squares on the
/// same targets `values[max_order..]`. Returns (AIC order, BIC order).
pub fn ar_orders(values: &[f32], max_order: usize) -> Result<(usize, usize)> {
    let n = values.len().saturating_sub(max_order);
    if max_order == 0 || n <= max_order + 2 {
        return Err(Error::Invalid(format!("choosing an AR order up to {max_order} needs more than {} values, got {}", 2 * max_order + 2, values.len())));
    }
    let (mut aic, mut bic) = ((f64::INFINITY, 1), (f64::INFINITY, 1));
    for p in 1..=max_order {
        let mut x = Vec::with_capacity(n * p);
        for t in max_order..values.len() {
            x.extend_from_slice(&values[t - p..t]);
        }
        let y = &values[max_order..];
        let ar = LeastSquaresAr::fit(&x, y, p, 1)?;
        let sse: f64 = (0..n).map(|i| (ar.predict(&x[i * p..(i + 1) * p])[0] as f64 - y[i] as f64).powi(2)).sum();
        let fit = n as f64 * (sse / n as f64).max(1e-300).ln();
        let (a, b) = (fit + 2.0 * (p + 1) as f64, fit + (p + 1) as f64 * (n as f64).ln());
        if a < aic.0 {
            aic = (a, p);
        }
        if b < bic.0 {
            bic = (b, p);
        }
    }
    Ok((aic.1, bic.1))
}

/// Solves `A X = B` for symmetric positive definite `A` (`k × k`, overwritten by its Cholesky
/// factor) and `B` (`k × m`); `None` if `A` is not positive definite.
fn solve_spd(a: &mut [f64], b: &[f64], k: usize, m: usize) -> Option<Vec<f64>> {
    for j in 0..k {
        let mut d = a[j * k + j];
        for p in 0..j {
            d -= a[j * k + p] * a[j * k + p];
        }
        if d <= 0.0 || !d.is_finite() {
            return None;
        }
        let d = d.sqrt();
        a[j * k + j] = d;
        for i in j + 1..k {
            let mut s = a[i * k + j];
            for p in 0..j {
                s -= a[i * k + p] * a[j * k + p];
            }
            a[i * k + j] = s / d;
        }
    }
    let mut x = b.to_vec();
    for c in 0..m {
        for i in 0..k {
            let mut s = x[i * m + c];
            for p in 0..i {
                s -= a[i * k + p] * x[p * m + c];
            }
            x[i * m + c] = s / a[i * k + i];
        }
        for i in (0..k).rev() {
            let mut s = x[i * m + c];
            for p in i + 1..k {
                s -= a[p * k + i] * x[p * m + c];
            }
            x[i * m + c] = s / a[i * k + i];
        }
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Rng;

    /// An AR(2) process y_t = 0.6 y_{t−1} − 0.3 y_{t−2} + 0.5 + ε.
    fn ar2(n: usize) -> Vec<f32> {
        let mut rng = Rng::new(3);
        let mut y = vec![0.0f32, 0.0];
        for t in 2..n {
            y.push(0.6 * y[t - 1] - 0.3 * y[t - 2] + 0.5 + 0.1 * rng.normal());
        }
        y
    }

    #[test]
    fn least_squares_recovers_ar_coefficients_and_bic_its_order() {
        let y = ar2(4000);
        let (p, n) = (2, y.len() - 2);
        let x: Vec<f32> = (2..y.len()).flat_map(|t| y[t - 2..t].to_vec()).collect();
        let ar = LeastSquaresAr::fit(&x, &y[2..], p, 1).unwrap();
        // coefficients: lag 2, lag 1, intercept
        for (c, want) in ar.coef.iter().zip([-0.3, 0.6, 0.5]) {
            assert!((c - want).abs() < 0.03, "{:?}", ar.coef);
        }
        assert_eq!(n, 3998);
        let (aic, bic) = ar_orders(&y, 8).unwrap();
        assert_eq!(bic, 2);
        assert!((2..=4).contains(&aic), "{aic}");
    }

    #[test]
    fn seasonal_naive_repeats_the_last_season() {
        let v: Vec<f32> = (0..10).map(|i| i as f32).collect();
        assert_eq!(seasonal_naive(&v, 6, 5, 3).unwrap(), vec![3.0, 4.0, 5.0, 3.0, 4.0]);
        assert_eq!(seasonal_naive(&v, 6, 2, 1).unwrap(), vec![5.0, 5.0]);
        assert!(seasonal_naive(&v, 2, 2, 3).is_none());
        assert_eq!(seasonal_scale(&v, 2), 2.0);
    }
}
