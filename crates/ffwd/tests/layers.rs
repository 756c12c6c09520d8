//! Behaviour of the layers beyond gradients: routing rules, hard vs soft agreement,
//! inference vs training forward, and reproducibility of training.

use ffwd::core::{Activation, Rng};
use ffwd::data::digits;
use ffwd::layers::{Compile, Dense, DenseConfig, Fff, FffConfig, Input, Layer, LayerConfig, Trainable, Ufff, UfffConfig};
use ffwd::models::{Classifier, ModelConfig};
use ffwd::optim::OptimizerKind;
use ffwd::train::{train, TrainOptions};

fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal()).collect()
}

fn fff(depth: usize, leaf: usize, ni: usize, no: usize, seed: u64) -> Fff {
    Fff::new(FffConfig { depth, leaf, activation: Activation::Relu, ..Default::default() }, ni, no, &mut Rng::new(seed)).unwrap()
}

/// Multiplies the node routers by `s` (makes every decision confident for large `s`).
fn scale_nodes(f: &mut Fff, s: f32) {
    f.visit_params_mut(&mut |p| {
        if p.name.starts_with("node_") {
            p.value.iter_mut().for_each(|v| *v *= s);
        }
    });
}

#[test]
fn soft_mixture_rows_sum_to_one() {
    let f = fff(4, 2, 7, 3, 1);
    let x = randn(20 * 7, 2);
    let m = f.soft_mixture(&x, 20).unwrap();
    for row in m.chunks(16) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(row.iter().all(|&v| v >= 0.0));
    }
}

#[test]
fn hard_leaf_is_argmax_of_soft_weights_when_confident() {
    for depth in 1..=5 {
        let mut f = fff(depth, 2, 9, 3, depth as u64);
        scale_nodes(&mut f, 200.0);
        let batch = 64;
        let x = randn(batch * 9, 10 + depth as u64);
        let hard = f.hard_leaves(&x, batch).unwrap();
        let soft = f.soft_mixture(&x, batch).unwrap();
        let leaves = 1 << depth;
        for b in 0..batch {
            let row = &soft[b * leaves..(b + 1) * leaves];
            let arg = (0..leaves).fold(0, |best, l| if row[l] > row[best] { l } else { best });
            assert_eq!(hard[b], arg, "depth {depth} sample {b}: {row:?}");
        }
        // and for samples whose path weight is ~1, the hard output equals the soft training output
        let mut ys = vec![0.0; batch * 3];
        let mut yh = vec![0.0; batch * 3];
        f.forward_train(Input::new(&x, batch), &mut ys, &mut Rng::new(0)).unwrap();
        f.infer(&x, batch, &mut yh).unwrap();
        let mut compared = 0;
        for b in 0..batch {
            if soft[b * leaves + hard[b]] > 0.99999 {
                compared += 1;
                for j in 0..3 {
                    assert!((ys[b * 3 + j] - yh[b * 3 + j]).abs() < 1e-3, "depth {depth} sample {b}");
                }
            }
        }
        assert!(compared > batch / 2, "depth {depth}: only {compared} confident samples");
    }
}

#[test]
fn greedy_descent_can_differ_from_soft_argmax_on_soft_trees() {
    // Documented: root barely right (p = 0.51), right subtree undecided, left subtree sure.
    let mut f = fff(2, 1, 1, 1, 0);
    f.visit_params_mut(&mut |p| match p.name.as_str() {
        "node_weights" => p.value.fill(0.0),
        // logits: root +0.04 (right), left child +5 (its right leaf 1 ≈ 0.49), right child 0
        "node_biases" => p.value.copy_from_slice(&[0.04, 5.0, 0.0]),
        _ => {}
    });
    let x = [1.0f32];
    // greedy: right at the root, then right again on the exact tie → leaf 3
    assert_eq!(f.hard_leaves(&x, 1).unwrap(), vec![3]);
    let m = f.soft_mixture(&x, 1).unwrap();
    assert!(m[1] > m[2] && m[1] > m[3], "{m:?}");
}

