//! Property tests of the inference kernels over random shapes, depths and batch sizes
//! (including 1 and odd sizes): each equals a naive reference within 1e-4 relative, the
//! batched tree kernels pick exactly the leaves of the per-sample walk, and bad calls are errors.

use ffwd::core::bf16::Bf16;
use ffwd::core::{Activation, Rng};
use ffwd::kernels::ufff::TreeStrategy;
use ffwd::kernels::{FffKernel, InferKernel, Precision, UfffKernel, Workspace};
use ffwd::layers::{Compile, Dense, DenseConfig, Fff, FffConfig, Trainable, Ufff, UfffConfig};

fn randn(n: usize, r: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| r.normal()).collect()
}

fn close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{what}[{i}]: {g} vs {w}");
    }
}

/// The UltraFastBERT walk with f64 logits: `y = Σ act(z) · w_out[node]` down each path.
#[allow(clippy::too_many_arguments)]
fn naive_ufff(w_in: &[f32], b_in: &[f32], w_out: &[f32], x: &[f32], batch: usize, ni: usize, no: usize, depth: usize, act: Activation) -> Vec<f32> {
    let mut want = vec![0.0f32; batch * no];
    for b in 0..batch {
        let mut node = 0;
        for _ in 0..=depth {
            let z: f64 = (0..ni).map(|k| w_in[node * ni + k] as f64 * x[b * ni + k] as f64).sum::<f64>() + b_in[node] as f64;
            let a = act.apply(z as f32);
            for j in 0..no {
                want[b * no + j] += a * w_out[node * no + j];
            }
            node = 2 * node + 1 + usize::from(z > 0.0);
        }
    }
    want
}

const ACTS: [Activation; 3] = [Activation::Relu, Activation::Gelu, Activation::Silu];

#[test]
fn glu_kernel_matches_naive_and_the_training_forward() {
    let mut r = Rng::new(21);
    for case in 0..21 {
        let (ni, no, h) = (1 + r.below(40), 1 + r.below(20), 1 + r.below(50));
        let batch = [1, 2, 3, 7, 17, 64, 129][case % 7];
        let act = ACTS[case % 3];
        let mut g = ffwd::layers::Glu::new(ffwd::layers::GluConfig { width: h, activation: act }, ni, no, &mut r).unwrap();
        let x = randn(batch * ni, &mut r);
        let [fc13, fc2] = g.linears();
        let mut want = vec![0.0f32; batch * no];
        for b in 0..batch {
            let z = |j: usize| fc13.bias.value[j] as f64 + (0..ni).map(|i| fc13.weight.value[j * ni + i] as f64 * x[b * ni + i] as f64).sum::<f64>();
            let hidden: Vec<f64> = (0..h).map(|j| act.apply(z(j) as f32) as f64 * z(h + j)).collect();
            for o in 0..no {
                want[b * no + o] = (fc2.bias.value[o] as f64 + (0..h).map(|j| fc2.weight.value[o * h + j] as f64 * hidden[j]).sum::<f64>()) as f32;
            }
        }
        let mut y = vec![f32::NAN; batch * no];
        g.kernel().forward(&x, batch, &mut y, &mut Workspace::new()).unwrap();
        close(&y, &want, &format!("glu case {case}"));
        let mut t = vec![f32::NAN; batch * no];
        g.forward_train(ffwd::layers::Input::new(&x, batch), &mut t, &mut Rng::new(0)).unwrap();
        close(&t, &want, &format!("glu case {case}: training forward"));
    }
}

