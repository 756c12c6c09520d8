//! FFN forward + backward time of structured FFNs against the dense FFN they replace, at the
//! shape of Wei et al. 2024's goal: d = 512, width 2048, GELU, 2048 token rows (batch 16 ×
//! 128). LowRank, BlockDense (4 blocks) and BlockShuffle (2 blocks) at 63 % and 32 % of the
//! dense FFN's parameters, and the 32 % ones during self-guided training (dense guide running,
//! α > 0). Contenders alternate over rounds; medians.
//!
//! Then inference at tiny batches (1, 4, 16 rows) at the same shape and at the default LM's
//! (d 192, width 768): each structured FFN's kernel running its factored products against the
//! same kernel running pre-merged dense maps (`FFWD_MERGE_BELOW` forces either), and the dense
//! kernel — the measurement behind the kernels' merge rule.
//!
//! ```sh
//! cargo bench --bench structured_ffn
//! ```

use std::time::Instant;

use ffwd::core::{Activation, Rng};
use ffwd::kernels::{InferKernel, Workspace};
use ffwd::layers::{DenseConfig, Input, LayerConfig, LowRankConfig, StructuredConfig};

fn median(t: &mut [f64]) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// The dense FFN and the structured ones at 63 % and 32 % of its parameters, `d → w → d`.
fn cases(d: usize, w: usize) -> Vec<(String, LayerConfig)> {
    let gelu = Activation::Gelu;
    let dense_params = 2 * d * w;
    // rank r: 2 maps × r · (d + w) parameters
    let rank_for = |share: f64| ((share * dense_params as f64) / (2.0 * (d + w) as f64)).round() as usize;
    let mut cases: Vec<(String, LayerConfig)> = vec![("dense".into(), LayerConfig::Dense(DenseConfig { width: w, layers: 2, activation: gelu }))];
    for share in [0.63, 0.32] {
        let r = rank_for(share);
        cases.push((
            format!("lowrank r {r} ({:.0} %)", 100.0 * share),
            LayerConfig::LowRank(LowRankConfig { width: w, rank: r, activation: gelu, guide: None }),
        ));
    }
    for share in [0.63, 0.32] {
        // BlockDense, nb 4: r·(d + w)·(1 + 1/nb); BlockShuffle, nb 2: 2·m·(d + w)/nb
        let r = ((share * dense_params as f64) / ((d + w) as f64 * 1.25) / 4.0).round() as usize * 4;
        cases.push((
            format!("blockdense r {r} ({:.0} %)", 100.0 * share),
            LayerConfig::BlockDense(StructuredConfig { width: w, rank: r, blocks: 4, activation: gelu, guide: None }),
        ));
        let m = ((share * dense_params as f64) / ((d + w) as f64) / 2.0).round() as usize * 2;
        cases.push((
            format!("blockshuffle m {m} ({:.0} %)", 100.0 * share),
            LayerConfig::BlockShuffle(StructuredConfig { width: w, rank: m, blocks: 2, activation: gelu, guide: None }),
        ));
    }
    cases
}

