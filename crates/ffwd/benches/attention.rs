//! The fused causal attention kernel (`core::attention`) of one LM layer: B·heads (sequence,
//! head) items in parallel, forward and backward, at the default LM's shape (16 × 6 heads,
//! T 128, head width 32) and longer contexts. Medians over rounds; GFLOP/s counts the
//! multiply-adds of the causal half (forward 2, backward 4 products of t²/2 · hd).
//! `cargo bench --bench attention [-- --t 256 --hd 64 --items 24]`

use std::time::Instant;

use ffwd::core::attention::{backward, forward, scratch_len, Head};
use ffwd::core::Rng;
use rayon::prelude::*;

fn arg(args: &[String], name: &str) -> Option<usize> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok())
}

fn run(items: usize, t: usize, hd: usize) {
    let mut rng = Rng::new(0);
    let rs = 3 * hd;
    let qkv: Vec<f32> = (0..items * t * rs).map(|_| rng.normal()).collect();
    let g: Vec<f32> = (0..items * t * hd).map(|_| rng.normal()).collect();
    let (mut o, mut lse) = (vec![0.0f32; items * t * hd], vec![0.0f32; items * t]);
    let mut grads = vec![0.0f32; items * 3 * t * hd];
    let scale = 1.0 / (hd as f32).sqrt();
    let head = |i: usize| {
        let base = &qkv[i * t * rs..(i + 1) * t * rs];
        Head { q: base, k: &base[hd..], v: &base[2 * hd..], rs, t, hd }
    };
    let fwd = |o: &mut [f32], lse: &mut [f32]| {
        o.par_chunks_mut(t * hd)
            .zip(lse.par_chunks_mut(t))
            .enumerate()
            .for_each_init(|| vec![0.0f32; scratch_len(t, hd)], |s, (i, (o, l))| forward(head(i), scale, o, l, s))
    };
    let bwd = |o: &[f32], lse: &[f32], grads: &mut [f32]| {
        grads.par_chunks_mut(3 * t * hd).enumerate().for_each_init(
            || vec![0.0f32; scratch_len(t, hd)],
            |s, (i, dh)| {
                let (dq, rest) = dh.split_at_mut(t * hd);
                let (dk, dv) = rest.split_at_mut(t * hd);
                let r = i * t * hd..(i + 1) * t * hd;
                backward(head(i), scale, &o[r.clone()], &lse[i * t..(i + 1) * t], &g[r], hd, dq, dk, dv, s)
            },
        )
    };
    let (mut tf, mut tb) = (Vec::new(), Vec::new());
    for round in 0..30 {
        let t0 = Instant::now();
        fwd(&mut o, &mut lse);
        let t1 = Instant::now();
        bwd(&o, &lse, &mut grads);
        if round >= 3 {
            tf.push((t1 - t0).as_secs_f64());
            tb.push(t1.elapsed().as_secs_f64());
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (f, b) = (med(&mut tf), med(&mut tb));
    let macs = items as f64 * (t * (t + 1) / 2) as f64 * hd as f64;
    println!(
        "items {items:>3}  t {t:>4}  hd {hd:>3}:  forward {:>8.1} µs ({:>5.1} GFLOP/s)   backward {:>8.1} µs ({:>5.1} GFLOP/s)",
        f * 1e6,
        2.0 * 2.0 * macs / f / 1e9,
        b * 1e6,
        4.0 * 2.0 * macs / b / 1e9
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    println!("fused causal attention, {} threads (medians of 27 rounds)", rayon::current_num_threads());
    if let (Some(t), Some(hd)) = (arg(&args, "--t"), arg(&args, "--hd")) {
        run(arg(&args, "--items").unwrap_or(96), t, hd);
        return;
    }
    // the default LM layer (batch 16 × 6 heads, T 128, d 192), then longer contexts
    run(96, 128, 32);
    run(24, 512, 64);
    run(8, 1024, 64);
}
