//! σ-MoE forward at Csordás et al.'s benchmark shape (d 512, 32 experts × 128, K = 4) three
//! ways, measured in one run:
//!
//! * `ffwd`: the grouped-dispatch kernel (`ffwd::kernels::MoeKernel`);
//! * `loop`: the per-expert gather/loop approach of candle's Mixtral block (router scores
//!   to host lists, then for every expert: index-select its tokens into a new tensor, two
//!   matmuls with new outputs, scale by the gates, index-add into the output), built here on
//!   the same GEMM (`ffwd::core::gemm::matmul`, threaded inside each product) so that only the
//!   dispatch strategy differs;
//! * `dense`: the dense 512-4096-512 block (`ffwd::kernels::DenseKernel`).
//!
//! Run: `cargo bench --bench moe_loop [-- --batches 1,16,256,4096 --reps 30 --flush]`.
//! Prints one line per batch with medians in µs and the ratios. `--flush` evicts the caches
//! before every call; `--gemm` times one expert's products (GEMM library vs `gemm_small`).

use std::time::Instant;

use ffwd::core::gemm::{matmul, MatMut, MatRef};
use ffwd::core::{Activation, Rng};
use ffwd::kernels::Workspace;
use ffwd::layers::{Compile, DenseConfig, LayerConfig, Smoe, SmoeConfig};

const D: usize = 512;
const E: usize = 32;
const G: usize = 128;
const K: usize = 4;

/// The candle-Mixtral-style forward: allocates per call and per expert, loops experts in order.
fn loop_forward(router: &[f32], w1: &[f32], b1: &[f32], w2: &[f32], b2: &[f32], x: &[f32], batch: usize) -> Vec<f32> {
    let mut logits = vec![0.0f32; batch * E];
    matmul(MatMut::new(&mut logits, batch, E), MatRef::new(x, batch, D), MatRef::new(router, E, D).t(), false);
    // routing on the host: per expert, the (token, gate) pairs
    let mut per_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); E];
    for b in 0..batch {
        let row = &logits[b * E..(b + 1) * E];
        let mut idx: Vec<usize> = (0..E).collect();
        idx.sort_by(|&i, &j| row[j].total_cmp(&row[i]));
        for &e in &idx[..K] {
            per_expert[e].push((b, 1.0 / (1.0 + (-row[e]).exp())));
        }
    }
    let mut y = vec![0.0f32; batch * D];
    for row in y.chunks_mut(D) {
        row.copy_from_slice(b2);
    }
    for (e, list) in per_expert.iter().enumerate() {
        if list.is_empty() {
            continue;
        }
        let n = list.len();
        let xs: Vec<f32> = list.iter().flat_map(|&(t, _)| x[t * D..(t + 1) * D].iter().copied()).collect();
        let mut h: Vec<f32> = (0..n).flat_map(|_| b1[e * G..(e + 1) * G].iter().copied()).collect();
        matmul(MatMut::new(&mut h, n, G), MatRef::new(&xs, n, D), MatRef::new(&w1[e * D * G..(e + 1) * D * G], D, G), true);
        for v in &mut h {
            *v = v.max(0.0);
        }
        let mut ye = vec![0.0f32; n * D];
        matmul(MatMut::new(&mut ye, n, D), MatRef::new(&h, n, G), MatRef::new(&w2[e * G * D..(e + 1) * G * D], G, D), false);
        for (r, &(t, gate)) in list.iter().enumerate() {
            for (o, v) in y[t * D..(t + 1) * D].iter_mut().zip(&ye[r * D..(r + 1) * D]) {
                *o += gate * v;
            }
        }
    }
    y
}

