//! Finite-difference checks of every layer's backward pass: parameter gradients (including
//! the hardening, load-balancing and master-leaf terms of FFF) and input gradients.

use ffwd::core::{Activation, Rng};
use ffwd::kernels::pkm::PkmScoring;
use ffwd::layers::{
    DenseConfig, DeqConfig, Fff, FffConfig, Hash, HashConfig, Input, Layer, LayerConfig, Moe, MoeConfig, Pkm, PkmConfig, Smoe, SmoeConfig, Ufff, UfffConfig,
};
use ffwd::models::{Classifier, ModelConfig};

/// Random input `x` (`batch × ni`) and output weighting `r` (`batch × no`), and the RNG after them.
fn inputs(seed: u64, batch: usize, ni: usize, no: usize) -> (Rng, Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(seed);
    let x: Vec<f32> = (0..batch * ni).map(|_| rng.normal()).collect();
    let r: Vec<f32> = (0..batch * no).map(|_| rng.normal()).collect();
    (rng, x, r)
}

/// Token ids 0, 1, … of the rows (hash layers route by them; the others ignore them).
fn token_ids(batch: usize) -> Vec<u32> {
    (0..batch as u32).collect()
}

fn input<'a>(x: &'a [f32], batch: usize, ids: &'a [u32]) -> Input<'a> {
    Input::new(x, batch).with_ids(ids)
}

/// L = Σ y ⊙ r + aux for a fixed random r; returns L in f64.
fn objective<L: Layer + ?Sized>(layer: &mut L, x: &[f32], batch: usize, r: &[f32], seed: u64) -> f64 {
    let mut y = vec![0.0; batch * layer.out_features()];
    layer.forward_train(input(x, batch, &token_ids(batch)), &mut y, &mut Rng::new(seed)).unwrap();
    y.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() + layer.aux_loss() as f64
}

/// Checks up to `per_param` random coordinates of every parameter and of the input.
/// `same_route` says whether a perturbed forward kept the discrete routing (else skip).
fn check_layer<L: Layer + ?Sized>(layer: &mut L, batch: usize, seed: u64, per_param: usize, same_route: &dyn Fn(&L, &[f32]) -> bool) {
    let (mut rng, x, r) = inputs(seed, batch, layer.in_features(), layer.out_features());
    let (ni, no) = (layer.in_features(), layer.out_features());
    let fseed = 99;
    let mut y = vec![0.0; batch * no];
    let ids = token_ids(batch);
    layer.forward_train(input(&x, batch, &ids), &mut y, &mut Rng::new(fseed)).unwrap();
    let mut dx = vec![0.0; batch * ni];
    layer.zero_grad();
    layer.backward(input(&x, batch, &ids), &r, Some(&mut dx)).unwrap();
    let grads: Vec<(String, Vec<f32>)> = layer.params().iter().map(|p| (p.name.clone(), p.grad.clone())).collect();
    let eps = 2e-3f32;
    let l0 = objective(layer, &x, batch, &r, fseed);
    let mut checked = 0;
    let mut worst = 0.0f64;
    // 2 % relative, plus an absolute floor at the level of the f32 forward's rounding noise in
    // a central difference (so a zero analytic gradient cannot pass for a visible true one)
    let tol = |a: f64, n: f64| (a - n).abs() <= 2e-2 * a.abs().max(n.abs()) + 3e-4;
    for (pi, (name, g)) in grads.iter().enumerate() {
        if name.contains("running_") {
            // batch-norm running estimates: buffers, not trained (no gradient by design)
            assert!(g.iter().all(|&v| v == 0.0), "{name} got a gradient");
            continue;
        }
        let (mut checked_here, mut visible) = (0, 0);
        for _ in 0..per_param.min(g.len()) {
            let k = rng.below(g.len());
            let mut orig = 0.0;
            let mut k_pi = 0;
            layer.visit_params_mut(&mut |p| {
                if k_pi == pi {
                    orig = p.value[k];
                    p.value[k] = orig + eps;
                }
                k_pi += 1;
            });
            let route_plus = same_route(layer, &x);
            let lp = objective(layer, &x, batch, &r, fseed);
            let set = |layer: &mut L, v: f32| {
                let mut k_pi = 0;
                layer.visit_params_mut(&mut |p| {
                    if k_pi == pi {
                        p.value[k] = v;
                    }
                    k_pi += 1;
                });
            };
            set(layer, orig - eps);
            let route_minus = same_route(layer, &x);
            let lm = objective(layer, &x, batch, &r, fseed);
            set(layer, orig);
            if !(route_plus && route_minus) || kink(lp, l0, lm, eps) {
                continue;
            }
            let num = (lp - lm) / (2.0 * eps as f64);
            let ana = g[k] as f64;
            worst = worst.max((num - ana).abs());
            assert!(tol(ana, num), "{} param {name}[{k}]: analytic {ana} vs numeric {num}", layer.kind());
            checked += 1;
            checked_here += 1;
            visible += usize::from(num.abs() > 1e-2);
        }
        // coverage per parameter, not over all of them together
        let want = per_param.min(g.len()).div_ceil(3);
        assert!(checked_here >= want, "{} param {name}: only {checked_here} of {} coordinates checkable", layer.kind(), per_param.min(g.len()));
        assert!(g.is_empty() || visible > 0, "{} param {name}: no checked coordinate had a visible gradient", layer.kind());
    }
    for _ in 0..per_param {
        let k = rng.below(x.len());
        let mut xp = x.clone();
        xp[k] += eps;
        let mut xm = x.clone();
        xm[k] -= eps;
        if !(same_route(layer, &xp) && same_route(layer, &xm)) {
            continue;
        }
        let (lp, lm) = (objective(layer, &xp, batch, &r, fseed), objective(layer, &xm, batch, &r, fseed));
        if kink(lp, l0, lm, eps) {
            continue;
        }
        let num = (lp - lm) / (2.0 * eps as f64);
        assert!(tol(dx[k] as f64, num), "{} dx[{k}]: analytic {} vs numeric {num}", layer.kind(), dx[k]);
        checked += 1;
    }
    assert!(checked >= per_param, "{}: only {checked} coordinates checked", layer.kind());
}