#[test]
fn tie_rules() {
    // FFF: logit exactly 0 goes right (paper, Algorithm 1).
    let mut f = fff(1, 2, 3, 2, 0);
    f.visit_params_mut(&mut |p| {
        if p.name.starts_with("node_") {
            p.value.fill(0.0);
        }
    });
    assert_eq!(f.hard_leaves(&[0.3, -1.0, 2.0], 1).unwrap(), vec![1]);
    // UFFF: z exactly 0 goes left (UltraFastBERT's `z > 0`).
    let mut u = Ufff::new(UfffConfig { depth: 1, activation: Activation::Gelu, ..Default::default() }, 2, 2, &mut Rng::new(0)).unwrap();
    u.visit_params_mut(&mut |p| {
        if p.name.starts_with("in_") {
            p.value.fill(0.0);
        }
    });
    assert_eq!(u.paths(&[1.0, 2.0], 1).unwrap(), vec![0, 1]);
}

#[test]
fn ufff_equals_dense_compute_with_path_mask() {
    // The reference computes every neuron and masks to the path: do that naively and compare.
    // With K parallel trees, the reference views the K·n logits as (batch, K, n) and walks
    // each tree; the outputs add up.
    let (ni, no, depth, batch, trees) = (11, 5, 4, 33, 3);
    let mut u = Ufff::new(UfffConfig { depth, trees, activation: Activation::Gelu, ..Default::default() }, ni, no, &mut Rng::new(3)).unwrap();
    let x = randn(batch * ni, 4);
    let p = u.params();
    let (w_in, b_in, w_out) = (p[0].value.clone(), p[1].value.clone(), p[2].value.clone());
    let n = (1 << (depth + 1)) - 1;
    assert_eq!(b_in.len(), trees * n);
    assert_eq!(u.neurons_per_inference(), trees * (depth + 1));
    let mut want = vec![0.0f32; batch * no];
    for b in 0..batch {
        let xb = &x[b * ni..(b + 1) * ni];
        let z: Vec<f32> = (0..trees * n).map(|i| (0..ni).map(|k| w_in[i * ni + k] * xb[k]).sum::<f32>() + b_in[i]).collect();
        for t in 0..trees {
            let mut node = 0;
            for _ in 0..=depth {
                let g = t * n + node;
                let a = Activation::Gelu.apply(z[g]);
                for j in 0..no {
                    want[b * no + j] += a * w_out[g * no + j];
                }
                node = 2 * node + 1 + usize::from(z[g] > 0.0);
            }
        }
    }
    let mut y1 = vec![0.0; batch * no];
    let mut y2 = vec![0.0; batch * no];
    u.infer(&x, batch, &mut y1).unwrap();
    u.forward_train(Input::new(&x, batch), &mut y2, &mut Rng::new(0)).unwrap();
    for k in 0..want.len() {
        assert!((y1[k] - want[k]).abs() < 1e-4 * (1.0 + want[k].abs()));
        assert_eq!(y1[k], y2[k]);
    }
    assert_eq!(u.paths(&x, batch).unwrap().len(), batch * trees * (depth + 1));
}

#[test]
fn dense_and_depth0_fff_infer_equals_training_forward() {
    let batch = 300; // more than one inference chunk
    let x = randn(batch * 13, 5);
    for mut layer in [
        Box::new(Dense::new(DenseConfig { width: 17, layers: 3, activation: Activation::Silu }, 13, 6, &mut Rng::new(1)).unwrap()) as Box<dyn Layer>,
        Box::new(fff(0, 9, 13, 6, 2)),
    ] {
        let mut a = vec![0.0; batch * 6];
        let mut b = vec![0.0; batch * 6];
        layer.forward_train(Input::new(&x, batch), &mut a, &mut Rng::new(0)).unwrap();
        layer.infer(&x, batch, &mut b).unwrap();
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-4 * (1.0 + q.abs()), "{}: {p} vs {q}", layer.kind());
        }
    }
}

#[test]
fn neurons_per_inference() {
    let mut rng = Rng::new(0);
    let d = LayerConfig::Dense(DenseConfig { width: 128, layers: 3, activation: Activation::Relu }).build(8, 2, &mut rng).unwrap();
    assert_eq!(d.neurons_per_inference(), 256);
    let f = LayerConfig::Fff(FffConfig { depth: 4, leaf: 8, ..Default::default() }).build(8, 2, &mut rng).unwrap();
    assert_eq!(f.neurons_per_inference(), 12);
    let f = LayerConfig::Fff(FffConfig { depth: 4, leaf: 8, master_leaf: 8, ..Default::default() }).build(8, 2, &mut rng).unwrap();
    assert_eq!(f.neurons_per_inference(), 21);
}

