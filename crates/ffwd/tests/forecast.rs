//! AR-Net forecasting: sparsity finds the lags of a known AR process, the linear model agrees
//! with least squares, the split never leaks, gradients, checkpoints and errors.

use std::path::PathBuf;

use ffwd::core::Rng;
use ffwd::data::timeseries::{parse_series, read_series, Fill, Frequency, Series, Stamp};
use ffwd::layers::{DenseConfig, LayerConfig};
use ffwd::models::forecaster::{sparsity_grad, sparsity_penalty};
use ffwd::models::{ForecastConfig, Forecaster};
use ffwd::train::forecast::{fit_forecaster, ForecastOptions};

/// y_t = 0.5 + 0.6 y_{t−1} − 0.3 y_{t−2} + 0.1 ε as a yearly series.
fn ar2_series(n: usize, seed: u64) -> Series {
    let mut rng = Rng::new(seed);
    let mut y = vec![0.0f32, 0.0];
    for t in 2..n {
        y.push(0.5 + 0.6 * y[t - 1] - 0.3 * y[t - 2] + 0.1 * rng.normal());
    }
    Series { column: "y".into(), freq: Frequency::Yearly, times: (0..n as i64).map(|t| Stamp(1000 + t)).collect(), values: y, filled: 0 }
}

fn asset(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/timeseries").join(name)
}

#[test]
fn sparsity_keeps_the_true_lags_of_an_ar2_process() {
    let series = ar2_series(1500, 1);
    let opts = ForecastOptions { lags: 16, sparsity: 0.3, epochs: 60, ..Default::default() };
    let (_, dense) = fit_forecaster(&series, &ForecastOptions { sparsity: 0.0, ..opts.clone() }, &mut |_| {}).unwrap();
    let (_, sparse) = fit_forecaster(&series, &opts, &mut |_| {}).unwrap();
    assert_eq!(sparse.active_lags, vec![1, 2], "weights {:?}", sparse.ar_weights);
    assert_eq!(sparse.bic_order, 2);
    // on standardised data the AR coefficients are unchanged: 0.6 and −0.3
    assert!((sparse.ar_weights[0] - 0.6).abs() < 0.08 && (sparse.ar_weights[1] + 0.3).abs() < 0.08, "{:?}", sparse.ar_weights);
    let unused = |r: &ffwd::train::forecast::ForecastReport| r.ar_weights[2..].iter().map(|w| w.abs()).sum::<f32>();
    assert!(unused(&sparse) < 0.25 * unused(&dense), "sparse {} vs unregularised {}", unused(&sparse), unused(&dense));
    // and it forecasts as well as the least-squares AR(16) and far better than the naive one
    let t = sparse.split("test").unwrap();
    assert!(t.model.mae < 1.05 * t.ar_least_squares.mae, "{t:?}");
    assert!(t.model.mase < 0.8 * t.seasonal_naive.mase, "{t:?}");
}

#[test]
fn linear_ar_net_converges_to_least_squares() {
    let series = ar2_series(800, 2);
    let (_, r) = fit_forecaster(&series, &ForecastOptions { lags: 3, horizon: 2, epochs: 150, ..Default::default() }, &mut |_| {}).unwrap();
    let t = r.split("train").unwrap();
    // least squares minimises the training error: gradient descent gets within 1 %
    assert!(t.model.rmse < 1.01 * t.ar_least_squares.rmse && t.model.rmse > 0.99 * t.ar_least_squares.rmse, "{t:?}");
    assert_eq!((r.lags, r.horizon, r.split_values), (3, 2, [560, 120, 120]));
}

#[test]
fn later_parts_of_the_series_never_reach_training() {
    let series = ar2_series(400, 3);
    let opts = ForecastOptions { lags: 4, epochs: 20, layer: ffn_free_check(), ..Default::default() };
    let (a, ra) = fit_forecaster(&series, &opts, &mut |_| {}).unwrap();
    // change the validation and test parts (the last 30 %): same weights, same training error
    let mut changed = series.clone();
    for v in &mut changed.values[280..] {
        *v = 10.0 * *v + 3.0;
    }
    let (b, rb) = fit_forecaster(&changed, &opts, &mut |_| {}).unwrap();
    assert_eq!(a.ar_weights(), b.ar_weights());
    assert_eq!(ra.split("train"), rb.split("train"));
    assert_ne!(ra.split("test"), rb.split("test"));
}

/// A dense FFN next to the AR map (checks that the FFN's training also ignores later parts).
fn ffn_free_check() -> Option<LayerConfig> {
    Some(LayerConfig::Dense(DenseConfig { width: 8, ..Default::default() }))
}

