//! f32 GEMM throughput of the compute core (`ffwd::core::gemm::matmul`) on square and
//! training-step shapes. `cargo bench --bench gemm [-- --json | --lm | --ab | --kernels |
//! --bf16 | --kernel | --peak]`.

use std::time::Instant;

use ffwd::core::gemm::{matmul, use_gemm_crate, with_bf16_products, MatMut, MatRef};
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

/// What [`ab`] compares.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// ffwd's kernels against the `gemm` crate.
    Crate,
    /// The AVX-512 12 × 32 micro-kernel against the AVX2 6 × 16 one.
    Kernels,
    /// bf16 products (`vdpbf16ps`) against f32 ones.
    Bf16,
}

/// Two ways of running one shape, alternating in rounds: medians (µs).
fn ab(m: usize, k: usize, n: usize, ta: bool, tb: bool, mode: Mode) {
    let (a, b) = operands(m, k, n);
    let mut c = vec![0.0f32; m * n];
    let (av, bv) = views(&a, &b, m, k, n, ta, tb);
    let flops = 2.0 * (m * n * k) as f64;
    let reps = ((2e9 / flops) as usize).clamp(3, 200);
    let (mut own, mut cr) = (Vec::new(), Vec::new());
    for round in 0..10 {
        for (crate_on, out) in [(false, &mut own), (true, &mut cr)] {
            match mode {
                Mode::Kernels => ffwd::core::sgemm::set_avx512_kernel(Some(!crate_on)),
                Mode::Crate => use_gemm_crate(crate_on),
                Mode::Bf16 => {}
            }
            let bf16 = mode == Mode::Bf16 && !crate_on;
            with_bf16_products(bf16, || matmul(MatMut::new(&mut c, m, n), av, bv, false));
            for _ in 0..reps {
                let t = Instant::now();
                with_bf16_products(bf16, || matmul(MatMut::new(&mut c, m, n), av, bv, false));
                if round > 0 {
                    out.push(t.elapsed().as_secs_f64());
                }
            }
        }
    }
    use_gemm_crate(false);
    ffwd::core::sgemm::set_avx512_kernel(None);
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|x, y| x.total_cmp(y));
        v[v.len() / 2]
    };
    let (o, g) = (med(&mut own), med(&mut cr));
    let label = format!("{m}x{k}{}·{k}x{n}{}", if ta { "ᵀ" } else { "" }, if tb { "ᵀ" } else { "" });
    let (x, y) = match mode {
        Mode::Kernels => ("avx512", "avx2"),
        Mode::Crate => ("own", "crate"),
        Mode::Bf16 => ("bf16", "f32"),
    };
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
    let mode = if args.iter().any(|a| a == "--kernels") {
        Some(Mode::Kernels)
    } else if args.iter().any(|a| a == "--bf16") {
        Some(Mode::Bf16)
    } else {
        args.iter().any(|a| a == "--ab").then_some(Mode::Crate)
    };
    if let Some(mode) = mode {
        let what = match mode {
            Mode::Kernels => "the AVX-512 12x32 micro-kernel against the AVX2 6x16 one",
            Mode::Crate => "ffwd's kernels against the gemm crate",
            Mode::Bf16 => "bf16 products (vdpbf16ps, f32 accumulation) against f32 ones",
        };
        if mode == Mode::Bf16 && !ffwd::core::sgemm::bf16_supported() {
            println!("no AVX512_BF16 here: bf16 products would run as f32");
            return;
        }
        println!("GEMM, {} threads: {what}, alternating rounds (medians)", rayon::current_num_threads());
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
            // the dense 768-4095-768 inference layer at batch 16 and 256
            (16, 768, 4095, false, false),
            (16, 4095, 768, false, false),
            (256, 768, 4095, false, false),
            (256, 4095, 768, false, false),
        ] {
            ab(m, k, n, ta, tb, mode);
        }
        return;
    }
    if args.iter().any(|a| a == "--peak") {
        peak();
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

/// One core's peak multiply-add rate on register-resident data: f32 FMA on zmm against the
/// AVX512_BF16 dot product `vdpbf16ps` (two bf16 products per f32 lane), twelve independent
/// accumulators each. Answers whether bf16 operands can raise product throughput on this CPU
/// or only halve the bytes.
fn peak() {
    #[cfg(target_arch = "x86_64")]
    {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            println!("no AVX-512F on this CPU");
            return;
        }
        let bf16 = std::arch::is_x86_feature_detected!("avx512bf16");
        let n = 20_000_000;
        for _ in 0..3 {
            let t = Instant::now();
            // SAFETY: AVX-512F checked above.
            let r = unsafe { peak_x86::fma(n) };
            let f = 12.0 * n as f64 * 32.0 / t.elapsed().as_secs_f64() / 1e9;
            if bf16 {
                let t = Instant::now();
                // SAFETY: AVX512_BF16 checked above.
                let r2 = unsafe { peak_x86::dpbf16(n) };
                let g = 12.0 * n as f64 * 64.0 / t.elapsed().as_secs_f64() / 1e9;
                println!("one core: f32 FMA (zmm) {f:.1} GFLOP/s, vdpbf16ps (zmm) {g:.1} GFLOP/s, ratio {:.2}   [{r} {r2}]", g / f);
            } else {
                println!("one core: f32 FMA (zmm) {f:.1} GFLOP/s; no AVX512_BF16 on this CPU   [{r}]");
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod peak_x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma(n: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 12];
        let (a, b) = (_mm512_set1_ps(1.0001), _mm512_set1_ps(0.9999));
        for _ in 0..n {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(a, b, *x);
            }
        }
        acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn dpbf16(n: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 12];
        // bf16 pairs (1.0, 1.0) in every lane
        let a: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(0x3f80_3f80)) };
        for _ in 0..n {
            for x in acc.iter_mut() {
                *x = _mm512_dpbf16_ps(*x, a, a);
            }
        }
        acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
    }
}
