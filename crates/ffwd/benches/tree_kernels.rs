//! Tree inference kernels against the machine's memory bandwidth, measured in one run.
//!
//! At batch 256 a tree layer reads most of its weights once per call (every sample goes its
//! own way), while the dense layer of equal width reuses each weight 256 times. So the wall
//! clock of a tree kernel is bounded below by `bytes touched / bandwidth`, not by its FLOPs.
//! For each shape this prints the kernel strategies' medians, the bytes the batch touches
//! (distinct rows of the tree actually visited), the effective bandwidth, the floor that the
//! streaming bandwidth measured here (a two-thread sum over a buffer of the same size) puts on
//! the call, the dense layer of equal width (as in `ffwd bench`), the speedup over it, and the
//! ceiling on that speedup: dense time / floor.
//!
//! Run: `cargo bench --bench tree_kernels [-- --batch 256 --rounds 15 --only ufff|'fff d=4' --strategy grouped]`.

use std::time::Instant;

use ffwd::core::{Activation, Rng};
use ffwd::kernels::ufff::TreeStrategy;
use ffwd::kernels::{FffKernel, InferKernel, UfffKernel, Workspace};
use ffwd::layers::{DenseConfig, LayerConfig};
use rayon::prelude::*;

const D: usize = 768;

fn randn(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * scale).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median µs of a two-thread streaming sum over `bytes` bytes (the buffer is read `reps` times).
fn stream_us(bytes: usize, rounds: usize) -> f64 {
    let n = bytes / 4;
    let a: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let chunk = n.div_ceil(rayon::current_num_threads()).max(1);
    let mut t = Vec::new();
    for _ in 0..rounds * 4 {
        let s = Instant::now();
        let v: f32 = a.par_chunks(chunk).map(sum).sum();
        std::hint::black_box(v);
        t.push(s.elapsed().as_secs_f64() * 1e6);
    }
    median(t)
}

/// Sum with 32 independent lanes (vectorises; a plain fold is latency-bound).
fn sum(a: &[f32]) -> f32 {
    let mut acc = [0.0f32; 32];
    for c in a.chunks_exact(32) {
        for (s, v) in acc.iter_mut().zip(c) {
            *s += v;
        }
    }
    acc.iter().sum()
}

/// The dense `D → width → D` layer the tree is compared with in `ffwd bench`.
fn dense(width: usize, activation: Activation) -> Box<dyn InferKernel> {
    let cfg = LayerConfig::Dense(DenseConfig { width, layers: 2, activation });
    cfg.build(D, D, &mut Rng::new(1)).expect("valid dense config").kernel()
}