#[test]
fn forecaster_gradients_match_finite_differences() {
    let cfg = ForecastConfig { lags: 5, horizon: 2, layer: ffn_free_check(), mean: 0.0, std: 1.0, freq: Frequency::Yearly, column: "y".into() };
    let mut model = Forecaster::new(cfg, 4).unwrap();
    let mut rng = Rng::new(9);
    let batch = 7;
    let x: Vec<f32> = (0..batch * 5).map(|_| rng.normal()).collect();
    let t: Vec<f32> = (0..batch * 2).map(|_| rng.normal()).collect();
    let lambda = 0.7;
    let loss = |m: &mut Forecaster| {
        let (mse, reg) = m.forward_backward(&x, &t, lambda, &mut Rng::new(0)).unwrap();
        m.zero_grad();
        mse as f64 + reg as f64
    };
    model.zero_grad();
    model.forward_backward(&x, &t, lambda, &mut Rng::new(0)).unwrap();
    let mut grads = Vec::new();
    model.visit_params_mut(&mut |p| grads.push(p.grad.clone()));
    model.zero_grad();
    let mut checked = 0;
    for (pi, g) in grads.iter().enumerate() {
        for i in (0..g.len()).step_by(3) {
            let eps = 1e-2f32;
            let set = |m: &mut Forecaster, d: f32| {
                let mut k = 0;
                m.visit_params_mut(&mut |p| {
                    if k == pi {
                        p.value[i] += d;
                    }
                    k += 1;
                });
            };
            set(&mut model, eps);
            let up = loss(&mut model);
            set(&mut model, -2.0 * eps);
            let down = loss(&mut model);
            set(&mut model, eps);
            let fd = (up - down) / (2.0 * eps as f64);
            assert!((fd - g[i] as f64).abs() < 2e-2 * fd.abs().max(0.05), "param {pi} index {i}: fd {fd} vs {}", g[i]);
            checked += 1;
        }
    }
    assert!(checked > 20, "{checked}");
    assert!(sparsity_penalty(0.5) > 0.0 && sparsity_grad(-0.5) < 0.0);
}

#[test]
fn checkpoint_round_trip_and_forecast() {
    let series = read_series(&asset("sunspots.csv"), None, Fill::None).unwrap();
    assert_eq!((series.len(), series.freq, series.column.as_str()), (309, Frequency::Yearly, "SUNACTIVITY"));
    let opts = ForecastOptions { lags: 12, horizon: 3, epochs: 30, layer: ffn_free_check(), ..Default::default() };
    let (model, report) = fit_forecaster(&series, &opts, &mut |_| {}).unwrap();
    assert_eq!(report.history.len(), 30);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.safetensors");
    model.save(&path).unwrap();
    let back = Forecaster::load(&path).unwrap();
    assert_eq!(back.config(), model.config());
    let (a, b) = (model.forecast(&series.values).unwrap(), back.forecast(&series.values).unwrap());
    assert_eq!(a, b);
    assert_eq!(a.len(), 3);
    assert!(a.iter().all(|v| v.is_finite() && (-50.0..300.0).contains(v)), "{a:?}");
    // a classifier checkpoint is not a forecaster
    let other = dir.path().join("c.safetensors");
    let cfg = ffwd::models::ModelConfig { in_features: 3, n_classes: 2, layer: ffn_free_check().unwrap() };
    ffwd::models::Classifier::new(cfg, 0).unwrap().save(&other).unwrap();
    let err = Forecaster::load(&other).err().unwrap().to_string();
    assert!(err.contains("classifier/1") && err.contains("forecaster/1"), "{err}");
    let err = model.forecast(&series.values[..5]).unwrap_err().to_string();
    assert!(err.contains("last 12 values"), "{err}");
}

#[test]
fn embedded_series_parse_with_their_steps() {
    let co2 = read_series(&asset("co2.csv"), Some("co2"), Fill::Linear).unwrap();
    assert_eq!((co2.freq, co2.filled, co2.len()), (Frequency::Days(7), 59, 2284));
    assert!(co2.values.iter().all(|v| v.is_finite()));
    let e = read_series(&asset("elec_equip.csv"), None, Fill::None).unwrap();
    assert_eq!((e.freq, e.len(), e.times[0].format(e.freq).as_str()), (Frequency::Monthly, 257, "1995-01"));
    // too short for the lags: a one-line error naming the part
    let short = parse_series("t,v\n2000,1\n2001,2\n2002,3\n2003,4\n2004,5\n2005,6\n", "s", None, Fill::None).unwrap();
    let err = fit_forecaster(&short, &ForecastOptions::default(), &mut |_| {}).err().unwrap().to_string();
    assert!(err.contains("too short for lags 12") && !err.contains('\n'), "{err}");
}
