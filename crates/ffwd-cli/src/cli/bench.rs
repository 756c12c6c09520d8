//! `ffwd bench`: inference kernels of the conditional layers against the dense layer of equal
//! hidden width, measured in the same run.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde_json::json;

use ffwd::core::{Activation, Rng};
use ffwd::kernels::pkm::PkmScoring;
use ffwd::kernels::{InferKernel, Precision, Workspace};
use ffwd::layers::{DenseConfig, FffConfig, LayerConfig, MoeConfig, PkmConfig, SmoeConfig, UfffConfig};

/// Options of `ffwd bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A seconds-long subset of the suite.
    #[arg(long)]
    quick: bool,
    /// One JSON object per line instead of the table.
    #[arg(long)]
    json: bool,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Measure a trained checkpoint end to end instead of the suite.
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// Run only the suite rows of these layers (comma-separated: ufff,ufff-bf16,ufff-q8,ufff-q4,
    /// dense-bf16,dense-q8,dense-q4,fff,fff-bf16,fff-q8,fff-q4,smoe,smoe-bf16,moe,pkm).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Time budget per measurement in milliseconds (at least 5 timed calls are made).
    #[arg(long, default_value_t = 400)]
    budget_ms: u64,
    /// With --model: store the layer's weight matrices in bfloat16 (dense, ufff, fff leaves,
    /// moe/smoe/moefied experts).
    #[arg(long, requires = "model")]
    bf16: bool,
    /// With --model: the batch size of the throughput measurement.
    #[arg(long, default_value_t = 1024, requires = "model")]
    batch: usize,
}

