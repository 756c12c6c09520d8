//! One AdamW training step (forward, backward, update) of a 784-256-10 ReLU MLP at batch 128,
//! the comparison point against PyTorch. Prints the median and p90 over timed steps.
//! `cargo bench --bench mlp_step [-- --json] [-- --threads N]`; `bench/mlp_step.py` runs it
//! next to PyTorch and prints the ratio.

use std::time::Instant;

use ffwd::core::Rng;
use ffwd::layers::{DenseConfig, LayerConfig};
use ffwd::models::{Classifier, ModelConfig};
use ffwd::optim::{AdamW, Optimizer};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    let threads = args.iter().position(|a| a == "--threads").and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(0);
    if threads > 0 {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().expect("thread pool");
    }
    let (batch, din, width, classes) = (128, 784, 256, 10);
    let cfg = ModelConfig { in_features: din, n_classes: classes, layer: LayerConfig::Dense(DenseConfig { width, ..Default::default() }) };
    let mut model = Classifier::new(cfg, 0).expect("model");
    let mut rng = Rng::new(1);
    let x: Vec<f32> = (0..batch * din).map(|_| rng.uniform()).collect();
    let y: Vec<u32> = (0..batch).map(|_| rng.below(classes) as u32).collect();
    let mut opt = AdamW::new(0.01);
    let mut step = |model: &mut Classifier| {
        model.forward_backward(&x, &y, &mut rng).expect("step");
        opt.step(&mut |f| model.visit_params_mut(f), 1e-3, 1.0);
    };
    for _ in 0..100 {
        step(&mut model);
    }
    let reps = 1000;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        step(&mut model);
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    if args.iter().any(|a| a == "--breakdown") {
        let (mut fb, mut up) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let t = Instant::now();
            model.forward_backward(&x, &y, &mut rng).expect("step");
            fb.push(t.elapsed().as_secs_f64() * 1e6);
            let t = Instant::now();
            opt.step(&mut |f| model.visit_params_mut(f), 1e-3, 1.0);
            up.push(t.elapsed().as_secs_f64() * 1e6);
        }
        fb.sort_by(|a, b| a.total_cmp(b));
        up.sort_by(|a, b| a.total_cmp(b));
        println!("breakdown: forward+backward median {:.1} µs, AdamW update median {:.1} µs", fb[reps / 2], up[reps / 2]);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let (median, p90) = (times[reps / 2], times[reps * 9 / 10]);
    let t = rayon::current_num_threads();
    if json {
        println!("{{\"bench\":\"mlp_step\",\"impl\":\"ffwd\",\"shape\":\"784-256-10\",\"batch\":{batch},\"threads\":{t},\"median_us\":{median:.1},\"p90_us\":{p90:.1}}}");
    } else {
        println!("ffwd AdamW step 784-256-10 batch {batch}, {t} threads: median {median:.1} µs, p90 {p90:.1} µs ({reps} steps)");
    }
}