#[test]
fn wrong_shapes_are_errors_naming_the_axis() {
    let mut f = fff(2, 3, 4, 2, 0);
    let e = f.forward_train(Input::new(&[0.0; 10], 2), &mut [0.0; 4], &mut Rng::new(0)).unwrap_err().to_string();
    assert!(e.contains("fff input x") && e.contains("axis `cols` expected 4"), "{e}");
    let e = f.infer(&[0.0; 8], 2, &mut [0.0; 6]).unwrap_err().to_string();
    assert!(e.contains("fff kernel output y") && e.contains("axis `rows` expected 2, got 3"), "{e}");
    let e = f.infer(&[], 0, &mut []).unwrap_err().to_string();
    assert!(e.contains("empty batch"), "{e}");
}

fn quick_run(layer: LayerConfig, seed: u64, epochs: usize) -> (Vec<f32>, f32) {
    let split = digits::split().unwrap();
    let mut m = Classifier::new(ModelConfig { in_features: 64, n_classes: 10, layer }, seed).unwrap();
    let opts = TrainOptions {
        epochs,
        batch: 32,
        lr: 3e-3,
        warmup: 10,
        min_lr_ratio: 0.1,
        weight_decay: 0.01,
        optimizer: OptimizerKind::Adamw,
        momentum: 0.9,
        clip: 1.0,
        seed,
        input_dropout: 0.0,
        save_every: 0,
        grad_noise: 0.0,
        grad_noise_gamma: 0.55,
    };
    let r = train(&mut m, &split, &opts, &mut ffwd::train::backprop::Silent).unwrap();
    (r.history.iter().map(|e| e.train_loss).collect(), r.test_accuracy)
}

#[test]
fn same_seed_same_run_and_training_learns() {
    // floors: what each reaches on digits in 30 epochs over seeds 7 and 8 (dense 0.967–0.972,
    // fff 0.919–0.922, ufff with 6 neurons per sample 0.886–0.933), a little below
    for (layer, floor) in [
        (LayerConfig::Dense(DenseConfig::default()), 0.95),
        (LayerConfig::Glu(ffwd::layers::GluConfig::default()), 0.95),
        (LayerConfig::Fff(FffConfig { depth: 3, leaf: 8, region_leak: 0.1, load_balance: 0.01, master_leaf: 4, ..Default::default() }), 0.9),
        (LayerConfig::Ufff(UfffConfig { depth: 5, activation: Activation::Gelu, ..Default::default() }), 0.86),
    ] {
        let (l1, a1) = quick_run(layer.clone(), 7, 3);
        let (l2, a2) = quick_run(layer.clone(), 7, 3);
        assert_eq!(l1, l2, "{layer:?}");
        assert_eq!(a1, a2);
        let (l3, _) = quick_run(layer.clone(), 8, 3);
        assert_ne!(l1, l3, "different seeds should differ");
        assert!(l1[2] < l1[0], "{layer:?} loss did not fall: {l1:?}");
        for seed in [7, 8] {
            let (_, acc) = quick_run(layer.clone(), seed, 30);
            assert!(acc > floor, "{layer:?} seed {seed}: test accuracy {acc} after 30 epochs, expected > {floor}");
        }
    }
}

#[test]
fn ufff_sparse_update_touches_only_visited_neurons() {
    use ffwd::optim::{AdamW, Optimizer};
    let (ni, no, batch) = (9, 4, 3);
    let mut u = Ufff::new(UfffConfig { depth: 6, ..Default::default() }, ni, no, &mut Rng::new(1)).unwrap();
    let n = u.n_neurons();
    let mut opt = AdamW::new(0.1);
    let mut prev_touched: Vec<u32> = Vec::new();
    for step in 0..3 {
        let x = randn(batch * ni, 100 + step);
        let before: Vec<Vec<f32>> = u.params().iter().map(|p| p.value.clone()).collect();
        let mut y = vec![0.0; batch * no];
        u.forward_train(Input::new(&x, batch), &mut y, &mut Rng::new(0)).unwrap();
        u.zero_grad();
        u.backward(Input::new(&x, batch), &randn(batch * no, 7), None).unwrap();
        let touched: Vec<u32> = u.touched().to_vec();
        assert!(!touched.is_empty() && touched.len() <= batch * 7);
        let mut want: Vec<u32> = u.paths(&x, batch).unwrap();
        want.sort();
        want.dedup();
        let mut got = touched.clone();
        got.sort();
        assert_eq!(got, want);
        // gradients vanish outside the visited rows, including rows visited by the previous step
        for p in u.params() {
            let w = p.len() / n;
            for r in 0..n {
                if !touched.contains(&(r as u32)) {
                    assert!(p.grad[r * w..(r + 1) * w].iter().all(|&g| g == 0.0), "{} row {r} (prev {:?})", p.name, prev_touched.contains(&(r as u32)));
                }
            }
        }
        opt.step(&mut |f| u.visit_params_mut(f), 1e-2, 1.0);
        for (p, old) in u.params().iter().zip(&before) {
            let w = p.len() / n;
            for r in 0..n {
                let same = p.value[r * w..(r + 1) * w] == old[r * w..(r + 1) * w];
                assert_eq!(same, !touched.contains(&(r as u32)), "{} row {r}", p.name);
            }
        }
        prev_touched = touched;
    }
}