/// True when the one-sided slopes disagree: a ReLU kink lies within ±eps, where central
/// differences are meaningless.
fn kink(lp: f64, l0: f64, lm: f64, eps: f32) -> bool {
    let (right, left) = ((lp - l0) / eps as f64, (l0 - lm) / eps as f64);
    (right - left).abs() > 0.01 * right.abs().max(left.abs()) + 0.005
}

fn always(_: &(dyn Layer + 'static), _: &[f32]) -> bool {
    true
}

fn build(cfg: LayerConfig, ni: usize, no: usize) -> Box<dyn Layer> {
    cfg.build(ni, no, &mut Rng::new(5)).unwrap()
}

#[test]
fn dense_two_and_three_layers_all_activations() {
    for layers in [2, 3] {
        for activation in [Activation::Gelu, Activation::Silu, Activation::Relu] {
            let mut l = build(LayerConfig::Dense(DenseConfig { width: 7, layers, activation }), 5, 4);
            check_layer(l.as_mut(), 6, 1, 12, &always);
        }
    }
}

#[test]
fn fff_soft_tree_with_hardening() {
    for depth in [0, 1, 3] {
        let cfg = FffConfig { depth, leaf: 3, activation: Activation::Gelu, hardening: 0.7, ..Default::default() };
        let mut l = build(LayerConfig::Fff(cfg), 6, 4);
        check_layer(l.as_mut(), 8, 2 + depth as u64, 12, &always);
    }
}

#[test]
fn fff_hardening_term_alone() {
    // Only the entropy term reaches the nodes' gradient when the output projection is zero.
    let cfg = FffConfig { depth: 2, leaf: 2, activation: Activation::Silu, hardening: 2.0, ..Default::default() };
    let mut l = build(LayerConfig::Fff(cfg), 4, 3);
    let mut rng = Rng::new(8);
    let x: Vec<f32> = (0..5 * 4).map(|_| rng.normal()).collect();
    let zero = vec![0.0; 5 * 3];
    let mut y = vec![0.0; 5 * 3];
    l.forward_train(Input::new(&x, 5), &mut y, &mut Rng::new(0)).unwrap();
    l.backward(Input::new(&x, 5), &zero, None).unwrap();
    let g = l.params()[0].grad.clone();
    assert!(g.iter().any(|v| v.abs() > 1e-4), "entropy gradient missing");
    let aux = |l: &mut Box<dyn Layer>| {
        l.forward_train(Input::new(&x, 5), &mut [0.0; 15], &mut Rng::new(0)).unwrap();
        l.aux_loss() as f64
    };
    for (k, &gk) in g.iter().enumerate() {
        let set = |l: &mut Box<dyn Layer>, d: f32| {
            l.visit_params_mut(&mut |p| {
                if p.name == "node_weights" {
                    p.value[k] += d;
                }
            })
        };
        set(&mut l, 1e-3);
        let ap = aux(&mut l);
        set(&mut l, -2e-3);
        let am = aux(&mut l);
        set(&mut l, 1e-3);
        let num = (ap - am) / 2e-3;
        assert!((num - gk as f64).abs() < 2e-3 + 2e-2 * num.abs(), "node_weights[{k}]: {gk} vs {num}");
    }
}

#[test]
fn fff_load_balance_master_leaf_region_leak_and_dropout() {
    // Load balancing: the hard leaf shares are piecewise constant (no gradient), so coordinates
    // whose perturbation moves a sample to another leaf are skipped. Region-leak flips are
    // fixed by the forward's seed.
    for (lb, master, leak, dropout) in [(0.5, 0, 0.0, 0.0), (0.0, 4, 0.0, 0.3), (0.3, 3, 0.25, 0.1)] {
        let cfg =
            FffConfig { depth: 2, leaf: 3, activation: Activation::Gelu, hardening: 0.5, region_leak: leak, dropout, load_balance: lb, master_leaf: master };
        let mut fff = Fff::new(cfg, 6, 4, &mut Rng::new(3)).unwrap();
        let (_, x, _) = inputs(21, 8, 6, 4);
        let base = fff.hard_leaves(&x, 8).unwrap();
        let route = move |f: &Fff, xx: &[f32]| f.hard_leaves(xx, 8).unwrap() == base;
        check_layer(&mut fff, 8, 21, 12, &route);
    }
}

#[test]
fn deq_implicit_gradient_through_the_fixed_point() {
    use ffwd::core::fixed_point::{Solver, SolverConfig};
    // a tight solve, so that the finite differences see the exact fixed point
    for (solver, activation) in [(Solver::Anderson, Activation::Gelu), (Solver::Broyden, Activation::Silu), (Solver::Anderson, Activation::Relu)] {
        let cfg = DeqConfig { state: 6, width: 9, activation, solver: SolverConfig { solver, tol: 1e-7, max_iter: 200, ..Default::default() }, lipschitz: 0.0 };
        let mut l = build(LayerConfig::Deq(cfg), 5, 4);
        check_layer(l.as_mut(), 6, 2, 12, &always);
        let (_, x, r) = inputs(4, 6, 5, 4);
        let mut y = vec![0.0; 6 * 4];
        l.forward_train(Input::new(&x, 6), &mut y, &mut Rng::new(0)).unwrap();
        l.backward(Input::new(&x, 6), &r, None).unwrap();
        let s = l.fixed_point_stats().unwrap();
        assert!(s.forward.converged && s.backward.converged && s.backward.iterations > 1, "{solver:?}: {s:?}");
    }
}

#[test]
fn blockdense_and_blockshuffle_maps() {
    use ffwd::layers::StructuredConfig;
    for (i, activation) in [Activation::Gelu, Activation::Relu].into_iter().enumerate() {
        let cfg = StructuredConfig { width: 12, rank: 4 + 4 * i, blocks: 2, activation, guide: None };
        let mut l = build(LayerConfig::BlockDense(cfg.clone()), 6, 4);
        check_layer(l.as_mut(), 5, 7, 12, &always);
        let mut l = build(LayerConfig::BlockShuffle(StructuredConfig { rank: 8, ..cfg }), 6, 4);
        check_layer(l.as_mut(), 5, 8, 12, &always);
    }
}

#[test]
fn glu_family_gate_and_value() {
    // SwiGLU, GEGLU, ReGLU (ReLU's kink: coordinates that cross it are skipped)
    for act in [Activation::Silu, Activation::Gelu, Activation::Relu] {
        let mut g = ffwd::layers::Glu::new(ffwd::layers::GluConfig { width: 5, activation: act }, 6, 4, &mut Rng::new(17)).unwrap();
        check_layer(&mut g, 7, 41, 15, &|_: &ffwd::layers::Glu, _: &[f32]| true);
    }
}

#[test]
fn lowrank_factors_both_maps() {
    // ranks below and at the maps' smaller dimensions
    for rank in [2, 5] {
        let cfg = ffwd::layers::LowRankConfig { width: 7, rank, activation: Activation::Gelu, guide: None };
        let mut l = ffwd::layers::LowRank::new(cfg, 6, 4, &mut Rng::new(19)).unwrap();
        check_layer(&mut l, 6, 43, 15, &|_: &ffwd::layers::LowRank, _: &[f32]| true);
    }
}

#[test]
fn ufff_conditional_backward() {
    // one tree, and UltraFastBERT's parallel trees (KxD = 3x2)
    for (depth, trees) in [(3, 1), (2, 3)] {
        let cfg = UfffConfig { depth, trees, activation: Activation::Gelu, ..Default::default() };
        let mut u = Ufff::new(cfg, 6, 4, &mut Rng::new(9)).unwrap();
        let (_, x, _) = inputs(4, 10, 6, 4);
        let base = u.paths(&x, 10).unwrap();
        let route = move |u: &Ufff, xx: &[f32]| u.paths(xx, 10).unwrap() == base;
        check_layer(&mut u, 10, 4, 20, &route);
    }
}

#[test]
fn moe_gates_router_experts_and_aux_losses() {
    // k = 1 (Switch) and k = 2 with and without renormalisation, balance and z-loss on, and a
    // capacity factor small enough to drop slots. Coordinates that change the routing are skipped.
    for (k, renormalize, capacity_factor) in [(1, false, 0.0), (2, true, 0.0), (2, false, 0.0), (3, true, 0.6)] {
        let cfg = MoeConfig { experts: 4, expert_width: 3, k, renormalize, balance: 0.5, z_loss: 0.1, capacity_factor, activation: Activation::Gelu };
        let mut m = Moe::new(cfg, 5, 4, &mut Rng::new(11)).unwrap();
        // a larger router so the gates vary visibly
        for v in &mut m.router.value {
            *v *= 8.0;
        }
        let (_, x, _) = inputs(31, 9, 5, 4);
        let base = m.routing(&x, 9).unwrap();
        let route = move |m: &Moe, xx: &[f32]| m.routing(xx, 9).unwrap() == base;
        check_layer(&mut m, 9, 31, 15, &route);
        if capacity_factor > 0.0 {
            assert!(m.dropped() > 0, "capacity factor {capacity_factor} dropped nothing");
        }
    }
}

#[test]
fn smoe_sigmoid_gates_entropy_and_expert_dropout() {
    for (k, dropout) in [(1, 0.0), (2, 0.0), (3, 0.4)] {
        let cfg = SmoeConfig { experts: 5, expert_width: 3, k, entropy: 0.3, expert_dropout: dropout, activation: Activation::Relu };
        let mut m = Smoe::new(cfg, 6, 3, &mut Rng::new(12)).unwrap();
        for v in &mut m.router.value {
            *v *= 3.0;
        }
        let (_, x, _) = inputs(32, 8, 6, 3);
        let base = m.routing(&x, 8).unwrap();
        let route = move |m: &Smoe, xx: &[f32]| m.routing(xx, 8).unwrap() == base;
        check_layer(&mut m, 8, 32, 15, &route);
    }
}

#[test]
fn hash_layer_experts() {
    let cfg = HashConfig { experts: 3, expert_width: 4, seed: 7, activation: Activation::Gelu, ..Default::default() };
    let mut h = Hash::new(cfg, 5, 3, &mut Rng::new(13)).unwrap();
    check_layer(&mut h, 7, 33, 15, &|_: &Hash, _: &[f32]| true);
}

#[test]
fn pkm_values_keys_queries_both_scorings() {
    for scoring in [PkmScoring::Relu, PkmScoring::Softmax] {
        let cfg = PkmConfig { n_keys: 5, heads: 2, k: 3, key_dim: 4, scoring };
        let mut p = Pkm::new(cfg, 6, 3, &mut Rng::new(14)).unwrap();
        let (_, x, _) = inputs(34, 7, 6, 3);
        let base = p.routing(&x, 7).unwrap();
        let route = move |p: &Pkm, xx: &[f32]| p.routing(xx, 7).unwrap() == base;
        check_layer(&mut p, 7, 34, 15, &route);
        // the value gradient is sparse and its rows are recorded for the optimizer
        let touched = p.values.touched_rows.clone().unwrap();
        assert!(!touched.is_empty() && touched.len() <= 7 * 2 * 3);
        for r in 0..25u32 {
            if !touched.contains(r) {
                assert!(p.values.grad[r as usize * 3..(r as usize + 1) * 3].iter().all(|&g| g == 0.0));
            }
        }
    }
}

#[test]
fn classifier_loss_gradient_includes_aux_terms() {
    // d(CE + aux)/dθ from forward_backward against finite differences of the same scalar.
    let cfg = ModelConfig {
        in_features: 5,
        n_classes: 3,
        layer: LayerConfig::Fff(FffConfig {
            depth: 2,
            leaf: 4,
            activation: Activation::Gelu,
            hardening: 1.0,
            load_balance: 0.0,
            master_leaf: 3,
            region_leak: 0.0,
            dropout: 0.0,
        }),
    };
    let mut m = Classifier::new(cfg, 1).unwrap();
    let mut rng = Rng::new(2);
    let x: Vec<f32> = (0..7 * 5).map(|_| rng.normal()).collect();
    let labels: Vec<u32> = (0..7).map(|i| (i % 3) as u32).collect();
    let s = m.forward_backward(&x, &labels, &mut Rng::new(0)).unwrap();
    assert!(s.aux > 0.0);
    let grads: Vec<Vec<f32>> = m.layer().params().iter().map(|p| p.grad.clone()).collect();
    let total = |m: &mut Classifier| {
        let s = m.forward_backward(&x, &labels, &mut Rng::new(0)).unwrap();
        s.loss as f64 + s.aux as f64
    };
    for (pi, g) in grads.iter().enumerate() {
        for k in [0, g.len() / 2, g.len() - 1] {
            let bump = |m: &mut Classifier, d: f32| {
                let mut i = 0;
                m.visit_params_mut(&mut |p| {
                    if i == pi {
                        p.value[k] += d;
                    }
                    i += 1;
                });
            };
            bump(&mut m, 2e-3);
            let lp = total(&mut m);
            bump(&mut m, -4e-3);
            let lm = total(&mut m);
            bump(&mut m, 2e-3);
            let num = (lp - lm) / 4e-3;
            assert!((num - g[k] as f64).abs() < 2e-3 + 2e-2 * num.abs(), "param {pi}[{k}]: {} vs {num}", g[k]);
        }
    }
}

#[test]
fn channel_idle_with_batch_norms() {
    for (theta, act) in [(0.75, Activation::Gelu), (0.5, Activation::Relu), (0.0, Activation::Silu)] {
        let cfg = ffwd::layers::ChannelIdleConfig { width: 8, theta, activation: act };
        let mut l = build(LayerConfig::ChannelIdle(cfg), 5, 4);
        check_layer(l.as_mut(), 6, 31, 12, &always);
    }
}

#[test]
fn self_guided_maps_mix_a_dense_guide() {
    use ffwd::layers::guided::{GuideConfig, Guides};
    use ffwd::layers::{BlockKind, LowRank, LowRankConfig, Structured, StructuredConfig};
    let guide = Some(GuideConfig { fraction: 0.5, reduce_flop: false });
    // α inside (0, 1) and guides moved away from the structured matrices, so that every
    // branch's gradient is visible
    let mix = |g: &mut Guides| {
        for i in 0..2 {
            let gi = g.get_mut(i).unwrap();
            gi.set_alpha(0.4);
            let mut r = Rng::new(i as u64);
            gi.w.value.iter_mut().for_each(|w| *w += 0.3 * r.normal());
        }
    };
    let mut l = LowRank::new(LowRankConfig { width: 7, rank: 3, activation: Activation::Gelu, guide }, 6, 4, &mut Rng::new(3)).unwrap();
    mix(l.guides_mut());
    check_layer(&mut l, 6, 44, 15, &|_: &LowRank, _: &[f32]| true);
    for (kind, rank) in [(BlockKind::BlockDense, 4), (BlockKind::BlockShuffle, 8)] {
        let cfg = StructuredConfig { width: 12, rank, blocks: 2, activation: Activation::Gelu, guide };
        let mut l = Structured::new(kind, cfg, 6, 4, &mut Rng::new(4)).unwrap();
        mix(l.guides_mut());
        check_layer(&mut l, 5, 45, 12, &|_: &Structured, _: &[f32]| true);
    }
}