#[test]
fn lowrank_kernel_matches_the_training_forward_and_full_rank_is_the_dense_init() {
    let mut r = Rng::new(23);
    for case in 0..14 {
        let (ni, no, h, rank) = (1 + r.below(30), 1 + r.below(20), 1 + r.below(40), 1 + r.below(12));
        let batch = [1, 2, 3, 7, 17, 64, 129][case % 7];
        let cfg = ffwd::layers::LowRankConfig { width: h, rank, activation: ACTS[case % 3], guide: None };
        let mut l = ffwd::layers::LowRank::new(cfg, ni, no, &mut r).unwrap();
        let x = randn(batch * ni, &mut r);
        let mut want = vec![f32::NAN; batch * no];
        l.forward_train(ffwd::layers::Input::new(&x, batch), &mut want, &mut Rng::new(0)).unwrap();
        let mut y = vec![f32::NAN; batch * no];
        l.kernel().forward(&x, batch, &mut y, &mut Workspace::new()).unwrap();
        close(&y, &want, &format!("lowrank case {case}"));
    }
    // at full rank, U·V is the dense init the SVD started from (drawn first from the same RNG)
    let (ni, h) = (9, 6);
    let mut r = Rng::new(5);
    let bound = 1.0 / (ni as f32).sqrt();
    let dense: Vec<f32> = (0..h * ni).map(|_| r.uniform_range(-bound, bound)).collect();
    let l = ffwd::layers::LowRank::new(ffwd::layers::LowRankConfig { width: h, rank: 100, activation: Activation::Relu, guide: None }, ni, 3, &mut Rng::new(5))
        .unwrap();
    let fc1 = l.maps()[0];
    assert_eq!(fc1.rank(), 6, "rank clamped to min(h, in)");
    for i in 0..h {
        for j in 0..ni {
            let uv: f32 = (0..6).map(|c| fc1.u.value[i * 6 + c] * fc1.v.value[c * ni + j]).sum();
            assert!((uv - dense[i * ni + j]).abs() < 1e-5, "({i},{j}): {uv} vs {}", dense[i * ni + j]);
        }
    }
}

#[test]
fn dense_kernel_matches_naive() {
    let mut r = Rng::new(1);
    for case in 0..30 {
        let (ni, no, w) = (1 + r.below(40), 1 + r.below(20), 1 + r.below(70));
        let layers = 2 + r.below(2);
        let batch = [1, 2, 3, 7, 17, 64, 129][case % 7];
        let act = ACTS[case % 3];
        let d = Dense::new(DenseConfig { width: w, layers, activation: act }, ni, no, &mut r).unwrap();
        let x = randn(batch * ni, &mut r);
        // naive: loops in f64
        let mut h: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let mut width = ni;
        for (k, l) in d.linears().iter().enumerate() {
            let o = l.out_features();
            let mut next = vec![0.0f64; batch * o];
            for b in 0..batch {
                for j in 0..o {
                    let mut s = l.bias.value[j] as f64;
                    for i in 0..width {
                        s += l.weight.value[j * width + i] as f64 * h[b * width + i];
                    }
                    next[b * o + j] = if k + 1 < d.linears().len() { act.apply(s as f32) as f64 } else { s };
                }
            }
            h = next;
            width = o;
        }
        let want: Vec<f32> = h.iter().map(|&v| v as f32).collect();
        let mut y = vec![0.0; batch * no];
        d.kernel().forward(&x, batch, &mut y, &mut Workspace::new()).unwrap();
        close(&y, &want, &format!("dense case {case}"));
    }
}

#[test]
fn ufff_kernels_match_naive_and_each_other() {
    let mut r = Rng::new(2);
    let mut ws = Workspace::new();
    for case in 0..40 {
        let (ni, no, depth) = (1 + r.below(50), 1 + r.below(30), r.below(8));
        let batch = [1, 2, 5, 8, 9, 33, 100, 257][case % 8];
        let act = ACTS[case % 3];
        // every third case has parallel trees (UltraFastBERT's KxD): their outputs add up
        let trees = if case % 3 == 2 { 1 + r.below(4) } else { 1 };
        let u = Ufff::new(UfffConfig { depth, trees, activation: act, ..Default::default() }, ni, no, &mut r).unwrap();
        let x = randn(batch * ni, &mut r);
        let p = u.params();
        let (w_in, b_in, w_out) = (&p[0].value, &p[1].value, &p[2].value);
        let n = (1 << (depth + 1)) - 1;
        let mut want = vec![0.0f32; batch * no];
        for t in 0..trees {
            let one = naive_ufff(&w_in[t * n * ni..], &b_in[t * n..], &w_out[t * n * no..], &x, batch, ni, no, depth, act);
            want.iter_mut().zip(&one).for_each(|(w, o)| *w += o);
        }
        let mk = |s| UfffKernel::forest(w_in.clone(), b_in.clone(), w_out.clone(), ni, no, trees, depth + 1, act).with_strategy(s);
        let mut outs = Vec::new();
        for s in [TreeStrategy::PerSample, TreeStrategy::Grouped, TreeStrategy::Auto] {
            let mut y = vec![f32::NAN; batch * no];
            mk(s).forward(&x, batch, &mut y, &mut ws).unwrap();
            close(&y, &want, &format!("ufff case {case} {s:?}"));
            outs.push(y);
        }
        // the layer's own kernel and training forward agree with the standalone kernel
        let mut y = vec![f32::NAN; batch * no];
        u.kernel().forward(&x, batch, &mut y, &mut ws).unwrap();
        close(&y, &outs[0], &format!("ufff case {case}: layer kernel"));
        // both walks visit the same neurons (outputs agree to rounding of the dot products)
        close(&outs[1], &outs[0], &format!("ufff case {case}: grouped vs per sample"));
    }
}