/// Median and 90th percentile of a call's duration in µs.
fn time_it(budget_ms: u64, mut f: impl FnMut()) -> (f64, f64) {
    f(); // warm-up: sizes the workspace, faults the weights in
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < 5 || (start.elapsed().as_millis() < budget_ms as u128 && times.len() < 10_000) {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    (times[times.len() / 2], times[(times.len() * 9 / 10).min(times.len() - 1)])
}

fn kernel(cfg: LayerConfig, ni: usize, no: usize, seed: u64) -> anyhow::Result<Box<dyn InferKernel>> {
    kernel_in(cfg, ni, no, seed, Precision::F32)
}

fn kernel_in(cfg: LayerConfig, ni: usize, no: usize, seed: u64, precision: Precision) -> anyhow::Result<Box<dyn InferKernel>> {
    Ok(cfg.build(ni, no, &mut Rng::new(seed))?.kernel_with(precision)?)
}

struct Case {
    name: String,
    /// Weight storage of the conditional layer (the dense baseline is always f32).
    weights: &'static str,
    /// Input and output width.
    d: usize,
    shape: String,
    tree: Box<dyn InferKernel>,
    dense: Box<dyn InferKernel>,
    batches: Vec<usize>,
}

fn suite(quick: bool) -> anyhow::Result<Vec<Case>> {
    let (d, batches) = (768, if quick { vec![1, 256] } else { vec![1, 16, 256, 4096] });
    let mut cases = Vec::new();
    // UltraFastBERT: depth 11 → 4095 GELU neurons, 12 per token; dense twin 768-4095-768 GELU.
    let ufff = LayerConfig::Ufff(UfffConfig { depth: 11, activation: Activation::Gelu, ..Default::default() });
    let ufff_dense = || kernel(LayerConfig::Dense(DenseConfig { width: 4095, layers: 2, activation: Activation::Gelu }), d, d, 2);
    cases.push(Case {
        name: "ufff".into(),
        weights: "f32",
        d,
        shape: "768-[4095 tree, depth 11]-768".into(),
        tree: kernel(ufff.clone(), d, d, 1)?,
        dense: ufff_dense()?,
        batches: batches.clone(),
    });
    // the same tree with bf16 weight rows (half the bytes per sample) against the f32 dense
    cases.push(Case {
        name: "ufff-bf16".into(),
        weights: "bf16",
        d,
        shape: "768-[4095 tree, depth 11]-768, bf16 weights".into(),
        tree: kernel_in(ufff.clone(), d, d, 1, Precision::Bf16)?,
        dense: ufff_dense()?,
        batches: batches.clone(),
    });
    // the dense twin itself with bf16 weights (a GEMV over bf16 blocks at 1–2 rows, bf16
    // products against weights packed at load above; without AVX512_BF16 the GEMV up to 48
    // rows, widened f32 products above) against its f32 self
    cases.push(Case {
        name: "dense-bf16".into(),
        weights: "bf16",
        d,
        shape: "768-4095-768 dense, bf16".into(),
        tree: kernel_in(LayerConfig::Dense(DenseConfig { width: 4095, layers: 2, activation: Activation::Gelu }), d, d, 2, Precision::Bf16)?,
        dense: ufff_dense()?,
        batches: batches.clone(),
    });
    // the same tree and its dense twin with Q8_0 / Q4_0 weight blocks (integer kernels)
    for (p, bits) in [(Precision::Q8_0, "q8"), (Precision::Q4_0, "q4")] {
        cases.push(Case {
            name: format!("ufff-{bits}"),
            weights: p.name(),
            d,
            shape: format!("768-[4095 tree, depth 11]-768, {}", p.name()),
            tree: kernel_in(ufff.clone(), d, d, 1, p)?,
            dense: ufff_dense()?,
            batches: batches.clone(),
        });
        let dense = LayerConfig::Dense(DenseConfig { width: 4095, layers: 2, activation: Activation::Gelu });
        cases.push(Case {
            name: format!("dense-{bits}"),
            weights: p.name(),
            d,
            shape: format!("768-4095-768 dense, {}", p.name()),
            tree: kernel_in(dense, d, d, 2, p)?,
            dense: ufff_dense()?,
            batches: batches.clone(),
        });
    }
    // FFF paper shape: leaf 32, depth 1..11; dense twin of width 2^d · 32 (ReLU both).
    let depths: Vec<usize> = if quick { vec![4, 8] } else { (1..=11).collect() };
    for depth in depths {
        let width = 32usize << depth;
        cases.push(Case {
            name: "fff".into(),
            weights: "f32",
            d,
            shape: format!("768-[{} leaves x 32, depth {depth}]-768", 1 << depth),
            tree: kernel(LayerConfig::Fff(FffConfig { depth, leaf: 32, ..Default::default() }), d, d, 3)?,
            dense: kernel(LayerConfig::Dense(DenseConfig { width, layers: 2, activation: Activation::Relu }), d, d, 4)?,
            batches: batches.clone(),
        });
    }
    // the FFF paper shapes at depth 4 and 8 with bf16 / Q8_0 / Q4_0 leaves
    for (p, bits) in [(Precision::Bf16, "bf16"), (Precision::Q8_0, "q8"), (Precision::Q4_0, "q4")] {
        for depth in [4, 8] {
            let width = 32usize << depth;
            cases.push(Case {
                name: format!("fff-{bits}"),
                weights: p.name(),
                d,
                shape: format!("768-[{} leaves x 32, depth {depth}]-768, {}", 1 << depth, p.name()),
                tree: kernel_in(LayerConfig::Fff(FffConfig { depth, leaf: 32, ..Default::default() }), d, d, 3, p)?,
                dense: kernel(LayerConfig::Dense(DenseConfig { width, layers: 2, activation: Activation::Relu }), d, d, 4)?,
                batches: batches.clone(),
            });
        }
    }
    // Csordás et al.'s σ-MoE benchmark shape: d_model 512, 32 experts × 128, K = 4, against the
    // dense d_ff = 4096 block (active-FLOP ratio ≈ 8); the top-k softmax MoE and a product-key
    // memory reading 4 × 32 values of 64² on the same budget.
    let dm = 512;
    let dense4096 = || kernel(LayerConfig::Dense(DenseConfig { width: 4096, layers: 2, activation: Activation::Relu }), dm, dm, 5);
    let mix_batches = if quick { vec![1, 256] } else { vec![1, 16, 256, 4096] };
    let smoe = SmoeConfig { experts: 32, expert_width: 128, k: 4, ..Default::default() };
    cases.push(Case {
        name: "smoe".into(),
        weights: "f32",
        d: dm,
        shape: "512-[32 experts x 128, K=4]-512".into(),
        tree: kernel(LayerConfig::Smoe(smoe.clone()), dm, dm, 6)?,
        dense: dense4096()?,
        batches: mix_batches.clone(),
    });
    // the same experts in bf16 (packed for bf16 products, or widened per call without
    // AVX512_BF16; the router f32)
    cases.push(Case {
        name: "smoe-bf16".into(),
        weights: "bf16",
        d: dm,
        shape: "512-[32 experts x 128, K=4]-512, bf16".into(),
        tree: kernel_in(LayerConfig::Smoe(smoe), dm, dm, 6, Precision::Bf16)?,
        dense: dense4096()?,
        batches: mix_batches.clone(),
    });
    if !quick {
        let moe = MoeConfig { experts: 32, expert_width: 128, k: 4, ..Default::default() };
        cases.push(Case {
            name: "moe".into(),
            weights: "f32",
            d: dm,
            shape: "512-[32 experts x 128, top-4 softmax]-512".into(),
            tree: kernel(LayerConfig::Moe(moe), dm, dm, 7)?,
            dense: dense4096()?,
            batches: mix_batches.clone(),
        });
        let pkm = PkmConfig { n_keys: 64, heads: 4, k: 32, key_dim: 128, scoring: PkmScoring::Relu };
        cases.push(Case {
            name: "pkm".into(),
            weights: "f32",
            d: dm,
            shape: "512-[64^2 values, 4 heads x 32]-512".into(),
            tree: kernel(LayerConfig::Pkm(pkm), dm, dm, 8)?,
            dense: dense4096()?,
            batches: mix_batches,
        });
    }
    Ok(cases)
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    let threads = super::init_threads(a.threads)?;
    if let Some(path) = &a.model {
        return bench_model(path, threads, &a);
    }
    if !a.json {
        println!("ffwd bench: inference, {threads} threads, median of repeated calls (µs per batch)");
        println!("{:<5} {:<42} {:>6} {:>12} {:>12} {:>12} {:>9} {:>9}", "layer", "shape", "batch", "median_us", "p90_us", "dense_us", "speedup", "flop_ratio");
    }
    let mut rng = Rng::new(7);
    let mut ws = Workspace::new();
    for case in suite(a.quick)? {
        if !a.only.is_empty() && !a.only.contains(&case.name) {
            continue;
        }
        let flop_ratio = case.dense.macs_per_sample() as f64 / case.tree.macs_per_sample() as f64;
        for &batch in &case.batches {
            // Consecutive calls get different inputs (up to 64 sets, 4096 samples): repeating one
            // input would keep a tree's few weight rows cache-hot and flatter it.
            let sets = (4096 / batch).clamp(1, 64);
            let d = case.d;
            let x: Vec<f32> = (0..sets * batch * d).map(|_| rng.normal()).collect();
            let xs: Vec<&[f32]> = x.chunks(batch * d).collect();
            let mut y = vec![0.0f32; batch * d];
            let mut i = 0;
            let (dense_med, dense_p90) = time_it(a.budget_ms, || {
                i += 1;
                case.dense.forward(xs[i % sets], batch, &mut y, &mut ws).expect("dense")
            });
            let (med, p90) = time_it(a.budget_ms, || {
                i += 1;
                case.tree.forward(xs[i % sets], batch, &mut y, &mut ws).expect("tree")
            });
            let speedup = dense_med / med;
            if a.json {
                println!(
                    "{}",
                    json!({"layer": case.name, "weights": case.weights, "shape": case.shape, "batch": batch, "threads": threads, "median_us": med, "p90_us": p90,
                           "dense_median_us": dense_med, "dense_p90_us": dense_p90, "speedup_vs_dense": speedup, "flop_ratio": flop_ratio})
                );
            } else {
                println!(
                    "{:<5} {:<42} {:>6} {:>12.1} {:>12.1} {:>12.1} {:>8.1}x {:>8.1}x",
                    case.name, case.shape, batch, med, p90, dense_med, speedup, flop_ratio
                );
            }
        }
    }
    Ok(())
}

fn bench_model(path: &std::path::Path, threads: usize, a: &BenchArgs) -> anyhow::Result<()> {
    if ffwd::checkpoint::format_of(path)? == ffwd::checkpoint::LM_FORMAT {
        let (tps, ffn, params) = super::lm::generate_tokens_per_s(path, 7)?;
        if a.json {
            println!(
                "{}",
                json!({"model": path.display().to_string(), "kind": "lm", "ffn": ffn, "params": params, "threads": threads, "generate_tokens_per_s": tps})
            );
        } else {
            println!(
                "{}: language model ({ffn} FFN, {params} params), {threads} threads\n  generation at batch 1 (KV cache): {tps:.0} tokens/s",
                path.display()
            );
        }
        return Ok(());
    }
    let mut model = ffwd::models::Classifier::load(path)?;
    // a quantized checkpoint loads with its format set
    let precision = if a.bf16 { Precision::Bf16 } else { model.precision() };
    model.set_precision(precision)?;
    let k = model.layer().kernel_with(precision)?;
    if a.bf16 {
        super::note_bf16_speed();
    }
    let (ni, no) = (k.in_features(), k.out_features());
    let mut rng = Rng::new(3);
    let mut ws = Workspace::new();
    anyhow::ensure!(a.batch > 0, "--batch must be positive");
    let big = a.batch;
    let x: Vec<f32> = (0..big * ni).map(|_| rng.uniform()).collect();
    let mut y = vec![0.0f32; big * no];
    let mut i = 0;
    let (lat, lat90) = time_it(a.budget_ms, || {
        i = (i + 1) % big; // a different sample each call
        k.forward(&x[i * ni..(i + 1) * ni], 1, &mut y[..no], &mut ws).expect("forward")
    });
    // the whole library call a program makes: input check, logits, argmax, the result vector
    let mut j = 0;
    let (predict, _) = time_it(a.budget_ms, || {
        j = (j + 1) % big;
        std::hint::black_box(model.predict(&x[j * ni..(j + 1) * ni], 1).expect("predict"));
    });
    let (bt, _) = time_it(a.budget_ms, || k.forward(&x, big, &mut y, &mut ws).expect("forward"));
    let sps = big as f64 / (bt * 1e-6);
    if a.json {
        println!(
            "{}",
            json!({"model": path.display().to_string(), "layer": k.kind(), "weights": precision.name(), "threads": threads, "latency_us_batch1": lat, "latency_p90_us_batch1": lat90, "predict_us_batch1": predict,
                   "batch": big, "samples_per_s": sps, "median_us_batch": bt, "neurons_per_inference": k.neurons_per_inference()})
        );
    } else {
        println!(
            "{}: {} layer {ni}→{no} ({} weights), {} neurons per inference, {threads} threads\n  batch 1: median {lat:.2} µs (p90 {lat90:.2}) kernel, {predict:.2} µs Classifier::predict\n  batch {big}: {sps:.0} samples/s",
            path.display(),
            k.kind(),
            precision.name(),
            k.neurons_per_inference()
        );
    }
    Ok(())
}
