//! f32 GEMM throughput of the compute core (`ffwd::core::gemm::matmul`) on square and
//! training-step shapes. `cargo bench --bench gemm [-- --json]`.

use std::time::Instant;

use ffwd::core::gemm::{matmul, use_gemm_crate, MatMut, MatRef};
use ffwd::core::Rng;

/// Random operands of an `m × k · k × n` product, stored transposed when asked.
fn operands(m: usize, k: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(0);
    ((0..m * k).map(|_| rng.normal()).collect(), (0..k * n).map(|_| rng.normal()).collect())
}

/// The views of [`operands`]: `a` as `m × k` (or stored `k × m`, transposed), `b` likewise.
fn views<'a>(a: &'a [f32], b: &'a [f32], m: usize, k: usize, n: usize, ta: bool, tb: bool) -> (MatRef<'a>, MatRef<'a>) {
    (if ta { MatRef::new(a, k, m).t() } else { MatRef::new(a, m, k) }, if tb { MatRef::new(b, n, k).t() } else { MatRef::new(b, k, n) })
}

fn bench(m: usize, k: usize, n: usize, ta: bool, tb: bool, json: bool) {
    let (a, b) = operands(m, k, n);
    let mut c = vec![0.0f32; m * n];
    let (av, bv) = views(&a, &b, m, k, n, ta, tb);
    let flops = 2.0 * (m * n * k) as f64;
    let reps = ((2e10 / flops) as usize).clamp(5, 2000);
    for _ in 0..reps.min(20) {
        matmul(MatMut::new(&mut c, m, n), av, bv, false);
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        matmul(MatMut::new(&mut c, m, n), av, bv, false);
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|x, y| x.total_cmp(y));
    let med = times[reps / 2];
    let gflops = flops / med / 1e9;
    let label = format!("{m}x{k}{}·{k}x{n}{}", if ta { "ᵀ" } else { "" }, if tb { "ᵀ" } else { "" });
    if json {
        println!(
            "{{\"bench\":\"gemm\",\"shape\":\"{label}\",\"threads\":{},\"median_us\":{:.1},\"gflops\":{gflops:.1}}}",
            rayon::current_num_threads(),
            med * 1e6
        );
    } else {
        println!("{label:>24}  {:>9.1} µs  {gflops:>7.1} GFLOP/s", med * 1e6);
    }
}

/// Own kernels against the `gemm` crate on one shape (or, with `kernels`, the AVX-512 12 × 32
/// micro-kernel against the AVX2 6 × 16 one), alternating in rounds: medians (µs).
fn ab(m: usize, k: usize, n: usize, ta: bool, tb: bool, kernels: bool) {
    let (a, b) = operands(m, k, n);
    let mut c = vec![0.0f32; m * n];
    let (av, bv) = views(&a, &b, m, k, n, ta, tb);
    let flops = 2.0 * (m * n * k) as f64;
    let reps = ((2e9 / flops) as usize).clamp(3, 200);
    let (mut own, mut cr) = (Vec::new(), Vec::new());
    for round in 0..10 {
        for (crate_on, out) in [(false, &mut own), (true, &mut cr)] {
            if kernels {
                ffwd::core::sgemm::set_avx512_kernel(!crate_on);
            } else {
                use_gemm_crate(crate_on);
            }
            matmul(MatMut::new(&mut c, m, n), av, bv, false);
            for _ in 0..reps {
                let t = Instant::now();
                matmul(MatMut::new(&mut c, m, n), av, bv, false);
                if round > 0 {
                    out.push(t.elapsed().as_secs_f64());
                }
            }
        }
    }
    use_gemm_crate(false);
    ffwd::core::sgemm::set_avx512_kernel(true);
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|x, y| x.total_cmp(y));
        v[v.len() / 2]
    };
    let (o, g) = (med(&mut own), med(&mut cr));
    let label = format!("{m}x{k}{}·{k}x{n}{}", if ta { "ᵀ" } else { "" }, if tb { "ᵀ" } else { "" });
    let (x, y) = if kernels { ("avx512", "avx2") } else { ("own", "crate") };
    println!(
        "{label:>24}  {x} {:>8.1} µs {:>6.1} GFLOP/s   {y} {:>8.1} µs {:>6.1} GFLOP/s   {x}/{y} speed {:.2}",
        o * 1e6,
        flops / o / 1e9,
        g * 1e6,
        flops / g / 1e9,
        g / o
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    if let Some(t) = args.iter().position(|a| a == "--threads").and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()) {
        rayon::ThreadPoolBuilder::new().num_threads(t).build_global().expect("pool");
    }
    let kernels = args.iter().any(|a| a == "--kernels");
    if kernels || args.iter().any(|a| a == "--ab") {
        if kernels {
            println!(
                "f32 GEMM, {} threads: the AVX-512 12x32 micro-kernel against the AVX2 6x16 one, alternating rounds (medians)",
                rayon::current_num_threads()
            );
        } else {
            println!("f32 GEMM, {} threads: ffwd's kernels against the gemm crate, alternating rounds (medians)", rayon::current_num_threads());
        }
        for &(m, k, n, ta, tb) in &[
            (1024, 1024, 1024, false, false),
            (128, 784, 256, false, true),
            (128, 256, 784, false, false),
            (256, 128, 784, true, false),
            (2048, 192, 768, false, true),
            (2048, 768, 192, false, true),
            (2048, 768, 192, false, false),
            (768, 2048, 192, true, false),
            (2048, 192, 576, false, true),
            (576, 2048, 192, true, false),
            // the dense 768-4095-768 inference layer at batch 16
            (16, 768, 4095, false, false),
            (16, 4095, 768, false, false),
        ] {
            ab(m, k, n, ta, tb, kernels);
        }
        return;
    }
    if args.iter().any(|a| a == "--kernel") {
        // the micro-kernel alone on packed data in L1, one thread: the share of the FMA peak
        for _ in 0..3 {
            let (g, mr, nr) = ffwd::core::sgemm::kernel_gflops(256, 200_000);
            println!("micro-kernel {mr}x{nr}, kc 256: {g:.1} GFLOP/s");
        }
        return;
    }
    if !json {
        println!("f32 GEMM, {} threads (median)", rayon::current_num_threads());
    }
    bench(1024, 1024, 1024, false, false, json);
    // the 784-256-10 MLP step at batch 128: forward, weight gradient, input gradient
    bench(128, 784, 256, false, true, json);
    bench(128, 784, 256, false, false, json);
    bench(256, 784, 128, false, true, json);
    bench(256, 128, 784, true, false, json);
    bench(128, 256, 784, false, false, json);
    if args.iter().any(|a| a == "--lm") {
        // the default LM's step at B·T = 2048 rows, d 192, FFN 768: forward x·Wᵀ, input
        // gradient dy·W, weight gradient dyᵀ·x, for the FFN and the qkv projection
        bench(2048, 192, 768, false, true, json);
        bench(2048, 768, 192, false, true, json);
        bench(2048, 768, 192, false, false, json);
        bench(768, 2048, 192, true, false, json);
        bench(2048, 192, 576, false, true, json);
        bench(576, 2048, 192, true, false, json);
    }
    if args.iter().any(|a| a == "--ff") {
        // Forward-Forward step shapes (batch 100, 784-1000)
        bench(100, 784, 1000, false, false, json);
        bench(100, 784, 1000, false, true, json);
        bench(784, 200, 1000, true, false, json);
        bench(1000, 200, 784, true, false, json);
        bench(200, 1000, 1000, false, false, json);
    }
}