#[test]
fn ufff_bf16_kernels_match_the_rounded_reference() {
    let mut r = Rng::new(12);
    let mut ws = Workspace::new();
    let round = |v: &[f32]| -> Vec<f32> { v.iter().map(|&w| Bf16::from_f32(w).to_f32()).collect() };
    for case in 0..24 {
        // widths past 32 and 64 exercise the paired blocks and the in-order tails
        let (ni, no, depth) = (1 + r.below(100), 1 + r.below(100), r.below(7));
        let batch = [1, 3, 4, 9, 64, 101][case % 6];
        let act = ACTS[case % 3];
        let u = Ufff::new(UfffConfig { depth, activation: act, ..Default::default() }, ni, no, &mut r).unwrap();
        let x = randn(batch * ni, &mut r);
        let p = u.params();
        let (w_in, b_in, w_out) = (round(&p[0].value), &p[1].value, round(&p[2].value));
        let want = naive_ufff(&w_in, b_in, &w_out, &x, batch, ni, no, depth, act);
        let mut outs = Vec::new();
        for s in [TreeStrategy::PerSample, TreeStrategy::Grouped] {
            let k = UfffKernel::new(p[0].value.clone(), b_in.clone(), p[2].value.clone(), ni, no, depth + 1, act)
                .with_strategy(s)
                .with_precision(Precision::Bf16)
                .unwrap();
            let mut y = vec![f32::NAN; batch * no];
            k.forward(&x, batch, &mut y, &mut ws).unwrap();
            close(&y, &want, &format!("ufff bf16 case {case} {s:?}"));
            outs.push(y);
        }
        close(&outs[1], &outs[0], &format!("ufff bf16 case {case}: grouped vs per sample"));
        // through the layer, and back to f32: the rounded weights, in order
        let mut y = vec![f32::NAN; batch * no];
        u.kernel_with(Precision::Bf16).unwrap().forward(&x, batch, &mut y, &mut ws).unwrap();
        close(&y, &want, &format!("ufff bf16 case {case} via the layer"));
        let back = UfffKernel::new(p[0].value.clone(), b_in.clone(), p[2].value.clone(), ni, no, depth + 1, act)
            .with_precision(Precision::Bf16)
            .unwrap()
            .with_precision(Precision::F32)
            .unwrap();
        back.forward(&x, batch, &mut y, &mut ws).unwrap();
        close(&y, &want, &format!("ufff bf16 case {case} widened back"));
    }
    let glu = ffwd::layers::Glu::new(ffwd::layers::GluConfig { width: 8, activation: Activation::Relu }, 4, 3, &mut r).unwrap();
    let err = glu.kernel_with(Precision::Bf16).err().expect("glu has no bf16 kernel").to_string();
    assert!(err.contains("bf16") && err.contains("glu"), "{err}");
}

