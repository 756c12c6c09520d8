//! Conditional training of UltraFastBERT trees: AdamW step time (forward, backward, update) of
//! a 784 → 10 `ufff` classifier at batch 128 as the tree widens, next to a dense layer of the
//! same width. `cargo bench --bench ufff_train [-- --json]`.

use std::time::Instant;

use ffwd::core::Rng;
use ffwd::layers::{DenseConfig, LayerConfig, UfffConfig};
use ffwd::models::{Classifier, ModelConfig};
use ffwd::optim::{AdamW, Optimizer};

fn median_step_us(layer: LayerConfig, batch: usize, reps: usize) -> f64 {
    let (din, classes) = (784, 10);
    let mut model = Classifier::new(ModelConfig { in_features: din, n_classes: classes, layer }, 0).expect("model");
    let mut rng = Rng::new(1);
    let x: Vec<f32> = (0..batch * din).map(|_| rng.uniform()).collect();
    let y: Vec<u32> = (0..batch).map(|_| rng.below(classes) as u32).collect();
    let mut opt = AdamW::new(0.01);
    let mut times = Vec::with_capacity(reps);
    for i in 0..reps + 10 {
        let t = Instant::now();
        model.forward_backward(&x, &y, &mut rng).expect("step");
        opt.step(&mut |f| model.visit_params_mut(f), 1e-3, 1.0);
        if i >= 10 {
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    times[reps / 2]
}

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    let batch = 128;
    if !json {
        println!("AdamW step, 784 → 10 classifier, batch {batch}, {} threads (median µs)", rayon::current_num_threads());
        println!("{:>6} {:>8} {:>12} {:>12} {:>12} {:>9}", "depth", "neurons", "ufff sparse", "ufff dense", "dense FFN", "dense/ufff");
    }
    for depth in [5usize, 7, 9, 11, 13] {
        let width = (1usize << (depth + 1)) - 1;
        let reps = if depth >= 11 { 30 } else { 200 };
        let sparse = median_step_us(LayerConfig::Ufff(UfffConfig { depth, ..Default::default() }), batch, reps);
        if std::env::args().any(|a| a == "--sparse-only") {
            println!("{depth:>6} {width:>8} {sparse:>12.1}");
            continue;
        }
        let dense_upd = median_step_us(LayerConfig::Ufff(UfffConfig { depth, sparse_update: false, ..Default::default() }), batch, reps);
        let dense = median_step_us(LayerConfig::Dense(DenseConfig { width, ..Default::default() }), batch, reps);
        if json {
            println!("{{\"bench\":\"ufff_train\",\"depth\":{depth},\"neurons\":{width},\"batch\":{batch},\"ufff_sparse_us\":{sparse:.1},\"ufff_dense_update_us\":{dense_upd:.1},\"dense_us\":{dense:.1}}}");
        } else {
            println!("{depth:>6} {width:>8} {sparse:>12.1} {dense_upd:>12.1} {dense:>12.1} {:>9.1}", dense / sparse);
        }
    }
}