/// Kernel time per call at tiny batches: factored vs pre-merged vs dense.
fn tiny_batches(d: usize, w: usize) -> ffwd::Result<()> {
    let mut rng = Rng::new(1);
    let cases = cases(d, w);
    let mut kernels: Vec<(String, Box<dyn InferKernel>)> = Vec::new();
    for (name, cfg) in &cases {
        let layer = cfg.build(d, d, &mut rng)?;
        if name == "dense" {
            kernels.push((name.clone(), layer.kernel()));
            continue;
        }
        for (mode, below) in [("factored", "0"), ("merged", "1000000")] {
            // read once when the kernel is built (single-threaded here)
            std::env::set_var("FFWD_MERGE_BELOW", below);
            kernels.push((format!("{name} {mode}"), layer.kernel()));
        }
        std::env::remove_var("FFWD_MERGE_BELOW");
    }
    println!("inference kernel, d {d}, width {w}, µs per call (median of 9 alternating rounds of 100 calls)");
    println!("  {:<34} {:>9} {:>9} {:>9}", "", "batch 1", "batch 4", "batch 16");
    let mut table = vec![Vec::new(); kernels.len()];
    for batch in [1usize, 4, 16] {
        let x: Vec<f32> = (0..batch * d).map(|_| rng.normal()).collect();
        let mut y = vec![0.0f32; batch * d];
        let mut ws = Workspace::new();
        let mut times = vec![Vec::new(); kernels.len()];
        for round in 0..9 {
            for (k, (name, kern)) in kernels.iter().enumerate() {
                let t0 = Instant::now();
                for _ in 0..100 {
                    kern.forward(&x, batch, &mut y, &mut ws)?;
                }
                times[k].push(t0.elapsed().as_secs_f64() / 100.0);
                if std::env::var("DEBUG_BENCH").is_ok() && round == 0 {
                    eprintln!("{name} batch {batch}: {:?}", t0.elapsed() / 100);
                }
            }
        }
        for (k, t) in times.iter_mut().enumerate() {
            table[k].push(median(t) * 1e6);
        }
    }
    for ((name, _), t) in kernels.iter().zip(&table) {
        println!("  {name:<34} {:>9.1} {:>9.1} {:>9.1}", t[0], t[1], t[2]);
    }
    Ok(())
}

fn main() -> ffwd::Result<()> {
    let (d, w, rows) = (512usize, 2048usize, 2048usize);
    if std::env::args().any(|a| a == "--tiny") {
        tiny_batches(192, 768)?;
        return tiny_batches(d, w);
    }
    let mut cases = cases(d, w);
    // the 32 % structured FFNs during self-guided training (α > 0: the dense guide runs too;
    // with reduce_flop it runs with probability α, so a phase of α from 1 to 0 costs on average
    // half of the guide)
    let guided: Vec<(String, LayerConfig)> = cases
        .iter()
        .filter(|(n, _)| n.contains("32 %"))
        .map(|(n, c)| {
            let mut c = c.clone();
            let g = Some(ffwd::layers::guided::GuideConfig::default());
            match &mut c {
                LayerConfig::LowRank(l) => l.guide = g,
                LayerConfig::BlockDense(s) | LayerConfig::BlockShuffle(s) => s.guide = g,
                _ => {}
            }
            (format!("{n}, guided"), c)
        })
        .collect();
    cases.extend(guided);
    let mut rng = Rng::new(0);
    let x: Vec<f32> = (0..rows * d).map(|_| rng.normal()).collect();
    let dy: Vec<f32> = (0..rows * d).map(|_| rng.normal()).collect();
    let mut y = vec![0.0f32; rows * d];
    let mut dx = vec![0.0f32; rows * d];
    let mut layers = Vec::new();
    for (_, cfg) in &cases {
        layers.push(cfg.build(d, d, &mut rng)?);
    }
    let mut times = vec![Vec::new(); cases.len()];
    for _round in 0..7 {
        for (k, layer) in layers.iter_mut().enumerate() {
            let t0 = Instant::now();
            layer.forward_train(Input::new(&x, rows), &mut y, &mut rng)?;
            layer.backward(Input::new(&x, rows), &dy, Some(&mut dx))?;
            layer.zero_grad();
            times[k].push(t0.elapsed().as_secs_f64());
        }
    }
    println!("FFN forward + backward, d {d}, width {w}, {rows} rows, {} threads (median of 7 alternating rounds)", rayon::current_num_threads());
    let base = median(&mut times[0].clone());
    for (k, (name, cfg)) in cases.iter().enumerate() {
        let m = median(&mut times[k]);
        let params = cfg.param_count(d, d).unwrap_or(0);
        println!("  {name:<30} {params:>9} params  {:>7.2} ms  {:.2}x dense's speed", m * 1e3, base / m);
    }
    tiny_batches(192, 768)?;
    tiny_batches(d, w)
}