/// A classifier's cached inference kernel follows its weights.
#[test]
fn classifier_inference_follows_weight_changes() {
    let split = digits::split().unwrap();
    let mut m =
        Classifier::new(ModelConfig { in_features: 64, n_classes: 10, layer: LayerConfig::Ufff(UfffConfig { depth: 3, ..Default::default() }) }, 1).unwrap();
    let x = &split.test.x[..4 * 64];
    let before = m.logits(x, 4).unwrap();
    m.visit_params_mut(&mut |p| p.value.iter_mut().for_each(|v| *v = -*v));
    let after = m.logits(x, 4).unwrap();
    assert_ne!(before, after);
    let mut y = vec![0.0; 4 * 10];
    m.layer().kernel().forward(x, 4, &mut y, &mut ffwd::kernels::Workspace::new()).unwrap();
    assert_eq!(after, y);
}

#[test]
fn structured_maps_equal_their_materialised_dense_matrices() {
    use ffwd::core::Activation;
    use ffwd::layers::{BlockKind, Structured, StructuredConfig};
    for kind in [BlockKind::BlockDense, BlockKind::BlockShuffle] {
        for (blocks, rank) in [(2, 8), (4, 12)] {
            let cfg = StructuredConfig { width: 16, rank, blocks, activation: Activation::Gelu, guide: None };
            let (ni, no, batch) = (12, 8, 7);
            let mut layer = Structured::new(kind, cfg, ni, no, &mut Rng::new(4)).unwrap();
            let mut rng = Rng::new(5);
            let x: Vec<f32> = (0..batch * ni).map(|_| rng.normal()).collect();
            let mut y = vec![0.0; batch * no];
            layer.forward_train(Input::new(&x, batch), &mut y, &mut Rng::new(0)).unwrap();
            // the same through the dense matrices and the biases, in f64
            let (w1, w2) = layer.dense_matrices();
            let bias = |name: &str| layer.params().into_iter().find(|p| p.name == name).unwrap().value.clone();
            let (b1, b2) = (bias("fc1.bias"), bias("fc2.bias"));
            for r in 0..batch {
                let h: Vec<f64> = (0..16)
                    .map(|j| {
                        let z = b1[j] as f64 + (0..ni).map(|i| w1[j * ni + i] as f64 * x[r * ni + i] as f64).sum::<f64>();
                        Activation::Gelu.apply(z as f32) as f64
                    })
                    .collect();
                for o in 0..no {
                    let want = b2[o] as f64 + (0..16).map(|j| w2[o * 16 + j] as f64 * h[j]).sum::<f64>();
                    assert!((want - y[r * no + o] as f64).abs() < 1e-4, "{kind:?} nb {blocks}: row {r} out {o}: {want} vs {}", y[r * no + o]);
                }
            }
            // the inference kernel equals the training forward
            let mut yk = vec![0.0; batch * no];
            layer.infer(&x, batch, &mut yk).unwrap();
            assert!(yk.iter().zip(&y).all(|(a, b)| (a - b).abs() < 1e-5));
            // the shuffle connects every first-stage block to every second-stage block when each
            // block has at least nb middle values: the product is then a dense matrix
            if rank / blocks >= blocks {
                assert!(w1.iter().chain(&w2).all(|v| v.abs() > 0.0), "{kind:?} nb {blocks}: a zero in the materialised matrices");
            }
        }
    }
    // widths the blocks do not divide are refused with the numbers
    let e = Structured::new(BlockKind::BlockShuffle, StructuredConfig { blocks: 3, ..Default::default() }, 10, 9, &mut Rng::new(0)).err().unwrap().to_string();
    assert!(e.contains("input width 10 is not a positive multiple of blocks = 3"), "{e}");
}