/// One expert's two products on one thread: the GEMM library against `gemm_small`.
fn gemm_shapes(reps: usize) {
    let mut rng = Rng::new(3);
    // σ-MoE expert products, then FFF leaf products (768 → 32 → 768)
    for (n, k, m) in [(32, D, G), (32, G, D), (8, D, G), (128, D, G), (128, G, D), (1, 768, 32), (1, 32, 768), (4, 768, 32), (16, 768, 32), (16, 32, 768)] {
        let a: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
        let w: Vec<f32> = (0..k * m).map(|_| rng.normal()).collect();
        let mut y = vec![0.0f32; n * m];
        let (mut t1, mut t2) = (Vec::new(), Vec::new());
        for _ in 0..reps * 10 {
            let s = Instant::now();
            ffwd::core::gemm::matmul_serial(MatMut::new(&mut y, n, m), MatRef::new(&a, n, k), MatRef::new(&w, k, m), false);
            t1.push(s.elapsed().as_secs_f64() * 1e6);
            let s = Instant::now();
            ffwd::core::simd::gemm_small(&a, k, &w, m, None, &mut y);
            t2.push(s.elapsed().as_secs_f64() * 1e6);
        }
        let (g1, g2) = (median(t1), median(t2));
        let gf = |t: f64| 2.0 * (n * k * m) as f64 / t / 1e3;
        println!("{n:>4}x{k:<4}·{k:>4}x{m:<4}  gemm crate {g1:>7.1} µs ({:>5.1} GFLOP/s)  gemm_small {g2:>7.1} µs ({:>5.1} GFLOP/s)", gf(g1), gf(g2));
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let batches: Vec<usize> = get("--batches").unwrap_or_else(|| "1,16,256,4096".into()).split(',').filter_map(|s| s.parse().ok()).collect();
    let reps: usize = get("--reps").and_then(|s| s.parse().ok()).unwrap_or(30);
    let only_ffwd = args.iter().any(|a| a == "--only-ffwd");
    if args.iter().any(|a| a == "--gemm") {
        gemm_shapes(reps);
        return;
    }

    let mut rng = Rng::new(1);
    let cfg = SmoeConfig { experts: E, expert_width: G, k: K, activation: Activation::Relu, ..Default::default() };
    let mut smoe = Smoe::new(cfg, D, D, &mut rng).expect("smoe");
    for v in smoe.bank.b1.value.iter_mut().chain(smoe.bank.b2.value.iter_mut()) {
        *v = 0.1 * rng.normal();
    }
    let kernel = smoe.kernel();
    let dense = LayerConfig::Dense(DenseConfig { width: 4096, layers: 2, activation: Activation::Relu }).build(D, D, &mut rng).expect("dense").kernel();
    let mut ws = Workspace::new();
    println!("σ-MoE d={D}, {E} experts x {G}, K={K}; median µs per batch over {reps} calls, {} threads", rayon::current_num_threads());
    println!("{:>6} {:>12} {:>12} {:>12} {:>10} {:>10}", "batch", "ffwd_us", "loop_us", "dense_us", "loop/ffwd", "dense/ffwd");
    for &batch in &batches {
        let sets = (4096 / batch).clamp(2, 16);
        let xs: Vec<Vec<f32>> = (0..sets).map(|_| (0..batch * D).map(|_| rng.normal()).collect()).collect();
        let mut y = vec![0.0f32; batch * D];
        // the three must agree before they are timed
        kernel.forward(&xs[0], batch, &mut y, &mut ws).expect("kernel");
        let reference = loop_forward(&smoe.router.value, &smoe.bank.w1.value, &smoe.bank.b1.value, &smoe.bank.w2.value, &smoe.bank.b2.value, &xs[0], batch);
        let err = y.iter().zip(&reference).map(|(a, b)| (a - b).abs() / (1.0 + b.abs())).fold(0.0f32, f32::max);
        assert!(err < 1e-3, "loop and kernel disagree: {err}");
        // The three are timed in alternating rounds of ROUND calls, so that the machine's
        // drift hits them alike while each sees its own weights warm, as in `ffwd bench`.
        // With --flush a 64 MB buffer is swept before every call: weights come from memory, as
        // they would between the layers of a real model.
        let flush = args.iter().any(|a| a == "--flush");
        let mut junk = if flush { vec![1.0f32; 16 << 20] } else { Vec::new() };
        let mut sweep = || {
            for v in junk.iter_mut().step_by(16) {
                *v += 1.0;
            }
        };
        const ROUND: usize = 5;
        let mut yd = vec![0.0f32; batch * D];
        let (mut t_ours, mut t_loop, mut t_dense) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..reps.div_ceil(ROUND) {
            for r in 0..=ROUND {
                let x = &xs[(round + r) % sets];
                sweep();
                let s = Instant::now();
                kernel.forward(x, batch, &mut y, &mut ws).expect("kernel");
                if r > 0 {
                    t_ours.push(s.elapsed().as_secs_f64() * 1e6);
                }
            }
            if only_ffwd {
                continue;
            }
            for r in 0..=ROUND {
                let x = &xs[(round + r) % sets];
                sweep();
                let s = Instant::now();
                std::hint::black_box(loop_forward(
                    &smoe.router.value,
                    &smoe.bank.w1.value,
                    &smoe.bank.b1.value,
                    &smoe.bank.w2.value,
                    &smoe.bank.b2.value,
                    x,
                    batch,
                ));
                if r > 0 {
                    t_loop.push(s.elapsed().as_secs_f64() * 1e6);
                }
            }
            for r in 0..=ROUND {
                let x = &xs[(round + r) % sets];
                sweep();
                let s = Instant::now();
                dense.forward(x, batch, &mut yd, &mut ws).expect("dense");
                if r > 0 {
                    t_dense.push(s.elapsed().as_secs_f64() * 1e6);
                }
            }
        }
        let ours = median(t_ours.clone());
        if only_ffwd {
            println!("{batch:>6} {ours:>12.1}");
            continue;
        }
        let (lp, dn) = (median(t_loop), median(t_dense));
        println!("{batch:>6} {ours:>12.1} {lp:>12.1} {dn:>12.1} {:>9.2}x {:>9.2}x", lp / ours, dn / ours);
    }
}