#[test]
fn fff_kernels_match_naive_and_pick_the_same_leaves() {
    let mut r = Rng::new(3);
    let mut ws = Workspace::new();
    for case in 0..40 {
        let (ni, no, depth, leaf) = (1 + r.below(40), 1 + r.below(20), r.below(7), 1 + r.below(12));
        let master_leaf = if case % 4 == 3 { 1 + r.below(5) } else { 0 };
        let batch = [1, 3, 8, 11, 64, 101, 256][case % 7];
        let act = ACTS[case % 3];
        let f = Fff::new(FffConfig { depth, leaf, activation: act, master_leaf, ..Default::default() }, ni, no, &mut r).unwrap();
        let x = randn(batch * ni, &mut r);
        let leaves_ref = f.hard_leaves(&x, batch).unwrap();
        // naive leaf MLP on the reference layouts (w1s: leaves × in × leaf)
        let p = f.params();
        let (w1s, b1s, w2s, b2s) = (&p[2].value, &p[3].value, &p[4].value, &p[5].value);
        let mut want = vec![0.0f32; batch * no];
        for b in 0..batch {
            let l = leaves_ref[b];
            let h: Vec<f32> =
                (0..leaf).map(|j| act.apply((0..ni).map(|i| x[b * ni + i] * w1s[(l * ni + i) * leaf + j]).sum::<f32>() + b1s[l * leaf + j])).collect();
            for o in 0..no {
                want[b * no + o] = b2s[l * no + o] + (0..leaf).map(|j| h[j] * w2s[(l * leaf + j) * no + o]).sum::<f32>();
            }
            if master_leaf > 0 {
                let (mw1, mb1, mw2, mb2, gw, gb) = (&p[6].value, &p[7].value, &p[8].value, &p[9].value, &p[10].value, p[11].value[0]);
                let g = 1.0 / (1.0 + (-((0..ni).map(|i| gw[i] * x[b * ni + i]).sum::<f32>() + gb)).exp());
                let hm: Vec<f32> = (0..master_leaf).map(|k| act.apply((0..ni).map(|i| mw1[k * ni + i] * x[b * ni + i]).sum::<f32>() + mb1[k])).collect();
                for o in 0..no {
                    let mo = mb2[o] + (0..master_leaf).map(|k| mw2[o * master_leaf + k] * hm[k]).sum::<f32>();
                    want[b * no + o] = (1.0 - g) * want[b * no + o] + g * mo;
                }
            }
        }
        let base = f.kernel();
        let mut y = vec![f32::NAN; batch * no];
        base.forward(&x, batch, &mut y, &mut ws).unwrap();
        close(&y, &want, &format!("fff case {case}"));
        // strategies agree exactly, and the grouped descent picks the per-sample leaves
        let mk = |s| {
            FffKernel::new(p[0].value.clone(), p[1].value.clone(), w1s, b1s.clone(), w2s.clone(), b2s.clone(), ni, no, depth, leaf, act, None).with_strategy(s)
        };
        if master_leaf == 0 {
            let (a, b) = (mk(TreeStrategy::PerSample), mk(TreeStrategy::Grouped));
            let mut ya = vec![0.0; batch * no];
            let mut yb = vec![0.0; batch * no];
            a.forward(&x, batch, &mut ya, &mut ws).unwrap();
            b.forward(&x, batch, &mut yb, &mut ws).unwrap();
            close(&yb, &ya, &format!("fff case {case}: grouped vs per sample"));
            assert_eq!(b.leaves_grouped(&x, batch, &mut ws).unwrap(), leaves_ref, "case {case}");
            assert_eq!(a.leaves(&x, batch), leaves_ref, "case {case}");
        }
    }
}

#[test]
fn empty_batch_and_wrong_width_are_errors() {
    let mut r = Rng::new(4);
    let mut ws = Workspace::new();
    let kernels: Vec<Box<dyn InferKernel>> = vec![
        Dense::new(DenseConfig::default(), 6, 3, &mut r).unwrap().kernel(),
        Fff::new(FffConfig { depth: 2, leaf: 3, ..Default::default() }, 6, 3, &mut r).unwrap().kernel(),
        Ufff::new(UfffConfig { depth: 3, ..Default::default() }, 6, 3, &mut r).unwrap().kernel(),
    ];
    for k in &kernels {
        let e = k.forward(&[], 0, &mut [], &mut ws).unwrap_err().to_string();
        assert!(e.contains("empty batch"), "{}: {e}", k.kind());
        let e = k.forward(&[0.0; 10], 2, &mut [0.0; 6], &mut ws).unwrap_err().to_string();
        assert!(e.contains("axis `cols` expected 6"), "{}: {e}", k.kind());
        let e = k.forward(&[0.0; 12], 2, &mut [0.0; 5], &mut ws).unwrap_err().to_string();
        assert!(e.contains("output y"), "{}: {e}", k.kind());
    }
}

/// `FFWD_SIMD` really selects the code path the other tests of this binary then exercise
/// (CI runs the kernel, layer and gradient tests once per level).
#[test]
fn simd_override_is_in_effect() {
    use ffwd::core::cpu::{detected, level, SimdLevel};
    let forced = match std::env::var("FFWD_SIMD").as_deref() {
        Ok("avx512") => Some(SimdLevel::Avx512),
        Ok("avx2") => Some(SimdLevel::Avx2),
        Ok("scalar") => Some(SimdLevel::Scalar),
        _ => None,
    };
    match forced {
        Some(f) => assert_eq!(level(), f.min(detected()), "FFWD_SIMD={f:?}"),
        None => assert_eq!(level(), detected()),
    }
}