/// Self-guided training: at α = 1 the layer is its dense guide FFN, at α = 0 its structured
/// part; the inference kernel runs the mix; the guides drop when the phase ends.
fn check_self_guided<L: Layer>(mut l: L, mut plain: L, guides: fn(&mut L) -> &mut ffwd::layers::guided::Guides, what: &str) {
    let (ni, no, batch) = (l.in_features(), l.out_features(), 7);
    let h = l.neurons_per_inference();
    let x = randn(batch * ni, 8);
    let forward = |l: &mut L| {
        let mut y = vec![0.0; batch * no];
        l.forward_train(Input::new(&x, batch), &mut y, &mut Rng::new(0)).unwrap();
        y
    };
    let set = |l: &mut L, alpha: f32, perturb: bool| {
        for i in 0..2 {
            let gi = guides(l).get_mut(i).unwrap();
            gi.set_alpha(alpha);
            if perturb {
                let mut r = Rng::new(10 + i as u64);
                gi.w.value.iter_mut().for_each(|w| *w += 0.2 * r.normal());
            }
        }
    };
    // α = 0: exactly the plain structured layer of the same seed
    set(&mut l, 0.0, true);
    let y_plain = forward(&mut plain);
    assert_eq!(forward(&mut l), y_plain, "{what}: α = 0 is the structured part");
    // α = 1: the dense FFN of the guides and the biases, in f64
    set(&mut l, 1.0, false);
    let y = forward(&mut l);
    let p = |name: &str| l.params().into_iter().find(|p| p.name == name).unwrap().value.clone();
    let (w1, w2, b1, b2) = (p("fc1.guide"), p("fc2.guide"), p("fc1.bias"), p("fc2.bias"));
    for r in 0..batch {
        let z = |j: usize| b1[j] as f64 + (0..ni).map(|i| (w1[j * ni + i] * x[r * ni + i]) as f64).sum::<f64>();
        let a: Vec<f64> = (0..h).map(|j| Activation::Gelu.apply(z(j) as f32) as f64).collect();
        for o in 0..no {
            let want = b2[o] as f64 + (0..h).map(|j| w2[o * h + j] as f64 * a[j]).sum::<f64>();
            assert!((want - y[r * no + o] as f64).abs() < 1e-4, "{what}: α = 1 is the dense guide FFN ({want} vs {})", y[r * no + o]);
        }
    }
    // in between, the inference kernel runs the mixed matrices
    set(&mut l, 0.4, false);
    let y = forward(&mut l);
    let mut yk = vec![0.0; batch * no];
    l.infer(&x, batch, &mut yk).unwrap();
    assert!(yk.iter().zip(&y).all(|(a, b)| (a - b).abs() < 1e-5), "{what}: kernel ≠ training forward at α = 0.4");
    // the schedule: α(0) = 1, and the guides go when the phase ends (half of 10 steps)
    let n = l.params().len();
    assert!(l.set_progress(0, 10).is_empty());
    assert_eq!(guides(&mut l).get(0).unwrap().alpha(), 1.0);
    assert!(l.set_progress(4, 10).is_empty());
    assert_eq!(l.set_progress(5, 10), ["fc1.guide", "fc2.guide"], "{what}");
    assert_eq!(l.params().len(), n - 2);
    assert!(l.params().iter().all(|p| !p.name.ends_with("guide")));
    assert_eq!(forward(&mut l), y_plain, "{what}: without guides the layer is structured");
}

#[test]
fn self_guided_layers_move_from_their_guide_to_their_structure() {
    use ffwd::layers::guided::GuideConfig;
    use ffwd::layers::{BlockKind, LowRank, LowRankConfig, Structured, StructuredConfig};
    let (ni, no, h) = (8, 6, 12);
    let g = Some(GuideConfig { fraction: 0.5, reduce_flop: false });
    let act = Activation::Gelu;
    let lowrank = |guide| LowRank::new(LowRankConfig { width: h, rank: 3, activation: act, guide }, ni, no, &mut Rng::new(2)).unwrap();
    check_self_guided(lowrank(g), lowrank(None), LowRank::guides_mut, "lowrank");
    for (kind, rank) in [(BlockKind::BlockDense, 4), (BlockKind::BlockShuffle, 6)] {
        let s = |guide| Structured::new(kind, StructuredConfig { width: h, rank, blocks: 2, activation: act, guide }, ni, no, &mut Rng::new(2)).unwrap();
        check_self_guided(s(g), s(None), Structured::guides_mut, &format!("{kind:?}"));
    }
}
