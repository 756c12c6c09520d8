//! Deep-equilibrium layer: the solved fixed point agrees with many plain iterations, rows are
//! independent, the kernel equals the training forward, non-convergence is reported, and a
//! classifier learns with it. (Its gradients are checked in `gradients.rs`.)

use ffwd::core::fixed_point::{Solver, SolverConfig};
use ffwd::core::{Activation, Rng};
use ffwd::layers::{DeqConfig, Input, Layer, LayerConfig};
use ffwd::prelude::*;

fn layer(solver: SolverConfig) -> Box<dyn Layer> {
    LayerConfig::Deq(DeqConfig { state: 12, width: 20, activation: Activation::Gelu, solver, lipschitz: 0.9 }).build(7, 5, &mut Rng::new(3)).unwrap()
}

fn forward(l: &mut dyn Layer, x: &[f32], batch: usize) -> Vec<f32> {
    let mut y = vec![0.0; batch * l.out_features()];
    l.forward_train(Input::new(x, batch), &mut y, &mut Rng::new(0)).unwrap();
    y
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max)
}

#[test]
fn anderson_and_broyden_agree_with_unrolled_iteration() {
    let mut rng = Rng::new(1);
    let batch = 9;
    let x: Vec<f32> = (0..batch * 7).map(|_| rng.normal()).collect();
    // the reference: 3000 plain iterations
    let mut unrolled = layer(SolverConfig { solver: Solver::Picard, tol: 1e-9, max_iter: 3000, ..Default::default() });
    let reference = forward(unrolled.as_mut(), &x, batch);
    for solver in [Solver::Anderson, Solver::Broyden] {
        let mut l = layer(SolverConfig { solver, tol: 1e-6, max_iter: 100, ..Default::default() });
        let y = forward(l.as_mut(), &x, batch);
        let s = l.fixed_point_stats().unwrap().forward;
        assert!(s.converged && s.residual < 1e-6, "{solver:?}: {s:?}");
        assert!(s.iterations < 60, "{solver:?} took {} iterations", s.iterations);
        assert!(max_diff(&y, &reference) < 1e-4, "{solver:?}: {}", max_diff(&y, &reference));
    }
}

#[test]
fn rows_are_independent_and_the_kernel_matches_training() {
    let mut rng = Rng::new(2);
    let batch = 6;
    let x: Vec<f32> = (0..batch * 7).map(|_| rng.normal()).collect();
    let mut l = layer(SolverConfig { tol: 1e-6, max_iter: 100, ..Default::default() });
    let y = forward(l.as_mut(), &x, batch);
    for r in 0..batch {
        let one = forward(l.as_mut(), &x[r * 7..(r + 1) * 7], 1);
        assert!(max_diff(&one, &y[r * 5..(r + 1) * 5]) < 1e-4, "row {r}");
    }
    let mut yk = vec![0.0; batch * 5];
    l.infer(&x, batch, &mut yk).unwrap();
    assert!(max_diff(&yk, &y) < 1e-5, "kernel vs training {}", max_diff(&yk, &y));
}

#[test]
fn a_solve_stopped_at_its_cap_is_reported_by_the_trainer() {
    let mut cfg = TrainConfig { layer: LayerKind::Deq, epochs: 1, ..Default::default() };
    cfg.deq.solver = SolverConfig { tol: 1e-9, max_iter: 2, ..Default::default() };
    let split = DataSpec::Digits.load(cfg.holdout, cfg.seed, cfg.csv_label).unwrap();
    let run = ffwd::spec::fit_classifier(&cfg, &split, &mut ffwd::train::backprop::Silent).unwrap();
    let s = run.report.history[0].fixed_point.clone().unwrap();
    assert_eq!(s.unconverged, s.steps);
    assert!(s.steps > 0 && s.forward_iterations == 2.0 && s.forward_residual > 1e-9, "{s:?}");
}

#[test]
fn a_deq_classifier_learns_the_digits() {
    let mut cfg = TrainConfig { layer: LayerKind::Deq, epochs: 15, ..Default::default() };
    cfg.deq.state = 32;
    cfg.deq.width = 64;
    let split = DataSpec::Digits.load(cfg.holdout, cfg.seed, cfg.csv_label).unwrap();
    let run = ffwd::spec::fit_classifier(&cfg, &split, &mut ffwd::train::backprop::Silent).unwrap();
    assert!(run.report.test_accuracy > 0.85, "{}", run.report.test_accuracy);
    let last = run.report.history.last().unwrap().fixed_point.clone().unwrap();
    assert_eq!(last.unconverged, 0, "{last:?}");
    // checkpoint round trip keeps the layer and its solver settings
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deq.safetensors");
    run.model.save(&path).unwrap();
    let back = Classifier::load(&path).unwrap();
    assert_eq!(back.config(), run.model.config());
    assert_eq!(back.predict(&split.test.x, split.test.len()).unwrap(), run.model.predict(&split.test.x, split.test.len()).unwrap());
}
