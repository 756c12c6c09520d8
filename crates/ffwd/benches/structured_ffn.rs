//! FFN forward + backward time of structured FFNs against the dense FFN they replace, at the
//! shape of Wei et al. 2024's goal: d = 512, width 2048, GELU, 2048 token rows (batch 16 ×
//! 128). LowRank, BlockDense (4 blocks) and BlockShuffle (2 blocks) at 63 % and 32 % of the
//! dense FFN's parameters. Contenders alternate over rounds; medians.
//!
//! ```sh
//! cargo bench --bench structured_ffn
//! ```

use std::time::Instant;

use ffwd::core::{Activation, Rng};
use ffwd::layers::{DenseConfig, Input, LayerConfig, LowRankConfig, StructuredConfig};

fn main() -> ffwd::Result<()> {
    let (d, w, rows) = (512usize, 2048usize, 2048usize);
    let gelu = Activation::Gelu;
    let dense_params = 2 * d * w;
    // rank r: 2 maps × r · (d + w) parameters
    let rank_for = |share: f64| ((share * dense_params as f64) / (2.0 * (d + w) as f64)).round() as usize;
    let mut cases: Vec<(String, LayerConfig)> = vec![("dense".into(), LayerConfig::Dense(DenseConfig { width: w, layers: 2, activation: gelu }))];
    for share in [0.63, 0.32] {
        let r = rank_for(share);
        cases.push((format!("lowrank r {r} ({:.0} %)", 100.0 * share), LayerConfig::LowRank(LowRankConfig { width: w, rank: r, activation: gelu })));
    }
    for share in [0.63, 0.32] {
        // BlockDense, nb 4: r·(d + w)·(1 + 1/nb); BlockShuffle, nb 2: 2·m·(d + w)/nb
        let r = ((share * dense_params as f64) / ((d + w) as f64 * 1.25) / 4.0).round() as usize * 4;
        cases.push((
            format!("blockdense r {r} ({:.0} %)", 100.0 * share),
            LayerConfig::BlockDense(StructuredConfig { width: w, rank: r, blocks: 4, activation: gelu }),
        ));
        let m = ((share * dense_params as f64) / ((d + w) as f64) / 2.0).round() as usize * 2;
        cases.push((
            format!("blockshuffle m {m} ({:.0} %)", 100.0 * share),
            LayerConfig::BlockShuffle(StructuredConfig { width: w, rank: m, blocks: 2, activation: gelu }),
        ));
    }
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
    let median = |t: &mut Vec<f64>| {
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    };
    let base = median(&mut times[0].clone());
    for (k, (name, cfg)) in cases.iter().enumerate() {
        let m = median(&mut times[k]);
        let params = cfg.param_count(d, d).unwrap_or(0);
        println!("  {name:<22} {params:>9} params  {:>7.2} ms  {:.2}x dense's speed", m * 1e3, base / m);
    }
    Ok(())
}