struct Case {
    name: String,
    kernels: Vec<(&'static str, Box<dyn InferKernel>)>,
    /// The dense layer of equal hidden width.
    dense: Box<dyn InferKernel>,
    /// Bytes of weights the batch touches.
    bytes: usize,
}

fn fff_case(depth: usize, x: &[f32], batch: usize, rng: &mut Rng) -> Case {
    let (leaves, nodes, l) = (1usize << depth, (1usize << depth) - 1, 32usize);
    let node_w = randn(rng, nodes * D, 1.0);
    let node_b = randn(rng, nodes, 0.1);
    let w1 = randn(rng, leaves * D * l, (1.0 / D as f32).sqrt());
    let b1 = randn(rng, leaves * l, 0.1);
    let w2 = randn(rng, leaves * l * D, (1.0 / l as f32).sqrt());
    let b2 = randn(rng, leaves * D, 0.1);
    let make = |s| -> Box<dyn InferKernel> {
        Box::new(
            FffKernel::new(node_w.clone(), node_b.clone(), &w1, b1.clone(), w2.clone(), b2.clone(), D, D, depth, l, Activation::Relu, None).with_strategy(s),
        )
    };
    let probe = FffKernel::new(node_w.clone(), node_b.clone(), &w1, b1.clone(), w2.clone(), b2.clone(), D, D, depth, l, Activation::Relu, None);
    let mut hit = vec![false; leaves];
    for leaf in probe.leaves(x, batch) {
        hit[leaf] = true;
    }
    // every sample visits depth nodes; count distinct nodes on the paths at each level
    let mut visited = std::collections::HashSet::new();
    for xs in x.chunks(D).take(batch) {
        let mut n = 0;
        while n < nodes {
            visited.insert(n);
            let z: f32 = node_w[n * D..(n + 1) * D].iter().zip(xs).map(|(a, b)| a * b).sum::<f32>() + node_b[n];
            n = 2 * n + 1 + usize::from(z >= 0.0);
        }
    }
    let leaf_bytes = 4 * (2 * D * l + l + D);
    let bytes = hit.iter().filter(|&&h| h).count() * leaf_bytes + visited.len() * 4 * (D + 1);
    Case {
        name: format!("fff d={depth:<2} ({leaves} leaves x 32)"),
        kernels: vec![("per-sample", make(TreeStrategy::PerSample)), ("grouped", make(TreeStrategy::Grouped))],
        dense: dense(32 << depth, Activation::Relu),
        bytes,
    }
}

fn ufff_case(depth: usize, x: &[f32], batch: usize, rng: &mut Rng) -> Case {
    let levels = depth + 1;
    let n = (1usize << levels) - 1;
    let w_in = randn(rng, n * D, 1.0);
    let b_in = randn(rng, n, 0.1);
    let w_out = randn(rng, n * D, 0.05);
    let make =
        |s| -> Box<dyn InferKernel> { Box::new(UfffKernel::new(w_in.clone(), b_in.clone(), w_out.clone(), D, D, levels, Activation::Gelu).with_strategy(s)) };
    let mut visited = std::collections::HashSet::new();
    for xs in x.chunks(D).take(batch) {
        let mut node = 0;
        for _ in 0..levels {
            visited.insert(node);
            let z: f32 = w_in[node * D..(node + 1) * D].iter().zip(xs).map(|(a, b)| a * b).sum::<f32>() + b_in[node];
            node = 2 * node + 1 + usize::from(z > 0.0);
        }
    }
    Case {
        name: format!("ufff depth {depth} ({n} neurons)"),
        kernels: vec![("per-sample", make(TreeStrategy::PerSample)), ("grouped", make(TreeStrategy::Grouped))],
        dense: dense(n, Activation::Gelu),
        bytes: visited.len() * 4 * (2 * D + 1),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: usize| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default);
    let (batch, rounds) = (arg("--batch", 256), arg("--rounds", 15));
    let mut rng = Rng::new(7);
    let mut x = randn(&mut rng, batch * D, 1.0);
    if args.iter().any(|a| a == "--same-path") {
        // every sample equal: one path, all rows cached (the compute-only time)
        let first = x[..D].to_vec();
        x.chunks_mut(D).for_each(|r| r.copy_from_slice(&first));
    }
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned().unwrap_or_default();
    let mut cases = Vec::new();
    if "ufff".contains(&only) || only.contains("ufff") {
        cases.push(ufff_case(11, &x, batch, &mut rng));
    }
    for depth in [4, 6, 8, 11] {
        if only.is_empty() || format!("fff d={depth}").starts_with(&only) {
            cases.push(fff_case(depth, &x, batch, &mut rng));
        }
    }
    println!("batch {batch}, {} threads, median of {rounds} interleaved rounds", rayon::current_num_threads());
    println!(
        "{:<28} {:>10} {:>11} {:>10} {:>8} {:>9} {:>10} {:>8} {:>8}",
        "shape", "strategy", "median_us", "MB touched", "GB/s", "floor_us", "dense_us", "speedup", "ceiling"
    );
    let mut ws = Workspace::new();
    for case in &cases {
        let mut y = vec![0.0f32; batch * D];
        let strategy = args.iter().position(|a| a == "--strategy").and_then(|i| args.get(i + 1)).cloned().unwrap_or_default();
        let mut times = vec![Vec::new(); case.kernels.len()];
        let mut dense_t = Vec::new();
        for _ in 0..rounds {
            case.dense.forward(&x, batch, &mut y, &mut ws).expect("shapes match");
            let s = Instant::now();
            case.dense.forward(&x, batch, &mut y, &mut ws).expect("shapes match");
            dense_t.push(s.elapsed().as_secs_f64() * 1e6);
            for (k, (_, kern)) in case.kernels.iter().enumerate().filter(|(_, (n, _))| n.contains(strategy.as_str())) {
                kern.forward(&x, batch, &mut y, &mut ws).expect("shapes match");
                let s = Instant::now();
                for _ in 0..5 {
                    kern.forward(&x, batch, &mut y, &mut ws).expect("shapes match");
                }
                times[k].push(s.elapsed().as_secs_f64() * 1e6 / 5.0);
            }
        }
        let (floor, dense_us) = (stream_us(case.bytes, rounds), median(dense_t));
        for ((name, _), t) in case.kernels.iter().zip(times).filter(|(_, t)| !t.is_empty()) {
            let m = median(t);
            let mb = case.bytes as f64 / 1e6;
            println!(
                "{:<28} {:>10} {:>11.1} {:>10.1} {:>8.1} {:>9.1} {:>10.1} {:>7.1}x {:>7.1}x",
                case.name,
                name,
                m,
                mb,
                mb / m * 1e3,
                floor,
                dense_us,
                dense_us / m,
                dense_us / floor
            );
        }
    }
}
